# -*- test-case-name: tests.test_standin -*-
"""
Tests for L{gsmail.standin}: the GroupServer stand-in answers as
GroupServer's pages do (C{shared/groupserver-protocol.md}, "What a page
answers"; the fixtures in C{tests/fixtures/groupserver/}), archives a post
once by its post id (L{gsmail.standin.postid}), stores what it accepts in
Maildirs, and misbehaves on request through L{Faults}.
"""

from __future__ import annotations

import base64
import email
import hashlib
import io
import json
import os
import random
import re
from collections.abc import Sequence
from email.policy import compat32
from html.parser import HTMLParser
from typing import Any

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import HTTPChannel

from gsmail.answers import PageResult, read_status
from gsmail.standin import StandIn, make_demo_standin
from gsmail.standin import postid as standin_postid
from gsmail.standin.actions import PostRecord
from gsmail.standin.faults import Faults
from gsmail.standin.form import _Base64Writer
from gsmail.standin.postid import compute_post_id, post_id_of_message, to_b62

TOKEN = "s3cret-token-value"
BASE = "http://groups.example.com"
EXISTS = "/gs-group-messages-add-group-exists.html"
ADD = "/gs-group-messages-add-email.html"
RELAY = "/gs-profile-email-relay.html"
BOUNCE = "/gs-group-member-bounce.html"
BOUNDARY = "gsmail-test-boundary-0123456789"
MESSAGE = (
    b"From: Alice <alice@example.org>\n"
    b"To: dev@groups.example.com\n"
    b"Subject: Hello\n"
    b"\n"
    b"Hi all,\n\xe2\x98\x83 snow\n"
)
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "groupserver")

Field = tuple[str, str | bytes]


def encode_form(fields: Sequence[Field], boundary: str = BOUNDARY) -> tuple[bytes, bytes]:
    """
    Encode C{fields} as a C{multipart/form-data} body (RFC 7578).

    @return: the body and the value of its C{Content-Type} header.
    """
    out = []
    for name, value in fields:
        data = value.encode("utf-8") if isinstance(value, str) else value
        out.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}".encode()


def b64(message: bytes) -> bytes:
    """base64 as a mail client writes it: 76-character lines ending in LF."""
    return base64.encodebytes(message)


def exists_fields(email: str, token: str = TOKEN) -> list[Field]:
    return [("form.email", email), ("form.token", token), ("form.actions.check", "Check")]


def add_fields(
    group_id: str = "dev",
    message: bytes = MESSAGE,
    token: str = TOKEN,
    time_source: str | None = None,
) -> list[Field]:
    fields: list[Field] = [("form.groupId", group_id)]
    if time_source is not None:
        fields.append(("form.timeSource", time_source))
    fields += [
        ("form.token", token),
        ("form.actions.add", "Add"),
        ("form.emailMessage", b64(message)),
    ]
    return fields


def bounce_fields(token: str = TOKEN, user: str = "alice@example.org") -> list[Field]:
    return [
        ("form.userEmail", user),
        ("form.groupEmail", "dev@groups.example.com"),
        ("form.token", token),
        ("form.actions.handle", "Handle"),
    ]


def without(fields: Sequence[Field], name: str) -> list[Field]:
    return [f for f in fields if f[0] != name]


def numbered(n: int) -> bytes:
    """A message distinct from the others (its body), so it is a post of its own."""
    return MESSAGE + b"message %d\n" % n


def files_under(directory: str) -> list[str]:
    """Every regular file below C{directory}, as paths relative to it, sorted."""
    found = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            found.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(found)


def fixture(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


class _Outline(HTMLParser):
    """
    What of a GroupServer page a client relies on, in order: the status
    message's classes and text, the failed widgets' labels and errors, the
    form, its widgets and fields, the title heading.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.items: list[tuple[str, ...]] = []
        self._capture: list[Any] | None = None  # [kind, tag, depth, texts]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if self._capture is not None:
            if tag == self._capture[1]:
                self._capture[2] += 1
            return
        if tag == "div" and a.get("id") == "gs-content-form-base-message":
            self.items.append(("status-message", " ".join(sorted(classes))))
        elif tag == "div" and "gs-content-form-base-message-status" in classes:
            self._capture = ["status", tag, 1, []]
        elif tag in ("dt", "h1"):
            self._capture = [tag, tag, 1, []]
        elif tag == "dd":
            self._capture = ["dd " + " ".join(classes), tag, 1, []]
        elif tag == "form":
            self.items.append(("form", a.get("id", ""), a.get("method", ""), a.get("enctype", "")))
        elif tag == "div" and "form-widget" in classes:
            self.items.append(("widget", a.get("id", ""), " ".join(classes)))
        elif tag == "p" and "form-widget-message" in classes:
            self.items.append(("widget-message", " ".join(classes)))
        elif tag in ("input", "textarea"):
            self.items.append((tag, a.get("name", ""), a.get("type", ""), a.get("class", "")))

    def handle_endtag(self, tag: str) -> None:
        if self._capture is not None and tag == self._capture[1]:
            self._capture[2] -= 1
            if self._capture[2] == 0:
                text = " ".join("".join(self._capture[3]).split())
                self.items.append((self._capture[0], text))
                self._capture = None

    def handle_data(self, data: str) -> None:
        if self._capture is not None:
            self._capture[3].append(data)


def outline(page: bytes) -> list[tuple[str, ...]]:
    parser = _Outline()
    parser.feed(page.decode("utf-8"))
    parser.close()
    return parser.items


class _Response:
    def __init__(self, code: int, content_type: str, body: bytes) -> None:
        self.code = code
        self.content_type = content_type
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class StubTestBase(SynchronousTestCase):
    """A stand-in on a L{Clock}, reached through L{StubTreq}."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.clock = Clock()
        self.standin = StandIn(
            self.directory,
            TOKEN,
            {"dev@groups.example.com": "dev", "Team@Groups.Example.COM": "team"},
            site_id="ex_site",
            site_url=BASE,
            clock=self.clock,
        )
        self.stub = StubTreq(self.standin.resource())

    def start(self, path: str, fields: Sequence[Field], url: str = BASE) -> defer.Deferred[Any]:
        body, ctype = encode_form(fields)
        d: defer.Deferred[Any] = self.stub.post(
            url + path, data=body, headers={"Content-Type": ctype}
        )
        return d

    def finish(self, d: defer.Deferred[Any]) -> _Response:
        self.stub.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(self.stub.content(response))
        ctype = response.headers.getRawHeaders("content-type", [""])[0]
        return _Response(response.code, ctype, body)

    def raw_request(
        self, body: bytes, ctype: bytes, path: str = ADD
    ) -> tuple[Protocol, StringTransport]:
        """
        Send a POST to the stand-in's own L{Site} (which leaves the body to the
        stand-in's streaming parser) over a L{StringTransport}.

        @return: the server's connection and the transport holding its output.
        """
        channel = self.standin.site().buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: groups.example.com\r\n"
            f"Content-Length: {len(body)}\r\nContent-Type: "
        ).encode()
        channel.dataReceived(head + ctype + b"\r\n\r\n" + body)
        return channel, transport

    def post(self, path: str, fields: Sequence[Field], url: str = BASE) -> _Response:
        return self.finish(self.start(path, fields, url))

    def assertPage(self, response: _Response, page: str) -> None:
        """C{response} is a whole site page with C{page}'s form and every widget."""
        self.assertEqual((response.code, response.content_type), (200, "text/html; charset=utf-8"))
        self.assertTrue(response.body.startswith(b"<!DOCTYPE html>\n<html "))
        self.assertIn(b'<input class="textType" id="form.token" name="form.token"', response.body)
        button = {"exists": "check", "add": "add", "relay": "relay", "bounce": "handle"}[page]
        self.assertIn(f'name="form.actions.{button}"'.encode(), response.body)

    def assertNotRun(self, response: _Response, page: str = "add") -> None:
        """C{response} is the page's form without a status message: the action did not run."""
        self.assertPage(response, page)
        self.assertEqual(read_status(response.body).result, PageResult.NOT_RUN)

    def assertRefused(self, response: _Response, *messages: str, page: str = "add") -> None:
        """
        C{response} is the page's form refusing the submission: status 200,
        C{alert-error}, each of C{messages} a failed widget's error.
        """
        self.assertPage(response, page)
        status = read_status(response.body)
        self.assertEqual(status.result, PageResult.REFUSED)
        plural = "There are errors:" if len(messages) > 1 else "There is an error:"
        self.assertEqual(status.text, plural)
        for message in messages:
            escaped = message.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            self.assertIn(
                f'<dd class="error"><span class="error">{escaped}</span></dd>',
                response.body.decode(),
            )

    def assertDone(self, response: _Response, page: str = "add") -> None:
        """C{response} is the page's form again, reset, under the status C{Done}."""
        self.assertPage(response, page)
        self.assertEqual(read_status(response.body).result, PageResult.DONE)
        self.assertNotIn(TOKEN.encode(), response.body)  # the form was reset

    def assertErrorPage(self, response: _Response, code: int, issue: str) -> None:
        """C{response} is GroupServer's error page naming C{issue}."""
        self.assertEqual((response.code, response.content_type), (code, "text/html; charset=utf-8"))
        self.assertIn(b"<h1>Sorry! We've had trouble producing this page.</h1>", response.body)
        self.assertIn(f'<code class="message">{issue}</code>'.encode(), response.body)
        self.assertEqual(read_status(response.body).result, PageResult.NOT_RUN)

    def assertNothingStored(self) -> None:
        """No post, relay or bounce was kept, and no file was left behind."""
        self.assertEqual(self.standin.post_records(), [])
        self.assertEqual(self.standin.relays(), [])
        self.assertEqual(self.standin.bounces(), [])
        self.assertEqual(files_under(self.directory), [])


