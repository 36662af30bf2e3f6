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

Still used directly, outside this module (their tests are here too):
C{StreamServerEndpointService._raiseSynchronously} and C{_waitingForPort}
(L{gsmail.service}), C{client.Resolver._parseCall} (L{gsmail.service},
L{gsmail.check}), C{IOpenSSLTrustRoot._addCACertsToContext}
(L{gsmail.outbound.mtasts}), C{LogPublisher._observers} and
C{FileLogObserver._outFile} (L{gsmail.reload}), C{HTTPChannel._path}
(L{gsmail.standin}) and C{twisted.web.client._HTTP11ClientFactory}
(L{gsmail.groupserver}).
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
    "adopt_unix_port",
    "idle_tcp_connection",
    "set_connection_factory",
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
    (L{gsmail.groupserver}: one with C{noisy = False}, so that each new
    connection to GroupServer does not log "Starting factory").

    Private: C{HTTPConnectionPool._factory}; the pool has no public way to
    choose its protocol factory. Gains one useless log line per connection.
    """
    pool._factory = factory_class
