# -*- test-case-name: tests.test_groupserver -*-
"""
Tests for L{gsmail.groupserver}: the HTTP client of GroupServer's four pages,
against the GroupServer stand-in (in memory and on a real 127.0.0.1 socket),
and its streaming multipart body producer on its own.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable
from typing import Any

import multipart
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import reactor as global_reactor
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, gatherResults
from twisted.internet.interfaces import IConsumer, IOpenSSLContextFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gsmail import status
from gsmail.groupserver import (
    CHUNK_SIZE,
    MAX_REPLY_SIZE,
    GroupServerClient,
    MultipartBody,
    SpoolReadError,
)
from gsmail.interfaces import GroupInfo, IGroupServer, MessageSource
from gsmail.standin import StandIn
from gsmail.status import GroupServerError
from tests.certificates import self_signed
from tests.fakes import GS_GROUPS as GROUPS
from tests.fakes import GS_TOKEN as TOKEN
from tests.fakes import InMemory, StepCooperator
from tests.pages import page as answer_page
from tests.util import TrackingFactory

ALL_BYTES = bytes(range(256)) * 3


def write_message(
    testcase: SynchronousTestCase, data: bytes, prefix: bytes = b"", size: int | None = None
) -> MessageSource:
    """A spool file holding C{data}; the message is C{prefix} + C{data[:size]}."""
    path = testcase.mktemp()
    with open(path, "wb") as f:
        f.write(data)
    return MessageSource(prefix=prefix, path=path, size=len(data) if size is None else size)


def open_fds_to(path: str) -> int:
    """How many file descriptors of this process are open on C{path}."""
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                count += 1
        except OSError:
            pass
    return count


# -- the body producer alone ------------------------------------------------


@implementer(IConsumer)
class ListConsumer:
    """A consumer that keeps every write; optionally acts on each write."""

    def __init__(self, on_write: Callable[[bytes], None] | None = None) -> None:
        self.writes: list[bytes] = []
        self._on_write = on_write

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        if self._on_write is not None:
            self._on_write(data)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def value(self) -> bytes:
        return b"".join(self.writes)


def parse_form(body: bytes, boundary: str) -> dict[str, bytes]:
    """The fields of a multipart/form-data body, parsed by an independent parser."""
    fields: dict[str, bytes] = {}
    name = ""
    parts: list[bytes] = []
    with multipart.PushMultipartParser(boundary) as parser:
        for event in parser.parse(body):
            if isinstance(event, multipart.MultipartSegment):
                name, parts = event.name, []
            elif event is None:
                fields[name] = b"".join(parts)
            else:
                parts.append(event)
        parser.close()
    return fields


class MultipartBodyTests(SynchronousTestCase):
    """
    L{MultipartBody} streams a form with the message base64-encoded on the
    fly, announcing its exact length up front.
    """

    def produce(
        self, message: MessageSource | None, chunk_size: int = CHUNK_SIZE
    ) -> tuple[MultipartBody, bytes]:
        steps = StepCooperator()
        body = MultipartBody(
            [("form.groupId", "dev"), ("form.token", TOKEN)],
            message,
            cooperator=steps.cooperator,
            chunk_size=chunk_size,
        )
        consumer = ListConsumer()
        done = body.startProducing(consumer)
        steps.run()
        self.successResultOf(done)
        return body, consumer.value()

    def test_fields_and_message_round_trip(self) -> None:
        """
        A server parsing the body finds every field and, in
        form.emailMessage, the base64 of the prefix then the file, without
        line breaks; the body is exactly as long as announced.
        """
        message = write_message(self, ALL_BYTES, prefix=b"X-Original-To: dev@example.com\n")
        body, data = self.produce(message)
        self.assertEqual(len(data), body.length)
        fields = parse_form(data, body.boundary)
        self.assertEqual(fields["form.groupId"], b"dev")
        self.assertEqual(fields["form.token"], TOKEN.encode())
        self.assertNotIn(b"\n", fields["form.emailMessage"])
        self.assertEqual(
            base64.b64decode(fields["form.emailMessage"], validate=True),
            b"X-Original-To: dev@example.com\n" + ALL_BYTES,
        )
        self.assertTrue(body.complete)
        self.assertEqual(
            body.content_type, b"multipart/form-data; boundary=" + body.boundary.encode()
        )

    def test_every_prefix_and_size_around_chunk_boundaries(self) -> None:
        """
        Whatever the prefix and file sizes relative to the chunk size, the
        decoded message is exactly the prefix then the first C{size} bytes
        of the file, and the length announced is the length written.
        """
        data = bytes(range(256))
        for prefix_len in range(8):
            for size in range(14):
                message = write_message(
                    self, data[:size] + b"TRAILING", data[100 : 100 + prefix_len], size
                )
                body, written = self.produce(message, chunk_size=6)
                self.assertEqual(len(written), body.length, (prefix_len, size))
                decoded = base64.b64decode(parse_form(written, body.boundary)["form.emailMessage"])
                self.assertEqual(
                    decoded, data[100 : 100 + prefix_len] + data[:size], (prefix_len, size)
                )

    def test_real_chunk_size_boundaries(self) -> None:
        """
        Files of 3*2**16 bytes and one byte either side (the real chunk
        size) round-trip exactly, with and without a prefix.
        """
        for size in (CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE + 2):
            for prefix in (b"", b"P: 1\n"):
                content = (ALL_BYTES * (size // len(ALL_BYTES) + 1))[:size]
                body, written = self.produce(write_message(self, content, prefix))
                self.assertEqual(len(written), body.length)
                decoded = base64.b64decode(parse_form(written, body.boundary)["form.emailMessage"])
                self.assertEqual(decoded, prefix + content)

    def test_reads_one_chunk_per_step(self) -> None:
        """
        Each cooperator step writes the encoding of at most one chunk: memory
        does not grow with the message.
        """
        steps = StepCooperator()
        body = MultipartBody(
            [], write_message(self, b"x" * 30), cooperator=steps.cooperator, chunk_size=9
        )
        consumer = ListConsumer()
        body.startProducing(consumer)
        steps.run()
        encoded = [
            w for w in consumer.writes if not w.startswith(b"--") and not w.startswith(b"\r\n--")
        ]
        self.assertEqual([len(w) for w in encoded], [12, 12, 12, 4])

    def test_pause_and_resume(self) -> None:
        """
        While paused the producer writes nothing; after resuming it finishes
        the body.
        """
        steps = StepCooperator()
        message = write_message(self, b"a" * 100)
        body = MultipartBody([], message, cooperator=steps.cooperator, chunk_size=3)
        consumer = ListConsumer()
        done = body.startProducing(consumer)
        steps.step()
        steps.step()
        written = len(consumer.value())
        body.pauseProducing()
        for _ in range(5):
            steps.step()
        self.assertEqual(len(consumer.value()), written)
        self.assertNoResult(done)
        body.resumeProducing()
        steps.run()
        self.successResultOf(done)
        self.assertEqual(len(consumer.value()), body.length)

    def test_stop_closes_the_file(self) -> None:
        """
        Stopping mid-body stops the writes, fails the producing Deferred and
        closes the spool file.
        """
        steps = StepCooperator()
        message = write_message(self, b"a" * 100)
        body = MultipartBody([], message, cooperator=steps.cooperator, chunk_size=3)
        consumer = ListConsumer()
        done = body.startProducing(consumer)
        steps.step()
        steps.step()
        self.assertEqual(open_fds_to(message.path), 1)
        body.stopProducing()
        written = len(consumer.value())
        steps.run()
        self.assertEqual(len(consumer.value()), written)
        self.assertNoResult(done)  # IBodyProducer: never fires once stopped
        self.assertEqual(open_fds_to(message.path), 0)
        self.assertFalse(body.complete)

    def test_stop_from_inside_a_write(self) -> None:
        """
        A consumer that stops the producer while it is writing (connection
        lost) ends production cleanly, with the file closed.
        """
        steps = StepCooperator()
        message = write_message(self, b"a" * 100)
        body = MultipartBody([], message, cooperator=steps.cooperator, chunk_size=3)
        consumer = ListConsumer(
            on_write=lambda data: len(consumer.writes) == 3 and body.stopProducing()
        )
        done = body.startProducing(consumer)
        steps.run()
        self.assertNoResult(done)  # IBodyProducer: never fires once stopped
        self.assertEqual(len(consumer.writes), 3)
        self.assertEqual(open_fds_to(message.path), 0)

    def test_file_closed_when_complete(self) -> None:
        """Once the whole body is written the spool file is closed."""
        message = write_message(self, b"abc" * 10)
        self.produce(message)
        self.assertEqual(open_fds_to(message.path), 0)

    def test_short_spool_file(self) -> None:
        """
        A spool file shorter than the message size fails production with
        L{SpoolReadError} (the request must not look complete) and is closed.
        """
        steps = StepCooperator()
        message = write_message(self, b"abc", size=10)
        body = MultipartBody([], message, cooperator=steps.cooperator)
        done = body.startProducing(ListConsumer())
        steps.run()
        self.failureResultOf(done, SpoolReadError)
        self.assertEqual(open_fds_to(message.path), 0)
        self.assertFalse(body.complete)

    def test_missing_spool_file(self) -> None:
        """A spool file that is gone fails production with L{SpoolReadError}."""
        steps = StepCooperator()
        message = MessageSource(b"", self.mktemp(), 10)
        body = MultipartBody([], message, cooperator=steps.cooperator)
        done = body.startProducing(ListConsumer())
        steps.run()
        self.failureResultOf(done, SpoolReadError)

    def test_fields_only_body_is_written_at_once(self) -> None:
        """
        A body without a message needs no cooperator and is complete as soon
        as production starts.
        """
        body = MultipartBody([("form.email", "dev@groups.example.com")])
        consumer = ListConsumer()
        self.successResultOf(body.startProducing(consumer))
        self.assertEqual(len(consumer.value()), body.length)
        self.assertEqual(
            parse_form(consumer.value(), body.boundary), {"form.email": b"dev@groups.example.com"}
        )
        self.assertTrue(body.complete)

    def test_small_message_in_memory_is_written_at_once(self) -> None:
        """
        A message the spool kept in memory, of at most one chunk, goes to
        the transport in one write with no cooperator step: GroupServer gets
        the request in one piece, as from a client that builds the whole body
        first (bench/RESULTS.md, "What a post costs GroupServer").
        """
        data = b"Subject: s\n\n" + b"x" * 4096
        prefix = b"X-Original-To: dev@groups.example.com\n"
        message = MessageSource(prefix=prefix, path="/nonexistent", size=len(data), data=data)
        steps = StepCooperator()
        body = MultipartBody([("form.groupId", "dev")], message, cooperator=steps.cooperator)
        consumer = ListConsumer()
        self.successResultOf(body.startProducing(consumer))
        self.assertEqual(len(consumer.writes), 1)
        self.assertFalse(steps.step(), "a cooperator step was scheduled")
        self.assertEqual(len(consumer.writes[0]), body.length)
        fields = parse_form(consumer.writes[0], body.boundary)
        self.assertEqual(base64.b64decode(fields["form.emailMessage"]), prefix + data)
        self.assertTrue(body.complete)

    def test_utf8_field_values(self) -> None:
        """Non-ASCII field values are sent as UTF-8."""
        body = MultipartBody([("form.userEmail", "jos\u00e9@exampl\u00e9.org")])
        consumer = ListConsumer()
        body.startProducing(consumer)
        self.assertEqual(len(consumer.value()), body.length)
        self.assertEqual(
            parse_form(consumer.value(), body.boundary)["form.userEmail"].decode("utf-8"),
            "jos\u00e9@exampl\u00e9.org",
        )

    def test_token_not_in_repr(self) -> None:
        """The repr of a body never shows field values (the token)."""
        self.assertNotIn(TOKEN, repr(MultipartBody([("form.token", TOKEN)])))

    def test_bad_arguments(self) -> None:
        """A chunk size not a multiple of 3, or a message without a cooperator, is refused."""
        self.assertRaises(ValueError, MultipartBody, [], None, chunk_size=4)
        self.assertRaises(ValueError, MultipartBody, [], MessageSource(b"", "x", 0))


# -- in memory, against the stand-in's resource -----------------------------


class _Fixed(Resource):
    """Answers every request with one fixed status, headers and body."""

    isLeaf = True

    def __init__(self, code: int, body: bytes, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__()
        self.code, self.body, self.headers, self.seen = code, body, headers or {}, 0

    def render(self, request: server.Request) -> bytes:
        self.seen += 1
        request.setResponseCode(self.code)
        for k, v in self.headers.items():
            request.setHeader(k, v)
        return self.body


class _DropFirst(Resource):
    """Aborts the connection of the first C{drops} requests, then delegates."""

    isLeaf = True

    def __init__(self, inner: Resource, drops: int = 1) -> None:
        super().__init__()
        self.inner, self.drops, self.seen = inner, drops, 0

    def render(self, request: server.Request) -> Any:
        self.seen += 1
        if self.seen <= self.drops:
            request.transport.abortConnection()
            return server.NOT_DONE_YET
        return self.inner.render(request)


class InMemoryClientTests(SynchronousTestCase):
    """
    L{GroupServerClient} against the stand-in's pages (and tiny resources)
    in memory, with timers on a L{Clock}.
    """

    def lookup(self, env: InMemory, address: str) -> Deferred[GroupInfo]:
        d = env.client.lookup_group(address)
        env.pump()
        return d

    def assertReply(
        self, d: Deferred[Any], reply: status.Reply, unknown: bool = False
    ) -> GroupServerError:
        error = self.failureResultOf(d, GroupServerError).value
        self.assertEqual((error.reply, error.outcome_unknown), (reply, unknown), str(error))
        self.assertNotIn(TOKEN, str(error))
        return error

    def test_provides_interface(self) -> None:
        """The client is an L{IGroupServer}."""
        self.assertTrue(verifyObject(IGroupServer, InMemory(self).client))

    def test_lookup_known_group(self) -> None:
        """A list address of a group gives that group's id and the site id."""
        env = InMemory(self)
        info = self.successResultOf(self.lookup(env, "dev@groups.example.com"))
        self.assertEqual(info.group_id, "dev")
        self.assertEqual(info.site_id, "example")
        self.assertEqual(info.email, "dev@groups.example.com")
        self.assertEqual(env.clock.getDelayedCalls(), [])

    def test_lookup_unknown_group(self) -> None:
        """An address no group has gives C{group_id} None (not an error)."""
        env = InMemory(self)
        info = self.successResultOf(self.lookup(env, "nobody@groups.example.com"))
        self.assertEqual((info.group_id, info.site_id), (None, None))

    def test_lookup_wrong_token(self) -> None:
        """
        A wrong token re-renders the page as HTML with an error status, 200:
        the lookup fails with 4.3.5 (this site's configuration), naming the
        page and the status, never the token.
        """
        env = InMemory(self, token="wrong")
        error = self.assertReply(
            self.lookup(env, "dev@groups.example.com"), status.GROUPSERVER_REFUSED
        )
        self.assertIn("group-exists page refused it", str(error))
        self.assertNotIn("wrong", str(error))

    def test_lookup_html_instead_of_json(self) -> None:
        """The form page with an error instead of JSON is a refusal, 4.3.5."""
        env = InMemory(self)
        env.standin.faults.html_instead_of_json = True
        self.assertReply(self.lookup(env, "dev@groups.example.com"), status.GROUPSERVER_REFUSED)

    def test_lookup_login_page(self) -> None:
        """
        A 200 page without a status message (a login page) instead of JSON:
        the check did not run, 4.5.0.
        """
        page = b"<html><body><form><input name='__ac_name'/></form></body></html>"
        env = InMemory(self, _Fixed(200, page))
        self.assertReply(self.lookup(env, "dev@groups.example.com"), status.GROUPSERVER_NOT_RUN)

    def test_lookup_json_without_group_id(self) -> None:
        """A JSON answer without C{groupId} is 4.5.0 bad reply."""
        env = InMemory(self, _Fixed(200, b'{"email": "x"}'))
        self.assertReply(self.lookup(env, "dev@groups.example.com"), status.GROUPSERVER_BAD_REPLY)

    def test_lookup_server_error(self) -> None:
        """A 500 answer is 4.5.0 error, naming the status."""
        env = InMemory(self)
        env.standin.faults.status = 500
        error = self.assertReply(
            self.lookup(env, "dev@groups.example.com"), status.GROUPSERVER_ERROR
        )
        self.assertIn("500", str(error))

    def test_redirect_is_an_error(self) -> None:
        """A redirect is not followed: it is 4.5.0 error with its status."""
        resource = _Fixed(302, b"", {b"location": b"http://elsewhere.example/"})
        env = InMemory(self, resource)
        error = self.assertReply(
            self.lookup(env, "dev@groups.example.com"), status.GROUPSERVER_ERROR
        )
        self.assertIn("302", str(error))
        self.assertEqual(resource.seen, 1)

    def test_oversized_reply(self) -> None:
        """A reply over 1 MiB is not buffered: the lookup fails with 4.5.0."""
        env = InMemory(self, _Fixed(200, b" " * (MAX_REPLY_SIZE + 1)))
        self.assertReply(self.lookup(env, "dev@groups.example.com"), status.GROUPSERVER_BAD_REPLY)

    def test_lookup_timeout(self) -> None:
        """
        A lookup with no answer within the response timeout fails with 4.4.7
        (outcome known: a lookup changes nothing), leaving no timer behind.
        """
        env = InMemory(self, response_timeout=5.0)
        env.standin.faults.delay = 10.0
        d = self.lookup(env, "dev@groups.example.com")
        env.clock.advance(4.9)
        self.assertNoResult(d)
        env.clock.advance(0.1)
        env.pump()
        self.assertReply(d, status.GROUPSERVER_TIMEOUT)
        env.clock.advance(10)
        env.pump()
        self.assertEqual(env.clock.getDelayedCalls(), [])

    def test_cancelled_lookup(self) -> None:
        """
        A lookup its caller cancels fails with L{CancelledError}: it is not
        retried nor reported as a GroupServer fault, and leaves no timer.
        """
        env = InMemory(self)
        env.standin.faults.delay = 10.0
        d = self.lookup(env, "dev@groups.example.com")
        d.cancel()
        env.pump()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(env.standin.requests["exists"], 1)
        env.clock.advance(10)
        env.pump()
        self.assertEqual(env.clock.getDelayedCalls(), [])

    def test_lookup_retried_once_after_lost_connection(self) -> None:
        """
        A lookup whose connection dies before any answer (a stale keep-alive
        connection) is sent once more and succeeds.
        """
        env = InMemory(self, wrap=_DropFirst)
        info = self.successResultOf(self.lookup(env, "dev@groups.example.com"))
        self.assertEqual((info.group_id, env.resource.seen), ("dev", 2))

    def test_lookup_not_retried_twice(self) -> None:
        """
        A lookup whose connection dies twice fails with 4.4.4 (not "outcome
        unknown": a lookup changes nothing).
        """
        env = InMemory(self, wrap=lambda r: _DropFirst(r, drops=5))
        self.assertReply(self.lookup(env, "dev@groups.example.com"), status.GROUPSERVER_UNREACHABLE)
        self.assertEqual(env.resource.seen, 2)

    def test_bounce(self) -> None:
        """A bounce is recorded with the member's and the group's addresses."""
        env = InMemory(self)
        d = env.client.record_bounce("alice@example.org", "dev@groups.example.com")
        env.pump()
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(env.standin.bounces(), [("alice@example.org", "dev@groups.example.com")])

    def test_bounce_wrong_token(self) -> None:
        """A bounce with a wrong token is refused, 4.3.5, and records nothing."""
        env = InMemory(self, token="wrong")
        d = env.client.record_bounce("alice@example.org", "dev@groups.example.com")
        env.pump()
        self.assertReply(d, status.GROUPSERVER_REFUSED)
        self.assertEqual(env.standin.bounces(), [])

    def _add(self, env: InMemory) -> Deferred[None]:
        d = env.client.add_post("dev", write_message(self, b"Subject: hi\n\nbody\n"))
        env.pump()
        return d

    def test_done_page_with_form_is_success(self) -> None:
        """
        GroupServer shows its form again on success: the status C{Done}
        decides, not the token's input on the page.
        """
        env = InMemory(self, _Fixed(200, answer_page("Done")))
        self.assertIsNone(self.successResultOf(self._add(env)))

    def test_unexpected_status(self) -> None:
        """
        A status message that is none of GroupServer's: 4.5.0, and the add
        may have happened (the retry is safe: GroupServer archives once).
        """
        env = InMemory(self, _Fixed(200, answer_page("Queued for moderation")))
        error = self.assertReply(self._add(env), status.GROUPSERVER_BAD_REPLY, unknown=True)
        self.assertIn("Queued for moderation", str(error))

    def test_add_not_run(self) -> None:
        """A 200 page without a status message: nothing was added, 4.5.0."""
        env = InMemory(self, _Fixed(200, answer_page(None)))
        self.assertReply(self._add(env), status.GROUPSERVER_NOT_RUN)

    def test_proxy_gave_up(self) -> None:
        """A 502 or 504 from a proxy: 4.5.0, and the add may have happened."""
        for code in (502, 504):
            env = InMemory(self, _Fixed(code, b"<html>Bad Gateway</html>"))
            self.assertReply(self._add(env), status.GROUPSERVER_ERROR, unknown=True)

    def test_bounce_no_user(self) -> None:
        """The bounce page's C{No user found for ...} is a success: False."""
        env = InMemory(self, _Fixed(200, answer_page("No user found for a@example.org")))
        d = env.client.record_bounce("a@example.org", "dev@groups.example.com")
        env.pump()
        self.assertIs(self.successResultOf(d), False)

    def test_refused_page_over_the_cap(self) -> None:
        """
        A refused page shows the message again in its textarea, so a big
        message makes it longer than L{MAX_REPLY_SIZE}: it is still read as
        a refusal (4.3.5) from its head, not as an unknown outcome.
        """
        refused = answer_page("<p>There is an error:</p>", "alert-block alert-error")
        filler = b"<textarea>" + b"A" * (MAX_REPLY_SIZE + 1) + b"</textarea>"
        env = InMemory(self, _Fixed(200, refused.replace(b"</form>", filler + b"</form>")))
        self.assertReply(self._add(env), status.GROUPSERVER_REFUSED)

    def test_no_user_only_on_the_bounce_page(self) -> None:
        """C{No user found} from the add page is not a success."""
        env = InMemory(self, _Fixed(200, answer_page("No user found for a@example.org")))
        self.assertReply(self._add(env), status.GROUPSERVER_BAD_REPLY, unknown=True)

    def test_add_post_not_retried(self) -> None:
        """
        An add whose connection dies after it was sent is not sent again: it
        fails with 4.4.2 and C{outcome_unknown}.
        """
        env = InMemory(self, wrap=_DropFirst)
        d = env.client.add_post("dev", write_message(self, b"Subject: hi\n\nbody\n"))
        env.pump()
        self.assertReply(d, status.OUTCOME_UNKNOWN, unknown=True)
        self.assertEqual(env.resource.seen, 1)

    def test_add_post_bad_time_source(self) -> None:
        """An unknown time source is a programming error, refused before sending."""
        env = InMemory(self)
        self.failureResultOf(
            env.client.add_post("dev", write_message(self, b"x"), "moon"), ValueError
        )
        self.assertEqual(sum(env.standin.requests.values()), 0)

    def test_add_post_missing_spool_file(self) -> None:
        """A spool file that cannot be read is 4.3.0 and nothing is posted."""
        env = InMemory(self)
        d = env.client.add_post("dev", MessageSource(b"", self.mktemp(), 5))
        env.pump()
        self.assertReply(d, status.LOCAL_ERROR)
        self.assertEqual(env.standin.post_records(), [])

    def test_add_post_proxy_timeout(self) -> None:
        """
        A 504 from a proxy in front of GroupServer is 4.5.0, outcome unknown:
        GroupServer may still add the post.
        """
        env = InMemory(self, _Fixed(504, b"Gateway Timeout"))
        d = env.client.add_post("dev", write_message(self, b"x"))
        env.pump()
        self.assertReply(d, status.GROUPSERVER_ERROR, unknown=True)

    def test_repr_and_logs_hide_the_token(self) -> None:
        """
        The client's repr shows its URL only, and no log event of a call
        contains the token; events carry page, status and elapsed fields.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        env = InMemory(self)
        self.assertEqual(repr(env.client), "<GroupServerClient url='http://groups.example.com'>")
        self.successResultOf(self.lookup(env, "dev@groups.example.com"))
        env.standin.faults.status = 500
        self.failureResultOf(self.lookup(env, "dev@groups.example.com"))
        mine = [e for e in events if e.get("page") == "exists"]
        self.assertEqual([e["status"] for e in mine], [200, 500])
        self.assertTrue(all(isinstance(e["elapsed"], float) for e in mine))
        self.assertNotIn(TOKEN, repr(events))

    def test_bad_url(self) -> None:
        """A URL without a host or not http(s) is refused at construction."""
        for url in ("groups.example.com", "ftp://groups.example.com", "http://"):
            self.assertRaises(ValueError, GroupServerClient, Clock(), url, TOKEN)


# -- on a real socket ---------------------------------------------------------


class NotifyingClock(Clock):
    """
    A L{Clock} that tells when C{n} L{deferLater} calls due C{delay} seconds
    from now are scheduled: the stand-in's L{Faults.delay} waits, not the
    web server's own timers on this clock.
    """

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[tuple[int, float, Deferred[None]]] = []

    def due_in(self, delay: float) -> int:
        return sum(
            1
            for c in self.calls
            if c.getTime() == self.seconds() + delay
            and isinstance(getattr(c.func, "__self__", None), Deferred)  # deferLater's
        )

    def callLater(self, delay: float, f: Callable[..., object], *a: object, **kw: object) -> Any:
        call = super().callLater(delay, f, *a, **kw)
        for w in [w for w in self._waiters if self.due_in(w[1]) >= w[0]]:
            self._waiters.remove(w)
            w[2].callback(None)
        return call

    def when_scheduled(self, n: int, delay: float) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.due_in(delay) >= n:
            d.callback(None)
        else:
            self._waiters.append((n, delay, d))
        return d


class _ConcurrencyGauge(Resource):
    """Wraps a resource; records the most requests it had open at once."""

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self.inner, self.open, self.most = inner, 0, 0

    def render(self, request: server.Request) -> Any:
        self.open += 1
        self.most = max(self.most, self.open)

        def closed(_: object) -> None:
            self.open -= 1

        request.notifyFinish().addBoth(closed)
        return self.inner.render(request)


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """
    A server TLS context from PEM certificate and key, built with
    cryptography objects (pyOpenSSL's X509/PKey are deprecated).
    """

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        self._context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._context.use_certificate(x509.load_pem_x509_certificate(cert_pem))
        self._context.use_privatekey(serialization.load_pem_private_key(key_pem, None))

    def getContext(self) -> SSL.Context:
        return self._context


class SocketClientTests(TestCase):
    """
    L{GroupServerClient} over real TCP (and TLS) connections to the
    stand-in's site on 127.0.0.1; the stand-in's delays run on a clock of
    the test's, so nothing waits for real time but the timeout tests.
    """

    def serve(
        self,
        wrap: Callable[[Resource], Resource] | None = None,
        tls: tuple[bytes, bytes] | None = None,
        **kw: Any,
    ) -> GroupServerClient:
        """Start the stand-in on a free port and return a client of it."""
        self.standin_clock = NotifyingClock()
        self.standin = StandIn(
            self.mktemp(), TOKEN, GROUPS, clock=self.standin_clock, reactor=global_reactor
        )
        site = self.standin.site()
        if wrap is not None:
            site.resource = wrap(site.resource)
        self.tracking = TrackingFactory(site)
        if tls is None:
            port = global_reactor.listenTCP(0, self.tracking, interface="127.0.0.1")
            scheme = "http"
        else:
            options = ServerTLS(*tls)
            port = global_reactor.listenSSL(0, self.tracking, options, interface="127.0.0.1")
            scheme = "https"
        self.addCleanup(port.stopListening)
        kw.setdefault("response_timeout", 30.0)
        client = GroupServerClient(
            global_reactor,
            f"{scheme}://127.0.0.1:{port.getHost().port}/site/",
            kw.pop("token", TOKEN),
            **kw,
        )
        self.addCleanup(_tear_down, self.standin, self.standin_clock, client, self.tracking)
        return client

    async def assertFails(
        self, d: Deferred[Any], reply: status.Reply, unknown: bool = False
    ) -> GroupServerError:
        try:
            await d
        except GroupServerError as e:
            self.assertEqual((e.reply, e.outcome_unknown), (reply, unknown), str(e))
            self.assertNotIn(TOKEN, str(e))
            return e
        self.fail("no GroupServerError")

    async def test_add_post_stores_exact_bytes(self) -> None:
        """
        Posts of every small size, of all 256 byte values, and of sizes
        around the 3*2**16 chunk are stored as exactly prefix + file bytes,
        with the time source asked for.
        """
        client = self.serve()
        prefix = b"Return-Path: <a@example.org>\nX-Original-To: dev@groups.example.com\n"
        sizes = [0, 1, 2, 3, 4, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1]
        expected = []
        for size in sizes:
            content = (ALL_BYTES * (size // len(ALL_BYTES) + 1))[:size]
            await client.add_post("dev", write_message(self, content + b"junk", prefix, size))
            expected.append(prefix + content)
        await client.add_post("ops", write_message(self, ALL_BYTES), "message")
        self.assertEqual(self.standin.posts("dev"), expected)
        self.assertEqual(self.standin.posts("ops"), [ALL_BYTES])
        self.assertEqual(
            [r.time_source for r in self.standin.post_records()],
            ["server"] * len(sizes) + ["message"],
        )

    async def test_big_post_checksum(self) -> None:
        """An 8 MiB message arrives intact (same sha256 at the stand-in)."""
        client = self.serve()
        content = os.urandom(8 * 2**20)
        await client.add_post("dev", write_message(self, content, b"X-A: b\n"))
        [stored] = self.standin.posts("dev")
        self.assertEqual(
            hashlib.sha256(stored).hexdigest(), hashlib.sha256(b"X-A: b\n" + content).hexdigest()
        )

    async def test_relay(self) -> None:
        """A relayed message is stored by the relay page byte for byte."""
        client = self.serve()
        await client.relay(write_message(self, ALL_BYTES, b"X-Original-To: p-abc@example.com\n"))
        self.assertEqual(self.standin.relays(), [b"X-Original-To: p-abc@example.com\n" + ALL_BYTES])

    async def test_bounce_and_lookup(self) -> None:
        """Lookups and bounces work over a real connection under a path prefix."""
        client = self.serve()
        info = await client.lookup_group("dev@groups.example.com")
        self.assertEqual(info.group_id, "dev")
        await client.record_bounce("alice@example.org", "dev@groups.example.com")
        self.assertEqual(self.standin.bounces(), [("alice@example.org", "dev@groups.example.com")])

    async def test_wrong_token_add(self) -> None:
        """An add with a wrong token is refused, 4.3.5, and stores nothing."""
        client = self.serve(token="not-the-token")
        await self.assertFails(
            client.add_post("dev", write_message(self, b"Subject: x\n\nhi\n")),
            status.GROUPSERVER_REFUSED,
        )
        self.assertEqual(self.standin.post_records(), [])

    async def test_empty_message(self) -> None:
        """
        An empty message is refused by the page (a required field): 4.3.5,
        nothing stored.
        """
        client = self.serve()
        await self.assertFails(
            client.add_post("dev", write_message(self, b"")), status.GROUPSERVER_REFUSED
        )
        self.assertEqual(self.standin.post_records(), [])

    async def test_server_error(self) -> None:
        """A 500 from the add page is 4.5.0 error, outcome known."""
        client = self.serve()
        self.standin.faults.status = 500
        error = await self.assertFails(
            client.add_post("dev", write_message(self, b"x")), status.GROUPSERVER_ERROR
        )
        self.assertIn("500", str(error))

    async def test_drop_after_store(self) -> None:
        """
        When the connection is lost after GroupServer stored the post, the
        add fails with 4.4.2 outcome unknown, and the post is stored once
        (not sent again).
        """
        client = self.serve()
        self.standin.faults.drop = "after_store"
        await self.assertFails(
            client.add_post("dev", write_message(self, b"x")), status.OUTCOME_UNKNOWN, True
        )
        self.assertEqual(self.standin.posts("dev"), [b"x"])
        self.assertEqual(self.standin.requests["add"], 1)

    async def test_drop_before_store(self) -> None:
        """
        When the connection is lost before storing, the client cannot tell
        the difference: 4.4.2 outcome unknown; nothing is stored.
        """
        client = self.serve()
        self.standin.faults.drop = "before_store"
        await self.assertFails(
            client.relay(write_message(self, b"x")), status.OUTCOME_UNKNOWN, True
        )
        self.assertEqual(self.standin.relays(), [])

    async def test_connection_refused(self) -> None:
        """A closed port is 4.4.4 unreachable, outcome known."""
        port = global_reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        client = GroupServerClient(global_reactor, f"http://127.0.0.1:{number}", TOKEN)
        await self.assertFails(
            client.add_post("dev", write_message(self, b"x")), status.GROUPSERVER_UNREACHABLE
        )
        await self.assertFails(
            client.lookup_group("dev@groups.example.com"), status.GROUPSERVER_UNREACHABLE
        )
        await client.close()

    async def test_connection_lost_while_sending(self) -> None:
        """
        A server that hangs up while the message is still being sent gives
        4.4.4 with the outcome known (nothing can have been posted).
        """

        class HangUp(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.abortConnection()  # type: ignore[union-attr]

        tracking = TrackingFactory(Factory.forProtocol(HangUp))
        port = global_reactor.listenTCP(0, tracking, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = GroupServerClient(global_reactor, f"http://127.0.0.1:{port.getHost().port}", TOKEN)
        message = write_message(self, b"\0" * (32 * 2**20))
        await self.assertFails(client.add_post("dev", message), status.GROUPSERVER_UNREACHABLE)
        await client.close()
        await tracking.when_all_closed()
        self.assertEqual(open_fds_to(message.path), 0)

    async def test_lookup_timeout(self) -> None:
        """
        A lookup unanswered within the response timeout fails with 4.4.7,
        outcome known.
        """
        client = self.serve(response_timeout=0.2)
        self.standin.faults.delay = 10.0
        await self.assertFails(
            client.lookup_group("dev@groups.example.com"), status.GROUPSERVER_TIMEOUT
        )

    async def test_add_timeout_outcome_unknown(self) -> None:
        """
        An add sent whole but unanswered within the response timeout fails
        with 4.4.7 and C{outcome_unknown}: GroupServer may still add it.
        """
        client = self.serve(response_timeout=0.2)
        self.standin.faults.delay = 10.0
        await self.assertFails(
            client.add_post("dev", write_message(self, b"x")), status.GROUPSERVER_TIMEOUT, True
        )

    async def test_concurrency_bound(self) -> None:
        """
        With concurrency 2, five adds to a slow GroupServer run two at a
        time: the rest queue (never refused) and all five are stored.
        """
        gauge: list[_ConcurrencyGauge] = []

        def wrap(resource: Resource) -> Resource:
            gauge.append(_ConcurrencyGauge(resource))
            return gauge[0]

        client = self.serve(wrap, concurrency=2)
        self.standin.faults.delay = 0.5
        posts = [ensureDeferred(_post(client, self, i)) for i in range(5)]
        for started, batch, queued in ((2, 2, 3), (4, 2, 1), (5, 1, 0)):
            await self.standin_clock.when_scheduled(batch, 0.5)
            self.assertEqual((client.in_flight_posts, client.queued_posts), (batch, queued))
            self.assertEqual(self.standin.requests["add"], started)
            self.standin_clock.advance(0.5)
        for p in posts:
            await p
        self.assertEqual(gauge[0].most, 2)
        self.assertEqual(sorted(self.standin.posts("dev")), [b"m%d" % i for i in range(5)])

    async def test_posts_reuse_connections(self) -> None:
        """
        Each post is one request to the add-email page, and posts share the
        pool's connections: twelve posts, two at a time, open at most as
        many connections as the pool keeps (concurrency + 2), not one each.
        """
        client = self.serve(concurrency=2)
        for batch in range(6):
            await gatherResults(
                [ensureDeferred(_post(client, self, 2 * batch + i)) for i in range(2)]
            )
        self.assertEqual(dict(self.standin.requests), {"add": 12})
        self.assertLessEqual(self.tracking.accepted, 4)
        self.assertEqual(len(self.standin.posts("dev")), 12)

    async def test_tls_verified(self) -> None:
        """
        Over https the server's certificate is verified: an unknown
        self-signed certificate is 4.4.4 unreachable; trusting it works.
        """
        issued = self_signed("127.0.0.1", ips=["127.0.0.1"], ca=True)
        cert, key = issued.cert_pem, issued.key_pem
        client = self.serve(tls=(cert, key))
        error = await self.assertFails(
            client.lookup_group("dev@groups.example.com"), status.GROUPSERVER_UNREACHABLE
        )
        self.assertIn("TLS", str(error))
        self.assertEqual(self.standin.requests["exists"], 0)
        trusted = self.serve(tls=(cert, key), tls_trust_root=ssl.Certificate.loadPEM(cert))
        self.assertEqual((await trusted.lookup_group("dev@groups.example.com")).group_id, "dev")

    async def test_tls_unverified_opt_out(self) -> None:
        """
        With verify_tls off any certificate is accepted, and a warning says so.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        issued = self_signed("127.0.0.1", ips=["127.0.0.1"], ca=True)
        cert, key = issued.cert_pem, issued.key_pem
        client = self.serve(tls=(cert, key), verify_tls=False)
        self.assertEqual((await client.lookup_group("dev@groups.example.com")).group_id, "dev")
        self.assertTrue(any("NOT verified" in str(e.get("log_format")) for e in events))


async def _post(client: GroupServerClient, testcase: SynchronousTestCase, i: int) -> None:
    await client.add_post("dev", write_message(testcase, b"m%d" % i))


async def _tear_down(
    standin: StandIn, clock: Clock, client: GroupServerClient, tracking: TrackingFactory
) -> None:
    """Let delayed stand-in requests finish, then close every connection."""
    standin.faults.reset()
    clock.advance(3600)
    await standin.when_idle()
    await client.close()
    await tracking.when_all_closed()
