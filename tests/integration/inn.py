"""
A private INN news server for tests (Debian's C{inn2}): C{innd} and a
standalone C{nnrpd} (readers and posting, C{AUTHINFO} checked by
C{ckpasswd} against a file of its own) on free ports of 127.0.0.1, with one
newsgroup, everything under a directory of C{/tmp} of its own (the system's
INN configuration is not read: C{INNCONF} names ours). Run as root: innd
drops to the C{news} user, which must own the directory (trial's temporary
directories are mode 0700, hence C{/tmp}). Stopped with C{ctlinnd
shutdown} in the test's cleanup.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from tests.util import eventually, free_port, listening, require_tool

NEWS_BIN = "/usr/lib/news/bin"


class _Process(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data[-4096:]

    def processEnded(self, reason: Failure) -> None:
        reason.trap(ProcessDone, ProcessTerminated)
        self.ended.callback(None)


class PrivateInn:
    """
    One private INN. C{port} is nnrpd's (where clients post and read);
    C{user}/C{password} the account it takes.
    """

    def __init__(self, test: TestCase, newsgroup: str = "local.test") -> None:
        self.innd = require_tool("innd", f"{NEWS_BIN}/innd")
        self.nnrpd = require_tool("nnrpd", f"{NEWS_BIN}/nnrpd")
        self.makedbz = require_tool("makedbz", f"{NEWS_BIN}/makedbz")
        self.ctlinnd = require_tool("ctlinnd", f"{NEWS_BIN}/ctlinnd")
        self.openssl = require_tool("openssl")
        if os.geteuid() != 0:
            raise SkipTest("a private INN needs root (innd runs as news)")
        self.test = test
        self.newsgroup = newsgroup
        self.user, self.password = "gw", "secret-pass"
        self.directory = tempfile.mkdtemp(prefix="gsmail-inn-", dir="/tmp")
        test.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        self.innd_port = free_port()
        self.port = free_port()
        self.conf = os.path.join(self.directory, "etc", "inn.conf")
        self._innd = _Process()
        self._nnrpd = _Process()

    def _write(self, name: str, text: str) -> None:
        with open(os.path.join(self.directory, name), "w", encoding="ascii") as f:
            f.write(text)

    def _setup(self) -> None:
        d = self.directory
        for sub in ["etc", "db", "run", "log", "tmp", "http"] + [
            f"spool/{s}" for s in ("articles", "overview", "incoming", "outgoing", "archive")
        ]:
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        paths = {
            "pathnews": "/usr/lib/news",
            "pathbin": NEWS_BIN,
            "pathfilter": f"{NEWS_BIN}/filter",
            "pathcontrol": f"{NEWS_BIN}/control",
            "pathetc": f"{d}/etc",
            "pathdb": f"{d}/db",
            "pathrun": f"{d}/run",
            "pathlog": f"{d}/log",
            "pathhttp": f"{d}/http",
            "pathtmp": f"{d}/tmp",
            "pathspool": f"{d}/spool",
            "patharticles": f"{d}/spool/articles",
            "pathoverview": f"{d}/spool/overview",
            "pathincoming": f"{d}/spool/incoming",
            "pathoutgoing": f"{d}/spool/outgoing",
            "patharchive": f"{d}/spool/archive",
        }
        settings = {
            "organization": '"gsmail tests"',
            "pathhost": "news.test.invalid",
            "domain": "test.invalid",
            "ovmethod": "tradindexed",
            "hismethod": "hisv6",
            "port": str(self.innd_port),
            "bindaddress": "127.0.0.1",
            "runasuser": "news",
            "runasgroup": "news",
            "mta": '"/bin/true %s"',
            "mailcmd": "/bin/true",
            "pgpverify": "false",
            "docancels": "none",
            "artcutoff": "0",
            **paths,
        }
        self._write("etc/inn.conf", "".join(f"{k}: {v}\n" for k, v in settings.items()))
        self._write("etc/newsfeeds", "ME:*::\n")
        # No peer can feed it: every client goes through nnrpd.
        self._write("etc/incoming.conf", 'peer ME {\n  hostname: "nobody.invalid"\n}\n')
        self._write(
            "etc/readers.conf",
            f'auth "gw" {{\n  hosts: "127.0.0.1"\n  auth: "ckpasswd -f {d}/etc/passwd"\n}}\n'
            'access "gw" {\n  users: "gw"\n  newsgroups: "*"\n  access: RPA\n}\n',
        )
        self._write("etc/storage.conf", "method tradspool {\n  newsgroups: *\n  class: 0\n}\n")
        self._write("etc/expire.ctl", "*:A:never:never:never\n")
        for name in ("distrib.pats", "moderators", "control.ctl"):
            self._write(f"etc/{name}", "")
        hashed = subprocess.run(
            [self.openssl, "passwd", "-6", self.password],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        self._write("etc/passwd", f"{self.user}:{hashed}\n")
        groups = [self.newsgroup, "control", "control.cancel", "junk"]
        self._write(
            "db/active",
            "".join(
                f"{g} 0000000000 0000000001 {'y' if g == self.newsgroup else 'n'}\n" for g in groups
            ),
        )
        for name in ("newsgroups", "active.times", "history"):
            self._write(f"db/{name}", "")
        for root, dirs, files in os.walk(d):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                shutil.chown(name, "news", "news")
        os.chmod(d, 0o755)
        subprocess.run(
            [
                "runuser",
                "-u",
                "news",
                "--",
                "env",
                f"INNCONF={self.conf}",
                self.makedbz,
                "-i",
                "-o",
            ],
            check=True,
            capture_output=True,
        )

    async def start(self) -> None:
        """Set up the directory, start innd and nnrpd, wait until both listen."""
        self._setup()
        env = {"INNCONF": self.conf, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        innd = reactor.spawnProcess(self._innd, self.innd, [self.innd, "-d", "-f"], env=env)
        self.test.addCleanup(lambda: Deferred.fromCoroutine(self._stop(innd, self._innd, True)))
        await eventually(
            lambda: listening(self.innd_port) or self._innd.ended.called,
            lambda: f"innd did not listen: {self.describe()}",
            timeout=20,
        )
        nnrpd = reactor.spawnProcess(
            self._nnrpd,
            self.nnrpd,
            [self.nnrpd, "-D", "-f", "-b", "127.0.0.1", "-p", str(self.port)],
            env=env,
        )
        self.test.addCleanup(lambda: Deferred.fromCoroutine(self._stop(nnrpd, self._nnrpd, False)))
        await eventually(
            lambda: listening(self.port) or self._nnrpd.ended.called,
            lambda: f"nnrpd did not listen: {self.describe()}",
            timeout=20,
        )
        if self._innd.ended.called or self._nnrpd.ended.called:
            raise AssertionError(f"INN ended at once: {self.describe()}")

    def describe(self) -> str:
        return (
            f"innd {bytes(self._innd.output)[-300:]!r}, nnrpd {bytes(self._nnrpd.output)[-300:]!r}"
        )

    async def _stop(self, transport: Any, process: _Process, innd: bool) -> None:
        if process.ended.called:
            return
        if innd:
            subprocess.run(
                [self.ctlinnd, "-t", "10", "shutdown", "test over"],
                env={"INNCONF": self.conf},
                capture_output=True,
            )
        else:
            transport.signalProcess("TERM")
        try:
            await eventually(lambda: process.ended.called, lambda: "still running", timeout=10)
        except AssertionError:
            transport.signalProcess("KILL")
            await process.ended
