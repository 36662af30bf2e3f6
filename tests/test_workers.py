"""
Unit tests for the inbound worker supervision in L{gsmail.workers}: the setup
handed to a worker, the log relay, restarts with back-off and stopping, with
a fake process transport and a memory clock (the real processes are in
tests.integration.test_workers).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import attrs
from twisted.internet.error import ConnectionDone, ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogEvent, Logger, LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from gsmail import maillog
from gsmail.textlog import TextLogObserver
from gsmail.workers import (
    STABLE_AFTER,
    STOP_GRACE,
    WorkerSetup,
    _EventLines,
    _ParentWatch,
    parent_alive,
    read_setup,
    write_setup,
)
from tests.fakes import CountingFile, started
from tests.util import ROOT, TOKEN, make_config


class SetupTests(SynchronousTestCase):
    """What a worker is told on its standard input."""

    def test_round_trip(self) -> None:
        """A setup written for a worker reads back equal, token included."""
        workers = started(self)
        setup = read_setup(io.BytesIO(workers.spawned[1].written))
        self.assertEqual(setup.number, 2)
        self.assertEqual(setup.config.token, TOKEN)
        self.assertEqual(setup.config.url, "http://127.0.0.1:8080")
        self.assertEqual(setup.listeners, (("lmtp", 3, 2), ("smtp", 4, 2)))

    def test_listening_sockets_are_descriptors_3_and_4(self) -> None:
        """The listening sockets are mapped to the worker's descriptors 3 and 4."""
        workers = started(self)
        self.assertEqual(workers._child_fds, {0: "w", 1: "r", 2: "r", 3: 8, 4: 7})

    def test_cut_short(self) -> None:
        """A setup cut short, or missing, is refused with EOFError."""
        data = write_setup(WorkerSetup(make_config(self.mktemp()), 1, ()))
        for cut in (b"", data[:5], data[:-1]):
            with self.subTest(length=len(cut)):
                self.assertRaises(EOFError, read_setup, io.BytesIO(cut))

    def test_not_a_setup(self) -> None:
        """Anything but a L{WorkerSetup} is refused with ValueError."""
        data = pickle.dumps({"config": None})
        stream = io.BytesIO(len(data).to_bytes(8, "big") + data)
        self.assertRaises(ValueError, read_setup, stream)


