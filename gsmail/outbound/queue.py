# -*- test-case-name: tests.outbound.test_queue -*-
"""
The outbound queue: where a message submitted for delivery waits, on disk,
until every recipient is delivered, failed or expired.

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
envelope is garbage from a crash and is removed by L{OutboundQueue.load} once
it is older than a minute; an envelope without its data (or with data of the
wrong size, or that does not parse) is corrupt: logged and moved to
C{corrupt/}. A message is held by a field of its envelope, not a marker file,
so one file holds the whole truth about it.

The envelope format grows compatibly: fields added later (a recipient's
C{notify} and C{orcpt}, the message's C{delay_warned}) are written only when
set and read with their defaults when absent, so envelopes of older versions
load unchanged (their DSN parameters, which were kept among the MAIL
parameters as C{NOTIFY:<address>}, are taken from there), and older
versions, which ignore fields they do not know, load the new ones.

Durability (L{OutboundQueue.enqueue}, before the submission listener says 250):

  1. create C{tmp/<id>.data} with C{O_EXCL}, write, C{fsync} it, close;
  2. rename it to C{data/<id>}, C{fsync} the directory C{data/};
  3. create C{tmp/<id>.env}, write the envelope, C{fsync} it, close;
  4. rename it to C{env/<id>.json}, C{fsync} the directory C{env/};
  5. only then does the returned Deferred fire.

(Writes go through C{os.write}, so there is no user-space buffer to flush.)
C{data/} is fsynced before the envelope is renamed into C{env/}, not after,
so that even on a file system that does not order renames across directories
an envelope on disk always has its data: a power cut leaves either the whole
message or garbage, never a corrupt envelope. Updates rewrite the envelope the
same way (temporary file, fsync, rename over the old one, fsync C{env/});
removal unlinks the envelope, fsyncs C{env/}, then unlinks the data (and the
journal) and fsyncs C{data/}.

Recipient outcomes (L{OutboundQueue.record}, after each transaction) are not
written into the envelope, which would make a message to n members cost
O(n^2) bytes written: each is appended to the message's journal as one line,
C{[seq, index, state, attempts, next_attempt, last_reply]}, with absolute
values. Records of every message that arrive while a write is running are
written together by the next one (group commit: one hand-off, one C{fsync}
per journal, and one of C{journal/} when a journal was created). The envelope
file carries C{journal_seq}, the last record it already includes; loading
replays the journal's later records over it, in order, and ignores the
others, so a crash between rewriting an envelope and emptying its journal
replays nothing stale. A torn last line (a crash during an append, never
acknowledged) is cut off at load. When a journal holds more than two records
per recipient (retries), the envelope is rewritten and the journal emptied,
so a journal stays O(n) and loading O(queue).

DKIM (L{gsmail.signing}): a message queued with C{sign=True} is signed in
the job that writes it, before its envelope exists, and its signature
fields are written at the top of C{data/<id>}: every copy (one per VERP
recipient: the VERP sender is envelope-only) and every delivery after a
restart sends the same signed bytes. When the signing domain's key cannot be
used, the message is queued unsigned with C{sign_pending} set: delivery
leaves it alone and calls L{OutboundQueue.resign} until the key works. That
writes the signed message as a new queued message (a new id, C{replaces}
naming the old one, created, recipients and their states copied), fsynced,
then removes the old one; a crash in between leaves both, and L{load} keeps
the new one and removes the one it replaces. So the message is never lost,
never sent unsigned, and never sent twice.

The at-least-once windows (where SMTP itself allows no better):
  - a crash after step 4 but before the sender reads our 250: the message is
    queued and will be delivered, and the sender, having no 250, sends it
    again. Two copies go out.
  - a crash (or lost reply) after a remote server accepted a recipient but
    before L{OutboundQueue.record} made it durable: that recipient gets it
    again. The delivery side keeps this window short by recording after each
    transaction and waiting for the record before the next one.

All blocking disk work runs in the C{sync} hand-off (a thread in the service,
inline in tests), except L{OutboundQueue.load}, which runs at start-up before
the reactor. The reactor thread keeps the envelopes in memory; a job in the
thread only ever sees bytes already serialised, or an envelope nobody else
can see yet. Writes of one envelope are serialised by a lock per message,
concurrent L{OutboundQueue.update} calls of one envelope share writes, and a
journal write never runs at the same time as an envelope rewrite or removal
(which empty or remove journals).
"""

from __future__ import annotations

import email.utils
import errno
import fcntl
import json
import math
import os
import re
import secrets
import stat
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
from twisted.internet.defer import Deferred, DeferredLock, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail.outbound.dsn import parse_notify, parse_orcpt

__all__ = [
    "DELIVERED",
    "EXPIRED",
    "FAILED",
    "FINAL_STATES",
    "PENDING",
    "Envelope",
    "FileOps",
    "NoSuchMessageError",
    "OutboundQueue",
    "QueueClosedError",
    "QueueLockedError",
    "RecipientDSN",
    "RecipientState",
    "read_queue",
]

#: Recipient states. Only C{PENDING} recipients are ever tried again.
PENDING: Final = "pending"
DELIVERED: Final = "delivered"
FAILED: Final = "failed"
EXPIRED: Final = "expired"
FINAL_STATES: Final = frozenset({DELIVERED, FAILED, EXPIRED})
_STATES: Final = frozenset({PENDING}) | FINAL_STATES

#: Leftovers younger than this (seconds) are kept by L{OutboundQueue.load}:
#: they may belong to a writer that is still at work.
GRACE: Final = 60.0
#: zope.sendmail's C{MAX_SEND_TIME}: a C{.sending-} claim younger than this
#: (seconds) means its queue processor may be sending the file right now.
ZOPE_MAX_SEND_TIME: Final = 3 * 3600

_COPY_CHUNK: Final = 1 << 20
_MAX_ENVELOPE: Final = 64 << 20
#: A journal longer than this (bytes) is not replayed (corrupt).
_MAX_JOURNAL: Final = 256 << 20
#: Journal records per recipient beyond which the envelope is rewritten.
_COMPACT_PER_RECIPIENT: Final = 2
_COMPACT_SLACK: Final = 32
_ZOPE_LINE_MAX: Final = 4 << 20
_FORMAT: Final = 1
_ID_RE: Final = re.compile(r"\A[0-9a-f]{16}-[0-9a-f]{8}\Z")
_FORBIDDEN: Final = re.compile(r"[\x00\r\n]")
_json_string: Final = json.encoder.encode_basestring_ascii
_ZOPE_FROM: Final = b"X-Zope-From: "
_ZOPE_TO: Final = b"X-Zope-To: "

Sync = Callable[[Callable[[], None]], Deferred[None]]
#: Signs a message (L{gsmail.signing.DKIMSigner.queue_signer}): given its
#: bytes and its envelope sender, returns the header fields to put before it
#: (C{b""}: not signed) and a warning to log (C{""}: none); raises when the
#: message must wait (a key that cannot be used), with a one-line reason.
Signer = Callable[[bytes, str], tuple[bytes, str]]
#: Per recipient, in order: its C{NOTIFY} (normalised) and C{ORCPT} (decoded)
#: parameters, C{""} when not given (L{OutboundQueue.enqueue}'s C{dsn}).
RecipientDSN = tuple[str, str]


@attrs.define
class RecipientState:
    """
    One recipient of a queued message and how its delivery stands.

    @ivar address: the recipient's address, as submitted (no angle brackets).
    @ivar state: L{PENDING}, L{DELIVERED}, L{FAILED} (a 5xx reply) or
        L{EXPIRED} (still transient at the end of the queue lifetime).
    @ivar attempts: delivery attempts made so far.
    @ivar next_attempt: when to try next, in seconds since the epoch.
    @ivar last_reply: the last reply or error, e.g. C{"451 4.4.1 No answer"},
        for the DSN and the queue listing.
    @ivar notify: the C{NOTIFY} parameter it was submitted with (RFC 3461
        §4.1), normalised (L{gsmail.outbound.dsn.parse_notify}: C{"NEVER"},
        C{"SUCCESS,FAILURE"}, ...), or C{""} when none was given.
    @ivar orcpt: its C{ORCPT} parameter (RFC 3461 §4.2), decoded
        (L{gsmail.outbound.dsn.parse_orcpt}: C{"rfc822;a@example.org"}), or
        C{""}.
    """

    address: str
    state: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""
    notify: str = ""
    orcpt: str = ""


