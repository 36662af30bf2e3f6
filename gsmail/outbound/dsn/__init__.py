# -*- test-case-name: tests.outbound.test_dsn,tests.test_bounces -*-
"""
Delivery status notifications: building the RFC 3464 report gsmail sends to
a message's envelope sender when delivery failed, is late or (when asked
for) succeeded, and deciding whether to send one at all.

For GroupServer the envelope sender of each copy is its XVERP address
(C{group+member=domain@site}), so a DSN goes back to gsmail's own inbound
side, which hands it to GroupServer's bounce page.

The report (RFC 6522 C{multipart/report}) has three parts: a human-readable
explanation, the machine-readable C{message/delivery-status}, and the
original message's header section (or the whole message). The
delivery-status part is always 7-bit: a non-ASCII address is written with
the C{utf-8} address type in its C{utf-8-addr-xtext} form (RFC 6533 §3).

Not here: the RFC 3461 parameters that ask for a DSN (C{NOTIFY}, C{ORCPT},
C{ENVID}, C{xtext}: L{gsmail.outbound.dsn.params}, whose public names this
module also offers, as the delivery code uses them from here), and reading
a DSN back (L{gsmail.outbound.dsn.parse}).
"""

from __future__ import annotations

import datetime
import quopri
import re
import secrets
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import format_datetime
from typing import Final

import attrs
from twisted.logger import Logger

from gsmail.addresses import AddressError, parse_mailbox
from gsmail.outbound.dsn.params import (
    DEFAULT_NOTIFY,
    STATUS_CODE,
    VERP_DEFAULT_NOTIFY,
    notify_requests,
    orcpt_parameter,
    parse_envid,
    parse_notify,
    parse_orcpt,
    utf8_addr_xtext,
    xtext_decode,
    xtext_encode,
)
from gsmail.status import Reply

__all__ = [
    "FailedRecipient",
    "build_dsn",
    "should_send_dsn",
    "parse_notify",
    "notify_requests",
    "parse_orcpt",
    "orcpt_parameter",
    "parse_envid",
    "xtext_decode",
    "xtext_encode",
    "DEFAULT_NOTIFY",
    "VERP_DEFAULT_NOTIFY",
    "MAX_RETURNED_HEADERS",
    "MAX_RETURNED_MESSAGE",
]

log = Logger()

# Bounds on what is read back from the queue's copy of the original (bytes).
MAX_RETURNED_HEADERS: Final = 64 * 1024
MAX_RETURNED_MESSAGE: Final = 10 * 1024 * 1024

# A field value longer than this is cut (characters); lines are folded.
_MAX_VALUE: Final = 900
_FOLD_AT: Final = 76

#: The actions a report may give a recipient (RFC 3464 §2.3.3).
_ACTIONS: Final = ("failed", "delayed", "delivered", "relayed")

_MESSAGE_ID: Final = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]+@[\x21-\x3b\x3d\x3f-\x7e]+>\Z")


@attrs.frozen
class FailedRecipient:
    """
    One recipient in a DSN.

    @ivar address: the envelope recipient (C{RCPT TO}), without brackets.
    @ivar reply: the reply that decided its fate: the remote server's (from
        C{RCPT} or after C{DATA}), or one of gsmail's own (e.g. the null MX
        L{Reply} of L{gsmail.outbound.mx.NullMXError}); C{None} when no
        server ever replied (connection failures until the message expired).
    @ivar remote_mta: the host name of the server that sent C{reply}, or
        C{None} when the reply is gsmail's own or there was none. Decides the
        diagnostic type: C{smtp} for a remote reply, C{X-gsmail} otherwise.
    @ivar action: RFC 3464 §2.3.3: C{"failed"} (given up), C{"delayed"}
        (still being retried), C{"delivered"} (delivered into this site's
        own groups) or C{"relayed"} (accepted by a next hop that does not
        offer DSN, so no further notice will come; RFC 3461 §6.2.1 (d)).
        The class name is older than the success actions.
    @ivar diagnostic: what went wrong when there is no reply, e.g.
        C{"connect to mx.example.org[192.0.2.1]:25: Connection refused"}.
    @ivar last_attempt: when delivery was last tried (POSIX seconds), for
        C{Last-Attempt-Date}; omitted when C{None}.
    @ivar will_retry_until: for C{delayed}, when the queue gives up (POSIX
        seconds), for C{Will-Retry-Until}.
    @ivar original_recipient: the C{ORCPT} parameter, decoded (L{parse_orcpt}:
        C{rfc822;addr}), for C{Original-Recipient} (RFC 3461 §4.2, RFC 3464
        §2.3.1).
    """

    address: str
    reply: Reply | None
    remote_mta: str | None
    action: str = attrs.field(default="failed", validator=attrs.validators.in_(_ACTIONS))
    diagnostic: str = ""
    last_attempt: float | None = None
    will_retry_until: float | None = None
    original_recipient: str | None = None


