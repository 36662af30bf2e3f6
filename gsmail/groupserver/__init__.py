# -*- test-case-name: tests.test_groupserver -*-
"""
The HTTP client that speaks to GroupServer: the four pages of
C{shared/groupserver-protocol.md} (group-exists, add-email, relay, bounce),
each an HTTP C{POST} of C{multipart/form-data} made with twisted.web's
C{Agent} (or an injected treq C{HTTPClient}, e.g. C{StubTreq} in tests).

Messages are not read into memory: L{MultipartBody} streams the whole
request body, base64-encoding the spool file on the fly in chunks, with an
exact C{Content-Length} known before the first byte is sent. Every failure is
a L{gsmail.status.GroupServerError} carrying the reply the sending MTA gets,
and says whether GroupServer may have acted on a post the client could not
see the answer to (C{outcome_unknown}), so the caller's ledger never posts a
message twice.

Here: L{GroupServerClient}, the pages' fields, the limits on calls in
flight, the timeouts, the one retry of a lookup or bounce, and reading the
group-exists answer. Its parts: the request body (L{gsmail.groupserver.body}),
the connection pool, TLS and the capped reply reader
(L{gsmail.groupserver.http}), and what each failure or unsuccessful answer
means for the sender (L{gsmail.groupserver.errors}).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit, urlunsplit

from hyperlink import EncodedURL
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    fail,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from gsmail import status
from gsmail.answers import PageResult, read_status
from gsmail.groupserver.body import CHUNK_SIZE, MultipartBody, SpoolReadError
from gsmail.groupserver.errors import (
    _check_post_reply,
    _is_cancellation,
    _is_tls_failure,
    _map_failure,
    _page_error,
    _reasons,
    _StaleConnection,
    _status_error,
)
from gsmail.groupserver.http import (
    MAX_REPLY_SIZE,
    IClientReactor,
    _page_agent,
    _read_body,
    _ReplyTooLarge,
    _without_userinfo,
)
from gsmail.interfaces import GroupInfo, IGroupServer, MessageSource
from gsmail.status import GroupServerError

if TYPE_CHECKING:
    from treq.client import HTTPClient

    from gsmail.twistedcompat import IOpenSSLTrustRoot

__all__ = [
    "CHUNK_SIZE",
    "MAX_REPLY_SIZE",
    "PAGES",
    "GroupServerClient",
    "IClientReactor",
    "MultipartBody",
    "SpoolReadError",
]

#: Page paths, relative to the site URL (shared/groupserver-protocol.md).
PAGES: Final = {
    "exists": "/gs-group-messages-add-group-exists.html",
    "add": "/gs-group-messages-add-email.html",
    "relay": "/gs-profile-email-relay.html",
    "bounce": "/gs-group-member-bounce.html",
}

# Pages whose answers the caller logs, once per delivery: a second event per
# post cost a tenth of its CPU.
_LOGGED_BY_CALLER: Final = frozenset({"add", "relay"})
_TIME_SOURCES: Final = frozenset({"server", "message"})


@implementer(IGroupServer)
class GroupServerClient:
    """
    Calls GroupServer's pages over one persistent HTTP(S) connection pool.

    Adds and relays (the big posts) run at most C{concurrency} at a time; the
    rest wait their turn, never refused. Lookups and bounces run beside them
    (bounded by a separate, more generous limit). Lookups and bounces are
    repeated once on a fresh connection when a kept-alive connection turns
    out to be dead; adds and relays are never repeated.

    Every method fails with L{GroupServerError}:
      - L{status.GROUPSERVER_UNREACHABLE} (4.4.4): connection refused, DNS
        failure, connect timeout, TLS handshake or certificate failure, or
        the connection was lost while the request was still being sent
        (nothing was posted); also a lookup whose answer was lost.
      - L{status.GROUPSERVER_ERROR} (4.5.0): any status but 200 (redirects
        included); the detail names the status.
      - L{status.GROUPSERVER_REFUSED} (4.3.5): the page's status message is
        an error (a wrong token or a field GroupServer would not take):
        nothing was done; a configuration fault of this site.
      - L{status.GROUPSERVER_NOT_RUN} (4.5.0): a 200 page without a status
        message (a login, maintenance or proxy page): nothing was done.
      - L{status.GROUPSERVER_BAD_REPLY} (4.5.0): a lookup answer that is
        neither JSON nor a form page, or a status message that is none of
        GroupServer's (the outcome is then unknown).
      - L{status.GROUPSERVER_TIMEOUT} (4.4.7): no complete answer within
        C{response_timeout}.
      - L{status.OUTCOME_UNKNOWN} (4.4.2): the whole post was sent and the
        connection was lost before the answer came.
      - L{status.LOCAL_ERROR} (4.3.0): the spool file could not be read.
    C{outcome_unknown} is C{True} when an add, relay or bounce may have
    been acted on (whole request written, no answer seen or a 502/504 from a
    proxy). Success is a 200 whose status message says C{Done} (the bounce
    page: also C{No user found for ...}); see L{gsmail.answers}.

    @ivar url: the site URL the page paths are appended to.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IClientReactor,
        url: str,
        token: str,
        *,
        connect_timeout: float = 8.0,
        response_timeout: float = 240.0,
        verify_tls: bool = True,
        concurrency: int = 4,
        http_client: HTTPClient | None = None,
        tls_trust_root: IOpenSSLTrustRoot | None = None,
        cooperator: Cooperator | None = None,
    ) -> None:
        """
        @param reactor: the reactor for connections and timeouts.
        @param url: the site URL, C{http://} or C{https://} with a host and an
            optional port and path prefix, e.g. C{https://groups.example.com}.
        @param token: the site's token (C{[webservice-*] token}); sent only in
            the request bodies, never logged.
        @param connect_timeout: seconds to wait for a TCP connection.
        @param response_timeout: seconds allowed for sending the request body
            and, again, from the body being sent to the whole answer
            (headers and body) having arrived.
        @param verify_tls: C{False} to accept any certificate (logs a warning).
        @param concurrency: the most adds and relays in flight at once, >= 1.
        @param http_client: a treq client to use instead of one over the
            client's own connection pool (tests).
        @param tls_trust_root: the CAs to trust instead of the system's.
        @param cooperator: runs the message body producers; defaults to one
            scheduled on C{reactor}.
        @raise ValueError: the URL is not http(s) with a host, or a number is
            out of range.
        """
        self._agent: Agent | None = None
        self.set_url(url)
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if connect_timeout <= 0 or response_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self._reactor = reactor
        self._token = token
        self._response_timeout = response_timeout
        self._post_slots = DeferredSemaphore(concurrency)
        self._other_slots = DeferredSemaphore(max(16, 4 * concurrency))
        self._in_flight_posts = 0
        self._posts_started = 0
        if cooperator is None:
            cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f))
        self._cooperator = cooperator
        self._pool: HTTPConnectionPool | None = None
        if http_client is None:
            if not verify_tls and self.url.startswith("https:"):
                self.log.warn(
                    "TLS certificates of {url} are NOT verified (verify_tls is off)",
                    url=self._shown_url,
                )
            agent, pool = _page_agent(
                reactor,
                concurrency=concurrency,
                connect_timeout=connect_timeout,
                verify_tls=verify_tls,
                tls_trust_root=tls_trust_root,
            )
            self._pool = pool
            # Requests go to the Agent itself: treq's per-request URL parsing,
            # cookie and content-decoding wrappers cost a fifth of a post's
            # CPU, and none of them is of use for these four pages.
            self._agent = agent
        self._http = http_client
        #: Called with (page, result, seconds) after each request: result is
        #: the HTTP status, C{"timeout"} or C{"error"} (L{gsmail.metrics}).
        self.observe_request: Callable[[str, str, float], None] | None = None

    def set_url(self, url: str) -> None:
        """
        Point the client at another site URL (the embedded stand-in's URL is
        only known once it listens).

        @raise ValueError: the URL is not http(s) with a host.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the GroupServer URL must be http:// or https:// with a host")
        self.url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self._shown_url = _without_userinfo(self.url)
        # Encoded once (IDNA host, percent-encoded path), not per request.
        self._page_uris = {
            page: EncodedURL.from_text(self.url + path).to_uri().to_text().encode("ascii")
            for page, path in PAGES.items()
        }

    def __repr__(self) -> str:
        return f"<GroupServerClient url={self._shown_url!r}>"

    @property
    def in_flight_posts(self) -> int:
        """Adds and relays being sent or awaiting their answer now."""
        return self._in_flight_posts

    @property
    def queued_posts(self) -> int:
        """Adds and relays waiting for one of the C{concurrency} slots."""
        return len(self._post_slots.waiting)

    @property
    def posts_started(self) -> int:
        """Adds and relays sent since the client was made."""
        return self._posts_started

    # -- the four pages -----------------------------------------------------

    def lookup_group(self, address: str, *, quiet: bool = False) -> Deferred[GroupInfo]:
        """
        Ask the group-exists page (C{/gs-group-messages-add-group-exists.html})
        which group has C{address}.

        @param address: the list address, C{local@domain}.
        @return: a L{GroupInfo}, with C{group_id} C{None} for no group.
            Fails with L{GroupServerError}: 4.4.4 (unreachable, answer lost),
            4.5.0 (non-200; a 200 form page without a status message, i.e.
            a login or maintenance page; a body that is neither JSON with a
            C{groupId} nor a form page), 4.3.5 (the form again with an
            error status: a wrong token), 4.4.7 (timeout).
        @param quiet: no log line for an answer (C{/readyz}'s repeated
            check); failures are still logged.
        """
        fields = [
            ("form.email", address),
            ("form.token", self._token),
            ("form.actions.check", "Check"),
        ]
        return Deferred.fromCoroutine(self._lookup(address, fields, quiet))

    def add_post(
        self, group_id: str, message: MessageSource, time_source: str = "server"
    ) -> Deferred[None]:
        """
        Add C{message} to the group C{group_id} with the add-email page
        (C{/gs-group-messages-add-email.html}); waits for one of the
        C{concurrency} slots first.

        @param time_source: C{"server"} (stamp the post with GroupServer's
            clock) or C{"message"} (its C{Date} header).
        @return: fires with C{None} on a 200 answer whose status message is
            C{Done}. Fails with L{GroupServerError} (see the class docstring);
            C{outcome_unknown} is set when the post may have been added.
        @raise ValueError: (in the Deferred) an unknown C{time_source}.
        """
        if time_source not in _TIME_SOURCES:
            return fail(ValueError("time_source must be server or message"))
        fields = [
            ("form.groupId", group_id),
            ("form.timeSource", time_source),
            ("form.token", self._token),
            ("form.actions.add", "Add"),
        ]
        return Deferred.fromCoroutine(self._big_post("add", group_id, fields, message))

    def relay(self, message: MessageSource) -> Deferred[None]:
        """
        Relay C{message} to a member with the relay page
        (C{/gs-profile-email-relay.html}); waits for a slot like
        L{add_post}, and fails the same ways.
        """
        fields = [("form.token", self._token), ("form.actions.relay", "Relay")]
        return Deferred.fromCoroutine(self._big_post("relay", None, fields, message))

    def record_bounce(self, user_email: str, group_email: str) -> Deferred[bool]:
        """
        Record with the bounce page (C{/gs-group-member-bounce.html}) that
        mail from the group C{group_email} to C{user_email} bounced.

        @return: fires with C{True} when the status message is C{Done}, or
            C{False} when it is C{No user found for ...} (the page ran; no
            member has C{user_email}). Fails with L{GroupServerError} like
            L{add_post}.
        """
        fields = [
            ("form.userEmail", user_email),
            ("form.groupEmail", group_email),
            ("form.token", self._token),
            ("form.actions.handle", "Handle"),
        ]
        return Deferred.fromCoroutine(self._bounce(fields))

    def close(self) -> Deferred[None]:
        """
        Close the idle connections of the client's own pool (C{stopService}
        calls this once the in-flight calls are over).

        @return: fires when they are closed.
        """
        if self._pool is None:
            return succeed(None)
        closed: Deferred[None] = self._pool.closeCachedConnections()  # type: ignore[no-untyped-call]
        return closed

    # -- internals ------------------------------------------------------------

    async def _lookup(
        self, address: str, fields: list[tuple[str, str]], quiet: bool = False
    ) -> GroupInfo:
        async with self._other_slots:
            code, body = await self._call(
                "exists", None, fields, None, idempotent=True, acts=False, quiet=quiet
            )
        if code != 200:
            raise _status_error(code, acts=False)
        try:
            reply = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            # The form page: refused (a wrong token), or a page that did not
            # run the check (login, maintenance).
            page = read_status(body)
            if page.result in (PageResult.REFUSED, PageResult.NOT_RUN):
                raise _page_error("exists", page) from None
            raise GroupServerError(
                status.GROUPSERVER_BAD_REPLY,
                f"the group-exists page did not answer JSON ({page.describe()})",
            ) from None
        if not isinstance(reply, dict) or "groupId" not in reply:
            raise GroupServerError(
                status.GROUPSERVER_BAD_REPLY, "the group-exists answer has no groupId"
            )
        group_id = reply["groupId"]
        site_id = reply.get("siteId")
        site_url = reply.get("siteURL")
        email = reply.get("email")
        if not all(v is None or isinstance(v, str) for v in (group_id, site_id, site_url)):
            raise GroupServerError(
                status.GROUPSERVER_BAD_REPLY, "the group-exists answer has a non-text value"
            )
        return GroupInfo(
            email=email if isinstance(email, str) else address,
            group_id=group_id or None,
            site_id=site_id or None,
            site_url=site_url or None,
        )

    async def _big_post(
        self,
        page: str,
        group_id: str | None,
        fields: list[tuple[str, str]],
        message: MessageSource,
    ) -> None:
        async with self._post_slots:
            self._in_flight_posts += 1
            self._posts_started += 1
            try:
                code, body = await self._call(
                    page, group_id, fields, message, idempotent=False, acts=True
                )
            finally:
                self._in_flight_posts -= 1
        _check_post_reply(page, code, body)

    async def _bounce(self, fields: list[tuple[str, str]]) -> bool:
        async with self._other_slots:
            code, body = await self._call("bounce", None, fields, None, idempotent=True, acts=True)
        page = _check_post_reply("bounce", code, body)
        if page.result is PageResult.NO_USER:
            self.log.info("GroupServer bounce page: {status}", status=page.text)
            return False
        return True

    async def _call(
        self,
        page: str,
        group_id: str | None,
        fields: list[tuple[str, str]],
        message: MessageSource | None,
        *,
        idempotent: bool,
        acts: bool,
        quiet: bool = False,
    ) -> tuple[int, bytes]:
        """
        POST to C{page}, once, or twice for an idempotent call whose pooled
        connection was dead.

        @param acts: the page changes GroupServer's state (add, relay,
            bounce): a lost answer is "outcome unknown".
        @return: the status and the (capped) body.
        """
        attempts = 2 if idempotent else 1
        for attempt in range(1, attempts + 1):
            try:
                return await self._call_once(
                    page, group_id, fields, message, acts=acts, quiet=quiet
                )
            except _StaleConnection as stale:
                if attempt < attempts:
                    self.log.info(
                        "GroupServer {page}: connection lost before an answer; trying again",
                        page=page,
                        group_id=group_id,
                    )
                    continue
                raise stale.error from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call_once(
        self,
        page: str,
        group_id: str | None,
        fields: list[tuple[str, str]],
        message: MessageSource | None,
        *,
        acts: bool,
        quiet: bool = False,
    ) -> tuple[int, bytes]:
        start = self._reactor.seconds()
        result = "error"
        timed_out = False
        deadline: IDelayedCall | None = None

        def body_sent() -> None:
            # From here the server has the request: its answer gets a full
            # response_timeout of its own.
            if deadline is not None and deadline.active():
                deadline.reset(self._response_timeout)

        body = MultipartBody(
            fields,
            message,
            cooperator=self._cooperator if message is not None else None,
            on_complete=body_sent,
        )
        exchange = Deferred.fromCoroutine(self._exchange(page, body))

        def give_up() -> None:
            nonlocal timed_out
            timed_out = True
            exchange.cancel()

        deadline = self._reactor.callLater(self._response_timeout, give_up)
        try:
            code, content = await exchange
            result = str(code)
        except Exception as e:
            if not timed_out:
                if _is_cancellation(e):
                    # Our caller cancelled: no error of ours, no retry.
                    result = "cancelled"
                    raise CancelledError() from None
                error = _map_failure(page, e, body, acts, self.log)
                self._log_failure(page, group_id, start, error)
                if isinstance(e, (RequestTransmissionFailed, ResponseNeverReceived)) and not any(
                    _is_tls_failure(r) for r in _reasons(e)
                ):
                    # Perhaps a kept-alive connection the server had closed.
                    raise _StaleConnection(error) from None
                raise error from None
            # Cancelled by give_up: whatever the exchange raised on its way
            # out (CancelledError, ResponseFailed wrapping it...).
            result = "timeout"
            error = GroupServerError(
                status.GROUPSERVER_TIMEOUT,
                f"no answer from the {page} page within {self._response_timeout:g} s",
                outcome_unknown=acts and body.complete,
            )
            self._log_failure(page, group_id, start, error)
            raise error from None
        finally:
            if deadline.active():
                deadline.cancel()
            if self.observe_request is not None:
                self.observe_request(page, result, self._reactor.seconds() - start)
        if page not in _LOGGED_BY_CALLER and not quiet:
            self.log.info(
                "GroupServer {page} page answered {status} in {elapsed:.3f} s",
                page=page,
                group_id=group_id,
                status=code,
                elapsed=self._reactor.seconds() - start,
            )
        return code, content

    async def _exchange(self, page: str, body: MultipartBody) -> tuple[int, bytes]:
        headers = Headers({b"Content-Type": [body.content_type], b"User-Agent": [b"gsmail"]})
        response: IResponse
        if self._agent is not None:
            response = await self._agent.request(  # type: ignore[no-untyped-call]
                b"POST", self._page_uris[page], headers, body
            )
        else:
            assert self._http is not None
            response = await self._http.request(
                "POST",
                self.url + PAGES[page],
                data=body,
                headers=headers,
                allow_redirects=False,
                unbuffered=True,
                reactor=self._reactor,  # type: ignore[arg-type]  # the same three interfaces
            )
        try:
            content = await _read_body(response)
        except _ReplyTooLarge as e:
            if response.code != 200:
                return response.code, b""
            if page != "exists":
                # A refused page shows the message again in its textarea, so
                # it outgrows the cap with a big message; its status message
                # comes before the form, in the head.
                return response.code, e.head
            raise
        except ResponseFailed:
            if response.code != 200:
                # The status is the answer; the rest of an error page does
                # not matter.
                return response.code, b""
            raise
        return response.code, content

    def _log_failure(
        self, page: str, group_id: str | None, start: float, error: GroupServerError
    ) -> None:
        self.log.warn(
            "GroupServer {page} page failed after {elapsed:.3f} s: {error}",
            page=page,
            group_id=group_id,
            status=None,
            elapsed=self._reactor.seconds() - start,
            error=str(error),
            reply_code=error.reply.code,
            enhanced_status=error.reply.enhanced,
            outcome_unknown=error.outcome_unknown,
        )
