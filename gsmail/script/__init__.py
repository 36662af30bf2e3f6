# -*- test-case-name: tests.test_script -*-
"""
C{smtp2gs}: the pipe-compatible command, a drop-in replacement for
GroupServer's own C{smtp2gs} (gs.group.messages.add.smtp2gs 3.0.5) that
Postfix runs once per message::

    smtp2gs [-h] [-m MAXSIZE] [-l LISTID] [-f FILE] [-t {server,message}]
            [-c CONFIG] [-i INSTANCE] url

It reads the message from standard input (or C{FILE}) into a spool file,
never whole into memory, takes the recipient from the C{X-Original-To}
header that Postfix's pipe(8) adds (flag C{O}) unless C{--list} names the
group, and then, as the daemon does: a relay address goes to the relay page,
an XVERP address to the bounce page, anything else to the group-exists page
and then the add-email page (C{shared/groupserver-protocol.md}). It uses the
daemon's L{gsmail.groupserver.GroupServerClient}, its replies
(L{gsmail.status}) and, when the instance has a C{gsmail} section, its post
ledger file with the daemon's keys, so a message is posted once even when it
arrives by the pipe and again over LMTP.

What Postfix sees. The first line of the output always starts with an RFC
3463 code and a space (C{4.4.4 Error connecting to GroupServer ...}): pipe(8)
takes that code over the exit status, so C{4.x.x} defers and C{5.x.x}
bounces. The exit status follows sysexits(3) as the old command's did. Any
unexpected fault (a bug, a broken installation) is C{4.3.0}, exit 75
(EX_TEMPFAIL): never a traceback, which Postfix would turn into a bounce.
Nothing is printed for a post or a relay; other successes print their
C{2.x.x} line (C{2.1.5 Bounce recorded}, C{2.0.0 Already delivered ...}),
which Postfix logs.

Checks run in this order, so that a fault of the set-up (transient) is
found before one of the message (permanent): the command line (C{4.3.5},
exit 64), the URL (C{4.5.2}, exit 64), the configuration file (C{4.3.5},
exit 78), then the message: empty (C{5.3.0}, 65), too large (C{5.3.4}, 65),
no recipient (C{5.1.3}, 65); then GroupServer: no such group (C{5.1.1}, 67),
unreachable (C{4.4.4}, 76), bad or non-200 answer (C{4.5.0}, 76), timeout
(C{4.4.7}, 75), answer lost after the post was sent (C{4.4.2}, 75), ledger
busy with the same message in another process for too long (C{4.4.5},
75).

This module is the command itself: L{main} and L{run} (the checks in
order, the status line, the exit status). Its parts: the command line and
the site URL (L{gsmail.script.args}), the configuration file and the
message read into a L{Job} (L{gsmail.script.job}), the post to
GroupServer (L{gsmail.script.delivery}).

Start-up cost matters (one process per message): these modules import only
the standard library; gsmail's other modules come after the command line is
parsed, and Twisted's reactor and web client only once the message is read and
routed, so that bad input is answered without them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, NoReturn

from gsmail.script.args import (
    DEFAULT_CONFIG,
    HelpRequested,
    Options,
    UsageError,
    default_config_path,
    parse_arguments,
)
from gsmail.script.delivery import LEDGER_WAIT, deliver, local_error
from gsmail.script.job import Job, prepare

if TYPE_CHECKING:
    from gsmail.script.delivery import IPipeReactor
    from gsmail.status import Reply

__all__ = [
    "DEFAULT_CONFIG",
    "Job",
    "Options",
    "UsageError",
    "default_config_path",
    "deliver",
    "exit_code",
    "main",
    "parse_arguments",
    "prepare",
    "run",
]


def exit_code(reply: Reply) -> int:
    """
    The exit status for C{reply} (sysexits(3)): 0 for a success, else the
    reply's own value, except that a transient reply never exits with a
    value Postfix would read as permanent (EX_SOFTWARE becomes EX_TEMPFAIL).
    """
    from gsmail.status import EX_OK, EX_SOFTWARE, EX_TEMPFAIL

    if reply.is_success:
        return EX_OK
    if reply.is_transient and reply.exit_code in (EX_OK, EX_SOFTWARE):
        return EX_TEMPFAIL
    if reply.exit_code == EX_OK:
        return EX_SOFTWARE
    return reply.exit_code


def _report(reply: Reply, stderr: IO[str], details: Sequence[str] = ()) -> int:
    """
    Write C{reply}'s status line (not for a plain post or relay), then any
    C{details}; return the exit status.
    """
    from gsmail import status

    if reply not in (status.POSTED, status.RELAYED):
        stderr.write(reply.status_line() + "\n")
        for line in details:
            stderr.write(line.rstrip("\n") + "\n")
    stderr.flush()
    return exit_code(reply)


def _usage_reply(error: UsageError) -> Reply:
    from gsmail import status
    from gsmail.status import EX_USAGE

    message = " ".join(str(error).split())
    return status.Reply(451, "4.3.5", f"Bad smtp2gs command line: {message}", EX_USAGE)


async def run(
    reactor: IPipeReactor,
    argv: Sequence[str],
    *,
    stdin: IO[bytes],
    stdout: IO[str],
    stderr: IO[str],
    environ: Mapping[str, str] | None = None,
    ledger_wait: float = LEDGER_WAIT,
) -> int:
    """
    The whole command in a running reactor: what L{main} does, for tests
    and for embedding. L{prepare} runs inline and blocks the reactor while
    the configuration and the message are read.

    @param argv: the arguments, without the program name.
    @return: the exit status; the status line went to C{stderr}.
    """
    try:
        options = parse_arguments(argv, environ)
    except HelpRequested as e:
        stdout.write(str(e))
        return 0
    except UsageError as e:
        return _report(_usage_reply(e), stderr)
    try:
        prepared = prepare(options, stdin)
    except Exception as e:
        return _report(local_error(e), stderr)
    if not isinstance(prepared, Job):
        return _report(prepared, stderr)
    try:
        reply = await deliver(reactor, prepared, ledger_wait=ledger_wait)
    finally:
        prepared.discard()
    return _report(reply, stderr)


class _Details:
    """
    A log observer keeping the text of critical events (tracebacks of
    unexpected faults), to print after the status line; the rest of the log
    is dropped, so nothing comes before that line.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: Mapping[str, Any]) -> None:
        from twisted.logger import LogLevel, formatEventAsClassicLogText

        if event.get("log_level") is LogLevel.critical and len(self.lines) < 20:
            text = formatEventAsClassicLogText(dict(event))
            if text:
                self.lines.append(text)


