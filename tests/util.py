"""
Helpers shared by gsmail's tests: real-peer tool lookup (skip by hand, fail
in CI), a ready-made configuration and a running service on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import attrs
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from gsmail.config import GsmailConfig
from gsmail.service import GsmailService, makeService

TOKEN = "test-token-0123456789"
DOMAIN = "groups.example.com"


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
