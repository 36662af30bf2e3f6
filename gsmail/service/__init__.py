# -*- test-case-name: tests.test_tap,tests.test_startup,tests.test_reload,tests.integration.test_startup_failures -*-
"""
C{makeService(config, reactor)}: the whole inbound side as one
C{MultiService}, for C{twistd gsmail} and for Twisted applications that embed
gsmail.

L{GsmailService} builds the parts (the inbound side is
L{gsmail.inbound.parts.InboundParts}, built alike by the inbound workers),
starts them in order with the start-up checks and their failures, and stops
them in order. Its parts live beside it: the listeners
(L{gsmail.service.listeners}), the outbound side's wiring
(L{gsmail.service.outbound}), SIGHUP and reloading
(L{gsmail.service.reload}).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python.components import Componentized

from gsmail.config import ConfigError, GsmailConfig
from gsmail.inbound.parts import InboundParts, _thread_runner
from gsmail.inbound.protocol import InboundFactory, ServerSettings
from gsmail.outbound.delivery import OutboundDelivery
from gsmail.outbound.mtasts import MTASTS
from gsmail.outbound.mx import MXResolver
from gsmail.outbound.queue import OutboundQueue
from gsmail.outbound.tlsrpt import TLSReportCounts
from gsmail.privileges import RunUser, prepare_state, state_paths
from gsmail.service.listeners import (
    listener_problems,
    listening_service,
    result_now,
    secure_listener,
    where,
)
from gsmail.service.outbound import OutboundSide, deliver_locally
from gsmail.service.reload import HangupReload
from gsmail.signing import DKIMSigner
from gsmail.startup import EX_CANTCREAT, StartupError, listen_failure, notify_systemd
from gsmail.status import EX_CONFIG, Reply
from gsmail.tlsconfig import ServerTLS
from gsmail.twistedcompat import stop_resolv_conf_timer, waiting_for_port
from gsmail.verp import VerpKeyError

if TYPE_CHECKING:
    from gsmail.metrics import Metrics, Readiness

__all__ = ["makeService", "GsmailService"]

log = Logger()


class GsmailService(HangupReload, MultiService):
    """
    The mail service: ESMTP and/or LMTP listeners over one delivery core,
    the GroupServer client, the post ledger, the outbound side when a
    submission listener is configured, and (for C{url = embedded}) the
    GroupServer stand-in.

    With C{inbound_workers = N} (N > 0) the main process still binds the
    inbound listeners (before twistd drops privileges) but does not accept
    on them: N worker processes (L{gsmail.workers.InboundWorkers}) inherit
    the listening sockets and serve every inbound session, each with its own
    reactor and L{InboundParts}, so inbound mail uses more than one core.

    @ivar core: the main process's L{DeliveryCore} (also used for local
        delivery of outbound mail to this site's domains).
    @ivar client: the L{GroupServerClient}.
    @ivar ledger: the L{PostLedger}.
    @ivar standin: the embedded stand-in, or C{None}.
    @ivar workers: the L{gsmail.workers.InboundWorkers}, or C{None}.
    @ivar run_as: the user twistd drops root to after
        C{privilegedStartService} (C{--uid}/C{--gid}), or C{None}: the state
        directories gsmail makes and its UNIX sockets are given to it.
    @ivar log_observer: see L{setServiceParent}.
    @ivar on_startup_failure: called with the L{StartupError} when start-up
        fails, before it is raised (C{twistd gsmail} prints it as one line
        and exits); C{None}: the error is raised as it is.
    """

    def __init__(self, config: GsmailConfig, reactor: Any, run_as: RunUser | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.run_as = run_as
        self.on_startup_failure: Callable[[StartupError], None] | None = None
        #: twistd's log observer instead of its own (L{gsmail.textlog}'s
        #: text, or with C{log_json} L{gsmail.tap.json_log_observer}), or C{None}.
        self.log_observer: ILogObserver | None = None
        self._prepared = False
        #: The configuration came from C{config.path} (C{twistd gsmail}):
        #: a reload reads it again, and the SIGHUP handler is always installed.
        self.config_file = False
        self._reloading = DeferredLock()
        self._hup_installed = False
        self._previous_hup: Any = None
        self._mx: MXResolver | None = None
        # ssl: listeners' TLS contexts, read again from their files on reload.
        self._own_tls: list[ServerTLS] = []
        blocking = _thread_runner(reactor)
        # Made in startService, after twistd dropped privileges, so that
        # its files belong to the user gsmail runs as.
        self.standin: Any = None
        self._standin_port: Any = None
        url = config.url
        if url == "embedded":
            url = "http://127.0.0.1:0"  # set once the stand-in listens
        self.inbound = InboundParts(config, reactor, url)
        self.ledger = self.inbound.ledger
        self.client = self.inbound.client
        self.core = self.inbound.core
        self.spool_files = self.inbound.spool_files
        settings = self.inbound.settings
        self.smtp_factory: InboundFactory | None = None
        self.lmtp_factory: InboundFactory | None = None
        self.listeners: dict[str, Any] = {}
        if config.smtp_endpoint:
            self.smtp_factory = self.inbound.factory(lmtp=False)
            self._listen("smtp", config.smtp_endpoint, self.smtp_factory)
        if config.lmtp_endpoint:
            self.lmtp_factory = self.inbound.factory(lmtp=True)
            self._listen("lmtp", config.lmtp_endpoint, self.lmtp_factory)
        self.workers: Any = None
        if config.inbound_workers:
            from gsmail.workers import InboundWorkers

            self.workers = InboundWorkers(config, reactor)
        self.queue: OutboundQueue | None = None
        self.outbound: OutboundDelivery | None = None
        self.signer: DKIMSigner | None = None
        self.mta_sts: MTASTS | None = None
        self.tls_report: TLSReportCounts | None = None
        if config.submission_endpoint:
            self._make_outbound(config, settings, blocking)
        self.metrics: Metrics | None = None
        self.readiness: Readiness | None = None
        if config.metrics_endpoint:
            self._make_metrics(config)
        if self.core.routes.uses_queue and (self.queue is None or config.inbound_workers):
            raise ConfigError(
                f"{config.path}: [gsmail-*] routes: {config.routes} has forward, bcc or"
                " errors_to routes, which need the outbound queue: set submission_endpoint"
                " (and inbound_workers = 0: the worker processes have no queue)"
            )
        if config.postmaster_address and config.inbound_workers:
            log.warn(
                "inbound_workers is set: the worker processes have no outbound queue and keep"
                " postmaster mail in {path} instead of forwarding it to postmaster_address",
                path=config.postmaster_maildir,
            )
        elif config.postmaster_address and not config.submission_endpoint:
            log.warn(
                "postmaster_address is set but submission_endpoint is not (no outbound"
                " queue): postmaster mail is kept in {path}",
                path=config.postmaster_maildir,
            )

    def _make_outbound(self, config: GsmailConfig, settings: ServerSettings, blocking: Any) -> None:
        """The submission listener, the outbound queue and delivery (L{OutboundSide})."""
        side = OutboundSide(
            config, self.reactor, self.inbound, settings, blocking, self._deliver_locally
        )
        self._journal_sync = side.journal_sync
        self.signer = side.signer
        self.queue = side.queue
        self._dns = side.dns
        self._mx = side.mx
        self.tls_report = side.tls_report
        self.mta_sts = side.mta_sts
        self.outbound = side.delivery
        self.submission_factory = side.submission_factory
        self._listen("submission", config.submission_endpoint, self.submission_factory)
        side.wire(self.core, config)
        # Listens in startService, after the queue is loaded (gsmail-queue).
        self.control = side.control
        self.control.setServiceParent(self)

    def _make_metrics(self, config: GsmailConfig) -> None:
        """
        The metrics (L{gsmail.metrics}) and their HTTP listener, service
        C{"metrics"}: the client, the ledger and the queue report to them;
        log events are counted from L{startService} on.
        """
        # Imported here: an embedding without metrics does not load prometheus_client.
        from gsmail.metrics import GroupServerProbe, Metrics, Readiness, make_site

        metrics = self.metrics = Metrics(self.reactor)
        self.client.observe_request = metrics.observe_request
        self.ledger.observe_append = metrics.observe_ledger_append
        metrics.watch_posts(self.client)
        metrics.watch_ledger(self.ledger)
        directories = {
            "ledger": os.path.dirname(os.path.abspath(config.ledger_path)),
            "spool": config.spool_dir,
        }
        if self.queue is not None:
            metrics.watch_queue(self.queue)
            directories["queue"] = config.queue_dir
        metrics.watch_disk(directories)
        if self.workers is not None:
            self.workers.on_exit = metrics.worker_ended
            self.workers.on_metrics = metrics.worker_figures
        ledger = self.ledger
        self.readiness = Readiness(
            listeners=self._listener_problems,
            probe=GroupServerProbe(self.client, f"gsmail-readyz@{config.domains[0]}", self.reactor),
            writable=directories,
            min_free=config.readyz_min_free,
            ledger_ok=lambda: (
                f"ledger: the last write to {ledger.path} failed" if ledger.write_failed else None
            ),
            metrics=metrics,
        )
        try:
            svc = strports.service(
                config.metrics_endpoint, make_site(metrics, self.readiness), reactor=self.reactor
            )
        except Exception as e:
            raise listen_failure("metrics_endpoint", config.metrics_endpoint, e) from None
        svc.setName("metrics")
        svc.setServiceParent(self)

    def _listener_problems(self) -> list[str]:
        """For C{/readyz}: a line per listener that is not listening (or no worker ready)."""
        return listener_problems(self.listeners, self.workers, self.config)

    def _deliver_locally(self, sender: str, recipient: str, path: str) -> Deferred[Reply]:
        """Mail from the outbound queue to this site's own domains (L{deliver_locally})."""
        return Deferred.fromCoroutine(
            deliver_locally(self.core, self.config, sender, recipient, path)
        )

    def _listen(self, name: str, configured: str, factory: Any) -> None:
        svc = listening_service(self.reactor, self.config, name, configured, factory, self._own_tls)
        self.listeners[name] = svc
        svc.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        """
        Join C{parent}; when it is twistd's application and L{log_observer}
        is set, make that observer the application's C{ILogObserver}
        component, which twistd installs instead of its text log (see
        C{twisted.application.app.AppLogger.start}).
        """
        super().setServiceParent(parent)
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)

    def _failing(self, error: Exception) -> None:
        """Hand a start-up failure to L{on_startup_failure}, if set."""
        if self.on_startup_failure is None:
            return
        if isinstance(error, ConfigError):
            error = StartupError(str(error), EX_CONFIG)
        if isinstance(error, StartupError):
            self.on_startup_failure(error)

    def privilegedStartService(self) -> None:
        """
        As root, before twistd drops privileges: make the state directories
        (given to L{run_as}), then bind every listener and give the UNIX
        sockets their owner, group and mode (C{unix_socket_group},
        C{unix_socket_mode}).

        @raise StartupError: a directory cannot be made or written, a
            listener cannot listen (see L{gsmail.startup.listen_failure}).
        """
        try:
            prepare_state(state_paths(self.config), self.run_as)
            self._prepared = True
            for service in self:
                name = service.name
                try:
                    service.privilegedStartService()
                except Exception as e:
                    if name not in self.listeners and name != "metrics":
                        raise
                    description = getattr(self.config, f"{name}_endpoint")
                    raise listen_failure(f"{name}_endpoint", description, e) from None
            for name in self.listeners:
                self._secure(name)
        except (StartupError, ConfigError) as e:
            self._failing(e)
            raise

    def _secure(self, name: str) -> None:
        """The owner, group and mode of a UNIX listener's socket."""
        secure_listener(name, self.listeners[name], self.config, self.run_as)

    def startService(self) -> None:
        try:
            self._start()
        except (StartupError, ConfigError) as e:
            self._failing(e)
            raise

    def _start(self) -> None:
        # After twistd -u dropped privileges (so the files belong to the
        # run-as user), and before the reactor runs: the ledger is loaded
        # before the first message can arrive.
        if not self._prepared:
            prepare_state(state_paths(self.config), None)
            self._prepared = True
        try:
            self.inbound.open()
        except VerpKeyError as e:
            raise ConfigError(f"verp_key_file: {e}") from None
        if self.queue is not None:
            try:
                self.queue.load()
            except OSError as e:
                raise StartupError(
                    f"queue_dir: cannot open the outbound queue {self.config.queue_dir}: "
                    f"{e.strerror or e}",
                    EX_CANTCREAT,
                ) from None
            self._check_dkim_keys()
        if self.mta_sts is not None:
            try:
                self.mta_sts.cache.load()
                if self.tls_report is not None:
                    self.tls_report.load()
            except OSError as e:
                raise StartupError(
                    f"mta_sts_cache_dir: cannot open the MTA-STS policy cache "
                    f"{self.mta_sts.cache.directory}: {e.strerror or e}",
                    EX_CANTCREAT,
                ) from None
        if self.config.url == "embedded":
            self._start_standin()
        super().startService()
        if self.metrics is not None:
            globalLogPublisher.addObserver(self.metrics)
            self.reactor.callWhenRunning(self._say_metrics)
        self._install_hangup()
        self.reactor.callWhenRunning(self._ready)
        if self.workers is not None:
            self._start_workers()
        if self.queue is not None and self.outbound is not None:
            if self.config.queuepath and os.path.isdir(self.config.queuepath):
                self.queue.import_zope_sendmail(self.config.queuepath, xverp=True).addCallbacks(
                    self._imported,
                    lambda f: log.failure("Importing the zope.sendmail queue failed", f),
                )
            if self.config.processorthread:
                self.outbound.start()
            else:
                log.info("processorthread is off: outbound mail is queued, not delivered")

    def _check_dkim_keys(self) -> None:
        """Say at start which DKIM keys cannot be used (their mail would wait)."""
        if self.signer is None:
            return
        for problem in self.signer.keys.check():
            log.error(
                "DKIM key {problem}: mail it signs waits in the queue until it can be used",
                problem=problem,
            )

    def _imported(self, count: int) -> None:
        if count:
            log.info(
                "Imported {count} messages from {path}", count=count, path=self.config.queuepath
            )
            if self.outbound is not None:
                self.outbound.kick()

    def _ready(self) -> None:
        """Say that gsmail takes mail: in the log, and to systemd (C{Type=notify})."""
        kinds = {"smtp": "ESMTP", "lmtp": "LMTP", "submission": "submission (ESMTP)"}
        listening = ", ".join(
            f"{kinds[name]} on {where(self, name)}"
            for name in ("smtp", "lmtp", "submission")
            if name in self.listeners
        )
        log.info("gsmail ready: {listening}", listening=listening)
        notify_systemd(f"READY=1\nSTATUS=Taking mail: {listening}")

    def _say_metrics(self) -> None:
        log.info(
            "Metrics, /healthz and /readyz on {where}", where=where(self, "metrics", "http://")
        )

    def _start_standin(self) -> None:
        from gsmail.standin import make_demo_standin

        config = self.config
        try:
            self.standin = make_demo_standin(
                config.standin_dir,
                config.token,
                config.domains,
                config.standin_groups,
                clock=self.reactor,
                reactor=self.reactor,
            )
        except ValueError as e:
            raise StartupError(f"standin_groups: {e}", EX_CONFIG) from None
        try:
            endpoint = serverFromString(self.reactor, config.standin_endpoint)
            d = endpoint.listen(self.standin.site())
            port = result_now(d)
        except Exception as e:
            raise listen_failure("standin_endpoint", config.standin_endpoint, e) from None
        self._standin_port = port
        address = port.getHost()
        self.client.set_url(f"http://{address.host}:{address.port}")
        log.info(
            "Embedded GroupServer stand-in at http://{host}:{port}, storing in {directory}",
            host=address.host,
            port=address.port,
            directory=self.config.standin_dir,
        )

    def port(self, name: str) -> Any:
        """
        The listening port of the C{"smtp"}, C{"lmtp"}, C{"submission"} or
        C{"metrics"} listener (after start).
        """
        service = self.listeners.get(name) or self.getServiceNamed(name)
        return waiting_for_port(service).result

    def _start_workers(self) -> None:
        """
        Hand the inbound listening sockets to the worker processes: this
        process stops accepting on them (the sockets stay open, so a
        connection that arrives while a worker restarts waits in the
        backlog instead of being refused).
        """
        sockets = {}
        for name in ("smtp", "lmtp"):
            if name in self.listeners:
                port = self.port(name)
                port.stopReading()
                sockets[name] = port
        self.workers.start(sockets, self.client.url)

    async def _stop(self) -> None:
        self._restore_hangup()
        notify_systemd("STOPPING=1")
        if self.metrics is not None:
            globalLogPublisher.removeObserver(self.metrics)
        if self.workers is not None:
            # Workers first: they stop accepting and finish their deliveries.
            await self.workers.stop()
        await super().stopService()  # listeners stop accepting
        await self.inbound.wait_idle()
        if self.outbound is not None:
            await self.outbound.stop()
        if self.tls_report is not None:
            await self.tls_report.flush()
        if self.queue is not None:
            await self.queue.close()
            self._journal_sync.stop()
        await self.inbound.close()
        if self.queue is not None:
            # client.Resolver re-reads resolv.conf every minute: stop that timer.
            stop_resolv_conf_timer(self._dns)
        if self.standin is not None and self._standin_port is not None:
            port, self._standin_port = self._standin_port, None
            await port.stopListening()

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._stop())


def makeService(
    config: GsmailConfig, reactor: Any = None, run_as: RunUser | None = None
) -> GsmailService:
    """
    Build gsmail's service from a loaded configuration.

    @param reactor: the reactor; the global one when C{None} (twistd).
    @param run_as: the user twistd drops root to (L{GsmailService.run_as}).
    @raise ConfigError: the TLS files cannot be loaded.
    @raise StartupError: an endpoint string cannot be parsed.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    return GsmailService(config, reactor, run_as)
