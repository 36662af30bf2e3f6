# -*- test-case-name: tests.test_status -*-
"""
Every reply gsmail gives, in one table: SMTP reply codes (RFC 5321 §4.2),
enhanced status codes (RFC 3463, advertised as ENHANCEDSTATUSCODES, RFC 2034)
and the sysexits(3) value the pipe-compatible command exits with.

Servers, the delivery core and the command all take their replies from here,
so a given fault is answered the same way whichever front door it came in by.
A transient fault is always a 4xx/4.x.x reply: the sending MTA keeps the
message and retries. Only faults that retrying cannot mend are 5xx.
"""

from __future__ import annotations

from typing import Final

import attrs

__all__ = ["Reply", "GroupServerError", "reply_for_exception"]

# sysexits(3) values, as smtp2gs used them.
EX_OK: Final = 0
EX_USAGE: Final = 64
EX_DATAERR: Final = 65
EX_NOUSER: Final = 67
EX_SOFTWARE: Final = 70
EX_TEMPFAIL: Final = 75
EX_PROTOCOL: Final = 76
EX_CONFIG: Final = 78


@attrs.frozen
class Reply:
    """
    One SMTP/LMTP reply.

    @ivar code: the three-digit reply code (RFC 5321 §4.2.3).
    @ivar enhanced: the RFC 3463 enhanced status code, C{"class.subject.detail"},
        or C{""} for the replies RFC 2034 §3 exempts (the greeting, the
        EHLO/LHLO reply) and for 3xx replies, which have no enhanced class.
    @ivar text: human-readable text, ASCII or UTF-8, no CR or LF.
    @ivar exit_code: the sysexits(3) value for the pipe-compatible command.
    """

    code: int
    enhanced: str
    text: str
    exit_code: int = EX_OK

    @property
    def is_success(self) -> bool:
        """C{True} for 2xx replies."""
        return 200 <= self.code < 300

    @property
    def is_transient(self) -> bool:
        """C{True} for 4xx replies: the sender keeps the message and retries."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """C{True} for 5xx replies: the sender returns the message."""
        return self.code >= 500

    def with_text(self, text: str) -> Reply:
        """
        The same codes with other text, e.g. naming the recipient.
        """
        return attrs.evolve(self, text=text)

    def status_line(self) -> str:
        """
        The enhanced code and text as smtp2gs printed them on stderr:
        C{"4.4.4 Error connecting to GroupServer"}. Postfix's pipe(8) takes the
        first word as the delivery status when it is a valid D.S.N.
        """
        return f"{self.enhanced} {self.text}" if self.enhanced else self.text

    def encode(self, continued: bool = False) -> bytes:
        """
        The reply as it goes on the wire, one line with CRLF.

        @param continued: C{True} for a non-final line of a multi-line reply
            (C{"250-..."}).
        """
        sep = "-" if continued else " "
        return f"{self.code}{sep}{self.status_line()}\r\n".encode()


def multiline(code: int, lines: list[str]) -> bytes:
    """
    A multi-line reply (RFC 5321 §4.2.1) such as the EHLO reply.

    @param lines: the text of each line, at least one.
    """
    out = []
    for i, line in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        out.append(f"{code}{sep}{line}\r\n".encode())
    return b"".join(out)


# -- session and command replies ------------------------------------------
CLOSING = Reply(221, "2.0.0", "Bye")
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
BOUNCE_ADDRESS_OK = Reply(250, "2.1.5", "Bounce address ok")
RELAY_ADDRESS_OK = Reply(250, "2.1.5", "Member relay address ok")
VRFY_CANNOT = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(
    214, "2.0.0", "Commands: EHLO HELO LHLO MAIL RCPT DATA RSET NOOP VRFY QUIT HELP STARTTLS"
)
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")

# -- outcomes of a delivery ------------------------------------------------
POSTED = Reply(250, "2.0.0", "Added to the group")
RELAYED = Reply(250, "2.0.0", "Relayed to the member")
BOUNCE_RECORDED = Reply(250, "2.1.5", "Bounce recorded", EX_OK)
ALREADY_DELIVERED = Reply(250, "2.0.0", "Already delivered; duplicate not posted again")
BOUNCE_NO_MEMBER = Reply(250, "2.1.5", "Bounce noted; no member has that address", EX_OK)
POSTMASTER_OK = Reply(250, "2.1.5", "Postmaster ok")
POSTMASTER_STORED = Reply(250, "2.0.0", "Delivered to the postmaster")
#: Accepted and dropped (gsmail.verp): a forged, too old or unsigned-too-late
#: bounce address, or one of no group. One text for all, after DATA only.
BOUNCE_NOT_OURS = Reply(250, "2.0.0", "Not recorded: not a current bounce address of this site")
#: Accepted and dropped: a delay notice, an auto-reply or plain mail to a
#: bounce address (gsmail.bounces).
BOUNCE_NOT_FAILURE = Reply(250, "2.0.0", "Not recorded: not a delivery failure report")
#: A route table entry's actions all succeeded (gsmail.routes).
ROUTE_DELIVERED = Reply(250, "2.0.0", "Delivered")
#: A route with an empty forward list: accepted and dropped (emailtunnel's
#: empty list from translate_recipient).
ROUTE_DROPPED = Reply(250, "2.0.0", "Accepted")
ROUTE_ARCHIVED = Reply(250, "2.0.0", "Archived")
ROUTE_FORWARDED = Reply(250, "2.0.0", "Forwarded")
NNTP_POSTED = Reply(250, "2.0.0", "Posted to the newsgroup")

# -- transient failures (the sender retries) -------------------------------
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle too long; closing connection")
#: DATA slower than min_data_rate (Postfix's smtpd_min_data_rate).
DATA_TOO_SLOW = Reply(421, "4.4.2", "Data arriving too slowly; closing connection")
#: hard_error_limit reached (Postfix's smtpd_hard_error_limit).
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors; closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections; try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Shutting down; try again later")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
#: The spool or queue disk is full or failing (RFC 5321 §4.2.3 452, RFC 3463
#: §3.4 X.3.1 "mail system full"); Postfix's wording.
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage", EX_TEMPFAIL)
#: "No such group" from the negative cache, not from GroupServer just now: the
#: group may have been created since, so the sender retries (RFC 3463 X.1.1).
NO_SUCH_GROUP_CACHED = Reply(450, "4.1.1", "No such group when last asked; try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing", EX_TEMPFAIL)
CONFIG_ERROR = Reply(451, "4.3.5", "Error with the configuration file", EX_CONFIG)
GROUPSERVER_UNREACHABLE = Reply(451, "4.4.4", "Error connecting to GroupServer", EX_PROTOCOL)
GROUPSERVER_BAD_REPLY = Reply(
    451, "4.5.0", "Could not decode the reply from GroupServer", EX_PROTOCOL
)
# A page's status message said it refused the request (alert-error): a wrong
# token or a field GroupServer would not take. A fault of this site's
# configuration, not the sender's: transient (groupserver-protocol.md).
GROUPSERVER_REFUSED = Reply(
    451, "4.3.5", "GroupServer refused the request (check the token and its log)", EX_CONFIG
)
# A 200 page without a status message: a login, maintenance or proxy page.
GROUPSERVER_NOT_RUN = Reply(
    451, "4.5.0", "GroupServer answered without running the page; try again later", EX_PROTOCOL
)
GROUPSERVER_ERROR = Reply(451, "4.5.0", "Error communicating with GroupServer", EX_PROTOCOL)
GROUPSERVER_TIMEOUT = Reply(451, "4.4.7", "GroupServer did not answer in time", EX_TEMPFAIL)
TOO_BUSY = Reply(451, "4.4.5", "System too busy; try again later", EX_TEMPFAIL)
OUTCOME_UNKNOWN = Reply(
    451,
    "4.4.2",
    "GroupServer's answer was lost after the message was sent; try again later",
    EX_TEMPFAIL,
)
LEDGER_UNWRITABLE = Reply(
    451, "4.3.0", "Cannot record deliveries now (the post ledger cannot be written)", EX_TEMPFAIL
)
#: A news server could not be reached or refused an article (a route's nntp
#: action): transient, the sender retries.
NNTP_FAILED = Reply(451, "4.4.0", "Could not post to the news server; try again later", EX_TEMPFAIL)
#: A route's handler raised (emailtunnel answers 451 then too).
HANDLER_FAILED = Reply(451, "4.3.0", "Requested action aborted: error in processing", EX_TEMPFAIL)
NO_HOST_IN_URL = Reply(451, "4.5.2", "No host in the GroupServer URL", EX_USAGE)

# -- permanent failures (the sender bounces) -------------------------------
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
UNRECOGNISED_COMMAND = Reply(500, "5.5.2", "Command not recognised")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Send HELO/EHLO first")
NEED_LHLO = Reply(503, "5.5.1", "Send LHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
NOT_LMTP = Reply(500, "5.5.1", "This is an LMTP server: use LHLO")
NOT_SMTP = Reply(500, "5.5.1", "This is an SMTP server: use EHLO or HELO")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL or RCPT parameter")
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Must declare SMTPUTF8 to send a UTF-8 address")
# An address with a control or line-breaking character (U+0085, U+2028, ...):
# it would go into Return-Path, Received and X-Original-To as it is.
UNSAFE_SENDER = Reply(553, "5.1.7", "Sender address has a control or line-breaking character")
UNSAFE_RECIPIENT = Reply(553, "5.1.3", "Recipient address has a control or line-breaking character")
RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
NO_SUCH_GROUP = Reply(550, "5.1.1", "No such group", EX_NOUSER)
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message too large", EX_DATAERR)
EMPTY_MESSAGE = Reply(554, "5.3.0", "The message is empty", EX_DATAERR)
DATA_LINE_TOO_LONG = Reply(550, "5.6.0", "Message line too long (RFC 5321 §4.5.3.1.6)", EX_DATAERR)
NO_ORIGINAL_TO = Reply(554, "5.1.3", "No X-Original-To header and no list given", EX_DATAERR)
ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
#: More Received fields than max_hops (RFC 5321 §6.3; RFC 3463 X.4.6
#: "routing loop detected").
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops", EX_DATAERR)


class GroupServerError(Exception):
    """
    A call to GroupServer failed. Carries the reply the sender gets.

    @ivar reply: the L{Reply} for the sender (4.4.4 unreachable, 4.5.0 non-200
        or undecodable reply, 4.4.7 timeout, 4.4.2 outcome unknown).
    @ivar outcome_unknown: C{True} when the whole request reached the network
        but no usable answer came back: GroupServer may or may not have acted
        on it. Repeating an add is safe (GroupServer archives a post id once);
        the caller decides for the other pages.
    """

    def __init__(self, reply: Reply, detail: str = "", outcome_unknown: bool = False) -> None:
        super().__init__(reply.status_line() + (f" ({detail})" if detail else ""))
        self.reply = reply
        self.detail = detail
        self.outcome_unknown = outcome_unknown


def reply_for_exception(exc: BaseException | None) -> Reply:
    """
    The reply for any failure of a delivery: a L{GroupServerError}'s own
    reply, else the transient L{LOCAL_ERROR}, never a permanent code: an
    unexpected fault must not bounce good mail.
    """
    if isinstance(exc, GroupServerError):
        return exc.reply
    return LOCAL_ERROR


def worst(replies: list[Reply]) -> Reply:
    """
    The single reply an SMTP (not LMTP) client gets for a transaction whose
    recipients had these outcomes: a transient failure wins (the sender
    retries, and the ledger absorbs the copies that were already posted), then
    a permanent one, else the first success.

    @param replies: at least one reply.
    """
    for r in replies:
        if r.is_transient:
            return r
    for r in replies:
        if r.is_permanent:
            return r
    return replies[0]
