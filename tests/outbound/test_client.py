"""
Tests for L{gsmail.outbound.client} and its parts (C{client_*.py}), gsmail's
ESMTP/LMTP client.

Three layers: the test plays the server by hand over a L{StringTransport}
(every byte the client writes is asserted, replies are scripted, time is a
L{Clock}); a small recording SMTP server in memory (L{iosim}) that decodes
DATA as a receiver does, for dot-stuffing and line ends; and real sockets
against Postfix's smtp-sink and against gsmail's own inbound server with a
test CA, for pipelining, many recipients and STARTTLS with verification.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Sequence
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    ISSLTransport,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver, StringTransportWithDisconnection
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import directlyProvides, implementer

from gsmail import status
from gsmail.inbound.protocol import InboundFactory, ServerSettings
from gsmail.outbound import client
from gsmail.outbound.client import (
    DEFAULT_TIMEOUTS,
    SMTPUTF8_UNSUPPORTED,
    ClientTLS,
    DataEncoder,
    SMTPClientError,
    SMTPConnection,
    Timeouts,
    Transaction,
    TransactionResult,
    connect,
)
from gsmail.outbound.client import replies as client_replies
from gsmail.outbound.client.replies import ReplyParser
from gsmail.status import Reply
from tests.certificates import new_ca
from tests.fakes import FakeCore
from tests.util import free_port, require_tool

reactor: Any = _reactor

HELO = "client.example.org"
LOCAL = IPv4Address("TCP", "127.0.0.1", 25)
LIST = "list@groups.example.com"
BODY = b"Subject: hi\n\nHello\n"
#: BODY as it goes on the wire (CRLF line ends), before the final dot.
BODY_WIRE = b"Subject: hi\r\n\r\nHello\r\n"


def ehlo(*keywords: str, name: str = "mx.example.net") -> bytes:
    """An EHLO reply offering C{keywords}."""
    return status.multiline(250, [name, *keywords])


def normalise(data: bytes) -> bytes:
    """
    What the receiver must get for a message file: every line end (LF, CRLF
    or a bare CR) as CRLF, and a last line end added if missing. Written
    independently of L{DataEncoder}, as the specification of it.
    """
    lines = re.split(rb"\r\n|\r|\n", data)
    if lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def receive(wire: bytes) -> bytes:
    """
    What a strict receiver (RFC 5321 §4.5.2) makes of DATA bytes: lines up to
    the lone "." with one leading dot removed. Fails the test if the lone "."
    comes before the end (the rest would run as commands), or if a bare CR
    or LF is sent (RFC 5321 §2.3.8).
    """
    assert wire.endswith(b".\r\n"), wire[-20:]
    lines = wire.split(b"\r\n")
    body = []
    for i, line in enumerate(lines):
        if line == b".":
            assert lines[i + 1 :] == [b""], "data continues after the terminating dot"
            break
        assert b"\r" not in line and b"\n" not in line, f"bare CR or LF in {line[:40]!r}"
        body.append(line[1:] if line.startswith(b".") else line)
    else:
        raise AssertionError("no terminating dot")
    return b"".join(line + b"\r\n" for line in body)


def assertSameBytes(test: SynchronousTestCase, got: bytes, expected: bytes) -> None:
    """Equal bytes; else say where they differ (a diff of megabytes takes minutes)."""
    if got != expected:
        at = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        test.fail(
            f"{len(got)} bytes, expected {len(expected)}; first difference at {at}: "
            f"{got[at - 20 : at + 20]!r} != {expected[at - 20 : at + 20]!r}"
        )


def encode_in_chunks(data: bytes, cuts: Sequence[int]) -> bytes:
    """Encode C{data} split at C{cuts}, as the sender reads it chunk by chunk."""
    encoder = DataEncoder()
    out = []
    start = 0
    for cut in sorted({min(c, len(data)) for c in cuts}) + [len(data)]:
        out.append(encoder.encode(data[start:cut]))
        start = cut
    out.append(encoder.finish())
    return b"".join(out)


def message_file(test: SynchronousTestCase, data: bytes = BODY) -> str:
    """A message file holding C{data}."""
    path = str(test.mktemp())
    with open(path, "wb") as f:
        f.write(data)
    return path


def transaction(
    test: SynchronousTestCase,
    recipients: Sequence[str] = ("a@example.org",),
    data: bytes = BODY,
    sender: str = LIST,
    **kwargs: Any,
) -> Transaction:
    """A transaction of C{data} from C{sender}."""
    return Transaction(sender, list(recipients), message_file(test, data), len(data), **kwargs)


# -- the server played by hand ------------------------------------------------


class ScriptTransport(StringTransportWithDisconnection):
    """
    A transport whose closing reaches the protocol at once, which records
    TCP_NODELAY and STARTTLS.
    """

    no_delay = False
    tls_context: object = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def startTLS(self, context: object, normal: bool = True) -> None:
        self.tls_context = context


@implementer(IStreamClientEndpoint)
class ScriptedEndpoint:
    """Connects the client to a L{ScriptTransport}."""

    def __init__(self, peer: IAddress, implicit_tls: bool = False) -> None:
        self.peer = peer
        self.implicit_tls = implicit_tls
        self.transport: ScriptTransport | None = None
        self.protocol: Protocol | None = None

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        protocol = factory.buildProtocol(self.peer)
        assert isinstance(protocol, Protocol)
        transport = ScriptTransport(peerAddress=self.peer)
        if self.implicit_tls:
            directlyProvides(transport, ISSLTransport)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.transport, self.protocol = transport, protocol
        return succeed(protocol)


class Script:
    """One client connection; the test writes the server's side."""

    def __init__(self, peer: IAddress = LOCAL, implicit_tls: bool = False, **kwargs: Any) -> None:
        self.clock = Clock()
        self.endpoint = ScriptedEndpoint(peer, implicit_tls)
        kwargs.setdefault("clock", self.clock)
        self.connecting = Deferred.fromCoroutine(
            connect(self.clock, self.endpoint, helo=HELO, **kwargs)
        )

    @property
    def transport(self) -> ScriptTransport:
        assert self.endpoint.transport is not None
        return self.endpoint.transport

    def reply(self, data: bytes) -> None:
        """The server sends C{data}."""
        assert self.endpoint.protocol is not None
        self.endpoint.protocol.dataReceived(data)

    def sent(self) -> bytes:
        """What the client wrote since the last call."""
        value = self.transport.value()
        self.transport.clear()
        return bytes(value)

    def pull(self, times: int = 1) -> None:
        """The transport takes C{times} chunks of message data."""
        for _ in range(times):
            if self.transport.producer is not None:
                self.transport.producer.resumeProducing()

    def stream(self) -> None:
        """The transport takes the whole message."""
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()

    def lose(self) -> None:
        """The connection drops."""
        self.transport.loseConnection()

    def send(self, connection: SMTPConnection, txn: Transaction) -> Deferred[TransactionResult]:
        return Deferred.fromCoroutine(connection.send(txn))


class ScriptedTestCase(SynchronousTestCase):
    """Opening a session by hand."""

    def open(self, *keywords: str, **kwargs: Any) -> tuple[Script, SMTPConnection]:
        """Connect, greet and EHLO; the server offers C{keywords}."""
        s = Script(**kwargs)
        s.reply(b"220 mx.example.net ESMTP\r\n")
        self.assertEqual(s.sent(), b"EHLO client.example.org\r\n")
        s.reply(ehlo(*keywords))
        return s, self.successResultOf(s.connecting)

    def refused(self, s: Script) -> SMTPClientError:
        """
        The session was refused politely: the client said QUIT (and waits for
        the reply), the server answers 221, and connect() fails.
        """
        self.assertNoResult(s.connecting)
        self.assertTrue(s.transport.value().endswith(b"QUIT\r\n"))
        s.reply(b"221 2.0.0 Bye\r\n")
        self.assertFalse(s.transport.connected)
        return self.error(s.connecting)

    def assertIdle(self, s: Script, conn: SMTPConnection) -> None:
        """
        Between transactions nothing times out: the connection's one timer
        may still be armed, but when it fires nothing waits, so the
        connection stays open and no timer is left.
        """
        s.clock.advance(DEFAULT_TIMEOUTS.data_end)
        self.assertTrue(conn.usable)
        self.assertFalse(s.transport.disconnected)
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def error(self, d: Deferred[Any]) -> SMTPClientError:
        """The L{SMTPClientError} C{d} failed with."""
        error = self.failureResultOf(d, SMTPClientError).value
        assert isinstance(error, SMTPClientError)
        return error


# -- the reply parser ----------------------------------------------------------


class ReplyParserTests(SynchronousTestCase):
    def test_multiline_reply_with_enhanced_codes(self) -> None:
        """
        A multi-line reply becomes one L{Reply}: its code, the enhanced code of
        the first line, and the texts joined without the repeated codes.
        """
        parser = ReplyParser()
        [raw] = parser.feed(
            b"550-5.1.1 The email account that you tried to reach\r\n550 5.1.1 does not exist.\r\n"
        )
        self.assertEqual(
            raw.to_reply(),
            Reply(550, "5.1.1", "The email account that you tried to reach does not exist."),
        )

    def test_split_anywhere(self) -> None:
        """Replies arriving a byte at a time, with LF-only ends, parse the same."""
        parser = ReplyParser()
        data = b"250-mx.example.net\n250-PIPELINING\r\n250 SIZE 1000\r\n354 go ahead\r\n"
        replies = []
        for i in range(len(data)):
            replies.extend(parser.feed(data[i : i + 1]))
        self.assertEqual(
            [(r.code, r.lines) for r in replies],
            [(250, ("mx.example.net", "PIPELINING", "SIZE 1000")), (354, ("go ahead",))],
        )
        self.assertEqual(replies[1].to_reply(), Reply(354, "", "go ahead"))

    def test_no_enhanced_code(self) -> None:
        """A reply without an enhanced code keeps all its text; a wrong class is text."""
        parser = ReplyParser()
        a, b, c = parser.feed(b"250 Ok\r\n450 5.1.1 odd\r\n220\r\n")
        self.assertEqual(a.to_reply(), Reply(250, "", "Ok"))
        self.assertEqual(b.to_reply(), Reply(450, "", "5.1.1 odd"))
        self.assertEqual(c.to_reply(), Reply(220, "", ""))

    def test_repeated_lines(self) -> None:
        """
        A reply line seen before parses the same again, alone or as the
        last line of a multi-line reply, and a known line does not hide a
        code that differs from the lines before it.
        """
        first = ReplyParser().feed(b"250 2.1.5 Ok\r\n251 b\r\n")
        again = ReplyParser().feed(b"250 2.1.5 Ok\r\n250-first\r\n250 2.1.5 Ok\r\n")
        self.assertEqual([r.lines for r in first], [("2.1.5 Ok",), ("b",)])
        self.assertEqual([r.lines for r in again], [("2.1.5 Ok",), ("first", "2.1.5 Ok")])
        with self.assertRaises(SMTPClientError):
            ReplyParser().feed(b"250-a\r\n251 b\r\n")

    def test_malformed(self) -> None:
        """
        Lines that are not replies, mixed codes within a reply and endless
        lines are protocol errors (4.5.0, transient).
        """
        for data in [
            b"hello\r\n",
            b"25 short\r\n",
            b"650 bad class\r\n",
            b"250-a\r\n251 b\r\n",
            b"250x\r\n",
            b"2" * (client_replies.MAX_REPLY_LINE + 1),
        ]:
            with self.assertRaises(SMTPClientError) as caught:
                ReplyParser().feed(data)
            self.assertEqual(
                (caught.exception.enhanced, caught.exception.transient), ("4.5.0", True)
            )


