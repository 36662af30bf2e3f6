"""
Tests for L{gsmail.outbound.delivery}, the outbound queue manager.

Everything runs in memory and in step: a real L{OutboundQueue} in a
temporary directory (writes inline), a clock for time, and an endpoint
factory whose endpoints connect gsmail's real ESMTP client to small
recording SMTP servers over L{iosim} transports. A test drives the clock
and pumps the bytes (L{FakeNetwork.flush}), then asserts on what a user
sees: the transactions each server received, the queue's states on disk,
the DSNs that went back, and the connections that were open at once.
"""

from __future__ import annotations

import base64
from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import LogEvent, formatEvent

from gsmail import status
from gsmail.addresses import MAX_LOCAL_PART, BounceCheck, parse_mailbox
from gsmail.outbound import backoff
from gsmail.outbound.delivery import CONNECTION_CACHE_TIME, OutboundDelivery
from gsmail.outbound.dsn.parse import DSNRecipient, parse_dsn
from gsmail.outbound.mx import MXHost, NoSuchDomainError
from gsmail.outbound.queue import (
    DELIVERED,
    EXPIRED,
    FAILED,
    PENDING,
    Envelope,
    OutboundQueue,
    read_queue,
)
from gsmail.outbound.relayhost import RelayHost
from gsmail.status import Reply
from gsmail.verp import VerpKeys, VerpPolicy
from tests.fakes import ManualSync
from tests.outbound.fakenet import (
    AUTHOR,
    BODY,
    BODY_WIRE,
    FIRST_DELAY,
    HOSTNAME,
    LIST,
    SITE,
    SMARTHOST,
    T0,
    WARN,
    DeliveryTestCase,
    FakeMTA,
    FakeMX,
    Received,
    fixed_random,
)


class TransactionTests(DeliveryTestCase):
    """
    How queued recipients are grouped into SMTP transactions.
    """

    def test_verp_one_transaction_per_recipient(self) -> None:
        """
        A message queued with XVERP goes out in one transaction per
        recipient, each with its own VERP sender C{group+user=domain@site},
        and the message arrives unchanged.
        """
        self.delivery()
        self.enqueue(LIST, ["alice@example.org", "bob@example.net"], xverp=True)
        self.network.flush()
        self.assertEqual(
            sorted(self.smarthost.transactions()),
            [
                ("dev+alice=example.org@groups.example.com", ["alice@example.org"]),
                ("dev+bob=example.net@groups.example.com", ["bob@example.net"]),
            ],
        )
        self.assertEqual({r.data for r in self.smarthost.received}, {BODY_WIRE})

    def test_signed_verp(self) -> None:
        """
        With VERP keys, a group of this site gets a signed sender per member
        (gsmail.verp), within 64 octets: the full form, or the short one for
        a long address; another site's list gets Postfix's unsigned form.
        """
        verp = VerpPolicy(self.clock, keys=VerpKeys((b"k" * 32,), 0.0))
        self.delivery(local_domains=("groups.example.com",), verp=verp)
        long_member = "a.very.long.first.name.and.last.name@a-long-domain.example.org"
        self.enqueue(LIST, ["alice@example.org", long_member], xverp=True)
        self.enqueue("list@lists.example.net", ["bob@example.net"], xverp=True)
        self.network.flush()
        found = dict((r[0], s) for s, r in self.smarthost.transactions())
        self.assertEqual(found["bob@example.net"], "list+bob=example.net@lists.example.net")
        for member in ("alice@example.org", long_member):
            sender = found[member]
            self.assertLessEqual(len(sender.partition("@")[0]), MAX_LOCAL_PART)
            route = verp.route(parse_mailbox(sender))
            assert route is not None
            if route.member_address is None:
                self.assertEqual(verp.match_member(route, [member]), parse_mailbox(member), sender)
            else:
                self.assertEqual(
                    (route.bounce_check, str(route.member_address)),
                    (BounceCheck.SIGNED, member),
                )

    def test_batches_without_verp(self) -> None:
        """
        Without XVERP the recipients go in batches of C{batch_size}, in
        queued order, all with the message's own sender.
        """
        self.delivery(batch_size=2, max_per_destination=1)
        recipients = [f"m{i}@example.org" for i in range(5)]
        self.enqueue(LIST, recipients)
        self.network.flush()
        self.assertEqual(
            self.smarthost.transactions(),
            [(LIST, recipients[0:2]), (LIST, recipients[2:4]), (LIST, recipients[4:5])],
        )

    def test_mx_grouped_by_domain(self) -> None:
        """
        Without a smarthost, each recipient domain's MX host gets one
        transaction with that domain's recipients only.
        """
        a = self.network.add("192.0.2.10")
        b = self.network.add("192.0.2.20")
        mx = FakeMX(
            {
                "a.example": [MXHost(10, "mx.a.example", ("192.0.2.10",))],
                "b.example": [MXHost(10, "mx.b.example", ("192.0.2.20",))],
            }
        )
        self.delivery(relayhost=None, mx=mx)
        self.enqueue(AUTHOR, ["one@a.example", "two@b.example", "three@a.example"])
        self.network.flush()
        self.assertEqual(a.transactions(), [(AUTHOR, ["one@a.example", "three@a.example"])])
        self.assertEqual(b.transactions(), [(AUTHOR, ["two@b.example"])])
        self.assertEqual(sorted(mx.looked_up), ["a.example", "b.example"])
        self.assertEqual(self.smarthost.received, [])

    def test_mx_port(self) -> None:
        """
        MX hosts are reached on C{mx_port}, the smarthost on its own port.
        """
        self.network.add("192.0.2.10")
        mx = FakeMX({"a.example": [MXHost(10, "mx.a.example", ("192.0.2.10",))]})
        self.delivery(relayhost=None, mx=mx, mx_port=2525)
        self.enqueue(AUTHOR, ["one@a.example"])
        self.network.flush()
        self.assertEqual(self.network.attempts, [("192.0.2.10", 2525)])

    def test_pass_xverp_to_a_smarthost_that_offers_it(self) -> None:
        """
        With C{pass_xverp}, VERP mail goes to a smarthost offering XVERP as
        one batch from the list address with the C{XVERP} parameter: the
        smarthost makes the per-recipient senders.
        """
        self.smarthost.extensions.append("XVERP")
        self.delivery(pass_xverp=True)
        recipients = ["alice@example.org", "bob@example.net", "carol@example.com"]
        self.enqueue(LIST, recipients, xverp=True)
        self.network.flush()
        self.assertEqual(self.smarthost.transactions(), [(LIST, recipients)])
        self.assertIn("XVERP", self.smarthost.received[0].params)

    def test_pass_xverp_to_a_smarthost_without_it(self) -> None:
        """
        With C{pass_xverp} but a smarthost that does not offer XVERP, the
        batch is split into one transaction per recipient with its VERP
        sender, over the same connection, and no XVERP parameter is sent.
        """
        self.delivery(pass_xverp=True)
        self.enqueue(LIST, ["alice@example.org", "bob@example.net"], xverp=True)
        self.network.flush()
        self.assertEqual(
            self.smarthost.transactions(),
            [
                ("dev+alice=example.org@groups.example.com", ["alice@example.org"]),
                ("dev+bob=example.net@groups.example.com", ["bob@example.net"]),
            ],
        )
        self.assertEqual(self.network.attempts, [(SMARTHOST.host, 25)])
        self.assertEqual([r.connection for r in self.smarthost.received], [1, 1])
        self.assertEqual([r.params for r in self.smarthost.received], [[], []])


