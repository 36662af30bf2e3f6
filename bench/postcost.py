"""
What one add-email request costs the GroupServer side, without sockets
(issue 14, item 2): bench/RESULTS.md, "What a post costs GroupServer".

    python bench/postcost.py [--n 500] [--rounds 5]

Captures one add-email request from gsmail and one from the minimal
Twisted+treq peer (bench/peers/twisted_treq.py), each sent the same 4 KB
message by Postfix's smtp-source, as the stand-in read them
(C{standin_server.py --capture}); builds two more by swapping the messages
(gsmail's request with the peer's message, the peer's with gsmail's); then
feeds each C{--n} times to an in-process stand-in's C{Site} over a
C{StringTransport}, in C{--rounds} interleaved rounds, and prints the CPU
per request (C{time.process_time}) with the part of it the post id takes
(the C{email} parser, as GroupServer parses a message). No sockets and no
other process run while it measures, so the figures move much less with the
machine's load than those over TCP; they still move.
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import LIST_ADDRESS, SENDER, TOKEN, load_average, median_range  # noqa: E402
from run import SMTP_SOURCE, StandIn, Target, load_words, log  # noqa: E402
from standin_server import BenchStandIn  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.web import server  # noqa: E402

from gsmail.standin.postid import compute_post_id  # noqa: E402

_MESSAGE = re.compile(rb'name="form\.emailMessage"\r\n\r\n([A-Za-z0-9+/=]+)')


def capture(kind: str, workdir: str) -> bytes:
    """One add-email request from C{kind} (gsmail or twisted), as the stand-in read it."""
    directory = os.path.join(workdir, f"capture-{kind}")
    os.makedirs(directory)
    os.makedirs(os.path.join(workdir, kind))
    standin = StandIn(os.path.join(workdir, kind), ["--capture", directory])
    try:
        target = Target(kind, False, standin, workdir, f"postcost-{kind}", [])
        try:
            subprocess.run(
                [
                    SMTP_SOURCE,
                    *("-s", "1", "-m", "3", "-l", "4096", "-f", SENDER, "-t", LIST_ADDRESS),
                    f"127.0.0.1:{target.port}",
                ],
                capture_output=True,
                timeout=60,
                check=True,
            )
            standin.wait_for(3, timeout=30, idle=5)
        finally:
            target.stop()
    finally:
        standin.stop()
    with open(os.path.join(directory, "add-3.req"), "rb") as f:
        raw = f.read()
    head, body = raw.split(b"\r\n\r\n", 1)
    length = re.search(rb"(?i)content-length: (\d+)", head)
    if length is None or int(length.group(1)) != len(body):
        raise RuntimeError(f"{kind}: the captured read is not one whole request")
    return raw


def message_of(request: bytes) -> bytes:
    """The raw message in an add-email request."""
    found = _MESSAGE.search(request)
    if found is None:
        raise ValueError("no form.emailMessage in the request")
    return base64.b64decode(found.group(1))


def with_message(request: bytes, message: bytes) -> bytes:
    """C{request} with its message replaced by C{message} and its Content-Length fixed."""
    found = _MESSAGE.search(request)
    assert found is not None
    request = request[: found.start(1)] + base64.b64encode(message) + request[found.end(1) :]
    head, body = request.split(b"\r\n\r\n", 1)
    head = re.sub(rb"(?i)content-length: \d+", b"Content-Length: %d" % len(body), head)
    return head + b"\r\n\r\n" + body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="requests replayed per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="gsmail-postcost-")
    try:
        ours, peer = capture("gsmail", workdir), capture("twisted", workdir)
        requests = {
            "gsmail's": ours,
            "the peer's": peer,
            "gsmail's, with the peer's message in it": with_message(ours, message_of(peer)),
            "the peer's, with gsmail's message in it": with_message(peer, message_of(ours)),
        }
        messages = {"gsmail's": message_of(ours), "the peer's": message_of(peer)}
        paths = {}
        for name, message in messages.items():
            paths[name] = os.path.join(workdir, f"{len(paths)}.eml")
            with open(paths[name], "wb") as f:
                f.write(message)

        clock = Clock()
        standin = BenchStandIn(
            os.path.join(workdir, "replay"),
            TOKEN,
            {LIST_ADDRESS: "example"},
            clock=clock,
            reactor=None,
        )
        site = server.Site(standin.resource(), requestFactory=standin.request_factory())

        def replay(raw: bytes) -> float:
            """CPU ms per request, C{args.n} requests on one connection."""
            transport = StringTransport()
            protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
            assert protocol is not None
            protocol.makeConnection(transport)
            gc.collect()
            start = time.process_time()
            for _ in range(args.n):
                protocol.dataReceived(raw)
                clock.advance(0)
            cpu = time.process_time() - start
            answered = transport.value().count(b"HTTP/1.1 200 ")
            if answered != args.n:
                raise RuntimeError(f"{answered} of {args.n} requests answered 200")
            protocol.connectionLost(None)  # type: ignore[arg-type]
            return cpu * 1000 / args.n

        def post_id(path: str) -> float:
            start = time.process_time()
            for _ in range(args.n):
                compute_post_id(path, "example", "site", "Example")
            return (time.process_time() - start) * 1000 / args.n

        load = load_average()
        log(f"replaying, {load_words(load)}")
        cpu: dict[str, list[float]] = {name: [] for name in requests}
        ids: dict[str, list[float]] = {name: [] for name in messages}
        for _ in range(args.rounds):  # interleaved, so drift hits all alike
            for name, raw in requests.items():
                cpu[name].append(replay(raw))
            for name, path in paths.items():
                ids[name].append(post_id(path))
        print(
            f"#### One add-email request at the stand-in, replayed in-process ({args.n} × "
            f"{args.rounds} interleaved rounds; {load_words(load)} at the start)\n"
        )
        print("| request replayed | bytes | stand-in CPU ms/request | of which the post id |")
        print("|---|---|---|---|")
        for name, raw in requests.items():
            ident = median_range(ids[name], 3) if name in ids else ""
            print(f"| {name} | {len(raw):,} | {median_range(cpu[name], 3)} | {ident} |")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
