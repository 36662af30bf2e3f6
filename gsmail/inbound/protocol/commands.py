# -*- test-case-name: tests.inbound.test_protocol,tests.inbound.test_limits -*-
"""
The commands of the ESMTP/LMTP server, one C{do_VERB} method each (HELO,
EHLO, LHLO, MAIL, RCPT, DATA, RSET, NOOP, VRFY, EXPN, HELP, QUIT, AUTH,
BDAT, STARTTLS), with the EHLO keywords and the MAIL/RCPT parameters.

A mixin of L{gsmail.inbound.protocol.SMTPServer}, which finds the method
by the command's verb; L{gsmail.inbound.protocol.LMTPServer} and the
submission server override some. Not the reading of command lines
(L{gsmail.inbound.protocol}), nor the message data after the 354
(L{gsmail.inbound.protocol.data}), nor the address and parameter syntax
(L{gsmail.addresses}).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITLSTransport
from twisted.logger import Logger

from gsmail import maillog, status
from gsmail.addresses import (
    AddressError,
    ParameterError,
    Route,
    UnsafeAddressError,
    parse_number,
    parse_parameters,
    parse_path,
)
from gsmail.inbound.protocol.data import _DataState
from gsmail.inbound.protocol.state import Envelope, Session
from gsmail.inbound.spool import Spool, free_space
from gsmail.status import Reply

if TYPE_CHECKING:
    from gsmail.inbound.protocol import InboundFactory

#: Replies that say gsmail (or GroupServer) is in trouble, not the client:
#: never counted as the client's errors.
_LOCAL_TROUBLE = frozenset({421, 451, 452})


class SMTPCommands:
    """
    The C{do_*} command handlers of L{gsmail.inbound.protocol.SMTPServer}
    (a mixin: see the module).
    """

    # The server's state this part reads and sets (SMTPServer.__init__).
    log: Logger
    factory: InboundFactory
    transport: Any
    assigns_queue_ids: bool
    listener_name: str
    session: Session | None
    envelope: Envelope | None
    _data: _DataState | None
    _buffer: bytearray
    _stage_sender: str | None
    _stage_recipient: object

    if TYPE_CHECKING:
        # From the other parts of the server.
        @property
        def client(self) -> str: ...
        def _reply(self, reply: Reply) -> None: ...
        def _error(self, reply: Reply, delay: float = 0.0) -> None: ...
        def _junk_command(self, reply: Reply) -> None: ...
        def _close(self) -> None: ...
        def setTimeout(self, period: float | None) -> None: ...

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
