# -*- test-case-name: tests.test_dkimtool -*-
"""
Tests for L{gsmail.dkimtool}, C{gsmail-dkim}: the key file it writes, the
record it prints, and what C{check} says about what DNS publishes (a
twisted.names server on 127.0.0.1 for the end-to-end case).
"""

from __future__ import annotations

import contextlib
import io
import os
import pwd
import re
import stat

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.names import server
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gsmail.dkimtool import LookupFailed, check, run
from gsmail.signing import load_key
from tests.util import TOKEN, listen_dns
from tests.zones import MemoryZone, txt


def genkey(directory: str, *extra: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = run(["genkey", "groups.example.com", "gs1", "--dir", directory, *extra], out, err)
    return status, out.getvalue(), err.getvalue()


def published_value(output: str) -> bytes:
    """The TXT text of the record C{genkey} printed (its strings joined)."""
    line = next(line for line in output.splitlines() if "._domainkey." in line)
    return "".join(re.findall(r'"([^"]*)"', line)).encode()


class GenkeyTests(SynchronousTestCase):
    """C{gsmail-dkim genkey}."""

    def test_rsa(self) -> None:
        """An RSA key, mode 0600, and the record and dkim_keys entry to use."""
        directory = self.mktemp()
        os.makedirs(directory)
        status, out, err = genkey(directory)
        self.assertEqual((status, err), (0, ""))
        path = os.path.abspath(os.path.join(directory, "groups.example.com.gs1.key"))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        key = load_key(path)
        self.assertEqual((key.algorithm, key.bits), ("rsa-sha256", 2048))
        self.assertIn("gs1._domainkey.groups.example.com. IN TXT", out)
        self.assertIn(f"dkim_keys = groups.example.com:gs1:{path}", out)
        self.assertEqual(published_value(out), f"v=DKIM1; k=rsa; p={key.public}".encode())

    def test_ed25519(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        status, out, _ = genkey(directory, "--ed25519")
        self.assertEqual(status, 0)
        self.assertIn('"v=DKIM1; k=ed25519; p=', out)

    def test_never_overwrites(self) -> None:
        """An existing key file is kept: 73."""
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "groups.example.com.gs1.key")
        with open(path, "w") as f:
            f.write("keep me")
        status, _, err = genkey(directory)
        self.assertEqual(status, 73)
        self.assertIn("File exists", err)
        with open(path) as f:
            self.assertEqual(f.read(), "keep me")

    def test_owner(self) -> None:
        """--user gives the file to that user as root; else it is refused (77), no file left."""
        directory = self.mktemp()
        os.makedirs(directory)
        nobody = pwd.getpwnam("nobody")
        status, _, err = genkey(directory, "--user", "nobody")
        path = os.path.join(directory, "groups.example.com.gs1.key")
        if os.geteuid() == 0:
            self.assertEqual(status, 0, err)
            self.assertEqual(os.stat(path).st_uid, nobody.pw_uid)
        else:
            self.assertEqual(status, 77)
            self.assertFalse(os.path.exists(path))

    def test_usage(self) -> None:
        for argv in (
            ["genkey", "bad_domain", "s"],
            ["genkey", "groups.example.com", "s", "--bits", "512"],
            ["genkey", "groups.example.com", "s", "--user", "no-such-user-here"],
            ["frobnicate"],
        ):
            with self.subTest(argv=argv):
                self.assertEqual(run(argv, io.StringIO(), io.StringIO()), 64)


class CheckTests(SynchronousTestCase):
    """C{check} against a table of published records."""

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        out = io.StringIO()
        run(["genkey", "groups.example.com", "gs1", "--dir", directory], out, io.StringIO())
        self.record = published_value(out.getvalue())
        self.path = os.path.abspath(os.path.join(directory, "groups.example.com.gs1.key"))
        self.entries = [f"groups.example.com:gs1:{self.path}"]
        self.name = "gs1._domainkey.groups.example.com"

    def check(self, records: dict[str, list[bytes]] | None) -> tuple[int, str]:
        def lookup(name: str) -> list[bytes]:
            if records is None:
                raise LookupFailed("Timeout")
            return records.get(name, [])

        out = io.StringIO()
        return check(self.entries, lookup, out), out.getvalue()

    def test_ok(self) -> None:
        status, out = self.check({self.name: [self.record]})
        self.assertEqual(status, 0)
        self.assertTrue(out.startswith("ok "), out)

    def test_missing(self) -> None:
        status, out = self.check({})
        self.assertEqual(status, 1)
        self.assertIn("MISSING", out)
        self.assertIn(self.record.decode()[:40], out)

    def test_mismatch(self) -> None:
        """A record of another key is reported, with the record to publish instead."""
        other = io.StringIO()
        directory = self.mktemp()
        os.makedirs(directory)
        run(["genkey", "groups.example.com", "gs1", "--dir", directory, "--ed25519"], other)
        status, out = self.check({self.name: [published_value(other.getvalue())]})
        self.assertEqual(status, 1)
        self.assertIn("MISMATCH", out)
        self.assertIn("k=ed25519, the key is rsa", out)

    def test_unusable_key(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"garbage")
        status, out = self.check({self.name: [self.record]})
        self.assertEqual(status, 1)
        self.assertIn("UNUSABLE", out)

    def test_no_answer(self) -> None:
        status, out = self.check(None)
        self.assertEqual(status, 75)
        self.assertIn("NO ANSWER", out)


class CheckCommandTests(TestCase):
    """C{gsmail-dkim check --config ...} against a DNS server on 127.0.0.1."""

    async def test_end_to_end(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        out = io.StringIO()
        run(["genkey", "groups.example.com", "gs1", "--dir", directory], out, io.StringIO())
        record = published_value(out.getvalue()).decode()
        zone = MemoryZone(b"", [(b"gs1._domainkey.groups.example.com", txt(record))])
        factory = server.DNSServerFactory(authorities=[zone], verbose=0)
        factory.noisy = False
        udp, tcp = listen_dns(reactor, factory)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        config = os.path.join(directory, "gsconfig.ini")
        with open(config, "w") as f:
            f.write(
                f"[webservice-default]\ntoken = {TOKEN}\n"
                "[gsmail-default]\nurl = embedded\nsmtp_endpoint = tcp:0\n"
                "domains = groups.example.com\n"
                "dkim_keys = groups.example.com:gs1:groups.example.com.gs1.key,"
                " groups.example.com:old:missing.key\n"
                f"dns_servers = 127.0.0.1:{udp.getHost().port}\n"
            )
        report = io.StringIO()
        status = await deferToThread(run, ["check", "--config", config], report, io.StringIO())
        lines = report.getvalue().splitlines()
        self.assertEqual(status, 1)
        self.assertTrue(lines[0].startswith("ok        groups.example.com:gs1"), lines)
        self.assertTrue(lines[1].startswith("UNUSABLE  groups.example.com:old"), lines)

    def test_bad_config(self) -> None:
        self.assertEqual(
            run(["check", "--config", "/nonexistent.ini"], io.StringIO(), io.StringIO()), 78
        )


class VersionTests(SynchronousTestCase):
    """C{gsmail-dkim --version}, as the other commands have it."""

    def test_version(self) -> None:
        """It prints gsmail's version and exits 0."""
        from gsmail import __version__

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(run(["--version"]), 0)
        self.assertEqual(out.getvalue(), f"gsmail-dkim (gsmail) {__version__}\n")