class GroupExistsTests(StubTestBase):
    """The group-exists page: which group, if any, has a list address."""

    def test_known_group(self) -> None:
        """
        A known list address gets the JSON object groupexists.py returns, as
        Python 2's json.dumps wrote it, as text/plain (Zope's type for a body
        that is not HTML).
        """
        response = self.post(EXISTS, exists_fields("dev@groups.example.com"))
        self.assertEqual(
            (response.code, response.content_type, response.body),
            (
                200,
                "text/plain; charset=utf-8",
                b'{"siteURL": "http://groups.example.com", "siteId": "ex_site",'
                b' "email": "dev@groups.example.com", "groupId": "dev"}',
            ),
        )

    def test_case_insensitive(self) -> None:
        """The lookup ignores the case of the address; the answer echoes it as given."""
        response = self.post(EXISTS, exists_fields("TEAM@groups.example.com"))
        self.assertEqual(
            (response.json()["groupId"], response.json()["email"]),
            ("team", "TEAM@groups.example.com"),
        )

    def test_unknown_group(self) -> None:
        """An address no group has gets C{groupId}, C{siteId} and C{siteURL} null."""
        response = self.post(EXISTS, exists_fields("nobody@groups.example.com"))
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.json(),
            {
                "email": "nobody@groups.example.com",
                "siteId": None,
                "groupId": None,
                "siteURL": None,
            },
        )

    def test_wrong_token(self) -> None:
        """A wrong token gets the form refusing it, status 200, not JSON."""
        response = self.post(EXISTS, exists_fields("dev@groups.example.com", token="wrong"))
        self.assertRefused(
            response,
            'The authentication token "wrong" does not match the one in the database.',
            page="exists",
        )
        self.assertEqual(read_status(response.body).labels, ("Token",))

    def test_empty_token(self) -> None:
        """An empty token is a required input that is missing."""
        response = self.post(EXISTS, exists_fields("dev@groups.example.com", token=""))
        self.assertRefused(response, "Required input is missing.", page="exists")

    def test_missing_token_not_checked(self) -> None:
        """
        zope.formlib checks only the fields a request has: without a
        C{form.token} field the lookup runs (GroupServer does this).
        """
        response = self.post(EXISTS, without(exists_fields("dev@groups.example.com"), "form.token"))
        self.assertEqual(response.json()["groupId"], "dev")

    def test_non_ascii_address(self) -> None:
        """The address is an ASCIILine: a UTF-8 address is refused, not looked up."""
        response = self.post(EXISTS, exists_fields("dév@groups.example.com"))
        self.assertRefused(response, "Invalid textual data", page="exists")
        self.assertEqual(read_status(response.body).labels, ("Email Address",))

    def test_several_errors(self) -> None:
        """Two failed widgets: C{There are errors:}, both labels in form order."""
        response = self.post(EXISTS, exists_fields("", token="wrong"))
        self.assertRefused(
            response,
            "Required input is missing.",
            'The authentication token "wrong" does not match the one in the database.',
            page="exists",
        )
        self.assertEqual(read_status(response.body).labels, ("Email Address", "Token"))

    def test_no_button(self) -> None:
        """Without the C{form.actions.check} button field nothing runs: the form comes back."""
        response = self.post(EXISTS, exists_fields("dev@groups.example.com")[:2])
        self.assertNotRun(response, "exists")

    def test_no_button_shows_values(self) -> None:
        """The form that did not run shows the submitted values, the token's too."""
        response = self.post(EXISTS, exists_fields("dev@groups.example.com")[:2])
        self.assertIn(
            f'name="form.token" size="20" type="text" value="{TOKEN}"'.encode(), response.body
        )

    def test_missing_email(self) -> None:
        """Without C{form.email} the action fails: Zope's error page, 503 for a KeyError."""
        response = self.post(EXISTS, exists_fields("dev@groups.example.com")[1:])
        self.assertErrorPage(response, 503, "KeyError: 'email'")

    def test_get_with_query_runs(self) -> None:
        """Zope puts the query string in the form: a GET with the fields runs the check."""
        d = self.stub.get(
            BASE + EXISTS + f"?form.email=dev@groups.example.com&form.token={TOKEN}"
            "&form.actions.check=Check"
        )
        self.assertEqual(self.finish(d).json()["groupId"], "dev")

    def test_get_without_fields(self) -> None:
        """A bare GET renders the form."""
        self.assertNotRun(self.finish(self.stub.get(BASE + EXISTS)), "exists")

    def test_urlencoded_runs(self) -> None:
        """A URL-encoded POST is a form submission too."""
        d = self.stub.post(BASE + EXISTS, data=dict(exists_fields("dev@groups.example.com")))
        self.assertEqual(self.finish(d).json()["groupId"], "dev")

    def test_prefix_mounted(self) -> None:
        """The page answers under a path prefix, as a site mounted below the root is."""
        response = self.post(EXISTS, exists_fields("dev@groups.example.com"), url=BASE + "/a/site")
        self.assertEqual(response.json()["groupId"], "dev")

    def test_other_path(self) -> None:
        """A path that is not one of the four pages is 404."""
        response = self.post("/gs-something-else.html", exists_fields("dev@groups.example.com"))
        self.assertEqual(response.code, 404)
        self.assertEqual(sum(self.standin.requests.values()), 0)

    def test_requests_counted(self) -> None:
        """Every request to a page is counted under the page's name."""
        self.post(EXISTS, exists_fields("dev@groups.example.com"))
        self.post(EXISTS, exists_fields("dev@groups.example.com", token="wrong"))
        self.post(BOUNCE, [("form.userEmail", "a@example.org")])
        self.assertEqual(self.standin.requests, {"exists": 2, "bounce": 1})

    def test_repr_hides_token(self) -> None:
        """The stand-in's repr does not show the token."""
        self.assertNotIn(TOKEN, repr(self.standin))


