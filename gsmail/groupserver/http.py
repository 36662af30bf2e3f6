# -*- test-case-name: tests.test_groupserver,tests.integration.test_fault_matrix -*-
"""
The HTTP plumbing under L{gsmail.groupserver.GroupServerClient}: its own
connection pool (idle keep-alive time, no automatic retry, no log line per
connection), the TLS policy (verified like a browser, or the
C{verify_tls = false} opt-out that still sends SNI), endpoints made once per
host rather than per request, and the reader that takes a reply body of at
most L{MAX_REPLY_SIZE} bytes off the connection; and the site URL without
its user info, for log lines.

Not here: which page is called with which fields, timeouts and retries
(L{gsmail.groupserver}), what a failure or an answer means for the sender
(L{gsmail.groupserver.errors}), the request body
(L{gsmail.groupserver.body}).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit, urlunsplit

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from gsmail.twistedcompat import set_connection_factory

if TYPE_CHECKING:
    from gsmail.twistedcompat import IOpenSSLTrustRoot

# gsmail.groupserver re-exports IClientReactor and MAX_REPLY_SIZE.
__all__ = ["IDLE_CONNECTION_TIMEOUT", "MAX_REPLY_SIZE", "IClientReactor"]

#: The most bytes of a reply body read (1 MiB); GroupServer's answers are a
#: few KiB. A larger body is cut off and the connection closed.
MAX_REPLY_SIZE: Final = 2**20

#: Seconds an idle keep-alive connection is kept for reuse. Shorter than the
#: usual server-side idle timeouts (Apache 5 s, nginx 75 s), so a post is not
#: sent on a connection the server is closing at that moment: that race would
#: end in "outcome unknown" for a post GroupServer never saw.
IDLE_CONNECTION_TIMEOUT: Final = 4


class IClientReactor(IReactorTCP, IReactorTime, IReactorPluggableNameResolver):
    """
    What L{gsmail.groupserver.GroupServerClient} needs of a reactor: TCP connections, name
    resolution (the L{Agent}) and time (timeouts).
    """


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


def _page_agent(
    reactor: IClientReactor,
    *,
    concurrency: int,
    connect_timeout: float,
    verify_tls: bool,
    tls_trust_root: IOpenSSLTrustRoot | None,
) -> tuple[Agent, HTTPConnectionPool]:
    """
    The C{Agent} a L{gsmail.groupserver.GroupServerClient} sends its
    requests with, over a persistent connection pool of its own.

    @param concurrency: the client's C{concurrency}; the pool keeps up to
        two more idle connections per host than that.
    @param connect_timeout: seconds to wait for a TCP connection.
    @param verify_tls: C{False} to accept any certificate (the caller logs
        the warning).
    @param tls_trust_root: the CAs to trust instead of the system's.
    @return: the agent and its pool (whose idle connections the client
        closes when it stops).
    """
    pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
    pool.maxPersistentPerHost = concurrency + 2
    pool.cachedConnectionTimeout = IDLE_CONNECTION_TIMEOUT
    pool.retryAutomatically = False
    # One "Starting factory" log line per connection is noise.
    set_connection_factory(pool, _QuietHTTP11ClientFactory)
    policy: IPolicyForHTTPS
    if not verify_tls:
        policy = _UnverifiedPolicy()
    else:
        policy = BrowserLikePolicyForHTTPS(  # type: ignore[no-untyped-call]
            trustRoot=tls_trust_root
        )
    agent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
        reactor, _Endpoints(reactor, policy, connect_timeout), pool=pool
    )
    return agent, pool


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


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
