# -*- test-case-name: tests.inbound.test_authresults -*-
"""
C{Authentication-Results} (RFC 8601) for mail from the internet: before a
message is posted, gsmail checks SPF (RFC 7208: the envelope sender, or the
HELO name for the null sender, against the client's IP address; pyspf), the
message's DKIM signatures (RFC 6376; dkimpy), an ARC chain if it has one
(RFC 8617; dkimpy) and the C{From} domain's DMARC policy (RFC 7489), and
puts one field naming gsmail's host at the top of the message::

    Authentication-Results: mx.groups.example.com;
    \tspf=pass smtp.mailfrom=example.org;
    \tdkim=pass header.d=example.org header.s=sel header.b=AbCdEfGh;
    \tdmarc=pass (p=reject) header.from=example.org

Fields already in the message that claim to come from gsmail's host are
forgeries (RFC 8601 §5): they are removed, whatever else happens.

The libraries do their DNS work blocking, so the checks run in a thread
(L{AuthChecker}'s C{blocking}, the reactor's pool), each lookup through
one dnspython resolver (C{dns_servers}, else C{/etc/resolv.conf}) and
bounded by what is left of the message's time budget (C{auth_check_time}).
A DNS failure or timeout is C{temperror}; a check not finished when the
budget is spent is C{temperror} too, and the message is posted anyway. The
checks never refuse, delay beyond the budget or fail a delivery.

pyspf has no DNS argument: its module function C{DNSLookup} is what its
test suite replaces, so gsmail replaces it once with one that uses the
resolver of the check running in the calling thread (a thread-local), and
pyspf's own lookup everywhere else.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from email.utils import getaddresses
from typing import Any, Final

import attrs
import dkim
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import spf
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gsmail.inbound.protocol import Envelope, Session
from gsmail.inbound.spool import SpooledMessage

__all__ = [
    "AuthChecker",
    "AuthOutcome",
    "Checks",
    "DNS",
    "TempDNSError",
    "authenticate",
    "forged_fields",
    "format_field",
    "make_resolver",
    "remove_fields",
]

log = Logger()

#: Messages larger than this (bytes) are not read whole for DKIM: their
#: signatures are C{neutral} (dkimpy needs the whole message in memory).
MAX_VERIFIED: Final = 32 * 1024 * 1024
#: The header section read for the forgery scan and the C{From} field.
MAX_HEADER: Final = 1024 * 1024
#: DKIM signatures verified per message at most (each costs a DNS lookup).
MAX_SIGNATURES: Final = 8
#: Checks running at once; the rest wait (their wait counts against the budget).
CONCURRENCY: Final = 8
#: Client addresses whose check decision is kept (L{AuthChecker.client_ip});
#: the memory is emptied when full.
_IP_CACHE_SIZE: Final = 4096
#: Seconds the reactor waits past the budget for the thread's own deadline.
_GRACE: Final = 0.5
_TOKEN: Final = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+")
_COMMENT: Final = re.compile(r"\([^()]*\)")

Blocking = Callable[[Callable[[], Any]], "Deferred[Any]"]
"""Runs a function in a thread; its Deferred fires in the reactor thread with the result."""


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


# -- results ----------------------------------------------------------------------


@attrs.define
class DKIMResult:
    """One signature's result: C{pass}, C{fail}, C{neutral}, C{temperror}, C{permerror}."""

    result: str
    domain: str = ""
    selector: str = ""
    b: str = ""
    reason: str = ""


@attrs.define
class Checks:
    """
    What the checks found so far (filled in by the thread as it goes, read
    by the reactor when done or when the budget is spent; C{None}: not
    known).
    """

    spf: str | None = None
    spf_reason: str = ""
    smtp_mailfrom: str = ""
    smtp_helo: str = ""
    dkim: list[DKIMResult] | None = None
    arc: str | None = None
    dmarc: str | None = None
    dmarc_policy: str = ""
    header_from: str = ""
    done: bool = False


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
    froms = [value for name, value in _fields(header) if name.lower() == b"from"]
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


# -- one message ---------------------------------------------------------------------------


