# -*- test-case-name: tests.integration.test_systemd -*-
"""
The systemd units of C{conf/systemd/} (docs/operations.md): C{systemd-analyze
verify} finds nothing to say about them, and socket activation works for
real: C{systemd-socket-activate} (Debian's systemd package; no PID 1 needed)
listens where C{gsmail.socket} says, in its order, and passes the sockets to
C{twistd -n gsmail} configured with the endpoints C{gsmail.socket}
documents; a message goes through each (ESMTP, submission, LMTP) and
gsmail's readiness datagram (C{READY=1}) reaches the C{NOTIFY_SOCKET} the
test binds.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import stat
import sys
import tempfile
from typing import Any, Final

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.util import (
    ROOT,
    TOKEN,
    Child,
    python_env,
    require_tool,
    run_child,
    run_to_end,
    stop,
    twistd_argv,
    wait_for,
)

UNITS: Final = os.path.join(ROOT, "conf", "systemd")
EXAMPLE: Final = "example@groups.example.com"


def unit_text(name: str) -> str:
    with open(os.path.join(UNITS, name), encoding="utf-8") as f:
        return f.read()


def settings(text: str) -> list[tuple[str, str]]:
    """The C{Key=value} lines of a unit file, in order (keys may repeat)."""
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.append((key.strip(), value.strip()))
    return found


class UnitFileTests(TestCase):
    """The unit files as systemd reads them."""

    timeout = 60

    async def test_verify(self) -> None:
        """
        C{systemd-analyze verify} on the service (with its socket-activation
        drop-in) and the socket prints nothing: no unknown key, no bad
        value. The commands are stand-ins at the units' paths moved to a
        temporary directory, since verify checks they exist.
        """
        analyze = require_tool("systemd-analyze")
        directory = tempfile.mkdtemp(prefix="gsmail-test-units-")
        self.addCleanup(shutil.rmtree, directory, True)
        os.makedirs(os.path.join(directory, "bin"))
        os.makedirs(os.path.join(directory, "gsmail.service.d"))
        for command in ("twistd", "gsmail-check"):
            path = os.path.join(directory, "bin", command)
            with open(path, "w") as f:
                f.write("#!/bin/sh\n")
            os.chmod(path, 0o755)
        for name in ("gsmail.service", "gsmail.socket", "gsmail.service.d/socket-activated.conf"):
            text = unit_text(name).replace("/opt/gsmail/bin/", os.path.join(directory, "bin", ""))
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)
        child = await run_to_end(
            self,
            [
                analyze,
                "verify",
                os.path.join(directory, "gsmail.service"),
                os.path.join(directory, "gsmail.socket"),
            ],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        self.assertEqual((child.ended.result, child.output), (0, ""))

    def test_service_settings(self) -> None:
        """Type=notify, twistd in the foreground without a pid file, the gsmail user, sandboxed."""
        found = dict(settings(unit_text("gsmail.service")))
        self.assertEqual(found["Type"], "notify")
        self.assertIn("twistd -n --pidfile= gsmail --config ", found["ExecStart"])
        self.assertEqual(
            (found["User"], found["StateDirectory"], found["RuntimeDirectory"]),
            ("gsmail", "gsmail", "gsmail"),
        )
        self.assertEqual(found["AmbientCapabilities"], "CAP_NET_BIND_SERVICE")
        for key, value in [
            ("ProtectSystem", "strict"),
            ("NoNewPrivileges", "yes"),
            ("PrivateTmp", "yes"),
        ]:
            self.assertEqual(found[key], value)
        dropin = dict(settings(unit_text("gsmail.service.d/socket-activated.conf")))
        self.assertEqual(dropin["AmbientCapabilities"], "")


class SocketActivationTests(TestCase):
    """gsmail takes its listening sockets from systemd."""

    timeout = 120

    def setUp(self) -> None:
        self.activate = require_tool("systemd-socket-activate")
        self.directory = tempfile.mkdtemp(prefix="gsmail-test-activation-")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def listen_arguments(self) -> tuple[list[str], dict[str, Any]]:
        """
        C{-l} arguments in C{gsmail.socket}'s order (ports on ::1 picked
        free, the LMTP socket in the test's directory), and where each is.
        """
        argv: list[str] = []
        where: dict[str, Any] = {}
        for key, value in settings(unit_text("gsmail.socket")):
            if key != "ListenStream":
                continue
            if value.startswith("/"):
                where["lmtp"] = os.path.join(self.directory, "lmtp.sock")
                argv.append(f"--listen={where['lmtp']}")
            else:
                name = {"25": "smtp", "587": "submission"}[value]
                with socket.socket(socket.AF_INET6) as probe:
                    probe.bind(("::1", 0))
                    where[name] = probe.getsockname()[1]
                argv.append(f"--listen=[::1]:{where[name]}")
        return argv, where

    def endpoints(self) -> str:
        """The endpoint lines that C{gsmail.socket}'s comment tells the operator to write."""
        lines = re.findall(r"^#\s+(\w+_endpoint = systemd:\S+)$", unit_text("gsmail.socket"), re.M)
        self.assertEqual(len(lines), 3, lines)
        return "\n".join(lines) + "\n"

    def write_config(self) -> str:
        path = os.path.join(self.directory, "gsconfig.ini")
        with open(path, "w") as f:
            f.write(
                f"[webservice-default]\ntoken = {TOKEN}\n[gsmail-default]\nurl = embedded\n"
                "standin_groups = example\ndomains = groups.example.com\n"
                "hostname = mx.groups.example.com\nledger_path = state/ledger/posted.log\n"
                "spool_dir = state/spool\nstandin_dir = state/standin\n"
                "postmaster_maildir = state/postmaster\nqueue_dir = state/queue\n"
                + self.endpoints()
            )
        return path

    def posts(self) -> list[bytes]:
        new = os.path.join(self.directory, "state", "standin", "groups", "example", "new")
        if not os.path.isdir(new):
            return []
        found = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                found.append(f.read())
        return found

    async def test_message_through_each_socket(self) -> None:
        """
        The first connection starts gsmail, which adopts the three sockets
        (by index, each named C{gsmail.socket} as systemd names them), says
        READY=1 on NOTIFY_SOCKET, and takes a message on each: ESMTP and
        LMTP straight to the group, submission through the outbound queue.
        """
        if not socket.has_ipv6:
            raise SkipTest("no IPv6 (gsmail.socket's ports are [::]:25 and [::]:587)")
        notify = os.path.join(self.directory, "notify")
        datagrams: list[bytes] = []

        class Receiver(DatagramProtocol):
            def datagramReceived(self, data: bytes, address: Any) -> None:
                datagrams.append(data)

        port = reactor.listenUNIXDatagram(notify, Receiver())  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        listen, where = self.listen_arguments()
        env = python_env()
        argv = [
            self.activate,
            *listen,
            "--fdname=" + ":".join(["gsmail.socket"] * len(listen)),
            f"--setenv=PYTHONPATH={env['PYTHONPATH']}",
            f"--setenv=NOTIFY_SOCKET={notify}",
            *twistd_argv(sys.executable, "gsmail", "--config", self.write_config()),
        ]
        child: Child = await run_child(self, argv, env=env, path=self.directory)
        await wait_for(child, f"Listening on {where['lmtp']}")
        self.assertFalse(os.path.exists(os.path.join(self.directory, "state")))  # not started yet
        self.assertEqual(stat.S_IFMT(os.stat(where["lmtp"]).st_mode), stat.S_IFSOCK)

        def send(kind: str, message_id: str) -> dict[str, Any]:
            message = (
                f"From: alice@example.org\r\nTo: {EXAMPLE}\r\nSubject: via {kind}\r\n"
                f"Message-ID: <{message_id}>\r\n\r\nHello over {kind}.\r\n"
            )
            client: smtplib.SMTP
            if kind == "lmtp":
                client = smtplib.LMTP(where["lmtp"], timeout=30)
            else:
                client = smtplib.SMTP("::1", where[kind], timeout=30)
            refused = client.sendmail("alice@example.org", [EXAMPLE], message)
            client.quit()
            return refused

        for kind in ("smtp", "submission", "lmtp"):
            self.assertEqual(await deferToThread(send, kind, f"{kind}@activation.example.org"), {})
        await wait_for(child, "gsmail ready: ESMTP on ::1:")
        for _ in range(200):  # the submitted one goes through the queue: at most 10 s
            if len(self.posts()) == 3:
                break
            await deferLater(reactor, 0.05, lambda: None)
        posts = b"\n".join(self.posts())
        for kind in ("smtp", "submission", "lmtp"):
            self.assertIn(f"Message-ID: <{kind}@activation.example.org>".encode(), posts)
        self.assertEqual(len(self.posts()), 3)
        for _ in range(100):
            if datagrams:
                break
            await deferLater(reactor, 0.05, lambda: None)
        [ready] = datagrams[:1]
        self.assertTrue(ready.startswith(b"READY=1\nSTATUS=Taking mail: ESMTP on ::1:"), ready)
        self.assertIn(await stop(child), (0, -15), child.output)
        self.assertIn(b"STOPPING=1", datagrams[-1])
