"""
Tests for L{gsmail.handoff.SerialThread}, the ledger's fsync thread.
"""

from __future__ import annotations

import threading
from typing import cast

from twisted.internet import reactor as _reactor
from twisted.internet.defer import gatherResults
from twisted.internet.interfaces import IReactorFromThreads
from twisted.trial.unittest import TestCase

from gsmail.handoff import SerialThread

reactor = cast(IReactorFromThreads, _reactor)


class SerialThreadTests(TestCase):
    def test_jobs_run_in_order_off_the_reactor(self) -> object:
        """
        Jobs run one after another, in the order given, in a thread that is
        not the reactor's; each Deferred fires in the reactor thread.
        """
        serial = SerialThread(reactor, "test-serial")
        self.addCleanup(serial.stop)
        ran: list[tuple[int, str]] = []
        fired_in: list[str] = []

        def job(n: int) -> None:
            ran.append((n, threading.current_thread().name))

        ds = [serial(lambda n=n: job(n)) for n in range(50)]
        for d in ds:
            d.addCallback(lambda _: fired_in.append(threading.current_thread().name))

        def check(_: object) -> None:
            self.assertEqual([n for n, _ in ran], list(range(50)))
            self.assertEqual({name for _, name in ran}, {"test-serial"})
            self.assertEqual(set(fired_in), {threading.current_thread().name})
            self.assertNotEqual(threading.current_thread().name, "test-serial")

        return gatherResults(ds).addCallback(check)

    def test_failure(self) -> object:
        """A job's exception fails its Deferred, and the next job still runs."""
        serial = SerialThread(reactor)
        self.addCleanup(serial.stop)

        def broken() -> None:
            raise OSError(5, "Input/output error")

        bad = serial(broken)
        good = serial(lambda: None)
        d = self.assertFailure(bad, OSError)
        return d.addCallback(lambda _: good)

    def test_stopped(self) -> object:
        """After stop, jobs already queued finish and new ones are refused."""
        serial = SerialThread(reactor)
        done: list[int] = []
        queued = serial(lambda: done.append(1))
        serial.stop()
        refused = serial(lambda: done.append(2))
        self.failureResultOf(refused, RuntimeError)
        return queued.addCallback(lambda _: self.assertEqual(done, [1]))
