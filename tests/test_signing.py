# -*- test-case-name: tests.test_signing -*-
"""
Tests for L{gsmail.signing}: what gsmail signs outbound mail with, checked
the way a receiver checks it (dkimpy's verifier against a DNS stub holding
the published records).
"""

from __future__ import annotations

import base64
import os

import dkim
from twisted.trial.unittest import SynchronousTestCase

from gsmail.signing import (
    DEFAULT_SIGN_HEADERS,
    DKIMKeyError,
    DKIMSigner,
    KeyRing,
    KeySpec,
    MessageNotSignable,
    dns_record,
    generate_key,
    load_key,
    parse_key_specs,
    public_key_matches,
)
from tests.signing import DNSStub, key_file, verify_all

SITE = "groups.example.com"
HOSTNAME = "mx.groups.example.com"

#: A group post as GroupServer submits it (LF line ends, as gsmail spools).
POST = (
    b"From: Alice <alice@groups.example.com>\n"
    b"To: dev@groups.example.com\n"
    b"Subject: Hello\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\n"
    b"Message-ID: <1@groups.example.com>\n"
    b"List-Id: Dev <dev.groups.example.com>\n"
    b"List-Unsubscribe: <mailto:dev+unsubscribe@groups.example.com>\n"
    b"X-Mailer: GroupServer\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=utf-8\n"
    b"\n"
    b"Hello, group.\n"
)


def signature_tags(message: bytes, index: int = 0) -> dict[bytes, bytes]:
    """The tags of the C{index}th DKIM-Signature field of C{message}."""
    fields, _ = dkim.rfc822_parse(message)
    signatures = [v for n, v in fields if n.lower() == b"dkim-signature"]
    value = signatures[index].replace(b"\r\n", b"").replace(b"\n", b"")
    return dkim.util.parse_tag_value(value)


class KeySpecTests(SynchronousTestCase):
    """C{dkim_keys} entries."""

    def test_parse(self) -> None:
        """Domains are lowercased and IDNA-encoded, relative files made absolute."""
        specs = parse_key_specs(
            ["Groups.Example.COM.:gs1:keys/a.key", "bücher.example:s2:/k"], "/etc"
        )
        self.assertEqual(
            specs,
            (
                KeySpec("groups.example.com", "gs1", "/etc/keys/a.key"),
                KeySpec("xn--bcher-kva.example", "s2", "/k"),
            ),
        )

    def test_bad(self) -> None:
        """Entries without three parts, bad names and repeats are refused, naming them."""
        for entry in (
            ["groups.example.com:gs1"],
            ["groups.example.com::/k"],
            ["bad_domain.com:s:/k"],
            ["groups.example.com:bad selector:/k"],
            ["a.example:s:/k", "A.example:S:/j"],
        ):
            with self.subTest(entry=entry):
                self.assertRaises(ValueError, parse_key_specs, entry)


