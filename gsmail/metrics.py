# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics, C{/healthz} and C{/readyz} (option C{metrics_endpoint}).

L{Metrics} owns a C{prometheus_client.CollectorRegistry} of its own, never
the library's global one: gsmail is a library that several services may
embed in one process, and the tests make many services.

Where the figures come from:

  - B{log events}: L{Metrics.observe} is a C{twisted.logger} observer; it
    counts the events that carry C{gsmail_event} (L{gsmail.maillog}'s
    C{connect}, C{disconnect}, C{queued}, C{delivery}, C{reject}, C{dsn},
    C{tls}). Inbound worker processes send their events to the main process,
    which re-emits them (L{gsmail.workers}), so the main process's observer
    counts every worker's mail once; a worker never serves metrics.
  - B{measured}: GroupServer request latency (L{observe_request}, hooked into
    L{gsmail.groupserver.GroupServerClient}) and ledger appends
    (L{observe_ledger_append}, hooked into L{gsmail.ledger.PostLedger}),
    recorded in a L{Measured} (plain bucket counts: no lock, no registry).
  - B{read at scrape time}: posts in flight and waiting, ledger records,
    the outbound queue (messages, recipients, age of the oldest), free disk
    space; no bookkeeping on the hot path.
  - B{inbound workers' snapshots}: each worker process records its own
    measured figures in a L{Measured} and, every L{PUSH_INTERVAL} seconds
    when they changed (L{FigurePusher}) and once as it stops, sends the main
    process one snapshot of them with its posts in flight and waiting and
    its ledger records: a control line on its standard output
    (L{gsmail.workers}), which the main process hands to
    L{Metrics.worker_figures} and never logs. The main process keeps each
    worker's latest snapshot (they are cumulative: one replaces the last)
    and adds them to its own figures at scrape time: histograms and post
    gauges summed, ledger records the largest (every process remembers the
    same shared file, as far as it has read it). When a worker exits, its
    last histograms go to a retired total, so the sums never go down when
    its successor starts from zero (Prometheus counters are monotonic).
    Not prometheus_client's multiprocess mode: that needs an environment
    variable before import and global state, wrong for an embeddable
    library.

C{/readyz} (L{Readiness}) answers 200 when every listener is up, GroupServer
answered its last check (a group-exists call, cached), the ledger and spool
directories are writable and free space is above C{readyz_min_free}; else
503 with one line per failed check.

The exposition is C{prometheus_client.generate_latest} in the reactor
thread (about 0.8 ms for 27 delivery series and the rest), not
C{prometheus_client.twisted.MetricsResource}, which imports the global
reactor and runs a WSGI app in its thread pool.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.logger import ILogObserver, LogEvent
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

__all__ = [
    "Metrics",
    "Measured",
    "FigurePusher",
    "Readiness",
    "GroupServerProbe",
    "HealthResource",
    "MetricsSite",
    "make_site",
    "METRIC_NAMES",
]

#: GroupServer request latency buckets (seconds): lookups take milliseconds,
#: big posts up to C{response_timeout} (240 s).
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 240)
#: Ledger append (write + fsync, with the hand-off to its thread) buckets.
LEDGER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
#: Delivery delay buckets: seconds (inbound) to days (outbound retries).
DELAY_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400, 432000)

#: Seconds between an inbound worker's snapshots of its measured figures
#: (sent only when they changed, and once as the worker stops).
PUSH_INTERVAL = 5.0

#: The metric families gsmail exports (the names Prometheus shows, before
#: the C{_total}, C{_bucket}, C{_sum}, C{_count} and C{_created} suffixes).
METRIC_NAMES = frozenset(
    {
        "gsmail_sessions",
        "gsmail_sessions_open",
        "gsmail_messages",
        "gsmail_bytes_received",
        "gsmail_recipients",
        "gsmail_delivery_delay_seconds",
        "gsmail_rejects",
        "gsmail_dsns",
        "gsmail_tls_sessions",
        "gsmail_log_events_unreadable",
        "gsmail_groupserver_request_seconds",
        "gsmail_posts_in_flight",
        "gsmail_posts_waiting",
        "gsmail_ledger_records",
        "gsmail_ledger_append_seconds",
        "gsmail_queue_messages",
        "gsmail_queue_recipients",
        "gsmail_queue_oldest_age_seconds",
        "gsmail_disk_free_bytes",
        "gsmail_ready",
    }
)


