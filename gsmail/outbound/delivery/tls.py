# -*- test-case-name: tests.outbound.test_delivery,tests.integration.test_mta_sts -*-
"""
The outbound delivery's TLS decisions: L{TLSPolicy}, how to use STARTTLS
towards a smarthost or MX hosts (the defaults L{SMARTHOST_TLS} and
L{MX_TLS}), and what an MTA-STS policy (RFC 8461) makes of the MX hosts to
try and of each session's TLS outcome (which hosts are listed, what is
logged and counted for TLS reports, the reply recorded in enforce mode).

Not here: fetching and caching the policies (L{gsmail.outbound.mtasts}),
the counts (L{gsmail.outbound.tlsrpt}), the connection attempts that ask
(L{gsmail.outbound.delivery.session}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import ssl
from twisted.logger import Logger

from gsmail.outbound.client import ClientTLS, SMTPClientError
from gsmail.outbound.mtasts import ENFORCE, Policy, STSClientTLS
from gsmail.outbound.mx import MXHost
from gsmail.status import Reply

if TYPE_CHECKING:
    from gsmail.outbound.tlsrpt import TLSReportCounts

__all__ = ["MX_TLS", "SMARTHOST_TLS", "TLSPolicy"]

#: The delivery's log namespace, as before the split (log lines unchanged).
log = Logger(namespace="gsmail.outbound.delivery")


@attrs.frozen
class TLSPolicy:
    """
    How to use TLS towards one kind of destination.

    @ivar use: offer STARTTLS when the server does (C{False}: gs.email's
        C{no_tls}).
    @ivar require: never send in clear (gs.email's C{force_tls}): no STARTTLS
        or a failed handshake keeps the message queued (transient).
    @ivar verify: verify the certificate and host name (service-identity).
    @ivar name: the name to verify instead of the host's (a smarthost reached
        as C{localhost}, as Synapse's C{tlsname}).
    @ivar trust_root: CA certificates to trust instead of the system's (tests,
        private CAs); C{None}: the platform trust.
    """

    use: bool = True
    require: bool = False
    verify: bool = True
    name: str = ""
    trust_root: Any = attrs.field(default=None, repr=False)

    def context(self, host: str) -> ClientTLS | None:
        """The STARTTLS context for C{host}, or C{None} when TLS is off."""
        if not self.use:
            return None
        if self.verify:
            return ClientTLS(ssl.optionsForClientTLS(self.name or host, trustRoot=self.trust_root))
        return ClientTLS(ssl.CertificateOptions(verify=False))  # type: ignore[arg-type]


#: Smarthost default: verified STARTTLS when offered.
SMARTHOST_TLS = TLSPolicy()
#: MX default: opportunistic STARTTLS, not verified (RFC 7435).
MX_TLS = TLSPolicy(verify=False)


class _MTASTSDecisions:
    """
    The MTA-STS part of L{gsmail.outbound.delivery.OutboundDelivery} (a
    mixin): it reads the delivery's C{tls_report}.
    """

    tls_report: TLSReportCounts | None

    def _sts_hosts(self, domain: str, sts: Policy, hosts: list[MXHost]) -> list[MXHost]:
        """
        The MX hosts to try under C{sts}: in enforce mode only those the
        policy lists (RFC 8461 §4.1); each one it does not list is logged
        (and counted for TLS reports), in testing mode too.
        """
        listed = []
        for host in hosts:
            if sts.matches(host.name):
                listed.append(host)
                continue
            log.warn(
                "MTA-STS {mode}: MX host {mx_host} of {domain} is not listed in its policy{what}",
                mode=sts.mode,
                mx_host=host.name,
                domain=domain,
                what=" (skipped, 4.7.5)" if sts.mode == ENFORCE else "",
                enhanced_status="4.7.5",
            )
            if self.tls_report is not None:
                self.tls_report.failure(domain, sts, "validation-failure", host.name)
        return listed if sts.mode == ENFORCE else hosts

    def _sts_connected(self, domain: str, sts: Policy, tls: STSClientTLS, encrypted: bool) -> None:
        """A session opened under C{sts} (enforce: verified; testing: maybe not)."""
        if encrypted and tls.failure is None:
            if self.tls_report is not None:
                self.tls_report.success(domain, sts)
            return
        result = tls.failure or "starttls-not-supported"
        log.warn(
            "MTA-STS {mode}: {mx_host} of {domain}: {detail}; delivering anyway",
            mode=sts.mode,
            mx_host=tls.host,
            domain=domain,
            detail=tls.detail if tls.failure else "no STARTTLS",
            result_type=result,
        )
        if self.tls_report is not None:
            self.tls_report.failure(domain, sts, result, tls.host)

    def _sts_refused(
        self, domain: str, sts: Policy, tls: STSClientTLS, error: SMTPClientError, reply: Reply
    ) -> Reply:
        """
        The reply to record when a connection under C{sts} failed: for a
        policy failure (enforce mode) one that says so, as Postfix's
        C{4.7.5} for a certificate it could not verify.
        """
        if tls.failure is not None:
            result, detail = tls.failure, tls.detail
        elif error.enhanced == "4.7.4":
            result, detail = "starttls-not-supported", "no STARTTLS"
        elif error.enhanced == "4.7.5":
            result, detail = "validation-failure", error.detail
        else:
            return reply  # not a TLS failure: no connection, a refusal
        if self.tls_report is not None:
            self.tls_report.failure(domain, sts, result, tls.host)
        if sts.mode != ENFORCE:
            return reply
        log.warn(
            "MTA-STS enforce: {mx_host} of {domain}: {detail} (4.7.5, the message stays queued)",
            mx_host=tls.host,
            domain=domain,
            detail=detail,
            result_type=result,
            enhanced_status="4.7.5" if result != "starttls-not-supported" else "4.7.4",
        )
        enhanced = "4.7.4" if result == "starttls-not-supported" else "4.7.5"
        return Reply(451, enhanced, f"gsmail: MTA-STS policy of {domain}: {detail} at {tls.host}")
