# -*- test-case-name: tests.integration.test_postfix -*-
"""
Real Postfix as gsmail's LMTP client, set up as C{conf/postfix/main.cf.example}
describes (L{tests.integration.postfix.PrivatePostfix}): mail submitted to
Postfix's smtpd with smtplib is handed to gsmail over LMTP, and the tests read
both ends: what the GroupServer stand-in stored, and the delivery status
Postfix logged. Also Postfix's smtp-source load generator speaking LMTP to
gsmail directly.

Each test starts its own Postfix (about 2 s) and gsmail; every wait is
bounded (see L{tests.integration.postfix.STATUS_TIMEOUT}).
"""

from __future__ import annotations

import email.parser
import email.policy
import os
import re
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from gsmail import status
from gsmail.service import GsmailService
from tests.integration.postfix import PrivatePostfix, ProcessResult, run_process
from tests.util import make_config, port_of, require_tool, start_service

EXAMPLE = "example@groups.example.com"
DEV = "dev@groups.example.com"
NOSUCH = "nosuch@groups.example.com"
SENDER = "alice@example.org"

#: Seconds gsmail's connections may stay open after Postfix stopped.
DRAIN_TIMEOUT = 10.0


def wire(reply: status.Reply) -> str:
    """A reply as Postfix logs it after C{status=...}: C{"250 2.0.0 Added to the group"}."""
    return f"{reply.code} {reply.status_line()}"


def message(message_id: str, subject: str = "Hello", body: str = "Hello, group.\r\n") -> bytes:
    """A small message with CRLF line ends."""
    return (
        f"From: Alice <{SENDER}>\r\n"
        f"To: {EXAMPLE}\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{message_id}>\r\n"
        f"\r\n{body}"
    ).encode()


def header_values(raw: bytes, name: str) -> list[str]:
    """Every value of header field C{name} in a stored post (LF line ends)."""
    parsed = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)
    return [str(v) for v in parsed.get_all(name, [])]


async def wait_for_no_connections(service: GsmailService) -> None:
    """
    Wait until gsmail has no LMTP connection left (Postfix's cached LMTP
    sessions close when Postfix stops), so the test ends with a clean reactor.
    """
    factory = service.lmtp_factory
    assert factory is not None
    deadline = reactor.seconds() + DRAIN_TIMEOUT
    while factory.connections > 0:
        if reactor.seconds() > deadline:
            raise AssertionError(
                f"{factory.connections} LMTP connection(s) still open {DRAIN_TIMEOUT} s "
                "after Postfix stopped"
            )
        await deferLater(reactor, 0.1, lambda: None)


