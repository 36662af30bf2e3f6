# -*- test-case-name: tests.test_control -*-
"""
Tests for L{gsmail.control} (the daemon's queue control socket) and
L{gsmail.queuectl} (the C{gsmail-queue} command): an operator can list the
outbound queue, flush it, and hold, release or delete a message, and gets a
clear message and exit status when that cannot be done.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import smtplib
import socket
import sys
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.amp import TooLong
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gsmail.config import load_config
from gsmail.control import (
    MAX_TEXT,
    ControlClient,
    ControlConnection,
    ControlFactory,
    ControlService,
    FlushResult,
    ListQueue,
    QueueControl,
    control_path,
)
from gsmail.outbound.queue import (
    DELIVERED,
    FAILED,
    PENDING,
    Envelope,
    FileOps,
    NoSuchMessageError,
    OutboundQueue,
    QueueClosedError,
    RecipientState,
    read_queue,
)
from gsmail.queuectl import format_queue, run
from gsmail.service import GsmailService, makeService
from tests.util import ROOT, TOKEN, make_config

NOW = 1_700_000_000.0
MESSAGE = b"From: dev@groups.example.com\r\nSubject: Hello\r\n\r\nBody\r\n"


class FakeDelivery:
    """Stands in for L{gsmail.outbound.delivery.OutboundDelivery}: counts kicks."""

    def __init__(self) -> None:
        self.kicks = 0

    def kick(self) -> None:
        self.kicks += 1


class FailingOps(FileOps):
    """The real file-system calls, except that directory fsyncs fail (a full disk)."""

    fail = False

    def fsync_dir(self, path: str) -> None:
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        super().fsync_dir(path)


class ControlTestCase(SynchronousTestCase):
    """
    An in-memory queue (its disk work inline) behind the control responders,
    and a L{ControlClient} connected to them in memory.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.directory = self.mktemp()
        self.ops = FailingOps()
        self.queue = OutboundQueue(self.directory, clock=self.clock, file_ops=self.ops)
        self.queue.load()
        self.addCleanup(lambda: self.successResultOf(self.queue.close()))
        self.delivery = FakeDelivery()
        self.control = QueueControl(self.queue, self.delivery, self.clock)
        self.client, self.pump = self.connect(self.control)

    def connect(self, control: QueueControl) -> tuple[ControlClient, IOPump]:
        factory = ControlFactory(control)
        client, _, pump = connectedServerAndClient(
            lambda: factory.buildProtocol(None), ControlConnection
        )
        return ControlClient(client), pump

    def call(self, d: Deferred[Any]) -> Any:
        """The result of a command, after moving the bytes both ways."""
        self.pump.flush()
        return self.successResultOf(d)

    def call_fails(self, d: Deferred[Any], *errors: type[BaseException]) -> BaseException:
        self.pump.flush()
        return self.failureResultOf(d, *errors).value

    def enqueue(self, sender: str, recipients: list[str], **kwargs: Any) -> Envelope:
        envelope: Envelope = self.successResultOf(
            self.queue.enqueue(sender, recipients, MESSAGE, **kwargs)
        )
        self.clock.advance(1)
        return envelope


