# -*- test-case-name: tests.test_ledger -*-
"""
The post ledger: how gsmail makes sure a message is not added to a group twice.

A post is identified by a key, a digest of (group, Message-ID) or of
(group, digest of the message) when there is no Message-ID (L{PostLedger.key}).
L{PostLedger.run} takes a key and the action that posts, and:

  - performs the action only if no earlier call did it (or may have done it);
  - makes concurrent calls with one key share one action and its outcome: a
    keyed lock with an atomic claim, not check-then-mark;
  - remembers, for C{ttl} seconds, each key whose action succeeded, in memory
    and in an append-only file that is fsynced I{before} the caller hears of
    the success, so the caller's 250 is only said once a restart would
    remember the post too (see ARCHITECTURE.md, "No duplicate posts").

Unknown outcomes. When GroupServer received the whole request but no answer
came back (L{gsmail.status.GroupServerError} with C{outcome_unknown}), the
group may or may not have the post. Posting again risks a copy sent to every
member; not posting risks a lost message. gsmail does B{not} post again: the
first attempt fails with its own error (451 4.4.2, the sender keeps the
message and retries), the key is remembered as unknown, and every later
attempt gets L{Outcome.UNKNOWN} without the action running. The caller treats
that as delivered (2xx, the sender deletes its copy) and keeps its own copy of
the message for the operator, who can check the group and replay it.

File format, one record per line, ASCII, append-only::

    <unix time, seconds, float> <D|U> <key, 64 hex digits>\\n

C{D}: the action succeeded; C{U}: its outcome is unknown. The file is rewritten
(to a temporary file, fsynced, renamed over the old one, directory fsynced)
at L{PostLedger.open}, when it holds more than twice the live entries and
more than 1000 records, and after a failed write. Reading tolerates a torn
last line (a crash during an append) and garbage lines, which are skipped,
counted and logged once; no line longer than 256 bytes is held in memory.

Writes are group-committed: one write+fsync at a time, in the C{sync}
hand-off (a thread in the service); records that arrive meanwhile share the
next fsync. A second process opening the same ledger is refused (C{flock} on
C{<path>.lock}): two processes with one file would not see each other's posts.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import hashlib
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Final, Generic, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["Outcome", "PostLedger", "LedgerClosedError", "LedgerLockedError"]

_T = TypeVar("_T")

#: Compact only when the file holds more records than this...
_COMPACT_MIN_RECORDS: Final = 1000
#: ...and more than this many records per live entry.
_COMPACT_RATIO: Final = 2
#: A valid record is about 90 bytes; a longer line is garbage, skipped unread.
_MAX_LINE: Final = 256
#: Lines per write(2) call when rewriting the file.
_WRITE_BATCH: Final = 4096
#: Prefix of the hashed key material; changing it makes every remembered key unknown.
_KEY_DOMAIN: Final = b"gsmail.ledger.key.v1\x00"
_KEY_SIZE: Final = 32

Sync = Callable[[Callable[[], None]], Deferred[None]]


class Outcome(enum.Enum):
    """
    What L{PostLedger.run} did with the action.
    """

    #: This call (or a concurrent one it joined) performed the action
    #: successfully now, and the ledger has it on disk.
    DONE = "done"
    #: The key was done earlier (remembered in memory or on disk): the action
    #: was not performed again. The caller answers 2xx.
    DUPLICATE = "duplicate"
    #: An earlier attempt sent the post and got no answer: the action was not
    #: performed again. The caller answers 2xx and keeps a copy for the operator.
    UNKNOWN = "unknown"


class LedgerClosedError(RuntimeError):
    """
    L{PostLedger.run} was called before L{PostLedger.open} or after
    L{PostLedger.close} began. The caller answers 451 4.3.0 (transient).
    """


class LedgerLockedError(OSError):
    """
    Another process has this ledger open (C{flock} on C{<path>.lock} is held).
    """


_LETTER: Final = {Outcome.DUPLICATE: b"D", Outcome.UNKNOWN: b"U"}
_OUTCOME: Final = {b"D": Outcome.DUPLICATE, b"U": Outcome.UNKNOWN}


@attrs.frozen
class _Entry:
    """
    A remembered key: when it was recorded (clock seconds) and what a later
    call gets (L{Outcome.DUPLICATE} or L{Outcome.UNKNOWN}).
    """

    time: float
    outcome: Outcome


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


def _leave_shared_work(d: Deferred[Any]) -> None:
    """
    Canceller of a waiter: the waiter alone fails with C{CancelledError};
    the shared work goes on for everyone else.
    """


class _Observer(Generic[_T]):
    """
    One outcome, shared by any number of waiters, including late ones.
    """

    def __init__(self) -> None:
        self._waiters: list[Deferred[_T]] = []
        self._fired = False
        self._result: _T | Failure | None = None

    def when_fired(self) -> Deferred[_T]:
        """
        A new Deferred for the outcome; cancelling it leaves the others alone.
        """
        d: Deferred[_T] = Deferred(_leave_shared_work)
        if self._fired:
            self._deliver(d)
        else:
            self._waiters.append(d)
        return d

    def fire(self, result: _T | Failure) -> None:
        """
        Give C{result} (the same value or failure) to every waiter.
        """
        self._fired = True
        self._result = result
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            self._deliver(d)

    def _deliver(self, d: Deferred[_T]) -> None:
        if d.called:  # cancelled by its caller
            return
        if isinstance(self._result, Failure):
            d.errback(self._result)
        else:
            d.callback(self._result)  # type: ignore[arg-type]


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


class PostLedger:
    """
    A keyed Deferred lock plus a durable memory of the keys whose action
    succeeded (see the module docstring).

    @ivar path: the ledger file.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        *,
        ttl: float = 7 * 86400,
        clock: IReactorTime,
        sync: Sync | None = None,
    ) -> None:
        """
        @param path: the ledger file; its directory is created by L{open}.
        @param ttl: how long a key is remembered, in seconds (a sender retries
            for about 5 days, so the default is 7 days).
        @param clock: time source for record times and expiry.
        @param sync: runs a blocking callable (write and fsync) off the
            reactor and returns a Deferred that fires when it has returned,
            e.g. C{lambda f: deferToThreadPool(reactor, reactor.getThreadPool(), f)}.
            C{None} runs it inline, blocking (tests).
        @raise ValueError: if C{ttl} is not a positive number of seconds.
        """
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError("ttl must be a positive number of seconds")
        self.path = path
        self._ttl = ttl
        self._clock = clock
        self._sync: Sync = _run_inline if sync is None else sync
        self._state = _State.NEW
        # Oldest first, so expired entries are dropped from the front.
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._flights: dict[bytes, _Observer[Outcome]] = {}
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._records = 0  # lines in the current file
        self._pending: list[tuple[bytes, Deferred[None]]] = []
        self._writing = False
        self._compact_wanted = False
        # Records the file must exceed before the next compaction (raised
        # after a failed one, so a full disk is not rewritten on every post).
        self._compact_floor = _COMPACT_MIN_RECORDS
        # After a failed write the file may hold a torn record, or (fsync
        # failure on Linux) silently miss records: rewrite it from memory.
        self._needs_rewrite = False
        self._idle: list[Deferred[None]] = []
        self._closed: _Observer[None] = _Observer()

    def __repr__(self) -> str:
        return f"<PostLedger {self.path!r} {self._state.value}>"

    # -- public API ---------------------------------------------------------

    @staticmethod
    def key(*parts: str | bytes) -> bytes:
        """
        The ledger key of a post: the SHA-256 digest of the parts, each framed
        with its length, so C{("a", "bc")} and C{("ab", "c")} differ.

        @param parts: e.g. C{(group_id, message_id)}; a C{str} counts as its
            UTF-8 encoding (C{surrogateescape}, so text decoded that way from
            bytes gives the bytes' key).
        @return: 32 bytes, stable across releases and restarts.
        """
        h = hashlib.sha256(_KEY_DOMAIN)
        h.update(len(parts).to_bytes(8, "big"))
        for part in parts:
            data = part.encode("utf-8", "surrogateescape") if isinstance(part, str) else part
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
        return h.digest()

    def open(self) -> None:
        """
        Load the file, forget expired entries and rewrite the file with the
        live ones. Blocking: call it before the reactor runs (C{startService}).

        @raise LedgerLockedError: another process has the ledger open.
        @raise OSError: the directory or file cannot be created, read or
            written; gsmail must not start without its ledger.
        @raise RuntimeError: the ledger was already opened.
        """
        if self._state is not _State.NEW:
            raise RuntimeError("PostLedger.open() called twice")
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._lock_fd = _lock(self.path + ".lock")
        try:
            now = self._clock.seconds()
            loaded = _load(self.path, now, self._ttl)
            self._entries = loaded.entries
            self._fd, self._records = _replace_file(
                self.path, _format(list(self._entries.items()), now, self._ttl)
            )
        except BaseException:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise
        if loaded.garbage:
            self.log.warn(
                "Skipped {garbage} unreadable lines in the post ledger {path}",
                garbage=loaded.garbage,
                path=self.path,
            )
        if loaded.torn:
            self.log.info(
                "Ignored an incomplete last record in the post ledger {path}"
                " (left by a crash while it was written)",
                path=self.path,
            )
        self.log.info(
            "Post ledger {path} opened: {live} posts remembered, {expired} expired",
            path=self.path,
            live=len(self._entries),
            expired=loaded.expired,
        )
        self._state = _State.OPEN

    def close(self) -> Deferred[None]:
        """
        Refuse new calls, wait for the actions in flight and their records,
        make sure everything in memory is on disk, and close the file.

        @return: fires when closed; fails with C{OSError} if a needed rewrite
            failed (the file is closed anyway). Fires at once if never opened.
        """
        if self._state is _State.OPEN:
            self._state = _State.CLOSING
            Deferred.fromCoroutine(self._close())
        elif self._state is _State.NEW:
            self._state = _State.CLOSED
            self._closed.fire(None)
        return self._closed.when_fired()

    def run(self, key: bytes, action: Callable[[], Deferred[Any]]) -> Deferred[Outcome]:
        """
        Perform C{action} once for C{key}.

          1. C{key} remembered as done: L{Outcome.DUPLICATE}, action not called.
          2. C{key} remembered as unknown: L{Outcome.UNKNOWN}, action not called.
          3. a call for C{key} in flight: share its outcome (the same success
             or failure); cancelling the returned Deferred does not cancel the
             shared action.
          4. otherwise call C{action}; on success record C{key} durably, then
             fire L{Outcome.DONE}. If the record cannot be written the action
             still counts as done in memory (a retry in this process is
             deduplicated) and the call fails with the C{OSError} (451).
             If the action fails with C{outcome_unknown} (see
             L{gsmail.status.GroupServerError}), C{key} is recorded as unknown
             and the action's own failure propagates (also when that record
             cannot be written: the key stays unknown in memory). Any other failure
             propagates and nothing is recorded: a later call performs the
             action.

        @param key: from L{key} (32 bytes).
        @param action: performs the post; fires on success.
        @return: the L{Outcome}; or the action's failure; or C{OSError} if the
            record could not be made durable; or L{LedgerClosedError} if the
            ledger is not open.
        @raise ValueError: C{key} is not 32 bytes (not from L{key}).
        """
        if len(key) != _KEY_SIZE:
            raise ValueError("ledger keys are 32-byte digests from PostLedger.key()")
        if self._state is not _State.OPEN:
            return fail(LedgerClosedError(f"post ledger {self.path} is {self._state.value}"))
        flight = self._flights.get(key)
        if flight is None:
            known = self._lookup(key)
            if known is not None:
                return succeed(known)
            flight = self._flights[key] = _Observer()
            Deferred.fromCoroutine(self._perform(key, action, flight))
        return flight.when_fired()

    def state(self, key: bytes) -> Outcome | None:
        """
        What a call for C{key} would get without calling its action now:
        L{Outcome.DUPLICATE}, L{Outcome.UNKNOWN}, or C{None} when the key is
        not remembered (never seen, expired, or still in flight).
        """
        if key in self._flights:
            return None
        return self._lookup(key)

    def __len__(self) -> int:
        """
        The number of keys remembered and not expired.
        """
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

    def _lookup(self, key: bytes) -> Outcome | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._expired(entry, self._clock.seconds()):
            del self._entries[key]
            return None
        return entry.outcome

    def _remember(self, key: bytes, outcome: Outcome) -> bytes:
        """
        Remember C{key} now; return its record line.
        """
        now = self._clock.seconds()
        self._entries[key] = _Entry(now, outcome)
        self._entries.move_to_end(key)
        return _record(now, outcome, key)

    # -- one action ---------------------------------------------------------

    async def _perform(
        self, key: bytes, action: Callable[[], Deferred[Any]], flight: _Observer[Outcome]
    ) -> None:
        result: Outcome | Failure
        try:
            await maybeDeferred(action)
        except Exception as exc:
            result = _current_failure()
            if getattr(exc, "outcome_unknown", False) is True:
                self.log.warn(
                    "Post {ledger_key} may or may not have been added; it will not be posted again",
                    ledger_key=key.hex(),
                )
                try:
                    await self._write(self._remember(key, Outcome.UNKNOWN))
                except Exception:
                    # Already logged by _drain; the caller's error (4.4.2) says
                    # more than the disk's, and the key stays unknown in memory.
                    pass
        else:
            try:
                await self._write(self._remember(key, Outcome.DUPLICATE))
            except Exception:
                result = _current_failure()
            else:
                result = Outcome.DONE
        del self._flights[key]
        flight.fire(result)
        self._check_idle()

    # -- the file -----------------------------------------------------------

    def _write(self, line: bytes) -> Deferred[None]:
        """
        Queue a record; fires once it is fsynced (or fails with C{OSError}).
        """
        d: Deferred[None] = Deferred()
        self._pending.append((line, d))
        self._start_writing()
        return d

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
                        self._needs_rewrite = True  # our descriptor is on the old file
                        self._log_write_error(exc)
                    except Exception as exc:
                        # The old file is intact: keep appending to it.
                        self._compact_floor = self._records + _COMPACT_MIN_RECORDS
                        self._log_write_error(exc)
                    else:
                        self._compact_floor = _COMPACT_MIN_RECORDS
                    continue
                batch, self._pending = self._pending, []
                try:
                    if self._needs_rewrite:
                        # The entries of the batch are in memory, so in the new file.
                        await self._rewrite()
                        self._needs_rewrite = False
                    else:
                        await self._append(b"".join(line for line, _ in batch))
                        self._records += len(batch)
                except Exception as exc:
                    self._needs_rewrite = True
                    self._log_write_error(exc)
                    failure = _current_failure()
                    for _, d in batch:
                        d.errback(failure)
                else:
                    for _, d in batch:
                        d.callback(None)
                    self._compact_wanted = self._worth_compacting()
        finally:
            self._writing = False
            self._check_idle()

    def _worth_compacting(self) -> bool:
        """
        Whether the file holds more than twice the live entries, and enough
        records for the rewrite to pay.
        """
        return self._records > self._compact_floor and self._records > _COMPACT_RATIO * len(self)

    def _log_write_error(self, exc: Exception) -> None:
        self.log.error(
            "Could not write the post ledger {path}: {error}",
            path=self.path,
            error=str(exc),
        )

    async def _append(self, data: bytes) -> None:
        fd = self._fd
        assert fd is not None

        def job() -> None:
            _write_all(fd, data)
            os.fsync(fd)

        await self._sync(job)

    async def _rewrite(self) -> None:
        """
        Replace the file with the live entries, in the C{sync} hand-off, then
        switch appends to the new file.
        """
        self._expire()
        items = list(self._entries.items())  # immutable entries: safe in a thread
        now, ttl, path, old_fd = self._clock.seconds(), self._ttl, self.path, self._fd
        done: list[tuple[int, int]] = []

        def job() -> None:
            done.append(_replace_file(path, _format(items, now, ttl)))
            if old_fd is not None:
                try:
                    os.close(old_fd)
                except OSError:
                    pass  # it was only read by us; the new file is in place

        await self._sync(job)
        self._fd, self._records = done[0]

    # -- closing ------------------------------------------------------------

    def _check_idle(self) -> None:
        if not (self._flights or self._writing or self._pending):
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    async def _close(self) -> None:
        result: None | Failure = None
        try:
            while self._flights or self._writing or self._pending:
                d: Deferred[None] = Deferred()
                self._idle.append(d)
                await d
            if self._needs_rewrite:
                await self._rewrite()
                self._needs_rewrite = False
        except Exception as exc:
            self._log_write_error(exc)
            result = _current_failure()
        finally:
            for fd in (self._fd, self._lock_fd):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._fd = self._lock_fd = None
            self._state = _State.CLOSED
        self._closed.fire(result)


