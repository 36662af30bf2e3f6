# -*- test-case-name: tests.integration.test_mta_sts -*-
"""
MTA-STS (RFC 8461) end to end, over real sockets on loopback addresses:

  - a C{twisted.names} zone on 127.0.0.1 answers the C{_mta-sts} TXT
    records, the MX records and the addresses (C{mta-sts.DOMAIN} is
    127.0.0.1);
  - a policy server (C{twisted.web}, HTTPS with a certificate from a test
    CA made here with C{cryptography}) serves each domain's policy;
  - receiving servers (gsmail's inbound protocol) on 127.0.0.2 and up, one
    port: one with STARTTLS and a certificate for its MX name, one with a
    certificate for another name, one without STARTTLS;
  - gsmail's outbound queue and delivery, whose L{MTASTS} trusts the test
    CA and fetches from the policy server's port (injected: no system trust
    store or /etc/hosts is touched).

Enforce mode skips an MX host the policy does not list and keeps the mail
queued (C{4.7.5}) when the certificate does not match; testing mode
delivers and logs; a restart with the policy server failing still applies
the cached policy.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.names import client, dns, server
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from gsmail.handoff import SerialThread
from gsmail.outbound.delivery import MX_TLS, OutboundDelivery
from gsmail.outbound.mtasts import MTASTS, STSClientTLS
from gsmail.outbound.mtasts.cache import PolicyCache
from gsmail.outbound.mx import MXResolver
from gsmail.outbound.queue import PENDING, OutboundQueue
from gsmail.outbound.tlsrpt import TLSReportCounts, read_day
from gsmail.service import GsmailService
from tests.certificates import TestCA, new_ca
from tests.integration.mx import ScriptedCore, capture_log, receiver, stop_receivers
from tests.util import eventually, listen_dns, make_config, start_service
from tests.zones import MX, A, MemoryZone

SENDER = "owner@groups.example.com"

VERIFIED = "127.0.0.2"  # STARTTLS, certificate for its MX names
WRONG_NAME = "127.0.0.3"  # STARTTLS, certificate for wrong.example.org
PLAIN = "127.0.0.4"  # no STARTTLS

VERIFIED_NAMES = ("mx.enforce.test", "mx.testing.test", "mx.cached.test")


def TXT(text: bytes) -> dns.Record_TXT:
    return dns.Record_TXT(text, ttl=300)


ZONE = [
    # enforce.test: the best MX is not in the policy (and has no TLS).
    (b"enforce.test", MX(10, b"unlisted.enforce.test")),
    (b"enforce.test", MX(20, b"mx.enforce.test")),
    (b"unlisted.enforce.test", A(PLAIN)),
    (b"mx.enforce.test", A(VERIFIED)),
    (b"_mta-sts.enforce.test", TXT(b"v=STSv1; id=e1;")),
    (b"mta-sts.enforce.test", A("127.0.0.1")),
    # badcert.test: its only MX shows a certificate for another name.
    (b"badcert.test", MX(10, b"mx.badcert.test")),
    (b"mx.badcert.test", A(WRONG_NAME)),
    (b"_mta-sts.badcert.test", TXT(b"v=STSv1; id=b1;")),
    (b"mta-sts.badcert.test", A("127.0.0.1")),
    # testing.test: an unlisted MX with a certificate for another name.
    (b"testing.test", MX(10, b"mx.testing.test")),
    (b"mx.testing.test", A(WRONG_NAME)),
    (b"_mta-sts.testing.test", TXT(b"v=STSv1; id=t1;")),
    (b"mta-sts.testing.test", A("127.0.0.1")),
    # cached.test: like enforce.test, for the restart.
    (b"cached.test", MX(10, b"unlisted.cached.test")),
    (b"cached.test", MX(20, b"mx.cached.test")),
    (b"unlisted.cached.test", A(PLAIN)),
    (b"mx.cached.test", A(VERIFIED)),
    (b"_mta-sts.cached.test", TXT(b"v=STSv1; id=c1;")),
    (b"mta-sts.cached.test", A("127.0.0.1")),
    # plain.test: no policy at all.
    (b"plain.test", MX(10, b"mx.plain.test")),
    (b"mx.plain.test", A(PLAIN)),
]

POLICIES = {
    "mta-sts.enforce.test": b"version: STSv1\r\nmode: enforce\r\nmx: mx.enforce.test\r\nmax_age: 86400\r\n",
    "mta-sts.badcert.test": b"version: STSv1\r\nmode: enforce\r\nmx: *.badcert.test\r\nmax_age: 86400\r\n",
    "mta-sts.testing.test": b"version: STSv1\r\nmode: testing\r\nmx: *.elsewhere.test\r\nmax_age: 86400\r\n",
    "mta-sts.cached.test": b"version: STSv1\r\nmode: enforce\r\nmx: mx.cached.test\r\nmax_age: 86400\r\n",
}


# -- the policy server ------------------------------------------------------------------
class PolicyPages(Resource):
    """
    C{/.well-known/mta-sts.txt} of each C{mta-sts.DOMAIN}, by the Host
    header; C{status} other than 200 answers every request with it.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.status = 200
        self.requests: list[str] = []

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        host = request.getRequestHostname().decode()
        self.requests.append(host)
        policy = POLICIES.get(host)
        if self.status != 200 or policy is None or request.path != b"/.well-known/mta-sts.txt":
            request.setResponseCode(self.status if self.status != 200 else 404)
            return b"no"
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return policy


