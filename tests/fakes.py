"""
Stand-ins for gsmail's parts in unit tests: a delivery core
(L{FakeCore}), the outbound queue (L{FakeQueue}), GroupServer
(L{FakeGroupServer}, L{InMemory}), the postmaster, a hand-run fsync
hand-off (L{ManualSync}), a counting post function (L{Post}), a transport
that records STARTTLS and a file that counts writes.
"""

from __future__ import annotations

import errno
import io
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import (
    Deferred,
    fail,
    succeed,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    ITLSTransport,
)
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface import implementer

from gsmail import status
from gsmail.addresses import Address, Route, RouteKind
from gsmail.groupserver import (
    GroupServerClient,
)
from gsmail.inbound.delivery import DeliveryCore
from gsmail.inbound.protocol import Envelope, Session
from gsmail.inbound.spool import Spool, SpooledMessage
from gsmail.interfaces import GroupInfo, IGroupServer, MessageSource
from gsmail.ledger import PostLedger
from gsmail.standin import StandIn
from gsmail.status import Reply
from gsmail.workers import (
    InboundWorkers,
)
from tests.util import make_config

#: The token and groups of L{InMemory}'s stand-in.
GS_TOKEN = "s3cret-T0ken-never-logged"


GS_GROUPS = {"dev@groups.example.com": "dev", "ops@groups.example.com": "ops"}


class _Uncancellable:
    def cancel(self) -> None:
        pass


class StepCooperator:
    """A Cooperator that does one step of work each time L{step} is called."""

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []
        self.cooperator = Cooperator(
            scheduler=self._schedule, terminationPredicateFactory=lambda: lambda: True
        )

    def _schedule(self, f: Callable[[], None]) -> IDelayedCall:
        self.pending.append(f)
        return _Uncancellable()

    def step(self) -> bool:
        """Run one step; C{False} when no step was scheduled."""
        if not self.pending:
            return False
        self.pending.pop(0)()
        return True

    def run(self) -> None:
        while self.step():
            pass


class FakeCore:
    """
    A delivery core that accepts every recipient in C{example.com} (others get
    550 5.7.1), records deliveries with the spooled bytes, and can hold
    answers back to test ordering.
    """

    def __init__(self) -> None:
        self.hold_rcpt = False
        self.hold_delivery = False
        self.rcpt_pending: list[
            tuple[Deferred[tuple[Reply, Route | None]], Reply, Route | None]
        ] = []
        self.delivery_pending: list[tuple[Deferred[list[Reply]], list[Reply]]] = []
        self.deliveries: list[tuple[Session, Envelope, bytes]] = []
        self.results: dict[str, Reply] = {}

    def check_recipient(
        self, session: Session, recipient: Address
    ) -> Deferred[tuple[Reply, Route | None]]:
        if recipient.domain != "example.com":
            answer: tuple[Reply, Route | None] = (status.RELAY_DENIED, None)
        elif recipient.local.startswith("nosuch"):
            answer = (status.NO_SUCH_GROUP, None)
        else:
            answer = (
                status.RECIPIENT_OK,
                Route(RouteKind.GROUP, recipient, group_id=recipient.local),
            )
        if self.hold_rcpt:
            d: Deferred[tuple[Reply, Route | None]] = Deferred()
            self.rcpt_pending.append((d, *answer))
            return d
        return succeed(answer)

    def deliver(
        self, session: Session, envelope: Envelope, message: SpooledMessage
    ) -> Deferred[list[Reply]]:
        with open(message.path, "rb") as f:
            data = f.read()
        self.deliveries.append((session, envelope, data))
        replies = [self.results.get(r.recipient.local, status.POSTED) for r in envelope.recipients]
        if self.hold_delivery:
            d: Deferred[list[Reply]] = Deferred()
            self.delivery_pending.append((d, replies))
            return d
        return succeed(replies)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS."""

    tls_started = None

    def startTLS(self, contextFactory: object, normal: bool = True) -> None:
        self.tls_started = contextFactory


def replies(transport: StringTransport) -> list[str]:
    """The reply lines written so far, without CRLF."""
    return transport.value().decode().split("\r\n")[:-1]


def codes(transport: StringTransport) -> list[str]:
    """The final lines' 'code enhanced' pairs (continuation lines skipped)."""
    out = []
    for line in replies(transport):
        if line[3:4] == "-":
            continue
        parts = line.split(" ")
        out.append(
            " ".join(parts[:2])
            if re.match(r"[245]\.\d", parts[1] if len(parts) > 1 else "")
            else parts[0]
        )
    return out


@attrs.define
class Queued:
    id: str
    sender: str
    recipients: list[str]
    data: bytes
    xverp: bool
    params: dict[str, str]
    dsn: list[tuple[str, str]] | None
    sign: bool = False


