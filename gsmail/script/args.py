# -*- test-case-name: tests.test_script -*-
"""
C{smtp2gs}'s command line: its options (those of GroupServer's own
C{smtp2gs} 3.0.5, plus C{--version}), parsed into L{Options}, and the checks
of the site URL argument.

Not the message (L{gsmail.script.job}), nor GroupServer
(L{gsmail.script.delivery}), nor the exit status (L{gsmail.script}). Like
the command, it imports only the standard library: a wrong command line is
answered before anything else is loaded.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NoReturn

if TYPE_CHECKING:
    from gsmail.status import Reply

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_MAX_SIZE_MIB",
    "HelpRequested",
    "Options",
    "UsageError",
    "default_config_path",
    "normalised_url",
    "parse_arguments",
    "shown_url",
    "url_problem",
]

#: The configuration file when C{$INSTANCE_HOME} is not set. The old
#: command's default was C{INSTANCE_HOME/etc/gsconfig.ini}, with the path
#: written into the script by buildout; Postfix does not pass
#: C{INSTANCE_HOME} to pipe(8) commands, so give C{--config} in master.cf.
DEFAULT_CONFIG: Final = "/etc/groupserver/gsconfig.ini"

#: The default C{--max-size}, in MiB, as the old command's.
DEFAULT_MAX_SIZE_MIB: Final = 200

_PROG: Final = "smtp2gs"
_MIB: Final = 2**20

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


class HelpRequested(Exception):
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
        raise HelpRequested(parser.format_help())


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

        raise HelpRequested(f"{_PROG} (gsmail) {__version__}\n")


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


def url_problem(url: str) -> Reply | None:
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
        return status.NO_HOST_IN_URL.with_text(f"Bad GroupServer URL <{shown_url(url)}>")
    if not host:
        return status.NO_HOST_IN_URL.with_text(f"No host in the URL <{shown_url(url)}>")
    if parts.scheme.lower() not in ("http", "https"):
        return status.NO_HOST_IN_URL.with_text(f"Not an http:// or https:// URL <{shown_url(url)}>")
    return None


def shown_url(url: str) -> str:
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


def normalised_url(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url.strip())
    return urlunsplit(parts._replace(scheme=parts.scheme.lower()))
