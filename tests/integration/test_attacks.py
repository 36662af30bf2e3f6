"""
What port 25 gets from attackers (issue "Port 25 under attack"), on real
sockets: a raw client sends the bytes an attacker sends to a running gsmail
(embedded stand-in), and the tests assert what the attacker, the group, the
postmaster and the log see.

  - C{SIZE=²} on the ESMTP, LMTP and submission listeners: one reply per
    command, the connection goes on, nothing logged at error level.
  - A 200 KB C{Message-ID} full of control characters: a short, printable
    log line.
  - Line-breaking characters in addresses, malformed UTF-8, a HELO name
    that is no domain: nothing unsafe in the stored C{Received},
    C{Return-Path} or C{X-Original-To}.
  - Trailing dots refused; C{postmaster} accepted and kept (Maildir or the
    outbound queue).
  - A message over 8 KB with bare LF line endings: taken, lines intact.
"""

from __future__ import annotations

import mailbox
import os

from twisted.trial.unittest import TestCase

from tests.integration.attacks import HELLO, AttackTestsMixin, folded_message_id
from tests.integration.clients import EXAMPLE, RawReply, strip_trace


class UnicodeDigitTests(AttackTestsMixin, TestCase):
    """C{SIZE=²} and friends on every listener."""

    async def check(self, listener: str) -> None:
        hello = HELLO.get(listener, HELLO["smtp"])
        for value in ["²", "①", "٣٣"]:
            replies = await self.talk(
                listener,
                hello + f"MAIL FROM:<a@example.org> SIZE={value}\r\nNOOP\r\n".encode(),
                3,
            )
            self.assertEqual(
                [r.codes for r in replies], [(250, ""), (501, "5.5.4"), (250, "2.0.0")], value
            )
            self.assertIn("ASCII digits", replies[1].lines[-1])
        self.assertEqual(self.log.bad(), [])

    async def test_esmtp(self) -> None:
        """Port 25: C{501 5.5.4}, the EHLO reply before it, the connection goes on."""
        await self.check("smtp")

    async def test_lmtp(self) -> None:
        """LMTP: the same."""
        await self.check("lmtp")

    async def test_submission(self) -> None:
        """Submission: the same."""
        await self.check("submission")


