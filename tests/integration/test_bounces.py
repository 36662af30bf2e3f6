"""
Forged bounces, over real sockets on 127.0.0.1: what a stranger (and a real
MTA) sends to gsmail's bounce addresses, and what GroupServer's bounce page
(the stand-in) records.

  - a forged tag, a tag made for another member, plain mail, an
    out-of-office reply and a delay notice are accepted (250) and not
    recorded; a real failure report to a signed address is recorded once;
  - unsigned XVERP addresses (Postfix's, gsmail's before signing) are
    recorded within C{verp_unsigned_until} and dropped after it;
  - end to end: gsmail delivers a post (to smtp-sink), the remote side
    bounces it to the signed VERP sender it received, and the bounce is
    recorded once for that member.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from gsmail import status
from gsmail.addresses import Address, parse_mailbox
from gsmail.service import GsmailService
from tests.bounce_samples import dsn, out_of_office, plain_mail, qmail_bounce
from tests.integration.clients import codes, send_once, smtplib_codes
from tests.integration.mailer import (
    SmtpSink,
    describe_queue,
    group_message,
    gs_email_send,
    queue_empty,
    submission_port,
)
from tests.util import DOMAIN, eventually, make_config, port_of, require_tool, start_service

GROUP = f"dev@{DOMAIN}"
ALICE = "alice@example.org"
KEY_HEX = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"


def crlf(message: bytes) -> bytes:
    return message.replace(b"\n", b"\r\n")


def start(test: TestCase, **overrides: Any) -> GsmailService:
    """
    gsmail with its ESMTP listener, the embedded stand-in (groups C{dev}
    and C{example}) and the outbound side (so it signs its VERP senders),
    with a key file written before the start.
    """
    directory = os.path.abspath(test.mktemp())
    os.makedirs(os.path.join(directory, "ledger"))
    key_file = os.path.join(directory, "ledger", "verp.key")
    with open(key_file, "w") as f:
        f.write(KEY_HEX + "\n")
    os.chmod(key_file, 0o600)
    settings: dict[str, Any] = {
        "submission_endpoint": "tcp:0:interface=127.0.0.1",
        "queue_dir": os.path.join(directory, "queue"),
        "relayhost": "[127.0.0.1]:9",  # unused unless a test submits
    }
    settings.update(overrides)
    return start_service(test, make_config(directory, **settings))


def signed(service: GsmailService, member: str, group: str = GROUP) -> str:
    """The signed VERP address gsmail makes today for C{group}'s mail to C{member}."""
    return str(service.inbound.verp.sender(parse_mailbox(group), parse_mailbox(member)))


def forge(address: str) -> str:
    """C{address} with the last character of its tag changed."""
    local, _, domain = address.rpartition("@")
    last = "b" if local[-1] == "a" else "a"
    return f"{local[:-1]}{last}@{domain}"


