# -*- test-case-name: tests.inbound.test_authresults -*-
"""
C{Authentication-Results} (RFC 8601) for mail from the internet: before a
message is posted, gsmail checks SPF (RFC 7208: the envelope sender, or the
HELO name for the null sender, against the client's IP address; pyspf), the
message's DKIM signatures (RFC 6376; dkimpy), an ARC chain if it has one
(RFC 8617; dkimpy) and the C{From} domain's DMARC policy (RFC 7489), and
puts one field naming gsmail's host at the top of the message::

    Authentication-Results: mx.groups.example.com;
    \tspf=pass smtp.mailfrom=example.org;
    \tdkim=pass header.d=example.org header.s=sel header.b=AbCdEfGh;
    \tdmarc=pass (p=reject) header.from=example.org

Fields already in the message that claim to come from gsmail's host are
forgeries (RFC 8601 §5): they are removed, whatever else happens.

The libraries do their DNS work blocking, so the checks run in a thread
(L{AuthChecker}'s C{blocking}, the reactor's pool), each lookup through
one dnspython resolver (C{dns_servers}, else C{/etc/resolv.conf}) and
bounded by what is left of the message's time budget (C{auth_check_time}).
A DNS failure or timeout is C{temperror}; a check not finished when the
budget is spent is C{temperror} too, and the message is posted anyway. The
checks never refuse, delay beyond the budget or fail a delivery.

This module runs the checks of one message (L{authenticate}) and schedules
them off the reactor thread within the budget (L{AuthChecker}: threads,
concurrency, reading the spooled message). Not here: the checks themselves
and their DNS (L{gsmail.inbound.authresults.checks}); the field, what it reports
and the forged fields (L{gsmail.inbound.authresults.field}).
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
import dns.resolver
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gsmail.inbound.authresults.checks import (
    DNS,
    MAX_SIGNATURES,
    TempDNSError,
    check_arc,
    check_dkim,
    check_dmarc,
    check_spf,
    from_domain,
)
from gsmail.inbound.authresults.field import (
    Checks,
    DKIMResult,
    forged_fields,
    format_field,
    header_fields,
    remove_fields,
)
from gsmail.inbound.protocol import Envelope, Session
from gsmail.inbound.spool import SpooledMessage

__all__ = [
    "AuthChecker",
    "AuthOutcome",
    "authenticate",
    "read_header",
]

log = Logger()

#: Messages larger than this (bytes) are not read whole for DKIM: their
#: signatures are C{neutral} (dkimpy needs the whole message in memory).
MAX_VERIFIED: Final = 32 * 1024 * 1024
#: The header section read for the forgery scan and the C{From} field.
MAX_HEADER: Final = 1024 * 1024
#: Checks running at once; the rest wait (their wait counts against the budget).
CONCURRENCY: Final = 8
#: Client addresses whose check decision is kept (L{AuthChecker.client_ip});
#: the memory is emptied when full.
_IP_CACHE_SIZE: Final = 4096
#: Seconds the reactor waits past the budget for the thread's own deadline.
_GRACE: Final = 0.5

Blocking = Callable[[Callable[[], Any]], "Deferred[Any]"]
"""Runs a function in a thread; its Deferred fires in the reactor thread with the result."""


# -- one message ---------------------------------------------------------------------------


def authenticate(
    checks: Checks,
    *,
    header: bytes,
    message: bytes | None,
    ip: str,
    mail_from: str,
    helo: str,
    resolver: DNS,
) -> None:
    """
    Run the checks of one message, filling in C{checks} as each is done
    (blocking: DNS; run it in a thread).

    @param header: the message's header section.
    @param message: the whole message, or C{None} when it is too large to
        verify (its signatures are then C{neutral}).
    """
    checks.smtp_mailfrom = mail_from.rpartition("@")[2].lower() if mail_from else ""
    checks.smtp_helo = helo
    result, reason = check_spf(ip, mail_from, helo, resolver)
    checks.spf_reason = reason
    checks.spf = result
    if message is None:
        count = sum(1 for n, _ in header_fields(header) if n.lower() == b"dkim-signature")
        checks.dkim = [DKIMResult("neutral", reason="message too large to verify")] * min(
            count, MAX_SIGNATURES
        )
    else:
        checks.dkim = check_dkim(message, resolver)
        if any(n.lower() == b"arc-seal" for n, _ in header_fields(header)):
            checks.arc = check_arc(message, resolver)
    domain = from_domain(header)
    if domain is None:
        checks.dmarc = "permerror"
    else:
        checks.header_from = domain
        try:
            checks.dmarc, checks.dmarc_policy = check_dmarc(domain, checks, resolver)
        except TempDNSError:
            checks.dmarc = "temperror"
    checks.done = True


def read_header(message: SpooledMessage) -> bytes:
    """
    The header section of a spooled message (LF line ends), through its
    empty line, at most L{MAX_HEADER} bytes (blocking).
    """
    if message.data is not None:
        head = message.data[:MAX_HEADER]
    else:
        with open(message.path, "rb") as f:
            head = f.read(min(message.size, MAX_HEADER))
    end = head.find(b"\n\n")
    if head.startswith(b"\n"):
        return b""
    return head if end < 0 else head[: end + 2]


# -- the reactor side ------------------------------------------------------------------------


@attrs.frozen
class AuthOutcome:
    """
    What to post: the field to add, and the message (a copy without forged
    fields when there were any: L{extra_file} is then its file, to remove
    once delivered).
    """

    field: bytes
    message: SpooledMessage
    extra_file: str | None = None
    forged: int = 0


@attrs.frozen
class _Prepared:
    header: bytes
    whole: bytes | None
    message: SpooledMessage
    extra_file: str | None
    forged: int


class AuthChecker:
    """
    Runs the checks of one message at a time per call, off the reactor
    thread, within C{budget} seconds, and never fails.

    @param authserv_id: gsmail's host name (C{hostname}), the field's
        authserv-id and what forged fields claim.
    @param resolver: the DNS of the checks
        (L{gsmail.inbound.authresults.checks.make_resolver}).
    @param blocking: runs a function in a thread (the reactor's pool).
    @param budget: seconds the checks of one message may take (DNS
        included, waiting for a thread included).
    @param exceptions: client networks whose mail is not checked.
    """

    def __init__(
        self,
        *,
        authserv_id: str,
        resolver: dns.resolver.Resolver,
        clock: IReactorTime,
        blocking: Blocking,
        budget: float = 5.0,
        exceptions: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        concurrency: int = CONCURRENCY,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.authserv_id = authserv_id
        self.resolver = resolver
        self.clock = clock
        self.blocking = blocking
        self.budget = budget
        self.exceptions = tuple(exceptions)
        self._limit = DeferredSemaphore(concurrency)
        self._now = now
        # Peer text -> the checked IP or None: parsing an address and
        # matching the exceptions cost more than the rest of the call.
        self._ips: dict[str, str | None] = {}

    def client_ip(self, session: Session) -> str | None:
        """
        The client's IP address when its mail is checked: an ESMTP session
        from an IP address outside the exceptions; else C{None} (LMTP: the
        MTA in front checks; local deliveries; exempt clients).
        """
        if session.protocol_name != "ESMTP":
            return None
        peer = session.peer
        try:
            return self._ips[peer]
        except KeyError:
            pass
        if len(self._ips) >= _IP_CACHE_SIZE:
            self._ips.clear()
        found = self._ips[peer] = self._checked_ip(peer)
        return found

    def _checked_ip(self, peer: str) -> str | None:
        """L{client_ip} for an ESMTP session's peer text (C{[192.0.2.1]})."""
        if not peer.startswith("["):
            return None
        try:
            ip = ipaddress.ip_address(peer.strip("[]").removeprefix("IPv6:"))
        except ValueError:
            return None
        if any(ip in network for network in self.exceptions):
            return None
        return str(ip)

    def check(
        self, session: Session, envelope: Envelope, message: SpooledMessage
    ) -> Deferred[AuthOutcome] | None:
        """
        Check C{message}; C{None} when this session's mail is not checked.

        @return: fires with the L{AuthOutcome} within about C{budget}
            seconds once the message's file has been read (the forged
            fields are removed whatever the time); never fails.
        """
        ip = self.client_ip(session)
        if ip is None:
            return None
        return Deferred.fromCoroutine(self._check(ip, session, envelope, message))

    async def _check(
        self, ip: str, session: Session, envelope: Envelope, message: SpooledMessage
    ) -> AuthOutcome:
        try:
            prepared: _Prepared = await self.blocking(lambda: self._prepare(message))
        except Exception:
            log.failure("Reading a message for its authentication checks failed")
            checks = Checks(done=True, spf="temperror", dmarc="temperror")
            return AuthOutcome(format_field(self.authserv_id, checks), message)
        if prepared.forged:
            log.warn(
                "Removed {count} Authentication-Results fields claiming to be from {host}"
                " (forged) in mail from {peer}",
                count=prepared.forged,
                host=self.authserv_id,
                peer=session.peer,
                session=session.id,
            )
        sender = str(envelope.sender) if envelope.sender else ""
        checks = Checks(
            smtp_mailfrom=sender.rpartition("@")[2].lower() if sender else "",
            smtp_helo=session.helo or "",
        )
        deadline = self._now() + self.budget
        resolver = DNS(self.resolver, deadline, self._now)

        def run() -> None:
            authenticate(
                checks,
                header=prepared.header,
                message=prepared.whole,
                ip=ip,
                mail_from=sender,
                helo=session.helo or "",
                resolver=resolver,
            )

        work = self._limit.run(self.blocking, run)
        work.addTimeout(self.budget + _GRACE, self.clock)
        try:
            await work
        except Exception as e:
            if not checks.done:
                log.info(
                    "Authentication checks of mail from {peer} not finished in {budget:g} s"
                    " ({error}): temperror",
                    peer=session.peer,
                    budget=self.budget,
                    error=e.__class__.__name__,
                    session=session.id,
                )
        return AuthOutcome(
            format_field(self.authserv_id, checks),
            prepared.message,
            prepared.extra_file,
            prepared.forged,
        )

    def _prepare(self, message: SpooledMessage) -> _Prepared:
        """
        Read the message (in a thread): its header, the whole of it when it
        is small enough to verify, and a copy without forged fields if it
        has any.
        """
        header = read_header(message)
        spans = forged_fields(header, self.authserv_id)
        whole: bytes | None = None
        if message.size <= MAX_VERIFIED:
            if message.data is not None:
                whole = message.data
            else:
                with open(message.path, "rb") as f:
                    whole = f.read(message.size)
        if not spans:
            return _Prepared(header, whole, message, None, 0)
        cleaned_header = remove_fields(header, spans)
        path = message.path + ".ar"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(cleaned_header)
                if message.data is not None:
                    out.write(message.data[len(header) :])
                else:
                    with open(message.path, "rb") as f:
                        f.seek(len(header))
                        left = message.size - len(header)
                        while left > 0:
                            chunk = f.read(min(left, 1 << 20))
                            if not chunk:
                                break
                            out.write(chunk)
                            left -= len(chunk)
        except BaseException:
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        size = message.size - (len(header) - len(cleaned_header))
        data = None
        if message.data is not None:
            data = cleaned_header + message.data[len(header) :]
        copy = attrs.evolve(message, path=path, size=size, data=data, files=None)
        return _Prepared(header, whole, copy, path, len(spans))
