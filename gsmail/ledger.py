# -*- test-case-name: tests.test_ledger,tests.test_ledger_processes -*-
"""
The post ledger: how gsmail makes sure a message is not added to a group twice,
whether its copies come in by one process or by several sharing the ledger
(the daemon and the per-message C{smtp2gs} processes Postfix runs).

A post is identified by a key, a digest of (group, Message-ID) or of
(group, digest of the message) when there is no Message-ID (L{PostLedger.key}).
L{PostLedger.run} takes a key and the action that posts, and:

  - performs the action only if no earlier call, in this process or in
    another one using the same file, did it (or may have done it);
  - makes concurrent calls with one key share one action and its outcome: a
    keyed lock with an atomic claim, not check-then-mark; across processes
    the claim is a lock on one byte of a shared file (below);
  - remembers, for C{ttl} seconds, each key whose action succeeded, in memory
    and in an append-only file that is fsynced I{before} the caller hears of
    the success, so the caller's 250 is only said once a restart, or another
    process, would see the post too (see ARCHITECTURE.md, "No duplicate
    posts").

Unknown outcomes. When GroupServer received the whole request but no answer
came back (L{gsmail.status.GroupServerError} with C{outcome_unknown}), the
group may or may not have the post. Nothing is recorded: the failure goes to
the caller (451, the sender keeps the message and retries) and the retry
performs the action again. That is safe for adds because GroupServer
archives a post id once (groupserver-protocol.md, "GroupServer's own
idempotency"); L{gsmail.posting} says what the other pages do. The ledger's
part is to keep one message from being in flight twice at once, and to
answer copies of a message known to be added without another request.

File format, one record per line, ASCII, append-only::

    <unix time, seconds, float> <D|U> <key, 64 hex digits>\\n

C{D}: the action succeeded. C{U} ("outcome unknown") was written by earlier
versions, which did not repeat such a post; it is read and kept until it
expires, but counts as no record. Within the file the
last record of a key wins. Reading tolerates an incomplete last line (a crash
during an append, or an append under way in another process: it is read once
its LF is there) and garbage lines, which are skipped, counted and logged; no
line longer than 256 bytes is kept.

Several processes, one file. No process holds a lock for long; each keeps its
own memory of the file and these rules keep the memories right:

  1. Appending. Records are written with C{O_APPEND} while holding
     C{flock(LOCK_EX)} on C{<path>.lock}, in the C{sync} hand-off: check that
     the path still names the file the descriptor writes to (else another
     process compacted it: reopen), start with an LF if the file ends in a
     torn line (a writer crashed: the fragment becomes one garbage line rather
     than eating this record), write, fsync, unlock.
  2. Catching up. Before C{run} decides (and in C{state}), the process
     C{stat}s the path: new bytes past what it has read are read and parsed,
     in the reactor thread (a post's worth of records is 85 bytes, so this
     costs one C{stat} and one small C{pread}: 4 to 7 microseconds per call
     measured); another inode means the file was compacted and is read again
     from the start, also in the reactor thread: rare (see 4), but with
     C{preload} as long as opening (below).
  3. Claiming a key. While its action runs, and until its record is durable,
     the process holds an exclusive lock on one byte of C{<path>.claims},
     the byte at the offset given by the key's first 7 bytes (Linux
     open-file-description locks, C{F_OFD_SETLK}: owned by the ledger
     object's descriptor, released by the kernel when the process dies; no
     file is made per key, so a claim is one C{fcntl} call and so is its
     release). Taking the lock is followed by a catch-up and a look-up, so a
     post another process finished just before is seen. Two keys share a
     byte once in 2**56: the second then waits for the first, nothing
     worse. A call that finds the key locked
     polls every 50 ms on the injected clock, catching up each time: when
     the record appears it answers L{Outcome.DUPLICATE} or L{Outcome.UNKNOWN};
     when the lock is free and there is no record (the other process failed,
     or crashed: a crashed process's lock is gone with it) it performs the
     action itself; after C{wait_timeout} seconds it fails with
     L{LedgerBusyError} (451 4.4.5). Within one process, concurrent calls share
     one action in memory and take no file lock against each other.
  4. Compacting. When the file holds more than twice the live entries and
     more than 1000 records, the process that notices rewrites it, holding
     the C{.lock} for the whole job: it reads the I{current} file from the
     start (so records of other processes are kept), adds its memory, and
     writes the live entries to a temporary file, fsynced, renamed over the
     old one, directory fsynced. A failed write also leads to such a rewrite.
     L{PostLedger.open} compacts only when the file needs it and the lock is
     free at once; it never waits.

Opening. Measured on a file of 100,000 live records (8.5 MB, page cache warm,
one core of a 2.8 GHz Xeon VM): with C{preload=True} (the daemon)
L{PostLedger.open} parses every record into a dict, 0.25 to 0.45 s once at
start-up, and each look-up is then a dict look-up. With C{preload=False} (a
process that posts one message) it only reads the file, and a look-up
searches its bytes for the key (about 1 to 3 ms): C{open()}, one C{run()} and
C{close()} take 26 to 36 ms in all (fsync is nearly free on that VM: on a
disk add one fsync per record written). L{PostLedger.__len__}
then parses the file the first time.

Writes are group-committed: one write+fsync at a time per process, in the
C{sync} hand-off (a thread in the service); records that arrive meanwhile
share the next fsync.
"""

