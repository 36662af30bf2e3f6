"""
Reloading (L{gsmail.reload}, L{gsmail.service.GsmailService.reload}): what a
reload changes, what it names as needing a restart, that anything that does
not load leaves everything as it was, the SIGHUP handler, the log file
reopened, and the worker's side of its standard input.
"""

from __future__ import annotations

import os
import shutil
import signal
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher, textFileLogObserver
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gsmail.addresses import Address
from gsmail.config import load_config
from gsmail.inbound.protocol import Session
from gsmail.reload import (
    ReloadError,
    applied,
    leave_rotation_to_logrotate,
    load_contexts,
    log_files,
    needs_restart,
    reopen_log_files,
)
from gsmail.service import GsmailService, makeService
from gsmail.textlog import TextLogObserver
from gsmail.tlsconfig import ServerTLS
from gsmail.workers import WorkerReload, _ParentWatch, write_setup
from tests.certificates import make_certificate, new_certificate, peer_certificate
from tests.reloadconf import write_config
from tests.util import DOMAIN, TOKEN, eventually, make_config, port_of


class RestartOptionTests(SynchronousTestCase):
    """L{needs_restart} and L{applied}: which options a reload takes."""

    def setUp(self) -> None:
        self.running = make_config(self.mktemp(), tls_certificate="a.pem", tls_key="a.key")

    def test_live_options(self) -> None:
        """Domains, the TLS files and the route file need no restart, and are taken."""
        new = attrs.evolve(
            self.running,
            domains=("a.example", "b.example"),
            tls_certificate="b.pem",
            tls_key="b.key",
            routes="routes.ini",
        )
        self.assertEqual(needs_restart(self.running, new), [])
        self.assertEqual(applied(self.running, new), new)

    def test_restart_options(self) -> None:
        """Endpoints, the ledger, the workers: named, and kept as they run."""
        new = attrs.evolve(
            self.running,
            smtp_endpoint="tcp:2525",
            ledger_path="/elsewhere",
            inbound_workers=2,
            domains=("new.example",),
        )
        self.assertEqual(
            needs_restart(self.running, new), ["smtp_endpoint", "inbound_workers", "ledger_path"]
        )
        self.assertEqual(
            applied(self.running, new), attrs.evolve(self.running, domains=("new.example",))
        )

    def test_tls_on_or_off(self) -> None:
        """Removing the certificate (or adding the first one) needs a restart: STARTTLS is offered or not."""
        new = attrs.evolve(self.running, tls_certificate="", tls_key="")
        self.assertEqual(needs_restart(self.running, new), ["tls_certificate"])
        self.assertEqual(applied(self.running, new), self.running)
        self.assertEqual(needs_restart(new, self.running), ["tls_certificate"])

    def test_secret_named_not_shown(self) -> None:
        """A new token is named, its value is not."""
        new = attrs.evolve(self.running, token="another-secret-token")
        self.assertEqual(needs_restart(self.running, new), ["token"])


class ContextTests(SynchronousTestCase):
    """L{load_contexts} and L{ServerTLS.take}."""

    def test_take(self) -> None:
        """New handshakes use the new context; a connection made before keeps its own."""
        directory = self.mktemp()
        cert_a, key_a, _ = make_certificate(os.path.join(directory, "a"))
        cert_b, key_b, _ = make_certificate(os.path.join(directory, "b"))
        in_use = ServerTLS.from_files(cert_a, key_a)
        before = in_use.serverConnectionForTLS(None)
        in_use.take(ServerTLS.from_files(cert_b, key_b))
        after = in_use.serverConnectionForTLS(None)
        self.assertIsNot(before.get_context(), after.get_context())
        self.assertEqual(in_use.files, (cert_b, key_b, ""))
        self.assertIs(after.get_context(), in_use.context)

    def test_mismatched_key(self) -> None:
        """A certificate whose key does not match: one line naming the file and OpenSSL's reason."""
        directory = self.mktemp()
        cert_a, key_a, _ = make_certificate(os.path.join(directory, "a"))
        _, key_b, _ = make_certificate(os.path.join(directory, "b"))
        in_use = ServerTLS.from_files(cert_a, key_a)
        config = make_config(directory, tls_certificate=cert_a, tls_key=key_b)
        with self.assertRaises(ReloadError) as raised:
            load_contexts(config, [in_use], [])
        self.assertIn(f"tls_certificate/tls_key {cert_a}: cannot load", str(raised.exception))
        self.assertIn("mismatch", str(raised.exception))
        self.assertNotIn("\n", str(raised.exception))

    def test_own_files(self) -> None:
        """An ssl: listener's context is read again from its own files, with its profile."""
        directory = self.mktemp()
        cert, key, _ = make_certificate(os.path.join(directory, "a"))
        own = ServerTLS.from_files(cert, key, "compat")
        [(in_use, loaded)] = load_contexts(make_config(directory), [], [own])
        self.assertIs(in_use, own)
        self.assertEqual((loaded.profile, loaded.files), ("compat", (cert, key, "")))


