# -*- test-case-name: tests.outbound.test_submission -*-
"""
The submission listener: where GroupServer (gs.email's XVERPSMTPMailer, a
zope.sendmail C{SMTPMailer}) and local applications hand over mail for
delivery. It is not for the internet: it accepts clients from its trusted
networks (Postfix's C{mynetworks}: loopback by default; UNIX-socket clients
always) or after AUTH, takes Postfix's C{XVERP} MAIL parameter and the DSN
parameters (RFC 3461), and replies 250 only once the message and its
envelope are fsynced in the outbound queue.

Who may do what (the C{[smtp-NAME]} options describe GroupServer's side of
this connection, so they shape this listener and nothing else):

  - AUTH PLAIN/LOGIN (RFC 4954) is offered once a password is configured:
    over plain TCP to trusted clients (zope.sendmail calls C{login()} on
    whatever connection it has, and smtplib's C{login()} needs C{AUTH} in
    the EHLO reply), and to everyone else only after STARTTLS
    (C{538 5.7.11} before), as Postfix's C{smtpd_tls_auth_only} does;
  - the TLS level (Postfix's C{smtpd_tls_security_level}): C{may} offers
    STARTTLS when a certificate is configured; C{none} (C{no_tls}) never
    offers it, as GroupServer would not use it; C{encrypt} (C{force_tls})
    requires it of every TCP client, trusted ones included, before MAIL
    (C{530 5.7.0 Must issue a STARTTLS command first}, RFC 3207 §4) and
    AUTH, since that is what C{force_tls} says of the connection; clients on
    a UNIX socket never leave the host and are exempt.
"""

from __future__ import annotations

import hmac
import ipaddress
from base64 import b64decode, b64encode
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gsmail import maillog, status
from gsmail.addresses import Address, Route, RouteKind
from gsmail.anvil import Anvil, auth_locked, parse_networks
from gsmail.inbound.delivery import received_from
from gsmail.inbound.protocol import Envelope, InboundFactory, ServerSettings, Session, SMTPServer
from gsmail.inbound.spool import Spool, SpoolAlarm, SpooledMessage, SpoolFiles, release
from gsmail.logtext import printable
from gsmail.outbound.dsn.params import parse_envid, parse_notify, parse_orcpt
from gsmail.status import Reply

__all__ = [
    "TLS_LEVELS",
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
#: RFC 3207 §4, Postfix's words, for C{tls_security_level = "encrypt"}.
STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")

#: The submission listener's TLS levels (Postfix's C{smtpd_tls_security_level}).
TLS_LEVELS = ("none", "may", "encrypt")


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
        dsn: Sequence[tuple[str, str]] | None = None,
        sign: bool = False,
    ) -> Deferred[Any]:
        """
        Store the message durably (DKIM-signed with C{sign}, when a key is
        configured for its domain); fire with its envelope (which has an C{id}).
        """


