"""
STARTTLS on real sockets with the clients attackers and MTAs use:
C{openssl s_client} offering ALPN (as Android's and Go's stacks do), TLS 1.1,
CBC and static-RSA suites, garbage instead of a ClientHello, or nothing at
all; smtplib completing whole transactions over TLS 1.3 and TLS 1.2; the
submission listener over STARTTLS and implicit TLS (C{ssl:}). Asserts what
the client sees (handshake, replies), what the stand-in received, and the
one log line gsmail writes per handshake.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from gsmail.service import GsmailService
from tests.certificates import make_certificate, make_chain
from tests.integration.clients import (
    CLIENT_TIMEOUT,
    EXAMPLE,
    SENDER,
    RawClient,
    as_stored,
    make_message,
    smtp_client,
    strip_trace,
)
from tests.util import make_config, port_of, require_tool, start_service

#: Polls of the log (every 50 ms) before a test gives up on a line.
LOG_POLLS = 200


class TLSServerTestCase(TestCase):
    """A running gsmail with a certificate, its log captured, and openssl."""

    #: Server key: C{"ec"} (the common test certificate) or C{"rsa"}.
    key_type = "ec"

    def setUp(self) -> None:
        self.openssl = require_tool("openssl")
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.directory = os.path.abspath(self.mktemp())
        if self.key_type == "rsa":
            cert, key, _ = make_chain(os.path.join(self.directory, "tls"), "rsa")
            with open(cert, encoding="ascii") as f:
                self.cert_pem = f.read()
        else:
            cert, key, self.cert_pem = make_certificate(os.path.join(self.directory, "tls"))
        self.cert, self.key = cert, key
        self.service = self.start(tls_certificate=cert, tls_key=key)
        self.port = port_of(self.service, "smtp")

    def start(self, **overrides: Any) -> GsmailService:
        """Another gsmail with C{overrides}, in a directory of its own."""
        self.services = getattr(self, "services", 0) + 1
        directory = os.path.join(self.directory, f"gsmail{self.services}")
        return start_service(self, make_config(directory, **overrides))

    async def s_client(
        self, *args: str, port: int | None = None, commands: Sequence[str] = ("EHLO x", "QUIT")
    ) -> str:
        """
        Run C{openssl s_client -starttls smtp} with C{args}; after a
        handshake it sends C{commands} and reads until gsmail closes.

        @return: its output (stdout and stderr).
        """
        argv = [self.openssl, "s_client", "-connect", f"127.0.0.1:{port or self.port}"]
        argv += ["-crlf", "-ign_eof", *args]
        stdin = "".join(c + "\n" for c in commands).encode()

        def run() -> str:
            done = subprocess.run(
                argv, input=stdin, capture_output=True, timeout=3 * CLIENT_TIMEOUT, check=False
            )
            return (done.stdout + done.stderr).decode("utf-8", "replace")

        return await deferToThread(run)

    def tls_lines(self) -> list[str]:
        """gsmail's TLS handshake log lines so far, formatted."""
        lines = [formatEvent(e) for e in self.events if _is_tls_event(e)]
        return [line for line in lines if line.startswith("TLS ")]

    async def tls_line(self, expected: str) -> str:
        """
        Wait (bounded) for the one handshake log line and check it starts
        with C{expected}.
        """
        for _ in range(LOG_POLLS):
            lines = self.tls_lines()
            if lines:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(expected), lines[0])
        self.assertEqual([e["log_level"].name for e in self.events if _is_tls_event(e)], ["info"])
        return lines[0]


def _is_tls_event(event: LogEvent) -> bool:
    return str(event.get("log_format", "")).startswith("TLS ")


