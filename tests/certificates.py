"""
Test certificates, made once here for every test that needs TLS: a CA that
issues server certificates, self-signed certificates, and the files
gsmail's C{tls_certificate}/C{tls_key} read. EC P-256 keys (RSA 2048 on
request), SHA-256, valid from an hour ago for a day.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import smtplib
import ssl
from collections.abc import Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The host name of the certificates gsmail's listeners get in tests.
MX_NAME = "mx.groups.example.com"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key(key_type: str = "ec") -> Any:
    """A new private key: C{"ec"} (P-256) or C{"rsa"} (2048 bits)."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: Any) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def cert_pem(certificate: x509.Certificate) -> bytes:
    """A certificate as PEM."""
    return certificate.public_bytes(serialization.Encoding.PEM)


def _alt_names(names: Sequence[str], ips: Sequence[str]) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    general += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    return x509.SubjectAlternativeName(general)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    """A certificate of C{subject} by C{issuer}, valid from an hour ago for a day."""
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _server_extensions(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    return builder.add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)


@attrs.frozen
class Issued:
    """A server certificate and its key (PEM)."""

    cert_pem: bytes
    key_pem: bytes

    def server_options(self) -> Any:
        """A Twisted server TLS context with this certificate (for STARTTLS)."""
        from twisted.internet import ssl as tssl

        return tssl.PrivateCertificate.loadPEM(self.key_pem + self.cert_pem).options()


@attrs.frozen
class TestCA:
    """A test CA: its key and certificate, and the server certificates it issues."""

    key: Any
    certificate: x509.Certificate

    @property
    def pem(self) -> bytes:
        """The CA certificate, PEM."""
        return cert_pem(self.certificate)

    def trust_root(self) -> Any:
        """A Twisted C{IOpenSSLTrustRoot} trusting only this CA."""
        from twisted.internet import ssl as tssl

        return tssl.trustRootFromCertificates([tssl.Certificate.loadPEM(self.pem)])

    def issue(self, *names: str, ips: Sequence[str] = (), key_type: str = "ec") -> Issued:
        """
        A server certificate for DNS C{names} (the first is the common name)
        and IP addresses C{ips}, signed by this CA.
        """
        key = _new_key(key_type)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        builder = (
            _builder(subject, self.certificate.subject, key.public_key())
            .add_extension(_alt_names(names, ips), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        certificate = _server_extensions(builder).sign(self.key, hashes.SHA256())
        return Issued(cert_pem(certificate), key_pem(key))

    def server_options(self, *names: str) -> Any:
        """A Twisted server TLS context with a new certificate for C{names}."""
        return self.issue(*names).server_options()


def new_ca(common_name: str = "gsmail test CA") -> TestCA:
    """A new CA (EC P-256, valid a day) that may sign server certificates."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return TestCA(key, certificate)


def self_signed(
    common_name: str, names: Sequence[str] = (), ips: Sequence[str] = (), *, ca: bool = False
) -> Issued:
    """
    A self-signed certificate: a server certificate for DNS C{names} and IP
    addresses C{ips}, or with C{ca} one that is its own CA (a client may
    then trust it as its root).
    """
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = _builder(name, name, key.public_key()).add_extension(
        _alt_names(names, ips), critical=False
    )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    else:
        builder = _server_extensions(builder)
    return Issued(cert_pem(builder.sign(key, hashes.SHA256())), key_pem(key))


def write_pem(path: str, *blocks: bytes) -> str:
    """Write the PEM C{blocks} to C{path}; return C{path}."""
    with open(path, "wb") as f:
        f.write(b"".join(blocks))
    return path


def make_certificate(directory: str) -> tuple[str, str, str]:
    """
    A self-signed certificate for L{MX_NAME} and C{127.0.0.1}, in
    C{directory}/cert.pem and key.pem.

    @return: the certificate file, the key file (both PEM) and the
        certificate as PEM text, for a client's trust store.
    """
    os.makedirs(directory, exist_ok=True)
    issued = self_signed(MX_NAME, [MX_NAME], ["127.0.0.1"])
    return (
        write_pem(os.path.join(directory, "cert.pem"), issued.cert_pem),
        write_pem(os.path.join(directory, "key.pem"), issued.key_pem),
        issued.cert_pem.decode("ascii"),
    )


def make_chain(directory: str, key_type: str = "ec") -> tuple[str, str, str]:
    """
    A new CA, and a server certificate it signed for L{MX_NAME}.

    @param key_type: C{"ec"} (P-256) or C{"rsa"} (2048 bits) for the server key.
    @return: the server certificate file followed by the CA certificate (as
        C{tls_certificate} holds a chain), the server key file, and a file
        with the server certificate alone.
    """
    os.makedirs(directory, exist_ok=True)
    ca = new_ca()
    issued = ca.issue(MX_NAME, key_type=key_type)
    return (
        write_pem(os.path.join(directory, "chain.pem"), issued.cert_pem, ca.pem),
        write_pem(os.path.join(directory, "key.pem"), issued.key_pem),
        write_pem(os.path.join(directory, "leaf.pem"), issued.cert_pem),
    )


def new_certificate(directory: str, name: str) -> bytes:
    """
    A new certificate and key (L{make_certificate}) moved over
    C{directory}/tls/cert.pem and key.pem, as certbot renews; its DER.
    """
    cert, key, pem = make_certificate(os.path.join(directory, name))
    os.makedirs(os.path.join(directory, "tls"), exist_ok=True)
    os.replace(cert, os.path.join(directory, "tls", "cert.pem"))
    os.replace(key, os.path.join(directory, "tls", "key.pem"))
    return ssl.PEM_cert_to_DER_cert(pem)


def peer_certificate(port: int) -> bytes:
    """The certificate (DER) a new STARTTLS session on 127.0.0.1:C{port} gets (blocking)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=context)
        der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    assert der is not None
    return der


@attrs.frozen
class TestPKI:
    """A test CA and one server certificate it signed (PEM)."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def server_options(self) -> Any:
        """The server TLS context for STARTTLS."""
        return Issued(self.cert_pem, self.key_pem).server_options()


_pki: dict[str, TestPKI] = {}


def make_pki(name: str) -> TestPKI:
    """A CA and a certificate for DNS name C{name}; cached per name (making keys is slow)."""
    if name not in _pki:
        ca = new_ca()
        issued = ca.issue(name)
        _pki[name] = TestPKI(ca.pem, issued.cert_pem, issued.key_pem)
    return _pki[name]
