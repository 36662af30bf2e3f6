# -*- test-case-name: tests.test_routes -*-
"""
The route table: addresses of the site's domains that are not (only)
GroupServer groups, read from the file named by the C{routes} option and
looked up at RCPT time before GroupServer. Pure code: parsing, matching,
templates and policy decisions; the actions run in
L{gsmail.inbound.routing}. The format is described in C{docs/routes.md}.

One INI section per address form; the first section that matches wins, in
file order; no match: GroupServer is asked, as without a table::

    [defaults]                       # policy and rewriting for every route below
    max_size = 20M

    [support@groups.example.com]     # an exact address
    forward = alice@example.net, bob@example.org

    [postmaster@*]                   # a local part at any of the site's domains
    forward = admin@example.net

    [~(.+)-archive@groups\\.example\\.com]   # a regular expression, ${1} its group
    archive = /var/mail/archive/${1}

Two sections are built in, after the file's own: C{postmaster@*} and
C{abuse@*}, each with the C{postmaster} action (RFC 5321 §4.5.1 requires
postmaster; RFC 2142 §2 names abuse), so a site gets them without writing
anything and overrides them by writing its own.

The seeds: emailtunnel's C{translate_recipient} (forward, an empty list to
drop, refusal) and its subject rewriting; DeleGate SMTPGATE's per-recipient
configuration (C{RECIPIENT}, C{ARCHIVE}, C{OUTPUT/...}, C{ACCEPT/...},
C{CONTROL/BCC}, C{CONTROL/Errors-To}, the C{isn}, C{rni}, C{res}, C{reb}
options and the C{${...}} substitutions).
"""

from __future__ import annotations

import configparser
import datetime
import email.utils
import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from email.message import Message
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import attrs

from gsmail.addresses import Address, AddressError, parse_mailbox
from gsmail.status import Reply

__all__ = [
    "ACTIONS",
    "DEFAULT_ENTRIES",
    "NntpTarget",
    "Policy",
    "Refusal",
    "RouteEntry",
    "RouteMatch",
    "RouteTable",
    "RouteTableError",
    "Rewrite",
    "Substitutions",
    "address_pattern",
    "check_policy",
    "expand",
    "load_routes",
    "parse_routes",
]

#: The keys that make a route do something, in the order they run.
ACTIONS: Final = ("reject", "group", "archive", "forward", "nntp", "handler", "postmaster")
#: Policy keys (checked at the end of DATA, before any action).
POLICY_KEYS: Final = (
    "max_size",
    "min_body_size",
    "accept_sender",
    "reject_sender",
    "accept_from",
    "reject_from",
    "accept_to",
    "reject_to",
    "require_header",
    "forbid_header",
    "client_networks",
    "required_words",
    "forbidden_words",
    "content_types",
    "require_message_id",
    "require_subject",
    "require_body",
    "max_exclamations",
)
#: Rewriting keys (applied after the policy, before the actions).
REWRITE_KEYS: Final = (
    "subject_prefix",
    "add_header",
    "set_header",
    "remove_header",
    "sequence_header",
)
#: Other keys of a route.
OTHER_KEYS: Final = ("bcc", "errors_to", "nntp_user", "nntp_password")
_ROUTE_KEYS: Final = frozenset(ACTIONS + POLICY_KEYS + REWRITE_KEYS + OTHER_KEYS)
_DEFAULT_KEYS: Final = frozenset(POLICY_KEYS + REWRITE_KEYS + ("errors_to",))

_VARIABLE: Final = re.compile(r"\$\{([^{}]*)\}")
_SEQNO: Final = re.compile(r"seqno(?:/([1-9][0-9]{0,8}))?\Z")
_HEADER_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")
_REPLY: Final = re.compile(r"([45][0-9][0-9])\s+([45]\.[0-9]{1,3}\.[0-9]{1,3})\s+(\S.*)\Z")
_SIZE: Final = re.compile(r"([0-9]+)\s*([kKmMgG]?)\Z")
_LIST: Final = re.compile(r"[\s,]+")
_WORD_CHARS: Final = re.compile(r"\w+", re.UNICODE)
_PLAIN_VARIABLES: Final = frozenset(
    {"sender", "recipient", "local", "domain", "group", "route", "subject", "from", "message_id"}
)
#: Header fields gsmail itself sets or that must stay one: never rewritten.
_PROTECTED: Final = frozenset({"received", "return-path", "x-original-to"})


