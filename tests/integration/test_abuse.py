"""
Abuse limits on real sockets (issue 13, "Port 25 under attack"): a raw
client on 127.0.0.1 does what an attacker does to a running gsmail
(embedded stand-in), and the tests assert what the attacker sees (reply
codes and text, the connection closed) and what GroupServer saw (the
stand-in's group lookups and posts).

The limits are Postfix's (anvil(8) and smtpd(8)): concurrent connections
and connection rate per client, group lookups per session and per client,
the error counter with its sleep and its hard limit, junk commands, AUTH
failures per client, a deadline per command line and a minimum data rate.
Loopback is in C{client_limit_exceptions} by default, so every test here
empties that list, except the one that shows the exception.

Timing is never asserted: delays are made short (C{error_sleep_time},
C{auth_failure_delay}) and only order, presence and counts are checked; a
cut-off is checked against a generous bound. Blocking clients run in a
thread (C{deferToThread}); every socket has a timeout and every loop a
bound in count and time.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import tempfile
import time
from base64 import b64encode
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from tests.integration.attacks import AttackTestsMixin
from tests.integration.clients import EXAMPLE, RawClient, RawReply, make_message
from tests.util import DOMAIN, port_of, require_tool

_T = TypeVar("_T")

EHLO = b"EHLO client.example.org\r\n"
MAIL = b"MAIL FROM:<prober@example.org>\r\n"
#: Seconds a connection under a slow-sender attack may live before the test
#: calls it "not cut" (the limits in these tests are 1 s).
CUT_BOUND = 10.0
#: One hour: no rate window rolls over while a test runs.
HOUR = 3600.0
USER = "groupserver"
PASSWORD = "s3cret-submission"


def unknown(n: int) -> bytes:
    """C{RCPT TO} a group that does not exist, a new one for each C{n}."""
    return f"RCPT TO:<no-such-group-{n}@{DOMAIN}>\r\n".encode()


def auth_plain(password: str, user: str = USER) -> bytes:
    """C{AUTH PLAIN} with its initial response (RFC 4616)."""
    return b"AUTH PLAIN " + b64encode(f"\0{user}\0{password}".encode()) + b"\r\n"


def rest_of_session(client: RawClient) -> tuple[list[RawReply], bool]:
    """
    Every reply the server still sends, and whether it then closed the
    connection (rather than the read timing out).
    """
    replies: list[RawReply] = []
    while True:
        try:
            replies.append(client.reply())
        except ConnectionError:
            return replies, True
        except TimeoutError:
            return replies, False


def dribble(
    client: RawClient, data: bytes, interval: float, bound: float = CUT_BOUND
) -> tuple[list[RawReply], bool, float]:
    """
    Send C{data} one byte every C{interval} seconds until the server says
    something or C{bound} seconds pass; then read what it says.

    @return: the replies, whether the server closed the connection, and the
        seconds from the first byte to the end.
    """
    started = time.monotonic()
    for byte in data:
        if time.monotonic() - started > bound:
            break
        readable, _, _ = select.select([client.sock], [], [], interval)
        if readable:
            break
        try:
            client.send(bytes([byte]))
        except OSError:
            break
    replies, closed = rest_of_session(client)
    return replies, closed, time.monotonic() - started


class AbuseTestsMixin(AttackTestsMixin):
    """
    A running gsmail (ESMTP, LMTP, submission) that limits loopback
    clients: C{client_limit_exceptions} is empty unless a test class says
    otherwise in C{config_overrides}.
    """

    #: Options of this test's configuration.
    limits: dict[str, Any] = {}
    #: C{client_limit_exceptions}; C{None}: the configuration's default.
    exceptions: tuple[str, ...] | None = ()

    def setUp(self) -> None:
        overrides = dict(self.limits)
        if self.exceptions is not None:
            overrides["client_limit_exceptions"] = self.exceptions
        self.config_overrides = overrides
        super().setUp()

    def in_thread(self, f: Callable[..., _T], *args: Any) -> Any:
        return deferToThread(f, *args)

    def port(self, listener: str = "smtp") -> int:
        return port_of(self.service, listener)

    @property
    def lookups(self) -> int:
        """Group lookups the stand-in answered (its group-exists page)."""
        return int(self.service.standin.requests["exists"])


def greeted(port: int) -> tuple[RawClient, RawReply]:
    """A new connection and its greeting."""
    client = RawClient(port)
    try:
        return client, client.reply()
    except BaseException:
        client.sock.close()
        raise


def quit_session(client: RawClient) -> RawReply:
    """C{QUIT}, its reply, and the server's close."""
    client.send(b"QUIT\r\n")
    reply = client.reply()
    assert client.closed_by_server(), "still open after QUIT"
    client.sock.close()
    return reply


