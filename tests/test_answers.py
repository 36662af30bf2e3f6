"""
Tests for L{gsmail.answers}: reading what GroupServer's form pages say they
did, from pages written as C{gs.content.form.base}'s templates render them.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from gsmail.answers import MAX_STATUS_TEXT, PageResult, read_status
from tests.pages import page

_TOKEN_ERROR = """<dl class="dl-horizontal">
        <dt>Token</dt>
        <dd class="error">The authentication token "s3cret-wrong" does not match the one in the database.</dd>
  </dl>"""


class ReadStatusTests(SynchronousTestCase):
    def test_done(self) -> None:
        """The form again with the status C{Done} is a success."""
        found = read_status(page("Done"))
        self.assertEqual((found.result, found.text), (PageResult.DONE, "Done"))

    def test_form_token_does_not_matter(self) -> None:
        """The success page has the token input: that alone says nothing."""
        body = page("Done")
        self.assertIn(b'name="form.token"', body)
        self.assertIs(read_status(body).result, PageResult.DONE)

    def test_no_user(self) -> None:
        """The bounce page's C{No user found for ...} is its own result."""
        found = read_status(page("No user found for alice@example.org"))
        self.assertEqual(found.result, PageResult.NO_USER)
        self.assertEqual(found.text, "No user found for alice@example.org")

    def test_refused_wrong_token(self) -> None:
        """
        The error status is a refusal, with the failed widget's label and
        never its message, which quotes the submitted token.
        """
        found = read_status(
            page("<p>There is an error:</p>", "alert-block alert-error", _TOKEN_ERROR)
        )
        self.assertEqual(found.result, PageResult.REFUSED)
        self.assertEqual(found.text, "There is an error:")
        self.assertEqual(found.labels, ("Token",))
        self.assertNotIn("s3cret", found.describe())

    def test_refused_several_fields(self) -> None:
        """Several failed widgets: every label, in order."""
        errors = (
            '<dl class="dl-horizontal"><dt>Group identifier</dt><dd class="error">Required'
            ' input is missing.</dd><dt>Token</dt><dd class="error">x</dd></dl>'
        )
        found = read_status(page("<p>There are errors:</p>", "alert-block alert-error", errors))
        self.assertEqual(found.result, PageResult.REFUSED)
        self.assertEqual(found.labels, ("Group identifier", "Token"))

    def test_not_run(self) -> None:
        """A form page without a status message: the action did not run."""
        self.assertIs(read_status(page(None)).result, PageResult.NOT_RUN)

    def test_login_page(self) -> None:
        """A login page (served with 200 to an unauthorised request) did not run."""
        login = (
            b"<html><body><form action='/login.html' method='post'>"
            b"<input name='__ac_name'/><input type='password' name='__ac_password'/>"
            b"</form></body></html>"
        )
        self.assertIs(read_status(login).result, PageResult.NOT_RUN)

    def test_other_status(self) -> None:
        """A status that is none of GroupServer's is reported as such."""
        found = read_status(page("Something <b>odd</b> &amp; new"))
        self.assertEqual((found.result, found.text), (PageResult.OTHER, "Something odd & new"))

    def test_attribute_order_and_quotes(self) -> None:
        """The class may come before the id, in single quotes."""
        body = (
            b"<div class='alert alert-info' role='region' id='gs-content-form-base-message'>"
            b"<div class='gs-content-form-base-message-status'>\n  Done\n</div></div>"
        )
        self.assertIs(read_status(body).result, PageResult.DONE)

    def test_status_text_capped_and_printable(self) -> None:
        """Status text is one printable line of at most L{MAX_STATUS_TEXT} characters."""
        found = read_status(page("x\x1b[31m" + "y" * 5000))
        self.assertLessEqual(len(found.text), MAX_STATUS_TEXT)
        self.assertTrue(found.text.isprintable())

    def test_garbage(self) -> None:
        """Any bytes are read without an exception."""
        for body in (b"", b"\xff\xfe<div", b"<div id='gs-content-form-base-message'", b"{}"):
            self.assertIsNotNone(read_status(body))