class RelayTests(SynchronousTestCase):
    """A worker's log lines reach the main process's observers."""

    def line(self, event: LogEvent) -> bytes:
        out = io.BytesIO()
        _EventLines(out)(event)
        return out.getvalue()

    def test_rendered_in_the_worker(self) -> None:
        """
        An event is rendered by the worker (format specs kept) and re-emitted
        with the worker's number in its system.
        """
        workers = started(self)
        line = self.line(
            {
                "log_format": "answered {status} in {elapsed:.3f} s",
                "status": 200,
                "elapsed": 0.123456,
                "log_level": LogLevel.warn,
                "log_namespace": "gsmail.groupserver",
                "log_time": 1700000000.5,
            }
        )
        workers.slots[1].outReceived(line)
        [event] = workers.events
        self.assertEqual(formatEvent(event), "answered 200 in 0.123 s")
        self.assertEqual(event["log_system"], "inbound-2 gsmail.groupserver#warn")
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["log_time"], 1700000000.5)
        self.assertEqual(event["gsmail_worker"], 2)

    def test_mail_log_fields_survive(self) -> None:
        """
        A mail log line (L{gsmail.maillog}) reaches the main process with its
        fields, values and types intact, as well as its text; the relay's
        own keys are not taken from the worker's fields.
        """
        workers = started(self)
        out = io.BytesIO()
        logger = Logger(namespace="gsmail.inbound.delivery", observer=_EventLines(out))
        maillog.delivery(
            "3F2A9C1E01",
            "dev@groups.example.com",
            "groupserver",
            0.21,
            "0.01/0/0.2",
            "2.0.0",
            "sent",
            "Added to the group",
            "smtp",
            group="dev",
            log=logger,
            gsmail_worker=99,
        )
        workers.slots[1].outReceived(out.getvalue())
        [event] = workers.events
        self.assertEqual(
            formatEvent(event),
            "3F2A9C1E01: to=<dev@groups.example.com>, group=dev, relay=groupserver, delay=0.21,"
            " delays=0.01/0/0.2, dsn=2.0.0, status=sent (Added to the group)",
        )
        self.assertEqual(
            {key: event[key] for key in ("gsmail_event", "queue_id", "delay", "status", "group")},
            {
                "gsmail_event": "delivery",
                "queue_id": "3F2A9C1E01",
                "delay": 0.21,
                "status": "sent",
                "group": "dev",
            },
        )
        self.assertEqual(event["gsmail_worker"], 2)
        self.assertEqual(event["log_system"], "inbound-2 gsmail.inbound.delivery#info")

    def test_braces_and_failures(self) -> None:
        """Braces in the text survive, and a failure's traceback follows its text."""
        workers = started(self)
        try:
            raise ValueError("boom {x}")
        except ValueError:
            failure = Failure()
        line = self.line(
            {
                "log_format": "it broke: {what}",
                "what": "{not a field}",
                "log_failure": failure,
                "log_level": LogLevel.critical,
                "log_system": "InboundFactory,3,127.0.0.1",
                "log_time": 1.0,
            }
        )
        workers.slots[0].outReceived(line)
        [event] = workers.events
        text = formatEvent(event)
        self.assertTrue(text.startswith("it broke: {not a field}\nTraceback"), text)
        self.assertIn("ValueError: boom {x}", text)
        self.assertEqual(event["log_system"], "inbound-1 InboundFactory,3,127.0.0.1")

    def test_lines_in_pieces(self) -> None:
        """Lines split across reads, or several in one read, are relayed whole and in order."""
        workers = started(self)
        data = b"".join(
            self.line({"log_format": f"event {n}", "log_level": LogLevel.info, "log_time": 1.0})
            for n in range(3)
        )
        slot = workers.slots[0]
        for piece in (data[:10], data[10:50], data[50:]):
            slot.outReceived(piece)
        self.assertEqual(
            [formatEvent(e) for e in workers.events], ["event 0", "event 1", "event 2"]
        )

    def test_one_text_log_write_per_read(self) -> None:
        """
        The lines of one read from a worker reach the text log with one
        write (a worker writes its info lines in batches: one system call
        per batch in the main process, not one per line), each line as it
        would be written alone.
        """
        workers = started(self)
        out = CountingFile()
        workers.publisher = TextLogObserver(out)
        data = b"".join(
            self.line({"log_format": f"event {n}", "log_level": LogLevel.info, "log_time": 1.0})
            for n in range(3)
        )
        workers.slots[0].outReceived(data)
        self.assertEqual(out.writes, 1)
        lines = out.getvalue().decode().splitlines()
        self.assertEqual(
            [line.split(" ", 1)[1] for line in lines],
            [f"[inbound-1 -#info] event {n}" for n in range(3)],
        )

    def test_garbage_logged_once(self) -> None:
        """A line that is not an event is logged as an error, quoted, and not relayed."""
        workers = started(self)
        with capturedLogs() as logged:
            workers.slots[0].outReceived(b"Traceback: not json\n[1, 2]\n")
        self.assertEqual(workers.events, [])
        texts = [formatEvent(e) for e in logged]
        self.assertEqual(len(texts), 2, texts)
        self.assertIn("b'Traceback: not json'", texts[0])

    def test_ready(self) -> None:
        """The ready line is not an event: it fires L{InboundWorkers.when_ready} once all are ready."""
        workers = started(self)
        ready = workers.when_ready()
        workers.slots[0].outReceived(b'{"ready": true}\n')
        self.assertNoResult(ready)
        workers.slots[1].outReceived(b'{"ready": true}\n')
        self.successResultOf(ready)
        self.assertEqual(workers.events, [])

    def test_standard_error(self) -> None:
        """Standard error (a crash) is logged line by line as errors, the last line at exit."""
        workers = started(self)
        slot = workers.slots[0]
        with capturedLogs() as logged:
            slot.errReceived(b"Traceback (most recent call last):\n  File")
            slot.errReceived(b' "x.py"\nMemoryError')
            workers.running = False
            slot.processEnded(Failure(ProcessDone(0)))
        texts = [formatEvent(e) for e in logged if e.get("log_level") == LogLevel.error]
        self.assertEqual(
            texts,
            [
                "Inbound worker 1: Traceback (most recent call last):",
                'Inbound worker 1:   File "x.py"',
                "Inbound worker 1: MemoryError",
            ],
        )

    def test_token_on_standard_input_only(self) -> None:
        """The worker command line and environment do not carry the token (it goes on stdin)."""
        workers = started(self)
        self.assertNotIn(TOKEN, " ".join(workers.argv))
        self.assertIn(TOKEN.encode(), workers.spawned[0].written)


