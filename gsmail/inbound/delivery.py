# -*- test-case-name: tests.inbound.test_delivery -*-
"""
The delivery core shared by the ESMTP and LMTP servers: it decides at RCPT
time where a recipient goes (reject, relay page, bounce page, group), and
after the final dot hands each recipient's copy to GroupServer through the
ledger, so no message is ever posted twice.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail import maillog, status
from gsmail.addresses import (
    MAX_DOMAIN,
    Address,
    BounceCheck,
    Route,
    RouteKind,
    is_helo_name,
    route_recipient,
)
from gsmail.bounces import Blocking, BounceScreen
from gsmail.inbound.authresults import AuthChecker, AuthOutcome
from gsmail.inbound.postmaster import Postmaster
from gsmail.inbound.protocol.state import Envelope, Session
from gsmail.inbound.routing import RouteActions
from gsmail.inbound.routing.work import Blocking as RouteBlocking
from gsmail.inbound.spool import SpooledMessage, release
from gsmail.interfaces import GroupInfo, IGroupServer, MessageSource
from gsmail.ledger import Outcome, PostLedger
from gsmail.logtext import printable
from gsmail.posting import plan_posting
from gsmail.routes import DEFAULT_ENTRIES, RouteTable
from gsmail.status import GroupServerError, Reply
from gsmail.verp import VerpPolicy

__all__ = ["GroupDirectory", "Lookup", "DeliveryCore", "trace_fields", "received_from"]

log = Logger()

#: The reply to recipients still being delivered at C{reply_deadline}.
_LATE = status.TOO_BUSY.with_text(
    "GroupServer has not finished yet; try again later (it will not be posted twice)"
)
#: Added to a delivery line's text when the outcome came after that reply.
_AFTER_DEADLINE = f"; after the reply deadline: the client was told {_LATE.code} {_LATE.enhanced}"


@attrs.frozen
class Lookup:
    """
    A group lookup's answer and where it came from.

    @ivar info: the group (C{group_id} C{None}: no group has the address).
    @ivar cached: C{True} when it came from the cache, C{False} when
        GroupServer gave it for this lookup (or for one it joined).
    """

    info: GroupInfo
    cached: bool


class GroupDirectory:
    """
    GroupServer's group-exists page behind a cache: answers are kept
    C{ttl} seconds when a group was found and C{negative_ttl} seconds when
    none was; failures are not cached. Concurrent lookups of one address share
    one request. So GroupServer is asked at most once per address per TTL,
    however often a sender probes it.

    @param ttl: seconds a found group is remembered.
    @param negative_ttl: seconds "no such group" is remembered.
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

    def clear(self) -> None:
        """
        Forget every cached answer (a reload, SIGHUP): the next lookup of
        each address asks GroupServer. Lookups running now still answer
        their waiters, and their answers are cached.
        """
        self._cache.clear()

    def will_ask(self, address: Address) -> bool:
        """
        Whether a lookup of C{address} now would send GroupServer a request:
        not when a fresh answer is cached or a request for it is running.
        """
        key = str(address).lower()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > self._clock.seconds():
            return False
        return key not in self._in_flight

    def lookup(self, address: Address) -> Deferred[GroupInfo]:
        """
        The group with list address C{address}.

        @raise GroupServerError: (in the Deferred) GroupServer could not answer.
        """
        return self.find(address).addCallback(lambda found: found.info)

    def find(self, address: Address) -> Deferred[Lookup]:
        """
        The group with list address C{address}, and whether the answer came
        from the cache (see L{Lookup}): L{DeliveryCore.check_recipient}
        answers a cached "no such group" C{450 4.1.1}, a fresh one C{550 5.1.1}.

        @return: fires with a L{Lookup}.
        @raise GroupServerError: (in the Deferred) GroupServer could not answer
            (not cached: the next lookup asks again).
        """
        key = str(address).lower()
        hit = self._cache.get(key)
        now = self._clock.seconds()
        if hit is not None:
            if hit[0] > now:
                return succeed(Lookup(hit[1], cached=True))
            del self._cache[key]
        waiter: Deferred[GroupInfo] = Deferred()
        answer = waiter.addCallback(Lookup, cached=False)
        waiters = self._in_flight.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return answer
        # Registered first: the client may answer at once.
        self._in_flight[key] = [waiter]
        maybeDeferred(self._client.lookup_group, str(address)).addBoth(self._answered, key)
        return answer

    def _answered(self, result: GroupInfo | Failure, key: str) -> None:
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


