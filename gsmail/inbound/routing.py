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
"""

from __future__ import annotations

import email
import email.policy
import fcntl
import importlib
import io
import json
import mailbox
import os
import re
import secrets
import warnings
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesHeaderParser
from typing import IO, Any, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail import status
from gsmail.addresses import Address, AddressError, Route, RouteKind, parse_mailbox
from gsmail.inbound.postmaster import Postmaster
from gsmail.inbound.spool import SpooledMessage
from gsmail.interfaces import Enqueue, IGroupServer, MessageSource
from gsmail.ledger import Outcome, PostLedger
from gsmail.logtext import printable
from gsmail.posting import plan_posting
from gsmail.routes import (
    NntpTarget,
    Refusal,
    RouteEntry,
    RouteMatch,
    RouteTable,
    Substitutions,
    address_pattern,
    check_policy,
    expand,
    one_line,
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

#: Runs a blocking job in a thread: C{blocking(job)} fires with its result.
Blocking = Callable[[Callable[[], Any]], "Deferred[Any]"]
#: Posts an article (bytes, LF line ends) to a news server; fires once it took it.
NntpPost = Callable[[NntpTarget, bytes], "Deferred[None]"]

#: Text read from a message for the word checks, in characters at most.
MAX_TEXT = 1 << 20
#: Message-to-sequence-number pairs remembered per route, so a message the
#: sender retries keeps its number (and so its content).
SEQUENCE_MEMORY = 1000
#: Header fields a news server refuses or sets itself (RFC 5536 §3.2, INN's
#: nnrpd), removed from an article; trace fields of mail with them.
NNTP_DROPPED = frozenset(
    {
        "path",
        "newsgroups",
        "xref",
        "nntp-posting-host",
        "nntp-posting-date",
        "injection-info",
        "injection-date",
        "received",
        "return-path",
        "x-original-to",
        "delivered-to",
        "bcc",
        "lines",
    }
)


class _CoreParts(Protocol):
    """What the actions use of the L{gsmail.inbound.delivery.DeliveryCore}."""

    client: IGroupServer
    ledger: PostLedger
    postmaster: Postmaster | None
    time_source: str
    hostname: str
    domains: tuple[str, ...]
    routes: RouteTable


@attrs.frozen
class RoutedMessage:
    """
    What a C{handler} route's callable gets (emailtunnel's envelope).

    @ivar sender: the envelope sender, C{""} for the null sender.
    @ivar recipient: the envelope recipient this call is for.
    @ivar route: the route's section name.
    @ivar path: the message file (trace fields first, rewriting done), LF
        line ends; it is removed once the returned Deferred fired: read it
        before (in a thread: the callable runs in the reactor's).
    @ivar size: its size in bytes.
    @ivar client: the sending client's address (C{"[192.0.2.1]"}, C{"local"}).
    @ivar variables: the route's substitutions (C{local}, C{domain}, pattern groups).
    """

    sender: str
    recipient: str
    route: str
    path: str
    size: int
    client: str
    variables: dict[str, str] = attrs.field(factory=dict)


class _ActionFailed(Exception):
    """An action's reply was not a success (carried through the ledger)."""

    def __init__(self, reply: Reply, keep: bool = False, why: str = "") -> None:
        super().__init__(reply.status_line())
        self.reply = reply
        self.keep = keep
        self.why = why


class SrsCodec:
    """
    The Sender Rewriting Scheme (Shevek's SRS paper, the "guarded" scheme of
    libsrs2: C{SRS0=HHHH=TT=domain=local@ours} and C{SRS1=...} for a sender
    that is already an SRS0 address) with the srslib library. The secret
    is derived from the first VERP key (L{gsmail.verp}), older keys still
    reverse, so the one key file rotates both.

    @param keys: the VERP keys, first signs.
    @param clock: for the day stamp (SRS0 addresses are valid 21 days).
    """

    def __init__(self, keys: tuple[bytes, ...], clock: IReactorTime) -> None:
        import hashlib
        import hmac

        import srslib

        secrets_ = [hmac.new(k, b"gsmail-srs-1", hashlib.sha256).hexdigest() for k in keys]
        self._srs = srslib.SRS(secrets_[0], prev_secrets=secrets_[1:])
        # srslib reads the time through this attribute (its own test hook).
        self._srs._time_fn = clock.seconds
        self._error = srslib.Error

    @staticmethod
    def is_srs(address: Address) -> bool:
        """Whether the local part is of the SRS0 or SRS1 form (not checked)."""
        return bool(re.match(r"SRS[01][-+=]", address.local, re.IGNORECASE))

    def forward(self, sender: str, domain: str) -> str:
        """The SRS address at C{domain} for C{sender} (an SRS1 one for an SRS0 sender)."""
        return str(self._srs.forward(sender, domain))

    def reverse(self, address: Address) -> str | None:
        """Where a bounce to C{address} goes, or C{None}: a bad hash or an old stamp."""
        try:
            return str(self._srs.reverse(str(address)))
        except (self._error, ValueError):
            return None


class SequenceStore:
    """
    Durable sequence numbers per route (DeleGate's C{count} file and its
    C{isn} option): one file per route in C{directory} holding the last
    number and the numbers given to recent messages, so a message the
    sender retries gets its number again. Written to a temporary file,
    fsynced and renamed; C{flock} keeps processes sharing the directory
    (inbound workers) from giving one number twice. Blocking: call it in a
    thread.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def path(self, route: str) -> str:
        """The file of C{route}: its name made safe."""
        safe = re.sub(r"[^A-Za-z0-9@._-]", "_", route)[:100]
        return os.path.join(self.directory, f"{safe}.seq")

    def number(self, route: str, digest: str) -> int:
        """
        The number of the message with content C{digest} on C{route}: the
        one it had, or the next one (the first is 1).

        @raise OSError: the file cannot be read or written.
        """
        os.makedirs(self.directory, exist_ok=True)
        path = self.path(route)
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            last, recent = self._read(path)
            if digest in recent:
                return recent[digest]
            last += 1
            recent[digest] = last
            while len(recent) > SEQUENCE_MEMORY:
                del recent[next(iter(recent))]
            text = f"{last}\n" + "".join(f"{d} {n}\n" for d, n in recent.items())
            temporary = f"{path}.{os.getpid()}.new"
            with open(temporary, "w", encoding="ascii") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
            _fsync_directory(self.directory)
            return last

    @staticmethod
    def _read(path: str) -> tuple[int, dict[str, int]]:
        try:
            with open(path, encoding="ascii") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return 0, {}
        last = int(lines[0]) if lines and lines[0].isdigit() else 0
        recent: dict[str, int] = {}
        for line in lines[1:]:
            digest, _, number = line.partition(" ")
            if number.isdigit():
                recent[digest] = int(number)
        return last, recent


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def keep_copy(
    directory: str, source: str, prefix: bytes, sidecar: dict[str, Any], now: float
) -> str:
    """
    Store a copy of a message with a JSON sidecar (C{NAME.eml},
    C{NAME.json}) in C{directory} (made if missing). Blocking.

    @param source: the message file.
    @param prefix: bytes put before it (trace fields).
    @param sidecar: what the operator needs (time, envelope, route, reply, traceback).
    @return: the path of the copy.
    @raise OSError: it cannot be written.
    """
    os.makedirs(directory, exist_ok=True)
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"{stamp}-{secrets.token_hex(4)}"
    path = os.path.join(directory, name + ".eml")
    with open(path, "wb") as out, open(source, "rb") as f:
        out.write(prefix)
        while chunk := f.read(1 << 16):
            out.write(chunk)
    with open(os.path.join(directory, name + ".json"), "w", encoding="utf-8") as f:
        json.dump({"time": now, "file": name + ".eml", **sidecar}, f, indent=1, sort_keys=True)
    return path


def make_article(path: str, newsgroup: str, hostname: str, out: IO[bytes]) -> None:
    """
    Write the message in C{path} as a news article to C{out}: C{Newsgroups}
    set, C{Path} started (C{HOST!not-for-mail}, RFC 5536 §3.1.5), the
    fields a news server refuses or sets itself and mail's trace fields
    removed (L{NNTP_DROPPED}), a C{Subject} added when there is none (RFC
    5536 §3.1 requires one). Blocking.
    """
    with open(path, "rb") as f:
        fields = _header_fields(f)
        kept = [
            b"".join(lines)
            for lines in fields
            if lines[0].split(b":", 1)[0].strip().lower().decode("ascii", "replace")
            not in NNTP_DROPPED
        ]
        names = {k.split(b":", 1)[0].strip().lower() for k in kept}
        out.write(f"Path: {hostname}!not-for-mail\n".encode())
        out.write(f"Newsgroups: {newsgroup}\n".encode())
        if b"subject" not in names:
            out.write(b"Subject: (no subject)\n")
        for field in kept:
            out.write(field)
        out.write(b"\n")
        while chunk := f.read(1 << 16):
            out.write(chunk)


def nntp_post(blocking: Blocking) -> NntpPost:
    """
    An L{NntpPost} over the standard library's C{nntplib} (the
    C{standard-nntplib} distribution from Python 3.13 on), run in a thread:
    connect, C{AUTHINFO USER/PASS} when a user is set, C{POST}, C{QUIT}. A
    C{441} naming a duplicate counts as posted (the sender's retry of an
    article the server has).

    @raise _ActionFailed: (in the Deferred) the server refused or could not
        be reached.
    """

    def post(target: NntpTarget, article: bytes) -> Deferred[None]:
        def job() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                import nntplib
            try:
                server = nntplib.NNTP(
                    target.host,
                    target.port,
                    user=target.user or None,
                    password=target.password or None,
                    readermode=True,
                    usenetrc=False,
                    timeout=60,
                )
            except (OSError, nntplib.NNTPError) as e:
                raise _ActionFailed(
                    status.NNTP_FAILED.with_text(
                        f"News server {target.host}:{target.port} not reachable; try again later"
                    ),
                    why=one_line(str(e))[:200],
                ) from None
            try:
                server.post(io.BytesIO(article))
            except nntplib.NNTPTemporaryError as e:
                if "uplicate" in str(e):
                    return
                raise _ActionFailed(
                    status.NNTP_FAILED.with_text(
                        f"News server refused the article: {one_line(str(e))[:200]}"
                    ),
                    keep=True,
                    why=one_line(str(e))[:200],
                ) from None
            except (OSError, nntplib.NNTPError) as e:
                raise _ActionFailed(status.NNTP_FAILED, why=one_line(str(e))[:200]) from None
            finally:
                try:
                    server.quit()
                except (OSError, EOFError, nntplib.NNTPError):
                    pass

        d: Deferred[None] = blocking(job)
        return d

    return post


@attrs.define
class _Work:
    """One recipient's copy being delivered by a route."""

    match: RouteMatch
    sender: str
    client: str
    session_id: str
    message: SpooledMessage
    prefix: bytes
    now: float
    #: The message's queue id (L{gsmail.maillog}), first on its log lines.
    queue_id: str = "NOQUEUE"
    header: Message | None = None
    seqno: int | None = None
    #: The file the actions use: trace fields, then the (rewritten) message.
    path: str = ""
    size: int = 0

    def substitutions(self) -> Substitutions:
        values = self.match.variables(self.sender)
        values["group"] = self.match.group_id
        return Substitutions(values, self.header, self.now, self.seqno)


