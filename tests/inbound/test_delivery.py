"""
Tests for L{gsmail.inbound.delivery}: routing at RCPT time, the group cache,
trace fields, and delivery through the ledger (no duplicate posts, unknown
outcomes, the reply deadline).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from email.utils import format_datetime

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from gsmail import status
from gsmail.addresses import Address, BounceCheck, Route, RouteKind
from gsmail.inbound.delivery import GroupDirectory, received_from, trace_fields
from gsmail.inbound.protocol import Envelope, Session
from gsmail.interfaces import GroupInfo, IGroupServer
from gsmail.ledger import PostLedger
from gsmail.status import GroupServerError
from tests.bounce_samples import dsn
from tests.fakes import CoreTestsMixin, FakePostmaster

MSG = b"Message-ID: <1@example.org>\nSubject: hello\n\nbody\n"


class RecipientTests(CoreTestsMixin, SynchronousTestCase):
    """RCPT-time decisions."""

    def test_fake_provides_interface(self) -> None:
        """The fake is a faithful IGroupServer."""
        self.assertTrue(verifyObject(IGroupServer, self.gs))

    def test_known_group(self) -> None:
        """A known group is accepted with 250 2.1.5 and carries its group id."""
        reply, route = self.rcpt("dev@groups.example.com")
        self.assertEqual(reply, status.RECIPIENT_OK)
        assert route is not None
        self.assertEqual(route.group_id, "dev")

    def test_unknown_group(self) -> None:
        """An unknown group is refused 550 5.1.1 naming the address."""
        reply, route = self.rcpt("nobody@groups.example.com")
        self.assertEqual((reply.code, reply.enhanced, route), (550, "5.1.1", None))
        self.assertIn("nobody@groups.example.com", reply.text)

    def test_foreign_domain_never_relayed(self) -> None:
        """Another domain gets 550 5.7.1, and GroupServer is not even asked."""
        reply, route = self.rcpt("dev@example.net")
        self.assertEqual(reply, status.RELAY_DENIED)
        self.assertEqual(self.gs.lookups, [])

    def test_relay_needs_no_lookup(self) -> None:
        """A relay address is accepted without a lookup."""
        self.assertEqual(self.rcpt("p-abc@groups.example.com")[0], status.RELAY_ADDRESS_OK)
        self.assertEqual(self.gs.lookups, [])

    def test_unsigned_bounce_looks_up_its_group(self) -> None:
        """
        An unsigned XVERP bounce address is accepted (250 2.1.5) after its
        group is looked up: anyone can write one, so it must name a group.
        One of no group is accepted too, and marked to be dropped.
        """
        reply, route = self.rcpt("dev+bob=example.net@groups.example.com")
        self.assertEqual(reply, status.BOUNCE_ADDRESS_OK)
        assert route is not None
        self.assertEqual(route.bounce_check, BounceCheck.UNSIGNED)
        reply, route = self.rcpt("nosuch+bob=example.net@groups.example.com")
        self.assertEqual(reply, status.BOUNCE_ADDRESS_OK)
        assert route is not None
        self.assertEqual(route.bounce_check, BounceCheck.UNKNOWN_GROUP)
        self.assertEqual(self.gs.lookups, ["dev@groups.example.com", "nosuch@groups.example.com"])

    def test_utf8_local_part_is_no_group(self) -> None:
        """A UTF-8 local part is 550 5.1.1 without a lookup: GroupServer's field is ASCII-only."""
        reply, route = self.rcpt("grüppe@groups.example.com")
        self.assertEqual((reply.code, reply.enhanced, route), (550, "5.1.1", None))
        self.assertEqual(self.gs.lookups, [])

    def test_groupserver_down(self) -> None:
        """GroupServer unreachable → 451 4.4.4; a wrong token (HTML reply) → 451 4.5.0."""
        self.gs.lookup_error = GroupServerError(status.GROUPSERVER_UNREACHABLE, "refused")
        self.assertEqual(self.rcpt("dev@groups.example.com")[0], status.GROUPSERVER_UNREACHABLE)
        self.gs.lookup_error = GroupServerError(status.GROUPSERVER_BAD_REPLY, "html")
        self.assertEqual(self.rcpt("dev@groups.example.com")[0], status.GROUPSERVER_BAD_REPLY)
        self.gs.lookup_error = RuntimeError("bug")
        self.assertEqual(self.rcpt("dev@groups.example.com")[0], status.LOCAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_cache(self) -> None:
        """Answers are cached (positive 300 s, negative 60 s); failures are not."""
        self.rcpt("dev@groups.example.com")
        self.rcpt("DEV@groups.example.com")
        self.rcpt("nobody@groups.example.com")
        self.rcpt("nobody@groups.example.com")
        self.assertEqual(len(self.gs.lookups), 2)
        self.clock.advance(61)
        self.rcpt("dev@groups.example.com")
        self.rcpt("nobody@groups.example.com")
        self.assertEqual(len(self.gs.lookups), 3)
        self.clock.advance(240)
        self.rcpt("dev@groups.example.com")
        self.assertEqual(len(self.gs.lookups), 4)
        self.gs.lookup_error = GroupServerError(status.GROUPSERVER_UNREACHABLE)
        self.rcpt("ann@groups.example.com")
        self.gs.lookup_error = None
        self.assertEqual(self.rcpt("ann@groups.example.com")[0], status.RECIPIENT_OK)

    def test_concurrent_lookups_coalesce(self) -> None:
        """Concurrent lookups of one address share one request."""
        pending: list[Deferred[GroupInfo]] = []
        self.gs.lookup_group = lambda a: pending.append(Deferred()) or pending[-1]  # type: ignore[method-assign]
        directory = GroupDirectory(self.gs, self.clock)
        ds = [directory.lookup(Address("dev", "groups.example.com")) for _ in range(5)]
        self.assertEqual(len(pending), 1)
        pending[0].callback(GroupInfo("dev@groups.example.com", "dev", "site"))
        for d in ds:
            self.assertEqual(self.successResultOf(d).group_id, "dev")


class NegativeCacheTests(CoreTestsMixin, SynchronousTestCase):
    """
    "No such group" is cached (one GroupServer lookup per address per
    C{group_negative_cache_ttl}), but only GroupServer's answer of the
    moment is a permanent 550: an answer from the cache is 450 4.1.1, so a
    group created meanwhile never has its mail bounced.
    """

    def setUp(self) -> None:
        super().setUp()
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)
        self.core = self.make_core(clock=self.clock, group_negative_cache_ttl=60.0)

    def code(self, address: str) -> str:
        reply, _ = self.rcpt(address)
        return f"{reply.code} {reply.enhanced}"

    def test_fresh_answer_is_permanent(self) -> None:
        """GroupServer says no group has the address: 550 5.1.1, as before."""
        reply, route = self.rcpt("nobody@groups.example.com")
        self.assertEqual(
            (reply.code, reply.enhanced, reply.text, route),
            (550, "5.1.1", "No such group <nobody@groups.example.com>", None),
        )
        self.assertEqual(self.gs.lookups, ["nobody@groups.example.com"])

    def test_cached_answer_is_transient(self) -> None:
        """
        The same address again within the TTL: 450 4.1.1 from the cache,
        GroupServer not asked; after the TTL GroupServer is asked again
        and its answer is 550 again.
        """
        self.assertEqual(self.code("nobody@groups.example.com"), "550 5.1.1")
        self.clock.advance(59)
        reply, route = self.rcpt("NOBODY@groups.example.com")
        self.assertEqual(
            (reply.code, reply.enhanced, reply.text, route),
            (
                450,
                "4.1.1",
                "No such group <NOBODY@groups.example.com> when last asked; try again later",
                None,
            ),
        )
        self.assertTrue(reply.is_transient)
        self.assertEqual(len(self.gs.lookups), 1)
        self.clock.advance(2)
        self.assertEqual(self.code("nobody@groups.example.com"), "550 5.1.1")
        self.assertEqual(len(self.gs.lookups), 2)

    def test_group_created_while_cached(self) -> None:
        """
        A group created while "no such group" is cached for its address:
        its mail gets 450 (the sender keeps it), never 550, and once the
        TTL is over the retry is accepted and posted.
        """
        self.assertEqual(self.code("new@groups.example.com"), "550 5.1.1")
        self.gs.groups["new@groups.example.com"] = "new"
        for _ in range(5):
            self.clock.advance(10)
            self.assertEqual(self.code("new@groups.example.com"), "450 4.1.1")
        self.clock.advance(11)
        reply, route = self.rcpt("new@groups.example.com")
        self.assertEqual(reply, status.RECIPIENT_OK)
        assert route is not None
        envelope = Envelope(sender=Address("alice", "example.org"), recipients=[route])
        message = self.message(b"Message-ID: <n@example.org>\n\nhello\n")
        replies = self.successResultOf(self.core.deliver(self.session, envelope, message))
        self.assertEqual(replies, [status.POSTED])
        self.assertEqual([p[0] for p in self.gs.posts], ["new"])

    def test_probing_stays_cheap(self) -> None:
        """
        A flood of RCPTs for one unknown address costs one lookup per TTL;
        each new address costs one lookup and gets 550.
        """
        codes = []
        for _ in range(100):
            codes.append(self.code("probe@groups.example.com"))
            self.clock.advance(0.5)
        self.assertEqual(codes, ["550 5.1.1"] + ["450 4.1.1"] * 99)
        self.assertEqual(len(self.gs.lookups), 1)
        fresh = [self.code(f"probe{n}@groups.example.com") for n in range(20)]
        self.assertEqual(fresh, ["550 5.1.1"] * 20)
        self.assertEqual(len(self.gs.lookups), 21)

    def test_joined_lookup_is_fresh(self) -> None:
        """
        RCPTs that wait for one lookup in flight all get GroupServer's
        answer of the moment: 550 each, one request.
        """
        pending: list[Deferred[GroupInfo]] = []
        self.gs.lookup_group = lambda a: pending.append(Deferred()) or pending[-1]  # type: ignore[method-assign]
        ds = [
            self.core.check_recipient(self.session, Address("nobody", "groups.example.com"))
            for _ in range(3)
        ]
        self.assertEqual(len(pending), 1)
        pending[0].callback(GroupInfo("nobody@groups.example.com", None, None))
        self.assertEqual([self.successResultOf(d)[0].code for d in ds], [550, 550, 550])

    def test_found_group_cached(self) -> None:
        """A group found is remembered (one lookup) and accepted from the cache."""
        self.assertEqual(self.code("dev@groups.example.com"), "250 2.1.5")
        self.clock.advance(299)
        self.assertEqual(self.code("dev@groups.example.com"), "250 2.1.5")
        self.assertEqual(len(self.gs.lookups), 1)

    def test_directory_says_where_answers_came_from(self) -> None:
        """L{GroupDirectory.find} marks cached answers; L{GroupDirectory.lookup} is unchanged."""
        directory = GroupDirectory(self.gs, self.clock, negative_ttl=5.0)
        address = Address("nobody", "groups.example.com")
        first = self.successResultOf(directory.find(address))
        second = self.successResultOf(directory.find(address))
        self.assertEqual((first.cached, second.cached), (False, True))
        self.assertIsNone(self.successResultOf(directory.lookup(address)).group_id)
        self.clock.advance(5)
        self.assertFalse(self.successResultOf(directory.find(address)).cached)


