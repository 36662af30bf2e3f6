# -*- test-case-name: tests.integration.test_workers,tests.test_workers -*-
"""
Inbound worker processes: more than one core for inbound mail.

One reactor is one core. With C{inbound_workers = N} in the configuration,
the main process (L{gsmail.service.GsmailService}) binds the ESMTP and LMTP
listeners as before (as root, before C{twistd -u} drops privileges), stops
accepting on them itself, and starts N worker processes
(C{python -m gsmail.workers}) that inherit the listening sockets. Each worker
runs its own reactor with the whole inbound side
(L{gsmail.inbound.parts.InboundParts}: GroupServer client, delivery core, spool
files) and accepts from the shared sockets; the kernel hands each new
connection to one of them. They share the post ledger file, which is safe
for several processes (L{gsmail.ledger}: claims are byte locks, records are
appended under a lock and read back by every process), so a message is still
posted at most once however its copies are spread over the workers. The main
process keeps the outbound side, the control socket and the embedded
stand-in. This is Postfix's shape: one master, several C{smtpd} processes.

The main process supervises:
  - B{Setup.} A worker's configuration (token included) is written to its
    standard input as one length-prefixed pickle, never on its command line
    or in its environment. The listening sockets are its descriptors 3 and 4.
  - B{Logs.} A worker writes every log event as one JSON line to its standard
    output; the main process re-emits it to its own observers (twistd's log
    file), with C{log_system} C{inbound-N} and the field C{gsmail_worker}
    (N); a mail log line (L{gsmail.maillog}) keeps its fields
    (C{gsmail_event}, C{queue_id}, ...: L{relayed_fields}). A worker writes
    its info lines in batches (L{LOG_DELAY}), and the lines of one read
    reach the text log with one write (L{gsmail.textlog.held_writes}). Anything on a
    worker's standard error (a Python crash) is logged as an error line by
    line. A line that is a JSON object is for the main process itself, not
    a log event: C{{"ready": true}} once the worker accepts, and
    C{{"metrics": snapshot}}, the worker's measured figures every few
    seconds (L{gsmail.metrics.FigurePusher}), handed to C{on_metrics}.
  - B{Reloads.} When the main process reloads (SIGHUP, L{gsmail.reload}) it
    writes the configuration it now runs with to each worker's standard
    input, as one more length-prefixed pickle (L{WorkerReload}); the worker
    applies it as the main process did (new TLS contexts, domains, route
    table, an empty group cache), or logs why not and keeps its own. A
    worker started later gets it in its setup.
  - B{Restarts.} A worker that exits while gsmail runs is logged and started
    again: at once if it ran for a minute or more, else after a delay that
    doubles from C{restart_delay[0]} up to C{restart_delay[1]} seconds, so a
    worker that cannot start does not spin. Spool files it left are removed
    (their messages were not acknowledged: the senders still have them).
    Connections that arrive meanwhile wait in the socket's backlog; none is
    refused.
  - B{Parent gone.} A worker must not outlive a main process that was
    killed (SIGKILL, the OOM killer): it would keep the inherited listening
    sockets, and the restarted gsmail could not bind them ("Address already
    in use"). Two independent signals stop it: on Linux the kernel sends it
    SIGTERM when the main process dies (C{prctl(PR_SET_PDEATHSIG)}, set first
    thing in the worker, then C{getppid()} is checked against the main
    process's pid to close the race with a death before the call), and its
    standard input ends. Either way the worker stops accepting at once
    (which frees the port), finishes its running deliveries and exits.
    PR_SET_PDEATHSIG fires when the I{thread} that started the worker ends,
    not the process: workers are spawned from the reactor thread, which
    lives as long as the main process; never spawn them from a pool thread.
  - B{Stopping.} L{InboundWorkers.stop} closes each worker's standard input:
    the worker stops accepting, lets its running deliveries finish (up to
    C{reply_deadline}, as the main process does), closes its ledger after
    the last fsync and exits 0. A worker still running C{reply_deadline} +
    15 seconds later is killed.

C{max_connections} applies per process, so the site-wide limit is N times
it. Each worker keeps its own memory of the ledger (about 300 bytes per post
remembered), and its own group cache.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import signal
import socket
import struct
import sys
from collections.abc import Callable
from typing import IO, Any

import attrs
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import (
    ILogObserver,
    InvalidLogLevelError,
    LogEvent,
    Logger,
    LogLevel,
    globalLogBeginner,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from gsmail.config import GsmailConfig
from gsmail.inbound.parts import InboundParts
from gsmail.inbound.spool import remove_process_files
from gsmail.textlog import event_text, held_writes
from gsmail.twistedcompat import adopt_unix_port

__all__ = ["InboundWorkers", "WorkerReload", "WorkerSetup", "main", "relayed_fields"]

log = Logger()

#: A worker that ran this long (seconds) before exiting is restarted at once.
STABLE_AFTER = 60.0
#: Seconds a stopping worker gets beyond C{reply_deadline} before it is killed.
STOP_GRACE = 15.0
#: The descriptor of a worker's first inherited listening socket.
FIRST_LISTENER_FD = 3
#: Seconds a worker holds info and debug log lines before writing them together.
LOG_DELAY = 0.1
#: The longest line a worker may write (bytes); longer output is cut and logged.
MAX_LINE = 1 << 20

#: prctl(2)'s option for the signal sent when the parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1

_LENGTH = struct.Struct("!Q")
#: Log levels a worker relays at once rather than at the end of the reactor turn.
_URGENT = frozenset({LogLevel.warn, LogLevel.error, LogLevel.critical})


@attrs.frozen
class WorkerSetup:
    """
    What a worker process is told on its standard input.

    @ivar config: the configuration, with C{url} the GroupServer URL to
        use (the embedded stand-in's, once it listens).
    @ivar number: the worker's number, 1 to N (stays the same across
        restarts).
    @ivar listeners: C{(name, descriptor, address family)} for each
        inherited listening socket; name C{"smtp"} or C{"lmtp"}.
    @ivar parent: the main process's pid (C{0}: not checked).
    """

    config: GsmailConfig
    number: int
    listeners: tuple[tuple[str, int, int], ...]
    parent: int = 0


@attrs.frozen
class WorkerReload:
    """
    What a running worker is told when the main process reloaded.

    @ivar config: the configuration to run with (C{url} as in the setup).
    """

    config: GsmailConfig


def write_setup(setup: WorkerSetup | WorkerReload) -> bytes:
    """The bytes that carry C{setup} (or a reload) to a worker: a length, then a pickle."""
    data = pickle.dumps(setup, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    """C{size} bytes of C{stream}, or fewer when it ends first (a pipe may give them in parts)."""
    parts = []
    while size > 0:
        part = stream.read(size)
        if not part:
            break
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def read_setup(stream: IO[bytes]) -> WorkerSetup:
    """
    Read a L{WorkerSetup} written by L{write_setup} (blocking: before the
    reactor runs). Reads no byte beyond it when C{stream} is unbuffered:
    what follows (reloads) is read by the reactor.

    @raise EOFError: the stream ended first.
    @raise ValueError: it did not hold a setup.
    """
    head = _read_exactly(stream, _LENGTH.size)
    if len(head) != _LENGTH.size:
        raise EOFError("no worker setup on standard input")
    (length,) = _LENGTH.unpack(head)
    data = _read_exactly(stream, length)
    if len(data) != length:
        raise EOFError("the worker setup on standard input was cut short")
    setup = pickle.loads(data)
    if not isinstance(setup, WorkerSetup):
        raise ValueError("standard input did not hold a worker setup")
    return setup


# -- the main process ----------------------------------------------------------


class InboundWorkers:
    """
    The inbound worker processes of a L{gsmail.service.GsmailService}:
    starts them, relays their logs, restarts them, stops them.

    @param config: the configuration (C{inbound_workers} is the count).
    @param reactor: provides C{spawnProcess} and C{callLater}.
    @param argv: the worker command; default C{python -m gsmail.workers}
        with this interpreter.
    @param publisher: where relayed log events go; default the global log
        publisher (twistd's observers).
    @param restart_delay: (first, largest) delay in seconds before starting
        a worker again after it exited early (see the module docstring).
    """

    def __init__(
        self,
        config: GsmailConfig,
        reactor: Any,
        *,
        argv: list[str] | None = None,
        publisher: Callable[[LogEvent], None] | None = None,
        restart_delay: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.argv = argv or [sys.executable, "-m", "gsmail.workers"]
        self.publisher = publisher or globalLogPublisher
        self.restart_delay = restart_delay
        self.slots = [_Worker(self, number) for number in range(1, config.inbound_workers + 1)]
        self.running = False
        self._listeners: tuple[tuple[str, int, int], ...] = ()
        self._child_fds: dict[int, Any] = {}
        self._url = config.url
        #: Called with a worker's number when its process has ended (the
        #: metrics forget its open sessions).
        self.on_exit: Callable[[int], None] | None = None
        #: Called with a worker's number and the snapshot of its measured
        #: figures it sent (L{gsmail.metrics.Metrics.worker_figures}).
        self.on_metrics: Callable[[int, object], None] | None = None

    def start(self, ports: dict[str, Any], url: str) -> None:
        """
        Start the workers on the listening C{ports} (name to Twisted
        listening port, already listening and no longer read by this
        process), posting to GroupServer at C{url}.
        """
        listeners = []
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for offset, (name, port) in enumerate(sorted(ports.items())):
            fd = FIRST_LISTENER_FD + offset
            listeners.append((name, fd, port.socket.family))
            child_fds[fd] = port.fileno()
        self._listeners = tuple(listeners)
        self._child_fds = child_fds
        self._url = url
        self.running = True
        for slot in self.slots:
            slot.spawn()
        log.info(
            "Started {count} inbound worker processes for {names}",
            count=len(self.slots),
            names=", ".join(name for name, _, _ in listeners),
        )

    def setup(self, number: int) -> WorkerSetup:
        """The setup of worker C{number}."""
        return WorkerSetup(
            attrs.evolve(self.config, url=self._url), number, self._listeners, os.getpid()
        )

    def spawn(self, protocol: ProcessProtocol) -> Any:
        """Start one worker process for C{protocol}; return its transport."""
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        # The worker imports this gsmail, not another copy on the path.
        env["PYTHONPATH"] = os.pathsep.join(
            part for part in (package_root, env.get("PYTHONPATH", "")) if part
        )
        return self.reactor.spawnProcess(
            protocol, self.argv[0], self.argv, env=env, childFDs=self._child_fds
        )

    def reload(self, config: GsmailConfig) -> None:
        """
        Have every running worker reload to C{config} (L{WorkerReload} on
        its standard input); workers started from now on get it in their
        setup.
        """
        self.config = config
        message = write_setup(WorkerReload(attrs.evolve(config, url=self._url)))
        for slot in self.slots:
            if slot.pid is not None and slot.transport is not None:
                slot.transport.write(message)

    def pids(self) -> list[int]:
        """The process ids of the workers running now."""
        return [slot.pid for slot in self.slots if slot.pid is not None]

    def when_ready(self) -> Deferred[None]:
        """Fires once every worker has taken its listening sockets (for tests and tools)."""
        waits = [slot.when_ready() for slot in self.slots]
        return DeferredList(waits, fireOnOneErrback=True, consumeErrors=True).addCallback(
            lambda _: None
        )

    def stop(self) -> Deferred[None]:
        """
        Stop every worker: each finishes its running deliveries and exits
        (killed after C{reply_deadline} + L{STOP_GRACE} seconds). Fires when
        all have exited.
        """
        self.running = False
        waits = [slot.stop(self.config.reply_deadline + STOP_GRACE) for slot in self.slots]
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)


class _Worker(ProcessProtocol):
    """One worker slot: the process now running in it, its restarts, its log relay."""

    def __init__(self, workers: InboundWorkers, number: int) -> None:
        self.workers = workers
        self.number = number
        self.pid: int | None = None
        self.started = 0.0
        self.delay = 0.0
        self.ready = False
        self._buffer = b""
        self._errors = b""
        self._respawn: Any = None
        self._kill: Any = None
        self._ready_waits: list[Deferred[None]] = []
        self._exit_waits: list[Deferred[None]] = []

    def spawn(self) -> None:
        self._respawn = None
        self.ready = False
        self._buffer = self._errors = b""
        transport = self.workers.spawn(self)
        self.pid = transport.pid
        self.started = self.workers.reactor.seconds()
        transport.write(write_setup(self.workers.setup(self.number)))

    def when_ready(self) -> Deferred[None]:
        if self.ready:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready_waits.append(d)
        return d

    # -- output ------------------------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        if b"\n" not in data:
            if len(self._buffer) > MAX_LINE:
                self._buffer = b""
                log.error(
                    "Inbound worker {number} wrote a line too long to relay", number=self.number
                )
            return
        *lines, self._buffer = self._buffer.split(b"\n")
        # A worker writes its lines in batches (LOG_DELAY): the text log
        # writes each batch at once, not a system call per line.
        with held_writes():
            for line in lines:
                if line:
                    self._line(line)

    def _line(self, line: bytes) -> None:
        try:
            record = json.loads(line)
            if isinstance(record, dict):
                if record.get("ready"):
                    self._set_ready()
                if "metrics" in record and self.workers.on_metrics is not None:
                    # Its measured figures (gsmail.metrics.FigurePusher): for
                    # the metrics, never for the log.
                    self.workers.on_metrics(self.number, record["metrics"])
                return
            when, level_name, system, text, *more = record
            level = LogLevel.levelWithName(level_name)
            fields = more[0] if more and isinstance(more[0], dict) else {}
        except (ValueError, TypeError, InvalidLogLevelError):
            log.error(
                "Inbound worker {number} wrote a line that is not a log event: {line!r}",
                number=self.number,
                line=line[:200],
            )
            return
        self.workers.publisher(
            {
                **{k: v for k, v in fields.items() if isinstance(k, str) and k not in _OWN_KEYS},
                "log_format": "{gsmail_text}",
                "gsmail_text": text,
                "log_time": when,
                "log_level": level,
                "log_namespace": __name__,
                "log_system": f"inbound-{self.number} {system}",
                "gsmail_worker": self.number,
            }
        )

    def _set_ready(self) -> None:
        self.ready = True
        waits, self._ready_waits = self._ready_waits, []
        for d in waits:
            d.callback(None)

    def errReceived(self, data: bytes) -> None:
        self._errors += data
        *lines, self._errors = self._errors.split(b"\n")
        for line in lines:
            if line.strip():
                log.error(
                    "Inbound worker {number}: {line}",
                    number=self.number,
                    line=line.decode("utf-8", "replace"),
                )

    # -- exit and restart --------------------------------------------------------

    def processEnded(self, reason: Failure) -> None:
        pid, self.pid = self.pid, None
        self.ready = False
        if self._errors.strip():
            self.errReceived(b"\n")
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        self._kill = None
        if pid is not None:
            self._remove_spool_files(pid)
        if self.workers.on_exit is not None:
            self.workers.on_exit(self.number)
        if not self.workers.running:
            waits, self._exit_waits = self._exit_waits, []
            for d in waits:
                d.callback(None)
            return
        ran = self.workers.reactor.seconds() - self.started
        first, largest = self.workers.restart_delay
        self.delay = 0.0 if ran >= STABLE_AFTER else min(max(self.delay * 2, first), largest)
        log.error(
            "Inbound worker {number} (pid {pid}) {how} after {ran:.1f} s; "
            "starting it again in {delay:g} s",
            number=self.number,
            pid=pid,
            how=_how(reason),
            ran=ran,
            delay=self.delay,
        )
        # Whoever waits for readiness hears from the next process.
        self._respawn = self.workers.reactor.callLater(self.delay, self.spawn)

    def _remove_spool_files(self, pid: int) -> None:
        try:
            removed = remove_process_files(self.workers.config.spool_dir, pid)
        except OSError:
            return
        if removed:
            log.info(
                "Removed {count} spool files of inbound worker {number} (pid {pid})",
                count=removed,
                number=self.number,
                pid=pid,
            )

    def stop(self, timeout: float) -> Deferred[None]:
        if self._respawn is not None and self._respawn.active():
            self._respawn.cancel()
        self._respawn = None
        if self.pid is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._exit_waits.append(d)
        if self.transport is not None:
            self.transport.closeStdin()  # the worker's cue to stop
        self._kill = self.workers.reactor.callLater(timeout, self._force)
        return d

    def _force(self) -> None:
        self._kill = None
        if self.pid is None or self.transport is None:
            return
        log.error(
            "Inbound worker {number} (pid {pid}) did not stop in time: killed",
            number=self.number,
            pid=self.pid,
        )
        try:
            self.transport.signalProcess("KILL")
        except net_error.ProcessExitedAlready:
            pass


def _how(reason: Failure) -> str:
    """How a process ended, in words: C{exited with status 1}, C{killed by signal 9}."""
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number is not None:
        return f"was killed by signal {signal_number}"
    return f"exited with status {getattr(value, 'exitCode', '?')}"


# -- the worker process --------------------------------------------------------


def die_with_parent(signal_number: int = signal.SIGTERM) -> bool:
    """
    Ask Linux to send this process C{signal_number} when its parent dies
    (C{prctl(PR_SET_PDEATHSIG)}, prctl(2)). Blocking, one system call; call
    it first thing in a child, before it holds anything its parent's
    successor needs. Elsewhere, or when the call fails, nothing happens and
    standard input's end is the only signal.

    @param signal_number: the signal to get (default SIGTERM, which the
        reactor turns into a clean stop).
    @return: C{True} when the kernel took it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def parent_alive(setup: WorkerSetup) -> bool:
    """
    Whether the main process that wrote C{setup} is still this process's
    parent. It may have died before L{die_with_parent} was called, and then
    no signal comes: the setup it wrote is still in the pipe, but the
    worker was handed to another parent (init or a subreaper).

    @param setup: the worker's setup (L{WorkerSetup.parent}: the main
        process's pid, C{0} for "do not check").
    @return: C{False} when the worker must exit at once.
    """
    return not setup.parent or os.getppid() == setup.parent


#: Keys of a relayed event the main process sets itself.
_OWN_KEYS = frozenset({"gsmail_text", "gsmail_worker"})


def relayed_fields(event: LogEvent) -> dict[str, Any]:
    """
    The fields of a worker's log event that go to the main process with its
    text: those not of the logging system itself (C{log_*}) whose values
    JSON keeps as they are (text, numbers, booleans, C{None}).
    """
    return {
        key: value
        for key, value in event.items()
        if not key.startswith("log_")
        and key not in _OWN_KEYS
        and (value is None or isinstance(value, (str, int, float, bool)))
    }


@implementer(ILogObserver)
class _EventLines:
    """
    Writes each log event, rendered, as one JSON line to a file (the
    worker's standard output): C{[time, level, system, text]}, the text with
    the failure's traceback after it, if any. Cheaper to make and to read
    than L{twisted.logger.eventAsJSON}, and the text is exactly what a log
    file in this process would show.

    With C{schedule} (the reactor's C{callLater}), lines below warning level
    are written together at most L{LOG_DELAY} seconds after the first of
    them: one write, and one wake-up of the main process, for all of them
    (a wake-up per line cost the main process 0.15 ms of CPU per message).
    Warnings and errors are written at once, with the lines before them, so
    a crash cannot swallow them; a worker killed outright loses at most
    L{LOG_DELAY} seconds of info lines, never a message.
    """

    def __init__(self, out: IO[bytes], schedule: Callable[..., Any] | None = None) -> None:
        self._out = out
        self._schedule = schedule
        self._pending: list[bytes] = []

    def __call__(self, event: LogEvent) -> None:
        text = event_text(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}".rstrip("\n")
        level = event.get("log_level", LogLevel.info)
        system = event.get("log_system")
        if system is None:
            system = f"{event.get('log_namespace', '-')}#{level.name}"
        record = [event.get("log_time"), level.name, system, text]
        if "gsmail_event" in event:
            # A mail log line (gsmail.maillog): its fields go too, so the
            # main process's observers (a JSON log, the metrics) get them.
            record.append(relayed_fields(event))
        line = json.dumps(record).encode("ascii")
        self._pending.append(line + b"\n")
        if self._schedule is None or level in _URGENT:
            self.flush()
        elif len(self._pending) == 1:
            self._schedule(LOG_DELAY, self.flush)

    def flush(self) -> None:
        """Write the lines not written yet."""
        if not self._pending:
            return
        data, self._pending = b"".join(self._pending), []
        try:
            self._out.write(data)
            self._out.flush()
        except (OSError, ValueError):
            pass  # the main process is gone: standard input tells us too

    def control(self, **fields: Any) -> None:
        """A line for the main process itself, not a log event."""
        self.flush()
        self._out.write(json.dumps(fields).encode("ascii") + b"\n")
        self._out.flush()


@implementer(IReadDescriptor)
class _ParentWatch:
    """
    Reads standard input after the setup: calls C{on_message} with each
    message the main process writes (L{WorkerReload}), and C{on_close} when
    it ends: the main process closed it or died.
    """

    def __init__(
        self,
        fd: int,
        on_close: Callable[[], None],
        on_message: Callable[[object], None] = lambda message: None,
    ) -> None:
        self._fd = fd
        self._on_close = on_close
        self._on_message = on_message
        self._buffer = b""
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> Any:
        try:
            data = os.read(self._fd, 1 << 16)
        except BlockingIOError:
            return None
        except OSError as e:
            return Failure(e)
        if not data:
            return net_error.ConnectionDone()
        self._buffer += data
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            data, self._buffer = self._buffer[_LENGTH.size : end], self._buffer[end:]
            self._on_message(pickle.loads(data))
        return None

    def connectionLost(self, reason: Failure) -> None:
        self._on_close()

    def logPrefix(self) -> str:
        return "main-process"


class Worker:
    """
    The inside of one worker process: its L{gsmail.inbound.parts.InboundParts},
    listening on the inherited sockets.
    """

    def __init__(
        self,
        setup: WorkerSetup,
        reactor: Any,
        send_metrics: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.setup = setup
        self.reactor = reactor
        self.parts = InboundParts(setup.config, reactor, setup.config.url)
        self.ports: list[Any] = []
        self.pusher: Any = None
        if setup.config.metrics_endpoint and send_metrics is not None:
            self._measure(send_metrics)

    def _measure(self, send: Callable[[dict[str, Any]], None]) -> None:
        """
        Record GroupServer requests and ledger appends, and send their
        snapshot to the main process every few seconds
        (L{gsmail.metrics.FigurePusher}), which adds them to its metrics.
        """
        from gsmail.metrics import FigurePusher, Measured

        measured = Measured()
        client, ledger = self.parts.client, self.parts.ledger
        client.observe_request = measured.observe_request
        ledger.observe_append = measured.observe_ledger_append

        def gauges() -> dict[str, float]:
            found: dict[str, float] = {
                "posts_in_flight": client.in_flight_posts,
                "posts_waiting": client.queued_posts,
            }
            try:
                found["ledger_records"] = len(ledger)
            except Exception:
                pass  # not open (yet, or any more)
            return found

        self.pusher = FigurePusher(measured, self.reactor, send, gauges)

    def start(self) -> None:
        """Load the ledger and accept on the inherited sockets (blocking: at start)."""
        self.parts.open()
        for name, fd, family in self.setup.listeners:
            self.ports.append(adopt(self.reactor, fd, family, self.parts.factory(name == "lmtp")))
            os.close(fd)  # the port holds its own duplicate
        if self.pusher is not None:
            self.pusher.start()
        log.info(
            "Inbound worker {number} (pid {pid}) accepting",
            number=self.setup.number,
            pid=os.getpid(),
        )

    def message(self, message: object) -> None:
        """A message from the main process: a reload (L{WorkerReload})."""
        if not isinstance(message, WorkerReload):
            log.error("Inbound worker {number}: unknown message", number=self.setup.number)
            return

        def done(applied: bool) -> None:
            if applied:
                log.info(
                    "Inbound worker {number} reloaded: domains {domains}",
                    number=self.setup.number,
                    domains=" ".join(message.config.domains),
                )

        self.parts.reload(message.config).addCallback(done).addErrback(
            lambda failure: log.failure("Inbound worker reload failed", failure)
        )

    async def stop(self) -> None:
        """Stop accepting, let running deliveries finish, close the ledger."""
        for port in self.ports:
            await port.stopListening()
        await self.parts.wait_idle()
        await self.parts.close()
        if self.pusher is not None:
            self.pusher.stop()  # the last figures, after the last fsync


def adopt(reactor: Any, fd: int, family: int, factory: Any) -> Any:
    """
    Accept on an inherited listening socket. A UNIX socket's path belongs to
    the main process: the worker neither changes its mode nor removes it.
    """
    if family == socket.AF_UNIX:
        port = adopt_unix_port(reactor, fd, factory)
        port.startListening()
        return port
    return reactor.adoptStreamPort(fd, family, factory)


def main() -> None:
    """
    C{python -m gsmail.workers}: one inbound worker, started by the main
    process (see the module docstring); not for running by hand. Exits 2
    without a setup, 3 when the main process is already gone, 1 when the
    worker cannot start.
    """
    # First: the main process's death stops us from here on (SIGTERM's
    # default action until the reactor installs its handler, which stops
    # the reactor: no more accepting, running deliveries finish).
    die_with_parent(signal.SIGTERM)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to standard error, logged as errors, not into the events
    try:
        # Unbuffered: a reload written right after the setup stays in the
        # pipe for the reactor (_ParentWatch), not in a read-ahead buffer.
        with open(sys.stdin.fileno(), "rb", buffering=0, closefd=False) as stdin:
            setup = read_setup(stdin)
    except (EOFError, ValueError) as e:
        sys.stderr.write(f"gsmail worker: {e}\n")
        raise SystemExit(2) from None
    if not parent_alive(setup):
        sys.stderr.write("gsmail worker: the main process is gone\n")
        raise SystemExit(3)
    from twisted.internet import reactor

    # The main process owns the terminal: a hangup is its business.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    observer = _EventLines(out, reactor.callLater)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    def send_metrics(snapshot: dict[str, Any]) -> None:
        try:
            observer.control(metrics=snapshot)
        except (OSError, ValueError):
            pass  # the main process is gone: standard input tells us too

    worker = Worker(setup, reactor, send_metrics)
    try:
        worker.start()
    except Exception:
        log.failure("Inbound worker {number} could not start", number=setup.number)
        raise SystemExit(1) from None
    observer.control(ready=True)

    def parent_gone() -> None:
        if reactor.running:
            reactor.stop()

    reactor.addReader(_ParentWatch(sys.stdin.fileno(), parent_gone, worker.message))
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: Deferred.fromCoroutine(worker.stop())
    )
    reactor.run()
    observer.flush()


if __name__ == "__main__":
    # Run as gsmail.workers, not __main__, so the setup unpickles as the
    # class the main process pickled.
    from gsmail import workers

    workers.main()
