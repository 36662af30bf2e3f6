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
    the claim is a lock on one byte of a shared file
    (L{gsmail.ledger.claims});
  - remembers, for C{ttl} seconds, each key whose action succeeded, in memory
    and in an append-only file that is fsynced I{before} the caller hears of
    the success, so the caller's 250 is only said once a restart, or another
    process, would see the post too (see ARCHITECTURE.md, "No duplicate
    posts"; the memory and its writes: L{gsmail.ledger.store}; the file's
    format, reads, appends and compaction: L{gsmail.ledger.file}).

Unknown outcomes. When GroupServer received the whole request but no answer
came back (L{gsmail.status.GroupServerError} with C{outcome_unknown}), the
group may or may not have the post. Nothing is recorded: the failure goes to
the caller (451, the sender keeps the message and retries) and the retry
performs the action again. That is safe for adds because GroupServer
archives a post id once (groupserver-protocol.md, "GroupServer's own
idempotency"); L{gsmail.posting} says what the other pages do. The ledger's
part is to keep one message from being in flight twice at once, and to
answer copies of a message known to be added without another request.

Several processes, one file. No process holds a lock for long; each keeps its
own memory of the file, and four rules keep the memories right: appending
under a brief lock (1) and compacting by rename (4), in L{gsmail.ledger.file};
catching up with what others appended before deciding (2), in
L{gsmail.ledger.store}; claiming a key while posting it (3), in
L{gsmail.ledger.claims}.
"""

from __future__ import annotations

import enum
import hashlib
import math
import os
from collections.abc import Callable
from typing import Any, Final

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail.ledger.claims import (
    LedgerBusyError,
    LedgerClosedError,
    _Claims,
    _KeyLock,
    _Observer,
)
from gsmail.ledger.file import _KEY_SIZE, Outcome, _why
from gsmail.ledger.store import Sync, _current_failure, _RecordStore, _run_inline
from gsmail.status import LEDGER_UNWRITABLE, GroupServerError

__all__ = [
    "Outcome",
    "PostLedger",
    "LedgerClosedError",
    "LedgerBusyError",
    "LedgerUnwritableError",
]

#: Prefix of the hashed key material; changing it makes every remembered key unknown.
_KEY_DOMAIN: Final = b"gsmail.ledger.key.v1\x00"


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


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


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
        commit_delay: float = 0.0,
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
        @param commit_delay: how long, in seconds, a batch of records waits
            for the records of the other posts under way in this process, so
            that they share one fsync (L{gsmail.ledger.store}); C{0}: never
            waits (each batch is what arrived during the previous fsync). The
            daemon's C{ledger_commit_delay}.
        @raise ValueError: if C{ttl} or C{wait_timeout} is not a positive
            number of seconds, or C{commit_delay} is negative or not finite.
        """
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError("ttl must be a positive number of seconds")
        if not (math.isfinite(wait_timeout) and wait_timeout > 0):
            raise ValueError("wait_timeout must be a positive number of seconds")
        if not (math.isfinite(commit_delay) and commit_delay >= 0):
            raise ValueError("commit_delay must be 0 or more seconds")
        self.path = path
        self._state = _State.NEW
        self._flights: dict[bytes, _Observer[Outcome]] = {}
        self._claims = _Claims(path, clock=clock, wait_timeout=wait_timeout, log=self.log)
        self._store = _RecordStore(
            path,
            ttl=ttl,
            clock=clock,
            sync=_run_inline if sync is None else sync,
            preload=preload,
            log=self.log,
            busy=lambda: self._claims.held | self._flights.keys(),
            on_rewritten=self._claims.release_held,
            on_idle=self._check_idle,
            commit_delay=commit_delay,
        )
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
        self._claims.open()
        try:
            loaded = self._store.open()
        except BaseException:
            self._claims.close()
            raise
        if loaded.garbage:
            self._store.log_garbage(loaded.garbage)
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
            records=self._store.records,
            live=self._store.live,
            how="estimated" if self._store.estimated else "parsed",
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
            self._claims.stop_waiting()
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

        A key this process remembers as done is answered from memory; for any
        other, the records of other processes are read once the key's claim
        is taken (a C{stat} and a small read, in the calling thread).

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
            # Memory only: the claim reads what other processes appended once
            # it holds the key (it must look then anyway), so a post costs one
            # stat of the file, not two.
            known = self._store.lookup(key)
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
            self._store.catch_up()
        return self._store.lookup(key)

    @property
    def write_failed(self) -> bool:
        """
        The last write failed (a full disk, EIO): every call is answered
        451 until a write works again (C{/readyz} reports it).
        """
        return self._store.write_failed

    @property
    def observe_append(self) -> Callable[[float, int], None] | None:
        """
        Called with (seconds, records) after each append that worked
        (L{gsmail.metrics}); the seconds include the hand-off to C{sync}.
        """
        return self._store.observe_append

    @observe_append.setter
    def observe_append(self, observer: Callable[[float, int], None] | None) -> None:
        self._store.observe_append = observer

    def __len__(self) -> int:
        """
        The number of keys remembered and not expired, as far as this
        process has read the file. Without C{preload}, the first call parses
        the file.
        """
        return len(self._store)

    # -- one action ---------------------------------------------------------

    def _look(self, key: bytes) -> Outcome | None:
        """
        What the file says of C{key} now: read what other processes
        appended, then look it up.

        @raise OSError: the file could not be read.
        """
        self._store.catch_up()
        return self._store.lookup(key)

    async def _perform(
        self, key: bytes, action: Callable[[], Deferred[Any]], flight: _Observer[Outcome]
    ) -> None:
        result: Outcome | Failure
        try:
            known, lock = await self._claims.claim(key, self._look)
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
        if self._store.write_failed:
            # Make no post whose record could not be kept: try the file first.
            try:
                await self._store.write(b"")
            except Exception as exc:
                lock.release()
                return Failure(LedgerUnwritableError(_why(exc)))  # type: ignore[no-untyped-call]
        try:
            await maybeDeferred(action)
        except Exception:
            result = _current_failure()
        else:
            try:
                await self._store.write(self._store.remember(key, Outcome.DUPLICATE))
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
            self._claims.hold(key, lock)
        return result

    # -- closing ------------------------------------------------------------

    def _check_idle(self) -> None:
        if not (self._flights or self._store.busy):
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    async def _close(self) -> None:
        result: None | Failure = None
        try:
            while self._flights or self._store.busy:
                d: Deferred[None] = Deferred()
                self._idle.append(d)
                await d
            await self._store.flush()
        except Exception as exc:
            self._store.log_write_error(exc)
            result = _current_failure()
        finally:
            if self._claims.held:
                if result is not None:
                    self.log.error(
                        "Closing the post ledger {path} with {count} posts not on disk:"
                        " another process may post them again",
                        path=self.path,
                        count=len(self._claims.held),
                    )
                self._claims.release_held()
            self._store.close()
            self._claims.close()  # after the held claims were released
            self._state = _State.CLOSED
        self._closed.fire(result)
