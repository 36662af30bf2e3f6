# -*- test-case-name: tests.test_reload -*-
"""
SIGHUP and reloading for L{gsmail.service.GsmailService}
(L{HangupReload}, a base class of it): the signal handler (installed at
start, put back at stop), reopening twistd's log file for logrotate, and
the reload sequence: read the configuration in a thread, apply what can
change here and in the inbound workers, tell systemd.

Not what a reload reads and applies option by option (L{gsmail.reload},
L{gsmail.inbound.parts.InboundParts.prepare_reload}).
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail.config import ConfigError, GsmailConfig, load_config
from gsmail.reload import (
    Reload,
    ReloadError,
    applied,
    leave_rotation_to_logrotate,
    log_files,
    needs_restart,
    reopen_log_files,
)
from gsmail.startup import notify_systemd

if TYPE_CHECKING:
    from gsmail.inbound.parts import InboundParts
    from gsmail.outbound.delivery import OutboundDelivery
    from gsmail.outbound.mx import MXResolver
    from gsmail.outbound.queue import OutboundQueue
    from gsmail.tlsconfig import ServerTLS

__all__ = ["HangupReload"]

# The service's namespace: these lines were always gsmail.service's.
log = Logger(namespace="gsmail.service")


class HangupReload:
    """
    What SIGHUP does to the service, and L{reload}. A base class of
    L{gsmail.service.GsmailService}, which sets the attributes below.
    """

    config: GsmailConfig
    #: The configuration came from C{config.path}: a reload reads it again.
    config_file: bool
    reactor: Any
    inbound: InboundParts
    queue: OutboundQueue | None
    outbound: OutboundDelivery | None
    submission_factory: Any
    workers: Any
    _mx: MXResolver | None
    _own_tls: list[ServerTLS]
    _reloading: DeferredLock
    _hup_installed: bool
    _previous_hup: Any

    def _install_hangup(self) -> None:
        """
        Reload on SIGHUP: always under twistd (L{config_file}) or with a
        route file (as before); in an application that embeds gsmail, only
        when no other handler is set (else it calls L{reload} itself). A
        Python handler set before is called after ours (chained) and put
        back when the service stops.
        """
        previous = signal.getsignal(signal.SIGHUP)
        if not (
            self.config_file
            or self.config.routes
            or previous in (signal.SIG_DFL, signal.SIG_IGN, None)
        ):
            return
        try:
            self._previous_hup = signal.signal(signal.SIGHUP, self._hangup)
        except ValueError:  # not the main thread: the embedding application's business
            return
        self._hup_installed = True
        if self.config_file:
            leave_rotation_to_logrotate(log_files())

    def _hangup(self, signum: int, frame: Any) -> None:
        """SIGHUP: reopen the log file and reload (in the reactor's thread)."""
        self.reactor.callFromThread(self.hangup)
        previous = self._previous_hup
        if callable(previous):
            previous(signum, frame)

    def hangup(self) -> Deferred[bool]:
        """
        What SIGHUP does: reopen twistd's log file (for logrotate), then
        L{reload}.

        @return: fires with whether the configuration was applied.
        """
        try:
            for path in reopen_log_files(log_files()):
                log.info("Log file {path} reopened", path=path)
        except OSError as e:
            log.error("Cannot reopen the log file: {error}", error=e.strerror or e)
        d = self.reload()

        def failed(failure: Failure) -> bool:
            log.failure("Reloading failed", failure)
            return False

        return d.addErrback(failed)

    def reload(self, config: GsmailConfig | None = None) -> Deferred[bool]:
        """
        Reload: read the configuration file again (when L{config_file};
        else take C{config}, or the running configuration: the TLS and route
        files are read again), and apply what can change without a restart
        (L{gsmail.reload}): accepted domains, the TLS certificate and key
        (new sessions get the new one), the route file; the group lookup
        and MX caches are emptied, the inbound workers reload the same way.
        Options that need a restart are named in one warning and keep their
        running values. If anything cannot be loaded, nothing changes and
        one error line says why. Reloads run one after the other.

        @return: fires with whether it was applied.
        """
        return self._reloading.run(lambda: Deferred.fromCoroutine(self._reload(config)))

    async def _reload(self, config: GsmailConfig | None) -> bool:
        # systemd (Type=notify, notify-reload): reloading, then ready again.
        notify_systemd(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            reload = await deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), self._prepare_reload, config
            )
        except ReloadError as e:
            log.error("Configuration not reloaded, everything stays as it was: {why}", why=str(e))
            notify_systemd("READY=1")
            return False
        self._apply_reload(reload)
        notify_systemd("READY=1")
        return True

    def _prepare_reload(self, config: GsmailConfig | None) -> Reload:
        """Everything a reload needs, read (blocking: in a thread)."""
        running = self.config
        if config is None and self.config_file:
            try:
                config = load_config(running.path, running.instance)
            except ConfigError as e:
                raise ReloadError(str(e)) from None
        new = running if config is None else config
        more_tls = []
        if self.queue is not None and self.submission_factory.settings.tls is not None:
            more_tls.append(self.submission_factory.settings.tls)
        return self.inbound.prepare_reload(
            applied(running, new), needs_restart(running, new), self._own_tls, more_tls
        )

    def _apply_reload(self, reload: Reload) -> None:
        """Apply a prepared reload here, then in the inbound workers."""
        config = reload.config
        changed = [
            name
            for name in ("domains", "tls_certificate", "tls_key", "routes", "srs_domain")
            if getattr(config, name) != getattr(self.config, name)
        ]
        self.inbound.apply_reload(reload)
        self.config = config
        if self.outbound is not None:
            self.outbound.local_domains = config.domains
        if self._mx is not None:
            self._mx.clear()
        if self.workers is not None:
            self.workers.reload(config)
        if reload.restart:
            log.warn(
                "Configuration {path}: needs a restart: {options}",
                path=config.path,
                options=", ".join(reload.restart),
            )
        log.info(
            "Configuration {path} reloaded ({changed}): domains {domains}, {tls},"
            " {routes} routes; group and MX caches cleared",
            path=config.path,
            changed="changed: " + ", ".join(changed) if changed else "no option changed",
            domains=" ".join(config.domains),
            tls="TLS certificate read again" if reload.contexts else "no TLS",
            routes=len(reload.routes.entries),
        )

    def _restore_hangup(self) -> None:
        """At stop: put back the SIGHUP handler that was there before ours."""
        if self._hup_installed:
            # Put back what was there, unless a later handler replaced ours.
            previous = self._previous_hup
            if signal.getsignal(signal.SIGHUP) == self._hangup:
                signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)
            self._hup_installed = False
            self._previous_hup = None
