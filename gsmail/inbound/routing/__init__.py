# -*- test-case-name: tests.inbound.test_routing -*-
"""
The actions of route table entries (L{gsmail.routes}) after the final dot:
the policy check, rewriting, then each action (post to a group, archive to
a Maildir, forward with an SRS sender, post to a newsgroup, call a handler,
keep as postmaster mail), then the BCC copies.

Each action runs through the post ledger under a key of its own (the
route, the action, the recipient and the message's digest), so when one
action fails transiently and the sender retries, the actions that had
succeeded are not done again: an archive holds one copy, a forward is
queued once, a group gets one post.

A refused message gets a copy in C{rejected_dir}; a message gsmail could not
handle for a reason of its own (a handler that raised, GroupServer refusing
the request, a news server refusing the article, a failure nobody
expected) gets one in C{errors_dir}, each with a JSON sidecar, for the
operator and C{gsmail-report} (L{gsmail.report}). Errors-To addresses get a
copy of either.

Where the parts are: this module runs an entry (L{RouteActions}: the
RCPT-time answer, the policy check, the work file, each action once
through the ledger, the BCC copies, the copies of refused and failed
messages). The actions themselves are in
L{gsmail.inbound.routing.actions} (a mixin of L{RouteActions}), the news
gateway in L{gsmail.inbound.routing.nntp}, the SRS codec in
L{gsmail.inbound.routing.srs}, the files they keep (sequence numbers,
copies, Maildir archives) in L{gsmail.inbound.routing.files}, the
reading and rewriting of the message in L{gsmail.inbound.routing.message},
and the values they pass each other in L{gsmail.inbound.routing.work}.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail import status
from gsmail.addresses import Address, AddressError, Route, RouteKind, parse_mailbox
from gsmail.inbound.routing.actions import EntryActions
from gsmail.inbound.routing.files import SequenceStore, keep_copy
from gsmail.inbound.routing.message import _read_message, _rewrite
from gsmail.inbound.routing.nntp import NntpPost, make_article, nntp_post
from gsmail.inbound.routing.srs import SrsCodec
from gsmail.inbound.routing.work import Blocking, RoutedMessage, _ActionFailed, _CoreParts, _Work
from gsmail.inbound.spool import SpooledMessage
from gsmail.interfaces import Enqueue
from gsmail.ledger import Outcome, PostLedger
from gsmail.logtext import printable
from gsmail.routes import (
    Refusal,
    RouteEntry,
    RouteMatch,
    address_pattern,
    check_policy,
)
from gsmail.status import GroupServerError, Reply

__all__ = [
    "RouteActions",
    "RoutedMessage",
    "SequenceStore",
    "SrsCodec",
    "keep_copy",
    "nntp_post",
    "make_article",
]

log = Logger()


class RouteActions(EntryActions):
    """
    Runs route table entries for the delivery core.

    @param core: the delivery core (client, ledger, postmaster, table).
    @param blocking: runs disk and network work in a thread.
    @param spool_dir: where work files are made (C{""}: the temp dir).
    @param state_dir: the sequence numbers (L{SequenceStore}).
    @param errors_dir: copies of messages gsmail failed on (C{""}: none kept).
    @param rejected_dir: copies of refused messages (C{""}: none kept).
    @param srs_domain: the domain of SRS senders.
    @param nntp: posts articles (default: L{nntp_post}).
    @ivar queue: the outbound queue, for forward, bcc and errors_to
        (C{None}: those fail with C{451 4.3.5}; the service refuses to
        start with such routes and no queue).
    @ivar srs: the L{SrsCodec}, once the VERP keys are loaded.
    """

    def __init__(
        self,
        core: _CoreParts,
        clock: IReactorTime,
        blocking: Blocking,
        *,
        spool_dir: str = "",
        state_dir: str = "",
        errors_dir: str = "",
        rejected_dir: str = "",
        srs_domain: str = "",
        nntp: NntpPost | None = None,
    ) -> None:
        self.core = core
        self.clock = clock
        self.blocking = blocking
        self.spool_dir = spool_dir
        self.sequences = SequenceStore(state_dir or os.path.join(spool_dir or "/tmp", "seqno"))
        self.errors_dir = errors_dir
        self.rejected_dir = rejected_dir
        self.srs_domain = srs_domain
        self.nntp = nntp if nntp is not None else nntp_post(blocking)
        self.queue: Enqueue | None = None
        self.srs: SrsCodec | None = None
        self._handlers: dict[str, Callable[..., Any]] = {}
        self._locks: dict[str, DeferredLock] = {}

    # -- RCPT time -------------------------------------------------------
    def check(self, found: RouteMatch) -> tuple[Reply, Route | None]:
        """
        The reply to C{RCPT TO} for a recipient the table matched: the
        entry's own refusal (C{reject}), else accepted (C{250 2.1.5}).
        """
        entry = found.entry
        if entry.reject is not None:
            return entry.reject, None
        reply = status.POSTMASTER_OK if entry.builtin else status.RECIPIENT_OK
        route = Route(
            RouteKind.TABLE, found.recipient, group_id=found.group_id or None, table=found
        )
        return reply, route

    def check_srs(self, recipient: Address) -> tuple[Reply, Route | None] | None:
        """
        A bounce to an SRS address of the site: accepted and routed back to
        the address it encodes when its hash and day stamp are good
        (C{250 2.1.5}), else C{550 5.1.1}; C{None} when C{recipient} is
        not of the SRS form or there is no codec.
        """
        if self.srs is None or not SrsCodec.is_srs(recipient):
            return None
        original = self.srs.reverse(recipient)
        if original is None:
            return status.NO_SUCH_GROUP.with_text(f"Bad or expired SRS address <{recipient}>"), None
        try:
            parse_mailbox(original)
        except AddressError:
            return status.NO_SUCH_GROUP.with_text(f"Bad SRS address <{recipient}>"), None
        entry = RouteEntry(
            name="SRS",
            pattern=address_pattern("*@*"),
            forward=(original,),
            builtin=True,
            srs_bounce=True,
        )
        found = RouteMatch(entry, recipient, {})
        return status.RECIPIENT_OK, Route(RouteKind.TABLE, recipient, table=found)

    # -- after the final dot ------------------------------------------------
    def deliver(
        self,
        sender: str,
        client: str,
        session_id: str,
        route: Route,
        message: SpooledMessage,
        prefix: bytes,
        queue_id: str = "NOQUEUE",
    ) -> Deferred[Reply]:
        """
        Run C{route}'s entry for one recipient's copy.

        @param prefix: the trace fields for this recipient.
        @param queue_id: the message's queue id, for the log.
        @return: fires with the reply (never fails): the action's own
            success, C{250 2.0.0 Delivered} when there were several, C{250
            2.0.0 Accepted} for a drop; a policy refusal (5xx naming the
            rule); the first failure (transient ones first).
        """
        assert route.table is not None
        work = _Work(
            route.table, sender, client, session_id, message, prefix, self.clock.seconds(), queue_id
        )
        return Deferred.fromCoroutine(self._deliver(work)).addErrback(self._bug, work)

    def _bug(self, failure: Failure, work: _Work) -> Reply:
        log.failure(
            "{queue_id}: route {route} failed",
            failure,
            route=work.match.entry.name,
            queue_id=work.queue_id,
        )
        return status.LOCAL_ERROR

    async def _deliver(self, work: _Work) -> Reply:
        entry = work.match.entry
        if entry.drops:
            log.info(
                "{queue_id}: route {route}: message for {recipient} from <{sender}> dropped"
                " ({message_id})",
                route=entry.name,
                recipient=printable(str(work.match.recipient)),
                sender=printable(work.sender),
                message_id=printable(work.message.identity),
                queue_id=work.queue_id,
            )
            return status.ROUTE_DROPPED
        try:
            refusal = await self._check(work)
        except OSError as e:
            log.error(
                "{queue_id}: route {route}: cannot read the message: {error}",
                route=entry.name,
                error=e,
                queue_id=work.queue_id,
            )
            return status.LOCAL_ERROR
        if refusal is not None:
            await self._refused(work, refusal)
            return refusal.reply
        try:
            if entry.uses_seqno:
                work.seqno = await self._seqno(entry.name, work.message.digest)
            work.path, work.size = await self.blocking(lambda: self._prepare(work))
        except OSError as e:
            log.error(
                "{queue_id}: route {route}: cannot prepare the message: {error}",
                route=entry.name,
                error=e,
                queue_id=work.queue_id,
            )
            return status.LOCAL_ERROR
        try:
            return await self._run(work)
        finally:
            try:
                os.unlink(work.path)
            except OSError:
                pass

    async def _check(self, work: _Work) -> Refusal | None:
        entry = work.match.entry
        policy = entry.policy
        needs_header = (
            policy != type(policy)()
            or not entry.rewrite.empty
            or any("${" in t for t in entry.templates())
        )
        if not needs_header:
            return None
        header, body_size, text = await self.blocking(
            lambda: _read_message(work.message.path, work.message.size, policy.needs_text)
        )
        work.header = header
        return check_policy(
            policy,
            entry.name,
            sender=work.sender,
            client=work.client.strip("[]"),
            header=header,
            size=work.message.size,
            body_size=body_size,
            text=text,
        )

    async def _seqno(self, route: str, digest: str) -> int:
        lock = self._locks.setdefault(route, DeferredLock())
        await lock.acquire()
        try:
            number: int = await self.blocking(lambda: self.sequences.number(route, digest))
            return number
        finally:
            lock.release()

    def _prepare(self, work: _Work) -> tuple[str, int]:
        """The work file: trace fields, the header (rewritten), the body. Blocking."""
        import tempfile

        entry = work.match.entry
        fd, path = tempfile.mkstemp(prefix="route-", suffix=".eml", dir=self.spool_dir or None)
        try:
            with os.fdopen(fd, "wb") as out, open(work.message.path, "rb") as f:
                out.write(work.prefix)
                if entry.rewrite.empty:
                    while chunk := f.read(1 << 16):
                        out.write(chunk)
                else:
                    _rewrite(f, out, entry, work.substitutions())
                size = out.tell()
        except BaseException:
            os.unlink(path)
            raise
        return path, size

    async def _run(self, work: _Work) -> Reply:
        entry = work.match.entry
        steps: list[tuple[str, Callable[[], Awaitable[Reply]]]] = []
        if entry.group:
            steps.append(("group", lambda: self._group(work)))
        if entry.archive:
            steps.append(("archive", lambda: self._archive(work)))
        if entry.forward:
            steps.append(("forward", lambda: self._forward(work, entry.forward or ())))
        if entry.nntp is not None:
            steps.append(("nntp", lambda: self._nntp(work)))
        if entry.handler:
            steps.append(("handler", lambda: self._handler(work)))
        if entry.postmaster:
            steps.append(("postmaster", lambda: self._postmaster(work)))
        replies: list[Reply] = []
        failures: list[_ActionFailed] = []
        for name, step in steps:
            try:
                replies.append(await self._once(work, name, step))
            except _ActionFailed as e:
                failures.append(e)
        if failures:
            failures.sort(key=lambda f: not f.reply.is_transient)
            first = failures[0]
            await self._failed(work, first)
            return first.reply
        if entry.bcc:
            try:
                await self._once(work, "bcc", lambda: self._forward(work, entry.bcc, copy=True))
            except _ActionFailed as e:
                await self._failed(work, e)
                return e.reply
        log.info(
            "{queue_id}: route {route} for {recipient} from <{sender}> ({message_id}): {actions}",
            route=entry.name,
            recipient=printable(str(work.match.recipient)),
            sender=printable(work.sender),
            message_id=printable(work.message.identity),
            actions=", ".join(name for name, _ in steps),
            seqno=work.seqno,
            session=work.session_id,
            queue_id=work.queue_id,
        )
        return replies[0] if len(replies) == 1 else status.ROUTE_DELIVERED

    async def _once(self, work: _Work, name: str, step: Callable[[], Awaitable[Reply]]) -> Reply:
        """Run one action through the ledger; a repeat of a done one succeeds at once."""
        entry = work.match.entry
        digest = "sha256:" + work.message.digest
        if name == "group":
            key = PostLedger.key("post", work.match.group_id, digest)
        else:
            key = PostLedger.key(
                "route", entry.name, name, str(work.match.recipient).lower(), digest
            )
        done: list[Reply] = []

        async def action() -> None:
            reply = await step()
            if not reply.is_success:
                raise _ActionFailed(reply)
            done.append(reply)

        try:
            outcome = await self.core.ledger.run(key, lambda: ensureDeferred(action()))
        except _ActionFailed:
            raise
        except GroupServerError as e:
            reply = status.reply_for_exception(e)
            raise _ActionFailed(
                reply, keep=reply == status.GROUPSERVER_REFUSED, why=e.detail
            ) from None
        except Exception:
            f = Failure()
            log.failure(
                "{queue_id}: route {route}: {action} failed",
                f,
                route=entry.name,
                action=name,
                queue_id=work.queue_id,
            )
            raise _ActionFailed(
                status.reply_for_exception(f.value), keep=True, why=f.getTraceback()
            ) from None
        if outcome is Outcome.DUPLICATE:
            return status.ALREADY_DELIVERED
        return done[0] if done else status.ROUTE_DELIVERED

    # -- refusals and errors -----------------------------------------------
    def _sidecar(self, work: _Work, reply: Reply, **extra: Any) -> dict[str, Any]:
        return {
            "sender": work.sender,
            "recipient": str(work.match.recipient),
            "route": work.match.entry.name,
            "client": work.client,
            "session": work.session_id,
            "message_id": work.message.message_id or "",
            "reply": f"{reply.code} {reply.status_line()}",
            **extra,
        }

    async def _refused(self, work: _Work, refusal: Refusal) -> None:
        entry = work.match.entry
        log.info(
            "{queue_id}: route {route} refused mail for {recipient} from <{sender}> ({message_id}):"
            " {reply_code} {enhanced_status} {rule}",
            route=entry.name,
            recipient=printable(str(work.match.recipient)),
            sender=printable(work.sender),
            message_id=printable(work.message.identity),
            reply_code=refusal.reply.code,
            enhanced_status=refusal.reply.enhanced,
            rule=refusal.rule,
            queue_id=work.queue_id,
        )
        sidecar = self._sidecar(work, refusal.reply, rule=refusal.rule)
        await self._keep(self.rejected_dir, work, sidecar, work.message.path, work.prefix)
        await self._errors_to(work, work.message.path, work.prefix, refusal.reply)

    async def _failed(self, work: _Work, failure: _ActionFailed) -> None:
        if not failure.keep:
            return
        sidecar = self._sidecar(work, failure.reply, traceback=failure.why)
        await self._keep(self.errors_dir, work, sidecar, work.path, b"")
        await self._errors_to(work, work.path, b"", failure.reply)

    async def _keep(
        self, directory: str, work: _Work, sidecar: dict[str, Any], source: str, prefix: bytes
    ) -> None:
        if not directory:
            return
        try:
            path = await self.blocking(
                lambda: keep_copy(directory, source, prefix, sidecar, work.now)
            )
        except OSError as e:
            log.error("Cannot keep a copy in {directory}: {error}", directory=directory, error=e)
            return
        log.info("Kept a copy as {path}", path=path)

    async def _errors_to(self, work: _Work, source: str, prefix: bytes, reply: Reply) -> None:
        entry = work.match.entry
        if not entry.errors_to or self.queue is None:
            return
        note = (
            f"X-Gsmail-Route: {entry.name}\n"
            f"X-Gsmail-Reply: {reply.code} {reply.status_line()}\n"
            f"X-Gsmail-Envelope: from <{work.sender}> to <{work.match.recipient}>\n"
        ).encode("utf-8", "replace")
        try:
            data: bytes = await self.blocking(lambda: note + prefix + _read_all(source))
            # The null sender: a copy to the operator must never bounce back.
            await self.queue.enqueue("", list(entry.errors_to), data)
        except Exception as e:
            log.error(
                "{queue_id}: route {route}: cannot queue the Errors-To copy: {error}",
                route=entry.name,
                error=e,
                queue_id=work.queue_id,
            )


def _read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
