# -*- test-case-name: tests.test_check -*-
"""
C{gsmail-check} (also C{twistd gsmail --check}): check a configuration and
the system around it without starting the daemon, as Postfix's C{postfix
check} and C{postconf -n} do.

It reads the configuration as the daemon does, then checks:

  - the endpoint strings (parsed; the directory of a UNIX socket exists);
  - the state directories and files, as the user gsmail runs as
    (C{--uid}/C{--gid}, as twistd's): L{gsmail.privileges.check_state};
  - the TLS certificate: readable, matching the key, days to expiry, and
    whether it names C{hostname};
  - GroupServer: reachable, and the token accepted (one group-exists call
    for an address no group has);
  - the MX records of C{domains}: do they point to this host? (A DNS
    failure is a warning: DNS is not in the file.)
  - each DKIM key of C{dkim_keys} (L{gsmail.dkimtool.check_key}): a key
    file that cannot be used, or that the run user cannot read, is a
    warning (the daemon starts, and the mail it signs waits in the queue);
    with the network, a DNS record that is missing or is not the key's is a
    problem (the signatures would fail), no answer a warning.

It prints the settings that differ from the defaults, one C{name = value} a
line on standard output (never the token or a password), what it checked
(C{ok:} lines), and on standard error one line per warning (C{warning:})
and per problem. Exit status 0 when there is no problem, else 78
(EX_CONFIG); 64 for a bad command line.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import grp
import ipaddress
import os
import pwd
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, TextIO, cast

import attrs
from twisted.internet.defer import Deferred

from gsmail import __version__
from gsmail.config import ConfigError, GsmailConfig, load_config
from gsmail.config.reader import _split_unescaped
from gsmail.privileges import RunUser, check_state, state_paths
from gsmail.startup import listen_failure
from gsmail.status import EX_CONFIG, EX_OK, EX_USAGE, GroupServerError
from gsmail.twistedcompat import stop_resolv_conf_timer

__all__ = ["Report", "effective_settings", "main", "run_checks"]

#: Fields never printed: what names the file, and the secrets.
_HIDDEN = frozenset({"path", "instance", "token", "relayhost_password", "smtp_password"})
#: A certificate this close to its end is a warning (certbot renews at 30 days).
WARN_DAYS = 14
#: Seconds a DNS query or a GroupServer request may take.
TIMEOUT = 10.0


@attrs.define
class Report:
    """What the checks found: C{ok} lines, warnings and problems (one line each)."""

    ok: list[str] = attrs.Factory(list)
    warnings: list[str] = attrs.Factory(list)
    problems: list[str] = attrs.Factory(list)


def effective_settings(config: GsmailConfig) -> list[str]:
    """
    C{name = value} for every option whose value is not the default, as
    C{postconf -n} lists them, in the order of L{GsmailConfig}. Durations
    are in seconds (C{s}), C{max_size} and C{readyz_min_free} in MiB, modes in octal. The token
    and the passwords are never listed.
    """
    # What load_config puts in when the file is silent (GsmailConfig's own
    # default is the empty string for these).
    file_defaults = {"spool_dir": tempfile.gettempdir(), "hostname": socket.getfqdn()}
    lines = []
    for field in attrs.fields(GsmailConfig):
        if field.name in _HIDDEN:
            continue
        value = getattr(config, field.name)
        if field.default is not attrs.NOTHING and value == field.default:
            continue
        if file_defaults.get(field.name) == value:
            continue
        lines.append(f"{field.name} = {_show(field.name, value)}")
    secret = config.token
    return [line.replace(secret, "<token>") if len(secret) >= 4 else line for line in lines]


def _show(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}s"
    if name in ("max_size", "readyz_min_free"):
        return f"{value / (1024 * 1024):g}"
    if name == "unix_socket_mode":
        return f"{value:04o}"
    return str(value)


def check_endpoints(config: GsmailConfig, user: RunUser | None, report: Report) -> None:
    """Each endpoint string parses, its TCP port is in range, its UNIX socket's directory exists."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    for option in (
        "smtp_endpoint",
        "lmtp_endpoint",
        "submission_endpoint",
        "standin_endpoint",
        "metrics_endpoint",
    ):
        description = getattr(config, option)
        if not description or (option == "standin_endpoint" and config.url != "embedded"):
            continue
        fields = _split_unescaped(description, ":")
        kind = fields[0].strip().lower()
        if kind == "systemd":
            report.ok.append(f"{option}: {description} (a socket systemd passes; not checked)")
            continue
        try:
            if kind in ("tcp", "tcp6", "ssl"):
                _check_port(fields[1:])
            if kind != "ssl":  # ssl: loads the key files; the daemon checks them at start
                serverFromString(reactor, description)
        except Exception as e:
            report.problems.append(str(listen_failure(option, description, e)))
            continue
        if kind == "unix":
            path = next(
                (f.partition("=")[2] for f in fields[1:] if f.startswith("address=")), fields[1]
            )
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                report.problems.append(
                    f"{option} {description!r}: the socket's directory {directory} does not exist "
                    f"(make it: install -d -o {(user or RunUser.current()).name} {directory})"
                )
                continue
        report.ok.append(f"{option}: {description}")


