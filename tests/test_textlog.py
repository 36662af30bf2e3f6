"""
Tests for L{gsmail.textlog}: gsmail's text log writes what twistd's own
text observer writes, for every kind of event, and twistd's options and
SIGHUP's reopening work with it.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import (
    Logger,
    LogLevel,
    LogPublisher,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    textFileLogObserver,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from gsmail import maillog
from gsmail.reload import log_files, reopen_log_files
from gsmail.textlog import TextLogObserver, event_text, held_writes, text_log_observer
from tests.fakes import CountingFile


def twistd_line(event: dict[str, Any]) -> str | None:
    """What twistd's own text observer writes for C{event}."""
    return formatEventAsClassicLogText(event, lambda when: formatTime(when, timeFormatRFC3339))


def recorded(emit: Any) -> list[dict[str, Any]]:
    """The events C{emit(log)} makes through a L{Logger}."""
    events: list[dict[str, Any]] = []
    emit(Logger(namespace="gsmail.test", observer=events.append))
    return events


def sample_events() -> list[dict[str, Any]]:
    """Events of every kind gsmail's log sees."""
    events: list[dict[str, Any]] = []
    events += recorded(lambda log: log.info("gsmail ready: ESMTP on {address}", address="[::]:25"))
    events += recorded(lambda log: log.warn("{n} of {m} {{braces}} {{", n=1, m=2))
    events += recorded(lambda log: log.info("Größe {value!r} {value}", value="née ✓ {x}"))
    events += recorded(lambda log: log.error("a bad template {missing}"))
    events += recorded(lambda log: log.info("a call {f()}", f=lambda: "made"))
    events += recorded(lambda log: log.info("two\nlines"))
    events += recorded(lambda log: log.debug(""))
    events += recorded(lambda log: log.info(None))
    events += recorded(lambda log: log.info("}"))
    events += recorded(lambda log: maillog.connect("smtp", "unknown[192.0.2.1]", log=log))
    events += recorded(
        lambda log: maillog.queued(
            "3F2A9C1E01", "a{b}c@exämple.org", 4213, 1, "smtp", log=log, message_id="<{x}@y>"
        )
    )
    events += recorded(
        lambda log: maillog.delivery(
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
            log=log,
        )
    )
    events += recorded(
        lambda log: maillog.reject(
            "RCPT",
            550,
            "5.1.1",
            "No such group <x}@example.com>",
            client="unknown[192.0.2.1]",
            proto="ESMTP",
            listener="smtp",
            helo="mail{.example.org",
            sender="",
            recipient="x}@example.com",
            log=log,
        )
    )
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        failure = Failure()
    events += recorded(lambda log: log.failure("Reloading failed {n}", failure, n=3))
    events += recorded(lambda log: log.failure("", failure))
    # What the main process makes of an inbound worker's line (gsmail.workers).
    events.append(
        {
            "log_format": "{gsmail_text}",
            "gsmail_text": "3F2A9C1E01: client=unknown[192.0.2.1] {not a field}",
            "log_time": 1764862741.5,
            "log_level": LogLevel.info,
            "log_namespace": "gsmail.workers",
            "log_system": "inbound-1 gsmail.inbound.protocol.SMTPServer#info",
            "gsmail_event": "client",
        }
    )
    # A JSON log read back (flattened), a legacy log.msg-shaped event, odd systems.
    events.append(eventFromJSON(eventAsJSON(events[0])))
    events.append({"log_format": "no time, no level", "log_system": 42})
    events.append({"log_format": b"bytes template {x}", "x": 1, "log_time": None})
    events.append({"message": ("legacy",), "log_time": time.time()})
    return events


