# -*- test-case-name: tests.integration.test_routes -*-
"""
The route table (L{gsmail.routes}) over real sockets on 127.0.0.1: Python's
smtplib sends to a running gsmail; what arrives is read where a user would
find it (a receiving SMTP server standing in for the world, a Maildir read
back with C{mailbox}, the reply codes, a private INN news server read back
with an NNTP client, the files of C{errors_dir}).
"""

from __future__ import annotations

import mailbox
import os
import smtplib
import subprocess
import sys
import warnings
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from gsmail.config import ConfigError
from gsmail.inbound.routing import RoutedMessage
from gsmail.report import collect
from gsmail.service import makeService
from tests.integration.mailer import refusing_server
from tests.util import DOMAIN, eventually, make_config, port_of, start_service

OTHER = "lists.example.com"

#: Messages the handler route of these tests got.
HANDLED: list[RoutedMessage] = []


def remember(message: RoutedMessage) -> None:
    """A handler route's callable (tests.integration.test_routes:remember)."""
    HANDLED.append(message)


def explode(message: RoutedMessage) -> None:
    """A handler that fails, for the errors directory."""
    raise ValueError("the site's handler has a bug")


def message(subject: str, sender: str = "alice@example.org", extra: str = "") -> bytes:
    return (
        f"From: {sender}\r\nTo: someone\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.org>\r\n{extra}\r\n"
        f"Text of {subject}.\r\n"
    ).encode()


def sendmail(port: int, sender: str, recipients: list[str], data: bytes) -> Any:
    """Send with smtplib (in a thread); returns the refused dict or the exception."""

    def send() -> Any:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                return s.sendmail(sender, recipients, data)
        except smtplib.SMTPException as e:
            return e

    return deferToThread(send)


def write_routes(directory: str, text: str) -> str:
    path = os.path.join(directory, "routes.ini")
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


class PostmasterTests(TestCase):
    """RFC 5321 §4.5.1 with no route file at all."""

    async def test_accepted_on_every_domain(self) -> None:
        """postmaster at each domain, bare postmaster and abuse are accepted and kept."""
        directory = os.path.abspath(self.mktemp())
        config = make_config(directory, domains=(DOMAIN, OTHER))
        service = start_service(self, config)
        port = port_of(service, "smtp")
        rcpts = [f"postmaster@{DOMAIN}", f"PostMaster@{OTHER}", "postmaster", f"abuse@{OTHER}"]
        for n, rcpt in enumerate(rcpts):
            self.assertEqual(await sendmail(port, "a@example.org", [rcpt], message(f"pm {n}")), {})
        box = mailbox.Maildir(config.postmaster_maildir, create=False)
        self.assertEqual(sorted(m["Subject"] for m in box), [f"pm {n}" for n in range(4)])
        self.assertEqual(service.standin.posts("example"), [])

    async def test_too_many_hops(self) -> None:
        """A message with 31 Received fields: 554 5.4.6."""
        service = start_service(self, make_config(os.path.abspath(self.mktemp())))
        looping = "".join(f"Received: from hop{n}\r\n" for n in range(31))
        data = looping.encode() + message("loop")
        result = await sendmail(
            port_of(service, "smtp"), "a@example.org", [f"example@{DOMAIN}"], data
        )
        self.assertIsInstance(result, smtplib.SMTPDataError)
        self.assertEqual(result.smtp_code, 554)
        self.assertIn(b"5.4.6", result.smtp_error)


