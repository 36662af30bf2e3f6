"""
Real input: every C{msg_*.txt} of CPython's email test corpus
(C{Lib/test/test_email/data}: MIME, odd headers, mbox C{From } lines, CRLF
files, a message without a final newline) goes through ESMTP and through
LMTP, and each group gets each message byte for byte.

What "byte for byte" means here, exactly:

  - On the wire every line ends CRLF: the test turns CRLF, lone CR and lone
    LF into CRLF before sending, which is what smtplib's C{_fix_eols} does
    for text (smtplib sends bytes unchanged, and a message with bare LF line
    endings would be one endless line on the wire). smtplib then dot-stuffs
    and, if the message does not end with CRLF, adds one.
  - gsmail stores and posts lines ending LF (as Postfix's pipe gave them to
    smtp2gs) and puts three trace fields first: C{Return-Path}, C{Received}
    (folded over three lines) and C{X-Original-To}.
  - So a post minus its first five lines equals the corpus file with CRLF and
    lone CR turned into LF, plus an LF at the end when the file had none.

Several corpus files share a Message-ID though they differ (C{msg_01},
C{msg_03}, C{msg_14}, C{msg_20} and C{msg_29}; C{msg_04} and C{msg_44}).
gsmail's ledger knows a post by its group and Message-ID (or, without one,
the SHA-256 of the message), so a group gets the first of each such set and
the others are answered 250 "Already delivered": the expected posts are
computed that way.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import smtplib
from email.parser import BytesParser
from email.policy import compat32

import attrs
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from gsmail import status
from gsmail.standin.postid import post_id_of_message
from tests.integration.clients import (
    CLIENT_TIMEOUT,
    DEV,
    EXAMPLE,
    smtp_client,
    strip_trace,
    transact,
)
from tests.util import make_config, port_of, start_service

CORPUS = os.path.join(os.path.dirname(os.__file__), "test", "test_email", "data")


@attrs.frozen
class CorpusMessage:
    """
    One corpus file.

    @ivar name: the file name, for messages.
    @ivar wire: what is sent: CRLF line endings.
    @ivar stored: what the group should get after the trace fields.
    @ivar identity: what gsmail's ledger knows the message by in a group (its digest).
    @ivar eight_bit: the file has bytes over 127 (sent with BODY=8BITMIME).
    """

    name: str
    wire: bytes
    stored: bytes
    identity: str
    eight_bit: bool

    @classmethod
    def from_bytes(cls, name: str, raw: bytes) -> CorpusMessage:
        wire = re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
        stored = re.sub(rb"\r\n|\r", b"\n", raw)
        if not stored.endswith(b"\n"):
            stored += b"\n"  # smtplib ends the data with CRLF
        # The ledger knows a message by its content, never by its Message-ID.
        identity = "SHA-256 " + hashlib.sha256(stored).hexdigest()
        return cls(name, wire, stored, identity, any(byte > 127 for byte in raw))


def load_corpus() -> list[CorpusMessage]:
    """
    The corpus, in file name order. Missing (a Python built without its test
    package): the test is skipped by hand, and fails in CI.
    """
    paths = sorted(glob.glob(os.path.join(CORPUS, "msg_*.txt")))
    if not paths:
        message = f"CPython's email test corpus is not installed ({CORPUS})"
        if os.environ.get("CI"):
            raise AssertionError(message)
        raise SkipTest(message)
    corpus = []
    for path in paths:
        with open(path, "rb") as f:
            corpus.append(CorpusMessage.from_bytes(os.path.basename(path), f.read()))
    return corpus


def expected_posts(corpus: list[CorpusMessage]) -> list[CorpusMessage]:
    """The messages a group gets: the first of each identity, in sending order."""
    seen: set[str] = set()
    first = []
    for message in corpus:
        if message.identity not in seen:
            seen.add(message.identity)
            first.append(message)
    return first


def send_all(client: smtplib.SMTP, recipient: str, corpus: list[CorpusMessage]) -> list[bytes]:
    """
    Send each message in its own transaction on one connection (blocking);
    the answer to each DATA, as C{b"250 2.0.0 Added to the group"}.
    """
    answers = []
    for message in corpus:
        options = ["BODY=8BITMIME"] if message.eight_bit else []
        done = transact(client, [recipient], message.wire, mail_options=options)
        if done.data is None:
            raise AssertionError(f"{message.name}: refused before DATA: {done}")
        answers.append(b"%d %s" % done.data)
    return answers


class CorpusTests(TestCase):
    """CPython's email corpus through both front doors."""

    def setUp(self) -> None:
        self.corpus = load_corpus()
        self.service = start_service(self, make_config(self.mktemp()))

    def assertDelivered(
        self, group: str, answers: list[bytes], corpus: list[CorpusMessage]
    ) -> None:
        """
        Each first message of an identity was answered "Added" and the rest
        "Already delivered", and the group holds exactly the first ones, byte
        for byte, in order.
        """
        firsts = expected_posts(corpus)
        added = status.POSTED.encode().rstrip(b"\r\n")
        duplicate = status.ALREADY_DELIVERED.encode().rstrip(b"\r\n")
        expected_answers = [
            (m.name, added if any(m is f for f in firsts) else duplicate) for m in corpus
        ]
        self.assertEqual(
            [(m.name, a) for m, a in zip(corpus, answers, strict=True)], expected_answers
        )
        standin = self.service.standin
        assert standin is not None
        # gsmail added each distinct message once; GroupServer archived the
        # first of each post id (messages that share subject, body and
        # sender are one post to it).
        self.assertEqual(standin.add_requests(group), len(firsts))
        archived: dict[str, CorpusMessage] = {}
        for message in firsts:
            parsed = BytesParser(policy=compat32).parsebytes(message.stored)
            post_id = post_id_of_message(parsed, group, "example", group).post_id
            archived.setdefault(post_id, message)
        posts = [strip_trace(post) for post in standin.posts(group)]
        self.assertEqual(len(posts), len(archived))
        for message, post in zip(archived.values(), posts, strict=True):
            self.assertEqual(post, message.stored, f"{message.name} was not posted intact")

    async def test_esmtp(self) -> None:
        """Every corpus message sent over ESMTP arrives in group C{example} intact."""
        port = port_of(self.service, "smtp")

        def send() -> list[bytes]:
            with smtp_client(port) as client:
                return send_all(client, EXAMPLE, self.corpus)

        answers = await deferToThread(send)
        self.assertDelivered("example", answers, self.corpus)

    async def test_lmtp(self) -> None:
        """Every corpus message sent over LMTP arrives in group C{dev} intact."""
        port = port_of(self.service, "lmtp")

        def send() -> list[bytes]:
            with smtplib.LMTP("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as client:
                return send_all(client, DEV, self.corpus)

        answers = await deferToThread(send)
        self.assertDelivered("dev", answers, self.corpus)

    async def test_eight_bit_not_utf8(self) -> None:
        """
        8-bit messages that are not UTF-8 (Latin-1 header and body, a bare
        C{0xff}) sent with BODY=8BITMIME arrive intact over ESMTP and LMTP.
        (The corpus has no 8-bit file, so this adds one.)
        """
        raw = (
            b"From: J\xf6rg <jorg@example.org>\n"
            b"Subject: Gr\xfc\xdfe aus K\xf6ln\n"
            b"Message-ID: <latin1@example.org>\n"
            b"Content-Type: text/plain; charset=iso-8859-1\n"
            b"Content-Transfer-Encoding: 8bit\n\n"
            b"Sch\xf6ne Gr\xfc\xdfe \xff\xfe\x80\n"
            b".a line that starts with a dot\n"
        )
        message = CorpusMessage.from_bytes("latin-1", raw)
        self.assertTrue(message.eight_bit)
        smtp, lmtp = port_of(self.service, "smtp"), port_of(self.service, "lmtp")

        def send() -> list[bytes]:
            with smtp_client(smtp) as client:
                answers = send_all(client, EXAMPLE, [message])
            with smtplib.LMTP("127.0.0.1", lmtp, timeout=CLIENT_TIMEOUT) as client:
                return answers + send_all(client, DEV, [message])

        answers = await deferToThread(send)
        self.assertEqual(answers, [status.POSTED.encode().rstrip(b"\r\n")] * 2)
        for group in ("example", "dev"):
            [post] = self.service.standin.posts(group)
            self.assertEqual(strip_trace(post), raw)