def _check_port(arguments: Sequence[str]) -> None:
    """@raise OverflowError: the port (first positional or C{port=}) is not 0 to 65535."""
    for argument in arguments:
        key, equals, value = argument.partition("=")
        port = value if equals and key == "port" else (argument if not equals else None)
        if port is not None:
            if port.strip().isdigit() and not 0 <= int(port) <= 65535:
                raise OverflowError("port must be 0-65535")
            return


def check_tls(config: GsmailConfig, report: Report, now: datetime.datetime) -> None:
    """The certificate is readable, matches the key, is valid some days more and names C{hostname}."""
    if not config.tls_certificate:
        report.ok.append("tls_certificate: none (no STARTTLS)")
        return
    from cryptography import x509

    from gsmail.inbound.parts import load_tls

    try:
        load_tls(config)
        with open(config.tls_certificate, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
    except (ConfigError, OSError, ValueError) as e:
        report.problems.append(f"tls_certificate: {_one_line(e)}")
        return
    ends = certificate.not_valid_after_utc
    days = (ends - now).total_seconds() / 86400
    subject = certificate.subject.rfc4514_string()
    if days < 0:
        report.problems.append(
            f"tls_certificate {config.tls_certificate}: expired on {ends:%Y-%m-%d} ({subject})"
        )
        return
    line = f"tls_certificate: {subject}, valid until {ends:%Y-%m-%d} ({int(days)} days)"
    if days < WARN_DAYS:
        report.warnings.append(f"{line}: renew it")
    else:
        report.ok.append(line)
    names = _certificate_names(certificate)
    if names and not any(_matches(pattern, config.hostname) for pattern in names):
        report.warnings.append(
            f"tls_certificate names {', '.join(names)}, not hostname {config.hostname}"
        )


def _certificate_names(certificate: Any) -> list[str]:
    from cryptography import x509

    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(name).lower() for name in extension.value.get_values_for_type(x509.DNSName)]


def _matches(pattern: str, hostname: str) -> bool:
    """RFC 6125 §6.4.3: a wildcard stands for one whole left-most label."""
    hostname = hostname.lower().rstrip(".")
    if pattern.startswith("*."):
        return hostname.partition(".")[2] == pattern[2:] and "." in hostname
    return pattern == hostname