class RestartTests(SynchronousTestCase):
    """A worker that exits while gsmail runs is started again."""

    def test_backoff(self) -> None:
        """
        A worker that keeps dying young is restarted after 0.5, 1, 2, ... up
        to 30 seconds; one that ran a minute is restarted at once.
        """
        workers = started(self, count=1)
        slot = workers.slots[0]
        delays = []
        for _ in range(8):
            with capturedLogs():
                slot.processEnded(Failure(ProcessTerminated(signal=9)))
            [call] = workers.clock.getDelayedCalls()
            delays.append(call.getTime() - workers.clock.seconds())
            workers.clock.advance(delays[-1])
        self.assertEqual(delays, [0.5, 1, 2, 4, 8, 16, 30, 30])
        self.assertEqual(len(workers.spawned), 9)
        workers.clock.advance(STABLE_AFTER)
        with capturedLogs() as logged:
            slot.processEnded(Failure(ProcessTerminated(exitCode=1)))
        [call] = workers.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), workers.clock.seconds())
        [text] = [formatEvent(e) for e in logged]
        self.assertEqual(
            text,
            f"Inbound worker 1 (pid 1008) exited with status 1 after {STABLE_AFTER:.1f} s; "
            "starting it again in 0 s",
        )

    def test_killed_logged(self) -> None:
        """The log says how the worker ended; the slot is not ready until its next process is."""
        workers = started(self, count=1)
        workers.slots[0].outReceived(b'{"ready": true}\n')
        with capturedLogs() as logged:
            workers.slots[0].processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertIn("(pid 1000) was killed by signal 9 after 0.0 s", formatEvent(logged[0]))
        self.assertEqual(workers.pids(), [])
        ready = workers.when_ready()
        workers.clock.advance(0.5)
        self.assertEqual(workers.pids(), [1001])
        self.assertNoResult(ready)  # not until the new process says so
        workers.slots[0].outReceived(b'{"ready": true}\n')
        self.successResultOf(ready)

    def test_spool_files_of_the_dead_removed(self) -> None:
        """The spool files a crashed worker left are removed; others' are kept."""
        workers = started(self, count=1)
        spool = workers.config.spool_dir
        os.makedirs(spool)
        for name in ("gsmail-1000-0.eml", "gsmail-1000-7.eml", "gsmail-10000-1.eml", "x.eml"):
            with open(os.path.join(spool, name), "w"):
                pass
        with capturedLogs():
            workers.slots[0].processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(sorted(os.listdir(spool)), ["gsmail-10000-1.eml", "x.eml"])


class StopTests(SynchronousTestCase):
    """Stopping the workers."""

    def test_graceful(self) -> None:
        """Stopping closes each worker's standard input and fires when all have exited."""
        workers = started(self)
        done = workers.stop()
        self.assertEqual([t.stdin_closed for t in workers.spawned], [True, True])
        self.assertNoResult(done)
        for slot in workers.slots:
            slot.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(done)
        self.assertEqual(workers.clock.getDelayedCalls(), [])
        self.assertEqual(len(workers.spawned), 2)  # none started again

    def test_killed_after_deadline(self) -> None:
        """A worker still running reply_deadline + 15 s after the stop is killed."""
        workers = started(self, count=1)
        done = workers.stop()
        workers.clock.advance(100.0 + STOP_GRACE - 0.1)
        self.assertEqual(workers.spawned[0].signals, [])
        with capturedLogs() as logged:
            workers.clock.advance(0.1)
        self.assertEqual(workers.spawned[0].signals, ["KILL"])
        self.assertIn("did not stop in time: killed", formatEvent(logged[0]))
        workers.slots[0].processEnded(Failure(ProcessTerminated(signal=9)))
        self.successResultOf(done)

    def test_pending_restart_cancelled(self) -> None:
        """A restart that was waiting is called off by the stop."""
        workers = started(self, count=1)
        with capturedLogs():
            workers.slots[0].processEnded(Failure(ProcessTerminated(signal=9)))
        self.successResultOf(workers.stop())
        self.assertEqual(workers.clock.getDelayedCalls(), [])
        self.assertEqual(len(workers.spawned), 1)


