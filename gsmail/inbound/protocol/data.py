# -*- test-case-name: tests.inbound.test_protocol,tests.inbound.test_limits -*-
"""
The DATA phase of the ESMTP/LMTP server: reading the message up to
CR LF "." CR LF, dot-unstuffing, the size and line-length limits, writing
it to the spool, and after the final dot handing it to the delivery core
and answering (one reply; one per recipient on LMTP).

A mixin of L{gsmail.inbound.protocol.SMTPServer} plus the bookkeeping of
one DATA phase (L{_DataState}). Not the DATA command itself (it starts
this phase: L{gsmail.inbound.protocol.commands}), nor the spool files
(L{gsmail.inbound.spool}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail import maillog, status
from gsmail.inbound.protocol.state import Envelope, Session
from gsmail.inbound.spool import Spool
from gsmail.logtext import printable
from gsmail.status import Reply

if TYPE_CHECKING:
    from gsmail.inbound.protocol import InboundFactory


class _DataState:
    """The bookkeeping of one DATA phase."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.received = 0  # bytes as transmitted (CRLF), for the SIZE limit
        self.started = 0.0  # when the 354 was sent (the DATA deadline)
        self.seen = 0  # bytes received when the DATA timer last fired
        self.error: Reply | None = None
        self.midline = False  # the last bytes consumed ended inside a line
        # The last line ended with CR LF (or none was read yet): only then
        # can "." CR LF end the data (CR LF "." CR LF, RFC 5321 §4.1.1.4).
        self.after_crlf = True


class DataReader:
    """
    The DATA phase of L{gsmail.inbound.protocol.SMTPServer} (a mixin: see
    the module).
    """

    # The server's state this part reads and sets (SMTPServer.__init__).
    log: Logger
    listener_name: str
    factory: InboundFactory
    transport: Any
    session: Session | None
    envelope: Envelope | None
    _data: _DataState | None
    _buffer: bytearray
    _closing: bool
    _errors: int
    _junk: int

    if TYPE_CHECKING:
        # From the other parts of the server.
        def _reply(self, reply: Reply) -> None: ...
        def _wait_for(self, d: Deferred[Any]) -> None: ...
        def _log_reject(
            self,
            stage: str,
            reply: Reply,
            recipient: object = None,
            envelope: Envelope | None = None,
        ) -> None: ...
        def setTimeout(self, period: float | None) -> None: ...

    def _process_data(self) -> bool:
        """
        Consume buffered message data up to the end-of-data mark; C{False}
        when more input is needed.
        """
        data = self._data
        assert data is not None
        buf = self._buffer
        limit = self.factory.settings.max_line_length
        if data.midline:
            # Inside an overlong line: skip to its end (CR LF or bare LF).
            end = buf.find(b"\n")
            if end < 0:
                keep = 1 if buf.endswith(b"\r") else 0
                del buf[: len(buf) - keep]
                return False
            # A CR before the LF was kept in the buffer, so end > 0 then.
            data.after_crlf = end > 0 and buf[end - 1] == 0x0D
            del buf[: end + 1]
            data.midline = False
        if data.after_crlf and buf[:3] == b".\r\n":
            del buf[:3]
            self._end_of_data()
            return True
        end_mark = buf.find(b"\r\n.\r\n")
        if end_mark >= 0:
            self._consume_lines(data, bytes(buf[: end_mark + 2]), limit)
            del buf[: end_mark + 5]
            self._end_of_data()
            return True
        last = buf.rfind(b"\n")
        if last >= 0:
            chunk = bytes(buf[: last + 1])
            data.after_crlf = chunk.endswith(b"\r\n")
            self._consume_lines(data, chunk, limit)
            del buf[: last + 1]
        if len(buf) > limit:
            # A line longer than allowed: fail the message, never the framing.
            data.error = data.error or status.DATA_LINE_TOO_LONG
            keep = 1 if buf.endswith(b"\r") else 0
            data.received += len(buf) - keep
            del buf[: len(buf) - keep]
            data.midline = True
        return False

    def _consume_lines(self, data: _DataState, chunk: bytes, limit: int) -> None:
        """
        Store whole lines (each ended by CR LF or a bare LF, still
        dot-stuffed) with LF line endings. A line starting with a dot loses
        it (RFC 5321 §4.5.2) whatever ends it, as in Postfix: a "." line
        that did not end the data (bare LF before or after it) is stored
        as an empty line.
        """
        data.received += len(chunk)
        if data.error is not None:
            return
        if data.received > self.factory.settings.max_size:
            data.error = status.MESSAGE_TOO_BIG
            return
        if len(chunk) > limit and max(map(len, chunk.split(b"\n"))) + 1 > limit:
            data.error = status.DATA_LINE_TOO_LONG
            return
        chunk = chunk.replace(b"\r\n", b"\n")
        if chunk[:1] == b".":
            chunk = chunk[1:]
        try:
            data.spool.write(chunk.replace(b"\n.", b"\n"))
        except OSError as e:
            # The spool has given its file back; the rest of the message
            # is read and dropped (error set), and answered after the dot.
            data.error = self.factory.spool_alarm.failed(e, self.factory.spool_directory)

    def _end_of_data(self) -> None:
        data = self._data
        envelope = self.envelope
        assert data is not None and envelope is not None and self.session is not None
        self._data = None
        self.envelope = None
        recipients = envelope.recipients
        error = data.error
        if error is None and data.spool.size == 0:
            error = status.EMPTY_MESSAGE
        if error is not None:
            data.spool.discard()
            self._refused(error, envelope)
            return
        try:
            message = data.spool.finish()
        except OSError as e:
            error = self.factory.spool_alarm.failed(e, self.factory.spool_directory)
            self._refused(error, envelope)
            return
        self.factory.spool_alarm.succeeded()
        if envelope.queue_id is not None:
            maillog.queued(
                envelope.queue_id,
                str(envelope.sender) if envelope.sender else "",
                message.size,
                len(recipients),
                self.listener_name,
                log=self.log,
                message_id=printable(message.message_id or ""),
            )
        self.setTimeout(None)  # the delivery has its own deadline
        count = len(recipients)
        d = self.factory.core.deliver(self.session, envelope, message)
        d.addErrback(self._delivery_failed, count)
        d.addCallback(self._delivered)
        d.addCallback(self._data_replies)
        d.addBoth(self._after_delivery)
        self._wait_for(d)

    def _refused(self, error: Reply, envelope: Envelope) -> None:
        """Refuse the message after the final dot: one reply, or one per recipient on LMTP."""
        self._log_reject("END-OF-MESSAGE", error, envelope=envelope)
        self._data_replies([error] * len(envelope.recipients))

    def _delivery_failed(self, failure: Failure, count: int) -> list[Reply]:
        # The core maps every fault to a reply; this is the safety net, and it
        # still gives LMTP its one reply per recipient.
        self.log.failure("Delivery failed unexpectedly", failure)
        return [status.LOCAL_ERROR] * count

    def _delivered(self, replies: list[Reply]) -> list[Reply]:
        """An accepted message starts the error, junk and lookup counts again (as Postfix)."""
        if any(reply.is_success for reply in replies):
            self._errors = self._junk = 0
            if self.session is not None and self.session.lookup_gate is not None:
                self.session.lookup_gate.reset()
        return replies

    def _after_delivery(self, result: object) -> object:
        if not self._closing:
            self.setTimeout(self.factory.settings.idle_timeout)
        return result

    def _data_replies(self, replies: list[Reply]) -> None:
        """SMTP: one reply for the whole transaction."""
        self._reply(status.worst(replies))