class LogFileTests(SynchronousTestCase):
    """L{log_files}, L{reopen_log_files}: logrotate renames, a reopen starts a new file."""

    def test_reopen_after_rename(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        log_file = LogFile.fromFullPath(os.path.join(directory, "gsmail.log"))
        self.addCleanup(log_file.close)
        observer = textFileLogObserver(log_file)
        self.assertEqual(log_files([object(), observer, observer]), [log_file])
        # gsmail's own text observer (what twistd gsmail runs with) is found too.
        self.assertEqual(log_files([object(), TextLogObserver(log_file)]), [log_file])  # type: ignore[arg-type]
        log_file.write("before\n")
        os.rename(log_file.path, log_file.path + ".1")  # logrotate
        self.assertEqual(reopen_log_files([log_file]), [log_file.path])
        log_file.write("after\n")
        log_file.flush()
        with open(log_file.path) as f:
            self.assertEqual(f.read(), "after\n")
        with open(log_file.path + ".1") as f:
            self.assertEqual(f.read(), "before\n")

    def test_no_file_observer(self) -> None:
        """Standard output (the journal) is no log file: nothing to reopen."""
        with open(os.devnull, "w") as out:
            self.assertEqual(log_files([textFileLogObserver(out)]), [])

    def test_twistd_rotation_off(self) -> None:
        """twistd's own rotation at 1 MB is turned off: logrotate rotates."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        log_file = LogFile.fromFullPath(os.path.join(directory, "gsmail.log"))
        self.addCleanup(log_file.close)
        leave_rotation_to_logrotate([log_file])
        log_file.write("x" * 2_000_000)
        log_file.write("y\n")
        self.assertEqual(os.listdir(directory), ["gsmail.log"])


class ParentWatchTests(SynchronousTestCase):
    """A worker reads the main process's reloads from its standard input."""

    def test_messages_in_parts(self) -> None:
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        got: list[object] = []
        closed: list[bool] = []
        watch = _ParentWatch(read, lambda: closed.append(True), got.append)
        config = make_config(self.mktemp())
        message = write_setup(WorkerReload(config))
        data = message + message
        os.write(write, data[:5])
        self.assertIsNone(watch.doRead())
        os.write(write, data[5 : len(message) + 3])
        self.assertIsNone(watch.doRead())
        self.assertEqual(got, [WorkerReload(config)])
        os.write(write, data[len(message) + 3 :])
        watch.doRead()
        self.assertEqual(got, [WorkerReload(config)] * 2)
        os.close(write)
        self.assertIsNotNone(watch.doRead())  # the end: ConnectionDone


class ServiceReloadTests(TestCase):
    """A running service from a configuration file, reloaded."""

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.cert_a = new_certificate(self.directory, "a")
        self.path = write_config(self.directory)
        self.service = self.start()

    def start(self) -> GsmailService:
        service = makeService(load_config(self.path), reactor)
        service.config_file = True
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def lines(self, text: str) -> list[str]:
        return [line for line in map(formatEvent, self.events) if text in line]

    async def check(self, domain: str) -> int:
        reply, _ = await self.service.core.check_recipient(
            Session(peer="127.0.0.1", protocol_name="ESMTP"), Address("nosuchgroup", domain)
        )
        return reply.code

    async def test_domains_certificate_and_cache(self) -> None:
        """New domains and certificate are used; the group cache is emptied."""
        port = port_of(self.service, "smtp")
        self.assertEqual(await deferToThread(peer_certificate, port), self.cert_a)
        self.assertEqual(await self.check("new.example"), 550)  # not ours: 5.7.1
        await self.check(DOMAIN)
        self.assertTrue(self.service.core.directory._cache)
        cert_b = new_certificate(self.directory, "b")
        write_config(self.directory, domains=f"{DOMAIN} new.example")
        self.assertTrue(await self.service.reload())
        self.assertEqual(self.service.core.domains, (DOMAIN, "new.example"))
        self.assertEqual(self.service.config.domains, (DOMAIN, "new.example"))
        self.assertFalse(self.service.core.directory._cache)
        self.assertEqual(await deferToThread(peer_certificate, port), cert_b)
        [line] = self.lines("reloaded")
        self.assertIn("changed: domains", line)
        self.assertEqual(self.lines("needs a restart"), [])

    async def test_needs_restart(self) -> None:
        """Options that need a restart: one warning naming them; the rest is applied."""
        write_config(
            self.directory,
            domains="new.example",
            more="max_size = 5\ninbound_workers = 1\n",
        )
        self.assertTrue(await self.service.reload())
        [line] = self.lines("needs a restart")
        self.assertTrue(line.endswith("needs a restart: inbound_workers, max_size"), line)
        self.assertEqual(self.service.core.domains, ("new.example",))
        self.assertEqual(self.service.config.inbound_workers, 0)
        self.assertIsNone(self.service.workers)

    async def test_broken_config_keeps_all(self) -> None:
        """A file that no longer parses: one error line; old domains and certificate stay."""
        port = port_of(self.service, "smtp")
        routes = self.service.core.routes
        new_certificate(self.directory, "b")
        write_config(self.directory, domains="new.example", more="max_size = lots\n")
        self.assertFalse(await self.service.reload())
        [line] = self.lines("not reloaded")
        self.assertIn("everything stays as it was", line)
        self.assertIn("max_size", line)
        self.assertNotIn(TOKEN, line)
        self.assertEqual(self.service.core.domains, (DOMAIN,))
        self.assertIs(self.service.core.routes, routes)
        self.assertEqual(await deferToThread(peer_certificate, port), self.cert_a)

    async def test_bad_certificate_keeps_all(self) -> None:
        """A key that does not match the certificate: nothing changes, domains neither."""
        port = port_of(self.service, "smtp")
        make_certificate(os.path.join(self.directory, "c"))
        shutil.copy(
            os.path.join(self.directory, "c", "key.pem"),
            os.path.join(self.directory, "tls", "key.pem"),
        )
        write_config(self.directory, domains="new.example")
        self.assertFalse(await self.service.reload())
        [line] = self.lines("not reloaded")
        self.assertIn("tls_certificate/tls_key", line)
        self.assertEqual(self.service.core.domains, (DOMAIN,))
        self.assertEqual(await deferToThread(peer_certificate, port), self.cert_a)

    async def test_bad_route_file_keeps_all(self) -> None:
        """A route file that cannot be used: the table, domains and certificate stay."""
        routes = os.path.join(self.directory, "routes.ini")
        with open(routes, "w") as f:
            f.write("[a@groups.example.com]\nrejekt = 550 5.7.1 no\n")
        write_config(self.directory, domains="new.example", more=f"routes = {routes}\n")
        self.assertFalse(await self.service.reload())
        [line] = self.lines("not reloaded")
        self.assertIn("routes:", line)
        self.assertEqual(self.service.core.domains, (DOMAIN,))

    async def test_sighup(self) -> None:
        """SIGHUP runs the reload under twistd (config_file)."""
        write_config(self.directory, domains="new.example")
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: self.service.core.domains == ("new.example",), "the reload")