def reply_class(dsn: object) -> str:
    """
    C{"2xx"}, C{"4xx"} or C{"5xx"} from an enhanced status code's first
    digit (C{"4.4.1"}: C{"4xx"}; RFC 3463 §3.1) or a reply code; C{"other"}
    for anything else.
    """
    first = str(dsn)[:1]
    return f"{first}xx" if first in ("2", "4", "5") else "other"


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
        """One GroupServer request (see L{Metrics.observe_request})."""
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


class _Children:
    """
    A labelled metric's children by label values, kept: C{labels()} takes a
    lock and builds a key each call, a few microseconds per log event.
    """

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self.cache.get(values)
        if child is None:
            child = self.cache[values] = self.metric.labels(*values)
        return child


class _Readings(Collector):
    """
    Gauges read at scrape time from the objects that know them (no
    bookkeeping on the hot path): each source is a callable made by
    L{Metrics.watch_posts}, L{Metrics.watch_ledger}, L{Metrics.watch_queue}
    and L{Metrics.watch_disk}.
    """

    def __init__(self) -> None:
        self.sources: list[Callable[[], Iterable[Metric]]] = []

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source()


class _MeasuredCollector(Collector):
    """
    The measured histograms at scrape time: the main process's own figures
    plus the inbound workers' (L{Metrics.measured_total}).
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


@implementer(ILogObserver)
class Metrics:
    """
    gsmail's metrics in a registry of their own.

    @param clock: the reactor's clock (C{seconds()}), for ages.
    @ivar registry: the C{CollectorRegistry} every metric is in.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Counter(
            "gsmail_sessions", "SMTP/LMTP sessions accepted", ["listener"], registry=r
        )
        self.sessions_open = Gauge(
            "gsmail_sessions_open", "SMTP/LMTP sessions open now", ["listener"], registry=r
        )
        self.messages = Counter(
            "gsmail_messages", "Messages received (end of DATA)", ["listener"], registry=r
        )
        self.bytes_received = Counter(
            "gsmail_bytes_received", "Bytes of messages received", ["listener"], registry=r
        )
        self.recipients = Counter(
            "gsmail_recipients",
            "Recipient outcomes: status sent/deferred/bounced/expired, class of the reply",
            ["listener", "status", "class"],
            registry=r,
        )
        self.delay = Histogram(
            "gsmail_delivery_delay_seconds",
            "Seconds from a message's arrival to a recipient's outcome",
            ["listener"],
            buckets=DELAY_BUCKETS,
            registry=r,
        )
        self.rejects = Counter(
            "gsmail_rejects",
            "Commands refused, by SMTP stage and reply class",
            ["listener", "stage", "class"],
            registry=r,
        )
        self.dsns = Counter(
            "gsmail_dsns", "Delivery status notifications queued", ["status"], registry=r
        )
        self.tls_sessions = Counter(
            "gsmail_tls_sessions",
            "TLS sessions established; side server (a listener) or client (outbound)",
            ["side", "protocol"],
            registry=r,
        )
        self.unreadable = Counter(
            "gsmail_log_events_unreadable",
            "Log events with gsmail_event, or worker snapshots, that could not be counted",
            registry=r,
        )
        #: This process's GroupServer requests and ledger appends.
        self.measured = Measured()
        #: Inbound workers' latest snapshots by worker number: figures, gauges.
        self._workers: dict[int, tuple[Measured, dict[str, float]]] = {}
        #: The last figures of worker processes that exited.
        self._retired = Measured()
        r.register(_MeasuredCollector(self))
        self.ready = Gauge(
            "gsmail_ready", "1 when the readiness checks passed at this scrape, else 0", registry=r
        )
        self._readings = _Readings()
        r.register(self._readings)
        # Open sessions per (worker, listener): a worker that dies never
        # says disconnect, so its share is taken off when it exits.
        self._open: dict[tuple[object, str], int] = {}
        self._by_sessions = _Children(self.sessions)
        self._by_sessions_open = _Children(self.sessions_open)
        self._by_messages = _Children(self.messages)
        self._by_bytes = _Children(self.bytes_received)
        self._by_recipients = _Children(self.recipients)
        self._by_delay = _Children(self.delay)
        self._by_rejects = _Children(self.rejects)
        self._by_dsns = _Children(self.dsns)
        self._by_tls = _Children(self.tls_sessions)
        self._handlers: dict[str, Callable[[LogEvent], None]] = {
            "connect": self._connect,
            "disconnect": self._disconnect,
            "queued": self._queued,
            "delivery": self._delivery,
            "reject": self._reject,
            "dsn": self._dsn,
            "tls": self._tls,
        }

    # -- log events --------------------------------------------------------

    def observe(self, event: LogEvent) -> None:
        """
        The log observer: count an event with C{gsmail_event}; ignore any
        other. Never raises (a raising observer is dropped by Twisted).
        """
        kind = event.get("gsmail_event")
        if kind is None:
            return
        handler = self._handlers.get(kind)
        if handler is None:
            return
        try:
            handler(event)
        except Exception:
            self.unreadable.inc()

    __call__ = observe

    def _connect(self, event: LogEvent) -> None:
        listener = str(event["listener"])
        self._by_sessions(listener).inc()
        key = (event.get("gsmail_worker"), listener)
        self._open[key] = self._open.get(key, 0) + 1
        self._by_sessions_open(listener).inc()

    def _disconnect(self, event: LogEvent) -> None:
        listener = str(event["listener"])
        key = (event.get("gsmail_worker"), listener)
        count = self._open.get(key, 0)
        if count <= 0:
            return  # its connect was before the observer (a restart of metrics)
        self._open[key] = count - 1
        self._by_sessions_open(listener).dec()

    def worker_ended(self, number: int) -> None:
        """
        Inbound worker C{number} exited: its open sessions are gone without
        a C{disconnect} event each.
        """
        for key in [k for k in self._open if k[0] == number]:
            self._by_sessions_open(key[1]).dec(self._open.pop(key))
        # Its successor counts from zero: keep what it counted, drop its gauges.
        last = self._workers.pop(number, None)
        if last is not None:
            self._retired.add(last[0])

    def worker_figures(self, number: int, snapshot: object) -> None:
        """
        Inbound worker C{number}'s L{Measured.snapshot}, sent by its
        L{FigurePusher}: it replaces the worker's previous one. One that
        cannot be read (a bug) is counted in
        C{gsmail_log_events_unreadable} and dropped.
        """
        try:
            self._workers[number] = Measured.from_snapshot(snapshot)
        except ValueError:
            self.unreadable.inc()

    def measured_total(self) -> Measured:
        """This process's measured figures plus every worker's, running and retired."""
        total = Measured()
        total.add(self.measured)
        total.add(self._retired)
        for figures, _ in self._workers.values():
            total.add(figures)
        return total

    def _worker_gauges(self, name: str) -> list[float]:
        return [gauges[name] for _, gauges in self._workers.values() if name in gauges]

    def _queued(self, event: LogEvent) -> None:
        listener = str(event["listener"])
        size = int(event["size"])
        self._by_messages(listener).inc()
        self._by_bytes(listener).inc(size)

    def _delivery(self, event: LogEvent) -> None:
        listener = str(event["listener"])
        status = str(event["status"])
        self._by_recipients(listener, status, reply_class(event.get("dsn", ""))).inc()
        delay = event.get("delay")
        if delay is not None:
            self._by_delay(listener).observe(float(delay))

    def _reject(self, event: LogEvent) -> None:
        dsn = event.get("dsn") or event.get("code", "")
        self._by_rejects(
            str(event["listener"]), str(event.get("stage", "")), reply_class(dsn)
        ).inc()

    def _dsn(self, event: LogEvent) -> None:
        self._by_dsns(str(event["status"])).inc()

    def _tls(self, event: LogEvent) -> None:
        side = "client" if event.get("listener") == "outbound" else "server"
        self._by_tls(side, str(event.get("protocol", ""))).inc()

    # -- measured ------------------------------------------------------------

    def observe_request(self, page: str, result: str, seconds: float) -> None:
        """
        One GroupServer request to C{page} (C{exists}, C{add}, C{relay},
        C{bounce}) that ended with C{result} (the HTTP status, C{timeout} or
        C{error}) after C{seconds}.
        """
        self.measured.observe_request(page, result, seconds)

    def observe_ledger_append(self, seconds: float, records: int) -> None:
        """One ledger append of C{records} records took C{seconds}."""
        self.measured.observe_ledger_append(seconds, records)

    # -- read at scrape time --------------------------------------------------

    def watch_posts(self, client: Any) -> None:
        """
        Export C{client}'s posts in flight and waiting for a slot
        (L{gsmail.groupserver.GroupServerClient}'s C{post_concurrency}),
        plus those of the inbound workers' last snapshots (each has
        C{post_concurrency} slots of its own).
        """

        def read() -> Iterator[Metric]:
            yield GaugeMetricFamily(
                "gsmail_posts_in_flight",
                "Adds and relays sent to GroupServer, awaiting the answer",
                value=client.in_flight_posts + sum(self._worker_gauges("posts_in_flight")),
            )
            yield GaugeMetricFamily(
                "gsmail_posts_waiting",
                "Adds and relays waiting for one of the post_concurrency slots",
                value=client.queued_posts + sum(self._worker_gauges("posts_waiting")),
            )

        self._readings.sources.append(read)

    def watch_ledger(self, ledger: Any) -> None:
        """
        Export the number of keys C{ledger} (a L{gsmail.ledger.PostLedger})
        remembers, or the largest number an inbound worker's last snapshot
        has: every process shares the file and remembers what it wrote and
        what it read back of the others' records, so a sum would count a
        post once per process.
        """

        def read() -> Iterator[Metric]:
            counts = self._worker_gauges("ledger_records")
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

        self._readings.sources.append(read)

    def watch_queue(self, queue: Any) -> None:
        """
        Export the outbound queue's size: messages, pending recipients, and
        the age of the oldest message (0 when empty).
        """

        def read() -> Iterator[Metric]:
            try:
                envelopes = queue.envelopes()
            except Exception:
                return
            pending = sum(len(e.pending()) for e in envelopes)
            oldest = min((e.created for e in envelopes), default=None)
            age = 0.0 if oldest is None else max(0.0, self.clock.seconds() - oldest)
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

        self._readings.sources.append(read)

    def watch_disk(self, directories: dict[str, str]) -> None:
        """
        Export the free space (for an unprivileged user) of each directory:
        C{{"ledger": path, "spool": path, ...}}.
        """

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

        self._readings.sources.append(read)

    # -- exposition ---------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)