def received_from(session: Session) -> str:
    """
    The C{from} clause of a C{Received} field (RFC 5321 §4.4): C{from NAME
    (PEER)} when the HELO name is a domain or an address literal
    (L{is_helo_name}); else C{from unknown (helo=NAME) (PEER)}, the name in
    a comment with every character that is not printable ASCII, and each of
    C{( ) \\}, made C{?} (Postfix's C{printable()} does the same to the
    HELO name), at most 255 characters. Any HELO is accepted (RFC 5321
    §4.1.4: a server must not refuse mail because the HELO name is wrong),
    but no CR, LF, control or non-ASCII character reaches the field.

    @param session: the session; C{helo} C{None} gives C{from unknown (PEER)}.
    """
    helo = session.helo
    if helo is None:
        return f"from unknown ({session.peer})"
    if is_helo_name(helo):
        return f"from {helo} ({session.peer})"
    shown = "".join(c if " " < c <= "~" and c not in "()\\" else "?" for c in helo[:MAX_DOMAIN])
    return f"from unknown (helo={shown}) ({session.peer})"


#: The last second's date text, (whole second, text): a fan-out or a busy
#: second makes many Received fields with one date, and formatting it cost
#: a third of trace_fields.
_date_cache: tuple[int, str] = (-1, "")


