# -*- test-case-name: tests.integration.test_workers -*-
"""
gsmail with inbound worker processes (C{inbound_workers = 2}), end to end:
real sockets on 127.0.0.1, real worker processes, smtplib clients in
threads. Each test asserts what a sender sees (replies), what the groups got
(the embedded stand-in's posts), what the log shows (worker events relayed by
the main process) and what is left behind (processes, ports, spool files,
socket files).

Every wait is bounded: L{tests.util.eventually} polls the real reactor for
a bounded time, and every client socket has a timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from gsmail.service import GsmailService
from tests.integration.clients import CLIENT_TIMEOUT, EXAMPLE, SENDER, make_message
from tests.util import (
    TOKEN,
    Child,
    bounded,
    eventually,
    free_port,
    make_config,
    port_of,
    spawn_gsmail,
    start_service,
)

#: The Message-ID in a delivery event's C{message_id} field: C{<x@example.org>}.
MESSAGE_ID = re.compile(r"<(?P<id>.*)>")

_T = TypeVar("_T")


# -- helpers -------------------------------------------------------------------


def in_parallel(calls: Sequence[Callable[[], _T]]) -> list[_T]:
    """
    Run every call at once, each in a thread of its own (blocking; run it
    with C{deferToThread}), and return their results in order. The reactor's
    pool has 10 threads, too few for the concurrency these tests want.
    """
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


def send(port: int | str, message_id: str, *, lmtp: bool = False) -> dict[str, Any]:
    """
    Send one message to the C{example} group over ESMTP, or LMTP (C{port}
    a TCP port on 127.0.0.1, or for LMTP a UNIX socket path); blocking.

    @return: smtplib's refused recipients (C{{}}: all accepted).
    """
    client: smtplib.SMTP
    if lmtp and isinstance(port, str):
        client = smtplib.LMTP(port, timeout=CLIENT_TIMEOUT)
    elif lmtp:
        client = smtplib.LMTP("127.0.0.1", int(port), timeout=CLIENT_TIMEOUT)
    else:
        client = smtplib.SMTP("127.0.0.1", int(port), timeout=CLIENT_TIMEOUT)
    with client:
        return client.sendmail(SENDER, [EXAMPLE], make_message(message_id))


def message_ids(posts: list[bytes]) -> list[str]:
    """The Message-ID of each post, in order."""
    found = []
    for post in posts:
        match = re.search(rb"^Message-ID: <([^>]*)>$", post, re.MULTILINE | re.IGNORECASE)
        found.append(match.group(1).decode("ascii") if match else "")
    return found


def refused(port: int) -> bool:
    """Whether connecting to C{port} on 127.0.0.1 is refused (blocking)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT):
            return False
    except ConnectionRefusedError:
        return True


def running(pid: int) -> bool:
    """Whether process C{pid} exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@implementer(ILogObserver)
class Events:
    """Log events seen by the global log publisher while a test runs."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    @staticmethod
    def text(event: LogEvent) -> str:
        """What a log file shows for C{event} (relayed: the worker's text)."""
        if "gsmail_worker" in event:
            return str(event["gsmail_text"])
        return formatEvent(event)

    def relayed(self) -> list[LogEvent]:
        """The events relayed from worker processes."""
        return [e for e in self.events if "gsmail_worker" in e]

    def main(self) -> list[LogEvent]:
        """The events of the main process itself."""
        return [e for e in self.events if "gsmail_worker" not in e]

    def deliveries(self, events: list[LogEvent]) -> list[LogEvent]:
        """
        The delivery events (L{gsmail.maillog.delivery}) among C{events}: from
        a worker, their fields are relayed with the text.
        """
        return [e for e in events if e.get("gsmail_event") == "delivery"]

    @staticmethod
    def message_id(event: LogEvent) -> str:
        """The Message-ID (without angle brackets) of a delivery event."""
        found = MESSAGE_ID.fullmatch(event["message_id"])
        assert found is not None, event["message_id"]
        return found["id"]

    def errors(self) -> list[str]:
        """The text of every error or critical event, main process or worker."""
        bad = (LogLevel.error, LogLevel.critical)
        return [self.text(e) for e in self.events if e.get("log_level") in bad]


