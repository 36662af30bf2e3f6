# -*- test-case-name: tests.inbound.test_protocol -*-
"""
The ESMTP (RFC 5321) and LMTP (RFC 2033) server protocol.

gsmail owns this layer instead of subclassing C{twisted.mail.smtp.ESMTP}: the
fixes that class needs (reply ordering under pipelining, its own line
splitter for DATA, STARTTLS buffer and state reset, parameter parsing,
SMTPUTF8 addresses, per-recipient LMTP replies on every path, real 4xx codes
at end of data) replace nearly all of it, and would lean on its private,
name-mangled state. See docs/architecture.md.

How it stays safe:
  - Commands run strictly one at a time: a command whose check is
    asynchronous (RCPT's group lookup, the delivery after the final dot)
    holds back the next line until its reply is written, so pipelined
    replies come in command order (RFC 2920 §3.1). Bytes pending meanwhile
    are bounded; past the bound the transport is paused.
  - In DATA, only CR LF "." CR LF ends the message (bare LF or CR never do:
    no SMTP smuggling), and a body line is never read as a command, however
    long it is: an overlong line only marks the message as failed. A bare
    LF still ends a line (Postfix 3.9's C{smtpd_forbid_bare_newline =
    normalize}), so a client that sends LF line endings is not refused
    for "overlong lines"; a bare CR is data.
  - STARTTLS throws away anything the client sent after it in plaintext and
    forgets HELO and the transaction (RFC 3207 §4.2).
  - A full or failing spool disk is C{452 4.3.1}: at MAIL when the free
    space is below the declared SIZE (or there is none), at DATA when no
    spool file can be made, and after the final dot (one reply per LMTP recipient) when a
    write failed; the rest of that message is read and dropped, and the
    session goes on.
"""

from __future__ import annotations

import errno
import random
import tempfile
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, ITLSTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from gsmail import maillog, status
from gsmail.addresses import (
    Address,
    AddressError,
    ParameterError,
    Route,
    UnsafeAddressError,
    parse_number,
    parse_parameters,
    parse_path,
)
from gsmail.anvil import Anvil, ClientLimits, LookupGate
from gsmail.eager import write_now
from gsmail.inbound.spool import Spool, SpoolAlarm, SpooledMessage, SpoolFiles, free_space
from gsmail.logtext import printable
from gsmail.status import Reply
from gsmail.tlsconfig import connection_summary, handshake_failure_reason, is_tls_transport

__all__ = [
    "ServerSettings",
    "Session",
    "Envelope",
    "Core",
    "SMTPServer",
    "LMTPServer",
    "InboundFactory",
]

#: Longest command line, CRLF included. RFC 5321 §4.5.3.1.4 gives 512 octets
#: and lets extensions add to it (RFC 1870 §3 adds 26 for SIZE).
MAX_COMMAND_LINE = 2048
#: Unprocessed bytes kept while a command waits for its reply; past this the
#: transport is paused (back-pressure instead of an unbounded buffer).
MAX_PENDING = 64 * 1024