from __future__ import annotations

import binascii
import enum
import fcntl
import hashlib
import math
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Generic, NamedTuple, TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail.status import LEDGER_UNWRITABLE, TOO_BUSY, GroupServerError

__all__ = [
    "Outcome",
    "PostLedger",
    "LedgerClosedError",
    "LedgerBusyError",
    "LedgerUnwritableError",
]

_T = TypeVar("_T")

#: Compact only when the file holds more records than this...
_COMPACT_MIN_RECORDS: Final = 1000
#: ...and more than this many records per live entry.
_COMPACT_RATIO: Final = 2
#: A valid record is about 85 bytes; a line this long or longer is garbage,
#: skipped unkept.
_MAX_LINE: Final = 256
#: Bytes per read(2) call when reading the file.
_READ_CHUNK: Final = 1 << 20
#: Lines per write(2) call when rewriting the file.
_WRITE_BATCH: Final = 4096
#: Seconds between two looks at a key another process is posting.
_POLL_INTERVAL: Final = 0.05
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
    #: The key was done earlier (remembered in memory or on disk, by this
    #: process or another): the action was not performed again. The caller
    #: answers 2xx.
    DUPLICATE = "duplicate"
    #: The letter C{U} of records written by earlier versions: read, kept
    #: until they expire, never returned by L{PostLedger.run} (the action is
    #: performed again, see the module docstring).
    UNKNOWN = "unknown"


class LedgerClosedError(RuntimeError):
    """
    L{PostLedger.run} was called before L{PostLedger.open} or after
    L{PostLedger.close} began, or the ledger was closed while the call waited
    for another process. The caller answers 451 4.3.0 (transient).
    """


class LedgerUnwritableError(GroupServerError):
    """
    The ledger file cannot be written (a full disk, an I/O error): no record
    can be made durable, so no post is made until one can (each call tries
    again). The reply is C{451 4.3.0} (L{LEDGER_UNWRITABLE}); the cause is
    logged once by the ledger when writing starts failing and once when it
    works again.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(LEDGER_UNWRITABLE, detail)


class LedgerBusyError(GroupServerError):
    """
    Another process has been posting this message for longer than the
    ledger's C{wait_timeout}: its GroupServer request has not ended, or its
    record cannot be written. The reply is C{451 4.4.5} (L{TOO_BUSY}): the
    sender retries later, and by then the ledger knows the outcome.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(TOO_BUSY, detail)


_LETTER: Final = {Outcome.DUPLICATE: b"D", Outcome.UNKNOWN: b"U"}
_OUTCOME: Final = {b"D": Outcome.DUPLICATE, b"U": Outcome.UNKNOWN}


class _Entry(NamedTuple):
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


