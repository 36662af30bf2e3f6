# -*- test-case-name: tests.outbound.test_submission -*-
"""
The submission listener: where GroupServer (gs.email's XVERPSMTPMailer) and
local applications hand over mail for delivery. It is not for the internet:
it accepts clients from configured networks (loopback and UNIX sockets by
default) or after AUTH over TLS, takes Postfix's C{XVERP} MAIL parameter and
the DSN parameters (RFC 3461), and replies 250 only once the message and its
envelope are fsynced in the outbound queue.
"""

from __future__ import annotations

import hmac
import ipaddress
from base64 import b64decode, b64encode
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail import status
from gsmail.addresses import Address, Route, RouteKind, is_xtext
from gsmail.inbound.delivery import received_from
from gsmail.inbound.protocol import Envelope, InboundFactory, ServerSettings, Session, SMTPServer
from gsmail.inbound.spool import Spool, SpooledMessage, SpoolFiles, release
from gsmail.logtext import printable
from gsmail.status import Reply

__all__ = [
    "SubmissionServer",
    "SubmissionFactory",
    "SubmissionCore",
    "PasswordChecker",
    "parse_networks",
]

log = Logger()

AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_NOT_AVAILABLE = Reply(503, "5.5.1", "AUTH not available")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognised authentication mechanism")
CLIENT_NOT_AUTHORIZED = Reply(
    554, "5.7.1", "Client not authorized to submit mail; authenticate first"
)

_NOTIFY = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}


