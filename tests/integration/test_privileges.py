# -*- test-case-name: tests.integration.test_privileges -*-
"""
C{twistd -n --uid USER --gid GROUP gsmail} started as root, as
C{docs/migration.md} step 2 runs it: the LMTP socket is bound as root and
handed to the run user and to C{unix_socket_group}, so that another user in
that group (Postfix's C{lmtp} client, in life) connects after the drop and
its message reaches the embedded stand-in, whose files (like every state
directory) belong to the run user. State an earlier run as root left stops
the start with one line naming what to C{chown}.

Needs root (skipped by hand without it; CI runs as root). The users and the
group are made with C{useradd}/C{groupadd} and left for the next run.
gsmail runs with an interpreter the run user can read (L{pipe_runtime}:
this one, or the system's Python with a copy of the dependencies), since a
Python under C{/root} cannot load its own modules after the drop.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from typing import Final

from twisted.trial.unittest import TestCase

from gsmail.startup import EX_NOPERM
from tests.integration.running import (
    client_argv,
    ensure_group,
    ensure_user,
    pipe_runtime,
    require_root,
    system_python,
)
from tests.util import ROOT, TOKEN, python_env, run_child, run_to_end, stop, twistd_argv, wait_for

#: The user gsmail runs as, the group its LMTP socket is given to, a user
#: in that group (Postfix's role) and one outside it.
RUN_USER: Final = "gsmail-t-run"
SOCKET_GROUP: Final = "gsmail-t-sock"
CLIENT_USER: Final = "gsmail-t-client"
OUTSIDER: Final = "nobody"

EXAMPLE: Final = "example@groups.example.com"


def write_config(directory: str) -> str:
    """The configuration of migration.md step 2, with the stand-in and state under C{directory}."""
    path = os.path.join(directory, "gsconfig.ini")
    with open(path, "w") as f:
        f.write(
            f"[webservice-default]\ntoken = {TOKEN}\n[gsmail-default]\nurl = embedded\n"
            "standin_groups = example\nlmtp_endpoint = unix:run/lmtp.sock:lockfile=1\n"
            f"smtp_endpoint =\nunix_socket_group = {SOCKET_GROUP}\n"
            "domains = groups.example.com\nhostname = mx.groups.example.com\n"
            "ledger_path = state/ledger/posted.log\nspool_dir = state/spool\n"
            "standin_dir = state/standin\npostmaster_maildir = state/postmaster\n"
            "route_state_dir = state/routes\nerrors_dir = state/errors\nrejected_dir = state/rejected\n"
        )
    os.chmod(path, 0o644)
    return path


class DropPrivilegesTests(TestCase):
    """Root starts gsmail, which drops to its user and stays reachable for Postfix's group."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        require_root()
        ensure_group(SOCKET_GROUP)
        self.run_user = ensure_user(RUN_USER)
        self.client_user = ensure_user(CLIENT_USER, [SOCKET_GROUP])
        self.python, self.path = await pipe_runtime(self.run_user)
        # Under /tmp: every user may pass through it (a trial directory may be under /root).
        self.directory = tempfile.mkdtemp(prefix="gsmail-test-privileges-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        os.chmod(self.directory, 0o755)
        # The socket's directory belongs to gsmail's user (systemd's RuntimeDirectory=).
        run = os.path.join(self.directory, "run")
        os.mkdir(run)
        os.chown(run, self.run_user.pw_uid, self.run_user.pw_gid)
        os.chmod(run, 0o755)
        self.config = write_config(self.directory)
        self.socket = os.path.join(run, "lmtp.sock")
        self.env = python_env(self.path)

    def gsmail(self, *twistd: str) -> list[str]:
        return twistd_argv(self.python, *twistd, "gsmail", "--config", self.config)

    async def send_as(self, user: str, message_id: str) -> str:
        """Send one message over the LMTP socket as C{user}; the client's one-line report."""
        argv = ["/usr/sbin/runuser", "-u", user, "--"]
        argv += client_argv(system_python(), self.socket, "lmtp", EXAMPLE, message_id)
        child = await run_to_end(self, argv, env={"PATH": "/usr/bin:/bin"}, path="/")
        return child.output.strip()

    def owner(self, path: str) -> tuple[int, int, int]:
        info = os.stat(path)
        return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)

    async def test_lmtp_socket_reachable_after_drop(self) -> None:
        """
        The socket is the run user's, in C{unix_socket_group}, mode 0660; a
        user in that group delivers a message, which the embedded stand-in
        (running as the run user) stores; a user outside the group is
        refused by the kernel; every state directory belongs to the run user.
        """
        user = self.run_user
        child = await run_child(
            self, self.gsmail("--uid", RUN_USER, "--gid", RUN_USER), env=self.env, path=ROOT
        )
        await wait_for(child, "gsmail ready")
        self.assertEqual(self.owner(self.socket), (user.pw_uid, ensure_group(SOCKET_GROUP), 0o660))
        self.assertEqual(await self.send_as(CLIENT_USER, "drop-1@example.org"), "sent")
        refused = await self.send_as(OUTSIDER, "drop-2@example.org")
        self.assertIn("PermissionError", refused)
        posts = os.path.join(self.directory, "state", "standin", "groups", "example", "new")
        [post] = os.listdir(posts)
        with open(os.path.join(posts, post), "rb") as f:
            self.assertIn(b"Message-ID: <drop-1@example.org>", f.read())
        for name in ("state", "state/ledger", "state/spool", "state/standin", "state/postmaster"):
            self.assertEqual(
                self.owner(os.path.join(self.directory, name))[:2], (user.pw_uid, user.pw_gid), name
            )
        self.assertEqual(os.stat(os.path.join(posts, post)).st_uid, user.pw_uid)
        self.assertIn(await stop(child), (0, -15), child.output)
        self.assertFalse(os.path.exists(self.socket))

    async def test_state_left_by_root(self) -> None:
        """
        After a run as root made the state directories, starting as the run
        user fails at once: exit 77 (EX_NOPERM) and one line on standard
        error with the C{chown -R} that fixes it; nothing is changed.
        """
        first = await run_child(self, self.gsmail(), env=self.env, path=ROOT)
        await wait_for(first, "gsmail ready")
        self.assertIn(await stop(first), (0, -15), first.output)
        ledger = os.path.join(self.directory, "state", "ledger")
        self.assertEqual(os.stat(ledger).st_uid, 0)

        child = await run_to_end(
            self, self.gsmail("--uid", RUN_USER, "--gid", RUN_USER), env=self.env, path=ROOT
        )
        self.assertEqual(child.ended.result, EX_NOPERM, child.output)
        lines = child.err.decode().splitlines()
        self.assertEqual(len(lines), 1, child.output)
        self.assertIn(f"chown -R {RUN_USER}:{RUN_USER} {ledger} ", lines[0])
        self.assertEqual(os.stat(ledger).st_uid, 0)
        self.assertFalse(os.path.exists(self.socket))
