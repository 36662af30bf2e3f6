"""
Delivery by MX in the integration tests: receiving servers on loopback
addresses (gsmail's own inbound protocol with scripted delivery cores:
L{ScriptedCore}, L{receiver}), an in-memory zone that points MX names at
them, gsmail's service wired to that network (L{start_network},
L{start_gsmail}), and submitting and reading the queue.
"""

from __future__ import annotations

import os
import smtplib
import socket
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.names import server
from twisted.trial.unittest import TestCase
from zope.interface import provider

from gsmail import status
from gsmail.addresses import Address, Route, RouteKind
from gsmail.inbound.protocol import (
    Envelope,
    InboundFactory,
    ServerSettings,
    Session,
    SMTPServer,
)
from gsmail.inbound.spool import SpooledMessage, remove
from gsmail.outbound.queue import Envelope as QueuedEnvelope
from gsmail.service import GsmailService
from gsmail.status import Reply
from tests.certificates import make_pki
from tests.util import eventually, listen_dns, make_config, start_service
from tests.zones import MX, A, MemoryZone

# The receiving hosts, by role.
GOOD = "127.0.0.2"  # accepts everything
GREET_421 = "127.0.0.3"  # 421 greeting (max_connections = 0)
REJECT_550 = "127.0.0.4"  # 550 5.1.1 to every RCPT
MAIL_451 = "127.0.0.5"  # 451 4.3.2 to MAIL
DOWN = "127.0.0.6"  # port bound, nothing listening: connection refused
STARTTLS = "127.0.0.7"  # accepts, offers STARTTLS
SLOW = "127.0.0.8"  # accepts, answers the final dot after SLOW_REPLY seconds

SLOW_REPLY = 1.5

SENDER = "owner@s.test"
GROUP = "example@groups.example.com"


# -- receiving servers --------------------------------------------------------
@attrs.frozen
class Received:
    """One transaction a receiving server accepted."""

    sender: str
    recipients: list[str]
    data: bytes
    tls: bool


class ScriptedCore:
    """
    A receiving server's delivery core with scripted replies: C{rcpt} to each
    RCPT, C{final} after the final dot (after C{delay} seconds). Records
    every accepted transaction in L{received}, when the final dot arrives.
    """

    def __init__(
        self,
        rcpt: Reply = status.RECIPIENT_OK,
        final: Reply = status.OK,
        delay: float = 0.0,
    ) -> None:
        self.rcpt = rcpt
        self.final = final
        self.delay = delay
        self.received: list[Received] = []
        self.rcpt_calls = 0

    def check_recipient(
        self, session: Session, recipient: Address
    ) -> Deferred[tuple[Reply, Route | None]]:
        self.rcpt_calls += 1
        route = Route(RouteKind.REMOTE, recipient) if self.rcpt.is_success else None
        return succeed((self.rcpt, route))

    def deliver(
        self, session: Session, envelope: Envelope, message: SpooledMessage
    ) -> Deferred[list[Reply]]:
        with open(message.path, "rb") as f:
            data = f.read()
        remove(message.path)
        self.received.append(
            Received(
                sender=str(envelope.sender) if envelope.sender else "",
                recipients=[str(r.recipient) for r in envelope.recipients],
                data=data,
                tls=session.tls,
            )
        )
        replies = [self.final] * len(envelope.recipients)
        if self.delay:
            return deferLater(reactor, self.delay, lambda: replies)
        return succeed(replies)

    def recipients(self) -> list[str]:
        """Every recipient accepted so far, in order, duplicates included."""
        return [r for t in self.received for r in t.recipients]


class CountingFactory(InboundFactory):
    """An inbound factory that counts the connections it was offered."""

    offered = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.offered += 1
        return super().buildProtocol(addr)


class RefuseMail(SMTPServer):
    """A server that answers every MAIL with C{451 4.3.2}."""

    def do_MAIL(self, arg: str) -> None:
        self.transport.write(b"451 4.3.2 System not accepting mail now\r\n")