class WorkerSideTests(SynchronousTestCase):
    """The worker process's end of the pipes."""

    def test_parent_watch(self) -> None:
        """Standard input's end (the main process closed it, or died) is noticed."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        closed: list[bool] = []
        watch = _ParentWatch(read, lambda: closed.append(True))
        os.write(write, b"ignored")
        self.assertIsNone(watch.doRead())
        self.assertIsNone(watch.doRead())  # nothing to read: not an end
        os.close(write)
        result = watch.doRead()
        self.assertIsInstance(result, ConnectionDone)
        watch.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(closed, [True])

    def test_event_line(self) -> None:
        """An event becomes one JSON line: time, level, system, text."""
        out = io.BytesIO()
        observer = _EventLines(out)
        Logger(namespace="gsmail.x", observer=observer).info("posted {n:,} bytes", n=12345)
        [record] = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(record[1:], ["info", "gsmail.x#info", "posted 12,345 bytes"])
        self.assertIsInstance(record[0], float)

    def test_info_lines_batched(self) -> None:
        """
        Lines below warning level are written together 0.1 s after the
        first; a warning is written at once, with what came before it.
        """
        out = io.BytesIO()
        clock = Clock()
        observer = _EventLines(out, clock.callLater)
        logger = Logger(namespace="gsmail.x", observer=observer)
        logger.info("one")
        logger.debug("two")
        clock.advance(0.05)
        self.assertEqual(out.getvalue(), b"")
        clock.advance(0.05)
        self.assertEqual([json.loads(x)[3] for x in out.getvalue().splitlines()], ["one", "two"])
        logger.info("three")
        logger.warn("four")
        texts = [json.loads(x)[3] for x in out.getvalue().splitlines()]
        self.assertEqual(texts, ["one", "two", "three", "four"])
        clock.advance(1)
        self.assertEqual(len(out.getvalue().splitlines()), 4)


#: A process that starts a child which asks to die with its parent
#: (L{die_with_parent}), prints the child's pid, and waits to be killed.
_PARENT_SCRIPT = """
import subprocess, sys
child = subprocess.Popen(
    [sys.executable, "-c",
     "import sys, time; from gsmail.workers import die_with_parent;"
     " ok = die_with_parent(); print(int(ok), flush=True); time.sleep(60)"],
    stdout=subprocess.PIPE,
)
print(child.pid, child.stdout.readline().decode().strip(), flush=True)
sys.stdin.read()
"""


def _running(pid: int) -> bool:
    """Whether C{pid} exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


class ParentDeathTests(SynchronousTestCase):
    """A worker does not outlive the main process (real processes, Linux)."""

    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("PR_SET_PDEATHSIG is Linux's")

    def test_setup_names_the_parent(self) -> None:
        """The setup carries the main process's pid; the check compares it with getppid()."""
        workers = started(self)
        setup = read_setup(io.BytesIO(workers.spawned[0].written))
        self.assertEqual(setup.parent, os.getpid())
        self.assertTrue(parent_alive(attrs.evolve(setup, parent=os.getppid())))
        self.assertFalse(parent_alive(attrs.evolve(setup, parent=os.getpid())))
        self.assertTrue(parent_alive(attrs.evolve(setup, parent=0)))

    def test_child_dies_with_parent(self) -> None:
        """
        A process that called L{die_with_parent} gets SIGTERM and ends
        within a few seconds of its parent being killed with SIGKILL,
        though nothing else tells it.
        """
        env = dict(os.environ, PYTHONPATH=ROOT)
        parent = subprocess.Popen(
            [sys.executable, "-c", _PARENT_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert parent.stdout is not None and parent.stdin is not None
        self.addCleanup(parent.stdin.close)
        self.addCleanup(parent.stdout.close)
        child_pid, took = (int(w) for w in parent.stdout.readline().split())
        self.addCleanup(lambda: _running(child_pid) and os.kill(child_pid, signal.SIGKILL))
        self.assertEqual(took, 1)
        self.assertTrue(_running(child_pid))
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 5
        while _running(child_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertFalse(_running(child_pid), "the child outlived its parent")

    def test_parent_gone_before_the_check(self) -> None:
        """
        A worker whose setup names a main process that is no longer its
        parent (it died before PR_SET_PDEATHSIG was set) exits at once,
        status 3, before it touches a listening socket.
        """
        setup = WorkerSetup(make_config(self.mktemp()), 1, (), parent=os.getpid() + 1)
        result = subprocess.run(
            [sys.executable, "-m", "gsmail.workers"],
            input=write_setup(setup),
            capture_output=True,
            timeout=30,
            env=dict(os.environ, PYTHONPATH=ROOT),
            check=False,
        )
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertIn(b"the main process is gone", result.stderr)
