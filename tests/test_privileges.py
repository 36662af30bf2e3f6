"""
Tests for L{gsmail.privileges}: the state directories made and checked at
start, the UNIX socket options, and who may write what.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from gsmail.config import ConfigError, load_config
from gsmail.privileges import (
    RunUser,
    StatePath,
    prepare_state,
    secure_socket,
    state_paths,
)
from gsmail.startup import EX_CANTCREAT, EX_NOPERM, StartupError
from tests.util import make_config

NOBODY = 65534


def write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return path


class SocketOptionsTests(SynchronousTestCase):
    """C{unix_socket_group} and C{unix_socket_mode} in the file."""

    def load(self, extra: str) -> tuple[str, int]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = write(
            os.path.join(directory, "gsconfig.ini"),
            "[webservice-default]\ntoken = t0ken\n[gsmail-default]\nurl = embedded\n"
            "smtp_endpoint = tcp:0\ndomains = groups.example.com\n" + extra,
        )
        config = load_config(path)
        return config.unix_socket_group, config.unix_socket_mode

    def test_defaults(self) -> None:
        """No group (the run user's) and mode 0660."""
        self.assertEqual(self.load(""), ("", 0o660))

    def test_given(self) -> None:
        """A group by name or number; a mode in octal, with or without the leading 0."""
        self.assertEqual(
            self.load("unix_socket_group = root\nunix_socket_mode = 0600\n"), ("root", 0o600)
        )
        self.assertEqual(self.load("unix_socket_group = 0\nunix_socket_mode = 666\n"), ("0", 0o666))

    def test_unknown_group(self) -> None:
        """A group this host does not have is a one-line configuration error."""
        with self.assertRaises(ConfigError) as caught:
            self.load("unix_socket_group = no-such-group-here\n")
        self.assertIn(
            "unix_socket_group: no such group on this host: 'no-such-group-here'",
            str(caught.exception),
        )

    def test_bad_mode(self) -> None:
        """A mode that is not three octal digits is refused."""
        for value in ("rw-rw----", "0999", "66", "06600"):
            with self.assertRaises(ConfigError) as caught:
                self.load(f"unix_socket_mode = {value}\n")
            self.assertIn(
                "unix_socket_mode: expected an octal mode such as 0660", str(caught.exception)
            )


class RunUserTests(SynchronousTestCase):
    """What a user may do by a file's mode bits."""

    def info(self, uid: int, gid: int, mode: int) -> os.stat_result:
        return os.stat_result((stat.S_IFDIR | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))

    def test_owner_group_other(self) -> None:
        """The owner's bits for the owner, the group's for its members, the rest for others."""
        user = RunUser(1000, 1000, "gs", frozenset({1000, 50}))
        self.assertTrue(user.may(self.info(1000, 0, 0o700), 7))
        self.assertFalse(user.may(self.info(0, 0, 0o755), 2))
        self.assertTrue(user.may(self.info(0, 50, 0o770), 3))
        self.assertFalse(user.may(self.info(0, 51, 0o770), 1))
        self.assertTrue(user.may(self.info(0, 0, 0o755), 5))

    def test_root_may_all(self) -> None:
        """Root passes every check."""
        self.assertTrue(RunUser(0, 0, "root", frozenset({0})).may(self.info(5, 5, 0), 7))


class PrepareStateTests(SynchronousTestCase):
    """The state directories at start."""

    def mktemp(self) -> str:
        """A new path in a directory under /tmp that every user may enter."""
        base = tempfile.mkdtemp(prefix="gsmail-test-privileges-")
        os.chmod(base, 0o755)
        self.addCleanup(shutil.rmtree, base, True)
        return os.path.join(base, "state")

    def test_cannot_enter(self) -> None:
        """A parent the run user cannot pass through is named, with what to do (no chown)."""
        if os.geteuid() != 0:
            raise self.skipTest("needs root")  # type: ignore[attr-defined]
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "ledger"))
        os.chmod(directory, 0o700)
        config = make_config(directory)
        user = RunUser(NOBODY, NOBODY, "nobody", frozenset({NOBODY}))
        with self.assertRaises(StartupError) as caught:
            prepare_state(state_paths(config), user)
        self.assertEqual(caught.exception.code, EX_NOPERM)
        self.assertIn(f"nobody cannot enter {directory} (root:root 0700)", str(caught.exception))
        self.assertIn(f"(chmod o+x {directory})", str(caught.exception))

    def test_made(self) -> None:
        """Missing directories are made, a Maildir with tmp, new and cur."""
        directory = os.path.abspath(self.mktemp())
        config = make_config(directory)
        prepare_state(state_paths(config), None)
        for name in (
            "ledger",
            "spool",
            "standin",
            "postmaster/new",
            "postmaster/cur",
            "postmaster/tmp",
        ):
            self.assertTrue(os.path.isdir(os.path.join(directory, name)), name)

    def test_given_to_the_run_user(self) -> None:
        """
        As root, directories made for a run user (with their missing parents)
        are given to it; one that exists is left as it is.
        """
        if os.geteuid() != 0:
            raise self.skipTest("needs root")  # type: ignore[attr-defined]
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "spool"))
        config = make_config(directory, ledger_path=os.path.join(directory, "a", "b", "posted.log"))
        user = RunUser(NOBODY, NOBODY, "nobody", frozenset({NOBODY}))
        os.chown(os.path.join(directory, "spool"), NOBODY, NOBODY)
        prepare_state(state_paths(config), user)
        for name in ("a", "a/b", "standin", "postmaster", "postmaster/new"):
            info = os.stat(os.path.join(directory, name))
            self.assertEqual((info.st_uid, info.st_gid), (NOBODY, NOBODY), name)
        self.assertEqual(os.stat(directory).st_uid, os.geteuid())

    def test_left_by_root(self) -> None:
        """
        Directories and files the run user cannot write stop the start with
        one line (77) naming every directory to chown.
        """
        if os.geteuid() != 0:
            raise self.skipTest("needs root")  # type: ignore[attr-defined]
        directory = os.path.abspath(self.mktemp())
        config = make_config(directory)
        prepare_state(state_paths(config), None)  # as root
        user = RunUser(NOBODY, NOBODY, "nobody", frozenset({NOBODY}))
        with self.assertRaises(StartupError) as caught:
            prepare_state(state_paths(config), user)
        self.assertEqual(caught.exception.code, EX_NOPERM)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        names = " ".join(
            os.path.join(directory, name)
            for name in ("ledger", "spool", "postmaster", "routes", "errors", "rejected", "standin")
        )
        self.assertIn(
            f"ledger_path: nobody cannot write {directory}/ledger (root:root 0755)", message
        )
        self.assertTrue(message.endswith(f"chown -R nobody:nogroup {names}"), message)

    def test_file_left_by_root(self) -> None:
        """A ledger file of root's in a directory of the run user's is named too."""
        if os.geteuid() != 0:
            raise self.skipTest("needs root")  # type: ignore[attr-defined]
        directory = os.path.abspath(self.mktemp())
        config = make_config(directory)
        user = RunUser(NOBODY, NOBODY, "nobody", frozenset({NOBODY}))
        prepare_state(state_paths(config), user)
        write(config.ledger_path, "")
        os.chmod(config.ledger_path, 0o600)
        with self.assertRaises(StartupError) as caught:
            prepare_state(state_paths(config), user)
        self.assertIn(
            f"nobody cannot write {config.ledger_path} (root:root 0600)", str(caught.exception)
        )
        self.assertIn(f"chown -R nobody:nogroup {directory}/ledger", str(caught.exception))

    def test_shared_spool(self) -> None:
        """The system's temporary directory is used as it is, never given away."""
        config = make_config(os.path.abspath(self.mktemp()), spool_dir=tempfile.gettempdir())
        [spool] = [p for p in state_paths(config) if p.option == "spool_dir"]
        self.assertTrue(spool.shared)

    def test_cannot_make(self) -> None:
        """A directory that cannot be made is one line, exit 73, with the command that makes it."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        write(os.path.join(directory, "file"), "")
        path = StatePath("queue_dir", os.path.join(directory, "file", "queue"))
        with self.assertRaises(StartupError) as caught:
            prepare_state([path], None)
        self.assertEqual(caught.exception.code, EX_CANTCREAT)
        self.assertIn(f"queue_dir: cannot make {directory}/file/queue as ", str(caught.exception))
        self.assertIn("Not a directory (make it: install -d -o ", str(caught.exception))


class SecureSocketTests(SynchronousTestCase):
    """The owner, group and mode of a UNIX listener's socket."""

    def test_mode_and_group(self) -> None:
        """The mode and group are set; the owner is the run user's."""
        path = write(os.path.abspath(self.mktemp()), "")
        secure_socket("lmtp_endpoint", path, 0o640, "0", None)
        info = os.stat(path)
        self.assertEqual((stat.S_IMODE(info.st_mode), info.st_gid), (0o640, 0))
        if os.geteuid() == 0:
            user = RunUser(NOBODY, NOBODY, "nobody", frozenset({NOBODY}))
            secure_socket("lmtp_endpoint", path, None, "", user)
            info = os.stat(path)
            self.assertEqual(
                (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)), (NOBODY, NOBODY, 0o640)
            )