# -- file helpers (blocking: start-up or the sync hand-off) -----------------


def _record(time: float, outcome: Outcome, key: bytes) -> bytes:
    return b"%.6f %s %s\n" % (time, _LETTER[outcome], key.hex().encode("ascii"))


def _format(items: list[tuple[bytes, _Entry]], now: float, ttl: float) -> Iterator[bytes]:
    for key, entry in items:
        if now < entry.time + ttl:
            yield _record(entry.time, entry.outcome, key)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _replace_file(path: str, lines: Iterator[bytes]) -> tuple[int, int]:
    """
    Atomically replace C{path} with C{lines}: temporary file, fsync, rename,
    directory fsync.

    @return: a descriptor open for appending to the new file, and the number
        of lines written.
    @raise _ReplacedError: the file was replaced, but the directory fsync
        failed: descriptors open on the old file now write to a deleted file.
    @raise OSError: the file was not replaced.
    """
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        count = 0
        batch: list[bytes] = []
        for line in lines:
            batch.append(line)
            if len(batch) == _WRITE_BATCH:
                _write_all(fd, b"".join(batch))
                count += len(batch)
                batch.clear()
        _write_all(fd, b"".join(batch))
        count += len(batch)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        raise
    try:
        _fsync_directory(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        os.close(fd)
        raise _ReplacedError(exc.errno, f"directory fsync failed: {exc.strerror}", path) from exc
    return fd, count


class _ReplacedError(OSError):
    """
    The ledger file was replaced but the directory fsync failed.
    """


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(path: str) -> int:
    """
    Take the ledger's process lock; the descriptor holds it until closed.

    @raise LedgerLockedError: another process (or another open ledger in this
        one) holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LedgerLockedError(
            errno.EWOULDBLOCK, "post ledger in use by another process", path
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


@attrs.define
class _Loaded:
    entries: OrderedDict[bytes, _Entry]
    garbage: int = 0
    torn: bool = False
    expired: int = 0


def _parse(line: bytes) -> tuple[bytes, _Entry] | None:
    """
    One record without its LF, or C{None} if it is not a valid record.
    """
    fields = line.rstrip(b"\r").split(b" ")
    if len(fields) != 3 or fields[1] not in _OUTCOME or len(fields[2]) != 2 * _KEY_SIZE:
        return None
    try:
        time = float(fields[0])
        key = bytes.fromhex(fields[2].decode("ascii"))
    except ValueError:  # UnicodeDecodeError is a ValueError
        return None
    if not (math.isfinite(time) and time >= 0) or len(key) != _KEY_SIZE:
        return None
    return key, _Entry(time, _OUTCOME[fields[1]])


def _load(path: str, now: float, ttl: float) -> _Loaded:
    """
    Read the ledger file: the last record of a key wins; live entries come
    back oldest first.
    """
    found: dict[bytes, _Entry] = {}
    loaded = _Loaded(OrderedDict())
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return loaded
    with f:
        while line := f.readline(_MAX_LINE):
            if not line.endswith(b"\n"):
                if len(line) == _MAX_LINE:  # over-long: skip the rest unread
                    loaded.garbage += 1
                    while (rest := f.readline(_MAX_LINE)) and not rest.endswith(b"\n"):
                        pass
                    continue
                # The last line has no LF: complete if it parses, else torn.
                parsed = _parse(line)
                if parsed is None:
                    loaded.torn = True
                    break
            else:
                parsed = _parse(line[:-1])
                if parsed is None:
                    loaded.garbage += 1
                    continue
            key, entry = parsed
            found.pop(key, None)
            found[key] = entry
    for key, entry in sorted(found.items(), key=lambda item: item[1].time):
        if now < entry.time + ttl:
            loaded.entries[key] = entry
        else:
            loaded.expired += 1
    return loaded