class FakeQueue:
    """Records what would be queued; C{error} makes enqueue fail."""

    def __init__(self) -> None:
        self.entries: list[Queued] = []
        self.error: Exception | None = None

    def enqueue(
        self,
        sender: str,
        recipients: list[str],
        data: bytes | str,
        *,
        xverp: bool = False,
        params: dict[str, str] | None = None,
        dsn: Sequence[tuple[str, str]] | None = None,
        sign: bool = False,
    ) -> Deferred[Any]:
        if self.error is not None:
            return fail(self.error)
        assert isinstance(data, str)
        with open(data, "rb") as f:
            entry = Queued(
                f"q{len(self.entries) + 1}",
                sender,
                recipients,
                f.read(),
                xverp,
                params or {},
                None if dsn is None else list(dsn),
                sign,
            )
        self.entries.append(entry)
        return succeed(entry)


@implementer(IGroupServer)
class FakeGroupServer:
    """
    A GroupServer double that records calls; groups are C{{address: id}};
    C{hold} keeps post Deferreds unfired; C{post_error} fails posts.
    """

    def __init__(self, groups: dict[str, str]) -> None:
        self.groups = groups
        self.lookups: list[str] = []
        self.posts: list[tuple[str, bytes, str]] = []
        self.relays: list[bytes] = []
        self.bounces: list[tuple[str, str]] = []
        self.lookup_error: Exception | None = None
        self.post_error: Exception | None = None
        self.hold = False
        self.held: list[Deferred[None]] = []

    def lookup_group(self, address: str) -> Deferred[GroupInfo]:
        self.lookups.append(address)
        if self.lookup_error is not None:
            return fail(self.lookup_error)
        gid = self.groups.get(address.lower())
        return succeed(GroupInfo(address, gid, "site" if gid else None))

    def _read(self, message: MessageSource) -> bytes:
        with open(message.path, "rb") as f:
            return message.prefix + f.read(message.size)

    def _result(self) -> Deferred[None]:
        if self.post_error is not None:
            return fail(self.post_error)
        if self.hold:
            d: Deferred[None] = Deferred()
            self.held.append(d)
            return d
        return succeed(None)

    def add_post(self, group_id: str, message: MessageSource, time_source: str) -> Deferred[None]:
        self.posts.append((group_id, self._read(message), time_source))
        return self._result()

    def relay(self, message: MessageSource) -> Deferred[None]:
        self.relays.append(self._read(message))
        return self._result()

    def record_bounce(self, user_email: str, group_email: str) -> Deferred[bool]:
        self.bounces.append((user_email, group_email))
        return self._result().addCallback(lambda _: True)


class FakePostmaster:
    """Records postmaster deliveries; C{reply} is what each gets."""

    def __init__(self) -> None:
        self.kept: list[tuple[str, bytes]] = []
        self.reply = status.POSTMASTER_STORED

    def deliver(self, sender: str, prefix: bytes, message: SpooledMessage) -> Deferred[Reply]:
        with open(message.path, "rb") as f:
            self.kept.append((sender, prefix + f.read()))
        return succeed(self.reply)


