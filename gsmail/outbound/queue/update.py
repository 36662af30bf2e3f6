# -*- test-case-name: tests.outbound.test_queue -*-
"""
Changes to a queued message's files once it is queued, in the reactor
thread: one change at a time per message (a lock each); envelope rewrites
(L{gsmail.outbound.queue.OutboundQueue.update}, C{hold}, C{release}, a
journal grown long) shared by concurrent updates (generations: each caller
is answered by a write that began after its call), each emptying the
journal, whose records the new envelope includes; the replacement of an
unsigned message by its signed copy (C{resign}); and removal. Those that
empty or remove a journal hold the journals' lock, so no group commit
runs meanwhile.

Not here: the blocking jobs (L{gsmail.outbound.queue.store}), the
envelope's bytes (L{gsmail.outbound.queue.envelope}), the group commit of
records (L{gsmail.outbound.queue.journal}), the checks and log lines of
each operation (the queue's).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable

from twisted.internet.defer import DeferredLock
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail.outbound.queue.envelope import Envelope, NoSuchMessageError, encode_envelope
from gsmail.outbound.queue.journal import Journals
from gsmail.outbound.queue.store import (
    FileOps,
    QueueDirs,
    remove_message,
    rewrite_envelope,
    store_message,
)

__all__ = ["MessageUpdates", "Signer"]

#: Signs a message (the queue's C{signer},
#: L{gsmail.signing.DKIMSigner.queue_signer}): given its bytes and its
#: envelope sender, returns the header fields to put before it (C{b""}: not
#: signed) and a warning to log (C{""}: none); raises when the message must
#: wait (a key that cannot be used), with a one-line reason.
Signer = Callable[[bytes, str], tuple[bytes, str]]


class MessageUpdates:
    """
    The per-message locks and the changes made under them (reactor thread
    only).
    """

    def __init__(
        self,
        envelopes: dict[str, Envelope],
        journals: Journals,
        ops: FileOps,
        dirs: QueueDirs,
        run: Callable[[Callable[[], None]], Awaitable[None]],
        log: Logger,
    ) -> None:
        """
        @param envelopes: the queue's envelopes by id (its own dict: a
            message removed meanwhile is not written).
        @param journals: the queue's journals.
        @param ops: the file-system calls that change the queue.
        @param dirs: the queue's directories.
        @param run: runs a blocking job in the queue's C{sync} hand-off.
        @param log: the queue's logger (its lines keep their namespace).
        """
        self._envelopes = envelopes
        self._journals = journals
        self._ops = ops
        self._dirs = dirs
        self._run = run
        self.log = log
        self._locks: dict[str, DeferredLock] = {}
        # Per message: update generations asked for and written (coalescing).
        self._requested: dict[str, int] = {}
        self._written: dict[str, int] = {}

    async def acquire(self, qid: str) -> DeferredLock:
        """
        Wait for the lock of message C{qid}; give it back with L{release}.
        """
        lock = self._locks.setdefault(qid, DeferredLock())
        await lock.acquire()
        return lock

    def release(self, qid: str, lock: DeferredLock) -> None:
        """
        Give back the lock of message C{qid} (L{acquire}'s).
        """
        lock.release()
        if not lock.locked and not lock.waiting and self._locks.get(qid) is lock:
            del self._locks[qid]

    def bump(self, qid: str) -> int:
        """
        Ask for a write of the envelope of C{qid} as it is from now on.

        @return: the generation to pass to L{write}.
        """
        generation = self._requested[qid] = self._requested.get(qid, 0) + 1
        return generation

    def forget(self, qid: str) -> None:
        """Drop what is known of a removed message; its waiting records fail."""
        self._requested.pop(qid, None)
        self._written.pop(qid, None)
        self._journals.forget(qid)

    async def write(self, qid: str, generation: int) -> None:
        """
        Write the envelope as it is now, unless a write that began after
        generation C{generation} was asked for has already done it; then
        empty its journal, whose records the new envelope includes (as it
        does the records still waiting: their callers are answered by this
        write). Per-message lock held.

        @raise NoSuchMessageError: it was removed meanwhile.
        @raise OSError: the disk (the next record rewrites it instead).
        """
        journals = self._journals
        async with journals.lock:
            envelope = self._envelopes.get(qid)
            if envelope is None:
                raise NoSuchMessageError(qid)
            if self._written.get(qid, 0) >= generation:
                return
            covers = self._requested[qid]
            # Here, in the reactor thread: the job gets bytes.
            data = encode_envelope(envelope, journals.seq.get(qid, 0))
            taken = journals.waiting.pop(qid, None)
            journal = journals.on_disk(qid)
            job = functools.partial(
                rewrite_envelope, self._ops, self._dirs, qid, data, journals.fds, journal
            )
            try:
                await self._run(job)
            except BaseException:
                journals.broken.add(qid)
                if taken is not None:
                    error = Failure()
                    for d in taken[1]:
                        d.errback(error)
                raise
            if qid in self._envelopes:
                self._written[qid] = max(self._written.get(qid, 0), covers)
                journals.broken.discard(qid)
                if journal is not None:
                    journals.lines[qid] = 0
        if taken is not None:
            for d in taken[1]:
                d.callback(None)

    async def replace_signed(self, old: Envelope, new: Envelope, signer: Signer) -> str:
        """
        Sign the message of C{old} and store it as C{new} (durably), then
        remove C{old}; in memory C{new} takes its place. Per-message lock of
        C{old} held.

        @return: the signer's warning (C{""}: none).
        @raise Exception: the signer's (nothing changed), or C{OSError}
            (nothing changed, or the old message is left for the load to
            remove).
        """
        qid = old.id
        ops, dirs, journals = self._ops, self._dirs, self._journals
        old_data = os.path.join(dirs.data, qid)
        warnings: list[str] = []
        await journals.lock.acquire()  # no journal write meanwhile
        journal = journals.on_disk(qid)
        fd = journals.fds.pop(qid, None)
        replaced: list[bool] = []

        def job() -> None:
            with open(old_data, "rb") as f:
                message = f.read()
            prefix, warning = signer(message, old.sender)  # raises: nothing changed
            warnings.append(warning)
            store_message(ops, dirs, new, prefix + message, 0)
            # The signed copy is durable: the old one goes (load()
            # finishes this if a crash stops it).
            replaced.append(True)
            remove_message(ops, dirs, qid, fd, journal, [])

        try:
            await self._run(job)
        except BaseException:
            if fd is not None and not replaced:
                journals.fds[qid] = fd
            if not replaced:
                raise
            self.log.failure("Removing {queue_id} after signing it failed", queue_id=qid)
        finally:
            journals.lock.release()
        del self._envelopes[qid]
        self.forget(qid)
        self._envelopes[new.id] = new
        return warnings[0] if warnings else ""

    async def remove(self, qid: str) -> None:
        """
        Remove the files of message C{qid}, and the message from memory once
        its envelope is unlinked. Per-message lock held.

        @raise OSError: the disk (the message is gone if its envelope is).
        """
        gone: list[bool] = []
        journals = self._journals
        await journals.lock.acquire()  # no journal write meanwhile
        journal = journals.on_disk(qid)
        fd = journals.fds.pop(qid, None)
        job = functools.partial(remove_message, self._ops, self._dirs, qid, fd, journal, gone)
        try:
            await self._run(job)
        finally:
            journals.lock.release()
            if gone:
                del self._envelopes[qid]
                self.forget(qid)
