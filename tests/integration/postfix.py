# -*- test-case-name: tests.integration.test_postfix -*-
"""
A private Postfix instance for one test: its own configuration, queue and
data directories and log file in a temporary directory, smtpd on a free port
of 127.0.0.1, and the site's mail domain handed over LMTP to gsmail, as
C{conf/postfix/main.cf.example} describes.

The system Postfix is neither used nor needed, and C{/etc/postfix} is not
touched: run as root, C{postfix -c DIR start} accepts a configuration
directory that C{alternate_config_directories} in the default C{main.cf} does
not list (checked with Postfix 3.7.11). The set-gid commands
(C{postdrop}/C{postqueue}) would want it listed; the tests use neither, they
submit over SMTP.

Every Postfix command runs as a child process of the reactor, bounded in
time, so the reactor keeps serving gsmail meanwhile. The instance is stopped
in the test's cleanup, also when the test fails, and no Postfix process of it
is left behind.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import smtplib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import attrs
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from tests import postfixconf
from tests.util import DOMAIN, free_port, require_tool

__all__ = ["Delivery", "PrivatePostfix", "ProcessResult", "run_process"]

#: The longest any one Postfix command (start, stop) may take, in seconds.
#: C{postfix start} creates the queue directories (about 2 s) and waits for
#: the master to initialise; C{postfix stop} waits up to 5 s for it to exit.
COMMAND_TIMEOUT: Final = 30.0

#: The longest a test waits for a delivery status in the log, in seconds.
#: A deferred message is retried after 1-2 s with the timers set here.
STATUS_TIMEOUT: Final = 30.0

#: How often the log and the process table are polled, in seconds.
POLL_INTERVAL: Final = 0.1

# One delivery attempt's log line, as Postfix's delivery agents write it:
# "QUEUEID: to=<rcpt>, [orig_to=<...>, ]relay=..., dsn=X.Y.Z, status=word (text)".
_DELIVERY_LINE: Final = re.compile(
    r"postfix/(?P<agent>[\w-]+)\[\d+\]: (?P<queue_id>[0-9A-Za-z]+): to=<(?P<recipient>[^>]*)>,"
    r".*? relay=(?P<relay>[^,]*),.*? dsn=(?P<dsn>\d\.\d{1,3}\.\d{1,3}),"
    r" status=(?P<status>\w+) \((?P<text>.*)\)$"
)


def _global_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@attrs.frozen
class ProcessResult:
    """
    What a finished child process left.

    @ivar argv: the command line.
    @ivar code: the exit status, or C{None} when it was ended by a signal.
    @ivar output: standard output and standard error, in arrival order.
    """

    argv: tuple[str, ...]
    code: int | None
    output: bytes

    def describe(self) -> str:
        """The command, its exit status and its output, for a test's failure message."""
        text = self.output.decode("utf-8", "replace").strip()
        return f"{' '.join(self.argv)} exited with {self.code}: {text or '(no output)'}"


