# -*- test-case-name: tests.test_standin -*-
"""
The post id GroupServer gives an email message, for the stand-in's
"already archived" check (L{gsmail.standin}).

GroupServer archives a message once: C{XWFMailingList.processMail}
(C{groupserver/Products.XWFMailingListManager},
C{Products/XWFMailingListManager/XWFMailingList.py}) first asks whether a
post with the message's post id exists and, if so, logs "has already been
archived" and adds nothing. The id is C{EmailMessage.post_id}
(C{groupserver/gs.group.list.base}, C{gs/group/list/base/emailmessage.py}):

    topic_id = b62(md5(compressed_subject + ":" + group_id + ":" + site_id))
    post_id  = b62(md5(topic_id + ":" + subject + ":" + hex(md5(body))
                       + ":" + sender + ":" + In-Reply-To
                       + ":" + str(total length of the payloads)))

where C{b62} is C{gs.core.convert_int2b62} (C{groupserver/gs.core},
C{gs/core/identifiers.py}: digits, then lower-case, then upper-case
letters), C{subject} the C{Subject} without the C{[list title]}, C{Re:} and
C{Fwd:}, with whitespace runs made one space; C{compressed_subject} that
without any whitespace, lower-cased; C{body} the first text part that is
not HTML and has no file name (else the HTML part made plain text); C{sender}
the C{From} address, lower-cased; the payload lengths those of every leaf
part after its transfer decoding. No date, Message-ID or trace header takes
part. This module computes it the same way with Python 3's C{email}
package (policy C{compat32}, as GroupServer's Python 2 parser).

Where Python 2 GroupServer would fail (an unknown charset, a non-ASCII byte
in C{From} or C{In-Reply-To}, a hexadecimal character reference in an
HTML-only body) this code goes on with a fallback instead, so those messages
get an id here while GroupServer answers its error page; an RFC 2231 charset
is collapsed rather than failing. Python 3's C{TextWrapper} and
C{HTMLParser}, used for HTML-only bodies, may differ from Python 2's in
corner cases.

A message over L{PARSE_LIMIT} bytes is not parsed (the C{email} package
holds a whole message in memory): its id uses the same headers, the MD5 of
the raw bytes after the header block for the body's, and the length of
those bytes for the payloads' (L{PostIdentity.exact} is then C{False}).
"""

from __future__ import annotations

import binascii
import codecs
import email
import email.errors
import email.parser
import email.quoprimime
import email.utils
import hashlib
import html.entities
import inspect
import os
import quopri
import re
import string
import textwrap
from email.message import Message
from email.policy import compat32
from html.parser import HTMLParser
from typing import IO, Final

import attrs

__all__ = ["PARSE_LIMIT", "PostIdentity", "compute_post_id", "post_id_of_message", "to_b62"]

#: Messages up to this many bytes are parsed whole with the C{email}
#: package; larger ones get the streaming approximation (see the module).
PARSE_LIMIT: Final = 32 * 1024 * 1024
#: The most bytes of a header block read for a message over the limit.
_HEADER_LIMIT: Final = 1024 * 1024
_READ_SIZE: Final = 1024 * 1024

_B62: Final = string.digits + string.ascii_lowercase + string.ascii_uppercase

# emailmessage.py's expressions. Python 2 compiled them without re.UNICODE,
# so \s there means ASCII whitespace only: re.ASCII keeps that.
_RE: Final = re.compile("re:", re.IGNORECASE)
_FWD: Final = re.compile("fwd?:", re.IGNORECASE)
_BRACKETS: Final = re.compile(r"^\[(.*)\]$", re.IGNORECASE)
_PARAGRAPH_SEPARATORS: Final = re.compile("[\u2028\u2029]+")
_SPACES: Final = re.compile(r"\s+", re.ASCII)
_ANNOYING: Final = string.whitespace + "\ufff9\ufffa\ufffb\ufffc\ufeff"
_ANNOYING_LEFT: Final = _ANNOYING + "\u202a\u202d"
_ANNOYING_RIGHT: Final = _ANNOYING + "\u202b\u202e"

# Python 2's email.header.ecre: an encoded word ends before whitespace or
# the end of a line.
_ENCODED_WORD: Final = re.compile(
    r"=\?(?P<charset>[^?]*?)\?(?P<encoding>[qb])\?(?P<encoded>.*?)\?=(?=[ \t]|$)",
    re.IGNORECASE | re.MULTILINE,
)
_UUENCODED: Final = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})

_PARSEADDR_LENIENT: Final = "strict" in inspect.signature(email.utils.parseaddr).parameters


@attrs.frozen
class PostIdentity:
    """
    The identifiers GroupServer gives a message.

    @ivar post_id: C{EmailMessage.post_id}, base 62.
    @ivar topic_id: C{EmailMessage.topic_id}, base 62.
    @ivar exact: C{False} when the message was over L{PARSE_LIMIT} and the
        ids are the streaming approximation.
    """

    post_id: str
    topic_id: str
    exact: bool = True


