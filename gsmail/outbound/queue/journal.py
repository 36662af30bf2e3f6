# -*- test-case-name: tests.outbound.test_queue -*-
"""
The per-recipient journals of the outbound queue, as the reactor thread
keeps them: which messages have one on disk and how long it is, the records
waiting to be written, and the group commit that writes them.

Recipient outcomes (L{gsmail.outbound.queue.OutboundQueue.record}, after
each transaction) are not written into the envelope, which would make a
message to n members cost O(n^2) bytes written: each is appended to the
message's journal as one line (L{gsmail.outbound.queue.envelope} has the
format). Records of every message that arrive while a write is running are
written together by the next one (group commit: one hand-off, one C{fsync}
per journal, and one of C{journal/} when a journal was created). Loading
replays a journal's records newer than its envelope's C{journal_seq}, so a
crash between rewriting an envelope and emptying its journal replays
nothing stale; a torn last line (a crash during an append, never
acknowledged) is cut off at load (L{Journals.load}). When a journal holds
more than two records per recipient (retries), the queue rewrites the
envelope, which empties the journal (L{Journals.too_long}), so a journal
stays O(n) and loading O(queue).

Not here: the envelope rewrite itself, the per-message locks and when a
write happens (the queue's), the file-system calls
(L{gsmail.outbound.queue.store}).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Awaitable, Callable, Container, Sequence
from typing import Final

from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail.outbound.queue.envelope import (
    STATES,
    Envelope,
    NoSuchMessageError,
    RecipientState,
    replay_journal,
)
from gsmail.outbound.queue.store import FileOps, append_journals

__all__ = ["Journals"]

#: Journal records per recipient beyond which the envelope is rewritten.
_COMPACT_PER_RECIPIENT: Final = 2
_COMPACT_SLACK: Final = 32
_json_string: Final = json.encoder.encode_basestring_ascii

#: Runs a blocking job in the journals' hand-off (counted as busy by the queue).
Run = Callable[[Callable[[], None]], Awaitable[None]]
Batch = dict[str, tuple[list[bytes], list[Deferred[None]]]]


class Journals:
    """
    What the queue knows of its journals (reactor thread only).

    @ivar directory: the C{journal/} directory.
    @ivar seq: per message, the last record number given out.
    @ivar lines: per message, the records in its journal file on disk
        (present: the file exists).
    @ivar fds: journals kept open (used only by one job at a time: L{lock}).
    @ivar waiting: records not written yet, with the Deferreds of their
        callers.
    @ivar broken: a write failed, the file may end in a torn line: the next
        record rewrites the envelope instead.
    @ivar lock: held by a journal write, an envelope rewrite or a removal
        (which empty or remove journals): never two at once.
    @ivar flushing: a group commit is running or about to (L{flush}).
    """

    def __init__(self, directory: str, ops: FileOps) -> None:
        self.directory = directory
        self._ops = ops
        self.seq: dict[str, int] = {}
        self.lines: dict[str, int] = {}
        self.fds: dict[str, int] = {}
        self.waiting: Batch = {}
        self.broken: set[str] = set()
        self._positions: dict[str, dict[int, int]] = {}
        self.lock = DeferredLock()
        self.flushing = False

    def on_disk(self, qid: str) -> str | None:
        """
        The path of the journal of C{qid} if it has one on disk, else C{None}.
        """
        return os.path.join(self.directory, qid) if qid in self.lines else None

    def records(self, envelope: Envelope, recipients: Sequence[RecipientState]) -> list[bytes]:
        """
        The journal lines for C{recipients}' current state, numbered on from
        the message's last record.

        @raise ValueError: a recipient that is not one of C{envelope}'s, or a
            state that cannot be stored.
        """
        qid = envelope.id
        positions = self._positions.get(qid)
        seq = self.seq.get(qid, 0)
        lines = []
        for r in recipients:
            index = positions.get(id(r)) if positions is not None else None
            if index is None or envelope.recipients[index] is not r:
                # The positions are by identity: duplicate addresses stay apart.
                positions = {id(x): n for n, x in enumerate(envelope.recipients)}
                self._positions[qid] = positions
                index = positions.get(id(r))
                if index is None:
                    raise ValueError(f"not a recipient of {qid}")
            if r.state not in STATES:
                raise ValueError(f"unknown recipient state {r.state!r}")
            if type(r.attempts) is not int or r.attempts < 0:
                raise ValueError(f"bad attempt count {r.attempts!r}")
            when = float(r.next_attempt)
            if not math.isfinite(when):
                raise ValueError(f"bad next attempt time {when!r}")
            seq += 1
            # As json.dumps would write it, without its cost: a finite
            # float's repr is JSON, the reply is escaped to ASCII.
            lines.append(
                f'[{seq},{index},"{r.state}",{r.attempts},{when!r},'
                f"{_json_string(r.last_reply)}]\n".encode("ascii")
            )
        self.seq[qid] = seq
        return lines

    def wait(self, qid: str, lines: list[bytes]) -> Deferred[None]:
        """
        Have C{lines} (L{records}) written with the next group commit.

        @return: fires when they are durable; fails as L{flush} says.
        """
        d: Deferred[None] = Deferred()
        waiting = self.waiting.get(qid)
        if waiting is None:
            self.waiting[qid] = (lines, [d])
        else:
            waiting[0].extend(lines)
            waiting[1].append(d)
        return d

    async def flush(self, run: Run, queued: Container[str], written: Callable[[str], None]) -> None:
        """
        Write the waiting records, all messages together, until none waits.
        One runs at a time (L{flushing}, reset when it ends).

        @param run: runs the append job in the journals' hand-off.
        @param queued: the ids of the messages queued now; records of others
            fail with L{NoSuchMessageError}.
        @param written: called with each id whose records were appended
            (journal lock held), to rewrite a long journal's envelope.
        """
        try:
            while self.waiting:
                async with self.lock:
                    batch, self.waiting = self.waiting, {}
                    fire = await self._write(batch, run, queued, written)
                fire()
        finally:
            self.flushing = False

    async def _write(
        self, batch: Batch, run: Run, queued: Container[str], written: Callable[[str], None]
    ) -> Callable[[], None]:
        """
        Append C{batch} to the journals and fsync them (journal lock held).

        @return: what answers the callers, to call once the lock is released.
        """
        gone = [qid for qid in batch if qid not in queued]
        qids = [qid for qid in batch if qid in queued]
        data = {qid: b"".join(batch[qid][0]) for qid in qids}
        existing = {qid for qid in qids if qid in self.lines}
        job = functools.partial(
            append_journals, self._ops, self.directory, self.fds, data, existing
        )

        error: Failure | None = None
        if qids:
            try:
                await run(job)
            except Exception:
                error = Failure()
                for qid in qids:
                    # It may end in a torn line now: the next record rewrites
                    # the envelope, which empties the journal first.
                    self.broken.add(qid)
                    self.lines.setdefault(qid, 0)
            else:
                for qid in qids:
                    self.lines[qid] = self.lines.get(qid, 0) + len(batch[qid][0])
                    written(qid)

        def fire() -> None:
            for qid in gone:
                for d in batch[qid][1]:
                    d.errback(NoSuchMessageError(qid))
            for qid in qids:
                for d in batch[qid][1]:
                    if error is None:
                        d.callback(None)
                    else:
                        d.errback(error)

        return fire

    def too_long(self, envelope: Envelope) -> bool:
        """
        Whether retries made the journal of C{envelope} long enough to
        rewrite the envelope (which empties it).
        """
        limit = _COMPACT_PER_RECIPIENT * len(envelope.recipients) + _COMPACT_SLACK
        return self.lines.get(envelope.id, 0) > limit

    def forget(self, qid: str) -> None:
        """Drop what is known of the journal of a removed message; its waiting records fail."""
        self.seq.pop(qid, None)
        self.lines.pop(qid, None)
        self._positions.pop(qid, None)
        self.broken.discard(qid)
        taken = self.waiting.pop(qid, None)
        if taken is not None:
            for d in taken[1]:
                d.errback(NoSuchMessageError(qid))

    def close(self) -> None:
        """Close the journals kept open."""
        fds, self.fds = self.fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def load(self, envelope: Envelope, seq: int, log: Logger) -> None:
        """
        Replay the journal of C{envelope} over it (records after C{seq}) and
        cut off a torn or damaged tail, so that appends start on a new line.
        Blocking: at load.
        """
        qid = envelope.id
        path = os.path.join(self.directory, qid)
        try:
            last, count, good, size = replay_journal(path, envelope, seq)
        except (OSError, ValueError) as exc:
            # The envelope's own state stands: recipients recorded only in
            # the journal are sent again (at least once, never lost).
            log.error(
                "Could not read the journal of {queue_id}: {error}", queue_id=qid, error=str(exc)
            )
            last, count, good, size = seq, 0, 0, 1
        self.seq[qid] = last
        self.lines[qid] = count
        if good < size:
            log.warn(
                "Cut {cut} bytes (an interrupted write) off the journal of {queue_id}",
                cut=size - good,
                queue_id=qid,
            )
            fd = self.fds[qid] = self._ops.append(path)
            self._ops.truncate(fd, good)
            self._ops.fsync(fd)
