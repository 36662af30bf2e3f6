# -*- test-case-name: tests.integration.test_dkim -*-
"""
DKIM signing and ARC sealing end to end, over real sockets on 127.0.0.1:
GroupServer's mailer (smtplib, as gs.email sends, with C{XVERP}) submits a
post to a running gsmail configured with an RSA and an ed25519 key for the
site; gsmail relays one copy per member, each with its own VERP sender, to a
receiving server built in the test on gsmail's inbound protocol; every copy
is checked as a receiver checks it, with dkimpy against a DNS stub that
publishes the keys as C{gsmail-dkim genkey} prints them.

  - every member's copy carries both signatures and both verify, including
    the copy sent by a second gsmail process after a restart mid-queue (the
    signature made before the restart, stored with the message);
  - a key file corrupted while gsmail runs: the submission is still
    accepted, nothing leaves, one error line names the file (however often
    delivery tries again); once the file is repaired the mail goes out
    signed;
  - C{arc_seal}: a message received from the internet (with the
    C{Authentication-Results} gsmail wrote) and re-sent by GroupServer to
    the members leaves with an ARC set that verifies.

Every wait is bounded (L{wait_until}); every service and port is closed in
the cleanup.
"""

from __future__ import annotations

import os
import smtplib
from typing import Any

import dkim
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent
from twisted.names import server
from twisted.trial.unittest import TestCase

from gsmail.addresses import Address, Route
from gsmail.config import GsmailConfig
from gsmail.control import QueueControl
from gsmail.inbound.protocol import InboundFactory, ServerSettings, Session
from gsmail.outbound import delivery as delivery_module
from gsmail.service import GsmailService, makeService
from gsmail.signing import DKIMSigner, KeyRing, KeySpec
from gsmail.status import Reply
from tests.integration.mailer import (
    GROUP,
    RefusingCore,
    decoded,
    describe_queue,
    group_message,
    gs_email_send,
)
from tests.integration.mx import capture_log
from tests.signing import DNSStub, key_file, results_of, verify_all
from tests.signing import message as internet_message
from tests.util import DOMAIN, eventually, listen_dns, make_config, port_of
from tests.zones import MemoryZone, txt

MEMBERS = ["alice@members.example.org", "bob@members.example.net", "carol@members.example.com"]
#: What the receiving server answers a member it is told to defer.
TRY_LATER = Reply(451, "4.3.0", "Try again later")
BOTH = [("rsa-sha256", True), ("ed25519-sha256", True)]


class DeferringCore(RefusingCore):
    """A receiving server's core that answers L{TRY_LATER} at RCPT for C{defer}."""

    def __init__(self) -> None:
        super().__init__(set())
        self.defer: set[str] = set()

    def check_recipient(
        self, session: Session, recipient: Address
    ) -> Deferred[tuple[Reply, Route | None]]:
        if str(recipient).lower() in self.defer:
            self.rcpts.append((session.id, str(recipient)))
            return succeed((TRY_LATER, None))
        return super().check_recipient(session, recipient)


async def receiving_server(test: TestCase) -> tuple[DeferringCore, int]:
    """A L{DeferringCore} behind gsmail's inbound ESMTP on 127.0.0.1; closed in the cleanup."""
    core = DeferringCore()
    spool = os.path.abspath(test.mktemp())
    os.makedirs(spool)
    factory = InboundFactory(
        core, ServerSettings(hostname="mx.members.example.org"), reactor, spool_dir=spool
    )
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    test.addCleanup(port.stopListening)
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return core, address.port


def run(test: TestCase, config: GsmailConfig) -> GsmailService:
    """Start gsmail; stopped in the cleanup unless the test stopped it first."""
    service = makeService(config, reactor)
    service.privilegedStartService()
    service.startService()
    test.addCleanup(lambda: service.stopService() if service.running else None)
    return service


def submission_port(service: GsmailService) -> int:
    return int(service.port("submission").getHost().port)


