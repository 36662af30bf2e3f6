# -*- test-case-name: tests.test_metrics -*-
"""
The gauges and histograms read at scrape time, from the objects that know
them (no bookkeeping on the hot path): GroupServer latency and ledger
appends (the main process's L{gsmail.metrics.measured.Measured} plus the
inbound workers'), posts in flight and waiting, ledger records, the
outbound queue, free disk space.

Not the counters of log events (L{gsmail.metrics}) nor the HTTP endpoint
(L{gsmail.metrics.http}).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gsmail.metrics import Metrics

__all__ = [
    "MeasuredCollector",
    "Readings",
    "disk_gauge",
    "free_bytes",
    "ledger_gauge",
    "posts_gauges",
    "queue_gauges",
]

#: Reads gauges now: one callable per watched object.
Reader = Callable[[], Iterable[Metric]]


class Readings(Collector):
    """
    Gauges read at scrape time from the objects that know them (no
    bookkeeping on the hot path): each source is a callable made by
    L{gsmail.metrics.Metrics}'s C{watch_posts}, C{watch_ledger},
    C{watch_queue} and C{watch_disk}.
    """

    def __init__(self) -> None:
        self.sources: list[Reader] = []

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source()


class MeasuredCollector(Collector):
    """
    The measured histograms at scrape time: the main process's own figures
    plus the inbound workers' (L{gsmail.metrics.Metrics.measured_total}).
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        total = self.metrics.measured_total()
        requests = HistogramMetricFamily(
            "gsmail_groupserver_request_seconds",
            "GroupServer requests by page and result (HTTP status, timeout or error)",
            labels=["page", "result"],
        )
        for (page, result), series in sorted(total.requests.items()):
            requests.add_metric([page, result], series.cumulative(), series.total)
        yield requests
        ledger = HistogramMetricFamily(
            "gsmail_ledger_append_seconds",
            "Post ledger appends: write and fsync of a group of records",
        )
        ledger.add_metric([], total.ledger_append.cumulative(), total.ledger_append.total)
        yield ledger


def posts_gauges(client: Any, worker_gauges: Callable[[str], list[float]]) -> Reader:
    """The reader of L{gsmail.metrics.Metrics.watch_posts}."""

    def read() -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "gsmail_posts_in_flight",
            "Adds and relays sent to GroupServer, awaiting the answer",
            value=client.in_flight_posts + sum(worker_gauges("posts_in_flight")),
        )
        yield GaugeMetricFamily(
            "gsmail_posts_waiting",
            "Adds and relays waiting for one of the post_concurrency slots",
            value=client.queued_posts + sum(worker_gauges("posts_waiting")),
        )

    return read


def ledger_gauge(ledger: Any, worker_gauges: Callable[[str], list[float]]) -> Reader:
    """The reader of L{gsmail.metrics.Metrics.watch_ledger}."""

    def read() -> Iterator[Metric]:
        counts = worker_gauges("ledger_records")
        try:
            counts.append(len(ledger))
        except Exception:
            pass  # not open (yet, or any more)
        if not counts:
            return
        yield GaugeMetricFamily(
            "gsmail_ledger_records",
            "Posts the ledger remembers (not expired)",
            value=max(counts),
        )

    return read


def queue_gauges(queue: Any, clock: Any) -> Reader:
    """The reader of L{gsmail.metrics.Metrics.watch_queue}."""

    def read() -> Iterator[Metric]:
        try:
            envelopes = queue.envelopes()
        except Exception:
            return
        pending = sum(len(e.pending()) for e in envelopes)
        oldest = min((e.created for e in envelopes), default=None)
        age = 0.0 if oldest is None else max(0.0, clock.seconds() - oldest)
        yield GaugeMetricFamily(
            "gsmail_queue_messages", "Messages in the outbound queue", value=len(envelopes)
        )
        yield GaugeMetricFamily(
            "gsmail_queue_recipients",
            "Recipients still to be delivered in the outbound queue",
            value=pending,
        )
        yield GaugeMetricFamily(
            "gsmail_queue_oldest_age_seconds",
            "Age of the oldest message in the outbound queue",
            value=age,
        )

    return read


def disk_gauge(directories: dict[str, str]) -> Reader:
    """The reader of L{gsmail.metrics.Metrics.watch_disk}."""

    def read() -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "gsmail_disk_free_bytes",
            "Bytes free for gsmail on the file system of each state directory",
            labels=["directory"],
        )
        for name, path in directories.items():
            free = free_bytes(path)
            if free is not None:
                family.add_metric([name], free)
        yield family

    return read


def free_bytes(path: str) -> int | None:
    """Bytes available to unprivileged users on C{path}'s file system; C{None}: cannot tell."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
