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
import re
import shutil
import smtplib
import ssl
import tempfile
from collections.abc import Sequence
from typing import Any, Final

import attrs
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from gsmail import status
from gsmail.addresses import Address, BounceCheck, Route, RouteKind, parse_mailbox
from gsmail.inbound.protocol import Envelope, InboundFactory, ServerSettings, Session
from gsmail.inbound.spool import SpooledMessage
from gsmail.outbound.delivery import OutboundDelivery
from gsmail.service import GsmailService
from gsmail.status import Reply
from gsmail.verp import parse_verp
from tests.certificates import make_certificate
from tests.integration.postfix import PrivatePostfix
from tests.util import eventually, free_port, listening, make_config, require_tool, start_service

#: The group that sends, and the members' domain.
GROUP = "example@groups.example.com"
MEMBERS = "members.example.org"
#: gs.email's C{max_batch}: recipients per submission (gs/email/core.py).
GS_EMAIL_BATCH: Final = 50

#: The reply the test's receiving server gives a refused member.
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")

_QMGR_LINE: Final = re.compile(
    r"postfix/qmgr\[\d+\]: [0-9A-Za-z]+: from=<(?P<sender>[^>]*)>, size=\d+,"
    r" nrcpt=(?P<nrcpt>\d+) \(queue active\)"
)


def member(n: int) -> str:
    """The address of member C{n}."""
    return f"member{n}@{MEMBERS}"


def verp(sender: str, recipient: str) -> str:
    """The VERP sender Postfix's XVERP (delimiters C{+=}) makes: C{list+user=domain@site}."""
    local, _, site = sender.rpartition("@")
    user, _, domain = recipient.rpartition("@")
    return f"{local}+{user}={domain}@{site}"


def decoded(address: str) -> tuple[str, str]:
    """The group and the member a VERP sender names, signed (gsmail.verp) or not."""
    parsed = parse_verp(parse_mailbox(address))
    assert parsed is not None and parsed.member is not None, address
    return str(parsed.group), str(parsed.member)


def signed_for(service: GsmailService, address: str) -> str | None:
    """The member a signed VERP sender was made for, if its tag verifies with gsmail's keys."""
    route = service.inbound.verp.route(parse_mailbox(address))
    if route is None or route.bounce_check is not BounceCheck.SIGNED:
        return None
    return str(route.member_address)


def group_message(subject: str, body: bytes = b"Hello, members.\r\n") -> bytes:
    """A group post as GroupServer hands it to gs.email (CRLF line ends)."""
    return (
        f"From: Alice <alice@example.org>\r\n"
        f"To: {GROUP}\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@groups.example.com>\r\n"
        f"\r\n"
    ).encode() + body


# -- GroupServer's mailer ----------------------------------------------------------


@attrs.frozen
class Submission:
    """
    What one gs.email mailer connection saw.

    @ivar tls: the TLS version after STARTTLS, or C{None} in clear.
    @ivar refused: the recipients refused, as C{smtplib.SMTP.sendmail} says.
    """

    tls: str | None
    refused: dict[str, tuple[int, bytes]]


def gs_email_send(
    port: int,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    *,
    username: str | None = None,
    password: str | None = None,
    cafile: str | None = None,
) -> list[Submission]:
    """
    Send as GroupServer does (blocking; run it in a thread): C{gs.email}'s
    C{send_email} cuts the recipients into batches of 50 and its
    C{XVERPSMTPMailer.send} sends each batch on a connection of its own:
    EHLO, STARTTLS when offered (and EHLO again), AUTH when a user name and
    password are configured, then C{sendmail} with the C{XVERP} MAIL option.

    @param cafile: the CA file that verifies gsmail's certificate.
    @raise smtplib.SMTPException: a batch was refused as a whole.
    """
    done = []
    for start in range(0, len(recipients), GS_EMAIL_BATCH):
        batch = list(recipients[start : start + GS_EMAIL_BATCH])
        with smtplib.SMTP("127.0.0.1", port, local_hostname="gs.example.com", timeout=30) as s:
            code, _ = s.ehlo()
            if not 200 <= code < 300:
                s.helo()
            tls = None
            if s.has_extn("starttls"):
                s.starttls(context=ssl.create_default_context(cafile=cafile))
                s.ehlo()
                tls = s.sock.version() if isinstance(s.sock, ssl.SSLSocket) else None
            if s.does_esmtp and username is not None and password is not None:
                s.login(username, password)
            refused = s.sendmail(sender, batch, message, mail_options=["XVERP"])
        done.append(Submission(tls, refused))
    return done


