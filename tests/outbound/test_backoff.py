# -*- test-case-name: tests.outbound.test_backoff -*-
"""
Tests for L{gsmail.outbound.backoff}: the retry schedule and the queue lifetime.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from gsmail.outbound.backoff import DELAY_WARNING_AFTER, LIFETIME, expired, next_delay


def middle() -> float:
    """A random source that always lands on the centre of the spread."""
    return 0.5


class NextDelayTests(SynchronousTestCase):
    """
    L{next_delay} doubles from 300 s to 4000 s and spreads each delay.
    """

    def test_postfix_schedule(self) -> None:
        """
        Without jitter, the delays after successive failures are 300, 600,
        1200, 2400 s, then 4000 s for ever (Postfix's default schedule).
        """
        delays = [next_delay(n, random=middle) for n in range(1, 9)]
        self.assertEqual(delays, [300.0, 600.0, 1200.0, 2400.0, 4000.0, 4000.0, 4000.0, 4000.0])

    def test_jitter_bounds(self) -> None:
        """
        The jitter moves a delay by up to 20 % either way: the lowest random
        draw gives 80 % of the delay, the highest just under 120 %.
        """
        self.assertEqual(next_delay(1, random=lambda: 0.0), 240.0)
        self.assertAlmostEqual(next_delay(1, random=lambda: 0.999999), 360.0, places=3)
        self.assertLess(next_delay(1, random=lambda: 0.999999), 360.0)
        self.assertEqual(next_delay(20, random=lambda: 0.0), 3200.0)
        self.assertAlmostEqual(next_delay(20, random=lambda: 0.999999), 4800.0, places=2)

    def test_jitter_spreads(self) -> None:
        """
        Recipients that failed together get different delays: the default
        random source gives many distinct values, all within the bounds.
        """
        delays = {next_delay(3) for _ in range(200)}
        self.assertGreater(len(delays), 150)
        self.assertTrue(all(960.0 <= d < 1440.0 for d in delays), sorted(delays)[:3])

    def test_parameters(self) -> None:
        """
        Base, factor, maximum and jitter are honoured; jitter 0 gives the
        exact schedule.
        """
        self.assertEqual(
            [next_delay(n, base=60, factor=3, maximum=1000, jitter=0) for n in (1, 2, 3, 4)],
            [60.0, 180.0, 540.0, 1000.0],
        )

    def test_many_attempts(self) -> None:
        """
        A recipient that has failed thousands of times still gets the
        maximum delay, not an overflow error.
        """
        self.assertEqual(next_delay(100_000, random=middle), 4000.0)
        self.assertEqual(next_delay(2000, factor=10.0, random=middle), 4000.0)

    def test_invalid(self) -> None:
        """
        Nonsensical arguments are refused with C{ValueError}.
        """
        for kwargs in (
            {"attempt": 0},
            {"attempt": 1, "base": 0.0},
            {"attempt": 1, "maximum": float("inf")},
            {"attempt": 1, "factor": 0.5},
            {"attempt": 1, "jitter": 1.0},
            {"attempt": 1, "jitter": -0.1},
        ):
            with self.subTest(kwargs=kwargs):
                self.assertRaises(ValueError, next_delay, **kwargs)  # type: ignore[arg-type]


class ExpiredTests(SynchronousTestCase):
    """
    L{expired} tells when a queued message has used up its lifetime.
    """

    def test_five_days(self) -> None:
        """
        By default a message expires exactly 5 days after it was queued, not
        a second earlier.
        """
        created = 1_700_000_000.0
        self.assertEqual(LIFETIME, 5 * 86400)
        self.assertFalse(expired(created, created))
        self.assertFalse(expired(created, created + 5 * 86400 - 1))
        self.assertTrue(expired(created, created + 5 * 86400))
        self.assertTrue(expired(created, created + 30 * 86400))

    def test_lifetime(self) -> None:
        """
        A shorter lifetime (a test system, say) is honoured.
        """
        self.assertFalse(expired(100.0, 159.0, lifetime=60))
        self.assertTrue(expired(100.0, 160.0, lifetime=60))

    def test_delay_warning(self) -> None:
        """
        Delay warnings are due after 4 hours, well before expiry.
        """
        self.assertEqual(DELAY_WARNING_AFTER, 4 * 3600)
        self.assertLess(DELAY_WARNING_AFTER, LIFETIME)
