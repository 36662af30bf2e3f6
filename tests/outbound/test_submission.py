"""
Tests for L{gsmail.outbound.submission}: the submission listener, driven
over a L{StringTransport} with a fake queue, speaking as gs.email's
XVERPSMTPMailer does.
"""

from __future__ import annotations

import errno
import os
import socket
from base64 import b64encode
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gsmail import status
from gsmail.inbound import spool as spool_module
from gsmail.inbound.protocol import ServerSettings
from gsmail.outbound.submission import (
    PasswordChecker,
    SubmissionCore,
    SubmissionFactory,
    parse_networks,
)
from tests.fakes import FakeQueue, TLSStringTransport
from tests.util import DiskFaults, open_descriptors

reactor: Any = _reactor


def lines(t: StringTransport) -> list[str]:
    return t.value().decode().split("\r\n")[:-1]


def offered(out: list[str]) -> set[str]:
    """The keywords of the EHLO reply lines in C{out} ("250-X" and "250 X")."""
    return {line[4:] for line in out if line[:4] in ("250-", "250 ")}


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
        self.assertIn("XVERP", offered(out))
        self.assertIn("DSN", offered(out))
        self.assertEqual(out[-1], "250 2.0.0 Queued as q1")
        [entry] = self.queue.entries
        self.assertTrue(entry.xverp)
        self.assertTrue(entry.sign)  # DKIM-signed when queued (gsmail.signing)
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
        self.assertNotIn("AUTH PLAIN LOGIN", offered(lines(t)))

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
        self.transport = t
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
        """
        A wrong password is 535 5.7.8, answered after auth_failure_delay
        (1 s; the pipelined MAIL waits for it), and the client stays
        unauthorized.
        """
        token = b64encode(b"\0groupserver\0wrong")
        out = self.auth_session(b"AUTH PLAIN " + token + b"\r\n", b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual(out, [])
        self.clock.advance(0.99)
        self.assertEqual(lines(self.transport), [])
        self.clock.advance(0.01)
        self.assertEqual([o[:9] for o in lines(self.transport)], ["535 5.7.8", "554 5.7.1"])

    def test_auth_needs_tls(self) -> None:
        """AUTH is neither offered nor accepted before TLS (538 5.7.11)."""
        proto, t = self.connect("192.0.2.7", tls=True)
        proto.dataReceived(b"EHLO x\r\nAUTH PLAIN " + b64encode(b"\0groupserver\0s3cret") + b"\r\n")
        self.assertNotIn("AUTH PLAIN LOGIN", offered(lines(t)))
        self.assertEqual(lines(t)[-1][:10], "538 5.7.11")

    def test_auth_cancelled(self) -> None:
        """'*' cancels an AUTH exchange."""
        out = self.auth_session(b"AUTH PLAIN\r\n", b"*\r\n")
        self.assertEqual([o[:9] for o in out], ["334 ", "501 5.0.0"])

    def test_dsn_parameters(self) -> None:
        """
        RET/ENVID and NOTIFY/ORCPT are accepted and kept: RET and ENVID
        (still xtext) with the message, NOTIFY normalised and ORCPT decoded
        per recipient, in RCPT order; bad ones refused.
        """
        proto, t = self.connect()
        proto.dataReceived(
            b"EHLO x\r\nMAIL FROM:<a@example.org> RET=hdrs ENVID=QQ+2B314 BODY=8BITMIME\r\n"
            b"RCPT TO:<b@example.org> NOTIFY=delay,Failure ORCPT=rfc822;b+2Bx@example.org\r\n"
            b"RCPT TO:<c@example.org> NOTIFY=NEVER,SUCCESS\r\n"
            b"RCPT TO:<d@example.org>\r\n"
            b"RCPT TO:<e@example.org> NOTIFY=NEVER\r\n"
            b"DATA\r\nx: y\r\n\r\nz\r\n.\r\n"
        )
        out = lines(t)
        self.assertEqual(
            [o[:9] for o in out[-7:]],
            ["250 2.1.0", "250 2.1.5", "501 5.5.4", "250 2.1.5", "250 2.1.5", "354 End d",
             "250 2.0.0"],
        )  # fmt: skip
        [entry] = self.queue.entries
        self.assertEqual(entry.params["RET"], "HDRS")
        self.assertEqual(entry.params["ENVID"], "QQ+2B314")
        self.assertEqual(entry.params["BODY"], "8BITMIME")
        self.assertEqual(entry.recipients, ["b@example.org", "d@example.org", "e@example.org"])
        self.assertEqual(
            entry.dsn,
            [("FAILURE,DELAY", "rfc822;b+x@example.org"), ("", ""), ("NEVER", "")],
        )
        self.assertEqual([k for k in entry.params if ":" in k], [])
        self.assertFalse(entry.xverp)

    def test_no_dsn_parameters(self) -> None:
        """Without NOTIFY or ORCPT the queue is given no per-recipient DSN data."""
        proto, t = self.connect()
        proto.dataReceived(
            b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            b"x: y\r\n\r\nz\r\n.\r\n"
        )
        self.assertEqual(lines(t)[-1][:9], "250 2.0.0")
        self.assertIsNone(self.queue.entries[0].dsn)

    def test_bad_dsn_parameters(self) -> None:
        """
        Malformed DSN parameters are refused with 501 5.5.4 (RFC 3461 §4),
        an unknown RCPT parameter with 555 5.5.4; nothing is queued.
        """
        bad_mail = [
            b"ENVID=a=b",  # '=' is not xchar
            b"ENVID=a+0Db",  # decodes to a control character
            b"ENVID=a+4",  # a '+' without two hex digits
            b"ENVID=" + b"x" * 101,
            b"RET=BODY",
        ]
        bad_rcpt = [
            b"NOTIFY=SOMETIMES",
            b"NOTIFY=NEVER,DELAY",
            b"NOTIFY=FAILURE,FAILURE",
            b"ORCPT=b@example.org",
            b"ORCPT=rfc822;",
            b"ORCPT=rfc822;b+0Ax@example.org",
            b"ORCPT=rfc822;" + b"x" * 500,
            b"ORCPT=rfc(822);b@example.org",
        ]
        for param in bad_mail:
            proto, t = self.connect()
            proto.dataReceived(b"EHLO x\r\nMAIL FROM:<a@example.org> " + param + b"\r\n")
            self.assertEqual(lines(t)[-1][:9], "501 5.5.4", param)
        for param in bad_rcpt:
            proto, t = self.connect()
            proto.dataReceived(
                b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org> " + param + b"\r\n"
            )
            self.assertEqual(lines(t)[-1][:9], "501 5.5.4", param)
        proto, t = self.connect()
        proto.dataReceived(
            b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org> FOO=1\r\n"
        )
        self.assertEqual(lines(t)[-1][:9], "555 5.5.4")
        self.assertEqual(self.queue.entries, [])

    def test_queue_failure_is_transient(self) -> None:
        """
        If the queue cannot store the message (a fault other than a full
        disk), the client gets 451 4.3.0 and keeps it; the spool file is gone.
        """
        self.queue.error = OSError(errno.EACCES, "Permission denied")
        proto, t = self.connect()
        proto.dataReceived(
            b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            b"x: y\r\n\r\nz\r\n.\r\n"
        )
        self.assertEqual(lines(t)[-1][:9], "451 4.3.0")
        self.assertEqual(os.listdir(self.factory.spool_dir), [])

    def test_auth_over_plain_from_trusted_client(self) -> None:
        """
        A trusted client (127.0.0.1, in the default networks) is offered
        AUTH without TLS, since zope.sendmail calls login() whenever a user
        name is set and smtplib needs AUTH in the EHLO reply; the right
        password is 235, a wrong one 535.
        """
        proto, t = self.connect("127.0.0.1")
        token = b64encode(b"\0groupserver\0s3cret")
        proto.dataReceived(b"EHLO gs\r\nAUTH PLAIN " + token + b"\r\n")
        out = lines(t)
        self.assertIn("AUTH PLAIN LOGIN", offered(out))
        self.assertEqual(out[-1], "235 2.7.0 Authentication successful")
        proto, t = self.connect("127.0.0.1")
        proto.dataReceived(b"EHLO gs\r\nAUTH PLAIN " + b64encode(b"\0groupserver\0no") + b"\r\n")
        self.assertEqual(lines(t)[-1][:9], "535 5.7.8")

    def test_auth_over_plain_on_unix_socket(self) -> None:
        """A UNIX-socket client is trusted: AUTH LOGIN works without TLS."""
        transport = StringTransport(peerAddress=UNIXAddress(None))
        proto = self.factory.buildProtocol(UNIXAddress(None))
        proto.makeConnection(transport)
        proto.dataReceived(
            b"EHLO x\r\nAUTH LOGIN\r\n"
            + b64encode(b"groupserver")
            + b"\r\n"
            + b64encode(b"s3cret")
            + b"\r\n"
        )
        self.assertEqual(lines(transport)[-1], "235 2.7.0 Authentication successful")

    def test_foreign_client_auth_offered_after_tls(self) -> None:
        """Outside the trusted networks AUTH appears in the EHLO reply only after STARTTLS."""
        proto, t = self.connect("192.0.2.7", tls=True)
        proto.dataReceived(b"EHLO x\r\n")
        self.assertNotIn("AUTH PLAIN LOGIN", offered(lines(t)))
        self.assertIn("STARTTLS", offered(lines(t)))
        proto.dataReceived(b"STARTTLS\r\n")
        t.clear()
        proto.dataReceived(b"EHLO x\r\n")
        self.assertIn("AUTH PLAIN LOGIN", offered(lines(t)))
        self.assertNotIn("STARTTLS", offered(lines(t)))

    def test_trusted_networks_option(self) -> None:
        """
        With other trusted networks, 127.0.0.1 is a foreign client: no AUTH
        in clear (538 5.7.11), no MAIL without AUTH (554 5.7.1); a client of
        the given network is trusted.
        """
        self.factory.trusted_networks = parse_networks(["192.0.2.0/24"])
        proto, t = self.connect("127.0.0.1")
        proto.dataReceived(
            b"EHLO x\r\nAUTH PLAIN "
            + b64encode(b"\0groupserver\0s3cret")
            + b"\r\nMAIL FROM:<a@example.org>\r\n"
        )
        self.assertEqual([o[:10] for o in lines(t)[-2:]], ["538 5.7.11", "554 5.7.1 "])
        proto, t = self.connect("192.0.2.200")
        proto.dataReceived(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual(lines(t)[-1], "250 2.1.0 Sender ok")

    def tls_level(self, level: str) -> None:
        """Make the listener's TLS level C{level}."""
        self.factory.tls_security_level = level

    def test_no_tls_offers_no_starttls(self) -> None:
        """
        C{no_tls} (level C{none}): STARTTLS is neither offered nor accepted
        (454 4.7.0), and a trusted client still authenticates in clear.
        """
        self.tls_level("none")
        proto, t = self.connect("127.0.0.1", tls=True)
        proto.dataReceived(
            b"EHLO x\r\nSTARTTLS\r\nAUTH PLAIN "
            + b64encode(b"\0groupserver\0s3cret")
            + b"\r\nMAIL FROM:<a@example.org>\r\n"
        )
        out = lines(t)
        self.assertNotIn("STARTTLS", offered(out))
        self.assertEqual([o[:9] for o in out[-3:]], ["454 4.7.0", "235 2.7.0", "250 2.1.0"])

    def test_force_tls_requires_starttls(self) -> None:
        """
        C{force_tls} (level C{encrypt}): even a trusted TCP client gets
        530 5.7.0 for MAIL and 538 5.7.11 for AUTH before STARTTLS, and AUTH
        is not offered; after STARTTLS both work.
        """
        self.tls_level("encrypt")
        proto, t = self.connect("127.0.0.1", tls=True)
        proto.dataReceived(
            b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nAUTH PLAIN "
            + b64encode(b"\0groupserver\0s3cret")
            + b"\r\n"
        )
        out = lines(t)
        self.assertEqual(out[-2], "530 5.7.0 Must issue a STARTTLS command first")
        self.assertEqual(out[-1][:10], "538 5.7.11")
        self.assertNotIn("AUTH PLAIN LOGIN", offered(out))
        proto.dataReceived(b"STARTTLS\r\n")
        t.clear()
        proto.dataReceived(
            b"EHLO x\r\nAUTH PLAIN "
            + b64encode(b"\0groupserver\0s3cret")
            + b"\r\nMAIL FROM:<a@example.org>\r\n"
        )
        out = lines(t)
        self.assertIn("AUTH PLAIN LOGIN", offered(out))
        self.assertEqual([o[:9] for o in out[-2:]], ["235 2.7.0", "250 2.1.0"])

    def test_starttls_forgets_login(self) -> None:
        """
        A login in clear does not survive STARTTLS (RFC 3207 §4.2): a trusted
        client that logged in before logs in again over TLS (not 503 "Already
        authenticated").
        """
        proto, t = self.connect("127.0.0.1", tls=True)
        token = b64encode(b"\0groupserver\0s3cret")
        proto.dataReceived(b"EHLO x\r\nAUTH PLAIN " + token + b"\r\nSTARTTLS\r\n")
        proto.dataReceived(b"EHLO x\r\nAUTH PLAIN " + token + b"\r\n")
        out = lines(t)
        self.assertEqual(out[-1], "235 2.7.0 Authentication successful")
        self.assertEqual(proto.session.with_protocol, "ESMTPSA")

    def test_force_tls_exempts_unix_socket(self) -> None:
        """A UNIX-socket client never leaves the host: no STARTTLS needed with C{encrypt}."""
        self.tls_level("encrypt")
        transport = StringTransport(peerAddress=UNIXAddress(None))
        proto = self.factory.buildProtocol(UNIXAddress(None))
        proto.makeConnection(transport)
        proto.dataReceived(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual(lines(transport)[-1], "250 2.1.0 Sender ok")

    def test_tls_level_checked(self) -> None:
        """An unknown level, or C{encrypt} without a certificate, is refused at once."""
        core = SubmissionCore(self.queue)
        self.assertRaises(
            ValueError,
            SubmissionFactory,
            core,
            ServerSettings(hostname="h", tls=object()),
            self.clock,
            tls_security_level="optional",
        )
        self.assertRaises(
            ValueError,
            SubmissionFactory,
            core,
            ServerSettings(hostname="h"),
            self.clock,
            tls_security_level="encrypt",
        )

    def test_no_auth_without_account(self) -> None:
        """Without a user name AUTH is not offered at all (503 5.5.1), even to trusted clients."""
        self.factory.checker = None
        proto, t = self.connect("127.0.0.1")
        proto.dataReceived(b"EHLO x\r\nAUTH PLAIN AGEAYg==\r\n")
        self.assertNotIn("AUTH PLAIN LOGIN", offered(lines(t)))
        self.assertEqual(lines(t)[-1][:9], "503 5.5.1")

    def test_queue_disk_full(self) -> None:
        """
        The queue's disk is full (ENOSPC, EDQUOT) or failing (EIO): every
        submission gets 452 4.3.1 and keeps its message; the fault is logged
        once for the burst, without a traceback; once the queue works again
        the next message is queued (250) on the same connection.
        """
        events: list[LogEvent] = []
        self.patch(spool_module, "log", Logger(observer=events.append))
        proto, t = self.connect()
        proto.dataReceived(b"EHLO x\r\n")
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EIO) * 3:
            self.queue.error = OSError(code, os.strerror(code))
            t.clear()
            proto.dataReceived(
                b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                b"x: y\r\n\r\nz\r\n.\r\n"
            )
            self.assertEqual(lines(t)[-1], "452 4.3.1 Insufficient system storage")
        self.assertEqual(os.listdir(self.factory.spool_dir), [])
        self.assertEqual([e["log_level"] for e in events], [LogLevel.error])
        self.queue.error = None
        t.clear()
        proto.dataReceived(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            b"x: y\r\n\r\nback\r\n.\r\n"
        )
        self.assertEqual(lines(t)[-1], "250 2.0.0 Queued as q1")
        self.assertEqual(len(events), 2)

    def test_spool_disk_full(self) -> None:
        """
        The spool's disk is full before the message reaches the queue: the
        client gets 452 4.3.1, nothing is queued, nothing is left open.
        """
        disk = DiskFaults(self)
        before = open_descriptors()
        proto, t = self.connect()
        disk.write_error = errno.ENOSPC
        proto.dataReceived(
            b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            b"x: y\r\n\r\nz\r\n.\r\n"
        )
        self.assertEqual(lines(t)[-1], "452 4.3.1 Insufficient system storage")
        self.assertEqual(self.queue.entries, [])
        self.assertEqual(os.listdir(self.factory.spool_dir), [])
        self.assertEqual(open_descriptors(), before)

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
