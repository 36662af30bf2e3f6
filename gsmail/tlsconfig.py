# -*- test-case-name: tests.test_tlsconfig -*-
"""
gsmail's server TLS: the context for STARTTLS (RFC 3207) on the ESMTP,
LMTP and submission listeners and for implicit-TLS (C{ssl:}) listeners
(RFC 8314), and short descriptions of handshakes for the log.

Why not Twisted's C{CertificateOptions}: it always installs an ALPN select
callback that, when a client offers protocols and none was configured,
answers with an empty protocol; OpenSSL 3 and later then abort the
handshake with a fatal C{internal_error} alert (RFC 8446 section 6.2), so
every client that sends ALPN (Android's and Go's TLS stacks do) cannot use
STARTTLS. gsmail speaks no protocol that ALPN names, so its context has no
ALPN callback at all and OpenSSL ignores the offer, as RFC 7301 section 3.2
lets a server that does not support ALPN do. Its default cipher string also
keeps CBC and static-RSA suites for TLS 1.2.

Cipher profiles (option C{tls_ciphers}, for the port-25 and LMTP listeners;
submission always uses C{intermediate}):

  - C{intermediate} (default): Mozilla's Server Side TLS guidelines 6.0,
    "intermediate" configuration: TLS 1.2 and 1.3; for TLS 1.2 only ECDHE
    key exchange (forward secrecy) with AES-GCM or ChaCha20-Poly1305 (AEAD);
    OpenSSL's TLS 1.3 suites and key exchange groups; the client's order of
    preference (C{server_preferred_order: false}).
  - C{compat}: also the ECDHE and static-RSA suites with AES-CBC (SHA-1 and
    SHA-2 HMACs) and static-RSA AES-GCM, still TLS 1.2 or later, with the
    server's order so that a client that has an AEAD/ECDHE suite still gets
    one. For port 25 only: opportunistic STARTTLS (RFC 7435 section 1.3)
    prefers any encryption to none, and a sending MTA whose handshake fails
    usually retries in plaintext. No 3DES, RC4, NULL or export suites.
"""

from __future__ import annotations

import re
from typing import Any, Final

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    INegotiated,
    IOpenSSLServerConnectionCreator,
    ISSLTransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "CIPHER_PROFILES",
    "ServerTLS",
    "connection_summary",
    "handshake_failure_reason",
    "implicit_tls_endpoint",
    "is_tls_transport",
    "unusable_reason",
]

#: Mozilla Server Side TLS guidelines 6.0, "intermediate": the TLS 1.2
#: suites, in Mozilla's order (OpenSSL names).
INTERMEDIATE_CIPHERS: Final = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)

#: C{intermediate} then the CBC and static-RSA suites older MTAs may need
#: for TLS 1.2 (Mozilla's former "old" list less 3DES, DHE, Camellia, SEED).
COMPAT_CIPHERS: Final = INTERMEDIATE_CIPHERS + (
    "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-RSA-AES128-SHA256",
    "ECDHE-ECDSA-AES256-SHA384",
    "ECDHE-RSA-AES256-SHA384",
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA256",
    "AES256-SHA256",
    "AES128-SHA",
    "AES256-SHA",
)

#: The values of C{tls_ciphers}: the TLS 1.2 suites of each profile.
CIPHER_PROFILES: Final[dict[str, tuple[str, ...]]] = {
    "intermediate": INTERMEDIATE_CIPHERS,
    "compat": COMPAT_CIPHERS,
}