def _why(exc: BaseException) -> str:
    """A short description of a write error: C{"No space left on device"}."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


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
    succeeded, shared with other processes using the same file (see the
    module docstring).

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
        preload: bool = True,
        wait_timeout: float = 600.0,
    ) -> None:
        """
        @param path: the ledger file; its directory is created by L{open}.
            C{<path>.lock}, C{<path>.claims} and C{<path>.tmp} are used
            beside it.
        @param ttl: how long a key is remembered, in seconds (a sender retries
            for about 5 days, so the default is 7 days).
        @param clock: time source for record times, expiry and waiting.
        @param sync: runs a blocking callable (lock, write and fsync) off the
            reactor and returns a Deferred that fires when it has returned, e.g.
            C{lambda f: deferToThreadPool(reactor, reactor.getThreadPool(), f)}.
            C{None} runs it inline, blocking (tests, a one-message command).
        @param preload: C{True} (a long-running process): parse the whole file
            at L{open}, so each look-up is a dict look-up. C{False} (a process
            that posts one message): L{open} only reads the file, and a
            look-up searches its bytes.
        @param wait_timeout: how long, in seconds, a call waits for another
            process that is posting the same key before it fails with
            L{LedgerBusyError} (451 4.4.5).
        @raise ValueError: if C{ttl} or C{wait_timeout} is not a positive
            number of seconds.
        """
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError("ttl must be a positive number of seconds")
        if not (math.isfinite(wait_timeout) and wait_timeout > 0):
            raise ValueError("wait_timeout must be a positive number of seconds")
        self.path = path
        self._ttl = ttl
        self._clock = clock
        self._sync: Sync = _run_inline if sync is None else sync
        self._preload = preload
        self._wait_timeout = wait_timeout
        self._state = _State.NEW
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
        self._claims_fd = -1  # the descriptor that owns this object's claims
        self._flights: dict[bytes, _Observer[Outcome]] = {}
        # Keys whose action is done but whose record is not durable yet: their
        # claims stay locked so that other processes wait.
        self._held: dict[bytes, _KeyLock] = {}
        self._pauses: set[Deferred[None]] = set()
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
        self._idle: list[Deferred[None]] = []
        self._closed: _Observer[None] = _Observer()
        #: Called with (seconds, records) after each append that worked
        #: (L{gsmail.metrics}); the seconds include the hand-off to C{sync}.
        self.observe_append: Callable[[float, int], None] | None = None

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
        Read the file (parse it with C{preload}) and, if it holds mostly
        expired records and no other process is writing it right now, compact
        it. Never waits for another process. Blocking: call it before the
        reactor runs (C{startService}).

        @raise OSError: the directory, the lock or claims file cannot be created,
            or the file cannot be read; gsmail must not start without its
            ledger.
        @raise RuntimeError: the ledger was already opened.
        """
        if self._state is not _State.NEW:
            raise RuntimeError("PostLedger.open() called twice")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        # The claims file is made with the ledger and never removed: without
        # the ledger beside it, the ledger was removed.
        existed = os.path.exists(self.path + ".claims") and not os.path.exists(self.path)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        lock_fd = os.open(self.path + ".lock", flags, 0o600)
        self._appender = _Appender(self.path, lock_fd)
        try:
            self._claims_fd = os.open(self.path + ".claims", flags, 0o600)
            loaded = self._reload()
            if self._worth_compacting():
                self._compact_at_open()
        except BaseException:
            self._set_cursor(None)
            self._appender.close()
            self._appender = None
            self._close_claims()
            raise
        if loaded.garbage:
            self._log_garbage(loaded.garbage)
        if existed:
            self.log.warn(
                "The post ledger {path} is missing (its .claims file is there): the posts"
                " it remembered are forgotten; a retried copy of one is added again, and"
                " GroupServer refuses to archive it twice",
                path=self.path,
            )
        if loaded.torn:
            self.log.info(
                "Ignored an incomplete last record in the post ledger {path}"
                " (left by a crash while it was written, or being written now)",
                path=self.path,
            )
        self.log.info(
            "Post ledger {path} opened: {records} records, {live} posts remembered ({how})",
            path=self.path,
            records=self._records,
            live=len(self._entries) + self._raw_live,
            how="estimated" if self._raw else "parsed",
        )
        self._state = _State.OPEN

    def close(self) -> Deferred[None]:
        """
        Refuse new calls, stop waiting for other processes, wait for the
        actions in flight and their records, make sure everything in memory
        is on disk, and close the files.

        @return: fires when closed; fails with C{OSError} if a needed rewrite
            failed (the files are closed anyway). Fires at once if never
            opened.
        """
        if self._state is _State.OPEN:
            self._state = _State.CLOSING
            for pause in list(self._pauses):
                pause.cancel()
            Deferred.fromCoroutine(self._close())
        elif self._state is _State.NEW:
            self._state = _State.CLOSED
            self._closed.fire(None)
        return self._closed.when_fired()

    def run(self, key: bytes, action: Callable[[], Deferred[Any]]) -> Deferred[Outcome]:
        """
        Perform C{action} once for C{key}, in this process and every other
        one sharing the file.

          1. C{key} remembered as done: L{Outcome.DUPLICATE}, action not called.
          2. a call for C{key} in flight in this process: share its outcome
             (the same success or failure); cancelling the returned Deferred
             does not cancel the shared action.
          3. a call for C{key} in flight in another process: wait for it (up
             to C{wait_timeout} seconds), then 1, or 4 if it failed.
          4. otherwise, if the last write of the file failed, try writing it
             again first (L{LedgerUnwritableError} if it still fails, and the
             action is not called); then call C{action}; on success record
             C{key} durably, then fire L{Outcome.DONE}. If the record cannot
             be written the action still counts as done in memory (a retry in
             this process is deduplicated, other processes wait for the
             record) and the call fails with L{LedgerUnwritableError}.
             A failure of the action propagates and nothing is recorded,
             whatever it was (C{outcome_unknown} included): a later call
             performs the action again.

        The records of other processes are read first (a C{stat} and a small
        read, in the calling thread).

        @param key: from L{key} (32 bytes).
        @param action: performs the post; fires on success.
        @return: L{Outcome.DONE} or L{Outcome.DUPLICATE}; or the action's
            failure; or C{OSError} if the file could not be read (451 4.3.0);
            or L{LedgerUnwritableError} if a record could not be made durable
            (451 4.3.0); or L{LedgerBusyError} if another process kept the
            key too long (451 4.4.5); or L{LedgerClosedError} if the ledger
            is not open (451 4.3.0).
        @raise ValueError: C{key} is not 32 bytes (not from L{key}).
        """
        if len(key) != _KEY_SIZE:
            raise ValueError("ledger keys are 32-byte digests from PostLedger.key()")
        if self._state is not _State.OPEN:
            return fail(LedgerClosedError(f"post ledger {self.path} is {self._state.value}"))
        flight = self._flights.get(key)
        if flight is None:
            try:
                self._catch_up()
            except OSError:
                return fail(_current_failure())
            known = self._lookup(key)
            if known is not None:
                return succeed(known)
            flight = self._flights[key] = _Observer()
            Deferred.fromCoroutine(self._perform(key, action, flight))
        return flight.when_fired()

    def state(self, key: bytes) -> Outcome | None:
        """
        What a call for C{key} would get without calling its action now:
        L{Outcome.DUPLICATE}, or C{None} when the key is not remembered
        (never seen, expired, recorded as unknown by an earlier version, or
        still in flight in this process). Reads the records other processes appended first.

        @raise OSError: the file could not be read.
        """
        if key in self._flights:
            return None
        if self._state is _State.OPEN:
            self._catch_up()
        return self._lookup(key)

    @property
    def write_failed(self) -> bool:
        """
        The last write failed (a full disk, EIO): every call is answered
        451 until a write works again (C{/readyz} reports it).
        """
        return self._write_failed

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

    def _lookup(self, key: bytes) -> Outcome | None:
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

    def _remember(self, key: bytes, outcome: Outcome) -> bytes:
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
                self._log_garbage(garbage)
            self._entries = _combine(records, self._entries.items())
            self._expire()
            self._raw, self._raw_live = b"", 0
            self._raw_absent.clear()

    # -- reading what other processes wrote ----------------------------------

    def _catch_up(self) -> None:
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
                self._log_garbage(loaded.garbage)
            if truncated:
                self._restore(
                    f"shrank from {old_size} to {st.st_size} bytes; the posts remembered"
                    " here are written back"
                )
            elif before is not None and loaded.keys is not None:
                lost = before - loaded.keys - self._held.keys() - self._flights.keys()
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
                self._log_garbage(garbage + read.overlong)

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

    def _log_garbage(self, count: int) -> None:
        self.log.warn(
            "Skipped {garbage} unreadable lines in the post ledger {path}",
            garbage=count,
            path=self.path,
        )

    # -- one action ---------------------------------------------------------

    async def _perform(
        self, key: bytes, action: Callable[[], Deferred[Any]], flight: _Observer[Outcome]
    ) -> None:
        result: Outcome | Failure
        try:
            known, lock = await self._claim(key)
        except Exception:
            result = _current_failure()
        else:
            if known is not None:
                result = known
            else:
                assert lock is not None
                result = await self._act(key, action, lock)
        del self._flights[key]
        flight.fire(result)
        self._check_idle()

    async def _act(
        self, key: bytes, action: Callable[[], Deferred[Any]], lock: _KeyLock
    ) -> Outcome | Failure:
        """
        Perform the action holding the key's claim; release it once the
        outcome is durable (or nothing is to be recorded).
        """
        result: Outcome | Failure
        durable = True
        if self._write_failed:
            # Make no post whose record could not be kept: try the file first.
            try:
                await self._write(b"")
            except Exception as exc:
                lock.release()
                return Failure(LedgerUnwritableError(_why(exc)))  # type: ignore[no-untyped-call]
        try:
            await maybeDeferred(action)
        except Exception:
            result = _current_failure()
        else:
            try:
                await self._write(self._remember(key, Outcome.DUPLICATE))
            except Exception as exc:
                result = Failure(  # type: ignore[no-untyped-call]
                    LedgerUnwritableError(f"posted, but {_why(exc)}")
                )
                durable = False
            else:
                result = Outcome.DONE
        if durable:
            lock.release()
        else:
            self._held[key] = lock
        return result

    async def _claim(self, key: bytes) -> tuple[Outcome | None, _KeyLock | None]:
        """
        Claim the key, or wait until the process that holds it is done.

        @return: the outcome recorded by another process (and no lock), or
            C{None} and the lock: perform the action.
        @raise LedgerBusyError: the key stayed locked for C{wait_timeout}.
        @raise LedgerClosedError: the ledger was closed while waiting.
        @raise OSError: a file could not be read or created.
        """
        deadline = self._clock.seconds() + self._wait_timeout
        waited = False
        while True:
            lock = _KeyLock.acquire(self._claims_fd, key)
            try:
                self._catch_up()  # what the previous holder recorded
                known = self._lookup(key)
            except BaseException:
                if lock is not None:
                    lock.release()
                raise
            if known is not None:
                if lock is not None:
                    lock.release()
                return known, None
            if lock is not None:
                return None, lock
            if not waited:
                waited = True
                self.log.info(
                    "Post {ledger_key} is under way in another process: waiting for it",
                    ledger_key=key.hex(),
                )
            if self._state is not _State.OPEN:
                raise LedgerClosedError(f"post ledger {self.path} closed")
            if self._clock.seconds() >= deadline:
                raise LedgerBusyError(
                    f"post {key.hex()} still under way in another process"
                    f" after {self._wait_timeout:g} seconds"
                )
            try:
                await self._pause()
            except CancelledError:
                raise LedgerClosedError(f"post ledger {self.path} closed") from None

    def _pause(self) -> Deferred[None]:
        """
        Fire after the poll interval; L{close} cancels it.
        """
        d: Deferred[None] = deferLater(self._clock, _POLL_INTERVAL, lambda: None)
        self._pauses.add(d)

        def done(result: object) -> object:
            self._pauses.discard(d)
            return result

        d.addBoth(done)
        return d

    def _release_held(self) -> None:
        """
        The records of the held keys are durable now: let other processes see.
        """
        held, self._held = self._held, {}
        for lock in held.values():
            lock.release()

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
                        self._needs_rewrite = True  # the rename may not be durable
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
                        self._release_held()
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
            self._check_idle()

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

    def _log_write_error(self, exc: Exception) -> None:
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
            self._log_write_error(exc)
        except OSError as exc:
            self._compact_floor = self._records + _COMPACT_MIN_RECORDS
            self._log_write_error(exc)
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

    # -- closing ------------------------------------------------------------

    def _close_claims(self) -> None:
        if self._claims_fd >= 0:
            os.close(self._claims_fd)
            self._claims_fd = -1

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
            if self._held:
                if result is not None:
                    self.log.error(
                        "Closing the post ledger {path} with {count} posts not on disk:"
                        " another process may post them again",
                        path=self.path,
                        count=len(self._held),
                    )
                self._release_held()
            self._set_cursor(None)
            if self._appender is not None:
                self._appender.close()
                self._appender = None
            self._close_claims()  # after the held claims were released
            self._state = _State.CLOSED
        self._closed.fire(result)


