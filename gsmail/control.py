# -*- test-case-name: tests.test_control -*-
"""
Queue control: what C{mailq}, C{postqueue -f} and C{postsuper -h/-H/-d} are
to Postfix, for gsmail's outbound queue.

The running daemon listens on a UNIX socket (mode 0600; by default
C{<queue_dir>/control}) and answers AMP (L{twisted.protocols.amp}) commands:

  - L{ListQueue}: every queued message with its recipients' states, in pages
    (an AMP value holds at most 65,535 bytes, and a queue waiting for a dead
    destination holds far more);
  - L{Flush}: make pending recipients due now and wake delivery;
  - L{Hold}, L{Release}, L{Delete}: one message, by queue id.

Errors travel as AMP errors and are raised again on the client as the same
exception class: L{NoSuchMessageError} ("no such message"),
L{QueueClosedError} (the daemon is stopping) and C{OSError} (the change could
not be written to the disk).

L{ControlClient} is the client side, used by C{gsmail-queue}
(L{gsmail.queuectl}); L{ControlService} is the listener the daemon runs.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Any, Final, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTime
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols.amp import (
    AMP,
    AmpList,
    Boolean,
    Command,
    CommandLocator,
    Float,
    Integer,
    Unicode,
)
from twisted.python.failure import Failure

from gsmail.config import GsmailConfig
from gsmail.outbound.queue import (
    Envelope,
    NoSuchMessageError,
    OutboundQueue,
    QueueClosedError,
    RecipientState,
)

__all__ = [
    "ControlClient",
    "ControlConnection",
    "ControlFactory",
    "ControlService",
    "Delete",
    "Flush",
    "FlushResult",
    "Hold",
    "ListQueue",
    "QueueControl",
    "QueueListing",
    "Release",
    "connect_control",
    "control_path",
]

log = Logger()

#: Bytes of message rows per L{ListQueue} page: below AMP's 65,535-byte
#: limit for one value, with room to spare.
PAGE_BYTES: Final = 60_000
#: Longest address or reply text sent in a listing, in characters; longer
#: ones are cut (with "...") so that a row always fits in a page.
MAX_TEXT: Final = 1000

# How each error crosses the wire; the client raises the same class again.
_ERRORS: Final[dict[type[Exception], bytes]] = {
    NoSuchMessageError: b"NO_SUCH_MESSAGE",
    QueueClosedError: b"QUEUE_CLOSED",
    OSError: b"QUEUE_IO_ERROR",
}

_RECIPIENT: Final = [
    (b"address", Unicode()),
    (b"state", Unicode()),
    (b"attempts", Integer()),
    (b"next_attempt", Float()),
    (b"last_reply", Unicode()),
]
_MESSAGE: Final = [
    (b"queue_id", Unicode()),
    (b"sender", Unicode()),
    (b"created", Float()),
    (b"size", Integer()),
    (b"held", Boolean()),
    (b"xverp", Boolean()),
    (b"recipients", AmpList(_RECIPIENT)),
]


class ListQueue(Command):
    """
    One page of the queue listing, messages in queue id order (which is
    arrival order). A message with many recipients may span pages: its row
    is repeated with the next recipients.

    Arguments: C{cursor} (optional): the C{cursor} of the previous page.
    Response: C{messages} (rows), C{cursor} (C{""}: that was the last page),
    C{delivering} (C{False}: C{processorthread = false}, nothing is sent).
    """

    arguments = [(b"cursor", Unicode(optional=True))]
    response = [
        (b"messages", AmpList(_MESSAGE)),
        (b"cursor", Unicode()),
        (b"delivering", Boolean()),
    ]


class Flush(Command):
    """
    Make the pending recipients due now and wake delivery (C{postqueue -f},
    or C{postqueue -i ID} with C{queue_id}). Held messages are left alone.

    Response: C{messages} and C{recipients} made due, C{held} (held
    messages left alone), C{delivering}.
    """

    arguments = [(b"queue_id", Unicode(optional=True))]
    response = [
        (b"messages", Integer()),
        (b"recipients", Integer()),
        (b"held", Integer()),
        (b"delivering", Boolean()),
    ]
    errors = _ERRORS


class Hold(Command):
    """Put a message on hold (C{postsuper -h}): nothing is sent until released."""

    arguments = [(b"queue_id", Unicode())]
    errors = _ERRORS


class Release(Command):
    """Release a held message (C{postsuper -H}) and wake delivery."""

    arguments = [(b"queue_id", Unicode())]
    errors = _ERRORS


class Delete(Command):
    """
    Delete a message whatever its state (C{postsuper -d}); no DSN is sent.

    Response: C{dropped}, the recipients it still had pending.
    """

    arguments = [(b"queue_id", Unicode())]
    response = [(b"dropped", Integer())]
    errors = _ERRORS


class Waker(Protocol):
    """What the control needs of L{gsmail.outbound.delivery.OutboundDelivery}."""

    def kick(self) -> None:
        """Look for due recipients now."""


def control_path(config: GsmailConfig) -> str:
    """
    The control socket of a configuration: C{control_socket}, or
    C{<queue_dir>/control} when that is empty.
    """
    return config.control_socket or os.path.join(config.queue_dir, "control")


def _text(value: str) -> str:
    """
    Text as it may cross the wire: at most L{MAX_TEXT} characters, and valid
    UTF-8 (addresses decoded with C{surrogateescape} show their raw bytes as
    C{\\udcNN} escapes instead of breaking the encoding).
    """
    if len(value) > MAX_TEXT:
        value = value[:MAX_TEXT] + "..."
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _encoded_size(schema: list[tuple[bytes, Any]], row: dict[str, Any]) -> int:
    """The bytes C{row} takes in an AmpList of C{schema} (exact: rows concatenate)."""
    return len(AmpList(schema).toStringProto([row], None))


class QueueControl(CommandLocator):
    """
    The responders of the control commands, over the daemon's queue.

    @ivar page_bytes: bytes of rows per listing page (tests make it small).
    """

    def __init__(self, queue: OutboundQueue, delivery: Waker | None, clock: IReactorTime) -> None:
        """
        @param queue: the loaded outbound queue.
        @param delivery: what L{Flush} and L{Release} wake, or C{None} when
            delivery is off (C{processorthread = false}): they then only
            change the queue, and say so.
        @param clock: the time a flush makes recipients due at.
        """
        self.queue = queue
        self.delivery = delivery
        self.clock = clock
        self.page_bytes = PAGE_BYTES

    def _wake(self) -> None:
        if self.delivery is not None:
            self.delivery.kick()

    def _get(self, queue_id: str) -> Envelope:
        # A malformed id is no queue id either: the same clear error.
        envelope = self.queue.get(queue_id)
        if envelope is None:
            raise NoSuchMessageError(f"no such message: {_text(queue_id)}")
        return envelope

    @ListQueue.responder
    def list_queue(self, cursor: str | None = None) -> dict[str, Any]:
        """
        One page of the listing (L{ListQueue}): rows of at most
        L{page_bytes} bytes in all, at least one recipient per page.

        @param cursor: C{"<queue id> <recipient index>"} from the last page:
            go on from there (or from the next message, if that one is gone).
        """
        after_id, _, index_text = (cursor or "").partition(" ")
        start = int(index_text) if index_text.isdigit() else 0
        rows: list[dict[str, Any]] = []
        used = 0
        next_cursor = ""
        envelopes = sorted(self.queue.envelopes(), key=lambda e: e.id)
        for envelope in envelopes:
            if envelope.id < after_id:
                continue
            # The message of the cursor itself is gone: start at the next one.
            first = start if envelope.id == after_id else 0
            row: dict[str, Any] = {
                "queue_id": envelope.id,
                "sender": _text(envelope.sender),
                "created": envelope.created,
                "size": envelope.size,
                "held": envelope.held,
                "xverp": envelope.xverp,
                "recipients": [],
            }
            size = _encoded_size(_MESSAGE, row)
            for index in range(first, len(envelope.recipients)):
                r = envelope.recipients[index]
                item = {
                    "address": _text(r.address),
                    "state": r.state,
                    "attempts": r.attempts,
                    "next_attempt": r.next_attempt,
                    "last_reply": _text(r.last_reply),
                }
                more = _encoded_size(_RECIPIENT, item)
                if used + size + more > self.page_bytes and (rows or row["recipients"]):
                    next_cursor = f"{envelope.id} {index}"
                    break
                row["recipients"].append(item)
                size += more
            if row["recipients"]:
                rows.append(row)
                used += size
            if next_cursor:
                break
        return {"messages": rows, "cursor": next_cursor, "delivering": self.delivery is not None}

    @Flush.responder
    def flush(self, queue_id: str | None = None) -> dict[str, Any]:
        """
        L{Flush}: pending recipients of messages not held become due now.

        @raise NoSuchMessageError: C{queue_id} is not queued.
        """
        now = self.clock.seconds()
        if queue_id is None:
            envelopes = self.queue.envelopes()
        else:
            envelopes = [self._get(queue_id)]
        messages = recipients = held = 0
        for envelope in envelopes:
            pending = envelope.pending()
            if not pending:
                continue
            if envelope.held:
                held += 1
                continue
            messages += 1
            recipients += len(pending)
            for r in pending:
                # In memory only: the attempt that follows writes the
                # envelope, and a crash before it just keeps the old time.
                r.next_attempt = min(r.next_attempt, now)
        if recipients:
            self._wake()
        log.info(
            "Flush: {recipients} recipients of {messages} messages due now,"
            " {held} held messages left alone",
            recipients=recipients,
            messages=messages,
            held=held,
        )
        return {
            "messages": messages,
            "recipients": recipients,
            "held": held,
            "delivering": self.delivery is not None,
        }

    @Hold.responder
    def hold(self, queue_id: str) -> Deferred[dict[str, Any]]:
        """
        L{Hold}, durably (L{OutboundQueue.hold}).

        @raise NoSuchMessageError: C{queue_id} is not queued; the Deferred
            may also fail with C{OSError} or L{QueueClosedError}.
        """
        self._get(queue_id)
        return self.queue.hold(queue_id).addCallback(lambda _: {})

    @Release.responder
    def release(self, queue_id: str) -> Deferred[dict[str, Any]]:
        """
        L{Release}, durably, then wake delivery.

        @raise NoSuchMessageError: as L{hold}, with the same failures.
        """
        self._get(queue_id)

        def released(_: None) -> dict[str, Any]:
            # Delivery's timer ignored the message while it was held.
            self._wake()
            return {}

        return self.queue.release(queue_id).addCallback(released)

    @Delete.responder
    def delete(self, queue_id: str) -> Deferred[dict[str, Any]]:
        """
        L{Delete} (L{OutboundQueue.delete}): no DSN for the pending recipients.

        @raise NoSuchMessageError: as L{hold}, with the same failures.
        """
        dropped = len(self._get(queue_id).pending())
        return self.queue.delete(queue_id).addCallback(lambda _: {"dropped": dropped})


class ControlConnection(AMP):
    """
    An AMP connection to or from the control socket.

    @ivar lost: fires when the connection is closed.
    """

    def __init__(self, locator: CommandLocator | None = None) -> None:
        super().__init__(locator=locator)
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


class _ServerConnection(ControlConnection):
    """A connection its factory closes when the daemon stops."""

    factory: ControlFactory

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connections.discard(self)
        super().connectionLost(reason)


class ControlFactory(ServerFactory[_ServerConnection]):
    """
    Builds an AMP connection per C{gsmail-queue} run, answered by one
    L{QueueControl}.

    @ivar connections: the open connections.
    """

    noisy = False

    def __init__(self, control: QueueControl) -> None:
        self.control = control
        self.connections: set[_ServerConnection] = set()

    def buildProtocol(self, addr: IAddress | None) -> _ServerConnection:
        protocol = _ServerConnection(self.control)
        protocol.factory = self
        return protocol


class ControlService(Service):
    """
    Listens on the control socket (mode 0600) from C{startService}: after
    C{twistd -u} dropped privileges, so the socket belongs to the user the
    queue belongs to, and after the queue directory exists. A socket left by
    a daemon that died is replaced; one another process still answers on is
    not.

    A socket that cannot be made is logged, not fatal: mail keeps flowing,
    and C{gsmail-queue list} still reads the queue directory.

    @ivar port: the listening port, or C{None}.
    """

    def __init__(self, path: str, factory: ControlFactory, reactor: Any) -> None:
        """
        @param path: the socket's file name (at most 107 bytes: C{AF_UNIX}).
        @param reactor: an C{IReactorUNIX}.
        """
        self.path = path
        self.factory = factory
        self.reactor = reactor
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        try:
            _remove_stale_socket(self.path)
            self.port = self.reactor.listenUNIX(self.path, self.factory, mode=0o600)
        except Exception as e:
            log.error(
                "No queue control: cannot listen on {path}: {error}."
                " gsmail-queue can only list the queue read-only (set control_socket?)",
                path=self.path,
                error=str(e),
            )
            return
        log.info("Queue control listening on {path}", path=self.path)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        waits: list[Deferred[Any]] = []
        port, self.port = self.port, None
        if port is not None:
            stopped = port.stopListening()
            if isinstance(stopped, Deferred):
                waits.append(stopped)
        for connection in list(self.factory.connections):
            waits.append(connection.lost)
            if connection.transport is not None:
                connection.transport.loseConnection()
        return gatherResults(waits).addCallback(lambda _: None)


def _remove_stale_socket(path: str) -> None:
    """
    Remove a socket file nobody listens on (left by a daemon that died).
    Blocking, but only a local C{connect()}: at start-up.

    @raise OSError: another process listens on C{path} (C{EADDRINUSE}).
    """
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return  # not ours to remove: the bind reports it
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return  # the bind says what is wrong
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another process is listening on it")


# -- the client side ------------------------------------------------------------


@attrs.frozen
class QueueListing:
    """
    The queue as the daemon sees it.

    @ivar envelopes: the messages in queue id (arrival) order; addresses and
        replies over L{MAX_TEXT} characters are cut.
    @ivar delivering: C{False}: delivery is off (C{processorthread = false}).
    """

    envelopes: list[Envelope]
    delivering: bool


@attrs.frozen
class FlushResult:
    """
    What a flush did.

    @ivar messages: messages with recipients made due now.
    @ivar recipients: recipients made due now.
    @ivar held: held messages with pending recipients, left alone.
    @ivar delivering: C{False}: delivery is off, nothing will be sent.
    """

    messages: int
    recipients: int
    held: int
    delivering: bool


class ControlClient:
    """
    The control commands, called over a connected AMP protocol. Each method
    fails with L{NoSuchMessageError}, L{QueueClosedError} or C{OSError} as
    the daemon raised them, or with an AMP or connection error.
    """

    def __init__(self, protocol: ControlConnection) -> None:
        self.protocol = protocol

    def list_queue(self) -> Deferred[QueueListing]:
        """
        The whole queue, page after page (L{ListQueue}). Not a snapshot:
        states may change between pages.
        """
        return Deferred.fromCoroutine(self._list())

    async def _list(self) -> QueueListing:
        envelopes: list[Envelope] = []
        cursor: str | None = None
        delivering = True
        while True:
            page = await self._call(ListQueue, cursor=cursor)
            delivering = page["delivering"]
            for row in page["messages"]:
                recipients = [
                    RecipientState(
                        address=r["address"],
                        state=r["state"],
                        attempts=r["attempts"],
                        next_attempt=r["next_attempt"],
                        last_reply=r["last_reply"],
                    )
                    for r in row["recipients"]
                ]
                if envelopes and envelopes[-1].id == row["queue_id"]:
                    envelopes[-1].recipients.extend(recipients)  # continued from the last page
                    continue
                envelopes.append(
                    Envelope(
                        id=row["queue_id"],
                        sender=row["sender"],
                        recipients=recipients,
                        xverp=row["xverp"],
                        created=row["created"],
                        held=row["held"],
                        size=row["size"],
                    )
                )
            if not page["cursor"] or page["cursor"] == cursor:
                return QueueListing(envelopes, delivering)
            cursor = page["cursor"]

    async def _call(self, command: type[Command], **arguments: Any) -> dict[str, Any]:
        # Awaited at once: AMP drops the connection over an error answer that
        # finds no errback on the Deferred yet.
        response: dict[str, Any] = await self.protocol.callRemote(command, **arguments)
        return response

    def flush(self, queue_id: str | None = None) -> Deferred[FlushResult]:
        """
        Make pending recipients (of one message, or all) due now (L{Flush}).
        """
        d = Deferred.fromCoroutine(self._call(Flush, queue_id=queue_id))
        return d.addCallback(lambda r: FlushResult(**r))

    def hold(self, queue_id: str) -> Deferred[None]:
        """Put a message on hold (L{Hold})."""
        d = Deferred.fromCoroutine(self._call(Hold, queue_id=queue_id))
        return d.addCallback(lambda _: None)

    def release(self, queue_id: str) -> Deferred[None]:
        """Release a held message (L{Release})."""
        d = Deferred.fromCoroutine(self._call(Release, queue_id=queue_id))
        return d.addCallback(lambda _: None)

    def delete(self, queue_id: str) -> Deferred[int]:
        """
        Delete a message (L{Delete}).

        @return: fires with the number of recipients it still had pending.
        """
        d = Deferred.fromCoroutine(self._call(Delete, queue_id=queue_id))
        return d.addCallback(lambda r: int(r["dropped"]))

    def close(self) -> Deferred[None]:
        """
        Close the connection.

        @return: fires once it is closed.
        """
        if self.protocol.transport is not None:
            self.protocol.transport.loseConnection()
        return self.protocol.lost


def connect_control(reactor: Any, path: str, timeout: float = 10.0) -> Deferred[ControlClient]:
    """
    Connect to a daemon's control socket.

    @param timeout: seconds to wait for the connection.
    @return: fires with a L{ControlClient}; fails with
        L{twisted.internet.error.ConnectError} (no socket: C{ENOENT}; no
        daemon: L{ConnectionRefusedError<twisted.internet.error.ConnectionRefusedError>};
        C{EACCES}) when the daemon cannot be reached.
    """
    endpoint = UNIXClientEndpoint(reactor, path, timeout=timeout)
    d: Deferred[ControlConnection] = connectProtocol(endpoint, ControlConnection())
    return d.addCallback(ControlClient)