class ConnectionCountTests(AbuseTestsMixin, TestCase):
    """C{client_connection_count_limit}: concurrent connections per client IP."""

    limits = {"client_connection_count_limit": 3, "client_connection_rate_limit": 0}

    async def test_one_over_the_limit(self) -> None:
        """
        Three sessions open: the fourth is greeted C{421 4.7.0 Too many
        connections from [127.0.0.1]} and closed; after one of the three
        quits, a new one is greeted C{220}.
        """

        def attack(port: int) -> tuple[list[RawReply], RawReply, bool, RawReply, RawReply]:
            held = [greeted(port) for _ in range(3)]
            try:
                greetings = [reply for _, reply in held]
                extra, refused = greeted(port)
                with extra:
                    closed = extra.closed_by_server()
                bye = quit_session(held.pop()[0])
                again, welcome = greeted(port)
                with again:
                    pass
                return greetings, refused, closed, bye, welcome
            finally:
                for client, _ in held:
                    client.sock.close()

        first, refused, closed, bye, welcome = await self.in_thread(attack, self.port())
        self.assertEqual([r.code for r in first], [220, 220, 220])
        self.assertEqual(refused.codes, (421, "4.7.0"))
        self.assertIn("Too many connections from [127.0.0.1]", refused.lines[-1])
        self.assertTrue(closed)
        self.assertEqual(bye.code, 221)
        self.assertEqual(welcome.code, 220)

    async def test_submission_listener(self) -> None:
        """The submission listener counts the same way."""

        def attack(port: int) -> RawReply:
            held = [greeted(port) for _ in range(3)]
            try:
                extra, refused = greeted(port)
                extra.sock.close()
                return refused
            finally:
                for client, _ in held:
                    client.sock.close()

        refused = await self.in_thread(attack, self.port("submission"))
        self.assertEqual(refused.codes, (421, "4.7.0"))

    async def test_lmtp_clients_not_limited(self) -> None:
        """Every LMTP client is exempt: six LMTP sessions from one IP are all greeted 220."""

        def attack(port: int) -> list[int]:
            held = [greeted(port) for _ in range(6)]
            for client, _ in held:
                client.sock.close()
            return [reply.code for _, reply in held]

        self.assertEqual(await self.in_thread(attack, self.port("lmtp")), [220] * 6)


class ConnectionCountExceptionTests(AbuseTestsMixin, TestCase):
    """Loopback in C{client_limit_exceptions} (the default) is not counted."""

    limits = {"client_connection_count_limit": 3}
    exceptions = None

    async def test_loopback_exceeds_the_limit(self) -> None:
        """Six sessions from 127.0.0.1 at once are all greeted 220."""
        self.assertIn("127.0.0.0/8", self.config.client_limit_exceptions)

        def attack(port: int) -> list[int]:
            held = [greeted(port) for _ in range(6)]
            for client, _ in held:
                client.sock.close()
            return [reply.code for _, reply in held]

        self.assertEqual(await self.in_thread(attack, self.port()), [220] * 6)


