# -*- test-case-name: tests.test_service -*-
"""
C{makeService(config, reactor)}: the whole inbound side as one
C{MultiService}, for C{twistd gsmail} and for Twisted applications that embed
gsmail.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import ssl
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from gsmail import status
from gsmail.addresses import AddressError, parse_mailbox
from gsmail.config import (
    ConfigError,
    GsmailConfig,
    load_config,
    mta_sts_cache_path,
)
from gsmail.control import ControlFactory, ControlService, QueueControl, control_path
from gsmail.handoff import SerialThread
from gsmail.inbound.parts import (
    InboundParts,
    _thread_runner,
    _why,
    _with_tls_profile,
    with_backlog,
)
from gsmail.inbound.postmaster import ForwardPostmaster
from gsmail.inbound.protocol import Envelope, InboundFactory, ServerSettings, Session
from gsmail.inbound.spool import Spool, SpoolAlarm
from gsmail.outbound.delivery import OutboundDelivery, TLSPolicy
from gsmail.outbound.mtasts import MTASTS, PolicyCache
from gsmail.outbound.mx import MXResolver, parse_relayhost
from gsmail.outbound.queue import OutboundQueue
from gsmail.outbound.submission import (
    PasswordChecker,
    SubmissionCore,
    SubmissionFactory,
    parse_networks,
)
from gsmail.outbound.tlsrpt import TLSReportCounts
from gsmail.privileges import RunUser, prepare_state, secure_socket, state_paths
from gsmail.reload import (
    Reload,
    ReloadError,
    applied,
    leave_rotation_to_logrotate,
    log_files,
    needs_restart,
    reopen_log_files,
)
from gsmail.signing import DKIMSigner, KeyRing, parse_key_specs
from gsmail.startup import EX_CANTCREAT, StartupError, listen_failure, notify_systemd
from gsmail.status import EX_CONFIG, Reply
from gsmail.tlsconfig import ServerTLS, implicit_tls_endpoint
from gsmail.verp import VerpKeyError

if TYPE_CHECKING:
    from gsmail.metrics import Metrics, Readiness

__all__ = ["makeService", "GsmailService"]

log = Logger()


class GsmailService(MultiService):
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
        """The submission listener, the outbound queue and delivery."""
        # The journal's group commits (one or more per transaction delivered)
        # get a thread of their own, as the ledger's fsyncs do.
        self._journal_sync = SerialThread(self.reactor, "gsmail-journal")
        self.signer = dkim_signer(config)
        self.queue = OutboundQueue(
            config.queue_dir,
            clock=self.reactor,
            sync=blocking,
            journal_sync=self._journal_sync,
            signer=None if self.signer is None else self.signer.queue_signer,
        )
        self._dns = _resolver(config.dns_servers, self.reactor)
        relayhost = parse_relayhost(config.relayhost) if config.relayhost else None
        trust_root = None
        if config.tls_ca:
            with open(config.tls_ca, "rb") as f:
                trust_root = ssl.trustRootFromCertificates(
                    [ssl.Certificate.loadPEM(pem) for pem in _pem_blocks(f.read())]
                )
        # Delivery TLS has options of its own; [smtp-NAME]'s no_tls and
        # force_tls describe GroupServer's connection to the submission port.
        level = config.smtp_tls_security_level
        smarthost_tls = TLSPolicy(
            use=level != "none",
            require=level == "encrypt",
            verify=True,
            name=config.tls_name,
            trust_root=trust_root,
        )
        mx_level = config.mx_tls or level
        mx_tls = TLSPolicy(use=mx_level != "none", require=mx_level == "encrypt", verify=False)
        auth = None
        if config.relayhost_username:
            auth = (config.relayhost_username, config.relayhost_password)
        mx = self._mx = MXResolver(self._dns, self.reactor)
        if config.mta_sts and not relayhost:
            # MX delivery only: a smarthost is the operator's choice, with
            # its own TLS options.
            directory = mta_sts_cache_path(config)
            if config.tls_rpt:
                self.tls_report = TLSReportCounts(
                    os.path.join(directory, "tlsrpt"), self.reactor, blocking
                )
            report = self.tls_report
            self.mta_sts = MTASTS(
                reactor=self.reactor,
                resolver=self._dns,
                addresses=mx.host_addresses,
                cache=PolicyCache(directory, self.reactor, blocking),
                timeout=config.mta_sts_timeout,
                report=(
                    None
                    if report is None
                    else lambda domain, policy, result, _detail: report.failure(
                        domain, policy, result, ""
                    )
                ),
            )
        self.outbound = OutboundDelivery(
            queue=self.queue,
            reactor=self.reactor,
            hostname=config.hostname,
            relayhost=relayhost,
            mx=mx,
            smarthost_tls=smarthost_tls,
            mx_tls=mx_tls,
            auth=auth,
            batch_size=config.batch_size,
            max_connections=config.outbound_connections,
            max_per_destination=config.destination_concurrency,
            lifetime=config.queue_lifetime,
            local_domains=config.domains,
            local_delivery=self._deliver_locally,
            trace=config.smtp_trace,
            mx_port=config.mx_port,
            pass_xverp=config.relayhost_xverp,
            delay_warning_time=config.delay_warning_time,
            verp=self.inbound.verp,
            mta_sts=self.mta_sts,
            tls_report=self.tls_report,
        )
        checker = None
        if config.smtp_username:
            checker = PasswordChecker(config.smtp_username, config.smtp_password)
        self.submission_factory = SubmissionFactory(
            SubmissionCore(
                _KickingQueue(self.queue, self.outbound), SpoolAlarm("queueing", self.reactor)
            ),
            # Submission clients are current MUAs and GroupServer: Mozilla's set.
            _with_tls_profile(config, settings, "intermediate"),
            self.reactor,
            trusted_networks=parse_networks(config.submission_networks),
            checker=checker,
            tls_security_level=submission_tls_level(config),
            spool_dir=config.spool_dir,
            spool_files=self.spool_files,
            spool_alarm=self.inbound.spool_alarm,
            anvil=self.inbound.anvil,
        )
        self._listen("submission", config.submission_endpoint, self.submission_factory)
        # Forward, bcc and errors_to routes queue here too.
        self.core.actions.queue = _KickingQueue(self.queue, self.outbound)
        if config.postmaster_address:
            self.core.postmaster = ForwardPostmaster(
                _KickingQueue(self.queue, self.outbound),
                config.postmaster_address,
                config.spool_dir,
                blocking,
            )
        # Listens in startService, after the queue is loaded (gsmail-queue).
        control = QueueControl(
            self.queue, self.outbound if config.processorthread else None, self.reactor
        )
        self.control = ControlService(control_path(config), ControlFactory(control), self.reactor)
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
        problems = []
        for name, svc in self.listeners.items():
            if self.workers is not None and name in ("smtp", "lmtp"):
                continue  # the workers accept on these
            waiting = getattr(svc, "_waitingForPort", None)
            if (
                not svc.running
                or waiting is None
                or not waiting.called
                or isinstance(waiting.result, Failure)
            ):
                configured = getattr(self.config, f"{name}_endpoint")
                problems.append(f"{name}_endpoint: not listening on {configured}")
        if self.workers is not None:
            slots = self.workers.slots
            if not any(slot.ready for slot in slots):
                problems.append(f"inbound_workers: none of the {len(slots)} workers is ready")
        return problems

    def _deliver_locally(self, sender: str, recipient: str, path: str) -> Deferred[Reply]:
        """
        Mail from the outbound queue to this site's own domains (DSNs to VERP
        addresses, mostly) goes straight into the inbound delivery core, so a
        bounce becomes a bounce record without a round trip through DNS.
        """
        return Deferred.fromCoroutine(self._local(sender, recipient, path))

    async def _local(self, sender: str, recipient: str, path: str) -> Reply:
        session = Session(
            peer="local", protocol_name="ESMTP", helo=self.config.hostname, extended=True
        )
        try:
            address = parse_mailbox(recipient)
            envelope = Envelope(sender=parse_mailbox(sender) if sender else None)
        except AddressError:
            return status.BAD_RECIPIENT_SYNTAX
        reply, route = await self.core.check_recipient(session, address)
        if route is None:
            return reply
        envelope.recipients.append(route)
        spool = Spool(self.config.spool_dir)
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 16), b""):
                    spool.write(chunk)
        except OSError:
            spool.discard()
            raise
        [result] = await self.core.deliver(session, envelope, spool.finish())
        return result

    def _listen(self, name: str, configured: str, factory: Any) -> None:
        description = with_backlog(configured, self.config.listen_backlog)
        try:
            # ssl: listeners get gsmail's TLS context, not Twisted's (gsmail.tlsconfig).
            endpoint = implicit_tls_endpoint(
                self.reactor,
                description,
                "intermediate" if name == "submission" else self.config.tls_ciphers,
                self._own_tls,
            )
        except Exception as e:
            raise ConfigError(
                f"{self.config.path}: [gsmail-*] {name}_endpoint: cannot load: {_why(e)}"
            ) from None
        if endpoint is None:
            try:
                svc = strports.service(description, factory, reactor=self.reactor)
            except Exception as e:
                raise listen_failure(f"{name}_endpoint", configured, e) from None
        else:
            svc = StreamServerEndpointService(endpoint, factory)
            svc._raiseSynchronously = True
        svc.setName(name)
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
        if not hasattr(self.listeners[name], "_waitingForPort"):
            return
        address = self.port(name).getHost()
        if not isinstance(address, UNIXAddress) or not address.name:
            return  # TCP, or a socket systemd made (SocketMode=, SocketGroup=)
        path = os.fsdecode(address.name)
        description = getattr(self.config, f"{name}_endpoint")
        mode = None if _has_mode(description) else self.config.unix_socket_mode
        secure_socket(f"{name}_endpoint", path, mode, self.config.unix_socket_group, self.run_as)

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
            f"{kinds[name]} on {_where(self, name)}"
            for name in ("smtp", "lmtp", "submission")
            if name in self.listeners
        )
        log.info("gsmail ready: {listening}", listening=listening)
        notify_systemd(f"READY=1\nSTATUS=Taking mail: {listening}")

    def _say_metrics(self) -> None:
        log.info(
            "Metrics, /healthz and /readyz on {where}", where=_where(self, "metrics", "http://")
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
            port = _result_now(d)
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
        return service._waitingForPort.result

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
        if self._hup_installed:
            # Put back what was there, unless a later handler replaced ours.
            previous = self._previous_hup
            if signal.getsignal(signal.SIGHUP) == self._hangup:
                signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)
            self._hup_installed = False
            self._previous_hup = None
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
            parse_call = getattr(self._dns, "_parseCall", None)
            if parse_call is not None and parse_call.active():
                parse_call.cancel()
        if self.standin is not None and self._standin_port is not None:
            port, self._standin_port = self._standin_port, None
            await port.stopListening()

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._stop())


def dkim_signer(config: GsmailConfig) -> DKIMSigner | None:
    """
    The DKIM signer of the outbound queue (L{gsmail.signing}), or C{None}
    when no C{dkim_keys} are configured. Reads no key yet.
    """
    if not config.dkim_keys:
        return None
    specs = parse_key_specs(config.dkim_keys)
    return DKIMSigner(
        KeyRing(specs),
        config.dkim_sign_headers,
        arc=config.arc_seal,
        authserv_id=config.hostname,
    )


def submission_tls_level(config: GsmailConfig) -> str:
    """
    The submission listener's TLS level from GroupServer's C{[smtp-NAME]}
    options, which describe GroupServer's connection to it: C{no_tls} gives
    C{"none"} (STARTTLS not offered), C{force_tls} C{"encrypt"} (required),
    else C{"may"} (offered when C{tls_certificate} is set).
    """
    if config.no_tls:
        return "none"
    return "encrypt" if config.force_tls else "may"


class _KickingQueue:
    """The queue as the submission core sees it: each enqueue wakes delivery."""

    def __init__(self, queue: OutboundQueue, delivery: OutboundDelivery) -> None:
        self._queue = queue
        self._delivery = delivery

    def enqueue(
        self,
        sender: str,
        recipients: list[str],
        data: bytes | str,
        *,
        xverp: bool = False,
        params: dict[str, str] | None = None,
        dsn: Sequence[tuple[str, str]] | None = None,
        sign: bool = False,
    ) -> Deferred[Any]:
        d = self._queue.enqueue(
            sender, recipients, data, xverp=xverp, params=params, dsn=dsn, sign=sign
        )

        def kick(envelope: Any) -> Any:
            self._delivery.kick()
            return envelope

        return d.addCallback(kick)


def _resolver(servers: tuple[str, ...], reactor: Any) -> Any:
    """A DNS resolver: the configured servers, else those of /etc/resolv.conf."""
    from twisted.names import client

    if not servers:
        return client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
    parsed = []
    for server in servers:
        host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
        parsed.append((host or server, int(port) if port else 53))
    return client.Resolver(servers=parsed, reactor=reactor)


def _has_mode(description: str) -> bool:
    """Whether a C{unix:} endpoint string gives the socket's C{mode=} itself."""
    return any(part.strip().startswith("mode=") for part in description.split(":")[1:])


def _where(service: GsmailService, name: str, scheme: str = "") -> str:
    """
    Where listener C{name} listens, as an operator writes it (C{127.0.0.1:25},
    a path); C{scheme} goes before a TCP address.
    """
    try:
        address = service.port(name).getHost()
    except Exception:
        return str(getattr(service.config, f"{name}_endpoint"))
    if isinstance(address, UNIXAddress):
        return os.fsdecode(address.name or b"?")
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{scheme}{host}:{address.port}" if scheme else f"{address.host}:{address.port}"


def _pem_blocks(data: bytes) -> list[bytes]:
    """The certificates of a PEM bundle."""
    end = b"-----END CERTIFICATE-----"
    return [block + end for block in data.split(end) if b"-----BEGIN CERTIFICATE-----" in block]


def _result_now(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired (listen() on TCP/UNIX)."""
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("listening did not complete synchronously")
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


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
