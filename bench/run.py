"""
gsmail's benchmarks, against its peers, in one run (issue 5).

    bash bench/run.sh [--quick]        # installs what is missing, then runs this
    python bench/run.py [--quick] [--cases 1,2,3] [--targets gsmail,twisted,...]

Starts everything on 127.0.0.1 in processes of their own: the GroupServer
stand-in (bench/standin_server.py), then for every run a fresh server under
test with a fresh state directory (gsmail: C{twistd -n gsmail} with a
generated configuration, ledger and spool on disk; or a peer from
bench/peers/). Loads: Postfix's smtp-source for throughput, bench/smtpclient.py
for per-message latency. Every run is bounded in count and time. Prints
Markdown tables (see bench/README.md for what each column means) and writes
them, with the raw figures as JSON, to the work directory it names.

Cases: 1 (inbound throughput and latency, ESMTP and LMTP, 4 KB and 100 KB),
2 (latency at light load, 5 msg/s), 3 (one 200 MiB message), 4 (1,000 idle
sessions: RSS, then a burst), 5 (outbound VERP fan-out; 100 posts x 50
members as gs.email submits them), 6 (cost growth at N = 1k, 10k, 100k).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: Where gsmail (daemon and smtp2gs) is imported from: the checkout, or --gsmail-root.
GSMAIL_ROOT = ROOT
#: Where the target gsmail-before runs gsmail from (--before-root).
BEFORE_ROOT = ""
sys.path.insert(0, HERE)

from common import (  # noqa: E402
    DOMAIN,
    LIST_ADDRESS,
    SENDER,
    TOKEN,
    cpu_seconds,
    fmt,
    free_port,
    load_average,
    median,
    median_range,
    memory_mib,
    own_cpu_seconds,
    peak_rss_mib,
    percentile,
    raise_fd_limit,
    times,
    twistd_argv,
    wait_for_log,
    wait_for_port,
    wakeups,
)

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SESSIONS = 20
#: Targets in table order; the first is what the ratios are taken for.
TARGETS = ("gsmail", "gsmail-w2", "twisted", "aiosmtpd", "pipe", "smtp2gs", "sink")
#: Run only when named in --targets: the same servers with another number of
#: posts in flight at once (what GroupServer's per-post CPU depends on).
EXTRA_TARGETS = ("gsmail-before", "gsmail-w2-before", "gsmail-c20", "twisted-c4")
LABELS = {
    "gsmail": "gsmail (ledger + spool + RCPT lookup)",
    "gsmail-w2": "gsmail, inbound_workers = 2 (same guarantees)",
    "gsmail-before": "gsmail from --before-root",
    "gsmail-w2-before": "gsmail from --before-root, inbound_workers = 2",
    "gsmail-c20": "gsmail, post_concurrency = 20",
    "twisted": "peer: Twisted ESMTP + treq",
    "twisted-c4": "peer: Twisted ESMTP + treq, at most 4 posts at once",
    "aiosmtpd": "peer: aiosmtpd + aiohttp",
    "pipe": "peer: process per message (smtp2gs shape)",
    "smtp2gs": "peer: process per message, gsmail's smtp2gs",
    "sink": "limit: Postfix smtp-sink (no HTTP)",
}
#: The pipe peers run one process per message: their N and time are capped
#: (--quick: 100; gsmail's smtp2gs takes about 0.5 s of CPU per message).
PIPE_KINDS = ("pipe", "smtp2gs")
PIPE_MAX_N = 200
#: Case 4: idle sessions held open, and the servers it runs against.
IDLE_SESSIONS = 1000
IDLE_TARGETS = ("gsmail", "twisted", "aiosmtpd")
#: gsmail with inbound worker processes: the number of workers, by target.
GSMAIL_WORKERS = {
    "gsmail": 0,
    "gsmail-w2": 2,
    "gsmail-c20": 0,
    "gsmail-before": 0,
    "gsmail-w2-before": 2,
}
#: Targets that run gsmail from --before-root.
BEFORE_TARGETS = ("gsmail-before", "gsmail-w2-before")
#: Extra lines of gsmail's configuration, by target.
GSMAIL_OPTIONS = {"gsmail-c20": ["post_concurrency = 20"]}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_words(load: tuple[float, float, float]) -> str:
    """The load average as the progress log and the table headers show it."""
    return f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


class Progress:
    """Numbers the runs (r001, r002...) and logs each with the load average before it."""

    def __init__(self) -> None:
        self.counter = 0

    def start(self, what: str) -> tuple[str, tuple[float, float, float]]:
        """Log C{what} with the next run id and the load average now; return both."""
        self.counter += 1
        run_id = f"r{self.counter:03d}"
        load = load_average()
        log(f"{run_id}: {what} ({load_words(load)})")
        return run_id, load


class Process:
    """A child process with its output in a file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], workdir: str, env: dict[str, str] | None = None):
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env=env,
        )
        self.pid = self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            with open(self.log_path, errors="replace") as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")


class StandIn:
    """The stand-in process and its control pages."""

    def __init__(self, workdir: str, extra: list[str] | None = None) -> None:
        directory = os.path.join(workdir, "standin")
        out = os.path.join(workdir, "standin.out")
        self._out = open(out, "wb")
        self.popen = subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "standin_server.py"),
                "--dir",
                directory,
                "--token",
                TOKEN,
                "--domain",
                DOMAIN,
                "--inline",
                "--threads",
                "0",  # no Zope thread limit unless extra says so (bench/burst.py)
                *(extra or []),
            ],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.pid = self.popen.pid
        deadline = time.monotonic() + 20
        self.port = self.control_port = 0
        while not self.control_port:
            with open(out) as f:
                for line in f:
                    if line.startswith("PORT "):
                        self.port = int(line.split()[1])
                    elif line.startswith("CONTROL "):
                        self.control_port = int(line.split()[1])
            if time.monotonic() > deadline or self.popen.poll() is not None:
                raise RuntimeError(f"the stand-in did not start; see {out}")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def _call(self, page: str, method: str = "GET") -> Any:
        # The control port: polling it adds nothing to the counts of the pages' port.
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.control_port}/_bench/{page}",
            method=method,
            data=b"" if method == "POST" else None,
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def reset(self) -> None:
        self._call("reset", "POST")

    def stats(self) -> dict[str, Any]:
        return dict(self._call("stats"))

    def arrivals(self) -> dict[str, float]:
        return {mid: t for mid, t in self.arrival_list()}

    def arrival_list(self) -> list[tuple[str, float]]:
        """(Message-ID, time stored) per post stored, a Message-ID twice if stored twice."""
        return [(mid, t) for mid, t in self._call("arrivals")]

    def wait_for(self, count: int, timeout: float, idle: float = 5.0) -> dict[str, Any]:
        """Poll until C{count} posts arrived, C{timeout} passed, or none came for C{idle} s."""
        deadline = time.monotonic() + timeout
        last_change, last_count = time.monotonic(), -1
        while True:
            stats = self.stats()
            if stats["count"] != last_count:
                last_change, last_count = time.monotonic(), stats["count"]
            now = time.monotonic()
            if stats["count"] >= count or now > deadline or now - last_change > idle:
                return stats
            time.sleep(0.05)

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(10)
        self._out.close()


GSMAIL_INI = """\
[config-default]
webservice = bench
gsmail = bench
smtp = bench

[smtp-bench]
relay-address-prefix = p-
no_tls = true

[webservice-bench]
token = {token}

[gsmail-bench]
url = {url}
smtp_endpoint = tcp:{smtp}:interface=127.0.0.1
lmtp_endpoint = tcp:{lmtp}:interface=127.0.0.1
domains = {domain}
hostname = gsmail.bench.example
max_size = 256
spool_dir = {state}/spool
ledger_path = {state}/ledger/posted.log
{extra}
"""