class ListQueueTests(ControlTestCase):
    """C{ListQueue}: the queue as the daemon has it in memory."""

    def test_messages_and_recipient_states(self) -> None:
        """
        The listing gives every queued message, held ones included, with its
        sender, size, arrival time, XVERP and hold flags, and each recipient
        with its state, attempts, next attempt and last reply.
        """
        post = self.enqueue(
            "dev@groups.example.com", ["a@one.example", "b@two.example"], xverp=True
        )
        bounce = self.enqueue("", ["c@three.example"])
        post.recipients[0].state = DELIVERED
        post.recipients[0].attempts = 1
        post.recipients[0].last_reply = "250 2.0.0 Ok"
        post.recipients[1].attempts = 2
        post.recipients[1].next_attempt = NOW + 600
        post.recipients[1].last_reply = "451 4.4.1 No answer"
        self.successResultOf(self.queue.hold(bounce.id))

        listing = self.call(self.client.list_queue())

        self.assertEqual(listing.envelopes, self.queue.envelopes())
        self.assertEqual([e.id for e in listing.envelopes], [post.id, bounce.id])
        self.assertEqual([e.held for e in listing.envelopes], [False, True])
        self.assertTrue(listing.delivering)

    def test_empty(self) -> None:
        """An empty queue lists as no messages."""
        self.assertEqual(self.call(self.client.list_queue()).envelopes, [])

    def test_delivery_off(self) -> None:
        """With delivery off (C{processorthread = false}) the listing says so."""
        client, self.pump = self.connect(QueueControl(self.queue, None, self.clock))
        self.assertFalse(self.call(client.list_queue()).delivering)

    def test_larger_than_one_amp_value(self) -> None:
        """
        A queue far larger than the 65,535 bytes one AMP value can hold (a
        message to 1,500 members, each with a long reply) is listed whole
        and in order, in pages.
        """
        members = [f"member{i:04d}@example.org" for i in range(1500)]
        big = self.enqueue("dev@groups.example.com", members)
        for r in big.recipients:
            r.last_reply = "451 4.4.1 " + "Greylisted, please try again later. " * 4
        after = self.enqueue("dev@groups.example.com", ["last@example.org"])

        listing = self.call(self.client.list_queue())

        self.assertEqual(listing.envelopes, self.queue.envelopes())
        self.assertEqual([e.id for e in listing.envelopes], [big.id, after.id])
        self.assertEqual([r.address for r in listing.envelopes[0].recipients], members)

    def test_one_page_is_too_much(self) -> None:
        """
        (The premise of the test above.) That queue in one page is more than
        AMP can carry: its response cannot be made into a box. (Checked on
        the box, not over the connection: AMP would log the whole value,
        more than trial's own AMP link to a worker process can carry.)
        """
        members = [f"member{i:04d}@example.org" for i in range(1500)]
        big = self.enqueue("dev@groups.example.com", members)
        for r in big.recipients:
            r.last_reply = "451 4.4.1 " + "Greylisted, please try again later. " * 4
        self.control.page_bytes = 10**9
        page = self.control.list_queue()
        self.assertEqual(page["cursor"], "")
        self.assertRaises(TooLong, ListQueue.makeResponse, page, None)

    def test_message_deleted_between_pages(self) -> None:
        """
        A message deleted while its recipients are being listed page by page
        is not listed further, and the listing goes on with the next message:
        each recipient of the others is listed once.
        """
        messages = [
            self.enqueue("dev@groups.example.com", [f"m{n}r{i}@example.org" for i in range(4)])
            for n in range(3)
        ]
        self.control.page_bytes = 400
        seen: list[str] = []
        page = self.control.list_queue()
        seen += [r["address"] for row in page["messages"] for r in row["recipients"]]
        cursor = page["cursor"]
        self.assertTrue(cursor.startswith(messages[0].id + " "), cursor)
        self.successResultOf(self.queue.delete(messages[0].id))
        while cursor:
            page = self.control.list_queue(cursor)
            seen += [r["address"] for row in page["messages"] for r in row["recipients"]]
            cursor = page["cursor"]
        first_page = len(seen) - 8
        self.assertTrue(0 < first_page < 4, seen)
        self.assertEqual(
            seen[first_page:],
            [r.address for e in messages[1:] for r in e.recipients],
        )

    def test_long_and_undecodable_addresses(self) -> None:
        """
        An address longer than 1,000 characters is listed cut short, and one
        with bytes that are not UTF-8 shows them as escapes: neither breaks
        the listing.
        """
        long_address = "x" * 5000 + "@example.org"
        envelope = self.enqueue("dev@groups.example.com", [long_address, "bad\udcff@example.org"])
        [listed] = self.call(self.client.list_queue()).envelopes
        self.assertEqual(listed.id, envelope.id)
        self.assertEqual(
            [r.address for r in listed.recipients],
            ["x" * MAX_TEXT + "...", "bad\\udcff@example.org"],
        )