def receiver(
    core: ScriptedCore,
    spool_dir: str,
    *,
    tls: Any = None,
    max_connections: int = 100,
    protocol: type[SMTPServer] | None = None,
) -> CountingFactory:
    """An ESMTP server factory over C{core}."""
    settings = ServerSettings(
        hostname="mx.receiver.test",
        max_connections=max_connections,
        idle_timeout=30,
        max_recipients=10_000,
        tls=tls,
    )
    factory = CountingFactory(core, settings, reactor, spool_dir=spool_dir)
    if protocol is not None:
        factory.protocol = protocol  # type: ignore[assignment]
    return factory


async def stop_receivers(ports: list[Any], factories: list[CountingFactory]) -> None:
    """Stop listening, then wait (bounded) until every server connection is gone."""
    for port in ports:
        await port.stopListening()
    await eventually(
        lambda: all(f.connections == 0 for f in factories),
        "the receiving servers' connections to close",
    )


ZONE = [
    # Failover: down, then 421, then a host that accepts (listed out of order).
    (b"a.test", MX(30, b"mx3.a.test")),
    (b"a.test", MX(10, b"mx1.a.test")),
    (b"a.test", MX(20, b"mx2.a.test")),
    (b"mx1.a.test", A(DOWN)),
    (b"mx2.a.test", A(GREET_421)),
    (b"mx3.a.test", A(GOOD)),
    # Only a host that refuses MAIL with 451.
    (b"b.test", MX(10, b"mx.b.test")),
    (b"mx.b.test", A(MAIL_451)),
    # A host that refuses the recipient with 550 5.1.1.
    (b"c.test", MX(10, b"mx.c.test")),
    (b"mx.c.test", A(REJECT_550)),
    # 451 to MAIL at the best host, a backup that accepts.
    (b"d.test", MX(10, b"mx1.d.test")),
    (b"d.test", MX(20, b"mx2.d.test")),
    (b"mx1.d.test", A(MAIL_451)),
    (b"mx2.d.test", A(GOOD)),
    # RFC 7505 null MX.
    (b"nullmx.test", MX(0, b"")),
    # The foreign sender's domain: its DSNs land at the accepting host.
    (b"s.test", MX(10, b"mx.s.test")),
    (b"mx.s.test", A(GOOD)),
    # A host without STARTTLS, and one with it.
    (b"plain.test", MX(10, b"mx.plain.test")),
    (b"mx.plain.test", A(GOOD)),
    (b"tls.test", MX(10, b"mx.tls.test")),
    (b"mx.tls.test", A(STARTTLS)),
    # A host that is slow to answer the final dot.
    (b"slow.test", MX(10, b"mx.slow.test")),
    (b"mx.slow.test", A(SLOW)),
    # nx.test has no records: NXDOMAIN.
]


def message(subject: str) -> bytes:
    """A small message with a unique Message-ID."""
    return (
        f"From: {SENDER}\r\nTo: someone\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}.{os.urandom(4).hex()}@s.test>\r\n\r\n"
        f"Body of {subject}.\r\n"
    ).encode()


def submit(
    port: int, sender: str, recipients: list[str], data: bytes, *, xverp: bool = False
) -> str:
    """
    Submit a message (blocking: run it in a thread); return its queue id,
    from the C{250 2.0.0 Queued as ID} reply.
    """
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        code, reply = s.mail(sender, ["XVERP"] if xverp else [])
        assert code == 250, (code, reply)
        for recipient in recipients:
            code, reply = s.rcpt(recipient)
            assert code == 250, (code, reply)
        code, reply = s.data(data)
        assert code == 250, (code, reply)
        return reply.decode().rsplit(" ", 1)[-1]


def capture_log(test: TestCase) -> list[LogEvent]:
    """Every log event from now until the test ends."""
    events: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