class ALPNTests(TLSServerTestCase):
    """Clients that offer ALPN get a handshake, not an C{internal_error} alert."""

    async def test_openssl_alpn_tls13(self) -> None:
        """
        C{s_client -alpn h2,http/1.1}: TLS 1.3 handshake, no protocol
        selected, then EHLO is answered inside TLS; one log line at info
        with the peer, version and cipher.
        """
        output = await self.s_client("-starttls", "smtp", "-alpn", "h2,http/1.1")
        self.assertNotIn("alert", output)
        self.assertIn("New, TLSv1.3, Cipher is TLS_", output)
        self.assertIn("No ALPN negotiated", output)
        self.assertIn("250-mx.groups.example.com", output)
        self.assertIn("221 ", output)
        await self.tls_line(
            "TLS connection established from unknown[127.0.0.1]: TLSv1.3 with cipher TLS_"
        )

    async def test_openssl_alpn_tls12(self) -> None:
        """The same over TLS 1.2: ECDHE with AES-GCM, no protocol selected."""
        output = await self.s_client("-starttls", "smtp", "-tls1_2", "-alpn", "h2,http/1.1")
        self.assertNotIn("alert", output)
        self.assertRegex(output, r"New, TLSv1\.2, Cipher is ECDHE-ECDSA-AES\d+-GCM-SHA\d+")
        self.assertIn("250-mx.groups.example.com", output)

    async def test_python_alpn_transaction(self) -> None:
        """
        A client whose context offers ALPN (Python's ssl) upgrades with
        STARTTLS, verifies the certificate and sends a message, which reaches
        the group.
        """
        message = make_message("alpn@example.org")

        def send() -> tuple[str | None, dict[str, tuple[int, bytes]]]:
            context = ssl.create_default_context(cadata=self.cert_pem)
            context.set_alpn_protocols(["h2", "http/1.1"])
            with smtp_client(self.port) as client:
                client.starttls(context=context)
                selected = client.sock.selected_alpn_protocol()  # type: ignore[attr-defined]
                return selected, client.sendmail(SENDER, [EXAMPLE], message)

        self.assertEqual(await deferToThread(send), (None, {}))
        [post] = self.service.standin.posts("example")
        self.assertEqual(strip_trace(post), as_stored(message))


class TransactionTests(TLSServerTestCase):
    """Whole SMTP transactions over each TLS version gsmail takes."""

    async def send_over(self, version: ssl.TLSVersion, message_id: str) -> tuple[str, str]:
        """Send a message with smtplib limited to C{version}; the version and cipher used."""
        message = make_message(message_id)

        def send() -> tuple[str, str, dict[str, tuple[int, bytes]]]:
            context = ssl.create_default_context(cadata=self.cert_pem)
            context.minimum_version = context.maximum_version = version
            with smtp_client(self.port) as client:
                client.starttls(context=context)
                tls = client.sock
                assert isinstance(tls, ssl.SSLSocket)
                cipher = tls.cipher()
                assert cipher is not None
                return cipher[1], cipher[0], client.sendmail(SENDER, [EXAMPLE], message)

        used_version, cipher, refused = await deferToThread(send)
        self.assertEqual(refused, {})
        [post] = self.service.standin.posts("example")
        self.assertEqual(strip_trace(post), as_stored(message))
        self.assertIn(b" with ESMTPS ", post)
        return used_version, cipher

    async def test_tls13(self) -> None:
        """TLS 1.3: the message arrives; the log names version and cipher."""
        version, cipher = await self.send_over(ssl.TLSVersion.TLSv1_3, "tls13@example.org")
        self.assertEqual(version, "TLSv1.3")
        await self.tls_line(
            f"TLS connection established from unknown[127.0.0.1]: TLSv1.3 with cipher {cipher}"
        )

    async def test_tls12(self) -> None:
        """TLS 1.2: ECDHE with an AEAD suite; the message arrives."""
        version, cipher = await self.send_over(ssl.TLSVersion.TLSv1_2, "tls12@example.org")
        self.assertEqual(version, "TLSv1.2")
        self.assertRegex(cipher, r"^ECDHE-ECDSA-(AES\d+-GCM-SHA\d+|CHACHA20-POLY1305)$")
        await self.tls_line(
            f"TLS connection established from unknown[127.0.0.1]: TLSv1.2 with cipher {cipher}"
        )