class ForwardTests(TestCase):
    """forward: queued on the outbound side with an SRS sender; bounces come back."""

    async def test_forward_and_srs_bounce(self) -> None:
        """
        Mail to support@ reaches the outside server with an SRS0 sender at the
        site's domain; a bounce sent to that SRS address reaches the original
        sender, with the null sender.
        """
        sink, _, sink_port = await refusing_server(self, set())
        directory = os.path.abspath(self.mktemp())
        routes = write_routes(
            directory, "[support@groups.example.com]\nforward = helper@example.net\n"
        )
        config = make_config(
            directory,
            routes=routes,
            submission_endpoint="tcp:0:interface=127.0.0.1",
            queue_dir=os.path.join(directory, "queue"),
            relayhost=f"[127.0.0.1]:{sink_port}",
        )
        service = start_service(self, config)
        port = port_of(service, "smtp")
        self.assertEqual(
            await sendmail(port, "alice@example.org", [f"support@{DOMAIN}"], message("help")), {}
        )
        await eventually(lambda: len(sink.received) == 1, lambda: f"{sink.received}")
        [forwarded] = sink.received
        self.assertEqual(forwarded.recipients, ("helper@example.net",))
        self.assertRegex(
            forwarded.sender, rf"^SRS0=[^=]+=[A-Z2-7]{{2}}=example\.org=alice@{DOMAIN}$"
        )
        self.assertIn(b"Subject: help\n", forwarded.data)
        # The outside server bounces it later: the bounce goes to the SRS address.
        bounce = b"From: MAILER-DAEMON@example.net\r\nSubject: Undelivered\r\n\r\nNo such user.\r\n"
        self.assertEqual(await sendmail(port, "", [forwarded.sender], bounce), {})
        await eventually(lambda: len(sink.received) == 2, lambda: f"{sink.received}")
        back = sink.received[1]
        self.assertEqual((back.sender, back.recipients), ("", ("alice@example.org",)))
        self.assertIn(b"No such user.", back.data)
        forged = "SRS0=AAAA" + forwarded.sender[len("SRS0=XXXX") :]
        result = await sendmail(port, "", [forged], bounce)
        self.assertIsInstance(result, smtplib.SMTPRecipientsRefused)

    def test_forward_needs_the_queue(self) -> None:
        """A route file with forward routes and no outbound queue: gsmail does not start."""
        directory = os.path.abspath(self.mktemp())
        routes = write_routes(directory, "[a@groups.example.com]\nforward = b@example.net\n")
        error = self.assertRaises(
            ConfigError, makeService, make_config(directory, routes=routes), reactor
        )
        self.assertIn("submission_endpoint", str(error))

    def test_bad_route_file(self) -> None:
        """A route file with a mistake: gsmail does not start, and says where."""
        directory = os.path.abspath(self.mktemp())
        routes = write_routes(directory, "[a@groups.example.com]\ngruop = dev\n")
        error = self.assertRaises(
            ConfigError, makeService, make_config(directory, routes=routes), reactor
        )
        self.assertIn("[a@groups.example.com] gruop: unknown key", str(error))


ROUTES = """
[announce@groups.example.com]
group = example
accept_from = boss@example.com
forbidden_words = lottery
max_size = 2K

[archive@groups.example.com]
archive = {archive}/${{date:%Y}}
subject_prefix = "[${{local}}] "
sequence_header = X-Sequence
add_header = X-Route: ${{route}} #${{seqno}}

[bot@groups.example.com]
handler = tests.integration.test_routes:remember

[broken@groups.example.com]
handler = tests.integration.test_routes:explode

[noreply@*]
reject = 550 5.7.1 Nobody reads this address
"""


