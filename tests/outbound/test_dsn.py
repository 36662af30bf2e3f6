"""
Tests for L{gsmail.outbound.dsn}, L{gsmail.outbound.dsn.params} and
L{gsmail.outbound.dsn.parse}: the RFC 3464 report as a mail reader (the
C{email} package) sees it, when to send one, and reading DSNs back.
"""

from __future__ import annotations

import base64
import email
import email.policy
from email.message import EmailMessage
from typing import Any

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gsmail.outbound.dsn import MAX_RETURNED_HEADERS, FailedRecipient, build_dsn, should_send_dsn
from gsmail.outbound.dsn.params import (
    notify_requests,
    orcpt_parameter,
    parse_envid,
    parse_notify,
    parse_orcpt,
    xtext_decode,
    xtext_encode,
)
from gsmail.outbound.dsn.parse import DSNRecipient, parse_dsn
from gsmail.outbound.mx import NullMXError
from gsmail.status import Reply

MTA = "mx.groups.example.com"
XVERP_SENDER = "dev+alice=example.org@groups.example.com"
ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 5 * 86400 + 60

ORIGINAL_HEADERS = (
    b"Received: from gs.example.com by mx.groups.example.com\n"
    b"Message-ID: <post.42@groups.example.com>\n"
    b"From: Dev group <dev@groups.example.com>\n"
    b"To: dev@groups.example.com\n"
    b"Subject: Minutes of the meeting\n"
)
ORIGINAL = ORIGINAL_HEADERS + b"\nSecret body line\n.a line starting with a dot\nlast line\n"

USER_UNKNOWN = Reply(550, "5.1.1", "<alice@example.org>: Recipient address rejected: User unknown")


