"""
Tests for L{gsmail.twistedcompat}, and for every other private part of
Twisted that gsmail uses: each test fails (none skips) when the installed
Twisted no longer has the attribute or no longer behaves as gsmail expects.
A failure here after a Twisted upgrade names the adapter to rewrite before
the upper bound in setup.py may be raised.
"""

from __future__ import annotations

import io
import os
import socket
import stat
from typing import Any

from OpenSSL import SSL
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogPublisher, textFileLogObserver
from twisted.names import client as dns_client
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import client as web_client
from twisted.web import http

from gsmail.twistedcompat import (
    add_trust_root,
    adopt_unix_port,
    idle_tcp_connection,
    log_file_of,
    log_observers,
    raise_listen_errors,
    request_path,
    set_connection_factory,
    stop_resolv_conf_timer,
    waiting_for_port,
)
from tests.util import Made, tcp_pair

reactor: Any = _reactor


class IdleTCPConnectionTests(TestCase):
    """L{idle_tcp_connection}: C{tcp.Connection._writeDisconnected}, C{_tempDataBuffer}."""

    async def connect(self) -> tuple[Any, socket.socket]:
        """The server side's transport, and the peer's socket."""
        return await tcp_pair(self)

    async def test_attributes(self) -> None:
        """A TCP transport still has the private attributes the adapter reads."""
        transport, _ = await self.connect()
        for name in ("_writeDisconnected", "_tempDataBuffer", "dataBuffer", "TLS", "producer"):
            self.assertTrue(hasattr(transport, name), f"tcp.Connection has no {name}")

    async def test_idle(self) -> None:
        """An open connection with nothing buffered is idle."""
        transport, _ = await self.connect()
        self.assertTrue(idle_tcp_connection(transport))

    async def test_write_this_turn(self) -> None:
        """A write of this reactor turn (in C{_tempDataBuffer}) makes it busy until sent."""
        transport, _ = await self.connect()
        transport.write(b"250 ok\r\n")
        self.assertFalse(idle_tcp_connection(transport))
        for _ in range(100):
            await deferLater(reactor, 0.01)
            if idle_tcp_connection(transport):
                break
        self.assertTrue(idle_tcp_connection(transport))

    async def test_half_closed(self) -> None:
        """After C{loseWriteConnection} (C{_writeDisconnected}) it is not idle."""
        transport, _ = await self.connect()
        transport.loseWriteConnection()
        await deferLater(reactor, 0.01)
        self.assertFalse(idle_tcp_connection(transport))

    def test_other_transport(self) -> None:
        """Anything but a TCP/UNIX connection is not idle."""
        self.assertFalse(idle_tcp_connection(StringTransport()))


class AdoptUnixPortTests(TestCase):
    """L{adopt_unix_port}: C{unix.Port._fromListeningDescriptor}, C{_bindPath}."""

    async def test_adopted(self) -> None:
        """
        The port accepts on the inherited socket, and when it stops the
        socket file is still there with the mode its owner gave it.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "lmtp.sock")
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(path)
        os.chmod(path, 0o660)
        listening.listen(5)
        listening.setblocking(False)
        made: Deferred[Made] = Deferred()
        port = adopt_unix_port(reactor, listening.fileno(), Factory.forProtocol(lambda: Made(made)))
        port.startListening()
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(peer.close)
        peer.connect(path)
        server = await made
        server.transport.loseConnection()
        await port.stopListening()
        self.assertTrue(os.path.exists(path))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o660)


class _Quiet(web_client._HTTP11ClientFactory):
    noisy = False


class _Endpoint:
    """An endpoint that records the factory it is asked to connect with."""

    def __init__(self) -> None:
        self.factories: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        self.factories.append(factory)
        return Deferred()


class ConnectionFactoryTests(SynchronousTestCase):
    """
    L{set_connection_factory}: C{HTTPConnectionPool._factory}; and
    C{twisted.web.client._HTTP11ClientFactory}, which gsmail.groupserver.http
    subclasses.
    """

    def test_default(self) -> None:
        """A pool's connection factory is still C{_HTTP11ClientFactory}, in C{_factory}."""
        pool = web_client.HTTPConnectionPool(MemoryReactorClock())
        self.assertIs(pool._factory, web_client._HTTP11ClientFactory)

    def test_used(self) -> None:
        """The pool opens its next connection with the factory set."""
        pool = web_client.HTTPConnectionPool(MemoryReactorClock())
        set_connection_factory(pool, _Quiet)
        endpoint = _Endpoint()
        pool.getConnection(("http", b"example.com", 80), endpoint)
        [factory] = endpoint.factories
        self.assertIsInstance(factory, _Quiet)
        self.assertFalse(factory.noisy)


