# -*- test-case-name: tests.test_ledger,tests.test_ledger_processes -*-
"""
The post ledger's file: its record format, reading and parsing it, appending
records durably, and compacting it. Blocking functions on descriptors and
bytes, no reactor: L{gsmail.ledger.store} calls them, in the C{sync}
hand-off for writes. Not here: what the ledger remembers in memory and when
it reads or writes (L{gsmail.ledger.store}), claims on keys
(L{gsmail.ledger.claims}), what a post's outcome means (L{gsmail.ledger}).

File format, one record per line, ASCII, append-only::

    <unix time, seconds, float> <D|U> <key, 64 hex digits>\\n

C{D}: the action succeeded. C{U} ("outcome unknown") was written by earlier
versions, which did not repeat such a post; it is read and kept until it
expires, but counts as no record. Within the file the
last record of a key wins. Reading tolerates an incomplete last line (a crash
during an append, or an append under way in another process: it is read once
its LF is there) and garbage lines, which are skipped, counted and logged; no
line longer than 256 bytes is kept.

Several processes write the file; these rules (numbered as in
L{gsmail.ledger.store}, which has rule 2, and L{gsmail.ledger.claims}, rule 3)
keep their memories of it right:

  1. Appending. Records are written with C{O_APPEND} while holding
     C{flock(LOCK_EX)} on C{<path>.lock}, in the C{sync} hand-off: check that
     the path still names the file the descriptor writes to (else another
     process compacted it: reopen), start with an LF if the file ends in a
     torn line (a writer crashed: the fragment becomes one garbage line rather
     than eating this record), write, fsync, unlock (L{_Appender.append}).
  4. Compacting. When the file holds more than twice the live entries and
     more than 1000 records, the process that notices rewrites it, holding
     the C{.lock} for the whole job: it reads the I{current} file from the
     start (so records of other processes are kept), adds its memory, and
     writes the live entries to a temporary file, fsynced, renamed over the
     old one, directory fsynced (L{_Appender.compact}). A failed write also
     leads to such a rewrite. L{gsmail.ledger.PostLedger.open} compacts only
     when the file needs it and the lock is free at once; it never waits.
"""

from __future__ import annotations

import binascii
import enum
import fcntl
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Final, NamedTuple

import attrs

#: A valid record is about 85 bytes; a line this long or longer is garbage,
#: skipped unkept.
_MAX_LINE: Final = 256
#: Bytes per read(2) call when reading the file.
_READ_CHUNK: Final = 1 << 20
#: Lines per write(2) call when rewriting the file.
_WRITE_BATCH: Final = 4096
#: Bytes in a key (a SHA-256 digest, L{gsmail.ledger.PostLedger.key}).
_KEY_SIZE: Final = 32


class Outcome(enum.Enum):
    """
    What L{gsmail.ledger.PostLedger.run} did with the action.
    """

    #: This call (or a concurrent one it joined) performed the action
    #: successfully now, and the ledger has it on disk.
    DONE = "done"
    #: The key was done earlier (remembered in memory or on disk, by this
    #: process or another): the action was not performed again. The caller
    #: answers 2xx.
    DUPLICATE = "duplicate"
    #: The letter C{U} of records written by earlier versions: read, kept
    #: until they expire, never returned by L{gsmail.ledger.PostLedger.run} (the
    #: action is performed again, see L{gsmail.ledger}).
    UNKNOWN = "unknown"


_LETTER: Final = {Outcome.DUPLICATE: b"D", Outcome.UNKNOWN: b"U"}
_OUTCOME: Final = {b"D": Outcome.DUPLICATE, b"U": Outcome.UNKNOWN}


class _Entry(NamedTuple):
    """
    A remembered key: when it was recorded (clock seconds) and what a later
    call gets (L{Outcome.DUPLICATE} or L{Outcome.UNKNOWN}).
    """

    time: float
    outcome: Outcome


def _why(exc: BaseException) -> str:
    """A short description of a write error: C{"No space left on device"}."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


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
    descriptor appending to the current file. Blocking; used at C{open} and
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