# -- the DATA encoder ----------------------------------------------------------

_PIECES = st.sampled_from([b"a", b"b", b".", b"..", b"\r", b"\n", b"\r\n", b"\n.", b".\r\n"])


class DataEncoderTests(SynchronousTestCase):
    @given(
        data=st.lists(_PIECES, max_size=40).map(b"".join),
        cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=8),
    )
    def test_receiver_gets_the_message(self, data: bytes, cuts: list[int]) -> None:
        """
        However the file is split into chunks, a receiver decodes exactly the
        message with CRLF line ends, the terminating dot comes only at the
        end, and no bare CR or LF (nor CR CR LF) is sent.
        """
        wire = encode_in_chunks(data, cuts)
        self.assertEqual(wire, encode_in_chunks(data, []))
        self.assertEqual(receive(wire), normalise(data))
        self.assertNotIn(b"\r\r\n", wire)

    def test_dot_on_first_line(self) -> None:
        """A message whose first line starts with a dot has it doubled."""
        self.assertEqual(encode_in_chunks(b".hidden\nnext\n", []), b"..hidden\r\nnext\r\n.\r\n")

    def test_only_a_dot(self) -> None:
        """A file holding only "." (with or without LF) is sent as "..", never as the end."""
        for data in [b".", b".\n", b".\r\n"]:
            self.assertEqual(encode_in_chunks(data, []), b"..\r\n.\r\n")

    def test_empty(self) -> None:
        """An empty file is just the terminating dot."""
        self.assertEqual(encode_in_chunks(b"", []), b".\r\n")

    def test_crlf_split_between_chunks(self) -> None:
        """A CRLF split between two chunks stays one CRLF."""
        self.assertEqual(encode_in_chunks(b"ab\r\ncd\r\n", [3]), b"ab\r\ncd\r\n.\r\n")

    def test_dot_after_chunk_boundary(self) -> None:
        """A line starting with "." right at a chunk boundary is stuffed (Twisted's bug)."""
        self.assertEqual(encode_in_chunks(b"ab\n.\ncd\n", [3]), b"ab\r\n..\r\ncd\r\n.\r\n")
        self.assertEqual(encode_in_chunks(b"ab\r\n.\r\n", [3]), b"ab\r\n..\r\n.\r\n")

    def test_bare_cr(self) -> None:
        """A bare CR, which may not be sent, ends the line; a dot after it is stuffed."""
        self.assertEqual(encode_in_chunks(b"a\r.b\r", [2]), b"a\r\n..b\r\n.\r\n")


# -- opening a session ---------------------------------------------------------


class ConnectTests(ScriptedTestCase):
    def test_greeting_and_ehlo(self) -> None:
        """
        After the greeting the client says EHLO; the extensions it offers
        are known by keyword, and Nagle's algorithm is off.
        """
        s, conn = self.open("PIPELINING", "SIZE 10240000", "AUTH PLAIN LOGIN", "AUTH=LOGIN")
        self.assertEqual(
            conn.extensions,
            {"PIPELINING": None, "SIZE": "10240000", "AUTH": "PLAIN LOGIN"},
        )
        self.assertEqual(conn.greeting, Reply(220, "", "mx.example.net ESMTP"))
        self.assertTrue(s.transport.no_delay)
        self.assertFalse(conn.tls_active)
        self.assertTrue(conn.usable)

    def test_helo_fallback(self) -> None:
        """A server that refuses EHLO with 5xx gets HELO, and no extension is used."""
        s = Script()
        s.reply(b"220 old.example.net SMTP\r\n")
        self.assertEqual(s.sent(), b"EHLO client.example.org\r\n")
        s.reply(b"502 Command not implemented\r\n")
        self.assertEqual(s.sent(), b"HELO client.example.org\r\n")
        s.reply(b"250 old.example.net\r\n")
        self.assertEqual(self.successResultOf(s.connecting).extensions, {})

    def test_ehlo_transient(self) -> None:
        """A 4xx to EHLO is a transient failure; no HELO is tried."""
        s = Script()
        s.reply(b"220 mx\r\n")
        s.sent()
        s.reply(b"451 4.3.0 try later\r\n")
        self.assertEqual(s.transport.value(), b"QUIT\r\n")
        error = self.refused(s)
        self.assertTrue(error.transient)
        self.assertEqual(error.reply, Reply(451, "4.3.0", "try later"))

    def test_greeting_refused(self) -> None:
        """A 554 greeting is a permanent failure; the client still says QUIT."""
        s = Script()
        s.reply(b"554 5.7.1 no service for you\r\n")
        self.assertEqual(s.transport.value(), b"QUIT\r\n")
        error = self.refused(s)
        self.assertFalse(error.transient)
        self.assertEqual(error.enhanced, "5.7.1")

    def test_greeting_421(self) -> None:
        """A 421 greeting (busy) is transient and the connection is closed."""
        s = Script()
        s.reply(b"421 4.3.2 busy\r\n")
        error = self.error(s.connecting)
        self.assertTrue(error.transient)
        self.assertEqual(error.reply, Reply(421, "4.3.2", "busy"))
        self.assertFalse(s.transport.connected)

    def test_greeting_timeout(self) -> None:
        """No greeting within 300 s: transient 4.4.2, connection dropped, no timer left."""
        s = Script()
        s.clock.advance(299)
        self.assertNoResult(s.connecting)
        s.clock.advance(1)
        error = self.error(s.connecting)
        self.assertEqual((error.transient, error.enhanced, error.reply), (True, "4.4.2", None))
        self.assertIn("greeting", str(error))
        self.assertTrue(s.transport.disconnected)
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_configurable_timeout(self) -> None:
        """The limits come from L{Timeouts}."""
        s = Script(timeouts=Timeouts(greeting=5))
        s.clock.advance(5)
        self.assertEqual(self.error(s.connecting).enhanced, "4.4.2")

    def test_connect_timeout(self) -> None:
        """A connection that is not made within 30 s is abandoned: 4.4.1."""

        @implementer(IStreamClientEndpoint)
        class Hanging:
            def __init__(self) -> None:
                self.cancelled = False

            def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
                def cancel(d: Deferred[Protocol]) -> None:
                    self.cancelled = True

                return Deferred(cancel)

        clock = Clock()
        endpoint = Hanging()
        d = Deferred.fromCoroutine(connect(clock, endpoint, helo=HELO))
        clock.advance(30)
        error = self.error(d)
        self.assertEqual((error.enhanced, error.transient), ("4.4.1", True))
        self.assertTrue(endpoint.cancelled)

    def test_connect_refused(self) -> None:
        """A refused connection is transient 4.4.1."""

        @implementer(IStreamClientEndpoint)
        class Refusing:
            def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
                return fail(ConnectionRefusedError())

        d = Deferred.fromCoroutine(connect(Clock(), Refusing(), helo=HELO))
        error = self.error(d)
        self.assertEqual((error.enhanced, error.transient), ("4.4.1", True))

    def test_bad_arguments(self) -> None:
        """A HELO name with a space, or require_auth without credentials, is refused."""
        endpoint = ScriptedEndpoint(LOCAL)
        arguments: list[dict[str, Any]] = [{"helo": "a b"}, {"helo": HELO, "require_auth": True}]
        for kwargs in arguments:
            d = Deferred.fromCoroutine(connect(Clock(), endpoint, **kwargs))
            self.failureResultOf(d, ValueError)
        self.assertIsNone(endpoint.protocol)

    def test_unsolicited_421(self) -> None:
        """
        A server that says 421 while the connection is idle makes it unusable;
        the next send fails transiently with that reply, sending nothing.
        """
        s, conn = self.open("PIPELINING")
        s.reply(b"421 4.4.2 mx.example.net idle too long\r\n")
        self.assertFalse(conn.usable)
        error = self.error(s.send(conn, transaction(self)))
        self.assertEqual(error.reply, Reply(421, "4.4.2", "mx.example.net idle too long"))
        self.assertTrue(error.transient)
        self.assertEqual(s.sent(), b"")