# -- file helpers ------------------------------------------------------------


class _KeyLock:
    """
    This ledger object's claim on a key: an exclusive open-file-description
    lock on one byte of the claims file (see the module docstring, rule 3).
    """

    def __init__(self, fd: int, offset: int) -> None:
        self._fd = fd
        self._offset = offset

    @classmethod
    def acquire(cls, fd: int, key: bytes) -> _KeyLock | None:
        """
        Claim C{key} without waiting.

        @param fd: the claims file, open for reading and writing.
        @return: the claim, or C{None} if another process (or another ledger
            object in this one) holds it.
        @raise OSError: the lock could not be taken for another reason.
        """
        offset = int.from_bytes(key[:7], "big")
        try:
            fcntl.fcntl(fd, _SETLK, _flock(fcntl.F_WRLCK, offset))
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held
            return None
        return cls(fd, offset)

    def release(self) -> None:
        """Let other processes claim the key."""
        try:
            fcntl.fcntl(self._fd, _SETLK, _flock(fcntl.F_UNLCK, self._offset))
        except OSError:
            pass  # the descriptor is gone, and the lock with it


#: Open-file-description locks (Linux 3.15+): two ledger objects in one
#: process exclude each other as two processes do. Elsewhere, process locks.
_SETLK: Final[int] = getattr(fcntl, "F_OFD_SETLK", fcntl.F_SETLK)


