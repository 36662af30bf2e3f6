# -*- test-case-name: tests.test_standin -*-
"""
A stand-in for GroupServer: the four pages a mail server calls, served by
C{twisted.web}, answering as GroupServer's pages answer and storing what
they receive on disk.

GroupServer itself (Zope 2, Python 2) cannot run here, so gsmail's tests, its
demo (C{url = embedded}) and its benchmarks talk to this. What it answers was
read from GroupServer's sources (C{shared/groupserver-protocol.md}, "What a
page answers"); the modules cited are C{groupserver/*} repositories, with
C{zopefoundation/zope.formlib} 4.0 (C{src/zope/formlib/form.py}, C{widget.py},
C{textwidgets.py}) and Zope 2.13's C{ZPublisher/HTTPResponse.py}:

  - Each page is a C{zope.formlib} form (C{gs.content.form.base}
    C{form.py}). Its action runs only when the action's button field
    (C{form.actions.NAME}) is in the request's form (query string,
    C{multipart/form-data} or URL-encoded body, as Zope merges them);
    otherwise the page is its form again, with no status message (not run:
    L{gsmail.answers.PageResult.NOT_RUN}), showing the submitted values.
  - Validation is formlib's (C{zope.formlib} C{form.getWidgetsData}): only
    the fields that are present are checked. An empty field is "Required
    input is missing."; a non-ASCII value in an C{ASCIILine} "Invalid
    textual data"; a newline in one "Constraint not satisfied"; a token that
    is not the site's C{gs.auth.token}'s C{AuthenticationTokenMismatch}
    (C{authtoken.py}), whose message quotes the submitted token. A failure
    renders the form with the status C{<p>There is an error:</p>} (or
    C{There are errors:}) in an C{alert-block alert-error} status message
    listing the failed widgets, status 200, and nothing is done.
  - A field that is absent is not checked at all: the action then fails
    with C{KeyError} (Zope answers its error page with status 503 for a
    C{KeyError}: C{HTTPResponse.exception} sets the status by the exception
    class, C{status_codes["keyerror"] = 503}), or, for the token, runs: a
    request without C{form.token} is not refused.
  - Success: the add-email, relay and bounce pages render their form again
    (reset, empty) under the status C{Done}; the bounce page's status is
    C{No user found for ADDRESS} when no member has the address
    (C{gs.group.member.bounce} C{handlebounce.py}); the group-exists page's
    body is the JSON object C{groupexists.py} returns (C{text/plain}: Zope
    names no other type for it).
  - The add-email page decodes the message as Python 2's non-strict
    C{base64.b64decode} and, when that fails, adds the field's text as it
    is (C{addemail.py}). An unknown group id fails C{Adder.list}'s
    assertion: error page, 500. A message whose post id (L{gsmail.standin_postid})
    is already archived in the group is not stored again and still answered
    C{Done} (C{Products.XWFMailingListManager} C{processMail}). Two adds of
    one post id that overlap (see L{Faults.delay}): the one that commits
    second fails on the database's unique post id (C{gs.group.list.store}
    C{queries.py} C{DuplicateMessageError}): error page, 500; its retry is
    then "already archived".
  - The bounce page with a group address that is no group's fails
    (C{handlebounce.py} C{site_from_email}): error page, 500.

Not modelled: the relay page's checks of the message's C{To} (it is
stored as sent), moderation, email commands and posting rights (every
message is archived), and GroupServer's concurrent-topic collision.

Layout under the stand-in's directory::

    groups/GROUPID/{tmp,new,cur}/   one Maildir per group (add-email page)
    relays/{tmp,new,cur}/           relayed messages (relay page)
    bounces.jsonl                   one JSON object per recorded bounce
    tmp/                            staging for a message whose group is not
                                    known yet when its form part arrives

Bodies stream: twisted.web spools a request body over 100 KB to a temporary
file, and the stand-in parses that file with the C{multipart} package's push
parser, decoding base64 incrementally into the Maildir, in a thread when a
reactor for threads is given. A 200 MiB post never sits in memory (a form
page showing it again streams it back from the file). Stand-in limits: a
field other than the message over L{FIELD_LIMIT} bytes, or the message
field given twice, is answered 400; a URL-encoded body is read whole.

L{Faults} makes the pages slow, fail, answer another page, or drop the
connection at a chosen moment.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hmac
import io
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any, Final, cast
from urllib.parse import parse_qsl, urlsplit

import attrs
import multipart
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IPullProducer,
    IReactorThreads,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource, Resource
from zope.interface import implementer

from gsmail import standin_pages as pages
from gsmail.standin_postid import PostIdentity, compute_post_id

__all__ = ["Faults", "PostRecord", "StandIn", "make_demo_standin", "PAGE_PATHS"]

log = Logger()

#: The last path segment of each page, by the page's short name.
PAGE_PATHS: Final[Mapping[str, str]] = {
    "exists": "gs-group-messages-add-group-exists.html",
    "add": "gs-group-messages-add-email.html",
    "relay": "gs-profile-email-relay.html",
    "bounce": "gs-group-member-bounce.html",
}
_PAGE_BY_SEGMENT: Final = {path.encode("ascii"): name for name, path in PAGE_PATHS.items()}

_MESSAGE_FIELD: Final = "form.emailMessage"
_MESSAGE_PAGES: Final = frozenset({"add", "relay"})

#: The longest value, in bytes, kept for a field other than the message.
FIELD_LIMIT: Final = 64 * 1024
#: The longest URL-encoded body read, in bytes.
URLENCODED_LIMIT: Final = 64 * 1024 * 1024
#: Bytes read from the spooled request body at a time.
_READ_SIZE: Final = 64 * 1024
#: A shown-again message up to this size is written at once; a larger one
#: through a producer.
_ECHO_AT_ONCE: Final = 4 * 1024 * 1024
_ECHO_CHUNK: Final = 57 * 1024  # whole base64 lines
_MAX_PARTS: Final = 64
_SAFE_GROUP_ID: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_DROPS: Final = (None, "before_body", "before_store", "after_store")
_INSTEAD: Final = (None, "login", "maintenance", "error")
_AFTER_STORE_STATUSES: Final = (None, 502, 504)

_TOKEN_MISMATCH: Final = 'The authentication token "{}" does not match the one in the database.'
_REQUIRED: Final = "Required input is missing."
_NOT_ASCII: Final = "Invalid textual data"
_CONSTRAINT: Final = "Constraint not satisfied"
# The issue a 500 fault's error page names: a database that went away.
_FAULT_ISSUE: Final = (
    "OperationalError: (psycopg2.OperationalError) could not connect to server: Connection refused"
)
_POWERED_BY: Final = b"Zope (www.zope.org), Python (www.python.org)"


def _check_drop(instance: object, attribute: object, value: str | None) -> None:
    if value not in _DROPS:
        raise ValueError(f"drop must be one of {_DROPS!r}, not {value!r}")


def _check_instead(instance: object, attribute: object, value: str | None) -> None:
    if value not in _INSTEAD:
        raise ValueError(f"instead must be one of {_INSTEAD!r}, not {value!r}")


def _check_after_store(instance: object, attribute: object, value: int | None) -> None:
    if value not in _AFTER_STORE_STATUSES:
        raise ValueError(f"status_after_store must be 502, 504 or None, not {value!r}")


def _check_pages(instance: object, attribute: object, value: frozenset[str] | None) -> None:
    if value is not None and not value <= PAGE_PATHS.keys():
        raise ValueError(f"pages must be a subset of {sorted(PAGE_PATHS)!r}, not {value!r}")


@attrs.define
class Faults:
    """
    Misbehaviour the stand-in shows, for tests. Mutable: set the attributes,
    then L{reset} them. Applied to the requests of the pages in C{pages};
    a request is claimed (and counted against C{remaining}) when its body has
    arrived, or, for C{drop="before_body"}, when its headers have.

    @ivar delay: seconds to wait, on the stand-in's clock, before answering.
        For an add that runs, the wait is inside GroupServer's transaction:
        after the "already archived" check, before the post is stored, so two
        adds of one message that overlap collide as in GroupServer (the later
        one fails, 500). A post is still stored when the client has gone
        meanwhile, as Zope finishes a request whose client disconnected.
    @ivar status: answer this HTTP status instead of running the page (nothing
        stored): 500 with GroupServer's error page (a Zope error), 502, 503
        or 504 with a proxy's error page (another code: the proxy's page
        too).
    @ivar status_after_store: C{502} or C{504}: run the page (store the post),
        then answer this status with a proxy's error page: the proxy gave up
        while Zope went on.
    @ivar instead: answer another page, without running the action:
        C{"login"} (GroupServer's sign-in page, 200), C{"maintenance"} (a
        front end's maintenance page, 200), C{"error"} (GroupServer's error
        page, 500, as C{status=500}).
    @ivar html_instead_of_json: the group-exists page answers its form
        refusing the token, as for a wrong token (other pages are
        unaffected).
    @ivar drop: C{"before_body"}: reset the connection (TCP RST) as soon as
        the request's headers arrived, before its body is read;
        C{"before_store"}: abort the connection without a reply and store
        nothing; C{"after_store"}: run the page (store), then abort the
        connection without a reply (the client cannot know that the post was
        made).
    @ivar pages: the pages (C{"exists"}, C{"add"}, C{"relay"}, C{"bounce"})
        the faults apply to; C{None} for all.
    @ivar remaining: how many more requests the faults apply to before they
        clear themselves; C{None} for every request until L{reset}.
    """

    delay: float = 0.0
    status: int | None = None
    status_after_store: int | None = attrs.field(default=None, validator=_check_after_store)
    instead: str | None = attrs.field(default=None, validator=_check_instead)
    html_instead_of_json: bool = False
    drop: str | None = attrs.field(default=None, validator=_check_drop)
    pages: frozenset[str] | None = attrs.field(default=None, validator=_check_pages)
    remaining: int | None = None

    def reset(self) -> None:
        """Clear every fault: the stand-in behaves normally again."""
        default = Faults()
        for field in attrs.fields(Faults):
            setattr(self, field.name, getattr(default, field.name))

    def _effective_for(self, page: str) -> bool:
        if self.pages is not None and page not in self.pages:
            return False
        return (
            self.delay > 0
            or self.status is not None
            or self.status_after_store is not None
            or self.instead is not None
            or self.drop is not None
            or (self.html_instead_of_json and page == "exists")
        )

    def _claim(self, page: str, *, before_body: bool = False) -> Faults | None:
        """
        The faults that apply to one request of C{page}, counting it against
        C{remaining}; C{None} when none apply. With C{before_body}, only a
        C{drop="before_body"} fault is claimed (the request's headers just
        arrived).
        """
        if self.remaining is not None and self.remaining <= 0:
            self.reset()
        if not self._effective_for(page):
            return None
        if before_body and self.drop != "before_body":
            return None
        claimed = attrs.evolve(self)
        if self.remaining is not None:
            self.remaining -= 1
            if self.remaining == 0:
                self.reset()
        return claimed


@attrs.frozen
class PostRecord:
    """
    A post the add-email page stored (archived).

    @ivar group_id: the group it was added to.
    @ivar time_source: the C{form.timeSource} the client sent, C{"server"}
        when it sent none. GroupServer's add-email page has no such field
        and ignores it; it is kept for gsmail's tests.
    @ivar path: the message's file in the group's Maildir C{new/}.
    @ivar size: the raw message's length in bytes (after base64 decoding).
    @ivar post_id: GroupServer's post id for it (L{gsmail.standin_postid}).
    @ivar topic_id: GroupServer's topic id for it.
    """

    group_id: str
    time_source: str
    path: str
    size: int
    post_id: str = ""
    topic_id: str = ""


class _MalformedBody(Exception):
    """The body claims to be a form but cannot be parsed (or is over a limit)."""


@attrs.define
class _Form:
    """
    A form submission: the request's fields, query string and body merged.

    @ivar fields: every field but the message, decoded as UTF-8.
    @ivar message_path: the file the message was decoded into, or C{None}
        when the request had no message field.
    @ivar message_size: the length in bytes of that file.
    @ivar message_raw_size: the length of the field as sent (0: empty).
    @ivar raw_text: the field was not base64 and the file holds its text,
        as GroupServer then adds it.
    @ivar identity: the message's post id, computed with the parsing for a
        message to a known group (add-email page), else C{None}.
    """

    fields: dict[str, str] = attrs.Factory(dict)
    message_path: str | None = None
    message_size: int = 0
    message_raw_size: int = 0
    raw_text: bool = False
    identity: PostIdentity | None = None

    def discard(self) -> None:
        """Remove the decoded message, if any: it is not to be stored."""
        if self.message_path is not None:
            try:
                os.unlink(self.message_path)
            except FileNotFoundError:
                pass
            self.message_path = None


_B64_DELETE: Final = bytes(
    c for c in range(256) if not (chr(c).isascii() and (chr(c).isalnum() or chr(c) in "+/="))
)


class _Base64Writer:
    """
    Decode base64 text arriving in arbitrary pieces into C{out} as Python
    2's C{binascii.a2b_base64} (behind GroupServer's C{base64.b64decode})
    does: characters outside the alphabet are skipped; a complete pad
    sequence ends the data (what follows is ignored); a stray C{=} is
    skipped; data that ends inside a group of four is an error ("Incorrect
    padding"), after which GroupServer uses the text as it is.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._carry = b""
        self._pending_pad = False
        self._done = False
        self.size = 0
        self.raw_size = 0
        self.error: str | None = None

    def write(self, chunk: bytes) -> None:
        self.raw_size += len(chunk)
        if self._done:
            return
        data = chunk.translate(None, _B64_DELETE)
        at = 0
        while at < len(data):
            if self._pending_pad:
                # The character after an "=" that followed two of a group.
                self._pending_pad = False
                if data[at : at + 1] == b"=":
                    self._done = True
                    return
            pad = data.find(b"=", at)
            if pad < 0:
                self._feed(data[at:])
                return
            self._feed(data[at:pad])
            filled = len(self._carry)
            if filled == 3:
                self._done = True
                return
            if filled == 2:
                if pad + 1 < len(data):
                    if data[pad + 1 : pad + 2] == b"=":
                        self._done = True
                        return
                else:
                    self._pending_pad = True
            at = pad + 1

    def _feed(self, text: bytes) -> None:
        data = self._carry + text
        usable = len(data) - len(data) % 4
        self._carry = data[usable:]
        if usable:
            decoded = binascii.a2b_base64(data[:usable])
            self._out.write(decoded)
            self.size += len(decoded)

    def finish(self) -> None:
        if self._done and self._carry:
            decoded = binascii.a2b_base64(self._carry + b"=" * (4 - len(self._carry)))
            self._out.write(decoded)
            self.size += len(decoded)
            self._carry = b""
        elif self._carry:
            self.error = "Incorrect padding"


class _Staging:
    """Where a message field is decoded to: a file named for this request."""

    def __init__(self, directory: Callable[[Mapping[str, str]], str], name: str) -> None:
        self._directory = directory
        self._name = name

    def open(self, fields: Mapping[str, str]) -> tuple[str, IO[bytes]]:
        path = os.path.join(self._directory(fields), self._name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return path, os.fdopen(fd, "wb")


def _parse_multipart(
    body: IO[bytes],
    boundary: str,
    decode_message: bool,
    staging: _Staging,
    form: _Form,
) -> None:
    """
    Parse a C{multipart/form-data} body into C{form}, streaming: runs in a
    thread when the stand-in has one. The message field (when
    C{decode_message}) is decoded into a staging file; other fields are kept
    up to L{FIELD_LIMIT} bytes; parts without a name are skipped.

    @raise _MalformedBody: the body is not valid multipart, or over a limit
        (answered 400).
    """
    out: IO[bytes] | None = None
    writer: _Base64Writer | None = None
    value: bytearray | None = None
    part_name = ""
    seen_message = False
    try:
        parser = multipart.PushMultipartParser(boundary, max_segment_count=_MAX_PARTS)
        with parser:
            for event in parser.parse_blocking(body.read, _READ_SIZE):
                if isinstance(event, multipart.MultipartSegment):
                    part_name = event.name or ""
                    if part_name == _MESSAGE_FIELD and decode_message:
                        if seen_message:
                            raise _MalformedBody("form.emailMessage given twice")
                        seen_message = True
                        form.message_path, out = staging.open(form.fields)
                        writer = _Base64Writer(out)
                    elif part_name and part_name not in form.fields:
                        value = bytearray()
                elif event is None:
                    if writer is not None and out is not None:
                        writer.finish()
                        out.close()
                        form.message_size = writer.size
                        form.message_raw_size = writer.raw_size
                        form.raw_text = writer.error is not None
                    elif value is not None:
                        form.fields[part_name] = value.decode("utf-8", "replace")
                    out, writer, value = None, None, None
                elif writer is not None:
                    writer.write(event)
                elif value is not None:
                    if len(value) + len(event) > FIELD_LIMIT:
                        raise _MalformedBody(f"{part_name} is over {FIELD_LIMIT} bytes")
                    value += event
        if form.raw_text and form.message_path is not None:
            # Not base64: a second pass copies the field's text (rare).
            body.seek(0)
            form.message_size = _copy_raw_field(body, boundary, form.message_path)
    except multipart.MultipartError as e:
        raise _MalformedBody(str(e)) from e
    finally:
        if out is not None:
            out.close()


def _copy_raw_field(body: IO[bytes], boundary: str, path: str) -> int:
    """
    Write the message field's text (CRLF made LF, as C{zope.formlib}'s
    textarea widget does) to C{path}: GroupServer adds the text when it is
    not base64.

    @return: the bytes written.
    """
    size = 0
    carry = b""
    inside = False
    parser = multipart.PushMultipartParser(boundary, max_segment_count=_MAX_PARTS)
    with parser, open(path, "wb") as out:
        for event in parser.parse_blocking(body.read, _READ_SIZE):
            if isinstance(event, multipart.MultipartSegment):
                inside = event.name == _MESSAGE_FIELD
            elif event is None:
                if inside:
                    out.write(carry)
                    size += len(carry)
                    carry = b""
                inside = False
            elif inside:
                data = (carry + event).replace(b"\r\n", b"\n")
                carry = b"\r" if data.endswith(b"\r") else b""
                data = data[: len(data) - len(carry)]
                out.write(data)
                size += len(data)
    return size


def _private_copy(content: IO[bytes]) -> IO[bytes]:
    """
    A handle on the request body that stays readable when twisted.web closes
    C{request.content} because the client went away mid-parse.
    """
    if isinstance(content, io.BytesIO):
        return io.BytesIO(content.getvalue())  # under 100 KB: twisted.web's own limit
    copy = os.fdopen(os.dup(content.fileno()), "rb")
    copy.seek(0)
    return copy


def _parse_form(
    body: IO[bytes] | None,
    content_type: str,
    query: list[tuple[str, str]],
    decode_message: bool,
    staging: _Staging,
) -> _Form:
    """
    The request's form as Zope builds it: the body's fields (multipart or
    URL-encoded), then the query string's where the body has none. Runs in
    a thread when the stand-in has one.

    @raise _MalformedBody: see L{_parse_multipart}.
    """
    form = _Form()
    try:
        ctype, options = multipart.parse_options_header(content_type)
        if body is not None and ctype == "multipart/form-data" and options.get("boundary"):
            _parse_multipart(body, options["boundary"], decode_message, staging, form)
        elif body is not None and ctype == "application/x-www-form-urlencoded":
            data = body.read(URLENCODED_LIMIT + 1)
            if len(data) > URLENCODED_LIMIT:
                raise _MalformedBody("URL-encoded body too long")
            _add_pairs(
                form,
                parse_qsl(
                    data.decode("latin-1"),
                    keep_blank_values=True,
                    encoding="utf-8",
                    errors="replace",
                ),
                decode_message,
                staging,
            )
        _add_pairs(form, query, decode_message, staging)
    except BaseException:
        form.discard()
        raise
    return form


def _add_pairs(
    form: _Form, pairs: Iterable[tuple[str, str]], decode_message: bool, staging: _Staging
) -> None:
    """Fields the form does not have yet, from (name, value) pairs."""
    for name, value in pairs:
        if name == _MESSAGE_FIELD and decode_message:
            if form.message_path is not None:
                continue
            raw = value.encode("utf-8")
            form.message_path, out = staging.open(form.fields)
            with out:
                writer = _Base64Writer(out)
                writer.write(raw)
                writer.finish()
                if writer.error is not None:
                    out.seek(0)
                    out.truncate()
                    out.write(raw.replace(b"\r\n", b"\n"))
                    form.raw_text = True
                form.message_size = out.tell()
            form.message_raw_size = len(raw)
        elif name not in form.fields:
            form.fields[name] = value


@attrs.frozen
class _Answer:
    """
    A whole answer.

    @ivar page: the body: bytes, with L{pages.Echo}s to stream.
    """

    code: int
    content_type: bytes
    page: pages.Page
    zope: bool = True

    @classmethod
    def html(cls, page: pages.Page | bytes, code: int = 200, *, zope: bool = True) -> _Answer:
        body: pages.Page = [page] if isinstance(page, bytes) else page
        return cls(code, b"text/html; charset=utf-8", body, zope)


_BAD_REQUEST: Final = _Answer(400, b"text/plain; charset=utf-8", [b"Bad Request"], zope=False)
_NOT_FOUND: Final = _Answer(404, b"text/plain; charset=utf-8", [b"Not Found"], zope=False)


def _zope_status(exception: str) -> int:
    """
    The status Zope 2 gives an error page (C{HTTPResponse.setStatus} with
    the exception's class): 503 for C{KeyError} and C{NameError}, else 500.
    """
    return 503 if exception in ("KeyError", "NameError") else 500


@attrs.frozen
class _Action:
    """A submission that validated: the page's action runs with C{fields}."""

    fields: Mapping[str, str]


def _make_maildir(path: str) -> None:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)


class _Pages(Resource):
    """
    The root resource: serves the four pages by the last path segment, at any
    depth, so the stand-in can be mounted under a prefix as a GroupServer site
    can (C{/base/gs-group-messages-add-email.html}).
    """

    isLeaf = True

    def __init__(self, standin: StandIn) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._standin = standin

    def render(self, request: server.Request) -> bytes | int:
        return self._standin._render(request)


class _Request(server.Request):
    """
    A request that can be reset as soon as its headers arrive
    (L{Faults.drop} C{"before_body"}), and whose body twisted.web does not
    parse into C{args} (it would hold a whole upload in memory).
    """

    standin: StandIn | None = None

    def __init__(self, channel: http.HTTPChannel, *args: Any, **kwargs: Any) -> None:
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kwargs)

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        standin = self.standin
        channel = self.channel
        if standin is None or channel is None:
            return
        # The request line is parsed; the Request learns its path only once
        # the body is in, so the channel's copy is read.
        path = getattr(channel, "_path", b"") or b""
        if standin._reset_now(path):
            _reset(channel)