class OutcomeTests(DeliveryTestCase):
    """
    What each reply does to a recipient, the queue and the sender.
    """

    def test_delivered_and_removed(self) -> None:
        """
        When the server accepts every recipient, the message is taken off
        the queue (envelope and data) and nothing is left to do.
        """
        delivery = self.delivery()
        envelope = self.enqueue(AUTHOR, ["bob@example.net", "carol@example.com"])
        self.settle()
        self.assertEqual([r.state for r in envelope.recipients], [DELIVERED, DELIVERED])
        self.assertGone(envelope)
        self.assertEqual(delivery.delivered, 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(+self.network.open, Counter())

    def test_permanent_failure_dsn_to_sender(self) -> None:
        """
        A recipient refused with 5xx fails for good; the others are
        delivered; exactly one DSN goes from the null sender to the
        message's sender, naming the failed recipient and the server's
        status; then the message is off the queue.
        """
        self.smarthost.replies["bad@example.net"] = "550 5.1.1 No such user"
        envelope = self.enqueue(AUTHOR, ["bad@example.net", "good@example.net"])
        self.delivery()
        self.network.flush()
        self.assertEqual([r.state for r in envelope.recipients], [FAILED, DELIVERED])
        self.assertIn("550 5.1.1 No such user", envelope.recipients[0].last_reply)
        [bounce] = self.bounces(self.smarthost)
        self.assertEqual(bounce.recipients, [AUTHOR])
        self.assertEqual(
            parse_dsn(bounce.data), [DSNRecipient("bad@example.net", "failed", "5.1.1")]
        )
        self.assertGone(envelope)
        self.assertEqual(self.queue.envelopes(), [])

    def test_permanent_failure_dsn_to_verp_address(self) -> None:
        """
        With XVERP, the DSN for a failed recipient goes to that recipient's
        own VERP address, which is in the site's domain and so goes to the
        site's inbound side (GroupServer's bounce page), not the smarthost.
        """
        self.smarthost.replies["bad@example.net"] = "550 5.1.1 No such user"
        self.delivery(local_domains=(SITE,), local_delivery=self.deliver_locally)
        envelope = self.enqueue(LIST, ["good@example.org", "bad@example.net"], xverp=True)
        self.network.flush()
        self.assertEqual([r.state for r in envelope.recipients], [DELIVERED, FAILED])
        [(sender, recipient, message)] = self.local
        self.assertEqual((sender, recipient), ("", "dev+bad=example.net@groups.example.com"))
        self.assertEqual(parse_dsn(message), [DSNRecipient("bad@example.net", "failed", "5.1.1")])
        self.assertEqual(self.bounces(self.smarthost), [])
        self.assertGone(envelope)

    def test_data_refused_fails_the_batch(self) -> None:
        """
        A 5xx reply after the final dot fails every recipient of that
        transaction, and the one DSN to the sender names them all.
        """
        self.smarthost.data_reply = "554 5.6.0 Content rejected"
        envelope = self.enqueue(AUTHOR, ["bob@example.net", "carol@example.net"])
        self.delivery()
        self.network.flush()
        self.assertEqual([r.state for r in envelope.recipients], [FAILED, FAILED])
        [bounce] = self.bounces(self.smarthost)
        self.assertEqual(
            parse_dsn(bounce.data),
            [
                DSNRecipient("bob@example.net", "failed", "5.6.0"),
                DSNRecipient("carol@example.net", "failed", "5.6.0"),
            ],
        )
        self.assertGone(envelope)

    def test_no_dsn_for_null_sender(self) -> None:
        """
        A bounce (null sender) that fails for good is dropped: no DSN about
        a DSN, and nothing stays queued.
        """
        self.smarthost.replies["bad@example.net"] = "550 5.1.1 No such user"
        envelope = self.enqueue("", ["bad@example.net"])
        self.delivery()
        self.network.flush()
        self.assertEqual(envelope.recipients[0].state, FAILED)
        self.assertEqual(self.smarthost.received, [])
        self.assertEqual(self.queue.envelopes(), [])

    def test_transient_failure_backs_off(self) -> None:
        """
        A recipient refused with 4xx stays pending, on disk too, with its
        next attempt one backoff delay from now (the injected random source
        sets the jitter); the recipients accepted are not sent again.
        """
        self.smarthost.replies["busy@example.net"] = "451 4.3.0 Try later"
        envelope = self.enqueue(AUTHOR, ["busy@example.net", "good@example.net"])
        self.delivery()
        self.network.flush()
        busy = envelope.recipients[0]
        self.assertEqual(
            self.states(envelope), {"busy@example.net": PENDING, "good@example.net": DELIVERED}
        )
        self.assertEqual(busy.next_attempt, T0 + FIRST_DELAY)
        self.assertEqual(busy.attempts, 1)
        self.assertIn("451 4.3.0 Try later", busy.last_reply)
        self.assertEqual(self.bounces(self.smarthost), [])
        self.settle()
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [T0 + FIRST_DELAY])

    def test_retry_at_the_backoff_time(self) -> None:
        """
        The pending recipient is tried again when its backoff delay is over,
        not before, and once delivered the message leaves the queue.
        """
        self.smarthost.replies["busy@example.net"] = "451 4.3.0 Try later"
        envelope = self.enqueue(AUTHOR, ["busy@example.net", "good@example.net"])
        self.delivery()
        self.network.flush()
        del self.smarthost.replies["busy@example.net"]
        self.clock.advance(FIRST_DELAY - 1)
        self.network.flush()
        self.assertEqual(self.smarthost.transactions(), [(AUTHOR, ["good@example.net"])])
        self.clock.advance(1)
        self.network.flush()
        self.assertEqual(
            self.smarthost.transactions(),
            [(AUTHOR, ["good@example.net"]), (AUTHOR, ["busy@example.net"])],
        )
        self.assertGone(envelope)
        self.settle()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_expires_after_lifetime(self) -> None:
        """
        A recipient still failing transiently when the queue lifetime is
        over expires: it is not tried again, the sender gets a DSN saying
        delivery time expired (C{Action: failed}, so C{5.4.7}, RFC 3464
        §2.3.3), and the message leaves the queue.
        """
        events = self.capture_log()
        self.smarthost.replies["slow@example.net"] = "451 4.3.0 Try later"
        envelope = self.enqueue(AUTHOR, ["slow@example.net"])
        self.delivery(lifetime=1000)
        self.network.flush()
        second = backoff.next_delay(2, random=fixed_random)
        third = backoff.next_delay(3, random=fixed_random)
        for delay in (FIRST_DELAY, second):  # at T0 + 270, T0 + 810: inside the lifetime
            self.clock.advance(delay)
            self.network.flush()
        self.assertEqual(self.states(envelope), {"slow@example.net": PENDING})
        self.clock.advance(third)  # T0 + 1890: past the lifetime
        self.network.flush()
        self.assertEqual(envelope.recipients[0].state, EXPIRED)
        self.assertEqual(envelope.recipients[0].attempts, 3)
        [bounce] = self.bounces(self.smarthost)
        self.assertEqual(bounce.recipients, [AUTHOR])
        self.assertEqual(
            parse_dsn(bounce.data), [DSNRecipient("slow@example.net", "failed", "5.4.7")]
        )
        self.assertIn(b"Delivery time expired", bounce.data)
        # The log: deferred twice, then expired (Postfix's status=expired).
        self.assertEqual(
            [
                (e["status"], e["dsn"])
                for e in events
                if e.get("gsmail_event") == "delivery" and e["queue_id"] == envelope.id
            ],
            [("deferred", "4.3.0")] * 3 + [("expired", "4.4.7")],
        )
        [expired] = [e for e in events if e.get("status") == "expired"]
        self.assertIn("status=expired (451 4.4.7 Delivery time expired", formatEvent(expired))
        self.assertGone(envelope)
        self.settle()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_transient_reply_after_lifetime(self) -> None:
        """
        A 4xx reply that arrives after the lifetime ended expires the
        recipient at once, with the server's reply in the DSN's
        diagnostic, instead of scheduling another attempt.
        """
        self.smarthost.replies["slow@example.net"] = "452 4.2.2 Mailbox full"
        envelope = self.enqueue(AUTHOR, ["slow@example.net"])
        self.delivery(lifetime=100)
        self.clock.advance(0)  # connected; the greeting has not come yet
        self.clock.advance(150)
        self.network.flush()
        self.assertEqual(envelope.recipients[0].state, EXPIRED)
        [bounce] = self.bounces(self.smarthost)
        self.assertEqual(
            parse_dsn(bounce.data), [DSNRecipient("slow@example.net", "failed", "5.4.7")]
        )
        self.assertIn(b"452 4.2.2 Mailbox full", bounce.data)
        self.assertGone(envelope)

    def test_lost_after_the_final_dot(self) -> None:
        """
        A connection lost after the final dot and before the reply leaves
        the recipient pending (the server may or may not have the message;
        keeping it is the only way not to lose it), with a warning that a
        second copy may be delivered.
        """
        events = self.capture_log()
        self.smarthost.lose_after_dot = True
        envelope = self.enqueue(AUTHOR, ["bob@example.net"])
        self.delivery()
        self.network.flush()
        self.assertEqual(self.states(envelope), {"bob@example.net": PENDING})
        self.assertEqual(envelope.recipients[0].next_attempt, T0 + FIRST_DELAY)
        self.assertTrue(
            any("second copy" in e.get("log_format", "") for e in events),
            "no warning about a possible duplicate",
        )

    def test_mx_lookup_permanent_failure(self) -> None:
        """
        A recipient domain that does not exist fails its recipients for good
        (C{5.1.2}) and the sender gets a DSN through the domain's MX.
        """
        self.network.add("192.0.2.10")
        mx = FakeMX(
            {
                "nowhere.example": NoSuchDomainError("nowhere.example"),
                "example.org": [MXHost(10, "mx.example.org", ("192.0.2.10",))],
            }
        )
        self.delivery(relayhost=None, mx=mx)
        envelope = self.enqueue(AUTHOR, ["bob@nowhere.example"])
        self.network.flush()
        self.assertEqual(envelope.recipients[0].state, FAILED)
        [bounce] = self.bounces(self.network.hosts["192.0.2.10"])
        self.assertEqual(bounce.recipients, [AUTHOR])
        self.assertEqual(
            parse_dsn(bounce.data), [DSNRecipient("bob@nowhere.example", "failed", "5.1.2")]
        )
        self.assertGone(envelope)


