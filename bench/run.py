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

Cases in this version: 1 (inbound throughput and latency, ESMTP and LMTP,
4 KB and 100 KB), 2 (latency at light load, 5 msg/s), 3 (one 200 MiB
message). Cases 4 to 6 are not written yet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import (  # noqa: E402
    DOMAIN,
    LIST_ADDRESS,
    SENDER,
    TOKEN,
    cpu_seconds,
    free_port,
    peak_rss_mib,
    percentile,
    wait_for_port,
)

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SESSIONS = 20
#: Targets in table order; the first is what the ratios are taken for.
TARGETS = ("gsmail", "twisted", "aiosmtpd", "pipe", "sink")
LABELS = {
    "gsmail": "gsmail (ledger + spool + RCPT lookup)",
    "twisted": "peer: Twisted ESMTP + treq",
    "aiosmtpd": "peer: aiosmtpd + aiohttp",
    "pipe": "peer: process per message (smtp2gs shape)",
    "sink": "limit: Postfix smtp-sink (no HTTP)",
}
#: The pipe peer runs one process per message: its N and time are capped.
PIPE_MAX_N = 200


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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

    def __init__(self, workdir: str) -> None:
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
            ],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.pid = self.popen.pid
        deadline = time.monotonic() + 20
        self.port = 0
        while not self.port:
            with open(out) as f:
                for line in f:
                    if line.startswith("PORT "):
                        self.port = int(line.split()[1])
            if time.monotonic() > deadline or self.popen.poll() is not None:
                raise RuntimeError(f"the stand-in did not start; see {out}")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def _call(self, page: str, method: str = "GET") -> Any:
        request = urllib.request.Request(
            f"{self.url}/_bench/{page}", method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def reset(self) -> None:
        self._call("reset", "POST")

    def stats(self) -> dict[str, Any]:
        return dict(self._call("stats"))

    def arrivals(self) -> dict[str, float]:
        return {mid: t for mid, t in self._call("arrivals")}

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
        if kind == "gsmail":
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
            env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
            argv = [
                sys.executable,
                "-c",
                "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
                "-n",
                "--pidfile=",
                "--logfile",
                os.path.join(state, "gsmail.log"),
                "gsmail",
                "--config",
                ini,
            ]
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
                "aiosmtpd": "aiosmtpd_aiohttp.py",
                "pipe": "pipe_front.py",
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
            ]
            env["GS_LOCK"] = os.path.join(state, "smtp2gs.lock")
        self.process = Process(f"{run_id}-{kind}", argv, state, env)
        try:
            wait_for_port(self.port, 30)
            if self.submission_port:
                wait_for_port(self.submission_port, 30)
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
    seconds: float = float("nan")
    errors: list[str] = field(default_factory=list)


