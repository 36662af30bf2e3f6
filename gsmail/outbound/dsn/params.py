# -*- test-case-name: tests.outbound.test_dsn,tests.outbound.test_submission -*-
"""
The RFC 3461 parameters that ask for delivery status notifications:
C{NOTIFY}, C{ORCPT} and C{ENVID} as the submission port checks them, what a
recipient's C{NOTIFY} asks for, and the encodings they travel in (RFC 3461
C{xtext}, RFC 6533 C{utf-8-addr-xtext}), which the report
(L{gsmail.outbound.dsn}) and the reader (L{gsmail.outbound.dsn.parse}) use
too.

Not here: building the report (L{gsmail.outbound.dsn}) or reading one back
(L{gsmail.outbound.dsn.parse}).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "parse_notify",
    "notify_requests",
    "parse_orcpt",
    "orcpt_parameter",
    "parse_envid",
    "xtext_decode",
    "xtext_encode",
    "utf8_addr_xtext",
    "UTF8_ADDR_ESCAPE",
    "STATUS_CODE",
    "DEFAULT_NOTIFY",
    "VERP_DEFAULT_NOTIFY",
    "MAX_ENVID",
    "MAX_ORCPT",
]

#: An RFC 3463 status code, e.g. C{5.1.1}.
STATUS_CODE: Final = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")

#: What a recipient without a C{NOTIFY} parameter gets: RFC 3461 §4.1 leaves
#: the default (FAILURE, or FAILURE and DELAY) to the MTA; gsmail warns of
#: delays as well, as Postfix does once C{delay_warning_time} is set.
DEFAULT_NOTIFY: Final = frozenset({"FAILURE", "DELAY"})
#: The default for mail gsmail sends with a VERP sender per recipient
#: (GroupServer's posts): every notice to such an address reaches a bounce
#: processor (GroupServer's bounce page), which counts it as a bounce, so
#: only failures are reported unless C{NOTIFY} asks for more.
VERP_DEFAULT_NOTIFY: Final = frozenset({"FAILURE"})
_NOTIFY_ORDER: Final = ("SUCCESS", "FAILURE", "DELAY")
#: RFC 3461 §4.4 and §4.2: the longest ENVID and ORCPT values (characters).
MAX_ENVID: Final = 100
MAX_ORCPT: Final = 500
_HEXCHAR: Final = re.compile(r"\+([0-9A-Fa-f]{2})")
_XTEXT: Final = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*\Z")
_ADDR_TYPE: Final = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")
#: One C{\\x{HEX}} escape of RFC 6533 §3 C{utf-8-addr-xtext}.
UTF8_ADDR_ESCAPE: Final = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def utf8_addr_xtext(address: str) -> str:
    """RFC 6533 §3 C{utf-8-addr-xtext}: QCHARs as is, the rest as C{\\x{HEX}}."""
    return "".join(
        c if "\x21" <= c <= "\x7e" and c not in "+=\\" else f"\\x{{{ord(c):X}}}" for c in address
    )


def xtext_decode(text: str) -> str:
    """
    Undo RFC 3461 §4 C{xtext}: C{+XX} (two hex digits) is the octet XX; any
    other character from C{!} to C{~} but C{+} and C{=} stands for itself.
    Lowercase hex digits are taken too (be liberal).

    @param text: the parameter value as received.
    @return: the decoded text (octets above 127 are refused, so it is ASCII).
    @raise ValueError: not xtext (a space, C{=}, a control or non-ASCII
        character, a C{+} without two hex digits, or an encoded octet above
        127); the submission port answers C{501 5.5.4}.
    """
    if not _XTEXT.match(text):
        raise ValueError("not xtext (RFC 3461 section 4)")
    decoded = _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text)
    if not decoded.isascii():
        raise ValueError("xtext must encode US-ASCII")
    return decoded


def xtext_encode(text: str) -> str:
    """
    RFC 3461 §4 C{xtext}: C{+}, C{=}, space, controls and non-ASCII as
    C{+XX} (UTF-8 octets for non-ASCII), the rest as is.
    """
    return "".join(
        c if "\x21" <= c <= "\x7e" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        for c in text
    )


def _printable(text: str) -> bool:
    """Printable US-ASCII, space included (RFC 3461 §4.2, §4.4)."""
    return all(" " <= c <= "~" for c in text)


def parse_notify(value: str | None) -> str:
    """
    Check and normalise a C{NOTIFY} value (RFC 3461 §4.1): C{NEVER} alone,
    or one or more of C{SUCCESS}, C{FAILURE}, C{DELAY}, any case.

    @return: C{"NEVER"} or the words in the order C{SUCCESS,FAILURE,DELAY},
        e.g. C{"FAILURE,DELAY"}.
    @raise ValueError: missing, empty, unknown or repeated words, or NEVER
        with others; the submission port answers C{501 5.5.4}.
    """
    words = (value or "").upper().split(",")
    chosen = set(words)
    if (
        not value
        or len(chosen) != len(words)
        or not chosen <= {"NEVER", *_NOTIFY_ORDER}
        or ("NEVER" in chosen and len(chosen) > 1)
    ):
        raise ValueError("NOTIFY takes NEVER, or SUCCESS, FAILURE and DELAY (RFC 3461 section 4.1)")
    return "NEVER" if "NEVER" in chosen else ",".join(w for w in _NOTIFY_ORDER if w in chosen)


def notify_requests(notify: str, kind: str, *, verp: bool = False) -> bool:
    """
    Whether a recipient's C{NOTIFY} asks for a notice of C{kind}.

    @param notify: as L{parse_notify} returns it; C{""} when the client gave
        none: then L{DEFAULT_NOTIFY}, or L{VERP_DEFAULT_NOTIFY} for mail
        delivered with a VERP sender per recipient.
    @param kind: C{"SUCCESS"}, C{"FAILURE"} or C{"DELAY"}.
    @param verp: the message goes out with a VERP sender per recipient.
    """
    if not notify:
        return kind in (VERP_DEFAULT_NOTIFY if verp else DEFAULT_NOTIFY)
    return kind in notify.split(",")


def parse_orcpt(value: str | None) -> str:
    """
    Check and decode an C{ORCPT} value (RFC 3461 §4.2): C{addr-type;xtext},
    at most 500 characters. The C{utf-8} type (RFC 6533 §3) holds
    C{\\x{HEX}} escapes (and, with SMTPUTF8, UTF-8 itself); every other
    type is xtext and must decode to printable US-ASCII.

    @return: C{type;address}, the type lowercased and the address decoded,
        e.g. C{rfc822;a+b@example.org} for C{rfc822;a+2Bb@example.org}.
    @raise ValueError: malformed; the submission port answers C{501 5.5.4}.
    """
    kind, semicolon, text = (value or "").partition(";")
    if not value or not semicolon or not text or not _ADDR_TYPE.match(kind):
        raise ValueError("ORCPT takes addr-type;xtext (RFC 3461 section 4.2)")
    if len(value) > MAX_ORCPT:
        raise ValueError(f"ORCPT is longer than {MAX_ORCPT} characters (RFC 3461 section 4.2)")
    kind = kind.lower()
    if kind == "utf-8":
        if any(c in "+=" or not c.isprintable() or c.isspace() for c in text):
            raise ValueError("bad utf-8-addr-xtext in ORCPT (RFC 6533 section 3)")
        address = UTF8_ADDR_ESCAPE.sub(lambda m: chr(min(int(m.group(1), 16), 0x10FFFF)), text)
    else:
        address = xtext_decode(text)
    if not address or not address.isprintable() or address != address.strip():
        raise ValueError("ORCPT must decode to printable characters (RFC 3461 section 4.2)")
    return f"{kind};{address}"


def orcpt_parameter(orcpt: str) -> str:
    """
    The C{ORCPT} value to pass on to a next hop that offers DSN (RFC 3461
    §4.2), encoded again from L{parse_orcpt}'s form: xtext, or
    C{utf-8-addr-xtext} for the C{utf-8} type.
    """
    kind, _, address = orcpt.partition(";")
    return f"{kind};{utf8_addr_xtext(address) if kind == 'utf-8' else xtext_encode(address)}"


def parse_envid(value: str | None) -> str:
    """
    Check an C{ENVID} value (RFC 3461 §4.4): xtext of at most 100
    characters that decodes to printable US-ASCII.

    @return: the value as received (still xtext: it is passed on as is, and
        decoded with L{xtext_decode} for C{Original-Envelope-Id}).
    @raise ValueError: malformed; the submission port answers C{501 5.5.4}.
    """
    if not value:
        raise ValueError("ENVID needs a value (RFC 3461 section 4.4)")
    if len(value) > MAX_ENVID:
        raise ValueError(f"ENVID is longer than {MAX_ENVID} characters (RFC 3461 section 4.4)")
    if not _printable(xtext_decode(value)):
        raise ValueError("ENVID must decode to printable US-ASCII (RFC 3461 section 4.4)")
    return value
