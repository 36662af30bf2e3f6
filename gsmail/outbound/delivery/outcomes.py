# -*- test-case-name: tests.outbound.test_delivery -*-
"""
The outbound delivery's bookkeeping of outcomes: each recipient's reply
recorded (delivered, failed, expired, or pending with its next attempt),
its Postfix-style log line, the queue record made durable and the message
removed when done, and the RFC 3464 DSNs its C{NOTIFY} asks for, delay
warnings included.

Which notices go out, as Postfix does (RFC 3461 §4.1, §6.2):
  - C{failed}: when C{NOTIFY} has C{FAILURE} or is absent; never for
    C{NEVER}, never to the null sender;
  - C{delayed}: once per message, when it is C{delay_warning_time} old and
    recipients whose C{NOTIFY} has C{DELAY} (or is absent) are still
    pending; an absent C{NOTIFY} on mail with a VERP sender per recipient
    means C{FAILURE} only (L{gsmail.outbound.dsn.VERP_DEFAULT_NOTIFY});
  - C{delivered} / C{relayed}: only for C{NOTIFY=SUCCESS}, when the
    recipient was delivered into this site's groups, or accepted by a next
    hop that does not offer DSN (one that does was given C{NOTIFY} and
    reports itself).

Not here: building a DSN (L{gsmail.outbound.dsn}), the queue's files
(L{gsmail.outbound.queue}), getting the replies
(L{gsmail.outbound.delivery.session}).
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gsmail import maillog, status
from gsmail.outbound import backoff, dsn
from gsmail.outbound.delivery.session import _Job
from gsmail.outbound.queue import (
    DELIVERED,
    EXPIRED,
    FAILED,
    PENDING,
    Envelope,
    NoSuchMessageError,
    RecipientState,
)
from gsmail.status import Reply

if TYPE_CHECKING:
    from collections.abc import Callable

    from gsmail.outbound.queue import OutboundQueue

#: The delivery's log namespace, as before the split (log lines unchanged).
log = Logger(namespace="gsmail.outbound.delivery")

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")


@functools.lru_cache(maxsize=64)
def _reply_line(reply: Reply) -> str:
    """A recipient's C{last_reply} for C{reply}, e.g. C{"250 2.0.0 Ok"} (the same for many)."""
    return f"{reply.code} {reply.status_line()}"


def _parse_reply(line: str) -> Reply | None:
    """
    A recipient's C{last_reply} (C{"451 4.3.0 Try later"}) as a L{Reply},
    for the status of a delay warning; C{None} when there is none.
    """
    code, _, rest = line.partition(" ")
    if len(code) != 3 or not code.isdigit():
        return None
    enhanced, _, text = rest.partition(" ")
    if not _ENHANCED.match(enhanced):
        enhanced, text = "", rest
    return Reply(int(code), enhanced, text)


def _envelope_id(envelope: Envelope) -> str:
    """
    The C{ENVID} of C{envelope}, decoded from xtext for
    C{Original-Envelope-Id} (RFC 3464 §2.2.1); C{""} when there is none. One
    kept by an older version without the check is shown as received.
    """
    envid = envelope.params.get("ENVID", "")
    try:
        return dsn.xtext_decode(envid)
    except ValueError:
        return envid


def _log_delivery(
    envelope: Envelope, r: RecipientState, relay: str, reply: Reply, started: float, now: float
) -> None:
    """
    One recipient's outcome as Postfix's smtp(8) line (L{gsmail.maillog.delivery}):
    C{delay=} counts from the message's arrival in the queue, C{delays=a/b}
    splits it into the time before this attempt and the attempt itself
    (connection, TLS, the transaction).
    """
    arrived = envelope.created
    maillog.delivery(
        envelope.id,
        r.address,
        relay or "none",
        max(0.0, now - arrived),
        f"{maillog.format_delay(max(0.0, started - arrived))}/"
        f"{maillog.format_delay(max(0.0, now - started))}",
        reply.enhanced,
        maillog.delivery_status(reply.code, expired=r.state == EXPIRED),
        r.last_reply if reply.is_success else _reply_line(reply),
        "outbound",
        log=log,
        attempts=r.attempts,
        state=r.state,
    )