class AddEmailTests(StubTestBase):
    """The add-email page: a post is archived in its group's Maildir."""

    def test_post_stored(self) -> None:
        """A valid post gets C{Done} and its decoded message is stored for the group."""
        self.assertDone(self.post(ADD, add_fields()))
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])
        self.assertEqual(self.standin.posts("team"), [])
        [record] = self.standin.post_records()
        self.assertEqual(
            (record.group_id, record.time_source, record.size), ("dev", "server", len(MESSAGE))
        )
        self.assertEqual(self.standin.add_requests("dev"), 1)

    def test_post_id_recorded(self) -> None:
        """The record carries GroupServer's post and topic ids of the message."""
        self.post(ADD, add_fields())
        message = email.message_from_bytes(MESSAGE, policy=compat32)
        identity = post_id_of_message(message, "dev", "ex_site", "dev")
        [record] = self.standin.post_records()
        self.assertEqual((record.post_id, record.topic_id), (identity.post_id, identity.topic_id))
        self.assertEqual(self.standin.post_ids("dev"), [identity.post_id])

    def test_maildir_layout(self) -> None:
        """Posts land in C{groups/GROUPID/new/} under distinct names; tmp/ is left empty."""
        second = MESSAGE.replace(b"Hello", b"Again")
        self.post(ADD, add_fields())
        self.post(ADD, add_fields(message=second))
        maildir = os.path.join(self.directory, "groups", "dev")
        self.assertEqual(sorted(os.listdir(maildir)), ["cur", "new", "tmp"])
        self.assertEqual(os.listdir(os.path.join(maildir, "tmp")), [])
        names = sorted(os.listdir(os.path.join(maildir, "new")))
        self.assertEqual(len(names), 2)
        records = self.standin.post_records()
        self.assertEqual(
            [os.path.dirname(r.path) for r in records],
            [os.path.join(os.path.abspath(maildir), "new")] * 2,
        )
        with open(records[1].path, "rb") as f:
            self.assertEqual(f.read(), second)
        self.assertEqual(self.standin.posts("dev"), [MESSAGE, second])

    def test_time_source_recorded(self) -> None:
        """C{form.timeSource} (no field of GroupServer's page) is recorded with the post."""
        self.post(ADD, add_fields(time_source="message"))
        self.assertEqual([r.time_source for r in self.standin.post_records()], ["message"])

    def test_time_source_ignored(self) -> None:
        """GroupServer's page has no C{timeSource} field: any value is ignored, the post added."""
        self.assertDone(self.post(ADD, add_fields(time_source="moon")))
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])

    def test_message_before_group_id(self) -> None:
        """The message part may come before C{form.groupId}: the post is still stored whole."""
        fields = add_fields()
        self.assertDone(self.post(ADD, fields[::-1]))
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])

    def test_base64_with_crlf(self) -> None:
        """Line breaks (CRLF or LF) inside the base64 text are ignored."""
        text = b64(MESSAGE * 40).replace(b"\n", b"\r\n")
        fields = add_fields()[:-1] + [("form.emailMessage", text)]
        self.assertDone(self.post(ADD, fields))
        self.assertEqual(self.standin.posts("dev"), [MESSAGE * 40])

    def test_unknown_group(self) -> None:
        """A group id no group has fails Adder's assertion: error page, 500, nothing stored."""
        response = self.post(ADD, add_fields(group_id="nosuch"))
        self.assertErrorPage(response, 500, 'AssertionError: No such list "nosuch"')
        self.assertNothingStored()
        self.assertEqual(self.standin.add_requests("nosuch"), 1)

    def test_wrong_token(self) -> None:
        """A wrong token gets the form refusing it, and the message is not kept."""
        response = self.post(ADD, add_fields(token="wrong"))
        self.assertRefused(
            response, 'The authentication token "wrong" does not match the one in the database.'
        )
        self.assertIn(b'value="wrong"', response.body)
        self.assertNothingStored()
        self.assertEqual(self.standin.add_requests(), 0)

    def test_refused_shows_message(self) -> None:
        """The refused form shows the message again in its textarea, as base64."""
        response = self.post(ADD, add_fields(token="wrong"))
        shown = re.search(
            rb'name="form.emailMessage" rows="15" >(.*?)</textarea>', response.body, re.S
        )
        assert shown is not None
        self.assertEqual(base64.b64decode(shown.group(1)), MESSAGE)

    def test_no_button(self) -> None:
        """Without C{form.actions.add} nothing is stored: the form, no status."""
        self.assertNotRun(self.post(ADD, without(add_fields(), "form.actions.add")))
        self.assertNothingStored()

    def test_missing_message(self) -> None:
        """Without C{form.emailMessage} the action fails (KeyError): 503, nothing stored."""
        self.assertErrorPage(self.post(ADD, add_fields()[:-1]), 503, "KeyError: 'emailMessage'")
        self.assertNothingStored()

    def test_missing_group_id(self) -> None:
        """Without C{form.groupId} the action fails (KeyError): 503, nothing stored."""
        self.assertErrorPage(self.post(ADD, add_fields()[1:]), 503, "KeyError: 'groupId'")
        self.assertNothingStored()

    def test_empty_group_id(self) -> None:
        """An empty C{form.groupId} is refused: the group identifier is required."""
        response = self.post(ADD, add_fields(group_id=""))
        self.assertRefused(response, "Required input is missing.")
        self.assertEqual(read_status(response.body).labels, ("Group Identifier",))
        self.assertNothingStored()

    def test_empty_message(self) -> None:
        """An empty message is refused: the message is required."""
        fields = add_fields()[:-1] + [("form.emailMessage", b"")]
        response = self.post(ADD, fields)
        self.assertRefused(response, "Required input is missing.")
        self.assertEqual(read_status(response.body).labels, ("Email Message",))
        self.assertNothingStored()

    def test_missing_token_not_checked(self) -> None:
        """Without a C{form.token} field the post is added: formlib skips absent fields."""
        self.assertDone(self.post(ADD, without(add_fields(), "form.token")))
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])

    def test_not_base64(self) -> None:
        """
        A message that is not base64 is added as the text it is (CRLF made
        LF), as addemail.py does when b64decode fails; non-strict base64
        skips what is not in the alphabet and stops at padding.
        """
        cases = [
            (b"not base64!", b"not base64!"),
            (b"QUJD QUJD", b"ABCABC"),
            (b"QUJDQQ", b"QUJDQQ"),
            (b"QQ==QUJD", b"A"),
            (b"Subject: x\r\n\r\nplain text\r\n", b"Subject: x\n\nplain text\n"),
        ]
        for n, (sent, _stored) in enumerate(cases):
            fields = add_fields(group_id="dev")[:-1] + [("form.emailMessage", sent)]
            self.assertDone(self.post(ADD, fields), "add")
            self.assertEqual(len(self.standin.posts("dev")), n + 1)
        self.assertEqual(self.standin.posts("dev"), [stored for _sent, stored in cases])


