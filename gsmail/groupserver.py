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
"""

from __future__ import annotations

import base64
import json
import random
import re
from collections.abc import Callable, Generator, Sequence
from typing import IO, TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit, urlunsplit

from hyperlink import EncodedURL
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    fail,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import CooperativeTask, Cooperator, TaskFinished, TaskStopped
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from gsmail import status
from gsmail.answers import PageResult, PageStatus, read_status
from gsmail.interfaces import GroupInfo, IGroupServer, MessageSource
from gsmail.status import GroupServerError
from gsmail.twistedcompat import set_connection_factory

if TYPE_CHECKING:
    from treq.client import HTTPClient

    from gsmail.twistedcompat import IOpenSSLTrustRoot

__all__ = [
    "CHUNK_SIZE",
    "MAX_REPLY_SIZE",
    "PAGES",
    "GroupServerClient",
    "MultipartBody",
    "SpoolReadError",
]

#: Bytes of the raw message read and encoded per step: a multiple of 3, so
#: each chunk base64-encodes on its own, without padding in the middle.
CHUNK_SIZE: Final = 3 * 2**16

#: The most bytes of a reply body read (1 MiB); GroupServer's answers are a
#: few KiB. A larger body is cut off and the connection closed.
MAX_REPLY_SIZE: Final = 2**20

#: Seconds an idle keep-alive connection is kept for reuse. Shorter than the
#: usual server-side idle timeouts (Apache 5 s, nginx 75 s), so a post is not
#: sent on a connection the server is closing at that moment: that race would
#: end in "outcome unknown" for a post GroupServer never saw.
IDLE_CONNECTION_TIMEOUT: Final = 4

#: Page paths, relative to the site URL (shared/groupserver-protocol.md).
PAGES: Final = {
    "exists": "/gs-group-messages-add-group-exists.html",
    "add": "/gs-group-messages-add-email.html",
    "relay": "/gs-profile-email-relay.html",
    "bounce": "/gs-group-member-bounce.html",
}

_MESSAGE_FIELD: Final = "form.emailMessage"
# Pages whose answers the caller logs, once per delivery: a second event per
# post cost a tenth of its CPU.
_LOGGED_BY_CALLER: Final = frozenset({"add", "relay"})
_TIME_SOURCES: Final = frozenset({"server", "message"})
# Statuses from a reverse proxy that may have handed the request on before it
# gave up waiting: the post may still be added.
_PROXY_GAVE_UP: Final = frozenset({502, 504})


class IClientReactor(IReactorTCP, IReactorTime, IReactorPluggableNameResolver):
    """
    What L{GroupServerClient} needs of a reactor: TCP connections, name
    resolution (the L{Agent}) and time (timeouts).
    """


class SpoolReadError(Exception):
    """
    The spool file of a message could not be read, or had fewer bytes than
    L{MessageSource.size} said. Nothing was posted.
    """


@implementer(IBodyProducer)
class MultipartBody:
    """
    A C{multipart/form-data} request body (RFC 7578) of text fields and, if
    a message is given, a last field holding the base64 of the raw message
    (C{prefix} then the first C{size} bytes of the spool file), encoded on
    the fly without line breaks.

    The C{length} (bytes) is exact and known before producing, so the
    request has a C{Content-Length} and is never chunked. The spool file is
    read in chunks of C{chunk_size} bytes, one per cooperator step; the
    file is opened on the first step and closed when the body is complete,
    fails, or is stopped. Reading a chunk of an already-written spool file
    is quick enough for the reactor thread; memory stays at a few chunks
    whatever the message size. A message of at most C{chunk_size} bytes
    whose bytes the spool kept in memory (C{message.data}) is written in
    one go.

    @ivar boundary: the multipart boundary: C{gsmail-} and 32 random hex
        digits. Delimiter lines start with C{--}, which never occurs in
        base64, so the message part cannot contain one; a boundary found in
        a field value is drawn again.
    @ivar content_type: the value of the C{Content-Type} request header.
    @ivar length: the exact body length in bytes.
    @ivar complete: C{True} once every byte was handed to the consumer: from
        then on the server may have the whole request.
    """

    def __init__(
        self,
        fields: Sequence[tuple[str, str]],
        message: MessageSource | None = None,
        *,
        cooperator: Cooperator | None = None,
        message_field: str = _MESSAGE_FIELD,
        chunk_size: int = CHUNK_SIZE,
        on_complete: Callable[[], None] | None = None,
    ) -> None:
        """
        @param fields: C{(name, value)} pairs, sent in this order before the
            message; values are encoded as UTF-8.
        @param message: the message for the last field, or C{None}.
        @param cooperator: runs the steps that read and write the message;
            required when C{message} is given.
        @param message_field: the name of the message field.
        @param chunk_size: bytes of raw message per step, a positive multiple
            of 3.
        @param on_complete: called once when the last byte was written.
        @raise ValueError: C{chunk_size} is not a positive multiple of 3, or a
            message is given without a cooperator.
        """
        if chunk_size <= 0 or chunk_size % 3:
            raise ValueError("chunk_size must be a positive multiple of 3")
        if message is not None and cooperator is None:
            raise ValueError("a cooperator is needed to stream a message")
        encoded = [(name.encode("utf-8"), value.encode("utf-8")) for name, value in fields]
        boundary = _new_boundary()
        while any(boundary in v or boundary in n for n, v in encoded):
            boundary = _new_boundary()  # pragma: no cover - 128 random bits
        self.boundary = boundary.decode("ascii")
        self.content_type = b"multipart/form-data; boundary=" + boundary
        self.complete = False
        self._message = message
        self._cooperator = cooperator
        self._chunk_size = chunk_size
        self._on_complete = on_complete
        head = b"".join(_part_header(boundary, n) + v + b"\r\n" for n, v in encoded)
        if message is not None:
            head += _part_header(boundary, message_field.encode("utf-8"))
            self._tail = b"\r\n--" + boundary + b"--\r\n"
            encoded_length = 4 * ((message.length + 2) // 3)
        else:
            self._tail = b"--" + boundary + b"--\r\n"
            encoded_length = 0
        self._head = head
        self.length = len(head) + encoded_length + len(self._tail)
        self._task: CooperativeTask[Any] | None = None
        self._steps: Generator[None, None, None] | None = None
        self._file: IO[bytes] | None = None
        self._stopped = False
        self._running = False

    def __repr__(self) -> str:
        # Never the field values: one of them is the token.
        return f"<MultipartBody length={self.length}>"

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """
        Write the body to C{consumer}.

        @return: fires when all was written; fails with L{SpoolReadError}
            when the spool file cannot be read or is too short; never fires
            after L{stopProducing} (as L{IBodyProducer} requires).
        """
        if self._message is None:
            consumer.write(self._head + self._tail)
            self._mark_complete()
            return succeed(None)
        data = self._message.data
        if data is not None and self._message.length <= self._chunk_size:
            # Small and in memory: one write, no file, no cooperator steps.
            encoded = base64.b64encode(self._message.prefix + data[: self._message.size])
            consumer.write(self._head + encoded + self._tail)
            if self._stopped:  # the connection was lost during the write
                return Deferred()
            self._mark_complete()
            return succeed(None)
        assert self._cooperator is not None
        self._steps = self._produce(consumer, self._message)
        self._task = self._cooperator.cooperate(self._steps)
        done: Deferred[Any] = self._task.whenDone()

        def finished(result: object) -> Deferred[None] | None:
            if isinstance(result, Failure):
                if result.check(TaskStopped):  # type: ignore[no-untyped-call]
                    return Deferred()
                return result  # type: ignore[return-value]  # re-raised by the chain
            return None

        return done.addBoth(finished)

    def pauseProducing(self) -> None:
        """Stop reading and writing until L{resumeProducing}."""
        if self._task is not None:
            try:
                self._task.pause()
            except TaskFinished:
                pass

    def resumeProducing(self) -> None:
        """Go on after L{pauseProducing}."""
        if self._task is not None:
            try:
                self._task.resume()
            except TaskFinished:
                pass

    def stopProducing(self) -> None:
        """
        Give up: the request will not be sent whole. Closes the spool file.
        """
        self._stopped = True
        if self._task is not None:
            try:
                self._task.stop()
            except TaskFinished:
                pass
        self._close_file()
        if self._steps is not None and not self._running:
            self._steps.close()

    def _produce(self, consumer: IConsumer, message: MessageSource) -> Generator[None, None, None]:
        """
        The steps of L{startProducing}: one chunk read, encoded and written
        per step.
        """
        # After every write: stopProducing may have been called from inside
        # it (connection lost). A stopped task is never resumed, and must
        # not end (StopIteration) as if it had completed, so it yields.
        self._running = True
        try:
            consumer.write(self._head)
            if self._stopped:
                self._running = False
                yield None
            pending = message.prefix
            left = message.size  # bytes of the file still to read
            try:
                self._file = open(message.path, "rb")  # noqa: SIM115 - closed by _close_file
            except OSError as e:
                raise SpoolReadError(f"cannot open the spool file: {e.strerror}") from None
            while pending or left:
                # Fill a whole chunk (except the last) so that every chunk
                # encodes to base64 on its own.
                parts = [pending[: self._chunk_size]]
                pending = pending[self._chunk_size :]
                have = len(parts[0])
                while have < self._chunk_size and left:
                    try:
                        data = self._file.read(min(self._chunk_size - have, left))
                    except OSError as e:
                        raise SpoolReadError(f"cannot read the spool file: {e.strerror}") from None
                    if not data:
                        raise SpoolReadError(
                            f"the spool file ended {left} bytes before the message did"
                        )
                    parts.append(data)
                    have += len(data)
                    left -= len(data)
                consumer.write(base64.b64encode(b"".join(parts)))
                self._running = False
                yield None
                self._running = True
            self._close_file()
            consumer.write(self._tail)
            if self._stopped:
                self._running = False
                yield None
            self._mark_complete()
        finally:
            self._running = False
            self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _mark_complete(self) -> None:
        self.complete = True
        if self._on_complete is not None:
            self._on_complete()


def _new_boundary() -> bytes:
    # Unique, not secret (see MultipartBody: base64 and the fields are
    # checked), so no getrandom call per request.
    return b"gsmail-%032x" % random.getrandbits(128)


def _part_header(boundary: bytes, name: bytes) -> bytes:
    return b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name + b'"\r\n\r\n'


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedConnectionCreator:
    """
    TLS without certificate verification (C{verify_tls = false}), still
    sending SNI so that name-based virtual hosts answer.
    """

    def __init__(self, hostname: bytes) -> None:
        self._hostname = hostname
        self._context = CertificateOptions().getContext()

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if not re.fullmatch(rb"[0-9.]+|\[?[0-9a-fA-F:]+\]?", self._hostname):
            connection.set_tlsext_host_name(self._hostname)
        connection.set_connect_state()
        return connection


@implementer(IPolicyForHTTPS)
class _UnverifiedPolicy:
    """The opt-out from certificate verification."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> _UnverifiedConnectionCreator:
        return _UnverifiedConnectionCreator(hostname)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    The endpoints the Agent connects with, made once per scheme, host and
    port: Twisted's own factory makes a new one, IDNA-encoding the host
    again, for every request, pooled connection or not (a twentieth of a
    post's CPU).
    """

    def __init__(self, reactor: IClientReactor, policy: IPolicyForHTTPS, timeout: float) -> None:
        self._reactor = reactor
        self._policy = policy
        self._timeout = timeout
        self._made: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._made.get(key)
        if endpoint is None:
            tcp = HostnameEndpoint(
                self._reactor, uri.host.decode("ascii"), uri.port, timeout=self._timeout
            )
            if uri.scheme == b"https":
                creator = self._policy.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(creator, tcp)
            else:
                endpoint = tcp
            self._made[key] = endpoint
        return endpoint


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    noisy = False


class _ReplyTooLarge(Exception):
    """
    The reply body was longer than L{MAX_REPLY_SIZE}.

    @ivar head: the first bytes of the body, up to the cap.
    """

    def __init__(self, head: bytes = b"") -> None:
        super().__init__()
        self.head = head


class _CappedBody(Protocol):
    """
    Collects a response body of at most C{cap} bytes into C{done}. Over the
    cap, or when C{done} is cancelled, the connection is closed.
    """

    def __init__(self, cap: int) -> None:
        self.done: Deferred[bytes] = Deferred(self._cancel)
        self._cap = cap
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._cap:
            kept = self._cap - (self._size - len(data))
            self._parts.append(data[: max(0, kept)])
            self.done.errback(_ReplyTooLarge(b"".join(self._parts)))
            self._stop_transport()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):  # type: ignore[no-untyped-call]
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)

    def _cancel(self, d: Deferred[bytes]) -> None:
        self._stop_transport()

    def _stop_transport(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


def _read_body(response: IResponse, cap: int = MAX_REPLY_SIZE) -> Deferred[bytes]:
    """
    The body of C{response}, at most C{cap} bytes; never buffers more.

    @raise _ReplyTooLarge: the body was longer than C{cap}.
    """
    collector = _CappedBody(cap)
    response.deliverBody(collector)  # type: ignore[no-untyped-call]
    return collector.done


class _StaleConnection(Exception):
    """
    A connection failed before any byte of the response arrived; an
    idempotent call may be repeated once on a new connection.
    """

    def __init__(self, error: GroupServerError) -> None:
        super().__init__(str(error))
        self.error = error


def _reasons(exc: BaseException) -> list[BaseException]:
    """The wrapped causes of a twisted.web client error, else C{[exc]}."""
    wrapped = getattr(exc, "reasons", None)
    if isinstance(wrapped, list):
        return [f.value for f in wrapped if isinstance(f, Failure) and f.value is not None]
    return [exc]


def _is_cancellation(exc: BaseException) -> bool:
    """C{exc} is, or wraps, the cancellation of a request or connection attempt."""
    kinds = (CancelledError, ConnectingCancelledError)
    return isinstance(exc, kinds) or any(isinstance(r, kinds) for r in _reasons(exc))


def _is_tls_failure(exc: BaseException) -> bool:
    """A TLS handshake failure: protocol error, untrusted or misnamed certificate."""
    return isinstance(exc, (SSL.Error, VerificationError))


def _describe(exc: BaseException) -> str:
    """A short, token-free description of a connection failure."""
    name = type(exc).__name__
    # OpenSSL errors are lists of tuples; the last names the reason.
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        last = exc.args[0][-1]
        if isinstance(last, tuple) and last:
            return f"TLS: {last[-1]}"
    text = str(exc).strip()
    return f"{name}: {text}" if text else name


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
            pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
            pool.maxPersistentPerHost = concurrency + 2
            pool.cachedConnectionTimeout = IDLE_CONNECTION_TIMEOUT
            pool.retryAutomatically = False
            # One "Starting factory" log line per connection is noise.
            set_connection_factory(pool, _QuietHTTP11ClientFactory)
            policy: IPolicyForHTTPS
            if not verify_tls:
                policy = _UnverifiedPolicy()
                if self.url.startswith("https:"):
                    self.log.warn(
                        "TLS certificates of {url} are NOT verified (verify_tls is off)",
                        url=self._shown_url,
                    )
            else:
                policy = BrowserLikePolicyForHTTPS(  # type: ignore[no-untyped-call]
                    trustRoot=tls_trust_root
                )
            agent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
                reactor, _Endpoints(reactor, policy, connect_timeout), pool=pool
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
                error = self._map_failure(page, e, body, acts)
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

    def _map_failure(
        self, page: str, exc: Exception, body: MultipartBody, acts: bool
    ) -> GroupServerError:
        """The L{GroupServerError} for a failed exchange with C{page}."""
        reasons = _reasons(exc)
        tls = [r for r in reasons if _is_tls_failure(r)]
        if tls:
            # The handshake failed: no request byte reached the page.
            return GroupServerError(status.GROUPSERVER_UNREACHABLE, _describe(tls[0]))
        if isinstance(exc, (ConnectError, DNSLookupError, ConnectTimeoutError)):
            return GroupServerError(status.GROUPSERVER_UNREACHABLE, _describe(exc))
        if isinstance(exc, RequestGenerationFailed):
            spool = [r for r in reasons if isinstance(r, SpoolReadError)]
            if spool:
                return GroupServerError(status.LOCAL_ERROR, str(spool[0]))
            return GroupServerError(status.LOCAL_ERROR, "could not build the request")
        if isinstance(exc, RequestTransmissionFailed):
            return GroupServerError(
                status.GROUPSERVER_UNREACHABLE,
                "connection lost while sending the request: "
                + ", ".join(_describe(r) for r in reasons),
            )
        if isinstance(exc, ResponseFailed):
            # ResponseNeverReceived included: the request was sent (unless
            # the server answered early and then hung up).
            if acts and body.complete:
                return GroupServerError(
                    status.OUTCOME_UNKNOWN,
                    f"connection lost waiting for the {page} page: "
                    + ", ".join(_describe(r) for r in reasons),
                    outcome_unknown=True,
                )
            return GroupServerError(
                status.GROUPSERVER_UNREACHABLE,
                "connection lost waiting for the answer: "
                + ", ".join(_describe(r) for r in reasons),
            )
        if isinstance(exc, _ReplyTooLarge):
            return GroupServerError(
                status.GROUPSERVER_BAD_REPLY,
                f"the answer was longer than {MAX_REPLY_SIZE} bytes",
                outcome_unknown=acts,
            )
        self.log.failure(
            "Unexpected failure calling the GroupServer {page} page",
            Failure(exc),  # type: ignore[no-untyped-call]
            page=page,
        )
        return GroupServerError(
            status.GROUPSERVER_UNREACHABLE,
            type(exc).__name__,
            outcome_unknown=acts and body.complete,
        )

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


def _status_error(code: int, acts: bool) -> GroupServerError:
    return GroupServerError(
        status.GROUPSERVER_ERROR,
        f"HTTP status {code}",
        outcome_unknown=acts and code in _PROXY_GAVE_UP,
    )


def _check_post_reply(page: str, code: int, body: bytes) -> PageStatus:
    """
    The status of C{page}'s (add, relay, bounce) answer when it is a success:
    200 and the status message C{Done} (the bounce page: also C{No user found
    for ...}).

    @raise GroupServerError: 4.5.0 for another HTTP status (C{outcome_unknown}
        for a proxy's 502/504) or for a page without a status message
        (L{status.GROUPSERVER_NOT_RUN}); 4.3.5 for an error status
        (L{status.GROUPSERVER_REFUSED}); 4.5.0 with C{outcome_unknown} for a
        status that is none of GroupServer's.
    """
    if code != 200:
        raise _status_error(code, acts=True)
    found = read_status(body)
    if found.result is PageResult.DONE:
        return found
    if found.result is PageResult.NO_USER and page == "bounce":
        return found
    raise _page_error(page, found)


def _page_error(page: str, found: PageStatus) -> GroupServerError:
    """The error for a 200 page whose status message is not a success."""
    name = "group-exists" if page == "exists" else page
    if found.result is PageResult.REFUSED:
        return GroupServerError(
            status.GROUPSERVER_REFUSED, f"the {name} page refused it: {found.describe()}"
        )
    if found.result is PageResult.NOT_RUN:
        return GroupServerError(
            status.GROUPSERVER_NOT_RUN, f"the {name} page answered 200 with {found.describe()}"
        )
    return GroupServerError(
        status.GROUPSERVER_BAD_REPLY,
        f"the {name} page answered an unexpected {found.describe()}",
        outcome_unknown=page != "exists",
    )


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
