"""
SIGKILL chaos in a short form (bench/chaos.py runs the long one): gsmail is
killed with SIGKILL while an MTA-like client sends distinct messages and
retries every one that was not acknowledged. Nothing may be lost, nothing
archived twice, and every restart must bind its port (workers leave with
their main process).
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.util import ROOT

CHAOS = os.path.join(ROOT, "bench", "chaos.py")


class ChaosTests(TestCase):
    timeout = 240

    async def chaos(self, *args: str) -> dict[str, object]:
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [CHAOS, "--json", "--senders", "4", *args],
            env={**os.environ, "PYTHONPATH": ROOT},
            path=ROOT,
        )
        self.assertEqual(code, 0, (out[-2000:], err[-2000:]))
        result: dict[str, object] = json.loads(out.splitlines()[-1])
        return result

    def assertNothingLost(self, result: dict[str, object], kills: int) -> None:
        self.assertEqual(
            {k: result[k] for k in ("kills", "lost", "archived_twice", "unfinished")},
            {"kills": kills, "lost": 0, "archived_twice": 0, "unfinished": 0},
            result,
        )
        self.assertEqual(result["restarts_that_could_not_bind"], 0, result)
        self.assertEqual(result["refused_permanently"], 0, result)

    async def test_one_process(self) -> None:
        """150 messages, gsmail killed 3 times: 0 lost, 0 archived twice."""
        self.assertNothingLost(await self.chaos("--messages", "150", "--kills", "3"), 3)

    async def test_workers_killed_together(self) -> None:
        """
        With C{inbound_workers = 2}, the main process and its workers killed
        at once, 3 times: 0 lost, 0 archived twice, each restart binds.
        """
        result = await self.chaos(
            "--messages", "150", "--kills", "3", "--workers", "2", "--kill-all"
        )
        self.assertNothingLost(result, 3)

    async def test_main_process_killed(self) -> None:
        """
        With C{inbound_workers = 2}, only the main process killed: the
        workers leave with it, so the restart can bind the port.
        """
        result = await self.chaos("--messages", "100", "--kills", "2", "--workers", "2")
        self.assertNothingLost(result, 2)
