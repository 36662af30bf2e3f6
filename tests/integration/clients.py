"""
Clients for the integration tests: Python's smtplib (L{transact},
L{send_once}), a raw socket client that pipelines whole sessions or starts
TLS by hand (L{RawClient}), reply codes as tuples, and the groups, senders
and messages the tests send. Blocking: run them in a thread
(C{deferToThread}); every socket has a timeout.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TypeVar

import attrs

from gsmail.status import Reply
from tests.util import DOMAIN

#: Seconds a blocking client waits for any one read or write.
CLIENT_TIMEOUT = 10.0
SENDER = "alice@example.org"
EXAMPLE = f"example@{DOMAIN}"
DEV = f"dev@{DOMAIN}"
UNKNOWN_GROUP = f"no-such-group@{DOMAIN}"
FOREIGN = "bob@example.net"
_REPLY_LINE = re.compile(rb"(\d{3})([ -])(.*)", re.DOTALL)
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_E = TypeVar("_E", bound=BaseException)


def make_message(message_id: str, subject: str = "Hello", body: str | None = None) -> bytes:
    """
    A small ASCII message as it goes on the wire (CRLF line endings). The
    default body names C{message_id}: distinct messages have distinct post
    ids at GroupServer, which archives a post id once.
    """
    if body is None:
        body = f"Hello, group. ({message_id})"
    return (
        f"From: Alice <{SENDER}>\r\n"
        f"To: {EXAMPLE}\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{message_id}>\r\n"
        "\r\n"
        f"{body}\r\n"
    ).encode("ascii")


def as_stored(message: bytes) -> bytes:
    """
    A wire-form message as gsmail stores and posts it: LF line endings
    (as Postfix's pipe handed messages to smtp2gs).
    """
    return message.replace(b"\r\n", b"\n")


def strip_trace(post: bytes) -> bytes:
    """
    The message of a post without the trace fields gsmail puts first:
    C{Return-Path}, C{Received} (folded over three lines) and
    C{X-Original-To}.

    @raise AssertionError: the post does not start with those five lines.
    """
    lines = post.split(b"\n", 5)
    expected = (b"Return-Path: <", b"Received: from ", b"\tby ", b"\tfor <", b"X-Original-To: ")
    if len(lines) < 6 or not all(
        line.startswith(prefix) for line, prefix in zip(lines, expected, strict=False)
    ):
        raise AssertionError(f"no trace fields at the start of the post: {post[:400]!r}")
    return lines[5]


def codes(reply: Reply) -> tuple[int, str]:
    """The reply code and enhanced status code of a reply of the table."""
    return (reply.code, reply.enhanced)


def smtplib_codes(answer: tuple[int, bytes]) -> tuple[int, str]:
    """
    The reply code and enhanced status code of an answer as smtplib gives it,
    C{(550, b"5.1.1 No such group ...")}; C{""} when there is no enhanced code.
    """
    code, text = answer
    first = text.split(b" ", 1)[0].decode("utf-8", "replace")
    return (code, first if _ENHANCED.fullmatch(first) else "")


def smtp_client(port: int) -> smtplib.SMTP:
    """A connected smtplib client with a timeout."""
    return smtplib.SMTP(
        "127.0.0.1", port, local_hostname="client.example.org", timeout=CLIENT_TIMEOUT
    )


@attrs.frozen
class Transaction:
    """
    The answers to one mail transaction, as smtplib returned them.

    @ivar mail: the answer to C{MAIL}.
    @ivar rcpts: the answer to each C{RCPT}, in order.
    @ivar data: the answer after the final dot, or C{None} when no recipient
        was accepted (DATA was not sent).
    """

    mail: tuple[int, bytes]
    rcpts: list[tuple[int, bytes]]
    data: tuple[int, bytes] | None


def transact(
    client: smtplib.SMTP,
    recipients: Sequence[str],
    message: bytes,
    *,
    sender: str = SENDER,
    mail_options: Sequence[str] = (),
) -> Transaction:
    """
    Run one transaction command by command on C{client} (blocking), keeping
    every answer (smtplib's C{sendmail} hides the answer to DATA).
    """
    if client.helo_resp is None and client.ehlo_resp is None:
        client.ehlo()
    mail = client.mail(sender, list(mail_options))
    if mail[0] != 250:
        client.rset()
        return Transaction(mail, [], None)
    rcpts = [client.rcpt(r) for r in recipients]
    if not any(code == 250 for code, _ in rcpts):
        client.rset()
        return Transaction(mail, rcpts, None)
    try:
        data = client.data(message)  # dot-stuffs and ends with CRLF . CRLF
    except smtplib.SMTPDataError as error:  # no 354
        text = error.smtp_error
        data = (error.smtp_code, text if isinstance(text, bytes) else text.encode())
    return Transaction(mail, rcpts, data)


def raised(kind: type[_E], blocking: Callable[[], object]) -> _E:
    """
    Run C{blocking} (in a thread) and return the C{kind} exception it raised.

    @raise AssertionError: it raised none.
    """
    try:
        blocking()
    except kind as error:
        return error
    raise AssertionError(f"{kind.__name__} was not raised")


def send_once(
    port: int,
    recipients: Sequence[str],
    message: bytes,
    *,
    sender: str = SENDER,
    mail_options: Sequence[str] = (),
) -> Transaction:
    """One connection, one L{transact}, then QUIT (blocking)."""
    with smtp_client(port) as client:
        return transact(client, recipients, message, sender=sender, mail_options=mail_options)


@attrs.frozen
class RawReply:
    """
    One reply read off a raw socket.

    @ivar code: the three-digit code of its last line.
    @ivar enhanced: the RFC 3463 code at the start of its last line, or C{""}.
    @ivar lines: the text of each line, without code and separator.
    """

    code: int
    enhanced: str
    lines: tuple[str, ...]

    @property
    def codes(self) -> tuple[int, str]:
        return (self.code, self.enhanced)


class RawClient:
    """
    A blocking SMTP/LMTP client over a plain socket that sends exactly the
    bytes it is given, for pipelining and injection tests. Use it in a
    thread, as a context manager.
    """

    def __init__(self, port: int, timeout: float = CLIENT_TIMEOUT) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Write C{data} in one C{sendall}."""
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"the server closed the connection; unread {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line

    def reply(self) -> RawReply:
        """Read one (possibly multi-line) reply."""
        lines: list[str] = []
        while True:
            line = self._line()
            match = _REPLY_LINE.fullmatch(line)
            if match is None:
                raise AssertionError(f"not a reply line: {line!r}")
            lines.append(match.group(3).decode("utf-8"))
            if match.group(2) == b" ":
                first = lines[-1].split(" ", 1)[0]
                enhanced = first if _ENHANCED.fullmatch(first) else ""
                return RawReply(int(match.group(1)), enhanced, tuple(lines))

    def replies(self, count: int) -> list[RawReply]:
        """Read C{count} replies."""
        return [self.reply() for _ in range(count)]

    def closed_by_server(self) -> bool:
        """
        Whether the server has closed the connection, with nothing unread
        (blocks until it does, or the timeout).
        """
        if self._buffer:
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def start_tls(self, context: ssl.SSLContext, hostname: str) -> None:
        """Do the TLS handshake on the connection (after C{220} to STARTTLS)."""
        if self._buffer:
            raise AssertionError(f"plaintext left before the handshake: {self._buffer!r}")
        self.sock = context.wrap_socket(self.sock, server_hostname=hostname)


def rcpt(port: int, recipient: str) -> str:
    """The enhanced status code gsmail answers C{RCPT TO:<recipient>} (blocking)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        code, text = client.rcpt(recipient)
        return text.decode().split()[0]