async def check_groupserver(config: GsmailConfig, reactor: Any, report: Report) -> None:
    """One group-exists call for an address no group has: the site answers, the token is taken."""
    if config.url == "embedded":
        report.ok.append("url: embedded (the built-in stand-in; nothing to reach)")
        return
    from gsmail.groupserver import GroupServerClient

    client = GroupServerClient(
        reactor,
        config.url,
        config.token,
        connect_timeout=min(config.connect_timeout, TIMEOUT),
        response_timeout=min(config.response_timeout, TIMEOUT),
        verify_tls=config.verify_tls,
        concurrency=1,
    )
    address = f"gsmail-check@{config.domains[0]}"
    try:
        await client.lookup_group(address)
    except GroupServerError as e:
        report.problems.append(f"url {config.url}: {_one_line(e).replace(config.token, '<token>')}")
    except Exception as e:
        report.problems.append(f"url {config.url}: {type(e).__name__}: {_one_line(e)}")
    else:
        report.ok.append(f"url: {config.url} answers, and takes the token (group-exists)")
    finally:
        await client.close()


async def check_mx(
    config: GsmailConfig,
    reactor: Any,
    report: Report,
    is_local: Callable[[str], bool] | None = None,
) -> None:
    """
    Whether the MX hosts of each domain are this host: by name (C{hostname})
    or by address (one this host has). Anything else is a warning.
    """
    from gsmail.outbound.mx import MXLookupError, MXResolver
    from gsmail.service.outbound import dns_resolver

    local = is_local or local_address
    resolver = dns_resolver(config.dns_servers, reactor)
    resolver.timeout = (TIMEOUT / 2, TIMEOUT / 2)
    mx = MXResolver(resolver, reactor)
    try:
        for domain in config.domains:
            try:
                hosts = await mx.hosts(domain)
            except MXLookupError as e:
                report.warnings.append(f"domains: MX of {domain}: {_one_line(e)}")
                continue
            here = [
                h.name
                for h in hosts
                if h.name == config.hostname.lower() or any(local(a) for a in h.addresses)
            ]
            described = ", ".join(f"{h.name} ({' '.join(h.addresses)})" for h in hosts)
            if here:
                report.ok.append(f"domains: MX of {domain}: {described}: here")
            else:
                report.warnings.append(
                    f"domains: MX of {domain}: {described}: not this host (fine behind another MTA)"
                )
    finally:
        stop_resolv_conf_timer(resolver)


async def check_dkim(
    config: GsmailConfig,
    reactor: Any,
    user: RunUser | None,
    report: Report,
    *,
    network: bool,
) -> None:
    """
    Each key of C{dkim_keys}: usable and readable by the run user, and,
    with C{network}, published as it is (C{gsmail-dkim check}'s verdicts;
    docs/deliverability.md). The DNS work is blocking: it runs in the
    reactor's thread pool, each lookup bounded by L{TIMEOUT}.
    """
    if not config.dkim_keys:
        return
    from twisted.internet.threads import deferToThreadPool

    from gsmail.dkimtool import MISMATCH, MISSING, NO_ANSWER, OK, UNUSABLE, check_key, dns_lookup

    lookup = dns_lookup(config.dns_servers, timeout=TIMEOUT) if network else None
    for entry in config.dkim_keys:
        path = entry.split(":", 2)[2]
        verdict, text = await deferToThreadPool(
            reactor, reactor.getThreadPool(), check_key, entry, lookup
        )
        text = " ".join(text.split("\n  "))
        if user is not None and verdict != UNUSABLE:
            try:
                readable = user.may(os.stat(path), 4)
            except OSError:
                readable = True  # check_key read it just now
            if not readable:
                report.warnings.append(
                    f"dkim_keys: {path} cannot be read by {user.name}: mail it signs would wait"
                )
                continue
        if verdict == OK:
            report.ok.append(f"dkim_keys: {text}")
        elif verdict in (MISSING, MISMATCH):
            report.problems.append(f"dkim_keys: {verdict}: {text}")
        elif verdict == NO_ANSWER:
            report.warnings.append(f"dkim_keys: {text}")
        else:
            report.warnings.append(
                f"dkim_keys: {text}: mail it signs waits in the queue until it can be used"
            )


