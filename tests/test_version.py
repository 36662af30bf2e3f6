"""
C{--version} of every command prints gsmail's version (L{gsmail.__version__})
and exits 0.
"""

from __future__ import annotations

import os
import re
import sys

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

import gsmail
from tests.util import ROOT, TWISTD


class VersionTests(TestCase):
    """The commands an operator has."""

    timeout = 60

    async def version(self, *argv: str) -> str:
        env = dict(os.environ, PYTHONPATH=ROOT)
        out, err, code = await getProcessOutputAndValue(sys.executable, argv, env=env, path=ROOT)
        self.assertEqual((code, err), (0, b""))
        return out.decode()

    async def test_commands(self) -> None:
        """twistd gsmail, gsmail-check, smtp2gs and gsmail-queue: one line naming the version."""
        expected = {
            ("-c", TWISTD, "gsmail", "--version"): f"gsmail {gsmail.__version__}\n",
            ("-m", "gsmail.check", "--version"): f"gsmail-check (gsmail) {gsmail.__version__}\n",
            ("-m", "gsmail.script", "--version"): f"smtp2gs (gsmail) {gsmail.__version__}\n",
            ("-m", "gsmail.queuectl", "--version"): f"gsmail-queue (gsmail) {gsmail.__version__}\n",
        }
        for argv, line in expected.items():
            self.assertEqual(await self.version(*argv), line)


class PackageVersionTests(SynchronousTestCase):
    """One version, in one place."""

    def test_pep440(self) -> None:
        """gsmail.__version__ is a PEP 440 release version, and setup.py reads it from there."""
        self.assertRegex(
            gsmail.__version__, r"^\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?$"
        )
        with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
            setup = f.read()
        self.assertNotRegex(setup, r"version=\"\d")
        self.assertTrue(re.search(r"gsmail/__init__\.py", setup))
