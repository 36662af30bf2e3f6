# -*- test-case-name: tests.test_config -*-
"""
gsmail's configuration, read from GroupServer's own C{gsconfig.ini} with the
gs.config scheme, so one file serves GroupServer and gsmail.

An instance (default C{default}) is a section C{[config-INSTANCE]} whose
options map a configuration type to a name; the options of that type live in
C{[TYPE-NAME]}. gsmail reads three types: C{webservice} (the token),
C{smtp} (C{relay-address-prefix}) and its own C{gsmail}. The short form with
no C{[config-INSTANCE]} section and bare C{[webservice-INSTANCE]} /
C{[gsmail-INSTANCE]} sections is accepted too.

L{load_config} runs once at start-up, before the reactor: it reads the file
and checks that TLS files are readable synchronously, which is fine there and
nowhere else. Every option is described in C{docs/configuration.md}.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import os
import re
import tempfile
from collections.abc import Iterable
from configparser import (
    ConfigParser,
    DuplicateOptionError,
    DuplicateSectionError,
    MissingSectionHeaderError,
    ParsingError,
)
from configparser import Error as ConfigParserError
from socket import getfqdn
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import attrs
from twisted.logger import Logger

from gsmail.addresses import AddressError, parse_mailbox

__all__ = [
    "ConfigError",
    "GsmailConfig",
    "PipeConfig",
    "load_config",
    "load_pipe_config",
    "parse_bool",
    "parse_duration",
    "verp_key_path",
]

log = Logger()

#: The largest C{reply_deadline}, in seconds. Postfix waits
#: C{lmtp_data_done_timeout} / C{smtp_data_done_timeout} (600 s) for the reply
#: to the end of DATA; answering later makes it retry a message gsmail may
#: already have posted. Ten seconds of margin for the network and the queue.
MAX_REPLY_DEADLINE: Final = 590.0
#: The most inbound worker processes C{inbound_workers} may ask for.
MAX_INBOUND_WORKERS: Final = 64

#: The smallest C{max_line_length}: RFC 5321 §4.5.3.1.6 lets a text line be
#: 1000 octets including CRLF, so a receiver must take at least that.
MIN_LINE_LENGTH: Final = 1000

_MIB: Final = 1024 * 1024
_ENDPOINT_TYPES: Final = ("tcp", "tcp6", "unix", "ssl", "tls", "systemd")
_TRUE: Final = frozenset({"true", "yes", "on", "1"})
_FALSE: Final = frozenset({"false", "no", "off", "0"})
_UNIT_SECONDS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)", re.IGNORECASE)
_LIST_SEPARATOR: Final = re.compile(r"[\s,]+")
_ASCII_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_SECTION_HEADER: Final = re.compile(r"\s*\[([^\]]+)\]")

# Which arguments of an endpoint string are file names, by endpoint type:
# (positional indexes, keyword names). See twisted.internet.endpoints.
_ENDPOINT_PATHS: Final[dict[str, tuple[tuple[int, ...], tuple[str, ...]]]] = {
    "unix": ((0,), ("address",)),
    "tls": ((0,), ("path",)),
    "ssl": ((), ("privateKey", "certKey", "extraCertChain", "dhParameters")),
}


class ConfigError(Exception):
    """
    The configuration cannot be used. C{str()} is one line naming the file,
    the section and the option; it never contains the token or a password.

    The pipe-compatible command answers it with 4.3.5 (EX_CONFIG); the
    daemon refuses to start.
    """


#: The header fields DKIM signs when present (C{dkim_sign_headers};
#: L{gsmail.signing}); C{List-*} stands for every field whose name starts
#: with C{List-} (RFC 2369, 2919).
DEFAULT_SIGN_HEADERS: tuple[str, ...] = (
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "List-*",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
)


@attrs.frozen
class GsmailConfig:
    """
    Everything gsmail needs to run one site, validated.

    Durations are seconds, sizes bytes (the file gives C{max_size} in MiB).
    """

    path: str
    instance: str
    # -- GroupServer ------------------------------------------------------
    url: str  # "embedded" or http(s)://host[:port][/path]
    token: str = attrs.field(repr=False)
    verify_tls: bool = True
    connect_timeout: float = 8.0
    response_timeout: float = 240.0
    post_concurrency: int = 4
    time_source: str = "server"
    relay_address_prefix: str = "p-"
    group_cache_ttl: float = 300.0
    group_negative_cache_ttl: float = 60.0
    # -- listeners ----------------------------------------------------------
    smtp_endpoint: str = ""
    lmtp_endpoint: str = ""
    hostname: str = "localhost"
    domains: tuple[str, ...] = ()
    tls_certificate: str = ""
    tls_key: str = ""
    tls_ciphers: str = "intermediate"  # gsmail.tlsconfig.CIPHER_PROFILES
    # 0: the main process accepts inbound sessions; N: N worker processes do
    inbound_workers: int = 0
    # -- limits ----------------------------------------------------------------
    max_size: int = 200 * 1024 * 1024
    max_recipients: int = 100
    max_connections: int = 1000
    max_line_length: int = 8192
    idle_timeout: float = 300.0
    reply_deadline: float = 540.0
    listen_backlog: int = 1024
    # -- abuse limits (gsmail.anvil; Postfix's anvil and smtpd error limits) ---
    client_limit_exceptions: tuple[str, ...] = ("127.0.0.0/8", "::1")
    client_connection_count_limit: int = 50
    client_connection_rate_limit: int = 300
    anvil_rate_time_unit: float = 60.0
    client_lookup_rate_limit: int = 300
    session_lookup_limit: int = 200
    client_auth_failure_limit: int = 10
    auth_failure_delay: float = 1.0
    soft_error_limit: int = 10
    hard_error_limit: int = 20
    error_sleep_time: float = 1.0
    junk_command_limit: int = 100
    min_data_rate: int = 500
    # -- state on disk ---------------------------------------------------------
    spool_dir: str = ""
    ledger_path: str = "/var/lib/gsmail/ledger"
    ledger_ttl: float = 7 * 24 * 3600.0
    # Mail to postmaster (RFC 5321 §4.5.1): forwarded to postmaster_address
    # through the outbound queue when both are set, else kept in this Maildir.
    postmaster_maildir: str = "/var/lib/gsmail/postmaster"
    postmaster_address: str = ""
    # -- routes (gsmail.routes: aliases, forwarding, policy, archive, news) ----
    routes: str = ""  # the route file; "": postmaster@ and abuse@ only
    route_state_dir: str = "/var/lib/gsmail/routes"  # sequence numbers
    errors_dir: str = "/var/lib/gsmail/errors"
    rejected_dir: str = "/var/lib/gsmail/rejected"
    srs_domain: str = ""  # "": the first of domains
    max_hops: int = 30  # Received fields; more: 554 5.4.6 (RFC 5321 §6.3)
    # -- running (gsmail.privileges): UNIX listener sockets after twistd -u/-g
    # drops root; "" group: the group gsmail runs as --------------------------
    unix_socket_group: str = ""
    unix_socket_mode: int = 0o660
    # twistd's log as JSON lines (twisted.logger's eventAsJSON), not text
    log_json: bool = False
    # -- signed VERP (gsmail.verp); "" key file: verp.key beside the ledger ---
    verp_key_file: str = ""
    verp_max_age: float = 14 * 24 * 3600.0
    verp_unsigned_until: str = "auto"  # auto, always, never or YYYY-MM-DD
    # -- the embedded stand-in (url = embedded) --------------------------------
    standin_dir: str = "/var/lib/gsmail/standin"
    standin_groups: tuple[str, ...] = ()
    standin_endpoint: str = "tcp:0:interface=127.0.0.1"
    # -- outbound (the submission listener, the queue, delivery) ---------------
    submission_endpoint: str = ""
    submission_networks: tuple[str, ...] = ("127.0.0.0/8", "::1")
    queue_dir: str = "/var/spool/gsmail/outbound"
    control_socket: str = ""  # "": <queue_dir>/control (gsmail.control.control_path)
    relayhost: str = ""
    relayhost_username: str = ""
    relayhost_password: str = attrs.field(default="", repr=False)
    tls_name: str = ""
    tls_ca: str = ""
    # delivery TLS (Postfix's smtp_tls_security_level): none, may, encrypt
    smtp_tls_security_level: str = "may"
    mx_tls: str = ""  # "": as smtp_tls_security_level
    mx_port: int = 25
    dns_servers: tuple[str, ...] = ()
    queue_lifetime: float = 5 * 24 * 3600.0
    delay_warning_time: float = 4 * 3600.0  # 0: no delay warnings
    outbound_connections: int = 100
    destination_concurrency: int = 20
    batch_size: int = 50
    relayhost_xverp: bool = False
    smtp_trace: bool = False
    # -- deliverability (gsmail.signing, gsmail.inbound.authresults) -----------
    # DKIM keys, DOMAIN:SELECTOR:KEYFILE each (file names made absolute)
    dkim_keys: tuple[str, ...] = ()
    dkim_sign_headers: tuple[str, ...] = DEFAULT_SIGN_HEADERS
    arc_seal: bool = False
    # SPF, DKIM and DMARC checks of mail from the internet (ESMTP listener)
    authentication_results: bool = True
    auth_check_time: float = 5.0
    auth_check_exceptions: tuple[str, ...] = ("127.0.0.0/8", "::1")
    # MTA-STS (RFC 8461) for MX delivery; "" cache dir: mta-sts beside the ledger
    mta_sts: bool = True
    mta_sts_cache_dir: str = ""
    mta_sts_timeout: float = 30.0
    # TLS-RPT (RFC 8460) counts per policy domain and day, in <cache dir>/tlsrpt
    tls_rpt: bool = False
    # -- from GroupServer's [smtp-NAME] section (gs.email's options): they
    # describe GroupServer's connection to the submission listener ------------
    smtp_username: str = ""
    smtp_password: str = attrs.field(default="", repr=False)
    no_tls: bool = False
    force_tls: bool = False
    queuepath: str = ""
    processorthread: bool = True
    # -- metrics and health (gsmail.metrics); "" endpoint: off ------------------
    metrics_endpoint: str = ""
    readyz_min_free: int = 100 * 1024 * 1024  # bytes (MiB in the file); 0: off


#: Options read from the [smtp-NAME] section, by GsmailConfig field.
_SMTP_OPTIONS: Final = {
    "smtp_username": "username",
    "smtp_password": "password",
    "no_tls": "no_tls",
    "force_tls": "force_tls",
    "queuepath": "queuepath",
    "processorthread": "processorthread",
}

# The options of the [gsmail-NAME] section are the field names above, less
# those that come from elsewhere.
_GSMAIL_OPTIONS: Final = frozenset(
    field.name
    for field in attrs.fields(GsmailConfig)
    if field.name not in {"path", "instance", "token", "relay_address_prefix", *_SMTP_OPTIONS}
)
_DEFAULTS: Final[dict[str, Any]] = {
    field.name: field.default
    for field in attrs.fields(GsmailConfig)
    if field.default is not attrs.NOTHING
}


def parse_duration(text: str) -> float:
    """
    Parse a duration: a number of seconds, or a number followed by C{s},
    C{m}, C{h} or C{d} (seconds, minutes, hours, days; any case), such as
    C{90}, C{1.5}, C{90s}, C{15m}, C{7d}. Surrounding space is ignored.

    @param text: the duration as written in the configuration file.
    @return: the duration in seconds, zero or more.
    @raise ValueError: C{text} is not of that form (negative numbers
        included); the message quotes it.
    """
    match = _DURATION.fullmatch(text.strip())
    if match is not None:
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
        if math.isfinite(seconds):
            return seconds
    raise ValueError(
        f"expected a duration in seconds, or with a suffix s, m, h or d (90, 15m, 7d), got {text!r}"
    )


def parse_bool(text: str) -> bool:
    """
    Parse a boolean as gs.config writes them: C{true}, C{yes}, C{on}, C{1}
    or C{false}, C{no}, C{off}, C{0}, in any case, surrounding space ignored.

    @param text: the value as written in the configuration file.
    @raise ValueError: anything else; the message quotes it.
    """
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"expected true/yes/on/1 or false/no/off/0, got {text!r}")


def load_config(path: str, instance: str = "default") -> GsmailConfig:
    """
    Read and validate C{path}, the gs.config file, for one instance.

    Options missing from the file take the defaults of L{GsmailConfig}, except
    C{hostname} (default: this host's fully qualified name) and C{spool_dir}
    (default: the system's temporary directory). Relative file names, also
    those inside endpoint strings, are taken relative to the directory that
    holds C{path}. Unknown options are ignored, as gs.config does; those in
    the C{gsmail} section are logged, since they are usually typing errors.

    Blocking: it reads files and may look up this host's name. Call it
    before the reactor runs.

    @param path: the configuration file, such as C{/etc/gsconfig.ini}.
    @param instance: the gs.config instance; its sections are
        C{[config-INSTANCE]} or, in the short form, C{[webservice-INSTANCE]}
        and C{[gsmail-INSTANCE]}.
    @raise ConfigError: missing or unreadable file, missing section or
        option, or a value of the wrong form; the message is one line naming
        file, section and option, and never the token. The pipe-compatible
        command answers 4.3.5 (EX_CONFIG).
    """
    if not instance or instance != instance.strip() or "]" in instance:
        raise ConfigError(f"{path}: bad instance name {instance!r}")
    parser = _parse(path)
    reader = _Reader(path, os.path.dirname(os.path.abspath(path)), parser)
    webservice, smtp, gsmail = _find_sections(reader, instance)
    token = reader.token(webservice)
    reader.secret = token
    relay_prefix = "p-" if smtp is None else reader.relay_prefix(smtp)
    reader.warn_unknown(gsmail)
    config = reader.gsmail(gsmail, instance, token, relay_prefix)
    config = attrs.evolve(config, **reader.verp(gsmail), **reader.limits(gsmail))
    config = attrs.evolve(config, **reader.routes(gsmail, config.domains))
    config = attrs.evolve(config, **reader.running(gsmail))
    config = attrs.evolve(config, **reader.outbound(gsmail, smtp))
    config = attrs.evolve(config, **reader.monitoring(gsmail))
    return attrs.evolve(config, **reader.deliverability(gsmail))


@attrs.frozen
class PipeConfig:
    """
    What the pipe-compatible C{smtp2gs} command (L{gsmail.script}) reads from
    the gs.config file: the token, the relay prefix and, when the instance
    has a C{gsmail} section, the daemon's ledger and client settings.

    Durations are seconds.

    @ivar ledger_path: the post ledger the daemon uses (C{ledger_path} of the
        C{gsmail} section, or its default), so that a message that comes
        once through the pipe and once over LMTP is posted once; C{""} when
        the instance has no C{gsmail} section: no ledger, as the old command.
    """

    path: str
    instance: str
    token: str = attrs.field(repr=False)
    relay_address_prefix: str = "p-"
    ledger_path: str = ""
    ledger_ttl: float = 7 * 24 * 3600.0
    connect_timeout: float = 8.0
    response_timeout: float = 240.0
    verify_tls: bool = True
    verp_key_file: str = ""
    verp_max_age: float = 14 * 24 * 3600.0
    verp_unsigned_until: str = "always"
    #: The daemon makes the VERP senders itself (a submission listener
    #: without relayhost_xverp): C{auto} then ends the unsigned window.
    verp_signing: bool = False


def load_pipe_config(path: str, instance: str = "default") -> PipeConfig:
    """
    Read what C{smtp2gs} needs from C{path}, the gs.config file, for one
    instance: the C{webservice} section's C{token} (required), the C{smtp}
    section's C{relay-address-prefix} (optional section, default C{p-}) and,
    if the instance has a C{gsmail} section, its C{ledger_path},
    C{ledger_ttl}, C{connect_timeout}, C{response_timeout} and
    C{verify_tls} (each with the daemon's default when absent). Nothing else
    of the C{gsmail} section is read or checked, so a file that only the old
    smtp2gs used works unchanged.

    Sections are found as L{load_config} finds them: C{[config-INSTANCE]}
    naming C{webservice}, C{smtp} and C{gsmail} sections (only C{webservice}
    required), or the short form C{[webservice-INSTANCE]} with optional
    C{[smtp-INSTANCE]} and C{[gsmail-INSTANCE]}. Relative paths are relative
    to the file's directory. Blocking: call it before the reactor runs.

    @param path: the configuration file.
    @param instance: the gs.config instance (C{smtp2gs --instance}).
    @raise ConfigError: missing or unreadable file, missing section or token,
        or a value of the wrong form; one line naming file, section and
        option, never the token. C{smtp2gs} answers C{4.3.5} (exit 78,
        EX_CONFIG), which Postfix defers.
    """
    if not instance or instance != instance.strip() or "]" in instance:
        raise ConfigError(f"{path}: bad instance name {instance!r}")
    parser = _parse(path)
    reader = _Reader(path, os.path.dirname(os.path.abspath(path)), parser)
    config = f"config-{instance}"
    if parser.has_section(config):
        webservice = reader.named_section(config, "webservice")
        smtp = reader.named_section(config, "smtp", required=False)
        gsmail = reader.named_section(config, "gsmail", required=False)
        assert webservice is not None
    else:
        webservice = f"webservice-{instance}"
        if not parser.has_section(webservice):
            raise ConfigError(
                f"{path}: no section [{config}] (instance {instance!r}) "
                f"and no short-form section [{webservice}]"
            )
        smtp = f"smtp-{instance}" if parser.has_section(f"smtp-{instance}") else None
        gsmail = f"gsmail-{instance}" if parser.has_section(f"gsmail-{instance}") else None
    token = reader.token(webservice)
    reader.secret = token
    relay_prefix = "p-" if smtp is None else reader.relay_prefix(smtp)
    if gsmail is None:
        return PipeConfig(
            path=os.path.abspath(path),
            instance=instance,
            token=token,
            relay_address_prefix=relay_prefix,
        )
    return PipeConfig(
        path=os.path.abspath(path),
        instance=instance,
        token=token,
        relay_address_prefix=relay_prefix,
        ledger_path=reader.path_option(gsmail, "ledger_path"),
        ledger_ttl=reader.duration(gsmail, "ledger_ttl"),
        connect_timeout=reader.duration(gsmail, "connect_timeout"),
        response_timeout=reader.duration(gsmail, "response_timeout"),
        verify_tls=reader.boolean(gsmail, "verify_tls"),
        verp_signing=bool(reader.endpoint(gsmail, "submission_endpoint"))
        and not reader.boolean(gsmail, "relayhost_xverp"),
        **reader.verp(gsmail),
    )


def _parse(path: str) -> ConfigParser:
    """
    Read C{path} into a parser, turning every failure into a L{ConfigError}
    that quotes no line of the file (a malformed line may hold the token).
    """
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: cannot read: not UTF-8 text (at offset {error.start})"
        ) from None
    parser = ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";", "#"),
        strict=True,
    )
    try:
        parser.read_string(text, source=path)
    except MissingSectionHeaderError as error:
        raise ConfigError(
            f"{path}: line {error.lineno}: expected a [section] header before the first option"
        ) from None
    except ParsingError as error:
        lineno = error.errors[0][0]
        more = f" (and {len(error.errors) - 1} more)" if len(error.errors) > 1 else ""
        section = _section_at(text, lineno)
        raise ConfigError(
            f"{path}: [{section}] line {lineno}: expected 'name = value'{more}"
        ) from None
    except DuplicateSectionError as error:
        raise ConfigError(
            f"{path}: line {error.lineno}: section [{error.section}] appears twice"
        ) from None
    except DuplicateOptionError as error:
        raise ConfigError(
            f"{path}: [{error.section}] {error.option}: appears twice (line {error.lineno})"
        ) from None
    except ConfigParserError as error:
        # No message: configparser's messages may quote the line.
        raise ConfigError(f"{path}: cannot parse ({type(error).__name__})") from None
    return parser


def _section_at(text: str, lineno: int) -> str:
    """
    The name of the section that line C{lineno} (1-based) of C{text} is in.
    """
    for line in reversed(text.splitlines()[: lineno - 1]):
        match = _SECTION_HEADER.match(line)
        if match is not None:
            return match.group(1)
    return "?"


def _find_sections(reader: _Reader, instance: str) -> tuple[str, str | None, str]:
    """
    Find the C{webservice}, C{smtp} (optional) and C{gsmail} sections of
    C{instance}, in the full form (C{[config-INSTANCE]}) or the short form.
    """
    parser = reader.parser
    config = f"config-{instance}"
    if parser.has_section(config):
        webservice = reader.named_section(config, "webservice")
        smtp = reader.named_section(config, "smtp", required=False)
        gsmail = reader.named_section(config, "gsmail")
        assert webservice is not None and gsmail is not None
        return webservice, smtp, gsmail
    webservice = f"webservice-{instance}"
    gsmail = f"gsmail-{instance}"
    missing = [name for name in (webservice, gsmail) if not parser.has_section(name)]
    if len(missing) == 2:
        raise ConfigError(
            f"{reader.path}: no section [{config}] (instance {instance!r}) "
            f"and no short-form sections [{webservice}] and [{gsmail}]"
        )
    if missing:
        raise ConfigError(
            f"{reader.path}: no section [{missing[0]}] "
            f"(instance {instance!r} in the short form, without [{config}])"
        )
    smtp = f"smtp-{instance}"
    return webservice, (smtp if parser.has_section(smtp) else None), gsmail


def _split_unescaped(text: str, separator: str, limit: int = -1) -> list[str]:
    """
    Split an endpoint description at each C{separator} not escaped by a
    backslash, as C{twisted.internet.endpoints} does; the escapes are kept.
    At most C{limit} splits are made (C{-1}: no limit).
    """
    parts: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            current.append(char + next(chars, ""))
        elif char == separator and limit != len(parts):
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    """Undo endpoint escapes: a backslash takes the next character as is."""
    return re.sub(r"\\(.)", r"\1", text)


def _escape(text: str) -> str:
    """Escape a file name for an endpoint argument."""
    return re.sub(r"([\\:=])", r"\\\1", text)


def _resolve_endpoint_paths(endpoint: str, base: str) -> str:
    """
    Make the relative file names in an endpoint string (a UNIX socket, TLS
    keys and certificates) relative to C{base} instead of the working
    directory, which twistd may change.
    """
    fields = _split_unescaped(endpoint, ":")
    positions, keywords = _ENDPOINT_PATHS.get(fields[0].strip().lower(), ((), ()))
    positional = 0
    for index, field in enumerate(fields[1:], start=1):
        pair = _split_unescaped(field, "=", limit=1)
        if len(pair) == 2:
            key, value = pair
            if key not in keywords:
                continue
            prefix = key + "="
        else:
            value = field
            positional += 1
            if positional - 1 not in positions:
                continue
            prefix = ""
        name = _unescape(value)
        if name and not os.path.isabs(name):
            fields[index] = prefix + _escape(os.path.normpath(os.path.join(base, name)))
    return ":".join(fields)


@attrs.define
class _Reader:
    """
    Reads and checks the options of the parsed file, and words the errors.

    @ivar path: the file name as given, for messages.
    @ivar base: the absolute directory of the file, for relative paths.
    @ivar secret: the token once read, scrubbed from every message.
    """

    path: str
    base: str
    parser: ConfigParser
    secret: str = attrs.field(default="", repr=False)

    def error(self, section: str, option: str, problem: str) -> ConfigError:
        """
        A one-line L{ConfigError} naming the file, C{section} and C{option}.
        """
        message = f"{self.path}: [{section}] {option}: {problem}"
        # Belt and braces: a token pasted into another option stays hidden.
        if len(self.secret) >= 4:
            message = message.replace(self.secret, "<token>")
        return ConfigError(message.replace("\r", "\\r").replace("\n", "\\n"))

    def raw(self, section: str, option: str) -> str | None:
        """
        The stripped value of C{option}, or C{None} when it is absent.
        """
        value = self.parser.get(section, option, fallback=None)
        return None if value is None else value.strip()

    def line(self, section: str, option: str) -> str | None:
        """
        Like L{raw} for options that take one line (no continuation lines).
        """
        value = self.raw(section, option)
        if value is not None and "\n" in value:
            raise self.error(section, option, "must be on one line")
        return value

    def named_section(self, config: str, kind: str, required: bool = True) -> str | None:
        """
        The section C{[KIND-NAME]} that C{[config]} names with C{kind = NAME}.
        """
        name = self.line(config, kind)
        if not name:
            if required:
                raise self.error(config, kind, f"missing: name the [{kind}-NAME] section to use")
            return None
        section = f"{kind}-{name}"
        if not self.parser.has_section(section):
            raise self.error(config, kind, f"no section [{section}]")
        return section

    def token(self, section: str) -> str:
        """
        The site's token, required. Messages never quote it.
        """
        value = self.parser.get(section, "token", fallback=None)
        if value is None:
            raise self.error(section, "token", "missing (the token gs_auth_token_create made)")
        value = value.strip()
        if not value:
            raise self.error(section, "token", "is empty")
        if any(char.isspace() or not char.isprintable() for char in value):
            raise self.error(
                section, "token", "must be one word (it contains a space or line break)"
            )
        return value

    def relay_prefix(self, section: str) -> str:
        option = "relay-address-prefix"
        value = self.line(section, option)
        if value is None:
            return str(_DEFAULTS["relay_address_prefix"])
        if not value or "@" in value or any(char.isspace() for char in value):
            raise self.error(
                section, option, f"expected a local-part prefix such as 'p-', got {value!r}"
            )
        return value

    def warn_unknown(self, section: str) -> None:
        """
        Log the options of the C{gsmail} section that gsmail does not know.
        """
        defaults = self.parser.defaults()
        for option in self.parser.options(section):
            if option not in _GSMAIL_OPTIONS and option not in defaults:
                log.warn(
                    "{path}: [{section}] {option}: unknown option, ignored",
                    path=self.path,
                    section=section,
                    option=option,
                )

    # -- typed options of the gsmail section ------------------------------------

    def url(self, section: str) -> str:
        value = self.line(section, "url")
        if not value:
            raise self.error(section, "url", "missing: 'embedded' or the site's http(s) URL")
        if value.lower() == "embedded":
            return "embedded"
        expected = "expected 'embedded' or an http:// or https:// URL"
        if any(char.isspace() for char in value):
            raise self.error(section, "url", f"{expected}, got {value!r}")
        parts = urlsplit(value)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise self.error(section, "url", f"{expected}, got {value!r}")
        if "@" in parts.netloc:
            # Not quoted: it may hold a password.
            raise self.error(section, "url", "must not hold a user name or password")
        if not parts.hostname:
            raise self.error(section, "url", f"no host in the URL {value!r}")
        try:
            port = parts.port  # parsing it is the check
        except ValueError:
            raise self.error(section, "url", f"bad port in the URL {value!r}") from None
        if port == 0:
            raise self.error(section, "url", f"bad port in the URL {value!r}")
        if parts.query or parts.fragment:
            raise self.error(
                section, "url", f"the site URL takes no query or fragment, got {value!r}"
            )
        # Without the trailing slash, so that clients append "/page.html".
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))

    def text(self, section: str, option: str, choices: Iterable[str] = ()) -> str:
        value = self.line(section, option)
        if value is None:
            return str(_DEFAULTS[option])
        allowed = tuple(choices)
        if allowed:
            if value.lower() not in allowed:
                raise self.error(section, option, f"expected {' or '.join(allowed)}, got {value!r}")
            return value.lower()
        elif not value or any(char.isspace() for char in value):
            raise self.error(section, option, f"expected one word, got {value!r}")
        return value

    def boolean(self, section: str, option: str) -> bool:
        value = self.line(section, option)
        if value is None:
            return bool(_DEFAULTS[option])
        try:
            return parse_bool(value)
        except ValueError as error:
            raise self.error(section, option, str(error)) from None

    def duration_or_off(self, section: str, option: str) -> float:
        """A duration where C{0} means off (as Postfix's C{delay_warning_time})."""
        value = self.line(section, option)
        if value is None:
            return float(_DEFAULTS[option])
        try:
            return parse_duration(value)
        except ValueError as error:
            raise self.error(section, option, f"{error} (0 turns it off)") from None

    def duration(self, section: str, option: str) -> float:
        value = self.line(section, option)
        if value is None:
            return float(_DEFAULTS[option])
        try:
            seconds = parse_duration(value)
        except ValueError as error:
            raise self.error(section, option, str(error)) from None
        if seconds <= 0:
            raise self.error(section, option, f"must be more than 0 seconds, got {value!r}")
        return seconds

    def integer(self, section: str, option: str, minimum: int, why: str = "") -> int:
        value = self.line(section, option)
        if value is None:
            return int(_DEFAULTS[option])
        try:
            number = int(value, 10)
        except ValueError:
            raise self.error(section, option, f"expected a whole number, got {value!r}") from None
        if number < minimum:
            raise self.error(section, option, f"must be at least {minimum}{why}, got {value!r}")
        return number

    def inbound_workers(self, section: str) -> int:
        """C{inbound_workers}: 0 (the main process) up to L{MAX_INBOUND_WORKERS}."""
        count = self.integer(section, "inbound_workers", 0)
        if count > MAX_INBOUND_WORKERS:
            raise self.error(
                section,
                "inbound_workers",
                f"must be at most {MAX_INBOUND_WORKERS} (one per core is enough), got {count}",
            )
        return count

    def size(self, section: str, option: str, zero: bool = False) -> int:
        """
        A size written in MiB (fractions allowed), returned in bytes.

        @param zero: C{0} is allowed (it turns the option off).
        """
        value = self.line(section, option)
        if value is None:
            return int(_DEFAULTS[option])
        try:
            mebibytes = float(value)
        except ValueError:
            mebibytes = math.nan
        if not math.isfinite(mebibytes):
            raise self.error(section, option, f"expected a number of MiB, got {value!r}")
        size = int(mebibytes * _MIB)
        if zero and mebibytes == 0:
            return 0
        if size < 1:
            raise self.error(section, option, f"must be more than 0 MiB, got {value!r}")
        return size

    def path_option(self, section: str, option: str, empty: str | None = None) -> str:
        """
        A file or directory name, made absolute against the file's directory.

        @param empty: what an empty value means; C{None}: it is an error.
        """
        value = self.line(section, option)
        if value is None:
            value = str(_DEFAULTS[option])
        if not value:
            if empty is None:
                raise self.error(section, option, "must not be empty")
            return empty
        return os.path.normpath(os.path.join(self.base, value))

    def readable(self, section: str, option: str) -> str:
        """
        A file that must exist and be readable, or C{""} when not set.
        """
        name = self.path_option(section, option, empty="")
        if name:
            try:
                with open(name, "rb"):
                    pass
            except OSError as error:
                raise self.error(
                    section, option, f"cannot read {name!r}: {error.strerror or error}"
                ) from None
        return name

    def endpoint(self, section: str, option: str, required: bool = False) -> str:
        """
        A Twisted endpoint string, checked lightly; C{""} means off.
        """
        value = self.line(section, option)
        if value is None:
            value = str(_DEFAULTS[option])
        if not value and not required:
            return ""
        kind, colon, rest = value.partition(":")
        if kind.strip().lower() not in _ENDPOINT_TYPES or not colon or not rest.strip():
            prefixes = ", ".join(f"{name}:" for name in _ENDPOINT_TYPES)
            raise self.error(
                section, option, f"expected an endpoint string starting {prefixes} got {value!r}"
            )
        return _resolve_endpoint_paths(value, self.base)

    def words(self, section: str, option: str) -> tuple[str, ...]:
        """
        A list separated by commas, spaces or line breaks, without repeats.
        """
        value = self.raw(section, option)
        if value is None:
            return tuple(_DEFAULTS[option])
        return tuple(dict.fromkeys(word for word in _LIST_SEPARATOR.split(value) if word))

    def domains(self, section: str) -> tuple[str, ...]:
        names = tuple(
            dict.fromkeys(name.lower().removesuffix(".") for name in self.words(section, "domains"))
        )
        if not names:
            raise self.error(section, "domains", "missing: the domains to take mail for")
        for name in names:
            if not _is_domain(name):
                raise self.error(section, "domains", f"not a domain name: {name!r}")
        return names

    def verp(self, section: str) -> dict[str, Any]:
        """
        The signed VERP options (L{gsmail.verp}): C{verp_key_file} (empty:
        C{verp.key} beside the ledger, resolved by L{verp_key_path}),
        C{verp_max_age} (1 to 10000 days), C{verp_unsigned_until}
        (C{auto}, C{always}, C{never} or a date C{YYYY-MM-DD}).
        """
        max_age = self.duration(section, "verp_max_age")
        if not 86400.0 <= max_age <= 10000 * 86400.0:
            raise self.error(
                section, "verp_max_age", f"must be 1 to 10000 days, got {max_age / 86400:g} days"
            )
        until = (self.line(section, "verp_unsigned_until") or "auto").strip().lower()
        if until not in ("auto", "always", "never"):
            try:
                datetime.date.fromisoformat(until)
            except ValueError:
                raise self.error(
                    section,
                    "verp_unsigned_until",
                    f"expected auto, always, never or a date YYYY-MM-DD, got {until!r}",
                ) from None
        return {
            "verp_key_file": self.path_option(section, "verp_key_file", empty=""),
            "verp_max_age": max_age,
            "verp_unsigned_until": until,
        }

    def limits(self, section: str) -> dict[str, Any]:
        """
        The listen backlog and the abuse limits (L{gsmail.anvil}, Postfix's
        anvil and C{smtpd} error limits). Counts of C{0} turn a limit off;
        C{error_sleep_time} and C{auth_failure_delay} may be C{0}.
        """
        values: dict[str, Any] = {
            "listen_backlog": self.integer(section, "listen_backlog", 1),
            "client_limit_exceptions": self.words(section, "client_limit_exceptions"),
            "anvil_rate_time_unit": self.duration(section, "anvil_rate_time_unit"),
            "error_sleep_time": self.duration_or_off(section, "error_sleep_time"),
            "auth_failure_delay": self.duration_or_off(section, "auth_failure_delay"),
        }
        for option in (
            "client_connection_count_limit",
            "client_connection_rate_limit",
            "client_lookup_rate_limit",
            "session_lookup_limit",
            "client_auth_failure_limit",
            "soft_error_limit",
            "hard_error_limit",
            "junk_command_limit",
            "min_data_rate",
        ):
            values[option] = self.integer(section, option, 0, " (0 turns it off)")
        for network in values["client_limit_exceptions"]:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise self.error(
                    section, "client_limit_exceptions", f"not a network: {network!r}"
                ) from None
        return values

    def routes(self, section: str, domains: tuple[str, ...]) -> dict[str, Any]:
        """
        The route table's options (L{gsmail.routes}): C{routes} (a file that
        must be readable; the service reads it), the state, errors and
        rejected directories, C{srs_domain} (one of C{domains}) and
        C{max_hops} (C{0}: no limit).
        """
        srs_domain = (self.line(section, "srs_domain") or "").strip().lower()
        if srs_domain and srs_domain not in domains:
            raise self.error(section, "srs_domain", f"not one of domains: {srs_domain!r}")
        return {
            "routes": self.readable(section, "routes"),
            "route_state_dir": self.path_option(section, "route_state_dir"),
            "errors_dir": self.path_option(section, "errors_dir", empty=""),
            "rejected_dir": self.path_option(section, "rejected_dir", empty=""),
            "srs_domain": srs_domain,
            "max_hops": self.integer(section, "max_hops", 0, " (0 turns it off)"),
        }

    def running(self, section: str) -> dict[str, Any]:
        """
        How gsmail runs (L{gsmail.privileges}): C{unix_socket_group} (a group
        name or number that exists here; empty: the group gsmail runs as) and
        C{unix_socket_mode} (octal, such as C{0660}; at most C{0777});
        C{log_json} (a boolean).
        """
        group = (self.line(section, "unix_socket_group") or "").strip()
        if group:
            import grp

            try:
                grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)
            except (KeyError, OverflowError):
                raise self.error(
                    section, "unix_socket_group", f"no such group on this host: {group!r}"
                ) from None
        value = self.line(section, "unix_socket_mode")
        mode = int(_DEFAULTS["unix_socket_mode"])
        if value is not None:
            if not re.fullmatch(r"0?[0-7]{3}|0o[0-7]{3}", value.lower()):
                raise self.error(
                    section,
                    "unix_socket_mode",
                    f"expected an octal mode such as 0660, got {value!r}",
                )
            mode = int(value.lower().removeprefix("0o"), 8)
        return {
            "unix_socket_group": group,
            "unix_socket_mode": mode,
            "log_json": self.boolean(section, "log_json"),
        }

    def outbound(self, section: str, smtp: str | None) -> dict[str, Any]:
        """
        The outbound options: from the C{[gsmail-NAME]} section, and gs.email's
        from the C{[smtp-NAME]} section, which describe GroupServer's
        connection to the submission listener (C{username}/C{password}: the
        account GroupServer authenticates with; C{no_tls}: STARTTLS not
        offered there; C{force_tls}: required there, so a certificate is
        needed; C{queuepath}: a zope.sendmail queue to import;
        C{processorthread = False}: queue only, never deliver). Delivery TLS
        is C{smtp_tls_security_level} (and C{mx_tls}) of the gsmail section.
        """
        values: dict[str, Any] = {
            "submission_endpoint": self.endpoint(section, "submission_endpoint"),
            "submission_networks": self.words(section, "submission_networks"),
            "queue_dir": self.path_option(section, "queue_dir"),
            "control_socket": self.path_option(section, "control_socket", empty=""),
            "relayhost": (self.line(section, "relayhost") or "").strip(),
            "relayhost_username": (self.line(section, "relayhost_username") or "").strip(),
            "relayhost_password": self.parser.get(
                section, "relayhost_password", fallback=""
            ).strip(),
            "tls_name": (self.line(section, "tls_name") or "").strip(),
            "tls_ca": self.readable(section, "tls_ca"),
            "smtp_tls_security_level": self.text(
                section, "smtp_tls_security_level", ("none", "may", "encrypt")
            ),
            "mx_tls": self.mx_tls(section),
            "mx_port": self.integer(section, "mx_port", 1),
            "dns_servers": self.words(section, "dns_servers"),
            "queue_lifetime": self.duration(section, "queue_lifetime"),
            "delay_warning_time": self.duration_or_off(section, "delay_warning_time"),
            "outbound_connections": self.integer(section, "outbound_connections", 1),
            "destination_concurrency": self.integer(section, "destination_concurrency", 1),
            "batch_size": self.integer(section, "batch_size", 1),
            "relayhost_xverp": self.boolean(section, "relayhost_xverp"),
            "smtp_trace": self.boolean(section, "smtp_trace"),
            "mta_sts": self.boolean(section, "mta_sts"),
            "mta_sts_cache_dir": self.path_option(section, "mta_sts_cache_dir", empty=""),
            "mta_sts_timeout": self.duration(section, "mta_sts_timeout"),
            "tls_rpt": self.boolean(section, "tls_rpt"),
        }
        if values["mta_sts_timeout"] <= 0:
            raise self.error(section, "mta_sts_timeout", "must be more than 0 seconds")
        if values["relayhost"]:
            from gsmail.outbound.mx import parse_relayhost

            try:
                parse_relayhost(values["relayhost"])
            except ValueError as e:
                raise self.error(section, "relayhost", str(e)) from None
        for network in values["submission_networks"]:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise self.error(
                    section, "submission_networks", f"not a network: {network!r}"
                ) from None
        if smtp is not None:
            values["smtp_username"] = (self.line(smtp, "username") or "").strip()
            values["smtp_password"] = self.parser.get(smtp, "password", fallback="").strip()
            for option in ("no_tls", "force_tls", "processorthread"):
                if self.line(smtp, option) is not None:
                    values[option] = self.boolean(smtp, option)
            if self.line(smtp, "queuepath"):
                values["queuepath"] = self.path_option(smtp, "queuepath")
        if values.get("no_tls") and values.get("force_tls"):
            raise self.error(smtp or section, "force_tls", "contradicts no_tls (set one)")
        if smtp is not None and values.get("force_tls") and values["submission_endpoint"]:
            if not self.raw(section, "tls_certificate"):
                # zope.sendmail refuses to send to a server without STARTTLS.
                raise self.error(
                    smtp,
                    "force_tls",
                    f"GroupServer then submits only over STARTTLS, but [{section}] has no "
                    "tls_certificate and tls_key for the submission listener to offer it",
                )
            if self.raw(section, "smtp_tls_security_level") is None:
                log.warn(
                    "{path}: [{smtp}] force_tls now applies to GroupServer's connection to the "
                    "submission listener only; gsmail's own delivery uses "
                    "smtp_tls_security_level = {security_level} ([{section}])",
                    path=self.path,
                    smtp=smtp,
                    section=section,
                    security_level=values["smtp_tls_security_level"],
                )
        return values

    def deliverability(self, section: str) -> dict[str, Any]:
        """
        DKIM signing and ARC sealing of outbound mail (L{gsmail.signing}):
        C{dkim_keys} (C{DOMAIN:SELECTOR:KEYFILE}, comma-separated; the files
        are read when used, so a missing one is logged, not refused),
        C{dkim_sign_headers} (must name C{From}), C{arc_seal} (needs a key);
        and the authentication checks of inbound mail
        (L{gsmail.inbound.authresults}): C{authentication_results},
        C{auth_check_time} (seconds, at most 60), C{auth_check_exceptions}
        (networks).
        """
        keys = self.words(section, "dkim_keys")
        if keys:
            from gsmail.signing import parse_key_specs

            try:
                specs = parse_key_specs(keys, self.base)
            except ValueError as e:
                raise self.error(section, "dkim_keys", str(e)) from None
            keys = tuple(f"{s.domain}:{s.selector}:{os.path.normpath(s.path)}" for s in specs)
        headers = self.words(section, "dkim_sign_headers")
        for name in headers:
            if not re.fullmatch(r"[\x21-\x39\x3b-\x7e]+", name) or "*" in name[:-1]:
                raise self.error(section, "dkim_sign_headers", f"not a field name: {name!r}")
        if "from" not in {h.lower() for h in headers}:
            raise self.error(section, "dkim_sign_headers", "must name From (RFC 6376 5.4)")
        arc_seal = self.boolean(section, "arc_seal")
        if arc_seal and not keys:
            raise self.error(section, "arc_seal", "needs dkim_keys (the seal is signed by them)")
        check_time = self.duration(section, "auth_check_time")
        if check_time > 60:
            raise self.error(
                section, "auth_check_time", f"must be at most 60 seconds, got {check_time:g}"
            )
        exceptions = self.words(section, "auth_check_exceptions")
        for network in exceptions:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise self.error(
                    section, "auth_check_exceptions", f"not a network: {network!r}"
                ) from None
        return {
            "dkim_keys": keys,
            "dkim_sign_headers": headers,
            "arc_seal": arc_seal,
            "authentication_results": self.boolean(section, "authentication_results"),
            "auth_check_time": check_time,
            "auth_check_exceptions": exceptions,
        }

    def monitoring(self, section: str) -> dict[str, Any]:
        """
        C{metrics_endpoint} (an endpoint string; empty: off) and
        C{readyz_min_free} (MiB, like C{max_size}; C{0}: no free-space check)
        (L{gsmail.metrics}).
        """
        return {
            "metrics_endpoint": self.endpoint(section, "metrics_endpoint"),
            "readyz_min_free": self.size(section, "readyz_min_free", zero=True),
        }

    def mx_tls(self, section: str) -> str:
        """C{mx_tls}: C{none}, C{may}, C{encrypt}, or empty (as C{smtp_tls_security_level})."""
        if not self.raw(section, "mx_tls"):
            return ""
        return self.text(section, "mx_tls", ("none", "may", "encrypt"))

    def gsmail(self, section: str, instance: str, token: str, relay_prefix: str) -> GsmailConfig:
        """
        Read the C{[gsmail-NAME]} section into a L{GsmailConfig}.
        """
        url = self.url(section)
        smtp_endpoint = self.endpoint(section, "smtp_endpoint")
        lmtp_endpoint = self.endpoint(section, "lmtp_endpoint")
        if not smtp_endpoint and not lmtp_endpoint:
            raise self.error(
                section, "smtp_endpoint, lmtp_endpoint", "set at least one (empty means off)"
            )
        tls_certificate = self.readable(section, "tls_certificate")
        tls_key = self.readable(section, "tls_key")
        if bool(tls_certificate) != bool(tls_key):
            have, lack = (
                ("tls_certificate", "tls_key")
                if tls_certificate
                else ("tls_key", "tls_certificate")
            )
            raise self.error(section, lack, f"missing while {have} is set (set both or neither)")
        reply_deadline = self.duration(section, "reply_deadline")
        if reply_deadline > MAX_REPLY_DEADLINE:
            raise self.error(
                section,
                "reply_deadline",
                f"must be at most {MAX_REPLY_DEADLINE:g} seconds (Postfix gives up waiting for "
                f"the reply to DATA after 600), got {reply_deadline:g}",
            )
        domains = self.domains(section)
        postmaster_address = (self.line(section, "postmaster_address") or "").strip()
        if postmaster_address:
            try:
                forward_to = parse_mailbox(postmaster_address)
            except AddressError:
                raise self.error(
                    section, "postmaster_address", f"not an address: {postmaster_address!r}"
                ) from None
            if forward_to.domain in domains:
                raise self.error(
                    section,
                    "postmaster_address",
                    "must be outside the site's domains (it would come back to gsmail's postmaster)",
                )
        hostname = self.line(section, "hostname")
        if hostname is None:
            hostname = getfqdn()
        elif not hostname or any(char.isspace() for char in hostname):
            raise self.error(section, "hostname", f"expected a host name, got {hostname!r}")
        return GsmailConfig(
            path=os.path.abspath(self.path),
            instance=instance,
            url=url,
            token=token,
            verify_tls=self.boolean(section, "verify_tls"),
            connect_timeout=self.duration(section, "connect_timeout"),
            response_timeout=self.duration(section, "response_timeout"),
            post_concurrency=self.integer(section, "post_concurrency", 1),
            time_source=self.text(section, "time_source", ("server", "message")),
            relay_address_prefix=relay_prefix,
            group_cache_ttl=self.duration(section, "group_cache_ttl"),
            group_negative_cache_ttl=self.duration(section, "group_negative_cache_ttl"),
            smtp_endpoint=smtp_endpoint,
            lmtp_endpoint=lmtp_endpoint,
            hostname=hostname,
            domains=domains,
            tls_certificate=tls_certificate,
            tls_key=tls_key,
            tls_ciphers=self.text(section, "tls_ciphers", ("intermediate", "compat")),
            inbound_workers=self.inbound_workers(section),
            max_size=self.size(section, "max_size"),
            max_recipients=self.integer(section, "max_recipients", 1),
            max_connections=self.integer(section, "max_connections", 1),
            max_line_length=self.integer(
                section, "max_line_length", MIN_LINE_LENGTH, " (RFC 5321 section 4.5.3.1.6)"
            ),
            idle_timeout=self.duration(section, "idle_timeout"),
            reply_deadline=reply_deadline,
            spool_dir=self.path_option(section, "spool_dir", empty=tempfile.gettempdir()),
            ledger_path=self.path_option(section, "ledger_path"),
            ledger_ttl=self.duration(section, "ledger_ttl"),
            postmaster_maildir=self.path_option(section, "postmaster_maildir"),
            postmaster_address=postmaster_address,
            standin_dir=self.path_option(section, "standin_dir"),
            standin_groups=self.words(section, "standin_groups"),
            standin_endpoint=self.endpoint(section, "standin_endpoint", required=True),
        )


def verp_key_path(config: GsmailConfig | PipeConfig) -> str:
    """
    The VERP key file: C{verp_key_file}, or C{verp.key} in the ledger's
    directory when that is empty (C{""} for a pipe without a ledger).
    """
    if config.verp_key_file:
        return config.verp_key_file
    if not config.ledger_path:
        return ""
    return os.path.join(os.path.dirname(os.path.abspath(config.ledger_path)), "verp.key")


def mta_sts_cache_path(config: GsmailConfig) -> str:
    """
    The MTA-STS policy cache directory: C{mta_sts_cache_dir}, or C{mta-sts}
    in the ledger's directory (the state directory) when that is empty.
    """
    if config.mta_sts_cache_dir:
        return config.mta_sts_cache_dir
    return os.path.join(os.path.dirname(os.path.abspath(config.ledger_path)), "mta-sts")


def _is_domain(name: str) -> bool:
    """
    Whether C{name} (lowercase, no trailing dot) is a host name: ASCII
    letter-digit-hyphen labels, or Unicode labels that IDNA can encode.
    """
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    labels = name.split(".")
    return len(name) <= 253 and all(
        len(label) <= 63 and _ASCII_LABEL.fullmatch(label) for label in labels
    )