class RouteTableError(ValueError):
    """
    The route file cannot be used. C{str()} is one line naming the file, the
    section and the key. At start-up gsmail refuses to start (exit 78); on
    SIGHUP the table in use is kept and the error logged.
    """


@attrs.frozen
class NntpTarget:
    """
    Where an C{nntp} route posts: C{news://host[:port]/newsgroup}.

    @ivar port: TCP port, 119 by default (RFC 3977 §3.1).
    @ivar user: for C{AUTHINFO USER} (RFC 4643 §2.3), or C{""}.
    """

    host: str
    port: int
    newsgroup: str
    user: str = ""
    password: str = attrs.field(default="", repr=False)


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


@attrs.frozen
class Rewrite:
    """
    Changes made to the message before the actions (DeleGate's C{OUTPUT/...},
    emailtunnel's C{translate_subject}). Values are templates (L{expand}).

    @ivar subject_prefix: put before the subject unless it is there already.
    @ivar add_header: C{(field, template)} added.
    @ivar set_header: C{(field, template)} replacing every field of that name.
    @ivar remove_header: field names removed.
    @ivar sequence_header: a field set to the route's sequence number, or C{""}.
    """

    subject_prefix: str = ""
    add_header: tuple[tuple[str, str], ...] = ()
    set_header: tuple[tuple[str, str], ...] = ()
    remove_header: tuple[str, ...] = ()
    sequence_header: str = ""

    @property
    def empty(self) -> bool:
        """Whether it changes nothing."""
        return not (
            self.subject_prefix
            or self.add_header
            or self.set_header
            or self.remove_header
            or self.sequence_header
        )


@attrs.frozen
class RouteEntry:
    """
    One section of the route file: an address form and what to do with mail
    to a matching address.

    @ivar name: the section's name, as written (logs, reply texts, the
        sequence number's file).
    @ivar reject: refuse at RCPT time with this reply.
    @ivar group: post to this group id (a template), without a lookup.
    @ivar archive: a Maildir path template (L{expand}; C{${seqno}}, dates).
    @ivar forward: C{None}: no forward action; else addresses (templates)
        the message is queued for with an SRS sender; C{()}: accept and drop.
    @ivar nntp: post the message as an article.
    @ivar handler: C{package.module:callable}, or C{""}.
    @ivar postmaster: keep the message as the site's postmaster mail.
    @ivar bcc: addresses sent a copy once every action succeeded.
    @ivar errors_to: addresses sent a copy of a refused or failed message.
    @ivar builtin: one of L{DEFAULT_ENTRIES}.
    """

    name: str
    pattern: re.Pattern[str] = attrs.field(repr=False)
    reject: Reply | None = None
    group: str = ""
    archive: str = ""
    forward: tuple[str, ...] | None = None
    nntp: NntpTarget | None = None
    handler: str = ""
    postmaster: bool = False
    bcc: tuple[str, ...] = ()
    errors_to: tuple[str, ...] = ()
    policy: Policy = Policy()
    rewrite: Rewrite = Rewrite()
    builtin: bool = False
    #: A bounce to an SRS address, going back where it came from: the
    #: sender is kept (L{gsmail.inbound.routing.SrsCodec}).
    srs_bounce: bool = False

    @property
    def drops(self) -> bool:
        """C{forward =} with no address and no other action: accept and drop."""
        return self.forward == () and not (
            self.group or self.archive or self.nntp or self.handler or self.postmaster
        )

    @property
    def uses_queue(self) -> bool:
        """Whether the route needs the outbound queue (forward, bcc, errors_to)."""
        return bool(self.forward or self.bcc or self.errors_to)

    def templates(self) -> Iterable[str]:
        """Every template of the entry, for checks."""
        yield self.group
        yield self.archive
        yield from self.forward or ()
        yield from self.bcc
        yield from self.errors_to
        yield self.rewrite.subject_prefix
        for _, value in self.rewrite.add_header + self.rewrite.set_header:
            yield value

    @property
    def uses_seqno(self) -> bool:
        """Whether a message needs a sequence number (DeleGate's C{isn})."""
        return bool(self.rewrite.sequence_header) or any(
            _SEQNO.match(name) for t in self.templates() for name in _VARIABLE.findall(t)
        )

    def match(self, recipient: Address) -> RouteMatch | None:
        """
        The match of C{recipient} (bare C{postmaster} reads as
        C{postmaster@}, which C{postmaster@*} matches), or C{None}.
        """
        m = self.pattern.fullmatch(f"{recipient.local}@{recipient.domain}")
        if m is None:
            return None
        groups: dict[str, str] = {}
        for index, value in enumerate(m.groups(), start=1):
            groups[str(index)] = value or ""
        for name, value in m.groupdict().items():
            groups[name] = value or ""
        return RouteMatch(self, recipient, groups)


