# -*- test-case-name: tests.test_textlog -*-
"""
twistd's text log, written for less CPU per line.

twistd writes each event as C{TIMESTAMP [SYSTEM] TEXT} through
L{twisted.logger.textFileLogObserver}. With Postfix-shaped lines
(L{gsmail.maillog}: five events per inbound message, one per outbound
recipient) that formatting was a sixth of gsmail's CPU under load: per event,
a timezone lookup, a C{datetime} and C{strftime} for the time stamp, and
C{string.Formatter} for a text that L{gsmail.maillog} had already made.

L{TextLogObserver} writes the same lines, byte for byte
(L{twisted.logger.formatEventAsClassicLogText} with twistd's
C{timeFormatRFC3339}), for less:

  - the time stamp is made once per second of C{log_time};
  - a C{log_format} without braces is the text itself (what
    L{gsmail.maillog} emits, unless a value has a brace in it), and
    C{"{gsmail_text}"} (a line relayed from an inbound worker,
    L{gsmail.workers}) is that field;
  - anything else (other templates, failures with their tracebacks,
    C{log_flattened} events) goes through Twisted's own formatting.

Lines relayed from inbound workers (L{gsmail.workers}) arrive in batches,
a pipe read's worth at a time; the main process publishes each batch inside
L{held_writes}, and the observer writes the batch's lines with one write
and one flush rather than one of each per line (a system call per line was
three quarters of the main process's CPU with two workers under load).

L{gsmail.tap} hands it to twistd in place of twistd's own text observer,
writing where twistd would (C{--logfile}), so C{--logfile}, C{--logger},
C{--syslog}, SIGHUP's reopening (L{gsmail.reload.log_files} finds its file)
and SIGUSR1's rotation behave as before.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    LogEvent,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.compat import ioType
from twisted.python.logfile import BaseLogFile, LogFile
from zope.interface import implementer

__all__ = ["TextLogObserver", "event_text", "held_writes", "text_log_observer"]

#: The relayed worker line's template (L{gsmail.workers}).
_RELAYED = "{gsmail_text}"


class _Hold(threading.local):
    """Per thread: how deep in L{held_writes}, and the observers holding lines."""

    depth = 0

    def __init__(self) -> None:
        self.holding: list[TextLogObserver] = []


_hold = _Hold()


@contextmanager
def held_writes() -> Iterator[None]:
    """
    Within this block, in this thread, every L{TextLogObserver} keeps the
    lines it is given and writes them all, with one write and one flush,
    when the outermost block ends (also when it ends by an exception).
    Lines from other threads are written at once, as always. For a batch
    of events that arrive together (L{gsmail.workers}' relay); keep the
    block short: its lines are not in the file before it ends.
    """
    _hold.depth += 1
    try:
        yield
    finally:
        _hold.depth -= 1
        if _hold.depth == 0 and _hold.holding:
            holding, _hold.holding = _hold.holding, []
            for observer in holding:
                try:
                    observer.release()
                except (OSError, ValueError):
                    pass  # a log that cannot be written: as a failing observer, not the caller's


def event_text(event: LogEvent) -> str:
    """
    The text of C{event}, as L{twisted.logger.formatEvent} makes it, made
    without a formatter when its template needs none.

    @param event: a log event.
    @return: the text (C{""} without C{log_format}); never raises.
    """
    template = event.get("log_format")
    if type(template) is str and "log_flattened" not in event:
        if "{" not in template and "}" not in template:
            return template
        if template == _RELAYED:
            text = event.get("gsmail_text")
            if type(text) is str:
                return text
    return formatEvent(event)


@implementer(ILogObserver)
class TextLogObserver:
    """
    Writes each event as one line of text, as twistd's text log does
    (L{twisted.logger.textFileLogObserver}): C{TIMESTAMP [SYSTEM] TEXT},
    the time as C{2026-12-04T15:39:01+0000}, the system the event's
    C{log_system} or C{NAMESPACE#LEVEL}, the traceback of a failure after
    the text, each line after the first indented by a tab. Writes and
    flushes once per event, as twistd's does.

    @ivar _outFile: the file written to; the name is twistd's, which
        L{gsmail.reload.log_files} looks for to reopen it on SIGHUP.
    """

    def __init__(self, out: IO[Any], time_format: str = timeFormatRFC3339) -> None:
        """
        @param out: a file open for writing, text or bytes (text is encoded
            as UTF-8), or a L{twisted.python.logfile.BaseLogFile}.
        @param time_format: C{strftime}'s format for the time stamp.
        """
        self._outFile = out
        self._encoding: str | None = None if ioType(out) is str else "utf-8"
        self._time_format = time_format
        # (second, its stamp), replaced as one: events may come from threads.
        self._cached: tuple[int, str] = (-1, "")
        # Lines kept within held_writes (by the thread that holds them).
        self._held: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        text = self.format(event)
        if text:
            if _hold.depth:
                if not self._held:
                    _hold.holding.append(self)
                self._held.append(text)
                return
            self._write(text)

    def release(self) -> None:
        """Write the lines kept within L{held_writes}, with one write and one flush."""
        held, self._held = self._held, []
        if held:
            self._write("".join(held))

    def _write(self, text: str) -> None:
        if self._encoding is None:
            self._outFile.write(text)
        else:
            self._outFile.write(text.encode(self._encoding))
        self._outFile.flush()

    def format(self, event: LogEvent) -> str | None:
        """
        The line for C{event} with its newline, as
        L{twisted.logger.formatEventAsClassicLogText} makes it with this
        time format, or C{None} when it has no text.
        """
        if "log_failure" in event:
            return formatEventAsClassicLogText(event, self._format_time)
        text = event_text(event)
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        elif type(system) is not str:
            try:
                system = str(system)
            except Exception:
                system = "UNFORMATTABLE"
        line = f"{self._format_time(event.get('log_time'))} [{system}] {text}"
        if "\n" in line:
            line = line.replace("\n", "\n\t")
        return line + "\n"

    def _format_time(self, when: float | None) -> str:
        """
        L{twisted.logger.formatTime}'s text for C{when}, kept for the rest
        of its second. Not kept for the last microsecond of a second, which
        C{datetime.fromtimestamp} rounds up to the next one.
        """
        if when is None:
            return "-"
        try:
            second = math.floor(when)
        except (TypeError, ValueError, OverflowError):
            return formatTime(when, self._time_format)
        if second < 0 or when - second >= 0.999999:
            return formatTime(when, self._time_format)
        cached = self._cached
        if second != cached[0]:
            cached = self._cached = (second, formatTime(when, self._time_format))
        return cached[1]


def text_log_observer(parent: Any) -> TextLogObserver:
    """
    The text observer gsmail gives twistd, writing where twistd would write
    its own: C{--logfile} (C{-}: standard output; none: standard output with
    C{-n}, else C{twistd.log}). As twistd does for its file, SIGUSR1 rotates
    it (renames it to C{.1}, ...) unless a handler is already set; gsmail's
    documented way is logrotate and SIGHUP (L{gsmail.reload}).

    @param parent: twistd's options (C{logfile}, C{nodaemon}).
    @raise SystemExit: C{--logfile -} without C{-n}, as twistd exits.
    """
    logfile = parent.get("logfile")
    nodaemon = parent.get("nodaemon", True)
    if logfile == "-" or (not logfile and nodaemon):
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        return TextLogObserver(sys.stdout)
    log_file = LogFile.fromFullPath(logfile or "twistd.log")
    _rotate_on_usr1(log_file)
    return TextLogObserver(log_file)  # type: ignore[arg-type]


def _rotate_on_usr1(log_file: BaseLogFile) -> None:
    """
    SIGUSR1 rotates C{log_file} in the reactor's thread, as twistd sets it
    up for its own (C{twisted.scripts._twistd_unix.UnixAppLogger}).
    """
    try:
        if signal.getsignal(signal.SIGUSR1):
            return

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    except ValueError:  # not the main thread
        pass