class InboundWorkerTests(TestCase):
    """gsmail with two inbound worker processes, over real sockets."""

    def setUp(self) -> None:
        self.log = Events()
        globalLogPublisher.addObserver(self.log)
        # Added first, so removed last: after the service's own cleanup.
        self.addCleanup(globalLogPublisher.removeObserver, self.log)

    async def start(self, **overrides: Any) -> GsmailService:
        """A running service with two workers that are accepting."""
        self.config = make_config(self.mktemp(), inbound_workers=2, **overrides)
        service = start_service(self, self.config)
        await bounded(service.workers.when_ready())
        return service

    async def relayed_deliveries(self, count: int) -> None:
        """Wait until C{count} delivery lines came from the workers."""
        await eventually(
            lambda: len(self.log.deliveries(self.log.relayed())) >= count,
            f"{count} delivery lines from the workers",
        )

    async def test_concurrent_mail_posted_once_by_workers(self) -> None:
        """
        Mail sent over many ESMTP connections at once and over LMTP is
        posted once per message, and the log shows the worker processes
        delivered all of it and the main process none.
        """
        service = await self.start()
        pids = service.workers.pids()
        self.assertEqual(len(set(pids)), 2)
        self.assertNotIn(os.getpid(), pids)
        smtp, lmtp = port_of(service, "smtp"), port_of(service, "lmtp")

        def connection(n: int) -> Callable[[], list[dict[str, Any]]]:
            ids = [f"smtp-{n}-{i}@example.org" for i in range(2)]
            return lambda: [send(smtp, message_id) for message_id in ids]

        calls = [connection(n) for n in range(12)]
        calls += [
            partial(lambda n: [send(lmtp, f"lmtp-{n}@example.org", lmtp=True)], n) for n in range(3)
        ]
        answers = await deferToThread(in_parallel, calls)
        self.assertEqual(answers, [[{}, {}]] * 12 + [[{}]] * 3)

        sent = {f"smtp-{n}-{i}@example.org" for n in range(12) for i in range(2)}
        sent |= {f"lmtp-{n}@example.org" for n in range(3)}
        posted = message_ids(service.standin.posts("example"))
        self.assertEqual(sorted(posted), sorted(sent))

        # Workers send info lines in batches, a moment after the fact.
        await self.relayed_deliveries(len(sent))
        relayed = self.log.deliveries(self.log.relayed())
        self.assertEqual(sorted(map(self.log.message_id, relayed)), sorted(sent))
        # The fields came through the relay with the text, which was made from them.
        self.assertEqual(
            {(e["status"], e["reply"]) for e in relayed}, {("sent", "Added to the group")}
        )
        for e in relayed:
            self.assertIn(f"{e['queue_id']}: to=<{e['recipient']}>, group=", e["gsmail_text"])
        self.assertEqual(self.log.deliveries(self.log.main()), [])
        workers = {e["gsmail_worker"] for e in relayed}
        self.assertLessEqual(workers, {1, 2})
        self.assertTrue(
            all(
                e["log_system"].startswith(f"inbound-{e['gsmail_worker']} ")
                for e in self.log.relayed()
            )
        )

    async def test_same_message_concurrently_posted_once(self) -> None:
        """
        The same message (one Message-ID) sent over eight connections at
        the same moment, whichever workers take them, is posted once, and
        every sender is told 250 (delivered).
        """
        service = await self.start()
        smtp = port_of(service, "smtp")
        message = make_message("same@example.org")
        start_data = threading.Barrier(8, timeout=CLIENT_TIMEOUT)

        def sender() -> int:
            with smtplib.SMTP("127.0.0.1", smtp, timeout=CLIENT_TIMEOUT) as client:
                client.ehlo()
                self.assertEqual(client.mail(SENDER)[0], 250)
                self.assertEqual(client.rcpt(EXAMPLE)[0], 250)
                start_data.wait()
                code, _ = client.data(message)
                return code

        codes = await deferToThread(in_parallel, [sender] * 8)
        self.assertEqual(codes, [250] * 8)
        self.assertEqual(message_ids(service.standin.posts("example")), ["same@example.org"])

    async def test_killed_worker_replaced(self) -> None:
        """
        A worker killed with SIGKILL is logged as an error by the main
        process and replaced by a new process; mail sent while its slot is
        empty is delivered by the other worker, and mail sent after the
        restart is delivered too.
        """
        service = await self.start()
        workers = service.workers
        workers.restart_delay = (2.0, 30.0)  # a window in which the slot is surely empty
        smtp = port_of(service, "smtp")
        before = workers.pids()
        victim = before[0]
        os.kill(victim, signal.SIGKILL)

        def killed() -> list[LogEvent]:
            return [
                e
                for e in self.log.main()
                if "was killed by signal 9" in self.log.text(e)
                and f"pid {victim}" in self.log.text(e)
            ]

        await eventually(lambda: bool(killed()), "the main process to log the kill")
        [event] = killed()
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertEqual(workers.pids(), before[1:])

        self.assertEqual(await deferToThread(send, smtp, "while-down@example.org"), {})
        await eventually(lambda: len(workers.pids()) == 2, "a new worker process")
        await bounded(workers.when_ready())
        [new] = set(workers.pids()) - set(before)
        self.assertNotIn(new, (victim, os.getpid()))

        self.assertEqual(await deferToThread(send, smtp, "after@example.org"), {})
        self.assertEqual(
            message_ids(service.standin.posts("example")),
            ["while-down@example.org", "after@example.org"],
        )

    async def test_all_workers_killed_mail_waits_in_backlog(self) -> None:
        """
        With every worker killed, a connection is not refused: it waits in
        the listening socket's backlog until the new workers start, and its
        message is posted.
        """
        service = await self.start()
        workers = service.workers
        workers.restart_delay = (1.0, 30.0)
        smtp = port_of(service, "smtp")
        before = workers.pids()
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        await eventually(lambda: workers.pids() == [], "both workers to be seen dead")

        self.assertEqual(await deferToThread(send, smtp, "backlog@example.org"), {})
        self.assertEqual(message_ids(service.standin.posts("example")), ["backlog@example.org"])
        await eventually(
            lambda: len(set(workers.pids()) - set(before)) == 2, "two new worker processes"
        )
        kills = [t for t in map(self.log.text, self.log.main()) if "was killed by signal 9" in t]
        self.assertEqual(len(kills), 2)

    async def test_stop_ends_workers_and_closes_everything(self) -> None:
        """
        Stopping gsmail ends every worker process, the ports refuse
        connections, the spool directory is empty, and stopping again is
        harmless.
        """
        service = await self.start()
        smtp, lmtp = port_of(service, "smtp"), port_of(service, "lmtp")
        self.assertEqual(await deferToThread(send, smtp, "before-stop@example.org"), {})
        self.assertEqual(await deferToThread(send, lmtp, "lmtp@example.org", lmtp=True), {})
        pids = service.workers.pids()
        self.assertEqual(len(pids), 2)

        await bounded(service.stopService())
        await eventually(
            lambda: not any(running(pid) for pid in pids), "the worker processes to end"
        )
        self.assertEqual(service.workers.pids(), [])
        # A stopping worker sends its last log lines before it exits.
        self.assertEqual(
            sorted(map(self.log.message_id, self.log.deliveries(self.log.relayed()))),
            ["before-stop@example.org", "lmtp@example.org"],
        )
        self.assertTrue(await deferToThread(refused, smtp))
        self.assertTrue(await deferToThread(refused, lmtp))
        self.assertEqual(os.listdir(self.config.spool_dir), [])
        await bounded(service.stopService())  # the test's cleanup stops it a third time
        self.assertEqual(self.log.errors(), [])

    async def test_token_not_given_to_workers_in_the_clear(self) -> None:
        """
        The GroupServer token is in no worker's command line or
        environment, nor in any line of the log.
        """
        service = await self.start()
        self.assertEqual(
            await deferToThread(send, port_of(service, "smtp"), "token@example.org"), {}
        )
        for pid in service.workers.pids():
            for name in ("cmdline", "environ"):
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    self.assertNotIn(TOKEN.encode("ascii"), f.read(), f"/proc/{pid}/{name}")
        texts = [self.log.text(e) for e in self.log.events]
        await self.relayed_deliveries(1)
        self.assertEqual([t for t in texts if TOKEN in t], [])

    async def test_lmtp_unix_socket(self) -> None:
        """
        LMTP on a UNIX socket served by workers: mail is posted, the socket
        file keeps mode 0660, and once gsmail stops the file is gone and no
        error was logged.
        """
        directory = tempfile.mkdtemp(dir="/tmp", prefix="gsw-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "lmtp")
        service = await self.start(lmtp_endpoint=f"unix:{path}:mode=660", smtp_endpoint="")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o660)

        answers = await deferToThread(
            in_parallel,
            [partial(send, path, f"unix-{n}@example.org", lmtp=True) for n in range(4)],
        )
        self.assertEqual(answers, [{}] * 4)
        self.assertEqual(
            sorted(message_ids(service.standin.posts("example"))),
            [f"unix-{n}@example.org" for n in range(4)],
        )
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o660)
        await self.relayed_deliveries(4)

        await bounded(service.stopService())
        self.assertFalse(os.path.exists(path))
        self.assertEqual(self.log.errors(), [])

    async def test_worker_failure_relayed_with_traceback(self) -> None:
        """
        A worker that cannot start (its ledger directory is a file) has its
        failure (critical, with its traceback) in the log under its number; the main process
        logs its exit and keeps starting it until it can, and then that
        worker serves mail again.
        """
        service = await self.start()
        workers = service.workers
        workers.restart_delay = (0.2, 0.4)
        ledger_dir = os.path.dirname(self.config.ledger_path)
        os.rename(ledger_dir, ledger_dir + ".away")
        with open(ledger_dir, "wb"):
            pass
        [victim, other] = workers.pids()
        os.kill(victim, signal.SIGKILL)

        def failures() -> list[LogEvent]:
            return [
                e
                for e in self.log.relayed()
                if e["gsmail_worker"] == 1 and "could not start" in e["gsmail_text"]
            ]

        await eventually(lambda: bool(failures()), "the worker's failure to start")
        await eventually(
            lambda: any("exited with status 1" in self.log.text(e) for e in self.log.main()),
            "the main process to log the worker's exit",
        )
        event = failures()[0]
        self.assertEqual(event["log_level"], LogLevel.critical)
        self.assertTrue(event["log_system"].startswith("inbound-1 "))
        self.assertIn("Traceback", event["gsmail_text"])
        self.assertIn("FileExistsError", event["gsmail_text"])

        os.remove(ledger_dir)
        os.rename(ledger_dir + ".away", ledger_dir)
        await bounded(workers.when_ready())
        self.assertEqual(len(workers.pids()), 2)
        self.assertIn(other, workers.pids())
        answers = await deferToThread(
            in_parallel,
            [partial(send, port_of(service, "smtp"), f"back-{n}@example.org") for n in range(6)],
        )
        self.assertEqual(answers, [{}] * 6)
        self.assertEqual(len(service.standin.posts("example")), 6)


