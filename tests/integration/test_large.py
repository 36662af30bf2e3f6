"""
A 100 MiB message through the real command (C{twistd -n gsmail}, in its own
process, with the embedded stand-in): it is accepted and posted, and the
server's peak RSS stays under 100 MiB, because DATA streams to the spool and
the post streams base64 from it.
"""

from __future__ import annotations

import hashlib
import os
import socket

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.util import free_port, spawn_gsmail, wait_for

MIB = 1024 * 1024


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
        child = await spawn_gsmail(self, directory, config)
        await wait_for(child, "Embedded GroupServer stand-in")

        size = 100 * MIB
        final, digest = await deferToThread(send_large, port, size)
        rss = peak_rss(child.pid)
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
