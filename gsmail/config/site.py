# -*- test-case-name: tests.test_config -*-
"""
The site's options of the C{[gsmail-NAME]} section: the GroupServer
connection, the listeners and their TLS files, the state on disk, the
embedded stand-in (L{_SiteOptions.gsmail}), the abuse limits, the route
table, how gsmail runs (socket group and mode, JSON log) and monitoring.

Not the outbound side (L{gsmail.config.outbound}) nor the typed values they
are made of (L{gsmail.config.reader}).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from socket import getfqdn
from typing import Any

from gsmail.addresses import AddressError, parse_mailbox
from gsmail.config.reader import _ValueReader
from gsmail.config.schema import (
    _DEFAULTS,
    MAX_REPLY_DEADLINE,
    MIN_LINE_LENGTH,
    GsmailConfig,
)


class _SiteOptions(_ValueReader):
    """
    Reads the site's groups of options; each method returns the fields of
    L{GsmailConfig} it read.
    """

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
            ledger_commit_delay=self.ledger_commit_delay(section),
            postmaster_maildir=self.path_option(section, "postmaster_maildir"),
            postmaster_address=postmaster_address,
            standin_dir=self.path_option(section, "standin_dir"),
            standin_groups=self.words(section, "standin_groups"),
            standin_endpoint=self.endpoint(section, "standin_endpoint", required=True),
        )
