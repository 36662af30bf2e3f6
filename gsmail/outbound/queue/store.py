# -*- test-case-name: tests.outbound.test_queue,tests.outbound.test_signing_queue -*-
"""
The outbound queue's files: the directory layout, the file-system calls
that change it (L{FileOps}), the lock that keeps a second process out, and
the blocking jobs that write, rewrite and remove a message's files in the
order its durability depends on. Every function here blocks: the queue
(L{gsmail.outbound.queue.OutboundQueue}) runs them in its C{sync} hand-off,
or at load. What the files hold is L{gsmail.outbound.queue.envelope}'s;
when to write them (locks, group commit, memory) is the queue's.

Layout under the queue directory::

    lock              flock(2)ed by the process that has the queue loaded
    tmp/<id>.data     a message being written (a crash leaves it: garbage)
    tmp/<id>.env      an envelope being written (likewise)
    data/<id>         the message, byte for byte as given, one file each
    env/<id>.json     its envelope (L{Envelope}, JSON), one file each
    journal/<id>      recipient outcomes recorded since the envelope was last
                      written (appended, one JSON line each; may be absent)
    corrupt/          envelopes that cannot be used, with their data, for the operator

A message exists if and only if its envelope is in C{env/}. Data without an
envelope is garbage from a crash and is removed at load once it is older
than a minute; an envelope without its data (or with data of the wrong
size, or that does not parse) is corrupt: logged and moved to C{corrupt/}
(L{gsmail.outbound.queue.load}). A message is held by a field of its
envelope, not a marker file, so one file holds the whole truth about it.

Durability (L{store_message}, before the submission listener says 250):

  1. create C{tmp/<id>.data} with C{O_EXCL}, write, C{fsync} it, close;
  2. rename it to C{data/<id>}, C{fsync} the directory C{data/};
  3. create C{tmp/<id>.env}, write the envelope, C{fsync} it, close;
  4. rename it to C{env/<id>.json}, C{fsync} the directory C{env/};
  5. only then does the queue's Deferred fire.

(Writes go through C{os.write}, so there is no user-space buffer to flush.)
C{data/} is fsynced before the envelope is renamed into C{env/}, not after,
so that even on a file system that does not order renames across directories
an envelope on disk always has its data: a power cut leaves either the whole
message or garbage, never a corrupt envelope. Updates rewrite the envelope the
same way (L{rewrite_envelope}: temporary file, fsync, rename over the old
one, fsync C{env/}); removal (L{remove_message}) unlinks the envelope,
fsyncs C{env/}, then unlinks the data (and the journal) and fsyncs C{data/}.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from typing import Final

import attrs
from twisted.internet.defer import Deferred, maybeDeferred

from gsmail.outbound.queue.envelope import Envelope, encode_envelope

__all__ = [
    "FileOps",
    "QueueClosedError",
    "QueueDirs",
    "QueueLockedError",
    "Sync",
    "append_journals",
    "discard",
    "free_name",
    "lock_queue",
    "read_source",
    "remove_message",
    "rewrite_envelope",
    "run_inline",
    "store_message",
    "unlink_missing_ok",
    "write_file",
]

_COPY_CHUNK: Final = 1 << 20

Sync = Callable[[Callable[[], None]], Deferred[None]]


class QueueLockedError(OSError):
    """
    Another process (or another L{gsmail.outbound.queue.OutboundQueue} in
    this one) has the queue directory loaded. Two writers would not see each other's changes, so
    only one may; tools that merely list the queue use
    L{gsmail.outbound.queue.load.read_queue}.
    """


class QueueClosedError(RuntimeError):
    """
    The queue was used before L{gsmail.outbound.queue.OutboundQueue.load}
    or after L{gsmail.outbound.queue.OutboundQueue.close}. The submission
    listener answers C{451 4.3.0}.
    """


class FileOps:
    """
    The file-system calls that change the queue, one method each, so a test
    can record their order or make one of them fail (a crash point). The
    methods run in the C{sync} hand-off; reads use C{os} and C{open} directly.
    """

    def create(self, path: str, *, exclusive: bool = True) -> int:
        """
        Open a new file for writing (mode 0600).

        @param exclusive: fail with C{FileExistsError} if C{path} exists;
            else truncate it.
        @return: the file descriptor.
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        flags |= os.O_EXCL if exclusive else os.O_TRUNC
        return os.open(path, flags, 0o600)

    def write(self, fd: int, data: bytes) -> None:
        """
        Write all of C{data}, however many C{write(2)} calls it takes.
        """
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def fsync(self, fd: int) -> None:
        """
        Flush a file's data and metadata to the disk.
        """
        os.fsync(fd)

    def close(self, fd: int) -> None:
        """
        Close a file descriptor.
        """
        os.close(fd)

    def rename(self, source: str, destination: str) -> None:
        """
        Atomically give C{source} the name C{destination}, replacing it.
        """
        os.replace(source, destination)

    def unlink(self, path: str) -> None:
        """
        Remove a name.
        """
        os.unlink(path)

    def link(self, source: str, destination: str) -> None:
        """
        Make a hard link; fails with C{FileExistsError} if C{destination} exists.
        """
        os.link(source, destination)

    def touch(self, path: str, when: float) -> None:
        """
        Set a file's access and modification times (seconds since the epoch).
        """
        os.utime(path, (when, when))

    def append(self, path: str) -> int:
        """
        Open a journal for appending, creating it (mode 0600) if needed.

        @return: the file descriptor.
        """
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def truncate(self, fd: int, size: int) -> None:
        """
        Cut an open file to C{size} bytes (an emptied journal, a torn tail).
        """
        os.ftruncate(fd, size)

    def fsync_dir(self, path: str) -> None:
        """
        Make the names created, renamed or removed in a directory durable.
        """
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def run_inline(f: Callable[[], None]) -> Deferred[None]:
    """
    The default C{sync}: run the blocking callable now (tests, tools).
    """
    return maybeDeferred(f)


