# -*- test-case-name: tests.test_posting -*-
"""
One place that decides, for one recipient's copy of a message, which
GroupServer page gets it, the post ledger key it is deduplicated by, and the
reply a success earns. The daemon (L{gsmail.inbound.delivery}) and the
C{smtp2gs} command (L{gsmail.script}) both take their postings from here, so
a message that reaches GroupServer by either path has the same key.

What each page's unknown outcome means (groupserver-protocol.md, "GroupServer's
own idempotency"):

  - add-email: GroupServer archives a post id once, so an add whose answer
    was lost is simply tried again by the sender's retry: never lost, never
    archived twice.
  - relay: nothing on GroupServer's side recognises a repeat, so a retry
    after a lost answer may relay the message to the member twice; that is
    preferred to losing it (at least once, as every MTA delivers).
  - bounce: a bounce recorded twice brings a member closer to being
    disabled, while a lost bounce record is harmless (the next bounce
    counts): an unknown outcome counts as recorded (at most once). Before
    that, L{gsmail.bounces.BounceScreen} decides whether the message is a
    bounce to record at all (L{Posting.screen}); one that is not never
    reaches the ledger.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gsmail import status
from gsmail.addresses import Address, Route, RouteKind
from gsmail.bounces import BounceScreen
from gsmail.interfaces import IGroupServer, MessageSource
from gsmail.ledger import PostLedger
from gsmail.status import GroupServerError, Reply

__all__ = ["Posting", "plan_posting"]

log = Logger()


@attrs.define
class Posting:
    """
    What to do with one recipient's copy.

    @ivar kind: the route kind (C{"group"}, C{"relay"}, C{"bounce"}).
    @ivar key: the L{PostLedger} key: a digest of the kind, the target (group
        id, relay address, or group and member) and the message's content
        digest (L{gsmail.inbound.spool.SpooledMessage.digest}), so a stranger
        who reuses a message's C{Message-ID} cannot make gsmail take it for
        a copy of that message.
    @ivar action: calls the page; fires on success, fails with
        L{GroupServerError}.
    @ivar success: the reply when this call performed the action.
    @ivar screen: for bounces, called first: fires with the reply when the
        message is not recorded (nothing is posted, the ledger is not used),
        or C{None}. May fail with C{OSError} (C{451 4.3.0}).
    """

    kind: str
    key: bytes
    action: Callable[[], Deferred[Any]] = attrs.field(repr=False)
    success: Reply
    screen: Callable[[], Deferred[Reply | None]] | None = attrs.field(default=None, repr=False)


def plan_posting(
    client: IGroupServer,
    route: Route,
    source: MessageSource,
    digest: str,
    time_source: str = "server",
    bounces: BounceScreen | None = None,
) -> Posting:
    """
    The L{Posting} for C{source} going to C{route}.

    @param route: a GROUP route with its C{group_id} set (after the lookup,
        or from C{smtp2gs --list}), a RELAY or a BOUNCE route.
    @param source: what is posted (the trace fields and the spool file).
    @param digest: the hex SHA-256 of the message as received, without the
        trace fields gsmail or Postfix's pipe put before it.
    @param time_source: C{"server"} or C{"message"}, for the add-email page.
    @param bounces: decides which messages to a bounce address are recorded;
        C{None}: one without keys (unsigned addresses only).
    @raise ValueError: another route kind, or a GROUP route without a group id.
    """
    if route.kind is RouteKind.GROUP:
        group_id = route.group_id
        if not group_id:
            raise ValueError("a group route needs its group id")
        return Posting(
            kind="group",
            key=PostLedger.key("post", group_id, "sha256:" + digest),
            action=lambda: client.add_post(group_id, source, time_source),
            success=status.POSTED,
        )
    if route.kind is RouteKind.RELAY:
        return Posting(
            kind="relay",
            key=PostLedger.key("relay", str(route.recipient).lower(), "sha256:" + digest),
            action=lambda: client.relay(source),
            success=status.RELAYED,
        )
    if route.kind is RouteKind.BOUNCE:
        if route.group_address is None:
            raise ValueError("a bounce route needs its group address")
        group = str(route.group_address)
        screen = bounces if bounces is not None else BounceScreen()
        # A short signed address names no member: its report does (screen).
        target = route.recipient if route.member_address is None else route.member_address
        member = [str(target)]

        def screened(result: Reply | Address) -> Reply | None:
            if isinstance(result, Reply):
                return result
            member[0] = str(result)
            return None

        def check() -> Deferred[Reply | None]:
            return screen.check(route, source).addCallback(screened)

        posting = Posting(
            kind="bounce",
            key=PostLedger.key("bounce", group.lower(), str(target).lower(), "sha256:" + digest),
            action=lambda: Deferred.fromCoroutine(_bounce(client, posting, member[0], group)),
            success=status.BOUNCE_RECORDED,
            screen=check,
        )
        return posting
    raise ValueError(f"nothing to post for a {route.kind.value} route")


async def _bounce(client: IGroupServer, posting: Posting, member: str, group: str) -> None:
    """
    Record the bounce; a lost answer counts as recorded (see the module
    docstring), and C{No user found} changes the success reply.
    """
    try:
        found = await client.record_bounce(member, group)
    except GroupServerError as e:
        if not e.outcome_unknown:
            raise
        log.warn(
            "Bounce of {member} from {group} may or may not be recorded ({detail}); not repeated",
            member=member,
            group=group,
            detail=e.detail,
        )
        return
    if found is False:
        posting.success = status.BOUNCE_NO_MEMBER
