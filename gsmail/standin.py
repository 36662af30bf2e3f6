# -*- test-case-name: tests.test_standin -*-
"""
A stand-in for GroupServer: the four pages a mail server calls, served by
C{twisted.web}, enforcing the contract of C{shared/groupserver-protocol.md}
and storing what they receive on disk.

GroupServer itself (Zope 2, Python 2) cannot run here, so gsmail's tests, its
demo (C{url = embedded}) and its benchmarks talk to this. It behaves as the
real pages do where a client can tell the difference:

  - only a C{POST} with a C{multipart/form-data} body whose action button
    field is present runs the action; anything else gets the page's HTML form
    with status 200;
  - a wrong or missing C{form.token} re-renders the form with an error, status
    200 (no 401/403), and stores nothing;
  - an unknown C{form.groupId} on the add-email page is a Zope error, 500.

Layout under the stand-in's directory::

    groups/GROUPID/{tmp,new,cur}/   one Maildir per group (add-email page)
    relays/{tmp,new,cur}/           relayed messages (relay page)
    bounces.jsonl                   one JSON object per recorded bounce
    tmp/                            staging for a message whose group is not
                                    known yet when its form part arrives

Bodies stream: twisted.web spools a request body over 100 KB to a temporary
file, and the stand-in parses that file with the C{multipart} package's push
parser, decoding base64 incrementally into the Maildir, in a thread when a
reactor for threads is given. A 200 MiB post never sits in memory.

L{Faults} lets a test make the pages slow, fail, answer HTML instead of JSON,
or drop the connection before or after storing.
"""

from __future__ import annotations

import binascii
import collections
import functools
import hmac
import html
import io
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Final, cast

import attrs
import multipart
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime, ITCPTransport
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import IResource, Resource

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

_TITLES: Final = {
    "exists": "Check that a group exists",
    "add": "Add an email message to a group",
    "relay": "Relay an email message to a member",
    "bounce": "Record a bounce",
}
# (field name, button field, button label): zope.formlib names a button
# form.actions.<name> and runs the action only when that field is present.
_BUTTONS: Final = {
    "exists": ("form.actions.check", "Check"),
    "add": ("form.actions.add", "Add"),
    "relay": ("form.actions.relay", "Relay"),
    "bounce": ("form.actions.handle", "Handle"),
}
_FIELDS: Final = {
    "exists": ("form.email",),
    "add": ("form.emailMessage", "form.groupId", "form.timeSource"),
    "relay": ("form.emailMessage",),
    "bounce": ("form.userEmail", "form.groupEmail"),
}
_REQUIRED: Final = {
    "exists": ("form.email",),
    "add": ("form.emailMessage", "form.groupId"),
    "relay": ("form.emailMessage",),
    "bounce": ("form.userEmail", "form.groupEmail"),
}
_MESSAGE_FIELD: Final = "form.emailMessage"
_MESSAGE_PAGES: Final = frozenset({"add", "relay"})
_TIME_SOURCES: Final = frozenset({"server", "message"})

#: The longest value, in bytes, kept for a field other than the message.
FIELD_LIMIT: Final = 64 * 1024
#: Bytes read from the spooled request body at a time.
_READ_SIZE: Final = 64 * 1024
_MAX_PARTS: Final = 64
_SAFE_GROUP_ID: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_DROPS: Final = (None, "before_store", "after_store")


def _check_drop(instance: object, attribute: object, value: str | None) -> None:
    if value not in _DROPS:
        raise ValueError(f"drop must be one of {_DROPS!r}, not {value!r}")


def _check_pages(instance: object, attribute: object, value: frozenset[str] | None) -> None:
    if value is not None and not value <= PAGE_PATHS.keys():
        raise ValueError(f"pages must be a subset of {sorted(PAGE_PATHS)!r}, not {value!r}")


