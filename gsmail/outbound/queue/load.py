# -*- test-case-name: tests.outbound.test_queue,tests.test_control -*-
"""
Reading a queue directory back: at start-up, when the queue is loaded
(L{QueueRecovery}: every envelope read and its journal replayed, corrupt
envelopes moved to C{corrupt/}, crash leftovers removed, an unsigned message
whose signed copy is queued dropped), and by tools that only list the
queue while gsmail runs (L{read_queue}: nothing locked or changed).

Not here: the formats (L{gsmail.outbound.queue.envelope}), the lock and the
directories' creation (L{gsmail.outbound.queue.OutboundQueue.load}).
"""

from __future__ import annotations

import os
from typing import Final

from twisted.logger import Logger

from gsmail.outbound.queue.envelope import QUEUE_ID, Envelope, read_envelope, replay_journal
from gsmail.outbound.queue.journal import Journals
from gsmail.outbound.queue.store import FileOps, QueueDirs, free_name, unlink_missing_ok

__all__ = ["GRACE", "QueueRecovery", "read_queue"]

#: Leftovers younger than this (seconds) are kept by the load: they may
#: belong to a writer that is still at work.
GRACE: Final = 60.0


class QueueRecovery:
    """
    The load of a queue directory (blocking, at start-up, queue locked).
    """

    def __init__(self, dirs: QueueDirs, ops: FileOps, journals: Journals, log: Logger) -> None:
        """
        @param dirs: the queue's directories, created.
        @param ops: the file-system calls that change the queue.
        @param journals: filled in with each journal's records and length.
        @param log: the queue's logger (its lines keep their namespace).
        """
        self._dirs = dirs
        self._ops = ops
        self._journals = journals
        self.log = log

    def scan(self, now: float) -> list[Envelope]:
        """
        Read every envelope and replay its journal, move the corrupt ones to
        C{corrupt/}, remove crash leftovers older than L{GRACE} (in C{tmp/},
        and data or journals without an envelope) and log the counts.

        @param now: seconds since the epoch, to judge leftovers' ages by.
        @return: the queued envelopes, oldest first.
        @raise OSError: a directory cannot be read, or a change not made.
        """
        data_names = set(os.listdir(self._dirs.data))
        journals = set(os.listdir(self._dirs.journal))
        found: list[Envelope] = []
        corrupt = cleaned = young = 0
        for name in sorted(os.listdir(self._dirs.env)):
            qid = name[: -len(".json")] if name.endswith(".json") else ""
            path = os.path.join(self._dirs.env, name)
            reason = ""
            envelope: Envelope | None = None
            if not QUEUE_ID.match(qid):
                reason = "not a queue envelope"
            elif qid not in data_names:
                reason = "its data file is missing"
            else:
                try:
                    envelope, seq = read_envelope(path, qid)
                    size = os.stat(os.path.join(self._dirs.data, qid)).st_size
                except (OSError, ValueError) as exc:
                    reason = f"unreadable: {exc}"
                else:
                    if size != envelope.size:
                        reason = f"its data has {size} bytes, not {envelope.size}"
            if reason:
                corrupt += 1
                self._quarantine(
                    name,
                    qid if qid in data_names else None,
                    reason,
                    qid if qid in journals else None,
                )
                data_names.discard(qid)
                journals.discard(qid)
                continue
            assert envelope is not None
            self._journals.seq[qid] = seq
            if qid in journals:
                journals.discard(qid)
                self._journals.load(envelope, seq, self.log)
            found.append(envelope)
            data_names.discard(qid)
        for directory, names in (
            (self._dirs.data, data_names),
            (self._dirs.tmp, set(os.listdir(self._dirs.tmp))),
        ):
            for name in names:
                path = os.path.join(directory, name)
                try:
                    if now - os.lstat(path).st_mtime < GRACE:
                        young += 1
                        continue
                    self._ops.unlink(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:  # a directory, say: not ours to remove
                    self.log.warn(
                        "Could not remove {path} from the outbound queue: {error}",
                        path=path,
                        error=str(exc),
                    )
                    continue
                cleaned += 1
        for name in journals:
            # Its envelope is gone (a removal that crashed half-way): so is the message.
            try:
                self._ops.unlink(os.path.join(self._dirs.journal, name))
            except FileNotFoundError:
                continue
            except OSError as exc:
                self.log.warn(
                    "Could not remove {path} from the outbound queue: {error}",
                    path=os.path.join(self._dirs.journal, name),
                    error=str(exc),
                )
                continue
            cleaned += 1
        if corrupt or cleaned:
            for directory in (
                self._dirs.corrupt,
                self._dirs.env,
                self._dirs.data,
                self._dirs.tmp,
                self._dirs.journal,
            ):
                self._ops.fsync_dir(directory)
        found = self._drop_replaced(found)
        found.sort(key=lambda e: (e.created, e.id))
        self.log.info(
            "Outbound queue {directory} loaded: {messages} messages ({held} held),"
            " {pending} recipients pending, {corrupt} corrupt, {cleaned} leftovers removed,"
            " {young} recent leftovers kept",
            directory=self._dirs.root,
            messages=len(found),
            held=sum(1 for e in found if e.held),
            pending=sum(len(e.pending()) for e in found),
            corrupt=corrupt,
            cleaned=cleaned,
            young=young,
        )
        return found

    def _drop_replaced(self, found: list[Envelope]) -> list[Envelope]:
        """
        Remove the unsigned messages whose signed copy is queued too (a
        crash in L{gsmail.outbound.queue.OutboundQueue.resign} after the
        copy was durable): load time, blocking.
        """
        ids = {e.id for e in found}
        gone = {e.replaces for e in found if e.replaces in ids}
        for qid in sorted(gone):
            for path in (
                os.path.join(self._dirs.env, qid + ".json"),
                os.path.join(self._dirs.journal, qid),
                os.path.join(self._dirs.data, qid),
            ):
                unlink_missing_ok(self._ops, path)
            self._journals.seq.pop(qid, None)
            self._journals.lines.pop(qid, None)
            fd = self._journals.fds.pop(qid, None)
            if fd is not None:
                os.close(fd)
            self.log.info("Removed {queue_id}: its signed copy is queued", queue_id=qid)
        if gone:
            for directory in (self._dirs.env, self._dirs.data):
                self._ops.fsync_dir(directory)
        return [e for e in found if e.id not in gone]

    def _quarantine(
        self, name: str, qid: str | None, reason: str, journal: str | None = None
    ) -> None:
        """
        Move a corrupt envelope (and its data and journal, if any) to C{corrupt/}.
        """
        target = free_name(os.path.join(self._dirs.corrupt, name))
        self._ops.rename(os.path.join(self._dirs.env, name), target)
        if qid is not None:
            self._ops.rename(os.path.join(self._dirs.data, qid), target + ".data")
        if journal is not None:
            self._ops.rename(os.path.join(self._dirs.journal, journal), target + ".journal")
        self.log.error(
            "Moved the corrupt envelope {name} to {target}: {reason}",
            name=name,
            target=target,
            reason=reason,
        )


def read_queue(directory: str) -> list[Envelope]:
    """
    The envelopes of a queue directory, oldest first, read without locking
    or changing anything (for a C{mailq}-like listing while gsmail runs).
    Unreadable envelopes are left out.

    @raise OSError: the directory cannot be listed.
    """
    env_dir = os.path.join(directory, "env")
    found = []
    for name in os.listdir(env_dir):
        qid = name[: -len(".json")]
        if name.endswith(".json") and QUEUE_ID.match(qid):
            try:
                envelope, seq = read_envelope(os.path.join(env_dir, name), qid)
            except (OSError, ValueError):
                continue
            try:
                replay_journal(os.path.join(directory, "journal", qid), envelope, seq)
            except (OSError, ValueError):
                pass  # no journal (or unreadable): the envelope as written
            found.append(envelope)
    return sorted(found, key=lambda e: (e.created, e.id))


# -- helpers (blocking ones run in the sync hand-off or at load) --------------
