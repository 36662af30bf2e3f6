# -*- test-case-name: tests.integration.test_startup_failures -*-
"""
C{twistd -n gsmail} that cannot start, as an operator sees it: one line on
standard error, no traceback, and a sysexits(3) status (L{gsmail.startup}):
78 for a bad endpoint string or an address this host does not have, 71 for
a port in use, 73 for a UNIX socket whose directory is missing, 77 for a
port an unprivileged user may not bind.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile

from twisted.trial.unittest import TestCase

from gsmail.startup import EX_CANTCREAT, EX_NOPERM, EX_OSERR
from gsmail.status import EX_CONFIG
from tests.integration.running import require_root
from tests.util import ROOT, TOKEN, Child, python_env, run_to_end, twistd_argv


class StartupFailureTests(TestCase):
    """One line and a sysexits status for each way a listener fails."""

    timeout = 120

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="gsmail-test-startup-")
        os.chmod(self.directory, 0o755)
        self.addCleanup(shutil.rmtree, self.directory, True)

    def write_config(self, endpoint: str) -> str:
        path = os.path.join(self.directory, "gsconfig.ini")
        with open(path, "w") as f:
            f.write(
                f"[webservice-default]\ntoken = {TOKEN}\n[gsmail-default]\nurl = embedded\n"
                f"standin_groups = example\nsmtp_endpoint = {endpoint}\n"
                "domains = groups.example.com\nhostname = mx.groups.example.com\n"
                "ledger_path = state/ledger/posted.log\nspool_dir = state/spool\n"
                "standin_dir = state/standin\npostmaster_maildir = state/postmaster\n"
                "route_state_dir = state/routes\nerrors_dir = state/errors\nrejected_dir = state/rejected\n"
            )
        os.chmod(path, 0o644)
        return path

    async def start(
        self,
        endpoint: str,
        python: str = sys.executable,
        prefix: tuple[str, ...] = (),
        path: tuple[str, ...] = (ROOT,),
    ) -> Child:
        config = self.write_config(endpoint)
        argv = [*prefix, *twistd_argv(python, "gsmail", "--config", config)]
        return await run_to_end(self, argv, env=python_env(path), path=self.directory)

    def assertOneLine(self, child: Child, code: int, *texts: str) -> None:
        self.assertEqual(child.ended.result, code, child.output)
        lines = child.err.decode().splitlines()
        self.assertEqual(len(lines), 1, child.output)
        self.assertTrue(lines[0].startswith("gsmail: "), lines[0])
        for text in texts:
            self.assertIn(text, lines[0])
        self.assertNotIn("Traceback", child.output)
        self.assertNotIn(TOKEN, child.output)

    async def test_bad_endpoint_strings(self) -> None:
        """A port that is not a number or out of range, or an unknown keyword: 78."""
        for endpoint, text in [
            ("tcp:notaport", "expected a number, got 'notaport'"),
            ("tcp:99999", "the port must be 0 to 65535"),
            ("tcp:0:bogus=1", "unknown keyword 'bogus'"),
        ]:
            child = await self.start(endpoint)
            self.assertOneLine(child, EX_CONFIG, f"smtp_endpoint '{endpoint}'", text)

    async def test_unknown_interface(self) -> None:
        """An address this host does not have: 78."""
        child = await self.start("tcp:0:interface=192.0.2.77")
        self.assertOneLine(child, EX_CONFIG, "no such address on this host")

    async def test_port_in_use(self) -> None:
        """A port another server listens on: 71."""
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        child = await self.start(f"tcp:{port}:interface=127.0.0.1")
        self.assertOneLine(child, EX_OSERR, "the address is in use")

    async def test_socket_directory_missing(self) -> None:
        """A UNIX socket whose directory does not exist, with a lock file or without: 73."""
        for endpoint in (
            "unix:/nonexistent/gsmail/lmtp.sock",
            "unix:/nonexistent/gsmail/lmtp.sock:lockfile=1",
        ):
            child = await self.start(endpoint)
            self.assertOneLine(child, EX_CANTCREAT, "the socket's directory does not exist")

    async def test_systemd_socket_not_passed(self) -> None:
        """A systemd: endpoint started without systemd's sockets: 78."""
        child = await self.start("systemd:domain=INET:name=smtp")
        self.assertOneLine(child, EX_CONFIG, "systemd passed no such socket")

    async def test_permission_denied(self) -> None:
        """Port 25 for a user that is not root: 77, saying what would allow it."""
        require_root()
        from tests.integration.running import pipe_runtime, pipe_user

        user = pipe_user()
        python, path = await pipe_runtime(user)
        os.chown(self.directory, user.pw_uid, user.pw_gid)  # its state directories
        child = await self.start(
            "tcp:25:interface=127.0.0.1",
            python=python,
            prefix=("/usr/sbin/runuser", "-u", user.pw_name, "--"),
            path=path,
        )
        self.assertOneLine(child, EX_NOPERM, "permission denied (ports below 1024 need root")
