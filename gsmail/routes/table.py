# -*- test-case-name: tests.test_routes, tests.inbound.test_routing -*-
"""
The route table in memory: its entries (L{RouteEntry}, with their
L{NntpTarget} and L{Rewrite}), the match of a recipient (L{RouteMatch}),
the table and its lookup (L{RouteTable}), the address forms
(L{address_pattern}) and the built-in entries (L{DEFAULT_ENTRIES}). Pure.

Not the file parser (L{gsmail.routes}), the templates
(L{gsmail.routes.templates}) nor the policy (L{gsmail.routes.policy}); the
actions run in L{gsmail.inbound.routing}.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from gsmail.addresses import Address, AddressError, parse_mailbox
from gsmail.routes.policy import Policy
from gsmail.routes.templates import _SEQNO, _VARIABLE, Substitutions, expand
from gsmail.status import Reply

#: The keys that make a route do something, in the order they run.
ACTIONS: Final = ("reject", "group", "archive", "forward", "nntp", "handler", "postmaster")


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