def to_b62(number: int) -> str:
    """
    C{number} (≥ 0) in base 62 as C{gs.core.convert_int2b62} writes it:
    most significant digit first, digits C{0-9a-zA-Z}.
    """
    digits = []
    while True:
        number, rest = divmod(number, 62)
        digits.append(_B62[rest])
        if not number:
            return "".join(reversed(digits))


def _md5_b62(text: str) -> str:
    return to_b62(int(hashlib.md5(_bytes(text)).hexdigest(), 16))


def _bytes(text: str) -> bytes:
    # Header values parsed from bytes carry undecodable bytes as surrogates;
    # they go back into the hash as the bytes they were.
    return text.encode("utf-8", "surrogateescape")


def compute_post_id(path: str, group_id: str, site_id: str, list_title: str) -> PostIdentity:
    """
    The post id of the message stored at C{path} when it is added to the
    group C{group_id} of the site C{site_id} whose list title is
    C{list_title}. Reads the file; call it in a thread.

    @param path: the raw message (as the add-email page decoded it).
    @return: its L{PostIdentity}; never raises for a message's content.
    @raise OSError: the file cannot be read.
    """
    if os.path.getsize(path) <= PARSE_LIMIT:
        with open(path, "rb") as f:
            message = email.message_from_binary_file(f, policy=compat32)
        return post_id_of_message(message, group_id, site_id, list_title)
    return _post_id_streaming(path, group_id, site_id, list_title)


def post_id_of_message(
    message: Message, group_id: str, site_id: str, list_title: str
) -> PostIdentity:
    """
    The post id of a parsed message (policy C{compat32}); see
    L{compute_post_id}.
    """
    subject = _subject(_header_text(message.get("Subject", "")), list_title)
    topic_id = _topic_id(subject, group_id, site_id)
    parts = _payloads(message)
    total = sum(len(p.payload) for p in parts)
    body_md5 = hashlib.md5(_body(parts, _message_encoding(message)).encode("utf-8")).hexdigest()
    return PostIdentity(_post_id(topic_id, subject, body_md5, message, total), topic_id)


def _topic_id(subject: str, group_id: str, site_id: str) -> str:
    compressed = _SPACES.sub("", subject).lower()
    return _md5_b62(f"{compressed}:{group_id}:{site_id}")


def _post_id(topic_id: str, subject: str, body_md5: str, headers: Message, total: int) -> str:
    raw_from = headers.get("From")
    sender = _address(str(raw_from)).lower() if raw_from else ""
    in_reply_to = str(headers.get("in-reply-to", ""))
    return _md5_b62(f"{topic_id}:{subject}:{body_md5}:{sender}:{in_reply_to}:{total}")


def _address(value: str) -> str:
    # Python 2's parseaddr was lenient; newer Python 3 releases are strict
    # unless told otherwise.
    if _PARSEADDR_LENIENT:
        return email.utils.parseaddr(value, strict=False)[1]  # type: ignore[call-arg]
    return email.utils.parseaddr(value)[1]


# -- the subject --------------------------------------------------------------


def _header_text(value: object) -> str:
    """
    A header's value as C{EmailMessage.get} makes it: the parts Python 2's
    C{decode_header} finds, each decoded, joined by a space.
    """
    text = str(value)
    return " ".join(_decode_word(raw, charset) for raw, charset in _decode_header(text))


def _decode_header(text: str) -> list[tuple[bytes, str | None]]:
    """Python 2's C{email.header.decode_header}, bytes for Python 2's str."""
    if not _ENCODED_WORD.search(text):
        return [(_raw(text), None)]
    decoded: list[tuple[bytes, str | None]] = []
    for line in text.splitlines():
        if not _ENCODED_WORD.search(line):
            decoded.append((_raw(line), None))
            continue
        position = 0
        for word in _ENCODED_WORD.finditer(line):
            _append_plain(decoded, line[position : word.start()])
            position = word.end()
            charset = word.group("charset").lower()
            encoded = word.group("encoded")
            if word.group("encoding").lower() == "q":
                piece = _latin1(email.quoprimime.header_decode(encoded))
            else:
                encoded += "==="[: (4 - len(encoded) % 4) % 4]
                try:
                    piece = binascii.a2b_base64(_raw(encoded))
                except binascii.Error:
                    # Python 2 raised HeaderParseError here (GroupServer:
                    # an error page); keep the word as it is.
                    piece = _raw(encoded)
            if decoded and decoded[-1][1] == charset:
                decoded[-1] = (decoded[-1][0] + piece, charset)
            else:
                decoded.append((piece, charset))
        _append_plain(decoded, line[position:])
    return decoded


