"""Certificate-signing-request flow: CA, per-host keys and CSRs, signing, TLS between the parties; refusals
(other CA, unknown party, tampered or malformed CSR); file modes; the ``secfwt certs`` command line."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from helpers import in_threads
from secfwt.cli import main
from secfwt.comm.base import DEALER, OWNER, PARTY_NAMES, SERVER0, SERVER1
from secfwt.comm.certs import (
    TlsFiles,
    load_csr,
    public_key_fingerprint,
    sign_request,
    write_ca,
    write_party_certs,
    write_request,
)
from secfwt.comm.tcp import TcpCommunicator
from secfwt.errors import AuthError, ConfigError
from secfwt.launch import free_ports, load_parties_config, write_local_config

NAMES = list(PARTY_NAMES.values())


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _deploy(root: Path, ca_dir: Path) -> dict[str, Path]:
    """The README recipe: each party's host (``root/NAME``) makes its key and CSR in ``certs/``, the CA signs
    the CSR it received, and the certificate plus ``ca.pem`` go back into that host's ``certs/``."""
    hosts: dict[str, Path] = {}
    for name in NAMES:
        host = root / name
        host.mkdir()
        write_request(host / "certs", name, hosts=[f"{name}.example.org", "10.0.0.7"])
        inbox = root / "at-ca"
        inbox.mkdir(exist_ok=True)
        shutil.copy(host / "certs" / f"{name}.csr", inbox / f"{name}.csr")  # only the CSR travels
        sign_request(ca_dir, inbox / f"{name}.csr", inbox / f"{name}.pem")
        shutil.copy(inbox / f"{name}.pem", host / "certs" / f"{name}.pem")
        shutil.copy(ca_dir / "ca.pem", host / "certs" / "ca.pem")
        hosts[name] = host
    return hosts


def _connect(tls: dict[int, TlsFiles], connect_timeout: float = 5.0) -> tuple[dict[int, TcpCommunicator],
                                                                               dict[int, BaseException]]:
    """One TcpCommunicator per rank of ``tls``, each in its own thread, on fresh loopback ports."""
    ranks = sorted(tls)
    addrs = dict(zip(ranks, (("127.0.0.1", p) for p in free_ports(len(ranks))), strict=True))
    return in_threads(lambda r: TcpCommunicator(r, addrs, tls[r], ranks, timeout=10.0,
                                                connect_timeout=connect_timeout), ranks)


def _files(host: Path, name: str) -> TlsFiles:
    return TlsFiles(ca=host / "certs" / "ca.pem", cert=host / "certs" / f"{name}.pem",
                    key=host / "certs" / f"{name}-key.pem")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("deploy")
    write_ca(root / "ca")
    return root / "ca", _deploy(root, root / "ca")


def test_csr_flow_four_hosts_talk_over_tls(deployment: tuple[Path, dict[str, Path]]) -> None:
    ca_dir, hosts = deployment
    # Every host ends up with exactly its own key; the CA directory holds no party key.
    for name, host in hosts.items():
        keys = sorted(p.name for p in (host / "certs").glob("*-key.pem"))
        assert keys == [f"{name}-key.pem"]
        assert _mode(host / "certs") == 0o700 and _mode(host / "certs" / f"{name}-key.pem") == 0o600
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca-key.pem", "ca.pem"]
    assert _mode(ca_dir) == 0o700 and _mode(ca_dir / "ca-key.pem") == 0o600
    # Each host's parties file names all addresses but only its own certificate and key (relative paths).
    ports = free_ports(4)
    for name, host in hosts.items():
        lines = ['ca = "certs/ca.pem"', "connect_timeout = 10.0"]
        for other, port in zip(NAMES, ports, strict=True):
            lines += [f"[parties.{other}]", 'host = "127.0.0.1"', f"port = {port}"]
            if other == name:
                lines += [f'cert = "certs/{name}.pem"', f'key = "certs/{name}-key.pem"']
        (host / "parties.toml").write_text("\n".join(lines) + "\n")
    ranks = sorted(PARTY_NAMES)
    comms, errors = in_threads(
        lambda r: load_parties_config(hosts[PARTY_NAMES[r]] / "parties.toml").communicator(r, ranks), ranks)
    assert not errors, errors
    try:
        for src in ranks:
            for dst in ranks:
                if src != dst:
                    comms[src].send(dst, "x", torch.tensor([src, dst, -(2**63)], dtype=torch.int64))
        for dst in ranks:
            for src in ranks:
                if src != dst:
                    got = comms[dst].recv(src, "x", shape=(3,), dtype=torch.int64)
                    assert torch.equal(got, torch.tensor([src, dst, -(2**63)], dtype=torch.int64))
    finally:
        for c in comms.values():
            c.close()


