# -*- test-case-name: tests.test_signing -*-
"""
DKIM signing of outbound mail (RFC 6376; ed25519-sha256, RFC 8463) and ARC
sealing (RFC 8617), with dkimpy; the keys, and the DNS records that publish
them.

A site lists its keys as C{dkim_keys = DOMAIN:SELECTOR:FILE, ...}
(L{parse_key_specs}). A message is signed by the domain of its C{From}
address when a key is configured for it, else by the domain of its envelope
sender when one is, else not at all (L{DKIMSigner.signing_domain}). Each key
of that domain gives one signature: an RSA key C{rsa-sha256}, an ed25519
key C{ed25519-sha256}, so a domain with both gets two (RFC 8463 §4 advises
that while verifiers learn ed25519). Canonicalisation is relaxed/relaxed;
the header fields signed are those of C{dkim_sign_headers} present in the
message, each as often as it occurs, plus one more C{From}, so that no
C{From} can be added without breaking the signature (RFC 6376 §8.15).

Key files are read when they are used and again whenever they change on
disk (a key rotated or repaired needs no restart); L{KeyRing} keeps them.
A key file is either a PEM private key (RSA: PKCS#1 or PKCS#8; ed25519:
PKCS#8, as C{openssl genpkey -algorithm ed25519} writes it) or the base64
of a 32-byte ed25519 seed, as dkimpy's C{dknewkey} writes it.

Everything here is blocking (files, RSA): the outbound queue calls
L{DKIMSigner.sign} in its disk thread.
"""

from __future__ import annotations

import base64
import email.utils
import os
import re
import threading
from collections.abc import Callable, Sequence
from typing import Final

import attrs
import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from gsmail.config import DEFAULT_SIGN_HEADERS

__all__ = [
    "DEFAULT_SIGN_HEADERS",
    "DKIMKeyError",
    "DKIMSigner",
    "KeyRing",
    "KeySpec",
    "LoadedKey",
    "MessageNotSignable",
    "dns_record",
    "generate_key",
    "load_key",
    "parse_key_specs",
    "public_key_matches",
    "record_name",
]

RSA_SHA256: Final = "rsa-sha256"
ED25519_SHA256: Final = "ed25519-sha256"

#: The smallest RSA key used: receivers ignore signatures by smaller ones
#: (RFC 8301 §3.2: verifiers must not consider keys under 1024 bits valid).
MIN_RSA_BITS: Final = 1024
#: A key file larger than this is not a key.
_MAX_KEY_FILE: Final = 64 * 1024
_SELECTOR: Final = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_FIELD_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]+\*?")
#: TXT character-strings hold at most 255 octets (RFC 1035 §3.3.14).
_TXT_CHUNK: Final = 250


class DKIMKeyError(Exception):
    """
    A key file cannot be used: it cannot be read, is not a private key, or is
    an RSA key under L{MIN_RSA_BITS} bits. C{str()} names the file and the
    reason, never the key. Mail that needs the key waits in the queue.
    """


class MessageNotSignable(Exception):
    """
    The message cannot be signed whatever the key (dkimpy cannot parse its
    header). It goes out unsigned; waiting would not help.
    """


@attrs.frozen
class KeySpec:
    """
    One configured key (an entry of C{dkim_keys}).

    @ivar domain: the signing domain (C{d=}), lowercase, ASCII (A-labels).
    @ivar selector: the selector (C{s=}).
    @ivar path: the private key file, absolute.
    """

    domain: str
    selector: str
    path: str


@attrs.frozen
class LoadedKey:
    """
    A key file as read.

    @ivar algorithm: L{RSA_SHA256} or L{ED25519_SHA256}.
    @ivar private: the key as dkimpy's C{sign} takes it (RSA: PEM; ed25519:
        the base64 of its seed).
    @ivar public: the base64 of the public key as DNS publishes it (C{p=}:
        RSA SubjectPublicKeyInfo DER; ed25519 the 32 raw bytes).
    @ivar bits: the RSA modulus length, 256 for ed25519.
    """

    algorithm: str
    private: bytes = attrs.field(repr=False)
    public: str
    bits: int

    @property
    def key_type(self) -> str:
        """The C{k=} tag of its DNS record: C{rsa} or C{ed25519}."""
        return "rsa" if self.algorithm == RSA_SHA256 else "ed25519"


