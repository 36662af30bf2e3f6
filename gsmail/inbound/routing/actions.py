# -*- test-case-name: tests.inbound.test_routing,tests.integration.test_routes -*-
"""
The actions a route entry can have, one method each: post to a group,
archive to a Maildir, forward (with an SRS sender), post to a newsgroup,
call a handler, keep as postmaster mail.

A mixin of L{gsmail.inbound.routing.RouteActions}, which runs each of
them once per message through the post ledger and answers. Not the files
they write (L{gsmail.inbound.routing.files}), nor the news article
(L{gsmail.inbound.routing.nntp}), nor the SRS codec
(L{gsmail.inbound.routing.srs}).
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail import status
from gsmail.addresses import AddressError, Route, RouteKind, parse_mailbox
from gsmail.inbound.routing.files import _store_maildir
from gsmail.inbound.routing.nntp import NntpPost, make_article
from gsmail.inbound.routing.srs import SrsCodec
from gsmail.inbound.routing.work import Blocking, RoutedMessage, _ActionFailed, _CoreParts, _Work
from gsmail.inbound.spool import SpooledMessage
from gsmail.interfaces import Enqueue, MessageSource
from gsmail.logtext import printable
from gsmail.posting import plan_posting
from gsmail.routes import expand, one_line
from gsmail.status import Reply

# The namespace of the module these lines came from, so that the route
# actions' log lines stay as they were.
log = Logger(namespace="gsmail.inbound.routing")


class EntryActions:
    """
    The actions of L{gsmail.inbound.routing.RouteActions} (a mixin: see
    the module); each returns its success reply or raises L{_ActionFailed}.
    """

    # RouteActions' state these read (RouteActions.__init__).
    core: _CoreParts
    blocking: Blocking
    nntp: NntpPost
    queue: Enqueue | None
    srs: SrsCodec | None
    srs_domain: str
    _handlers: dict[str, Callable[..., Any]]

    async def _group(self, work: _Work) -> Reply:
        group_id = work.match.group_id
        source = MessageSource(prefix=b"", path=work.path, size=work.size, data=None)
        route = Route(RouteKind.GROUP, work.match.recipient, group_id=group_id)
        posting = plan_posting(
            self.core.client, route, source, work.message.digest, self.core.time_source
        )
        await posting.action()
        return posting.success

    async def _archive(self, work: _Work) -> Reply:
        entry = work.match.entry
        path = expand(entry.archive, work.substitutions(), _path_safe)
        await self.blocking(lambda: _store_maildir(path, work.path))
        log.info(
            "{queue_id}: route {route}: archived in {path}",
            route=entry.name,
            path=path,
            queue_id=work.queue_id,
        )
        return status.ROUTE_ARCHIVED

    async def _forward(self, work: _Work, templates: tuple[str, ...], copy: bool = False) -> Reply:
        entry = work.match.entry
        if self.queue is None:
            return status.CONFIG_ERROR.with_text("Forwarding needs the outbound queue")
        subs = work.substitutions()
        targets: list[str] = []
        for template in templates:
            text = expand(template, subs, one_line)
            try:
                target = parse_mailbox(text)
            except AddressError:
                log.error(
                    "{queue_id}: route {route}: {address} is no address",
                    route=entry.name,
                    address=text,
                    queue_id=work.queue_id,
                )
                return status.CONFIG_ERROR.with_text(f"Route {entry.name}: bad forward address")
            if str(target).lower() == str(work.match.recipient).lower() or (
                target.domain in self.core.domains
                and (found := self.core.routes.lookup(target)) is not None
                and found.entry is entry
                and not entry.srs_bounce
            ):
                log.warn(
                    "{queue_id}: route {route}: not forwarding to {address},"
                    " which routes back here",
                    route=entry.name,
                    address=str(target),
                    queue_id=work.queue_id,
                )
                continue
            targets.append(str(target))
        if not targets:
            return status.ROUTE_DROPPED
        sender = work.sender
        if entry.srs_bounce:
            pass  # a bounce goes back as it came (the null sender, mostly)
        elif sender and self.srs is not None and self.srs_domain:
            domain = sender.rpartition("@")[2].lower()
            if domain not in self.core.domains:
                sender = self.srs.forward(sender, self.srs_domain)
        try:
            entry_ = await self.queue.enqueue(sender, targets, work.path)
        except Exception:
            f = Failure()
            log.error(
                "{queue_id}: route {route}: cannot queue for {targets}: {error}",
                route=entry.name,
                targets=", ".join(targets),
                error=printable(str(f.value)),
                queue_id=work.queue_id,
            )
            return status.LOCAL_ERROR
        log.info(
            "{queue_id}: route {route}: {what} queued as {forward_id} for {targets}"
            " from <{sender}>",
            route=entry.name,
            what="copy" if copy else "forward",
            forward_id=getattr(entry_, "id", "?"),
            targets=", ".join(targets),
            sender=printable(sender),
            queue_id=work.queue_id,
        )
        return status.ROUTE_FORWARDED

    async def _nntp(self, work: _Work) -> Reply:
        target = work.match.entry.nntp
        assert target is not None
        hostname = self.core.hostname

        def build() -> bytes:
            out = io.BytesIO()
            make_article(work.path, target.newsgroup, hostname, out)
            return out.getvalue()

        article: bytes = await self.blocking(build)
        await self.nntp(target, article)
        return status.NNTP_POSTED

    async def _handler(self, work: _Work) -> Reply:
        entry = work.match.entry
        try:
            call = self._resolve(entry.handler)
        except Exception:
            log.error(
                "{queue_id}: route {route}: cannot load the handler {handler}: {error}",
                route=entry.name,
                handler=entry.handler,
                error=Failure().getErrorMessage(),
                queue_id=work.queue_id,
            )
            raise _ActionFailed(
                status.CONFIG_ERROR.with_text(f"Route {entry.name}: its handler cannot be loaded"),
                keep=True,
                why=Failure().getTraceback(),
            ) from None
        routed = RoutedMessage(
            sender=work.sender,
            recipient=str(work.match.recipient),
            route=entry.name,
            path=work.path,
            size=work.size,
            client=work.client,
            variables=work.match.variables(work.sender),
        )
        try:
            result = call(routed)
            if isinstance(result, Deferred) or hasattr(result, "__await__"):
                result = await result
        except _ActionFailed:
            raise
        except Exception:
            f = Failure()
            log.failure(
                "{queue_id}: route {route}: the handler raised",
                f,
                route=entry.name,
                queue_id=work.queue_id,
            )
            # emailtunnel answers 451 when handle_envelope raises.
            raise _ActionFailed(status.HANDLER_FAILED, keep=True, why=f.getTraceback()) from None
        if result is None:
            return status.ROUTE_DELIVERED
        if not isinstance(result, Reply):
            raise _ActionFailed(
                status.HANDLER_FAILED, keep=True, why=f"the handler returned {result!r:.100}"
            )
        return result

    def _resolve(self, spec: str) -> Callable[..., Any]:
        call = self._handlers.get(spec)
        if call is None:
            call = resolve_handler(spec)
            self._handlers[spec] = call
        return call

    async def _postmaster(self, work: _Work) -> Reply:
        postmaster = self.core.postmaster
        if postmaster is None:
            return status.CONFIG_ERROR.with_text("No postmaster is configured")
        message = SpooledMessage(
            path=work.path,
            size=work.size,
            message_id=work.message.message_id,
            digest=work.message.digest,
        )
        reply = await postmaster.deliver(work.sender, b"", message)
        log.info(
            "{queue_id}: postmaster from <{sender}> ({message_id}): {reply_code} {enhanced_status}",
            sender=printable(work.sender),
            message_id=printable(work.message.identity),
            reply_code=reply.code,
            enhanced_status=reply.enhanced,
            session=work.session_id,
            queue_id=work.queue_id,
        )
        return reply


def resolve_handler(spec: str) -> Callable[..., Any]:
    """
    Import C{package.module:callable} (blocking: the import may read files).

    @raise ImportError: the module cannot be imported.
    @raise AttributeError: it has no such callable.
    @raise TypeError: the name is not callable.
    """
    module_name, _, name = spec.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in name.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{spec} is not callable")
    return target  # type: ignore[no-any-return]


def _path_safe(value: str) -> str:
    """A substituted value in a path: no directory separators, no leading dot."""
    value = value.replace("/", "_").replace("\x00", "_")
    return "_" + value[1:] if value.startswith(".") else value