class ArchiveTests(StubTestBase):
    """A post is archived once by its post id, as processMail checks."""

    def test_same_message_archived_once(self) -> None:
        """The same message added twice: both answered C{Done}, one post; two add requests."""
        self.assertDone(self.post(ADD, add_fields()))
        self.assertDone(self.post(ADD, add_fields()))
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])
        self.assertEqual(self.standin.add_requests("dev"), 2)
        self.assertEqual(files_under(os.path.join(self.directory, "groups", "dev", "tmp")), [])

    def test_trace_headers_do_not_count(self) -> None:
        """Date, Message-ID and Received take no part in the post id: still one post."""
        other = b"Received: from a by b\nMessage-ID: <x@y>\nDate: Sat, 1 Jan 2000 00:00:00 +0000\n"
        self.post(ADD, add_fields())
        self.assertDone(self.post(ADD, add_fields(message=other + MESSAGE)))
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])

    def test_per_group(self) -> None:
        """The group is part of the post id: the same message is a post in each group."""
        self.post(ADD, add_fields())
        self.post(ADD, add_fields(group_id="team"))
        self.assertEqual(
            (self.standin.posts("dev"), self.standin.posts("team")), ([MESSAGE], [MESSAGE])
        )

    def test_distinct_messages(self) -> None:
        """Messages that differ in their body are posts of their own."""
        for n in range(3):
            self.assertDone(self.post(ADD, add_fields(message=numbered(n))))
        self.assertEqual(self.standin.posts("dev"), [numbered(n) for n in range(3)])

    def test_overlapping_adds(self) -> None:
        """
        Two adds of one message that overlap (both past the archive check
        before either stored): the first stores, the second fails on the
        unique post id (error page, 500); its retry is "already archived".
        """
        self.standin.faults.delay = 5.0
        first, second = self.start(ADD, add_fields()), self.start(ADD, add_fields())
        self.stub.flush()
        self.clock.advance(5)
        self.assertDone(self.finish(first))
        [record] = self.standin.post_records()
        self.assertErrorPage(
            self.finish(second),
            500,
            f"DuplicateMessageError: Post {record.post_id} already existed in database.",
        )
        self.standin.faults.reset()
        self.assertDone(self.post(ADD, add_fields()))
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])
        self.assertEqual(self.standin.add_requests("dev"), 3)
        self.assertEqual(files_under(os.path.join(self.directory, "groups", "dev", "tmp")), [])

    def test_overlap_with_other_post(self) -> None:
        """Distinct messages that overlap do not collide."""
        self.standin.faults.delay = 5.0
        first = self.start(ADD, add_fields(message=numbered(1)))
        second = self.start(ADD, add_fields(message=numbered(2)))
        self.stub.flush()
        self.clock.advance(5)
        self.assertDone(self.finish(first))
        self.assertDone(self.finish(second))
        self.assertEqual(len(self.standin.posts("dev")), 2)

    def test_retry_after_drop_after_store(self) -> None:
        """A post whose answer was lost, added again, is answered C{Done} and stays one post."""
        self.standin.faults.drop = "after_store"
        self.standin.faults.remaining = 1
        d = self.start(ADD, add_fields())
        self.stub.flush()
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertDone(self.post(ADD, add_fields()))
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])
        self.assertEqual(self.standin.add_requests("dev"), 2)

    def test_archive_once_off(self) -> None:
        """With C{archive_once} false every add is stored (loads of identical messages)."""
        self.standin.archive_once = False
        self.post(ADD, add_fields())
        self.post(ADD, add_fields())
        self.assertEqual(self.standin.posts("dev"), [MESSAGE, MESSAGE])

    def test_forget_archive(self) -> None:
        """After L{StandIn.forget_archive} the same message is archived again."""
        self.post(ADD, add_fields())
        self.standin.forget_archive()
        self.post(ADD, add_fields())
        self.assertEqual(self.standin.posts("dev"), [MESSAGE, MESSAGE])


class PostIdTests(SynchronousTestCase):
    """L{gsmail.standin.postid} computes C{EmailMessage.post_id} as gs.group.list.base does."""

    # gs.group.list.base tests/emailmessage.py: EmailMessageTest.m and its ids.
    ETHEL = (
        b"From: Me <a.member@example.com>\n"
        b"To: Group <group@groups.example.com>\n"
        b"Subject: Violence\n"
        b"\n"
        b"Tonight on Ethel the Frog we look at violence.\n"
    )

    def identity(self, raw: bytes, title: str = "Ethel the Frog") -> standin_postid.PostIdentity:
        message = email.message_from_bytes(raw, policy=compat32)
        return post_id_of_message(message, "ethel", "", title)

    def test_groupserver_vectors(self) -> None:
        """The ids gs.group.list.base's own tests expect for their message."""
        identity = self.identity(self.ETHEL)
        self.assertEqual(
            (identity.topic_id, identity.post_id),
            ("2kxkamRQ35fmTJ6pTRK8yN", "ZTcsX0Tw8Nww2LggPn78Y"),
        )
        self.assertTrue(identity.exact)

    def test_b62(self) -> None:
        """Base 62 with digits, lower-case, then upper-case letters, most significant first."""
        self.assertEqual(
            [to_b62(n) for n in (0, 9, 10, 36, 61, 62, 3844)],
            ["0", "9", "a", "A", "Z", "10", "100"],
        )

    def test_topic_from_subject(self) -> None:
        """The list title, Re:/Fwd: and whitespace do not change the topic or the post."""
        base = self.identity(self.ETHEL)
        for subject in (b"Re: [Ethel the Frog] Violence", b"  Fwd:   Violence ", b"[Violence]"):
            raw = self.ETHEL.replace(b"Subject: Violence", b"Subject: " + subject)
            self.assertEqual(self.identity(raw), base, subject)

    def test_case_makes_another_post(self) -> None:
        """The subject's case keeps the topic (compressed, lower-cased) but makes another post."""
        raw = self.ETHEL.replace(b"Subject: Violence", b"Subject: VIOLENCE")
        identity = self.identity(raw)
        self.assertEqual(identity.topic_id, self.identity(self.ETHEL).topic_id)
        self.assertNotEqual(identity.post_id, self.identity(self.ETHEL).post_id)

    def test_encoded_subject(self) -> None:
        """An RFC 2047 subject is decoded before it counts."""
        raw = self.ETHEL.replace(b"Subject: Violence", b"Subject: =?utf-8?q?Violence?=")
        self.assertEqual(self.identity(raw), self.identity(self.ETHEL))

    def test_what_counts(self) -> None:
        """The body, the sender, In-Reply-To and the attachments' length each make another post."""
        base = self.identity(self.ETHEL).post_id
        variants = [
            self.ETHEL + b"More.\n",
            self.ETHEL.replace(b"a.member@", b"b.member@"),
            b"In-Reply-To: <a@b>\n" + self.ETHEL,
        ]
        for raw in variants:
            self.assertNotEqual(self.identity(raw).post_id, base)
        self.assertEqual(
            self.identity(
                self.ETHEL.replace(b"From: Me <a.member@", b"From: Another <A.Member@")
            ).post_id,
            base,
        )

    def test_trace_headers_ignored(self) -> None:
        """Date, Message-ID, Received and To are not part of the id."""
        extra = b"Received: by x\nDate: Mon, 2 Jan 2006 00:00:00 +0000\nMessage-ID: <m@x>\n"
        raw = extra + self.ETHEL.replace(b"To: Group <group@", b"To: <other@")
        self.assertEqual(self.identity(raw), self.identity(self.ETHEL))

    def multipart(self, attachment: bytes) -> bytes:
        return (
            b"From: Me <a.member@example.com>\nSubject: Violence\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/mixed; boundary="b"\n\n'
            b"--b\nContent-Type: text/plain; charset=utf-8\n\n"
            b"Tonight on Ethel the Frog we look at violence.\n"
            b"--b\nContent-Type: application/octet-stream\n"
            b'Content-Disposition: attachment; filename="a.bin"\n'
            b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(attachment) + b"--b--\n"
        )

    def test_attachment_length(self) -> None:
        """Attachments count by their decoded length only; the body is the text part."""
        same_length = (
            self.identity(self.multipart(b"x" * 10)),
            self.identity(self.multipart(b"y" * 10)),
        )
        self.assertEqual(same_length[0], same_length[1])
        self.assertNotEqual(self.identity(self.multipart(b"x" * 11)), same_length[0])

    def test_html_only(self) -> None:
        """An HTML-only message's body is its text: the markup around it does not count."""
        one = (
            b"From: Me <a.member@example.com>\nSubject: Violence\nContent-Type: text/html\n\n"
            b"<p>Tonight on <b>Ethel</b> the Frog.</p>"
        )
        two = one.replace(b"<b>Ethel</b>", b"<i>Ethel</i>")
        self.assertEqual(self.identity(one).post_id, self.identity(two).post_id)
        self.assertEqual(len(one), len(two))
        self.assertEqual(
            standin_postid._html_to_text("<p>a <a href='http://x/'>b</a>  c</p>"),
            "a b <http://x/> c",
        )

    def test_over_parse_limit(self) -> None:
        """
        A message over the parse limit gets an approximate id from its
        headers and raw body: the same message, the same id; another body,
        another id; trace headers still do not count.
        """
        self.patch(standin_postid, "PARSE_LIMIT", 10)
        paths = []
        for n, raw in enumerate(
            [self.ETHEL, b"Message-ID: <z@z>\n" + self.ETHEL, self.ETHEL + b"x"]
        ):
            path = self.mktemp() + str(n)
            with open(path, "wb") as f:
                f.write(raw)
            paths.append(path)
        ids = [compute_post_id(p, "ethel", "", "Ethel the Frog") for p in paths]
        self.assertFalse(ids[0].exact)
        self.assertEqual(ids[0], ids[1])
        self.assertNotEqual(ids[0].post_id, ids[2].post_id)
        self.assertEqual(ids[0].topic_id, self.identity(self.ETHEL).topic_id)

    def test_odd_messages(self) -> None:
        """Messages that are barely mail still get an id, without an exception."""
        for raw in [b"", b"x", bytes(range(256)), b"Subject: =?x-unknown?b?QUJD?=\n\n\xff\n"]:
            path = self.mktemp()
            with open(path, "wb") as f:
                f.write(raw)
            self.assertTrue(compute_post_id(path, "g", "s", "t").post_id)


