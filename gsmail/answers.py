# -*- test-case-name: tests.test_answers -*-
"""
How GroupServer says what its form pages did: the status message.

GroupServer's add-email, relay and bounce pages are C{zope.formlib} forms
(C{gs.content.form.base.SiteForm}). Whatever happened, they answer 200 and
render their template inside the site's layout, the form I{again} included
(with its C{form.token} input). What the action did is only in the status
message (C{gs.content.form.base/browser/templates/statusmessage.pt})::

    <div id="gs-content-form-base-message" class="alert alert-info" role="region">
      <button ...>&times;</button>
      <div class="gs-content-form-base-message-status">Done</div>
      ...
    </div>

  - C{Done}: the action ran (C{addemail.py}, C{gs.profile.email.relay}
    C{form.py}, C{gs.group.member.bounce} C{handlebounce.py}).
  - C{No user found for ADDRESS} on the bounce page: it ran, and nobody has
    that address (C{handlebounce.py}).
  - class C{alert-block alert-error}, status C{<p>There is an error:</p>} or
    C{<p>There are errors:</p>}: validation failed (a wrong token, a missing
    or bad field) and nothing was done; the failed widgets' labels are the
    C{<dt>}s of the same div. Their C{<dd>}s may quote the submitted token
    (C{gs.auth.token}), so they are never read.
  - no status message at all: the action did not run (a login page, a
    maintenance or proxy page served with 200, the button field missing).

See C{shared/groupserver-protocol.md}, "What a page answers". Reading is a
few C{bytes.find} calls over the page (a whole site page is tens of KiB),
not an HTML parse: it runs once per post in the reactor thread.
"""

from __future__ import annotations

import enum
import html
import re
from typing import Final

import attrs

__all__ = ["PageResult", "PageStatus", "read_status"]

#: The longest status text kept, in characters (it is logged).
MAX_STATUS_TEXT: Final = 200
#: The most widget labels kept from a refusal.
MAX_LABELS: Final = 8


class PageResult(enum.Enum):
    """What a form page's answer says its action did."""

    #: Status C{Done}: the action ran.
    DONE = "done"
    #: The bounce page's C{No user found for ...}: it ran; nobody to record.
    NO_USER = "no user"
    #: An C{alert-error} status: validation failed, nothing was done.
    REFUSED = "refused"
    #: No status message: the page's action did not run, nothing was done.
    NOT_RUN = "not run"
    #: A status message that is none of the above: what happened is not
    #: known.
    OTHER = "other"


@attrs.frozen
class PageStatus:
    """
    The status message of a page's answer.

    @ivar result: what it says the action did.
    @ivar text: the status text, tags removed, entities decoded, whitespace
        runs made one space, at most L{MAX_STATUS_TEXT} characters (C{""}
        when there is no status message).
    @ivar labels: for L{PageResult.REFUSED}, the labels of the widgets in
        error (e.g. C{("Token",)}), at most L{MAX_LABELS}; never their
        messages, which may quote the token.
    """

    result: PageResult
    text: str = ""
    labels: tuple[str, ...] = ()

    def describe(self) -> str:
        """A one-line, token-free description for the log and the reply."""
        if self.result is PageResult.NOT_RUN:
            return "no status message (the action did not run)"
        text = repr(self.text)
        if self.labels:
            return f"status {text} ({', '.join(self.labels)})"
        return f"status {text}"


# The message div's opening tag; the id is static in the template, the class
# comes from tal:attributes, so attribute order is not relied on.
_MESSAGE_TAG: Final = re.compile(
    rb"""<div\b[^>]*?\bid\s*=\s*["']gs-content-form-base-message["'][^>]*>""", re.I
)
_CLASS_ATTR: Final = re.compile(rb"""\bclass\s*=\s*(?:"([^"]*)"|'([^']*)')""", re.I)
_STATUS_DIV: Final = re.compile(
    rb"""<div\b[^>]*?\bclass\s*=\s*["'][^"']*\bgs-content-form-base-message-status\b"""
    rb"""[^"']*["'][^>]*>(.*?)</div\s*>""",
    re.I | re.S,
)
_LABEL: Final = re.compile(rb"<dt\b[^>]*>(.*?)</dt\s*>", re.I | re.S)
_TAG: Final = re.compile(r"<[^>]*>")
_DONE: Final = "Done"
_NO_USER: Final = "No user found for"
# The message div ends before this much of the page; a bound for the search
# of its labels, not for correctness.
_MESSAGE_SPAN: Final = 64 * 1024
_END_COMMENT: Final = b"<!--gs-content-form-base-message-->"
# Where widget labels are looked for when the closing comment is missing.
_LABEL_SPAN: Final = 16 * 1024


def read_status(page: bytes) -> PageStatus:
    """
    Read the status message of a GroupServer form page's answer.

    @param page: the answer's body (HTML, any charset that is ASCII-compatible;
        GroupServer's is UTF-8).
    @return: the L{PageStatus}; never raises, whatever the bytes.
    """
    tag = _MESSAGE_TAG.search(page)
    if tag is None:
        return PageStatus(PageResult.NOT_RUN)
    span = page[tag.end() : tag.end() + _MESSAGE_SPAN]
    found = _STATUS_DIV.search(span)
    text = _text(found.group(1)) if found is not None else ""
    classes = _CLASS_ATTR.search(tag.group(0))
    class_value = b""
    if classes is not None:
        class_value = classes.group(1) if classes.group(1) is not None else classes.group(2)
    if b"alert-error" in class_value.split():
        labels = tuple(
            _text(m.group(1)) for m in _LABEL.finditer(span, 0, _message_end(span, found))
        )
        return PageStatus(PageResult.REFUSED, text, tuple(x for x in labels if x)[:MAX_LABELS])
    if text == _DONE:
        return PageStatus(PageResult.DONE, text)
    if text.startswith(_NO_USER):
        return PageStatus(PageResult.NO_USER, text)
    return PageStatus(PageResult.OTHER, text)


def _message_end(span: bytes, status: re.Match[bytes] | None) -> int:
    """
    Where the message div ends in C{span}: the template closes both the
    status div and the message div with the comment C{_END_COMMENT}; the
    second one after the status ends the message.
    """
    start = status.end() if status is not None else 0
    first = span.find(_END_COMMENT, start)
    if first < 0:
        return min(len(span), start + _LABEL_SPAN)
    if span[start:first].strip():
        return first  # the status div's own comment is missing
    second = span.find(_END_COMMENT, first + len(_END_COMMENT))
    return second if second >= 0 else min(len(span), start + _LABEL_SPAN)


def _text(fragment: bytes) -> str:
    """Markup to one line of plain text, capped."""
    text = html.unescape(_TAG.sub(" ", fragment.decode("utf-8", "replace")))
    text = " ".join(text.split())
    # No control characters in a log line.
    text = "".join(c if c.isprintable() else "?" for c in text)
    if len(text) > MAX_STATUS_TEXT:
        text = text[: MAX_STATUS_TEXT - 1] + "…"
    return text