class KeyFileTests(SynchronousTestCase):
    """Key files: what is accepted, and why one is not."""

    def test_rsa_and_ed25519(self) -> None:
        """An RSA PEM key signs rsa-sha256; dkimpy's base64 ed25519 seed ed25519-sha256."""
        directory = self.mktemp()
        rsa_key = load_key(key_file(directory, "r.key"))
        ed_key = load_key(key_file(directory, "e.key", ed25519=True))
        self.assertEqual((rsa_key.algorithm, rsa_key.bits), ("rsa-sha256", 2048))
        self.assertEqual((ed_key.algorithm, ed_key.key_type), ("ed25519-sha256", "ed25519"))
        self.assertEqual(len(base64.b64decode(ed_key.public)), 32)

    def test_pkcs8_ed25519(self) -> None:
        """An ed25519 key in PKCS#8 PEM (openssl genpkey) is read too."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        path = os.path.join(self.mktemp())
        with open(path, "wb") as f:
            f.write(
                ed25519.Ed25519PrivateKey.generate().private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        self.assertEqual(load_key(path).algorithm, "ed25519-sha256")

    def test_unusable(self) -> None:
        """A missing, truncated or garbage file is a DKIMKeyError naming the file."""
        directory = self.mktemp()
        good = key_file(directory, "good.key")
        with open(good, "rb") as f:
            pem = f.read()
        cases = {
            "missing.key": None,
            "cut.key": pem[: len(pem) // 2],
            "garbage.key": b"not a key at all\n",
            "short.key": base64.b64encode(b"x" * 16),
        }
        for name, content in cases.items():
            path = os.path.join(directory, name)
            if content is not None:
                with open(path, "wb") as f:
                    f.write(content)
            with self.subTest(name=name):
                error = self.assertRaises(DKIMKeyError, load_key, path)
                self.assertIn(path, str(error))
                self.assertNotIn("PRIVATE", str(error))

    def test_ring_rereads_a_changed_file(self) -> None:
        """A key replaced on disk is used without a restart; an unchanged one is not re-read."""
        directory = self.mktemp()
        path = key_file(directory, "k.key")
        spec = KeySpec(SITE, "s", path)
        reads: list[str] = []

        def loader(p: str) -> object:
            reads.append(p)
            return load_key(p)

        ring = KeyRing([spec], loader=loader)  # type: ignore[arg-type]
        first = ring.get(spec)
        ring.get(spec)
        self.assertEqual(len(reads), 1)
        with open(path, "wb") as f:
            f.write(b"corrupted\n")
        self.assertRaises(DKIMKeyError, ring.get, spec)
        key_file(directory, "k.key", ed25519=True)
        self.assertNotEqual(ring.get(spec).algorithm, first.algorithm)


class SignerTestCase(SynchronousTestCase):
    """A signer with an RSA key for the site, and the DNS that publishes it."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.rsa = KeySpec(SITE, "gs1", key_file(self.directory, "rsa.key"))
        self.ed = KeySpec(SITE, "gs2", key_file(self.directory, "ed.key", ed25519=True))
        self.dns = DNSStub()
        self.dns.publish(self.rsa)
        self.dns.publish(self.ed)

    def signer(self, *specs: KeySpec, **kwargs: object) -> DKIMSigner:
        return DKIMSigner(KeyRing(specs or (self.rsa,)), **kwargs)  # type: ignore[arg-type]