def _received_date(when: float) -> str:
    """
    The RFC 5322 date-time (§3.3) of C{when}, seconds since the epoch, in
    UTC, as L{email.utils.format_datetime} writes it: kept for the rest of
    its second, except for its last microsecond, which
    C{datetime.fromtimestamp} rounds up to the next second.
    """
    global _date_cache
    second = int(when // 1)
    if second != _date_cache[0] or when - second >= 0.999999:
        text = format_datetime(datetime.fromtimestamp(when, UTC))
        if when - second < 0.999999:
            _date_cache = (second, text)
        return text
    return _date_cache[1]


def trace_fields(
    session: Session,
    envelope: Envelope,
    recipient: Address,
    hostname: str,
    when: float,
    auth: bytes = b"",
) -> bytes:
    """
    The header fields an MTA adds on delivery, LF-terminated, to put before
    the message: C{Return-Path} (RFC 5321 §4.4), C{Received} (RFC 5321 §4.4,
    RFC 3848 protocol names) and C{X-Original-To}, the envelope recipient, as
    Postfix adds it and as GroupServer's code reads it.

    C{auth}, gsmail's C{Authentication-Results} field (RFC 8601,
    L{gsmail.inbound.authresults}), goes after C{Return-Path}, above
    C{Received}, as the newest trace field.

    The addresses are written as received: the parser
    (L{gsmail.addresses.parse_mailbox}) refuses any with a control or
    line-breaking character (C{553}), so UTF-8 ones (RFC 6531) are safe
    here. The HELO name is written by L{received_from}. The C{id} is the
    message's queue id, as in Postfix, so the field leads to the log lines.

    @param when: the time of receipt, seconds since the epoch.
    """
    sender = str(envelope.sender) if envelope.sender else ""
    date = _received_date(when)
    with_ = session.with_protocol
    if envelope.smtputf8:
        with_ = "UTF8" + with_.removeprefix("E")  # RFC 6531 §3.7.4
    received = (
        f"Received: {received_from(session)}\n"
        f"\tby {hostname} (gsmail) with {with_} id {envelope.queue_id or session.id}\n"
        f"\tfor <{recipient}>; {date}\n"
    )
    return (
        f"Return-Path: <{sender}>\n".encode()
        + auth
        + f"{received}X-Original-To: {recipient}\n".encode()
    )


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
    @param postmaster: where mail to C{postmaster} goes
        (L{gsmail.inbound.postmaster}), the C{postmaster} action of route
        table entries; C{None} (and no C{routes}): postmaster is looked up
        as a group, like any other address.
    @param routes: the route table (L{gsmail.routes}), looked up before
        GroupServer; C{None}: its built-in entries (postmaster and abuse)
        when there is a C{postmaster}, else none.
    @param max_hops: a message with more C{Received} fields is refused
        C{554 5.4.6} (RFC 5321 §6.3); C{0}: no limit.
    @param route_options: passed to L{RouteActions} (directories, SRS domain).
    @param verp: the site's bounce address policy (signed VERP); C{None}:
        unsigned XVERP addresses only, always accepted.
    @param blocking: runs the parsing of messages to bounce addresses in a
        thread (L{BounceScreen}); C{None}: in the reactor thread.
    @param auth: checks SPF, DKIM and DMARC of mail from the internet and
        gives the C{Authentication-Results} field to add (and removes forged
        ones) before it is posted; C{None}: no checks.
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
        postmaster: Postmaster | None = None,
        verp: VerpPolicy | None = None,
        blocking: Blocking | None = None,
        auth: AuthChecker | None = None,
        routes: RouteTable | None = None,
        max_hops: int = 30,
        route_options: dict[str, Any] | None = None,
    ) -> None:
        self.client = client
        self.auth = auth
        self.postmaster = postmaster
        if routes is None:
            routes = RouteTable(DEFAULT_ENTRIES if postmaster is not None else ())
        self.routes = routes
        self.max_hops = max_hops
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
        self.actions = RouteActions(
            self,
            clock,
            cast(RouteBlocking, blocking or maybeDeferred),
            **(route_options or {}),
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
            address; C{250 2.1.5} a group; C{550 5.1.1} no such group, as
            GroupServer said just now; C{450 4.1.1} no such group as the
            cache remembers it (the group may exist by now: the sender
            retries, and by then the cache has expired); C{451 4.4.4}/
            C{451 4.5.0} GroupServer could not answer; C{450 4.7.1} the
            session or its client has had its GroupServer lookups
            (L{gsmail.anvil.LookupGate}; no request made); C{250 2.1.5}
            postmaster (bare or at a site domain). A bounce address is
            accepted whether its tag is good or not, and so is an unsigned
            one of no group (the route says which: the message is dropped
            after DATA, L{gsmail.bounces}).
        """
        if not recipient.domain or recipient.domain in self.domains:
            decided = self.actions.check_srs(recipient)
            if decided is None:
                matched = self.routes.lookup(recipient)
                if matched is not None:
                    decided = self.actions.check(matched)
            if decided is not None:
                return succeed(decided)
        route = route_recipient(recipient, self.domains, self.relay_prefix, self.verp)
        if route.kind is RouteKind.REJECT_RELAY:
            # Logged as a reject line by the listener.
            return succeed((status.RELAY_DENIED, None))
        if route.kind is RouteKind.RELAY:
            return succeed((status.RELAY_ADDRESS_OK, route))
        if route.kind is RouteKind.BOUNCE:
            if route.bounce_check is not BounceCheck.UNSIGNED or route.group_address is None:
                return succeed((status.BOUNCE_ADDRESS_OK, route))
            # Anyone can write an unsigned address: it must name a group.
            return self._check_bounce_group(session, route)
        if not recipient.local.isascii():
            # GroupServer's group-exists field is an ASCIILine: no group can
            # have this address, and asking would re-render the form (which
            # looks like a wrong token, 4.5.0, retried for days).
            return succeed((status.NO_SUCH_GROUP.with_text(f"No such group <{recipient}>"), None))
        refusal = self._lookup_refusal(session, recipient)
        if refusal is not None:
            return succeed((refusal, None))

        def found(lookup: Lookup) -> tuple[Reply, Route | None]:
            info = lookup.info
            if not info.group_id:
                if lookup.cached:
                    # Never a permanent refusal from memory (a group made
                    # since would bounce); the cache still spares GroupServer.
                    return (
                        status.NO_SUCH_GROUP_CACHED.with_text(
                            f"No such group <{recipient}> when last asked; try again later"
                        ),
                        None,
                    )
                return (status.NO_SUCH_GROUP.with_text(f"No such group <{recipient}>"), None)
            return (
                status.RECIPIENT_OK,
                Route(RouteKind.GROUP, recipient, group_id=info.group_id),
            )

        def failed(failure: Failure) -> tuple[Reply, Route | None]:
            reply = status.reply_for_exception(failure.value)
            if not isinstance(failure.value, GroupServerError):
                log.failure(
                    "Group lookup failed for {recipient}", failure, recipient=printable(recipient)
                )
            else:
                log.warn(
                    "Group lookup for {recipient} failed: {reply_code} {enhanced_status} {detail}",
                    recipient=printable(recipient),
                    reply_code=reply.code,
                    enhanced_status=reply.enhanced,
                    detail=printable(failure.value.detail),
                )
            return (reply, None)

        return self.directory.find(recipient).addCallbacks(found, failed)

    def _lookup_refusal(self, session: Session, address: Address) -> Reply | None:
        """
        C{450 4.7.1} when the session's lookup caps (L{gsmail.anvil.LookupGate})
        forbid asking GroupServer about C{address}; C{None} when they allow it
        or the answer needs no request (cached, or already being asked).
        """
        gate = session.lookup_gate
        if gate is None or not self.directory.will_ask(address):
            return None
        return gate.take()

    def _check_bounce_group(
        self, session: Session, route: Route
    ) -> Deferred[tuple[Reply, Route | None]]:
        group = route.group_address
        assert group is not None
        unknown = attrs.evolve(route, bounce_check=BounceCheck.UNKNOWN_GROUP)
        if not group.local.isascii():
            return succeed((status.BOUNCE_ADDRESS_OK, unknown))
        refusal = self._lookup_refusal(session, group)
        if refusal is not None:
            return succeed((refusal, None))

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
        Deliver C{message} to every accepted recipient of C{envelope}, after
        its authentication checks (C{auth}; at most their time budget).

        @return: one reply per recipient in RCPT order; never fails. The spool
            file is removed once every delivery has finished, which may be
            after the replies (see C{reply_deadline}).
        """
        received = self.clock.seconds()
        self.in_flight += 1
        checked = None
        if self.auth is not None and any(
            route.kind is not RouteKind.BOUNCE for route in envelope.recipients
        ):
            checked = self.auth.check(session, envelope, message)
        if checked is None:
            return self._deliver_all(session, envelope, message, None, received)
        return checked.addCallback(
            lambda outcome: self._deliver_all(session, envelope, message, outcome, received)
        )

    def _deliver_all(
        self,
        session: Session,
        envelope: Envelope,
        message: SpooledMessage,
        auth: AuthOutcome | None,
        received: float,
    ) -> Deferred[list[Reply]]:
        posted = message if auth is None else auth.message
        field = b"" if auth is None else auth.field
        checked = self.clock.seconds()
        answered: Deferred[list[Reply]] = Deferred()
        work = [
            self._deliver_one(session, envelope, route, posted, received, field).addCallback(
                self._log_delivery, session, envelope, route, message, received, checked, answered
            )
            for route in envelope.recipients
        ]
        left = max(0.0, self.reply_deadline - (self.clock.seconds() - received))
        timer = self.clock.callLater(
            left, self._deadline_passed, work, answered, envelope.queue_id or "NOQUEUE"
        )

        def finished(replies: list[Reply]) -> None:
            if timer.active():
                timer.cancel()
            if not answered.called:
                answered.callback(replies)
            try:
                release(message)
                if auth is not None and auth.extra_file is not None:
                    os.unlink(auth.extra_file)
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

    def _log_delivery(
        self,
        reply: Reply,
        session: Session,
        envelope: Envelope,
        route: Route,
        message: SpooledMessage,
        received: float,
        checked: float,
        answered: Deferred[list[Reply]],
    ) -> Reply:
        """
        Log one recipient's outcome as Postfix's delivery line
        (L{gsmail.maillog.delivery}): C{delays=a/b/c} are the seconds from the
        queue id to the final dot (receiving), the authentication checks,
        and the delivery (GroupServer's answer, or the route's actions). An
        outcome that came after the client was answered (C{reply_deadline})
        says so, and what the client was told, in the text and in the field
        C{after_deadline}.
        """
        now = self.clock.seconds()
        late = answered.called
        arrived = envelope.arrived or received
        if route.kind is RouteKind.TABLE and route.table is not None:
            relay = "route:" + route.table.entry.name
        else:
            relay = "groupserver"
        delays = "/".join(
            maillog.format_delay(max(0.0, d))
            for d in (received - arrived, checked - received, now - checked)
        )
        maillog.delivery(
            envelope.queue_id or "NOQUEUE",
            str(route.recipient),
            relay,
            max(0.0, now - arrived),
            delays,
            reply.enhanced,
            maillog.delivery_status(reply.code),
            reply.text + (_AFTER_DEADLINE if late else ""),
            session.listener,
            group=route.group_id,
            after_deadline=late,
            log=log,
            kind=route.kind.value,
            message_id=printable(message.message_id or ""),
            session=session.id,
        )
        return reply

    def _deadline_passed(
        self, work: list[Deferred[Reply]], answered: Deferred[list[Reply]], queue_id: str
    ) -> None:
        replies = [cast(Reply, w.result) if w.called else _LATE for w in work]
        log.warn(
            "{queue_id}: reply deadline passed with {count} deliveries running: the client"
            " is told {code} {enhanced}; their outcome is logged when it comes",
            queue_id=queue_id,
            count=sum(not w.called for w in work),
            code=_LATE.code,
            enhanced=_LATE.enhanced,
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
        auth: bytes = b"",
    ) -> Deferred[Reply]:
        prefix = trace_fields(session, envelope, route.recipient, self.hostname, received, auth)
        if self.max_hops and message.hops > self.max_hops:
            log.warn(
                "{queue_id}: refused a message for {recipient} with {hops} Received fields"
                " ({message_id}): a mail loop?",
                queue_id=envelope.queue_id or "NOQUEUE",
                recipient=printable(route.recipient),
                hops=message.hops,
                message_id=printable(message.identity),
                session=session.id,
            )
            return succeed(status.TOO_MANY_HOPS)
        if route.kind is RouteKind.TABLE:
            sender = str(envelope.sender) if envelope.sender else ""
            return self.actions.deliver(
                sender,
                session.peer,
                session.id,
                route,
                message,
                prefix,
                queue_id=envelope.queue_id or "NOQUEUE",
            )
        source = MessageSource(
            prefix=prefix, path=message.path, size=message.size, data=message.data
        )
        posting = plan_posting(
            self.client, route, source, message.digest, self.time_source, self.bounces
        )

        def outcome(result: Outcome) -> Reply:
            # Logged as the delivery line (_log_delivery): a duplicate's
            # reply says so.
            if result is Outcome.DONE:
                return posting.success
            return status.ALREADY_DELIVERED

        def failed(failure: Failure) -> Reply:
            reply = status.reply_for_exception(failure.value)
            if isinstance(failure.value, GroupServerError):
                # A refusal is this site's configuration fault: an error.
                emit = log.error if reply == status.GROUPSERVER_REFUSED else log.warn
                emit(
                    "{queue_id}: {kind} for {recipient} failed: {reply_code} {enhanced_status}"
                    " {detail}",
                    queue_id=envelope.queue_id or "NOQUEUE",
                    kind=route.kind.value,
                    recipient=printable(route.recipient),
                    reply_code=reply.code,
                    enhanced_status=reply.enhanced,
                    detail=printable(failure.value.detail),
                    group_id=route.group_id,
                    session=session.id,
                    outcome_unknown=failure.value.outcome_unknown,
                )
            else:
                log.failure(
                    "{queue_id}: {kind} for {recipient} failed",
                    failure,
                    queue_id=envelope.queue_id or "NOQUEUE",
                    kind=route.kind.value,
                    recipient=printable(route.recipient),
                )
            return reply

        if posting.screen is not None:

            def screened(dropped: Reply | None) -> Deferred[Reply]:
                if dropped is not None:
                    return succeed(dropped)
                return self.ledger.run(posting.key, posting.action).addCallbacks(outcome, failed)

            return maybeDeferred(posting.screen).addCallback(screened).addErrback(failed)
        return self.ledger.run(posting.key, posting.action).addCallbacks(outcome, failed)
