"""
Tests for L{gsmail.outbound.mx}: MX resolution against an in-memory zone
(an authority is a resolver: no sockets), failure doubles, caching with a
Clock, failover ordering, one real DNS server on 127.0.0.1, and the
smarthost option.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.names import client, dns, error, server
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gsmail.outbound.mx import (
    DNS_TEMPORARY,
    NO_MX_ADDRESS,
    NO_SUCH_DOMAIN,
    NULL_MX,
    RELAYHOST_NOT_FOUND,
    DNSTemporaryError,
    MXHost,
    MXResolver,
    NoSuchDomainError,
    NullMXError,
    RelayHost,
    parse_relayhost,
)
from tests.util import listen_dns
from tests.zones import AAAA, CNAME, MX, A, MemoryZone

ZONE = [
    # Three MX hosts, listed out of preference order.
    (b"pref.example", MX(20, b"mx2.pref.example")),
    (b"pref.example", MX(10, b"mx1.pref.example")),
    (b"pref.example", MX(30, b"mx3.pref.example")),
    (b"mx1.pref.example", A("192.0.2.1")),
    (b"mx2.pref.example", A("192.0.2.2")),
    (b"mx3.pref.example", A("192.0.2.3")),
    # Two hosts of equal preference behind a better one.
    (b"equal.example", MX(10, b"a.equal.example")),
    (b"equal.example", MX(10, b"b.equal.example")),
    (b"equal.example", MX(5, b"first.equal.example")),
    (b"a.equal.example", A("192.0.2.11")),
    (b"b.equal.example", A("192.0.2.12")),
    (b"first.equal.example", A("192.0.2.10")),
    # IPv4 and IPv6.
    (b"dual.example", MX(10, b"mx.dual.example")),
    (b"mx.dual.example", AAAA("2001:db8::10")),
    (b"mx.dual.example", A("192.0.2.20")),
    # The domain is a CNAME; its MX host is a CNAME too.
    (b"alias.example", CNAME(b"real.example")),
    (b"real.example", MX(10, b"mx.real.example")),
    (b"mx.real.example", CNAME(b"host.real.example")),
    (b"host.real.example", A("192.0.2.30")),
    # No MX: the implicit MX is the domain itself.
    (b"bare.example", A("192.0.2.40")),
    (b"bare.example", AAAA("2001:db8::40")),
    # RFC 7505 null MX.
    (b"nullmx.example", MX(0, b"")),
    # Exists (has a TXT record) but has no MX, A or AAAA.
    (b"empty.example", dns.Record_TXT(b"v=spf1 -all")),
    # One MX host does not exist, the other does.
    (b"half.example", MX(10, b"gone.half.example")),
    (b"half.example", MX(20, b"ok.half.example")),
    (b"ok.half.example", A("192.0.2.50")),
    # No MX host has an address.
    (b"allgone.example", MX(10, b"gone1.allgone.example")),
    (b"allgone.example", MX(20, b"gone2.allgone.example")),
    # Two MX names for one address.
    (b"shared.example", MX(10, b"a.shared.example")),
    (b"shared.example", MX(20, b"b.shared.example")),
    (b"a.shared.example", A("192.0.2.60")),
    (b"b.shared.example", A("192.0.2.60")),
    (b"b.shared.example", A("192.0.2.61")),
    # TTLs: MX 300 s, the host's A 100 s.
    (b"ttl.example", MX(10, b"mx.ttl.example", ttl=300)),
    (b"mx.ttl.example", A("192.0.2.70", ttl=100)),
    # A CNAME loop.
    (b"loop.example", CNAME(b"loop2.example")),
    (b"loop2.example", CNAME(b"loop.example")),
    # An internationalised domain, stored in its A-label form.
    (b"xn--bcher-kva.example", MX(10, b"mx.xn--bcher-kva.example")),
    (b"mx.xn--bcher-kva.example", A("192.0.2.80")),
    # A smarthost name with its own MX.
    (b"relay.example", MX(10, b"mx.relay.example")),
    (b"relay.example", A("192.0.2.90")),
    (b"mx.relay.example", A("192.0.2.91")),
]


def make_zone() -> MemoryZone:
    return MemoryZone(b"example", ZONE)


class RecordingResolver:
    """
    A resolver double in front of a zone: records every query as
    C{(type, name)}, fails the ones listed in C{failures}, and holds (never
    answers, until C{release}) those listed in C{held}.
    """

    def __init__(self, zone: MemoryZone) -> None:
        self.zone = zone
        self.queries: list[tuple[str, str]] = []
        self.failures: dict[tuple[str, str], Exception] = {}
        self.held: set[tuple[str, str]] = set()
        self.waiting: list[tuple[Deferred[Any], str, str]] = []

    def _query(self, kind: str, name: str, method: str) -> Deferred[Any]:
        key = (kind, name)
        self.queries.append(key)
        if key in self.failures:
            return fail(self.failures[key])
        if key in self.held:
            d: Deferred[Any] = Deferred()
            self.waiting.append((d, kind, name))
            return d
        result: Deferred[Any] = getattr(self.zone, method)(name)
        return result

    def release(self) -> None:
        """Answer every held query from the zone."""
        waiting, self.waiting = self.waiting, []
        method = {"MX": "lookupMailExchange", "A": "lookupAddress", "AAAA": "lookupIPV6Address"}
        for d, kind, name in waiting:
            getattr(self.zone, method[kind])(name).chainDeferred(d)

    def lookupMailExchange(self, name: str, timeout: object = None) -> Deferred[Any]:
        return self._query("MX", name, "lookupMailExchange")

    def lookupAddress(self, name: str, timeout: object = None) -> Deferred[Any]:
        return self._query("A", name, "lookupAddress")

    def lookupIPV6Address(self, name: str, timeout: object = None) -> Deferred[Any]:
        return self._query("AAAA", name, "lookupIPV6Address")


class ReversingShuffler:
    """A random source whose shuffle reverses, and which counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def shuffle(self, items: list[Any]) -> None:
        self.calls += 1
        items.reverse()


