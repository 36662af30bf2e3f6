# -*- test-case-name: tests.inbound.test_protocol,tests.inbound.test_delivery -*-
"""
The state a listener keeps and what it hands its delivery core: the
listener's settings (L{ServerSettings}), the connection's L{Session}, the
transaction's L{Envelope}, and the L{Core} interface a delivery core offers
(RCPT's check, the delivery after the final dot).

Plain values: no protocol, no I/O. The server that fills them in is
L{gsmail.inbound.protocol}; the inbound delivery core that reads them is
L{gsmail.inbound.delivery}.
"""

from __future__ import annotations

import random
from typing import Any
from typing import Protocol as TypingProtocol

import attrs
from twisted.internet.defer import Deferred

from gsmail.addresses import Address, Route
from gsmail.anvil import LookupGate
from gsmail.inbound.spool import SpooledMessage
from gsmail.status import Reply

__all__ = ["ServerSettings", "Session", "Envelope", "Core"]


@attrs.frozen
class ServerSettings:
    """
    What a listener needs to know, in the units the protocol uses.

    @ivar hostname: the name in the greeting, EHLO reply and Received field.
    @ivar max_size: the SIZE limit, in bytes (RFC 1870).
    @ivar max_recipients: accepted RCPTs per transaction; more get C{452 4.5.3}.
    @ivar max_line_length: longest DATA line, CRLF included, in bytes.
    @ivar idle_timeout: seconds a client has for each command line, from
        the end of the previous reply (a deadline, not an idle timer that
        every byte resets: Postfix's C{smtpd_timeout} with
        C{smtpd_per_record_deadline}); past it C{421 4.4.2} and close.
    @ivar max_connections: concurrent connections per listener.
    @ivar tls: the server TLS context (C{IOpenSSLServerConnectionCreator}) or
        C{None}: STARTTLS is then not offered.
    @ivar min_data_rate: bytes per second a client must keep up in DATA: the
        message must be complete C{idle_timeout} + (bytes received) /
        C{min_data_rate} seconds after the 354 (Postfix's
        C{smtpd_min_data_rate}), else C{421 4.4.2}; C{0}: DATA only needs
        a byte every C{idle_timeout} seconds.
    @ivar soft_error_limit: errors (bad commands, refused recipients)
        after which each error reply to a limited client is delayed by
        C{error_sleep_time} seconds (C{smtpd_soft_error_limit},
        C{smtpd_error_sleep_time}).
    @ivar hard_error_limit: errors at which the session ends with C{421
        4.7.0} (C{smtpd_hard_error_limit}). Both counts start again when
        a message is accepted.
    @ivar junk_command_limit: NOOP, RSET, VRFY, EXPN and HELP commands
        allowed before each further one counts as an error
        (C{smtpd_junk_command_limit}); also reset by an accepted message.
    @ivar session_lookup_limit: GroupServer group lookups per session
        (cached answers are free); past it a recipient that needs one gets
        C{450 4.7.1} (L{gsmail.anvil.LookupGate}). C{0}: no cap.
    @ivar auth_failure_delay: seconds each failed AUTH reply to a limited
        client is held back (submission).
    """

    hostname: str
    max_size: int = 200 * 1024 * 1024
    max_recipients: int = 100
    max_line_length: int = 8192
    idle_timeout: float = 300.0
    max_connections: int = 1000
    tls: Any = None
    min_data_rate: int = 500
    soft_error_limit: int = 10
    hard_error_limit: int = 20
    error_sleep_time: float = 1.0
    junk_command_limit: int = 100
    session_lookup_limit: int = 200
    auth_failure_delay: float = 1.0


@attrs.define
class Session:
    """
    Per connection: who the peer is and what it said (aiosmtpd's split).

    @ivar peer: the peer's address as text (C{"[127.0.0.1]"}, C{"unix socket"}).
    @ivar helo: the HELO/EHLO/LHLO argument, or C{None} before it.
    @ivar extended: EHLO or LHLO (not HELO) was used.
    @ivar tls: TLS is active.
    @ivar id: a short random id of the session, in some log events' fields
        (the Received field has the message's queue id, L{Envelope.queue_id}).
    """

    peer: str
    protocol_name: str
    helo: str | None = None
    extended: bool = False
    tls: bool = False
    id: str = attrs.field(factory=lambda: f"{random.getrandbits(48):012x}")
    #: The user name given with AUTH (submission only), or C{None}.
    user: str | None = None
    #: Once the TLS handshake is done: version and cipher (L{connection_summary}).
    tls_summary: str | None = None
    #: The listener's name in the log: C{smtp}, C{lmtp} or C{submission}.
    listener: str = "smtp"
    #: The per-client abuse limits apply (L{gsmail.anvil}): an IP client of
    #: an ESMTP listener, not in the exception networks.
    limited: bool = False
    #: The session's GroupServer lookup caps, or C{None}: no cap.
    lookup_gate: LookupGate | None = None

    @property
    def with_protocol(self) -> str:
        """The C{with} word of the Received field (RFC 3848)."""
        if self.protocol_name == "LMTP":
            name = "LMTP"
        elif not self.extended:
            return "SMTP"
        else:
            name = "ESMTP"
        return name + ("S" if self.tls else "") + ("A" if self.user else "")


@attrs.define
class Envelope:
    """
    Per transaction: the envelope sender, its parameters and the accepted
    recipients, in RCPT order.

    @ivar sender: the reverse-path; C{None} for the null sender C{<>}.
    """

    sender: Address | None
    smtputf8: bool = False
    body: str = "7BIT"
    declared_size: int | None = None
    recipients: list[Route] = attrs.field(factory=list)
    #: Other MAIL FROM parameters a listener accepted (e.g. XVERP, RET, ENVID).
    params: dict[str, str | None] = attrs.field(factory=dict)
    #: The message's queue id (L{gsmail.maillog.new_queue_id}), given with the
    #: first accepted recipient; C{None} before (Postfix's C{NOQUEUE}).
    queue_id: str | None = None
    #: When the queue id was given (the reactor's seconds): the start of C{delay=}.
    arrived: float = 0.0


class Core(TypingProtocol):
    """
    What a listener asks of its delivery core: the inbound
    L{gsmail.inbound.delivery.DeliveryCore}, or the submission core.
    """

    def check_recipient(
        self, session: Session, recipient: Address
    ) -> Deferred[tuple[Reply, Route | None]]:
        """The reply to C{RCPT TO:<recipient>} and, when accepted, its route."""

    def deliver(
        self, session: Session, envelope: Envelope, message: SpooledMessage
    ) -> Deferred[list[Reply]]:
        """Deliver after the final dot: one reply per recipient, in order; never fails."""
