# -*- test-case-name: tests.inbound.test_spool -*-
"""
The spool: message data streams to a temporary file as DATA arrives, so memory
stays flat whatever the message size. The file holds the message as sent, with
LF line endings (as Postfix's pipe(8) handed messages to smtp2gs); the
header section is kept aside (bounded) to read the C{Message-ID}, and a
SHA-256 digest of the stored bytes identifies a message that has none.

Nothing here is fsynced: an inbound message is only acknowledged after
GroupServer has it, so the spool file never holds the only copy of a message
that got a 2xx reply.

A full or failing disk (C{ENOSPC}, C{EDQUOT}, C{EIO}) while spooling is a
transient fault: a L{Spool} that cannot write gives its file back at once
(nothing leaks, however many messages fail), the listener answers
C{452 4.3.1} (L{storage_reply}) and L{SpoolAlarm} logs the burst once. The
next message simply tries again, so service resumes when space returns.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import re
import tempfile
from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gsmail import status
from gsmail.status import Reply

__all__ = [
    "Spool",
    "SpoolFiles",
    "SpooledMessage",
    "SpoolAlarm",
    "release",
    "storage_reply",
    "free_space",
]

log = Logger()

#: The header section kept in memory to find the Message-ID, in bytes.
MAX_HEADER_BYTES = 256 * 1024
#: Bytes gathered before one write(2) and digest update.
WRITE_CHUNK = 256 * 1024
#: Messages up to this size (bytes) are also kept in memory, so posting them
#: does not read the file back.
MEMORY_COPY = 64 * 1024
#: C{errno} values that mean the storage cannot take the message now: disk
#: full, quota exceeded, I/O error. Answered C{452 4.3.1}.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})
#: Names tried before L{_create} gives up (each taken by an earlier process).
CREATE_ATTEMPTS = 1000

# The system calls that touch spool files, as module names so tests can
# inject failures (trial's C{patch}).
_write: Callable[[int, memoryview], int] = os.write
_ftruncate: Callable[[int, int], None] = os.ftruncate
_open: Callable[[str, int, int], int] = os.open


def storage_reply(error: BaseException) -> Reply:
    """
    The reply for a fault while spooling or queueing a message.

    @param error: what was raised.
    @return: C{452 4.3.1 Insufficient system storage} (RFC 5321 §4.2.3,
        RFC 3463 §3.4 "mail system full"; Postfix's wording) for an
        C{OSError} in L{STORAGE_ERRNOS}, else C{451 4.3.0 Local error in
        processing}. Both transient: the sender keeps the message.
    """
    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
        return status.INSUFFICIENT_STORAGE
    return status.LOCAL_ERROR


def free_space(directory: str) -> int | None:
    """
    Bytes this process may still write in C{directory}'s file system
    (C{statvfs(2)}: the blocks left for unprivileged users, or all free
    blocks for root). One system call, no I/O on a local file system.

    @param directory: a directory (C{""}: the system temp dir).
    @return: the free bytes, or C{None} when they cannot be known.
    """
    try:
        st = os.statvfs(directory or tempfile.gettempdir())
    except OSError:
        return None
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return int(blocks * st.f_frsize)


class SpoolAlarm:
    """
    Logs spooling (or queueing) faults once per burst: the first fault after
    a success is an error with its cause, later ones are only counted (and
    recalled every C{remind} seconds while the burst lasts), and the first
    success after them says how many messages were refused. A disk that
    fills logs three lines, not a traceback per message.

    @param what: what failed, for the log (C{"spooling"}, C{"queueing"}).
    @param clock: for the reminders; C{None}: no reminders.
    @param remind: seconds between reminders of a running burst.
    """

    def __init__(
        self, what: str = "spooling", clock: IReactorTime | None = None, remind: float = 300.0
    ) -> None:
        self.what = what
        self._clock = clock
        self._remind = remind
        #: Faults in the running burst (0: none).
        self.failures = 0
        self._last_logged = 0.0

    def failed(self, error: BaseException, where: str) -> Reply:
        """
        Count a fault, log it if it starts a burst.

        @param error: the exception (an C{OSError}, usually).
        @param where: the directory or file, for the log.
        @return: the reply for it (L{storage_reply}).
        """
        reply = storage_reply(error)
        now = self._clock.seconds() if self._clock is not None else 0.0
        self.failures += 1
        if self.failures == 1:
            self._last_logged = now
            log.error(
                "{what} failed in {where}: {error}; answering {reply_code} {enhanced_status} "
                "until it works again",
                what=self.what.capitalize(),
                where=where,
                error=_describe(error),
                reply_code=reply.code,
                enhanced_status=reply.enhanced,
            )
        elif self._clock is not None and now - self._last_logged >= self._remind:
            self._last_logged = now
            log.error(
                "{what} still failing in {where}: {error} ({count} messages refused so far)",
                what=self.what.capitalize(),
                where=where,
                error=_describe(error),
                count=self.failures,
            )
        return reply

    def succeeded(self) -> None:
        """A message was stored: end the burst, if any, with one line."""
        if self.failures:
            log.info(
                "{what} works again ({count} messages were refused meanwhile)",
                what=self.what.capitalize(),
                count=self.failures,
            )
            self.failures = 0


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        return f"{errno.errorcode.get(error.errno, error.errno)} ({error.strerror})"
    return f"{error.__class__.__name__}: {error}"


@attrs.frozen
class SpooledMessage:
    """
    A received message on disk.

    @ivar path: the spool file (LF line endings).
    @ivar size: its length in bytes.
    @ivar message_id: the C{Message-ID} header's value, stripped, or C{None}.
    @ivar digest: hex SHA-256 of the file's bytes.
    @ivar data: the file's bytes when at most L{MEMORY_COPY}, else C{None}.
    @ivar files: the L{SpoolFiles} the file came from, or C{None}; give the
        file back with L{release}.
    """

    path: str
    size: int
    message_id: str | None
    digest: str
    data: bytes | None = None
    files: SpoolFiles | None = attrs.field(default=None, eq=False, repr=False)
    #: The C{Received} fields of its header section (RFC 5321 §6.3 loop check).
    hops: int = 0

    @property
    def identity(self) -> str:
        """
        How the message is named in logs: its Message-ID, else its digest.
        (The ledger keys it by its digest alone, L{gsmail.posting}.)
        """
        if self.message_id:
            return "id:" + self.message_id
        return "sha256:" + self.digest


class Spool:
    """
    One message being received. Call L{write} with data (LF line endings),
    then L{finish}, or L{discard} on any failure.

    When L{write} or L{finish} raises C{OSError} (disk full, quota, I/O
    error), the spool has already discarded itself: its descriptor is closed
    (or its file handed back to its L{SpoolFiles}, emptied) and its file
    removed; L{discard} after that does nothing.

    @param directory: where the file is made (C{""}: the system temp dir).
    @param files: reuse a file of this L{SpoolFiles} instead (C{directory}
        is then not used).
    @raise OSError: no spool file could be made (C{ENOSPC}, C{EMFILE}, ...);
        nothing is left open.
    """

    def __init__(self, directory: str = "", files: SpoolFiles | None = None) -> None:
        if files is not None:
            fd, self.path = files.take()
        else:
            fd, self.path = _create(directory or tempfile.gettempdir())
        self._files = files
        # A descriptor of a SpoolFiles stays open for the next message.
        self._fd: int | None = fd if files is None else None
        self._out = fd
        self._small: bytes | None = None
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._digest = hashlib.sha256()
        self.size = 0
        self._header = bytearray()
        self._header_done = False
        self._finished = False
        self._discarded = False

    def write(self, data: bytes) -> None:
        """
        Append C{data}, message bytes with LF line endings.

        @raise OSError: the data could not be written; the spool is discarded.
        @raise ValueError: the spool was finished or discarded.
        """
        if self._finished or self._discarded:
            raise ValueError("the spool file is closed")
        if not data:
            return
        self.size += len(data)
        if not self._header_done:
            self._collect_header(data)
        self._pending.append(data)
        self._pending_len += len(data)
        if self._pending_len >= WRITE_CHUNK:
            self._flush()

    def _collect_header(self, data: bytes) -> None:
        start = max(0, len(self._header) - 1)
        self._header += data
        end = self._header.find(b"\n\n", start)
        if self._header.startswith(b"\n"):
            end = 0
        if end >= 0:
            del self._header[end + 1 :]
            self._header_done = True
        elif len(self._header) > MAX_HEADER_BYTES:
            del self._header[MAX_HEADER_BYTES:]
            self._header_done = True

    def _flush(self, last: bool = False) -> None:
        if self._pending:
            chunk = b"".join(self._pending)
            self._pending.clear()
            self._pending_len = 0
            self._digest.update(chunk)
            try:
                _write_all(self._out, chunk)
            except OSError:
                self.discard()
                raise
            if last and len(chunk) == self.size <= MEMORY_COPY:
                self._small = chunk

    def finish(self) -> SpooledMessage:
        """
        Close the file and describe it. The caller owns the file from here
        (give it back with L{release}).

        @raise OSError: the last data could not be written; the spool is
            discarded.
        @raise ValueError: the spool was finished or discarded.
        """
        if self._finished or self._discarded:
            raise ValueError("the spool file is closed")
        self._flush(last=True)
        self._finished = True
        self._close()
        return SpooledMessage(
            path=self.path,
            size=self.size,
            message_id=_message_id(bytes(self._header)),
            digest=self._digest.hexdigest(),
            data=self._small if self.size else b"",
            files=self._files,
            hops=len(_RECEIVED.findall(self._header)),
        )

    def discard(self) -> None:
        """
        Drop the data and remove the file (or give it back). Does nothing
        after L{finish} (the message owns the file then) or a first
        L{discard}; never raises (a file that cannot be removed is logged).
        """
        if self._finished or self._discarded:
            return
        self._discarded = True
        self._pending.clear()
        self._pending_len = 0
        self._close()
        try:
            if self._files is not None:
                self._files.release(self.path)
            else:
                remove(self.path)
        except OSError as e:
            log.warn("Could not remove the spool file {path}: {error}", path=self.path, error=e)

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass  # Linux frees the descriptor even when close(2) fails


def _write_all(fd: int, data: bytes) -> None:
    """
    Write all of C{data} to C{fd}: write(2) may store only part of it (a
    file system that is nearly full), and the rest must not be dropped.

    @raise OSError: a write failed (C{ENOSPC} once nothing more fits).
    """
    view = memoryview(data)
    # Bounded: every pass writes at least one byte or raises.
    while view:
        written = _write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write(2) stored nothing")
        view = view[written:]


class SpoolFiles:
    """
    Spool files kept open for reuse in one directory, so that receiving a
    message costs no file creation or removal: a released file is truncated
    to nothing and handed to the next message. On ext4, creating and
    removing a file per message took a fourteenth of a small message's CPU.
    Used from one thread (the reactor's).

    @param directory: the spool directory (C{""}: the system temp dir).
    @param keep: the most free files kept; more are removed.
    """

    def __init__(self, directory: str = "", keep: int = 32) -> None:
        self.directory = directory or tempfile.gettempdir()
        self._keep = keep
        self._free: list[tuple[int, str]] = []
        self._taken: dict[str, int] = {}

    @property
    def free(self) -> int:
        """The number of empty files waiting for a message."""
        return len(self._free)

    def take(self) -> tuple[int, str]:
        """
        An empty spool file, open for writing at its start: a kept one, or a
        new one.

        @return: its descriptor (owned by this object) and its path.
        @raise OSError: a new file could not be created.
        """
        while self._free:
            fd, path = self._free.pop()
            try:
                linked = os.fstat(fd).st_nlink  # 0: removed by hand meanwhile
            except OSError:
                linked = 0
            if linked:
                self._taken[path] = fd
                return fd, path
            _close_quietly(fd)
        fd, path = _create(self.directory)
        self._taken[path] = fd
        return fd, path

    def release(self, path: str) -> None:
        """
        The message in C{path} is done with: keep the file, emptied, for the
        next one, or remove it (too many kept, closed, not one of ours, or
        it could not be emptied). Its descriptor is closed or kept, never
        leaked.

        @raise OSError: the file could not be removed.
        """
        fd = self._taken.pop(path, None)
        if fd is None:
            remove(path)
            return
        if len(self._free) < self._keep:
            try:
                _ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
            except OSError:
                pass
            else:
                self._free.append((fd, path))
                return
        _close_quietly(fd)
        remove(path)

    def close(self) -> None:
        """Remove the free files; files still taken are removed when released."""
        self._keep = 0
        free, self._free = self._free, []
        for fd, path in free:
            _close_quietly(fd)
            try:
                remove(path)
            except OSError as e:
                log.warn("Could not remove the spool file {path}: {error}", path=path, error=e)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # Linux frees the descriptor even when close(2) fails


def release(message: SpooledMessage) -> None:
    """
    Give a received message's file back to its L{SpoolFiles}, or remove it.

    @raise OSError: the file could not be removed.
    """
    if message.files is not None:
        message.files.release(message.path)
    else:
        remove(message.path)


def remove_process_files(directory: str, pid: int) -> int:
    """
    Remove the spool files a dead process left in C{directory} (an inbound
    worker that crashed: its messages were never acknowledged, so the
    senders still hold them). Blocking, one C{listdir}.

    @param directory: the spool directory (C{""}: the system temp dir).
    @param pid: the dead process's id.
    @return: how many files were removed.
    """
    directory = directory or tempfile.gettempdir()
    prefix = f"gsmail-{pid}-"
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        if name.startswith(prefix) and name.endswith(".eml"):
            remove(os.path.join(directory, name))
            removed += 1
    return removed


def remove(path: str) -> None:
    """Remove a spool file; a file already gone is not an error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _message_id(header: bytes) -> str | None:
    """
    The stripped Message-ID of a header section (LF line endings), or
    C{None}: the first C{Message-ID} field, unfolded, whitespace runs made
    one space; as C{email}'s compat32 parser reads it (each byte beyond
    ASCII becomes U+FFFD), without parsing the other fields.
    """
    found = _MESSAGE_ID.search(header)
    if found is None:
        return None
    if _NOT_A_FIELD.search(header, 0, found.start()):
        # The header section ended (a line that is no field) before it.
        return None
    value = found.group(1).decode("ascii", "replace")
    text = " ".join(value.split())
    return text or None


# A Received field (at the start of a line of the header section).
_RECEIVED = re.compile(rb"^received:", re.I | re.M)
# The first Message-ID field, with its continuation lines.
_MESSAGE_ID = re.compile(rb"^message-id:([^\n]*(?:\n[ \t][^\n]*)*)", re.I | re.M)
# A line that is neither a field, a continuation nor a From_ line: the
# compat32 parser's header section ends there (its headerRE).
_NOT_A_FIELD = re.compile(rb"^(?!From |[\x21-\x39\x3b-\x7e]*:|[\t ])[^\n]*\n", re.M)

_counter = itertools.count()


def _create(directory: str) -> tuple[int, str]:
    """
    A new spool file in C{directory}, opened for writing: named by process
    and a counter (cheaper than L{tempfile.mkstemp}'s random names), created
    exclusively, so a name left by an earlier process with the same id is
    skipped.

    @raise OSError: it could not be created.
    """
    pid = os.getpid()
    for _ in range(CREATE_ATTEMPTS):
        path = os.path.join(directory, f"gsmail-{pid}-{next(_counter)}.eml")
        try:
            fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        return fd, path
    raise FileExistsError(errno.EEXIST, f"{CREATE_ATTEMPTS} spool file names taken", directory)
