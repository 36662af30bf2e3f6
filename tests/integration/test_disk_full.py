# -*- test-case-name: tests.integration.test_disk_full -*-
"""
A really full disk: gsmail's spool (or outbound queue) on a small tmpfs, in
this process, with real clients on 127.0.0.1 (raw sockets, smtplib, swaks).
Each test asserts what the sender sees (C{452 4.3.1 Insufficient system
storage}, never a dropped connection or a 5xx), that the session goes on,
that nothing is left open or on the disk, that the fault is logged once,
and that mail flows again as soon as there is room, without a restart.

Mounting a tmpfs needs root (CI runs as root): run by hand as another user,
these tests skip; with C{CI} set they fail instead.
"""

from __future__ import annotations

import errno
import os
import shutil
import smtplib
import subprocess
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from gsmail.outbound.queue import read_queue
from gsmail.service import GsmailService
from tests.integration.clients import CLIENT_TIMEOUT, DEV, EXAMPLE, SENDER, RawClient, make_message
from tests.util import make_config, open_descriptors, port_of, require_tool, start_service

#: The size of the spool's file system, in bytes.
DISK = 1024 * 1024
#: Messages larger than L{DISK}, in bytes.
BIG = 2 * DISK
#: Longest wait for the server to settle (seconds).
WAIT = 10.0


def need_root(what: str) -> None:
    """Skip (by hand) or fail (CI) a test that needs root for C{what}."""
    if os.geteuid() == 0:
        return
    message = f"{what} needs root"
    if os.environ.get("CI"):
        raise AssertionError(message)
    raise SkipTest(message)


def mount_tmpfs(test: TestCase, size: int) -> str:
    """
    A fresh tmpfs of C{size} bytes, unmounted by the test's cleanup.

    @return: its mount point.
    """
    need_root("mounting a tmpfs")
    mount = require_tool("mount", "/usr/bin/mount", "/bin/mount")
    umount = require_tool("umount", "/usr/bin/umount", "/bin/umount")
    path = os.path.abspath(test.mktemp())
    os.makedirs(path)
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
        capture_output=True,
        timeout=10,
        check=False,
    )
    if result.returncode:
        message = f"mount -t tmpfs failed: {result.stderr.decode(errors='replace').strip()}"
        if os.environ.get("CI"):
            raise AssertionError(message)
        raise SkipTest(message)
    test.addCleanup(subprocess.run, [umount, "-l", path], timeout=10, check=False)
    return path


