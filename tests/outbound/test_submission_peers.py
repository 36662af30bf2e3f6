# -*- test-case-name: tests.outbound.test_submission_peers -*-
"""
The submission listener over real sockets on 127.0.0.1, with Python's
smtplib as the submitter, used exactly as GroupServer uses it: gs.email's
mailer is a zope.sendmail C{SMTPMailer} (EHLO, STARTTLS when offered unless
C{no_tls}, an error without it under C{force_tls}, C{login()} whenever a
user name and password are set, then C{sendmail} with C{XVERP}). gsmail
delivers to Postfix's C{smtp-sink} (which offers DSN) or to a receiving
server built on gsmail's inbound protocol (which does not).

The assertions are what a user sees: smtplib's exceptions and reply codes,
what the next hop received, and the DSNs that came back.
"""

from __future__ import annotations

import os
import smtplib
import ssl
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from gsmail.outbound.dsn.parse import DSNRecipient, parse_dsn
from gsmail.service import GsmailService
from tests.certificates import make_certificate
from tests.integration.mailer import (
    GROUP,
    SmtpSink,
    decoded,
    describe_queue,
    group_message,
    member,
    queue_empty,
    record_enqueued,
    refusing_server,
    start_gsmail,
    submission_port,
)
from tests.util import eventually

USERNAME = "groupserver"
PASSWORD = "s3cret-submission"
#: An application's sender outside the site's domain, so its DSNs go to the next hop.
APP = "app@example.org"


@attrs.frozen
class Sent:
    """
    What one zope.sendmail-style send saw.

    @ivar starttls_offered: STARTTLS was in the EHLO reply.
    @ivar tls: the TLS version used, or C{None} in clear.
    @ivar refused: the recipients refused, as C{sendmail} returns them.
    """

    starttls_offered: bool
    tls: str | None
    refused: dict[str, tuple[int, bytes]]


def zope_sendmail(
    port: int,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    *,
    username: str | None = USERNAME,
    password: str | None = PASSWORD,
    no_tls: bool = False,
    force_tls: bool = False,
) -> Sent:
    """
    Send as zope.sendmail's C{SMTPMailer.send} does, with gs.email's XVERP
    option (blocking: run it in a thread). The port is given as a string,
    as zope.sendmail does; STARTTLS uses smtplib's default context, which
    does not check the certificate.

    @raise RuntimeError: as zope.sendmail: STARTTLS missing under
        C{force_tls}, or no ESMTP with a user name.
    @raise smtplib.SMTPException: what smtplib raises (a refused login,
        AUTH not offered, the whole transaction refused).
    """
    connection = smtplib.SMTP("127.0.0.1", str(port), local_hostname="gs.example.com", timeout=30)
    try:
        code, _ = connection.ehlo()
        if not 200 <= code < 300:
            code, _ = connection.helo()
            if not 200 <= code < 300:
                raise RuntimeError(f"HELO refused: {code}")
        offered = connection.has_extn("starttls")
        if force_tls and not offered:
            raise RuntimeError("TLS is not available but TLS is required")
        if offered and not no_tls:
            connection.starttls()
            connection.ehlo()
        if connection.does_esmtp:
            if username is not None and password is not None:
                connection.login(username, password)
        elif username:
            raise RuntimeError("Mailhost does not support ESMTP but a username is configured")
        tls = connection.sock.version() if isinstance(connection.sock, ssl.SSLSocket) else None
        refused = connection.sendmail(sender, list(recipients), message, mail_options=["XVERP"])
        return Sent(offered, tls, refused)
    finally:
        connection.quit()