def _append_plain(decoded: list[tuple[bytes, str | None]], text: str) -> None:
    plain = _raw(text.strip())
    if not plain:
        return
    if decoded and decoded[-1][1] is None:
        decoded[-1] = (decoded[-1][0] + b" " + plain, None)
    else:
        decoded.append((plain, None))


def _raw(text: str) -> bytes:
    # A Python 2 str: the bytes the header had (surrogates from parsing
    # bytes), non-ASCII text as UTF-8.
    return text.encode("utf-8", "surrogateescape")


def _latin1(text: str) -> bytes:
    # quoprimime.header_decode gives each =XX byte as the character U+00XX.
    try:
        return text.encode("latin-1", "surrogateescape")
    except UnicodeEncodeError:
        return _raw(text)


def _decode_word(raw: bytes, charset: str | None) -> str:
    """C{EmailMessage.decode_header_value_tuple}: UTF-8 unless told, else ASCII dropping the rest."""
    try:
        return raw.decode(charset or "utf-8")
    except (UnicodeDecodeError, LookupError):
        # An unknown charset made GroupServer fail; ASCII is its own fallback.
        return raw.decode("ascii", "ignore")


def _subject(subject: str, list_title: str) -> str:
    """C{EmailMessage.strip_subject}: the subject as GroupServer stores it."""
    if list_title:
        subject = re.sub(r"\[" + re.escape(list_title) + r"\]", "", subject).strip()
    subject = _strip_brackets(subject)
    subject = _PARAGRAPH_SEPARATORS.sub(" ", subject)
    subject = _FWD.sub("", _RE.sub("", subject)).strip()
    subject = subject.lstrip(_ANNOYING_LEFT).rstrip(_ANNOYING_RIGHT)
    subject = _strip_brackets(subject)
    subject = _SPACES.sub(" ", subject).strip()
    return subject or "No subject"


def _strip_brackets(subject: str) -> str:
    found = _BRACKETS.match(subject)
    return found.group(1).strip() if found is not None else subject


# -- the payloads and the body ---------------------------------------------------


@attrs.frozen
class _Payload:
    """One entry of C{EmailMessage.attachments}, the parts the id needs."""

    payload: bytes
    filename: str
    subtype: str
    charset: str | None


def _message_encoding(message: Message) -> str:
    """C{EmailMessage.encoding}: the message's charset if Python knows it, else UTF-8."""
    charset = _param_text(message.get_param("charset", "utf-8"))
    if charset.lower() == "macintosh":
        charset = "mac_roman"
    try:
        codecs.lookup(charset)
    except LookupError:
        return "utf-8"
    return charset


def _param_text(value: object) -> str:
    if isinstance(value, tuple):  # RFC 2231
        return str(email.utils.collapse_rfc2231_value(value))
    return str(value)


def _payloads(message: Message) -> list[_Payload]:
    """C{EmailMessage.attachments}: every leaf part, transfer-decoded."""
    encoding = _message_encoding(message)
    if not message.is_multipart():
        charset = message.get_content_charset(encoding)
        return [_payload_of(message, charset)]
    found = []
    for leaf in _leaves(message):
        leaf_charset: str | None = None
        if leaf.get_content_maintype() == "text":
            leaf_charset = _param_text(leaf.get_param("charset", encoding))
            if leaf_charset == "None":
                leaf_charset = "utf-8"
        found.append(_payload_of(leaf, leaf_charset))
    return found


def _leaves(message: Message) -> list[Message]:
    # The top message's parts and theirs, depth first (split_multipart):
    # message/rfc822 parts count as multipart, as in the email package.
    found: list[Message] = []
    payload: list[Message] = message.get_payload()  # type: ignore[assignment]
    todo = list(reversed(payload))
    while todo:
        part = todo.pop()
        if part.is_multipart():
            todo.extend(reversed(part.get_payload()))  # type: ignore[arg-type]
        else:
            found.append(part)
    return found


def _payload_of(part: Message, charset: str | None) -> _Payload:
    filename = ""
    if part.get("Content-Disposition", ""):
        filename = str(part.get_filename("") or "")
    return _Payload(_transfer_decoded(part), filename, part.get_content_subtype(), charset)


def _transfer_decoded(part: Message) -> bytes:
    """
    A leaf's payload as Python 2's C{get_payload(decode=True)} (or, for
    C{8bit}, C{decode=False}) gives it: the raw bytes, decoded when the
    transfer encoding is one Python knows, the raw bytes again when that
    fails.
    """
    # The payload as parsed, not get_payload()'s: for a part with 8-bit
    # bytes that decodes with the part's charset, not what Python 2 did.
    payload = getattr(part, "_payload", None)
    if not isinstance(payload, str):
        return b""
    raw = _raw(payload)
    transfer = str(part.get("content-transfer-encoding", "")).lower()
    if transfer == "quoted-printable":
        return quopri.decodestring(raw)
    if transfer == "base64":
        try:
            return binascii.a2b_base64(raw)
        except binascii.Error:
            return raw
    if transfer in _UUENCODED:
        return _uudecode(raw)
    return raw