class SiteTests(TestCase):
    """Policy, rewriting, archive, handler, reject and the error report, with one route file."""

    def start(self) -> Any:
        self.directory = os.path.abspath(self.mktemp())
        self.archive = os.path.join(self.directory, "archive")
        routes = write_routes(self.directory, ROUTES.format(archive=self.archive))
        self.config = make_config(self.directory, routes=routes, domains=(DOMAIN, OTHER))
        self.service = start_service(self, self.config)
        self.port = port_of(self.service, "smtp")
        return self.service

    async def test_policy(self) -> None:
        """Each rule refuses (5xx naming it, a copy in rejected/); a good message is posted."""
        self.start()
        a = f"announce@{DOMAIN}"
        cases = [
            (message("n1"), "accept_from", 550),
            (
                message("n2", "boss@example.com", "X: win the lottery\r\n").replace(
                    b"Text", b"lottery"
                ),
                "forbidden_words",
                550,
            ),
            (message("n3", "boss@example.com") + b"x" * 3000 + b"\r\n", "max_size", 552),
        ]
        for data, rule, code in cases:
            result = await sendmail(self.port, "boss@example.com", [a], data)
            self.assertIsInstance(result, smtplib.SMTPDataError, rule)
            self.assertEqual(result.smtp_code, code)
            self.assertIn(rule.encode(), result.smtp_error)
        self.assertEqual(
            await sendmail(self.port, "boss@example.com", [a], message("ok", "boss@example.com")),
            {},
        )
        [post] = self.service.standin.posts("example")
        self.assertIn(b"Subject: ok\n", post)
        rejected = collect(self.config.rejected_dir, "rejected", 0)
        self.assertEqual(
            sorted(e.rule for e in rejected), ["accept_from", "forbidden_words", "max_size"]
        )
        self.assertTrue(all(os.path.exists(e.path) for e in rejected))

    async def test_reject_at_rcpt(self) -> None:
        """A reject route refuses at RCPT with the site's words, at every domain."""
        self.start()
        result = await sendmail(self.port, "a@example.org", [f"noreply@{OTHER}"], message("x"))
        self.assertIsInstance(result, smtplib.SMTPRecipientsRefused)
        [(code, text)] = result.recipients.values()
        self.assertEqual((code, text), (550, b"5.7.1 Nobody reads this address"))

    async def test_archive_rewriting_and_sequence_across_restart(self) -> None:
        """
        Archived messages are read back with mailbox: subject prefixed,
        substitutions made, sequence numbers 1, 2, then 3 after a restart.
        """
        self.start()
        rcpt = [f"archive@{DOMAIN}"]
        for n in (1, 2):
            self.assertEqual(await sendmail(self.port, "a@example.org", rcpt, message(f"a{n}")), {})
        await self.service.stopService()
        self.service = start_service(self, self.config)
        self.port = port_of(self.service, "smtp")
        self.assertEqual(await sendmail(self.port, "a@example.org", rcpt, message("a3")), {})
        [year] = os.listdir(self.archive)
        box = mailbox.Maildir(os.path.join(self.archive, year), create=False)
        got = sorted((m["X-Sequence"], m["Subject"], m["X-Route"]) for m in box)
        self.assertEqual(
            got,
            [
                ("1", "[archive] a1", f"archive@{DOMAIN} #1"),
                ("2", "[archive] a2", f"archive@{DOMAIN} #2"),
                ("3", "[archive] a3", f"archive@{DOMAIN} #3"),
            ],
        )

    async def test_handler(self) -> None:
        """A handler route's callable gets the envelope and the message."""
        HANDLED.clear()
        self.start()
        self.assertEqual(
            await sendmail(self.port, "a@example.org", [f"bot@{DOMAIN}"], message("cmd")), {}
        )
        [m] = HANDLED
        self.assertEqual((m.sender, m.recipient), ("a@example.org", f"bot@{DOMAIN}"))

    async def test_errors_and_report(self) -> None:
        """
        A handler that raises: 451 to the sender, the message in errors/;
        gsmail-report mails a summary naming it to the postmaster, through
        the submission listener, to an outside server.
        """
        sink, _, sink_port = await refusing_server(self, set())
        self.directory = os.path.abspath(self.mktemp())
        routes = write_routes(self.directory, ROUTES.format(archive="/nonexistent"))
        self.config = make_config(
            self.directory,
            routes=routes,
            submission_endpoint="tcp:0:interface=127.0.0.1",
            queue_dir=os.path.join(self.directory, "queue"),
            relayhost=f"[127.0.0.1]:{sink_port}",
            postmaster_address="admin@example.net",
        )
        service = start_service(self, self.config)
        port = port_of(service, "smtp")
        result = await sendmail(port, "a@example.org", [f"broken@{DOMAIN}"], message("boom"))
        self.flushLoggedErrors(ValueError)
        self.assertIsInstance(result, smtplib.SMTPDataError)
        self.assertEqual(result.smtp_code, 451)
        [error] = collect(self.config.errors_dir, "error", 0)
        self.assertEqual(error.route, f"broken@{DOMAIN}")
        self.assertIn("the site's handler has a bug", error.why)
        # The report, as cron runs it: another process, gsmail's configuration.
        submission = service.port("submission").getHost().port
        ini = os.path.join(self.directory, "gsconfig.ini")
        with open(ini, "w") as f:
            f.write(
                "[webservice-default]\ntoken = test-token-0123456789\n"
                "[gsmail-default]\nurl = embedded\n"
                f"smtp_endpoint = tcp:0:interface=127.0.0.1\ndomains = {DOMAIN}\n"
                f"errors_dir = {self.config.errors_dir}\nrejected_dir = {self.config.rejected_dir}\n"
                f"submission_endpoint = tcp:{submission}:interface=127.0.0.1\n"
                f"postmaster_address = admin@example.net\n"
                f"queue_dir = {self.config.queue_dir}\n"
            )
        code = await deferToThread(
            subprocess.call,
            [sys.executable, "-c", "from gsmail.report import main; main()", "-c", ini],
            env=dict(os.environ),
        )
        self.assertEqual(code, 0)
        await eventually(
            lambda: any("admin@example.net" in r.recipients for r in sink.received),
            lambda: f"{sink.received}",
        )
        [report] = [r for r in sink.received if "admin@example.net" in r.recipients]
        self.assertIn(b"Subject: gsmail report for groups.example.com", report.data)
        self.assertIn(b"route broken@groups.example.com", report.data)
        self.assertIn(error.path.encode(), report.data)


