"""
Helpers shared by gsmail's tests: real-peer tool lookup (skip by hand, fail
in CI), a ready-made configuration and a running service on 127.0.0.1, and
child processes (the one harness for C{twistd -n gsmail} and other commands:
output kept, end awaited, killed with their process group by the test's
cleanup).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from gsmail.config import GsmailConfig
from gsmail.service import GsmailService, makeService
from gsmail.standin import StandIn

TOKEN = "test-token-0123456789"
DOMAIN = "groups.example.com"

#: The checkout: put first on a child's C{PYTHONPATH} so that it runs this gsmail.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: twistd, run as C{python -c TWISTD ...} (no console script needed), in a
#: process group of its own, so that a test's cleanup can kill it together
#: with its inbound workers (L{run_child}'s C{own_group}).
TWISTD = (
    "import os, sys\n"
    "try:\n    os.setpgid(0, 0)\nexcept OSError:\n    pass\n"
    "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
)

#: How long a child gets to start or to stop, in seconds.
WAIT = 30.0

#: How long L{eventually} waits by default, in seconds: a bound for a test
#: that fails, long enough for a delivery on a loaded machine.
EVENTUALLY = 60.0

_T = TypeVar("_T")


def require_tool(name: str, *candidates: str) -> str:
    """
    The path of an external tool (swaks, postfix, ...). Missing: the test is
    skipped when run by hand, but fails when C{CI} is set, since CI installs it.
    """
    for candidate in (name, *candidates):
        path = shutil.which(candidate) or (
            candidate if os.path.isabs(candidate) and os.access(candidate, os.X_OK) else None
        )
        if path:
            return path
    message = f"{name} is not installed (apt-get install it; .ci/run does)"
    if os.environ.get("CI"):
        raise AssertionError(message)
    raise SkipTest(message)


def make_config(directory: str, **overrides: Any) -> GsmailConfig:
    """
    A configuration for tests: embedded stand-in with groups C{example} and
    C{dev} in C{groups.example.com}, ESMTP and LMTP on 127.0.0.1 port 0,
    state under C{directory}.
    """
    os.makedirs(directory, exist_ok=True)
    config = GsmailConfig(
        path=os.path.join(directory, "gsconfig.ini"),
        instance="default",
        url="embedded",
        token=TOKEN,
        smtp_endpoint="tcp:0:interface=127.0.0.1",
        lmtp_endpoint="tcp:0:interface=127.0.0.1",
        hostname="mx.groups.example.com",
        domains=(DOMAIN,),
        spool_dir=os.path.join(directory, "spool"),
        ledger_path=os.path.join(directory, "ledger", "posted.log"),
        standin_dir=os.path.join(directory, "standin"),
        postmaster_maildir=os.path.join(directory, "postmaster"),
        route_state_dir=os.path.join(directory, "routes"),
        errors_dir=os.path.join(directory, "errors"),
        rejected_dir=os.path.join(directory, "rejected"),
        standin_groups=("example", "dev"),
    )
    return attrs.evolve(config, **overrides)


def start_service(test: TestCase, config: GsmailConfig, reactor: Any = None) -> GsmailService:
    """
    Start gsmail's service on the real reactor for C{test}; it is stopped
    (and everything it opened closed) by the test's cleanup.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    service = makeService(config, reactor)
    service.privilegedStartService()
    service.startService()
    test.addCleanup(service.stopService)
    return service


def port_of(service: GsmailService, name: str) -> int:
    """The TCP port the C{"smtp"} or C{"lmtp"} listener got."""
    return int(service.port(name).getHost().port)


def open_descriptors() -> int:
    """How many file descriptors this process has open now (Linux)."""
    return len(os.listdir("/proc/self/fd"))


class DiskFaults:
    """
    Injects storage faults into the system calls of L{gsmail.inbound.spool}
    (patched for the test's duration): set C{write_error},
    C{create_error} or C{truncate_error} to an C{errno} value to make
    write(2), the creation of a spool file or ftruncate(2) fail with it;
    C{max_write} makes write(2) store at most that many bytes per call, as
    on a nearly full disk.

    @ivar writes: write(2) calls attempted.
    """

    def __init__(self, test: SynchronousTestCase) -> None:
        from gsmail.inbound import spool

        self.write_error: int | None = None
        self.create_error: int | None = None
        self.truncate_error: int | None = None
        self.max_write: int | None = None
        self.writes = 0
        test.patch(spool, "_write", self._write)
        test.patch(spool, "_open", self._open)
        test.patch(spool, "_ftruncate", self._ftruncate)

    def _write(self, fd: int, data: memoryview) -> int:
        self.writes += 1
        if self.write_error is not None:
            raise OSError(self.write_error, os.strerror(self.write_error))
        if self.max_write is not None:
            data = data[: self.max_write]
        return os.write(fd, data)

    def _open(self, path: str, flags: int, mode: int) -> int:
        if self.create_error is not None:
            raise OSError(self.create_error, os.strerror(self.create_error), path)
        return os.open(path, flags, mode)

    def _ftruncate(self, fd: int, length: int) -> None:
        if self.truncate_error is not None:
            raise OSError(self.truncate_error, os.strerror(self.truncate_error))
        os.ftruncate(fd, length)