class ListenerServiceTests(TestCase):
    """
    L{raise_listen_errors} and L{waiting_for_port}:
    C{StreamServerEndpointService._raiseSynchronously} and
    C{_waitingForPort} (gsmail.service).
    """

    def service(self, port: int) -> StreamServerEndpointService:
        return StreamServerEndpointService(
            TCP4ServerEndpoint(reactor, port, interface="127.0.0.1"),
            Factory.forProtocol(Protocol),
        )

    async def test_port(self) -> None:
        """Once started, the service's port is the result of L{waiting_for_port}."""
        svc = self.service(0)
        self.assertIsNone(waiting_for_port(svc))
        raise_listen_errors(svc)
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(svc.stopService)
        port = waiting_for_port(svc).result
        self.assertGreater(port.getHost().port, 0)

    async def test_listen_error_raised(self) -> None:
        """With L{raise_listen_errors}, a port taken is raised by C{privilegedStartService}."""
        svc = self.service(0)
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(svc.stopService)
        taken = self.service(waiting_for_port(svc).result.getHost().port)
        raise_listen_errors(taken)
        self.assertRaises(CannotListenError, taken.privilegedStartService)


class ElsewhereTests(SynchronousTestCase):
    """
    The other adapters for modules outside this one: the trust root
    (gsmail.outbound.mtasts), the resolver's timer (gsmail.service,
    gsmail.check), log files (gsmail.reload), a request's path
    (gsmail.standin.http).
    """

    def test_trust_root(self) -> None:
        """
        L{add_trust_root}: C{IOpenSSLTrustRoot._addCACertsToContext} on
        C{platformTrust()}, and the interface gsmail.twistedcompat names.
        """
        from twisted.internet._sslverify import IOpenSSLTrustRoot

        trust = ssl.platformTrust()
        self.assertTrue(IOpenSSLTrustRoot.providedBy(trust))
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        add_trust_root(trust, context)  # AttributeError when Twisted renamed it

    def test_resolver_timer(self) -> None:
        """
        L{stop_resolv_conf_timer}: C{client.Resolver._parseCall}, the timer
        that re-reads resolv.conf, is cancelled.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("nameserver 127.0.0.1\n")
        clock = MemoryReactorClock()
        resolver = dns_client.Resolver(resolv=path, reactor=clock)
        self.assertTrue(resolver._parseCall.active())
        stop_resolv_conf_timer(resolver)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_log_files(self) -> None:
        """
        L{log_observers} and L{log_file_of}: C{LogPublisher._observers}
        lists the observers, and a text observer keeps its file in
        C{_outFile}.
        """
        out = io.StringIO()
        observer = textFileLogObserver(out)
        publisher = LogPublisher(observer)
        self.assertEqual(log_observers(publisher), [observer])
        self.assertIs(log_file_of(observer), out)
        self.assertIsNone(log_file_of(lambda event: None))

    def test_channel_path(self) -> None:
        """
        L{request_path}: C{HTTPChannel._path} is the request's path once the
        request line is parsed, before the body is in.
        """
        paths = []

        class Request(http.Request):
            def gotLength(self, length: int | None) -> None:
                paths.append(request_path(self.channel))
                super().gotLength(length)

        channel = http.HTTPChannel()
        channel.requestFactory = Request
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"POST /gs-group-messages/add-email HTTP/1.1\r\nHost: x\r\n")
        channel.dataReceived(b"Content-Length: 5\r\n\r\n")
        self.assertEqual(paths, [b"/gs-group-messages/add-email"])
        channel.connectionLost(None)
