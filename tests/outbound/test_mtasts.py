"""
Tests for L{gsmail.outbound.mtasts}: the TXT record, the policy file and MX
patterns (pure), the policy cache on disk, and which policy applies when
(with a scripted resolver and fetch, on a clock). The HTTPS fetch and the
delivery under a policy run over real sockets in
L{tests.integration.test_mta_sts}.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.names import dns, error
from twisted.trial.unittest import SynchronousTestCase

from gsmail.outbound.mtasts import MTASTS
from gsmail.outbound.mtasts.cache import PolicyCache, StoredPolicy
from gsmail.outbound.mtasts.policy import (
    MAX_AGE_LIMIT,
    Policy,
    PolicyError,
    mx_matches,
    parse_policy,
    parse_txt_records,
)

POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.net\r\nmx: *.mx.example.net\r\nmax_age: 86400\r\n"
#: A time in seconds since the epoch to start the clock at.
START = 1_700_000_000.0


class TXTRecordTests(SynchronousTestCase):
    """L{parse_txt_records}: RFC 8461 §3.1."""

    def test_id(self) -> None:
        """The id of the one C{v=STSv1} record; other TXT records are ignored."""
        self.assertEqual(
            parse_txt_records([[b"v=spf1 -all"], [b"v=STSv1; id=20240101T000000;"]]),
            "20240101T000000",
        )

    def test_strings_joined(self) -> None:
        """A record's strings are joined without spaces."""
        self.assertEqual(parse_txt_records([[b"v=STSv1; i", b"d=abc123"]]), "abc123")

    def test_two_records(self) -> None:
        """Two C{v=STSv1} records: no usable record."""
        self.assertIsNone(parse_txt_records([[b"v=STSv1; id=1"], [b"v=STSv1; id=2"]]))

    def test_bad_id(self) -> None:
        """An id with other than letters and digits, or over 32 long, or none: no record."""
        for text in (
            b"v=STSv1; id=a-b",
            b"v=STSv1; id=" + b"1" * 33,
            b"v=STSv1;",
            b"v=STSv2; id=1",
        ):
            with self.subTest(text=text):
                self.assertIsNone(parse_txt_records([[text]]))


class PolicyFileTests(SynchronousTestCase):
    """L{parse_policy}: RFC 8461 §3.2."""

    def test_enforce(self) -> None:
        """The mode, the mx patterns (lowercase, in order) and max_age; CRLF line ends."""
        policy = parse_policy(POLICY)
        self.assertEqual(
            (policy.mode, policy.mx, policy.max_age),
            ("enforce", ("mx1.example.net", "*.mx.example.net"), 86400),
        )

    def test_lf_unknown_keys(self) -> None:
        """LF line ends and unknown keys are accepted."""
        policy = parse_policy(
            "version: STSv1\nmode: testing\nfoo: bar\nmx: MX.Example.NET.\nmax_age: 5\n"
        )
        self.assertEqual(
            (policy.mode, policy.mx, policy.max_age), ("testing", ("mx.example.net",), 5)
        )

    def test_max_age_capped(self) -> None:
        """max_age above 31557600 counts as 31557600."""
        policy = parse_policy(POLICY.replace(b"86400", b"9999999999"))
        self.assertEqual(policy.max_age, MAX_AGE_LIMIT)

    def test_none_without_mx(self) -> None:
        """Mode C{none} needs no mx line."""
        self.assertEqual(parse_policy(b"version: STSv1\nmode: none\nmax_age: 60\n").mode, "none")

    def test_invalid(self) -> None:
        """Bad version, mode, max_age, mx, line, encoding, or no mx: L{PolicyError}."""
        bad = [
            POLICY.replace(b"STSv1", b"STSv2"),
            POLICY.replace(b"enforce", b"strict"),
            POLICY.replace(b"86400", b"-1"),
            POLICY.replace(b"86400", b"1e5"),
            b"version: STSv1\nmode: enforce\nmax_age: 60\n",
            POLICY + b"mx: bad host\n",
            POLICY + b"no colon here\n",
            POLICY + b"\xff\n",
            b"<html>Not found</html>",
        ]
        for text in bad:
            with self.subTest(text=text):
                with self.assertRaises(PolicyError) as raised:
                    parse_policy(text)
                self.assertEqual(raised.exception.result_type, "sts-policy-invalid")


