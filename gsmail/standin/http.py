# -*- test-case-name: tests.test_standin -*-
"""
The stand-in over HTTP: the root resource (L{_Pages}), the request that a
fault can reset before its body (L{_Request}), and the processing of one
request (L{_PageServer}): read its form, apply the faults, run the page
(L{gsmail.standin.actions}), write the answer, streaming a large message
shown again (L{_PageProducer}).

Not what a page does (L{gsmail.standin.actions}) nor the form parser
(L{gsmail.standin.form}).
"""

from __future__ import annotations

import base64
import collections
import itertools
import os
from collections.abc import Mapping
from typing import IO, Any, Final, cast
from urllib.parse import parse_qsl, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IPullProducer,
    ITCPTransport,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

from gsmail.standin import pages
from gsmail.standin.actions import (
    _Answer,
    _PageActions,
)
from gsmail.standin.faults import PAGE_PATHS, Faults
from gsmail.standin.form import (
    _MESSAGE_PAGES,
    _Form,
    _MalformedBody,
    _parse_form,
    _private_copy,
    _Staging,
)
from gsmail.standin.postid import compute_post_id
from gsmail.twistedcompat import request_path

# The namespace of the module these lines came from, so that the stand-in's
# log lines stay as they were.
log = Logger(namespace="gsmail.standin")

_PAGE_BY_SEGMENT: Final = {path.encode("ascii"): name for name, path in PAGE_PATHS.items()}

#: A shown-again message up to this size is written at once; a larger one
#: through a producer.
_ECHO_AT_ONCE: Final = 4 * 1024 * 1024
_ECHO_CHUNK: Final = 57 * 1024  # whole base64 lines
_POWERED_BY: Final = b"Zope (www.zope.org), Python (www.python.org)"

_BAD_REQUEST: Final = _Answer(400, b"text/plain; charset=utf-8", [b"Bad Request"], zope=False)
_NOT_FOUND: Final = _Answer(404, b"text/plain; charset=utf-8", [b"Not Found"], zope=False)


class _Pages(Resource):
    """
    The root resource: serves the four pages by the last path segment, at any
    depth, so the stand-in can be mounted under a prefix as a GroupServer site
    can (C{/base/gs-group-messages-add-email.html}).
    """

    isLeaf = True

    def __init__(self, standin: _PageServer) -> None:
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

    standin: _PageServer | None = None

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
        path = request_path(channel)
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


class _PageServer(_PageActions):
    """
    The processing of one request for a page: a base class of
    L{gsmail.standin.StandIn}, which sets the attributes below (see there).
    """

    _names: itertools.count[int]
    _busy: int
    _idle_waiters: list[Deferred[None]]
    faults: Faults
    requests: collections.Counter[str]

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
