# -*- test-case-name: tests.test_anvil -*-
"""
Per-client limits for the internet-facing listeners: Postfix's anvil(8)
counters, in the process.

Postfix's C{smtpd} asks the C{anvil} server how many connections a client
IP address has open and has made in the last C{anvil_rate_time_unit}
seconds, and refuses the connection past C{smtpd_client_connection_count_limit}
or C{smtpd_client_connection_rate_limit}. L{Anvil} keeps the same counters
for one gsmail process, plus two that matter to gsmail: GroupServer group
lookups (each RCPT to an unknown address costs GroupServer a request, so a
recipient probe is a load on the site, not only on gsmail) and failed AUTH
attempts on the submission port.

Rates are counted in fixed windows of C{time_unit} seconds per client, as
anvil does: a client's window starts with its first event and its counters
start again from zero once the window has passed. Clients in
C{exceptions} (Postfix's C{smtpd_client_event_limit_exceptions}, by
default the loopback networks, where a local Postfix or GroupServer
connects from) are never limited; the listeners also exempt UNIX-socket
clients and every LMTP client (LMTP's client is the site's own MTA).

Memory: one small record per client IP address that has a connection open
or an event in its current window; records of idle clients are swept once
the table has doubled since the last sweep, so a flood from many addresses
costs O(addresses seen in one window).

With C{inbound_workers = N} each worker process has its own L{Anvil}, so a
client can hold up to N times a per-client limit (the kernel spreads its
connections over the workers), as C{max_connections} is per process too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gsmail.status import Reply

__all__ = ["ClientLimits", "Anvil", "LookupGate", "LOOKUP_LIMIT", "parse_networks"]

log = Logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: Iterable[str]) -> tuple[Network, ...]:
    """
    Parse client networks such as C{127.0.0.0/8} and C{::1} (host bits
    allowed, as in Postfix's C{mynetworks}; blank items skipped).

    @raise ValueError: one is not an address or network.
    """
    return tuple(ipaddress.ip_network(n.strip(), strict=False) for n in text if n.strip())


@attrs.frozen
class ClientLimits:
    """
    The per-client-IP limits of one process. A limit of C{0} is off.

    @ivar connection_count: connections open at once (Postfix's
        C{smtpd_client_connection_count_limit}, default 50).
    @ivar connection_rate: connections made per C{time_unit}, refused
        ones included (C{smtpd_client_connection_rate_limit}).
    @ivar lookup_rate: GroupServer group lookups per C{time_unit} (lookups
        answered from gsmail's group cache are free and not counted).
    @ivar auth_failures: failed AUTH attempts per C{time_unit}; past it AUTH
        is refused without checking the password.
    @ivar time_unit: the rate window, in seconds (C{anvil_rate_time_unit}).
    @ivar exceptions: client networks that no limit applies to
        (C{smtpd_client_event_limit_exceptions}).
    """

    connection_count: int = 50
    connection_rate: int = 300
    lookup_rate: int = 300
    auth_failures: int = 10
    time_unit: float = 60.0
    exceptions: tuple[Network, ...] = attrs.field(
        factory=lambda: parse_networks(("127.0.0.0/8", "::1"))
    )


class _Client:
    """The counters of one client IP address."""

    __slots__ = ("open", "window", "connects", "lookups", "auth_failures", "told")

    def __init__(self, now: float) -> None:
        self.open = 0
        self.window = now
        self.connects = 0
        self.lookups = 0
        self.auth_failures = 0
        # Which limits were logged in this window ("rate", "lookups", "auth"):
        # a flood is one log line per client per window, not one per event.
        self.told: set[str] = set()

    def roll(self, now: float, unit: float) -> None:
        if now - self.window >= unit:
            self.window = now
            self.connects = self.lookups = self.auth_failures = 0
            self.told.clear()


def too_many_connections(host: str) -> Reply:
    """C{421 4.7.0} for a client over its concurrent connection limit."""
    return Reply(421, "4.7.0", f"Too many connections from [{host}]; try again later")


def connection_rate_exceeded(host: str, unit: float) -> Reply:
    """C{421 4.7.0} for a client over its connection rate limit."""
    return Reply(421, "4.7.0", f"Too many connections from [{host}] in {unit:g} s; try again later")


#: A RCPT past a lookup cap (per session or per client): transient, so a
#: real sender retries that recipient later; no lookup is made.
LOOKUP_LIMIT = Reply(450, "4.7.1", "Too many recipient lookups; try again later")


def auth_locked(host: str) -> Reply:
    """C{421 4.7.0} for a client over its AUTH failure limit (RFC 4954 §6 leaves it to us)."""
    return Reply(421, "4.7.0", f"Too many authentication failures from [{host}]; try again later")


class Anvil:
    """
    Counters per client IP address for one process (see the module
    docstring). Every method takes the client's address as text, as
    C{IPv4Address.host} gives it.

    @param limits: the L{ClientLimits}.
    @param clock: the reactor's clock (C{IReactorTime}).
    """

    def __init__(self, limits: ClientLimits, clock: IReactorTime) -> None:
        self.limits = limits
        self._clock = clock
        self._clients: dict[str, _Client] = {}
        self._sweep_at = 1024

    def exempt(self, host: str) -> bool:
        """Whether C{host} is in the exception networks (or not an IP address)."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.limits.exceptions)

    def _client(self, host: str) -> _Client:
        now = self._clock.seconds()
        client = self._clients.get(host)
        if client is None:
            if len(self._clients) >= self._sweep_at:
                self._sweep(now)
            client = self._clients[host] = _Client(now)
        else:
            client.roll(now, self.limits.time_unit)
        return client

    def _sweep(self, now: float) -> None:
        unit = self.limits.time_unit
        self._clients = {
            host: client
            for host, client in self._clients.items()
            if client.open or now - client.window < unit
        }
        self._sweep_at = max(1024, 2 * len(self._clients))

    def connected(self, host: str) -> Reply | None:
        """
        Count a new connection from C{host}; every call must be matched by
        one L{disconnected}, refused or not.

        @return: C{None}, or the refusal to send instead of the greeting:
            C{421 4.7.0} over the count or the rate limit.
        """
        client = self._client(host)
        client.open += 1
        client.connects += 1
        limits = self.limits
        if limits.connection_count and client.open > limits.connection_count:
            self._tell(
                client,
                "count",
                "Refused [{client}]: {count} connections open (client_connection_count_limit)",
                host,
                client.open,
            )
            return too_many_connections(host)
        if limits.connection_rate and client.connects > limits.connection_rate:
            self._tell(
                client,
                "rate",
                "Refused [{client}]: more than {count} connections in {unit} s"
                " (client_connection_rate_limit); further refusals in this window are not logged",
                host,
                limits.connection_rate,
            )
            return connection_rate_exceeded(host, limits.time_unit)
        return None

    def disconnected(self, host: str) -> None:
        """A connection counted by L{connected} has closed."""
        client = self._clients.get(host)
        if client is not None and client.open > 0:
            client.open -= 1

    def take_lookup(self, host: str) -> bool:
        """
        Count one GroupServer lookup for C{host}.

        @return: C{False} (and nothing counted) when the client has had
            C{lookup_rate} lookups in this window.
        """
        client = self._client(host)
        if self.limits.lookup_rate and client.lookups >= self.limits.lookup_rate:
            self._tell(
                client,
                "lookups",
                "Lookup limit for [{client}]: {count} group lookups in {unit} s"
                " (client_lookup_rate_limit); further recipients get 450 4.7.1",
                host,
                client.lookups,
            )
            return False
        client.lookups += 1
        return True

    def auth_allowed(self, host: str) -> bool:
        """Whether C{host} may try AUTH now (under its failure limit)."""
        limit = self.limits.auth_failures
        return not limit or self._client(host).auth_failures < limit

    def auth_failed(self, host: str) -> int:
        """
        Count a failed AUTH from C{host}; logs the first failure of a
        window and the lock-out, not every failure.

        @return: the failures in the current window, this one included.
        """
        client = self._client(host)
        client.auth_failures += 1
        limit = self.limits.auth_failures
        if client.auth_failures == 1:
            log.warn(
                "Failed AUTH from [{client}]; further failures are counted and logged"
                " at the limit ({limit} in {unit} s)",
                client=host,
                limit=limit,
                unit=self.limits.time_unit,
            )
        elif limit and client.auth_failures == limit:
            self._tell(
                client,
                "auth",
                "AUTH locked for [{client}]: {count} failures in {unit} s"
                " (client_auth_failure_limit); AUTH refused until the window ends",
                host,
                limit,
            )
        return client.auth_failures

    def _tell(self, client: _Client, kind: str, text: str, host: str, count: int) -> None:
        """Log C{text} once per client, kind and window."""
        if kind in client.told:
            return
        client.told.add(kind)
        log.warn(text, client=host, count=count, unit=self.limits.time_unit)


class LookupGate:
    """
    The GroupServer lookup caps of one session: C{session_limit} per
    session (reset when a message is accepted, as Postfix resets its error
    count) and the client's rate in the L{Anvil}.

    @param anvil: the process's L{Anvil}.
    @param host: the client's IP address as text.
    @param session_limit: lookups per session; C{0}: no cap.
    """

    def __init__(self, anvil: Anvil, host: str, session_limit: int) -> None:
        self._anvil = anvil
        self._host = host
        self._limit = session_limit
        self.count = 0
        self._told = False

    def take(self) -> Reply | None:
        """
        Count one lookup about to be made.

        @return: C{None} to go ahead, or L{LOOKUP_LIMIT} (C{450 4.7.1}) to
            answer instead, without a lookup.
        """
        if self._limit and self.count >= self._limit:
            if not self._told:
                self._told = True
                log.info(
                    "Lookup limit for a session from [{client}]: {count} group lookups"
                    " (session_lookup_limit); further recipients get 450 4.7.1",
                    client=self._host,
                    count=self.count,
                )
            return LOOKUP_LIMIT
        if not self._anvil.take_lookup(self._host):
            return LOOKUP_LIMIT
        self.count += 1
        return None

    def reset(self) -> None:
        """A message was accepted: the session's count starts again."""
        self.count = 0
        self._told = False
