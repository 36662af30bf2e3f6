"""
Case 5 helpers: Postfix's smtp-sink as the receiving end (it counts
transactions), a private Postfix instance as the XVERP relay peer, and the
smtplib peer. gsmail itself is started by run.py.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time

from common import free_port, wait_for_port

# The private Postfix's configuration is the tests' (tests/postfixconf.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import postfixconf  # noqa: E402

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
GROUP_ADDRESS = "example@groups.example.com"


def members(count: int) -> list[str]:
    """The member addresses a post goes to."""
    return [f"member{i}@example.net" for i in range(count)]


def group_message(size: int = 4096, message_id: str = "<post.bench@groups.example.com>") -> bytes:
    """A post as GroupServer sends it out (CRLF lines)."""
    header = (
        f"From: Someone <someone@example.org>\r\nTo: <{GROUP_ADDRESS}>\r\n"
        f"Subject: a post\r\nMessage-ID: {message_id}\r\n\r\n"
    )
    return header.encode("ascii") + (b"Z" * 76 + b"\r\n") * max(1, size // 78)


def verp(recipient: str) -> str:
    """The VERP sender of one copy: C{list+user=domain@site}, as Postfix's XVERP makes it."""
    local, domain = GROUP_ADDRESS.split("@")
    user, user_domain = recipient.split("@")
    return f"{local}+{user}={user_domain}@{domain}"


class Sink:
    """smtp-sink on a free port of 127.0.0.1, counting transactions (C{-c})."""

    def __init__(self, workdir: str, name: str) -> None:
        self.port = free_port()
        self.out = os.path.join(workdir, f"{name}-sink.out")
        self._file = open(self.out, "wb")
        self.popen = subprocess.Popen(
            [SMTP_SINK, "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "1024"],
            stdout=self._file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def count(self) -> int:
        """Messages (end of DATA) received so far."""
        with open(self.out, "rb") as f:
            f.seek(max(0, os.path.getsize(self.out) - 200))
            tail = f.read().replace(b"\r", b"\n").split(b"\n")
        for line in reversed(tail):
            if b"mesg=" in line:
                return int(line.rsplit(b"mesg=", 1)[1].split()[0])
        return 0

    def wait_for(self, count: int, timeout: float) -> float:
        """Wait until C{count} messages arrived (or C{timeout}); return the time they had."""
        deadline = time.monotonic() + timeout
        while self.count() < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return time.monotonic()

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(10)
        self._file.close()


def smtplib_fanout(port: int, recipients: list[str], message: bytes) -> None:
    """
    The smtplib peer: one connection, one transaction per recipient with
    its VERP sender (what a Python mailer without XVERP at the relay does).
    """
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        for recipient in recipients:
            client.sendmail(verp(recipient), [recipient], message)


def submit_xverp(
    port: int,
    recipients: list[str],
    message: bytes,
    batch: int = 50,
    time_limit: float = float("inf"),
) -> int:
    """
    Submit as gs.email's XVERP mailer does: the group's address as sender,
    C{XVERP}, recipients in batches of C{batch} per transaction. Stops
    starting transactions after C{time_limit} seconds; returns how many
    recipients were submitted.
    """
    deadline = time.monotonic() + time_limit
    submitted = 0
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
        for i in range(0, len(recipients), batch):
            if time.monotonic() > deadline:
                break
            refused = client.sendmail(
                GROUP_ADDRESS, recipients[i : i + batch], message, mail_options=["XVERP"]
            )
            if refused:
                raise RuntimeError(f"refused: {list(refused)[:3]}")
            submitted += len(recipients[i : i + batch])
    return submitted


def submit_posts(port: int, posts: int, per_post: int) -> float:
    """
    Submit C{posts} different posts, each to its own C{per_post} members in
    one XVERP transaction, back to back, one connection per post: as
    gs.email's queued mail goes out through zope.sendmail's C{SMTPMailer}
    (connect, EHLO, MAIL FROM:<group> XVERP, RCPT per member, DATA, QUIT).
    Returns the seconds from the first connection to the last 250.
    """
    recipients = members(posts * per_post)
    messages = [
        group_message(message_id=f"<post{i}.bench@groups.example.com>") for i in range(posts)
    ]
    start = time.monotonic()
    for i, message in enumerate(messages):
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
            refused = client.sendmail(
                GROUP_ADDRESS,
                recipients[i * per_post : (i + 1) * per_post],
                message,
                mail_options=["XVERP"],
            )
        if refused:
            raise RuntimeError(f"refused: {list(refused)[:3]}")
    return time.monotonic() - start


class PrivatePostfix:
    """
    A Postfix instance of its own (configuration, queue, log in a temporary
    directory), relaying everything to C{relay_port} and letting 127.0.0.0/8
    use XVERP. Needs root and the C{postfix} user (Debian's package).
    """

    def __init__(
        self,
        relay_port: int,
        params: dict[str, str] | None = None,
        services: list[str] | None = None,
    ) -> None:
        """
        @param params: more C{main.cf} parameters (bench/burst.py: the
            site's domain piped into a command), over the defaults.
        @param services: more C{master.cf} lines.
        """
        # Not under the work directory (mode 0700): Postfix's own user must reach it.
        self.directory = tempfile.mkdtemp(prefix="gsmail-bench-pf-", dir="/tmp")
        os.chmod(self.directory, 0o755)
        self.port = free_port()
        etc, _, _ = postfixconf.directories(self.directory)
        params = {
            **postfixconf.main_cf(self.directory, "relay.bench.invalid"),
            "smtpd_authorized_verp_clients": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{relay_port}",
            "default_transport": "smtp",
            "relay_transport": "smtp",
            "smtp_tls_security_level": "none",
            **(params or {}),
        }
        postfixconf.write(etc, params, postfixconf.master_cf(self.port, services or ()))
        self.etc = etc
        done = subprocess.run([POSTFIX, "-c", etc, "start"], capture_output=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"postfix start: {done.stderr.decode(errors='replace')[-500:]}")
        wait_for_port(self.port, 30)

    def stop(self) -> None:
        subprocess.run([POSTFIX, "-c", self.etc, "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.directory, ignore_errors=True)
