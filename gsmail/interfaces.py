# -*- test-case-name: tests.test_groupserver -*-
"""
The seams of gsmail: what the delivery core needs from GroupServer, and the
shape of a spooled message handed to it.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Interface

__all__ = ["GroupInfo", "MessageSource", "IGroupServer", "Enqueue"]


class Enqueue(Protocol):
    """
    What the inbound side needs of the outbound queue
    (L{gsmail.outbound.queue.OutboundQueue.enqueue}): forwarded postmaster
    mail and route actions that send mail on (C{forward}, C{bcc}) queue it.
    """

    def enqueue(
        self,
        sender: str,
        recipients: list[str],
        data: bytes | str,
        *,
        xverp: bool = False,
        params: dict[str, str] | None = None,
    ) -> Deferred[Any]: ...


@attrs.frozen
class GroupInfo:
    """
    The answer of GroupServer's group-exists page
    (C{/gs-group-messages-add-group-exists.html}).

    @ivar email: the address that was looked up.
    @ivar group_id: the group's id, or C{None} when no group has that address.
    @ivar site_id: the site's id, or C{None} when no group has that address.
    @ivar site_url: the site's URL as GroupServer gave it, or C{None}.
    """

    email: str
    group_id: str | None
    site_id: str | None
    site_url: str | None = None


@attrs.frozen
class MessageSource:
    """
    A message ready to post: C{prefix} (the trace header fields gsmail adds
    for one recipient) followed by the C{size} bytes of the spool file at
    C{path}. The raw message GroupServer receives is exactly
    C{prefix + open(path, "rb").read()}, with LF line endings.

    @ivar prefix: header lines, each ending in LF, e.g.
        C{b"Return-Path: <a@example.org>\\nX-Original-To: dev@groups.example.com\\n"}.
    @ivar path: the spool file; it is not removed by the client.
    @ivar size: the number of bytes of C{path} that belong to the message.
    @ivar data: those C{size} bytes, when the spool kept them in memory too
        (small messages), or C{None}: the client then reads the file.
    """

    prefix: bytes
    path: str
    size: int
    data: bytes | None = None

    @property
    def length(self) -> int:
        """The length in bytes of the raw message (prefix and file)."""
        return len(self.prefix) + self.size


class IGroupServer(Interface):
    """
    The four pages of GroupServer a mail server calls
    (see C{shared/groupserver-protocol.md}). Every method fails with
    L{gsmail.status.GroupServerError} carrying the reply the sending MTA gets.
    """

    def lookup_group(address: str) -> Deferred[GroupInfo]:
        """
        Ask the group-exists page which group, if any, has C{address}.

        @param address: the full list address, C{local@domain}.
        @return: a L{GroupInfo}; C{group_id} is C{None} when there is no group.
        """

    def add_post(group_id: str, message: MessageSource, time_source: str) -> Deferred[None]:
        """
        Add C{message} to the group with the add-email page; fires when
        GroupServer answered 200.

        @param time_source: C{"server"} or C{"message"}.
        """

    def relay(message: MessageSource) -> Deferred[None]:
        """
        Relay C{message} to a member with the relay page.
        """

    def record_bounce(user_email: str, group_email: str) -> Deferred[bool]:
        """
        Record that mail from the group C{group_email} to C{user_email} bounced.

        @return: C{True} when recorded, C{False} when the page ran and no
            member has C{user_email}.
        """