class ManualSync:
    """
    A C{sync} hand-off whose jobs run only when the test says so, like a
    thread pool that is slow to get to them. Counts the jobs it was given
    (C{calls}: for the ledger, each is one write and fsync); C{jobs} are
    those handed over and not finished. A job that raises is reported to
    its caller as a failure, as the real hand-off does.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.jobs: list[tuple[Callable[[], None], Deferred[None]]] = []

    def __call__(self, job: Callable[[], None]) -> Deferred[None]:
        self.calls += 1
        d: Deferred[None] = Deferred()
        self.jobs.append((job, d))
        return d

    @property
    def waiting(self) -> int:
        """The number of jobs handed over and not finished."""
        return len(self.jobs)

    def finish(self) -> None:
        """Run the oldest job and report how it went."""
        job, d = self.jobs.pop(0)
        try:
            job()
        except Exception as exc:
            d.errback(exc)
        else:
            d.callback(None)

    def finish_all(self) -> None:
        """Run jobs, including those queued meanwhile, until none is left."""
        while self.jobs:
            self.finish()

    def break_down(self) -> None:
        """Report the oldest job as failed (the disk said EIO), without running it."""
        _, d = self.jobs.pop(0)
        d.errback(OSError(errno.EIO, "Input/output error"))


class Post:
    """
    The action that posts: counts its calls and hands out Deferreds the test
    fires, or fires them at once when C{instant}.
    """

    def __init__(self, instant: bool = False) -> None:
        self.instant = instant
        self.calls = 0
        self.cancelled = 0
        self.deferreds: list[Deferred[object]] = []

    def __call__(self) -> Deferred[object]:
        self.calls += 1
        if self.instant:
            return succeed(None)
        d: Deferred[object] = Deferred(self._cancel)
        self.deferreds.append(d)
        return d

    def _cancel(self, d: Deferred[object]) -> None:
        self.cancelled += 1


class InMemory:
    """
    A client talking to a resource through treq's in-memory agent, with a
    L{Clock} for the client's timers and the stand-in's delays.
    """

    def __init__(
        self,
        testcase: SynchronousTestCase,
        resource: Resource | None = None,
        wrap: Callable[[Resource], Resource] | None = None,
        **kw: Any,
    ):
        self.clock = Clock()
        self.standin = StandIn(
            testcase.mktemp(), GS_TOKEN, GS_GROUPS, clock=self.clock, reactor=None
        )
        self.resource = resource or self.standin.resource()
        if wrap is not None:
            self.resource = wrap(self.resource)
        self.agent = RequestTraversalAgent(self.resource)
        self.steps = StepCooperator()
        kw.setdefault("response_timeout", 30.0)
        self.client = GroupServerClient(
            self.clock,  # type: ignore[arg-type]
            "http://groups.example.com/",
            kw.pop("token", GS_TOKEN),
            http_client=HTTPClient(self.agent),
            cooperator=self.steps.cooperator,
            **kw,
        )

    def pump(self) -> None:
        """Move every byte and run every ready step."""
        for _ in range(50):
            self.agent.flush()
            if not self.steps.step():
                self.agent.flush()
                return


class CountingFile(io.BytesIO):
    """A file that counts its writes and flushes (each one a system call on a real log file)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        return super().write(data)

    def flush(self) -> None:
        self.flushes += 1


class FakeTransport:
    """What a spawned process looks like to its protocol."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written = b""
        self.stdin_closed = False
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class FakeWorkers(InboundWorkers):
    """L{InboundWorkers} whose processes are L{FakeTransport}s."""

    def __init__(self, test: SynchronousTestCase, count: int = 2) -> None:
        self.clock = Clock()
        self.events: list[LogEvent] = []
        self.spawned: list[FakeTransport] = []
        config = make_config(test.mktemp(), inbound_workers=count, reply_deadline=100.0)
        super().__init__(config, self.clock, publisher=self.events.append)

    def spawn(self, protocol: Any) -> Any:
        transport = FakeTransport(1000 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append(transport)
        return transport


class FakePort:
    """A listening port as L{InboundWorkers.start} reads it."""

    def __init__(self, fd: int, family: int = 2) -> None:
        self._fd = fd
        self.socket = attrs.make_class("S", {"family": attrs.field(default=family)})()

    def fileno(self) -> int:
        return self._fd


def started(test: SynchronousTestCase, count: int = 2) -> FakeWorkers:
    workers = FakeWorkers(test, count)
    workers.start({"smtp": FakePort(7), "lmtp": FakePort(8)}, "http://127.0.0.1:8080")
    return workers


class CoreTestsMixin:
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.gs = FakeGroupServer(
            {"dev@groups.example.com": "dev", "ann@groups.example.com": "ann"}
        )
        self.dir = self.mktemp()  # type: ignore[attr-defined]
        os.makedirs(self.dir)
        self.ledger = PostLedger(os.path.join(self.dir, "ledger"), clock=self.clock)
        self.ledger.open()
        self.core = self.make_core()
        self.session = Session(
            peer="[192.0.2.1]", protocol_name="ESMTP", helo="mx.example.org", extended=True
        )

    def tearDown(self) -> None:
        self.ledger.close()

    def make_core(self, **kw: object) -> DeliveryCore:
        args: dict[str, object] = dict(
            client=self.gs,
            ledger=self.ledger,
            clock=self.clock,
            hostname="mx.groups.example.com",
            domains=("groups.example.com",),
            reply_deadline=540.0,
        )
        args.update(kw)
        return DeliveryCore(**args)  # type: ignore[arg-type]

    def rcpt(self, address: str) -> tuple[Reply, Route | None]:
        local, _, domain = address.partition("@")
        return self.successResultOf(  # type: ignore[attr-defined, no-any-return]
            self.core.check_recipient(self.session, Address(local, domain))
        )

    def message(self, data: bytes) -> SpooledMessage:
        spool = Spool(self.dir)
        spool.write(data)
        return spool.finish()

    def envelope(self, *addresses: str) -> Envelope:
        env = Envelope(sender=Address("alice", "example.org"))
        for a in addresses:
            reply, route = self.rcpt(a)
            assert route is not None, reply
            env.recipients.append(route)
        return env

    def deliver(self, env: Envelope, data: bytes) -> Deferred[list[Reply]]:
        return self.core.deliver(self.session, env, self.message(data))