class FixtureTests(StubTestBase):
    """
    The fixtures (GroupServer's answers as its templates render them) read
    as the client expects, and the stand-in's answers have their structure.
    """

    FIXTURE_TOKEN = "fixture-site-token-0123456789"
    FIXTURE_MESSAGE = (
        b"From: A Member <member@example.com>\nTo: ethel@groups.example.net\n"
        b"Subject: Violence in British Gangland\n\nTonight on Ethel the Frog we look at violence.\n"
    )
    EXPECTED = {
        "add-success.html": (PageResult.DONE, "Done", ()),
        "relay-success.html": (PageResult.DONE, "Done", ()),
        "bounce-success.html": (PageResult.DONE, "Done", ()),
        "bounce-no-user.html": (PageResult.NO_USER, "No user found for someone@example.net", ()),
        "add-refused-token.html": (PageResult.REFUSED, "There is an error:", ("Token",)),
        "add-refused-field.html": (PageResult.REFUSED, "There is an error:", ("Group Identifier",)),
        "bounce-refused-fields.html": (
            PageResult.REFUSED,
            "There are errors:",
            ("User Email Address", "Group Email Address"),
        ),
        "exists-refused-token.html": (PageResult.REFUSED, "There is an error:", ("Token",)),
        "form-without-status.html": (PageResult.NOT_RUN, "", ()),
        "login-page.html": (PageResult.NOT_RUN, "", ()),
        "maintenance-page.html": (PageResult.NOT_RUN, "", ()),
        "error-page.html": (PageResult.NOT_RUN, "", ()),
    }

    def setUp(self) -> None:
        super().setUp()
        self.standin = StandIn(
            self.mktemp(),
            self.FIXTURE_TOKEN,
            {"ethel@groups.example.net": "ethel"},
            site_id="frog",
            site_url="https://groups.example.net",
            site_name="Ethel the Frog Groups",
            clock=self.clock,
        )
        self.stub = StubTreq(self.standin.resource())

    def test_read_status(self) -> None:
        """gsmail.answers.read_status reads every fixture as the client expects."""
        self.assertEqual(
            sorted(n for n in os.listdir(FIXTURES) if n.endswith(".html")), sorted(self.EXPECTED)
        )
        for name, (result, text, labels) in self.EXPECTED.items():
            status = read_status(fixture(name))
            self.assertEqual(
                (status.result, status.text, status.labels), (result, text, labels), name
            )

    def test_token_quoted(self) -> None:
        """
        The refused token's widget error quotes the submitted token, in the
        status message and in the widget list; the client's description of
        the page does not have it.
        """
        page = fixture("add-refused-token.html")
        quoted = (
            b'The authentication token "not-the-token-3f9a" does not match the one in the database.'
        )
        self.assertEqual(page.count(quoted), 2)
        self.assertIn(b'<dd class="error"><span class="error">' + quoted, page)
        self.assertIn(b'<span class="msg"><span class="error">' + quoted, page)
        self.assertNotIn("not-the-token-3f9a", read_status(page).describe())

    def test_unsubmitted_form_shows_token(self) -> None:
        """A form that did not run shows the submitted values: the right token among them."""
        self.assertIn(self.FIXTURE_TOKEN.encode(), fixture("form-without-status.html"))

    def fields(self, name: str) -> tuple[str, list[Field]]:
        """The request each fixture answers."""
        message: list[Field] = [("form.emailMessage", b64(self.FIXTURE_MESSAGE))]
        add: list[Field] = message + [("form.groupId", "ethel"), ("form.token", self.FIXTURE_TOKEN)]
        bounce: list[Field] = [
            ("form.userEmail", "member@example.com"),
            ("form.groupEmail", "ethel@groups.example.net"),
            ("form.token", self.FIXTURE_TOKEN),
            ("form.actions.handle", "Handle"),
        ]
        return {
            "add-success.html": (ADD, add + [("form.actions.add", "Add")]),
            "relay-success.html": (
                RELAY,
                message + [("form.token", self.FIXTURE_TOKEN), ("form.actions.relay", "Relay")],
            ),
            "bounce-success.html": (BOUNCE, bounce),
            "bounce-no-user.html": (
                BOUNCE,
                [("form.userEmail", "someone@example.net")] + bounce[1:],
            ),
            "add-refused-token.html": (
                ADD,
                message
                + [
                    ("form.groupId", "ethel"),
                    ("form.token", "not-the-token-3f9a"),
                    ("form.actions.add", "Add"),
                ],
            ),
            "add-refused-field.html": (
                ADD,
                message
                + [
                    ("form.groupId", ""),
                    ("form.token", self.FIXTURE_TOKEN),
                    ("form.actions.add", "Add"),
                ],
            ),
            "bounce-refused-fields.html": (
                BOUNCE,
                [("form.userEmail", "mëmber@example.com"), ("form.groupEmail", "")] + bounce[2:],
            ),
            "exists-refused-token.html": (
                EXISTS,
                [
                    ("form.email", "ethel@groups.example.net"),
                    ("form.token", "old-token-7c1d"),
                    ("form.actions.check", "Check"),
                ],
            ),
            "form-without-status.html": (ADD, add),
            "error-page.html": (ADD, without(add, "form.groupId") + [("form.actions.add", "Add")]),
            "login-page.html": (ADD, add + [("form.actions.add", "Add")]),
            "maintenance-page.html": (ADD, add + [("form.actions.add", "Add")]),
        }[name]

    def test_structure(self) -> None:
        """
        For the request each fixture answers, the stand-in's answer has the
        fixture's structure: status message, labels, errors, form, widgets,
        fields, heading.
        """
        self.standin.add_member("member@example.com")
        for name in self.EXPECTED:
            self.standin.forget_archive()
            self.standin.faults.instead = {
                "login-page.html": "login",
                "maintenance-page.html": "maintenance",
            }.get(name)
            path, fields = self.fields(name)
            answer = self.post(path, fields, url="https://groups.example.net")
            expected = fixture(name)
            self.assertEqual(outline(answer.body), outline(expected), name)
            self.assertEqual(read_status(answer.body), read_status(expected), name)
            self.assertTrue(outline(expected) or name == "maintenance-page.html", name)

    def test_exists_json(self) -> None:
        """The group-exists answers are the fixtures' JSON, byte for byte."""
        for name, address in [
            ("exists-success.json", "ethel@groups.example.net"),
            ("exists-unknown.json", "nobody@groups.example.net"),
        ]:
            answer = self.post(EXISTS, exists_fields(address, token=self.FIXTURE_TOKEN))
            self.assertEqual(answer.body, fixture(name), name)


