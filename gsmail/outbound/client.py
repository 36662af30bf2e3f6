# -*- test-case-name: tests.outbound.test_client -*-
"""
gsmail's ESMTP (RFC 5321) and LMTP (RFC 2033) client: one connection, several
transactions in sequence.

gsmail does not use C{twisted.mail.smtp.ESMTPClient}: its DATA encoder loses
dot-stuffing at 16 KiB read boundaries and on the first line, doubles CR in
CRLF input, reports a stale recipient count after a refused MAIL, sends no
MAIL parameters and never pipelines (see twisted-mail-notes §3). This module
owns the whole client side instead:

  - its own reply parser (multi-line replies, RFC 3463 enhanced codes, each
    reply checked for well-formedness so a confused peer cannot desynchronise
    us);
  - EHLO (HELO when EHLO gets a 5xx), STARTTLS (RFC 3207) with the caller's
    verifying context and a fresh EHLO after it, AUTH PLAIN or LOGIN
    (RFC 4954) only over TLS or to a loopback peer;
  - MAIL parameters SIZE (RFC 1870), BODY=8BITMIME (RFC 6152), SMTPUTF8
    (RFC 6531), XVERP (Postfix) and RET/ENVID (RFC 3461), each only when the
    server offers the extension;
  - PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one write, replies
    read in order; without it one command per round trip;
  - DATA streamed from the queue file by a pull producer (never read whole),
    through L{DataEncoder}: LF, CRLF or bare CR become CRLF, dot-stuffing
    holds across chunk boundaries and on the first line;
  - every wait bounded by the injected clock (RFC 5321 §4.5.3.2 defaults);
  - a loss or timeout after the final dot is reported with C{after_data},
    because the server may have taken the message: it is never resent here.

Nothing here retries. Every failure is an L{SMTPClientError} (transient or
permanent) or a per-recipient L{Reply} in a L{TransactionResult}; the caller
(the outbound delivery) decides what to do with them.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import re
from collections import deque
from typing import IO, Any, Final

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IPullProducer,
    IReactorTime,
    ISSLTransport,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gsmail import status
from gsmail.addresses import AddressError, parse_mailbox
from gsmail.eager import write_now
from gsmail.status import Reply

__all__ = [
    "ClientTLS",
    "DataEncoder",
    "ReplyParser",
    "SMTPClientError",
    "SMTPConnection",
    "Timeouts",
    "Transaction",
    "TransactionResult",
    "connect",
]

log = Logger()

#: Bytes read from the message file per chunk (one transport write each).
CHUNK_SIZE: Final = 64 * 1024
#: Longest reply line we accept, in bytes (RFC 5321 §4.5.3.1.5 allows 512).
MAX_REPLY_LINE: Final = 8192
#: Most lines in one reply (EHLO replies are the longest in practice).
MAX_REPLY_LINES: Final = 256

#: A reply that only gsmail makes up (no server said it) when the server
#: lacks SMTPUTF8 and the message needs it: RFC 6531 §3.2 forbids sending it,
#: and the message cannot be downgraded here, so it is returned (permanent).
SMTPUTF8_UNSUPPORTED: Final = Reply(
    553, "5.6.7", "gsmail: the server does not support SMTPUTF8, which this message needs"
)


# -- public values -----------------------------------------------------------


@attrs.frozen
class Timeouts:
    """
    How long, in seconds, to wait for each step. The defaults are RFC 5321
    §4.5.3.2's minimums; the connect and quit limits are Postfix's
    (C{smtp_connect_timeout} 30 s) and gsmail's own.

    @ivar connect: for the TCP connection to be made.
    @ivar greeting: for the 220 greeting (RFC: 5 minutes).
    @ivar command: for EHLO/HELO/LHLO, STARTTLS, AUTH and RSET replies.
    @ivar mail: for the MAIL reply (RFC: 5 minutes).
    @ivar rcpt: for each RCPT reply (RFC: 5 minutes).
    @ivar data_init: for the 354 reply to DATA (RFC: 2 minutes).
    @ivar data_block: for the server to take each chunk of message data
        (RFC: 3 minutes per data block).
    @ivar data_end: for the reply after the final dot (RFC: 10 minutes).
    @ivar quit: for the QUIT reply and the close that follows.
    """

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    quit: float = 60.0


DEFAULT_TIMEOUTS: Final = Timeouts()


@attrs.frozen
class ClientTLS:
    """
    How to do STARTTLS.

    @ivar context: the client TLS context, e.g.
        C{optionsForClientTLS("smtp.example.net", trustRoot)}: its host name
        and trust root decide the certificate verification (service-identity).
        For opportunistic TLS pass C{CertificateOptions(verify=False)}.
    """

    context: IOpenSSLClientConnectionCreator = attrs.field(repr=False)


@attrs.frozen
class Transaction:
    """
    One message for some recipients of one envelope sender.

    @ivar sender: the reverse-path, C{""} for the null sender (a bounce).
    @ivar recipients: the forward-paths, at least one; a repeated address is
        sent once.
    @ivar data_path: the message file (header and body), LF or CRLF line ends.
        It is streamed, never read whole into memory.
    @ivar size: the file's size in bytes. The bytes read while sending must
        add up to it, else the data is abandoned without its final dot (a
        queue file that changed must not go out damaged): C{4.3.0}.
    @ivar params: the MAIL parameters wanted: C{"BODY": "8BITMIME"},
        C{"SMTPUTF8": None}, C{"XVERP": None} (or C{"XVERP": "+="}),
        C{"RET": "HDRS"}, C{"ENVID": xtext}. Each is sent only when the server
        offers its extension, except SMTPUTF8: see L{SMTPConnection.send}.
    @ivar wire_size: the exact size as transmitted (CRLF line ends), in
        bytes, when the queue knows it; else SIZE is estimated from C{size}.
    @ivar data: the message itself (C{size} bytes), when the caller holds
        it in memory (a small message sent to many recipients in turn);
        C{data_path} is then not read. A connection encodes a given bytes
        object once and reuses the result for the transactions that follow.
    @ivar checked: the caller vouches that C{sender} and C{recipients} are
        mailboxes (it parsed them with L{gsmail.addresses.parse_mailbox}),
        so L{SMTPConnection.send} does not parse them again; the parameters
        and the size are checked either way.
    @ivar rcpt_params: per recipient address, the RCPT parameters wanted:
        C{"NOTIFY"} and C{"ORCPT"} (RFC 3461 §4.1, §4.2, encoded for the
        wire). Like C{RET} and C{ENVID} they are sent only when the server
        offers DSN (RFC 3461 §4: else the next hop could not honour them,
        and this side reports instead).
    """

    sender: str
    recipients: list[str]
    data_path: str
    size: int
    params: dict[str, str | None] = attrs.field(factory=dict)
    wire_size: int | None = None
    data: bytes | None = attrs.field(default=None, repr=False)
    checked: bool = False
    rcpt_params: dict[str, dict[str, str]] = attrs.field(factory=dict)


@attrs.frozen
class TransactionResult:
    """
    What the server said to one transaction.

    @ivar recipients: per recipient, the RCPT reply if it was refused (or the
        MAIL reply if MAIL was refused), else the reply that ended the data
        (SMTP: the one reply after the final dot or to DATA; LMTP: that
        recipient's own reply).
    @ivar mail_reply: the reply to MAIL.
    @ivar data_reply: the reply to DATA if it was refused, else the reply
        after the final dot (LMTP: the worst of the per-recipient replies, a
        transient one first); C{None} if no recipient was accepted.
    """

    recipients: dict[str, Reply]
    mail_reply: Reply
    data_reply: Reply | None


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


# -- the wire format ---------------------------------------------------------


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


class DataEncoder:
    """
    Turns message file bytes into SMTP DATA (RFC 5321 §4.5.2, §2.3.8), chunk
    by chunk, with the state that Twisted's encoder lacks: every line end
    (LF, CRLF, or a bare CR, which may not be sent) becomes CRLF, and a line
    starting with "." gets another ".", wherever the chunk boundaries fall
    (a CR at the end of a chunk is held back until the next one shows whether
    an LF follows it). L{finish} adds a CRLF if the message did not end with
    a line end, then the terminating C{.CRLF}.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._held_cr = False

    def encode(self, chunk: bytes) -> bytes:
        """The wire bytes for the next chunk of the file (maybe C{b""})."""
        if self._held_cr:
            chunk = b"\r" + chunk
        self._held_cr = chunk.endswith(b"\r")
        if self._held_cr:
            chunk = chunk[:-1]
        if not chunk:
            return b""
        out = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        out = out.replace(b"\n.", b"\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = out.endswith(b"\n")
        return out

    def finish(self) -> bytes:
        """The end of the data: a last CRLF if needed, then C{.CRLF}."""
        end = b"\r\n" if self._held_cr or not self._at_line_start else b""
        self._held_cr = False
        self._at_line_start = True
        return end + b".\r\n"


# -- the protocol --------------------------------------------------------------


class _EarlyReply(Exception):
    """The server replied while message data was still being sent."""

    def __init__(self, reply: _RawReply) -> None:
        super().__init__(reply.code)
        self.reply = reply


@implementer(IPullProducer)
class _DataSender:
    """
    Streams one message file into the transport as a pull producer: a chunk
    is read only when the transport has sent the previous one (back-pressure),
    so memory stays at one chunk whatever the message size. Reads are single
    C{read(2)} calls of at most L{CHUNK_SIZE} bytes on a local file, as
    Twisted's own C{FileSender} does, so they stay in the reactor thread.

    @ivar done: fires when the final dot has been written, or fails with
        L{SMTPClientError} or L{_EarlyReply}.
    """

    def __init__(
        self,
        protocol: _ClientProtocol,
        file: IO[bytes],
        size: int,
        chunk_size: int,
        block_timeout: float,
    ) -> None:
        self._protocol = protocol
        self._file = file
        self._size = size
        self._read = 0
        self._chunk_size = chunk_size
        self._block_timeout = block_timeout
        self._encoder = DataEncoder()
        self._timer: IDelayedCall | None = None
        self._finished = False
        self.done: Deferred[None] = Deferred()

    def start(self) -> None:
        self._arm()
        self._protocol.transport.registerProducer(self, False)

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._block_timeout)
        else:
            self._timer = self._protocol.clock.callLater(
                self._block_timeout,
                self._protocol.timed_out,
                "the server to take message data",
            )

    def resumeProducing(self) -> None:
        if self._finished:
            return
        try:
            chunk = self._file.read(self._chunk_size)
        except OSError as e:
            # Never end the data with a dot after a failed read: that would
            # deliver a truncated message. The caller aborts the connection.
            self.abort(
                SMTPClientError(
                    f"could not read the message file: {e.strerror}",
                    transient=True,
                    enhanced="4.3.0",
                )
            )
            return
        transport = self._protocol.transport
        if chunk:
            self._read += len(chunk)
            self._arm()
            transport.write(self._encoder.encode(chunk))
            return
        if self._read != self._size:
            # The queue file changed under us (truncated, rewritten): sending
            # the dot now could deliver a damaged message.
            self.abort(
                SMTPClientError(
                    f"the message file has {self._read} bytes, expected {self._size}",
                    transient=True,
                    enhanced="4.3.0",
                )
            )
            return
        self._protocol.after_data = True
        transport.write(self._encoder.finish())
        self._finish(unregister=True)
        self._protocol.sender = None
        self.done.callback(None)

    def stopProducing(self) -> None:
        # The transport is going away; its connectionLost then calls abort()
        # with the reason.
        if not self._finished:
            self._finish(unregister=False)

    def abort(self, reason: Exception) -> None:
        """Stop sending (early reply, timeout, read error, lost connection)."""
        if not self._finished:
            self._finish(unregister=True)
        self._protocol.sender = None
        if not self.done.called:
            self.done.errback(reason)

    def _finish(self, unregister: bool) -> None:
        self._finished = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._file.close()
        if unregister:
            self._protocol.transport.unregisterProducer()


class _ClientProtocol(Protocol):
    """
    The I/O half of a connection: bytes to replies, one waiter at a time,
    timeouts, the data producer and connection loss. The session logic is
    in L{SMTPConnection}.

    Waiting for a reply is bounded by one timer per connection, armed at
    the first wait and left running: each L{read} only moves a deadline, and
    the timer, when it fires, either re-arms itself for the time left or
    fails the connection. (A timer set and cancelled per reply cost more
    than parsing the reply.)

    @ivar outstanding: replies expected for the commands written so far; a
        reply beyond them is unsolicited (a server closing with 421).
    @ivar after_data: the final dot was written and its reply has not come.
    @ivar error: why the connection is no longer usable, once it is not.
    @ivar trace: log each command and reply at debug level.
    """

    transport: Any  # TCP, TLS or UNIX: ITransport, IConsumer, ITLSTransport

    def __init__(self, clock: IReactorTime, trace: bool = False) -> None:
        self.clock = clock
        self.trace = trace
        self._parser = ReplyParser()
        self._replies: deque[_RawReply] = deque()
        self._waiter: Deferred[_RawReply] | None = None
        # What the waiter waits for, until when (clock seconds), and the
        # connection's one timer (None when not armed).
        self._what = ""
        self._deadline = 0.0
        self._timer: IDelayedCall | None = None
        self.outstanding = 1  # the greeting
        self.after_data = False
        self.error: SMTPClientError | None = None
        self.sender: _DataSender | None = None
        self.lost: Deferred[None] = Deferred()
        self._generation = 0  # bumped by STARTTLS

    def connectionMade(self) -> None:
        # Nagle's algorithm delays the small pipelined writes (a stock
        # ESMTPClient manages ~90 messages/s with it on).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except Exception:  # not a TCP socket (UNIX socket, test transport)
                pass

    # -- reading -------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except SMTPClientError as e:
            e.after_data = self.after_data
            self.fail(e)
            self.transport.abortConnection()
            return
        generation = self._generation
        for reply in replies:
            if self.error is not None:
                return
            if generation != self._generation:
                # Plaintext that came with the STARTTLS reply must never pass
                # for a reply inside TLS (RFC 3207 §6, CVE-2011-0411).
                log.warn("Discarded a reply sent in plaintext after STARTTLS")
                self.fail(_protocol_error("reply injected after STARTTLS"))
                self.transport.abortConnection()
                return
            if self.trace:
                log.debug("S: {code} {text}", code=reply.code, text=" / ".join(reply.lines))
            self._reply_received(reply)

    def _reply_received(self, reply: _RawReply) -> None:
        if self.outstanding <= 0:
            if reply.code == 421:
                # The server is closing (idle timeout, shutdown).
                self.fail(
                    SMTPClientError(
                        "the server closed the connection",
                        transient=True,
                        reply=reply.to_reply(),
                    )
                )
                self.transport.loseConnection()
            else:
                self.fail(_protocol_error(f"unexpected reply {reply.code}", self.after_data))
                self.transport.abortConnection()
            return
        self.outstanding -= 1
        if self.sender is not None:
            # A reply while data is still going out: the server gave up on
            # the message (or is confused). Stop sending; the caller decides.
            self.sender.abort(_EarlyReply(reply))
            return
        d = self._waiter
        if d is not None:
            self._waiter = None  # the timer stays: see L{_check_deadline}
            d.callback(reply)
        else:
            self._replies.append(reply)

    def take(self) -> _RawReply | None:
        """The next reply if it has arrived, else C{None} (then use L{read})."""
        return self._replies.popleft() if self._replies else None

    def unread(self, reply: _RawReply) -> None:
        """Put back a reply L{take} gave, to be the next again."""
        self._replies.appendleft(reply)

    def read(self, timeout: float, what: str) -> Deferred[_RawReply]:
        """The next reply, or L{SMTPClientError} after C{timeout} seconds."""
        if self._replies:
            d: Deferred[_RawReply] = Deferred()
            d.callback(self._replies.popleft())
            return d
        d = Deferred()
        if self.error is not None:
            d.errback(self.error)
            return d
        assert self._waiter is None, "one reply at a time"
        self._waiter = d
        self._what = what
        self._deadline = self.clock.seconds() + timeout
        timer = self._timer
        if timer is None:
            self._timer = self.clock.callLater(timeout, self._check_deadline)
        elif timer.getTime() > self._deadline:
            timer.reset(timeout)  # a shorter limit than the last one
        return d

    def _check_deadline(self) -> None:
        """The timer: fail the wait if its deadline passed, else wait on."""
        self._timer = None
        if self._waiter is None:
            return  # nothing waits (an idle connection): re-armed by read()
        left = self._deadline - self.clock.seconds()
        if left > 0:
            self._timer = self.clock.callLater(left, self._check_deadline)
        else:
            self.timed_out(self._what)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    # -- writing -------------------------------------------------------------
    def start_tls(self, context: IOpenSSLClientConnectionCreator) -> None:
        """Start TLS, forgetting any plaintext the server sent beyond its 220."""
        self._generation += 1
        self._parser = ReplyParser()
        self.transport.startTLS(context)

    def send_lines(self, lines: list[bytes], shown: list[str] | None = None) -> None:
        """
        Write commands (CRLF added), all in one write: a pipelined group.

        @param shown: what the protocol trace shows instead of C{lines}
            (C{AUTH PLAIN ****}): secrets never reach the log.
        """
        if self.trace:
            for text in (
                shown if shown is not None else [x.decode("utf-8", "replace") for x in lines]
            ):
                log.debug("C: {command}", command=text)
        self.outstanding += len(lines)
        write_now(self.transport, b"".join(line + b"\r\n" for line in lines))

    def send_data(self, sender: _DataSender, replies: int) -> None:
        """Stream the message; C{replies} replies are expected after the dot."""
        self.outstanding += replies
        self.sender = sender
        sender.start()

    def send_whole(self, wire: bytes, replies: int, commands: list[bytes]) -> None:
        """
        Write a whole encoded message, final dot included (C{replies} replies
        are expected after it), and C{commands} after it in the same write.
        """
        if self.trace:
            for line in commands:
                log.debug("C: {command}", command=line.decode("utf-8", "replace"))
        self.outstanding += replies + len(commands)
        self.after_data = True
        if commands:
            wire += b"".join(line + b"\r\n" for line in commands)
        write_now(self.transport, wire)

    # -- failure -------------------------------------------------------------
    def timed_out(self, what: str) -> None:
        self.fail(
            _TimedOut(
                f"timed out waiting for {what}",
                transient=True,
                enhanced="4.4.2",
                after_data=self.after_data,
            )
        )
        self.transport.abortConnection()

    def fail(self, error: SMTPClientError) -> None:
        """Mark the connection unusable and wake whoever waits."""
        if self.error is None:
            self.error = error
        self._stop_timer()  # no reply is read after this
        if self._waiter is not None:
            d, self._waiter = self._waiter, None
            d.errback(self.error)
        if self.sender is not None:
            self.sender.abort(self.error)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        detail = "connection lost"
        if not reason.check(ConnectionDone):
            detail += f": {reason.getErrorMessage()}"
        self.fail(
            SMTPClientError(detail, transient=True, enhanced="4.4.2", after_data=self.after_data)
        )
        if not self.lost.called:
            self.lost.callback(None)


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, clock: IReactorTime, trace: bool) -> None:
        self.clock = clock
        self.trace = trace

    def buildProtocol(self, addr: IAddress | None) -> _ClientProtocol:
        return _ClientProtocol(self.clock, self.trace)


