# -*- test-case-name: tests.test_workers,tests.test_reload,tests.inbound.test_limits -*-
"""
The inbound side of gsmail, whole: L{InboundParts} (GroupServer client,
post ledger, delivery core, spool, listeners' factories), which the main
process (L{gsmail.service.GsmailService}) and each inbound worker process
(L{gsmail.workers}) build alike, and the start-up helpers it needs (the
TLS context, the route table, the authentication checks).

Here, not in C{gsmail.service}, so that the workers import it without
importing the service that starts them (no import circle).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail.anvil import Anvil, ClientLimits
from gsmail.config import (
    ConfigError,
    GsmailConfig,
    verp_key_path,
)
from gsmail.groupserver import GroupServerClient
from gsmail.handoff import SerialThread
from gsmail.inbound.authresults import AuthChecker
from gsmail.inbound.authresults.checks import make_resolver
from gsmail.inbound.delivery import DeliveryCore
from gsmail.inbound.postmaster import MaildirPostmaster
from gsmail.inbound.protocol import InboundFactory, ServerSettings
from gsmail.inbound.routing import SrsCodec
from gsmail.inbound.spool import SpoolAlarm, SpoolFiles
from gsmail.ledger import PostLedger
from gsmail.outbound.submission import (
    parse_networks,
)
from gsmail.reload import (
    Reload,
    ReloadError,
    load_contexts,
)
from gsmail.routes import RouteTable, RouteTableError, load_routes
from gsmail.startup import EX_CANTCREAT, StartupError
from gsmail.tlsconfig import ServerTLS, unusable_reason
from gsmail.verp import VerpPolicy, unsigned_until

if TYPE_CHECKING:
    pass


log = Logger()


def _thread_runner(reactor: Any) -> Callable[[Callable[[], None]], Deferred[None]]:
    """A hand-off of blocking work (fsync, copies) to the reactor's thread pool."""

    def run(f: Callable[[], None]) -> Deferred[None]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f)

    return run


def load_tls(config: GsmailConfig, profile: str | None = None) -> ServerTLS | None:
    """
    The server TLS context for STARTTLS (L{gsmail.tlsconfig}), or C{None}
    when no certificate is configured. The certificate file may hold the
    chain after the leaf.

    @param profile: the cipher profile; C{None}: the configuration's
        C{tls_ciphers}.
    @raise ConfigError: the files cannot be read or do not match.
    """
    if not config.tls_certificate:
        return None
    try:
        return ServerTLS.from_files(
            config.tls_certificate, config.tls_key, profile or config.tls_ciphers
        )
    except Exception as e:
        raise ConfigError(
            f"{config.path}: [gsmail-*] tls_certificate/tls_key: cannot load: {_why(e)}"
        ) from None


def with_backlog(description: str, backlog: int) -> str:
    """
    A listener description with C{backlog=BACKLOG} added for the stream
    types that take it (C{tcp}, C{tcp6}, C{unix}, C{ssl}) unless it names
    one already: Twisted's default of 50 drops connects under a burst
    (measured: 762 of 2,000 simultaneous connects never reached the server).
    The kernel caps it at C{net.core.somaxconn}.
    """
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in ("tcp", "tcp6", "unix", "ssl") or "backlog=" in description.lower():
        return description
    return f"{description}:backlog={backlog}"


def _why(error: Exception) -> str:
    """A short reason a TLS file or C{ssl:} description cannot be used (L{unusable_reason})."""
    return unusable_reason(error)


def _with_tls_profile(
    config: GsmailConfig, settings: ServerSettings, profile: str
) -> ServerSettings:
    """C{settings} with a TLS context of cipher C{profile} (the same object if it has one)."""
    if settings.tls is None or settings.tls.profile == profile:
        return settings
    return attrs.evolve(settings, tls=load_tls(config, profile))


