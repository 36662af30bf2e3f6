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
import ipaddress
import re
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.logger import Logger

from gsmail import maillog, status
from gsmail.addresses import MAX_LOCAL_PART, Address, AddressError, encode_xverp, parse_mailbox
from gsmail.outbound import backoff, dsn
from gsmail.outbound.client import (
    CHUNK_SIZE,
    ClientTLS,
    SMTPClientError,
    Timeouts,
    Transaction,
    connect,
)
from gsmail.outbound.mtasts import ENFORCE, MTASTS, NONE, Policy, STSClientTLS
from gsmail.outbound.mx import MXHost, MXLookupError, MXResolver, RelayHost
from gsmail.outbound.queue import (
    DELIVERED,
    EXPIRED,
    FAILED,
    PENDING,
    Envelope,
    NoSuchMessageError,
    OutboundQueue,
    RecipientState,
)
from gsmail.outbound.tlsrpt import TLSReportCounts
from gsmail.status import Reply
from gsmail.verp import VerpPolicy

__all__ = ["TLSPolicy", "OutboundDelivery", "LocalDelivery"]

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

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")

LocalDelivery = Callable[[str, str, str], Deferred[Reply]]
"""Delivers (sender, recipient, message path) to this site's own inbound side."""


def _error_reply(error: SMTPClientError) -> Reply:
    """
    The reply to record for a failed connection or transaction: a transient
    error is a 4xx whatever the server said (a 535 from a smarthost with a
    wrong password, a 250 before the end of data), so the mail stays queued.
    """
    reply = error.as_reply()
    if error.transient and not reply.is_transient:
        enhanced = "4" + reply.enhanced[1:] if reply.enhanced else "4.0.0"
        return Reply(451, enhanced, reply.text)
    return reply


@functools.lru_cache(maxsize=64)
def _parsed(address: str) -> Address:
    """
    C{parse_mailbox}, remembered for the few senders of VERP mail (one
    group's address for each of its members; L{Address} is immutable).

    @raise AddressError: it does not parse (not remembered).
    """
    return parse_mailbox(address)


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


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@attrs.frozen
class TLSPolicy:
    """
    How to use TLS towards one kind of destination.

    @ivar use: offer STARTTLS when the server does (C{False}: gs.email's
        C{no_tls}).
    @ivar require: never send in clear (gs.email's C{force_tls}): no STARTTLS
        or a failed handshake keeps the message queued (transient).
    @ivar verify: verify the certificate and host name (service-identity).
    @ivar name: the name to verify instead of the host's (a smarthost reached
        as C{localhost}, as Synapse's C{tlsname}).
    @ivar trust_root: CA certificates to trust instead of the system's (tests,
        private CAs); C{None}: the platform trust.
    """

    use: bool = True
    require: bool = False
    verify: bool = True
    name: str = ""
    trust_root: Any = attrs.field(default=None, repr=False)

    def context(self, host: str) -> ClientTLS | None:
        """The STARTTLS context for C{host}, or C{None} when TLS is off."""
        if not self.use:
            return None
        if self.verify:
            return ClientTLS(ssl.optionsForClientTLS(self.name or host, trustRoot=self.trust_root))
        return ClientTLS(ssl.CertificateOptions(verify=False))  # type: ignore[arg-type]


#: Smarthost default: verified STARTTLS when offered.
SMARTHOST_TLS = TLSPolicy()
#: MX default: opportunistic STARTTLS, not verified (RFC 7435).
MX_TLS = TLSPolicy(verify=False)


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


@attrs.define
class _Job:
    """One transaction to make: some pending recipients of one envelope."""

    envelope: Envelope
    recipients: list[RecipientState]
    sender: str
    #: Ask the smarthost to do the VERP (Postfix's XVERP) for this batch;
    #: split per recipient if it turns out not to offer XVERP.
    xverp: bool = False
    #: Its transaction, once made (L{OutboundDelivery._transaction}).
    transaction: Transaction | None = None
    #: The sender and recipients are known to be mailboxes (L{Transaction.checked}).
    checked: bool = False
    #: When this attempt began (the reactor's seconds), for C{delays=}.
    made: float = 0.0


