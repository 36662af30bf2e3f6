"""
Helpers for the tests that run gsmail as an operator does (as root dropping
to a user, under C{systemd-socket-activate}, ...): test users, and a short
LMTP/SMTP client run as another user. The child processes themselves
(C{twistd -n gsmail} and others) are started with L{tests.util.run_child}.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
from collections.abc import Sequence

from twisted.trial.unittest import SkipTest

from tests.util import require_tool


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
