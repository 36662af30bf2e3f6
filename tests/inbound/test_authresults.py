# -*- test-case-name: tests.inbound.test_authresults -*-
"""
Tests for L{gsmail.inbound.authresults}, L{gsmail.inbound.authresults.checks} and
L{gsmail.inbound.authresults.field}: the checks of one message against
a DNS held in memory (a dnspython resolver stand-in), the field written,
the forgeries removed, and the delivery core posting with the field.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import dns.exception
import dns.rdata
import dns.resolver
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gsmail.addresses import parse_mailbox
from gsmail.inbound.authresults import AuthChecker, authenticate
from gsmail.inbound.authresults.checks import DNS, from_domain, organizational_domain
from gsmail.inbound.authresults.field import (
    Checks,
    authserv_id_of,
    forged_fields,
    format_field,
    remove_fields,
)
from gsmail.inbound.protocol import Envelope, Session
from gsmail.inbound.spool import SpooledMessage
from gsmail.signing import DKIMSigner, KeyRing, KeySpec
from tests.signing import key_file

HOST = "mx.groups.example.com"
CLIENT = "192.0.2.10"


class FakeResolver:
    """
    A dnspython resolver in memory: C{records[(name, type)]} are rdata texts;
    names in C{timeouts} time out; any other name does not exist.

    @ivar asked: C{(name, type)} of each lookup, in order.
    """

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.timeouts: set[str] = set()
        self.asked: list[tuple[str, str]] = []

    def add(self, name: str, rdtype: str, *texts: str) -> None:
        self.records.setdefault((name.lower().rstrip("."), rdtype), []).extend(texts)

    def txt(self, name: str, text: str) -> None:
        """Add a TXT record, cut into 250-octet strings as a zone file would."""
        chunks = [text[i : i + 250] for i in range(0, len(text), 250)]
        self.add(name, "TXT", " ".join(f'"{c}"' for c in chunks))

    def resolve(self, name: Any, rdtype: str, **kwargs: Any) -> Any:
        key = (str(name).lower().rstrip("."), str(rdtype))
        self.asked.append(key)
        if key[0] in self.timeouts:
            raise dns.exception.Timeout()
        texts = self.records.get(key)
        if texts is None:
            if any(n == key[0] for n, _ in self.records):
                return SimpleNamespace(rrset=None)
            raise dns.resolver.NXDOMAIN()
        return SimpleNamespace(rrset=[dns.rdata.from_text("IN", rdtype, t) for t in texts])


def run_checks(
    resolver: FakeResolver,
    message: bytes,
    *,
    mail_from: str = "alice@sender.example",
    ip: str = CLIENT,
    helo: str = "mail.sender.example",
) -> Checks:
    checks = Checks()
    header = message.split(b"\n\n", 1)[0] + b"\n\n"
    authenticate(
        checks,
        header=header,
        message=message,
        ip=ip,
        mail_from=mail_from,
        helo=helo,
        resolver=DNS(resolver, deadline=float("inf")),  # type: ignore[arg-type]
    )
    return checks


MESSAGE = (
    b"From: Alice <alice@sender.example>\n"
    b"To: dev@groups.example.com\n"
    b"Subject: Hello\n"
    b"Message-ID: <1@sender.example>\n"
    b"\n"
    b"Hello, group.\n"
)


class ChecksTestCase(SynchronousTestCase):
    """A sender domain with SPF, a DKIM key and a DMARC policy of reject."""

    def setUp(self) -> None:
        self.resolver = FakeResolver()
        self.resolver.txt("sender.example", f"v=spf1 ip4:{CLIENT} -all")
        self.resolver.txt(
            "_dmarc.sender.example", "v=DMARC1; p=reject; rua=mailto:d@sender.example"
        )
        keys = self.mktemp()
        self.spec = KeySpec("sender.example", "sel", key_file(keys, "k.key"))
        ring = KeyRing([self.spec])
        key = ring.get(self.spec)
        self.resolver.txt("sel._domainkey.sender.example", f"v=DKIM1; k=rsa; p={key.public}")
        self.signer = DKIMSigner(ring)

    def signed(self, message: bytes = MESSAGE) -> bytes:
        return self.signer.sign(message, "") + message


class SPFTests(ChecksTestCase):
    """SPF of the envelope sender from the client's address."""

    def test_pass(self) -> None:
        checks = run_checks(self.resolver, MESSAGE)
        self.assertEqual((checks.spf, checks.smtp_mailfrom), ("pass", "sender.example"))

    def test_fail_from_another_address(self) -> None:
        """The domain's SPF record does not list the client: fail."""
        checks = run_checks(self.resolver, MESSAGE, ip="198.51.100.7")
        self.assertEqual(checks.spf, "fail")

    def test_no_record(self) -> None:
        checks = run_checks(self.resolver, MESSAGE, mail_from="bob@nospf.example")
        self.assertEqual(checks.spf, "none")

    def test_null_sender_checks_helo(self) -> None:
        """For the null sender the HELO name is checked (RFC 7208 §2.3)."""
        self.resolver.txt("mail.sender.example", f"v=spf1 ip4:{CLIENT} -all")
        checks = run_checks(self.resolver, MESSAGE, mail_from="")
        self.assertEqual(checks.spf, "pass")
        self.assertIn(b"spf=pass smtp.helo=mail.sender.example", format_field(HOST, checks))

    def test_timeout_is_temperror(self) -> None:
        self.resolver.timeouts.add("sender.example")
        self.assertEqual(run_checks(self.resolver, MESSAGE).spf, "temperror")