def run_smtpclient(
    port: int,
    lmtp: bool,
    count: int,
    size: int,
    time_limit: float,
    rate: float = 0.0,
    path: str | None = None,
) -> dict[str, Any]:
    argv = [
        sys.executable,
        os.path.join(HERE, "smtpclient.py"),
        "--port",
        str(port),
        "--sessions",
        str(SESSIONS),
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
    if kind == "pipe":
        n, latency_n, light = min(n, PIPE_MAX_N), min(latency_n, PIPE_MAX_N // 2), 0
    standin.reset()
    target = Target(kind, lmtp, standin, workdir, run_id, gsmail_options)
    try:
        cpu0 = cpu_seconds(target.pid)
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
            result.posted = stats["count"]
            end = stats["last"] if stats["last"] is not None else sent_done
        else:
            result.posted, end = n, sent_done
        result.seconds = end - start
        result.msgs_per_s = result.posted / result.seconds if result.seconds > 0 else float("nan")
        result.cpu_ms_per_msg = (cpu_seconds(target.pid) - cpu0) * 1000 / max(1, result.posted)
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
    "gsmail": "gsmail (queue fsynced, VERP per recipient, 4 connections)",
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
) -> Run:
    """Case 5: one post to C{count} members, one VERP transaction each, into smtp-sink."""
    from outbound import PrivatePostfix, Sink, group_message, members, smtplib_fanout, submit_xverp

    result = Run(sent=count)
    sink = Sink(workdir, run_id)
    target: Target | None = None
    postfix: PrivatePostfix | None = None
    recipients, message = members(count), group_message()
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
                    recipients[0],
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
            submit_xverp(postfix.port, recipients, message)
        else:
            target = Target(
                "gsmail", False, standin, workdir, run_id, gsmail_options, relayhost=sink.port
            )
            cpu0 = cpu_seconds(target.pid)
            start = time.monotonic()
            submit_xverp(target.submission_port, recipients, message)
        result.ack_p50 = (time.monotonic() - start) * 1000  # submission accepted
        end = sink.wait_for(count, max(5.0, time_limit - (time.monotonic() - start)))
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


def outbound_table(count: int, runs: dict[str, list[Run]]) -> str:
    lines = [
        f"#### Case 5: outbound, one post to {count:,} members, one VERP transaction each, "
        "into smtp-sink",
        "",
        "| sender | recipients/s (median) | runs | gsmail ÷ this | submission accepted ms | "
        "peak RSS MiB | CPU ms/recipient | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ours = median([r.msgs_per_s for r in runs.get("gsmail", [])])
    for kind, rs in runs.items():
        tput = median([r.msgs_per_s for r in rs])
        ratio = ours / tput if tput == tput and tput else float("nan")
        notes = "; ".join(sorted({e for r in rs for e in r.errors}))[:160]
        lines.append(
            f"| {OUT_LABELS[kind]} | {fmt(tput)} | {len(rs)} | {fmt(ratio, 2)}× | "
            f"{fmt(median([r.ack_p50 for r in rs]))} | {fmt(max(r.rss_mib for r in rs))} | "
            f"{fmt(median([r.cpu_ms_per_msg for r in rs]), 3)} | {notes} |"
        )
    return "\n".join(lines)


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def fmt(value: float, digits: int = 1) -> str:
    return "—" if value != value else f"{value:,.{digits}f}"


def inbound_table(title: str, runs: dict[str, list[Run]]) -> str:
    lines = [
        f"#### {title}",
        "",
        "| server | msg/s e2e (median) | runs | gsmail ÷ this | ack p50/p99 ms | "
        "e2e p50/p99 ms | light-load e2e p50/p99 ms | peak RSS MiB | CPU ms/msg | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ours = median([r.msgs_per_s for r in runs.get("gsmail", [])])
    for kind, rs in runs.items():
        tput = median([r.msgs_per_s for r in rs])
        ratio = ours / tput if tput == tput and tput else float("nan")
        notes = "; ".join(sorted({e for r in rs for e in r.errors}))[:160]
        if kind == "pipe":
            notes = (f"N ≤ {PIPE_MAX_N}; " + notes).strip("; ")
        lines.append(
            f"| {LABELS[kind]} | {fmt(tput)} | {len(rs)} | {fmt(ratio, 2)}× | "
            f"{fmt(median([r.ack_p50 for r in rs]))} / {fmt(median([r.ack_p99 for r in rs]))} | "
            f"{fmt(median([r.e2e_p50 for r in rs]))} / {fmt(median([r.e2e_p99 for r in rs]))} | "
            f"{fmt(median([r.light_p50 for r in rs]))} / {fmt(median([r.light_p99 for r in rs]))} | "
            f"{fmt(max(r.rss_mib for r in rs))} | "
            f"{fmt(median([r.cpu_ms_per_msg for r in rs]), 2)} | {notes} |"
        )
    return "\n".join(lines)


def big_table(runs: dict[str, list[Run]]) -> str:
    lines = [
        "#### Case 3: one 200 MiB message over ESMTP",
        "",
        "| server | time to ack s (median) | time to stored s | peak RSS MiB (max) | "
        "CPU s | runs | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, rs in runs.items():
        notes = "; ".join(sorted({e for r in rs for e in r.errors}))[:160]
        lines.append(
            f"| {LABELS[kind]} | {fmt(median([r.ack_p50 for r in rs]) / 1000, 2)} | "
            f"{fmt(median([r.e2e_p50 for r in rs]) / 1000, 2)} | "
            f"{fmt(max(r.rss_mib for r in rs))} | "
            f"{fmt(median([r.cpu_ms_per_msg for r in rs]) / 1000, 2)} | {len(rs)} | {notes} |"
        )
    return "\n".join(lines)


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
    parser.add_argument("--cases", default="1,2,3,5", help="comma-separated: 1, 2, 3, 5")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--reps", type=int, help="runs per case (default 3; --quick 1)")
    parser.add_argument(
        "--n", help="comma-separated message counts (default 2000,10000; --quick 1000)"
    )
    parser.add_argument("--sizes", default="4096,102400", help="message body sizes, bytes")
    parser.add_argument("--protocols", default="smtp,lmtp")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per load run")
    parser.add_argument(
        "--gsmail-option",
        action="append",
        default=[],
        help="extra 'name = value' line for [gsmail-bench] (e.g. post_concurrency = 20)",
    )
    parser.add_argument("--workdir", help="where state and logs go (default: a new temp dir)")
    args = parser.parse_args()

    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(tool, os.X_OK):
            sys.exit(f"{tool} is missing: run bench/run.sh (apt-get install postfix)")
    cases = {int(c) for c in args.cases.split(",") if c}
    targets = [t for t in TARGETS if t in args.targets.split(",")]
    reps = args.reps or (1 if args.quick else 3)
    ns = [int(x) for x in (args.n or ("1000" if args.quick else "2000,10000")).split(",")]
    sizes = [int(x) for x in args.sizes.split(",")]
    protocols = args.protocols.split(",")
    workdir = args.workdir or tempfile.mkdtemp(prefix="gsmail-bench-")
    os.makedirs(workdir, exist_ok=True)
    log(f"work directory: {workdir}")
    began = time.monotonic()

    out: list[str] = [
        f"### gsmail benchmarks ({'quick' if args.quick else 'full'}; {reps} run(s) per figure; "
        f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')})",
        "",
    ]
    raw: dict[str, Any] = {}
    standin = StandIn(workdir)
    try:
        out += [standin_capacity(standin, args.quick), ""]
        counter = 0
        if cases & {1, 2}:
            for protocol in protocols:
                for size in sizes:
                    for i, n in enumerate(ns):
                        runs: dict[str, list[Run]] = {t: [] for t in targets}
                        for rep in range(reps):
                            for kind in targets:  # interleaved, so drift hits all alike
                                if kind == "pipe" and (size > 4096 or i > 0):
                                    continue
                                counter += 1
                                run_id = f"r{counter:03d}"
                                log(f"{run_id}: {kind} {protocol} {size} B N={n} rep {rep + 1}")
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
                    if kind in ("pipe", "sink"):
                        continue
                    counter += 1
                    run_id = f"r{counter:03d}"
                    log(f"{run_id}: {kind} 200 MiB rep {rep + 1}")
                    r = big_run(
                        kind, path, standin, workdir, run_id, args.time_limit, args.gsmail_option
                    )
                    log(
                        f"  stored after {fmt(r.e2e_p50 / 1000, 2)} s, RSS {fmt(r.rss_mib)} MiB "
                        f"{'; '.join(r.errors)}"
                    )
                    big.setdefault(kind, []).append(r)
            os.unlink(path)
            out += [big_table(big), ""]
            raw["case3"] = {k: [vars(r) for r in v] for k, v in big.items()}
        if 5 in cases:
            for count in [1000] if args.quick else [1000, 10000]:
                fan: dict[str, list[Run]] = {}
                for rep in range(reps):
                    for kind in OUT_TARGETS:
                        counter += 1
                        run_id = f"r{counter:03d}"
                        log(f"{run_id}: outbound {kind} {count} recipients rep {rep + 1}")
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
                        fan.setdefault(kind, []).append(r)
                out += [outbound_table(count, fan), ""]
                raw[f"case5-{count}"] = {k: [vars(r) for r in v] for k, v in fan.items()}
    finally:
        standin.stop()
    out.append(
        f"Total time {time.monotonic() - began:.0f} s. Cases 4 (idle sessions) "
        "and 6 (cost growth) are not written yet."
    )
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
