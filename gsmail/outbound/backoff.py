# -*- test-case-name: tests.outbound.test_backoff -*-
"""
The retry schedule of the outbound queue: when to try a recipient again after
a transient failure (a 4xx reply, a refused or dropped connection), and when
to give up on it.

The shape is Postfix's (C{minimal_backoff_time} 300 s, C{maximal_backoff_time}
4000 s, C{maximal_queue_lifetime} 5 days): the delay doubles from 300 s after
each failed attempt up to 4000 s, so a recipient is tried about 110 times
before it expires. Every delay is spread by +/-20 % (jitter), so recipients
that failed together (one message fanned out to a whole group, a smarthost
that was down) do not all come back in the same second.
"""

from __future__ import annotations

import math
import random as _random
from collections.abc import Callable
from typing import Final

__all__ = ["DELAY_WARNING_AFTER", "LIFETIME", "expired", "next_delay"]

#: Seconds a recipient may stay undelivered before the sender gets a delay
#: warning (RFC 3464 C{Action: delayed}), as Postfix's C{delay_warning_time}
#: would (4 h); optional, the delivery side decides whether to send one.
DELAY_WARNING_AFTER: Final = 4 * 3600

#: Default queue lifetime in seconds (5 days, Postfix's
#: C{maximal_queue_lifetime}); after it a pending recipient expires and the
#: sender gets a DSN (C{Action: failed}, C{4.4.7}, RFC 3463).
LIFETIME: Final = 5 * 86400


def next_delay(
    attempt: int,
    *,
    base: float = 300.0,
    factor: float = 2.0,
    maximum: float = 4000.0,
    jitter: float = 0.2,
    random: Callable[[], float] = _random.random,
) -> float:
    """
    How long to wait before the next try of a recipient whose attempt number
    C{attempt} just failed transiently.

    The delay is C{min(base * factor ** (attempt - 1), maximum)}, then
    multiplied by a factor drawn uniformly from C{[1 - jitter, 1 + jitter)}.
    C{maximum} caps the delay I{before} the jitter, so the jittered delay of a
    recipient at the cap lies within C{maximum} +/- C{jitter}; the spread keeps
    recipients that failed together from coming back together.

    @param attempt: the number of attempts made so far, all failed (1 after
        the first failure).
    @param base: the first delay, in seconds.
    @param factor: the growth of the delay from one attempt to the next.
    @param maximum: the longest delay before jitter, in seconds.
    @param jitter: the spread, as a fraction of the delay (0.2 = +/-20 %).
    @param random: returns a float in C{[0, 1)}; inject a fixed one in tests.
    @return: the delay in seconds, positive.
    @raise ValueError: C{attempt} < 1, C{base} or C{maximum} not a positive
        finite number, C{factor} < 1, or C{jitter} outside C{[0, 1)}.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be at least 1, not {attempt}")
    if not (math.isfinite(base) and base > 0 and math.isfinite(maximum) and maximum > 0):
        raise ValueError("base and maximum must be positive numbers of seconds")
    if not (math.isfinite(factor) and factor >= 1):
        raise ValueError("factor must be at least 1")
    if not (0 <= jitter < 1):
        raise ValueError("jitter must be in [0, 1)")
    try:
        delay = min(base * factor ** (attempt - 1), maximum)
    except OverflowError:  # thousands of attempts: far past the cap
        delay = maximum
    return delay * (1 + jitter * (2 * random() - 1))


def expired(created: float, now: float, lifetime: float = LIFETIME) -> bool:
    """
    Whether a message queued at C{created} has been in the queue for its
    whole lifetime at C{now}: its pending recipients then fail permanently
    (C{4.4.7}, "delivery time expired", RFC 3463 §3.5) and the sender gets a DSN.

    @param created: when the message was queued, in seconds since the epoch.
    @param now: the current time, in seconds since the epoch.
    @param lifetime: the queue lifetime in seconds (default 5 days).
    @return: C{True} once C{now - created >= lifetime}.
    """
    return now - created >= lifetime
