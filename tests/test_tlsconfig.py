"""
L{gsmail.tlsconfig}: the server context's handshakes with pyOpenSSL clients
over memory BIOs (no sockets: ALPN offers, suites, versions, the chain),
failure reasons, C{ssl:} listener parsing, and the C{tls_ciphers} option.
The same behaviour on real sockets with C{openssl s_client} and smtplib is
in C{tests.integration.test_tls}.
"""

from __future__ import annotations

import os

import attrs
from OpenSSL import SSL
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from gsmail.config import ConfigError, load_config
from gsmail.inbound.parts import load_tls
from gsmail.tlsconfig import (
    COMPAT_CIPHERS,
    INTERMEDIATE_CIPHERS,
    ServerTLS,
    handshake_failure_reason,
    implicit_tls_endpoint,
)
from tests.certificates import make_chain, write_pem
from tests.util import make_config

#: Handshake round trips allowed before a test gives up (a handshake needs 2-3).
MAX_ROUND_TRIPS = 10


@attrs.define
class Handshake:
    """The outcome of one client/server handshake over memory BIOs."""

    client: SSL.Connection
    server: SSL.Connection
    #: The first error of either side, then the server's alone.
    error: SSL.Error | None
    server_error: SSL.Error | None

    @property
    def server_reason(self) -> str:
        """The server's reason, as gsmail logs it."""
        assert self.server_error is not None
        return handshake_failure_reason(Failure(self.server_error))


def handshake(
    server_tls: ServerTLS,
    alpn: list[bytes] | None = None,
    version: int | None = None,
    ciphers: str | None = None,
) -> Handshake:
    """
    Run a pyOpenSSL client against C{server_tls} in memory.

    @param alpn: protocols the client offers by ALPN.
    @param version: the only TLS version the client offers (C{SSL.TLS1_2_VERSION}).
    @param ciphers: the client's TLS 1.2 cipher string.
    """
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if version is not None:
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
    if ciphers is not None:
        context.set_cipher_list(ciphers.encode("ascii"))
    client = SSL.Connection(context, None)
    client.set_connect_state()
    if alpn:
        client.set_alpn_protos(alpn)
    server = server_tls.serverConnectionForTLS(None)
    server.set_accept_state()
    errors: dict[str, SSL.Error] = {}
    done = {"client": False, "server": False}
    for _ in range(MAX_ROUND_TRIPS):
        for name, conn, peer in (("client", client, server), ("server", server, client)):
            if not done[name]:
                try:
                    conn.do_handshake()
                    done[name] = True
                except SSL.WantReadError:
                    pass
                except SSL.Error as e:
                    errors.setdefault(name, e)
            try:
                peer.bio_write(conn.bio_read(65536))
            except SSL.WantReadError:
                pass
        if errors or all(done.values()):
            break
    else:
        raise AssertionError("handshake neither finished nor failed")
    first = next(iter(errors.values()), None)
    return Handshake(client, server, first, errors.get("server"))