@attrs.define
class Envelope:
    """
    A queued message: who sent it, to whom, and how far its delivery got.
    The message itself is in the file L{OutboundQueue.data_path} names.

    @ivar id: the queue id: time-ordered, unique, safe as a file name.
    @ivar sender: the envelope sender; C{""} is the null sender (a bounce:
        no DSN is ever sent for it).
    @ivar recipients: one L{RecipientState} per recipient, in submitted order.
    @ivar xverp: each recipient gets its own VERP sender
        (L{gsmail.addresses.encode_xverp}), as Postfix's XVERP does.
    @ivar created: when it was queued, seconds since the epoch; the queue
        lifetime counts from here.
    @ivar held: an operator put it on hold: nothing is delivered until released.
    @ivar size: the length of the message in bytes.
    @ivar dsn_sent: a DSN about its failed recipients has been queued.
    @ivar params: MAIL FROM parameters to keep, e.g. C{{"BODY": "8BITMIME",
        "SMTPUTF8": ""}}; the DSN ones (RFC 3461) are C{"RET"} (C{FULL} or
        C{HDRS}) and C{"ENVID"} (as received: xtext).
    @ivar origin: where it came from when not submitted over SMTP, e.g.
        C{"zope.sendmail:<file name>"} for an imported zope.sendmail file
        (lets a re-run of the import see it was already done); else C{""}.
    @ivar delay_warned: the delay warning (RFC 3464 C{Action: delayed}) for
        its recipients still pending at C{delay_warning_time} was queued;
        none is sent again.
    @ivar sign_pending: it was to be DKIM-signed when queued, but the key
        could not be used: it is not delivered until L{OutboundQueue.resign}
        has signed it.
    @ivar replaces: the id of the unsigned message this signed one replaces
        (L{OutboundQueue.resign}); C{""} for any other.
    """

    id: str
    sender: str
    recipients: list[RecipientState]
    xverp: bool
    created: float
    held: bool = False
    size: int = 0
    dsn_sent: bool = False
    params: dict[str, str] = attrs.Factory(dict)
    origin: str = ""
    delay_warned: bool = False
    sign_pending: bool = False
    replaces: str = ""

    def pending(self) -> list[RecipientState]:
        """
        The recipients still to be delivered.
        """
        return [r for r in self.recipients if r.state == PENDING]


class NoSuchMessageError(LookupError):
    """
    No message with this id is in the queue: it was never there, or it was
    removed or deleted meanwhile (an operator's L{OutboundQueue.delete} while
    a delivery was running). The delivery side drops its work on it.
    """


class QueueLockedError(OSError):
    """
    Another process (or another L{OutboundQueue} in this one) has the queue
    directory loaded. Two writers would not see each other's changes, so
    only one may; tools that merely list the queue use L{read_queue}.
    """


