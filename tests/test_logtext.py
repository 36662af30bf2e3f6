"""
Tests for L{gsmail.logtext}: values from the network made safe for a log
line.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from gsmail.logtext import MAX_LOGGED, printable


class PrintableTests(SynchronousTestCase):
    """L{printable}."""

    def test_plain_text_unchanged(self) -> None:
        """Printable text, UTF-8 included, is logged as it is."""
        for text in ["<a@example.org>", "grüße@bücher.example", ""]:
            self.assertEqual(printable(text), text)

    def test_controls_escaped(self) -> None:
        """ESC, BEL, NUL, DEL, CR, LF, U+0085 and U+2028 become escapes."""
        self.assertEqual(
            printable("a\x1b[31mb\x07\x00\x7f\r\n\x85\u2028"),
            "a\\x1b[31mb\\x07\\x00\\x7f\\x0d\\x0a\\x85\\u2028",
        )

    def test_backslash_doubled(self) -> None:
        """A backslash is doubled, so an escape cannot be forged."""
        self.assertEqual(printable("a\\x1b"), "a\\\\x1b")

    def test_bytes(self) -> None:
        """Bytes are read as UTF-8; a byte that is not UTF-8 is escaped."""
        self.assertEqual(printable(b"\xff\x1bok\xc3\xa9"), "\\xff\\x1boké")

    def test_capped(self) -> None:
        """A 200 KB value is cut at the limit with a marker counting what was left out."""
        text = printable("x" * 200_000)
        self.assertEqual(text, "x" * MAX_LOGGED + f"...[{200_000 - MAX_LOGGED} more characters]")

    def test_cap_counts_escapes(self) -> None:
        """The limit counts the escapes written, not the characters read."""
        text = printable("\x1b" * 100, limit=10)
        self.assertEqual(text, "\\x1b\\x1b...[98 more characters]")

    def test_other_objects(self) -> None:
        """Anything else goes through str()."""
        self.assertEqual(printable(42), "42")

    @given(st.text(max_size=600))
    def test_always_one_safe_line(self, text: str) -> None:
        """Whatever the value, the result is printable and bounded."""
        out = printable(text)
        self.assertTrue(out.isprintable())
        self.assertLessEqual(len(out), MAX_LOGGED + len("...[600 more characters]"))
