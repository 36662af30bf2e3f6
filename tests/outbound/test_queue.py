# -*- test-case-name: tests.outbound.test_queue -*-
"""
Tests for L{gsmail.outbound.queue}: a message acknowledged to GroupServer is
on disk, whole, and a crash at any moment leaves each message either fully
queued or absent, never half.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThreadPool
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gsmail.handoff import SerialThread
from gsmail.outbound.queue import (
    DELIVERED,
    EXPIRED,
    FAILED,
    PENDING,
    Envelope,
    FileOps,
    NoSuchMessageError,
    OutboundQueue,
    QueueClosedError,
    QueueLockedError,
    RecipientState,
    read_queue,
)
from tests.fakes import ManualSync

MESSAGE = b"From: dev@groups.example.com\nSubject: Hello\n\nBody line\n.leading dot\n"


class Crash(Exception):
    """
    The process died at this file-system call (simulated): the call did not
    happen, and no later call does.
    """


class RecordingOps(FileOps):
    """
    The real file-system calls, recorded as C{(call, path relative to the
    queue)} in order; C{crash_at=N} makes the Nth call and every later one
    raise L{Crash} without touching the disk, as if the process had been
    killed there. C{fail} makes the named call (C{"fsync"}), or the call on
    one path (C{"fsync-dir env"}), raise C{EIO} (a disk error).
    """

    def __init__(self, root: str, *, crash_at: int | None = None, fail: str = "") -> None:
        self.root = root
        self.crash_at = crash_at
        self.fail = fail
        self.dead = False
        self.calls: list[tuple[str, str]] = []
        self._paths: dict[int, str] = {}

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def _step(self, call: str, path: str) -> None:
        if self.dead:
            raise Crash(f"{call} {path} after the crash")
        if self.crash_at is not None and len(self.calls) + 1 >= self.crash_at:
            self.dead = True
            raise Crash(f"killed at {call} {path}")
        if self.fail in (call, f"{call} {path}"):
            raise OSError(errno.EIO, "Input/output error", path)
        self.calls.append((call, path))

    def create(self, path: str, *, exclusive: bool = True) -> int:
        self._step("create" if exclusive else "create-or-truncate", self._rel(path))
        fd = super().create(path, exclusive=exclusive)
        self._paths[fd] = self._rel(path)
        return fd

    def write(self, fd: int, data: bytes) -> None:
        self._step("write", self._paths[fd])
        super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._step("fsync", self._paths[fd])
        super().fsync(fd)

    def close(self, fd: int) -> None:
        try:
            self._step("close", self._paths.pop(fd))
        except Crash:
            os.close(fd)  # a dying process's descriptors close anyway
            raise
        super().close(fd)

    def rename(self, source: str, destination: str) -> None:
        self._step("rename", f"{self._rel(source)} -> {self._rel(destination)}")
        super().rename(source, destination)

    def unlink(self, path: str) -> None:
        self._step("unlink", self._rel(path))
        super().unlink(path)

    def link(self, source: str, destination: str) -> None:
        self._step("link", f"{self._rel(source)} -> {self._rel(destination)}")
        super().link(source, destination)

    def touch(self, path: str, when: float) -> None:
        self._step("touch", self._rel(path))
        super().touch(path, when)

    def fsync_dir(self, path: str) -> None:
        self._step("fsync-dir", self._rel(path))
        super().fsync_dir(path)

    def append(self, path: str) -> int:
        self._step("append", self._rel(path))
        fd = super().append(path)
        self._paths[fd] = self._rel(path)
        return fd

    def truncate(self, fd: int, size: int) -> None:
        self._step("truncate", self._paths[fd])
        super().truncate(fd, size)


ENQUEUE_CALLS = [
    ("create", "tmp/{id}.data"),
    ("write", "tmp/{id}.data"),
    ("fsync", "tmp/{id}.data"),
    ("close", "tmp/{id}.data"),
    ("rename", "tmp/{id}.data -> data/{id}"),
    ("fsync-dir", "data"),
    ("create", "tmp/{id}.env"),
    ("write", "tmp/{id}.env"),
    ("fsync", "tmp/{id}.env"),
    ("close", "tmp/{id}.env"),
    ("rename", "tmp/{id}.env -> env/{id}.json"),
    ("fsync-dir", "env"),
]


def expected(calls: list[tuple[str, str]], qid: str) -> list[tuple[str, str]]:
    return [(call, path.format(id=qid)) for call, path in calls]


class QueueTestCase(SynchronousTestCase):
    """
    A queue directory that does not exist yet, and a clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        # Leftover ages compare the clock with real file times.
        self.clock.advance(time.time())
        self.root = os.path.abspath(self.mktemp())
        self.directory = os.path.join(self.root, "queue")

    def make_queue(
        self, *, sync: ManualSync | None = None, ops: FileOps | None = None
    ) -> OutboundQueue:
        queue = OutboundQueue(self.directory, clock=self.clock, sync=sync, file_ops=ops)
        queue.load()
        self.addCleanup(self.shut, queue, sync)
        return queue

    def shut(self, queue: OutboundQueue, sync: ManualSync | None) -> None:
        d = queue.close()
        if sync is not None:
            sync.finish_all()
        self.successResultOf(d)

    def reload(self, old: OutboundQueue) -> OutboundQueue:
        """The queue as a restarted process sees it (the old one is closed)."""
        self.successResultOf(old.close())
        return self.make_queue()

    def enqueue(self, queue: OutboundQueue, *recipients: str, **kwargs: object) -> Envelope:
        d = queue.enqueue(
            "dev@groups.example.com",
            list(recipients or ["a@example.org"]),
            MESSAGE,
            **kwargs,  # type: ignore[arg-type]
        )
        return self.successResultOf(d)

    def listing(self, sub: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.directory, sub)))

    def read_data(self, queue: OutboundQueue, qid: str) -> bytes:
        with open(queue.data_path(qid), "rb") as f:
            return f.read()