class DKIMTests(ChecksTestCase):
    """Each signature is verified against its published key."""

    def test_pass(self) -> None:
        checks = run_checks(self.resolver, self.signed())
        [result] = checks.dkim or []
        self.assertEqual(
            (result.result, result.domain, result.selector), ("pass", "sender.example", "sel")
        )
        self.assertEqual(len(result.b), 8)

    def test_none(self) -> None:
        self.assertEqual(run_checks(self.resolver, MESSAGE).dkim, [])

    def test_changed_body_fails(self) -> None:
        checks = run_checks(self.resolver, self.signed().replace(b"Hello, group.", b"Buy now"))
        self.assertEqual([r.result for r in checks.dkim or []], ["fail"])

    def test_wrong_key_fails(self) -> None:
        """Signed by a key that is not the published one: fail."""
        other = KeySpec("sender.example", "sel", key_file(self.mktemp(), "o.key", ed25519=True))
        signed = DKIMSigner(KeyRing([other])).sign(MESSAGE, "") + MESSAGE
        self.assertEqual([r.result for r in run_checks(self.resolver, signed).dkim or []], ["fail"])

    def test_no_key_is_permerror(self) -> None:
        del self.resolver.records[("sel._domainkey.sender.example", "TXT")]
        checks = run_checks(self.resolver, self.signed())
        self.assertEqual(
            [(r.result, r.reason) for r in checks.dkim or []], [("permerror", "no key")]
        )

    def test_key_timeout_is_temperror(self) -> None:
        self.resolver.timeouts.add("sel._domainkey.sender.example")
        checks = run_checks(self.resolver, self.signed())
        self.assertEqual([r.result for r in checks.dkim or []], ["temperror"])

    def test_two_signatures(self) -> None:
        """Every signature gets its own result, in order."""
        broken = b"DKIM-Signature: v=1; a=rsa-sha256; d=x.example; s=s; h=from; bh=AA==; b=AA==\n"
        checks = run_checks(self.resolver, broken + self.signed())
        self.assertEqual([r.result for r in checks.dkim or []], ["permerror", "pass"])


