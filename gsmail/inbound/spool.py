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
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import tempfile

import attrs

__all__ = ["Spool", "SpoolFiles", "SpooledMessage", "release"]

#: The header section kept in memory to find the Message-ID, in bytes.
MAX_HEADER_BYTES = 256 * 1024
#: Bytes gathered before one write(2) and digest update.
WRITE_CHUNK = 256 * 1024
#: Messages up to this size (bytes) are also kept in memory, so posting them
#: does not read the file back.
MEMORY_COPY = 64 * 1024


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

    @param directory: where the file is made (C{""}: the system temp dir).
    @param files: reuse a file of this L{SpoolFiles} instead (C{directory}
        is then not used).
    """

    def __init__(self, directory: str = "", files: SpoolFiles | None = None) -> None:
        if files is not None:
            fd, self.path = files.take()
        else:
            fd, self.path = _create(directory or tempfile.gettempdir())
        self._files = files
        self._file = os.fdopen(fd, "wb", buffering=0, closefd=files is None)
        self._small: bytes | None = None
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._digest = hashlib.sha256()
        self.size = 0
        self._header = bytearray()
        self._header_done = False
        self._closed = False

    def write(self, data: bytes) -> None:
        """
        Append C{data}, message bytes with LF line endings.
        """
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
            self._file.write(chunk)
            if last and len(chunk) == self.size <= MEMORY_COPY:
                self._small = chunk

    def finish(self) -> SpooledMessage:
        """
        Close the file and describe it. The caller owns the file from here
        (remove it with L{remove}).
        """
        self._flush(last=True)
        self._file.close()
        self._closed = True
        return SpooledMessage(
            path=self.path,
            size=self.size,
            message_id=_message_id(bytes(self._header)),
            digest=self._digest.hexdigest(),
            data=self._small if self.size else b"",
            files=self._files,
        )

    def discard(self) -> None:
        """Drop the data and remove the file (or give it back)."""
        if not self._closed:
            self._pending.clear()
            self._file.close()
            self._closed = True
        if self._files is not None:
            self._files.release(self.path)
        else:
            remove(self.path)


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
            if os.fstat(fd).st_nlink:  # not removed by hand meanwhile
                self._taken[path] = fd
                return fd, path
            os.close(fd)
        fd, path = _create(self.directory)
        self._taken[path] = fd
        return fd, path

    def release(self, path: str) -> None:
        """
        The message in C{path} is done with: keep the file, emptied, for the
        next one, or remove it (too many kept, closed, not one of ours).
        """
        fd = self._taken.pop(path, None)
        if fd is None:
            remove(path)
            return
        if len(self._free) < self._keep:
            try:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
            except OSError:
                pass
            else:
                self._free.append((fd, path))
                return
        os.close(fd)
        remove(path)

    def close(self) -> None:
        """Remove the free files; files still taken are removed when released."""
        self._keep = 0
        free, self._free = self._free, []
        for fd, path in free:
            os.close(fd)
            remove(path)


def release(message: SpooledMessage) -> None:
    """Give a received message's file back to its L{SpoolFiles}, or remove it."""
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
    while True:
        path = os.path.join(directory, f"gsmail-{pid}-{next(_counter)}.eml")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        return fd, path