def _flock(kind: int, offset: int) -> bytes:
    """A C{struct flock} for one byte at C{offset} (64-bit Linux layout)."""
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, offset, 1, 0)


@attrs.define
class _Cursor:
    """
    How far this process has read a ledger file (an inode).

    @ivar fd: open on the file, for reading.
    @ivar ident: its C{(st_dev, st_ino)}.
    @ivar offset: where the first line not read yet starts, in bytes.
    @ivar skipping: inside an over-long line: skip to its end.
    """

    fd: int
    ident: tuple[int, int]
    offset: int = 0
    skipping: bool = False


@attrs.define
class _Loaded:
    """
    What a reload found wrong: garbage lines, and an incomplete last line.
    """

    garbage: int = 0
    torn: bool = False
    #: The keys of the file's records (with C{preload} only).
    keys: set[bytes] | None = None


@attrs.frozen
class _Read:
    """
    Lines read from a file (see L{_read_lines}).

    @ivar data: the complete lines, each with its LF, without the over-long ones.
    @ivar lines: how many complete lines were read, over-long ones included.
    @ivar overlong: how many of them were over-long.
    @ivar offset: where the first byte not read starts.
    @ivar skipping: reading stopped inside an over-long line.
    @ivar tail: the last line if it has no LF yet but is a valid record.
    @ivar torn: the last line has no LF and is not a valid record.
    """

    data: bytes
    lines: int
    overlong: int
    offset: int
    skipping: bool
    tail: tuple[bytes, _Entry] | None
    torn: bool


