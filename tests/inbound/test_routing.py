"""
Tests for L{gsmail.inbound.routing} through the delivery core: the route
table at RCPT time, and each action after the final dot (in memory, with a
fake GroupServer, a fake queue and a fake news server).
"""

from __future__ import annotations

import json
import mailbox
import os
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from gsmail import status
from gsmail.addresses import Address, RouteKind
from gsmail.inbound.routing import RoutedMessage, SequenceStore, SrsCodec, make_article
from gsmail.routes import NntpTarget, parse_routes
from gsmail.status import GroupServerError, Reply
from gsmail.verp import VerpKeys
from tests.fakes import CoreTestsMixin, FakePostmaster

DOMAINS = ("groups.example.com", "lists.example.com")
MSG = b"Message-ID: <1@example.org>\nFrom: Alice <alice@example.org>\nSubject: hello\n\nbody\n"


@attrs.frozen
class Queued:
    id: str
    sender: str
    recipients: list[str]
    data: bytes


class RecordingQueue:
    """The outbound queue as routes use it: records each message; C{error} fails."""

    def __init__(self) -> None:
        self.entries: list[Queued] = []
        self.error: Exception | None = None

    def enqueue(
        self, sender: str, recipients: list[str], data: bytes | str, **kw: Any
    ) -> Deferred[Any]:
        if self.error is not None:
            return fail(self.error)
        if isinstance(data, str):
            with open(data, "rb") as f:
                data = f.read()
        entry = Queued(f"q{len(self.entries) + 1}", sender, list(recipients), data)
        self.entries.append(entry)
        return succeed(entry)


class FakeNews:
    """Records articles; C{error} makes posting fail."""

    def __init__(self) -> None:
        self.articles: list[tuple[NntpTarget, bytes]] = []
        self.error: Exception | None = None

    def __call__(self, target: NntpTarget, article: bytes) -> Deferred[None]:
        if self.error is not None:
            return fail(self.error)
        self.articles.append((target, article))
        return succeed(None)


#: What handler routes call (module-level, importable as tests.inbound.test_routing:...).
HANDLED: list[RoutedMessage] = []


def record_handler(message: RoutedMessage) -> None:
    with open(message.path, "rb") as f:
        HANDLED.append(attrs.evolve(message, variables={"data": f.read().decode()}))


def refusing_handler(message: RoutedMessage) -> Reply:
    return Reply(550, "5.1.1", "Unknown list")


def raising_handler(message: RoutedMessage) -> Deferred[Reply]:
    return fail(RuntimeError("handler bug"))


class RoutingTestsMixin(CoreTestsMixin):
    ROUTES = ""

    def setUp(self) -> None:
        super().setUp()
        self.postmaster = FakePostmaster()
        self.queue = RecordingQueue()
        self.news = FakeNews()
        self.state = os.path.join(self.dir, "state")
        self.errors = os.path.join(self.dir, "errors")
        self.rejected = os.path.join(self.dir, "rejected")
        self.use_routes(self.ROUTES)

    def use_routes(self, text: str) -> None:
        self.core = self.make_core(
            domains=DOMAINS,
            postmaster=self.postmaster,
            routes=parse_routes(text, "routes.ini", domains=DOMAINS),
            route_options={
                "spool_dir": self.dir,
                "state_dir": self.state,
                "errors_dir": self.errors,
                "rejected_dir": self.rejected,
                "srs_domain": "groups.example.com",
                "nntp": self.news,
            },
        )
        self.core.actions.queue = self.queue
        keys = VerpKeys((b"k" * 32, b"o" * 32), 0.0)
        self.core.actions.srs = SrsCodec(keys.keys, self.clock)

    def deliver_to(
        self, address: str, data: bytes = MSG, sender: str = "alice@example.org"
    ) -> Reply:
        local, _, domain = sender.partition("@")
        env = self.envelope(address)
        env.sender = Address(local, domain) if sender else None
        [reply] = self.successResultOf(self.deliver(env, data))  # type: ignore[attr-defined]
        return reply  # type: ignore[no-any-return]

    def files(self, directory: str) -> list[str]:
        return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


