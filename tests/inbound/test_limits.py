"""
The abuse limits as a client meets them on the listeners (gsmail.anvil and
the error, junk, deadline and data-rate limits of gsmail.inbound.protocol),
with the real delivery core and a GroupServer double, on a clock.
"""

from __future__ import annotations

import os
from base64 import b64encode
from ipaddress import ip_network
from typing import Any

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gsmail.anvil import Anvil, ClientLimits
from gsmail.inbound.delivery import DeliveryCore
from gsmail.inbound.parts import with_backlog
from gsmail.inbound.protocol import InboundFactory, ServerSettings
from gsmail.ledger import PostLedger
from gsmail.outbound.submission import PasswordChecker, SubmissionCore, SubmissionFactory
from tests.fakes import FakeGroupServer, FakeQueue, TLSStringTransport, codes

SETTINGS = ServerSettings(hostname="mx.groups.example.com", idle_timeout=60, tls=object())


class LimitsTestCase(SynchronousTestCase):
    lmtp = False

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.gs = FakeGroupServer({"dev@groups.example.com": "dev"})
        directory = self.mktemp()
        os.makedirs(directory)
        self.ledger = PostLedger(os.path.join(directory, "ledger"), clock=self.clock)
        self.ledger.open()
        self.addCleanup(self.ledger.close)
        self.core = DeliveryCore(
            client=self.gs,  # type: ignore[arg-type]
            ledger=self.ledger,
            clock=self.clock,
            hostname="mx.groups.example.com",
            domains=("groups.example.com",),
            reply_deadline=540.0,
        )
        self.spool = os.path.join(directory, "spool")
        os.makedirs(self.spool)
        self.factory = self.make_factory(SETTINGS)

    def make_factory(self, settings: ServerSettings, **limits: Any) -> InboundFactory:
        limits.setdefault("exceptions", ())
        return InboundFactory(
            self.core,
            settings,
            self.clock,
            lmtp=self.lmtp,
            spool_dir=self.spool,
            anvil=Anvil(ClientLimits(**limits), self.clock),
        )

    def connect(
        self, host: str = "192.0.2.1", factory: InboundFactory | None = None
    ) -> tuple[Any, StringTransport]:
        factory = factory or self.factory
        peer = IPv4Address("TCP", host, 40000)
        transport = StringTransport(peerAddress=peer)
        proto = factory.buildProtocol(peer)
        proto.makeConnection(transport)
        return proto, transport

    def advance(self, seconds: int) -> None:
        """Advance the clock a second at a time (delays made on the way run too)."""
        for _ in range(seconds):
            self.clock.advance(1)

    def close(self, proto: Any) -> None:
        proto.connectionLost(Failure(ConnectionDone()))


class ConnectionLimitTests(LimitsTestCase):
    """Per-client connections on a listener."""

    def test_count_limit_on_the_listener(self) -> None:
        """
        The client's connection past the limit gets 421 4.7.0 instead of the
        greeting and is closed; another client is greeted; closing one lets
        the first client in again.
        """
        self.factory = self.make_factory(SETTINGS, connection_count=2)
        first, _ = self.connect()
        self.connect()
        proto, t = self.connect()
        self.assertEqual(codes(t), ["421 4.7.0"])
        self.assertTrue(t.disconnecting)
        self.close(proto)
        _, t = self.connect("192.0.2.2")
        self.assertEqual(codes(t), ["220"])
        self.close(first)
        _, t = self.connect()
        self.assertEqual(codes(t), ["220"])

    def test_exceptions_and_unix_sockets(self) -> None:
        """An excepted network and a UNIX-socket client are never limited."""
        factory = self.make_factory(
            SETTINGS, connection_count=1, exceptions=(ip_network("192.0.2.0/24"),)
        )
        for _ in range(3):
            _, t = self.connect(factory=factory)
            self.assertEqual(codes(t), ["220"])
        self.factory = self.make_factory(SETTINGS, connection_count=1)
        for _ in range(3):
            transport = StringTransport(peerAddress=UNIXAddress(None))
            proto = self.factory.buildProtocol(UNIXAddress(None))
            proto.makeConnection(transport)
            self.assertEqual(codes(transport), ["220"])


