"""
A burst against a slow GroupServer (issue 14, item 4).

    python bench/burst.py [--rounds 2] [--n 1000] [--sessions 50] [--size 4096]
        [--post-delay 0.3] [--zope-threads 4] [--time-limit 420]
        [--targets gsmail-c2,gsmail-c4,gsmail-c8,gsmail-c16,gsmail-c32,gsmail-c4-d2,postfix-pipe]

Real GroupServer (Zope) takes hundreds of milliseconds per post. The
stand-in (bench/standin_server.py) is made that slow: every add-email
request waits C{--post-delay} seconds inside its transaction, and at most
C{--zope-threads} requests are served at once (Zope 2's C{zserver-threads},
4 by default), the rest waiting in arrival order. So GroupServer's capacity
is threads ÷ delay posts per second (13.3 with the defaults) whoever sends.

Then C{--n} distinct messages (a unique Message-ID in the body, so
GroupServer's post id does not merge them) of C{--size} bytes go from
C{--sessions} persistent SMTP sessions (bench/smtpclient.py, back to back)
to each target, a fresh server per run, the targets interleaved per round:

  - C{gsmail-cN}: gsmail with C{post_concurrency = N} (2, 4, 8, 16, 32);
  - C{gsmail-c4-d2}: C{post_concurrency = 4}, C{reply_deadline = 2}: what a
    sender sees when the deadline passes before GroupServer answers;
  - C{postfix-pipe}: a private Postfix (bench/outbound.py's instance) that
    queues each message and pipes it (pipe(8), C{flags=ORX}, one recipient
    per delivery, as conf/postfix/master.cf.example) into
    bench/peers/smtp2gs_pipe.py, the old smtp2gs's shape: group lookup and
    add with urllib under smtp2gs's global lock. Needs root and the
    C{postfix} and C{nobody} users.

Figures per run (bench/README.md, "A burst against a slow GroupServer"): the
sender's time from MAIL FROM to the reply to the final dot (p50, p99, the
last), the time from the first MAIL FROM until the last post is stored,
replies other than 250, posts lost (answered 250, never stored) and stored
twice (by Message-ID), posts stored although answered 4xx (a real sender
retries them and GroupServer's post id archives them once), the most HTTP
connections open at the stand-in and requests waiting for a Zope thread at
once, a site visitor's wait for a web page (asked every 0.5 s; it waits for
a Zope thread like a post), and the peak memory of the server's processes
(summed PSS over the process tree, sampled every 0.2 s; Postfix: master, its
daemons and the pipe commands). Prints one Markdown table (medians, min–max
beside) and writes it, with every run's figures as JSON, into the work
directory it names.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pwd
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (  # noqa: E402
    DOMAIN,
    TOKEN,
    descendants,
    fmt,
    load_average,
    median_range,
    peak_rss_mib,
    percentile,
    raise_fd_limit,
)
from run import Progress, StandIn, Target, load_words, log, run_smtpclient  # noqa: E402

#: gsmail's extra configuration lines per target; C{postfix-pipe} is not gsmail.
GSMAIL_TARGETS: dict[str, list[str]] = {
    "gsmail-c2": ["post_concurrency = 2"],
    "gsmail-c4": ["post_concurrency = 4"],
    "gsmail-c8": ["post_concurrency = 8"],
    "gsmail-c16": ["post_concurrency = 16"],
    "gsmail-c32": ["post_concurrency = 32"],
    "gsmail-c4-d2": ["post_concurrency = 4", "reply_deadline = 2"],
}
TARGETS = (*GSMAIL_TARGETS, "postfix-pipe")
LABELS = {
    "gsmail-c2": "gsmail, `post_concurrency = 2`",
    "gsmail-c4": "gsmail, `post_concurrency = 4`",
    "gsmail-c8": "gsmail, `post_concurrency = 8`",
    "gsmail-c16": "gsmail, `post_concurrency = 16`",
    "gsmail-c32": "gsmail, `post_concurrency = 32`",
    "gsmail-c4-d2": "gsmail, `post_concurrency = 4`, `reply_deadline = 2`",
    "postfix-pipe": "Postfix, pipe(8) into the old smtp2gs (global lock)",
}
#: How often the RSS of the server's process tree is sampled, in seconds.
SAMPLE_INTERVAL = 0.2
#: Seconds without a new post after which the harness stops waiting for more.
IDLE_AFTER = 10.0
#: The user pipe(8) runs the command as.
PIPE_USER = "nobody"
#: How often the visitor asks the stand-in for a page during a run, in seconds.
VISIT_INTERVAL = 0.5


@dataclass
class BurstRun:
    """The figures of one run of one target; times in seconds."""

    load: tuple[float, float, float]
    sent: int = 0
    reply_p50: float = float("nan")
    reply_p99: float = float("nan")
    last_reply: float = float("nan")
    all_posted: float = float("nan")
    posted: int = 0
    other_replies: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    twice: int = 0
    stored_after_4xx: int = 0
    gs_open_peak: int = 0
    gs_waiting_peak: int = 0
    #: A site visitor's wait for a page during the run (p50, the longest).
    visit_p50: float = float("nan")
    visit_max: float = float("nan")
    pss_peak_mib: float = float("nan")
    #: gsmail: VmHWM of its process.
    hwm_mib: float = float("nan")
    processes_peak: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def not_250(self) -> int:
        return sum(self.other_replies.values())


class TreeSampler:
    """
    Samples, every L{SAMPLE_INTERVAL} seconds in a thread, the summed PSS
    (proportional set size) of a process and its descendants and how many they are; keeps the peaks.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pss_peak_mib = 0.0
        self.processes_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        pids = [self.pid, *descendants(self.pid)]
        total = 0.0
        for pid in pids:
            try:
                # PSS: a page shared by N processes counts 1/N in each (the
                # pipe commands and smtpd processes share most of theirs).
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith("Pss:"):
                            total += int(line.split()[1]) / 1024
            except OSError:
                continue
        self.pss_peak_mib = max(self.pss_peak_mib, total)
        self.processes_peak = max(self.processes_peak, len(pids))

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self._sample()

    def stop(self) -> None:
        self._sample()
        self._stop.set()
        self._thread.join(5)


