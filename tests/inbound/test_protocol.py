"""
Tests for L{gsmail.inbound.protocol}: the ESMTP and LMTP server, driven over a
L{StringTransport} with a fake delivery core.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gsmail import status
from gsmail.addresses import Address, Route
from gsmail.inbound import spool as spool_module
from gsmail.inbound.protocol import InboundFactory, ServerSettings, Session
from gsmail.inbound.protocol import commands as protocol_commands
from gsmail.inbound.spool import SpoolFiles
from gsmail.status import Reply
from tests.fakes import FakeCore, TLSStringTransport, codes, replies
from tests.util import DiskFaults, open_descriptors


class ServerTestsMixin:
    lmtp = False
    hello = b"EHLO client.example.org\r\n"

    def setUp(self) -> None:
        self.clock = Clock()
        self.core = FakeCore()
        self.settings = ServerSettings(
            hostname="mx.example.com",
            max_size=3000,
            max_recipients=3,
            max_line_length=1000,
            idle_timeout=60,
            max_connections=100,
            tls=object(),
        )
        self.factory = InboundFactory(
            self.core, self.settings, self.clock, lmtp=self.lmtp, spool_dir=self.mktemp_dir()
        )

    def mktemp_dir(self) -> str:
        import os

        path = self.mktemp()  # type: ignore[attr-defined]
        os.makedirs(path)
        return path

    def connect(self, transport: StringTransport | None = None) -> tuple[object, StringTransport]:
        proto = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 2525))
        transport = transport or StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 2525))
        proto.makeConnection(transport)
        return proto, transport

    def session(
        self, data: bytes, transport: StringTransport | None = None
    ) -> tuple[object, StringTransport]:
        proto, transport = self.connect(transport)
        transport.clear()
        proto.dataReceived(data)
        return proto, transport


class SMTPServerTests(ServerTestsMixin, SynchronousTestCase):
    """ESMTP behaviour."""

    def test_greeting_and_ehlo(self) -> None:
        """The greeting names the host; EHLO lists every extension gsmail honours."""
        proto, t = self.connect(TLSStringTransport())
        self.assertEqual(replies(t), ["220 mx.example.com ESMTP gsmail"])
        t.clear()
        proto.dataReceived(self.hello)
        self.assertEqual(
            replies(t),
            [
                "250-mx.example.com",
                "250-PIPELINING",
                "250-SIZE 3000",
                "250-8BITMIME",
                "250-ENHANCEDSTATUSCODES",
                "250-SMTPUTF8",
                "250 STARTTLS",
            ],
        )

    def test_no_starttls_without_tls_transport(self) -> None:
        """STARTTLS is neither offered nor accepted when TLS is impossible."""
        proto, t = self.session(self.hello + b"STARTTLS\r\n")
        self.assertNotIn("STARTTLS", t.value().decode().split("\r\n")[-3])
        self.assertEqual(codes(t)[-1], "454 4.7.0")

    def test_whole_session_in_one_write(self) -> None:
        """
        A pipelined session sent in one write gets its replies in command
        order, even though the recipient checks answer late and out of order.
        """
        self.core.hold_rcpt = True
        proto, t = self.session(
            self.hello
            + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<g1@example.com>\r\nRCPT TO:<x@other.org>\r\n"
            b"RCPT TO:<g2@example.com>\r\nDATA\r\n"
        )
        self.assertEqual(codes(t)[-1:], ["250 2.1.0"])
        # Answer the checks in reverse order: replies must still come in order.
        pending = self.core.rcpt_pending
        self.assertEqual(len(pending), 1)  # the next RCPT is not even read yet
        d, reply, route = pending.pop()
        d.callback((reply, route))
        self.assertEqual(len(pending), 1)
        pending.pop()[0].callback((status.RELAY_DENIED, None))
        d3, reply3, route3 = pending.pop()
        d3.callback((reply3, route3))
        self.assertEqual(codes(t)[1:], ["250 2.1.0", "250 2.1.5", "550 5.7.1", "250 2.1.5", "354"])
        t.clear()
        proto.dataReceived(b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        self.assertEqual(codes(t), ["250 2.0.0", "221 2.0.0"])
        self.assertEqual(
            [r.recipient.local for r in self.core.deliveries[0][1].recipients], ["g1", "g2"]
        )

    def test_quit_waits_for_delivery(self) -> None:
        """QUIT pipelined after the final dot is answered only after the DATA reply."""
        self.core.hold_delivery = True
        proto, t = self.session(self.hello + b"MAIL FROM:<>\r\nRCPT TO:<g@example.com>\r\nDATA\r\n")
        t.clear()
        proto.dataReceived(b"x: y\r\n\r\nz\r\n.\r\nQUIT\r\n")
        self.assertEqual(t.value(), b"")
        self.assertFalse(t.disconnecting)
        d, result = self.core.delivery_pending.pop()
        d.callback(result)
        self.assertEqual(codes(t), ["250 2.0.0", "221 2.0.0"])
        self.assertTrue(t.disconnecting)

    def test_message_stored_unstuffed_with_lf(self) -> None:
        """Dots are unstuffed and CRLF becomes LF in the spooled message."""
        proto, t = self.session(
            self.hello + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<g@example.com>\r\nDATA\r\n"
        )
        proto.dataReceived(b"Subject: dots\r\n\r\n..one\r\n...\r\nplain\r\n.\r\n")
        self.assertEqual(self.core.deliveries[0][2], b"Subject: dots\n\n.one\n..\nplain\n")

    def test_data_split_across_writes(self) -> None:
        """The end-of-data mark is found however the bytes are split."""
        message = b"Subject: s\r\n\r\nline one\r\n..two\r\n.\r\n"
        for cut in range(1, len(message)):
            self.core.deliveries.clear()
            proto, t = self.session(
                self.hello + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<g@example.com>\r\nDATA\r\n"
            )
            proto.dataReceived(message[:cut])
            self.assertEqual(self.core.deliveries, [], cut)
            proto.dataReceived(message[cut:])
            self.assertEqual(self.core.deliveries[0][2], b"Subject: s\n\nline one\n.two\n", cut)

    def test_smtp_smuggling(self) -> None:
        """
        Bare LF or CR variants of the end-of-data mark do not end DATA: the
        smuggled commands are message text and nothing extra is delivered.
        """
        for mark in [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r"]:
            self.core.deliveries.clear()
            proto, t = self.session(
                self.hello + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<g@example.com>\r\nDATA\r\n"
            )
            t.clear()
            proto.dataReceived(
                b"Subject: s\r\n\r\nhello"
                + mark
                + b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
            )
            self.assertEqual(len(self.core.deliveries), 1, mark)
            self.assertEqual(codes(t), ["250 2.0.0"], mark)
            self.assertIn(b"Subject: smuggled", self.core.deliveries[0][2])

    def test_overlong_data_line_injects_nothing(self) -> None:
        """
        An overlong line in DATA fails the message (550 5.6.0 after the
        dot); the commands that follow it in the body are never run.
        """
        proto, t = self.session(
            self.hello + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<g@example.com>\r\nDATA\r\n"
        )
        t.clear()
        proto.dataReceived(
            b"Subject: long\r\n\r\n"
            + b"x" * 1500
            + b"\r\nRSET\r\nMAIL FROM:<e@example.org>\r\nRCPT TO:<h@example.com>\r\nDATA\r\nbody\r\n.\r\n"
        )
        self.assertEqual(codes(t), ["550 5.6.0"])
        self.assertEqual(self.core.deliveries, [])
        t.clear()
        proto.dataReceived(b"NOOP\r\n")
        self.assertEqual(codes(t), ["250 2.0.0"])

    def test_overlong_line_in_pieces(self) -> None:
        """An overlong line that arrives in many small writes is still caught, with bounded memory."""
        proto, t = self.session(
            self.hello + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<g@example.com>\r\nDATA\r\n"
        )
        t.clear()
        for _ in range(100):
            proto.dataReceived(b"y" * 999)
            self.assertLessEqual(len(proto._buffer), 1001)
        proto.dataReceived(b"\r\n.\r\n")
        self.assertEqual(codes(t), ["550 5.6.0"])

    def test_size_parameter_over_limit(self) -> None:
        """MAIL FROM with SIZE= over the limit gets 552 5.3.4 at once."""
        proto, t = self.session(self.hello + b"MAIL FROM:<a@example.org> SIZE=3001\r\n")
        self.assertEqual(codes(t)[-1], "552 5.3.4")
        t.clear()
        proto.dataReceived(b"MAIL FROM:<a@example.org> SIZE=999 BODY=8BITMIME\r\n")
        self.assertEqual(codes(t), ["250 2.1.0"])

    def test_size_enforced_while_streaming(self) -> None:
        """A message over the limit is refused 552 5.3.4 after the dot, and nothing is delivered."""
        proto, t = self.session(
            self.hello + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<g@example.com>\r\nDATA\r\n"
        )
        t.clear()
        proto.dataReceived(b"Subject: big\r\n\r\n" + b"0123456789\r\n" * 300 + b".\r\n")
        self.assertEqual(codes(t), ["552 5.3.4"])
        self.assertEqual(self.core.deliveries, [])

    def test_empty_message(self) -> None:
        """An empty message is refused 554 5.3.0 (as smtp2gs did)."""
        proto, t = self.session(
            self.hello + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<g@example.com>\r\nDATA\r\n.\r\n"
        )
        self.assertEqual(codes(t)[-1], "554 5.3.0")

    def test_simple_commands(self) -> None:
        """NOOP, RSET, VRFY, HELP, EXPN, unknown commands and QUIT get their RFC 5321 replies."""
        proto, t = self.session(
            self.hello + b"NOOP\r\nRSET\r\nVRFY bob\r\nHELP\r\nEXPN list\r\nFROB\r\nQUIT\r\n"
        )
        self.assertEqual(
            codes(t)[1:],
            [
                "250 2.0.0",
                "250 2.0.0",
                "252 2.0.0",
                "214 2.0.0",
                "502 5.5.1",
                "500 5.5.2",
                "221 2.0.0",
            ],
        )
        self.assertTrue(t.disconnecting)

    def test_bad_sequences(self) -> None:
        """Commands out of order get 503 5.5.1."""
        proto, t = self.session(b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual(codes(t), ["503 5.5.1"])
        t.clear()
        proto.dataReceived(
            self.hello + b"RCPT TO:<g@example.com>\r\nDATA\r\n"
            b"MAIL FROM:<a@example.org>\r\nMAIL FROM:<a@example.org>\r\nDATA\r\n"
        )
        self.assertEqual(
            codes(t)[1:], ["503 5.5.1", "503 5.5.1", "250 2.1.0", "503 5.5.1", "554 5.5.1"]
        )

    def test_every_reply_has_an_enhanced_code(self) -> None:
        """Every reply but the greeting, the EHLO reply and 354 carries an RFC 3463 code."""
        proto, t = self.session(
            self.hello
            + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<g@example.com>\r\nRCPT TO:<a@b.org>\r\n"
            b"RCPT TO:<nosuch@example.com>\r\nRCPT TO:bad\r\nDATA\r\nx: y\r\n\r\nz\r\n.\r\n"
            b"VRFY x\r\nNOOP\r\nHELP\r\nRSET\r\nFOO\r\nRCPT TO:<g@example.com>\r\nQUIT\r\n"
        )
        lines = replies(t)[6:]  # after the EHLO reply
        self.assertEqual(len(lines), 14)
        for line in lines:
            if line.startswith("354 "):
                continue
            self.assertRegex(line, r"^[245]\d\d [245]\.\d{1,3}\.\d{1,3} ")

    def test_parameters(self) -> None:
        """Unknown MAIL or RCPT parameters get 555 5.5.4; bad values 501 5.5.4."""
        proto, t = self.session(
            self.hello
            + b"MAIL FROM:<a@example.org> XVERP\r\nMAIL FROM:<a@example.org> BODY=9BIT\r\n"
            b"MAIL FROM:<a@example.org> SIZE=abc\r\nMAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<g@example.com> NOTIFY=NEVER\r\n"
        )
        self.assertEqual(
            codes(t)[1:], ["555 5.5.4", "501 5.5.4", "501 5.5.4", "250 2.1.0", "555 5.5.4"]
        )

    def test_smtputf8(self) -> None:
        """A UTF-8 address needs SMTPUTF8 on MAIL (553 5.6.7 without); with it, it is accepted."""
        proto, t = self.session(
            self.hello
            + "MAIL FROM:<jösé@example.org>\r\n".encode()
            + "MAIL FROM:<jösé@example.org> SMTPUTF8\r\nRCPT TO:<grüppe@example.com>\r\nDATA\r\n".encode()
            + "Subject: Grüße\r\n\r\nHallo\r\n.\r\n".encode()
        )
        self.assertEqual(codes(t)[1:], ["553 5.6.7", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"])
        session, envelope, data = self.core.deliveries[0]
        self.assertTrue(envelope.smtputf8)
        self.assertEqual(data, "Subject: Grüße\n\nHallo\n".encode())

    def test_recipient_limit(self) -> None:
        """Past max_recipients, RCPT gets 452 4.5.3 (RFC 5321 §4.5.3.1.10)."""
        rcpts = b"".join(b"RCPT TO:<g%d@example.com>\r\n" % i for i in range(4))
        proto, t = self.session(self.hello + b"MAIL FROM:<>\r\n" + rcpts)
        self.assertEqual(codes(t)[2:], ["250 2.1.5"] * 3 + ["452 4.5.3"])

    def test_idle_timeout(self) -> None:
        """A silent client is told 421 4.4.2 and disconnected after idle_timeout seconds."""
        proto, t = self.session(self.hello)
        self.clock.advance(59)
        self.assertFalse(t.disconnecting)
        self.clock.advance(2)
        self.assertEqual(codes(t)[-1], "421 4.4.2")
        self.assertTrue(t.disconnecting)

    def test_no_timeout_while_delivering(self) -> None:
        """The idle timer does not run while GroupServer works on the message."""
        self.core.hold_delivery = True
        proto, t = self.session(
            self.hello
            + b"MAIL FROM:<>\r\nRCPT TO:<g@example.com>\r\nDATA\r\nx: y\r\n\r\nz\r\n.\r\n"
        )
        self.clock.advance(500)
        self.assertFalse(t.disconnecting)
        d, result = self.core.delivery_pending.pop()
        d.callback(result)
        self.assertEqual(codes(t)[-1], "250 2.0.0")
        self.clock.advance(61)
        self.assertTrue(t.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_limit(self) -> None:
        """Past max_connections, a new client gets 421 4.7.0 and is disconnected."""
        self.factory.settings = ServerSettings(hostname="mx.example.com", max_connections=2)
        self.connect()
        self.connect()
        proto, t = self.connect()
        self.assertEqual(codes(t), ["421 4.7.0"])
        self.assertTrue(t.disconnecting)

    def test_command_line_too_long(self) -> None:
        """A command line over 2048 octets gets 500 5.5.2 and the connection closes."""
        proto, t = self.session(b"NOOP " + b"x" * 3000)
        self.assertEqual(codes(t), ["500 5.5.2"])
        self.assertTrue(t.disconnecting)

    def test_starttls_injection_and_reset(self) -> None:
        """
        Commands pipelined after STARTTLS in plaintext are discarded, and the
        session forgets HELO and the transaction (RFC 3207 §4.2).
        """
        proto, t = self.session(
            self.hello + b"MAIL FROM:<a@example.org>\r\nSTARTTLS\r\nRCPT TO:<g@example.com>\r\n",
            TLSStringTransport(),
        )
        self.assertEqual(codes(t)[-2:], ["250 2.1.0", "220 2.0.0"])
        self.assertIs(t.tls_started, self.settings.tls)
        t.clear()
        proto.dataReceived(b"RCPT TO:<g@example.com>\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual(codes(t), ["503 5.5.1", "503 5.5.1"])
        t.clear()
        proto.dataReceived(self.hello)
        self.assertNotIn(b"STARTTLS", t.value())
        t.clear()
        proto.dataReceived(b"STARTTLS\r\n")
        self.assertEqual(codes(t), ["503 5.5.1"])

    def test_improper_pipelining_after_refused_data(self) -> None:
        """Message text sent without waiting for 354 is never run as commands."""
        proto, t = self.session(
            self.hello
            + b"MAIL FROM:<>\r\nRCPT TO:<x@other.org>\r\nDATA\r\nRSET\r\nMAIL FROM:<>\r\n"
        )
        self.assertEqual(codes(t)[-3:], ["550 5.7.1", "554 5.5.1", "421 4.5.0"])
        self.assertTrue(t.disconnecting)

    def test_transient_failure_is_transient(self) -> None:
        """A transient failure of one recipient makes the whole SMTP transaction 451, never 550."""
        self.core.results["g2"] = status.GROUPSERVER_UNREACHABLE
        proto, t = self.session(
            self.hello + b"MAIL FROM:<>\r\nRCPT TO:<g1@example.com>\r\nRCPT TO:<g2@example.com>\r\n"
            b"DATA\r\nx: y\r\n\r\nz\r\n.\r\n"
        )
        self.assertEqual(codes(t)[-1], "451 4.4.4")

    def test_lhlo_refused(self) -> None:
        """LHLO is for LMTP only."""
        proto, t = self.session(b"LHLO x\r\n")
        self.assertEqual(codes(t), ["500 5.5.1"])

    def test_helo_header_injection(self) -> None:
        """A HELO name with control characters is refused (it goes into Received)."""
        proto, t = self.session(b"HELO a\rb\r\n")
        self.assertEqual(codes(t), ["501 5.5.4"])


class LMTPServerTests(ServerTestsMixin, SynchronousTestCase):
    """LMTP behaviour (RFC 2033)."""

    lmtp = True
    hello = b"LHLO client.example.org\r\n"

    def transaction(self, n: int, body: bytes) -> StringTransport:
        rcpts = b"".join(b"RCPT TO:<g%d@example.com>\r\n" % i for i in range(n))
        proto, t = self.session(
            self.hello
            + b"MAIL FROM:<a@example.org>\r\n"
            + rcpts
            + b"RCPT TO:<nosuch@example.com>\r\nDATA\r\n"
        )
        t.clear()
        proto.dataReceived(body)
        return t

    def test_greeting(self) -> None:
        """The greeting says LMTP; EHLO and HELO are refused."""
        proto, t = self.session(b"EHLO x\r\nHELO x\r\n")
        self.assertEqual(codes(t), ["500 5.5.1", "500 5.5.1"])

    def test_one_reply_per_recipient(self) -> None:
        """After the dot, one reply per accepted recipient, in RCPT order."""
        self.core.results["g1"] = status.GROUPSERVER_ERROR
        t = self.transaction(3, b"s: x\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(codes(t), ["250 2.0.0", "451 4.5.0", "250 2.0.0"])

    def test_replies_on_every_failure_path(self) -> None:
        """Size limit, empty message and overlong line each give N replies for N recipients."""
        cases = [
            (b"s: x\r\n\r\n" + (b"y" * 990 + b"\r\n") * 4 + b"\r\n.\r\n", "552 5.3.4"),
            (b".\r\n", "554 5.3.0"),
            (b"s: x\r\n\r\n" + b"y" * 1200 + b"\r\n.\r\n", "550 5.6.0"),
        ]
        for body, expected in cases:
            t = self.transaction(3, body)
            self.assertEqual(codes(t), [expected] * 3, expected)

    def test_delivery_failure_still_n_replies(self) -> None:
        """Even an unexpected fault in the core gives one reply per recipient."""
        self.core.hold_delivery = True
        t = self.transaction(2, b"s: x\r\n\r\nb\r\n.\r\n")
        d, _ = self.core.delivery_pending.pop()
        d.errback(RuntimeError("boom"))
        self.assertEqual(codes(t), ["451 4.3.0", "451 4.3.0"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unix_socket_peer(self) -> None:
        """LHLO works on a UNIX socket connection (Twisted's ESMTP crashes there)."""
        proto = self.factory.buildProtocol(UNIXAddress("/run/gsmail/lmtp.sock"))
        t = StringTransport(peerAddress=UNIXAddress(None))
        proto.makeConnection(t)
        proto.dataReceived(self.hello)
        self.assertIn(b"250 SMTPUTF8", t.value())
        self.assertEqual(proto.session.peer, "local")

    def test_whole_session_in_one_write(self) -> None:
        """A whole LMTP session in one write: every reply in order, then 221."""
        proto, t = self.session(
            self.hello + b"MAIL FROM:<>\r\nRCPT TO:<g1@example.com>\r\nRCPT TO:<g2@example.com>\r\n"
            b"RCPT TO:<g3@example.com>\r\nRCPT TO:<g4@example.com>\r\nRCPT TO:<x@other.org>\r\n"
            b"DATA\r\nx: y\r\n\r\nz\r\n.\r\nQUIT\r\n"
        )
        self.assertEqual(
            codes(t)[1:],
            [
                "250 2.1.0",
                "250 2.1.5",
                "250 2.1.5",
                "250 2.1.5",
                "452 4.5.3",
                "452 4.5.3",
                "354",
                "250 2.0.0",
                "250 2.0.0",
                "250 2.0.0",
                "221 2.0.0",
            ],
        )


class StorageFaultTestsMixin:
    """
    A full or failing spool disk, injected (L{DiskFaults}): what the client
    sees, what is left open or on disk, and that the session and the next
    message go on.
    """

    lmtp = False
    hello = b"EHLO client.example.org\r\n"
    #: Bytes of message data, enough for several writes of the spool.
    BIG = 3 * 256 * 1024

    def setUp(self) -> None:
        self.clock = Clock()
        self.core = FakeCore()
        self.directory = self.mktemp()  # type: ignore[attr-defined]
        os.makedirs(self.directory)
        self.files = SpoolFiles(self.directory, keep=4)
        self.addCleanup(self.files.close)  # type: ignore[attr-defined]
        self.factory = InboundFactory(
            self.core,
            ServerSettings(hostname="mx.example.com", max_size=10 * 1024 * 1024),
            self.clock,
            lmtp=self.lmtp,
            spool_files=self.files,
        )
        self.disk = DiskFaults(self)  # type: ignore[arg-type]
        self.events: list[LogEvent] = []
        self.patch(spool_module, "log", Logger(observer=self.events.append))  # type: ignore[attr-defined]

    def connect(self) -> tuple[Any, StringTransport]:
        proto = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 2525))
        t = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 2525))
        proto.makeConnection(t)
        proto.dataReceived(self.hello)
        t.clear()
        return proto, t

    def envelope(self, recipients: int = 1) -> bytes:
        rcpts = b"".join(b"RCPT TO:<g%d@example.com>\r\n" % i for i in range(recipients))
        return b"MAIL FROM:<a@example.org>\r\n" + rcpts + b"RCPT TO:<x@other.org>\r\nDATA\r\n"

    def body(self, size: int) -> bytes:
        line = b"0123456789" * 9 + b"\r\n"
        return b"Subject: big\r\n\r\n" + line * (size // len(line))

    def errors(self) -> list[LogEvent]:
        return [e for e in self.events if e["log_level"] is LogLevel.error]

    def test_write_fails_mid_data(self) -> None:
        """
        The disk fills while a large message streams in: the rest of DATA
        is read but neither written nor kept in memory, the client gets
        C{452 4.3.1 Insufficient system storage} after the final dot (one
        reply, or one per accepted LMTP recipient), nothing is delivered,
        the spool file is back in the pool, emptied, and the session goes
        on (RSET, NOOP).
        """
        proto, t = self.connect()
        proto.dataReceived(self.envelope(2))
        t.clear()
        self.disk.write_error = errno.ENOSPC
        body = self.body(self.BIG)
        for offset in range(0, len(body), 65536):
            proto.dataReceived(body[offset : offset + 65536])
            self.assertLess(len(proto._buffer), 65536 + 100)
        writes = self.disk.writes
        self.assertEqual(writes, 1)  # one failed write, then nothing
        self.assertEqual(t.value(), b"")
        proto.dataReceived(b".\r\nRSET\r\nNOOP\r\n")
        expected = ["452 4.3.1 Insufficient system storage"] * (2 if self.lmtp else 1)
        self.assertEqual(replies(t), expected + ["250 2.0.0 Ok", "250 2.0.0 Ok"])
        self.assertEqual(self.disk.writes, writes)
        self.assertEqual(self.core.deliveries, [])
        self.assertEqual(self.files.free, 1)
        [name] = os.listdir(self.directory)
        self.assertEqual(os.path.getsize(os.path.join(self.directory, name)), 0)

    def test_finish_fails(self) -> None:
        """
        A small message whose one write (after the dot) fails: 452 4.3.1
        per recipient, and a QUIT pipelined after the dot still gets its
        221 after them (the LMTP client is not desynchronised).
        """
        proto, t = self.connect()
        self.disk.write_error = errno.EDQUOT
        proto.dataReceived(self.envelope(3) + b"Subject: s\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        got = codes(t)
        self.assertEqual(got[:4], ["250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.1.5"])
        self.assertEqual(got[5:], ["354"] + ["452 4.3.1"] * (3 if self.lmtp else 1) + ["221 2.0.0"])
        self.assertEqual(self.core.deliveries, [])

    def test_no_spool_file(self) -> None:
        """
        No spool file can be made: DATA itself gets one 452 4.3.1 (no 354,
        so no message follows, RFC 2033 §4.2 too), the transaction is over,
        and the next one works once space is back.
        """
        self.files.close()  # no kept file: DATA must make one
        self.files = SpoolFiles(self.directory)
        self.factory.spool_files = self.files
        proto, t = self.connect()
        self.disk.create_error = errno.ENOSPC
        proto.dataReceived(self.envelope(2))
        proto.dataReceived(b"RCPT TO:<g@example.com>\r\n")
        self.assertEqual(codes(t)[-2:], ["452 4.3.1", "503 5.5.1"])
        self.assertFalse(t.disconnecting)
        self.disk.create_error = None
        t.clear()
        proto.dataReceived(self.envelope(2) + b"Subject: s\r\n\r\nback\r\n.\r\n")
        n = 2 if self.lmtp else 1
        self.assertEqual(codes(t)[-n - 1 :], ["354"] + ["250 2.0.0"] * n)
        self.assertEqual(self.core.deliveries[0][2], b"Subject: s\n\nback\n")

    def test_data_pipelined_after_failed_data(self) -> None:
        """
        A client that sent its message without waiting for 354 (RFC 2920
        §3.1) gets 421 after the 452: its message text never runs as commands.
        """
        proto, t = self.connect()
        self.files.close()
        self.disk.create_error = errno.ENOSPC
        proto.dataReceived(self.envelope(1) + b"MAIL FROM:<evil@example.org>\r\n.\r\n")
        self.assertEqual(codes(t)[-2:], ["452 4.3.1", "421 4.5.0"])
        self.assertTrue(t.disconnecting)

    def test_space_returns(self) -> None:
        """
        After messages refused for a full disk, the next message once space
        is back is delivered whole, on the same connection, with no restart.
        """
        proto, t = self.connect()
        self.disk.write_error = errno.ENOSPC
        for _ in range(3):
            proto.dataReceived(self.envelope(1) + self.body(self.BIG) + b".\r\n")
        self.disk.write_error = None
        body = self.body(self.BIG)
        proto.dataReceived(self.envelope(1) + body + b".\r\n")
        self.assertEqual(codes(t)[-1], "250 2.0.0")
        [(_, _, data)] = self.core.deliveries
        self.assertEqual(data, body.replace(b"\r\n", b"\n"))

    def test_nothing_leaks(self) -> None:
        """
        Fifty failing messages (writes failing mid-message, at the dot,
        files that cannot be made or emptied, connections dropped after the
        fault) leave as many descriptors open as before and at most the
        kept, empty files in the spool directory; the fault is logged once,
        without a traceback, and its end once.
        """
        before = open_descriptors()
        for n in range(50):
            proto, t = self.connect()
            kind = n % 5
            if kind == 0:
                self.disk.write_error = errno.ENOSPC
                proto.dataReceived(self.envelope(2) + self.body(self.BIG) + b".\r\n")
            elif kind == 1:
                self.disk.write_error = errno.EIO
                proto.dataReceived(self.envelope(2) + b"s: x\r\n\r\nbody\r\n.\r\n")
            elif kind == 2:
                self.files.close()
                self.disk.create_error = errno.ENOSPC
                proto.dataReceived(self.envelope(2))
            elif kind == 3:
                self.disk.write_error = errno.ENOSPC
                self.disk.truncate_error = errno.EIO
                proto.dataReceived(self.envelope(2) + self.body(self.BIG) + b".\r\n")
            else:
                self.disk.write_error = errno.ENOSPC
                proto.dataReceived(self.envelope(2) + self.body(self.BIG))
                proto.connectionLost(None)
            self.assertNotIn("250 2.0.0", codes(t))
            if kind != 4:
                self.assertIn("452 4.3.1", codes(t))
            self.disk.write_error = self.disk.create_error = self.disk.truncate_error = None
            self.files = SpoolFiles(self.directory, keep=4) if kind == 2 else self.files
            self.factory.spool_files = self.files
        self.assertEqual(self.core.deliveries, [])
        self.assertLessEqual(open_descriptors(), before + self.files.free)
        names = os.listdir(self.directory)
        self.assertLessEqual(len(names), self.files.free)
        for name in names:
            self.assertEqual(os.path.getsize(os.path.join(self.directory, name)), 0)
        self.assertEqual(len(self.errors()), 1)
        self.assertNotIn("log_failure", self.errors()[0])
        proto, t = self.connect()
        proto.dataReceived(self.envelope(1) + b"s: x\r\n\r\nok\r\n.\r\n")
        self.assertEqual(codes(t)[-1], "250 2.0.0")
        self.assertEqual(
            [formatEvent(e) for e in self.events if e["log_level"] is LogLevel.info],
            ["Spooling works again (50 messages were refused meanwhile)"],
        )

    def test_mail_checks_free_space(self) -> None:
        """
        At MAIL, a spool file system with less room than the declared SIZE,
        or none, gets 452 4.3.1 (RFC 1870 §6.2) before any data is sent;
        with room, MAIL is accepted.
        """
        free = [10_000]
        self.patch(protocol_commands, "free_space", lambda directory: free[0])
        proto, t = self.connect()
        proto.dataReceived(
            b"MAIL FROM:<a@example.org> SIZE=20000\r\nMAIL FROM:<a@example.org> SIZE=5000\r\nRSET\r\n"
        )
        self.assertEqual(codes(t), ["452 4.3.1", "250 2.1.0", "250 2.0.0"])
        free[0] = 0
        t.clear()
        proto.dataReceived(b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual(replies(t), ["452 4.3.1 Insufficient system storage"])
        free[0] = 1 << 30
        t.clear()
        proto.dataReceived(b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual(codes(t), ["250 2.1.0"])
        self.assertEqual(len(self.errors()), 1)


class SMTPStorageFaultTests(StorageFaultTestsMixin, SynchronousTestCase):
    """A full disk over ESMTP."""


class LMTPStorageFaultTests(StorageFaultTestsMixin, SynchronousTestCase):
    """A full disk over LMTP: one reply per accepted recipient."""

    lmtp = True
    hello = b"LHLO client.example.org\r\n"


class AttackTests(ServerTestsMixin, SynchronousTestCase):
    """
    What port 25 gets from attackers (issue "Port 25 under attack"), over
    a StringTransport; the real-socket versions are in
    C{tests.integration.test_attacks}.
    """

    def test_unicode_digits_in_size(self) -> None:
        """
        C{SIZE=²}, C{①} or C{٣٣} gets C{501 5.5.4}, the pipelined EHLO reply
        comes first, and the connection goes on.
        """
        for value in ["²", "①", "٣٣", "１", "-1", "1" * 21]:
            proto, t = self.session(
                self.hello + f"MAIL FROM:<a@example.org> SIZE={value}\r\nNOOP\r\n".encode()
            )
            self.assertEqual(codes(t), ["250", "501 5.5.4", "250 2.0.0"], value)
            self.assertIn("ASCII digits", replies(t)[-2])
            self.assertFalse(t.disconnecting)

    def test_bad_parameter_is_not_an_address_error(self) -> None:
        """A malformed parameter is 501 5.5.4, not a 5.1.x address error."""
        proto, t = self.session(
            self.hello + b"MAIL FROM:<a@example.org> BAD_KEY=1\r\n"
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<g@example.com> X=\x1b\r\n"
        )
        self.assertEqual(codes(t)[1:], ["501 5.5.4", "250 2.1.0", "501 5.5.4"])

    def test_line_breaking_characters_in_addresses(self) -> None:
        """
        U+2028, U+2029, U+0085 or a control character in a path gets 553
        (5.1.7 for the sender, 5.1.3 for a recipient), even with SMTPUTF8.
        """
        for char in ["\u2028", "\u2029", "\x85", "\x1b", "\x7f"]:
            proto, t = self.session(
                self.hello
                + f"MAIL FROM:<a{char}b@example.org> SMTPUTF8\r\n".encode()
                + b"MAIL FROM:<a@example.org> SMTPUTF8\r\n"
                + f"RCPT TO:<g{char}@example.com>\r\n".encode()
            )
            self.assertEqual(codes(t)[1:], ["553 5.1.7", "250 2.1.0", "553 5.1.3"], repr(char))

    def test_malformed_utf8_refused(self) -> None:
        """A command that is not UTF-8 (a lone surrogate, a stray byte) is refused, nothing kept."""
        proto, t = self.session(
            self.hello + b"MAIL FROM:<a\xed\xa0\x80@example.org> SMTPUTF8\r\n"
            b"MAIL FROM:<a\xff@example.org> SMTPUTF8\r\nNOOP\r\n"
        )
        self.assertEqual(codes(t)[1:], ["501 5.5.4", "501 5.5.4", "250 2.0.0"])
        self.assertIsNone(proto.envelope)  # type: ignore[attr-defined]

    def test_trailing_dots(self) -> None:
        """A domain ending in dots is refused: 501 5.1.7 on MAIL, 501 5.1.3 on RCPT."""
        proto, t = self.session(
            self.hello + b"MAIL FROM:<a@example.org.>\r\nMAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<g@example.com..>\r\nRCPT TO:<g@example.com.>\r\n"
        )
        self.assertEqual(codes(t)[1:], ["501 5.1.7", "250 2.1.0", "501 5.1.3", "501 5.1.3"])

    def test_bare_postmaster_reaches_the_core(self) -> None:
        """C{RCPT TO:<postmaster>} is not a syntax error: the core decides (RFC 5321 §4.5.1)."""
        seen: list[Address] = []
        check = self.core.check_recipient

        def record(session: Session, recipient: Address) -> Deferred[tuple[Reply, Route | None]]:
            seen.append(recipient)
            return check(session, recipient)

        self.core.check_recipient = record  # type: ignore[method-assign]
        proto, t = self.session(
            self.hello + b"MAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nRCPT TO:<Postmaster>\r\n"
        )
        self.assertEqual([str(a) for a in seen], ["postmaster", "Postmaster"])

    def test_non_ascii_verb(self) -> None:
        """A verb that only uppercases to a command (C{maıl}, dotless i) is not that command."""
        proto, t = self.session(self.hello + "maıl FROM:<a@example.org>\r\n".encode())
        self.assertEqual(codes(t)[1:], ["500 5.5.2"])

    def test_unexpected_error_costs_one_reply(self) -> None:
        """A bug in a command handler gives 451 4.3.0, logged once; the connection goes on."""

        def broken(arg: str) -> None:
            raise ValueError("bug")

        proto, t = self.connect()
        proto.do_VRFY = broken  # type: ignore[attr-defined]
        t.clear()
        proto.dataReceived(self.hello + b"VRFY x\r\nNOOP\r\n")  # type: ignore[attr-defined]
        self.assertEqual(codes(t), ["250", "451 4.3.0", "250 2.0.0"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def data_session(self) -> tuple[object, StringTransport]:
        proto, t = self.session(
            self.hello + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<g@example.com>\r\nDATA\r\n"
        )
        t.clear()
        return proto, t

    def test_bare_lf_lines(self) -> None:
        """
        A message with bare LF line endings longer than max_line_length in
        all is taken line by line (Postfix's C{smtpd_forbid_bare_newline =
        normalize}); only CR LF . CR LF ends it, and a bare CR is data.
        """
        body = b"".join(b"line %03d\n" % i for i in range(200))  # 2400 bytes > 1000
        proto, t = self.data_session()
        proto.dataReceived(b"Subject: lf\n\n" + body + b"..dot\nbare\rcr\r\n.\r\n")  # type: ignore[attr-defined]
        self.assertEqual(codes(t), ["250 2.0.0"])
        self.assertEqual(
            self.core.deliveries[0][2], b"Subject: lf\n\n" + body + b".dot\nbare\rcr\n"
        )

    def test_bare_lf_line_too_long(self) -> None:
        """A line over the limit is still refused when it ends in a bare LF."""
        proto, t = self.data_session()
        proto.dataReceived(b"Subject: x\n\n" + b"y" * 1200 + b"\nz\r\n.\r\n")  # type: ignore[attr-defined]
        self.assertEqual(codes(t), ["550 5.6.0"])
        self.assertEqual(self.core.deliveries, [])

    def test_dot_line_after_bare_lf_is_not_the_end(self) -> None:
        """
        C{LF . CR LF} does not end DATA even split over writes: the "." line
        is data (an empty line once unstuffed, as in Postfix); the real end
        follows.
        """
        proto, t = self.data_session()
        proto.dataReceived(b"Subject: x\r\n\r\nhello\n")  # type: ignore[attr-defined]
        proto.dataReceived(b".\r\n")  # type: ignore[attr-defined]
        self.assertEqual(t.value(), b"")
        proto.dataReceived(b"RSET\r\n.\r\n")  # type: ignore[attr-defined]
        self.assertEqual(codes(t), ["250 2.0.0"])
        self.assertEqual(self.core.deliveries[0][2], b"Subject: x\n\nhello\n\nRSET\n")

    def test_overlong_line_ended_by_bare_lf_then_end(self) -> None:
        """After an overlong line ended by a bare LF, "." CR LF is not the end; after CR LF it is."""
        proto, t = self.data_session()
        proto.dataReceived(b"y" * 1500)  # type: ignore[attr-defined]
        proto.dataReceived(b"\n.\r\n")  # type: ignore[attr-defined]
        self.assertEqual(t.value(), b"")
        proto.dataReceived(b"z\r\n.\r\n")  # type: ignore[attr-defined]
        self.assertEqual(codes(t), ["550 5.6.0"])
        proto, t = self.data_session()
        proto.dataReceived(b"y" * 1500 + b"\r")  # type: ignore[attr-defined]
        proto.dataReceived(b"\n.\r\n")  # type: ignore[attr-defined]
        self.assertEqual(codes(t), ["550 5.6.0"])

    def test_bare_lf_split_everywhere(self) -> None:
        """A message with mixed line ends is stored the same however its bytes are split."""
        message = b"Subject: s\n\r\nline one\n..two\r\nbare\rcr\n.\nstill data\r\n.\r\n"
        expected = b"Subject: s\n\nline one\n.two\nbare\rcr\n\nstill data\n"
        for cut in range(1, len(message)):
            self.core.deliveries.clear()
            proto, t = self.data_session()
            proto.dataReceived(message[:cut])  # type: ignore[attr-defined]
            proto.dataReceived(message[cut:])  # type: ignore[attr-defined]
            self.assertEqual(self.core.deliveries[0][2], expected, cut)
            self.assertEqual(codes(t), ["250 2.0.0"], cut)
            # Closed, so the next session is not refused as the 51st from one client.
            proto.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
