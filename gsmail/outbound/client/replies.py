# -*- test-case-name: tests.outbound.test_client -*-
"""
The outbound client's reply parsing: the server's bytes split into replies
(RFC 5321 §4.2: multi-line replies, each line checked so a confused peer
cannot desynchronise the session), RFC 3463 enhanced codes split off, the
EHLO keywords read, and L{SMTPClientError}, the one error the client raises.

Not here: what is done with a reply (L{gsmail.outbound.client.SMTPConnection}),
the connection that reads the bytes (L{gsmail.outbound.client.protocol}).
"""

from __future__ import annotations

import functools
import re
from typing import Final

import attrs

from gsmail.status import Reply

__all__ = ["MAX_REPLY_LINE", "MAX_REPLY_LINES", "ReplyParser", "SMTPClientError"]

#: Longest reply line we accept, in bytes (RFC 5321 §4.5.3.1.5 allows 512).
MAX_REPLY_LINE: Final = 8192
#: Most lines in one reply (EHLO replies are the longest in practice).
MAX_REPLY_LINES: Final = 256


class SMTPClientError(Exception):
    """
    The connection failed as a whole: the transaction (or the session) did not
    complete and no recipient can be marked delivered.

    @ivar reply: the server's reply when a reply caused the failure (a 421,
        a refused greeting, EHLO, STARTTLS or AUTH), else C{None}.
    @ivar transient: C{True}: keep the message and retry later (4xx);
        C{False}: retrying cannot help (5xx).
    @ivar enhanced: the RFC 3463 status for logs and DSNs: the server's, or
        gsmail's own (C{4.4.1} no connection, C{4.4.2} lost or timed out,
        C{4.5.0} protocol error, C{4.7.4} TLS required but not offered,
        C{4.7.5} TLS handshake or certificate verification failed,
        C{4.7.0}/C{4.7.10} AUTH impossible, C{4.3.0} local read error).
    @ivar after_data: C{True} when the final dot was sent and the connection
        failed before its reply: the server may have accepted the message.
        Resending it may deliver a second copy; the caller decides.
    @ivar partial: LMTP only, with C{after_data}: the per-recipient replies
        that did arrive before the failure.
    """

    def __init__(
        self,
        detail: str,
        *,
        transient: bool,
        enhanced: str = "",
        reply: Reply | None = None,
        after_data: bool = False,
        partial: dict[str, Reply] | None = None,
    ) -> None:
        self.detail = detail
        self.transient = transient
        self.reply = reply
        enhanced = enhanced or (reply.enhanced if reply else "") or "4.0.0"
        # The class follows our verdict: a 535 taken as transient is 4.7.8.
        self.enhanced = ("4" if transient else "5") + enhanced[1:]
        self.after_data = after_data
        self.partial = partial or {}
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.enhanced} {self.detail}"
        if self.reply is not None:
            text += f" (server said: {self.reply.code} {self.reply.status_line()})"
        if self.after_data:
            text += " [after the final dot: the message may have been delivered]"
        return text

    def as_reply(self) -> Reply:
        """
        The reply to record against each recipient: the server's own when its
        class agrees with C{transient}, else one made up from C{enhanced} and
        C{detail} (451 if transient, else 554), quoting the server's.
        """
        reply = self.reply
        if reply is not None and reply.is_transient == self.transient:
            return reply
        text = f"gsmail: {self.detail}"
        if reply is not None:
            text += f" (server said: {reply.code} {reply.status_line()})"
        return Reply(451 if self.transient else 554, self.enhanced, text)


@attrs.frozen
class _RawReply:
    """One reply as read: the code and the text of each line (after the code)."""

    code: int
    lines: tuple[str, ...]

    def to_reply(self) -> Reply:
        """The reply with its enhanced code split off (RFC 2034 §4)."""
        return _to_reply(self.code, self.lines)


