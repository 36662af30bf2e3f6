"""
The post ledger's record store: the append-only file gsmail uses against a
prototype on sqlite3 (issue 15, "should the record store be sqlite3?"), and
the cost of one C{PostLedger.run()}. Figures: docs/architecture.md, "The
ledger's record store: file or sqlite3".

    python bench/ledger.py [--dir DIR] [--shm DIR] [--tree DIR] [--only NAME ...]

Prints one table. For both stores:

  - C{append}: per-record latency (call to outcome), p50/p99, of 20 posts
    started at once, 100 rounds, with the record fsynced in a thread of its
    own (group commit: the daemon's C{gsmail.handoff.SerialThread});
  - C{open}: opening a ledger of 100,000 live records with C{preload}
    (parsed into a dict; the sqlite store has nothing to parse: it opens the
    database, and C{open+dict} also reads every row into a dict), median of 3;
  - C{smtp2gs}: what a pipe process does with that ledger: open it without
    C{preload}, post one new message, close it (median of 5);
  - C{catch-up}: what a second process pays per C{run()} to see the record
    the first one just appended (C{PostLedger.state()}: catch-up and look-up;
    sqlite: one indexed SELECT), median over 2,000;
  - C{lines}: lines of code (no blank lines, comments or docstrings) of the
    record store: gsmail/ledger/store.py and ledger/file.py (or the whole of
    gsmail/ledger/__init__.py in a tree before the split), and the prototype class.

Then, for the file store only, C{run loop}: the CPU time per C{run()} of 10,000
new keys in a row in one process, inline C{sync}, on C{--shm} (tmpfs, where
fsync costs nothing, so the reactor thread's own work shows), and how many
times each call C{stat}s the ledger file. C{--tree} measures another
checkout's gsmail (e.g. one exported before a change) with the same script.

The sqlite prototype (L{SqliteLedger}) keeps what the file store guarantees
where this script measures it: a record is committed (WAL,
C{synchronous=FULL}) before the outcome fires, concurrent calls of one key
share one action, and claims across processes are the same byte-range OFD
locks. It lacks what the file store does on failures (a full disk, a file
removed or replaced by hand) and expiry beyond one DELETE at open.
"""

from __future__ import annotations

import argparse
import ast
import fcntl
import io
import os
import shutil
import sqlite3
import statistics
import struct
import sys
import tempfile
import time
import tokenize
from collections.abc import Callable, Coroutine
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ROUNDS = 100
CONCURRENT = 20
OPEN_RECORDS = 100_000
CATCH_UP_CALLS = 2_000
LOOP_KEYS = 10_000
TTL = 7 * 86400.0


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where files go (a disk)")
    parser.add_argument("--shm", default="/dev/shm", help="tmpfs for the run loop")
    parser.add_argument("--tree", default=ROOT, help="the checkout whose gsmail is measured")
    parser.add_argument(
        "--only",
        nargs="*",
        choices=["append", "open", "one", "catchup", "lines", "loop"],
        help="measure only these",
    )
    return parser.parse_args()


ARGS = _args() if __name__ == "__main__" else None
sys.path.insert(0, ARGS.tree if ARGS is not None else ROOT)

from twisted.internet.defer import Deferred, gatherResults, succeed  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

import gsmail  # noqa: E402
from gsmail.handoff import SerialThread  # noqa: E402
from gsmail.ledger import Outcome, PostLedger  # noqa: E402

Sync = Callable[[Callable[[], None]], "Deferred[None]"]


# -- the prototype ---------------------------------------------------------------