@attrs.frozen
class RouteMatch:
    """
    An entry that matched a recipient, and what the pattern captured
    (C{${1}}, C{${2}}, ... and named groups).
    """

    entry: RouteEntry
    recipient: Address
    groups: Mapping[str, str] = attrs.field(factory=dict)

    def variables(self, sender: str = "") -> dict[str, str]:
        """The substitutions known at RCPT time (L{expand})."""
        values = dict(self.groups)
        values.update(
            sender=sender,
            recipient=str(self.recipient),
            local=self.recipient.local,
            domain=self.recipient.domain,
            route=self.entry.name,
        )
        return values

    @property
    def group_id(self) -> str:
        """The group id of a C{group} action, expanded; C{""} when there is none."""
        if not self.entry.group:
            return ""
        return expand(self.entry.group, Substitutions(self.variables())).strip()


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


@attrs.frozen
class RouteTable:
    """
    The entries, in the order they are tried (the file's, then the built-in
    ones the file did not override).

    @ivar path: the file read, or C{""} (built-in entries only).
    """

    entries: tuple[RouteEntry, ...] = ()
    path: str = ""

    def lookup(self, recipient: Address) -> RouteMatch | None:
        """The first entry matching C{recipient}, or C{None}."""
        for entry in self.entries:
            found = entry.match(recipient)
            if found is not None:
                return found
        return None

    @property
    def uses_queue(self) -> bool:
        """Whether an entry needs the outbound queue."""
        return any(e.uses_queue for e in self.entries)

    def check_forward_loops(self, domains: tuple[str, ...]) -> None:
        """
        Refuse a forward (or bcc) that sends mail back to its own route: an
        address of the site's domains that the same entry matches.

        @raise RouteTableError: naming the entry and the address.
        """
        for entry in self.entries:
            for template in (entry.forward or ()) + entry.bcc:
                if "${" in template:
                    continue
                try:
                    target = parse_mailbox(template)
                except AddressError:
                    continue
                found = self.lookup(target) if target.domain in domains else None
                if found is not None and found.entry is entry:
                    raise RouteTableError(
                        f"{self.path}: [{entry.name}] forward: {template} routes back to"
                        " this route (a loop)"
                    )


def address_pattern(form: str) -> re.Pattern[str]:
    """
    The regex of an address form: C{*} matches within one side of the C{@}
    (a captured group each), C{?} one character; C{local@*} also matches
    bare C{local} (C{postmaster}, RFC 5321 §4.1.1.3).
    """
    local, _, domain = form.rpartition("@")
    parts = []
    for side in (local, domain):
        out = []
        for c in side:
            if c == "*":
                out.append("([^@]*)")
            elif c == "?":
                out.append("([^@])")
            else:
                out.append(re.escape(c))
        parts.append("".join(out))
    return re.compile(f"{parts[0]}@{parts[1]}", re.IGNORECASE)