class ConnectionTests(DeliveryTestCase):
    """
    Connections: how many at once, and which host next when one fails.
    """

    def test_destination_concurrency(self) -> None:
        """
        Ten transactions for one destination with C{max_per_destination=2}
        never have more than two connections open to it at once, and all
        ten are delivered.
        """
        self.delivery(max_per_destination=2)
        recipients = [f"m{i}@example.org" for i in range(10)]
        envelope = self.enqueue(LIST, recipients, xverp=True)
        self.network.flush()
        self.assertEqual(self.network.peak[SMARTHOST.host], 2)
        self.assertEqual(
            sorted(r for _, rs in self.smarthost.transactions() for r in rs), sorted(recipients)
        )
        self.assertEqual(len(self.smarthost.received), 10)
        self.assertGone(envelope)

    def test_total_connections(self) -> None:
        """
        C{max_connections} bounds the connections open at once over all
        destinations.
        """
        domains: dict[str, list[MXHost] | Exception] = {}
        for i in range(3):
            address = f"192.0.2.{10 + i}"
            self.network.add(address)
            domains[f"d{i}.example"] = [MXHost(10, f"mx.d{i}.example", (address,))]
        self.delivery(relayhost=None, mx=FakeMX(domains), max_connections=1)
        self.enqueue(AUTHOR, ["a@d0.example", "b@d1.example", "c@d2.example"])
        self.network.flush()
        self.assertEqual(self.network.peak_total, 1)
        self.assertEqual(sum(len(m.received) for m in self.network.hosts.values()), 3)

    def test_connection_kept_for_more_mail(self) -> None:
        """
        A connection with nothing left to send stays open for
        C{connection_cache_time}: the next message to its destination goes
        out over it (no new connection, greeting or EHLO), as each batch of
        a post submitted in batches does.
        """
        delivery = self.delivery()
        self.enqueue(LIST, ["a@example.org"], xverp=True)
        self.network.flush()
        self.assertEqual(self.network.open[SMARTHOST.host], 1)
        self.clock.advance(CONNECTION_CACHE_TIME - 0.5)
        self.enqueue(LIST, ["b@example.org"], xverp=True)
        delivery.kick()
        self.network.flush()
        self.assertEqual(
            [(r.connection, r.recipients) for r in self.smarthost.received],
            [(1, ["a@example.org"]), (1, ["b@example.org"])],
        )
        self.assertEqual(len(self.network.attempts), 1)

    def test_cached_connection_closed_after_its_time(self) -> None:
        """
        Once C{connection_cache_time} passes with nothing to send, the
        connection says QUIT and closes, and no timer is left; the next
        message opens a new one.
        """
        delivery = self.delivery()
        self.enqueue(AUTHOR, ["a@example.org"])
        self.network.flush()
        self.clock.advance(CONNECTION_CACHE_TIME)
        self.network.flush()
        self.assertEqual(+self.network.open, Counter())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.enqueue(AUTHOR, ["b@example.org"])
        delivery.kick()
        self.network.flush()
        self.assertEqual([r.connection for r in self.smarthost.received], [1, 2])

    def test_no_connection_cache(self) -> None:
        """With C{connection_cache_time=0} a connection says QUIT as soon as it is done."""
        self.delivery(connection_cache_time=0)
        self.enqueue(AUTHOR, ["a@example.org"])
        self.network.flush()
        self.assertEqual(+self.network.open, Counter())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cached_connection_gives_way(self) -> None:
        """
        When every connection slot is taken by connections kept open, mail
        for another destination does not wait for them to time out: one of
        them closes at once and the new destination gets its slot.
        """
        domains: dict[str, list[MXHost] | Exception] = {}
        for i in range(2):
            address = f"192.0.2.{10 + i}"
            self.network.add(address)
            domains[f"d{i}.example"] = [MXHost(10, f"mx.d{i}.example", (address,))]
        delivery = self.delivery(relayhost=None, mx=FakeMX(domains), max_connections=1)
        self.enqueue(AUTHOR, ["a@d0.example"])
        self.network.flush()
        self.assertEqual(self.network.open["192.0.2.10"], 1)
        self.enqueue(AUTHOR, ["b@d1.example"])
        delivery.kick()
        self.network.flush()
        self.assertEqual(
            self.network.hosts["192.0.2.11"].transactions(), [(AUTHOR, ["b@d1.example"])]
        )
        self.assertEqual(self.network.open["192.0.2.10"], 0)
        self.assertEqual(self.network.peak_total, 1)

    def test_when_idle_closes_cached_connections(self) -> None:
        """
        C{when_idle} closes the connections kept open (with QUIT) and fires
        once they are closed.
        """
        delivery = self.delivery()
        self.enqueue(LIST, [f"m{i}@example.org" for i in range(3)], xverp=True)
        self.network.flush()
        self.assertGreater(self.network.open[SMARTHOST.host], 0)
        idle = delivery.when_idle()
        self.assertNoResult(idle)
        self.network.flush()
        self.assertIsNone(self.successResultOf(idle))
        self.assertEqual(+self.network.open, Counter())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_next_host_after_refused_connection(self) -> None:
        """
        When the first MX host refuses the connection, the next one gets the
        message, and the first is marked bad so later lookups put it last.
        """
        backup = self.network.add("192.0.2.20")
        mx = FakeMX(
            {
                "example.net": [
                    MXHost(10, "mx1.example.net", ("192.0.2.10",)),
                    MXHost(20, "mx2.example.net", ("192.0.2.20",)),
                ]
            }
        )
        self.delivery(relayhost=None, mx=mx)
        envelope = self.enqueue(AUTHOR, ["bob@example.net"])
        self.network.flush()
        self.assertEqual(self.network.attempts, [("192.0.2.10", 25), ("192.0.2.20", 25)])
        self.assertEqual(backup.transactions(), [(AUTHOR, ["bob@example.net"])])
        self.assertEqual(mx.marked_bad, ["192.0.2.10"])
        self.assertGone(envelope)

    def test_all_hosts_down(self) -> None:
        """
        When no MX host can be reached, every address is tried once and the
        recipient stays pending (C{4.4.1}) until its backoff delay is over.
        """
        mx = FakeMX(
            {
                "example.net": [
                    MXHost(10, "mx1.example.net", ("192.0.2.10", "2001:db8::10")),
                    MXHost(20, "mx2.example.net", ("192.0.2.20",)),
                ]
            }
        )
        self.delivery(relayhost=None, mx=mx)
        envelope = self.enqueue(AUTHOR, ["bob@example.net"])
        self.network.flush()
        self.assertEqual(
            self.network.attempts,
            [("192.0.2.10", 25), ("2001:db8::10", 25), ("192.0.2.20", 25)],
        )
        self.assertEqual(self.states(envelope), {"bob@example.net": PENDING})
        bob = envelope.recipients[0]
        self.assertIn("4.4.1", bob.last_reply)
        self.assertEqual(bob.next_attempt, T0 + FIRST_DELAY)

    def test_smarthost_down(self) -> None:
        """
        A smarthost that refuses connections leaves the mail pending; when
        it is back, the retry delivers.
        """
        del self.network.hosts[SMARTHOST.host]
        envelope = self.enqueue(AUTHOR, ["bob@example.net"])
        self.delivery()
        self.network.flush()
        self.assertEqual(self.states(envelope), {"bob@example.net": PENDING})
        self.assertEqual(self.smarthost.received, [])
        self.network.add(SMARTHOST.host, self.smarthost)
        self.clock.advance(FIRST_DELAY)
        self.network.flush()
        self.assertEqual(self.smarthost.transactions(), [(AUTHOR, ["bob@example.net"])])
        self.assertGone(envelope)


