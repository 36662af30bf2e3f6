# -*- test-case-name: tests.inbound.test_protocol,tests.inbound.test_limits -*-
"""
How the ESMTP/LMTP server answers and paces a client: writing a reply
(refusals logged as Postfix's C{reject:} lines), holding further input
while a command's reply is pending, the error and junk-command counts with
their delays and hard limit (Postfix's C{smtpd_*_limit}s), and the
deadlines (the per-command deadline, DATA's minimum rate, an unfinished
TLS handshake).

A mixin of L{gsmail.inbound.protocol.SMTPServer}: it has no state of its
own (the server's C{__init__} sets it up). Not the reply texts and codes
(L{gsmail.status}), nor the per-client connection counts
(L{gsmail.anvil}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail import maillog, status
from gsmail.eager import write_now
from gsmail.inbound.protocol.state import Envelope, Session
from gsmail.status import Reply

if TYPE_CHECKING:
    from gsmail.inbound.protocol import InboundFactory
    from gsmail.inbound.protocol.data import _DataState


class ReplyFlow:
    """
    Replies, held input, error limits and deadlines of
    L{gsmail.inbound.protocol.SMTPServer} (a mixin: see the module).
    """

    # The server's state this part reads and sets (SMTPServer.__init__).
    log: Logger
    protocol_name: str
    listener_name: str
    factory: InboundFactory
    transport: Any
    session: Session | None
    envelope: Envelope | None
    _data: _DataState | None
    _buffer: bytearray
    _holds: int
    _paused: bool
    _closing: bool
    _errors: int
    _junk: int
    _delay: Any
    _stage: str | None
    _stage_recipient: object
    _stage_sender: str | None
    _last_command: str

    if TYPE_CHECKING:
        # From the server (SMTPServer, TimeoutMixin).
        @property
        def client(self) -> str: ...
        def _process(self) -> None: ...
        def setTimeout(self, period: float | None) -> None: ...
        def resetTimeout(self) -> None: ...

    def _proto(self) -> str:
        """Postfix's C{proto=}: C{ESMTP} after EHLO, C{SMTP} before or after HELO, C{LMTP}."""
        if self.protocol_name == "LMTP":
            return "LMTP"
        return "ESMTP" if self.session is not None and self.session.extended else "SMTP"

    def _log_reject(
        self,
        stage: str,
        reply: Reply,
        recipient: object = None,
        envelope: Envelope | None = None,
    ) -> None:
        """
        Log a refused command as Postfix's C{reject:} line (L{gsmail.maillog.reject}):
        C{stage} is Postfix's word for the command (C{CONNECT}, C{HELO},
        C{MAIL}, C{RCPT}, C{DATA}, C{END-OF-MESSAGE}, C{AUTH}).
        """
        session = self.session
        envelope = envelope or self.envelope
        sender = self._stage_sender
        queue_id = None
        if envelope is not None:
            sender = str(envelope.sender) if envelope.sender else ""
            queue_id = envelope.queue_id
        maillog.reject(
            stage,
            reply.code,
            reply.enhanced,
            reply.text,
            client=self.client,
            proto=self._proto(),
            listener=self.listener_name,
            helo=session.helo if session else None,
            sender=sender,
            recipient=None if recipient is None else str(recipient),
            queue_id=queue_id,
            log=self.log,
        )

    def _tls_handshaking(self) -> bool:
        return self.session is not None and self.session.tls and self.session.tls_summary is None

    def timeoutConnection(self) -> None:
        if self._tls_handshaking():
            # Nothing can be said mid-handshake, and a reply queued behind the
            # handshake would keep the connection open for ever: abort.
            self._closing = True
            self.transport.abortConnection()
            return
        if self._holds:
            # gsmail's own work (a lookup, a delayed reply) is running: the
            # client is not late. It has its own deadlines.
            self.resetTimeout()
            return
        data = self._data
        if data is not None:
            settings = self.factory.settings
            now = self.factory.clock.seconds()
            arrived = data.received + len(self._buffer)
            if settings.min_data_rate:
                deadline = data.started + settings.idle_timeout + arrived / settings.min_data_rate
                if deadline > now:
                    self.setTimeout(deadline - now)
                    return
            elif arrived > data.seen:
                data.seen = arrived
                self.resetTimeout()
                return
            self.log.info(
                "timeout after DATA from {client}: {size} bytes in {seconds:.0f} s",
                client=self.client,
                size=arrived,
                seconds=now - data.started,
            )
            self._reply(status.DATA_TOO_SLOW)
            self._close()
            return
        self.log.info(
            "timeout after {command} from {client}", command=self._last_command, client=self.client
        )
        self._reply(status.IDLE_TIMEOUT)
        self._close()

    def _close(self) -> None:
        self._closing = True
        self.transport.loseConnection()

    def _reply(self, reply: Reply) -> None:
        if self._stage is not None:
            # The reply to the command of that stage: a refusal is logged.
            stage, self._stage = self._stage, None
            if reply.code >= 400:
                self._log_reject(stage, reply, self._stage_recipient)
        if not self._closing:
            if self._buffer.find(b"\n") < 0:
                # A client waiting for this reply gets it now, in one send(2)
                # (L{write_now}); replies to pipelined commands still
                # buffered here go out together with the last one.
                write_now(self.transport, reply.encode())
            else:
                self.transport.write(reply.encode())

    def _wait_for(self, d: Deferred[Any]) -> None:
        """
        Hold back further input until C{d} fires (its reply is written).
        Holds nest: a delayed error reply made while a RCPT's lookup is
        being answered keeps the input held until both are done.
        """
        self._holds += 1

        def resume(result: object) -> None:
            self._holds -= 1
            if isinstance(result, Failure):
                self.log.failure("Unexpected error in a command", result)
                self._reply(status.LOCAL_ERROR)
            if self._holds or self._closing:
                return
            if self._paused:
                self._paused = False
                self.transport.resumeProducing()
            self.resetTimeout()
            self._process()

        d.addBoth(resume)

    def _error(self, reply: Reply, delay: float = 0.0) -> None:
        """
        Send an error reply and count the error: past C{soft_error_limit}
        the reply to a limited client waits C{error_sleep_time} seconds (and
        so does the next command); at C{hard_error_limit} the reply is
        followed by C{421 4.7.0} and the connection is closed.

        @param delay: seconds to hold the reply back anyway (limited
            clients only), e.g. a failed AUTH's.
        """
        settings = self.factory.settings
        self._errors += 1
        if settings.hard_error_limit and self._errors >= settings.hard_error_limit:
            assert self.session is not None
            self.log.info(
                "too many errors after {command} from {client} ({count}); closing the session",
                command=self._last_command,
                client=self.client,
                count=self._errors,
                session=self.session.id,
            )
            self._reply(reply)
            self._reply(status.TOO_MANY_ERRORS)
            self._close()
            return
        if self.session is None or not self.session.limited:
            delay = 0.0
        elif self._errors > settings.soft_error_limit:
            delay = max(delay, settings.error_sleep_time)
        if delay <= 0:
            self._reply(reply)
            return
        # Postfix's smtpd_error_sleep_time: a prober or a password guesser
        # gets its answers slowly; the session's input waits meanwhile.
        done: Deferred[None] = Deferred()
        self._delay = self.factory.clock.callLater(delay, done.callback, None)
        done.addCallback(lambda _: self._reply(reply))
        self._wait_for(done)

    def _junk_command(self, reply: Reply) -> None:
        """A NOOP-like command: an error once C{junk_command_limit} have been sent."""
        self._junk += 1
        limit = self.factory.settings.junk_command_limit
        if limit and self._junk > limit:
            self._error(reply)
        else:
            self._reply(reply)