class SubmissionCore:
    """
    The delivery core of the submission listener: every recipient is
    accepted (the client is authorized), and the message is queued.

    @param alarm: logs queue write faults once per burst (default: its own,
        without reminders).
    """

    def __init__(self, queue: IQueue, alarm: SpoolAlarm | None = None) -> None:
        self.queue = queue
        self.alarm = alarm or SpoolAlarm("queueing")

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
        per recipient once it is fsynced. Else (the client keeps the
        message): C{452 4.3.1} when the queue's disk is full or failing
        (C{ENOSPC}, C{EDQUOT}, C{EIO}; logged once per burst), C{451 4.3.0}
        for any other fault. The spool file is removed either way.

        The DSN parameters (RFC 3461) go with it: C{RET} and C{ENVID} among
        the MAIL parameters, each recipient's C{NOTIFY} (normalised) and
        C{ORCPT} (xtext-decoded) in its own state.
        """
        params: dict[str, str] = {k: v or "" for k, v in envelope.params.items() if k != "XVERP"}
        if envelope.body == "8BITMIME":
            params["BODY"] = "8BITMIME"
        if envelope.smtputf8:
            params["SMTPUTF8"] = ""
        dsn_params: list[tuple[str, str]] = []
        for route in envelope.recipients:
            given = dict(route.params)
            # Checked by rcpt_parameters already.
            notify = parse_notify(given["NOTIFY"]) if "NOTIFY" in given else ""
            orcpt = parse_orcpt(given["ORCPT"]) if "ORCPT" in given else ""
            dsn_params.append((notify, orcpt))
        count = len(envelope.recipients)
        d = self.queue.enqueue(
            str(envelope.sender) if envelope.sender else "",
            [str(r.recipient) for r in envelope.recipients],
            message.path,
            xverp="XVERP" in envelope.params,
            params=params,
            dsn=dsn_params if any(n or o for n, o in dsn_params) else None,
            # Submitted by GroupServer (or another authorized client): its
            # mail, signed by the site's domain.
            sign=True,
        )

        def queued(entry: Any) -> list[Reply]:
            self.alarm.succeeded()
            client = maillog.client_name(session.peer)
            maillog.client(entry.id, client, log=log, session=session.id, listener="submission")
            maillog.queued(
                entry.id,
                str(envelope.sender) if envelope.sender else "",
                message.size,
                count,
                "submission",
                log=log,
                session=session.id,
            )
            return [status.OK.with_text(f"Queued as {entry.id}")] * count

        def failed(failure: Failure) -> list[Reply]:
            if isinstance(failure.value, OSError):
                return [self.alarm.failed(failure.value, "the outbound queue")] * count
            log.failure("Could not queue a message", failure)
            return [
                status.LOCAL_ERROR.with_text("Could not queue the message; try again later")
            ] * count

        def cleanup(result: list[Reply]) -> list[Reply]:
            try:
                release(message)
            except OSError as e:
                # Never turn a 250 into a failure: the message is queued.
                log.warn(
                    "Could not remove the spool file {path}: {error}", path=message.path, error=e
                )
            return result

        return d.addCallbacks(queued, failed).addCallback(cleanup)


class SubmissionServer(SMTPServer):
    """
    ESMTP for submission: the inbound protocol plus client authorization,
    AUTH PLAIN/LOGIN (RFC 4954; over plain TCP for trusted clients only),
    the TLS level, XVERP and the DSN parameters (RFC 3461). See the module
    docstring for who may do what.

    @ivar trusted: the client is in the trusted networks or on a UNIX socket.
    @ivar authorized: it may submit: trusted, or authenticated.
    """

    factory: SubmissionFactory
    listener_name = "submission"
    # The outbound queue's id names the message from its client= line on.
    assigns_queue_ids = False

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()
        # A UNIX socket: its file mode decides who may connect.
        self.local_socket = not isinstance(getattr(peer, "host", None), str)
        self.trusted = self.local_socket or self._trusted_peer(peer.host)
        self.authorized = self.trusted

    def _trusted_peer(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.factory.trusted_networks)

    def _tls_required(self) -> bool:
        """C{encrypt} and no TLS yet on a TCP connection: MAIL and AUTH must wait."""
        assert self.session is not None
        return (
            self.factory.tls_security_level == "encrypt"
            and not self.session.tls
            and not self.local_socket
        )

    def _auth_available(self) -> bool:
        """AUTH now: a password is set, and TLS is on or the client is trusted."""
        assert self.session is not None
        if self.factory.checker is None or self._tls_required():
            return False
        return self.session.tls or self.trusted

    def _can_start_tls(self) -> bool:
        return self.factory.tls_security_level != "none" and super()._can_start_tls()

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
            try:
                envelope.params["ENVID"] = parse_envid(value)
            except ValueError as e:
                return status.SYNTAX_ERROR.with_text(f"Bad ENVID parameter: {e}")
            return None
        if key == "AUTH":
            return None  # RFC 4954 §5: the submitter's identity, informational
        return super().mail_parameter(envelope, key, value)

    def rcpt_parameters(self, params: dict[str, str | None]) -> Reply | None:
        """
        Check the RCPT parameters: C{NOTIFY} (RFC 3461 §4.1) and C{ORCPT}
        (§4.2, xtext).

        @return: C{None} when accepted, else C{501 5.5.4} for a bad value or
            C{555 5.5.4} for another parameter.
        """
        for key, value in params.items():
            try:
                if key == "NOTIFY":
                    parse_notify(value)
                elif key == "ORCPT":
                    parse_orcpt(value)
                else:
                    return status.UNKNOWN_PARAMETER.with_text(f"Unsupported parameter {key}")
            except ValueError as e:
                return status.SYNTAX_ERROR.with_text(f"Bad {key} parameter: {e}")
        return None

    def do_MAIL(self, arg: str) -> None:
        if self._tls_required():
            self._error(STARTTLS_FIRST)
            return
        if not self.authorized:
            self._error(CLIENT_NOT_AUTHORIZED)
            return
        super().do_MAIL(arg)

    def do_STARTTLS(self, arg: str) -> None:
        assert self.session is not None
        before = self.session.tls
        super().do_STARTTLS(arg)
        if self.session.tls and not before:
            # RFC 3207 §4.2: nothing learnt in clear counts after TLS, a
            # login included; a trusted client stays trusted.
            self.session.user = None
            self.authorized = self.trusted

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
        host = self._limited_host
        if host is not None and not self.factory.anvil.auth_allowed(host):
            # A password guesser: refused without a check until its window
            # ends (the lock-out was logged once, by the anvil).
            self._stage = None
            self._reply(auth_locked(host))
            self._close()
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
        elif self._limited_host is not None:
            # Counted per client and logged once per burst by the anvil
            # (not as a reject line per try); each failure is answered
            # slowly (auth_failure_delay).
            self._stage = None
            self.factory.anvil.auth_failed(self._limited_host)
            self._error(AUTH_FAILED, delay=self.factory.settings.auth_failure_delay)
        else:
            self._error(AUTH_FAILED)  # logged as a reject line (AUTH)

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

    @param trusted_networks: client networks that may submit without AUTH,
        and authenticate over plain TCP (Postfix's C{mynetworks}); clients
        on a UNIX socket are always trusted.
    @param checker: the AUTH account, or C{None}: no AUTH offered
        (C{503 5.5.1}).
    @param tls_security_level: C{"may"}: STARTTLS offered when
        C{settings.tls} is set; C{"none"}: never offered (gs.email's
        C{no_tls}); C{"encrypt"}: required of TCP clients before MAIL
        (C{530 5.7.0}) and AUTH (C{538 5.7.11}) (gs.email's C{force_tls}).
    @param anvil: the per-client counters (L{gsmail.anvil.Anvil}): failed
        AUTH from a client outside its exception networks is answered after
        C{settings.auth_failure_delay} seconds, and past its
        C{client_auth_failure_limit} AUTH gets C{421 4.7.0} unchecked.
    @raise ValueError: an unknown C{tls_security_level}, or C{"encrypt"}
        without C{settings.tls}.
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
        tls_security_level: str = "may",
        spool_dir: str = "",
        spool_files: SpoolFiles | None = None,
        spool_alarm: SpoolAlarm | None = None,
        anvil: Anvil | None = None,
    ) -> None:
        if tls_security_level not in TLS_LEVELS:
            raise ValueError(f"tls_security_level must be one of {TLS_LEVELS}")
        if tls_security_level == "encrypt" and settings.tls is None:
            raise ValueError("tls_security_level 'encrypt' needs a TLS certificate (settings.tls)")
        super().__init__(
            core,
            settings,
            clock,
            spool_dir=spool_dir,
            spool_files=spool_files,
            spool_alarm=spool_alarm,
            anvil=anvil,
        )
        self.protocol = SubmissionServer  # type: ignore[assignment]
        self.trusted_networks = tuple(trusted_networks)
        self.checker = checker
        self.tls_security_level = tls_security_level
