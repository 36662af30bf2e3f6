"""
A first end-to-end check: Python's smtplib sends one message to a running
gsmail (embedded stand-in) over ESMTP, and the post is on disk.
"""

from __future__ import annotations

import os
import smtplib

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.util import make_config, port_of, start_service


class SmokeTests(TestCase):
    """One message through the real service."""

    async def test_smtplib_post(self) -> None:
        """A message sent with smtplib is posted to its group once, with the trace fields."""
        service = start_service(self, make_config(self.mktemp()))
        port = port_of(service, "smtp")

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                return s.sendmail(
                    "alice@example.org",
                    ["example@groups.example.com"],
                    b"Message-ID: <smoke@example.org>\r\nSubject: hi\r\n\r\nhello\r\n",
                )

        refused = await deferToThread(send)
        self.assertEqual(refused, {})
        [post] = service.standin.posts("example")
        self.assertTrue(post.endswith(b"Message-ID: <smoke@example.org>\nSubject: hi\n\nhello\n"))
        self.assertIn(b"X-Original-To: example@groups.example.com\n", post)

    async def test_spool_files_reused_and_removed(self) -> None:
        """
        Messages received one after another reuse one spool file (no file
        made per message), and once the service stops the spool directory
        is empty.
        """
        config = make_config(self.mktemp())
        service = start_service(self, config)
        port = port_of(service, "smtp")

        def send(n: int) -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                return s.sendmail(
                    "alice@example.org",
                    ["example@groups.example.com"],
                    b"Message-ID: <spool%d@example.org>\r\nSubject: %d\r\n\r\nhello\r\n" % (n, n),
                )

        for n in range(3):
            self.assertEqual(await deferToThread(send, n), {})
            self.assertEqual(len(os.listdir(config.spool_dir)), 1)
        self.assertEqual(len(service.standin.posts("example")), 3)
        await service.stopService()
        self.assertEqual(os.listdir(config.spool_dir), [])