@functools.lru_cache(maxsize=256)
def _to_reply(code: int, lines: tuple[str, ...]) -> Reply:
    """
    L{_RawReply.to_reply}, remembered: a server gives the same MAIL, RCPT
    and DATA replies to every transaction (L{Reply} is immutable).
    """
    enhanced = ""
    texts = []
    for i, line in enumerate(lines):
        m = _ENHANCED.match(line)
        if m and m.group(1) == str(code // 100) and code // 100 != 3:
            if i == 0:
                enhanced = m.group(0).strip()
            line = line[m.end() :]
        texts.append(line.strip())
    return Reply(code, enhanced, " ".join(t for t in texts if t))


_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: +|\Z)")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: Single-line replies already parsed, by their bytes: a server says the same
#: C{250 2.1.5 Ok} to every RCPT of every transaction (L{_RawReply} is
#: immutable). Lines of up to L{_KNOWN_LINE_LENGTH} bytes; emptied when it
#: holds L{_KNOWN_LINES_MAX} (replies naming a queue id never repeat).
_known_lines: dict[bytes, _RawReply] = {}
_KNOWN_LINES_MAX: Final = 1024
_KNOWN_LINE_LENGTH: Final = 200


class ReplyParser:
    """
    Splits the server's bytes into replies (RFC 5321 §4.2): C{250-...} lines
    continue a reply, C{250 ...} ends it. A line is accepted with or without
    its CR. Anything malformed raises L{SMTPClientError} (C{4.5.0}): the
    session can no longer be trusted.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._lines: list[str] = []
        self._code: int | None = None

    def feed(self, data: bytes) -> list[_RawReply]:
        """
        Take more bytes from the server.

        @return: the replies completed by them, in order.
        @raise SMTPClientError: a malformed line, a line longer than
            L{MAX_REPLY_LINE} bytes, a reply longer than L{MAX_REPLY_LINES}
            lines, or continuation lines with different codes.
        """
        self._buffer += data
        replies: list[_RawReply] = []
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if not sep:
                if len(self._buffer) > MAX_REPLY_LINE:
                    raise _protocol_error("reply line too long")
                return replies
            self._buffer = rest
            if len(line) > MAX_REPLY_LINE:
                raise _protocol_error("reply line too long")
            reply = self._line(line.removesuffix(b"\r"))
            if reply is not None:
                replies.append(reply)

    def _line(self, line: bytes) -> _RawReply | None:
        if self._code is None:
            known = _known_lines.get(line)
            if known is not None:
                return known
        head, sep = line[:3], line[3:4]
        if not (head.isdigit() and head[:1] in b"2345" and sep in (b"", b" ", b"-")):
            raise _protocol_error(f"malformed reply line {line[:40]!r}")
        code = int(head)
        if self._code is not None and code != self._code:
            raise _protocol_error("reply lines with different codes")
        self._code = code
        self._lines.append(_CONTROL.sub(" ", line[4:].decode("utf-8", "replace")))
        if len(self._lines) > MAX_REPLY_LINES:
            raise _protocol_error("reply too long")
        if sep == b"-":
            return None
        reply = _RawReply(code, tuple(self._lines))
        if len(self._lines) == 1 and len(line) <= _KNOWN_LINE_LENGTH:
            if len(_known_lines) >= _KNOWN_LINES_MAX:
                _known_lines.clear()
            _known_lines[line] = reply
        self._lines = []
        self._code = None
        return reply


class _TimedOut(SMTPClientError):
    """No reply (or no progress) in time."""


def _protocol_error(detail: str, after_data: bool = False) -> SMTPClientError:
    return SMTPClientError(
        f"protocol error: {detail}", transient=True, enhanced="4.5.0", after_data=after_data
    )


def _parse_ehlo(lines: tuple[str, ...]) -> dict[str, str | None]:
    """The EHLO keywords after the first (greeting) line (RFC 5321 §4.1.1.1)."""
    extensions: dict[str, str | None] = {}
    for line in lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword and "=" not in keyword:  # skip old "AUTH=LOGIN" lines
            extensions[keyword.upper()] = params.strip() or None
    return extensions