@attrs.frozen
class QueueDirs:
    """
    The directories of a queue (absolute paths; see the module docstring).
    """

    root: str
    tmp: str
    data: str
    env: str
    corrupt: str
    journal: str

    @classmethod
    def under(cls, directory: str) -> QueueDirs:
        """
        The layout under C{directory} (made absolute).
        """
        root = os.path.abspath(directory)
        return cls(
            root=root,
            tmp=os.path.join(root, "tmp"),
            data=os.path.join(root, "data"),
            env=os.path.join(root, "env"),
            corrupt=os.path.join(root, "corrupt"),
            journal=os.path.join(root, "journal"),
        )


def write_file(
    ops: FileOps, path: str, source: bytes | str, offset: int, *, exclusive: bool = True
) -> int:
    """
    Create C{path}, fill it from C{source} (bytes, or the file at that path
    from byte C{offset}), fsync and close it. On failure the file is unlinked.

    @return: the number of bytes written.
    """
    fd = ops.create(path, exclusive=exclusive)
    try:
        size = 0
        if isinstance(source, bytes):
            ops.write(fd, source)
            size = len(source)
        else:
            with open(source, "rb") as f:
                f.seek(offset)
                while chunk := f.read(_COPY_CHUNK):
                    ops.write(fd, chunk)
                    size += len(chunk)
        ops.fsync(fd)
    except BaseException:
        try:
            ops.close(fd)
        finally:
            discard(ops, path, None)
        raise
    ops.close(fd)
    return size


def read_source(source: bytes | str, offset: int) -> bytes:
    """A message given as bytes, or as a file to read from byte C{offset} (blocking)."""
    if isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        f.seek(offset)
        return f.read()


def discard(ops: FileOps, path: str, directory: str | None) -> None:
    """
    Best-effort removal of a file being given up on (and, if C{directory}
    is given, of its name from the disk).
    """
    try:
        ops.unlink(path)
        if directory is not None:
            ops.fsync_dir(directory)
    except OSError:
        pass  # left for load() to clean up (data) or deliver (an envelope)


def unlink_missing_ok(ops: FileOps, path: str) -> None:
    """Unlink C{path}; a name already gone is no error."""
    try:
        ops.unlink(path)
    except FileNotFoundError:
        pass