def free_bytes(path: str) -> int | None:
    """Bytes available to unprivileged users on C{path}'s file system; C{None}: cannot tell."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class GroupServerProbe:
    """
    Whether GroupServer answers: one group-exists call for C{address} (any
    answer, group or no group, is an answer; a refusal of the token is
    not), at most once per C{ttl} seconds, bounded by C{timeout}; concurrent
    checks share the call.

    @param client: a L{gsmail.groupserver.GroupServerClient}.
    @param clock: the reactor (C{seconds}, C{callLater}).
    """

    def __init__(
        self, client: Any, address: str, clock: Any, ttl: float = 5.0, timeout: float = 5.0
    ) -> None:
        self.client = client
        self.address = address
        self.clock = clock
        self.ttl = ttl
        self.timeout = timeout
        self._checked_at: float | None = None
        self._problem: str | None = None
        self._running: list[Deferred[str | None]] = []

    def check(self) -> Deferred[str | None]:
        """
        Fires with C{None} when GroupServer answered, else a one-line
        problem. Never fails.
        """
        now = self.clock.seconds()
        if self._checked_at is not None and now - self._checked_at < self.ttl:
            return succeed(self._problem)
        d: Deferred[str | None] = Deferred()
        self._running.append(d)
        if len(self._running) == 1:
            self._start()
        return d

    def _start(self) -> None:
        lookup: Deferred[Any] = self.client.lookup_group(self.address, quiet=True)
        lookup.addTimeout(self.timeout, self.clock)

        def answered(_: object) -> None:
            self._done(None)

        def failed(failure: Failure) -> None:
            if failure.check(DeferredTimeout):
                why = f"no answer within {self.timeout:g} s"
            else:
                why = str(failure.value) or type(failure.value).__name__
            self._done(f"groupserver: {self.client!r} does not answer: {why}")

        lookup.addCallbacks(answered, failed)

    def _done(self, problem: str | None) -> None:
        self._checked_at = self.clock.seconds()
        self._problem = problem
        waiting, self._running = self._running, []
        for d in waiting:
            d.callback(problem)


class Readiness:
    """
    The checks of C{/readyz}.

    @param listeners: returns one line per listener that is not up.
    @param probe: the GroupServer check, or C{None}.
    @param writable: C{{"ledger": directory, ...}}: each must be writable.
    @param ledger_ok: returns a problem line when the ledger's last write
        failed, else C{None}.
    @param min_free: the least free space, in bytes, on each of those
        directories' file systems (C{readyz_min_free}); 0 turns it off.
    """

    def __init__(
        self,
        *,
        listeners: Callable[[], Sequence[str]],
        probe: GroupServerProbe | None,
        writable: dict[str, str],
        min_free: int,
        ledger_ok: Callable[[], str | None] = lambda: None,
        metrics: Metrics | None = None,
    ) -> None:
        self.listeners = listeners
        self.probe = probe
        self.writable = writable
        self.min_free = min_free
        self.ledger_ok = ledger_ok
        self.metrics = metrics

    async def problems(self) -> list[str]:
        """Every failed check, one line each; empty when ready."""
        found = list(self.listeners())
        if self.probe is not None:
            problem = await self.probe.check()
            if problem:
                found.append(problem)
        ledger = self.ledger_ok()
        if ledger:
            found.append(ledger)
        for name, path in self.writable.items():
            if not os.access(path, os.W_OK | os.X_OK):
                found.append(f"{name}: {path} is not writable")
                continue
            if self.min_free:
                free = free_bytes(path)
                if free is not None and free < self.min_free:
                    found.append(
                        f"{name}: {free // (1024 * 1024)} MiB free on {path}, below"
                        f" readyz_min_free ({self.min_free // (1024 * 1024)} MiB)"
                    )
        if self.metrics is not None:
            self.metrics.ready.set(0 if found else 1)
        return found


class _Text(Resource):
    isLeaf = True

    def __init__(self, render: Callable[[Request], bytes | int]) -> None:
        super().__init__()
        self._render = render

    def render_GET(self, request: Request) -> bytes | int:
        return self._render(request)

    render_HEAD = render_GET


class HealthResource(Resource):
    """
    The root of the metrics endpoint: C{/metrics} (Prometheus's text
    format), C{/healthz} (200 C{ok} while the reactor answers) and
    C{/readyz} (200 C{ready}, or 503 with one line per failed check).
    """

    def __init__(self, metrics: Metrics, readiness: Readiness | None) -> None:
        super().__init__()
        self.metrics = metrics
        self.readiness = readiness
        self.putChild(b"metrics", _Text(self._metrics))
        self.putChild(b"healthz", _Text(self._healthz))
        self.putChild(b"readyz", _Text(self._readyz))

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _Text(_not_found)

    def render_GET(self, request: Request) -> bytes:
        return _not_found(request)

    def _metrics(self, request: Request) -> bytes | int:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        if self.readiness is None:
            return self.metrics.exposition()
        # The readiness checks first, so gsmail_ready is current (their
        # GroupServer call is cached: one per ttl however often scraped).
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def render(_: object) -> None:
            if not gone:
                request.write(self.metrics.exposition())
                request.finish()

        Deferred.fromCoroutine(self.readiness.problems()).addBoth(render)
        return NOT_DONE_YET

    def _healthz(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"ok\n"

    def _readyz(self, request: Request) -> int:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        if self.readiness is None:
            request.write(b"ready\n")
            request.finish()
            return NOT_DONE_YET
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(problems: list[str]) -> None:
            if gone:
                return
            if problems:
                request.setResponseCode(503)
                body = "".join(f"{p}\n" for p in problems)
            else:
                body = "ready\n"
            request.write(body.encode("utf-8", "replace"))
            request.finish()

        def broken(failure: Failure) -> None:
            if gone:
                return
            request.setResponseCode(503)
            request.write(f"readyz: check failed: {failure.getErrorMessage()}\n".encode())
            request.finish()

        Deferred.fromCoroutine(self.readiness.problems()).addCallbacks(answer, broken)
        return NOT_DONE_YET


def _not_found(request: Request) -> bytes:
    request.setResponseCode(404)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return b"not found: try /metrics, /healthz or /readyz\n"


class MetricsSite(Site):
    """A Site without an access log line per scrape."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def make_site(metrics: Metrics, readiness: Readiness | None) -> MetricsSite:
    """The twisted.web site of C{metrics_endpoint}."""
    return MetricsSite(HealthResource(metrics, readiness))