class RcptTests(RoutingTestsMixin, SynchronousTestCase):
    """RCPT-time decisions of the table."""

    ROUTES = """
[noreply@groups.example.com]
reject = 550 5.7.1 Nobody reads this address

[old-dev@*]
group = dev

[drop@groups.example.com]
forward =
"""

    def test_reject_with_the_sites_words(self) -> None:
        """A reject route refuses at RCPT with its own reply; GroupServer is not asked."""
        reply, route = self.rcpt("noreply@groups.example.com")
        self.assertEqual(reply, Reply(550, "5.7.1", "Nobody reads this address"))
        self.assertIsNone(route)
        self.assertEqual(self.gs.lookups, [])

    def test_group_without_lookup(self) -> None:
        """A group route is accepted without a lookup and posted to its group."""
        reply, route = self.rcpt("old-dev@lists.example.com")
        self.assertEqual(reply, status.RECIPIENT_OK)
        assert route is not None
        self.assertEqual((route.kind, route.group_id), (RouteKind.TABLE, "dev"))
        self.assertEqual(self.gs.lookups, [])
        self.assertEqual(self.deliver_to("old-dev@lists.example.com"), status.POSTED)
        [(group_id, data, _)] = self.gs.posts
        self.assertEqual(group_id, "dev")
        self.assertIn(b"X-Original-To: old-dev@lists.example.com\n", data)
        self.assertTrue(data.endswith(MSG))

    def test_group_route_and_group_address_post_once(self) -> None:
        """The old address and the group's own share the ledger key: one post."""
        self.deliver_to("old-dev@groups.example.com")
        self.deliver_to("dev@groups.example.com")
        self.assertEqual(len(self.gs.posts), 1)

    def test_drop(self) -> None:
        """An empty forward list accepts and drops (emailtunnel's empty list)."""
        self.assertEqual(self.rcpt("drop@groups.example.com")[0], status.RECIPIENT_OK)
        self.assertEqual(self.deliver_to("drop@groups.example.com"), status.ROUTE_DROPPED)
        self.assertEqual((self.gs.posts, self.queue.entries), ([], []))

    def test_postmaster_and_abuse_defaults(self) -> None:
        """postmaster and abuse at every domain, and bare postmaster, are postmaster mail."""
        for address in [
            Address("postmaster", ""),
            Address("Postmaster", "lists.example.com"),
            Address("abuse", "groups.example.com"),
        ]:
            reply, route = self.successResultOf(self.core.check_recipient(self.session, address))
            self.assertEqual(reply, status.POSTMASTER_OK)
        self.assertEqual(self.deliver_to("abuse@groups.example.com"), status.POSTMASTER_STORED)
        [(sender, data)] = self.postmaster.kept
        self.assertEqual(sender, "alice@example.org")
        self.assertIn(b"X-Original-To: abuse@groups.example.com\n", data)
        self.assertEqual(self.gs.lookups, [])

    def test_other_domains_still_refused(self) -> None:
        """The table never makes gsmail a relay: postmaster elsewhere is 550 5.7.1."""
        reply, _ = self.successResultOf(
            self.core.check_recipient(self.session, Address("postmaster", "example.net"))
        )
        self.assertEqual(reply, status.RELAY_DENIED)

    def test_no_match_asks_groupserver(self) -> None:
        """An address no route matches is a group lookup, as without a table."""
        self.assertEqual(self.rcpt("dev@groups.example.com")[0], status.RECIPIENT_OK)
        self.assertEqual(self.gs.lookups, ["dev@groups.example.com"])

    def test_too_many_hops(self) -> None:
        """More Received fields than max_hops: 554 5.4.6, for routes and groups alike."""
        looping = b"Received: from a\n" * 31 + MSG
        self.assertEqual(
            self.deliver_to("old-dev@groups.example.com", looping), status.TOO_MANY_HOPS
        )
        self.assertEqual(self.deliver_to("dev@groups.example.com", looping), status.TOO_MANY_HOPS)
        self.assertEqual(self.gs.posts, [])
        within = b"Received: from a\n" * 30 + MSG
        self.assertEqual(self.deliver_to("dev@groups.example.com", within), status.POSTED)