class SqliteLedger:
    """
    A C{PostLedger} whose record store is sqlite3: one table key -> time,
    WAL, C{synchronous=FULL}; the claims still by OFD byte-range locks.
    """

    def __init__(self, path: str, *, clock: Any, sync: Sync, ttl: float = TTL) -> None:
        self.path = path
        self._clock = clock
        self._sync = sync
        self._ttl = ttl
        self._flights: dict[bytes, list[Deferred[Outcome]]] = {}
        self._pending: list[tuple[bytes, float, Deferred[None]]] = []
        self._writing = False

    def open(self, preload: bool = False) -> None:
        self._writer = self._connect(check_same_thread=False)  # used in sync jobs only
        self._writer.execute(
            "CREATE TABLE IF NOT EXISTS posted (key BLOB PRIMARY KEY, time REAL NOT NULL)"
            " WITHOUT ROWID"
        )
        self._writer.execute("DELETE FROM posted WHERE time < ?", (self._cutoff(),))
        self._reader = self._connect(check_same_thread=True)
        self._claims = os.open(self.path + ".claims", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if preload:  # not needed: look-ups go to the index
            self.preloaded = dict(self._reader.execute("SELECT key, time FROM posted"))

    def _connect(self, check_same_thread: bool) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=check_same_thread)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=10000")
        return db

    def close(self) -> None:
        self._reader.close()
        self._writer.close()
        os.close(self._claims)

    def _cutoff(self) -> float:
        return float(self._clock.seconds() - self._ttl)

    def state(self, key: bytes) -> Outcome | None:
        row = self._reader.execute(
            "SELECT 1 FROM posted WHERE key = ? AND time >= ?", (key, self._cutoff())
        ).fetchone()
        return None if row is None else Outcome.DUPLICATE

    def run(self, key: bytes, action: Callable[[], Deferred[Any]]) -> Deferred[Outcome]:
        d: Deferred[Outcome] = Deferred()
        waiters = self._flights.get(key)
        if waiters is not None:
            waiters.append(d)
            return d
        self._flights[key] = [d]
        Deferred.fromCoroutine(self._perform(key, action))
        return d

    async def _perform(self, key: bytes, action: Callable[[], Deferred[Any]]) -> None:
        offset = int.from_bytes(key[:7], "big")
        while not self._lock(fcntl.F_WRLCK, offset):
            await _sleep(self._clock, 0.05)
        result: Any
        try:
            result = self.state(key)
            if result is None:
                await action()
                d: Deferred[None] = Deferred()
                self._pending.append((key, self._clock.seconds(), d))
                self._start_writing()
                await d
                result = Outcome.DONE
        except Exception:
            result = Failure()
        finally:
            self._lock(fcntl.F_UNLCK, offset)
        for waiter in self._flights.pop(key):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _lock(self, kind: int, offset: int) -> bool:
        lock = struct.pack("hhqqi4x", kind, os.SEEK_SET, offset, 1, 0)
        try:
            fcntl.fcntl(self._claims, getattr(fcntl, "F_OFD_SETLK", fcntl.F_SETLK), lock)
        except (BlockingIOError, PermissionError):
            return False
        return True

    def _start_writing(self) -> None:
        if not self._writing and self._pending:
            self._writing = True
            Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            rows = [(key, stamp) for key, stamp, _ in batch]

            def job(rows: list[tuple[bytes, float]] = rows) -> None:
                self._writer.execute("BEGIN IMMEDIATE")
                self._writer.executemany("INSERT OR REPLACE INTO posted VALUES (?, ?)", rows)
                self._writer.execute("COMMIT")

            await self._sync(job)
            for _, _, d in batch:
                d.callback(None)
        self._writing = False