class _Collector(ProcessProtocol):
    """Gathers a child's output and fires when it has ended and its pipes closed."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[int | None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        code = value.exitCode if isinstance(value, error.ProcessTerminated) else 0
        self.ended.callback(code)


async def run_process(
    argv: Sequence[str], timeout: float = COMMAND_TIMEOUT, reactor: Any = None
) -> ProcessResult:
    """
    Run a command without blocking the reactor; its stdin is closed.

    @param argv: the program's absolute path, then its arguments.
    @param timeout: seconds before the child is killed (SIGKILL, by its own
        process id) and L{AssertionError} raised; it is always reaped first,
        so no process outlives the test.
    @raise AssertionError: the command ran longer than C{timeout}.
    """
    reactor = reactor or _global_reactor()
    collector = _Collector()
    transport = reactor.spawnProcess(
        collector, argv[0], list(argv), env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"}
    )
    transport.closeStdin()
    killer = reactor.callLater(timeout, transport.signalProcess, "KILL")
    code = await collector.ended
    if killer.active():
        killer.cancel()
        return ProcessResult(tuple(argv), code, bytes(collector.output))
    raise AssertionError(
        f"{' '.join(argv)} did not finish within {timeout} s and was killed; "
        f"output: {bytes(collector.output).decode('utf-8', 'replace')}"
    )


@attrs.frozen
class Delivery:
    """
    One delivery attempt for one recipient, from Postfix's log.

    @ivar queue_id: Postfix's queue id of the message.
    @ivar recipient: the envelope recipient.
    @ivar agent: the delivery agent (C{lmtp}, C{discard}, ...).
    @ivar relay: where it went: C{MYHOSTNAME[/path/of/lmtp.sock]} for LMTP on
        a UNIX socket, C{127.0.0.1[127.0.0.1]:PORT} on TCP, C{none} when
        Postfix did not connect.
    @ivar dsn: the RFC 3463 status code Postfix recorded, e.g. C{"4.5.0"}.
    @ivar status: C{sent}, C{deferred}, C{bounced}, C{undeliverable}, ...
    @ivar text: the explanation in parentheses: for LMTP, the reply of the
        server (gsmail), e.g. C{"250 2.0.0 Added to the group"}.
    @ivar line: the whole log line.
    """

    queue_id: str
    recipient: str
    agent: str
    relay: str
    dsn: str
    status: str
    text: str
    line: str


class PrivatePostfix:
    """
    A Postfix instance of the test's own, delivering the site's domain over
    LMTP.

    Use: create it (this makes its directory and picks its port), start gsmail
    (e.g. listening on L{path}C{("lmtp.sock")}), then L{start} with the LMTP
    destination, L{send} mail to smtpd and wait for the log line of the
    delivery (L{attempt}, L{wait_for}).

    @ivar directory: the instance's directory, short (under C{/tmp}) so that
        UNIX socket paths inside it stay well below the 108-byte limit, and
        world-searchable (mode 0755) since Postfix's processes run as the
        C{postfix} user. Removed in the test's cleanup.
    @ivar port: smtpd's TCP port on 127.0.0.1. Chosen by binding a socket to
        port 0 and closing it again; another process could take the port in
        between, in which case L{start} fails with Postfix's message (run
        the test again).
    @ivar maillog: Postfix's log file (C{maillog_file}, written by the
        C{postlog} service); delivery status lines are read from it.
    """

    def __init__(self, test: TestCase, domains: Sequence[str] = (DOMAIN,)) -> None:
        """
        @param test: the test the instance belongs to: the directory is
            removed, and the instance stopped, in its cleanup.
        @param domains: C{virtual_mailbox_domains}: the domains handed to gsmail.
        """
        self._postfix = require_tool("postfix", "/usr/sbin/postfix")
        _require_root_and_postfix_user()
        self._test = test
        self._domains = tuple(domains)
        self._reactor = _global_reactor()
        self._running = False
        self.directory = tempfile.mkdtemp(prefix="gsmail-pf-", dir="/tmp")
        os.chmod(self.directory, 0o755)
        test.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        self.config_directory = os.path.join(self.directory, "etc")
        self.queue_directory = os.path.join(self.directory, "queue")
        self.data_directory = os.path.join(self.directory, "data")
        self.maillog = os.path.join(self.directory, "maillog")
        self.port = free_port()

    def __repr__(self) -> str:
        return f"<PrivatePostfix {self.directory} smtpd 127.0.0.1:{self.port}>"

    def path(self, name: str) -> str:
        """A file name inside the instance's directory (e.g. for gsmail's LMTP socket)."""
        return os.path.join(self.directory, name)

    def main_cf(self, transport: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """
        The parameters of the instance's C{main.cf}.

        @param transport: C{virtual_transport}, e.g. C{lmtp:unix:/path} or
            C{lmtp:inet:127.0.0.1:2424}.
        @param extra: parameters added or replaced (e.g. recipient restrictions).
        """
        params = postfixconf.main_cf(self.directory, "postfix.test.invalid")
        params.update(
            {
                "mydomain": "test.invalid",
                "myorigin": "$myhostname",
                "append_dot_mydomain": "no",
                # As conf/postfix/main.cf.example: the site's domain goes to gsmail.
                "virtual_mailbox_domains": " ".join(self._domains),
                "virtual_transport": transport,
                "lmtp_data_done_timeout": "600s",
                "smtputf8_enable": "yes",
                # Nothing leaves the machine: bounce notices to senders are discarded
                # (still logged: status=sent (no outbound mail in tests)).
                "default_transport": "discard:no outbound mail in tests",
                "relay_transport": "discard:no outbound mail in tests",
                "lmtp_dns_support_level": "disabled",
                "lmtp_host_lookup": "native",
                # Deferred mail is retried within seconds, not minutes. Not 1 s:
                # qmgr then scans a deferred message while the delivery agent
                # still has its queue file ("skipped, still being delivered") and
                # leaves it in the active queue until qmgr restarts (seen in CI).
                "queue_run_delay": "1s",
                "minimal_backoff_time": "3s",
                "maximal_backoff_time": "4s",
            }
        )
        params.update(extra or {})
        return params

    def master_cf(self) -> str:
        """
        The instance's C{master.cf}: smtpd on L{port}, the services a
        delivery over LMTP needs, the C{postlog} service for C{maillog_file},
        and no chroot anywhere (fifth column C{n}).
        """
        return postfixconf.master_cf(self.port)

    async def start(self, transport: str, extra: Mapping[str, str] | None = None) -> None:
        """
        Write the configuration and start Postfix (C{postfix -c DIR start}).
        The instance is stopped in the test's cleanup from here on, even when
        starting fails half-way.

        @param transport: C{virtual_transport}, see L{main_cf}.
        @param extra: more C{main.cf} parameters, see L{main_cf}.
        @raise AssertionError: Postfix did not start; the message has its
            output and the log.
        """
        postfixconf.directories(self.directory)
        postfixconf.write(self.config_directory, self.main_cf(transport, extra), self.master_cf())
        self._running = True
        self._test.addCleanup(lambda: Deferred.fromCoroutine(self.stop()))
        result = await self._command("start")
        if result.code != 0:
            raise AssertionError(f"Postfix did not start: {result.describe()}\n{self.log_tail()}")

    async def stop(self) -> None:
        """
        Stop the instance (C{postfix stop}, else C{postfix abort}) and wait
        until none of its processes runs any more; kill them (by the master's
        process group) if they outlive L{COMMAND_TIMEOUT}. Does nothing when
        not running.
        """
        if not self._running:
            return
        self._running = False
        group = self._master_pid()
        result = await self._command("stop")
        if result.code != 0:
            await self._command("abort")
        if group is None:
            return
        deadline = self._reactor.seconds() + COMMAND_TIMEOUT
        while _process_group_alive(group):
            if self._reactor.seconds() > deadline:
                # The master made this group (setsid): every member is ours.
                os.killpg(group, signal.SIGKILL)
                raise AssertionError(f"Postfix processes outlived 'postfix stop'; killed {group}")
            await deferLater(self._reactor, POLL_INTERVAL, lambda: None)

    async def _command(self, *args: str) -> ProcessResult:
        return await run_process(
            [self._postfix, "-c", self.config_directory, *args], reactor=self._reactor
        )

    def _master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.queue_directory, "pid", "master.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    # -- the log ---------------------------------------------------------------

    def log_text(self) -> str:
        """The whole log so far (small: a test's worth of lines)."""
        try:
            with open(self.maillog, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the log, for a failure message."""
        tail = self.log_text().splitlines()[-lines:]
        return "Postfix log (last lines):\n" + "\n".join(tail)

    def deliveries(self, recipient: str | None = None) -> list[Delivery]:
        """
        Every delivery attempt logged so far, in order; only those for
        C{recipient} (compared without regard to case) when given.
        """
        found = []
        for line in self.log_text().splitlines():
            match = _DELIVERY_LINE.search(line)
            if match is None:
                continue
            if recipient is not None and match["recipient"].lower() != recipient.lower():
                continue
            found.append(
                Delivery(
                    queue_id=match["queue_id"],
                    recipient=match["recipient"],
                    agent=match["agent"],
                    relay=match["relay"],
                    dsn=match["dsn"],
                    status=match["status"],
                    text=match["text"],
                    line=line,
                )
            )
        return found

    async def attempt(
        self, recipient: str, number: int = 1, timeout: float = STATUS_TIMEOUT
    ) -> Delivery:
        """
        Wait for the C{number}th delivery attempt for C{recipient} (1 = the
        first), whatever its status, so a test fails as soon as Postfix
        logged an unexpected outcome instead of waiting for one that will not
        come.

        @param timeout: seconds to wait at most.
        @raise AssertionError: fewer attempts within C{timeout}; the message
            has the attempts seen and the end of the log.
        """
        return await self._wait(recipient, lambda attempts: attempts[number - 1 : number], timeout)

    async def wait_for(
        self, recipient: str, status: str, timeout: float = STATUS_TIMEOUT
    ) -> Delivery:
        """
        Wait until the log has a delivery attempt for C{recipient} with
        C{status} (C{sent}, C{bounced}, C{deferred}, C{deliverable}, ...).

        @param timeout: seconds to wait at most.
        @return: the first such attempt.
        @raise AssertionError: none within C{timeout}; the message has the
            attempts seen for C{recipient} and the end of the log.
        """
        return await self._wait(
            recipient, lambda attempts: [a for a in attempts if a.status == status], timeout
        )

    async def _wait(
        self,
        recipient: str,
        select: Callable[[list[Delivery]], list[Delivery]],
        timeout: float,
    ) -> Delivery:
        deadline = self._reactor.seconds() + timeout
        while True:
            attempts = self.deliveries(recipient)
            selected = select(attempts)
            if selected:
                return selected[0]
            if self._reactor.seconds() > deadline:
                seen = [f"{a.status} ({a.text})" for a in attempts] or "none"
                raise AssertionError(
                    f"no such delivery attempt for {recipient} within {timeout} s; "
                    f"attempts seen: {seen}\n{self.log_tail()}"
                )
            await deferLater(self._reactor, POLL_INTERVAL, lambda: None)

    # -- sending ---------------------------------------------------------------

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        mail_options: Sequence[str] = (),
    ) -> dict[str, tuple[int, bytes]]:
        """
        Submit a message to the instance's smtpd with C{smtplib}, in a thread.

        @param message: the raw message, CRLF line ends.
        @param mail_options: ESMTP MAIL parameters, e.g. C{["SMTPUTF8"]}.
        @return: the recipients smtpd refused, as C{smtplib.SMTP.sendmail}
            returns them.
        @raise smtplib.SMTPException: smtpd refused the message as a whole.
        """
        port = self.port

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP(
                "127.0.0.1", port, local_hostname="client.example.org", timeout=10
            ) as s:
                return s.sendmail(sender, list(recipients), message, mail_options=mail_options)

        result: dict[str, tuple[int, bytes]] = await deferToThread(send)
        return result


def _require_root_and_postfix_user() -> None:
    """
    A private Postfix needs root (the master binds, and its processes switch
    to the C{postfix} user) and that user: skip the test when run by hand
    without them, fail it in CI (C{CI} set), as L{require_tool} does.
    """
    problem = None
    if os.geteuid() != 0:
        problem = "a private Postfix must be started as root"
    else:
        try:
            pwd.getpwnam("postfix")
        except KeyError:
            problem = "there is no 'postfix' user (apt-get install postfix; .ci/run does)"
    if problem is None:
        return
    if os.environ.get("CI"):
        raise AssertionError(problem)
    raise SkipTest(problem)


def _process_group_alive(group: int) -> bool:
    """
    Whether a process of process group C{group} still runs. Zombies do not
    count: they hold no sockets, and who reaps them (the init process of the
    machine) is not ours to wait for.
    """
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(group) and fields[0] != "Z":
            return True
    return False
