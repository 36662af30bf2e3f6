# -*- test-case-name: tests.test_standin -*-
"""
The stand-in's form parser: a request's fields as Zope merges them (the
query string, a C{multipart/form-data} or URL-encoded body), streamed, with
the message field decoded from base64 into a staging file as Python 2's
C{base64.b64decode} decodes it (L{_Base64Writer}), or kept as text when that
fails, as GroupServer's add-email page does. Runs in a thread when the
stand-in has one.

Not what the pages do with the form (L{gsmail.standin.actions}) nor the HTTP
request it comes from (L{gsmail.standin.http}).
"""

from __future__ import annotations

import binascii
import io
import os
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Final
from urllib.parse import parse_qsl

import attrs
import multipart

from gsmail.standin.postid import PostIdentity

_MESSAGE_FIELD: Final = "form.emailMessage"
_MESSAGE_PAGES: Final = frozenset({"add", "relay"})

#: The longest value, in bytes, kept for a field other than the message.
FIELD_LIMIT: Final = 64 * 1024
#: The longest URL-encoded body read, in bytes.
URLENCODED_LIMIT: Final = 64 * 1024 * 1024
#: Bytes read from the spooled request body at a time.
_READ_SIZE: Final = 64 * 1024
_MAX_PARTS: Final = 64


class _MalformedBody(Exception):
    """The body claims to be a form but cannot be parsed (or is over a limit)."""


@attrs.define
class _Form:
    """
    A form submission: the request's fields, query string and body merged.

    @ivar fields: every field but the message, decoded as UTF-8.
    @ivar message_path: the file the message was decoded into, or C{None}
        when the request had no message field.
    @ivar message_size: the length in bytes of that file.
    @ivar message_raw_size: the length of the field as sent (0: empty).
    @ivar raw_text: the field was not base64 and the file holds its text,
        as GroupServer then adds it.
    @ivar identity: the message's post id, computed with the parsing for a
        message to a known group (add-email page), else C{None}.
    """

    fields: dict[str, str] = attrs.Factory(dict)
    message_path: str | None = None
    message_size: int = 0
    message_raw_size: int = 0
    raw_text: bool = False
    identity: PostIdentity | None = None

    def discard(self) -> None:
        """Remove the decoded message, if any: it is not to be stored."""
        if self.message_path is not None:
            try:
                os.unlink(self.message_path)
            except FileNotFoundError:
                pass
            self.message_path = None


_B64_DELETE: Final = bytes(
    c for c in range(256) if not (chr(c).isascii() and (chr(c).isalnum() or chr(c) in "+/="))
)


