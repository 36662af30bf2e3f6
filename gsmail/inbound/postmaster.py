# -*- test-case-name: tests.inbound.test_postmaster -*-
"""
Mail to the postmaster: RFC 5321 §4.5.1 requires every SMTP server to take
mail for C{postmaster} (bare, RFC 5321 §4.1.1.3, and at each domain it
receives for), and people write there when something goes wrong. GroupServer
has no postmaster group, so gsmail keeps that mail itself:

  - L{ForwardPostmaster}: with C{postmaster_address} set and the outbound
    side configured, the message goes through the outbound queue to that
    address (as a Postfix alias to an outside address would).
  - L{MaildirPostmaster}: otherwise it is stored in a Maildir
    (C{postmaster_maildir}), which any mail reader can open.

Either way the sender gets C{250} only once the message is fsynced (queued,
or in the Maildir's C{new/}). Postmaster mail does not go through the post
ledger: a copy kept twice after a lost C{250} is harmless, as with any MTA.
"""

from __future__ import annotations

import mailbox
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import IO, Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail import status
from gsmail.inbound.spool import SpooledMessage
from gsmail.interfaces import Enqueue
from gsmail.logtext import printable
from gsmail.status import Reply

__all__ = ["Postmaster", "MaildirPostmaster", "ForwardPostmaster"]

log = Logger()

#: Runs a blocking job in a thread: C{blocking(job)} fires with its result.
Blocking = Callable[[Callable[[], Any]], "Deferred[Any]"]


class Postmaster(TypingProtocol):
    """Where postmaster mail goes."""

    def deliver(self, sender: str, prefix: bytes, message: SpooledMessage) -> Deferred[Reply]:
        """
        Keep one copy of C{message} with the trace fields C{prefix} before it.

        @param sender: the envelope sender, C{""} for the null sender.
        @return: fires with C{250 2.0.0} once the copy is fsynced, or with
            C{451 4.3.0} when it could not be kept; never fails.
        """


class _Concat:
    """A file-like reader of C{prefix} then C{rest} (for C{Maildir.add})."""

    def __init__(self, prefix: bytes, rest: IO[bytes]) -> None:
        self._prefix = prefix
        self._rest = rest

    def readline(self, size: int = -1) -> bytes:
        if self._prefix:
            line, sep, self._prefix = self._prefix.partition(b"\n")
            return line + sep
        return self._rest.readline(size)

    def read(self, size: int = -1) -> bytes:
        head, self._prefix = self._prefix, b""
        return head + self._rest.read(size)


class MaildirPostmaster:
    """
    Stores postmaster mail in a Maildir with Python's L{mailbox.Maildir}
    (which fsyncs the file before it moves it from C{tmp/} to C{new/});
    C{new/} is fsynced after, so the message survives a crash once C{250}
    is sent.

    @param path: the Maildir; made (with C{cur}, C{new}, C{tmp}) on first use.
    @param blocking: runs the disk work in a thread.
    """

    def __init__(self, path: str, blocking: Blocking) -> None:
        self.path = path
        self._blocking = blocking

    def deliver(self, sender: str, prefix: bytes, message: SpooledMessage) -> Deferred[Reply]:
        d: Deferred[Reply] = self._blocking(lambda: self._store(prefix, message))
        return d.addErrback(_failed, "store it in the postmaster Maildir")

    def _store(self, prefix: bytes, message: SpooledMessage) -> Reply:
        box = mailbox.Maildir(self.path, factory=None, create=True)
        with open(message.path, "rb") as f:
            key = box.add(_Concat(prefix, f))
        new = os.open(os.path.join(self.path, "new"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(new)
        finally:
            os.close(new)
        log.info("Postmaster mail stored in {path} as {key}", path=self.path, key=key)
        return status.POSTMASTER_STORED


class ForwardPostmaster:
    """
    Forwards postmaster mail to an outside address through the outbound
    queue, keeping the envelope sender. The message and its trace fields are
    copied to a file in C{spool_dir} (in a thread: it may be large), which
    the queue copies and fsyncs.

    @param queue: the outbound queue (its C{enqueue} fires once fsynced).
    @param address: C{postmaster_address}.
    @param spool_dir: where the copy is made.
    @param blocking: runs the copy in a thread.
    """

    def __init__(self, queue: Enqueue, address: str, spool_dir: str, blocking: Blocking) -> None:
        self.queue = queue
        self.address = address
        self.spool_dir = spool_dir
        self._blocking = blocking

    def deliver(self, sender: str, prefix: bytes, message: SpooledMessage) -> Deferred[Reply]:
        return Deferred.fromCoroutine(self._deliver(sender, prefix, message))

    async def _deliver(self, sender: str, prefix: bytes, message: SpooledMessage) -> Reply:
        try:
            path: str = await self._blocking(lambda: self._copy(prefix, message))
        except Exception:
            return _failed(Failure(), "copy it for the postmaster")
        try:
            entry = await self.queue.enqueue(sender, [self.address], path)
        except Exception:
            return _failed(Failure(), f"queue it for {self.address}")
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass
        log.info(
            "Postmaster mail queued as {queue_id} for {address}",
            queue_id=entry.id,
            address=self.address,
        )
        return status.POSTMASTER_STORED.with_text(f"Queued for the postmaster as {entry.id}")

    def _copy(self, prefix: bytes, message: SpooledMessage) -> str:
        fd, path = tempfile.mkstemp(prefix="postmaster-", suffix=".eml", dir=self.spool_dir or None)
        try:
            with os.fdopen(fd, "wb") as out, open(message.path, "rb") as f:
                out.write(prefix)
                shutil.copyfileobj(f, out)
        except BaseException:
            os.unlink(path)
            raise
        return path


def _failed(failure: Failure, what: str) -> Reply:
    """C{451 4.3.0}: the sender keeps the message and retries."""
    if isinstance(failure.value, OSError):
        log.error(
            "Postmaster mail: could not {what}: {error}",
            what=what,
            error=printable(str(failure.value)),
        )
    else:
        log.failure("Postmaster mail: could not {what}", failure, what=what)
    return status.LOCAL_ERROR.with_text(
        "Could not keep the message for the postmaster; try again later"
    )
