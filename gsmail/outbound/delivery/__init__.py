# -*- test-case-name: tests.outbound.test_delivery -*-
"""
Outbound delivery (Postfix's queue manager and smtp client, in one): takes
the due recipients of the outbound queue, groups them into transactions
(one per recipient with VERP, else batches), opens a bounded number of
connections per destination (a smarthost, or each domain's MX hosts in
order), records each recipient's outcome durably, retries transient
failures with backoff until the queue lifetime ends, and sends the RFC 3464
DSNs a submitter asked for with RFC 3461's C{NOTIFY} (by default: failures,
and one delay warning per message after C{delay_warning_time}), passing
C{NOTIFY}, C{ORCPT}, C{ENVID} and C{RET} on to a next hop that offers DSN.

This module schedules: which recipients are due (a heap of wake-up times,
no queue scans), the jobs made of them, DKIM signing that waits for a key,
the bounded connections per destination and those kept open for more mail.
The other parts of L{OutboundDelivery} (mixins): the conversation with a
destination (L{gsmail.outbound.delivery.session}), the outcomes and the
notices that go out (L{gsmail.outbound.delivery.outcomes}), TLS and MTA-STS
decisions (L{gsmail.outbound.delivery.tls}).

At-least-once window: a recipient is marked delivered only after the remote
server's 2xx reply has been recorded in the queue (fsynced). A crash between
that reply and the record, or a connection lost after the final dot and
before the reply, leaves the recipient pending: it is sent again, which may
deliver it twice. SMTP gives no way to close that window; it is as wide as
one reply plus one fsync.
"""

from __future__ import annotations

import functools
import heapq
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.logger import Logger

from gsmail.addresses import MAX_LOCAL_PART, Address, AddressError, encode_xverp, parse_mailbox
from gsmail.outbound import backoff
from gsmail.outbound.client import Timeouts
from gsmail.outbound.delivery.outcomes import _Outcomes
from gsmail.outbound.delivery.session import _Job, _Sessions
from gsmail.outbound.delivery.tls import MX_TLS, SMARTHOST_TLS, TLSPolicy, _MTASTSDecisions
from gsmail.outbound.mtasts import MTASTS
from gsmail.outbound.mx import MXResolver, RelayHost
from gsmail.outbound.queue import (
    PENDING,
    Envelope,
    NoSuchMessageError,
    OutboundQueue,
    RecipientState,
)
from gsmail.outbound.tlsrpt import TLSReportCounts
from gsmail.status import Reply
from gsmail.verp import VerpPolicy

# MX_TLS and SMARTHOST_TLS are defined beside TLSPolicy and exported here,
# where callers have always found them.
__all__ = ["MX_TLS", "SMARTHOST_TLS", "TLSPolicy", "OutboundDelivery", "LocalDelivery"]

log = Logger()

#: Recipients per transaction without VERP (gs.email sent 50).
BATCH_SIZE = 50
#: Small messages kept in memory while they are delivered (oldest dropped).
_MESSAGES_KEPT = 16
#: Seconds a connection with nothing left to send stays open for more mail
#: to its destination (Postfix's C{smtp_connection_cache_time_limit} is 2 s):
#: a post submitted in batches of 50 goes out over the same connections
#: instead of new ones (connect, greeting, EHLO, QUIT) for every batch.
CONNECTION_CACHE_TIME = 2.0
#: Seconds between tries to DKIM-sign messages whose key could not be used
#: (L{OutboundQueue.resign}), and between log lines saying it still fails.
SIGN_RETRY = 60.0
SIGN_FAILURE_LOG_INTERVAL = 900.0

LocalDelivery = Callable[[str, str, str], Deferred[Reply]]
"""Delivers (sender, recipient, message path) to this site's own inbound side."""