class TraceFieldTests(SynchronousTestCase):
    """The fields an MTA adds."""

    def test_fields(self) -> None:
        """Return-Path, Received (with protocol and recipient) and X-Original-To."""
        session = Session(peer="[192.0.2.1]", protocol_name="LMTP", helo="mx.example.org", id="abc")
        env = Envelope(sender=None)
        text = trace_fields(session, env, Address("dev", "g.example"), "gs.example", 0).decode()
        self.assertEqual(
            text,
            "Return-Path: <>\n"
            "Received: from mx.example.org ([192.0.2.1])\n"
            "\tby gs.example (gsmail) with LMTP id abc\n"
            "\tfor <dev@g.example>; Thu, 01 Jan 1970 00:00:00 +0000\n"
            "X-Original-To: dev@g.example\n",
        )

    def test_date_of_each_second(self) -> None:
        """
        The Received date is the receipt time's own second, the date kept for
        one second never leaking into the next (nor the last microsecond,
        which rounds up), and the same as email.utils writes it.
        """
        session = Session(peer="[192.0.2.1]", protocol_name="ESMTP", helo="h", id="abc")
        rcpt = Address("dev", "g.example")

        def date(when: float) -> str:
            text = trace_fields(session, Envelope(sender=None), rcpt, "gs", when).decode()
            return text.split("; ", 1)[1].split("\n", 1)[0]

        base = 1_780_000_000
        for when in (base + 0.1, base + 0.5, base + 0.9999994, base + 0.9999996, base + 1.0):
            self.assertEqual(
                date(when), format_datetime(datetime.fromtimestamp(when, UTC)), repr(when)
            )
        self.assertEqual(date(base + 0.2), "Thu, 28 May 2026 20:26:40 +0000")
        self.assertEqual(date(base + 0.9999996), "Thu, 28 May 2026 20:26:41 +0000")
        self.assertEqual(date(base + 0.3), "Thu, 28 May 2026 20:26:40 +0000")
        self.assertEqual(date(base + 1.3), "Thu, 28 May 2026 20:26:41 +0000")
        self.assertEqual(date(base - 86400), "Wed, 27 May 2026 20:26:40 +0000")

    def test_utf8_protocol(self) -> None:
        """With SMTPUTF8 the protocol is UTF8SMTPS / UTF8LMTP (RFC 6531 §3.7.4)."""
        session = Session(peer="x", protocol_name="ESMTP", helo="h", extended=True, tls=True)
        env = Envelope(sender=Address("jö", "example.org"), smtputf8=True)
        text = trace_fields(session, env, Address("grüppe", "g.example"), "gs", 0).decode()
        self.assertIn("with UTF8SMTPS id", text)
        self.assertIn("X-Original-To: grüppe@g.example\n", text)