class ZopeSendmailTests(TestCase):
    """
    GroupServer with C{username}/C{password} in its C{[smtp-NAME]} section
    can send, whatever its TLS options, and gsmail delivers what it sent.
    """

    timeout = 60

    async def gsmail(self, **overrides: Any) -> tuple[GsmailService, SmtpSink]:
        sink = SmtpSink(self)
        await sink.start()
        service = start_gsmail(
            self,
            f"[127.0.0.1]:{sink.port}",
            smtp_username=USERNAME,
            smtp_password=PASSWORD,
            **overrides,
        )
        return service, sink

    def certificate(self) -> dict[str, str]:
        cert, key, _ = make_certificate(os.path.abspath(self.mktemp()))
        return {"tls_certificate": cert, "tls_key": key}

    async def delivered(self, service: GsmailService, sink: SmtpSink, count: int = 1) -> None:
        """The sink got C{count} messages, each to one member from its VERP sender."""
        await eventually(
            lambda: queue_empty(service) and len(sink.transactions()) >= count,
            lambda: f"{describe_queue(service)}; {sink.describe()}",
        )
        found = sink.transactions()
        self.assertEqual(len(found), count)
        for t in found:
            self.assertEqual(decoded(t.sender), (GROUP, t.recipients[0]))

    def send(self, service: GsmailService, **options: Any) -> Deferred[Sent]:
        """zope_sendmail to C{service}'s submission listener, in a thread."""
        return deferToThread(
            zope_sendmail,
            submission_port(service),
            GROUP,
            [member(1)],
            group_message("Via zope.sendmail"),
            **options,
        )

    async def test_login_in_clear_from_loopback(self) -> None:
        """
        No certificate, so no STARTTLS: zope.sendmail logs in over plain TCP
        from 127.0.0.1 (a trusted client), and the mail goes out.
        """
        service, sink = await self.gsmail()
        sent = await self.send(service)
        self.assertEqual(sent, Sent(False, None, {}))
        await self.delivered(service, sink)

    async def test_no_tls(self) -> None:
        """
        C{no_tls = True} (gs.email's advice for a local MTA), with a
        certificate configured: the listener offers no STARTTLS, the login
        in clear works, and the mail goes out.
        """
        service, sink = await self.gsmail(no_tls=True, **self.certificate())
        sent = await self.send(service, no_tls=True)
        self.assertEqual(sent, Sent(False, None, {}))
        await self.delivered(service, sink)

    async def test_starttls_then_login(self) -> None:
        """By default, with a certificate: STARTTLS, then the login over TLS."""
        service, sink = await self.gsmail(**self.certificate())
        sent = await self.send(service)
        self.assertTrue(sent.starttls_offered)
        self.assertIsNotNone(sent.tls)
        await self.delivered(service, sink)

    async def test_force_tls(self) -> None:
        """
        C{force_tls = True}: STARTTLS is offered (zope.sendmail would refuse
        to send otherwise), used, and the mail goes out; a client that skips
        it gets 530 5.7.0 for MAIL, even from 127.0.0.1.
        """
        service, sink = await self.gsmail(force_tls=True, **self.certificate())
        sent = await self.send(service, force_tls=True)
        self.assertIsNotNone(sent.tls)
        await self.delivered(service, sink)

        def in_clear() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", submission_port(service), timeout=30) as s:
                s.ehlo("app.example.com")
                return s.mail(GROUP)

        self.assertEqual(
            await deferToThread(in_clear), (530, b"5.7.0 Must issue a STARTTLS command first")
        )

    async def test_wrong_password(self) -> None:
        """A wrong password is refused with 535 5.7.8; nothing is queued."""
        service, _ = await self.gsmail()
        failure = await self.assertFailure(
            self.send(service, password="wrong"), smtplib.SMTPAuthenticationError
        )
        self.assertEqual(failure.smtp_code, 535)
        self.assertTrue(failure.smtp_error.startswith(b"5.7.8 "))
        assert service.queue is not None
        self.assertEqual(service.queue.envelopes(), [])

    async def test_untrusted_client_needs_tls(self) -> None:
        """
        When 127.0.0.1 is not a trusted network, AUTH is not offered in
        clear (smtplib's login() says so), AUTH sent anyway is 538 5.7.11
        and MAIL is 554 5.7.1.
        """
        service, _ = await self.gsmail(submission_networks=("192.0.2.0/24",))
        await self.assertFailure(self.send(service), smtplib.SMTPNotSupportedError)

        def raw() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", submission_port(service), timeout=30) as s:
                s.ehlo("gs.example.com")
                auth = s.docmd("AUTH", "PLAIN AGdyb3Vwc2VydmVyAHMzY3JldC1zdWJtaXNzaW9u")
                return auth, s.mail(GROUP)

        auth, mail = await deferToThread(raw)
        self.assertEqual(auth[0], 538)
        self.assertTrue(auth[1].startswith(b"5.7.11 "))
        self.assertEqual(mail[0], 554)


