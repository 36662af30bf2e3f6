# -*- test-case-name: tests.outbound.test_signing_queue -*-
"""
DKIM signing in the outbound queue (L{gsmail.outbound.queue},
L{gsmail.outbound.delivery}): a message is signed once, when it is queued,
and every copy that leaves (one per VERP recipient, before or after a
restart) carries that one valid signature; a key that cannot be used keeps
the message queued, unsent, with one clear log line, until it can.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.logger import LogLevel, formatEvent

from gsmail.outbound import backoff
from gsmail.outbound.delivery import SIGN_RETRY
from gsmail.outbound.queue import FileOps, OutboundQueue, read_queue
from gsmail.signing import DKIMSigner, KeyRing, KeySpec
from tests.outbound.fakenet import LIST, SITE, DeliveryTestCase
from tests.signing import DNSStub, key_file, verify_all

#: A group post as GroupServer submits it.
POST = (
    b"From: Dev <dev@groups.example.com>\n"
    b"To: dev@groups.example.com\n"
    b"Subject: Hello\n"
    b"Message-ID: <1@groups.example.com>\n"
    b"List-Id: <dev.groups.example.com>\n"
    b"\n"
    b"Hello, group.\n"
)
MEMBERS = ["alice@example.org", "bob@example.net", "carol@example.com"]


class SigningQueueTestCase(DeliveryTestCase):
    """A queue that signs with an RSA key of the site, published in a DNS stub."""

    def setUp(self) -> None:
        super().setUp()
        self.keys_dir = self.mktemp()
        self.spec = KeySpec(SITE, "gs1", key_file(self.keys_dir, "site.key"))
        self.dns = DNSStub()
        self.dns.publish(self.spec)
        with open(self.spec.path, "rb") as f:
            self.good_key = f.read()
        self.signer = DKIMSigner(KeyRing([self.spec]))
        self.signed_dir = self.mktemp()
        self.queue = self.open_queue()

    def open_queue(self, file_ops: FileOps | None = None, *, signing: bool = True) -> OutboundQueue:
        queue = OutboundQueue(
            self.signed_dir,
            clock=self.clock,
            signer=self.signer.queue_signer if signing else None,
            file_ops=file_ops,
        )
        queue.load()
        self.addCleanup(queue.close)
        return queue

    def queue_post(self, **kwargs: Any) -> Any:
        return self.successResultOf(
            self.queue.enqueue(LIST, MEMBERS, POST, xverp=True, sign=True, **kwargs)
        )

    def break_key(self) -> None:
        with open(self.spec.path, "wb") as f:
            f.write(b"-----BEGIN RSA PRIVATE KEY-----\nbroken\n-----END RSA PRIVATE KEY-----\n")

    def repair_key(self) -> None:
        with open(self.spec.path, "wb") as f:
            f.write(self.good_key)

    def stored(self, queue_id: str) -> bytes:
        with open(self.queue.data_path(queue_id), "rb") as f:
            return f.read()


class SignedWhenQueuedTests(SigningQueueTestCase):
    """The signature is made once and stored with the message."""

    def test_stored_signed(self) -> None:
        """The queued file is the signed message; the envelope's size is its size."""
        envelope = self.queue_post()
        data = self.stored(envelope.id)
        self.assertTrue(data.startswith(b"DKIM-Signature: "))
        self.assertTrue(data.endswith(POST))
        self.assertEqual(envelope.size, len(data))
        self.assertFalse(envelope.sign_pending)
        self.assertEqual(verify_all(data, self.dns), [("rsa-sha256", True)])

    def test_not_signed_unless_asked(self) -> None:
        """Mail queued without sign (a stranger's, forwarded to postmaster) is stored as given."""
        envelope = self.successResultOf(self.queue.enqueue(LIST, ["pm@example.net"], POST))
        self.assertEqual(self.stored(envelope.id), POST)

    def test_every_verp_copy_verifies(self) -> None:
        """
        Each member's copy, sent with its own VERP sender, carries the same
        signature, and it verifies: the VERP sender is envelope-only.
        """
        self.queue_post()
        self.delivery()
        self.settle()
        received = self.smarthost.received
        self.assertEqual(sorted(r.recipients[0] for r in received), sorted(MEMBERS))
        self.assertEqual(len({r.sender for r in received}), len(MEMBERS))
        self.assertEqual(len({r.data for r in received}), 1)
        for r in received:
            self.assertEqual(verify_all(r.data, self.dns), [("rsa-sha256", True)])

    def test_restart_mid_queue(self) -> None:
        """
        After a restart with some members still pending, their copies carry
        the signature made before it (the queue is reloaded from disk), and
        it still verifies.
        """
        self.smarthost.replies["bob@example.net"] = "451 4.3.0 Try later"
        envelope = self.queue_post()
        before = self.stored(envelope.id)
        delivery = self.delivery()
        self.settle()
        self.stop(delivery)
        self.successResultOf(self.queue.close())
        # A new process: the queue is read from the disk again.
        self.queue = self.open_queue()
        self.assertEqual(self.stored(envelope.id), before)
        del self.smarthost.replies["bob@example.net"]
        self.clock.advance(backoff.next_delay(1, random=lambda: 0.25) + 1)
        self.delivery()
        self.settle()
        copies = [r for r in self.smarthost.received if r.recipients == ["bob@example.net"]]
        self.assertEqual(len(copies), 1)
        self.assertEqual(verify_all(copies[0].data, self.dns), [("rsa-sha256", True)])
        self.assertEqual(copies[0].data, self.smarthost.received[0].data)


