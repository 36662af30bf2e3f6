# -*- test-case-name: tests.outbound.test_queue -*-
"""
Importing a zope.sendmail queue (gs.email's C{queuepath}, a Maildir) into
the outbound queue, so that nothing is lost when a site switches its
outbound mail to gsmail
(L{gsmail.outbound.queue.OutboundQueue.import_zope_sendmail}). Reading the
X-Zope lines, claiming a file as zope.sendmail does and unlinking it once
queued are here; queuing it durably is the queue's
(L{gsmail.outbound.queue.store.store_message}).

Files in C{new/} and C{cur/} are taken oldest first; dotfiles (claims,
C{.rejected-} copies) and C{tmp/} are skipped. Each file starts with
C{X-Zope-From: <addr>} and C{X-Zope-To: <addr>, <addr>} lines; those
two lines are stripped and the rest is queued durably, exactly as
stored. For each file:

  1. a C{.sending-<name>} claim younger than 3 hours (zope.sendmail's
     C{MAX_SEND_TIME}) means a zope.sendmail processor may be sending
     it now: the file is skipped (left for a later import); an older
     claim is stale and removed;
  2. the file is claimed as zope.sendmail does (touched, hard link
     C{.sending-<name>}), so a processor still running skips it;
  3. it is queued; after the envelope is fsynced, and before the
     message can be delivered, the file is unlinked and its directory
     fsynced; then the claim is removed.

A crash after the envelope is durable but before the file is unlinked
leaves both; the next import finds the envelope by its C{origin} and
only unlinks the file. So an interrupted import imports each message
once, as long as its envelope is still queued; the at-least-once window
left is a zope.sendmail processor that sends a file whose claim is
older than 3 hours. Files that are not zope.sendmail messages, or fail,
are logged and left in place.
"""

from __future__ import annotations

import email.utils
import errno
import os
import stat
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gsmail.outbound.queue.envelope import Envelope
from gsmail.outbound.queue.store import FileOps, QueueClosedError, unlink_missing_ok

__all__ = ["ZOPE_MAX_SEND_TIME", "ZopeImport"]

#: zope.sendmail's C{MAX_SEND_TIME}: a C{.sending-} claim younger than this
#: (seconds) means its queue processor may be sending the file right now.
ZOPE_MAX_SEND_TIME: Final = 3 * 3600

_ZOPE_LINE_MAX: Final = 4 << 20
_ZOPE_FROM: Final = b"X-Zope-From: "
_ZOPE_TO: Final = b"X-Zope-To: "


class Enqueue(Protocol):
    """
    The queue's enqueue, with what an import adds: the message from byte
    C{offset} of a file, its C{origin}, and a job run once it is durable.
    """

    def __call__(
        self,
        sender: str,
        recipients: list[str],
        source: bytes | str,
        offset: int,
        *,
        xverp: bool,
        params: dict[str, str] | None,
        origin: str = "",
        after_durable: Callable[[], None] | None = None,
        sign: bool = False,
    ) -> Awaitable[Envelope]: ...