def test_signed_certificate_profile(deployment: tuple[Path, dict[str, Path]]) -> None:
    ca_dir, hosts = deployment
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((hosts["dealer"] / "certs" / "dealer.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dealer"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"dealer", "localhost", "dealer.example.org"}
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.7"}
    # The certificate carries the key made on the dealer's host.
    key = serialization.load_pem_private_key((hosts["dealer"] / "certs" / "dealer-key.pem").read_bytes(), None)
    assert cert.public_key() == key.public_key()


def test_certificate_from_another_ca_is_refused(deployment: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    _, hosts = deployment
    # A second CA signs a server1 request; that server1 trusts the real CA but is not trusted by server0.
    write_ca(tmp_path / "rogue-ca")
    write_request(tmp_path / "rogue", "server1")
    sign_request(tmp_path / "rogue-ca", tmp_path / "rogue" / "server1.csr", tmp_path / "rogue" / "server1.pem")
    rogue = TlsFiles(ca=hosts["server1"] / "certs" / "ca.pem", cert=tmp_path / "rogue" / "server1.pem",
                     key=tmp_path / "rogue" / "server1-key.pem")
    comms, errors = _connect({SERVER0: _files(hosts["server0"], "server0"), SERVER1: rogue}, connect_timeout=1.5)
    assert comms == {}
    assert isinstance(errors[SERVER0], AuthError) and "refused connection" in str(errors[SERVER0])
    assert isinstance(errors[SERVER1], AuthError)


def test_wrong_role_with_valid_certificate_is_refused(deployment: tuple[Path, dict[str, Path]]) -> None:
    _, hosts = deployment
    # The owner's host tries to join as the dealer with its own (validly signed) certificate.
    comms, errors = _connect({DEALER: _files(hosts["owner"], "owner"), OWNER: _files(hosts["owner"], "owner")},
                             connect_timeout=1.5)
    assert comms == {}
    assert isinstance(errors[OWNER], AuthError) and "is 'owner', expected 'dealer'" in str(errors[OWNER])


def _csr(key: ec.EllipticCurvePrivateKey, cn: str, extensions: Sequence[x509.ExtensionType] = ()) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    for ext in extensions:
        b = b.add_extension(ext, critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    write_ca(tmp_path / "ca")
    return tmp_path / "ca"


def test_unknown_party_name_is_refused(ca_dir: Path, tmp_path: Path) -> None:
    csr = tmp_path / "mallory.csr"
    csr.write_bytes(_csr(ec.generate_private_key(ec.SECP256R1()), "mallory"))
    out = tmp_path / "mallory.pem"
    with pytest.raises(ConfigError, match=r"mallory.csr: unknown party name 'mallory'.*expected one of: server0"):
        sign_request(ca_dir, csr, out)
    assert not out.exists()
    with pytest.raises(ConfigError, match="unknown party name 'mallory'"):
        write_request(tmp_path / "m", "mallory")
    assert not (tmp_path / "m").exists()


def test_tampered_csr_is_refused(ca_dir: Path, tmp_path: Path) -> None:
    write_request(tmp_path / "h", "owner")
    csr = load_csr(tmp_path / "h" / "owner.csr")
    der = csr.public_bytes(serialization.Encoding.DER)
    assert der.count(b"owner") == 2  # CN and SAN
    forged = x509.load_der_x509_csr(der.replace(b"owner", b"dealr"))  # same length: still parses
    bad = tmp_path / "dealr.csr"
    bad.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="signature does not verify"):
        sign_request(ca_dir, bad, tmp_path / "x.pem")
    # Swapping in another public key (e.g. the CA operator's own) breaks the signature as well.
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    mine = csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    bad.write_bytes(x509.load_der_x509_csr(der.replace(mine, other)).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="signature does not verify"):
        sign_request(ca_dir, bad, tmp_path / "x.pem")
    assert not (tmp_path / "x.pem").exists()


def test_csr_checks_key_sans_and_ignores_ca_request(ca_dir: Path, tmp_path: Path) -> None:
    p384 = tmp_path / "p384.csr"
    p384.write_bytes(_csr(ec.generate_private_key(ec.SECP384R1()), "server0"))
    with pytest.raises(ConfigError, match="expected an EC P-256 .* got secp384r1"):
        sign_request(ca_dir, p384, tmp_path / "a.pem")
    email = tmp_path / "email.csr"
    email.write_bytes(_csr(ec.generate_private_key(ec.SECP256R1()), "server0",
                           [x509.SubjectAlternativeName([x509.RFC822Name("a@b.example")])]))
    with pytest.raises(ConfigError, match="unsupported subject alternative name"):
        sign_request(ca_dir, email, tmp_path / "a.pem")
    # A CSR asking to be a CA gets an end-entity certificate anyway.
    greedy = tmp_path / "greedy.csr"
    greedy.write_bytes(_csr(ec.generate_private_key(ec.SECP256R1()), "server1",
                            [x509.BasicConstraints(ca=True, path_length=None)]))
    cert = sign_request(ca_dir, greedy, tmp_path / "greedy.pem")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server1"]


def test_malformed_inputs(ca_dir: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.csr"
    junk.write_text("-----BEGIN CERTIFICATE REQUEST-----\nnot base64 at all\n-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(ConfigError, match="junk.csr: not a certificate signing request"):
        sign_request(ca_dir, junk, tmp_path / "a.pem")
    with pytest.raises(ConfigError, match="ca.pem: not a certificate signing request"):
        sign_request(ca_dir, ca_dir / "ca.pem", tmp_path / "a.pem")
    with pytest.raises(ConfigError, match="CSR file not found"):
        sign_request(ca_dir, tmp_path / "none.csr", tmp_path / "a.pem")
    write_request(tmp_path / "h", "server0")
    shutil.copy(ca_dir / "ca.pem", tmp_path / "h" / "ca.pem")  # a party's directory: the CA's key is not there
    with pytest.raises(ConfigError, match="CA file not found: .*h/ca-key.pem"):
        sign_request(tmp_path / "h", tmp_path / "h" / "server0.csr", tmp_path / "a.pem")
    # A CA directory whose key belongs to another CA.
    write_ca(tmp_path / "ca2")
    shutil.copy(tmp_path / "ca2" / "ca.pem", ca_dir / "ca.pem")
    with pytest.raises(ConfigError, match="ca-key.pem does not belong to the certificate"):
        sign_request(ca_dir, tmp_path / "h" / "server0.csr", tmp_path / "a.pem")
    with pytest.raises(ConfigError, match="certificate output path is a directory"):
        sign_request(tmp_path / "ca2", tmp_path / "h" / "server0.csr", tmp_path)
    with pytest.raises(ConfigError, match="expected a positive number of days, got 0"):
        sign_request(tmp_path / "ca2", tmp_path / "h" / "server0.csr", tmp_path / "a.pem", days=0)
    assert not (tmp_path / "a.pem").exists()


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: files and directories get exactly the mode they are created with (no chmod hides a gap)."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_modes_and_no_overwrite(tmp_path: Path, open_umask: None) -> None:
    write_ca(tmp_path / "a" / "ca")
    key_path, csr_path, fp = write_request(tmp_path / "b" / "certs", "server1")
    assert _mode(tmp_path / "a" / "ca") == 0o700 and _mode(tmp_path / "a" / "ca" / "ca-key.pem") == 0o600
    assert _mode(tmp_path / "b" / "certs") == 0o700 and _mode(key_path) == 0o600
    pub = load_csr(csr_path).public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and fp == public_key_fingerprint(pub)
    files = write_party_certs(tmp_path / "local")
    assert _mode(tmp_path / "local") == 0o700 and _mode(tmp_path / "local" / "ca-key.pem") == 0o600
    assert {_mode(f.key) for f in files.values()} == {0o600}
    cfg = write_local_config(tmp_path / "run")
    assert _mode(cfg.parent / "certs") == 0o700
    assert {_mode(p) for p in (cfg.parent / "certs").glob("*-key.pem")} == {0o600}
    # An existing key is never replaced by ca / request.
    before = key_path.read_bytes()
    with pytest.raises(ConfigError, match="private key file already exists: .*server1-key.pem"):
        write_request(tmp_path / "b" / "certs", "server1")
    assert key_path.read_bytes() == before
    with pytest.raises(ConfigError, match="already exists: .*ca-key.pem"):
        write_ca(tmp_path / "a" / "ca")
    # A key directory that group or others can enter is refused, and nothing is written into it.
    (tmp_path / "open").mkdir(mode=0o755)
    with pytest.raises(ConfigError, match=r"accessible by group or others \(mode 0755, expected 0700\)"):
        write_request(tmp_path / "open", "dealer")
    with pytest.raises(ConfigError, match="accessible by group or others"):
        write_party_certs(tmp_path / "open")
    assert list((tmp_path / "open").iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        write_ca(tmp_path / "file")


def test_cli_flow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca, host = tmp_path / "ca", tmp_path / "host"
    assert main(["certs", "ca", "--out", str(ca), "--days", "30"]) == 0
    assert main(["certs", "request", "--party", "server0", "--out", str(host), "--hosts", "10.1.2.3"]) == 0
    out = capsys.readouterr().out
    fp = out.split("public key SHA-256: ")[1].split()[0]
    assert main(["certs", "sign", "--ca", str(ca), "--csr", str(host / "server0.csr"),
                 "--out", str(host / "server0.pem")]) == 0
    out = capsys.readouterr().out
    assert "for party 'server0'" in out and "10.1.2.3" in out and fp in out
    cert = x509.load_pem_x509_certificate((host / "server0.pem").read_bytes())
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 30
    # The one-machine forms, old and new, both warn.
    assert main(["certs", "--out", str(tmp_path / "old")]) == 0
    assert "ONE MACHINE / TESTING ONLY" in capsys.readouterr().out
    assert main(["certs", "local", "--out", str(tmp_path / "new"), "--hosts", "h.example"]) == 0
    assert "ONE MACHINE / TESTING ONLY" in capsys.readouterr().out
    for d in ("old", "new"):
        assert sorted(p.name for p in (tmp_path / d).glob("*-key.pem")) == sorted(
            ["ca-key.pem"] + [f"{n}-key.pem" for n in NAMES])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["certs"], "choose a sub-command: ca, request, sign or local"),
        (["certs", "request", "--party", "eve", "--out", "{tmp}/e"], "unknown party name 'eve'"),
        (["certs", "sign", "--ca", "{tmp}/ca", "--csr", "{tmp}/none.csr", "--out", "{tmp}/x.pem"],
         "CSR file not found: {tmp}/none.csr"),
        (["certs", "sign", "--ca", "{tmp}/ca", "--csr", "{tmp}/ca/ca.pem", "--out", "{tmp}/x.pem"],
         "{tmp}/ca/ca.pem: not a certificate signing request"),
        (["certs", "sign", "--ca", "{tmp}/nope", "--csr", "{tmp}/ca/ca.pem", "--out", "{tmp}/x.pem"],
         "CA file not found: {tmp}/nope/ca.pem"),
        (["certs", "ca", "--out", "{tmp}/ca"], "private key file already exists: {tmp}/ca/ca-key.pem"),
    ],
)
def test_cli_errors(ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                    message: str) -> None:
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("secfwt certs: error: ") and err.count("\n") == 1
    assert message.format(tmp=tmp_path) in err
    assert not (tmp_path / "x.pem").exists() and not (tmp_path / "e").exists()