def listen_dns(reactor: Any, factory: Any, tries: int = 20) -> tuple[Any, Any]:
    """
    A C{twisted.names} server factory listening on 127.0.0.1 over UDP and
    TCP on one port, as DNS servers do. The UDP port is picked by the
    kernel; when TCP has that number taken (another test), another one is
    tried, at most C{tries} times.

    @return: the UDP and TCP listening ports (stop both in the test's cleanup).
    """
    from twisted.internet.error import CannotListenError
    from twisted.names import dns

    for _ in range(tries):
        udp = reactor.listenUDP(
            0, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1"
        )
        try:
            tcp = reactor.listenTCP(udp.getHost().port, factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            continue
        return udp, tcp
    raise AssertionError(f"no port free for both UDP and TCP in {tries} tries")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (for a child that must be told one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """
    Whether something listens on 127.0.0.1:C{port}, read from
    C{/proc/net/tcp} so that asking opens no session (smtp-sink counts them).
    """
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
                return True
    return False


async def eventually(
    predicate: Callable[[], object],
    what: str | Callable[[], str],
    timeout: float = EVENTUALLY,
    interval: float = 0.05,
) -> None:
    """
    Poll C{predicate} on the real reactor every C{interval} seconds until
    it is true.

    @param what: what is waited for, or a function that says what was seen,
        for the failure message.
    @raise AssertionError: still false after C{timeout} seconds.
    """
    reactor = _reactor()
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"waited {timeout:g} s for {said}")
        await deferLater(reactor, interval, lambda: None)


async def bounded(d: Deferred[_T], timeout: float = WAIT) -> _T:
    """The result of C{d}, which must fire within C{timeout} seconds."""
    d.addTimeout(timeout, _reactor())
    return await d


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def twistd_argv(python: str, *arguments: str) -> list[str]:
    """C{python -c TWISTD -n --pidfile= ARGUMENTS...}."""
    return [python, "-c", TWISTD, "-n", "--pidfile=", *arguments]


def python_env(path: Sequence[str] = (ROOT,), **more: str) -> dict[str, str]:
    """
    This process's environment for a child that imports this checkout's
    gsmail (and C{path}), without systemd's C{LISTEN_*} and C{NOTIFY_SOCKET}.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("LISTEN_")}
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = ":".join(path)
    env.update(more)
    return env


class Child(ProcessProtocol):
    """
    A child process: collects its output (stdout and stderr apart) and its
    exit status (C{ended}: the code, or minus the signal that ended it).
    """

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred[int | None] = Deferred()
        self.transport: Any = None
        self.pid = 0

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        code = getattr(value, "exitCode", None)
        self.ended.callback(code if code is not None else -(getattr(value, "signal", 0) or 0))

    @property
    def output(self) -> str:
        """Standard output, then standard error, as text."""
        return (self.out + self.err).decode(errors="replace")

    def signal(self, number: int) -> None:
        """Send signal C{number} to the child (nothing once it ended)."""
        if not self.ended.called:
            self.transport.signalProcess(number)


def _kill_group(group: int) -> None:
    """SIGKILL what is left of process group C{group} (the child's workers)."""
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def run_child(
    test: TestCase,
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    path: str | None = None,
    child: Child | None = None,
    stop_signal: int = signal.SIGKILL,
    own_group: bool = False,
) -> Child:
    """
    Start C{argv}. The test's cleanup sends C{stop_signal} if it still
    runs and waits for its end (SIGKILL after L{WAIT} seconds); with
    C{own_group} (the child makes its own process group, as L{TWISTD} does)
    it then kills whatever is left of that group.
    """
    child = child or Child()
    reactor = _reactor()
    process = reactor.spawnProcess(
        child, argv[0], list(argv), env=env if env is not None else dict(os.environ), path=path
    )
    child.pid = process.pid

    async def kill() -> None:
        if not child.ended.called:
            child.signal(stop_signal)
            for _ in range(int(WAIT / 0.05)):
                if child.ended.called:
                    break
                await deferLater(reactor, 0.05, lambda: None)
            if not child.ended.called:
                child.signal(signal.SIGKILL)
                await child.ended
        if own_group:
            _kill_group(child.pid)

    test.addCleanup(kill)
    return child


async def spawn_gsmail(
    test: TestCase,
    directory: str,
    config: str,
    stop_signal: int = signal.SIGTERM,
    *twistd: str,
) -> Child:
    """
    Start C{twistd -n --pidfile= TWISTD... gsmail --config CONFIG} in
    C{directory} with this checkout on C{PYTHONPATH}. The test's cleanup
    sends it C{stop_signal} if it still runs, waits for its end, and kills
    what is left of its process group (its inbound workers).
    """
    argv = twistd_argv(sys.executable, *twistd, "gsmail", "--config", config)
    return await run_child(
        test, argv, env=python_env(), path=directory, stop_signal=stop_signal, own_group=True
    )


async def wait_for(child: Child, text: str, timeout: float = WAIT) -> None:
    """
    Wait until C{text} is in the child's output.

    @raise AssertionError: it ended first, or C{timeout} seconds passed.
    """
    reactor = _reactor()
    deadline = reactor.seconds() + timeout
    while text not in child.output:
        if child.ended.called:
            raise AssertionError(f"ended before {text!r}:\n{child.output}")
        if reactor.seconds() > deadline:
            raise AssertionError(f"no {text!r} after {timeout:g} s:\n{child.output}")
        await deferLater(reactor, 0.05, lambda: None)


async def stop(child: Child, timeout: float = WAIT) -> int | None:
    """SIGTERM the child and return its exit status (it must end within C{timeout})."""
    child.signal(signal.SIGTERM)
    d = child.ended
    d.addTimeout(timeout, _reactor())
    return await d


async def run_to_end(
    test: TestCase, argv: Sequence[str], env: dict[str, str] | None = None, path: str | None = None
) -> Child:
    """Run C{argv} to its end (at most L{WAIT} seconds)."""
    child = await run_child(test, argv, env=env, path=path)
    d = child.ended
    d.addTimeout(WAIT, _reactor())
    await d
    return child


class TrackingFactory(WrappingFactory):
    """
    Wraps a server's factory: counts its open connections and those it
    ever accepted (C{accepted}); tells when all are closed.
    """

    def __init__(self, wrapped: Factory) -> None:
        super().__init__(wrapped)
        self._waiters: list[Deferred[None]] = []
        self.accepted = 0

    def buildProtocol(self, addr: Any) -> Protocol | None:
        self.accepted += 1
        return super().buildProtocol(addr)

    def unregisterProtocol(self, p: Protocol) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def when_all_closed(self) -> Deferred[None]:
        """Fires once no connection is open (at once if none is)."""
        d: Deferred[None] = Deferred()
        if self.protocols:
            self._waiters.append(d)
        else:
            d.callback(None)
        return d


class StandInServer:
    """
    The GroupServer stand-in (L{gsmail.standin.StandIn}) serving C{groups}
    (address to group id) on a free port of 127.0.0.1, at C{url}. Its delays
    (L{gsmail.standin.Faults.delay}) run on C{clock}, by default a clock of
    the test's, so that no test waits for them; it is stopped in the test's
    cleanup once every request finished and every connection closed.
    """

    def __init__(
        self,
        test: TestCase,
        groups: dict[str, str],
        token: str = TOKEN,
        *,
        clock: Any = None,
        directory: str | None = None,
    ) -> None:
        reactor = _reactor()
        self._own_clock = clock is None
        self.clock = Clock() if clock is None else clock
        self.standin = StandIn(
            directory or test.mktemp(), token, groups, clock=self.clock, reactor=reactor
        )
        self.factory = TrackingFactory(self.standin.site())
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        test.addCleanup(lambda: Deferred.fromCoroutine(self.stop()))

    async def stop(self) -> None:
        """Let delayed requests finish, stop listening, wait for every connection to close."""
        self.standin.faults.reset()
        if self._own_clock:
            self.clock.advance(3600)  # delayed requests finish
        await self.standin.when_idle()
        await self.port.stopListening()
        await self.factory.when_all_closed()


class Made(Protocol):
    """Fires C{made} with itself once connected."""

    def __init__(self, made: Deferred[Made]) -> None:
        self.made = made

    def connectionMade(self) -> None:
        self.made.callback(self)


async def tcp_pair(test: TestCase) -> tuple[Any, socket.socket]:
    """
    A real TCP connection on 127.0.0.1 between a Twisted server and a plain
    blocking socket: the server side's transport and the peer's socket,
    both closed (and the listener stopped) by the test's cleanup.
    """
    from twisted.internet.endpoints import TCP4ServerEndpoint

    made: Deferred[Made] = Deferred()
    port = await TCP4ServerEndpoint(_reactor(), 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: Made(made))
    )
    test.addCleanup(port.stopListening)
    peer = socket.create_connection(("127.0.0.1", port.getHost().port))
    test.addCleanup(peer.close)
    server = await made
    test.addCleanup(server.transport.abortConnection)
    return server.transport, peer