class ServerTLSTests(TestCase):
    """The handshakes gsmail's server context allows and refuses."""

    def setUp(self) -> None:
        self.chain, self.key, self.leaf = make_chain(self.mktemp())
        self.tls = ServerTLS.from_files(self.chain, self.key)

    def test_alpn_offer_ignored(self) -> None:
        """
        A client offering ALPN (C{h2}, C{http/1.1}, as Android and Go do)
        completes the handshake with no protocol selected, in TLS 1.3 and
        TLS 1.2 (Twisted's context aborted with C{internal_error}).
        """
        for version in (SSL.TLS1_3_VERSION, SSL.TLS1_2_VERSION):
            with self.subTest(version=version):
                result = handshake(self.tls, alpn=[b"h2", b"http/1.1"], version=version)
                self.assertIsNone(result.error)
                self.assertEqual(result.client.get_alpn_proto_negotiated(), b"")

    def test_tls11_refused(self) -> None:
        """A TLS 1.1 client is refused; the server's reason is "unsupported protocol"."""
        result = handshake(self.tls, version=SSL.TLS1_1_VERSION, ciphers="ALL:@SECLEVEL=0")
        self.assertEqual(result.server_reason, "unsupported protocol")

    def test_tls12_suites(self) -> None:
        """
        The TLS 1.2 suites on offer are Mozilla's intermediate six and
        nothing else; C{compat} adds its CBC and static-RSA suites.
        """
        for tls, expected in (
            (self.tls, INTERMEDIATE_CIPHERS),
            (ServerTLS.from_files(self.chain, self.key, "compat"), COMPAT_CIPHERS),
        ):
            offered = SSL.Connection(tls.context, None).get_cipher_list()
            tls12 = [name for name in offered if not name.startswith("TLS_")]
            self.assertEqual(sorted(tls12), sorted(expected))

    def test_cbc_refused(self) -> None:
        """A TLS 1.2 client with only CBC suites (ECDHE or static RSA) is refused."""
        rsa_chain, rsa_key, _ = make_chain(self.mktemp(), "rsa")
        tls = ServerTLS.from_files(rsa_chain, rsa_key)
        for suite in ("AES128-SHA", "ECDHE-RSA-AES128-SHA", "AES256-GCM-SHA384"):
            with self.subTest(suite=suite):
                result = handshake(tls, version=SSL.TLS1_2_VERSION, ciphers=suite)
                self.assertEqual(result.server_reason, "no shared cipher")

    def test_tls12_ecdhe_gcm(self) -> None:
        """A TLS 1.2 client gets ECDHE with AES-GCM."""
        result = handshake(self.tls, version=SSL.TLS1_2_VERSION)
        self.assertIsNone(result.error)
        self.assertRegex(result.server.get_cipher_name(), r"^ECDHE-ECDSA-AES\d+-GCM-SHA\d+$")

    def test_compat_prefers_aead(self) -> None:
        """
        With C{compat}, a client offering CBC first still gets an AEAD suite
        (server order), and a CBC-only client is served.
        """
        rsa_chain, rsa_key, _ = make_chain(self.mktemp(), "rsa")
        tls = ServerTLS.from_files(rsa_chain, rsa_key, "compat")
        both = handshake(
            tls, version=SSL.TLS1_2_VERSION, ciphers="AES128-SHA:ECDHE-RSA-AES128-GCM-SHA256"
        )
        self.assertEqual(both.server.get_cipher_name(), "ECDHE-RSA-AES128-GCM-SHA256")
        cbc = handshake(tls, version=SSL.TLS1_2_VERSION, ciphers="AES128-SHA")
        self.assertIsNone(cbc.error)
        self.assertEqual(cbc.server.get_cipher_name(), "AES128-SHA")

    def test_chain_sent(self) -> None:
        """The CA certificate after the server's in C{tls_certificate} is sent too."""
        result = handshake(self.tls)
        chain = result.client.get_peer_cert_chain(as_cryptography=True)
        assert chain is not None
        self.assertEqual(
            [c.subject.rfc4514_string() for c in chain],
            ["CN=mx.groups.example.com", "CN=gsmail test CA"],
        )

    def test_extra_chain_file(self) -> None:
        """An C{ssl:} endpoint's C{extraCertChain} file is sent after the certificate."""
        ca = os.path.join(os.path.dirname(self.chain), "ca.pem")
        with open(self.chain, "rb") as f:
            write_pem(ca, f.read().split(b"-----END CERTIFICATE-----\n", 1)[1])
        tls = ServerTLS.from_files(self.leaf, self.key, chain=ca)
        chain = handshake(tls).client.get_peer_cert_chain(as_cryptography=True)
        assert chain is not None
        self.assertEqual(len(chain), 2)

    def test_bad_files(self) -> None:
        """
        An unknown profile, a file without a certificate, and a key that does
        not match the certificate are refused.
        """
        with self.assertRaises(ValueError):
            ServerTLS.from_files(self.chain, self.key, "modern")
        with self.assertRaises(ValueError):
            ServerTLS.from_files(self.key, self.key)
        _, other_key, _ = make_chain(self.mktemp())
        with self.assertRaises(SSL.Error):
            ServerTLS.from_files(self.chain, other_key)


