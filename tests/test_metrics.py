"""
Tests for L{gsmail.metrics}: the log observer, the measured figures, the
scrape-time readings, C{/metrics}, C{/healthz} and C{/readyz}, the options,
and the Grafana dashboard in C{conf/}.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable
from typing import Any

import attrs
from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs, globalLogPublisher, textFileLogObserver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gsmail.check import effective_settings
from gsmail.ledger import Outcome, PostLedger
from gsmail.metrics import (
    METRIC_NAMES,
    PUSH_INTERVAL,
    REQUEST_BUCKETS,
    FigurePusher,
    GroupServerProbe,
    HealthResource,
    Measured,
    Metrics,
    Readiness,
    reply_class,
)
from gsmail.status import GROUPSERVER_UNREACHABLE, GroupServerError
from gsmail.workers import _EventLines
from tests.fakes import InMemory, started
from tests.gsconfig import ConfigFileTestCase
from tests.util import ROOT, make_config


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Every sample of C{metrics}' exposition, parsed with prometheus_client's
    own parser: C{{(name, sorted labels): value}}.
    """
    text = metrics.exposition().decode("utf-8")
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    """One sample's value, or C{None} when it is not exported."""
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def events(metrics: Metrics, items: Iterable[dict[str, Any]]) -> None:
    for item in items:
        metrics.observe(item)


# The events of one inbound message to two recipients, in L{gsmail.maillog}'s schema.
SESSION = [
    {"gsmail_event": "connect", "listener": "smtp", "client": "unknown[192.0.2.1]"},
    {"gsmail_event": "tls", "listener": "smtp", "protocol": "TLSv1.3", "cipher": "X"},
    {
        "gsmail_event": "reject",
        "stage": "RCPT",
        "code": 550,
        "dsn": "5.1.1",
        "listener": "smtp",
        "client": "unknown[192.0.2.1]",
    },
    {
        "gsmail_event": "queued",
        "queue_id": "3F2A9C1E01",
        "sender": "a@example.org",
        "size": 4213,
        "nrcpt": 2,
        "listener": "smtp",
    },
    {
        "gsmail_event": "delivery",
        "queue_id": "3F2A9C1E01",
        "recipient": "dev@groups.example.com",
        "relay": "groupserver",
        "delay": 0.21,
        "dsn": "2.0.0",
        "status": "sent",
        "listener": "smtp",
    },
    {
        "gsmail_event": "delivery",
        "queue_id": "3F2A9C1E01",
        "recipient": "example@groups.example.com",
        "relay": "groupserver",
        "delay": 40.0,
        "dsn": "4.4.7",
        "status": "deferred",
        "listener": "smtp",
    },
    {"gsmail_event": "disconnect", "listener": "smtp", "client": "unknown[192.0.2.1]"},
]


