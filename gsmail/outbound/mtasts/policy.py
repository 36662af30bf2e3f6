# -*- test-case-name: tests.outbound.test_mtasts -*-
"""
MTA-STS policies (RFC 8461) as text: the C{_mta-sts} TXT record (§3.1),
the policy file (§3.2) and its MX patterns (§4.1). Pure: no I/O, no
reactor.

Not here: caching policies on disk (L{gsmail.outbound.mtasts.cache}),
finding and fetching the policy that applies, and STARTTLS under it
(L{gsmail.outbound.mtasts}).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

import attrs

__all__ = [
    "ENFORCE",
    "MAX_AGE_LIMIT",
    "MAX_POLICY_SIZE",
    "NONE",
    "Policy",
    "PolicyError",
    "TESTING",
    "mx_matches",
    "parse_policy",
    "parse_txt_records",
]

ENFORCE: Final = "enforce"
TESTING: Final = "testing"
NONE: Final = "none"

#: RFC 8461 §3.2: C{max_age} is at most 31557600 seconds (about a year).
MAX_AGE_LIMIT: Final = 31_557_600
#: Largest policy body read, in bytes: far above any real policy (a few hundred bytes).
MAX_POLICY_SIZE: Final = 64 * 1024

_ID: Final = re.compile(r"[A-Za-z0-9]{1,32}\Z")
_FIELD: Final = re.compile(r"([A-Za-z0-9_]+):[ \t]*(.*?)[ \t]*\Z")
_PATTERN: Final = re.compile(r"(\*\.)?[a-z0-9_\-]+(\.[a-z0-9_\-]+)*\Z")


class PolicyError(Exception):
    """
    A policy could not be had: the fetch failed or its text is invalid.

    @ivar result_type: the RFC 8460 §4.3.2.1 result type for TLS reports:
        C{sts-policy-fetch-error}, C{sts-policy-invalid} or
        C{sts-webpki-invalid}.
    """

    def __init__(self, detail: str, result_type: str = "sts-policy-invalid") -> None:
        super().__init__(detail)
        self.result_type = result_type


@attrs.frozen
class Policy:
    """
    One MTA-STS policy (RFC 8461 §3.2).

    @ivar mode: C{enforce}, C{testing} or C{none}.
    @ivar mx: the MX patterns, lowercase: host names or C{*.example.net}.
    @ivar max_age: seconds the policy may be cached (capped at
        L{MAX_AGE_LIMIT}).
    @ivar text: the policy as served (for TLS reports and the cache).
    """

    mode: str
    mx: tuple[str, ...]
    max_age: int
    text: str = attrs.field(repr=False, default="")

    def matches(self, host: str) -> bool:
        """Whether MX host C{host} is one the policy lists (L{mx_matches})."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def parse_txt_records(records: Sequence[Sequence[bytes]]) -> str | None:
    """
    The policy C{id} of a domain's C{_mta-sts} TXT records (RFC 8461 §3.1).

    Records not starting with C{v=STSv1;} are ignored; the strings of one
    record are joined without spaces. Unless exactly one record remains
    and it has a valid C{id} (1 to 32 letters and digits), the domain has
    no usable record.

    @param records: each TXT record's strings.
    @return: the C{id}, or C{None}.
    """
    found = []
    for strings in records:
        text = b"".join(strings).decode("ascii", "replace")
        if text.startswith("v=STSv1;") or text == "v=STSv1":
            found.append(text)
    if len(found) != 1:
        return None
    fields: dict[str, str] = {}
    for part in found[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq:
            fields.setdefault(key.strip(), value.strip())
    policy_id = fields.get("id", "")
    return policy_id if _ID.match(policy_id) else None


def parse_policy(text: bytes | str) -> Policy:
    """
    Parse a policy file (RFC 8461 §3.2): C{key: value} lines (CRLF or LF),
    C{version: STSv1}, C{mode}, C{max_age} (digits; capped at
    L{MAX_AGE_LIMIT}) and one or more C{mx} lines (required unless the mode
    is C{none}). Unknown keys are ignored; for a repeated key other than
    C{mx} the first counts.

    @raise PolicyError: not UTF-8, a missing or bad field
        (result type C{sts-policy-invalid}).
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PolicyError("the policy is not UTF-8") from e
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _FIELD.match(line)
        if match is None:
            raise PolicyError(f"bad policy line {line[:80]!r}")
        key, value = match.group(1), match.group(2)
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not _PATTERN.match(pattern):
                raise PolicyError(f"bad mx pattern {value[:80]!r}")
            mx.append(pattern)
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError(f"version is {fields.get('version', '(missing)')!r}, not STSv1")
    mode = fields.get("mode", "")
    if mode not in (ENFORCE, TESTING, NONE):
        raise PolicyError(f"bad mode {mode[:20]!r}")
    age = fields.get("max_age", "")
    if not (age.isascii() and age.isdigit()) or len(age) > 10:
        raise PolicyError(f"bad max_age {age[:20]!r}")
    if not mx and mode != NONE:
        raise PolicyError("no mx line")
    return Policy(mode, tuple(mx), min(int(age), MAX_AGE_LIMIT), text)


def mx_matches(pattern: str, host: str) -> bool:
    """
    Whether MX host C{host} matches a policy's C{mx} pattern (RFC 8461
    §4.1): equal names (case and a trailing dot ignored), or a wildcard
    C{*.example.net} standing for exactly one label: it matches
    C{mail.example.net}, neither C{example.net} nor C{a.b.example.net}.
    """
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern
