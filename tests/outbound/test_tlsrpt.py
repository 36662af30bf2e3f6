"""
Tests for L{gsmail.outbound.tlsrpt}: TLS-RPT (RFC 8460) counts per policy
domain and day, kept across a restart, and the JSON report made of them.
"""

from __future__ import annotations

import json
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gsmail.outbound.mtasts.policy import parse_policy
from gsmail.outbound.tlsrpt import FLUSH_DELAY, TLSReportCounts, main, make_report

POLICY = parse_policy("version: STSv1\nmode: enforce\nmx: mx.example.net\nmax_age: 86400\n")
#: 2023-11-14T22:13:20Z.
START = 1_700_000_000.0


class TLSReportTests(SynchronousTestCase):
    """Counting, writing, and the report."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.clock = Clock()
        self.clock.advance(START)

    def counts(self) -> TLSReportCounts:
        counts = TLSReportCounts(self.directory, self.clock)
        counts.load()
        return counts

    def test_report(self) -> None:
        """Successes and failures by result type and MX host make the RFC 8460 report."""
        counts = self.counts()
        counts.success("example.net", POLICY)
        counts.success("example.net", POLICY)
        counts.failure("example.net", POLICY, "certificate-host-mismatch", "mx.example.net")
        counts.failure("example.net", POLICY, "sts-policy-fetch-error", "")
        self.clock.advance(FLUSH_DELAY)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        report = make_report(
            self.directory, "2023-11-14", organization="Example", contact="postmaster@example.com"
        )
        self.assertEqual(
            report,
            {
                "organization-name": "Example",
                "date-range": {
                    "start-datetime": "2023-11-14T00:00:00Z",
                    "end-datetime": "2023-11-14T23:59:59Z",
                },
                "contact-info": "postmaster@example.com",
                "report-id": "2023-11-14.Example",
                "policies": [
                    {
                        "policy": {
                            "policy-type": "sts",
                            "policy-string": [
                                "version: STSv1",
                                "mode: enforce",
                                "mx: mx.example.net",
                                "max_age: 86400",
                            ],
                            "policy-domain": "example.net",
                            "mx-host": ["mx.example.net"],
                        },
                        "summary": {
                            "total-successful-session-count": 2,
                            "total-failure-session-count": 2,
                        },
                        "failure-details": [
                            {
                                "result-type": "certificate-host-mismatch",
                                "receiving-mx-hostname": "mx.example.net",
                                "failed-session-count": 1,
                            },
                            {"result-type": "sts-policy-fetch-error", "failed-session-count": 1},
                        ],
                    }
                ],
            },
        )

    def test_restart_continues(self) -> None:
        """Counts flushed at stop are read back by the next start and added to."""
        counts = self.counts()
        counts.success("example.net", POLICY)
        self.successResultOf(counts.flush())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        again = self.counts()
        again.success("example.net", POLICY)
        self.successResultOf(again.flush())
        with open(os.path.join(self.directory, "2023-11-14.json")) as f:
            self.assertEqual(json.load(f)["example.net"]["success"], 2)

    def test_new_day(self) -> None:
        """After midnight UTC counts go to the next day's file; the old day's is written."""
        counts = self.counts()
        counts.success("example.net", POLICY)
        self.clock.advance(86400)
        counts.success("example.net", POLICY)
        self.successResultOf(counts.flush())
        self.assertEqual(sorted(os.listdir(self.directory)), ["2023-11-14.json", "2023-11-15.json"])

    def test_command(self) -> None:
        """C{gsmail-tlsrpt} prints the day's report as JSON; a bad day is a usage error."""
        counts = self.counts()
        counts.success("example.net", POLICY)
        self.successResultOf(counts.flush())
        printed: list[str] = []
        argv = [self.directory, "--organization", "Ex", "--contact", "pm@example.com"]
        self.assertEqual(main([*argv, "--day", "2023-11-14"], out=printed.append), 0)
        report = json.loads(printed[0])
        self.assertEqual(report["policies"][0]["summary"]["total-successful-session-count"], 1)
        errors: list[str] = []
        self.assertEqual(main([*argv, "--day", "yesterday"], printed.append, errors.append), 64)
        self.assertIn("yesterday", errors[0])
