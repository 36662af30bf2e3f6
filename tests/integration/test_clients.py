"""
Real clients against a running gsmail (embedded stand-in): Python's smtplib
over ESMTP, STARTTLS and LMTP, raw sockets that pipeline whole sessions or try
STARTTLS injection and SMTP smuggling, and swaks. Each test starts its own
service on 127.0.0.1 and asserts what a sender sees (reply codes, in order)
and what the group got (the stand-in's stored posts, relays and bounces).

Blocking clients run in a thread (C{deferToThread}) so that the reactor keeps
serving them; every socket has a timeout, so no test can hang.

The clients (L{tests.integration.clients}) are shared with other tests.
"""

from __future__ import annotations

import os
import smtplib
import ssl

from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from gsmail import status
from gsmail.service import GsmailService
from tests.bounce_samples import dsn
from tests.certificates import make_certificate
from tests.integration.clients import (
    CLIENT_TIMEOUT,
    DEV,
    EXAMPLE,
    FOREIGN,
    SENDER,
    UNKNOWN_GROUP,
    RawClient,
    RawReply,
    as_stored,
    codes,
    make_message,
    raised,
    send_once,
    smtp_client,
    smtplib_codes,
    strip_trace,
)
from tests.util import DOMAIN, make_config, port_of, require_tool, start_service

# -- helpers shared by the integration tests ---------------------------------


# -- the tests -----------------------------------------------------------------


