# -*- test-case-name: tests.test_ledger,tests.test_ledger_processes -*-
"""
The post ledger's record store: what one ledger object remembers of the keys
posted (in memory, parsed or as the file's raw bytes), how it follows the
file other processes append to, and when it writes (group commit) and
compacts it. The file's format and the blocking reads and writes are in
L{gsmail.ledger.file}; claims on keys in L{gsmail.ledger.claims}; the
guarantee they make together in L{gsmail.ledger}.

  2. Catching up. Before C{run} decides on a key it does not remember as
     done, once it holds the key's claim (rule 3), and in C{state}, the
     process C{stat}s the path: new bytes past what it has read are read and
     parsed, in the reactor thread (a post's worth of records is 85 bytes, so this
     costs one C{stat} and one small C{pread}: 4 to 7 microseconds per call
     measured); another inode means the file was compacted and is read again
     from the start, also in the reactor thread: rare (see 4), but with
     C{preload} as long as opening (below).

(Rules 1 and 4, appending and compacting, are in L{gsmail.ledger.file}; rule
3, claiming a key, in L{gsmail.ledger.claims}.)

Opening. Measured on a file of 100,000 live records (8.5 MB, page cache warm,
one core of a 2.8 GHz Xeon VM): with C{preload=True} (the daemon)
L{gsmail.ledger.PostLedger.open} parses every record into a dict, 0.25 to
0.45 s once at start-up, and each look-up is then a dict look-up. With
C{preload=False} (a process that posts one message) it only reads the file,
and a look-up searches its bytes for the key (about 1 to 3 ms): C{open()}, one
C{run()} and C{close()} take 26 to 36 ms in all (fsync is nearly free on that
VM: on a disk add one fsync per record written).
L{gsmail.ledger.PostLedger.__len__} then parses the file the first time.

Writes are group-committed: one write+fsync at a time per process, in the
C{sync} hand-off (a thread in the service); records that arrive meanwhile
share the next fsync. With a C{commit_delay}, a batch also waits up to that
long for the records of the posts under way in this process (PostgreSQL's
C{commit_delay} with C{commit_siblings}): an fsync and its hand-off cost more
CPU than the rest of a post's ledger work (bench/costs.py), and posts that
finish within a few milliseconds of each other then share one. A batch with
no other post under way is written at once, so a lone message waits for
nothing.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Final

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail.ledger.file import (
    Outcome,
    _Appender,
    _combine,
    _Compacted,
    _Cursor,
    _Entry,
    _find,
    _first_live,
    _parse_lines,
    _read_lines,
    _record,
    _ReplacedError,
    _why,
)

#: Compact only when the file holds more records than this...
_COMPACT_MIN_RECORDS: Final = 1000
#: ...and more than this many records per live entry.
_COMPACT_RATIO: Final = 2
Sync = Callable[[Callable[[], None]], Deferred[None]]


@attrs.define
class _Loaded:
    """
    What a reload found wrong: garbage lines, and an incomplete last line.
    """

    garbage: int = 0
    torn: bool = False
    #: The keys of the file's records (with C{preload} only).
    keys: set[bytes] | None = None


def _current_failure() -> Failure:
    """
    The exception being handled, as a L{Failure} (Twisted's constructor is untyped).
    """
    return Failure()  # type: ignore[no-untyped-call]


def _run_inline(f: Callable[[], None]) -> Deferred[None]:
    """
    The default C{sync}: run the blocking callable now (tests, start-up).
    """
    return maybeDeferred(f)


class _Gathering:
    """A batch waiting for C{records} records in all, or for its timer (L{_RecordStore._gather})."""

    def __init__(self, records: int, done: Deferred[None]) -> None:
        self.records = records
        self.timer: IDelayedCall | None = None
        self._done: Deferred[None] | None = done

    def end(self) -> None:
        """Stop waiting (once; the timer, if still pending, is cancelled)."""
        done, self._done = self._done, None
        if done is None:
            return
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        done.callback(None)


class _RecordStore:
    """
    What one ledger object knows of the ledger file, and its writes to it
    (see the module docstring). Used in the reactor thread; its blocking file
    jobs run in the C{sync} hand-off.

    @ivar path: the ledger file.
    @ivar observe_append: called with (seconds, records) after each append
        that worked (L{gsmail.metrics}); the seconds include the hand-off to
        C{sync}.
    """

    def __init__(
        self,
        path: str,
        *,
        ttl: float,
        clock: IReactorTime,
        sync: Sync,
        preload: bool,
        log: Logger,
        busy: Callable[[], Collection[bytes]],
        on_rewritten: Callable[[], None],
        on_idle: Callable[[], None],
        commit_delay: float = 0.0,
    ) -> None:
        """
        @param path, ttl, clock, sync, preload, commit_delay: as for
            L{gsmail.ledger.PostLedger}.
        @param log: the ledger's logger.
        @param busy: the keys whose posts are under way or whose records
            are not durable yet (a replaced file without them lost nothing).
        @param on_rewritten: called when a rewrite made every record in
            memory durable.
        @param on_idle: called when a write job ends.
        """
        self.path = path
        self._ttl = ttl
        self._clock = clock
        self._sync = sync
        self._preload = preload
        self.log = log
        self._busy = busy
        self._on_rewritten = on_rewritten
        self._on_idle = on_idle
        # Oldest first, so expired entries are dropped from the front.
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        # Without preload: the complete lines of the file as read at the last
        # (re)load, searched by key; keys found absent from it; how many of
        # its records were estimated live then.
        self._raw = b""
        self._raw_absent: set[bytes] = set()
        self._raw_live = 0
        self._cursor: _Cursor | None = None  # what this process has read
        self._records = 0  # lines in the current file, as far as read
        self._appender: _Appender | None = None  # used only in sync jobs
        self._pending: list[tuple[bytes, Deferred[None]]] = []
        self._writing = False
        self._compact_wanted = False
        # Records the file must exceed before the next compaction (raised
        # after a failed one, so a full disk is not rewritten on every post).
        self._compact_floor = _COMPACT_MIN_RECORDS
        # After a failed write the file may hold a torn record, or (fsync
        # failure on Linux) silently miss records: rewrite it from memory.
        self._needs_rewrite = False
        # The last write failed (logged once): calls try the file before posting.
        self._write_failed = False
        # The file was found removed (warned once until it is there again).
        self._missing = False
        self._wrote = False  # this process wrote the file
        self.observe_append: Callable[[float, int], None] | None = None
        self._commit_delay = commit_delay
        # A batch waiting for the records of posts under way (_gather).
        self._gathering: _Gathering | None = None

    # -- opening and closing --------------------------------------------------

    def open(self) -> _Loaded:
        """
        Open the lock file, read the file (parse it with C{preload}) and, if
        it holds mostly expired records and no other process is writing it
        right now, compact it. Blocking.

        @return: what the reading found wrong.
        @raise OSError: the lock file cannot be created, or the file cannot
            be read.
        """
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        lock_fd = os.open(self.path + ".lock", flags, 0o600)
        self._appender = _Appender(self.path, lock_fd)
        try:
            loaded = self._reload()
            if self._worth_compacting():
                self._compact_at_open()
        except BaseException:
            self.close()
            raise
        return loaded

    @property
    def records(self) -> int:
        """Lines in the current file, as far as read."""
        return self._records

    @property
    def live(self) -> int:
        """Keys remembered: parsed, plus those estimated live in the raw lines."""
        return len(self._entries) + self._raw_live

    @property
    def estimated(self) -> bool:
        """Without C{preload}, the live keys of the file are estimated."""
        return bool(self._raw)

    @property
    def write_failed(self) -> bool:
        """The last write failed."""
        return self._write_failed

    @property
    def busy(self) -> bool:
        """Records are queued or being written."""
        return self._writing or bool(self._pending)

    async def flush(self) -> None:
        """
        After the last write: rewrite the file if a failed write left it
        needing one.

        @raise OSError: the rewrite failed.
        """
        if self._needs_rewrite:
            await self._rewrite()
            self._needs_rewrite = False

    def close(self) -> None:
        """Close the files."""
        self._set_cursor(None)
        if self._appender is not None:
            self._appender.close()
            self._appender = None

    def __len__(self) -> int:
        """
        The number of keys remembered and not expired, as far as this
        process has read the file. Without C{preload}, the first call parses
        the file.
        """
        self._index_raw()
        self._expire()
        return len(self._entries)

    # -- memory -------------------------------------------------------------

    def _expired(self, entry: _Entry, now: float) -> bool:
        return now >= entry.time + self._ttl

    def _expire(self) -> None:
        """
        Forget expired entries from the oldest; amortised O(1) per entry.
        """
        now = self._clock.seconds()
        entries = self._entries
        while entries:
            first = next(iter(entries.values()))
            if not self._expired(first, now):
                break
            entries.popitem(last=False)

    def lookup(self, key: bytes) -> Outcome | None:
        now = self._clock.seconds()
        entry = self._entries.get(key)
        if entry is not None and self._expired(entry, now):
            del self._entries[key]
            entry = None
        if entry is None and self._raw and key not in self._raw_absent:
            # The raw lines are older than the entries in memory: search them
            # only for a key memory lacks.
            found = _find(self._raw, key)
            if found is None or self._expired(found, now):
                self._raw_absent.add(key)
                return None
            self._merge(key, found)
            entry = found
        if entry is None or entry.outcome is not Outcome.DUPLICATE:
            return None  # U, from an earlier version: perform the action
        return entry.outcome

    def _merge(self, key: bytes, entry: _Entry) -> None:
        """
        Remember a record read from the file, unless memory has a newer one.
        """
        old = self._entries.get(key)
        if old is None or entry.time > old.time:
            self._entries[key] = entry
            self._entries.move_to_end(key)

    def remember(self, key: bytes, outcome: Outcome) -> bytes:
        """
        Remember C{key} now; return its record line.
        """
        now = self._clock.seconds()
        self._entries[key] = _Entry(now, outcome)
        self._entries.move_to_end(key)
        return _record(now, outcome, key)

    def _index_raw(self) -> None:
        """
        Parse the raw lines into the entries (without C{preload}).
        """
        if self._raw:
            records, garbage = _parse_lines(self._raw)
            if garbage:
                self.log_garbage(garbage)
            self._entries = _combine(records, self._entries.items())
            self._expire()
            self._raw, self._raw_live = b"", 0
            self._raw_absent.clear()

    # -- reading what other processes wrote ----------------------------------

    def catch_up(self) -> None:
        """
        Read the records appended since this process last looked, or the whole
        file if it was replaced (compacted) meanwhile.

        @raise OSError: the file could not be read.
        """
        cursor = self._cursor
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if (cursor is not None or self._wrote) and not self._missing:
                # Removed by hand: keep what we know, and write it back.
                self._missing = True
                self._restore(f"was removed; {len(self)} posts remembered here are written back")
            return
        self._missing = False
        if cursor is None or cursor.ident != (st.st_dev, st.st_ino) or st.st_size < cursor.offset:
            truncated = cursor is not None and cursor.ident == (st.st_dev, st.st_ino)
            old_size = cursor.offset if cursor is not None else 0
            before = self._live_keys() if cursor is not None and self._preload else None
            loaded = self._reload()
            if loaded.garbage:
                self.log_garbage(loaded.garbage)
            if truncated:
                self._restore(
                    f"shrank from {old_size} to {st.st_size} bytes; the posts remembered"
                    " here are written back"
                )
            elif before is not None and loaded.keys is not None:
                lost = before - loaded.keys - set(self._busy())
                if lost:
                    self._restore(
                        f"was replaced by a file without {len(lost)} posts remembered here;"
                        " they are written back"
                    )
        elif st.st_size > cursor.offset:
            read = _read_lines(cursor.fd, cursor.offset, cursor.skipping)
            cursor.offset, cursor.skipping = read.offset, read.skipping
            self._records += read.lines
            records, garbage = _parse_lines(read.data)
            if read.tail is not None:
                records.append(read.tail)
            for key, entry in records:
                self._merge(key, entry)
            if garbage + read.overlong:
                self.log_garbage(garbage + read.overlong)

    def _reload(self) -> _Loaded:
        """
        Read the file from the start and follow it from now on.

        @raise OSError: it could not be read.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return _Loaded()
        try:
            st = os.fstat(fd)
            read = _read_lines(fd, 0, False)
        except BaseException:
            os.close(fd)
            raise
        self._set_cursor(_Cursor(fd, (st.st_dev, st.st_ino), read.offset, read.skipping))
        self._records = read.lines
        now = self._clock.seconds()
        extra = [read.tail] if read.tail is not None else []
        loaded = _Loaded(garbage=read.overlong, torn=read.torn)
        if self._preload:
            records, garbage = _parse_lines(read.data)
            loaded.garbage += garbage
            loaded.keys = {key for key, _ in records} | {key for key, _ in extra}
            self._entries = _combine(records + extra, self._entries.items())
            self._expire()
        else:
            self._raw = read.data
            self._raw_absent.clear()
            first_live = _first_live(read.data, now - self._ttl)
            self._raw_live = read.data.count(b"\n", first_live)
            for key, entry in extra:
                self._merge(key, entry)
        return loaded

    def _live_keys(self) -> set[bytes]:
        """
        The keys recorded as done that any compaction must keep: recorded in
        the last day (another process may have a shorter C{ttl}), and not
        about to expire (a minute's margin for another process's clock).
        """
        now = self._clock.seconds()
        cutoff = max(now - self._ttl + 60, now - 86400)
        return {
            k
            for k, e in self._entries.items()
            if e.time > cutoff and e.outcome is Outcome.DUPLICATE
        }

    def _restore(self, what: str) -> None:
        """
        The file lost records this process remembers (removed, truncated or
        replaced by hand): say so once, and rewrite it from memory.
        """
        self.log.warn("The post ledger {path} {what}", path=self.path, what=what)
        self._compact_wanted = True
        self._start_writing()

    def _set_cursor(self, cursor: _Cursor | None) -> None:
        if self._cursor is not None:
            os.close(self._cursor.fd)
        self._cursor = cursor

    def log_garbage(self, count: int) -> None:
        self.log.warn(
            "Skipped {garbage} unreadable lines in the post ledger {path}",
            garbage=count,
            path=self.path,
        )

    # -- the file -----------------------------------------------------------

    def write(self, line: bytes) -> Deferred[None]:
        """
        Queue a record; fires once it is fsynced (or fails with C{OSError}).
        """
        d: Deferred[None] = Deferred()
        self._pending.append((line, d))
        gathering = self._gathering
        if gathering is not None and len(self._pending) >= gathering.records:
            gathering.end()
        self._start_writing()
        return d

    async def _gather(self) -> None:
        """
        Wait up to C{commit_delay} seconds until the posts under way in this
        process (their keys are busy, their records not queued yet) have
        queued their records too; at once when there are none.
        """
        under_way = len(self._busy()) - len(self._pending)
        if under_way <= 0:
            return
        done: Deferred[None] = Deferred()
        gathering = _Gathering(len(self._pending) + under_way, done)
        gathering.timer = self._clock.callLater(self._commit_delay, gathering.end)
        self._gathering = gathering
        try:
            await done
        finally:
            self._gathering = None

    def _start_writing(self) -> None:
        if not self._writing and (self._pending or self._compact_wanted):
            self._writing = True
            Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        """
        Write queued records, one job in the C{sync} hand-off at a time; the
        records queued during a job share the next one (group commit).
        """
        try:
            while self._pending or self._compact_wanted:
                if self._compact_wanted and not self._needs_rewrite:
                    # Alone, so a failed compaction fails no caller; records
                    # queued meanwhile are appended to the new file after it.
                    self._compact_wanted = False
                    try:
                        await self._rewrite()
                    except _ReplacedError as exc:
                        self._needs_rewrite = True  # the rename may not be durable
                        self.log_write_error(exc)
                    except Exception as exc:
                        # The old file is intact: keep appending to it.
                        self._compact_floor = self._records + _COMPACT_MIN_RECORDS
                        self.log_write_error(exc)
                    else:
                        self._compact_floor = _COMPACT_MIN_RECORDS
                    continue
                if self._commit_delay > 0 and not self._needs_rewrite:
                    await self._gather()
                batch, self._pending = self._pending, []
                try:
                    if self._needs_rewrite:
                        # The entries of the batch are in memory, so in the new file.
                        await self._rewrite()
                        self._needs_rewrite = False
                        self._on_rewritten()
                    else:
                        started = self._clock.seconds()
                        await self._append(b"".join(line for line, _ in batch))
                        if self.observe_append is not None:
                            self.observe_append(self._clock.seconds() - started, len(batch))
                except Exception as exc:
                    self._needs_rewrite = True
                    if not self._write_failed:
                        # Once per outage, not per message: every call says
                        # 451 until a write works again.
                        self._write_failed = True
                        self.log.error(
                            "Could not write the post ledger {path}: {error}; no message is"
                            " posted (451 4.3.0) until it can be written again",
                            path=self.path,
                            error=_why(exc),
                        )
                    failure = _current_failure()
                    for _, d in batch:
                        d.errback(failure)
                else:
                    self._wrote = True
                    if self._write_failed:
                        self._write_failed = False
                        self.log.warn(
                            "The post ledger {path} can be written again; posting resumes",
                            path=self.path,
                        )
                    for _, d in batch:
                        d.callback(None)
                    self._compact_wanted = self._worth_compacting()
        finally:
            self._writing = False
            self._on_idle()

    def _worth_compacting(self) -> bool:
        """
        Whether the file holds more than twice the live entries, and enough
        records for the rewrite to pay. Without C{preload} the live records
        of the raw lines are estimated (see L{_first_live}).
        """
        if self._records <= self._compact_floor:
            return False
        self._expire()
        return self._records > _COMPACT_RATIO * (len(self._entries) + self._raw_live)

    def log_write_error(self, exc: Exception) -> None:
        self.log.error(
            "Could not write the post ledger {path}: {error}",
            path=self.path,
            error=str(exc),
        )

    async def _append(self, data: bytes) -> None:
        appender = self._appender
        assert appender is not None
        await self._sync(lambda: appender.append(data))

    async def _rewrite(self) -> None:
        """
        Replace the file with the live entries of the current file and of
        memory, in the C{sync} hand-off, then follow the new file.
        """
        appender = self._appender
        assert appender is not None
        snapshot = list(self._entries.items())  # immutable entries: safe in a thread
        now, ttl = self._clock.seconds(), self._ttl
        done: list[_Compacted | None] = []

        def job() -> None:
            done.append(appender.compact(snapshot, now, ttl, wait=True))

        await self._sync(job)
        compacted = done[0]
        assert compacted is not None  # it waited for the lock
        self._adopt(compacted)

    def _compact_at_open(self) -> None:
        """
        Compact now if no other process holds the lock; a failure is logged
        and leaves the file as it was.
        """
        appender = self._appender
        assert appender is not None
        try:
            compacted = appender.compact(
                list(self._entries.items()), self._clock.seconds(), self._ttl, wait=False
            )
        except _ReplacedError as exc:
            self._needs_rewrite = True
            self.log_write_error(exc)
        except OSError as exc:
            self._compact_floor = self._records + _COMPACT_MIN_RECORDS
            self.log_write_error(exc)
        else:
            if compacted is not None:
                self._adopt(compacted)

    def _adopt(self, compacted: _Compacted) -> None:
        """
        Take in the entries of a compaction this process made and follow the
        new file, unless it already does (then its raw lines may hold newer
        records: keep them).
        """
        self._entries = _combine(compacted.entries, self._entries.items())
        self._expire()
        cursor = self._cursor
        if cursor is not None and cursor.ident == compacted.ident:
            os.close(compacted.read_fd)
            return
        self._set_cursor(_Cursor(compacted.read_fd, compacted.ident, compacted.size))
        self._records = len(compacted.entries)
        self._raw, self._raw_live = b"", 0
        self._raw_absent.clear()
