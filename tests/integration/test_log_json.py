"""
C{log_json = true} under the real C{twistd -n --logfile ... gsmail}: the log
file is JSON lines, one event each, whose mail log fields read back with
L{twisted.logger.eventFromJSON}; SIGHUP reopens it like the text log.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, eventFromJSON, formatEvent
from twisted.trial.unittest import TestCase

from tests.certificates import new_certificate
from tests.integration.clients import rcpt
from tests.reloadconf import write_config
from tests.util import DOMAIN, TOKEN, Child, python_env, run_child, stop, twistd_argv

#: Polls of the log (every 50 ms) before a test gives up.
POLLS = 400


class TwistdJSONLogTests(TestCase):
    """C{twistd gsmail} with C{log_json = true} and a log file."""

    timeout = 120

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.start())

    async def start(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        new_certificate(self.directory, "a")
        config = write_config(self.directory, more="log_json = true\n")
        self.log = os.path.join(self.directory, "gsmail.log")
        argv = twistd_argv(sys.executable, "--logfile", self.log, "gsmail", "--config", config)
        self.child: Child = await run_child(self, argv, env=python_env(), path=self.directory)
        self.addCleanup(self.stop)
        ready = await self.wait_for(lambda e: "listening" in e and "ready" in e["log_format"])
        self.port = int(str(ready["listening"]).split("127.0.0.1:")[1].split(",")[0])

    async def stop(self) -> None:
        self.assertIn(await stop(self.child), (0, -15), self.child.output)
        with open(self.log) as f:
            self.assertNotIn(TOKEN, f.read())

    def events(self, path: str | None = None) -> list[LogEvent]:
        """Every complete line of the log file, read back as an event."""
        try:
            with open(path or self.log) as f:
                text = f.read()
        except FileNotFoundError:
            return []
        return [eventFromJSON(line) for line in text.split("\n")[:-1]]

    async def wait_for(self, predicate: Any, path: str | None = None) -> LogEvent:
        for _ in range(POLLS):
            for event in self.events(path):
                if predicate(event):
                    return event
            if self.child.ended.called:
                break
            await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"not logged in {path or self.log}:\n{self.child.output}")

    async def test_json_lines(self) -> None:
        """
        Each line is one JSON object; a refused RCPT is there with its
        fields and its Postfix-shaped text, as are the connect and
        disconnect lines; after a rename and SIGHUP, the new lines go to a
        new file, still JSON.
        """
        self.assertEqual(await deferToThread(rcpt, self.port, f"nosuch@{DOMAIN}"), "5.1.1")
        reject = await self.wait_for(lambda e: e.get("gsmail_event") == "reject")
        self.assertEqual(
            {k: reject[k] for k in ("stage", "code", "dsn", "recipient", "listener")},
            {
                "stage": "RCPT",
                "code": 550,
                "dsn": "5.1.1",
                "recipient": f"nosuch@{DOMAIN}",
                "listener": "smtp",
            },
        )
        self.assertTrue(
            formatEvent(reject).startswith(
                "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 5.1.1"
            )
        )
        await self.wait_for(lambda e: e.get("gsmail_event") == "disconnect")
        with open(self.log) as f:
            for line in f:
                self.assertIsInstance(json.loads(line), dict)
        os.rename(self.log, self.log + ".1")
        self.child.transport.signalProcess(signal.SIGHUP)
        reopened = await self.wait_for(lambda e: "reopened" in e.get("log_format", ""))
        self.assertIn("gsmail.log", formatEvent(reopened))