# -- the session ---------------------------------------------------------------


class SMTPConnection:
    """
    An open, greeted (and, as asked, TLS-protected and authenticated) SMTP
    or LMTP session. Get one from L{connect}; call L{send} for each
    transaction in turn (concurrent calls wait their turn), then L{quit}.

    @ivar extensions: the EHLO keywords (upper case) and their parameters
        (C{None} when none), from the last EHLO (after STARTTLS, the new one);
        empty after a HELO fallback.
    @ivar tls_active: the session is encrypted (STARTTLS or implicit TLS).
    @ivar authenticated: AUTH succeeded.
    @ivar greeting: the server's 220 greeting.
    """

    log = Logger()

    def __init__(
        self,
        protocol: _ClientProtocol,
        *,
        timeouts: Timeouts,
        lmtp: bool,
        chunk_size: int,
    ) -> None:
        self._protocol = protocol
        self._timeouts = timeouts
        self._lmtp = lmtp
        self._chunk_size = chunk_size
        self._lock = DeferredLock()
        self._needs_reset = False
        self._closed = False
        self._quit = False
        self.extensions: dict[str, str | None] = {}
        self.tls_active = ISSLTransport.providedBy(protocol.transport)
        self.authenticated = False
        self.greeting: Reply | None = None
        self._cached: tuple[bytes, bytes] | None = None
        # The transaction whose commands went out after the last message,
        # with its recipients and whether it needs SMTPUTF8.
        self._prepared: tuple[Transaction, list[str], bool] | None = None

    def __repr__(self) -> str:
        return f"<SMTPConnection tls={self.tls_active} usable={self.usable}>"

    def tls_summary(self) -> str | None:
        """
        The TLS version and cipher of the session in Postfix's words
        (L{gsmail.tlsconfig.connection_summary}), or C{None} without TLS.
        """
        if not self.tls_active:
            return None
        from gsmail.tlsconfig import connection_summary

        try:
            handle = self._protocol.transport.getHandle()
        except Exception:
            handle = None
        return connection_summary(handle)

    @property
    def usable(self) -> bool:
        """C{False} once the connection failed, was aborted or quit."""
        return not self._closed and self._protocol.error is None

    # -- small steps ---------------------------------------------------------
    async def _read_raw(self, timeout: float, what: str) -> _RawReply:
        """The next reply; a 421 (RFC 5321 §3.8: closing) fails the session."""
        # Pipelined replies are mostly here already: no Deferred, no timer.
        raw = self._protocol.take()
        if raw is None:
            raw = await self._protocol.read(timeout, what)
        if raw.code == 421:
            error = SMTPClientError(
                f"the server is closing the connection (reply to {what})",
                transient=True,
                reply=raw.to_reply(),
            )
            self._protocol.fail(error)
            self._protocol.transport.loseConnection()
            raise error
        return raw

    async def _read(self, timeout: float, what: str) -> Reply:
        return (await self._read_raw(timeout, what)).to_reply()

    def _take(self) -> Reply | None:
        """
        The next reply if it has already arrived (pipelined replies mostly
        have), without a coroutine or a Deferred; else C{None}: use L{_read}.
        A 421 is left for L{_read} to fail the session with.
        """
        raw = self._protocol.take()
        if raw is None:
            return None
        if raw.code == 421:
            self._protocol.unread(raw)
            return None
        return raw.to_reply()

    async def _command(
        self, line: bytes, timeout: float, what: str, shown: str | None = None
    ) -> Reply:
        self._protocol.send_lines([line], None if shown is None else [shown])
        return await self._read(timeout, what)

    # -- opening -------------------------------------------------------------
    async def _open(
        self,
        helo: str,
        tls: ClientTLS | None,
        require_tls: bool,
        auth: tuple[str, str] | None,
        require_auth: bool,
    ) -> None:
        t = self._timeouts
        try:
            greeting = await self._read(t.greeting, "the greeting")
        except SMTPClientError as e:
            if self.tls_active and e.reply is None and not isinstance(e, _TimedOut):
                # Implicit TLS (port 465): the handshake failed.
                raise SMTPClientError(
                    f"TLS handshake or certificate verification failed ({e.detail})",
                    transient=True,
                    enhanced="4.7.5",
                ) from e
            raise
        if greeting.code != 220:
            raise SMTPClientError(
                "the server refused the session",
                transient=not greeting.is_permanent,
                reply=greeting,
            )
        self.greeting = greeting
        await self._hello(helo)
        if tls is not None and not self.tls_active and "STARTTLS" in self.extensions:
            reply = await self._command(b"STARTTLS", t.command, "the STARTTLS reply")
            if reply.code == 220:
                await self._start_tls(tls, helo)
            elif require_tls:
                raise SMTPClientError(
                    "TLS is required but the server refused STARTTLS",
                    transient=True,
                    enhanced="4.7.4",
                    reply=reply,
                )
            else:
                self.log.info(
                    "STARTTLS refused ({reply_code}); continuing without TLS",
                    reply_code=reply.code,
                )
        if require_tls and not self.tls_active:
            raise SMTPClientError(
                "TLS is required but the server does not offer STARTTLS"
                if tls is not None
                else "TLS is required but no TLS context was given",
                transient=True,
                enhanced="4.7.4",
            )
        if auth is not None:
            await self._authenticate(auth, require_auth)

    async def _hello(self, helo: str) -> None:
        t = self._timeouts
        name = helo.encode("ascii")
        if self._lmtp:
            raw = await self._raw_command(b"LHLO " + name, t.command, "the LHLO reply")
        else:
            raw = await self._raw_command(b"EHLO " + name, t.command, "the EHLO reply")
        if raw.code == 250:
            self.extensions = _parse_ehlo(raw.lines)
            return
        reply = raw.to_reply()
        if reply.is_permanent and not self._lmtp:
            # RFC 5321 §3.2: an old server; fall back to HELO, no extensions.
            reply = await self._command(b"HELO " + name, t.command, "the HELO reply")
            if reply.code == 250:
                self.extensions = {}
                return
        raise SMTPClientError(
            "the server refused our greeting", transient=not reply.is_permanent, reply=reply
        )

    async def _raw_command(self, line: bytes, timeout: float, what: str) -> _RawReply:
        self._protocol.send_lines([line])
        return await self._read_raw(timeout, what)

    async def _start_tls(self, tls: ClientTLS, helo: str) -> None:
        self._protocol.start_tls(tls.context)
        # The handshake runs under the next EHLO: a failed handshake or
        # certificate check shows up as the connection being lost meanwhile.
        try:
            await self._hello(helo)
        except SMTPClientError as e:
            if e.reply is None:
                raise SMTPClientError(
                    f"TLS handshake or certificate verification failed ({e.detail})",
                    transient=True,
                    enhanced="4.7.5",
                ) from e
            raise
        self.tls_active = True
        if self._protocol.trace:
            self.log.debug("TLS active")

    async def _authenticate(self, auth: tuple[str, str], require_auth: bool) -> None:
        t = self._timeouts
        offered = (self.extensions.get("AUTH") or "").upper().split()
        mechanism = "PLAIN" if "PLAIN" in offered else "LOGIN" if "LOGIN" in offered else None
        if mechanism is None:
            if require_auth:
                raise SMTPClientError(
                    "authentication is required but the server offers neither AUTH PLAIN "
                    "nor AUTH LOGIN",
                    transient=True,
                    enhanced="4.7.0",
                )
            self.log.info("The server offers no usable AUTH mechanism; sending without AUTH")
            return
        if not (self.tls_active or _is_loopback(self._protocol.transport.getPeer())):
            # Never send a password in clear over the network.
            if require_auth:
                raise SMTPClientError(
                    "refusing to send credentials without TLS",
                    transient=True,
                    enhanced="4.7.10",
                )
            self.log.warn("Not authenticating: TLS is not active; sending without AUTH")
            return
        user, password = (x.encode("utf-8") for x in auth)
        if mechanism == "PLAIN":
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            reply = await self._command(
                b"AUTH PLAIN " + token, t.command, "the AUTH reply", shown="AUTH PLAIN ****"
            )
        else:
            reply = await self._command(b"AUTH LOGIN", t.command, "the AUTH reply")
            for secret in (user, password):
                if reply.code != 334:
                    break
                reply = await self._command(
                    base64.b64encode(secret), t.command, "the AUTH reply", shown="****"
                )
        if reply.code != 235:
            # Transient whatever the code: the credentials (configuration)
            # are wrong, not the message. Postfix: smtp_sasl_auth_soft_bounce.
            raise SMTPClientError(
                f"authentication ({mechanism}) failed",
                transient=True,
                enhanced=reply.enhanced or "4.7.8",
                reply=reply,
            )
        self.authenticated = True

    # -- transactions --------------------------------------------------------
    async def send(
        self, transaction: Transaction, *, then: Transaction | None = None
    ) -> TransactionResult:
        """
        Run one mail transaction (RFC 5321 §3.3) on this connection.

        Recipients the server refuses get their RCPT reply in the result and
        do not stop the others. SMTPUTF8 is sent when the transaction asks
        for it or an address is not ASCII; if the server does not offer it,
        nothing is sent and every recipient gets L{SMTPUTF8_UNSUPPORTED}
        (C{553 5.6.7}, permanent: RFC 6531 §3.2 forbids sending such a
        message to that server, and gsmail does not downgrade). BODY=8BITMIME
        and XVERP are sent only when offered (without 8BITMIME the message
        is sent as is, as Postfix does by default), and so are the DSN
        parameters (C{RET}, C{ENVID}; C{NOTIFY}, C{ORCPT} on RCPT): check
        C{"DSN" in extensions} to know whether this server took over the
        notices (RFC 3461 §4).

        @return: the per-recipient outcome.
        @raise SMTPClientError: the connection failed, timed out, or the
            server answered 421; C{after_data} tells whether the message may
            have been accepted. The connection is then unusable.
        @raise ValueError: an address is not a valid mailbox, no
            recipients, an unknown parameter, or C{data} that is not C{size}
            bytes (nothing is sent; the connection stays usable); or not the
            transaction announced with C{then=} (the connection is dropped).
        @param then: the transaction the caller will send next on this
            connection, if it knows. With PIPELINING, its MAIL, RCPT and
            DATA commands go out in the same write as this message's data
            (RFC 2920 §3.1: message content may start a group), which saves
            a round trip and a write per message. Its data is only sent when
            C{send(then)} is called, so nothing of it can be delivered
            before: the caller may record this transaction's outcome first.
            The next call must then be C{send(then)} with that very object,
            or L{quit} or L{abort}.
        @raise OSError: the message file cannot be opened (nothing is sent,
            unless the transaction was announced: then the connection is
            dropped).
        """
        async with self._lock:
            return await self._send(transaction, then)

    async def _send(
        self, transaction: Transaction, then: Transaction | None = None
    ) -> TransactionResult:
        if not self.usable:
            error = self._protocol.error
            raise SMTPClientError(
                "the connection is closed" + (f" ({error.detail})" if error is not None else ""),
                transient=True,
                enhanced="4.4.2",
                reply=error.reply if error is not None else None,
            )
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            if prepared[0] is not transaction:
                # Its commands were sent; the server waits for its data.
                self.abort()
                raise ValueError("send() must be given the transaction announced with then=")
            recipients, smtputf8 = prepared[1], prepared[2]
        else:
            recipients = list(dict.fromkeys(transaction.recipients))
            _check_transaction(transaction, recipients)
            smtputf8 = _needs_smtputf8(transaction, recipients)
            if smtputf8 and "SMTPUTF8" not in self.extensions:
                return TransactionResult(
                    {r: SMTPUTF8_UNSUPPORTED for r in recipients}, SMTPUTF8_UNSUPPORTED, None
                )
        wire = self._wire(transaction.data)
        try:
            file = self._open_message(transaction.data_path) if wire is None else None
        except OSError:
            if prepared is not None:
                self.abort()  # the server waits for data that cannot come
            raise
        try:
            return await self._transact(
                transaction, recipients, smtputf8, file, wire, prepared is not None, then
            )
        except Exception:
            # Any failure mid-transaction (including a cancelled Deferred)
            # leaves the session state unknown: never reuse it. (Not
            # BaseException: a coroutine being closed must not act here.)
            self._protocol.fail(
                SMTPClientError(
                    "transaction abandoned",
                    transient=True,
                    enhanced="4.4.2",
                    after_data=self._protocol.after_data,
                )
            )
            self._protocol.transport.abortConnection()
            raise
        finally:
            if file is not None:
                file.close()

    def _open_message(self, path: str) -> IO[bytes]:
        # Unbuffered: each read is one read(2) of the file as it is now, so a
        # file that changes size is noticed. Also a seam for tests.
        return open(path, "rb", buffering=0)

    def _wire(self, data: bytes | None) -> bytes | None:
        """
        C{data} encoded for DATA, final dot included; the last one is kept,
        since VERP sends one message to each member in turn.
        """
        if data is None:
            return None
        cached = self._cached
        if cached is not None and cached[0] is data:
            return cached[1]
        encoder = DataEncoder()
        wire = encoder.encode(data) + encoder.finish()
        self._cached = (data, wire)
        return wire

    async def _transact(
        self,
        transaction: Transaction,
        recipients: list[str],
        smtputf8: bool,
        file: IO[bytes] | None,
        wire: bytes | None,
        announced: bool,
        then: Transaction | None,
    ) -> TransactionResult:
        t = self._timeouts
        pipelining = "PIPELINING" in self.extensions
        reset = self._needs_reset
        commands: list[bytes] = []
        if not announced:  # else they went out with the last message's data
            if reset:
                commands.append(b"RSET")
            commands += self._commands(transaction, recipients, smtputf8)
            if pipelining:
                commands.append(b"DATA")
                self._protocol.send_lines(commands)
        if reset:
            if not pipelining:
                self._protocol.send_lines([commands[0]])
            reply = await self._read(t.command, "the RSET reply")
            if not reply.is_success:
                raise SMTPClientError("the server refused RSET", transient=True, reply=reply)
            self._needs_reset = False
            commands.pop(0)
        if not pipelining:
            self._protocol.send_lines([commands[0]])
        mail_reply = self._take() or await self._read(t.mail, "the MAIL reply")
        results: dict[str, Reply] = {}
        accepted: list[str] = []
        if not pipelining and not mail_reply.is_success:
            return TransactionResult({r: mail_reply for r in recipients}, mail_reply, None)
        for i, rcpt in enumerate(recipients):
            if not pipelining:
                self._protocol.send_lines([commands[1 + i]])
            reply = self._take() or await self._read(t.rcpt, "a RCPT reply")
            results[rcpt] = reply
            if reply.is_success:
                accepted.append(rcpt)
        if pipelining:
            data_reply = self._take() or await self._read(t.data_init, "the DATA reply")
        elif accepted:
            data_reply = await self._command(b"DATA", t.data_init, "the DATA reply")
        else:
            data_reply = None
        if not mail_reply.is_success or not accepted:
            if data_reply is not None and data_reply.code == 354:
                # RFC 2920 §3.1: a server may still say 354; send an empty
                # message, which it cannot deliver to anyone.
                await self._command(b".", t.data_end, "the reply to an empty DATA")
            elif mail_reply.is_success:
                self._needs_reset = True
            if not mail_reply.is_success:
                results = {r: mail_reply for r in recipients}
            return TransactionResult(results, mail_reply, None)
        assert data_reply is not None
        if data_reply.code != 354:
            self._needs_reset = True
            for rcpt in accepted:
                results[rcpt] = data_reply
            return TransactionResult(results, mail_reply, data_reply)
        if wire is None and transaction.size < self._chunk_size:
            assert file is not None
            wire = _read_small(file, transaction.size)
        return await self._send_data(
            file, wire, transaction.size, results, accepted, mail_reply, then
        )

    def _commands(
        self, transaction: Transaction, recipients: list[str], smtputf8: bool
    ) -> list[bytes]:
        """MAIL and the RCPTs of C{transaction}."""
        encoding = "utf-8" if smtputf8 else "ascii"
        commands = [self._mail_command(transaction, smtputf8).encode(encoding)]
        wanted = transaction.rcpt_params if "DSN" in self.extensions else {}
        for r in recipients:
            extra = "".join(f" {k}={v}" for k, v in wanted.get(r, {}).items())
            commands.append(f"RCPT TO:<{r}>{extra}".encode(encoding))
        return commands

    def _announce(self, then: Transaction | None) -> list[bytes]:
        """
        The commands of C{then} to send after this message's final dot (none
        when it cannot be pipelined), noting it as the next to be sent.
        """
        if then is None or self._lmtp or "PIPELINING" not in self.extensions:
            return []
        recipients = list(dict.fromkeys(then.recipients))
        try:
            _check_transaction(then, recipients)
        except ValueError:
            return []  # send(then) reports it, before anything is sent
        smtputf8 = _needs_smtputf8(then, recipients)
        if smtputf8 and "SMTPUTF8" not in self.extensions:
            return []
        self._prepared = (then, recipients, smtputf8)
        return [*self._commands(then, recipients, smtputf8), b"DATA"]

    def _mail_command(self, transaction: Transaction, smtputf8: bool) -> str:
        ext = self.extensions
        params = transaction.params
        words = [f"MAIL FROM:<{transaction.sender}>"]
        if "SIZE" in ext:
            words.append(f"SIZE={_wire_size_estimate(transaction)}")
        if params.get("BODY", "7BIT") == "8BITMIME" and "8BITMIME" in ext:
            words.append("BODY=8BITMIME")
        if smtputf8:
            words.append("SMTPUTF8")
        if "XVERP" in params and "XVERP" in ext:
            value = params["XVERP"]
            words.append("XVERP" if value is None else f"XVERP={value}")
        if "DSN" in ext:
            words.extend(f"{k}={params[k]}" for k in ("RET", "ENVID") if params.get(k))
        return " ".join(words)

    async def _send_data(
        self,
        file: IO[bytes] | None,
        wire: bytes | None,
        size: int,
        results: dict[str, Reply],
        accepted: list[str],
        mail_reply: Reply,
        then: Transaction | None,
    ) -> TransactionResult:
        t = self._timeouts
        protocol = self._protocol
        replies = len(accepted) if self._lmtp else 1
        try:
            if wire is not None:
                # A small message: all of it, the final dot and the commands
                # of the next transaction in one write.
                protocol.send_whole(wire, replies, self._announce(then))
            else:
                assert file is not None
                sender = _DataSender(protocol, file, size, self._chunk_size, t.data_block)
                protocol.send_data(sender, replies)
                await sender.done
        except _EarlyReply as e:
            # The server answered before the dot: the message was not taken.
            reply = e.reply.to_reply()
            protocol.fail(
                SMTPClientError("the server replied during DATA", transient=True, enhanced="4.5.0")
            )
            protocol.transport.abortConnection()
            if reply.is_success or reply.code == 421:
                raise SMTPClientError(
                    "the server replied before the end of the data",
                    transient=True,
                    enhanced="4.5.0",
                    reply=reply,
                ) from None
            for rcpt in accepted:
                results[rcpt] = reply
            return TransactionResult(results, mail_reply, reply)
        if not self._lmtp:
            final = await self._read(t.data_end, "the reply to the final dot")
            protocol.after_data = False
            for rcpt in accepted:
                results[rcpt] = final
            return TransactionResult(results, mail_reply, final)
        # LMTP (RFC 2033 §4.2): one reply per accepted recipient, in order.
        partial: dict[str, Reply] = {}
        for rcpt in accepted:
            try:
                raw = await protocol.read(t.data_end, "a reply to the final dot")
            except SMTPClientError as e:
                e.partial = partial
                raise
            partial[rcpt] = raw.to_reply()
        protocol.after_data = False
        results.update(partial)
        if any(r.code == 421 for r in partial.values()):
            protocol.fail(SMTPClientError("the server is closing", transient=True))
            protocol.transport.loseConnection()
        return TransactionResult(results, mail_reply, status.worst(list(partial.values())))

    # -- closing -------------------------------------------------------------
    async def quit(self) -> None:
        """
        Say QUIT (unless the connection already failed, or a transaction
        announced with C{then=} was not sent: the server waits for its
        data, so the connection is just closed), wait for the reply
        and the close, each at most C{timeouts.quit} seconds, then drop the
        connection if it is still open. Never fails: nothing that happens now
        changes the mail already sent. Call it after an error too, so the
        socket is gone when it returns.
        """
        async with self._lock:
            if self._quit:
                return
            self._quit = True
            # After an announced transaction the server waits for its data:
            # QUIT would be taken for message text. Closing loses nothing.
            if self.usable and self._prepared is None:
                try:
                    await self._command(b"QUIT", self._timeouts.quit, "the QUIT reply")
                except SMTPClientError:
                    pass
            self._closed = True
            await self._wait_closed()

    async def _wait_closed(self) -> None:
        protocol = self._protocol
        if protocol.lost.called:
            return
        protocol.transport.loseConnection()
        closed: Deferred[None] = Deferred()
        protocol.lost.addBoth(lambda result: closed.callback(None) if not closed.called else None)
        closed.addTimeout(self._timeouts.quit, protocol.clock)
        try:
            await closed
        except DeferredTimeoutError:
            protocol.transport.abortConnection()

    def abort(self) -> None:
        """Drop the connection now; a pending L{send} fails (transient)."""
        self._closed = True
        self._protocol.fail(
            SMTPClientError(
                "connection aborted",
                transient=True,
                enhanced="4.4.2",
                after_data=self._protocol.after_data,
            )
        )
        self._protocol.transport.abortConnection()