class ForwardTests(RoutingTestsMixin, SynchronousTestCase):
    """forward: queued with an SRS sender; bounces to SRS addresses go back."""

    ROUTES = """
[support@groups.example.com]
forward = helper@example.net, ${local}-team@example.org
bcc = records@example.com

[loop@groups.example.com]
forward = ${local}@groups.example.com, out@example.net
"""

    def test_forwarded_with_srs_sender(self) -> None:
        """The message is queued for the addresses with an SRS0 sender at srs_domain, then the BCC."""
        self.assertEqual(self.deliver_to("support@groups.example.com"), status.ROUTE_FORWARDED)
        forward, bcc = self.queue.entries
        self.assertEqual(forward.recipients, ["helper@example.net", "support-team@example.org"])
        self.assertRegex(
            forward.sender, r"^SRS0=[^=]{4}=[A-Z2-7]{2}=example\.org=alice@groups\.example\.com$"
        )
        self.assertTrue(forward.data.endswith(MSG))
        self.assertIn(b"Received: from mx.example.org", forward.data)
        self.assertEqual(bcc.recipients, ["records@example.com"])

    def test_retry_not_queued_twice(self) -> None:
        """A retried message is not queued again (the ledger remembers the forward)."""
        self.deliver_to("support@groups.example.com")
        self.assertEqual(self.deliver_to("support@groups.example.com"), status.ALREADY_DELIVERED)
        self.assertEqual(len(self.queue.entries), 2)

    def test_null_sender_kept(self) -> None:
        """A bounce being forwarded keeps the null sender."""
        self.deliver_to("support@groups.example.com", sender="")
        self.assertEqual(self.queue.entries[0].sender, "")

    def test_queue_fails(self) -> None:
        """A queue that cannot take it: 451 4.3.0, the sender retries."""
        self.queue.error = OSError(28, "No space left on device")
        reply = self.deliver_to("support@groups.example.com")
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))

    def test_self_loop_skipped(self) -> None:
        """A forward target that routes back to the same route is left out."""
        self.deliver_to("loop@groups.example.com")
        [entry] = self.queue.entries
        self.assertEqual(entry.recipients, ["out@example.net"])

    def test_srs_bounce_goes_back(self) -> None:
        """A bounce to the SRS address is accepted and queued for the original sender."""
        self.deliver_to("support@groups.example.com")
        srs = self.queue.entries[0].sender
        reply, route = self.rcpt(srs)
        self.assertEqual(reply, status.RECIPIENT_OK)
        self.assertEqual(
            self.deliver_to(srs, b"Subject: failure\n\nbounce\n", sender=""), status.ROUTE_FORWARDED
        )
        bounce = self.queue.entries[-1]
        self.assertEqual((bounce.sender, bounce.recipients), ("", ["alice@example.org"]))
        self.assertEqual(self.gs.lookups, [])

    def test_srs_forged_or_old(self) -> None:
        """A forged hash, or an address older than 21 days: 550, not forwarded."""
        self.deliver_to("support@groups.example.com")
        srs = self.queue.entries[0].sender
        forged = "SRS0=AAAA" + srs[len("SRS0=XXXX") :]
        self.assertEqual(self.rcpt(forged)[0].code, 550)
        self.clock.advance(30 * 86400)
        self.assertEqual(self.rcpt(srs)[0].code, 550)

    def test_srs_srs1(self) -> None:
        """A sender that is already an SRS0 address of another forwarder gets an SRS1 address."""
        self.deliver_to(
            "support@groups.example.com", sender="SRS0=abcd=TT=example.org=bob@fwd.example"
        )
        self.assertTrue(self.queue.entries[0].sender.startswith("SRS1="))
        reply, route = self.rcpt(self.queue.entries[0].sender)
        assert route is not None and route.table is not None
        self.assertEqual(route.table.entry.forward, ("SRS0=abcd=TT=example.org=bob@fwd.example",))

    def test_no_queue(self) -> None:
        """Without the outbound queue, forward is a configuration fault: 451 4.3.5."""
        self.core.actions.queue = None
        self.assertEqual(self.deliver_to("support@groups.example.com").enhanced, "4.3.5")


