# -*- test-case-name: tests.integration.test_outbound -*-
"""
gsmail's outbound side against real peers, over real sockets on 127.0.0.1:

  - GroupServer's mailer path: a client speaking as gs.email's
    C{XVERPSMTPMailer} does (EHLO, STARTTLS, AUTH, C{MAIL FROM:<...> XVERP},
    batches of 50) submits one message for 1,000 members; gsmail delivers it
    to Postfix's C{smtp-sink} with one VERP envelope sender per member;
  - a member refused with a 5xx (by a receiving server built in the test on
    gsmail's own inbound protocol) gives one DSN to that member's VERP
    address, which gsmail delivers to its own inbound side and so to
    GroupServer's bounce page (the stand-in); mail from the null sender is
    never bounced;
  - Postfix itself as the smarthost, receiving C{XVERP} from gsmail (or one
    transaction per member when gsmail does the VERP itself);
  - batches of 50 recipients on one connection, and an 8-bit body that
    arrives as it was submitted.

smtp-sink dumps each transaction to a file of its own (C{-d}), with the
envelope in C{X-Mail-Args}/C{X-Rcpt-Args} lines, and counts sessions (C{-c}).
Every wait is bounded; every process and port is closed in the cleanup.
"""

from __future__ import annotations

import math
import os
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.certificates import make_certificate
from tests.integration.mailer import (
    GROUP,
    QMGR_LINE,
    SmtpSink,
    decoded,
    describe_queue,
    group_message,
    gs_email_send,
    member,
    outbound,
    queue_empty,
    record_enqueued,
    refusing_server,
    signed_for,
    start_gsmail,
    submission_port,
    submit,
    verp,
)
from tests.integration.postfix import PrivatePostfix
from tests.util import eventually


class GroupServerMailerTests(TestCase):
    """GroupServer's own mailer path: gs.email's XVERP mailer → gsmail → smtp-sink."""

    timeout = 120

    async def test_thousand_members_each_get_their_own_verp_sender(self) -> None:
        """
        A post for 1,000 members, submitted as gs.email does (STARTTLS, AUTH,
        XVERP, batches of 50), reaches the receiving server as 1,000
        transactions, each to one member with that member's own VERP sender,
        and the queue is empty afterwards.
        """
        sink = SmtpSink(self)
        await sink.start()
        cert, key, _ = make_certificate(os.path.abspath(self.mktemp()))
        service = start_gsmail(
            self,
            f"[127.0.0.1]:{sink.port}",
            tls_certificate=cert,
            tls_key=key,
            submission_networks=(),  # so only AUTH lets GroupServer in
            smtp_username="groupserver",
            smtp_password="s3cret-submission",
        )
        members = [member(n) for n in range(1000)]
        submissions = await deferToThread(
            gs_email_send,
            submission_port(service),
            GROUP,
            members,
            group_message("Thousand members"),
            username="groupserver",
            password="s3cret-submission",
            cafile=cert,
        )
        self.assertEqual(len(submissions), 20)
        self.assertEqual([s.refused for s in submissions], [{}] * 20)
        self.assertNotIn(None, [s.tls for s in submissions], "a batch was sent in clear")

        await eventually(
            lambda: queue_empty(service), lambda: f"{describe_queue(service)}; {sink.describe()}"
        )
        found = sink.transactions()
        self.assertEqual(len(found), 1000)
        self.assertEqual(len({t.sender for t in found}), 1000)
        self.assertEqual(
            sorted((decoded(t.sender), t.recipients) for t in found),
            sorted(((GROUP, m), (m,)) for m in members),
        )
        # Each sender is signed for its member (gsmail.verp).
        self.assertEqual(
            sorted(signed_for(service, t.sender) or t.sender for t in found), sorted(members)
        )
        self.assertEqual({t.message.split(b"\n\n", 1)[1] for t in found}, {b"Hello, members.\n"})
        self.assertEqual(service.standin.bounces(), [])


