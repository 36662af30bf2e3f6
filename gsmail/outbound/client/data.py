# -*- test-case-name: tests.outbound.test_client -*-
"""
The outbound client's DATA (RFC 5321 §4.5.2): L{DataEncoder} turns message
file bytes into the wire form (CRLF line ends, dot-stuffing across chunk
boundaries and on the first line, the final dot); L{_DataSender} streams a
queue file through it as a pull producer, one chunk in memory at a time; a
small message is read whole (L{_read_small}) and written in one go.

Not here: when DATA is sent and what its replies mean
(L{gsmail.outbound.client.SMTPConnection}), the transport and its timers
(L{gsmail.outbound.client.protocol}).
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPullProducer
from zope.interface import implementer

from gsmail.outbound.client.replies import SMTPClientError, _RawReply

if TYPE_CHECKING:
    from gsmail.outbound.client.protocol import _ClientProtocol

__all__ = ["CHUNK_SIZE", "DataEncoder"]

#: Bytes read from the message file per chunk (one transport write each).
CHUNK_SIZE: Final = 64 * 1024


class DataEncoder:
    """
    Turns message file bytes into SMTP DATA (RFC 5321 §4.5.2, §2.3.8), chunk
    by chunk, with the state that Twisted's encoder lacks: every line end
    (LF, CRLF, or a bare CR, which may not be sent) becomes CRLF, and a line
    starting with "." gets another ".", wherever the chunk boundaries fall
    (a CR at the end of a chunk is held back until the next one shows whether
    an LF follows it). L{finish} adds a CRLF if the message did not end with
    a line end, then the terminating C{.CRLF}.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._held_cr = False

    def encode(self, chunk: bytes) -> bytes:
        """The wire bytes for the next chunk of the file (maybe C{b""})."""
        if self._held_cr:
            chunk = b"\r" + chunk
        self._held_cr = chunk.endswith(b"\r")
        if self._held_cr:
            chunk = chunk[:-1]
        if not chunk:
            return b""
        out = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        out = out.replace(b"\n.", b"\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = out.endswith(b"\n")
        return out

    def finish(self) -> bytes:
        """The end of the data: a last CRLF if needed, then C{.CRLF}."""
        end = b"\r\n" if self._held_cr or not self._at_line_start else b""
        self._held_cr = False
        self._at_line_start = True
        return end + b".\r\n"


class _EarlyReply(Exception):
    """The server replied while message data was still being sent."""

    def __init__(self, reply: _RawReply) -> None:
        super().__init__(reply.code)
        self.reply = reply


@implementer(IPullProducer)
class _DataSender:
    """
    Streams one message file into the transport as a pull producer: a chunk
    is read only when the transport has sent the previous one (back-pressure),
    so memory stays at one chunk whatever the message size. Reads are single
    C{read(2)} calls of at most L{CHUNK_SIZE} bytes on a local file, as
    Twisted's own C{FileSender} does, so they stay in the reactor thread.

    @ivar done: fires when the final dot has been written, or fails with
        L{SMTPClientError} or L{_EarlyReply}.
    """

    def __init__(
        self,
        protocol: _ClientProtocol,
        file: IO[bytes],
        size: int,
        chunk_size: int,
        block_timeout: float,
    ) -> None:
        self._protocol = protocol
        self._file = file
        self._size = size
        self._read = 0
        self._chunk_size = chunk_size
        self._block_timeout = block_timeout
        self._encoder = DataEncoder()
        self._timer: IDelayedCall | None = None
        self._finished = False
        self.done: Deferred[None] = Deferred()

    def start(self) -> None:
        self._arm()
        self._protocol.transport.registerProducer(self, False)

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._block_timeout)
        else:
            self._timer = self._protocol.clock.callLater(
                self._block_timeout,
                self._protocol.timed_out,
                "the server to take message data",
            )

    def resumeProducing(self) -> None:
        if self._finished:
            return
        try:
            chunk = self._file.read(self._chunk_size)
        except OSError as e:
            # Never end the data with a dot after a failed read: that would
            # deliver a truncated message. The caller aborts the connection.
            self.abort(
                SMTPClientError(
                    f"could not read the message file: {e.strerror}",
                    transient=True,
                    enhanced="4.3.0",
                )
            )
            return
        transport = self._protocol.transport
        if chunk:
            self._read += len(chunk)
            self._arm()
            transport.write(self._encoder.encode(chunk))
            return
        if self._read != self._size:
            # The queue file changed under us (truncated, rewritten): sending
            # the dot now could deliver a damaged message.
            self.abort(
                SMTPClientError(
                    f"the message file has {self._read} bytes, expected {self._size}",
                    transient=True,
                    enhanced="4.3.0",
                )
            )
            return
        self._protocol.after_data = True
        transport.write(self._encoder.finish())
        self._finish(unregister=True)
        self._protocol.sender = None
        self.done.callback(None)

    def stopProducing(self) -> None:
        # The transport is going away; its connectionLost then calls abort()
        # with the reason.
        if not self._finished:
            self._finish(unregister=False)

    def abort(self, reason: Exception) -> None:
        """Stop sending (early reply, timeout, read error, lost connection)."""
        if not self._finished:
            self._finish(unregister=True)
        self._protocol.sender = None
        if not self.done.called:
            self.done.errback(reason)

    def _finish(self, unregister: bool) -> None:
        self._finished = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._file.close()
        if unregister:
            self._protocol.transport.unregisterProducer()


def _read_small(file: IO[bytes], size: int) -> bytes:
    """
    Read a small message file whole and encode it as DATA, final dot
    included.

    @param size: the bytes the file must hold.
    @raise SMTPClientError: it cannot be read or does not hold C{size} bytes
        (C{4.3.0}, transient: no dot may follow a damaged message).
    """
    parts = []
    total = 0
    try:
        while total <= size:
            chunk = file.read(size + 1 - total)
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
    except OSError as e:
        raise SMTPClientError(
            f"could not read the message file: {e.strerror}", transient=True, enhanced="4.3.0"
        ) from None
    if total != size:
        raise SMTPClientError(
            f"the message file has {'more than ' if total > size else ''}{total} bytes,"
            f" expected {size}",
            transient=True,
            enhanced="4.3.0",
        )
    encoder = DataEncoder()
    return encoder.encode(b"".join(parts)) + encoder.finish()
