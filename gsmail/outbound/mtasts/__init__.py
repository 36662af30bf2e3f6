# -*- test-case-name: tests.outbound.test_mtasts,tests.integration.test_mta_sts -*-
"""
MTA-STS (RFC 8461): a recipient domain's published wish that mail to it
travel only to the MX hosts it lists, over TLS with a certificate verified
for the MX host's name. Postfix needs a separate daemon for this
(postfix-mta-sts-resolver); gsmail does it in the outbound delivery.

  - L{gsmail.outbound.mtasts.policy}: the pure parts (the C{_mta-sts} TXT
    record, RFC 8461 §3.1; the policy file, §3.2; MX patterns, §4.1);
  - L{gsmail.outbound.mtasts.cache}: policies by domain, with their C{id}
    and time of fetch, one JSON file per domain under the state directory,
    so they survive a restart (§5.1: a cached unexpired policy applies even
    when the fetch fails);
  - L{MTASTS}: the policy that applies to a domain now: the TXT record
    through the same C{IResolver} as MX lookups, then (when the C{id} is new
    or the cached policy expired) C{https://mta-sts.DOMAIN/.well-known/mta-sts.txt}
    with treq over verified TLS, no redirects, at most L{MAX_POLICY_SIZE}
    bytes, within a timeout (§3.3);
  - L{STSClientTLS}: the client side of STARTTLS towards an MX under a
    policy: TLS 1.2 or later (§4.2), the chain verified against the trust
    root and the certificate against the MX host name (C{service_identity}).
    In C{enforce} mode a failure ends the handshake; in C{testing} mode it
    is only recorded, for one log line and the TLS-RPT counts (RFC 8460).

What the delivery does with a policy is in L{gsmail.outbound.delivery}.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

import treq
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IResolver
from twisted.logger import Logger
from twisted.names import dns, error
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from gsmail.outbound.mtasts.cache import PolicyCache, StoredPolicy
from gsmail.outbound.mtasts.policy import (
    ENFORCE,
    MAX_POLICY_SIZE,
    NONE,
    Policy,
    PolicyError,
    parse_policy,
    parse_txt_records,
)
from gsmail.twistedcompat import add_trust_root

__all__ = [
    "CHECK_INTERVAL",
    "MTASTS",
    "STSClientTLS",
    "WELL_KNOWN",
    # Used from here by the delivery (gsmail.outbound.delivery, delivery_session).
    "ENFORCE",
    "NONE",
    "Policy",
]

log = Logger()

#: The policy's path on C{https://mta-sts.DOMAIN} (RFC 8461 §3.2).
WELL_KNOWN: Final = "/.well-known/mta-sts.txt"
#: Seconds a domain's outcome (policy or none) is reused before its TXT
#: record is looked up again; never past the cached policy's expiry.
CHECK_INTERVAL: Final = 300.0

_DOMAIN: Final = re.compile(r"[a-z0-9_\-]+(\.[a-z0-9_\-]+)+\Z")


# -- finding the policy that applies ---------------------------------------------


@implementer(IAgentEndpointFactory)
class _PolicyEndpoints:
    """Connects the policy fetch to an address found through our resolver."""

    def __init__(
        self,
        reactor: Any,
        address: str,
        port: int,
        tls: BrowserLikePolicyForHTTPS,
        timeout: float,
    ) -> None:
        self._reactor = reactor
        self._address = address
        self._port = port
        self._tls = tls
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> Any:  # noqa: N802 (Twisted calls it)
        kind = TCP6ClientEndpoint if ":" in self._address else TCP4ClientEndpoint
        tcp = kind(self._reactor, self._address, self._port, timeout=self._timeout)
        return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), tcp)


class MTASTS:
    """
    The MTA-STS policy of recipient domains, for MX delivery.

    L{policy} answers at most every L{CHECK_INTERVAL} seconds per domain from
    DNS and HTTPS, else from memory; concurrent calls for one domain share
    one lookup.

    @ivar cache: the L{PolicyCache}.
    @ivar timeout: seconds the TXT lookup and the fetch may take, each.
    @ivar trust_root: the CAs that policy servers' and MX hosts'
        certificates must chain to (C{None}: the platform's).
    """

    def __init__(
        self,
        *,
        reactor: Any,
        resolver: IResolver,
        addresses: Callable[[str], Deferred[list[str]]],
        cache: PolicyCache,
        timeout: float = 30.0,
        trust_root: Any = None,
        https_port: int = 443,
        check_interval: float = CHECK_INTERVAL,
        user_agent: str = "gsmail MTA-STS",
        report: Callable[[str, Policy | None, str, str], None] | None = None,
    ) -> None:
        """
        @param reactor: for the HTTPS connection and the clock.
        @param resolver: the C{IResolver} for the C{_mta-sts} TXT records
            (the one MX lookups use).
        @param addresses: the addresses of a host name (e.g.
            L{gsmail.outbound.mx.MXResolver.host_addresses}): where
            C{mta-sts.DOMAIN} is fetched from.
        @param trust_root: the CAs the policy servers' certificates must
            chain to; C{None}: the platform's (web PKI, RFC 8461 §3.3).
        @param https_port: 443; tests give their server's.
        @param report: called as C{report(domain, cached policy, result
            type, detail)} when a policy could not be fetched (TLS-RPT).
        """
        self.reactor = reactor
        self._resolver = resolver
        self._addresses = addresses
        self.cache = cache
        self.timeout = timeout
        self.trust_root = trust_root
        self._tls = BrowserLikePolicyForHTTPS(trustRoot=trust_root)
        self._port = https_port
        self._interval = check_interval
        self._user_agent = user_agent
        self._report = report
        self._checked: dict[str, tuple[float, Policy | None]] = {}
        self._inflight: dict[str, list[Deferred[Policy | None]]] = {}

    def client_tls(self, host: str, policy: Policy) -> STSClientTLS:
        """The STARTTLS context for MX host C{host} under C{policy} (one connection)."""
        return STSClientTLS(host, enforce=policy.mode == ENFORCE, trust_root=self.trust_root)

    def policy(self, domain: str) -> Deferred[Policy | None]:
        """
        The policy that applies to mail for C{domain} now (RFC 8461 §5.1).

        A cached unexpired policy whose C{id} is still published is used as
        it is; a new C{id}, or an expired policy, is fetched. When the TXT
        record is gone or DNS fails, or the fetch fails, a cached unexpired
        policy still applies (§3.3, §5.1); without one, C{None}.

        @param domain: the recipient domain, A-labels, lowercase.
        @return: never fails: C{None} when no policy applies (deliver as
            without MTA-STS).
        """
        domain = domain.lower().rstrip(".")
        if not _DOMAIN.match(domain):
            return succeed(None)
        now = self.reactor.seconds()
        checked = self._checked.get(domain)
        if checked is not None and checked[0] > now:
            return succeed(checked[1])
        waiter: Deferred[Policy | None] = Deferred()
        waiters = self._inflight.get(domain)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._inflight[domain] = [waiter]
        Deferred.fromCoroutine(self._decide(domain)).addBoth(self._decided, domain)
        return waiter

    def _decided(self, result: Policy | None | Failure, domain: str) -> None:
        if isinstance(result, Failure):
            log.failure("Finding the MTA-STS policy of {domain} failed", result, domain=domain)
            result = self._usable(domain)
        now = self.reactor.seconds()
        until = now + self._interval
        stored = self.cache.get(domain)
        if stored is not None and stored.expires > now:
            until = min(until, stored.expires)
        if len(self._checked) > 10_000:
            self._checked = {k: v for k, v in self._checked.items() if v[0] > now}
        self._checked[domain] = (until, result)
        for waiter in self._inflight.pop(domain, []):
            waiter.callback(result)

    def _usable(self, domain: str) -> Policy | None:
        """The cached policy of C{domain} if it has not expired."""
        stored = self.cache.get(domain)
        if stored is None:
            return None
        if stored.expires <= self.reactor.seconds():
            self.cache.forget(domain).addErrback(
                lambda f: log.error(
                    "Could not remove the expired MTA-STS policy of {domain}: {error}",
                    domain=domain,
                    error=str(f.value),
                )
            )
            return None
        return stored.policy

    async def _decide(self, domain: str) -> Policy | None:
        try:
            policy_id = await self._txt(domain)
        except _DNSFailed as e:
            log.info(
                "MTA-STS: TXT lookup for {domain} failed ({error}); using the cached policy if any",
                domain=domain,
                error=str(e),
            )
            return self._usable(domain)
        if policy_id is None:
            # No record is not enough to drop a cached policy (§3.1).
            return self._usable(domain)
        stored = self.cache.get(domain)
        now = self.reactor.seconds()
        if stored is not None and stored.policy_id == policy_id and stored.expires > now:
            return stored.policy
        try:
            policy = await self._timed(self._fetch(domain))
        except PolicyError as e:
            cached = self._usable(domain)
            log.warn(
                "MTA-STS: no policy from mta-sts.{domain} ({result_type}: {error}); {what}",
                domain=domain,
                result_type=e.result_type,
                error=str(e),
                what="keeping the cached one" if cached else "delivering without MTA-STS",
            )
            if self._report is not None:
                self._report(domain, cached, e.result_type, str(e))
            return cached
        if stored is None or stored.policy != policy or stored.policy_id != policy_id:
            log.info(
                "MTA-STS: policy {policy_id} of {domain}: mode {mode}, mx {mx}, max_age {max_age}",
                policy_id=policy_id,
                domain=domain,
                mode=policy.mode,
                mx=" ".join(policy.mx),
                max_age=policy.max_age,
            )
        self.cache.put(StoredPolicy(domain, policy_id, now, policy)).addErrback(lambda f: None)
        return policy

    async def _timed(self, coroutine: Coroutine[Any, Any, Policy]) -> Policy:
        d = Deferred.fromCoroutine(coroutine)
        d.addTimeout(self.timeout, self.reactor)
        try:
            return await d
        except (DeferredTimeoutError, CancelledError):
            raise PolicyError(
                f"no policy within {self.timeout:g} s", "sts-policy-fetch-error"
            ) from None

    async def _txt(self, domain: str) -> str | None:
        """The C{id} of C{_mta-sts.DOMAIN}, C{None} without a usable record."""
        lookup: Callable[[str], Deferred[Any]] = getattr(self._resolver, "lookupText")  # noqa: B009
        d = lookup("_mta-sts." + domain)
        d.addTimeout(self.timeout, self.reactor)
        try:
            answers, _authority, _additional = await d
        except (error.DNSNameError, error.AuthoritativeDomainError):
            return None
        except Exception as e:
            raise _DNSFailed(type(e).__name__) from e
        records: list[Sequence[bytes]] = [rr.payload.data for rr in answers if rr.type == dns.TXT]
        return parse_txt_records(records)

    async def _fetch(self, domain: str) -> Policy:
        """
        Fetch and parse the policy of C{domain}.

        @raise PolicyError: with the RFC 8460 result type.
        """
        host = "mta-sts." + domain
        try:
            addresses = await self._addresses(host)
        except Exception as e:
            raise PolicyError(f"{host}: {e}", "sts-policy-fetch-error") from e
        if not addresses:
            raise PolicyError(f"{host} has no address", "sts-policy-fetch-error")
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        agent = Agent.usingEndpointFactory(
            self.reactor,
            _PolicyEndpoints(self.reactor, addresses[0], self._port, self._tls, self.timeout),
            pool=pool,
        )
        client = HTTPClient(agent)
        url = (
            f"https://{host}{WELL_KNOWN}"
            if self._port == 443
            else (f"https://{host}:{self._port}{WELL_KNOWN}")
        )
        try:
            response = await client.get(
                url,
                headers=Headers({"User-Agent": [self._user_agent]}),
                allow_redirects=False,  # RFC 8461 §3.3: redirects are not followed
                unbuffered=True,
                reactor=self.reactor,
            )
        except (ResponseNeverReceived, ResponseFailed) as e:
            reasons = e.reasons
            raise PolicyError(
                f"{host}: {_reasons(reasons)}",
                "sts-webpki-invalid" if _tls_failed(reasons) else "sts-policy-fetch-error",
            ) from e
        except Exception as e:
            raise PolicyError(f"{host}: {e}", "sts-policy-fetch-error") from e
        if response.code != 200:
            _discard(response)
            raise PolicyError(f"{host}: HTTP status {response.code}", "sts-policy-fetch-error")
        kind = (response.headers.getRawHeaders("content-type") or [""])[0]
        if kind.split(";")[0].strip().lower() != "text/plain":
            _discard(response)
            raise PolicyError(f"{host}: media type {kind[:40]!r}, not text/plain")
        if isinstance(response.length, int) and response.length > MAX_POLICY_SIZE:
            _discard(response)
            raise PolicyError(f"{host}: policy larger than {MAX_POLICY_SIZE} bytes")
        body = bytearray()

        def collect(data: bytes) -> None:
            body.extend(data)
            if len(body) > MAX_POLICY_SIZE:
                raise PolicyError(f"{host}: policy larger than {MAX_POLICY_SIZE} bytes")

        try:
            await treq.collect(response, collect)
        except PolicyError:
            raise
        except Exception as e:
            raise PolicyError(f"{host}: {e}", "sts-policy-fetch-error") from e
        try:
            return parse_policy(bytes(body))
        except PolicyError as e:
            raise PolicyError(f"{host}: {e}") from e


class _DNSFailed(Exception):
    """The TXT lookup failed (not NXDOMAIN): SERVFAIL, a timeout."""


def _discard(response: Any) -> None:
    """Close a response whose body is not wanted."""
    try:
        response.deliverBody(_Discard())
    except Exception:
        pass


class _Discard:
    """A body protocol that drops the connection at once."""

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        pass

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        pass


def _reasons(reasons: list[Failure]) -> str:
    return "; ".join(str(r.value) or type(r.value).__name__ for r in reasons)[:300]


def _tls_failed(reasons: list[Failure]) -> bool:
    return any(r.check(SSL.Error, VerificationError) for r in reasons)


# -- STARTTLS under a policy ----------------------------------------------------------

# OpenSSL's X509_V_ERR_CERT_HAS_EXPIRED and X509_V_ERR_CERT_NOT_YET_VALID.
_EXPIRED: Final = frozenset({9, 10})
# OpenSSL's texts for the verification errors seen in practice (x509_txt.c).
_X509_ERRORS: Final = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    26: "unsupported certificate purpose",
}


class _VerificationFailed(Exception):
    """The MX's certificate does not satisfy the policy (enforce mode)."""


@implementer(IOpenSSLClientConnectionCreator)
class STSClientTLS:
    """
    The STARTTLS context for one connection to an MX host under a policy
    (RFC 8461 §4.2): TLS 1.2 or later, the certificate chain verified
    against C{trust_root}, the leaf against the MX host's name (DNS-ID,
    C{service_identity}; wildcard certificates as RFC 6125).

    After the handshake L{failure} says what was wrong, as an RFC 8460
    result type (C{certificate-expired}, C{certificate-not-trusted},
    C{certificate-host-mismatch}), with L{detail}; C{None} when the
    certificate was verified. In enforce mode the first failure ends the
    handshake (the client reports C{4.7.5}); in testing mode it does not.

    One instance per connection attempt.
    """

    def __init__(self, host: str, *, enforce: bool, trust_root: Any = None) -> None:
        """
        @param host: the MX host's name (ASCII, lowercase).
        @param enforce: fail the handshake on a failure.
        @param trust_root: an C{IOpenSSLTrustRoot}; C{None}: the platform's.
        """
        self.host = host
        self.enforce = enforce
        self.failure: str | None = None
        self.detail = ""
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION)
        add_trust_root(trust_root or ssl.platformTrust(), context)
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802, N803
        """A connection for one handshake (Twisted calls this)."""
        connection = SSL.Connection(self._context, None)
        connection.set_tlsext_host_name(self.host.encode("ascii"))
        protocol: Any = tlsProtocol

        def verify(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
            nonlocal protocol
            try:
                if self.failure is None:
                    if not ok:
                        self.failure = (
                            "certificate-expired"
                            if errno in _EXPIRED
                            else "certificate-not-trusted"
                        )
                        reason = _X509_ERRORS.get(errno, f"X.509 error {errno}")
                        self.detail = f"certificate not verified: {reason} (depth {depth})"
                    elif depth == 0:
                        try:
                            verify_service_identity(extract_patterns(cert), [DNS_ID(self.host)], [])
                        except VerificationError:
                            self.failure = "certificate-host-mismatch"
                            self.detail = f"certificate not issued for {self.host}"
                if self.failure is not None and self.enforce and protocol is not None:
                    protocol.failVerification(Failure(_VerificationFailed(self.detail)))
                    protocol = None
                    return False
            except Exception:
                log.failure("Verifying the certificate of {mx_host}", mx_host=self.host)
                return not self.enforce
            return not self.enforce or self.failure is None

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection

    def __repr__(self) -> str:
        return f"<STSClientTLS {self.host} enforce={self.enforce}>"