def local_address(address: str) -> bool:
    """Whether this host has C{address} (binding a UDP socket to it works)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    except ValueError:
        return False
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError as e:
            if e.errno not in (errno.EADDRNOTAVAIL, errno.EINVAL, errno.EAFNOSUPPORT):
                raise
            return False
    return True


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


async def run_checks(
    config: GsmailConfig,
    reactor: Any,
    user: RunUser | None,
    *,
    network: bool = True,
    is_local: Callable[[str], bool] | None = None,
    now: datetime.datetime | None = None,
) -> Report:
    """
    Every check of this module on C{config}.

    @param user: the user gsmail runs as after twistd drops root, or
        C{None}: the process's user.
    @param network: also ask GroupServer and DNS.
    @param is_local: whether an address is this host's (tests).
    """
    report = Report()
    check_endpoints(config, user, report)
    problems = check_state(state_paths(config), user)
    report.problems.extend(problems)
    if not problems:
        report.ok.append(f"state directories: {(user or RunUser.current()).name} can write them")
    check_tls(config, report, now or datetime.datetime.now(datetime.UTC))
    if network:
        await check_groupserver(config, reactor, report)
        await check_mx(config, reactor, report, is_local)
    await check_dkim(config, reactor, user, report, network=network)
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gsmail-check",
        description="Check gsmail's configuration, files, certificate, GroupServer and DNS.",
    )
    parser.add_argument("-c", "--config", default="/etc/groupserver/gsconfig.ini")
    parser.add_argument("-i", "--instance", default="default")
    parser.add_argument("-u", "--uid", help="the user gsmail runs as (twistd --uid)")
    parser.add_argument("-g", "--gid", help="its group (twistd --gid)")
    parser.add_argument("--offline", action="store_true", help="do not ask GroupServer or DNS")
    parser.add_argument(
        "--version", action="version", version=f"gsmail-check (gsmail) {__version__}"
    )
    return parser


def _user(uid: str | None, gid: str | None) -> RunUser | None:
    """The user of C{--uid}/C{--gid} (names or numbers). @raise KeyError: unknown."""
    if uid is None and gid is None:
        return None
    number = None if uid is None else (int(uid) if uid.isdigit() else pwd.getpwnam(uid).pw_uid)
    group = None if gid is None else (int(gid) if gid.isdigit() else grp.getgrnam(gid).gr_gid)
    return RunUser.of(os.getuid() if number is None else number, group)


def main(
    argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """
    The C{gsmail-check} command. Runs a reactor when it asks the network.

    @return: the exit status: 0 no problem, 78 problems (EX_CONFIG), 64 a
        bad command line (EX_USAGE).
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return EX_OK if e.code == 0 else EX_USAGE
    try:
        user = _user(args.uid, args.gid)
    except KeyError as e:
        err.write(f"gsmail-check: no such user or group: {e}\n")
        return EX_USAGE
    try:
        config = load_config(args.config, args.instance)
    except ConfigError as e:
        err.write(f"gsmail-check: {e}\n")
        return EX_CONFIG
    out.write(f"# gsmail {__version__}: {config.path} [instance {config.instance}]\n")
    for line in effective_settings(config):
        out.write(line + "\n")
    report = _run(config, user, network=not args.offline)
    for line in report.ok:
        out.write(f"ok: {line}\n")
    for line in report.warnings:
        err.write(f"gsmail-check: warning: {line}\n")
    for line in report.problems:
        err.write(f"gsmail-check: {line}\n")
    out.flush()
    err.flush()
    return EX_CONFIG if report.problems else EX_OK


def _run(config: GsmailConfig, user: RunUser | None, network: bool) -> Report:
    """L{run_checks} on a reactor of its own, run to the end."""
    from twisted.internet import reactor

    reports: list[Report] = []
    failures: list[Any] = []

    async def go() -> None:
        try:
            reports.append(await run_checks(config, reactor, user, network=network))
        finally:
            reactor.stop()

    def start() -> None:
        Deferred.fromCoroutine(go()).addErrback(failures.append)

    reactor.callWhenRunning(start)
    cast(Any, reactor).run(installSignalHandlers=False)
    if failures:
        failures[0].raiseException()
    return reports[0]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