class ForgedBounceTests(TestCase):
    """What a stranger sends to bounce addresses is accepted and not recorded."""

    timeout = 60

    def setUp(self) -> None:
        self.service = start(self)
        self.port = port_of(self.service, "smtp")

    async def bounce(self, recipient: str, message: bytes) -> tuple[Any, Any]:
        """Send C{message} from C{<>} to C{recipient}; the RCPT and DATA answers."""
        answers = await deferToThread(send_once, self.port, [recipient], crlf(message), sender="")
        assert answers.data is not None, answers
        [rcpt] = answers.rcpts
        return smtplib_codes(rcpt), answers.data

    async def test_forged_tag(self) -> None:
        """
        A report of a real failure sent to an address whose tag gsmail did
        not make: RCPT is answered as for a good address (no oracle), DATA
        with C{250 2.0.0 Not recorded}; nothing is recorded.
        """
        address = forge(signed(self.service, ALICE))
        rcpt, data = await self.bounce(address, dsn(ALICE, to=address))
        self.assertEqual(rcpt, codes(status.BOUNCE_ADDRESS_OK))
        self.assertEqual(smtplib_codes(data), codes(status.BOUNCE_NOT_OURS))
        self.assertIn(b"Not recorded: not a current bounce address", data[1])
        self.assertEqual(self.service.standin.bounces(), [])

    async def test_tag_of_another_member(self) -> None:
        """A good tag moved onto another member's address (a replay) is not recorded."""
        tag = signed(self.service, ALICE).partition("@")[0].rpartition("=")[2]
        address = f"dev+bob=example.org={tag}@{DOMAIN}"
        _, data = await self.bounce(address, dsn("bob@example.org", to=address))
        self.assertEqual(smtplib_codes(data), codes(status.BOUNCE_NOT_OURS))
        self.assertEqual(self.service.standin.bounces(), [])

    async def test_delay_notice(self) -> None:
        """A delay notice (Action: delayed) to a valid address: 250, not recorded."""
        address = signed(self.service, ALICE)
        _, data = await self.bounce(
            address, dsn(ALICE, action="delayed", status="4.4.1", to=address)
        )
        self.assertEqual(smtplib_codes(data), codes(status.BOUNCE_NOT_FAILURE))
        self.assertEqual(self.service.standin.bounces(), [])

    async def test_failure_recorded_once(self) -> None:
        """
        A real failure report to a valid address is recorded (250 2.1.5),
        once: the same report again is answered as a duplicate.
        """
        address = signed(self.service, ALICE)
        _, data = await self.bounce(address, dsn(ALICE, to=address))
        self.assertEqual(smtplib_codes(data), codes(status.BOUNCE_RECORDED))
        _, again = await self.bounce(address, dsn(ALICE, to=address))
        self.assertEqual(smtplib_codes(again), codes(status.ALREADY_DELIVERED))
        self.assertEqual(self.service.standin.bounces(), [(ALICE, GROUP)])

    async def test_lowercased_by_the_remote_mta(self) -> None:
        """A bounce to the signed address lowercased by the remote MTA is recorded."""
        address = signed(self.service, "Alice.Smith@example.org").lower()
        _, data = await self.bounce(address, qmail_bounce("alice.smith@example.org", to=address))
        self.assertEqual(smtplib_codes(data), codes(status.BOUNCE_RECORDED))
        self.assertEqual(self.service.standin.bounces(), [("alice.smith@example.org", GROUP)])

    async def test_out_of_office(self) -> None:
        """An out-of-office reply to a valid address: 250, not recorded."""
        address = signed(self.service, ALICE)
        _, data = await self.bounce(address, out_of_office(to=address))
        self.assertEqual(smtplib_codes(data), codes(status.BOUNCE_NOT_FAILURE))
        self.assertEqual(self.service.standin.bounces(), [])

    async def test_plain_mail(self) -> None:
        """Plain mail saying "550 user unknown" to a valid address: 250, not recorded."""
        address = signed(self.service, ALICE)
        _, data = await self.bounce(address, plain_mail(to=address))
        self.assertEqual(smtplib_codes(data), codes(status.BOUNCE_NOT_FAILURE))
        self.assertEqual(self.service.standin.bounces(), [])

    async def test_short_form(self) -> None:
        """
        A member whose full VERP address would pass 64 octets gets the short
        form; a failure report naming the member is recorded for the member.
        """
        member = "a.very.long.first.name.and.last.name@a-long-domain.example.org"
        address = signed(self.service, member)
        self.assertNotIn("=", address)
        _, data = await self.bounce(address, dsn(member, to=address))
        self.assertEqual(smtplib_codes(data), codes(status.BOUNCE_RECORDED))
        self.assertEqual(self.service.standin.bounces(), [(member, GROUP)])

    async def test_unsigned_after_the_window(self) -> None:
        """
        gsmail signs its VERP senders, its key file is new, and the window
        for unsigned addresses is over (C{never}): an unsigned address's
        failure report is not recorded.
        """
        service = start(self, verp_unsigned_until="never")
        address = f"dev+alice=example.org@{DOMAIN}"
        answers = await deferToThread(
            send_once, port_of(service, "smtp"), [address], crlf(dsn(ALICE)), sender=""
        )
        assert answers.data is not None
        self.assertEqual(smtplib_codes(answers.data), codes(status.BOUNCE_NOT_OURS))
        self.assertEqual(service.standin.bounces(), [])

    async def test_swaks_forged_bounce(self) -> None:
        """
        swaks, as a forger would use it (C{--from '<>'}, a made-up tag, its
        default body): exit 0, the 250 2.0.0 answer shown, nothing recorded.
        """
        swaks = require_tool("swaks")
        address = f"dev+alice=example.org=aaaaaaaaaaa@{DOMAIN}"
        out, err, code = await getProcessOutputAndValue(
            swaks,
            [
                "--server",
                f"127.0.0.1:{self.port}",
                "--timeout",
                "10",
                "--helo",
                "forger.example.net",
                "--from",
                "<>",
                "--to",
                address,
                "--header",
                "Subject: Undelivered Mail Returned to Sender",
            ],
            env=dict(os.environ),
        )
        output = (out + err).decode(errors="replace")
        self.assertEqual(code, 0, output)
        self.assertIn("250 2.0.0 Not recorded", output)
        self.assertEqual(self.service.standin.bounces(), [])


