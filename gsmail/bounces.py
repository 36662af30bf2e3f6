# -*- test-case-name: tests.test_bounces -*-
"""
Which mail to a bounce address is recorded as a bounce: only a real report
that delivery to that member failed for good, to an address this site made.

  1. The address (L{gsmail.verp}): a forged or too old tag, an unsigned
     address after C{verp_unsigned_until}, or an unsigned one of no group:
     accepted and dropped (C{250 2.0.0 Not recorded: not a current bounce
     address of this site}).
  2. The message: an RFC 3464 report (C{multipart/report;
     report-type=delivery-status}, read by L{gsmail.outbound.dsn.parse.parse_dsn})
     with a block for the member whose C{Action} is C{failed} and whose
     C{Status} is C{5.x.x}, or C{4.x.x} (a sender that gave up after
     transient failures: Postfix reports queue expiry so); or, for a bounce
     that is not an RFC 3464 report, one in which flufl.bounce (Mailman's
     detectors) finds the member among the permanent failures. Anything else
     (a delay notice, an out-of-office reply, plain mail) is accepted and
     dropped (C{250 2.0.0 Not recorded: not a delivery failure report}).

Addresses are compared without regard to case, local part included: some
MTAs lowercase the address they bounce to, and so the member read from it.

Why accept and drop rather than refuse (C{550} at RCPT or after DATA): a
refusal of a bounce (sent from C{<>}) cannot go back to anyone, so the
remote MTA mails its own postmaster a double bounce for every late or forged
bounce; and a refusal at RCPT would tell a forger, for the price of one
command, which addresses are good. Dropping costs the forger a whole
transaction per guess against a 40-bit tag, and a bounce record was only
ever advisory.

Only the first L{MAX_SCANNED} bytes of a message are read: bounces are
small, and a report's delivery-status part comes before the returned
original. Messages the spool kept in memory (64 KiB) are read from there, a
larger one's head from its spool file. Reading and parsing happen in a
thread of the reactor's pool (in the daemon): an RFC 3464 report parses in
about 0.2 ms, but 256 KiB of plain text keeps flufl.bounce's heuristic
detectors busy for about 90 ms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from typing import Final, Protocol

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gsmail import status
from gsmail.addresses import Address, BounceCheck, Route
from gsmail.interfaces import MessageSource
from gsmail.outbound.dsn.parse import parse_dsn
from gsmail.status import Reply

__all__ = [
    "MAX_SCANNED",
    "Blocking",
    "BounceScreen",
    "FailureReport",
    "MemberMatcher",
    "classify",
    "read_head",
]

log = Logger()

# flufl.bounce logs a detector's exception with the standard library's
# logging before re-raising it; gsmail catches and logs it once itself.
logging.getLogger("flufl.bounce").addHandler(logging.NullHandler())
logging.getLogger("flufl.bounce").propagate = False

#: Bytes of a message to a bounce address that are parsed.
MAX_SCANNED: Final = 256 * 1024
#: Seconds of a burst: the first drop of a kind is logged, the others of
#: the next minute are counted and their number logged with the next one.
BURST: Final = 60.0


@attrs.frozen
class FailureReport:
    """
    What a message to a bounce address reports.

    @ivar kind: C{"dsn"} (an RFC 3464 report), C{"detector"} (flufl.bounce
        recognised another format) or C{"none"}.
    @ivar failed: the lowercased addresses reported as failed for good
        (C{Final-Recipient} and C{Original-Recipient} of each failed block,
        or what flufl.bounce found).
    @ivar note: why nothing failed, for the log: C{"delay notice"},
        C{"auto-reply"}, C{"no failed recipient"}, C{"not a failure report"}.
    """

    kind: str
    failed: frozenset[str]
    note: str = ""


def read_head(source: MessageSource, limit: int = MAX_SCANNED) -> bytes:
    """
    The first C{limit} bytes of the message (without gsmail's trace
    fields): from memory when the spool kept it, else from its file.

    @raise OSError: the spool file cannot be read.
    """
    if source.data is not None:
        return source.data[:limit]
    with open(source.path, "rb") as f:
        return f.read(min(limit, source.size))


def _is_auto_reply(message: Message) -> bool:
    """RFC 3834 C{Auto-Submitted: auto-replied}, or the usual vacation markers."""
    auto = str(message.get("Auto-Submitted", "")).strip().lower()
    subject = str(message.get("Subject", "")).lower()
    return (
        auto.startswith("auto-replied")
        or "X-Autoreply" in message
        or "X-Autorespond" in message
        or "out of office" in subject
        or "out of the office" in subject
    )


def classify(message: bytes) -> FailureReport:
    """
    Read what C{message} reports (see the module docstring).

    @param message: the message as received, or its first bytes.
    """
    blocks = parse_dsn(message)
    if blocks:
        failed: set[str] = set()
        for block in blocks:
            if block.action == "failed" and block.status[:1] in ("4", "5"):
                failed.update(a.lower() for a in (block.recipient, block.original) if a)
        if failed:
            return FailureReport("dsn", frozenset(failed))
        delayed = any(block.action == "delayed" for block in blocks)
        return FailureReport(
            "dsn", frozenset(), "delay notice" if delayed else "no failed recipient"
        )
    parsed = BytesParser(policy=compat32).parsebytes(message)
    try:
        from flufl.bounce import scan_message

        found = scan_message(parsed)
    except Exception as e:
        # A detector fails on some malformed messages (no From:, say):
        # nothing recognised.
        log.debug("flufl.bounce failed on a message: {error!r}", error=e)
        found = frozenset()
    addresses = frozenset(a.decode("utf-8", "replace").lower() for a in found)
    if addresses:
        return FailureReport("detector", addresses)
    note = "auto-reply" if _is_auto_reply(parsed) else "not a failure report"
    return FailureReport("none", frozenset(), note)


class MemberMatcher(Protocol):
    """What L{BounceScreen} needs of L{gsmail.verp.VerpPolicy}."""

    def match_member(self, route: Route, reported: Iterable[str]) -> Address | None:
        """The reported address the short address's tag was made for, or C{None}."""