def submit(
    port: int,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    mail_options: Sequence[str] = (),
) -> dict[str, tuple[int, bytes]]:
    """One plain smtplib transaction to the submission port (blocking; for a thread)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="app.example.com", timeout=30) as s:
        return s.sendmail(sender, list(recipients), message, mail_options=list(mail_options))


# -- smtp-sink ---------------------------------------------------------------------


@attrs.frozen
class SinkTransaction:
    """
    One transaction smtp-sink dumped.

    @ivar mail_args: the arguments of MAIL, e.g. C{"<a@b> BODY=8BITMIME"}.
    @ivar rcpt_args: the arguments of each RCPT, in order.
    @ivar message: the message as received: line ends LF (smtp-sink drops
        every CR), dot-stuffing undone.
    """

    mail_args: str
    rcpt_args: tuple[str, ...]
    message: bytes

    @property
    def sender(self) -> str:
        """The envelope sender, without angle brackets."""
        return self.mail_args.split(" ", 1)[0].strip("<>")

    @property
    def recipients(self) -> tuple[str, ...]:
        """The envelope recipients, without angle brackets."""
        return tuple(a.split(" ", 1)[0].strip("<>") for a in self.rcpt_args)


class _SinkProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        reason.trap(ProcessDone, ProcessTerminated)
        self.ended.callback(None)


class SmtpSink:
    """
    Postfix's smtp-sink on a free port of 127.0.0.1, dumping each transaction
    to a file of its own and counting sessions; stopped in the test's cleanup.

    @ivar port: its TCP port.
    @ivar directory: where the dump files go: a directory of mode 0777 in
        C{/tmp}, since smtp-sink run as root drops to C{nobody} before it
        writes; removed in the test's cleanup.
    """

    def __init__(self, test: TestCase, *options: str) -> None:
        self._tool = require_tool("smtp-sink", "/usr/sbin/smtp-sink")
        self._test = test
        self._options = options
        # Not under trial's temporary directory: mktemp's parents are mode 0700.
        self.directory = tempfile.mkdtemp(prefix="gsmail-sink-", dir="/tmp")
        os.chmod(self.directory, 0o777)
        test.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        self.port = free_port()
        self._process = _SinkProcess()

    async def start(self) -> None:
        """Start it and wait until it listens."""
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        argv = [
            self._tool,
            *user,
            "-c",
            "-d",
            os.path.join(self.directory, "t."),
            *self._options,
            f"127.0.0.1:{self.port}",
            "64",
        ]
        transport = reactor.spawnProcess(self._process, self._tool, argv, env={})

        async def stop() -> None:
            if not self._process.ended.called:
                transport.signalProcess("TERM")
            await self._process.ended

        self._test.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        await eventually(
            lambda: listening(self.port) or self._process.ended.called,
            lambda: f"smtp-sink did not listen on {self.port}: {self._output()}",
            timeout=10,
        )
        if self._process.ended.called:
            raise AssertionError(f"smtp-sink ended at once: {self._output()}")

    def _output(self) -> str:
        return bytes(self._process.output).decode("ascii", "replace")

    def counters(self) -> dict[str, int]:
        """
        smtp-sink's last counters (C{-c}): C{sess} sessions ended, C{quit}
        of them with QUIT, C{mesg} messages received.
        """
        lines = self._output().replace("\r", "\n").split()
        found = {"sess": 0, "quit": 0, "mesg": 0}
        for word in lines:
            name, _, value = word.partition("=")
            if name in found and value.isdigit():
                found[name] = int(value)
        return found

    def describe(self) -> str:
        """How it stands, for a failure message."""
        state = "ended" if self._process.ended.called else "running"
        return (
            f"smtp-sink {state}, {len(os.listdir(self.directory))} dump files,"
            f" output {self._output()[-300:]!r}"
        )

    def transactions(self) -> list[SinkTransaction]:
        """Every transaction dumped so far (read them once the sender is done)."""
        found = []
        for name in sorted(os.listdir(self.directory)):
            with open(os.path.join(self.directory, name), "rb") as f:
                found.append(_parse_dump(f.read()))
        return found


def _parse_dump(dump: bytes) -> SinkTransaction:
    """
    smtp-sink's dump: its X- records, its three-line Received field, the
    message, and the LF of the final dot line.
    """
    head, _, rest = dump.partition(b"\nReceived: ")
    records = [line.split(b": ", 1) for line in head.split(b"\n")]
    message = rest.split(b"\n", 3)[3]  # after "from ...", "\tby ...", "\tdate"
    return SinkTransaction(
        mail_args=b"".join(v for k, v in records if k == b"X-Mail-Args").decode(),
        rcpt_args=tuple(v.decode() for k, v in records if k == b"X-Rcpt-Args"),
        message=message[:-1],
    )


# -- a receiving server that refuses some recipients -------------------------------


@attrs.frozen
class Received:
    """What the test's receiving server accepted in one transaction."""

    sender: str
    recipients: tuple[str, ...]
    body: str
    declared_size: int | None
    data: bytes


