"""
Tests for L{gsmail.check} (C{gsmail-check}, C{twistd gsmail --check}) on
good and broken configurations: GroupServer is the stand-in on 127.0.0.1,
DNS a C{twisted.names} server on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import tempfile
from socket import getfqdn

import attrs
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.names import server
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gsmail.check import effective_settings, run_checks
from gsmail.privileges import RunUser
from gsmail.standin import StandIn
from gsmail.status import EX_CONFIG, EX_OK
from tests.certificates import make_chain
from tests.util import DOMAIN, ROOT, TOKEN, listen_dns, make_config, twistd_argv
from tests.zones import MX, A, MemoryZone

NOW = datetime.datetime.now(datetime.UTC)


class SettingsTests(SynchronousTestCase):
    """The postconf -n part."""

    def test_non_default_only(self) -> None:
        """Options at their default are left out; the rest in the file's units."""
        config = make_config(
            self.mktemp(), max_size=10 * 1024 * 1024, unix_socket_mode=0o600, idle_timeout=60.0
        )
        lines = effective_settings(config)
        self.assertIn("max_size = 10", lines)
        self.assertIn("unix_socket_mode = 0600", lines)
        self.assertIn("idle_timeout = 60s", lines)
        self.assertIn(f"domains = {DOMAIN}", lines)
        self.assertFalse([line for line in lines if line.startswith("max_recipients")])

    def test_defaults_load_config_fills_in(self) -> None:
        """
        C{spool_dir} and C{hostname} left out of the file (the temporary
        directory, this host's name) are not listed; set, they are.
        """
        config = make_config(self.mktemp(), spool_dir=tempfile.gettempdir(), hostname=getfqdn())
        lines = effective_settings(config)
        self.assertFalse([line for line in lines if line.startswith(("spool_dir", "hostname"))])
        config = make_config(self.mktemp(), spool_dir="/var/spool/gsmail-in", hostname="mx.x.org")
        lines = effective_settings(config)
        self.assertIn("spool_dir = /var/spool/gsmail-in", lines)
        self.assertIn("hostname = mx.x.org", lines)

    def test_never_secrets(self) -> None:
        """The token and the passwords are never shown, even pasted into another option."""
        config = make_config(
            self.mktemp(),
            relayhost_username="u",
            relayhost_password="relay-s3cret",
            smtp_password="smtp-s3cret",
            hostname=TOKEN,
        )
        text = "\n".join(effective_settings(config))
        for secret in (TOKEN, "relay-s3cret", "smtp-s3cret"):
            self.assertNotIn(secret, text)
        self.assertIn("relayhost_username = u", text)
        self.assertIn("hostname = <token>", text)