class ArchiveTests(RoutingTestsMixin, SynchronousTestCase):
    """archive: a Maildir named by a template, with sequence numbers."""

    def test_archive_with_seqno_and_date(self) -> None:
        """Each message is added to the Maildir its template names; numbers survive a new core."""
        base = os.path.join(self.dir, "arc")
        self.use_routes(
            f"[~(.+)-archive@groups\\.example\\.com]\n"
            f"archive = {base}/${{1}}/${{date:%Y-%m}}/${{seqno/10}}\n"
            f"sequence_header = X-Sequence\n"
        )
        for n in range(12):
            msg = MSG.replace(b"body", f"body {n}".encode())
            self.assertEqual(
                self.deliver_to("dev-archive@groups.example.com", msg), status.ROUTE_ARCHIVED
            )
        month = os.path.join(base, "dev", "2023-11")
        self.assertEqual(sorted(os.listdir(month)), ["0", "1"])
        box = mailbox.Maildir(os.path.join(month, "0"), create=False)
        numbers = sorted(int(m["X-Sequence"]) for m in box)
        self.assertEqual(numbers, list(range(1, 10)))
        # A retry of a message keeps its number; a new core (restart) goes on.
        self.use_routes(
            f"[~(.+)-archive@groups\\.example\\.com]\narchive = {base}/x\nsequence_header = X-Sequence\n"
        )
        self.deliver_to("dev-archive@groups.example.com", MSG.replace(b"body", b"new"))
        [m] = list(mailbox.Maildir(os.path.join(base, "x"), create=False))
        self.assertEqual(m["X-Sequence"], "13")

    def test_path_values_cannot_climb(self) -> None:
        """A substituted value never adds a directory level."""
        base = os.path.join(self.dir, "arc")
        self.use_routes(f"[~(.+)-a@groups\\.example\\.com]\narchive = {base}/${{header.Subject}}\n")
        self.deliver_to("x-a@groups.example.com", b"Subject: ../../etc\n\nbody\n")
        self.assertEqual(os.listdir(base), ["_._.._etc"])

    def test_sequence_store(self) -> None:
        """Numbers start at 1, a digest seen gets its number again."""
        store = SequenceStore(os.path.join(self.dir, "seq"))
        self.assertEqual([store.number("r", d) for d in "abca"], [1, 2, 3, 1])


class PolicyTests(RoutingTestsMixin, SynchronousTestCase):
    """Policy at the end of DATA: refusals with a copy in rejected/ and to Errors-To."""

    ROUTES = """
[announce@groups.example.com]
group = announce
accept_from = boss@example.com
errors_to = ops@example.net
"""

    def test_refused_and_kept(self) -> None:
        """A message breaking a rule is refused naming the rule; a copy and a note are kept."""
        reply = self.deliver_to("announce@groups.example.com")
        self.assertEqual((reply.code, reply.enhanced), (550, "5.7.1"))
        self.assertIn("accept_from", reply.text)
        self.assertEqual(self.gs.posts, [])
        eml, note = self.files(self.rejected)
        self.assertTrue(eml.endswith(".eml") and note.endswith(".json"))
        with open(os.path.join(self.rejected, note)) as f:
            sidecar = json.load(f)
        self.assertEqual(
            (sidecar["sender"], sidecar["recipient"], sidecar["rule"]),
            ("alice@example.org", "announce@groups.example.com", "accept_from"),
        )
        with open(os.path.join(self.rejected, eml), "rb") as f:
            self.assertTrue(f.read().endswith(MSG))
        [copy] = self.queue.entries
        self.assertEqual((copy.sender, copy.recipients), ("", ["ops@example.net"]))
        self.assertIn(b"X-Gsmail-Reply: 550 5.7.1", copy.data)

    def test_accepted(self) -> None:
        """A message that passes is posted."""
        msg = MSG.replace(b"alice@example.org", b"boss@example.com")
        self.assertEqual(self.deliver_to("announce@groups.example.com", msg), status.POSTED)
        self.assertEqual(self.files(self.rejected), [])

    def test_words_in_a_base64_part(self) -> None:
        """The word rules read decoded text parts."""
        self.use_routes("[w@groups.example.com]\ngroup = w\nforbidden_words = lottery\n")
        msg = (
            b"Subject: hi\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
            b"Content-Transfer-Encoding: base64\n\nWW91IHdvbiB0aGUgbG90dGVyeQ==\n"
        )
        self.assertIn("forbidden_words", self.deliver_to("w@groups.example.com", msg).text)

    def test_defaults_apply(self) -> None:
        """[defaults] rules apply to every route of the file, not to the built-in ones."""
        self.use_routes("[defaults]\nmax_size = 10\n\n[a@groups.example.com]\ngroup = a\n")
        self.assertEqual(self.deliver_to("a@groups.example.com").code, 552)
        self.assertEqual(self.deliver_to("postmaster@groups.example.com"), status.POSTMASTER_STORED)