async def connect(
    reactor: IReactorTime,
    endpoint: IStreamClientEndpoint,
    *,
    helo: str,
    tls: ClientTLS | None = None,
    require_tls: bool = False,
    auth: tuple[str, str] | None = None,
    require_auth: bool = False,
    clock: IReactorTime | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    lmtp: bool = False,
    chunk_size: int = CHUNK_SIZE,
    trace: bool = False,
) -> SMTPConnection:
    """
    Connect, read the greeting, EHLO (LHLO for LMTP), STARTTLS when offered
    and C{tls} is given (EHLO again after it), then AUTH when C{auth} is given.

    @param reactor: the reactor; its clock is used unless C{clock} is given.
    @param endpoint: where to connect (C{HostnameEndpoint}, C{TCP4ClientEndpoint},
        C{wrapClientTLS(...)} for implicit TLS on port 465, a UNIX endpoint
        for LMTP).
    @param helo: our host name for EHLO/HELO/LHLO (ASCII, no spaces).
    @param tls: the context for STARTTLS; C{None}: never start TLS.
    @param require_tls: fail (C{4.7.4}, transient) unless the session ends up
        encrypted; a failed handshake or certificate check is C{4.7.5}.
        Without it, a refused STARTTLS (4xx/5xx) continues in clear, but a
        failed handshake still fails the connection (it is gone): reconnect
        without C{tls} to fall back.
    @param auth: C{(username, password)} for AUTH PLAIN (preferred) or LOGIN.
        Sent only over TLS or to a loopback peer (127.0.0.0/8, ::1, UNIX
        socket); otherwise skipped, or an error with C{require_auth}.
    @param require_auth: fail (transient) unless AUTH succeeds.
    @param timeouts: the limits for each step, in seconds.
    @param lmtp: speak LMTP (RFC 2033): LHLO, one reply per recipient.
    @param chunk_size: bytes read from the message file per write.
    @param trace: log every command and reply (C{C:}/C{S:} debug events,
        AUTH secrets masked). Off by default: the trace costs more than the
        SMTP work itself, and nothing of it is formatted when off.
    @raise SMTPClientError: no connection (C{4.4.1}), refused greeting, EHLO
        and HELO, TLS or AUTH failure, timeout. The connection is closed.
    @raise ValueError: a bad C{helo} or C{require_auth} without C{auth}.
    """
    if not helo or not helo.isascii() or not helo.isprintable() or " " in helo:
        raise ValueError(f"bad HELO name {helo!r}")
    if require_auth and auth is None:
        raise ValueError("require_auth needs auth")
    clock = clock if clock is not None else reactor
    d = endpoint.connect(_ClientFactory(clock, trace))
    d.addTimeout(timeouts.connect, clock)
    try:
        protocol = await d
    except DeferredTimeoutError:
        raise SMTPClientError(
            f"no connection within {timeouts.connect:g} s", transient=True, enhanced="4.4.1"
        ) from None
    except Exception as e:
        raise SMTPClientError(f"could not connect: {e}", transient=True, enhanced="4.4.1") from None
    assert isinstance(protocol, _ClientProtocol)
    connection = SMTPConnection(protocol, timeouts=timeouts, lmtp=lmtp, chunk_size=chunk_size)
    try:
        await connection._open(helo, tls, require_tls, auth, require_auth)
    except Exception:
        # A refusal leaves a sound session: QUIT politely. Otherwise drop it.
        if not connection.usable:
            connection.abort()
        await connection.quit()
        raise
    return connection