class ObserverTests(SynchronousTestCase):
    """Counting log events that carry C{gsmail_event}."""

    def test_one_session(self) -> None:
        """
        The events of a session become the counters of the schema: sessions,
        open sessions, messages, bytes, recipients by status and class, the
        delay histogram, rejects, TLS sessions.
        """
        metrics = Metrics(Clock())
        events(metrics, SESSION[:4])
        self.assertEqual(value(metrics, "gsmail_sessions_open", listener="smtp"), 1)
        events(metrics, SESSION[4:])
        self.assertEqual(value(metrics, "gsmail_sessions_total", listener="smtp"), 1)
        self.assertEqual(value(metrics, "gsmail_sessions_open", listener="smtp"), 0)
        self.assertEqual(value(metrics, "gsmail_messages_total", listener="smtp"), 1)
        self.assertEqual(value(metrics, "gsmail_bytes_received_total", listener="smtp"), 4213)
        self.assertEqual(
            value(
                metrics,
                "gsmail_recipients_total",
                listener="smtp",
                status="sent",
                **{"class": "2xx"},
            ),
            1,
        )
        self.assertEqual(
            value(
                metrics,
                "gsmail_recipients_total",
                listener="smtp",
                status="deferred",
                **{"class": "4xx"},
            ),
            1,
        )
        self.assertEqual(value(metrics, "gsmail_delivery_delay_seconds_count", listener="smtp"), 2)
        self.assertEqual(
            value(metrics, "gsmail_delivery_delay_seconds_bucket", listener="smtp", le="1.0"), 1
        )
        self.assertEqual(
            value(
                metrics, "gsmail_rejects_total", listener="smtp", stage="RCPT", **{"class": "5xx"}
            ),
            1,
        )
        self.assertEqual(
            value(metrics, "gsmail_tls_sessions_total", side="server", protocol="TLSv1.3"), 1
        )

    def test_outbound_and_dsn(self) -> None:
        """Outbound deliveries, client-side TLS and DSNs are counted apart."""
        metrics = Metrics(Clock())
        events(
            metrics,
            [
                {
                    "gsmail_event": "delivery",
                    "listener": "outbound",
                    "status": "bounced",
                    "dsn": "5.1.1",
                    "delay": 2.0,
                },
                {"gsmail_event": "tls", "listener": "outbound", "protocol": "TLSv1.2"},
                {"gsmail_event": "dsn", "queue_id": "A", "dsn_queue_id": "B", "status": "failed"},
            ],
        )
        self.assertEqual(
            value(
                metrics,
                "gsmail_recipients_total",
                listener="outbound",
                status="bounced",
                **{"class": "5xx"},
            ),
            1,
        )
        self.assertEqual(
            value(metrics, "gsmail_tls_sessions_total", side="client", protocol="TLSv1.2"), 1
        )
        self.assertEqual(value(metrics, "gsmail_dsns_total", status="failed"), 1)

    def test_other_events_ignored(self) -> None:
        """Events without C{gsmail_event}, or with a kind it does not count, change nothing."""
        metrics = Metrics(Clock())
        before = samples(metrics)
        events(
            metrics,
            [
                {"log_format": "hello", "listener": "smtp"},
                {"gsmail_event": "client", "queue_id": "A", "client": "x"},
            ],
        )
        self.assertEqual(samples(metrics), before)

    def test_malformed_event(self) -> None:
        """
        An event missing a field is counted as unreadable; the observer does
        not raise (Twisted would drop it).
        """
        metrics = Metrics(Clock())
        events(metrics, [{"gsmail_event": "queued", "listener": "smtp", "size": "big"}])
        events(metrics, [{"gsmail_event": "connect"}])
        self.assertEqual(value(metrics, "gsmail_log_events_unreadable_total"), 2)
        self.assertIsNone(value(metrics, "gsmail_messages_total", listener="smtp"))

    def test_worker_events(self) -> None:
        """
        Events re-emitted from worker processes (C{gsmail_worker}) are
        counted once each; a worker that exits takes its open sessions with it.
        """
        metrics = Metrics(Clock())
        for worker in (1, 2):
            events(metrics, [{**SESSION[0], "gsmail_worker": worker}])
        events(metrics, [{**SESSION[3], "gsmail_worker": 1}])
        self.assertEqual(value(metrics, "gsmail_sessions_total", listener="smtp"), 2)
        self.assertEqual(value(metrics, "gsmail_sessions_open", listener="smtp"), 2)
        self.assertEqual(value(metrics, "gsmail_messages_total", listener="smtp"), 1)
        metrics.worker_ended(2)
        self.assertEqual(value(metrics, "gsmail_sessions_open", listener="smtp"), 1)
        # A late disconnect of the dead worker does not go below zero.
        events(metrics, [{**SESSION[-1], "gsmail_worker": 2}])
        self.assertEqual(value(metrics, "gsmail_sessions_open", listener="smtp"), 1)

    def test_own_registry(self) -> None:
        """
        Each L{Metrics} counts in its own registry; prometheus_client's
        global registry gets nothing of gsmail's.
        """
        one, two = Metrics(Clock()), Metrics(Clock())
        events(one, SESSION)
        self.assertEqual(value(one, "gsmail_messages_total", listener="smtp"), 1)
        self.assertIsNone(value(two, "gsmail_messages_total", listener="smtp"))
        names = {m.name for m in REGISTRY.collect()}
        self.assertFalse({n for n in names if n.startswith("gsmail_")})

    def test_as_log_observer(self) -> None:
        """Added to the global log publisher, it counts events emitted through a Logger."""
        from twisted.logger import Logger

        metrics = Metrics(Clock())
        globalLogPublisher.addObserver(metrics)
        try:
            Logger().info(
                "connect from {client}", gsmail_event="connect", listener="lmtp", client="x"
            )
        finally:
            globalLogPublisher.removeObserver(metrics)
        self.assertEqual(value(metrics, "gsmail_sessions_total", listener="lmtp"), 1)

    def test_reply_class(self) -> None:
        self.assertEqual(
            [reply_class(x) for x in ("2.0.0", "4.4.7", "5.7.1", 550, "", "x")],
            ["2xx", "4xx", "5xx", "5xx", "other", "other"],
        )


