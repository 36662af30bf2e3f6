"""
DKIM test keys (made once per kind, written where a test wants them), the
DNS that publishes them to dkimpy (L{DNSStub}), checking every signature
of a message, and a sender's message and its C{Authentication-Results}.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import dkim

from gsmail.signing import (
    KeyRing,
    KeySpec,
    generate_key,
    record_name,
)

_KEYS: dict[str, bytes] = {}


def key_file(directory: str, name: str, *, ed25519: bool = False) -> str:
    """A key file in C{directory} (keys are made once per test run: RSA is slow)."""
    kind = "ed25519" if ed25519 else "rsa"
    if kind not in _KEYS:
        _KEYS[kind] = generate_key(ed25519_key=ed25519, bits=2048)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(_KEYS[kind])
    os.chmod(path, 0o600)
    return path


class DNSStub:
    """
    Published DKIM records for dkimpy's C{dnsfunc}: C{name -> TXT text}.

    @ivar asked: the names looked up, in order.
    """

    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}
        self.asked: list[str] = []

    def publish(self, spec: KeySpec, ring: KeyRing | None = None) -> None:
        """Publish C{spec}'s key as C{gsmail-dkim genkey} prints it."""
        key = (ring or KeyRing([spec])).get(spec)
        self.records[record_name(spec.domain, spec.selector) + "."] = (
            f"v=DKIM1; k={key.key_type}; p={key.public}".encode()
        )

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii")
        self.asked.append(text)
        return self.records.get(text)


def verify_all(message: bytes, dns: Callable[..., bytes | None]) -> list[tuple[str, bool]]:
    """
    Each DKIM signature of C{message} as a receiver sees it (CRLF on the
    wire): C{(its a= tag, whether it verifies)}, top first.
    """
    wire = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    verifier = dkim.DKIM(wire)
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    results = []
    for index in range(count):
        ok = verifier.verify(idx=index, dnsfunc=dns)
        results.append((verifier.signature_fields[b"a"].decode(), bool(ok)))
    return results


GROUP = "example@groups.example.com"


def message(sender: str, subject: str, extra: bytes = b"") -> bytes:
    return (
        extra
        + (
            f"From: Alice <{sender}>\r\n"
            f"To: {GROUP}\r\n"
            f"Subject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@sender.example>\r\n"
            f"\r\n"
            f"Hello, group.\r\n"
        ).encode()
    )


def results_of(post: bytes) -> list[bytes]:
    """The Authentication-Results fields of a post (unfolded), top first."""
    head = post.split(b"\n\n", 1)[0].replace(b"\n\t", b" ").replace(b"\n ", b" ")
    return [
        line for line in head.split(b"\n") if line.lower().startswith(b"authentication-results:")
    ]
