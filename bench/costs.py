"""
What each of gsmail's guarantees costs per inbound message, in CPU, measured
piece by piece in one process (issue 14: "speed with every guarantee on").

The end-to-end benchmark (bench/run.py, case 1) gives gsmail's CPU per
message against the minimal Twisted peer's, which keeps no ledger, no spool,
no log and no trace fields. This script says where the difference goes, with
the real code of each piece and no network, so its figures move far less with
the machine's other load than an end-to-end run does:

  - ledger: C{PostLedger.run} of one post whose action succeeds at once,
    with the daemon's hand-off thread (L{gsmail.handoff.SerialThread}) and
    group commit, at 1, 4 and 20 posts at once (posts finishing together
    share an fsync; bench/run.py's case 1 sees about 1.7 per fsync); and
    one 85-byte append + fsync alone, the floor under it;
  - log: the five mail log lines of one message (connect, client=, queued,
    delivery, disconnect) through gsmail's text log observer to a file;
  - spool: a 4 KB message written, finished (digest, Message-ID) and given
    back;
  - trace fields: Return-Path, Received and X-Original-To for one recipient;
  - status page: reading the add page's answer (the stand-in's success page).

CPU is the process's (C{time.process_time}: every thread, user and system,
so the fsync's kernel time and the hand-off thread count). Rounds are
interleaved (every piece once per round); the table gives the median and the
min–max of the rounds. Work and state go to a temporary directory under
C{--dir} (default: the system's temporary directory; give the file system
gsmail's state is on).

    python bench/costs.py [--rounds 5] [--n 2000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import load_average, make_message, median_range, new_message_id  # noqa: E402
from twisted.internet import defer, reactor  # noqa: E402
from twisted.logger import globalLogBeginner  # noqa: E402
from twisted.python.logfile import LogFile  # noqa: E402

from gsmail import maillog  # noqa: E402
from gsmail.addresses import Address  # noqa: E402
from gsmail.answers import read_status  # noqa: E402
from gsmail.handoff import SerialThread  # noqa: E402
from gsmail.inbound.delivery import trace_fields  # noqa: E402
from gsmail.inbound.protocol import Envelope, Session  # noqa: E402
from gsmail.inbound.spool import Spool, SpoolFiles, release  # noqa: E402
from gsmail.ledger import PostLedger  # noqa: E402
from gsmail.textlog import TextLogObserver  # noqa: E402

#: Seconds one piece may take in one round before it stops early.
TIME_LIMIT = 30.0


class Pieces:
    """The pieces, each a coroutine measuring C{n} operations: (CPU seconds, count)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.sync = SerialThread(reactor, "bench-ledger")
        self.rounds = 0
        log = TextLogObserver(LogFile("gsmail.log", root))  # type: ignore[arg-type]
        globalLogBeginner.beginLoggingTo([log], redirectStandardIO=False, discardBuffer=True)
        self.spool_dir = os.path.join(root, "spool")
        os.makedirs(self.spool_dir)
        self.spool_files = SpoolFiles(self.spool_dir)
        self.message = make_message(new_message_id(), 4096).replace(b"\r\n", b"\n")
        self.session = Session(peer="[192.0.2.1]", protocol_name="ESMTP", helo="mx.example.org")
        self.envelope = Envelope(sender=Address("sender", "example.org"), queue_id="3F2A9C01B7")
        self.page = _success_page()

    async def ledger(self, n: int, concurrency: int) -> tuple[float, int]:
        self.rounds += 1
        path = os.path.join(self.root, f"ledger-{concurrency}-{self.rounds}", "ledger")
        ledger = PostLedger(path, ttl=86400, clock=reactor, sync=self.sync)
        ledger.open()
        done = [0]
        deadline = time.monotonic() + TIME_LIMIT

        async def poster(first: int) -> None:
            for i in range(first, n, concurrency):
                if time.monotonic() > deadline:
                    return
                key = PostLedger.key("group", f"<{i}.{self.rounds}@bench>")
                await ledger.run(key, lambda: defer.succeed(None))
                done[0] += 1

        start = time.process_time()
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(poster(i)) for i in range(concurrency)]
        )
        cpu = time.process_time() - start
        await ledger.close()
        return cpu, done[0]

    async def fsync(self, n: int) -> tuple[float, int]:
        path = os.path.join(self.root, "fsync")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        record = b"%.6f D %s\n" % (time.time(), b"0" * 64)
        count = max(1, n // 4)
        start = time.process_time()
        try:
            for _ in range(count):
                os.write(fd, record)
                os.fsync(fd)
        finally:
            os.close(fd)
        return time.process_time() - start, count

    async def log(self, n: int) -> tuple[float, int]:
        client = "unknown[192.0.2.1]"
        start = time.process_time()
        for _ in range(n):
            maillog.connect("smtp", client)
            maillog.client("3F2A9C01B7", client)
            maillog.queued("3F2A9C01B7", "sender@example.org", 4200, 1, "smtp", message_id="<x@y>")
            maillog.delivery(
                "3F2A9C01B7",
                "example@groups.example.com",
                "groupserver",
                0.05,
                "0/0/0.05",
                "2.0.0",
                "sent",
                "Added to the group example",
                "smtp",
                group="example",
            )
            maillog.disconnect("smtp", client, "ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5")
        return time.process_time() - start, n

    async def spool(self, n: int) -> tuple[float, int]:
        start = time.process_time()
        for _ in range(n):
            spool = Spool(self.spool_dir, self.spool_files)
            spool.write(self.message)
            release(spool.finish())
        return time.process_time() - start, n

    async def trace(self, n: int) -> tuple[float, int]:
        rcpt = Address("example", "groups.example.com")
        now = time.time()
        start = time.process_time()
        for i in range(n):
            trace_fields(self.session, self.envelope, rcpt, "gs.example.com", now + i * 0.001)
        return time.process_time() - start, n

    async def status(self, n: int) -> tuple[float, int]:
        start = time.process_time()
        for _ in range(n):
            read_status(self.page)
        return time.process_time() - start, n


def _success_page() -> bytes:
    """The stand-in's answer to a successful add (the whole form page again, status Done)."""
    from gsmail.standin import pages

    page = pages.form_page(
        "add",
        pages.SiteInfo("Example", "support@groups.example.com"),
        pages.PageURL(
            "http://gs.example.com/gs-group-messages-add-email.html",
            "http://gs.example.com/",
            "/gs-group-messages-add-email.html",
            "/",
        ),
        status="Done",
    )
    return b"".join(p if isinstance(p, bytes) else str(p).encode() for p in page)


async def measure(args: argparse.Namespace) -> None:
    root = tempfile.mkdtemp(prefix="gsmail-costs-", dir=args.dir)
    try:
        pieces = Pieces(root)
        cases: list[tuple[str, Callable[[], defer.Deferred[tuple[float, int]]]]] = [
            ("ledger, 1 post at a time", lambda: _d(pieces.ledger(args.n, 1))),
            ("ledger, 4 posts at once", lambda: _d(pieces.ledger(args.n, 4))),
            ("ledger, 20 posts at once", lambda: _d(pieces.ledger(args.n, 20))),
            ("one append + fsync alone", lambda: _d(pieces.fsync(args.n))),
            ("log: five lines", lambda: _d(pieces.log(args.n))),
            ("spool: 4 KB message", lambda: _d(pieces.spool(args.n))),
            ("trace fields", lambda: _d(pieces.trace(args.n))),
            ("status page read", lambda: _d(pieces.status(args.n))),
        ]
        results: dict[str, list[float]] = {name: [] for name, _ in cases}
        print(
            f"load average {' '.join(f'{x:.2f}' for x in load_average())};"
            f" {args.rounds} rounds of {args.n} operations, state in {args.dir or tempfile.gettempdir()}",
            flush=True,
        )
        for _ in range(args.rounds):
            for name, run in cases:
                cpu, count = await run()
                results[name].append(1e6 * cpu / max(1, count))
        print()
        print("| piece, per message | CPU µs median (min–max) |")
        print("|---|---|")
        for name, values in results.items():
            print(f"| {name} | {median_range(values, 1)} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _d(coroutine: object) -> defer.Deferred[tuple[float, int]]:
    return defer.Deferred.fromCoroutine(coroutine)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=2000, help="operations per piece per round")
    parser.add_argument("--dir", default=None, help="where the state goes (a temporary directory)")
    args = parser.parse_args()
    failures: list[BaseException] = []

    def run() -> None:
        d = defer.Deferred.fromCoroutine(measure(args))
        d.addErrback(lambda f: failures.append(f.value))
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(run)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if failures:
        raise failures[0]


if __name__ == "__main__":
    main()
