"""
The GroupServer side of the benchmarks: gsmail's own stand-in
(L{gsmail.standin.StandIn}) served in a process of its own, so its work is
not counted against the server under test.

It adds a small control page under C{/_bench/} and records, for every post
the add-email page stores, the post's C{Message-ID} and the time it was
stored (C{time.monotonic()}, which on Linux is one clock for every process,
so the harness can compare it with its own send times).

    python bench/standin_server.py --dir DIR --token TOKEN [--groups example,dev]
        [--domain groups.example.com] [--inline] [--keep]
        [--threads 4] [--post-delay SECONDS]

Prints C{PORT <n>} on standard output once it listens on 127.0.0.1, then
C{CONTROL <n>}: a second port serving only the control pages, so that a
harness polling them does not add to the counts below. Control (on either):

  - C{GET /_bench/stats}: C{{"count": n, "first": t, "last": t, ...}}
    (posts stored since the last reset, times in monotonic seconds), with
    C{requests} per page and the counts of what reached the HTTP server:
    C{connections} accepted, C{reads} (C{dataReceived} calls, one per
    C{recv} that returned data) and C{bytes} read, and the most HTTP
    connections open at once (C{open_peak}) and requests waiting for a
    worker thread at once (C{waiting_peak}) since the last reset;
  - C{GET /_bench/arrivals}: C{[[message_id, t], ...]};
  - C{POST /_bench/reset}: forget the arrivals.

Stored messages are deleted once their Message-ID is read (a benchmark stores
gigabytes otherwise); C{--keep} keeps them. C{--capture DIR} writes the
first add-email requests, as read, into C{DIR} (bench/postcost.py replays
them). Stops on SIGTERM/SIGINT.

A slow GroupServer (bench/burst.py): C{--post-delay S} makes every add-email
request take S seconds more (a real wait on the reactor's clock, inside the
add's transaction: L{gsmail.standin.faults.Faults.delay}), and C{--threads N}
serves at most N requests of the pages at once, the rest waiting in arrival
order, as Zope 2's ZServer hands each request, once read, to one of its
C{zserver-threads} worker threads (default 4, Zope 2's; C{0}: no limit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import DeferredSemaphore
from twisted.protocols import policies
from twisted.web import server
from twisted.web.resource import Resource

# Run from a checkout: the tree's gsmail, not an installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gsmail.standin import StandIn  # noqa: E402
from gsmail.standin.actions import PostRecord  # noqa: E402
from gsmail.standin.faults import Faults  # noqa: E402

reactor: Any = _reactor
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)
#: Bytes read from a stored post to find its Message-ID.
_HEAD = 16 * 1024
#: --capture: the add-email requests written, the first ones after the start.
_CAPTURE_COUNT = 3
#: Zope 2's default number of worker threads (zope.conf C{zserver-threads}:
#: "The default is 4"; ZServer 4.0 made it 2 for Zope 4, which GroupServer
#: does not run on).
ZOPE_THREADS = 4


def _message_id(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(_HEAD)
    head = head.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    found = _MESSAGE_ID.search(head)
    return found.group(1).decode("latin-1") if found else ""


class BenchStandIn(StandIn):
    """
    The stand-in, recording (Message-ID, time stored) per post stored.
    GroupServer (and the stand-in by default) archives a message once per
    post id, which counts the body but not the Message-ID; Postfix's
    smtp-source, the throughput load, sends identical messages, so this
    stand-in stores every add (C{archive_once=False}). The bench's own
    generators send distinct bodies anyway (C{common.make_message}), and
    C{/_bench/reset} also forgets the archive.
    """

    def __init__(
        self, *args: Any, keep: bool = False, archive_once: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, archive_once=archive_once, **kwargs)
        self.arrivals: list[tuple[str, float]] = []
        self._keep = keep

    def post_stored(self, record: PostRecord) -> None:
        stored = time.monotonic()
        # The stand-in's own list of records is private; emptied so that
        # memory stays flat over 100k posts.
        self._posts.clear()
        self.arrivals.append((_message_id(record.path), stored))
        if not self._keep:
            os.unlink(record.path)


class CountingFactory(policies.WrappingFactory):
    """
    Counts what reaches the stand-in's HTTP server: connections accepted,
    reads (C{dataReceived} calls: one per C{recv} that returned data) and
    bytes read. Counts, unlike CPU time, do not move with the machine's load.
    """

    def __init__(self, wrapped: server.Site, capture: str | None = None) -> None:
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self.counts = {"connections": 0, "reads": 0, "bytes": 0, "open_peak": 0}
        self.open = 0
        self._capture = capture
        self._captured = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.counts["connections"] += 1
        return super().buildProtocol(addr)  # type: ignore[no-untyped-call]

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)  # type: ignore[no-untyped-call]
        self.open += 1
        self.counts["open_peak"] = max(self.counts["open_peak"], self.open)

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)  # type: ignore[no-untyped-call]
        self.open -= 1

    def reset(self) -> None:
        """Zero the counts; the peak starts again from the connections open now."""
        for name in self.counts:
            self.counts[name] = 0
        self.counts["open_peak"] = self.open

    def counted(self, data: bytes) -> None:
        self.counts["reads"] += 1
        self.counts["bytes"] += len(data)
        if (
            self._capture
            and self._captured < _CAPTURE_COUNT
            and data.startswith(b"POST /gs-group-messages-add-email.html ")
        ):
            # One read is one whole request for a small post (postcost.py checks).
            self._captured += 1
            with open(os.path.join(self._capture, f"add-{self._captured}.req"), "wb") as f:
                f.write(data)


class _CountingProtocol(policies.ProtocolWrapper):
    factory: CountingFactory

    def dataReceived(self, data: bytes) -> None:
        self.factory.counted(data)
        super().dataReceived(data)  # type: ignore[no-untyped-call]


CountingFactory.protocol = _CountingProtocol


class Root(Resource):
    """
    C{/_bench/...} control pages, everything else to the stand-in, at most
    C{threads} requests at once (0: no limit), as Zope's worker threads.
    """

    isLeaf = True

    def __init__(self, standin: BenchStandIn, threads: int = 0) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._standin = standin
        self.counting: CountingFactory | None = None
        self._pages = standin.resource()
        self._threads = DeferredSemaphore(threads) if threads > 0 else None
        self.waiting_peak = 0

    def _serve_page(self, request: server.Request) -> Any:
        threads = self._threads
        if threads is None:
            return self._pages.render(request)

        def run(_: object) -> None:
            # Released when the answer is written or the client went away.
            request.notifyFinish().addBoth(lambda _: threads.release())
            if self._pages.render(request) != server.NOT_DONE_YET:
                raise RuntimeError("the stand-in answered synchronously")

        threads.acquire().addCallback(run)
        self.waiting_peak = max(self.waiting_peak, len(threads.waiting))
        return server.NOT_DONE_YET

    def render(self, request: server.Request) -> Any:
        path = request.path
        if not path.startswith(b"/_bench/"):
            return self._serve_page(request)
        request.setHeader(b"content-type", b"application/json")
        arrivals = self._standin.arrivals
        if path == b"/_bench/stats":
            body: Any = {
                "count": len(arrivals),
                "first": arrivals[0][1] if arrivals else None,
                "last": arrivals[-1][1] if arrivals else None,
                "requests": dict(self._standin.requests),
                **(self.counting.counts if self.counting else {}),
                "waiting_peak": self.waiting_peak,
            }
        elif path == b"/_bench/arrivals":
            body = arrivals
        elif path == b"/_bench/reset" and request.method == b"POST":
            self._standin.arrivals = []
            self._standin.requests.clear()
            self._standin.forget_archive()
            if self.counting is not None:
                self.counting.reset()
            self.waiting_peak = len(self._threads.waiting) if self._threads else 0
            body = {"ok": True}
        else:
            request.setResponseCode(404)
            body = {"error": "no such control page"}
        return json.dumps(body).encode("ascii")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--groups", default="example,dev")
    parser.add_argument("--domain", default="groups.example.com")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--inline",
        action="store_true",
        help="parse bodies in the reactor thread (faster for small posts)",
    )
    parser.add_argument("--keep", action="store_true", help="keep stored posts")
    parser.add_argument(
        "--capture",
        help="write the first add-email reads (whole requests, as read) into this directory",
    )
    parser.add_argument(
        "--archive-once",
        action="store_true",
        help="archive a post id once, as GroupServer does (bench/chaos.py)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=ZOPE_THREADS,
        help="requests served at once, as Zope's worker threads (0: no limit)",
    )
    parser.add_argument(
        "--post-delay",
        type=float,
        default=0.0,
        help="seconds every add-email request takes beyond its work (GroupServer's time)",
    )
    args = parser.parse_args()
    groups = {f"{g}@{args.domain}": g for g in args.groups.split(",") if g}
    standin = BenchStandIn(
        args.dir,
        args.token,
        groups,
        clock=reactor,
        reactor=None if args.inline else reactor,
        keep=args.keep,
        archive_once=args.archive_once,
    )
    if args.post_delay > 0:
        standin.faults = Faults(delay=args.post_delay, pages=frozenset({"add"}))
    root = Root(standin, args.threads)
    site = server.Site(root, requestFactory=standin.request_factory())
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log
    counting = CountingFactory(site, args.capture)
    root.counting = counting
    port = reactor.listenTCP(args.port, counting, interface="127.0.0.1", backlog=1024)
    print(f"PORT {port.getHost().port}", flush=True)
    control = server.Site(root)
    control.log = lambda request: None  # type: ignore[method-assign]
    print(
        f"CONTROL {reactor.listenTCP(0, control, interface='127.0.0.1').getHost().port}", flush=True
    )
    reactor.run()


if __name__ == "__main__":
    main()