class DMARCTests(ChecksTestCase):
    """The From domain's policy and alignment."""

    def test_pass_by_dkim(self) -> None:
        """Aligned DKIM passes DMARC even when SPF fails (a forwarder)."""
        checks = run_checks(self.resolver, self.signed(), ip="198.51.100.7")
        self.assertEqual((checks.dmarc, checks.dmarc_policy), ("pass", "reject"))

    def test_pass_by_spf(self) -> None:
        checks = run_checks(self.resolver, MESSAGE)
        self.assertEqual((checks.dmarc, checks.header_from), ("pass", "sender.example"))

    def test_fail_unaligned(self) -> None:
        """SPF passes for another domain, no signature: fail, p=reject reported."""
        self.resolver.txt("forger.example", f"v=spf1 ip4:{CLIENT} -all")
        checks = run_checks(self.resolver, MESSAGE, mail_from="x@forger.example")
        self.assertEqual(
            (checks.spf, checks.dmarc, checks.dmarc_policy), ("pass", "fail", "reject")
        )

    def test_subdomain_uses_sp(self) -> None:
        """A subdomain without a record gets the organisational domain's sp=."""
        self.resolver.records[("_dmarc.sender.example", "TXT")] = []
        self.resolver.txt("_dmarc.sender.example", "v=DMARC1; p=reject; sp=quarantine")
        message = MESSAGE.replace(b"alice@sender.example", b"alice@news.sender.example")
        checks = run_checks(self.resolver, message, mail_from="alice@sender.example")
        self.assertEqual((checks.dmarc, checks.dmarc_policy), ("pass", "quarantine"))

    def test_none_without_record(self) -> None:
        message = MESSAGE.replace(b"alice@sender.example", b"alice@nodmarc.example")
        self.assertEqual(run_checks(self.resolver, message).dmarc, "none")

    def test_no_single_from(self) -> None:
        message = b"From: a@sender.example, b@other.example\n" + MESSAGE
        self.assertEqual(run_checks(self.resolver, message).dmarc, "permerror")

    def test_timeout_is_temperror(self) -> None:
        self.resolver.timeouts.add("_dmarc.sender.example")
        self.assertEqual(run_checks(self.resolver, MESSAGE).dmarc, "temperror")

    def test_organizational_domain(self) -> None:
        self.assertEqual(organizational_domain("a.b.example.co.uk"), "example.co.uk")
        self.assertEqual(organizational_domain("mail.example.org"), "example.org")


class BudgetTests(ChecksTestCase):
    """The time budget: lookups after it are not made; their results are temperror."""

    def test_spent(self) -> None:
        checks = Checks()
        resolver = DNS(self.resolver, deadline=10.0, now=lambda: 11.0)  # type: ignore[arg-type]
        authenticate(
            checks,
            header=MESSAGE,
            message=self.signed(),
            ip=CLIENT,
            mail_from="alice@sender.example",
            helo="h",
            resolver=resolver,
        )
        self.assertEqual(self.resolver.asked, [])
        field = format_field(HOST, checks)
        for part in (b"spf=temperror", b"dkim=temperror", b"dmarc=temperror"):
            self.assertIn(part, field)


class FieldTests(SynchronousTestCase):
    """The field as written, and the forged ones found."""

    def test_format(self) -> None:
        """One result a line; what is unknown is temperror; odd values are quoted."""
        checks = Checks(smtp_mailfrom="sender.example", spf="softfail", header_from="a b.example")
        field = format_field(HOST, checks)
        self.assertEqual(
            field,
            b"Authentication-Results: mx.groups.example.com;\n"
            b"\tspf=softfail smtp.mailfrom=sender.example;\n"
            b"\tdkim=temperror (not checked in time);\n"
            b'\tdmarc=temperror header.from="a b.example"\n',
        )

    def test_authserv_id(self) -> None:
        for value, expected in (
            (b" mx.groups.example.com; spf=pass", "mx.groups.example.com"),
            (b" (comment) MX.Groups.Example.COM 1; none", "mx.groups.example.com"),
            (b'\n\t"mx.groups.example.com";\n\tdkim=pass', "mx.groups.example.com"),
            (b" mx.groups.example.com.; none", "mx.groups.example.com"),
        ):
            with self.subTest(value=value):
                self.assertEqual(authserv_id_of(value), expected)

    def test_forged_found_and_removed(self) -> None:
        """Fields claiming gsmail's host (folded, any case) go; others' stay."""
        header = (
            b"Received: from x\n"
            b"Authentication-Results: mx.groups.example.com;\n"
            b"\tdkim=pass header.d=bank.example\n"
            b"authentication-results: mx.elsewhere.example; spf=pass\n"
            b"AUTHENTICATION-RESULTS: (forged) MX.GROUPS.EXAMPLE.COM; dmarc=pass\n"
            b"Subject: hi\n\n"
        )
        spans = forged_fields(header, HOST)
        self.assertEqual(len(spans), 2)
        self.assertEqual(
            remove_fields(header, spans),
            b"Received: from x\n"
            b"authentication-results: mx.elsewhere.example; spf=pass\n"
            b"Subject: hi\n\n",
        )

    def test_from_domain(self) -> None:
        self.assertEqual(from_domain(b"From: =?utf-8?q?A?= <a@B.Example>\n\n"), "b.example")
        self.assertIsNone(from_domain(b"Subject: no from\n\n"))
        self.assertIsNone(from_domain(b"From: a@x.example\nFrom: b@y.example\n\n"))


