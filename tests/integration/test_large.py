"""
A 100 MiB message through the real command (C{twistd -n gsmail}, in its own
process, with the embedded stand-in): it is accepted and posted, and the
server's peak RSS stays under 100 MiB, because DATA streams to the spool and
the post streams base64 from it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
MIB = 1024 * 1024


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TwistdProcess(ProcessProtocol):
    """A C{twistd -n gsmail} child; collects its log and reports its exit."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


def spawn_gsmail(
    test: TestCase,
    directory: str,
    config: str,
    stop_signal: int | None = signal.SIGTERM,
) -> tuple[TwistdProcess, Any]:
    """
    Start C{twistd -n --pidfile= gsmail --config CONFIG} in C{directory}
    with this checkout on C{PYTHONPATH}; return its protocol and process.
    Unless C{stop_signal} is C{None} (the caller cleans up itself), a
    cleanup sends it that signal if it still runs and waits for its end.
    """
    child = TwistdProcess()
    process = reactor.spawnProcess(  # type: ignore[attr-defined]
        child,
        sys.executable,
        [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "gsmail", "--config", config],
        env=dict(os.environ, PYTHONPATH=ROOT),
        path=directory,
    )
    if stop_signal is not None:
        signal_number = stop_signal

        async def stop() -> None:
            if not child.ended.called:
                process.signalProcess(signal_number)
                await child.ended

        test.addCleanup(stop)
    return child, process


def peak_rss(pid: int) -> int:
    """The peak resident set size (VmHWM) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def send_large(port: int, size: int) -> tuple[bytes, str]:
    """
    Send one message of about C{size} bytes over ESMTP with a blocking
    socket; return the final reply line and the SHA-256 of the body lines.
    """
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!\r\n"
    block = line * (MIB // len(line))
    digest = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        f = s.makefile("rb")

        def reply() -> bytes:
            while True:
                got = f.readline()
                if got[3:4] != b"-":
                    return got

        reply()
        s.sendall(b"EHLO test\r\n")
        reply()
        s.sendall(b"MAIL FROM:<big@example.org> SIZE=%d\r\n" % (size + 1000))
        assert reply().startswith(b"250"), "MAIL refused"
        s.sendall(b"RCPT TO:<example@groups.example.com>\r\n")
        assert reply().startswith(b"250"), "RCPT refused"
        s.sendall(b"DATA\r\n")
        assert reply().startswith(b"354")
        header = b"Message-ID: <large@example.org>\r\nSubject: large\r\n\r\n"
        s.sendall(header)
        digest.update(header.replace(b"\r\n", b"\n"))
        lf_block = block.replace(b"\r\n", b"\n")
        for _ in range(size // len(block)):
            s.sendall(block)
            digest.update(lf_block)
        s.sendall(b".\r\n")
        final = reply()
        s.sendall(b"QUIT\r\n")
        return final, digest.hexdigest()


class LargeMessageTests(TestCase):
    """Bounded memory for large posts."""

    timeout = 300

    async def test_100_mib(self) -> None:
        """A 100 MiB message is posted intact while the server stays under 100 MiB RSS."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = free_port()
        config = os.path.join(directory, "gsconfig.ini")
        with open(config, "w") as f:
            f.write(
                "[webservice-default]\ntoken = large-test-token\n[gsmail-default]\nurl = embedded\n"
                f"smtp_endpoint = tcp:{port}:interface=127.0.0.1\ndomains = groups.example.com\n"
                "standin_groups = example\nmax_size = 200\nledger_path = ledger/posted.log\n"
                "spool_dir = spool\nstandin_dir = standin\n"
            )
        child, process = spawn_gsmail(self, directory, config)
        deadline = reactor.seconds() + 30  # type: ignore[attr-defined]
        while b"Embedded GroupServer stand-in" not in child.output:
            if child.ended.called or reactor.seconds() > deadline:  # type: ignore[attr-defined]
                self.fail("gsmail did not start:\n" + child.output.decode(errors="replace"))
            await deferLater(reactor, 0.05)

        size = 100 * MIB
        final, digest = await deferToThread(send_large, port, size)
        rss = peak_rss(process.pid)
        self.assertTrue(final.startswith(b"250 2.0.0"), final)
        [name] = os.listdir(os.path.join(directory, "standin", "groups", "example", "new"))
        stored = hashlib.sha256()
        with open(os.path.join(directory, "standin", "groups", "example", "new", name), "rb") as f:
            head = f.read(4096)
            body_start = head.index(b"Message-ID:")
            stored.update(head[body_start:])
            for chunk in iter(lambda: f.read(MIB), b""):
                stored.update(chunk)
        self.assertEqual(stored.hexdigest(), digest)
        self.assertLess(rss, 100 * MIB, f"peak RSS {rss / MIB:.1f} MiB")
