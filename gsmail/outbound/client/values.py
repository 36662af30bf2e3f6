# -*- test-case-name: tests.outbound.test_client -*-
"""
What a caller gives the outbound client and gets back: the time limits
(L{Timeouts}), the STARTTLS context (L{ClientTLS}), one mail transaction
(L{Transaction}) and what the server said to it (L{TransactionResult});
and the checks a transaction passes before anything is sent (parameters,
sizes, mailboxes, SMTPUTF8, the SIZE estimate).

Not here: sending it (L{gsmail.outbound.client.SMTPConnection}).
"""

from __future__ import annotations

import re
from typing import Final

import attrs
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from gsmail.addresses import AddressError, parse_mailbox
from gsmail.status import Reply

__all__ = [
    "ClientTLS",
    "DEFAULT_TIMEOUTS",
    "SMTPUTF8_UNSUPPORTED",
    "Timeouts",
    "Transaction",
    "TransactionResult",
]

#: A reply that only gsmail makes up (no server said it) when the server
#: lacks SMTPUTF8 and the message needs it: RFC 6531 §3.2 forbids sending it,
#: and the message cannot be downgraded here, so it is returned (permanent).
SMTPUTF8_UNSUPPORTED: Final = Reply(
    553, "5.6.7", "gsmail: the server does not support SMTPUTF8, which this message needs"
)


@attrs.frozen
class Timeouts:
    """
    How long, in seconds, to wait for each step. The defaults are RFC 5321
    §4.5.3.2's minimums; the connect and quit limits are Postfix's
    (C{smtp_connect_timeout} 30 s) and gsmail's own.

    @ivar connect: for the TCP connection to be made.
    @ivar greeting: for the 220 greeting (RFC: 5 minutes).
    @ivar command: for EHLO/HELO/LHLO, STARTTLS, AUTH and RSET replies.
    @ivar mail: for the MAIL reply (RFC: 5 minutes).
    @ivar rcpt: for each RCPT reply (RFC: 5 minutes).
    @ivar data_init: for the 354 reply to DATA (RFC: 2 minutes).
    @ivar data_block: for the server to take each chunk of message data
        (RFC: 3 minutes per data block).
    @ivar data_end: for the reply after the final dot (RFC: 10 minutes).
    @ivar quit: for the QUIT reply and the close that follows.
    """

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    quit: float = 60.0


DEFAULT_TIMEOUTS: Final = Timeouts()


@attrs.frozen
class ClientTLS:
    """
    How to do STARTTLS.

    @ivar context: the client TLS context, e.g.
        C{optionsForClientTLS("smtp.example.net", trustRoot)}: its host name
        and trust root decide the certificate verification (service-identity).
        For opportunistic TLS pass C{CertificateOptions(verify=False)}.
    """

    context: IOpenSSLClientConnectionCreator = attrs.field(repr=False)


@attrs.frozen
class Transaction:
    """
    One message for some recipients of one envelope sender.

    @ivar sender: the reverse-path, C{""} for the null sender (a bounce).
    @ivar recipients: the forward-paths, at least one; a repeated address is
        sent once.
    @ivar data_path: the message file (header and body), LF or CRLF line ends.
        It is streamed, never read whole into memory.
    @ivar size: the file's size in bytes. The bytes read while sending must
        add up to it, else the data is abandoned without its final dot (a
        queue file that changed must not go out damaged): C{4.3.0}.
    @ivar params: the MAIL parameters wanted: C{"BODY": "8BITMIME"},
        C{"SMTPUTF8": None}, C{"XVERP": None} (or C{"XVERP": "+="}),
        C{"RET": "HDRS"}, C{"ENVID": xtext}. Each is sent only when the server
        offers its extension, except SMTPUTF8: see L{gsmail.outbound.client.SMTPConnection.send}.
    @ivar wire_size: the exact size as transmitted (CRLF line ends), in
        bytes, when the queue knows it; else SIZE is estimated from C{size}.
    @ivar data: the message itself (C{size} bytes), when the caller holds
        it in memory (a small message sent to many recipients in turn);
        C{data_path} is then not read. A connection encodes a given bytes
        object once and reuses the result for the transactions that follow.
    @ivar checked: the caller vouches that C{sender} and C{recipients} are
        mailboxes (it parsed them with L{gsmail.addresses.parse_mailbox}),
        so L{gsmail.outbound.client.SMTPConnection.send} does not parse them again; the parameters
        and the size are checked either way.
    @ivar rcpt_params: per recipient address, the RCPT parameters wanted:
        C{"NOTIFY"} and C{"ORCPT"} (RFC 3461 §4.1, §4.2, encoded for the
        wire). Like C{RET} and C{ENVID} they are sent only when the server
        offers DSN (RFC 3461 §4: else the next hop could not honour them,
        and this side reports instead).
    """

    sender: str
    recipients: list[str]
    data_path: str
    size: int
    params: dict[str, str | None] = attrs.field(factory=dict)
    wire_size: int | None = None
    data: bytes | None = attrs.field(default=None, repr=False)
    checked: bool = False
    rcpt_params: dict[str, dict[str, str]] = attrs.field(factory=dict)


