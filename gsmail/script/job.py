# -*- test-case-name: tests.test_script -*-
"""
C{smtp2gs}'s input: the configuration file and the message, read before
GroupServer is asked (L{prepare}). The message streams from standard input
(or C{--file}) into a spool file, never whole into memory; the fields
Postfix put before it (C{Return-Path}, C{X-Original-To}, C{Delivered-To},
local(8)'s C{From } line) are kept apart from it, and the recipient is
taken from the C{X-Original-To} field Postfix's pipe(8) adds (flag C{O})
unless C{--list} names the group. The result is a L{Job}, or the reply
that ends the command.

Not the command line (L{gsmail.script.args}) nor the post
(L{gsmail.script.delivery}). Imports only the standard library at first;
gsmail's modules when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Final

from gsmail.script.args import Options, url_problem

if TYPE_CHECKING:
    from gsmail.addresses import Address, Route
    from gsmail.config import PipeConfig
    from gsmail.inbound.spool import SpooledMessage
    from gsmail.interfaces import MessageSource
    from gsmail.status import Reply

__all__ = ["EX_NOINPUT", "HEADER_LIMIT", "READ_SIZE", "Job", "prepare"]

#: Bytes read from the input at a time.
READ_SIZE: Final = 64 * 1024

#: The most bytes of the input read to find the header section (and the
#: C{X-Original-To} field); as L{gsmail.inbound.spool.MAX_HEADER_BYTES}.
HEADER_LIMIT: Final = 256 * 1024

#: sysexits(3) EX_NOINPUT: C{--file} cannot be read.
EX_NOINPUT: Final = 66

# The fields Postfix's pipe(8) (flags R, O, D) and local(8) put before the
# message, one line each, and local(8)'s "From " line.
_PREPENDED: Final = (b"return-path:", b"x-original-to:", b"delivered-to:")


@dataclass
class Job:
    """
    A message read and routed, ready for L{deliver}. Owns the spool file:
    call L{discard} when done.

    @ivar options: the command line.
    @ivar config: the configuration file's settings.
    @ivar prefix: the header fields Postfix put before the message (its
        C{Return-Path}, C{X-Original-To}, C{Delivered-To} and local(8)'s
        C{From } line); posted before the spool file, but not part of the
        message's identity, so the ledger keys match the daemon's.
    @ivar message: the message without C{prefix}, in a spool file.
    @ivar route: where the recipient goes (relay, bounce or group), or
        C{None} with C{--list}.
    @ivar verp: the bounce address policy (L{gsmail.verp.VerpPolicy}), read
        when the recipient was routed.
    """

    options: Options
    config: PipeConfig
    prefix: bytes
    message: SpooledMessage
    route: Route | None
    verp: Any = None

    def source(self) -> MessageSource:
        """The whole input, as the GroupServer client posts it."""
        from gsmail.interfaces import MessageSource

        return MessageSource(
            prefix=self.prefix,
            path=self.message.path,
            size=self.message.size,
            data=self.message.data,
        )

    def discard(self) -> None:
        """Remove the spool file."""
        from gsmail.inbound.spool import remove

        remove(self.message.path)


def prepare(options: Options, stdin: IO[bytes]) -> Job | Reply:
    """
    Everything before GroupServer is asked: check the URL, read the
    configuration file, stream the message into a spool file and find its
    recipient. Blocking (files and standard input): run it before the
    reactor does.

    @param stdin: the message when C{options.file} is C{"-"}.
    @return: the L{Job}, or the reply that ends the command:
        C{4.5.2} (exit 64) unusable URL; C{4.3.5} (78) configuration file;
        C{4.3.0} (66) C{--file} unreadable; C{5.3.0} (65) empty message;
        C{5.3.4} (65) more than C{max_size} bytes; C{5.1.3} (65) no usable
        C{X-Original-To} without C{--list}.
    @raise OSError: the spool file could not be written (the caller answers
        C{4.3.0}).
    """
    from gsmail import status
    from gsmail.config import ConfigError, load_pipe_config

    problem = url_problem(options.url)
    if problem is not None:
        return problem
    try:
        config = load_pipe_config(options.config, options.instance)
    except ConfigError as e:
        return status.CONFIG_ERROR.with_text(f"Error with the configuration file: {e}")
    name = "standard input" if options.file == "-" else repr(options.file)
    try:
        if options.file == "-":
            return _read(options, config, stdin)
        try:
            stream = open(options.file, "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise _InputError(e) from None
        with stream:
            return _read(options, config, stream)
    except _InputError as e:
        return status.Reply(
            451,
            "4.3.0",
            f"Cannot read the message from {name}: {e.error.strerror or e.error}",
            EX_NOINPUT,
        )


class _InputError(Exception):
    """The message could not be read (not: the spool could not be written)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _chunk(stream: IO[bytes]) -> bytes:
    """The next chunk of the input, C{b""} at its end."""
    try:
        return stream.read(READ_SIZE)
    except OSError as e:
        raise _InputError(e) from None


