# -*- test-case-name: tests.test_script -*-
"""
Tests for L{gsmail.script}, the pipe-compatible C{smtp2gs} command, and for
L{gsmail.config.load_pipe_config}.

Most tests run the command in this process (L{gsmail.script.run}) against
the GroupServer stand-in on a real port of 127.0.0.1, reading what a user
sees: the first line of standard error, the exit status, and what the
stand-in stored. A few run it as a child process, so that the exit status
is the real one; one runs it beside gsmail's daemon sharing its ledger.

Every line the command prints must start with an RFC 3463 code and a space
(Postfix's pipe(8) reads it; C{4.3.5:} with a colon is not one), and the
token must never be printed.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import smtplib
import sys
from typing import Any, Final

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gsmail import script, status
from gsmail.config import ConfigError, PipeConfig, load_pipe_config
from gsmail.groupserver import GroupServerClient
from gsmail.inbound.spool import Spool
from gsmail.ledger import PostLedger
from gsmail.script import Job, Options, UsageError, exit_code, parse_arguments, prepare
from gsmail.status import Reply
from tests import util
from tests.bounce_samples import dsn
from tests.pipe import GROUPS, SENDER, TOKEN, write_config
from tests.util import ROOT, StandInServer, TrackingFactory, make_config, port_of, start_service

EXAMPLE: Final = "example@groups.example.com"

#: The project's directory, for the child processes' C{PYTHONPATH}.

#: A status line: an RFC 3463 code, then a space (never a colon).
STATUS_LINE: Final = re.compile(r"[245]\.\d{1,3}\.\d{1,3} \S")


def message(message_id: str | None = "<m1@example.org>", body: bytes = b"Hello, group.\n") -> bytes:
    """A small message as Postfix stores it (LF line ends)."""
    header = f"From: Alice <{SENDER}>\nTo: {EXAMPLE}\nSubject: Hello\n"
    if message_id is not None:
        header += f"Message-ID: {message_id}\n"
    return header.encode() + b"\n" + body


def piped(recipient: str, raw: bytes | None = None) -> bytes:
    """
    C{raw} as Postfix's pipe(8) hands it over with the flags C{R}, C{O} and
    C{D}: C{Return-Path}, C{X-Original-To} and C{Delivered-To} on top.
    """
    top = f"Return-Path: <{SENDER}>\nX-Original-To: {recipient}\nDelivered-To: {recipient}\n"
    return top.encode() + (message() if raw is None else raw)


@attrs.frozen
class Result:
    """What one run of the command left: exit status and output."""

    code: int
    stderr: str
    stdout: str = ""

    @property
    def first_line(self) -> str:
        return self.stderr.split("\n", 1)[0]


class _NotTLS(Protocol):
    """A server that answers plain HTTP to anything, then hangs up."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        self.transport.loseConnection()


