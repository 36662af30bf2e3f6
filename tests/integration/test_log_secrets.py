"""
The token and the passwords never reach the log: real sessions on all three
listeners of a running gsmail (the embedded stand-in, so the token is used
for every lookup and post), AUTH PLAIN and LOGIN on submission with wrong
and right passwords, refused recipients and a message the outbound side
delivers back into a group; then every event the run logged (its text, each
field's value, the traceback of a failure) is searched for them, as is what
the worker processes relayed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from base64 import b64encode
from collections.abc import Callable
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from gsmail.service import GsmailService
from tests.integration.clients import RawClient
from tests.util import TOKEN, bounded, eventually, make_config, port_of, start_service

USER = "groupserver"
PASSWORD = "s3cret-Pa55word-for-submission"
WRONG = "wr0ng-Pa55word-guess"
#: The C{[smtp]} password GroupServer's submission account has, and a
#: relayhost password (never used: no relayhost traffic), both configured.
RELAY_PASSWORD = "relayh0st-Pa55word"


def plain(password: str) -> bytes:
    """The AUTH PLAIN initial response (RFC 4616), base64."""
    return b64encode(f"\0{USER}\0{password}".encode())


def secrets_of() -> list[str]:
    """Every form a secret could be logged in: as given, and as sent (base64)."""
    found = [TOKEN, PASSWORD, WRONG, RELAY_PASSWORD]
    found += [plain(p).decode() for p in (PASSWORD, WRONG)]
    found += [b64encode(p.encode()).decode() for p in (PASSWORD, WRONG)]
    return found


def event_text(event: LogEvent) -> str:
    """An event as text, fields and all: what any observer could write of it."""
    parts = [formatEvent(event)]
    for key, value in event.items():
        if key == "log_failure" and value is not None:
            parts.append(value.getTraceback())
        elif key not in ("log_logger", "log_source", "log_observer"):
            parts.append(f"{key}={value!r}")
    return "\n".join(parts)


MESSAGE = (
    b"From: alice@example.org\r\nTo: example@groups.example.com\r\n"
    b"Message-ID: <secrets-{n}@example.org>\r\nSubject: hi\r\n\r\nbody\r\n.\r\n"
)


class LogSecretsMixin:
    """A running gsmail with all listeners; sessions on each; the log searched."""

    overrides: dict[str, Any] = {}

    def setUp(self) -> None:
        test: TestCase = self  # type: ignore[assignment]
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        directory = os.path.abspath(test.mktemp())
        control = tempfile.mkdtemp(prefix="gsmail-secrets-")
        test.addCleanup(shutil.rmtree, control, True)
        self.config = make_config(
            directory,
            submission_endpoint="tcp:0:interface=127.0.0.1",
            queue_dir=os.path.join(directory, "queue"),
            control_socket=os.path.join(control, "control"),
            smtp_username=USER,
            smtp_password=PASSWORD,
            relayhost_password=RELAY_PASSWORD,
            **self.overrides,
        )

    async def start(self) -> GsmailService:
        service = start_service(self, self.config)  # type: ignore[arg-type]
        if service.workers is not None:
            await bounded(service.workers.when_ready())
        return service

    def sessions(self, service: GsmailService) -> Callable[[], list[str]]:
        smtp, lmtp = port_of(service, "smtp"), port_of(service, "lmtp")
        submission = port_of(service, "submission")

        def run() -> list[str]:
            codes: list[str] = []

            def talk(client: RawClient, line: bytes) -> None:
                client.send(line)
                codes.append(str(client.reply().code))

            for port, hello, n in ((smtp, b"EHLO", 1), (lmtp, b"LHLO", 2)):
                with RawClient(port) as client:
                    client.reply()
                    talk(client, hello + b" client.example.org\r\n")
                    talk(client, b"MAIL FROM:<alice@example.org>\r\n")
                    talk(client, b"RCPT TO:<nosuch%d@groups.example.com>\r\n" % n)
                    talk(client, b"RCPT TO:<someone@elsewhere.example.net>\r\n")
                    talk(client, b"RCPT TO:<example@groups.example.com>\r\n")
                    talk(client, b"DATA\r\n")
                    talk(client, MESSAGE.replace(b"{n}", str(n).encode()))
                    talk(client, b"QUIT\r\n")
            with RawClient(submission) as client:
                client.reply()
                talk(client, b"EHLO groupserver.example.com\r\n")
                talk(client, b"AUTH PLAIN " + plain(WRONG) + b"\r\n")
                talk(client, b"AUTH LOGIN\r\n")
                talk(client, b64encode(USER.encode()) + b"\r\n")
                talk(client, b64encode(WRONG.encode()) + b"\r\n")
                talk(client, b"AUTH LOGIN " + b64encode(USER.encode()) + b"\r\n")
                talk(client, b64encode(PASSWORD.encode()) + b"\r\n")
                talk(client, b"MAIL FROM:<example@groups.example.com>\r\n")
                talk(client, b"RCPT TO:<dev@groups.example.com>\r\n")
                talk(client, b"DATA\r\n")
                talk(client, MESSAGE.replace(b"{n}", b"3"))
                talk(client, b"QUIT\r\n")
            with RawClient(submission) as client:
                client.reply()
                talk(client, b"EHLO groupserver.example.com\r\n")
                talk(client, b"AUTH PLAIN " + plain(PASSWORD) + b"\r\n")
                talk(client, b"QUIT\r\n")
            return codes

        return run

    async def test_no_secret_logged(self) -> None:
        """
        The sessions did what they should (so the log has their lines:
        rejects, AUTH failures, deliveries in and out), and no event's text,
        fields or traceback holds the token or a password, plain or base64.
        """
        service = await self.start()
        codes = await deferToThread(self.sessions(service))
        self.assertEqual(
            codes,
            ["250", "250", "550", "550", "250", "354", "250", "221"] * 2
            + ["250", "535", "334", "334", "535", "334", "235", "250", "250", "354", "250"]
            + ["221", "250", "235", "221"],
        )

        def delivered_out() -> bool:
            return any(
                e.get("gsmail_event") == "delivery" and e.get("listener") == "outbound"
                for e in self.events
            )

        await eventually(delivered_out, "the submitted message delivered into the group")
        await eventually(
            lambda: len([e for e in self.events if e.get("gsmail_event") == "disconnect"]) >= 4,
            "four disconnect lines",
        )
        kinds = {e.get("gsmail_event") for e in self.events}
        self.assertLessEqual(
            {"connect", "client", "queued", "delivery", "reject", "disconnect"}, kinds
        )
        stages = {e["stage"] for e in self.events if e.get("gsmail_event") == "reject"}
        self.assertEqual(stages, {"RCPT", "AUTH"})
        text = "\n".join(map(event_text, self.events))
        for secret in secrets_of():
            self.assertNotIn(secret, text)


class LogSecretsTests(LogSecretsMixin, TestCase):
    """Sessions in the main process."""


class LogSecretsWorkerTests(LogSecretsMixin, TestCase):
    """Inbound sessions in a worker process: what it relays is searched too."""

    overrides = {"inbound_workers": 1}
