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

This module is the front door: L{load_config} and L{load_pipe_config}, and
the names of the options module, L{gsmail.config.schema} (L{GsmailConfig},
L{ConfigError}, ...), which are imported from here. The file syntax and the
typed values are in L{gsmail.config.reader}; the groups of options in
L{gsmail.config.site} (GroupServer, listeners, limits, routes, running,
monitoring) and L{gsmail.config.outbound} (submission, queue, relay,
delivery TLS, VERP, signing).
"""

from __future__ import annotations

import os

import attrs

from gsmail.config.outbound import _OutboundOptions
from gsmail.config.reader import _parse
from gsmail.config.schema import (
    DEFAULT_SIGN_HEADERS,
    MAX_INBOUND_WORKERS,
    MAX_REPLY_DEADLINE,
    MIN_LINE_LENGTH,
    ConfigError,
    GsmailConfig,
    PipeConfig,
    mta_sts_cache_path,
    parse_bool,
    parse_duration,
    verp_key_path,
)
from gsmail.config.site import _SiteOptions

__all__ = [
    "DEFAULT_SIGN_HEADERS",
    "MAX_INBOUND_WORKERS",
    "MAX_REPLY_DEADLINE",
    "MIN_LINE_LENGTH",
    "ConfigError",
    "GsmailConfig",
    "PipeConfig",
    "load_config",
    "load_pipe_config",
    "mta_sts_cache_path",
    "parse_bool",
    "parse_duration",
    "verp_key_path",
]


class _Reader(_SiteOptions, _OutboundOptions):
    """
    Reads and checks every option of the parsed file: the typed values of
    L{_ValueReader} and the groups of options of the site and outbound side.
    """


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