def closed_port() -> int:
    """A port of 127.0.0.1 nothing listens on (bound and closed again)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class _Child(ProcessProtocol):
    """Feeds a child its standard input and collects its output."""

    def __init__(self, stdin: bytes) -> None:
        self.stdin = stdin
        self.out: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self.ended: Deferred[int] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.out[childFD] += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None) or 0)


async def run_child(args: list[str], stdin: bytes = b"", timeout: float = 30.0) -> Result:
    """
    Run C{python -m gsmail.script ARGS} as a child process (this checkout
    first on its path); kill it past C{timeout} seconds.
    """
    child = _Child(stdin)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": ROOT}
    transport = reactor.spawnProcess(
        child, sys.executable, [sys.executable, "-m", "gsmail.script", *args], env=env, path=ROOT
    )
    killer = reactor.callLater(timeout, transport.signalProcess, "KILL")
    code = await child.ended
    if not killer.active():
        raise AssertionError(f"smtp2gs {args} ran longer than {timeout} s")
    killer.cancel()
    return Result(code, child.out[2].decode("utf-8", "replace"), child.out[1].decode())


class OutputAssertions:
    """Checks every test makes of what the command printed."""

    def assertReply(self, result: Result, reply: Reply, code: int | None = None) -> None:
        """
        The first line of standard error is C{reply}'s status (code, a
        space, text), the exit status is C{code} (default: C{reply}'s own),
        and the output has neither the token nor a traceback.
        """
        test: Any = self
        test.assertRegex(result.first_line, STATUS_LINE)
        test.assertTrue(
            result.first_line.startswith(f"{reply.enhanced} "),
            f"expected {reply.status_line()!r}, got {result.stderr!r}",
        )
        test.assertEqual(result.code, reply.exit_code if code is None else code, result.stderr)
        test.assertNotIn(TOKEN, result.stderr + result.stdout)
        test.assertNotIn("Traceback", result.stderr)


class ArgumentTests(SynchronousTestCase):
    """The command line, as the old smtp2gs documented it."""

    def test_defaults(self) -> None:
        """Only the URL is needed; the rest defaults as the old command's manual says."""
        self.assertEqual(
            parse_arguments(["http://groups.example.com"], {}),
            Options(
                url="http://groups.example.com",
                max_size=200 * 2**20,
                list_id=None,
                file="-",
                time_source="server",
                config="/etc/groupserver/gsconfig.ini",
                instance="default",
            ),
        )

    def test_every_option(self) -> None:
        """Short and long options set what they name; --max-size is in MiB."""
        long = parse_arguments(
            [
                "--max-size=2",
                "--list=dev",
                "--file=/tmp/m.eml",
                "--time-source=message",
                "--config=/srv/gs/etc/gsconfig.ini",
                "--instance=production",
                "https://groups.example.com",
            ],
            {},
        )
        short = parse_arguments(
            "-m 2 -l dev -f /tmp/m.eml -t message -c /srv/gs/etc/gsconfig.ini -i production "
            "https://groups.example.com".split(),
            {},
        )
        self.assertEqual(long, short)
        self.assertEqual(
            (long.max_size, long.list_id, long.file, long.time_source, long.instance),
            (2 * 2**20, "dev", "/tmp/m.eml", "message", "production"),
        )

    def test_instance_home(self) -> None:
        """With $INSTANCE_HOME set, the default configuration is INSTANCE_HOME/etc/gsconfig.ini."""
        options = parse_arguments(["http://g.example.com"], {"INSTANCE_HOME": "/srv/gs"})
        self.assertEqual(options.config, "/srv/gs/etc/gsconfig.ini")

    def test_bad_command_lines(self) -> None:
        """A wrong command line raises UsageError (no exit, nothing printed)."""
        for argv in (
            [],
            ["-m", "0", "http://g.example.com"],
            ["-m", "lots", "http://g.example.com"],
            ["-t", "client", "http://g.example.com"],
            ["--list", " ", "http://g.example.com"],
            ["--unknown", "http://g.example.com"],
            ["http://g.example.com", "extra"],
        ):
            with self.assertRaises(UsageError, msg=argv):
                parse_arguments(argv, {})

    def test_exit_codes(self) -> None:
        """
        Exit values follow sysexits as the old command's; a transient local
        error exits 75, never 70 (which Postfix would read as permanent).
        """
        self.assertEqual(exit_code(status.POSTED), 0)
        self.assertEqual(exit_code(status.BOUNCE_RECORDED), 0)
        self.assertEqual(exit_code(status.NO_SUCH_GROUP), 67)
        self.assertEqual(exit_code(status.GROUPSERVER_UNREACHABLE), 76)
        self.assertEqual(exit_code(status.CONFIG_ERROR), 78)
        self.assertEqual(exit_code(status.LOCAL_ERROR), 75)
        self.assertEqual(exit_code(status.GROUPSERVER_TIMEOUT), 75)


class PipeConfigTests(SynchronousTestCase):
    """L{load_pipe_config}: what the command reads from gs.config."""

    def test_old_command_file(self) -> None:
        """
        The file the old smtp2gs read (a bare [webservice-default]) is
        enough: no ledger, the daemon's client defaults, relay prefix p-.
        """
        path = write_config(self.mktemp())
        self.assertEqual(
            load_pipe_config(path),
            PipeConfig(path=path, instance="default", token=TOKEN, ledger_path=""),
        )

    def test_full_form_with_gsmail_section(self) -> None:
        """
        With [config-INSTANCE] naming webservice, smtp and gsmail sections,
        the relay prefix, ledger (relative to the file) and client settings
        come from them; the gsmail section's other options are not needed.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "gsconfig.ini")
        with open(path, "w") as f:
            f.write(
                "[config-production]\nwebservice = main\nsmtp = out\ngsmail = pipe\n"
                f"[webservice-main]\ntoken = {TOKEN}\n"
                "[smtp-out]\nrelay-address-prefix = relay-\n"
                "[gsmail-pipe]\nledger_path = state/posted.log\nledger_ttl = 2d\n"
                "connect_timeout = 3\nresponse_timeout = 2m\nverify_tls = no\n"
            )
        config = load_pipe_config(path, "production")
        self.assertEqual(
            attrs.astuple(config),
            (
                os.path.abspath(path),
                "production",
                TOKEN,
                "relay-",
                os.path.join(os.path.abspath(directory), "state", "posted.log"),
                2 * 86400.0,
                3.0,
                120.0,
                False,
                "",
                14 * 86400.0,
                "auto",
                False,
            ),
        )
        self.assertNotIn(TOKEN, repr(config))

    def test_gsmail_section_defaults(self) -> None:
        """An empty gsmail section means the daemon's default ledger path."""
        config = load_pipe_config(write_config(self.mktemp(), gsmail={}))
        self.assertEqual(config.ledger_path, "/var/lib/gsmail/ledger")

    def test_errors(self) -> None:
        """
        A missing file, instance, token or a bad value is a one-line
        ConfigError that names the problem and never the token.
        """
        directory = self.mktemp()
        os.makedirs(directory)

        def file(name: str, text: str) -> str:
            path = os.path.join(directory, name)
            with open(path, "w") as f:
                f.write(text)
            return path

        cases = {
            "cannot read": os.path.join(directory, "missing.ini"),
            "no section [config-default]": file("a.ini", f"[webservice-x]\ntoken = {TOKEN}\n"),
            "token: missing": file("b.ini", "[webservice-default]\n"),
            "verify_tls": file(
                "c.ini",
                f"[webservice-default]\ntoken = {TOKEN}\n[gsmail-default]\nverify_tls = 2\n",
            ),
            "no section [gsmail-x]": file(
                "d.ini",
                f"[config-default]\nwebservice = d\ngsmail = x\n[webservice-d]\ntoken = {TOKEN}\n",
            ),
        }
        for expected, path in cases.items():
            with self.assertRaises(ConfigError) as caught:
                load_pipe_config(path)
            self.assertIn(expected, str(caught.exception))
            self.assertNotIn(TOKEN, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))