def _read_lines(fd: int, offset: int, skipping: bool) -> _Read:
    """
    Read the complete lines from C{offset} to the end of the file, in chunks.
    Lines of C{_MAX_LINE} bytes or more are counted and dropped.
    """
    parts: list[bytes] = []
    lines = overlong = 0
    carry = b""
    pos = offset
    while piece := os.pread(fd, _READ_CHUNK, pos):
        pos += len(piece)
        buf = carry + piece if carry else piece
        if skipping:
            end = buf.find(b"\n")
            if end < 0:
                carry = b""
                continue
            buf = buf[end + 1 :]
            skipping = False
        cut = buf.rfind(b"\n") + 1
        complete, carry = buf[:cut], buf[cut:]
        if complete:
            count = complete.count(b"\n")
            lines += count
            if len(complete) > _MAX_LINE:
                split = complete.split(b"\n")
                if max(map(len, split)) >= _MAX_LINE:
                    kept = [line for line in split if len(line) < _MAX_LINE]
                    overlong += len(split) - len(kept)
                    complete = b"\n".join(kept)  # the last kept line is b""
            parts.append(complete)
        if len(carry) >= _MAX_LINE:
            lines += 1
            overlong += 1
            carry = b""
            skipping = True
    tail = _parse(carry) if carry else None
    return _Read(
        data=b"".join(parts),
        lines=lines,
        overlong=overlong,
        offset=pos - len(carry),
        skipping=skipping,
        tail=tail,
        torn=bool(carry) and tail is None,
    )


