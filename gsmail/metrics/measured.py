# -*- test-case-name: tests.test_metrics -*-
"""
The figures gsmail measures itself, as plain bucket counts: GroupServer
request latency and ledger appends (L{Measured}: no lock, no registry, a
bisect and two additions per observation), and an inbound worker's
snapshots of them (L{FigurePusher}), which the main process adds to its
own (L{gsmail.metrics.Metrics.worker_figures}).

Not the Prometheus registry (L{gsmail.metrics}) nor what is read at scrape
time (L{gsmail.metrics.gauges}).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client.utils import floatToGoString

__all__ = ["LEDGER_BUCKETS", "PUSH_INTERVAL", "REQUEST_BUCKETS", "FigurePusher", "Measured"]

#: GroupServer request latency buckets (seconds): lookups take milliseconds,
#: big posts up to C{response_timeout} (240 s).
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 240)
#: Ledger append (write + fsync, with the hand-off to its thread) buckets.
LEDGER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

#: Seconds between an inbound worker's snapshots of its measured figures
#: (sent only when they changed, and once as the worker stops).
PUSH_INTERVAL = 5.0


class _Buckets:
    """
    One histogram series: observations per bucket (not cumulative; the last
    is above the largest bound, C{+Inf}) and their sum.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # Prometheus's le is "less than or equal": bisect_left finds it.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def add(self, counts: Sequence[int], total: float) -> None:
        for i, count in enumerate(counts):
            self.counts[i] += count
        self.total += total

    def cumulative(self) -> list[tuple[str, float]]:
        """C{(le, count)} pairs as C{HistogramMetricFamily} takes them."""
        pairs = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            pairs.append((floatToGoString(bound), float(running)))
        return pairs


class Measured:
    """
    The directly measured figures of one process: GroupServer requests by
    page and result (L{REQUEST_BUCKETS}), ledger appends
    (L{LEDGER_BUCKETS}). Called in the reactor thread only, so it takes no
    lock: a bisect and two additions per observation.

    A L{snapshot} is plain JSON (lists, numbers, text), cumulative since the
    process started; L{from_snapshot} reads one back and L{add} sums.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], _Buckets] = {}
        self.ledger_append = _Buckets(LEDGER_BUCKETS)

    def observe_request(self, page: str, result: str, seconds: float) -> None:
        """One GroupServer request (see L{gsmail.metrics.Metrics.observe_request})."""
        series = self.requests.get((page, result))
        if series is None:
            series = self.requests[(page, result)] = _Buckets(REQUEST_BUCKETS)
        series.observe(seconds)

    def observe_ledger_append(self, seconds: float, records: int) -> None:
        """One ledger append of C{records} records took C{seconds}."""
        self.ledger_append.observe(seconds)

    def snapshot(self, gauges: dict[str, float] | None = None) -> dict[str, Any]:
        """
        Everything, as JSON-ready data: C{{"requests": [[page, result,
        counts, sum], ...], "ledger_append": [counts, sum], "gauges":
        {name: value}}}, C{counts} per bucket, not cumulative.
        """
        return {
            "requests": [
                [page, result, list(s.counts), s.total]
                for (page, result), s in self.requests.items()
            ],
            "ledger_append": [list(self.ledger_append.counts), self.ledger_append.total],
            "gauges": dict(gauges or {}),
        }

    def add(self, other: Measured) -> None:
        """Add C{other}'s observations to these."""
        for key, series in other.requests.items():
            mine = self.requests.get(key)
            if mine is None:
                mine = self.requests[key] = _Buckets(REQUEST_BUCKETS)
            mine.add(series.counts, series.total)
        self.ledger_append.add(other.ledger_append.counts, other.ledger_append.total)

    @classmethod
    def from_snapshot(cls, data: object) -> tuple[Measured, dict[str, float]]:
        """
        Read a L{snapshot} back (from another process: checked).

        @return: the figures and the gauges.
        @raise ValueError: C{data} is not a snapshot of this version.
        """
        if not isinstance(data, dict):
            raise ValueError("not a snapshot")
        figures = cls()
        try:
            for page, result, counts, total in data["requests"]:
                series = _Buckets(REQUEST_BUCKETS)
                series.add(_counts(counts, len(REQUEST_BUCKETS) + 1), float(total))
                figures.requests[(str(page), str(result))] = series
            counts, total = data["ledger_append"]
            figures.ledger_append.add(_counts(counts, len(LEDGER_BUCKETS) + 1), float(total))
            gauges = {str(k): float(v) for k, v in data["gauges"].items()}
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a snapshot: {e}") from None
        return figures, gauges


def _counts(counts: object, size: int) -> list[int]:
    """Bucket counts from a snapshot: C{size} whole numbers, none negative."""
    if not isinstance(counts, list) or len(counts) != size:
        raise ValueError("bucket counts of another size")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise ValueError("bucket counts that are not counts")
    return counts


class FigurePusher:
    """
    The worker side: sends L{Measured.snapshot} of C{measured} (with
    C{gauges()}) through C{send} every L{PUSH_INTERVAL} seconds when it
    changed since the last one sent, and in L{stop}.

    @param clock: the reactor (C{callLater}).
    @param send: writes one snapshot to the main process (blocking is fine:
        a few hundred bytes to a pipe).
    @param gauges: the values read now: C{posts_in_flight},
        C{posts_waiting}, C{ledger_records}.
    """

    def __init__(
        self,
        measured: Measured,
        clock: Any,
        send: Callable[[dict[str, Any]], None],
        gauges: Callable[[], dict[str, float]],
        interval: float = PUSH_INTERVAL,
    ) -> None:
        self.measured = measured
        self.clock = clock
        self.send = send
        self.gauges = gauges
        self.interval = interval
        self._last = ""
        self._call: Any = None

    def start(self) -> None:
        """Send now and every C{interval} seconds from now on."""
        self.push()

    def push(self) -> None:
        """Send a snapshot if the figures changed; schedule the next."""
        self._call = self.clock.callLater(self.interval, self.push)
        self._send()

    def stop(self) -> None:
        """No more pushes; send the last snapshot (if it changed)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._send()

    def _send(self) -> None:
        try:
            gauges = self.gauges()
        except Exception:
            gauges = {}
        snapshot = self.measured.snapshot(gauges)
        text = json.dumps(snapshot, sort_keys=True)
        if text == self._last:
            return
        self._last = text
        self.send(snapshot)
