"""
Helpers shared by the benchmark harness and its load generators: messages,
GroupServer form bodies, percentiles, and /proc readings of a process.
"""

from __future__ import annotations

import base64
import os
import resource
import socket
import statistics
import time
import uuid

TOKEN = "bench-token"
DOMAIN = "groups.example.com"
GROUP = "example"
LIST_ADDRESS = f"{GROUP}@{DOMAIN}"
SENDER = "sender@example.org"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_BODY_LINE = b"X" * 76


def new_message_id() -> str:
    """A unique Message-ID, so the ledger never takes one message for another."""
    return f"<{uuid.uuid4().hex}@bench.example.org>"


def make_message(message_id: str, size: int, to: str = LIST_ADDRESS) -> bytes:
    """
    A message with CRLF line endings and a body of about C{size} bytes
    (76-character lines, as smtp-source sends), no line starting with a dot.
    The body's first line holds the Message-ID: GroupServer (and the
    stand-in) archive a message once per post id, which counts the body but
    not the Message-ID, so messages that differ only there would be one post.
    """
    header = (
        f"From: Bench <{SENDER}>\r\nTo: <{to}>\r\nSubject: bench\r\n"
        f"Date: Sat, 21 Nov 2026 00:00:00 +0000\r\nMessage-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode("ascii")
    lines = max(1, size // (len(_BODY_LINE) + 2))
    first = message_id.encode("ascii")[: len(_BODY_LINE)].ljust(len(_BODY_LINE), b"X")
    return header + first + b"\r\n" + (_BODY_LINE + b"\r\n") * (lines - 1)


def form_body(fields: dict[str, str], message: bytes, boundary: str) -> bytes:
    """
    A C{multipart/form-data} body as GroupServer's add-email page takes it:
    the string fields, then C{form.emailMessage} as base64.
    """
    out = []
    for name, value in fields.items():
        out.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    out.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="form.emailMessage"\r\n'
        "Content-Type: text/plain\r\n\r\n".encode()
    )
    out.append(base64.b64encode(message))
    out.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(out)


def add_email_fields(group_id: str = GROUP, token: str = TOKEN) -> dict[str, str]:
    """The add-email page's fields but the message."""
    return {
        "form.groupId": group_id,
        "form.timeSource": "server",
        "form.token": token,
        "form.actions.add": "Add",
    }


def percentile(values: list[float], q: float) -> float:
    """The C{q}-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: list[float]) -> float:
    """The median of the values that are not NaN; NaN when there are none."""
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def fmt(value: float, digits: int = 1) -> str:
    """A figure with thousands separators and C{digits} decimals; C{—} for NaN."""
    return "—" if value != value else f"{value:,.{digits}f}"


def times(value: float) -> str:
    """A ratio as the tables show it: C{0.72×}; C{—} for NaN (nothing to compare with)."""
    return "—" if value != value else f"{value:,.2f}×"


def median_range(values: list[float], digits: int = 1) -> str:
    """
    The median of C{values} and, beside it, their range: C{"512.0 (480.2–530.9)"};
    a single value alone; C{—} when there is none. Every table of the harness
    shows its medians this way, so a reader sees how far the runs spread.
    """
    values = [v for v in values if v == v]
    if not values:
        return "—"
    middle = fmt(statistics.median(values), digits)
    if len(values) == 1:
        return middle
    return f"{middle} ({fmt(min(values), digits)}–{fmt(max(values), digits)})"


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (/proc/loadavg): how busy the shared machine is."""
    with open("/proc/loadavg") as f:
        one, five, fifteen = (float(x) for x in f.read().split()[:3])
    return one, five, fifteen


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name: fields[0] is field 3 (state)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """The live processes below C{pid} (gsmail's inbound workers), by their parent ids."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parents.setdefault(int(_stat_fields(int(name))[1]), []).append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def own_cpu_seconds(pid: int) -> float:
    """utime + stime of the process itself, in seconds: without its children."""
    return sum(int(x) for x in _stat_fields(pid)[11:13]) / _CLK_TCK


def cpu_seconds(pid: int) -> float:
    """
    utime + stime of a process, its reaped children (cutime + cstime) and its
    live descendants, in seconds: all the CPU a server with worker processes
    used.
    """
    # utime is field 14, stime 15, cutime 16, cstime 17.
    total = sum(int(x) for x in _stat_fields(pid)[11:15])
    for child in descendants(pid):
        try:
            total += sum(int(x) for x in _stat_fields(child)[11:13])
        except OSError:
            continue  # it ended meanwhile: then it is in cutime
    return total / _CLK_TCK


def peak_rss_mib(pid: int) -> float:
    """
    VmHWM (peak resident set size) of a process, plus those of its live
    descendants (an upper bound of their peak together), in MiB.
    """
    total = 0.0
    for each in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{each}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total if total else float("nan")


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process: resident set size now and at its peak, in MiB."""
    found = {"VmRSS:": float("nan"), "VmHWM:": float("nan")}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(None, 1)[0] if line.strip() else ""
            if key in found:
                found[key] = int(line.split()[1]) / 1024
    return found["VmRSS:"], found["VmHWM:"]


def wakeups(pid: int) -> int:
    """
    Voluntary context switches of a process's threads (/proc/PID/task/*/status):
    for a reactor, about one per time it waited for its sockets and woke up.
    """
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:
            continue  # the thread ended meanwhile
    return total


def raise_fd_limit(wanted: int) -> int:
    """
    Raise this process's soft limit on open files to at least C{wanted}
    (bounded by the hard limit); children inherit it. Returns the new limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


#: twistd, run as C{python -c TWISTD ...} (no console script needed).
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def twistd_argv(*arguments: str) -> list[str]:
    """This interpreter running C{twistd -n --pidfile= ARGUMENTS...}."""
    import sys

    return [sys.executable, "-c", TWISTD, "-n", "--pidfile=", *arguments]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_log(path: str, needle: str, count: int, timeout: float = 20.0) -> None:
    """Wait until the file at C{path} has C{count} lines containing C{needle}.

    @raise TimeoutError: it did not within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, errors="replace") as f:
                if sum(needle in line for line in f) >= count:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: fewer than {count} lines with {needle!r}")
        time.sleep(0.05)


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:C{port}.

    @raise TimeoutError: nothing did within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)