Blocking = Callable[[Callable[[], FailureReport]], "Deferred[FailureReport]"]
"""Runs a function in a thread; its Deferred fires in the reactor thread with the result."""


class _Burst:
    """Log the first of a burst of similar events; count the rest."""

    def __init__(self) -> None:
        self.since = float("-inf")
        self.suppressed = 0

    def admit(self, now: float) -> int | None:
        """The number suppressed since the last logged event, or C{None}: do not log."""
        if now - self.since < BURST:
            self.suppressed += 1
            return None
        count, self.since, self.suppressed = self.suppressed, now, 0
        return count


class BounceScreen:
    """
    Decides, after DATA, whether a message to a bounce address is recorded.

    @param verp: the site's L{gsmail.verp.VerpPolicy}, for short signed
        addresses; C{None} when there are no keys (short addresses are then
        L{BounceCheck.NO_KEY} already).
    @param clock: for the once-per-burst logs; C{None}: the wall clock.
    @param blocking: runs a function in a thread (the reactor's pool) and
        fires with its result: parsing a message takes up to ~90 ms for
        L{MAX_SCANNED} bytes of plain text (flufl.bounce's heuristics), too
        long for the reactor thread. C{None}: in the calling thread (tests,
        C{smtp2gs}).
    """

    def __init__(
        self,
        verp: MemberMatcher | None = None,
        clock: IReactorTime | None = None,
        blocking: Blocking | None = None,
    ) -> None:
        self.verp = verp
        self.clock = clock
        self.blocking = blocking
        self._bursts: dict[str, _Burst] = {}

    def _now(self) -> float:
        if self.clock is not None:
            return self.clock.seconds()
        import time

        return time.time()

    def _dropped(self, reason: str, route: Route, detail: str = "") -> None:
        burst = self._bursts.setdefault(reason, _Burst())
        earlier = burst.admit(self._now())
        if earlier is None:
            return
        emit = log.warn if reason == BounceCheck.BAD_TAG.value else log.info
        emit(
            "Bounce to {recipient} not recorded: {reason}{detail}"
            " ({earlier} more like it in the last minute not logged)",
            recipient=str(route.recipient),
            reason=reason,
            detail=f" ({detail})" if detail else "",
            earlier=earlier,
            bounce_check=route.bounce_check.value,
        )

    def check(self, route: Route, source: MessageSource) -> Deferred[Reply | Address]:
        """
        The member whose bounce C{source} reports, or the reply that says it
        is not recorded. The address is judged at once; the message (read
        and parsed, L{classify}) in C{blocking}'s thread when there is one.

        @return: (a Deferred of) the member's L{Address}; or C{250 2.0.0}
            L{status.BOUNCE_NOT_OURS} (the address); C{250 2.0.0}
            L{status.BOUNCE_NOT_FAILURE} (the message); C{451 4.3.5} the key
            file cannot be read (signed address through C{smtp2gs}). Fails
            with C{OSError} when the spool file cannot be read (C{451 4.3.0}).
        """
        check = route.bounce_check
        if check is BounceCheck.NO_KEY:
            return succeed(
                status.CONFIG_ERROR.with_text(
                    "Cannot read the VERP key file (verp_key_file); try again later"
                )
            )
        if not check.recordable:
            self._dropped(check.value, route)
            return succeed(status.BOUNCE_NOT_OURS)

        def work() -> FailureReport:
            return classify(read_head(source))

        read = self.blocking(work) if self.blocking is not None else maybeDeferred(work)
        return read.addCallback(lambda report: self._decide(route, report))

    def _decide(self, route: Route, report: FailureReport) -> Reply | Address:
        if route.bounce_check is BounceCheck.SIGNED_SHORT:
            member = None
            if self.verp is not None and report.failed:
                member = self.verp.match_member(route, sorted(report.failed))
            if member is None:
                if report.failed:
                    # A tag for none of the addresses it reports: forged
                    # (or the member's mail was forwarded; harmless to drop).
                    self._dropped(BounceCheck.BAD_TAG.value, route, "no reported address")
                    return status.BOUNCE_NOT_OURS
                self._dropped("not a failure report", route, report.note)
                return status.BOUNCE_NOT_FAILURE
            return member
        member_address = route.member_address
        assert member_address is not None
        if str(member_address).lower() in report.failed:
            return member_address
        note = report.note or f"reports other recipients ({len(report.failed)})"
        self._dropped("not a failure report", route, note)
        return status.BOUNCE_NOT_FAILURE
