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

This module is the registry and the counters of log events (L{Metrics});
the other parts are L{gsmail.metrics.measured} (the measured figures and
the workers' snapshots), L{gsmail.metrics.gauges} (what is read at scrape
time), L{gsmail.metrics.readiness} (the checks of C{/readyz}) and
L{gsmail.metrics.http} (C{/metrics}, C{/healthz}, C{/readyz}). Their public
names are importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.logger import ILogObserver, LogEvent
from zope.interface import implementer

from gsmail.metrics.gauges import (
    MeasuredCollector,
    Readings,
    disk_gauge,
    ledger_gauge,
    posts_gauges,
    queue_gauges,
)
from gsmail.metrics.http import HealthResource, MetricsSite, make_site
from gsmail.metrics.measured import (
    LEDGER_BUCKETS,
    PUSH_INTERVAL,
    REQUEST_BUCKETS,
    FigurePusher,
    Measured,
)
from gsmail.metrics.readiness import GroupServerProbe, Readiness

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
    "LEDGER_BUCKETS",
    "PUSH_INTERVAL",
    "REQUEST_BUCKETS",
]

#: Delivery delay buckets: seconds (inbound) to days (outbound retries).
DELAY_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400, 432000)

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
        r.register(MeasuredCollector(self))
        self.ready = Gauge(
            "gsmail_ready", "1 when the readiness checks passed at this scrape, else 0", registry=r
        )
        self._readings = Readings()
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
        self._readings.sources.append(posts_gauges(client, self._worker_gauges))

    def watch_ledger(self, ledger: Any) -> None:
        """
        Export the number of keys C{ledger} (a L{gsmail.ledger.PostLedger})
        remembers, or the largest number an inbound worker's last snapshot
        has: every process shares the file and remembers what it wrote and
        what it read back of the others' records, so a sum would count a
        post once per process.
        """
        self._readings.sources.append(ledger_gauge(ledger, self._worker_gauges))

    def watch_queue(self, queue: Any) -> None:
        """
        Export the outbound queue's size: messages, pending recipients, and
        the age of the oldest message (0 when empty).
        """
        self._readings.sources.append(queue_gauges(queue, self.clock))

    def watch_disk(self, directories: dict[str, str]) -> None:
        """
        Export the free space (for an unprivileged user) of each directory:
        C{{"ledger": path, "spool": path, ...}}.
        """
        self._readings.sources.append(disk_gauge(directories))

    # -- exposition ---------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)