class FormatTests(SynchronousTestCase):
    """L{TextLogObserver.format} is twistd's line, byte for byte."""

    def test_same_lines_as_twistd(self) -> None:
        """
        Text events, mail log lines, braces in values, non-ASCII, failures with
        their tracebacks, relayed worker lines, events without text: each line
        is exactly what twistd's text observer writes.
        """
        observer = TextLogObserver(io.StringIO())
        events = sample_events()
        for event in events:
            self.assertEqual(observer.format(event), twistd_line(event), event)
        lines = [observer.format(e) for e in events]
        self.assertIn(None, lines)  # events without text write nothing
        self.assertTrue(any(line and "Traceback" in line for line in lines))

    def test_event_text(self) -> None:
        """L{event_text} is L{twisted.logger.formatEvent}'s text."""
        for event in sample_events():
            self.assertEqual(event_text(event), formatEvent(event), event)

    def test_time_stamps(self) -> None:
        """
        The time stamp of each event is its own second's, also when one
        second's stamp was made before (kept) and at the last microsecond of
        a second (which C{datetime} rounds up), in a zone with summer time.
        """
        if not os.path.exists("/usr/share/zoneinfo/Europe/Berlin"):
            raise SkipTest("no time zone data (tzdata)")
        previous = os.environ.get("TZ")
        os.environ["TZ"] = "Europe/Berlin"
        time.tzset()

        def restore() -> None:
            if previous is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = previous
            time.tzset()

        self.addCleanup(restore)
        observer = TextLogObserver(io.StringIO())
        # Berlin's summer time ended at 2026-10-25T01:00:00Z.
        change = 1792890000.0
        times = [
            change - 3600.5,
            change - 1.2,
            change - 1.0000001,
            change - 0.9999996,
            change - 0.0000004,
            change,
            change + 0.5,
            change + 0.9999999,
            change + 1,
            change + 0.5,
            0.0,
            -1.5,
        ]
        for when in times:
            event = {"log_format": "x", "log_time": when}
            self.assertEqual(observer.format(event), twistd_line(event), when)
        stamps = {observer.format({"log_format": "x", "log_time": w}) for w in times[:8]}
        self.assertIn("2026-10-25T02:59:59+0200 [-#-] x\n", stamps)
        self.assertIn("2026-10-25T02:00:00+0100 [-#-] x\n", stamps)


