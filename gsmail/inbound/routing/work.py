# -*- test-case-name: tests.inbound.test_routing -*-
"""
What the parts of the route actions pass each other: one recipient's copy
being delivered (L{_Work}), what a C{handler} route's callable gets
(L{RoutedMessage}), an action's failure (L{_ActionFailed}), and what they
use of the delivery core (L{_CoreParts}) and of the reactor's threads
(L{Blocking}).

Values only: running the actions is L{gsmail.inbound.routing}'s.
"""

from __future__ import annotations

from collections.abc import Callable
from email.message import Message
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred

from gsmail.inbound.postmaster import Postmaster
from gsmail.inbound.spool import SpooledMessage
from gsmail.interfaces import IGroupServer
from gsmail.ledger import PostLedger
from gsmail.routes import RouteMatch, RouteTable, Substitutions
from gsmail.status import Reply

__all__ = ["Blocking", "RoutedMessage"]

#: Runs a blocking job in a thread: C{blocking(job)} fires with its result.
Blocking = Callable[[Callable[[], Any]], "Deferred[Any]"]


class _CoreParts(Protocol):
    """What the actions use of the L{gsmail.inbound.delivery.DeliveryCore}."""

    client: IGroupServer
    ledger: PostLedger
    postmaster: Postmaster | None
    time_source: str
    hostname: str
    domains: tuple[str, ...]
    routes: RouteTable


@attrs.frozen
class RoutedMessage:
    """
    What a C{handler} route's callable gets (emailtunnel's envelope).

    @ivar sender: the envelope sender, C{""} for the null sender.
    @ivar recipient: the envelope recipient this call is for.
    @ivar route: the route's section name.
    @ivar path: the message file (trace fields first, rewriting done), LF
        line ends; it is removed once the returned Deferred fired: read it
        before (in a thread: the callable runs in the reactor's).
    @ivar size: its size in bytes.
    @ivar client: the sending client's address (C{"[192.0.2.1]"}, C{"local"}).
    @ivar variables: the route's substitutions (C{local}, C{domain}, pattern groups).
    """

    sender: str
    recipient: str
    route: str
    path: str
    size: int
    client: str
    variables: dict[str, str] = attrs.field(factory=dict)


class _ActionFailed(Exception):
    """An action's reply was not a success (carried through the ledger)."""

    def __init__(self, reply: Reply, keep: bool = False, why: str = "") -> None:
        super().__init__(reply.status_line())
        self.reply = reply
        self.keep = keep
        self.why = why


@attrs.define
class _Work:
    """One recipient's copy being delivered by a route."""

    match: RouteMatch
    sender: str
    client: str
    session_id: str
    message: SpooledMessage
    prefix: bytes
    now: float
    #: The message's queue id (L{gsmail.maillog}), first on its log lines.
    queue_id: str = "NOQUEUE"
    header: Message | None = None
    seqno: int | None = None
    #: The file the actions use: trace fields, then the (rewritten) message.
    path: str = ""
    size: int = 0

    def substitutions(self) -> Substitutions:
        values = self.match.variables(self.sender)
        values["group"] = self.match.group_id
        return Substitutions(values, self.header, self.now, self.seqno)
