# -*- test-case-name: tests.test_routes, tests.inbound.test_routing -*-
"""
The route table's templates: the C{${...}} substitutions of route values
(L{Substitutions}, L{expand}), their check when the file is read
(L{check_template}) and L{one_line}, which makes a header value safe to
substitute. Pure. The names are described in C{docs/routes.md}.

Not the file parser (L{gsmail.routes}), the entries (L{gsmail.routes.table})
nor the policy (L{gsmail.routes.policy}).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterable, Mapping
from email.message import Message
from typing import Final

import attrs

_VARIABLE: Final = re.compile(r"\$\{([^{}]*)\}")
_SEQNO: Final = re.compile(r"seqno(?:/([1-9][0-9]{0,8}))?\Z")
_HEADER_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")
_PLAIN_VARIABLES: Final = frozenset(
    {"sender", "recipient", "local", "domain", "group", "route", "subject", "from", "message_id"}
)


@attrs.frozen
class Substitutions:
    """
    The values of C{${...}} in templates.

    @ivar values: plain names (C{sender}, C{recipient}, C{local},
        C{domain}, C{group}, C{route}, C{subject}, C{from}, C{message_id},
        pattern groups).
    @ivar header: the message's header, for C{${header.Field}}, or C{None}.
    @ivar now: POSIX seconds, for C{${date:FORMAT}} (UTC, C{strftime}).
    @ivar seqno: the route's sequence number for this message, or C{None}.
    """

    values: Mapping[str, str] = attrs.field(factory=dict)
    header: Message | None = None
    now: float = 0.0
    seqno: int | None = None


def expand(template: str, subs: Substitutions, clean: Callable[[str], str] | None = None) -> str:
    """
    Replace each C{${NAME}} of C{template}: C{${sender}}, C{${recipient}},
    C{${local}}, C{${domain}}, C{${group}}, C{${route}}, C{${subject}},
    C{${from}}, C{${message_id}}, C{${1}} (a pattern's groups),
    C{${header.Field}} (the first such field, unfolded; C{""} if none),
    C{${date:FORMAT}} (C{strftime}, UTC), C{${seqno}} and C{${seqno/N}} (the
    sequence number divided by N, DeleGate's archive-per-N form). Unknown
    names give C{""} (L{check_template} refuses them when the file is read).

    @param clean: applied to every substituted value (never to the
        template's own text): e.g. to keep C{/} out of a path.
    """

    def one(m: re.Match[str]) -> str:
        value = _value(m.group(1), subs)
        return clean(value) if clean is not None else value

    return _VARIABLE.sub(one, template)


def _value(name: str, subs: Substitutions) -> str:
    seq = _SEQNO.match(name)
    if seq is not None:
        if subs.seqno is None:
            return ""
        return str(subs.seqno // int(seq.group(1) or 1))
    if name.startswith("date:"):
        when = datetime.datetime.fromtimestamp(subs.now, datetime.UTC)
        return when.strftime(name[5:])
    if name.startswith("header."):
        return _header_value(subs.header, name[7:])
    if name in ("subject", "from", "message_id") and name not in subs.values:
        return _header_value(subs.header, name.replace("_", "-"))
    return subs.values.get(name, "")


def _header_value(header: Message | None, field: str) -> str:
    if header is None:
        return ""
    value = header.get(field)
    if value is None:
        return ""
    return one_line(str(value))


def one_line(text: str) -> str:
    """C{text} unfolded, with every control character (CR, LF, ...) made a space."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def check_template(template: str, groups: Iterable[str]) -> str | None:
    """
    The first unknown C{${NAME}} of C{template}, or C{None}.

    @param groups: the names the route's pattern captures (C{"1"}, ...).
    """
    known = _PLAIN_VARIABLES | set(groups)
    name: str
    for name in _VARIABLE.findall(template):
        if name in known or _SEQNO.match(name) or name.startswith("date:"):
            continue
        if name.startswith("header.") and _HEADER_NAME.match(name[7:]):
            continue
        return name
    return None