class HandlerTests(TestCase):
    """When an embedded service installs its SIGHUP handler."""

    def setUp(self) -> None:
        self.previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, self.previous)
        self.config = make_config(os.path.abspath(self.mktemp()), lmtp_endpoint="")

    async def test_no_handler_set(self) -> None:
        """No handler before: the service's, then the default again once stopped."""
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        service = makeService(self.config, reactor)
        service.privilegedStartService()
        service.startService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), service._hangup)
        await service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), signal.SIG_DFL)

    async def test_application_handler_kept(self) -> None:
        """An embedding application's handler is left alone: it calls reload() itself."""
        calls: list[int] = []

        def own(signum: int, frame: Any) -> None:
            calls.append(signum)

        signal.signal(signal.SIGHUP, own)
        service = makeService(self.config, reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(signal.getsignal(signal.SIGHUP), own)

    async def test_chained_under_twistd(self) -> None:
        """Under twistd the service's handler is installed and calls the one before it."""
        calls: list[int] = []

        def own(signum: int, frame: Any) -> None:
            calls.append(signum)

        signal.signal(signal.SIGHUP, own)
        service = makeService(self.config, reactor)
        service.config_file = True
        service.reload = lambda config=None: deferLater(reactor, 0, lambda: True)  # type: ignore[method-assign]
        service.privilegedStartService()
        service.startService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), service._hangup)
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: calls, "the previous handler")
        self.assertEqual(calls, [signal.SIGHUP])
        await service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), own)
