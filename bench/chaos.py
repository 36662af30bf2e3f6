"""
SIGKILL chaos: never lost, never archived twice, while gsmail is killed.

Starts the GroupServer stand-in (bench/standin_server.py, which archives a
post id once as GroupServer does) and ``twistd -n gsmail`` in processes of
their own, then sends N distinct messages over ESMTP from several sender
threads that behave as an MTA does: a 2xx ends a message, anything else
(a 4xx, a refused or dropped connection) is retried after a short pause.
Meanwhile gsmail's main process is killed with SIGKILL ``--kills`` times,
spread over the run, and started again each time (with ``--workers N`` the
workers must leave with it, or the restart cannot bind the port).

At the end it counts, from the stand-in's record of what it archived:
lost messages (acknowledged or not, never archived), messages archived
twice, add requests per message, and restarts that could not bind.

    python bench/chaos.py [--messages 1000] [--kills 10] [--workers 0]
        [--senders 8] [--kill-all] [--json]

Exit status 0 when nothing was lost and nothing archived twice, else 1.
Traffic stays on 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import free_port, twistd_argv  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "chaos-token"
DOMAIN = "groups.example.com"
#: Seconds one message may take, retries included, before the run gives up.
MESSAGE_DEADLINE = 120.0
#: Seconds the whole run may take.
RUN_DEADLINE = 900.0


def accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.settimeout(2)
            return s.recv(3) == b"220"
    except OSError:
        return False


def message(n: int) -> bytes:
    # Distinct subject and body: distinct post ids at GroupServer.
    return (
        f"From: Sender {n} <sender{n}@example.org>\r\n"
        f"To: example@{DOMAIN}\r\n"
        f"Subject: chaos message {n}\r\n"
        f"Message-ID: <chaos-{n}@example.org>\r\n\r\n"
        f"Body of chaos message {n}.\r\n"
    ).encode("ascii")


class Gsmail:
    """One ``twistd -n gsmail`` at a time, restarted after each kill."""

    def __init__(self, directory: str, config: str, port: int, kill_all: bool = False) -> None:
        self.kill_all = kill_all
        self.directory = directory
        self.config = config
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.bind_failures = 0
        self._log = open(os.path.join(directory, "gsmail.log"), "ab")  # noqa: SIM115

    def start(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self.starts += 1
            self.process = subprocess.Popen(
                twistd_argv("gsmail", "--config", self.config),
                cwd=self.directory,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": ROOT},
                start_new_session=True,  # its own process group, workers included
            )
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break  # exited: the port was still taken
                if accepting(self.port):
                    return
                time.sleep(0.05)
            self.bind_failures += 1
            time.sleep(0.5)
        raise RuntimeError("gsmail did not start")

    def kill(self) -> None:
        assert self.process is not None
        if self.kill_all:
            os.killpg(self.process.pid, signal.SIGKILL)  # main process and workers at once
        else:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def send_until_accepted(port: int, n: int, deadline: float, stats: Counter[str]) -> bool:
    """Send message C{n} as an MTA does: until a 2xx, or a 5xx (counted)."""
    data = message(n)
    while time.monotonic() < deadline:
        stats["attempts"] += 1
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
                refused = client.sendmail(f"sender{n}@example.org", [f"example@{DOMAIN}"], data)
            if not refused:
                return True
        except smtplib.SMTPResponseException as e:
            code = e.smtp_code
            if 500 <= code < 600:
                stats["permanent"] += 1
                return False
            stats[f"reply {code}"] += 1
        except smtplib.SMTPRecipientsRefused as e:
            code = next(iter(e.recipients.values()))[0]
            if 500 <= code < 600:
                stats["permanent"] += 1
                return False
            stats[f"reply {code}"] += 1
        except (OSError, smtplib.SMTPException):
            stats["connection"] += 1
        time.sleep(random.uniform(0.05, 0.2))
    return False


def run(
    messages: int, kills: int, workers: int, senders: int, kill_all: bool = False
) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="gsmail-chaos-")
    standin = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "standin_server.py"),
            "--dir",
            os.path.join(directory, "standin"),
            "--token",
            TOKEN,
            "--groups",
            "example",
            "--domain",
            DOMAIN,
            "--archive-once",
            "--threads",
            "0",  # no Zope thread limit: the posts' own time only
        ],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert standin.stdout is not None
    first = standin.stdout.readline().decode()
    if not first.startswith("PORT "):
        raise RuntimeError(f"the stand-in did not start: {first!r}")
    web = int(first.split()[1])
    port = free_port()
    config = os.path.join(directory, "gsconfig.ini")
    with open(config, "w") as f:
        f.write(
            f"[webservice-default]\ntoken = {TOKEN}\n[gsmail-default]\n"
            f"url = http://127.0.0.1:{web}\nsmtp_endpoint = tcp:{port}:interface=127.0.0.1\n"
            f"domains = {DOMAIN}\nhostname = chaos.example\nledger_path = ledger/posted.log\n"
            f"spool_dir = spool\ninbound_workers = {workers}\n"
        )
    gsmail = Gsmail(directory, config, port, kill_all)
    started = time.monotonic()
    deadline = started + RUN_DEADLINE
    stats: Counter[str] = Counter()
    accepted: set[int] = set()
    failed: set[int] = set()
    lock = threading.Lock()
    todo = list(range(messages))
    kill_at = [messages * (k + 1) // (kills + 1) for k in range(kills)]
    try:
        gsmail.start(deadline)

        def sender() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    n = todo.pop(0)
                ok = send_until_accepted(
                    port, n, min(deadline, time.monotonic() + MESSAGE_DEADLINE), stats
                )
                with lock:
                    (accepted if ok else failed).add(n)

        threads = [threading.Thread(target=sender, daemon=True) for _ in range(senders)]
        for t in threads:
            t.start()
        killed = 0
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            with lock:
                done = len(accepted) + len(failed)
            if killed < len(kill_at) and done >= kill_at[killed]:
                gsmail.kill()
                killed += 1
                time.sleep(random.uniform(0.0, 0.3))
                gsmail.start(deadline)
            time.sleep(0.01)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        gsmail.stop()
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/_bench/arrivals", timeout=30) as r:
            arrivals = json.load(r)
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/_bench/stats", timeout=30) as r:
            standin_stats = json.load(r)
    finally:
        gsmail.stop()
        standin.send_signal(signal.SIGTERM)
        standin.wait(30)
    archived = Counter(mid for mid, _ in arrivals)
    expected = {f"<chaos-{n}@example.org>" for n in range(messages)}
    lost = sorted(expected - set(archived))
    twice = sorted(mid for mid, count in archived.items() if count > 1)
    adds = int(standin_stats.get("requests", {}).get("add", 0))
    return {
        "messages": messages,
        "kills": killed,
        "workers": workers,
        "killed": "main and workers" if kill_all else "main process",
        "accepted": len(accepted),
        "unfinished": messages - len(accepted) - len(failed),
        "refused_permanently": len(failed),
        "lost": len(lost),
        "archived_twice": len(twice),
        "add_requests": adds,
        "add_requests_per_message": round(adds / messages, 3) if messages else 0.0,
        "attempts_per_message": round(stats["attempts"] / messages, 3) if messages else 0.0,
        "restarts_that_could_not_bind": gsmail.bind_failures,
        "seconds": round(time.monotonic() - started, 1),
        "retry_causes": {k: v for k, v in stats.items() if k != "attempts"},
        "examples_lost": lost[:5],
        "examples_twice": twice[:5],
        "directory": directory,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument(
        "--kill-all",
        action="store_true",
        help="SIGKILL the worker processes too, at once (default: the main process only)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = run(args.messages, args.kills, args.workers, args.senders, args.kill_all)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32} {value}")
    ok = result["lost"] == 0 and result["archived_twice"] == 0 and result["unfinished"] == 0
    return 0 if ok and result["refused_permanently"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
