"""
Helpers for the tests that run gsmail as an operator does (as root dropping
to a user, under C{systemd-socket-activate}, ...): test users, an interpreter
another user can run this checkout with (L{pipe_runtime}), and a short
LMTP/SMTP client run as another user. The child processes themselves
(C{twistd -n gsmail} and others) are started with L{tests.util.run_child}.
"""

from __future__ import annotations

import grp
import hashlib
import importlib.metadata
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Final

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest

from tests.util import ROOT, require_tool


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


#: The unprivileged user pipe(8) runs the command as in these tests.
PIPE_USER: Final = "nobody"
#: Modules the command imports while it posts.
PROBE: Final = "import gsmail.script, gsmail.groupserver, gsmail.ledger, twisted.internet.reactor"


class _Probe(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[int] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None) or 0)


async def _runs_as(user: pwd.struct_passwd, python: str, path: Sequence[str]) -> bool:
    """Whether C{user} can run C{python} and import the command with C{path}."""
    probe = _Probe()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(path)}
    transport = reactor.spawnProcess(
        probe,
        python,
        [python, "-c", PROBE],
        env=env,
        path="/",
        uid=user.pw_uid,
        gid=user.pw_gid,
    )
    killer = reactor.callLater(30, transport.signalProcess, "KILL")
    code = await probe.ended
    if killer.active():
        killer.cancel()
    return code == 0


_runtime: tuple[str, tuple[str, ...]] | None = None


async def pipe_runtime(user: pwd.struct_passwd) -> tuple[str, tuple[str, ...]]:
    """
    An interpreter and a C{PYTHONPATH} with which C{user} runs this
    checkout's C{smtp2gs}: this interpreter if it can, else the system's
    Python of the same version with a copy of gsmail's dependencies.

    @raise SkipTest: neither works (a failure when C{CI} is set).
    """
    global _runtime
    if _runtime is not None:
        return _runtime
    if await _runs_as(user, sys.executable, [ROOT]):
        _runtime = (sys.executable, (ROOT,))
        return _runtime
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for python in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        # The same binary is another runtime when this one is a virtual
        # environment (its site-packages may be where the user cannot read).
        in_venv = sys.prefix != sys.base_prefix
        if os.access(python, os.X_OK) and (
            in_venv or os.path.realpath(python) != os.path.realpath(sys.executable)
        ):
            copy = _dependency_copy()
            if await _runs_as(user, python, [ROOT, copy]):
                _runtime = (python, (ROOT, copy))
                return _runtime
    problem = (
        f"user {user.pw_name!r} cannot run {sys.executable} and there is no system "
        f"Python {version} to run smtp2gs with"
    )
    if os.environ.get("CI"):
        raise AssertionError(problem)
    raise SkipTest(problem)


def _dependency_copy() -> str:
    """
    A world-readable directory under C{/tmp} holding a copy of every
    distribution gsmail requires (with their compiled byte code, whose
    modification times are kept so that they stay valid); made once per
    set of versions, reused by later runs.
    """
    names = sorted(_requirements("gsmail") - {"gsmail"})
    versions = [f"{name}=={importlib.metadata.version(name)}" for name in names]
    digest = hashlib.sha256("\n".join([sys.version, *versions]).encode()).hexdigest()[:16]
    target = os.path.join(tempfile.gettempdir(), f"gsmail-test-pipe-runtime-{digest}")
    if os.path.isdir(target):
        return target
    building = tempfile.mkdtemp(prefix="gsmail-test-pipe-runtime-", dir=tempfile.gettempdir())
    try:
        for name in names:
            distribution = importlib.metadata.distribution(name)
            for file in distribution.files or []:
                source = str(distribution.locate_file(file))
                if ".." in file.parts or not os.path.isfile(source):
                    continue  # scripts outside site-packages
                destination = os.path.join(building, *file.parts)
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                shutil.copy2(source, destination)
        for directory, _, _ in os.walk(building):
            os.chmod(directory, 0o755)
        os.rename(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        if os.path.isdir(target):  # another run made it meanwhile
            return target
        raise
    return target


def _requirements(name: str) -> set[str]:
    """The distributions C{name} needs, itself included, with the extras asked for."""
    from packaging.requirements import Requirement

    found: dict[str, frozenset[str]] = {}
    todo = [(name, frozenset[str]())]
    while todo:
        current, extras = todo.pop()
        key = re.sub(r"[-_.]+", "-", current).lower()
        if key in found and extras <= found[key]:
            continue
        found[key] = found.get(key, frozenset()) | extras
        for line in importlib.metadata.distribution(current).requires or []:
            requirement = Requirement(line)
            environments = [{"extra": extra} for extra in (extras or {""})]
            if requirement.marker is None or any(
                requirement.marker.evaluate(environment) for environment in environments
            ):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return set(found)


def pipe_user() -> pwd.struct_passwd:
    """L{PIPE_USER}'s account; the test is skipped (failed in CI) without it."""
    try:
        return pwd.getpwnam(PIPE_USER)
    except KeyError:
        problem = f"no user {PIPE_USER!r} to run the pipe as"
    if os.environ.get("CI"):
        raise AssertionError(problem)
    raise SkipTest(problem)