def _reset(channel: http.HTTPChannel) -> None:
    """Abort the connection (RST) and ignore whatever else arrives on it."""

    def ignore(*args: object) -> None:
        return None

    # The channel goes on parsing the data it was given; these are looked up
    # on the instance, so the rest of the request is dropped.
    for name in ("allContentReceived", "rawDataReceived", "lineReceived", "dataReceived"):
        setattr(channel, name, ignore)
    transport = channel.transport
    if transport is not None:
        cast(ITCPTransport, transport).abortConnection()


@implementer(IPullProducer)
class _PageProducer:
    """Writes a page whose L{pages.Echo}s are large, as the transport asks."""

    def __init__(self, request: server.Request, page: pages.Page) -> None:
        self._request = request
        self._parts = list(page)
        self._file: IO[bytes] | None = None
        self.done: Deferred[None] = Deferred()

    def start(self) -> None:
        self._request.registerProducer(self, False)  # type: ignore[no-untyped-call]

    def resumeProducing(self) -> None:
        while self._parts or self._file is not None:
            if self._file is not None:
                chunk = self._file.read(_ECHO_CHUNK)
                if chunk:
                    self._request.write(  # type: ignore[no-untyped-call]
                        base64.encodebytes(chunk).replace(b"\n", b"\r\n")
                    )
                    return
                self._file.close()
                self._file = None
                continue
            part = self._parts.pop(0)
            if isinstance(part, bytes):
                self._request.write(part)  # type: ignore[no-untyped-call]
                return
            self._file = open(part.path, "rb")  # noqa: SIM115 - closed when read or stopped
        self._request.unregisterProducer()  # type: ignore[no-untyped-call]
        self._request.finish()  # type: ignore[no-untyped-call]
        self.done.callback(None)

    def stopProducing(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._parts = []
        if not self.done.called:
            self.done.callback(None)


def _echo_bytes(echo: pages.Echo) -> bytes:
    with open(echo.path, "rb") as f:
        return base64.encodebytes(f.read()).replace(b"\n", b"\r\n")


class StandIn:
    """
    GroupServer's four mail pages, for tests, the demo and benchmarks.

    @ivar faults: the L{Faults} applied to the following requests.
    @ivar requests: requests seen per page (C{"exists"}, C{"add"},
        C{"relay"}, C{"bounce"}), counting every method and outcome.
    @ivar archive_once: C{True} (GroupServer's behaviour): a post whose post
        id is already archived in its group is not stored again. C{False}:
        every add that runs is stored, for loads that send identical
        messages (Postfix's C{smtp-source} varies neither subject nor body).
    """

    def __init__(
        self,
        directory: str,
        token: str,
        groups: Mapping[str, str],
        *,
        site_id: str = "example",
        site_url: str = "http://groups.example.com",
        site_name: str = "Example Groups",
        members: Iterable[str] | None = None,
        archive_once: bool = True,
        clock: IReactorTime,
        reactor: IReactorThreads | None = None,
    ) -> None:
        """
        @param directory: where messages and bounces are stored; created if
            missing.
        @param token: the value C{form.token} must have (C{gs_auth_token_create}).
        @param groups: list address -> group id; addresses match without
            regard to case.
        @param site_id: the C{siteId} group-exists reports for a known group
            (and part of every topic id).
        @param site_url: the C{siteURL} group-exists reports for a known group.
        @param site_name: the site's name in its pages.
        @param members: the addresses the bounce page knows (see
            L{add_member}); C{None}: every address is a member's.
        @param archive_once: see L{archive_once}.
        @param clock: schedules L{Faults.delay}, names Maildir files.
        @param reactor: runs body parsing in its thread pool; C{None} parses
            in the reactor thread (for C{StubTreq} tests, where no thread may
            run).
        @raise ValueError: a group id that cannot be a directory name.
        """
        self._directory = os.path.abspath(directory)
        self._token = token
        self._site_id = site_id
        self._site_url = site_url
        self._site = pages.SiteInfo(
            site_name, f"support@{urlsplit(site_url).hostname or 'example.com'}"
        )
        self._clock = clock
        self._threads = reactor
        self._groups: dict[str, str] = {}
        self._group_ids: set[str] = set()
        self._titles: dict[str, str] = {}
        self._members: set[str] | None = None
        self._posts: list[PostRecord] = []
        self._archived: dict[str, set[str]] = collections.defaultdict(set)
        self._add_requests: collections.Counter[str] = collections.Counter()
        self._relays: list[str] = []
        self._bounces: list[tuple[str, str]] = []
        self._names = itertools.count()
        self._busy = 0
        self._idle_waiters: list[Deferred[None]] = []
        self._done_pages: dict[tuple[str, pages.PageURL], _Answer] = {}
        self.faults = Faults()
        self.requests: collections.Counter[str] = collections.Counter()
        self.archive_once = archive_once
        os.makedirs(os.path.join(self._directory, "tmp"), exist_ok=True)
        _make_maildir(os.path.join(self._directory, "relays"))
        for address, group_id in groups.items():
            self.add_group(address, group_id)
        if members is not None:
            for address in members:
                self.add_member(address)
        self._resource = _Pages(self)

    def __repr__(self) -> str:
        # Never the token.
        return f"<StandIn {self._directory!r} {len(self._groups)} groups>"

    # -- configuration and inspection --------------------------------------

    def add_group(self, address: str, group_id: str, title: str | None = None) -> None:
        """
        Make C{address} a group's list address and create its Maildir.

        @param title: the group's list title (stripped from subjects for the
            post id); the group id when not given.
        @raise ValueError: C{group_id} is empty or holds characters other than
            letters, digits, C{_}, C{.} and C{-} (it names a directory).
        """
        if not _SAFE_GROUP_ID.match(group_id):
            raise ValueError(f"unusable group id {group_id!r}")
        self._groups[address.strip().lower()] = group_id
        self._group_ids.add(group_id)
        self._titles[group_id] = title if title is not None else group_id
        _make_maildir(self._maildir(group_id))

    def add_member(self, address: str) -> None:
        """
        Make C{address} a member's address, for the bounce page. Until the
        first call every address is taken to be a member's; after it, a
        bounce for any other address is answered C{No user found for ...}
        and not recorded.
        """
        if self._members is None:
            self._members = set()
        self._members.add(address.strip().lower())

    def resource(self) -> IResource:
        """The root resource serving the four pages (for C{StubTreq} or a Site)."""
        return self._resource

    def request_factory(self) -> Callable[..., server.Request]:
        """
        The request factory for a L{server.Site} serving the stand-in's
        pages: bodies are not parsed into C{request.args}, and
        C{Faults.drop="before_body"} can reset a request before its body.
        """
        standin = self

        class Request(_Request):
            pass

        Request.standin = standin
        return Request

    def site(self) -> server.Site:
        """A L{server.Site} for the pages, with L{request_factory}'s requests."""
        return server.Site(  # type: ignore[no-untyped-call]
            self._resource, requestFactory=self.request_factory(), reactor=self._clock
        )

    def posts(self, group_id: str) -> list[bytes]:
        """The raw messages archived for C{group_id}, in arrival order."""
        return [_read(p.path) for p in self._posts if p.group_id == group_id]

    def post_records(self) -> list[PostRecord]:
        """Every post archived, for all groups, in arrival order."""
        return list(self._posts)

    def post_ids(self, group_id: str) -> list[str]:
        """The post ids archived for C{group_id}, in arrival order."""
        return [p.post_id for p in self._posts if p.group_id == group_id]

    def add_requests(self, group_id: str | None = None) -> int:
        """
        How many add-email requests reached the page's action for
        C{group_id} (for all groups when C{None}): they validated, whether
        the post was then archived, already archived, or failed.
        """
        if group_id is None:
            return sum(self._add_requests.values())
        return self._add_requests[group_id]

    def post_stored(self, record: PostRecord) -> None:
        """
        Called once a post is archived, after its record is added (to
        L{post_records}); does nothing. A hook for subclasses (the
        benchmarks' stand-in).
        """

    def forget_archive(self) -> None:
        """
        Forget which post ids are archived (not the posts): a message added
        again is archived again, as by a fresh GroupServer (benchmarks).
        """
        self._archived.clear()

    def relays(self) -> list[bytes]:
        """The raw messages the relay page stored, in arrival order."""
        return [_read(p) for p in self._relays]

    def bounces(self) -> list[tuple[str, str]]:
        """The bounces recorded, as C{(userEmail, groupEmail)}, in order."""
        return list(self._bounces)

    def when_idle(self) -> Deferred[None]:
        """A Deferred that fires once no request is being processed."""
        if self._busy == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    # -- request processing ------------------------------------------------

    def _maildir(self, group_id: str) -> str:
        return os.path.join(self._directory, "groups", group_id)

    def _unique_name(self) -> str:
        # Maildir-style: time, then what makes it unique within this process and
        # across stand-ins sharing a directory.
        unique = f"M{next(self._names)}P{os.getpid()}R{os.urandom(4).hex()}"
        return f"{int(self._clock.seconds())}.{unique}.standin"

    def _reset_now(self, path: bytes) -> bool:
        """Whether a request for C{path} whose headers just arrived is to be reset."""
        page = _PAGE_BY_SEGMENT.get(urlsplit(path).path.rsplit(b"/", 1)[-1])
        if page is None or self.faults._claim(page, before_body=True) is None:
            return False
        self.requests[page] += 1
        log.info("Stand-in: resetting a request for {page} before its body", page=page)
        return True

    def _render(self, request: server.Request) -> bytes | int:
        page = _PAGE_BY_SEGMENT.get(request.path.rsplit(b"/", 1)[-1])
        if page is None:
            self._respond(request, [], _NOT_FOUND)
            return server.NOT_DONE_YET
        self.requests[page] += 1
        self._busy += 1
        d = Deferred.fromCoroutine(self._serve(request, page))
        d.addBoth(self._finished)
        return server.NOT_DONE_YET

    def _where(self, request: server.Request) -> pages.PageURL:
        host = (request.getHeader(b"host") or b"groups.example.com").decode("latin-1")
        scheme = "https" if request.isSecure() else "http"
        return pages.PageURL.from_parts(scheme, host, request.path.decode("latin-1"))

    async def _serve(self, request: server.Request, page: str) -> None:
        fault = self.faults._claim(page)
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        form: _Form | None = None
        where = self._where(request)
        try:
            if fault is not None and fault.drop == "before_body":
                # Through a resource alone (StubTreq) the body is already in.
                self._abort(request, gone)
                return
            try:
                form = await self._receive(request, page)
            except _MalformedBody as e:
                log.info("Stand-in: malformed form body on {page}: {why}", page=page, why=str(e))
                await self._wait(fault)
                self._respond(request, gone, _BAD_REQUEST)
                return
            instead = self._instead(fault, page, where)
            if instead is not None or (fault is not None and fault.drop == "before_store"):
                await self._wait(fault)
                if instead is None:
                    self._abort(request, gone)
                else:
                    self._respond(request, gone, instead)
                return
            outcome = self._validate(page, form, where)
            if isinstance(outcome, _Answer):
                await self._wait(fault)
                answer = outcome
            else:
                answer = await self._act(page, form, outcome, where, fault)
            if fault is not None and fault.drop == "after_store":
                self._abort(request, gone)
                return
            if fault is not None and fault.status_after_store is not None:
                answer = _Answer.html(
                    pages.proxy_error_page(fault.status_after_store),
                    fault.status_after_store,
                    zope=False,
                )
            await self._respond_streaming(request, gone, answer)
        except Exception:
            log.failure("Stand-in failed to answer on {page}", page=page)
            if not request.finished and not gone:
                self._respond(request, gone, self._error(where, "Exception: the stand-in failed"))
        finally:
            if form is not None:
                form.discard()  # a stored message was moved away: this removes only leftovers

    async def _wait(self, fault: Faults | None) -> None:
        if fault is not None and fault.delay > 0:
            await deferLater(self._clock, fault.delay)

    def _instead(self, fault: Faults | None, page: str, where: pages.PageURL) -> _Answer | None:
        """The answer a fault gives instead of running the page, if any."""
        if fault is None:
            return None
        if fault.status == 500 or fault.instead == "error":
            return self._error(where, _FAULT_ISSUE)
        if fault.status is not None:
            return _Answer.html(pages.proxy_error_page(fault.status), fault.status, zope=False)
        if fault.instead == "login":
            return _Answer.html(pages.login_page(self._site, where))
        if fault.instead == "maintenance":
            return _Answer.html(pages.maintenance_page(self._site), zope=False)
        if fault.html_instead_of_json and page == "exists":
            return self._refused(page, where, {"form.token": _TOKEN_MISMATCH.format("")}, {})
        return None

    def _error(self, where: pages.PageURL, issue: str) -> _Answer:
        """GroupServer's error page for an exception, with Zope's status for it."""
        return _Answer.html(
            pages.error_page(self._site, where, issue), _zope_status(issue.split(":", 1)[0])
        )

    def _refused(
        self,
        page: str,
        where: pages.PageURL,
        errors: Mapping[str, str],
        values: Mapping[str, str | pages.Echo],
    ) -> _Answer:
        status = "<p>There is an error:</p>" if len(errors) == 1 else "<p>There are errors:</p>"
        return _Answer.html(
            pages.form_page(page, self._site, where, status=status, errors=errors, values=values)
        )

    async def _receive(self, request: server.Request, page: str) -> _Form:
        """The request's form (query string and body), parsed in a thread if there is one."""
        query = parse_qsl(
            urlsplit(request.uri).query.decode("latin-1"),
            keep_blank_values=True,
            encoding="utf-8",
            errors="replace",
        )
        body: IO[bytes] | None = None
        content_type = ""
        if request.method == b"POST" and request.content is not None:
            content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
            body = _private_copy(request.content)
        groups = frozenset(self._group_ids)
        directory = self._directory
        maildir = self._maildir

        def staging_dir(fields: Mapping[str, str]) -> str:
            if page == "relay":
                return os.path.join(directory, "relays", "tmp")
            group_id = fields.get("form.groupId")
            if group_id in groups:
                return os.path.join(maildir(group_id), "tmp")
            return os.path.join(directory, "tmp")  # the group is not known yet

        staging = _Staging(staging_dir, self._unique_name())
        titles = dict(self._titles) if page == "add" else {}
        site_id = self._site_id

        def parse() -> _Form:
            form = _parse_form(body, content_type, query, page in _MESSAGE_PAGES, staging)
            # The post id too, while in the thread: the action needs it.
            group_id = form.fields.get("form.groupId")
            if form.message_path is not None and group_id in titles:
                try:
                    form.identity = compute_post_id(
                        form.message_path, group_id, site_id, titles[group_id]
                    )
                except BaseException:
                    form.discard()
                    raise
            return form

        try:
            if self._threads is None:
                return parse()
            pool = self._threads.getThreadPool()
            return await deferToThreadPool(self._threads, pool, parse)
        finally:
            if body is not None:
                body.close()

    def _values(self, form: _Form) -> dict[str, str | pages.Echo]:
        """The submitted values a form page shows again."""
        values: dict[str, str | pages.Echo] = dict(form.fields)
        if form.message_path is not None:
            values[_MESSAGE_FIELD] = pages.Echo(form.message_path, form.message_size)
        return values

    def _validate(self, page: str, form: _Form, where: pages.PageURL) -> _Answer | _Action:
        """
        What zope.formlib makes of the submission: the form again (not run,
        or refused with the failed widgets) or the action to run.
        """
        spec = pages.FORMS[page]
        fields = form.fields
        if spec.action not in fields:
            return _Answer.html(pages.form_page(page, self._site, where, values=self._values(form)))
        errors: dict[str, str] = {}
        for widget in spec.widgets:
            if widget.area:
                if form.message_path is not None and form.message_raw_size == 0:
                    errors[widget.name] = _REQUIRED
                continue
            value = fields.get(widget.name)
            if value is None:
                continue  # formlib checks only the fields it was given
            if value == "":
                errors[widget.name] = _REQUIRED
            elif not value.isascii():
                errors[widget.name] = _NOT_ASCII
            elif widget.token:
                if not hmac.compare_digest(value.encode(), self._token.encode()):
                    errors[widget.name] = _TOKEN_MISMATCH.format(value)
            elif "\n" in value:
                errors[widget.name] = _CONSTRAINT
        if errors:
            return self._refused(page, where, errors, self._values(form))
        return _Action(fields)

    async def _act(
        self, page: str, form: _Form, action: _Action, where: pages.PageURL, fault: Faults | None
    ) -> _Answer:
        """Run the page's action; the fault's delay is spent inside it."""
        fields = action.fields
        if page == "exists":
            await self._wait(fault)
            if "form.email" not in fields:
                return self._error(where, "KeyError: 'email'")
            return self._group_exists(fields["form.email"])
        if page == "add":
            return await self._add(form, fields, where, fault)
        if page == "relay":
            await self._wait(fault)
            if form.message_path is None:
                return self._error(where, "KeyError: 'emailMessage'")
            self._relays.append(self._deliver(form, os.path.join(self._directory, "relays")))
            log.info("Stand-in relayed a message: {size} bytes", size=form.message_size)
            return self._done(page, where)
        await self._wait(fault)
        return self._bounce(fields, where)

    async def _add(
        self,
        form: _Form,
        fields: Mapping[str, str],
        where: pages.PageURL,
        fault: Faults | None,
    ) -> _Answer:
        """
        The add-email action (C{addemail.py}, C{Adder}, C{processMail}): the
        post id is checked, the fault's delay passes, the post is stored
        (committed) unless it was archived, or fails if another add of it
        committed meanwhile.
        """
        if form.message_path is None:
            await self._wait(fault)
            return self._error(where, "KeyError: 'emailMessage'")
        group_id = fields.get("form.groupId")
        if group_id is None:
            await self._wait(fault)
            return self._error(where, "KeyError: 'groupId'")
        self._add_requests[group_id] += 1
        if group_id not in self._group_ids:
            log.info("Stand-in: add-email for unknown group {group_id}", group_id=group_id)
            await self._wait(fault)
            return self._error(where, f'AssertionError: No such list "{group_id}"')
        identity = form.identity
        if identity is None:  # the group was added since the body was parsed
            identity = await self._post_id(form.message_path, group_id)
        archived = self._archived[group_id] if self.archive_once else set()
        if identity.post_id in archived:
            log.info(
                "Stand-in: post {post_id} for {group_id} has already been archived",
                post_id=identity.post_id,
                group_id=group_id,
            )
            await self._wait(fault)
            return self._done("add", where)
        await self._wait(fault)
        if identity.post_id in archived:
            # Another add of this post committed while this one ran: the
            # database's unique post id refuses this insert.
            log.info("Stand-in: post {post_id} added twice at once", post_id=identity.post_id)
            return self._error(
                where,
                f"DuplicateMessageError: Post {identity.post_id} already existed in database.",
            )
        time_source = fields.get("form.timeSource") or "server"
        self._store_post(form, group_id, time_source, identity)
        return self._done("add", where)

    async def _post_id(self, path: str, group_id: str) -> PostIdentity:
        args = (path, group_id, self._site_id, self._titles[group_id])
        if self._threads is None:
            return compute_post_id(*args)
        pool = self._threads.getThreadPool()
        return await deferToThreadPool(self._threads, pool, compute_post_id, *args)

    def _done(self, page: str, where: pages.PageURL) -> _Answer:
        """A page whose action ran: its form again, reset, under C{Done}."""
        # The same for every request to one URL: rendered once (benchmarks).
        answer = self._done_pages.get((page, where))
        if answer is None:
            answer = _Answer.html(pages.form_page(page, self._site, where, status="Done"))
            if len(self._done_pages) < 64:
                self._done_pages[page, where] = answer
        return answer

    def _bounce(self, fields: Mapping[str, str], where: pages.PageURL) -> _Answer:
        """The bounce action (C{handlebounce.py} C{handle_the_jandal})."""
        user_email = fields.get("form.userEmail")
        if user_email is None:
            return self._error(where, "KeyError: 'userEmail'")
        if self._members is not None and user_email.strip().lower() not in self._members:
            # Rendered as structure, unescaped, as GroupServer does.
            return _Answer.html(
                pages.form_page(
                    "bounce", self._site, where, status=f"No user found for {user_email}"
                )
            )
        group_email = fields.get("form.groupEmail")
        if group_email is None:
            return self._error(where, "KeyError: 'groupEmail'")
        if group_email.strip().lower() not in self._groups:
            return self._error(where, "TypeError: getattr(): attribute name must be string")
        self._record_bounce(user_email, group_email)
        return self._done("bounce", where)

    def _group_exists(self, email: str) -> _Answer:
        group_id = self._groups.get(email.strip().lower())
        site_id = self._site_id if group_id is not None else None
        site_url = self._site_url if group_id is not None else None
        body = pages.exists_json(email, site_id, group_id, site_url)
        return _Answer(200, b"text/plain; charset=utf-8", [body])

    def _deliver(self, form: _Form, maildir: str) -> str:
        """Move the decoded message into C{maildir}/new/; return its path."""
        assert form.message_path is not None
        final = os.path.join(maildir, "new", os.path.basename(form.message_path))
        os.rename(form.message_path, final)
        form.message_path = None
        return final

    def _store_post(
        self, form: _Form, group_id: str, time_source: str, identity: PostIdentity
    ) -> None:
        size = form.message_size
        final = self._deliver(form, self._maildir(group_id))
        self._archived[group_id].add(identity.post_id)
        record = PostRecord(group_id, time_source, final, size, identity.post_id, identity.topic_id)
        self._posts.append(record)
        self.post_stored(record)
        log.info(
            "Stand-in stored post {post_id} for {group_id}: {size} bytes",
            post_id=identity.post_id,
            group_id=group_id,
            size=size,
        )

    def _record_bounce(self, user_email: str, group_email: str) -> None:
        line = json.dumps({"userEmail": user_email, "groupEmail": group_email})
        with open(os.path.join(self._directory, "bounces.jsonl"), "a", encoding="utf-8") as f:
            f.write(line + "\n")
        self._bounces.append((user_email, group_email))

    def _headers(self, request: server.Request, answer: _Answer) -> None:
        request.setResponseCode(answer.code)
        # twisted.web.server.Request is not annotated.
        request.setHeader(b"content-type", answer.content_type)  # type: ignore[no-untyped-call]
        request.setHeader(  # type: ignore[no-untyped-call]
            b"content-length", b"%d" % pages.page_length(answer.page)
        )
        if answer.zope:
            request.setHeader(b"x-powered-by", _POWERED_BY)  # type: ignore[no-untyped-call]

    def _respond(self, request: server.Request, gone: list[Failure], answer: _Answer) -> None:
        """Write a small answer at once (its L{pages.Echo}s read whole)."""
        if gone:
            log.info("Stand-in: client left before the {code} answer", code=answer.code)
            return
        self._headers(request, answer)
        for part in answer.page:
            request.write(  # type: ignore[no-untyped-call]
                part if isinstance(part, bytes) else _echo_bytes(part)
            )
        request.finish()  # type: ignore[no-untyped-call]

    async def _respond_streaming(
        self, request: server.Request, gone: list[Failure], answer: _Answer
    ) -> None:
        """Write an answer; a large message shown again streams from its file."""
        echoed = sum(p.size for p in answer.page if isinstance(p, pages.Echo))
        if gone or echoed <= _ECHO_AT_ONCE:
            self._respond(request, gone, answer)
            return
        self._headers(request, answer)
        producer = _PageProducer(request, answer.page)
        producer.start()
        await producer.done

    def _abort(self, request: server.Request, gone: list[Failure]) -> None:
        if not gone and request.transport is not None:
            cast(ITCPTransport, request.transport).abortConnection()

    def _finished(self, result: object) -> None:
        if isinstance(result, Failure):
            log.failure("Stand-in: request processing failed", result)
        self._busy -= 1
        if self._busy == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def make_demo_standin(
    directory: str,
    token: str,
    domains: Iterable[str],
    group_ids: Iterable[str],
    clock: IReactorTime,
    reactor: IReactorThreads | None,
) -> StandIn:
    """
    A stand-in with a group C{GROUPID@DOMAIN} for every domain and group id,
    as the demo (C{url = embedded}) serves.

    @raise ValueError: an unusable group id (see L{StandIn.add_group}).
    """
    standin = StandIn(directory, token, {}, clock=clock, reactor=reactor)
    group_ids = list(group_ids)
    for domain in domains:
        for group_id in group_ids:
            standin.add_group(f"{group_id}@{domain}", group_id)
    return standin