def _parse(line: bytes) -> tuple[bytes, _Entry] | None:
    """
    One record without its LF, or C{None} if it is not a valid record.
    Called for every line when a file is parsed: kept lean.
    """
    fields = line.rstrip(b"\r").split(b" ")
    if len(fields) != 3:
        return None
    stamp, letter, digits = fields
    outcome = _OUTCOME.get(letter)
    if outcome is None or len(digits) != 2 * _KEY_SIZE:
        return None
    try:
        time = float(stamp)
        key = binascii.unhexlify(digits)
    except ValueError:  # binascii.Error is a ValueError
        return None
    if not 0.0 <= time < math.inf:  # also refuses NaN
        return None
    return key, _Entry(time, outcome)


def _parse_lines(data: bytes) -> tuple[list[tuple[bytes, _Entry]], int]:
    """
    The records of complete lines, in file order, and the number of garbage lines.
    """
    records: list[tuple[bytes, _Entry]] = []
    garbage = 0
    lines = data.split(b"\n")
    lines.pop()  # after the last LF
    for line in lines:
        parsed = _parse(line)
        if parsed is None:
            garbage += 1
        else:
            records.append(parsed)
    return records, garbage


def _time_of(item: tuple[bytes, _Entry]) -> float:
    return item[1].time


def _combine(
    records: Iterable[tuple[bytes, _Entry]], newer: Iterable[tuple[bytes, _Entry]]
) -> OrderedDict[bytes, _Entry]:
    """
    The entries of C{records} (in file order, about oldest first: the last
    record of a key wins) and of C{newer} (memory: wins where it is more
    recent), expired ones included.
    """
    entries = OrderedDict(records)
    for key, entry in newer:
        old = entries.get(key)
        if old is None or entry.time > old.time:
            entries[key] = entry
            entries.move_to_end(key)
    return entries


def _find(raw: bytes, key: bytes) -> _Entry | None:
    """
    The last valid record of C{key} in C{raw} (complete lines), by searching
    its bytes.
    """
    needle = key.hex().encode("ascii")
    end = len(raw)
    while (at := raw.rfind(needle, 0, end)) >= 0:
        start = raw.rfind(b"\n", 0, at) + 1
        parsed = _parse(raw[start : raw.index(b"\n", at)])
        if parsed is not None and parsed[0] == key:
            return parsed[1]
        end = start
    return None