class FlushTests(ControlTestCase):
    """C{Flush}: pending recipients are tried now."""

    def setUp(self) -> None:
        super().setUp()
        self.waiting = self.enqueue("dev@groups.example.com", ["a@one.example", "b@two.example"])
        self.waiting.recipients[0].state = DELIVERED
        self.waiting.recipients[1].next_attempt = NOW + 3600
        self.held = self.enqueue("dev@groups.example.com", ["c@three.example"])
        self.held.recipients[0].next_attempt = NOW + 3600
        self.successResultOf(self.queue.hold(self.held.id))
        self.other = self.enqueue("dev@groups.example.com", ["d@four.example"])
        self.other.recipients[0].next_attempt = NOW + 7200

    def test_flush_all(self) -> None:
        """
        Every pending recipient of every message not on hold becomes due now,
        and delivery is woken once; delivered recipients and held messages
        are left as they were.
        """
        result = self.call(self.client.flush())
        now = self.clock.seconds()
        self.assertEqual(result, FlushResult(messages=2, recipients=2, held=1, delivering=True))
        self.assertEqual(self.waiting.recipients[1].next_attempt, now)
        self.assertEqual(self.other.recipients[0].next_attempt, now)
        self.assertEqual(self.held.recipients[0].next_attempt, NOW + 3600)
        self.assertEqual(self.delivery.kicks, 1)
        self.assertEqual(
            [(e.id, [r.address for r in rs]) for e, rs in self.queue.due(now)],
            [(self.waiting.id, ["b@two.example"]), (self.other.id, ["d@four.example"])],
        )

    def test_flush_one(self) -> None:
        """Flushing one message makes only its pending recipients due."""
        result = self.call(self.client.flush(self.other.id))
        self.assertEqual(result, FlushResult(messages=1, recipients=1, held=0, delivering=True))
        self.assertEqual(self.other.recipients[0].next_attempt, self.clock.seconds())
        self.assertEqual(self.waiting.recipients[1].next_attempt, NOW + 3600)
        self.assertEqual(self.delivery.kicks, 1)

    def test_flush_held(self) -> None:
        """A held message is not flushed: the result says it is on hold."""
        result = self.call(self.client.flush(self.held.id))
        self.assertEqual(result, FlushResult(messages=0, recipients=0, held=1, delivering=True))
        self.assertEqual(self.held.recipients[0].next_attempt, NOW + 3600)
        self.assertEqual(self.delivery.kicks, 0)

    def test_nothing_pending(self) -> None:
        """With nothing pending, delivery is not woken."""
        for e in (self.waiting, self.other):
            for r in e.recipients:
                r.state = FAILED
        result = self.call(self.client.flush())
        self.assertEqual(result.recipients, 0)
        self.assertEqual(self.delivery.kicks, 0)

    def test_no_such_message(self) -> None:
        """Flushing an id that is not queued fails with "no such message"."""
        error = self.call_fails(self.client.flush("0000000000000000-00000000"), NoSuchMessageError)
        self.assertIn("no such message: 0000000000000000-00000000", str(error))

    def test_delivery_off(self) -> None:
        """With delivery off the recipients are made due, and the result says nothing is sent."""
        client, self.pump = self.connect(QueueControl(self.queue, None, self.clock))
        result = self.call(client.flush())
        self.assertEqual(result, FlushResult(messages=2, recipients=2, held=1, delivering=False))