class DeliveryTests(CoreTestsMixin, SynchronousTestCase):
    """After the final dot."""

    def test_post(self) -> None:
        """A message to a group is posted with the trace fields before it, then 250."""
        replies = self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), MSG))
        self.assertEqual(replies, [status.POSTED])
        [(group_id, data, time_source)] = self.gs.posts
        self.assertEqual((group_id, time_source), ("dev", "server"))
        self.assertTrue(
            data.startswith(b"Return-Path: <alice@example.org>\nReceived: from mx.example.org")
        )
        self.assertTrue(data.endswith(b"X-Original-To: dev@groups.example.com\n" + MSG))

    def test_spool_removed(self) -> None:
        """The spool file is removed once the delivery is over."""
        message = self.message(MSG)
        self.successResultOf(
            self.core.deliver(self.session, self.envelope("dev@groups.example.com"), message)
        )
        self.assertFalse(os.path.exists(message.path))

    def test_two_addresses_of_one_group(self) -> None:
        """The same message to two addresses of one group is posted once; both get 250."""
        self.gs.groups["dev-alias@groups.example.com"] = "dev"
        replies = self.successResultOf(
            self.deliver(
                self.envelope("dev@groups.example.com", "dev-alias@groups.example.com"), MSG
            )
        )
        self.assertEqual([r.code for r in replies], [250, 250])
        self.assertEqual(len(self.gs.posts), 1)

    def test_retry_not_posted_again(self) -> None:
        """A sender's second copy (the same bytes) is acknowledged without a post."""
        self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), MSG))
        replies = self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), MSG))
        self.assertEqual(replies, [status.ALREADY_DELIVERED])
        self.assertEqual(len(self.gs.posts), 1)

    def test_retry_after_restart(self) -> None:
        """The ledger survives a restart: the copy is still not posted again."""
        self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), MSG))
        self.successResultOf(self.ledger.close())
        self.ledger = PostLedger(self.ledger.path, clock=self.clock)
        self.ledger.open()
        self.core = self.make_core()
        replies = self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), MSG))
        self.assertEqual(replies, [status.ALREADY_DELIVERED])
        self.assertEqual(len(self.gs.posts), 1)

    def test_no_message_id_uses_digest(self) -> None:
        """Identical bytes are one post, different bytes two, Message-ID or not."""
        body = b"Subject: no id\n\nbody\n"
        self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), body))
        self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), body))
        self.successResultOf(
            self.deliver(self.envelope("dev@groups.example.com"), body + b"more\n")
        )
        self.assertEqual(len(self.gs.posts), 2)

    def test_other_group_is_posted(self) -> None:
        """The same Message-ID to two groups is two posts."""
        replies = self.successResultOf(
            self.deliver(self.envelope("dev@groups.example.com", "ann@groups.example.com"), MSG)
        )
        self.assertEqual(replies, [status.POSTED, status.POSTED])
        self.assertEqual(sorted(p[0] for p in self.gs.posts), ["ann", "dev"])

    def test_concurrent_copies_share_one_post(self) -> None:
        """Two sessions delivering one message at once make one post and both get 250."""
        self.gs.hold = True
        d1 = self.deliver(self.envelope("dev@groups.example.com"), MSG)
        d2 = self.deliver(self.envelope("dev@groups.example.com"), MSG)
        self.assertEqual(len(self.gs.posts), 1)
        self.gs.held[0].callback(None)
        self.assertEqual(self.successResultOf(d1), [status.POSTED])
        self.assertEqual(self.successResultOf(d2), [status.POSTED])

    def test_transient_failure_then_retry(self) -> None:
        """A failed post is 451 4.5.0, and the retry posts."""
        self.gs.post_error = GroupServerError(status.GROUPSERVER_ERROR, "500")
        self.assertEqual(
            self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), MSG)),
            [status.GROUPSERVER_ERROR],
        )
        self.gs.post_error = None
        self.assertEqual(
            self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), MSG)),
            [status.POSTED],
        )
        self.assertEqual(len(self.gs.posts), 2)  # one failed attempt, one post

    def test_unknown_outcome(self) -> None:
        """
        Connection lost after the post was sent: 451 4.4.2, nothing is
        recorded, and the sender's retry adds it again (GroupServer archives
        a post id once, so that is how it is never lost).
        """
        self.gs.post_error = GroupServerError(status.OUTCOME_UNKNOWN, "lost", outcome_unknown=True)
        self.assertEqual(
            self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), MSG)),
            [status.OUTCOME_UNKNOWN],
        )
        self.gs.post_error = None
        [reply] = self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), MSG))
        self.assertEqual(reply, status.POSTED)
        self.assertEqual(len(self.gs.posts), 2)
        [reply] = self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), MSG))
        self.assertEqual(reply, status.ALREADY_DELIVERED)
        self.assertEqual(len(self.gs.posts), 2)

    def test_bounce_unknown_outcome_not_repeated(self) -> None:
        """
        A bounce whose answer was lost counts as recorded (250 2.1.5): a
        bounce counted twice brings a member nearer to being disabled.
        """
        self.gs.post_error = GroupServerError(status.OUTCOME_UNKNOWN, "lost", outcome_unknown=True)
        envelope = self.envelope("dev+alice=example.org@groups.example.com")
        report = dsn("alice@example.org")
        self.assertEqual(
            self.successResultOf(self.deliver(envelope, report)), [status.BOUNCE_RECORDED]
        )
        self.gs.post_error = None
        self.assertEqual(
            self.successResultOf(self.deliver(envelope, report)), [status.ALREADY_DELIVERED]
        )
        self.assertEqual(len(self.gs.bounces), 1)

    def test_message_id_squatting(self) -> None:
        """
        A stranger's message that reuses a real message's Message-ID does not
        make gsmail take the real one for a copy: both are posted.
        """
        squat = MSG.replace(b"Subject:", b"Subject: spam", 1) + b"buy now\n"
        self.assertIn(b"Message-ID", squat)
        self.assertEqual(
            self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), squat)),
            [status.POSTED],
        )
        self.assertEqual(
            self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), MSG)),
            [status.POSTED],
        )
        self.assertEqual(len(self.gs.posts), 2)

    def test_unexpected_error_is_transient(self) -> None:
        """A bug while posting is 451 4.3.0, never a bounce."""
        self.gs.post_error = RuntimeError("bug")
        self.assertEqual(
            self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), MSG)),
            [status.LOCAL_ERROR],
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_reply_deadline(self) -> None:
        """
        A post still running at the deadline is answered 451 4.4.5; it goes
        on, and once it succeeded the retry is answered 250 without a post.
        """
        self.gs.hold = True
        message = self.message(MSG)
        d = self.core.deliver(self.session, self.envelope("dev@groups.example.com"), message)
        self.assertNoResult(d)
        self.clock.advance(540)
        [reply] = self.successResultOf(d)
        self.assertEqual((reply.code, reply.enhanced), (451, "4.4.5"))
        self.assertTrue(os.path.exists(message.path))  # the post still reads it
        self.gs.held[0].callback(None)
        self.assertFalse(os.path.exists(message.path))
        self.gs.hold = False
        self.assertEqual(
            self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), MSG)),
            [status.ALREADY_DELIVERED],
        )
        self.assertEqual(len(self.gs.posts), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reply_deadline_logged(self) -> None:
        """
        The log says the client was told 451 at the deadline (one warning
        with the queue id), and the delivery line that comes later says
        its success came after that reply, in the text and as a field.
        """
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.gs.hold = True
        envelope = self.envelope("dev@groups.example.com")
        envelope.queue_id = "4B1D0C0FFE"
        d = self.core.deliver(self.session, envelope, self.message(MSG))
        self.clock.advance(540)
        self.successResultOf(d)
        [warning] = [e for e in events if "deadline passed" in formatEvent(e)]
        self.assertEqual(
            formatEvent(warning),
            "4B1D0C0FFE: reply deadline passed with 1 deliveries running: the client is told"
            " 451 4.4.5; their outcome is logged when it comes",
        )
        self.gs.held[0].callback(None)
        [line] = [e for e in events if e.get("gsmail_event") == "delivery"]
        self.assertTrue(line["after_deadline"])
        self.assertEqual(line["status"], "sent")
        self.assertIn(
            "; after the reply deadline: the client was told 451 4.4.5)", formatEvent(line)
        )

    def test_delivery_in_time_not_marked(self) -> None:
        """A delivery answered within the deadline has C{after_deadline} false."""
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), MSG))
        [line] = [e for e in events if e.get("gsmail_event") == "delivery"]
        self.assertFalse(line["after_deadline"])
        self.assertNotIn("deadline", formatEvent(line))

    def test_retry_joins_running_post(self) -> None:
        """A retry arriving while the first post still runs joins it: one post."""
        self.gs.hold = True
        d1 = self.deliver(self.envelope("dev@groups.example.com"), MSG)
        self.clock.advance(540)
        self.successResultOf(d1)
        d2 = self.deliver(self.envelope("dev@groups.example.com"), MSG)
        self.gs.held[0].callback(None)
        self.assertEqual(self.successResultOf(d2), [status.POSTED])
        self.assertEqual(len(self.gs.posts), 1)

    def test_relay(self) -> None:
        """A relay address sends the message to the relay page, once."""
        env = self.envelope("p-abc@groups.example.com")
        self.assertEqual(self.successResultOf(self.deliver(env, MSG)), [status.RELAYED])
        self.successResultOf(self.deliver(self.envelope("p-abc@groups.example.com"), MSG))
        self.assertEqual(len(self.gs.relays), 1)
        self.assertIn(b"X-Original-To: p-abc@groups.example.com\n", self.gs.relays[0])

    def test_bounce(self) -> None:
        """An XVERP bounce is recorded (2.1.5) with the member and the group, once."""
        env = self.envelope("dev+bob=example.net@groups.example.com")
        report = dsn("bob@example.net")
        self.assertEqual(self.successResultOf(self.deliver(env, report)), [status.BOUNCE_RECORDED])
        self.successResultOf(
            self.deliver(self.envelope("dev+bob=example.net@groups.example.com"), report)
        )
        self.assertEqual(self.gs.bounces, [("bob@example.net", "dev@groups.example.com")])

    def test_bounce_not_a_report(self) -> None:
        """
        Plain mail to a bounce address is accepted and not recorded
        (250 2.0.0), and never reaches the ledger.
        """
        env = self.envelope("dev+bob=example.net@groups.example.com")
        self.assertEqual(self.successResultOf(self.deliver(env, MSG)), [status.BOUNCE_NOT_FAILURE])
        self.assertEqual(self.gs.bounces, [])
        self.assertEqual(
            self.successResultOf(self.deliver(env, dsn("bob@example.net"))),
            [status.BOUNCE_RECORDED],
        )

    def test_when_idle(self) -> None:
        """when_idle fires once running deliveries are over."""
        self.gs.hold = True
        self.deliver(self.envelope("dev@groups.example.com"), MSG)
        idle = self.core.when_idle()
        self.assertNoResult(idle)
        self.gs.held[0].callback(None)
        self.successResultOf(idle)

    def test_route_kind_group_requires_id(self) -> None:
        """Routes built at RCPT time for groups carry the looked-up id."""
        reply, route = self.rcpt("ann@groups.example.com")
        self.assertEqual(
            route, Route(RouteKind.GROUP, Address("ann", "groups.example.com"), group_id="ann")
        )


