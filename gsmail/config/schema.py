# -*- test-case-name: tests.test_config -*-
"""
gsmail's configuration options: L{GsmailConfig} (the daemon) and
L{PipeConfig} (the pipe-compatible C{smtp2gs}), their defaults and limits,
L{ConfigError}, the value syntax shared by every option (L{parse_duration},
L{parse_bool}) and the file names derived from options (L{verp_key_path},
L{mta_sts_cache_path}).

Not the file reader: L{gsmail.config} reads C{gsconfig.ini}
(L{gsmail.config.load_config}) with the helpers of L{gsmail.config.reader},
L{gsmail.config.site} and L{gsmail.config.outbound}. Import these names from
L{gsmail.config}. Every option is described in C{docs/configuration.md}.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Final

import attrs

#: The largest C{reply_deadline}, in seconds. Postfix waits
#: C{lmtp_data_done_timeout} / C{smtp_data_done_timeout} (600 s) for the reply
#: to the end of DATA; answering later makes it retry a message gsmail may
#: already have posted. Ten seconds of margin for the network and the queue.
MAX_REPLY_DEADLINE: Final = 590.0
#: The most inbound worker processes C{inbound_workers} may ask for.
MAX_INBOUND_WORKERS: Final = 64
#: The longest C{ledger_commit_delay}, in seconds: every post may wait it.
MAX_COMMIT_DELAY: Final = 0.1

#: The smallest C{max_line_length}: RFC 5321 §4.5.3.1.6 lets a text line be
#: 1000 octets including CRLF, so a receiver must take at least that.
MIN_LINE_LENGTH: Final = 1000

_TRUE: Final = frozenset({"true", "yes", "on", "1"})
_FALSE: Final = frozenset({"false", "no", "off", "0"})
_UNIT_SECONDS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)", re.IGNORECASE)


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
    # Seconds a ledger batch waits for the posts under way to share its fsync.
    ledger_commit_delay: float = 0.002
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
