"""Certificates for the TLS links: one private CA and one certificate + key per party.

Every party is identified by its certificate's common name (CN), which is its party name (``server0``,
``server1``, ``dealer``, ``owner``); the same name is also a DNS subject alternative name (SAN), together
with ``localhost``, ``127.0.0.1`` and any extra hosts given. Keys are EC P-256. Parties trust only the CA
(:mod:`secfwt.comm.tcp` checks the CN of every peer against the party it expects on that connection).

Files written by :func:`write_party_certs` (private keys with mode 0600)::

    ca.pem  ca-key.pem  server0.pem  server0-key.pem  server1.pem  ...
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secfwt.comm.base import PARTY_NAMES
from secfwt.errors import ConfigError

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 365


@dataclass(frozen=True)
class TlsFiles:
    """Paths of one party's TLS material: the CA certificate, its own certificate and private key."""

    ca: Path
    cert: Path
    key: Path

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first file that does not exist."""
        for what, p in (("CA certificate", self.ca), ("certificate", self.cert), ("private key", self.key)):
            if not Path(p).is_file():
                raise ConfigError(f"{what} file not found: {p}")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san_entry(host: str) -> x509.GeneralName:
    """An IP address SAN for IP literals, a DNS name SAN otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def generate_ca(common_name: str = "secfwt CA", days: int = DEFAULT_DAYS) -> tuple[ec.EllipticCurvePrivateKey,
                                                                                   x509.Certificate]:
    """A new self-signed CA (EC P-256 key, may sign end-entity certificates only)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    hosts: Iterable[str] = (),
    days: int = DEFAULT_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new key and a certificate for party ``name`` signed by the CA.

    CN = ``name``; SANs = ``name``, localhost, 127.0.0.1 and ``hosts`` (IP literals become IP SANs).
    Usable for both TLS client and server authentication. Raises ValueError for an empty name.
    """
    if not name:
        raise ValueError("issue_cert: empty party name")
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in (name, *DEFAULT_HOSTS, *hosts):
        entry = _san_entry(h)
        if entry not in sans:
            sans.append(entry)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write ``data`` to ``path``; private files are created with mode 0600 (never world-readable)."""
    if private:
        if path.exists():
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM of a private key (unencrypted: protect it with file permissions)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_cert_pair(out: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> TlsFiles:
    """Write ``<name>.pem`` and ``<name>-key.pem`` into ``out``; returns their paths (CA = ``out/ca.pem``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{name}.pem", out / f"{name}-key.pem"
    _write(cert_path, cert_pem(cert), private=False)
    _write(key_path, key_pem(key), private=True)
    return TlsFiles(ca=out / "ca.pem", cert=cert_path, key=key_path)


def write_party_certs(
    out: str | Path,
    hosts: Sequence[str] = (),
    parties: Sequence[str] = tuple(PARTY_NAMES.values()),
    days: int = DEFAULT_DAYS,
) -> dict[str, TlsFiles]:
    """Create a fresh CA and one certificate + key per party in directory ``out`` (created if missing).

    Returns ``{party name: TlsFiles}``. Existing files of the same names are overwritten. Raises
    :class:`ConfigError` when ``out`` exists and is not a directory.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"certificate output path exists and is not a directory: {out}")
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = generate_ca(days=days)
    _write(out / "ca.pem", cert_pem(ca_cert), private=False)
    _write(out / "ca-key.pem", key_pem(ca_key), private=True)
    files: dict[str, TlsFiles] = {}
    for name in parties:
        key, cert = issue_cert(ca_key, ca_cert, name, hosts, days=days)
        files[name] = write_cert_pair(out, name, key, cert)
    return files