def parse_key_specs(entries: Sequence[str], base: str = "") -> tuple[KeySpec, ...]:
    """
    Parse C{dkim_keys} entries, C{DOMAIN:SELECTOR:FILE} each.

    @param entries: the entries (the option's words).
    @param base: the directory relative file names are taken from.
    @raise ValueError: an entry is not of that form, its domain or selector
        is not a DNS name, or one domain and selector is given twice.
    """
    specs = []
    seen = set()
    for entry in entries:
        domain, sep1, rest = entry.partition(":")
        selector, sep2, path = rest.partition(":")
        domain = domain.strip().lower().rstrip(".")
        selector = selector.strip()
        path = path.strip()
        if not (sep1 and sep2 and domain and selector and path):
            raise ValueError(f"expected DOMAIN:SELECTOR:KEYFILE, got {entry!r}")
        try:
            ascii_domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"not a domain name: {domain!r}") from None
        if not all(_LABEL.fullmatch(label) for label in ascii_domain.split(".")):
            raise ValueError(f"not a domain name: {domain!r}")
        if not _SELECTOR.fullmatch(selector):
            raise ValueError(f"not a selector (letters, digits, '-' and '.'): {selector!r}")
        if (ascii_domain, selector.lower()) in seen:
            raise ValueError(f"{ascii_domain}:{selector} is given twice")
        seen.add((ascii_domain, selector.lower()))
        specs.append(KeySpec(ascii_domain, selector, os.path.join(base, path)))
    return tuple(specs)


