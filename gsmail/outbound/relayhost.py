# -*- test-case-name: tests.outbound.test_mx -*-
"""
The smarthost option (Postfix C{relayhost} style, plus C{tls:} and C{tcp:}
endpoint forms): L{parse_relayhost} reads it into a L{RelayHost}, at
configuration time.

Not here: resolving the relay host's MX hosts or addresses
(L{gsmail.outbound.mx.MXResolver.relay_hosts}) or connecting to it
(L{gsmail.outbound.delivery}).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

import attrs

__all__ = ["RelayHost", "parse_relayhost"]


@attrs.frozen
class RelayHost:
    """
    A smarthost, parsed by L{parse_relayhost}.

    @ivar host: the host name (lowercase) or IP address.
    @ivar port: the TCP port.
    @ivar implicit_tls: C{True} for TLS from the first byte (port 465,
        RFC 8314 §3.3); C{False} for plain SMTP with STARTTLS.
    @ivar mx_lookup: C{True} to deliver to the MX hosts of C{host}
        (L{gsmail.outbound.mx.MXResolver.relay_hosts}), C{False} to connect
        to C{host} itself.
    """

    host: str
    port: int
    implicit_tls: bool
    mx_lookup: bool


_HOSTNAME: Final = re.compile(
    r"(?=.{1,253}\Z)(?!-)[A-Za-z0-9_\-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9_\-]{1,63}(?<!-))*\.?\Z"
)


def _host(text: str, option: str) -> str:
    text = text.strip()
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _HOSTNAME.match(text):
        raise ValueError(f"relayhost {option!r}: bad host name {text!r}")
    return text.rstrip(".").lower()


def _port(text: str, option: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"relayhost {option!r}: bad port {text!r}")
    return int(text)


def _bracketed(text: str, option: str) -> tuple[str, str | None]:
    """C{[host]:port} or C{[host]} → (host, port text or None)."""
    end = text.find("]")
    if end < 0:
        raise ValueError(f"relayhost {option!r}: missing ']'")
    rest = text[end + 1 :]
    if rest and not rest.startswith(":"):
        raise ValueError(f"relayhost {option!r}: junk after ']'")
    return text[1:end], (rest[1:] if rest else None)


def parse_relayhost(text: str) -> RelayHost:
    """
    Parse the smarthost option. Accepted forms:

      - C{tls:mail.example.net:465}: TLS from the first byte, no MX lookup
        (port 465 if omitted);
      - C{tcp:mail.example.net:587}: plain TCP then STARTTLS, no MX lookup
        (port 25 if omitted); both also take Twisted endpoint keywords
        C{host=}/C{port=} with C{\\:} escaping colons;
      - C{[mail.example.net]:587}, C{[192.0.2.1]}, C{[ipv6:2001:db8::1]:25}:
        Postfix style, brackets mean no MX lookup (port 25 if omitted);
      - C{mail.example.net} or C{mail.example.net:587}: the MX hosts of that
        domain (Postfix C{relayhost} semantics), port 25 if omitted. A bare IP
        address is never MX-looked-up.

    @raise ValueError: the text is none of these (a configuration error).
    """
    option = text
    text = text.strip()
    if not text:
        raise ValueError("relayhost: empty")
    scheme, colon, rest = text.partition(":")
    if colon and scheme.lower() in ("tls", "tcp"):
        implicit_tls = scheme.lower() == "tls"
        default_port = "465" if implicit_tls else "25"
        if rest.startswith("["):
            host, port = _bracketed(rest, option)
            return RelayHost(
                _host(host, option), _port(port or default_port, option), implicit_tls, False
            )
        positional: list[str] = []
        keywords: dict[str, str] = {}
        for word in re.split(r"(?<!\\):", rest):
            word = word.replace("\\:", ":")
            key, eq, value = word.partition("=")
            if eq and key in ("host", "port"):
                keywords[key] = value
            elif eq:
                raise ValueError(f"relayhost {option!r}: unsupported option {key!r}")
            else:
                positional.append(word)
        if len(positional) > 2:
            raise ValueError(f"relayhost {option!r}: expected {scheme}:host:port")
        host = keywords.get("host", positional[0] if positional else "")
        port = keywords.get("port", positional[1] if len(positional) > 1 else default_port)
        if not host:
            raise ValueError(f"relayhost {option!r}: no host")
        return RelayHost(_host(host, option), _port(port, option), implicit_tls, False)
    if text.startswith("["):
        host, port = _bracketed(text, option)
        return RelayHost(_host(host, option), _port(port or "25", option), False, False)
    if text.count(":") > 1:
        raise ValueError(f"relayhost {option!r}: put an IPv6 address in brackets")
    host, colon, port = text.partition(":")
    parsed = _host(host, option)
    try:
        ipaddress.ip_address(parsed)
        mx_lookup = False
    except ValueError:
        mx_lookup = True
    return RelayHost(parsed, _port(port if colon else "25", option), False, mx_lookup)