class MXPatternTests(SynchronousTestCase):
    """L{mx_matches}: RFC 8461 §4.1."""

    def test_exact(self) -> None:
        """Names match whatever their case and a trailing dot."""
        self.assertTrue(mx_matches("mx.example.net", "MX.example.net."))
        self.assertFalse(mx_matches("mx.example.net", "mx2.example.net"))

    def test_wildcard_one_label(self) -> None:
        """C{*.example.net} stands for exactly one left-most label."""
        self.assertTrue(mx_matches("*.example.net", "mail.example.net"))
        self.assertFalse(mx_matches("*.example.net", "example.net"))
        self.assertFalse(mx_matches("*.example.net", "a.mail.example.net"))
        self.assertFalse(mx_matches("*.example.net", "mail.example.org"))

    def test_policy_matches(self) -> None:
        """A policy matches a host any of its patterns matches."""
        policy = parse_policy(POLICY)
        self.assertTrue(policy.matches("mx1.example.net"))
        self.assertTrue(policy.matches("a.mx.example.net"))
        self.assertFalse(policy.matches("mx2.example.net"))


class PolicyCacheTests(SynchronousTestCase):
    """L{PolicyCache}: one JSON file per domain, read back at start-up."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.clock = Clock()
        self.clock.advance(START)

    def cache(self) -> PolicyCache:
        cache = PolicyCache(self.directory, self.clock)
        cache.load()
        return cache

    def test_survives_restart(self) -> None:
        """A policy put in one cache is in a new cache loaded from the same directory."""
        stored = StoredPolicy("example.net", "abc", START, parse_policy(POLICY))
        self.successResultOf(self.cache().put(stored))
        self.assertEqual(os.listdir(self.directory), ["example.net.json"])
        self.assertEqual(self.cache().get("example.net"), stored)

    def test_expired_removed(self) -> None:
        """A policy older than its max_age is not loaded, and its file goes."""
        self.successResultOf(
            self.cache().put(StoredPolicy("example.net", "abc", START, parse_policy(POLICY)))
        )
        self.clock.advance(86400)
        self.assertIsNone(self.cache().get("example.net"))
        self.assertEqual(os.listdir(self.directory), [])

    def test_broken_removed(self) -> None:
        """A file that is not a stored policy is logged and removed; others load."""
        os.makedirs(self.directory)
        with open(os.path.join(self.directory, "bad.example.json"), "w") as f:
            f.write("{not json")
        with open(os.path.join(self.directory, "invalid.example.json"), "w") as f:
            json.dump({"domain": "invalid.example", "id": "1", "fetched": START, "policy": "x"}, f)
        self.assertEqual(self.cache().domains(), [])
        self.assertEqual(os.listdir(self.directory), [])

    def test_write_failure(self) -> None:
        """A file that cannot be written is logged; the policy still applies in memory."""
        cache = self.cache()
        os.rmdir(self.directory)
        with open(self.directory, "w"):
            pass  # a file where the directory was: every write fails
        stored = StoredPolicy("example.net", "abc", START, parse_policy(POLICY))
        self.failureResultOf(cache.put(stored), NotADirectoryError)
        self.assertEqual(cache.get("example.net"), stored)
        self.assertEqual(len(self.flushLoggedErrors()), 0)


def txt(text: bytes) -> Deferred[Any]:
    """A resolver's answer with one TXT record at C{_mta-sts.example.net}."""
    record = dns.RRHeader(b"_mta-sts.example.net", dns.TXT, payload=dns.Record_TXT(text))
    return succeed(([record], [], []))


class ScriptedResolver:
    """Answers C{lookupText} with C{answer()}; counts the lookups."""

    def __init__(self) -> None:
        self.answer = lambda: txt(b"v=STSv1; id=one")
        self.lookups = 0

    def lookupText(self, name: str, timeout: object = None) -> Deferred[Any]:  # noqa: N802
        self.lookups += 1
        return self.answer()


class ScriptedMTASTS(MTASTS):
    """L{MTASTS} whose HTTPS fetch gives the next of C{results}."""

    results: list[Policy | PolicyError]
    fetches: int = 0

    async def _fetch(self, domain: str) -> Policy:
        self.fetches += 1
        result = self.results.pop(0)
        if isinstance(result, PolicyError):
            raise result
        return result