class HoldReleaseDeleteTests(ControlTestCase):
    """C{Hold}, C{Release} and C{Delete}: one message, by queue id."""

    def setUp(self) -> None:
        super().setUp()
        self.envelope = self.enqueue("dev@groups.example.com", ["a@one.example", "b@two.example"])

    def on_disk(self) -> dict[str, Envelope]:
        return {e.id: e for e in read_queue(self.directory)}

    def test_hold(self) -> None:
        """A held message is held on disk, and is not due for delivery."""
        self.assertIsNone(self.call(self.client.hold(self.envelope.id)))
        self.assertTrue(self.on_disk()[self.envelope.id].held)
        self.assertEqual(self.queue.due(self.clock.seconds() + 10**6), [])

    def test_release(self) -> None:
        """
        A released message is no longer held, on disk too, is due again, and
        delivery is woken (its timer ignored the message while held).
        """
        self.call(self.client.hold(self.envelope.id))
        self.assertEqual(self.delivery.kicks, 0)
        self.call(self.client.release(self.envelope.id))
        self.assertFalse(self.on_disk()[self.envelope.id].held)
        self.assertEqual(self.delivery.kicks, 1)
        [(due, _)] = self.queue.due(self.clock.seconds())
        self.assertIs(due, self.envelope)

    def test_delete(self) -> None:
        """
        A deleted message is gone from the queue and the disk, and the result
        counts the recipients it still had pending.
        """
        self.envelope.recipients[0].state = DELIVERED
        path = self.queue.data_path(self.envelope.id)
        self.assertEqual(self.call(self.client.delete(self.envelope.id)), 1)
        self.assertIsNone(self.queue.get(self.envelope.id))
        self.assertEqual(self.on_disk(), {})
        self.assertFalse(os.path.exists(path))

    def test_no_such_message(self) -> None:
        """
        Hold, release and delete of an id that is not queued (deleted already,
        or not a queue id at all) fail with "no such message" on the client.
        """
        self.call(self.client.delete(self.envelope.id))
        for command in (self.client.hold, self.client.release, self.client.delete):
            for queue_id in (self.envelope.id, "../../etc/passwd"):
                error = self.call_fails(command(queue_id), NoSuchMessageError)
                self.assertEqual(str(error), f"no such message: {queue_id}")

    def test_disk_error(self) -> None:
        """A hold that cannot be written to the disk fails with the OS error."""
        self.ops.fail = True
        error = self.call_fails(self.client.hold(self.envelope.id), OSError)
        self.assertIn("No space left on device", str(error))
        self.ops.fail = False

    def test_queue_closed(self) -> None:
        """While the daemon stops (its queue closed), changes fail with L{QueueClosedError}."""
        self.successResultOf(self.queue.close())
        self.call_fails(self.client.hold(self.envelope.id), QueueClosedError)