class StreamingTests(StubTestBase):
    """The stand-in's own Site parses bodies itself, streaming."""

    def test_own_site(self) -> None:
        """Through the stand-in's Site (no twisted.web form parsing) a post is stored."""
        body, ctype = encode_form(add_fields())
        _channel, transport = self.raw_request(body, ctype)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertIn(
            b"X-Powered-By: Zope (www.zope.org), Python (www.python.org)", transport.value()
        )
        self.assertEqual(read_status(transport.value()).result, PageResult.DONE)
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])

    def test_malformed_body(self) -> None:
        """A body that is not valid multipart is answered 400 and nothing is kept."""
        body, ctype = encode_form(add_fields())
        _channel, transport = self.raw_request(body[: len(body) // 2], ctype)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertNothingStored()

    def test_base64_pieces(self) -> None:
        """
        base64 arriving in pieces of any length decodes as a whole, as
        Python 2's non-strict decoder: padding ends the data, a stray C{=}
        is skipped, text ending inside a group of four is an error.
        """
        out = io.BytesIO()
        writer = _Base64Writer(out)
        for piece in [b"QU", b"JD\r", b"\nQ", b"U", b"=", b"=", b"\r\nQUJD"]:
            writer.write(piece)
        writer.finish()
        self.assertEqual((out.getvalue(), writer.size, writer.error), (b"ABCA", 4, None))
        stray = io.BytesIO()
        writer = _Base64Writer(stray)
        for piece in [b"Q=U", b"JD", b"QQ=", b"QUJD"]:
            writer.write(piece)
        writer.finish()
        self.assertEqual(writer.error, "Incorrect padding")
        short = _Base64Writer(io.BytesIO())
        short.write(b"QUJDQ")
        short.finish()
        self.assertEqual(short.error, "Incorrect padding")
        self.assertEqual(short.raw_size, 5)


class RelayAndBounceTests(StubTestBase):
    """The relay and bounce pages."""

    def relay_fields(self, token: str = TOKEN) -> list[Field]:
        return [
            ("form.token", token),
            ("form.actions.relay", "Relay"),
            ("form.emailMessage", b64(MESSAGE)),
        ]

    def bounce_fields(self, token: str = TOKEN, user: str = "alice@example.org") -> list[Field]:
        return bounce_fields(token, user)

    def test_relay(self) -> None:
        """A relayed message gets C{Done} and is stored in C{relays/new/}."""
        self.assertDone(self.post(RELAY, self.relay_fields()), "relay")
        self.assertEqual(self.standin.relays(), [MESSAGE])
        [name] = os.listdir(os.path.join(self.directory, "relays", "new"))
        with open(os.path.join(self.directory, "relays", "new", name), "rb") as f:
            self.assertEqual(f.read(), MESSAGE)

    def test_relay_not_archived(self) -> None:
        """The relay page sends every time: the same message twice is relayed twice."""
        self.post(RELAY, self.relay_fields())
        self.post(RELAY, self.relay_fields())
        self.assertEqual(self.standin.relays(), [MESSAGE, MESSAGE])

    def test_relay_wrong_token(self) -> None:
        """A relay with a wrong token is refused with the form and not stored."""
        response = self.post(RELAY, self.relay_fields(token="x"))
        self.assertRefused(
            response,
            'The authentication token "x" does not match the one in the database.',
            page="relay",
        )
        self.assertNothingStored()

    def test_relay_missing_message(self) -> None:
        """A relay without its message fails (KeyError): 503."""
        self.assertErrorPage(
            self.post(RELAY, self.relay_fields()[:2]), 503, "KeyError: 'emailMessage'"
        )
        self.assertNothingStored()

    def test_bounce(self) -> None:
        """A bounce gets C{Done} and is recorded in memory and in C{bounces.jsonl}."""
        self.assertDone(self.post(BOUNCE, self.bounce_fields()), "bounce")
        self.assertEqual(self.standin.bounces(), [("alice@example.org", "dev@groups.example.com")])
        with open(os.path.join(self.directory, "bounces.jsonl"), encoding="utf-8") as f:
            lines = [json.loads(line) for line in f]
        self.assertEqual(
            lines, [{"userEmail": "alice@example.org", "groupEmail": "dev@groups.example.com"}]
        )

    def test_bounce_members(self) -> None:
        """
        Once members are known, a bounce for another address is answered
        C{No user found for ADDRESS} and not recorded; a member's (any case)
        is recorded.
        """
        self.standin.add_member("Alice@Example.org")
        response = self.post(BOUNCE, self.bounce_fields(user="bob@example.org"))
        self.assertPage(response, "bounce")
        status = read_status(response.body)
        self.assertEqual(
            (status.result, status.text), (PageResult.NO_USER, "No user found for bob@example.org")
        )
        self.assertEqual(self.standin.bounces(), [])
        self.assertDone(self.post(BOUNCE, self.bounce_fields(user="alice@EXAMPLE.org")), "bounce")
        self.assertEqual(self.standin.bounces(), [("alice@EXAMPLE.org", "dev@groups.example.com")])

    def test_members_given(self) -> None:
        """Members can be given when the stand-in is made."""
        standin = StandIn(self.mktemp(), TOKEN, {}, members=["a@example.org"], clock=self.clock)
        stub = StubTreq(standin.resource())
        body, ctype = encode_form(self.bounce_fields(user="b@example.org"))
        response = self.successResultOf(
            stub.post(BASE + BOUNCE, data=body, headers={"Content-Type": ctype})
        )
        page = self.successResultOf(stub.content(response))
        self.assertEqual(read_status(page).result, PageResult.NO_USER)

    def test_bounce_unknown_group(self) -> None:
        """A member's bounce for an address no group has fails in handlebounce.py: 500."""
        fields = [("form.groupEmail", "nosuch@groups.example.com")] + without(
            self.bounce_fields(), "form.groupEmail"
        )
        self.assertErrorPage(
            self.post(BOUNCE, fields), 500, "TypeError: getattr(): attribute name must be string"
        )
        self.assertEqual(self.standin.bounces(), [])

    def test_bounce_missing_field(self) -> None:
        """A bounce without either address fails (KeyError, 503); an empty one is refused."""
        self.assertErrorPage(
            self.post(BOUNCE, without(self.bounce_fields(), "form.groupEmail")),
            503,
            "KeyError: 'groupEmail'",
        )
        self.assertErrorPage(
            self.post(BOUNCE, without(self.bounce_fields(), "form.userEmail")),
            503,
            "KeyError: 'userEmail'",
        )
        response = self.post(BOUNCE, [("form.userEmail", "")] + self.bounce_fields()[1:])
        self.assertRefused(response, "Required input is missing.", page="bounce")
        self.assertEqual(read_status(response.body).labels, ("User Email Address",))
        self.assertNothingStored()

    def test_bounce_wrong_token(self) -> None:
        """A bounce with a wrong token is refused with the form and not recorded."""
        self.assertRefused(
            self.post(BOUNCE, self.bounce_fields(token="x")),
            'The authentication token "x" does not match the one in the database.',
            page="bounce",
        )
        self.assertNothingStored()

    def test_demo_standin(self) -> None:
        """The demo stand-in has a group GROUPID@DOMAIN for every domain and group id."""
        demo = make_demo_standin(
            self.mktemp(), TOKEN, ["a.example", "b.example"], ["dev", "ops"], self.clock, None
        )
        stub = StubTreq(demo.resource())
        for address, group_id in [
            ("dev@a.example", "dev"),
            ("ops@b.example", "ops"),
            ("x@a.example", None),
        ]:
            body, ctype = encode_form(exists_fields(address))
            response = self.successResultOf(
                stub.post(BASE + EXISTS, data=body, headers={"Content-Type": ctype})
            )
            self.assertEqual(self.successResultOf(stub.json_content(response))["groupId"], group_id)

    def test_unsafe_group_id(self) -> None:
        """A group id that is not a plain directory name is refused."""
        self.assertRaises(ValueError, self.standin.add_group, "x@example.org", "../x")


class FaultTests(StubTestBase):
    """L{Faults} make the pages misbehave, for tests of gsmail's error paths."""

    def test_delay(self) -> None:
        """With a delay, the answer and the post wait for the clock."""
        self.standin.faults.delay = 5.0
        d = self.start(ADD, add_fields())
        self.stub.flush()
        self.assertNoResult(d)
        self.assertNoResult(self.standin.when_idle())
        self.clock.advance(4.9)
        self.stub.flush()
        self.assertNoResult(d)
        self.assertEqual(self.standin.post_records(), [])
        self.clock.advance(0.1)
        self.assertDone(self.finish(d))
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])
        self.successResultOf(self.standin.when_idle())

    def test_delay_client_gone(self) -> None:
        """
        When the client disconnects during a delay, the post is still stored
        (as Zope finishes the request) and no answer is written, without error.
        """
        self.standin.faults.delay = 5.0
        body, ctype = encode_form(add_fields())
        channel, transport = self.raw_request(body, ctype)
        idle = self.standin.when_idle()
        channel.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(5)
        self.successResultOf(idle)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_proxy_statuses(self) -> None:
        """C{status} 502/503/504: a proxy's error page with that status; nothing stored or run."""
        for code, reason in [
            (502, b"Bad Gateway"),
            (503, b"Service Temporarily Unavailable"),
            (504, b"Gateway Time-out"),
        ]:
            self.standin.faults.status = code
            response = self.post(ADD, add_fields())
            self.assertEqual(
                (response.code, response.content_type), (code, "text/html; charset=utf-8")
            )
            self.assertIn(b"<center><h1>%d " % code + reason + b"</h1></center>", response.body)
            self.assertEqual(read_status(response.body).result, PageResult.NOT_RUN)
        self.assertNothingStored()
        self.assertEqual(self.standin.add_requests(), 0)

    def test_status_500(self) -> None:
        """C{status=500} (and C{instead="error"}): GroupServer's error page, nothing stored."""
        for setting in [("status", 500), ("instead", "error")]:
            setattr(self.standin.faults, *setting)
            response = self.post(ADD, add_fields())
            self.assertErrorPage(
                response,
                500,
                "OperationalError: (psycopg2.OperationalError) could not connect to server:"
                " Connection refused",
            )
            self.standin.faults.reset()
        self.assertNothingStored()

    def test_status_after_store(self) -> None:
        """C{status_after_store}: the post is stored, then the proxy's 502/504 is answered."""
        self.standin.faults.status_after_store = 504
        response = self.post(ADD, add_fields())
        self.assertEqual(response.code, 504)
        self.assertIn(b"504 Gateway Time-out", response.body)
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])
        self.standin.faults.reset()
        self.assertDone(self.post(ADD, add_fields()))
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])

    def test_status_after_store_only_proxy(self) -> None:
        """Only a proxy's 502 or 504 can come after the store."""
        self.assertRaises(ValueError, setattr, self.standin.faults, "status_after_store", 503)

    def test_login_page(self) -> None:
        """C{instead="login"}: the site's sign-in page, 200, no status message; nothing run."""
        self.standin.faults.instead = "login"
        response = self.post(ADD, add_fields())
        self.assertEqual(response.code, 200)
        self.assertIn(b'<form id="login-form"', response.body)
        self.assertEqual(read_status(response.body).result, PageResult.NOT_RUN)
        self.assertNothingStored()
        self.assertEqual(self.standin.add_requests(), 0)

    def test_maintenance_page(self) -> None:
        """C{instead="maintenance"}: a front end's page, 200, no status message; nothing run."""
        self.standin.faults.instead = "maintenance"
        response = self.post(BOUNCE, bounce_fields())
        self.assertEqual(response.code, 200)
        self.assertEqual(read_status(response.body).result, PageResult.NOT_RUN)
        self.assertNothingStored()

    def test_html_instead_of_json(self) -> None:
        """group-exists answers its form refusing the token; other pages are unaffected."""
        self.standin.faults.html_instead_of_json = True
        response = self.post(EXISTS, exists_fields("dev@groups.example.com"))
        self.assertPage(response, "exists")
        self.assertEqual(read_status(response.body).result, PageResult.REFUSED)
        self.assertDone(self.post(ADD, add_fields()))

    def test_drop_before_body_stub(self) -> None:
        """Through a resource alone, C{drop="before_body"} aborts without running anything."""
        self.standin.faults.drop = "before_body"
        d = self.start(ADD, add_fields())
        self.stub.flush()
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertNothingStored()

    def test_pages(self) -> None:
        """A fault limited to some pages leaves the others alone."""
        self.standin.faults.status = 500
        self.standin.faults.pages = frozenset({"add"})
        self.assertEqual(
            self.post(EXISTS, exists_fields("dev@groups.example.com")).json()["groupId"], "dev"
        )
        self.assertEqual(self.post(ADD, add_fields()).code, 500)

    def test_remaining(self) -> None:
        """C{remaining} counts down the requests the fault applied to, then the fault clears."""
        self.standin.faults.status = 502
        self.standin.faults.pages = frozenset({"add"})
        self.standin.faults.remaining = 2
        self.assertEqual(self.post(EXISTS, exists_fields("dev@groups.example.com")).code, 200)
        self.assertEqual(self.post(ADD, add_fields()).code, 502)
        self.assertEqual(self.standin.faults.remaining, 1)
        self.assertEqual(self.post(ADD, add_fields()).code, 502)
        self.assertEqual(self.standin.faults, Faults())
        self.assertDone(self.post(ADD, add_fields()))
        self.assertEqual(len(self.standin.post_records()), 1)

    def test_reset(self) -> None:
        """L{Faults.reset} restores normal behaviour."""
        self.standin.faults.status = 500
        self.standin.faults.instead = "login"
        self.standin.faults.reset()
        self.assertDone(self.post(ADD, add_fields()))

    def test_invalid_fault(self) -> None:
        """An unknown C{drop} mode, page name or page instead is refused when set."""
        faults = Faults()
        self.assertRaises(ValueError, setattr, faults, "drop", "sometimes")
        self.assertRaises(ValueError, setattr, faults, "pages", frozenset({"exist"}))
        self.assertRaises(ValueError, setattr, faults, "instead", "teapot")

    def test_post_record_frozen(self) -> None:
        """Post records cannot be altered by their readers."""
        self.post(ADD, add_fields())
        [record] = self.standin.post_records()
        self.assertIsInstance(record, PostRecord)
        self.assertRaises(AttributeError, setattr, record, "size", 0)


