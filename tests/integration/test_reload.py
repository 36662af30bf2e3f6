# -*- test-case-name: tests.integration.test_reload -*-
"""
Reloading as an operator does it: C{twistd -n --logfile ... gsmail} in a
child process, the certificate files replaced (as certbot renews them) and
the configuration edited, then C{kill -HUP}: a new STARTTLS session gets the
new certificate, the new domain is accepted, a broken configuration keeps
both, and a log file renamed by logrotate is reopened. Then the same with
an inbound worker process, which the main process tells to reload.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import signal
import subprocess
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.certificates import new_certificate, peer_certificate
from tests.integration.clients import rcpt
from tests.reloadconf import write_config
from tests.util import (
    DOMAIN,
    ROOT,
    TOKEN,
    Child,
    make_config,
    port_of,
    python_env,
    require_tool,
    run_child,
    start_service,
    stop,
    twistd_argv,
)

#: Polls of the log (every 50 ms) before a test gives up.
POLLS = 400


class TwistdReloadTests(TestCase):
    """C{twistd gsmail} with a log file, reloaded with SIGHUP."""

    timeout = 120

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.start())

    async def start(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.cert_a = new_certificate(self.directory, "a")
        self.config = write_config(self.directory)
        self.log = os.path.join(self.directory, "gsmail.log")
        argv = twistd_argv(sys.executable, "--logfile", self.log, "gsmail", "--config", self.config)
        self.child: Child = await run_child(self, argv, env=python_env(), path=self.directory)
        self.addCleanup(self.stop)  # before run_child's SIGKILL (cleanups run last first)
        text = await self.logged(r"gsmail ready: ESMTP on 127\.0\.0\.1:(\d+)")
        self.port = int(text)

    async def stop(self) -> None:
        """SIGTERM: gsmail stops as usual; the token never reached the log."""
        self.assertIn(await stop(self.child), (0, -15), self.child.output)
        with open(self.log) as f:
            self.assertNotIn(TOKEN, f.read())

    def read(self, path: str) -> str:
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    async def logged(self, pattern: str, path: str | None = None, after: int = 0) -> str:
        """Wait for C{pattern} in the log (past offset C{after}); its first group, or the line."""
        path = path or self.log
        for _ in range(POLLS):
            match = re.search(pattern, self.read(path)[after:])
            if match:
                return match.group(1) if match.groups() else match.group(0)
            if self.child.ended.called:
                break
            await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"no {pattern!r} in {path}:\n{self.read(path)}\n{self.child.output}")

    async def hangup(self, pattern: str) -> str:
        """SIGHUP the child and wait for C{pattern} among the lines it logs then."""
        before = len(self.read(self.log))
        self.child.transport.signalProcess(signal.SIGHUP)
        return await self.logged(pattern, after=before)

    async def test_new_certificate_and_domain(self) -> None:
        """
        After SIGHUP a new STARTTLS session sees certificate B and the new
        domain is gsmail's; after SIGHUP with a broken configuration it
        still does.
        """
        self.assertEqual(await deferToThread(peer_certificate, self.port), self.cert_a)
        self.assertEqual(await deferToThread(rcpt, self.port, "nosuch@new.example"), "5.7.1")
        cert_b = new_certificate(self.directory, "b")
        write_config(self.directory, domains=f"{DOMAIN} new.example", more="max_size = 10\n")
        line = await self.hangup(r".*reloaded \(changed: domains\).*")
        self.assertIn("domains groups.example.com new.example", line)
        self.assertRegex(self.read(self.log), r"needs a restart: max_size\n")
        self.assertEqual(await deferToThread(peer_certificate, self.port), cert_b)
        self.assertEqual(await deferToThread(rcpt, self.port, "nosuch@new.example"), "5.1.1")
        self.assertEqual(await deferToThread(rcpt, self.port, f"example@{DOMAIN}"), "2.1.5")

        new_certificate(self.directory, "c")
        with open(self.config, "a") as f:
            f.write("max_recipients = many\n")
        line = await self.hangup(r".*Configuration not reloaded.*")
        self.assertIn("max_recipients", line)
        self.assertEqual(await deferToThread(peer_certificate, self.port), cert_b)
        self.assertEqual(await deferToThread(rcpt, self.port, "nosuch@new.example"), "4.1.1")

    async def test_log_reopened(self) -> None:
        """A log file renamed by logrotate: after SIGHUP new lines go to a new file."""
        os.rename(self.log, self.log + ".1")
        self.child.transport.signalProcess(signal.SIGHUP)
        await self.logged(r"Log file .*gsmail\.log reopened")
        await self.logged(r"reloaded \(no option changed\)")
        self.assertNotIn("Log file", self.read(self.log + ".1"))
        self.assertIn("gsmail ready", self.read(self.log + ".1"))
        self.assertNotIn("gsmail ready", self.read(self.log))

    async def test_logrotate_example(self) -> None:
        """
        logrotate with conf/logrotate.gsmail (paths, user and the postrotate
        signal adapted to this test): the old lines in gsmail.log.1, the new
        ones in a new gsmail.log.
        """
        logrotate = require_tool("logrotate", "/usr/sbin/logrotate")
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(os.getgid()).gr_name
        with open(os.path.join(ROOT, "conf", "logrotate.gsmail")) as f:
            example = f.read()
        text = example.replace("/var/log/gsmail/*.log", os.path.join(self.directory, "*.log"))
        text = text.replace("gsmail gsmail", f"{user} {group}")
        text = re.sub(r"systemctl kill .*", f"kill -HUP {self.child.transport.pid}", text)
        self.assertIn(f"su {user} {group}", text)
        self.assertIn(f"create 0640 {user} {group}", text)
        self.assertIn("kill -HUP", text)
        conf = os.path.join(self.directory, "logrotate.conf")
        with open(conf, "w") as f:
            f.write(text)
        os.chmod(conf, 0o644)
        state = os.path.join(self.directory, "logrotate.state")
        result = await deferToThread(
            subprocess.run,
            [logrotate, "--force", "--state", state, conf],
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        await self.logged(r"Log file .*gsmail\.log reopened")
        self.assertIn("gsmail ready", self.read(self.log + ".1"))
        self.assertNotIn("gsmail ready", self.read(self.log))
        self.assertEqual(os.stat(self.log).st_mode & 0o777, 0o640)


class WorkerReloadTests(TestCase):
    """With C{inbound_workers}, the worker processes serve the new certificate too."""

    timeout = 120

    async def test_worker_gets_new_certificate(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert_a = new_certificate(directory, "a")
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        config = make_config(
            directory,
            inbound_workers=1,
            lmtp_endpoint="",
            tls_certificate=os.path.join(directory, "tls", "cert.pem"),
            tls_key=os.path.join(directory, "tls", "key.pem"),
        )
        service = start_service(self, config)
        ready = service.workers.when_ready()
        ready.addTimeout(30, reactor)
        await ready
        port = port_of(service, "smtp")
        self.assertEqual(await deferToThread(peer_certificate, port), cert_a)
        cert_b = new_certificate(directory, "b")
        self.assertTrue(await service.reload())

        def worker_reloaded() -> Any:
            return any("Inbound worker 1 reloaded" in formatEvent(e) for e in events)

        for _ in range(POLLS):
            if worker_reloaded():
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(worker_reloaded(), [formatEvent(e) for e in events])
        self.assertEqual(await deferToThread(peer_certificate, port), cert_b)