class UnusableKeyTests(SigningQueueTestCase):
    """A key that cannot be used: the message waits, unsent, and nothing is lost."""

    def test_queued_but_not_sent(self) -> None:
        """
        With a corrupted key the submission still succeeds (the message is
        durable), nothing goes out unsigned, and the log says why in one line.
        """
        events = self.capture_log()
        self.break_key()
        envelope = self.queue_post()
        self.assertTrue(envelope.sign_pending)
        self.assertEqual(self.stored(envelope.id), POST)
        self.assertTrue([e for e in read_queue(self.signed_dir) if e.sign_pending])
        self.delivery()
        self.settle()
        for _ in range(5):
            self.clock.advance(SIGN_RETRY)
            self.settle()
        self.assertEqual(self.smarthost.received, [])
        errors = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.error]
        self.assertEqual(len(errors), 1, errors)  # one line, not one per try
        self.assertIn("DKIM signing fails: the DKIM key " + self.spec.path, errors[0])
        self.assertIn("messages waiting unsent: 1", errors[0])
        [warning] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn(f"Queued {envelope.id} unsigned", warning)
        self.assertIn("not sent until it can be DKIM-signed", warning)
        self.assertIn("4.7.0", self.queue.envelopes()[0].recipients[0].last_reply)

    def test_sent_signed_once_repaired(self) -> None:
        """Once the key is repaired the message is signed, queued anew, and each copy verifies."""
        self.break_key()
        old = self.queue_post()
        self.delivery()
        self.settle()
        self.repair_key()
        self.clock.advance(SIGN_RETRY)
        self.settle()
        self.assertIsNone(self.queue.get(old.id))
        self.assertFalse(os.path.exists(os.path.join(self.signed_dir, "data", old.id)))
        self.assertEqual(sorted(r.recipients[0] for r in self.smarthost.received), sorted(MEMBERS))
        for r in self.smarthost.received:
            self.assertEqual(verify_all(r.data, self.dns), [("rsa-sha256", True)])
        self.assertEqual(self.queue.envelopes(), [])

    def test_restart_while_waiting(self) -> None:
        """A message waiting for its key is still waiting after a restart, then signed."""
        self.break_key()
        old = self.queue_post()
        self.successResultOf(self.queue.close())
        self.queue = self.open_queue()
        [reloaded] = self.queue.envelopes()
        self.assertEqual((reloaded.id, reloaded.sign_pending), (old.id, True))
        self.repair_key()
        self.delivery()
        self.settle()
        self.assertEqual(len(self.smarthost.received), len(MEMBERS))
        for r in self.smarthost.received:
            self.assertEqual(verify_all(r.data, self.dns), [("rsa-sha256", True)])

    def test_crash_after_signed_copy(self) -> None:
        """
        A crash after the signed copy is durable but before the unsigned
        one is removed: the next load keeps the signed copy only, so it is
        sent once.
        """
        self.break_key()
        old = self.queue_post()
        self.successResultOf(self.queue.close())

        class CrashAtRemoval(FileOps):
            def unlink(self, path: str) -> None:
                if path.endswith(old.id + ".json"):
                    raise OSError(5, "simulated crash")
                super().unlink(path)

        self.queue = self.open_queue(CrashAtRemoval())
        self.repair_key()
        new = self.successResultOf(self.queue.resign(self.queue.envelopes()[0]))
        self.flushLoggedErrors(OSError)
        self.assertEqual(new.replaces, old.id)
        on_disk = sorted(e.id for e in read_queue(self.signed_dir))
        self.assertEqual(on_disk, sorted([old.id, new.id]))
        self.successResultOf(self.queue.close())
        self.queue = self.open_queue()
        self.assertEqual([e.id for e in self.queue.envelopes()], [new.id])
        self.assertFalse(os.path.exists(os.path.join(self.signed_dir, "data", old.id)))
        self.delivery()
        self.settle()
        self.assertEqual(len(self.smarthost.received), len(MEMBERS))

    def test_expires_like_any_waiting_mail(self) -> None:
        """
        A message whose key stays broken past the queue lifetime expires,
        never sent: each member's VERP address gets a DSN giving the reason,
        signed by the site too (From MAILER-DAEMON at gsmail's host name
        under the site's domain), so sent once the key is repaired.
        """
        self.break_key()
        old = self.queue_post()
        self.delivery(lifetime=3 * SIGN_RETRY)
        self.settle()
        for _ in range(4):
            self.clock.advance(SIGN_RETRY)
            self.settle()
        self.assertEqual(self.smarthost.received, [])
        self.assertIsNone(self.queue.get(old.id))
        dsns = self.queue.envelopes()
        self.assertEqual([(e.sender, e.sign_pending) for e in dsns], [("", True)] * len(MEMBERS))
        self.repair_key()
        self.clock.advance(SIGN_RETRY)
        self.settle()
        received = self.smarthost.received
        for r in received:
            self.assertEqual(verify_all(r.data, self.dns), [("rsa-sha256", True)])
        self.assertEqual({r.sender for r in received}, {""})  # DSNs only
        self.assertEqual(len(received), len(MEMBERS))
        self.assertIn(b"cannot be DKIM-signed", received[0].data)
        self.assertEqual(self.queue.envelopes(), [])

    def test_no_longer_configured(self) -> None:
        """A waiting message whose domain has no key any more is sent unsigned."""
        self.break_key()
        old = self.queue_post()
        self.successResultOf(self.queue.close())
        self.signer = DKIMSigner(KeyRing([KeySpec("other.example", "s", self.spec.path)]))
        self.queue = self.open_queue()
        self.delivery()
        self.settle()
        self.assertIsNone(self.queue.get(old.id))
        self.assertEqual(len(self.smarthost.received), len(MEMBERS))
        self.assertNotIn(b"DKIM-Signature", self.smarthost.received[0].data)

    def test_signing_turned_off(self) -> None:
        """A waiting message is sent as it is once gsmail runs without dkim_keys."""
        self.break_key()
        old = self.queue_post()
        self.successResultOf(self.queue.close())
        self.queue = self.open_queue(signing=False)
        self.delivery()
        self.settle()
        self.assertIsNone(self.queue.get(old.id))
        self.assertEqual(len(self.smarthost.received), len(MEMBERS))