class FormatTests(SynchronousTestCase):
    """L{format_queue}: the C{mailq}-like table."""

    def test_table(self) -> None:
        """
        Each message shows its id (C{!}: held), size, arrival time and sender
        (C{<>}: a bounce), then each recipient with its state, attempts, next
        attempt and last reply; a footer gives the total.
        """
        envelopes = [
            Envelope(
                id="0006089a9c3f8e00-0a1b2c3d",
                sender="dev@groups.example.com",
                recipients=[
                    RecipientState("a@one.example", DELIVERED, 1, 0.0, "250 2.0.0 Ok"),
                    RecipientState("b@two.example", PENDING, 2, NOW + 600, "451 4.4.1 No answer"),
                    RecipientState("c@three.example", PENDING, 0, NOW, ""),
                ],
                xverp=True,
                created=NOW,
                size=1234,
            ),
            Envelope(
                id="0006089a9c3f8e01-0a1b2c3e",
                sender="",
                recipients=[RecipientState("dev@groups.example.com")],
                xverp=False,
                created=NOW + 1,
                held=True,
                size=1000,
            ),
        ]
        pad = " " * 58
        self.assertEqual(
            format_queue(envelopes, time.gmtime).splitlines(),
            [
                "-Queue ID-----------------  --Size-- ----Arrival Time---- -Sender/Recipient-------",
                "0006089a9c3f8e00-0a1b2c3d       1234 2023-11-14 22:13:20  dev@groups.example.com (XVERP)",
                f"{pad}a@one.example  [delivered, 1 attempt]",
                f"{pad}  (250 2.0.0 Ok)",
                f"{pad}b@two.example  [pending, 2 attempts, next 2023-11-14 22:23:20]",
                f"{pad}  (451 4.4.1 No answer)",
                f"{pad}c@three.example  [pending]",
                "",
                "0006089a9c3f8e01-0a1b2c3e!      1000 2023-11-14 22:13:21  <>",
                f"{pad}dev@groups.example.com  [pending]",
                "",
                "-- 3 Kbytes in 2 Requests. 1 on hold.",
            ],
        )

    def test_empty(self) -> None:
        """An empty queue reads as Postfix's C{mailq} says it."""
        self.assertEqual(format_queue([]), "Mail queue is empty\n")

    def test_terminal_escapes(self) -> None:
        """
        A remote server's reply (or an address) cannot send escape sequences
        to the operator's terminal: control characters are shown escaped.
        """
        envelope = Envelope(
            id="0006089a9c3f8e00-0a1b2c3d",
            sender="a\x07@example.org",
            recipients=[RecipientState("b@example.org", last_reply="550 \x1b[2J\x1b]0;owned\x07")],
            xverp=False,
            created=NOW,
        )
        text = format_queue([envelope])
        self.assertNotIn("\x1b", text)
        self.assertNotIn("\x07", text)
        self.assertIn("(550 \\x1b[2J\\x1b]0;owned\\x07)", text)
        self.assertIn("a\\x07@example.org", text)


