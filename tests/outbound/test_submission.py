"""
Tests for L{gsmail.outbound.submission}: the submission listener, driven
over a L{StringTransport} with a fake queue, speaking as gs.email's
XVERPSMTPMailer does.
"""

from __future__ import annotations

import os
import socket
from base64 import b64encode
from typing import Any

import attrs
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IAddress, ITLSTransport
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from gsmail import status
from gsmail.inbound.protocol import ServerSettings
from gsmail.outbound.submission import (
    PasswordChecker,
    SubmissionCore,
    SubmissionFactory,
    parse_networks,
)

reactor: Any = _reactor


@attrs.define
class Queued:
    id: str
    sender: str
    recipients: list[str]
    data: bytes
    xverp: bool
    params: dict[str, str]


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
    ) -> Deferred[Any]:
        if self.error is not None:
            return fail(self.error)
        assert isinstance(data, str)
        with open(data, "rb") as f:
            entry = Queued(
                f"q{len(self.entries) + 1}", sender, recipients, f.read(), xverp, params or {}
            )
        self.entries.append(entry)
        return succeed(entry)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    def startTLS(self, contextFactory: object, normal: bool = True) -> None:
        self.tls_started = contextFactory


def lines(t: StringTransport) -> list[str]:
    return t.value().decode().split("\r\n")[:-1]


