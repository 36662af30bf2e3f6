"""
Faults end to end: GroupServer down, slow, failing, answering the wrong
thing or dropping the connection, the reply deadline, a restart, and gsmail's
own connection limits. A real client (smtplib or a raw socket) talks to a
running gsmail; the stand-in's L{gsmail.standin.Faults} make GroupServer
misbehave. Each test asserts the reply the sender sees, and what the group
has in the end: a transient fault is always a 4xx, and a retry never posts a
message twice.

Timeouts are small (fractions of a second) so that every test is quick and
bounded; tests whose stand-in is still working on a delayed request wait for
it (C{StandIn.when_idle}) before they end.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from gsmail import status
from gsmail.config import GsmailConfig
from gsmail.service import GsmailService, makeService
from gsmail.standin import StandIn
from tests.integration.clients import (
    EXAMPLE,
    RawClient,
    RawReply,
    Transaction,
    as_stored,
    codes,
    make_message,
    send_once,
    smtplib_codes,
    strip_trace,
)
from tests.util import make_config, port_of, start_service

#: GroupServer's response timeout in these tests, in seconds.
RESPONSE_TIMEOUT = 0.5


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def maildir_posts(config: GsmailConfig, group_id: str) -> list[bytes]:
    """The posts on disk in the stand-in's Maildir of C{group_id}."""
    new = os.path.join(config.standin_dir, "groups", group_id, "new")
    posts = []
    for name in sorted(os.listdir(new)):
        with open(os.path.join(new, name), "rb") as f:
            posts.append(f.read())
    return posts


