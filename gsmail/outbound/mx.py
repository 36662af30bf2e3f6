# -*- test-case-name: tests.outbound.test_mx -*-
"""
Where a domain's mail goes: MX resolution with C{twisted.names} (RFC 5321
§5.1, RFC 7505 null MX), and the hosts of the smarthost (Postfix
C{relayhost} style; the option itself is read by
L{gsmail.outbound.relayhost}).

L{MXResolver.hosts} answers the ordered list of hosts to try, each with all
its IPv4 and IPv6 addresses, so the delivery code can fail over across every
address of every MX host; it never picks one host for the caller, unlike
Twisted's C{relaymanager.MXCalculator} (which also skips AAAA records).

Failures carry the L{Reply} the recipient's delivery ends with: a domain
that does not exist or has a null MX is permanent (5.1.2, 5.1.10), anything
that retrying can mend (SERVFAIL, timeouts, MX hosts without addresses) is
transient (4.4.3, 4.4.4).
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import random
import re
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ClassVar, Final, Protocol, TypeVar

import attrs
import idna
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    FirstError,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger
from twisted.names import dns, error
from twisted.python.failure import Failure

from gsmail.outbound.relayhost import RelayHost
from gsmail.status import Reply

__all__ = [
    "MXHost",
    "MXLookupError",
    "NullMXError",
    "NoSuchDomainError",
    "DNSTemporaryError",
    "MXResolver",
    # Used from here by the delivery (gsmail.outbound.delivery, delivery_session).
    "RelayHost",
    "NULL_MX",
    "NO_SUCH_DOMAIN",
    "DNS_TEMPORARY",
    "NO_MX_ADDRESS",
    "RELAYHOST_NOT_FOUND",
]

log = Logger()

_T = TypeVar("_T")

# -- the replies a failed lookup ends a recipient's delivery with -----------
NULL_MX: Final = Reply(556, "5.1.10", "Recipient address has null MX")  # RFC 7505 §4.1
NO_SUCH_DOMAIN: Final = Reply(550, "5.1.2", "Domain not found (no MX, A or AAAA record)")
DNS_TEMPORARY: Final = Reply(451, "4.4.3", "Temporary DNS failure")
NO_MX_ADDRESS: Final = Reply(451, "4.4.4", "No MX host of the domain has an address")
RELAYHOST_NOT_FOUND: Final = Reply(451, "4.4.4", "The configured relay host was not found")

# A CNAME chain longer than this is treated as a loop (transient).
MAX_CNAME_HOPS: Final = 8


@attrs.frozen
class MXHost:
    """
    One host to try, in the order L{MXResolver.hosts} gives.

    @ivar preference: the MX preference (lower first); 0 for an implicit MX
        (RFC 5321 §5.1: the domain's own A/AAAA) and for an address literal.
    @ivar name: the host name, ASCII (A-labels), lowercase, no trailing dot:
        the name to verify a TLS certificate against. For an address
        literal, the address itself.
    @ivar addresses: its IPv4 then IPv6 addresses, as text, at least one;
        addresses marked bad (L{MXResolver.mark_bad}) come last.
    """

    preference: int
    name: str
    addresses: tuple[str, ...]


class MXLookupError(Exception):
    """
    The lookup of a domain's mail hosts failed.

    @ivar domain: the domain (ASCII form) that was looked up.
    @ivar detail: what went wrong, for logs (no secrets: DNS data only).
    @ivar reply: the L{Reply} that ends (5xx) or defers (4xx) delivery to
        the recipients at that domain.
    """

    default_reply: ClassVar[Reply] = DNS_TEMPORARY

    def __init__(self, domain: str, detail: str = "", reply: Reply | None = None) -> None:
        base = reply or self.default_reply
        self.domain = domain
        self.detail = detail
        self.reply = base.with_text(f"{base.text}: {domain}")
        super().__init__(self.reply.status_line() + (f" ({detail})" if detail else ""))


class NullMXError(MXLookupError):
    """
    The domain publishes a null MX (RFC 7505): it accepts no mail.
    Permanent: C{556 5.1.10}.
    """

    default_reply = NULL_MX


class NoSuchDomainError(MXLookupError):
    """
    The domain does not exist (NXDOMAIN), or has no MX and no A/AAAA record
    (RFC 5321 §5.1), or is not a valid domain or address literal.
    Permanent: C{550 5.1.2}.
    """

    default_reply = NO_SUCH_DOMAIN


class DNSTemporaryError(MXLookupError):
    """
    DNS could not answer now: SERVFAIL, REFUSED, a timeout, a CNAME loop
    (C{451 4.4.3}), or every MX host lacks an address (C{451 4.4.4}: often a
    zone being changed, so gsmail retries rather than bounces; the queue's
    lifetime still ends it). Transient.
    """

    default_reply = DNS_TEMPORARY


class _Shuffler(Protocol):
    """What L{MXResolver} needs of a random source: C{random.Random} has it."""

    def shuffle(self, x: list[Any]) -> None: ...


class _NameNotFound(Exception):
    """NXDOMAIN for a queried name."""


class _LookupFailed(Exception):
    """A transient failure of one query; the text says which."""


@attrs.frozen
class _Family:
    """The outcome of one A or AAAA lookup (never raises: see L{_addresses})."""

    addresses: tuple[str, ...]
    ttl: float
    problem: str = ""
    transient: bool = False


@attrs.frozen
class _HostAddresses:
    addresses: tuple[str, ...]
    ttl: float
    problem: str = ""
    transient: bool = False


@attrs.frozen
class _Entry:
    expires: float
    hosts: tuple[MXHost, ...]


_LOOKUP_METHODS: Final = {
    dns.MX: "lookupMailExchange",
    dns.A: "lookupAddress",
    dns.AAAA: "lookupIPV6Address",
}


def _name(name: dns.Name) -> str:
    """A DNS name from the wire as lowercase text without the trailing dot."""
    return name.name.decode("ascii", "replace").rstrip(".").lower()


def _address_text(record: Any) -> str:
    """The text form of an A or AAAA record's address."""
    return str(ipaddress.ip_address(record.address))


def _normalise_address(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


def _follow(
    answers: Sequence[dns.RRHeader], name: str, rtype: int
) -> tuple[list[dns.RRHeader], str, float]:
    """
    Follow CNAMEs from C{name} within one answer section.

    @return: the records of C{rtype} at the end of the chain (maybe none),
        the name the chain ends at, and the smallest TTL seen (seconds).
    @raise _LookupFailed: a CNAME loop.
    """
    ttl = math.inf
    current = name
    seen = {name}
    while True:
        found = [rr for rr in answers if rr.type == rtype and _name(rr.name) == current]
        if found:
            return found, current, min(ttl, *(rr.ttl for rr in found))
        cname = next(
            (rr for rr in answers if rr.type == dns.CNAME and _name(rr.name) == current), None
        )
        if cname is None:
            return [], current, ttl
        ttl = min(ttl, cname.ttl)
        target: Any = cname.payload
        current = _name(target.name)
        if current in seen:
            raise _LookupFailed(f"CNAME loop at {current}")
        seen.add(current)


def _ascii_domain(domain: str) -> str:
    """
    The A-label form of a domain (IDNA 2008 with UTS #46 mapping), lowercase.

    @raise NoSuchDomainError: not a valid domain name.
    """
    text = domain.strip().rstrip(".").lower()
    if not text:
        raise NoSuchDomainError(domain or "(empty)", "empty domain")
    if text.isascii():
        labels = text.split(".")
        if len(text) > 253 or not all(_LABEL.match(label) for label in labels):
            raise NoSuchDomainError(text.encode("ascii", "backslashreplace").decode(), "bad name")
        return text
    try:
        return idna.encode(text, uts46=True).decode("ascii")
    except idna.IDNAError as e:
        shown = text.encode("ascii", "backslashreplace").decode()
        raise NoSuchDomainError(shown, f"not a valid IDN: {e}") from e


# Labels as they appear in DNS names of mail hosts; underscores are tolerated
# since some zones have them and DNS itself allows them.
_LABEL: Final = re.compile(r"(?!-)[a-z0-9_\-]{1,63}(?<!-)\Z")


def _address_literal(domain: str) -> str | None:
    """
    The address in an RFC 5321 §4.1.3 address literal (C{[192.0.2.1]},
    C{[IPv6:2001:db8::1]}), or C{None} when C{domain} is not one.

    @raise NoSuchDomainError: a malformed literal.
    """
    text = domain.strip()
    if not text.startswith("["):
        return None
    if not text.endswith("]"):
        raise NoSuchDomainError(text, "malformed address literal")
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError as e:
        raise NoSuchDomainError(text, "malformed address literal") from e


class MXResolver:
    """
    The hosts to deliver a domain's mail to, from DNS.

    Answers are cached for their smallest TTL (MX, CNAME, A and AAAA records
    alike), capped at C{cache_ttl_cap}; failures are not cached. Concurrent
    lookups of one domain share one set of queries.

    @ivar timeout: seconds one whole lookup (MX plus every host's A and
        AAAA) may take before it fails with L{DNSTemporaryError}.
    """

    def __init__(
        self,
        resolver: IResolver,
        clock: IReactorTime,
        *,
        cache_ttl_cap: float = 3600,
        timeout: float = 120,
        max_hosts: int = 10,
        max_cache_entries: int = 10_000,
        random_source: _Shuffler | None = None,
    ) -> None:
        """
        @param resolver: any C{IResolver}: C{twisted.names.client.Resolver}
            in production (or C{createResolver()}), an authority in tests.
        @param clock: for TTLs, L{mark_bad} and the lookup timeout.
        @param cache_ttl_cap: the longest time (seconds) an answer is
            cached, whatever its TTL.
        @param timeout: seconds a whole lookup may take (see L{timeout}).
        @param max_hosts: at most this many MX hosts (lowest preferences
            first) are resolved, bounding the queries one domain can cause.
        @param max_cache_entries: the cache holds at most this many domains.
        @param random_source: shuffles hosts of equal preference (RFC 5321
            §5.1); a C{random.Random} by default, injectable for tests.
        """
        self._resolver = resolver
        self._clock = clock
        self._cap = cache_ttl_cap
        self.timeout = timeout
        self._max_hosts = max_hosts
        self._max_entries = max_cache_entries
        self._random: _Shuffler = random_source or random.Random()
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, list[Deferred[list[MXHost]]]] = {}
        self._bad: dict[str, float] = {}

    # -- public API ---------------------------------------------------------

    def clear(self) -> None:
        """
        Forget the cached answers (a reload, SIGHUP: a site that moved its
        MX is tried at its new hosts at once). Lookups running now go on;
        the addresses marked bad stay marked until their time runs out.
        """
        self._cache.clear()

    def hosts(self, domain: str) -> Deferred[list[MXHost]]:
        """
        The hosts to try for mail to C{domain}, best first: ordered by MX
        preference, hosts of equal preference shuffled (anew on every call),
        hosts whose addresses are all marked bad moved to the end. An address
        that two MX hosts share is listed once, under the first.

        No MX record means the implicit MX: the domain's own A/AAAA records
        (RFC 5321 §5.1). A CNAME is followed (the target is treated as the
        domain). An MX host without an address is skipped (and logged). An
        address literal (C{[192.0.2.1]}, C{[IPv6:2001:db8::1]}) is its own
        host, without DNS. A non-ASCII domain is looked up in its A-label form.

        @param domain: the domain part of a recipient address.
        @return: a Deferred firing with at least one L{MXHost}, or failing
            with L{NullMXError} (556 5.1.10), L{NoSuchDomainError} (550 5.1.2)
            or L{DNSTemporaryError} (451 4.4.3 / 4.4.4).
        """
        return self._hosts(domain, mx_lookup=True)

    def relay_hosts(self, relay: RelayHost) -> Deferred[list[MXHost]]:
        """
        The hosts for a smarthost: its MX hosts when C{relay.mx_lookup}, else
        the host's own A/AAAA records (Postfix's C{[host]}). A smarthost comes
        from configuration, not from a recipient, so every failure is
        transient here (L{DNSTemporaryError}, 451 4.4.4 or 4.4.3): a typo or
        a DNS outage must not bounce the queue.
        """
        d = self._hosts(relay.host, mx_lookup=relay.mx_lookup)

        def transient(failure: Failure) -> Failure:
            exc = failure.value
            if isinstance(exc, MXLookupError) and not exc.reply.is_transient:
                return Failure(DNSTemporaryError(exc.domain, exc.detail, RELAYHOST_NOT_FOUND))
            return failure

        return d.addErrback(transient)

    def host_addresses(self, host: str) -> Deferred[list[str]]:
        """
        The IPv4 then IPv6 addresses of C{host} (CNAMEs followed), not
        cached: for the MTA-STS policy host (L{gsmail.outbound.mtasts}).

        @return: fires with the addresses (maybe none), or fails with
            L{NoSuchDomainError} (a bad name) or L{DNSTemporaryError}.
        """
        try:
            name = _ascii_domain(host)
        except NoSuchDomainError as e:
            return fail(e)

        async def look() -> list[str]:
            found = await self._addresses(name)
            if not found.addresses and found.transient:
                raise DNSTemporaryError(name, found.problem)
            return list(found.addresses)

        d = Deferred.fromCoroutine(look())
        d.addTimeout(self.timeout, self._clock)
        return d

    def mark_bad(self, address: str, seconds: float = 3600) -> None:
        """
        Remember that C{address} failed (connection refused, timeout, TLS
        failure), so that L{hosts} lists it last for C{seconds}.
        """
        now = self._clock.seconds()
        if len(self._bad) > self._max_entries:
            self._bad = {a: t for a, t in self._bad.items() if t > now}
        self._bad[_normalise_address(address)] = now + seconds

    def is_bad(self, address: str) -> bool:
        """
        C{True} while C{address} is marked bad (see L{mark_bad}).
        """
        key = _normalise_address(address)
        until = self._bad.get(key)
        if until is None:
            return False
        if until <= self._clock.seconds():
            del self._bad[key]
            return False
        return True

    # -- lookup, caching and sharing ------------------------------------------

    def _hosts(self, domain: str, *, mx_lookup: bool) -> Deferred[list[MXHost]]:
        try:
            literal = _address_literal(domain)
            if literal is not None:
                return succeed([MXHost(0, literal, (literal,))])
            ascii_domain = _ascii_domain(domain)
        except NoSuchDomainError as e:
            return fail(e)
        key = ascii_domain if mx_lookup else ascii_domain + "/address"
        entry = self._cache.get(key)
        if entry is not None:
            if entry.expires > self._clock.seconds():
                return succeed(self._order(entry.hosts))
            del self._cache[key]
        waiter: Deferred[list[MXHost]] = Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            waiters.append(waiter)
        else:
            self._inflight[key] = [waiter]
            work = Deferred.fromCoroutine(
                self._resolve(ascii_domain) if mx_lookup else self._implicit(ascii_domain)
            )
            work.addTimeout(self.timeout, self._clock)
            work.addBoth(self._finished, key, ascii_domain)
        return waiter.addCallback(self._order)

    def _finished(
        self, result: tuple[list[MXHost], float] | Failure, key: str, domain: str
    ) -> None:
        """Cache a success, then give the outcome to everyone waiting."""
        waiters = self._inflight.pop(key, [])
        if isinstance(result, Failure):
            exc = result.value
            if not isinstance(exc, MXLookupError):
                if isinstance(exc, DeferredTimeoutError | CancelledError):
                    detail = f"no answer within {self.timeout:g} s"
                else:
                    log.failure("Unexpected error resolving {domain}", result, domain=domain)
                    detail = f"internal error: {type(exc).__name__}"
                result = Failure(DNSTemporaryError(domain, detail))
            for w in waiters:
                if not w.called:
                    w.errback(result)
            return None
        hosts, ttl = result
        lifetime = min(ttl, self._cap)
        if lifetime > 0:
            self._remember(key, _Entry(self._clock.seconds() + lifetime, tuple(hosts)))
        for w in waiters:
            if not w.called:
                w.callback(list(hosts))
        return None

    def _remember(self, key: str, entry: _Entry) -> None:
        if len(self._cache) >= self._max_entries:
            now = self._clock.seconds()
            self._cache = {k: e for k, e in self._cache.items() if e.expires > now}
            while len(self._cache) >= self._max_entries:
                # Oldest insertion first: dicts keep insertion order.
                del self._cache[next(iter(self._cache))]
        self._cache[key] = entry

    def _order(self, hosts: Sequence[MXHost]) -> list[MXHost]:
        """Preference order, equal preferences shuffled, bad addresses last."""
        ordered: list[MXHost] = []
        for _, group in itertools.groupby(
            sorted(hosts, key=lambda h: h.preference), key=lambda h: h.preference
        ):
            same = list(group)
            if len(same) > 1:
                self._random.shuffle(same)
            ordered.extend(same)
        seen: set[str] = set()
        good: list[MXHost] = []
        bad: list[MXHost] = []
        for host in ordered:
            fresh = [a for a in host.addresses if a not in seen]
            seen.update(fresh)
            if not fresh:
                continue
            usable = [a for a in fresh if not self.is_bad(a)]
            marked = [a for a in fresh if a not in usable]
            host = attrs.evolve(host, addresses=tuple(usable + marked))
            (good if usable else bad).append(host)
        return good + bad

    # -- DNS ----------------------------------------------------------------

    async def _resolve(self, domain: str) -> tuple[list[MXHost], float]:
        """The MX hosts of C{domain} (ASCII) and the TTL of the answer."""
        try:
            mx, ttl = await self._records(domain, dns.MX)
        except _NameNotFound as e:
            raise NoSuchDomainError(domain, "NXDOMAIN") from e
        except _LookupFailed as e:
            raise DNSTemporaryError(domain, str(e)) from e
        if not mx:
            implicit, address_ttl = await self._implicit(domain)
            return implicit, min(ttl, address_ttl)
        exchanges: dict[str, int] = {}
        for rr in mx:
            record: Any = rr.payload
            exchange = _name(record.name)
            if not exchange:
                # RFC 7505 §3: "MX 0 ." means no mail; it must be the only
                # MX, and if it is not, the domain still asked for no mail.
                raise NullMXError(domain)
            preference = int(record.preference)
            exchanges[exchange] = min(preference, exchanges.get(exchange, preference))
        ranked = sorted(exchanges.items(), key=lambda item: item[1])[: self._max_hosts]
        found = await self._all([self._addresses(name) for name, _ in ranked])
        hosts: list[MXHost] = []
        problems: list[str] = []
        transient = False
        for (name, preference), result in zip(ranked, found, strict=True):
            if result.addresses:
                hosts.append(MXHost(preference, name, result.addresses))
                ttl = min(ttl, result.ttl)
            else:
                transient = transient or result.transient
                problems.append(f"{name}: {result.problem}")
                log.warn(
                    "MX host {mx_host} of {domain} skipped: {reason}",
                    mx_host=name,
                    domain=domain,
                    reason=result.problem,
                )
        if not hosts:
            reply = DNS_TEMPORARY if transient else NO_MX_ADDRESS
            raise DNSTemporaryError(domain, "; ".join(problems), reply)
        return hosts, ttl

    async def _implicit(self, domain: str) -> tuple[list[MXHost], float]:
        """The implicit MX (RFC 5321 §5.1): the domain's own addresses."""
        result = await self._addresses(domain)
        if result.addresses:
            return [MXHost(0, domain, result.addresses)], result.ttl
        if result.transient:
            raise DNSTemporaryError(domain, result.problem)
        raise NoSuchDomainError(domain, f"no MX and {result.problem}")

    async def _addresses(self, host: str) -> _HostAddresses:
        """The A and AAAA records of C{host}, asked in parallel."""
        v4, v6 = await self._all([self._family(host, dns.A), self._family(host, dns.AAAA)])
        addresses = v4.addresses + v6.addresses
        if addresses:
            for family in (v4, v6):
                if family.transient:
                    log.info(
                        "Using the other address family of {mx_host}: {reason}",
                        mx_host=host,
                        reason=family.problem,
                    )
            ttl = min(f.ttl for f in (v4, v6) if f.addresses)
            return _HostAddresses(tuple(dict.fromkeys(addresses)), ttl)
        for family in (v4, v6):
            if family.transient:
                return _HostAddresses((), math.inf, family.problem, transient=True)
        if v4.problem and v6.problem:
            return _HostAddresses((), math.inf, "no such host (NXDOMAIN)")
        return _HostAddresses((), math.inf, "no A or AAAA record")

    async def _family(self, host: str, rtype: int) -> _Family:
        try:
            records, ttl = await self._records(host, rtype)
        except _NameNotFound:
            return _Family((), math.inf, "NXDOMAIN")
        except _LookupFailed as e:
            return _Family((), math.inf, str(e), transient=True)
        addresses = tuple(_address_text(rr.payload) for rr in records)
        return _Family(addresses, ttl if addresses else math.inf)

    async def _records(self, name: str, rtype: int) -> tuple[list[dns.RRHeader], float]:
        """
        The records of C{rtype} at C{name}, following CNAMEs (querying the
        target again when the answer stops at a CNAME), and the smallest TTL
        on the way. An empty list means NODATA.
        """
        ttl = math.inf
        wanted = name
        for _ in range(MAX_CNAME_HOPS):
            answers = await self._ask(wanted, rtype)
            found, end, chain_ttl = _follow(answers, wanted, rtype)
            ttl = min(ttl, chain_ttl)
            if found or end == wanted:
                return found, ttl
            wanted = end
        raise _LookupFailed(f"CNAME chain longer than {MAX_CNAME_HOPS} at {name}")

    async def _ask(self, name: str, rtype: int) -> list[dns.RRHeader]:
        """One query; NXDOMAIN and transient errors become our own types."""
        lookup: Callable[[str], Deferred[Any]] = getattr(self._resolver, _LOOKUP_METHODS[rtype])
        kind = dns.QUERY_TYPES.get(rtype, str(rtype))
        try:
            answers, _authority, _additional = await lookup(name)
        except (error.DNSNameError, error.AuthoritativeDomainError) as e:
            raise _NameNotFound(name) from e
        except CancelledError:
            raise
        except Exception as e:
            # SERVFAIL, REFUSED, FORMERR, timeouts, a resolver's own bug:
            # all transient, so that mail is retried and not bounced.
            raise _LookupFailed(f"{kind} {name}: {type(e).__name__}") from e
        return list(answers)

    async def _all(self, coroutines: list[Coroutine[Any, Any, _T]]) -> list[_T]:
        """Run coroutines in parallel; the first failure is raised as itself."""
        try:
            return await gatherResults(
                [Deferred.fromCoroutine(c) for c in coroutines], consumeErrors=True
            )
        except FirstError as e:
            first = e.subFailure.value
            raise (first if isinstance(first, Exception) else e) from None
