"""
Abuse limits before and after (issue 13, "Port 25 under attack"): what one
attacker on one IP address gets out of gsmail with the limits off and with
the defaults, measured in one run, everything on 127.0.0.1.

    python bench/abuse.py [--before-src PATH] [--probe 10000] [--auth-tries 191]
        [--hold 200] [--slow-cap 60] [--connects 2000] [--connect-deadline 5]
        [--prober-seconds 30] [--json]

Starts the GroupServer stand-in (bench/standin_server.py, which counts the
requests of each page) and then, for every attack and each side, a fresh
``twistd -n gsmail`` (so that one attack's per-client counters do not spill
into the next), attacks it from this process with blocking sockets, and
stops it. Prints a Markdown table "attack | before | after" on standard
output, progress on standard error.

The two sides:

  - **before (limits off)**: every per-client and per-session count is 0
    (off), the error sleep and the AUTH failure delay are 0,
    C{min_data_rate = 0} (DATA needs only a byte per C{idle_timeout}),
    C{listen_backlog = 50} (Twisted's default, which gsmail used before).
    This runs the checkout's gsmail, whose per-line command deadline cannot
    be turned off: its slowloris row is not the old behaviour. For a true
    "before", run that side from the older tree::

        git worktree add /tmp/before 296cb18        # the commit before the limits
        python bench/abuse.py --before-src /tmp/before

    (or ``mkdir /tmp/before && git archive 296cb18 gsmail twisted | tar -x -C
    /tmp/before``). The older tree gets the same configuration file and
    ignores the options it does not know (it logs each once).
  - **after (defaults)**: the checkout's defaults, with
    C{client_limit_exceptions} empty (the default exempts loopback, which is
    where the bench connects from).

Both sides: C{idle_timeout = 10} s (so that the slowloris rows are short),
everything else default (C{max_connections = 1000}).

The attacks (each bounded in count and time):

  - **probe**: one session, EHLO, MAIL, then up to C{--probe} RCPTs to
    groups that do not exist (all different, so none is answered from the
    group cache), pipelined 100 at a time; ends at C{421}, the close, the
    count or 300 s. Figure: the group lookups GroupServer got.
  - **prober**: C{--prober-seconds} of 20 such sessions at once, each
    reconnecting as soon as it is closed (bounded at 100,000 RCPTs).
    Figure: lookups GroupServer got in that time.
  - **brute force**: C{--auth-tries} wrong passwords by AUTH PLAIN on the
    submission port, as a guesser does: every try in the same session until
    it is closed, then a new one (300 s at most). Figures: the passwords the
    server checked (replies C{535}), the tries refused unchecked
    (C{421 4.7.0 Too many authentication failures}), the time until the
    first refusal.
  - **hold**: C{--hold} connections opened one after the other and kept
    open. Figure: how many were greeted C{220} and still open at the end.
  - **slowloris**: a command line, and a message after the 354, sent one
    byte a second, both at once; C{--slow-cap} seconds at most. Figure:
    how long the server kept each connection.
  - **connects**: C{--connects} non-blocking connects issued at once.
    Figure: how many got a reply line from the server (C{220}, or the
    C{421} of a connection limit: either way the server accepted the
    connection) within C{--connect-deadline} seconds of the first connect.
    A connect the kernel's listen queue had no room for is retried by the
    client's TCP after 1 s, 3 s, 7 s...
"""

from __future__ import annotations

import argparse
import json
import os
import select
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from base64 import b64encode
from collections import Counter
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import DOMAIN, TOKEN, free_port, raise_fd_limit, twistd_argv  # noqa: E402
from run import Process, StandIn, log  # noqa: E402

USER = "groupserver"
PASSWORD = "bench-submission-password"
EHLO = b"EHLO attacker.example.net\r\n"
MAIL = b"MAIL FROM:<attacker@example.net>\r\n"
#: Seconds any one read may wait (the error sleep and AUTH delay are 1 s).
READ_TIMEOUT = 30.0
#: Seconds a probe or a brute force may take in all.
ATTACK_LIMIT = 300.0

COMMON = {"idle_timeout": "10"}
LIMITS_OFF = {
    "client_connection_count_limit": "0",
    "client_connection_rate_limit": "0",
    "session_lookup_limit": "0",
    "client_lookup_rate_limit": "0",
    "client_auth_failure_limit": "0",
    "auth_failure_delay": "0",
    "soft_error_limit": "0",
    "hard_error_limit": "0",
    "error_sleep_time": "0",
    "junk_command_limit": "0",
    "min_data_rate": "0",
    "listen_backlog": "50",
}
DEFAULTS = {"client_limit_exceptions": ""}

