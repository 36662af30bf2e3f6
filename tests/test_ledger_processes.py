# -*- test-case-name: tests.test_ledger_processes -*-
"""
Tests for L{gsmail.ledger} shared by several processes (the daemon and the
per-message C{smtp2gs} commands): a message that comes in once by each is
posted once.

Most tests use several L{PostLedger} objects on one file in this process:
each opens its own descriptors, and C{flock} locks belong to open file
descriptions, so the objects exclude each other as processes would. The
last test runs real processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import textwrap

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

import gsmail
from gsmail import status
from gsmail.ledger import (
    LedgerBusyError,
    LedgerClosedError,
    LedgerUnwritableError,
    Outcome,
    PostLedger,
)
from gsmail.ledger.claims import _KeyLock
from gsmail.status import OUTCOME_UNKNOWN, GroupServerError
from tests.fakes import ManualSync, Post

K = PostLedger.key("post", "dev", "<1@example.org>")
L = PostLedger.key("post", "dev", "<2@example.org>")
M = PostLedger.key("post", "dev", "<3@example.org>")
N = PostLedger.key("post", "dev", "<4@example.org>")

#: The poll interval of a call waiting for another process, in seconds.
POLL = 0.05


def record(key: bytes, time: bytes = b"1700000000.000000", letter: bytes = b"D") -> bytes:
    return b"%s %s %s\n" % (time, letter, key.hex().encode())


class SharedFileTestCase(SynchronousTestCase):
    """
    Ledger objects ("processes") on one file in a directory that does not
    exist yet, sharing a clock. C{preload} is how the second process, the one
    that sees the first one's work, reads the file.
    """

    preload = True

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.path = os.path.join(self.mktemp(), "state", "ledger")

    def ledger(
        self,
        *,
        preload: bool = True,
        sync: ManualSync | None = None,
        ttl: float = 7 * 86400,
        wait_timeout: float = 600.0,
    ) -> PostLedger:
        ledger = PostLedger(
            self.path,
            ttl=ttl,
            clock=self.clock,
            sync=sync,
            preload=preload,
            wait_timeout=wait_timeout,
        )
        ledger.open()
        self.addCleanup(self.shut, ledger, sync)
        return ledger

    def pair(self) -> tuple[PostLedger, PostLedger]:
        """The daemon (preloaded), and a second process that reads as C{preload} says."""
        return self.ledger(), self.ledger(preload=self.preload)

    def shut(self, ledger: PostLedger, sync: ManualSync | None) -> None:
        d = ledger.close()
        if sync is not None:
            sync.finish_all()
        self.successResultOf(d)

    def lines(self) -> list[bytes]:
        with open(self.path, "rb") as f:
            return f.read().splitlines(keepends=True)

    def claimed(self, key: bytes) -> bool:
        """Whether some ledger holds C{key}'s claim (asked as another process would)."""
        fd = os.open(self.path + ".claims", os.O_RDWR | os.O_CREAT)
        try:
            return _KeyLock.acquire(fd, key) is None
        finally:
            os.close(fd)

    def lock_key(self, key: bytes) -> int:
        """Claim C{key} as a process posting it would; return the descriptor."""
        fd = os.open(self.path + ".claims", os.O_RDWR | os.O_CREAT)
        self.assertIsNotNone(_KeyLock.acquire(fd, key))
        return fd