class _TrackedChannel(HTTPChannel):
    """An HTTP server connection whose loss a test can wait for."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.reason = reason
        self.lost.callback(None)


class _HeadersOnly(Protocol):
    """Sends a request's headers, then waits for the server to end the connection."""

    def __init__(self, head: bytes) -> None:
        self.head = head
        self.received = b""
        self.lost: defer.Deferred[list[Failure]] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.head)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost.callback([reason])


class RealSocketTests(TestCase):
    """The stand-in's L{Site} on a real socket, parsing bodies in threads."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.standin = StandIn(
            self.directory,
            TOKEN,
            {"dev@groups.example.com": "dev"},
            clock=_reactor,
            reactor=_reactor,
        )
        site = self.standin.site()
        channels: list[_TrackedChannel] = []
        self.channels = channels

        def build(*args: Any, **kwargs: Any) -> _TrackedChannel:
            channel = _TrackedChannel()
            channels.append(channel)
            return channel

        site.protocol = build
        self.port = _reactor.listenTCP(0, site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/site"
        self.pool = HTTPConnectionPool(_reactor, persistent=True)
        self.client = HTTPClient(Agent(_reactor, pool=self.pool))
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.close()))

    async def close(self) -> None:
        """Wait for every connection, client and server side, to be closed."""
        await self.pool.closeCachedConnections()
        await self.port.stopListening()
        for channel in self.channels:
            if channel.transport is not None and not channel.lost.called:
                channel.transport.loseConnection()
        await defer.gatherResults([c.lost for c in self.channels])
        await self.standin.when_idle()

    def write_upload(self, size: int, token: str = TOKEN) -> tuple[str, bytes, str]:
        """A form body with a random message of C{size} bytes; its path, type and SHA-256."""
        rng = random.Random(7)
        digest = hashlib.sha256()
        upload = self.mktemp()
        head, ctype = encode_form(add_fields(time_source="message", token=token)[:-1])
        with open(upload, "wb") as f:
            f.write(head[: -len(f"--{BOUNDARY}--\r\n")])
            f.write(
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="form.emailMessage"\r\n\r\n'.encode()
            )
            chunk_size = 57 * 1024  # a multiple of 3 (and of 57: whole base64 lines)
            for start in range(0, size, chunk_size):
                chunk = rng.randbytes(min(chunk_size, size - start))
                digest.update(chunk)
                f.write(base64.encodebytes(chunk).replace(b"\n", b"\r\n"))
            f.write(f"\r\n--{BOUNDARY}--\r\n".encode())
        return upload, ctype, digest.hexdigest()

    async def test_large_upload(self) -> None:
        """A 20 MiB message posted through a socket is stored byte for byte."""
        size = 20 * 1024 * 1024
        upload, ctype, digest = self.write_upload(size)
        with open(upload, "rb") as body:
            response = await self.client.post(
                self.url + ADD, data=body, headers={"Content-Type": ctype}
            )
            text = await response.content()
        self.assertEqual((response.code, read_status(text).result), (200, PageResult.DONE))
        [record] = self.standin.post_records()
        self.assertEqual((record.size, record.time_source), (size, "message"))
        self.assertFalse(record.post_id == "")
        stored = hashlib.sha256()
        with open(record.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                stored.update(block)
        self.assertEqual(stored.hexdigest(), digest)

    async def test_large_refused_echo(self) -> None:
        """
        A 6 MiB message with a wrong token: the refused form shows it again
        in its textarea (streamed from the file), the whole page as long as
        its Content-Length says; nothing is stored.
        """
        size = 6 * 1024 * 1024
        upload, ctype, digest = self.write_upload(size, token="wrong")
        with open(upload, "rb") as body:
            response = await self.client.post(
                self.url + ADD, data=body, headers={"Content-Type": ctype}
            )
            page = await response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, len(page))
        self.assertEqual(read_status(page).result, PageResult.REFUSED)
        shown = re.search(rb'rows="15" >(.*?)</textarea>', page, re.S)
        assert shown is not None
        self.assertEqual(hashlib.sha256(base64.b64decode(shown.group(1))).hexdigest(), digest)
        self.assertEqual(self.standin.post_records(), [])
        self.assertEqual(files_under(self.directory), [])

    async def drop(self, mode: str) -> None:
        self.standin.faults.drop = mode
        body, ctype = encode_form(add_fields())
        with self.assertRaises((ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed)):
            await self.client.post(self.url + ADD, data=body, headers={"Content-Type": ctype})
        await self.standin.when_idle()

    async def test_drop_before_store(self) -> None:
        """C{drop="before_store"} closes the connection without an answer and stores nothing."""
        await self.drop("before_store")
        self.assertEqual(self.standin.post_records(), [])
        self.assertEqual(os.listdir(os.path.join(self.directory, "groups", "dev", "new")), [])

    async def test_drop_after_store(self) -> None:
        """C{drop="after_store"} stores the post, then closes the connection without an answer."""
        await self.drop("after_store")
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])

    async def test_drop_before_body(self) -> None:
        """
        C{drop="before_body"} resets the connection once the headers are in:
        the client's request fails, nothing is parsed or stored, the request
        is counted.
        """
        await self.drop("before_body")
        self.assertEqual(self.standin.requests["add"], 1)
        self.assertEqual(self.standin.add_requests(), 0)
        self.assertEqual(files_under(self.directory), [])

    async def test_reset_is_rst(self) -> None:
        """
        The reset comes before the body is sent at all, and is a reset, not
        an orderly close: the client sees C{ConnectionLost}, no answer.
        """
        self.standin.faults.drop = "before_body"
        head = (
            b"POST /site" + ADD.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        client = _HeadersOnly(head)
        factory = ClientFactory.forProtocol(lambda: client)
        _reactor.connectTCP("127.0.0.1", self.port.getHost().port, factory)
        [reason] = await client.lost
        self.assertIsInstance(reason.value, ConnectionLost)
        self.assertNotIsInstance(reason.value, ConnectionDone)
        self.assertEqual(client.received, b"")
        self.assertEqual(self.standin.faults, Faults(drop="before_body"))
        await self.standin.when_idle()