class RouteActions:
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

    # -- the actions ---------------------------------------------------------
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


def _read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _path_safe(value: str) -> str:
    """A substituted value in a path: no directory separators, no leading dot."""
    value = value.replace("/", "_").replace("\x00", "_")
    return "_" + value[1:] if value.startswith(".") else value


def _store_maildir(path: str, source: str) -> None:
    """Add the file C{source} to the Maildir C{path} (made if missing), fsynced. Blocking."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    box = mailbox.Maildir(path, factory=None, create=True)
    with open(source, "rb") as f:
        box.add(f)
    _fsync_directory(os.path.join(path, "new"))


def _read_message(path: str, size: int, needs_text: bool) -> tuple[Message, int, str]:
    """
    The header of the message in C{path}, the size of its body and, when
    C{needs_text}, its subject and text parts decoded (at most L{MAX_TEXT}
    characters). Blocking.
    """
    with open(path, "rb") as f:
        header = BytesHeaderParser().parse(f)
        f.seek(0)
        header_size = 0
        for line in f:
            header_size += len(line)
            if line in (b"\n", b"\r\n"):
                break
    body_size = max(0, size - header_size)
    if not needs_text:
        return header, body_size, ""
    with open(path, "rb") as f:
        parsed = email.message_from_binary_file(f, policy=email.policy.default)
    parts = [one_line(str(header.get("Subject", "")))]
    total = len(parts[0])
    for part in parsed.walk():
        if part.get_content_maintype() != "text" or total > MAX_TEXT:
            continue
        try:
            content = part.get_content()  # type: ignore[attr-defined]
        except (LookupError, ValueError, AssertionError):
            content = ""
        if isinstance(content, str):
            parts.append(content[: MAX_TEXT - total])
            total += len(parts[-1])
    return header, body_size, "\n".join(parts)


def _header_fields(f: IO[bytes]) -> list[list[bytes]]:
    """
    Read the header section of the message in C{f} up to and including
    the empty line that ends it (left unread: the body follows in C{f}),
    as one list of raw lines per field (the first line, then its
    continuation lines).
    """
    fields: list[list[bytes]] = []
    for line in f:
        if line in (b"\n", b"\r\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    return fields


def _rewrite(f: IO[bytes], out: IO[bytes], entry: RouteEntry, subs: Substitutions) -> None:
    """
    Copy the message in C{f} to C{out} with the entry's rewriting applied
    to its header section; the body is copied as it is. Blocking.
    """
    rewrite = entry.rewrite
    fields = _header_fields(f)
    removed = {name.lower() for name in rewrite.remove_header}
    removed |= {name.lower() for name, _ in rewrite.set_header}
    if rewrite.sequence_header:
        removed.add(rewrite.sequence_header.lower())
    subject_prefix = (
        expand(rewrite.subject_prefix, subs, one_line) if rewrite.subject_prefix else ""
    )
    kept: list[bytes] = []
    has_subject = False
    for lines in fields:
        name = lines[0].split(b":", 1)[0].strip().decode("ascii", "replace").lower()
        if name in removed:
            continue
        if name == "subject" and subject_prefix:
            has_subject = True
            value = b"".join(lines).split(b":", 1)[1].decode("utf-8", "surrogateescape")
            text = " ".join(value.split())
            if subject_prefix.strip() and subject_prefix.strip() in text:
                kept.append(b"".join(lines))  # already tagged (a reply)
            else:
                kept.append(f"Subject: {subject_prefix}{text}\n".encode("utf-8", "surrogateescape"))
            continue
        kept.append(b"".join(lines))
    if subject_prefix and not has_subject:
        kept.append(f"Subject: {subject_prefix.rstrip()}\n".encode())
    for name, template in rewrite.set_header + rewrite.add_header:
        kept.append(f"{name}: {expand(template, subs, one_line)}\n".encode())
    if rewrite.sequence_header and subs.seqno is not None:
        kept.append(f"{rewrite.sequence_header}: {subs.seqno}\n".encode())
    out.writelines(kept)
    out.write(b"\n")
    while chunk := f.read(1 << 16):
        out.write(chunk)