class InboundParts:
    """
    The inbound delivery side of one process: the post ledger (with its
    fsync thread), the GroupServer client, the L{DeliveryCore}, the server
    settings and the reusable spool files. The main process has one; so does
    each inbound worker process (L{gsmail.workers}), all sharing the ledger
    file, which is safe for several processes (L{gsmail.ledger}).

    @param url: GroupServer's base URL (the configuration's, or the embedded
        stand-in's once it listens).
    @raise ConfigError: the TLS files cannot be loaded.
    @ivar verp: the site's L{VerpPolicy} (keys loaded by L{open}), shared
        with outbound delivery, which signs with it.
    """

    def __init__(self, config: GsmailConfig, reactor: Any, url: str) -> None:
        self.config = config
        # The ledger's fsyncs get a thread of their own: cheaper per job, and
        # never queued behind a long copy in the pool.
        self.ledger_sync = SerialThread(reactor, "gsmail-ledger")
        self.ledger = PostLedger(
            config.ledger_path,
            ttl=config.ledger_ttl,
            clock=reactor,
            sync=self.ledger_sync,
            commit_delay=config.ledger_commit_delay,
        )
        self.client = GroupServerClient(
            reactor,
            url,
            config.token,
            connect_timeout=config.connect_timeout,
            response_timeout=config.response_timeout,
            verify_tls=config.verify_tls,
            concurrency=config.post_concurrency,
        )
        self.verp = VerpPolicy(
            reactor,
            max_age=config.verp_max_age,
            unsigned_until=unsigned_until(
                config.verp_unsigned_until,
                signing=bool(config.submission_endpoint) and not config.relayhost_xverp,
            ),
            key_file=verp_key_path(config),
        )
        self.core = DeliveryCore(
            client=self.client,
            ledger=self.ledger,
            clock=reactor,
            hostname=config.hostname,
            domains=config.domains,
            relay_prefix=config.relay_address_prefix,
            time_source=config.time_source,
            reply_deadline=config.reply_deadline,
            group_cache_ttl=config.group_cache_ttl,
            group_negative_cache_ttl=config.group_negative_cache_ttl,
            postmaster=MaildirPostmaster(config.postmaster_maildir, _thread_runner(reactor)),
            verp=self.verp,
            blocking=lambda f: deferToThreadPool(reactor, reactor.getThreadPool(), f),
            auth=auth_checker(config, reactor),
            routes=read_routes(config),
            max_hops=config.max_hops,
            route_options={
                "spool_dir": config.spool_dir,
                "state_dir": config.route_state_dir,
                "errors_dir": config.errors_dir,
                "rejected_dir": config.rejected_dir,
                "srs_domain": config.srs_domain or config.domains[0],
            },
        )
        self.settings = ServerSettings(
            hostname=config.hostname,
            max_size=config.max_size,
            max_recipients=config.max_recipients,
            max_line_length=config.max_line_length,
            idle_timeout=config.idle_timeout,
            max_connections=config.max_connections,
            tls=load_tls(config),
            min_data_rate=config.min_data_rate,
            soft_error_limit=config.soft_error_limit,
            hard_error_limit=config.hard_error_limit,
            error_sleep_time=config.error_sleep_time,
            junk_command_limit=config.junk_command_limit,
            session_lookup_limit=config.session_lookup_limit,
            auth_failure_delay=config.auth_failure_delay,
        )
        # One set of per-client counters for every listener of the process.
        self.anvil = Anvil(
            ClientLimits(
                connection_count=config.client_connection_count_limit,
                connection_rate=config.client_connection_rate_limit,
                lookup_rate=config.client_lookup_rate_limit,
                auth_failures=config.client_auth_failure_limit,
                time_unit=config.anvil_rate_time_unit,
                exceptions=parse_networks(config.client_limit_exceptions),
            ),
            reactor,
        )
        # One set of reusable spool files for every listener of the process.
        self.spool_files = SpoolFiles(config.spool_dir)
        # And one log of spool faults (disk full), so a burst is logged once.
        self.spool_alarm = SpoolAlarm("spooling", reactor)
        self._reactor = reactor

    def factory(self, lmtp: bool) -> InboundFactory:
        """A new ESMTP (C{lmtp=False}) or LMTP listener factory over this core."""
        return InboundFactory(
            self.core,
            self.settings,
            self._reactor,
            lmtp=lmtp,
            spool_dir=self.config.spool_dir,
            spool_files=self.spool_files,
            spool_alarm=self.spool_alarm,
            anvil=self.anvil,
        )

    def open(self) -> None:
        """
        Make the state directories, load the ledger and the VERP keys (made
        when there is no key file) (blocking: before mail arrives).

        @raise VerpKeyError: the key file cannot be read or made.
        @raise StartupError: the ledger cannot be opened.
        """
        os.makedirs(os.path.dirname(os.path.abspath(self.config.ledger_path)), exist_ok=True)
        if self.config.spool_dir:
            os.makedirs(self.config.spool_dir, exist_ok=True)
        self.verp.load(make=True)
        if self.verp.keys is not None:
            self.core.actions.srs = SrsCodec(self.verp.keys.keys, self._reactor)
        try:
            self.ledger.open()
        except OSError as e:
            raise StartupError(
                f"ledger_path: cannot open the post ledger {self.config.ledger_path}: "
                f"{e.strerror or e}",
                EX_CANTCREAT,
            ) from None

    def prepare_reload(
        self,
        config: GsmailConfig,
        restart: Sequence[str] = (),
        own_tls: Sequence[ServerTLS] = (),
        more_tls: Sequence[ServerTLS] = (),
    ) -> Reload:
        """
        Read what a reload to C{config} needs (blocking: in a thread): the
        TLS contexts in use loaded again (C{tls_certificate}'s, and those of
        C{own_tls} from their own files), the route file.

        @param config: the configuration to run with (L{gsmail.reload.applied}).
        @param restart: the options that changed but need a restart.
        @param more_tls: contexts made from C{tls_certificate} besides this
            process's listeners' (the submission listener's).
        @raise ReloadError: something cannot be loaded; nothing was changed.
        """
        configured = [] if self.settings.tls is None else [self.settings.tls]
        configured += [tls for tls in more_tls if all(tls is not c for c in configured)]
        contexts = load_contexts(config, configured, own_tls)
        try:
            table = load_routes(config.routes, config.domains)
        except RouteTableError as e:
            raise ReloadError(f"routes: {e}") from None
        if table.uses_queue and (self.core.actions.queue is None or config.inbound_workers):
            raise ReloadError(
                f"routes: {config.routes} has forward, bcc or errors_to routes, which need the"
                " outbound queue (submission_endpoint, and inbound_workers = 0)"
            )
        return Reload(config, tuple(restart), table, contexts)

    def apply_reload(self, reload: Reload) -> None:
        """
        Apply a prepared reload (in the reactor thread; it only swaps
        objects): new sessions get the new TLS contexts (running ones keep
        theirs), the next recipient is checked against the new domains and
        route table, and the group lookup cache is emptied.
        """
        config = reload.config
        for in_use, loaded in reload.contexts:
            in_use.take(loaded)
        self.core.domains = config.domains
        self.core.actions.srs_domain = config.srs_domain or config.domains[0]
        self.core.routes = reload.routes
        self.core.directory.clear()
        self.config = config

    def reload(self, config: GsmailConfig) -> Deferred[bool]:
        """
        Reload to C{config} (L{prepare_reload} in a thread, then
        L{apply_reload}): what an inbound worker does when the main process
        sends it the configuration it reloaded. A failure is logged and
        changes nothing.

        @return: fires with whether it was applied.
        """
        d = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self.prepare_reload, config
        )

        def ready(reload: Reload) -> bool:
            self.apply_reload(reload)
            return True

        def failed(failure: Failure) -> bool:
            failure.trap(ReloadError)
            log.error(
                "Configuration not reloaded, everything stays as it was: {why}",
                why=str(failure.value),
            )
            return False

        return d.addCallbacks(ready, failed)

    async def wait_idle(self) -> None:
        """
        Let running deliveries finish, so nothing is posted without its
        ledger record; give up after C{reply_deadline} seconds (logged).
        """
        idle = self.core.when_idle()
        idle.addTimeout(self.config.reply_deadline, self._reactor)
        try:
            await idle
        except Exception:
            log.warn("Stopped with deliveries still running")

    async def close(self) -> None:
        """Close the ledger (after its last fsync), the spool files and the client."""
        await self.ledger.close()
        self.ledger_sync.stop()
        self.spool_files.close()
        await self.client.close()


def auth_checker(config: GsmailConfig, reactor: Any) -> AuthChecker | None:
    """
    The authentication checks of mail from the internet
    (L{gsmail.inbound.authresults}), or C{None} when
    C{authentication_results} is off or there is no ESMTP listener.
    """
    if not config.authentication_results or not config.smtp_endpoint:
        return None
    return AuthChecker(
        authserv_id=config.hostname,
        resolver=make_resolver(config.dns_servers),
        clock=reactor,
        blocking=lambda f: deferToThreadPool(reactor, reactor.getThreadPool(), f),
        budget=config.auth_check_time,
        exceptions=parse_networks(config.auth_check_exceptions),
    )


def read_routes(config: GsmailConfig) -> RouteTable:
    """
    The route table of C{config} (blocking: start-up only).

    @raise ConfigError: the file cannot be read or used.
    """
    try:
        return load_routes(config.routes, config.domains)
    except RouteTableError as e:
        raise ConfigError(f"[gsmail-*] routes: {e}") from None
