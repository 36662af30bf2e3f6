"""
Tests for L{gsmail.outbound.eager}: writes that leave at once.

Real TCP connections on 127.0.0.1: the peer is a plain socket, read without
blocking, so a test can tell bytes sent in this reactor turn from bytes
still in the transport's buffer.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gsmail.eager import write_now
from tests.util import tcp_pair

reactor: Any = _reactor


class WriteNowTests(TestCase):
    """L{write_now} on real TCP connections."""

    async def connect(self) -> tuple[Any, socket.socket]:
        """The server side's transport, and the peer's socket."""
        return await tcp_pair(self)

    def received(self, peer: socket.socket) -> bytes:
        """What has arrived at the peer so far (without waiting)."""
        try:
            return peer.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return b""

    async def test_sent_at_once(self) -> None:
        """
        On an idle connection the bytes are with the peer before the reactor
        turns (a plain C{write} waits for the next turn).
        """
        transport, peer = await self.connect()
        write_now(transport, b"250 2.1.5 Ok\r\n")
        self.assertEqual(self.received(peer), b"250 2.1.5 Ok\r\n")
        transport.write(b"250 later\r\n")
        self.assertEqual(self.received(peer), b"")
        await deferLater(reactor, 0.01)
        self.assertEqual(self.received(peer), b"250 later\r\n")

    async def test_order_kept(self) -> None:
        """
        Behind bytes still buffered, the new ones wait their turn: the peer
        gets everything in the order written.
        """
        transport, peer = await self.connect()
        transport.write(b"first ")
        write_now(transport, b"second")
        self.assertEqual(self.received(peer), b"")
        await deferLater(reactor, 0.01)
        self.assertEqual(self.received(peer), b"first second")

    async def test_full_socket(self) -> None:
        """
        What the socket does not take at once is sent later, in order, as
        the peer reads: nothing is lost or reordered.
        """
        transport, peer = await self.connect()
        data = bytes(range(256)) * 40_000  # 10 MB: more than the socket buffers hold
        write_now(transport, data)
        write_now(transport, b"end")
        got = bytearray(self.received(peer))
        self.assertTrue(0 < len(got) < len(data), len(got))  # some at once, the rest later
        for _ in range(2000):
            got += self.received(peer)
            if len(got) == len(data) + 3:
                break
            await deferLater(reactor, 0.001)
        self.assertEqual(bytes(got), data + b"end")

    async def test_closed(self) -> None:
        """A write after the connection was closed is dropped quietly."""
        transport, peer = await self.connect()
        transport.loseConnection()
        await deferLater(reactor, 0.01)
        self.assertFalse(transport.connected)
        write_now(transport, b"too late\r\n")
        self.assertEqual(peer.recv(100), b"")


class OtherTransportTests(SynchronousTestCase):
    """L{write_now} on transports other than plain TCP."""

    def test_string_transport(self) -> None:
        """Any other transport gets an ordinary C{write}."""
        transport = StringTransport()
        write_now(transport, b"250 ok\r\n")
        self.assertEqual(transport.value(), b"250 ok\r\n")