def authenticate(
    checks: Checks,
    *,
    header: bytes,
    message: bytes | None,
    ip: str,
    mail_from: str,
    helo: str,
    resolver: DNS,
) -> None:
    """
    Run the checks of one message, filling in C{checks} as each is done
    (blocking: DNS; run it in a thread).

    @param header: the message's header section.
    @param message: the whole message, or C{None} when it is too large to
        verify (its signatures are then C{neutral}).
    """
    checks.smtp_mailfrom = mail_from.rpartition("@")[2].lower() if mail_from else ""
    checks.smtp_helo = helo
    result, reason = check_spf(ip, mail_from, helo, resolver)
    checks.spf_reason = reason
    checks.spf = result
    if message is None:
        count = sum(1 for n, _ in _fields(header) if n.lower() == b"dkim-signature")
        checks.dkim = [DKIMResult("neutral", reason="message too large to verify")] * min(
            count, MAX_SIGNATURES
        )
    else:
        checks.dkim = check_dkim(message, resolver)
        if any(n.lower() == b"arc-seal" for n, _ in _fields(header)):
            checks.arc = check_arc(message, resolver)
    domain = from_domain(header)
    if domain is None:
        checks.dmarc = "permerror"
    else:
        checks.header_from = domain
        try:
            checks.dmarc, checks.dmarc_policy = check_dmarc(domain, checks, resolver)
        except TempDNSError:
            checks.dmarc = "temperror"
    checks.done = True


def format_field(authserv_id: str, checks: Checks) -> bytes:
    """
    The C{Authentication-Results} field (RFC 8601 §2.2) of C{checks}, LF
    line ends, folded one result a line; what is not known is C{temperror}.
    """
    parts = []
    spf_result = checks.spf or "temperror"
    if checks.smtp_mailfrom:
        parts.append(f"spf={spf_result} smtp.mailfrom={_value(checks.smtp_mailfrom)}")
    else:
        parts.append(f"spf={spf_result} smtp.helo={_value(checks.smtp_helo or 'unknown')}")
    if checks.dkim is None:
        parts.append("dkim=temperror (not checked in time)")
    elif not checks.dkim:
        parts.append("dkim=none")
    for signature in checks.dkim or ():
        text = f"dkim={signature.result}"
        if signature.reason:
            text += f" ({_comment(signature.reason)})"
        if signature.domain:
            text += f" header.d={_value(signature.domain)}"
        if signature.selector:
            text += f" header.s={_value(signature.selector)}"
        if signature.b:
            text += f" header.b={_value(signature.b)}"
        parts.append(text)
    if checks.arc is not None:
        parts.append(f"arc={checks.arc}")
    dmarc_result = checks.dmarc or "temperror"
    text = f"dmarc={dmarc_result}"
    if checks.dmarc_policy:
        text += f" (p={checks.dmarc_policy})"
    if checks.header_from:
        text += f" header.from={_value(checks.header_from)}"
    parts.append(text)
    field = f"Authentication-Results: {authserv_id};\n\t" + ";\n\t".join(parts) + "\n"
    return field.encode("utf-8", "replace")


def _value(text: str) -> str:
    """A property value: a token as it is, else a quoted-string (RFC 8601 §2.2)."""
    if _TOKEN.fullmatch(text):
        return text
    safe = "".join(c if " " <= c <= "~" else "?" for c in text[:255])
    return '"' + safe.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    """Text safe inside a comment: printable ASCII without parentheses or backslash."""
    return "".join(c if " " <= c <= "~" and c not in "()\\" else "?" for c in text[:100])


# -- forged fields -------------------------------------------------------------------------


def _field_spans(header: bytes) -> list[tuple[int, int, bytes]]:
    """The header fields of C{header}: C{(start, end, name)}, continuation lines included."""
    spans: list[tuple[int, int, bytes]] = []
    position = 0
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and spans:
            start, _, name = spans[-1]
            spans[-1] = (start, position + len(line), name)
        else:
            name = line.split(b":", 1)[0].strip() if b":" in line else b""
            spans.append((position, position + len(line), name))
        position += len(line)
    return spans