class EnqueueTests(QueueTestCase):
    """
    L{OutboundQueue.enqueue} stores a message and its envelope durably.
    """

    def test_bytes(self) -> None:
        """
        A queued message is kept byte for byte, with an envelope naming its
        sender, its recipients (all pending, due at once) and its size.
        """
        queue = self.make_queue()
        envelope = self.enqueue(
            queue, "a@example.org", "b@example.net", xverp=True, params={"BODY": "8BITMIME"}
        )
        self.assertEqual(self.read_data(queue, envelope.id), MESSAGE)
        self.assertEqual(envelope.sender, "dev@groups.example.com")
        self.assertEqual(
            envelope.recipients,
            [
                RecipientState("a@example.org", PENDING, 0, self.clock.seconds(), ""),
                RecipientState("b@example.net", PENDING, 0, self.clock.seconds(), ""),
            ],
        )
        self.assertEqual(
            (envelope.xverp, envelope.size, envelope.held, envelope.created, envelope.params),
            (True, len(MESSAGE), False, self.clock.seconds(), {"BODY": "8BITMIME"}),
        )
        self.assertIs(queue.get(envelope.id), envelope)
        self.assertEqual(queue.envelopes(), [envelope])
        self.assertEqual(self.listing("tmp"), [])

    def test_file(self) -> None:
        """
        Given the path of a spool file, the queue copies it (bigger than one
        copy chunk here); the spool file may then be removed.
        """
        spool = os.path.join(self.root, "spool")
        os.makedirs(self.root, exist_ok=True)
        body = bytes(range(256)) * (3 * 4096 + 7)  # ~3 MiB, not a multiple of the chunk
        with open(spool, "wb") as f:
            f.write(body)
        queue = self.make_queue()
        envelope = self.successResultOf(queue.enqueue("", ["a@example.org"], spool))
        os.unlink(spool)
        self.assertEqual(envelope.size, len(body))
        self.assertEqual(self.read_data(queue, envelope.id), body)
        self.assertEqual(envelope.sender, "")

    def test_missing_file(self) -> None:
        """
        A spool path that does not exist fails the enqueue with C{OSError}
        and leaves nothing behind.
        """
        queue = self.make_queue()
        d = queue.enqueue("", ["a@example.org"], os.path.join(self.root, "nothing"))
        self.failureResultOf(d, FileNotFoundError)
        self.assertEqual((self.listing("tmp"), self.listing("data")), ([], []))

    def test_durable_before_fired(self) -> None:
        """
        The Deferred fires only after the disk work is done, and the message
        is not due (not visible) before: the 250 can only follow the fsyncs.
        """
        sync = ManualSync()
        queue = self.make_queue(sync=sync)
        d = queue.enqueue("dev@groups.example.com", ["a@example.org"], MESSAGE)
        self.assertNoResult(d)
        self.assertEqual(self.listing("env"), [])
        self.assertEqual(queue.due(self.clock.seconds()), [])
        sync.finish()
        envelope = self.successResultOf(d)
        self.assertEqual(self.listing("env"), [envelope.id + ".json"])
        self.assertEqual(queue.envelopes(), [envelope])

    def test_fsync_order(self) -> None:
        """
        Each file is fsynced before it is renamed into place, each directory
        after the rename into it, the data directory before the envelope
        appears, and the Deferred fires after the last fsync.
        """
        ops = RecordingOps(self.directory)
        queue = self.make_queue(ops=ops)
        seen_at_fire: list[int] = []
        d = queue.enqueue("dev@groups.example.com", ["a@example.org"], MESSAGE)

        def fired(envelope: Envelope) -> Envelope:
            seen_at_fire.append(len(ops.calls))
            return envelope

        d.addCallback(fired)
        envelope = self.successResultOf(d)
        self.assertEqual(ops.calls, expected(ENQUEUE_CALLS, envelope.id))
        self.assertEqual(seen_at_fire, [len(ENQUEUE_CALLS)])

    def test_ids(self) -> None:
        """
        Queue ids are unique, safe file names, and sort in queueing order
        even when the clock does not move.
        """
        queue = self.make_queue()
        ids = [self.enqueue(queue).id for _ in range(50)]
        self.assertEqual(sorted(ids), ids)
        self.assertEqual(len(set(ids)), 50)
        for qid in ids:
            self.assertRegex(qid, r"\A[0-9a-f]{16}-[0-9a-f]{8}\Z")
        self.assertEqual([e.id for e in queue.envelopes()], ids)

    def test_invalid(self) -> None:
        """
        No recipients, an empty recipient, or CR/LF in an address or a
        parameter (command injection into the SMTP client) are refused with
        C{ValueError}, and nothing is written.
        """
        queue = self.make_queue()
        for sender, recipients, params in (
            ("dev@groups.example.com", [], {}),
            ("dev@groups.example.com", [""], {}),
            ("dev@groups.example.com", ["a@example.org\r\nRCPT TO:<x@y>"], {}),
            ("dev@groups.example.com\n", ["a@example.org"], {}),
            ("dev@groups.example.com", ["a@example.org"], {"BODY": "8BITMIME\r\nDATA"}),
        ):
            with self.subTest(sender=sender, recipients=recipients, params=params):
                d = queue.enqueue(sender, recipients, MESSAGE, params=params)
                self.failureResultOf(d, ValueError)
        self.assertEqual((self.listing("data"), self.listing("env")), ([], []))

    def test_disk_error(self) -> None:
        """
        When the disk fails (EIO at the envelope's fsync), the enqueue fails
        with C{OSError} (the listener answers 451) and nothing is queued or
        left on disk.
        """
        ops = RecordingOps(self.directory)
        queue = self.make_queue(ops=ops)
        ops.fail = "fsync"
        self.failureResultOf(queue.enqueue("", ["a@example.org"], MESSAGE), OSError)
        self.assertEqual(queue.envelopes(), [])
        self.assertEqual((self.listing("tmp"), self.listing("data")), ([], []))
        for fail in ("fsync-dir data", "fsync-dir env"):
            ops.fail = fail
            self.failureResultOf(queue.enqueue("", ["a@example.org"], MESSAGE), OSError)
            self.assertEqual(queue.envelopes(), [])
            self.assertEqual([self.listing(d) for d in ("tmp", "data", "env")], [[], [], []])

    def test_not_loaded(self) -> None:
        """
        A queue that was not loaded (or is closed) refuses work with
        L{QueueClosedError}.
        """
        queue = OutboundQueue(self.directory, clock=self.clock)
        self.failureResultOf(queue.enqueue("", ["a@example.org"], MESSAGE), QueueClosedError)
        loaded = self.make_queue()
        self.successResultOf(loaded.close())
        self.failureResultOf(loaded.enqueue("", ["a@example.org"], MESSAGE), QueueClosedError)

    def test_thousand_recipients(self) -> None:
        """
        One message for 1,000 members keeps every recipient across a restart;
        the envelope stays small (about 100 bytes per recipient).
        """
        queue = self.make_queue()
        members = [f"member{n}@example.org" for n in range(1000)]
        envelope = self.enqueue(queue, *members)
        size = os.path.getsize(os.path.join(self.directory, "env", envelope.id + ".json"))
        self.assertLess(size, 150 * 1000)
        again = self.reload(queue)
        loaded = again.get(envelope.id)
        assert loaded is not None
        self.assertEqual([r.address for r in loaded.recipients], members)
        self.assertEqual(loaded, envelope)

    def test_round_trip(self) -> None:
        """
        Every envelope field survives a restart exactly: null sender,
        parameters, non-ASCII (SMTPUTF8) addresses, states and replies.
        """
        queue = self.make_queue()
        envelope = self.successResultOf(
            queue.enqueue(
                "",
                ["jöran@exämple.org", "b@example.org"],
                MESSAGE,
                params={"SMTPUTF8": "", "BODY": "8BITMIME"},
            )
        )
        envelope.recipients[1] = attrs.evolve(
            envelope.recipients[1],
            state=FAILED,
            attempts=3,
            next_attempt=1.5,
            last_reply="550 5.1.1 <b@example.org>: no such user",
        )
        envelope.dsn_sent = True
        self.successResultOf(queue.update(envelope))
        self.assertEqual(self.reload(queue).envelopes(), [envelope])


class DSNFieldTests(QueueTestCase):
    """
    The RFC 3461 data of a message (per recipient NOTIFY and ORCPT, the
    delay-warning flag) is stored compatibly: old envelopes load, and
    envelopes without it are written as before.
    """

    def test_round_trip(self) -> None:
        """NOTIFY, ORCPT and the delay-warning flag survive a restart."""
        queue = self.make_queue()
        envelope = self.enqueue(
            queue,
            "a@example.org",
            "b@example.org",
            "c@example.org",
            params={"RET": "HDRS", "ENVID": "QQ+2B314"},
            dsn=[("SUCCESS,FAILURE", "rfc822;a+x@example.org"), ("NEVER", ""), ("", "")],
        )
        self.assertEqual(
            [(r.notify, r.orcpt) for r in envelope.recipients],
            [("SUCCESS,FAILURE", "rfc822;a+x@example.org"), ("NEVER", ""), ("", "")],
        )
        envelope.delay_warned = True
        self.successResultOf(queue.update(envelope))
        [loaded] = self.reload(queue).envelopes()
        self.assertEqual(loaded, envelope)
        self.assertTrue(loaded.delay_warned)

    def test_written_only_when_set(self) -> None:
        """
        An envelope without DSN data has no new fields on disk, so older
        versions read it as they always did; one with it names them.
        """
        queue = self.make_queue()
        plain = self.enqueue(queue, "a@example.org")
        asked = self.enqueue(queue, "a@example.org", dsn=[("DELAY", "")])

        def stored(envelope: Envelope) -> dict[str, object]:
            with open(os.path.join(self.directory, "env", envelope.id + ".json"), "rb") as f:
                obj: dict[str, object] = json.load(f)
            return obj

        self.assertEqual(
            sorted(stored(plain)["recipients"][0]),  # type: ignore[index]
            ["address", "attempts", "last_reply", "next_attempt", "state"],
        )
        self.assertNotIn("delay_warned", stored(plain))
        self.assertEqual(stored(asked)["recipients"][0]["notify"], "DELAY")  # type: ignore[index]

    def test_old_envelope_loads(self) -> None:
        """
        An envelope written before these fields existed loads with the
        defaults; the NOTIFY and ORCPT it kept among the MAIL parameters
        (C{NOTIFY:<address>}, as received) become the recipients' own.
        """
        queue = self.make_queue()
        envelope = self.enqueue(queue, "a@example.org", "b@example.org")
        self.successResultOf(queue.close())
        path = os.path.join(self.directory, "env", envelope.id + ".json")
        with open(path, "rb") as f:
            obj = json.load(f)
        obj["params"] = {
            "ENVID": "abc",
            "NOTIFY:a@example.org": "delay,failure",
            "ORCPT:a@example.org": "rfc822;a+2Bold@example.org",
            "NOTIFY:b@example.org": "bogus",
        }
        with open(path, "w") as f:
            json.dump(obj, f)
        [loaded] = self.make_queue().envelopes()
        self.assertEqual(
            [(r.notify, r.orcpt) for r in loaded.recipients],
            [("FAILURE,DELAY", "rfc822;a+old@example.org"), ("", "")],
        )
        self.assertFalse(loaded.delay_warned)

    def test_invalid_dsn_fields(self) -> None:
        """A wrongly typed new field makes the envelope corrupt, as any other field does."""
        queue = self.make_queue()
        envelope = self.enqueue(queue, "a@example.org", dsn=[("DELAY", "")])
        self.successResultOf(queue.close())
        path = os.path.join(self.directory, "env", envelope.id + ".json")
        with open(path, "rb") as f:
            obj = json.load(f)
        obj["recipients"][0]["notify"] = 7
        with open(path, "w") as f:
            json.dump(obj, f)
        self.assertEqual(self.make_queue().envelopes(), [])
        self.assertEqual(
            self.listing("corrupt"), [envelope.id + ".json", envelope.id + ".json.data"]
        )
        self.flushLoggedErrors()

    def test_refused(self) -> None:
        """C{dsn} must give one pair per recipient, without CR, LF or NUL; nothing is written."""
        queue = self.make_queue()
        for dsn in ([], [("", ""), ("", "")], [("FAILURE\r\nDATA", "")], [("x",)]):
            with self.subTest(dsn=dsn):
                d = queue.enqueue("", ["a@example.org"], MESSAGE, dsn=dsn)  # type: ignore[arg-type]
                self.failureResultOf(d, ValueError)
        self.assertEqual((self.listing("data"), self.listing("env")), ([], []))

    def test_fsync_order_unchanged(self) -> None:
        """With DSN data the enqueue makes the same file-system calls, in the same order."""
        ops = RecordingOps(self.directory)
        queue = self.make_queue(ops=ops)
        envelope = self.enqueue(queue, "a@example.org", dsn=[("SUCCESS", "rfc822;a@example.org")])
        self.assertEqual(ops.calls, expected(ENQUEUE_CALLS, envelope.id))