class MeasuredTests(SynchronousTestCase):
    """GroupServer latency, ledger appends, and the scrape-time readings."""

    def test_groupserver_requests(self) -> None:
        """
        Each request to GroupServer is observed by page and HTTP status;
        a quiet lookup (C{/readyz}'s) is measured but not logged.
        """
        env = InMemory(self)
        metrics = Metrics(env.clock)
        env.client.observe_request = metrics.observe_request
        metrics.watch_posts(env.client)
        logged: list[LogEvent] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        d = env.client.lookup_group("example@groups.example.com")
        env.pump()
        self.successResultOf(d)
        d = env.client.lookup_group("nothing@groups.example.com", quiet=True)
        env.pump()
        self.successResultOf(d)
        self.assertEqual(
            value(metrics, "gsmail_groupserver_request_seconds_count", page="exists", result="200"),
            2,
        )
        answered = [e for e in logged if "answered" in e.get("log_format", "")]
        self.assertEqual(len(answered), 1)
        self.assertEqual(value(metrics, "gsmail_posts_in_flight"), 0)
        self.assertEqual(value(metrics, "gsmail_posts_waiting"), 0)

    def test_groupserver_timeout(self) -> None:
        """A request that gets no answer in time is observed as C{timeout}."""
        from twisted.web.resource import Resource
        from twisted.web.server import NOT_DONE_YET

        class Silent(Resource):
            isLeaf = True

            def render(self, request: Any) -> Any:
                return NOT_DONE_YET

        env = InMemory(self, resource=Silent(), response_timeout=5.0)
        metrics = Metrics(env.clock)
        env.client.observe_request = metrics.observe_request
        d = env.client.lookup_group("example@groups.example.com")
        env.pump()
        env.clock.advance(5.0)
        env.pump()
        self.failureResultOf(d, GroupServerError)
        self.assertEqual(
            value(
                metrics, "gsmail_groupserver_request_seconds_count", page="exists", result="timeout"
            ),
            1,
        )
        self.assertEqual(
            value(
                metrics, "gsmail_groupserver_request_seconds_sum", page="exists", result="timeout"
            ),
            5.0,
        )

    def test_ledger(self) -> None:
        """Each ledger append is timed; the records it remembers are read at scrape time."""
        clock = Clock()
        ledger = PostLedger(os.path.join(self.mktemp(), "ledger"), clock=clock)
        metrics = Metrics(clock)
        ledger.observe_append = metrics.observe_ledger_append
        metrics.watch_ledger(ledger)
        os.makedirs(os.path.dirname(ledger.path))
        ledger.open()
        self.addCleanup(ledger.close)
        for n in range(3):
            outcome = self.successResultOf(
                ledger.run(PostLedger.key("post", str(n)), lambda: succeed(None))
            )
            self.assertEqual(outcome, Outcome.DONE)
        self.assertEqual(value(metrics, "gsmail_ledger_records"), 3)
        self.assertEqual(value(metrics, "gsmail_ledger_append_seconds_count"), 3)

    def test_queue(self) -> None:
        """The outbound queue's messages, pending recipients and oldest age, read at scrape time."""

        @attrs.define
        class Recipient:
            state: str

        @attrs.define
        class Envelope:
            created: float
            recipients: list[Recipient]

            def pending(self) -> list[Recipient]:
                return [r for r in self.recipients if r.state == "pending"]

        class Queue:
            def __init__(self) -> None:
                self.queued: list[Envelope] = []

            def envelopes(self) -> list[Envelope]:
                return list(self.queued)

        clock = Clock()
        clock.advance(1000.0)
        queue = Queue()
        metrics = Metrics(clock)
        metrics.watch_queue(queue)
        self.assertEqual(value(metrics, "gsmail_queue_messages"), 0)
        self.assertEqual(value(metrics, "gsmail_queue_oldest_age_seconds"), 0)
        queue.queued = [
            Envelope(400.0, [Recipient("pending"), Recipient("delivered")]),
            Envelope(900.0, [Recipient("pending"), Recipient("pending")]),
        ]
        self.assertEqual(value(metrics, "gsmail_queue_messages"), 2)
        self.assertEqual(value(metrics, "gsmail_queue_recipients"), 3)
        self.assertEqual(value(metrics, "gsmail_queue_oldest_age_seconds"), 600.0)

    def test_disk(self) -> None:
        """Free space per state directory; a directory that is gone is left out."""
        metrics = Metrics(Clock())
        here = os.path.abspath(self.mktemp())
        os.makedirs(here)
        metrics.watch_disk({"spool": here, "ledger": os.path.join(here, "gone")})
        free = value(metrics, "gsmail_disk_free_bytes", directory="spool")
        assert free is not None
        self.assertGreater(free, 0)
        self.assertIsNone(value(metrics, "gsmail_disk_free_bytes", directory="ledger"))


