"""
The benchmark stand-in's model of Zope's worker threads
(bench/standin_server.py C{--threads}), which bench/burst.py's figures rest on.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
)

from standin_server import Root  # noqa: E402


class _Pages(Resource):
    """GroupServer's pages as the stand-in serves them: answered later."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.started: list[DummyRequest] = []

    def render(self, request: Any) -> Any:
        self.started.append(request)
        return server.NOT_DONE_YET


class _StandIn:
    """What Root asks of the stand-in."""

    def __init__(self) -> None:
        self.pages = _Pages()
        self.arrivals: list[tuple[str, float]] = []
        self.requests: dict[str, int] = {}

    def resource(self) -> _Pages:
        return self.pages


def _request(path: bytes) -> DummyRequest:
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.path = path
    return request


class ZopeThreadsTests(TestCase):
    def setUp(self) -> None:
        self.standin = _StandIn()

    def post(self, root: Root) -> DummyRequest:
        request = _request(b"/example/gs-group-messages-add-email.html")
        self.assertEqual(root.render(request), server.NOT_DONE_YET)
        return request

    def stats(self, root: Root) -> dict[str, Any]:
        request = _request(b"/_bench/stats")
        return dict(json.loads(root.render(request)))

    def test_requests_wait_for_a_thread(self) -> None:
        """
        With 2 threads a third request is served only once one of the first
        two has been answered, and the stats count it as waiting.
        """
        root = Root(self.standin, threads=2)  # type: ignore[arg-type]
        first, second, third = (self.post(root) for _ in range(3))
        self.assertEqual(self.standin.pages.started, [first, second])
        self.assertEqual(self.stats(root)["waiting_peak"], 1)
        first.finish()
        self.assertEqual(self.standin.pages.started, [first, second, third])

    def test_client_gone_frees_the_thread(self) -> None:
        """A request whose client went away frees its thread, as when answered."""
        root = Root(self.standin, threads=1)  # type: ignore[arg-type]
        first, second = self.post(root), self.post(root)
        self.assertEqual(self.standin.pages.started, [first])
        first.processingFailed(Failure(ConnectionError("gone")))
        self.assertEqual(self.standin.pages.started, [first, second])

    def test_no_limit(self) -> None:
        """C{--threads 0}: every request is served at once, none waits."""
        root = Root(self.standin, threads=0)  # type: ignore[arg-type]
        posted = [self.post(root) for _ in range(10)]
        self.assertEqual(self.standin.pages.started, posted)
        self.assertEqual(self.stats(root)["waiting_peak"], 0)
