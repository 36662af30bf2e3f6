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

Start-up cost matters (one process per message): this module imports only
the standard library; gsmail's modules come after the command line is
parsed, and Twisted's reactor and web client only once the message is read and
routed, so that bad input is answered without them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Final, NoReturn

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorThreads

    from gsmail.addresses import Address, Route
    from gsmail.config import PipeConfig
    from gsmail.groupserver import GroupServerClient, IClientReactor
    from gsmail.inbound.spool import SpooledMessage
    from gsmail.interfaces import MessageSource
    from gsmail.posting import Posting
    from gsmail.status import GroupServerError, Reply

    class IPipeReactor(IClientReactor, IReactorThreads):
        """
        What the command needs of a reactor: the GroupServer client's TCP,
        name resolution and time, and threads for the ledger's disk work.
        """


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

#: The configuration file when C{$INSTANCE_HOME} is not set. The old
#: command's default was C{INSTANCE_HOME/etc/gsconfig.ini}, with the path
#: written into the script by buildout; Postfix does not pass
#: C{INSTANCE_HOME} to pipe(8) commands, so give C{--config} in master.cf.
DEFAULT_CONFIG: Final = "/etc/groupserver/gsconfig.ini"

#: The default C{--max-size}, in MiB, as the old command's.
DEFAULT_MAX_SIZE_MIB: Final = 200

#: Seconds to wait while another process (the daemon, another smtp2gs) is
#: posting the same message before answering C{4.4.5}: the ledger's
#: C{wait_timeout}. With a post of its own afterwards (the other process
#: failed: at most twice C{response_timeout}, 480 s by default) the command
#: still ends before Postfix kills it (C{command_time_limit}, 1000 s), which
#: would leave a post without its ledger record.
LEDGER_WAIT: Final = 300.0

#: Bytes read from the input at a time.
READ_SIZE: Final = 64 * 1024

#: The most bytes of the input read to find the header section (and the
#: C{X-Original-To} field); as L{gsmail.inbound.spool.MAX_HEADER_BYTES}.
HEADER_LIMIT: Final = 256 * 1024

#: sysexits(3) EX_NOINPUT: C{--file} cannot be read.
EX_NOINPUT: Final = 66

_PROG: Final = "smtp2gs"
_MIB: Final = 2**20

# The fields Postfix's pipe(8) (flags R, O, D) and local(8) put before the
# message, one line each, and local(8)'s "From " line.
_PREPENDED: Final = (b"return-path:", b"x-original-to:", b"delivered-to:")

_EPILOG: Final = """\
The first line of the output starts with an RFC 3463 status code: 4.x.x
means try again later (Postfix defers the message), 5.x.x means the message
cannot be delivered (Postfix bounces it). Exit status (sysexits): 0 done;
64 bad command line or URL; 65 empty, too large, or no X-Original-To;
67 no such group; 75 try again later; 76 GroupServer could not be reached
or answered wrongly (check the URL and the token); 78 configuration file.
"""


class UsageError(Exception):
    """
    The command line is wrong; C{str()} says how. Answered C{4.3.5} (the
    master.cf entry is part of the system's configuration), exit 64
    (EX_USAGE).
    """


class _HelpRequested(Exception):
    """C{-h}/C{--help}: C{str()} is the help text."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(message or f"exit {status}")


class _HelpAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(
            option_strings,
            dest=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            nargs=0,
            help="show this help message and exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        raise _HelpRequested(parser.format_help())


class _VersionAction(_HelpAction):
    """C{--version}: print gsmail's version (as C{--help} prints the help) and exit 0."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.help = "show gsmail's version and exit"

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from gsmail import __version__

        raise _HelpRequested(f"{_PROG} (gsmail) {__version__}\n")


@dataclass(frozen=True)
class Options:
    """
    The command line of C{smtp2gs}.

    @ivar url: the site URL, e.g. C{https://groups.example.com}.
    @ivar max_size: the largest input accepted, in bytes (C{--max-size} is MiB).
    @ivar list_id: the group id from C{--list}, or C{None}: use C{X-Original-To}.
    @ivar file: the message file, C{"-"} for standard input.
    @ivar time_source: C{"server"} or C{"message"} (the add-email page's
        C{form.timeSource}).
    @ivar config: the gs.config file.
    @ivar instance: the gs.config instance.
    """

    url: str
    max_size: int = DEFAULT_MAX_SIZE_MIB * _MIB
    list_id: str | None = None
    file: str = "-"
    time_source: str = "server"
    config: str = DEFAULT_CONFIG
    instance: str = "default"


def default_config_path(environ: Mapping[str, str]) -> str:
    """
    The default C{--config}: C{$INSTANCE_HOME/etc/gsconfig.ini} when
    C{INSTANCE_HOME} is set (the old command's documented default), else
    L{DEFAULT_CONFIG}.
    """
    home = environ.get("INSTANCE_HOME", "")
    if home:
        return os.path.join(home, "etc", "gsconfig.ini")
    return DEFAULT_CONFIG