class _Base64Writer:
    """
    Decode base64 text arriving in arbitrary pieces into C{out} as Python
    2's C{binascii.a2b_base64} (behind GroupServer's C{base64.b64decode})
    does: characters outside the alphabet are skipped; a complete pad
    sequence ends the data (what follows is ignored); a stray C{=} is
    skipped; data that ends inside a group of four is an error ("Incorrect
    padding"), after which GroupServer uses the text as it is.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._carry = b""
        self._pending_pad = False
        self._done = False
        self.size = 0
        self.raw_size = 0
        self.error: str | None = None

    def write(self, chunk: bytes) -> None:
        self.raw_size += len(chunk)
        if self._done:
            return
        data = chunk.translate(None, _B64_DELETE)
        at = 0
        while at < len(data):
            if self._pending_pad:
                # The character after an "=" that followed two of a group.
                self._pending_pad = False
                if data[at : at + 1] == b"=":
                    self._done = True
                    return
            pad = data.find(b"=", at)
            if pad < 0:
                self._feed(data[at:])
                return
            self._feed(data[at:pad])
            filled = len(self._carry)
            if filled == 3:
                self._done = True
                return
            if filled == 2:
                if pad + 1 < len(data):
                    if data[pad + 1 : pad + 2] == b"=":
                        self._done = True
                        return
                else:
                    self._pending_pad = True
            at = pad + 1

    def _feed(self, text: bytes) -> None:
        data = self._carry + text
        usable = len(data) - len(data) % 4
        self._carry = data[usable:]
        if usable:
            decoded = binascii.a2b_base64(data[:usable])
            self._out.write(decoded)
            self.size += len(decoded)

    def finish(self) -> None:
        if self._done and self._carry:
            decoded = binascii.a2b_base64(self._carry + b"=" * (4 - len(self._carry)))
            self._out.write(decoded)
            self.size += len(decoded)
            self._carry = b""
        elif self._carry:
            self.error = "Incorrect padding"


class _Staging:
    """Where a message field is decoded to: a file named for this request."""

    def __init__(self, directory: Callable[[Mapping[str, str]], str], name: str) -> None:
        self._directory = directory
        self._name = name

    def open(self, fields: Mapping[str, str]) -> tuple[str, IO[bytes]]:
        path = os.path.join(self._directory(fields), self._name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return path, os.fdopen(fd, "wb")


def _parse_multipart(
    body: IO[bytes],
    boundary: str,
    decode_message: bool,
    staging: _Staging,
    form: _Form,
) -> None:
    """
    Parse a C{multipart/form-data} body into C{form}, streaming: runs in a
    thread when the stand-in has one. The message field (when
    C{decode_message}) is decoded into a staging file; other fields are kept
    up to L{FIELD_LIMIT} bytes; parts without a name are skipped.

    @raise _MalformedBody: the body is not valid multipart, or over a limit
        (answered 400).
    """
    out: IO[bytes] | None = None
    writer: _Base64Writer | None = None
    value: bytearray | None = None
    part_name = ""
    seen_message = False
    try:
        parser = multipart.PushMultipartParser(boundary, max_segment_count=_MAX_PARTS)
        with parser:
            for event in parser.parse_blocking(body.read, _READ_SIZE):
                if isinstance(event, multipart.MultipartSegment):
                    part_name = event.name or ""
                    if part_name == _MESSAGE_FIELD and decode_message:
                        if seen_message:
                            raise _MalformedBody("form.emailMessage given twice")
                        seen_message = True
                        form.message_path, out = staging.open(form.fields)
                        writer = _Base64Writer(out)
                    elif part_name and part_name not in form.fields:
                        value = bytearray()
                elif event is None:
                    if writer is not None and out is not None:
                        writer.finish()
                        out.close()
                        form.message_size = writer.size
                        form.message_raw_size = writer.raw_size
                        form.raw_text = writer.error is not None
                    elif value is not None:
                        form.fields[part_name] = value.decode("utf-8", "replace")
                    out, writer, value = None, None, None
                elif writer is not None:
                    writer.write(event)
                elif value is not None:
                    if len(value) + len(event) > FIELD_LIMIT:
                        raise _MalformedBody(f"{part_name} is over {FIELD_LIMIT} bytes")
                    value += event
        if form.raw_text and form.message_path is not None:
            # Not base64: a second pass copies the field's text (rare).
            body.seek(0)
            form.message_size = _copy_raw_field(body, boundary, form.message_path)
    except multipart.MultipartError as e:
        raise _MalformedBody(str(e)) from e
    finally:
        if out is not None:
            out.close()


def _copy_raw_field(body: IO[bytes], boundary: str, path: str) -> int:
    """
    Write the message field's text (CRLF made LF, as C{zope.formlib}'s
    textarea widget does) to C{path}: GroupServer adds the text when it is
    not base64.

    @return: the bytes written.
    """
    size = 0
    carry = b""
    inside = False
    parser = multipart.PushMultipartParser(boundary, max_segment_count=_MAX_PARTS)
    with parser, open(path, "wb") as out:
        for event in parser.parse_blocking(body.read, _READ_SIZE):
            if isinstance(event, multipart.MultipartSegment):
                inside = event.name == _MESSAGE_FIELD
            elif event is None:
                if inside:
                    out.write(carry)
                    size += len(carry)
                    carry = b""
                inside = False
            elif inside:
                data = (carry + event).replace(b"\r\n", b"\n")
                carry = b"\r" if data.endswith(b"\r") else b""
                data = data[: len(data) - len(carry)]
                out.write(data)
                size += len(data)
    return size


def _private_copy(content: IO[bytes]) -> IO[bytes]:
    """
    A handle on the request body that stays readable when twisted.web closes
    C{request.content} because the client went away mid-parse.
    """
    if isinstance(content, io.BytesIO):
        return io.BytesIO(content.getvalue())  # under 100 KB: twisted.web's own limit
    copy = os.fdopen(os.dup(content.fileno()), "rb")
    copy.seek(0)
    return copy


def _parse_form(
    body: IO[bytes] | None,
    content_type: str,
    query: list[tuple[str, str]],
    decode_message: bool,
    staging: _Staging,
) -> _Form:
    """
    The request's form as Zope builds it: the body's fields (multipart or
    URL-encoded), then the query string's where the body has none. Runs in
    a thread when the stand-in has one.

    @raise _MalformedBody: see L{_parse_multipart}.
    """
    form = _Form()
    try:
        ctype, options = multipart.parse_options_header(content_type)
        if body is not None and ctype == "multipart/form-data" and options.get("boundary"):
            _parse_multipart(body, options["boundary"], decode_message, staging, form)
        elif body is not None and ctype == "application/x-www-form-urlencoded":
            data = body.read(URLENCODED_LIMIT + 1)
            if len(data) > URLENCODED_LIMIT:
                raise _MalformedBody("URL-encoded body too long")
            _add_pairs(
                form,
                parse_qsl(
                    data.decode("latin-1"),
                    keep_blank_values=True,
                    encoding="utf-8",
                    errors="replace",
                ),
                decode_message,
                staging,
            )
        _add_pairs(form, query, decode_message, staging)
    except BaseException:
        form.discard()
        raise
    return form


def _add_pairs(
    form: _Form, pairs: Iterable[tuple[str, str]], decode_message: bool, staging: _Staging
) -> None:
    """Fields the form does not have yet, from (name, value) pairs."""
    for name, value in pairs:
        if name == _MESSAGE_FIELD and decode_message:
            if form.message_path is not None:
                continue
            raw = value.encode("utf-8")
            form.message_path, out = staging.open(form.fields)
            with out:
                writer = _Base64Writer(out)
                writer.write(raw)
                writer.finish()
                if writer.error is not None:
                    out.seek(0)
                    out.truncate()
                    out.write(raw.replace(b"\r\n", b"\n"))
                    form.raw_text = True
                form.message_size = out.tell()
            form.message_raw_size = len(raw)
        elif name not in form.fields:
            form.fields[name] = value