class NewsTests(TestCase):
    """nntp: into a real INN, read back with an NNTP client."""

    async def test_posted_and_read_back(self) -> None:
        """
        Mail to the news route becomes an article of the newsgroup (with
        Newsgroups and Path, without the mail's trace fields); a route with a
        wrong password gets 451 (the sender retries).
        """
        from tests.integration.inn import PrivateInn

        inn = PrivateInn(self)
        await inn.start()
        directory = os.path.abspath(self.mktemp())
        routes = write_routes(
            directory,
            f"[news@groups.example.com]\nnntp = news://127.0.0.1:{inn.port}/{inn.newsgroup}\n"
            f"nntp_user = {inn.user}\nnntp_password = {inn.password}\n\n"
            f"[badnews@groups.example.com]\nnntp = news://127.0.0.1:{inn.port}/{inn.newsgroup}\n"
            f"nntp_user = {inn.user}\nnntp_password = wrong\n",
        )
        service = start_service(self, make_config(directory, routes=routes))
        port = port_of(service, "smtp")
        data = message("news item")
        self.assertEqual(await sendmail(port, "a@example.org", [f"news@{DOMAIN}"], data), {})
        # The sender's retry (a lost 250) does not post it twice.
        self.assertEqual(await sendmail(port, "a@example.org", [f"news@{DOMAIN}"], data), {})

        def read() -> tuple[Any, list[bytes]]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                import nntplib
            with nntplib.NNTP(
                "127.0.0.1",
                inn.port,
                user=inn.user,
                password=inn.password,
                usenetrc=False,
                timeout=30,
            ) as news:
                group = news.group(inn.newsgroup)
                _, info = news.article("<news.item@example.org>")
                return group, info.lines

        group, lines = await deferToThread(read)
        self.assertEqual(group[1], 1)  # one article
        article = b"\n".join(lines)
        self.assertIn(b"Newsgroups: local.test", article)
        self.assertIn(b"Subject: news item", article)
        self.assertIn(b"!mx.groups.example.com!not-for-mail", article)
        self.assertNotIn(b"X-Original-To", article)
        self.assertTrue(article.endswith(b"Text of news item."))
        result = await sendmail(port, "a@example.org", [f"badnews@{DOMAIN}"], message("other"))
        self.assertIsInstance(result, smtplib.SMTPDataError)
        self.assertEqual(result.smtp_code, 451)


class ReloadTests(TestCase):
    """SIGHUP reads the route file again."""

    async def test_sighup(self) -> None:
        """A new file is used after SIGHUP; a broken one is refused and the old table kept."""
        import signal

        directory = os.path.abspath(self.mktemp())
        routes = write_routes(directory, "[a@groups.example.com]\nreject = 550 5.7.1 first\n")
        service = start_service(self, make_config(directory, routes=routes))
        port = port_of(service, "smtp")

        async def refusal() -> bytes:
            result = await sendmail(port, "x@example.org", [f"a@{DOMAIN}"], message("r"))
            [(_, text)] = result.recipients.values()
            return bytes(text)

        self.assertEqual(await refusal(), b"5.7.1 first")
        write_routes(directory, "[a@groups.example.com]\nreject = 550 5.7.1 second\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(
            lambda: service.core.routes.entries[0].reject.text == "second",  # type: ignore[union-attr]
            lambda: "not reloaded",
            timeout=10,
        )
        self.assertEqual(await refusal(), b"5.7.1 second")
        table = service.core.routes
        write_routes(directory, "[a@groups.example.com]\nrejekt = 550 5.7.1 third\n")
        self.assertFalse(await service.reload())  # what SIGHUP runs, awaited here
        self.assertIs(service.core.routes, table)
        self.assertEqual(await refusal(), b"5.7.1 second")
