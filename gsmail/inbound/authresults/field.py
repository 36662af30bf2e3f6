# -*- test-case-name: tests.inbound.test_authresults,tests.integration.test_authresults -*-
"""
The C{Authentication-Results} field (RFC 8601): what the checks found
(L{Checks}), gsmail's own field written from it (L{format_field}), and the
fields already in a message that claim to come from gsmail's host, which
are forgeries (RFC 8601 §5), found and removed. Pure: no I/O.

Not here: the checks (L{gsmail.inbound.authresults.checks}) or when they run
(L{gsmail.inbound.authresults}).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

import attrs

__all__ = [
    "Checks",
    "DKIMResult",
    "authserv_id_of",
    "forged_fields",
    "format_field",
    "header_fields",
    "remove_fields",
]

_TOKEN: Final = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+")
_COMMENT: Final = re.compile(r"\([^()]*\)")


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


def header_fields(header: bytes) -> list[tuple[bytes, bytes]]:
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
