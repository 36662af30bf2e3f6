# -*- test-case-name: tests.test_handoff -*-
"""
A hand-off of blocking work to one thread of its own, for the post ledger's
group-committed appends: one C{write} and C{fsync} at a time, in order.

Twisted's reactor thread pool would do, but each job there passes a
coordinator and two Python-level queues; at hundreds of posts a second that
was a twentieth of the reactor thread's time. Here a job costs one
C{SimpleQueue.put} (C code) and one C{callFromThread} back.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

__all__ = ["SerialThread"]

_Job = tuple[Callable[[], None], Deferred[None]]


class SerialThread:
    """
    Run blocking jobs in one thread, one after another, in the order given.
    Call it like the ledger's C{sync}: C{serial(job) -> Deferred[None]},
    fired in the reactor thread with C{None}, or with the job's exception.

    The thread starts at the first job and ends after L{stop}; it is a
    daemon thread, so a job stuck in the kernel never keeps the process
    from exiting.

    @param reactor: where results are delivered (C{callFromThread}).
    @param name: the thread's name, as C{ps -L} and log lines show it.
    """

    def __init__(self, reactor: IReactorFromThreads, name: str = "gsmail-sync") -> None:
        self._reactor = reactor
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def __call__(self, job: Callable[[], None]) -> Deferred[None]:
        """
        Queue C{job}.

        @return: fires with C{None} when it returned, or fails with what it
            raised; fails with C{RuntimeError} after L{stop}.
        """
        if self._stopped:
            return fail(RuntimeError(f"{self._name} is stopped"))
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        d: Deferred[None] = Deferred()
        self._jobs.put((job, d))
        return d

    def stop(self) -> None:
        """
        Let the thread end once the jobs queued so far are done; their
        Deferreds still fire (if the reactor still runs).
        """
        if not self._stopped:
            self._stopped = True
            if self._thread is not None:
                self._jobs.put(None)

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, d = item
            result: Any
            try:
                job()
            except BaseException:
                result = Failure()  # type: ignore[no-untyped-call]
                self._reactor.callFromThread(d.errback, result)
            else:
                self._reactor.callFromThread(d.callback, None)
