# -*- test-case-name: tests.outbound.test_client -*-
"""
Opening an outbound client session: the greeting, EHLO (HELO when EHLO
gets a 5xx; LHLO for LMTP) and its keywords, STARTTLS (RFC 3207) with a
fresh EHLO after it, and AUTH PLAIN or LOGIN (RFC 4954), only over TLS or
to a loopback peer. These are steps of L{gsmail.outbound.client.connect}
on its L{gsmail.outbound.client.SMTPConnection}, whose reply reading they use.

Not here: the transactions that follow (L{gsmail.outbound.client.SMTPConnection.send}), the
reply parser (L{gsmail.outbound.client.replies}).
"""

from __future__ import annotations

import base64
import ipaddress
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IAddress

from gsmail.outbound.client.replies import SMTPClientError, _parse_ehlo, _RawReply, _TimedOut
from gsmail.outbound.client.values import ClientTLS

if TYPE_CHECKING:
    from gsmail.outbound.client import SMTPConnection


async def open_session(
    connection: SMTPConnection,
    helo: str,
    tls: ClientTLS | None,
    require_tls: bool,
    auth: tuple[str, str] | None,
    require_auth: bool,
) -> None:
    """
    Read the greeting, EHLO (LHLO), STARTTLS and AUTH as asked: the steps of
    L{gsmail.outbound.client.connect} after the connection is made, on its
    C{connection} (see there for the parameters).

    @raise SMTPClientError: a refused greeting, EHLO and HELO, TLS or AUTH
        failure, or a timeout; the caller closes the connection.
    """
    t = connection._timeouts
    try:
        greeting = await connection._read(t.greeting, "the greeting")
    except SMTPClientError as e:
        if connection.tls_active and e.reply is None and not isinstance(e, _TimedOut):
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
    connection.greeting = greeting
    await _hello(connection, helo)
    if tls is not None and not connection.tls_active and "STARTTLS" in connection.extensions:
        reply = await connection._command(b"STARTTLS", t.command, "the STARTTLS reply")
        if reply.code == 220:
            await _start_tls(connection, tls, helo)
        elif require_tls:
            raise SMTPClientError(
                "TLS is required but the server refused STARTTLS",
                transient=True,
                enhanced="4.7.4",
                reply=reply,
            )
        else:
            connection.log.info(
                "STARTTLS refused ({reply_code}); continuing without TLS",
                reply_code=reply.code,
            )
    if require_tls and not connection.tls_active:
        raise SMTPClientError(
            "TLS is required but the server does not offer STARTTLS"
            if tls is not None
            else "TLS is required but no TLS context was given",
            transient=True,
            enhanced="4.7.4",
        )
    if auth is not None:
        await _authenticate(connection, auth, require_auth)


async def _hello(connection: SMTPConnection, helo: str) -> None:
    t = connection._timeouts
    name = helo.encode("ascii")
    if connection._lmtp:
        raw = await _raw_command(connection, b"LHLO " + name, t.command, "the LHLO reply")
    else:
        raw = await _raw_command(connection, b"EHLO " + name, t.command, "the EHLO reply")
    if raw.code == 250:
        connection.extensions = _parse_ehlo(raw.lines)
        return
    reply = raw.to_reply()
    if reply.is_permanent and not connection._lmtp:
        # RFC 5321 §3.2: an old server; fall back to HELO, no extensions.
        reply = await connection._command(b"HELO " + name, t.command, "the HELO reply")
        if reply.code == 250:
            connection.extensions = {}
            return
    raise SMTPClientError(
        "the server refused our greeting", transient=not reply.is_permanent, reply=reply
    )


async def _raw_command(
    connection: SMTPConnection, line: bytes, timeout: float, what: str
) -> _RawReply:
    connection._protocol.send_lines([line])
    return await connection._read_raw(timeout, what)


async def _start_tls(connection: SMTPConnection, tls: ClientTLS, helo: str) -> None:
    connection._protocol.start_tls(tls.context)
    # The handshake runs under the next EHLO: a failed handshake or
    # certificate check shows up as the connection being lost meanwhile.
    try:
        await _hello(connection, helo)
    except SMTPClientError as e:
        if e.reply is None:
            raise SMTPClientError(
                f"TLS handshake or certificate verification failed ({e.detail})",
                transient=True,
                enhanced="4.7.5",
            ) from e
        raise
    connection.tls_active = True
    if connection._protocol.trace:
        connection.log.debug("TLS active")


async def _authenticate(
    connection: SMTPConnection, auth: tuple[str, str], require_auth: bool
) -> None:
    t = connection._timeouts
    offered = (connection.extensions.get("AUTH") or "").upper().split()
    mechanism = "PLAIN" if "PLAIN" in offered else "LOGIN" if "LOGIN" in offered else None
    if mechanism is None:
        if require_auth:
            raise SMTPClientError(
                "authentication is required but the server offers neither AUTH PLAIN "
                "nor AUTH LOGIN",
                transient=True,
                enhanced="4.7.0",
            )
        connection.log.info("The server offers no usable AUTH mechanism; sending without AUTH")
        return
    if not (connection.tls_active or _is_loopback(connection._protocol.transport.getPeer())):
        # Never send a password in clear over the network.
        if require_auth:
            raise SMTPClientError(
                "refusing to send credentials without TLS",
                transient=True,
                enhanced="4.7.10",
            )
        connection.log.warn("Not authenticating: TLS is not active; sending without AUTH")
        return
    user, password = (x.encode("utf-8") for x in auth)
    if mechanism == "PLAIN":
        token = base64.b64encode(b"\0" + user + b"\0" + password)
        reply = await connection._command(
            b"AUTH PLAIN " + token, t.command, "the AUTH reply", shown="AUTH PLAIN ****"
        )
    else:
        reply = await connection._command(b"AUTH LOGIN", t.command, "the AUTH reply")
        for secret in (user, password):
            if reply.code != 334:
                break
            reply = await connection._command(
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
    connection.authenticated = True


def _is_loopback(address: IAddress) -> bool:
    """Is the peer this host (loopback IP or UNIX socket)?"""
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "name", None) is not None  # UNIXAddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
