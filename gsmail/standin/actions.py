# -*- test-case-name: tests.test_standin -*-
"""
What the stand-in's pages do, as GroupServer's pages do it: formlib's
validation of a submitted form (L{_PageActions._validate}), the actions of
the four pages (group exists, add email, relay, bounce) with the archive of
posts by post id, the pages a fault answers instead, and the answers
(L{_Answer}) they make. See the behaviour described in L{gsmail.standin}.

Not HTTP (reading the request, writing the answer: L{gsmail.standin.http})
nor the HTML of the pages (L{gsmail.standin.pages}).
"""

from __future__ import annotations

import collections
import hmac
import json
import os
from collections.abc import Mapping
from typing import Final

import attrs
from twisted.internet.interfaces import (
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from gsmail.standin import pages
from gsmail.standin.faults import Faults
from gsmail.standin.form import _MESSAGE_FIELD, _Form
from gsmail.standin.postid import PostIdentity, compute_post_id

# The namespace of the module these lines came from, so that the stand-in's
# log lines stay as they were.
log = Logger(namespace="gsmail.standin")

_TOKEN_MISMATCH: Final = 'The authentication token "{}" does not match the one in the database.'
_REQUIRED: Final = "Required input is missing."
_NOT_ASCII: Final = "Invalid textual data"
_CONSTRAINT: Final = "Constraint not satisfied"
# The issue a 500 fault's error page names: a database that went away.
_FAULT_ISSUE: Final = (
    "OperationalError: (psycopg2.OperationalError) could not connect to server: Connection refused"
)


@attrs.frozen
class PostRecord:
    """
    A post the add-email page stored (archived).

    @ivar group_id: the group it was added to.
    @ivar time_source: the C{form.timeSource} the client sent, C{"server"}
        when it sent none. GroupServer's add-email page has no such field
        and ignores it; it is kept for gsmail's tests.
    @ivar path: the message's file in the group's Maildir C{new/}.
    @ivar size: the raw message's length in bytes (after base64 decoding).
    @ivar post_id: GroupServer's post id for it (L{gsmail.standin.postid}).
    @ivar topic_id: GroupServer's topic id for it.
    """

    group_id: str
    time_source: str
    path: str
    size: int
    post_id: str = ""
    topic_id: str = ""


@attrs.frozen
class _Answer:
    """
    A whole answer.

    @ivar page: the body: bytes, with L{pages.Echo}s to stream.
    """

    code: int
    content_type: bytes
    page: pages.Page
    zope: bool = True

    @classmethod
    def html(cls, page: pages.Page | bytes, code: int = 200, *, zope: bool = True) -> _Answer:
        body: pages.Page = [page] if isinstance(page, bytes) else page
        return cls(code, b"text/html; charset=utf-8", body, zope)


def _zope_status(exception: str) -> int:
    """
    The status Zope 2 gives an error page (C{HTTPResponse.setStatus} with
    the exception's class): 503 for C{KeyError} and C{NameError}, else 500.
    """
    return 503 if exception in ("KeyError", "NameError") else 500


@attrs.frozen
class _Action:
    """A submission that validated: the page's action runs with C{fields}."""

    fields: Mapping[str, str]


class _PageActions:
    """
    The pages' validation and actions: a base class of
    L{gsmail.standin.StandIn}, which sets the attributes below (see there).
    """

    _directory: str
    _token: str
    _site_id: str
    _site_url: str
    _site: pages.SiteInfo
    _clock: IReactorTime
    _threads: IReactorThreads | None
    _groups: dict[str, str]
    _group_ids: set[str]
    _titles: dict[str, str]
    _members: set[str] | None
    _posts: list[PostRecord]
    _archived: dict[str, set[str]]  # a defaultdict
    _add_requests: collections.Counter[str]
    _relays: list[str]
    _bounces: list[tuple[str, str]]
    _done_pages: dict[tuple[str, pages.PageURL], _Answer]
    archive_once: bool

    def post_stored(self, record: PostRecord) -> None:
        """A hook: see L{gsmail.standin.StandIn.post_stored}."""

    def _maildir(self, group_id: str) -> str:
        return os.path.join(self._directory, "groups", group_id)

    async def _wait(self, fault: Faults | None) -> None:
        if fault is not None and fault.delay > 0:
            await deferLater(self._clock, fault.delay)

    def _instead(self, fault: Faults | None, page: str, where: pages.PageURL) -> _Answer | None:
        """The answer a fault gives instead of running the page, if any."""
        if fault is None:
            return None
        if fault.status == 500 or fault.instead == "error":
            return self._error(where, _FAULT_ISSUE)
        if fault.status is not None:
            return _Answer.html(pages.proxy_error_page(fault.status), fault.status, zope=False)
        if fault.instead == "login":
            return _Answer.html(pages.login_page(self._site, where))
        if fault.instead == "maintenance":
            return _Answer.html(pages.maintenance_page(self._site), zope=False)
        if fault.html_instead_of_json and page == "exists":
            return self._refused(page, where, {"form.token": _TOKEN_MISMATCH.format("")}, {})
        return None

    def _error(self, where: pages.PageURL, issue: str) -> _Answer:
        """GroupServer's error page for an exception, with Zope's status for it."""
        return _Answer.html(
            pages.error_page(self._site, where, issue), _zope_status(issue.split(":", 1)[0])
        )

    def _refused(
        self,
        page: str,
        where: pages.PageURL,
        errors: Mapping[str, str],
        values: Mapping[str, str | pages.Echo],
    ) -> _Answer:
        status = "<p>There is an error:</p>" if len(errors) == 1 else "<p>There are errors:</p>"
        return _Answer.html(
            pages.form_page(page, self._site, where, status=status, errors=errors, values=values)
        )

    def _values(self, form: _Form) -> dict[str, str | pages.Echo]:
        """The submitted values a form page shows again."""
        values: dict[str, str | pages.Echo] = dict(form.fields)
        if form.message_path is not None:
            values[_MESSAGE_FIELD] = pages.Echo(form.message_path, form.message_size)
        return values

    def _validate(self, page: str, form: _Form, where: pages.PageURL) -> _Answer | _Action:
        """
        What zope.formlib makes of the submission: the form again (not run,
        or refused with the failed widgets) or the action to run.
        """
        spec = pages.FORMS[page]
        fields = form.fields
        if spec.action not in fields:
            return _Answer.html(pages.form_page(page, self._site, where, values=self._values(form)))
        errors: dict[str, str] = {}
        for widget in spec.widgets:
            if widget.area:
                if form.message_path is not None and form.message_raw_size == 0:
                    errors[widget.name] = _REQUIRED
                continue
            value = fields.get(widget.name)
            if value is None:
                continue  # formlib checks only the fields it was given
            if value == "":
                errors[widget.name] = _REQUIRED
            elif not value.isascii():
                errors[widget.name] = _NOT_ASCII
            elif widget.token:
                if not hmac.compare_digest(value.encode(), self._token.encode()):
                    errors[widget.name] = _TOKEN_MISMATCH.format(value)
            elif "\n" in value:
                errors[widget.name] = _CONSTRAINT
        if errors:
            return self._refused(page, where, errors, self._values(form))
        return _Action(fields)

    async def _act(
        self, page: str, form: _Form, action: _Action, where: pages.PageURL, fault: Faults | None
    ) -> _Answer:
        """Run the page's action; the fault's delay is spent inside it."""
        fields = action.fields
        if page == "exists":
            await self._wait(fault)
            if "form.email" not in fields:
                return self._error(where, "KeyError: 'email'")
            return self._group_exists(fields["form.email"])
        if page == "add":
            return await self._add(form, fields, where, fault)
        if page == "relay":
            await self._wait(fault)
            if form.message_path is None:
                return self._error(where, "KeyError: 'emailMessage'")
            self._relays.append(self._deliver(form, os.path.join(self._directory, "relays")))
            log.info("Stand-in relayed a message: {size} bytes", size=form.message_size)
            return self._done(page, where)
        await self._wait(fault)
        return self._bounce(fields, where)

    async def _add(
        self,
        form: _Form,
        fields: Mapping[str, str],
        where: pages.PageURL,
        fault: Faults | None,
    ) -> _Answer:
        """
        The add-email action (C{addemail.py}, C{Adder}, C{processMail}): the
        post id is checked, the fault's delay passes, the post is stored
        (committed) unless it was archived, or fails if another add of it
        committed meanwhile.
        """
        if form.message_path is None:
            await self._wait(fault)
            return self._error(where, "KeyError: 'emailMessage'")
        group_id = fields.get("form.groupId")
        if group_id is None:
            await self._wait(fault)
            return self._error(where, "KeyError: 'groupId'")
        self._add_requests[group_id] += 1
        if group_id not in self._group_ids:
            log.info("Stand-in: add-email for unknown group {group_id}", group_id=group_id)
            await self._wait(fault)
            return self._error(where, f'AssertionError: No such list "{group_id}"')
        identity = form.identity
        if identity is None:  # the group was added since the body was parsed
            identity = await self._post_id(form.message_path, group_id)
        archived = self._archived[group_id] if self.archive_once else set()
        if identity.post_id in archived:
            log.info(
                "Stand-in: post {post_id} for {group_id} has already been archived",
                post_id=identity.post_id,
                group_id=group_id,
            )
            await self._wait(fault)
            return self._done("add", where)
        await self._wait(fault)
        if identity.post_id in archived:
            # Another add of this post committed while this one ran: the
            # database's unique post id refuses this insert.
            log.info("Stand-in: post {post_id} added twice at once", post_id=identity.post_id)
            return self._error(
                where,
                f"DuplicateMessageError: Post {identity.post_id} already existed in database.",
            )
        time_source = fields.get("form.timeSource") or "server"
        self._store_post(form, group_id, time_source, identity)
        return self._done("add", where)

    async def _post_id(self, path: str, group_id: str) -> PostIdentity:
        args = (path, group_id, self._site_id, self._titles[group_id])
        if self._threads is None:
            return compute_post_id(*args)
        pool = self._threads.getThreadPool()
        return await deferToThreadPool(self._threads, pool, compute_post_id, *args)

    def _done(self, page: str, where: pages.PageURL) -> _Answer:
        """A page whose action ran: its form again, reset, under C{Done}."""
        # The same for every request to one URL: rendered once (benchmarks).
        answer = self._done_pages.get((page, where))
        if answer is None:
            answer = _Answer.html(pages.form_page(page, self._site, where, status="Done"))
            if len(self._done_pages) < 64:
                self._done_pages[page, where] = answer
        return answer

    def _bounce(self, fields: Mapping[str, str], where: pages.PageURL) -> _Answer:
        """The bounce action (C{handlebounce.py} C{handle_the_jandal})."""
        user_email = fields.get("form.userEmail")
        if user_email is None:
            return self._error(where, "KeyError: 'userEmail'")
        if self._members is not None and user_email.strip().lower() not in self._members:
            # Rendered as structure, unescaped, as GroupServer does.
            return _Answer.html(
                pages.form_page(
                    "bounce", self._site, where, status=f"No user found for {user_email}"
                )
            )
        group_email = fields.get("form.groupEmail")
        if group_email is None:
            return self._error(where, "KeyError: 'groupEmail'")
        if group_email.strip().lower() not in self._groups:
            return self._error(where, "TypeError: getattr(): attribute name must be string")
        self._record_bounce(user_email, group_email)
        return self._done("bounce", where)

    def _group_exists(self, email: str) -> _Answer:
        group_id = self._groups.get(email.strip().lower())
        site_id = self._site_id if group_id is not None else None
        site_url = self._site_url if group_id is not None else None
        body = pages.exists_json(email, site_id, group_id, site_url)
        return _Answer(200, b"text/plain; charset=utf-8", [body])

    def _deliver(self, form: _Form, maildir: str) -> str:
        """Move the decoded message into C{maildir}/new/; return its path."""
        assert form.message_path is not None
        final = os.path.join(maildir, "new", os.path.basename(form.message_path))
        os.rename(form.message_path, final)
        form.message_path = None
        return final

    def _store_post(
        self, form: _Form, group_id: str, time_source: str, identity: PostIdentity
    ) -> None:
        size = form.message_size
        final = self._deliver(form, self._maildir(group_id))
        self._archived[group_id].add(identity.post_id)
        record = PostRecord(group_id, time_source, final, size, identity.post_id, identity.topic_id)
        self._posts.append(record)
        self.post_stored(record)
        log.info(
            "Stand-in stored post {post_id} for {group_id}: {size} bytes",
            post_id=identity.post_id,
            group_id=group_id,
            size=size,
        )

    def _record_bounce(self, user_email: str, group_email: str) -> None:
        line = json.dumps({"userEmail": user_email, "groupEmail": group_email})
        with open(os.path.join(self._directory, "bounces.jsonl"), "a", encoding="utf-8") as f:
            f.write(line + "\n")
        self._bounces.append((user_email, group_email))