# -- deciding -----------------------------------------------------------------


def should_send_dsn(original_sender: str) -> bool:
    """
    Whether a DSN may go to C{original_sender}.

    Never to the null reverse-path C{<>}: a DSN is itself sent from C{<>}
    (RFC 5321 §4.5.5, RFC 3464 §2), so this is what stops a bounce of a
    bounce. Also not to C{MAILER-DAEMON@...} (any case): that is a
    notification sender that should have used C{<>}, and answering it
    risks a loop between two mail systems. Not to an address that does not
    parse (there is nowhere to deliver it). C{postmaster} gets its DSNs: it
    is a person (RFC 5321 §4.5.1).

    @param original_sender: the envelope sender as the queue stored it,
        with or without angle brackets.
    """
    sender = original_sender.strip()
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1]
    if not sender:
        return False
    try:
        address = parse_mailbox(sender)
    except AddressError:
        return False
    return address.local.strip('"').lower() != "mailer-daemon"


# -- building -----------------------------------------------------------------


def _clean(text: str) -> str:
    """No control characters (CR, LF...): nothing remote can start a field."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()


def _ascii(text: str) -> str:
    return _clean(text).encode("ascii", "backslashreplace").decode("ascii")


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 3] + "..."


def _typed_address(address: str) -> str:
    """C{rfc822; addr}, or C{utf-8; xtext} for a non-ASCII address."""
    address = re.sub(r"\s+", "", _clean(address))
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {utf8_addr_xtext(address)}"


def _original_recipient(value: str) -> str:
    """
    The C{Original-Recipient} value (RFC 3464 §2.3.1) for an C{ORCPT} in
    L{parse_orcpt}'s form: C{type;address}, the C{utf-8} type in its 7-bit
    C{utf-8-addr-xtext} form (RFC 6533 §3); a bare address is C{rfc822}.
    """
    original = _clean(value)
    kind, semicolon, address = original.partition(";")
    if not semicolon:
        return _typed_address(original)
    if kind.strip().lower() == "utf-8" and not address.isascii():
        return f"utf-8;{utf8_addr_xtext(address)}"
    return original


def _field(name: str, value: str) -> str:
    """C{Name: value}, ASCII, folded at spaces near 76 columns (RFC 5322 §2.2.3)."""
    words = _cut(_ascii(value)).split(" ")
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        if len(line) + 1 + len(word) > _FOLD_AT and line.strip() and not line.endswith(":"):
            lines.append(line)
            line = ""
        line += f" {word}"
    lines.append(line)
    return "\n".join(lines) + "\n"


def _date(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return format_datetime(moment)


def _status(recipient: FailedRecipient) -> str:
    """
    The RFC 3463 status: the reply's enhanced code (or its class with
    C{.0.0} when the server gave none); C{5.4.7} for a recipient given up
    after only transient replies or none (delivery time expired);
    C{4.4.7} for a delay with no reply; C{2.0.0} (or the reply's 2.x.x)
    for a success.
    """
    reply = recipient.reply
    if recipient.action in ("delivered", "relayed"):
        # RFC 3464 §2.3.4: a success is 2.x.x; the reply's own code if it has one.
        if (
            reply is not None
            and reply.enhanced.startswith("2")
            and STATUS_CODE.match(reply.enhanced)
        ):
            return reply.enhanced
        return "2.0.0"
    if reply is None:
        return "5.4.7" if recipient.action == "failed" else "4.4.7"
    code = reply.enhanced if STATUS_CODE.match(reply.enhanced) else f"{str(reply.code)[:1]}.0.0"
    if recipient.action == "failed":
        return code if code.startswith("5") else "5.4.7"
    if code.startswith("4"):
        return code
    # A delay reported with a reply of another class: keep the detail.
    return "4" + code[1:] if STATUS_CODE.match(code) else "4.4.7"


def _reply_text(reply: Reply) -> str:
    return f"{reply.code} {reply.status_line()}"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return "less than a minute"


def _explanation(recipient: FailedRecipient, status: str, arrival: float, now: float) -> str:
    """One recipient's paragraph of the human-readable part."""
    address = _clean(recipient.address)
    reply = recipient.reply
    said = ""
    if reply is not None:
        text = _cut(_clean(_reply_text(reply)))
        said = f"{_clean(recipient.remote_mta)} said: {text}" if recipient.remote_mta else text
    elif recipient.diagnostic:
        said = _cut(_clean(recipient.diagnostic))
    if recipient.action == "delivered":
        return f"<{address}>: delivered" + (f"; {said}" if said else "")
    if recipient.action == "relayed":
        out = f"<{address}>: relayed to a mail system that does not report on delivery"
        return out + (f"; {said}" if said else "")
    if recipient.action == "delayed":
        out = f"<{address}>: not delivered yet"
        if recipient.will_retry_until is not None:
            out += f"; the mail system will keep trying until {_date(recipient.will_retry_until)}"
        return out + (f". Last attempt: {said}" if said else "")
    if status == "5.4.7":
        out = f"<{address}>: delivery was given up after {_duration(now - arrival)}"
        return out + (f". Last attempt: {said}" if said else "")
    return f"<{address}>: {said or 'delivery failed'}"


def _human_part(
    reporting_mta: str,
    recipients: list[FailedRecipient],
    statuses: list[str],
    arrival: float,
    now: float,
    postmaster: str,
    content_note: str,
) -> str:
    failed = [
        _explanation(r, s, arrival, now)
        for r, s in zip(recipients, statuses, strict=True)
        if r.action == "failed"
    ]
    delayed = [
        _explanation(r, s, arrival, now)
        for r, s in zip(recipients, statuses, strict=True)
        if r.action == "delayed"
    ]
    lines = [f"This is the mail system at host {_clean(reporting_mta)}.", ""]
    if failed:
        lines += [
            "Your message could not be delivered to the recipients below.",
            "No further attempts will be made for them.",
            "",
            *(f"{p}\n" for p in failed),
        ]
    if delayed:
        lines += [
            "Your message has not yet been delivered to the recipients below.",
            "The mail system is still trying; you do not need to send it again.",
            "",
            *(f"{p}\n" for p in delayed),
        ]
    succeeded = [
        _explanation(r, s, arrival, now)
        for r, s in zip(recipients, statuses, strict=True)
        if r.action in ("delivered", "relayed")
    ]
    if succeeded:
        lines += [
            "Your message was delivered to the recipients below, as you asked to be told.",
            "A relayed message may still fail later; then you will hear from the system",
            "that has it now.",
            "",
            *(f"{p}\n" for p in succeeded),
        ]
    lines.append(content_note)
    if postmaster:
        lines += ["", f"For help, please write to the postmaster: <{_clean(postmaster)}>."]
    return "\n".join(lines) + "\n"


def _lf(data: bytes) -> bytes:
    data = data.replace(b"\r\n", b"\n")
    return data if not data or data.endswith(b"\n") else data + b"\n"


def _header_section(data: bytes, limit: int) -> tuple[bytes, bool]:
    """
    The header section at the start of C{data}, at most C{limit} bytes.

    @return: the headers (LF line ends, cut at a line end) and whether they
        were cut.
    """
    if data.startswith((b"\n", b"\r\n")):
        return b"", False
    end = re.search(rb"\n\r?\n", data)
    if end is not None and end.start() < limit:
        return _lf(data[: end.start() + 1]), False
    if len(data) <= limit:
        return _lf(data), False
    cut = data.rfind(b"\n", 0, limit)
    return (_lf(data[: cut + 1]) if cut >= 0 else b""), True


def _read(path: str, limit: int) -> bytes:
    """At most C{limit + 1} bytes of the file (so that C{> limit} shows)."""
    with open(path, "rb") as f:
        return f.read(limit + 1)


def _original_part(
    original_path: str, return_content: str, header_limit: int, full_limit: int
) -> tuple[bytes | None, bytes, str]:
    """
    The third part (headers and body) or C{None}, the original's header
    section (for threading), and a sentence for the human part.
    """
    try:
        if return_content == "full":
            data = _read(original_path, full_limit)
            if len(data) <= full_limit:
                full = _lf(data)
                headers, _ = _header_section(full, header_limit)
                kind = "message/rfc822" if headers.isascii() else "message/global"
                cte = "7bit" if full.isascii() else "8bit"
                head = f"Content-Type: {kind}\nContent-Transfer-Encoding: {cte}\n"
                head += "Content-Description: Undelivered Message\n\n"
                return head.encode() + full, headers, "Your message is attached below."
        headers, truncated = _header_section(_read(original_path, header_limit), header_limit)
    except OSError as e:
        log.warn(
            "DSN without the original: cannot read {path}: {error}",
            path=original_path,
            error=str(e),
        )
        return None, b"", "The original message is no longer available."
    kind = "text/rfc822-headers" if headers.isascii() else "message/global-headers"
    cte = "7bit" if headers.isascii() else "8bit"
    head = f"Content-Type: {kind}\nContent-Transfer-Encoding: {cte}\n"
    head += "Content-Description: Undelivered Message Headers\n\n"
    if return_content == "full":
        note = "Your message was too large to return; its headers are attached below."
    elif truncated:
        note = "The first part of your message's headers is attached below."
    else:
        note = "Your message's headers are attached below."
    return head.encode() + headers, headers, note


def _original_message_id(headers: bytes) -> str | None:
    value = BytesHeaderParser(policy=compat32).parsebytes(headers).get("Message-ID")
    if value is None:
        return None
    value = str(value).strip()
    return value if _MESSAGE_ID.match(value) else None


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    recipients: list[FailedRecipient],
    original_path: str,
    arrival: float,
    now: float,
    postmaster: str = "",
    return_content: str = "headers",
    envelope_id: str = "",
    header_limit: int = MAX_RETURNED_HEADERS,
    full_limit: int = MAX_RETURNED_MESSAGE,
) -> bytes:
    """
    An RFC 3464 delivery status notification, ready to queue and send from
    the null sender C{<>} to C{original_sender}.

    Headers: C{From: MAILER-DAEMON@reporting_mta}, C{To: original_sender},
    C{Subject: Undelivered Mail Returned to Sender} when a recipient
    C{failed}, else C{Delayed Mail (still being retried)} when one is
    C{delayed}, else C{Successful Mail Delivery Report}, C{Auto-Submitted:
    auto-replied} (RFC 3834 §5), C{Date}, C{Message-ID}, and C{In-Reply-To}
    / C{References} when the original had a Message-ID.

    Parts (RFC 6522 C{multipart/report; report-type=delivery-status}):
      1. C{text/plain} (UTF-8) explaining each recipient's outcome;
      2. C{message/delivery-status}: C{Reporting-MTA: dns; reporting_mta},
         C{Original-Envelope-Id}, C{Arrival-Date}, then per recipient
         C{Original-Recipient}, C{Final-Recipient} (C{rfc822;} or, for a
         non-ASCII address, C{utf-8;} in xtext form, RFC 6533), C{Action},
         C{Status} (see L{FailedRecipient} and C{_status}: 5.4.7 when given up
         without a permanent reply, 4.4.7 for a delay without reply),
         C{Remote-MTA}, C{Diagnostic-Code} (C{smtp; <the reply>}),
         C{Last-Attempt-Date}, C{Will-Retry-Until};
      3. the original's header section as C{text/rfc822-headers} (at most
         C{header_limit} bytes, cut at a line end), or the whole message as
         C{message/rfc822} when C{return_content == "full"}, a recipient
         C{failed} (RFC 3461 §4.3: RET=FULL is for failure reports) and it is
         no larger than C{full_limit} (else its headers). Non-ASCII headers use
         C{message/global-headers} / C{message/global} (RFC 6533 §6).

    The result is 7-bit unless the returned original has 8-bit bytes (then
    that part says C{Content-Transfer-Encoding: 8bit}: send with
    C{BODY=8BITMIME}) or the sender's address is not ASCII (send with
    C{SMTPUTF8}). Reads up to C{full_limit} bytes from disk: call it in a
    thread (C{deferToThreadPool}) when returning full messages.

    @param reporting_mta: gsmail's host name (C{hostname} in the config).
    @param original_sender: the envelope sender the DSN goes to (check
        L{should_send_dsn} first).
    @param recipients: at least one; all of one message.
    @param original_path: the queue's copy of the message (LF or CRLF).
        If it cannot be read the DSN goes without its third part (logged).
    @param arrival: when gsmail accepted the message (POSIX seconds).
    @param now: the time of the report (POSIX seconds), from the clock.
    @param postmaster: an address named in the human part for help.
    @param return_content: C{"headers"} (C{RET=HDRS}, the default) or
        C{"full"} (C{RET=FULL}, RFC 3461 §4.3; failure reports only).
    @param envelope_id: the C{ENVID} given at submission, if any, decoded
        from xtext (L{xtext_decode}), for C{Original-Envelope-Id} (RFC 3464
        §2.2.1).
    @return: the message, LF line endings.
    @raise ValueError: no recipients, or a bad C{return_content}.
    """
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    if return_content not in ("headers", "full"):
        raise ValueError(f"return_content must be 'headers' or 'full', not {return_content!r}")
    mta = _ascii(reporting_mta) or "localhost"
    statuses = [_status(r) for r in recipients]

    if not any(r.action == "failed" for r in recipients):
        # RFC 3461 §4.3: RET=FULL asks for the content with a failure
        # report; delay and success reports carry the headers.
        return_content = "headers"
    third, original_headers, content_note = _original_part(
        original_path, return_content, header_limit, full_limit
    )

    human = _human_part(
        reporting_mta, recipients, statuses, arrival, now, postmaster, content_note
    ).encode("utf-8")
    if human.isascii():
        human_part = b"Content-Type: text/plain; charset=us-ascii\n"
        human_part += b"Content-Transfer-Encoding: 7bit\n"
    else:
        human_part = b"Content-Type: text/plain; charset=utf-8\n"
        human_part += b"Content-Transfer-Encoding: quoted-printable\n"
        human = quopri.encodestring(human)
    human_part += b"Content-Description: Notification\n\n" + _lf(human)

    report = "Content-Type: message/delivery-status\nContent-Description: Delivery report\n\n"
    report += _field("Reporting-MTA", f"dns; {mta}")
    if envelope_id:
        report += _field("Original-Envelope-Id", envelope_id)
    report += _field("Arrival-Date", _date(arrival))
    for recipient, status in zip(recipients, statuses, strict=True):
        report += "\n"
        if recipient.original_recipient:
            report += _field(
                "Original-Recipient", _original_recipient(recipient.original_recipient)
            )
        report += _field("Final-Recipient", _typed_address(recipient.address))
        report += _field("Action", recipient.action)
        report += _field("Status", status)
        if recipient.remote_mta:
            report += _field("Remote-MTA", f"dns; {recipient.remote_mta}")
        if recipient.reply is not None:
            kind = "smtp" if recipient.remote_mta else "X-gsmail"
            report += _field("Diagnostic-Code", f"{kind}; {_reply_text(recipient.reply)}")
        elif recipient.diagnostic:
            report += _field("Diagnostic-Code", f"X-gsmail; {recipient.diagnostic}")
        if recipient.last_attempt is not None:
            report += _field("Last-Attempt-Date", _date(recipient.last_attempt))
        if recipient.action == "delayed" and recipient.will_retry_until is not None:
            report += _field("Will-Retry-Until", _date(recipient.will_retry_until))
    parts = [human_part, report.encode("ascii")]
    if third is not None:
        parts.append(third)

    boundary = f"gsmail-{secrets.token_hex(12)}"
    while any(boundary.encode() in part for part in parts):
        boundary = f"gsmail-{secrets.token_hex(12)}"  # pragma: no cover - 96 random bits

    actions = {r.action for r in recipients}
    if "failed" in actions:
        subject = "Undelivered Mail Returned to Sender"
    elif "delayed" in actions:
        subject = "Delayed Mail (still being retried)"
    else:
        subject = "Successful Mail Delivery Report"  # Postfix's words
    sender = _clean(original_sender)
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1]
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{int(now)}.{secrets.token_hex(8)}@{mta}>",
    ]
    message_id = _original_message_id(original_headers)
    if message_id is not None:
        head += [f"In-Reply-To: {message_id}", f"References: {message_id}"]
    head += [
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
    ]
    out = "\n".join(head).encode("utf-8")
    # The newline before a delimiter belongs to the delimiter (RFC 2046
    # §5.1.1): one more keeps each part's own last line end.
    for part in parts:
        out += f"\n--{boundary}\n".encode() + _lf(part)
    return out + f"\n--{boundary}--\n".encode()
