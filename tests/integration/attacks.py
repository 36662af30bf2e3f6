"""
What the attack tests share: a service started for them with a log
capture (L{AttackTestsMixin}), and the greeting they send.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from gsmail.service import GsmailService
from tests.integration.clients import RawClient, RawReply
from tests.util import make_config, port_of, start_service

HELLO = {"smtp": b"EHLO client.example.org\r\n", "lmtp": b"LHLO client.example.org\r\n"}


class LogCapture:
    """Every log event while a test runs, formatted as the log file shows it."""

    def __init__(self, test: TestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def bad(self) -> list[str]:
        """The events at error level or above, and logged failures."""
        return [
            formatEvent(e)
            for e in self.events
            if e.get("log_failure") is not None or e["log_level"] >= LogLevel.error
        ]

    def text(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)


class AttackTestsMixin:
    """A running gsmail with all three listeners, and a raw client."""

    config_overrides: dict[str, Any] = {}

    def setUp(self) -> None:
        test: TestCase = self  # type: ignore[assignment]
        self.directory = os.path.abspath(test.mktemp())
        self.log = LogCapture(test)
        # A UNIX socket path must be short: not under trial's temp directory.
        control = tempfile.mkdtemp(prefix="gsmail-attacks-")
        test.addCleanup(shutil.rmtree, control, True)
        self.config = make_config(
            self.directory,
            submission_endpoint="tcp:0:interface=127.0.0.1",
            queue_dir=os.path.join(self.directory, "queue"),
            control_socket=os.path.join(control, "control"),
            processorthread=False,  # nothing leaves this machine
            **self.config_overrides,
        )
        self.service: GsmailService = start_service(test, self.config)

    async def talk(
        self, listener: str, data: bytes, count: int, then: Callable[[RawClient], Any] | None = None
    ) -> list[RawReply]:
        """Send C{data} in one write after the greeting; read C{count} replies."""
        port = port_of(self.service, listener)

        def blocking() -> list[RawReply]:
            with RawClient(port) as client:
                client.reply()
                client.send(data)
                replies = client.replies(count)
                if then is not None:
                    then(client)
                return replies

        return await deferToThread(blocking)


def folded_message_id(size: int) -> bytes:
    """A Message-ID field of about C{size} bytes with ESC and BEL, folded in 998-byte lines."""
    pieces = [b"x" * 990] * (size // 990)
    return b"Message-ID: <\x1b[2J\x07" + b"\r\n ".join(pieces) + b"\x00\x7f@example.org>\r\n"