class SigningTestCase(TestCase):
    """The site's two keys, published in a DNS stub, and a receiving server."""

    timeout = 120

    async def setup(self, **overrides: Any) -> GsmailConfig:
        keys = os.path.abspath(self.mktemp())
        self.rsa = KeySpec(DOMAIN, "gs1", key_file(keys, "rsa.key"))
        self.ed = KeySpec(DOMAIN, "gs2", key_file(keys, "ed.key", ed25519=True))
        self.dns = DNSStub()
        self.dns.publish(self.rsa)
        self.dns.publish(self.ed)
        self.core, port = await receiving_server(self)
        directory = os.path.abspath(self.mktemp())
        options: dict[str, Any] = {
            "smtp_endpoint": "",
            "lmtp_endpoint": "",
            "submission_endpoint": "tcp:0:interface=127.0.0.1",
            "queue_dir": os.path.join(directory, "queue"),
            "relayhost": f"[127.0.0.1]:{port}",
            "dkim_keys": tuple(f"{s.domain}:{s.selector}:{s.path}" for s in (self.rsa, self.ed)),
        }
        options.update(overrides)
        return make_config(directory, **options)

    async def submit(self, service: GsmailService, message: bytes) -> None:
        """Submit C{message} for L{MEMBERS} as gs.email does; all accepted."""
        done = await deferToThread(gs_email_send, submission_port(service), GROUP, MEMBERS, message)
        self.assertEqual([s.refused for s in done], [{}])

    def copies(self) -> dict[str, bytes]:
        """Each member's copy as received, by member; each came with its own VERP sender."""
        found = {}
        for r in self.core.received:
            [member] = r.recipients
            self.assertEqual(decoded(r.sender), (GROUP, member))
            found[member] = r.data
        return found


class SignedCopiesTests(SigningTestCase):
    """What members' servers receive verifies."""

    async def test_every_copy_verifies_across_a_restart(self) -> None:
        """
        Each member's copy carries an rsa-sha256 and an ed25519-sha256
        signature by the site, and both verify; the copy that a restarted
        gsmail sends (its member was deferred before the restart) carries
        the same signatures and verifies too.
        """
        config = await self.setup()
        self.core.defer.add(MEMBERS[1])
        first = run(self, config)
        await self.submit(first, group_message("Restart"))
        assert first.queue is not None
        queue = first.queue

        def bob_deferred() -> bool:
            replies = [r.last_reply for e in queue.envelopes() for r in e.pending()]
            return len(self.core.received) == 2 and any(s.startswith("451") for s in replies)

        await eventually(bob_deferred, lambda: describe_queue(first))
        await first.stopService()

        self.core.defer.clear()
        second = run(self, config)
        assert second.queue is not None and second.outbound is not None
        [waiting] = second.queue.envelopes()
        self.assertEqual([r.address for r in waiting.pending()], [MEMBERS[1]])
        # gsmail-queue flush: the deferred member is due now.
        QueueControl(second.queue, second.outbound, reactor).flush()
        await eventually(lambda: len(self.core.received) == 3, lambda: describe_queue(second))

        copies = self.copies()
        self.assertEqual(sorted(copies), sorted(MEMBERS))
        for member, data in copies.items():
            self.assertEqual(verify_all(data, self.dns), BOTH, member)
        signatures = {data.split(b"\nFrom: ", 1)[0] for data in copies.values()}
        self.assertEqual(len(signatures), 1, "one signature, made once, before the restart")