@attrs.define
class Network:
    port: int
    dns_port: int
    https_port: int
    cores: dict[str, ScriptedCore]
    pages: PolicyPages
    ca: TestCA
    zone: MemoryZone


async def start_network(test: TestCase, directory: str) -> Network:
    """The zone, the policy server and the receivers (bounded retries for a shared port)."""
    ca = new_ca()
    spool = os.path.join(directory, "receivers")
    os.makedirs(spool, exist_ok=True)
    cores = {VERIFIED: ScriptedCore(), WRONG_NAME: ScriptedCore(), PLAIN: ScriptedCore()}
    factories = {
        VERIFIED: receiver(cores[VERIFIED], spool, tls=ca.server_options(*VERIFIED_NAMES)),
        WRONG_NAME: receiver(cores[WRONG_NAME], spool, tls=ca.server_options("wrong.example.org")),
        PLAIN: receiver(cores[PLAIN], spool),
    }
    for _ in range(20):
        ports: list[Any] = []
        try:
            for address, factory in factories.items():
                port = ports[0].getHost().port if ports else 0
                ports.append(reactor.listenTCP(port, factory, interface=address))
        except (CannotListenError, OSError):
            for p in ports:
                await p.stopListening()
            continue
        break
    else:
        raise AssertionError("no port was free on all of 127.0.0.2-4 in 20 tries")
    test.addCleanup(stop_receivers, ports, list(factories.values()))

    authority = MemoryZone(b"test", ZONE)
    zone = server.DNSServerFactory(authorities=[authority], verbose=0)
    zone.noisy = False
    udp, tcp = listen_dns(reactor, zone)
    test.addCleanup(udp.stopListening)
    test.addCleanup(tcp.stopListening)

    pages = PolicyPages()
    site = Site(pages)
    site.noisy = False
    https = reactor.listenSSL(0, site, ca.server_options(*POLICIES), interface="127.0.0.1")
    test.addCleanup(https.stopListening)
    return Network(
        ports[0].getHost().port,
        udp.getHost().port,
        https.getHost().port,
        cores,
        pages,
        ca,
        authority,
    )


@attrs.define
class Outbound:
    """gsmail's outbound side for one test: queue, delivery, MTA-STS, counts."""

    queue: OutboundQueue
    delivery: OutboundDelivery
    sts: MTASTS
    counts: TLSReportCounts
    resolver: Any

    stopped: bool = False

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        await self.delivery.stop()
        await self.counts.flush()
        await self.queue.close()