class LMTPExemptTests(LimitsTestCase):
    """LMTP's client is the site's own MTA."""

    lmtp = True

    def test_lmtp_not_limited(self) -> None:
        """An LMTP client is neither connection-limited nor delayed for unknown groups."""
        self.factory = self.make_factory(SETTINGS, connection_count=1)
        proto, _ = self.connect()
        proto, t = self.connect()
        proto.dataReceived(b"LHLO x\r\nMAIL FROM:<a@example.org>\r\n")
        proto.dataReceived(
            b"".join(b"RCPT TO:<nosuch%d@groups.example.com>\r\n" % i for i in range(30))
        )
        self.assertEqual(codes(t).count("550 5.1.1"), 30)


class ProbeTests(LimitsTestCase):
    """Recipient probing: refusals are errors (Postfix's smtpd error limits)."""

    def probe(self, count: int) -> tuple[Any, StringTransport]:
        proto, t = self.connect()
        proto.dataReceived(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\n")
        proto.dataReceived(
            b"".join(b"RCPT TO:<nosuch%d@groups.example.com>\r\n" % i for i in range(count))
        )
        return proto, t

    def test_error_sleep_then_hard_limit(self) -> None:
        """
        The first 10 unknown groups are answered at once; each further one
        after 1 s (and the next RCPT waits for it); the 20th is followed by
        421 4.7.0 and the connection is closed. GroupServer was asked 20
        times, not 1,000.
        """
        proto, t = self.probe(1000)
        self.assertEqual(codes(t)[-10:], ["550 5.1.1"] * 10)
        self.assertEqual(len(self.gs.lookups), 11)  # the 11th waits to be answered
        self.clock.advance(0.5)
        self.assertEqual(codes(t).count("550 5.1.1"), 10)
        for n in range(11, 19):
            self.clock.advance(1)
            self.assertEqual(codes(t).count("550 5.1.1"), n)
        self.assertFalse(t.disconnecting)
        self.clock.advance(1)  # the 19th, then the 20th at once: the hard limit, no sleep
        self.assertEqual(codes(t)[-3:], ["550 5.1.1", "550 5.1.1", "421 4.7.0"])
        self.assertTrue(t.disconnecting)
        self.assertEqual(len(self.gs.lookups), 20)
        self.clock.advance(100)
        self.assertEqual(len(self.gs.lookups), 20)

    def test_relay_attempts_count(self) -> None:
        """Relay attempts (550 5.7.1) are errors too."""
        proto, t = self.connect()
        proto.dataReceived(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\n")
        proto.dataReceived(b"RCPT TO:<x@example.net>\r\n" * 25)
        self.advance(20)
        self.assertEqual(codes(t)[-2:], ["550 5.7.1", "421 4.7.0"])
        self.assertEqual(codes(t).count("550 5.7.1"), 20)

    def test_accepted_message_resets(self) -> None:
        """A message accepted starts the error count again (as Postfix): a mixed session goes on."""
        proto, t = self.probe(9)
        proto.dataReceived(b"RCPT TO:<dev@groups.example.com>\r\nDATA\r\n")
        proto.dataReceived(b"Subject: s\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(codes(t)[-1], "250 2.0.0")
        proto.dataReceived(b"MAIL FROM:<a@example.org>\r\n")
        proto.dataReceived(b"RCPT TO:<nosuch-b%d@groups.example.com>\r\n" % 0 * 1)
        proto.dataReceived(
            b"".join(b"RCPT TO:<nosuch-c%d@groups.example.com>\r\n" % i for i in range(9))
        )
        # 10 errors since the message: none delayed yet.
        self.assertEqual(codes(t).count("550 5.1.1"), 19)
        self.assertFalse(t.disconnecting)

    def test_exempt_client_not_delayed(self) -> None:
        """A client in the exceptions (a local Postfix) gets every refusal at once."""
        self.factory = self.make_factory(SETTINGS, exceptions=(ip_network("192.0.2.1/32"),))
        _, t = self.probe(50)
        self.assertEqual(codes(t).count("550 5.1.1"), 50)
        self.assertFalse(t.disconnecting)

    def test_bad_commands_close_any_client(self) -> None:
        """20 bad commands close even an exempt client's session (as before the limits)."""
        self.factory = self.make_factory(SETTINGS, exceptions=(ip_network("192.0.2.1/32"),))
        proto, t = self.connect()
        proto.dataReceived(b"FOO\r\n" * 25)
        self.assertEqual(codes(t)[-2:], ["500 5.5.2", "421 4.7.0"])
        self.assertEqual(codes(t).count("500 5.5.2"), 20)


class LookupCapTests(LimitsTestCase):
    """Caps on GroupServer lookups."""

    def test_session_cap(self) -> None:
        """
        Past session_lookup_limit a recipient needing a lookup gets 450
        4.7.1 and GroupServer is not asked; a cached group still passes.
        """
        settings = ServerSettings(
            hostname="mx.groups.example.com", session_lookup_limit=3, hard_error_limit=0
        )
        self.factory = self.make_factory(settings)
        proto, t = self.connect()
        proto.dataReceived(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\n")
        proto.dataReceived(b"RCPT TO:<dev@groups.example.com>\r\n")
        proto.dataReceived(
            b"".join(b"RCPT TO:<nosuch%d@groups.example.com>\r\n" % i for i in range(5))
        )
        proto.dataReceived(b"RCPT TO:<dev@groups.example.com>\r\n")
        self.assertEqual(
            codes(t)[3:],
            ["250 2.1.5", "550 5.1.1", "550 5.1.1", "450 4.7.1", "450 4.7.1", "450 4.7.1"]
            + ["250 2.1.5"],
        )
        self.assertEqual(len(self.gs.lookups), 3)

    def test_client_rate_across_sessions(self) -> None:
        """The client's lookups per minute are capped across its sessions."""
        settings = ServerSettings(hostname="mx.groups.example.com", hard_error_limit=0)
        self.factory = self.make_factory(settings, lookup_rate=4)
        for n in range(3):
            proto, t = self.connect()
            proto.dataReceived(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\n")
            proto.dataReceived(
                b"".join(b"RCPT TO:<s%d-%d@groups.example.com>\r\n" % (n, i) for i in range(2))
            )
            self.clock.advance(5)
            self.close(proto)
        self.assertEqual(len(self.gs.lookups), 4)
        self.assertEqual(codes(t)[-2:], ["450 4.7.1", "450 4.7.1"])


class DeadlineTests(LimitsTestCase):
    """Slowloris: deadlines per command line and for DATA."""

    def test_dribbled_command_cut(self) -> None:
        """A command sent a byte every 5 s is cut at idle_timeout (60 s) with 421 4.4.2."""
        proto, t = self.connect()
        for byte in b"EHLO slow.example.org":
            self.clock.advance(5)
            if t.disconnecting:
                break
            proto.dataReceived(bytes([byte]))
        self.assertEqual(codes(t)[-1], "421 4.4.2")
        self.assertTrue(t.disconnecting)

    def test_each_line_gets_its_own_time(self) -> None:
        """A client sending a whole command every 50 s is not cut."""
        proto, t = self.connect()
        for _ in range(5):
            self.clock.advance(50)
            proto.dataReceived(b"EHLO x\r\n")
        self.assertFalse(t.disconnecting)

    def test_slow_data_cut(self) -> None:
        """
        DATA at 100 bytes/s (below min_data_rate, 500) is cut with 421 4.4.2
        and nothing is delivered; the spool file is gone.
        """
        proto, t = self.connect()
        proto.dataReceived(
            b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<dev@groups.example.com>\r\nDATA\r\n"
        )
        self.assertEqual(codes(t)[-1], "354")
        for _ in range(200):
            self.clock.advance(1)
            if t.disconnecting:
                break
            proto.dataReceived(b"x" * 99 + b"\n")
        self.assertEqual(codes(t)[-1], "421 4.4.2")
        self.close(proto)
        self.assertEqual(self.gs.posts, [])
        self.assertEqual(os.listdir(self.spool), [])

    def test_fast_enough_data_kept(self) -> None:
        """DATA at 1,000 bytes/s for 100 s (above the rate, past idle_timeout) is delivered."""
        proto, t = self.connect()
        proto.dataReceived(
            b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<dev@groups.example.com>\r\nDATA\r\n"
        )
        proto.dataReceived(b"Subject: slow\r\n\r\n")
        for _ in range(100):
            self.clock.advance(1)
            proto.dataReceived(b"y" * 998 + b"\r\n")
        proto.dataReceived(b".\r\n")
        self.assertEqual(codes(t)[-1], "250 2.0.0")
        self.assertEqual(len(self.gs.posts), 1)

    def test_lookup_time_not_the_clients(self) -> None:
        """A lookup slower than idle_timeout does not cut the session."""
        self.gs.lookup_group = self._held_lookup  # type: ignore[method-assign]
        proto, t = self.connect()
        proto.dataReceived(
            b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<dev@groups.example.com>\r\n"
        )
        self.clock.advance(90)
        self.assertFalse(t.disconnecting)
        from gsmail.groupserver import GroupInfo

        self._held.callback(GroupInfo("dev@groups.example.com", "dev", "site"))
        self.assertEqual(codes(t)[-1], "250 2.1.5")

    def _held_lookup(self, address: str) -> Any:
        from twisted.internet.defer import Deferred

        self._held: Deferred[Any] = Deferred()
        return self._held


class JunkTests(LimitsTestCase):
    """NOOP-like commands."""

    def test_junk_past_limit_are_errors(self) -> None:
        """Past 100 NOOPs each is an error: after 10 more they slow down, at 20 the session ends."""
        proto, t = self.connect()
        proto.dataReceived(b"EHLO x\r\n" + b"NOOP\r\n" * 110)
        self.assertEqual(codes(t).count("250 2.0.0"), 110)
        self.assertFalse(t.disconnecting)
        proto.dataReceived(b"NOOP\r\n" * 20)
        self.advance(20)
        self.assertEqual(codes(t)[-1], "421 4.7.0")


class AuthLimitTests(SynchronousTestCase):
    """Password guessing on the submission listener."""

    def setUp(self) -> None:
        self.clock = Clock()
        spool = self.mktemp()
        os.makedirs(spool)
        self.factory = SubmissionFactory(
            SubmissionCore(FakeQueue()),
            ServerSettings(hostname="gsmail.example.com", tls=object()),
            self.clock,
            checker=PasswordChecker("groupserver", "s3cret"),
            spool_dir=spool,
            anvil=Anvil(ClientLimits(exceptions=()), self.clock),
        )

    def session(self) -> tuple[Any, StringTransport]:
        peer = IPv4Address("TCP", "198.51.100.9", 40000)
        transport = TLSStringTransport(peerAddress=peer)
        proto = self.factory.buildProtocol(peer)
        proto.makeConnection(transport)
        proto.dataReceived(b"EHLO x\r\nSTARTTLS\r\nEHLO x\r\n")
        transport.clear()
        return proto, transport

    def auth(self, proto: Any, password: bytes) -> None:
        proto.dataReceived(b"AUTH PLAIN " + b64encode(b"\0groupserver\0" + password) + b"\r\n")

    def test_brute_force_locked_out(self) -> None:
        """
        Each wrong password is answered after 1 s; after 10 in a minute the
        client's AUTH gets 421 4.7.0 without a check (the right password
        too), in any session, until the minute has passed.
        """
        proto, t = self.session()
        for i in range(10):
            self.auth(proto, b"guess%d" % i)
            self.assertEqual(codes(t).count("535 5.7.8"), i)
            self.clock.advance(1)
            self.assertEqual(codes(t).count("535 5.7.8"), i + 1)
        self.auth(proto, b"s3cret")
        self.assertEqual(codes(t)[-1], "421 4.7.0")
        self.assertTrue(t.disconnecting)
        proto, t = self.session()
        self.auth(proto, b"s3cret")
        self.assertEqual(codes(t), ["421 4.7.0"])
        self.clock.advance(60)
        proto, t = self.session()
        self.auth(proto, b"s3cret")
        self.assertEqual(codes(t), ["235 2.7.0"])


class BacklogTests(SynchronousTestCase):
    """listen_backlog."""

    def test_added_where_missing(self) -> None:
        """backlog= is added to stream listeners that lack it, and nowhere else."""
        self.assertEqual(with_backlog("tcp:25", 1024), "tcp:25:backlog=1024")
        self.assertEqual(
            with_backlog("unix:/run/gsmail/lmtp.sock:mode=660", 7),
            "unix:/run/gsmail/lmtp.sock:mode=660:backlog=7",
        )
        self.assertEqual(with_backlog("tcp:25:backlog=10", 1024), "tcp:25:backlog=10")
        self.assertEqual(
            with_backlog("systemd:domain=INET:index=0", 1024), "systemd:domain=INET:index=0"
        )