INI = """\
[webservice-default]
token = {token}

[smtp-default]
username = {user}
password = {password}
processorthread = false

[gsmail-default]
url = {url}
smtp_endpoint = tcp:{smtp}:interface=127.0.0.1
submission_endpoint = tcp:{submission}:interface=127.0.0.1
domains = {domain}
hostname = gsmail.bench.example
spool_dir = {state}/spool
ledger_path = {state}/ledger/posted.log
queue_dir = {state}/queue
control_socket = {state}/control
{options}
"""


# -- a blocking client -----------------------------------------------------------------


class Client:
    """One SMTP connection on a blocking socket with a timeout."""

    def __init__(self, port: int, timeout: float = READ_TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """The code and text of the next reply's last line; C{ConnectionError} at EOF."""
        while True:
            while b"\r\n" not in self._buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed by the server")
                self._buffer += chunk
            line, _, self._buffer = self._buffer.partition(b"\r\n")
            if line[3:4] != b"-":
                return int(line[:3]), line[4:].decode("utf-8", "replace")

    def closed(self) -> bool:
        """Whether the server closed the connection (without waiting)."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def rcpt(n: int) -> bytes:
    return f"RCPT TO:<no-such-group-{n}@{DOMAIN}>\r\n".encode()


def auth_plain(password: str) -> bytes:
    return b"AUTH PLAIN " + b64encode(f"\0{USER}\0{password}".encode()) + b"\r\n"


# -- one gsmail ------------------------------------------------------------------------


class Gsmail:
    """A fresh C{twistd -n gsmail} from C{tree}, with C{options} in its section."""

    def __init__(
        self, tree: str, options: dict[str, str], standin: StandIn, workdir: str, name: str
    ) -> None:
        state = os.path.join(workdir, name)
        os.makedirs(state)
        self.port = free_port()
        self.submission_port = free_port()
        ini = os.path.join(state, "gsmail.ini")
        with open(ini, "w") as f:
            f.write(
                INI.format(
                    token=TOKEN,
                    user=USER,
                    password=PASSWORD,
                    url=standin.url,
                    smtp=self.port,
                    submission=self.submission_port,
                    domain=DOMAIN,
                    state=state,
                    options="\n".join(f"{k} = {v}" for k, v in options.items()),
                )
            )
        env = {**os.environ, "PYTHONPATH": tree}
        argv = twistd_argv("gsmail", "--config", ini)
        self.process = Process(name, argv, state, env)
        try:
            for port in (self.port, self.submission_port):
                _ready(port, time.monotonic() + 30)
        except BaseException:
            self.process.check_alive()
            self.process.stop()
            raise

    def stop(self) -> None:
        self.process.stop()


def _ready(port: int, deadline: float) -> None:
    """Wait for a greeting on C{port}, then QUIT and wait for the close (so no count lingers)."""
    while True:
        try:
            with Client(port, timeout=5) as client:
                client.reply()
                client.send(b"QUIT\r\n")
                client.reply()
                client.sock.recv(1)
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"gsmail did not answer on port {port}") from None
            time.sleep(0.1)


def tree_of(tree: str) -> str:
    """Where C{gsmail} is imported from with C{PYTHONPATH=tree}."""
    out = subprocess.run(
        [sys.executable, "-c", "import gsmail; print(gsmail.__file__)"],
        env={**os.environ, "PYTHONPATH": tree},
        cwd="/",  # with -c the working directory comes first on sys.path
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return os.path.dirname(os.path.dirname(out.stdout.strip()))


# -- the attacks -----------------------------------------------------------------------


def lookups(standin: StandIn) -> int:
    return int(standin.stats()["requests"].get("exists", 0))


def probe(server: Gsmail, standin: StandIn, count: int) -> dict[str, Any]:
    """One session, C{count} RCPTs to unknown groups at most."""
    standin.reset()
    started = time.monotonic()
    answered = 0
    ended = f"all {n(count)} answered"
    try:
        with Client(server.port) as client:
            code, text = client.reply()
            if code != 220:
                return {"ended": f"greeted {code} {text}", "lookups": 0, "answered": 0}
            client.send(EHLO + MAIL)
            client.reply()
            client.reply()
            while answered < count:
                if time.monotonic() - started > ATTACK_LIMIT:
                    ended = f"cut by the bench at {ATTACK_LIMIT:.0f} s"
                    break
                batch = min(100, count - answered)
                client.send(b"".join(rcpt(answered + i) for i in range(batch)))
                for _ in range(batch):
                    code, text = client.reply()
                    if code == 421:
                        ended = f"421 after {answered} RCPTs"
                        break
                    answered += 1
                else:
                    continue
                break
    except (ConnectionError, TimeoutError) as e:
        ended = f"{type(e).__name__} after {answered} RCPTs"
    return {
        "answered": answered,
        "lookups": lookups(standin),
        "ended": ended,
        "seconds": time.monotonic() - started,
    }


def prober(server: Gsmail, standin: StandIn, seconds: float, sessions: int = 20) -> dict[str, Any]:
    """C{sessions} probing sessions at once for C{seconds}, each reconnecting when closed."""
    standin.reset()
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    counts: Counter[str] = Counter()
    addresses = iter(range(100_000))

    def one() -> None:
        while time.monotonic() < deadline:
            try:
                with Client(server.port, timeout=10) as client:
                    code, _ = client.reply()
                    with lock:
                        counts["sessions" if code == 220 else f"greeted {code}"] += 1
                    if code != 220:
                        time.sleep(0.05)
                        continue
                    client.send(EHLO + MAIL)
                    client.reply()
                    client.reply()
                    while time.monotonic() < deadline:
                        with lock:
                            batch = [n for n, _ in zip(addresses, range(20), strict=False)]
                        if not batch:
                            return
                        client.send(b"".join(rcpt(n) for n in batch))
                        for _ in batch:
                            code = client.reply()[0]
                            with lock:
                                counts[str(code)] += 1
                            if code == 421:
                                break
                        else:
                            continue
                        break
            except (OSError, ValueError):
                with lock:
                    counts["connection ended"] += 1

    threads = [threading.Thread(target=one, daemon=True) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + READ_TIMEOUT + 5)
    return {"lookups": lookups(standin), "seconds": seconds, "counts": dict(counts)}


def brute_force(server: Gsmail, tries: int) -> dict[str, Any]:
    """C{tries} wrong passwords, in one session after another."""
    started = time.monotonic()
    checked = refused = sessions = 0
    locked_after: float | None = None
    other: Counter[str] = Counter()
    while checked + refused < tries and time.monotonic() - started < ATTACK_LIMIT:
        sessions += 1
        try:
            with Client(server.submission_port) as client:
                code, text = client.reply()
                if code != 220:
                    other[f"greeted {code}"] += 1
                    continue
                client.send(EHLO)
                client.reply()
                while checked + refused < tries:
                    client.send(auth_plain(f"guess-{checked + refused}"))
                    code, text = client.reply()
                    if code == 535:
                        checked += 1
                    elif code == 421 and "authentication failures" in text:
                        refused += 1
                        if locked_after is None:
                            locked_after = time.monotonic() - started
                        break
                    else:
                        # 421 Too many errors (the session's hard limit): that try
                        # was not answered; the guesser reconnects and repeats it.
                        other[f"{code} {text[:40]}"] += 1
                        break
        except (ConnectionError, TimeoutError):
            other["connection ended"] += 1
    return {
        "tries": checked + refused,
        "checked": checked,
        "refused_unchecked": refused,
        "locked_after": locked_after,
        "sessions": sessions,
        "seconds": time.monotonic() - started,
        "other": dict(other),
    }


def hold(server: Gsmail, count: int) -> dict[str, Any]:
    """C{count} connections opened one after another and kept."""
    clients: list[Client] = []
    greetings: Counter[str] = Counter()
    try:
        for _ in range(count):
            client = Client(server.port, timeout=10)
            try:
                code, text = client.reply()
            except (ConnectionError, TimeoutError):
                greetings["no greeting"] += 1
                client.close()
                continue
            greetings[f"{code} {text.split(';')[0]}"] += 1
            if code == 220:
                clients.append(client)
            else:
                client.close()
        time.sleep(0.5)
        held = sum(not c.closed() for c in clients)
    finally:
        for c in clients:
            c.close()
    return {"held": held, "tried": count, "greetings": dict(greetings)}


def _dribble(client: Client, data: bytes, cap: float) -> tuple[float, str]:
    """One byte a second until the server speaks or closes, or C{cap} s."""
    started = time.monotonic()
    for byte in data:
        if time.monotonic() - started >= cap:
            return cap, "not cut (cap)"
        readable, _, _ = select.select([client.sock], [], [], 1.0)
        if readable:
            break
        try:
            client.send(bytes([byte]))
        except OSError:
            break
    try:
        code, text = client.reply()
        what = f"{code} {text.split(';')[0]}"
    except (ConnectionError, TimeoutError) as e:
        what = type(e).__name__
    return time.monotonic() - started, what


def slowloris(server: Gsmail, cap: float) -> dict[str, Any]:
    """A command line and a message, each a byte a second, at once."""
    results: dict[str, Any] = {}

    def line() -> None:
        with Client(server.port, timeout=cap + READ_TIMEOUT) as client:
            client.reply()
            results["line"] = _dribble(client, b"NOOP " + b"x" * int(cap + 10), cap)

    def data() -> None:
        with Client(server.port, timeout=cap + READ_TIMEOUT) as client:
            client.reply()
            client.send(EHLO + MAIL + f"RCPT TO:<example@{DOMAIN}>\r\nDATA\r\n".encode())
            codes = [client.reply()[0] for _ in range(4)]
            if codes[-1] != 354:
                results["data"] = (0.0, f"no 354: {codes}")
                return
            message = b"Subject: slow\r\n\r\n" + b"y" * int(cap + 10) + b"\r\n.\r\n"
            results["data"] = _dribble(client, message, cap)

    threads = [threading.Thread(target=f, daemon=True) for f in (line, data)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(cap + 2 * READ_TIMEOUT)
    return results


def connects(server: Gsmail, count: int, deadline_s: float) -> dict[str, Any]:
    """C{count} non-blocking connects at once; who got a reply line within the deadline."""
    selector = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    outcome: Counter[str] = Counter()
    last = 0.0
    started = time.monotonic()
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", server.port))
            socks.append(s)
            selector.register(s, selectors.EVENT_READ)
        issued = time.monotonic() - started
        pending = len(socks)
        while pending:
            left = started + deadline_s - time.monotonic()
            if left <= 0:
                break
            for key, _ in selector.select(left):
                s = key.fileobj  # type: ignore[assignment]
                selector.unregister(s)
                pending -= 1
                try:
                    data = s.recv(512)
                except OSError as e:
                    outcome[f"error {e.errno}"] += 1
                    continue
                if data[:3] in (b"220", b"421"):
                    outcome[data[:3].decode()] += 1
                    last = time.monotonic() - started
                else:
                    outcome["closed without a reply" if not data else "other"] += 1
        outcome["no reply within the deadline"] += pending
    finally:
        selector.close()
        for s in socks:
            s.close()
    return {
        "reached": outcome["220"] + outcome["421"],
        "count": count,
        "outcome": dict(outcome),
        "last_reply": last,
        "issued_in": issued,
        "deadline": deadline_s,
    }


# -- the table -------------------------------------------------------------------------


def n(value: float) -> str:
    return f"{value:,.0f}"


def cells(row: str, r: dict[str, Any]) -> str:
    if row == "probe":
        return f"**{n(r['lookups'])}** lookups ({r['ended']}, {r['seconds']:.1f} s)"
    if row == "prober":
        answered = sum(v for k, v in r["counts"].items() if k.isdigit())
        sessions = r["counts"].get("sessions", 0)
        return (
            f"**{n(r['lookups'])}** lookups ({n(answered)} RCPTs answered in {n(sessions)} "
            f"sessions)"
        )
    if row == "brute":
        locked = (
            f"locked out after {r['locked_after']:.1f} s"
            if r["locked_after"] is not None
            else "never locked out"
        )
        return (
            f"**{r['checked']}** of {r['tries']} checked; {locked}; "
            f"{r['refused_unchecked']} refused unchecked ({r['seconds']:.2f} s, "
            f"{r['sessions']} sessions)"
        )
    if row == "hold":
        refused = {k: v for k, v in r["greetings"].items() if not k.startswith("220")}
        extra = "; " + ", ".join(f"{v} × {k}" for k, v in refused.items()) if refused else ""
        return f"**{r['held']}** of {r['tried']}{extra}"
    if row in ("line", "data"):
        seconds, what = r
        return f"**{seconds:.1f} s** ({what})"
    if row == "connects":
        return (
            f"**{n(r['reached'])}** of {n(r['count'])} within {r['deadline']:.0f} s "
            f"(last reply at {r['last_reply']:.2f} s; "
            + ", ".join(f"{k}: {v}" for k, v in sorted(r["outcome"].items()))
            + ")"
        )
    raise ValueError(row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-src", help="run the 'before' side from this source tree")
    parser.add_argument("--probe", type=int, default=10_000, help="RCPTs in the probe")
    parser.add_argument("--prober-seconds", type=float, default=30.0, help="0: skip the row")
    parser.add_argument("--auth-tries", type=int, default=191)
    parser.add_argument("--hold", type=int, default=200)
    parser.add_argument("--slow-cap", type=float, default=60.0)
    parser.add_argument("--connects", type=int, default=2000)
    parser.add_argument("--connect-deadline", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    args = parser.parse_args()

    raise_fd_limit(2 * args.connects + 2000)  # the servers inherit it
    workdir = tempfile.mkdtemp(prefix="gsmail-abuse-")
    before_tree = os.path.abspath(args.before_src) if args.before_src else ROOT
    sides = {
        "before": (before_tree, {**COMMON, **LIMITS_OFF}),
        "after": (ROOT, {**COMMON, **DEFAULTS}),
    }
    for side, (tree, _) in sides.items():
        log(f"{side}: gsmail from {tree_of(tree)}")
    rows = [
        (
            "probe",
            f"RCPT probe, {n(args.probe)} unknown groups in one session: GroupServer lookups",
        ),
        (
            "prober",
            f"RCPT probe, 20 sessions reconnecting for {args.prober_seconds:.0f} s: "
            "GroupServer lookups",
        ),
        ("brute", f"AUTH brute force, {args.auth_tries} wrong passwords: passwords checked"),
        ("hold", f"connections one IP holds open (tries {args.hold})"),
        ("line", f"slowloris command line, 1 byte/s: connection kept (cap {args.slow_cap:.0f} s)"),
        (
            "data",
            f"slowloris DATA, 1 byte/s after 354: connection kept (cap {args.slow_cap:.0f} s)",
        ),
        (
            "connects",
            f"{n(args.connects)} simultaneous connects: got a reply line "
            "(limits off on both sides: listen backlog 50 vs 1024)",
        ),
        (
            "connects-defaults",
            f"{n(args.connects)} simultaneous connects: got a reply line (after: its defaults)",
        ),
    ]
    if args.prober_seconds <= 0:
        rows = [r for r in rows if r[0] != "prober"]
    raw: dict[str, dict[str, Any]] = {}
    standin = StandIn(workdir)
    attacks: dict[str, Any] = {
        "probe": lambda server: probe(server, standin, args.probe),
        "prober": lambda server: prober(server, standin, args.prober_seconds),
        "brute": lambda server: brute_force(server, args.auth_tries),
        "hold": lambda server: hold(server, args.hold),
        "connects": lambda server: connects(server, args.connects, args.connect_deadline),
        "connects-defaults": lambda server: connects(server, args.connects, args.connect_deadline),
    }
    began = time.monotonic()
    try:
        for row, _ in rows:
            if row == "data":
                continue  # measured with "line"
            for side, (tree, options) in sides.items():
                if row == "connects-defaults" and side == "before":
                    raw[row] = {"before": raw["connects"]["before"]}  # the same figure
                    continue
                if row == "connects" and side == "after":
                    # The backlog alone: the checkout with the limits off, as before.
                    options = {**COMMON, **LIMITS_OFF, "listen_backlog": "1024"}
                log(f"{row}: {side}")
                server = Gsmail(tree, options, standin, workdir, f"{row}-{side}")
                try:
                    if row == "line":
                        result = slowloris(server, args.slow_cap)
                        raw.setdefault("line", {})[side] = result.get("line", (0.0, "?"))
                        raw.setdefault("data", {})[side] = result.get("data", (0.0, "?"))
                    else:
                        raw.setdefault(row, {})[side] = attacks[row](server)
                finally:
                    server.stop()
                log(f"  {raw[row][side]}")
    finally:
        standin.stop()
    before_name = (
        f"before: `{args.before_src}` (its defaults)" if args.before_src else "before (limits off)"
    )
    lines = [
        f"gsmail abuse limits, one attacker on 127.0.0.1; after: {ROOT} (defaults, "
        "`client_limit_exceptions =` empty); idle_timeout = 10 s on both sides.",
        "",
        f"| attack | {before_name} | after (defaults) |",
        "|---|---|---|",
    ]
    for key, title in rows:
        if key == "connects-defaults":
            after = cells("connects", raw[key]["after"])
            lines.append(f"| {title} | (as above) | {after} |")
            continue
        lines.append(
            f"| {title} | {cells(key, raw[key]['before'])} | {cells(key, raw[key]['after'])} |"
        )
    lines.append("")
    lines.append(f"Total time {time.monotonic() - began:.0f} s; logs in {workdir}.")
    print("\n".join(lines))
    if args.json:
        print(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
