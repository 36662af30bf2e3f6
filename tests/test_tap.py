"""
Tests for L{gsmail.tap} and the twistd plugin: C{twistd gsmail --config PATH
--instance NAME}, and what a configuration error looks like to an operator.
"""

from __future__ import annotations

import io
import os
import signal
import sys

from twisted.application.service import Application, IServiceMaker
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import ILogObserver, Logger, eventFromJSON, formatEvent
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gsmail import maillog, tap
from gsmail.reload import log_files
from gsmail.service import GsmailService
from gsmail.status import EX_CONFIG
from gsmail.textlog import TextLogObserver
from tests.util import ROOT, TWISTD


def write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return path


class OptionsTests(SynchronousTestCase):
    """The command line."""

    def test_defaults(self) -> None:
        """--config defaults to /etc/groupserver/gsconfig.ini, --instance to default."""
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["config"], "/etc/groupserver/gsconfig.ini")
        self.assertEqual(options["instance"], "default")

    def test_given(self) -> None:
        """Both options are taken, long and short."""
        options = tap.Options()
        options.parseOptions(["-c", "/x.ini", "--instance", "prod"])
        self.assertEqual((options["config"], options["instance"]), ("/x.ini", "prod"))

    def test_plugin_found(self) -> None:
        """twistd finds the gsmail plugin, pointing at gsmail.tap."""
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("gsmail", makers)
        self.assertEqual(makers["gsmail"].module, "gsmail.tap")  # type: ignore[attr-defined]
        self.assertFalse(os.path.exists(os.path.join(ROOT, "twisted", "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(ROOT, "twisted", "plugins", "__init__.py")))

    def test_make_service(self) -> None:
        """A good configuration gives gsmail's service, with both listeners."""
        directory = self.mktemp()
        os.makedirs(directory)
        path = write(
            os.path.join(directory, "gsconfig.ini"),
            "[webservice-default]\ntoken = t0ken\n[gsmail-default]\nurl = http://gs.example.com\n"
            "smtp_endpoint = tcp:0:interface=127.0.0.1\nlmtp_endpoint = unix:lmtp.sock\n"
            "domains = groups.example.com\nledger_path = ledger/posted.log\n",
        )
        options = tap.Options()
        options.parseOptions(["--config", path])
        service = tap.makeService(options)
        self.assertIsInstance(service, GsmailService)
        assert isinstance(service, GsmailService)
        self.assertEqual(sorted(service.listeners), ["lmtp", "smtp"])
        self.assertEqual(service.client.url, "http://gs.example.com")

    def test_log_json(self) -> None:
        """
        C{log_json = true}: the service gives twistd's application a JSON
        log observer writing to C{--logfile}; each mail log line is one JSON
        line whose fields read back intact (eventFromJSON). Without it,
        gsmail's text observer (L{gsmail.textlog}), writing to the same file.
        """
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        directory = self.mktemp()
        os.makedirs(directory)
        base = (
            "[webservice-default]\ntoken = t0ken\n[gsmail-default]\nurl = http://gs.example.com\n"
            "smtp_endpoint = tcp:0:interface=127.0.0.1\ndomains = groups.example.com\n"
            "ledger_path = ledger/posted.log\n"
        )
        logfile = os.path.join(directory, "gsmail.log")
        for option, expected in (("", False), ("log_json = true\n", True)):
            path = write(os.path.join(directory, "gsconfig.ini"), base + option)
            options = tap.Options()
            options.parseOptions(["--config", path])
            options.parent = {"logfile": logfile, "nodaemon": True}  # type: ignore[attr-defined]
            made = tap.makeService(options)
            application = Application("gsmail")
            made.setServiceParent(application)
            observer = application.getComponent(ILogObserver, None)
            self.assertEqual(isinstance(observer, TextLogObserver), not expected, option)
            if not expected:
                for log_file in log_files([observer]):
                    log_file.close()
        assert observer is not None
        # SIGHUP reopens it as it does twistd's text log (logrotate).
        self.assertEqual([f.path for f in log_files([observer])], [os.path.abspath(logfile)])
        maillog.queued(
            "3F2A9C1E01", "a@example.org", 4213, 1, "smtp", log=Logger(observer=observer)
        )
        with open(logfile) as f:
            lines = f.read().splitlines()
        [line] = lines
        event = eventFromJSON(line)
        self.assertEqual(
            {k: event[k] for k in ("gsmail_event", "queue_id", "sender", "size", "nrcpt")},
            {
                "gsmail_event": "queued",
                "queue_id": "3F2A9C1E01",
                "sender": "a@example.org",
                "size": 4213,
                "nrcpt": 1,
            },
        )
        self.assertEqual(formatEvent(event), "3F2A9C1E01: from=<a@example.org>, size=4213, nrcpt=1")

    def test_syslog_and_logger_keep_twistd_observer(self) -> None:
        """
        C{--syslog} and C{--logger}: no observer from gsmail, text or JSON;
        twistd's syslog observer, or the one named, writes the log.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        base = (
            "[webservice-default]\ntoken = t0ken\n[gsmail-default]\nurl = http://gs.example.com\n"
            "smtp_endpoint = tcp:0:interface=127.0.0.1\ndomains = groups.example.com\n"
            "ledger_path = ledger/posted.log\n"
        )
        for option in ("", "log_json = true\n"):
            path = write(os.path.join(directory, "gsconfig.ini"), base + option)
            for parent in ({"syslog": True}, {"logger": lambda: print}):
                options = tap.Options()
                options.parseOptions(["--config", path])
                options.parent = parent  # type: ignore[attr-defined]
                made = tap.makeService(options)
                application = Application("gsmail")
                made.setServiceParent(application)
                self.assertIsNone(application.getComponent(ILogObserver, None), (option, parent))

    def test_bad_verp_key_file_exits_78(self) -> None:
        """
        A malformed VERP key file is a configuration error (78) that names
        the file and never quotes its contents.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "ledger"))
        with open(os.path.join(directory, "ledger", "verp.key"), "w") as f:
            f.write("not-hex-secret\n")
        path = write(
            os.path.join(directory, "gsconfig.ini"),
            "[webservice-default]\ntoken = t0ken\n[gsmail-default]\nurl = http://gs.example.com\n"
            "smtp_endpoint = tcp:0:interface=127.0.0.1\n"
            "domains = groups.example.com\nledger_path = ledger/posted.log\n",
        )
        options = tap.Options()
        options.parseOptions(["--config", path])
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as caught:
            tap.makeService(options)
        self.assertEqual(caught.exception.code, EX_CONFIG)
        self.assertIn("verp_key_file", stderr.getvalue())
        self.assertIn("verp.key: line 1: not a key in hex", stderr.getvalue())
        self.assertNotIn("secret", stderr.getvalue())

    def test_config_error_exits_78(self) -> None:
        """A bad configuration makes makeService exit with EX_CONFIG (78)."""
        options = tap.Options()
        options.parseOptions(["--config", self.mktemp()])
        with self.assertRaises(SystemExit) as caught:
            tap.makeService(options)
        self.assertEqual(caught.exception.code, EX_CONFIG)


class TwistdTests(TestCase):
    """The real command, as an operator runs it."""

    async def twistd(self, *args: str) -> tuple[bytes, bytes, int]:
        env = dict(os.environ, PYTHONPATH=ROOT)
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-c", TWISTD, "-n", "--pidfile=", "gsmail", *args], env=env, path=ROOT
        )
        return out, err, code

    async def test_bad_option_one_line(self) -> None:
        """
        A bad option stops start-up with exit status 78 and one line naming
        the file, the section and the option; the token is never printed.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = write(
            os.path.join(directory, "gsconfig.ini"),
            "[webservice-default]\ntoken = s3cr3t-t0ken\n[gsmail-default]\nurl = embedded\n"
            "smtp_endpoint = tcp:0\ndomains = groups.example.com\nmax_size = big\n",
        )
        out, err, code = await self.twistd("--config", path)
        self.assertEqual(code, EX_CONFIG)
        lines = err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn(path, lines[0])
        self.assertIn("[gsmail-default] max_size", lines[0])
        self.assertNotIn(b"s3cr3t-t0ken", out + err)

    async def test_missing_file(self) -> None:
        """A missing file is named, with exit status 78."""
        out, err, code = await self.twistd("--config", "/nonexistent/gsconfig.ini")
        self.assertEqual(code, EX_CONFIG)
        self.assertIn(b"/nonexistent/gsconfig.ini", err)

    async def test_missing_instance(self) -> None:
        """An instance that is not in the file is named."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = write(os.path.join(directory, "gsconfig.ini"), "[webservice-default]\ntoken = x\n")
        out, err, code = await self.twistd("--config", path, "--instance", "prod")
        self.assertEqual(code, EX_CONFIG)
        self.assertIn(b"prod", err)