class TLSTests(ScriptedTestCase):
    context = object()

    def test_starttls(self) -> None:
        """
        When the server offers STARTTLS and a context is given, the client
        starts TLS with that context, says EHLO again and keeps only the
        extensions offered inside TLS.
        """
        s = Script(tls=ClientTLS(self.context))  # type: ignore[arg-type]
        s.reply(b"220 mx\r\n" + ehlo("STARTTLS", "PIPELINING"))
        self.assertEqual(s.sent(), b"EHLO client.example.org\r\nSTARTTLS\r\n")
        s.reply(b"220 2.0.0 Ready to start TLS\r\n")
        self.assertIs(s.transport.tls_context, self.context)
        self.assertEqual(s.sent(), b"EHLO client.example.org\r\n")
        s.reply(ehlo("PIPELINING", "AUTH PLAIN"))
        conn = self.successResultOf(s.connecting)
        self.assertTrue(conn.tls_active)
        self.assertEqual(conn.extensions, {"PIPELINING": None, "AUTH": "PLAIN"})

    def test_reply_injected_before_tls(self) -> None:
        """
        A reply sent in plaintext together with the 220 to STARTTLS is never
        taken for the EHLO reply inside TLS (CVE-2011-0411): the connection
        fails instead.
        """
        s = Script(tls=ClientTLS(self.context), require_tls=True)  # type: ignore[arg-type]
        s.reply(b"220 mx\r\n" + ehlo("STARTTLS"))
        s.sent()
        s.reply(b"220 2.0.0 Ready\r\n" + ehlo("PIPELINING", name="injected"))
        error = self.error(s.connecting)
        self.assertTrue(error.transient)
        self.assertIn("injected", str(error))
        self.assertTrue(s.transport.disconnected)

    def test_handshake_failure(self) -> None:
        """
        The connection lost during the handshake (a certificate that does not
        verify) is a transient 4.7.5 failure.
        """
        s = Script(tls=ClientTLS(self.context))  # type: ignore[arg-type]
        s.reply(b"220 mx\r\n" + ehlo("STARTTLS"))
        s.reply(b"220 2.0.0 Ready\r\n")
        s.lose()
        error = self.error(s.connecting)
        self.assertEqual((error.enhanced, error.transient, error.reply), ("4.7.5", True, None))

    def test_required_but_not_offered(self) -> None:
        """
        With require_tls, a server without STARTTLS is a transient 4.7.4
        failure and nothing but EHLO and QUIT is sent.
        """
        s = Script(tls=ClientTLS(self.context), require_tls=True)  # type: ignore[arg-type]
        s.reply(b"220 mx\r\n" + ehlo("PIPELINING"))
        self.assertEqual(s.transport.value(), b"EHLO client.example.org\r\nQUIT\r\n")
        error = self.refused(s)
        self.assertEqual((error.enhanced, error.transient), ("4.7.4", True))

    def test_implicit_tls(self) -> None:
        """
        Over an implicit TLS connection (port 465) the session counts as
        encrypted from the start: require_tls is met without STARTTLS, and
        AUTH may go to a remote peer.
        """
        s = Script(
            peer=IPv4Address("TCP", "192.0.2.7", 465),
            implicit_tls=True,
            require_tls=True,
            auth=("user", "pw"),
        )
        s.reply(b"220 mx\r\n" + ehlo("AUTH PLAIN"))
        self.assertIn(b"AUTH PLAIN ", s.sent())
        s.reply(b"235 2.7.0 ok\r\n")
        conn = self.successResultOf(s.connecting)
        self.assertTrue(conn.tls_active)

    def test_implicit_tls_handshake_failure(self) -> None:
        """
        An implicit TLS connection lost before the greeting (the handshake or
        certificate check failed) is 4.7.5; a greeting that does not come in
        time is still a plain timeout (4.4.2).
        """
        s = Script(implicit_tls=True)
        s.lose()
        self.assertEqual(self.error(s.connecting).enhanced, "4.7.5")
        s = Script(implicit_tls=True)
        s.clock.advance(300)
        self.assertEqual(self.error(s.connecting).enhanced, "4.4.2")

    def test_refused_starttls(self) -> None:
        """
        A refused STARTTLS continues in clear when TLS is optional, and is a
        transient 4.7.4 failure when it is required.
        """
        s = Script(tls=ClientTLS(self.context))  # type: ignore[arg-type]
        s.reply(b"220 mx\r\n" + ehlo("STARTTLS"))
        s.reply(b"454 4.7.0 TLS not available\r\n")
        conn = self.successResultOf(s.connecting)
        self.assertFalse(conn.tls_active)

        s = Script(tls=ClientTLS(self.context), require_tls=True)  # type: ignore[arg-type]
        s.reply(b"220 mx\r\n" + ehlo("STARTTLS"))
        s.reply(b"454 4.7.0 TLS not available\r\n")
        error = self.refused(s)
        self.assertEqual(
            (error.enhanced, error.reply), ("4.7.4", Reply(454, "4.7.0", "TLS not available"))
        )


