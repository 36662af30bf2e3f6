# -*- test-case-name: tests.test_control -*-
"""
C{gsmail-queue}: the operator's view of gsmail's outbound queue, like
Postfix's C{mailq}, C{postqueue -f} and C{postsuper -h/-H/-d}::

    gsmail-queue [--config PATH] [--instance NAME] list
    gsmail-queue [--config PATH] [--instance NAME] flush [ID]
    gsmail-queue [--config PATH] [--instance NAME] hold ID
    gsmail-queue [--config PATH] [--instance NAME] release ID
    gsmail-queue [--config PATH] [--instance NAME] delete ID

It reads the configuration to find the control socket
(L{gsmail.control.control_path}) and talks AMP to the running daemon. When
the daemon cannot be reached, C{list} reads the queue directory instead,
read-only, and says so on standard error; the other commands fail.

Exit status (sysexits(3)):

  - 0 (EX_OK): done;
  - 64 (EX_USAGE): bad command line;
  - 66 (EX_NOINPUT): no message with that queue id;
  - 69 (EX_UNAVAILABLE): the daemon cannot be reached (not running, or no
    permission on the socket), as Postfix's C{postqueue} when the mail
    system is down; for C{list}, only when the directory cannot be read either;
  - 70 (EX_SOFTWARE): the daemon failed unexpectedly (see its log);
  - 74 (EX_IOERR): the daemon could not write the change to the disk (a
    hold or release is in effect until the daemon stops);
  - 75 (EX_TEMPFAIL): the daemon is stopping, or did not answer in time:
    try again;
  - 78 (EX_CONFIG): the configuration cannot be read.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn, TextIO, TypeVar

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ConnectionClosed
from twisted.internet.task import react

from gsmail import __version__
from gsmail.config import ConfigError, GsmailConfig, load_config
from gsmail.control import ControlClient, connect_control, control_path
from gsmail.outbound.queue import (
    PENDING,
    Envelope,
    NoSuchMessageError,
    QueueClosedError,
    read_queue,
)
from gsmail.status import EX_CONFIG, EX_OK, EX_SOFTWARE, EX_TEMPFAIL, EX_USAGE

__all__ = ["format_queue", "main", "run"]

# sysexits(3) values gsmail.status does not name.
EX_NOINPUT: Final = 66
EX_UNAVAILABLE: Final = 69
EX_IOERR: Final = 74

#: Seconds to wait for the daemon to connect, and to answer a command.
CONNECT_TIMEOUT: Final = 10.0
COMMAND_TIMEOUT: Final = 60.0

_PROG: Final = "gsmail-queue"
_HEADER: Final = (
    "-Queue ID-----------------  --Size-- ----Arrival Time---- -Sender/Recipient-------"
)
_INDENT: Final = " " * 58
_DELIVERY_OFF: Final = "-- Delivery is off (processorthread = false): nothing is sent.\n"

_T = TypeVar("_T")


class _UsageError(Exception):
    """A bad command line; C{str()} is the message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=_PROG,
        description="List and manage gsmail's outbound queue.",
        epilog="Exit status: 0 ok, 64 usage, 66 no such message, 69 daemon unreachable, "
        "70 daemon error, 74 disk error, 75 try again, 78 configuration.",
    )
    parser.add_argument(
        "--config", "-c", default="/etc/groupserver/gsconfig.ini", help="gsconfig.ini to read"
    )
    parser.add_argument("--instance", "-i", default="default", help="configuration instance")
    parser.add_argument("--version", action="version", version=f"{_PROG} (gsmail) {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    commands.add_parser("list", help="list the queue (like mailq)")
    flush = commands.add_parser("flush", help="try pending recipients now (all, or of ID)")
    flush.add_argument("queue_id", nargs="?", metavar="ID")
    for name, text in (
        ("hold", "put a message on hold"),
        ("release", "release a held message"),
        ("delete", "delete a message; no DSN is sent"),
    ):
        commands.add_parser(name, help=text).add_argument("queue_id", metavar="ID")
    return parser


def _printable(text: str) -> str:
    """
    Text safe for a terminal: control characters (from a remote server's
    reply, say) are shown as escapes instead of being obeyed.
    """
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def format_queue(
    envelopes: Sequence[Envelope],
    localtime: Callable[[float], time.struct_time] = time.localtime,
) -> str:
    """
    A C{mailq}-like listing: per message its queue id (C{!} after it: held),
    size in bytes, arrival time and sender (C{<>}: a bounce), then each
    recipient with its state, attempts, next attempt and last reply.

    @param envelopes: the messages, in the order to show.
    @param localtime: turns seconds since the epoch into the time shown.
    @return: the text, ending with a newline.
    """
    if not envelopes:
        return "Mail queue is empty\n"

    def when(seconds: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", localtime(seconds))

    lines = [_HEADER]
    for envelope in envelopes:
        sender = _printable(envelope.sender) or "<>"
        if envelope.xverp:
            sender += " (XVERP)"
        flag = "!" if envelope.held else " "
        lines.append(
            f"{envelope.id:<25}{flag} {envelope.size:>9} {when(envelope.created)}  {sender}"
        )
        for r in envelope.recipients:
            details = [r.state]
            if r.attempts:
                details.append(f"{r.attempts} attempt{'s' if r.attempts != 1 else ''}")
            if r.state == PENDING and r.attempts:
                details.append(f"next {when(r.next_attempt)}")
            lines.append(f"{_INDENT}{_printable(r.address)}  [{', '.join(details)}]")
            if r.last_reply:
                lines.append(f"{_INDENT}  ({_printable(r.last_reply)})")
        lines.append("")
    total = sum(e.size for e in envelopes)
    held = sum(1 for e in envelopes if e.held)
    count = len(envelopes)
    footer = f"-- {(total + 1023) // 1024} Kbytes in {count} Request{'s' if count != 1 else ''}."
    if held:
        footer += f" {held} on hold."
    lines.append(footer)
    return "\n".join(lines) + "\n"


def _reason(error: BaseException) -> str:
    """Why the daemon could not be reached, in a few words."""
    code = getattr(error, "osError", None)
    if isinstance(code, int):
        return os.strerror(code)
    return str(error) or type(error).__name__


def run(reactor: Any, argv: Sequence[str], stdout: TextIO, stderr: TextIO) -> Deferred[int]:
    """
    Run one C{gsmail-queue} command.

    @param argv: the arguments, without the program name.
    @return: fires with the exit status (see the module docstring); never fails.
    """
    return Deferred.fromCoroutine(_run(reactor, list(argv), stdout, stderr))


async def _run(reactor: Any, argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    def fail(message: str, status: int) -> int:
        stderr.write(f"{_PROG}: {message}\n")
        return status

    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        stderr.write(parser.format_usage())
        return fail(str(e), EX_USAGE)
    try:
        config = load_config(args.config, args.instance)
    except ConfigError as e:
        return fail(f"configuration error: {e}", EX_CONFIG)
    path = control_path(config)
    try:
        client = await connect_control(reactor, path, timeout=CONNECT_TIMEOUT)
    except Exception as e:
        reason = _reason(e)
        if args.command == "list":
            return _list_offline(config, path, reason, stdout, stderr)
        return fail(
            f"cannot reach the gsmail daemon at {path} ({reason}): is it running?"
            f" '{args.command}' needs it",
            EX_UNAVAILABLE,
        )
    try:
        return await _command(reactor, client, args, stdout)
    except NoSuchMessageError:
        return fail(f"no such message in the queue: {_printable(args.queue_id)}", EX_NOINPUT)
    except QueueClosedError:
        return fail("the gsmail daemon is stopping: try again", EX_TEMPFAIL)
    except OSError as e:
        return fail(f"the gsmail daemon could not write the queue: {e}", EX_IOERR)
    except TimeoutError:
        return fail(f"the gsmail daemon did not answer in {COMMAND_TIMEOUT:g} s", EX_TEMPFAIL)
    except ConnectionClosed:
        return fail("the gsmail daemon closed the connection: try again", EX_TEMPFAIL)
    except Exception as e:
        return fail(
            f"the gsmail daemon failed: {_printable(str(e).splitlines()[0] if str(e) else '')}"
            " (see its log)",
            EX_SOFTWARE,
        )
    finally:
        await client.close()


async def _within(reactor: Any, d: Deferred[_T]) -> _T:
    """The result of C{d}, or L{TimeoutError} after L{COMMAND_TIMEOUT}."""
    return await d.addTimeout(COMMAND_TIMEOUT, reactor)


async def _command(reactor: Any, client: ControlClient, args: Any, stdout: TextIO) -> int:
    command: str = args.command
    queue_id = _printable(args.queue_id or "") if command != "list" else ""
    if command == "list":
        listing = await _within(reactor, client.list_queue())
        stdout.write(format_queue(listing.envelopes))
        if not listing.delivering:
            stdout.write(_DELIVERY_OFF)
    elif command == "flush":
        flushed = await _within(reactor, client.flush(args.queue_id))
        if queue_id and flushed.held:
            stdout.write(f"{queue_id} is on hold: release it to deliver it\n")
        elif queue_id and not flushed.recipients:
            stdout.write(f"{queue_id} has no pending recipients\n")
        else:
            held = f"; {flushed.held} held messages left on hold" if flushed.held else ""
            stdout.write(
                f"Flushed {flushed.recipients} recipients of {flushed.messages} messages{held}\n"
            )
        if flushed.recipients and not flushed.delivering:
            stdout.write(_DELIVERY_OFF)
    elif command == "hold":
        await _within(reactor, client.hold(args.queue_id))
        stdout.write(f"{queue_id}: placed on hold\n")
    elif command == "release":
        await _within(reactor, client.release(args.queue_id))
        stdout.write(f"{queue_id}: released from hold\n")
    else:
        dropped = await _within(reactor, client.delete(args.queue_id))
        stdout.write(f"{queue_id}: deleted, {dropped} recipients not delivered\n")
    return EX_OK


def _list_offline(
    config: GsmailConfig, path: str, reason: str, stdout: TextIO, stderr: TextIO
) -> int:
    """The listing from the queue directory, for when the daemon is down."""
    try:
        envelopes = read_queue(config.queue_dir)
    except OSError as e:
        stderr.write(
            f"{_PROG}: cannot reach the gsmail daemon at {path} ({reason}),"
            f" and cannot read the queue directory {config.queue_dir}: {e.strerror or e}\n"
        )
        return EX_UNAVAILABLE
    stderr.write(
        f"{_PROG}: cannot reach the gsmail daemon at {path} ({reason});"
        f" read-only listing of {config.queue_dir}\n"
    )
    stdout.write(format_queue(sorted(envelopes, key=lambda e: e.id)))
    return EX_OK


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """
    The C{gsmail-queue} console script: run one command, exit with its status.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)

    async def command(reactor: Any) -> None:
        status = await run(reactor, arguments, sys.stdout, sys.stderr)
        if status:
            raise SystemExit(status)

    react(command)


if __name__ == "__main__":
    main()