class SafeTraceTests(SynchronousTestCase):
    """No CR, LF, control or non-ASCII junk from the HELO name reaches C{Received}."""

    def received(self, helo: str | None, peer: str = "[192.0.2.1]") -> str:
        session = Session(peer=peer, protocol_name="ESMTP", helo=helo, extended=True, id="abc")
        text = trace_fields(session, Envelope(sender=None), Address("dev", "g.example"), "gs", 0)
        return text.decode("utf-8").split("\n")[1]

    def test_valid_names_as_written(self) -> None:
        """A domain or address literal is written as the C{from} name (RFC 5321 §4.4)."""
        self.assertEqual(
            self.received("mx.example.org"), "Received: from mx.example.org ([192.0.2.1])"
        )
        self.assertEqual(self.received("[192.0.2.1]"), "Received: from [192.0.2.1] ([192.0.2.1])")
        self.assertEqual(self.received(None), "Received: from unknown ([192.0.2.1])")

    def test_invalid_names_in_a_comment(self) -> None:
        """
        Any other HELO is written C{from unknown (helo=...)} with what is not
        printable ASCII, and the comment's own C{( ) \\}, made C{?}.
        """
        self.assertEqual(
            self.received("bad(name)\\é"),
            "Received: from unknown (helo=bad?name???) ([192.0.2.1])",
        )
        self.assertEqual(
            self.received("x\u2028Bcc: victim@example.org"),
            "Received: from unknown (helo=x?Bcc:?victim@example.org) ([192.0.2.1])",
        )
        self.assertEqual(
            self.received("my_host"), "Received: from unknown (helo=my_host) ([192.0.2.1])"
        )

    def test_long_name_capped(self) -> None:
        """An invalid HELO name is cut at 255 characters."""
        line = self.received("_" * 2000)
        self.assertEqual(line, "Received: from unknown (helo=" + "_" * 255 + ") ([192.0.2.1])")

    def test_received_from(self) -> None:
        """The submission listener's Received takes its C{from} clause from the same place."""
        session = Session(peer="local", protocol_name="ESMTP", helo="a\x85b")
        self.assertEqual(received_from(session), "from unknown (helo=a?b) (local)")