class SigningTests(SignerTestCase):
    """What a signed message looks like to a receiver."""

    def test_verifies(self) -> None:
        """A post signed by its From domain verifies (rsa-sha256, relaxed/relaxed, d=site)."""
        prefix = self.signer().sign(POST, f"dev@{SITE}")
        self.assertEqual(verify_all(prefix + POST, self.dns), [("rsa-sha256", True)])
        tags = signature_tags(prefix + POST)
        self.assertEqual(
            (tags[b"d"], tags[b"s"], tags[b"c"]), (SITE.encode(), b"gs1", b"relaxed/relaxed")
        )
        self.assertEqual(self.dns.asked, [f"gs1._domainkey.{SITE}."])

    def test_headers_signed(self) -> None:
        """Each listed field present is signed, List-* included, plus one more From; X- are not."""
        prefix = self.signer().sign(POST, f"dev@{SITE}")
        signed = [h.strip() for h in signature_tags(prefix + POST)[b"h"].split(b":")]
        self.assertEqual(
            signed,
            [
                b"from",
                b"to",
                b"subject",
                b"date",
                b"message-id",
                b"list-id",
                b"list-unsubscribe",
                b"mime-version",
                b"content-type",
                b"from",
            ],
        )

    def test_added_from_breaks_it(self) -> None:
        """A second From added on the way makes the signature fail (the extra From)."""
        prefix = self.signer().sign(POST, f"dev@{SITE}")
        forged = prefix + b"From: mallory@evil.example\n" + POST
        self.assertEqual(verify_all(forged, self.dns), [("rsa-sha256", False)])

    def test_changed_subject_breaks_it(self) -> None:
        """A signed field changed on the way makes it fail."""
        prefix = self.signer().sign(POST, f"dev@{SITE}")
        changed = prefix + POST.replace(b"Subject: Hello", b"Subject: Buy now")
        self.assertEqual(verify_all(changed, self.dns), [("rsa-sha256", False)])

    def test_ed25519_second_signature(self) -> None:
        """With an RSA and an ed25519 key, both sign; both verify."""
        prefix = self.signer(self.rsa, self.ed).sign(POST, f"dev@{SITE}")
        self.assertEqual(
            verify_all(prefix + POST, self.dns),
            [("rsa-sha256", True), ("ed25519-sha256", True)],
        )

    def test_crlf_message(self) -> None:
        """A CRLF message gets CRLF signature fields, and verifies."""
        crlf = POST.replace(b"\n", b"\r\n")
        prefix = self.signer().sign(crlf, f"dev@{SITE}")
        self.assertNotIn(b"\n", prefix.replace(b"\r\n", b""))
        self.assertEqual(verify_all(prefix + crlf, self.dns), [("rsa-sha256", True)])

    def test_from_domain_first(self) -> None:
        """The From domain signs, not the envelope sender's, when both have keys."""
        other = KeySpec("lists.example.com", "x", key_file(self.directory, "o.key"))
        prefix = self.signer(self.rsa, other).sign(POST, "bounces@lists.example.com")
        self.assertEqual(signature_tags(prefix + POST)[b"d"], SITE.encode())

    def test_envelope_sender_fallback(self) -> None:
        """A post From a member's own domain is signed by the envelope sender's domain."""
        post = POST.replace(b"alice@groups.example.com", b"alice@gmail.example")
        prefix = self.signer().sign(post, f"dev+alice=gmail.example@{SITE}")
        self.assertEqual(signature_tags(prefix + post)[b"d"], SITE.encode())
        self.assertEqual(verify_all(prefix + post, self.dns), [("rsa-sha256", True)])

    def test_parent_domain_signs(self) -> None:
        """
        gsmail's DSNs, From MAILER-DAEMON at its host name under the site's
        domain, are signed by the site's domain (DMARC-aligned).
        """
        dsn = POST.replace(b"alice@groups.example.com", f"MAILER-DAEMON@{HOSTNAME}".encode())
        prefix = self.signer().sign(dsn, "")
        self.assertEqual(signature_tags(prefix + dsn)[b"d"], SITE.encode())
        self.assertEqual(verify_all(prefix + dsn, self.dns), [("rsa-sha256", True)])

    def test_nearest_parent_first(self) -> None:
        """A key of the From domain itself is used before its parent's."""
        own = KeySpec(HOSTNAME, "x", key_file(self.directory, "o.key"))
        dsn = POST.replace(b"alice@groups.example.com", f"MAILER-DAEMON@{HOSTNAME}".encode())
        prefix = self.signer(self.rsa, own).sign(dsn, "")
        self.assertEqual(signature_tags(prefix + dsn)[b"d"], HOSTNAME.encode())

    def test_no_configured_domain(self) -> None:
        """Mail of no configured domain is not signed (nothing is added)."""
        post = POST.replace(b"alice@groups.example.com", b"alice@gmail.example")
        self.assertEqual(self.signer().sign(post, "someone@elsewhere.example"), b"")
        self.assertEqual(self.signer().sign(post, ""), b"")

    def test_bad_key_raises(self) -> None:
        """A corrupted key file is a DKIMKeyError (the queue keeps the mail)."""
        with open(self.rsa.path, "wb") as f:
            f.write(b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n")
        error = self.assertRaises(DKIMKeyError, self.signer().sign, POST, "")
        self.assertIn(self.rsa.path, str(error))

    def test_unparsable_message(self) -> None:
        """A header dkimpy cannot parse: MessageNotSignable; the queue signer sends it unsigned."""
        broken = b"From: alice@groups.example.com\nthis is not a header\n\nbody\n"
        self.assertRaises(MessageNotSignable, self.signer().sign, broken, "")
        prefix, warning = self.signer().queue_signer(broken, "")
        self.assertEqual(prefix, b"")
        self.assertIn("cannot be DKIM-signed", warning)

    def test_default_headers(self) -> None:
        """The default list is the issue's: From..Content-Transfer-Encoding, List-* included."""
        self.assertIn("List-*", DEFAULT_SIGN_HEADERS)
        self.assertEqual(DEFAULT_SIGN_HEADERS[0], "From")


class ARCTests(SignerTestCase):
    """ARC sealing of re-sent posts (RFC 8617)."""

    def test_sealed_when_gsmail_results_present(self) -> None:
        """A re-sent post with gsmail's Authentication-Results gets one valid ARC set."""
        resent = (
            f"Authentication-Results: {HOSTNAME}; spf=pass smtp.mailfrom=example.org;\n"
            f"\tdkim=pass header.d=example.org; dmarc=pass header.from=example.org\n"
        ).encode() + POST
        prefix = self.signer(arc=True, authserv_id=HOSTNAME).sign(resent, f"dev@{SITE}")
        names = [line.split(b":", 1)[0] for line in prefix.split(b"\n") if line[:1].isalpha()]
        self.assertEqual(
            names,
            [
                b"ARC-Seal",
                b"ARC-Message-Signature",
                b"ARC-Authentication-Results",
                b"DKIM-Signature",
            ],
        )
        wire = (prefix + resent).replace(b"\n", b"\r\n")
        cv, _, comment = dkim.arc_verify(wire, dnsfunc=self.dns)
        self.assertEqual(cv, b"pass", comment)
        self.assertIn(b"dkim=pass header.d=example.org", prefix)
        self.assertEqual(verify_all(prefix + resent, self.dns), [("rsa-sha256", True)])

    def test_not_sealed_without(self) -> None:
        """GroupServer's own mail (no gsmail results) and others' results get no ARC set."""
        signer = self.signer(arc=True, authserv_id=HOSTNAME)
        self.assertNotIn(b"ARC-Seal", signer.sign(POST, f"dev@{SITE}"))
        foreign = b"Authentication-Results: mx.elsewhere.example; spf=pass\n" + POST
        self.assertNotIn(b"ARC-Seal", signer.sign(foreign, f"dev@{SITE}"))


class RecordTests(SignerTestCase):
    """The DNS records gsmail-dkim prints and checks."""

    def test_record(self) -> None:
        """The printed record names SELECTOR._domainkey.DOMAIN and holds k= and p=."""
        ring = KeyRing([self.rsa, self.ed])
        record = dns_record(SITE, "gs1", ring.get(self.rsa))
        self.assertTrue(record.startswith(f'gs1._domainkey.{SITE}. IN TXT ( "v=DKIM1; k=rsa; p='))
        self.assertTrue(all(len(s) <= 255 for s in record.split('"')))
        short = dns_record(SITE, "gs2", ring.get(self.ed))
        self.assertEqual(short.count('"'), 2)

    def test_matches(self) -> None:
        """The published record matches its key, not another; a revoked one says so."""
        ring = KeyRing([self.rsa, self.ed])
        published = self.dns.records[f"gs1._domainkey.{SITE}."]
        self.assertIsNone(public_key_matches(published, ring.get(self.rsa)))
        self.assertIn("k=rsa", public_key_matches(published, ring.get(self.ed)) or "")
        other = load_key(key_file(self.directory, "other.key"))
        # Same test key material is cached per run: make a genuinely other key.
        fresh = self.mktemp()
        with open(fresh, "wb") as f:
            f.write(generate_key(bits=1024))
        self.assertEqual(
            public_key_matches(published, load_key(fresh)),
            "the published public key is not this key's",
        )
        self.assertIsNone(public_key_matches(published, other))
        self.assertIn("revoked", public_key_matches(b"v=DKIM1; k=rsa; p=", other) or "")

    def test_pkcs1_published(self) -> None:
        """An RSA key published as PKCS#1 RSAPublicKey (some generators) matches too."""
        from cryptography.hazmat.primitives import serialization

        key = load_key(self.rsa.path)
        public = serialization.load_der_public_key(base64.b64decode(key.public))
        pkcs1 = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        record = b"v=DKIM1; p=" + base64.b64encode(pkcs1)
        self.assertIsNone(public_key_matches(record, key))