@attrs.define
class Faults:
    """
    Misbehaviour the stand-in shows, for tests. Mutable: set the attributes,
    then L{reset} them. A fault is applied after the request body was
    received, to the requests of the pages in C{pages}.

    @ivar delay: seconds to wait, on the stand-in's clock, before acting and
        answering. A post is still stored when the client has gone meanwhile,
        as Zope finishes a request whose client disconnected.
    @ivar status: answer with this HTTP status and the body C{error} instead,
        storing nothing (a Zope error aborts the transaction).
    @ivar html_instead_of_json: the group-exists page answers its HTML form
        with the error a wrong token gives (other pages are unaffected).
    @ivar drop: C{"before_store"}: abort the connection without a reply and
        store nothing; C{"after_store"}: store, then abort the connection
        without a reply (the client cannot know that the post was made).
    @ivar pages: the pages (C{"exists"}, C{"add"}, C{"relay"}, C{"bounce"})
        the faults apply to; C{None} for all.
    @ivar remaining: how many more requests the faults apply to before they
        clear themselves; C{None} for every request until L{reset}.
    """

    delay: float = 0.0
    status: int | None = None
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
            or self.drop is not None
            or (self.html_instead_of_json and page == "exists")
        )

    def _claim(self, page: str) -> Faults | None:
        """
        The faults that apply to one request of C{page}, counting it against
        C{remaining}; C{None} when none apply.
        """
        if self.remaining is not None and self.remaining <= 0:
            self.reset()
        if not self._effective_for(page):
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
    A post the add-email page stored.

    @ivar group_id: the group it was added to.
    @ivar time_source: C{"server"} or C{"message"}, as the client asked.
    @ivar path: the message's file in the group's Maildir C{new/}.
    @ivar size: the raw message's length in bytes (after base64 decoding).
    """

    group_id: str
    time_source: str
    path: str
    size: int


class _MalformedBody(Exception):
    """The body claims to be multipart/form-data but cannot be parsed."""


@attrs.define
class _Form:
    """
    A parsed form submission.

    @ivar fields: every field but the message, decoded as UTF-8.
    @ivar message_path: the file the message was decoded into, or C{None}.
    @ivar message_size: the decoded message's length in bytes.
    @ivar error: why the submission is invalid though it parsed, or C{None}.
    """

    fields: dict[str, str] = attrs.Factory(dict)
    message_path: str | None = None
    message_size: int = 0
    error: str | None = None

    def discard(self) -> None:
        """Remove the decoded message, if any: it is not to be stored."""
        if self.message_path is not None:
            try:
                os.unlink(self.message_path)
            except FileNotFoundError:
                pass
            self.message_path = None


class _Base64Writer:
    """
    Decode base64 text arriving in arbitrary pieces into C{out}. CR and LF
    are ignored; anything else outside the base64 alphabet, padding before the
    end, or a length that is not a multiple of 4 is an error.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._carry = b""
        self._padded = False
        self.size = 0
        self.error: str | None = None

    def write(self, chunk: bytes) -> None:
        if self.error is not None:
            return
        data = self._carry + chunk.translate(None, b"\r\n")
        if not data:
            return
        if self._padded:
            self.error = "Invalid base64 in form.emailMessage: data after padding"
            return
        usable = len(data) - len(data) % 4
        self._carry = data[usable:]
        if not usable:
            return
        try:
            decoded = binascii.a2b_base64(data[:usable], strict_mode=True)
        except binascii.Error as e:
            self.error = f"Invalid base64 in form.emailMessage: {e}"
            return
        self._padded = data[usable - 1 : usable] == b"="
        self._out.write(decoded)
        self.size += len(decoded)

    def finish(self) -> None:
        if self.error is None and self._carry:
            self.error = "Invalid base64 in form.emailMessage: incorrect padding"


