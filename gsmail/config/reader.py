# -*- test-case-name: tests.test_config -*-
"""
The gs.config file itself: reading C{gsconfig.ini} into a parser with
errors that never quote a line (the token may be on it), the escapes of
Twisted endpoint strings, and L{_ValueReader}, which reads one option as a
typed value (duration, size, path, endpoint, list, ...) and words the one-line
L{ConfigError} naming file, section and option.

Not what the options mean or which section holds them: the groups of options
are read in L{gsmail.config.site} and L{gsmail.config.outbound}, the fields and
defaults are in L{gsmail.config.schema}, and L{gsmail.config} puts them together.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from configparser import (
    ConfigParser,
    DuplicateOptionError,
    DuplicateSectionError,
    MissingSectionHeaderError,
    ParsingError,
)
from configparser import Error as ConfigParserError
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import attrs
from twisted.logger import Logger

from gsmail.config.schema import (
    _DEFAULTS,
    _GSMAIL_OPTIONS,
    MAX_COMMIT_DELAY,
    MAX_INBOUND_WORKERS,
    ConfigError,
    parse_bool,
    parse_duration,
)

# The namespace of the module that read the file before it was split, so that
# the log lines (and their JSON form) stay as they were.
log = Logger(namespace="gsmail.config")

_MIB: Final = 1024 * 1024
_ENDPOINT_TYPES: Final = ("tcp", "tcp6", "unix", "ssl", "tls", "systemd")
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
class _ValueReader:
    """
    Reads and checks one option of the parsed file as a typed value, and
    words the errors. The groups of options are read by its subclasses
    (L{gsmail.config.site}, L{gsmail.config.outbound}).

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

    def ledger_commit_delay(self, section: str) -> float:
        """C{ledger_commit_delay}: 0 (off) up to L{MAX_COMMIT_DELAY} seconds."""
        seconds = self.duration_or_off(section, "ledger_commit_delay")
        if seconds > MAX_COMMIT_DELAY:
            raise self.error(
                section,
                "ledger_commit_delay",
                f"must be at most {MAX_COMMIT_DELAY:g} seconds (every post may wait it),"
                f" got {seconds:g}",
            )
        return seconds

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
