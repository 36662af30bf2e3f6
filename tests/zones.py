"""
DNS zones held in memory for the tests' C{twisted.names} servers (served
with L{tests.util.listen_dns}), and the records they hold.
"""

from __future__ import annotations

from typing import Any

from twisted.names import authority, dns


class MemoryZone(authority.FileAuthority):
    """
    A zone held in memory: C{records} is a list of (owner name, record) in
    the zone C{origin} (C{b""}: every name). Names in the zone without
    records answer NXDOMAIN, as a real server does.
    """

    def __init__(self, origin: bytes, records: list[tuple[bytes, Any]]) -> None:
        self._origin = origin
        self._records = records
        super().__init__(None)

    def loadFile(self, filename: object) -> None:
        suffix = b"." + self._origin if self._origin else b"."
        soa = dns.Record_SOA(
            mname=b"ns" + suffix,
            rname=b"hostmaster" + suffix,
            serial=1,
            minimum=60,
            expire=60,
            ttl=60,
        )
        self.soa = (self._origin, soa)
        self.records = {self._origin: [soa]}
        for name, record in self._records:
            self.records.setdefault(name.lower(), []).append(record)


def A(address: str, ttl: int = 300) -> dns.Record_A:
    return dns.Record_A(address, ttl=ttl)


def AAAA(address: str, ttl: int = 300) -> dns.Record_AAAA:
    return dns.Record_AAAA(address, ttl=ttl)


def MX(preference: int, name: bytes, ttl: int = 300) -> dns.Record_MX:
    return dns.Record_MX(preference, name, ttl=ttl)


def CNAME(name: bytes, ttl: int = 300) -> dns.Record_CNAME:
    return dns.Record_CNAME(name, ttl=ttl)


def txt(text: str, ttl: int = 60) -> dns.Record_TXT:
    """A TXT record, cut into strings of at most 250 octets."""
    data = text.encode()
    return dns.Record_TXT(*[data[i : i + 250] for i in range(0, len(data), 250)], ttl=ttl)