class PolicyChoiceTests(SynchronousTestCase):
    """Which policy L{MTASTS.policy} gives (RFC 8461 §5.1), on a clock."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.clock = Clock()
        self.clock.advance(START)
        self.resolver = ScriptedResolver()
        self.reports: list[tuple[str, str]] = []
        self.sts = self.make()

    def make(self) -> ScriptedMTASTS:
        cache = PolicyCache(self.directory, self.clock)
        cache.load()
        sts = ScriptedMTASTS(
            reactor=self.clock,
            resolver=self.resolver,  # type: ignore[arg-type]
            addresses=lambda host: succeed(["127.0.0.1"]),
            cache=cache,
            check_interval=60,
            report=lambda domain, policy, result, detail: self.reports.append((domain, result)),
        )
        sts.results = []
        return sts

    def policy(self, sts: MTASTS | None = None) -> Policy | None:
        return self.successResultOf((sts or self.sts).policy("example.net"))

    def test_fetched_and_cached(self) -> None:
        """The first call fetches; later ones with the same id use the cache."""
        self.sts.results = [parse_policy(POLICY)]
        self.assertEqual(self.policy(), parse_policy(POLICY))
        self.clock.advance(61)
        self.assertEqual(self.policy(), parse_policy(POLICY))
        self.assertEqual((self.sts.fetches, self.resolver.lookups), (1, 2))

    def test_checked_once_per_interval(self) -> None:
        """Within the check interval neither DNS nor HTTPS is asked again."""
        self.sts.results = [parse_policy(POLICY)]
        self.policy()
        self.policy()
        self.assertEqual((self.sts.fetches, self.resolver.lookups), (1, 1))

    def test_new_id_refetched(self) -> None:
        """A new id in the TXT record fetches the policy again."""
        testing = parse_policy(POLICY.replace(b"enforce", b"testing"))
        self.sts.results = [parse_policy(POLICY), testing]
        self.policy()
        self.clock.advance(61)
        self.resolver.answer = lambda: txt(b"v=STSv1; id=two")
        self.assertEqual(self.policy(), testing)
        self.assertEqual(self.sts.cache.get("example.net").policy_id, "two")  # type: ignore[union-attr]

    def test_fetch_failure_keeps_cached(self) -> None:
        """A new id whose fetch fails: the cached unexpired policy still applies, reported."""
        self.sts.results = [parse_policy(POLICY), PolicyError("HTTP 500", "sts-policy-fetch-error")]
        self.policy()
        self.clock.advance(61)
        self.resolver.answer = lambda: txt(b"v=STSv1; id=two")
        self.assertEqual(self.policy(), parse_policy(POLICY))
        self.assertEqual(self.reports, [("example.net", "sts-policy-fetch-error")])

    def test_dns_failure_or_no_record_keeps_cached(self) -> None:
        """SERVFAIL, or the TXT record gone: the cached unexpired policy applies."""
        self.sts.results = [parse_policy(POLICY)]
        self.policy()
        for answer in (error.DNSServerError, error.DNSNameError):
            self.clock.advance(61)
            self.resolver.answer = lambda answer=answer: fail(answer())  # type: ignore[misc]
            self.assertEqual(self.policy(), parse_policy(POLICY))

    def test_expiry(self) -> None:
        """
        After max_age the cached policy is not used: fetched again when the
        TXT record is there, none when the fetch fails or the record is gone.
        """
        self.sts.results = [parse_policy(POLICY), parse_policy(POLICY)]
        self.policy()
        self.clock.advance(86400)
        self.assertEqual(self.policy(), parse_policy(POLICY))
        self.assertEqual(self.sts.fetches, 2)
        self.clock.advance(86400)
        self.sts.results = [PolicyError("timeout", "sts-policy-fetch-error")]
        self.assertIsNone(self.policy())
        self.clock.advance(86400)
        self.resolver.answer = lambda: fail(error.DNSNameError())
        self.assertIsNone(self.policy())
        self.assertIsNone(self.sts.cache.get("example.net"))

    def test_restart(self) -> None:
        """After a restart the cached policy applies without a fetch while its id holds."""
        self.sts.results = [parse_policy(POLICY)]
        self.policy()
        restarted = self.make()
        self.assertEqual(self.policy(restarted), parse_policy(POLICY))
        self.assertEqual(restarted.fetches, 0)
        self.resolver.answer = lambda: fail(error.DNSServerError())
        self.assertEqual(self.policy(self.make()), parse_policy(POLICY))

    def test_no_record_no_policy(self) -> None:
        """No TXT record and nothing cached: no policy, nothing fetched."""
        self.resolver.answer = lambda: fail(error.DNSNameError())
        self.assertIsNone(self.policy())
        self.assertEqual(self.sts.fetches, 0)

    def test_concurrent_share(self) -> None:
        """Concurrent calls for one domain share one lookup."""
        pending: Deferred[Any] = Deferred()
        self.resolver.answer = lambda: pending
        self.sts.results = [parse_policy(POLICY)]
        first = self.sts.policy("example.net")
        second = self.sts.policy("Example.NET.")
        pending.callback(
            ([dns.RRHeader(b"x", dns.TXT, payload=dns.Record_TXT(b"v=STSv1; id=1"))], [], [])
        )
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual((self.resolver.lookups, self.sts.fetches), (1, 1))

    def test_txt_timeout(self) -> None:
        """A TXT lookup that never answers ends after the timeout: no policy."""
        self.resolver.answer = lambda: Deferred()
        d = self.sts.policy("example.net")
        self.assertNoResult(d)
        self.clock.advance(self.sts.timeout)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_address_literal(self) -> None:
        """An address literal has no policy; DNS is not asked."""
        self.assertIsNone(self.successResultOf(self.sts.policy("[192.0.2.1]")))
        self.assertEqual(self.resolver.lookups, 0)