def _mebibytes(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MiB, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 MiB, got {text!r}")
    return int(value * _MIB)


def _list_id(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the list id must not be empty")
    return text.strip()


def _parser(environ: Mapping[str, str]) -> _Parser:
    parser = _Parser(
        prog=_PROG,
        description="Add an email message to a GroupServer group (gsmail's smtp2gs).",
        epilog=_EPILOG,
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("url", help="The URL for the GroupServer site.")
    parser.add_argument("-h", "--help", action=_HelpAction)
    parser.add_argument(
        "-m",
        "--max-size",
        dest="max_size",
        type=_mebibytes,
        default=DEFAULT_MAX_SIZE_MIB * _MIB,
        metavar="MAXSIZE",
        help="The maximum size of the post that will be accepted, in mebibytes "
        f"(default {DEFAULT_MAX_SIZE_MIB}MiB).",
    )
    parser.add_argument(
        "-l",
        "--list",
        dest="list_id",
        type=_list_id,
        default=None,
        metavar="LISTID",
        help="The list (group id) to send the message to. By default the group is "
        "looked up from the X-Original-To header.",
    )
    parser.add_argument(
        "-f",
        "--file",
        dest="file",
        default="-",
        metavar="FILE",
        help="The file that contains the message. If omitted (or -) standard input is read.",
    )
    parser.add_argument(
        "-t",
        "--time-source",
        dest="time_source",
        choices=["server", "message"],
        default="server",
        help="Where to get the time the message was written: server (the default) "
        "or message (its Date header).",
    )
    default_config = default_config_path(environ)
    parser.add_argument(
        "-c",
        "--config",
        dest="config",
        default=default_config,
        metavar="CONFIG",
        help=f"The GroupServer configuration file (default {default_config}) that holds the token.",
    )
    parser.add_argument(
        "-i",
        "--instance",
        dest="instance",
        default="default",
        metavar="INSTANCE",
        help="The GroupServer instance configuration to use (default default).",
    )
    # Last, so the usage line starts as the old script's did.
    parser.add_argument("--version", action=_VersionAction)
    return parser


def parse_arguments(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Options:
    """
    Parse C{smtp2gs}'s command line (without the program name).

    @param environ: the environment, for the default C{--config}
        (C{INSTANCE_HOME}); C{None} for C{os.environ}.
    @raise UsageError: a wrong command line.
    """
    parser = _parser(os.environ if environ is None else environ)
    namespace = parser.parse_args(list(argv))
    return Options(
        url=namespace.url,
        max_size=namespace.max_size,
        list_id=namespace.list_id,
        file=namespace.file,
        time_source=namespace.time_source,
        config=namespace.config,
        instance=namespace.instance,
    )


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


def _url_problem(url: str) -> Reply | None:
    """
    The reply for a site URL that cannot be used (C{4.5.2}, exit 64), or
    C{None}. The old command only asked for a host; gsmail also wants
    C{http} or C{https}.
    """
    from urllib.parse import urlsplit

    from gsmail import status

    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return status.NO_HOST_IN_URL.with_text(f"Bad GroupServer URL <{_shown(url)}>")
    if not host:
        return status.NO_HOST_IN_URL.with_text(f"No host in the URL <{_shown(url)}>")
    if parts.scheme.lower() not in ("http", "https"):
        return status.NO_HOST_IN_URL.with_text(f"Not an http:// or https:// URL <{_shown(url)}>")
    return None


def _shown(url: str) -> str:
    """C{url} fit for a one-line message: no user name or password, no line breaks."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url.strip())
        if "@" in parts.netloc:
            parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
        url = urlunsplit(parts)
    except ValueError:
        pass
    return url.encode("ascii", "backslashreplace").decode("ascii")[:200].replace("\n", " ")


def _normalised_url(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url.strip())
    return urlunsplit(parts._replace(scheme=parts.scheme.lower()))


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

    problem = _url_problem(options.url)
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


async def deliver(reactor: IPipeReactor, job: Job, *, ledger_wait: float = LEDGER_WAIT) -> Reply:
    """
    Hand C{job}'s message to GroupServer, through the post ledger when one
    is configured. Never fails: every outcome is a reply.

    @param reactor: connections, time and the thread pool (ledger writes).
    @param ledger_wait: seconds to wait while another process posts the
        same message (then C{4.4.5}).
    @return: C{2.0.0} posted, relayed, or already delivered (the ledger had
        it); C{2.1.5} bounce recorded; C{5.1.1} (exit 67) no such group;
        the L{GroupServerError}'s reply (C{4.4.4}, C{4.5.0}, C{4.4.7},
        C{4.4.2}), or C{4.4.5} (75) when another process posted the same
        message for longer than C{ledger_wait}; C{4.3.5} (78) the ledger
        cannot be opened; C{4.3.0} (75) anything else.
    """
    from gsmail import status
    from gsmail.groupserver import GroupServerClient
    from gsmail.status import GroupServerError

    config = job.config
    try:
        client = GroupServerClient(
            reactor,
            _normalised_url(job.options.url),
            config.token,
            connect_timeout=config.connect_timeout,
            response_timeout=config.response_timeout,
            verify_tls=config.verify_tls,
            concurrency=1,
        )
    except ValueError:
        return status.NO_HOST_IN_URL.with_text(f"Bad GroupServer URL <{_shown(job.options.url)}>")
    try:
        return await _deliver(reactor, client, job, ledger_wait)
    except GroupServerError as e:
        return _failed(e, job)
    except Exception as e:
        from twisted.logger import Logger

        Logger(namespace="gsmail.script").failure("smtp2gs failed unexpectedly")
        return _local_error(e)
    finally:
        await client.close()


def _local_error(error: BaseException) -> Reply:
    from gsmail import status

    what = type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        what = f"{what}: {error.strerror}"
    return status.LOCAL_ERROR.with_text(
        f"Local error in processing ({what}); the message was not posted"
    )


async def _deliver(
    reactor: IPipeReactor, client: GroupServerClient, job: Job, ledger_wait: float
) -> Reply:
    from gsmail import status
    from gsmail.addresses import Address, Route, RouteKind
    from gsmail.posting import plan_posting

    source = job.source()
    route = job.route
    if route is None or route.kind is RouteKind.GROUP:
        if route is None:
            assert job.options.list_id is not None
            # --list names the group: no address is looked up (nor used).
            forced = Address(job.options.list_id, "")
            route = Route(RouteKind.GROUP, forced, group_id=job.options.list_id)
        else:
            recipient = route.recipient
            if not recipient.local.isascii():
                # GroupServer's group-exists field is ASCII only (as the daemon).
                return status.NO_SUCH_GROUP.with_text(f"No such group <{recipient}>")
            info = await client.lookup_group(str(recipient))
            if not info.group_id:
                return status.NO_SUCH_GROUP.with_text(f"No such group <{recipient}>")
            route = Route(RouteKind.GROUP, recipient, group_id=info.group_id)
    from gsmail.bounces import BounceScreen

    posting = plan_posting(
        client, route, source, job.message.digest, job.options.time_source, BounceScreen(job.verp)
    )
    if posting.screen is not None:
        dropped = await posting.screen()
        if dropped is not None:
            return dropped
    if not job.config.ledger_path:
        await posting.action()
        return posting.success
    return await _through_ledger(reactor, job, posting, ledger_wait)


async def _through_ledger(
    reactor: IPipeReactor, job: Job, posting: Posting, ledger_wait: float
) -> Reply:
    from twisted.internet.threads import deferToThreadPool

    from gsmail import status
    from gsmail.ledger import Outcome, PostLedger

    config = job.config

    def in_thread(f: Callable[[], None]) -> Deferred[None]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f)

    # One message: no need to parse the whole file (preload), a look-up
    # searches its bytes.
    ledger = PostLedger(
        config.ledger_path,
        ttl=config.ledger_ttl,
        clock=reactor,
        sync=in_thread,
        preload=False,
        wait_timeout=ledger_wait,
    )
    try:
        await in_thread(ledger.open)
    except OSError as e:
        # Usually permissions: run the command as the daemon's user.
        return status.CONFIG_ERROR.with_text(
            f"Cannot open the post ledger {ledger.path}: {e.strerror or e}"
        )
    try:
        outcome = await ledger.run(posting.key, posting.action)
    except OSError as e:
        # Either the ledger could not be read, or the post was made and its
        # record did not reach the disk (the daemon answers 451 too).
        return status.LOCAL_ERROR.with_text(
            f"Could not use the post ledger {config.ledger_path}: {e.strerror or e}"
        )
    finally:
        try:
            await ledger.close()
        except OSError:
            pass  # logged by the ledger; the outcome above stands
    if outcome is Outcome.DONE:
        return posting.success
    return status.ALREADY_DELIVERED


def _failed(error: GroupServerError, job: Job) -> Reply:
    """The reply for a failed call to GroupServer, with the client's detail."""
    from gsmail import status

    reply = error.reply
    text = reply.text
    if reply == status.GROUPSERVER_UNREACHABLE:
        text = f"{text} <{_shown(job.options.url)}>"
    if error.detail:
        text = f"{text} ({error.detail})"
    return reply.with_text(" ".join(text.split()))


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
    except _HelpRequested as e:
        stdout.write(str(e))
        return 0
    except UsageError as e:
        return _report(_usage_reply(e), stderr)
    try:
        prepared = prepare(options, stdin)
    except Exception as e:
        return _report(_local_error(e), stderr)
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
    except _HelpRequested as e:
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
        return _report(_local_error(e), stderr)
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
        return _local_error(RuntimeError("no reply"))
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


if __name__ == "__main__":
    main()