class LocalDeliveryTests(DeliveryTestCase):
    """
    Recipients in the site's own domains go to its inbound side directly.
    """

    def test_local_domain_recipients(self) -> None:
        """
        Recipients in C{local_domains} are handed to C{local_delivery} with
        the message as queued; the others go to the smarthost.
        """
        self.delivery(local_domains=(SITE,), local_delivery=self.deliver_locally)
        envelope = self.enqueue(AUTHOR, ["dev@groups.example.com", "bob@example.net"])
        self.network.flush()
        self.assertEqual(self.local, [(AUTHOR, "dev@groups.example.com", BODY)])
        self.assertEqual(self.smarthost.transactions(), [(AUTHOR, ["bob@example.net"])])
        self.assertGone(envelope)

    def test_local_domain_case(self) -> None:
        """
        A local domain matches whatever the case of the recipient's domain.
        """
        self.delivery(local_domains=(SITE,), local_delivery=self.deliver_locally)
        self.enqueue(AUTHOR, ["dev@Groups.Example.COM"])
        self.network.flush()
        self.assertEqual([r for _, r, _ in self.local], ["dev@Groups.Example.COM"])
        self.assertEqual(self.network.attempts, [])

    def test_local_verp(self) -> None:
        """
        A VERP message to local recipients is delivered one recipient at a
        time, each with its own VERP sender.
        """
        self.delivery(local_domains=(SITE,), local_delivery=self.deliver_locally)
        self.enqueue(LIST, ["a@groups.example.com", "b@groups.example.com"], xverp=True)
        self.network.flush()
        self.assertEqual(
            [(s, r) for s, r, _ in self.local],
            [
                ("dev+a=groups.example.com@groups.example.com", "a@groups.example.com"),
                ("dev+b=groups.example.com@groups.example.com", "b@groups.example.com"),
            ],
        )

    def test_local_transient(self) -> None:
        """
        A transient reply from the inbound side (GroupServer unreachable)
        keeps the recipient pending for a retry.
        """
        self.local_reply = status.GROUPSERVER_UNREACHABLE
        self.delivery(local_domains=(SITE,), local_delivery=self.deliver_locally)
        envelope = self.enqueue(AUTHOR, ["dev@groups.example.com"])
        self.network.flush()
        self.assertEqual(self.states(envelope), {"dev@groups.example.com": PENDING})
        self.assertEqual(envelope.recipients[0].next_attempt, T0 + FIRST_DELAY)

    def test_local_delivery_error(self) -> None:
        """
        A local delivery that raises is logged and the recipient stays
        pending (C{451 4.3.0}), never lost or bounced.
        """

        def broken(sender: str, recipient: str, path: str) -> Deferred[Reply]:
            raise RuntimeError("inbound side broken")

        self.delivery(local_domains=(SITE,), local_delivery=broken)
        envelope = self.enqueue(AUTHOR, ["dev@groups.example.com"])
        self.network.flush()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.states(envelope), {"dev@groups.example.com": PENDING})
        self.assertIn("451 4.3.0", envelope.recipients[0].last_reply)