# Resumption by session id from an in-process cache; no session tickets,
# whose key would protect every session of the process's lifetime (what
# Mozilla's generated server configurations turn off).
_SESSION_ID_CONTEXT: Final = b"gsmail"
_PEM_CERTIFICATE: Final = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The server side of TLS for one certificate: a pyOpenSSL context made
    once, a new connection per handshake. Pass it to C{startTLS} (STARTTLS)
    or to an C{SSL4ServerEndpoint} (implicit TLS).

    @ivar context: the configured C{OpenSSL.SSL.Context}; not to be changed
        (L{take} replaces it whole).
    @ivar profile: the name of the cipher profile (a key of
        L{CIPHER_PROFILES}).
    @ivar files: the certificate, key and chain files it was loaded from
        (C{""}: none), so a reload (SIGHUP) can read them again.
    """

    def __init__(
        self, context: SSL.Context, profile: str, files: tuple[str, str, str] = ("", "", "")
    ) -> None:
        self.context = context
        self.profile = profile
        self.files = files

    @classmethod
    def from_files(
        cls, certificate: str, key: str, profile: str = "intermediate", chain: str = ""
    ) -> ServerTLS:
        """
        Load a certificate and its key (blocking: call at start-up).

        @param certificate: a PEM file: the server's certificate, then any
            intermediate CA certificates (as Postfix's C{smtpd_tls_cert_file}).
        @param key: a PEM file holding the private key (unencrypted).
        @param profile: C{"intermediate"} or C{"compat"} (L{CIPHER_PROFILES}).
        @param chain: an optional further PEM file of intermediate CA
            certificates (C{ssl:} endpoints' C{extraCertChain}).
        @raise ValueError: C{profile} is unknown, or C{certificate} holds
            no certificate or a broken one.
        @raise OSError: a file cannot be read.
        @raise OpenSSL.SSL.Error: a file is not PEM, the key does not match
            the certificate, or OpenSSL knows none of the profile's suites.
        """
        ciphers = CIPHER_PROFILES.get(profile)
        if ciphers is None:
            raise ValueError(f"unknown TLS cipher profile {profile!r}")
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        options = SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET
        # Client-initiated renegotiation only costs the server CPU (TLS 1.2).
        options |= getattr(SSL, "OP_NO_RENEGOTIATION", 0)
        if profile != "intermediate":
            # With weaker suites allowed, a capable client still gets AEAD/ECDHE.
            options |= SSL.OP_CIPHER_SERVER_PREFERENCE
        context.set_options(options)
        # Idle connections give their read and write buffers back: many
        # sessions may sit waiting under load.
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        certificates = _pem_certificates(certificate)
        if not certificates:
            raise ValueError(f"{certificate}: no PEM certificate")
        context.use_certificate(certificates[0])
        for extra in certificates[1:] + (_pem_certificates(chain) if chain else []):
            context.add_extra_chain_cert(extra)
        context.use_privatekey_file(key)
        context.check_privatekey()
        context.set_cipher_list(":".join(ciphers).encode("ascii"))
        context.set_session_id(_SESSION_ID_CONTEXT)
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        # No set_alpn_select_callback: ALPN offers are ignored (see above).
        return cls(context, profile, (certificate, key, chain))

    def take(self, other: ServerTLS) -> None:
        """
        Use C{other}'s context (and files) for every handshake from now on
        (a reload: a renewed certificate). Connections made already keep the
        context they were made with; a pyOpenSSL connection holds its own.
        """
        self.context = other.context
        self.files = other.files

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802, N803
        """A new server connection for one handshake (Twisted calls this)."""
        return SSL.Connection(self.context, None)

    def __repr__(self) -> str:
        return f"<ServerTLS {self.profile}>"


def _pem_certificates(path: str) -> list[x509.Certificate]:
    """
    The certificates of a PEM file, in order; other blocks (a private key
    kept in the same file) are skipped.

    @raise ValueError: a certificate block is not a certificate.
    """
    with open(path, "rb") as f:
        text = f.read()
    return [
        x509.load_pem_x509_certificate(block.group(0)) for block in _PEM_CERTIFICATE.finditer(text)
    ]


def implicit_tls_endpoint(
    reactor: Any, description: str, profile: str, made: list[ServerTLS] | None = None
) -> Any | None:
    """
    For an C{ssl:} listener description (Twisted's syntax: C{ssl:PORT} with
    C{privateKey}, C{certKey}, C{extraCertChain}, C{interface}, C{backlog}),
    an C{SSL4ServerEndpoint} with gsmail's L{ServerTLS} instead of Twisted's
    C{CertificateOptions}, so that implicit TLS (RFC 8314) has the same
    protocol versions, suites and ALPN handling as STARTTLS. C{sslmethod}
    and C{dhParameters} are ignored: TLS 1.2 or later, no DHE suites.
    Other descriptions give C{None}.

    @param profile: the cipher profile (L{CIPHER_PROFILES}).
    @param made: the endpoint's L{ServerTLS} is appended to it (for reloads).
    @raise ValueError: the description is malformed or its files unusable.
    @raise OSError: a file cannot be read.
    @raise OpenSSL.SSL.Error: the key does not match the certificate.
    """
    from gsmail.config.reader import _split_unescaped, _unescape

    fields = _split_unescaped(description, ":")
    if fields[0].strip().lower() != "ssl":
        return None
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for field in fields[1:]:
        pair = _split_unescaped(field, "=", limit=1)
        if len(pair) == 2:
            keywords[_unescape(pair[0])] = _unescape(pair[1])
        else:
            positional.append(_unescape(field))
    names = ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog")
    for name, value in zip(names, positional, strict=False):
        keywords.setdefault(name, value)
    unknown = set(keywords) - {*names, "extraCertChain", "dhParameters"}
    if unknown or "port" not in keywords:
        raise ValueError(f"bad ssl: endpoint: {', '.join(sorted(unknown)) or 'no port'}")
    key = keywords.get("privateKey", "server.pem")
    tls = ServerTLS.from_files(
        keywords.get("certKey") or key, key, profile, chain=keywords.get("extraCertChain", "")
    )
    if made is not None:
        made.append(tls)
    from twisted.internet.endpoints import SSL4ServerEndpoint

    return SSL4ServerEndpoint(
        reactor,
        int(keywords["port"]),
        tls,
        backlog=int(keywords.get("backlog", 50)),
        interface=keywords.get("interface", ""),
    )


def unusable_reason(error: Exception) -> str:
    """
    A short reason a certificate, key or C{ssl:} description cannot be used,
    for one line: the exception's class and OpenSSL's reason, the OS error
    or our own message (never the files' contents), such as
    C{"Error (key values mismatch)"} or C{"FileNotFoundError (No such file or directory)"}.
    """
    if isinstance(error, SSL.Error):
        reason = handshake_failure_reason(Failure(error))
    elif isinstance(error, OSError):
        reason = error.strerror or ""
    else:
        reason = str(error) if isinstance(error, ValueError) else ""
    return f"{error.__class__.__name__} ({reason})" if reason else error.__class__.__name__


def is_tls_transport(transport: object) -> bool:
    """
    C{transport} already runs TLS: a STARTTLS upgrade (C{ISSLTransport}) or
    an implicit-TLS listener's connection (C{INegotiated}, the TLS layer).
    """
    return ISSLTransport.providedBy(transport) or INegotiated.providedBy(transport)


def connection_summary(connection: object) -> str:
    """
    The TLS version and cipher of an established connection, in Postfix's
    words: C{"TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"}.

    @param connection: an C{OpenSSL.SSL.Connection} (the transport's
        C{getHandle()}); anything else gives C{"TLS"}.
    """
    if not isinstance(connection, SSL.Connection):
        return "TLS"
    version = connection.get_protocol_version_name()
    cipher = connection.get_cipher_name()
    bits = connection.get_cipher_bits()
    return f"{version} with cipher {cipher} ({bits}/{bits} bits)"


def handshake_failure_reason(reason: Failure | None) -> str:
    """
    A short description of why a TLS handshake ended, for one log line:
    OpenSSL's reason (C{"unsupported protocol"}, C{"no shared cipher"},
    C{"tlsv1 alert unknown ca"}, C{"wrong version number"}), or how the
    connection ended (C{"connection lost"}, C{"connection closed by the
    client"}). Never a traceback.

    @param reason: the C{connectionLost} reason.
    """
    if reason is None:
        return "connection closed"
    error = reason.value
    if isinstance(error, SSL.Error):
        errors = error.args[0] if error.args else None
        if isinstance(errors, list) and errors:
            last = errors[-1]
            if isinstance(last, tuple) and last and last[-1]:
                return str(last[-1])
        return "TLS error"
    if isinstance(error, ConnectionDone):
        return "connection closed by the client"
    if isinstance(error, ConnectionLost):
        # Also an EOF without TLS's close_notify (Twisted's translation).
        return "connection lost"
    text = str(error).strip().rstrip(".")
    return text or type(error).__name__
