# -*- test-case-name: tests.test_ledger -*-
"""
Tests for L{gsmail.ledger}: a message is posted once, however many copies
arrive, whether they race or come after a restart.
"""

from __future__ import annotations

import fcntl
import os

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gsmail.ledger import LedgerClosedError, LedgerUnwritableError, Outcome, PostLedger
from gsmail.status import OUTCOME_UNKNOWN, GroupServerError
from tests.fakes import ManualSync, Post

A = PostLedger.key("group-a", "<1@example.org>")
B = PostLedger.key("group-a", "<2@example.org>")
C = PostLedger.key("group-b", "<1@example.org>")


class LedgerTestCase(SynchronousTestCase):
    """
    A ledger file in a directory that does not exist yet, and a clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.path = os.path.join(self.mktemp(), "state", "ledger")

    def make_ledger(self, *, ttl: float = 7 * 86400, sync: ManualSync | None = None) -> PostLedger:
        ledger = PostLedger(self.path, ttl=ttl, clock=self.clock, sync=sync)
        ledger.open()
        self.addCleanup(self.shut, ledger, sync)
        return ledger

    def shut(self, ledger: PostLedger, sync: ManualSync | None = None) -> None:
        d = ledger.close()
        if sync is not None:
            sync.finish_all()
        self.successResultOf(d)

    def lines(self) -> list[bytes]:
        """The lines of the ledger file; none before the first record."""
        try:
            with open(self.path, "rb") as f:
                return f.read().splitlines(keepends=True)
        except FileNotFoundError:
            return []

    def write_file(self, data: bytes) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "wb") as f:
            f.write(data)


class KeyTests(SynchronousTestCase):
    """
    L{PostLedger.key} names a post.
    """

    def test_framing(self) -> None:
        """
        Parts are framed: moving a character from one part to the next, or
        splitting a part in two, gives another key.
        """
        self.assertNotEqual(PostLedger.key("a", "bc"), PostLedger.key("ab", "c"))
        self.assertNotEqual(PostLedger.key("abc"), PostLedger.key("a", "bc"))
        self.assertNotEqual(PostLedger.key(), PostLedger.key(""))

    def test_text_is_utf8(self) -> None:
        """
        A text part gives the same key as its UTF-8 bytes.
        """
        self.assertEqual(PostLedger.key("g", "<é@x>"), PostLedger.key(b"g", "<é@x>".encode()))

    def test_stable(self) -> None:
        """
        The key of a post does not change between releases: a changed digest
        would make an upgraded gsmail post again what it posted last week.
        """
        self.assertEqual(
            PostLedger.key("dev", "<1@example.org>").hex(),
            "8a21c96b35e245d52c1540a6bfeb39f29a515d72cb547c24bcdfddf21f0af957",
        )
        self.assertEqual(len(PostLedger.key("dev")), 32)


class RunTests(LedgerTestCase):
    """
    L{PostLedger.run} performs a post once.
    """

    def test_first_run(self) -> None:
        """
        The first copy is posted; a later copy is answered as a duplicate
        without posting.
        """
        ledger = self.make_ledger()
        post = Post(instant=True)
        self.assertEqual(self.successResultOf(ledger.run(A, post)), Outcome.DONE)
        self.assertEqual(self.successResultOf(ledger.run(A, post)), Outcome.DUPLICATE)
        self.assertEqual(post.calls, 1)
        self.assertEqual(ledger.state(A), Outcome.DUPLICATE)
        self.assertEqual(len(ledger), 1)

    def test_record_format(self) -> None:
        """
        The file holds one line per post: time, C{D}, the key in hex.
        """
        self.clock.advance(0.5)
        ledger = self.make_ledger()
        self.successResultOf(ledger.run(A, Post(instant=True)))
        self.assertEqual(self.lines(), [b"1700000000.500000 D " + A.hex().encode() + b"\n"])

    def test_concurrent_copies(self) -> None:
        """
        100 copies arriving while the first post is under way make one post,
        and each copy hears it was done once GroupServer answered.
        """
        ledger = self.make_ledger()
        post = Post()
        results = [ledger.run(A, post) for _ in range(100)]
        for d in results:
            self.assertNoResult(d)
        self.assertEqual(post.calls, 1)
        post.deferreds[0].callback(None)
        self.assertEqual([self.successResultOf(d) for d in results], [Outcome.DONE] * 100)
        self.assertEqual(post.calls, 1)

    def test_failure_shared_then_retried(self) -> None:
        """
        When the post fails, every copy waiting on it gets that same error
        (the sender retries); nothing is remembered, so the retry posts.
        """
        ledger = self.make_ledger()
        post = Post()
        results = [ledger.run(A, post) for _ in range(3)]
        error = GroupServerError(OUTCOME_UNKNOWN.with_text("boom"), outcome_unknown=False)
        post.deferreds[0].errback(error)
        for d in results:
            self.assertIs(self.failureResultOf(d, GroupServerError).value, error)
        self.assertIsNone(ledger.state(A))
        retry = ledger.run(A, post)
        self.assertEqual(post.calls, 2)
        post.deferreds[1].callback(None)
        self.assertEqual(self.successResultOf(retry), Outcome.DONE)

    def test_outcome_unknown(self) -> None:
        """
        When the post was sent but no answer came, the attempt fails with its
        error and nothing is recorded: the next copy is posted again
        (GroupServer archives a post id once).
        """
        ledger = self.make_ledger()
        post = Post()
        first = ledger.run(A, post)
        post.deferreds[0].errback(GroupServerError(OUTCOME_UNKNOWN, outcome_unknown=True))
        self.assertEqual(self.failureResultOf(first, GroupServerError).value.reply, OUTCOME_UNKNOWN)
        self.assertEqual(self.lines(), [])
        second = ledger.run(A, post)
        self.assertEqual(post.calls, 2)
        post.deferreds[1].callback(None)
        self.assertEqual(self.successResultOf(second), Outcome.DONE)
        self.assertEqual(self.successResultOf(ledger.run(A, post)), Outcome.DUPLICATE)

    def test_distinct_keys(self) -> None:
        """
        A slow post does not hold up a post of another message.
        """
        ledger = self.make_ledger()
        slow = Post()
        d_a = ledger.run(A, slow)
        self.assertEqual(self.successResultOf(ledger.run(B, Post(instant=True))), Outcome.DONE)
        self.assertNoResult(d_a)
        slow.deferreds[0].callback(None)
        self.assertEqual(self.successResultOf(d_a), Outcome.DONE)

    def test_cancel_one_waiter(self) -> None:
        """
        A copy that gives up (its SMTP session closed) does not cancel the
        post the others wait for.
        """
        ledger = self.make_ledger()
        post = Post()
        first, second, third = (ledger.run(A, post) for _ in range(3))
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.assertEqual(post.cancelled, 0)
        self.assertNoResult(first)
        post.deferreds[0].callback(None)
        self.assertEqual(self.successResultOf(first), Outcome.DONE)
        self.assertEqual(self.successResultOf(third), Outcome.DONE)

    def test_ttl(self) -> None:
        """
        A post is remembered for C{ttl} seconds, then a copy is posted again.
        """
        ledger = self.make_ledger(ttl=100)
        post = Post(instant=True)
        self.successResultOf(ledger.run(A, post))
        self.clock.advance(99.9)
        self.assertEqual(self.successResultOf(ledger.run(A, post)), Outcome.DUPLICATE)
        self.clock.advance(0.1)
        self.assertIsNone(ledger.state(A))
        self.assertEqual(len(ledger), 0)
        self.assertEqual(self.successResultOf(ledger.run(A, post)), Outcome.DONE)
        self.assertEqual(post.calls, 2)

    def test_not_open(self) -> None:
        """
        A ledger that is not open refuses to post (the caller answers 451),
        and a key that is not from L{PostLedger.key} is a programming error.
        """
        ledger = PostLedger(self.path, clock=self.clock)
        self.failureResultOf(ledger.run(A, Post(instant=True)), LedgerClosedError)
        self.assertRaises(ValueError, ledger.run, b"short", Post(instant=True))
        self.successResultOf(ledger.close())


class DurabilityTests(LedgerTestCase):
    """
    What the ledger says has been posted is on disk first.
    """

    def test_restart(self) -> None:
        """
        After a restart, done posts are still not posted again; a post whose
        outcome was unknown is.
        """
        ledger = self.make_ledger()
        self.successResultOf(ledger.run(A, Post(instant=True)))
        unknown = Post()
        d = ledger.run(B, unknown)
        unknown.deferreds[0].errback(GroupServerError(OUTCOME_UNKNOWN, outcome_unknown=True))
        self.failureResultOf(d, GroupServerError)
        self.successResultOf(ledger.close())

        again = self.make_ledger()
        post = Post(instant=True)
        self.assertEqual(self.successResultOf(again.run(A, post)), Outcome.DUPLICATE)
        self.assertEqual(post.calls, 0)
        self.assertEqual(self.successResultOf(again.run(B, post)), Outcome.DONE)
        self.assertEqual(self.successResultOf(again.run(C, post)), Outcome.DONE)
        self.assertEqual(post.calls, 2)

    def test_expired_forgotten_at_open(self) -> None:
        """
        A restart after C{ttl} forgets the post, so a copy is posted again.
        A small file is left as it is: opening does not rewrite it (a
        per-message command opens the ledger for every message).
        """
        ledger = self.make_ledger(ttl=100)
        self.successResultOf(ledger.run(A, Post(instant=True)))
        self.successResultOf(ledger.close())
        self.clock.advance(100)
        again = self.make_ledger(ttl=100)
        self.assertEqual(len(again), 0)
        self.assertEqual(len(self.lines()), 1)
        post = Post(instant=True)
        self.assertEqual(self.successResultOf(again.run(A, post)), Outcome.DONE)
        self.assertEqual(post.calls, 1)

    def write_expired(self, count: int, live: list[bytes]) -> None:
        """
        A ledger file of C{count} records a day old, then one live record per key.
        """
        old = b"".join(
            b"1699900000.000000 D %s\n" % PostLedger.key("old", str(i)).hex().encode()
            for i in range(count)
        )
        self.write_file(
            old + b"".join(b"1700000000.000000 D %s\n" % key.hex().encode() for key in live)
        )

    def test_compacted_at_open(self) -> None:
        """
        A file of mostly expired records (more than 1000) is compacted when
        the ledger opens: only the live posts are left, and still remembered.
        """
        self.write_expired(1100, [A, B])
        ledger = self.make_ledger(ttl=3600)
        self.assertEqual(
            self.lines(), [b"1700000000.000000 D %s\n" % k.hex().encode() for k in (A, B)]
        )
        self.assertEqual(
            (ledger.state(A), ledger.state(B), len(ledger)), (Outcome.DUPLICATE,) * 2 + (2,)
        )

    def test_open_does_not_wait(self) -> None:
        """
        While another process holds the ledger's lock (appending or
        compacting), opening neither waits nor compacts; the posts in the
        file are remembered all the same.
        """
        self.write_expired(1100, [A])
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        ledger = PostLedger(self.path, ttl=3600, clock=self.clock)
        ledger.open()
        self.assertEqual(len(self.lines()), 1101)
        self.assertEqual(ledger.state(A), Outcome.DUPLICATE)
        fcntl.flock(fd, fcntl.LOCK_UN)
        self.successResultOf(ledger.close())

    def test_done_after_fsync(self) -> None:
        """
        The caller hears the post is done only once its record is fsynced.
        """
        sync = ManualSync()
        ledger = self.make_ledger(sync=sync)
        d = ledger.run(A, Post(instant=True))
        self.assertNoResult(d)
        self.assertIsNone(ledger.state(A))
        self.assertEqual(self.lines(), [])
        sync.finish()
        self.assertEqual(self.successResultOf(d), Outcome.DONE)
        self.assertEqual(len(self.lines()), 1)

    def test_group_commit(self) -> None:
        """
        Records that arrive while an fsync runs share the next one: three
        posts, two fsyncs.
        """
        sync = ManualSync()
        ledger = self.make_ledger(sync=sync)
        d_a = ledger.run(A, Post(instant=True))
        d_b = ledger.run(B, Post(instant=True))
        d_c = ledger.run(C, Post(instant=True))
        self.assertEqual(sync.calls, 1)
        sync.finish()
        self.assertEqual(self.successResultOf(d_a), Outcome.DONE)
        self.assertNoResult(d_b)
        self.assertNoResult(d_c)
        sync.finish()
        self.assertEqual(self.successResultOf(d_b), Outcome.DONE)
        self.assertEqual(self.successResultOf(d_c), Outcome.DONE)
        self.assertEqual(sync.calls, 2)
        self.assertEqual(len(self.lines()), 3)

    def test_fsync_fails(self) -> None:
        """
        When the record cannot be made durable the caller gets
        L{LedgerUnwritableError} (451 4.3.0), but the post is still not made
        twice in this process. Until a write works again no post is made;
        the next call tries the file first, and once it works, posts.
        """
        sync = ManualSync()
        ledger = self.make_ledger(sync=sync)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        post = Post(instant=True)
        d = ledger.run(A, post)
        sync.break_down()
        self.assertEqual(self.failureResultOf(d, LedgerUnwritableError).value.reply.code, 451)
        self.assertEqual(self.successResultOf(ledger.run(A, post)), Outcome.DUPLICATE)
        self.assertEqual(post.calls, 1)

        # Still failing: refused without a post, and logged once in all.
        d_b = ledger.run(B, post)
        sync.break_down()
        self.failureResultOf(d_b, LedgerUnwritableError)
        self.assertEqual(post.calls, 1)
        errors = [e for e in events if e.get("log_level") is LogLevel.error]
        self.assertEqual(len(errors), 1)

        d_b = ledger.run(B, post)
        self.assertEqual(post.calls, 1)  # the file first
        sync.finish_all()
        self.assertEqual(self.successResultOf(d_b), Outcome.DONE)
        self.assertEqual(post.calls, 2)
        self.assertEqual(
            sorted(line.split()[2] for line in self.lines()),
            sorted([A.hex().encode(), B.hex().encode()]),
        )
        self.assertTrue(any("can be written again" in formatEvent(e) for e in events))

    def test_close_waits(self) -> None:
        """
        Closing waits for the post under way and records it; new posts are
        refused meanwhile.
        """
        ledger = self.make_ledger()
        post = Post()
        d = ledger.run(A, post)
        closed = ledger.close()
        self.assertNoResult(closed)
        self.failureResultOf(ledger.run(B, post), LedgerClosedError)
        post.deferreds[0].callback(None)
        self.assertEqual(self.successResultOf(d), Outcome.DONE)
        self.successResultOf(closed)
        self.assertEqual(self.successResultOf(self.make_ledger().run(A, post)), Outcome.DUPLICATE)

    def test_shared_file(self) -> None:
        """
        A second process on the same ledger is not refused: it opens while
        the first runs, and knows the first one's posts.
        """
        first = self.make_ledger()
        self.successResultOf(first.run(A, Post(instant=True)))
        second = self.make_ledger()
        post = Post(instant=True)
        self.assertEqual(self.successResultOf(second.run(A, post)), Outcome.DUPLICATE)
        self.assertEqual(post.calls, 0)


class CommitDelayTests(LedgerTestCase):
    """
    With a C{commit_delay}, a batch waits for the records of the posts under
    way, so that they share one fsync; never longer than the delay, and not
    at all when no other post is under way.
    """

    DELAY = 0.002

    def delayed_ledger(self, sync: ManualSync) -> PostLedger:
        ledger = PostLedger(self.path, clock=self.clock, sync=sync, commit_delay=self.DELAY)
        ledger.open()
        self.addCleanup(self.shut, ledger, sync)
        return ledger

    def test_alone(self) -> None:
        """A post with no other under way is written at once."""
        sync = ManualSync()
        ledger = self.delayed_ledger(sync)
        d = ledger.run(A, Post(instant=True))
        self.assertEqual(sync.waiting, 1)
        sync.finish()
        self.assertEqual(self.successResultOf(d), Outcome.DONE)

    def test_shared_fsync(self) -> None:
        """
        Three posts under way finishing within the delay: one fsync for the
        three records, and no caller hears of its post before it.
        """
        sync = ManualSync()
        ledger = self.delayed_ledger(sync)
        post = Post()
        done = [ledger.run(key, post) for key in (A, B, C)]
        post.deferreds[0].callback(None)
        self.clock.advance(self.DELAY / 2)
        post.deferreds[1].callback(None)
        self.assertEqual(sync.waiting, 0)  # still waiting for C's post
        post.deferreds[2].callback(None)
        self.assertEqual(sync.calls, 1)
        for d in done:
            self.assertNoResult(d)
        sync.finish()
        self.assertEqual([self.successResultOf(d) for d in done], [Outcome.DONE] * 3)
        self.assertEqual(len(self.lines()), 3)
        self.assertEqual(sync.calls, 1)

    def test_never_longer_than_the_delay(self) -> None:
        """
        A post that is slow to finish does not hold the others' records back
        for longer than the delay; its own record goes in a later batch.
        """
        sync = ManualSync()
        ledger = self.delayed_ledger(sync)
        post = Post()
        first, slow = ledger.run(A, post), ledger.run(B, post)
        post.deferreds[0].callback(None)
        self.clock.advance(self.DELAY * 0.9)
        self.assertEqual(sync.waiting, 0)
        self.clock.advance(self.DELAY * 0.2)
        self.assertEqual(sync.waiting, 1)
        sync.finish()
        self.assertEqual(self.successResultOf(first), Outcome.DONE)
        self.assertEqual([line.split()[2] for line in self.lines()], [A.hex().encode()])
        post.deferreds[1].callback(None)  # alone now: written at once
        self.assertEqual(sync.waiting, 1)
        sync.finish()
        self.assertEqual(self.successResultOf(slow), Outcome.DONE)
        self.assertEqual(sync.calls, 2)

    def test_failed_post_does_not_hold(self) -> None:
        """A post under way that fails adds no record: the batch goes at the delay."""
        sync = ManualSync()
        ledger = self.delayed_ledger(sync)
        post = Post()
        first, failing = ledger.run(A, post), ledger.run(B, post)
        post.deferreds[0].callback(None)
        post.deferreds[1].errback(GroupServerError(OUTCOME_UNKNOWN, "no answer"))
        self.failureResultOf(failing, GroupServerError)
        self.clock.advance(self.DELAY)
        sync.finish()
        self.assertEqual(self.successResultOf(first), Outcome.DONE)

    def test_bad_delay(self) -> None:
        """A negative or infinite delay is refused."""
        for bad in (-0.001, float("inf"), float("nan")):
            with self.assertRaises(ValueError):
                PostLedger(self.path, clock=self.clock, commit_delay=bad)


class FileTests(LedgerTestCase):
    """
    The ledger reads damaged files and keeps its file small.
    """

    def record(self, key: bytes, letter: bytes = b"D") -> bytes:
        return b"1700000000.000000 " + letter + b" " + key.hex().encode() + b"\n"

    def test_torn_last_line(self) -> None:
        """
        A record cut short by a crash is ignored; the records before it and
        the ones written after the restart are kept.
        """
        self.write_file(self.record(A) + self.record(B)[:40])
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        ledger = self.make_ledger()
        self.assertEqual(ledger.state(A), Outcome.DUPLICATE)
        self.assertIsNone(ledger.state(B))
        self.assertEqual(len(ledger), 1)
        self.assertTrue(any("incomplete" in e["log_format"] for e in events))
        self.successResultOf(ledger.run(C, Post(instant=True)))
        self.successResultOf(ledger.close())
        again = self.make_ledger()
        self.assertEqual((again.state(A), again.state(C)), (Outcome.DUPLICATE,) * 2)

    def test_last_line_without_newline(self) -> None:
        """
        A complete last record that lacks only its newline is kept.
        """
        self.write_file(self.record(A, b"D").rstrip(b"\n"))
        self.assertEqual(self.make_ledger().state(A), Outcome.DUPLICATE)

    def _warned(self, events: list[dict[str, object]]) -> list[str]:
        return [formatEvent(e) for e in events if e.get("log_level") is LogLevel.warn]

    def test_removed_while_running(self) -> None:
        """
        A ledger file removed by hand while gsmail runs: one warning, and the
        posts remembered in memory are written back to a new file.
        """
        ledger = self.make_ledger()
        self.successResultOf(ledger.run(A, Post(instant=True)))
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        os.unlink(ledger.path)
        self.assertEqual(ledger.state(A), Outcome.DUPLICATE)
        self.assertEqual(ledger.state(A), Outcome.DUPLICATE)
        [warning] = self._warned(events)
        self.assertIn("was removed", warning)
        self.assertEqual([line.split()[2] for line in self.lines()], [A.hex().encode()])

    def test_truncated_while_running(self) -> None:
        """A truncated ledger file: one warning naming the sizes, and it is written back."""
        ledger = self.make_ledger()
        self.successResultOf(ledger.run(A, Post(instant=True)))
        self.successResultOf(ledger.run(B, Post(instant=True)))
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        os.truncate(ledger.path, 0)
        self.assertEqual(ledger.state(B), Outcome.DUPLICATE)
        [warning] = self._warned(events)
        self.assertIn("shrank from", warning)
        self.assertEqual(len(self.lines()), 2)

    def test_replaced_while_running(self) -> None:
        """
        A ledger file replaced by one that lacks recent records (not a
        compaction, which keeps them): a warning counting them, written back.
        """
        ledger = self.make_ledger()
        self.successResultOf(ledger.run(A, Post(instant=True)))
        self.successResultOf(ledger.run(B, Post(instant=True)))
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        with open(ledger.path + ".new", "wb") as f:
            f.write(self.lines()[0])
        os.replace(ledger.path + ".new", ledger.path)
        self.assertEqual(ledger.state(A), Outcome.DUPLICATE)
        [warning] = self._warned(events)
        self.assertIn("without 1 posts", warning)
        self.assertEqual(len(self.lines()), 2)

    def test_missing_at_open(self) -> None:
        """A ledger whose file is gone since the last run: a warning at open."""
        self.make_ledger().close()
        ledger = self.make_ledger()
        self.successResultOf(ledger.run(A, Post(instant=True)))
        self.successResultOf(ledger.close())
        os.unlink(ledger.path)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.make_ledger()
        [warning] = self._warned(events)
        self.assertIn("is missing", warning)

    def test_legacy_unknown_record(self) -> None:
        """
        A C{U} record written by an earlier version (which did not repeat
        such posts) counts as no record: the copy is posted.
        """
        self.write_file(self.record(A, b"U"))
        ledger = self.make_ledger()
        self.assertIsNone(ledger.state(A))
        self.assertEqual(self.successResultOf(ledger.run(A, Post(instant=True))), Outcome.DONE)
        self.assertEqual(ledger.state(A), Outcome.DUPLICATE)

    def test_garbage(self) -> None:
        """
        Garbage lines are skipped, counted and logged once; good records
        around them are kept (and the garbage stays in the file until a
        compaction).
        """
        hexkey = C.hex().encode()
        self.write_file(
            b"hello\n"
            + self.record(A)
            + b"\xff\xfe\x00\n"
            + b"1.0 X "
            + hexkey
            + b"\n"
            + b"nan D "
            + hexkey
            + b"\n"
            + b"-1 D "
            + hexkey
            + b"\n"
            + b"1.0 D abc\n"
            + b"x" * 1_000_000
            + b"\n"
            + self.record(B)
        )
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        ledger = self.make_ledger()
        self.assertEqual(len(ledger), 2)
        self.assertIsNone(ledger.state(C))
        warnings = [e for e in events if e.get("garbage")]
        self.assertEqual([e["garbage"] for e in warnings], [7])
        # Left in the file until a compaction: opening does not rewrite it.
        self.assertEqual(len(self.lines()), 9)

    def fill(self, ledger: PostLedger, sync: ManualSync) -> tuple[list[bytes], list[bytes]]:
        """
        Write 1100 records that then expire and 100 that stay live.
        """
        post = Post(instant=True)
        old = [PostLedger.key("old", str(i)) for i in range(1100)]
        for key in old:
            ledger.run(key, post)
        sync.finish_all()
        self.clock.advance(60)
        live = [PostLedger.key("live", str(i)) for i in range(100)]
        for key in live:
            ledger.run(key, post)
        sync.finish_all()
        self.assertEqual(len(self.lines()), 1200)
        self.clock.advance(60)  # the old ones expire
        return old, live

    def test_compaction(self) -> None:
        """
        Once the file holds mostly expired records it is rewritten with the
        live ones only; records written during the rewrite are kept.
        """
        sync = ManualSync()
        ledger = self.make_ledger(ttl=100, sync=sync)
        post = Post(instant=True)
        old, live = self.fill(ledger, sync)
        ledger.run(A, post)
        sync.finish()  # the append of A, then the compaction starts
        self.assertEqual(sync.waiting, 1)
        late = ledger.run(B, post)
        sync.finish()  # compaction done, B's append queued
        self.assertEqual(len(self.lines()), 101)
        sync.finish()
        self.assertEqual(self.successResultOf(late), Outcome.DONE)

        self.shut(ledger, sync)
        again = self.make_ledger(ttl=100)
        self.assertEqual(len(again), 102)
        self.assertEqual({again.state(k) for k in [*live, A, B]}, {Outcome.DUPLICATE})
        self.assertIsNone(again.state(old[0]))
        self.assertEqual(len(self.lines()), 102)

    def test_compaction_fails(self) -> None:
        """
        A compaction that fails (say, the disk is full) fails no post: records
        are still appended to the intact file, and the rewrite is not retried
        on every post.
        """
        sync = ManualSync()
        ledger = self.make_ledger(ttl=100, sync=sync)
        self.fill(ledger, sync)
        ledger.run(A, Post(instant=True))
        sync.finish()
        self.assertEqual(sync.waiting, 1)  # the compaction
        sync.break_down()
        d = ledger.run(B, Post(instant=True))
        sync.finish()
        self.assertEqual(self.successResultOf(d), Outcome.DONE)
        self.assertEqual(sync.waiting, 0)
        self.assertEqual(len(self.lines()), 1202)
        self.assertEqual(self.lines()[-1].split()[2], B.hex().encode())