def start_outbound(test: TestCase, directory: str, network: Network) -> Outbound:
    """The queue in C{directory}/queue, delivery by MX through the zone, MTA-STS on."""
    sync = SerialThread(reactor, "test-sync")
    test.addCleanup(sync.stop)
    queue = OutboundQueue(os.path.join(directory, "queue"), clock=reactor, sync=sync)
    queue.load()
    resolver = client.Resolver(servers=[("127.0.0.1", network.dns_port)], reactor=reactor)
    mx = MXResolver(resolver, reactor)
    cache_dir = os.path.join(directory, "mta-sts")
    counts = TLSReportCounts(os.path.join(cache_dir, "tlsrpt"), reactor, sync)
    counts.load()
    cache = PolicyCache(cache_dir, reactor, sync)
    cache.load()
    sts = MTASTS(
        reactor=reactor,
        resolver=resolver,
        addresses=mx.host_addresses,
        cache=cache,
        timeout=10,
        trust_root=network.ca.trust_root(),
        https_port=network.https_port,
    )
    delivery = OutboundDelivery(
        queue=queue,
        reactor=reactor,
        hostname="mx.groups.example.com",
        mx=mx,
        mx_tls=MX_TLS,
        mx_port=network.port,
        mta_sts=sts,
        tls_report=counts,
        connection_cache_time=0,
        random=lambda: 0.5,
    )
    delivery.start()
    outbound = Outbound(queue, delivery, sts, counts, resolver)
    test.addCleanup(outbound.stop)
    return outbound


def message(subject: str) -> bytes:
    return f"From: {SENDER}\r\nSubject: {subject}\r\n\r\nBody.\r\n".encode()


