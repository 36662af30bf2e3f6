# -*- test-case-name: tests.test_standin -*-
"""
Tests for L{gsmail.standin}: the GroupServer stand-in enforces the page
contract of C{shared/groupserver-protocol.md}, stores what it accepts in
Maildirs, and misbehaves on request through L{Faults}.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
from collections.abc import Sequence
from typing import Any

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.http import HTTPChannel

from gsmail.standin import Faults, PostRecord, StandIn, _Base64Writer, make_demo_standin

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


def files_under(directory: str) -> list[str]:
    """Every regular file below C{directory}, as paths relative to it, sorted."""
    found = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            found.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(found)


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

    def assertFormPage(self, response: _Response, error: str | None = None) -> None:
        """C{response} is the page's re-rendered HTML form, status 200."""
        self.assertEqual(response.code, 200)
        self.assertTrue(response.content_type.startswith("text/html"))
        self.assertIn(b'<input type="password" name="form.token"', response.body)
        self.assertNotIn(TOKEN.encode(), response.body)
        if error is None:
            self.assertNotIn(b'class="error"', response.body)
        else:
            self.assertIn(error.encode(), response.body)

    def assertDone(self, response: _Response) -> None:
        self.assertEqual(
            (response.code, response.content_type, response.body),
            (200, "text/html; charset=utf-8", b"Done"),
        )

    def assertNothingStored(self) -> None:
        """No post, relay or bounce was kept, and no file was left behind."""
        self.assertEqual(self.standin.post_records(), [])
        self.assertEqual(self.standin.relays(), [])
        self.assertEqual(self.standin.bounces(), [])
        self.assertEqual(files_under(self.directory), [])


class GroupExistsTests(StubTestBase):
    """The group-exists page: which group, if any, has a list address."""

    def test_known_group(self) -> None:
        """A known list address gets JSON naming its group and site."""
        response = self.post(EXISTS, exists_fields("dev@groups.example.com"))
        self.assertEqual((response.code, response.content_type), (200, "application/json"))
        self.assertEqual(
            response.json(),
            {
                "email": "dev@groups.example.com",
                "siteId": "ex_site",
                "groupId": "dev",
                "siteURL": BASE,
            },
        )

    def test_case_insensitive(self) -> None:
        """The lookup ignores the case of the address, as mail addresses' domains do."""
        response = self.post(EXISTS, exists_fields("TEAM@groups.example.com"))
        self.assertEqual(response.json()["groupId"], "team")

    def test_unknown_group(self) -> None:
        """An address no group has gets C{groupId} and C{siteId} null."""
        response = self.post(EXISTS, exists_fields("nobody@groups.example.com"))
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.json(),
            {
                "email": "nobody@groups.example.com",
                "siteId": None,
                "groupId": None,
                "siteURL": BASE,
            },
        )

    def test_wrong_token(self) -> None:
        """A wrong token gets the HTML form with an error and status 200, not JSON."""
        response = self.post(EXISTS, exists_fields("dev@groups.example.com", token="wrong"))
        self.assertFormPage(response, "Invalid token")

    def test_missing_token(self) -> None:
        """A submission without a token is refused like a wrong one."""
        response = self.post(
            EXISTS, [("form.email", "dev@groups.example.com"), ("form.actions.check", "Check")]
        )
        self.assertFormPage(response, "Invalid token")

    def test_no_button(self) -> None:
        """Without the C{form.actions.check} button field nothing runs: the bare form comes back."""
        response = self.post(EXISTS, exists_fields("dev@groups.example.com")[:2])
        self.assertFormPage(response)

    def test_missing_email(self) -> None:
        """Without C{form.email} the form comes back saying the input is missing."""
        response = self.post(EXISTS, exists_fields("dev@groups.example.com")[1:])
        self.assertFormPage(response, "form.email: Required input is missing.")

    def test_get_is_not_an_action(self) -> None:
        """A GET renders the form, whatever its query."""
        d = self.stub.get(
            BASE + EXISTS + "?form.email=dev@groups.example.com&form.actions.check=Check"
        )
        self.assertFormPage(self.finish(d))

    def test_urlencoded_is_not_an_action(self) -> None:
        """Only C{multipart/form-data} runs the action; a URL-encoded POST gets the form."""
        d = self.stub.post(BASE + EXISTS, data=dict(exists_fields("dev@groups.example.com")))
        self.assertFormPage(self.finish(d))

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
    """The add-email page: a post is stored in its group's Maildir."""

    def test_post_stored(self) -> None:
        """A valid post gets C{Done} and its decoded message is stored for the group."""
        self.assertDone(self.post(ADD, add_fields()))
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])
        self.assertEqual(self.standin.posts("team"), [])
        [record] = self.standin.post_records()
        self.assertEqual(
            (record.group_id, record.time_source, record.size), ("dev", "server", len(MESSAGE))
        )

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

    def test_time_source_message(self) -> None:
        """C{form.timeSource=message} is recorded with the post."""
        self.post(ADD, add_fields(time_source="message"))
        self.assertEqual([r.time_source for r in self.standin.post_records()], ["message"])

    def test_time_source_invalid(self) -> None:
        """A time source other than C{server} or C{message} gets the form with an error."""
        self.assertFormPage(self.post(ADD, add_fields(time_source="moon")), "form.timeSource")
        self.assertNothingStored()

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
        """A group id no group has is a Zope error, 500, and nothing is stored."""
        response = self.post(ADD, add_fields(group_id="nosuch"))
        self.assertEqual(response.code, 500)
        self.assertNothingStored()

    def test_wrong_token(self) -> None:
        """A wrong token gets the HTML form with an error, and the message is not kept."""
        self.assertFormPage(self.post(ADD, add_fields(token="wrong")), "Invalid token")
        self.assertNothingStored()

    def test_no_button(self) -> None:
        """Without C{form.actions.add} nothing is stored."""
        fields = [f for f in add_fields() if f[0] != "form.actions.add"]
        self.assertFormPage(self.post(ADD, fields))
        self.assertNothingStored()

    def test_missing_message(self) -> None:
        """Without C{form.emailMessage} the form comes back saying the input is missing."""
        self.assertFormPage(
            self.post(ADD, add_fields()[:-1]), "form.emailMessage: Required input is missing."
        )
        self.assertNothingStored()

    def test_missing_group_id(self) -> None:
        """Without C{form.groupId} the form comes back saying the input is missing."""
        self.assertFormPage(
            self.post(ADD, add_fields()[1:]), "form.groupId: Required input is missing."
        )
        self.assertNothingStored()

    def test_invalid_base64(self) -> None:
        """A message that is not base64 gets the form with an error; nothing is stored."""
        for bad in [b"not base64!", b"QUJD QUJD", b"QUJDQQ", b"QQ==QUJD"]:
            fields = add_fields()[:-1] + [("form.emailMessage", bad)]
            self.assertFormPage(self.post(ADD, fields), "Invalid base64")
        self.assertNothingStored()