@functools.lru_cache(maxsize=64)
def _parsed(address: str) -> Address:
    """
    C{parse_mailbox}, remembered for the few senders of VERP mail (one
    group's address for each of its members; L{Address} is immutable).

    @raise AddressError: it does not parse (not remembered).
    """
    return parse_mailbox(address)


class OutboundDelivery(_Sessions, _Outcomes, _MTASTSDecisions):
    """
    Delivers what the L{OutboundQueue} holds.

    @param relayhost: the smarthost, or C{None} to deliver by MX.
    @param local_domains: domains this site receives for: their recipients
        (DSNs to VERP addresses, mostly) go to C{local_delivery} instead.
    @param max_connections: connections open at once, in total.
    @param max_per_destination: connections open at once to one destination.
    @param lifetime: seconds a message may stay queued before its pending
        recipients expire (default 5 days, as Postfix).
    @param random: for the backoff jitter (tests make it fixed).
    @param pass_xverp: with a smarthost, send VERP mail in batches with the
        XVERP parameter and let the smarthost make the per-recipient senders
        (as GroupServer did with Postfix); a smarthost that does not offer
        XVERP gets one transaction per recipient anyway.
    @param verp: makes the signed VERP senders (L{gsmail.verp}); C{None}:
        the unsigned XVERP form, as Postfix makes it.
    @param trace: log every SMTP command and reply (debug level); off by
        default, since the trace costs more than the delivery.
    @param delay_warning_time: seconds after its arrival at which a message
        with recipients still pending gets one delay warning (RFC 3464
        C{Action: delayed}), as Postfix's C{delay_warning_time}; 0: never.
    @param mta_sts: the MTA-STS policies (RFC 8461) of recipient domains,
        applied to MX delivery (never to a smarthost): in C{enforce} mode
        mail goes only to the MX hosts the policy lists, over STARTTLS with
        a certificate verified for the MX name; an unlisted host, no
        STARTTLS or a certificate that fails is a transient failure
        (C{451 4.7.5}, C{4.7.4}) for that host and the next is tried, never
        plaintext. In C{testing} mode delivery is as without a policy, and
        each failure is logged once. C{None}: off.
    @param tls_report: counts sessions under MTA-STS policies for TLS
        reports (RFC 8460); C{None}: no counts.
    @param connection_cache_time: seconds a connection with no more jobs
        waits for new ones to its destination before it says QUIT (0: at
        once). A waiting connection gives way at once to another
        destination that needs its slot of C{max_connections}, and is
        closed by L{when_idle} and L{stop}.

    Each recipient's outcome is one event, Postfix's smtp(8) line
    (L{gsmail.maillog.delivery}: C{ID: to=<rcpt>, relay=host, delay=S,
    delays=a/b, dsn=X.Y.Z, status=sent|deferred|bounced|expired (reply)}),
    with those values as fields (C{gsmail_event} C{"delivery"}, C{listener}
    C{"outbound"}); a DSN queued is a C{"dsn"} event.
    """

    def __init__(
        self,
        *,
        queue: OutboundQueue,
        reactor: Any,
        hostname: str,
        relayhost: RelayHost | None = None,
        mx: MXResolver | None = None,
        smarthost_tls: TLSPolicy = SMARTHOST_TLS,
        mx_tls: TLSPolicy = MX_TLS,
        auth: tuple[str, str] | None = None,
        batch_size: int = BATCH_SIZE,
        max_connections: int = 100,
        max_per_destination: int = 20,
        lifetime: float = backoff.LIFETIME,
        timeouts: Timeouts | None = None,
        local_domains: tuple[str, ...] = (),
        local_delivery: LocalDelivery | None = None,
        endpoint_factory: Callable[[str, int], IStreamClientEndpoint] | None = None,
        random: Callable[[], float] | None = None,
        mx_port: int = 25,
        pass_xverp: bool = False,
        trace: bool = False,
        connection_cache_time: float = CONNECTION_CACHE_TIME,
        delay_warning_time: float = backoff.DELAY_WARNING_AFTER,
        verp: VerpPolicy | None = None,
        mta_sts: MTASTS | None = None,
        tls_report: TLSReportCounts | None = None,
    ) -> None:
        if relayhost is None and mx is None:
            raise ValueError("either a relayhost or an MX resolver is needed")
        self.queue = queue
        self.reactor = reactor
        self.hostname = hostname
        self.relayhost = relayhost
        self.mx = mx
        self.smarthost_tls = smarthost_tls
        self.mx_tls = mx_tls
        self.auth = auth
        self.batch_size = batch_size
        self.lifetime = lifetime
        self.timeouts = timeouts or Timeouts(connect=30.0)
        self.local_domains = local_domains
        self.local_delivery = local_delivery
        self._endpoint_factory = endpoint_factory or (
            lambda host, port: HostnameEndpoint(reactor, host, port, timeout=self.timeouts.connect)
        )
        self._random = random
        self.mx_port = mx_port
        self.pass_xverp = pass_xverp
        self.verp = verp
        self.trace = trace
        self.connection_cache_time = connection_cache_time
        self.delay_warning_time = delay_warning_time
        self.mta_sts = mta_sts
        self.tls_report = tls_report
        self._connections = DeferredSemaphore(max_connections)
        self._per_destination = max_per_destination
        self._jobs: dict[str, deque[_Job]] = defaultdict(deque)
        self._workers: dict[str, int] = defaultdict(int)
        # Workers whose connection waits for more jobs (L{_park}), per
        # destination: what wakes each (True: jobs came) and its time limit.
        self._parked: dict[str, list[tuple[Deferred[bool], IDelayedCall]]] = {}
        self._in_flight: set[tuple[str, str]] = set()
        self._removing: set[str] = set()
        self._timer: IDelayedCall | None = None
        self._running = False
        self._idle: list[Deferred[None]] = []
        # Scheduling without scanning the queue: the messages that may have
        # pending recipients not in flight (a superset), one wake-up time per
        # message in _next_at, and a heap of them (stale entries skipped).
        self._waiting: set[str] = set()
        self._next_at: dict[str, float] = {}
        self._wakeups: list[tuple[float, str]] = []
        self._kicked = False
        self._messages: dict[str, bytes] = {}
        # Per message being delivered: its data path and MAIL parameters
        # (without and with XVERP), for L{_transaction}.
        self._made: dict[str, tuple[str, dict[str, str | None], dict[str, str | None]]] = {}
        # DKIM signing that waits for a key (Envelope.sign_pending): the
        # messages being signed now, when to try again, and the last failure
        # logged (reason, time), so a broken key is one line, not one per message.
        self._signing: set[str] = set()
        self._sign_retry_at = 0.0
        self._sign_failure: tuple[str, float] | None = None
        queue.watch(self._queued)
        #: Counters for tests and metrics.
        self.transactions = 0
        self.delivered = 0

    # -- scheduling ---------------------------------------------------------
    def start(self) -> None:
        """Start delivering (call after the queue is loaded)."""
        self._running = True
        for envelope in self.queue.envelopes():
            self._waiting.add(envelope.id)
        self.kick()

    def stop(self) -> Deferred[None]:
        """
        Stop scheduling; fires when running transactions are over and every
        connection is closed.
        """
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return self.when_idle()

    def when_idle(self) -> Deferred[None]:
        """
        Fires when no transaction is running and no connection is open:
        connections waiting for more mail (C{connection_cache_time}) are
        closed now, with QUIT.
        """
        if not self._in_flight and not any(self._workers.values()):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        self._check_idle()
        return d

    def kick(self) -> None:
        """
        Look for due recipients now (after an enqueue, a release or a flush,
        or at the timer): every message that may have pending recipients not
        being delivered is looked at, in the next reactor turn.
        """
        if not self._running:
            return
        self._kicked = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.reactor.callLater(0, self._run)

    def _queued(self, envelope: Envelope) -> None:
        """The queue took a new message: it is looked at by the next kick."""
        self._waiting.add(envelope.id)

    def _wake_at(self, queue_id: str, when: float) -> None:
        """Look at message C{queue_id} again at C{when} (seconds since the epoch)."""
        current = self._next_at.get(queue_id)
        if current is None or when < current:
            self._next_at[queue_id] = when
            heapq.heappush(self._wakeups, (when, queue_id))

    def _forget(self, queue_id: str) -> None:
        self._waiting.discard(queue_id)
        self._next_at.pop(queue_id, None)
        self._messages.pop(queue_id, None)
        self._made.pop(queue_id, None)

    def _schedule(self) -> None:
        if not self._running:
            return
        wakeups = self._wakeups
        while wakeups and self._next_at.get(wakeups[0][1]) != wakeups[0][0]:
            heapq.heappop(wakeups)  # stale: superseded or forgotten
        wake = self.reactor.seconds() if self._kicked else wakeups[0][0] if wakeups else None
        timer = self._timer
        if timer is not None and timer.active():
            if wake is not None and timer.getTime() <= wake:
                return  # fires early enough (an early run just finds nothing)
            timer.cancel()
        self._timer = None
        if wake is not None:
            delay = max(0.0, wake - self.reactor.seconds())
            self._timer = self.reactor.callLater(delay, self._run)

    def _run(self) -> None:
        self._timer = None
        now = self.reactor.seconds()
        candidates: dict[str, None] = {}
        if self._kicked:
            self._kicked = False
            candidates = dict.fromkeys(self._waiting)
        wakeups = self._wakeups
        while wakeups and wakeups[0][0] <= now:
            when, queue_id = heapq.heappop(wakeups)
            if self._next_at.get(queue_id) == when:
                del self._next_at[queue_id]
                candidates[queue_id] = None
        envelopes = []
        for queue_id in candidates:
            envelope = self.queue.get(queue_id)
            if envelope is None:
                self._forget(queue_id)  # deleted by the operator
            else:
                envelopes.append(envelope)
        envelopes.sort(key=lambda e: (e.created, e.id))
        for envelope in envelopes:
            self._look(envelope, now)
        self._wake_parked()
        self._schedule()

    def _look(self, envelope: Envelope, now: float) -> None:
        """
        Start delivering the due recipients of C{envelope} (or expire them)
        and note when the next of the others is due. Ignores recipients
        being delivered right now: waking for them would be a busy loop
        until their server answers.
        """
        if envelope.held:
            return  # stays waiting: a release kicks
        if envelope.sign_pending and not backoff.expired(envelope.created, now, self.lifetime):
            self._sign_later(envelope, now)
            return
        in_flight = self._in_flight
        due: list[RecipientState] = []
        later: float | None = None
        for r in envelope.recipients:
            if r.state == PENDING and (envelope.id, r.address) not in in_flight:
                if r.next_attempt <= now:
                    due.append(r)
                elif later is None or r.next_attempt < later:
                    later = r.next_attempt
        warn_at = self._delay_warning_at(envelope)
        if warn_at is not None and warn_at > now and (later is None or warn_at < later):
            later = warn_at
        if later is None:
            self._waiting.discard(envelope.id)
        else:
            self._waiting.add(envelope.id)
            self._wake_at(envelope.id, later)
        expired = backoff.expired(envelope.created, now, self.lifetime)
        if warn_at is not None and warn_at <= now and not expired:
            self._warn_delayed(envelope)
        if not due:
            return
        if expired:
            self._expire(envelope, due)
            return
        for job in self._jobs_for(envelope, due):
            job.made = now
            self._submit(job)

    def _sign_later(self, envelope: Envelope, now: float) -> None:
        """
        A message queued unsigned because its DKIM key could not be used:
        try to sign it (L{OutboundQueue.resign}) now, or at the next try
        after a failure; it is delivered only once signed (or expires).
        """
        self._waiting.add(envelope.id)
        if envelope.id in self._signing:
            return
        if now < self._sign_retry_at:
            self._wake_at(envelope.id, self._sign_retry_at)
            return
        self._signing.add(envelope.id)
        Deferred.fromCoroutine(self._resign(envelope)).addErrback(
            lambda f: log.failure("Signing {queue_id} failed", f, queue_id=envelope.id)
        )

    async def _resign(self, envelope: Envelope) -> None:
        try:
            await self.queue.resign(envelope)
        except NoSuchMessageError:
            return  # deleted meanwhile
        except Exception as e:
            now = self.reactor.seconds()
            reason = str(e) or e.__class__.__name__
            self._sign_retry_at = now + SIGN_RETRY
            last = self._sign_failure
            if last is None or last[0] != reason or now >= last[1] + SIGN_FAILURE_LOG_INTERVAL:
                self._sign_failure = (reason, now)
                log.error(
                    "DKIM signing fails: {reason}; messages waiting unsent: {count}"
                    " (tried again every {retry:g} s)",
                    reason=reason,
                    count=sum(1 for e in self.queue.envelopes() if e.sign_pending),
                    retry=SIGN_RETRY,
                )
            for r in envelope.pending():
                # For gsmail-queue list and, should it expire, the DSN.
                r.last_reply = f"451 4.7.0 Not sent: it cannot be DKIM-signed ({reason})"
            self._wake_at(envelope.id, self._sign_retry_at)
            self._schedule()
            return
        finally:
            self._signing.discard(envelope.id)
        self._sign_failure = None
        self.kick()

    def _jobs_for(self, envelope: Envelope, due: list[RecipientState]) -> list[_Job]:
        """
        One job per recipient with VERP (its own envelope sender); else
        batches per destination. With C{pass_xverp} and a smarthost, VERP
        mail goes in batches with the XVERP parameter instead.
        """
        verp = envelope.xverp and bool(envelope.sender)
        if verp and not (self.pass_xverp and self.relayhost is not None):
            return [self._verp_job(envelope, r) for r in due]
        by_destination: dict[str, list[RecipientState]] = defaultdict(list)
        for r in due:
            by_destination[self._destination(r.address)].append(r)
        jobs = []
        for destination, group in by_destination.items():
            if verp and destination == "local:":
                jobs += [self._verp_job(envelope, r) for r in group]
                continue
            for i in range(0, len(group), self.batch_size):
                jobs.append(_Job(envelope, group[i : i + self.batch_size], envelope.sender, verp))
        return jobs

    def _verp_address(self, group: Address, member: Address) -> Address:
        """
        The signed VERP sender (L{gsmail.verp.VerpPolicy.sender}) of a group
        of this site's; the unsigned XVERP form without keys, or for another
        site's list (its bounces do not come here).
        """
        if self.verp is None or group.domain not in self.local_domains:
            return encode_xverp(group, member)
        return self.verp.sender(group, member)

    def _verp_sender(self, sender: str, recipient: str) -> str:
        """The VERP sender for C{recipient}, or the sender as it is if either does not parse."""
        try:
            return str(self._verp_address(_parsed(sender), parse_mailbox(recipient)))
        except AddressError:
            return sender

    def _verp_job(self, envelope: Envelope, r: RecipientState) -> _Job:
        """
        The job of one recipient with its own VERP sender, made from the
        parsed addresses: when both parse and the VERP local part is a
        dot-string of at most 64 octets, the client need not parse them
        again (L{Transaction.checked}).
        """
        try:
            group, member = _parsed(envelope.sender), parse_mailbox(r.address)
        except AddressError:
            return _Job(envelope, [r], envelope.sender)
        verp = self._verp_address(group, member)
        # Quoted local parts and address literals are the only non-atext
        # parts a parsed mailbox can have.
        checked = (
            '"' not in verp.local
            and "[" not in verp.local
            and len(verp.local.encode()) <= MAX_LOCAL_PART
        )
        return _Job(envelope, [r], str(verp), checked=checked)

    def _destination(self, address: str) -> str:
        domain = address.rpartition("@")[2].lower()
        if domain in self.local_domains and self.local_delivery is not None:
            return "local:"
        if self.relayhost is not None:
            return "relay:"
        return "mx:" + domain

    def _submit(self, job: _Job) -> None:
        for r in job.recipients:
            self._in_flight.add((job.envelope.id, r.address))
        destination = self._destination(job.recipients[0].address)
        jobs = self._jobs[destination]
        jobs.append(job)
        # Connections waiting for mail to this destination take the first
        # jobs (L{_wake_parked}); new ones only for the jobs beyond those.
        waiting = len(self._parked.get(destination, ()))
        if len(jobs) > waiting and self._workers[destination] < self._per_destination:
            self._workers[destination] += 1
            if self._connections.tokens == 0:
                # Every connection slot is taken: one kept waiting for
                # another destination gives way.
                for other in list(self._parked):
                    if other != destination:
                        self._unpark(other, False)
                        break
            Deferred.fromCoroutine(self._worker(destination)).addErrback(
                lambda f: log.failure("Delivery worker failed", f)
            )

    # -- connections waiting for more mail --------------------------------
    async def _park(self, destination: str) -> bool:
        """
        Wait, with an open connection and nothing to send, for more jobs to
        C{destination}: C{True} when some came, C{False} when the
        connection should close (its time is up, a worker of another
        destination needs the slot, L{when_idle} or L{stop}).
        """
        if (
            self.connection_cache_time <= 0
            or not self._running
            or self._idle
            or self._connections.waiting
        ):
            return False
        d: Deferred[bool] = Deferred()
        timer = self.reactor.callLater(
            self.connection_cache_time, self._unpark, destination, False, d
        )
        self._parked.setdefault(destination, []).append((d, timer))
        self._check_idle()  # nothing may be running now: log the outcomes
        return await d

    def _unpark(self, destination: str, more: bool, which: Deferred[bool] | None = None) -> None:
        """Wake one waiting connection of C{destination} (C{which}, or the oldest)."""
        parked = self._parked.get(destination, [])
        index = next((i for i, (d, _) in enumerate(parked) if which in (None, d)), None)
        if index is None:
            return  # woken meanwhile
        d, timer = parked.pop(index)
        if not parked:
            del self._parked[destination]
        if timer.active():
            timer.cancel()
        d.callback(more)

    def _wake_parked(self) -> None:
        """Give the jobs just queued to the connections waiting for them."""
        for destination in list(self._parked):
            for _ in range(len(self._jobs.get(destination, ()))):
                if destination not in self._parked:
                    break
                self._unpark(destination, True)

    # -- workers -----------------------------------------------------------
    async def _worker(self, destination: str) -> None:
        jobs = self._jobs[destination]
        try:
            if destination == "local:":
                while jobs:
                    await self._deliver_locally(jobs.popleft())
                return
            async with self._connections:
                while jobs:
                    await self._session(destination, jobs)
        finally:
            self._workers[destination] -= 1
            if not self._workers[destination]:
                del self._workers[destination]
                if not jobs:
                    self._jobs.pop(destination, None)
            self._check_idle()

    def _check_idle(self) -> None:
        if self._in_flight:
            return
        parked = sum(len(p) for p in self._parked.values())
        if sum(self._workers.values()) > parked:
            return  # a transaction (or a connection being made) is running
        if not self._idle:
            return
        if parked:
            # Someone waits for idle: close the connections kept open. Each
            # worker calls this again as it ends.
            for destination in list(self._parked):
                while destination in self._parked:
                    self._unpark(destination, False)
            return
        waiters, self._idle = self._idle, []
        for d in waiters:
            d.callback(None)