class PostfixLMTPTests(TestCase):
    """Postfix delivers the site's mail to gsmail over LMTP."""

    timeout = 60

    async def start(
        self, over_tcp: bool = False, extra: dict[str, str] | None = None
    ) -> tuple[GsmailService, PrivatePostfix]:
        """
        Start gsmail (LMTP only, on a UNIX socket or 127.0.0.1) and a private
        Postfix handing groups.example.com to it. Cleanup, in this order:
        Postfix stops, gsmail's connections close, gsmail stops.
        """
        postfix = PrivatePostfix(self)
        if over_tcp:
            config = make_config(self.mktemp(), smtp_endpoint="")
        else:
            socket_path = postfix.path("lmtp.sock")
            config = make_config(
                self.mktemp(), smtp_endpoint="", lmtp_endpoint=f"unix:{socket_path}:mode=666"
            )
        service = start_service(self, config)
        self.addCleanup(lambda: Deferred.fromCoroutine(wait_for_no_connections(service)))
        if over_tcp:
            transport = f"lmtp:inet:127.0.0.1:{port_of(service, 'lmtp')}"
        else:
            transport = f"lmtp:unix:{socket_path}"
        await postfix.start(transport, extra)
        return service, postfix

    async def test_post_delivered_once(self) -> None:
        """
        A message sent to Postfix for example@groups.example.com reaches the
        group exactly once, with X-Original-To naming the list address, and
        Postfix logs it as sent with gsmail's reply.
        """
        service, postfix = await self.start()
        refused = await postfix.send(SENDER, [EXAMPLE], message("once@example.org"))
        self.assertEqual(refused, {})

        sent = await postfix.attempt(EXAMPLE)
        self.assertEqual(
            (sent.status, sent.agent, sent.dsn, sent.text),
            ("sent", "lmtp", "2.0.0", wire(status.POSTED)),
        )
        self.assertIn("lmtp.sock", sent.relay)
        [post] = service.standin.posts("example")
        self.assertEqual(header_values(post, "X-Original-To"), [EXAMPLE])
        self.assertEqual(header_values(post, "Message-ID"), ["<once@example.org>"])
        self.assertTrue(post.endswith(b"\n\nHello, group.\n"), post)
        self.assertEqual(service.standin.requests["add"], 1)
        self.assertEqual([d.status for d in postfix.deliveries(EXAMPLE)], ["sent"])

    async def test_unknown_group_bounces(self) -> None:
        """
        Mail for an address no group has is refused by gsmail with 550 5.1.1,
        so Postfix bounces it (it does not retry), and nothing is posted.
        """
        service, postfix = await self.start()
        refused = await postfix.send(SENDER, [NOSUCH], message("unknown@example.org"))
        self.assertEqual(refused, {})  # Postfix accepts; its LMTP delivery fails

        bounced = await postfix.attempt(NOSUCH)
        self.assertEqual((bounced.status, bounced.dsn), ("bounced", "5.1.1"))
        self.assertIn(wire(status.NO_SUCH_GROUP), bounced.text)
        self.assertIn("RCPT TO", bounced.text)  # refused before any data was sent
        self.assertEqual(service.standin.post_records(), [])
        self.assertEqual(service.standin.requests["add"], 0)

    async def test_two_groups_and_an_unknown_one(self) -> None:
        """
        One message to two groups and an unknown address: each group gets it
        once (LMTP answers per recipient, RFC 2033 §4.2), and only the unknown
        address bounces.
        """
        service, postfix = await self.start()
        refused = await postfix.send(SENDER, [EXAMPLE, DEV, NOSUCH], message("three@example.org"))
        self.assertEqual(refused, {})

        to_example = await postfix.attempt(EXAMPLE)
        to_dev = await postfix.attempt(DEV)
        bounced = await postfix.attempt(NOSUCH)
        self.assertEqual((to_example.status, to_example.text), ("sent", wire(status.POSTED)))
        self.assertEqual((to_dev.status, to_dev.text), ("sent", wire(status.POSTED)))
        self.assertEqual((bounced.status, bounced.dsn), ("bounced", "5.1.1"))
        self.assertEqual(to_example.queue_id, to_dev.queue_id)  # one message, two replies
        [example_post] = service.standin.posts("example")
        [dev_post] = service.standin.posts("dev")
        self.assertEqual(header_values(example_post, "X-Original-To"), [EXAMPLE])
        self.assertEqual(header_values(dev_post, "X-Original-To"), [DEV])
        self.assertEqual(header_values(dev_post, "Message-ID"), ["<three@example.org>"])

    async def test_smtputf8_message(self) -> None:
        """
        A UTF-8 message sent with SMTPUTF8 (UTF-8 sender address and header
        fields) is not bounced with 5.6.7 by Postfix, because gsmail offers
        SMTPUTF8 over LMTP; the post keeps the UTF-8 header bytes intact.
        """
        service, postfix = await self.start()
        subject = "Grüße aus Köln ☕"
        raw = (
            "From: Jörg <jörg@example.org>\r\n"
            f"To: {EXAMPLE}\r\n"
            f"Subject: {subject}\r\n"
            "Message-ID: <utf8@example.org>\r\n"
            "\r\nSchöne Grüße\r\n"
        ).encode()
        refused = await postfix.send("jörg@example.org", [EXAMPLE], raw, mail_options=["SMTPUTF8"])
        self.assertEqual(refused, {})

        sent = await postfix.attempt(EXAMPLE)
        self.assertNotEqual(sent.dsn, "5.6.7", sent.line)
        self.assertEqual((sent.status, sent.text), ("sent", wire(status.POSTED)))
        [post] = service.standin.posts("example")
        self.assertIn(f"Subject: {subject}\n".encode(), post)
        self.assertIn("From: Jörg <jörg@example.org>\n".encode(), post)
        self.assertIn("Return-Path: <jörg@example.org>\n".encode(), post)

    async def test_groupserver_down_then_retried(self) -> None:
        """
        When GroupServer fails (HTTP 500 on the add-email page), gsmail answers
        451 4.5.0, Postfix keeps the message and retries after its backoff,
        and the retry posts it: exactly one post in the end.
        """
        service, postfix = await self.start()
        service.standin.faults.status = 500
        service.standin.faults.pages = frozenset({"add"})
        service.standin.faults.remaining = 1
        refused = await postfix.send(SENDER, [EXAMPLE], message("down@example.org"))
        self.assertEqual(refused, {})

        deferred = await postfix.attempt(EXAMPLE, 1)
        self.assertEqual((deferred.status, deferred.dsn), ("deferred", "4.5.0"))
        self.assertIn(wire(status.GROUPSERVER_ERROR), deferred.text)
        sent = await postfix.attempt(EXAMPLE, 2)
        self.assertEqual((sent.status, sent.text), ("sent", wire(status.POSTED)))
        self.assertEqual(sent.queue_id, deferred.queue_id)
        self.assertEqual(len(service.standin.posts("example")), 1)
        self.assertEqual(service.standin.requests["add"], 2)  # the failed try and the retry

    async def test_reply_lost_after_post_is_not_posted_twice(self) -> None:
        """
        When the connection to GroupServer drops after the post was stored,
        gsmail cannot know the outcome: it answers 451 4.4.2, Postfix retries,
        the retry adds it again, and GroupServer archives it once.
        """
        service, postfix = await self.start()
        service.standin.faults.drop = "after_store"
        service.standin.faults.pages = frozenset({"add"})
        service.standin.faults.remaining = 1
        refused = await postfix.send(SENDER, [EXAMPLE], message("dropped@example.org"))
        self.assertEqual(refused, {})

        deferred = await postfix.attempt(EXAMPLE, 1)
        self.assertEqual((deferred.status, deferred.dsn), ("deferred", "4.4.2"))
        self.assertIn(wire(status.OUTCOME_UNKNOWN), deferred.text)
        sent = await postfix.attempt(EXAMPLE, 2)
        self.assertEqual((sent.status, sent.text), ("sent", wire(status.POSTED)))
        self.assertEqual(sent.queue_id, deferred.queue_id)
        self.assertEqual(len(service.standin.posts("example")), 1)
        self.assertEqual(service.standin.requests["add"], 2)  # the retry posted again

    async def test_lmtp_over_tcp(self) -> None:
        """
        Postfix can deliver to gsmail's LMTP listener on TCP
        (C{virtual_transport = lmtp:inet:127.0.0.1:PORT}) just as on a socket.
        """
        service, postfix = await self.start(over_tcp=True)
        refused = await postfix.send(SENDER, [EXAMPLE, NOSUCH], message("tcp@example.org"))
        self.assertEqual(refused, {})

        sent = await postfix.attempt(EXAMPLE)
        self.assertEqual((sent.status, sent.text), ("sent", wire(status.POSTED)))
        self.assertIn(f"127.0.0.1]:{port_of(service, 'lmtp')}", sent.relay)
        bounced = await postfix.attempt(NOSUCH)
        self.assertEqual((bounced.status, bounced.dsn), ("bounced", "5.1.1"))
        [post] = service.standin.posts("example")
        self.assertEqual(header_values(post, "X-Original-To"), [EXAMPLE])

    async def test_recipient_verified_at_rcpt_time(self) -> None:
        """
        With the example's C{reject_unverified_recipient}, Postfix asks gsmail
        (an LMTP probe) while the sender is still connected: an unknown group
        is refused at RCPT with 550 5.1.1 (no bounce message later), while the
        known group's copy is delivered.
        """
        service, postfix = await self.start(
            extra={
                # As conf/postfix/main.cf.example, for a client from outside
                # mynetworks: permit_mynetworks would skip the check for 127.0.0.1.
                "mynetworks": "192.0.2.0/24",
                "smtpd_recipient_restrictions": (
                    "permit_mynetworks, reject_unauth_destination, reject_unverified_recipient"
                ),
                "unverified_recipient_reject_code": "550",
                # Wait up to 9 s at RCPT for the probe (default: 3 polls 3 s apart).
                "address_verify_poll_delay": "1s",
                "address_verify_poll_count": "10",
            }
        )
        refused = await postfix.send(SENDER, [EXAMPLE, NOSUCH], message("verify@example.org"))
        self.assertEqual(list(refused), [NOSUCH])
        code, text = refused[NOSUCH]
        self.assertEqual(code, 550)
        self.assertIn(b"5.1.1", text)
        self.assertIn(wire(status.NO_SUCH_GROUP).encode(), text)

        # Postfix probed each address over LMTP (RCPT, no DATA) before accepting.
        probe = await postfix.attempt(EXAMPLE, 1)
        self.assertEqual(probe.status, "deliverable")
        sent = await postfix.attempt(EXAMPLE, 2)
        self.assertEqual((sent.status, sent.text), ("sent", wire(status.POSTED)))
        self.assertEqual(len(service.standin.posts("example")), 1)
        self.assertEqual(service.standin.requests["add"], 1)
        # The unknown address was only probed: nothing to bounce later.
        [nosuch_probe] = postfix.deliveries(NOSUCH)
        self.assertEqual((nosuch_probe.status, nosuch_probe.dsn), ("undeliverable", "5.1.1"))