class SMTPLibTests(TestCase):
    """Python's smtplib over ESMTP."""

    def setUp(self) -> None:
        self.service: GsmailService = start_service(self, make_config(self.mktemp()))
        self.port = port_of(self.service, "smtp")

    def assertNothingPosted(self) -> None:
        for group in ("example", "dev"):
            self.assertEqual(self.service.standin.posts(group), [], f"a post in {group}")

    async def test_two_groups(self) -> None:
        """A message to two groups is posted once in each, each copy naming its own list."""
        message = make_message("two-groups@example.org")

        def send() -> dict[str, tuple[int, bytes]]:
            with smtp_client(self.port) as client:
                return client.sendmail(SENDER, [EXAMPLE, DEV], message)

        self.assertEqual(await deferToThread(send), {})
        for group, address in (("example", EXAMPLE), ("dev", DEV)):
            [post] = self.service.standin.posts(group)
            self.assertEqual(strip_trace(post), as_stored(message))
            self.assertIn(f"X-Original-To: {address}\n".encode(), post)

    async def test_unknown_group_among_others(self) -> None:
        """
        An unknown group is refused at RCPT with 550 5.1.1 (in smtplib's refused
        dict) while the known group still gets the message.
        """
        message = make_message("one-unknown@example.org")

        def send() -> dict[str, tuple[int, bytes]]:
            with smtp_client(self.port) as client:
                return client.sendmail(SENDER, [UNKNOWN_GROUP, EXAMPLE], message)

        refused = await deferToThread(send)
        self.assertEqual(list(refused), [UNKNOWN_GROUP])
        self.assertEqual(smtplib_codes(refused[UNKNOWN_GROUP]), codes(status.NO_SUCH_GROUP))
        self.assertEqual(len(self.service.standin.posts("example")), 1)

    async def test_only_unknown_group(self) -> None:
        """
        A message whose only recipient is an unknown group is refused with
        550 5.1.1 (SMTPRecipientsRefused) and never sent.
        """

        def send() -> None:
            with smtp_client(self.port) as client:
                client.sendmail(SENDER, [UNKNOWN_GROUP], make_message("unknown@example.org"))

        error = await deferToThread(raised, smtplib.SMTPRecipientsRefused, send)
        self.assertEqual(list(error.recipients), [UNKNOWN_GROUP])
        self.assertEqual(
            smtplib_codes(error.recipients[UNKNOWN_GROUP]), codes(status.NO_SUCH_GROUP)
        )
        self.assertNothingPosted()

    async def test_foreign_domain_refused(self) -> None:
        """
        gsmail is not an open relay: recipients outside its domains (also one
        that merely starts with a group's address) get 550 5.7.1, nothing is
        posted or relayed, and GroupServer is not even asked.
        """
        lookalike = f"example@{DOMAIN}.example.net"

        def send() -> None:
            with smtp_client(self.port) as client:
                client.sendmail(SENDER, [FOREIGN, lookalike], make_message("relay@example.org"))

        error = await deferToThread(raised, smtplib.SMTPRecipientsRefused, send)
        self.assertEqual(sorted(error.recipients), sorted([FOREIGN, lookalike]))
        for answer in error.recipients.values():
            self.assertEqual(smtplib_codes(answer), codes(status.RELAY_DENIED))
        self.assertNothingPosted()
        self.assertEqual(self.service.standin.relays(), [])
        self.assertEqual(sum(self.service.standin.requests.values()), 0)

    async def test_member_relay_address(self) -> None:
        """A message to a relay address (C{p-...}) goes to GroupServer's relay page."""
        message = make_message("relay-member@example.org")
        answers = await deferToThread(send_once, self.port, [f"p-abc@{DOMAIN}"], message)
        self.assertEqual(
            [smtplib_codes(a) for a in answers.rcpts], [codes(status.RELAY_ADDRESS_OK)]
        )
        assert answers.data is not None
        self.assertEqual(smtplib_codes(answers.data), codes(status.RELAYED))
        [relayed] = self.service.standin.relays()
        self.assertEqual(strip_trace(relayed), as_stored(message))
        self.assertNothingPosted()

    async def test_xverp_bounce(self) -> None:
        """
        A bounce (an RFC 3464 report of a failure) sent to an XVERP address
        (C{group+user=domain@site}) is recorded for that member and group, and
        not posted to the group.
        """
        bounce = dsn("bob@example.net", to=f"example+bob=example.net@{DOMAIN}").replace(
            b"\n", b"\r\n"
        )
        answers = await deferToThread(
            send_once, self.port, [f"example+bob=example.net@{DOMAIN}"], bounce, sender=""
        )
        self.assertEqual(
            [smtplib_codes(a) for a in answers.rcpts], [codes(status.BOUNCE_ADDRESS_OK)]
        )
        assert answers.data is not None
        self.assertEqual(smtplib_codes(answers.data), codes(status.BOUNCE_RECORDED))
        self.assertEqual(self.service.standin.bounces(), [("bob@example.net", EXAMPLE)])
        self.assertNothingPosted()

    async def test_smtputf8(self) -> None:
        """
        With SMTPUTF8, a UTF-8 sender address and UTF-8 header fields arrive
        intact, and the Received field says C{with UTF8SMTP} (RFC 6531 §3.7.4).
        """
        sender = "ålice@exämple.org"
        message = (
            "From: Ålice <ålice@exämple.org>\r\n"
            f"To: {EXAMPLE}\r\n"
            "Subject: Grüße aus Köln ✉\r\n"
            "Message-ID: <utf8-1@exämple.org>\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
            "Schöne Grüße, 日本語も.\r\n"
        ).encode()
        answers = await deferToThread(
            send_once,
            self.port,
            [EXAMPLE],
            message,
            sender=sender,
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
        assert answers.data is not None
        self.assertEqual(smtplib_codes(answers.data), codes(status.POSTED))
        [post] = self.service.standin.posts("example")
        self.assertEqual(strip_trace(post), as_stored(message))
        self.assertTrue(post.startswith(f"Return-Path: <{sender}>\n".encode()))
        self.assertIn(b" with UTF8SMTP ", post)

    async def test_same_message_twice(self) -> None:
        """
        The same message sent again (a retry on a new connection) is answered
        250 "Already delivered" and not posted a second time.
        """
        message = make_message("twice@example.org")
        first = await deferToThread(send_once, self.port, [EXAMPLE], message)
        second = await deferToThread(send_once, self.port, [EXAMPLE], message)
        assert first.data is not None and second.data is not None
        self.assertEqual(smtplib_codes(first.data), codes(status.POSTED))
        self.assertEqual(second.data, (250, status.ALREADY_DELIVERED.status_line().encode()))
        self.assertEqual(len(self.service.standin.posts("example")), 1)


class SizeLimitTests(TestCase):
    """The SIZE limit (RFC 1870), with max_size = 1 KiB."""

    def setUp(self) -> None:
        self.service: GsmailService = start_service(self, make_config(self.mktemp(), max_size=1024))
        self.port = port_of(self.service, "smtp")
        self.message = make_message("big@example.org", body=("y" * 70 + "\r\n") * 40)

    async def test_declared_size_refused_at_mail(self) -> None:
        """
        smtplib declares SIZE; a size over max_size is refused at MAIL with
        552 5.3.4 (SMTPSenderRefused) and nothing is posted.
        """

        def send() -> None:
            with smtp_client(self.port) as client:
                client.sendmail(SENDER, [EXAMPLE], self.message)

        error = await deferToThread(raised, smtplib.SMTPSenderRefused, send)
        self.assertEqual(
            smtplib_codes((error.smtp_code, error.smtp_error)), codes(status.MESSAGE_TOO_BIG)
        )
        self.assertEqual(self.service.standin.posts("example"), [])

    async def test_undeclared_size_refused_after_data(self) -> None:
        """
        A message over max_size sent without SIZE is refused after the final
        dot with 552 5.3.4, and nothing is posted.
        """
        answers = await deferToThread(send_once, self.port, [EXAMPLE], self.message)
        self.assertEqual(smtplib_codes(answers.mail), codes(status.SENDER_OK))
        assert answers.data is not None
        self.assertEqual(smtplib_codes(answers.data), codes(status.MESSAGE_TOO_BIG))
        self.assertEqual(self.service.standin.posts("example"), [])


class STARTTLSTests(TestCase):
    """STARTTLS with a real TLS client."""

    def setUp(self) -> None:
        directory = self.mktemp()
        cert, key, self.cert_pem = make_certificate(os.path.join(directory, "tls"))
        config = make_config(directory, tls_certificate=cert, tls_key=key)
        self.service: GsmailService = start_service(self, config)
        self.port = port_of(self.service, "smtp")

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test certificate, checking its name."""
        return ssl.create_default_context(cadata=self.cert_pem)

    async def test_smtplib_starttls(self) -> None:
        """
        smtplib upgrades with STARTTLS (certificate and name verified), the
        message is posted, and its Received field says C{with ESMTPS}.
        STARTTLS is offered before the upgrade and not after it.
        """
        message = make_message("tls@example.org")
        context = self.client_context()

        def send() -> tuple[bool, bool, dict[str, tuple[int, bytes]]]:
            with smtp_client(self.port) as client:
                client.ehlo()
                before = client.has_extn("starttls")
                client.starttls(context=context)
                client.ehlo()
                after = client.has_extn("starttls")
                return before, after, client.sendmail(SENDER, [EXAMPLE], message)

        before, after, refused = await deferToThread(send)
        self.assertEqual((before, after, refused), (True, False, {}))
        [post] = self.service.standin.posts("example")
        self.assertIn(b" with ESMTPS ", post)
        self.assertEqual(strip_trace(post), as_stored(message))

    async def test_starttls_injection(self) -> None:
        """
        A command pipelined in plaintext after STARTTLS (CVE-2011-0411) is not
        run inside the TLS session: after the handshake and EHLO, RCPT is
        answered 503 as there was no MAIL.
        """
        context = self.client_context()

        def talk() -> list[RawReply]:
            with RawClient(self.port) as client:
                client.reply()
                client.send(b"EHLO x\r\nSTARTTLS\r\nMAIL FROM:<a@b.c>\r\n")
                replies = client.replies(2)
                client.start_tls(context, "127.0.0.1")
                client.send(b"EHLO y\r\n")
                replies.append(client.reply())
                client.send(f"RCPT TO:<{EXAMPLE}>\r\nQUIT\r\n".encode())
                replies += client.replies(2)
                return replies

        ehlo, ready, ehlo_tls, rcpt, quit_ = await deferToThread(talk)
        self.assertIn("STARTTLS", ehlo.lines)
        self.assertEqual(ready.codes, codes(status.READY_FOR_TLS))
        self.assertEqual(ehlo_tls.code, 250)
        self.assertNotIn("STARTTLS", ehlo_tls.lines)
        self.assertEqual(rcpt.codes, codes(status.NEED_MAIL))
        self.assertEqual(quit_.codes, codes(status.CLOSING))


class PipeliningTests(TestCase):
    """Whole sessions written at once on a raw socket (RFC 2920, RFC 2033)."""

    def setUp(self) -> None:
        self.service: GsmailService = start_service(self, make_config(self.mktemp()))

    async def test_esmtp_session_in_one_write(self) -> None:
        """
        EHLO, MAIL, three RCPTs (a group, an unknown group, a foreign domain)
        and DATA in one write get their replies in command order with the right
        codes; the message and QUIT in one write get 250 and 221.
        """
        port = port_of(self.service, "smtp")
        message = make_message("pipelined@example.org")

        def talk() -> tuple[list[RawReply], bool]:
            with RawClient(port) as client:
                replies = [client.reply()]
                client.send(
                    b"EHLO client.example.org\r\n"
                    + f"MAIL FROM:<{SENDER}>\r\n".encode()
                    + f"RCPT TO:<{EXAMPLE}>\r\n".encode()
                    + f"RCPT TO:<{UNKNOWN_GROUP}>\r\n".encode()
                    + f"RCPT TO:<{FOREIGN}>\r\n".encode()
                    + b"DATA\r\n"
                )
                replies += client.replies(6)
                client.send(message + b".\r\nQUIT\r\n")
                replies += client.replies(2)
                return replies, client.closed_by_server()

        (greeting, ehlo, *rest), closed = await deferToThread(talk)
        self.assertTrue(closed, "the connection stayed open after QUIT")
        self.assertEqual((greeting.code, ehlo.code), (220, 250))
        self.assertIn("PIPELINING", ehlo.lines)
        self.assertEqual(
            [r.codes for r in rest],
            [
                codes(status.SENDER_OK),
                codes(status.RECIPIENT_OK),
                codes(status.NO_SUCH_GROUP),
                codes(status.RELAY_DENIED),
                codes(status.START_DATA),
                codes(status.POSTED),
                codes(status.CLOSING),
            ],
        )
        [post] = self.service.standin.posts("example")
        self.assertEqual(strip_trace(post), as_stored(message))

    async def test_lmtp_session_in_one_write(self) -> None:
        """
        The same over LMTP: after the final dot there is one reply per
        accepted recipient, in RCPT order, then QUIT's 221.
        """
        port = port_of(self.service, "lmtp")
        message = make_message("pipelined-lmtp@example.org")

        def talk() -> tuple[list[RawReply], bool]:
            with RawClient(port) as client:
                replies = [client.reply()]
                client.send(
                    b"LHLO client.example.org\r\n"
                    + f"MAIL FROM:<{SENDER}>\r\n".encode()
                    + f"RCPT TO:<{EXAMPLE}>\r\n".encode()
                    + f"RCPT TO:<{UNKNOWN_GROUP}>\r\n".encode()
                    + f"RCPT TO:<{DEV}>\r\n".encode()
                    + b"DATA\r\n"
                )
                replies += client.replies(6)
                client.send(message + b".\r\nQUIT\r\n")
                replies += client.replies(3)
                return replies, client.closed_by_server()

        (greeting, lhlo, *rest), closed = await deferToThread(talk)
        self.assertTrue(closed, "the connection stayed open after QUIT")
        self.assertEqual((greeting.code, lhlo.code), (220, 250))
        self.assertEqual(
            [r.codes for r in rest],
            [
                codes(status.SENDER_OK),
                codes(status.RECIPIENT_OK),
                codes(status.NO_SUCH_GROUP),
                codes(status.RECIPIENT_OK),
                codes(status.START_DATA),
                codes(status.POSTED),
                codes(status.POSTED),
                codes(status.CLOSING),
            ],
        )
        for group in ("example", "dev"):
            [post] = self.service.standin.posts(group)
            self.assertEqual(strip_trace(post), as_stored(message))


class SMTPLibLMTPTests(TestCase):
    """Python's smtplib.LMTP against the LMTP port."""

    async def test_lmtp_single_recipient(self) -> None:
        """
        smtplib.LMTP delivers to one group (it reads one reply after DATA, so
        one recipient); the Received field says C{with LMTP}.
        """
        service = start_service(self, make_config(self.mktemp()))
        port = port_of(service, "lmtp")
        message = make_message("lmtp@example.org")

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.LMTP("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as client:
                return client.sendmail(SENDER, [DEV], message)

        self.assertEqual(await deferToThread(send), {})
        [post] = service.standin.posts("dev")
        self.assertEqual(strip_trace(post), as_stored(message))
        self.assertIn(b" with LMTP ", post)


class SwaksTests(TestCase):
    """swaks, the SMTP test tool operators use."""

    def setUp(self) -> None:
        self.swaks = require_tool("swaks")
        self.service: GsmailService = start_service(self, make_config(self.mktemp()))

    async def run_swaks(self, port: int, *args: str) -> tuple[bytes, int]:
        """Run swaks against C{port}; its output (stdout and stderr) and exit code."""
        out, err, code = await getProcessOutputAndValue(
            self.swaks,
            [
                "--server",
                f"127.0.0.1:{port}",
                "--timeout",
                "10",
                "--helo",
                "client.example.org",
                "--from",
                SENDER,
                *args,
            ],
            env=dict(os.environ),
        )
        return out + err, code

    async def test_esmtp(self) -> None:
        """swaks over ESMTP: exit code 0, the message is posted."""
        output, code = await self.run_swaks(port_of(self.service, "smtp"), "--to", EXAMPLE)
        self.assertEqual(code, 0, output.decode(errors="replace"))
        [post] = self.service.standin.posts("example")
        self.assertIn(b"This is a test mailing", post)

    async def test_lmtp(self) -> None:
        """swaks --protocol LMTP to the LMTP port: exit code 0, the message is posted."""
        output, code = await self.run_swaks(
            port_of(self.service, "lmtp"), "--protocol", "LMTP", "--to", DEV
        )
        self.assertEqual(code, 0, output.decode(errors="replace"))
        self.assertIn(b"LHLO client.example.org", output)
        [post] = self.service.standin.posts("dev")
        self.assertIn(b" with LMTP ", post)

    async def test_pipeline(self) -> None:
        """swaks --pipeline to two groups: exit code 0, both groups get the message."""
        output, code = await self.run_swaks(
            port_of(self.service, "smtp"), "--pipeline", "--to", f"{EXAMPLE},{DEV}"
        )
        self.assertEqual(code, 0, output.decode(errors="replace"))
        # Pipelined: DATA went out before the answer to MAIL came back.
        self.assertIn(b" -> DATA\n<-  250 2.1.0", output)
        self.assertEqual(len(self.service.standin.posts("example")), 1)
        self.assertEqual(len(self.service.standin.posts("dev")), 1)

    async def test_unknown_group(self) -> None:
        """swaks to an unknown group fails (non-zero exit) and shows 550 5.1.1."""
        output, code = await self.run_swaks(port_of(self.service, "smtp"), "--to", UNKNOWN_GROUP)
        self.assertNotEqual(code, 0, output.decode(errors="replace"))
        self.assertIn(
            f"{status.NO_SUCH_GROUP.code} {status.NO_SUCH_GROUP.enhanced} ".encode(), output
        )
        self.assertEqual(self.service.standin.posts("example"), [])


class SmugglingTests(TestCase):
    """
    SMTP smuggling over a real socket: a fake end of data made with bare LF or
    CR must not end the message, so the commands after it are message text.
    """

    def setUp(self) -> None:
        self.service: GsmailService = start_service(self, make_config(self.mktemp()))

    async def smuggle(self, fake_end: bytes, message_id: str) -> None:
        """
        Send a message holding C{fake_end} then MAIL/RCPT/DATA for group
        C{dev}; check that only one message, in C{example}, was posted and it
        holds the smuggled text.
        """
        port = port_of(self.service, "smtp")
        message = (
            b"From: mallory@example.org\r\n"
            + f"Message-ID: <{message_id}>\r\n".encode()
            + b"Subject: innocent\r\n\r\nHello"
            + fake_end
            + b"MAIL FROM:<mallory@example.org>\r\n"
            + f"RCPT TO:<{DEV}>\r\n".encode()
            + b"DATA\r\n"
            + b"Subject: smuggled\r\n\r\nevil\r\n"
        )

        def talk() -> tuple[list[RawReply], bool]:
            with RawClient(port) as client:
                client.reply()
                client.send(
                    b"EHLO client.example.org\r\n"
                    + b"MAIL FROM:<mallory@example.org>\r\n"
                    + f"RCPT TO:<{EXAMPLE}>\r\n".encode()
                    + b"DATA\r\n"
                )
                replies = client.replies(4)
                client.send(message + b".\r\nQUIT\r\n")
                replies += client.replies(2)
                return replies, client.closed_by_server()

        replies, closed = await deferToThread(talk)
        self.assertTrue(closed, "the connection stayed open after QUIT")
        self.assertEqual(
            [r.codes for r in replies[1:]],
            [
                codes(status.SENDER_OK),
                codes(status.RECIPIENT_OK),
                codes(status.START_DATA),
                codes(status.POSTED),
                codes(status.CLOSING),
            ],
        )
        [post] = self.service.standin.posts("example")
        self.assertIn(f"RCPT TO:<{DEV}>".encode(), post)
        self.assertIn(b"Subject: smuggled", post)
        self.assertEqual(self.service.standin.posts("dev"), [])

    async def test_bare_lf_dot_bare_lf(self) -> None:
        """C{LF . LF} does not end the message: nothing is smuggled."""
        await self.smuggle(b"\n.\n", "smuggle-lf@example.org")

    async def test_bare_lf_dot_crlf(self) -> None:
        """C{LF . CR LF} does not end the message: nothing is smuggled."""
        await self.smuggle(b"\n.\r\n", "smuggle-lf-crlf@example.org")

    async def test_crlf_dot_bare_lf(self) -> None:
        """C{CR LF . LF} does not end the message: nothing is smuggled."""
        await self.smuggle(b"\r\n.\n", "smuggle-crlf-lf@example.org")

    async def test_bare_cr_dot_bare_cr(self) -> None:
        """C{CR . CR} does not end the message: nothing is smuggled."""
        await self.smuggle(b"\r.\r", "smuggle-cr@example.org")