class GroupServerFaultTests(TestCase):
    """What the sender sees when GroupServer misbehaves, and what the group gets."""

    def start(self, **overrides: object) -> tuple[GsmailService, int]:
        config = make_config(self.mktemp(), **overrides)
        service = start_service(self, config)
        return service, port_of(service, "smtp")

    async def send(self, port: int, message: bytes) -> Transaction:
        return await deferToThread(send_once, port, [EXAMPLE], message)

    def assertRcptReply(self, answers: Transaction, reply: status.Reply) -> None:
        self.assertEqual([smtplib_codes(a) for a in answers.rcpts], [codes(reply)])
        self.assertIsNone(answers.data, "DATA was sent though RCPT failed")

    def assertDataReply(self, answers: Transaction, reply: status.Reply) -> None:
        """
        RCPT was accepted and DATA got C{reply}'s codes. (The codes of "Added"
        and "Already delivered" are the same, 250 2.0.0: tests tell them apart
        by what GroupServer received.)
        """
        self.assertEqual([smtplib_codes(a) for a in answers.rcpts], [codes(status.RECIPIENT_OK)])
        assert answers.data is not None
        self.assertEqual(smtplib_codes(answers.data), codes(reply))

    async def test_groupserver_down(self) -> None:
        """
        GroupServer cannot be reached (nothing listens at its URL): RCPT gets
        451 4.4.4, so the sender keeps the message and retries.
        """
        _, port = self.start(url=f"http://127.0.0.1:{closed_port()}", connect_timeout=1.0)
        answers = await self.send(port, make_message("down@example.org"))
        self.assertRcptReply(answers, status.GROUPSERVER_UNREACHABLE)

    async def test_group_lookup_too_slow(self) -> None:
        """
        The group-exists page answers after response_timeout: RCPT gets
        451 4.4.7.
        """
        service, port = self.start(response_timeout=RESPONSE_TIMEOUT)
        service.standin.faults.delay = 1.0
        service.standin.faults.pages = frozenset({"exists"})
        answers = await self.send(port, make_message("slow-exists@example.org"))
        self.assertRcptReply(answers, status.GROUPSERVER_TIMEOUT)
        await service.standin.when_idle()

    async def test_post_too_slow(self) -> None:
        """
        The add-email page answers after response_timeout: DATA gets 451 4.4.7
        and the outcome is unknown (GroupServer got the whole post). The
        stand-in stores it after its delay; the sender's retry adds it again
        and GroupServer does not archive it twice: exactly one post.
        """
        service, port = self.start(response_timeout=RESPONSE_TIMEOUT)
        service.standin.faults.delay = 1.0
        service.standin.faults.pages = frozenset({"add"})
        message = make_message("slow-add@example.org")
        first = await self.send(port, message)
        self.assertDataReply(first, status.GROUPSERVER_TIMEOUT)
        await service.standin.when_idle()
        service.standin.faults.reset()
        retry = await self.send(port, message)
        self.assertDataReply(retry, status.POSTED)
        self.assertEqual(service.standin.requests["add"], 2, "the retry was not posted")
        [post] = service.standin.posts("example")
        self.assertEqual(strip_trace(post), as_stored(message))

    async def test_server_error_on_post(self) -> None:
        """
        The add-email page answers 500: DATA gets 451 4.5.0 and nothing is
        stored; once GroupServer is well, the retry posts: exactly one post.
        """
        service, port = self.start()
        service.standin.faults.status = 500
        service.standin.faults.pages = frozenset({"add"})
        message = make_message("error-500@example.org")
        first = await self.send(port, message)
        self.assertDataReply(first, status.GROUPSERVER_ERROR)
        self.assertEqual(service.standin.posts("example"), [])
        service.standin.faults.reset()
        retry = await self.send(port, message)
        self.assertDataReply(retry, status.POSTED)
        [post] = service.standin.posts("example")
        self.assertEqual(strip_trace(post), as_stored(message))

    async def test_html_instead_of_json(self) -> None:
        """
        The group-exists page answers its HTML form instead of JSON (what a
        wrong token looks like): RCPT gets 451 4.3.5.
        """
        service, port = self.start()
        service.standin.faults.html_instead_of_json = True
        answers = await self.send(port, make_message("html@example.org"))
        self.assertRcptReply(answers, status.GROUPSERVER_REFUSED)

    async def test_wrong_token(self) -> None:
        """
        gsmail's token differs from the site's: GroupServer re-renders the form
        with an error status (200, HTML), and RCPT gets 451 4.3.5.
        """
        from twisted.internet import reactor as global_reactor

        reactor: Any = global_reactor
        # A stand-in of our own that expects another token than gsmail's.
        directory = self.mktemp()
        standin = StandIn(
            os.path.join(directory, "site"),
            "the-site-token",
            {EXAMPLE: "example"},
            clock=reactor,
            reactor=reactor,
        )
        listening = reactor.listenTCP(0, standin.site(), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        _, port = self.start(url=f"http://127.0.0.1:{listening.getHost().port}")
        answers = await self.send(port, make_message("token@example.org"))
        self.assertRcptReply(answers, status.GROUPSERVER_REFUSED)
        self.assertEqual(standin.requests["exists"], 1)

    async def test_drop_after_store(self) -> None:
        """
        GroupServer stores the post and the connection drops before the
        answer: DATA gets 451 4.4.2 (outcome unknown); the retry adds it
        again, GroupServer archives it once: exactly one post, nothing lost.
        """
        await self._dropped("after_store", "drop-after@example.org")

    async def test_drop_before_store(self) -> None:
        """
        The connection drops before GroupServer stored the post: gsmail
        cannot tell this from a drop after storing, answers 451 4.4.2 and the
        retry adds it: the message is in the group once (never lost).
        """
        await self._dropped("before_store", "drop-before@example.org")

    async def _dropped(self, drop: str, message_id: str) -> None:
        service, port = self.start()
        service.standin.faults.drop = drop
        service.standin.faults.pages = frozenset({"add"})
        message = make_message(message_id)
        first = await self.send(port, message)
        self.assertDataReply(first, status.OUTCOME_UNKNOWN)
        service.standin.faults.reset()
        retry = await self.send(port, message)
        self.assertDataReply(retry, status.POSTED)
        self.assertEqual(service.standin.requests["add"], 2, "the retry was not posted")
        [post] = service.standin.posts("example")
        self.assertEqual(strip_trace(post), as_stored(message))
        again = await self.send(port, message)
        self.assertDataReply(again, status.ALREADY_DELIVERED)
        self.assertEqual(service.standin.requests["add"], 2)

    async def test_reply_deadline(self) -> None:
        """
        A post still running at the reply deadline gets 451 4.4.5; it goes on
        and succeeds, and the retry after it finished is answered 250 "Already
        delivered": exactly one post.
        """
        service, port = self.start(reply_deadline=0.5)
        service.standin.faults.delay = 1.5
        service.standin.faults.pages = frozenset({"add"})
        message = make_message("deadline@example.org")
        first = await self.send(port, message)
        self.assertDataReply(first, status.TOO_BUSY)
        self.assertEqual(service.standin.posts("example"), [], "answered after the post")
        await service.core.when_idle()
        service.standin.faults.reset()
        retry = await self.send(port, message)
        self.assertDataReply(retry, status.ALREADY_DELIVERED)
        self.assertEqual(retry.data, (250, status.ALREADY_DELIVERED.status_line().encode("utf-8")))
        [post] = service.standin.posts("example")
        self.assertEqual(strip_trace(post), as_stored(message))


class RestartTests(TestCase):
    """The ledger on disk outlives the process."""

    def start(self, config: GsmailConfig) -> GsmailService:
        """Start a service this test stops itself (cleanup stops it if still running)."""
        from twisted.internet import reactor

        service = makeService(config, reactor)
        service.privilegedStartService()
        service.startService()

        def stop() -> Deferred[None] | None:
            return service.stopService() if service.running else None

        self.addCleanup(stop)
        return service

    async def test_retry_after_restart(self) -> None:
        """
        A message delivered before a restart and sent again afterwards is
        answered 250 "Already delivered", and the group still has one post.
        """
        config = make_config(self.mktemp())
        message = make_message("restart@example.org")
        first = self.start(config)
        before = await deferToThread(send_once, port_of(first, "smtp"), [EXAMPLE], message)
        assert before.data is not None
        self.assertEqual(smtplib_codes(before.data), codes(status.POSTED))
        await first.stopService()

        second = self.start(config)
        after = await deferToThread(send_once, port_of(second, "smtp"), [EXAMPLE], message)
        assert after.data is not None
        self.assertEqual(after.data, (250, status.ALREADY_DELIVERED.status_line().encode()))
        [post] = maildir_posts(config, "example")
        self.assertEqual(strip_trace(post), as_stored(message))


class ConnectionLimitTests(TestCase):
    """gsmail's own limits on connections."""

    async def test_idle_timeout(self) -> None:
        """A client that says nothing gets 421 4.4.2 after idle_timeout and is disconnected."""
        service = start_service(self, make_config(self.mktemp(), idle_timeout=0.3))
        port = port_of(service, "smtp")

        def talk() -> tuple[RawReply, RawReply, bool]:
            with RawClient(port) as client:
                return client.reply(), client.reply(), client.closed_by_server()

        greeting, timeout, closed = await deferToThread(talk)
        self.assertEqual(greeting.code, 220)
        self.assertEqual(timeout.codes, codes(status.IDLE_TIMEOUT))
        self.assertTrue(closed, "still connected after the idle timeout")

    async def test_max_connections(self) -> None:
        """
        With max_connections = 2, a third connection gets 421 4.7.0 and is
        closed; once a client leaves, a new connection is served again.
        """
        service = start_service(self, make_config(self.mktemp(), max_connections=2))
        port = port_of(service, "smtp")

        def talk() -> tuple[list[RawReply], bool, RawReply]:
            with RawClient(port) as first, RawClient(port) as second:
                greetings = [first.reply(), second.reply()]
                with RawClient(port) as third:
                    greetings.append(third.reply())
                    refused_closed = third.closed_by_server()
                first.send(b"QUIT\r\n")
                first.reply()
                first.closed_by_server()
                with RawClient(port) as fourth:
                    later = fourth.reply()
                    fourth.send(b"QUIT\r\n")
                    fourth.reply()
                return greetings, refused_closed, later

        greetings, refused_closed, later = await deferToThread(talk)
        self.assertEqual([g.code for g in greetings[:2]], [220, 220])
        self.assertEqual(greetings[2].codes, codes(status.TOO_MANY_CONNECTIONS))
        self.assertTrue(refused_closed, "the refused connection stayed open")
        self.assertEqual(later.code, 220)
