"""
Tests for L{gsmail.outbound.api}: gs.email's send_email, asynchronous.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gsmail.outbound.api import Mailer
from gsmail.outbound.queue import OutboundQueue


class FakeDelivery:
    def __init__(self) -> None:
        self.kicks = 0

    def kick(self) -> None:
        self.kicks += 1


class SendEmailTests(SynchronousTestCase):
    """send_email queues durably and reports per recipient."""

    def setUp(self) -> None:
        self.queue = OutboundQueue(self.mktemp(), clock=Clock())
        self.queue.load()
        self.addCleanup(self.queue.close)
        self.delivery = FakeDelivery()
        self.mailer = Mailer(self.queue, self.delivery)

    def test_queued(self) -> None:
        """Every good recipient is queued with the XVERP flag, and delivery is woken."""
        result = self.successResultOf(
            self.mailer.send_email(
                "dev@groups.example.com",
                ["a@example.org", "b@example.org"],
                b"Subject: hi\n\nbody\n",
                xverp=True,
            )
        )
        self.assertEqual(result, {"a@example.org": True, "b@example.org": True})
        [envelope] = self.queue.envelopes()
        self.assertTrue(envelope.xverp)
        self.assertEqual(
            [r.address for r in envelope.recipients], ["a@example.org", "b@example.org"]
        )
        with open(self.queue.data_path(envelope.id), "rb") as f:
            self.assertEqual(f.read(), b"Subject: hi\n\nbody\n")
        self.assertEqual(self.delivery.kicks, 1)

    def test_bad_address_not_queued(self) -> None:
        """An address that does not parse is reported False and not queued."""
        result = self.successResultOf(
            self.mailer.send_email(
                "dev@groups.example.com", ["a@example.org", "not an address"], b"x\n"
            )
        )
        self.assertEqual(result, {"a@example.org": True, "not an address": False})
        [envelope] = self.queue.envelopes()
        self.assertEqual([r.address for r in envelope.recipients], ["a@example.org"])

    def test_nothing_to_queue(self) -> None:
        """No good recipient: nothing queued, delivery not woken."""
        result = self.successResultOf(
            self.mailer.send_email("dev@groups.example.com", ["bad"], b"x\n")
        )
        self.assertEqual(result, {"bad": False})
        self.assertEqual(self.queue.envelopes(), [])
        self.assertEqual(self.delivery.kicks, 0)

    def test_one_address_as_a_string(self) -> None:
        """
        One recipient given as a string, as gs.email's send_email allows, is
        one address: queued as it is, not as one recipient per character.
        """
        result = self.successResultOf(
            self.mailer.send_email("dev@groups.example.com", "alice@example.org", b"x\n")
        )
        self.assertEqual(result, {"alice@example.org": True})
        [envelope] = self.queue.envelopes()
        self.assertEqual([r.address for r in envelope.recipients], ["alice@example.org"])
        self.assertEqual(self.delivery.kicks, 1)

    def test_bad_address_as_a_string(self) -> None:
        """A single string that is not an address is reported False, nothing queued."""
        result = self.successResultOf(
            self.mailer.send_email("dev@groups.example.com", "not an address", b"x\n")
        )
        self.assertEqual(result, {"not an address": False})
        self.assertEqual(self.queue.envelopes(), [])

    def test_any_iterable(self) -> None:
        """A tuple or a generator of addresses works as a list does; repeats go once."""
        result = self.successResultOf(
            self.mailer.send_email(
                "dev@groups.example.com",
                (a for a in ("a@example.org", "b@example.org", "a@example.org")),
                b"x\n",
            )
        )
        self.assertEqual(result, {"a@example.org": True, "b@example.org": True})
        [envelope] = self.queue.envelopes()
        self.assertEqual(
            [r.address for r in envelope.recipients], ["a@example.org", "b@example.org"]
        )