def free_name(path: str) -> str:
    """C{path}, or C{path.N}: a name in C{corrupt/} not taken yet (with its C{.data})."""
    candidate, n = path, 0
    while os.path.lexists(candidate) or os.path.lexists(candidate + ".data"):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def lock_queue(path: str) -> int:
    """
    Open and C{flock(2)} the queue's C{lock} file, without waiting.

    @return: the file descriptor, to close when the queue is closed.
    @raise QueueLockedError: another process (or queue) holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise QueueLockedError(
            errno.EWOULDBLOCK, "outbound queue in use by another process", path
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def store_message(
    ops: FileOps,
    dirs: QueueDirs,
    envelope: Envelope,
    source: bytes | str,
    offset: int,
    after_durable: Callable[[], None] | None = None,
) -> None:
    """
    Write a new message and its envelope, steps 1 to 4 of the module
    docstring; C{envelope.size} is set to the bytes written. On failure
    nothing is left queued (best effort: leftovers are load's).

    @param source: the message, or the path of a file to copy from byte
        C{offset}.
    @param after_durable: called once the envelope is durable; if it
        raises, the message is removed again.
    """
    qid = envelope.id
    tmp_data = os.path.join(dirs.tmp, qid + ".data")
    tmp_env = os.path.join(dirs.tmp, qid + ".env")
    final_data = os.path.join(dirs.data, qid)
    final_env = os.path.join(dirs.env, qid + ".json")
    envelope.size = write_file(ops, tmp_data, source, offset)
    ops.rename(tmp_data, final_data)
    try:
        ops.fsync_dir(dirs.data)
        write_file(ops, tmp_env, encode_envelope(envelope), 0)
        ops.rename(tmp_env, final_env)
        try:
            ops.fsync_dir(dirs.env)
            if after_durable is not None:
                after_durable()
        except BaseException:
            discard(ops, final_env, dirs.env)
            raise
    except BaseException:
        discard(ops, final_data, None)
        raise


def rewrite_envelope(
    ops: FileOps, dirs: QueueDirs, qid: str, data: bytes, fds: dict[str, int], journal: str | None
) -> None:
    """
    Replace the envelope of C{qid} with C{data} (temporary file, fsync,
    rename, fsync of C{env/}), then empty its journal at C{journal}, if it
    has one, whose records C{data} includes (its descriptor is kept in
    C{fds}).
    """
    tmp = os.path.join(dirs.tmp, qid + ".env")
    final = os.path.join(dirs.env, qid + ".json")
    write_file(ops, tmp, data, 0, exclusive=False)
    ops.rename(tmp, final)
    ops.fsync_dir(dirs.env)
    if journal is not None:
        # A crash before this replays only records newer than the
        # envelope's journal_seq: none.
        fd = fds.get(qid)
        if fd is None:
            fd = fds[qid] = ops.append(journal)
        ops.truncate(fd, 0)
        ops.fsync(fd)


def remove_message(
    ops: FileOps,
    dirs: QueueDirs,
    qid: str,
    fd: int | None,
    journal: str | None,
    gone: list[bool],
) -> None:
    """
    Remove the files of C{qid}: close its journal's descriptor C{fd}, unlink
    the envelope (then C{gone} gets C{True}: the message no longer exists),
    fsync C{env/}, unlink the journal at C{journal} and the data, fsync
    C{data/}.
    """
    if fd is not None:
        ops.close(fd)
    unlink_missing_ok(ops, os.path.join(dirs.env, qid + ".json"))
    gone.append(True)
    ops.fsync_dir(dirs.env)
    if journal is not None:
        # No fsync of journal/: should the name come back after a
        # crash, load removes a journal without an envelope.
        unlink_missing_ok(ops, journal)
    unlink_missing_ok(ops, os.path.join(dirs.data, qid))
    ops.fsync_dir(dirs.data)


def append_journals(
    ops: FileOps,
    directory: str,
    fds: dict[str, int],
    data: dict[str, bytes],
    existing: set[str],
) -> None:
    """
    Append C{data} (records, per queue id) to the journals in C{directory},
    then fsync each, and the directory when a journal was created (one not
    in C{existing}). Descriptors opened are kept in C{fds}.
    """
    created = False
    for qid in data:
        fd = fds.get(qid)
        if fd is None:
            fd = fds[qid] = ops.append(os.path.join(directory, qid))
            created = created or qid not in existing
        ops.write(fd, data[qid])
    for qid in data:
        ops.fsync(fds[qid])
    if created:
        ops.fsync_dir(directory)  # the new journals' names
