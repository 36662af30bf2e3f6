"""
Tests for L{gsmail.inbound.spool}: what is on disk, what is kept in memory,
and the Message-ID the ledger keys a message by.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import sysconfig
from email.parser import BytesHeaderParser
from email.policy import compat32

from twisted.trial.unittest import SynchronousTestCase

from gsmail.inbound import spool as spool_module
from gsmail.inbound.spool import (
    MEMORY_COPY,
    WRITE_CHUNK,
    Spool,
    SpooledMessage,
    SpoolFiles,
    _message_id,
    release,
)


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