@attrs.define
class Network:
    """The receivers, the down host and the DNS server of one test."""

    port: int
    dns_port: int
    cores: dict[str, ScriptedCore]
    factories: dict[str, CountingFactory]


async def start_network(test: TestCase, directory: str) -> Network:
    """
    Start the receivers on 127.0.0.2.. on one port P (retrying with another
    P when one of the addresses has P taken, bounded), bind the down host's
    P without listening, and serve L{ZONE} on 127.0.0.1 (UDP and TCP).
    """
    spool = os.path.join(directory, "receivers")
    os.makedirs(spool, exist_ok=True)
    pki = make_pki("mx.tls.test")
    cores = {
        GOOD: ScriptedCore(),
        GREET_421: ScriptedCore(),
        REJECT_550: ScriptedCore(rcpt=Reply(550, "5.1.1", "No such user here")),
        MAIL_451: ScriptedCore(),
        STARTTLS: ScriptedCore(),
        SLOW: ScriptedCore(delay=SLOW_REPLY),
    }
    factories = {
        GOOD: receiver(cores[GOOD], spool),
        GREET_421: receiver(cores[GREET_421], spool, max_connections=0),
        REJECT_550: receiver(cores[REJECT_550], spool),
        MAIL_451: receiver(cores[MAIL_451], spool, protocol=RefuseMail),
        STARTTLS: receiver(cores[STARTTLS], spool, tls=pki.server_options()),
        SLOW: receiver(cores[SLOW], spool),
    }
    for _ in range(20):
        ports: list[Any] = []
        down = socket.socket()
        try:
            for address, factory in factories.items():
                port = ports[0].getHost().port if ports else 0
                ports.append(reactor.listenTCP(port, factory, interface=address))
            down.bind((DOWN, ports[0].getHost().port))
        except (CannotListenError, OSError):
            down.close()
            for p in ports:
                await p.stopListening()
            continue
        break
    else:
        raise AssertionError("no port was free on all of 127.0.0.2-8 in 20 tries")
    test.addCleanup(stop_receivers, ports, list(factories.values()))
    test.addCleanup(down.close)

    zone = server.DNSServerFactory(authorities=[MemoryZone(b"test", ZONE)], verbose=0)
    zone.noisy = False
    udp, tcp = listen_dns(reactor, zone)
    test.addCleanup(udp.stopListening)
    test.addCleanup(tcp.stopListening)
    return Network(ports[0].getHost().port, udp.getHost().port, cores, factories)


def start_gsmail(test: TestCase, directory: str, network: Network, **overrides: Any) -> Any:
    """gsmail with its submission listener, delivering by MX through the test zone."""
    config = make_config(
        directory,
        smtp_endpoint="",
        lmtp_endpoint="",
        submission_endpoint="tcp:0:interface=127.0.0.1",
        queue_dir=os.path.join(directory, "queue"),
        dns_servers=(f"127.0.0.1:{network.dns_port}",),
        mx_port=network.port,
        **overrides,
    )
    return start_service(test, config)


def queued(service: GsmailService, queue_id: str) -> QueuedEnvelope | None:
    """The message's envelope while it is queued, else C{None}."""
    assert service.queue is not None
    return service.queue.get(queue_id)


def envelopes(service: GsmailService) -> list[QueuedEnvelope]:
    """Every message in gsmail's outbound queue."""
    assert service.queue is not None
    return service.queue.envelopes()


def attempted(service: GsmailService, queue_id: str) -> Callable[[], bool]:
    """A check: every recipient of the message has had an attempt."""

    def check() -> bool:
        envelope = queued(service, queue_id)
        return envelope is not None and all(r.attempts >= 1 for r in envelope.recipients)

    return check


def gone(service: GsmailService, queue_id: str) -> Callable[[], bool]:
    """A check: the message has left the queue (every recipient done)."""
    return lambda: queued(service, queue_id) is None
