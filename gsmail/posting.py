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
    counts): an unknown outcome counts as recorded (at most once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gsmail import status
from gsmail.addresses import Route, RouteKind
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
    """

    kind: str
    key: bytes
    action: Callable[[], Deferred[Any]] = attrs.field(repr=False)
    success: Reply


def plan_posting(
    client: IGroupServer,
    route: Route,
    source: MessageSource,
    digest: str,
    time_source: str = "server",
) -> Posting:
    """
    The L{Posting} for C{source} going to C{route}.

    @param route: a GROUP route with its C{group_id} set (after the lookup,
        or from C{smtp2gs --list}), a RELAY or a BOUNCE route.
    @param source: what is posted (the trace fields and the spool file).
    @param digest: the hex SHA-256 of the message as received, without the
        trace fields gsmail or Postfix's pipe put before it.
    @param time_source: C{"server"} or C{"message"}, for the add-email page.
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
        if route.member_address is None or route.group_address is None:
            raise ValueError("a bounce route needs its group and member addresses")
        member, group = str(route.member_address), str(route.group_address)
        posting = Posting(
            kind="bounce",
            key=PostLedger.key("bounce", group.lower(), member.lower(), "sha256:" + digest),
            action=lambda: Deferred.fromCoroutine(_bounce(client, posting, member, group)),
            success=status.BOUNCE_RECORDED,
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
            "Bounce of {member} from {group} may or may not be recorded ({detail});"
            " not repeated",
            member=member,
            group=group,
            detail=e.detail,
        )
        return
    if found is False:
        posting.success = status.BOUNCE_NO_MEMBER

