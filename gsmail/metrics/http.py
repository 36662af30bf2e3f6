# -*- test-case-name: tests.test_metrics -*-
"""
The HTTP endpoint of C{metrics_endpoint}: C{/metrics} (Prometheus's text
format), C{/healthz} and C{/readyz} (L{HealthResource}, L{make_site}).

The exposition is C{prometheus_client.generate_latest} in the reactor
thread (about 0.8 ms for 27 delivery series and the rest), not
C{prometheus_client.twisted.MetricsResource}, which imports the global
reactor and runs a WSGI app in its thread pool.

Not the figures (L{gsmail.metrics}) nor the readiness checks
(L{gsmail.metrics.readiness}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

if TYPE_CHECKING:
    from gsmail.metrics import Metrics
    from gsmail.metrics.readiness import Readiness

__all__ = ["HealthResource", "MetricsSite", "make_site"]


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