class RefusedMemberTests(TestCase):
    """A 5xx for one member: one DSN, back through gsmail's inbound side as a bounce."""

    timeout = 120

    async def test_refused_member_gives_one_bounce_record(self) -> None:
        """
        When the receiving server refuses member13 with C{550 5.1.1}, the
        other members get the post, and GroupServer records exactly one
        bounce: member13's, for the group. The DSN that carries it is queued
        once, from the null sender, to member13's VERP address.
        """
        core, factory, port = await refusing_server(self, {member(13)})
        service = start_gsmail(self, f"[127.0.0.1]:{port}")
        enqueued = record_enqueued(self, service)
        members = [member(n) for n in range(100)]
        submissions = await deferToThread(
            gs_email_send, submission_port(service), GROUP, members, group_message("Refused")
        )
        self.assertEqual([s.refused for s in submissions], [{}, {}])

        await eventually(
            lambda: queue_empty(service) and bool(service.standin.bounces()),
            lambda: f"{describe_queue(service)}; bounces {service.standin.bounces()}",
        )
        await eventually(lambda: factory.connections == 0, lambda: "the connection stays open")
        self.assertEqual(service.standin.bounces(), [(member(13), GROUP)])
        # The DSN may be queued before or after the second batch is submitted.
        [dsn] = [e for e in enqueued if e[0] == ""]
        self.assertEqual(
            sorted(e for e in enqueued if e[0] != ""),
            [(GROUP, tuple(members[:50])), (GROUP, tuple(members[50:]))],
        )
        self.assertEqual([signed_for(service, a) for a in dsn[1]], [member(13)])
        self.assertEqual(
            sorted((decoded(r.sender), r.recipients) for r in core.received),
            sorted(((GROUP, m), (m,)) for m in members if m != member(13)),
        )
        self.assertEqual([a for _, a in core.rcpts].count(member(13)), 1, "refused, not retried")

    async def test_null_sender_is_never_bounced(self) -> None:
        """
        Mail from the null sender that is refused is not bounced: neither a
        bounce submitted by an application nor gsmail's own DSN when that
        DSN is refused in turn. Nothing stays queued and nothing loops.
        """
        remote_list = "list@lists.example.net"
        dsn_address = verp(remote_list, member(13))
        core, factory, port = await refusing_server(self, {member(13), dsn_address})
        service = start_gsmail(self, f"[127.0.0.1]:{port}")
        enqueued = record_enqueued(self, service)
        sub = submission_port(service)
        # A bounce an application hands over, refused by the receiving server.
        refused = await deferToThread(submit, sub, "", [member(13)], group_message("Null"))
        self.assertEqual(refused, {})
        # A remote list's VERP mail: its DSN goes to the remote VERP address, refused too.
        [submission] = await deferToThread(
            gs_email_send, sub, remote_list, [member(13)], group_message("Remote")
        )
        self.assertEqual(submission.refused, {})

        await eventually(
            lambda: queue_empty(service) and len(enqueued) >= 3,
            lambda: f"{describe_queue(service)}; queued {enqueued}",
        )
        await eventually(lambda: factory.connections == 0, lambda: "the connection stays open")
        self.assertEqual(
            enqueued,
            [("", (member(13),)), (remote_list, (member(13),)), ("", (dsn_address,))],
        )
        self.assertEqual(
            sorted(a for _, a in core.rcpts),
            sorted([member(13), member(13), dsn_address]),
            "one try each",
        )
        self.assertEqual(core.received, [])
        self.assertEqual(service.standin.bounces(), [])