class RefusedTests(TLSServerTestCase):
    """
    What gsmail refuses, with an RSA certificate (so that static-RSA suites
    could be chosen at all): each refusal is one info line with OpenSSL's
    reason, and the client sees a handshake failure.
    """

    key_type = "rsa"

    async def assert_refused(self, reason: str, *args: str) -> None:
        output = await self.s_client("-starttls", "smtp", *args)
        self.assertIn("Cipher is (NONE)", output)
        self.assertNotIn("250-mx.groups.example.com", output)
        line = await self.tls_line("TLS handshake failed from unknown[127.0.0.1]: ")
        self.assertEqual(line, f"TLS handshake failed from unknown[127.0.0.1]: {reason}")
        self.assertEqual(self.service.standin.posts("example"), [])

    async def test_tls11(self) -> None:
        """C{s_client -tls1_1} (at security level 0, so it really offers it): refused."""
        await self.assert_refused("unsupported protocol", "-tls1_1", "-cipher", "ALL:@SECLEVEL=0")

    async def test_tls10(self) -> None:
        """C{s_client -tls1}: refused."""
        await self.assert_refused("unsupported protocol", "-tls1", "-cipher", "ALL:@SECLEVEL=0")

    async def test_static_rsa_cbc(self) -> None:
        """C{-cipher AES128-SHA -tls1_2} (static RSA, CBC): no shared cipher."""
        await self.assert_refused("no shared cipher", "-tls1_2", "-cipher", "AES128-SHA")

    async def test_ecdhe_cbc(self) -> None:
        """ECDHE with CBC (C{ECDHE-RSA-AES128-SHA}, C{-SHA256}, C{AES256-SHA384}): refused."""
        await self.assert_refused(
            "no shared cipher",
            "-tls1_2",
            "-cipher",
            "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA384",
        )

    async def test_static_rsa_gcm(self) -> None:
        """Static RSA even with AES-GCM (no forward secrecy): refused."""
        await self.assert_refused(
            "no shared cipher", "-tls1_2", "-cipher", "AES128-GCM-SHA256:AES256-GCM-SHA384"
        )

    async def test_tls12_suites_accepted(self) -> None:
        """
        Probing each TLS 1.2 suite the client knows, one handshake each,
        gsmail takes exactly the ECDHE-RSA AEAD suites of Mozilla's
        intermediate set (before: 15 suites, 8 of them static RSA).
        """
        listed = subprocess.run(
            [self.openssl, "ciphers", "-s", "-tls1_2", "ALL:@SECLEVEL=0"],
            capture_output=True,
            check=True,
            timeout=CLIENT_TIMEOUT,
        )
        suites = [s for s in listed.stdout.decode().strip().split(":") if not s.startswith("TLS_")]
        self.assertIn("AES128-SHA", suites)
        accepted = []
        for suite in suites[:200]:
            output = await self.s_client(
                "-starttls", "smtp", "-tls1_2", "-cipher", f"{suite}:@SECLEVEL=0", commands=["QUIT"]
            )
            if f"Cipher is {suite}\n" in output:
                accepted.append(suite)
        self.assertEqual(
            sorted(accepted),
            [
                "ECDHE-RSA-AES128-GCM-SHA256",
                "ECDHE-RSA-AES256-GCM-SHA384",
                "ECDHE-RSA-CHACHA20-POLY1305",
            ],
        )


