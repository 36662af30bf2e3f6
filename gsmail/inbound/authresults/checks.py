# -*- test-case-name: tests.inbound.test_authresults,tests.integration.test_authresults -*-
"""
The authentication checks themselves, blocking (run them in a thread): SPF
(RFC 7208: the envelope sender, or the HELO name for the null sender,
against the client's IP address; pyspf), DKIM signatures (RFC 6376;
dkimpy), an ARC chain (RFC 8617; dkimpy) and the C{From} domain's DMARC
policy (RFC 7489), each lookup through L{DNS}, one dnspython resolver
bounded by what is left of the message's time budget. A DNS failure or
timeout is C{temperror}. What they found is kept in
L{gsmail.inbound.authresults.field.Checks}.

pyspf has no DNS argument: its module function C{DNSLookup} is what its
test suite replaces, so gsmail replaces it once (when this module is
imported) with one that uses the resolver of the check running in the
calling thread (a thread-local), and pyspf's own lookup everywhere else.

Not here: running the checks of one message within its budget
(L{gsmail.inbound.authresults}), or the C{Authentication-Results} field
and forged fields (L{gsmail.inbound.authresults.field}).
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections.abc import Callable, Sequence
from email.utils import getaddresses
from typing import Any, Final

import dkim
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import spf
from twisted.logger import Logger

from gsmail.inbound.authresults.field import Checks, DKIMResult, header_fields

__all__ = [
    "DNS",
    "MAX_SIGNATURES",
    "TempDNSError",
    "check_arc",
    "check_dkim",
    "check_dmarc",
    "check_spf",
    "dmarc_record",
    "from_domain",
    "make_resolver",
    "organizational_domain",
]

log = Logger()

#: DKIM signatures verified per message at most (each costs a DNS lookup).
MAX_SIGNATURES: Final = 8


class TempDNSError(Exception):
    """A DNS lookup failed for now (timeout, SERVFAIL, no server): C{temperror}."""


def make_resolver(servers: Sequence[str] = ()) -> dns.resolver.Resolver:
    """
    The resolver of the checks: C{servers} (C{host} or C{host:port}, as
    C{dns_servers}), else those of C{/etc/resolv.conf}. Blocking (reads the
    file): call it at start-up.

    @raise ValueError: a server is not an IP address (with a port).
    """
    if not servers:
        try:
            return dns.resolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            log.warn("No DNS servers in /etc/resolv.conf: the authentication checks ask 127.0.0.1")
            servers = ("127.0.0.1",)
    resolver = dns.resolver.Resolver(configure=False)
    nameservers: list[str | dns.nameserver.Nameserver] = []
    for server in servers:
        host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
        host = (host or server).strip("[]")
        ipaddress.ip_address(host)
        nameservers.append(dns.nameserver.Do53Nameserver(host, int(port) if port else 53))
    resolver.nameservers = nameservers
    return resolver


class DNS:
    """
    The DNS of one message's checks (used in its thread): every lookup is
    bounded by the time left until C{deadline}.

    @ivar failures: the lookups that failed for now (C{temperror}), in order.
    """

    def __init__(
        self,
        resolver: dns.resolver.Resolver,
        deadline: float,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = resolver
        self._deadline = deadline
        self._now = now
        self.failures: list[str] = []

    def query(self, name: str, rdtype: str) -> list[Any]:
        """
        The records of type C{rdtype} at C{name} (CNAMEs followed); C{[]}
        when the name or the type does not exist.

        @raise TempDNSError: the lookup failed or the budget is spent.
        """
        left = self._deadline - self._now()
        if left <= 0:
            self.failures.append(f"{name}/{rdtype}: no time left")
            raise TempDNSError(f"{name}: no time left")
        try:
            answer = self._resolver.resolve(
                name, rdtype, lifetime=left, raise_on_no_answer=False, search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.DNSException, OSError) as e:
            self.failures.append(f"{name}/{rdtype}: {e.__class__.__name__}")
            raise TempDNSError(f"{name}: {e.__class__.__name__}") from None
        return list(answer.rrset or [])

    def txt(self, name: str) -> list[bytes]:
        """The TXT records at C{name}, each with its strings joined."""
        return [b"".join(r.strings) for r in self.query(name, "TXT")]


# -- SPF ------------------------------------------------------------------------------

_local = threading.local()
_pyspf_lookup = spf.DNSLookup


def _spf_lookup(name: str, qtype: str, strict: Any = True, timeout: Any = 30) -> list[Any]:
    """pyspf's C{DNSLookup}, through the resolver of the check of this thread if any."""
    resolver: DNS | None = getattr(_local, "dns", None)
    if resolver is None:
        return _pyspf_lookup(name, qtype, strict, timeout)  # type: ignore[no-any-return]
    try:
        records = resolver.query(name, "TXT" if qtype == "SPF" else qtype)
    except TempDNSError as e:
        raise spf.TempError(f"DNS {e}") from None
    found: list[Any] = []
    for r in records:
        if qtype in ("A", "AAAA"):
            found.append(((name, qtype), r.address))
        elif qtype == "MX":
            found.append(((name, qtype), (r.preference, r.exchange)))
        elif qtype == "PTR":
            found.append(((name, qtype), r.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            found.append(((name, qtype), r.strings))
    return found


spf.DNSLookup = _spf_lookup


def check_spf(ip: str, mail_from: str, helo: str, resolver: DNS) -> tuple[str, str]:
    """
    The SPF result (RFC 7208 §2.6) for C{mail_from} (or, for the null
    sender, C{postmaster@helo}) sent from C{ip}, and pyspf's explanation.
    """
    _local.dns = resolver
    try:
        result, _, explanation = spf.query(ip, mail_from, helo, timeout=60).check()
    except Exception as e:  # pyspf on input it cannot take
        return "permerror", e.__class__.__name__
    finally:
        _local.dns = None
    return str(result), str(explanation or "")


# -- DKIM and ARC -----------------------------------------------------------------------


def check_dkim(message: bytes, resolver: DNS) -> list[DKIMResult]:
    """
    Each DKIM signature's result, top first (at most L{MAX_SIGNATURES});
    C{[]} when there is none.
    """
    try:
        verifier = dkim.DKIM(message, minkey=1024)
    except dkim.DKIMException as e:
        return [DKIMResult("permerror", reason=str(e)[:80])]
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    missing: list[bool] = []

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            records = resolver.txt(name.decode("ascii", "replace").rstrip("."))
        except TempDNSError as e:
            raise dkim.DnsTimeoutError(str(e)) from None
        if not records:
            missing.append(True)
            return None
        return records[0]

    results = []
    for index in range(min(count, MAX_SIGNATURES)):
        failures = len(resolver.failures)
        missing.clear()
        verifier.signature_fields = {}
        found = DKIMResult("fail")
        try:
            ok = verifier.verify(idx=index, dnsfunc=dnsfunc)
        except dkim.ValidationError as e:
            ok, found.reason = False, str(e)[:80]
        except dkim.DKIMException as e:
            ok, found.result, found.reason = False, "permerror", str(e)[:80]
        fields = verifier.signature_fields
        found.domain = fields.get(b"d", b"").decode("ascii", "replace")
        found.selector = fields.get(b"s", b"").decode("ascii", "replace")
        found.b = re.sub(rb"\s+", b"", fields.get(b"b", b""))[:8].decode("ascii", "replace")
        if ok:
            found.result = "pass"
        elif found.result == "fail" and len(resolver.failures) > failures:
            found.result, found.reason = "temperror", "key lookup failed"
        elif found.result == "fail" and missing:
            found.result, found.reason = "permerror", "no key"
        results.append(found)
    return results


def check_arc(message: bytes, resolver: DNS) -> str:
    """The ARC chain's validation status (RFC 8617 §5.2): C{pass}, C{fail} or C{none}."""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            records = resolver.txt(name.decode("ascii", "replace").rstrip("."))
        except TempDNSError as e:
            raise dkim.DnsTimeoutError(str(e)) from None
        return records[0] if records else None

    try:
        cv, _, _ = dkim.ARC(message, minkey=1024).verify(dnsfunc=dnsfunc)
    except Exception:
        return "fail"
    return cv.decode("ascii", "replace") if cv else "none"


# -- DMARC ---------------------------------------------------------------------------------

_psl_lock = threading.Lock()
_psl: Any = None


def organizational_domain(domain: str) -> str:
    """The registrable domain (RFC 7489 §3.2) of C{domain}, by the Public Suffix List."""
    global _psl
    with _psl_lock:
        if _psl is None:
            from publicsuffixlist import PublicSuffixList

            _psl = PublicSuffixList()
        psl = _psl
    return str(psl.privatesuffix(domain) or domain)


def dmarc_record(domain: str, resolver: DNS) -> dict[str, str] | None:
    """
    The DMARC record of C{domain} (C{_dmarc.DOMAIN}) as tags, or C{None}
    when it has none or more than one (RFC 7489 §6.6.3).

    @raise TempDNSError: the lookup failed.
    """
    records = [r for r in resolver.txt(f"_dmarc.{domain}") if r[:8].lower() == b"v=dmarc1"]
    if len(records) != 1:
        return None
    tags = {}
    for part in records[0].decode("ascii", "replace").split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags[name.strip().lower()] = value.strip().lower()
    return tags


def check_dmarc(from_domain: str, checks: Checks, resolver: DNS) -> tuple[str, str]:
    """
    The DMARC result (RFC 7489 §6.6) for C{from_domain} given the SPF and
    DKIM results in C{checks}, and the policy that applies (C{p}, or C{sp}
    for a subdomain under its organisational domain's record; C{""} when
    there is no record).
    """
    record = dmarc_record(from_domain, resolver)
    organizational = organizational_domain(from_domain)
    inherited = False
    if record is None and organizational != from_domain:
        record = dmarc_record(organizational, resolver)
        inherited = True
    if record is None:
        return "none", ""
    policy = record.get("p", "")
    if policy not in ("none", "quarantine", "reject"):
        if "rua" not in record:
            return "none", ""
        policy = "none"  # RFC 7489 §6.6.3 step 6
    if inherited and record.get("sp") in ("none", "quarantine", "reject"):
        policy = record["sp"]

    def aligned(domain: str, mode: str) -> bool:
        domain = domain.lower().rstrip(".")
        if mode == "s":
            return domain == from_domain
        return organizational_domain(domain) == organizational

    if checks.spf == "pass" and aligned(checks.smtp_mailfrom, record.get("aspf", "r")):
        return "pass", policy
    for signature in checks.dkim or ():
        if signature.result == "pass" and aligned(signature.domain, record.get("adkim", "r")):
            return "pass", policy
    return "fail", policy


def from_domain(header: bytes) -> str | None:
    """
    The domain of the one address of the one C{From} field (RFC 7489
    §6.6.1), lowercased, IDNA-encoded; C{None} when there is not exactly one.
    """
    froms = [value for name, value in header_fields(header) if name.lower() == b"from"]
    if len(froms) != 1:
        return None
    text = froms[0].decode("utf-8", "replace").replace("\n", " ")
    addresses = [a for _, a in getaddresses([text]) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    domain = addresses[0].rpartition("@")[2].strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
