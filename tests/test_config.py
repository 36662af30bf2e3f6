# -*- test-case-name: tests.test_config -*-
"""
Tests for L{gsmail.config}: reading gsmail's options from a gs.config file.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from typing import cast

import attrs
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gsmail import config as config_module
from gsmail.config import (
    ConfigError,
    GsmailConfig,
    load_config,
    mta_sts_cache_path,
    parse_bool,
    parse_duration,
)
from tests.gsconfig import BASE_GSMAIL, FQDN, TOKEN, ConfigFileTestCase, ini
from tests.util import ROOT

# Every option gsmail reads, as written in the file.
#: Fields read from the [smtp-NAME] section, by their option name there.
SMTP_OPTIONS = {
    "smtp_username": "username",
    "smtp_password": "password",
    "no_tls": "no_tls",
    "force_tls": "force_tls",
    "queuepath": "queuepath",
    "processorthread": "processorthread",
}
OPTIONS = ["token", "relay-address-prefix"] + [
    field.name
    for field in attrs.fields(GsmailConfig)
    if field.name not in {"path", "instance", "token", "relay_address_prefix", *SMTP_OPTIONS}
]

DURATIONS = (
    "connect_timeout",
    "response_timeout",
    "idle_timeout",
    "reply_deadline",
    "group_cache_ttl",
    "group_negative_cache_ttl",
    "ledger_ttl",
)


class ParseDurationTests(SynchronousTestCase):
    """
    Tests for L{parse_duration}.
    """

    def test_seconds(self) -> None:
        """
        A bare number is a number of seconds, fractions included.
        """
        self.assertEqual(parse_duration("90"), 90.0)
        self.assertEqual(parse_duration("1.5"), 1.5)
        self.assertEqual(parse_duration(".25"), 0.25)
        self.assertEqual(parse_duration(" 0 "), 0.0)

    def test_suffixes(self) -> None:
        """
        The suffixes s, m, h and d, in either case and after optional space,
        give seconds, minutes, hours and days.
        """
        self.assertEqual(parse_duration("90s"), 90.0)
        self.assertEqual(parse_duration("15m"), 900.0)
        self.assertEqual(parse_duration("2H"), 7200.0)
        self.assertEqual(parse_duration("7d"), 604800.0)
        self.assertEqual(parse_duration("1.5 h"), 5400.0)

    def test_bad(self) -> None:
        """
        Anything else is a L{ValueError} quoting the text: negative numbers,
        unknown units, exponents, infinity, a unit alone, an empty string.
        """
        for text in ("", "-5", "7w", "1e3", "inf", "nan", "d", "1.2.3", "5 s s", "9" * 400):
            with self.subTest(text=text):
                error = self.assertRaises(ValueError, parse_duration, text)
                self.assertIn(repr(text), str(error))


class ParseBoolTests(SynchronousTestCase):
    """
    Tests for L{parse_bool}.
    """

    def test_true(self) -> None:
        """
        true, yes, on and 1 in any case are C{True}.
        """
        for text in ("true", "True", "YES", "on", "1", " On "):
            with self.subTest(text=text):
                self.assertIs(parse_bool(text), True)

    def test_false(self) -> None:
        """
        false, no, off and 0 in any case are C{False}.
        """
        for text in ("false", "FALSE", "no", "Off", "0", " no "):
            with self.subTest(text=text):
                self.assertIs(parse_bool(text), False)

    def test_bad(self) -> None:
        """
        Other words are a L{ValueError} quoting the text.
        """
        for text in ("", "maybe", "2", "y", "n"):
            with self.subTest(text=text):
                error = self.assertRaises(ValueError, parse_bool, text)
                self.assertIn(repr(text), str(error))


class FormsTests(ConfigFileTestCase):
    """
    L{load_config} finds its sections in the full and the short gs.config form.
    """

    def test_full_form(self) -> None:
        """
        C{[config-default]} names the webservice, smtp and gsmail sections the
        options come from.
        """
        path = self.write(
            "[config-default]\n"
            "webservice = site\n"
            "smtp = main\n"
            "gsmail = mail\n"
            "database = ignored\n"
            "[webservice-site]\n"
            f"token = {TOKEN}\n"
            "[smtp-main]\n"
            "relay-address-prefix = relay-\n"
            "[gsmail-mail]\n"
            "url = http://gs.example.com:8080\n"
            "smtp_endpoint = tcp:25\n"
            "domains = lists.example.com\n"
        )
        config = load_config(path)
        self.assertEqual(
            (config.path, config.instance, config.token, config.relay_address_prefix),
            (path, "default", TOKEN, "relay-"),
        )
        self.assertEqual(
            (config.url, config.smtp_endpoint, config.lmtp_endpoint, config.domains),
            ("http://gs.example.com:8080", "tcp:25", "", ("lists.example.com",)),
        )

    def test_short_form(self) -> None:
        """
        Without C{[config-INSTANCE]}, the options come from
        C{[webservice-INSTANCE]}, C{[smtp-INSTANCE]} and C{[gsmail-INSTANCE]}.
        """
        path = self.write(
            "[webservice-prod]\n"
            f"token = {TOKEN}\n"
            "[smtp-prod]\n"
            "relay-address-prefix = r-\n"
            "[gsmail-prod]\n"
            "url = embedded\n"
            "lmtp_endpoint = tcp:2424\n"
            "domains = prod.example.com\n"
        )
        config = load_config(path, "prod")
        self.assertEqual(
            (config.instance, config.token, config.relay_address_prefix, config.url),
            ("prod", TOKEN, "r-", "embedded"),
        )

    def test_short_form_without_smtp(self) -> None:
        """
        In the short form the smtp section is optional; the relay prefix is
        then C{p-}.
        """
        path = self.write(
            f"[webservice-default]\ntoken = {TOKEN}\n"
            "[gsmail-default]\nurl = embedded\nlmtp_endpoint = tcp:24\ndomains = a.example\n"
        )
        self.assertEqual(load_config(path).relay_address_prefix, "p-")

    def test_full_form_without_smtp(self) -> None:
        """
        An instance that names no smtp section has the relay prefix C{p-}.
        """
        self.assertEqual(self.load(smtp=None).relay_address_prefix, "p-")

    def test_smtp_without_prefix(self) -> None:
        """
        An smtp section without C{relay-address-prefix} (GroupServer's own
        outbound settings only) gives the prefix C{p-}.
        """
        self.assertEqual(
            self.load(smtp="hostname = localhost\nport = 25").relay_address_prefix, "p-"
        )

    def test_full_form_wins(self) -> None:
        """
        When C{[config-INSTANCE]} exists, short-form sections of the same name
        are not read.
        """
        path = self.write(
            "[config-default]\nwebservice = default\ngsmail = real\n"
            f"[webservice-default]\ntoken = {TOKEN}\n"
            "[gsmail-default]\nurl = http://short.example\nlmtp_endpoint = tcp:24\n"
            "domains = short.example\n"
            "[gsmail-real]\nurl = http://real.example\nlmtp_endpoint = tcp:24\n"
            "domains = real.example\n"
        )
        self.assertEqual(load_config(path).url, "http://real.example")

    def test_shared_sections(self) -> None:
        """
        Two instances may share the webservice and smtp sections and differ in
        their gsmail section.
        """
        path = self.write(
            "[config-one]\nwebservice = shared\nsmtp = shared\ngsmail = one\n"
            "[config-two]\nwebservice = shared\nsmtp = shared\ngsmail = two\n"
            f"[webservice-shared]\ntoken = {TOKEN}\n"
            "[smtp-shared]\nrelay-address-prefix = x-\n"
            "[gsmail-one]\nurl = https://one.example\nsmtp_endpoint = tcp:25\n"
            "domains = one.example\n"
            "[gsmail-two]\nurl = https://two.example\nsmtp_endpoint = tcp:2525\n"
            "domains = two.example\n"
        )
        one = load_config(path, "one")
        two = load_config(path, "two")
        self.assertEqual(
            [(c.instance, c.token, c.relay_address_prefix, c.url, c.domains) for c in (one, two)],
            [
                ("one", TOKEN, "x-", "https://one.example", ("one.example",)),
                ("two", TOKEN, "x-", "https://two.example", ("two.example",)),
            ],
        )

    def test_unknown_options_ignored(self) -> None:
        """
        Options gsmail does not know, in any section, are ignored; those in
        the gsmail section (usually typing errors) are logged by name.
        """
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        config = self.load(
            {"max-size": "1", "maxsize": "2"},
            token_line=f"token = {TOKEN}\nsecret-thing = 1",
            smtp="hostname = localhost\nxverp = True\nqueuepath = /tmp/q",
        )
        self.assertEqual(config.max_size, attrs.fields(GsmailConfig).max_size.default)
        messages = [
            formatEvent(event) for event in events if event["log_namespace"] == "gsmail.config"
        ]
        self.assertEqual(
            messages,
            [
                f"{config.path}: [gsmail-default] max-size: unknown option, ignored",
                f"{config.path}: [gsmail-default] maxsize: unknown option, ignored",
            ],
        )

    def test_comments_and_no_interpolation(self) -> None:
        """
        Whole-line and inline comments (C{;} and C{#} after a space) are
        dropped; C{%} is an ordinary character, since interpolation is off.
        """
        path = self.write(
            "# GroupServer's configuration\n"
            "[config-default] ; the site\n"
            "webservice = default  # shared\n"
            "gsmail = default\n"
            "[webservice-default]\n"
            "; the token\n"
            "token = 50%off%(x)s ; made by gs_auth_token_create\n"
            "[gsmail-default]\n"
            "url = https://gs.example/a%20b # the site\n"
            "lmtp_endpoint = tcp:24\n"
            "domains = gs.example ; one domain\n"
        )
        config = load_config(path)
        self.assertEqual(
            (config.token, config.url, config.domains),
            ("50%off%(x)s", "https://gs.example/a%20b", ("gs.example",)),
        )

    def test_token_not_in_repr(self) -> None:
        """
        The repr of a configuration does not show the token.
        """
        self.assertNotIn(TOKEN, repr(self.load()))


class DefaultsTests(ConfigFileTestCase):
    """
    Options missing from the file take their documented defaults.
    """

    def test_defaults(self) -> None:
        """
        With only the required options set, every other option has the
        default of L{GsmailConfig}.
        """
        config = self.load()
        fields = attrs.fields_dict(GsmailConfig)
        special = {"path", "instance", "url", "token", "lmtp_endpoint", "domains"}
        special |= {"hostname", "spool_dir"}
        for name, field in fields.items():
            if name not in special:
                with self.subTest(option=name):
                    self.assertEqual(getattr(config, name), field.default)
        self.assertEqual((config.smtp_endpoint, config.tls_key), ("", ""))
        self.assertEqual(config.max_size, 200 * 1024 * 1024)
        self.assertEqual(config.reply_deadline, 540.0)

    def test_hostname_default(self) -> None:
        """
        Without C{hostname}, gsmail greets with this host's fully qualified
        name.
        """
        self.assertEqual(self.load().hostname, FQDN)

    def test_spool_dir_default(self) -> None:
        """
        Without C{spool_dir}, or with it empty, mail is spooled in the system's
        temporary directory.
        """
        self.assertEqual(self.load().spool_dir, tempfile.gettempdir())
        self.assertEqual(self.load({"spool_dir": ""}).spool_dir, tempfile.gettempdir())


class OptionTests(ConfigFileTestCase):
    """
    Each option of the gsmail section is read into L{GsmailConfig}.
    """

    def test_url(self) -> None:
        """
        C{url} is C{embedded} (any case) or an http(s) URL; the scheme is
        lowercased and a trailing slash dropped.
        """
        cases = {
            "EMBEDDED": "embedded",
            "https://gs.example.com/": "https://gs.example.com",
            "HTTP://gs.example.com:8080/site/": "http://gs.example.com:8080/site",
            "http://[::1]:8080": "http://[::1]:8080",
        }
        for given, expected in cases.items():
            with self.subTest(url=given):
                self.assertEqual(self.load({"url": given}).url, expected)

    def test_token_stripped(self) -> None:
        """
        Space around the token is not part of it.
        """
        self.assertEqual(self.load(token_line=f"token =   {TOKEN}   ").token, TOKEN)

    def test_verify_tls(self) -> None:
        """
        C{verify_tls} takes gs.config booleans.
        """
        self.assertIs(self.load({"verify_tls": "off"}).verify_tls, False)
        self.assertIs(self.load({"verify_tls": "Yes"}).verify_tls, True)

    def test_durations(self) -> None:
        """
        Every duration option takes seconds or a suffixed number.
        """
        for option in DURATIONS:
            with self.subTest(option=option):
                self.assertEqual(getattr(self.load({option: "90"}), option), 90.0)
                self.assertEqual(getattr(self.load({option: "2.5m"}), option), 150.0)
        self.assertEqual(self.load({"ledger_ttl": "7d"}).ledger_ttl, 604800.0)
        self.assertEqual(self.load({"group_cache_ttl": "1h"}).group_cache_ttl, 3600.0)

    def test_verp_options(self) -> None:
        """
        The signed VERP options: the key file beside the ledger by default
        (relative names against the file's directory), 14 days, C{auto};
        bad values are one-line errors naming the option.
        """
        config = self.load()
        self.assertEqual(
            (config.verp_key_file, config.verp_max_age, config.verp_unsigned_until),
            ("", 14 * 86400.0, "auto"),
        )
        self.assertEqual(
            config_module.verp_key_path(config),
            os.path.join(os.path.dirname(config.ledger_path), "verp.key"),
        )
        config = self.load(
            {
                "verp_key_file": "keys/verp",
                "verp_max_age": "30d",
                "verp_unsigned_until": "2030-01-31",
            }
        )
        self.assertEqual(
            (config.verp_key_file, config.verp_max_age, config.verp_unsigned_until),
            (os.path.join(self.directory, "keys", "verp"), 30 * 86400.0, "2030-01-31"),
        )
        self.assertEqual(config_module.verp_key_path(config), config.verp_key_file)
        for option, value, words in (
            ("verp_max_age", "12h", "1 to 10000 days"),
            ("verp_max_age", "20000d", "1 to 10000 days"),
            ("verp_unsigned_until", "soon", "auto, always, never or a date"),
            ("verp_unsigned_until", "2030-02-30", "auto, always, never or a date"),
        ):
            error = self.assertRaises(ConfigError, self.load, {option: value})
            self.assertIn(f"[gsmail-default] {option}: ", str(error))
            self.assertIn(words, str(error))
            self.assertNotIn("\n", str(error))

    def test_reply_deadline_limit(self) -> None:
        """
        C{reply_deadline} may be up to 590 seconds.
        """
        self.assertEqual(self.load({"reply_deadline": "590"}).reply_deadline, 590.0)

    def test_integers(self) -> None:
        """
        The count options take whole numbers at their minimum and above.
        """
        config = self.load(
            {
                "post_concurrency": "1",
                "max_recipients": "1",
                "max_connections": "50",
                "max_line_length": "1000",
            }
        )
        self.assertEqual(
            (
                config.post_concurrency,
                config.max_recipients,
                config.max_connections,
                config.max_line_length,
            ),
            (1, 1, 50, 1000),
        )

    def test_inbound_workers(self) -> None:
        """
        C{inbound_workers} is 0 (the main process accepts) unless set, and
        takes 0 to 64.
        """
        self.assertEqual(self.load().inbound_workers, 0)
        for value in ("0", "2", "64"):
            with self.subTest(value=value):
                self.assertEqual(self.load({"inbound_workers": value}).inbound_workers, int(value))

    def test_time_source(self) -> None:
        """
        C{time_source} is C{server} or C{message}, in any case.
        """
        self.assertEqual(self.load({"time_source": "Message"}).time_source, "message")
        self.assertEqual(self.load({"time_source": "server"}).time_source, "server")

    def test_endpoints(self) -> None:
        """
        The listener endpoints are kept as written; an empty one is off.
        """
        config = self.load(
            {"smtp_endpoint": r"tcp:25:interface=\:\:", "lmtp_endpoint": "", "url": "embedded"}
        )
        self.assertEqual(
            (config.smtp_endpoint, config.lmtp_endpoint), (r"tcp:25:interface=\:\:", "")
        )
        config = self.load({"smtp_endpoint": "systemd:domain=INET:index=0"})
        self.assertEqual(
            (config.smtp_endpoint, config.lmtp_endpoint),
            ("systemd:domain=INET:index=0", "unix:/run/gsmail/lmtp.sock"),
        )

    def test_hostname(self) -> None:
        """
        C{hostname} replaces the looked-up name.
        """
        self.assertEqual(self.load({"hostname": "mail.example.com"}).hostname, "mail.example.com")

    def test_domains(self) -> None:
        """
        C{domains} is separated by commas, spaces or line breaks; names are
        lowercased, without a trailing dot or repeats; Unicode names stay
        Unicode.
        """
        config = self.load(
            {
                "domains": "Groups.Example.com, lists.example.org\n  Dev.Example.NET. groups.example.com,"
                " Grüppen.Example xn--bcher-kva.example"
            }
        )
        self.assertEqual(
            config.domains,
            (
                "groups.example.com",
                "lists.example.org",
                "dev.example.net",
                "grüppen.example",
                "xn--bcher-kva.example",
            ),
        )

    def test_max_size(self) -> None:
        """
        C{max_size} is given in MiB, fractions allowed, and kept in bytes.
        """
        self.assertEqual(self.load({"max_size": "10"}).max_size, 10 * 1024 * 1024)
        self.assertEqual(self.load({"max_size": "0.5"}).max_size, 512 * 1024)

    def test_tls(self) -> None:
        """
        C{tls_certificate} and C{tls_key} name readable PEM files.
        """
        cert = self.write("-----BEGIN CERTIFICATE-----\n", "cert.pem")
        key = self.write("-----BEGIN PRIVATE KEY-----\n", "key.pem")
        config = self.load({"tls_certificate": cert, "tls_key": key})
        self.assertEqual((config.tls_certificate, config.tls_key), (cert, key))

    def test_state_paths(self) -> None:
        """
        The spool, ledger and stand-in paths are kept when absolute.
        """
        config = self.load(
            {"spool_dir": "/srv/spool", "ledger_path": "/srv/ledger", "standin_dir": "/srv/standin"}
        )
        self.assertEqual(
            (config.spool_dir, config.ledger_path, config.standin_dir),
            ("/srv/spool", "/srv/ledger", "/srv/standin"),
        )

    def test_standin(self) -> None:
        """
        C{standin_groups} is a list of group ids as written (case kept);
        C{standin_endpoint} an endpoint string.
        """
        config = self.load(
            {"standin_groups": "dev, Support\n  announce dev", "standin_endpoint": "tcp:8080"}
        )
        self.assertEqual(
            (config.standin_groups, config.standin_endpoint),
            (("dev", "Support", "announce"), "tcp:8080"),
        )

    def test_relay_prefix(self) -> None:
        """
        C{relay-address-prefix} comes from the smtp section.
        """
        config = self.load(smtp="relay-address-prefix = relay.")
        self.assertEqual(config.relay_address_prefix, "relay.")


class RelativePathTests(ConfigFileTestCase):
    """
    Relative file names are taken relative to the configuration file's
    directory, not the working directory.
    """

    def test_state_paths(self) -> None:
        """
        The spool, ledger and stand-in directories resolve against the file's
        directory, as C{conf/demo.ini} saying C{../var/ledger} expects.
        """
        path = self.write(
            ini({"ledger_path": "../var/ledger", "spool_dir": "spool", "standin_dir": "./s"}),
            "conf/demo.ini",
        )
        config = load_config(path)
        conf = os.path.join(self.directory, "conf")
        self.assertEqual(
            (config.ledger_path, config.spool_dir, config.standin_dir),
            (
                os.path.join(self.directory, "var", "ledger"),
                os.path.join(conf, "spool"),
                os.path.join(conf, "s"),
            ),
        )

    def test_relative_config_path(self) -> None:
        """
        A configuration file given by a relative name is found, and its
        relative paths resolved, against the working directory at load time;
        the configuration records the file's absolute name.
        """
        self.write(ini({"ledger_path": "ledger"}), "conf/demo.ini")
        cwd = os.getcwd()
        self.addCleanup(os.chdir, cwd)
        os.chdir(self.directory)
        config = load_config(os.path.join("conf", "demo.ini"))
        self.assertEqual(
            (config.path, config.ledger_path),
            (
                os.path.join(self.directory, "conf", "demo.ini"),
                os.path.join(self.directory, "conf", "ledger"),
            ),
        )

    def test_tls_files(self) -> None:
        """
        Relative TLS file names resolve against the file's directory.
        """
        self.write("cert\n", "conf/tls/cert.pem")
        self.write("key\n", "conf/tls/key.pem")
        path = self.write(
            ini({"tls_certificate": "tls/cert.pem", "tls_key": "tls/key.pem"}), "conf/gs.ini"
        )
        config = load_config(path)
        self.assertEqual(
            (config.tls_certificate, config.tls_key),
            (
                os.path.join(self.directory, "conf", "tls", "cert.pem"),
                os.path.join(self.directory, "conf", "tls", "key.pem"),
            ),
        )

    def test_endpoint_paths(self) -> None:
        """
        File names inside endpoint strings (a UNIX socket, SSL key and
        certificate, a TLS PEM directory) resolve too; other arguments, and
        absolute names, are kept.
        """
        path = self.write(
            ini(
                {
                    "lmtp_endpoint": "unix:../run/lmtp.sock:mode=660:lockfile=1",
                    "smtp_endpoint": "ssl:465:privateKey=key.pem:certKey=/etc/cert.pem",
                    "standin_endpoint": "unix:address=standin.sock",
                }
            ),
            "conf/gs.ini",
        )
        config = load_config(path)
        self.assertEqual(
            (config.lmtp_endpoint, config.smtp_endpoint, config.standin_endpoint),
            (
                f"unix:{self.directory}/run/lmtp.sock:mode=660:lockfile=1",
                f"ssl:465:privateKey={self.directory}/conf/key.pem:certKey=/etc/cert.pem",
                f"unix:address={self.directory}/conf/standin.sock",
            ),
        )
        config = load_config(self.write(ini({"smtp_endpoint": "tls:pems:port=465"}), "conf/t.ini"))
        self.assertEqual(config.smtp_endpoint, f"tls:{self.directory}/conf/pems:port=465")

    def test_endpoint_path_escaped(self) -> None:
        """
        A directory name holding C{:} or C{=} is escaped in the resolved
        endpoint string, so Twisted reads the same file name.
        """
        path = self.write(ini({"lmtp_endpoint": "unix:lmtp.sock"}), "a:b=c/gs.ini")
        escaped = self.directory.replace(":", "\\:").replace("=", "\\=")
        self.assertEqual(load_config(path).lmtp_endpoint, f"unix:{escaped}/a\\:b\\=c/lmtp.sock")


class ErrorTests(ConfigFileTestCase):
    """
    A configuration gsmail cannot use is a L{ConfigError} whose message is one
    line naming the file, section and option, and never the token.
    """

    def assertError(self, text: str, section: str, option: str, problem: str) -> ConfigError:
        """
        Loading C{text} fails with C{"PATH: [SECTION] OPTION: ..."}, one line,
        with C{problem} in it and no token.
        """
        path = self.write(text)
        error: ConfigError = self.assertRaises(ConfigError, load_config, path)
        message = str(error)
        self.assertTrue(
            message.startswith(f"{path}: [{section}] {option}: "),
            f"{message!r} does not name [{section}] {option}",
        )
        self.assertIn(problem, message)
        self.assertNotIn("\n", message)
        self.assertNotIn(TOKEN, message)
        return error

    def assertGsmailError(
        self, options: Mapping[str, str | None], option: str, problem: str
    ) -> ConfigError:
        return self.assertError(ini(options), "gsmail-default", option, problem)

    def test_missing_file(self) -> None:
        """
        A missing file is named with the system's reason.
        """
        path = os.path.join(self.directory, "x.ini")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(str(error), f"{path}: cannot read: No such file or directory")

    def test_directory(self) -> None:
        """
        A directory is not a configuration file.
        """
        error = self.assertRaises(ConfigError, load_config, self.directory)
        self.assertEqual(str(error), f"{self.directory}: cannot read: Is a directory")

    def test_not_utf8(self) -> None:
        """
        A file that is not UTF-8 text cannot be read.
        """
        path = os.path.join(self.directory, "latin1.ini")
        with open(path, "wb") as stream:
            stream.write(b"[webservice-default]\ntoken = caf\xe9\n")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(str(error), f"{path}: cannot read: not UTF-8 text (at offset 32)")

    def test_no_sections(self) -> None:
        """
        An instance with neither form of sections is named, with the
        sections looked for.
        """
        path = self.write(ini())
        error = self.assertRaises(ConfigError, load_config, path, "prod")
        self.assertEqual(
            str(error),
            f"{path}: no section [config-prod] (instance 'prod') and no short-form "
            "sections [webservice-prod] and [gsmail-prod]",
        )

    def test_short_form_incomplete(self) -> None:
        """
        A short form with only one of its two required sections names the
        missing one.
        """
        path = self.write(f"[webservice-default]\ntoken = {TOKEN}\n")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(
            str(error),
            f"{path}: no section [gsmail-default] (instance 'default' in the short form, "
            "without [config-default])",
        )

    def test_bad_instance(self) -> None:
        """
        An empty instance name is refused.
        """
        path = self.write(ini())
        error = self.assertRaises(ConfigError, load_config, path, "")
        self.assertEqual(str(error), f"{path}: bad instance name ''")

    def test_config_missing_type(self) -> None:
        """
        A C{[config-INSTANCE]} that does not name a gsmail section is an error
        naming that option.
        """
        self.assertError(
            f"[config-default]\nwebservice = default\n[webservice-default]\ntoken = {TOKEN}\n",
            "config-default",
            "gsmail",
            "missing: name the [gsmail-NAME] section to use",
        )

    def test_config_names_missing_section(self) -> None:
        """
        A C{[config-INSTANCE]} naming a section that does not exist says which.
        """
        text = ini().replace("webservice = default", "webservice = live")
        self.assertError(text, "config-default", "webservice", "no section [webservice-live]")
        text = ini().replace("smtp = main", "smtp = outbound")
        self.assertError(text, "config-default", "smtp", "no section [smtp-outbound]")

    def test_token_missing(self) -> None:
        """
        The token is required.
        """
        self.assertError(ini(token_line=None), "webservice-default", "token", "missing")

    def test_token_empty(self) -> None:
        """
        The token must not be empty.
        """
        self.assertError(ini(token_line="token =   "), "webservice-default", "token", "is empty")

    def test_malformed_token_never_shown(self) -> None:
        """
        Whatever is wrong with the token line, the message does not quote the
        token.
        """
        cases = [
            (f"token = {TOKEN} trailing", "token", "must be one word"),
            (f"token = {TOKEN}\n  {TOKEN}", "token", "must be one word"),
            (f"token = x\ntoken = {TOKEN}", "token", "appears twice (line"),
            (f"token {TOKEN}", "line 10", "expected 'name = value'"),
            (f"token\t{TOKEN}\n{TOKEN}", "line 10", "expected 'name = value' (and 1 more)"),
        ]
        for token_line, option, problem in cases:
            with self.subTest(token_line=token_line):
                self.assertError(ini(token_line=token_line), "webservice-default", option, problem)

    def test_token_in_other_option_hidden(self) -> None:
        """
        A token pasted into another option by mistake is not shown either.
        """
        error = self.assertGsmailError({"url": TOKEN}, "url", "expected 'embedded'")
        self.assertIn("<token>", str(error))

    def test_option_before_section(self) -> None:
        """
        An option before any section header is refused, by line number.
        """
        path = self.write(f"token = {TOKEN}\n" + ini())
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(
            str(error), f"{path}: line 1: expected a [section] header before the first option"
        )

    def test_duplicate_section(self) -> None:
        """
        A section given twice is refused, by line number.
        """
        path = self.write(ini() + "[gsmail-default]\n")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(str(error), f"{path}: line 16: section [gsmail-default] appears twice")

    def test_url(self) -> None:
        """
        C{url} must be C{embedded} or an http(s) URL with a host.
        """
        cases = [
            (None, "missing: 'embedded' or the site's http(s) URL"),
            ("", "missing: 'embedded' or the site's http(s) URL"),
            ("ftp://gs.example", "expected 'embedded' or an http:// or https:// URL, got 'ftp"),
            ("gs.example.com", "expected 'embedded' or an http:// or https:// URL"),
            ("http://gs example", "expected 'embedded' or an http:// or https:// URL"),
            ("https:///path", "no host in the URL 'https:///path'"),
            ("https://gs.example:99999", "bad port in the URL"),
            ("https://gs.example:0", "bad port in the URL"),
            ("https://gs.example/?a=b", "takes no query or fragment"),
        ]
        for url, problem in cases:
            with self.subTest(url=url):
                self.assertGsmailError({"url": url}, "url", problem)

    def test_url_password_never_shown(self) -> None:
        """
        A user name and password in the URL are refused without quoting them.
        """
        error = self.assertGsmailError(
            {"url": "https://admin:hunter2@gs.example"}, "url", "must not hold a user name"
        )
        self.assertNotIn("hunter2", str(error))

    def test_no_listener(self) -> None:
        """
        At least one of the SMTP and LMTP endpoints must be set.
        """
        self.assertGsmailError(
            {"lmtp_endpoint": "", "smtp_endpoint": None},
            "smtp_endpoint, lmtp_endpoint",
            "set at least one",
        )

    def test_bad_endpoint(self) -> None:
        """
        An endpoint must start with a known type and have arguments.
        """
        for option in ("smtp_endpoint", "lmtp_endpoint", "standin_endpoint"):
            for value in ("udp:25", "tcp", "tcp:", "25"):
                with self.subTest(option=option, value=value):
                    self.assertGsmailError(
                        {option: value}, option, "expected an endpoint string starting tcp:"
                    )
        self.assertGsmailError({"standin_endpoint": ""}, "standin_endpoint", "got ''")

    def test_domains(self) -> None:
        """
        C{domains} must name at least one valid domain.
        """
        cases = [
            (None, "missing: the domains to take mail for"),
            (" , ", "missing: the domains to take mail for"),
            ("groups.example.com bad_domain", "not a domain name: 'bad_domain'"),
            ("-x.example", "not a domain name: '-x.example'"),
            ("a..example", "not a domain name: 'a..example'"),
            ("user@example.com", "not a domain name: 'user@example.com'"),
            ("x" * 64 + ".example", "not a domain name"),
        ]
        for value, problem in cases:
            with self.subTest(domains=value):
                self.assertGsmailError({"domains": value}, "domains", problem)

    def test_max_size(self) -> None:
        """
        C{max_size} must be a positive number of MiB.
        """
        self.assertGsmailError(
            {"max_size": "big"}, "max_size", "expected a number of MiB, got 'big'"
        )
        for value in ("nan", "inf", ""):
            with self.subTest(value=value):
                self.assertGsmailError({"max_size": value}, "max_size", "expected a number of MiB")
        for value in ("0", "-1", "0.0000001"):
            with self.subTest(value=value):
                self.assertGsmailError({"max_size": value}, "max_size", "must be more than 0 MiB")

    def test_max_size_message(self) -> None:
        """
        The message for a bad size reads as documented.
        """
        path = self.write(ini({"max_size": "big"}))
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(
            str(error), f"{path}: [gsmail-default] max_size: expected a number of MiB, got 'big'"
        )

    def test_durations(self) -> None:
        """
        Every duration option refuses a bad form, zero and negative values.
        """
        for option in DURATIONS:
            for value in ("7w", "-1", "0", "0s", ""):
                with self.subTest(option=option, value=value):
                    problem = "must be more than 0 seconds" if value.startswith("0") else "got"
                    self.assertGsmailError({option: value}, option, problem)

    def test_ledger_commit_delay(self) -> None:
        """
        C{ledger_commit_delay}: 2 ms by default, C{0} turns it off, at most
        0.1 s (every post may wait it); not a duration: refused.
        """
        self.assertEqual(self.load().ledger_commit_delay, 0.002)
        self.assertEqual(self.load({"ledger_commit_delay": "0"}).ledger_commit_delay, 0.0)
        self.assertEqual(self.load({"ledger_commit_delay": "0.01"}).ledger_commit_delay, 0.01)
        for value, problem in (
            ("0.2", "must be at most 0.1 seconds"),
            ("1m", "must be at most 0.1 seconds"),
            ("soon", "expected a duration"),
        ):
            with self.subTest(value=value):
                self.assertGsmailError(
                    {"ledger_commit_delay": value}, "ledger_commit_delay", problem
                )

    def test_reply_deadline(self) -> None:
        """
        C{reply_deadline} above 590 seconds is refused: Postfix would stop
        waiting for the reply first.
        """
        for value in ("591", "10m"):
            with self.subTest(value=value):
                self.assertGsmailError(
                    {"reply_deadline": value}, "reply_deadline", "must be at most 590 seconds"
                )

    def test_integers(self) -> None:
        """
        The count options refuse fractions, words and values below their
        minimum; C{max_line_length} cites RFC 5321.
        """
        for option in ("post_concurrency", "max_recipients", "max_connections"):
            for value, problem in (("1.5", "expected a whole number"), ("0", "at least 1")):
                with self.subTest(option=option, value=value):
                    self.assertGsmailError({option: value}, option, problem)
        self.assertGsmailError(
            {"max_line_length": "999"},
            "max_line_length",
            "must be at least 1000 (RFC 5321 section 4.5.3.1.6), got '999'",
        )
        self.assertGsmailError({"max_line_length": "many"}, "max_line_length", "got 'many'")

    def test_inbound_workers(self) -> None:
        """
        C{inbound_workers} refuses negative numbers, fractions and more than
        64 processes.
        """
        for value, problem in (
            ("-1", "must be at least 0, got '-1'"),
            ("2.5", "expected a whole number, got '2.5'"),
            ("65", "must be at most 64 (one per core is enough), got 65"),
        ):
            with self.subTest(value=value):
                self.assertGsmailError({"inbound_workers": value}, "inbound_workers", problem)

    def test_time_source(self) -> None:
        """
        C{time_source} is C{server} or C{message} only.
        """
        self.assertGsmailError(
            {"time_source": "Client"}, "time_source", "expected server or message, got 'Client'"
        )

    def test_verify_tls(self) -> None:
        """
        C{verify_tls} must be a boolean.
        """
        self.assertGsmailError(
            {"verify_tls": "maybe"}, "verify_tls", "expected true/yes/on/1 or false/no/off/0"
        )

    def test_tls_pair(self) -> None:
        """
        C{tls_certificate} and C{tls_key} go together.
        """
        cert = self.write("cert\n", "cert.pem")
        self.assertGsmailError(
            {"tls_certificate": cert}, "tls_key", "missing while tls_certificate is set"
        )
        self.assertGsmailError({"tls_key": cert}, "tls_certificate", "missing while tls_key is set")

    def test_tls_unreadable(self) -> None:
        """
        A TLS file that does not exist is named with the reason.
        """
        missing = os.path.join(self.directory, "none.pem")
        self.assertGsmailError(
            {"tls_certificate": missing, "tls_key": missing},
            "tls_certificate",
            f"cannot read {missing!r}: No such file or directory",
        )

    def test_empty_paths(self) -> None:
        """
        The ledger and stand-in directories cannot be empty.
        """
        for option in ("ledger_path", "standin_dir"):
            with self.subTest(option=option):
                self.assertGsmailError({option: ""}, option, "must not be empty")

    def test_hostname(self) -> None:
        """
        C{hostname} must be one word.
        """
        self.assertGsmailError({"hostname": "mail example"}, "hostname", "expected a host name")

    def test_one_line(self) -> None:
        """
        Single-valued options refuse continuation lines.
        """
        self.assertGsmailError({"hostname": "mail\n  example"}, "hostname", "must be on one line")

    def test_relay_prefix(self) -> None:
        """
        The relay prefix, in the smtp section, must be a non-empty local-part
        prefix.
        """
        for value in ("", "p@", "a b"):
            with self.subTest(value=value):
                self.assertError(
                    ini(smtp=f"relay-address-prefix = {value}"),
                    "smtp-main",
                    "relay-address-prefix",
                    "expected a local-part prefix",
                )


class OutboundOptionTests(ConfigFileTestCase):
    """
    The outbound options: delivery TLS and delay warnings of the gsmail
    section, and gs.email's C{[smtp-NAME]} options, which describe
    GroupServer's connection to the submission listener.
    """

    def setUp(self) -> None:
        super().setUp()
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.cert = os.path.join(self.directory, "cert.pem")
        for name in ("cert.pem", "key.pem"):
            with open(os.path.join(self.directory, name), "w") as f:
                f.write("-----BEGIN NOTHING-----\n")

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_namespace"] == "gsmail.config"]

    def outbound(self, smtp: str = "hostname = localhost", **gsmail: str) -> GsmailConfig:
        return self.load(
            {"submission_endpoint": "tcp:2526:interface=127.0.0.1", **gsmail}, smtp=smtp
        )

    def test_defaults(self) -> None:
        """
        Delivery TLS is C{may} for every destination, delay warnings come
        after 4 hours, and the submission listener's TLS is C{may}.
        """
        config = self.outbound()
        self.assertEqual(
            (config.smtp_tls_security_level, config.mx_tls, config.delay_warning_time),
            ("may", "", 4 * 3600.0),
        )
        self.assertEqual((config.no_tls, config.force_tls), (False, False))

    def test_delivery_tls(self) -> None:
        """smtp_tls_security_level and mx_tls take none, may or encrypt, any case."""
        config = self.outbound(smtp_tls_security_level="ENCRYPT", mx_tls="none")
        self.assertEqual((config.smtp_tls_security_level, config.mx_tls), ("encrypt", "none"))
        self.assertEqual(self.outbound(mx_tls="").mx_tls, "")

    def test_delay_warning_time(self) -> None:
        """A duration; 0 turns delay warnings off."""
        self.assertEqual(self.outbound(delay_warning_time="2h").delay_warning_time, 7200.0)
        self.assertEqual(self.outbound(delay_warning_time="0").delay_warning_time, 0.0)

    def test_smtp_section(self) -> None:
        """
        gs.email's username, password, no_tls and force_tls are read from
        the smtp section; the password is not in the configuration's repr.
        """
        config = self.outbound(
            smtp="hostname = localhost\nusername = gs\npassword = s3cret-pw\nno_tls = True"
        )
        self.assertEqual((config.smtp_username, config.smtp_password), ("gs", "s3cret-pw"))
        self.assertTrue(config.no_tls)
        self.assertNotIn("s3cret-pw", repr(config))
        self.assertEqual(self.warnings(), [])

    def test_force_tls_with_certificate(self) -> None:
        """
        force_tls with a certificate loads; since it no longer encrypts
        delivery, a warning names smtp_tls_security_level, unless that is set.
        """
        config = self.outbound(
            smtp="hostname = localhost\nforce_tls = True",
            tls_certificate="cert.pem",
            tls_key="key.pem",
        )
        self.assertTrue(config.force_tls)
        self.assertEqual(config.smtp_tls_security_level, "may")
        [warning] = self.warnings()
        self.assertIn("[smtp-main] force_tls now applies to GroupServer's connection", warning)
        self.assertIn("smtp_tls_security_level = may", warning)
        self.events.clear()
        self.outbound(
            smtp="hostname = localhost\nforce_tls = True",
            tls_certificate="cert.pem",
            tls_key="key.pem",
            smtp_tls_security_level="encrypt",
        )
        self.assertEqual(self.warnings(), [])

    def test_force_tls_without_submission(self) -> None:
        """Without a submission listener force_tls concerns gsmail not at all."""
        self.assertTrue(self.load(smtp="force_tls = yes").force_tls)


class MTASTSOptionTests(ConfigFileTestCase):
    """C{mta_sts}, C{mta_sts_cache_dir}, C{mta_sts_timeout} and C{tls_rpt}."""

    def test_defaults(self) -> None:
        """On by default, cached beside the ledger, 30 s, no TLS-RPT counts."""
        config = self.load({"ledger_path": "/var/lib/gsmail/ledger"})
        self.assertEqual(
            (config.mta_sts, mta_sts_cache_path(config), config.mta_sts_timeout, config.tls_rpt),
            (True, "/var/lib/gsmail/mta-sts", 30.0, False),
        )

    def test_set(self) -> None:
        """A relative cache directory resolves against the file's directory."""
        config = self.load(
            {
                "mta_sts": "off",
                "mta_sts_cache_dir": "sts",
                "mta_sts_timeout": "1m",
                "tls_rpt": "yes",
            }
        )
        self.assertEqual(
            (config.mta_sts, mta_sts_cache_path(config), config.mta_sts_timeout, config.tls_rpt),
            (False, os.path.join(self.directory, "sts"), 60.0, True),
        )


class OutboundErrorTests(ConfigFileTestCase):
    """Outbound options gsmail cannot use: one line each, naming section and option."""

    assertError = ErrorTests.assertError
    assertGsmailError = ErrorTests.assertGsmailError

    def test_delivery_tls_level(self) -> None:
        """Levels other than none, may and encrypt are refused."""
        for option in ("smtp_tls_security_level", "mx_tls"):
            with self.subTest(option=option):
                self.assertGsmailError({option: "verify"}, option, "expected")

    def test_delay_warning_time(self) -> None:
        """A negative or malformed delay warning time is refused, saying 0 turns it off."""
        for value in ("-1", "soon"):
            with self.subTest(value=value):
                self.assertGsmailError(
                    {"delay_warning_time": value}, "delay_warning_time", "0 turns it off"
                )

    def test_force_tls_needs_certificate(self) -> None:
        """
        force_tls makes GroupServer (zope.sendmail) refuse a server without
        STARTTLS: with a submission listener and no certificate that is a
        start-up error naming [smtp-main] force_tls.
        """
        self.assertError(
            ini({"submission_endpoint": "tcp:2526"}, smtp="force_tls = True"),
            "smtp-main",
            "force_tls",
            "GroupServer then submits only over STARTTLS, but [gsmail-default] has no "
            "tls_certificate",
        )

    def test_force_tls_contradicts_no_tls(self) -> None:
        """Both set: one must go."""
        self.assertError(
            ini(smtp="no_tls = True\nforce_tls = True"), "smtp-main", "force_tls", "contradicts"
        )

    def test_submission_networks(self) -> None:
        """A network that does not parse is named."""
        self.assertGsmailError(
            {"submission_networks": "127.0.0.0/8 localnet"}, "submission_networks", "'localnet'"
        )

    def test_mta_sts_timeout(self) -> None:
        """A zero MTA-STS timeout is refused."""
        self.assertGsmailError({"mta_sts_timeout": "0"}, "mta_sts_timeout", "more than 0")

    def test_password_not_shown(self) -> None:
        """A bad boolean next to the password: the error does not quote the password."""
        error = self.assertError(
            ini(smtp="password = s3cret-pw\nno_tls = maybe"), "smtp-main", "no_tls", "maybe"
        )
        self.assertNotIn("s3cret-pw", str(error))


class DocumentationTests(ConfigFileTestCase):
    """
    The shipped example and reference describe every option gsmail reads.
    """

    def test_example_loads(self) -> None:
        """
        C{conf/gsconfig.ini.example} loads as it is, every option in its
        gsmail section is one gsmail knows, and it shows every option.
        """
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        path = os.path.join(ROOT, "conf", "gsconfig.ini.example")
        config = load_config(path)
        self.assertEqual(
            (config.url, config.domains),
            ("https://groups.example.com", ("groups.example.com", "lists.example.com")),
        )
        self.assertEqual([e for e in events if e["log_namespace"] == "gsmail.config"], [])
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
        for option in OPTIONS:
            with self.subTest(option=option):
                self.assertRegex(text, rf"(?m)^{re.escape(option)} =")

    def test_reference_table(self) -> None:
        """
        C{docs/configuration.md} has a table row for every option.
        """
        with open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8") as stream:
            text = stream.read()
        for option in OPTIONS:
            with self.subTest(option=option):
                self.assertIn(f"\n| `{option}` |", text)


class PostmasterOptionTests(ConfigFileTestCase):
    """C{postmaster_maildir} and C{postmaster_address}."""

    def test_defaults(self) -> None:
        """By default postmaster mail goes to /var/lib/gsmail/postmaster, not forwarded."""
        config = self.load()
        self.assertEqual(
            (config.postmaster_maildir, config.postmaster_address),
            ("/var/lib/gsmail/postmaster", ""),
        )

    def test_set(self) -> None:
        """A relative Maildir resolves against the file's directory; the address is kept."""
        config = self.load(
            {"postmaster_maildir": "pm", "postmaster_address": " admin@example.net "}
        )
        self.assertEqual(
            (config.postmaster_maildir, config.postmaster_address),
            (os.path.join(self.directory, "pm"), "admin@example.net"),
        )

    def assertPostmasterError(self, options: Mapping[str, str], option: str, problem: str) -> None:
        path = self.write(ini(options))
        error = self.assertRaises(ConfigError, load_config, path)
        message = str(error)
        self.assertTrue(message.startswith(f"{path}: [gsmail-default] {option}: "), message)
        self.assertIn(problem, message)
        self.assertNotIn("\n", message)

    def test_errors(self) -> None:
        """An address that does not parse, or one at the site's own domains (a loop), is refused."""
        self.assertPostmasterError(
            {"postmaster_address": "admin"}, "postmaster_address", "not an address"
        )
        domain = BASE_GSMAIL["domains"]
        self.assertPostmasterError(
            {"postmaster_address": f"admin@{str(domain).split(',')[0].strip().upper()}"},
            "postmaster_address",
            "outside the site's domains",
        )
        self.assertPostmasterError(
            {"postmaster_maildir": ""}, "postmaster_maildir", "must not be empty"
        )


class AbuseLimitOptionTests(ConfigFileTestCase):
    """The listen backlog and the abuse limits (gsmail.anvil)."""

    def test_defaults(self) -> None:
        """Postfix's defaults where Postfix has them; loopback exempt."""
        config = self.load()
        self.assertEqual(
            (
                config.listen_backlog,
                config.client_limit_exceptions,
                config.client_connection_count_limit,
                config.client_connection_rate_limit,
                config.anvil_rate_time_unit,
                config.soft_error_limit,
                config.hard_error_limit,
                config.error_sleep_time,
                config.junk_command_limit,
                config.min_data_rate,
            ),
            (1024, ("127.0.0.0/8", "::1"), 50, 300, 60.0, 10, 20, 1.0, 100, 500),
        )

    def test_set_and_off(self) -> None:
        """Limits may be set, 0 turns one off, the delays may be 0, exceptions may be empty."""
        config = self.load(
            {
                "client_connection_count_limit": "0",
                "hard_error_limit": "5",
                "error_sleep_time": "0",
                "auth_failure_delay": "2s",
                "anvil_rate_time_unit": "5m",
                "client_limit_exceptions": "",
                "listen_backlog": "4096",
            }
        )
        self.assertEqual(
            (
                config.client_connection_count_limit,
                config.hard_error_limit,
                config.error_sleep_time,
                config.auth_failure_delay,
                config.anvil_rate_time_unit,
                config.client_limit_exceptions,
                config.listen_backlog,
            ),
            (0, 5, 0.0, 2.0, 300.0, (), 4096),
        )

    def test_errors(self) -> None:
        """A negative count, a bad network, a zero backlog: one line naming the option."""
        for options, option in (
            ({"soft_error_limit": "-1"}, "soft_error_limit"),
            ({"client_limit_exceptions": "10.0.0.0/8 localhost"}, "client_limit_exceptions"),
            ({"listen_backlog": "0"}, "listen_backlog"),
            ({"anvil_rate_time_unit": "0"}, "anvil_rate_time_unit"),
        ):
            path = self.write(ini(options))
            message = str(self.assertRaises(ConfigError, load_config, path))
            self.assertTrue(message.startswith(f"{path}: [gsmail-default] {option}: "), message)
            self.assertNotIn("\n", message)
