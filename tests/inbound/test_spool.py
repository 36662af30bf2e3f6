"""
Tests for L{gsmail.inbound.spool}: what is on disk, what is kept in memory,
and the Message-ID the ledger keys a message by.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import itertools
import os
import sysconfig
from email.parser import BytesHeaderParser
from email.policy import compat32

from twisted.internet.task import Clock
from twisted.logger import LogEvent, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from gsmail import status
from gsmail.inbound import spool as spool_module
from gsmail.inbound.spool import (
    MEMORY_COPY,
    WRITE_CHUNK,
    Spool,
    SpoolAlarm,
    SpooledMessage,
    SpoolFiles,
    _message_id,
    free_space,
    release,
    storage_reply,
)
from tests.util import DiskFaults, open_descriptors


def reference_message_id(header: bytes) -> str | None:
    """The Message-ID as C{email}'s compat32 parser reads it (what gsmail used before)."""
    value = BytesHeaderParser(policy=compat32).parsebytes(header).get("Message-ID")
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


HEADERS = [
    b"Message-ID: <a@b>\n",
    b"message-id:<a@b>\n",
    b"Subject: x\nMessage-Id: \n <a@b>\n  c\n",
    b"Subject x\nMessage-ID: <a@b>\n",  # not a field: the header section ends
    b"From foo@bar Sat Nov 21 05:49:00 2026\nMessage-ID: <a@b>\n",
    b"Message-ID : <a@b>\n",  # space before the colon: not a field
    b"X: y\nMessage-ID: <\xc3\xa9@b>\n",
    b"Message-ID: <1>\nMessage-ID: <2>\n",
    b"\n",
    b"",
    b"To: a\n\tcont\nMessage-ID:   \n",
    b": odd\nMessage-ID: <x>\n",
    b"A: b\nMessage-ID-X: <no>\nMessage-ID:<yes>\n",
    b"Message-ID: <a@b>",
    b"Received: from a\n\tby b; Sat, 21 Nov 2026\nMESSAGE-ID:\t<tab@b>\n",
]


def corpus_headers() -> list[bytes]:
    """The header sections of CPython's email test corpus, LF line endings."""
    pattern = os.path.join(
        sysconfig.get_paths()["stdlib"], "test", "test_email", "data", "msg_*.txt"
    )
    headers = []
    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as f:
            data = f.read().replace(b"\r\n", b"\n")
        end = data.find(b"\n\n")
        headers.append(data[: end + 1] if end >= 0 else data)
    return headers


class MessageIdTests(SynchronousTestCase):
    def test_same_as_email_parser(self) -> None:
        """
        The Message-ID found without the C{email} parser is the one the
        parser finds, for odd header sections (folded, misplaced, non-ASCII,
        repeated, after a line that ends the header section) and for every
        message of CPython's email corpus, so ledger keys do not change.
        """
        cases = HEADERS + corpus_headers()
        for header in cases:
            self.assertEqual(_message_id(header), reference_message_id(header), header[:200])
        self.assertEqual(_message_id(HEADERS[2]), "<a@b> c")
        self.assertIsNone(_message_id(HEADERS[3]))


class SpoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def spool(self, chunks: list[bytes]) -> Spool:
        spool = Spool(self.directory)
        for chunk in chunks:
            spool.write(chunk)
        return spool

    def test_small_message(self) -> None:
        """
        A small message is on disk, byte for byte, and its bytes are also
        handed on in memory, with its size, digest and Message-ID.
        """
        body = b"Message-ID: <m@x>\nSubject: hi\n\nbody\n"
        message = self.spool([body[:7], body[7:20], body[20:]]).finish()
        with open(message.path, "rb") as f:
            self.assertEqual(f.read(), body)
        self.assertEqual(message.data, body)
        self.assertEqual(message.size, len(body))
        self.assertEqual(message.digest, hashlib.sha256(body).hexdigest())
        self.assertEqual(message.message_id, "<m@x>")
        self.assertEqual(message.identity, "id:<m@x>")

    def test_large_message(self) -> None:
        """
        A message over L{MEMORY_COPY} bytes is only on disk, whole, also when
        it was written in several flushes.
        """
        line = b"x" * 999 + b"\n"
        chunks = [b"Subject: big\n\n"] + [line] * ((WRITE_CHUNK + MEMORY_COPY) // len(line))
        message = self.spool(chunks).finish()
        self.assertIsNone(message.data)
        with open(message.path, "rb") as f:
            self.assertEqual(f.read(), b"".join(chunks))
        self.assertIsNone(message.message_id)
        self.assertEqual(message.identity, "sha256:" + hashlib.sha256(b"".join(chunks)).hexdigest())

    def test_unique_files(self) -> None:
        """
        Every message gets a file of its own in the spool directory, even
        when a file of that name is left over from an earlier process.
        """
        self.patch(spool_module, "_counter", itertools.count(5))
        leftover = os.path.join(self.directory, f"gsmail-{os.getpid()}-5.eml")
        with open(leftover, "wb") as f:
            f.write(b"left over")
        paths = {Spool(self.directory).path for _ in range(5)}
        self.assertEqual(len(paths), 5)
        self.assertTrue(all(os.path.dirname(p) == self.directory for p in paths))
        self.assertNotIn(leftover, paths)
        with open(leftover, "rb") as f:
            self.assertEqual(f.read(), b"left over")

    def test_discard(self) -> None:
        """A discarded message leaves nothing in the spool directory."""
        spool = self.spool([b"Subject: x\n\nbody\n"])
        spool.discard()
        self.assertEqual(os.listdir(self.directory), [])


class SpoolFilesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.files = SpoolFiles(self.directory, keep=2)
        self.addCleanup(self.files.close)

    def receive(self, body: bytes) -> SpooledMessage:
        spool = Spool(files=self.files)
        spool.write(body)
        return spool.finish()

    def test_reused_empty(self) -> None:
        """
        A released file is used again for the next message, which finds it
        holding only its own bytes, however long the one before was.
        """
        first = self.receive(b"Subject: long\n\n" + b"x" * 100_000 + b"\n")
        release(first)
        self.assertEqual(os.path.getsize(first.path), 0)
        second = self.receive(b"Subject: short\n\nhi\n")
        self.assertEqual(second.path, first.path)
        with open(second.path, "rb") as f:
            self.assertEqual(f.read(), b"Subject: short\n\nhi\n")
        self.assertEqual(second.data, b"Subject: short\n\nhi\n")

    def test_concurrent_messages_get_their_own_files(self) -> None:
        """Messages being received at the same time never share a file."""
        spools = [Spool(files=self.files) for _ in range(4)]
        self.assertEqual(len({s.path for s in spools}), 4)
        for n, spool in enumerate(spools):
            spool.write(b"Subject: %d\n\nbody\n" % n)
        messages = [s.finish() for s in spools]
        for n, message in enumerate(messages):
            with open(message.path, "rb") as f:
                self.assertEqual(f.read(), b"Subject: %d\n\nbody\n" % n)
            release(message)
        # Two kept (keep=2), two removed.
        self.assertEqual(self.files.free, 2)
        self.assertEqual(len(os.listdir(self.directory)), 2)

    def test_removed_by_hand(self) -> None:
        """A kept file someone removed is not used again: a new one is made."""
        first = self.receive(b"Subject: a\n\nbody\n")
        release(first)
        os.unlink(first.path)
        second = self.receive(b"Subject: b\n\nbody\n")
        self.assertNotEqual(second.path, first.path)
        with open(second.path, "rb") as f:
            self.assertEqual(f.read(), b"Subject: b\n\nbody\n")

    def test_discard(self) -> None:
        """A discarded message's file is kept, empty, for the next one."""
        spool = Spool(files=self.files)
        spool.write(b"Subject: x\n\npart")
        spool.discard()
        self.assertEqual(self.files.free, 1)
        self.assertEqual(os.path.getsize(spool.path), 0)

    def test_close(self) -> None:
        """
        Closing removes the kept files, and a file released after it is
        removed too: nothing is left in the spool directory.
        """
        kept = self.receive(b"Subject: a\n\nbody\n")
        release(kept)
        still_taken = self.receive(b"Subject: b\n\nbody\n")
        self.files.close()
        self.assertEqual(os.listdir(self.directory), [os.path.basename(still_taken.path)])
        release(still_taken)
        self.assertEqual(os.listdir(self.directory), [])


class StorageFaultTests(SynchronousTestCase):
    """
    A full or failing disk while spooling: the error reaches the caller,
    nothing is left open or on disk, and the next message works.
    """

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.files = SpoolFiles(self.directory, keep=4)
        self.addCleanup(self.files.close)
        self.disk = DiskFaults(self)

    def big(self) -> bytes:
        return b"Subject: big\n\n" + b"y" * 99 + b"\n" + b"z" * WRITE_CHUNK

    def test_short_writes_completed(self) -> None:
        """
        write(2) storing only part of a chunk (a nearly full disk) does not
        lose the rest: the message on disk is whole.
        """
        self.disk.max_write = 1000
        for files in (None, self.files):
            spool = Spool(self.directory, files=files)
            data = self.big() + b"tail\n"
            spool.write(data)
            message = spool.finish()
            with open(message.path, "rb") as f:
                self.assertEqual(f.read(), data)
            self.assertEqual(message.digest, hashlib.sha256(data).hexdigest())
            release(message)
        self.assertGreater(self.disk.writes, 2 * len(data) // 1000)

    def test_write_fails(self) -> None:
        """
        ENOSPC, EDQUOT or EIO while a chunk is written: L{Spool.write}
        raises it, and the spool has given its file back (emptied, to its
        L{SpoolFiles}) or removed it; later writes raise C{ValueError}, a
        discard does nothing.
        """
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            for files in (None, self.files):
                before = open_descriptors()
                spool = Spool(self.directory, files=files)
                self.disk.write_error = code
                error = self.assertRaises(OSError, spool.write, self.big())
                self.assertEqual(error.errno, code)
                self.disk.write_error = None
                spool.discard()
                self.assertRaises(ValueError, spool.write, b"more\n")
                self.assertRaises(ValueError, spool.finish)
                if files is None:
                    self.assertEqual(open_descriptors(), before)
                    self.assertFalse(os.path.exists(spool.path))
                else:
                    self.assertEqual(os.path.getsize(spool.path), 0)
                    self.assertEqual(self.files.free, 1)

    def test_finish_fails(self) -> None:
        """
        The last write, at L{Spool.finish}, failing: C{OSError}, nothing
        left behind; a message after it (space back) is stored whole.
        """
        before = open_descriptors()
        for _ in range(20):
            for files in (None, self.files):
                spool = Spool(self.directory, files=files)
                spool.write(b"Subject: x\n\nbody\n")
                self.disk.write_error = errno.ENOSPC
                self.assertRaises(OSError, spool.finish)
                self.disk.write_error = None
        self.assertLessEqual(open_descriptors(), before + 1)  # the one kept file
        self.assertEqual(self.files.free, 1)
        self.assertEqual(
            [os.path.getsize(os.path.join(self.directory, n)) for n in os.listdir(self.directory)],
            [0],
        )
        spool = Spool(files=self.files)
        spool.write(b"Subject: back\n\nbody\n")
        message = spool.finish()
        with open(message.path, "rb") as f:
            self.assertEqual(f.read(), b"Subject: back\n\nbody\n")

    def test_create_fails(self) -> None:
        """No spool file can be made: C{OSError} from L{Spool}, nothing open."""
        before = open_descriptors()
        self.disk.create_error = errno.ENOSPC
        for files in (None, self.files):
            error = self.assertRaises(OSError, Spool, self.directory, files)
            self.assertEqual(error.errno, errno.ENOSPC)
        self.assertEqual(open_descriptors(), before)
        self.assertEqual(os.listdir(self.directory), [])

    def test_truncate_fails_on_release(self) -> None:
        """
        A released file that cannot be emptied (ftruncate fails) is closed
        and removed, not kept.
        """
        before = open_descriptors()
        spool = Spool(files=self.files)
        spool.write(b"Subject: x\n\nbody\n")
        message = spool.finish()
        self.disk.truncate_error = errno.EIO
        release(message)
        self.assertEqual(self.files.free, 0)
        self.assertEqual(os.listdir(self.directory), [])
        self.assertEqual(open_descriptors(), before)

    def test_create_bounded(self) -> None:
        """Making a spool file gives up after L{CREATE_ATTEMPTS} names that are taken."""
        self.disk.create_error = errno.EEXIST
        self.assertRaises(FileExistsError, Spool, self.directory)

    def test_storage_reply(self) -> None:
        """Full or failing disk: 452 4.3.1; another fault: 451 4.3.0."""
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            self.assertEqual(storage_reply(OSError(code, "x")), status.INSUFFICIENT_STORAGE)
        self.assertEqual(
            str(status.INSUFFICIENT_STORAGE.encode(), "ascii"),
            "452 4.3.1 Insufficient system storage\r\n",
        )
        self.assertEqual(storage_reply(OSError(errno.EACCES, "x")), status.LOCAL_ERROR)
        self.assertEqual(storage_reply(RuntimeError()), status.LOCAL_ERROR)

    def test_free_space(self) -> None:
        """The free bytes of the spool's file system, or C{None} for a missing directory."""
        free = free_space(self.directory)
        assert free is not None
        self.assertGreater(free, 0)
        self.assertIsNone(free_space(os.path.join(self.directory, "missing")))


class SpoolAlarmTests(SynchronousTestCase):
    """Spooling faults are logged once per burst."""

    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        self.patch(spool_module, "log", Logger(observer=self.events.append))
        self.clock = Clock()

    def texts(self) -> list[tuple[str, str]]:
        return [(e["log_level"].name, formatEvent(e)) for e in self.events]

    def test_one_line_per_burst(self) -> None:
        """
        The first fault is logged as an error naming its cause and the
        reply; the next 99 are not (but one reminder after C{remind}
        seconds); the first success ends the burst with one line, and the
        next fault starts a new burst.
        """
        alarm = SpoolAlarm("spooling", self.clock, remind=300)
        full = OSError(errno.ENOSPC, "No space left on device")
        for _ in range(100):
            self.assertEqual(alarm.failed(full, "/var/spool/gsmail"), status.INSUFFICIENT_STORAGE)
            self.clock.advance(4)
        self.assertEqual(
            self.texts(),
            [
                (
                    "error",
                    "Spooling failed in /var/spool/gsmail: ENOSPC (No space left on device); "
                    "answering 452 4.3.1 until it works again",
                ),
                (
                    "error",
                    "Spooling still failing in /var/spool/gsmail: ENOSPC "
                    "(No space left on device) (76 messages refused so far)",
                ),
            ],
        )
        alarm.succeeded()
        alarm.succeeded()
        self.assertEqual(
            self.texts()[2:],
            [("info", "Spooling works again (100 messages were refused meanwhile)")],
        )
        self.assertEqual(
            alarm.failed(OSError(errno.EACCES, "Permission denied"), "d"), status.LOCAL_ERROR
        )
        self.assertEqual(len(self.events), 4)
        self.assertIn("EACCES", self.texts()[3][1])