def parse(message: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def report_blocks(message: EmailMessage) -> list[Any]:
    """The field blocks of the delivery-status part: per-message, then per recipient."""
    parts = list(message.iter_parts())
    assert parts[1].get_content_type() == "message/delivery-status"
    blocks: list[Any] = parts[1].get_payload()
    return blocks


class BuildTests(SynchronousTestCase):
    """What the sender of an undeliverable message receives."""

    def setUp(self) -> None:
        self.original = self.mktemp()
        with open(self.original, "wb") as f:
            f.write(ORIGINAL)

    def build(self, recipients: list[FailedRecipient], **kwargs: Any) -> bytes:
        options: dict[str, Any] = {
            "reporting_mta": MTA,
            "original_sender": XVERP_SENDER,
            "recipients": recipients,
            "original_path": self.original,
            "arrival": ARRIVAL,
            "now": NOW,
        }
        options.update(kwargs)
        return build_dsn(**options)

    def test_structure(self) -> None:
        """
        The DSN is a multipart/report of type delivery-status with a text
        explanation, the delivery-status report and the original's headers.
        """
        message = parse(self.build([FailedRecipient("alice@example.org", USER_UNKNOWN, "mx.ex")]))
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "delivery-status")
        self.assertEqual(
            [p.get_content_type() for p in message.iter_parts()],
            ["text/plain", "message/delivery-status", "text/rfc822-headers"],
        )
        self.assertEqual(message.defects, [])
        for part in message.iter_parts():
            self.assertEqual(part.defects, [])

    def test_envelope_headers(self) -> None:
        """
        It comes from MAILER-DAEMON at our host name, says what happened, is
        marked auto-replied (RFC 3834) and dated now, and threads under the
        original by its Message-ID.
        """
        message = parse(self.build([FailedRecipient("alice@example.org", USER_UNKNOWN, "mx.ex")]))
        self.assertEqual(message["From"].addresses[0].addr_spec, f"MAILER-DAEMON@{MTA}")
        self.assertEqual(message["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(message["Auto-Submitted"], "auto-replied")
        self.assertEqual(message["MIME-Version"], "1.0")
        self.assertEqual(message["Date"].datetime.timestamp(), NOW)
        self.assertTrue(message["Message-ID"].endswith(f"@{MTA}>"))
        self.assertEqual(message["In-Reply-To"], "<post.42@groups.example.com>")
        self.assertEqual(message["References"], "<post.42@groups.example.com>")

    def test_addressed_to_xverp_sender(self) -> None:
        """
        A DSN for a GroupServer post goes to the copy's XVERP envelope
        sender, which is how the bounce reaches GroupServer's bounce page.
        """
        message = parse(self.build([FailedRecipient("alice@example.org", USER_UNKNOWN, "mx.ex")]))
        self.assertEqual(message["To"].addresses[0].addr_spec, XVERP_SENDER)
        bracketed = parse(
            self.build(
                [FailedRecipient("alice@example.org", USER_UNKNOWN, "mx.ex")],
                original_sender=f"<{XVERP_SENDER}>",
            )
        )
        self.assertEqual(bracketed["To"].addresses[0].addr_spec, XVERP_SENDER)

    def test_per_message_fields(self) -> None:
        """The report names the reporting MTA and when the message arrived."""
        fields = report_blocks(
            parse(self.build([FailedRecipient("alice@example.org", USER_UNKNOWN, "mx.ex")]))
        )[0]
        self.assertEqual(fields["Reporting-MTA"], f"dns; {MTA}")
        self.assertEqual(
            email.utils.parsedate_to_datetime(fields["Arrival-Date"]).timestamp(), ARRIVAL
        )
        self.assertNotIn("Original-Envelope-Id", fields)

    def test_permanent_failure(self) -> None:
        """
        A 5xx from the remote server: its enhanced code is the status and
        the whole reply is the diagnostic, with the server's name.
        """
        message = parse(
            self.build(
                [
                    FailedRecipient(
                        "alice@example.org",
                        USER_UNKNOWN,
                        "mx.example.org",
                        last_attempt=NOW - 30,
                    )
                ]
            )
        )
        fields = report_blocks(message)[1]
        self.assertEqual(fields["Final-Recipient"], "rfc822; alice@example.org")
        self.assertEqual(fields["Action"], "failed")
        self.assertEqual(fields["Status"], "5.1.1")
        self.assertEqual(fields["Remote-MTA"], "dns; mx.example.org")
        self.assertEqual(
            " ".join(fields["Diagnostic-Code"].split()),
            "smtp; 550 5.1.1 <alice@example.org>: Recipient address rejected: User unknown",
        )
        self.assertEqual(
            email.utils.parsedate_to_datetime(fields["Last-Attempt-Date"]).timestamp(), NOW - 30
        )
        text = next(message.iter_parts()).get_content()
        self.assertIn("<alice@example.org>: mx.example.org said: 550 5.1.1", text)

    def test_reply_without_enhanced_code(self) -> None:
        """A server without ENHANCEDSTATUSCODES gets the class code x.0.0."""
        fields = report_blocks(
            parse(self.build([FailedRecipient("a@example.org", Reply(554, "", "No"), "mx.ex")]))
        )[1]
        self.assertEqual(fields["Status"], "5.0.0")
        self.assertEqual(fields["Diagnostic-Code"], "smtp; 554 No")

    def test_expiry_without_reply(self) -> None:
        """
        A recipient given up without any server reply (the queue lifetime
        ran out) has status 5.4.7, gsmail's own diagnostic, and the text
        says how long it was tried.
        """
        message = parse(
            self.build(
                [
                    FailedRecipient(
                        "bob@example.net",
                        None,
                        None,
                        diagnostic="connect to mx.example.net[192.0.2.1]:25: Connection refused",
                    )
                ]
            )
        )
        fields = report_blocks(message)[1]
        self.assertEqual(fields["Status"], "5.4.7")
        self.assertEqual(fields["Action"], "failed")
        self.assertNotIn("Remote-MTA", fields)
        self.assertEqual(
            fields["Diagnostic-Code"],
            "X-gsmail; connect to mx.example.net[192.0.2.1]:25: Connection refused",
        )
        text = next(message.iter_parts()).get_content()
        self.assertIn("<bob@example.net>: delivery was given up after 5 days", text)
        self.assertIn("Connection refused", text)

    def test_expiry_after_transient_reply(self) -> None:
        """
        Given up after only 4xx replies: the status is 5.4.7 (delivery time
        expired, so bounce processors count it), the diagnostic the last 4xx.
        """
        fields = report_blocks(
            parse(
                self.build(
                    [FailedRecipient("bob@example.net", Reply(451, "4.7.1", "Greylisted"), "mx")]
                )
            )
        )[1]
        self.assertEqual(fields["Status"], "5.4.7")
        self.assertEqual(fields["Diagnostic-Code"], "smtp; 451 4.7.1 Greylisted")

    def test_local_reply(self) -> None:
        """
        A failure decided by gsmail itself (a null MX) keeps its status and
        is labelled as gsmail's diagnostic, not as a remote SMTP reply.
        """
        reply = NullMXError("example.org").reply
        fields = report_blocks(parse(self.build([FailedRecipient("a@example.org", reply, None)])))[
            1
        ]
        self.assertEqual(fields["Status"], "5.1.10")
        self.assertTrue(fields["Diagnostic-Code"].startswith("X-gsmail; 556 5.1.10 "))

    def test_delayed(self) -> None:
        """
        A delay warning says so in its subject, reports 4.4.7 when there was
        no reply, and when retries will stop.
        """
        message = parse(
            self.build(
                [
                    FailedRecipient(
                        "bob@example.net",
                        None,
                        None,
                        action="delayed",
                        will_retry_until=ARRIVAL + 5 * 86400,
                    )
                ],
                now=ARRIVAL + 4 * 3600,
            )
        )
        self.assertEqual(message["Subject"], "Delayed Mail (still being retried)")
        fields = report_blocks(message)[1]
        self.assertEqual(fields["Action"], "delayed")
        self.assertEqual(fields["Status"], "4.4.7")
        self.assertEqual(
            email.utils.parsedate_to_datetime(fields["Will-Retry-Until"]).timestamp(),
            ARRIVAL + 5 * 86400,
        )
        text = next(message.iter_parts()).get_content()
        self.assertIn("not delivered yet", text)
        self.assertIn("do not need to send it again", text)

    def test_delayed_with_reply(self) -> None:
        """A delay with a 4xx reply reports that reply's code."""
        fields = report_blocks(
            parse(
                self.build(
                    [
                        FailedRecipient(
                            "b@example.net", Reply(452, "4.2.2", "Mailbox full"), "mx", "delayed"
                        )
                    ]
                )
            )
        )[1]
        self.assertEqual(fields["Status"], "4.2.2")

    def test_several_recipients(self) -> None:
        """Each recipient gets its own block, in order; mixed outcomes read 'Undelivered'."""
        message = parse(
            self.build(
                [
                    FailedRecipient("a@example.org", USER_UNKNOWN, "mx.a"),
                    FailedRecipient("b@example.org", None, None, action="delayed"),
                    FailedRecipient("c@example.org", None, None),
                ]
            )
        )
        blocks = report_blocks(message)
        self.assertEqual(
            [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks[1:]],
            [
                ("rfc822; a@example.org", "failed", "5.1.1"),
                ("rfc822; b@example.org", "delayed", "4.4.7"),
                ("rfc822; c@example.org", "failed", "5.4.7"),
            ],
        )
        self.assertEqual(message["Subject"], "Undelivered Mail Returned to Sender")

    def test_non_ascii_recipient(self) -> None:
        """
        A UTF-8 recipient uses the utf-8 address type in its 7-bit xtext
        form (RFC 6533 §3; '+' and '=' escaped too); the report part stays
        ASCII, and the explanation shows the address as it is.
        """
        raw = self.build([FailedRecipient("grüße+x=y@bücher.example", USER_UNKNOWN, "mx")])
        message = parse(raw)
        fields = report_blocks(message)[1]
        self.assertEqual(
            fields["Final-Recipient"],
            "utf-8; gr\\x{FC}\\x{DF}e\\x{2B}x\\x{3D}y@b\\x{FC}cher.example",
        )
        start = raw.index(b"Content-Type: message/delivery-status")
        end = raw.index(b"Content-Type: text/rfc822-headers")
        self.assertTrue(raw[start:end].isascii())
        self.assertIn("<grüße+x=y@bücher.example>:", next(message.iter_parts()).get_content())

    def test_original_headers_included(self) -> None:
        """The original's header section is returned, its body is not."""
        raw = self.build([FailedRecipient("a@example.org", USER_UNKNOWN, "mx")])
        headers = list(parse(raw).iter_parts())[2]
        self.assertEqual(headers.get_content().encode(), ORIGINAL_HEADERS)
        self.assertNotIn(b"Secret body line", raw)

    def test_original_headers_bounded(self) -> None:
        """
        A huge header section is cut at a line end within the limit (64 KiB
        by default), and the explanation says only the first part is attached.
        """
        filler = b"".join(b"X-Filler-%05d: %s\n" % (i, b"y" * 80) for i in range(2000))
        with open(self.original, "wb") as f:
            f.write(ORIGINAL_HEADERS + filler + b"\nbody\n")
        message = parse(self.build([FailedRecipient("a@example.org", USER_UNKNOWN, "mx")]))
        returned = list(message.iter_parts())[2].get_content().encode()
        self.assertLessEqual(len(returned), MAX_RETURNED_HEADERS)
        self.assertGreater(len(returned), MAX_RETURNED_HEADERS - 200)
        self.assertTrue(returned.startswith(ORIGINAL_HEADERS))
        self.assertTrue(returned.endswith(b"y\n"))
        self.assertIn(
            "first part of your message's headers", next(message.iter_parts()).get_content()
        )
        small = parse(
            self.build([FailedRecipient("a@example.org", USER_UNKNOWN, "mx")], header_limit=300)
        )
        cut = list(small.iter_parts())[2].get_content().encode()
        self.assertLessEqual(len(cut), 300)
        self.assertTrue(ORIGINAL_HEADERS.startswith(cut[:100]))

    def test_full_return(self) -> None:
        """
        With RET=FULL the whole original comes back as message/rfc822,
        including lines that start with a dot.
        """
        raw = self.build(
            [FailedRecipient("a@example.org", USER_UNKNOWN, "mx")], return_content="full"
        )
        part = list(parse(raw).iter_parts())[2]
        self.assertEqual(part.get_content_type(), "message/rfc822")
        returned = part.get_content()
        self.assertEqual(returned["Subject"], "Minutes of the meeting")
        self.assertEqual(
            returned.get_content(), "Secret body line\n.a line starting with a dot\nlast line\n"
        )

    def test_full_return_too_large(self) -> None:
        """A message larger than the limit is returned as headers only, and the text says so."""
        message = parse(
            self.build(
                [FailedRecipient("a@example.org", USER_UNKNOWN, "mx")],
                return_content="full",
                full_limit=len(ORIGINAL) - 1,
            )
        )
        parts = list(message.iter_parts())
        self.assertEqual(parts[2].get_content_type(), "text/rfc822-headers")
        self.assertIn("too large to return", parts[0].get_content())

    def test_crlf_original_gives_lf_output(self) -> None:
        """An original spooled with CRLF is returned with LF, like the rest of the DSN."""
        with open(self.original, "wb") as f:
            f.write(ORIGINAL.replace(b"\n", b"\r\n"))
        for mode in ("headers", "full"):
            raw = self.build(
                [FailedRecipient("a@example.org", USER_UNKNOWN, "mx")], return_content=mode
            )
            self.assertNotIn(b"\r", raw)
            self.assertIn(b"\nSubject: Minutes of the meeting\n", raw)

    def test_non_ascii_original_headers(self) -> None:
        """
        Raw UTF-8 in the original's headers (an SMTPUTF8 message) is returned
        as message/global-headers marked 8bit (RFC 6533 §6.3).
        """
        with open(self.original, "wb") as f:
            f.write("Subject: Grüße\nFrom: a@example.org\n\nbody\n".encode())
        raw = self.build([FailedRecipient("a@example.org", USER_UNKNOWN, "mx")])
        part = list(parse(raw).iter_parts())[2]
        self.assertEqual(part.get_content_type(), "message/global-headers")
        self.assertEqual(part["Content-Transfer-Encoding"], "8bit")
        self.assertIn("Subject: Grüße\n".encode(), raw)

    def test_missing_original(self) -> None:
        """
        When the queue's copy is gone the DSN is still sent, without the
        third part; the text says so and the problem is logged.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        message = parse(
            self.build(
                [FailedRecipient("a@example.org", USER_UNKNOWN, "mx")],
                original_path=self.original + ".gone",
            )
        )
        parts = list(message.iter_parts())
        self.assertEqual(len(parts), 2)
        self.assertIn("no longer available", parts[0].get_content())
        self.assertNotIn("In-Reply-To", message)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn])

    def test_no_header_injection(self) -> None:
        """
        A remote reply carrying line breaks cannot add fields or recipients
        to the report.
        """
        evil = Reply(550, "5.1.1", "no\r\nFinal-Recipient: rfc822; evil@example.com\n\nAction: x")
        raw = self.build([FailedRecipient("a@example.org", evil, "mx\nStatus: 2.0.0")])
        blocks = report_blocks(parse(raw))
        self.assertEqual(len(blocks), 2)
        self.assertEqual(blocks[1]["Final-Recipient"], "rfc822; a@example.org")
        self.assertEqual(blocks[1]["Status"], "5.1.1")
        self.assertEqual(parse_dsn(raw), [DSNRecipient("a@example.org", "failed", "5.1.1")])

    def test_long_diagnostic_folded(self) -> None:
        """A long reply is folded into lines of at most 78 characters, and unfolds intact."""
        text = " ".join(f"word{i}" for i in range(60))
        raw = self.build([FailedRecipient("a@example.org", Reply(550, "5.7.1", text), "mx")])
        start = raw.index(b"Content-Type: message/delivery-status")
        for line in raw[start:].split(b"\n"):
            self.assertLessEqual(len(line), 78)
        fields = report_blocks(parse(raw))[1]
        self.assertEqual(" ".join(fields["Diagnostic-Code"].split()), f"smtp; 550 5.7.1 {text}")

    def test_envelope_id_and_original_recipient(self) -> None:
        """DSN parameters given at submission (ENVID, ORCPT) are echoed (RFC 3461)."""
        blocks = report_blocks(
            parse(
                self.build(
                    [
                        FailedRecipient(
                            "a@example.org",
                            USER_UNKNOWN,
                            "mx",
                            original_recipient="rfc822;A@Example.org",
                        ),
                        FailedRecipient(
                            "b@example.org", USER_UNKNOWN, "mx", original_recipient="b@example.org"
                        ),
                    ],
                    envelope_id="QQ314159",
                )
            )
        )
        self.assertEqual(blocks[0]["Original-Envelope-Id"], "QQ314159")
        self.assertEqual(blocks[1]["Original-Recipient"], "rfc822;A@Example.org")
        self.assertEqual(blocks[2]["Original-Recipient"], "rfc822; b@example.org")

    def test_original_recipient_utf8(self) -> None:
        """
        A C{utf-8} ORCPT with a non-ASCII address is written in its 7-bit
        utf-8-addr-xtext form (RFC 6533 §3), so the report stays ASCII.
        """
        raw = self.build(
            [
                FailedRecipient(
                    "a@example.org",
                    USER_UNKNOWN,
                    "mx",
                    original_recipient="utf-8;jürgen@example.de",
                )
            ]
        )
        self.assertTrue(raw.isascii())
        fields = report_blocks(parse(raw))[1]
        self.assertEqual(fields["Original-Recipient"], "utf-8;j\\x{FC}rgen@example.de")

    def test_success_relayed(self) -> None:
        """
        A success report (NOTIFY=SUCCESS, relayed to a next hop without
        DSN): its own subject, C{Action: relayed}, a 2.x.x status, the
        server that took it, and the headers only even with RET=FULL
        (RFC 3461 §4.3: full content is for failure reports).
        """
        raw = self.build(
            [
                FailedRecipient(
                    "a@example.org",
                    Reply(250, "2.0.0", "Ok: queued as 4711"),
                    "mx.example.org",
                    action="relayed",
                    original_recipient="rfc822;a@example.org",
                )
            ],
            return_content="full",
            envelope_id="QQ314159",
        )
        message = parse(raw)
        self.assertEqual(message["Subject"], "Successful Mail Delivery Report")
        blocks = report_blocks(message)
        self.assertEqual(blocks[0]["Original-Envelope-Id"], "QQ314159")
        self.assertEqual(
            (blocks[1]["Action"], blocks[1]["Status"], blocks[1]["Remote-MTA"]),
            ("relayed", "2.0.0", "dns; mx.example.org"),
        )
        self.assertEqual(blocks[1]["Original-Recipient"], "rfc822;a@example.org")
        parts = list(message.iter_parts())
        self.assertEqual(parts[2].get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"Secret body line", raw)
        self.assertIn("relayed to a mail system", parts[0].get_content())
        self.assertEqual(
            parse_dsn(raw), [DSNRecipient("a@example.org", "relayed", "2.0.0", "a@example.org")]
        )

    def test_success_delivered(self) -> None:
        """Delivered into the site's own groups: C{Action: delivered}, the reply's 2.x.x code."""
        fields = report_blocks(
            parse(
                self.build(
                    [
                        FailedRecipient(
                            "dev@groups.example.com",
                            Reply(250, "2.6.0", "Added to the group"),
                            MTA,
                            action="delivered",
                        )
                    ]
                )
            )
        )[1]
        self.assertEqual((fields["Action"], fields["Status"]), ("delivered", "2.6.0"))

    def test_delay_returns_headers_only(self) -> None:
        """RET=FULL does not return the content with a delay warning."""
        raw = self.build(
            [FailedRecipient("a@example.org", None, None, action="delayed")],
            return_content="full",
        )
        self.assertEqual(list(parse(raw).iter_parts())[2].get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"Secret body line", raw)

    def test_headers_only_return(self) -> None:
        """RET=HDRS (the default): a failure report carries the header section, not the body."""
        raw = self.build([FailedRecipient("a@example.org", USER_UNKNOWN, "mx")])
        part = list(parse(raw).iter_parts())[2]
        self.assertEqual(part.get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"Secret body line", raw)
        self.assertIn(b"Subject: Minutes of the meeting", raw)

    def test_postmaster_named(self) -> None:
        """A configured postmaster address is offered for help."""
        message = parse(
            self.build(
                [FailedRecipient("a@example.org", USER_UNKNOWN, "mx")],
                postmaster="postmaster@groups.example.com",
            )
        )
        self.assertIn("<postmaster@groups.example.com>", next(message.iter_parts()).get_content())

    def test_lf_line_endings_and_7bit(self) -> None:
        """The DSN uses LF line ends, and is pure ASCII for an ASCII original."""
        raw = self.build([FailedRecipient("a@example.org", USER_UNKNOWN, "mx")])
        self.assertNotIn(b"\r", raw)
        self.assertTrue(raw.isascii())

    def test_bad_arguments(self) -> None:
        """No recipients, an unknown RET value or an unknown action are programming errors."""
        self.assertRaises(ValueError, self.build, [])
        self.assertRaises(
            ValueError,
            self.build,
            [FailedRecipient("a@example.org", USER_UNKNOWN, "mx")],
            return_content="body",
        )
        self.assertRaises(ValueError, FailedRecipient, "a@example.org", None, None, "bounced")


class ShouldSendTests(SynchronousTestCase):
    """Whether a DSN goes out at all."""

    def test_never_for_null_sender(self) -> None:
        """A message from the null sender (itself a bounce) never gets a DSN."""
        self.assertFalse(should_send_dsn(""))
        self.assertFalse(should_send_dsn("<>"))
        self.assertFalse(should_send_dsn("  "))

    def test_not_for_mailer_daemon(self) -> None:
        """A MAILER-DAEMON sender, in any case, gets none: it risks a loop."""
        self.assertFalse(should_send_dsn("MAILER-DAEMON@mx.example.org"))
        self.assertFalse(should_send_dsn("<mailer-daemon@mx.example.org>"))

    def test_not_for_unparseable_sender(self) -> None:
        """A sender that is not an address has nowhere to receive a DSN."""
        self.assertFalse(should_send_dsn("not an address"))
        self.assertFalse(should_send_dsn("@example.org"))

    def test_ordinary_senders(self) -> None:
        """XVERP senders, postmaster and UTF-8 senders do get DSNs."""
        self.assertTrue(should_send_dsn(XVERP_SENDER))
        self.assertTrue(should_send_dsn(f"<{XVERP_SENDER}>"))
        self.assertTrue(should_send_dsn("postmaster@example.org"))
        self.assertTrue(should_send_dsn("grüße@bücher.example"))


POSTFIX_DSN = b"""\
Return-Path: <>
Received: by mx.example.org (Postfix) id 3F1A2B4C5D; Tue, 14 Nov 2023 22:15:00 +0000
Date: Tue, 14 Nov 2023 22:15:00 +0000 (UTC)
From: MAILER-DAEMON@mx.example.org (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: dev+carol=example.net@groups.example.com
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="3F1A2B4C5D.1700000100/mx.example.org"
Message-Id: <20231114221500.3F1A2B4C5D@mx.example.org>

This is a MIME-encapsulated message.

--3F1A2B4C5D.1700000100/mx.example.org
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.example.org.

<carol@example.net>: host mail.example.net[198.51.100.7] said: 550 5.1.1
    <carol@example.net>: Recipient address rejected: User unknown (in reply to
    RCPT TO command)

--3F1A2B4C5D.1700000100/mx.example.org
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org
X-Postfix-Queue-ID: 3F1A2B4C5D
X-Postfix-Sender: rfc822; dev+carol=example.net@groups.example.com
Arrival-Date: Tue, 14 Nov 2023 22:14:58 +0000 (UTC)

Final-Recipient: rfc822; carol@example.net
Original-Recipient: rfc822;carol@example.net
Action: failed
Status: 5.1.1
Remote-MTA: dns; mail.example.net
Diagnostic-Code: smtp; 550 5.1.1 <carol@example.net>: Recipient address
    rejected: User unknown

Final-Recipient: RFC822; <dave@example.net>
Action: Delayed
Status: 4.4.1 (persistent transient failure)

--3F1A2B4C5D.1700000100/mx.example.org
Content-Description: Undelivered Message
Content-Type: message/rfc822

Received: by gs.example.com
From: dev@groups.example.com
Subject: a forwarded bounce, quoted in the original
Content-Type: multipart/report; report-type=delivery-status; boundary="inner"

--inner
Content-Type: message/delivery-status

Reporting-MTA: dns; elsewhere.example

Final-Recipient: rfc822; not-this-one@example.com
Action: failed
Status: 5.0.0

--inner--

--3F1A2B4C5D.1700000100/mx.example.org--
""".replace(b"\n", b"\r\n")


class ParseTests(SynchronousTestCase):
    """Reading DSNs back, as the inbound side does for bounce records."""

    def test_round_trip(self) -> None:
        """Every recipient of a DSN gsmail built reads back with action and status."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(ORIGINAL)
        raw = build_dsn(
            reporting_mta=MTA,
            original_sender=XVERP_SENDER,
            recipients=[
                FailedRecipient("alice@example.org", USER_UNKNOWN, "mx"),
                FailedRecipient("bob@example.org", None, None, action="delayed"),
                FailedRecipient("grüße@bücher.example", None, None),
            ],
            original_path=path,
            arrival=ARRIVAL,
            now=NOW,
            return_content="full",
        )
        self.assertEqual(
            parse_dsn(raw),
            [
                DSNRecipient("alice@example.org", "failed", "5.1.1"),
                DSNRecipient("bob@example.org", "delayed", "4.4.7"),
                DSNRecipient("grüße@bücher.example", "failed", "5.4.7"),
            ],
        )

    def test_postfix_dsn(self) -> None:
        """
        A Postfix DSN (CRLF, folded fields, status comments, a returned
        message that itself quotes a DSN): only its own recipients count.
        """
        self.assertEqual(
            parse_dsn(POSTFIX_DSN),
            [
                DSNRecipient("carol@example.net", "failed", "5.1.1", "carol@example.net"),
                DSNRecipient("dave@example.net", "delayed", "4.4.1"),
            ],
        )

    def test_global_delivery_status_base64(self) -> None:
        """An RFC 6533 message/global-delivery-status part, base64-encoded, is read."""
        report = (
            "Reporting-MTA: dns; mx.example.org\n\n"
            "Final-Recipient: utf-8; grüße@bücher.example\nAction: failed\nStatus: 5.2.2\n"
        ).encode()
        raw = (
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n\n'
            b"--b\nContent-Type: text/plain\n\nsorry\n"
            b"--b\nContent-Type: message/global-delivery-status\n"
            b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(report) + b"--b--\n"
        )
        self.assertEqual(parse_dsn(raw), [DSNRecipient("grüße@bücher.example", "failed", "5.2.2")])

    def test_not_a_dsn(self) -> None:
        """
        Ordinary mail, an auto-reply, or a DSN forwarded as an attachment is
        not a DSN: nothing is recorded.
        """
        self.assertEqual(parse_dsn(ORIGINAL), [])
        self.assertEqual(
            parse_dsn(b"Subject: Out of office\nAuto-Submitted: auto-replied\n\nAway\n"), []
        )
        forwarded = (
            b'Content-Type: multipart/mixed; boundary="m"\n\n--m\nContent-Type: text/plain\n\n'
            b"FYI\n--m\nContent-Type: message/rfc822\n\n" + POSTFIX_DSN + b"\n--m--\n"
        )
        self.assertEqual(parse_dsn(forwarded), [])
        self.assertEqual(parse_dsn(b""), [])

    def test_delivery_status_outside_report(self) -> None:
        """A delivery-status part outside a multipart/report is not a DSN."""
        raw = (
            b'Content-Type: multipart/mixed; boundary="b"\n\n'
            b"--b\nContent-Type: message/delivery-status\n\n"
            b"Reporting-MTA: dns; x\n\nFinal-Recipient: rfc822; a@b.example\n"
            b"Action: failed\nStatus: 5.1.1\n--b--\n"
        )
        self.assertEqual(parse_dsn(raw), [])

    def test_malformed_status(self) -> None:
        """A block with a malformed status keeps its recipient with an empty status."""
        raw = (
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n\n'
            b"--b\nContent-Type: message/delivery-status\n\n"
            b"Reporting-MTA: dns; x\n\nFinal-Recipient: rfc822; a@b.example\n"
            b"Action: FAILED\nStatus: bounced\n--b--\n"
        )
        self.assertEqual(parse_dsn(raw), [DSNRecipient("a@b.example", "failed", "")])


class ParameterTests(SynchronousTestCase):
    """The RFC 3461 parameters: NOTIFY, ORCPT, ENVID and their xtext."""

    def test_xtext(self) -> None:
        """
        xtext (RFC 3461 §4): +XX is an octet, '+' and '=' and anything
        outside '!'..'~' must be encoded; decoding refuses the malformed.
        """
        self.assertEqual(xtext_decode("a+2Bb+3Dc"), "a+b=c")
        self.assertEqual(xtext_decode("a+2bb"), "a+b")  # lowercase taken
        self.assertEqual(xtext_decode(""), "")
        for bad in ("a=b", "a b", "a+2", "a+ZZ", "a+C3+A4", "ä"):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, xtext_decode, bad)
        self.assertEqual(xtext_encode("a+b=c d"), "a+2Bb+3Dc+20d")
        for text in ("x@example.org", "a+b=c@example.org", "!~*"):
            self.assertEqual(xtext_decode(xtext_encode(text)), text)

    def test_notify(self) -> None:
        """NOTIFY is normalised to SUCCESS,FAILURE,DELAY order, or NEVER alone."""
        self.assertEqual(parse_notify("delay,failure"), "FAILURE,DELAY")
        self.assertEqual(parse_notify("SUCCESS"), "SUCCESS")
        self.assertEqual(parse_notify("never"), "NEVER")
        for bad in (None, "", "NEVER,SUCCESS", "SOMETIMES", "FAILURE,FAILURE", "FAILURE,"):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, parse_notify, bad)

    def test_notify_requests(self) -> None:
        """
        Without NOTIFY, failures and delays are reported (delays not for
        VERP mail); NEVER gets nothing; SUCCESS only when asked.
        """
        self.assertTrue(notify_requests("", "FAILURE"))
        self.assertTrue(notify_requests("", "DELAY"))
        self.assertFalse(notify_requests("", "SUCCESS"))
        self.assertTrue(notify_requests("", "FAILURE", verp=True))
        self.assertFalse(notify_requests("", "DELAY", verp=True))
        self.assertTrue(notify_requests("DELAY", "DELAY", verp=True))
        for kind in ("SUCCESS", "FAILURE", "DELAY"):
            self.assertFalse(notify_requests("NEVER", kind))
        self.assertTrue(notify_requests("SUCCESS,FAILURE", "SUCCESS"))
        self.assertFalse(notify_requests("SUCCESS,FAILURE", "DELAY"))

    def test_orcpt(self) -> None:
        """
        ORCPT is addr-type;xtext, decoded, the type lowercased; the utf-8
        type's \\x{HEX} escapes are decoded too; passing it on encodes it again.
        """
        self.assertEqual(parse_orcpt("RFC822;a+2Bb@example.org"), "rfc822;a+b@example.org")
        self.assertEqual(parse_orcpt("utf-8;j\\x{FC}rgen@example.de"), "utf-8;jürgen@example.de")
        self.assertEqual(parse_orcpt("utf-8;jürgen@example.de"), "utf-8;jürgen@example.de")
        self.assertEqual(orcpt_parameter("rfc822;a+b@example.org"), "rfc822;a+2Bb@example.org")
        self.assertEqual(
            orcpt_parameter("utf-8;jürgen@example.de"), "utf-8;j\\x{FC}rgen@example.de"
        )
        for bad in (
            None,
            "a@example.org",
            "rfc822;",
            ";a@example.org",
            "rfc(822);a@example.org",
            "rfc822;a+0Db@example.org",
            "rfc822;" + "x" * 500,
            "utf-8;a=b@example.org",
        ):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, parse_orcpt, bad)

    def test_envid(self) -> None:
        """ENVID: xtext of at most 100 characters, printable once decoded; kept as given."""
        self.assertEqual(parse_envid("QQ+2B314"), "QQ+2B314")
        self.assertEqual(parse_envid("x" * 100), "x" * 100)
        for bad in (None, "", "x" * 101, "a=b", "a+0Ab"):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, parse_envid, bad)