class UnixSocketClientTests(AbuseTestsMixin, TestCase):
    """ESMTP clients on a UNIX socket have no IP address: no per-client limit applies."""

    limits = {"client_connection_count_limit": 2, "client_connection_rate_limit": 2}

    def setUp(self) -> None:
        # A UNIX socket path must be short: not under trial's temp directory.
        directory = tempfile.mkdtemp(prefix="gsmail-abuse-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.path = os.path.join(directory, "smtp")
        self.limits = {**self.limits, "smtp_endpoint": f"unix:{self.path}"}
        super().setUp()

    async def test_not_limited(self) -> None:
        """Five ESMTP sessions at once on the UNIX socket are all greeted 220."""

        def attack(path: str) -> list[bytes]:
            held = []
            try:
                for _ in range(5):
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    held.append(sock)
                    sock.settimeout(10)
                    sock.connect(path)
                return [sock.recv(3) for sock in held]
            finally:
                for sock in held:
                    sock.close()

        self.assertEqual(await self.in_thread(attack, self.path), [b"220"] * 5)


class ConnectionRateTests(AbuseTestsMixin, TestCase):
    """C{client_connection_rate_limit}: connection attempts per client IP per time unit."""

    limits = {
        "client_connection_rate_limit": 3,
        "client_connection_count_limit": 0,
        "anvil_rate_time_unit": HOUR,
    }

    async def test_fourth_in_the_unit_refused(self) -> None:
        """
        Three sessions one after the other are greeted 220; the fourth, in
        the same time unit, gets C{421 4.7.0 Too many connections from
        [127.0.0.1] in ...} and is closed, and so does a fifth.
        """

        def attack(port: int) -> tuple[list[int], list[RawReply], list[bool]]:
            codes = []
            for _ in range(3):
                client, reply = greeted(port)
                codes.append(reply.code)
                quit_session(client)
            refused, closed = [], []
            for _ in range(2):
                client, reply = greeted(port)
                with client:
                    refused.append(reply)
                    closed.append(client.closed_by_server())
            return codes, refused, closed

        codes, refused, closed = await self.in_thread(attack, self.port())
        self.assertEqual(codes, [220, 220, 220])
        self.assertEqual([r.codes for r in refused], [(421, "4.7.0")] * 2)
        for reply in refused:
            self.assertIn("Too many connections from [127.0.0.1] in", reply.lines[-1])
        self.assertEqual(closed, [True, True])


class RecipientProbeTests(AbuseTestsMixin, TestCase):
    """
    A dictionary attack on group names: one session, 1,000 RCPTs to groups
    that do not exist (Postfix's smtpd_soft_error_limit,
    smtpd_hard_error_limit, smtpd_error_sleep_time).
    """

    limits = {
        "soft_error_limit": 10,
        "hard_error_limit": 20,
        "error_sleep_time": 0.05,
        "client_connection_rate_limit": 0,
    }

    async def test_probe_cut_at_hard_limit(self) -> None:
        """
        The prober gets C{550 5.1.1} for the first 20 groups, then
        C{421 4.7.0 Too many errors}, and the connection is closed;
        GroupServer was asked about 20 groups at most, not 1,000.
        """

        def attack(port: int) -> tuple[list[RawReply], bool, int]:
            sent = 0
            with RawClient(port) as client:
                client.reply()
                client.send(EHLO + MAIL)
                client.replies(2)
                replies: list[RawReply] = []
                for start in range(0, 1000, 10):
                    client.send(b"".join(unknown(n) for n in range(start, start + 10)))
                    sent += 10
                    for _ in range(10):
                        try:
                            reply = client.reply()
                        except ConnectionError:
                            return replies, True, sent
                        replies.append(reply)
                        if reply.code == 421:
                            more, closed = rest_of_session(client)
                            return replies + more, closed, sent
            return replies, False, sent

        replies, closed, sent = await self.in_thread(attack, self.port())
        self.assertLess(sent, 1000)
        self.assertEqual([r.codes for r in replies], [(550, "5.1.1")] * 20 + [(421, "4.7.0")])
        self.assertIn("Too many errors", replies[-1].lines[-1])
        self.assertTrue(closed)
        self.assertLessEqual(self.lookups, 20)
        self.assertGreater(self.lookups, 0)


class SessionLookupCapTests(AbuseTestsMixin, TestCase):
    """C{session_lookup_limit}: group lookups per session."""

    limits = {
        "session_lookup_limit": 3,
        "client_lookup_rate_limit": 0,
        "hard_error_limit": 100,
        "error_sleep_time": 0.01,
    }

    async def test_cap_per_session(self) -> None:
        """
        A lookup of C{example} and two unknown groups are answered; the
        fourth group needing a lookup gets C{450 4.7.1 Too many recipient
        lookups} and GroupServer is not asked; C{example} again (cached) is
        still accepted. A new session has a new allowance.
        """

        def attack(port: int) -> tuple[list[RawReply], list[RawReply]]:
            with RawClient(port) as client:
                client.reply()
                client.send(EHLO + MAIL)
                client.replies(2)
                client.send(
                    f"RCPT TO:<{EXAMPLE}>\r\n".encode()
                    + unknown(1)
                    + unknown(2)
                    + unknown(3)
                    + f"RCPT TO:<dev@{DOMAIN}>\r\n".encode()
                    + f"RCPT TO:<{EXAMPLE}>\r\n".encode()
                )
                first = client.replies(6)
                quit_session(client)
            with RawClient(port) as client:
                client.reply()
                client.send(EHLO + MAIL + unknown(4) + b"QUIT\r\n")
                second = client.replies(4)
            return first, second

        first, second = await self.in_thread(attack, self.port())
        self.assertEqual(
            [r.codes for r in first],
            [
                (250, "2.1.5"),
                (550, "5.1.1"),
                (550, "5.1.1"),
                (450, "4.7.1"),
                (450, "4.7.1"),
                (250, "2.1.5"),
            ],
        )
        self.assertIn("Too many recipient lookups", first[3].lines[-1])
        self.assertEqual([r.codes for r in second[2:]], [(550, "5.1.1"), (221, "2.0.0")])
        self.assertEqual(self.lookups, 4)


class ClientLookupRateTests(AbuseTestsMixin, TestCase):
    """C{client_lookup_rate_limit}: group lookups per client IP per time unit."""

    limits = {
        "session_lookup_limit": 0,
        "client_lookup_rate_limit": 4,
        "anvil_rate_time_unit": HOUR,
        "hard_error_limit": 100,
        "error_sleep_time": 0.01,
        "client_connection_rate_limit": 0,
    }

    async def test_cap_across_sessions(self) -> None:
        """
        Three lookups in one session, one in the next: then C{450 4.7.1}
        for a recipient needing a lookup, without asking GroupServer.
        """

        def attack(port: int) -> list[RawReply]:
            replies = []
            for numbers in ([1, 2, 3], [4, 5, 6]):
                with RawClient(port) as client:
                    client.reply()
                    client.send(EHLO + MAIL + b"".join(unknown(n) for n in numbers))
                    replies += client.replies(2 + len(numbers))[2:]
                    quit_session(client)
            return replies

        replies = await self.in_thread(attack, self.port())
        self.assertEqual([r.codes for r in replies], [(550, "5.1.1")] * 4 + [(450, "4.7.1")] * 2)
        self.assertIn("Too many recipient lookups", replies[-1].lines[-1])
        self.assertEqual(self.lookups, 4)


class ErrorResetTests(AbuseTestsMixin, TestCase):
    """The error count starts again once a message is accepted."""

    limits = {"soft_error_limit": 2, "hard_error_limit": 4, "error_sleep_time": 0.01}

    async def test_accepted_message_resets(self) -> None:
        """
        Three bad commands, a message accepted, three bad commands again:
        no C{421} (the count was reset by the 250); a fourth bad command
        after the message reaches the hard limit: its C{500} is followed by
        C{421 4.7.0 Too many errors} and the close.
        """
        message = make_message("reset@example.org")

        def attack(port: int) -> tuple[list[RawReply], bool]:
            with RawClient(port) as client:
                client.reply()
                client.send(
                    EHLO
                    + b"BOGUS 1\r\nBOGUS 2\r\nBOGUS 3\r\n"
                    + MAIL
                    + f"RCPT TO:<{EXAMPLE}>\r\n".encode()
                    + b"DATA\r\n"
                )
                replies = client.replies(7)
                client.send(message + b".\r\n")
                replies.append(client.reply())
                client.send(b"BOGUS 4\r\nBOGUS 5\r\nBOGUS 6\r\nNOOP\r\nBOGUS 7\r\n")
                more, closed = rest_of_session(client)
                return replies + more, closed

        replies, closed = await self.in_thread(attack, self.port())
        self.assertEqual(
            [r.code for r in replies],
            [250, 500, 500, 500, 250, 250, 354, 250, 500, 500, 500, 250, 500, 421],
        )
        self.assertEqual(replies[-1].codes, (421, "4.7.0"))
        self.assertTrue(closed)
        self.assertEqual(len(self.service.standin.posts("example")), 1)


class JunkCommandTests(AbuseTestsMixin, TestCase):
    """C{junk_command_limit}: NOOP, RSET, VRFY, EXPN and HELP beyond it are errors."""

    limits = {
        "junk_command_limit": 5,
        "soft_error_limit": 1,
        "hard_error_limit": 3,
        "error_sleep_time": 0.01,
    }

    async def test_noop_flood_closed(self) -> None:
        """
        Five NOOP/RSET are answered as usual; from the sixth on each counts
        as an error, and the eighth's reply is followed by C{421 4.7.0} and
        the close.
        """

        def attack(port: int) -> tuple[list[RawReply], bool]:
            with RawClient(port) as client:
                client.reply()
                client.send(EHLO)
                client.reply()
                client.send(b"NOOP\r\nRSET\r\n" * 10)
                return rest_of_session(client)

        replies, closed = await self.in_thread(attack, self.port())
        self.assertEqual([r.code for r in replies[:5]], [250] * 5)
        self.assertEqual(len(replies), 5 + 3 + 1)
        self.assertEqual(replies[-1].codes, (421, "4.7.0"))
        self.assertTrue(closed)


class AuthBruteForceTests(AbuseTestsMixin, TestCase):
    """
    C{client_auth_failure_limit} and C{auth_failure_delay} on the
    submission listener (Postfix has no such limit of its own; this is
    anvil's rate for AUTH failures as fail2ban would add it).
    """

    limits = {
        "smtp_username": USER,
        "smtp_password": PASSWORD,
        "client_auth_failure_limit": 3,
        "auth_failure_delay": 0.01,
        "anvil_rate_time_unit": 2.0,
        "client_connection_rate_limit": 0,
    }

    async def test_locked_out(self) -> None:
        """
        Three wrong passwords get C{535 5.7.8}; the next AUTH, in the same
        session or a new one, gets C{421 4.7.0 Too many authentication
        failures from [127.0.0.1]} and the close, even with the right
        password; once the time unit passed, the right password is taken.
        The burst is logged once, never a password.
        """

        def attack(port: int) -> dict[str, Any]:
            result: dict[str, Any] = {}
            with RawClient(port) as client:
                client.reply()
                client.send(EHLO)
                client.reply()
                failures = []
                for n in range(3):
                    client.send(auth_plain(f"wrong-{n}"))
                    failures.append(client.reply())
                result["failures"] = failures
                client.send(auth_plain("wrong-3"))
                result["fourth"], result["fourth_closed"] = rest_of_session(client)
            with RawClient(port) as client:
                result["greeting"] = client.reply()
                client.send(EHLO)
                client.reply()
                client.send(auth_plain(PASSWORD))
                result["right"], result["right_closed"] = rest_of_session(client)
            # Wait for the unit to pass: bounded, 0.5 s apart.
            result["later"] = None
            for _ in range(40):
                time.sleep(0.5)
                with RawClient(port) as client:
                    client.reply()
                    client.send(EHLO)
                    client.reply()
                    client.send(auth_plain(PASSWORD))
                    try:
                        reply = client.reply()
                    except ConnectionError:
                        continue
                    if reply.code != 421:
                        result["later"] = reply
                        break
            return result

        result = await self.in_thread(attack, self.port("submission"))
        self.assertEqual([r.codes for r in result["failures"]], [(535, "5.7.8")] * 3)
        for key in ("fourth", "right"):
            replies = result[key]
            self.assertEqual([r.codes for r in replies], [(421, "4.7.0")], key)
            self.assertIn("Too many authentication failures from [127.0.0.1]", replies[0].lines[-1])
            self.assertTrue(result[f"{key}_closed"], key)
        self.assertEqual(result["greeting"].code, 220)
        self.assertIsNotNone(result["later"], "still locked out after 20 s")
        self.assertEqual(result["later"].codes, (235, "2.7.0"))
        text = self.log.text()
        for password in [PASSWORD, "wrong-0", "wrong-3"]:
            self.assertNotIn(password, text)
        lines = [
            line
            for line in map(formatEvent, self.log.events)
            if "AUTH" in line
            and "authenticated as" not in line
            # smtpd's line for the last client, which leaves without QUIT:
            # logged or not yet when the test reads the log.
            and not line.startswith("lost connection after AUTH")
        ]
        # The first failure and the lock-out: not one line per try (seven tries).
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("Failed AUTH from [127.0.0.1]", lines[0])  # the anvil's line
        self.assertIn("AUTH locked for [127.0.0.1]", lines[1])


class SlowSenderTests(AbuseTestsMixin, TestCase):
    """
    Slowloris: C{idle_timeout} is a deadline per command line, and DATA
    must keep up C{min_data_rate} (Postfix 3.7's smtpd_min_data_rate).
    """

    limits = {"idle_timeout": 1.0, "min_data_rate": 500}

    async def test_command_line_dribbled(self) -> None:
        """
        A command sent one byte every 0.2 s (each byte before the idle
        timeout of 1 s) is cut: C{421 4.4.2} and the close, well before
        the line would be complete.
        """

        def attack(port: int) -> tuple[list[RawReply], bool, float]:
            with RawClient(port) as client:
                client.reply()
                return dribble(client, b"NOOP " + b"x" * 200 + b"\r\n", 0.2)

        replies, closed, seconds = await self.in_thread(attack, self.port())
        self.assertEqual([r.codes for r in replies], [(421, "4.4.2")])
        self.assertTrue(closed)
        self.assertLess(seconds, CUT_BOUND)

    async def test_data_dribbled(self) -> None:
        """
        A message sent after the 354 at 5 bytes/s, below min_data_rate, is
        cut with C{421 4.4.2}; nothing reaches the group.
        """

        def attack(port: int) -> tuple[list[RawReply], bool, float]:
            with RawClient(port) as client:
                client.reply()
                client.send(EHLO + MAIL + f"RCPT TO:<{EXAMPLE}>\r\n".encode() + b"DATA\r\n")
                replies = client.replies(4)
                assert replies[-1].code == 354, replies
                return dribble(client, make_message("slow@example.org") + b".\r\n", 0.2)

        replies, closed, seconds = await self.in_thread(attack, self.port())
        self.assertEqual([r.codes for r in replies], [(421, "4.4.2")])
        self.assertTrue(closed)
        self.assertLess(seconds, CUT_BOUND)
        self.assertEqual(self.service.standin.posts("example"), [])
        self.assertEqual(self.service.standin.add_requests(), 0)

    async def test_slow_but_steady_data_taken(self) -> None:
        """
        A 3,000-byte message sent in three parts 0.5 s apart (1.5 s, longer
        than idle_timeout, but 2,000 bytes/s) is taken: the DATA deadline
        grows with the bytes received.
        """
        message = make_message("steady@example.org", body="y" * 2800)
        self.assertGreater(len(message), 2900)

        def attack(port: int) -> list[RawReply]:
            with RawClient(port) as client:
                client.reply()
                client.send(EHLO + MAIL + f"RCPT TO:<{EXAMPLE}>\r\n".encode() + b"DATA\r\n")
                replies = client.replies(4)
                third = len(message) // 3
                for part in (message[:third], message[third : 2 * third]):
                    client.send(part)
                    time.sleep(0.5)
                client.send(message[2 * third :] + b".\r\nQUIT\r\n")
                return replies + client.replies(2)

        replies = await self.in_thread(attack, self.port())
        self.assertEqual([r.code for r in replies], [250, 250, 250, 354, 250, 221])
        self.assertEqual(len(self.service.standin.posts("example")), 1)


class ListenBacklogTests(AbuseTestsMixin, TestCase):
    """C{listen_backlog}: the backlog every TCP listener asks listen(2) for."""

    limits = {"listen_backlog": 77}

    async def test_backlog_of_each_listener(self) -> None:
        """
        C{ss} shows a listening socket's backlog as its Send-Q: 77 for the
        ESMTP, LMTP and submission listeners (or the kernel's somaxconn,
        if lower).
        """
        ss = require_tool("ss")
        with open("/proc/sys/net/core/somaxconn") as f:
            somaxconn = int(f.read())

        def backlog(port: int) -> int:
            out = subprocess.run(
                [ss, "-ltnH", f"sport = :{port}"],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.split()
            # State Recv-Q Send-Q Local Peer
            return int(out[2])

        for listener in ("smtp", "lmtp", "submission"):
            self.assertEqual(
                await self.in_thread(backlog, self.port(listener)), min(77, somaxconn), listener
            )