class RewriteTests(RoutingTestsMixin, SynchronousTestCase):
    """Rewriting before the actions."""

    ROUTES = """
[dev-list@groups.example.com]
group = dev
subject_prefix = "[${group}] "
add_header = X-Route: ${route} for ${sender}
set_header = Reply-To: dev@groups.example.com
remove_header = X-Secret
sequence_header = X-Sequence
"""

    def test_rewritten(self) -> None:
        """Prefix, substitutions, replaced and removed fields, the sequence field; body as is."""
        msg = MSG.replace(b"\n\n", b"\nReply-To: x@example.org\nX-Secret: 1\n\n")
        self.assertEqual(self.deliver_to("dev-list@groups.example.com", msg), status.POSTED)
        [(_, data, _)] = self.gs.posts
        self.assertIn(b"Subject: [dev] hello\n", data)
        self.assertIn(b"X-Route: dev-list@groups.example.com for alice@example.org\n", data)
        self.assertIn(b"Reply-To: dev@groups.example.com\n", data)
        self.assertNotIn(b"x@example.org", data)
        self.assertNotIn(b"X-Secret", data)
        self.assertIn(b"X-Sequence: 1\n", data)
        self.assertTrue(data.endswith(b"\n\nbody\n"))

    def test_prefix_not_doubled(self) -> None:
        """A reply whose subject has the prefix already keeps one."""
        self.deliver_to("dev-list@groups.example.com", MSG.replace(b"hello", b"Re: [dev] hello"))
        [(_, data, _)] = self.gs.posts
        self.assertIn(b"Subject: Re: [dev] hello\n", data)


class HandlerTests(RoutingTestsMixin, SynchronousTestCase):
    """handler: a Python callable gets the envelope and the message."""

    def setUp(self) -> None:
        super().setUp()
        HANDLED.clear()

    def test_called(self) -> None:
        """The callable gets the envelope and the file; None means delivered."""
        self.use_routes(
            "[h@groups.example.com]\nhandler = tests.inbound.test_routing:record_handler\n"
        )
        self.assertEqual(self.deliver_to("h@groups.example.com"), status.ROUTE_DELIVERED)
        [m] = HANDLED
        self.assertEqual(
            (m.sender, m.recipient, m.route),
            ("alice@example.org", "h@groups.example.com", "h@groups.example.com"),
        )
        self.assertTrue(m.variables["data"].endswith(MSG.decode()))
        self.assertFalse(os.path.exists(m.path))

    def test_its_reply(self) -> None:
        """The reply the callable returns is the sender's."""
        self.use_routes(
            "[h@groups.example.com]\nhandler = tests.inbound.test_routing:refusing_handler\n"
        )
        self.assertEqual(
            self.deliver_to("h@groups.example.com"), Reply(550, "5.1.1", "Unknown list")
        )

    def test_raised(self) -> None:
        """A callable that fails: 451 (emailtunnel's), the message and traceback in errors/."""
        self.use_routes(
            "[h@groups.example.com]\nhandler = tests.inbound.test_routing:raising_handler\n"
        )
        self.assertEqual(self.deliver_to("h@groups.example.com"), status.HANDLER_FAILED)
        self.flushLoggedErrors(RuntimeError)
        eml, note = self.files(self.errors)
        with open(os.path.join(self.errors, note)) as f:
            sidecar = json.load(f)
        self.assertIn("handler bug", sidecar["traceback"])
        self.assertEqual(
            sidecar["reply"], "451 4.3.0 Requested action aborted: error in processing"
        )

    def test_not_importable(self) -> None:
        """A handler that cannot be loaded: 451 4.3.5, kept in errors/."""
        self.use_routes("[h@groups.example.com]\nhandler = no_such_module:f\n")
        self.assertEqual(self.deliver_to("h@groups.example.com").enhanced, "4.3.5")
        self.assertEqual(len(self.files(self.errors)), 2)