def _sleep(clock: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    clock.callLater(seconds, d.callback, None)
    return d


# -- measuring --------------------------------------------------------------------


def _key(i: int, tag: str = "k") -> bytes:
    return PostLedger.key("bench", tag, str(i))


def _instant() -> Deferred[None]:
    return succeed(None)


def _fresh(base: str, name: str) -> str:
    directory = tempfile.mkdtemp(prefix=f"ledger-{name}-", dir=base)
    return os.path.join(directory, "ledger")


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _in_reactor(main: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    """Run C{main(reactor)} in a real reactor; return its result."""
    from twisted.internet import reactor

    result: list[Any] = []

    def start() -> None:
        d = Deferred.fromCoroutine(main(reactor))
        d.addBoth(result.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if isinstance(result[0], BaseException) or hasattr(result[0], "raiseException"):
        result[0].raiseException()
    return result[0]


def measure_append(base: str) -> dict[str, list[float]]:
    """
    Per-record latency, seconds, of both stores: 20 posts at once, 100
    rounds, the two stores taking turns so that both see the same load.
    """

    async def main(reactor: Any) -> dict[str, list[float]]:
        ledgers: dict[str, Any] = {}
        serials: dict[str, SerialThread] = {}
        for name in ("file", "sqlite"):
            serials[name] = SerialThread(reactor, f"bench-{name}")
            path = _fresh(base, name)
            if name == "file":
                ledgers[name] = PostLedger(path, clock=reactor, sync=serials[name])
            else:
                ledgers[name] = SqliteLedger(path, clock=reactor, sync=serials[name])
            ledgers[name].open()
        out: dict[str, list[float]] = {name: [] for name in ledgers}

        def timed(name: str, key: bytes) -> Deferred[None]:
            started = time.perf_counter()

            def done(outcome: Outcome) -> None:
                assert outcome is Outcome.DONE, outcome
                out[name].append(time.perf_counter() - started)

            d: Deferred[None] = ledgers[name].run(key, _instant).addCallback(done)
            return d

        for r in range(ROUNDS):
            for name in ("file", "sqlite") if r % 2 else ("sqlite", "file"):
                keys = [_key(r * CONCURRENT + i, name) for i in range(CONCURRENT)]
                await gatherResults([timed(name, key) for key in keys])
        for name, ledger in ledgers.items():
            if name == "file":
                await ledger.close()
            else:
                ledger.close()
            serials[name].stop()
            shutil.rmtree(os.path.dirname(ledger.path))
        return out

    result: dict[str, list[float]] = _in_reactor(main)
    return result


def _record_lines(count: int, now: float) -> bytes:
    return b"".join(
        b"%.6f D %s\n" % (now - count + i, _key(i, "open").hex().encode()) for i in range(count)
    )


def measure_open(base: str) -> dict[str, float]:
    """Seconds to open a ledger of 100,000 live records, median of 3."""
    clock = Clock()
    clock.advance(time.time())
    now = clock.seconds()
    out: dict[str, float] = {}
    path = _fresh(base, "open-file")
    with open(path, "wb") as f:
        f.write(_record_lines(OPEN_RECORDS, now))
    times = []
    for _ in range(3):
        ledger = PostLedger(path, clock=clock, preload=True)
        started = time.perf_counter()
        ledger.open()
        times.append(time.perf_counter() - started)
        assert len(ledger) == OPEN_RECORDS
        ledger.close()
    out["file"] = statistics.median(times)
    shutil.rmtree(os.path.dirname(path))

    path = _fresh(base, "open-sqlite")
    _sqlite_ledger(path, now)
    for preload, label in ((False, "sqlite"), (True, "sqlite+dict")):
        times = []
        for _ in range(3):
            sq = SqliteLedger(path, clock=clock, sync=_inline)
            started = time.perf_counter()
            sq.open(preload=preload)
            sq.state(_key(7, "open"))
            times.append(time.perf_counter() - started)
            sq.close()
        out[label] = statistics.median(times)
    shutil.rmtree(os.path.dirname(path))
    return out


def _inline(job: Callable[[], None]) -> Deferred[None]:
    job()
    return succeed(None)


def measure_catch_up(base: str) -> dict[str, float]:
    """
    Seconds per look of a second process at the key the first one just
    recorded (median over 2,000, the two stores taking turns).
    """
    clock = Clock()
    clock.advance(time.time())
    pairs: dict[str, tuple[Any, Any]] = {}
    for name in ("file", "sqlite"):
        path = _fresh(base, f"catchup-{name}")
        if name == "file":
            pairs[name] = (PostLedger(path, clock=clock), PostLedger(path, clock=clock))
        else:
            pairs[name] = (
                SqliteLedger(path, clock=clock, sync=_inline),
                SqliteLedger(path, clock=clock, sync=_inline),
            )
        for ledger in pairs[name]:
            ledger.open()
    times: dict[str, list[float]] = {name: [] for name in pairs}
    for i in range(CATCH_UP_CALLS):
        for name, (first, second) in pairs.items():
            key = _key(i, "catchup")
            first.run(key, _instant)
            started = time.perf_counter()
            outcome = second.state(key)
            times[name].append(time.perf_counter() - started)
            assert outcome is Outcome.DUPLICATE, outcome
    for first, second in pairs.values():
        first.close()
        second.close()
        shutil.rmtree(os.path.dirname(first.path))
    return {name: statistics.median(t) for name, t in times.items()}


def measure_one_post(base: str) -> dict[str, float]:
    """
    Seconds for what a pipe process (smtp2gs) does with a ledger of 100,000
    live records: open it without C{preload}, post one new message, close
    it (median of 5, the stores taking turns).
    """
    clock = Clock()
    clock.advance(time.time())
    now = clock.seconds()
    paths = {"file": _fresh(base, "one-file"), "sqlite": _fresh(base, "one-sqlite")}
    with open(paths["file"], "wb") as f:
        f.write(_record_lines(OPEN_RECORDS, now))
    _sqlite_ledger(paths["sqlite"], now)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(5):
        for name, path in paths.items():
            key = _key(r, "one")
            started = time.perf_counter()
            if name == "file":
                ledger = PostLedger(path, clock=clock, preload=False)
                ledger.open()
                ledger.run(key, _instant)
                ledger.close()
            else:
                sq = SqliteLedger(path, clock=clock, sync=_inline)
                sq.open()
                sq.run(key, _instant)
                sq.close()
            times[name].append(time.perf_counter() - started)
    for path in paths.values():
        shutil.rmtree(os.path.dirname(path))
    return {name: statistics.median(t) for name, t in times.items()}


def _sqlite_ledger(path: str, now: float) -> None:
    """Make a sqlite ledger of 100,000 live records at C{path}."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE posted (key BLOB PRIMARY KEY, time REAL NOT NULL) WITHOUT ROWID")
    db.executemany(
        "INSERT INTO posted VALUES (?, ?)",
        ((_key(i, "open"), now - OPEN_RECORDS + i) for i in range(OPEN_RECORDS)),
    )
    db.commit()
    db.close()


def measure_loop(shm: str) -> tuple[float, float]:
    """
    The file store's CPU seconds per run() of 10,000 new keys in a row
    (median of 5 rounds), and the C{stat}s of the ledger file per run().
    """
    clock = Clock()
    clock.advance(time.time())
    real_stat = os.stat
    stats = 0
    results = []
    for r in range(5):
        path = _fresh(shm, "loop")

        def counting_stat(name: Any, *args: Any, path: str = path, **kwargs: Any) -> os.stat_result:
            nonlocal stats
            if name == path:
                stats += 1
            return real_stat(name, *args, **kwargs)

        ledger = PostLedger(path, clock=clock)
        ledger.open()
        keys = [_key(i, f"loop{r}") for i in range(LOOP_KEYS)]
        stats = 0
        os.stat = counting_stat  # type: ignore[assignment]
        try:
            started = time.process_time()  # CPU: less moved by other processes
            for key in keys:
                ledger.run(key, _instant)
            results.append(time.process_time() - started)
        finally:
            os.stat = real_stat
        assert len(ledger) == LOOP_KEYS
        ledger.close()
        shutil.rmtree(os.path.dirname(path))
    return statistics.median(results) / LOOP_KEYS, stats / LOOP_KEYS


def code_lines(source: str) -> int:
    """Lines holding code: no blank lines, comments or docstrings."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(body[0].lineno, (body[0].end_lineno or 0) + 1))
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT):
            continue
        if tok.type in (tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docstrings)
    return len(lines)


def measure_lines() -> dict[str, int]:
    package = os.path.dirname(gsmail.__file__)
    store = [os.path.join(package, n) for n in ("ledger/store.py", "ledger/file.py")]
    if not all(os.path.exists(p) for p in store):
        store = [os.path.join(package, "ledger.py")]  # before the split: all of it
    total = 0
    for p in store:
        with open(p, encoding="utf-8") as f:
            total += code_lines(f.read())
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        source = f.read()
    start = source.index("class SqliteLedger")
    end = source.index("# -- measuring")
    return {"file": total, "sqlite": code_lines(source[start:end])}


def main() -> None:
    assert ARGS is not None
    only = set(ARGS.only or ["append", "open", "one", "catchup", "lines", "loop"])
    print(f"gsmail from {os.path.dirname(os.path.dirname(gsmail.__file__))}; files in {ARGS.dir}")
    print(f"sqlite {sqlite3.sqlite_version}; Python {sys.version.split()[0]}")
    rows: list[tuple[str, str, str]] = []
    if "append" in only:
        lat = measure_append(ARGS.dir)
        for name in ("file", "sqlite"):
            ms = [x * 1000 for x in lat[name]]
            rows.append(
                (
                    f"append+fsync, {CONCURRENT} at once",
                    name,
                    f"p50 {_percentile(ms, 50):.2f} ms, p99 {_percentile(ms, 99):.2f} ms",
                )
            )
    if "open" in only:
        for name, seconds in measure_open(ARGS.dir).items():
            rows.append((f"open, {OPEN_RECORDS:,} records", name, f"{seconds * 1000:.0f} ms"))
    if "one" in only:
        for name, seconds in measure_one_post(ARGS.dir).items():
            rows.append(("smtp2gs: open, one run(), close", name, f"{seconds * 1000:.1f} ms"))
    if "catchup" in only:
        for name, seconds in measure_catch_up(ARGS.dir).items():
            rows.append(("catch-up+look-up per run()", name, f"{seconds * 1e6:.1f} µs"))
    if "lines" in only:
        for name, count in measure_lines().items():
            rows.append(("lines of code, record store", name, str(count)))
    if "loop" in only:
        per_run, stats = measure_loop(ARGS.shm)
        rows.append(
            (
                f"run() loop, {LOOP_KEYS:,} keys (tmpfs)",
                "file",
                f"{per_run * 1e6:.1f} µs per run(), {stats:g} stat per run()",
            )
        )
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    for what, name, figure in rows:
        print(f"{what:<{width[0]}}  {name:<{width[1]}}  {figure}")


if __name__ == "__main__":
    main()
