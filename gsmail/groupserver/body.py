# -*- test-case-name: tests.test_groupserver -*-
"""
The request body of a GroupServer page: L{MultipartBody}, a
C{multipart/form-data} producer (RFC 7578) that streams a message from its
spool file as base64, in chunks, with an exact C{Content-Length}; and
L{SpoolReadError}, its failure when the spool file cannot be read.

Not here: sending the body and reading the answer
(L{gsmail.groupserver.GroupServerClient}), the connections
(L{gsmail.groupserver.http}), what a failure means for the sender
(L{gsmail.groupserver.errors}). L{gsmail.groupserver} re-exports the public
names; other modules import them from there.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable, Generator, Sequence
from typing import IO, Any, Final

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import CooperativeTask, Cooperator, TaskFinished, TaskStopped
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from gsmail.interfaces import MessageSource

__all__ = ["CHUNK_SIZE", "MultipartBody", "SpoolReadError"]

#: Bytes of the raw message read and encoded per step: a multiple of 3, so
#: each chunk base64-encodes on its own, without padding in the middle.
CHUNK_SIZE: Final = 3 * 2**16

_MESSAGE_FIELD: Final = "form.emailMessage"


class SpoolReadError(Exception):
    """
    The spool file of a message could not be read, or had fewer bytes than
    L{MessageSource.size} said. Nothing was posted.
    """


@implementer(IBodyProducer)
class MultipartBody:
    """
    A C{multipart/form-data} request body (RFC 7578) of text fields and, if
    a message is given, a last field holding the base64 of the raw message
    (C{prefix} then the first C{size} bytes of the spool file), encoded on
    the fly without line breaks.

    The C{length} (bytes) is exact and known before producing, so the
    request has a C{Content-Length} and is never chunked. The spool file is
    read in chunks of C{chunk_size} bytes, one per cooperator step; the
    file is opened on the first step and closed when the body is complete,
    fails, or is stopped. Reading a chunk of an already-written spool file
    is quick enough for the reactor thread; memory stays at a few chunks
    whatever the message size. A message of at most C{chunk_size} bytes
    whose bytes the spool kept in memory (C{message.data}) is written in
    one go.

    @ivar boundary: the multipart boundary: C{gsmail-} and 32 random hex
        digits. Delimiter lines start with C{--}, which never occurs in
        base64, so the message part cannot contain one; a boundary found in
        a field value is drawn again.
    @ivar content_type: the value of the C{Content-Type} request header.
    @ivar length: the exact body length in bytes.
    @ivar complete: C{True} once every byte was handed to the consumer: from
        then on the server may have the whole request.
    """

    def __init__(
        self,
        fields: Sequence[tuple[str, str]],
        message: MessageSource | None = None,
        *,
        cooperator: Cooperator | None = None,
        message_field: str = _MESSAGE_FIELD,
        chunk_size: int = CHUNK_SIZE,
        on_complete: Callable[[], None] | None = None,
    ) -> None:
        """
        @param fields: C{(name, value)} pairs, sent in this order before the
            message; values are encoded as UTF-8.
        @param message: the message for the last field, or C{None}.
        @param cooperator: runs the steps that read and write the message;
            required when C{message} is given.
        @param message_field: the name of the message field.
        @param chunk_size: bytes of raw message per step, a positive multiple
            of 3.
        @param on_complete: called once when the last byte was written.
        @raise ValueError: C{chunk_size} is not a positive multiple of 3, or a
            message is given without a cooperator.
        """
        if chunk_size <= 0 or chunk_size % 3:
            raise ValueError("chunk_size must be a positive multiple of 3")
        if message is not None and cooperator is None:
            raise ValueError("a cooperator is needed to stream a message")
        encoded = [(name.encode("utf-8"), value.encode("utf-8")) for name, value in fields]
        boundary = _new_boundary()
        while any(boundary in v or boundary in n for n, v in encoded):
            boundary = _new_boundary()  # pragma: no cover - 128 random bits
        self.boundary = boundary.decode("ascii")
        self.content_type = b"multipart/form-data; boundary=" + boundary
        self.complete = False
        self._message = message
        self._cooperator = cooperator
        self._chunk_size = chunk_size
        self._on_complete = on_complete
        head = b"".join(_part_header(boundary, n) + v + b"\r\n" for n, v in encoded)
        if message is not None:
            head += _part_header(boundary, message_field.encode("utf-8"))
            self._tail = b"\r\n--" + boundary + b"--\r\n"
            encoded_length = 4 * ((message.length + 2) // 3)
        else:
            self._tail = b"--" + boundary + b"--\r\n"
            encoded_length = 0
        self._head = head
        self.length = len(head) + encoded_length + len(self._tail)
        self._task: CooperativeTask[Any] | None = None
        self._steps: Generator[None, None, None] | None = None
        self._file: IO[bytes] | None = None
        self._stopped = False
        self._running = False

    def __repr__(self) -> str:
        # Never the field values: one of them is the token.
        return f"<MultipartBody length={self.length}>"

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """
        Write the body to C{consumer}.

        @return: fires when all was written; fails with L{SpoolReadError}
            when the spool file cannot be read or is too short; never fires
            after L{stopProducing} (as L{IBodyProducer} requires).
        """
        if self._message is None:
            consumer.write(self._head + self._tail)
            self._mark_complete()
            return succeed(None)
        data = self._message.data
        if data is not None and self._message.length <= self._chunk_size:
            # Small and in memory: one write, no file, no cooperator steps.
            encoded = base64.b64encode(self._message.prefix + data[: self._message.size])
            consumer.write(self._head + encoded + self._tail)
            if self._stopped:  # the connection was lost during the write
                return Deferred()
            self._mark_complete()
            return succeed(None)
        assert self._cooperator is not None
        self._steps = self._produce(consumer, self._message)
        self._task = self._cooperator.cooperate(self._steps)
        done: Deferred[Any] = self._task.whenDone()

        def finished(result: object) -> Deferred[None] | None:
            if isinstance(result, Failure):
                if result.check(TaskStopped):  # type: ignore[no-untyped-call]
                    return Deferred()
                return result  # type: ignore[return-value]  # re-raised by the chain
            return None

        return done.addBoth(finished)

    def pauseProducing(self) -> None:
        """Stop reading and writing until L{resumeProducing}."""
        if self._task is not None:
            try:
                self._task.pause()
            except TaskFinished:
                pass

    def resumeProducing(self) -> None:
        """Go on after L{pauseProducing}."""
        if self._task is not None:
            try:
                self._task.resume()
            except TaskFinished:
                pass

    def stopProducing(self) -> None:
        """
        Give up: the request will not be sent whole. Closes the spool file.
        """
        self._stopped = True
        if self._task is not None:
            try:
                self._task.stop()
            except TaskFinished:
                pass
        self._close_file()
        if self._steps is not None and not self._running:
            self._steps.close()

    def _produce(self, consumer: IConsumer, message: MessageSource) -> Generator[None, None, None]:
        """
        The steps of L{startProducing}: one chunk read, encoded and written
        per step.
        """
        # After every write: stopProducing may have been called from inside
        # it (connection lost). A stopped task is never resumed, and must
        # not end (StopIteration) as if it had completed, so it yields.
        self._running = True
        try:
            consumer.write(self._head)
            if self._stopped:
                self._running = False
                yield None
            pending = message.prefix
            left = message.size  # bytes of the file still to read
            try:
                self._file = open(message.path, "rb")  # noqa: SIM115 - closed by _close_file
            except OSError as e:
                raise SpoolReadError(f"cannot open the spool file: {e.strerror}") from None
            while pending or left:
                # Fill a whole chunk (except the last) so that every chunk
                # encodes to base64 on its own.
                parts = [pending[: self._chunk_size]]
                pending = pending[self._chunk_size :]
                have = len(parts[0])
                while have < self._chunk_size and left:
                    try:
                        data = self._file.read(min(self._chunk_size - have, left))
                    except OSError as e:
                        raise SpoolReadError(f"cannot read the spool file: {e.strerror}") from None
                    if not data:
                        raise SpoolReadError(
                            f"the spool file ended {left} bytes before the message did"
                        )
                    parts.append(data)
                    have += len(data)
                    left -= len(data)
                consumer.write(base64.b64encode(b"".join(parts)))
                self._running = False
                yield None
                self._running = True
            self._close_file()
            consumer.write(self._tail)
            if self._stopped:
                self._running = False
                yield None
            self._mark_complete()
        finally:
            self._running = False
            self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _mark_complete(self) -> None:
        self.complete = True
        if self._on_complete is not None:
            self._on_complete()


def _new_boundary() -> bytes:
    # Unique, not secret (see MultipartBody: base64 and the fields are
    # checked), so no getrandom call per request.
    return b"gsmail-%032x" % random.getrandbits(128)


def _part_header(boundary: bytes, name: bytes) -> bytes:
    return b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name + b'"\r\n\r\n'