class WriteTests(SynchronousTestCase):
    """What reaches the file."""

    def test_log_file(self) -> None:
        """
        To twistd's C{--logfile} (a L{LogFile}), the bytes twistd's observer
        writes, in UTF-8, one flushed line per event.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ours = LogFile.fromFullPath(os.path.join(directory, "ours.log"))
        theirs = LogFile.fromFullPath(os.path.join(directory, "theirs.log"))
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        publisher = LogPublisher(TextLogObserver(ours), textFileLogObserver(theirs))  # type: ignore[arg-type]
        for event in sample_events():
            publisher(event)
        with open(ours.path, "rb") as f:
            written = f.read()
        with open(theirs.path, "rb") as f:
            self.assertEqual(written, f.read())
        self.assertIn("née ✓".encode(), written)
        self.assertGreater(written.count(b"\n"), 15)

    def test_binary_file(self) -> None:
        """A file open for bytes gets UTF-8."""
        out = io.BytesIO()
        TextLogObserver(out)({"log_format": "née", "log_time": 0.0})
        self.assertEqual(
            out.getvalue().decode("utf-8"), twistd_line({"log_format": "née", "log_time": 0.0})
        )


class HeldWritesTests(SynchronousTestCase):
    """L{held_writes}: a batch of events written together."""

    def test_one_write_for_the_batch(self) -> None:
        """
        Within L{held_writes} nothing is written; when it ends, every line,
        in order and the same bytes as without it, with one write and one
        flush.
        """
        events = sample_events()
        plain, batched = CountingFile(), CountingFile()
        for event in events:
            TextLogObserver(plain)(event)
        observer = TextLogObserver(batched)
        with held_writes():
            for event in events:
                observer(event)
            with held_writes():  # nested: still held until the outermost ends
                observer({"log_format": "inner", "log_time": 0.0})
            self.assertEqual((batched.getvalue(), batched.writes), (b"", 0))
        self.assertEqual(
            batched.getvalue(),
            plain.getvalue() + twistd_line({"log_format": "inner", "log_time": 0.0}).encode(),
        )
        self.assertEqual((batched.writes, batched.flushes), (1, 1))
        self.assertGreater(plain.writes, 15)

    def test_written_when_the_block_fails(self) -> None:
        """Lines held when the block raises are written all the same."""
        out = CountingFile()
        observer = TextLogObserver(out)
        with self.assertRaises(ZeroDivisionError):
            with held_writes():
                observer({"log_format": "before the error", "log_time": 0.0})
                raise ZeroDivisionError()
        self.assertIn(b"before the error", out.getvalue())
        with held_writes():
            pass
        self.assertEqual(out.writes, 1)

    def test_other_threads_not_held(self) -> None:
        """An event from another thread is written at once."""
        import threading

        out = CountingFile()
        observer = TextLogObserver(out)
        with held_writes():
            observer({"log_format": "held", "log_time": 0.0})
            thread = threading.Thread(
                target=observer, args=({"log_format": "from a thread", "log_time": 0.0},)
            )
            thread.start()
            thread.join(10)
            self.assertIn(b"from a thread", out.getvalue())
            self.assertNotIn(b"held", out.getvalue())
        self.assertIn(b"held", out.getvalue())

    def test_unwritable_log(self) -> None:
        """A log that cannot be written does not fail the block, nor the other logs."""

        class Broken(CountingFile):
            def write(self, data: Any) -> int:
                raise OSError("disk full")

        good = CountingFile()
        with held_writes():
            TextLogObserver(Broken())({"log_format": "lost", "log_time": 0.0})
            TextLogObserver(good)({"log_format": "kept", "log_time": 0.0})
        self.assertIn(b"kept", good.getvalue())


class ReopenTests(SynchronousTestCase):
    """SIGHUP's reopening (L{gsmail.reload}) finds the file and the lines follow it."""

    def test_reopen_after_rename(self) -> None:
        """After logrotate renamed it and a reopen, new lines go to the new file."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        log_file = LogFile.fromFullPath(os.path.join(directory, "gsmail.log"))
        self.addCleanup(log_file.close)
        observer = TextLogObserver(log_file)  # type: ignore[arg-type]
        self.assertEqual(log_files([object(), observer]), [log_file])
        observer({"log_format": "before", "log_time": 0.0})
        os.rename(log_file.path, log_file.path + ".1")
        self.assertEqual(reopen_log_files(log_files([observer])), [log_file.path])
        observer({"log_format": "after", "log_time": 0.0})
        with open(log_file.path) as f:
            self.assertTrue(f.read().endswith(" after\n"))
        with open(log_file.path + ".1") as f:
            self.assertTrue(f.read().endswith(" before\n"))

    def test_standard_output(self) -> None:
        """Standard output (the journal) is no file to reopen."""
        self.assertEqual(log_files([TextLogObserver(io.StringIO())]), [])


class TwistdOptionsTests(TestCase):
    """L{text_log_observer} writes where twistd's own observer would."""

    def setUp(self) -> None:
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def test_standard_output(self) -> None:
        """C{--logfile -}, or none with C{-n}: standard output."""
        for parent in ({"logfile": "-", "nodaemon": True}, {"logfile": None, "nodaemon": True}):
            self.assertEqual(log_files([text_log_observer(parent)]), [])
            self.assertIs(text_log_observer(parent)._outFile, sys.stdout)

    def test_daemon_to_standard_output(self) -> None:
        """A daemon cannot log to standard output, as twistd says."""
        with self.assertRaises(SystemExit):
            text_log_observer({"logfile": "-", "nodaemon": False})

    async def test_log_file_rotated_on_usr1(self) -> None:
        """
        C{--logfile PATH}: that file, by its absolute path; SIGUSR1 rotates
        it as twistd's does (unless a handler was set before).
        """
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "gsmail.log")
        observer = text_log_observer({"logfile": path, "nodaemon": False})
        [log_file] = log_files([observer])
        self.addCleanup(log_file.close)
        self.assertEqual(log_file.path, os.path.abspath(path))
        observer({"log_format": "first", "log_time": 0.0})
        handler = signal.getsignal(signal.SIGUSR1)
        assert callable(handler)
        handler(signal.SIGUSR1, None)
        await deferLater(reactor, 0, lambda: None)  # type: ignore[arg-type]
        observer({"log_format": "second", "log_time": 0.0})
        with open(path + ".1") as f:
            self.assertTrue(f.read().endswith(" first\n"))
        with open(path) as f:
            self.assertTrue(f.read().endswith(" second\n"))

    def test_usr1_handler_kept(self) -> None:
        """A SIGUSR1 handler set before is left alone."""

        def mine(signum: int, frame: Any) -> None:
            pass

        signal.signal(signal.SIGUSR1, mine)
        directory = self.mktemp()
        os.makedirs(directory)
        observer = text_log_observer({"logfile": os.path.join(directory, "x.log")})
        for log_file in log_files([observer]):
            self.addCleanup(log_file.close)
        self.assertIs(signal.getsignal(signal.SIGUSR1), mine)