class PrepareTests(SynchronousTestCase):
    """Reading the message: what is kept aside, what identifies it."""

    def prepare(self, data: bytes, *argv: str) -> Job | Reply:
        path = write_config(self.mktemp())
        result = prepare(
            parse_arguments([*argv, "-c", path, "http://g.example.com"], {}), io.BytesIO(data)
        )
        if isinstance(result, Job):
            self.addCleanup(result.discard)
        return result

    def test_postfix_fields_set_aside(self) -> None:
        """
        The fields pipe(8) and local(8) put on top (From_, Return-Path,
        X-Original-To, Delivered-To) are kept as the post's prefix, and the
        rest is spooled as the daemon spools a message received over LMTP:
        same identity, same digest, and the post is the input byte for byte.
        """
        raw = message(message_id=None)
        data = b"From alice@example.org  Mon Jan  1 00:00:00 2024\n" + piped(EXAMPLE, raw)
        job = self.prepare(data)
        assert isinstance(job, Job)
        spool = Spool()  # as the daemon stores the message received over LMTP
        spool.write(raw)
        daemon = spool.finish()
        self.addCleanup(os.unlink, daemon.path)
        self.assertEqual(job.message.identity, daemon.identity)
        self.assertEqual(job.prefix + raw, data)
        with open(job.message.path, "rb") as f:
            self.assertEqual(f.read(), raw)
        self.assertEqual(job.route.recipient.local if job.route else None, "example")

    def test_folded_or_later_fields_stay(self) -> None:
        """
        Only one-line fields at the very top are Postfix's: a folded one, or
        one after another field, is part of the message.
        """
        raw = b"Received: from x\nX-Original-To: dev@groups.example.com\n\nbody\n"
        job = self.prepare(raw)
        assert isinstance(job, Job)
        self.assertEqual(job.prefix, b"")
        folded = b"X-Original-To:\n dev@groups.example.com\nSubject: s\n\nbody\n"
        job = self.prepare(folded)
        assert isinstance(job, Job)
        self.assertEqual(
            (job.prefix, str(job.route.recipient) if job.route else ""),
            (b"", "dev@groups.example.com"),
        )

    def test_nothing_after_postfix_fields(self) -> None:
        """Input that is only Postfix's fields is an empty message (5.3.0)."""
        reply = self.prepare(b"Return-Path: <a@example.org>\nX-Original-To: dev@g.example.com\n")
        self.assertIsInstance(reply, Reply)
        assert isinstance(reply, Reply)
        self.assertEqual((reply.enhanced, reply.exit_code), ("5.3.0", 65))


