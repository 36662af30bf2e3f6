# -*- test-case-name: tests.inbound.test_routing -*-
"""
Reading and rewriting a message file for the route actions (blocking:
call them in a thread): its header and text for the policy checks
(L{_read_message}), its header fields as raw lines (L{_header_fields}),
and the copy with an entry's header rewriting applied (L{_rewrite}).

Not the policy itself (L{gsmail.routes.policy}) nor the C{${...}}
templates (L{gsmail.routes.templates}).
"""

from __future__ import annotations

import email
import email.policy
from email.message import Message
from email.parser import BytesHeaderParser
from typing import IO

from gsmail.routes import RouteEntry, Substitutions, expand, one_line

#: Text read from a message for the word checks, in characters at most.
MAX_TEXT = 1 << 20


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