class CheckerTests(ChecksTestCase):
    """L{AuthChecker}: which sessions are checked, the forged fields removed."""

    def checker(self, **kwargs: Any) -> AuthChecker:
        def inline(f: Any) -> Deferred[Any]:
            return succeed(f())

        arguments: dict[str, Any] = {
            "authserv_id": HOST,
            "resolver": self.resolver,
            "clock": Clock(),
            "blocking": inline,
        }
        arguments.update(kwargs)
        return AuthChecker(**arguments)

    def spooled(self, data: bytes, memory: bool = True) -> SpooledMessage:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return SpooledMessage(path, len(data), None, "digest", data if memory else None)

    def test_which_sessions(self) -> None:
        """ESMTP from an IP outside the exceptions only: not LMTP, local or exempt clients."""
        import ipaddress

        checker = self.checker(exceptions=[ipaddress.ip_network("127.0.0.0/8")])
        self.assertEqual(checker.client_ip(Session("[192.0.2.10]", "ESMTP")), CLIENT)
        self.assertEqual(checker.client_ip(Session("[2001:db8::1]", "ESMTP")), "2001:db8::1")
        self.assertIsNone(checker.client_ip(Session("[192.0.2.10]", "LMTP")))
        self.assertIsNone(checker.client_ip(Session("[127.0.0.1]", "ESMTP")))
        self.assertIsNone(checker.client_ip(Session("local", "ESMTP")))
        # The decisions are remembered per peer; asked again they are the same.
        self.assertEqual(checker.client_ip(Session("[192.0.2.10]", "ESMTP")), CLIENT)
        self.assertIsNone(checker.client_ip(Session("[127.0.0.1]", "ESMTP")))
        self.assertIsNone(checker.client_ip(Session("[192.0.2.10]", "LMTP")))

    def test_remembered_decisions_bounded(self) -> None:
        """The memory of client decisions is emptied when full: never more than its size."""
        from gsmail.inbound import authresults

        checker = self.checker()
        for n in range(authresults._IP_CACHE_SIZE + 10):
            ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
            self.assertEqual(checker.client_ip(Session(f"[{ip}]", "ESMTP")), ip)
        self.assertLessEqual(len(checker._ips), authresults._IP_CACHE_SIZE)
        self.assertEqual(checker.client_ip(Session("[192.0.2.10]", "ESMTP")), CLIENT)

    def test_forged_removed_from_copy(self) -> None:
        """A forged field is gone from what is posted (a copy); the spool file is untouched."""
        forged = (
            b"Authentication-Results: mx.groups.example.com; dkim=pass header.d=sender.example\n"
        )
        for memory in (True, False):
            with self.subTest(memory=memory):
                message = self.spooled(forged + MESSAGE, memory)
                envelope = Envelope(sender=parse_mailbox("alice@sender.example"))
                outcome = self.successResultOf(
                    self.checker().check(
                        Session("[192.0.2.10]", "ESMTP", helo="h.sender.example"), envelope, message
                    )
                )
                self.assertEqual(outcome.forged, 1)
                assert outcome.extra_file is not None
                with open(outcome.extra_file, "rb") as f:
                    self.assertEqual(f.read(), MESSAGE)
                self.assertEqual(outcome.message.size, len(MESSAGE))
                if memory:
                    self.assertEqual(outcome.message.data, MESSAGE)
                with open(message.path, "rb") as f:
                    self.assertEqual(f.read(), forged + MESSAGE)
                self.assertIn(b"spf=pass", outcome.field)
                os.unlink(outcome.extra_file)

    def test_budget_spent_in_the_reactor(self) -> None:
        """
        Checks still running when the budget (and its grace) is over give
        temperror; the message is not held back.
        """
        clock = Clock()
        jobs: list[Any] = []

        def later(f: Any) -> Deferred[Any]:
            if not jobs and f.__name__ == "<lambda>":
                return succeed(f())  # reading the message
            d: Deferred[Any] = Deferred()
            jobs.append((f, d))
            return d

        checker = self.checker(clock=clock, blocking=later, budget=2.0)
        message = self.spooled(MESSAGE)
        envelope = Envelope(sender=parse_mailbox("alice@sender.example"))
        d = checker.check(Session("[192.0.2.10]", "ESMTP", helo="h"), envelope, message)
        assert d is not None
        self.assertNoResult(d)
        clock.advance(2.5)
        outcome = self.successResultOf(d)
        self.assertIn(b"spf=temperror", outcome.field)
        self.assertIn(b"dmarc=temperror", outcome.field)
        self.assertEqual(clock.getDelayedCalls(), [])