@attrs.frozen
class TransactionResult:
    """
    What the server said to one transaction.

    @ivar recipients: per recipient, the RCPT reply if it was refused (or the
        MAIL reply if MAIL was refused), else the reply that ended the data
        (SMTP: the one reply after the final dot or to DATA; LMTP: that
        recipient's own reply).
    @ivar mail_reply: the reply to MAIL.
    @ivar data_reply: the reply to DATA if it was refused, else the reply
        after the final dot (LMTP: the worst of the per-recipient replies, a
        transient one first); C{None} if no recipient was accepted.
    """

    recipients: dict[str, Reply]
    mail_reply: Reply
    data_reply: Reply | None


def _needs_smtputf8(transaction: Transaction, recipients: list[str]) -> bool:
    """Asked for, or needed because an address is not ASCII (RFC 6531)."""
    return "SMTPUTF8" in transaction.params or not (
        transaction.sender.isascii() and all(a.isascii() for a in recipients)
    )


def _wire_size_estimate(transaction: Transaction) -> int:
    """
    The SIZE value (RFC 1870 §4: octets with CRLF line ends, an estimate).
    Without the exact figure, assume LF line ends with an average line of 32
    bytes or more: a slight over-estimate for ordinary mail.
    """
    if transaction.wire_size is not None:
        return transaction.wire_size
    return transaction.size + transaction.size // 32 + 2


_KNOWN_PARAMS: Final = frozenset({"BODY", "SMTPUTF8", "XVERP", "RET", "ENVID"})
_KNOWN_RCPT_PARAMS: Final = frozenset({"NOTIFY", "ORCPT"})
_PARAM_VALUE: Final = re.compile(r"[\x21-\x3c\x3e-\x7e]+")


def _check_transaction(transaction: Transaction, recipients: list[str]) -> None:
    """Refuse, before anything is sent, what would break the command line."""
    if not recipients:
        raise ValueError("a transaction needs at least one recipient")
    if transaction.data is not None and len(transaction.data) != transaction.size:
        raise ValueError(f"data has {len(transaction.data)} bytes, not {transaction.size}")
    if transaction.params:
        unknown = set(transaction.params) - _KNOWN_PARAMS
        if unknown:
            raise ValueError(f"unknown MAIL parameters: {sorted(unknown)}")
        for value in transaction.params.values():
            if value is not None and not _PARAM_VALUE.fullmatch(value):
                raise ValueError(f"bad MAIL parameter value {value!r}")
    for rcpt_params in transaction.rcpt_params.values():
        unknown = set(rcpt_params) - _KNOWN_RCPT_PARAMS
        if unknown:
            raise ValueError(f"unknown RCPT parameters: {sorted(unknown)}")
        for value in rcpt_params.values():
            if not _PARAM_VALUE.fullmatch(value):
                raise ValueError(f"bad RCPT parameter value {value!r}")
    if transaction.checked:
        return
    addresses = recipients if transaction.sender == "" else [transaction.sender, *recipients]
    for address in addresses:
        try:
            parse_mailbox(address)
        except AddressError as e:
            raise ValueError(f"not a valid mailbox: {address!r} ({e})") from None
