# -*- test-case-name: tests.integration.test_outbound_mx -*-
"""
Delivery by MX, end to end: gsmail's service takes a message on its
submission listener and delivers it through a C{twisted.names} zone served
on 127.0.0.1 to receiving servers bound on other loopback addresses
(127.0.0.2 and up), all on one port, as MX hosts on port 25 would be.

The receiving servers are gsmail's own inbound protocol with scripted
delivery cores (L{ScriptedCore}): one accepts, one greets with C{421}, one
refuses C{MAIL} with C{451}, one refuses every recipient with C{550 5.1.1},
one offers STARTTLS, one is slow to answer the final dot; one address has
its port bound but nothing listening (connection refused).

Senders: a failed recipient's DSN has to arrive somewhere visible. Mail from
a group with XVERP (what GroupServer sends) gets its DSN at the member's VERP
address, which is this site's own domain: gsmail delivers it into its inbound
core and the stand-in records a bounce for (member, group). Mail from a
foreign sender (C{owner@s.test}) gets its DSN by MX like any mail, at the
accepting server, where the test reads it with L{parse_dsn}. Both paths are
covered.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from gsmail.outbound.dsn.parse import parse_dsn
from gsmail.outbound.queue import DELIVERED, FAILED, PENDING
from gsmail.service import GsmailService, makeService
from tests.integration.mx import (
    DOWN,
    GOOD,
    GREET_421,
    GROUP,
    MAIL_451,
    REJECT_550,
    SENDER,
    SLOW,
    SLOW_REPLY,
    STARTTLS,
    attempted,
    capture_log,
    envelopes,
    gone,
    message,
    queued,
    start_gsmail,
    start_network,
    submit,
)
from tests.util import eventually, make_config


class MXDeliveryTests(TestCase):
    """Delivery by MX through a DNS zone on 127.0.0.1 to receivers on 127.0.0.2-8."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.directory = os.path.abspath(self.mktemp())
        self.network = await start_network(self, self.directory)
        self.events = capture_log(self)

    def start(self, **overrides: Any) -> tuple[GsmailService, int]:
        service = start_gsmail(self, self.directory, self.network, **overrides)
        return service, int(service.port("submission").getHost().port)

    def failover_log(self) -> list[tuple[str, str]]:
        """The (host, address) pairs gsmail logged as failed, in order."""
        return [
            (e["host"], e["address"])
            for e in self.events
            if e.get("log_format", "").startswith("Could not deliver via")
        ]

    def assert_no_dsn(self, service: GsmailService) -> None:
        """Nothing but the original is queued, no bounce recorded, nothing received."""
        self.assertEqual([e.sender for e in envelopes(service)], [SENDER])
        self.assertEqual(service.standin.bounces(), [])
        self.assertEqual(self.network.cores[GOOD].received, [])

    async def test_failover_in_preference_order(self) -> None:
        """
        A domain whose best MX host is down and whose second greets with 421
        gets its mail through the third: the hosts are tried in preference
        order, each failure is logged, and the message leaves the queue.
        """
        service, port = self.start()
        qid = await deferToThread(submit, port, SENDER, ["member@a.test"], message("failover"))
        await eventually(gone(service, qid), "delivery via mx3.a.test")
        [got] = self.network.cores[GOOD].received
        self.assertEqual((got.sender, got.recipients), (SENDER, ["member@a.test"]))
        self.assertIn(b"Subject: failover\n", got.data)
        self.assertEqual(self.failover_log(), [("mx1.a.test", DOWN), ("mx2.a.test", GREET_421)])
        self.assertEqual(self.network.factories[GREET_421].offered, 1)
        self.assertEqual(self.network.cores[GREET_421].received, [])

    async def test_transient_only_stays_queued(self) -> None:
        """
        A domain whose only MX host answers 451 to MAIL keeps the message
        queued: pending after one attempt, retried after the first backoff
        (300 s +/- 20 %), with the server's reply kept and no DSN.
        """
        service, port = self.start()
        qid = await deferToThread(submit, port, SENDER, ["member@b.test"], message("later"))
        await eventually(attempted(service, qid), "the first attempt")
        now = reactor.seconds()
        envelope = queued(service, qid)
        assert envelope is not None
        [r] = envelope.recipients
        self.assertEqual((r.state, r.attempts), (PENDING, 1))
        self.assertTrue(r.last_reply.startswith("451 4.3.2"), r.last_reply)
        self.assertTrue(now + 240 - 5 <= r.next_attempt <= now + 360, r.next_attempt - now)
        self.assertEqual(self.network.factories[MAIL_451].offered, 1)
        self.assert_no_dsn(service)

    async def test_451_to_mail_fails_over(self) -> None:
        """
        When the best MX host answers 451 to MAIL, the message goes to the
        next MX host in the same delivery, as Postfix does (a soft error that
        is not the recipient's: another server may take it now).
        """
        service, port = self.start()
        qid = await deferToThread(submit, port, SENDER, ["member@d.test"], message("backup"))
        await eventually(
            lambda: bool(self.network.cores[GOOD].received) or attempted(service, qid)(),
            "delivery via mx2.d.test, or the attempt to end",
        )
        self.assertEqual(
            [t.recipients for t in self.network.cores[GOOD].received],
            [["member@d.test"]],
            "not delivered via the backup MX host after 451 to MAIL",
        )
        await eventually(gone(service, qid), "the message to leave the queue")

    async def test_550_bounces_to_the_verp_address(self) -> None:
        """
        A recipient refused with 550 5.1.1 fails for good after one attempt,
        and its DSN, sent to the member's VERP address at this site, is
        recorded by GroupServer's bounce page as a bounce of that member from
        the group; nothing is left queued.
        """
        service, port = self.start()
        qid = await deferToThread(
            submit, port, GROUP, ["member@c.test"], message("bounce"), xverp=True
        )
        await eventually(lambda: bool(service.standin.bounces()), "the bounce to be recorded")
        self.assertEqual(service.standin.bounces(), [("member@c.test", GROUP)])
        await eventually(lambda: not envelopes(service), "the queue to empty")
        self.assertEqual(self.network.cores[REJECT_550].rcpt_calls, 1)
        self.assertEqual(self.network.cores[REJECT_550].received, [])
        outcomes = [
            (e["recipient"], e["state"], e["reply"][:9])
            for e in self.events
            if e.get("queue_id") == qid and "state" in e
        ]
        self.assertEqual(outcomes, [("member@c.test", FAILED, "550 5.1.1")])

    async def dsn_for(self, recipient: str) -> list[Any]:
        """Submit from the foreign sender to C{recipient}; return the DSN it gets."""
        service, port = self.start()
        qid = await deferToThread(submit, port, SENDER, [recipient], message("no such"))
        good = self.network.cores[GOOD]
        await eventually(lambda: bool(good.received), "the DSN at the sender's MX host")
        [dsn] = good.received
        self.assertEqual((dsn.sender, dsn.recipients), ("", [SENDER]))
        await eventually(lambda: not envelopes(service), "the queue to empty")
        self.assertTrue(gone(service, qid)())
        return parse_dsn(dsn.data)

    async def test_null_mx(self) -> None:
        """
        Mail to a domain with a null MX (RFC 7505) fails at once with 5.1.10,
        and the sender gets a DSN saying so.
        """
        [report] = await self.dsn_for("member@nullmx.test")
        self.assertEqual(
            (report.recipient, report.action, report.status),
            ("member@nullmx.test", "failed", "5.1.10"),
        )

    async def test_nxdomain(self) -> None:
        """
        Mail to a domain that does not exist fails at once with 5.1.2, and the
        sender gets a DSN saying so.
        """
        [report] = await self.dsn_for("member@nx.test")
        self.assertEqual(
            (report.recipient, report.action, report.status),
            ("member@nx.test", "failed", "5.1.2"),
        )

    async def test_encrypt_without_starttls_stays_queued(self) -> None:
        """
        With C{mx_tls = encrypt}, a host that does not offer STARTTLS gets
        nothing: the message stays queued (4.7.4, transient), no DSN.
        """
        service, port = self.start(mx_tls="encrypt")
        qid = await deferToThread(submit, port, SENDER, ["member@plain.test"], message("tls"))
        await eventually(attempted(service, qid), "the first attempt")
        envelope = queued(service, qid)
        assert envelope is not None
        [r] = envelope.recipients
        self.assertEqual((r.state, r.attempts), (PENDING, 1))
        self.assertIn(" 4.7.4 ", r.last_reply)
        self.assertEqual(self.network.factories[GOOD].offered, 1)
        self.assert_no_dsn(service)

    async def test_may_uses_starttls(self) -> None:
        """
        With the default C{mx_tls = may}, a host that offers STARTTLS gets the
        message over TLS (its certificate is not checked: RFC 7435).
        """
        service, port = self.start()
        qid = await deferToThread(submit, port, SENDER, ["member@tls.test"], message("may"))
        await eventually(gone(service, qid), "delivery via mx.tls.test")
        [got] = self.network.cores[STARTTLS].received
        self.assertEqual(got.recipients, ["member@tls.test"])
        self.assertTrue(got.tls)
        envelope_states = [
            e["state"] for e in self.events if e.get("queue_id") == qid and "state" in e
        ]
        self.assertEqual(envelope_states, [DELIVERED])

    async def test_idle_while_a_server_is_slow(self) -> None:
        """
        While a slow server takes its time to answer the final dot, gsmail
        waits without using the CPU (it does not spin on the recipient in
        flight), then records the delivery.
        """
        service, port = self.start()
        qid = await deferToThread(submit, port, SENDER, ["member@slow.test"], message("slow"))
        slow = self.network.cores[SLOW]
        await eventually(lambda: bool(slow.received), "the final dot at the slow host")
        cpu, wall = time.process_time(), reactor.seconds()
        await deferLater(reactor, SLOW_REPLY / 2)
        cpu, wall = time.process_time() - cpu, reactor.seconds() - wall
        self.assertLess(cpu, wall / 4, f"{cpu:.2f} s of CPU in {wall:.2f} s of waiting")
        await eventually(gone(service, qid), "the delivery to be recorded")


class ServiceLifecycleTests(TestCase):
    """Starting and stopping gsmail with outbound delivery on."""

    async def test_system_resolver_leaves_no_timer(self) -> None:
        """
        gsmail using the system's DNS servers (no C{dns_servers}) leaves no
        timer behind once stopped, so an application that embeds it can stop
        its reactor cleanly.
        """
        directory = os.path.abspath(self.mktemp())
        before = set(reactor.getDelayedCalls())
        service = makeService(
            make_config(
                directory,
                smtp_endpoint="",
                lmtp_endpoint="",
                submission_endpoint="tcp:0:interface=127.0.0.1",
                queue_dir=os.path.join(directory, "queue"),
                relayhost="[127.0.0.1]:9",
            ),
            reactor,
        )
        service.privilegedStartService()
        service.startService()
        await service.stopService()
        left = [
            c
            for c in reactor.getDelayedCalls()
            if c not in before
            and c.active()
            and not getattr(getattr(c, "func", None), "__module__", "").startswith("twisted.trial")
        ]
        described = [repr(c) for c in left]
        for call in left:
            call.cancel()  # so that the failure is this assertion, not a dirty reactor
        self.assertEqual(described, [])
