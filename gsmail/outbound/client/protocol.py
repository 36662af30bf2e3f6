# -*- test-case-name: tests.outbound.test_client -*-
"""
The I/O half of an outbound client connection (L{_ClientProtocol}): bytes
to replies through L{gsmail.outbound.client.replies.ReplyParser}, one
waiter at a time, the per-connection timer, the writes (pipelined command
groups, a whole small message, the DATA producer), STARTTLS's fresh parser,
and connection loss turned into L{SMTPClientError}.

Not here: the session logic, what to send and what a reply means
(L{gsmail.outbound.client.SMTPConnection}), the DATA encoding
(L{gsmail.outbound.client.data}).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail.eager import write_now
from gsmail.outbound.client.data import _DataSender, _EarlyReply
from gsmail.outbound.client.replies import (
    ReplyParser,
    SMTPClientError,
    _protocol_error,
    _RawReply,
    _TimedOut,
)

#: The client's log namespace, as before the split (log lines unchanged).
log = Logger(namespace="gsmail.outbound.client")


class _ClientProtocol(Protocol):
    """
    The I/O half of a connection: bytes to replies, one waiter at a time,
    timeouts, the data producer and connection loss. The session logic is
    in L{gsmail.outbound.client.SMTPConnection}.

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