def fill(directory: str) -> str:
    """
    Fill C{directory}'s file system to the last byte with one file (blocking).

    @return: the file's path; remove it to give the space back.
    """
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    block = b"\0" * 65536
    try:
        # Bounded: the file system holds at most a few hundred blocks.
        for _ in range(DISK // 512):
            try:
                os.write(fd, block[:512] if _ else block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return path


def big_message(message_id: str) -> bytes:
    """A message of about L{BIG} bytes, CRLF line endings."""
    line = b"0123456789" * 7 + b"\r\n"
    return make_message(message_id) + line * (BIG // len(line))


class DiskFullTests(TestCase):
    """gsmail's spool or queue on a tmpfs that fills up."""

    timeout = 120

    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start(self, **overrides: Any) -> GsmailService:
        """gsmail with its spool on a fresh tmpfs of L{DISK} bytes."""
        self.spool = mount_tmpfs(self, DISK)
        self.config = make_config(self.mktemp(), spool_dir=self.spool, **overrides)
        return start_service(self, self.config)

    def errors(self) -> list[str]:
        """The text of every error event logged so far."""
        return [formatEvent(e) for e in self.events if e.get("log_level") is LogLevel.error]

    def assert_spool_empty(self) -> None:
        """Only emptied spool files (kept for reuse) are left on the tmpfs."""
        sizes = {
            name: os.path.getsize(os.path.join(self.spool, name)) for name in os.listdir(self.spool)
        }
        self.assertEqual({name: 0 for name in sizes}, sizes)

    async def settled(self, service: GsmailService, descriptors: int) -> None:
        """Wait until no delivery runs and no more than C{descriptors} are open."""
        deadline = reactor.seconds() + WAIT  # type: ignore[attr-defined]
        while service.core.in_flight or open_descriptors() > descriptors:
            if reactor.seconds() > deadline:  # type: ignore[attr-defined]
                self.fail(f"{open_descriptors()} descriptors open, {descriptors} before")
            await deferLater(reactor, 0.05)

    async def test_esmtp_data_fills_disk(self) -> None:
        """
        Ten messages larger than the disk over one ESMTP connection (no
        SIZE: the disk fills while DATA streams): each gets one reply, 452
        4.3.1, after its final dot; no descriptor stays open, no spool file
        keeps data, one error line is logged for the ten; the next message
        on the same connection is posted.
        """
        service = self.start()
        port = port_of(service, "smtp")

        def transaction(client: RawClient, message: bytes) -> list[str]:
            client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{EXAMPLE}>\r\nDATA\r\n".encode())
            first = client.replies(3)
            client.send(message + b".\r\n")
            return [f"{r.code} {r.lines[-1]}" for r in [*first, client.reply()]]

        client = await deferToThread(RawClient, port)
        self.addCleanup(client.sock.close)
        await deferToThread(client.reply)
        await deferToThread(client.send, b"EHLO client.example.org\r\n")
        await deferToThread(client.reply)
        ok = await deferToThread(transaction, client, make_message("before@example.org"))
        self.assertEqual(ok[-1][:9], "250 2.0.0")
        await self.settled(service, 10_000)
        before = open_descriptors()

        for n in range(10):
            got = await deferToThread(transaction, client, big_message(f"big-{n}@example.org"))
            self.assertEqual(
                got,
                [
                    "250 2.1.0 Sender ok",
                    "250 2.1.5 Recipient ok",
                    "354 End data with <CR><LF>.<CR><LF>",
                    "452 4.3.1 Insufficient system storage",
                ],
            )
        await self.settled(service, before)
        self.assert_spool_empty()
        [error] = self.errors()
        self.assertIn("ENOSPC", error)
        self.assertIn(self.spool, error)

        ok = await deferToThread(transaction, client, make_message("after@example.org"))
        self.assertEqual(ok[-1][:9], "250 2.0.0")
        posts = service.standin.posts("example")
        self.assertEqual(len(posts), 2)
        self.assertIn(b"Message-ID: <after@example.org>", posts[1])
        self.assertEqual(len(self.errors()), 1)

    async def test_lmtp_one_reply_per_recipient(self) -> None:
        """
        LMTP, two groups, a message larger than the disk: two 452 4.3.1
        replies after the dot, then QUIT's 221 (the client stays in step);
        a new session delivers to both groups.
        """
        service = self.start()
        port = port_of(service, "lmtp")

        def session(message: bytes) -> list[str]:
            with RawClient(port) as client:
                client.reply()
                client.send(
                    f"LHLO client.example.org\r\nMAIL FROM:<{SENDER}>\r\n"
                    f"RCPT TO:<{EXAMPLE}>\r\nRCPT TO:<{DEV}>\r\nDATA\r\n".encode()
                )
                client.replies(5)
                client.send(message + b".\r\nQUIT\r\n")
                return [f"{r.code} {r.enhanced}" for r in client.replies(3)]

        got = await deferToThread(session, big_message("big@example.org"))
        self.assertEqual(got, ["452 4.3.1", "452 4.3.1", "221 2.0.0"])
        self.assert_spool_empty()
        got = await deferToThread(session, make_message("small@example.org"))
        self.assertEqual(got, ["250 2.0.0", "250 2.0.0", "221 2.0.0"])
        self.assertEqual(len(service.standin.posts("example")), 1)
        self.assertEqual(len(service.standin.posts("dev")), 1)

    async def test_mail_refused_while_full(self) -> None:
        """
        smtplib declares SIZE: a message larger than the free space is
        refused 452 4.3.1 at MAIL, before its data is sent. With the disk
        filled to the last byte, swaks's small message is refused at MAIL
        too; once the filler is removed, swaks's next message is posted.
        """
        swaks = require_tool("swaks")
        service = self.start()
        port = port_of(service, "smtp")

        def send_big() -> smtplib.SMTPSenderRefused:
            with smtplib.SMTP("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as client:
                try:
                    client.sendmail(SENDER, [EXAMPLE], big_message("big@example.org"))
                except smtplib.SMTPSenderRefused as e:
                    return e
            raise AssertionError("the message was accepted")

        refused = await deferToThread(send_big)
        self.assertEqual(
            (refused.smtp_code, refused.smtp_error), (452, b"4.3.1 Insufficient system storage")
        )

        async def run_swaks() -> tuple[str, int]:
            out, err, code = await getProcessOutputAndValue(
                swaks,
                ["--server", f"127.0.0.1:{port}", "--timeout", "10", "--from", SENDER]
                + ["--to", EXAMPLE, "--helo", "client.example.org"],
                env=dict(os.environ),
            )
            return (out + err).decode(errors="replace"), code

        filler = await deferToThread(fill, self.spool)
        output, code = await run_swaks()
        self.assertNotEqual(code, 0, output)
        self.assertIn("<** 452 4.3.1 Insufficient system storage", output)

        os.remove(filler)
        output, code = await run_swaks()
        self.assertEqual(code, 0, output)
        self.assertIn("<-  250 2.0.0 Added to the group", output)
        self.assertEqual(len(service.standin.posts("example")), 1)
        self.assertEqual(len(self.errors()), 1)

    async def test_submission_queue_full(self) -> None:
        """
        The outbound queue's disk is full: GroupServer's submission gets 452
        4.3.1 after the dot and nothing is left in the queue; with room
        again, the next submission on the same connection is queued (250).
        """
        queue_dir = mount_tmpfs(self, DISK)
        control = tempfile.mkdtemp(dir="/tmp", prefix="gsd-")  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, control, True)
        service = self.start(
            submission_endpoint="tcp:0:interface=127.0.0.1",
            queue_dir=queue_dir,
            control_socket=os.path.join(control, "control"),
            processorthread=False,
        )
        port = service.listeners["submission"]._waitingForPort.result.getHost().port
        filler = await deferToThread(fill, queue_dir)
        client = await deferToThread(smtplib.SMTP, "127.0.0.1", port, timeout=CLIENT_TIMEOUT)
        self.addCleanup(client.close)
        message = make_message("out@groups.example.com")

        def submit() -> tuple[int, bytes]:
            try:
                client.sendmail("example@groups.example.com", ["member@example.net"], message)
            except smtplib.SMTPDataError as e:
                return e.smtp_code, e.smtp_error
            return 250, b""

        for _ in range(3):
            self.assertEqual(
                await deferToThread(submit), (452, b"4.3.1 Insufficient system storage")
            )
        self.assertEqual(read_queue(queue_dir), [])
        self.assertEqual(len(self.errors()), 1, self.errors())
        self.assertIn("Queueing failed", self.errors()[0])

        os.remove(filler)
        self.assertEqual(await deferToThread(submit), (250, b""))
        [queued] = read_queue(queue_dir)
        self.assertEqual([r.address for r in queued.recipients], ["member@example.net"])
        await deferToThread(client.quit)
        # The queue's own files go when gsmail stops, before the unmount.
        self.addCleanup(shutil.rmtree, os.path.join(queue_dir, "env"), True)