class PostmasterRoutingTests(CoreTestsMixin, SynchronousTestCase):
    """Mail to postmaster (RFC 5321 §4.5.1)."""

    def setUp(self) -> None:
        super().setUp()
        self.postmaster = FakePostmaster()
        self.core = self.make_core(postmaster=self.postmaster)

    def test_accepted_bare_and_at_site_domains(self) -> None:
        """Bare postmaster and postmaster at a site domain, in any case, get 250 2.1.5."""
        for address in [
            Address("postmaster", ""),
            Address("POSTMASTER", ""),
            Address("Postmaster", "groups.example.com"),
        ]:
            reply, route = self.successResultOf(self.core.check_recipient(self.session, address))
            self.assertEqual(reply, status.POSTMASTER_OK)
            assert route is not None
            self.assertIs(route.kind, RouteKind.TABLE)
        self.assertEqual(self.gs.lookups, [])

    def test_elsewhere_is_relaying(self) -> None:
        """Postmaster of another domain is relaying: 550 5.7.1."""
        reply, route = self.successResultOf(
            self.core.check_recipient(self.session, Address("postmaster", "example.net"))
        )
        self.assertEqual(reply, status.RELAY_DENIED)

    def test_delivered_with_trace_fields(self) -> None:
        """The postmaster's copy has the trace fields, and nothing is posted to GroupServer."""
        env = Envelope(sender=Address("alice", "example.org"))
        reply, route = self.successResultOf(
            self.core.check_recipient(self.session, Address("postmaster", ""))
        )
        assert route is not None
        env.recipients.append(route)
        self.assertEqual(self.successResultOf(self.deliver(env, MSG)), [status.POSTMASTER_STORED])
        [(sender, data)] = self.postmaster.kept
        self.assertEqual(sender, "alice@example.org")
        self.assertIn(b"\tfor <postmaster>; ", data)
        self.assertIn(b"X-Original-To: postmaster\n", data)
        self.assertTrue(data.endswith(MSG))
        self.assertEqual(self.gs.posts, [])

    def test_without_postmaster_looked_up_as_group(self) -> None:
        """A core without a postmaster looks postmaster up like any group (as before)."""
        self.core = self.make_core()
        self.rcpt("postmaster@groups.example.com")
        self.assertEqual(self.gs.lookups, ["postmaster@groups.example.com"])


class LogSafetyTests(CoreTestsMixin, SynchronousTestCase):
    """Values from the message reach the log escaped and capped."""

    def test_message_id_escaped_and_capped(self) -> None:
        """A 200 KB Message-ID with ESC and BEL makes a short, clean log line."""
        events: list[LogEvent] = []

        def observe(event: LogEvent) -> None:
            events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        message_id = b"<\x1b[2J\x07" + b"x" * 200_000 + b"\x00\x7f@example.org>"
        data = b"Message-ID: " + message_id + b"\nSubject: s\n\nbody\n"
        self.successResultOf(self.deliver(self.envelope("dev@groups.example.com"), data))
        # The delivery line carries the Message-ID as a field (the queued
        # line, made by the listener, shows it).
        [event] = [e for e in events if "message_id" in e]
        line = formatEvent(event)
        self.assertLess(len(line) + len(event["message_id"]), 600)
        self.assertTrue(line.isprintable(), line[:100])
        self.assertTrue(event["message_id"].isprintable())
        self.assertIn("\\x1b[2J\\x07xxx", event["message_id"])