class RefusingCore:
    """
    A delivery core for gsmail's inbound protocol as a remote mail server:
    it answers L{NO_SUCH_USER} at RCPT for the addresses in C{refuse},
    accepts everyone else, and records every RCPT and every message.
    """

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = {a.lower() for a in refuse}
        self.rcpts: list[tuple[str, str]] = []
        self.received: list[Received] = []

    def check_recipient(
        self, session: Session, recipient: Address
    ) -> Deferred[tuple[Reply, Route | None]]:
        self.rcpts.append((session.id, str(recipient)))
        if str(recipient).lower() in self.refuse:
            return succeed((NO_SUCH_USER, None))
        return succeed((status.RECIPIENT_OK, Route(RouteKind.REMOTE, recipient)))

    def deliver(
        self, session: Session, envelope: Envelope, message: SpooledMessage
    ) -> Deferred[list[Reply]]:
        with open(message.path, "rb") as f:
            data = f.read()
        self.received.append(
            Received(
                sender=str(envelope.sender) if envelope.sender else "",
                recipients=tuple(str(r.recipient) for r in envelope.recipients),
                body=envelope.body,
                declared_size=envelope.declared_size,
                data=data,
            )
        )
        return succeed([status.OK] * len(envelope.recipients))


async def refusing_server(
    test: TestCase, refuse: set[str]
) -> tuple[RefusingCore, InboundFactory, int]:
    """
    Listen on 127.0.0.1 with gsmail's inbound ESMTP and a L{RefusingCore};
    closed in the test's cleanup.

    @return: the core, the factory and the port.
    """
    core = RefusingCore(refuse)
    spool = os.path.abspath(test.mktemp())
    os.makedirs(spool)
    factory = InboundFactory(
        core, ServerSettings(hostname="mx.members.example.org"), reactor, spool_dir=spool
    )
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    test.addCleanup(port.stopListening)
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return core, factory, address.port


# -- gsmail ------------------------------------------------------------------------


def start_gsmail(test: TestCase, relayhost: str, **overrides: Any) -> GsmailService:
    """gsmail with its submission listener on 127.0.0.1 and the given smarthost."""
    directory = os.path.abspath(test.mktemp())
    config = make_config(
        directory,
        smtp_endpoint="",
        submission_endpoint="tcp:0:interface=127.0.0.1",
        queue_dir=os.path.join(directory, "queue"),
        relayhost=relayhost,
        **overrides,
    )
    return start_service(test, config)


def submission_port(service: GsmailService) -> int:
    """The port gsmail's submission listener got."""
    return int(service.port("submission").getHost().port)


def record_enqueued(test: TestCase, service: GsmailService) -> list[tuple[str, tuple[str, ...]]]:
    """
    Spy on gsmail's outbound queue: the list returned grows by
    C{(sender, recipients)} for every message queued (submitted or a DSN).
    """
    queue = service.queue
    assert queue is not None
    enqueued: list[tuple[str, tuple[str, ...]]] = []
    real = queue.enqueue

    def enqueue(sender: str, recipients: list[str], data: Any, **kwargs: Any) -> Any:
        enqueued.append((sender, tuple(recipients)))
        return real(sender, recipients, data, **kwargs)

    test.patch(queue, "enqueue", enqueue)
    return enqueued


def outbound(service: GsmailService) -> OutboundDelivery:
    """gsmail's outbound delivery (the submission listener is configured)."""
    assert service.outbound is not None
    return service.outbound


def queue_empty(service: GsmailService) -> bool:
    """Nothing is left in gsmail's outbound queue."""
    assert service.queue is not None
    return not service.queue.envelopes()


def describe_queue(service: GsmailService) -> str:
    """The queue's pending recipients and their last replies, for a failure message."""
    assert service.queue is not None
    envelopes = service.queue.envelopes()
    pending = [(r.address, r.last_reply) for e in envelopes for r in e.pending()]
    return f"{len(envelopes)} messages queued; pending: {pending[:5]} ({len(pending)} in all)"


# -- the tests ---------------------------------------------------------------------


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
            (m["sender"], int(m["nrcpt"])) for m in _QMGR_LINE.finditer(postfix.log_text())
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
