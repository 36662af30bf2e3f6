"""
GroupServer's mailer side of the integration tests: submissions as gs.email
sends them (L{gs_email_send}, XVERP in batches), Postfix's smtp-sink as the
receiving end (L{SmtpSink}), a server that refuses chosen recipients
(L{refusing_server}), gsmail started with a relay host, and its queue read.
"""

from __future__ import annotations

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
from tests.util import eventually, free_port, listening, make_config, require_tool, start_service

#: The group that sends, and the members' domain.
GROUP = "example@groups.example.com"
MEMBERS = "members.example.org"
#: gs.email's C{max_batch}: recipients per submission (gs/email/core.py).
GS_EMAIL_BATCH: Final = 50

#: The reply the test's receiving server gives a refused member.
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")

QMGR_LINE: Final = re.compile(
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
