# -*- test-case-name: tests.test_reload -*-
"""
What a reload (SIGHUP, C{systemctl reload gsmail}; Postfix's C{postfix
reload}) changes in a running gsmail, and the reopening of its log file for
logrotate. L{gsmail.service.GsmailService.reload} runs it; docs/operations.md,
"Reloading", says it for operators.

A reload reads the configuration file again as at start
(L{gsmail.config.load_config}) and applies the options in L{LIVE_OPTIONS}:
which domains are accepted, the TLS certificate and key (certbot renews
them), the route file. Any other option that changed needs a restart: it
is named in one log line and keeps its running value. Nothing is applied
unless everything loads: a configuration that no longer parses, a
certificate that cannot be read or does not match its key, a route file
that cannot be used leave gsmail as it was, with one line saying why.

Log files: twistd's C{--logfile} is a L{twisted.python.logfile.LogFile};
twistd itself only I{rotates} it, on SIGUSR1 (it renames it to C{.1}, see
C{twisted.scripts._twistd_unix.UnixAppLogger._getLogObserver}), which fights
logrotate's own renaming. L{reopen_log_files} closes and opens it again by
name (C{BaseLogFile.reopen}, added to Twisted for external rotation tools:
twisted/twisted#4255), so after logrotate renamed it the new lines go to a
new file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs
from twisted.logger import globalLogPublisher
from twisted.python.logfile import BaseLogFile, LogFile

from gsmail.config import GsmailConfig
from gsmail.routes import RouteTable
from gsmail.tlsconfig import ServerTLS, unusable_reason
from gsmail.twistedcompat import log_file_of, log_observers

__all__ = [
    "LIVE_OPTIONS",
    "Reload",
    "ReloadError",
    "applied",
    "leave_rotation_to_logrotate",
    "load_contexts",
    "log_files",
    "needs_restart",
    "reopen_log_files",
]

#: The options a reload applies without a restart.
LIVE_OPTIONS = ("domains", "srs_domain", "tls_certificate", "tls_key", "routes")

#: Fields of L{GsmailConfig} that are not options.
_NOT_OPTIONS = ("path", "instance")


class ReloadError(Exception):
    """A reload changed nothing; the message says why, in one line."""


@attrs.frozen
class Reload:
    """
    A reload ready to apply: everything it needs was read (off the reactor
    thread); applying it only swaps objects.

    @ivar config: the configuration to run with from now on: the running
        one with the new values of L{LIVE_OPTIONS} (L{applied}).
    @ivar restart: the options that changed but need a restart.
    @ivar routes: the route table read from C{config.routes}.
    @ivar contexts: (the L{ServerTLS} in use, the one just loaded for it).
    """

    config: GsmailConfig
    restart: tuple[str, ...]
    routes: RouteTable
    contexts: tuple[tuple[ServerTLS, ServerTLS], ...] = ()


def needs_restart(running: GsmailConfig, new: GsmailConfig) -> list[str]:
    """
    The options that differ between C{running} and C{new} and that a
    reload does not apply, in the order of L{GsmailConfig}. Setting
    C{tls_certificate} where there was none, or removing it, is one of them:
    it decides whether the listeners offer STARTTLS at all.
    """
    names = []
    for field in attrs.fields(GsmailConfig):
        if field.name in _NOT_OPTIONS or field.name in LIVE_OPTIONS:
            continue
        if getattr(running, field.name) != getattr(new, field.name):
            names.append(field.name)
    if bool(running.tls_certificate) != bool(new.tls_certificate):
        names.append("tls_certificate")
    return names


def applied(running: GsmailConfig, new: GsmailConfig) -> GsmailConfig:
    """
    The configuration a reload runs with: C{running} with C{new}'s values
    of L{LIVE_OPTIONS}; the TLS files stay when TLS would be turned on or
    off (L{needs_restart}).
    """
    live = {name: getattr(new, name) for name in LIVE_OPTIONS}
    if bool(running.tls_certificate) != bool(new.tls_certificate):
        live["tls_certificate"] = running.tls_certificate
        live["tls_key"] = running.tls_key
    return attrs.evolve(running, **live)


def load_contexts(
    config: GsmailConfig, configured: Iterable[ServerTLS], own: Iterable[ServerTLS]
) -> tuple[tuple[ServerTLS, ServerTLS], ...]:
    """
    Load a new TLS context for each one in use (blocking: in a thread).

    @param configured: those made from C{tls_certificate} and C{tls_key}
        (STARTTLS): loaded from C{config}'s files, with their profile.
    @param own: those with files of their own (C{ssl:} listeners):
        loaded from the same files again.
    @raise ReloadError: a file cannot be read or used, or a key does not
        match its certificate.
    """
    contexts = []
    for tls in configured:
        try:
            loaded = ServerTLS.from_files(config.tls_certificate, config.tls_key, tls.profile)
        except Exception as e:
            raise ReloadError(
                f"tls_certificate/tls_key {config.tls_certificate}: cannot load: "
                f"{unusable_reason(e)}"
            ) from None
        contexts.append((tls, loaded))
    for tls in own:
        certificate, key, chain = tls.files
        try:
            loaded = ServerTLS.from_files(certificate, key, tls.profile, chain)
        except Exception as e:
            raise ReloadError(
                f"ssl: listener certificate {certificate}: cannot load: {unusable_reason(e)}"
            ) from None
        contexts.append((tls, loaded))
    return tuple(contexts)


def log_files(observers: Sequence[object] | None = None) -> list[BaseLogFile]:
    """
    The log files twistd writes to (C{--logfile}): those of the file log
    observers of the global log publisher. None under systemd's journal or
    C{--logfile -} (standard output), or with C{--syslog}.

    @param observers: the log observers to look at; default the global
        publisher's (read from its private list: Twisted has no public way
        to list them).
    """
    if observers is None:
        observers = log_observers(globalLogPublisher)
    found = []
    for observer in observers:
        out = log_file_of(observer)
        if isinstance(out, BaseLogFile) and out not in found:
            found.append(out)
    return found


def reopen_log_files(files: Iterable[BaseLogFile]) -> list[str]:
    """
    Close each log file and open it again by its name: after logrotate
    renamed it, the next lines go to a new file of that name.

    @return: the paths reopened.
    @raise OSError: a file cannot be opened again (it stays closed:
        twistd's observer then drops lines until a later reopen).
    """
    paths = []
    for log_file in files:
        # Writes from other threads hold this lock (twisted.python.threadable).
        lock = log_file.__dict__.get("_threadable_lock")
        if lock is not None:
            with lock:
                log_file.reopen()
        else:
            log_file.reopen()
        paths.append(log_file.path)
    return paths


def leave_rotation_to_logrotate(files: Iterable[BaseLogFile]) -> None:
    """
    Turn off twistd's own rotation of its C{--logfile} at 1 MB
    (C{LogFile.rotateLength}): it renames the file to C{.1}, C{.2}, ...
    without limit, beside logrotate's names; logrotate and SIGHUP rotate it.
    """
    for log_file in files:
        if isinstance(log_file, LogFile):
            log_file.rotateLength = None