class _Client:
    """A GroupServer client whose lookups the test answers."""

    def __init__(self) -> None:
        self.lookups: list[Deferred[Any]] = []

    def lookup_group(self, address: str, *, quiet: bool = False) -> Deferred[Any]:
        assert quiet
        d: Deferred[Any] = Deferred()
        self.lookups.append(d)
        return d

    def __repr__(self) -> str:
        return "<GroupServerClient url='http://gs.example'>"


class ProbeTests(SynchronousTestCase):
    """L{GroupServerProbe}: cached, shared, bounded."""

    def test_cached_and_shared(self) -> None:
        clock, client = Clock(), _Client()
        probe = GroupServerProbe(client, "x@groups.example.com", clock, ttl=5.0, timeout=3.0)
        first, second = probe.check(), probe.check()
        self.assertEqual(len(client.lookups), 1)
        client.lookups[0].callback(object())
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (None, None))
        clock.advance(4.9)
        self.assertIsNone(self.successResultOf(probe.check()))
        self.assertEqual(len(client.lookups), 1)
        clock.advance(0.1)
        d = probe.check()
        self.assertEqual(len(client.lookups), 2)
        client.lookups[1].errback(GroupServerError(GROUPSERVER_UNREACHABLE, "connection refused"))
        problem = self.successResultOf(d)
        assert problem is not None
        self.assertTrue(problem.startswith("groupserver: "), problem)
        self.assertIn("connection refused", problem)

    def test_timeout(self) -> None:
        clock, client = Clock(), _Client()
        probe = GroupServerProbe(client, "x@groups.example.com", clock, timeout=3.0)
        d = probe.check()
        clock.advance(3.0)
        self.assertIn("no answer within 3 s", self.successResultOf(d) or "")


class Fetch:
    """GETs against a L{HealthResource} in memory (treq's StubTreq)."""

    def __init__(self, resource: HealthResource) -> None:
        self.stub = StubTreq(resource)

    def __call__(self, testcase: SynchronousTestCase, path: str) -> tuple[int, str, str]:
        d = self.stub.get(f"http://metrics.example{path}")
        self.stub.flush()
        response = testcase.successResultOf(d)
        body = testcase.successResultOf(response.content())
        kind = response.headers.getRawHeaders(b"content-type", [b""])[0].decode()
        return response.code, body.decode("utf-8"), kind