class AuthTests(ScriptedTestCase):
    """
    AUTH, with the protocol trace on (the worst case for secrets: every
    command is logged).
    """

    password = "s3cret-Pa55"

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )

    def assertNoSecret(self, *texts: str) -> None:
        """Neither the password nor its base64 form is in the log or C{texts}."""
        secrets = [self.password, base64.b64encode(self.password.encode()).decode()]
        plain = base64.b64encode(b"\0user\0" + self.password.encode()).decode()
        logged = [formatEvent(e) + repr(e) for e in self.events]
        for text in [*logged, *texts]:
            for secret in [*secrets, plain]:
                self.assertNotIn(secret, text)

    def traced(self) -> list[str]:
        """The commands the protocol trace logged."""
        return [formatEvent(e) for e in self.events if e.get("log_format") == "C: {command}"]

    def test_plain(self) -> None:
        """AUTH PLAIN is used when offered, with the initial response; the log masks it."""
        s = Script(trace=True, auth=("user", self.password))
        s.reply(b"220 mx\r\n" + ehlo("AUTH LOGIN PLAIN"))
        token = base64.b64encode(b"\0user\0" + self.password.encode())
        self.assertEqual(s.sent(), b"EHLO client.example.org\r\nAUTH PLAIN " + token + b"\r\n")
        s.reply(b"235 2.7.0 Authentication successful\r\n")
        conn = self.successResultOf(s.connecting)
        self.assertTrue(conn.authenticated)
        self.assertEqual(self.traced(), ["C: EHLO client.example.org", "C: AUTH PLAIN ****"])
        self.assertNoSecret(repr(conn))

    def test_login(self) -> None:
        """AUTH LOGIN sends the user name and password in answer to the 334s."""
        s = Script(trace=True, auth=("user", self.password))
        s.reply(b"220 mx\r\n" + ehlo("AUTH LOGIN"))
        self.assertEqual(s.sent(), b"EHLO client.example.org\r\nAUTH LOGIN\r\n")
        s.reply(b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(s.sent(), b"dXNlcg==\r\n")
        s.reply(b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(s.sent(), base64.b64encode(self.password.encode()) + b"\r\n")
        s.reply(b"235 2.7.0 ok\r\n")
        self.assertTrue(self.successResultOf(s.connecting).authenticated)
        self.assertEqual(
            self.traced(), ["C: EHLO client.example.org", "C: AUTH LOGIN", "C: ****", "C: ****"]
        )
        self.assertNoSecret()

    def test_refused(self) -> None:
        """
        Wrong credentials are a transient failure (the configuration is at
        fault, not the message) with the server's reply, and no secret in it.
        """
        s = Script(trace=True, auth=("user", self.password))
        s.reply(b"220 mx\r\n" + ehlo("AUTH PLAIN"))
        s.reply(b"535 5.7.8 Authentication credentials invalid\r\n")
        error = self.refused(s)
        self.assertEqual(error.enhanced, "4.7.8")
        self.assertEqual(
            error.as_reply(),
            Reply(
                451,
                "4.7.8",
                "gsmail: authentication (PLAIN) failed "
                "(server said: 535 5.7.8 Authentication credentials invalid)",
            ),
        )
        self.assertEqual((error.transient, error.reply.code if error.reply else None), (True, 535))
        self.assertNoSecret(str(error), repr(error))

    def test_not_in_clear_over_the_network(self) -> None:
        """
        To a peer that is not this host, without TLS, the password is never
        sent: with require_auth the connection fails (4.7.10), without it the
        session goes on unauthenticated.
        """
        remote = IPv4Address("TCP", "192.0.2.7", 587)
        s = Script(trace=True, peer=remote, auth=("user", self.password), require_auth=True)
        s.reply(b"220 mx\r\n" + ehlo("AUTH PLAIN LOGIN"))
        self.assertEqual(s.transport.value(), b"EHLO client.example.org\r\nQUIT\r\n")
        error = self.refused(s)
        self.assertEqual((error.enhanced, error.transient), ("4.7.10", True))

        s = Script(trace=True, peer=remote, auth=("user", self.password))
        s.reply(b"220 mx\r\n" + ehlo("AUTH PLAIN LOGIN"))
        conn = self.successResultOf(s.connecting)
        self.assertFalse(conn.authenticated)
        self.assertEqual(s.sent(), b"EHLO client.example.org\r\n")

    def test_unix_socket_is_local(self) -> None:
        """A UNIX-socket peer is this host: AUTH may go without TLS."""
        s = Script(
            trace=True, peer=UNIXAddress("/run/submission.sock"), auth=("user", self.password)
        )
        s.reply(b"220 mx\r\n" + ehlo("AUTH PLAIN"))
        self.assertIn(b"AUTH PLAIN ", s.sent())

    def test_no_mechanism(self) -> None:
        """Neither PLAIN nor LOGIN offered: an error only with require_auth (4.7.0)."""
        s = Script(trace=True, auth=("user", self.password), require_auth=True)
        s.reply(b"220 mx\r\n" + ehlo("AUTH CRAM-MD5"))
        self.assertEqual(self.refused(s).enhanced, "4.7.0")
        s = Script(trace=True, auth=("user", self.password))
        s.reply(b"220 mx\r\n" + ehlo("PIPELINING"))
        self.assertFalse(self.successResultOf(s.connecting).authenticated)


class TraceTests(ScriptedTestCase):
    """The protocol trace (C{C:}/C{S:} debug events) is there only when asked for."""

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )

    def session(self, **kwargs: Any) -> None:
        """Connect, send one message, and quit."""
        s, conn = self.open("PIPELINING", **kwargs)
        d = s.send(conn, transaction(self))
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.stream()
        s.reply(b"250 2.0.0 queued\r\n")
        self.successResultOf(d)
        quitting = Deferred.fromCoroutine(conn.quit())
        s.reply(b"221 bye\r\n")
        self.successResultOf(quitting)

    def test_off_by_default(self) -> None:
        """
        A whole session without C{trace} logs no command and no reply: a
        daemon that writes every level (twistd) stays quiet and fast.
        """
        self.session()
        self.assertEqual(
            [e for e in self.events if e.get("log_format", "")[:3] in ("C: ", "S: ")], []
        )

    def test_on(self) -> None:
        """With C{trace}, every command and every reply is logged, in order."""
        self.session(trace=True)
        self.assertEqual(
            [formatEvent(e) for e in self.events],
            [
                "S: 220 mx.example.net ESMTP",
                "C: EHLO client.example.org",
                "S: 250 mx.example.net / PIPELINING",
                "C: MAIL FROM:<list@groups.example.com>",
                "C: RCPT TO:<a@example.org>",
                "C: DATA",
                "S: 250 ok",
                "S: 250 ok",
                "S: 354 go",
                "S: 250 2.0.0 queued",
                "C: QUIT",
                "S: 221 bye",
            ],
        )


# -- transactions ----------------------------------------------------------------


class SendTests(ScriptedTestCase):
    def test_pipelined(self) -> None:
        """
        With PIPELINING, MAIL, every RCPT and DATA go in one write; replies
        are matched in order; a refused recipient gets its RCPT reply and the
        others the reply after the final dot.
        """
        s, conn = self.open("PIPELINING", "SIZE 100000", "ENHANCEDSTATUSCODES")
        txn = transaction(
            self, ["a@example.org", "b@example.org", "c@example.org"], wire_size=len(BODY_WIRE)
        )
        d = s.send(conn, txn)
        self.assertEqual(
            s.sent(),
            b"MAIL FROM:<list@groups.example.com> SIZE=22\r\n"
            b"RCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n"
            b"DATA\r\n",
        )
        s.reply(
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 No such user\r\n250 2.1.5 Ok\r\n"
            b"354 End data with <CR><LF>.<CR><LF>\r\n"
        )
        s.stream()
        self.assertEqual(s.sent(), BODY_WIRE + b".\r\n")
        self.assertNoResult(d)
        s.reply(b"250 2.0.0 Ok: queued as 4B2F1\r\n")
        queued = Reply(250, "2.0.0", "Ok: queued as 4B2F1")
        self.assertEqual(
            self.successResultOf(d),
            TransactionResult(
                {
                    "a@example.org": queued,
                    "b@example.org": Reply(550, "5.1.1", "No such user"),
                    "c@example.org": queued,
                },
                Reply(250, "2.1.0", "Ok"),
                queued,
            ),
        )
        self.assertIdle(s, conn)

    def test_one_at_a_time(self) -> None:
        """Without PIPELINING each command waits for the previous reply."""
        s, conn = self.open("8BITMIME")
        d = s.send(conn, transaction(self, ["a@example.org", "b@example.org"]))
        self.assertEqual(s.sent(), b"MAIL FROM:<list@groups.example.com>\r\n")
        s.reply(b"250 ok\r\n")
        self.assertEqual(s.sent(), b"RCPT TO:<a@example.org>\r\n")
        s.reply(b"250 ok\r\n")
        self.assertEqual(s.sent(), b"RCPT TO:<b@example.org>\r\n")
        s.reply(b"250 ok\r\n")
        self.assertEqual(s.sent(), b"DATA\r\n")
        s.reply(b"354 go\r\n")
        s.stream()
        self.assertEqual(s.sent(), BODY_WIRE + b".\r\n")
        s.reply(b"250 queued\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.data_reply, Reply(250, "", "queued"))
        self.assertEqual(set(result.recipients.values()), {Reply(250, "", "queued")})

    def test_several_transactions(self) -> None:
        """
        Transactions follow each other on one connection without RSET when
        the previous one ended cleanly; a second send started meanwhile waits
        its turn.
        """
        s, conn = self.open("PIPELINING")
        first = s.send(conn, transaction(self, ["a@example.org"]))
        second = s.send(conn, transaction(self, ["b@example.org"], sender=""))
        self.assertEqual(
            s.sent(),
            b"MAIL FROM:<list@groups.example.com>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n",
        )
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.stream()
        s.sent()
        s.reply(b"250 first\r\n")
        self.assertEqual(self.successResultOf(first).data_reply, Reply(250, "", "first"))
        self.assertEqual(s.sent(), b"MAIL FROM:<>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.stream()
        s.reply(b"250 second\r\n")
        self.assertEqual(self.successResultOf(second).data_reply, Reply(250, "", "second"))

    def test_duplicate_recipients(self) -> None:
        """A recipient listed twice is sent one RCPT."""
        s, conn = self.open("PIPELINING")
        s.send(conn, transaction(self, ["a@example.org", "a@example.org"]))
        self.assertEqual(s.sent().count(b"RCPT TO:<a@example.org>"), 1)

    def test_mail_refused(self) -> None:
        """
        A refused MAIL answers for every recipient, no data is sent, and the
        next transaction needs no RSET.
        """
        s, conn = self.open("PIPELINING")
        d = s.send(conn, transaction(self, ["a@example.org", "b@example.org"]))
        s.sent()
        s.reply(
            b"550 5.7.1 Sender rejected\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
            b"503 5.5.1 need MAIL\r\n"
        )
        refused = Reply(550, "5.7.1", "Sender rejected")
        self.assertEqual(
            self.successResultOf(d),
            TransactionResult({"a@example.org": refused, "b@example.org": refused}, refused, None),
        )
        s.send(conn, transaction(self))
        self.assertTrue(s.sent().startswith(b"MAIL FROM:"))

    def test_mail_transient_one_at_a_time(self) -> None:
        """Without PIPELINING a 4xx to MAIL stops the transaction before any RCPT."""
        s, conn = self.open()
        d = s.send(conn, transaction(self, ["a@example.org"]))
        s.sent()
        s.reply(b"451 4.3.0 try again\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.recipients, {"a@example.org": Reply(451, "4.3.0", "try again")})
        self.assertEqual(s.sent(), b"")

    def test_no_recipient_accepted(self) -> None:
        """
        When every recipient is refused no data is sent, data_reply is None,
        and the next transaction starts with RSET (pipelined with it).
        """
        s, conn = self.open("PIPELINING")
        d = s.send(conn, transaction(self, ["a@example.org"]))
        s.sent()
        s.reply(b"250 ok\r\n450 4.2.0 greylisted\r\n554 5.5.1 no valid recipients\r\n")
        result = self.successResultOf(d)
        self.assertEqual(
            result,
            TransactionResult(
                {"a@example.org": Reply(450, "4.2.0", "greylisted")}, Reply(250, "", "ok"), None
            ),
        )
        self.assertEqual(s.sent(), b"")
        d = s.send(conn, transaction(self, ["b@example.org"]))
        self.assertEqual(
            s.sent(),
            b"RSET\r\nMAIL FROM:<list@groups.example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n",
        )
        s.reply(b"250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        s.stream()
        s.reply(b"250 done\r\n")
        self.assertEqual(self.successResultOf(d).data_reply, Reply(250, "", "done"))

    def test_no_recipient_accepted_one_at_a_time(self) -> None:
        """Without PIPELINING, no DATA is sent when no recipient was accepted."""
        s, conn = self.open()
        d = s.send(conn, transaction(self, ["a@example.org"]))
        s.reply(b"250 ok\r\n")
        s.reply(b"550 5.1.1 unknown\r\n")
        self.assertIsNone(self.successResultOf(d).data_reply)
        self.assertEqual(
            s.sent(), b"MAIL FROM:<list@groups.example.com>\r\nRCPT TO:<a@example.org>\r\n"
        )
        s.send(conn, transaction(self))
        self.assertEqual(s.sent(), b"RSET\r\n")

    def test_354_without_recipients(self) -> None:
        """
        A server that answers the pipelined DATA with 354 although no
        recipient was accepted gets an empty message, never the real one.
        """
        s, conn = self.open("PIPELINING")
        d = s.send(conn, transaction(self, ["a@example.org"]))
        s.sent()
        s.reply(b"250 ok\r\n550 5.1.1 unknown\r\n354 go ahead\r\n")
        self.assertEqual(s.sent(), b".\r\n")
        s.reply(b"554 5.5.1 no recipients\r\n")
        self.assertIsNone(self.successResultOf(d).data_reply)

    def test_rset_refused(self) -> None:
        """A server that refuses RSET is not trusted with the next transaction."""
        s, conn = self.open()
        s.send(conn, transaction(self))
        s.reply(b"250 ok\r\n550 5.1.1 unknown\r\n")
        s.sent()
        d = s.send(conn, transaction(self))
        self.assertEqual(s.sent(), b"RSET\r\n")
        s.reply(b"502 5.5.1 no RSET here\r\n")
        error = self.error(d)
        self.assertEqual(
            (error.transient, error.reply), (True, Reply(502, "5.5.1", "no RSET here"))
        )
        self.assertEqual(s.sent(), b"")
        self.assertFalse(conn.usable)

    def test_data_refused(self) -> None:
        """A refused DATA answers for every accepted recipient; RSET follows."""
        s, conn = self.open()
        d = s.send(conn, transaction(self, ["a@example.org", "b@example.org"]))
        s.reply(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n")
        s.reply(b"451 4.3.0 no space\r\n")
        refused = Reply(451, "4.3.0", "no space")
        self.assertEqual(
            self.successResultOf(d).recipients,
            {"a@example.org": refused, "b@example.org": Reply(550, "5.1.1", "unknown")},
        )
        s.sent()
        s.send(conn, transaction(self))
        self.assertEqual(s.sent(), b"RSET\r\n")

    def test_final_reply_refusal(self) -> None:
        """A 5xx after the final dot is every accepted recipient's outcome."""
        s, conn = self.open("PIPELINING")
        d = s.send(conn, transaction(self, ["a@example.org"]))
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.stream()
        s.reply(b"554 5.7.1 spam\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.recipients, {"a@example.org": Reply(554, "5.7.1", "spam")})
        s.sent()
        s.send(conn, transaction(self))
        self.assertTrue(s.sent().startswith(b"MAIL"))

    def test_421_to_rcpt(self) -> None:
        """
        A 421 anywhere ends the session: the send fails transiently with that
        reply, the connection is closed and unusable.
        """
        s, conn = self.open("PIPELINING")
        d = s.send(conn, transaction(self, ["a@example.org", "b@example.org"]))
        s.reply(b"250 ok\r\n250 ok\r\n421 4.7.0 too many errors\r\n")
        error = self.error(d)
        self.assertEqual((error.transient, error.after_data), (True, False))
        self.assertEqual(error.reply, Reply(421, "4.7.0", "too many errors"))
        self.assertEqual(error.as_reply(), error.reply)
        self.assertFalse(conn.usable)
        self.assertFalse(s.transport.connected)
        later = self.error(s.send(conn, transaction(self)))
        self.assertTrue(later.transient)
        self.assertFalse(later.after_data)

    def test_mail_parameters_offered(self) -> None:
        """
        SIZE, BODY=8BITMIME, XVERP and the DSN parameters are sent when the
        server offers their extensions and the transaction wants them.
        """
        s, conn = self.open("SIZE 1000000", "8BITMIME", "XVERP", "DSN")
        s.send(
            conn,
            transaction(
                self,
                params={"BODY": "8BITMIME", "XVERP": None, "RET": "HDRS", "ENVID": "q123"},
                wire_size=22,
            ),
        )
        self.assertEqual(
            s.sent(),
            b"MAIL FROM:<list@groups.example.com> SIZE=22 BODY=8BITMIME XVERP RET=HDRS "
            b"ENVID=q123\r\n",
        )

    def test_mail_parameters_not_offered(self) -> None:
        """Parameters of extensions the server does not offer are left out."""
        s, conn = self.open("PIPELINING")
        s.send(conn, transaction(self, params={"BODY": "8BITMIME", "XVERP": None, "RET": "FULL"}))
        self.assertTrue(s.sent().startswith(b"MAIL FROM:<list@groups.example.com>\r\n"))

    def test_rcpt_parameters_offered(self) -> None:
        """
        NOTIFY and ORCPT go on each recipient's RCPT when the server offers
        DSN (RFC 3461 §4); a recipient without them gets a bare RCPT.
        """
        s, conn = self.open("PIPELINING", "DSN")
        s.send(
            conn,
            transaction(
                self,
                ["a@example.org", "b@example.org"],
                rcpt_params={
                    "a@example.org": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;a+2Bx@ex.org"}
                },
            ),
        )
        self.assertEqual(
            s.sent(),
            b"MAIL FROM:<list@groups.example.com>\r\n"
            b"RCPT TO:<a@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Bx@ex.org\r\n"
            b"RCPT TO:<b@example.org>\r\nDATA\r\n",
        )

    def test_rcpt_parameters_not_offered(self) -> None:
        """Without DSN at the server, RCPT carries no NOTIFY or ORCPT."""
        s, conn = self.open("PIPELINING")
        s.send(conn, transaction(self, rcpt_params={"a@example.org": {"NOTIFY": "NEVER"}}))
        self.assertEqual(
            s.sent(),
            b"MAIL FROM:<list@groups.example.com>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n",
        )

    def test_size_estimate(self) -> None:
        """Without the exact wire size, SIZE over-estimates the LF file's size a little."""
        s, conn = self.open("SIZE")
        s.send(conn, transaction(self, data=b"x" * 3199 + b"\n"))
        self.assertEqual(s.sent(), b"MAIL FROM:<list@groups.example.com> SIZE=3302\r\n")

    def test_smtputf8(self) -> None:
        """
        A UTF-8 address makes the client declare SMTPUTF8 and send the
        addresses as UTF-8.
        """
        s, conn = self.open("PIPELINING", "SMTPUTF8")
        s.send(conn, transaction(self, ["jörg@exämple.org"]))
        self.assertEqual(
            s.sent(),
            "MAIL FROM:<list@groups.example.com> SMTPUTF8\r\nRCPT TO:<jörg@exämple.org>\r\n"
            "DATA\r\n".encode(),
        )

    def test_smtputf8_not_offered(self) -> None:
        """
        A message that needs SMTPUTF8 is not sent to a server without it
        (RFC 6531 §3.2): every recipient gets a permanent 5.6.7, the
        connection stays usable.
        """
        s, conn = self.open("PIPELINING")
        for txn in [
            transaction(self, ["jörg@example.org"]),
            transaction(self, params={"SMTPUTF8": None}),
        ]:
            result = self.successResultOf(s.send(conn, txn))
            self.assertEqual(set(result.recipients.values()), {SMTPUTF8_UNSUPPORTED})
            self.assertTrue(SMTPUTF8_UNSUPPORTED.is_permanent)
            self.assertEqual(SMTPUTF8_UNSUPPORTED.enhanced, "5.6.7")
        self.assertEqual(s.sent(), b"")
        self.assertTrue(conn.usable)

    def test_bad_transactions(self) -> None:
        """
        An address that is not a mailbox (which could inject a command), no
        recipients, or an unknown parameter raise ValueError and send nothing.
        """
        s, conn = self.open("PIPELINING", "DSN")
        for txn in [
            transaction(self, ["a@example.org>\r\nRCPT TO:<b@example.org"]),
            transaction(self, sender="x\r\n@example.org"),
            transaction(self, []),
            transaction(self, params={"NOTIFY": "NEVER"}),
            transaction(self, params={"ENVID": "a b"}),
            transaction(self, rcpt_params={"a@example.org": {"RET": "FULL"}}),
            transaction(self, rcpt_params={"a@example.org": {"NOTIFY": "NEVER\r\nDATA"}}),
        ]:
            self.failureResultOf(s.send(conn, txn), ValueError)
        self.assertEqual(s.sent(), b"")
        self.assertTrue(conn.usable)

    def test_checked_transactions(self) -> None:
        """
        A transaction whose caller vouches for its addresses (C{checked},
        as the outbound delivery does for the VERP senders it makes) is sent
        without parsing them again; its parameters are still checked.
        """
        s, conn = self.open("PIPELINING", "DSN")
        long_local = "x" * 70 + "@example.org"  # over 64 octets: parse_mailbox refuses it
        self.failureResultOf(s.send(conn, transaction(self, sender=long_local)), ValueError)
        bad = transaction(self, sender=long_local, params={"NOTIFY": "NEVER"}, checked=True)
        self.failureResultOf(s.send(conn, bad), ValueError)
        self.assertEqual(s.sent(), b"")
        s.send(conn, transaction(self, sender=long_local, checked=True))
        self.assertEqual(s.sent().split(b"\r\n")[0], f"MAIL FROM:<{long_local}>".encode())


class AnnouncedTransactionTests(ScriptedTestCase):
    """
    C{send(t, then=next)}: the next transaction's commands go out with this
    message's data (RFC 2920 §3.1), its data only with C{send(next)}.
    """

    def test_one_write_per_message(self) -> None:
        """
        The first message's data, its final dot and the next transaction's
        MAIL, RCPT and DATA leave in one write; the next message's data
        leaves only when it is sent, in one write too; each gets its own
        result.
        """
        s, conn = self.open("PIPELINING")
        first = transaction(self, ["a@example.org"])
        then = transaction(self, ["b@example.org"], sender="list+b=example.org@groups.example.com")
        d = Deferred.fromCoroutine(conn.send(first, then=then))
        self.assertEqual(
            s.sent(), b"MAIL FROM:<list@groups.example.com>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n"
        )
        s.reply(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        self.assertEqual(
            s.sent(),
            BODY_WIRE + b".\r\nMAIL FROM:<list+b=example.org@groups.example.com>\r\n"
            b"RCPT TO:<b@example.org>\r\nDATA\r\n",
        )
        s.reply(b"250 2.0.0 first queued\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.data_reply, Reply(250, "2.0.0", "first queued"))
        self.assertEqual(s.sent(), b"")  # nothing of the next message yet
        d = s.send(conn, then)
        self.assertEqual(s.sent(), BODY_WIRE + b".\r\n")
        s.reply(b"250 2.0.0 second queued\r\n")
        self.assertEqual(
            self.successResultOf(d).recipients,
            {"b@example.org": Reply(250, "2.0.0", "second queued")},
        )
        self.assertIdle(s, conn)

    def test_writes(self) -> None:
        """Two messages, the second announced, take three writes in all."""
        s, conn = self.open("PIPELINING")
        writes: list[bytes] = []
        original = s.transport.write

        def write(data: bytes) -> None:
            writes.append(data)
            original(data)

        self.patch(s.transport, "write", write)
        first, then = transaction(self), transaction(self, ["b@example.org"])
        d = Deferred.fromCoroutine(conn.send(first, then=then))
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        self.successResultOf(d)
        d = s.send(conn, then)
        s.reply(b"250 ok\r\n")
        self.successResultOf(d)
        self.assertEqual(len(writes), 3)

    def test_refused_next_transaction(self) -> None:
        """
        A refusal of the announced transaction's recipient belongs to that
        transaction: the first is delivered, the second has its RCPT reply.
        """
        s, conn = self.open("PIPELINING")
        first, then = transaction(self), transaction(self, ["b@example.org"])
        d = Deferred.fromCoroutine(conn.send(first, then=then))
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.reply(
            b"250 2.0.0 queued\r\n250 ok\r\n550 5.1.1 No such user\r\n554 5.5.1 No recipients\r\n"
        )
        self.assertEqual(self.successResultOf(d).data_reply, Reply(250, "2.0.0", "queued"))
        result = self.successResultOf(s.send(conn, then))
        self.assertEqual(result.recipients, {"b@example.org": Reply(550, "5.1.1", "No such user")})
        self.assertTrue(conn.usable)

    def test_other_transaction_refused(self) -> None:
        """
        Sending another transaction than the announced one raises
        C{ValueError} and drops the connection: the server waits for the
        announced message's data, and nothing else may be taken for it.
        """
        s, conn = self.open("PIPELINING")
        first, then = transaction(self), transaction(self, ["b@example.org"])
        d = Deferred.fromCoroutine(conn.send(first, then=then))
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        self.successResultOf(d)
        s.sent()
        self.failureResultOf(s.send(conn, transaction(self, ["c@example.org"])), ValueError)
        self.assertEqual(s.sent(), b"")
        self.assertFalse(conn.usable)
        self.assertTrue(s.transport.disconnected)

    def test_quit_after_announcing(self) -> None:
        """
        Quitting with an announced transaction not sent closes the
        connection without QUIT (it would be taken for message text), so the
        announced message is never delivered.
        """
        s, conn = self.open("PIPELINING")
        first, then = transaction(self), transaction(self, ["b@example.org"])
        d = Deferred.fromCoroutine(conn.send(first, then=then))
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        self.successResultOf(d)
        s.sent()
        self.successResultOf(Deferred.fromCoroutine(conn.quit()))
        self.assertEqual(s.sent(), b"")
        self.assertFalse(s.transport.connected)
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_not_without_pipelining(self) -> None:
        """Without PIPELINING nothing is announced: the next send starts with MAIL."""
        s, conn = self.open("8BITMIME")
        first, then = transaction(self), transaction(self, ["b@example.org"])
        d = Deferred.fromCoroutine(conn.send(first, then=then))
        for reply in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            s.reply(reply)
        self.assertEqual(s.sent()[-len(BODY_WIRE) - 3 :], BODY_WIRE + b".\r\n")
        s.reply(b"250 ok\r\n")
        self.successResultOf(d)
        s.send(conn, then)
        self.assertEqual(s.sent(), b"MAIL FROM:<list@groups.example.com>\r\n")

    def test_data_in_memory(self) -> None:
        """
        A transaction that carries its message (C{data}) is sent without
        reading C{data_path}, and the same bytes object is encoded once for
        the transactions that follow.
        """
        s, conn = self.open("PIPELINING")
        opened: list[str] = []
        self.patch(conn, "_open_message", opened.append)
        encoded: list[bytes] = []
        original = DataEncoder.encode

        def encode(encoder: DataEncoder, chunk: bytes) -> bytes:
            encoded.append(chunk)
            return original(encoder, chunk)

        self.patch(DataEncoder, "encode", encode)
        data = b"Subject: hi\n\n.dot\n"
        for recipient in ("a@example.org", "b@example.org"):
            txn = Transaction(LIST, [recipient], "/nonexistent", len(data), data=data)
            d = s.send(conn, txn)
            s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
            self.assertEqual(s.sent().split(b"DATA\r\n")[-1], b"Subject: hi\r\n\r\n..dot\r\n.\r\n")
            s.reply(b"250 ok\r\n")
            self.successResultOf(d)
        self.assertEqual((opened, encoded), ([], [data]))

    def test_data_of_wrong_size(self) -> None:
        """C{data} that is not C{size} bytes is refused before anything is sent."""
        s, conn = self.open("PIPELINING")
        txn = Transaction(LIST, ["a@example.org"], "/nonexistent", 5, data=b"four")
        self.failureResultOf(s.send(conn, txn), ValueError)
        self.assertEqual(s.sent(), b"")
        self.assertTrue(conn.usable)


class DataTimeoutAndLossTests(ScriptedTestCase):
    """Timeouts at each stage (RFC 5321 §4.5.3.2) and lost connections."""

    def start(
        self, *keywords: str, data: bytes = BODY, **kwargs: Any
    ) -> tuple[Script, Deferred[TransactionResult]]:
        s, conn = self.open(*keywords, **kwargs)
        d = s.send(conn, transaction(self, ["a@example.org"], data=data))
        s.sent()
        return s, d

    def assertTimesOut(
        self, s: Script, d: Deferred[Any], seconds: float, after_data: bool
    ) -> SMTPClientError:
        s.clock.advance(seconds - 1)
        self.assertNoResult(d)
        s.clock.advance(1)
        error = self.error(d)
        self.assertEqual(
            (error.transient, error.enhanced, error.after_data, error.reply),
            (True, "4.4.2", after_data, None),
        )
        self.assertTrue(s.transport.disconnected)
        self.assertEqual(s.clock.getDelayedCalls(), [])
        # What the caller records for the recipients: gsmail's own 4.4.2.
        self.assertEqual(error.as_reply().code, 451)
        self.assertEqual(error.as_reply().enhanced, "4.4.2")
        return error

    def test_mail_timeout(self) -> None:
        """No reply to MAIL within 300 s."""
        s, d = self.start()
        self.assertTimesOut(s, d, 300, after_data=False)

    def test_rcpt_timeout(self) -> None:
        """No reply to RCPT within 300 s."""
        s, d = self.start()
        s.reply(b"250 ok\r\n")
        self.assertTimesOut(s, d, 300, after_data=False)

    def test_each_wait_has_its_own_limit(self) -> None:
        """
        A reply that comes just in time starts the next wait afresh: the
        next reply gets its own full limit (300 s for RCPT), counted from
        then, not from the first wait.
        """
        s, d = self.start()
        s.clock.advance(299)
        s.reply(b"250 ok\r\n")  # MAIL, one second before its limit
        self.assertEqual(s.sent(), b"RCPT TO:<a@example.org>\r\n")
        self.assertTimesOut(s, d, 300, after_data=False)

    def test_shorter_limit_after_longer(self) -> None:
        """
        A wait with a shorter limit than the one before it (120 s for the
        DATA reply after 300 s for RCPT) times out after its own limit.
        """
        s, d = self.start()
        s.reply(b"250 ok\r\n")
        s.clock.advance(10)
        s.reply(b"250 ok\r\n")  # RCPT; now DATA, 120 s
        self.assertEqual(s.sent(), b"RCPT TO:<a@example.org>\r\nDATA\r\n")
        self.assertTimesOut(s, d, 120, after_data=False)

    def test_idle_between_transactions(self) -> None:
        """
        A connection with nothing to wait for is never timed out, however
        long it stays idle after a transaction, and leaves no timer behind.
        """
        s, conn = self.open("PIPELINING")
        d = s.send(conn, transaction(self, ["a@example.org"]))
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.stream()
        s.clock.advance(500)
        s.reply(b"250 queued\r\n")
        self.assertEqual(self.successResultOf(d).data_reply, Reply(250, "", "queued"))
        self.assertIdle(s, conn)
        self.assertIdle(s, conn)

    def test_data_init_timeout(self) -> None:
        """No reply to DATA within 120 s."""
        s, d = self.start("PIPELINING")
        s.reply(b"250 ok\r\n250 ok\r\n")
        self.assertTimesOut(s, d, 120, after_data=False)

    def test_streamed_in_chunks(self) -> None:
        """
        The message is read one chunk per pull of the transport, never whole:
        nothing more is sent until the transport asks for it.
        """
        s, d = self.start("PIPELINING", data=b"x" * 25 + b"\n", chunk_size=10)
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(s.sent(), b"")
        written = []
        for _ in range(4):
            s.pull()
            written.append(s.sent())
        self.assertEqual(written, [b"x" * 10, b"x" * 10, b"xxxxx\r\n", b".\r\n"])
        self.assertIsNone(s.transport.producer)
        s.reply(b"250 ok\r\n")
        self.assertEqual(self.successResultOf(d).data_reply, Reply(250, "", "ok"))

    def test_data_block_timeout(self) -> None:
        """
        The server stops taking data: after 180 s without progress the client
        gives up, and the final dot was never sent.
        """
        s, d = self.start("PIPELINING", data=b"x" * 100 + b"\n", chunk_size=10)
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.pull(3)
        s.clock.advance(179)
        s.pull(1)  # progress resets the limit
        self.assertTimesOut(s, d, 180, after_data=False)
        self.assertNotIn(b"\r\n.\r\n", s.sent())

    def test_final_reply_timeout(self) -> None:
        """
        No reply within 600 s after the final dot: transient, after_data set
        (the server may have taken the message), no reply.
        """
        s, d = self.start("PIPELINING")
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.stream()
        error = self.assertTimesOut(s, d, 600, after_data=True)
        self.assertIn("may have been delivered", str(error))

    def test_loss_after_dot(self) -> None:
        """A connection lost after the final dot: transient, after_data, no reply."""
        s, d = self.start("PIPELINING")
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.stream()
        s.lose()
        error = self.error(d)
        self.assertEqual((error.transient, error.after_data, error.reply), (True, True, None))
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_loss_during_data(self) -> None:
        """A connection lost before the final dot went out is not after_data."""
        s, d = self.start("PIPELINING", data=b"x" * 100 + b"\n", chunk_size=10)
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.pull(2)
        s.lose()
        error = self.error(d)
        self.assertEqual((error.transient, error.after_data), (True, False))
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_reply_during_data(self) -> None:
        """
        A server that refuses the message while it is still being sent (552
        too big) stops the data, the dot is never sent, the reply is the
        recipients' outcome, and the connection is dropped.
        """
        s, d = self.start("PIPELINING", data=b"x" * 100 + b"\n", chunk_size=10)
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.pull(2)
        s.reply(b"552 5.3.4 Message too big\r\n")
        result = self.successResultOf(d)
        self.assertEqual(
            result.recipients, {"a@example.org": Reply(552, "5.3.4", "Message too big")}
        )
        self.assertIsNone(s.transport.producer)
        self.assertNotIn(b"\r\n.\r\n", s.sent())
        self.assertTrue(s.transport.disconnected)
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_file_truncated(self) -> None:
        """
        A message file that shrinks while it is sent is never ended with a
        dot (that would deliver a damaged message): transient 4.3.0, and the
        connection is dropped.
        """
        s, conn = self.open("PIPELINING", chunk_size=10)
        txn = transaction(self, ["a@example.org"], data=b"x" * 100 + b"\n")
        d = s.send(conn, txn)
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.pull(2)
        with open(txn.data_path, "r+b") as f:
            f.truncate(30)
        s.stream()
        error = self.error(d)
        self.assertEqual(
            (error.enhanced, error.transient, error.after_data), ("4.3.0", True, False)
        )
        self.assertNotIn(b"\r\n.\r\n", s.sent())
        self.assertTrue(s.transport.disconnected)

    def test_read_error(self) -> None:
        """A read error mid-message: transient 4.3.0, no final dot."""

        class Failing:
            def __init__(self) -> None:
                self.reads = 0

            def read(self, n: int) -> bytes:
                self.reads += 1
                if self.reads > 1:
                    raise OSError(5, "Input/output error")
                return b"x" * n

            def close(self) -> None:
                pass

        s, conn = self.open("PIPELINING", chunk_size=10)
        self.patch(conn, "_open_message", lambda path: Failing())
        d = s.send(conn, transaction(self, data=b"x" * 100))
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.stream()
        error = self.error(d)
        self.assertEqual((error.enhanced, error.after_data), ("4.3.0", False))
        self.assertIn("Input/output error", str(error))
        self.assertNotIn(b".\r\n", s.sent())

    def test_abort(self) -> None:
        """Aborting the connection fails a pending send transiently."""
        s, conn = self.open("PIPELINING")
        d = s.send(conn, transaction(self))
        conn.abort()
        self.assertTrue(self.error(d).transient)
        self.assertTrue(s.transport.disconnected)
        self.assertFalse(conn.usable)

    def test_cancel(self) -> None:
        """Cancelling a send drops the connection: its state is unknown."""
        s, conn = self.open("PIPELINING")
        d = s.send(conn, transaction(self))
        d.cancel()
        self.failureResultOf(d)
        self.assertFalse(conn.usable)
        self.assertTrue(s.transport.disconnected)
        self.assertEqual(s.clock.getDelayedCalls(), [])


class QuitTests(ScriptedTestCase):
    def test_quit(self) -> None:
        """QUIT is sent, and quit() returns once the connection is closed."""
        s, conn = self.open()
        d = Deferred.fromCoroutine(conn.quit())
        self.assertEqual(s.sent(), b"QUIT\r\n")
        s.reply(b"221 2.0.0 Bye\r\n")
        self.successResultOf(d)
        self.assertFalse(s.transport.connected)
        self.assertFalse(conn.usable)
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_quit_unanswered(self) -> None:
        """A server that never answers QUIT is dropped after 60 s."""
        s, conn = self.open()
        d = Deferred.fromCoroutine(conn.quit())
        s.clock.advance(60)
        self.successResultOf(d)
        self.assertTrue(s.transport.disconnected)

    def test_quit_after_failure(self) -> None:
        """After a failure quit() sends nothing and still returns."""
        s, conn = self.open()
        s.reply(b"421 4.4.2 bye\r\n")
        self.successResultOf(Deferred.fromCoroutine(conn.quit()))
        self.assertEqual(s.sent(), b"")


class LMTPTests(ScriptedTestCase):
    def test_per_recipient_replies(self) -> None:
        """
        Over LMTP the client says LHLO and reads one reply per accepted
        recipient after the final dot; each recipient gets its own.
        """
        s = Script(lmtp=True)
        s.reply(b"220 lmtp.example.net LMTP\r\n")
        self.assertEqual(s.sent(), b"LHLO client.example.org\r\n")
        s.reply(ehlo("PIPELINING", "ENHANCEDSTATUSCODES"))
        conn = self.successResultOf(s.connecting)
        d = s.send(conn, transaction(self, ["a@example.org", "b@example.org", "c@example.org"]))
        s.reply(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n354 go\r\n")
        s.stream()
        s.reply(b"250 2.0.0 delivered\r\n")
        self.assertNoResult(d)
        s.reply(b"452 4.2.2 mailbox full\r\n")
        full = Reply(452, "4.2.2", "mailbox full")
        self.assertEqual(
            self.successResultOf(d),
            TransactionResult(
                {
                    "a@example.org": Reply(250, "2.0.0", "delivered"),
                    "b@example.org": Reply(550, "5.1.1", "unknown"),
                    "c@example.org": full,
                },
                Reply(250, "", "ok"),
                full,
            ),
        )

    def test_loss_between_replies(self) -> None:
        """A loss after some LMTP replies: after_data, with the replies that came."""
        s = Script(lmtp=True)
        s.reply(b"220 lmtp\r\n" + ehlo("PIPELINING"))
        conn = self.successResultOf(s.connecting)
        d = s.send(conn, transaction(self, ["a@example.org", "b@example.org"]))
        s.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        s.stream()
        s.reply(b"250 2.0.0 delivered\r\n")
        s.lose()
        error = self.error(d)
        self.assertTrue(error.after_data)
        self.assertEqual(error.partial, {"a@example.org": Reply(250, "2.0.0", "delivered")})


# -- in memory, against a server that decodes DATA ---------------------------------


class RecordingServer(Protocol):
    """
    A small SMTP server: EHLO offers C{keywords}; every RCPT is accepted
    unless listed in C{refuse}; each transaction is recorded with its data
    decoded as a receiver does (a lone "." ends it; one leading "." is
    removed; lines end CRLF). Body lines are only ever read as data, so a
    desynchronised client shows up as 500 replies and missing messages.
    """

    def __init__(self, keywords: Sequence[str] = ("PIPELINING", "8BITMIME", "SIZE 100000000")):
        self.keywords = list(keywords)
        self.refuse: set[str] = set()
        self.transactions: list[dict[str, Any]] = []
        self.unknown: list[bytes] = []
        self.raw = b""
        self._buffer = b""
        self._current: dict[str, Any] | None = None
        self._data: list[bytes] | None = None

    def connectionMade(self) -> None:
        self.transport.write(b"220 sink.example.net ESMTP\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        self._buffer += data
        while True:
            line, sep, rest = self._buffer.partition(b"\r\n")
            if not sep:
                return
            self._buffer = rest
            if self._data is None:
                self.command(line)
            elif line == b".":
                assert self._current is not None
                self._current["data"] = b"".join(x + b"\r\n" for x in self._data)
                self.transactions.append(self._current)
                self._current = self._data = None
                self.write(b"250 2.0.0 queued\r\n")
            else:
                self._data.append(line[1:] if line.startswith(b".") else line)

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def command(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.write(ehlo(*self.keywords, name="sink.example.net"))
        elif verb == b"MAIL":
            self._current = {"mail": line, "rcpts": []}
            self.write(b"250 2.1.0 ok\r\n")
        elif verb == b"RCPT" and self._current is not None:
            address = line[9:-1].decode()
            if address in self.refuse:
                self.write(b"550 5.1.1 unknown\r\n")
            else:
                self._current["rcpts"].append(address)
                self.write(b"250 2.1.5 ok\r\n")
        elif verb == b"DATA" and self._current and self._current["rcpts"]:
            self._data = []
            self.write(b"354 go ahead\r\n")
        elif verb == b"RSET":
            self._current = None
            self.write(b"250 2.0.0 ok\r\n")
        elif verb == b"QUIT":
            self.write(b"221 2.0.0 bye\r\n")
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.unknown.append(line)
            self.write(b"503 5.5.1 bad sequence\r\n")


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects the client to a server protocol through an L{iosim} pump."""

    def __init__(self, server: Protocol, clock: Clock) -> None:
        self.server = server
        self.clock = clock
        self.pump: iosim.IOPump | None = None

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 25))
        assert isinstance(protocol, Protocol)
        self.pump = iosim.connect(
            self.server,
            iosim.makeFakeServer(self.server),
            protocol,
            iosim.makeFakeClient(protocol),
            greet=False,
            clock=self.clock,
        )
        return succeed(protocol)


class InMemoryTests(SynchronousTestCase):
    """The bytes a receiving server decodes, chunk boundaries included."""

    def run_until(self, endpoint: MemoryEndpoint, d: Deferred[Any]) -> Any:
        assert endpoint.pump is not None
        for _ in range(100_000):
            if d.called:
                break
            endpoint.pump.pump()
        return self.successResultOf(d)

    def deliver(
        self, messages: Sequence[bytes], chunk_size: int = client.CHUNK_SIZE
    ) -> RecordingServer:
        """Send each message in its own transaction on one connection."""
        server = RecordingServer()
        clock = Clock()
        endpoint = MemoryEndpoint(server, clock)
        d = Deferred.fromCoroutine(
            connect(clock, endpoint, helo=HELO, clock=clock, chunk_size=chunk_size)
        )
        conn = self.run_until(endpoint, d)
        for i, data in enumerate(messages):
            txn = transaction(self, [f"r{i}@example.org"], data=data)
            result = self.run_until(endpoint, Deferred.fromCoroutine(conn.send(txn)))
            self.assertEqual(result.data_reply, Reply(250, "2.0.0", "queued"))
        self.run_until(endpoint, Deferred.fromCoroutine(conn.quit()))
        self.assertEqual(server.unknown, [])
        self.assertEqual(clock.getDelayedCalls(), [])
        return server

    def assertReceived(
        self, messages: Sequence[bytes], chunk_size: int = client.CHUNK_SIZE
    ) -> None:
        """Each message reaches the server as L{normalise} says, in order."""
        server = self.deliver(messages, chunk_size)
        self.assertEqual(len(server.transactions), len(messages))
        for transaction_, message in zip(server.transactions, messages, strict=True):
            assertSameBytes(self, transaction_["data"], normalise(message))
        self.assertNotIn(b"\r\r\n", server.raw)

    def test_dot_at_16k_boundary(self) -> None:
        """A line starting with "." exactly at a 16 KiB read boundary arrives intact."""
        data = b"Subject: x\n\n" + b"a" * (16384 - 13) + b"\n.starts here\n..two\n.\nend\n"
        self.assertEqual(data[16384:16385], b".")
        self.assertReceived([data], chunk_size=16384)

    def test_dot_at_64k_boundary(self) -> None:
        """The same at the default 64 KiB boundary, in a CRLF file."""
        head = b"Subject: x\r\n\r\n"
        data = head + b"b" * (65536 - len(head) - 2) + b"\r\n.\r\n.tail\r\n"
        self.assertEqual(data[65536:65537], b".")
        self.assertReceived([data])

    def test_crlf_split_at_boundary(self) -> None:
        """A CRLF whose CR ends a 16 KiB chunk arrives as one CRLF."""
        data = b"c" * 16383 + b"\r\n.x\r\n"
        self.assertEqual(data[16383:16385], b"\r\n")
        self.assertReceived([data], chunk_size=16384)

    def test_first_line_and_lone_dot(self) -> None:
        """
        A message starting with ".", one that is only ".", and an empty one
        each arrive intact, as separate transactions on one connection.
        """
        self.assertReceived([b".first line\nsecond\n", b".", b".\n", b""])

    def test_lf_and_crlf_files(self) -> None:
        """LF and CRLF files reach the server byte for byte with CRLF line ends."""
        lf = b"From: a@example.org\nSubject: t\n\nline 1\n\nline 3\n"
        crlf = lf.replace(b"\n", b"\r\n")
        server = self.deliver([lf, crlf])
        self.assertEqual([t["data"] for t in server.transactions], [crlf, crlf])

    def test_no_final_line_end(self) -> None:
        """A file without a final line end gets one before the dot."""
        server = self.deliver([b"Subject: x\n\nno newline"])
        self.assertEqual(server.transactions[0]["data"], b"Subject: x\r\n\r\nno newline\r\n")

    def test_large_message(self) -> None:
        """A 1 MiB message full of dotted lines, in 16 KiB chunks, arrives intact."""
        lines = [b"." * (i % 7) + b"line %d" % i + b"\r" * (i % 2) for i in range(60_000)]
        data = b"\n".join(lines) + b"\n"
        self.assertGreater(len(data), 2**20 - 200_000)
        self.assertReceived([data], chunk_size=16384)

    def test_pipelined_envelopes(self) -> None:
        """
        Envelopes reach the server as sent, with a refused recipient left out
        of the message but reported.
        """
        server = RecordingServer()
        server.refuse.add("b@example.org")
        clock = Clock()
        endpoint = MemoryEndpoint(server, clock)
        conn = self.run_until(
            endpoint, Deferred.fromCoroutine(connect(clock, endpoint, helo=HELO, clock=clock))
        )
        txn = transaction(
            self, ["a@example.org", "b@example.org", "c@example.org"], params={"BODY": "8BITMIME"}
        )
        result = self.run_until(endpoint, Deferred.fromCoroutine(conn.send(txn)))
        self.assertEqual(result.recipients["b@example.org"], Reply(550, "5.1.1", "unknown"))
        self.assertEqual(
            server.transactions,
            [
                {
                    "mail": b"MAIL FROM:<list@groups.example.com> SIZE=21 BODY=8BITMIME",
                    "rcpts": ["a@example.org", "c@example.org"],
                    "data": BODY_WIRE,
                }
            ],
        )
        self.run_until(endpoint, Deferred.fromCoroutine(conn.quit()))


# -- real sockets ------------------------------------------------------------------


class _Process(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


def closed_on_cleanup(test: TestCase, conn: SMTPConnection) -> SMTPConnection:
    """Make sure C{conn} is closed when C{test} ends, even if it failed."""
    test.addCleanup(lambda: Deferred.fromCoroutine(conn.quit()))
    return conn


async def connect_when_listening(test: TestCase, port: int, **kwargs: Any) -> SMTPConnection:
    """Connect to 127.0.0.1:C{port}, retrying for up to 5 s while it starts."""
    for _ in range(100):
        try:
            conn = await connect(
                reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", port), helo=HELO, **kwargs
            )
            return closed_on_cleanup(test, conn)
        except SMTPClientError as e:
            if e.enhanced != "4.4.1":
                raise
            await deferLater(reactor, 0.05)
    raise AssertionError(f"nothing listens on port {port}")


class SmtpSinkTests(TestCase):
    """Postfix's smtp-sink as the receiving server."""

    timeout = 60

    async def start_sink(self, *options: str) -> tuple[int, str]:
        """Run smtp-sink on a free port, dumping each transaction to a file."""
        tool = require_tool("smtp-sink", "/usr/sbin/smtp-sink")
        dump = os.path.abspath(self.mktemp())
        os.makedirs(dump)
        port = free_port()
        user = ["-u", "root"] if os.geteuid() == 0 else []
        args = [tool, *user, "-d", dump + "/%H%M%S.", *options, f"127.0.0.1:{port}", "16"]
        process = _Process()
        transport = reactor.spawnProcess(process, tool, args, env={})

        async def stop() -> None:
            if not process.ended.called:
                transport.signalProcess("TERM")
            await process.ended

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        self.stop = stop
        return port, dump

    def dumps(self, directory: str) -> list[dict[str, Any]]:
        """The transactions smtp-sink recorded: MAIL and RCPT arguments, body lines."""
        found = []
        for name in os.listdir(directory):
            with open(os.path.join(directory, name), "rb") as f:
                text = f.read()
            head, _, rest = text.partition(b"\nReceived: ")
            fields = [line.split(b": ", 1) for line in head.split(b"\n")]
            found.append(
                {
                    "mail": [v for k, v in fields if k == b"X-Mail-Args"],
                    "rcpts": [v for k, v in fields if k == b"X-Rcpt-Args"],
                    "body": rest.split(b"\n\n", 1)[1] if b"\n\n" in rest else b"",
                }
            )
        return sorted(found, key=lambda t: t["mail"])

    async def test_pipelined_transactions(self) -> None:
        """
        Three transactions on one pipelining connection, one of them to 100
        recipients, each with its own envelope sender, all reach smtp-sink
        with every recipient and the body intact.
        """
        port, dump = await self.start_sink()
        conn = await connect_when_listening(self, port)
        self.assertIn("PIPELINING", conn.extensions)
        many = [f"member{i}@example.org" for i in range(100)]
        body = b"Subject: sink\n\n.dotted\nbody\n"
        senders = [f"dev+member{i}=example.org@groups.example.com" for i in range(2)] + [""]
        recipient_lists = [["member0@example.org"], ["member1@example.org"], many]
        for sender, recipients in zip(senders, recipient_lists, strict=True):
            result = await conn.send(transaction(self, recipients, data=body, sender=sender))
            self.assertEqual(result.data_reply and result.data_reply.code, 250)
            self.assertEqual(len(result.recipients), len(recipients))
            self.assertTrue(all(r.code == 250 for r in result.recipients.values()))
        await conn.quit()
        await self.stop()
        found = self.dumps(dump)
        self.assertEqual(
            [t["mail"] for t in found],
            [
                [b"<>"],
                [b"<dev+member0=example.org@groups.example.com>"],
                [b"<dev+member1=example.org@groups.example.com>"],
            ],
        )
        self.assertEqual(found[0]["rcpts"], [f"<{r}>".encode() for r in many])
        self.assertEqual({t["body"] for t in found}, {b".dotted\nbody\n\n"})

    async def test_large_message(self) -> None:
        """
        A 4 MiB message with dotted lines streams through the socket (the
        transport pulls chunk by chunk) and arrives intact.
        """
        port, dump = await self.start_sink()
        lines = [b"." * (i % 3) + b"line %d " % i + b"x" * 60 for i in range(60_000)]
        body = b"Subject: big\n\n" + b"\n".join(lines) + b"\n"
        self.assertGreater(len(body), 4 * 2**20)
        conn = await connect_when_listening(self, port)
        result = await conn.send(transaction(self, ["big@example.org"], data=body))
        self.assertEqual(result.data_reply and result.data_reply.code, 250)
        await conn.quit()
        await self.stop()
        [found] = self.dumps(dump)
        assertSameBytes(self, found["body"], b"\n".join(lines) + b"\n\n")

    async def test_without_pipelining(self) -> None:
        """Against smtp-sink without PIPELINING (-p), two transactions go one command at a time."""
        port, dump = await self.start_sink("-p")
        conn = await connect_when_listening(self, port)
        self.assertNotIn("PIPELINING", conn.extensions)
        for i in range(2):
            result = await conn.send(transaction(self, [f"r{i}@example.org", f"s{i}@example.org"]))
            self.assertEqual(result.data_reply and result.data_reply.code, 250)
        await conn.quit()
        await self.stop()
        self.assertEqual(len(self.dumps(dump)), 2)

    async def test_refused_recipients(self) -> None:
        """smtp-sink refusing every RCPT (-f RCPT): all refused, data_reply None."""
        port, _ = await self.start_sink("-f", "RCPT")
        conn = await connect_when_listening(self, port)
        result = await conn.send(transaction(self, ["a@example.org", "b@example.org"]))
        self.assertIsNone(result.data_reply)
        self.assertEqual({r.code for r in result.recipients.values()}, {500})
        self.assertTrue(all(r.is_permanent for r in result.recipients.values()))
        await conn.quit()


class RealTLSTests(TestCase):
    """STARTTLS against gsmail's own inbound server over a real socket, test CA."""

    timeout = 30
    server_name = "mx.test.example"

    def setUp(self) -> None:
        ca = new_ca()
        self.ca_pem = ca.pem
        self.server_tls = ca.server_options(self.server_name)

    def listen(self, tls: Any, implicit: bool = False) -> int:
        """
        gsmail's inbound ESMTP server with a fake core on 127.0.0.1, offering
        STARTTLS with C{tls}, or (C{implicit}) speaking TLS from the start.
        """
        self.core = FakeCore()
        spool = os.path.abspath(self.mktemp())
        os.makedirs(spool)
        self.factory = InboundFactory(
            self.core,  # type: ignore[arg-type]
            ServerSettings(hostname=self.server_name, tls=None if implicit else tls),
            reactor,
            spool_dir=spool,
        )
        if implicit:
            port = reactor.listenSSL(0, self.factory, tls, interface="127.0.0.1")
        else:
            port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.stop, port)
        return int(port.getHost().port)

    async def stop(self, port: Any) -> None:
        await port.stopListening()
        for _ in range(100):  # the server side closes on its next read
            if self.factory.connections == 0:
                return
            await deferLater(reactor, 0.02)

    def client_tls(self, name: str) -> ClientTLS:
        return ClientTLS(
            ssl.optionsForClientTLS(name, trustRoot=ssl.Certificate.loadPEM(self.ca_pem))
        )

    async def test_verified_starttls(self) -> None:
        """
        STARTTLS with a certificate from the trusted CA and the right name:
        the session is encrypted, STARTTLS is no longer offered, and a
        message sent inside it arrives.
        """
        port = self.listen(self.server_tls)
        conn = await connect(
            reactor,
            TCP4ClientEndpoint(reactor, "127.0.0.1", port),
            helo=HELO,
            tls=self.client_tls(self.server_name),
            require_tls=True,
        )
        closed_on_cleanup(self, conn)
        self.assertTrue(conn.tls_active)
        self.assertNotIn("STARTTLS", conn.extensions)
        result = await conn.send(transaction(self, ["dev@example.com"]))
        self.assertEqual(result.recipients["dev@example.com"], status.POSTED)
        await conn.quit()
        [(session, envelope, data)] = self.core.deliveries
        self.assertTrue(session.tls)
        self.assertEqual(data, BODY)

    async def test_implicit_tls(self) -> None:
        """
        A smarthost on an implicit TLS port (465, C{tls:} endpoint) is
        verified the same way; the session is encrypted from the start.
        """
        port = self.listen(self.server_tls, implicit=True)
        endpoint = wrapClientTLS(
            self.client_tls(self.server_name).context,
            TCP4ClientEndpoint(reactor, "127.0.0.1", port),
        )
        conn = closed_on_cleanup(
            self, await connect(reactor, endpoint, helo=HELO, require_tls=True)
        )
        self.assertTrue(conn.tls_active)
        data = (b"." * 1000 + b"\n") * 1000  # 1 MB: many chunks through TLS
        result = await conn.send(transaction(self, ["dev@example.com"], data=data))
        self.assertEqual(result.data_reply, status.POSTED)
        await conn.quit()
        self.assertEqual(self.core.deliveries[0][2], data)

    async def test_implicit_tls_wrong_host_name(self) -> None:
        """An implicit TLS server with a certificate for another name: 4.7.5."""
        port = self.listen(self.server_tls, implicit=True)
        endpoint = wrapClientTLS(
            self.client_tls("other.example").context,
            TCP4ClientEndpoint(reactor, "127.0.0.1", port),
        )
        with self.assertRaises(SMTPClientError) as caught:
            await connect(reactor, endpoint, helo=HELO)
        self.assertEqual(caught.exception.enhanced, "4.7.5")

    async def test_wrong_host_name(self) -> None:
        """
        A certificate for another name is refused: transient 4.7.5, nothing
        sent, never a fallback to plaintext.
        """
        port = self.listen(self.server_tls)
        with self.assertRaises(SMTPClientError) as caught:
            await connect(
                reactor,
                TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                helo=HELO,
                tls=self.client_tls("other.example"),
            )
        self.assertEqual((caught.exception.enhanced, caught.exception.transient), ("4.7.5", True))
        self.assertEqual(self.core.deliveries, [])

    async def test_untrusted_ca(self) -> None:
        """A certificate from a CA the client does not trust is refused (4.7.5)."""
        other_ca = new_ca().pem
        port = self.listen(self.server_tls)
        tls = ClientTLS(
            ssl.optionsForClientTLS(self.server_name, trustRoot=ssl.Certificate.loadPEM(other_ca))
        )
        with self.assertRaises(SMTPClientError) as caught:
            await connect(
                reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", port), helo=HELO, tls=tls
            )
        self.assertEqual(caught.exception.enhanced, "4.7.5")

    async def test_require_tls_without_starttls(self) -> None:
        """
        require_tls against a server that offers no STARTTLS: transient
        4.7.4, so the message stays queued.
        """
        port = self.listen(None)
        with self.assertRaises(SMTPClientError) as caught:
            await connect(
                reactor,
                TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                helo=HELO,
                tls=self.client_tls(self.server_name),
                require_tls=True,
            )
        self.assertEqual((caught.exception.enhanced, caught.exception.transient), ("4.7.4", True))
