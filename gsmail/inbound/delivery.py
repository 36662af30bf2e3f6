# -*- test-case-name: tests.inbound.test_delivery -*-
"""
The delivery core shared by the ESMTP and LMTP servers: it decides at RCPT
time where a recipient goes (reject, relay page, bounce page, group), and
after the final dot hands each recipient's copy to GroupServer through the
ledger, so no message is ever posted twice.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import cast

import attrs
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail import status
from gsmail.addresses import Address, BounceCheck, Route, RouteKind, route_recipient
from gsmail.bounces import Blocking, BounceScreen
from gsmail.inbound.protocol import Envelope, Session
from gsmail.inbound.spool import SpooledMessage, release
from gsmail.interfaces import GroupInfo, IGroupServer, MessageSource
from gsmail.ledger import Outcome, PostLedger
from gsmail.posting import plan_posting
from gsmail.status import GroupServerError, Reply
from gsmail.verp import VerpPolicy

__all__ = ["GroupDirectory", "DeliveryCore", "trace_fields"]

log = Logger()


class GroupDirectory:
    """
    GroupServer's group-exists page behind a cache: answers are kept
    C{ttl} seconds when a group was found and C{negative_ttl} seconds when
    none was; failures are not cached. Concurrent lookups of one address share
    one request.

    @param max_entries: cached addresses at most; the oldest go first.
    """

    def __init__(
        self,
        client: IGroupServer,
        clock: IReactorTime,
        *,
        ttl: float = 300.0,
        negative_ttl: float = 60.0,
        max_entries: int = 10_000,
    ) -> None:
        self._client = client
        self._clock = clock
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._max = max_entries
        self._cache: OrderedDict[str, tuple[float, GroupInfo]] = OrderedDict()
        self._in_flight: dict[str, list[Deferred[GroupInfo]]] = {}

    def lookup(self, address: Address) -> Deferred[GroupInfo]:
        """
        The group with list address C{address}.

        @raise GroupServerError: (in the Deferred) GroupServer could not answer.
        """
        key = str(address).lower()
        hit = self._cache.get(key)
        now = self._clock.seconds()
        if hit is not None:
            if hit[0] > now:
                return succeed(hit[1])
            del self._cache[key]
        waiter: Deferred[GroupInfo] = Deferred()
        waiters = self._in_flight.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._in_flight[key] = [waiter]

        def fan_out(result: GroupInfo | Failure) -> None:
            if isinstance(result, GroupInfo):
                ttl = self._ttl if result.group_id else self._negative_ttl
                self._cache[key] = (self._clock.seconds() + ttl, result)
                while len(self._cache) > self._max:
                    self._cache.popitem(last=False)
            for w in self._in_flight.pop(key):
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)

        maybeDeferred(self._client.lookup_group, str(address)).addBoth(fan_out)
        return waiter


def trace_fields(
    session: Session, envelope: Envelope, recipient: Address, hostname: str, when: float
) -> bytes:
    """
    The header fields an MTA adds on delivery, LF-terminated, to put before
    the message: C{Return-Path} (RFC 5321 §4.4), C{Received} (RFC 5321 §4.4,
    RFC 3848 protocol names) and C{X-Original-To}, the envelope recipient, as
    Postfix adds it and as GroupServer's code reads it.

    @param when: the time of receipt, seconds since the epoch.
    """
    sender = str(envelope.sender) if envelope.sender else ""
    date = format_datetime(datetime.fromtimestamp(when, UTC))
    with_ = session.with_protocol
    if envelope.smtputf8:
        with_ = "UTF8" + with_.removeprefix("E")  # RFC 6531 §3.7.4
    received = (
        f"Received: from {session.helo or 'unknown'} ({session.peer})\n"
        f"\tby {hostname} (gsmail) with {with_} id {session.id}\n"
        f"\tfor <{recipient}>; {date}\n"
    )
    lines = f"Return-Path: <{sender}>\n{received}X-Original-To: {recipient}\n"
    return lines.encode("utf-8")


class DeliveryCore:
    """
    Routing and delivery for the inbound servers.

    @param client: GroupServer (the real client, the stand-in's, or a fake).
    @param ledger: the L{PostLedger} that makes posting exactly-once.
    @param domains: the lowercased mail domains this site receives for.
    @param relay_prefix: local-part prefix of member relay addresses.
    @param time_source: C{"server"} or C{"message"} for the add-email page.
    @param reply_deadline: seconds after the final dot by which the sender
        gets an answer; a post still running then is answered C{451 4.4.5}
        and goes on, and the ledger makes the sender's retry safe.
    @param verp: the site's bounce address policy (signed VERP); C{None}:
        unsigned XVERP addresses only, always accepted.
    @param blocking: runs the parsing of messages to bounce addresses in a
        thread (L{BounceScreen}); C{None}: in the reactor thread.
    """

    def __init__(
        self,
        *,
        client: IGroupServer,
        ledger: PostLedger,
        clock: IReactorTime,
        hostname: str,
        domains: tuple[str, ...],
        relay_prefix: str = "p-",
        time_source: str = "server",
        reply_deadline: float = 540.0,
        group_cache_ttl: float = 300.0,
        group_negative_cache_ttl: float = 60.0,
        verp: VerpPolicy | None = None,
        blocking: Blocking | None = None,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.clock = clock
        self.hostname = hostname
        self.domains = domains
        self.relay_prefix = relay_prefix
        self.time_source = time_source
        self.reply_deadline = reply_deadline
        self.verp = verp
        self.bounces = BounceScreen(verp, clock, blocking)
        self.directory = GroupDirectory(
            client, clock, ttl=group_cache_ttl, negative_ttl=group_negative_cache_ttl
        )
        #: Deliveries still running (also those whose reply went out at the deadline).
        self.in_flight = 0
        self._idle: list[Deferred[None]] = []

    # -- RCPT time ---------------------------------------------------------
    def check_recipient(
        self, session: Session, recipient: Address
    ) -> Deferred[tuple[Reply, Route | None]]:
        """
        Decide what to answer to C{RCPT TO:<recipient>}.

        @return: the reply and, when accepted, the L{Route}. Replies:
            C{550 5.7.1} not our domain; C{250 2.1.5} relay or bounce
            address; C{250 2.1.5} a group; C{550 5.1.1} no such group;
            C{451 4.4.4}/C{451 4.5.0} GroupServer could not answer. A bounce
            address is accepted whether its tag is good or not, and so is
            an unsigned one of no group (the route says which: the message
            is dropped after DATA, L{gsmail.bounces}).
        """
        route = route_recipient(recipient, self.domains, self.relay_prefix, self.verp)
        if route.kind is RouteKind.REJECT_RELAY:
            log.info(
                "Relay denied for {recipient} from {peer}",
                recipient=str(recipient),
                peer=session.peer,
            )
            return succeed((status.RELAY_DENIED, None))
        if route.kind is RouteKind.RELAY:
            return succeed((status.RELAY_ADDRESS_OK, route))
        if route.kind is RouteKind.BOUNCE:
            if route.bounce_check is not BounceCheck.UNSIGNED or route.group_address is None:
                return succeed((status.BOUNCE_ADDRESS_OK, route))
            # Anyone can write an unsigned address: it must name a group.
            return self._check_bounce_group(route)
        if not recipient.local.isascii():
            # GroupServer's group-exists field is an ASCIILine: no group can
            # have this address, and asking would re-render the form (which
            # looks like a wrong token, 4.5.0, retried for days).
            return succeed((status.NO_SUCH_GROUP.with_text(f"No such group <{recipient}>"), None))

        def found(info: GroupInfo) -> tuple[Reply, Route | None]:
            if not info.group_id:
                return (status.NO_SUCH_GROUP.with_text(f"No such group <{recipient}>"), None)
            return (
                status.RECIPIENT_OK,
                Route(RouteKind.GROUP, recipient, group_id=info.group_id),
            )

        def failed(failure: Failure) -> tuple[Reply, Route | None]:
            reply = status.reply_for_exception(failure.value)
            if not isinstance(failure.value, GroupServerError):
                log.failure(
                    "Group lookup failed for {recipient}", failure, recipient=str(recipient)
                )
            else:
                log.warn(
                    "Group lookup for {recipient} failed: {reply_code} {enhanced_status} {detail}",
                    recipient=str(recipient),
                    reply_code=reply.code,
                    enhanced_status=reply.enhanced,
                    detail=failure.value.detail,
                )
            return (reply, None)

        return self.directory.lookup(recipient).addCallbacks(found, failed)

    def _check_bounce_group(self, route: Route) -> Deferred[tuple[Reply, Route | None]]:
        group = route.group_address
        assert group is not None
        unknown = attrs.evolve(route, bounce_check=BounceCheck.UNKNOWN_GROUP)
        if not group.local.isascii():
            return succeed((status.BOUNCE_ADDRESS_OK, unknown))

        def found(info: GroupInfo) -> tuple[Reply, Route | None]:
            return (status.BOUNCE_ADDRESS_OK, route if info.group_id else unknown)

        def failed(failure: Failure) -> tuple[Reply, Route | None]:
            reply = status.reply_for_exception(failure.value)
            log.warn(
                "Group lookup for the bounce address {recipient} failed: {reply_code}"
                " {enhanced_status}",
                recipient=str(route.recipient),
                reply_code=reply.code,
                enhanced_status=reply.enhanced,
            )
            return (reply, None)

        return self.directory.lookup(group).addCallbacks(found, failed)

    # -- after the final dot -------------------------------------------------
    def deliver(
        self, session: Session, envelope: Envelope, message: SpooledMessage
    ) -> Deferred[list[Reply]]:
        """
        Deliver C{message} to every accepted recipient of C{envelope}.

        @return: one reply per recipient in RCPT order; never fails. The spool
            file is removed once every delivery has finished, which may be
            after the replies (see C{reply_deadline}).
        """
        received = self.clock.seconds()
        work = [
            self._deliver_one(session, envelope, route, message, received)
            for route in envelope.recipients
        ]
        self.in_flight += 1
        answered: Deferred[list[Reply]] = Deferred()
        timer = self.clock.callLater(self.reply_deadline, self._deadline_passed, work, answered)

        def finished(replies: list[Reply]) -> None:
            if timer.active():
                timer.cancel()
            if not answered.called:
                answered.callback(replies)
            try:
                release(message)
            except OSError as e:
                log.warn(
                    "Could not remove the spool file {path}: {error}", path=e.filename, error=e
                )
            self.in_flight -= 1
            if self.in_flight == 0:
                waiters, self._idle = self._idle, []
                for w in waiters:
                    w.callback(None)

        # _deliver_one never fails; one recipient (the usual case) needs no
        # DeferredList.
        all_done: Deferred[list[Reply]]
        if len(work) == 1:
            all_done = work[0].addCallback(lambda reply: [reply])
        else:
            all_done = gatherResults(work)
        all_done.addCallback(finished)
        return answered

    def _deadline_passed(
        self, work: list[Deferred[Reply]], answered: Deferred[list[Reply]]
    ) -> None:
        late = status.TOO_BUSY.with_text(
            "GroupServer has not finished yet; try again later (it will not be posted twice)"
        )
        replies = [cast(Reply, w.result) if w.called else late for w in work]
        log.warn(
            "Reply deadline passed with {count} deliveries running",
            count=sum(not w.called for w in work),
        )
        answered.callback(replies)

    def when_idle(self) -> Deferred[None]:
        """Fires when no delivery is running (for a clean shutdown and tests)."""
        if self.in_flight == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def _deliver_one(
        self,
        session: Session,
        envelope: Envelope,
        route: Route,
        message: SpooledMessage,
        received: float,
    ) -> Deferred[Reply]:
        prefix = trace_fields(session, envelope, route.recipient, self.hostname, received)
        source = MessageSource(
            prefix=prefix, path=message.path, size=message.size, data=message.data
        )
        posting = plan_posting(
            self.client, route, source, message.digest, self.time_source, self.bounces
        )

        def outcome(result: Outcome) -> Reply:
            log.info(
                "{kind} for {recipient} ({message_id}): {outcome}",
                kind=route.kind.value,
                recipient=str(route.recipient),
                message_id=message.message_id or "sha256:" + message.digest,
                outcome=result.value,
                group_id=route.group_id,
                session=session.id,
            )
            if result is Outcome.DONE:
                return posting.success
            return status.ALREADY_DELIVERED

        def failed(failure: Failure) -> Reply:
            reply = status.reply_for_exception(failure.value)
            if isinstance(failure.value, GroupServerError):
                # A refusal is this site's configuration fault: an error.
                emit = log.error if reply == status.GROUPSERVER_REFUSED else log.warn
                emit(
                    "{kind} for {recipient} failed: {reply_code} {enhanced_status} {detail}",
                    kind=route.kind.value,
                    recipient=str(route.recipient),
                    reply_code=reply.code,
                    enhanced_status=reply.enhanced,
                    detail=failure.value.detail,
                    group_id=route.group_id,
                    session=session.id,
                    outcome_unknown=failure.value.outcome_unknown,
                )
            else:
                log.failure(
                    "{kind} for {recipient} failed",
                    failure,
                    kind=route.kind.value,
                    recipient=str(route.recipient),
                )
            return reply

        if posting.screen is not None:

            def screened(dropped: Reply | None) -> Deferred[Reply]:
                if dropped is not None:
                    return succeed(dropped)
                return self.ledger.run(posting.key, posting.action).addCallbacks(outcome, failed)

            return maybeDeferred(posting.screen).addCallback(screened).addErrback(failed)
        return self.ledger.run(posting.key, posting.action).addCallbacks(outcome, failed)