def names(hosts: list[MXHost]) -> list[str]:
    return [h.name for h in hosts]


class MXOrderTests(SynchronousTestCase):
    """Which hosts a domain's mail goes to, and in which order."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.dns = RecordingResolver(make_zone())
        self.shuffler = ReversingShuffler()
        self.mx = MXResolver(self.dns, self.clock, random_source=self.shuffler)

    def hosts(self, domain: str) -> list[MXHost]:
        result: list[MXHost] = self.successResultOf(self.mx.hosts(domain))
        return result

    def test_preference_order(self) -> None:
        """Several MX hosts are tried lowest preference first, each with its address."""
        self.assertEqual(
            self.hosts("pref.example"),
            [
                MXHost(10, "mx1.pref.example", ("192.0.2.1",)),
                MXHost(20, "mx2.pref.example", ("192.0.2.2",)),
                MXHost(30, "mx3.pref.example", ("192.0.2.3",)),
            ],
        )

    def test_equal_preference_shuffled(self) -> None:
        """
        Hosts of equal preference go through the random source (RFC 5321
        §5.1), a better host stays first, and a lone host is not shuffled.
        """
        self.assertEqual(
            names(self.hosts("equal.example")),
            ["first.equal.example", "b.equal.example", "a.equal.example"],
        )
        self.assertEqual(self.shuffler.calls, 1)

    def test_equal_preference_spread_with_real_random(self) -> None:
        """
        With a real (seeded) random source both orders of two equal hosts
        occur, so load is spread; the better host is always first.
        """
        orders = set()
        for seed in range(20):
            mx = MXResolver(self.dns, self.clock, random_source=random.Random(seed))
            got = names(self.successResultOf(mx.hosts("equal.example")))
            self.assertEqual(got[0], "first.equal.example")
            orders.add(tuple(got[1:]))
        self.assertEqual(
            orders,
            {("a.equal.example", "b.equal.example"), ("b.equal.example", "a.equal.example")},
        )

    def test_ipv4_and_ipv6(self) -> None:
        """A host's A and AAAA addresses are all listed, IPv4 first."""
        self.assertEqual(
            self.hosts("dual.example"),
            [MXHost(10, "mx.dual.example", ("192.0.2.20", "2001:db8::10"))],
        )

    def test_cname(self) -> None:
        """
        A domain that is a CNAME is treated as its target (RFC 5321 §5.1),
        and an MX host that is a CNAME resolves through it.
        """
        self.assertEqual(
            self.hosts("alias.example"), [MXHost(10, "mx.real.example", ("192.0.2.30",))]
        )

    def test_cname_loop_is_transient(self) -> None:
        """A CNAME loop is a DNS fault, retried later (4.4.3), not a bounce."""
        failure = self.failureResultOf(self.mx.hosts("loop.example"), DNSTemporaryError)
        self.assertEqual(failure.value.reply.enhanced, "4.4.3")
        self.assertIn("CNAME", failure.value.detail)

    def test_no_mx_uses_address_records(self) -> None:
        """Without MX records, the domain itself is the host (implicit MX)."""
        self.assertEqual(
            self.hosts("bare.example"),
            [MXHost(0, "bare.example", ("192.0.2.40", "2001:db8::40"))],
        )

    def test_null_mx(self) -> None:
        """A null MX (RFC 7505) is a permanent 556 5.1.10: no attempt is made."""
        failure = self.failureResultOf(self.mx.hosts("nullmx.example"), NullMXError)
        self.assertEqual(failure.value.reply, NULL_MX.with_text(f"{NULL_MX.text}: nullmx.example"))
        self.assertTrue(failure.value.reply.is_permanent)
        self.assertNotIn(("A", "nullmx.example"), self.dns.queries)

    def test_nxdomain(self) -> None:
        """A domain that does not exist is a permanent 550 5.1.2."""
        failure = self.failureResultOf(self.mx.hosts("nowhere.example"), NoSuchDomainError)
        self.assertEqual(failure.value.reply.code, NO_SUCH_DOMAIN.code)
        self.assertEqual(failure.value.reply.enhanced, "5.1.2")
        self.assertIn("nowhere.example", failure.value.reply.text)

    def test_no_mx_no_address(self) -> None:
        """A domain with neither MX nor A/AAAA records is undeliverable (5.1.2)."""
        failure = self.failureResultOf(self.mx.hosts("empty.example"), NoSuchDomainError)
        self.assertEqual(failure.value.reply.enhanced, "5.1.2")

    def test_host_without_address_skipped(self) -> None:
        """An MX host that does not resolve is skipped and logged; the others are kept."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual(
            self.hosts("half.example"), [MXHost(20, "ok.half.example", ("192.0.2.50",))]
        )
        skipped = [e for e in events if e.get("mx_host") == "gone.half.example"]
        self.assertEqual(len(skipped), 1)
        self.assertEqual(skipped[0]["log_level"], LogLevel.warn)
        self.assertEqual(skipped[0]["domain"], "half.example")

    def test_all_hosts_without_address(self) -> None:
        """
        When no MX host has an address, delivery is retried (451 4.4.4), not
        bounced: a zone in the middle of a change must not bounce mail.
        """
        failure = self.failureResultOf(self.mx.hosts("allgone.example"), DNSTemporaryError)
        self.assertEqual(failure.value.reply.enhanced, NO_MX_ADDRESS.enhanced)
        self.assertTrue(failure.value.reply.is_transient)
        self.assertIn("gone1.allgone.example", failure.value.detail)
        self.assertIn("gone2.allgone.example", failure.value.detail)

    def test_shared_address_listed_once(self) -> None:
        """An address two MX hosts share is tried once, under the better host."""
        self.assertEqual(
            self.hosts("shared.example"),
            [
                MXHost(10, "a.shared.example", ("192.0.2.60",)),
                MXHost(20, "b.shared.example", ("192.0.2.61",)),
            ],
        )

    def test_idn_domain(self) -> None:
        """A non-ASCII domain is looked up by its A-label (IDNA)."""
        self.assertEqual(
            self.hosts("BÜCHER.example."),
            [MXHost(10, "mx.xn--bcher-kva.example", ("192.0.2.80",))],
        )
        self.assertEqual(self.dns.queries[0], ("MX", "xn--bcher-kva.example"))

    def test_address_literals(self) -> None:
        """An address literal is its own host; DNS is not asked."""
        self.assertEqual(self.hosts("[192.0.2.99]"), [MXHost(0, "192.0.2.99", ("192.0.2.99",))])
        self.assertEqual(
            self.hosts("[IPv6:2001:DB8::99]"), [MXHost(0, "2001:db8::99", ("2001:db8::99",))]
        )
        self.assertEqual(self.dns.queries, [])

    def test_bad_names(self) -> None:
        """A malformed literal or domain is permanent (5.1.2) without a query."""
        for bad in ("[300.1.2.3]", "[IPv6:nonsense]", "[192.0.2.1", "a..b", "", "-x.example"):
            failure = self.failureResultOf(self.mx.hosts(bad), NoSuchDomainError)
            self.assertEqual(failure.value.reply.enhanced, "5.1.2", bad)
        self.assertEqual(self.dns.queries, [])


class DNSFailureTests(SynchronousTestCase):
    """Transient DNS failures become 4xx, never a bounce."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.dns = RecordingResolver(make_zone())
        self.mx = MXResolver(self.dns, self.clock)

    def test_servfail(self) -> None:
        """SERVFAIL on the MX query is transient: 451 4.4.3."""
        self.dns.failures[("MX", "pref.example")] = error.DNSServerError()
        failure = self.failureResultOf(self.mx.hosts("pref.example"), DNSTemporaryError)
        self.assertEqual(failure.value.reply.code, DNS_TEMPORARY.code)
        self.assertEqual(failure.value.reply.enhanced, "4.4.3")
        self.assertIn("DNSServerError", str(failure.value))

    def test_query_timeout(self) -> None:
        """A resolver timeout on the MX query is transient: 451 4.4.3."""
        self.dns.failures[("MX", "pref.example")] = error.DNSQueryTimeoutError(1)
        failure = self.failureResultOf(self.mx.hosts("pref.example"), DNSTemporaryError)
        self.assertEqual(failure.value.reply.enhanced, "4.4.3")

    def test_refused_and_unknown_errors(self) -> None:
        """REFUSED, or any unexpected resolver exception, is transient too."""
        self.dns.failures[("MX", "pref.example")] = error.DNSQueryRefusedError()
        self.dns.failures[("MX", "dual.example")] = RuntimeError("resolver bug")
        for domain in ("pref.example", "dual.example"):
            self.failureResultOf(self.mx.hosts(domain), DNSTemporaryError)

    def test_servfail_on_implicit_mx(self) -> None:
        """No MX and SERVFAIL on both A and AAAA: transient, not 'no such domain'."""
        self.dns.failures[("A", "bare.example")] = error.DNSServerError()
        self.dns.failures[("AAAA", "bare.example")] = error.DNSServerError()
        self.failureResultOf(self.mx.hosts("bare.example"), DNSTemporaryError)

    def test_servfail_on_one_family(self) -> None:
        """AAAA failing while A answers: the host is used with its IPv4 address."""
        self.dns.failures[("AAAA", "mx.dual.example")] = error.DNSServerError()
        hosts = self.successResultOf(self.mx.hosts("dual.example"))
        self.assertEqual(hosts, [MXHost(10, "mx.dual.example", ("192.0.2.20",))])

    def test_servfail_on_every_host(self) -> None:
        """Every MX host's lookups failing is a transient 4.4.3."""
        for kind in ("A", "AAAA"):
            for host in ("mx1.pref.example", "mx2.pref.example", "mx3.pref.example"):
                self.dns.failures[(kind, host)] = error.DNSServerError()
        failure = self.failureResultOf(self.mx.hosts("pref.example"), DNSTemporaryError)
        self.assertEqual(failure.value.reply.enhanced, "4.4.3")

    def test_overall_timeout(self) -> None:
        """
        A resolver that never answers fails the lookup after C{timeout}
        seconds (transient), and leaves no timer behind.
        """
        self.dns.held.add(("MX", "pref.example"))
        d = self.mx.hosts("pref.example")
        self.clock.advance(self.mx.timeout - 1)
        self.assertNoResult(d)
        self.clock.advance(1)
        failure = self.failureResultOf(d, DNSTemporaryError)
        self.assertIn("no answer", failure.value.detail)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failures_not_cached(self) -> None:
        """After a transient failure the next lookup asks DNS again and succeeds."""
        self.dns.failures[("MX", "pref.example")] = error.DNSServerError()
        self.failureResultOf(self.mx.hosts("pref.example"), DNSTemporaryError)
        del self.dns.failures[("MX", "pref.example")]
        self.assertEqual(len(self.successResultOf(self.mx.hosts("pref.example"))), 3)
        self.assertEqual(self.dns.queries.count(("MX", "pref.example")), 2)


