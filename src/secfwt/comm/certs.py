"""Certificates for the TLS links: one private CA and one certificate + key per party.

Every party is identified by its certificate's common name (CN), which is its party name (``server0``,
``server1``, ``dealer``, ``owner``); the same name is also a DNS subject alternative name (SAN), together
with ``localhost``, ``127.0.0.1`` and any extra hosts given. Keys are EC P-256. Parties trust only the CA
(:mod:`secfwt.comm.tcp` checks the CN of every peer against the party it expects on that connection).

Several hosts (no private key leaves its host) -- a certificate-signing-request flow:

1. the CA host: :func:`write_ca` -> ``ca.pem`` (give it to every party) and ``ca-key.pem`` (stays);
2. each party's host: :func:`write_request` -> ``NAME-key.pem`` (stays) and ``NAME.csr`` (to the CA);
3. the CA host: :func:`sign_request` checks the CSR (its signature, that its CN is a party name, its key
   type, its SANs) and writes ``NAME.pem`` (back to the party). Only the CN and the DNS / IP SANs of a CSR
   are used; any other extension it asks for (e.g. "CA = true") is ignored.

One machine (tests, demos): :func:`write_party_certs` mints the CA and every party's key in one directory,
so whoever holds that directory can act as any party.

Private keys are created with mode 0600 (``os.open`` with that mode, never widened afterwards) in a
directory created with mode 0700; an existing directory that group or others can access is refused.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secfwt import files
from secfwt.comm.base import PARTY_NAMES
from secfwt.errors import ConfigError

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 365
CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"


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


def _sans(name: str, hosts: Iterable[str]) -> list[x509.GeneralName]:
    """SANs of party ``name``: its name, localhost, 127.0.0.1 and ``hosts`` (duplicates dropped)."""
    sans: list[x509.GeneralName] = []
    for h in (name, *DEFAULT_HOSTS, *hosts):
        if not h:
            raise ConfigError("empty host name in the list of hosts")
        entry = _san_entry(h)
        if entry not in sans:
            sans.append(entry)
    return sans


def check_party_name(name: str) -> str:
    """``name`` if it is a party name; ConfigError otherwise."""
    if name not in PARTY_NAMES.values():
        raise ConfigError(f"unknown party name '{name}' (expected one of: {', '.join(PARTY_NAMES.values())})")
    return name


def _check_days(days: int) -> int:
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise ConfigError(f"certificate validity: expected a positive number of days, got {days!r}")
    return days


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def generate_ca(common_name: str = "secfwt CA", days: int = DEFAULT_DAYS) -> tuple[ec.EllipticCurvePrivateKey,
                                                                                   x509.Certificate]:
    """A new self-signed CA (EC P-256 key, may sign end-entity certificates only)."""
    key = generate_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_check_days(days)))
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


def _end_entity_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    public_key: ec.EllipticCurvePublicKey,
    sans: Sequence[x509.GeneralName],
    days: int,
) -> x509.Certificate:
    """The certificate of party ``name``: CN = name, the given SANs, TLS client + server use, not a CA;
    valid for ``days`` days but never beyond the CA certificate."""
    now = _now()
    until = min(now + datetime.timedelta(days=_check_days(days)), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def issue_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    hosts: Iterable[str] = (),
    days: int = DEFAULT_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new key and a certificate for party ``name`` signed by the CA (the one-machine path: the caller
    holds both the CA key and the new key).

    CN = ``name``; SANs = ``name``, localhost, 127.0.0.1 and ``hosts`` (IP literals become IP SANs).
    Usable for both TLS client and server authentication. Raises ValueError for an empty name.
    """
    if not name:
        raise ValueError("issue_cert: empty party name")
    key = generate_key()
    return key, _end_entity_cert(ca_key, ca_cert, name, key.public_key(), _sans(name, hosts), days)


# -- certificate signing requests ------------------------------------------------------------------------


def make_csr(key: ec.EllipticCurvePrivateKey, name: str, hosts: Iterable[str] = ()) -> x509.CertificateSigningRequest:
    """A CSR for party ``name`` signed by its own ``key``: CN = name, SANs as in :func:`issue_cert`.
    Raises ConfigError for a name that is not a party name."""
    check_party_name(name)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(name))
        .add_extension(x509.SubjectAlternativeName(_sans(name, hosts)), critical=False)
        .sign(key, hashes.SHA256())
    )


