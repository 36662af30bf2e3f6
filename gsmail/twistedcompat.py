# -*- test-case-name: tests.test_twistedcompat -*-
"""
Every use gsmail makes of Twisted's private parts, one small adapter each.

Twisted may change any name that starts with C{_} in any release. Each
adapter says why gsmail reaches in (there is no public API, or what the
public one costs), and C{tests/test_twistedcompat.py} checks each against
the installed Twisted, failing (never skipping) when the attribute or
behaviour is gone: a Twisted upgrade that breaks one is seen in the test
run, not in production. C{setup.py} keeps an upper bound on Twisted for
these; raise it after the tests pass on the new release.

gsmail's modules use these adapters, not the private names.
C{twisted.web.client._HTTP11ClientFactory}, which L{gsmail.groupserver.http}
subclasses, is checked by the tests too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import tcp

if TYPE_CHECKING:
    # The interface of a trust root (platformTrust(),
    # trustRootFromCertificates()): public objects, but the interface is
    # only in the private module, and only needed for annotations.
    from twisted.internet._sslverify import IOpenSSLTrustRoot as IOpenSSLTrustRoot

__all__ = [
    "IOpenSSLTrustRoot",
    "add_trust_root",
    "adopt_unix_port",
    "idle_tcp_connection",
    "log_file_of",
    "log_observers",
    "raise_listen_errors",
    "request_path",
    "set_connection_factory",
    "stop_resolv_conf_timer",
    "waiting_for_port",
]


def idle_tcp_connection(transport: Any) -> bool:
    """
    Is C{transport} a plain (not TLS) TCP or UNIX connection, open, with
    nothing buffered and no producer? Then one C{send(2)} on its socket now
    is what its own write would do a reactor turn later (L{gsmail.eager}).

    Private: C{tcp.Connection._writeDisconnected} (a half-close is under
    way) and C{_tempDataBuffer} (writes of this turn not yet joined into
    C{dataBuffer}); Twisted has no public "is the send buffer empty". What
    it gains (C{bench/eager.py}, a reply per line over loopback, 5 runs
    interleaved, load 3 to 4 on 2 cores, Twisted 26.10): 8.5 µs of server CPU
    per reply instead of 14.0 (median; one run each way was an outlier), the
    round trip 21 µs instead of 31.

    @return: C{False} for anything else, including a Twisted whose
        transports no longer have these attributes (the caller then writes
        as usual; C{tests/test_twistedcompat.py} fails on such a Twisted).
    """
    if not isinstance(transport, tcp.Connection):
        return False
    try:
        return bool(
            not transport.TLS
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport.dataBuffer
            and not transport._tempDataBuffer
            and transport.producer is None
        )
    except AttributeError:
        return False


def adopt_unix_port(reactor: Any, fd: int, factory: Any) -> Any:
    """
    A UNIX listening port (not yet listening: call its C{startListening})
    that accepts on the inherited listening socket C{fd}, and that neither
    changes the socket file's mode nor removes it when it stops: the path
    belongs to the process that made it (L{gsmail.workers}).

    Private: C{unix.Port._fromListeningDescriptor} and C{_bindPath}. The
    public C{IReactorSocket.adoptStreamPort} takes C{AF_UNIX} too (it calls
    the same constructor), but its port makes the socket file mode 0666 when
    it starts (undoing C{unix_socket_mode}) and unlinks the path when it
    stops, which would take the listener away from the main process and
    the other workers whenever one worker stops.

    @param fd: a listening C{AF_UNIX} stream socket; it is duplicated, the
        caller may close its own.
    """
    from twisted.internet import unix

    port = unix.Port._fromListeningDescriptor(reactor, fd, factory)
    port._bindPath = b"\0"  # not in the file system as far as this port knows
    return port


def set_connection_factory(pool: Any, factory_class: type) -> None:
    """
    Make C{pool} (an C{HTTPConnectionPool}) open its connections with
    C{factory_class}, a subclass of C{twisted.web.client._HTTP11ClientFactory}
    (L{gsmail.groupserver.http}: one with C{noisy = False}, so that each new
    connection to GroupServer does not log "Starting factory").

    Private: C{HTTPConnectionPool._factory}; the pool has no public way to
    choose its protocol factory. Gains one useless log line per connection.
    """
    pool._factory = factory_class


def raise_listen_errors(service: Any) -> None:
    """
    Make a C{StreamServerEndpointService} raise a listening failure from
    C{privilegedStartService} (so that gsmail's start-up fails with one line
    naming the endpoint) instead of logging it and running on without the
    listener. Replaces C{svc._raiseSynchronously = True} in
    L{gsmail.service.listeners}.

    Private: C{StreamServerEndpointService._raiseSynchronously}; Twisted's
    own C{strports.service} sets it the same way, and there is no public
    switch.
    """
    service._raiseSynchronously = True


def waiting_for_port(service: Any) -> Any:
    """
    The Deferred of a C{StreamServerEndpointService}'s listening port
    (fired with the port once it listens), or C{None} before it started or
    for another kind of service. Replaces C{_waitingForPort} in
    L{gsmail.service} and L{gsmail.service.listeners} (the port a listener
    got, the UNIX socket's mode, and C{/readyz}).

    Private: C{StreamServerEndpointService._waitingForPort}; the service
    does not expose its port otherwise.
    """
    return getattr(service, "_waitingForPort", None)


def stop_resolv_conf_timer(resolver: Any) -> None:
    """
    Cancel the timer with which a C{twisted.names.client.Resolver} re-reads
    C{resolv.conf} every minute, so that a stopped service (or
    C{gsmail-check}) leaves no delayed call behind. Replaces the
    C{_parseCall} lines of L{gsmail.service} and L{gsmail.check}.

    Private: C{client.Resolver._parseCall}; the resolver has no public
    close.
    """
    call = getattr(resolver, "_parseCall", None)
    if call is not None and call.active():
        call.cancel()


def add_trust_root(trust_root: Any, context: Any) -> None:
    """
    Make the pyOpenSSL C{context} trust the CAs of C{trust_root} (an
    C{IOpenSSLTrustRoot}: C{platformTrust()} or
    C{trustRootFromCertificates()}). Replaces C{_addCACertsToContext} in
    L{gsmail.outbound.mtasts}, whose client context is gsmail's own.

    Private: the interface's only method, C{_addCACertsToContext}; the
    public way (C{optionsForClientTLS}) builds the whole context itself.
    """
    trust_root._addCACertsToContext(context)


def log_observers(publisher: Any) -> list[Any]:
    """
    The observers of a C{twisted.logger.LogPublisher} (the global one:
    twistd's log file among them), for L{gsmail.reload}'s reopening of log
    files after logrotate. Replaces C{globalLogPublisher._observers} there.

    Private: C{LogPublisher._observers}; Twisted has no public way to list
    them.
    """
    return list(getattr(publisher, "_observers", ()))


def log_file_of(observer: Any) -> Any:
    """
    The file a C{FileLogObserver} writes to, or C{None} for another
    observer. Replaces C{_outFile} in L{gsmail.reload}.

    Private: C{FileLogObserver._outFile}; not exposed.
    """
    return getattr(observer, "_outFile", None)


def request_path(channel: Any) -> bytes:
    """
    The path of the request an C{HTTPChannel} is reading, once its request
    line is parsed and before its body is in (when the C{Request} itself
    does not know it yet): the stand-in's fault injection decides there.
    Replaces C{getattr(channel, "_path", b"")} in L{gsmail.standin.http}.

    Private: C{HTTPChannel._path}.
    """
    return getattr(channel, "_path", b"") or b""
