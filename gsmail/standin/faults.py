# -*- test-case-name: tests.test_standin, tests.integration.test_faults, tests.integration.test_fault_matrix -*-
"""
The stand-in's faults (L{Faults}): misbehaviour tests ask of the GroupServer
stand-in (slow pages, error statuses, another page instead, a dropped
connection), and the names of the pages they apply to (L{PAGE_PATHS}).

Not how the faults are acted out: that is the stand-in's request processing
(L{gsmail.standin.http}, L{gsmail.standin.actions}).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import attrs

#: The last path segment of each page, by the page's short name.
PAGE_PATHS: Final[Mapping[str, str]] = {
    "exists": "gs-group-messages-add-group-exists.html",
    "add": "gs-group-messages-add-email.html",
    "relay": "gs-profile-email-relay.html",
    "bounce": "gs-group-member-bounce.html",
}

_DROPS: Final = (None, "before_body", "before_store", "after_store")
_INSTEAD: Final = (None, "login", "maintenance", "error")
_AFTER_STORE_STATUSES: Final = (None, 502, 504)


def _check_drop(instance: object, attribute: object, value: str | None) -> None:
    if value not in _DROPS:
        raise ValueError(f"drop must be one of {_DROPS!r}, not {value!r}")


def _check_instead(instance: object, attribute: object, value: str | None) -> None:
    if value not in _INSTEAD:
        raise ValueError(f"instead must be one of {_INSTEAD!r}, not {value!r}")


def _check_after_store(instance: object, attribute: object, value: int | None) -> None:
    if value not in _AFTER_STORE_STATUSES:
        raise ValueError(f"status_after_store must be 502, 504 or None, not {value!r}")


def _check_pages(instance: object, attribute: object, value: frozenset[str] | None) -> None:
    if value is not None and not value <= PAGE_PATHS.keys():
        raise ValueError(f"pages must be a subset of {sorted(PAGE_PATHS)!r}, not {value!r}")


@attrs.define
class Faults:
    """
    Misbehaviour the stand-in shows, for tests. Mutable: set the attributes,
    then L{reset} them. Applied to the requests of the pages in C{pages};
    a request is claimed (and counted against C{remaining}) when its body has
    arrived, or, for C{drop="before_body"}, when its headers have.

    @ivar delay: seconds to wait, on the stand-in's clock, before answering.
        For an add that runs, the wait is inside GroupServer's transaction:
        after the "already archived" check, before the post is stored, so two
        adds of one message that overlap collide as in GroupServer (the later
        one fails, 500). A post is still stored when the client has gone
        meanwhile, as Zope finishes a request whose client disconnected.
    @ivar status: answer this HTTP status instead of running the page (nothing
        stored): 500 with GroupServer's error page (a Zope error), 502, 503
        or 504 with a proxy's error page (another code: the proxy's page
        too).
    @ivar status_after_store: C{502} or C{504}: run the page (store the post),
        then answer this status with a proxy's error page: the proxy gave up
        while Zope went on.
    @ivar instead: answer another page, without running the action:
        C{"login"} (GroupServer's sign-in page, 200), C{"maintenance"} (a
        front end's maintenance page, 200), C{"error"} (GroupServer's error
        page, 500, as C{status=500}).
    @ivar html_instead_of_json: the group-exists page answers its form
        refusing the token, as for a wrong token (other pages are
        unaffected).
    @ivar drop: C{"before_body"}: reset the connection (TCP RST) as soon as
        the request's headers arrived, before its body is read;
        C{"before_store"}: abort the connection without a reply and store
        nothing; C{"after_store"}: run the page (store), then abort the
        connection without a reply (the client cannot know that the post was
        made).
    @ivar pages: the pages (C{"exists"}, C{"add"}, C{"relay"}, C{"bounce"})
        the faults apply to; C{None} for all.
    @ivar remaining: how many more requests the faults apply to before they
        clear themselves; C{None} for every request until L{reset}.
    """

    delay: float = 0.0
    status: int | None = None
    status_after_store: int | None = attrs.field(default=None, validator=_check_after_store)
    instead: str | None = attrs.field(default=None, validator=_check_instead)
    html_instead_of_json: bool = False
    drop: str | None = attrs.field(default=None, validator=_check_drop)
    pages: frozenset[str] | None = attrs.field(default=None, validator=_check_pages)
    remaining: int | None = None

    def reset(self) -> None:
        """Clear every fault: the stand-in behaves normally again."""
        default = Faults()
        for field in attrs.fields(Faults):
            setattr(self, field.name, getattr(default, field.name))

    def _effective_for(self, page: str) -> bool:
        if self.pages is not None and page not in self.pages:
            return False
        return (
            self.delay > 0
            or self.status is not None
            or self.status_after_store is not None
            or self.instead is not None
            or self.drop is not None
            or (self.html_instead_of_json and page == "exists")
        )

    def _claim(self, page: str, *, before_body: bool = False) -> Faults | None:
        """
        The faults that apply to one request of C{page}, counting it against
        C{remaining}; C{None} when none apply. With C{before_body}, only a
        C{drop="before_body"} fault is claimed (the request's headers just
        arrived).
        """
        if self.remaining is not None and self.remaining <= 0:
            self.reset()
        if not self._effective_for(page):
            return None
        if before_body and self.drop != "before_body":
            return None
        claimed = attrs.evolve(self)
        if self.remaining is not None:
            self.remaining -= 1
            if self.remaining == 0:
                self.reset()
        return claimed