class MessageTests(AttackTestsMixin, TestCase):
    """What the message and its envelope can carry."""

    async def send(
        self, mail: bytes, rcpt: bytes, message: bytes, helo: bytes | None = None
    ) -> list[RawReply]:
        return await self.talk(
            "smtp",
            (helo or HELLO["smtp"]) + mail + rcpt + b"DATA\r\n" + message + b".\r\nQUIT\r\n",
            6,
        )

    async def test_long_message_id_log_line(self) -> None:
        """
        A 200 KB Message-ID with ESC, BEL, NUL and DEL is posted as sent,
        and logged escaped in a line of under 512 characters.
        """
        field = folded_message_id(200_000)
        message = b"From: a@example.org\r\n" + field + b"Subject: long id\r\n\r\nbody\r\n"
        replies = await self.send(
            b"MAIL FROM:<a@example.org>\r\n", f"RCPT TO:<{EXAMPLE}>\r\n".encode(), message
        )
        self.assertEqual([r.code for r in replies], [250, 250, 250, 354, 250, 221])
        [post] = self.service.standin.posts("example")
        self.assertEqual(strip_trace(post), message.replace(b"\r\n", b"\n"))
        text = self.log.text()
        self.assertLess(max(len(line) for line in text.split("\n")), 512)
        for char in "\x1b\x07\x00\x7f":
            self.assertNotIn(char, text)
        self.assertIn("<\\x1b[2J\\x07xxx", text)

    async def test_helo_junk_not_in_received(self) -> None:
        """
        A HELO name that is not a domain (parentheses, UTF-8) is written in
        a comment as printable ASCII: the stored Received field is clean.
        """
        replies = await self.send(
            b"MAIL FROM:<a@example.org>\r\n",
            f"RCPT TO:<{EXAMPLE}>\r\n".encode(),
            b"Subject: helo\r\n\r\nbody\r\n",
            helo="EHLO evil(x)é.example\r\n".encode(),
        )
        self.assertEqual(replies[-2].code, 250)
        [post] = self.service.standin.posts("example")
        received = post.split(b"\n")[1]
        self.assertEqual(received, b"Received: from unknown (helo=evil?x??.example) ([127.0.0.1])")

    async def test_helo_with_controls_refused(self) -> None:
        """A HELO name with a control character (a lone CR, ESC) is refused 501 5.5.4."""
        replies = await self.talk("smtp", b"EHLO a\rb\r\nEHLO a\x1bb\r\nNOOP\r\n", 3)
        self.assertEqual(
            [r.codes for r in replies], [(501, "5.5.4"), (501, "5.5.4"), (250, "2.0.0")]
        )

    async def test_line_breaking_characters_refused(self) -> None:
        """
        U+2028, U+2029 and U+0085 in a UTF-8 address get 553 even with
        SMTPUTF8; malformed UTF-8 gets 501; nothing reaches a header.
        """
        data = (
            HELLO["smtp"]
            + "MAIL FROM:<a\u2028Bcc: x@example.org> SMTPUTF8\r\n".encode()
            + "MAIL FROM:<a\x85b@example.org> SMTPUTF8\r\n".encode()
            + b"MAIL FROM:<a\xed\xa0\x80@example.org> SMTPUTF8\r\n"
            + b"MAIL FROM:<a@example.org> SMTPUTF8\r\n"
            + f"RCPT TO:<example\u2029@{EXAMPLE.split('@')[1]}>\r\n".encode()
            + b"RSET\r\n"
        )
        replies = await self.talk("smtp", data, 7)
        self.assertEqual(
            [r.codes for r in replies[1:]],
            [
                (553, "5.1.7"),
                (553, "5.1.7"),
                (501, "5.5.4"),
                (250, "2.1.0"),
                (553, "5.1.3"),
                (250, "2.0.0"),
            ],
        )
        self.assertEqual(self.service.standin.posts("example"), [])

    async def test_utf8_address_still_taken(self) -> None:
        """A printable UTF-8 sender (RFC 6531) still gets through, as written."""
        replies = await self.send(
            "MAIL FROM:<jösé@bücher.example> SMTPUTF8\r\n".encode(),
            f"RCPT TO:<{EXAMPLE}>\r\n".encode(),
            b"Subject: utf8\r\n\r\nbody\r\n",
        )
        self.assertEqual(replies[-2].code, 250)
        [post] = self.service.standin.posts("example")
        self.assertTrue(post.startswith("Return-Path: <jösé@bücher.example>\n".encode()))

    async def test_trailing_dots_refused(self) -> None:
        """C{<example@groups.example.com..>} is refused 501 5.1.3, a sender's 501 5.1.7."""
        domain = EXAMPLE.split("@")[1]
        replies = await self.talk(
            "smtp",
            HELLO["smtp"]
            + b"MAIL FROM:<a@example.org.>\r\nMAIL FROM:<a@example.org>\r\n"
            + f"RCPT TO:<example@{domain}.>\r\nRCPT TO:<example@{domain}..>\r\n".encode()
            + f"RCPT TO:<example@{domain}....>\r\nRSET\r\n".encode(),
            7,
        )
        self.assertEqual(
            [r.codes for r in replies[1:]],
            [
                (501, "5.1.7"),
                (250, "2.1.0"),
                (501, "5.1.3"),
                (501, "5.1.3"),
                (501, "5.1.3"),
                (250, "2.0.0"),
            ],
        )

    async def test_bare_lf_message_over_8k(self) -> None:
        """
        A 28 KB message with bare LF line endings, ended by CR LF . CR LF,
        is taken (it used to get 550 5.6.0 "line too long") and posted with
        its lines intact.
        """
        body = b"".join(b"line %05d " % i + b"y" * 60 + b"\n" for i in range(400))
        message = b"From: a@example.org\nSubject: bare LF\nMessage-ID: <lf@example.org>\n\n" + body
        self.assertGreater(len(message), 3 * 8192)
        replies = await self.send(
            b"MAIL FROM:<a@example.org>\r\n",
            f"RCPT TO:<{EXAMPLE}>\r\n".encode(),
            message + b"\r\n",
        )
        self.assertEqual([r.code for r in replies], [250, 250, 250, 354, 250, 221])
        [post] = self.service.standin.posts("example")
        self.assertEqual(strip_trace(post), message + b"\n")


