"""
Tests for L{gsmail.anvil}: per-client counters (Postfix's anvil).
"""

from __future__ import annotations

from typing import cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gsmail.anvil import LOOKUP_LIMIT, Anvil, ClientLimits, LookupGate, parse_networks


class AnvilTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def anvil(self, **limits: object) -> Anvil:
        return Anvil(ClientLimits(**limits), self.clock)  # type: ignore[arg-type]

    def logged(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_namespace") == "gsmail.anvil"]


class ConnectionTests(AnvilTestCase):
    """Concurrent connections and the connection rate per client."""

    def test_count_limit(self) -> None:
        """The 51st open connection of one address is refused 421 4.7.0; others are not."""
        anvil = self.anvil()
        for _ in range(50):
            self.assertIsNone(anvil.connected("192.0.2.1"))
        refusal = anvil.connected("192.0.2.1")
        assert refusal is not None
        self.assertEqual((refusal.code, refusal.enhanced), (421, "4.7.0"))
        self.assertIn("[192.0.2.1]", refusal.text)
        self.assertIsNone(anvil.connected("192.0.2.2"))
        anvil.disconnected("192.0.2.1")  # the refused one
        anvil.disconnected("192.0.2.1")  # one of the 50
        self.assertIsNone(anvil.connected("192.0.2.1"))

    def test_rate_limit_window(self) -> None:
        """Past the rate in one window: refused; once the window has passed: taken again."""
        anvil = self.anvil(connection_rate=5, time_unit=60.0)
        for _ in range(5):
            self.assertIsNone(anvil.connected("192.0.2.1"))
            anvil.disconnected("192.0.2.1")
        refusal = anvil.connected("192.0.2.1")
        assert refusal is not None
        self.assertEqual((refusal.code, refusal.enhanced), (421, "4.7.0"))
        anvil.disconnected("192.0.2.1")
        self.clock.advance(59)
        self.assertIsNotNone(anvil.connected("192.0.2.1"))
        anvil.disconnected("192.0.2.1")
        self.clock.advance(1)
        self.assertIsNone(anvil.connected("192.0.2.1"))

    def test_refusals_logged_once_per_window(self) -> None:
        """A flood gives one log line per client and window, not one per connection."""
        anvil = self.anvil(connection_rate=2)
        for _ in range(100):
            anvil.connected("192.0.2.1")
            anvil.disconnected("192.0.2.1")
        self.assertEqual(len(self.logged()), 1)
        self.assertIn("Refused [192.0.2.1]", self.logged()[0])
        self.clock.advance(60)
        for _ in range(100):
            anvil.connected("192.0.2.1")
            anvil.disconnected("192.0.2.1")
        self.assertEqual(len(self.logged()), 2)

    def test_zero_is_off(self) -> None:
        """Limits of 0 refuse nothing."""
        anvil = self.anvil(connection_count=0, connection_rate=0)
        for _ in range(1000):
            self.assertIsNone(anvil.connected("192.0.2.1"))

    def test_memory_bounded(self) -> None:
        """Idle clients are forgotten once their window has passed (a flood from many addresses)."""
        anvil = self.anvil()
        for i in range(5000):
            host = f"10.0.{i // 256}.{i % 256}"
            anvil.connected(host)
            anvil.disconnected(host)
        self.clock.advance(61)
        for i in range(5000):
            host = f"10.1.{i // 256}.{i % 256}"
            anvil.connected(host)
            anvil.disconnected(host)
        self.assertLessEqual(len(anvil._clients), 5000 + 1024)


class ExceptionTests(AnvilTestCase):
    """client_limit_exceptions."""

    def test_default_loopback(self) -> None:
        """Loopback (IPv4, IPv6, IPv4-mapped) is exempt by default; others are not."""
        anvil = self.anvil()
        self.assertTrue(anvil.exempt("127.0.0.1"))
        self.assertTrue(anvil.exempt("127.1.2.3"))
        self.assertTrue(anvil.exempt("::1"))
        self.assertTrue(anvil.exempt("::ffff:127.0.0.1"))
        self.assertFalse(anvil.exempt("192.0.2.1"))
        self.assertFalse(anvil.exempt("2001:db8::1"))

    def test_configured(self) -> None:
        """Exceptions are the configured networks only; none means nobody is exempt."""
        anvil = self.anvil(exceptions=parse_networks(["192.0.2.0/24", " "]))
        self.assertTrue(anvil.exempt("192.0.2.200"))
        self.assertFalse(anvil.exempt("127.0.0.1"))
        self.assertFalse(self.anvil(exceptions=()).exempt("127.0.0.1"))


class LookupTests(AnvilTestCase):
    """GroupServer lookups per client and per session."""

    def test_client_rate(self) -> None:
        """A client's lookups past the rate are refused in its window, across sessions."""
        anvil = self.anvil(lookup_rate=3)
        one = LookupGate(anvil, "192.0.2.1", 0)
        two = LookupGate(anvil, "192.0.2.1", 0)
        self.assertEqual([one.take(), one.take(), two.take()], [None, None, None])
        self.assertEqual(two.take(), LOOKUP_LIMIT)
        self.assertEqual((LOOKUP_LIMIT.code, LOOKUP_LIMIT.enhanced), (450, "4.7.1"))
        self.assertIsNone(LookupGate(anvil, "192.0.2.2", 0).take())
        self.clock.advance(60)
        self.assertIsNone(one.take())

    def test_session_limit_and_reset(self) -> None:
        """A session's cap refuses past it, logged once; reset() starts it again."""
        gate = LookupGate(self.anvil(), "192.0.2.1", 2)
        self.assertEqual([gate.take(), gate.take()], [None, None])
        self.assertEqual([gate.take(), gate.take()], [LOOKUP_LIMIT, LOOKUP_LIMIT])
        self.assertEqual(len(self.logged()), 1)
        gate.reset()
        self.assertIsNone(gate.take())


class AuthTests(AnvilTestCase):
    """Failed AUTH per client."""

    def test_lock_out(self) -> None:
        """After 10 failures in a window AUTH is not allowed until the window ends."""
        anvil = self.anvil()
        for i in range(10):
            self.assertTrue(anvil.auth_allowed("192.0.2.1"), i)
            self.assertEqual(anvil.auth_failed("192.0.2.1"), i + 1)
        self.assertFalse(anvil.auth_allowed("192.0.2.1"))
        self.assertTrue(anvil.auth_allowed("192.0.2.2"))
        self.clock.advance(60)
        self.assertTrue(anvil.auth_allowed("192.0.2.1"))

    def test_logged_once_per_burst(self) -> None:
        """The first failure and the lock-out are logged; the failures between are not."""
        anvil = self.anvil()
        for _ in range(10):
            anvil.auth_failed("192.0.2.1")
        lines = self.logged()
        self.assertEqual(len(lines), 2)
        self.assertIn("Failed AUTH from [192.0.2.1]", lines[0])
        self.assertIn("AUTH locked for [192.0.2.1]", lines[1])