class SharingTests(SharedFileTestCase):
    """
    What one process posted, another does not post again. The second process
    parses the whole file, as the daemon does.
    """

    def test_later_copy(self) -> None:
        """
        A message posted by one process and arriving later at another is
        answered as a duplicate there, without posting.
        """
        daemon, pipe = self.pair()
        self.assertEqual(self.successResultOf(daemon.run(K, Post(instant=True))), Outcome.DONE)
        post = Post(instant=True)
        self.assertEqual(self.successResultOf(pipe.run(K, post)), Outcome.DUPLICATE)
        self.assertEqual(pipe.state(K), Outcome.DUPLICATE)
        self.assertEqual(post.calls, 0)
        self.assertEqual(self.successResultOf(pipe.run(L, post)), Outcome.DONE)
        self.assertEqual(daemon.state(L), Outcome.DUPLICATE)
        self.assertFalse(self.claimed(K))

    def test_appended_after_own_write(self) -> None:
        """
        A call looks at the file once, after taking the key's claim: a record
        another process appended after this process's own last write is
        seen there, and the copy is answered as a duplicate without posting.
        """
        daemon, pipe = self.pair()
        self.successResultOf(pipe.run(L, Post(instant=True)))
        self.successResultOf(daemon.run(K, Post(instant=True)))
        post = Post(instant=True)
        self.assertEqual(self.successResultOf(pipe.run(K, post)), Outcome.DUPLICATE)
        self.assertEqual(post.calls, 0)
        self.assertFalse(self.claimed(K))

    def test_appended_by_another_writer(self) -> None:
        """
        A record appended by a process that is not holding a ledger open
        (a line added to the file as an append would) is seen by the next
        call in a process that has read the whole file.
        """
        pipe = self.ledger(preload=self.preload)
        self.successResultOf(pipe.run(L, Post(instant=True)))
        self.assertIsNone(pipe.state(K))
        with open(self.path, "ab") as f:
            f.write(record(K, time=b"%.6f" % self.clock.seconds()))
        post = Post(instant=True)
        self.assertEqual(self.successResultOf(pipe.run(K, post)), Outcome.DUPLICATE)
        self.assertEqual(post.calls, 0)

    def test_opened_later(self) -> None:
        """
        A process started after the posts were made knows them from the file.
        """
        daemon = self.ledger()
        self.successResultOf(daemon.run(K, Post(instant=True)))
        self.successResultOf(daemon.run(L, Post(instant=True)))
        pipe = self.ledger(preload=self.preload)
        self.assertEqual(
            (pipe.state(K), pipe.state(L), pipe.state(M)), (*[Outcome.DUPLICATE] * 2, None)
        )
        self.assertEqual(len(pipe), 2)

    def test_race(self) -> None:
        """
        A copy arriving at a second process while the first is posting waits
        for it, then is answered as a duplicate: the message is posted once.
        """
        daemon, pipe = self.pair()
        slow = Post()
        first = daemon.run(K, slow)
        post = Post(instant=True)
        second = pipe.run(K, post)
        self.clock.advance(POLL)
        self.clock.advance(POLL)
        self.assertNoResult(second)
        self.assertEqual(post.calls, 0)
        slow.deferreds[0].callback(None)
        self.assertEqual(self.successResultOf(first), Outcome.DONE)
        self.clock.advance(POLL)
        self.assertEqual(self.successResultOf(second), Outcome.DUPLICATE)
        self.assertEqual((slow.calls, post.calls), (1, 0))
        self.assertEqual(len(self.lines()), 1)

    def test_race_first_fails(self) -> None:
        """
        When the post of the first process fails, the copy waiting in the
        second process is posted by it.
        """
        daemon, pipe = self.pair()
        slow = Post()
        first = daemon.run(K, slow)
        post = Post(instant=True)
        second = pipe.run(K, post)
        slow.deferreds[0].errback(GroupServerError(status.GROUPSERVER_UNREACHABLE))
        self.failureResultOf(first, GroupServerError)
        self.clock.advance(POLL)
        self.assertEqual(self.successResultOf(second), Outcome.DONE)
        self.assertEqual(post.calls, 1)
        self.assertEqual(daemon.state(K), Outcome.DUPLICATE)

    def test_unknown(self) -> None:
        """
        When the first process's post had an unknown outcome, the copy
        waiting in the second process is posted (GroupServer archives a post
        id once), and later copies are duplicates.
        """
        daemon, pipe = self.pair()
        slow = Post()
        first = daemon.run(K, slow)
        post = Post(instant=True)
        waiting = pipe.run(K, post)
        slow.deferreds[0].errback(GroupServerError(OUTCOME_UNKNOWN, outcome_unknown=True))
        self.failureResultOf(first, GroupServerError)
        self.clock.advance(POLL)
        self.assertEqual(self.successResultOf(waiting), Outcome.DONE)
        self.assertEqual(self.successResultOf(pipe.run(K, post)), Outcome.DUPLICATE)
        self.assertEqual(post.calls, 1)

    def test_compacted_by_another(self) -> None:
        """
        When another process compacts the file, this one reads the new file:
        it still knows the live posts and those made since, and its own later
        records go to the new file, not to the replaced one.
        """
        old = [PostLedger.key("old", str(i)) for i in range(1100)]
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "wb") as f:
            f.write(b"".join(record(key, b"1699900000.000000") for key in old) + record(K))
        # With the default ttl of 7 days the old records are live here: the
        # pipe process does not compact, and appends to the old file.
        pipe = self.ledger(preload=self.preload)
        self.successResultOf(pipe.run(L, Post(instant=True)))
        self.assertEqual(len(self.lines()), 1102)

        daemon = self.ledger(ttl=3600)  # the old records expired: it compacts as it opens
        self.assertEqual(self.lines(), [record(K), record(L)])
        self.successResultOf(daemon.run(M, Post(instant=True)))

        post = Post(instant=True)
        self.assertEqual(self.successResultOf(pipe.run(M, post)), Outcome.DUPLICATE)
        self.assertEqual(self.successResultOf(pipe.run(N, post)), Outcome.DONE)
        self.assertEqual([pipe.state(k) for k in (K, L, M, N)], [Outcome.DUPLICATE] * 4)
        self.assertEqual(daemon.state(N), Outcome.DUPLICATE)
        self.assertEqual(
            [line.split()[2] for line in self.lines()], [k.hex().encode() for k in (K, L, M, N)]
        )

    def test_torn_tail(self) -> None:
        """
        A record cut short by a process that crashed while writing it does not
        spoil the records written after it, nor stop the other processes.
        """
        daemon, pipe = self.pair()
        self.successResultOf(daemon.run(K, Post(instant=True)))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        os.write(fd, record(M)[:40])
        os.close(fd)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        post = Post(instant=True)
        self.assertEqual(self.successResultOf(pipe.run(K, post)), Outcome.DUPLICATE)
        self.assertEqual(self.successResultOf(pipe.run(L, post)), Outcome.DONE)
        self.assertEqual(self.lines(), [record(K), record(M)[:40] + b"\n", record(L)])
        self.assertEqual(daemon.state(L), Outcome.DUPLICATE)
        self.assertIsNone(daemon.state(M))
        self.assertEqual([e["garbage"] for e in events if e.get("garbage")], [1])
        self.assertEqual(self.successResultOf(daemon.run(M, post)), Outcome.DONE)
        self.assertEqual(post.calls, 2)