def _first_live(raw: bytes, cutoff: float) -> int:
    """
    Where the first line of C{raw} (complete lines) recorded at or after
    C{cutoff} starts, by bisection: records are appended about in time order
    and compaction writes them oldest first. Garbage counts as expired.
    """
    low, high = 0, len(raw)  # lines starting before low are expired, at high live
    while low < high:
        start = raw.rfind(b"\n", low, (low + high) // 2) + 1 or low
        end = raw.index(b"\n", start) + 1
        parsed = _parse(raw[start : end - 1])
        if parsed is None or parsed[1].time < cutoff:
            low = end
        else:
            high = start
    return low


@attrs.frozen
class _Compacted:
    """
    The result of a compaction: the live entries now in the file (oldest
    first), the new file's identity and size, and a descriptor to read it.
    """

    entries: list[tuple[bytes, _Entry]]
    ident: tuple[int, int]
    size: int
    read_fd: int


class _Appender:
    """
    The writing side of one ledger object: the C{.lock} descriptor and a
    descriptor appending to the current file. Blocking; used at L{open} and
    then only in the C{sync} hand-off, one job at a time.
    """

    def __init__(self, path: str, lock_fd: int) -> None:
        self._path = path
        self._lock_fd = lock_fd
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        # Where this object's last append ended (with an LF), or -1.
        self._end = -1

    def append(self, data: bytes) -> None:
        """
        Append records to the current file and fsync it, holding the lock.
        Five system calls when this process wrote last (lock, stat, write,
        fsync, unlock): each one is a hand-back of the GIL the reactor
        thread may wait for.
        """
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            fd, created, size = self._current()
            if size and size != self._end and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # after a crashed writer's torn line
            _write_all(fd, data)
            os.fsync(fd)
            self._end = size + len(data)  # O_APPEND, and writers hold the lock
            if created:
                _fsync_directory(os.path.dirname(os.path.abspath(self._path)))
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _current(self) -> tuple[int, bool, int]:
        """
        A descriptor on the file the path names now (another process may
        have replaced it), whether it was created just now, and its size.
        """
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            pass
        else:
            if self._fd is not None and self._ident == (st.st_dev, st.st_ino):
                return self._fd, False, st.st_size
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        created = False
        try:
            fd = os.open(self._path, flags)
        except FileNotFoundError:
            fd = os.open(self._path, flags | os.O_CREAT, 0o600)
            created = True
        size = self._use(fd)
        return fd, created, size

    def _use(self, fd: int) -> int:
        """Append to C{fd} from now on; return its size."""
        if self._fd is not None:
            os.close(self._fd)
        st = os.fstat(fd)
        self._fd, self._ident = fd, (st.st_dev, st.st_ino)
        self._end = -1
        return st.st_size

    def compact(
        self, snapshot: list[tuple[bytes, _Entry]], now: float, ttl: float, *, wait: bool
    ) -> _Compacted | None:
        """
        Holding the lock, replace the file with the live entries of the
        current file and of C{snapshot}.

        @param wait: wait for the lock; else give up at once if it is held.
        @return: the result, or C{None} if the lock was held.
        @raise _ReplacedError: replaced, but the directory fsync failed.
        @raise OSError: the file was not replaced.
        """
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return None
        try:
            records: list[tuple[bytes, _Entry]] = []
            try:
                fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                pass
            else:
                try:
                    read = _read_lines(fd, 0, False)
                finally:
                    os.close(fd)
                records, _ = _parse_lines(read.data)
                if read.tail is not None:
                    records.append(read.tail)
            items = [
                item for item in _combine(records, snapshot).items() if now < item[1].time + ttl
            ]
            items.sort(key=_time_of)  # the order expiry relies on
            fd = _replace_file(self._path, (_record(e.time, e.outcome, k) for k, e in items))
            self._use(fd)
            assert self._ident is not None
            return _Compacted(items, self._ident, os.fstat(fd).st_size, os.dup(fd))
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fd = None


def _record(time: float, outcome: Outcome, key: bytes) -> bytes:
    return b"%.6f %s %s\n" % (time, _LETTER[outcome], key.hex().encode("ascii"))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _replace_file(path: str, lines: Iterator[bytes]) -> int:
    """
    Atomically replace C{path} with C{lines}: temporary file, fsync, rename,
    directory fsync.

    @return: a descriptor open for reading and appending to the new file.
    @raise _ReplacedError: the file was replaced, but the directory fsync
        failed: the rename may be lost in a crash.
    @raise OSError: the file was not replaced.
    """
    tmp = path + ".tmp"
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        batch: list[bytes] = []
        for line in lines:
            batch.append(line)
            if len(batch) == _WRITE_BATCH:
                _write_all(fd, b"".join(batch))
                batch.clear()
        _write_all(fd, b"".join(batch))
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
    return fd


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