class MTASTSDeliveryTests(TestCase):
    """Delivery by MX under MTA-STS policies."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.directory = os.path.abspath(self.mktemp())
        self.network = await start_network(self, self.directory)
        self.events = capture_log(self)

    async def send(self, outbound: Outbound, recipient: str) -> str:
        envelope = await outbound.queue.enqueue(SENDER, [recipient], message(recipient))
        outbound.delivery.kick()
        return str(envelope.id)

    def logged(self, text: str) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if text in formatEvent(e)]

    async def test_enforce_skips_unlisted_mx(self) -> None:
        """
        Enforce: the best MX, not in the policy (and without TLS), gets
        nothing; the listed one gets the message over verified TLS.
        """
        outbound = start_outbound(self, self.directory, self.network)
        queue_id = await self.send(outbound, "member@enforce.test")
        await eventually(lambda: outbound.queue.get(queue_id) is None, "delivery")
        cores = self.network.cores
        self.assertEqual(cores[PLAIN].received, [])
        self.assertEqual(
            [(r.recipients, r.tls) for r in cores[VERIFIED].received],
            [(["member@enforce.test"], True)],
        )
        self.assertEqual(self.network.pages.requests, ["mta-sts.enforce.test"])
        self.assertEqual(
            len(self.logged("unlisted.enforce.test of enforce.test is not listed in its policy")), 1
        )
        await outbound.counts.flush()
        counts = read_day(outbound.counts.directory, outbound.counts._day)
        self.assertEqual(counts["enforce.test"]["success"], 1)
        self.assertEqual(
            counts["enforce.test"]["failures"],
            {"validation-failure": {"unlisted.enforce.test": 1}},
        )

    async def test_enforce_certificate_mismatch_stays_queued(self) -> None:
        """
        Enforce: an MX whose certificate is for another name gets nothing,
        and the message stays queued with 451 4.7.5.
        """
        outbound = start_outbound(self, self.directory, self.network)
        queue_id = await self.send(outbound, "member@badcert.test")
        await eventually(attempted_by(outbound, queue_id), "an attempt")
        envelope = outbound.queue.get(queue_id)
        assert envelope is not None
        recipient = envelope.recipients[0]
        self.assertEqual(recipient.state, PENDING)
        self.assertTrue(recipient.last_reply.startswith("451 4.7.5 "), recipient.last_reply)
        self.assertIn("not issued for mx.badcert.test", recipient.last_reply)
        self.assertEqual(self.network.cores[WRONG_NAME].received, [])
        self.assertEqual(len(self.logged("MTA-STS enforce: mx.badcert.test")), 1)

    async def test_testing_delivers_and_logs(self) -> None:
        """
        Testing: the unlisted MX with a certificate for another name still
        gets the message (over TLS); each failure is logged once.
        """
        outbound = start_outbound(self, self.directory, self.network)
        queue_id = await self.send(outbound, "member@testing.test")
        await eventually(lambda: outbound.queue.get(queue_id) is None, "delivery")
        self.assertEqual(
            [(r.recipients, r.tls) for r in self.network.cores[WRONG_NAME].received],
            [(["member@testing.test"], True)],
        )
        self.assertEqual(
            len(self.logged("MTA-STS testing: MX host mx.testing.test of testing.test is not")), 1
        )
        self.assertEqual(
            len(self.logged("MTA-STS testing: mx.testing.test of testing.test: certificate not")),
            1,
        )

    async def test_no_policy_as_before(self) -> None:
        """A domain without a policy gets its mail as before (here in clear)."""
        outbound = start_outbound(self, self.directory, self.network)
        queue_id = await self.send(outbound, "member@plain.test")
        await eventually(lambda: outbound.queue.get(queue_id) is None, "delivery")
        self.assertEqual(
            [(r.recipients, r.tls) for r in self.network.cores[PLAIN].received],
            [(["member@plain.test"], False)],
        )
        self.assertEqual(self.network.pages.requests, [])

    async def test_cached_policy_survives_restart_and_fetch_failure(self) -> None:
        """
        After a restart, with a new policy id published and the policy
        server failing, the cached enforce policy still applies: the
        unlisted MX gets nothing.
        """
        first = start_outbound(self, self.directory, self.network)
        queue_id = await self.send(first, "one@cached.test")
        await eventually(lambda: first.queue.get(queue_id) is None, "delivery")
        await first.stop()
        self.assertEqual(os.listdir(first.sts.cache.directory).count("cached.test.json"), 1)

        # A new id makes gsmail fetch again; the fetch fails (HTTP 500).
        self.network.zone.records[b"_mta-sts.cached.test"] = [TXT(b"v=STSv1; id=c2;")]
        self.network.pages.status = 500
        restarted = start_outbound(self, self.directory, self.network)
        queue_id = await self.send(restarted, "two@cached.test")
        await eventually(lambda: restarted.queue.get(queue_id) is None, "delivery")
        self.assertEqual(self.network.cores[PLAIN].received, [])
        self.assertEqual(
            [r.recipients for r in self.network.cores[VERIFIED].received],
            [["one@cached.test"], ["two@cached.test"]],
        )
        self.assertEqual(self.network.pages.requests, ["mta-sts.cached.test"] * 2)
        self.assertEqual(len(self.logged("no policy from mta-sts.cached.test")), 1)
        self.assertEqual(len(self.logged("keeping the cached one")), 1)

    async def test_policy_server_not_trusted(self) -> None:
        """
        A policy server whose certificate does not chain to the trust root
        gives no policy (C{sts-webpki-invalid}, logged): mail goes as before.
        """
        outbound = start_outbound(self, self.directory, self.network)
        outbound.sts = MTASTS(
            reactor=reactor,
            resolver=outbound.resolver,
            addresses=outbound.delivery.mx.host_addresses,  # type: ignore[union-attr]
            cache=outbound.sts.cache,
            trust_root=new_ca().trust_root(),
            https_port=self.network.https_port,
        )
        outbound.delivery.mta_sts = outbound.sts
        queue_id = await self.send(outbound, "member@enforce.test")
        await eventually(lambda: outbound.queue.get(queue_id) is None, "delivery")
        self.assertEqual(
            [r.recipients for r in self.network.cores[PLAIN].received], [["member@enforce.test"]]
        )
        self.assertEqual(len(self.logged("sts-webpki-invalid")), 1)
        self.assertIsNone(outbound.sts.cache.get("enforce.test"))


def attempted_by(outbound: Outbound, queue_id: str) -> Any:
    """A check: every recipient of the message has had an attempt."""

    def check() -> bool:
        envelope = outbound.queue.get(queue_id)
        return envelope is not None and all(r.attempts >= 1 for r in envelope.recipients)

    return check


@implementer(IHandshakeListener)
class HandshakeWatcher(Protocol):
    """A client protocol that reports whether the TLS handshake completed."""

    def __init__(self) -> None:
        self.outcome: Deferred[str] = Deferred()

    def handshakeCompleted(self) -> None:  # noqa: N802
        self.outcome.callback("completed")
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if not self.outcome.called:
            self.outcome.callback("failed")


class STSClientTLSTests(TestCase):
    """L{STSClientTLS} against a real TLS server on 127.0.0.1."""

    async def handshake(self, tls: STSClientTLS, ca: TestCA, name: str) -> str:
        server = reactor.listenSSL(
            0, Factory.forProtocol(Protocol), ca.server_options(name), interface="127.0.0.1"
        )
        self.addCleanup(server.stopListening)
        endpoint = wrapClientTLS(
            tls, TCP4ClientEndpoint(reactor, "127.0.0.1", server.getHost().port)
        )
        watcher = HandshakeWatcher()
        await endpoint.connect(Factory.forProtocol(lambda: watcher))
        outcome = await watcher.outcome
        await deferLater(reactor, 0.01)  # let the server side see the close
        return outcome

    async def test_verified(self) -> None:
        """A certificate from the trusted CA for the MX name: the handshake completes."""
        ca = new_ca()
        tls = STSClientTLS("mx.example.test", enforce=True, trust_root=ca.trust_root())
        self.assertEqual(await self.handshake(tls, ca, "mx.example.test"), "completed")
        self.assertIsNone(tls.failure)

    async def test_wrong_name(self) -> None:
        """Enforce: a certificate for another name ends the handshake."""
        ca = new_ca()
        tls = STSClientTLS("mx.example.test", enforce=True, trust_root=ca.trust_root())
        self.assertEqual(await self.handshake(tls, ca, "other.example.test"), "failed")
        self.assertEqual(tls.failure, "certificate-host-mismatch")

    async def test_untrusted(self) -> None:
        """Enforce: a certificate from a CA not trusted ends the handshake."""
        ca = new_ca()
        tls = STSClientTLS("mx.example.test", enforce=True, trust_root=new_ca().trust_root())
        self.assertEqual(await self.handshake(tls, ca, "mx.example.test"), "failed")
        self.assertEqual(tls.failure, "certificate-not-trusted")

    async def test_testing_untrusted(self) -> None:
        """Testing: the same certificate is recorded as a failure; the handshake completes."""
        ca = new_ca()
        tls = STSClientTLS("mx.example.test", enforce=False, trust_root=new_ca().trust_root())
        self.assertEqual(await self.handshake(tls, ca, "mx.example.test"), "completed")
        self.assertEqual(tls.failure, "certificate-not-trusted")


class ServiceTests(TestCase):
    """The service builds MTA-STS for MX delivery only, from the options."""

    def start(self, **overrides: Any) -> GsmailService:
        directory = os.path.abspath(self.mktemp())
        config = make_config(
            directory,
            smtp_endpoint="",
            lmtp_endpoint="",
            submission_endpoint="tcp:0:interface=127.0.0.1",
            queue_dir=os.path.join(directory, "queue"),
            dns_servers=("127.0.0.1:9",),
            **overrides,
        )
        return start_service(self, config)

    def test_mx_delivery(self) -> None:
        """By MX: policies cached in mta-sts beside the ledger; TLS-RPT counts with tls_rpt."""
        service = self.start(tls_rpt=True)
        assert service.mta_sts is not None and service.outbound is not None
        self.assertIs(service.outbound.mta_sts, service.mta_sts)
        directory = os.path.join(os.path.dirname(service.config.ledger_path), "mta-sts")
        self.assertEqual(service.mta_sts.cache.directory, directory)
        self.assertTrue(os.path.isdir(os.path.join(directory, "tlsrpt")))
        self.assertIs(service.outbound.tls_report, service.tls_report)

    def test_smarthost_or_off(self) -> None:
        """With a relayhost, or mta_sts = false, there is no MTA-STS."""
        for overrides in ({"relayhost": "[127.0.0.1]:9"}, {"mta_sts": False}):
            with self.subTest(**overrides):
                service = self.start(**overrides)
                assert service.outbound is not None
                self.assertIsNone(service.mta_sts)
                self.assertIsNone(service.outbound.mta_sts)