class QueueClosedError(RuntimeError):
    """
    The queue was used before L{OutboundQueue.load} or after
    L{OutboundQueue.close}. The submission listener answers C{451 4.3.0}.
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


def _run_inline(f: Callable[[], None]) -> Deferred[None]:
    """
    The default C{sync}: run the blocking callable now (tests, tools).
    """
    return maybeDeferred(f)


class OutboundQueue:
    """
    The durable outbound queue (see the module docstring for the layout and
    the durability protocol).

    Envelopes returned by L{get}, L{envelopes}, L{due} and L{enqueue} are the
    queue's own objects: the delivery side changes their recipients' states
    in place and then calls L{record} (those recipients) or L{update} (the
    whole envelope) with the same object to make the change durable.

    @ivar directory: the queue directory (absolute).
    """

    log = Logger()

    def __init__(
        self,
        directory: str,
        *,
        clock: IReactorTime,
        sync: Sync | None = None,
        file_ops: FileOps | None = None,
        journal_sync: Sync | None = None,
        signer: Signer | None = None,
    ) -> None:
        """
        @param directory: the queue directory; L{load} creates it.
        @param clock: time source for queue ids, C{created} and leftover ages.
        @param sync: runs a blocking callable (writes, fsyncs, copies) off the
            reactor and returns a Deferred that fires when it has returned,
            e.g. C{lambda f: deferToThreadPool(reactor, reactor.getThreadPool(), f)}.
            C{None} runs it inline, blocking (tests and command-line tools).
        @param file_ops: the file-system calls that change the queue; tests
            pass one that records or fails them. C{None}: the real ones.
        @param journal_sync: runs the journal appends (the group commits of
            recipient outcomes, one or more per transaction delivered), one
            at a time, e.g. a L{gsmail.handoff.SerialThread}: a cheaper
            hand-off than a thread pool's for this, the busiest job by far.
            C{None}: C{sync}.
        @param signer: DKIM-signs the messages queued with C{sign=True}
            (in the C{sync} hand-off); C{None}: none is signed.
        """
        self.directory = os.path.abspath(directory)
        self._tmp = os.path.join(self.directory, "tmp")
        self._data = os.path.join(self.directory, "data")
        self._env = os.path.join(self.directory, "env")
        self._corrupt = os.path.join(self.directory, "corrupt")
        self._journal = os.path.join(self.directory, "journal")
        self._clock = clock
        self._sync: Sync = _run_inline if sync is None else sync
        self._journal_sync: Sync = self._sync if journal_sync is None else journal_sync
        self._ops = FileOps() if file_ops is None else file_ops
        self._signer = signer
        self._envelopes: dict[str, Envelope] = {}
        self._locks: dict[str, DeferredLock] = {}
        # Per message: update generations asked for and written (coalescing).
        self._requested: dict[str, int] = {}
        self._written: dict[str, int] = {}
        # Journals. _seq: the last record number given out per message;
        # _lines: records in each journal file on disk (present = the file
        # exists); _fds: journals kept open (used only by one job at a time:
        # _journal_lock); _waiting: records not written yet, with the
        # Deferreds of their callers; _broken: a write failed, the file may
        # end in a torn line: the next record rewrites the envelope instead.
        self._seq: dict[str, int] = {}
        self._lines: dict[str, int] = {}
        self._fds: dict[str, int] = {}
        self._waiting: dict[str, tuple[list[bytes], list[Deferred[None]]]] = {}
        self._broken: set[str] = set()
        self._positions: dict[str, dict[int, int]] = {}
        self._journal_lock = DeferredLock()
        self._flushing = False
        self._watchers: list[Callable[[Envelope], None]] = []
        self._last_id_us = 0
        self._lock_fd: int | None = None
        self._open = False
        self._closed = False
        self._busy = 0
        self._idle: list[Deferred[None]] = []

    def __repr__(self) -> str:
        return f"<OutboundQueue {self.directory!r} {len(self._envelopes)} messages>"

    # -- start and stop --------------------------------------------------

    def load(self) -> None:
        """
        Create the directories, lock the queue, read every envelope, move the
        corrupt ones to C{corrupt/}, remove crash leftovers older than a minute
        (in C{tmp/}, and data without an envelope) and log the counts.
        Blocking: call it at start-up, before the reactor runs.

        @raise QueueLockedError: another process has the queue loaded.
        @raise OSError: the directory cannot be created or read; gsmail must
            not accept mail for a queue it cannot write.
        @raise RuntimeError: called twice.
        """
        if self._open or self._closed:
            raise RuntimeError("OutboundQueue.load() called twice, or after close()")
        for path in (
            self.directory,
            self._tmp,
            self._data,
            self._env,
            self._corrupt,
            self._journal,
        ):
            os.makedirs(path, mode=0o700, exist_ok=True)
        self._lock_fd = _lock(os.path.join(self.directory, "lock"))
        try:
            self._scan()
        except BaseException:
            self._close_journals()
            os.close(self._lock_fd)
            self._lock_fd = None
            raise
        self._open = True

    def close(self) -> Deferred[None]:
        """
        Refuse new work, wait for the disk work in flight, release the lock.

        @return: fires when closed (at once when nothing was in flight).
        """
        self._closed = True
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        self._check_idle()
        return d

    # -- reading (in memory, no disk access) -----------------------------

    def data_path(self, id: str) -> str:
        """
        The file holding the message of queue id C{id}, byte for byte as
        submitted; open it for reading only.

        @raise ValueError: C{id} is not a queue id (no path outside the queue).
        """
        _check_id(id)
        return os.path.join(self._data, id)

    def get(self, id: str) -> Envelope | None:
        """
        The envelope of queue id C{id}, or C{None} if it is not queued.
        """
        return self._envelopes.get(id)

    def watch(self, observer: Callable[[Envelope], None]) -> None:
        """
        Have C{observer} called with each message queued from now on, once it
        is durable and before L{enqueue}'s Deferred fires (the delivery side
        learns of new mail without scanning the queue).
        """
        self._watchers.append(observer)

    def envelopes(self) -> list[Envelope]:
        """
        Every queued envelope, held ones included, oldest first.
        """
        return sorted(self._envelopes.values(), key=lambda e: (e.created, e.id))

    def due(self, now: float) -> list[tuple[Envelope, list[RecipientState]]]:
        """
        What to deliver now: for each message not held, oldest first, its
        pending recipients whose C{next_attempt} is at or before C{now}.
        Messages with none are left out.

        @param now: seconds since the epoch.
        """
        result = []
        for envelope in self.envelopes():
            if envelope.held:
                continue
            ready = [r for r in envelope.recipients if r.state == PENDING and r.next_attempt <= now]
            if ready:
                result.append((envelope, ready))
        return result

    def next_wakeup(self) -> float | None:
        """
        The earliest C{next_attempt} of a pending recipient of a message not
        held (seconds since the epoch; may be in the past), or C{None} when
        there is nothing to deliver.
        """
        times = [
            r.next_attempt
            for e in self._envelopes.values()
            if not e.held
            for r in e.recipients
            if r.state == PENDING
        ]
        return min(times, default=None)

    # -- changing the queue -------------------------------------------------

    def enqueue(
        self,
        sender: str,
        recipients: list[str],
        data: bytes | str,
        *,
        xverp: bool = False,
        params: dict[str, str] | None = None,
        dsn: Sequence[RecipientDSN] | None = None,
        sign: bool = False,
    ) -> Deferred[Envelope]:
        """
        Queue a message durably. The returned Deferred fires only once the
        data, the envelope and both directory entries are fsynced, so the
        submission listener may say C{250} then and not before.

        @param sender: the envelope sender, C{""} for the null sender.
        @param recipients: at least one address; each becomes a L{PENDING}
            recipient due at once.
        @param data: the message as bytes, or the path of a file to copy
            (e.g. the spool file, which may be removed after this fires).
            Stored exactly as given.
        @param xverp: deliver with a VERP sender per recipient.
        @param params: MAIL FROM parameters to keep (copied).
        @param dsn: per recipient, in the order of C{recipients}, its
            C{NOTIFY} and C{ORCPT} parameters (RFC 3461 §4.1, §4.2) as
            L{gsmail.outbound.dsn.parse_notify} and
            L{gsmail.outbound.dsn.parse_orcpt} return them, C{""} when not
            given; C{None}: none for any.
        @param sign: DKIM-sign it with the queue's signer, if it has one
            (GroupServer's mail; not mail merely forwarded, such as a
            stranger's to postmaster). A key that cannot be used does not
            fail the call: the message is queued with C{sign_pending}.
        @return: fires with the new L{Envelope}; fails with C{ValueError}
            (no recipients, C{dsn} not one pair per recipient, or an address
            or parameter with CR, LF or NUL: C{501 5.5.4}), C{OSError} (disk:
            nothing is left queued, C{451 4.3.0}) or L{QueueClosedError}
            (C{451 4.3.0}).
        """
        return Deferred.fromCoroutine(
            self._enqueue(
                sender, recipients, data, 0, xverp=xverp, params=params, dsn=dsn, sign=sign
            )
        )

    def update(self, envelope: Envelope) -> Deferred[None]:
        """
        Make the current state of C{envelope} durable: the envelope file is
        rewritten (temporary file, fsync, rename, fsync of C{env/}).
        Concurrent calls for one message share writes: each call's Deferred
        fires after a write that began after the call.

        @param envelope: the queue's own object (from L{get}, L{due}, ...),
            changed in place.
        @return: fires when written; fails with L{NoSuchMessageError} (the
            message was removed or deleted meanwhile), C{ValueError} (a
            copy, not the queue's object), C{OSError} (the disk; memory keeps
            the new state, and the next successful update writes it) or
            L{QueueClosedError}.
        """
        return Deferred.fromCoroutine(self._update(envelope))

    def record(self, envelope: Envelope, recipients: Sequence[RecipientState]) -> Deferred[None]:
        """
        Make the current state of some recipients of C{envelope} durable:
        one line each is appended to the message's journal, written and
        fsynced together with the records of every other message that
        arrive meanwhile (group commit). Cheaper than L{update} by the size
        of the envelope: use it for delivery outcomes.

        @param envelope: the queue's own object, changed in place.
        @param recipients: objects of C{envelope.recipients}.
        @return: fires when the records are durable (the state on disk then
            is at least as new as it was at this call); fails with
            L{NoSuchMessageError} (the message was removed or deleted
            meanwhile), C{ValueError} (a copy, or a recipient that is not
            the envelope's), C{OSError} (the disk; memory keeps the state,
            and the next successful record or update writes it) or
            L{QueueClosedError}.
        """
        try:
            self._check_open()
            current = self._envelopes.get(envelope.id)
            if current is None:
                raise NoSuchMessageError(envelope.id)
            if current is not envelope:
                raise ValueError("record() takes the queue's own envelope object, not a copy")
            if envelope.id in self._broken:
                # The journal may end in a torn line: start over from a whole envelope.
                return self.update(envelope)
            lines = self._journal_lines(envelope, recipients)
        except Exception:
            return fail()
        d: Deferred[None] = Deferred()
        waiting = self._waiting.get(envelope.id)
        if waiting is None:
            self._waiting[envelope.id] = (lines, [d])
        else:
            waiting[0].extend(lines)
            waiting[1].append(d)
        if not self._flushing:
            self._flushing = True
            self._busy += 1  # close() waits for the records taken so far
            # In the next reactor turn: the records of every connection
            # that got its reply in this one go in the same write.
            self._clock.callLater(0, self._start_flush)
        return d

    def _start_flush(self) -> None:
        Deferred.fromCoroutine(self._flush_journals()).addErrback(
            lambda f: self.log.failure("Writing journals failed", f)
        )

    def remove(self, id: str) -> Deferred[None]:
        """
        Take a finished message off the queue: unlink its envelope, fsync
        C{env/}, unlink its data, fsync C{data/}.

        @return: fires when done; fails with C{ValueError} if a recipient is
            still L{PENDING} (use L{delete} to drop those),
            L{NoSuchMessageError} or C{OSError} (once the envelope is
            unlinked the message is gone from memory too).
        """
        return Deferred.fromCoroutine(self._remove(id, force=False))

    def delete(self, id: str) -> Deferred[None]:
        """
        Delete a message whatever its state (an operator's command, like
        C{postsuper -d}): pending recipients are dropped without a DSN.

        @return: as L{remove}, without the C{ValueError}.
        """
        return Deferred.fromCoroutine(self._remove(id, force=True))

    def hold(self, id: str) -> Deferred[None]:
        """
        Put a message on hold (C{postsuper -h}): L{due} and L{next_wakeup}
        ignore it until L{release}. A delivery already running finishes.

        @return: fires once the flag is durable; fails with
            L{NoSuchMessageError} or C{OSError} (memory has the flag anyway).
        """
        return Deferred.fromCoroutine(self._set_held(id, True))

    def release(self, id: str) -> Deferred[None]:
        """
        Release a held message: its pending recipients are due again at their
        C{next_attempt} (the delivery side may reset that for a flush).

        @return: as L{hold}.
        """
        return Deferred.fromCoroutine(self._set_held(id, False))

    def resign(self, envelope: Envelope) -> Deferred[Envelope]:
        """
        DKIM-sign a message queued with C{sign_pending} (its key could not be
        used then): the signed message is queued durably under a new id
        (C{replaces} naming the old one; sender, recipients and their states,
        creation time, hold and DSN flags copied), then the old message is
        removed. Watchers see the new message as if it had just been queued.

        @param envelope: the queue's own envelope, with C{sign_pending}.
        @return: fires with the new envelope (or C{envelope} itself if it
            needs no signing any more); fails with the signer's exception
            (the key still cannot be used: nothing changed), with
            L{NoSuchMessageError}, C{OSError} (disk; nothing changed, or the
            old message is left for L{load} to remove) or L{QueueClosedError}.
        """
        return Deferred.fromCoroutine(self._resign(envelope))

    def import_zope_sendmail(self, queuepath: str, *, xverp: bool) -> Deferred[int]:
        """
        Queue the messages waiting in a zope.sendmail queue directory (gs.email's
        C{queuepath}, a Maildir), so that nothing is lost when a site switches
        its outbound mail to gsmail.

        Files in C{new/} and C{cur/} are taken oldest first; dotfiles (claims,
        C{.rejected-} copies) and C{tmp/} are skipped. Each file starts with
        C{X-Zope-From: <addr>} and C{X-Zope-To: <addr>, <addr>} lines; those
        two lines are stripped and the rest is queued durably, exactly as
        stored. For each file:

          1. a C{.sending-<name>} claim younger than 3 hours (zope.sendmail's
             C{MAX_SEND_TIME}) means a zope.sendmail processor may be sending
             it now: the file is skipped (left for a later import); an older
             claim is stale and removed;
          2. the file is claimed as zope.sendmail does (touched, hard link
             C{.sending-<name>}), so a processor still running skips it;
          3. it is queued; after the envelope is fsynced, and before the
             message can be delivered, the file is unlinked and its directory
             fsynced; then the claim is removed.

        A crash after the envelope is durable but before the file is unlinked
        leaves both; the next import finds the envelope by its C{origin} and
        only unlinks the file. So an interrupted import imports each message
        once, as long as its envelope is still queued; the at-least-once window
        left is a zope.sendmail processor that sends a file whose claim is
        older than 3 hours. Files that are not zope.sendmail messages, or fail,
        are logged and left in place.

        @param queuepath: the zope.sendmail queue directory.
        @param xverp: queue the messages for delivery with XVERP (gs.email's
            C{xverp} setting).
        @return: fires with the number of messages queued; fails with
            C{FileNotFoundError} if C{queuepath} is not a directory.
        """
        return Deferred.fromCoroutine(self._import_zope(queuepath, xverp))

    # -- implementation -------------------------------------------------------

    def _check_open(self) -> None:
        if not self._open or self._closed:
            raise QueueClosedError("the outbound queue is not loaded")

    def _new_id(self, now: float) -> str:
        # Strictly increasing within the process, even with a frozen clock.
        us = max(int(now * 1_000_000), self._last_id_us + 1)
        self._last_id_us = us
        return f"{us:016x}-{secrets.token_hex(4)}"

    async def _run(self, job: Callable[[], None], sync: Sync | None = None) -> None:
        self._busy += 1
        try:
            await maybeDeferred(sync or self._sync, job)
        finally:
            self._busy -= 1
            self._check_idle()

    def _check_idle(self) -> None:
        if self._closed and self._busy == 0 and self._idle:
            self._close_journals()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            self._open = False
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    async def _enqueue(
        self,
        sender: str,
        recipients: list[str],
        source: bytes | str,
        offset: int,
        *,
        xverp: bool,
        params: dict[str, str] | None,
        dsn: Sequence[RecipientDSN] | None = None,
        origin: str = "",
        after_durable: Callable[[], None] | None = None,
        sign: bool = False,
    ) -> Envelope:
        self._check_open()
        if not isinstance(source, (bytes, str)):
            raise TypeError("data must be bytes or the path of a file")
        _check_address(sender, null=True)
        if not recipients:
            raise ValueError("a message needs at least one recipient")
        for address in recipients:
            _check_address(address, null=False)
        params = dict(params or {})
        for key, value in params.items():
            if not (isinstance(key, str) and isinstance(value, str)) or _FORBIDDEN.search(
                key + value
            ):
                raise ValueError("MAIL parameters must be text without CR, LF or NUL")
        pairs: Sequence[RecipientDSN] = [("", "")] * len(recipients) if dsn is None else dsn
        if len(pairs) != len(recipients):
            raise ValueError("dsn must give one (NOTIFY, ORCPT) pair per recipient")
        for pair in pairs:
            if not (
                isinstance(pair, tuple)
                and len(pair) == 2
                and all(isinstance(v, str) and not _FORBIDDEN.search(v) for v in pair)
            ):
                raise ValueError("NOTIFY and ORCPT must be text without CR, LF or NUL")
        now = self._clock.seconds()
        qid = self._new_id(now)
        envelope = Envelope(
            id=qid,
            sender=sender,
            recipients=[
                RecipientState(a, PENDING, next_attempt=now, notify=n, orcpt=o)
                for a, (n, o) in zip(recipients, pairs, strict=True)
            ],
            xverp=xverp,
            created=now,
            params=params,
            origin=origin,
        )
        ops = self._ops
        tmp_data = os.path.join(self._tmp, qid + ".data")
        tmp_env = os.path.join(self._tmp, qid + ".env")
        final_data = os.path.join(self._data, qid)
        final_env = os.path.join(self._env, qid + ".json")
        signer = self._signer if sign else None
        signing: list[str] = []  # the warning, or why it waits

        def job() -> None:
            # Nobody else sees this envelope until the job is done.
            if signer is not None:
                message = _read_source(source, offset)
                try:
                    prefix, warning = signer(message, sender)
                except Exception as e:
                    envelope.sign_pending = True
                    prefix, warning = b"", str(e) or e.__class__.__name__
                signing.append(warning)
                envelope.size = _write_file(ops, tmp_data, prefix + message, 0)
            else:
                envelope.size = _write_file(ops, tmp_data, source, offset)
            ops.rename(tmp_data, final_data)
            try:
                ops.fsync_dir(self._data)
                _write_file(ops, tmp_env, _encode(envelope), 0)
                ops.rename(tmp_env, final_env)
                try:
                    ops.fsync_dir(self._env)
                    if after_durable is not None:
                        after_durable()
                except BaseException:
                    _discard(ops, final_env, self._env)
                    raise
            except BaseException:
                _discard(ops, final_data, None)
                raise

        await self._run(job)
        self._envelopes[qid] = envelope
        if envelope.sign_pending:
            # A warning per message; the error, once per broken key, is
            # delivery's (OutboundDelivery._resign), which retries.
            self.log.warn(
                "Queued {queue_id} unsigned: {reason}; it is not sent until it can be DKIM-signed",
                queue_id=qid,
                reason=signing[0],
            )
        elif signing and signing[0]:
            self.log.warn("Queued {queue_id} unsigned: {reason}", queue_id=qid, reason=signing[0])
        for observer in self._watchers:
            try:
                observer(envelope)
            except Exception:
                self.log.failure("A queue observer failed on {queue_id}", queue_id=qid)
        self.log.info(
            "Queued {queue_id} from <{sender}> for {recipients} recipients, {size} bytes",
            queue_id=qid,
            sender=sender,
            recipients=len(recipients),
            size=envelope.size,
        )
        return envelope

    async def _acquire(self, qid: str) -> DeferredLock:
        lock = self._locks.setdefault(qid, DeferredLock())
        await lock.acquire()
        return lock

    def _release(self, qid: str, lock: DeferredLock) -> None:
        lock.release()
        if not lock.locked and not lock.waiting and self._locks.get(qid) is lock:
            del self._locks[qid]

    def _bump(self, qid: str) -> int:
        generation = self._requested[qid] = self._requested.get(qid, 0) + 1
        return generation

    async def _update(self, envelope: Envelope) -> None:
        self._check_open()
        current = self._envelopes.get(envelope.id)
        if current is None:
            raise NoSuchMessageError(envelope.id)
        if current is not envelope:
            raise ValueError("update() takes the queue's own envelope object, not a copy")
        generation = self._bump(envelope.id)
        lock = await self._acquire(envelope.id)
        try:
            await self._write_envelope(envelope.id, generation)
        finally:
            self._release(envelope.id, lock)

    async def _write_envelope(self, qid: str, generation: int) -> None:
        """
        Write the envelope as it is now, unless a write that began after
        generation C{generation} was asked for has already done it; then
        empty its journal, whose records the new envelope includes (as it
        does the records still waiting: their callers are answered by this
        write). Per-message lock held.
        """
        async with self._journal_lock:
            envelope = self._envelopes.get(qid)
            if envelope is None:
                raise NoSuchMessageError(qid)
            if self._written.get(qid, 0) >= generation:
                return
            covers = self._requested[qid]
            # Here, in the reactor thread: the job gets bytes.
            data = _encode(envelope, self._seq.get(qid, 0))
            taken = self._waiting.pop(qid, None)
            ops, env_dir, fds = self._ops, self._env, self._fds
            tmp = os.path.join(self._tmp, qid + ".env")
            final = os.path.join(env_dir, qid + ".json")
            journal = os.path.join(self._journal, qid) if qid in self._lines else None

            def job() -> None:
                _write_file(ops, tmp, data, 0, exclusive=False)
                ops.rename(tmp, final)
                ops.fsync_dir(env_dir)
                if journal is not None:
                    # A crash before this replays only records newer than the
                    # envelope's journal_seq: none.
                    fd = fds.get(qid)
                    if fd is None:
                        fd = fds[qid] = ops.append(journal)
                    ops.truncate(fd, 0)
                    ops.fsync(fd)

            try:
                await self._run(job)
            except BaseException:
                self._broken.add(qid)
                if taken is not None:
                    error = Failure()
                    for d in taken[1]:
                        d.errback(error)
                raise
            if qid in self._envelopes:
                self._written[qid] = max(self._written.get(qid, 0), covers)
                self._broken.discard(qid)
                if journal is not None:
                    self._lines[qid] = 0
        if taken is not None:
            for d in taken[1]:
                d.callback(None)

    async def _resign(self, old: Envelope) -> Envelope:
        self._check_open()
        qid = old.id
        lock = await self._acquire(qid)
        try:
            if self._envelopes.get(qid) is not old:
                raise NoSuchMessageError(qid)
            if not old.sign_pending:
                return old
            if self._signer is None:
                # Signing is no longer configured: it goes out as it is.
                old.sign_pending = False
                await self._write_envelope(qid, self._bump(qid))
                self.log.warn("Sending {queue_id} unsigned: no DKIM signer any more", queue_id=qid)
                return old
            signer = self._signer
            new_id = self._new_id(self._clock.seconds())
            new = attrs.evolve(
                old,
                id=new_id,
                recipients=[attrs.evolve(r) for r in old.recipients],
                params=dict(old.params),
                sign_pending=False,
                replaces=qid,
            )
            ops = self._ops
            old_data = os.path.join(self._data, qid)
            tmp_data = os.path.join(self._tmp, new_id + ".data")
            tmp_env = os.path.join(self._tmp, new_id + ".env")
            final_data = os.path.join(self._data, new_id)
            final_env = os.path.join(self._env, new_id + ".json")
            env_dir, data_dir = self._env, self._data
            warnings: list[str] = []
            await self._journal_lock.acquire()  # no journal write meanwhile
            journal = os.path.join(self._journal, qid) if qid in self._lines else None
            fd = self._fds.pop(qid, None)
            replaced: list[bool] = []

            def job() -> None:
                with open(old_data, "rb") as f:
                    message = f.read()
                prefix, warning = signer(message, old.sender)  # raises: nothing changed
                warnings.append(warning)
                new.size = _write_file(ops, tmp_data, prefix + message, 0)
                ops.rename(tmp_data, final_data)
                try:
                    ops.fsync_dir(data_dir)
                    _write_file(ops, tmp_env, _encode(new), 0)
                    ops.rename(tmp_env, final_env)
                    try:
                        ops.fsync_dir(env_dir)
                    except BaseException:
                        _discard(ops, final_env, env_dir)
                        raise
                except BaseException:
                    _discard(ops, final_data, None)
                    raise
                # The signed copy is durable: the old one goes (load()
                # finishes this if a crash stops it).
                replaced.append(True)
                if fd is not None:
                    ops.close(fd)
                _unlink_missing_ok(ops, os.path.join(env_dir, qid + ".json"))
                ops.fsync_dir(env_dir)
                if journal is not None:
                    _unlink_missing_ok(ops, journal)
                _unlink_missing_ok(ops, old_data)
                ops.fsync_dir(data_dir)

            try:
                await self._run(job)
            except BaseException:
                if fd is not None and not replaced:
                    self._fds[qid] = fd
                if not replaced:
                    raise
                self.log.failure("Removing {queue_id} after signing it failed", queue_id=qid)
            finally:
                self._journal_lock.release()
            del self._envelopes[qid]
            self._forget(qid)
            self._envelopes[new_id] = new
        finally:
            self._release(qid, lock)
        self.log.info(
            "Signed {queue_id}: queued again as {new_id}, {size} bytes{note}",
            queue_id=qid,
            new_id=new_id,
            size=new.size,
            note=f" ({warnings[0]})" if warnings and warnings[0] else "",
        )
        for observer in self._watchers:
            try:
                observer(new)
            except Exception:
                self.log.failure("A queue observer failed on {queue_id}", queue_id=new_id)
        return new

    async def _set_held(self, qid: str, held: bool) -> None:
        self._check_open()
        _check_id(qid)
        lock = await self._acquire(qid)
        try:
            envelope = self._envelopes.get(qid)
            if envelope is None:
                raise NoSuchMessageError(qid)
            envelope.held = held
            await self._write_envelope(qid, self._bump(qid))
        finally:
            self._release(qid, lock)
        self.log.info("{action} {queue_id}", action="Held" if held else "Released", queue_id=qid)

    async def _remove(self, qid: str, *, force: bool) -> None:
        self._check_open()
        _check_id(qid)
        lock = await self._acquire(qid)
        try:
            envelope = self._envelopes.get(qid)
            if envelope is None:
                raise NoSuchMessageError(qid)
            pending = len(envelope.pending())
            if pending and not force:
                raise ValueError(f"{qid} has {pending} pending recipients")
            ops, env_dir, data_dir = self._ops, self._env, self._data
            gone: list[bool] = []
            await self._journal_lock.acquire()  # no journal write meanwhile
            journal = os.path.join(self._journal, qid) if qid in self._lines else None
            fd = self._fds.pop(qid, None)

            def job() -> None:
                if fd is not None:
                    ops.close(fd)
                _unlink_missing_ok(ops, os.path.join(env_dir, qid + ".json"))
                gone.append(True)
                ops.fsync_dir(env_dir)
                if journal is not None:
                    # No fsync of journal/: should the name come back after a
                    # crash, load removes a journal without an envelope.
                    _unlink_missing_ok(ops, journal)
                _unlink_missing_ok(ops, os.path.join(data_dir, qid))
                ops.fsync_dir(data_dir)

            try:
                await self._run(job)
            finally:
                self._journal_lock.release()
                if gone:
                    del self._envelopes[qid]
                    self._forget(qid)
        finally:
            self._release(qid, lock)
        if force:
            self.log.info(
                "Deleted {queue_id}: {pending} recipients not delivered",
                queue_id=qid,
                pending=pending,
            )
        else:
            self.log.info("{queue_id}: removed", queue_id=qid)  # qmgr's line

    def _forget(self, qid: str) -> None:
        """Drop what the queue knows of a removed message; its waiting records fail."""
        self._requested.pop(qid, None)
        self._written.pop(qid, None)
        self._seq.pop(qid, None)
        self._lines.pop(qid, None)
        self._positions.pop(qid, None)
        self._broken.discard(qid)
        taken = self._waiting.pop(qid, None)
        if taken is not None:
            for d in taken[1]:
                d.errback(NoSuchMessageError(qid))

    # -- journals -------------------------------------------------------------

    def _journal_lines(
        self, envelope: Envelope, recipients: Sequence[RecipientState]
    ) -> list[bytes]:
        """
        The journal lines for C{recipients}' current state, numbered on from
        the message's last record.

        @raise ValueError: a recipient that is not one of C{envelope}'s, or a
            state that cannot be stored.
        """
        qid = envelope.id
        positions = self._positions.get(qid)
        seq = self._seq.get(qid, 0)
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
            if r.state not in _STATES:
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
        self._seq[qid] = seq
        return lines

    async def _flush_journals(self) -> None:
        """
        Write the waiting records, all messages together, until none waits.
        One runs at a time (C{_flushing}); it counts as busy for L{close}.
        """
        try:
            while self._waiting:
                async with self._journal_lock:
                    batch, self._waiting = self._waiting, {}
                    fire = await self._write_journals(batch)
                fire()
        finally:
            self._flushing = False
            self._busy -= 1
            self._check_idle()

    async def _write_journals(
        self, batch: dict[str, tuple[list[bytes], list[Deferred[None]]]]
    ) -> Callable[[], None]:
        """
        Append C{batch} to the journals and fsync them (journal lock held).

        @return: what answers the callers, to call once the lock is released.
        """
        gone = [qid for qid in batch if qid not in self._envelopes]
        qids = [qid for qid in batch if qid in self._envelopes]
        data = {qid: b"".join(batch[qid][0]) for qid in qids}
        existing = {qid for qid in qids if qid in self._lines}
        ops, fds, directory = self._ops, self._fds, self._journal

        def job() -> None:
            created = False
            for qid in qids:
                fd = fds.get(qid)
                if fd is None:
                    fd = fds[qid] = ops.append(os.path.join(directory, qid))
                    created = created or qid not in existing
                ops.write(fd, data[qid])
            for qid in qids:
                ops.fsync(fds[qid])
            if created:
                ops.fsync_dir(directory)  # the new journals' names

        error: Failure | None = None
        if qids:
            try:
                await self._run(job, self._journal_sync)
            except Exception:
                error = Failure()
                for qid in qids:
                    # It may end in a torn line now: the next record rewrites
                    # the envelope, which empties the journal first.
                    self._broken.add(qid)
                    self._lines.setdefault(qid, 0)
            else:
                for qid in qids:
                    self._lines[qid] = self._lines.get(qid, 0) + len(batch[qid][0])
                    self._compact_if_long(qid)

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

    def _compact_if_long(self, qid: str) -> None:
        """Rewrite the envelope (emptying the journal) once retries made it long."""
        envelope = self._envelopes.get(qid)
        if envelope is None:
            return
        limit = _COMPACT_PER_RECIPIENT * len(envelope.recipients) + _COMPACT_SLACK
        if self._lines.get(qid, 0) <= limit or self._closed:
            return
        self._lines[qid] = 0  # once: the rewrite sets it for good
        self.update(envelope).addErrback(self._compaction_failed, qid)

    def _compaction_failed(self, failure: Failure, qid: str) -> None:
        if not failure.check(NoSuchMessageError, QueueClosedError):
            self.log.failure("Rewriting the envelope of {queue_id} failed", failure, queue_id=qid)

    def _close_journals(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    # -- zope.sendmail import -----------------------------------------------

    async def _import_zope(self, queuepath: str, xverp: bool) -> int:
        self._check_open()
        queuepath = os.path.abspath(queuepath)
        files: list[str] = []
        await self._run(lambda: files.extend(_zope_files(queuepath)))
        imported = skipped = 0
        for path in files:
            try:
                if await self._import_one(path, xverp):
                    imported += 1
            except QueueClosedError:
                raise  # shutting down: the rest waits for the next import
            except Exception as exc:
                skipped += 1
                self.log.error(
                    "Could not import {path} from the zope.sendmail queue: {error}",
                    path=path,
                    error=str(exc),
                )
        self.log.info(
            "Imported {imported} messages from the zope.sendmail queue {queuepath}"
            " ({found} files, {skipped} left there)",
            imported=imported,
            queuepath=queuepath,
            found=len(files),
            skipped=skipped,
        )
        return imported

    async def _import_one(self, path: str, xverp: bool) -> bool:
        """
        Import one zope.sendmail file; C{True} if it was queued now.

        @raise ValueError: not a zope.sendmail message (left in place).
        @raise OSError: it could not be read or queued (left in place).
        """
        ops = self._ops
        directory, name = os.path.split(path)
        claim = os.path.join(directory, ".sending-" + name)
        origin = "zope.sendmail:" + name
        now = self._clock.seconds()
        found: list[tuple[str, list[str], int] | None] = []

        def take() -> None:
            try:
                claimed_at = os.stat(claim).st_mtime
            except FileNotFoundError:
                pass
            else:
                if now - claimed_at < ZOPE_MAX_SEND_TIME:
                    found.append(None)  # a zope.sendmail processor may be sending it
                    return
                _unlink_missing_ok(ops, claim)
            ops.touch(path, now)  # as zope.sendmail does: the claim's age starts now
            ops.link(path, claim)
            try:
                found.append(_read_zope_header(path))
            except BaseException:
                _unlink_missing_ok(ops, claim)
                raise

        await self._run(take)
        header = found[0]
        if header is None:
            self.log.info(
                "Skipped {path}: a zope.sendmail processor claimed it less than 3 hours ago",
                path=path,
            )
            return False
        sender, recipients, offset = header

        def finish() -> None:
            _unlink_missing_ok(ops, claim)

        for envelope in self._envelopes.values():
            if envelope.origin == origin:
                # Queued by an import that stopped before it unlinked the file.
                def unqueue() -> None:
                    _unlink_missing_ok(ops, path)
                    finish()
                    ops.fsync_dir(directory)

                await self._run(unqueue)
                self.log.info(
                    "{path} was already queued as {queue_id}", path=path, queue_id=envelope.id
                )
                return False

        def unlink_source() -> None:
            ops.unlink(path)  # failing here un-queues the message: the file stays
            try:
                ops.fsync_dir(directory)
            except OSError:
                pass  # the envelope's origin dedupes the file if it comes back

        try:
            await self._enqueue(
                sender,
                recipients,
                path,
                offset,
                xverp=xverp,
                params=None,
                origin=origin,
                after_durable=unlink_source,
                sign=True,
            )
        except BaseException:
            await self._run(finish)
            raise
        try:
            await self._run(finish)
        except OSError as exc:
            # A stale dotfile at worst: zope.sendmail and this import skip it.
            self.log.warn(
                "Could not remove the claim {claim}: {error}", claim=claim, error=str(exc)
            )
        return True

    # -- loading ------------------------------------------------------------

    def _scan(self) -> None:
        now = self._clock.seconds()
        data_names = set(os.listdir(self._data))
        journals = set(os.listdir(self._journal))
        found: list[Envelope] = []
        corrupt = cleaned = young = 0
        for name in sorted(os.listdir(self._env)):
            qid = name[: -len(".json")] if name.endswith(".json") else ""
            path = os.path.join(self._env, name)
            reason = ""
            envelope: Envelope | None = None
            if not _ID_RE.match(qid):
                reason = "not a queue envelope"
            elif qid not in data_names:
                reason = "its data file is missing"
            else:
                try:
                    envelope, seq = _read_envelope(path, qid)
                    size = os.stat(os.path.join(self._data, qid)).st_size
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
            self._seq[qid] = seq
            if qid in journals:
                journals.discard(qid)
                self._load_journal(envelope, seq)
            found.append(envelope)
            data_names.discard(qid)
        for directory, names in ((self._data, data_names), (self._tmp, set(os.listdir(self._tmp)))):
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
                self._ops.unlink(os.path.join(self._journal, name))
            except FileNotFoundError:
                continue
            except OSError as exc:
                self.log.warn(
                    "Could not remove {path} from the outbound queue: {error}",
                    path=os.path.join(self._journal, name),
                    error=str(exc),
                )
                continue
            cleaned += 1
        if corrupt or cleaned:
            for directory in (self._corrupt, self._env, self._data, self._tmp, self._journal):
                self._ops.fsync_dir(directory)
        found = self._drop_replaced(found)
        found.sort(key=lambda e: (e.created, e.id))
        self._envelopes = {e.id: e for e in found}
        if found:
            # Ids stay time-ordered even if the clock went back since.
            self._last_id_us = max(int(found[-1].created * 1_000_000), self._last_id_us)
        self.log.info(
            "Outbound queue {directory} loaded: {messages} messages ({held} held),"
            " {pending} recipients pending, {corrupt} corrupt, {cleaned} leftovers removed,"
            " {young} recent leftovers kept",
            directory=self.directory,
            messages=len(found),
            held=sum(1 for e in found if e.held),
            pending=sum(len(e.pending()) for e in found),
            corrupt=corrupt,
            cleaned=cleaned,
            young=young,
        )

    def _load_journal(self, envelope: Envelope, seq: int) -> None:
        """
        Replay the journal of C{envelope} over it (records after C{seq}) and
        cut off a torn or damaged tail, so that appends start on a new line.
        """
        qid = envelope.id
        path = os.path.join(self._journal, qid)
        try:
            last, count, good, size = _replay(path, envelope, seq)
        except (OSError, ValueError) as exc:
            # The envelope's own state stands: recipients recorded only in
            # the journal are sent again (at least once, never lost).
            self.log.error(
                "Could not read the journal of {queue_id}: {error}", queue_id=qid, error=str(exc)
            )
            last, count, good, size = seq, 0, 0, 1
        self._seq[qid] = last
        self._lines[qid] = count
        if good < size:
            self.log.warn(
                "Cut {cut} bytes (an interrupted write) off the journal of {queue_id}",
                cut=size - good,
                queue_id=qid,
            )
            fd = self._fds[qid] = self._ops.append(path)
            self._ops.truncate(fd, good)
            self._ops.fsync(fd)

    def _drop_replaced(self, found: list[Envelope]) -> list[Envelope]:
        """
        Remove the unsigned messages whose signed copy is queued too (a
        crash in L{resign} after the copy was durable): load time, blocking.
        """
        ids = {e.id for e in found}
        gone = {e.replaces for e in found if e.replaces in ids}
        for qid in sorted(gone):
            for path in (
                os.path.join(self._env, qid + ".json"),
                os.path.join(self._journal, qid),
                os.path.join(self._data, qid),
            ):
                _unlink_missing_ok(self._ops, path)
            self._seq.pop(qid, None)
            self._lines.pop(qid, None)
            fd = self._fds.pop(qid, None)
            if fd is not None:
                os.close(fd)
            self.log.info("Removed {queue_id}: its signed copy is queued", queue_id=qid)
        if gone:
            for directory in (self._env, self._data):
                self._ops.fsync_dir(directory)
        return [e for e in found if e.id not in gone]

    def _quarantine(
        self, name: str, qid: str | None, reason: str, journal: str | None = None
    ) -> None:
        """
        Move a corrupt envelope (and its data and journal, if any) to C{corrupt/}.
        """
        target = _free_name(os.path.join(self._corrupt, name))
        self._ops.rename(os.path.join(self._env, name), target)
        if qid is not None:
            self._ops.rename(os.path.join(self._data, qid), target + ".data")
        if journal is not None:
            self._ops.rename(os.path.join(self._journal, journal), target + ".journal")
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
        if name.endswith(".json") and _ID_RE.match(qid):
            try:
                envelope, seq = _read_envelope(os.path.join(env_dir, name), qid)
            except (OSError, ValueError):
                continue
            try:
                _replay(os.path.join(directory, "journal", qid), envelope, seq)
            except (OSError, ValueError):
                pass  # no journal (or unreadable): the envelope as written
            found.append(envelope)
    return sorted(found, key=lambda e: (e.created, e.id))


# -- helpers (blocking ones run in the sync hand-off or at load) --------------


def _check_id(qid: str) -> None:
    if not isinstance(qid, str) or not _ID_RE.match(qid):
        raise ValueError(f"not a queue id: {qid!r}")


def _check_address(address: str, *, null: bool) -> None:
    if not isinstance(address, str):
        raise TypeError("addresses must be str")
    if not address and not null:
        raise ValueError("empty recipient address")
    if _FORBIDDEN.search(address):
        raise ValueError("an address must not contain CR, LF or NUL")


def _write_file(
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
            _discard(ops, path, None)
        raise
    ops.close(fd)
    return size


def _read_source(source: bytes | str, offset: int) -> bytes:
    """A message given as bytes, or as a file to read from byte C{offset} (blocking)."""
    if isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        f.seek(offset)
        return f.read()


def _discard(ops: FileOps, path: str, directory: str | None) -> None:
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


def _unlink_missing_ok(ops: FileOps, path: str) -> None:
    try:
        ops.unlink(path)
    except FileNotFoundError:
        pass


def _free_name(path: str) -> str:
    candidate, n = path, 0
    while os.path.lexists(candidate) or os.path.lexists(candidate + ".data"):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def _lock(path: str) -> int:
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


def _encode(envelope: Envelope, journal_seq: int = 0) -> bytes:
    obj = {
        "format": _FORMAT,
        "id": envelope.id,
        "journal_seq": journal_seq,
        "sender": envelope.sender,
        "xverp": envelope.xverp,
        "created": envelope.created,
        "held": envelope.held,
        "size": envelope.size,
        "dsn_sent": envelope.dsn_sent,
        "params": envelope.params,
        "origin": envelope.origin,
        "recipients": [_encode_recipient(r) for r in envelope.recipients],
    }
    # Written only when set: envelopes without DSN requests stay as they
    # were, and any reader ignores fields it does not know.
    if envelope.delay_warned:
        obj["delay_warned"] = True
    if envelope.sign_pending:
        obj["sign_pending"] = True
    if envelope.replaces:
        obj["replaces"] = envelope.replaces
    # ASCII only (non-ASCII as \\u escapes): addresses decoded with
    # surrogateescape survive the round trip.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"


def _encode_recipient(r: RecipientState) -> dict[str, Any]:
    item: dict[str, Any] = {
        "address": r.address,
        "state": r.state,
        "attempts": r.attempts,
        "next_attempt": r.next_attempt,
        "last_reply": r.last_reply,
    }
    if r.notify:
        item["notify"] = r.notify
    if r.orcpt:
        item["orcpt"] = r.orcpt
    return item


def _optional(obj: dict[str, Any], name: str, kind: type[Any], default: Any) -> Any:
    """C{obj[name]} checked as L{_get} does, or C{default} when absent (older envelopes)."""
    return _get(obj, name, kind) if name in obj else default


def _legacy_dsn(params: dict[str, str], address: str) -> tuple[str, str]:
    """
    NOTIFY and ORCPT of a recipient from an envelope written before they had
    fields of their own: the submission listener then kept them among the
    MAIL parameters, as C{"NOTIFY:<address>"} and C{"ORCPT:<address>"}, as
    received. Values that do not parse are dropped (the defaults apply).
    """
    notify = orcpt = ""
    raw = params.get(f"NOTIFY:{address}")
    if raw is not None:
        try:
            notify = parse_notify(raw)
        except ValueError:
            pass
    raw = params.get(f"ORCPT:{address}")
    if raw is not None:
        try:
            orcpt = parse_orcpt(raw)
        except ValueError:
            pass
    return notify, orcpt


def _read_envelope(path: str, qid: str) -> tuple[Envelope, int]:
    """
    Read and check one envelope file.

    @return: the envelope and the last journal record it includes (0 in
        envelopes written before journals existed).

    @raise ValueError: it does not hold a valid envelope for C{qid}.
    @raise OSError: it cannot be read.
    """
    with open(path, "rb") as f:
        raw = f.read(_MAX_ENVELOPE + 1)
    if len(raw) > _MAX_ENVELOPE:
        raise ValueError("envelope file too large")
    obj = json.loads(raw)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
        raise ValueError("not an envelope of a known format")
    if _get(obj, "id", str) != qid:
        raise ValueError("its id is not its file name")
    params = _get(obj, "params", dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
        raise ValueError("params must map text to text")
    legacy = any(k.startswith(("NOTIFY:", "ORCPT:")) for k in params)
    recipients = []
    for item in _get(obj, "recipients", list):
        if not isinstance(item, dict):
            raise ValueError("a recipient must be an object")
        state = _get(item, "state", str)
        if state not in _STATES:
            raise ValueError(f"unknown recipient state {state!r}")
        address = _get(item, "address", str)
        if "notify" in item or "orcpt" in item:
            notify = _optional(item, "notify", str, "")
            orcpt = _optional(item, "orcpt", str, "")
        else:
            notify, orcpt = _legacy_dsn(params, address) if legacy else ("", "")
        recipients.append(
            RecipientState(
                address=address,
                state=state,
                attempts=_get(item, "attempts", int),
                next_attempt=_get(item, "next_attempt", float),
                last_reply=_get(item, "last_reply", str),
                notify=notify,
                orcpt=orcpt,
            )
        )
    if not recipients:
        raise ValueError("no recipients")
    seq = _get(obj, "journal_seq", int) if "journal_seq" in obj else 0
    envelope = Envelope(
        id=qid,
        sender=_get(obj, "sender", str),
        recipients=recipients,
        xverp=_get(obj, "xverp", bool),
        created=_get(obj, "created", float),
        held=_get(obj, "held", bool),
        size=_get(obj, "size", int),
        dsn_sent=_get(obj, "dsn_sent", bool),
        params=params,
        origin=_get(obj, "origin", str),
        delay_warned=_optional(obj, "delay_warned", bool, False),
        sign_pending=_optional(obj, "sign_pending", bool, False),
        replaces=_optional(obj, "replaces", str, ""),
    )
    return envelope, seq


def _replay(path: str, envelope: Envelope, seq: int) -> tuple[int, int, int, int]:
    """
    Apply the records of the journal at C{path} numbered after C{seq} to
    C{envelope}, in order. Reading stops at the first line that is not a
    whole, valid record (a write cut short by a crash; it was never
    acknowledged).

    @return: the last record number (at least C{seq}), the records read, the
        bytes they take from the start of the file, and the file's size.
    @raise OSError: it cannot be read (C{FileNotFoundError}: none).
    @raise ValueError: it is too large to be a journal.
    """
    with open(path, "rb") as f:
        raw = f.read(_MAX_JOURNAL + 1)
    if len(raw) > _MAX_JOURNAL:
        raise ValueError("journal file too large")
    recipients = envelope.recipients
    last = seq
    count = position = 0
    while True:
        end = raw.find(b"\n", position)
        if end < 0:
            break
        try:
            record = json.loads(raw[position:end])
            number, index, state, attempts, next_attempt, last_reply = record
            if not (
                type(number) is int
                and type(index) is int
                and 0 <= index < len(recipients)
                and state in _STATES
                and type(attempts) is int
                and attempts >= 0
                and type(next_attempt) in (int, float)
                and math.isfinite(next_attempt)
                and type(last_reply) is str
            ):
                break
        except ValueError:  # JSONDecodeError, UnicodeDecodeError, unpacking
            break
        except TypeError:  # not a list
            break
        if number > seq:
            r = recipients[index]
            r.state = state
            r.attempts = attempts
            r.next_attempt = float(next_attempt)
            r.last_reply = last_reply
        last = max(last, number)
        count += 1
        position = end + 1
    return last, count, position, len(raw)


def _get(obj: dict[str, Any], name: str, kind: type[Any]) -> Any:
    """
    C{obj[name]}, checked to be of C{kind} (JSON's types: a bool is not an
    int, an int is a float).

    @raise ValueError: missing or of another type.
    """
    value: Any = obj.get(name)
    if kind is float:
        ok = type(value) in (int, float) and math.isfinite(value)
    elif kind is int:
        ok = type(value) is int and value >= 0
    else:
        ok = type(value) is kind
    if not ok:
        raise ValueError(f"bad or missing field {name!r}")
    return float(value) if kind is float else value


def _zope_files(queuepath: str) -> list[str]:
    """
    The message files of a zope.sendmail Maildir, oldest first.

    @raise FileNotFoundError: C{queuepath} is not a directory.
    """
    if not os.path.isdir(queuepath):
        raise FileNotFoundError(errno.ENOENT, "no zope.sendmail queue here", queuepath)
    entries = []
    for sub in ("new", "cur"):
        directory = os.path.join(queuepath, sub)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                entries.append((st.st_mtime, path))
    entries.sort()
    return [path for _, path in entries]


def _read_zope_header(path: str) -> tuple[str, list[str], int]:
    """
    The sender, the recipients and the offset of the message in a
    zope.sendmail queue file.

    @raise ValueError: the file does not start with the two X-Zope lines,
        has no recipient, or is not UTF-8 there.
    """
    with open(path, "rb") as f:
        first = f.readline(_ZOPE_LINE_MAX)
        second = f.readline(_ZOPE_LINE_MAX)
    if not (
        first.startswith(_ZOPE_FROM)
        and first.endswith(b"\n")
        and second.startswith(_ZOPE_TO)
        and second.endswith(b"\n")
    ):
        raise ValueError("not a zope.sendmail message (no X-Zope-From and X-Zope-To lines)")
    sender = _bare_address(first[len(_ZOPE_FROM) :].decode("utf-8"))
    # zope.sendmail joins with ", " and splits on it again; so do we.
    recipients = [
        _bare_address(part) for part in second[len(_ZOPE_TO) :].decode("utf-8").split(", ")
    ]
    recipients = [r for r in recipients if r]
    if not recipients:
        raise ValueError("no recipients in X-Zope-To")
    return sender, recipients, len(first) + len(second)


def _bare_address(text: str) -> str:
    """
    An address as zope.sendmail's smtplib would have sent it: C{Name <a@b>}
    and C{<a@b>} become C{a@b} (smtplib's C{quoteaddr}).
    """
    text = text.strip()
    if "<" in text:
        return email.utils.parseaddr(text)[1]
    return text