class Visitor:
    """
    A site visitor: asks the stand-in for a web page (any page not one of
    the mail pages: answered at once, 404) every L{VISIT_INTERVAL} seconds
    in a thread, and times the answer. The page waits for a Zope thread like
    every request, so this is what the burst costs the site's web users.
    """

    def __init__(self, url: str) -> None:
        self.url = url + "/groups/example/index.html"
        self.waits: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(VISIT_INTERVAL):
            began = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=60) as response:
                    response.read()
            except urllib.error.HTTPError:
                pass  # the stand-in's 404: an answer all the same
            except OSError:
                continue
            self.waits.append(time.monotonic() - began)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(65)


class PipePostfix:
    """
    A private Postfix whose site domain goes to pipe(8), one recipient per
    delivery, into bench/peers/smtp2gs_pipe.py run as L{PIPE_USER} by the
    system's Python (the script needs only the standard library).
    """

    def __init__(self, url: str) -> None:
        from outbound import PrivatePostfix

        user = pwd.getpwnam(PIPE_USER)
        fd, self.lock = tempfile.mkstemp(prefix="gsmail-burst-lock-", dir="/tmp")
        os.close(fd)
        os.chown(self.lock, user.pw_uid, user.pw_gid)
        script = os.path.join(HERE, "peers", "smtp2gs_pipe.py")
        python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
        # pipe(8) passes only export_environment on; the token and the lock go that way.
        imported = (
            "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C POSTLOG_SERVICE POSTLOG_HOSTNAME"
            f" GS_TOKEN={TOKEN} GS_LOCK={self.lock}"
        )
        self.postfix = PrivatePostfix(
            9,  # nothing is relayed
            params={
                "virtual_mailbox_domains": DOMAIN,
                "virtual_transport": "smtp2gs",
                "smtp2gs_destination_recipient_limit": "1",
                "smtp2gs_time_limit": "1000s",
                "import_environment": imported,
                "export_environment": "TZ MAIL_CONFIG LANG GS_TOKEN GS_LOCK",
            },
            services=[
                "smtp2gs unix - n n - - pipe\n"
                f"  flags=ORX user={PIPE_USER} argv={python} {script} {url}"
            ],
        )
        self.port = self.postfix.port
        with open(os.path.join(self.postfix.directory, "queue", "pid", "master.pid")) as f:
            self.pid = int(f.read().split()[0])

    def stop(self) -> None:
        self.postfix.stop()
        os.unlink(self.lock)