class PostfixSmarthostTests(TestCase):
    """Postfix as gsmail's smarthost, relaying to smtp-sink."""

    timeout = 120

    async def relay_through_postfix(self, xverp: bool, count: int) -> tuple[Any, SmtpSink, Any]:
        """
        smtp-sink, a private Postfix relaying to it (XVERP allowed from
        127.0.0.0/8), and gsmail with Postfix as its smarthost; a post for
        C{count} members submitted as gs.email does, and waited for until
        Postfix delivered every copy.

        @return: gsmail's service, the sink and the Postfix instance.
        """
        sink = SmtpSink(self)
        await sink.start()
        postfix = PrivatePostfix(self, domains=())
        await postfix.start(
            "error:5.1.1 no local domains in this test",
            extra={
                "mynetworks": "127.0.0.0/8",
                "smtpd_authorized_verp_clients": "127.0.0.0/8",
                "relayhost": f"[127.0.0.1]:{sink.port}",
                "default_transport": "smtp",
                "relay_transport": "smtp",
            },
        )
        service = start_gsmail(self, f"[127.0.0.1]:{postfix.port}", relayhost_xverp=xverp)
        members = [member(n) for n in range(count)]
        submissions = await deferToThread(
            gs_email_send, submission_port(service), GROUP, members, group_message("Via Postfix")
        )
        self.assertEqual([s.refused for s in submissions], [{}] * len(submissions))

        def sent() -> int:
            return sum(1 for d in postfix.deliveries() if d.status == "sent")

        await eventually(
            lambda: queue_empty(service) and sent() >= count,
            lambda: (
                f"{describe_queue(service)}; Postfix sent {sent()}; {sink.describe()}\n"
                f"{postfix.log_tail()}"
            ),
        )
        found = sink.transactions()
        self.assertEqual(
            sorted((decoded(t.sender), t.recipients) for t in found),
            sorted(((GROUP, m), (m,)) for m in members),
        )
        return service, sink, postfix

    def queued_by_postfix(self, postfix: Any) -> list[tuple[str, int]]:
        """C{(sender, recipients)} of each message Postfix's queue manager took on."""
        return sorted(
            (m["sender"], int(m["nrcpt"])) for m in QMGR_LINE.finditer(postfix.log_text())
        )

    async def test_postfix_does_the_verp_for_xverp_batches(self) -> None:
        """
        With C{relayhost_xverp}, gsmail passes C{XVERP} on and sends batches
        of 50: Postfix takes three messages from the group's own address and
        makes the per-member senders that arrive at the sink.
        """
        count = 120
        service, _, postfix = await self.relay_through_postfix(xverp=True, count=count)
        self.assertEqual(outbound(service).transactions, math.ceil(count / 50))
        self.assertEqual(self.queued_by_postfix(postfix), [(GROUP, 20), (GROUP, 50), (GROUP, 50)])

    async def test_gsmail_does_the_verp_without_relayhost_xverp(self) -> None:
        """
        Without C{relayhost_xverp}, gsmail makes the VERP senders itself:
        one transaction per member, each a one-recipient message at Postfix.
        """
        count = 60
        service, _, postfix = await self.relay_through_postfix(xverp=False, count=count)
        self.assertEqual(outbound(service).transactions, count)
        queued = self.queued_by_postfix(postfix)
        self.assertEqual(
            sorted((signed_for(service, sender), n) for sender, n in queued),
            sorted((member(n), 1) for n in range(count)),
        )