class UnsignedWindowTests(TestCase):
    """Unsigned XVERP addresses within the transition window."""

    timeout = 60

    async def test_unsigned_within_the_window(self) -> None:
        """
        Within the window (a fresh key file, C{auto}), an unsigned address
        with a real failure report is recorded; without one (an auto-reply)
        it is not; for a group that does not exist it is not.
        """
        service = start(self)
        port = port_of(service, "smtp")
        address = f"dev+alice=example.org@{DOMAIN}"
        answers = await deferToThread(send_once, port, [address], crlf(dsn(ALICE)), sender="")
        assert answers.data is not None
        self.assertEqual(smtplib_codes(answers.data), codes(status.BOUNCE_RECORDED))
        answers = await deferToThread(
            send_once, port, [f"dev+bob=example.org@{DOMAIN}"], crlf(out_of_office()), sender=""
        )
        assert answers.data is not None
        self.assertEqual(smtplib_codes(answers.data), codes(status.BOUNCE_NOT_FAILURE))
        answers = await deferToThread(
            send_once,
            port,
            [f"nosuch+carol=example.org@{DOMAIN}"],
            crlf(dsn("carol@example.org")),
            sender="",
        )
        assert answers.data is not None
        self.assertEqual(smtplib_codes(answers.data), codes(status.BOUNCE_NOT_OURS))
        self.assertEqual(service.standin.bounces(), [(ALICE, GROUP)])


class EndToEndTests(TestCase):
    """gsmail delivers a post; the remote side bounces it to the signed VERP sender."""

    timeout = 120

    async def test_remote_bounce_recorded_once(self) -> None:
        """
        A post to two members goes out (to smtp-sink) with a signed VERP
        sender each, within 64 octets; the remote MTA's DSN for one member,
        sent to the sender it got, is recorded once for that member; a
        second copy is not recorded again, and the other member's address
        with a forged tag records nothing.
        """
        sink = SmtpSink(self)
        await sink.start()
        service = start(self, relayhost=f"[127.0.0.1]:{sink.port}")
        members = [ALICE, "a.very.long.first.name.and.last.name@a-long-domain.example.org"]
        [submission] = await deferToThread(
            gs_email_send, submission_port(service), GROUP, members, group_message("Bounced")
        )
        self.assertEqual(submission.refused, {})
        await eventually(
            lambda: queue_empty(service) and len(sink.transactions()) == 2,
            lambda: f"{describe_queue(service)}; {sink.describe()}",
        )
        senders = {t.recipients[0]: t.sender for t in sink.transactions()}
        for sender in senders.values():
            self.assertLessEqual(len(sender.partition("@")[0]), 64)
            self.assertNotEqual(Address(*sender.rsplit("@", 1)), parse_mailbox(GROUP))
        port = port_of(service, "smtp")
        for _ in range(2):
            for member in members:
                report = crlf(dsn(member, to=senders[member]))
                answers = await deferToThread(send_once, port, [senders[member]], report, sender="")
                assert answers.data is not None
                self.assertIn(
                    smtplib_codes(answers.data),
                    [codes(status.BOUNCE_RECORDED), codes(status.ALREADY_DELIVERED)],
                )
        forged = forge(senders[ALICE])
        answers = await deferToThread(
            send_once, port, [forged], crlf(dsn(ALICE, status="5.2.2", to=forged)), sender=""
        )
        assert answers.data is not None
        self.assertEqual(smtplib_codes(answers.data), codes(status.BOUNCE_NOT_OURS))
        self.assertEqual(sorted(service.standin.bounces()), sorted((m, GROUP) for m in members))
