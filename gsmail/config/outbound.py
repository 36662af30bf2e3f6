# -*- test-case-name: tests.test_config -*-
"""
The outbound options of the C{[gsmail-NAME]} section and of GroupServer's
C{[smtp-NAME]} section: the submission listener, the queue, the relay host,
delivery TLS and MTA-STS, signed VERP, and deliverability (DKIM signing, ARC
sealing, the authentication checks of inbound mail).

Not the site and listener options (L{gsmail.config.site}) nor the typed
values they are made of (L{gsmail.config.reader}).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from typing import Any

from twisted.logger import Logger

from gsmail.config.reader import _ValueReader

# The namespace of the module that read the file before it was split, so that
# the log lines (and their JSON form) stay as they were.
log = Logger(namespace="gsmail.config")


class _OutboundOptions(_ValueReader):
    """
    Reads the outbound groups of options; each method returns the fields of
    L{GsmailConfig} or L{PipeConfig} it read.
    """

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
            from gsmail.outbound.relayhost import parse_relayhost

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

    def mx_tls(self, section: str) -> str:
        """C{mx_tls}: C{none}, C{may}, C{encrypt}, or empty (as C{smtp_tls_security_level})."""
        if not self.raw(section, "mx_tls"):
            return ""
        return self.text(section, "mx_tls", ("none", "may", "encrypt"))