def parse_networks(
    text: Iterable[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """
    Parse client networks such as C{127.0.0.0/8} and C{::1}.

    @raise ValueError: a network that does not parse.
    """
    return tuple(ipaddress.ip_network(n.strip(), strict=False) for n in text if n.strip())


class PasswordChecker:
    """
    Checks AUTH credentials against the one account of the C{[smtp-*]}
    section (gs.email's C{username}/C{password}), in constant time.
    """

    def __init__(self, username: str, password: str) -> None:
        self._username = username.encode()
        self._password = password.encode()

    def __repr__(self) -> str:
        return "<PasswordChecker>"

    def check(self, username: str, password: str) -> bool:
        """C{True} when both match."""
        ok_user = hmac.compare_digest(username.encode(), self._username)
        ok_password = hmac.compare_digest(password.encode(), self._password)
        return ok_user and ok_password


class IQueue(Protocol):
    """What the submission core needs of the outbound queue."""

    def enqueue(
        self,
        sender: str,
        recipients: list[str],
        data: bytes | str,
        *,
        xverp: bool = False,
        params: dict[str, str] | None = None,
    ) -> Deferred[Any]:
        """Store the message durably; fire with its envelope (which has an C{id})."""


class SubmissionCore:
    """
    The delivery core of the submission listener: every recipient is
    accepted (the client is authorized), and the message is queued.
    """

    def __init__(self, queue: IQueue) -> None:
        self.queue = queue

    def check_recipient(
        self, session: Session, recipient: Address
    ) -> Deferred[tuple[Reply, Route | None]]:
        """
        Accept any recipient for relaying (C{250 2.1.5}), but not the bare
        C{postmaster} (C{501 5.1.3}): it names no host to deliver to.
        """
        if not recipient.domain:
            return succeed((status.BAD_RECIPIENT_SYNTAX.with_text("A domain is needed here"), None))
        return succeed((status.RECIPIENT_OK, Route(RouteKind.REMOTE, recipient)))

    def deliver(
        self, session: Session, envelope: Envelope, message: SpooledMessage
    ) -> Deferred[list[Reply]]:
        """
        Queue the message with its envelope; one C{250 2.0.0 Queued as ID}
        per recipient once it is fsynced, else C{451 4.3.0} (the client keeps
        the message). The spool file is removed either way.
        """
        params: dict[str, str] = {k: v or "" for k, v in envelope.params.items() if k != "XVERP"}
        if envelope.body == "8BITMIME":
            params["BODY"] = "8BITMIME"
        if envelope.smtputf8:
            params["SMTPUTF8"] = ""
        for route in envelope.recipients:
            for key, value in route.params:
                params[f"{key}:{route.recipient}"] = value or ""
        count = len(envelope.recipients)
        d = self.queue.enqueue(
            str(envelope.sender) if envelope.sender else "",
            [str(r.recipient) for r in envelope.recipients],
            message.path,
            xverp="XVERP" in envelope.params,
            params=params,
        )

        def queued(entry: Any) -> list[Reply]:
            log.info(
                "Queued {queue_id} from <{sender}> for {count} recipients (session {session})",
                queue_id=entry.id,
                sender=printable(envelope.sender or ""),
                count=count,
                session=session.id,
            )
            return [status.OK.with_text(f"Queued as {entry.id}")] * count

        def failed(failure: Failure) -> list[Reply]:
            log.failure("Could not queue a message", failure)
            return [
                status.LOCAL_ERROR.with_text("Could not queue the message; try again later")
            ] * count

        def cleanup(result: list[Reply]) -> list[Reply]:
            release(message)
            return result

        return d.addCallbacks(queued, failed).addCallback(cleanup)


class SubmissionServer(SMTPServer):
    """
    ESMTP for submission: the inbound protocol plus client authorization,
    AUTH PLAIN/LOGIN over TLS (RFC 4954), XVERP and DSN parameters.
    """

    factory: SubmissionFactory

    def connectionMade(self) -> None:
        super().connectionMade()
        self.authorized = self._trusted_peer()

    def _trusted_peer(self) -> bool:
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)
        if not isinstance(host, str):
            return True  # a UNIX socket: its file mode decides who may connect
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.factory.trusted_networks)

    def _auth_available(self) -> bool:
        assert self.session is not None
        return self.factory.checker is not None and (
            self.session.tls or self.factory.auth_without_tls
        )

    def _ehlo_lines(self) -> list[str]:
        lines = super()._ehlo_lines()
        lines[1:1] = ["DSN", "XVERP"]
        if self._auth_available():
            lines.append("AUTH PLAIN LOGIN")
        return lines

    def mail_parameter(self, envelope: Envelope, key: str, value: str | None) -> Reply | None:
        if key == "XVERP":
            # Postfix's extension; a value would name other delimiters, which
            # GroupServer never sends.
            if value is not None and value != "+=":
                return status.SYNTAX_ERROR.with_text("Only the XVERP delimiters += are supported")
            envelope.params["XVERP"] = None
            return None
        if key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                return status.SYNTAX_ERROR.with_text("RET must be FULL or HDRS")
            envelope.params["RET"] = value.upper()
            return None
        if key == "ENVID":
            # RFC 3461 §4.4: xtext, at most 100 characters.
            if not value or len(value) > 100 or not is_xtext(value):
                return status.SYNTAX_ERROR.with_text("Bad ENVID parameter (RFC 3461 §4.4)")
            envelope.params["ENVID"] = value
            return None
        if key == "AUTH":
            return None  # RFC 4954 §5: the submitter's identity, informational
        return super().mail_parameter(envelope, key, value)

    def rcpt_parameters(self, params: dict[str, str | None]) -> Reply | None:
        for key, value in params.items():
            if key == "NOTIFY":
                words = set((value or "").upper().split(","))
                if not words <= _NOTIFY or ("NEVER" in words and len(words) > 1):
                    return status.SYNTAX_ERROR.with_text("Bad NOTIFY parameter (RFC 3461 §4.1)")
            elif key == "ORCPT":
                # RFC 3461 §4.2: addr-type ";" xtext, at most 500 characters.
                addr_type, semicolon, address = (value or "").partition(";")
                if (
                    not semicolon
                    or len(value or "") > 500
                    or not addr_type
                    or not address
                    or not is_xtext(addr_type + address)
                ):
                    return status.SYNTAX_ERROR.with_text("Bad ORCPT parameter (RFC 3461 §4.2)")
            else:
                return status.UNKNOWN_PARAMETER.with_text(f"Unsupported parameter {key}")
        return None

    def do_MAIL(self, arg: str) -> None:
        if not self.authorized:
            self._error(CLIENT_NOT_AUTHORIZED)
            return
        super().do_MAIL(arg)

    def do_AUTH(self, arg: str) -> None:
        assert self.session is not None
        if self.session.user is not None:
            self._error(ALREADY_AUTHENTICATED)
            return
        if self.envelope is not None:
            self._error(status.BAD_SEQUENCE.with_text("AUTH not allowed during a transaction"))
            return
        if self.factory.checker is None:
            self._error(AUTH_NOT_AVAILABLE)
            return
        if not self._auth_available():
            self._error(AUTH_NEEDS_TLS)
            return
        mechanism, _, initial = arg.strip().partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            if initial:
                self._auth_plain(initial)
            else:
                self._challenge("", self._auth_plain)
        elif mechanism == "LOGIN":
            if initial:
                self._login_user(initial)
            else:
                self._challenge("Username:", self._login_user)
        else:
            self._error(AUTH_MECHANISM)

    def _challenge(self, prompt: str, then: Any) -> None:
        self.transport.write(b"334 " + b64encode(prompt.encode()) + b"\r\n")
        self._continuation = then

    def _decode(self, line: str) -> str | None:
        if line.strip() == "*":
            self._error(AUTH_CANCELLED)
            return None
        try:
            return b64decode(line.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            self._error(status.SYNTAX_ERROR.with_text("Bad base64 in AUTH"))
            return None

    def _auth_plain(self, line: str) -> None:
        text = self._decode(line)
        if text is None:
            return
        parts = text.split("\0")
        if len(parts) != 3:
            self._error(status.SYNTAX_ERROR.with_text("Bad AUTH PLAIN response"))
            return
        self._finish_auth(parts[1], parts[2])

    def _login_user(self, line: str) -> None:
        user = self._decode(line)
        if user is None:
            return
        self._challenge("Password:", lambda answer: self._login_password(user, answer))

    def _login_password(self, user: str, line: str) -> None:
        password = self._decode(line)
        if password is None:
            return
        self._finish_auth(user, password)

    def _finish_auth(self, user: str, password: str) -> None:
        assert self.session is not None and self.factory.checker is not None
        if self.factory.checker.check(user, password):
            self.session.user = user
            self.authorized = True
            log.info("{peer} authenticated as {user}", peer=self.session.peer, user=printable(user))
            self._reply(AUTH_OK)
        else:
            log.warn("Failed AUTH from {peer}", peer=self.session.peer)
            self._error(AUTH_FAILED)

    def data_started(self, spool: Spool) -> None:
        assert self.session is not None
        session = self.session
        date = format_datetime(datetime.fromtimestamp(self.factory.clock.seconds(), UTC))
        spool.write(
            (
                f"Received: {received_from(session)}\n"
                f"\tby {self.factory.settings.hostname} (gsmail) with {session.with_protocol}"
                f" id {session.id}; {date}\n"
            ).encode()
        )


class SubmissionFactory(InboundFactory):
    """
    Builds L{SubmissionServer} connections.

    @param trusted_networks: client networks that may submit without AUTH.
    @param checker: the AUTH account, or C{None}: no AUTH offered.
    @param auth_without_tls: offer AUTH on plaintext connections too (for a
        listener on loopback only).
    """

    def __init__(
        self,
        core: SubmissionCore,
        settings: ServerSettings,
        clock: IReactorTime,
        *,
        trusted_networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = (
            ipaddress.ip_network("127.0.0.0/8"),
            ipaddress.ip_network("::1/128"),
        ),
        checker: PasswordChecker | None = None,
        auth_without_tls: bool = False,
        spool_dir: str = "",
        spool_files: SpoolFiles | None = None,
    ) -> None:
        super().__init__(core, settings, clock, spool_dir=spool_dir, spool_files=spool_files)
        self.protocol = SubmissionServer  # type: ignore[assignment]
        self.trusted_networks = tuple(trusted_networks)
        self.checker = checker
        self.auth_without_tls = auth_without_tls
