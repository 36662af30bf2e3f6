# -*- test-case-name: tests.test_ledger,tests.test_ledger_processes -*-
"""
The post ledger's claim protocol: who performs a post while it is under way.
Within one process, concurrent calls for a key share one action and its
outcome (L{_Observer}, a keyed Deferred lock: the first call acts, the others
wait on its outcome); across processes sharing the ledger file, the one
holding the key's claim acts and the others wait (L{_Claims}). Not here: the
records that say a post was done (L{gsmail.ledger.store},
L{gsmail.ledger.file}), the action itself (L{gsmail.ledger.PostLedger.run}).

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

(Rules 1 and 4 are in L{gsmail.ledger.file}, rule 2 in L{gsmail.ledger.store}.)
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable, KeysView
from typing import Any, Final, Generic, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail.ledger.file import Outcome
from gsmail.status import TOO_BUSY, GroupServerError

_T = TypeVar("_T")
#: Seconds between two looks at a key another process is posting.
_POLL_INTERVAL: Final = 0.05


class LedgerClosedError(RuntimeError):
    """
    L{gsmail.ledger.PostLedger.run} was called before
    L{gsmail.ledger.PostLedger.open} or after L{gsmail.ledger.PostLedger.close}
    began, or the ledger was closed while the call waited for another
    process. The caller answers 451 4.3.0 (transient).
    """


class LedgerBusyError(GroupServerError):
    """
    Another process has been posting this message for longer than the
    ledger's C{wait_timeout}: its GroupServer request has not ended, or its
    record cannot be written. The reply is C{451 4.4.5} (L{TOO_BUSY}): the
    sender retries later, and by then the ledger knows the outcome.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(TOO_BUSY, detail)


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


class _KeyLock:
    """
    This ledger object's claim on a key: an exclusive open-file-description
    lock on one byte of the claims file (rule 3).
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


class _Claims:
    """
    This ledger object's claims on keys (rule 3): the claims file's
    descriptor, which owns the locks, and the claims held after an action
    until its record is durable.
    """

    def __init__(self, path: str, *, clock: IReactorTime, wait_timeout: float, log: Logger) -> None:
        """
        @param path: the ledger file; C{<path>.claims} holds the locks.
        @param clock: for polling a key another process holds.
        @param wait_timeout: seconds to wait for another process (L{claim}).
        @param log: the ledger's logger.
        """
        self.path = path
        self._clock = clock
        self._wait_timeout = wait_timeout
        self.log = log
        self._claims_fd = -1  # the descriptor that owns this object's claims
        # Keys whose action is done but whose record is not durable yet: their
        # claims stay locked so that other processes wait.
        self._held: dict[bytes, _KeyLock] = {}
        self._pauses: set[Deferred[None]] = set()
        self._waiting = True  # until the ledger closes

    def open(self) -> None:
        """
        Open (or create) the claims file.

        @raise OSError: it cannot be opened.
        """
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self._claims_fd = os.open(self.path + ".claims", flags, 0o600)

    @property
    def held(self) -> KeysView[bytes]:
        """The keys whose claims are held until their records are durable."""
        return self._held.keys()

    def hold(self, key: bytes, lock: _KeyLock) -> None:
        """
        Keep C{key}'s claim until L{release_held}: its action is done, its
        record not durable yet.
        """
        self._held[key] = lock

    def stop_waiting(self) -> None:
        """The ledger is closing: calls waiting for another process fail."""
        self._waiting = False
        for pause in list(self._pauses):
            pause.cancel()

    def close(self) -> None:
        """Close the claims file (the kernel releases its locks)."""
        if self._claims_fd >= 0:
            os.close(self._claims_fd)
            self._claims_fd = -1

    async def claim(
        self, key: bytes, look: Callable[[bytes], Outcome | None]
    ) -> tuple[Outcome | None, _KeyLock | None]:
        """
        Claim the key, or wait until the process that holds it is done.

        @param look: catches up with the file and looks C{key} up (the
            ledger's L{gsmail.ledger.store._RecordStore}); called after each
            attempt to take the lock, whether it was taken or not.
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
                known = look(key)  # catches up: what the previous holder recorded
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
            if not self._waiting:
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
        Fire after the poll interval; L{stop_waiting} cancels it.
        """
        d: Deferred[None] = deferLater(self._clock, _POLL_INTERVAL, lambda: None)
        self._pauses.add(d)

        def done(result: object) -> object:
            self._pauses.discard(d)
            return result

        d.addBoth(done)
        return d

    def release_held(self) -> None:
        """
        The records of the held keys are durable now: let other processes see.
        """
        held, self._held = self._held, {}
        for lock in held.values():
            lock.release()