class ResourceTests(SynchronousTestCase):
    """C{/metrics}, C{/healthz}, C{/readyz} over HTTP."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.client = _Client()
        self.metrics = Metrics(self.clock)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.down: list[str] = []
        self.readiness = Readiness(
            listeners=lambda: self.down,
            probe=GroupServerProbe(self.client, "x@groups.example.com", self.clock),
            writable={"ledger": self.directory, "spool": self.directory},
            min_free=1,
            metrics=self.metrics,
        )
        self.fetch = Fetch(HealthResource(self.metrics, self.readiness))

    def answer_lookups(self) -> None:
        for d in self.client.lookups:
            if not d.called:
                d.callback(object())

    def test_metrics(self) -> None:
        """
        C{/metrics} is Prometheus's text format, parsed by prometheus_client;
        the readiness checks run first, so C{gsmail_ready} is current.
        """
        events(self.metrics, SESSION)
        d = self.fetch.stub.get("http://metrics.example/metrics")
        self.fetch.stub.flush()
        self.assertNoResult(d)  # waiting for GroupServer
        self.answer_lookups()
        self.fetch.stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        kind = response.headers.getRawHeaders(b"content-type")[0].decode()
        self.assertTrue(kind.startswith("text/plain; version="), kind)
        body = self.successResultOf(response.content()).decode()
        families = {f.name: f for f in text_string_to_metric_families(body)}
        self.assertEqual(families["gsmail_messages"].samples[0].value, 1)
        self.assertEqual(families["gsmail_ready"].samples[0].value, 1)
        # Within the probe's ttl a scrape does not ask GroupServer again.
        self.assertEqual(self.fetch(self, "/metrics")[0], 200)
        self.assertEqual(len(self.client.lookups), 1)
        # Counters and histograms also have a C{_created} gauge in this format.
        self.assertLessEqual({name.removesuffix("_created") for name in families}, METRIC_NAMES)

    def test_healthz(self) -> None:
        self.assertEqual(self.fetch(self, "/healthz")[:2], (200, "ok\n"))

    def test_not_found(self) -> None:
        self.assertEqual(self.fetch(self, "/")[0], 404)
        self.assertEqual(self.fetch(self, "/other")[0], 404)

    def test_ready(self) -> None:
        """All checks pass: 200 C{ready}, and C{gsmail_ready} is 1."""
        d = self.fetch.stub.get("http://metrics.example/readyz")
        self.fetch.stub.flush()
        self.assertNoResult(d)  # waiting for GroupServer
        self.answer_lookups()
        self.fetch.stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.successResultOf(response.content()), b"ready\n")
        self.assertEqual(value(self.metrics, "gsmail_ready"), 1)

    def test_groupserver_down(self) -> None:
        """GroupServer not answering: 503 naming it."""
        d = self.fetch.stub.get("http://metrics.example/readyz")
        self.fetch.stub.flush()
        self.client.lookups[0].errback(GroupServerError(GROUPSERVER_UNREACHABLE, "refused"))
        self.fetch.stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 503)
        body = self.successResultOf(response.content()).decode()
        self.assertRegex(body, r"^groupserver: .* does not answer: .*refused")
        self.assertEqual(value(self.metrics, "gsmail_ready"), 0)

    def test_every_failed_check(self) -> None:
        """A listener down, a directory not writable, too little room: one line each."""
        self.down.append("smtp_endpoint: not listening on tcp:25")
        self.readiness.writable["spool"] = os.path.join(self.directory, "missing")
        self.readiness.min_free = 1 << 62
        d = self.fetch.stub.get("http://metrics.example/readyz")
        self.fetch.stub.flush()
        self.answer_lookups()
        self.fetch.stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 503)
        lines = self.successResultOf(response.content()).decode().splitlines()
        self.assertEqual(lines[0], "smtp_endpoint: not listening on tcp:25")
        self.assertRegex(lines[1], r"^ledger: \d+ MiB free on .*, below readyz_min_free")
        self.assertRegex(lines[2], r"^spool: .*missing is not writable$")
        self.assertEqual(len(lines), 3)

    def test_ledger_write_failed(self) -> None:
        """The ledger's last write failed: not ready."""
        self.readiness.ledger_ok = lambda: "ledger: the last write to /x failed"
        d = self.fetch.stub.get("http://metrics.example/readyz")
        self.fetch.stub.flush()
        self.answer_lookups()
        self.fetch.stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 503)
        self.assertIn(b"ledger: the last write", self.successResultOf(response.content()))


