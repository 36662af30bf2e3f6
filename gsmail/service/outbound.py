# -*- test-case-name: tests.integration.test_outbound,tests.test_control,tests.integration.test_dkim -*-
"""
The outbound side of L{gsmail.service.GsmailService}, wired together
(L{OutboundSide}, when C{submission_endpoint} is set): the outbound queue
and its journal thread, DKIM signing, DNS, MX and MTA-STS, delivery, the
submission listener's factory, C{gsmail-queue}'s control socket, and the
hand-off of mail for this site's own domains to the inbound delivery core
(L{deliver_locally}).

Not the queue or delivery themselves (L{gsmail.outbound}), nor when they
start and stop (L{gsmail.service}).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import ssl
from twisted.internet.defer import Deferred

from gsmail import status
from gsmail.addresses import AddressError, parse_mailbox
from gsmail.config import GsmailConfig, mta_sts_cache_path
from gsmail.control import ControlFactory, ControlService, QueueControl, control_path
from gsmail.handoff import SerialThread
from gsmail.inbound.delivery import DeliveryCore
from gsmail.inbound.parts import InboundParts, _with_tls_profile
from gsmail.inbound.postmaster import ForwardPostmaster
from gsmail.inbound.protocol import Envelope, ServerSettings, Session
from gsmail.inbound.spool import Spool, SpoolAlarm
from gsmail.outbound.delivery import OutboundDelivery, TLSPolicy
from gsmail.outbound.mtasts import MTASTS
from gsmail.outbound.mtasts.cache import PolicyCache
from gsmail.outbound.mx import MXResolver
from gsmail.outbound.queue import OutboundQueue
from gsmail.outbound.relayhost import parse_relayhost
from gsmail.outbound.submission import (
    PasswordChecker,
    SubmissionCore,
    SubmissionFactory,
    parse_networks,
)
from gsmail.outbound.tlsrpt import TLSReportCounts
from gsmail.signing import DKIMSigner, KeyRing, parse_key_specs
from gsmail.status import Reply

__all__ = [
    "KickingQueue",
    "OutboundSide",
    "deliver_locally",
    "dkim_signer",
    "dns_resolver",
    "submission_tls_level",
]


class OutboundSide:
    """
    The submission listener's factory, the outbound queue and delivery,
    made from the configuration; nothing is read from disk or started yet
    (L{gsmail.service.GsmailService} does that).

    @param inbound: the main process's inbound side (its VERP policy, spool
        and client limits are shared).
    @param settings: the inbound listeners' settings (the submission
        listener takes them with Mozilla's intermediate TLS profile).
    @param blocking: the hand-off of blocking work to the thread pool.
    @param local_delivery: delivers mail for this site's own domains
        (L{deliver_locally}).
    @ivar journal_sync: the journal's group commits' thread.
    @ivar delivery: the L{OutboundDelivery}.
    @ivar control: C{gsmail-queue}'s control service (to be added to the
        service: it listens once the queue is loaded).
    """

    def __init__(
        self,
        config: GsmailConfig,
        reactor: Any,
        inbound: InboundParts,
        settings: ServerSettings,
        blocking: Any,
        local_delivery: Callable[[str, str, str], Deferred[Reply]],
    ) -> None:
        self.reactor = reactor
        self._blocking = blocking
        self.tls_report: TLSReportCounts | None = None
        self.mta_sts: MTASTS | None = None
        # The journal's group commits (one or more per transaction delivered)
        # get a thread of their own, as the ledger's fsyncs do.
        self.journal_sync = SerialThread(self.reactor, "gsmail-journal")
        self.signer = dkim_signer(config)
        self.queue = OutboundQueue(
            config.queue_dir,
            clock=self.reactor,
            sync=blocking,
            journal_sync=self.journal_sync,
            signer=None if self.signer is None else self.signer.queue_signer,
        )
        self.dns = dns_resolver(config.dns_servers, self.reactor)
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
        mx = self.mx = MXResolver(self.dns, self.reactor)
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
                resolver=self.dns,
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
        self.delivery = OutboundDelivery(
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
            local_delivery=local_delivery,
            trace=config.smtp_trace,
            mx_port=config.mx_port,
            pass_xverp=config.relayhost_xverp,
            delay_warning_time=config.delay_warning_time,
            verp=inbound.verp,
            mta_sts=self.mta_sts,
            tls_report=self.tls_report,
        )
        checker = None
        if config.smtp_username:
            checker = PasswordChecker(config.smtp_username, config.smtp_password)
        self.submission_factory = SubmissionFactory(
            SubmissionCore(
                KickingQueue(self.queue, self.delivery), SpoolAlarm("queueing", self.reactor)
            ),
            # Submission clients are current MUAs and GroupServer: Mozilla's set.
            _with_tls_profile(config, settings, "intermediate"),
            self.reactor,
            trusted_networks=parse_networks(config.submission_networks),
            checker=checker,
            tls_security_level=submission_tls_level(config),
            spool_dir=config.spool_dir,
            spool_files=inbound.spool_files,
            spool_alarm=inbound.spool_alarm,
            anvil=inbound.anvil,
        )
        # Listens in startService, after the queue is loaded (gsmail-queue).
        control = QueueControl(
            self.queue, self.delivery if config.processorthread else None, self.reactor
        )
        self.control = ControlService(control_path(config), ControlFactory(control), self.reactor)

    def wire(self, core: DeliveryCore, config: GsmailConfig) -> None:
        """
        Let the inbound delivery C{core} queue here: forward, bcc and
        errors_to routes, and postmaster mail with C{postmaster_address}.
        """
        # Forward, bcc and errors_to routes queue here too.
        core.actions.queue = KickingQueue(self.queue, self.delivery)
        if config.postmaster_address:
            core.postmaster = ForwardPostmaster(
                KickingQueue(self.queue, self.delivery),
                config.postmaster_address,
                config.spool_dir,
                self._blocking,
            )


async def deliver_locally(
    core: DeliveryCore, config: GsmailConfig, sender: str, recipient: str, path: str
) -> Reply:
    """
    Mail from the outbound queue to this site's own domains (DSNs to VERP
    addresses, mostly) goes straight into the inbound delivery C{core}, so
    a bounce becomes a bounce record without a round trip through DNS.

    @param path: the queued message file (copied into a spool file).
    @return: the core's reply for C{recipient}.
    """
    session = Session(peer="local", protocol_name="ESMTP", helo=config.hostname, extended=True)
    try:
        address = parse_mailbox(recipient)
        envelope = Envelope(sender=parse_mailbox(sender) if sender else None)
    except AddressError:
        return status.BAD_RECIPIENT_SYNTAX
    reply, route = await core.check_recipient(session, address)
    if route is None:
        return reply
    envelope.recipients.append(route)
    spool = Spool(config.spool_dir)
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 16), b""):
                spool.write(chunk)
    except OSError:
        spool.discard()
        raise
    [result] = await core.deliver(session, envelope, spool.finish())
    return result


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


class KickingQueue:
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


def dns_resolver(servers: tuple[str, ...], reactor: Any) -> Any:
    """A DNS resolver: the configured servers, else those of /etc/resolv.conf."""
    from twisted.names import client

    if not servers:
        return client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
    parsed = []
    for server in servers:
        host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
        parsed.append((host or server, int(port) if port else 53))
    return client.Resolver(servers=parsed, reactor=reactor)


def _pem_blocks(data: bytes) -> list[bytes]:
    """The certificates of a PEM bundle."""
    end = b"-----END CERTIFICATE-----"
    return [block + end for block in data.split(end) if b"-----BEGIN CERTIFICATE-----" in block]