class BatchAndBodyTests(TestCase):
    """Batches on one connection, and the body and MAIL parameters passed on."""

    timeout = 120

    async def test_batches_of_fifty_on_one_connection(self) -> None:
        """
        A message (no VERP) to 120 recipients of one domain leaves as three
        transactions of 50, 50 and 20 recipients over one connection, with
        the application's envelope sender.
        """
        sink = SmtpSink(self)
        await sink.start()
        service = start_gsmail(
            self, f"[127.0.0.1]:{sink.port}", destination_concurrency=1, max_recipients=200
        )
        members = [member(n) for n in range(120)]
        sender = "notifications@groups.example.com"
        refused = await deferToThread(
            submit, submission_port(service), sender, members, group_message("Batches")
        )
        self.assertEqual(refused, {})

        await eventually(
            lambda: queue_empty(service), lambda: f"{describe_queue(service)}; {sink.describe()}"
        )
        await outbound(service).when_idle()
        await eventually(
            lambda: sink.counters()["sess"] >= 1 and sink.counters()["mesg"] == 3,
            lambda: f"smtp-sink counted {sink.counters()}",
            timeout=10,
        )
        found = sink.transactions()
        self.assertEqual({t.sender for t in found}, {sender})
        self.assertEqual(sorted(len(t.recipients) for t in found), [20, 50, 50])
        self.assertEqual(sorted(r for t in found for r in t.recipients), sorted(members))
        self.assertEqual(sink.counters(), {"sess": 1, "quit": 1, "mesg": 3})
        self.assertEqual(outbound(service).transactions, 3)

    async def test_8bit_body_arrives_as_submitted(self) -> None:
        """
        A C{BODY=8BITMIME} message with 8-bit text, lines that start with a
        dot and a lone dot line arrives at the sink byte for byte as it was
        submitted (after gsmail's Received field), still marked 8BITMIME.
        """
        sink = SmtpSink(self)
        await sink.start()
        service = start_gsmail(self, f"[127.0.0.1]:{sink.port}")
        body = (
            "Grüße aus Zürich, ½ € — ünïcödé.\r\n"
            ".a line that starts with a dot\r\n"
            ".\r\n"
            "..two dots\r\n"
            "trailing space \r\n"
            "\r\n"
            "last line\r\n"
        ).encode() + b"Latin-1: caf\xe9\r\n"
        original = group_message("Eight bit", body)
        refused = await deferToThread(
            submit,
            submission_port(service),
            GROUP,
            [member(1)],
            original,
            mail_options=["BODY=8BITMIME"],
        )
        self.assertEqual(refused, {})

        await eventually(
            lambda: queue_empty(service), lambda: f"{describe_queue(service)}; {sink.describe()}"
        )
        [found] = sink.transactions()
        # smtp-sink has no SIZE extension, so gsmail must not send SIZE=.
        self.assertEqual(found.mail_args, f"<{GROUP}> BODY=8BITMIME")
        received, _, rest = found.message.partition(b"\n\t")
        self.assertTrue(received.startswith(b"Received: from app.example.com"), received)
        self.assertEqual(rest.split(b"\n", 1)[1], original.replace(b"\r\n", b"\n"))

    async def test_size_and_8bitmime_passed_to_a_server_that_offers_them(self) -> None:
        """
        A server that offers SIZE and 8BITMIME (gsmail's own inbound
        protocol) is told the message's size, at least the octets that are
        then sent, and BODY=8BITMIME; the data it gets is the message.
        """
        core, factory, port = await refusing_server(self, set())
        service = start_gsmail(self, f"[127.0.0.1]:{port}")
        body = b"".join(
            b"line %d: \xc3\xa4\xc3\xb6\xc3\xbc " % i + b"x" * 50 + b"\r\n" for i in range(200)
        )
        original = group_message("Sized", body)
        refused = await deferToThread(
            submit,
            submission_port(service),
            GROUP,
            [member(2)],
            original,
            mail_options=["BODY=8BITMIME"],
        )
        self.assertEqual(refused, {})

        await eventually(lambda: queue_empty(service), lambda: describe_queue(service))
        await eventually(lambda: factory.connections == 0, lambda: "the connection stays open")
        [got] = core.received
        self.assertEqual(got.body, "8BITMIME")
        self.assertTrue(got.data.endswith(original.replace(b"\r\n", b"\n")))
        sent = len(got.data.replace(b"\n", b"\r\n"))
        assert got.declared_size is not None
        self.assertGreaterEqual(got.declared_size, sent)
        self.assertLess(got.declared_size, sent * 1.1)
