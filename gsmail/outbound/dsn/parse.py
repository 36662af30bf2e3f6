# -*- test-case-name: tests.outbound.test_dsn,tests.test_bounces -*-
"""
Reading a delivery status notification back: the per-recipient outcomes
(C{Final-Recipient}, C{Action}, C{Status}, C{Original-Recipient}) of any
RFC 3464 C{message/delivery-status} (or RFC 6533
C{message/global-delivery-status}) part inside a C{multipart/report}. The
inbound side (L{gsmail.bounces}) uses L{parse_dsn} to tell a real failure
(C{Action: failed}, C{5.x.x}) from a delay notice before GroupServer's
bounce page hears of it.

Not here: building the reports gsmail sends (L{gsmail.outbound.dsn}).
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from collections.abc import Iterator
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Final, NamedTuple

from gsmail.outbound.dsn.params import STATUS_CODE, UTF8_ADDR_ESCAPE

__all__ = ["DSNRecipient", "parse_dsn"]


class DSNRecipient(NamedTuple):
    """
    One per-recipient block of a DSN, as L{parse_dsn} reads it.

    @ivar recipient: the C{Final-Recipient} address (decoded from the
        C{utf-8} xtext form when needed).
    @ivar action: lowercase: C{failed}, C{delayed}, C{delivered}, C{relayed}
        or C{expanded}.
    @ivar status: the RFC 3463 code, e.g. C{"5.1.1"}, or C{""} when missing
        or malformed.
    @ivar original: the C{Original-Recipient} address (the sender's C{ORCPT},
        RFC 3461 §4.2), or C{""} when the block has none.
    """

    recipient: str
    action: str
    status: str
    original: str = ""


_MAX_DEPTH: Final = 4
_MAX_PARTS: Final = 100


def _split(raw: bytes) -> tuple[Message, bytes]:
    """A part's header fields (parsed) and its body (raw bytes)."""
    if raw.startswith((b"\n", b"\r\n")):
        return Message(), raw[1:] if raw.startswith(b"\n") else raw[2:]
    end = re.search(rb"\r?\n\r?\n", raw)
    header, body = (raw, b"") if end is None else (raw[: end.start()], raw[end.end() :])
    return BytesHeaderParser(policy=compat32).parsebytes(header + b"\n\n"), body


def _subparts(body: bytes, boundary: str) -> list[bytes]:
    """The parts of a multipart body (RFC 2046 §5.1.1)."""
    delimiter = b"--" + boundary.encode("ascii", "replace")
    parts: list[bytes] = []
    current: list[bytes] | None = None
    for line in body.splitlines(keepends=True):
        bare = line.rstrip(b"\r\n").rstrip(b" \t")
        if bare == delimiter or bare == delimiter + b"--":
            if current is not None:
                parts.append(b"".join(current))
                if len(parts) >= _MAX_PARTS:
                    break
            if bare.endswith(b"--") and bare != delimiter:
                return parts
            current = []
        elif current is not None:
            current.append(line)
    if current:
        parts.append(b"".join(current))
    return parts


def _reports(raw: bytes, inside_report: bool, depth: int) -> Iterator[bytes]:
    """
    The decoded bodies of the delivery-status parts of a C{multipart/report},
    found in multipart parts only: a message/rfc822 attachment (e.g. the
    returned original of a bounce) is never searched.
    """
    headers, body = _split(raw)
    kind = headers.get_content_type()
    if kind in ("message/delivery-status", "message/global-delivery-status") and inside_report:
        encoding = str(headers.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        if encoding == "base64":
            try:
                body = base64.b64decode(b"".join(body.split()))
            except (binascii.Error, ValueError):
                return
        elif encoding == "quoted-printable":
            body = quopri.decodestring(body)
        yield body
        return
    if headers.get_content_maintype() != "multipart" or depth >= _MAX_DEPTH:
        return
    boundary = headers.get_boundary()
    if not boundary:
        return
    for part in _subparts(body, boundary):
        yield from _reports(part, kind == "multipart/report", depth + 1)


def _blocks(text: str) -> Iterator[dict[str, str]]:
    """The field blocks of a delivery-status body, names lowercased, unfolded."""
    block: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if block:
                yield block
            block, last = {}, ""
        elif line[0] in " \t" and last:
            block[last] += " " + line.strip()
        elif ":" in line:
            name, _, value = line.partition(":")
            last = name.strip().lower()
            block[last] = value.strip()
    if block:
        yield block


def _address(value: str) -> str:
    """The address of a C{type; address} field, xtext decoded for C{utf-8}."""
    kind, semicolon, address = value.partition(";")
    if not semicolon:
        kind, address = "rfc822", value
    address = address.strip().strip("<>").strip()
    if kind.strip().lower() == "utf-8":
        address = UTF8_ADDR_ESCAPE.sub(lambda m: chr(min(int(m.group(1), 16), 0x10FFFF)), address)
    return address


def parse_dsn(message: bytes) -> list[DSNRecipient]:
    """
    The per-recipient outcomes of a DSN (RFC 3464, and RFC 6533's
    C{message/global-delivery-status}), from any C{multipart/report} in the
    message's multipart structure.

    @param message: the whole message as received.
    @return: one L{DSNRecipient} per recipient block with a
        C{Final-Recipient}; empty when the message is not a DSN.
    """
    out: list[DSNRecipient] = []
    for body in _reports(message, inside_report=False, depth=0):
        text = body.decode("utf-8", "replace")
        for block in _blocks(text):
            if "final-recipient" not in block:
                continue
            action = block.get("action", "").split(" ")[0].lower()
            status = block.get("status", "").split(" ")[0]
            original = block.get("original-recipient", "")
            out.append(
                DSNRecipient(
                    _address(block["final-recipient"]),
                    action,
                    status if STATUS_CODE.match(status) else "",
                    _address(original) if original else "",
                )
            )
    return out
