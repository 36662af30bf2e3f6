# -*- test-case-name: tests.integration.test_outbound_tls -*-
"""
TLS towards a smarthost, end to end: gsmail's service relays submitted mail
to C{relayhost = [127.0.0.1]:PORT}, a receiving server (gsmail's inbound
protocol with a recording core) whose certificate a test CA signed. The
certificate is verified against C{tls_ca} and the name C{tls_name}; a wrong
name, or C{smtp_tls_security_level = encrypt} against a server without
STARTTLS, keeps the message queued (transient), never sends it in clear and
never bounces it. GroupServer's C{no_tls}/C{force_tls} (C{[smtp-NAME]})
shape the submission listener only and leave delivery TLS alone.
"""

from __future__ import annotations

import os
import smtplib
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from gsmail.outbound.queue import PENDING
from gsmail.service import GsmailService
from tests.certificates import make_certificate, make_pki
from tests.integration.mx import (
    SENDER,
    CountingFactory,
    ScriptedCore,
    attempted,
    gone,
    message,
    queued,
    receiver,
    stop_receivers,
    submit,
)
from tests.util import eventually, make_config, start_service

#: The name in the smarthost's certificate.
NAME = "smtp.relay.test"


class SmarthostTLSTests(TestCase):
    """STARTTLS to a smarthost: verified with a private CA, or the message waits."""

    def listen(self, *, tls: bool) -> tuple[ScriptedCore, CountingFactory, int]:
        """A smarthost on 127.0.0.1, with STARTTLS (the test CA's certificate) or without."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        core = ScriptedCore()
        factory = receiver(core, directory, tls=make_pki(NAME).server_options() if tls else None)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(stop_receivers, [port], [factory])
        return core, factory, port.getHost().port

    def start(self, relay_port: int, **overrides: Any) -> tuple[GsmailService, int]:
        """gsmail relaying to the smarthost, trusting the test CA."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ca = os.path.join(directory, "ca.pem")
        with open(ca, "wb") as f:
            f.write(make_pki(NAME).ca_pem)
        config = make_config(
            directory,
            smtp_endpoint="",
            lmtp_endpoint="",
            submission_endpoint="tcp:0:interface=127.0.0.1",
            queue_dir=os.path.join(directory, "queue"),
            relayhost=f"[127.0.0.1]:{relay_port}",
            tls_ca=ca,
            # Never asked (the relay host is an address); given so that the
            # system resolver's re-read timer is not left behind (see
            # test_outbound_mx.ServiceLifecycleTests).
            dns_servers=("127.0.0.1:9",),
            **overrides,
        )
        service = start_service(self, config)
        return service, int(service.port("submission").getHost().port)

    async def stays_queued(self, service: GsmailService, port: int, enhanced: str) -> None:
        """Submit one message; it must stay queued after one attempt with C{enhanced}."""
        qid = await deferToThread(submit, port, SENDER, ["member@far.test"], message("wait"))
        await eventually(attempted(service, qid), "the first attempt")
        envelope = queued(service, qid)
        assert envelope is not None
        [r] = envelope.recipients
        self.assertEqual((r.state, r.attempts), (PENDING, 1))
        self.assertIn(f" {enhanced} ", r.last_reply)
        assert service.queue is not None
        self.assertEqual(len(service.queue.envelopes()), 1, "no DSN is queued")

    async def test_verified_tls(self) -> None:
        """
        With C{tls_ca} and C{tls_name} matching the smarthost's certificate,
        the message is relayed over TLS and leaves the queue.
        """
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        core, _, relay_port = self.listen(tls=True)
        service, port = self.start(relay_port, tls_name=NAME)
        qid = await deferToThread(submit, port, SENDER, ["member@far.test"], message("tls"))
        await eventually(gone(service, qid), "the relay to take the message")
        [got] = core.received
        self.assertEqual((got.sender, got.recipients), (SENDER, ["member@far.test"]))
        self.assertTrue(got.tls)
        # The log: Postfix's "TLS connection established to" line, then the delivery.
        [tls] = [
            e for e in events if e.get("gsmail_event") == "tls" and e["listener"] == "outbound"
        ]
        self.assertEqual(
            (tls["listener"], tls["relay"]), ("outbound", f"127.0.0.1[127.0.0.1]:{relay_port}")
        )
        self.assertRegex(tls["protocol"], r"^TLSv1\.[23]$")
        self.assertTrue(
            formatEvent(tls).startswith(
                f"TLS connection established to 127.0.0.1[127.0.0.1]:{relay_port}: TLSv1."
            ),
            formatEvent(tls),
        )
        [sent] = [e for e in events if e.get("gsmail_event") == "delivery"]
        self.assertEqual((sent["queue_id"], sent["status"]), (qid, "sent"))

    async def test_wrong_name_stays_queued(self) -> None:
        """
        A certificate that does not match C{tls_name} ends the session before
        any mail is sent: the message stays queued with 4.7.5 (transient).
        """
        core, factory, relay_port = self.listen(tls=True)
        service, port = self.start(relay_port, tls_name="other.relay.test")
        await self.stays_queued(service, port, "4.7.5")
        self.assertEqual(factory.offered, 1)
        self.assertEqual((core.received, core.rcpt_calls), ([], 0))

    async def test_encrypt_without_starttls_stays_queued(self) -> None:
        """
        With C{smtp_tls_security_level = encrypt}, a smarthost that does not
        offer STARTTLS gets nothing: the message stays queued with 4.7.4.
        """
        core, factory, relay_port = self.listen(tls=False)
        service, port = self.start(relay_port, tls_name=NAME, smtp_tls_security_level="encrypt")
        await self.stays_queued(service, port, "4.7.4")
        self.assertEqual(factory.offered, 1)
        self.assertEqual((core.received, core.rcpt_calls), ([], 0))

    async def test_no_tls_leaves_delivery_tls_on(self) -> None:
        """
        GroupServer's C{no_tls} (its own connection never uses STARTTLS) does
        not switch gsmail's delivery TLS off: the smarthost still gets the
        message over verified TLS.
        """
        core, _, relay_port = self.listen(tls=True)
        service, port = self.start(relay_port, tls_name=NAME, no_tls=True)
        qid = await deferToThread(submit, port, SENDER, ["member@far.test"], message("no_tls"))
        await eventually(gone(service, qid), "the relay to take the message")
        [got] = core.received
        self.assertTrue(got.tls)

    async def test_force_tls_does_not_force_delivery_tls(self) -> None:
        """
        GroupServer's C{force_tls} makes the submission listener require
        STARTTLS (530 5.7.0 before it), but does not force gsmail's delivery:
        a smarthost without STARTTLS gets the message (level C{may}).
        """
        core, _, relay_port = self.listen(tls=False)
        cert, key, _ = make_certificate(os.path.abspath(self.mktemp()))
        service, port = self.start(relay_port, force_tls=True, tls_certificate=cert, tls_key=key)

        def send() -> tuple[int, str]:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                s.ehlo("gs.example.com")
                refused = s.mail(SENDER)
                s.starttls()  # as zope.sendmail: no certificate check
                s.ehlo("gs.example.com")
                s.sendmail(SENDER, ["member@far.test"], message("force_tls"))
                return refused[0], refused[1].decode()

        code, text = await deferToThread(send)
        self.assertEqual((code, text), (530, "5.7.0 Must issue a STARTTLS command first"))
        await eventually(lambda: bool(core.received), "the relay to take the message")
        [got] = core.received
        self.assertFalse(got.tls)