class PostmasterMaildirTests(AttackTestsMixin, TestCase):
    """Postmaster mail kept in the Maildir (no C{postmaster_address})."""

    async def test_bare_and_domain_postmaster(self) -> None:
        """
        C{RCPT TO:<postmaster>} and C{<POSTMASTER@GROUPS.EXAMPLE.COM>} are
        accepted (RFC 5321 §4.5.1), and the message is in the Maildir, with
        its trace fields, once 250 is sent.
        """
        domain = EXAMPLE.split("@")[1].upper()
        for rcpt in ["postmaster", f"POSTMASTER@{domain}"]:
            replies = await self.talk(
                "smtp",
                HELLO["smtp"]
                + b"MAIL FROM:<a@example.org>\r\n"
                + f"RCPT TO:<{rcpt}>\r\n".encode()
                + b"DATA\r\n"
                + b"Subject: abuse report\r\n\r\nHello postmaster\r\n.\r\nQUIT\r\n",
                6,
            )
            self.assertEqual([r.code for r in replies], [250, 250, 250, 354, 250, 221], rcpt)
        box = mailbox.Maildir(self.config.postmaster_maildir, factory=None, create=False)
        messages = [box.get_bytes(key) for key in box.keys()]
        self.assertEqual(len(messages), 2)
        for data in messages:
            self.assertTrue(
                data.startswith(b"Return-Path: <a@example.org>\nReceived: from client.example.org")
            )
            self.assertTrue(data.endswith(b"Subject: abuse report\n\nHello postmaster\n"))
        self.assertEqual(self.service.standin.posts("example"), [])


class PostmasterForwardTests(AttackTestsMixin, TestCase):
    """Postmaster mail forwarded through the outbound queue."""

    config_overrides = {"postmaster_address": "admin@example.net"}

    async def test_queued_for_the_address(self) -> None:
        """With C{postmaster_address}, the message is queued for it, sender kept, before 250."""
        replies = await self.talk(
            "lmtp",
            HELLO["lmtp"]
            + b"MAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\nDATA\r\n"
            + b"Subject: bounce\r\n\r\nreport\r\n.\r\nQUIT\r\n",
            6,
        )
        self.assertEqual([r.code for r in replies], [250, 250, 250, 354, 250, 221])
        self.assertIn("Queued for the postmaster", replies[4].lines[-1])
        queue = self.service.queue
        assert queue is not None
        [envelope] = queue.envelopes()
        self.assertEqual(envelope.sender, "")
        self.assertEqual([r.address for r in envelope.recipients], ["admin@example.net"])
        with open(queue.data_path(envelope.id), "rb") as f:
            data = f.read()
        self.assertIn(b"X-Original-To: Postmaster\n", data)
        self.assertTrue(data.endswith(b"Subject: bounce\n\nreport\n"))
        # Nothing kept locally (the Maildir, made at start as state, stays empty).
        for sub in ("tmp", "new", "cur"):
            directory = os.path.join(self.config.postmaster_maildir, sub)
            self.assertEqual(os.listdir(directory) if os.path.isdir(directory) else [], [])
