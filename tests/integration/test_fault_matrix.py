"""
The fault matrix: every way GroupServer (or what stands in front of it) was
seen to fail a post, times 20 messages, each sent by a client that behaves
as an MTA does (a 2xx ends it; a 4xx or a dropped connection is retried).
For each fault the test counts what a site cares about: messages lost (never
archived), messages archived twice, and add requests per message, from what
the stand-in (which archives a post id once, as GroupServer does) received.

The promise under test (docs/architecture.md): never lost, never twice in the
archive, whatever the first reply was.

Run with C{GSMAIL_FAULT_MATRIX=1} in the environment to print the table.
"""

from __future__ import annotations

import os
import smtplib
import sys
import time
from collections.abc import Callable

import attrs
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from gsmail.standin.faults import Faults
from tests.integration.clients import EXAMPLE, SENDER, make_message, smtp_client
from tests.util import make_config, port_of, start_service

#: Messages per fault.
MESSAGES = 20
#: GroupServer's response timeout here, in seconds (the "slow" fault waits longer).
RESPONSE_TIMEOUT = 0.4
#: Attempts a message gets before the test gives up on it (an MTA tries for days).
ATTEMPTS = 40
#: Seconds between two attempts of one message.
PAUSE = 0.05


@attrs.frozen
class Fault:
    """One row: a name and how to make the stand-in misbehave for one request."""

    name: str
    arm: Callable[[Faults], None]


def _set(**values: object) -> Callable[[Faults], None]:
    def arm(faults: Faults) -> None:
        for name, value in values.items():
            setattr(faults, name, value)

    return arm


FAULTS = (
    Fault("500 error page", _set(status=500)),
    Fault("502 from a proxy, nothing stored", _set(status=502)),
    Fault("502 from a proxy after the store", _set(status_after_store=502)),
    Fault("503 from a proxy", _set(status=503)),
    Fault("504 from a proxy, nothing stored", _set(status=504)),
    Fault("504 from a proxy after the store", _set(status_after_store=504)),
    Fault("reset before the request is read", _set(drop="before_body")),
    Fault("dropped before the store", _set(drop="before_store")),
    Fault("dropped after the store", _set(drop="after_store")),
    Fault("answer too slow (timeout)", _set(delay=RESPONSE_TIMEOUT * 2.5)),
    Fault("200 login page", _set(instead="login")),
    Fault("200 maintenance page", _set(instead="maintenance")),
)


@attrs.define
class Row:
    fault: str
    first_reply: str = ""
    lost: int = 0
    archived_twice: int = 0
    add_requests: int = 0
    attempts: int = 0

    def line(self) -> str:
        return (
            f"| {self.fault} | {self.first_reply} | {self.lost} | {self.archived_twice} | "
            f"{self.add_requests / MESSAGES:.2f} | {self.attempts / MESSAGES:.2f} |"
        )


def send_as_an_mta(port: int, message: bytes) -> list[str]:
    """
    Send C{message} until it gets a 2xx (blocking); the replies to DATA (or
    the failure), in order.
    """
    replies: list[str] = []
    for _ in range(ATTEMPTS):
        try:
            with smtp_client(port) as client:
                client.ehlo("mta.example.org")
                client.mail(SENDER)
                code, text = client.rcpt(EXAMPLE)
                if code != 250:
                    replies.append(f"RCPT {code}")
                else:
                    code, text = client.data(message)
                    replies.append(f"{code} {text.decode().split(' ', 1)[0]}")
        except smtplib.SMTPResponseException as e:
            code = e.smtp_code
            replies.append(f"{code} {e.smtp_error.decode().split(' ', 1)[0]}")
        except (OSError, smtplib.SMTPException) as e:
            replies.append(type(e).__name__)
            code = 0
        if 200 <= code < 300:
            return replies
        if 500 <= code < 600:
            return replies  # bounced: counted as lost below
        time.sleep(PAUSE)
    return replies


class FaultMatrixTests(TestCase):
    """Each fault × 20 messages: 0 lost, 0 archived twice."""

    timeout = 300

    async def test_matrix(self) -> None:
        """
        Whatever the fault on the add-email page, every message ends up
        archived exactly once, and its sender was never told 5xx.
        """
        config = make_config(self.mktemp(), response_timeout=RESPONSE_TIMEOUT)
        service = start_service(self, config)
        port = port_of(service, "smtp")
        standin = service.standin
        assert standin is not None
        rows = []
        for number, fault in enumerate(FAULTS):
            row = Row(fault.name)
            adds_before = standin.add_requests("example")
            firsts = set()
            for i in range(MESSAGES):
                standin.faults.reset()
                fault.arm(standin.faults)
                standin.faults.pages = frozenset({"add"})
                standin.faults.remaining = 1
                # A post id of its own: subject and body differ.
                message = make_message(
                    f"m{number}-{i}@example.org", subject=f"{fault.name} {i}", body=f"body {i}"
                )
                replies = await deferToThread(send_as_an_mta, port, message)
                firsts.add(replies[0])
                row.attempts += len(replies)
                self.assertTrue(replies[-1].startswith("250"), f"{fault.name} {i}: {replies}")
            await standin.when_idle()
            standin.faults.reset()
            row.first_reply = ", ".join(sorted(firsts))
            row.add_requests = standin.add_requests("example") - adds_before
            archived = [
                sum(
                    1 for post in standin.posts("example") if f"{fault.name} {i}\n".encode() in post
                )
                for i in range(MESSAGES)
            ]
            row.lost = archived.count(0)
            row.archived_twice = sum(1 for n in archived if n > 1)
            rows.append(row)
        if os.environ.get("GSMAIL_FAULT_MATRIX"):
            header = (
                "| fault | first reply | lost | archived twice | adds/message | attempts/message |"
            )
            print(
                "\n" + "\n".join([header, "|---|---|---|---|---|---|"] + [r.line() for r in rows]),
                file=sys.__stdout__,
            )
        self.assertEqual(
            [(r.fault, r.lost, r.archived_twice) for r in rows], [(f.name, 0, 0) for f in FAULTS]
        )
        for row in rows:
            bounced = [r for r in row.first_reply.split(", ") if r.startswith("5")]
            self.assertEqual(bounced, [], row.fault)