class ControlServiceTests(SynchronousTestCase):
    """L{ControlService}: where and how the daemon listens."""

    def setUp(self) -> None:
        self.base = tempfile.mkdtemp(prefix="gsq-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.path = os.path.join(self.base, "control")
        self.reactor = MemoryReactorClock()
        queue = OutboundQueue(os.path.join(self.base, "queue"), clock=self.reactor)
        self.service = ControlService(
            self.path, ControlFactory(QueueControl(queue, None, self.reactor)), self.reactor
        )
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_listens_mode_0600(self) -> None:
        """The socket is made readable and writable by its owner only."""
        self.service.startService()
        [(path, factory, _, mode, _)] = self.reactor.unixServers
        self.assertEqual((path, mode), (self.path, 0o600))
        self.assertIs(factory, self.service.factory)

    def test_stale_socket_replaced(self) -> None:
        """A socket left by a daemon that died is removed, so the new one can listen."""
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(self.path)
        stale.close()
        self.service.startService()
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(len(self.reactor.unixServers), 1)

    def test_live_socket_kept(self) -> None:
        """
        A socket another process listens on is not taken over: the error is
        logged, and gsmail runs on without queue control.
        """
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(live.close)
        live.bind(self.path)
        live.listen(1)
        self.service.startService()
        self.assertEqual(self.reactor.unixServers, [])
        self.assertTrue(os.path.exists(self.path))
        [event] = [e for e in self.events if e["log_level"] == LogLevel.error]
        self.assertEqual(event["path"], self.path)
        self.assertIn("another process is listening", event["error"])
        self.successResultOf(self.service.stopService())

    def test_default_path(self) -> None:
        """
        Without C{control_socket}, the socket is C{control} in the queue
        directory; a relative C{control_socket} is taken relative to the
        configuration file.
        """
        config = make_config(self.base, queue_dir="/var/spool/q")
        self.assertEqual(control_path(config), "/var/spool/q/control")
        ini = write_ini(self.base, "/var/spool/q", control_socket="run/ctl")
        config = load_config(ini)
        self.assertEqual(control_path(config), os.path.join(self.base, "run", "ctl"))


def write_ini(directory: str, queue_dir: str, **extra: str) -> str:
    """A gsconfig.ini for C{gsmail-queue}, naming C{queue_dir}."""
    lines = [
        "[webservice-default]",
        f"token = {TOKEN}",
        "[gsmail-default]",
        "url = embedded",
        "lmtp_endpoint = tcp:0:interface=127.0.0.1",
        "domains = groups.example.com",
        "hostname = mx.groups.example.com",
        "submission_endpoint = tcp:0:interface=127.0.0.1",
        f"queue_dir = {queue_dir}",
    ] + [f"{name} = {value}" for name, value in extra.items()]
    path = os.path.join(directory, "gsconfig.ini")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


class CommandLineTests(TestCase):
    """
    C{gsmail-queue} against a running gsmail (delivery off, so mail stays
    queued), and after it stopped.
    """

    def setUp(self) -> None:
        # Short: a UNIX socket's path has at most 107 bytes.
        self.base = tempfile.mkdtemp(prefix="gsq-")
        self.addCleanup(shutil.rmtree, self.base, True)
        queue_dir = os.path.join(self.base, "queue")
        self.ini = write_ini(self.base, queue_dir)
        config = make_config(
            self.mktemp(),
            submission_endpoint="tcp:0:interface=127.0.0.1",
            queue_dir=queue_dir,
            processorthread=False,
        )
        self.socket_path = os.path.join(queue_dir, "control")
        self.service: GsmailService = makeService(config, reactor)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.stop)

    async def stop(self) -> None:
        if self.service.running:
            await self.service.stopService()

    async def submit(self, recipients: list[str]) -> str:
        """Submit a message as GroupServer does; its queue id."""
        port = self.service.port("submission").getHost().port

        def send() -> bytes:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo("groups.example.com")
                s.mail("dev@groups.example.com")
                for r in recipients:
                    s.rcpt(r)
                code, text = s.data(MESSAGE)
                self.assertEqual(code, 250)
                return text

        text = await deferToThread(send)
        return text.decode("ascii").rsplit(" ", 1)[-1]

    async def command(self, *argv: str) -> tuple[int, str, str]:
        """C{python -m gsmail.queuectl --config INI ARGV...}: status, output, errors."""
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "gsmail.queuectl", "--config", self.ini, *argv],
            env={**os.environ, "TZ": "UTC"},
            path=ROOT,
        )
        return code, out.decode(), err.decode()

    async def run_here(self, *argv: str) -> tuple[int, str, str]:
        """The same command, run in this process."""
        out, err = io.StringIO(), io.StringIO()
        code = await run(reactor, ["--config", self.ini, *argv], out, err)
        return code, out.getvalue(), err.getvalue()

    async def test_list_hold_delete(self) -> None:
        """
        C{list} names the submitted message, its sender and recipients (pending),
        and says delivery is off; C{hold} puts it on hold (C{!} in the listing);
        C{delete} removes it, and the queue lists as empty.
        """
        queue_id = await self.submit(["a@one.example", "b@two.example"])

        code, out, err = await self.command("list")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertRegex(
            lines[1], rf"^{queue_id}  +\d+ \d{{4}}-\d\d-\d\d .*dev@groups\.example\.com$"
        )
        self.assertEqual(
            [line.strip() for line in lines[2:4]],
            ["a@one.example  [pending]", "b@two.example  [pending]"],
        )
        self.assertIn("-- Delivery is off (processorthread = false): nothing is sent.", lines)

        code, out, err = await self.command("hold", queue_id)
        self.assertEqual((code, out, err), (0, f"{queue_id}: placed on hold\n", ""))
        envelope = self.service.queue.get(queue_id) if self.service.queue else None
        self.assertTrue(envelope is not None and envelope.held)
        code, out, _ = await self.run_here("list")
        self.assertTrue(out.splitlines()[1].startswith(f"{queue_id}!"), out)

        code, out, err = await self.command("delete", queue_id)
        self.assertEqual(
            (code, out, err), (0, f"{queue_id}: deleted, 2 recipients not delivered\n", "")
        )
        code, out, _ = await self.run_here("list")
        self.assertEqual((code, out.splitlines()[0]), (0, "Mail queue is empty"))

    async def test_release_and_flush(self) -> None:
        """
        C{release} takes a message off hold; C{flush} makes its recipients due
        and says that nothing is sent while delivery is off; C{flush ID} of a
        held message says it is on hold.
        """
        queue_id = await self.submit(["a@one.example"])
        self.assertEqual((await self.run_here("hold", queue_id))[0], 0)
        code, out, _ = await self.run_here("flush", queue_id)
        self.assertEqual((code, out), (0, f"{queue_id} is on hold: release it to deliver it\n"))
        code, out, _ = await self.run_here("release", queue_id)
        self.assertEqual((code, out), (0, f"{queue_id}: released from hold\n"))
        code, out, _ = await self.run_here("flush")
        self.assertEqual(
            (code, out),
            (
                0,
                "Flushed 1 recipients of 1 messages\n"
                "-- Delivery is off (processorthread = false): nothing is sent.\n",
            ),
        )

    async def test_no_such_message(self) -> None:
        """An unknown id is reported as such, with EX_NOINPUT (66)."""
        for command in ("hold", "release", "delete", "flush"):
            code, out, err = await self.run_here(command, "0000000000000000-00000000")
            self.assertEqual(
                (code, out, err),
                (66, "", "gsmail-queue: no such message in the queue: 0000000000000000-00000000\n"),
            )

    async def test_socket_owner_only(self) -> None:
        """The control socket is readable and writable by its owner only."""
        self.assertEqual(os.stat(self.socket_path).st_mode & 0o777, 0o600)

    async def test_daemon_stopped(self) -> None:
        """
        With the daemon stopped, C{list} reads the queue directory and says
        so; the commands that change the queue fail with EX_UNAVAILABLE (69)
        and say the daemon is needed.
        """
        queue_id = await self.submit(["a@one.example"])
        await self.service.stopService()
        self.assertFalse(os.path.exists(self.socket_path))

        code, out, err = await self.command("list")
        self.assertEqual(code, 0)
        self.assertIn(queue_id, out)
        self.assertIn("a@one.example  [pending]", out)
        self.assertEqual(
            err,
            f"gsmail-queue: cannot reach the gsmail daemon at {self.socket_path}"
            f" (No such file or directory); read-only listing of {self.base}/queue\n",
        )
        for argv in (["flush"], ["hold", queue_id]):
            code, out, err = await self.run_here(*argv)
            self.assertEqual((code, out), (69, ""))
            self.assertEqual(
                err,
                f"gsmail-queue: cannot reach the gsmail daemon at {self.socket_path}"
                f" (No such file or directory): is it running? '{argv[0]}' needs it\n",
            )

    async def test_usage_and_config_errors(self) -> None:
        """
        A bad command line exits with EX_USAGE (64) and the usage; a
        configuration that cannot be read with EX_CONFIG (78).
        """
        for argv in ([], ["hold"], ["frobnicate"], ["delete", "a", "b"]):
            out, err = io.StringIO(), io.StringIO()
            code = await run(reactor, argv, out, err)
            self.assertEqual((code, out.getvalue()), (64, ""), argv)
            self.assertTrue(err.getvalue().startswith("usage: gsmail-queue"), err.getvalue())
        out, err = io.StringIO(), io.StringIO()
        missing = os.path.join(self.base, "missing.ini")
        code = await run(reactor, ["--config", missing, "list"], out, err)
        self.assertEqual(code, 78)
        self.assertEqual(
            err.getvalue(),
            f"gsmail-queue: configuration error: {missing}: cannot read: No such file or directory\n",
        )