def _command(
    argv: Sequence[str],
    stdin: IO[bytes],
    stdout: IO[str],
    stderr: IO[str],
    environ: Mapping[str, str],
) -> int:
    try:
        options = parse_arguments(argv, environ)
    except HelpRequested as e:
        stdout.write(str(e))
        stdout.flush()
        return 0
    except UsageError as e:
        return _report(_usage_reply(e), stderr)
    from typing import cast

    from twisted.logger import ILogObserver, globalLogBeginner

    details = _Details()
    # Also routes Python warnings into the log, off standard error.
    globalLogBeginner.beginLoggingTo(
        [cast(ILogObserver, details)], discardBuffer=True, redirectStandardIO=False
    )
    try:
        prepared = prepare(options, stdin)
    except Exception as e:
        return _report(local_error(e), stderr)
    if not isinstance(prepared, Job):
        return _report(prepared, stderr)
    try:
        reply = _react(prepared)
    finally:
        prepared.discard()
    return _report(reply, stderr, details.lines)


def _react(job: Job) -> Reply:
    """Run L{deliver} in the global reactor, then stop it."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    replies: list[Reply] = []

    async def work(reactor: IPipeReactor) -> None:
        replies.append(await deliver(reactor, job))

    try:
        react(lambda reactor: Deferred.fromCoroutine(work(reactor)))
    except SystemExit:
        pass  # react() always exits; the reply says how it went
    if not replies:
        return local_error(RuntimeError("no reply"))
    return replies[0]


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """
    The C{smtp2gs} console script: read a message, add it to its group,
    exit with a sysexits(3) value; see the module docstring.

    @param argv: the arguments without the program name; C{None} for
        C{sys.argv[1:]}.
    """
    try:
        code = _command(
            sys.argv[1:] if argv is None else argv,
            sys.stdin.buffer,
            sys.stdout,
            sys.stderr,
            os.environ,
        )
    except Exception as e:
        # Even a broken installation must not print a traceback first.
        sys.stderr.write(
            f"4.3.0 smtp2gs failed unexpectedly ({type(e).__name__}); the message was not posted\n"
        )
        code = 75
    sys.exit(code)
