# -*- test-case-name: tests.test_standin -*-
"""
A stand-in for GroupServer: the four pages a mail server calls, served by
C{twisted.web}, answering as GroupServer's pages answer and storing what
they receive on disk.

GroupServer itself (Zope 2, Python 2) cannot run here, so gsmail's tests, its
demo (C{url = embedded}) and its benchmarks talk to this. What it answers was
read from GroupServer's sources (C{shared/groupserver-protocol.md}, "What a
page answers"); the modules cited are C{groupserver/*} repositories, with
C{zopefoundation/zope.formlib} 4.0 (C{src/zope/formlib/form.py}, C{widget.py},
C{textwidgets.py}) and Zope 2.13's C{ZPublisher/HTTPResponse.py}:

  - Each page is a C{zope.formlib} form (C{gs.content.form.base}
    C{form.py}). Its action runs only when the action's button field
    (C{form.actions.NAME}) is in the request's form (query string,
    C{multipart/form-data} or URL-encoded body, as Zope merges them);
    otherwise the page is its form again, with no status message (not run:
    L{gsmail.answers.PageResult.NOT_RUN}), showing the submitted values.
  - Validation is formlib's (C{zope.formlib} C{form.getWidgetsData}): only
    the fields that are present are checked. An empty field is "Required
    input is missing."; a non-ASCII value in an C{ASCIILine} "Invalid
    textual data"; a newline in one "Constraint not satisfied"; a token that
    is not the site's C{gs.auth.token}'s C{AuthenticationTokenMismatch}
    (C{authtoken.py}), whose message quotes the submitted token. A failure
    renders the form with the status C{<p>There is an error:</p>} (or
    C{There are errors:}) in an C{alert-block alert-error} status message
    listing the failed widgets, status 200, and nothing is done.
  - A field that is absent is not checked at all: the action then fails
    with C{KeyError} (Zope answers its error page with status 503 for a
    C{KeyError}: C{HTTPResponse.exception} sets the status by the exception
    class, C{status_codes["keyerror"] = 503}), or, for the token, runs: a
    request without C{form.token} is not refused.
  - Success: the add-email, relay and bounce pages render their form again
    (reset, empty) under the status C{Done}; the bounce page's status is
    C{No user found for ADDRESS} when no member has the address
    (C{gs.group.member.bounce} C{handlebounce.py}); the group-exists page's
    body is the JSON object C{groupexists.py} returns (C{text/plain}: Zope
    names no other type for it).
  - The add-email page decodes the message as Python 2's non-strict
    C{base64.b64decode} and, when that fails, adds the field's text as it
    is (C{addemail.py}). An unknown group id fails C{Adder.list}'s
    assertion: error page, 500. A message whose post id (L{gsmail.standin.postid})
    is already archived in the group is not stored again and still answered
    C{Done} (C{Products.XWFMailingListManager} C{processMail}). Two adds of
    one post id that overlap (see L{Faults.delay}): the one that commits
    second fails on the database's unique post id (C{gs.group.list.store}
    C{queries.py} C{DuplicateMessageError}): error page, 500; its retry is
    then "already archived".
  - The bounce page with a group address that is no group's fails
    (C{handlebounce.py} C{site_from_email}): error page, 500.

Not modelled: the relay page's checks of the message's C{To} (it is
stored as sent), moderation, email commands and posting rights (every
message is archived), and GroupServer's concurrent-topic collision.

Layout under the stand-in's directory::

    groups/GROUPID/{tmp,new,cur}/   one Maildir per group (add-email page)
    relays/{tmp,new,cur}/           relayed messages (relay page)
    bounces.jsonl                   one JSON object per recorded bounce
    tmp/                            staging for a message whose group is not
                                    known yet when its form part arrives

Bodies stream: twisted.web spools a request body over 100 KB to a temporary
file, and the stand-in parses that file with the C{multipart} package's push
parser, decoding base64 incrementally into the Maildir, in a thread when a
reactor for threads is given. A 200 MiB post never sits in memory (a form
page showing it again streams it back from the file). Stand-in limits: a
field other than the message over L{gsmail.standin.form.FIELD_LIMIT} bytes,
or the message field given twice, is answered 400; a URL-encoded body is
read whole.

L{Faults} makes the pages slow, fail, answer another page, or drop the
connection at a chosen moment.

This module holds L{StandIn} (its set-up and what tests inspect) and
L{make_demo_standin}. The parts: L{gsmail.standin.faults} (L{Faults}),
L{gsmail.standin.form} (the form parser), L{gsmail.standin.http} (the
resource and the processing of a request), L{gsmail.standin.actions} (what
each page does), L{gsmail.standin.pages} (the pages' HTML) and
L{gsmail.standin.postid} (GroupServer's post id).
"""