class CrashTestCase(QueueTestCase):
    """
    A queue whose process is killed at a chosen file-system call, and the
    queue the restarted process loads.
    """

    def crash_and_restart(
        self, setup: Callable[[OutboundQueue], object], step: int
    ) -> OutboundQueue:
        """
        Run C{setup} on a queue whose process is killed at file-system call
        C{step}, then load the queue as the restarted process would, a
        minute later.
        """
        ops = RecordingOps(self.directory, crash_at=step)
        queue = OutboundQueue(self.directory, clock=self.clock, file_ops=ops)
        queue.load()
        setup(queue)
        self.successResultOf(queue.close())  # the dead process's lock goes with it
        self.clock.advance(61)
        restarted = OutboundQueue(self.directory, clock=self.clock)
        restarted.load()
        self.addCleanup(restarted.close)
        return restarted

    def assert_clean(self, queue: OutboundQueue) -> None:
        """Only whole messages remain: no leftover, nothing corrupt."""
        ids = sorted(e.id for e in queue.envelopes())
        self.assertEqual(self.listing("env"), [qid + ".json" for qid in ids])
        self.assertEqual(self.listing("data"), ids)
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.listing("corrupt"), [])
        self.assertLessEqual(set(self.listing("journal")), set(ids))


class CrashTests(CrashTestCase):
    """
    A crash (the process killed) at any file-system call leaves every
    message whole or absent, and restart cleans up the rest.
    """

    def test_enqueue(self) -> None:
        """
        Killed at each step of an enqueue, the restarted queue has the
        message whole (data, envelope, recipients) or not at all; it is only
        there when the envelope's rename had happened, and the enqueue never
        reported success.
        """
        outcomes = []
        for step in range(1, len(ENQUEUE_CALLS) + 1):
            with self.subTest(step=step):
                results: list[Deferred[Envelope]] = []

                def enqueue(q: OutboundQueue, results: list[Deferred[Envelope]] = results) -> None:
                    results.append(q.enqueue("", ["a@example.org"], MESSAGE))

                queue = self.crash_and_restart(enqueue, step)
                self.failureResultOf(results[0], Crash)
                self.assert_clean(queue)
                envelopes = queue.envelopes()
                if envelopes:
                    self.assertEqual(self.read_data(queue, envelopes[0].id), MESSAGE)
                    self.assertEqual(
                        [r.address for r in envelopes[0].recipients], ["a@example.org"]
                    )
                outcomes.append(len(envelopes))
                self.successResultOf(queue.close())
                for sub in ("env", "data"):
                    for name in self.listing(sub):
                        os.unlink(os.path.join(self.directory, sub, name))
        # Killed before the envelope's rename: absent; after it: queued (the
        # at-least-once window: the sender got no 250 and will send again).
        self.assertEqual(outcomes, [0] * 11 + [1])

    def test_young_leftovers_kept(self) -> None:
        """
        Data left by a crash less than a minute ago is kept at load (a writer
        may still be at it) and removed by a later load.
        """
        ops = RecordingOps(self.directory, crash_at=7)  # after the data's rename
        queue = OutboundQueue(self.directory, clock=self.clock, file_ops=ops)
        queue.load()
        self.failureResultOf(queue.enqueue("", ["a@example.org"], MESSAGE), Crash)
        self.successResultOf(queue.close())
        again = self.make_queue()
        self.assertEqual(again.envelopes(), [])
        self.assertEqual(len(self.listing("data")), 1)
        self.clock.advance(61)
        self.reload(again)
        self.assertEqual(self.listing("data"), [])

    def test_update(self) -> None:
        """
        Killed at each step of an update, the restarted queue has the
        envelope in its old state or its new one, never a corrupt one.
        """
        queue = self.make_queue()
        envelope = self.enqueue(queue)
        self.successResultOf(queue.close())
        states = []
        for step in range(1, 7):
            with self.subTest(step=step):

                def deliver(q: OutboundQueue) -> None:
                    e = q.get(envelope.id)
                    assert e is not None
                    e.recipients[0].state = (
                        DELIVERED if e.recipients[0].state == PENDING else PENDING
                    )
                    self.failureResultOf(q.update(e), Crash)

                restarted = self.crash_and_restart(deliver, step)
                self.assert_clean(restarted)
                loaded = restarted.get(envelope.id)
                assert loaded is not None
                states.append(loaded.recipients[0].state)
                self.successResultOf(restarted.close())
        # Only a crash at the last step (the directory fsync) finds it renamed.
        self.assertEqual(states, [PENDING] * 5 + [DELIVERED])

    def test_remove(self) -> None:
        """
        Killed at each step of a removal, the restarted queue has the
        message whole or not at all: the envelope goes first.
        """
        outcomes = []
        for step in range(1, 5):
            with self.subTest(step=step):
                queue = self.make_queue()
                envelope = self.enqueue(queue)
                envelope.recipients[0].state = DELIVERED
                self.successResultOf(queue.update(envelope))
                self.successResultOf(queue.close())

                def remove(q: OutboundQueue, qid: str = envelope.id) -> None:
                    self.failureResultOf(q.remove(qid), Crash)

                restarted = self.crash_and_restart(remove, step)
                self.assert_clean(restarted)
                outcomes.append(len(restarted.envelopes()))
                for left in restarted.envelopes():
                    self.successResultOf(restarted.delete(left.id))
                self.successResultOf(restarted.close())
        self.assertEqual(outcomes, [1, 0, 0, 0])


