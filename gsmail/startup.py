# -*- test-case-name: tests.test_startup -*-
"""
Start-up as an operator sees it: every failure to start is one line and a
sysexits(3) status (L{StartupError}, L{listen_failure}), and systemd hears
"ready" once every listener listens (L{notify_systemd}, the C{sd_notify}
protocol of systemd's C{sd_notify(3)}, spoken by hand).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from typing import Final

from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from gsmail.status import EX_CONFIG

__all__ = [
    "EX_CANTCREAT",
    "EX_NOPERM",
    "EX_OSERR",
    "StartupError",
    "listen_failure",
    "notify_systemd",
]

log = Logger()

#: sysexits(3) values of start-up failures that L{gsmail.status} has no use
#: for elsewhere: an operating-system error (a port already in use)...
EX_OSERR: Final = 71
#: ...a file or socket that cannot be made (its directory is missing)...
EX_CANTCREAT: Final = 73
#: ...and a permission gsmail lacks (a port below 1024, state owned by root).
EX_NOPERM: Final = 77


class StartupError(Exception):
    """
    gsmail cannot start. C{str()} is one line that says what to do; it never
    holds the token or a password.

    @ivar code: the sysexits(3) exit status C{twistd gsmail} ends with:
        L{EX_CONFIG} (78) for the configuration, L{EX_OSERR} (71),
        L{EX_CANTCREAT} (73) or L{EX_NOPERM} (77) for the system.
    """

    def __init__(self, message: str, code: int = EX_CONFIG) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))
        self.code = code


#: What each OS error of bind(2) or listen(2) means to an operator, with its exit status.
_LISTEN_ERRORS: Final[Mapping[int, tuple[str, int]]] = {
    errno.EADDRINUSE: ("the address is in use (another server listens there?)", EX_OSERR),
    errno.EACCES: (
        "permission denied (ports below 1024 need root, twistd -u/-g to drop it after, or "
        "CAP_NET_BIND_SERVICE; a UNIX socket needs a directory gsmail may write)",
        EX_NOPERM,
    ),
    errno.EPERM: ("operation not permitted", EX_NOPERM),
    errno.EADDRNOTAVAIL: ("no such address on this host (check interface=)", EX_CONFIG),
    errno.ENOENT: ("the socket's directory does not exist (make it first)", EX_CANTCREAT),
    errno.ENOTDIR: ("a part of the socket's path is not a directory", EX_CANTCREAT),
    errno.ENAMETOOLONG: ("the socket's path is too long (at most 107 bytes)", EX_CONFIG),
    errno.EROFS: ("the file system is read-only", EX_CANTCREAT),
}


def listen_failure(option: str, description: str, error: BaseException) -> StartupError:
    """
    The one line an operator gets when the listener of C{option} cannot be
    made or cannot listen.

    @param option: the configuration option, such as C{smtp_endpoint}.
    @param description: its endpoint string (no secret is ever in one).
    @param error: what Twisted raised: C{ValueError}, C{TypeError},
        C{KeyError} or C{IndexError} while parsing the string (a bad port,
        an unknown keyword, a C{systemd:} socket that was not passed),
        C{OverflowError} for a port over 65535, L{CannotListenError} or
        C{OSError} from bind(2)/listen(2) (or from the lock file of a
        C{unix:...:lockfile=1} endpoint).
    @return: the error to raise, with its exit status.
    """
    where = f"{option} {description!r}: cannot listen"
    if isinstance(error, CannotListenError):
        error = error.socketError if isinstance(error.socketError, BaseException) else error
    if isinstance(error, OverflowError):
        return StartupError(f"{where}: the port must be 0 to 65535", EX_CONFIG)
    if isinstance(error, OSError) and error.errno is not None and error.errno in _LISTEN_ERRORS:
        text, code = _LISTEN_ERRORS[error.errno]
        return StartupError(f"{where}: {text}", code)
    if isinstance(error, OSError):
        return StartupError(f"{where}: {error.strerror or error}", EX_OSERR)
    if isinstance(error, KeyError | IndexError) and description.lower().startswith("systemd:"):
        passed = os.environ.get("LISTEN_FDNAMES", "")
        return StartupError(
            f"{option} {description!r}: systemd passed no such socket "
            f"(LISTEN_FDS={os.environ.get('LISTEN_FDS', '0')}, names {passed or 'none'}: "
            "check the .socket unit's FileDescriptorName=)",
            EX_CONFIG,
        )
    if isinstance(error, TypeError):
        reason = str(error)
        if "unexpected keyword argument" in reason:
            keyword = reason.rpartition("argument")[2].strip(" '\"")
            return StartupError(f"{option} {description!r}: unknown keyword {keyword!r}", EX_CONFIG)
        return StartupError(f"{option} {description!r}: wrong arguments", EX_CONFIG)
    if isinstance(error, ValueError | KeyError | IndexError):
        reason = str(error)
        if "invalid literal for int()" in reason:
            reason = "expected a number, got " + reason.rpartition(":")[2].strip()
        reason = reason.strip("'\"") if isinstance(error, KeyError) else reason
        reason = reason or type(error).__name__
        return StartupError(f"{option} {description!r}: {reason}", EX_CONFIG)
    return StartupError(f"{where}: {type(error).__name__}: {error}", EX_OSERR)


def notify_systemd(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """
    Tell systemd about the service (C{sd_notify(3)}): one datagram of
    C{NAME=value} lines to the UNIX socket named by C{$NOTIFY_SOCKET}, a
    path or, starting with C{@}, an abstract name. C{READY=1} ends the start
    of a C{Type=notify} unit; C{STOPPING=1} says it is stopping.

    Non-blocking and quick (one C{sendto} on a local datagram socket), so it
    may run in the reactor thread. A failure is logged, never raised: a unit
    without C{Type=notify} does not care.

    @param message: the lines, such as C{"READY=1\\nSTATUS=..."}.
    @param environ: where C{NOTIFY_SOCKET} is read (default C{os.environ}).
    @return: whether a datagram was sent (C{False}: not run by systemd).
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode("utf-8"), target)
    except OSError as e:
        log.warn(
            "Cannot notify systemd at {address}: {error}", address=address, error=e.strerror or e
        )
        return False
    return True
