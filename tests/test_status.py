"""
Tests for L{gsmail.status}: the table of replies and the mapping of failures
to replies.
"""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase

from gsmail import status
from gsmail.status import GroupServerError, Reply

ALL = {name: value for name, value in vars(status).items() if isinstance(value, Reply)}


class TableTests(SynchronousTestCase):
    """Every reply in the table is well formed."""

    def test_enhanced_code_matches_class(self) -> None:
        """The enhanced code's class is the reply code's first digit (RFC 3463 §2); 3xx has none."""
        for name, reply in ALL.items():
            if reply.code // 100 == 3:
                self.assertEqual(reply.enhanced, "", name)
                continue
            self.assertRegex(reply.enhanced, r"^[245]\.\d{1,3}\.\d{1,3}$", name)
            self.assertEqual(reply.enhanced[0], str(reply.code)[0], name)

    def test_text_is_one_line(self) -> None:
        """No reply text can break the framing."""
        for name, reply in ALL.items():
            self.assertFalse(re.search(r"[\r\n]", reply.text), name)

    def test_groupserver_codes_as_smtp2gs(self) -> None:
        """The codes smtp2gs used keep their meaning and exit values (sysexits)."""
        expected = {
            "GROUPSERVER_UNREACHABLE": ("4.4.4", status.EX_PROTOCOL),
            "GROUPSERVER_BAD_REPLY": ("4.5.0", status.EX_PROTOCOL),
            "GROUPSERVER_ERROR": ("4.5.0", status.EX_PROTOCOL),
            "TOO_BUSY": ("4.4.5", status.EX_TEMPFAIL),
            "CONFIG_ERROR": ("4.3.5", status.EX_CONFIG),
            "NO_HOST_IN_URL": ("4.5.2", status.EX_USAGE),
            "NO_SUCH_GROUP": ("5.1.1", status.EX_NOUSER),
            "NO_ORIGINAL_TO": ("5.1.3", status.EX_DATAERR),
            "EMPTY_MESSAGE": ("5.3.0", status.EX_DATAERR),
            "MESSAGE_TOO_BIG": ("5.3.4", status.EX_DATAERR),
            "BOUNCE_RECORDED": ("2.1.5", status.EX_OK),
        }
        for name, (enhanced, exit_code) in expected.items():
            self.assertEqual((ALL[name].enhanced, ALL[name].exit_code), (enhanced, exit_code), name)

    def test_server_faults_are_transient(self) -> None:
        """Every fault of GroupServer or of gsmail itself is a 4xx: mail is never bounced for it."""
        for name in [
            "GROUPSERVER_UNREACHABLE",
            "GROUPSERVER_BAD_REPLY",
            "GROUPSERVER_ERROR",
            "GROUPSERVER_TIMEOUT",
            "OUTCOME_UNKNOWN",
            "TOO_BUSY",
            "LOCAL_ERROR",
            "CONFIG_ERROR",
        ]:
            self.assertTrue(ALL[name].is_transient, name)

    def test_encode(self) -> None:
        """Replies encode as 'code enhanced text' CRLF, continued lines with a hyphen."""
        self.assertEqual(status.NO_SUCH_GROUP.encode(), b"550 5.1.1 No such group\r\n")
        self.assertEqual(status.START_DATA.encode(), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(status.multiline(250, ["a", "b"]), b"250-a\r\n250 b\r\n")
        self.assertEqual(status.OK.encode(continued=True), b"250-2.0.0 Ok\r\n")

    def test_status_line(self) -> None:
        """status_line starts with the D.S.N, as Postfix's pipe(8) expects."""
        self.assertEqual(
            status.GROUPSERVER_UNREACHABLE.status_line(), "4.4.4 Error connecting to GroupServer"
        )


class MappingTests(SynchronousTestCase):
    """From failures to replies."""

    def test_groupserver_error(self) -> None:
        """A GroupServerError carries its reply; its text never holds more than the detail."""
        error = GroupServerError(status.GROUPSERVER_ERROR, "HTTP 502", outcome_unknown=True)
        self.assertIs(status.reply_for_exception(error), status.GROUPSERVER_ERROR)
        self.assertTrue(error.outcome_unknown)
        self.assertEqual(str(error), "4.5.0 Error communicating with GroupServer (HTTP 502)")

    def test_anything_else_is_transient(self) -> None:
        """An unexpected exception maps to 451 4.3.0, never to a permanent reply."""
        self.assertIs(status.reply_for_exception(RuntimeError("x")), status.LOCAL_ERROR)
        self.assertIs(status.reply_for_exception(None), status.LOCAL_ERROR)

    def test_worst(self) -> None:
        """For one SMTP reply: a transient failure wins, then a permanent one, else success."""
        ok, temp, perm = status.POSTED, status.GROUPSERVER_ERROR, status.MESSAGE_TOO_BIG
        self.assertIs(status.worst([ok, perm, temp]), temp)
        self.assertIs(status.worst([ok, perm]), perm)
        self.assertIs(status.worst([status.ALREADY_DELIVERED, ok]), status.ALREADY_DELIVERED)