class SubmissionTests(SynchronousTestCase):
    """The submission listener."""

    def setUp(self) -> None:
        self.queue = FakeQueue()
        self.clock = Clock()
        spool = self.mktemp()
        os.makedirs(spool)
        self.factory = SubmissionFactory(
            SubmissionCore(self.queue),
            ServerSettings(hostname="gsmail.example.com", tls=object()),
            self.clock,
            checker=PasswordChecker("groupserver", "s3cret"),
            spool_dir=spool,
        )

    def connect(self, host: str = "127.0.0.1", tls: bool = False) -> tuple[Any, StringTransport]:
        peer = IPv4Address("TCP", host, 40000)
        transport = (TLSStringTransport if tls else StringTransport)(peerAddress=peer)
        proto = self.factory.buildProtocol(peer)
        proto.makeConnection(transport)
        transport.clear()
        return proto, transport

    def test_gs_email_session(self) -> None:
        """
        EHLO, MAIL FROM with XVERP and 50 recipients, as gs.email sends them:
        250 with the queue id only once queued, with the XVERP flag kept.
        """
        proto, t = self.connect()
        rcpts = b"".join(b"RCPT TO:<member%d@example.org>\r\n" % i for i in range(50))
        proto.dataReceived(
            b"EHLO groupserver\r\nMAIL FROM:<dev@groups.example.com> XVERP\r\n"
            + rcpts
            + b"DATA\r\n"
        )
        proto.dataReceived(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        out = lines(t)
        self.assertIn("250-XVERP", out)
        self.assertIn("250-DSN", out)
        self.assertEqual(out[-1], "250 2.0.0 Queued as q1")
        [entry] = self.queue.entries
        self.assertTrue(entry.xverp)
        self.assertEqual(entry.sender, "dev@groups.example.com")
        self.assertEqual(len(entry.recipients), 50)
        self.assertTrue(entry.data.startswith(b"Received: from groupserver ([127.0.0.1])\n"))
        self.assertTrue(entry.data.endswith(b"Subject: hi\n\nbody\n"))
        self.assertEqual(os.listdir(self.factory.spool_dir), [])

    def test_foreign_client_refused(self) -> None:
        """A client outside the trusted networks may not submit without AUTH (no open relay)."""
        proto, t = self.connect("192.0.2.7")
        proto.dataReceived(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual(lines(t)[-1][:9], "554 5.7.1")
        self.assertNotIn("250-AUTH PLAIN LOGIN", lines(t))

    def test_unix_socket_trusted(self) -> None:
        """A UNIX socket client is trusted (the socket's file mode decides)."""
        transport = StringTransport(peerAddress=UNIXAddress(None))
        proto = self.factory.buildProtocol(UNIXAddress(None))
        proto.makeConnection(transport)
        proto.dataReceived(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual(lines(transport)[-1], "250 2.1.0 Sender ok")

    def auth_session(self, *commands: bytes) -> list[str]:
        proto, t = self.connect("192.0.2.7", tls=True)
        proto.dataReceived(b"EHLO x\r\nSTARTTLS\r\n")
        proto.dataReceived(b"EHLO x\r\n")
        t.clear()
        for c in commands:
            proto.dataReceived(c)
        return lines(t)

    def test_auth_plain_after_tls(self) -> None:
        """AUTH PLAIN over TLS with the right password authorizes a foreign client."""
        token = b64encode(b"\0groupserver\0s3cret")
        out = self.auth_session(b"AUTH PLAIN " + token + b"\r\n", b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual(out, ["235 2.7.0 Authentication successful", "250 2.1.0 Sender ok"])

    def test_auth_login(self) -> None:
        """AUTH LOGIN with its two challenges works."""
        out = self.auth_session(
            b"AUTH LOGIN\r\n", b64encode(b"groupserver") + b"\r\n", b64encode(b"s3cret") + b"\r\n"
        )
        self.assertEqual(
            out, ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "235 2.7.0 Authentication successful"]
        )

    def test_auth_wrong_password(self) -> None:
        """A wrong password is 535 5.7.8 and the client stays unauthorized."""
        token = b64encode(b"\0groupserver\0wrong")
        out = self.auth_session(b"AUTH PLAIN " + token + b"\r\n", b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual([o[:9] for o in out], ["535 5.7.8", "554 5.7.1"])

    def test_auth_needs_tls(self) -> None:
        """AUTH is neither offered nor accepted before TLS (538 5.7.11)."""
        proto, t = self.connect("192.0.2.7", tls=True)
        proto.dataReceived(b"EHLO x\r\nAUTH PLAIN " + b64encode(b"\0groupserver\0s3cret") + b"\r\n")
        self.assertNotIn("250-AUTH PLAIN LOGIN", lines(t))
        self.assertEqual(lines(t)[-1][:10], "538 5.7.11")

    def test_auth_cancelled(self) -> None:
        """'*' cancels an AUTH exchange."""
        out = self.auth_session(b"AUTH PLAIN\r\n", b"*\r\n")
        self.assertEqual([o[:9] for o in out], ["334 ", "501 5.0.0"])

    def test_dsn_parameters(self) -> None:
        """RET/ENVID and NOTIFY/ORCPT are accepted and kept; bad ones refused."""
        proto, t = self.connect()
        proto.dataReceived(
            b"EHLO x\r\nMAIL FROM:<a@example.org> RET=HDRS ENVID=abc BODY=8BITMIME\r\n"
            b"RCPT TO:<b@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b@example.org\r\n"
            b"RCPT TO:<c@example.org> NOTIFY=NEVER,SUCCESS\r\nDATA\r\nx: y\r\n\r\nz\r\n.\r\n"
        )
        out = lines(t)
        self.assertEqual(
            [o[:9] for o in out[-5:]],
            ["250 2.1.0", "250 2.1.5", "501 5.5.4", "354 End d", "250 2.0.0"],
        )
        [entry] = self.queue.entries
        self.assertEqual(entry.params["RET"], "HDRS")
        self.assertEqual(entry.params["ENVID"], "abc")
        self.assertEqual(entry.params["BODY"], "8BITMIME")
        self.assertEqual(entry.params["NOTIFY:b@example.org"], "FAILURE,DELAY")
        self.assertFalse(entry.xverp)

    def test_queue_failure_is_transient(self) -> None:
        """If the queue cannot store the message, the client gets 451 4.3.0 and keeps it."""
        self.queue.error = OSError("disk full")
        proto, t = self.connect()
        proto.dataReceived(
            b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            b"x: y\r\n\r\nz\r\n.\r\n"
        )
        self.assertEqual(lines(t)[-1][:9], "451 4.3.0")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(os.listdir(self.factory.spool_dir), [])

    def test_parse_networks(self) -> None:
        """Networks parse, with hosts widened to their network."""
        self.assertEqual(
            [str(n) for n in parse_networks(["127.0.0.0/8", " ::1 ", ""])],
            ["127.0.0.0/8", "::1/128"],
        )


class ReplyTimingTests(TestCase):
    """
    Over a real TCP connection: a client that waits for each reply (as
    smtplib sends RCPT) gets it in the same reactor turn; replies to
    pipelined commands leave together.
    """

    async def test_replies(self) -> None:
        """
        A lone command's reply is with the client before the reactor turns;
        the replies to two pipelined commands come after it, together.
        """
        spool = self.mktemp()
        os.makedirs(spool)
        factory = SubmissionFactory(
            SubmissionCore(FakeQueue()),
            ServerSettings(hostname="gsmail.example.com"),
            reactor,
            spool_dir=spool,
        )
        made: Deferred[Any] = Deferred()
        build = factory.buildProtocol

        def build_and_keep(addr: IAddress) -> Any:
            proto = build(addr)
            made.callback(proto)
            return proto

        factory.buildProtocol = build_and_keep  # type: ignore[method-assign]
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        proto = await made
        await deferLater(reactor, 0.01)
        self.assertTrue(client.recv(1000).startswith(b"220 "))

        def received() -> bytes:
            try:
                return client.recv(1000, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return b""

        # As if the reactor had just read them from the socket:
        proto.dataReceived(b"NOOP\r\n")
        self.assertEqual(received(), status.OK.encode())
        proto.dataReceived(b"NOOP\r\nNOOP\r\n")
        self.assertEqual(received(), b"")
        await deferLater(reactor, 0.01)
        self.assertEqual(received(), status.OK.encode() * 2)
        proto.transport.loseConnection()
        await deferLater(reactor, 0.01)


class SubmissionAttackTests(SynchronousTestCase):
    """Bad input on the submission port (issue "Port 25 under attack")."""

    def setUp(self) -> None:
        self.queue = FakeQueue()
        spool = self.mktemp()
        os.makedirs(spool)
        self.factory = SubmissionFactory(
            SubmissionCore(self.queue),
            ServerSettings(hostname="gsmail.example.com"),
            Clock(),
            spool_dir=spool,
        )

    def session(self, data: bytes) -> list[str]:
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        transport = StringTransport(peerAddress=peer)
        proto = self.factory.buildProtocol(peer)
        proto.makeConnection(transport)
        transport.clear()
        proto.dataReceived(data)
        return [line for line in lines(transport) if line[3:4] != "-"]

    def test_envid_and_orcpt_are_xtext(self) -> None:
        """ENVID and ORCPT must be xtext (RFC 3461 §4): C{=}, controls or raw UTF-8 get 501 5.5.4."""
        out = self.session(
            b"EHLO x\r\nMAIL FROM:<a@example.org> ENVID=a=b\r\n"
            + "MAIL FROM:<a@example.org> ENVID=é\r\n".encode()
            + b"MAIL FROM:<a@example.org> ENVID="
            + b"x" * 101
            + b"\r\nMAIL FROM:<a@example.org> ENVID=ok+2B\r\n"
            b"RCPT TO:<b@example.org> ORCPT=rfc822\r\n"
            b"RCPT TO:<b@example.org> ORCPT=;b@example.org\r\n"
            b"RCPT TO:<b@example.org> ORCPT=rfc822;b=c@example.org\r\n"
            b"RCPT TO:<b@example.org> ORCPT=rfc822;b+2Bc@example.org\r\n"
        )
        self.assertEqual(
            [o[:9] for o in out[1:]],
            ["501 5.5.4"] * 3 + ["250 2.1.0"] + ["501 5.5.4"] * 3 + ["250 2.1.5"],
        )

    def test_bare_postmaster_refused(self) -> None:
        """Submission has no postmaster of its own: C{RCPT TO:<postmaster>} is 501 5.1.3."""
        out = self.session(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<postmaster>\r\n")
        self.assertEqual(out[-1][:9], "501 5.1.3")

    def test_helo_junk_not_in_received(self) -> None:
        """A HELO that is no domain is written in a comment, made printable ASCII."""
        self.session(
            "EHLO ex(ample)é\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
            "DATA\r\nSubject: s\r\n\r\nb\r\n.\r\n".encode()
        )
        [entry] = self.queue.entries
        self.assertTrue(
            entry.data.startswith(b"Received: from unknown (helo=ex?ample??) ([127.0.0.1])\n"),
            entry.data[:100],
        )