class CommandTests(OutputAssertions, TestCase):
    """
    The command run in this process against the stand-in: every documented
    status, with what GroupServer got.
    """

    timeout = 30

    def setUp(self) -> None:
        self.server = StandInServer(self, GROUPS, TOKEN)
        self.standin = self.server.standin

    async def smtp2gs(
        self, *argv: str, stdin: bytes = b"", config: str | None = None, url: str | None = None
    ) -> Result:
        """Run C{smtp2gs [--config CONFIG] ARGV URL} with C{stdin}."""
        if config is None:
            config = write_config(self.mktemp())
        out, err = io.StringIO(), io.StringIO()
        code = await script.run(
            reactor,
            ["--config", config, *argv, url or self.server.url],
            stdin=io.BytesIO(stdin),
            stdout=out,
            stderr=err,
            environ={},
            ledger_wait=0.3,
        )
        return Result(code, err.getvalue(), out.getvalue())

    def ledger_config(self, **options: str) -> str:
        directory = os.path.abspath(self.mktemp())
        self.ledger_path = os.path.join(directory, "ledger", "posted.log")
        return write_config(directory, gsmail={"ledger_path": self.ledger_path, **options})

    async def test_post(self) -> None:
        """
        A message for a group's address is posted to that group, exactly as
        piped (Postfix's fields included); the command prints nothing and
        exits 0.
        """
        data = piped(EXAMPLE)
        result = await self.smtp2gs(stdin=data)
        self.assertEqual(result, Result(0, ""))
        self.assertEqual(self.standin.posts("example"), [data])
        self.assertEqual(self.standin.post_records()[0].time_source, "server")

    async def test_time_source_message(self) -> None:
        """--time-source message asks GroupServer to date the post by its Date header."""
        result = await self.smtp2gs("-t", "message", stdin=piped(EXAMPLE))
        self.assertEqual(result.code, 0)
        self.assertEqual([r.time_source for r in self.standin.post_records()], ["message"])

    async def test_list_overrides(self) -> None:
        """
        --list posts to that group id without a lookup, with or without
        X-Original-To, and even for a relay address (no relay routing).
        """
        first = await self.smtp2gs("--list", "dev", stdin=message("<a@example.org>", b"A.\n"))
        second = await self.smtp2gs(
            "--list",
            "dev",
            stdin=piped("p-abc@groups.example.com", message("<b@example.org>", b"B.\n")),
        )
        self.assertEqual((first, second), (Result(0, ""), Result(0, "")))
        self.assertEqual(len(self.standin.posts("dev")), 2)
        self.assertEqual((self.standin.requests["exists"], self.standin.relays()), (0, []))

    async def test_relay(self) -> None:
        """An address with the relay prefix goes to the relay page, silently, exit 0."""
        config = write_config(self.mktemp(), smtp={"relay-address-prefix": "relay-"})
        data = piped("relay-a1b2@groups.example.com")
        result = await self.smtp2gs(stdin=data, config=config)
        self.assertEqual(result, Result(0, ""))
        self.assertEqual(self.standin.relays(), [data])
        self.assertEqual(self.standin.post_records(), [])

    async def test_xverp_bounce(self) -> None:
        """An XVERP address records a bounce: 2.1.5 on standard error, exit 0."""
        result = await self.smtp2gs(
            stdin=piped("dev+bob=example.net@groups.example.com", dsn("bob@example.net"))
        )
        self.assertReply(result, status.BOUNCE_RECORDED, 0)
        self.assertEqual(self.standin.bounces(), [("bob@example.net", "dev@groups.example.com")])

    async def test_no_such_group(self) -> None:
        """An address no group has: 5.1.1, exit 67 (Postfix bounces it); nothing posted."""
        result = await self.smtp2gs(stdin=piped("nosuch@groups.example.com"))
        self.assertReply(result, status.NO_SUCH_GROUP, 67)
        self.assertIn("nosuch@groups.example.com", result.first_line)
        self.assertEqual(self.standin.post_records(), [])

    async def test_no_original_to(self) -> None:
        """No X-Original-To and no --list: 5.1.3, exit 65; GroupServer is not asked."""
        result = await self.smtp2gs(stdin=message())
        self.assertReply(result, status.NO_ORIGINAL_TO, 65)
        self.assertEqual(sum(self.standin.requests.values()), 0)

    async def test_bad_original_to(self) -> None:
        """An X-Original-To that is no address: 5.1.3, exit 65."""
        result = await self.smtp2gs(stdin=piped("not an address"))
        self.assertReply(result, status.NO_ORIGINAL_TO, 65)

    async def test_empty(self) -> None:
        """An empty input: 5.3.0, exit 65."""
        result = await self.smtp2gs(stdin=b"")
        self.assertReply(result, status.EMPTY_MESSAGE, 65)

    async def test_too_large(self) -> None:
        """
        More than --max-size MiB: 5.3.4, exit 65, without reading the rest;
        exactly the limit is accepted.
        """
        limit = int(0.01 * 2**20)
        head = piped(EXAMPLE, message(body=b""))
        result = await self.smtp2gs("-m", "0.01", stdin=head + b"x" * (limit - len(head) + 1))
        self.assertReply(result, status.MESSAGE_TOO_BIG, 65)
        self.assertEqual(self.standin.post_records(), [])
        fits = head + b"x" * (limit - len(head))
        self.assertEqual(await self.smtp2gs("-m", "0.01", stdin=fits), Result(0, ""))
        self.assertEqual(self.standin.posts("example"), [fits])

    async def test_cannot_connect(self) -> None:
        """Nothing listening at the URL: 4.4.4 naming the URL, exit 76 (Postfix defers)."""
        url = f"http://127.0.0.1:{closed_port()}"
        result = await self.smtp2gs(stdin=piped(EXAMPLE), url=url)
        self.assertReply(result, status.GROUPSERVER_UNREACHABLE, 76)
        self.assertIn(url, result.first_line)

    async def test_tls_failure(self) -> None:
        """An https URL whose server does not speak TLS: transient 4.4.4, exit 76."""
        factory = TrackingFactory(Factory.forProtocol(_NotTLS))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.when_all_closed)
        self.addCleanup(port.stopListening)
        url = f"https://127.0.0.1:{port.getHost().port}"
        result = await self.smtp2gs(stdin=piped(EXAMPLE), url=url)
        self.assertReply(result, status.GROUPSERVER_UNREACHABLE, 76)
        self.assertIn("TLS", result.first_line)

    async def test_wrong_token(self) -> None:
        """
        A wrong token (GroupServer re-renders its form with an error status):
        4.3.5 naming the token, exit 78 (Postfix defers it); the token is
        not printed.
        """
        config = write_config(self.mktemp(), token="not-" + TOKEN)
        result = await self.smtp2gs(stdin=piped(EXAMPLE), config=config)
        self.assertReply(result, status.GROUPSERVER_REFUSED, 78)
        self.assertIn("token", result.first_line)
        self.assertNotIn("not-" + TOKEN, result.stderr)

    async def test_html_instead_of_json(self) -> None:
        """The group-exists page answering its form with an error: 4.3.5, exit 78."""
        self.standin.faults.html_instead_of_json = True
        result = await self.smtp2gs(stdin=piped(EXAMPLE))
        self.assertReply(result, status.GROUPSERVER_REFUSED, 78)

    async def test_server_error(self) -> None:
        """GroupServer answering 500 to the post: transient 4.5.0 (not 5.5.0), exit 76."""
        self.standin.faults.status = 500
        self.standin.faults.pages = frozenset({"add"})
        result = await self.smtp2gs(stdin=piped(EXAMPLE))
        self.assertReply(result, status.GROUPSERVER_ERROR, 76)
        self.assertIn("500", result.first_line)

    async def test_no_host(self) -> None:
        """A URL without a host (or not http/https): 4.5.2, exit 64; nothing is read."""
        for url in ("groups.example.com", "http:///path", "ftp://groups.example.com"):
            result = await self.smtp2gs(stdin=piped(EXAMPLE), url=url)
            self.assertReply(result, status.NO_HOST_IN_URL, 64)

    async def test_config_error(self) -> None:
        """
        A configuration file that cannot be used: 4.3.5 and a space (the
        old command's "4.3.5:" made Postfix bounce all mail), exit 78.
        """
        result = await self.smtp2gs(stdin=piped(EXAMPLE), config=self.mktemp())
        self.assertReply(result, status.CONFIG_ERROR, 78)
        broken = write_config(self.mktemp(), token="two words")
        result = await self.smtp2gs(stdin=piped(EXAMPLE), config=broken)
        self.assertReply(result, status.CONFIG_ERROR, 78)
        self.assertIn("token", result.first_line)

    async def test_bad_command_line(self) -> None:
        """A wrong command line (a master.cf typo): 4.3.5, exit 64, not argparse's exit 2."""
        result = await self.smtp2gs("--max-size", "big", stdin=piped(EXAMPLE))
        self.assertReply(result, status.CONFIG_ERROR, 64)

    async def test_unreadable_file(self) -> None:
        """--file naming a file that cannot be read: transient 4.3.0, exit 66."""
        result = await self.smtp2gs("--file", self.mktemp(), stdin=piped(EXAMPLE))
        self.assertRegex(result.first_line, r"^4\.3\.0 Cannot read the message from ")
        self.assertEqual(result.code, 66)

    async def test_file(self) -> None:
        """--file reads the message from that file instead of standard input."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(piped(EXAMPLE))
        self.assertEqual(await self.smtp2gs("--file", path), Result(0, ""))
        self.assertEqual(self.standin.posts("example"), [piped(EXAMPLE)])

    async def test_timeout(self) -> None:
        """
        GroupServer not answering within response_timeout: transient 4.4.7,
        exit 75; Postfix's retry adds it again, and GroupServer archives it
        once.
        """
        config = self.ledger_config(response_timeout="0.3")
        self.standin.faults.delay = 1.0
        self.standin.faults.pages = frozenset({"add"})
        self.standin.faults.remaining = 1
        result = await self.smtp2gs(stdin=piped(EXAMPLE), config=config)
        self.assertReply(result, status.GROUPSERVER_TIMEOUT, 75)
        self.server.clock.advance(1.0)  # GroupServer goes on, and adds it
        await self.standin.when_idle()
        retry = await self.smtp2gs(stdin=piped(EXAMPLE), config=config)
        self.assertEqual(retry, Result(0, ""))
        self.assertEqual(self.standin.requests["add"], 2)
        self.assertEqual(len(self.standin.posts("example")), 1)

    async def test_answer_lost(self) -> None:
        """
        The connection lost after the post was sent: 4.4.2, exit 75; Postfix's
        retry adds it again (ledger or not), and GroupServer archives it once.
        """
        for config in (self.ledger_config(), None):
            self.standin.faults.drop = "after_store"
            self.standin.faults.pages = frozenset({"add"})
            self.standin.faults.remaining = 1
            raw = piped(EXAMPLE, message(body=f"lost {config}\n".encode()))
            result = await self.smtp2gs(stdin=raw, config=config)
            self.assertReply(result, status.OUTCOME_UNKNOWN, 75)
            retry = await self.smtp2gs(stdin=raw, config=config)
            self.assertEqual(retry, Result(0, ""))
        self.assertEqual(self.standin.requests["add"], 4)
        self.assertEqual(len(self.standin.posts("example")), 2)

    async def test_piped_twice_posted_once(self) -> None:
        """
        With a ledger (the instance has a gsmail section), the same message
        piped twice is posted once; the second run says so, exit 0.
        """
        config = self.ledger_config()
        first = await self.smtp2gs(stdin=piped(EXAMPLE), config=config)
        second = await self.smtp2gs(stdin=piped(EXAMPLE), config=config)
        self.assertEqual(first, Result(0, ""))
        self.assertReply(second, status.ALREADY_DELIVERED, 0)
        self.assertEqual(len(self.standin.posts("example")), 1)

    async def test_without_ledger_as_before(self) -> None:
        """
        Without a gsmail section there is no ledger: each run posts, as the
        old command did (the documented step 1 of the migration); GroupServer
        archives the message once.
        """
        for _ in range(2):
            self.assertEqual(await self.smtp2gs(stdin=piped(EXAMPLE)), Result(0, ""))
        self.assertEqual(self.standin.add_requests("example"), 2)
        self.assertEqual(len(self.standin.posts("example")), 1)

    async def test_ledger_busy(self) -> None:
        """
        Another process posting the same message for longer than the wait:
        4.4.5 (system too busy), exit 75, and nothing posted by this one.
        """
        config = self.ledger_config()
        other = PostLedger(self.ledger_path, clock=reactor)
        other.open()
        posting: Deferred[None] = Deferred()
        digest = hashlib.sha256(message()).hexdigest()
        key = PostLedger.key("post", "example", "sha256:" + digest)
        running = other.run(key, lambda: posting)
        result = await self.smtp2gs(stdin=piped(EXAMPLE), config=config)
        self.assertReply(result, status.TOO_BUSY, 75)
        self.assertEqual(self.standin.post_records(), [])
        posting.callback(None)
        await running
        await other.close()

    async def test_unusable_ledger(self) -> None:
        """A ledger that cannot be created (a file where its directory goes): 4.3.5, exit 78."""
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "ledger"), "w"):
            pass
        config = write_config(directory, gsmail={"ledger_path": "ledger/posted.log"})
        result = await self.smtp2gs(stdin=piped(EXAMPLE), config=config)
        self.assertReply(result, status.CONFIG_ERROR, 78)
        self.assertIn("post ledger", result.first_line)

    async def test_unexpected_error(self) -> None:
        """
        A bug (any unexpected exception) is transient: 4.3.0, exit 75, no
        traceback before it; Postfix keeps the message.
        """

        def broken(*args: object) -> Deferred[None]:
            raise KeyError("bug")

        self.patch(GroupServerClient, "add_post", broken)
        result = await self.smtp2gs(stdin=piped(EXAMPLE))
        self.assertReply(result, status.LOCAL_ERROR, 75)
        self.assertIn("KeyError", result.first_line)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)


class ChildProcessTests(OutputAssertions, TestCase):
    """The command as Postfix runs it: a process of its own, real exit values."""

    timeout = 60

    async def test_statuses(self) -> None:
        """
        Post (0, silent), bounce (0, 2.1.5), no such group (67), cannot
        connect (76), configuration (78), command line and URL (64): the
        real exit values, the code first on standard error.
        """
        server = StandInServer(self, GROUPS, TOKEN)
        config = write_config(self.mktemp())
        url = server.url
        post = await run_child(["-c", config, url], piped(EXAMPLE))
        self.assertEqual((post.code, post.stderr, post.stdout), (0, "", ""))
        self.assertEqual(server.standin.posts("example"), [piped(EXAMPLE)])
        bounce = await run_child(
            ["-c", config, url],
            piped("dev+bob=example.net@groups.example.com", dsn("bob@example.net")),
        )
        self.assertReply(bounce, status.BOUNCE_RECORDED, 0)
        nosuch = await run_child(["-c", config, url], piped("nosuch@groups.example.com"))
        self.assertReply(nosuch, status.NO_SUCH_GROUP, 67)
        down = await run_child(["-c", config, f"http://127.0.0.1:{closed_port()}"], piped(EXAMPLE))
        self.assertReply(down, status.GROUPSERVER_UNREACHABLE, 76)
        missing = await run_child(["-c", os.path.abspath(self.mktemp()), url], piped(EXAMPLE))
        self.assertReply(missing, status.CONFIG_ERROR, 78)
        usage = await run_child(["-c", config], piped(EXAMPLE))
        self.assertReply(usage, status.CONFIG_ERROR, 64)
        nohost = await run_child(["-c", config, "groups.example.com"], piped(EXAMPLE))
        self.assertReply(nohost, status.NO_HOST_IN_URL, 64)

    async def test_help(self) -> None:
        """--help prints the usage on standard output and exits 0."""
        result = await run_child(["--help"])
        self.assertEqual((result.code, result.stderr), (0, ""))
        self.assertIn("usage: smtp2gs [-h] [-m MAXSIZE] [-l LISTID] [-f FILE]", result.stdout)


class DaemonLedgerTests(OutputAssertions, TestCase):
    """The pipe and gsmail's daemon share one ledger file."""

    timeout = 60

    async def test_pipe_and_lmtp_post_once(self) -> None:
        """
        A message piped once and delivered once over the daemon's LMTP is
        posted once, whichever comes first; without a Message-ID too (the
        pipe's identity leaves Postfix's fields out, as the daemon's does).
        """
        config = make_config(os.path.abspath(self.mktemp()), smtp_endpoint="")
        service = start_service(self, config)
        pipe_config = write_config(
            self.mktemp(), token=util.TOKEN, gsmail={"ledger_path": config.ledger_path}
        )
        url = service.client.url
        lmtp_port = port_of(service, "lmtp")

        def lmtp(raw: bytes) -> tuple[int, bytes]:
            with smtplib.LMTP("127.0.0.1", lmtp_port) as client:
                client.ehlo_or_helo_if_needed()
                client.mail(SENDER)
                client.rcpt(EXAMPLE)
                # CRLF on the wire, as Postfix sends it (smtplib sends bytes as given).
                return client.data(raw.replace(b"\n", b"\r\n"))

        first = message("<shared@example.org>")
        piped_first = await run_child(["-c", pipe_config, url], piped(EXAMPLE, first))
        self.assertEqual((piped_first.code, piped_first.stderr), (0, ""))
        code, text = await deferToThread(lmtp, first)
        self.assertEqual((code, text.decode()), (250, status.ALREADY_DELIVERED.status_line()))

        second = message(message_id=None, body=b"No Message-ID here.\n")
        code, text = await deferToThread(lmtp, second)
        self.assertEqual((code, text.decode()), (250, status.POSTED.status_line()))
        piped_second = await run_child(["-c", pipe_config, url], piped(EXAMPLE, second))
        self.assertReply(piped_second, status.ALREADY_DELIVERED, 0)
        self.assertEqual(len(service.standin.posts("example")), 2)