class OptionTests(ConfigFileTestCase):
    """C{metrics_endpoint} and C{readyz_min_free} in the configuration file."""

    def test_defaults(self) -> None:
        config = self.load()
        self.assertEqual((config.metrics_endpoint, config.readyz_min_free), ("", 100 << 20))

    def test_set(self) -> None:
        config = self.load(
            {"metrics_endpoint": "tcp:9101:interface=127.0.0.1", "readyz_min_free": "512"}
        )
        self.assertEqual(config.metrics_endpoint, "tcp:9101:interface=127.0.0.1")
        self.assertEqual(config.readyz_min_free, 512 << 20)
        self.assertEqual(self.load({"readyz_min_free": "0"}).readyz_min_free, 0)

    def test_errors(self) -> None:
        from gsmail.config import ConfigError, load_config

        for options, problem in (
            ({"metrics_endpoint": "9101"}, "metrics_endpoint: expected an endpoint string"),
            ({"readyz_min_free": "-1"}, "readyz_min_free: must be more than 0 MiB"),
            ({"readyz_min_free": "lots"}, "readyz_min_free: expected a number of MiB"),
        ):
            with self.subTest(options=options):
                path = self.write(self.ini(options))
                error = self.assertRaises(ConfigError, load_config, path)
                self.assertIn(problem, str(error))

    def ini(self, options: dict[str, str]) -> str:
        from tests.gsconfig import ini

        return ini(options)

    def test_check_lists_them(self) -> None:
        """C{gsmail-check} lists them as set, the size in MiB."""
        config = make_config(
            self.mktemp(), metrics_endpoint="tcp:9101", readyz_min_free=200 * 1024 * 1024
        )
        lines = effective_settings(config)
        self.assertIn("metrics_endpoint = tcp:9101", lines)
        self.assertIn("readyz_min_free = 200", lines)


class DashboardTests(SynchronousTestCase):
    """C{conf/grafana-gsmail.json}."""

    def test_exprs_name_exported_metrics(self) -> None:
        """
        The dashboard is JSON, and every query names only metrics gsmail
        exports (their families, with Prometheus's suffixes).
        """
        with open(os.path.join(ROOT, "conf", "grafana-gsmail.json"), encoding="utf-8") as f:
            dashboard = json.load(f)
        exprs = [
            target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
        ]
        self.assertGreater(len(exprs), 5)
        suffixes = ("_total", "_bucket", "_sum", "_count")
        used = set()
        for expr in exprs:
            names = re.findall(r"\bgsmail_[a-z_]+", expr)
            self.assertTrue(names, expr)
            for name in names:
                family = name
                for suffix in suffixes:
                    if name.endswith(suffix) and name.removesuffix(suffix) in METRIC_NAMES:
                        family = name.removesuffix(suffix)
                self.assertIn(family, METRIC_NAMES, expr)
                used.add(family)
        self.assertIn("gsmail_groupserver_request_seconds", used)


class CheckTests(SynchronousTestCase):
    """C{gsmail-check} checks C{metrics_endpoint} like the other endpoints."""

    def test_endpoint(self) -> None:
        from gsmail.check import Report, check_endpoints

        for endpoint, expect_ok in (("tcp:9101:interface=127.0.0.1", True), ("tcp:99999", False)):
            with self.subTest(endpoint=endpoint):
                report = Report()
                check_endpoints(make_config(self.mktemp(), metrics_endpoint=endpoint), None, report)
                ok = [line for line in report.ok if line.startswith("metrics_endpoint")]
                problems = [p for p in report.problems if p.startswith("metrics_endpoint")]
                self.assertEqual((bool(ok), bool(problems)), (expect_ok, not expect_ok), report)


class _Posts:
    """A GroupServer client's post gauges, as L{Metrics.watch_posts} reads them."""

    def __init__(self, in_flight: int = 0, waiting: int = 0) -> None:
        self.in_flight_posts = in_flight
        self.queued_posts = waiting


class _Ledger:
    """A ledger that remembers C{count} posts, as L{Metrics.watch_ledger} reads it."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count


def measured(adds: Iterable[float] = (), appends: Iterable[float] = ()) -> Measured:
    """A worker's figures: GroupServer adds (200) and ledger appends of those seconds."""
    figures = Measured()
    for seconds in adds:
        figures.observe_request("add", "200", seconds)
    for seconds in appends:
        figures.observe_ledger_append(seconds, 1)
    return figures