# -- helpers -------------------------------------------------------------------


def _read_small(file: IO[bytes], size: int) -> bytes:
    """
    Read a small message file whole and encode it as DATA, final dot
    included.

    @param size: the bytes the file must hold.
    @raise SMTPClientError: it cannot be read or does not hold C{size} bytes
        (C{4.3.0}, transient: no dot may follow a damaged message).
    """
    parts = []
    total = 0
    try:
        while total <= size:
            chunk = file.read(size + 1 - total)
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
    except OSError as e:
        raise SMTPClientError(
            f"could not read the message file: {e.strerror}", transient=True, enhanced="4.3.0"
        ) from None
    if total != size:
        raise SMTPClientError(
            f"the message file has {'more than ' if total > size else ''}{total} bytes,"
            f" expected {size}",
            transient=True,
            enhanced="4.3.0",
        )
    encoder = DataEncoder()
    return encoder.encode(b"".join(parts)) + encoder.finish()


def _needs_smtputf8(transaction: Transaction, recipients: list[str]) -> bool:
    """Asked for, or needed because an address is not ASCII (RFC 6531)."""
    return "SMTPUTF8" in transaction.params or not (
        transaction.sender.isascii() and all(a.isascii() for a in recipients)
    )


def _parse_ehlo(lines: tuple[str, ...]) -> dict[str, str | None]:
    """The EHLO keywords after the first (greeting) line (RFC 5321 §4.1.1.1)."""
    extensions: dict[str, str | None] = {}
    for line in lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword and "=" not in keyword:  # skip old "AUTH=LOGIN" lines
            extensions[keyword.upper()] = params.strip() or None
    return extensions