class SearchedSharingTests(SharingTests):
    """
    The second process searches the file's bytes (as a per-message command does).
    """

    preload = False


class WaitingTests(SharedFileTestCase):
    """
    How long and on what a process waits for another one.
    """

    def test_timeout(self) -> None:
        """
        A copy waits for another process's post for C{wait_timeout} seconds
        at most, then is answered 451 4.4.5: the sender retries later.
        """
        daemon = self.ledger()
        pipe = self.ledger(preload=False, wait_timeout=2)
        slow = Post()
        daemon.run(K, slow)
        post = Post(instant=True)
        second = pipe.run(K, post)
        self.clock.advance(1.9)
        self.assertNoResult(second)
        self.clock.pump([POLL] * 3)
        reply = status.reply_for_exception(self.failureResultOf(second, LedgerBusyError).value)
        self.assertEqual((reply.code, reply.enhanced), (451, "4.4.5"))
        self.assertEqual(post.calls, 0)
        slow.deferreds[0].callback(None)
        self.assertEqual(self.successResultOf(pipe.run(K, post)), Outcome.DUPLICATE)

    def test_close_while_waiting(self) -> None:
        """
        Closing a process does not wait for the post of another one: the copy
        waiting for it gets a transient error at once.
        """
        daemon = self.ledger()
        pipe = PostLedger(self.path, clock=self.clock, preload=False)
        pipe.open()
        slow = Post()
        daemon.run(K, slow)
        second = pipe.run(K, Post(instant=True))
        self.successResultOf(pipe.close())
        self.failureResultOf(second, LedgerClosedError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        slow.deferreds[0].callback(None)

    def test_crashed_while_posting(self) -> None:
        """
        When the process holding a key dies (its lock goes with it) without a
        record, the waiting copy is posted.
        """
        ledger = self.ledger()
        fd = self.lock_key(K)
        post = Post(instant=True)
        d = ledger.run(K, post)
        self.clock.advance(POLL)
        self.assertNoResult(d)
        os.close(fd)  # the process is killed: the file stays, unlocked
        self.clock.advance(POLL)
        self.assertEqual(self.successResultOf(d), Outcome.DONE)
        self.assertEqual(post.calls, 1)

    def test_claim_held_until_durable(self) -> None:
        """
        Another process cannot claim a key while its post runs and its record
        is not on disk yet, and can once it is; the claims of other keys are
        free all along.
        """
        sync = ManualSync()
        ledger = self.ledger(sync=sync)
        post = Post()
        d = ledger.run(K, post)
        self.assertTrue(self.claimed(K))
        self.assertFalse(self.claimed(L))
        post.deferreds[0].callback(None)
        self.assertTrue(self.claimed(K))  # posted, record not fsynced yet
        sync.finish()
        self.assertEqual(self.successResultOf(d), Outcome.DONE)
        self.assertFalse(self.claimed(K))

    def test_record_not_durable(self) -> None:
        """
        While a post's record cannot be written, other processes do not post
        it: they wait until the record is on disk, then see a duplicate.
        """
        sync = ManualSync()
        daemon = self.ledger(sync=sync)
        pipe = self.ledger(preload=False)
        first = daemon.run(K, Post(instant=True))
        sync.break_down()
        self.failureResultOf(first, LedgerUnwritableError)
        post = Post(instant=True)
        second = pipe.run(K, post)
        self.clock.advance(POLL)
        self.assertNoResult(second)
        daemon.run(L, Post(instant=True))  # its write rewrites the file, with K
        sync.finish()
        self.clock.advance(POLL)
        self.assertEqual(self.successResultOf(second), Outcome.DUPLICATE)
        self.assertEqual(post.calls, 0)

    def test_compaction_keeps_records_of_others(self) -> None:
        """
        A compaction keeps the records another process appended after this
        one last read the file.
        """
        old = [PostLedger.key("old", str(i)) for i in range(1100)]
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "wb") as f:
            f.write(b"".join(record(key, b"1699900000.000000") for key in old))
        lock = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(lock, fcntl.LOCK_EX)
        sync = ManualSync()
        daemon = self.ledger(sync=sync, ttl=3600)
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
        pipe = self.ledger(preload=False)  # 7 days: the old records are live here
        daemon.run(K, Post(instant=True))
        sync.finish()  # K appended; now the file is worth compacting
        self.assertEqual(sync.waiting, 1)
        self.assertEqual(self.successResultOf(pipe.run(L, Post(instant=True))), Outcome.DONE)
        sync.finish()
        self.assertEqual(self.lines(), [record(K), record(L)])
        post = Post(instant=True)
        self.assertEqual(self.successResultOf(daemon.run(L, post)), Outcome.DUPLICATE)
        self.assertEqual(post.calls, 0)