class ZopeImport:
    """
    One import of a zope.sendmail queue directory into the outbound queue.
    """

    def __init__(
        self,
        *,
        ops: FileOps,
        clock: IReactorTime,
        run: Callable[[Callable[[], None]], Awaitable[None]],
        enqueue: Enqueue,
        queued: Callable[[], Iterable[Envelope]],
        log: Logger,
    ) -> None:
        """
        @param ops: the file-system calls (the queue's).
        @param clock: the time a claim is made and judged by.
        @param run: runs a blocking job in the queue's C{sync} hand-off.
        @param enqueue: queues a message durably.
        @param queued: the envelopes queued now (to find an earlier import's).
        @param log: the queue's logger (its lines keep their namespace).
        """
        self._ops = ops
        self._clock = clock
        self._run = run
        self._enqueue = enqueue
        self._queued = queued
        self.log = log

    async def run(self, queuepath: str, xverp: bool) -> int:
        """
        Import every message file of C{queuepath}, oldest first.

        @return: the number of messages queued.
        @raise FileNotFoundError: C{queuepath} is not a directory.
        """
        queuepath = os.path.abspath(queuepath)
        files: list[str] = []
        await self._run(lambda: files.extend(_zope_files(queuepath)))
        imported = skipped = 0
        for path in files:
            try:
                if await self._import_one(path, xverp):
                    imported += 1
            except QueueClosedError:
                raise  # shutting down: the rest waits for the next import
            except Exception as exc:
                skipped += 1
                self.log.error(
                    "Could not import {path} from the zope.sendmail queue: {error}",
                    path=path,
                    error=str(exc),
                )
        self.log.info(
            "Imported {imported} messages from the zope.sendmail queue {queuepath}"
            " ({found} files, {skipped} left there)",
            imported=imported,
            queuepath=queuepath,
            found=len(files),
            skipped=skipped,
        )
        return imported

    async def _import_one(self, path: str, xverp: bool) -> bool:
        """
        Import one zope.sendmail file; C{True} if it was queued now.

        @raise ValueError: not a zope.sendmail message (left in place).
        @raise OSError: it could not be read or queued (left in place).
        """
        ops = self._ops
        directory, name = os.path.split(path)
        claim = os.path.join(directory, ".sending-" + name)
        origin = "zope.sendmail:" + name
        now = self._clock.seconds()
        found: list[tuple[str, list[str], int] | None] = []

        def take() -> None:
            try:
                claimed_at = os.stat(claim).st_mtime
            except FileNotFoundError:
                pass
            else:
                if now - claimed_at < ZOPE_MAX_SEND_TIME:
                    found.append(None)  # a zope.sendmail processor may be sending it
                    return
                unlink_missing_ok(ops, claim)
            ops.touch(path, now)  # as zope.sendmail does: the claim's age starts now
            ops.link(path, claim)
            try:
                found.append(_read_zope_header(path))
            except BaseException:
                unlink_missing_ok(ops, claim)
                raise

        await self._run(take)
        header = found[0]
        if header is None:
            self.log.info(
                "Skipped {path}: a zope.sendmail processor claimed it less than 3 hours ago",
                path=path,
            )
            return False
        sender, recipients, offset = header

        def finish() -> None:
            unlink_missing_ok(ops, claim)

        for envelope in self._queued():
            if envelope.origin == origin:
                # Queued by an import that stopped before it unlinked the file.
                def unqueue() -> None:
                    unlink_missing_ok(ops, path)
                    finish()
                    ops.fsync_dir(directory)

                await self._run(unqueue)
                self.log.info(
                    "{path} was already queued as {queue_id}", path=path, queue_id=envelope.id
                )
                return False

        def unlink_source() -> None:
            ops.unlink(path)  # failing here un-queues the message: the file stays
            try:
                ops.fsync_dir(directory)
            except OSError:
                pass  # the envelope's origin dedupes the file if it comes back

        try:
            await self._enqueue(
                sender,
                recipients,
                path,
                offset,
                xverp=xverp,
                params=None,
                origin=origin,
                after_durable=unlink_source,
                sign=True,
            )
        except BaseException:
            await self._run(finish)
            raise
        try:
            await self._run(finish)
        except OSError as exc:
            # A stale dotfile at worst: zope.sendmail and this import skip it.
            self.log.warn(
                "Could not remove the claim {claim}: {error}", claim=claim, error=str(exc)
            )
        return True


def _zope_files(queuepath: str) -> list[str]:
    """
    The message files of a zope.sendmail Maildir, oldest first.

    @raise FileNotFoundError: C{queuepath} is not a directory.
    """
    if not os.path.isdir(queuepath):
        raise FileNotFoundError(errno.ENOENT, "no zope.sendmail queue here", queuepath)
    entries = []
    for sub in ("new", "cur"):
        directory = os.path.join(queuepath, sub)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                entries.append((st.st_mtime, path))
    entries.sort()
    return [path for _, path in entries]


def _read_zope_header(path: str) -> tuple[str, list[str], int]:
    """
    The sender, the recipients and the offset of the message in a
    zope.sendmail queue file.

    @raise ValueError: the file does not start with the two X-Zope lines,
        has no recipient, or is not UTF-8 there.
    """
    with open(path, "rb") as f:
        first = f.readline(_ZOPE_LINE_MAX)
        second = f.readline(_ZOPE_LINE_MAX)
    if not (
        first.startswith(_ZOPE_FROM)
        and first.endswith(b"\n")
        and second.startswith(_ZOPE_TO)
        and second.endswith(b"\n")
    ):
        raise ValueError("not a zope.sendmail message (no X-Zope-From and X-Zope-To lines)")
    sender = _bare_address(first[len(_ZOPE_FROM) :].decode("utf-8"))
    # zope.sendmail joins with ", " and splits on it again; so do we.
    recipients = [
        _bare_address(part) for part in second[len(_ZOPE_TO) :].decode("utf-8").split(", ")
    ]
    recipients = [r for r in recipients if r]
    if not recipients:
        raise ValueError("no recipients in X-Zope-To")
    return sender, recipients, len(first) + len(second)


def _bare_address(text: str) -> str:
    """
    An address as zope.sendmail's smtplib would have sent it: C{Name <a@b>}
    and C{<a@b>} become C{a@b} (smtplib's C{quoteaddr}).
    """
    text = text.strip()
    if "<" in text:
        return email.utils.parseaddr(text)[1]
    return text