def histogram(metrics: Metrics, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of histogram C{name} (buckets, count, sum)."""
    return {key: v for key, v in samples(metrics).items() if key[0].startswith(name + "_")}


class WorkerFiguresTests(SynchronousTestCase):
    """
    Inbound workers' measured figures: their snapshots, relayed to the main
    process and added to its own at scrape time.
    """

    def setUp(self) -> None:
        self.metrics = Metrics(Clock())
        self.client = _Posts()
        self.ledger = _Ledger(0)
        self.metrics.watch_posts(self.client)
        self.metrics.watch_ledger(self.ledger)
        self.log = io.StringIO()
        self.workers = started(self)
        # The main process's text log (twistd's), where relayed events go.
        self.workers.publisher = textFileLogObserver(self.log)
        self.workers.on_metrics = self.metrics.worker_figures
        self.workers.on_exit = self.metrics.worker_ended

    def push(self, number: int, figures: Measured, **gauges: float) -> None:
        """Worker C{number} sends its snapshot, the way a worker process does."""
        out = io.BytesIO()
        FigurePusher(
            figures, Clock(), lambda s: _EventLines(out).control(metrics=s), gauges.copy
        ).stop()
        self.workers.slots[number - 1].outReceived(out.getvalue())

    def count(self, page: str = "add", result: str = "200") -> float | None:
        return value(
            self.metrics, "gsmail_groupserver_request_seconds_count", page=page, result=result
        )

    def test_round_trip(self) -> None:
        """
        A worker's snapshot, relayed as a line of its standard output, shows
        in the main process's scrape exactly as the same observations made
        in the main process would: every bucket, count and sum; nothing of
        it goes to the text log.
        """
        adds, appends = (0.3, 0.3, 7.0, 500.0), (0.0004, 0.002)
        figures = measured(adds, appends)
        figures.observe_request("exists", "timeout", 5.0)
        self.push(1, figures, posts_in_flight=2, posts_waiting=1, ledger_records=9)
        direct = Metrics(Clock())
        for seconds in adds:
            direct.observe_request("add", "200", seconds)
        for seconds in appends:
            direct.observe_ledger_append(seconds, 1)
        direct.observe_request("exists", "timeout", 5.0)
        for name in ("gsmail_groupserver_request_seconds", "gsmail_ledger_append_seconds"):
            with self.subTest(name=name):
                self.assertEqual(histogram(self.metrics, name), histogram(direct, name))
        # The buckets are prometheus_client's own Histogram's (le inclusive).
        registry = CollectorRegistry()
        reference = Histogram(
            "gsmail_groupserver_request_seconds",
            "",
            ["page", "result"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        for seconds in adds:
            reference.labels("add", "200").observe(seconds)
        expected = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect()
            for s in family.samples
            if s.labels.get("page") == "add" and not s.name.endswith("_created")
        }
        found = histogram(self.metrics, "gsmail_groupserver_request_seconds")
        self.assertEqual({k: v for k, v in found.items() if ("page", "add") in k[1]}, expected)
        self.assertEqual(self.count(), 4)
        self.assertEqual(
            value(
                self.metrics,
                "gsmail_groupserver_request_seconds_bucket",
                page="add",
                result="200",
                le="0.5",
            ),
            2,
        )
        self.assertEqual(value(self.metrics, "gsmail_posts_in_flight"), 2)
        self.assertEqual(value(self.metrics, "gsmail_posts_waiting"), 1)
        self.assertEqual(value(self.metrics, "gsmail_ledger_records"), 9)
        self.assertEqual(self.log.getvalue(), "")
        self.assertEqual(value(self.metrics, "gsmail_log_events_unreadable_total"), 0)

    def test_summed(self) -> None:
        """
        Histograms and post gauges are the main process's plus every
        worker's; ledger records the largest any process remembers (they
        share one file).
        """
        self.metrics.observe_request("add", "200", 0.1)
        self.metrics.observe_ledger_append(0.001, 1)
        self.client.in_flight_posts, self.ledger.count = 1, 4
        self.push(1, measured([0.2, 0.2], [0.001]), posts_in_flight=2, ledger_records=7)
        self.push(2, measured([0.3, 0.3, 0.3]), posts_in_flight=3, posts_waiting=5)
        self.assertEqual(self.count(), 6)
        sum_ = value(
            self.metrics, "gsmail_groupserver_request_seconds_sum", page="add", result="200"
        )
        self.assertAlmostEqual(sum_ or 0, 1.4)
        self.assertEqual(value(self.metrics, "gsmail_ledger_append_seconds_count"), 2)
        self.assertEqual(value(self.metrics, "gsmail_posts_in_flight"), 6)
        self.assertEqual(value(self.metrics, "gsmail_posts_waiting"), 5)
        self.assertEqual(value(self.metrics, "gsmail_ledger_records"), 7)

    def test_snapshot_replaces_the_last(self) -> None:
        """Snapshots are cumulative: a worker's next one replaces its last, it is not added."""
        figures = measured([0.2, 0.2])
        self.push(1, figures, posts_in_flight=4)
        self.assertEqual(self.count(), 2)
        figures.observe_request("add", "200", 0.2)
        self.push(1, figures, posts_in_flight=0)
        self.assertEqual(self.count(), 3)
        self.assertEqual(value(self.metrics, "gsmail_posts_in_flight"), 0)

    def test_restarted_worker_monotonic(self) -> None:
        """
        When a worker exits, its last figures stay in the totals and its
        successor's, counted from zero, add to them: no count goes down.
        Its gauges go with it.
        """
        self.push(1, measured([0.2] * 5, [0.001] * 2), posts_in_flight=3)
        self.push(2, measured([0.2]))
        self.assertEqual(self.count(), 6)
        with capturedLogs():
            self.workers.slots[0].processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(self.count(), 6)
        self.assertEqual(value(self.metrics, "gsmail_ledger_append_seconds_count"), 2)
        self.assertEqual(value(self.metrics, "gsmail_posts_in_flight"), 0)
        self.workers.clock.advance(1.0)  # its successor starts
        self.assertEqual(len(self.workers.spawned), 3)
        self.push(1, measured([0.2]), posts_in_flight=1)
        self.assertEqual(self.count(), 7)
        self.assertEqual(value(self.metrics, "gsmail_ledger_append_seconds_count"), 2)
        self.assertEqual(value(self.metrics, "gsmail_posts_in_flight"), 1)

    def test_unreadable_snapshot(self) -> None:
        """
        A snapshot that cannot be read (a bug: buckets of another size, not
        counts) is counted as unreadable and dropped; the worker's last good
        one stays.
        """
        self.push(1, measured([0.2]))
        good = measured([0.2, 0.2]).snapshot()
        bad = [
            {**good, "requests": [["add", "200", [1, 2], 0.4]]},
            {**good, "requests": [["add", "200", [-1] * (len(REQUEST_BUCKETS) + 1), 0.4]]},
            {**good, "ledger_append": None},
            {**good, "gauges": []},
            ["not", "a", "snapshot"],
        ]
        for n, snapshot in enumerate(bad, 1):
            with self.subTest(snapshot=snapshot):
                line = json.dumps({"metrics": snapshot}).encode() + b"\n"
                self.workers.slots[0].outReceived(line)
                self.assertEqual(value(self.metrics, "gsmail_log_events_unreadable_total"), n)
                self.assertEqual(self.count(), 1)
        self.assertEqual(self.log.getvalue(), "")