def children(pid: int) -> list[int]:
    """The processes whose parent is C{pid} (Linux /proc; blocking)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(name))
    return found


def alive(pid: int) -> bool:
    """Whether C{pid} exists and is not a zombie (a dead worker init has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def hold_stdin(main_pid: int, worker_pid: int) -> int:
    """
    Open another write end of a worker's standard input pipe (through the
    main process's descriptor in /proc), as a descriptor leaked into some
    other process would: the worker then sees no end of input when the
    main process dies. The caller closes the returned descriptor.
    """
    target = os.readlink(f"/proc/{worker_pid}/fd/0")
    for fd in os.listdir(f"/proc/{main_pid}/fd"):
        try:
            if os.readlink(f"/proc/{main_pid}/fd/{fd}") == target:
                return os.open(f"/proc/{main_pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue
    raise AssertionError(f"no write end of worker {worker_pid}'s standard input")


class MainProcessKilledTests(TestCase):
    """
    The real command, C{twistd -n gsmail} with C{inbound_workers = 2}, killed
    with SIGKILL: its workers must not keep the port, so gsmail started again
    at once binds it and delivers.
    """

    timeout = 180
    #: How many times the main process is killed and started again.
    KILLS = 3

    def write_config(self, directory: str, port: int) -> str:
        path = os.path.join(directory, "gsconfig.ini")
        with open(path, "w") as f:
            f.write(
                f"[webservice-default]\ntoken = {TOKEN}\n"
                "[gsmail-default]\nurl = embedded\n"
                f"smtp_endpoint = tcp:{port}:interface=127.0.0.1\n"
                "inbound_workers = 2\n"
                "hostname = mx.groups.example.com\ndomains = groups.example.com\n"
                "standin_groups = example\nledger_path = ledger/posted.log\n"
                "spool_dir = spool\nstandin_dir = standin\n"
            )
        return path

    async def start_gsmail(self, directory: str, config: str, *, ready: bool = True) -> Child:
        """
        Run C{twistd -n gsmail}; return it once both workers accept
        (C{ready}), or once both worker processes exist. Fails if it cannot
        bind the port. The cleanup kills it and what is left of its process
        group (its workers) with SIGKILL.
        """
        child = await spawn_gsmail(self, directory, config, signal.SIGKILL)

        def started() -> bool:
            if child.ended.called:
                raise AssertionError("gsmail did not start:\n" + child.output)
            if ready:
                return child.output.count(") accepting") >= 2
            return len(children(child.pid)) >= 2

        await eventually(started, "both workers", timeout=30)
        return child

    async def kill_main(self, child: Child, workers: list[int]) -> None:
        """SIGKILL the main process; its C{workers} must end within five seconds."""
        child.signal(signal.SIGKILL)
        await bounded(child.ended)
        await eventually(
            partial(lambda pids: not any(alive(pid) for pid in pids), workers),
            f"workers {workers} to end after the main process was killed",
            timeout=5,
        )

    async def test_sigkill_main_process(self) -> None:
        """
        Three times: gsmail runs with two workers and delivers a message;
        its main process is killed with SIGKILL; both workers are gone
        within five seconds; gsmail started again at once on the same port
        binds it ("Address already in use" never appears) and delivers the
        next message. Then the same with the kill landing while the workers
        are still starting (holding the inherited sockets, not yet
        watching their standard input), and once with the workers' standard
        input held open by another process (no end of input comes: the
        parent-death signal alone must stop them).
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = free_port()
        config = self.write_config(directory, port)
        child = await self.start_gsmail(directory, config)
        sent = []
        for kill in range(self.KILLS):
            sent.append(f"kill-{kill}@example.org")
            self.assertEqual(await deferToThread(send, port, sent[-1]), {})
            workers = children(child.pid)
            self.assertEqual(len(workers), 2, workers)
            await self.kill_main(child, workers)
            child = await self.start_gsmail(directory, config)
            self.assertNotIn("Address already in use", child.output)

        for _ in range(self.KILLS):
            await self.kill_main(child, children(child.pid))
            child = await self.start_gsmail(directory, config, ready=False)
            self.assertNotIn("Address already in use", child.output)
        await self.kill_main(child, children(child.pid))
        child = await self.start_gsmail(directory, config)

        # Standard input held open elsewhere: only PR_SET_PDEATHSIG tells
        # the workers their main process died.
        workers = children(child.pid)
        for pid in workers:
            self.addCleanup(os.close, hold_stdin(child.pid, pid))
        await self.kill_main(child, workers)
        child = await self.start_gsmail(directory, config)

        sent.append("last@example.org")
        self.assertEqual(await deferToThread(send, port, sent[-1]), {})
        new = os.path.join(directory, "standin", "groups", "example", "new")
        posted = []
        for name in os.listdir(new):
            with open(os.path.join(new, name), "rb") as f:
                posted.append(f.read())
        self.assertEqual(sorted(message_ids(posted)), sorted(sent))
        child.signal(signal.SIGTERM)
        await bounded(child.ended, 30)