class AttackTests(TLSServerTestCase):
    """Bytes that are not a TLS handshake, and no bytes at all."""

    async def not_a_client_hello(self, data: bytes) -> str:
        """Send C{data} after C{220 Ready to start TLS}; gsmail's log line."""

        def talk() -> bool:
            with RawClient(self.port) as client:
                client.reply()
                client.send(b"EHLO x\r\n")
                client.reply()
                client.send(b"STARTTLS\r\n")
                client.reply()
                client.send(data)
                return client.closed_by_server()

        self.assertTrue(await deferToThread(talk))
        return await self.tls_line("TLS handshake failed from unknown[127.0.0.1]: ")

    async def test_http_instead_of_client_hello(self) -> None:
        """
        An HTTP request instead of a ClientHello closes the connection; the
        log has OpenSSL's reason, not a traceback.
        """
        line = await self.not_a_client_hello(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(line, "TLS handshake failed from unknown[127.0.0.1]: http request")

    async def test_smtp_instead_of_client_hello(self) -> None:
        """SMTP commands in plaintext instead of a ClientHello: "wrong version number"."""
        line = await self.not_a_client_hello(
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{EXAMPLE}>\r\n".encode()
        )
        self.assertEqual(line, "TLS handshake failed from unknown[127.0.0.1]: wrong version number")
        self.assertEqual(self.service.standin.posts("example"), [])

    async def test_client_leaves_mid_handshake(self) -> None:
        """
        A client that closes after STARTTLS (no close_notify: Twisted calls
        it a lost connection) is logged once as such.
        """

        def talk() -> None:
            with RawClient(self.port) as client:
                client.reply()
                client.send(b"EHLO x\r\nSTARTTLS\r\n")
                client.replies(2)

        await deferToThread(talk)
        await self.tls_line("TLS handshake failed from unknown[127.0.0.1]: connection lost")

    async def test_stalled_handshake_closed(self) -> None:
        """
        A client that sends STARTTLS and then nothing is disconnected at the
        idle timeout (it was kept open for ever: the 421 reply waited behind
        the handshake), and the log says the handshake timed out.
        """
        service = self.start(tls_certificate=self.cert, tls_key=self.key, idle_timeout=0.5)

        def talk() -> bool:
            sock = socket.create_connection(
                ("127.0.0.1", port_of(service, "smtp")), timeout=CLIENT_TIMEOUT
            )
            with sock:
                reader = sock.makefile("rb")
                reader.readline()
                sock.sendall(b"EHLO x\r\nSTARTTLS\r\n")
                while not reader.readline().startswith(b"220 "):
                    pass
                try:
                    return sock.recv(1) == b""  # blocks until gsmail closes, at most the timeout
                except ConnectionResetError:
                    return True

        self.assertTrue(await deferToThread(talk))
        await self.tls_line("TLS handshake failed from unknown[127.0.0.1]: timed out")


class CompatTests(TLSServerTestCase):
    """C{tls_ciphers = compat}: CBC and static RSA for old MTAs, still TLS 1.2 or later."""

    key_type = "rsa"

    def setUp(self) -> None:
        super().setUp()
        self.service = self.start(tls_certificate=self.cert, tls_key=self.key, tls_ciphers="compat")
        self.port = port_of(self.service, "smtp")

    async def test_cbc_taken(self) -> None:
        """A client with only C{AES128-SHA} gets it."""
        output = await self.s_client("-starttls", "smtp", "-tls1_2", "-cipher", "AES128-SHA")
        self.assertIn("Cipher is AES128-SHA\n", output)
        self.assertIn("Protocol  : TLSv1.2\n", output)
        self.assertIn("250-mx.groups.example.com", output)

    async def test_aead_preferred(self) -> None:
        """A client listing CBC first still gets ECDHE with AES-GCM."""
        output = await self.s_client(
            "-starttls", "smtp", "-tls1_2", "-cipher", "AES128-SHA:ECDHE-RSA-AES128-GCM-SHA256"
        )
        self.assertIn("Cipher is ECDHE-RSA-AES128-GCM-SHA256\n", output)

    async def test_tls11_still_refused(self) -> None:
        """TLS 1.1 is refused with C{compat} too."""
        output = await self.s_client("-starttls", "smtp", "-tls1_1", "-cipher", "ALL:@SECLEVEL=0")
        self.assertIn("Cipher is (NONE)", output)


class SubmissionTests(TLSServerTestCase):
    """The submission listener: STARTTLS and implicit TLS (C{ssl:}, RFC 8314)."""

    key_type = "rsa"

    def start_submission(self, endpoint: str) -> int:
        service = self.start(
            tls_certificate=self.cert,
            tls_key=self.key,
            tls_ciphers="compat",
            smtp_endpoint="",
            lmtp_endpoint="tcp:0:interface=127.0.0.1",
            submission_endpoint=endpoint,
            submission_networks=(),
            smtp_username="groupserver",
            smtp_password="s3cret-submission",
            queue_dir=os.path.join(self.directory, "queue"),
            processorthread=False,
        )
        return int(service.port("submission").getHost().port)

    async def test_starttls_alpn_and_intermediate(self) -> None:
        """
        STARTTLS on the submission port takes an ALPN offer, then offers
        AUTH; it keeps Mozilla's suites even when C{tls_ciphers = compat}.
        """
        port = self.start_submission("tcp:0:interface=127.0.0.1")
        output = await self.s_client("-starttls", "smtp", "-alpn", "h2", port=port)
        self.assertIn("New, TLSv1.3", output)
        self.assertIn("250 AUTH PLAIN LOGIN", output)
        refused = await self.s_client(
            "-starttls", "smtp", "-tls1_2", "-cipher", "AES128-SHA", port=port
        )
        self.assertIn("Cipher is (NONE)", refused)

    async def test_implicit_tls(self) -> None:
        """
        An C{ssl:} submission endpoint uses gsmail's context (an ALPN offer
        is taken, TLS 1.1 refused), and inside it EHLO offers AUTH and no
        STARTTLS: the session counts as TLS.
        """
        key = self.key.replace(":", "\\:")
        cert = self.cert.replace(":", "\\:")
        port = self.start_submission(f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1")
        output = await self.s_client("-alpn", "h2,http/1.1", port=port)
        self.assertIn("New, TLSv1.3", output)
        self.assertIn("250 AUTH PLAIN LOGIN", output)
        self.assertNotIn("STARTTLS", output)
        self.assertIn("221 ", output)
        old = await self.s_client("-tls1_1", "-cipher", "ALL:@SECLEVEL=0", port=port)
        self.assertIn("Cipher is (NONE)", old)
