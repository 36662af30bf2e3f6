# -*- test-case-name: tests.test_routes, tests.inbound.test_routing -*-
"""
The route table's policy: what a message must be for a route to take it
(L{Policy}), checked at the end of DATA by L{check_policy}, whose
L{Refusal} names the rule broken; and L{glob_matches}, the address patterns
of the sender and header rules. Pure.

Not the file parser (L{gsmail.routes}) nor the entries and their matching
(L{gsmail.routes.table}).
"""

from __future__ import annotations

import email.utils
import fnmatch
import ipaddress
import re
from collections.abc import Iterable
from email.message import Message
from typing import Final

import attrs

from gsmail.routes.templates import one_line
from gsmail.status import Reply

_WORD_CHARS: Final = re.compile(r"\w+", re.UNICODE)


@attrs.frozen
class Policy:
    """
    What a message must be for a route to take it (DeleGate's C{ACCEPT/...}
    and C{REJECT/...}, its C{rni}, C{res} and C{reb} options). Empty or
    C{None}: no check.

    @ivar max_size: bytes, header and body (C{ACCEPT/Max-Bytes}).
    @ivar min_body_size: bytes of body (C{ACCEPT/Min-Body-Bytes}).
    @ivar accept_sender: envelope senders allowed (glob patterns, any case).
    @ivar accept_from: addresses of C{From} allowed, one must match.
    @ivar require_header: C{(field, regex)}: the field must be there and
        one of its values match.
    @ivar forbid_header: C{(field, regex)}: no value may match.
    @ivar client_networks: the sending client's address must be in one.
    @ivar required_words: one must be in the subject or the text (C{ACCEPT/User-Text}).
    @ivar forbidden_words: none may be (C{REJECT/User-Text}).
    @ivar content_types: the top-level C{Content-Type} must be one (a type,
        or C{type/*}).
    """

    max_size: int | None = None
    min_body_size: int | None = None
    accept_sender: tuple[str, ...] = ()
    reject_sender: tuple[str, ...] = ()
    accept_from: tuple[str, ...] = ()
    reject_from: tuple[str, ...] = ()
    accept_to: tuple[str, ...] = ()
    reject_to: tuple[str, ...] = ()
    require_header: tuple[tuple[str, re.Pattern[str]], ...] = ()
    forbid_header: tuple[tuple[str, re.Pattern[str]], ...] = ()
    client_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    required_words: tuple[str, ...] = ()
    forbidden_words: tuple[str, ...] = ()
    content_types: tuple[str, ...] = ()
    require_message_id: bool = False
    require_subject: bool = False
    require_body: bool = False
    max_exclamations: int | None = None

    @property
    def needs_text(self) -> bool:
        """Whether checking needs the message's text, not only its header."""
        return bool(
            self.required_words or self.forbidden_words or self.max_exclamations is not None
        )


def glob_matches(patterns: Iterable[str], address: str) -> bool:
    """
    Whether C{address} matches one of the glob C{patterns}: C{*@example.com},
    C{boss@example.com}, C{*-owner@*}; any case. A pattern without C{@} is a
    domain and its subdomains (C{example.com} matches C{a@example.com} and
    C{a@lists.example.com}).
    """
    address = address.lower()
    for pattern in patterns:
        pattern = pattern.lower()
        if "@" not in pattern:
            domain = address.rpartition("@")[2]
            if domain == pattern or domain.endswith("." + pattern):
                return True
        elif fnmatch.fnmatchcase(address, pattern):
            return True
    return False


@attrs.frozen
class Refusal:
    """A policy rule a message broke: the reply, and the rule's name for the log."""

    reply: Reply
    rule: str