class CacheTests(SynchronousTestCase):
    """Answers are reused for their TTL, capped; concurrent lookups share queries."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.dns = RecordingResolver(make_zone())

    def test_cached_for_smallest_ttl(self) -> None:
        """
        The answer is reused until its smallest TTL (the host's A, 100 s)
        runs out; then DNS is asked again.
        """
        mx = MXResolver(self.dns, self.clock)
        first = self.successResultOf(mx.hosts("ttl.example"))
        asked = len(self.dns.queries)
        self.clock.advance(99)
        self.assertEqual(self.successResultOf(mx.hosts("ttl.example")), first)
        self.assertEqual(len(self.dns.queries), asked)
        self.clock.advance(1)
        self.successResultOf(mx.hosts("ttl.example"))
        self.assertEqual(self.dns.queries.count(("MX", "ttl.example")), 2)

    def test_ttl_cap(self) -> None:
        """C{cache_ttl_cap} bounds how long an answer is reused."""
        mx = MXResolver(self.dns, self.clock, cache_ttl_cap=30)
        self.successResultOf(mx.hosts("ttl.example"))
        self.clock.advance(29)
        self.successResultOf(mx.hosts("ttl.example"))
        self.assertEqual(self.dns.queries.count(("MX", "ttl.example")), 1)
        self.clock.advance(1)
        self.successResultOf(mx.hosts("ttl.example"))
        self.assertEqual(self.dns.queries.count(("MX", "ttl.example")), 2)

    def test_cache_is_bounded(self) -> None:
        """The cache keeps at most C{max_cache_entries} domains."""
        mx = MXResolver(self.dns, self.clock, max_cache_entries=2)
        for domain in ("pref.example", "dual.example", "bare.example", "pref.example"):
            self.successResultOf(mx.hosts(domain))
        self.assertEqual(self.dns.queries.count(("MX", "pref.example")), 2)

    def test_concurrent_lookups_share_queries(self) -> None:
        """Two lookups of one domain while DNS is slow cause one set of queries."""
        mx = MXResolver(self.dns, self.clock)
        self.dns.held.add(("MX", "pref.example"))
        first, second = mx.hosts("pref.example"), mx.hosts("pref.example")
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.dns.release()
        self.assertEqual(names(self.successResultOf(first))[0], "mx1.pref.example")
        self.assertEqual(names(self.successResultOf(second))[0], "mx1.pref.example")
        self.assertEqual(self.dns.queries.count(("MX", "pref.example")), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelled_waiter_leaves_others(self) -> None:
        """A caller that gives up does not cancel the lookup another caller waits on."""
        mx = MXResolver(self.dns, self.clock)
        self.dns.held.add(("MX", "pref.example"))
        first, second = mx.hosts("pref.example"), mx.hosts("pref.example")
        first.cancel()
        self.failureResultOf(first)
        self.dns.release()
        self.assertEqual(len(self.successResultOf(second)), 3)


class BadAddressTests(SynchronousTestCase):
    """mark_bad/is_bad reorder failover for a while."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.mx = MXResolver(RecordingResolver(make_zone()), self.clock)

    def test_bad_host_tried_last(self) -> None:
        """A host whose only address failed is tried after the others, for an hour."""
        self.mx.mark_bad("192.0.2.1")
        self.assertTrue(self.mx.is_bad("192.0.2.1"))
        self.assertEqual(
            names(self.successResultOf(self.mx.hosts("pref.example"))),
            ["mx2.pref.example", "mx3.pref.example", "mx1.pref.example"],
        )
        self.clock.advance(3600)
        self.assertFalse(self.mx.is_bad("192.0.2.1"))
        self.assertEqual(
            names(self.successResultOf(self.mx.hosts("pref.example"))),
            ["mx1.pref.example", "mx2.pref.example", "mx3.pref.example"],
        )

    def test_bad_address_within_host(self) -> None:
        """A host's failed address is tried after its other address."""
        self.mx.mark_bad("192.0.2.20", seconds=60)
        self.assertEqual(
            self.successResultOf(self.mx.hosts("dual.example")),
            [MXHost(10, "mx.dual.example", ("2001:db8::10", "192.0.2.20"))],
        )

    def test_ipv6_spelling(self) -> None:
        """An IPv6 address is the same address however it is spelled."""
        self.mx.mark_bad("2001:DB8:0:0::10", seconds=10)
        self.assertTrue(self.mx.is_bad("2001:db8::10"))
        self.assertFalse(self.mx.is_bad("2001:db8::11"))
        self.clock.advance(10)
        self.assertFalse(self.mx.is_bad("2001:db8::10"))


class RelayHostsTests(SynchronousTestCase):
    """The hosts of a configured smarthost."""

    def setUp(self) -> None:
        self.dns = RecordingResolver(make_zone())
        self.mx = MXResolver(self.dns, Clock())

    def test_bracketed_no_mx_lookup(self) -> None:
        """C{[relay.example]} connects to the host's own address, MX is not asked."""
        hosts = self.successResultOf(self.mx.relay_hosts(parse_relayhost("[relay.example]")))
        self.assertEqual(hosts, [MXHost(0, "relay.example", ("192.0.2.90",))])
        self.assertNotIn(("MX", "relay.example"), self.dns.queries)

    def test_mx_lookup(self) -> None:
        """C{relay.example} goes to that domain's MX hosts."""
        hosts = self.successResultOf(self.mx.relay_hosts(parse_relayhost("relay.example")))
        self.assertEqual(hosts, [MXHost(10, "mx.relay.example", ("192.0.2.91",))])

    def test_missing_relayhost_is_transient(self) -> None:
        """A smarthost that does not exist keeps mail queued (4.4.4), never bounces it."""
        for option in ("[nowhere.example]", "nowhere.example", "nullmx.example"):
            failure = self.failureResultOf(
                self.mx.relay_hosts(parse_relayhost(option)), DNSTemporaryError
            )
            self.assertEqual(failure.value.reply.enhanced, RELAYHOST_NOT_FOUND.enhanced)
            self.assertTrue(failure.value.reply.is_transient, option)


class ParseRelayhostTests(SynchronousTestCase):
    """The smarthost option's forms."""

    def test_forms(self) -> None:
        """Each documented form gives host, port, implicit TLS and MX lookup."""
        cases = {
            "tls:mail.example.net:465": RelayHost("mail.example.net", 465, True, False),
            "tls:mail.example.net": RelayHost("mail.example.net", 465, True, False),
            "tcp:mail.example.net:587": RelayHost("mail.example.net", 587, False, False),
            "tcp:Mail.Example.NET": RelayHost("mail.example.net", 25, False, False),
            "tcp:host=mail.example.net:port=2525": RelayHost(
                "mail.example.net", 2525, False, False
            ),
            "tcp:host=2001\\:db8\\:\\:1:port=25": RelayHost("2001:db8::1", 25, False, False),
            "tls:[2001:db8::1]:465": RelayHost("2001:db8::1", 465, True, False),
            "[mail.example.net]:587": RelayHost("mail.example.net", 587, False, False),
            "[mail.example.net]": RelayHost("mail.example.net", 25, False, False),
            "[192.0.2.1]": RelayHost("192.0.2.1", 25, False, False),
            "[ipv6:2001:db8::1]:25": RelayHost("2001:db8::1", 25, False, False),
            "mail.example.net": RelayHost("mail.example.net", 25, False, True),
            "mail.example.net:587": RelayHost("mail.example.net", 587, False, True),
            " 192.0.2.1:26 ": RelayHost("192.0.2.1", 26, False, False),
        }
        for text, expected in cases.items():
            self.assertEqual(parse_relayhost(text), expected, text)

    def test_errors(self) -> None:
        """Malformed options are configuration errors (ValueError)."""
        for text in (
            "",
            "tcp:",
            "tcp:mail.example.net:0",
            "tcp:mail.example.net:65536",
            "tcp:mail.example.net:smtp",
            "tcp:mail.example.net:25:extra",
            "tcp:mail.example.net:timeout=5",
            "[mail.example.net",
            "[mail.example.net]x",
            "2001:db8::1",
            "bad_host-.example",
            "mail..example.net",
        ):
            self.assertRaises(ValueError, parse_relayhost, text)


class RealDNSServerTests(TestCase):
    """
    Resolution through C{twisted.names.client.Resolver} against a
    C{twisted.names} server on 127.0.0.1 (UDP and TCP on one port).
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        factory = server.DNSServerFactory(authorities=[make_zone()], verbose=0)
        factory.noisy = False
        udp, tcp = listen_dns(reactor, factory)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        port = udp.getHost().port
        resolver = client.Resolver(servers=[("127.0.0.1", port)], timeout=(2,), reactor=reactor)
        self.mx = MXResolver(resolver, reactor)

    async def test_mx_zone(self) -> None:
        """Several MX hosts come back over real sockets, in preference order."""
        hosts = await self.mx.hosts("pref.example")
        self.assertEqual(
            hosts,
            [
                MXHost(10, "mx1.pref.example", ("192.0.2.1",)),
                MXHost(20, "mx2.pref.example", ("192.0.2.2",)),
                MXHost(30, "mx3.pref.example", ("192.0.2.3",)),
            ],
        )
        dual = await self.mx.hosts("dual.example")
        self.assertEqual(dual, [MXHost(10, "mx.dual.example", ("192.0.2.20", "2001:db8::10"))])

    async def test_nxdomain_and_null_mx(self) -> None:
        """NXDOMAIN and a null MX from a real server are permanent failures."""
        with self.assertRaises(NoSuchDomainError):
            await self.mx.hosts("nowhere.example")
        with self.assertRaises(NullMXError):
            await self.mx.hosts("nullmx.example")