#: gsmail's smtp2gs reads the token and, from the gsmail section, its ledger.
SMTP2GS_INI = """\
[config-default]
webservice = bench
gsmail = bench

[webservice-bench]
token = {token}

[gsmail-bench]
ledger_path = {state}/ledger/posted.log
"""


def smtp2gs_command(ini: str) -> str:
    """
    The pipe command line for gsmail's own smtp2gs (C{{url}} filled in by
    pipe_front.py): the console script beside this Python when installed
    (pyenv's shims would add a shell per message), else C{python -m}. With
    C{PYTHONPATH} set to the checkout either runs the tree's gsmail.
    """
    script = os.path.join(os.path.dirname(sys.executable), "smtp2gs")
    if not os.access(script, os.X_OK):
        script = f"{sys.executable} -m gsmail.script"
    return f"{script} --config {ini} {{url}}"


class Target:
    """One fresh server under test, listening on C{port} for one protocol."""

    def __init__(
        self,
        kind: str,
        lmtp: bool,
        standin: StandIn,
        workdir: str,
        run_id: str,
        gsmail_options: list[str],
        relayhost: int = 0,
    ) -> None:
        self.kind = kind
        self.port = free_port()
        self.submission_port = 0
        state = os.path.join(workdir, run_id)
        os.makedirs(state)
        argv: list[str]
        env = dict(os.environ)
        workers = GSMAIL_WORKERS.get(kind, 0)
        if kind in GSMAIL_WORKERS:
            gsmail_options = [*gsmail_options, *GSMAIL_OPTIONS.get(kind, [])]
            if workers:
                gsmail_options = [*gsmail_options, f"inbound_workers = {workers}"]
            for sub in ("spool", "ledger"):
                os.makedirs(os.path.join(state, sub))
            other = free_port()
            smtp, lmtp_port = (other, self.port) if lmtp else (self.port, other)
            if relayhost:
                self.submission_port = free_port()
                gsmail_options = [
                    *gsmail_options,
                    f"submission_endpoint = tcp:{self.submission_port}:interface=127.0.0.1",
                    f"queue_dir = {state}/queue",
                    f"relayhost = [127.0.0.1]:{relayhost}",
                ]
            ini = os.path.join(state, "gsmail.ini")
            with open(ini, "w") as f:
                f.write(
                    GSMAIL_INI.format(
                        token=TOKEN,
                        url=standin.url,
                        smtp=smtp,
                        lmtp=lmtp_port,
                        domain=DOMAIN,
                        state=state,
                        extra="\n".join(gsmail_options),
                    )
                )
            # The tree's gsmail, not an installed copy; twistd's default log file.
            root = BEFORE_ROOT if kind in BEFORE_TARGETS else GSMAIL_ROOT
            env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
            argv = twistd_argv(
                "--logfile", os.path.join(state, "gsmail.log"), "gsmail", "--config", ini
            )
        elif kind == "sink":
            argv = [
                SMTP_SINK,
                "-u",
                "nobody",
                *(["-L"] if lmtp else []),
                f"127.0.0.1:{self.port}",
                "1024",
            ]
        else:
            script = {
                "twisted": "twisted_treq.py",
                "twisted-c4": "twisted_treq.py",
                "aiosmtpd": "aiosmtpd_aiohttp.py",
                "pipe": "pipe_front.py",
                "smtp2gs": "pipe_front.py",
            }[kind]
            argv = [
                sys.executable,
                os.path.join(HERE, "peers", script),
                "--port",
                str(self.port),
                "--url",
                standin.url,
                "--token",
                TOKEN,
                *(["--lmtp"] if lmtp else []),
                *(["--post-concurrency", "4"] if kind == "twisted-c4" else []),
            ]
            env["GS_LOCK"] = os.path.join(state, "smtp2gs.lock")
            if kind == "smtp2gs":
                os.makedirs(os.path.join(state, "ledger"))
                ini = os.path.join(state, "smtp2gs.ini")
                with open(ini, "w") as f:
                    f.write(SMTP2GS_INI.format(token=TOKEN, state=state))
                argv += ["--command", smtp2gs_command(ini)]
                env["PYTHONPATH"] = GSMAIL_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.process = Process(f"{run_id}-{kind}", argv, state, env)
        try:
            wait_for_port(self.port, 30)
            if self.submission_port:
                wait_for_port(self.submission_port, 30)
            if workers:
                # The port listens at once; wait until every worker accepts on it.
                wait_for_log(os.path.join(state, "gsmail.log"), " accepting", workers, 30)
        except TimeoutError:
            self.process.check_alive()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def posts(self) -> bool:
        """Whether this target posts to the stand-in (smtp-sink does not)."""
        return self.kind != "sink"

    def stop(self) -> None:
        self.process.stop()


@dataclass
class Run:
    """The figures of one run of one target."""

    msgs_per_s: float = float("nan")
    posted: int = 0
    sent: int = 0
    ack_p50: float = float("nan")
    ack_p99: float = float("nan")
    e2e_p50: float = float("nan")
    e2e_p99: float = float("nan")
    light_p50: float = float("nan")
    light_p99: float = float("nan")
    rss_mib: float = float("nan")
    cpu_ms_per_msg: float = float("nan")
    #: With inbound workers: the main process's own share of cpu_ms_per_msg
    #: (the log relay, the text log); the rest is the workers'.
    main_cpu_ms_per_msg: float = float("nan")
    seconds: float = float("nan")
    ledger_bytes: float = float("nan")
    #: The GroupServer side (the stand-in process) during the throughput load:
    #: its CPU per post, and counts per post of requests, reads (recv calls
    #: that returned data), bytes, wake-ups (voluntary context switches) and
    #: connections it accepted.
    gs_cpu_ms_per_post: float = float("nan")
    gs_wakeups_per_post: float = float("nan")
    gs_requests_per_post: float = float("nan")
    gs_reads_per_post: float = float("nan")
    gs_bytes_per_post: float = float("nan")
    gs_connections: int = 0
    #: Replies other than 250 (2xx for LMTP), posts missing, posts stored
    #: more than once (by Message-ID; --check's loads).
    bad_replies: int = 0
    lost: int = 0
    twice: int = 0
    #: /proc/loadavg (1, 5, 15 minutes) just before the run.
    load: tuple[float, float, float] = (float("nan"), float("nan"), float("nan"))
    errors: list[str] = field(default_factory=list)

    def gs_counts(self, stats: dict[str, Any], cpu_seconds: float, wakeups: int) -> None:
        """
        Fill the GroupServer-side figures from the stand-in's stats, its CPU
        seconds and its wake-ups during the load.
        """
        posts = max(1, int(stats["count"]))
        self.gs_cpu_ms_per_post = cpu_seconds * 1000 / posts
        self.gs_wakeups_per_post = wakeups / posts
        self.gs_requests_per_post = sum(stats.get("requests", {}).values()) / posts
        self.gs_reads_per_post = stats.get("reads", 0) / posts
        self.gs_bytes_per_post = stats.get("bytes", 0) / posts
        self.gs_connections = int(stats.get("connections", 0))


def run_smtpclient(
    port: int,
    lmtp: bool,
    count: int,
    size: int,
    time_limit: float,
    rate: float = 0.0,
    path: str | None = None,
    sessions: int = SESSIONS,
) -> dict[str, Any]:
    argv = [
        sys.executable,
        os.path.join(HERE, "smtpclient.py"),
        "--port",
        str(port),
        "--sessions",
        str(sessions),
        "--count",
        str(count),
        "--size",
        str(size),
        "--time-limit",
        str(time_limit),
    ]
    if lmtp:
        argv.append("--lmtp")
    if rate:
        argv += ["--rate", str(rate)]
    if path:
        argv += ["--file", path]
    done = subprocess.run(argv, capture_output=True, timeout=time_limit + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"smtpclient failed: {done.stderr.decode(errors='replace')[-1000:]}")
    return dict(json.loads(done.stdout))


