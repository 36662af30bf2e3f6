"""
Tests for L{gsmail.report}: reading errors/ and rejected/, and the report's
text (the mailing itself: tests.integration.test_routes).
"""

from __future__ import annotations

import json
import os

from twisted.trial.unittest import SynchronousTestCase

from gsmail.inbound.routing import keep_copy
from gsmail.report import collect, make_report, report_message

DAY = 86400.0


class ReportTests(SynchronousTestCase):
    """What the operator is told."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.source = os.path.join(self.dir, "m.eml")
        with open(self.source, "wb") as f:
            f.write(b"Subject: x\n\nbody\n")

    def keep(self, directory: str, when: float, **note: str) -> str:
        return keep_copy(os.path.join(self.dir, directory), self.source, b"", note, when)

    def test_nothing_to_say(self) -> None:
        """No errors, no refusals, no failing queue: no report at all."""
        self.assertIsNone(make_report([], [], 0.0, DAY, "groups.example.com"))

    def test_last_day_only(self) -> None:
        """Entries older than the window are left out; each has its file and note."""
        self.keep("errors", 10 * DAY - 10, route="old", reply="451 4.3.0 x")
        path = self.keep(
            "errors",
            10 * DAY + 5,
            route="bot@groups.example.com",
            reply="451 4.3.0 Requested action aborted",
            sender="a@example.org",
            recipient="bot@groups.example.com",
            traceback="Traceback...\nValueError: bug",
        )
        [entry] = collect(os.path.join(self.dir, "errors"), "error", 10 * DAY)
        self.assertEqual(
            (entry.route, entry.path, entry.why),
            ("bot@groups.example.com", path, "ValueError: bug"),
        )
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"Subject: x\n\nbody\n")

    def test_text(self) -> None:
        """Counts by outcome and route, the errors with their files, refusals by rule, the queue."""
        self.keep(
            "errors", DAY, route="bot@x", reply="451 4.3.0 aborted", sender="a@x", recipient="bot@x"
        )
        self.keep(
            "rejected",
            DAY,
            route="ann@x",
            reply="550 5.7.1 no",
            rule="accept_from",
            sender="b@x",
            recipient="ann@x",
        )
        self.keep(
            "rejected",
            DAY,
            route="ann@x",
            reply="550 5.7.1 no",
            rule="accept_from",
            sender="c@x",
            recipient="ann@x",
        )
        entries = collect(os.path.join(self.dir, "errors"), "error", 0) + collect(
            os.path.join(self.dir, "rejected"), "rejected", 0
        )
        text = make_report(entries, ["q1 <m@example.net>: 451 4.4.1 no answer"], 0, 2 * DAY, "x")
        assert text is not None
        self.assertIn("      2  rejected 550 5.7.1 no\n", text)
        self.assertIn("      1  error    451 4.3.0 aborted\n", text)
        self.assertIn("rule accept_from", text)
        self.assertIn("q1 <m@example.net>: 451 4.4.1 no answer", text)
        self.assertIn(entries[0].path, text)
        message = report_message(text, "", "admin@example.net", "x", 2 * DAY)
        self.assertIn(b"Auto-Submitted: auto-generated", message)
        self.assertIn(b"Subject: gsmail report for x, 1970-01-03", message)

    def test_unreadable_note_skipped(self) -> None:
        """A sidecar that is not JSON is skipped, not fatal."""
        os.makedirs(os.path.join(self.dir, "errors"))
        with open(os.path.join(self.dir, "errors", "bad.json"), "w") as f:
            f.write("{")
        with open(os.path.join(self.dir, "errors", "ok.json"), "w") as f:
            json.dump({"time": 5, "route": "r"}, f)
        self.assertEqual(
            [e.route for e in collect(os.path.join(self.dir, "errors"), "error", 0)], ["r"]
        )