class UpdateTests(QueueTestCase):
    """
    L{OutboundQueue.update} and L{OutboundQueue.remove} keep the delivery's
    progress durable.
    """

    def test_persisted(self) -> None:
        """
        A recipient marked delivered stays delivered after a restart, and is
        no longer due.
        """
        queue = self.make_queue()
        envelope = self.enqueue(queue, "a@example.org", "b@example.org")
        envelope.recipients[0].state = DELIVERED
        envelope.recipients[0].last_reply = "250 2.0.0 Ok: queued as 4Xyz"
        self.successResultOf(queue.update(envelope))
        again = self.reload(queue)
        [(due, ready)] = again.due(self.clock.seconds())
        self.assertEqual(due.recipients[0].state, DELIVERED)
        self.assertEqual(due.recipients[0].last_reply, "250 2.0.0 Ok: queued as 4Xyz")
        self.assertEqual([r.address for r in ready], ["b@example.org"])

    def test_order(self) -> None:
        """
        An update writes a temporary file, fsyncs it, renames it over the
        envelope and fsyncs the directory, in that order.
        """
        ops = RecordingOps(self.directory)
        queue = self.make_queue(ops=ops)
        envelope = self.enqueue(queue)
        del ops.calls[:]
        self.successResultOf(queue.update(envelope))
        self.assertEqual(
            ops.calls,
            expected(
                [
                    ("create-or-truncate", "tmp/{id}.env"),
                    ("write", "tmp/{id}.env"),
                    ("fsync", "tmp/{id}.env"),
                    ("close", "tmp/{id}.env"),
                    ("rename", "tmp/{id}.env -> env/{id}.json"),
                    ("fsync-dir", "env"),
                ],
                envelope.id,
            ),
        )

    def test_shared_writes(self) -> None:
        """
        Updates of one message are serialised, and those that wait share one
        write: five concurrent updates cost two writes, and each caller hears
        only after a write that includes its change.
        """
        sync = ManualSync()
        queue = self.make_queue(sync=sync)
        d = queue.enqueue("", [f"m{n}@example.org" for n in range(5)], MESSAGE)
        sync.finish()
        envelope = self.successResultOf(d)
        updates = []
        for n in range(5):
            envelope.recipients[n].state = DELIVERED
            updates.append(queue.update(envelope))
        self.assertEqual(len(sync.jobs), 1)
        sync.finish()
        self.successResultOf(updates[0])
        for waiting in updates[1:]:
            self.assertNoResult(waiting)
        self.assertEqual(len(sync.jobs), 1)
        sync.finish()
        for waiting in updates[1:]:
            self.successResultOf(waiting)
        self.assertEqual(sync.jobs, [])
        on_disk = read_queue(self.directory)[0]
        self.assertEqual({r.state for r in on_disk.recipients}, {DELIVERED})

    def test_failure(self) -> None:
        """
        A failed write fails the update with C{OSError}; memory keeps the
        change and the next update writes it.
        """
        ops = RecordingOps(self.directory)
        queue = self.make_queue(ops=ops)
        envelope = self.enqueue(queue)
        envelope.recipients[0].state = DELIVERED
        ops.fail = "fsync"
        self.failureResultOf(queue.update(envelope), OSError)
        self.assertEqual(read_queue(self.directory)[0].recipients[0].state, PENDING)
        ops.fail = ""
        self.successResultOf(queue.update(envelope))
        self.assertEqual(read_queue(self.directory)[0].recipients[0].state, DELIVERED)
        self.assertEqual(self.listing("tmp"), [])

    def test_copy_refused(self) -> None:
        """
        An update with a copy of the envelope (which would silently lose
        concurrent changes to the queue's own object) is refused.
        """
        queue = self.make_queue()
        envelope = self.enqueue(queue)
        self.failureResultOf(queue.update(attrs.evolve(envelope, held=True)), ValueError)

    def test_remove(self) -> None:
        """
        A message whose recipients are all final is removed: envelope first
        (then its directory is fsynced), then data.
        """
        ops = RecordingOps(self.directory)
        queue = self.make_queue(ops=ops)
        envelope = self.enqueue(queue, "a@example.org", "b@example.org", "c@example.org")
        for recipient, state in zip(envelope.recipients, (DELIVERED, FAILED, EXPIRED), strict=True):
            recipient.state = state
        self.successResultOf(queue.update(envelope))
        del ops.calls[:]
        self.successResultOf(queue.remove(envelope.id))
        self.assertEqual(
            ops.calls,
            expected(
                [
                    ("unlink", "env/{id}.json"),
                    ("fsync-dir", "env"),
                    ("unlink", "data/{id}"),
                    ("fsync-dir", "data"),
                ],
                envelope.id,
            ),
        )
        self.assertIsNone(queue.get(envelope.id))
        self.assertEqual(self.reload(queue).envelopes(), [])

    def test_remove_pending(self) -> None:
        """
        L{OutboundQueue.remove} refuses a message with a pending recipient
        (that would lose mail); it stays queued.
        """
        queue = self.make_queue()
        envelope = self.enqueue(queue, "a@example.org", "b@example.org")
        envelope.recipients[0].state = DELIVERED
        self.failureResultOf(queue.remove(envelope.id), ValueError)
        self.assertIs(queue.get(envelope.id), envelope)
        self.assertEqual(len(self.listing("data")), 1)

    def test_gone(self) -> None:
        """
        Updating, holding or removing a message that was deleted meanwhile
        fails with L{NoSuchMessageError}; it does not come back.
        """
        queue = self.make_queue()
        envelope = self.enqueue(queue)
        self.successResultOf(queue.delete(envelope.id))
        self.failureResultOf(queue.update(envelope), NoSuchMessageError)
        self.failureResultOf(queue.hold(envelope.id), NoSuchMessageError)
        self.failureResultOf(queue.remove(envelope.id), NoSuchMessageError)
        self.assertEqual((self.listing("env"), self.listing("data")), ([], []))

    def test_bad_id(self) -> None:
        """
        An id that is not a queue id (a path, say) is refused with
        C{ValueError}, never used as a file name.
        """
        queue = self.make_queue()
        self.assertRaises(ValueError, queue.data_path, "../../etc/passwd")
        self.failureResultOf(queue.delete("../lock"), ValueError)
        self.failureResultOf(queue.hold("x"), ValueError)