@attrs.frozen
class ServerSettings:
    """
    What a listener needs to know, in the units the protocol uses.

    @ivar hostname: the name in the greeting, EHLO reply and Received field.
    @ivar max_size: the SIZE limit, in bytes (RFC 1870).
    @ivar max_recipients: accepted RCPTs per transaction; more get C{452 4.5.3}.
    @ivar max_line_length: longest DATA line, CRLF included, in bytes.
    @ivar idle_timeout: seconds a client has for each command line, from
        the end of the previous reply (a deadline, not an idle timer that
        every byte resets: Postfix's C{smtpd_timeout} with
        C{smtpd_per_record_deadline}); past it C{421 4.4.2} and close.
    @ivar max_connections: concurrent connections per listener.
    @ivar tls: the server TLS context (C{IOpenSSLServerConnectionCreator}) or
        C{None}: STARTTLS is then not offered.
    @ivar min_data_rate: bytes per second a client must keep up in DATA: the
        message must be complete C{idle_timeout} + (bytes received) /
        C{min_data_rate} seconds after the 354 (Postfix's
        C{smtpd_min_data_rate}), else C{421 4.4.2}; C{0}: DATA only needs
        a byte every C{idle_timeout} seconds.
    @ivar soft_error_limit: errors (bad commands, refused recipients)
        after which each error reply to a limited client is delayed by
        C{error_sleep_time} seconds (C{smtpd_soft_error_limit},
        C{smtpd_error_sleep_time}).
    @ivar hard_error_limit: errors at which the session ends with C{421
        4.7.0} (C{smtpd_hard_error_limit}). Both counts start again when
        a message is accepted.
    @ivar junk_command_limit: NOOP, RSET, VRFY, EXPN and HELP commands
        allowed before each further one counts as an error
        (C{smtpd_junk_command_limit}); also reset by an accepted message.
    @ivar session_lookup_limit: GroupServer group lookups per session
        (cached answers are free); past it a recipient that needs one gets
        C{450 4.7.1} (L{gsmail.anvil.LookupGate}). C{0}: no cap.
    @ivar auth_failure_delay: seconds each failed AUTH reply to a limited
        client is held back (submission).
    """

    hostname: str
    max_size: int = 200 * 1024 * 1024
    max_recipients: int = 100
    max_line_length: int = 8192
    idle_timeout: float = 300.0
    max_connections: int = 1000
    tls: Any = None
    min_data_rate: int = 500
    soft_error_limit: int = 10
    hard_error_limit: int = 20
    error_sleep_time: float = 1.0
    junk_command_limit: int = 100
    session_lookup_limit: int = 200
    auth_failure_delay: float = 1.0


@attrs.define
class Session:
    """
    Per connection: who the peer is and what it said (aiosmtpd's split).

    @ivar peer: the peer's address as text (C{"[127.0.0.1]"}, C{"unix socket"}).
    @ivar helo: the HELO/EHLO/LHLO argument, or C{None} before it.
    @ivar extended: EHLO or LHLO (not HELO) was used.
    @ivar tls: TLS is active.
    @ivar id: a short random id of the session, in some log events' fields
        (the Received field has the message's queue id, L{Envelope.queue_id}).
    """

    peer: str
    protocol_name: str
    helo: str | None = None
    extended: bool = False
    tls: bool = False
    id: str = attrs.field(factory=lambda: f"{random.getrandbits(48):012x}")
    #: The user name given with AUTH (submission only), or C{None}.
    user: str | None = None
    #: Once the TLS handshake is done: version and cipher (L{connection_summary}).
    tls_summary: str | None = None
    #: The listener's name in the log: C{smtp}, C{lmtp} or C{submission}.
    listener: str = "smtp"
    #: The per-client abuse limits apply (L{gsmail.anvil}): an IP client of
    #: an ESMTP listener, not in the exception networks.
    limited: bool = False
    #: The session's GroupServer lookup caps, or C{None}: no cap.
    lookup_gate: LookupGate | None = None

    @property
    def with_protocol(self) -> str:
        """The C{with} word of the Received field (RFC 3848)."""
        if self.protocol_name == "LMTP":
            name = "LMTP"
        elif not self.extended:
            return "SMTP"
        else:
            name = "ESMTP"
        return name + ("S" if self.tls else "") + ("A" if self.user else "")


@attrs.define
class Envelope:
    """
    Per transaction: the envelope sender, its parameters and the accepted
    recipients, in RCPT order.

    @ivar sender: the reverse-path; C{None} for the null sender C{<>}.
    """

    sender: Address | None
    smtputf8: bool = False
    body: str = "7BIT"
    declared_size: int | None = None
    recipients: list[Route] = attrs.field(factory=list)
    #: Other MAIL FROM parameters a listener accepted (e.g. XVERP, RET, ENVID).
    params: dict[str, str | None] = attrs.field(factory=dict)
    #: The message's queue id (L{gsmail.maillog.new_queue_id}), given with the
    #: first accepted recipient; C{None} before (Postfix's C{NOQUEUE}).
    queue_id: str | None = None
    #: When the queue id was given (the reactor's seconds): the start of C{delay=}.
    arrived: float = 0.0


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