class _Outcomes:
    """
    Recording outcomes and sending notices: a part of
    L{gsmail.outbound.delivery.OutboundDelivery} (a mixin), which sets the
    attributes and defines the methods declared here.
    """

    if TYPE_CHECKING:
        queue: OutboundQueue
        reactor: Any
        hostname: str
        lifetime: float
        delay_warning_time: float
        delivered: int
        _random: Callable[[], float] | None
        _in_flight: set[tuple[str, str]]
        _removing: set[str]
        _waiting: set[str]

        def kick(self) -> None: ...
        def _wake_at(self, queue_id: str, when: float) -> None: ...
        def _forget(self, queue_id: str) -> None: ...
        def _schedule(self) -> None: ...
        def _check_idle(self) -> None: ...
        def _verp_sender(self, sender: str, recipient: str) -> str: ...

    async def _record(
        self,
        job: _Job,
        replies: dict[str, Reply],
        remote: str,
        *,
        next_hop_reports: bool = False,
        final: bool = False,
    ) -> None:
        """
        Record the outcome of C{job}'s recipients and send the notices
        their C{NOTIFY} asks for.

        @param next_hop_reports: the next hop offers DSN, so it was given
            the DSN parameters and a success is not reported here.
        @param final: delivered into this site's groups (C{Action:
            delivered}) rather than relayed (C{Action: relayed}).
        """
        envelope = job.envelope
        now = self.reactor.seconds()
        verp = envelope.xverp and bool(envelope.sender)
        notices: list[dsn.FailedRecipient] = []
        for r in job.recipients:
            self._in_flight.discard((envelope.id, r.address))
            reply = replies.get(r.address, status.LOCAL_ERROR)
            r.attempts += 1
            r.last_reply = _reply_line(reply)
            if reply.is_success:
                r.state = DELIVERED
                self.delivered += 1
                if r.notify and (final or not next_hop_reports) and "SUCCESS" in r.notify:
                    action = "delivered" if final else "relayed"
                    notices.append(self._notice(r, reply, remote, action))
            elif reply.is_permanent:
                r.state = FAILED
                if dsn.notify_requests(r.notify, "FAILURE", verp=verp):
                    notices.append(self._notice(r, reply, remote, "failed"))
            elif backoff.expired(envelope.created, now, self.lifetime):
                r.state = EXPIRED
                if dsn.notify_requests(r.notify, "FAILURE", verp=verp):
                    notices.append(self._notice(r, reply, remote, "failed"))
            else:
                r.state = PENDING
                if self._random is None:
                    delay = backoff.next_delay(r.attempts)
                else:
                    delay = backoff.next_delay(r.attempts, random=self._random)
                r.next_attempt = now + delay
                self._waiting.add(envelope.id)
                self._wake_at(envelope.id, r.next_attempt)
            _log_delivery(envelope, r, remote, reply, job.made or now, now)
        await self._finish(envelope, job.sender, notices, job.recipients)

    @staticmethod
    def _notice(
        r: RecipientState, reply: Reply | None, remote: str, action: str, **more: Any
    ) -> dsn.FailedRecipient:
        """One recipient's block of a DSN, with its C{ORCPT} (RFC 3461 §4.2)."""
        return dsn.FailedRecipient(
            r.address,
            reply,
            remote or None,
            action=action,
            original_recipient=r.orcpt or None,
            **more,
        )

    def _expire(self, envelope: Envelope, due: list[RecipientState]) -> None:
        verp = envelope.xverp and bool(envelope.sender)
        notices = []
        for r in due:
            r.state = EXPIRED
            reply = Reply(
                451, "4.4.7", f"Delivery time expired; last: {r.last_reply or 'no attempt'}"
            )
            now = self.reactor.seconds()
            _log_delivery(envelope, r, "none", reply, now, now)
            if dsn.notify_requests(r.notify, "FAILURE", verp=verp):
                notices.append(self._notice(r, reply, "", "failed"))
        sender = envelope.sender
        Deferred.fromCoroutine(self._finish(envelope, sender, notices, due)).addErrback(
            lambda f: log.failure("Expiring {queue_id} failed", f, queue_id=envelope.id)
        )

    # -- delay warnings ------------------------------------------------------
    def _delay_warning_at(self, envelope: Envelope) -> float | None:
        """
        When C{envelope}'s delay warning is due (seconds since the epoch), or
        C{None} when it gets none: warnings are off, it had one, its sender
        takes no DSN (the null sender), the queue lifetime ends first, or no
        pending recipient asks for one (C{NOTIFY} without C{DELAY}, or mail
        with VERP senders and no C{NOTIFY}).
        """
        if self.delay_warning_time <= 0 or envelope.delay_warned or not envelope.sender:
            return None
        if self.delay_warning_time >= self.lifetime:
            return None
        verp = envelope.xverp
        if not any(
            r.state == PENDING and dsn.notify_requests(r.notify, "DELAY", verp=verp)
            for r in envelope.recipients
        ):
            return None
        if not dsn.should_send_dsn(envelope.sender):
            return None
        return envelope.created + self.delay_warning_time

    def _warn_delayed(self, envelope: Envelope) -> None:
        """
        Queue the delay warning (RFC 3464 C{Action: delayed}, status 4.x.x
        from the last reply, C{Will-Retry-Until} the end of the queue
        lifetime) for the recipients of C{envelope} still pending that ask
        for one, and record that it was sent. Once per message: the flag is
        set first, so a failure to queue the warning is logged, not retried.
        """
        envelope.delay_warned = True
        verp = envelope.xverp
        until = envelope.created + self.lifetime
        notices = [
            self._notice(r, _parse_reply(r.last_reply), "", "delayed", will_retry_until=until)
            for r in envelope.recipients
            if r.state == PENDING and dsn.notify_requests(r.notify, "DELAY", verp=verp)
        ]
        log.info(
            "{queue_id}: delay warning for {count} recipients still pending",
            queue_id=envelope.id,
            count=len(notices),
        )
        Deferred.fromCoroutine(self._send_warning(envelope, notices)).addErrback(
            lambda f: log.failure("Delay warning for {queue_id} failed", f, queue_id=envelope.id)
        )

    async def _send_warning(self, envelope: Envelope, notices: list[dsn.FailedRecipient]) -> None:
        await self._send_dsn(envelope, envelope.sender, notices)
        try:
            # After the warning is queued: a crash between the two sends it
            # again (at least once), never not at all.
            await self.queue.update(envelope)
        except NoSuchMessageError:
            pass  # delivered or deleted meanwhile

    async def _finish(
        self,
        envelope: Envelope,
        sender: str,
        notices: list[dsn.FailedRecipient],
        recipients: list[RecipientState],
    ) -> None:
        """
        Send DSNs, make the states of C{recipients} durable, log them, and
        remove the message when it is done.
        """
        try:
            if notices:
                await self._send_dsn(envelope, sender, notices)
            # The records of every job that finishes meanwhile, of any
            # message, share one write (the queue's group commit).
            await self.queue.record(envelope, recipients)
            # Backwards: the pending recipients are at the end, mostly.
            done = not any(r.state == PENDING for r in reversed(envelope.recipients)) and not any(
                (envelope.id, r.address) in self._in_flight for r in envelope.recipients
            )
            if done and envelope.id not in self._removing and self.queue.get(envelope.id):
                self._removing.add(envelope.id)
                try:
                    await self.queue.remove(envelope.id)
                finally:
                    self._removing.discard(envelope.id)
                self._forget(envelope.id)
        except NoSuchMessageError:
            # Removed by a concurrent job, or deleted by the operator.
            self._forget(envelope.id)
        self._check_idle()
        self._schedule()

    async def _send_dsn(
        self, envelope: Envelope, sender: str, notices: list[dsn.FailedRecipient]
    ) -> None:
        """
        Queue DSNs (null sender) to C{sender}: with VERP, one per recipient
        to its own VERP address, so each bounce comes back to GroupServer's
        bounce page for that member; else one per kind (failures, delays,
        successes: separate reports, as Postfix sends them).
        """
        if envelope.xverp and envelope.sender:
            for notice in notices:
                verp = self._verp_sender(envelope.sender, notice.address)
                await self._send_one_dsn(envelope, verp, [notice])
            return
        kinds: dict[str, list[dsn.FailedRecipient]] = {}
        for notice in notices:
            kind = "success" if notice.action in ("delivered", "relayed") else notice.action
            kinds.setdefault(kind, []).append(notice)
        for group in kinds.values():
            await self._send_one_dsn(envelope, sender, group)

    async def _send_one_dsn(
        self, envelope: Envelope, sender: str, notices: list[dsn.FailedRecipient]
    ) -> None:
        if not dsn.should_send_dsn(sender):
            return
        message = dsn.build_dsn(
            reporting_mta=self.hostname,
            original_sender=sender,
            recipients=notices,
            original_path=self.queue.data_path(envelope.id),
            arrival=envelope.created,
            now=self.reactor.seconds(),
            return_content="full" if envelope.params.get("RET") == "FULL" else "headers",
            envelope_id=_envelope_id(envelope),
        )
        try:
            entry = await self.queue.enqueue("", [sender], message, sign=True)
        except Exception:
            log.failure("Could not queue a DSN for {queue_id}", queue_id=envelope.id)
            return
        maillog.dsn_queued(envelope.id, entry.id, notices[0].action, log=log)
        self.kick()
