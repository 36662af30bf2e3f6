"""
Tests for L{gsmail.startup}: the one line and exit status of each failure to
listen, and the systemd readiness datagram.
"""

from __future__ import annotations

import errno
import os
import socket

from twisted.internet.error import CannotListenError
from twisted.trial.unittest import SynchronousTestCase

from gsmail.startup import (
    EX_CANTCREAT,
    EX_NOPERM,
    EX_OSERR,
    StartupError,
    listen_failure,
    notify_systemd,
)
from gsmail.status import EX_CONFIG


def os_error(number: int) -> OSError:
    return OSError(number, os.strerror(number))


class ListenFailureTests(SynchronousTestCase):
    """What an operator reads when a listener cannot be made."""

    def check(
        self, error: BaseException, code: int, text: str, description: str = "tcp:25"
    ) -> None:
        failure = listen_failure("smtp_endpoint", description, error)
        self.assertIsInstance(failure, StartupError)
        self.assertEqual(failure.code, code)
        self.assertEqual(str(failure), f"smtp_endpoint {description!r}: {text}")

    def test_parse_errors(self) -> None:
        """A bad port or keyword is a configuration error (78)."""
        self.check(
            ValueError("invalid literal for int() with base 10: 'notaport'"),
            EX_CONFIG,
            "expected a number, got 'notaport'",
        )
        self.check(
            TypeError("_parseTCP() got an unexpected keyword argument 'bogus'"),
            EX_CONFIG,
            "unknown keyword 'bogus'",
        )
        self.check(
            OverflowError("bind(): port must be 0-65535."),
            EX_CONFIG,
            "cannot listen: the port must be 0 to 65535",
        )

    def test_os_errors(self) -> None:
        """Each bind(2) error gets its words and its sysexits value."""
        cases = {
            errno.EADDRINUSE: (EX_OSERR, "the address is in use"),
            errno.EACCES: (EX_NOPERM, "permission denied"),
            errno.EADDRNOTAVAIL: (EX_CONFIG, "no such address on this host"),
            errno.ENOENT: (EX_CANTCREAT, "the socket's directory does not exist"),
        }
        for number, (code, start) in cases.items():
            failure = listen_failure(
                "lmtp_endpoint", "unix:/x", CannotListenError("", 25, os_error(number))
            )
            self.assertEqual(failure.code, code)
            self.assertIn(f"cannot listen: {start}", str(failure))

    def test_systemd_socket_missing(self) -> None:
        """A socket systemd did not pass names the unit option to check."""
        failure = listen_failure("smtp_endpoint", "systemd:domain=INET:name=smtp", KeyError("smtp"))
        self.assertEqual(failure.code, EX_CONFIG)
        self.assertIn("systemd passed no such socket", str(failure))
        self.assertIn("FileDescriptorName=", str(failure))

    def test_one_line(self) -> None:
        """Line breaks never reach the message."""
        self.assertNotIn("\n", str(StartupError("a\nb")))


class NotifySystemdTests(SynchronousTestCase):
    """C{sd_notify(3)} by hand."""

    def receiver(self, address: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(address)
        sock.settimeout(5)
        return sock

    def test_path(self) -> None:
        """The datagram goes to the socket named by a path."""
        path = os.path.abspath(self.mktemp())
        sock = self.receiver(path)
        self.assertTrue(notify_systemd("READY=1\nSTATUS=x", {"NOTIFY_SOCKET": path}))
        self.assertEqual(sock.recv(4096), b"READY=1\nSTATUS=x")

    def test_abstract(self) -> None:
        """A name starting with @ is in the abstract namespace."""
        name = f"gsmail-test-{os.getpid()}-{id(self)}"
        sock = self.receiver("\0" + name)
        self.assertTrue(notify_systemd("READY=1", {"NOTIFY_SOCKET": "@" + name}))
        self.assertEqual(sock.recv(4096), b"READY=1")

    def test_not_under_systemd(self) -> None:
        """No NOTIFY_SOCKET: nothing is sent; a socket nobody reads is logged, not raised."""
        self.assertFalse(notify_systemd("READY=1", {}))
        self.assertFalse(notify_systemd("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify"}))
        self.flushLoggedErrors()