class SmtpSourceTests(TestCase):
    """Postfix's smtp-source load generator drives gsmail's LMTP socket directly."""

    timeout = 60

    def start(self) -> GsmailService:
        """Start gsmail with its LMTP listener on a UNIX socket (and no ESMTP)."""
        self.smtp_source_path = require_tool("smtp-source", "/usr/sbin/smtp-source")
        # A short directory: UNIX socket paths must stay below 108 bytes.
        self.directory = tempfile.mkdtemp(prefix="gsmail-src-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        self.socket_path = os.path.join(self.directory, "lmtp.sock")
        config = make_config(
            self.mktemp(), smtp_endpoint="", lmtp_endpoint=f"unix:{self.socket_path}:mode=600"
        )
        service = start_service(self, config)
        self.addCleanup(lambda: Deferred.fromCoroutine(wait_for_no_connections(service)))
        return service

    async def smtp_source(self, *options: str) -> ProcessResult:
        """Run smtp-source in LMTP mode against gsmail's socket, sending to the example group."""
        argv = [self.smtp_source_path, "-L", "-M", "client.example.org", "-f", SENDER]
        argv += ["-t", EXAMPLE, *options, f"unix:{self.socket_path}"]
        return await run_process(argv)

    async def test_fifty_messages_in_four_sessions(self) -> None:
        """
        smtp-source sends 50 messages over LMTP in 4 parallel sessions, one
        connection per message. Every one is a distinct message: smtp-source
        writes C{Message-Id: <PID.FD.N@HOST>}, FD being the connection's file
        descriptor and N the count of messages not yet started, and no two
        messages of one run share both. (Its bodies are all the same
        "La de da de da" lines: without that Message-Id gsmail's ledger would
        key them by content, post one and acknowledge the other 49 without
        posting them; see L{test_identical_messages_posted_once}.) So all 50
        are posted, once each, and smtp-source, which stops at the first reply
        that is not 2xx, exits 0. (GroupServer itself would archive them as
        one post: same subject, body and sender make one post id. The
        stand-in is told to keep every add, to show what gsmail posted.)
        """
        service = self.start()
        assert service.standin is not None
        service.standin.archive_once = False
        result = await self.smtp_source("-s", "4", "-m", "50")
        self.assertEqual(result.code, 0, result.describe())

        posts = service.standin.posts("example")
        ids = [header_values(post, "Message-Id") for post in posts]
        self.assertEqual(len(posts), 50)
        self.assertTrue(all(len(i) == 1 for i in ids), ids)
        distinct = {i[0] for i in ids}
        self.assertEqual(len(distinct), 50, sorted(distinct))
        self.assertTrue(
            all(
                re.fullmatch(r"<[0-9a-f]+\.[0-9a-f]+\.[0-9a-f]+@client\.example\.org>", i)
                for i in distinct
            ),
            sorted(distinct),
        )
        for post in posts:
            self.assertEqual(header_values(post, "X-Original-To"), [EXAMPLE])
            self.assertTrue(post.endswith(b"La de da de da 4.\n"), post[-200:])

    async def test_identical_messages_posted_once(self) -> None:
        """
        Ten byte-identical messages without a Message-ID (smtp-source C{-F}
        sends a file as it is), four sessions at a time: gsmail keys them by
        their content, posts the first and acknowledges the others with 250
        without posting them again. A sender's retries of one message look
        exactly like this, so one post is right.
        """
        service = self.start()
        message_file = os.path.join(self.directory, "message.txt")
        with open(message_file, "w", encoding="ascii") as f:
            f.write(f"From: {SENDER}\nTo: {EXAMPLE}\nSubject: No Message-ID\n\nSame body.\n")
        result = await self.smtp_source("-s", "4", "-m", "10", "-F", message_file)
        self.assertEqual(result.code, 0, result.describe())  # every reply was 2xx

        [post] = service.standin.posts("example")
        self.assertEqual(header_values(post, "Message-ID"), [])
        # smtp-source ends the content with one more CRLF of its own.
        self.assertTrue(post.endswith(b"Subject: No Message-ID\n\nSame body.\n\n"), post)
        self.assertEqual(service.standin.requests["add"], 1)