def _parse_form(
    body: IO[bytes],
    boundary: str,
    decode_message: bool,
    staging_dir: Callable[[Mapping[str, str]], str],
    name: str,
) -> _Form:
    """
    Parse a C{multipart/form-data} body, streaming: runs in a thread when the
    stand-in has one. The message field (when C{decode_message}) is decoded
    into C{staging_dir(fields seen so far)/name}; other fields are kept up to
    L{FIELD_LIMIT} bytes; parts without a name are skipped.

    @raise _MalformedBody: the body is not valid multipart (answered 400).
    """
    form = _Form()
    out: IO[bytes] | None = None
    writer: _Base64Writer | None = None
    value: bytearray | None = None
    part_name = ""
    try:
        parser = multipart.PushMultipartParser(boundary, max_segment_count=_MAX_PARTS)
        with parser:
            for event in parser.parse_blocking(body.read, _READ_SIZE):
                if isinstance(event, multipart.MultipartSegment):
                    part_name = event.name or ""
                    if part_name == _MESSAGE_FIELD and decode_message:
                        if form.message_path is not None:
                            form.error = form.error or "form.emailMessage given twice"
                            continue
                        form.message_path = os.path.join(staging_dir(form.fields), name)
                        fd = os.open(form.message_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        out = os.fdopen(fd, "wb")
                        writer = _Base64Writer(out)
                    elif part_name and part_name not in form.fields:
                        value = bytearray()
                elif event is None:
                    if writer is not None and out is not None:
                        writer.finish()
                        out.close()
                        form.message_size = writer.size
                        form.error = form.error or writer.error
                    elif value is not None:
                        form.fields[part_name] = value.decode("utf-8", "replace")
                    out, writer, value = None, None, None
                elif writer is not None:
                    writer.write(event)
                elif value is not None:
                    if len(value) + len(event) > FIELD_LIMIT:
                        form.error = form.error or f"{part_name} is too long"
                        value = None
                    else:
                        value += event
    except multipart.MultipartError as e:
        form.discard()
        raise _MalformedBody(str(e)) from e
    except BaseException:
        form.discard()
        raise
    finally:
        if out is not None:
            out.close()
    return form


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


@attrs.frozen
class _Answer:
    code: int
    content_type: bytes
    body: bytes


_ZOPE_ERROR: Final = _Answer(
    500,
    b"text/html; charset=utf-8",
    b"<html><body><h2>Site Error</h2>"
    b"<p>An error was encountered while publishing this resource.</p>"
    b"<p><strong>KeyError</strong></p></body></html>",
)
_BAD_REQUEST: Final = _Answer(400, b"text/plain; charset=utf-8", b"Bad Request")


def _status_div(status: str, error: str | None) -> str:
    """
    The status message as C{gs.content.form.base}'s C{statusmessage.pt}
    renders it: C{alert-error} and the failed widget's label when the form
    did not validate.
    """
    klass = "alert-block alert-error" if error else "alert alert-info"
    errors = (
        '  <dl class="dl-horizontal">\n'
        f'    <dt>Form</dt>\n    <dd class="error">{html.escape(error)}</dd>\n  </dl>\n'
        if error
        else ""
    )
    return (
        f'<div id="gs-content-form-base-message" class="{klass}" role="region">\n'
        '  <button aria-hidden="true" type="button" class="close"'
        ' data-dismiss="alert">&times;</button>\n'
        f'  <div class="gs-content-form-base-message-status">{status}</div>'
        "<!--gs-content-form-base-message-->\n"
        f"{errors}</div><!--gs-content-form-base-message-->\n"
    )


def _done_page(page: str, path: bytes, status: str = "Done") -> _Answer:
    """A page whose action ran: the form again, under the status message."""
    return _form_page(page, path, status=html.escape(status))


def _form_page(
    page: str, path: bytes, error: str | None = None, *, status: str | None = None
) -> _Answer:
    """
    The page's HTML form, as GroupServer renders it: with an error status
    when C{error} is given, the status C{status} (markup) when given, else
    no status message (the action did not run).
    """
    title = _TITLES[page]
    button, label = _BUTTONS[page]
    inputs = []
    for field in _FIELDS[page]:
        if field == _MESSAGE_FIELD:
            inputs.append(f'<textarea name="{field}"></textarea>')
        else:
            inputs.append(f'<input type="text" name="{field}" value="" />')
    if error:
        error_html = _status_div("<p>There is an error:</p>", error)
    elif status is not None:
        error_html = _status_div(status, None)
    else:
        error_html = ""
    text = (
        "<!DOCTYPE html>\n"
        f"<html><head><title>{title}</title></head><body>\n<h1>{title}</h1>\n"
        f"{error_html}"
        f'<form method="post" enctype="multipart/form-data" '
        f'action="{html.escape(path.decode("latin-1"))}">\n'
        + "\n".join(inputs)
        + '\n<input type="password" name="form.token" value="" />\n'
        f'<input type="submit" name="{button}" value="{label}" />\n'
        "</form>\n</body></html>\n"
    )
    return _Answer(200, b"text/html; charset=utf-8", text.encode("utf-8"))


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


class StandIn:
    """
    GroupServer's four mail pages, for tests, the demo and benchmarks.

    @ivar faults: the L{Faults} applied to the following requests.
    @ivar requests: requests seen per page (C{"exists"}, C{"add"},
        C{"relay"}, C{"bounce"}), counting every method and outcome.
    """

    def __init__(
        self,
        directory: str,
        token: str,
        groups: Mapping[str, str],
        *,
        site_id: str = "example",
        site_url: str = "http://groups.example.com",
        clock: IReactorTime,
        reactor: IReactorThreads | None = None,
    ) -> None:
        """
        @param directory: where messages and bounces are stored; created if
            missing.
        @param token: the value C{form.token} must have (C{gs_auth_token_create}).
        @param groups: list address -> group id; addresses match without
            regard to case.
        @param site_id: the C{siteId} group-exists reports for a known group.
        @param site_url: the C{siteURL} group-exists reports.
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
        self._clock = clock
        self._threads = reactor
        self._groups: dict[str, str] = {}
        self._group_ids: set[str] = set()
        self._posts: list[PostRecord] = []
        self._relays: list[str] = []
        self._bounces: list[tuple[str, str]] = []
        self._names = itertools.count()
        self._busy = 0
        self._idle_waiters: list[Deferred[None]] = []
        self.faults = Faults()
        self.requests: collections.Counter[str] = collections.Counter()
        os.makedirs(os.path.join(self._directory, "tmp"), exist_ok=True)
        _make_maildir(os.path.join(self._directory, "relays"))
        for address, group_id in groups.items():
            self.add_group(address, group_id)
        self._resource = _Pages(self)

    def __repr__(self) -> str:
        # Never the token.
        return f"<StandIn {self._directory!r} {len(self._groups)} groups>"

    # -- configuration and inspection --------------------------------------

    def add_group(self, address: str, group_id: str) -> None:
        """
        Make C{address} a group's list address and create its Maildir.

        @raise ValueError: C{group_id} is empty or holds characters other than
            letters, digits, C{_}, C{.} and C{-} (it names a directory).
        """
        if not _SAFE_GROUP_ID.match(group_id):
            raise ValueError(f"unusable group id {group_id!r}")
        self._groups[address.strip().lower()] = group_id
        self._group_ids.add(group_id)
        _make_maildir(self._maildir(group_id))

    def resource(self) -> IResource:
        """The root resource serving the four pages (for C{StubTreq} or a Site)."""
        return self._resource

    def site(self) -> server.Site:
        """
        A L{server.Site} for the pages that does not parse POST bodies into
        C{request.args} (twisted.web would hold a whole upload in memory).
        """
        return server.Site(  # type: ignore[no-untyped-call]
            self._resource,
            requestFactory=functools.partial(server.Request, parsePOSTFormSubmission=False),
            reactor=self._clock,
        )

    def posts(self, group_id: str) -> list[bytes]:
        """The raw messages stored for C{group_id}, in arrival order."""
        return [_read(p.path) for p in self._posts if p.group_id == group_id]

    def post_records(self) -> list[PostRecord]:
        """Every post stored, for all groups, in arrival order."""
        return list(self._posts)

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

    def _render(self, request: server.Request) -> bytes | int:
        page = _PAGE_BY_SEGMENT.get(request.path.rsplit(b"/", 1)[-1])
        if page is None:
            self._respond(request, [], _Answer(404, b"text/plain; charset=utf-8", b"Not Found"))
            return server.NOT_DONE_YET
        self.requests[page] += 1
        self._busy += 1
        d = Deferred.fromCoroutine(self._serve(request, page))
        d.addBoth(self._finished)
        return server.NOT_DONE_YET

    async def _serve(self, request: server.Request, page: str) -> None:
        fault = self.faults._claim(page)
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        form: _Form | None = None
        try:
            try:
                form = await self._receive(request, page)
            except _MalformedBody as e:
                log.info("Stand-in: malformed form body on {page}: {why}", page=page, why=str(e))
                answer: _Answer | None = _BAD_REQUEST
            else:
                answer = None
            if fault is not None:
                if fault.delay > 0:
                    await deferLater(self._clock, fault.delay)
                if fault.status is not None:
                    self._respond(request, gone, _Answer(fault.status, b"text/plain", b"error"))
                    return
                if fault.drop == "before_store":
                    self._abort(request, gone)
                    return
                if fault.html_instead_of_json and page == "exists":
                    self._respond(request, gone, _form_page(page, request.path, "Invalid token"))
                    return
            if answer is None:
                answer = self._act(page, form, request.path)
            if fault is not None and fault.drop == "after_store":
                self._abort(request, gone)
                return
            self._respond(request, gone, answer)
        except Exception:
            log.failure("Stand-in failed to answer on {page}", page=page)
            if not request.finished:
                self._respond(request, gone, _Answer(500, b"text/plain", b"error"))
        finally:
            if form is not None:
                form.discard()  # a stored message was moved away: this removes only leftovers

    async def _receive(self, request: server.Request, page: str) -> _Form | None:
        """
        Parse the body when the request is a multipart POST, else C{None}.
        """
        if request.method != b"POST":
            return None
        ctype, options = multipart.parse_options_header(
            (request.getHeader(b"content-type") or b"").decode("latin-1")
        )
        boundary = options.get("boundary")
        if ctype != "multipart/form-data" or not boundary:
            return None
        assert request.content is not None
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

        args = (body, boundary, page in _MESSAGE_PAGES, staging_dir, self._unique_name())
        try:
            if self._threads is None:
                return _parse_form(*args)
            pool = self._threads.getThreadPool()
            return await deferToThreadPool(self._threads, pool, _parse_form, *args)
        finally:
            body.close()

    def _act(self, page: str, form: _Form | None, path: bytes) -> _Answer:
        """Validate a submission as zope.formlib does, then run the page's action."""
        if form is None or _BUTTONS[page][0] not in form.fields:
            return _form_page(page, path)
        fields = form.fields
        given = fields.get("form.token", "").encode("utf-8")
        if not hmac.compare_digest(given, self._token.encode("utf-8")):
            return _form_page(page, path, "Invalid token")
        if form.error is not None:
            return _form_page(page, path, form.error)
        for name in _REQUIRED[page]:
            present = form.message_size > 0 if name == _MESSAGE_FIELD else bool(fields.get(name))
            if not present:
                return _form_page(page, path, f"{name}: Required input is missing.")
        if page == "exists":
            return self._group_exists(fields["form.email"])
        if page == "add":
            time_source = fields.get("form.timeSource") or "server"
            if time_source not in _TIME_SOURCES:
                return _form_page(page, path, "form.timeSource: Constraint not satisfied")
            group_id = fields["form.groupId"]
            if group_id not in self._group_ids:
                log.info("Stand-in: add-email for unknown group {group_id}", group_id=group_id)
                return _ZOPE_ERROR
            self._store_post(form, group_id, time_source)
            return _done_page(page, path)
        if page == "relay":
            self._relays.append(self._deliver(form, os.path.join(self._directory, "relays")))
            log.info("Stand-in relayed a message: {size} bytes", size=form.message_size)
            return _done_page(page, path)
        self._record_bounce(fields["form.userEmail"], fields["form.groupEmail"])
        return _done_page(page, path)

    def _group_exists(self, email: str) -> _Answer:
        group_id = self._groups.get(email.strip().lower())
        reply = {
            "email": email,
            "siteId": self._site_id if group_id is not None else None,
            "groupId": group_id,
            "siteURL": self._site_url,
        }
        return _Answer(200, b"application/json", json.dumps(reply).encode("utf-8"))

    def _deliver(self, form: _Form, maildir: str) -> str:
        """Move the decoded message into C{maildir}/new/; return its path."""
        assert form.message_path is not None
        final = os.path.join(maildir, "new", os.path.basename(form.message_path))
        os.rename(form.message_path, final)
        form.message_path = None
        return final

    def _store_post(self, form: _Form, group_id: str, time_source: str) -> None:
        final = self._deliver(form, self._maildir(group_id))
        self._posts.append(PostRecord(group_id, time_source, final, form.message_size))
        log.info(
            "Stand-in stored a post for {group_id}: {size} bytes",
            group_id=group_id,
            size=form.message_size,
        )

    def _record_bounce(self, user_email: str, group_email: str) -> None:
        line = json.dumps({"userEmail": user_email, "groupEmail": group_email})
        with open(os.path.join(self._directory, "bounces.jsonl"), "a", encoding="utf-8") as f:
            f.write(line + "\n")
        self._bounces.append((user_email, group_email))

    def _respond(self, request: server.Request, gone: list[Failure], answer: _Answer) -> None:
        if gone:
            log.info("Stand-in: client left before the {code} answer", code=answer.code)
            return
        request.setResponseCode(answer.code)
        # twisted.web.server.Request is not annotated.
        request.setHeader(b"content-type", answer.content_type)  # type: ignore[no-untyped-call]
        request.setHeader(b"content-length", b"%d" % len(answer.body))  # type: ignore[no-untyped-call]
        request.write(answer.body)  # type: ignore[no-untyped-call]
        request.finish()  # type: ignore[no-untyped-call]

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
