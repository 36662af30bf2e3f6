"""
The outbound delivery tests' world: a clock that is also a reactor, a fake
network of MTAs (L{FakeNetwork}, L{FakeMTA}, L{FakeMX}) that answer as
scripted, and L{DeliveryTestCase}, which wires a queue and gsmail's
outbound delivery to them.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from gsmail import status
from gsmail.outbound import backoff
from gsmail.outbound.delivery import CONNECTION_CACHE_TIME, OutboundDelivery
from gsmail.outbound.mx import MXHost, NoSuchDomainError, RelayHost
from gsmail.outbound.queue import (
    Envelope,
    OutboundQueue,
    read_queue,
)
from gsmail.status import Reply

HOSTNAME = "mx.groups.example.com"


SITE = "groups.example.com"


LIST = "dev@groups.example.com"


AUTHOR = "alice@example.org"


SMARTHOST = RelayHost("192.0.2.25", 25, implicit_tls=False, mx_lookup=False)


BODY = b"From: dev@groups.example.com\nSubject: Hello\n\nHello, group.\n"


#: BODY as the receiving server decodes it (CRLF line ends).
BODY_WIRE = BODY.replace(b"\n", b"\r\n")


#: A time in seconds since the epoch to start the clock at.
T0 = 1_700_000_000.0


def fixed_random() -> float:
    """The backoff jitter's random source: always the same draw."""
    return 0.25


#: The retry delay after the first transient failure, with L{fixed_random}
#: (300 s less 10 %: a value only the injected random source gives).
FIRST_DELAY = backoff.next_delay(1, random=fixed_random)


class ReactorClock(MemoryReactorClock):
    """
    A memory reactor whose timed calls run as a real reactor's do: a call
    scheduled at the current time by a timed call runs at the next
    L{advance}, not in the same one. So code that keeps rescheduling itself
    at once (a busy loop in a real reactor) shows up as a call always due,
    instead of hanging the test inside C{advance(0)}.
    """

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        self._sortCalls()
        now = self.seconds()
        for call in [c for c in self.calls if c.getTime() <= now]:
            if call in self.calls and call.getTime() <= now:  # not cancelled meanwhile
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)

    def due_calls(self) -> list[Any]:
        """The timed calls that the next iteration would run."""
        return [c for c in self.calls if c.getTime() <= self.seconds()]


@attrs.define
class Received:
    """One transaction as a server saw it."""

    connection: int
    sender: str
    params: list[str]
    recipients: list[str]
    data: bytes
    #: The parameters of each accepted RCPT (e.g. C{"NOTIFY=NEVER"}), in order.
    rcpt_params: list[str] = attrs.Factory(list)


