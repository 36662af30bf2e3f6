"""
Tests for L{gsmail.inbound.postmaster}: postmaster mail kept in a Maildir or
forwarded through the outbound queue.
"""

from __future__ import annotations

import mailbox
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase

from gsmail import status
from gsmail.inbound.postmaster import ForwardPostmaster, MaildirPostmaster
from gsmail.inbound.spool import Spool, SpooledMessage
from tests.fakes import FakeQueue

PREFIX = b"Return-Path: <a@example.org>\nX-Original-To: postmaster\n"
MESSAGE = b"Subject: help\nMessage-ID: <1@example.org>\n\nFrom the start of a line\nbody\n"


def now(job: Callable[[], Any]) -> Deferred[Any]:
    """Run the 'thread' job at once (the tests' stand-in for a thread pool)."""
    return maybeDeferred(job)


class PostmasterTestsMixin:
    def setUp(self) -> None:
        self.dir = self.mktemp()  # type: ignore[attr-defined]
        os.makedirs(self.dir)

    def message(self) -> SpooledMessage:
        spool = Spool(self.dir)
        spool.write(MESSAGE)
        return spool.finish()


class MaildirPostmasterTests(PostmasterTestsMixin, SynchronousTestCase):
    """L{MaildirPostmaster}."""

    def test_stored(self) -> None:
        """The message, trace fields first, is in the Maildir's new/ (made on first use)."""
        path = os.path.join(self.dir, "postmaster")
        reply = self.successResultOf(
            MaildirPostmaster(path, now).deliver("", PREFIX, self.message())
        )
        self.assertEqual(reply, status.POSTMASTER_STORED)
        [name] = os.listdir(os.path.join(path, "new"))
        with open(os.path.join(path, "new", name), "rb") as f:
            self.assertEqual(f.read(), PREFIX + MESSAGE)
        self.assertEqual(len(mailbox.Maildir(path, create=False)), 1)
        self.assertEqual(os.listdir(os.path.join(path, "tmp")), [])

    def test_unwritable(self) -> None:
        """A Maildir that cannot be made gets 451 4.3.0 (the sender retries), logged without a traceback."""
        path = os.path.join(self.dir, "file")
        with open(path, "w"):
            pass
        reply = self.successResultOf(
            MaildirPostmaster(os.path.join(path, "postmaster"), now).deliver(
                "", PREFIX, self.message()
            )
        )
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))


class ForwardPostmasterTests(PostmasterTestsMixin, SynchronousTestCase):
    """L{ForwardPostmaster}."""

    def test_queued(self) -> None:
        """The message is queued for the address with the original sender; the copy is removed."""
        queue = FakeQueue()
        forward = ForwardPostmaster(queue, "admin@example.net", self.dir, now)
        message = self.message()
        reply = self.successResultOf(forward.deliver("alice@example.org", PREFIX, message))
        self.assertEqual((reply.code, reply.enhanced), (250, "2.0.0"))
        [entry] = queue.entries
        self.assertEqual(
            (entry.sender, entry.recipients), ("alice@example.org", ["admin@example.net"])
        )
        self.assertEqual(entry.data, PREFIX + MESSAGE)
        self.assertIn(entry.id, reply.text)
        self.assertEqual(sorted(os.listdir(self.dir)), [os.path.basename(message.path)])

    def test_queue_fails(self) -> None:
        """A queue that cannot store it gets 451 4.3.0, and the copy is removed."""
        queue = FakeQueue()
        queue.error = OSError(28, "No space left on device")
        message = self.message()
        reply = self.successResultOf(
            ForwardPostmaster(queue, "admin@example.net", self.dir, now).deliver(
                "", PREFIX, message
            )
        )
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        self.assertEqual(sorted(os.listdir(self.dir)), [os.path.basename(message.path)])