class CorruptedKeyTests(SigningTestCase):
    """A key file that cannot be used keeps the mail queued."""

    async def test_queued_one_log_line_then_sent_once_repaired(self) -> None:
        """
        After the RSA key file is overwritten with garbage, a submission is
        still accepted, but nothing is sent however often gsmail tries again;
        the log has one error line naming the file. Repaired, the mail
        leaves, and each copy verifies.
        """
        # Try again often, so the test sees several tries (and still one line).
        self.patch(delivery_module, "SIGN_RETRY", 0.1)
        config = await self.setup()
        service = run(self, config)
        assert service.queue is not None and service.signer is not None
        with open(self.rsa.path, "rb") as f:
            good = f.read()
        with open(self.rsa.path, "wb") as f:
            f.write(b"-----BEGIN RSA PRIVATE KEY-----\nnot a key\n-----END RSA PRIVATE KEY-----\n")
        reads = []
        ring = service.signer.keys
        real_get = ring.get

        def counting_get(spec: KeySpec) -> Any:
            reads.append(spec.selector)
            return real_get(spec)

        self.patch(ring, "get", counting_get)
        events = capture_log(self)
        await self.submit(service, group_message("Broken key"))
        await eventually(lambda: reads.count("gs1") >= 5, lambda: f"key read {reads}")

        self.assertEqual(self.core.received, [])
        [envelope] = service.queue.envelopes()
        self.assertTrue(envelope.sign_pending)
        self.assertEqual(len(envelope.pending()), len(MEMBERS))
        self.assertIn("4.7.0", envelope.pending()[0].last_reply)
        errors = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.error]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn(f"DKIM signing fails: the DKIM key {self.rsa.path} ", errors[0])
        self.assertIn("messages waiting unsent: 1", errors[0])
        self.assertNotIn("Traceback", errors[0])

        with open(self.rsa.path, "wb") as f:
            f.write(good)
        await eventually(lambda: len(self.core.received) == 3, lambda: describe_queue(service))
        for member, data in self.copies().items():
            self.assertEqual(verify_all(data, self.dns), BOTH, member)


class ARCSealTests(SigningTestCase):
    """C{arc_seal}: what gsmail saw on the way in, sealed on the way out."""

    async def test_resent_post_carries_a_valid_arc_set(self) -> None:
        """
        A message from sender.example (signed, SPF-listed) is received on the
        ESMTP listener and posted with gsmail's Authentication-Results;
        GroupServer re-sends it changed (subject tag, list fields); each
        member's copy has an ARC set that verifies (cv=pass) and whose
        ARC-Authentication-Results are what gsmail saw.
        """
        sender_keys = os.path.abspath(self.mktemp())
        sender_key = KeySpec("sender.example", "sel", key_file(sender_keys, "sender.key"))
        zone = MemoryZone(
            b"",
            [
                (b"sender.example", txt("v=spf1 ip4:127.0.0.1 -all")),
                (b"_dmarc.sender.example", txt("v=DMARC1; p=reject")),
                (
                    b"sel._domainkey.sender.example",
                    txt(f"v=DKIM1; k=rsa; p={KeyRing([sender_key]).get(sender_key).public}"),
                ),
            ],
        )
        factory = server.DNSServerFactory(authorities=[zone], verbose=0)
        factory.noisy = False
        udp, tcp = listen_dns(reactor, factory)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        config = await self.setup(
            smtp_endpoint="tcp:0:interface=127.0.0.1",
            auth_check_exceptions=(),
            dns_servers=(f"127.0.0.1:{udp.getHost().port}",),
            arc_seal=True,
        )
        self.dns.publish(sender_key)
        service = run(self, config)

        plain = internet_message("alice@sender.example", "sealed")
        signed = DKIMSigner(KeyRing([sender_key])).sign(plain, "") + plain
        smtp = port_of(service, "smtp")

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", smtp, local_hostname="mail.sender.example") as s:
                return s.sendmail("alice@sender.example", [GROUP], signed)

        self.assertEqual(await deferToThread(send), {})
        [post] = service.standin.posts("example")
        [seen] = results_of(post)
        self.assertIn(b"dkim=pass", seen)

        # GroupServer's copy to the members: its own fields, a subject tag.
        head, body = post.split(b"\n\n", 1)
        lines = [line for line in head.split(b"\n") if not line.lower().startswith(b"return-path:")]
        resent = (
            b"List-Id: Example <example.groups.example.com>\n"
            + b"\n".join(lines).replace(b"Subject: sealed", b"Subject: [Example] sealed")
            + b"\n\n"
            + body
        ).replace(b"\n", b"\r\n")
        await self.submit(service, resent)
        await eventually(lambda: len(self.core.received) == 3, lambda: describe_queue(service))

        for member, data in self.copies().items():
            wire = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            cv, _, comment = dkim.arc_verify(wire, dnsfunc=self.dns)
            self.assertEqual(cv, b"pass", (member, comment))
            self.assertIn(b"ARC-Authentication-Results: i=1; mx.groups.example.com;", data)
            # The site's two signatures, then the author's, which the
            # subject tag broke: what ARC is for.
            self.assertEqual(verify_all(data, self.dns), [*BOTH, ("rsa-sha256", False)])