class OutboundDelivery:
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

    async def _hosts(self, destination: str) -> list[MXHost]:
        if destination == "relay:":
            assert self.relayhost is not None
            host = self.relayhost.host
            if self.mx is None or _is_ip(host):
                return [MXHost(0, host, (host,))]
            return await self.mx.relay_hosts(self.relayhost)
        assert self.mx is not None
        return await self.mx.hosts(destination[3:])

    async def _session(self, destination: str, jobs: deque[_Job]) -> None:
        """One connection: try the hosts in order, then send jobs over it."""
        try:
            hosts = await self._hosts(destination)
        except MXLookupError as e:
            self._fail_all(jobs, e.reply)
            return
        except Exception:
            log.failure("Looking up the hosts for {destination} failed", destination=destination)
            self._fail_all(jobs, status.LOCAL_ERROR)
            return
        smarthost = destination == "relay:"
        policy = self.smarthost_tls if smarthost else self.mx_tls
        port = self.relayhost.port if smarthost and self.relayhost else self.mx_port
        last_error: Reply = Reply(451, "4.4.1", "No host could be reached")
        sts: Policy | None = None
        domain = destination[3:]
        if not smarthost and self.mta_sts is not None:
            sts = await self.mta_sts.policy(domain)
            if sts is not None and sts.mode == NONE:
                sts = None
        if sts is not None:
            hosts = self._sts_hosts(domain, sts, hosts)
            if not hosts:
                self._fail_all(
                    jobs,
                    Reply(451, "4.7.5", f"No MX host of {domain} is listed in its MTA-STS policy"),
                )
                return
        targets = [(host, address) for host in hosts for address in host.addresses]
        for index, (host, address) in enumerate(targets):
            last = index == len(targets) - 1
            sts_tls = (
                self.mta_sts.client_tls(host.name, sts)
                if sts is not None
                and self.mta_sts is not None
                and (policy.use or sts.mode == ENFORCE)
                else None
            )
            try:
                conn = await self._connect(address, port, host.name, policy, smarthost, sts_tls)
            except SMTPClientError as e:
                # A refusal by one host (even a 5xx greeting) moves on to
                # the next, as Postfix's smtp_skip_5xx_greeting does.
                last_error = _error_reply(e)
                if sts is not None and sts_tls is not None:
                    last_error = self._sts_refused(domain, sts, sts_tls, e, last_error)
                log.info(
                    "Could not deliver via {host} [{address}]: {error}",
                    host=host.name,
                    address=address,
                    error=str(e),
                )
                if self.mx is not None and not smarthost:
                    self.mx.mark_bad(address)
                continue
            summary = conn.tls_summary()
            if summary is not None:
                version, _, cipher = summary.partition(" with cipher ")
                maillog.tls(
                    "outbound", version, cipher, relay=f"{host.name}[{address}]:{port}", log=log
                )
            if sts is not None and sts_tls is not None:
                self._sts_connected(domain, sts, sts_tls, conn.tls_active)
            next_host = False
            # The job after the current one, taken from the queue so that
            # its commands can follow the current message (client.send's
            # then=); it is the next one sent on this connection.
            held: _Job | None = None
            try:
                while conn.usable:
                    if held is not None:
                        job, held = held, None
                    elif jobs:
                        job = jobs.popleft()
                    elif await self._park(destination) and jobs and conn.usable:
                        job = jobs.popleft()
                    else:
                        break
                    if jobs and self._pipelinable(conn, job) and self._pipelinable(conn, jobs[0]):
                        held = jobs.popleft()
                    try:
                        retry = await self._transact(conn, job, host.name, last, held)
                    except Exception:
                        log.failure("Delivering {queue_id} failed", queue_id=job.envelope.id)
                        for r in job.recipients:
                            self._in_flight.discard((job.envelope.id, r.address))
                            r.next_attempt = self.reactor.seconds() + 300  # no hot loop
                            if r.state == PENDING:
                                self._waiting.add(job.envelope.id)
                                self._wake_at(job.envelope.id, r.next_attempt)
                        continue
                    if retry is not None:
                        # A recoverable error here: the next host may do
                        # better (Postfix's smtp(8) does the same).
                        if held is not None:
                            jobs.appendleft(held)
                            held = None
                        jobs.appendleft(retry[0])
                        last_error = retry[1]
                        next_host = True
                        break
                if conn.usable:
                    await conn.quit()
            finally:
                if held is not None:
                    jobs.appendleft(held)  # for another connection
                conn.abort()
            if not next_host:
                return  # the worker takes any jobs queued meanwhile
        self._fail_all(jobs, last_error)

    async def _connect(
        self,
        address: str,
        port: int,
        name: str,
        policy: TLSPolicy,
        smarthost: bool,
        sts_tls: STSClientTLS | None = None,
    ) -> Any:
        endpoint = self._endpoint_factory(address, port)
        if smarthost and self.relayhost is not None and self.relayhost.implicit_tls:
            tls_name = policy.name or name
            endpoint = wrapClientTLS(
                ssl.optionsForClientTLS(tls_name, trustRoot=policy.trust_root), endpoint
            )
        tls = policy.context(name) if sts_tls is None else ClientTLS(sts_tls)
        return await connect(
            self.reactor,
            endpoint,
            helo=self.hostname,
            tls=tls,
            # RFC 8461 §5: in enforce mode, never in clear.
            require_tls=policy.require or (sts_tls is not None and sts_tls.enforce),
            auth=self.auth if smarthost else None,
            timeouts=self.timeouts,
            trace=self.trace,
        )

    # -- MTA-STS (RFC 8461) ------------------------------------------------------
    def _sts_hosts(self, domain: str, sts: Policy, hosts: list[MXHost]) -> list[MXHost]:
        """
        The MX hosts to try under C{sts}: in enforce mode only those the
        policy lists (RFC 8461 §4.1); each one it does not list is logged
        (and counted for TLS reports), in testing mode too.
        """
        listed = []
        for host in hosts:
            if sts.matches(host.name):
                listed.append(host)
                continue
            log.warn(
                "MTA-STS {mode}: MX host {mx_host} of {domain} is not listed in its policy{what}",
                mode=sts.mode,
                mx_host=host.name,
                domain=domain,
                what=" (skipped, 4.7.5)" if sts.mode == ENFORCE else "",
                enhanced_status="4.7.5",
            )
            if self.tls_report is not None:
                self.tls_report.failure(domain, sts, "validation-failure", host.name)
        return listed if sts.mode == ENFORCE else hosts

    def _sts_connected(self, domain: str, sts: Policy, tls: STSClientTLS, encrypted: bool) -> None:
        """A session opened under C{sts} (enforce: verified; testing: maybe not)."""
        if encrypted and tls.failure is None:
            if self.tls_report is not None:
                self.tls_report.success(domain, sts)
            return
        result = tls.failure or "starttls-not-supported"
        log.warn(
            "MTA-STS {mode}: {mx_host} of {domain}: {detail}; delivering anyway",
            mode=sts.mode,
            mx_host=tls.host,
            domain=domain,
            detail=tls.detail if tls.failure else "no STARTTLS",
            result_type=result,
        )
        if self.tls_report is not None:
            self.tls_report.failure(domain, sts, result, tls.host)

    def _sts_refused(
        self, domain: str, sts: Policy, tls: STSClientTLS, error: SMTPClientError, reply: Reply
    ) -> Reply:
        """
        The reply to record when a connection under C{sts} failed: for a
        policy failure (enforce mode) one that says so, as Postfix's
        C{4.7.5} for a certificate it could not verify.
        """
        if tls.failure is not None:
            result, detail = tls.failure, tls.detail
        elif error.enhanced == "4.7.4":
            result, detail = "starttls-not-supported", "no STARTTLS"
        elif error.enhanced == "4.7.5":
            result, detail = "validation-failure", error.detail
        else:
            return reply  # not a TLS failure: no connection, a refusal
        if self.tls_report is not None:
            self.tls_report.failure(domain, sts, result, tls.host)
        if sts.mode != ENFORCE:
            return reply
        log.warn(
            "MTA-STS enforce: {mx_host} of {domain}: {detail} (4.7.5, the message stays queued)",
            mx_host=tls.host,
            domain=domain,
            detail=detail,
            result_type=result,
            enhanced_status="4.7.5" if result != "starttls-not-supported" else "4.7.4",
        )
        enhanced = "4.7.4" if result == "starttls-not-supported" else "4.7.5"
        return Reply(451, enhanced, f"gsmail: MTA-STS policy of {domain}: {detail} at {tls.host}")

    @staticmethod
    def _pipelinable(conn: Any, job: _Job) -> bool:
        """Is C{job} one transaction on C{conn} (not split per recipient)?"""
        return not (job.xverp and "XVERP" not in conn.extensions)

    def _transaction(self, job: _Job) -> Transaction:
        """The transaction of C{job}, made once (C{send(then=)} needs the same object)."""
        if job.transaction is not None:
            return job.transaction
        envelope = job.envelope
        made = self._made.get(envelope.id)
        if made is None:
            # What every transaction of this message shares (read-only).
            params: dict[str, str | None] = {}
            if envelope.params.get("BODY") == "8BITMIME":
                params["BODY"] = "8BITMIME"
            if "SMTPUTF8" in envelope.params:
                params["SMTPUTF8"] = None
            for key in ("RET", "ENVID"):
                if key in envelope.params:
                    params[key] = envelope.params[key]
            made = self._made[envelope.id] = (
                self.queue.data_path(envelope.id),
                params,
                {**params, "XVERP": None},
            )
        rcpt_params: dict[str, dict[str, str]] = {}
        for r in job.recipients:
            if r.notify or r.orcpt:
                wanted = rcpt_params[r.address] = {}
                if r.notify:
                    wanted["NOTIFY"] = r.notify
                if r.orcpt:
                    wanted["ORCPT"] = dsn.orcpt_parameter(r.orcpt)
        job.transaction = Transaction(
            sender=job.sender,
            recipients=[r.address for r in job.recipients],
            data_path=made[0],
            size=envelope.size,
            params=made[2] if job.xverp else made[1],
            data=self._message(envelope),
            checked=job.checked,
            rcpt_params=rcpt_params,
        )
        return job.transaction

    def _message(self, envelope: Envelope) -> bytes | None:
        """
        The message of a small envelope, read once while it is being
        delivered (queue files never change), so the client neither opens
        nor encodes it per recipient; C{None} for a large one (streamed from
        its file) or on a read error (the client reports it).
        """
        data = self._messages.get(envelope.id)
        if data is not None or envelope.size >= CHUNK_SIZE:
            return data
        try:
            with open(self.queue.data_path(envelope.id), "rb") as f:
                data = f.read(envelope.size + 1)
        except OSError:
            return None
        if len(data) != envelope.size:
            return None  # the client refuses the file, with the reason
        if len(self._messages) >= _MESSAGES_KEPT:
            del self._messages[next(iter(self._messages))]  # the oldest
        self._messages[envelope.id] = data
        return data

    async def _transact(
        self, conn: Any, job: _Job, remote: str, last: bool = True, then: _Job | None = None
    ) -> tuple[_Job, Reply] | None:
        """
        Send one job over C{conn} and record the outcomes.

        @param last: this is the last host to try. If not, recipients that
            got a transient reply (before the final dot) are not recorded.
        @param then: the job to send next on C{conn}: its commands may go
            out with this message (pipelining). Its message data only goes
            out with the next call, after this job's outcomes are recorded,
            so the at-least-once window stays one transaction per connection.
        @return: C{None}, or the job of the recipients to try on the next host
            with the reply that made it so.
        """
        if job.xverp and "XVERP" not in conn.extensions:
            # The smarthost does not do VERP: one transaction per recipient.
            for i, r in enumerate(job.recipients):
                sender = self._verp_sender(job.envelope.sender, r.address)
                one = _Job(job.envelope, [r], sender, made=job.made)
                retry = await self._transact(conn, one, remote, last)
                if retry is not None:
                    rest = [retry[0].recipients[0], *job.recipients[i + 1 :]]
                    return _Job(job.envelope, rest, job.sender, job.xverp, made=job.made), retry[1]
                if not conn.usable:
                    break
            return None
        envelope = job.envelope
        transaction = self._transaction(job)
        self.transactions += 1
        after_data = False
        try:
            if then is not None:
                result = await conn.send(transaction, then=self._transaction(then))
            else:
                result = await conn.send(transaction)
        except SMTPClientError as e:
            replies = {r.address: e.partial.get(r.address, _error_reply(e)) for r in job.recipients}
            after_data = e.after_data
            if e.after_data:
                log.warn(
                    "Connection to {remote} lost after the final dot for {queue_id}: "
                    "the retry may deliver a second copy",
                    remote=remote,
                    queue_id=envelope.id,
                )
        else:
            replies = result.recipients
        # A next hop that offers DSN was given NOTIFY and reports itself.
        reports = "DSN" in conn.extensions
        if not last and not after_data:
            again = [
                r for r in job.recipients if replies.get(r.address, status.LOCAL_ERROR).is_transient
            ]
            if again:
                done = [r for r in job.recipients if r not in again]
                if done:
                    await self._record(
                        _Job(envelope, done, job.sender, job.xverp, made=job.made),
                        replies,
                        remote,
                        next_hop_reports=reports,
                    )
                reply = replies.get(again[0].address, status.LOCAL_ERROR)
                log.info(
                    "{queue_id}: {reply} from {remote}; trying the next host",
                    queue_id=envelope.id,
                    reply=f"{reply.code} {reply.status_line()}",
                    remote=remote,
                )
                return _Job(envelope, again, job.sender, job.xverp, made=job.made), reply
        await self._record(job, replies, remote, next_hop_reports=reports)
        return None

    async def _deliver_locally(self, job: _Job) -> None:
        assert self.local_delivery is not None
        replies: dict[str, Reply] = {}
        for r in job.recipients:
            try:
                replies[r.address] = await self.local_delivery(
                    job.sender, r.address, self.queue.data_path(job.envelope.id)
                )
            except Exception:
                log.failure("Local delivery of {queue_id} failed", queue_id=job.envelope.id)
                replies[r.address] = status.LOCAL_ERROR
        await self._record(job, replies, self.hostname, final=True)

    def _fail_all(self, jobs: deque[_Job], reply: Reply) -> None:
        while jobs:
            job = jobs.popleft()
            Deferred.fromCoroutine(
                self._record(job, {r.address: reply for r in job.recipients}, "")
            ).addErrback(lambda f: log.failure("Recording a failure failed", f))

    # -- outcomes ------------------------------------------------------------
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