def _builtin(local: str) -> RouteEntry:
    return RouteEntry(
        name=f"{local}@*",
        pattern=address_pattern(f"{local}@*"),
        postmaster=True,
        builtin=True,
    )


#: The entries a site gets without a route file: postmaster (RFC 5321
#: §4.5.1) and abuse (RFC 2142 §2) at every domain, kept as postmaster mail.
DEFAULT_ENTRIES: Final = (_builtin("postmaster"), _builtin("abuse"))


def parse_routes(
    text: str,
    path: str = "<routes>",
    *,
    domains: tuple[str, ...] = (),
    builtin: bool = True,
) -> RouteTable:
    """
    Read a route file's text.

    @param path: the file's name, for error messages.
    @param domains: the site's domains: an exact address elsewhere is an
        error (it could never match: gsmail refuses other domains first).
    @param builtin: add L{DEFAULT_ENTRIES} the file does not override.
    @raise RouteTableError: a syntax error, an unknown key, a bad value, a
        route without an action, C{reject} with another action, an unknown
        substitution, a forward loop.
    """
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";", " #"),
        default_section="\x00",
        strict=True,
    )
    parser.optionxform = str.lower  # type: ignore[assignment, method-assign]
    try:
        parser.read_string(text, source=path)
    except configparser.Error as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RouteTableError(f"{path}: {first}") from None
    reader = _EntryReader(path)
    defaults: dict[str, str] = {}
    entries: list[RouteEntry] = []
    for section in parser.sections():
        values = {k: v.strip() for k, v in parser.items(section)}
        if section.strip().lower() == "defaults":
            for key in values:
                if key not in _DEFAULT_KEYS:
                    raise RouteTableError(
                        f"{path}: [{section}] {key}: not allowed in [defaults] (policy,"
                        " rewriting and errors_to only)"
                    )
            defaults = values
            continue
        entries.append(reader.entry(section, {**defaults, **values}, domains))
    if builtin:
        for entry in DEFAULT_ENTRIES:
            probe = Address(entry.name.partition("@")[0], domains[0] if domains else "")
            if not any(e.match(probe) for e in entries):
                entries.append(entry)
    table = RouteTable(tuple(entries), path)
    table.check_forward_loops(domains)
    return table


def load_routes(path: str, domains: tuple[str, ...]) -> RouteTable:
    """
    Read the route file C{path} (blocking: at start-up, or in a thread on
    SIGHUP); C{""}: the built-in entries only.

    @raise RouteTableError: it cannot be read or used (L{parse_routes}).
    """
    if not path:
        return RouteTable(DEFAULT_ENTRIES)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 20)
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise RouteTableError(f"{path}: cannot read: {why or e}") from None
    return parse_routes(text, path, domains=domains)