def burst_run(
    kind: str,
    standin: StandIn,
    workdir: str,
    run_id: str,
    load: tuple[float, float, float],
    args: argparse.Namespace,
) -> BurstRun:
    """One fresh server of C{kind}, one burst, its figures."""
    result = BurstRun(load=load)
    standin.reset()
    server: Target | PipePostfix | None = None
    sampler: TreeSampler | None = None
    visitor: Visitor | None = None
    try:
        if kind == "postfix-pipe":
            server = PipePostfix(standin.url)
        else:
            server = Target("gsmail", False, standin, workdir, run_id, GSMAIL_TARGETS[kind])
        sampler = TreeSampler(server.pid)
        visitor = Visitor(standin.url)
        began = time.monotonic()
        sent = run_smtpclient(
            server.port, False, args.n, args.size, args.time_limit, sessions=args.sessions
        )
        records = sent["records"]
        result.sent = len(records)
        left = max(0.0, args.time_limit - (time.monotonic() - began))
        stats = standin.wait_for(result.sent, left, idle=IDLE_AFTER)
        if stats["count"] < result.sent and time.monotonic() - began >= args.time_limit:
            result.errors.append(f"cut at {args.time_limit:g} s")
        visitor.stop()
        result.visit_p50 = percentile(visitor.waits, 50)
        result.visit_max = max(visitor.waits, default=float("nan"))
        arrivals = standin.arrival_list()
        stored = collections.Counter(mid for mid, _ in arrivals)
        replies = [r[2] - r[1] for r in records]
        result.reply_p50 = percentile(replies, 50)
        result.reply_p99 = percentile(replies, 99)
        result.last_reply = max(r[2] for r in records) - began if records else float("nan")
        first = min((r[1] for r in records), default=began)
        if arrivals:
            result.all_posted = max(t for _, t in arrivals) - first
        result.posted = len(stored)
        result.other_replies = dict(collections.Counter(str(r[3]) for r in records if r[3] != 250))
        if sent["errors"] > result.not_250:
            result.other_replies["none"] = sent["errors"] - result.not_250
        result.lost = sum(1 for r in records if r[3] == 250 and r[0] not in stored)
        result.twice = sum(1 for count in stored.values() if count > 1)
        result.stored_after_4xx = sum(1 for r in records if r[3] // 100 == 4 and r[0] in stored)
        result.gs_open_peak = int(stats.get("open_peak", 0))
        result.gs_waiting_peak = int(stats.get("waiting_peak", 0))
        if isinstance(server, Target):
            result.hwm_mib = peak_rss_mib(server.pid)  # VmHWM: misses no spike
    except Exception as e:
        result.errors.append(f"{e.__class__.__name__}: {e}"[:300])
    finally:
        if visitor is not None:
            visitor.stop()
        if sampler is not None:
            sampler.stop()
            result.pss_peak_mib = sampler.pss_peak_mib
            result.processes_peak = sampler.processes_peak
        if server is not None:
            server.stop()
    return result


def _replies(runs: list[BurstRun]) -> str:
    """Replies other than 250 per run, as C{0, 0} or C{451×12, 0}."""
    words = []
    for run in runs:
        codes = run.other_replies
        words.append(", ".join(f"{c}×{n}" for c, n in sorted(codes.items())) if codes else "0")
    return "; ".join(words)


def table(args: argparse.Namespace, runs: dict[str, list[BurstRun]], load: str) -> str:
    """The Markdown table: medians with min–max, counts per run."""
    floor = args.n * args.post_delay / args.zope_threads if args.zope_threads else 0.0
    lines = [
        f"### A burst against a slow GroupServer: {args.n:,} × {args.size:,} B from "
        f"{args.sessions} sessions",
        "",
        f"Stand-in: {args.post_delay:g} s per add-email, {args.zope_threads or 'unlimited'}"
        f" requests at once (Zope's worker threads): at best {floor:,.0f} s for all posts. "
        f"{args.rounds} rounds, interleaved; medians (min–max); {load} at the start.",
        "",
        "| server | reply p50 s | reply p99 s | last reply s | all posted s "
        "| replies ≠ 250 (per run) | lost / twice (all runs) | stored though 4xx "
        "| peak GS connections | peak waiting for a Zope thread | a visitor's page p50 / longest s "
        "| peak memory MiB, PSS (processes) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, each in runs.items():
        lines.append(
            "| "
            + " | ".join(
                [
                    LABELS[kind],
                    median_range([r.reply_p50 for r in each], 2),
                    median_range([r.reply_p99 for r in each], 2),
                    median_range([r.last_reply for r in each]),
                    median_range([r.all_posted for r in each]),
                    _replies(each),
                    f"{sum(r.lost for r in each)} / {sum(r.twice for r in each)}",
                    median_range([float(r.stored_after_4xx) for r in each], 0),
                    median_range([float(r.gs_open_peak) for r in each], 0),
                    median_range([float(r.gs_waiting_peak) for r in each], 0),
                    f"{median_range([r.visit_p50 for r in each], 2)} / "
                    f"{median_range([r.visit_max for r in each], 2)}",
                    f"{median_range([r.pss_peak_mib for r in each])} "
                    f"({fmt(max(r.processes_peak for r in each), 0)})",
                ]
            )
            + " |"
        )
    notes = [
        f"- {LABELS[kind]}, run {i + 1}: {error}"
        for kind, each in runs.items()
        for i, run in enumerate(each)
        for error in run.errors
    ]
    posted = [f"{kind} {'/'.join(str(r.posted) for r in each)}" for kind, each in runs.items()]
    lines += [
        "",
        f"Posts stored per run (of {args.n:,}): " + "; ".join(posted) + ".",
        "Load before each run: "
        + "; ".join(
            f"{kind} " + ", ".join(f"{r.load[0]:.2f}" for r in each) for kind, each in runs.items()
        )
        + ".",
        *notes,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--post-delay", type=float, default=0.3)
    parser.add_argument("--zope-threads", type=int, default=4)
    parser.add_argument(
        "--time-limit", type=float, default=420.0, help="seconds any one run may take"
    )
    parser.add_argument("--targets", default=",".join(TARGETS))
    args = parser.parse_args()
    # SIGTERM ends the run through the finally clauses: no server left running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        sys.exit(f"unknown targets: {', '.join(sorted(unknown))}")
    raise_fd_limit(4096)
    workdir = tempfile.mkdtemp(prefix="gsmail-burst-")
    standin = StandIn(
        workdir,
        ["--post-delay", str(args.post_delay), "--threads", str(args.zope_threads)],
    )
    runs: dict[str, list[BurstRun]] = {kind: [] for kind in targets}
    progress = Progress()
    start_load = load_words(load_average())
    try:
        for round_ in range(args.rounds):
            for kind in targets:
                run_id, load = progress.start(f"round {round_ + 1}: {kind}")
                result = burst_run(kind, standin, workdir, run_id, load, args)
                log(
                    f"{run_id}: p50 {result.reply_p50:.2f} s, all posted {result.all_posted:.1f} s, "
                    f"not 250 {result.not_250}, lost {result.lost}, twice {result.twice}"
                    + (f", {result.errors}" if result.errors else "")
                )
                runs[kind].append(result)
    finally:
        standin.stop()
    text = table(args, runs, start_load)
    print(text)
    with open(os.path.join(workdir, "burst.md"), "w") as f:
        f.write(text)
    with open(os.path.join(workdir, "burst.json"), "w") as f:
        json.dump({k: [asdict(r) for r in v] for k, v in runs.items()}, f, indent=1)
    log(f"results and logs: {workdir}/burst.md, burst.json, r*/")


if __name__ == "__main__":
    main()