def _read(options: Options, config: PipeConfig, stream: IO[bytes]) -> Job | Reply:
    """Stream the input into a spool file and route it."""
    from gsmail import status
    from gsmail.inbound.spool import Spool

    too_large = status.MESSAGE_TOO_BIG.with_text(
        f"Email message too large (more than {options.max_size} bytes)"
    )
    head = bytearray()
    total = 0
    eof = False
    while _header_end(head) < 0 and len(head) < HEADER_LIMIT:
        chunk = _chunk(stream)
        if not chunk:
            eof = True
            break
        total += len(chunk)
        if total > options.max_size:
            return too_large
        head += chunk
    if total == 0:
        return status.EMPTY_MESSAGE.with_text("The file containing the email was empty")
    prefix_length = _prepended_length(head)
    spool = Spool()
    try:
        spool.write(bytes(head[prefix_length:]))
        while not eof:
            chunk = _chunk(stream)
            if not chunk:
                break
            total += len(chunk)
            if total > options.max_size:
                spool.discard()
                return too_large
            spool.write(chunk)
        message = spool.finish()
    except BaseException:
        spool.discard()
        raise
    job = Job(options, config, bytes(head[:prefix_length]), message, None)
    if message.size == 0:
        job.discard()
        return status.EMPTY_MESSAGE.with_text("The email message is empty")
    if options.list_id is not None:
        return job
    recipient = _original_to(bytes(head))
    if isinstance(recipient, status.Reply):
        job.discard()
        return recipient
    from gsmail.addresses import route_recipient

    job.verp = _verp_policy(config)
    # The site's domains are not in the pipe's configuration: Postfix
    # decided that this address is ours.
    job.route = route_recipient(
        recipient, (recipient.domain,), config.relay_address_prefix, job.verp
    )
    return job


def _verp_policy(config: PipeConfig) -> Any:
    """
    The daemon's bounce address policy, with its keys when the file can be
    read (it is the daemon's, mode 0600: run the command as its user);
    otherwise a signed address is answered C{451 4.3.5}.
    """
    from gsmail.config import verp_key_path
    from gsmail.verp import VerpKeyError, VerpPolicy, WallClock, unsigned_until

    policy = VerpPolicy(
        WallClock(),
        max_age=config.verp_max_age,
        unsigned_until=unsigned_until(config.verp_unsigned_until, signing=config.verp_signing),
        key_file=verp_key_path(config),
    )
    if policy.key_file:
        try:
            policy.load(make=False)
        except VerpKeyError as e:
            policy.key_error = str(e)
    return policy


def _header_end(data: bytearray) -> int:
    """The offset of the blank line ending the header section, or -1."""
    if data.startswith(b"\n") or data.startswith(b"\r\n"):
        return 0
    ends = [i for i in (data.find(b"\n\n"), data.find(b"\n\r\n")) if i >= 0]
    return min(ends) + 1 if ends else -1


def _prepended_length(head: bytearray) -> int:
    """
    The length of the fields Postfix put before the message: at the top, one
    line each (no continuation line follows), C{Return-Path},
    C{X-Original-To} and C{Delivered-To} in any order, after an optional
    C{From } line.
    """
    position = 0
    while True:
        end = head.find(b"\n", position)
        if end < 0:
            return position
        line = bytes(head[position : end + 1])
        if position == 0 and line.startswith(b"From "):
            position = end + 1
            continue
        if not line.lower().startswith(_PREPENDED):
            return position
        if bytes(head[end + 1 : end + 2]) in (b" ", b"\t"):
            return position  # folded: not what Postfix writes
        position = end + 1


def _original_to(head: bytes) -> Address | Reply:
    """
    The first C{X-Original-To} address of the header section in C{head}
    (the one Postfix put on top), or the C{5.1.3} reply.
    """
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    from gsmail import status
    from gsmail.addresses import AddressError, parse_mailbox

    end = _header_end(bytearray(head))
    header = head if end < 0 else head[:end]
    value = BytesHeaderParser(policy=compat32).parsebytes(header).get("X-Original-To")
    if value is None:
        return status.NO_ORIGINAL_TO.with_text('No "X-Original-To" header in the email message')
    text = " ".join(str(value).split())
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    try:
        return parse_mailbox(text)
    except AddressError:
        shown = text.encode("ascii", "backslashreplace").decode("ascii")[:200]
        return status.NO_ORIGINAL_TO.with_text(f"Cannot use the X-Original-To address {shown!r}")
