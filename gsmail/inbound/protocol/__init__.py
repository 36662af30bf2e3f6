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

Where the parts are: this module has the connection (greeting, TLS
handshake, the end of the connection), the reading of input and the
command dispatch, LMTP's differences and the factory. L{SMTPServer} is
built of mixins, one per responsibility: the command handlers
(L{gsmail.inbound.protocol.commands}), the DATA phase
(L{gsmail.inbound.protocol.data}), replies, held input, error limits and
deadlines (L{gsmail.inbound.protocol.replies}); the settings, session and
envelope are plain values (L{gsmail.inbound.protocol.state}).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from gsmail import maillog, status
from gsmail.anvil import Anvil, ClientLimits, LookupGate
from gsmail.inbound.protocol.commands import SMTPCommands
from gsmail.inbound.protocol.data import DataReader, _DataState
from gsmail.inbound.protocol.replies import ReplyFlow
from gsmail.inbound.protocol.state import Core, Envelope, ServerSettings, Session
from gsmail.inbound.spool import SpoolAlarm, SpooledMessage, SpoolFiles
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


@implementer(IHandshakeListener)
class SMTPServer(SMTPCommands, DataReader, ReplyFlow, Protocol, TimeoutMixin):
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