def load_key(path: str) -> LoadedKey:
    """
    Read a DKIM private key file (blocking).

    @raise DKIMKeyError: it cannot be read or used.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as e:
        raise DKIMKeyError(f"cannot read the DKIM key {path}: {e.strerror}") from None
    if len(data) > _MAX_KEY_FILE:
        raise DKIMKeyError(f"the DKIM key {path} is too large to be a key")
    try:
        return _parse_key(data)
    except DKIMKeyError as e:
        raise DKIMKeyError(f"the DKIM key {path} {e}") from None


def _parse_key(data: bytes) -> LoadedKey:
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise DKIMKeyError("is not a PEM private key without a passphrase") from None
        except Exception:
            raise DKIMKeyError("is not a usable private key") from None
    else:
        try:
            seed = base64.b64decode(b"".join(data.split()), validate=True)
        except ValueError:
            raise DKIMKeyError("is neither PEM nor a base64 ed25519 seed") from None
        if len(seed) != 32:
            raise DKIMKeyError("is neither PEM nor a base64 ed25519 seed (32 bytes)")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    return _loaded(key)


def _loaded(key: object) -> LoadedKey:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DKIMKeyError(f"has {key.key_size} bits, fewer than {MIN_RSA_BITS}")
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return LoadedKey(RSA_SHA256, private, base64.b64encode(public).decode(), key.key_size)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return LoadedKey(
            ED25519_SHA256, base64.b64encode(seed), base64.b64encode(public).decode(), 256
        )
    raise DKIMKeyError("is neither an RSA nor an ed25519 key")


class KeyRing:
    """
    The configured keys, read on first use and again when their file
    changes (its inode, size or modification time). Safe to use from
    several threads.
    """

    def __init__(
        self, specs: Sequence[KeySpec], loader: Callable[[str], LoadedKey] = load_key
    ) -> None:
        self.specs = tuple(specs)
        self._load = loader
        self._cache: dict[str, tuple[tuple[int, int, int], LoadedKey]] = {}
        self._lock = threading.Lock()

    def domains(self) -> frozenset[str]:
        """The signing domains that have at least one key."""
        return frozenset(s.domain for s in self.specs)

    def for_domain(self, domain: str) -> list[KeySpec]:
        """The keys of C{domain}, in configured order."""
        return [s for s in self.specs if s.domain == domain]

    def get(self, spec: KeySpec) -> LoadedKey:
        """
        The key of C{spec}, read now if it was not read or changed since.

        @raise DKIMKeyError: it cannot be read or used.
        """
        try:
            st = os.stat(spec.path)
        except OSError as e:
            raise DKIMKeyError(f"cannot read the DKIM key {spec.path}: {e.strerror}") from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(spec.path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        key = self._load(spec.path)
        with self._lock:
            self._cache[spec.path] = (stamp, key)
        return key

    def check(self) -> list[str]:
        """
        Try every key now (blocking; at start-up).

        @return: one line per key that cannot be used, naming it and why.
        """
        problems = []
        for spec in self.specs:
            try:
                self.get(spec)
            except DKIMKeyError as e:
                problems.append(f"{spec.domain}:{spec.selector}: {e}")
        return problems


class DKIMSigner:
    """
    Signs outbound messages: L{sign} returns the header fields to put before
    the message (DKIM signatures and, with C{arc}, an ARC set).

    @param keys: the configured keys.
    @param headers: the header fields to sign when present (L{DEFAULT_SIGN_HEADERS}).
    @param arc: seal messages that carry this site's C{Authentication-Results}
        (written by gsmail's inbound side when it received them) with an ARC
        set (RFC 8617 §5.1), by the signing domain's RSA key.
    @param authserv_id: this site's authserv-id (the inbound C{hostname}):
        only C{Authentication-Results} fields naming it are sealed.
    """

    def __init__(
        self,
        keys: KeyRing,
        headers: Sequence[str] = DEFAULT_SIGN_HEADERS,
        *,
        arc: bool = False,
        authserv_id: str = "",
    ) -> None:
        self.keys = keys
        self._exact = frozenset(h.lower() for h in headers if not h.endswith("*"))
        self._prefixes = tuple(h[:-1].lower() for h in headers if h.endswith("*"))
        self.arc = arc
        self.authserv_id = authserv_id
        self._domains = keys.domains()

    def __repr__(self) -> str:
        return f"<DKIMSigner domains={sorted(self._domains)} arc={self.arc}>"

    def signing_domain(self, from_field: bytes | None, sender: str) -> str | None:
        """
        The domain that signs: the C{From} address's domain, or the
        nearest parent of it, that has a key configured (so that
        C{MAILER-DAEMON@mx.groups.example.com}, gsmail's DSNs, is signed by
        C{groups.example.com}: aligned for DMARC, RFC 7489 §3.1.1); else
        the same for the envelope sender; else C{None}.

        @param from_field: the value of the message's one C{From} field;
            C{None} when it has none or several (then only C{sender} counts).
        @param sender: the envelope sender (C{""}: the null sender).
        """
        if from_field is not None:
            addresses = email.utils.getaddresses([from_field.decode("utf-8", "replace")])
            if len(addresses) == 1:
                domain = self._configured(_domain_of(addresses[0][1]))
                if domain is not None:
                    return domain
        return self._configured(_domain_of(sender))

    def _configured(self, domain: str | None) -> str | None:
        """C{domain} or its nearest parent that has a key, or C{None}."""
        while domain:
            if domain in self._domains:
                return domain
            _, _, domain = domain.partition(".")
        return None

    def sign(self, message: bytes, sender: str) -> bytes:
        """
        The fields to put before C{message}, with its line ends (LF or CRLF);
        C{b""} when no configured domain signs it.

        @param message: the whole message.
        @param sender: its envelope sender.
        @raise DKIMKeyError: a key of the signing domain cannot be used (the
            message must wait: it would leave unsigned).
        @raise MessageNotSignable: dkimpy cannot parse the message.
        """
        try:
            fields, _ = dkim.rfc822_parse(message)
        except dkim.DKIMException as e:
            raise MessageNotSignable(str(e)) from None
        froms = [value for name, value in fields if name.lower() == b"from"]
        domain = self.signing_domain(froms[0] if len(froms) == 1 else None, sender)
        if domain is None:
            return b""
        linesep = b"\r\n" if message.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
        include = [
            name.lower()
            for name, _ in fields
            if (lower := name.lower().decode("ascii", "replace")) in self._exact
            or lower.startswith(self._prefixes)
        ]
        include.append(b"from")
        signatures = []
        rsa_key: LoadedKey | None = None
        rsa_selector = ""
        for spec in self.keys.for_domain(domain):
            key = self.keys.get(spec)
            if key.algorithm == RSA_SHA256 and rsa_key is None:
                rsa_key, rsa_selector = key, spec.selector
            try:
                signature = dkim.DKIM(message, linesep=linesep).sign(
                    spec.selector.encode("ascii"),
                    domain.encode("ascii"),
                    key.private,
                    signature_algorithm=key.algorithm.encode("ascii"),
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=include,
                )
            except dkim.KeyFormatError as e:
                raise DKIMKeyError(f"the DKIM key {spec.path} cannot sign: {e}") from None
            except dkim.DKIMException as e:
                raise MessageNotSignable(str(e)) from None
            signatures.append(_with_linesep(signature, linesep))
        prefix = b"".join(signatures)
        if self.arc and rsa_key is not None and self.authserv_id:
            prefix = (
                self._seal(prefix + message, domain, rsa_selector, rsa_key, include, linesep)
                + prefix
            )
        return prefix

    def queue_signer(self, message: bytes, sender: str) -> tuple[bytes, str]:
        """
        L{sign} as the outbound queue's signer (L{gsmail.outbound.queue.Signer}):
        a message dkimpy cannot parse goes out unsigned, with a warning
        (waiting would not help).

        @return: the fields to put before the message, and a warning (C{""}).
        @raise DKIMKeyError: a key cannot be used: the message waits.
        """
        try:
            return self.sign(message, sender), ""
        except MessageNotSignable as e:
            return b"", f"it cannot be DKIM-signed: {e}"

    def _seal(
        self,
        message: bytes,
        domain: str,
        selector: str,
        key: LoadedKey,
        include: list[bytes],
        linesep: bytes,
    ) -> bytes:
        """
        The ARC set sealing C{message} (already DKIM-signed): C{b""} when it
        carries no C{Authentication-Results} of this site (dkimpy then
        ends the chain), which is the case for GroupServer's own mail.
        """
        try:
            arc_set = dkim.ARC(message, linesep=linesep).sign(
                selector.encode("ascii"),
                domain.encode("ascii"),
                key.private,
                self.authserv_id.encode("ascii", "replace"),
                include_headers=include,
            )
        except dkim.DKIMException as e:
            raise MessageNotSignable(f"ARC: {e}") from None
        return b"".join(_with_linesep(field, linesep) for field in arc_set)


def _with_linesep(field: bytes, linesep: bytes) -> bytes:
    """A header field from dkimpy with the message's line ends, ending in one."""
    text = field.replace(b"\r\n", b"\n").rstrip(b"\n")
    return text.replace(b"\n", linesep) + linesep


def _domain_of(address: str) -> str | None:
    """The lowercased ASCII domain of C{address}, or C{None}."""
    _, at, domain = address.strip().rpartition("@")
    if not at or not domain:
        return None
    domain = domain.rstrip(".>").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None


# -- keys and DNS records ---------------------------------------------------------


def generate_key(ed25519_key: bool = False, bits: int = 2048) -> bytes:
    """
    A new private key file's contents: RSA (PEM, PKCS#1, C{bits} bits) or
    ed25519 (the base64 of its seed, dkimpy's format, and a newline).
    """
    if ed25519_key:
        key = ed25519.Ed25519PrivateKey.generate()
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(seed) + b"\n"
    if bits < 2048 and bits != 1024:
        raise ValueError("RSA keys have 1024 or at least 2048 bits")
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def record_name(domain: str, selector: str) -> str:
    """Where a key is published: C{SELECTOR._domainkey.DOMAIN} (RFC 6376 §3.6.2.1)."""
    return f"{selector}._domainkey.{domain}"


def dns_record(domain: str, selector: str, key: LoadedKey) -> str:
    """
    The zone file line publishing C{key}: a TXT record of C{v=DKIM1},
    C{k=} and C{p=} (RFC 6376 §3.6.1), cut into character-strings of at
    most 250 octets.
    """
    value = f"v=DKIM1; k={key.key_type}; p={key.public}"
    chunks = [value[i : i + _TXT_CHUNK] for i in range(0, len(value), _TXT_CHUNK)]
    quoted = " ".join(f'"{chunk}"' for chunk in chunks)
    if len(chunks) > 1:
        quoted = f"( {quoted} )"
    return f"{record_name(domain, selector)}. IN TXT {quoted}"


def public_key_matches(record: bytes, key: LoadedKey) -> str | None:
    """
    Whether a published DKIM record is C{key}'s.

    @param record: the TXT record's text (its strings joined).
    @return: C{None} when it is, else why not (one phrase).
    """
    try:
        tags = dkim.util.parse_tag_value(record)
    except dkim.util.InvalidTagValueList as e:
        return f"the record does not parse ({e})"
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        return "the record is not v=DKIM1"
    published_type = tags.get(b"k", b"rsa").decode("ascii", "replace").lower()
    if published_type != key.key_type:
        return f"the record has k={published_type}, the key is {key.key_type}"
    p = re.sub(rb"\s+", b"", tags.get(b"p", b""))
    if not p:
        return "the record has an empty p= (the key is revoked)"
    try:
        published = base64.b64decode(p, validate=True)
    except ValueError:
        return "the record's p= is not base64"
    ours = base64.b64decode(key.public)
    if published == ours:
        return None
    if key.key_type == "rsa" and _same_rsa_key(published, ours):
        return None
    return "the published public key is not this key's"


def _same_rsa_key(published: bytes, ours: bytes) -> bool:
    """Compare RSA keys published as SubjectPublicKeyInfo or PKCS#1 RSAPublicKey."""
    mine = serialization.load_der_public_key(ours)
    assert isinstance(mine, rsa.RSAPublicKey)
    theirs: object
    try:
        theirs = serialization.load_der_public_key(published)
    except ValueError:
        pem = b"-----BEGIN RSA PUBLIC KEY-----\n" + base64.encodebytes(published)
        pem += b"-----END RSA PUBLIC KEY-----\n"
        try:
            theirs = serialization.load_pem_public_key(pem)
        except ValueError:
            return False
    return isinstance(theirs, rsa.RSAPublicKey) and theirs.public_numbers() == mine.public_numbers()
