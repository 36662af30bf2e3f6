# -*- test-case-name: tests.test_report -*-
"""
C{gsmail-report}: the operator's daily summary (tkmail's monitor, run from
cron or a systemd timer, C{conf/gsmail-report.timer}): the messages gsmail
failed on (C{errors_dir}) and those route policies refused
(C{rejected_dir}) in the last day, by outcome and route, each with its
file; and the outbound queue's recipients still failing. Mailed to
C{postmaster_address} (else C{postmaster@} the first domain, which the
route table keeps as postmaster mail) through gsmail's submission
listener; nothing is mailed when there is nothing to say.

The files are read before the reactor runs; the mail is sent with Twisted's
SMTP client (C{twisted.mail.smtp.sendmail}).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any

import attrs

from gsmail.config import ConfigError, GsmailConfig, load_config, parse_duration

__all__ = ["Entry", "collect", "make_report", "report_message", "main"]


@attrs.frozen
class Entry:
    """One kept message: its sidecar's fields."""

    kind: str  # "error" or "rejected"
    time: float
    route: str
    reply: str
    sender: str
    recipient: str
    path: str
    rule: str = ""
    why: str = ""


def collect(directory: str, kind: str, since: float) -> list[Entry]:
    """
    The messages kept in C{directory} (L{gsmail.inbound.routing.keep_copy})
    at C{since} or later, oldest first. Blocking. A sidecar that cannot be
    read is skipped.
    """
    found: list[Entry] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return found
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                note: dict[str, Any] = json.load(f)
            when = float(note["time"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if when < since:
            continue
        traceback = str(note.get("traceback", "")).strip().splitlines()
        found.append(
            Entry(
                kind=kind,
                time=when,
                route=str(note.get("route", "")),
                reply=str(note.get("reply", "")),
                sender=str(note.get("sender", "")),
                recipient=str(note.get("recipient", "")),
                path=os.path.join(directory, str(note.get("file", name[:-5] + ".eml"))),
                rule=str(note.get("rule", "")),
                why=traceback[-1] if traceback else "",
            )
        )
    found.sort(key=lambda e: e.time)
    return found


def make_report(
    entries: Sequence[Entry], queue_failing: Sequence[str], since: float, now: float, site: str
) -> str | None:
    """
    The report's text, or C{None} when there is nothing to say.

    @param queue_failing: one line per outbound recipient still failing.
    """
    if not entries and not queue_failing:
        return None

    def when(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    lines = [f"gsmail on {site}: {when(since)} to {when(now)}", ""]
    errors = [e for e in entries if e.kind == "error"]
    rejected = [e for e in entries if e.kind == "rejected"]
    lines.append("Messages by outcome:")
    outcomes = Counter((e.kind, e.reply) for e in entries)
    for (kind, reply), count in sorted(outcomes.items()):
        lines.append(f"  {count:5d}  {kind:8s} {reply}")
    if not outcomes:
        lines.append("      none kept")
    by_route = Counter((e.route, e.kind) for e in entries)
    if by_route:
        lines += ["", "By route:"]
        for (route, kind), count in sorted(by_route.items()):
            lines.append(f"  {count:5d}  {kind:8s} {route}")
    if errors:
        lines += ["", "Errors (gsmail could not handle these; the sender was told):"]
        for e in errors:
            lines.append(f"  {when(e.time)}  <{e.sender}> -> <{e.recipient}>  route {e.route}")
            lines.append(f"      {e.reply}")
            if e.why:
                lines.append(f"      {e.why}")
            lines.append(f"      {e.path}")
    if rejected:
        lines += ["", "Refused by route policies:"]
        for e in rejected:
            lines.append(
                f"  {when(e.time)}  <{e.sender}> -> <{e.recipient}>  rule {e.rule}  {e.path}"
            )
    if queue_failing:
        lines += ["", "Outbound recipients still failing:"]
        lines += [f"  {line}" for line in queue_failing]
    return "\n".join(lines) + "\n"


def report_message(text: str, sender: str, recipient: str, site: str, now: float) -> bytes:
    """The report as a message (UTF-8 text)."""
    msg = EmailMessage()
    msg["From"] = sender or f"gsmail <postmaster@{site}>"
    msg["To"] = recipient
    day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
    msg["Subject"] = f"gsmail report for {site}, {day}"
    msg["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    msg["Message-ID"] = make_msgid("gsmail-report", site)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834 §5
    msg.set_content(text, cte="8bit")
    return msg.as_bytes()


def _queue_failing(config: GsmailConfig, reactor: Any) -> Any:
    """The outbound recipients whose last attempt failed, from the running daemon."""
    from twisted.internet.defer import Deferred

    from gsmail.control import connect_control, control_path
    from gsmail.outbound.queue import PENDING

    async def ask() -> list[str]:
        client = await connect_control(reactor, control_path(config))
        try:
            listing = await client.list_queue()
        finally:
            await client.close()
        lines = []
        for env in listing.envelopes:
            for r in env.recipients:
                if r.state == PENDING and r.last_reply[:1] in ("4", "5"):
                    lines.append(f"{env.id} <{r.address}>: {r.last_reply}")
        return lines

    return Deferred.fromCoroutine(ask())


def _submission_address(description: str) -> tuple[str, int]:
    """Host and port to reach a C{tcp:PORT[:interface=HOST]} submission listener."""
    parts = description.split(":")
    port = int(parts[1])
    host = "127.0.0.1"
    for part in parts[2:]:
        key, _, value = part.partition("=")
        if key == "interface" and value not in ("", "0.0.0.0", "::"):
            host = value.replace("\\", "")
    return host, port


def main(argv: Iterable[str] | None = None) -> None:
    """
    C{gsmail-report [-c CONFIG] [-i INSTANCE] [--since 1d] [--to ADDRESS] [--print]}.

    Exit status: 0 (mailed, or nothing to say), 1 (the mail could not be
    sent), 78 (the configuration cannot be used, or no submission listener
    to send through: use C{--print}).
    """
    parser = argparse.ArgumentParser(prog="gsmail-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default="/etc/gsconfig.ini")
    parser.add_argument("-i", "--instance", default="default")
    parser.add_argument("--since", default="1d", help="how far back (a duration, default 1d)")
    parser.add_argument("--to", default="", help="mail it here (default: postmaster_address)")
    parser.add_argument("--print", action="store_true", help="print the report, mail nothing")
    parser.add_argument("--no-queue", action="store_true", help="do not ask the daemon's queue")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        config = load_config(args.config, args.instance)
        since_seconds = parse_duration(args.since)
    except (ConfigError, ValueError) as e:
        sys.stderr.write(f"gsmail-report: {e}\n")
        raise SystemExit(78) from None
    import time

    now = time.time()
    since = now - since_seconds
    entries = collect(config.errors_dir, "error", since) + collect(
        config.rejected_dir, "rejected", since
    )
    site = config.domains[0]
    to = args.to or config.postmaster_address or f"postmaster@{site}"

    from twisted.internet import task

    def run(reactor: Any) -> Any:
        from twisted.internet.defer import Deferred

        async def go() -> None:
            failing: list[str] = []
            if config.submission_endpoint and not args.no_queue:
                try:
                    failing = await _queue_failing(config, reactor)
                except Exception as e:
                    sys.stderr.write(f"gsmail-report: cannot read the queue: {e}\n")
            text = make_report(entries, failing, since, now, site)
            if text is None:
                return
            if args.print:
                sys.stdout.write(text)
                return
            if not config.submission_endpoint.startswith("tcp:"):
                sys.stderr.write(
                    "gsmail-report: no tcp: submission_endpoint to mail the report through;"
                    " use --print\n"
                )
                raise SystemExit(78)
            from twisted.mail.smtp import sendmail

            host, port = _submission_address(config.submission_endpoint)
            message = report_message(text, "", to, site, now)
            kw: dict[str, Any] = {}
            if config.smtp_username:
                kw = {"username": config.smtp_username, "password": config.smtp_password}
            await sendmail(host, "", [to], message, port=port, reactor=reactor, **kw)

        return Deferred.fromCoroutine(go())

    task.react(run)
