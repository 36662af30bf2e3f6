"""
Tests for L{gsmail.maillog}: Postfix-shaped log lines with their fields, as
the builders make them and as real sessions (the ESMTP and LMTP listeners
over the delivery core) log them.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gsmail import maillog, status
from gsmail.inbound.protocol import InboundFactory, ServerSettings
from tests.fakes import CoreTestsMixin

MSG = b"Message-ID: <1@example.org>\r\nSubject: hello\r\n\r\nbody\r\n"


class CaptureMixin:
    """Collects every log event of the test."""

    def capture(self) -> list[LogEvent]:
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)  # type: ignore[attr-defined]
        return events


def mail_lines(events: list[LogEvent]) -> list[str]:
    """The text of the mail log lines (those with C{gsmail_event}), in order."""
    return [formatEvent(e) for e in events if "gsmail_event" in e]


def of_kind(events: list[LogEvent], kind: str) -> list[LogEvent]:
    """The events whose C{gsmail_event} is C{kind}."""
    return [e for e in events if e.get("gsmail_event") == kind]


class FormatTests(SynchronousTestCase):
    """The values as Postfix writes them."""

    def test_format_delay(self) -> None:
        """Two significant digits at most, hundredths at best (Postfix's delay=)."""
        self.assertEqual(
            [maillog.format_delay(s) for s in (0, 0.004, 0.01, 0.214, 0.2, 2.44, 13.6, 1000.2)],
            ["0", "0", "0.01", "0.21", "0.2", "2.4", "14", "1000"],
        )

    def test_delivery_status(self) -> None:
        """2xx sent, 4xx deferred, 5xx bounced; expired when the queue gave up."""
        self.assertEqual(
            [maillog.delivery_status(c) for c in (250, 451, 550)], ["sent", "deferred", "bounced"]
        )
        self.assertEqual(maillog.delivery_status(451, expired=True), "expired")

    def test_queue_id(self) -> None:
        """Ten upper-case hex digits, like Postfix's short queue ids."""
        self.assertRegex(maillog.new_queue_id(), r"^[0-9A-F]{10}$")

    def test_client_name(self) -> None:
        """C{unknown[address]}: gsmail does no reverse lookup."""
        self.assertEqual(maillog.client_name("[192.0.2.1]"), "unknown[192.0.2.1]")
        self.assertEqual(maillog.client_name("local"), "local")

    def test_untrusted_values_escaped(self) -> None:
        """A CR LF or ESC from the client cannot forge or colour a line."""
        events: list[LogEvent] = []
        log = Logger(observer=events.append)
        maillog.reject(
            "RCPT",
            550,
            "5.1.1",
            "No such group {0} {recipient}",
            client="unknown[192.0.2.1]",
            proto="ESMTP",
            listener="smtp",
            helo="x\r\nconnect from forged[1.2.3.4]",
            sender="\x1b[2J@example.org",
            recipient="a@example.com",
            log=log,
        )
        [line] = mail_lines(events)
        self.assertTrue(line.isprintable(), line)
        self.assertIn("helo=<x\\x0d\\x0aconnect from forged[1.2.3.4]>", line)
        self.assertIn("from=<\\x1b[2J@example.org>", line)
        # Braces in a value are text, not a format field.
        self.assertIn(": No such group {0} {recipient}; from=", line)


class SessionMixin(CaptureMixin, CoreTestsMixin):
    """Real sessions: a listener over the delivery core and a GroupServer double."""

    lmtp = False

    def setUp(self) -> None:
        super().setUp()
        self.events = self.capture()
        settings = ServerSettings(hostname="mx.groups.example.com", max_size=3000)
        self.factory = InboundFactory(
            self.core, settings, self.clock, lmtp=self.lmtp, spool_dir=self.dir
        )

    def run_session(self, *commands: bytes) -> list[str]:
        """Run C{commands} (each a line or a message) and close; the replies."""
        peer = IPv4Address("TCP", "192.0.2.1", 2525)
        proto = self.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        for command in commands:
            proto.dataReceived(command)
            self.clock.advance(0.05)
        proto.connectionLost(Failure(ConnectionDone()))
        return transport.value().decode().split("\r\n")[:-1]

    def queue_id(self) -> str:
        [client] = of_kind(self.events, "client")
        queue_id: str = client["queue_id"]
        return queue_id


class SessionTests(SessionMixin, SynchronousTestCase):
    """The lines of real sessions of the ESMTP listener."""

    def test_accepted_message(self) -> None:
        """
        An accepted message: connect, client=, from= (size, nrcpt,
        message-id), the delivery line (group, relay, delays, dsn, status and
        the reply), disconnect with the command counts; one queue id on all
        of its lines.
        """
        replies = self.run_session(
            b"EHLO mx.example.org\r\n",
            b"MAIL FROM:<alice@example.org>\r\n",
            b"RCPT TO:<dev@groups.example.com>\r\n",
            b"DATA\r\n",
            MSG + b".\r\n",
            b"QUIT\r\n",
        )
        self.assertIn("250 2.0.0 Added to the group", replies)
        qid = self.queue_id()
        size = len(MSG.replace(b"\r\n", b"\n"))
        self.assertEqual(
            mail_lines(self.events),
            [
                "connect from unknown[192.0.2.1]",
                f"{qid}: client=unknown[192.0.2.1]",
                f"{qid}: from=<alice@example.org>, size={size}, nrcpt=1,"
                " message-id=<1@example.org>",
                f"{qid}: to=<dev@groups.example.com>, group=dev, relay=groupserver,"
                " delay=0.1, delays=0.1/0/0, dsn=2.0.0, status=sent (Added to the group)",
                "disconnect from unknown[192.0.2.1] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5",
            ],
        )
        [queued] = of_kind(self.events, "queued")
        self.assertEqual(
            {k: queued[k] for k in ("queue_id", "sender", "size", "nrcpt", "listener")},
            {
                "queue_id": qid,
                "sender": "alice@example.org",
                "size": size,
                "nrcpt": 1,
                "listener": "smtp",
            },
        )
        [delivery] = of_kind(self.events, "delivery")
        self.assertEqual(
            {
                k: delivery[k]
                for k in ("queue_id", "recipient", "relay", "dsn", "status", "reply", "listener")
            },
            {
                "queue_id": qid,
                "recipient": "dev@groups.example.com",
                "relay": "groupserver",
                "dsn": "2.0.0",
                "status": "sent",
                "reply": "Added to the group",
                "listener": "smtp",
            },
        )
        self.assertIsInstance(delivery["delay"], float)
        [connect] = of_kind(self.events, "connect")
        self.assertEqual((connect["listener"], connect["client"]), ("smtp", "unknown[192.0.2.1]"))
        self.assertRegex(qid, r"^[0-9A-F]{10}$")
        # The Received field names the message by the same id, as Postfix's does.
        [(_, posted, _)] = self.gs.posts
        self.assertIn(f" (gsmail) with ESMTP id {qid}\n".encode(), posted)

    def test_unknown_group(self) -> None:
        """A RCPT to no group: Postfix's C{NOQUEUE: reject: RCPT} line with 550 5.1.1."""
        self.run_session(
            b"EHLO mx.example.org\r\n",
            b"MAIL FROM:<alice@example.org>\r\n",
            b"RCPT TO:<nosuch@groups.example.com>\r\n",
            b"QUIT\r\n",
        )
        [reject] = of_kind(self.events, "reject")
        self.assertEqual(
            formatEvent(reject),
            "NOQUEUE: reject: RCPT from unknown[192.0.2.1]: 550 5.1.1"
            " <nosuch@groups.example.com>: No such group <nosuch@groups.example.com>;"
            " from=<alice@example.org> to=<nosuch@groups.example.com> proto=ESMTP"
            " helo=<mx.example.org>",
        )
        self.assertEqual(
            {k: reject[k] for k in ("stage", "code", "dsn", "sender", "recipient", "listener")},
            {
                "stage": "RCPT",
                "code": 550,
                "dsn": "5.1.1",
                "sender": "alice@example.org",
                "recipient": "nosuch@groups.example.com",
                "listener": "smtp",
            },
        )
        self.assertEqual((reject["proto"], reject["helo"]), ("ESMTP", "mx.example.org"))
        self.assertEqual(of_kind(self.events, "client"), [])

    def test_relay_denied(self) -> None:
        """A RCPT to another site's domain: a reject line with 5.7.1."""
        self.run_session(
            b"HELO mx.example.org\r\n",
            b"MAIL FROM:<alice@example.org>\r\n",
            b"RCPT TO:<bob@example.net>\r\n",
        )
        [reject] = of_kind(self.events, "reject")
        self.assertEqual((reject["code"], reject["dsn"], reject["proto"]), (550, "5.7.1", "SMTP"))
        self.assertIn(
            "RCPT from unknown[192.0.2.1]: 550 5.7.1 <bob@example.net>: ", formatEvent(reject)
        )

    def test_refused_mail(self) -> None:
        """A refused MAIL (SIZE over the limit): a reject line of stage MAIL."""
        replies = self.run_session(
            b"EHLO mx.example.org\r\n", b"MAIL FROM:<alice@example.org> SIZE=999999\r\n"
        )
        self.assertTrue(replies[-1].startswith("552 5.3.4 "), replies[-1])
        [reject] = of_kind(self.events, "reject")
        self.assertEqual((reject["stage"], reject["code"], reject["dsn"]), ("MAIL", 552, "5.3.4"))
        self.assertEqual(
            formatEvent(reject),
            "NOQUEUE: reject: MAIL from unknown[192.0.2.1]: 552 5.3.4 Message size exceeds the"
            " limit of 3000 bytes; from=<alice@example.org> proto=ESMTP helo=<mx.example.org>",
        )

    def test_refused_data(self) -> None:
        """
        DATA without a recipient is a reject at stage DATA; a message over
        the size limit is refused after the dot with its queue id
        (END-OF-MESSAGE).
        """
        self.run_session(
            b"EHLO mx.example.org\r\n",
            b"MAIL FROM:<alice@example.org>\r\n",
            b"DATA\r\n",
            b"MAIL FROM:<alice@example.org>\r\n",
            b"RCPT TO:<dev@groups.example.com>\r\n",
            b"DATA\r\n",
            b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" + (b"y" * 998 + b"\r\n") * 3 + b".\r\n",
        )
        data, end = of_kind(self.events, "reject")
        self.assertEqual((data["stage"], data["code"], data["queue_id"]), ("DATA", 554, "NOQUEUE"))
        qid = self.queue_id()
        self.assertEqual((end["stage"], end["code"], end["dsn"]), ("END-OF-MESSAGE", 552, "5.3.4"))
        self.assertEqual(end["queue_id"], qid)
        self.assertTrue(
            formatEvent(end).startswith(
                f"{qid}: reject: END-OF-MESSAGE from unknown[192.0.2.1]: 552 5.3.4 "
            ),
            formatEvent(end),
        )
        self.assertEqual(of_kind(self.events, "queued"), [])

    def test_deferred_delivery(self) -> None:
        """GroupServer failing: the delivery line says deferred, with the 4xx reply."""
        self.gs.post_error = status.GroupServerError(status.GROUPSERVER_ERROR, "500")
        self.run_session(
            b"EHLO mx.example.org\r\n",
            b"MAIL FROM:<>\r\n",
            b"RCPT TO:<dev@groups.example.com>\r\n",
            b"DATA\r\n",
            MSG + b".\r\n",
        )
        [delivery] = of_kind(self.events, "delivery")
        self.assertEqual(delivery["status"], "deferred")
        self.assertEqual(delivery["dsn"], status.GROUPSERVER_ERROR.enhanced)
        self.assertRegex(formatEvent(delivery), r"status=deferred \(.+\)$")
        [queued] = of_kind(self.events, "queued")
        self.assertEqual(queued["sender"], "")
        self.assertIn(": from=<>, ", formatEvent(queued))

    def test_refused_connection(self) -> None:
        """
        A connection over C{max_connections}: connect, a reject at stage
        CONNECT (no HELO or sender yet), disconnect with no command.
        """
        self.factory.settings = ServerSettings(hostname="mx.groups.example.com", max_connections=0)
        self.run_session()
        self.assertEqual(
            mail_lines(self.events),
            [
                "connect from unknown[192.0.2.1]",
                "NOQUEUE: reject: CONNECT from unknown[192.0.2.1]: 421 4.7.0"
                f" {status.TOO_MANY_CONNECTIONS.text}; proto=SMTP",
                "disconnect from unknown[192.0.2.1] commands=0",
            ],
        )

    def test_every_line_of_a_message_has_its_queue_id(self) -> None:
        """Every mail log line between client= and the delivery names the message's queue id."""
        self.run_session(
            b"EHLO mx.example.org\r\n",
            b"MAIL FROM:<alice@example.org>\r\n",
            b"RCPT TO:<dev@groups.example.com>\r\n",
            b"RCPT TO:<ann@groups.example.com>\r\n",
            b"DATA\r\n",
            MSG + b".\r\n",
        )
        qid = self.queue_id()
        lines = [line for line in mail_lines(self.events) if "connect from" not in line]
        self.assertEqual(len(lines), 4)  # client, queued, two deliveries
        for line in lines:
            self.assertTrue(line.startswith(f"{qid}: "), line)


class LMTPSessionTests(SessionMixin, SynchronousTestCase):
    """The same lines from the LMTP listener (C{listener=lmtp}, C{proto=LMTP})."""

    lmtp = True

    def test_accepted_message(self) -> None:
        """The listener is named C{lmtp} and the disconnect counts C{lhlo}."""
        self.run_session(
            b"LHLO mx.example.org\r\n",
            b"MAIL FROM:<alice@example.org>\r\n",
            b"RCPT TO:<dev@groups.example.com>\r\n",
            b"DATA\r\n",
            MSG + b".\r\n",
            b"QUIT\r\n",
        )
        self.assertEqual({e["listener"] for e in self.events if "gsmail_event" in e}, {"lmtp"})
        [disconnect] = of_kind(self.events, "disconnect")
        self.assertEqual(disconnect["commands"], "lhlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5")

    def test_relay_denied(self) -> None:
        """LMTP's proto is C{LMTP}."""
        self.run_session(
            b"LHLO mx.example.org\r\n",
            b"MAIL FROM:<alice@example.org>\r\n",
            b"RCPT TO:<bob@example.net>\r\n",
        )
        [reject] = of_kind(self.events, "reject")
        self.assertEqual(
            (reject["code"], reject["proto"], reject["listener"]), (550, "LMTP", "lmtp")
        )
