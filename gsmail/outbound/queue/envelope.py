# -*- test-case-name: tests.outbound.test_queue,tests.test_control -*-
"""
What a queued message is, and how it is written down: the L{Envelope} and
its L{RecipientState}s, the envelope file's JSON (C{env/<id>.json}) and the
records of the per-recipient journal (C{journal/<id>}), read back and
replayed. Pure data and parsing: no locks, no hand-offs, nothing written
(writing is L{gsmail.outbound.queue.store}'s, the journals' group commit
L{gsmail.outbound.queue.journal}'s); the queue itself is
L{gsmail.outbound.queue.OutboundQueue}, whose names these are.

The envelope format grows compatibly: fields added later (a recipient's
C{notify} and C{orcpt}, the message's C{delay_warned}) are written only when
set and read with their defaults when absent, so envelopes of older versions
load unchanged (their DSN parameters, which were kept among the MAIL
parameters as C{NOTIFY:<address>}, are taken from there), and older
versions, which ignore fields they do not know, load the new ones.

A journal holds one line per recipient outcome,
C{[seq, index, state, attempts, next_attempt, last_reply]}, with absolute
values; the envelope file carries C{journal_seq}, the last record it already
includes, and L{replay_journal} applies only the later ones, in order.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any, Final

import attrs

from gsmail.outbound.dsn.params import parse_notify, parse_orcpt

__all__ = [
    "DELIVERED",
    "EXPIRED",
    "FAILED",
    "FINAL_STATES",
    "PENDING",
    "QUEUE_ID",
    "STATES",
    "RecipientDSN",
    "Envelope",
    "NoSuchMessageError",
    "RecipientState",
    "check_id",
    "check_submission",
    "encode_envelope",
    "read_envelope",
    "replay_journal",
]

#: Recipient states. Only C{PENDING} recipients are ever tried again.
PENDING: Final = "pending"
DELIVERED: Final = "delivered"
FAILED: Final = "failed"
EXPIRED: Final = "expired"
FINAL_STATES: Final = frozenset({DELIVERED, FAILED, EXPIRED})
STATES: Final = frozenset({PENDING}) | FINAL_STATES

_MAX_ENVELOPE: Final = 64 << 20
#: A journal longer than this (bytes) is not replayed (corrupt).
_MAX_JOURNAL: Final = 256 << 20
_FORMAT: Final = 1
QUEUE_ID: Final = re.compile(r"\A[0-9a-f]{16}-[0-9a-f]{8}\Z")
_FORBIDDEN: Final = re.compile(r"[\x00\r\n]")

#: Per recipient, in order: its C{NOTIFY} (normalised) and C{ORCPT} (decoded)
#: parameters, C{""} when not given
#: (L{gsmail.outbound.queue.OutboundQueue.enqueue}'s C{dsn}).
RecipientDSN = tuple[str, str]


@attrs.define
class RecipientState:
    """
    One recipient of a queued message and how its delivery stands.

    @ivar address: the recipient's address, as submitted (no angle brackets).
    @ivar state: L{PENDING}, L{DELIVERED}, L{FAILED} (a 5xx reply) or
        L{EXPIRED} (still transient at the end of the queue lifetime).
    @ivar attempts: delivery attempts made so far.
    @ivar next_attempt: when to try next, in seconds since the epoch.
    @ivar last_reply: the last reply or error, e.g. C{"451 4.4.1 No answer"},
        for the DSN and the queue listing.
    @ivar notify: the C{NOTIFY} parameter it was submitted with (RFC 3461
        §4.1), normalised (L{gsmail.outbound.dsn.parse_notify}: C{"NEVER"},
        C{"SUCCESS,FAILURE"}, ...), or C{""} when none was given.
    @ivar orcpt: its C{ORCPT} parameter (RFC 3461 §4.2), decoded
        (L{gsmail.outbound.dsn.parse_orcpt}: C{"rfc822;a@example.org"}), or
        C{""}.
    """

    address: str
    state: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""
    notify: str = ""
    orcpt: str = ""


@attrs.define
class Envelope:
    """
    A queued message: who sent it, to whom, and how far its delivery got.
    The message itself is in the file
    L{gsmail.outbound.queue.OutboundQueue.data_path} names.

    @ivar id: the queue id: time-ordered, unique, safe as a file name.
    @ivar sender: the envelope sender; C{""} is the null sender (a bounce:
        no DSN is ever sent for it).
    @ivar recipients: one L{RecipientState} per recipient, in submitted order.
    @ivar xverp: each recipient gets its own VERP sender
        (L{gsmail.addresses.encode_xverp}), as Postfix's XVERP does.
    @ivar created: when it was queued, seconds since the epoch; the queue
        lifetime counts from here.
    @ivar held: an operator put it on hold: nothing is delivered until released.
    @ivar size: the length of the message in bytes.
    @ivar dsn_sent: a DSN about its failed recipients has been queued.
    @ivar params: MAIL FROM parameters to keep, e.g. C{{"BODY": "8BITMIME",
        "SMTPUTF8": ""}}; the DSN ones (RFC 3461) are C{"RET"} (C{FULL} or
        C{HDRS}) and C{"ENVID"} (as received: xtext).
    @ivar origin: where it came from when not submitted over SMTP, e.g.
        C{"zope.sendmail:<file name>"} for an imported zope.sendmail file
        (lets a re-run of the import see it was already done); else C{""}.
    @ivar delay_warned: the delay warning (RFC 3464 C{Action: delayed}) for
        its recipients still pending at C{delay_warning_time} was queued;
        none is sent again.
    @ivar sign_pending: it was to be DKIM-signed when queued, but the key
        could not be used: it is not delivered until
        L{gsmail.outbound.queue.OutboundQueue.resign} has signed it.
    @ivar replaces: the id of the unsigned message this signed one replaces
        (L{gsmail.outbound.queue.OutboundQueue.resign}); C{""} for any other.
    """

    id: str
    sender: str
    recipients: list[RecipientState]
    xverp: bool
    created: float
    held: bool = False
    size: int = 0
    dsn_sent: bool = False
    params: dict[str, str] = attrs.Factory(dict)
    origin: str = ""
    delay_warned: bool = False
    sign_pending: bool = False
    replaces: str = ""

    def pending(self) -> list[RecipientState]:
        """
        The recipients still to be delivered.
        """
        return [r for r in self.recipients if r.state == PENDING]


class NoSuchMessageError(LookupError):
    """
    No message with this id is in the queue: it was never there, or it was
    removed or deleted meanwhile (an operator's
    L{gsmail.outbound.queue.OutboundQueue.delete} while a delivery was
    running). The delivery side drops its work on it.
    """


def check_id(qid: str) -> None:
    """
    @raise ValueError: C{qid} is not a queue id (so no path made from it
        leaves the queue).
    """
    if not isinstance(qid, str) or not QUEUE_ID.match(qid):
        raise ValueError(f"not a queue id: {qid!r}")


def check_submission(
    sender: str,
    recipients: list[str],
    params: dict[str, str] | None,
    dsn: Sequence[RecipientDSN] | None,
) -> tuple[dict[str, str], Sequence[RecipientDSN]]:
    """
    Check what a new message is submitted with (the arguments of
    L{gsmail.outbound.queue.OutboundQueue.enqueue}) before anything is
    written.

    @return: a copy of C{params}, and C{dsn} with C{("", "")} for each
        recipient when C{None}.
    @raise ValueError: no recipients, C{dsn} not one pair per recipient, or
        an address or parameter with CR, LF or NUL.
    @raise TypeError: an address that is not C{str}.
    """
    _check_address(sender, null=True)
    if not recipients:
        raise ValueError("a message needs at least one recipient")
    for address in recipients:
        _check_address(address, null=False)
    params = dict(params or {})
    for key, value in params.items():
        if not (isinstance(key, str) and isinstance(value, str)) or _FORBIDDEN.search(key + value):
            raise ValueError("MAIL parameters must be text without CR, LF or NUL")
    pairs: Sequence[RecipientDSN] = [("", "")] * len(recipients) if dsn is None else dsn
    if len(pairs) != len(recipients):
        raise ValueError("dsn must give one (NOTIFY, ORCPT) pair per recipient")
    for pair in pairs:
        if not (
            isinstance(pair, tuple)
            and len(pair) == 2
            and all(isinstance(v, str) and not _FORBIDDEN.search(v) for v in pair)
        ):
            raise ValueError("NOTIFY and ORCPT must be text without CR, LF or NUL")
    return params, pairs


def _check_address(address: str, *, null: bool) -> None:
    if not isinstance(address, str):
        raise TypeError("addresses must be str")
    if not address and not null:
        raise ValueError("empty recipient address")
    if _FORBIDDEN.search(address):
        raise ValueError("an address must not contain CR, LF or NUL")


def encode_envelope(envelope: Envelope, journal_seq: int = 0) -> bytes:
    """
    The envelope file's bytes (one line of ASCII JSON) for C{envelope}, which
    includes the journal's records up to C{journal_seq}.
    """
    obj = {
        "format": _FORMAT,
        "id": envelope.id,
        "journal_seq": journal_seq,
        "sender": envelope.sender,
        "xverp": envelope.xverp,
        "created": envelope.created,
        "held": envelope.held,
        "size": envelope.size,
        "dsn_sent": envelope.dsn_sent,
        "params": envelope.params,
        "origin": envelope.origin,
        "recipients": [_encode_recipient(r) for r in envelope.recipients],
    }
    # Written only when set: envelopes without DSN requests stay as they
    # were, and any reader ignores fields it does not know.
    if envelope.delay_warned:
        obj["delay_warned"] = True
    if envelope.sign_pending:
        obj["sign_pending"] = True
    if envelope.replaces:
        obj["replaces"] = envelope.replaces
    # ASCII only (non-ASCII as \\u escapes): addresses decoded with
    # surrogateescape survive the round trip.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"


def _encode_recipient(r: RecipientState) -> dict[str, Any]:
    item: dict[str, Any] = {
        "address": r.address,
        "state": r.state,
        "attempts": r.attempts,
        "next_attempt": r.next_attempt,
        "last_reply": r.last_reply,
    }
    if r.notify:
        item["notify"] = r.notify
    if r.orcpt:
        item["orcpt"] = r.orcpt
    return item


def _optional(obj: dict[str, Any], name: str, kind: type[Any], default: Any) -> Any:
    """C{obj[name]} checked as L{_get} does, or C{default} when absent (older envelopes)."""
    return _get(obj, name, kind) if name in obj else default


def _legacy_dsn(params: dict[str, str], address: str) -> tuple[str, str]:
    """
    NOTIFY and ORCPT of a recipient from an envelope written before they had
    fields of their own: the submission listener then kept them among the
    MAIL parameters, as C{"NOTIFY:<address>"} and C{"ORCPT:<address>"}, as
    received. Values that do not parse are dropped (the defaults apply).
    """
    notify = orcpt = ""
    raw = params.get(f"NOTIFY:{address}")
    if raw is not None:
        try:
            notify = parse_notify(raw)
        except ValueError:
            pass
    raw = params.get(f"ORCPT:{address}")
    if raw is not None:
        try:
            orcpt = parse_orcpt(raw)
        except ValueError:
            pass
    return notify, orcpt


def read_envelope(path: str, qid: str) -> tuple[Envelope, int]:
    """
    Read and check one envelope file.

    @return: the envelope and the last journal record it includes (0 in
        envelopes written before journals existed).

    @raise ValueError: it does not hold a valid envelope for C{qid}.
    @raise OSError: it cannot be read.
    """
    with open(path, "rb") as f:
        raw = f.read(_MAX_ENVELOPE + 1)
    if len(raw) > _MAX_ENVELOPE:
        raise ValueError("envelope file too large")
    obj = json.loads(raw)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
        raise ValueError("not an envelope of a known format")
    if _get(obj, "id", str) != qid:
        raise ValueError("its id is not its file name")
    params = _get(obj, "params", dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
        raise ValueError("params must map text to text")
    legacy = any(k.startswith(("NOTIFY:", "ORCPT:")) for k in params)
    recipients = []
    for item in _get(obj, "recipients", list):
        if not isinstance(item, dict):
            raise ValueError("a recipient must be an object")
        state = _get(item, "state", str)
        if state not in STATES:
            raise ValueError(f"unknown recipient state {state!r}")
        address = _get(item, "address", str)
        if "notify" in item or "orcpt" in item:
            notify = _optional(item, "notify", str, "")
            orcpt = _optional(item, "orcpt", str, "")
        else:
            notify, orcpt = _legacy_dsn(params, address) if legacy else ("", "")
        recipients.append(
            RecipientState(
                address=address,
                state=state,
                attempts=_get(item, "attempts", int),
                next_attempt=_get(item, "next_attempt", float),
                last_reply=_get(item, "last_reply", str),
                notify=notify,
                orcpt=orcpt,
            )
        )
    if not recipients:
        raise ValueError("no recipients")
    seq = _get(obj, "journal_seq", int) if "journal_seq" in obj else 0
    envelope = Envelope(
        id=qid,
        sender=_get(obj, "sender", str),
        recipients=recipients,
        xverp=_get(obj, "xverp", bool),
        created=_get(obj, "created", float),
        held=_get(obj, "held", bool),
        size=_get(obj, "size", int),
        dsn_sent=_get(obj, "dsn_sent", bool),
        params=params,
        origin=_get(obj, "origin", str),
        delay_warned=_optional(obj, "delay_warned", bool, False),
        sign_pending=_optional(obj, "sign_pending", bool, False),
        replaces=_optional(obj, "replaces", str, ""),
    )
    return envelope, seq


def replay_journal(path: str, envelope: Envelope, seq: int) -> tuple[int, int, int, int]:
    """
    Apply the records of the journal at C{path} numbered after C{seq} to
    C{envelope}, in order. Reading stops at the first line that is not a
    whole, valid record (a write cut short by a crash; it was never
    acknowledged).

    @return: the last record number (at least C{seq}), the records read, the
        bytes they take from the start of the file, and the file's size.
    @raise OSError: it cannot be read (C{FileNotFoundError}: none).
    @raise ValueError: it is too large to be a journal.
    """
    with open(path, "rb") as f:
        raw = f.read(_MAX_JOURNAL + 1)
    if len(raw) > _MAX_JOURNAL:
        raise ValueError("journal file too large")
    recipients = envelope.recipients
    last = seq
    count = position = 0
    while True:
        end = raw.find(b"\n", position)
        if end < 0:
            break
        try:
            record = json.loads(raw[position:end])
            number, index, state, attempts, next_attempt, last_reply = record
            if not (
                type(number) is int
                and type(index) is int
                and 0 <= index < len(recipients)
                and state in STATES
                and type(attempts) is int
                and attempts >= 0
                and type(next_attempt) in (int, float)
                and math.isfinite(next_attempt)
                and type(last_reply) is str
            ):
                break
        except ValueError:  # JSONDecodeError, UnicodeDecodeError, unpacking
            break
        except TypeError:  # not a list
            break
        if number > seq:
            r = recipients[index]
            r.state = state
            r.attempts = attempts
            r.next_attempt = float(next_attempt)
            r.last_reply = last_reply
        last = max(last, number)
        count += 1
        position = end + 1
    return last, count, position, len(raw)


def _get(obj: dict[str, Any], name: str, kind: type[Any]) -> Any:
    """
    C{obj[name]}, checked to be of C{kind} (JSON's types: a bool is not an
    int, an int is a float).

    @raise ValueError: missing or of another type.
    """
    value: Any = obj.get(name)
    if kind is float:
        ok = type(value) in (int, float) and math.isfinite(value)
    elif kind is int:
        ok = type(value) is int and value >= 0
    else:
        ok = type(value) is kind
    if not ok:
        raise ValueError(f"bad or missing field {name!r}")
    return float(value) if kind is float else value