class RunChecksTests(TestCase):
    """Every check, against a stand-in GroupServer and a DNS server on 127.0.0.1."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="gsmail-test-check-")
        os.chmod(self.directory, 0o755)
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.standin = StandIn(
            os.path.join(self.directory, "standin"),
            TOKEN,
            {f"example@{DOMAIN}": "example"},
            clock=reactor,
        )
        port = reactor.listenTCP(0, self.standin.site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        zone = MemoryZone(
            b"example.com",
            [
                (DOMAIN.encode(), MX(10, b"mx.groups.example.com")),
                (b"mx.groups.example.com", A("127.0.0.1")),
                (b"lists.example.com", MX(10, b"mx.elsewhere.example.com")),
                (b"mx.elsewhere.example.com", A("192.0.2.1")),
            ],
        )
        factory = server.DNSServerFactory(authorities=[zone], verbose=0)
        factory.noisy = False
        udp, tcp = listen_dns(reactor, factory)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        self.dns = f"127.0.0.1:{udp.getHost().port}"

    def config(self, **overrides: object) -> object:
        values: dict[str, object] = {"url": self.url, "dns_servers": (self.dns,)}
        values.update(overrides)
        return make_config(os.path.join(self.directory, "state"), **values)

    async def test_good(self) -> None:
        """A good configuration: no problem, no warning; MX here, the token taken."""
        chain, key, _ = make_chain(os.path.join(self.directory, "tls"))
        config = self.config(tls_certificate=chain, tls_key=key)
        report = await run_checks(config, reactor, None, now=NOW - datetime.timedelta(days=30))  # type: ignore[arg-type]
        self.assertEqual((report.problems, report.warnings), ([], []))
        ok = "\n".join(report.ok)
        self.assertIn(f"url: {self.url} answers, and takes the token", ok)
        self.assertIn(f"domains: MX of {DOMAIN}: mx.groups.example.com (127.0.0.1): here", ok)
        self.assertIn("tls_certificate: CN=mx.groups.example.com", ok)
        self.assertEqual(self.standin.requests["exists"], 1)

    async def test_wrong_token(self) -> None:
        """A token GroupServer refuses is a problem, and is not shown."""
        config = attrs.evolve(self.config(), token="wrong-token-123")  # type: ignore[misc]
        report = await run_checks(config, reactor, None)
        [problem] = report.problems
        self.assertIn(
            f"url {self.url}: 4.3.5 GroupServer refused the request (check the token", problem
        )
        self.assertNotIn("wrong-token-123", problem)

    async def test_groupserver_down(self) -> None:
        """Nothing listening at the URL: a problem saying it cannot be reached."""
        config = self.config(url="http://127.0.0.1:1")
        report = await run_checks(config, reactor, None)
        [problem] = report.problems
        self.assertIn("url http://127.0.0.1:1: 4.4.4 Error connecting to GroupServer", problem)

    async def test_mx_elsewhere_and_missing(self) -> None:
        """An MX elsewhere and a domain without records are warnings, not problems."""
        config = self.config(domains=(DOMAIN, "lists.example.com", "nosuch.example.com"))
        report = await run_checks(config, reactor, None)
        self.assertEqual(report.problems, [])
        [elsewhere, missing] = report.warnings
        self.assertIn(
            "MX of lists.example.com: mx.elsewhere.example.com (192.0.2.1): not this host",
            elsewhere,
        )
        self.assertIn("MX of nosuch.example.com: 5.1.2", missing)

    async def test_broken(self) -> None:
        """
        Each broken part is one problem line: an endpoint string, a socket
        directory, an expired certificate, a key of another certificate.
        """
        chain, key, _ = make_chain(os.path.join(self.directory, "tls"))
        config = self.config(
            smtp_endpoint="tcp:99999",
            lmtp_endpoint="unix:/nonexistent/gsmail/lmtp.sock",
            tls_certificate=chain,
            tls_key=key,
        )
        report = await run_checks(
            config, reactor, None, network=False, now=NOW + datetime.timedelta(days=3)
        )  # type: ignore[arg-type]
        [port, directory, expired] = report.problems
        self.assertIn("smtp_endpoint 'tcp:99999': cannot listen: the port must be 0 to 65535", port)
        self.assertIn("the socket's directory /nonexistent/gsmail does not exist", directory)
        self.assertIn("expired on", expired)
        _, other_key, _ = make_chain(os.path.join(self.directory, "tls2"))
        report = await run_checks(
            self.config(tls_certificate=chain, tls_key=other_key),
            reactor,
            None,
            network=False,  # type: ignore[arg-type]
        )
        [mismatch] = report.problems
        self.assertIn("tls_certificate: ", mismatch)
        self.assertIn("cannot load", mismatch)

    async def test_expiring_soon(self) -> None:
        """A certificate with less than two weeks left is a warning."""
        chain, key, _ = make_chain(os.path.join(self.directory, "tls"))
        report = await run_checks(
            self.config(tls_certificate=chain, tls_key=key), reactor, None, network=False
        )  # type: ignore[arg-type]
        [warning] = report.warnings
        self.assertIn("(0 days): renew it", warning)

    async def test_state_as_run_user(self) -> None:
        """State the run user cannot write is named with its chown."""
        if os.geteuid() != 0:
            raise self.skipTest("needs root")  # type: ignore[attr-defined]
        config = self.config()
        ledger = os.path.dirname(config.ledger_path)  # type: ignore[attr-defined]
        os.makedirs(ledger)
        user = RunUser(65534, 65534, "nobody", frozenset({65534}))
        report = await run_checks(config, reactor, user, network=False)  # type: ignore[arg-type]
        [problem] = report.problems
        self.assertIn(
            f"ledger_path: nobody cannot write {ledger} (root:root 0755): chown -R nobody:nogroup {ledger}",
            problem,
        )


class CommandTests(TestCase):
    """C{gsmail-check} and C{twistd gsmail --check} as commands."""

    timeout = 60

    def write(self, body: str) -> str:
        directory = tempfile.mkdtemp(prefix="gsmail-test-check-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "gsconfig.ini")
        with open(path, "w") as f:
            f.write(
                f"[webservice-default]\ntoken = {TOKEN}\n[gsmail-default]\nurl = embedded\n"
                f"domains = {DOMAIN}\nledger_path = ledger/posted.log\nspool_dir = spool\n"
                "standin_dir = standin\npostmaster_maildir = postmaster\n" + body
            )
        return path

    async def command(self, *argv: str) -> tuple[str, str, int]:
        env = dict(os.environ, PYTHONPATH=ROOT)
        out, err, code = await getProcessOutputAndValue(sys.executable, argv, env=env, path=ROOT)
        return out.decode(), err.decode(), code

    async def test_good(self) -> None:
        """Exit 0; the settings and the ok lines on standard output, nothing on standard error."""
        path = self.write("smtp_endpoint = tcp:2525:interface=127.0.0.1\n")
        out, err, code = await self.command("-m", "gsmail.check", "--offline", "--config", path)
        self.assertEqual((code, err), (EX_OK, ""))
        self.assertIn("smtp_endpoint = tcp:2525:interface=127.0.0.1\n", out)
        self.assertIn("ok: state directories:", out)
        self.assertNotIn(TOKEN, out)

    async def test_broken(self) -> None:
        """Exit 78 and one line per problem on standard error."""
        path = self.write(
            "smtp_endpoint = tcp:notaport\nlmtp_endpoint = unix:/nonexistent/x/l.sock\n"
        )
        out, err, code = await self.command("-m", "gsmail.check", "--offline", "--config", path)
        self.assertEqual(code, EX_CONFIG)
        lines = err.splitlines()
        self.assertEqual(len(lines), 2, err)
        self.assertIn("smtp_endpoint 'tcp:notaport': expected a number", lines[0])
        self.assertIn("/nonexistent/x does not exist", lines[1])

    async def test_bad_file(self) -> None:
        """A configuration that does not load: exit 78, one line."""
        path = self.write("smtp_endpoint = tcp:0\nmax_size = big\n")
        out, err, code = await self.command("-m", "gsmail.check", "--config", path)
        self.assertEqual(code, EX_CONFIG)
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("max_size", err)

    async def test_twistd_check(self) -> None:
        """twistd gsmail --check runs the same checks and exits with their status."""
        path = self.write("smtp_endpoint = tcp:notaport\n")
        out, err, code = await self.command(
            *twistd_argv(sys.executable, "gsmail", "--config", path, "--check")[1:]
        )
        self.assertEqual(code, EX_CONFIG, out + err)
        self.assertIn("smtp_endpoint 'tcp:notaport'", err)


class DKIMCheckTests(TestCase):
    """gsmail-check on C{dkim_keys}: the key files, and their records in DNS."""

    def setUp(self) -> None:
        from gsmail.signing import KeyRing, KeySpec
        from tests.signing import key_file
        from tests.zones import txt

        self.directory = tempfile.mkdtemp(prefix="gsmail-test-check-")
        os.chmod(self.directory, 0o755)
        self.addCleanup(shutil.rmtree, self.directory, True)
        keys = os.path.join(self.directory, "dkim")
        good = KeySpec(DOMAIN, "gs1", key_file(keys, "gs1.key"))
        ed = KeySpec(DOMAIN, "gs2", key_file(keys, "gs2.key", ed25519=True))
        missing = KeySpec(DOMAIN, "gs3", key_file(keys, "gs3.key"))
        broken = os.path.join(keys, "gs4.key")
        with open(broken, "wb") as f:
            f.write(b"not a key\n")
        self.good_path = good.path
        rsa_public = KeyRing([good]).get(good).public
        zone = MemoryZone(
            b"example.com",
            [
                (b"gs1._domainkey." + DOMAIN.encode(), txt(f"v=DKIM1; k=rsa; p={rsa_public}")),
                # The RSA key where the ed25519 one should be.
                (b"gs2._domainkey." + DOMAIN.encode(), txt(f"v=DKIM1; k=rsa; p={rsa_public}")),
            ],
        )
        factory = server.DNSServerFactory(authorities=[zone], verbose=0)
        factory.noisy = False
        udp, tcp = listen_dns(reactor, factory)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        self.config = make_config(
            os.path.join(self.directory, "state"),
            dns_servers=(f"127.0.0.1:{udp.getHost().port}",),
            domains=("nomx.example.com",),
            dkim_keys=(
                f"{DOMAIN}:gs1:{good.path}",
                f"{DOMAIN}:gs2:{ed.path}",
                f"{DOMAIN}:gs3:{missing.path}",
                f"{DOMAIN}:gs4:{broken}",
            ),
        )

    @staticmethod
    def dkim(lines: list[str]) -> list[str]:
        return [line for line in lines if line.startswith("dkim_keys")]

    async def test_published(self) -> None:
        """
        A record that is the key's is ok; a record of another key and no
        record are problems that say what to publish; a key file that is
        not a key is a warning (the daemon starts; its mail waits).
        """
        report = await run_checks(self.config, reactor, None)
        [ok] = self.dkim(report.ok)
        self.assertEqual(
            ok,
            f"dkim_keys: {DOMAIN}:gs1: rsa-sha256, 2048 bits, published at gs1._domainkey.{DOMAIN}",
        )
        mismatch, missing = self.dkim(report.problems)
        self.assertIn(f"MISMATCH: {DOMAIN}:gs2: the record has k=rsa, the key is ed25519", mismatch)
        self.assertIn(
            f'publish instead: gs2._domainkey.{DOMAIN}. IN TXT "v=DKIM1; k=ed25519; p=', mismatch
        )
        self.assertIn(
            f"MISSING: {DOMAIN}:gs3: no DKIM record at gs3._domainkey.{DOMAIN}; publish: ", missing
        )
        [unusable] = self.dkim(report.warnings)
        self.assertIn(
            f"{DOMAIN}:gs4: the DKIM key {self.directory}/dkim/gs4.key is neither PEM", unusable
        )
        self.assertIn("mail it signs waits in the queue until it can be used", unusable)

    async def test_offline(self) -> None:
        """Offline (systemd's ExecStartPre) only the key files are read: DNS is not a problem."""
        report = await run_checks(self.config, reactor, None, network=False)
        self.assertEqual(self.dkim(report.problems), [])
        self.assertEqual(len(self.dkim(report.ok)), 3)
        self.assertIn("(DNS not asked)", self.dkim(report.ok)[0])
        self.assertEqual(len(self.dkim(report.warnings)), 1)

    async def test_unreadable_by_run_user(self) -> None:
        """A key file the run user cannot read is a warning naming it."""
        if os.geteuid() != 0:
            raise self.skipTest("needs root")  # type: ignore[attr-defined]
        user = RunUser(65534, 65534, "nobody", frozenset({65534}))
        report = await run_checks(self.config, reactor, user, network=False)
        self.assertIn(
            f"dkim_keys: {self.good_path} cannot be read by nobody: mail it signs would wait",
            self.dkim(report.warnings),
        )