def _wire_size_estimate(transaction: Transaction) -> int:
    """
    The SIZE value (RFC 1870 §4: octets with CRLF line ends, an estimate).
    Without the exact figure, assume LF line ends with an average line of 32
    bytes or more: a slight over-estimate for ordinary mail.
    """
    if transaction.wire_size is not None:
        return transaction.wire_size
    return transaction.size + transaction.size // 32 + 2


_KNOWN_PARAMS: Final = frozenset({"BODY", "SMTPUTF8", "XVERP", "RET", "ENVID"})
_KNOWN_RCPT_PARAMS: Final = frozenset({"NOTIFY", "ORCPT"})
_PARAM_VALUE: Final = re.compile(r"[\x21-\x3c\x3e-\x7e]+")


def _check_transaction(transaction: Transaction, recipients: list[str]) -> None:
    """Refuse, before anything is sent, what would break the command line."""
    if not recipients:
        raise ValueError("a transaction needs at least one recipient")
    if transaction.data is not None and len(transaction.data) != transaction.size:
        raise ValueError(f"data has {len(transaction.data)} bytes, not {transaction.size}")
    if transaction.params:
        unknown = set(transaction.params) - _KNOWN_PARAMS
        if unknown:
            raise ValueError(f"unknown MAIL parameters: {sorted(unknown)}")
        for value in transaction.params.values():
            if value is not None and not _PARAM_VALUE.fullmatch(value):
                raise ValueError(f"bad MAIL parameter value {value!r}")
    for rcpt_params in transaction.rcpt_params.values():
        unknown = set(rcpt_params) - _KNOWN_RCPT_PARAMS
        if unknown:
            raise ValueError(f"unknown RCPT parameters: {sorted(unknown)}")
        for value in rcpt_params.values():
            if not _PARAM_VALUE.fullmatch(value):
                raise ValueError(f"bad RCPT parameter value {value!r}")
    if transaction.checked:
        return
    addresses = recipients if transaction.sender == "" else [transaction.sender, *recipients]
    for address in addresses:
        try:
            parse_mailbox(address)
        except AddressError as e:
            raise ValueError(f"not a valid mailbox: {address!r} ({e})") from None


def _is_loopback(address: IAddress) -> bool:
    """Is the peer this host (loopback IP or UNIX socket)?"""
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "name", None) is not None  # UNIXAddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