def _fields(header: bytes) -> list[tuple[bytes, bytes]]:
    """The C{(name, value)} pairs of C{header}."""
    return [
        (name, header[start:end].split(b":", 1)[1] if b":" in header[start:end] else b"")
        for start, end, name in _field_spans(header)
        if name
    ]


def authserv_id_of(value: bytes) -> str:
    """The authserv-id an C{Authentication-Results} value starts with, lowercased."""
    text = value.decode("utf-8", "replace").replace("\r", " ").replace("\n", " ")
    while True:
        stripped = _COMMENT.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    first = text.split(";", 1)[0].strip().split()
    return first[0].strip('"').lower().rstrip(".") if first else ""


def forged_fields(header: bytes, authserv_id: str) -> list[tuple[int, int]]:
    """
    The C{(start, end)} byte ranges of the C{Authentication-Results} fields
    of C{header} that claim C{authserv_id} (compared without case).
    """
    wanted = authserv_id.lower().rstrip(".")
    return [
        (start, end)
        for start, end, name in _field_spans(header)
        if name.lower() == b"authentication-results"
        and authserv_id_of(header[start:end].split(b":", 1)[1]) == wanted
    ]


def remove_fields(data: bytes, spans: Iterable[tuple[int, int]]) -> bytes:
    """C{data} without the byte ranges C{spans} (sorted, not overlapping)."""
    kept, position = [], 0
    for start, end in spans:
        kept.append(data[position:start])
        position = end
    kept.append(data[position:])
    return b"".join(kept)


def read_header(message: SpooledMessage) -> bytes:
    """
    The header section of a spooled message (LF line ends), through its
    empty line, at most L{MAX_HEADER} bytes (blocking).
    """
    if message.data is not None:
        head = message.data[:MAX_HEADER]
    else:
        with open(message.path, "rb") as f:
            head = f.read(min(message.size, MAX_HEADER))
    end = head.find(b"\n\n")
    if head.startswith(b"\n"):
        return b""
    return head if end < 0 else head[: end + 2]


# -- the reactor side ------------------------------------------------------------------------


@attrs.frozen
class AuthOutcome:
    """
    What to post: the field to add, and the message (a copy without forged
    fields when there were any: L{extra_file} is then its file, to remove
    once delivered).
    """

    field: bytes
    message: SpooledMessage
    extra_file: str | None = None
    forged: int = 0


@attrs.frozen
class _Prepared:
    header: bytes
    whole: bytes | None
    message: SpooledMessage
    extra_file: str | None
    forged: int