def load_csr(path: str | Path) -> x509.CertificateSigningRequest:
    """Read a CSR (PEM or DER); ConfigError naming the file if it is missing or not a CSR."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"CSR file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read CSR file {path}: {e.strerror or e}") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not a certificate signing request (expected a PEM 'CERTIFICATE REQUEST' "
                          f"as written by 'secfwt certs request')") from None


def check_csr(csr: x509.CertificateSigningRequest, where: str = "CSR") -> tuple[str, list[x509.GeneralName]]:
    """Validate a CSR: its self-signature verifies, its key is EC P-256, its subject is exactly one CN that
    is a party name, and its SANs (if any) are DNS names or IP addresses. Returns the party name and the
    SANs to certify (the party name is always among them). ConfigError naming ``where`` otherwise."""
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise ConfigError(f"{where}: the CSR's signature does not verify (the file was altered, or it was not "
                          f"signed by the key it contains)")
    pub = csr.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, ec.SECP256R1):
        got = pub.curve.name if isinstance(pub, ec.EllipticCurvePublicKey) else type(pub).__name__
        raise ConfigError(f"{where}: expected an EC P-256 (secp256r1) key, got {got}")
    attrs = list(csr.subject)
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or len(attrs) != 1:
        raise ConfigError(f"{where}: expected a subject of exactly one common name (the party name), "
                          f"got '{csr.subject.rfc4514_string()}'")
    name = str(cns[0].value)
    if name not in PARTY_NAMES.values():
        raise ConfigError(f"{where}: unknown party name '{name}' in the common name "
                          f"(expected one of: {', '.join(PARTY_NAMES.values())})")
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    try:
        requested = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        requested = []
    except ValueError as e:
        raise ConfigError(f"{where}: malformed CSR extensions: {e}") from None
    for entry in requested:
        if not isinstance(entry, x509.DNSName | x509.IPAddress):
            raise ConfigError(f"{where}: unsupported subject alternative name {entry!r} "
                              f"(expected DNS names and IP addresses)")
        if entry not in sans:
            sans.append(entry)
    return name, sans


def sign_csr(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    days: int = DEFAULT_DAYS,
    where: str = "CSR",
) -> x509.Certificate:
    """The end-entity certificate for a CSR checked by :func:`check_csr` (same profile as
    :func:`issue_cert`); only the CSR's CN, key and DNS/IP SANs are used."""
    name, sans = check_csr(csr, where)
    pub = csr.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    return _end_entity_cert(ca_key, ca_cert, name, pub, sans, days)


def fingerprint(der: bytes) -> str:
    """SHA-256 of ``der`` as colon-separated upper-case hex (compare it out of band)."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def public_key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 fingerprint of a public key (DER SubjectPublicKeyInfo): the party and the CA both print it,
    so the CA can confirm by phone or chat that the CSR it signs came from that party."""
    return fingerprint(key.public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo))


def cert_fingerprint(cert: x509.Certificate) -> str:
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


# -- files ------------------------------------------------------------------------------------------------


