"""
Helpers for the tests that run gsmail as an operator does: C{twistd -n
gsmail} in a child process (as root dropping to a user, under
C{systemd-socket-activate}, ...), test users, and a short LMTP/SMTP client
run as another user.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from tests.util import require_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: twistd, run as C{python -c TWISTD ...} (no console script needed).
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

#: How long a child gets to start or to stop, in seconds.
WAIT = 30.0


def require_root() -> None:
    """Skip the test when not run as root (by hand); fail it in CI, which runs as root."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        raise AssertionError("this test needs root (CI runs as root)")
    raise SkipTest("needs root")


def ensure_group(name: str) -> int:
    """The id of group C{name}, made (C{groupadd --system}) when missing."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(
            [require_tool("groupadd", "/usr/sbin/groupadd"), "--system", name], check=True
        )
        return grp.getgrnam(name).gr_gid


def ensure_user(name: str, groups: Sequence[str] = ()) -> pwd.struct_passwd:
    """
    A system user C{name} with a group of its name and the supplementary
    C{groups}, made (C{useradd}) when missing; the tests leave it for the
    next run.
    """
    useradd = require_tool("useradd", "/usr/sbin/useradd")
    for group in groups:
        ensure_group(group)
    try:
        pwd.getpwnam(name)
    except KeyError:
        command = [useradd, "--system", "--user-group", "--no-create-home"]
        command += ["--shell", "/usr/sbin/nologin", "--home-dir", "/nonexistent"]
        subprocess.run(command + [name], check=True)
    if groups:
        usermod = require_tool("usermod", "/usr/sbin/usermod")
        subprocess.run([usermod, "--append", "--groups", ",".join(groups), name], check=True)
    return pwd.getpwnam(name)


class Child(ProcessProtocol):
    """A child process: collects its output (stdout and stderr apart) and its exit status."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred[int | None] = Deferred()
        self.transport: Any = None

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
        return (self.out + self.err).decode(errors="replace")


async def run_child(
    test: TestCase,
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    path: str | None = None,
    child: Child | None = None,
) -> Child:
    """
    Start C{argv}; the test's cleanup kills it (SIGKILL) if it still runs.
    """
    child = child or Child()
    process = reactor.spawnProcess(  # type: ignore[attr-defined]
        child, argv[0], list(argv), env=env if env is not None else dict(os.environ), path=path
    )

    async def kill() -> None:
        if not child.ended.called:
            process.signalProcess(signal.SIGKILL)
            await child.ended

    test.addCleanup(kill)
    return child


async def wait_for(child: Child, text: str, timeout: float = WAIT) -> None:
    """
    Wait until C{text} is in the child's output.

    @raise AssertionError: it ended first, or C{timeout} seconds passed.
    """
    deadline = reactor.seconds() + timeout
    while text not in child.output:
        if child.ended.called:
            raise AssertionError(f"ended before {text!r}:\n{child.output}")
        if reactor.seconds() > deadline:
            raise AssertionError(f"no {text!r} after {timeout:g} s:\n{child.output}")
        await deferLater(reactor, 0.05, lambda: None)


async def stop(child: Child, timeout: float = WAIT) -> int | None:
    """SIGTERM the child and return its exit status (it must end within C{timeout})."""
    if not child.ended.called:
        child.transport.signalProcess(signal.SIGTERM)
    d = child.ended
    d.addTimeout(timeout, reactor)
    return await d


async def run_to_end(
    test: TestCase, argv: Sequence[str], env: dict[str, str] | None = None, path: str | None = None
) -> Child:
    """Run C{argv} to its end (at most L{WAIT} seconds)."""
    child = await run_child(test, argv, env=env, path=path)
    d = child.ended
    d.addTimeout(WAIT, reactor)
    await d
    return child


def twistd_argv(python: str, *arguments: str) -> list[str]:
    """C{python -c TWISTD -n --pidfile= ARGUMENTS...}."""
    return [python, "-c", TWISTD, "-n", "--pidfile=", *arguments]


def python_env(path: Sequence[str] = (ROOT,), **more: str) -> dict[str, str]:
    """An environment that imports this checkout's gsmail (and C{path})."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LISTEN_")}
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = ":".join(path)
    env.update(more)
    return env


#: A small LMTP or SMTP client for another user: argv is the socket path
#: (or host:port), "lmtp" or "smtp", the recipient and a message id; it
#: prints the reply to the message or the error, and needs only the
#: standard library (so the system's Python runs it for any user).
CLIENT = r"""
import smtplib, sys
where, protocol, recipient, message_id = sys.argv[1:5]
message = (
    "From: alice@example.org\r\nTo: " + recipient + "\r\nSubject: hello\r\n"
    "Message-ID: <" + message_id + ">\r\n\r\nHello, group.\r\n"
)
try:
    if protocol == "lmtp":
        client = smtplib.LMTP(where, timeout=20)  # a path: a UNIX socket; LHLO for EHLO
    else:
        host, _, port = where.rpartition(":")
        client = smtplib.SMTP(host, int(port), timeout=20)
    refused = client.sendmail("alice@example.org", [recipient], message)
    client.quit()
    print("sent", refused or "")
except (OSError, smtplib.SMTPException) as e:
    print("error", type(e).__name__, e)
"""


def client_argv(
    python: str, where: str, protocol: str, recipient: str, message_id: str
) -> list[str]:
    """The command line of L{CLIENT}."""
    return [python, "-c", CLIENT, where, protocol, recipient, message_id]


def system_python() -> str:
    """An interpreter every user can run (the system's), for L{CLIENT}."""
    for candidate in ("/usr/bin/python3", sys.executable):
        if os.access(candidate, os.X_OK):
            return candidate
    raise SkipTest("no python3")