class StreamingTests(StubTestBase):
    """The stand-in's own Site parses bodies itself, streaming."""

    def test_own_site(self) -> None:
        """Through the stand-in's Site (no twisted.web form parsing) a post is stored."""
        body, ctype = encode_form(add_fields())
        _channel, transport = self.raw_request(body, ctype)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertTrue(transport.value().endswith(b"Done"))
        self.assertEqual(self.standin.posts("dev"), [MESSAGE])

    def test_malformed_body(self) -> None:
        """A body that is not valid multipart is answered 400 and nothing is kept."""
        body, ctype = encode_form(add_fields())
        _channel, transport = self.raw_request(body[: len(body) // 2], ctype)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertNothingStored()

    def test_base64_pieces(self) -> None:
        """
        base64 arriving in pieces of any length decodes as a whole, and
        padding followed by more data is refused even across pieces.
        """
        out = io.BytesIO()
        writer = _Base64Writer(out)
        for piece in [b"QU", b"JD\r", b"\nQ", b"U", b"=", b"=", b"\r\n"]:
            writer.write(piece)
        writer.finish()
        self.assertEqual((out.getvalue(), writer.size, writer.error), (b"ABCA", 4, None))
        writer.write(b"QUJD")
        self.assertIn("after padding", writer.error or "")
        short = _Base64Writer(io.BytesIO())
        short.write(b"QUJDQ")
        short.finish()
        self.assertIn("padding", short.error or "")


class RelayAndBounceTests(StubTestBase):
    """The relay and bounce pages."""

    def relay_fields(self, token: str = TOKEN) -> list[Field]:
        return [
            ("form.token", token),
            ("form.actions.relay", "Relay"),
            ("form.emailMessage", b64(MESSAGE)),
        ]

    def bounce_fields(self, token: str = TOKEN) -> list[Field]:
        return [
            ("form.userEmail", "alice@example.org"),
            ("form.groupEmail", "dev@groups.example.com"),
            ("form.token", token),
            ("form.actions.handle", "Handle"),
        ]

    def test_relay(self) -> None:
        """A relayed message gets C{Done} and is stored in C{relays/new/}."""
        self.assertDone(self.post(RELAY, self.relay_fields()))
        self.assertEqual(self.standin.relays(), [MESSAGE])
        [name] = os.listdir(os.path.join(self.directory, "relays", "new"))
        with open(os.path.join(self.directory, "relays", "new", name), "rb") as f:
            self.assertEqual(f.read(), MESSAGE)

    def test_relay_wrong_token(self) -> None:
        """A relay with a wrong token is refused with the form and not stored."""
        self.assertFormPage(self.post(RELAY, self.relay_fields(token="x")), "Invalid token")
        self.assertNothingStored()

    def test_bounce(self) -> None:
        """A bounce gets C{Done} and is recorded in memory and in C{bounces.jsonl}."""
        self.assertDone(self.post(BOUNCE, self.bounce_fields()))
        self.assertEqual(self.standin.bounces(), [("alice@example.org", "dev@groups.example.com")])
        with open(os.path.join(self.directory, "bounces.jsonl"), encoding="utf-8") as f:
            lines = [json.loads(line) for line in f]
        self.assertEqual(
            lines, [{"userEmail": "alice@example.org", "groupEmail": "dev@groups.example.com"}]
        )

    def test_bounce_missing_field(self) -> None:
        """A bounce without either address gets the form with an error and is not recorded."""
        self.assertFormPage(
            self.post(BOUNCE, self.bounce_fields()[:1] + self.bounce_fields()[2:]),
            "form.groupEmail: Required input is missing.",
        )
        self.assertFormPage(
            self.post(BOUNCE, self.bounce_fields()[1:]),
            "form.userEmail: Required input is missing.",
        )
        self.assertNothingStored()

    def test_bounce_wrong_token(self) -> None:
        """A bounce with a wrong token is refused with the form and not recorded."""
        self.assertFormPage(self.post(BOUNCE, self.bounce_fields(token="x")), "Invalid token")
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

    def test_status(self) -> None:
        """With C{status}, the page answers that status and C{error}, and stores nothing."""
        self.standin.faults.status = 503
        response = self.post(ADD, add_fields())
        self.assertEqual((response.code, response.body), (503, b"error"))
        self.assertNothingStored()

    def test_html_instead_of_json(self) -> None:
        """group-exists answers HTML as for a wrong token; other pages are unaffected."""
        self.standin.faults.html_instead_of_json = True
        self.assertFormPage(
            self.post(EXISTS, exists_fields("dev@groups.example.com")), "Invalid token"
        )
        self.assertDone(self.post(ADD, add_fields()))

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
        self.standin.faults.reset()
        self.assertDone(self.post(ADD, add_fields()))

    def test_invalid_fault(self) -> None:
        """An unknown C{drop} mode or page name is refused when set."""
        faults = Faults()
        self.assertRaises(ValueError, setattr, faults, "drop", "sometimes")
        self.assertRaises(ValueError, setattr, faults, "pages", frozenset({"exist"}))

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

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.lost.callback(None)


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

    async def test_large_upload(self) -> None:
        """A 20 MiB message posted through a socket is stored byte for byte."""
        rng = random.Random(7)
        digest = hashlib.sha256()
        upload = self.mktemp()
        head, ctype = encode_form(add_fields(time_source="message")[:-1])
        size = 20 * 1024 * 1024
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
        with open(upload, "rb") as body:
            response = await self.client.post(
                self.url + ADD, data=body, headers={"Content-Type": ctype}
            )
            text = await response.content()
        self.assertEqual((response.code, text), (200, b"Done"))
        [record] = self.standin.post_records()
        self.assertEqual((record.size, record.time_source), (size, "message"))
        stored = hashlib.sha256()
        with open(record.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                stored.update(block)
        self.assertEqual(stored.hexdigest(), digest.hexdigest())

    async def drop(self, mode: str) -> None:
        self.standin.faults.drop = mode
        body, ctype = encode_form(add_fields())
        with self.assertRaises((ResponseNeverReceived, ResponseFailed)):
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