def private_dir(path: str | Path) -> Path:
    """A directory for private keys: created with mode 0700 if missing; an existing one must not be
    accessible by group or others. ConfigError otherwise (the path is a file, or the mode is too open)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path exists and is not a directory: {path}")
    files.private_dir(path)  # missing directories are made 0700 (explicitly, whatever the umask)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"directory {path} for private keys is accessible by group or others (mode "
                          f"{mode:04o}, expected 0700): run 'chmod 700 {path}' or use a new directory")
    return path


def _write_private(path: Path, data: bytes, overwrite: bool) -> None:
    """Create ``path`` with mode 0600 from the start (O_EXCL: no symlink is followed, nothing is replaced
    unless ``overwrite``); ConfigError if it exists and ``overwrite`` is False."""
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise ConfigError(f"private key file already exists: {path} (refusing to overwrite it; remove it "
                              f"or choose another directory)")
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public(path: Path, data: bytes) -> None:
    """Write a certificate or CSR (not secret) via a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM of a private key (unencrypted: protect it with file permissions)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_cert_pair(out: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> TlsFiles:
    """Write ``<name>.pem`` and ``<name>-key.pem`` (0600, replacing an existing one) into ``out`` (0700);
    returns their paths (CA = ``out/ca.pem``)."""
    out = private_dir(out)
    cert_path, key_path = out / f"{name}.pem", out / f"{name}-key.pem"
    _write_public(cert_path, cert_pem(cert))
    _write_private(key_path, key_pem(key), overwrite=True)
    return TlsFiles(ca=out / CA_CERT, cert=cert_path, key=key_path)


def write_party_certs(
    out: str | Path,
    hosts: Sequence[str] = (),
    parties: Sequence[str] = tuple(PARTY_NAMES.values()),
    days: int = DEFAULT_DAYS,
) -> dict[str, TlsFiles]:
    """ONE MACHINE ONLY: a fresh CA and every party's certificate + key in directory ``out`` (0700,
    created if missing; keys 0600). Whoever holds ``out`` can act as any party; for several hosts use
    :func:`write_ca`, :func:`write_request` and :func:`sign_request`.

    Returns ``{party name: TlsFiles}``. Existing files of the same names are replaced. Raises
    :class:`ConfigError` when ``out`` is not a directory or group/others can access it.
    """
    out = private_dir(out)
    ca_key, ca_cert = generate_ca(days=days)
    _write_public(out / CA_CERT, cert_pem(ca_cert))
    _write_private(out / CA_KEY, key_pem(ca_key), overwrite=True)
    files: dict[str, TlsFiles] = {}
    for name in parties:
        key, cert = issue_cert(ca_key, ca_cert, name, hosts, days=days)
        files[name] = write_cert_pair(out, name, key, cert)
    return files


def write_ca(out: str | Path, days: int = DEFAULT_DAYS, common_name: str = "secfwt CA") -> tuple[Path, Path]:
    """A new CA in directory ``out`` (0700): ``ca.pem`` and ``ca-key.pem`` (0600). Returns both paths.
    ConfigError if a ``ca-key.pem`` is already there (never replaced) or the directory is unsuitable."""
    out = private_dir(out)
    key_path, cert_path = out / CA_KEY, out / CA_CERT
    key, cert = generate_ca(common_name, days=days)
    _write_private(key_path, key_pem(key), overwrite=False)
    _write_public(cert_path, cert_pem(cert))
    return cert_path, key_path


def write_request(out: str | Path, name: str, hosts: Sequence[str] = ()) -> tuple[Path, Path, str]:
    """On party ``name``'s own host: a new key ``out/NAME-key.pem`` (0600, in a 0700 directory; never
    replaced) and the CSR ``out/NAME.csr`` to send to the CA. Returns the key path, the CSR path and the
    public key's fingerprint. ConfigError for an unknown party name or an existing key."""
    check_party_name(name)
    out = private_dir(out)
    key_path, csr_path = out / f"{name}-key.pem", out / f"{name}.csr"
    key = generate_key()
    csr = make_csr(key, name, hosts)
    _write_private(key_path, key_pem(key), overwrite=False)
    _write_public(csr_path, csr.public_bytes(serialization.Encoding.PEM))
    return key_path, csr_path, public_key_fingerprint(key.public_key())


def load_ca(ca_dir: str | Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA key and certificate of directory ``ca_dir`` (from :func:`write_ca`); ConfigError naming the
    file if one is missing or unreadable, the certificate is not a CA, or the key does not match it."""
    ca_dir = Path(ca_dir)
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    for p in (cert_path, key_path):
        if not p.is_file():
            raise ConfigError(f"CA file not found: {p} (make a CA with 'secfwt certs ca --out {ca_dir}')")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        raise ConfigError(f"{cert_path}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{key_path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: expected an EC private key, got {type(key).__name__}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"{cert_path}: not a CA certificate (basic constraints CA = false)")
    if cert.public_key() != key.public_key():
        raise ConfigError(f"{key_path} does not belong to the certificate {cert_path}")
    return key, cert


def sign_request(
    ca_dir: str | Path, csr_path: str | Path, out: str | Path, days: int = DEFAULT_DAYS
) -> x509.Certificate:
    """On the CA's host: check the CSR ``csr_path`` (:func:`check_csr`) and write the certificate it asks
    for, signed by the CA in ``ca_dir``, to the file ``out``. Returns the certificate. ConfigError (one line,
    naming the file) for a missing/bad CA, a bad or tampered CSR, an unknown party name, or a bad ``out``."""
    _check_days(days)
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"certificate output path is a directory: {out} (expected a file name, e.g. NAME.pem)")
    if not out.parent.is_dir():
        raise ConfigError(f"directory of the certificate output file does not exist: {out.parent}")
    ca_key, ca_cert = load_ca(ca_dir)
    csr = load_csr(csr_path)
    cert = sign_csr(ca_key, ca_cert, csr, days, where=str(csr_path))
    _write_public(out, cert_pem(cert))
    return cert


def cert_sans(cert: x509.Certificate) -> list[str]:
    """The DNS and IP SANs of a certificate as strings (for printing)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)] + \
        [str(v) for v in ext.get_values_for_type(x509.IPAddress)]