def submit_with_dsn(
    port: int,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    mail_options: Sequence[str],
    rcpt_options: Sequence[str],
) -> dict[str, tuple[int, bytes]]:
    """One smtplib transaction with DSN parameters (blocking; run it in a thread)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="app.example.com", timeout=30) as s:
        s.ehlo()
        assert s.has_extn("dsn")
        return s.sendmail(sender, list(recipients), message, list(mail_options), list(rcpt_options))


class DSNPeerTests(TestCase):
    """The DSN parameters from smtplib to the next hop, and the reports that come back."""

    timeout = 60

    async def test_passed_on_to_smtp_sink(self) -> None:
        """
        smtp-sink offers DSN: it gets RET and ENVID on MAIL and NOTIFY and
        ORCPT (xtext) on RCPT as submitted, and gsmail sends no success
        report itself (the next hop reports).
        """
        sink = SmtpSink(self)
        await sink.start()
        service = start_gsmail(self, f"[127.0.0.1]:{sink.port}")
        enqueued = record_enqueued(self, service)
        refused = await deferToThread(
            submit_with_dsn,
            submission_port(service),
            APP,
            [member(1)],
            group_message("DSN passed on"),
            ["RET=HDRS", "ENVID=QQ+2B314"],
            ["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;old+2B{member(1)}"],
        )
        self.assertEqual(refused, {})
        await eventually(
            lambda: queue_empty(service) and bool(sink.transactions()),
            lambda: f"{describe_queue(service)}; {sink.describe()}",
        )
        [found] = sink.transactions()
        self.assertEqual(found.mail_args, f"<{APP}> RET=HDRS ENVID=QQ+2B314")
        self.assertEqual(
            found.rcpt_args,
            (f"<{member(1)}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;old+2B{member(1)}",),
        )
        self.assertEqual(enqueued, [(APP, (member(1),))], "a report was queued")

    async def test_success_report_from_server_without_dsn(self) -> None:
        """
        A next hop without DSN (gsmail's own inbound protocol): for
        NOTIFY=SUCCESS gsmail reports C{relayed} itself, to the sender, with
        Original-Recipient and Original-Envelope-Id; the member without
        NOTIFY gets no report.
        """
        core, _, port = await refusing_server(self, set())
        service = start_gsmail(self, f"[127.0.0.1]:{port}")
        await deferToThread(
            submit_with_dsn,
            submission_port(service),
            APP,
            [member(1)],
            group_message("Tell me"),
            ["ENVID=env-7"],
            ["NOTIFY=SUCCESS", f"ORCPT=rfc822;{member(1)}"],
        )
        await eventually(
            lambda: queue_empty(service) and len(core.received) >= 2,
            lambda: f"{describe_queue(service)}; received {len(core.received)}",
        )
        post, report = core.received
        self.assertEqual(post.recipients, (member(1),))
        self.assertEqual((report.sender, report.recipients), ("", (APP,)))
        self.assertEqual(
            parse_dsn(report.data), [DSNRecipient(member(1), "relayed", "2.0.0", member(1))]
        )
        self.assertIn(b"Original-Envelope-Id: env-7\n", report.data)
        self.assertIn(f"Original-Recipient: rfc822;{member(1)}\n".encode(), report.data)

    async def test_never_means_no_report(self) -> None:
        """A member refused with 550 and NOTIFY=NEVER: no DSN, nothing left queued."""
        core, _, port = await refusing_server(self, {member(13)})
        service = start_gsmail(self, f"[127.0.0.1]:{port}")
        enqueued = record_enqueued(self, service)
        await deferToThread(
            submit_with_dsn,
            submission_port(service),
            APP,
            [member(13)],
            group_message("Never"),
            [],
            ["NOTIFY=NEVER"],
        )
        await eventually(
            lambda: queue_empty(service) and bool(core.rcpts),
            lambda: describe_queue(service),
        )
        self.assertEqual(enqueued, [(APP, (member(13),))])
        self.assertEqual(core.received, [])
