"""
What gsmail.eager's fast path (one C{send(2)} in the reactor turn that made
the write, through Twisted's private C{tcp.Connection} state) buys over a
plain C{transport.write}.

A Twisted server answers each line it gets with one short reply, as an SMTP
listener answers RCPT after RCPT; a client in another process sends a line
and waits for its reply (smtplib's way), N times over loopback. Measured:
the server's CPU time per reply (utime + stime, from /proc) and the round
trip. The two modes run in turns (A B A B ...), each in a fresh server.

    python bench/eager.py [--n 20000] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import median_range, own_cpu_seconds  # noqa: E402

#: The server: argv is the mode ("eager" or "write"); it prints its port.
SERVER = r"""
import sys
from twisted.internet import protocol, reactor
from twisted.protocols.basic import LineReceiver
from gsmail.eager import write_now

EAGER = sys.argv[1] == "eager"
REPLY = b"250 2.1.5 Ok\r\n"

class Answer(LineReceiver):
    def lineReceived(self, line):
        if EAGER:
            write_now(self.transport, REPLY)
        else:
            self.transport.write(REPLY)

    def connectionLost(self, reason):
        reactor.stop()

factory = protocol.Factory.forProtocol(Answer)
port = reactor.listenTCP(0, factory, interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


def one_run(mode: str, n: int) -> tuple[float, float]:
    """
    One fresh server in C{mode}, C{n} round trips.

    @return: the server's CPU microseconds per reply and the round trip's
        wall-clock microseconds.
    """
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, mode], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            f = s.makefile("rb")
            for _ in range(200):  # warm up
                s.sendall(b"RCPT TO:<x@example.com>\r\n")
                f.readline()
            cpu = own_cpu_seconds(server.pid)
            start = time.perf_counter()
            for _ in range(n):
                s.sendall(b"RCPT TO:<x@example.com>\r\n")
                f.readline()
            wall = time.perf_counter() - start
            cpu = own_cpu_seconds(server.pid) - cpu
            f.close()  # else the socket stays open behind the file
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return cpu / n * 1e6, wall / n * 1e6


def main() -> None:
    """Run the modes in turns and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20000, help="round trips per run")
    parser.add_argument("--reps", type=int, default=3, help="runs per mode, interleaved")
    args = parser.parse_args()
    cpu: dict[str, list[float]] = {"eager": [], "write": []}
    rtt: dict[str, list[float]] = {"eager": [], "write": []}
    for _ in range(args.reps):
        for mode in cpu:
            c, r = one_run(mode, args.n)
            cpu[mode].append(c)
            rtt[mode].append(r)
            print(f"{mode}: {c:.1f} µs CPU/reply, {r:.1f} µs round trip", file=sys.stderr)
    print(
        f"| reply written by ({args.n} round trips, {args.reps} runs) | server CPU µs/reply "
        "| round trip µs |"
    )
    print("|---|---|---|")
    for mode, name in (("eager", "write_now (eager)"), ("write", "transport.write")):
        print(f"| {name} | {median_range(cpu[mode])} | {median_range(rtt[mode])} |")


if __name__ == "__main__":
    main()