def latencies(
    result: dict[str, Any], arrivals: dict[str, float] | None
) -> tuple[list[float], list[float]]:
    """(ack latencies, end-to-end latencies) in milliseconds."""
    ok = [r for r in result["records"] if r[3] // 100 == 2]
    acks = [(r[2] - r[1]) * 1000 for r in ok]
    if arrivals is None:
        return acks, acks  # smtp-sink: the ack is the end
    e2e = [(arrivals[r[0]] - r[1]) * 1000 for r in ok if r[0] in arrivals]
    return acks, e2e


def inbound_run(
    kind: str,
    lmtp: bool,
    size: int,
    n: int,
    light: int,
    latency_n: int,
    standin: StandIn,
    workdir: str,
    run_id: str,
    time_limit: float,
    gsmail_options: list[str],
) -> Run:
    """Case 1 (and 2): smtp-source throughput, then latency under load and at light load."""
    result = Run()
    if kind in PIPE_KINDS:
        n, latency_n, light = min(n, PIPE_MAX_N), min(latency_n, PIPE_MAX_N // 2), 0
    standin.reset()
    target = Target(kind, lmtp, standin, workdir, run_id, gsmail_options)
    try:
        cpu0 = cpu_seconds(target.pid)
        main_cpu0 = own_cpu_seconds(target.pid)
        gs_cpu0, gs_wakeups0 = cpu_seconds(standin.pid), wakeups(standin.pid)
        start = time.monotonic()
        argv = [
            SMTP_SOURCE,
            *(["-L"] if lmtp else []),
            "-s",
            str(SESSIONS),
            "-m",
            str(n),
            "-l",
            str(size),
            "-f",
            SENDER,
            "-t",
            LIST_ADDRESS,
            f"127.0.0.1:{target.port}",
        ]
        try:
            source = subprocess.run(argv, capture_output=True, timeout=time_limit, check=False)
            if source.returncode != 0:
                result.errors.append(
                    "smtp-source: " + source.stderr.decode(errors="replace")[-300:]
                )
        except subprocess.TimeoutExpired:
            result.errors.append(f"smtp-source: stopped after {time_limit:g} s")
        sent_done = time.monotonic()
        result.sent = n
        if target.posts:
            stats = standin.wait_for(n, timeout=max(5.0, time_limit - (sent_done - start)))
            result.gs_counts(
                stats, cpu_seconds(standin.pid) - gs_cpu0, wakeups(standin.pid) - gs_wakeups0
            )
            result.posted = stats["count"]
            end = stats["last"] if stats["last"] is not None else sent_done
        else:
            result.posted, end = n, sent_done
        result.seconds = end - start
        result.msgs_per_s = result.posted / result.seconds if result.seconds > 0 else float("nan")
        result.cpu_ms_per_msg = (cpu_seconds(target.pid) - cpu0) * 1000 / max(1, result.posted)
        if GSMAIL_WORKERS.get(kind):
            main_cpu = own_cpu_seconds(target.pid) - main_cpu0
            result.main_cpu_ms_per_msg = main_cpu * 1000 / max(1, result.posted)
        if result.posted < n:
            result.errors.append(f"only {result.posted} of {n} posts arrived")
        target.process.check_alive()
        # Latency under load: SESSIONS back-to-back sessions, a timestamp per message.
        if latency_n:
            standin.reset()
            loaded = run_smtpclient(target.port, lmtp, latency_n, size, time_limit)
            arrivals = None
            if target.posts:
                standin.wait_for(len(loaded["records"]), timeout=10)
                arrivals = standin.arrivals()
            acks, e2e = latencies(loaded, arrivals)
            result.ack_p50, result.ack_p99 = percentile(acks, 50), percentile(acks, 99)
            result.e2e_p50, result.e2e_p99 = percentile(e2e, 50), percentile(e2e, 99)
            if loaded["errors"]:
                result.errors.append(f"latency client: {loaded['errors']} errors")
        # Light load (case 2): 5 msg/s, end to end.
        if light:
            standin.reset()
            calm = run_smtpclient(target.port, lmtp, light, size, time_limit, rate=5.0)
            arrivals = None
            if target.posts:
                standin.wait_for(len(calm["records"]), timeout=10)
                arrivals = standin.arrivals()
            _, e2e = latencies(calm, arrivals)
            result.light_p50, result.light_p99 = percentile(e2e, 50), percentile(e2e, 99)
        result.rss_mib = peak_rss_mib(target.pid)
        target.process.check_alive()
    except Exception as e:  # one failed run must not lose the others' figures
        result.errors.append(f"{e.__class__.__name__}: {e}")
    finally:
        target.stop()
    return result


def make_big_message(path: str, size: int) -> str:
    """Write a message of exactly C{size} bytes (CRLF lines, no leading dots); return its Message-ID."""
    message_id = "<big.200MiB@bench.example.org>"
    header = (
        f"From: <{SENDER}>\r\nTo: <{LIST_ADDRESS}>\r\nSubject: big\r\n"
        f"Message-ID: {message_id}\r\n\r\n"
    ).encode("ascii")
    line = b"Y" * 76 + b"\r\n"
    block = line * 13443  # about 1 MiB
    with open(path, "wb") as f:
        f.write(header)
        left = size - len(header)
        while left >= len(block):
            f.write(block)
            left -= len(block)
        while left >= len(line):
            f.write(line)
            left -= len(line)
        if left:
            f.write(b"Z" * (left - 2) + b"\r\n" if left >= 2 else b"\r\n"[:left])
    return message_id


def big_run(
    kind: str,
    path: str,
    standin: StandIn,
    workdir: str,
    run_id: str,
    time_limit: float,
    gsmail_options: list[str],
) -> Run:
    """Case 3: one 200 MiB message over ESMTP; time to ack and to stored, peak RSS."""
    result = Run(sent=1)
    standin.reset()
    target = Target(kind, False, standin, workdir, run_id, gsmail_options)
    try:
        cpu0 = cpu_seconds(target.pid)
        sent = run_smtpclient(target.port, False, 1, 0, time_limit, path=path)
        records = sent["records"]
        if not records or records[0][3] // 100 != 2:
            result.errors.append(f"not accepted: {records}")
        if target.posts:
            standin.wait_for(1, timeout=time_limit)
            arrivals = standin.arrivals()
        else:
            arrivals = None
        acks, e2e = latencies(sent, arrivals)
        result.posted = len(e2e)
        result.ack_p50 = result.ack_p99 = percentile(acks, 50)
        result.e2e_p50 = result.e2e_p99 = percentile(e2e, 50)
        result.seconds = result.e2e_p50 / 1000
        result.cpu_ms_per_msg = (cpu_seconds(target.pid) - cpu0) * 1000
        result.rss_mib = peak_rss_mib(target.pid)
    except Exception as e:
        result.errors.append(f"{e.__class__.__name__}: {e}")
    finally:
        target.stop()
    return result


OUT_TARGETS = ("gsmail", "postfix", "smtplib", "source")
OUT_LABELS = {
    "gsmail": "gsmail (queue fsynced, VERP per recipient, default limits: ≤ 20 connections)",
    "postfix": "peer: Postfix as XVERP relay",
    "smtplib": "peer: Python smtplib, one connection, VERP sender per transaction",
    "source": "limit: smtp-source, 4 sessions",
}


def outbound_run(
    kind: str,
    count: int,
    standin: StandIn,
    workdir: str,
    run_id: str,
    time_limit: float,
    gsmail_options: list[str],
    posts: int = 0,
) -> Run:
    """
    Case 5 (and 6): one post to C{count} members, one VERP transaction each,
    into smtp-sink. With C{posts}: C{posts} different posts to C{count}
    members each, one connection per post (L{outbound.submit_posts}).
    """
    from outbound import (
        PrivatePostfix,
        Sink,
        group_message,
        members,
        smtplib_fanout,
        submit_posts,
        submit_xverp,
    )

    def submit(port: int) -> int:
        """Submit; return how many recipients went in before the time limit."""
        if posts:
            submit_posts(port, posts, per_post)
            return count
        return submit_xverp(port, recipients, message, time_limit=time_limit)

    per_post, count = count, count * max(1, posts)
    result = Run(sent=count)
    submitted = count
    sink = Sink(workdir, run_id)
    target: Target | None = None
    postfix: PrivatePostfix | None = None
    recipients, message = ([] if posts else members(count)), group_message()
    try:
        cpu0 = time.process_time()
        start = time.monotonic()
        if kind == "source":
            subprocess.run(
                [
                    SMTP_SOURCE,
                    "-s",
                    "4",
                    "-m",
                    str(count),
                    "-l",
                    "4096",
                    "-f",
                    "example@groups.example.com",
                    "-t",
                    members(1)[0],
                    f"127.0.0.1:{sink.port}",
                ],
                capture_output=True,
                timeout=time_limit,
                check=True,
            )
        elif kind == "smtplib":
            smtplib_fanout(sink.port, recipients, message)
            result.cpu_ms_per_msg = (time.process_time() - cpu0) * 1000 / count
        elif kind == "postfix":
            postfix = PrivatePostfix(sink.port)
            start = time.monotonic()
            submitted = submit(postfix.port)
        else:
            target = Target(
                "gsmail", False, standin, workdir, run_id, gsmail_options, relayhost=sink.port
            )
            cpu0 = cpu_seconds(target.pid)
            start = time.monotonic()
            submitted = submit(target.submission_port)
        result.ack_p50 = (time.monotonic() - start) * 1000  # submission accepted
        if submitted < count:
            result.errors.append(
                f"submission stopped after {time_limit:g} s: {submitted} of {count} recipients"
            )
        end = sink.wait_for(submitted, max(5.0, time_limit - (time.monotonic() - start)))
        result.posted = sink.count()
        result.seconds = end - start
        result.msgs_per_s = result.posted / result.seconds
        if result.posted < count:
            result.errors.append(f"only {result.posted} of {count} arrived")
        if target is not None:
            result.cpu_ms_per_msg = (cpu_seconds(target.pid) - cpu0) * 1000 / max(1, result.posted)
            result.rss_mib = peak_rss_mib(target.pid)
    except Exception as e:
        result.errors.append(f"{e.__class__.__name__}: {e}"[:300])
    finally:
        if target is not None:
            target.stop()
        if postfix is not None:
            postfix.stop()
        sink.stop()
    return result


def _outbound_rows(runs: dict[str, list[Run]]) -> list[str]:
    """One table row per sender, with its ratio against gsmail's median."""
    rows = []
    ours = median([r.msgs_per_s for r in runs.get("gsmail", [])])
    for kind, rs in runs.items():
        tput = median([r.msgs_per_s for r in rs])
        ratio = ours / tput if tput == tput and tput else float("nan")
        notes = "; ".join(sorted({e for r in rs for e in r.errors}))[:160]
        rows.append(
            f"| {OUT_LABELS[kind]} | {median_range([r.msgs_per_s for r in rs])} | {len(rs)} | "
            f"{times(ratio)} | {median_range([r.ack_p50 for r in rs])} | "
            f"{fmt(max(r.rss_mib for r in rs))} | "
            f"{median_range([r.cpu_ms_per_msg for r in rs], 3)} | {notes} |"
        )
    return rows


def outbound_table(count: int, runs: dict[str, list[Run]]) -> str:
    lines = [
        f"#### Case 5: outbound, one post to {count:,} members, one VERP transaction each, "
        "into smtp-sink",
        "",
        "| sender | recipients/s | runs | gsmail ÷ this | submission accepted ms | "
        "peak RSS MiB | CPU ms/recipient | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += _outbound_rows(runs)
    return "\n".join(lines)


def posts_table(posts: int, per_post: int, runs: dict[str, list[Run]]) -> str:
    lines = [
        f"#### Case 5: {posts} posts × {per_post} members as gs.email submits them "
        "(one connection per post, MAIL FROM:<group> XVERP), into smtp-sink",
        "",
        "| sender | recipients/s | runs | gsmail ÷ this | submission time ms | "
        "peak RSS MiB | CPU ms/recipient | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += _outbound_rows(runs)
    lines += [
        "",
        "No gsmail row with `relayhost_xverp = true`: smtp-sink does not advertise XVERP "
        "(its EHLO reply has no XVERP line), so there is no smarthost here to pass it on to.",
    ]
    return "\n".join(lines)


@dataclass
class IdleRun:
    """Case 4: one server with idle sessions held open, and a burst with and without them."""

    opened: int = 0
    held: int = 0
    open_seconds: float = float("nan")
    rss_base_mib: float = float("nan")
    rss_idle_mib: float = float("nan")
    hwm_idle_mib: float = float("nan")
    with_idle: Run = field(default_factory=Run)
    without_idle: Run = field(default_factory=Run)
    load: tuple[float, float, float] = (float("nan"), float("nan"), float("nan"))
    errors: list[str] = field(default_factory=list)

    @property
    def kib_per_session(self) -> float:
        if not self.held:
            return float("nan")
        return (self.rss_idle_mib - self.rss_base_mib) * 1024 / self.held


def burst(target: Target, standin: StandIn, n: int, time_limit: float) -> Run:
    """
    A burst of C{n} 4 KB messages over ESMTP from smtpclient.py's 20
    sessions: msg/s end to end (first MAIL FROM to the last post stored)
    and the end-to-end latency of each message.
    """
    result = Run(sent=n)
    standin.reset()
    start = time.monotonic()
    sent = run_smtpclient(target.port, False, n, 4096, time_limit)
    ok = [r for r in sent["records"] if r[3] // 100 == 2]
    standin.wait_for(len(ok), timeout=30)
    arrivals = standin.arrivals()
    _, e2e = latencies(sent, arrivals)
    stored = [arrivals[r[0]] for r in ok if r[0] in arrivals]
    result.posted = len(stored)
    if stored:
        first = min((r[1] for r in ok), default=start)
        result.seconds = max(stored) - first
        result.msgs_per_s = result.posted / result.seconds
    result.e2e_p50, result.e2e_p99 = percentile(e2e, 50), percentile(e2e, 99)
    if sent["errors"]:
        result.errors.append(f"burst: {sent['errors']} errors")
    if result.posted < n:
        result.errors.append(f"burst: {result.posted} of {n} stored")
    return result


class IdleClient:
    """bench/idleclient.py holding C{count} idle sessions open on C{port}."""

    def __init__(self, port: int, count: int, time_limit: float) -> None:
        self.popen = subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "idleclient.py"),
                "--port",
                str(port),
                "--count",
                str(count),
                "--time-limit",
                str(time_limit),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        line = self.popen.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError(f"idleclient said nothing within {timeout:g} s")
        return dict(json.loads(line))

    def ready(self, timeout: float) -> dict[str, Any]:
        """Wait until every session is open (or failed): C{{"opened", "failed", ...}}."""
        return self._line(timeout)

    def release(self) -> int:
        """Close every session; return how many the server had kept open until now."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(b"done\n")
        self.popen.stdin.flush()
        held = int(self._line(30)["held"])
        self.popen.wait(30)
        return held

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def idle_run(
    kind: str,
    idle: int,
    burst_n: int,
    standin: StandIn,
    workdir: str,
    run_id: str,
    time_limit: float,
    gsmail_options: list[str],
) -> IdleRun:
    """
    Case 4: a fresh server; its RSS; C{idle} sessions opened (greeting,
    EHLO, then silence) and its RSS again; a burst while they stay open;
    how many it kept open. Then, for comparison, the same burst against
    another fresh server without idle sessions.
    """
    result = IdleRun()
    if kind in GSMAIL_WORKERS:
        # max_connections is per listener; the burst's sessions come on top.
        gsmail_options = [*gsmail_options, f"max_connections = {idle + SESSIONS + 80}"]
    target = Target(kind, False, standin, workdir, run_id + "a", gsmail_options)
    holder: IdleClient | None = None
    try:
        time.sleep(0.5)  # start-up work settles
        result.rss_base_mib, _ = memory_mib(target.pid)
        holder = IdleClient(target.port, idle, time_limit + 120)
        ready = holder.ready(timeout=120)
        result.opened, result.open_seconds = ready["opened"], ready["seconds"]
        if ready["failed"]:
            result.errors.append(f"{ready['failed']} sessions not opened ({ready['error']})")
        time.sleep(0.5)
        result.rss_idle_mib, result.hwm_idle_mib = memory_mib(target.pid)
        result.with_idle = burst(target, standin, burst_n, time_limit)
        result.with_idle.rss_mib = peak_rss_mib(target.pid)
        result.held = holder.release()
        target.process.check_alive()
    except Exception as e:
        result.errors.append(f"{e.__class__.__name__}: {e}"[:300])
    finally:
        if holder is not None:
            holder.stop()
        target.stop()
    target = Target(kind, False, standin, workdir, run_id + "b", gsmail_options)
    try:
        result.without_idle = burst(target, standin, burst_n, time_limit)
        result.without_idle.rss_mib = peak_rss_mib(target.pid)
    except Exception as e:
        result.errors.append(f"without idle: {e.__class__.__name__}: {e}"[:300])
    finally:
        target.stop()
    return result


def idle_table(idle: int, burst_n: int, runs: dict[str, list[IdleRun]]) -> str:
    lines = [
        f"#### Case 4: {idle:,} idle sessions (greeting + EHLO, then silence), then a burst of "
        f"{burst_n:,} × 4 KB in {SESSIONS} sessions",
        "",
        f"| server | idle sessions held | RSS with {idle:,} idle MiB (VmRSS / VmHWM) | "
        "RSS per idle session KiB | burst msg/s (with idle) | burst msg/s (without) | "
        "e2e p50/p99 ms (with idle) | e2e p50/p99 ms (without) | runs | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, rs in runs.items():
        notes = "; ".join(
            sorted({e for r in rs for e in r.errors + r.with_idle.errors + r.without_idle.errors})
        )[:160]
        held = min(r.held for r in rs)
        w = [r.with_idle for r in rs]
        wo = [r.without_idle for r in rs]
        lines.append(
            f"| {LABELS[kind]} | {held:,} of {idle:,} | "
            f"{median_range([r.rss_idle_mib for r in rs])} / "
            f"{fmt(max(r.hwm_idle_mib for r in rs))} | "
            f"{median_range([r.kib_per_session for r in rs])} | "
            f"{median_range([r.msgs_per_s for r in w])} | "
            f"{median_range([r.msgs_per_s for r in wo])} | "
            f"{median_range([r.e2e_p50 for r in w])} / {median_range([r.e2e_p99 for r in w])} | "
            f"{median_range([r.e2e_p50 for r in wo])} / {median_range([r.e2e_p99 for r in wo])} | "
            f"{len(rs)} | {notes} |"
        )
    lines += [
        "",
        "RSS per idle session: (VmRSS with the sessions open − VmRSS of the fresh server) ÷ "
        "sessions held. *Without*: the same burst against another fresh server.",
    ]
    return "\n".join(lines)


def ledger_bytes(workdir: str, run_id: str) -> float:
    """Bytes of gsmail's ledger directory (the file, its lock, any key files) after a run."""
    directory = os.path.join(workdir, run_id, "ledger")
    total = 0
    for parent, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(parent, name))
            except OSError:
                pass
    return float(total)


def slope_words(ratio: float) -> str:
    """A reading of (figure at the largest N) ÷ (figure at the smallest N)."""
    if ratio != ratio:
        return "unknown"
    if 0.85 <= ratio <= 1.15:
        return "flat"
    return "falls" if ratio < 1 else "rises"


def growth_tables(inbound: dict[int, Run], outbound: dict[int, Run], time_limit: float) -> str:
    lines = [
        "#### Case 6: cost growth, inbound (gsmail ESMTP, 4 KB, smtp-source -s 20, one run each)",
        "",
        "| N | msg/s e2e | seconds | CPU ms/msg | peak RSS MiB | ledger bytes | "
        "ledger bytes/msg | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, r in inbound.items():
        lines.append(
            f"| {n:,} | {fmt(r.msgs_per_s)} | {fmt(r.seconds)} | {fmt(r.cpu_ms_per_msg, 2)} | "
            f"{fmt(r.rss_mib)} | {fmt(r.ledger_bytes, 0)} | "
            f"{fmt(r.ledger_bytes / max(1, r.posted))} | {'; '.join(r.errors)[:160]} |"
        )
    lines += ["", curve("Inbound", "msg/s", inbound, "msg"), ""]
    lines += [
        "#### Case 6: cost growth, outbound (gsmail VERP fan-out, one 4 KB post, into smtp-sink)",
        "",
        "| recipients | recipients/s | seconds | CPU ms/recipient | peak RSS MiB | "
        "submission accepted s | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r in outbound.items():
        lines.append(
            f"| {n:,} | {fmt(r.msgs_per_s)} | {fmt(r.seconds)} | {fmt(r.cpu_ms_per_msg, 3)} | "
            f"{fmt(r.rss_mib)} | {fmt(r.ack_p50 / 1000, 2)} | {'; '.join(r.errors)[:160]} |"
        )
    lines += [
        "",
        curve("Outbound", "recipients/s", outbound, "recipient"),
        "",
        f"Each run is bounded by {time_limit:g} s; a run cut there reports its rate over "
        "what it did (see notes).",
    ]
    return "\n".join(lines)


def curve(name: str, unit: str, runs: dict[int, Run], per: str) -> str:
    """One line stating how the figures change from the smallest N to the largest."""
    if len(runs) < 2:
        return f"{name}: one N only, no curve."
    small, large = min(runs), max(runs)
    a, b = runs[small], runs[large]
    slope = b.msgs_per_s / a.msgs_per_s if a.msgs_per_s else float("nan")
    cpu = b.cpu_ms_per_msg / a.cpu_ms_per_msg if a.cpu_ms_per_msg else float("nan")
    return (
        f"**{name} curve** (N {small:,} → {large:,}, ×{large // small:,}): {unit} slope "
        f"{fmt(slope, 2)} ({slope_words(slope)}); CPU ms/{per} ×{fmt(cpu, 2)} "
        f"({slope_words(cpu)}); peak RSS {fmt(a.rss_mib)} → {fmt(b.rss_mib)} MiB."
    )


def inbound_table(title: str, runs: dict[str, list[Run]]) -> str:
    """
    One table of case 1 (and 2): medians of the runs with their range
    (L{median_range}); the ratios are of medians. The GroupServer-side
    columns are the stand-in's: what the server under test makes GroupServer
    spend per post.
    """
    lines = [
        f"#### {title}",
        "",
        "| server | msg/s e2e | runs | gsmail ÷ this | gsmail-w2 ÷ this | ack p50 / p99 ms | "
        "e2e p50 / p99 ms | light-load e2e p50 / p99 ms | peak RSS MiB (max) | CPU ms/msg | "
        "GroupServer CPU ms/post | GroupServer requests · reads · wake-ups · bytes per post | "
        "notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ours = median([r.msgs_per_s for r in runs.get("gsmail", [])])
    ours_w2 = median([r.msgs_per_s for r in runs.get("gsmail-w2", [])])
    for kind, rs in runs.items():
        tput = median([r.msgs_per_s for r in rs])
        ratio = ours / tput if tput == tput and tput else float("nan")
        ratio_w2 = ours_w2 / tput if tput == tput and tput else float("nan")
        notes = "; ".join(sorted({e for r in rs for e in r.errors}))[:160]
        if kind in PIPE_KINDS:
            notes = (f"N ≤ {PIPE_MAX_N}; " + notes).strip("; ")
        if GSMAIL_WORKERS.get(kind):
            share = median_range([r.main_cpu_ms_per_msg for r in rs], 2)
            notes = (f"main process {share} of the CPU ms/msg; " + notes).strip("; ")

        def m(name: str, digits: int = 1, rs: list[Run] = rs) -> str:
            return median_range([getattr(r, name) for r in rs], digits)

        lines.append(
            f"| {LABELS[kind]} | {m('msgs_per_s')} | {len(rs)} | {times(ratio)} | "
            f"{times(ratio_w2)} | {m('ack_p50')} / {m('ack_p99')} | "
            f"{m('e2e_p50')} / {m('e2e_p99')} | {m('light_p50')} / {m('light_p99')} | "
            f"{fmt(max(r.rss_mib for r in rs))} | {m('cpu_ms_per_msg', 2)} | "
            f"{m('gs_cpu_ms_per_post', 2)} | {m('gs_requests_per_post', 2)} · "
            f"{m('gs_reads_per_post', 2)} · {m('gs_wakeups_per_post', 2)} · "
            f"{m('gs_bytes_per_post', 0)} | {notes} |"
        )
    return "\n".join(lines)


def big_table(runs: dict[str, list[Run]]) -> str:
    lines = [
        "#### Case 3: one 200 MiB message over ESMTP",
        "",
        "| server | time to ack s | time to stored s | peak RSS MiB (max) | CPU s | runs | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, rs in runs.items():
        notes = "; ".join(sorted({e for r in rs for e in r.errors}))[:160]
        lines.append(
            f"| {LABELS[kind]} | {median_range([r.ack_p50 / 1000 for r in rs], 2)} | "
            f"{median_range([r.e2e_p50 / 1000 for r in rs], 2)} | "
            f"{fmt(max(r.rss_mib for r in rs))} | "
            f"{median_range([r.cpu_ms_per_msg / 1000 for r in rs], 2)} | {len(rs)} | {notes} |"
        )
    return "\n".join(lines)


#: --check: the load, and the bounds of a gross regression (nothing finer:
#: the machine is shared, and a check that fails on noise gets ignored).
CHECK_N = 300
CHECK_SIZE = 4096
CHECK_SESSIONS = 10
CHECK_ROUNDS = 2
CHECK_RECIPIENTS = 200
CHECK_MIN_RATE_RATIO = 0.4
CHECK_MAX_CPU_RATIO = 2.5
CHECK_MAX_RSS_MIB = 256.0
CHECK_TIME_LIMIT = 30.0


def check_inbound_run(
    kind: str, standin: StandIn, workdir: str, run_id: str, gsmail_options: list[str]
) -> Run:
    """
    --check's inbound run: C{CHECK_N} distinct 4 KB messages over ESMTP from
    smtpclient.py in C{CHECK_SESSIONS} sessions, each reply and each post
    accounted for by Message-ID.
    """
    result = Run(sent=CHECK_N)
    standin.reset()
    target = Target(kind, False, standin, workdir, run_id, gsmail_options)
    try:
        cpu0 = cpu_seconds(target.pid)
        gs_cpu0, gs_wakeups0 = cpu_seconds(standin.pid), wakeups(standin.pid)
        sent = run_smtpclient(
            target.port,
            False,
            CHECK_N,
            CHECK_SIZE,
            CHECK_TIME_LIMIT,
            sessions=CHECK_SESSIONS,
        )
        records = sent["records"]
        accepted = {r[0] for r in records if r[3] == 250}
        result.bad_replies = CHECK_N - len(accepted)
        stats = standin.wait_for(len(accepted), timeout=CHECK_TIME_LIMIT, idle=3.0)
        time.sleep(0.5)  # a post stored twice would come late
        stats = standin.stats()
        result.gs_counts(
            stats, cpu_seconds(standin.pid) - gs_cpu0, wakeups(standin.pid) - gs_wakeups0
        )
        result.cpu_ms_per_msg = (cpu_seconds(target.pid) - cpu0) * 1000 / max(1, len(accepted))
        arrivals = standin.arrival_list()
        stored = [mid for mid, _ in arrivals]
        result.posted = len(set(stored))
        result.twice = len(stored) - len(set(stored))
        result.lost = len(accepted - set(stored))
        if records and stats["last"] is not None:
            result.seconds = stats["last"] - min(r[1] for r in records)
            result.msgs_per_s = result.posted / result.seconds
        acks, e2e = latencies(sent, {mid: t for mid, t in arrivals})
        result.ack_p50, result.ack_p99 = percentile(acks, 50), percentile(acks, 99)
        result.e2e_p50, result.e2e_p99 = percentile(e2e, 50), percentile(e2e, 99)
        result.rss_mib = peak_rss_mib(target.pid)
        if sent["errors"]:
            result.errors.append(f"client: {sent['errors']} errors")
        target.process.check_alive()
    except Exception as e:
        result.errors.append(f"{e.__class__.__name__}: {e}"[:300])
    finally:
        target.stop()
    return result


def check(workdir: str, gsmail_options: list[str]) -> int:
    """
    --check: a short run that catches a gross regression, for CI. gsmail and
    the minimal Twisted+treq peer, C{CHECK_ROUNDS} interleaved rounds, then
    one VERP fan-out into smtp-sink. Prints the tables and the bounds it
    applied; returns the exit status: 0, or 1 when a bound was crossed.
    """
    began = time.monotonic()
    start_load = load_average()
    standin = StandIn(workdir)
    progress = Progress()
    runs: dict[str, list[Run]] = {"gsmail": [], "twisted": []}
    fan: Run | None = None
    try:
        for rnd in range(CHECK_ROUNDS):
            for kind in runs:  # interleaved, so drift hits both alike
                run_id, load = progress.start(f"check: {kind} ESMTP round {rnd + 1}")
                r = check_inbound_run(kind, standin, workdir, run_id, gsmail_options)
                r.load = load
                log(
                    f"  {fmt(r.msgs_per_s)} msg/s, {fmt(r.cpu_ms_per_msg, 2)} CPU ms/msg "
                    f"{'; '.join(r.errors)}"
                )
                runs[kind].append(r)
        run_id, load = progress.start(f"check: gsmail outbound {CHECK_RECIPIENTS} recipients")
        fan = outbound_run(
            "gsmail", CHECK_RECIPIENTS, standin, workdir, run_id, CHECK_TIME_LIMIT, gsmail_options
        )
        fan.load = load
        fan.lost = max(0, CHECK_RECIPIENTS - fan.posted)
        fan.twice = max(0, fan.posted - CHECK_RECIPIENTS)
        log(f"  {fmt(fan.msgs_per_s)} recipients/s {'; '.join(fan.errors)}")
    finally:
        standin.stop()

    ours, peer = runs["gsmail"], runs["twisted"]
    rate = median([r.msgs_per_s for r in ours]) / median([r.msgs_per_s for r in peer])
    cpu = median([r.cpu_ms_per_msg for r in ours]) / median([r.cpu_ms_per_msg for r in peer])
    rss = max(r.rss_mib for r in ours)
    failures: list[str] = []
    for kind, rs in runs.items():
        for r in rs:
            failures += [f"{kind}: {e}" for e in r.errors]
    for name, value in (
        ("replies other than 250", sum(r.bad_replies for r in ours)),
        ("posts lost", sum(r.lost for r in ours)),
        ("posts stored twice", sum(r.twice for r in ours)),
    ):
        if value:
            failures.append(f"gsmail: {value} {name}")
    if not rate >= CHECK_MIN_RATE_RATIO:  # NaN fails too
        failures.append(f"gsmail's msg/s is {times(rate)} the peer's")
    if not cpu <= CHECK_MAX_CPU_RATIO:
        failures.append(f"gsmail's CPU per message is {times(cpu)} the peer's")
    if not rss <= CHECK_MAX_RSS_MIB:
        failures.append(f"gsmail's peak RSS is {fmt(rss)} MiB")
    if fan is not None and (fan.errors or fan.lost or fan.twice):
        failures.append(
            f"outbound: {fan.lost} lost, {fan.twice} twice {'; '.join(fan.errors)}".strip()
        )

    out = [
        f"### gsmail benchmark check ({CHECK_ROUNDS} interleaved rounds; {os.cpu_count()} cores; "
        f"{load_words(start_load)} at the start; {time.strftime('%Y-%m-%d %H:%M')}; "
        f"gsmail from {GSMAIL_ROOT})",
        "",
        "Figures: median of the runs (min–max).",
        "",
        inbound_table(
            f"Check: inbound ESMTP, {CHECK_SIZE // 1024} KB, N = {CHECK_N}, "
            f"{CHECK_SESSIONS} sessions (smtpclient.py)",
            runs,
        ),
        "",
        "| gsmail | posts lost | stored twice | replies other than 250 (outbound: errors) |",
        "|---|---|---|---|",
        f"| inbound | {sum(r.lost for r in ours)} | {sum(r.twice for r in ours)} | "
        f"{sum(r.bad_replies for r in ours)} |",
    ]
    if fan is not None:
        out += [
            f"| outbound, {CHECK_RECIPIENTS} VERP recipients into smtp-sink "
            f"({fmt(fan.msgs_per_s)} recipients/s) | {fan.lost} | {fan.twice} | "
            f"{'; '.join(fan.errors) or '—'} |",
        ]
    out += [
        "",
        "Bounds of a gross regression (the run fails when one is crossed): no post lost or "
        "stored twice, no reply other than 250; gsmail's msg/s (median) ≥ "
        f"{CHECK_MIN_RATE_RATIO}× the peer's (now {times(rate)}); gsmail's CPU per message "
        f"≤ {CHECK_MAX_CPU_RATIO}× the peer's (now {times(cpu)}); gsmail's peak RSS ≤ "
        f"{CHECK_MAX_RSS_MIB:g} MiB (now {fmt(rss)}).",
        "",
        ("FAILED: " + "; ".join(failures)) if failures else "PASSED",
        f"Total time {time.monotonic() - began:.0f} s.",
    ]
    text = "\n".join(out)
    print(text)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        raw = {k: [vars(r) for r in v] for k, v in runs.items()}
        json.dump({"load_at_start": start_load, **raw, "outbound": fan and vars(fan)}, f, indent=1)
    shutil.rmtree(os.path.join(workdir, "standin"), ignore_errors=True)
    return 1 if failures else 0


def standin_capacity(standin: StandIn, quick: bool) -> str:
    """Measure the stand-in alone, first, so the reader can tell it is not the bottleneck."""
    rows = [
        "#### The stand-in alone (raw asyncio HTTP client, 20 keep-alive connections)",
        "",
        "| message | posts | posts/s | stand-in CPU ms/post |",
        "|---|---|---|---|",
    ]
    for size, count in ((4096, 2000 if quick else 5000), (102400, 500 if quick else 1000)):
        standin.reset()
        cpu0 = cpu_seconds(standin.pid)
        done = subprocess.run(
            [
                sys.executable,
                os.path.join(HERE, "httpload.py"),
                "--port",
                str(standin.port),
                "--count",
                str(count),
                "--size",
                str(size),
                "--time-limit",
                "60",
            ],
            capture_output=True,
            timeout=120,
            check=True,
        )
        figures = json.loads(done.stdout)
        cpu = (cpu_seconds(standin.pid) - cpu0) * 1000 / max(1, figures["posts"])
        rows.append(
            f"| {size // 1024} KB | {figures['posts']} | "
            f"{fmt(figures['posts'] / figures['seconds'])} | {fmt(cpu, 2)} |"
        )
    standin.reset()
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run per case, small N")
    parser.add_argument(
        "--check",
        action="store_true",
        help="a short run for CI that fails (exit 1) only on a gross regression",
    )
    parser.add_argument("--cases", default="1,2,3,4,5,6", help="comma-separated: 1 to 6")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--reps", type=int, help="runs per case (default 3; --quick 1)")
    parser.add_argument(
        "--n", help="comma-separated message counts (default 2000,10000; --quick 1000)"
    )
    parser.add_argument("--sizes", default="4096,102400", help="message body sizes, bytes")
    parser.add_argument("--protocols", default="smtp,lmtp")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per load run")
    parser.add_argument(
        "--idle", type=int, default=IDLE_SESSIONS, help="case 4: idle sessions held open"
    )
    parser.add_argument(
        "--burst", type=int, default=1000, help="case 4: messages in the burst (20 sessions)"
    )
    parser.add_argument(
        "--growth-n",
        help="case 6: comma-separated N, inbound messages and outbound recipients "
        "(default 1000,10000,100000; --quick 1000,10000)",
    )
    parser.add_argument(
        "--time-limit-growth", type=float, default=420.0, help="case 6: seconds per run"
    )
    parser.add_argument(
        "--posts", type=int, default=100, help="case 5: posts of 50 members as gs.email sends"
    )
    parser.add_argument(
        "--gsmail-option",
        action="append",
        default=[],
        help="extra 'name = value' line for [gsmail-bench] (e.g. post_concurrency = 20)",
    )
    parser.add_argument("--workdir", help="where state and logs go (default: a new temp dir)")
    parser.add_argument(
        "--gsmail-root",
        help="run gsmail from this source tree instead of the checkout (a before/after "
        "table: e.g. git archive BEFORE | tar -x -C DIR)",
    )
    parser.add_argument(
        "--before-root",
        help="the source tree the target gsmail-before runs gsmail from, interleaved with "
        "gsmail's runs (a before/after table from one run)",
    )
    args = parser.parse_args()
    global GSMAIL_ROOT, BEFORE_ROOT, PIPE_MAX_N
    if args.gsmail_root:
        GSMAIL_ROOT = os.path.abspath(args.gsmail_root)
    if set(BEFORE_TARGETS) & set(args.targets.split(",")):
        if not args.before_root:
            sys.exit("the targets gsmail-before and gsmail-w2-before need --before-root DIR")
        BEFORE_ROOT = os.path.abspath(args.before_root)
    if args.quick:
        PIPE_MAX_N = 100

    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(tool, os.X_OK):
            sys.exit(f"{tool} is missing: run bench/run.sh (apt-get install postfix)")
    if args.check:
        workdir = args.workdir or tempfile.mkdtemp(prefix="gsmail-check-")
        os.makedirs(workdir, exist_ok=True)
        log(f"work directory: {workdir}")
        sys.exit(check(workdir, args.gsmail_option))
    cases = {int(c) for c in args.cases.split(",") if c}
    targets = [t for t in (*TARGETS, *EXTRA_TARGETS) if t in args.targets.split(",")]
    reps = args.reps or (1 if args.quick else 3)
    ns = [int(x) for x in (args.n or ("1000" if args.quick else "2000,10000")).split(",")]
    sizes = [int(x) for x in args.sizes.split(",")]
    protocols = args.protocols.split(",")
    growth_ns = [
        int(x)
        for x in (args.growth_n or ("1000,10000" if args.quick else "1000,10000,100000")).split(",")
    ]
    # Case 4 holds 1,000 sockets in the client and in the server: children inherit this.
    raise_fd_limit(4 * args.idle + 1024)
    workdir = args.workdir or tempfile.mkdtemp(prefix="gsmail-bench-")
    os.makedirs(workdir, exist_ok=True)
    log(f"work directory: {workdir}")
    began = time.monotonic()

    load = load_average()
    out: list[str] = [
        f"### gsmail benchmarks ({'quick' if args.quick else 'full'}; {reps} run(s) per figure, "
        f"interleaved; {os.cpu_count()} cores; {load_words(load)} at the start; "
        f"{time.strftime('%Y-%m-%d %H:%M')}; gsmail from {GSMAIL_ROOT})",
        "",
        "Figures: median of the runs (min–max).",
        "",
    ]
    raw: dict[str, Any] = {"load_at_start": load}
    standin = StandIn(workdir)
    try:
        out += [standin_capacity(standin, args.quick), ""]
        progress = Progress()
        if cases & {1, 2}:
            for protocol in protocols:
                for size in sizes:
                    for i, n in enumerate(ns):
                        runs: dict[str, list[Run]] = {t: [] for t in targets}
                        for rep in range(reps):
                            for kind in targets:  # interleaved, so drift hits all alike
                                if kind in PIPE_KINDS and (size > 4096 or i > 0):
                                    continue
                                run_id, load = progress.start(
                                    f"{kind} {protocol} {size} B N={n} rep {rep + 1}"
                                )
                                light = (
                                    (25 if args.quick else 50)
                                    if 2 in cases and size <= 4096 and i == 0
                                    else 0
                                )
                                latency_n = (min(n, 1000) if i == 0 else 0) if 1 in cases else 0
                                r = inbound_run(
                                    kind,
                                    protocol == "lmtp",
                                    size,
                                    n,
                                    light,
                                    latency_n,
                                    standin,
                                    workdir,
                                    run_id,
                                    args.time_limit,
                                    args.gsmail_option,
                                )
                                log(
                                    f"  {fmt(r.msgs_per_s)} msg/s, e2e p99 {fmt(r.e2e_p99)} ms "
                                    f"{'; '.join(r.errors)}"
                                )
                                r.load = load
                                runs[kind].append(r)
                        runs = {k: v for k, v in runs.items() if v}
                        title = (
                            f"Case 1{' + 2' if 2 in cases and i == 0 and size <= 4096 else ''}: "
                            f"inbound {protocol.upper()}, {size // 1024} KB, N = {n:,}, "
                            f"{SESSIONS} sessions"
                        )
                        out += [inbound_table(title, runs), ""]
                        raw[title] = {k: [vars(r) for r in v] for k, v in runs.items()}
        if 3 in cases:
            path = os.path.join(workdir, "big.eml")
            make_big_message(path, 200 * 1024 * 1024)
            big: dict[str, list[Run]] = {}
            for rep in range(reps):
                for kind in targets:
                    if kind in (*PIPE_KINDS, "sink", "gsmail-w2", "gsmail-w2-before"):
                        continue
                    run_id, load = progress.start(f"{kind} 200 MiB rep {rep + 1}")
                    r = big_run(
                        kind, path, standin, workdir, run_id, args.time_limit, args.gsmail_option
                    )
                    log(
                        f"  stored after {fmt(r.e2e_p50 / 1000, 2)} s, RSS {fmt(r.rss_mib)} MiB "
                        f"{'; '.join(r.errors)}"
                    )
                    r.load = load
                    big.setdefault(kind, []).append(r)
            os.unlink(path)
            out += [big_table(big), ""]
            raw["case3"] = {k: [vars(r) for r in v] for k, v in big.items()}
        if 4 in cases:
            idle_runs: dict[str, list[IdleRun]] = {}
            for rep in range(reps):
                for kind in targets:
                    if kind not in IDLE_TARGETS:
                        continue
                    run_id, load = progress.start(
                        f"{kind} {args.idle} idle sessions, burst rep {rep + 1}"
                    )
                    ir = idle_run(
                        kind,
                        args.idle,
                        args.burst,
                        standin,
                        workdir,
                        run_id,
                        args.time_limit,
                        args.gsmail_option,
                    )
                    log(
                        f"  held {ir.held}/{ir.opened}, RSS {fmt(ir.rss_base_mib)} → "
                        f"{fmt(ir.rss_idle_mib)} MiB, burst {fmt(ir.with_idle.msgs_per_s)} / "
                        f"{fmt(ir.without_idle.msgs_per_s)} msg/s {'; '.join(ir.errors)}"
                    )
                    ir.load = load
                    idle_runs.setdefault(kind, []).append(ir)
            out += [idle_table(args.idle, args.burst, idle_runs), ""]
            raw["case4"] = {
                k: [
                    {
                        **{f: getattr(r, f) for f in ("opened", "held", "open_seconds")},
                        "rss_base_mib": r.rss_base_mib,
                        "rss_idle_mib": r.rss_idle_mib,
                        "hwm_idle_mib": r.hwm_idle_mib,
                        "with_idle": vars(r.with_idle),
                        "without_idle": vars(r.without_idle),
                        "load": r.load,
                        "errors": r.errors,
                    }
                    for r in v
                ]
                for k, v in idle_runs.items()
            }
        if 5 in cases:
            for count in [1000] if args.quick else [1000, 10000]:
                fan: dict[str, list[Run]] = {}
                for rep in range(reps):
                    for kind in OUT_TARGETS:
                        run_id, load = progress.start(
                            f"outbound {kind} {count} recipients rep {rep + 1}"
                        )
                        r = outbound_run(
                            kind,
                            count,
                            standin,
                            workdir,
                            run_id,
                            args.time_limit,
                            args.gsmail_option,
                        )
                        log(f"  {fmt(r.msgs_per_s)} recipients/s {'; '.join(r.errors)}")
                        r.load = load
                        fan.setdefault(kind, []).append(r)
                out += [outbound_table(count, fan), ""]
                raw[f"case5-{count}"] = {k: [vars(r) for r in v] for k, v in fan.items()}
            if args.posts:
                batches: dict[str, list[Run]] = {}
                for rep in range(reps):
                    for kind in ("gsmail", "postfix"):
                        run_id, load = progress.start(
                            f"outbound {kind} {args.posts} posts x 50 rep {rep + 1}"
                        )
                        r = outbound_run(
                            kind,
                            50,
                            standin,
                            workdir,
                            run_id,
                            args.time_limit,
                            args.gsmail_option,
                            posts=args.posts,
                        )
                        log(
                            f"  {fmt(r.msgs_per_s)} recipients/s, submitted in "
                            f"{fmt(r.ack_p50)} ms {'; '.join(r.errors)}"
                        )
                        r.load = load
                        batches.setdefault(kind, []).append(r)
                out += [posts_table(args.posts, 50, batches), ""]
                raw["case5-posts"] = {k: [vars(r) for r in v] for k, v in batches.items()}
        if 6 in cases:
            grow_in: dict[int, Run] = {}
            grow_out: dict[int, Run] = {}
            for n in growth_ns:  # one run each: the 100k runs take minutes
                run_id, load = progress.start(f"growth, gsmail inbound ESMTP 4 KB N={n}")
                r = inbound_run(
                    "gsmail",
                    False,
                    4096,
                    n,
                    0,
                    0,
                    standin,
                    workdir,
                    run_id,
                    args.time_limit_growth,
                    args.gsmail_option,
                )
                r.ledger_bytes = ledger_bytes(workdir, run_id)
                log(f"  {fmt(r.msgs_per_s)} msg/s, {fmt(r.cpu_ms_per_msg, 2)} CPU ms/msg")
                r.load = load
                grow_in[n] = r
            for n in growth_ns:
                run_id, load = progress.start(f"growth, gsmail outbound {n} recipients")
                r = outbound_run(
                    "gsmail",
                    n,
                    standin,
                    workdir,
                    run_id,
                    args.time_limit_growth,
                    args.gsmail_option,
                )
                log(f"  {fmt(r.msgs_per_s)} recipients/s {'; '.join(r.errors)}")
                r.load = load
                grow_out[n] = r
            out += [growth_tables(grow_in, grow_out, args.time_limit_growth), ""]
            raw["case6"] = {
                "inbound": {n: vars(r) for n, r in grow_in.items()},
                "outbound": {n: vars(r) for n, r in grow_out.items()},
            }
    finally:
        standin.stop()
    out.append(f"Total time {time.monotonic() - began:.0f} s.")
    text = "\n".join(out)
    print(text)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(raw, f, indent=1)
    shutil.rmtree(os.path.join(workdir, "standin"), ignore_errors=True)
    log(f"results and logs: {workdir}/results.md, results.json, r*/")


if __name__ == "__main__":
    main()
