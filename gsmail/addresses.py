# -*- test-case-name: tests.test_addresses -*-
"""
Envelope addresses: parsing the paths of C{MAIL FROM} and C{RCPT TO}
(RFC 5321 §4.1.2, with UTF-8 per RFC 6531), the XVERP codec
(C{list+mailbox=domain@site}, as Postfix expands it), and the routing decision
for a recipient, all pure functions.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from typing import TYPE_CHECKING, Protocol

import attrs

if TYPE_CHECKING:
    from gsmail.routes import RouteMatch

__all__ = [
    "Address",
    "AddressError",
    "UnsafeAddressError",
    "ParameterError",
    "BounceCheck",
    "Route",
    "RouteKind",
    "parse_path",
    "parse_parameters",
    "parse_number",
    "is_helo_name",
    "is_xtext",
    "decode_xverp",
    "encode_xverp",
    "route_recipient",
]

# RFC 5321 §4.5.3.1: local part 64 octets, domain 255 octets, path 256 octets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class AddressError(ValueError):
    """
    A path or address does not follow RFC 5321 §4.1.2. Maps to
    C{501 5.1.7} (sender) or C{501 5.1.3} (recipient).
    """


class UnsafeAddressError(AddressError):
    """
    An address holds a character that must never reach a header field: a
    control character (C0, C1, DEL), a line or paragraph separator
    (U+0085, U+2028, U+2029) or another unprintable one. RFC 6531 lets an
    address carry UTF-8, but the address goes into C{Return-Path},
    C{Received} and C{X-Original-To} as it is, so such an address is
    refused rather than encoded. Maps to C{553 5.1.7} (sender) or
    C{553 5.1.3} (recipient).
    """


class ParameterError(AddressError):
    """
    A malformed ESMTP parameter (RFC 5321 §4.1.2 C{Mail-parameters},
    C{Rcpt-parameters}). Maps to C{501 5.5.4}.
    """


@attrs.frozen
class Address:
    """
    A mailbox C{local@domain}. The local part keeps its case (RFC 5321 §2.4:
    only the receiving host may interpret it); the domain is lowercased.
    """

    local: str
    domain: str

    def __str__(self) -> str:
        # No domain: the bare C{postmaster} of RFC 5321 §4.1.1.3.
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_ascii(self) -> bool:
        """C{False} when the address needs SMTPUTF8 (RFC 6531)."""
        return str(self).isascii()


# atext of RFC 5322 §3.2.3, widened to any non-ASCII character (RFC 6531 §3.3).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"(?!-)[A-Za-z0-9\-\u0080-\U0010ffff]{1,63}(?<!-)\Z")
_ADDRESS_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]\Z")
_SOURCE_ROUTE = re.compile(r"@[^:,]+(?:,@[^:,]+)*:")


def parse_mailbox(text: str) -> Address:
    """
    Parse a mailbox C{local@domain} (RFC 5321 §4.1.2 C{Mailbox}). A
    trailing dot, or several, is refused like any empty label: RFC 5321's
    C{Domain} has none, and C{groups.example.com.} is not one of the
    site's domains.

    @raise UnsafeAddressError: an unprintable character (see there).
    @raise AddressError: not a mailbox.
    """
    if not text.isprintable():
        raise UnsafeAddressError("control or line-breaking character in the address")
    local, sep, domain = text.rpartition("@")
    if not sep or not local or not domain:
        raise AddressError(f"not local@domain: {text[:100]!r}")
    if len(local.encode()) > MAX_LOCAL_PART:
        raise AddressError("local part longer than 64 octets")
    if len(domain.encode()) > MAX_DOMAIN:
        raise AddressError("domain longer than 255 octets")
    if not (_DOT_STRING.match(local) or _QUOTED_STRING.match(local)):
        raise AddressError(f"bad local part: {local!r}")
    if not _ADDRESS_LITERAL.match(domain):
        if not all(_LABEL.match(label) for label in domain.split(".")):
            raise AddressError(f"bad domain: {domain!r}")
    return Address(local, domain.lower())


def parse_path(
    text: str, *, allow_null: bool, allow_postmaster: bool = False
) -> tuple[Address | None, str]:
    """
    Parse the start of a C{MAIL FROM:} or C{RCPT TO:} argument: a path in
    angle brackets, then the parameters.

    @param text: what follows C{FROM:} or C{TO:}, e.g. C{"<a@b.example> SIZE=10"}.
    @param allow_null: accept C{<>}, the null reverse-path (MAIL FROM only).
    @param allow_postmaster: accept C{<postmaster>} without a domain, in any
        case (RCPT TO only, RFC 5321 §4.1.1.3); it gives an L{Address}
        with an empty domain.
    @return: the address (C{None} for C{<>}) and the rest of the line (the
        parameters, unparsed).
    @raise UnsafeAddressError: the path holds an unprintable character.
    @raise AddressError: no well-formed path.
    """
    text = text.lstrip(" ")
    if not text.startswith("<"):
        # Tolerate a bare address without brackets, as Postfix does by default.
        bare, _, rest = text.partition(" ")
        if not bare:
            raise AddressError("no path")
        if allow_postmaster and bare.lower() == "postmaster":
            return Address(bare, ""), rest
        return parse_mailbox(bare), rest
    end = _find_path_end(text)
    inner = text[1:end]
    rest = text[end + 1 :]
    if rest and not rest.startswith(" "):
        raise AddressError("junk after the path")
    if len(inner.encode()) > MAX_PATH:
        raise AddressError("path longer than 256 octets")
    if not inner.isprintable():
        raise UnsafeAddressError("control or line-breaking character in the path")
    # A source route (@a,@b:user@c) is accepted and ignored (RFC 5321 §4.1.2, C.).
    m = _SOURCE_ROUTE.match(inner)
    if m:
        inner = inner[m.end() :]
    if inner == "":
        if not allow_null:
            raise AddressError("null path not allowed here")
        return None, rest.strip(" ")
    if allow_postmaster and inner.lower() == "postmaster":
        return Address(inner, ""), rest.strip(" ")
    return parse_mailbox(inner), rest.strip(" ")


def _find_path_end(text: str) -> int:
    """The index of the C{>} closing the path at C{text[0]}, skipping quoted strings."""
    quoted = False
    escaped = False
    for i in range(1, len(text)):
        c = text[i]
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
    raise AddressError("no closing '>'")


_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*\Z", re.ASCII)
_NUMBER = re.compile(r"[0-9]{1,20}\Z", re.ASCII)


def parse_parameters(text: str) -> dict[str, str | None]:
    """
    Parse ESMTP parameters (RFC 5321 §4.1.2 C{Mail-parameters}): C{KEY=value}
    or C{KEY}, separated by spaces. Keywords (ASCII letters, digits and
    hyphens) are uppercased. A value is printable text without spaces
    (C{esmtp-value}, widened to UTF-8 by RFC 6531 §3.3; C{=} is kept, as
    Postfix's C{XVERP=+=} needs it).

    @raise ParameterError: a malformed parameter (maps to C{501 5.5.4}).
    """
    params: dict[str, str | None] = {}
    for word in text.split(" "):
        if not word:
            continue
        key, sep, value = word.partition("=")
        if not _KEYWORD.match(key):
            raise ParameterError("bad parameter keyword")
        if sep and not value:
            raise ParameterError(f"empty value for {key.upper()}")
        if not value.isprintable():
            raise ParameterError(f"control character in the value of {key.upper()}")
        params[key.upper()] = value if sep else None
    return params


def parse_number(keyword: str, value: str | None, maximum: int) -> int:
    """
    The value of a numeric ESMTP parameter (C{SIZE=}, RFC 1870 §3:
    C{1*20DIGIT}): ASCII digits only. C{str.isdigit} also takes C{²},
    C{①} and C{٣}, which C{int()} refuses or reads as other numbers.

    @param keyword: the parameter's name, for the error text.
    @param maximum: the largest value taken.
    @raise ParameterError: no value, not 1 to 20 ASCII digits, or over
        C{maximum} (maps to C{501 5.5.4}).
    """
    if value is None:
        raise ParameterError(f"{keyword} needs a value")
    if not _NUMBER.match(value):
        raise ParameterError(f"{keyword} must be 1 to 20 ASCII digits")
    number = int(value)
    if number > maximum:
        raise ParameterError(f"{keyword} must be at most {maximum}")
    return number


_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z", re.ASCII)


def is_xtext(value: str) -> bool:
    """
    Whether C{value} is C{xtext} (RFC 3461 §4: printable ASCII but C{+}
    and C{=}, which are written C{+HH}), the syntax of C{ENVID=} and of the
    address in C{ORCPT=}.
    """
    return bool(_XTEXT.match(value))


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9\-]{1,63}(?<!-)\Z", re.ASCII)


def is_helo_name(name: str) -> bool:
    """
    Whether a HELO/EHLO/LHLO argument has the syntax RFC 5321 §4.1.1.1 asks
    for: an ASCII domain name (letter-digit-hyphen labels, at most 255
    octets, no trailing dot) or an IPv4 or IPv6 address literal
    (C{[192.0.2.1]}, C{[IPv6:2001:db8::1]}), the check of Postfix's
    C{reject_invalid_helo_hostname}.
    """
    if name.startswith("[") and name.endswith("]"):
        inner = name[1:-1]
        try:
            if inner[:5].upper() == "IPV6:":
                return ipaddress.ip_address(inner[5:]).version == 6
            return ipaddress.ip_address(inner).version == 4
        except ValueError:
            return False
    return len(name) <= MAX_DOMAIN and all(_HOST_LABEL.match(label) for label in name.split("."))


def encode_xverp(list_address: Address, recipient: Address) -> Address:
    """
    The VERP envelope sender for mail from C{list_address} to C{recipient},
    as Postfix's XVERP expands it with the default delimiters C{+=}:
    C{dev@groups.example.com} to C{alice@example.org} gives
    C{dev+alice=example.org@groups.example.com}.
    """
    return Address(
        f"{list_address.local}+{recipient.local}={recipient.domain}", list_address.domain
    )


def decode_xverp(address: Address) -> tuple[Address, Address] | None:
    """
    Undo L{encode_xverp}: C{dev+alice=example.org@groups.example.com} gives
    (C{dev@groups.example.com}, C{alice@example.org}), or C{None} when the
    address is not of that form. As smtp2gs did (C{(.*?)\\+(.*?)\\=(.*?)\\@(.*)}),
    the list part ends at the first C{+} and the member's mailbox at the last
    C{=} (a member's local part may itself contain C{=}).
    """
    list_local, plus, rest = address.local.partition("+")
    if not plus or not list_local:
        return None
    user_local, eq, user_domain = rest.rpartition("=")
    if not eq or not user_local or not user_domain or "." not in user_domain:
        return None
    try:
        user = parse_mailbox(f"{user_local}@{user_domain}")
    except AddressError:
        return None
    return Address(list_local, address.domain), user


class RouteKind(enum.Enum):
    """Where a recipient's copy goes (see C{groupserver-protocol.md})."""

    REJECT_RELAY = "reject-relay"  # not one of our domains: 550 5.7.1
    RELAY = "relay"  # relay prefix: the relay page
    BOUNCE = "bounce"  # XVERP address: the bounce page
    GROUP = "group"  # look the group up, then the add-email page
    REMOTE = "remote"  # submission: queued for delivery elsewhere
    TABLE = "table"  # an entry of the route table (gsmail.routes): its actions


class BounceCheck(enum.Enum):
    """
    What the address of a BOUNCE route proves (L{gsmail.verp}): whether a
    bounce to it may be recorded, once its message is a failure report.
    """

    SIGNED = "signed"  # a valid, recent tag (full form)
    SIGNED_SHORT = "signed-short"  # short form: the tag is checked against the report
    UNSIGNED = "unsigned"  # no tag, within verp_unsigned_until
    UNSIGNED_LATE = "unsigned-late"  # no tag, after verp_unsigned_until: dropped
    BAD_TAG = "bad-tag"  # no key made the tag: forged, dropped
    EXPIRED = "expired"  # older than verp_max_age: dropped
    NO_KEY = "no-key"  # signed, and the key file cannot be read: 451 4.3.5
    UNKNOWN_GROUP = "unknown-group"  # unsigned, for no group: dropped

    @property
    def recordable(self) -> bool:
        """Whether a failure report to the address may be recorded."""
        return self in (BounceCheck.SIGNED, BounceCheck.SIGNED_SHORT, BounceCheck.UNSIGNED)


@attrs.frozen
class Route:
    """
    The routing decision for one recipient, made at RCPT time.

    @ivar group_address: for BOUNCE, the group's list address.
    @ivar member_address: for BOUNCE, the member whose mail bounced
        (C{None} for a short signed address: the report names the member).
    @ivar group_id: for GROUP, once the lookup answered.
    @ivar bounce_check: for BOUNCE, what its address proves.
    @ivar bounce_tag: for BOUNCE, the signed address's tag, lowercased.
    """

    kind: RouteKind
    recipient: Address
    group_address: Address | None = None
    member_address: Address | None = None
    group_id: str | None = None
    #: RCPT TO parameters the listener accepted (e.g. NOTIFY, ORCPT), in order.
    params: tuple[tuple[str, str | None], ...] = ()
    bounce_check: BounceCheck = BounceCheck.UNSIGNED
    bounce_tag: str = ""
    #: For TABLE, the route table's entry and what its pattern captured.
    table: RouteMatch | None = attrs.field(default=None, eq=False, repr=False)


class BounceRouter(Protocol):
    """Reads bounce addresses (L{gsmail.verp.VerpPolicy})."""

    def route(self, recipient: Address) -> Route | None:
        """The BOUNCE route of C{recipient}, or C{None}: not a bounce address."""


def route_recipient(
    recipient: Address,
    domains: tuple[str, ...],
    relay_prefix: str,
    bounces: BounceRouter | None = None,
) -> Route:
    """
    Decide, without I/O, where C{recipient} goes: not our domain → reject
    (gsmail is never an open relay); the relay prefix → the relay page; an
    XVERP address → the bounce page; anything else → a group lookup. The
    daemon consults its route table first (L{gsmail.routes}: postmaster,
    abuse, aliases).

    @param domains: the lowercased mail domains the site receives for.
    @param relay_prefix: C{relay-address-prefix} (default C{p-}); empty
        disables relaying.
    @param bounces: reads signed and unsigned bounce addresses; C{None}:
        only the unsigned XVERP form is a bounce address.
    """
    if recipient.domain not in domains:
        return Route(RouteKind.REJECT_RELAY, recipient)
    if relay_prefix and recipient.local.lower().startswith(relay_prefix.lower()):
        return Route(RouteKind.RELAY, recipient)
    if bounces is not None:
        route = bounces.route(recipient)
        return Route(RouteKind.GROUP, recipient) if route is None else route
    bounce = decode_xverp(recipient)
    if bounce is not None:
        return Route(RouteKind.BOUNCE, recipient, group_address=bounce[0], member_address=bounce[1])
    return Route(RouteKind.GROUP, recipient)
