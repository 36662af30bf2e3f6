# -*- test-case-name: tests.outbound.test_tlsrpt -*-
"""
TLS reporting (RFC 8460) for MTA-STS: the counts of TLS sessions to each
policy domain's MX hosts, per UTC day, and the JSON report made from them.

L{TLSReportCounts} counts in memory and writes the day's counts to
C{DIRECTORY/YYYY-MM-DD.json} (atomically, off the reactor thread) a little
after they change and when gsmail stops; a restart carries on counting
from the file. L{make_report} (and the C{gsmail-tlsrpt} command) turns one
day's file into the report of RFC 8460 §4. Sending reports to the
addresses in domains' C{_smtp._tls} TXT records is not done: an operator
who wants to can mail or POST the command's output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from gsmail.outbound.mtasts.cache import Blocking, run_inline, write_atomically
from gsmail.outbound.mtasts.policy import Policy

__all__ = ["TLSReportCounts", "main", "make_report"]

log = Logger()

#: Seconds between a change and the write of the day's file.
FLUSH_DELAY: Final = 60.0


def _day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d")


class TLSReportCounts:
    """
    Successful and failed TLS sessions per policy domain, per UTC day.

    The day's file holds, per policy domain: the policy (its text and
    mode), C{success}: sessions whose certificate was verified under the
    policy, and C{failures}: counts by RFC 8460 result type and MX host.

    @ivar directory: where the day files are.
    """

    def __init__(self, directory: str, clock: Any, blocking: Blocking | None = None) -> None:
        """
        @param clock: an C{IReactorTime}: the day, and the delayed writes.
        @param blocking: runs the writes off the reactor thread; C{None}: inline.
        """
        self.directory = os.path.abspath(directory)
        self._clock = clock
        self._blocking = blocking or run_inline
        self._day = ""
        self._counts: dict[str, dict[str, Any]] = {}
        self._timer: IDelayedCall | None = None

    def load(self) -> None:
        """Create the directory and read today's counts. Blocking: at start-up."""
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        self._day = _day(self._clock.seconds())
        self._counts = read_day(self.directory, self._day)

    def success(self, domain: str, policy: Policy) -> None:
        """Count a session to an MX of C{domain} that met its policy."""
        entry = self._entry(domain, policy)
        entry["success"] += 1
        self._changed()

    def failure(self, domain: str, policy: Policy | None, result_type: str, mx_host: str) -> None:
        """
        Count a failed session (or a failed policy fetch, C{mx_host} C{""}).

        @param result_type: RFC 8460 §4.3.2: C{starttls-not-supported},
            C{certificate-host-mismatch}, C{certificate-expired},
            C{certificate-not-trusted}, C{validation-failure},
            C{sts-policy-fetch-error}, C{sts-policy-invalid},
            C{sts-webpki-invalid}.
        """
        entry = self._entry(domain, policy)
        by_host = entry["failures"].setdefault(result_type, {})
        by_host[mx_host] = by_host.get(mx_host, 0) + 1
        self._changed()

    def _entry(self, domain: str, policy: Policy | None) -> dict[str, Any]:
        day = _day(self._clock.seconds())
        if day != self._day:
            if self._day and self._counts:
                self._write(self._day, self._counts)
            self._day = day
            self._counts = {}
        entry = self._counts.setdefault(
            domain, {"policy": "", "mode": "", "success": 0, "failures": {}}
        )
        if policy is not None:
            entry["policy"] = policy.text
            entry["mode"] = policy.mode
        return entry

    def _changed(self) -> None:
        if self._timer is None or not self._timer.active():
            self._timer = self._clock.callLater(FLUSH_DELAY, self.flush)

    def flush(self) -> Deferred[None]:
        """Write the day's counts now (also at stop)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return self._write(self._day, self._counts)

    def _write(self, day: str, counts: dict[str, dict[str, Any]]) -> Deferred[None]:
        if not day:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        path = os.path.join(self.directory, day + ".json")
        data = json.dumps(counts, sort_keys=True).encode()
        d = self._blocking(lambda: write_atomically(path, data))

        def failed(failure: Any) -> None:
            log.error(
                "Could not write the TLS report counts {path}: {error}",
                path=path,
                error=str(failure.value),
            )

        return d.addErrback(failed)


def read_day(directory: str, day: str) -> dict[str, dict[str, Any]]:
    """
    The counts of C{day} (C{YYYY-MM-DD}) in C{directory}; empty if none.
    Blocking.
    """
    try:
        with open(os.path.join(directory, day + ".json"), "rb") as f:
            counts = json.loads(f.read())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warn("Ignoring the unreadable TLS report counts of {day}: {error}", day=day, error=e)
        return {}
    return counts if isinstance(counts, dict) else {}


def make_report(
    directory: str,
    day: str,
    *,
    organization: str,
    contact: str,
    report_id: str = "",
    domain: str = "",
) -> dict[str, Any]:
    """
    The RFC 8460 §4 report of one UTC day's counts, for every policy domain
    (or only C{domain}).

    @param day: C{YYYY-MM-DD}.
    @param organization: C{organization-name}.
    @param contact: C{contact-info} (an address).
    @return: the report, to be serialised with C{json.dumps}.
    @raise ValueError: C{day} is not a date.
    """
    start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
    end = start + timedelta(days=1)
    counts = read_day(directory, day)
    policies = []
    for name, entry in sorted(counts.items()):
        if domain and name != domain:
            continue
        text = entry.get("policy", "")
        mx = [
            line.partition(":")[2].strip()
            for line in text.splitlines()
            if line.partition(":")[0].strip() == "mx"
        ]
        failures = entry.get("failures", {})
        details = [
            {
                "result-type": result_type,
                "receiving-mx-hostname": host,
                "failed-session-count": count,
            }
            if host
            else {"result-type": result_type, "failed-session-count": count}
            for result_type, by_host in sorted(failures.items())
            for host, count in sorted(by_host.items())
        ]
        policies.append(
            {
                "policy": {
                    "policy-type": "sts" if text else "no-policy-found",
                    "policy-string": [line for line in text.splitlines() if line.strip()],
                    "policy-domain": name,
                    "mx-host": mx,
                },
                "summary": {
                    "total-successful-session-count": entry.get("success", 0),
                    "total-failure-session-count": sum(d["failed-session-count"] for d in details),
                },
                "failure-details": details,
            }
        )
    return {
        "organization-name": organization,
        "date-range": {
            "start-datetime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "end-datetime": (end - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "contact-info": contact,
        "report-id": report_id or f"{day}.{organization}",
        "policies": policies,
    }


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def main(
    argv: list[str] | None = None,
    out: Callable[[str], Any] | None = None,
    err: Callable[[str], Any] | None = None,
) -> int:
    """
    C{gsmail-tlsrpt DIRECTORY [--day YYYY-MM-DD] --organization NAME
    --contact ADDRESS [--domain DOMAIN]}: print one day's TLS report (RFC
    8460) as JSON; the day defaults to yesterday (UTC).

    @return: the exit status (64, EX_USAGE, for a bad date).
    """
    parser = argparse.ArgumentParser(
        prog="gsmail-tlsrpt", description="Print an RFC 8460 TLS report of one day's counts."
    )
    parser.add_argument("directory", help="the tlsrpt directory under mta_sts_cache_dir")
    parser.add_argument("--day", default="", help="YYYY-MM-DD (UTC); default yesterday")
    parser.add_argument("--organization", required=True)
    parser.add_argument("--contact", required=True)
    parser.add_argument("--domain", default="", help="only this policy domain")
    args = parser.parse_args(argv)
    day = args.day or _day(time.time() - 86400)
    try:
        report = make_report(
            args.directory,
            day,
            organization=args.organization,
            contact=args.contact,
            domain=args.domain,
        )
    except ValueError as e:
        (err or _stderr)(f"gsmail-tlsrpt: {e}")
        return 64
    (out or print)(json.dumps(report, indent=2))
    return 0