class OperatorTests(QueueTestCase):
    """
    Hold, release and delete, as an operator's commands.
    """

    def test_hold_release(self) -> None:
        """
        A held message is not due and wakes nobody, also after a restart;
        released, it is due again.
        """
        queue = self.make_queue()
        envelope = self.enqueue(queue)
        now = self.clock.seconds()
        self.successResultOf(queue.hold(envelope.id))
        self.assertEqual(queue.due(now), [])
        self.assertIsNone(queue.next_wakeup())
        queue = self.reload(queue)
        self.assertTrue(queue.envelopes()[0].held)
        self.assertEqual(queue.due(now), [])
        self.successResultOf(queue.release(envelope.id))
        self.assertEqual([e.id for e, _ in queue.due(now)], [envelope.id])
        self.assertFalse(self.reload(queue).envelopes()[0].held)

    def test_delete(self) -> None:
        """
        A deleted message is gone, pending recipients and all, and the
        deletion is logged with the number of recipients dropped.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        queue = self.make_queue()
        envelope = self.enqueue(queue, "a@example.org", "b@example.org")
        other = self.enqueue(queue)
        self.successResultOf(queue.delete(envelope.id))
        self.assertEqual(queue.envelopes(), [other])
        self.assertEqual(self.listing("data"), [other.id])
        deleted = [e for e in events if e.get("log_format", "").startswith("Deleted")]
        self.assertEqual([(e["queue_id"], e["pending"]) for e in deleted], [(envelope.id, 2)])

    def test_read_queue(self) -> None:
        """
        L{read_queue} lists the queue of a running process without the lock
        and without changing anything; a second loader is refused.
        """
        queue = self.make_queue()
        first = self.enqueue(queue)
        second = self.enqueue(queue)
        self.assertEqual(read_queue(self.directory), [first, second])
        other = OutboundQueue(self.directory, clock=self.clock)
        self.assertRaises(QueueLockedError, other.load)


class JournalTests(QueueTestCase):
    """
    L{OutboundQueue.record}: recipient outcomes are appended to a journal,
    written for many messages at once, and replayed at load, so a message
    to n members costs O(n) bytes on disk, not O(n^2).
    """

    def record(self, queue: OutboundQueue, envelope: Envelope, *indexes: int) -> Deferred[None]:
        """Record the current state of recipients C{indexes}, and let the write start."""
        d = queue.record(envelope, [envelope.recipients[i] for i in indexes])
        self.clock.advance(0)
        return d

    def deliver(self, envelope: Envelope, index: int, reply: str = "250 2.0.0 Ok") -> None:
        r = envelope.recipients[index]
        r.state = DELIVERED if reply.startswith("2") else FAILED
        r.attempts += 1
        r.last_reply = reply

    def journal(self, qid: str) -> bytes:
        with open(os.path.join(self.directory, "journal", qid), "rb") as f:
            return f.read()

    def test_durable_and_replayed(self) -> None:
        """
        A recorded outcome survives a restart, and the envelope file itself
        is not rewritten for it.
        """
        queue = self.make_queue()
        envelope = self.enqueue(queue, "a@example.org", "b@example.org")
        env_file = os.path.join(self.directory, "env", envelope.id + ".json")
        with open(env_file, "rb") as f:
            before = f.read()
        self.deliver(envelope, 1, "250 2.0.0 Ok: queued as 4Xyz")
        self.successResultOf(self.record(queue, envelope, 1))
        with open(env_file, "rb") as f:
            self.assertEqual(f.read(), before)
        again = self.reload(queue).get(envelope.id)
        assert again is not None
        self.assertEqual(again.recipients, envelope.recipients)
        self.assertEqual(again.recipients[1].last_reply, "250 2.0.0 Ok: queued as 4Xyz")
        self.assertEqual(again.recipients[0].state, PENDING)

    def test_fields_round_trip(self) -> None:
        """
        Every recorded field survives a restart exactly: replies with quotes,
        backslashes and non-ASCII text (even undecodable bytes kept as
        surrogates), fractional times, each state.
        """
        queue = self.make_queue()
        envelope = self.enqueue(queue, *[f"m{n}@example.org" for n in range(4)])
        replies = ['550 5.1.1 "x\\y" unknown', "451 4.2.0 Postfach voll: Jörg", "250 ok \udcff", ""]
        for r, state, reply in zip(
            envelope.recipients, (FAILED, PENDING, DELIVERED, EXPIRED), replies, strict=True
        ):
            r.state, r.last_reply, r.attempts, r.next_attempt = state, reply, 7, 1.7e9 + 0.125
        self.successResultOf(self.record(queue, envelope, 0, 1, 2, 3))
        loaded = self.reload(queue).get(envelope.id)
        assert loaded is not None
        self.assertEqual(loaded.recipients, envelope.recipients)

    def test_group_commit(self) -> None:
        """
        Records of several messages made in one reactor turn are written by
        one job: each journal written and fsynced once, the new journals'
        directory fsynced once; nobody hears before that job is done, and
        records made meanwhile wait for the next job.
        """
        sync = ManualSync()
        ops = RecordingOps(self.directory)
        queue = self.make_queue(sync=sync, ops=ops)
        first = queue.enqueue("", ["a@example.org", "b@example.org"], MESSAGE)
        second = queue.enqueue("", ["c@example.org"], MESSAGE)
        sync.finish_all()
        e1, e2 = self.successResultOf(first), self.successResultOf(second)
        del ops.calls[:]
        self.deliver(e1, 0)
        self.deliver(e1, 1)
        self.deliver(e2, 0)
        waiting = [queue.record(e1, [e1.recipients[0]]), queue.record(e1, [e1.recipients[1]])]
        waiting.append(queue.record(e2, e2.recipients))
        self.assertEqual(sync.jobs, [])
        self.clock.advance(0)
        self.assertEqual(len(sync.jobs), 1)
        for d in waiting:
            self.assertNoResult(d)
        sync.finish()
        for d in waiting:
            self.successResultOf(d)
        self.assertEqual(
            ops.calls,
            [
                ("append", f"journal/{e1.id}"),
                ("write", f"journal/{e1.id}"),
                ("append", f"journal/{e2.id}"),
                ("write", f"journal/{e2.id}"),
                ("fsync", f"journal/{e1.id}"),
                ("fsync", f"journal/{e2.id}"),
                ("fsync-dir", "journal"),
            ],
        )
        del ops.calls[:]
        later = self.record(queue, e1, 0)
        self.assertEqual(len(sync.jobs), 1)
        sync.finish()
        self.successResultOf(later)
        # The journal exists now: no open, no directory fsync.
        self.assertEqual(ops.calls, [("write", f"journal/{e1.id}"), ("fsync", f"journal/{e1.id}")])
        self.assertEqual({r.state for r in read_queue(self.directory)[0].recipients}, {DELIVERED})

    def test_journal_sync(self) -> None:
        """
        With a C{journal_sync} of its own, the journal appends run there and
        everything else (queueing, rewriting, removing) in C{sync}: a record
        is durable when its Deferred fires, and the envelope rewrite that
        follows empties the journal.
        """
        sync, journal_sync = ManualSync(), ManualSync()
        queue = OutboundQueue(
            self.directory, clock=self.clock, sync=sync, journal_sync=journal_sync
        )
        queue.load()
        d = queue.enqueue("", ["a@example.org", "b@example.org"], MESSAGE)
        self.assertEqual((len(sync.jobs), journal_sync.jobs), (1, []))
        sync.finish()
        envelope = self.successResultOf(d)
        self.deliver(envelope, 0)
        recorded = self.record(queue, envelope, 0)
        self.assertEqual((sync.jobs, len(journal_sync.jobs)), ([], 1))
        self.assertNoResult(recorded)
        journal_sync.finish()
        self.successResultOf(recorded)
        self.assertEqual(self.journal(envelope.id).count(b"\n"), 1)
        self.assertEqual(read_queue(self.directory)[0].recipients[0].state, DELIVERED)
        rewritten = queue.update(envelope)
        self.assertEqual((len(sync.jobs), journal_sync.jobs), (1, []))
        sync.finish()
        self.successResultOf(rewritten)
        self.assertEqual(self.journal(envelope.id), b"")
        closed = queue.close()
        self.successResultOf(closed)

    def test_linear_bytes(self) -> None:
        """
        Recording each of 1,000 recipients on its own writes about 100 bytes
        per recipient in all (rewriting the envelope each time wrote 100 MB).
        """

        class Counting(FileOps):
            written = 0

            def write(self, fd: int, data: bytes) -> None:
                Counting.written += len(data)
                super().write(fd, data)

        queue = self.make_queue(ops=Counting())
        envelope = self.enqueue(queue, *[f"member{n}@example.org" for n in range(1000)])
        Counting.written = 0
        for n in range(1000):
            self.deliver(envelope, n)
            self.successResultOf(self.record(queue, envelope, n))
        self.assertLess(Counting.written, 100 * 1000)
        loaded = self.reload(queue).get(envelope.id)
        assert loaded is not None
        self.assertEqual({r.state for r in loaded.recipients}, {DELIVERED})

    def test_compaction(self) -> None:
        """
        Once retries make a journal longer than two records per recipient
        (plus a margin), the envelope is rewritten with the current state and
        the journal emptied; nothing is lost across a restart.
        """
        queue = self.make_queue()
        envelope = self.enqueue(queue, "a@example.org")
        r = envelope.recipients[0]
        for attempt in range(1, 40):
            r.attempts = attempt
            r.last_reply = f"451 4.3.0 attempt {attempt}"
            self.successResultOf(self.record(queue, envelope, 0))
        self.assertLess(len(self.journal(envelope.id).splitlines()), 34)
        loaded = self.reload(queue).get(envelope.id)
        assert loaded is not None
        self.assertEqual((loaded.recipients[0].attempts, loaded.recipients[0].state), (39, PENDING))

    def test_torn_tail(self) -> None:
        """
        A record cut short by a crash (no line end) is ignored at load and cut
        off the journal, so the next record starts on a line of its own and
        survives the next restart.
        """
        queue = self.make_queue()
        envelope = self.enqueue(queue, "a@example.org", "b@example.org")
        self.deliver(envelope, 0)
        self.successResultOf(self.record(queue, envelope, 0))
        whole = self.journal(envelope.id)
        with open(os.path.join(self.directory, "journal", envelope.id), "ab") as f:
            f.write(b'[2,1,"delivered",1,12')
        again = self.reload(queue)
        loaded = again.get(envelope.id)
        assert loaded is not None
        self.assertEqual([r.state for r in loaded.recipients], [DELIVERED, PENDING])
        self.assertEqual(self.journal(envelope.id), whole)
        self.deliver(loaded, 1, "550 5.1.1 No such user")
        self.successResultOf(self.record(again, loaded, 1))
        final = self.reload(again).get(envelope.id)
        assert final is not None
        self.assertEqual([r.state for r in final.recipients], [DELIVERED, FAILED])

    def test_orphan_journal_removed(self) -> None:
        """
        A journal whose envelope is gone (a removal cut short) is removed at
        load; it does not bring the message back.
        """
        queue = self.make_queue()
        orphan = os.path.join(self.directory, "journal", "0000000000000001-abcdef01")
        with open(orphan, "wb") as f:
            f.write(b'[1,0,"delivered",1,0,""]\n')
        again = self.reload(queue)
        self.assertEqual(again.envelopes(), [])
        self.assertEqual(self.listing("journal"), [])

    def test_failed_write_rewrites(self) -> None:
        """
        A journal write that fails (EIO) fails the record with C{OSError};
        the journal may end in a torn line, so the next record rewrites the
        whole envelope and empties the journal, and both outcomes survive.
        """
        ops = RecordingOps(self.directory)
        queue = self.make_queue(ops=ops)
        envelope = self.enqueue(queue, "a@example.org", "b@example.org")
        self.deliver(envelope, 0)
        ops.fail = f"fsync journal/{envelope.id}"
        self.failureResultOf(self.record(queue, envelope, 0), OSError)
        ops.fail = ""
        del ops.calls[:]
        self.deliver(envelope, 1)
        self.successResultOf(self.record(queue, envelope, 1))
        self.assertIn(("rename", f"tmp/{envelope.id}.env -> env/{envelope.id}.json"), ops.calls)
        self.assertIn(("truncate", f"journal/{envelope.id}"), ops.calls)
        self.assertEqual(self.journal(envelope.id), b"")
        loaded = self.reload(queue).get(envelope.id)
        assert loaded is not None
        self.assertEqual({r.state for r in loaded.recipients}, {DELIVERED})

    def test_read_queue(self) -> None:
        """A listing of the directory (another process) shows recorded outcomes."""
        queue = self.make_queue()
        envelope = self.enqueue(queue, "a@example.org", "b@example.org")
        self.deliver(envelope, 1)
        self.successResultOf(self.record(queue, envelope, 1))
        [listed] = read_queue(self.directory)
        self.assertEqual([r.state for r in listed.recipients], [PENDING, DELIVERED])

    def test_refused(self) -> None:
        """
        A copy of the envelope, a recipient that is not the envelope's, or a
        message deleted meanwhile is refused, and nothing is written.
        """
        queue = self.make_queue()
        envelope = self.enqueue(queue, "a@example.org")
        copy = attrs.evolve(envelope, recipients=[attrs.evolve(envelope.recipients[0])])
        self.failureResultOf(self.record(queue, copy, 0), ValueError)
        stranger = RecipientState("a@example.org", DELIVERED)
        self.failureResultOf(self.clocked(queue.record(envelope, [stranger])), ValueError)
        self.successResultOf(queue.delete(envelope.id))
        self.failureResultOf(self.record(queue, envelope, 0), NoSuchMessageError)
        self.assertEqual(self.listing("journal"), [])

    def test_removed_while_waiting(self) -> None:
        """
        A record still waiting when its message is deleted fails with
        L{NoSuchMessageError}, and leaves no journal behind.
        """
        sync = ManualSync()
        queue = self.make_queue(sync=sync)
        d = queue.enqueue("", ["a@example.org"], MESSAGE)
        sync.finish()
        envelope = self.successResultOf(d)
        recorded = queue.record(envelope, envelope.recipients)
        deleted = queue.delete(envelope.id)
        sync.finish_all()
        self.clock.advance(0)
        sync.finish_all()
        self.successResultOf(deleted)
        self.failureResultOf(recorded, NoSuchMessageError)
        self.assertEqual(self.listing("journal"), [])

    def test_remove_takes_the_journal(self) -> None:
        """
        Removing a message closes and unlinks its journal after the envelope
        (whose absence is what makes the message gone).
        """
        ops = RecordingOps(self.directory)
        queue = self.make_queue(ops=ops)
        envelope = self.enqueue(queue)
        self.deliver(envelope, 0)
        self.successResultOf(self.record(queue, envelope, 0))
        del ops.calls[:]
        self.successResultOf(queue.remove(envelope.id))
        self.assertEqual(
            ops.calls,
            expected(
                [
                    ("close", "journal/{id}"),
                    ("unlink", "env/{id}.json"),
                    ("fsync-dir", "env"),
                    ("unlink", "journal/{id}"),
                    ("unlink", "data/{id}"),
                    ("fsync-dir", "data"),
                ],
                envelope.id,
            ),
        )
        self.assertEqual(self.listing("journal"), [])

    def clocked(self, d: Deferred[None]) -> Deferred[None]:
        self.clock.advance(0)
        return d


class JournalCrashTests(CrashTestCase):
    """
    A crash at any file-system call of a record, of an envelope rewrite
    over a journal, or of a removal with a journal.
    """

    def test_record(self) -> None:
        """
        Killed at each step of a first record (open, write, fsync, directory
        fsync), the restarted queue has the old state or the new one; the
        caller never heard of success, so the recipient is sent again at
        worst (at least once, never lost).
        """
        queue = self.make_queue()
        envelope = self.enqueue(queue, "a@example.org", "b@example.org")
        self.successResultOf(queue.close())
        states = []
        for step in range(1, 5):
            with self.subTest(step=step):
                recorded: list[Deferred[None]] = []

                def deliver(q: OutboundQueue, recorded: list[Deferred[None]] = recorded) -> None:
                    e = q.get(envelope.id)
                    assert e is not None
                    e.recipients[1].state = DELIVERED
                    recorded.append(q.record(e, [e.recipients[1]]))
                    self.clock.advance(0)

                restarted = self.crash_and_restart(deliver, step)
                self.failureResultOf(recorded[0], Crash)
                self.assert_clean(restarted)
                loaded = restarted.get(envelope.id)
                assert loaded is not None
                self.assertEqual(loaded.recipients[0].state, PENDING)
                states.append(loaded.recipients[1].state)
                self.successResultOf(restarted.close())
                for name in self.listing("journal"):
                    os.unlink(os.path.join(self.directory, "journal", name))
        # A killed process's writes are in the page cache: once written, kept.
        self.assertEqual(states, [PENDING, PENDING, DELIVERED, DELIVERED])

    def test_rewrite_over_journal(self) -> None:
        """
        Killed at each step of rewriting an envelope that has a journal, the
        restarted queue has the old state (envelope and journal) or the new
        one; records the new envelope already includes are never replayed
        over it, even when the journal could not be emptied (a delivered
        recipient must not become pending again: it would get a second copy).
        """
        states = []
        for step in range(1, 10):
            with self.subTest(step=step):
                queue = self.make_queue()
                envelope = self.enqueue(queue)
                r = envelope.recipients[0]
                r.attempts, r.last_reply = 1, "451 4.3.0 Try later"
                d = queue.record(envelope, [r])
                self.clock.advance(0)
                self.successResultOf(d)
                self.successResultOf(queue.close())

                def deliver(q: OutboundQueue, qid: str = envelope.id) -> None:
                    e = q.get(qid)
                    assert e is not None
                    e.recipients[0].state = DELIVERED
                    e.recipients[0].attempts = 2
                    self.failureResultOf(q.update(e), Crash)

                restarted = self.crash_and_restart(deliver, step)
                self.assert_clean(restarted)
                loaded = restarted.get(envelope.id)
                assert loaded is not None
                states.append((loaded.recipients[0].state, loaded.recipients[0].attempts))
                self.successResultOf(restarted.delete(envelope.id))
                self.successResultOf(restarted.close())
        # Before the rename: the old envelope and its journal; after: the new
        # envelope, whatever became of the journal.
        self.assertEqual(states, [(PENDING, 1)] * 5 + [(DELIVERED, 2)] * 4)

    def test_remove_with_journal(self) -> None:
        """
        Killed at each step of removing a message that has a journal, the
        restarted queue has it whole or not at all, and no journal is left
        without its envelope.
        """
        outcomes = []
        for step in range(1, 6):
            with self.subTest(step=step):
                queue = self.make_queue()
                envelope = self.enqueue(queue)
                envelope.recipients[0].state = DELIVERED
                d = queue.record(envelope, envelope.recipients)
                self.clock.advance(0)
                self.successResultOf(d)
                self.successResultOf(queue.close())

                def remove(q: OutboundQueue, qid: str = envelope.id) -> None:
                    self.failureResultOf(q.remove(qid), Crash)

                restarted = self.crash_and_restart(remove, step)
                self.assert_clean(restarted)
                outcomes.append(len(restarted.envelopes()))
                for left in restarted.envelopes():
                    self.assertEqual(left.recipients[0].state, DELIVERED)
                    self.successResultOf(restarted.delete(left.id))
                self.successResultOf(restarted.close())
        # Killed before the envelope's unlink: still queued; after it: gone.
        self.assertEqual(outcomes, [1, 0, 0, 0, 0])


class ScheduleTests(QueueTestCase):
    """
    L{OutboundQueue.due} and L{OutboundQueue.next_wakeup} follow each
    recipient's next attempt time.
    """

    def test_due(self) -> None:
        """
        Only pending recipients whose time has come are due, oldest message
        first; the wake-up time is the earliest pending one.
        """
        queue = self.make_queue()
        start = self.clock.seconds()
        first = self.enqueue(queue, "a@example.org", "b@example.org", "c@example.org")
        self.clock.advance(10)
        second = self.enqueue(queue, "d@example.org")
        first.recipients[0].next_attempt = start + 300
        first.recipients[1].state = DELIVERED
        second.recipients[0].next_attempt = start + 600
        self.assertEqual(queue.next_wakeup(), start)  # c is still due now
        due = queue.due(self.clock.seconds())
        self.assertEqual(
            [(e.id, [r.address for r in rs]) for e, rs in due], [(first.id, ["c@example.org"])]
        )
        first.recipients[2].state = FAILED
        self.assertEqual(queue.next_wakeup(), start + 300)
        self.assertEqual(queue.due(start + 299), [])
        self.clock.advance(590)
        due = queue.due(self.clock.seconds())
        self.assertEqual(
            [(e.id, [r.address for r in rs]) for e, rs in due],
            [(first.id, ["a@example.org"]), (second.id, ["d@example.org"])],
        )

    def test_nothing(self) -> None:
        """
        An empty queue, or one with only final recipients, has no wake-up.
        """
        queue = self.make_queue()
        self.assertIsNone(queue.next_wakeup())
        envelope = self.enqueue(queue)
        envelope.recipients[0].state = DELIVERED
        self.assertIsNone(queue.next_wakeup())
        self.assertEqual(queue.due(self.clock.seconds() + 1e9), [])


class LoadTests(QueueTestCase):
    """
    L{OutboundQueue.load} reads the queue at start-up, sets corrupt
    envelopes aside and removes crash leftovers.
    """

    def setUp(self) -> None:
        super().setUp()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def queue_two(self) -> tuple[Envelope, Envelope]:
        queue = self.make_queue()
        good, bad = self.enqueue(queue), self.enqueue(queue)
        self.successResultOf(queue.close())
        return good, bad

    def errors(self) -> list[str]:
        return [e["reason"] for e in self.events if e["log_level"] is LogLevel.error]

    def test_unreadable(self) -> None:
        """
        An envelope that does not parse is moved to C{corrupt/} with its
        data and logged; the other messages load.
        """
        good, bad = self.queue_two()
        with open(os.path.join(self.directory, "env", bad.id + ".json"), "wb") as f:
            f.write(b'{"format": 1, "id": "tor')
        queue = self.make_queue()
        self.assertEqual(queue.envelopes(), [good])
        self.assertEqual(self.listing("corrupt"), [bad.id + ".json", bad.id + ".json.data"])
        self.assertEqual(self.listing("data"), [good.id])
        [reason] = self.errors()
        self.assertIn("unreadable", reason)

    def test_invalid_fields(self) -> None:
        """
        An envelope with a wrong field (an unknown state, a negative count,
        another id, a missing field) is corrupt.
        """
        good, bad = self.queue_two()
        path = os.path.join(self.directory, "env", bad.id + ".json")
        with open(path, "rb") as f:
            original = json.load(f)
        changes: list[Callable[[dict[str, object]], object]] = [
            lambda o: o["recipients"][0].update(state="lost"),  # type: ignore[index]
            lambda o: o["recipients"][0].update(attempts=-1),  # type: ignore[index]
            lambda o: o.update(id=good.id),
            lambda o: o.pop("sender"),
            lambda o: o.update(xverp=1),
            lambda o: o.update(recipients=[]),
            lambda o: o.update(format=2),
        ]
        for n, change in enumerate(changes):
            with self.subTest(n=n):
                changed = json.loads(json.dumps(original))
                change(changed)
                with open(path, "w") as f:
                    json.dump(changed, f)
                queue = OutboundQueue(self.directory, clock=self.clock)
                queue.load()
                self.assertEqual([e.id for e in queue.envelopes()], [good.id])
                self.successResultOf(queue.close())
                # Put it back for the next change.
                os.replace(os.path.join(self.directory, "corrupt", bad.id + ".json"), path)
                os.replace(
                    os.path.join(self.directory, "corrupt", bad.id + ".json.data"),
                    os.path.join(self.directory, "data", bad.id),
                )
        self.assertEqual(len(self.errors()), len(changes))

    def test_data_missing(self) -> None:
        """
        An envelope whose data file is missing is corrupt.
        """
        good, bad = self.queue_two()
        os.unlink(os.path.join(self.directory, "data", bad.id))
        queue = self.make_queue()
        self.assertEqual(queue.envelopes(), [good])
        self.assertEqual(self.listing("corrupt"), [bad.id + ".json"])
        self.assertEqual(self.errors(), ["its data file is missing"])

    def test_data_truncated(self) -> None:
        """
        An envelope whose data has another size than recorded is corrupt
        (a message is never sent cut short).
        """
        good, bad = self.queue_two()
        with open(os.path.join(self.directory, "data", bad.id), "r+b") as f:
            f.truncate(10)
        queue = self.make_queue()
        self.assertEqual(queue.envelopes(), [good])
        self.assertEqual(self.errors(), [f"its data has 10 bytes, not {len(MESSAGE)}"])

    def test_stray_files(self) -> None:
        """
        A file in C{env/} that is not an envelope is set aside; old files in
        C{tmp/} and data without envelope are removed, recent ones kept.
        """
        good, _ = self.queue_two()
        os.unlink(os.path.join(self.directory, "env", _.id + ".json"))
        for name, where in (("README", "env"), ("x.data", "tmp"), ("y.env", "tmp")):
            with open(os.path.join(self.directory, where, name), "wb") as f:
                f.write(b"x")
        old = self.clock.seconds() - 120
        os.utime(os.path.join(self.directory, "tmp", "x.data"), (old, old))
        os.utime(os.path.join(self.directory, "data", _.id), (old, old))
        queue = self.make_queue()
        self.assertEqual(queue.envelopes(), [good])
        self.assertEqual(self.listing("corrupt"), ["README"])
        self.assertEqual(self.listing("tmp"), ["y.env"])
        self.assertEqual(self.listing("data"), [good.id])
        self.assertEqual(self.errors(), ["not a queue envelope"])

    def test_corrupt_twice(self) -> None:
        """
        A second corrupt envelope of the same name does not overwrite the
        first in C{corrupt/}.
        """
        _, bad = self.queue_two()
        path = os.path.join(self.directory, "env", bad.id + ".json")
        for _round in range(2):
            with open(path, "wb") as f:
                f.write(b"garbage")
            queue = OutboundQueue(self.directory, clock=self.clock)
            queue.load()
            self.successResultOf(queue.close())
        self.assertEqual(
            self.listing("corrupt"), [bad.id + ".json", bad.id + ".json.1", bad.id + ".json.data"]
        )

    def test_lock(self) -> None:
        """
        Only one process loads a queue; once it closes, another may.
        """
        queue = self.make_queue()
        other = OutboundQueue(self.directory, clock=self.clock)
        self.assertRaises(QueueLockedError, other.load)
        self.successResultOf(queue.close())
        other.load()
        self.successResultOf(other.close())
        self.assertRaises(RuntimeError, other.load)

    def test_close_waits(self) -> None:
        """
        Closing waits for disk work in flight, which completes, then refuses
        new work.
        """
        sync = ManualSync()
        queue = OutboundQueue(self.directory, clock=self.clock, sync=sync)
        queue.load()
        d = queue.enqueue("", ["a@example.org"], MESSAGE)
        closed = queue.close()
        self.assertNoResult(closed)
        self.failureResultOf(queue.enqueue("", ["a@example.org"], MESSAGE), QueueClosedError)
        sync.finish()
        self.successResultOf(closed)
        envelope = self.successResultOf(d)
        self.assertEqual([e.id for e in read_queue(self.directory)], [envelope.id])


def write_zope(directory: str, name: str, content: bytes, mtime: float) -> str:
    """Put a file in a zope.sendmail Maildir, with a given age."""
    os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(content)
    os.utime(path, (mtime, mtime))
    return path


class ZopeImportTests(QueueTestCase):
    """
    L{OutboundQueue.import_zope_sendmail} takes over a zope.sendmail queue
    (gs.email's C{queuepath}) without losing or doubling a message.
    """

    def setUp(self) -> None:
        super().setUp()
        self.zope = os.path.join(self.root, "mailqueue")
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.zope, sub))
        self.now = self.clock.seconds()

    def zope_files(self) -> list[str]:
        return sorted(
            os.path.join(sub, name)
            for sub in ("tmp", "new", "cur")
            for name in os.listdir(os.path.join(self.zope, sub))
        )

    def test_import(self) -> None:
        """
        Messages in C{new/} and C{cur/} are queued oldest first with their
        X-Zope sender and recipients, the two X-Zope lines stripped and the
        rest kept byte for byte; the files are removed. Dotfiles
        (C{.rejected-} copies) and C{tmp/} are left alone.
        """
        write_zope(
            self.zope,
            "cur/1700000001.1.host.1",
            b"X-Zope-From: dev@groups.example.com\n"
            b"X-Zope-To: a@example.org, Bea <b@example.net>\n" + MESSAGE,
            self.now - 100,
        )
        write_zope(
            self.zope,
            "new/1700000002.1.host.2",
            b"X-Zope-From: <>\nX-Zope-To: c@example.org\nSubject: second\n\nx\n",
            self.now - 50,
        )
        write_zope(self.zope, "new/.rejected-1699.1.host.9", b"X-Zope-From: x\n", self.now)
        write_zope(self.zope, "tmp/1700000003.1.host.3", b"X-Zope-From: y\n", self.now)
        queue = self.make_queue()
        self.assertEqual(self.successResultOf(queue.import_zope_sendmail(self.zope, xverp=True)), 2)
        first, second = queue.envelopes()
        self.assertEqual(
            (first.sender, [r.address for r in first.recipients], first.xverp),
            ("dev@groups.example.com", ["a@example.org", "b@example.net"], True),
        )
        self.assertEqual(self.read_data(queue, first.id), MESSAGE)
        self.assertEqual(
            (second.sender, [r.address for r in second.recipients]), ("", ["c@example.org"])
        )
        self.assertEqual(self.read_data(queue, second.id), b"Subject: second\n\nx\n")
        self.assertEqual(first.origin, "zope.sendmail:1700000001.1.host.1")
        self.assertEqual(
            self.zope_files(), ["new/.rejected-1699.1.host.9", "tmp/1700000003.1.host.3"]
        )
        self.assertEqual(self.successResultOf(queue.import_zope_sendmail(self.zope, xverp=True)), 0)
        self.assertEqual(len(queue.envelopes()), 2)

    def test_claims(self) -> None:
        """
        A file claimed (C{.sending-<name>}) less than 3 hours ago may be
        being sent by zope.sendmail: it is left. An older claim is stale:
        the file is imported and the claim removed.
        """
        content = b"X-Zope-From: dev@groups.example.com\nX-Zope-To: a@example.org\n" + MESSAGE
        live = write_zope(self.zope, "new/live", content, self.now - 2 * 3600)
        os.link(live, os.path.join(self.zope, "new", ".sending-live"))
        stale = write_zope(self.zope, "cur/stale", content, self.now - 4 * 3600)
        os.link(stale, os.path.join(self.zope, "cur", ".sending-stale"))
        queue = self.make_queue()
        self.assertEqual(
            self.successResultOf(queue.import_zope_sendmail(self.zope, xverp=False)), 1
        )
        self.assertEqual([e.origin for e in queue.envelopes()], ["zope.sendmail:stale"])
        self.assertEqual(self.zope_files(), ["new/.sending-live", "new/live"])

    def test_claimed_while_importing(self) -> None:
        """
        While a file is being imported it carries zope.sendmail's own claim,
        so a zope.sendmail processor still running skips it.
        """
        write_zope(
            self.zope,
            "new/m",
            b"X-Zope-From: dev@groups.example.com\nX-Zope-To: a@example.org\n" + MESSAGE,
            self.now - 10,
        )
        sync = ManualSync()
        queue = self.make_queue(sync=sync)
        d = queue.import_zope_sendmail(self.zope, xverp=False)
        sync.finish()  # the listing
        sync.finish()  # the claim
        self.assertEqual(self.zope_files(), ["new/.sending-m", "new/m"])
        claim = os.stat(os.path.join(self.zope, "new", ".sending-m"))
        self.assertAlmostEqual(claim.st_mtime, self.now, delta=1)
        sync.finish_all()
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(self.zope_files(), [])

    def test_not_zope(self) -> None:
        """
        A file without the X-Zope lines (or without recipients) is logged
        and left in place, and the others are imported.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        write_zope(self.zope, "new/plain", MESSAGE, self.now - 30)
        write_zope(self.zope, "new/nobody", b"X-Zope-From: a@b\nX-Zope-To: \n\n", self.now - 20)
        write_zope(
            self.zope,
            "new/ok",
            b"X-Zope-From: dev@groups.example.com\nX-Zope-To: a@example.org\n" + MESSAGE,
            self.now - 10,
        )
        queue = self.make_queue()
        self.assertEqual(
            self.successResultOf(queue.import_zope_sendmail(self.zope, xverp=False)), 1
        )
        self.assertEqual(self.zope_files(), ["new/nobody", "new/plain"])
        errors = [e["path"] for e in events if e["log_level"] is LogLevel.error]
        self.assertEqual(
            sorted(errors), sorted(os.path.join(self.zope, "new", n) for n in ("nobody", "plain"))
        )

    def test_interrupted(self) -> None:
        """
        An import killed after the message was queued but before the file
        was removed does not queue it twice: the next import recognises it
        and only removes the file.
        """
        write_zope(
            self.zope,
            "new/m",
            b"X-Zope-From: dev@groups.example.com\nX-Zope-To: a@example.org\n" + MESSAGE,
            self.now - 10,
        )
        # listing: no calls; claim: touch, link; enqueue: 12 calls; then the unlink.
        ops = RecordingOps(self.directory, crash_at=2 + len(ENQUEUE_CALLS) + 1)
        queue = OutboundQueue(self.directory, clock=self.clock, file_ops=ops)
        queue.load()
        self.assertEqual(
            self.successResultOf(queue.import_zope_sendmail(self.zope, xverp=False)), 0
        )
        self.assertEqual(ops.calls[-1], ("fsync-dir", "env"))
        self.successResultOf(queue.close())
        self.clock.advance(4 * 3600)  # the dead import's claim is stale now
        queue = self.make_queue()
        self.assertEqual(len(queue.envelopes()), 1)
        self.assertEqual(
            self.successResultOf(queue.import_zope_sendmail(self.zope, xverp=False)), 0
        )
        self.assertEqual(len(queue.envelopes()), 1)
        self.assertEqual(self.zope_files(), [])

    def test_unlink_fails(self) -> None:
        """
        When the imported file cannot be removed, the message is taken off
        the queue again (else the next import would queue it a second time
        once it was delivered): the file stays, unclaimed, for a later import.
        """
        write_zope(
            self.zope,
            "new/m",
            b"X-Zope-From: dev@groups.example.com\nX-Zope-To: a@example.org\n" + MESSAGE,
            self.now - 10,
        )
        ops = RecordingOps(self.directory, fail="unlink ../mailqueue/new/m")
        queue = self.make_queue(ops=ops)
        self.assertEqual(
            self.successResultOf(queue.import_zope_sendmail(self.zope, xverp=False)), 0
        )
        self.assertEqual(queue.envelopes(), [])
        self.assertEqual((self.listing("env"), self.listing("data")), ([], []))
        self.assertEqual(self.zope_files(), ["new/m"])

    def test_no_queue(self) -> None:
        """
        A queue path that does not exist fails with C{FileNotFoundError}
        (a mistyped C{queuepath} is not "nothing to import").
        """
        queue = self.make_queue()
        d = queue.import_zope_sendmail(os.path.join(self.root, "nope"), xverp=False)
        self.failureResultOf(d, FileNotFoundError)


class ThreadTests(TestCase):
    """
    The queue with the service's real hand-off: the reactor's thread pool.
    """

    async def test_thread_pool(self) -> None:
        """
        Messages queued, updated and removed through worker threads are on
        disk when the Deferreds fire.
        """
        directory = self.mktemp()

        def sync(f: Callable[[], None]) -> Deferred[None]:
            pool = reactor.getThreadPool()  # type: ignore[attr-defined]
            return deferToThreadPool(reactor, pool, f)  # type: ignore[arg-type]

        queue = OutboundQueue(directory, clock=reactor, sync=sync)  # type: ignore[arg-type]
        queue.load()
        try:
            envelopes = [
                await queue.enqueue("", [f"m{n}@example.org"], MESSAGE * n) for n in range(1, 6)
            ]
            self.assertEqual(read_queue(directory), envelopes)
            envelopes[0].recipients[0].state = DELIVERED
            await queue.update(envelopes[0])
            await queue.remove(envelopes[0].id)
            self.assertEqual(read_queue(directory), envelopes[1:])
        finally:
            await queue.close()

    async def test_serial_thread_for_journals(self) -> None:
        """
        With the service's journal hand-off (a L{SerialThread}) beside the
        thread pool, recorded outcomes are on disk when the Deferreds fire,
        and the message is removed once done.
        """
        directory = self.mktemp()

        def sync(f: Callable[[], None]) -> Deferred[None]:
            pool = reactor.getThreadPool()  # type: ignore[attr-defined]
            return deferToThreadPool(reactor, pool, f)  # type: ignore[arg-type]

        journal = SerialThread(reactor, "test-journal")  # type: ignore[arg-type]
        self.addCleanup(journal.stop)
        queue = OutboundQueue(
            directory,
            clock=reactor,  # type: ignore[arg-type]
            sync=sync,
            journal_sync=journal,
        )
        queue.load()
        try:
            envelope = await queue.enqueue("", [f"m{n}@example.org" for n in range(3)], MESSAGE)
            for r in envelope.recipients:
                r.state = DELIVERED
            await gatherResults([queue.record(envelope, [r]) for r in envelope.recipients])
            self.assertEqual(
                [r.state for r in read_queue(directory)[0].recipients], [DELIVERED] * 3
            )
            await queue.remove(envelope.id)
            self.assertEqual(read_queue(directory), [])
        finally:
            await queue.close()
