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

This module holds the session (L{SMTPConnection}: transactions, pipelining,
closing) and L{connect}. Its parts: the reply parser and the error
(L{gsmail.outbound.client.replies}), the DATA encoder and producer
(L{gsmail.outbound.client.data}), the connection's I/O, timers and writes
(L{gsmail.outbound.client.protocol}), the greeting, EHLO, STARTTLS and AUTH
(L{gsmail.outbound.client.opening}), and the caller's values with the checks
on a transaction (L{gsmail.outbound.client.values}).
"""

from __future__ import annotations

from typing import IO

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime, ISSLTransport, IStreamClientEndpoint
from twisted.logger import Logger

from gsmail import status
from gsmail.outbound.client.data import (
    CHUNK_SIZE,
    DataEncoder,
    _DataSender,
    _EarlyReply,
    _read_small,
)
from gsmail.outbound.client.opening import open_session
from gsmail.outbound.client.protocol import _ClientFactory, _ClientProtocol
from gsmail.outbound.client.replies import SMTPClientError, _RawReply
from gsmail.outbound.client.values import (
    DEFAULT_TIMEOUTS,
    SMTPUTF8_UNSUPPORTED,
    ClientTLS,
    Timeouts,
    Transaction,
    TransactionResult,
    _check_transaction,
    _needs_smtputf8,
    _wire_size_estimate,
)
from gsmail.status import Reply

# The values and the error are defined beside the parts that use them
# (client/values.py, client/replies.py, client/data.py) and exported here,
# where callers have always found them.
__all__ = [
    "CHUNK_SIZE",
    "ClientTLS",
    "DEFAULT_TIMEOUTS",
    "DataEncoder",
    "SMTPClientError",
    "SMTPConnection",
    "SMTPUTF8_UNSUPPORTED",
    "Timeouts",
    "Transaction",
    "TransactionResult",
    "connect",
]


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
        await open_session(connection, helo, tls, require_tls, auth, require_auth)
    except Exception:
        # A refusal leaves a sound session: QUIT politely. Otherwise drop it.
        if not connection.usable:
            connection.abort()
        await connection.quit()
        raise
    return connection
