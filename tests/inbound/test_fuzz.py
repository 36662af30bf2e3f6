"""
Fuzzing the MAIL and RCPT commands of every listener (ESMTP, LMTP,
submission) with hypothesis: arbitrary parameter keywords and values,
Unicode and raw bytes included, and arbitrary paths. Whatever a client
sends on one line, it gets exactly one reply, the connection stays usable,
and nothing is logged at error level or above (issue "Port 25 under
attack": C{SIZE=²} used to drop the connection with a traceback).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gsmail.inbound.protocol import InboundFactory, ServerSettings
from gsmail.outbound.submission import SubmissionCore, SubmissionFactory
from tests.fakes import FakeCore, FakeQueue

#: Examples per property: enough to meet the Unicode digit and control
#: cases every run, few enough for a fast suite. The properties live on a
#: mixin run by three classes (hypothesis's differing_executors check); each
#: example builds its own connection, so the classes share no state.
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)

KEYWORDS = ["SIZE", "BODY", "SMTPUTF8", "XVERP", "RET", "ENVID", "AUTH", "NOTIFY", "ORCPT"]


def _no_line_end(data: bytes) -> bytes:
    return data.replace(b"\r", b"").replace(b"\n", b"")


# A parameter as bytes: a known or arbitrary keyword, then no value, a
# Unicode value (digits of every script included) or raw bytes.
_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30
)  # any Unicode but lone surrogates (those come as raw bytes below)
_keyword = st.one_of(st.sampled_from(KEYWORDS), _text).map(lambda k: k.encode("utf-8"))
_value = st.one_of(
    st.none(),
    st.integers(min_value=0, max_value=10**25).map(lambda n: str(n).encode()),
    # Characters str.isdigit() takes: int() refuses some (², ①) and reads
    # others as other numbers (٣).
    st.text(
        alphabet=st.characters(categories=("Nd", "No")).filter(str.isdigit), min_size=1, max_size=4
    ).map(str.encode),
    st.text(alphabet=st.characters(categories=("Nd", "No", "Nl")), max_size=6).map(str.encode),
    _text.map(str.encode),
    st.binary(max_size=30),
)
_parameter = st.tuples(_keyword, _value).map(
    lambda kv: _no_line_end(kv[0] if kv[1] is None else kv[0] + b"=" + kv[1])
)
_parameters = st.lists(_parameter, max_size=6).map(lambda ps: b"".join(b" " + p for p in ps))
_path = st.one_of(_text.map(str.encode), st.binary(max_size=60)).map(_no_line_end)


class ListenerFuzzMixin:
    """The fuzz properties, for one listener; subclasses say which."""

    hello = b"EHLO client.example.org\r\n"

    def factory(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.spool = self.mktemp()  # type: ignore[attr-defined]
        os.makedirs(self.spool)
        self.settings = ServerSettings(hostname="mx.example.com", max_size=10_000)
        self.bad_events: list[LogEvent] = []

        def observe(event: LogEvent) -> None:
            if event.get("log_failure") is not None or event["log_level"] >= LogLevel.error:
                self.bad_events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)  # type: ignore[attr-defined]

    def converse(self, commands: list[bytes]) -> tuple[list[bytes], StringTransport]:
        """
        Send the greeting command and C{commands} in one write; the final
        reply lines, one per command (the EHLO/LHLO reply counts once).
        """
        factory = self.factory()
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2525))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 2525))
        proto.makeConnection(transport)
        transport.clear()
        proto.dataReceived(self.hello + b"".join(c + b"\r\n" for c in commands))
        lines = transport.value().split(b"\r\n")
        assert lines[-1] == b"", lines[-1]
        finals = [line for line in lines[:-1] if line[3:4] != b"-"]
        for line in lines[:-1]:
            assert line[:3].isdigit() and line[3:4] in (b" ", b"-"), line
        return finals, transport

    def check(self, commands: list[bytes]) -> None:
        finals, transport = self.converse(commands + [b"NOOP"])
        test: SynchronousTestCase = self  # type: ignore[assignment]
        test.assertEqual(len(finals), len(commands) + 2, (commands, finals))
        test.assertTrue(finals[-1].startswith(b"250 "), finals[-1])
        test.assertFalse(transport.disconnecting)
        test.assertEqual(self.bad_events, [])

    @FUZZ
    @given(parameters=_parameters)
    @example(parameters=" SIZE=²".encode())
    @example(parameters=" SIZE=①".encode())
    @example(parameters=" SIZE=٣٣".encode())
    def test_mail_parameters(self, parameters: bytes) -> None:
        """Any MAIL FROM parameters get one reply; the connection goes on."""
        self.check([b"MAIL FROM:<a@example.org>" + parameters])

    @FUZZ
    @given(parameters=_parameters)
    def test_rcpt_parameters(self, parameters: bytes) -> None:
        """Any RCPT TO parameters get one reply; the connection goes on."""
        self.check([b"MAIL FROM:<a@example.org>", b"RCPT TO:<g@example.com>" + parameters])

    @FUZZ
    @given(sender=_path, recipient=_path)
    def test_paths(self, sender: bytes, recipient: bytes) -> None:
        """Any bytes as the MAIL and RCPT arguments get one reply each."""
        self.check([b"MAIL FROM:" + sender, b"RSET", b"MAIL FROM:<>", b"RCPT TO:" + recipient])


class ESMTPFuzzTests(ListenerFuzzMixin, SynchronousTestCase):
    """The ESMTP listener (port 25)."""

    def factory(self) -> Any:
        return InboundFactory(FakeCore(), self.settings, Clock(), spool_dir=self.spool)


class LMTPFuzzTests(ListenerFuzzMixin, SynchronousTestCase):
    """The LMTP listener."""

    hello = b"LHLO client.example.org\r\n"

    def factory(self) -> Any:
        return InboundFactory(FakeCore(), self.settings, Clock(), lmtp=True, spool_dir=self.spool)


class SubmissionFuzzTests(ListenerFuzzMixin, SynchronousTestCase):
    """The submission listener (client on loopback: trusted)."""

    def factory(self) -> Any:
        return SubmissionFactory(
            SubmissionCore(FakeQueue()), self.settings, Clock(), spool_dir=self.spool
        )