def check_policy(
    policy: Policy,
    route: str,
    *,
    sender: str,
    client: str,
    header: Message,
    size: int,
    body_size: int,
    text: str = "",
) -> Refusal | None:
    """
    Check a message against C{policy}, rules in the order of L{Policy}'s
    fields; the first broken one gives the refusal, its text naming the
    rule and the route. Pure.

    @param sender: the envelope sender (C{""}: the null sender).
    @param client: the client's IP address, or C{""} (a UNIX socket, local).
    @param header: the message's header section.
    @param size: the message's size in bytes (as received, LF line ends).
    @param body_size: the size of its body (after the blank line).
    @param text: the subject and the text parts, decoded (for the word
        checks; only read when L{Policy.needs_text}).
    @return: C{None} when the message passes. Replies: C{552 5.3.4} over
        C{max_size}; C{550 5.6.0} for C{min_body_size}, C{require_subject},
        C{require_body}, C{require_message_id}, C{content_types}; C{550
        5.7.1} for the rest (the sender, the header, the client, the words).
    """

    def refuse(code: int, enhanced: str, rule: str, why: str) -> Refusal:
        return Refusal(Reply(code, enhanced, f"{why} (rule {rule} of route {route})"), rule)

    if policy.max_size is not None and size > policy.max_size:
        return refuse(552, "5.3.4", "max_size", f"Message larger than {policy.max_size} bytes")
    if policy.min_body_size is not None and body_size < policy.min_body_size:
        return refuse(
            550, "5.6.0", "min_body_size", f"Message body smaller than {policy.min_body_size} bytes"
        )
    if policy.accept_sender and not glob_matches(policy.accept_sender, sender):
        return refuse(550, "5.7.1", "accept_sender", "Sender not allowed to write here")
    if policy.reject_sender and glob_matches(policy.reject_sender, sender):
        return refuse(550, "5.7.1", "reject_sender", "Sender not allowed to write here")
    for key, field in (("from", "From"), ("to", "To")):
        accept: tuple[str, ...] = getattr(policy, f"accept_{key}")
        reject: tuple[str, ...] = getattr(policy, f"reject_{key}")
        if not (accept or reject):
            continue
        values = [str(v) for v in header.get_all(field, [])]
        if field == "To":
            values += [str(v) for v in header.get_all("Cc", [])]
        found = [a for _, a in email.utils.getaddresses(values) if a]
        if accept and not any(glob_matches(accept, a) for a in found):
            return refuse(550, "5.7.1", f"accept_{key}", f"{field} address not allowed here")
        if reject and any(glob_matches(reject, a) for a in found):
            return refuse(550, "5.7.1", f"reject_{key}", f"{field} address not allowed here")
    for field, regex in policy.require_header:
        values = [one_line(str(v)) for v in header.get_all(field, [])]
        if not any(regex.search(v) for v in values):
            return refuse(550, "5.7.1", "require_header", f"Header field {field} not as required")
    for field, regex in policy.forbid_header:
        values = [one_line(str(v)) for v in header.get_all(field, [])]
        if any(regex.search(v) for v in values):
            return refuse(550, "5.7.1", "forbid_header", f"Header field {field} not allowed")
    if policy.client_networks:
        try:
            ip = ipaddress.ip_address(client)
        except ValueError:
            ip = None
        if ip is None or not any(ip in net for net in policy.client_networks):
            return refuse(550, "5.7.1", "client_networks", "Client host not allowed to write here")
    if policy.content_types:
        ctype = header.get_content_type().lower()
        if not any(
            ctype == t or (t.endswith("/*") and ctype.startswith(t[:-1]))
            for t in policy.content_types
        ):
            return refuse(550, "5.6.0", "content_types", f"Content type {ctype} not allowed")
    if policy.require_message_id and not one_line(str(header.get("Message-ID", ""))):
        return refuse(550, "5.6.0", "require_message_id", "Message-ID missing")
    if policy.require_subject and not one_line(str(header.get("Subject", ""))):
        return refuse(550, "5.6.0", "require_subject", "Subject empty")
    if policy.require_body and body_size == 0:
        return refuse(550, "5.6.0", "require_body", "Body empty")
    if policy.needs_text:
        words = {w.lower() for w in _WORD_CHARS.findall(text)}
        if policy.required_words and not any(w in words for w in policy.required_words):
            return refuse(550, "5.7.1", "required_words", "Text lacks a required word")
        bad = [w for w in policy.forbidden_words if w in words]
        if bad:
            return refuse(550, "5.7.1", "forbidden_words", "Text has a forbidden word")
        if policy.max_exclamations is not None and text.count("!") > policy.max_exclamations:
            return refuse(550, "5.7.1", "max_exclamations", "Too many exclamation marks")
    return None