class FigurePusherTests(SynchronousTestCase):
    """The worker side: when snapshots are sent."""

    def test_only_when_changed(self) -> None:
        """
        A snapshot at start, then one every L{PUSH_INTERVAL} seconds only
        if the figures or gauges changed, and a last one at stop (if they
        changed); none after.
        """
        clock = Clock()
        figures = Measured()
        gauges = {"posts_in_flight": 0.0}
        sent: list[dict[str, Any]] = []
        pusher = FigurePusher(figures, clock, sent.append, gauges.copy)
        pusher.start()
        self.assertEqual(len(sent), 1)
        clock.advance(PUSH_INTERVAL)
        self.assertEqual(len(sent), 1)  # nothing changed
        figures.observe_request("add", "200", 0.1)
        clock.advance(PUSH_INTERVAL - 0.5)
        self.assertEqual(len(sent), 1)
        clock.advance(0.5)
        self.assertEqual(len(sent), 2)
        gauges["posts_in_flight"] = 1.0
        clock.advance(PUSH_INTERVAL)
        self.assertEqual(len(sent), 3)
        self.assertEqual(sent[-1]["gauges"], {"posts_in_flight": 1.0})
        figures.observe_ledger_append(0.01, 3)
        pusher.stop()
        self.assertEqual(len(sent), 4)
        self.assertEqual(sum(sent[-1]["ledger_append"][0]), 1)
        self.assertEqual(clock.getDelayedCalls(), [])
        pusher.stop()
        self.assertEqual(len(sent), 4)