class AuthChecker:
    """
    Runs the checks of one message at a time per call, off the reactor
    thread, within C{budget} seconds, and never fails.

    @param authserv_id: gsmail's host name (C{hostname}), the field's
        authserv-id and what forged fields claim.
    @param resolver: the DNS of the checks (L{make_resolver}).
    @param blocking: runs a function in a thread (the reactor's pool).
    @param budget: seconds the checks of one message may take (DNS
        included, waiting for a thread included).
    @param exceptions: client networks whose mail is not checked.
    """

    def __init__(
        self,
        *,
        authserv_id: str,
        resolver: dns.resolver.Resolver,
        clock: IReactorTime,
        blocking: Blocking,
        budget: float = 5.0,
        exceptions: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        concurrency: int = CONCURRENCY,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.authserv_id = authserv_id
        self.resolver = resolver
        self.clock = clock
        self.blocking = blocking
        self.budget = budget
        self.exceptions = tuple(exceptions)
        self._limit = DeferredSemaphore(concurrency)
        self._now = now
        # Peer text -> the checked IP or None: parsing an address and
        # matching the exceptions cost more than the rest of the call.
        self._ips: dict[str, str | None] = {}

    def client_ip(self, session: Session) -> str | None:
        """
        The client's IP address when its mail is checked: an ESMTP session
        from an IP address outside the exceptions; else C{None} (LMTP: the
        MTA in front checks; local deliveries; exempt clients).
        """
        if session.protocol_name != "ESMTP":
            return None
        peer = session.peer
        try:
            return self._ips[peer]
        except KeyError:
            pass
        if len(self._ips) >= _IP_CACHE_SIZE:
            self._ips.clear()
        found = self._ips[peer] = self._checked_ip(peer)
        return found

    def _checked_ip(self, peer: str) -> str | None:
        """L{client_ip} for an ESMTP session's peer text (C{[192.0.2.1]})."""
        if not peer.startswith("["):
            return None
        try:
            ip = ipaddress.ip_address(peer.strip("[]").removeprefix("IPv6:"))
        except ValueError:
            return None
        if any(ip in network for network in self.exceptions):
            return None
        return str(ip)

    def check(
        self, session: Session, envelope: Envelope, message: SpooledMessage
    ) -> Deferred[AuthOutcome] | None:
        """
        Check C{message}; C{None} when this session's mail is not checked.

        @return: fires with the L{AuthOutcome} within about C{budget}
            seconds once the message's file has been read (the forged
            fields are removed whatever the time); never fails.
        """
        ip = self.client_ip(session)
        if ip is None:
            return None
        return Deferred.fromCoroutine(self._check(ip, session, envelope, message))

    async def _check(
        self, ip: str, session: Session, envelope: Envelope, message: SpooledMessage
    ) -> AuthOutcome:
        try:
            prepared: _Prepared = await self.blocking(lambda: self._prepare(message))
        except Exception:
            log.failure("Reading a message for its authentication checks failed")
            checks = Checks(done=True, spf="temperror", dmarc="temperror")
            return AuthOutcome(format_field(self.authserv_id, checks), message)
        if prepared.forged:
            log.warn(
                "Removed {count} Authentication-Results fields claiming to be from {host}"
                " (forged) in mail from {peer}",
                count=prepared.forged,
                host=self.authserv_id,
                peer=session.peer,
                session=session.id,
            )
        sender = str(envelope.sender) if envelope.sender else ""
        checks = Checks(
            smtp_mailfrom=sender.rpartition("@")[2].lower() if sender else "",
            smtp_helo=session.helo or "",
        )
        deadline = self._now() + self.budget
        resolver = DNS(self.resolver, deadline, self._now)

        def run() -> None:
            authenticate(
                checks,
                header=prepared.header,
                message=prepared.whole,
                ip=ip,
                mail_from=sender,
                helo=session.helo or "",
                resolver=resolver,
            )

        work = self._limit.run(self.blocking, run)
        work.addTimeout(self.budget + _GRACE, self.clock)
        try:
            await work
        except Exception as e:
            if not checks.done:
                log.info(
                    "Authentication checks of mail from {peer} not finished in {budget:g} s"
                    " ({error}): temperror",
                    peer=session.peer,
                    budget=self.budget,
                    error=e.__class__.__name__,
                    session=session.id,
                )
        return AuthOutcome(
            format_field(self.authserv_id, checks),
            prepared.message,
            prepared.extra_file,
            prepared.forged,
        )

    def _prepare(self, message: SpooledMessage) -> _Prepared:
        """
        Read the message (in a thread): its header, the whole of it when it
        is small enough to verify, and a copy without forged fields if it
        has any.
        """
        header = read_header(message)
        spans = forged_fields(header, self.authserv_id)
        whole: bytes | None = None
        if message.size <= MAX_VERIFIED:
            if message.data is not None:
                whole = message.data
            else:
                with open(message.path, "rb") as f:
                    whole = f.read(message.size)
        if not spans:
            return _Prepared(header, whole, message, None, 0)
        cleaned_header = remove_fields(header, spans)
        path = message.path + ".ar"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(cleaned_header)
                if message.data is not None:
                    out.write(message.data[len(header) :])
                else:
                    with open(message.path, "rb") as f:
                        f.seek(len(header))
                        left = message.size - len(header)
                        while left > 0:
                            chunk = f.read(min(left, 1 << 20))
                            if not chunk:
                                break
                            out.write(chunk)
                            left -= len(chunk)
        except BaseException:
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        size = message.size - (len(header) - len(cleaned_header))
        data = None
        if message.data is not None:
            data = cleaned_header + message.data[len(header) :]
        copy = attrs.evolve(message, path=path, size=size, data=data, files=None)
        return _Prepared(header, whole, copy, path, len(spans))
