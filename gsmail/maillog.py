# -*- test-case-name: tests.test_maillog -*-
"""
Postfix-shaped log lines, each also a set of structured fields.

Every line about a connection, a refusal or a message is made here, one way: the text
(C{log_format}: the line itself, braces escaped) is Postfix's line built from
the event's own fields, so a
reader of the log file sees what a Postfix log shows, and an observer (a
JSON log, the metrics) reads the fields without parsing text. The shapes
are those of Postfix's C{smtpd}, C{qmgr}, C{smtp} and C{lmtp} logging (see
Postfix's DEBUG_README and the C{delays=a/b/c/d} notes of its 2.3 release
notes; the C{NOQUEUE: reject:} line is C{smtpd_check.c}'s)::

    connect from unknown[192.0.2.1]
    3F2A9C1E01: client=unknown[192.0.2.1]
    3F2A9C1E01: from=<a@example.org>, size=4213, nrcpt=1
    3F2A9C1E01: to=<dev@groups.example.com>, group=dev, relay=groupserver,
        delay=0.21, delays=0.01/0/0.2, dsn=2.0.0, status=sent (Added to the group)
    NOQUEUE: reject: RCPT from unknown[192.0.2.1]: 550 5.1.1 <x@example.com>:
        No such group <x@example.com>; from=<a@example.org> to=<x@example.com>
        proto=ESMTP helo=<mail.example.org>
    disconnect from unknown[192.0.2.1] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5

Every event has the field C{gsmail_event} (C{"connect"}, C{"disconnect"},
C{"client"}, C{"queued"}, C{"delivery"}, C{"reject"}, C{"dsn"}, C{"tls"});
the other fields are the builders' parameters, under the same names (plus
C{delay_text}, the delay as the text shows it, and C{what}, the DSN's word
in the text), and whatever extra fields a caller adds (C{session},
C{message_id}, ...). Values
from the network pass through L{gsmail.logtext.printable} before they are
stored, so fields and text alike are one safe line each. No builder takes
a password or the token.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.logger import Logger

from gsmail.logtext import printable

__all__ = [
    "EVENTS",
    "new_queue_id",
    "client_name",
    "format_delay",
    "delivery_status",
    "connect",
    "disconnect",
    "client",
    "queued",
    "delivery",
    "reject",
    "dsn_queued",
    "tls",
]

#: The values of C{gsmail_event}.
EVENTS = ("connect", "disconnect", "client", "queued", "delivery", "reject", "dsn", "tls")

_log = Logger(namespace="gsmail.maillog")


def new_queue_id() -> str:
    """
    A short queue id for one inbound message: 10 upper-case hex digits, as
    Postfix's short queue ids look (random here: gsmail keeps no queue file
    whose inode could number it). Python's Mersenne Twister, seeded from
    the system's random source and again after a fork: an id needs to be
    unique, not secret, and a C{getrandom} call per id cost more.
    """
    return f"{random.getrandbits(40):010X}"


def client_name(peer: str) -> str:
    """
    The client as Postfix names it, C{name[address]}: gsmail does no reverse
    lookups, so the name is C{unknown} (Postfix's word for that) for an IP
    peer (L{gsmail.inbound.protocol.Session.peer}, C{"[192.0.2.1]"}); a UNIX
    socket peer is C{local}.
    """
    return f"unknown{peer}" if peer.startswith("[") else peer


def format_delay(seconds: float) -> str:
    """
    A delay as Postfix logs it: two significant digits at most (C{0.21},
    C{2.4}, C{13}, C{1000}), hundredths at best, C{0} for less than that.
    """
    if seconds < 0.005:
        return "0"
    if seconds >= 10:
        return f"{seconds:.0f}"
    text = f"{seconds:.1f}" if seconds >= 1 else f"{seconds:.2f}"
    return text.rstrip("0").rstrip(".")


def delivery_status(code: int, expired: bool = False) -> str:
    """
    Postfix's C{status=} word for a reply code: C{sent} (2xx), C{deferred}
    (4xx), C{bounced} (5xx); C{expired} when a transient failure ended the
    message's time in the queue.
    """
    if expired:
        return "expired"
    if code < 400:
        return "sent"
    if code < 500:
        return "deferred"
    return "bounced"


def _emit(log: Logger | None, template: str, fields: dict[str, Any], level: str = "info") -> None:
    """
    Emit the event: C{fields}, and as C{log_format} the line C{template}
    makes of them, filled in here (braces escaped) rather than by every
    observer: Twisted's formatting of a template with eight fields cost
    more than the rest of the event (a fan-out logs one per recipient).
    """
    text = template.format_map(fields)
    if "{" in text or "}" in text:
        text = text.replace("{", "{{").replace("}", "}}")
    getattr(log if log is not None else _log, level)(text, **fields)


def connect(listener: str, client: str, log: Logger | None = None) -> None:
    """C{connect from CLIENT} (smtpd); C{listener}: C{smtp}, C{lmtp} or C{submission}."""
    _emit(
        log,
        "connect from {client}",
        {"gsmail_event": "connect", "listener": listener, "client": client},
    )


def disconnect(listener: str, client: str, commands: str = "", log: Logger | None = None) -> None:
    """
    C{disconnect from CLIENT ehlo=1 mail=1 ... commands=N} (smtpd's counts
    of each command given, as Postfix 3.0+ logs them).
    """
    text = "disconnect from {client} {commands}" if commands else "disconnect from {client}"
    _emit(
        log,
        text,
        {
            "gsmail_event": "disconnect",
            "listener": listener,
            "client": client,
            "commands": commands,
        },
    )


def client(queue_id: str, client: str, log: Logger | None = None, **extra: Any) -> None:
    """C{ID: client=CLIENT}: the first line of a message (smtpd)."""
    _emit(
        log,
        "{queue_id}: client={client}",
        {"gsmail_event": "client", "queue_id": queue_id, "client": client, **extra},
    )


def queued(
    queue_id: str,
    sender: str,
    size: int,
    nrcpt: int,
    listener: str,
    log: Logger | None = None,
    **extra: Any,
) -> None:
    """
    C{ID: from=<SENDER>, size=BYTES, nrcpt=N[, message-id=ID]} (qmgr's line,
    with the C{message-id} of cleanup's): C{sender} C{""} is C{<>}; a
    C{message_id} field (already L{printable}) is shown when given.
    """
    text = "{queue_id}: from=<{sender}>, size={size}, nrcpt={nrcpt}"
    if extra.get("message_id"):
        text += ", message-id={message_id}"
    _emit(
        log,
        text,
        {
            "gsmail_event": "queued",
            "queue_id": queue_id,
            "sender": printable(sender),
            "size": size,
            "nrcpt": nrcpt,
            "listener": listener,
            **extra,
        },
    )


def delivery(
    queue_id: str,
    recipient: str,
    relay: str,
    delay: float,
    delays: str,
    dsn: str,
    status: str,
    reply: str,
    listener: str,
    group: str | None = None,
    log: Logger | None = None,
    **extra: Any,
) -> None:
    """
    C{ID: to=<RCPT>, [group=G, ]relay=R, delay=S, delays=a/b/c, dsn=X.Y.Z,
    status=STATUS (REPLY)} (smtp, lmtp): one recipient's outcome.

    @param delay: seconds since the message arrived (float).
    @param delays: the parts of C{delay}, C{"/"}-separated, each made by
        L{format_delay}.
    @param status: L{delivery_status}'s word.
    @param listener: the inbound listener, or C{"outbound"}.
    @param group: the group id, for a post to a group.
    """
    fields: dict[str, Any] = {
        "gsmail_event": "delivery",
        "queue_id": queue_id,
        "recipient": printable(recipient),
        "relay": printable(relay),
        "delay": round(delay, 3),
        "delay_text": format_delay(delay),
        "delays": delays,
        "dsn": dsn,
        "status": status,
        "reply": printable(reply),
        "listener": listener,
        **extra,
    }
    text = "{queue_id}: to=<{recipient}>, "
    if group:
        fields["group"] = printable(group)
        text += "group={group}, "
    text += (
        "relay={relay}, delay={delay_text}, delays={delays}, dsn={dsn}, status={status} ({reply})"
    )
    _emit(log, text, fields, "info" if status == "sent" else "warn")


def reject(
    stage: str,
    code: int,
    dsn: str,
    reply: str,
    *,
    client: str,
    proto: str,
    listener: str,
    helo: str | None = None,
    sender: str | None = None,
    recipient: str | None = None,
    queue_id: str | None = None,
    log: Logger | None = None,
    **extra: Any,
) -> None:
    """
    C{NOQUEUE: reject: STAGE from CLIENT: CODE X.Y.Z [<RCPT>: ]REPLY;
    from=<S> to=<R> proto=P helo=<H>} (smtpd): a refused command. After
    DATA the message has its queue id in place of C{NOQUEUE}.

    @param stage: C{CONNECT}, C{HELO}, C{MAIL}, C{RCPT}, C{DATA},
        C{END-OF-MESSAGE} or C{AUTH}.
    @param sender: the MAIL FROM address (C{""}: the null sender), or
        C{None} before MAIL.
    """
    fields: dict[str, Any] = {
        "gsmail_event": "reject",
        "stage": stage,
        "code": code,
        "dsn": dsn,
        "reply": printable(reply),
        "client": client,
        "proto": proto,
        "listener": listener,
        "queue_id": queue_id or "NOQUEUE",
        **extra,
    }
    text = "{queue_id}: reject: {stage} from {client}: {code} {dsn} "
    if recipient is not None:
        fields["recipient"] = printable(recipient)
        if stage == "RCPT":
            text += "<{recipient}>: "
    text += "{reply};"
    if sender is not None:
        fields["sender"] = printable(sender)
        text += " from=<{sender}>"
    if recipient is not None:
        text += " to=<{recipient}>"
    text += " proto={proto}"
    if helo is not None:
        fields["helo"] = printable(helo)
        text += " helo=<{helo}>"
    _emit(log, text, fields)


def dsn_queued(queue_id: str, dsn_queue_id: str, status: str, log: Logger | None = None) -> None:
    """
    C{ID: sender non-delivery notification: DSN_ID} (Postfix's bounce
    daemon); C{status}: the DSN's kind (C{failed}, C{delayed}, C{delivered},
    C{relayed}), which names the line (C{delay notification}, C{delivery
    status notification}).
    """
    what = {"failed": "non-delivery", "delayed": "delay"}.get(status, "delivery status")
    _emit(
        log,
        "{queue_id}: sender {what} notification: {dsn_queue_id}",
        {
            "gsmail_event": "dsn",
            "queue_id": queue_id,
            "dsn_queue_id": dsn_queue_id,
            "status": status,
            "what": what,
        },
    )


def tls(
    listener: str,
    protocol: str,
    cipher: str,
    *,
    client: str | None = None,
    relay: str | None = None,
    log: Logger | None = None,
    **extra: Any,
) -> None:
    """
    C{TLS connection established from CLIENT: PROTOCOL with cipher CIPHER}
    (smtpd's line, without its trust word; C{to RELAY} for smtp, RELAY as
    C{host[address]:port}). C{listener}: the listener, or C{"outbound"}
    with C{relay}.
    """
    fields: dict[str, Any] = {
        "gsmail_event": "tls",
        "listener": listener,
        "protocol": protocol,
        "cipher": cipher,
        **extra,
    }
    if relay is not None:
        fields["relay"] = printable(relay)
        text = "TLS connection established to {relay}: {protocol} with cipher {cipher}"
    else:
        fields["client"] = client or "unknown"
        text = "TLS connection established from {client}: {protocol} with cipher {cipher}"
    _emit(log, text, fields)