def _uudecode(raw: bytes) -> bytes:
    """Python 2's C{uu.decode} as the email package used it; the raw bytes when no begin line."""
    lines = raw.split(b"\n")
    begins = [i for i, line in enumerate(lines) if line.startswith(b"begin")]
    if not begins:
        return raw
    out = bytearray()
    for line in lines[begins[0] + 1 :]:
        if not line or line.strip() == b"end":
            break
        try:
            out += binascii.a2b_uu(line)
        except binascii.Error:
            # Workaround for broken uuencoders, as the uu module had it.
            size = (((line[0] - 32) & 63) * 4 + 5) // 3
            try:
                out += binascii.a2b_uu(line[:size])
            except binascii.Error:
                return raw
    return bytes(out)


def _text_of(part: _Payload, charset: str | None) -> str:
    charset = charset if charset not in (None, "None") else "utf-8"
    try:
        return part.payload.decode(charset or "utf-8")
    except (UnicodeDecodeError, LookupError):
        return part.payload.decode("utf-8", "ignore")


def _body(parts: list[_Payload], encoding: str) -> str:
    """C{EmailMessage.body}: the first plain part, else the HTML part as text."""
    for part in parts:
        if part.filename == "" and part.subtype != "html":
            text = _text_of(part, part.charset if part.charset is not None else "utf-8")
            if text:
                return text
            break
    html_body = ""
    for part in parts:
        if part.filename == "" and part.subtype == "html":
            html_body = _text_of(part, part.charset)
    return _html_to_text(html_body).strip() if html_body else ""


class _HTMLText(HTMLParser):
    """
    HTML to plain text as C{gs.group.list.base}'s C{html2txt.HTMLConverter}
    does it: the text of the elements, each paragraph's whitespace made one
    space and wrapped at 74 columns, a link's C{href} after its text (unless
    the same), then runs of blank lines made one.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self._wrapper = textwrap.TextWrapper(width=74)
        self.text = ""
        self._paragraph: str | None = None
        self._hrefs: list[str] = []
        self._last = ""

    def _emit(self, text: str) -> None:
        if self._paragraph is None:
            self.text += text
        else:
            self._paragraph += text

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._hrefs.append(dict(attrs).get("href") or "")
        elif tag == "p":
            self._paragraph = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._hrefs:
            href = self._hrefs.pop()
            if href and href != self._last:
                self._emit(f" <{href}> ")
        elif tag == "p":
            paragraph = _SPACES.sub(" ", self._paragraph or "")
            self._paragraph = None
            self._emit(self._wrapper.fill(paragraph).lstrip() + "\n\n")

    def handle_charref(self, name: str) -> None:
        try:
            code = int(name[1:], 16) if name[:1] in "xX" else int(name)
            self._emit(chr(code))
        except (ValueError, OverflowError):
            pass  # GroupServer failed on these

    def handle_entityref(self, name: str) -> None:
        code = html.entities.name2codepoint.get(name)
        if code is not None:
            self._emit(chr(code))

    def handle_data(self, data: str) -> None:
        text = data if data.strip() else "\n"
        self._last = text
        self._emit(text)


def _html_to_text(markup: str) -> str:
    converter = _HTMLText()
    converter.feed(markup)
    converter.close()
    return re.sub(r"\s+\n\n+", "\n\n", converter.text, flags=re.ASCII).strip()


# -- messages over the parse limit ----------------------------------------------


def _post_id_streaming(path: str, group_id: str, site_id: str, list_title: str) -> PostIdentity:
    with open(path, "rb") as f:
        head = _header_block(f)
        headers = email.parser.BytesHeaderParser(policy=compat32).parsebytes(head)
        body_md5 = hashlib.md5()
        size = 0
        for block in iter(lambda: f.read(_READ_SIZE), b""):
            body_md5.update(block)
            size += len(block)
    subject = _subject(_header_text(headers.get("Subject", "")), list_title)
    topic_id = _topic_id(subject, group_id, site_id)
    post_id = _post_id(topic_id, subject, body_md5.hexdigest(), headers, size)
    return PostIdentity(post_id, topic_id, exact=False)


def _header_block(f: IO[bytes]) -> bytes:
    """The lines up to and including the first empty one; C{f} is left after it."""
    lines = []
    size = 0
    while size <= _HEADER_LIMIT:
        line = f.readline(_HEADER_LIMIT + 1 - size)
        lines.append(line)
        size += len(line)
        if line in (b"", b"\n", b"\r\n"):
            break
    return b"".join(lines)