class LifecycleTests(DeliveryTestCase):
    """
    Starting, holding, stopping and the timers left behind.
    """

    def test_not_started(self) -> None:
        """
        Nothing is delivered before C{start}, and no timer is set.
        """
        delivery = OutboundDelivery(
            queue=self.queue,
            reactor=self.clock,
            hostname=HOSTNAME,
            relayhost=SMARTHOST,
            endpoint_factory=self.network.endpoint,
        )
        self.enqueue(AUTHOR, ["bob@example.net"])
        delivery.kick()
        self.network.flush()
        self.assertEqual(self.network.attempts, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_hold(self) -> None:
        """
        A held message is not delivered and sets no timer; once released
        and kicked, it is.
        """
        envelope = self.enqueue(AUTHOR, ["bob@example.net"])
        self.successResultOf(self.queue.hold(envelope.id))
        delivery = self.delivery()
        self.network.flush()
        self.assertEqual(self.network.attempts, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.states(envelope), {"bob@example.net": PENDING})
        self.successResultOf(self.queue.release(envelope.id))
        delivery.kick()
        self.network.flush()
        self.assertEqual(self.smarthost.transactions(), [(AUTHOR, ["bob@example.net"])])
        self.assertGone(envelope)

    def test_hold_while_waiting_for_retry(self) -> None:
        """
        Putting a message on hold while it waits for a retry stops the
        retry.
        """
        self.smarthost.replies["bob@example.net"] = "451 4.3.0 Try later"
        envelope = self.enqueue(AUTHOR, ["bob@example.net"])
        self.delivery()
        self.network.flush()
        self.successResultOf(self.queue.hold(envelope.id))
        del self.smarthost.replies["bob@example.net"]
        self.clock.advance(FIRST_DELAY)
        self.network.flush()
        self.assertEqual(self.network.attempts, [(SMARTHOST.host, 25)])
        self.assertEqual(self.states(envelope), {"bob@example.net": PENDING})

    def test_when_idle(self) -> None:
        """
        C{when_idle} fires at once when nothing is running, and otherwise
        when the running transaction is over.
        """
        delivery = self.delivery()
        self.assertIsNone(self.successResultOf(delivery.when_idle()))
        self.enqueue(AUTHOR, ["bob@example.net"])
        delivery.kick()
        self.clock.advance(0)
        idle = delivery.when_idle()
        self.assertNoResult(idle)
        self.network.flush()
        self.assertIsNone(self.successResultOf(idle))
        self.assertEqual(len(self.smarthost.received), 1)

    def test_stop_waits_for_running_transaction(self) -> None:
        """
        C{stop} lets the running transaction finish and fires after it;
        then nothing new is started, however the delivery is kicked, and no
        timer or connection is left.
        """
        delivery = self.delivery()
        self.enqueue(AUTHOR, ["bob@example.net"])
        self.clock.advance(0)
        self.assertEqual(len(self.network.attempts), 1)
        stopped = delivery.stop()
        self.assertNoResult(stopped)
        self.network.flush()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(self.smarthost.transactions(), [(AUTHOR, ["bob@example.net"])])
        self.enqueue(AUTHOR, ["carol@example.net"])
        delivery.kick()
        self.network.flush()
        self.assertEqual(len(self.network.attempts), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(+self.network.open, Counter())

    def test_stop_cancels_retry_timer(self) -> None:
        """
        Stopping while a recipient waits for its retry cancels the timer:
        no timed call is left behind.
        """
        self.smarthost.replies["bob@example.net"] = "451 4.3.0 Try later"
        delivery = self.delivery()
        self.enqueue(AUTHOR, ["bob@example.net"])
        self.network.flush()
        self.assertNotEqual(self.clock.getDelayedCalls(), [])
        stopped = delivery.stop()
        self.network.flush()  # the connection kept open says QUIT
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(+self.network.open, Counter())

    def test_no_busy_loop_during_a_transaction(self) -> None:
        """
        While a transaction waits for a slow server, the scheduler does not
        keep running: no timed call is due (in a real reactor one would be
        a busy loop burning a CPU for as long as the server takes).
        """
        self.delivery()
        self.enqueue(AUTHOR, ["bob@example.net"])
        for _ in range(3):
            self.clock.advance(0)  # connected; the greeting does not come
        self.assertEqual(len(self.network.attempts), 1)
        self.assertEqual(self.clock.due_calls(), [])


class FanOutTests(DeliveryTestCase):
    """
    One message to many members: deliveries logged together, recorded
    before the next message goes out, and scheduling that does not scan the
    queue.
    """

    @staticmethod
    def logged(events: list[LogEvent]) -> list[str]:
        """The delivery lines logged (L{gsmail.maillog.delivery}), in order."""
        return [formatEvent(e) for e in events if e.get("gsmail_event") == "delivery"]

    def test_verp_sender_not_a_mailbox(self) -> None:
        """
        A member whose VERP sender would not be a mailbox (a quoted local
        part) is not sent a broken C{MAIL FROM}: that recipient stays
        pending; the other members are delivered with their VERP senders.
        """
        self.delivery()
        quoted = '"john doe"@example.org'
        envelope = self.enqueue(LIST, ["a@example.org", quoted, "b@example.org"], xverp=True)
        self.network.flush()
        self.assertEqual(
            sorted(self.smarthost.transactions()),
            [
                ("dev+a=example.org@groups.example.com", ["a@example.org"]),
                ("dev+b=example.org@groups.example.com", ["b@example.org"]),
            ],
        )
        self.assertEqual(
            self.states(envelope),
            {"a@example.org": DELIVERED, quoted: PENDING, "b@example.org": DELIVERED},
        )
        self.flushLoggedErrors(ValueError)

    def test_sent_lines(self) -> None:
        """
        Each recipient's outcome is one event, Postfix's smtp(8) line: queue
        id, recipient, relay, delay, delays, dsn, status and the reply.
        """
        events = self.capture_log()
        self.delivery()
        envelope = self.enqueue(LIST, [f"m{i}@example.org" for i in range(3)], xverp=True)
        self.network.flush()
        self.assertEqual(
            sorted(self.logged(events)),
            [
                f"{envelope.id}: to=<m{i}@example.org>, relay={SMARTHOST.host}, delay=0,"
                " delays=0/0, dsn=2.0.0, status=sent (250 2.0.0 Queued)"
                for i in range(3)
            ],
        )
        [first, *_] = [e for e in events if e.get("gsmail_event") == "delivery"]
        self.assertEqual(
            {k: first[k] for k in ("queue_id", "relay", "dsn", "status", "listener", "delay")},
            {
                "queue_id": envelope.id,
                "relay": SMARTHOST.host,
                "dsn": "2.0.0",
                "status": "sent",
                "listener": "outbound",
                "delay": 0.0,
            },
        )
        self.settle()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bounced_line_and_dsn(self) -> None:
        """
        A 5xx is C{status=bounced} with the reply, logged at once; the DSN
        queued for it is a C{dsn} line naming both queue ids.
        """
        events = self.capture_log()
        self.smarthost.replies["gone@example.net"] = "550 5.1.1 No such user"
        self.delivery()
        envelope = self.enqueue(AUTHOR, ["gone@example.net", "bob@example.net"])
        self.network.flush()
        self.assertEqual(
            [
                (e["recipient"], e["state"], e["status"], e["dsn"], e["reply"])
                for e in events
                if e.get("queue_id") == envelope.id and e.get("status") == "bounced"
            ],
            [("gone@example.net", FAILED, "bounced", "5.1.1", "550 5.1.1 No such user")],
        )
        self.assertIn(
            f"{envelope.id}: to=<gone@example.net>, relay={SMARTHOST.host}, delay=0,"
            " delays=0/0, dsn=5.1.1, status=bounced (550 5.1.1 No such user)",
            self.logged(events),
        )
        self.assertIn(
            f"{envelope.id}: to=<bob@example.net>, relay={SMARTHOST.host}, delay=0,"
            " delays=0/0, dsn=2.0.0, status=sent (250 2.0.0 Queued)",
            self.logged(events),
        )
        [report] = [e for e in events if e.get("gsmail_event") == "dsn"]
        self.assertEqual((report["queue_id"], report["status"]), (envelope.id, "failed"))
        self.assertNotEqual(report["dsn_queue_id"], envelope.id)
        self.assertEqual(
            formatEvent(report),
            f"{envelope.id}: sender non-delivery notification: {report['dsn_queue_id']}",
        )

    def test_deferred_line(self) -> None:
        """
        A 4xx is C{status=deferred}; C{delay} counts from the arrival in the
        queue, C{delays} splits it: before this attempt / the attempt.
        """
        events = self.capture_log()
        self.smarthost.replies["later@example.net"] = "451 4.3.0 Try later"
        self.delivery()
        envelope = self.enqueue(AUTHOR, ["later@example.net"])
        self.network.flush()
        self.clock.advance(3600)  # past the first retry
        self.network.flush()
        line = (
            f"{envelope.id}: to=<later@example.net>, relay={SMARTHOST.host}, delay={{}},"
            " delays={}/0, dsn=4.3.0, status=deferred (451 4.3.0 Try later)"
        )
        self.assertEqual(self.logged(events), [line.format(0, 0), line.format(3600, 3600)])
        self.assertEqual(
            [e["status"] for e in events if e.get("gsmail_event") == "delivery"],
            ["deferred", "deferred"],
        )

    def test_next_message_waits_for_the_record(self) -> None:
        """
        A connection does not send the next message's data before the
        outcome of the last one is on disk: a crash loses no recipient and
        re-sends at most one message per connection.
        """
        sync = ManualSync()
        queue = OutboundQueue(self.mktemp(), clock=self.clock, sync=sync)
        queue.load()

        def close() -> None:
            closed = queue.close()
            sync.finish_all()
            self.successResultOf(closed)

        self.addCleanup(close)
        d = queue.enqueue(LIST, ["a@example.org", "b@example.org"], BODY, xverp=True)
        sync.finish()
        envelope = self.successResultOf(d)
        self.delivery(queue=queue, max_per_destination=1)
        self.network.flush()
        self.assertEqual(len(self.smarthost.received), 1)
        self.assertEqual(len(sync.jobs), 1)  # the record of the first recipient
        self.network.flush()
        self.assertEqual(len(self.smarthost.received), 1)
        self.assertEqual(read_queue(queue.directory)[0].recipients[0].state, PENDING)
        sync.finish()
        self.assertEqual(read_queue(queue.directory)[0].recipients[0].state, DELIVERED)
        self.network.flush()
        self.assertEqual(len(self.smarthost.received), 2)
        while sync.jobs:
            sync.finish_all()
            self.network.flush()
        self.assertIsNone(queue.get(envelope.id))
        self.assertEqual(self.network.attempts, [(SMARTHOST.host, 25)])

    def test_no_queue_scan(self) -> None:
        """
        After start, scheduling never lists the queue: each transaction's
        end and each retry look only at their own message (a scan per
        transaction made a fan-out to n members cost O(n^2)).
        """
        listed: list[str] = []
        for name in ("envelopes", "due", "next_wakeup"):
            original = getattr(self.queue, name)

            def spy(*args: Any, _name: str = name, _original: Any = original) -> Any:
                listed.append(_name)
                return _original(*args)

            self.patch(self.queue, name, spy)
        self.smarthost.replies["busy@example.net"] = "451 4.3.0 Try later"
        self.enqueue(AUTHOR, ["busy@example.net"])
        delivery = self.delivery()
        del listed[:]  # start() reads the queue once
        self.enqueue(LIST, [f"m{i}@example.org" for i in range(20)], xverp=True)
        delivery.kick()
        self.network.flush()
        del self.smarthost.replies["busy@example.net"]
        self.clock.advance(FIRST_DELAY)
        self.network.flush()
        self.assertEqual(len(self.smarthost.received), 21)
        self.assertEqual(listed, [])

    def test_retries_at_their_own_times(self) -> None:
        """
        Recipients deferred at different times are each retried at their
        own time, alone.
        """
        delivery = self.delivery()
        for i in range(3):
            self.smarthost.replies[f"busy{i}@example.net"] = "451 4.3.0 Try later"
            self.enqueue(AUTHOR, [f"busy{i}@example.net"])
            delivery.kick()
            self.network.flush()
            self.clock.advance(10)
        self.smarthost.replies.clear()
        self.clock.advance(FIRST_DELAY - 30)
        for i in range(3):
            self.network.flush()
            self.assertEqual(
                [r for _, r in self.smarthost.transactions()],
                [[f"busy{n}@example.net"] for n in range(i + 1)],
            )
            self.clock.advance(10)
        self.assertEqual(self.queue.envelopes(), [])

    def test_trace(self) -> None:
        """
        The SMTP protocol trace (C{C:}/C{S:} debug events) is off unless
        asked for with C{trace=True}.
        """
        events = self.capture_log()
        quiet = self.delivery()
        self.enqueue(AUTHOR, ["bob@example.net"])
        self.network.flush()
        self.assertEqual([e for e in events if e.get("log_format") == "C: {command}"], [])
        self.stop(quiet)
        self.delivery(trace=True)
        self.enqueue(AUTHOR, ["carol@example.net"])
        self.network.flush()
        self.assertIn(
            "C: RCPT TO:<carol@example.net>",
            [formatEvent(e) for e in events if e.get("log_format") == "C: {command}"],
        )


class SmarthostAuthTests(DeliveryTestCase):
    """
    The smarthost's credentials: sent to it, and to no one else.
    """

    def setUp(self) -> None:
        super().setUp()
        self.relay = RelayHost("127.0.0.1", 587, implicit_tls=False, mx_lookup=False)
        self.smarthost = self.network.add("127.0.0.1")
        self.smarthost.extensions.append("AUTH PLAIN LOGIN")

    def test_auth_to_smarthost(self) -> None:
        """
        The smarthost gets AUTH PLAIN with the configured credentials, and
        the password appears in no log event.
        """
        events = self.capture_log()
        self.delivery(relayhost=self.relay, auth=("gsmail", "s3cret-pw"))
        self.enqueue(AUTHOR, ["bob@example.net"])
        self.network.flush()
        token = base64.b64encode(b"\0gsmail\0s3cret-pw").decode()
        self.assertEqual(self.smarthost.auth, [f"AUTH PLAIN {token}"])
        self.assertEqual(self.smarthost.transactions(), [(AUTHOR, ["bob@example.net"])])
        for event in events:
            text = formatEvent(event) + repr(event)
            self.assertNotIn("s3cret-pw", text)
            self.assertNotIn(token, text)

    def test_no_auth_to_mx_hosts(self) -> None:
        """
        Without a smarthost, MX hosts never get the credentials, even when
        they offer AUTH.
        """
        mx = FakeMX({"example.net": [MXHost(10, "localhost", ("127.0.0.1",))]})
        self.delivery(relayhost=None, mx=mx, auth=("gsmail", "s3cret-pw"))
        self.enqueue(AUTHOR, ["bob@example.net"])
        self.network.flush()
        self.assertEqual(self.smarthost.auth, [])
        self.assertEqual(self.smarthost.transactions(), [(AUTHOR, ["bob@example.net"])])

    def test_auth_refused_keeps_mail(self) -> None:
        """
        A smarthost refusing the credentials (C{535}: a configuration
        error, not the message's fault) keeps the mail queued for a retry;
        it is not bounced to its sender (Postfix's
        C{smtp_sasl_auth_soft_bounce}).
        """
        self.smarthost.auth_reply = "535 5.7.8 Authentication credentials invalid"
        self.delivery(relayhost=self.relay, auth=("gsmail", "wrong"))
        envelope = self.enqueue(AUTHOR, ["bob@example.net"])
        self.network.flush()
        self.assertEqual(self.smarthost.received, [])
        self.assertEqual(self.states(envelope), {"bob@example.net": PENDING})
        self.assertEqual(envelope.recipients[0].next_attempt, T0 + FIRST_DELAY)


class ServerMisbehaviourTests(DeliveryTestCase):
    """
    Servers that do not play by the rules must not lose mail.
    """

    def test_success_reply_before_end_of_data(self) -> None:
        """
        A server that says C{250} before the message data is complete has
        not received the whole message: the recipient stays pending (it is
        not marked delivered, which would lose the message).
        """
        self.smarthost.early_reply = "250 2.0.0 Ok"
        body = b"Subject: big\n\n" + (b"y" * 76 + b"\n") * 3000  # several 64 KiB chunks
        envelope = self.successResultOf(self.queue.enqueue(AUTHOR, ["bob@example.net"], body))
        self.delivery()
        self.network.flush()
        self.assertEqual(self.states(envelope), {"bob@example.net": PENDING})
        self.assertEqual(envelope.recipients[0].next_attempt, T0 + FIRST_DELAY)

    def test_5xx_greeting_tries_next_mx(self) -> None:
        """
        An MX host that greets with C{554} is skipped for the next MX host
        (Postfix's C{smtp_skip_5xx_greeting}): one misconfigured host does
        not bounce mail that its backup would take.
        """
        refusing = self.network.add("192.0.2.10")
        refusing.greeting = "554 5.3.2 Not accepting mail"
        backup = self.network.add("192.0.2.20")
        mx = FakeMX(
            {
                "example.net": [
                    MXHost(10, "mx1.example.net", ("192.0.2.10",)),
                    MXHost(20, "mx2.example.net", ("192.0.2.20",)),
                ]
            }
        )
        self.delivery(relayhost=None, mx=mx)
        envelope = self.enqueue(AUTHOR, ["bob@example.net"])
        self.network.flush()
        self.assertEqual(backup.transactions(), [(AUTHOR, ["bob@example.net"])])
        self.assertGone(envelope)


class DSNTests(DeliveryTestCase):
    """
    The notices a submitter asked for with RFC 3461's NOTIFY, their
    ORCPT/ENVID/RET, and passing those on to a next hop that offers DSN.
    """

    def enqueue_dsn(
        self,
        sender: str,
        recipients: list[str],
        dsn: list[tuple[str, str]],
        params: dict[str, str] | None = None,
        *,
        xverp: bool = False,
    ) -> Envelope:
        return self.successResultOf(
            self.queue.enqueue(sender, recipients, BODY, xverp=xverp, params=params, dsn=dsn)
        )

    def test_never(self) -> None:
        """NOTIFY=NEVER: a recipient that fails for good gets no DSN; the message leaves."""
        self.smarthost.replies["bad@example.net"] = "550 5.1.1 No such user"
        envelope = self.enqueue_dsn(AUTHOR, ["bad@example.net"], [("NEVER", "")])
        self.delivery()
        self.settle()
        self.assertEqual(envelope.recipients[0].state, FAILED)
        self.assertEqual(self.bounces(self.smarthost), [])
        self.assertGone(envelope)

    def test_success_only(self) -> None:
        """NOTIFY=SUCCESS without FAILURE: no failure report either."""
        self.smarthost.replies["bad@example.net"] = "550 5.1.1 No such user"
        self.enqueue_dsn(AUTHOR, ["bad@example.net"], [("SUCCESS", "")])
        self.delivery()
        self.settle()
        self.assertEqual(self.bounces(self.smarthost), [])

    def test_failure_report_fields(self) -> None:
        """
        A failure report echoes ENVID (decoded: Original-Envelope-Id) and
        the recipient's ORCPT (Original-Recipient), RFC 3464 §2.2.1, §2.3.1;
        a recipient with NOTIFY=NEVER in the same transaction is left out.
        """
        self.smarthost.data_reply = "554 5.6.0 Content rejected"
        self.enqueue_dsn(
            AUTHOR,
            ["a@example.net", "b@example.net"],
            [("FAILURE", "rfc822;a+old@example.net"), ("NEVER", "")],
            {"ENVID": "QQ+2B314"},
        )
        self.delivery()
        self.settle()
        [bounce] = self.bounces(self.smarthost)
        self.assertEqual(
            parse_dsn(bounce.data),
            [DSNRecipient("a@example.net", "failed", "5.6.0", "a+old@example.net")],
        )
        self.assertIn(b"Original-Envelope-Id: QQ+314\r\n", bounce.data)
        self.assertIn(b"Original-Recipient: rfc822;a+old@example.net\r\n", bounce.data)

    def test_ret_full_and_hdrs(self) -> None:
        """RET=FULL returns the whole message with a failure report, RET=HDRS its headers."""
        self.smarthost.replies["bad@example.net"] = "550 5.1.1 No such user"
        delivery = self.delivery()
        for ret in ("FULL", "HDRS"):
            self.enqueue_dsn(AUTHOR, ["bad@example.net"], [("", "")], {"RET": ret})
            delivery.kick()
            self.settle()
        full, headers = self.bounces(self.smarthost)
        self.assertIn(b"Content-Type: message/rfc822", full.data)
        self.assertIn(b"Hello, group.", full.data)
        self.assertIn(b"Content-Type: text/rfc822-headers", headers.data)
        self.assertNotIn(b"Hello, group.", headers.data)

    def test_success_relayed_to_server_without_dsn(self) -> None:
        """
        NOTIFY=SUCCESS and a next hop that does not offer DSN: gsmail sends
        the report itself, C{Action: relayed} (RFC 3461 §6.2.1), with the
        recipient's ORCPT; no NOTIFY goes to that server.
        """
        envelope = self.enqueue_dsn(
            AUTHOR,
            ["a@example.net", "b@example.net"],
            [("SUCCESS,FAILURE", "rfc822;a@example.net"), ("", "")],
            {"ENVID": "env-1"},
        )
        self.delivery()
        self.settle()
        [post, report] = self.smarthost.received
        self.assertEqual(post.rcpt_params, ["", ""])
        self.assertEqual((report.sender, report.recipients), ("", [AUTHOR]))
        self.assertEqual(
            parse_dsn(report.data),
            [DSNRecipient("a@example.net", "relayed", "2.0.0", "a@example.net")],
        )
        self.assertIn(b"Subject: Successful Mail Delivery Report", report.data)
        self.assertIn(b"Original-Envelope-Id: env-1", report.data)
        self.assertIn(b"Original-Recipient: rfc822;a@example.net", report.data)
        self.assertGone(envelope)

    def test_passed_on_to_server_with_dsn(self) -> None:
        """
        A next hop that offers DSN gets RET and ENVID on MAIL and NOTIFY
        and ORCPT (xtext again) on RCPT, and reports itself: gsmail sends
        no success report (RFC 3461 §4).
        """
        self.smarthost.extensions.append("DSN")
        self.enqueue_dsn(
            AUTHOR,
            ["a@example.net", "b@example.net"],
            [("SUCCESS,FAILURE", "rfc822;a+old@example.net"), ("", "")],
            {"ENVID": "QQ+2B314", "RET": "HDRS"},
        )
        self.delivery()
        self.settle()
        [post] = self.smarthost.received
        self.assertEqual(post.params, ["RET=HDRS", "ENVID=QQ+2B314"])
        self.assertEqual(
            post.rcpt_params, ["NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Bold@example.net", ""]
        )

    def test_failure_at_server_with_dsn_reported(self) -> None:
        """A next hop with DSN that refuses a recipient at RCPT: the report is still gsmail's."""
        self.smarthost.extensions.append("DSN")
        self.smarthost.replies["bad@example.net"] = "550 5.1.1 No such user"
        self.enqueue_dsn(AUTHOR, ["bad@example.net"], [("FAILURE", "")])
        self.delivery()
        self.settle()
        [bounce] = self.bounces(self.smarthost)
        self.assertEqual(
            parse_dsn(bounce.data), [DSNRecipient("bad@example.net", "failed", "5.1.1")]
        )

    def test_success_delivered_locally(self) -> None:
        """Delivered into the site's own groups with NOTIFY=SUCCESS: C{Action: delivered}."""
        self.local_reply = status.POSTED
        self.delivery(local_domains=(SITE,), local_delivery=self.deliver_locally)
        self.enqueue_dsn(AUTHOR, ["dev@groups.example.com"], [("SUCCESS", "")])
        self.settle()
        [report] = self.bounces(self.smarthost)
        self.assertEqual(report.recipients, [AUTHOR])
        self.assertEqual(
            parse_dsn(report.data), [DSNRecipient("dev@groups.example.com", "delivered", "2.0.0")]
        )


class DelayWarningTests(DeliveryTestCase):
    """
    One delay warning (RFC 3464 C{Action: delayed}) per message after
    C{delay_warning_time}, for its recipients still pending, on the injected
    clock.
    """

    def run_until(self, seconds: float, step: float = 300.0) -> None:
        """Let C{seconds} of the clock pass, in steps, delivering as it goes."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.network.flush()

    def warnings(self, mta: FakeMTA) -> list[Received]:
        return [r for r in self.bounces(mta) if b"Action: delayed" in r.data]

    def test_once_after_the_time(self) -> None:
        """
        A recipient still failing transiently at 4 h: its sender gets exactly
        one warning, with the last reply's status and Will-Retry-Until, only
        for the pending recipient; none before 4 h, none again later, and
        none when the recipient is finally delivered.
        """
        self.smarthost.replies["busy@example.net"] = "452 4.2.2 Mailbox full"
        envelope = self.enqueue(AUTHOR, ["busy@example.net", "good@example.net"])
        self.delivery(delay_warning_time=WARN)
        self.network.flush()
        self.run_until(WARN - 1)
        self.assertEqual(self.bounces(self.smarthost), [])
        self.run_until(1)
        [warning] = self.bounces(self.smarthost)
        self.assertEqual((warning.sender, warning.recipients), ("", [AUTHOR]))
        self.assertEqual(
            parse_dsn(warning.data), [DSNRecipient("busy@example.net", "delayed", "4.2.2")]
        )
        self.assertIn(b"Subject: Delayed Mail (still being retried)", warning.data)
        self.assertIn(b"Will-Retry-Until: ", warning.data)
        self.assertIn(b"Content-Type: text/rfc822-headers", warning.data)
        self.assertTrue(envelope.delay_warned)
        self.assertTrue(read_queue(self.queue_dir)[0].delay_warned, "flag not on disk")
        self.run_until(8 * 3600, step=1800)
        self.assertEqual(len(self.bounces(self.smarthost)), 1)
        del self.smarthost.replies["busy@example.net"]
        self.run_until(3600, step=600)
        self.assertGone(envelope)
        self.assertEqual(len(self.bounces(self.smarthost)), 1)

    def test_woken_for_the_warning(self) -> None:
        """
        The warning needs no other event: a recipient whose next retry is
        after the warning time is warned at the warning time itself.
        """
        self.smarthost.replies["busy@example.net"] = "451 4.3.0 Try later"
        self.enqueue(AUTHOR, ["busy@example.net"])
        delivery = self.delivery(delay_warning_time=100)
        self.network.flush()  # first attempt fails; next try at T0 + FIRST_DELAY
        self.assertGreater(FIRST_DELAY, 100)
        self.assertIn(T0 + 100, [c.getTime() for c in self.clock.getDelayedCalls()])
        self.clock.advance(100)
        self.network.flush()
        self.assertEqual(len(self.warnings(self.smarthost)), 1)
        self.assertEqual(delivery.transactions, 2)  # the post, then the warning

    def test_not_again_after_restart(self) -> None:
        """The flag is durable: a restarted queue and delivery do not warn again."""
        self.smarthost.replies["busy@example.net"] = "451 4.3.0 Try later"
        self.enqueue(AUTHOR, ["busy@example.net"])
        delivery = self.delivery(delay_warning_time=WARN)
        self.run_until(WARN)
        self.assertEqual(len(self.warnings(self.smarthost)), 1)
        self.stop(delivery)
        self.successResultOf(self.queue.close())
        self.queue = OutboundQueue(self.queue_dir, clock=self.clock)
        self.queue.load()
        self.addCleanup(self.queue.close)
        self.delivery(delay_warning_time=WARN)
        self.run_until(3600)
        self.assertEqual(len(self.warnings(self.smarthost)), 1)

    def test_not_for_null_sender(self) -> None:
        """A bounce (null sender) that is delayed gets no warning."""
        self.smarthost.replies["busy@example.net"] = "451 4.3.0 Try later"
        self.enqueue("", ["busy@example.net"])
        self.delivery(delay_warning_time=WARN)
        self.run_until(WARN + 600)
        self.assertEqual(self.bounces(self.smarthost), [])

    def test_not_when_notify_excludes_delay(self) -> None:
        """NOTIFY=FAILURE (or NEVER) leaves DELAY out: no warning."""
        self.smarthost.replies["busy@example.net"] = "451 4.3.0 Try later"
        self.successResultOf(
            self.queue.enqueue(
                AUTHOR,
                ["busy@example.net", "busy@example.net"],
                BODY,
                dsn=[("FAILURE", ""), ("NEVER", "")],
            )
        )
        self.delivery(delay_warning_time=WARN)
        self.run_until(WARN + 600)
        self.assertEqual(self.bounces(self.smarthost), [])

    def test_off(self) -> None:
        """C{delay_warning_time = 0}: no warnings at all."""
        self.smarthost.replies["busy@example.net"] = "451 4.3.0 Try later"
        self.enqueue(AUTHOR, ["busy@example.net"])
        self.delivery(delay_warning_time=0)
        self.run_until(WARN + 600)
        self.assertEqual(self.bounces(self.smarthost), [])

    def test_verp_only_when_asked(self) -> None:
        """
        GroupServer's VERP mail without NOTIFY gets no warning (each would
        reach the bounce page as a bounce); a member whose NOTIFY asks for
        DELAY gets one, to that member's own VERP address.
        """
        self.smarthost.replies["a@example.net"] = "451 4.3.0 Try later"
        self.smarthost.replies["b@example.net"] = "451 4.3.0 Try later"
        self.delivery(
            delay_warning_time=WARN, local_domains=(SITE,), local_delivery=self.deliver_locally
        )
        self.successResultOf(
            self.queue.enqueue(
                LIST,
                ["a@example.net", "b@example.net"],
                BODY,
                xverp=True,
                dsn=[("", ""), ("FAILURE,DELAY", "")],
            )
        )
        self.run_until(WARN + 600)
        [(sender, recipient, message)] = self.local
        self.assertEqual((sender, recipient), ("", "dev+b=example.net@groups.example.com"))
        self.assertEqual(parse_dsn(message), [DSNRecipient("b@example.net", "delayed", "4.3.0")])

    def test_not_after_the_lifetime(self) -> None:
        """A queue lifetime shorter than the warning time: the expiry DSN only."""
        self.smarthost.replies["busy@example.net"] = "451 4.3.0 Try later"
        self.enqueue(AUTHOR, ["busy@example.net"])
        self.delivery(delay_warning_time=WARN, lifetime=3600)
        self.run_until(WARN + 600)
        [bounce] = self.bounces(self.smarthost)
        self.assertEqual(parse_dsn(bounce.data)[0].action, "failed")