@attrs.define
class _EntryReader:
    path: str

    def error(self, section: str, key: str, problem: str) -> RouteTableError:
        return RouteTableError(f"{self.path}: [{section}] {key}: {problem}")

    def entry(self, section: str, values: dict[str, str], domains: tuple[str, ...]) -> RouteEntry:
        for key in values:
            if key not in _ROUTE_KEYS:
                raise self.error(section, key, "unknown key")
        pattern, groups = self.pattern(section, domains)
        actions = [a for a in ACTIONS if a in values]
        if not actions:
            raise self.error(section, "", f"no action (one of {', '.join(ACTIONS)})")
        if "reject" in values and len(actions) > 1:
            raise self.error(section, "reject", "cannot be combined with another action")
        entry = RouteEntry(
            name=section,
            pattern=pattern,
            reject=self.reply(section, values["reject"]) if "reject" in values else None,
            group=values.get("group", ""),
            archive=values.get("archive", ""),
            forward=self.addresses(section, "forward", values["forward"])
            if "forward" in values
            else None,
            nntp=self.nntp(section, values) if "nntp" in values else None,
            handler=self.handler(section, values["handler"]) if "handler" in values else "",
            postmaster=self.boolean(section, "postmaster", values.get("postmaster", "no")),
            bcc=self.addresses(section, "bcc", values.get("bcc", "")),
            errors_to=self.addresses(section, "errors_to", values.get("errors_to", "")),
            policy=self.policy(section, values),
            rewrite=self.rewrite(section, values),
        )
        if "group" in values and not entry.group:
            raise self.error(section, "group", "empty (the group's id)")
        if "archive" in values and not entry.archive:
            raise self.error(section, "archive", "empty (a Maildir path)")
        if "postmaster" in values and not entry.postmaster and len(actions) == 1:
            raise self.error(section, "postmaster", "'no' and no other action")
        for template in entry.templates():
            unknown = check_template(template, groups)
            if unknown is not None:
                raise self.error(section, "", f"unknown substitution ${{{unknown}}}")
        return entry

    def pattern(self, section: str, domains: tuple[str, ...]) -> tuple[re.Pattern[str], set[str]]:
        form = section.strip()
        if form.startswith("~"):
            try:
                regex = re.compile(form[1:], re.IGNORECASE)
            except re.error as e:
                raise self.error(section, "", f"not a regular expression: {e}") from None
            return regex, {str(i) for i in range(1, regex.groups + 1)} | set(regex.groupindex)
        local, at, domain = form.rpartition("@")
        if not at or not local or not domain:
            raise self.error(
                section, "", "expected local@domain, local@*, a glob, or ~regex as the section name"
            )
        if "*" not in form and "?" not in form:
            try:
                address = parse_mailbox(form)
            except AddressError as e:
                raise self.error(section, "", f"not an address: {e}") from None
            if domains and address.domain not in domains:
                raise self.error(section, "", f"{address.domain} is not one of the site's domains")
        regex = address_pattern(form)
        return regex, {str(i) for i in range(1, regex.groups + 1)}

    def reply(self, section: str, text: str) -> Reply:
        m = _REPLY.match(text)
        if m is None or m.group(1)[0] != m.group(2)[0]:
            raise self.error(
                section,
                "reject",
                f"expected 'CODE X.Y.Z text' with a 4xx or 5xx code and a matching status,"
                f" got {text!r}",
            )
        return Reply(int(m.group(1)), m.group(2), one_line(m.group(3)))

    def addresses(self, section: str, key: str, text: str) -> tuple[str, ...]:
        found = []
        for word in _LIST.split(text):
            if not word:
                continue
            if "${" not in word:
                try:
                    parse_mailbox(word)
                except AddressError as e:
                    raise self.error(section, key, f"not an address: {word!r} ({e})") from None
            found.append(word)
        return tuple(dict.fromkeys(found))

    def boolean(self, section: str, key: str, text: str) -> bool:
        word = text.strip().lower()
        if word in ("yes", "true", "on", "1"):
            return True
        if word in ("no", "false", "off", "0", ""):
            return False
        raise self.error(section, key, f"expected yes or no, got {text!r}")

    def size(self, section: str, key: str, text: str) -> int:
        m = _SIZE.match(text.strip())
        if m is None:
            raise self.error(
                section, key, f"expected bytes, or a number with K, M or G; got {text!r}"
            )
        unit = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
        return int(m.group(1)) * unit

    def words(self, text: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(w for w in _LIST.split(text) if w))

    def nntp(self, section: str, values: dict[str, str]) -> NntpTarget:
        text = values["nntp"]
        parts = urlsplit(text)
        group = unquote(parts.path.lstrip("/"))
        try:
            port = parts.port or 119
        except ValueError:
            port = 0
        if (
            parts.scheme.lower() not in ("news", "nntp")
            or not parts.hostname
            or not group
            or not port
        ):
            raise self.error(
                section, "nntp", f"expected news://host[:port]/newsgroup, got {text!r}"
            )
        if "@" in parts.netloc:
            raise self.error(
                section, "nntp", "put the user and password in nntp_user, nntp_password"
            )
        if any(c.isspace() or c == "," for c in group):
            raise self.error(section, "nntp", f"one newsgroup, got {group!r}")
        return NntpTarget(
            parts.hostname,
            port,
            group,
            values.get("nntp_user", ""),
            values.get("nntp_password", ""),
        )

    def handler(self, section: str, text: str) -> str:
        module, colon, name = text.partition(":")
        ident = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
        if (
            not colon
            or not all(ident.match(p) for p in module.split("."))
            or not all(ident.match(p) for p in name.split("."))
        ):
            raise self.error(section, "handler", f"expected package.module:callable, got {text!r}")
        return text

    def header_rules(
        self, section: str, key: str, text: str
    ) -> tuple[tuple[str, re.Pattern[str]], ...]:
        rules = []
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            field, colon, regex = line.partition(":")
            field = field.strip()
            if not colon or not _HEADER_NAME.match(field):
                raise self.error(section, key, f"expected 'Field: regex', got {line!r}")
            try:
                rules.append((field, re.compile(regex.strip(), re.IGNORECASE)))
            except re.error as e:
                raise self.error(section, key, f"not a regular expression: {e}") from None
        return tuple(rules)

    def header_values(self, section: str, key: str, text: str) -> tuple[tuple[str, str], ...]:
        fields = []
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            field, colon, value = line.partition(":")
            field = field.strip()
            if not colon or not _HEADER_NAME.match(field):
                raise self.error(section, key, f"expected 'Field: value', got {line!r}")
            if field.lower() in _PROTECTED:
                raise self.error(section, key, f"{field} cannot be rewritten")
            fields.append((field, value.strip()))
        return tuple(fields)

    def policy(self, section: str, values: dict[str, str]) -> Policy:
        kw: dict[str, Any] = {}
        for key in ("max_size", "min_body_size"):
            if key in values:
                kw[key] = self.size(section, key, values[key])
        if "max_exclamations" in values:
            try:
                kw["max_exclamations"] = int(values["max_exclamations"])
            except ValueError:
                raise self.error(section, "max_exclamations", "expected a whole number") from None
        for key in (
            "accept_sender",
            "reject_sender",
            "accept_from",
            "reject_from",
            "accept_to",
            "reject_to",
            "content_types",
        ):
            if key in values:
                kw[key] = tuple(w.lower() for w in self.words(values[key]))
        for key in ("required_words", "forbidden_words"):
            if key in values:
                kw[key] = tuple(w.lower() for w in self.words(values[key]))
        for key in ("require_header", "forbid_header"):
            if key in values:
                kw[key] = self.header_rules(section, key, values[key])
        if "client_networks" in values:
            nets = []
            for word in self.words(values["client_networks"]):
                try:
                    nets.append(ipaddress.ip_network(word, strict=False))
                except ValueError:
                    raise self.error(
                        section, "client_networks", f"not a network: {word!r}"
                    ) from None
            kw["client_networks"] = tuple(nets)
        for key in ("require_message_id", "require_subject", "require_body"):
            if key in values:
                kw[key] = self.boolean(section, key, values[key])
        return Policy(**kw)

    def rewrite(self, section: str, values: dict[str, str]) -> Rewrite:
        kw: dict[str, Any] = {}
        if "subject_prefix" in values:
            # Quotes keep a trailing space: subject_prefix = "[dev] ".
            prefix = values["subject_prefix"]
            if len(prefix) >= 2 and prefix[0] == prefix[-1] == '"':
                prefix = prefix[1:-1]
            if "\n" in prefix:
                raise self.error(section, "subject_prefix", "must be on one line")
            kw["subject_prefix"] = prefix
        for key in ("add_header", "set_header"):
            if key in values:
                kw[key] = self.header_values(section, key, values[key])
        if "remove_header" in values:
            names = self.words(values["remove_header"])
            for name in names:
                if not _HEADER_NAME.match(name) or name.lower() in _PROTECTED:
                    raise self.error(section, "remove_header", f"cannot remove {name!r}")
            kw["remove_header"] = names
        if "sequence_header" in values:
            name = values["sequence_header"]
            if not _HEADER_NAME.match(name) or name.lower() in _PROTECTED:
                raise self.error(section, "sequence_header", f"not a field name: {name!r}")
            kw["sequence_header"] = name
        return Rewrite(**kw)
