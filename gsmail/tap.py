# -*- test-case-name: tests.test_tap -*-
"""
C{twistd gsmail}: command-line options and the service maker behind the
plugin in C{twisted/plugins/gsmail_plugin.py}.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any, NoReturn

from twisted.application.service import IService
from twisted.logger import ILogObserver, LoggingFile, jsonFileLogObserver
from twisted.python import usage
from twisted.python.logfile import LogFile

from gsmail import __version__
from gsmail.config import ConfigError, load_config
from gsmail.startup import StartupError
from gsmail.status import EX_CONFIG
from gsmail.textlog import text_log_observer

__all__ = ["Options", "makeService", "json_log_observer"]


class Options(usage.Options):
    """
    C{twistd gsmail --config PATH [--instance NAME]}.
    """

    synopsis = "[--config PATH] [--instance NAME] [--check] [--version]"
    optFlags = [
        ["check", None, "Check the configuration and the system as gsmail-check does, then exit."],
    ]
    optParameters = [
        ["config", "c", "/etc/groupserver/gsconfig.ini", "GroupServer's configuration file."],
        ["instance", "i", "default", "The configuration instance ([config-INSTANCE])."],
    ]
    longdesc = (
        "Receive mail for GroupServer groups over ESMTP and LMTP and add each "
        "message to its group exactly once."
    )

    def opt_version(self) -> None:
        """Print gsmail's version and exit."""
        sys.stdout.write(f"gsmail {__version__}\n")
        raise SystemExit(0)


def makeService(options: Options) -> IService:
    """
    Load the configuration and build the service. A configuration error
    prints one line naming the file, section and option and exits with
    EX_CONFIG (78); so does any later failure to start (a port in use, a
    state directory gsmail's user cannot write, ...: one line on standard
    error and a sysexits status, see L{gsmail.startup}), when twistd runs in
    the foreground (C{-n}); a daemonizing twistd reports it through its
    parent, with status 1.

    With C{--check}, run L{gsmail.check} instead and exit with its status.
    """
    from gsmail.config import verp_key_path
    from gsmail.privileges import run_user
    from gsmail.service import makeService as make
    from gsmail.verp import VerpKeyError, VerpKeys

    parent = getattr(options, "parent", None) or {}
    if options["check"]:
        from gsmail.check import main as check

        raise SystemExit(
            check(
                ["--config", options["config"], "--instance", options["instance"]]
                + _user_arguments(parent)
            )
        )
    try:
        config = load_config(options["config"], options["instance"])
        key_file = verp_key_path(config)
        if os.path.lexists(key_file):
            # A malformed key file is a configuration error; one that does
            # not exist yet is made at start (after privileges are dropped).
            try:
                VerpKeys.read(key_file)
            except VerpKeyError as e:
                raise ConfigError(f"verp_key_file: {e}") from None
        service = make(config, run_as=run_user(parent.get("uid"), parent.get("gid")))
    except ConfigError as e:
        sys.stderr.write(f"gsmail: configuration error: {e}\n")
        raise SystemExit(EX_CONFIG) from None
    except StartupError as e:
        _exit(e)
    # SIGHUP reads this file again (gsmail.reload).
    service.config_file = True
    if parent.get("nodaemon", True):
        service.on_startup_failure = _exit
    if parent.get("syslog") or parent.get("logger"):
        pass  # twistd's own observer: syslog, or the one --logger names
    elif config.log_json:
        service.log_observer = json_log_observer(parent)
    else:
        service.log_observer = text_log_observer(parent)
    return service


def json_log_observer(parent: Any) -> ILogObserver:
    """
    The observer C{log_json = true} gives twistd: each event as one line of
    JSON (L{twisted.logger.jsonFileLogObserver}, no record separator), with
    its fields, written where twistd would write its text log: C{--logfile}
    (C{-}: standard output; none: standard output with C{-n}, else
    C{twistd.log}), reopened on SIGHUP as twistd's own text log is
    (L{gsmail.reload.log_files} finds it). twistd takes it from
    the application (L{GsmailService.setServiceParent}); C{--logger} still
    wins, and C{--syslog} keeps text. Read it back with
    L{twisted.logger.eventsFromJSONLogFile} (C{recordSeparator=""}) or jq.

    @param parent: twistd's options (C{logfile}, C{nodaemon}).
    """
    logfile = parent.get("logfile")
    out: IO[Any]
    if logfile == "-" or (not logfile and parent.get("nodaemon", True)):
        out = sys.stdout
    else:
        out = LogFile.fromFullPath(logfile or "twistd.log")
    return jsonFileLogObserver(out, recordSeparator="")


def _exit(error: StartupError) -> NoReturn:
    """
    Print a start-up failure as one line on the real standard error (twistd
    has sent C{sys.stderr} to the log by then) and exit with its status.
    """
    stream = sys.__stderr__ if isinstance(sys.stderr, LoggingFile) else sys.stderr
    if stream is not None:
        stream.write(f"gsmail: {error}\n")
        stream.flush()
    raise SystemExit(error.code)


def _user_arguments(parent: Any) -> list[str]:
    """twistd's C{--uid}/C{--gid}, for C{--check}: check as the user gsmail runs as."""
    arguments = []
    for name in ("uid", "gid"):
        if parent.get(name) is not None:
            arguments += [f"--{name}", str(parent[name])]
    return arguments