class FakeMTA:
    """
    A recording SMTP server in memory. Recipients get C{250} unless
    C{replies} scripts another reply line for them; the data gets
    C{data_reply}. Only transactions that reached the final dot are
    recorded, with the recipients the server accepted.

    @ivar lose_after_dot: close the connection after the final dot, before
        replying (the window in which a message may be delivered twice).
    @ivar auth: the AUTH commands received.
    """

    def __init__(self, name: str, extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME")):
        self.name = name
        self.extensions = list(extensions)
        self.replies: dict[str, str] = {}
        self.data_reply = "250 2.0.0 Queued"
        self.lose_after_dot = False
        self.greeting = f"220 {name} ESMTP"
        self.auth_reply = "235 2.7.0 Authentication successful"
        #: A reply to send at the first line of message data, before the end.
        self.early_reply: str | None = None
        self.auth: list[str] = []
        self.received: list[Received] = []
        self.connections = 0

    def buildProtocol(self) -> _MTAProtocol:
        self.connections += 1
        return _MTAProtocol(self, self.connections)

    def transactions(self) -> list[tuple[str, list[str]]]:
        """(sender, accepted recipients) of each message received, in order."""
        return [(r.sender, r.recipients) for r in self.received]


class _MTAProtocol(LineReceiver):
    delimiter = b"\r\n"
    transport: Any  # an iosim FakeTransport

    def __init__(self, mta: FakeMTA, serial: int) -> None:
        self.mta = mta
        self.serial = serial
        self._reset()
        self._data: list[bytes] | None = None
        self._closing = False

    def _reset(self) -> None:
        self.sender: str | None = None
        self.params: list[str] = []
        self.recipients: list[str] = []
        self.rcpt_params: list[str] = []

    def reply(self, line: str) -> None:
        self.sendLine(line.encode())

    def connectionMade(self) -> None:
        self.reply(self.mta.greeting)

    def lineReceived(self, line: bytes) -> None:
        if self._closing:
            return
        if self._data is not None:
            self._data_line(line)
            return
        text = line.decode()
        verb = text.split(" ", 1)[0].upper()
        if verb == "EHLO":
            lines = [self.mta.name, *self.mta.extensions]
            for keyword in lines[:-1]:
                self.reply(f"250-{keyword}")
            self.reply(f"250 {lines[-1]}")
        elif verb == "MAIL":
            path, _, params = text[len("MAIL FROM:") :].partition(" ")
            self.sender = path.strip("<>")
            self.params = params.split()
            self.reply("250 2.1.0 Ok")
        elif verb == "RCPT":
            path, _, params = text[len("RCPT TO:") :].partition(" ")
            address = path.strip("<>")
            answer = self.mta.replies.get(address, "250 2.1.5 Ok")
            if answer.startswith("2"):
                self.recipients.append(address)
                self.rcpt_params.append(params)
            self.reply(answer)
        elif verb == "DATA":
            if self.sender is None or not self.recipients:
                self.reply("554 5.5.1 No valid recipients")
            else:
                self._data = []
                self.reply("354 End data with <CR><LF>.<CR><LF>")
        elif verb == "AUTH":
            self.mta.auth.append(text)
            self.reply(self.mta.auth_reply)
        elif verb == "RSET":
            self._reset()
            self.reply("250 2.0.0 Ok")
        elif verb == "QUIT":
            self.reply("221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.reply("502 5.5.1 Not implemented")

    def _data_line(self, line: bytes) -> None:
        assert self._data is not None
        if self.mta.early_reply is not None:
            self.reply(self.mta.early_reply)
            self.transport.loseConnection()
            self._data = None
            self._closing = True
            return
        if line != b".":
            self._data.append(line[1:] if line.startswith(b".") else line)
            return
        data, self._data = b"".join(x + b"\r\n" for x in self._data), None
        if self.mta.lose_after_dot:
            self.transport.loseConnection()
            return
        assert self.sender is not None
        self.mta.received.append(
            Received(self.serial, self.sender, self.params, self.recipients, data, self.rcpt_params)
        )
        self.reply(self.mta.data_reply)
        self._reset()


class _ClientTransport(iosim.FakeTransport):
    """The client's end of a connection; tells the network when it is lost."""

    def __init__(self, protocol: IProtocol, on_lost: Callable[[], None], **kw: Any) -> None:
        super().__init__(protocol, isServer=False, **kw)
        self._on_lost = on_lost

    def reportDisconnect(self) -> None:
        self._on_lost()
        super().reportDisconnect()


class FakeNetwork:
    """
    Hosts by IP address, each a L{FakeMTA}; an address with none refuses
    connections. Counts the connections open at once, per host and in all.

    @ivar attempts: every address a connection was attempted to, in order.
    @ivar peak: the most connections that were open at once, per address.
    @ivar peak_total: the most connections open at once, to any address.
    """

    def __init__(self, clock: ReactorClock) -> None:
        self.clock = clock
        self.hosts: dict[str, FakeMTA] = {}
        self.attempts: list[tuple[str, int]] = []
        self.open: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.peak_total = 0
        self._pumps: list[iosim.IOPump] = []

    def add(self, address: str, mta: FakeMTA | None = None) -> FakeMTA:
        mta = mta or FakeMTA(f"mx-{address}.example.net")
        self.hosts[address] = mta
        return mta

    def endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        return _Endpoint(self, host, port)

    def connect(self, host: str, port: int, factory: IProtocolFactory) -> Deferred[Any]:
        self.attempts.append((host, port))
        mta = self.hosts.get(host)
        if mta is None:
            return fail(ConnectionRefusedError(host, port))
        peer = IPv4Address("TCP", host, port)
        client = factory.buildProtocol(peer)
        assert client is not None
        server = mta.buildProtocol()

        def lost() -> None:
            self.open[host] -= 1

        self.open[host] += 1
        self.peak[host] = max(self.peak[host], self.open[host])
        self.peak_total = max(self.peak_total, sum(self.open.values()))
        client_io = _ClientTransport(
            client, lost, hostAddress=IPv4Address("TCP", "192.0.2.1", 40000), peerAddress=peer
        )
        server_io = iosim.FakeTransport(server, isServer=True, peerAddress=client_io.hostAddress)
        self._pumps.append(
            iosim.connect(server, server_io, client, client_io, greet=False, clock=self.clock)
        )
        return succeed(client)

    def flush(self) -> None:
        """
        Run due timers and move bytes until nothing moves and no timer is
        due: every conversation that can go on has gone on.
        """
        for _ in range(5000):
            self.clock.advance(0)
            moved = False
            for pump in list(self._pumps):
                moved = pump.pump(advanceClock=False) or moved
                if pump.clientIO.disconnected and pump.serverIO.disconnected:
                    self._pumps.remove(pump)
            waiting = any(p.clientIO.stream or p.serverIO.stream for p in self._pumps)
            if not (moved or waiting or self.clock.due_calls()):
                return
        raise AssertionError("the network never settled")


@implementer(IStreamClientEndpoint)
@attrs.frozen
class _Endpoint:
    network: FakeNetwork
    host: str
    port: int

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        return self.network.connect(self.host, self.port, factory)


class FakeMX:
    """
    An L{gsmail.outbound.mx.MXResolver} stand-in: each domain's hosts come
    from C{domains}; a domain mapped to an exception fails with it, and any
    other domain does not exist (as the real one, it fails only with
    L{MXLookupError}s).

    @ivar looked_up: the domains asked for, in order.
    @ivar marked_bad: the addresses marked bad, in order.
    """

    def __init__(self, domains: dict[str, list[MXHost] | Exception]) -> None:
        self.domains = domains
        self.looked_up: list[str] = []
        self.marked_bad: list[str] = []

    def hosts(self, domain: str) -> Deferred[list[MXHost]]:
        self.looked_up.append(domain)
        answer = self.domains.get(domain, NoSuchDomainError(domain))
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def relay_hosts(self, relay: RelayHost) -> Deferred[list[MXHost]]:
        return self.hosts(relay.host)

    def mark_bad(self, address: str, seconds: float = 3600) -> None:
        self.marked_bad.append(address)


#: The delay warning time used below: 4 hours, as the default.
WARN = 4 * 3600.0


class DeliveryTestCase(SynchronousTestCase):
    """
    A queue, a clock, a network with the smarthost C{192.0.2.25} on it, and a
    recording stand-in for the site's own inbound side.
    """

    def setUp(self) -> None:
        self.clock = ReactorClock()
        self.clock.advance(T0)
        self.network = FakeNetwork(self.clock)
        self.smarthost = self.network.add(SMARTHOST.host)
        self.queue_dir = self.mktemp()
        self.queue = OutboundQueue(self.queue_dir, clock=self.clock)
        self.queue.load()
        self.addCleanup(self.queue.close)
        #: (sender, recipient, message) of each local delivery.
        self.local: list[tuple[str, str, bytes]] = []
        self.local_reply = status.BOUNCE_RECORDED

    def deliver_locally(self, sender: str, recipient: str, path: str) -> Deferred[Reply]:
        with open(path, "rb") as f:
            self.local.append((sender, recipient, f.read()))
        return succeed(self.local_reply)

    def delivery(self, **overrides: Any) -> OutboundDelivery:
        """An L{OutboundDelivery} on the fake network, started."""
        arguments: dict[str, Any] = {
            "queue": self.queue,
            "reactor": self.clock,
            "hostname": HOSTNAME,
            "relayhost": SMARTHOST,
            "endpoint_factory": self.network.endpoint,
            "random": fixed_random,
        }
        arguments.update(overrides)
        delivery = OutboundDelivery(**arguments)
        delivery.start()
        self.addCleanup(self.stop, delivery)
        return delivery

    def stop(self, delivery: OutboundDelivery) -> None:
        """Stop C{delivery}; let the connections it kept open say QUIT."""
        stopped = delivery.stop()
        self.network.flush()
        self.successResultOf(stopped)

    def settle(self) -> None:
        """
        Let every conversation go on, then the connections kept open for
        more mail time out and close (L{CONNECTION_CACHE_TIME}).
        """
        self.network.flush()
        self.clock.advance(CONNECTION_CACHE_TIME)
        self.network.flush()

    def enqueue(self, sender: str, recipients: list[str], *, xverp: bool = False) -> Envelope:
        return self.successResultOf(self.queue.enqueue(sender, recipients, BODY, xverp=xverp))

    def states(self, envelope: Envelope) -> dict[str, str]:
        """Each recipient's state as the queue on disk has it."""
        for stored in read_queue(self.queue_dir):
            if stored.id == envelope.id:
                return {r.address: r.state for r in stored.recipients}
        raise AssertionError(f"{envelope.id} is not queued")

    def assertGone(self, envelope: Envelope) -> None:
        """The message is off the queue: envelope and data removed."""
        self.assertIsNone(self.queue.get(envelope.id))
        self.assertNotIn(envelope.id, [e.id for e in read_queue(self.queue_dir)])
        self.assertFalse(os.path.exists(self.queue.data_path(envelope.id)))

    def capture_log(self) -> list[LogEvent]:
        """The log events emitted from now until the end of the test."""
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return events

    def bounces(self, mta: FakeMTA) -> list[Received]:
        """The messages from the null sender (DSNs) that C{mta} received."""
        return [r for r in mta.received if r.sender == ""]