CHILD = textwrap.dedent(
    """
    import json, os, random, sys
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, gatherResults
    from twisted.internet.task import deferLater, react
    from twisted.internet.threads import deferToThreadPool
    from gsmail.ledger import PostLedger

    name, directory, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    log = os.path.join(directory, "actions")
    reactor.callLater(20, os._exit, 3)  # never outlive the test

    def post(i):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, b"%d %s\\n" % (i, name.encode()))
        os.close(fd)
        return deferLater(reactor, random.uniform(0, 0.02), lambda: None)

    async def main(reactor):
        ledger = PostLedger(
            os.path.join(directory, "ledger"),
            clock=reactor,
            sync=lambda f: deferToThreadPool(reactor, reactor.getThreadPool(), f),
            preload=name in ("0", "1"),
            wait_timeout=15,
        )
        ledger.open()
        open(os.path.join(directory, "ready-" + name), "w").close()
        while len([f for f in os.listdir(directory) if f.startswith("ready-")]) < count:
            await deferLater(reactor, 0.005, lambda: None)
        runs = [ledger.run(PostLedger.key("k", str(i)), lambda i=i: post(i)) for i in range(50)]
        outcomes = await gatherResults(runs)
        await ledger.close()
        print(json.dumps([o.value for o in outcomes]))

    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
    """
)


class ProcessTests(TestCase):
    """
    Real processes, each with its own reactor and thread pool.
    """

    timeout = 60

    def test_four_processes(self) -> Deferred[None]:
        """
        Four processes started together, each given the same 50 messages at
        once, post each message exactly once between them; the others hear it
        was a duplicate.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(gsmail.__file__)))
        children = [
            getProcessOutputAndValue(
                sys.executable, ["-c", CHILD, str(n), directory, "4"], env=env, path=directory
            )
            for n in range(4)
        ]

        def check(results: list[tuple[bytes, bytes, int]]) -> None:
            for _, err, code in results:
                self.assertEqual(code, 0, err.decode(errors="replace"))
            outcomes = [json.loads(out) for out, _, _ in results]
            with open(os.path.join(directory, "actions"), "rb") as f:
                actions = [int(line.split()[0]) for line in f]
            self.assertEqual(sorted(actions), list(range(50)))
            for i in range(50):
                self.assertEqual(
                    sorted(o[i] for o in outcomes), ["done", "duplicate", "duplicate", "duplicate"]
                )

        return gatherResults(children).addCallback(check)