class FailureReasonTests(TestCase):
    """L{handshake_failure_reason}: one short phrase per way a handshake ends."""

    def test_openssl_reason(self) -> None:
        """OpenSSL's last reason, without library or function names."""
        error = SSL.Error([("SSL routines", "", "no shared cipher")])
        self.assertEqual(handshake_failure_reason(Failure(error)), "no shared cipher")

    def test_connection_ends(self) -> None:
        """A closed or lost connection says so; no reason at all is a close."""
        self.assertEqual(
            handshake_failure_reason(Failure(ConnectionDone())), "connection closed by the client"
        )
        self.assertEqual(handshake_failure_reason(Failure(ConnectionLost())), "connection lost")
        self.assertEqual(handshake_failure_reason(None), "connection closed")
        self.assertEqual(handshake_failure_reason(Failure(SSL.Error())), "TLS error")


class ImplicitTLSEndpointTests(TestCase):
    """C{ssl:} listener descriptions get gsmail's context."""

    def setUp(self) -> None:
        self.chain, self.key, _ = make_chain(self.mktemp())

    def test_not_ssl(self) -> None:
        """Other endpoint types are left to Twisted."""
        self.assertIsNone(implicit_tls_endpoint(MemoryReactor(), "tcp:25", "intermediate"))

    def test_ssl(self) -> None:
        """
        C{ssl:PORT:privateKey=...:certKey=...:interface=...} listens with a
        L{ServerTLS} of the given profile on that port and interface.
        """
        reactor = MemoryReactor()
        key = self.key.replace(":", "\\:")
        endpoint = implicit_tls_endpoint(
            reactor,
            f"ssl:4650:privateKey={key}:certKey={self.chain}:interface=127.0.0.1:backlog=7",
            "compat",
        )
        self.assertIsInstance(endpoint, SSL4ServerEndpoint)
        endpoint.listen(object())
        [(port, _, tls, backlog, interface)] = reactor.sslServers
        self.assertEqual((port, backlog, interface), (4650, 7, "127.0.0.1"))
        self.assertIsInstance(tls, ServerTLS)
        self.assertEqual(tls.profile, "compat")

    def test_bad(self) -> None:
        """An unknown argument or a missing port is refused."""
        for description in (f"ssl:privateKey={self.key}", f"ssl:465:privateKey={self.key}:x=1"):
            with self.subTest(description=description):
                with self.assertRaises(ValueError):
                    implicit_tls_endpoint(MemoryReactor(), description, "intermediate")


class OptionTests(TestCase):
    """The C{tls_ciphers} option and loading the configured files."""

    def load(self, text: str) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "gsconfig.ini")
        with open(path, "w", encoding="utf-8") as f:
            f.write(
                "[webservice-default]\ntoken = t0123456789\n"
                "[gsmail-default]\nurl = embedded\nsmtp_endpoint = tcp:25\n"
                "domains = groups.example.com\n" + text
            )
        return load_config(path).tls_ciphers

    def test_default_and_values(self) -> None:
        """C{intermediate} by default; C{compat} (any case) is taken."""
        self.assertEqual(self.load(""), "intermediate")
        self.assertEqual(self.load("tls_ciphers = Compat\n"), "compat")

    def test_unknown_value(self) -> None:
        """Another value is a one-line configuration error naming the option."""
        with self.assertRaises(ConfigError) as raised:
            self.load("tls_ciphers = modern\n")
        self.assertIn(
            "tls_ciphers: expected intermediate or compat, got 'modern'", str(raised.exception)
        )

    def test_load_tls_error(self) -> None:
        """Files that do not match give one line with OpenSSL's reason, no key material."""
        chain, _, _ = make_chain(self.mktemp())
        _, other_key, _ = make_chain(self.mktemp())
        config = make_config(self.mktemp(), tls_certificate=chain, tls_key=other_key)
        with self.assertRaises(ConfigError) as raised:
            load_tls(config)
        message = str(raised.exception)
        self.assertIn("tls_certificate/tls_key: cannot load: Error (", message)
        self.assertNotIn("\n", message)
        self.assertNotIn("PRIVATE KEY", message)
