# -*- test-case-name: tests.integration.test_authresults -*-
"""
C{Authentication-Results} end to end: Python's smtplib sends mail to a
running gsmail over ESMTP on 127.0.0.1; gsmail checks it against a DNS
server of the test's own (twisted.names, on 127.0.0.1, the C{dns_servers}
option); the stand-in receives the post, and the test reads the field
gsmail put at its top.

  - mail signed by a key the sender's domain publishes, from an address its
    SPF record lists: spf, dkim and dmarc pass;
  - a forgery: signed by a key that is not the published one, from a domain
    whose SPF record does not list 127.0.0.1, with a C{From} whose domain
    says p=reject, and an C{Authentication-Results} field of its own that
    claims gsmail's host said all passed: dkim, spf and dmarc fail, and the
    forged field is gone (another host's is kept);
  - a DNS server that never answers: temperror for each, within the time
    budget, and the message is posted anyway.
"""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.threads import deferToThread
from twisted.names import server
from twisted.trial.unittest import TestCase

from gsmail.signing import DKIMSigner, KeyRing, KeySpec
from tests.signing import GROUP, key_file, message, results_of
from tests.util import listen_dns, make_config, port_of, start_service
from tests.zones import MemoryZone, txt

HOST = "mx.groups.example.com"


class Silent(DatagramProtocol):
    """A DNS server that never answers."""

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        pass


class AuthenticationResultsTests(TestCase):
    """What gsmail tells GroupServer about who sent what."""

    timeout = 60

    def setUp(self) -> None:
        keys = self.mktemp()
        self.good = KeySpec("sender.example", "sel", key_file(keys, "good.key"))
        self.wrong = KeySpec("sender.example", "sel", key_file(keys, "wrong.key", ed25519=True))
        published = KeyRing([self.good]).get(self.good)
        zone = MemoryZone(
            b"",
            [
                (b"sender.example", txt("v=spf1 ip4:127.0.0.1 -all")),
                (b"_dmarc.sender.example", txt("v=DMARC1; p=reject")),
                (b"sel._domainkey.sender.example", txt(f"v=DKIM1; k=rsa; p={published.public}")),
                (b"forger.example", txt("v=spf1 ip4:192.0.2.1 -all")),
            ],
        )
        factory = server.DNSServerFactory(authorities=[zone], verbose=0)
        factory.noisy = False
        udp, tcp = listen_dns(reactor, factory)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        self.dns_port = udp.getHost().port

    def start(self, **overrides: Any) -> Any:
        options: dict[str, Any] = {
            "lmtp_endpoint": "",
            "auth_check_exceptions": (),  # the test's client is 127.0.0.1
            "dns_servers": (f"127.0.0.1:{self.dns_port}",),
        }
        options.update(overrides)
        return start_service(self, make_config(self.mktemp(), **options))

    async def send(self, service: Any, sender: str, data: bytes) -> None:
        port = port_of(service, "smtp")

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="mail.sender.example") as s:
                return s.sendmail(sender, [GROUP], data)

        self.assertEqual(await deferToThread(send), {})

    async def test_signed_message_passes(self) -> None:
        """Signed by the published key, sent from an SPF-listed address: all pass."""
        service = self.start()
        plain = message("alice@sender.example", "signed")
        signed = DKIMSigner(KeyRing([self.good])).sign(plain, "") + plain
        await self.send(service, "alice@sender.example", signed)
        [post] = service.standin.posts("example")
        [field] = results_of(post)
        self.assertTrue(
            post.startswith(b"Return-Path: <alice@sender.example>\nAuthentication-Results: ")
        )
        self.assertTrue(field.startswith(f"Authentication-Results: {HOST}; ".encode()), field)
        self.assertIn(b"spf=pass smtp.mailfrom=sender.example", field)
        self.assertIn(b"dkim=pass header.d=sender.example header.s=sel", field)
        self.assertIn(b"dmarc=pass (p=reject) header.from=sender.example", field)

    async def test_forgery(self) -> None:
        """
        A forgery fails each check, and its own field claiming gsmail's host
        is removed; another host's field stays.
        """
        service = self.start()
        planted = (
            f"Authentication-Results: {HOST.upper()}; spf=pass; dkim=pass"
            " header.d=sender.example; dmarc=pass\r\n"
            "Authentication-Results: mx.elsewhere.example; spf=pass\r\n"
        ).encode()
        plain = message("ceo@sender.example", "forged", planted)
        signed = DKIMSigner(KeyRing([self.wrong])).sign(plain, "") + plain
        await self.send(service, "ceo@forger.example", signed)
        [post] = service.standin.posts("example")
        fields = results_of(post)
        self.assertEqual(len(fields), 2, fields)
        ours, theirs = fields
        self.assertIn(b"spf=fail smtp.mailfrom=forger.example", ours)
        self.assertIn(b"dkim=fail header.d=sender.example header.s=sel", ours)
        self.assertIn(b"dmarc=fail (p=reject) header.from=sender.example", ours)
        self.assertEqual(theirs, b"Authentication-Results: mx.elsewhere.example; spf=pass")
        self.assertNotIn(HOST.upper().encode(), post)

    async def test_dns_timeouts(self) -> None:
        """A DNS server that never answers: temperror for each, and the message is posted."""
        silent = reactor.listenUDP(0, Silent(), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        service = self.start(
            dns_servers=(f"127.0.0.1:{silent.getHost().port}",), auth_check_time=1.0
        )
        plain = message("alice@sender.example", "timeouts")
        signed = DKIMSigner(KeyRing([self.good])).sign(plain, "") + plain
        await self.send(service, "alice@sender.example", signed)
        [post] = service.standin.posts("example")
        [field] = results_of(post)
        self.assertIn(b"spf=temperror", field)
        self.assertIn(b"dkim=temperror", field)
        self.assertIn(b"dmarc=temperror", field)

    async def test_off(self) -> None:
        """With authentication_results off, nothing is added or removed."""
        service = self.start(authentication_results=False)
        planted = f"Authentication-Results: {HOST}; dkim=pass\r\n".encode()
        await self.send(
            service, "alice@sender.example", message("a@sender.example", "off", planted)
        )
        [post] = service.standin.posts("example")
        self.assertEqual(results_of(post), [f"Authentication-Results: {HOST}; dkim=pass".encode()])

    async def test_exempt_clients(self) -> None:
        """Mail from an exempt client (by default loopback: a local MTA) is left alone."""
        service = self.start(auth_check_exceptions=("127.0.0.0/8",))
        await self.send(service, "alice@sender.example", message("a@sender.example", "exempt"))
        [post] = service.standin.posts("example")
        self.assertEqual(results_of(post), [])