@implementer(IHandshakeListener)
class SMTPServer(Protocol, TimeoutMixin):
    """
    An ESMTP server for one connection (RFC 5321), with PIPELINING (RFC 2920),
    SIZE (RFC 1870), 8BITMIME (RFC 6152), ENHANCEDSTATUSCODES (RFC 2034),
    STARTTLS (RFC 3207) and SMTPUTF8 (RFC 6531).

    @ivar factory: the L{InboundFactory}; gives the settings, clock and core.
    """

    log = Logger()
    protocol_name = "ESMTP"
    #: The listener's name in the log (C{listener=}): C{smtp}, C{lmtp}, C{submission}.
    listener_name = "smtp"
    #: Give each message a queue id at its first recipient and log its
    #: C{client=} and C{from=} lines here; submission's queue does instead.
    assigns_queue_ids = True
    #: The per-client limits (L{gsmail.anvil}) apply to this listener's IP clients.
    client_limits = True
    factory: InboundFactory
    transport: Any  # a TCP/UNIX/TLS transport: IConsumer, IProducer, ITLSTransport

    def __init__(self) -> None:
        self._buffer = bytearray()
        # Commands wait while this is not 0: an asynchronous check or a
        # delayed error reply is running (see _wait_for).
        self._holds = 0
        self._processing = False
        self._paused = False
        self._closing = False
        self._errors = 0
        self._junk = 0
        self._delay: Any = None  # the IDelayedCall of a delayed error reply
        #: The client's address when the per-client limits apply to it.
        self._limited_host: str | None = None
        #: Takes the next line instead of the command dispatch (AUTH's 334 exchange).
        self._continuation: Callable[[str], None] | None = None
        self.session: Session | None = None
        self.envelope: Envelope | None = None
        self._data: _DataState | None = None
        #: Commands given, by lower-case verb, for the C{disconnect} line.
        self._commands: dict[str, int] = {}
        #: Postfix's name for the command waiting for its reply (C{MAIL},
        #: C{RCPT}, ...: L{_STAGES}): its refusal is logged as a C{reject}.
        self._stage: str | None = None
        self._stage_recipient: object = None
        #: MAIL's sender once parsed, for the reject line of a refused MAIL.
        self._stage_sender: str | None = None
        #: The last command's verb (Postfix's C{timeout after RCPT from ...}).
        self._last_command = "CONNECT"

    # -- connection ------------------------------------------------------
    def connectionMade(self) -> None:
        settings = self.factory.settings
        self.callLater = self.factory.clock.callLater  # type: ignore[method-assign, assignment]
        self.session = Session(
            peer=_describe_peer(self.transport),
            protocol_name=self.protocol_name,
            tls=is_tls_transport(self.transport),  # an implicit-TLS (ssl:) listener
            listener=self.listener_name,
        )
        self.factory.connections += 1
        maillog.connect(self.listener_name, self.client, log=self.log)
        if self.factory.connections > settings.max_connections:
            self._log_reject("CONNECT", status.TOO_MANY_CONNECTIONS)
            self._reply(status.TOO_MANY_CONNECTIONS)
            self._close()
            return
        anvil = self.factory.anvil
        host = _peer_host(self.transport)
        if anvil is not None and self.client_limits and host is not None and not anvil.exempt(host):
            self._limited_host = host
            self.session.limited = True
            refusal = anvil.connected(host)
            if refusal is not None:
                self._log_reject("CONNECT", refusal)
                self._reply(refusal)
                self._close()
                return
            self.session.lookup_gate = LookupGate(anvil, host, settings.session_lookup_limit)
        self.setTimeout(settings.idle_timeout)
        self.transport.write(f"220 {settings.hostname} {self.protocol_name} gsmail\r\n".encode())

    def handshakeCompleted(self) -> None:
        assert self.session is not None
        self.session.tls_summary = connection_summary(self.transport.getHandle())
        version, _, cipher = self.session.tls_summary.partition(" with cipher ")
        maillog.tls(
            self.listener_name,
            version,
            cipher,
            client=self.client,
            log=self.log,
            session=self.session.id,
        )

    @property
    def client(self) -> str:
        """The client as the log names it (L{gsmail.maillog.client_name})."""
        return maillog.client_name(self.session.peer if self.session else "unknown")

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

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._tls_handshaking():
            # Once, at info, without a traceback: scanners and broken clients are routine.
            assert self.session is not None
            self.log.info(
                "TLS handshake failed from {client}: {reason}",
                client=self.client,
                peer=self.session.peer,
                # _closing mid-handshake: timeoutConnection aborted it.
                reason="timed out" if self._closing else handshake_failure_reason(reason),
                session=self.session.id,
            )
        elif not self._closing and self.session is not None:
            # The client went without QUIT (Postfix's line).
            self.log.info(
                "lost connection after {command} from {client}",
                command=self._last_command,
                client=self.client,
                session=self.session.id,
            )
        self.factory.connections -= 1
        if self.session is not None:
            counts = " ".join(f"{verb}={count}" for verb, count in self._commands.items())
            total = sum(self._commands.values())
            maillog.disconnect(
                self.listener_name,
                self.client,
                f"{counts} commands={total}" if counts else "commands=0",
                log=self.log,
            )
        if self._limited_host is not None and self.factory.anvil is not None:
            self.factory.anvil.disconnected(self._limited_host)
        if self._delay is not None and self._delay.active():
            self._delay.cancel()
        self.setTimeout(None)
        self._closing = True
        if self._data is not None:
            self._data.spool.discard()
            self._data = None

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

    # -- input -------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        # No resetTimeout here: idle_timeout is a deadline per command line
        # (reset as each line is taken) and DATA has a minimum rate, so a
        # client sending a byte at a time cannot hold the session (slowloris).
        self._buffer += data
        self._process()

    def _process(self) -> None:
        """Run what is buffered until a command waits or input runs out."""
        if self._processing:
            return
        self._processing = True
        try:
            while not self._holds and not self._closing:
                if self._data is not None:
                    if not self._process_data():
                        break
                elif not self._process_command():
                    break
        finally:
            self._processing = False
        if self._holds and len(self._buffer) > MAX_PENDING and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _process_command(self) -> bool:
        """Run one command line if a whole one is buffered; C{False} if not."""
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_COMMAND_LINE:
                self._reply(status.LINE_TOO_LONG)
                self._close()
            return False
        if end + 1 > MAX_COMMAND_LINE:
            self._reply(status.LINE_TOO_LONG)
            self._close()
            return False
        raw = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self.resetTimeout()  # the next line's deadline starts now
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._continuation = None
            self._error(status.SYNTAX_ERROR.with_text("Command is not valid UTF-8"))
            return True
        if self._continuation is not None:
            # A line answering a 334 challenge (AUTH), not a command.
            continuation, self._continuation = self._continuation, None
            continuation(line)
            return True
        verb, _, arg = line.partition(" ")
        handler = (
            getattr(self, "do_" + verb.upper(), None) if verb.isascii() and verb.isalpha() else None
        )
        name = verb.lower() if handler is not None else "unknown"
        self._commands[name] = self._commands.get(name, 0) + 1
        self._stage = _STAGES.get(name)
        self._stage_sender = None
        self._last_command = name.upper()
        self._stage_recipient = arg[3:].strip() if name == "rcpt" else None
        if handler is None:
            self._error(status.UNRECOGNISED_COMMAND)
            return True
        try:
            result = handler(arg)
        except Exception:
            # A bug must cost one reply, not the connection and the replies
            # pipelined before it.
            self.log.failure("Unexpected error in a command")
            self._reply(status.LOCAL_ERROR)
            return True
        if isinstance(result, Deferred):
            self._wait_for(result)
        return True

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

    # -- DATA ------------------------------------------------------------------
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

    # -- commands ----------------------------------------------------------
    def _ehlo_lines(self) -> list[str]:
        settings = self.factory.settings
        lines = [
            settings.hostname,
            "PIPELINING",
            f"SIZE {settings.max_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ]
        if self._can_start_tls():
            lines.append("STARTTLS")
        return lines

    def _can_start_tls(self) -> bool:
        assert self.session is not None
        return (
            self.factory.settings.tls is not None
            and not self.session.tls
            and ITLSTransport.providedBy(self.transport)
        )

    def _greet(self, arg: str, extended: bool) -> None:
        assert self.session is not None
        name = arg.strip()
        if not name or not name.isprintable() or " " in name:
            self._error(status.SYNTAX_ERROR.with_text("Syntax: EHLO hostname"))
            return
        self._reset_transaction()
        self.session.helo = name
        self.session.extended = extended
        if extended:
            self.transport.write(status.multiline(250, self._ehlo_lines()))
        else:
            self.transport.write(f"250 {self.factory.settings.hostname}\r\n".encode())

    def do_EHLO(self, arg: str) -> None:
        self._greet(arg, extended=True)

    def do_HELO(self, arg: str) -> None:
        self._greet(arg, extended=False)

    def do_LHLO(self, arg: str) -> None:
        self._error(status.NOT_SMTP)

    def _need_helo(self) -> Reply:
        return status.NEED_HELO

    def do_MAIL(self, arg: str) -> None:
        assert self.session is not None
        if self.session.helo is None:
            self._error(self._need_helo())
            return
        if self.envelope is not None:
            self._error(status.NESTED_MAIL)
            return
        if arg[:5].upper() != "FROM:":
            self._error(status.SYNTAX_ERROR.with_text("Syntax: MAIL FROM:<address>"))
            return
        try:
            sender, rest = parse_path(arg[5:], allow_null=True)
            self._stage_sender = str(sender) if sender is not None else ""
            params = parse_parameters(rest)
        except UnsafeAddressError:
            self._error(status.UNSAFE_SENDER)
            return
        except ParameterError as e:
            self._error(status.SYNTAX_ERROR.with_text(f"Bad MAIL parameter: {e}"))
            return
        except AddressError as e:
            self._error(status.BAD_SENDER_SYNTAX.with_text(f"Bad sender address syntax: {e}"))
            return
        envelope = Envelope(sender=sender)
        for key, value in params.items():
            refusal = self.mail_parameter(envelope, key, value)
            if refusal is not None:
                if refusal.code == 552:
                    self._reply(refusal)
                else:
                    self._error(refusal)
                return
        if sender is not None and not sender.is_ascii and not envelope.smtputf8:
            self._error(status.SMTPUTF8_REQUIRED)
            return
        refusal = self._check_free_space(envelope.declared_size)
        if refusal is not None:
            self._reply(refusal)
            return
        self.envelope = envelope
        self._reply(status.SENDER_OK)

    def _check_free_space(self, declared_size: int | None) -> Reply | None:
        """
        Postfix's C{queue_minfree} idea at MAIL time, for one C{statvfs(2)}:
        C{452 4.3.1} (RFC 1870 §6.2, RFC 3463 X.3.1) when the spool's file
        system has less room than the declared SIZE, or none at all; else
        C{None}. A message that passes may still fail while it is written
        (answered after the final dot).
        """
        free = free_space(self.factory.spool_directory)
        if free is None or free >= max(declared_size or 0, 1):
            return None
        error = OSError(errno.ENOSPC, f"{free} bytes free, {declared_size or 0} declared")
        return self.factory.spool_alarm.failed(error, self.factory.spool_directory)

    def mail_parameter(self, envelope: Envelope, key: str, value: str | None) -> Reply | None:
        """
        Take one MAIL FROM parameter (RFC 5321 §4.1.2) into C{envelope}.

        @param key: the keyword, uppercased.
        @return: C{None} when accepted, else the refusal: C{552 5.3.4} for a
            SIZE over the limit (RFC 1870 §6), C{501 5.5.4} for a bad value,
            C{555 5.5.4} for a parameter this listener does not offer.
        """
        if key == "SIZE":
            try:
                envelope.declared_size = parse_number("SIZE", value, 10**20 - 1)
            except ParameterError as e:
                return status.SYNTAX_ERROR.with_text(f"Bad SIZE parameter: {e}")
            if envelope.declared_size > self.factory.settings.max_size:
                return status.MESSAGE_TOO_BIG.with_text(
                    f"Message size exceeds the limit of {self.factory.settings.max_size} bytes"
                )
            return None
        if key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return status.SYNTAX_ERROR.with_text("BODY must be 7BIT or 8BITMIME")
            envelope.body = value.upper()
            return None
        if key == "SMTPUTF8" and value is None:
            envelope.smtputf8 = True
            return None
        return status.UNKNOWN_PARAMETER.with_text(f"Unsupported parameter {key}")

    def rcpt_parameters(self, params: dict[str, str | None]) -> Reply | None:
        """
        Check the RCPT TO parameters; this listener offers none.

        @return: C{None} when accepted, else C{555 5.5.4}.
        """
        if params:
            return status.UNKNOWN_PARAMETER.with_text(f"Unsupported parameter {next(iter(params))}")
        return None

    def do_RCPT(self, arg: str) -> Deferred[None] | None:
        envelope = self.envelope
        if envelope is None:
            self._error(status.NEED_MAIL)
            return None
        if arg[:3].upper() != "TO:":
            self._error(status.SYNTAX_ERROR.with_text("Syntax: RCPT TO:<address>"))
            return None
        try:
            recipient, rest = parse_path(arg[3:], allow_null=False, allow_postmaster=True)
            params = parse_parameters(rest)
        except UnsafeAddressError:
            self._error(status.UNSAFE_RECIPIENT)
            return None
        except ParameterError as e:
            self._error(status.SYNTAX_ERROR.with_text(f"Bad RCPT parameter: {e}"))
            return None
        except AddressError as e:
            self._error(status.BAD_RECIPIENT_SYNTAX.with_text(f"Bad recipient address syntax: {e}"))
            return None
        assert recipient is not None
        self._stage_recipient = recipient
        refusal = self.rcpt_parameters(params)
        if refusal is not None:
            self._error(refusal)
            return None
        if not recipient.is_ascii and not envelope.smtputf8:
            self._error(status.SMTPUTF8_REQUIRED)
            return None
        if len(envelope.recipients) >= self.factory.settings.max_recipients:
            self._reply(status.TOO_MANY_RECIPIENTS)
            return None
        session = self.session
        assert session is not None
        d = self.factory.core.check_recipient(session, recipient)

        def answer(decision: tuple[Reply, Route | None]) -> None:
            reply, route = decision
            if route is not None and reply.is_success and self.envelope is envelope:
                if params:
                    route = attrs.evolve(route, params=tuple(params.items()))
                envelope.recipients.append(route)
                if envelope.queue_id is None and self.assigns_queue_ids:
                    envelope.queue_id = maillog.new_queue_id()
                    envelope.arrived = self.factory.clock.seconds()
                    maillog.client(
                        envelope.queue_id, self.client, log=self.log, listener=self.listener_name
                    )
            if reply.is_success or reply.code in _LOCAL_TROUBLE or not session.limited:
                self._reply(reply)
            else:
                # A refused address (no such group, relay denied, a lookup
                # cap) is an error, as in Postfix: a probe meets the
                # error sleep and the hard limit.
                self._error(reply)

        return d.addCallback(answer)

    def do_DATA(self, arg: str) -> None:
        if arg.strip():
            self._error(status.SYNTAX_ERROR.with_text("DATA takes no arguments"))
            return
        if self.envelope is None:
            self._error(status.NEED_MAIL)
            return
        if not self.envelope.recipients:
            self._reply(status.NO_VALID_RECIPIENTS)
            self.envelope = None
            self._refuse_pipelined_data()
            return
        try:
            spool = Spool(self.factory.spool_dir, files=self.factory.spool_files)
        except OSError as e:
            # No 354, so no message follows (RFC 5321 §4.1.1.4); the
            # transaction ends and the session goes on.
            self.envelope = None
            self._reply(self.factory.spool_alarm.failed(e, self.factory.spool_directory))
            self._refuse_pipelined_data()
            return
        self._data = _DataState(spool)
        self._data.started = self.factory.clock.seconds()
        self.setTimeout(self.factory.settings.idle_timeout)
        try:
            self.data_started(spool)
        except OSError as e:
            self._reset_transaction()
            self._reply(self.factory.spool_alarm.failed(e, self.factory.spool_directory))
            self._refuse_pipelined_data()
            return
        self._reply(status.START_DATA)

    def _refuse_pipelined_data(self) -> None:
        """After a refused DATA: close if the client sent its message anyway."""
        if self._buffer:
            # The client sent its message without waiting for 354 (RFC 2920
            # §3.1 forbids it): its lines must not run as commands.
            self._reply(Reply(421, "4.5.0", "Improper use of pipelining; closing connection"))
            self._close()

    def data_started(self, spool: Spool) -> None:
        """
        A hook for listeners that put trace fields before the message
        (submission); the inbound servers add theirs per recipient instead.
        """

    def do_RSET(self, arg: str) -> None:
        self._reset_transaction()
        self._junk_command(status.OK)

    def do_NOOP(self, arg: str) -> None:
        self._junk_command(status.OK)

    def do_VRFY(self, arg: str) -> None:
        self._junk_command(status.VRFY_CANNOT)

    def do_EXPN(self, arg: str) -> None:
        self._junk_command(status.NOT_IMPLEMENTED)

    def do_HELP(self, arg: str) -> None:
        self._junk_command(status.HELP)

    def do_QUIT(self, arg: str) -> None:
        self._reply(status.CLOSING)
        self._close()

    def do_AUTH(self, arg: str) -> None:
        self._error(status.NOT_IMPLEMENTED.with_text("AUTH not available on this port"))

    def do_BDAT(self, arg: str) -> None:
        self._error(status.NOT_IMPLEMENTED.with_text("CHUNKING not supported"))

    def do_STARTTLS(self, arg: str) -> None:
        assert self.session is not None
        if arg.strip():
            self._error(status.SYNTAX_ERROR.with_text("STARTTLS takes no arguments"))
            return
        if self.session.tls:
            self._error(status.ALREADY_TLS)
            return
        if not self._can_start_tls():
            self._error(status.TLS_NOT_AVAILABLE)
            return
        if self._buffer:
            # RFC 3207 §6 / CVE-2011-0411: plaintext sent after STARTTLS must
            # not be run inside the TLS session.
            self.log.warn(
                "Discarded {count} bytes pipelined after STARTTLS from {client}",
                count=len(self._buffer),
                client=self.client,
            )
            self._buffer.clear()
        self._reply(status.READY_FOR_TLS)
        self.transport.startTLS(self.factory.settings.tls)
        # RFC 3207 §4.2: forget everything learnt before TLS.
        self._reset_transaction()
        self.session.helo = None
        self.session.extended = False
        self.session.tls = True

    def _reset_transaction(self) -> None:
        self.envelope = None
        if self._data is not None:
            self._data.spool.discard()
            self._data = None


class LMTPServer(SMTPServer):
    """
    An LMTP server (RFC 2033): SMTP with LHLO instead of EHLO and, after the
    final dot, one reply per accepted recipient in RCPT order, on every path
    (delivery, size limit, empty message, overlong line).
    """

    protocol_name = "LMTP"
    listener_name = "lmtp"
    # LMTP's client is the site's own MTA, which has done its own checks.
    client_limits = False

    def do_LHLO(self, arg: str) -> None:
        self._greet(arg, extended=True)

    def do_EHLO(self, arg: str) -> None:
        self._error(status.NOT_LMTP)

    def do_HELO(self, arg: str) -> None:
        self._error(status.NOT_LMTP)

    def _need_helo(self) -> Reply:
        return status.NEED_LHLO

    def _data_replies(self, replies: list[Reply]) -> None:
        # RFC 2033 §4.2: one reply per successful RCPT, in order.
        self.transport.write(b"".join(r.encode() for r in replies))


class Core(TypingProtocol):
    """
    What a listener asks of its delivery core: the inbound
    L{gsmail.inbound.delivery.DeliveryCore}, or the submission core.
    """

    def check_recipient(
        self, session: Session, recipient: Address
    ) -> Deferred[tuple[Reply, Route | None]]:
        """The reply to C{RCPT TO:<recipient>} and, when accepted, its route."""

    def deliver(
        self, session: Session, envelope: Envelope, message: SpooledMessage
    ) -> Deferred[list[Reply]]:
        """Deliver after the final dot: one reply per recipient, in order; never fails."""


class InboundFactory(Factory):
    """
    Builds L{SMTPServer} or L{LMTPServer} connections over one delivery core.

    @ivar spool_dir: where message data is spooled (C{""}: the temp dir).
    @ivar spool_files: reusable spool files (see L{SpoolFiles}) to take
        instead of making a file per message, or C{None}.
    @ivar spool_alarm: logs spooling faults once per burst; share one
        between the listeners of a process.
    @ivar connections: the number of open connections.
    @ivar anvil: the per-client counters (L{gsmail.anvil.Anvil}) shared by
        the process's listeners; by default one of this factory's own with
        Postfix-like limits. LMTP listeners never limit their clients.
    """

    noisy = False

    def __init__(
        self,
        core: Core,
        settings: ServerSettings,
        clock: IReactorTime,
        *,
        lmtp: bool = False,
        spool_dir: str = "",
        spool_files: SpoolFiles | None = None,
        spool_alarm: SpoolAlarm | None = None,
        anvil: Anvil | None = None,
    ) -> None:
        self.core = core
        self.anvil = anvil if anvil is not None else Anvil(ClientLimits(), clock)
        self.settings = settings
        self.clock = clock
        self.protocol = LMTPServer if lmtp else SMTPServer  # type: ignore[assignment]
        self.spool_dir = spool_dir
        self.spool_files = spool_files
        self.spool_alarm = spool_alarm or SpoolAlarm("spooling", clock)
        self.connections = 0

    @property
    def spool_directory(self) -> str:
        """The directory spool files are made in."""
        if self.spool_files is not None:
            return self.spool_files.directory
        return self.spool_dir or tempfile.gettempdir()


#: The commands whose refusals are logged as C{reject} lines, by verb, with
#: Postfix's name for the stage.
_STAGES = {
    "helo": "HELO",
    "ehlo": "HELO",
    "lhlo": "HELO",
    "mail": "MAIL",
    "rcpt": "RCPT",
    "data": "DATA",
    "auth": "AUTH",
}

#: Replies that say gsmail (or GroupServer) is in trouble, not the client:
#: never counted as the client's errors.
_LOCAL_TROUBLE = frozenset({421, 451, 452})


def _peer_host(transport: Any) -> str | None:
    """The peer's IP address as text, or C{None} (a UNIX socket, or unknown)."""
    try:
        host = getattr(transport.getPeer(), "host", None)
    except Exception:
        return None
    return host if isinstance(host, str) else None


def _describe_peer(transport: Any) -> str:
    """The peer as text for logs and the Received field; safe for UNIX sockets."""
    try:
        peer = transport.getPeer()
    except Exception:
        return "unknown"
    host = getattr(peer, "host", None)
    if isinstance(host, str):
        return f"[{host}]"
    return "local"


__all__ += ["SpooledMessage"]
