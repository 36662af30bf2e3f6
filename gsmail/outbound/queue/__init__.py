# -*- test-case-name: tests.outbound.test_queue -*-
"""
The outbound queue: where a message submitted for delivery waits, on disk,
until every recipient is delivered, failed or expired. L{OutboundQueue} is
what the rest of gsmail uses (enqueue, record, update, hold, remove, ...);
it keeps the envelopes in memory and decides when and in what order the
disk is written. Its parts:

  - L{gsmail.outbound.queue.envelope}: L{Envelope}, L{RecipientState}, the
    envelope file's JSON and the journal's records (pure);
  - L{gsmail.outbound.queue.store}: the directory layout, L{FileOps}, the
    lock and the blocking jobs that write and remove files in fsync order
    (the durability protocol is in its docstring);
  - L{gsmail.outbound.queue.journal}: the per-recipient journals and their
    group commit;
  - L{gsmail.outbound.queue.update}: the per-message locks and the changes
    made under them (envelope rewrites shared by concurrent updates, the
    signed copy replacing a message, removal);
  - L{gsmail.outbound.queue.load}: the load at start-up (replay, corrupt
    envelopes, crash leftovers) and L{read_queue} for listings;
  - L{gsmail.outbound.queue.zope}: the import of a zope.sendmail queue.

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
  - a crash after the envelope is fsynced but before the sender reads our
    250: the message is queued and will be delivered, and the sender,
    having no 250, sends it again. Two copies go out.
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

import os
import secrets
from collections.abc import Callable, Sequence

import attrs
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail.outbound.queue.envelope import (
    DELIVERED,
    EXPIRED,
    FAILED,
    FINAL_STATES,
    PENDING,
    Envelope,
    NoSuchMessageError,
    RecipientDSN,
    RecipientState,
    check_id,
    check_submission,
)
from gsmail.outbound.queue.journal import Journals
from gsmail.outbound.queue.load import QueueRecovery, read_queue
from gsmail.outbound.queue.store import (
    FileOps,
    QueueClosedError,
    QueueDirs,
    QueueLockedError,
    Sync,
    lock_queue,
    read_source,
    run_inline,
    store_message,
)
from gsmail.outbound.queue.update import MessageUpdates, Signer
from gsmail.outbound.queue.zope import ZopeImport

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


class OutboundQueue:
    """
    The durable outbound queue (L{gsmail.outbound.queue.store} has the
    layout and the durability protocol).

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
        self._dirs = QueueDirs.under(directory)
        self.directory = self._dirs.root
        self._clock = clock
        self._sync: Sync = run_inline if sync is None else sync
        self._journal_sync: Sync = self._sync if journal_sync is None else journal_sync
        self._ops = FileOps() if file_ops is None else file_ops
        self._signer = signer
        self._envelopes: dict[str, Envelope] = {}
        self._journals = Journals(self._dirs.journal, self._ops)
        self._updates = MessageUpdates(
            self._envelopes, self._journals, self._ops, self._dirs, self._run, self.log
        )
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
        dirs = self._dirs
        for path in (dirs.root, dirs.tmp, dirs.data, dirs.env, dirs.corrupt, dirs.journal):
            os.makedirs(path, mode=0o700, exist_ok=True)
        self._lock_fd = lock_queue(os.path.join(self.directory, "lock"))
        try:
            recovery = QueueRecovery(dirs, self._ops, self._journals, self.log)
            found = recovery.scan(self._clock.seconds())
        except BaseException:
            self._journals.close()
            os.close(self._lock_fd)
            self._lock_fd = None
            raise
        self._envelopes.update((e.id, e) for e in found)  # the dict others hold
        if found:
            # Ids stay time-ordered even if the clock went back since.
            self._last_id_us = max(int(found[-1].created * 1_000_000), self._last_id_us)
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
        check_id(id)
        return os.path.join(self._dirs.data, id)

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
            if envelope.id in self._journals.broken:
                # The journal may end in a torn line: start over from a whole envelope.
                return self.update(envelope)
            lines = self._journals.records(envelope, recipients)
        except Exception:
            return fail()
        d = self._journals.wait(envelope.id, lines)
        if not self._journals.flushing:
            self._journals.flushing = True
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

        Files in C{new/} and C{cur/} are taken oldest first, claimed as
        zope.sendmail does, queued without their X-Zope lines and unlinked
        once queued; L{gsmail.outbound.queue.zope} has the steps and the
        at-least-once window. Files that are not zope.sendmail messages, or
        fail, are logged and left in place.

        @param queuepath: the zope.sendmail queue directory.
        @param xverp: queue the messages for delivery with XVERP (gs.email's
            C{xverp} setting).
        @return: fires with the number of messages queued; fails with
            C{FileNotFoundError} if C{queuepath} is not a directory.
        """
        return Deferred.fromCoroutine(self._import_zope(queuepath, xverp))

    async def _import_zope(self, queuepath: str, xverp: bool) -> int:
        self._check_open()
        importer = ZopeImport(
            ops=self._ops,
            clock=self._clock,
            run=self._run,
            enqueue=self._enqueue,
            queued=self._envelopes.values,
            log=self.log,
        )
        return await importer.run(queuepath, xverp)

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
            self._journals.close()
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
        params, pairs = check_submission(sender, recipients, params, dsn)
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
        ops, dirs = self._ops, self._dirs
        signer = self._signer if sign else None
        signing: list[str] = []  # the warning, or why it waits

        def job() -> None:
            # Nobody else sees this envelope until the job is done.
            if signer is not None:
                message = read_source(source, offset)
                try:
                    prefix, warning = signer(message, sender)
                except Exception as e:
                    envelope.sign_pending = True
                    prefix, warning = b"", str(e) or e.__class__.__name__
                signing.append(warning)
                store_message(ops, dirs, envelope, prefix + message, 0, after_durable)
            else:
                store_message(ops, dirs, envelope, source, offset, after_durable)

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
        self._notify(envelope)
        self.log.info(
            "Queued {queue_id} from <{sender}> for {recipients} recipients, {size} bytes",
            queue_id=qid,
            sender=sender,
            recipients=len(recipients),
            size=envelope.size,
        )
        return envelope

    async def _update(self, envelope: Envelope) -> None:
        self._check_open()
        current = self._envelopes.get(envelope.id)
        if current is None:
            raise NoSuchMessageError(envelope.id)
        if current is not envelope:
            raise ValueError("update() takes the queue's own envelope object, not a copy")
        generation = self._updates.bump(envelope.id)
        lock = await self._updates.acquire(envelope.id)
        try:
            await self._updates.write(envelope.id, generation)
        finally:
            self._updates.release(envelope.id, lock)

    async def _resign(self, old: Envelope) -> Envelope:
        self._check_open()
        qid = old.id
        lock = await self._updates.acquire(qid)
        try:
            if self._envelopes.get(qid) is not old:
                raise NoSuchMessageError(qid)
            if not old.sign_pending:
                return old
            if self._signer is None:
                # Signing is no longer configured: it goes out as it is.
                old.sign_pending = False
                await self._updates.write(qid, self._updates.bump(qid))
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
            warning = await self._updates.replace_signed(old, new, signer)
        finally:
            self._updates.release(qid, lock)
        self.log.info(
            "Signed {queue_id}: queued again as {new_id}, {size} bytes{note}",
            queue_id=qid,
            new_id=new_id,
            size=new.size,
            note=f" ({warning})" if warning else "",
        )
        self._notify(new)
        return new

    def _notify(self, envelope: Envelope) -> None:
        """Tell the watchers (L{watch}) of a message just queued."""
        for observer in self._watchers:
            try:
                observer(envelope)
            except Exception:
                self.log.failure("A queue observer failed on {queue_id}", queue_id=envelope.id)

    async def _set_held(self, qid: str, held: bool) -> None:
        self._check_open()
        check_id(qid)
        lock = await self._updates.acquire(qid)
        try:
            envelope = self._envelopes.get(qid)
            if envelope is None:
                raise NoSuchMessageError(qid)
            envelope.held = held
            await self._updates.write(qid, self._updates.bump(qid))
        finally:
            self._updates.release(qid, lock)
        self.log.info("{action} {queue_id}", action="Held" if held else "Released", queue_id=qid)

    async def _remove(self, qid: str, *, force: bool) -> None:
        self._check_open()
        check_id(qid)
        lock = await self._updates.acquire(qid)
        try:
            envelope = self._envelopes.get(qid)
            if envelope is None:
                raise NoSuchMessageError(qid)
            pending = len(envelope.pending())
            if pending and not force:
                raise ValueError(f"{qid} has {pending} pending recipients")
            await self._updates.remove(qid)
        finally:
            self._updates.release(qid, lock)
        if force:
            self.log.info(
                "Deleted {queue_id}: {pending} recipients not delivered",
                queue_id=qid,
                pending=pending,
            )
        else:
            self.log.info("{queue_id}: removed", queue_id=qid)  # qmgr's line

    # -- journals -------------------------------------------------------------

    async def _flush_journals(self) -> None:
        """
        Write the waiting records (L{Journals.flush}); it counts as busy for
        L{close}.
        """
        try:
            await self._journals.flush(
                lambda job: self._run(job, self._journal_sync),
                self._envelopes,
                self._compact_if_long,
            )
        finally:
            self._busy -= 1
            self._check_idle()

    def _compact_if_long(self, qid: str) -> None:
        """Rewrite the envelope (emptying the journal) once retries made it long."""
        envelope = self._envelopes.get(qid)
        if envelope is None:
            return
        if not self._journals.too_long(envelope) or self._closed:
            return
        self._journals.lines[qid] = 0  # once: the rewrite sets it for good
        self.update(envelope).addErrback(self._compaction_failed, qid)

    def _compaction_failed(self, failure: Failure, qid: str) -> None:
        if not failure.check(NoSuchMessageError, QueueClosedError):
            self.log.failure("Rewriting the envelope of {queue_id} failed", failure, queue_id=qid)