class NntpTests(RoutingTestsMixin, SynchronousTestCase):
    """nntp: the message posted as an article."""

    ROUTES = """
[news@groups.example.com]
nntp = news://news.example.com:1119/local.test
nntp_user = gw
nntp_password = secret
"""

    def test_posted(self) -> None:
        """The article has Newsgroups and Path, no mail trace fields, the message's body."""
        self.assertEqual(self.deliver_to("news@groups.example.com"), status.NNTP_POSTED)
        [(target, article)] = self.news.articles
        self.assertEqual(
            (target.host, target.port, target.newsgroup, target.user, target.password),
            ("news.example.com", 1119, "local.test", "gw", "secret"),
        )
        self.assertTrue(
            article.startswith(
                b"Path: mx.groups.example.com!not-for-mail\nNewsgroups: local.test\n"
            )
        )
        self.assertNotIn(b"Received:", article)
        self.assertNotIn(b"Return-Path:", article)
        self.assertIn(b"Subject: hello\n", article)
        self.assertTrue(article.endswith(b"\n\nbody\n"))
        self.assertNotIn("secret", repr(target))

    def test_failure_is_transient(self) -> None:
        """A news server that fails: 451, the sender retries; the retry posts."""
        from gsmail.inbound.routing.work import _ActionFailed

        self.news.error = _ActionFailed(status.NNTP_FAILED)
        self.assertEqual(self.deliver_to("news@groups.example.com"), status.NNTP_FAILED)
        self.news.error = None
        self.assertEqual(self.deliver_to("news@groups.example.com"), status.NNTP_POSTED)

    def test_article_subject_added(self) -> None:
        """A message without a subject gets one: news requires it."""
        path = os.path.join(self.dir, "m")
        with open(path, "wb") as f:
            f.write(b"From: a@example.org\nReceived: x\n\tfolded\n\nbody\n")
        import io

        out = io.BytesIO()
        make_article(path, "g", "h", out)
        self.assertEqual(
            out.getvalue(),
            b"Path: h!not-for-mail\nNewsgroups: g\nSubject: (no subject)\nFrom: a@example.org\n\nbody\n",
        )


class SeveralActionsTests(RoutingTestsMixin, SynchronousTestCase):
    """A route with several actions."""

    def test_group_and_archive(self) -> None:
        """group + archive: both done, 250 Delivered; a retry after a failure redoes only the failed one."""
        base = os.path.join(self.dir, "arc")
        self.use_routes(f"[dev-copy@groups.example.com]\ngroup = dev\narchive = {base}\n")
        self.gs.post_error = GroupServerError(status.GROUPSERVER_UNREACHABLE)
        self.assertEqual(
            self.deliver_to("dev-copy@groups.example.com"), status.GROUPSERVER_UNREACHABLE
        )
        self.assertEqual(len(mailbox.Maildir(base, create=False)), 1)
        self.gs.post_error = None
        self.assertEqual(self.deliver_to("dev-copy@groups.example.com"), status.ROUTE_DELIVERED)
        self.assertEqual(len(mailbox.Maildir(base, create=False)), 1)
        self.assertEqual(len(self.gs.posts), 2)  # the failed attempt, then the post

    def test_groupserver_refusal_kept_in_errors(self) -> None:
        """GroupServer refusing the request (its configuration): 451 4.3.5 and a copy in errors/."""
        self.use_routes("[x@groups.example.com]\ngroup = nosuch\n")
        self.gs.post_error = GroupServerError(status.GROUPSERVER_REFUSED, "No such group")
        self.assertEqual(self.deliver_to("x@groups.example.com"), status.GROUPSERVER_REFUSED)
        self.assertEqual(len(self.files(self.errors)), 2)