from __future__ import annotations

import collections
import itertools
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Final
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IReactorThreads,
    IReactorTime,
)
from twisted.web import server
from twisted.web.resource import IResource

from gsmail.standin import pages
from gsmail.standin.actions import PostRecord, _Answer
from gsmail.standin.faults import PAGE_PATHS, Faults
from gsmail.standin.http import _Pages, _PageServer, _Request

__all__ = ["Faults", "PostRecord", "StandIn", "make_demo_standin", "PAGE_PATHS"]

_SAFE_GROUP_ID: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")


def _make_maildir(path: str) -> None:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)


class StandIn(_PageServer):
    """
    GroupServer's four mail pages, for tests, the demo and benchmarks.

    @ivar faults: the L{Faults} applied to the following requests.
    @ivar requests: requests seen per page (C{"exists"}, C{"add"},
        C{"relay"}, C{"bounce"}), counting every method and outcome.
    @ivar archive_once: C{True} (GroupServer's behaviour): a post whose post
        id is already archived in its group is not stored again. C{False}:
        every add that runs is stored, for loads that send identical
        messages (Postfix's C{smtp-source} varies neither subject nor body).
    """

    def __init__(
        self,
        directory: str,
        token: str,
        groups: Mapping[str, str],
        *,
        site_id: str = "example",
        site_url: str = "http://groups.example.com",
        site_name: str = "Example Groups",
        members: Iterable[str] | None = None,
        archive_once: bool = True,
        clock: IReactorTime,
        reactor: IReactorThreads | None = None,
    ) -> None:
        """
        @param directory: where messages and bounces are stored; created if
            missing.
        @param token: the value C{form.token} must have (C{gs_auth_token_create}).
        @param groups: list address -> group id; addresses match without
            regard to case.
        @param site_id: the C{siteId} group-exists reports for a known group
            (and part of every topic id).
        @param site_url: the C{siteURL} group-exists reports for a known group.
        @param site_name: the site's name in its pages.
        @param members: the addresses the bounce page knows (see
            L{add_member}); C{None}: every address is a member's.
        @param archive_once: see L{archive_once}.
        @param clock: schedules L{Faults.delay}, names Maildir files.
        @param reactor: runs body parsing in its thread pool; C{None} parses
            in the reactor thread (for C{StubTreq} tests, where no thread may
            run).
        @raise ValueError: a group id that cannot be a directory name.
        """
        self._directory = os.path.abspath(directory)
        self._token = token
        self._site_id = site_id
        self._site_url = site_url
        self._site = pages.SiteInfo(
            site_name, f"support@{urlsplit(site_url).hostname or 'example.com'}"
        )
        self._clock = clock
        self._threads = reactor
        self._groups: dict[str, str] = {}
        self._group_ids: set[str] = set()
        self._titles: dict[str, str] = {}
        self._members: set[str] | None = None
        self._posts: list[PostRecord] = []
        self._archived: dict[str, set[str]] = collections.defaultdict(set)
        self._add_requests: collections.Counter[str] = collections.Counter()
        self._relays: list[str] = []
        self._bounces: list[tuple[str, str]] = []
        self._names = itertools.count()
        self._busy = 0
        self._idle_waiters: list[Deferred[None]] = []
        self._done_pages: dict[tuple[str, pages.PageURL], _Answer] = {}
        self.faults = Faults()
        self.requests: collections.Counter[str] = collections.Counter()
        self.archive_once = archive_once
        os.makedirs(os.path.join(self._directory, "tmp"), exist_ok=True)
        _make_maildir(os.path.join(self._directory, "relays"))
        for address, group_id in groups.items():
            self.add_group(address, group_id)
        if members is not None:
            for address in members:
                self.add_member(address)
        self._resource = _Pages(self)

    def __repr__(self) -> str:
        # Never the token.
        return f"<StandIn {self._directory!r} {len(self._groups)} groups>"

    # -- configuration and inspection --------------------------------------

    def add_group(self, address: str, group_id: str, title: str | None = None) -> None:
        """
        Make C{address} a group's list address and create its Maildir.

        @param title: the group's list title (stripped from subjects for the
            post id); the group id when not given.
        @raise ValueError: C{group_id} is empty or holds characters other than
            letters, digits, C{_}, C{.} and C{-} (it names a directory).
        """
        if not _SAFE_GROUP_ID.match(group_id):
            raise ValueError(f"unusable group id {group_id!r}")
        self._groups[address.strip().lower()] = group_id
        self._group_ids.add(group_id)
        self._titles[group_id] = title if title is not None else group_id
        _make_maildir(self._maildir(group_id))

    def add_member(self, address: str) -> None:
        """
        Make C{address} a member's address, for the bounce page. Until the
        first call every address is taken to be a member's; after it, a
        bounce for any other address is answered C{No user found for ...}
        and not recorded.
        """
        if self._members is None:
            self._members = set()
        self._members.add(address.strip().lower())

    def resource(self) -> IResource:
        """The root resource serving the four pages (for C{StubTreq} or a Site)."""
        return self._resource

    def request_factory(self) -> Callable[..., server.Request]:
        """
        The request factory for a L{server.Site} serving the stand-in's
        pages: bodies are not parsed into C{request.args}, and
        C{Faults.drop="before_body"} can reset a request before its body.
        """
        standin = self

        class Request(_Request):
            pass

        Request.standin = standin
        return Request

    def site(self) -> server.Site:
        """A L{server.Site} for the pages, with L{request_factory}'s requests."""
        return server.Site(  # type: ignore[no-untyped-call]
            self._resource, requestFactory=self.request_factory(), reactor=self._clock
        )

    def posts(self, group_id: str) -> list[bytes]:
        """The raw messages archived for C{group_id}, in arrival order."""
        return [_read(p.path) for p in self._posts if p.group_id == group_id]

    def post_records(self) -> list[PostRecord]:
        """Every post archived, for all groups, in arrival order."""
        return list(self._posts)

    def post_ids(self, group_id: str) -> list[str]:
        """The post ids archived for C{group_id}, in arrival order."""
        return [p.post_id for p in self._posts if p.group_id == group_id]

    def add_requests(self, group_id: str | None = None) -> int:
        """
        How many add-email requests reached the page's action for
        C{group_id} (for all groups when C{None}): they validated, whether
        the post was then archived, already archived, or failed.
        """
        if group_id is None:
            return sum(self._add_requests.values())
        return self._add_requests[group_id]

    def post_stored(self, record: PostRecord) -> None:
        """
        Called once a post is archived, after its record is added (to
        L{post_records}); does nothing. A hook for subclasses (the
        benchmarks' stand-in).
        """

    def forget_archive(self) -> None:
        """
        Forget which post ids are archived (not the posts): a message added
        again is archived again, as by a fresh GroupServer (benchmarks).
        """
        self._archived.clear()

    def relays(self) -> list[bytes]:
        """The raw messages the relay page stored, in arrival order."""
        return [_read(p) for p in self._relays]

    def bounces(self) -> list[tuple[str, str]]:
        """The bounces recorded, as C{(userEmail, groupEmail)}, in order."""
        return list(self._bounces)

    def when_idle(self) -> Deferred[None]:
        """A Deferred that fires once no request is being processed."""
        if self._busy == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def make_demo_standin(
    directory: str,
    token: str,
    domains: Iterable[str],
    group_ids: Iterable[str],
    clock: IReactorTime,
    reactor: IReactorThreads | None,
) -> StandIn:
    """
    A stand-in with a group C{GROUPID@DOMAIN} for every domain and group id,
    as the demo (C{url = embedded}) serves.

    @raise ValueError: an unusable group id (see L{StandIn.add_group}).
    """
    standin = StandIn(directory, token, {}, clock=clock, reactor=reactor)
    group_ids = list(group_ids)
    for domain in domains:
        for group_id in group_ids:
            standin.add_group(f"{group_id}@{domain}", group_id)
    return standin
