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

This module reads the route file (L{parse_routes}, L{load_routes}) and is
where the route table's names are imported from. The parts:
L{gsmail.routes.table} (the entries, matching, the table),
L{gsmail.routes.templates} (the C{${...}} substitutions) and
L{gsmail.routes.policy} (the policy checks).
"""

from __future__ import annotations

import configparser
import ipaddress
import re
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import attrs

from gsmail.addresses import Address, AddressError, parse_mailbox
from gsmail.routes.policy import Policy, Refusal, check_policy, glob_matches
from gsmail.routes.table import (
    ACTIONS,
    DEFAULT_ENTRIES,
    NntpTarget,
    Rewrite,
    RouteEntry,
    RouteMatch,
    RouteTable,
    RouteTableError,
    address_pattern,
)
from gsmail.routes.templates import (
    _HEADER_NAME,
    Substitutions,
    check_template,
    expand,
    one_line,
)
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
    "check_template",
    "expand",
    "glob_matches",
    "load_routes",
    "one_line",
    "parse_routes",
]

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

_REPLY: Final = re.compile(r"([45][0-9][0-9])\s+([45]\.[0-9]{1,3}\.[0-9]{1,3})\s+(\S.*)\Z")
_SIZE: Final = re.compile(r"([0-9]+)\s*([kKmMgG]?)\Z")
_LIST: Final = re.compile(r"[\s,]+")
#: Header fields gsmail itself sets or that must stay one: never rewritten.
_PROTECTED: Final = frozenset({"received", "return-path", "x-original-to"})


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
