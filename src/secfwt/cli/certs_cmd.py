"""``secfwt certs``: TLS certificates for the parties.

Several hosts (no private key leaves its host)::

    secfwt certs ca --out ca/                                     # on the CA's host
    secfwt certs request --party server0 --out certs/ --hosts H   # on server0's host -> certs/server0.csr
    secfwt certs sign --ca ca/ --csr server0.csr --out server0.pem   # on the CA's host

One machine only (tests, demos): ``secfwt certs local --out certs/`` (or the older ``secfwt certs --out
certs/``) mints the CA and every party's key in one directory.
"""

from __future__ import annotations

import argparse
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from secfwt.comm.base import PARTY_NAMES
from secfwt.comm.certs import (
    DEFAULT_DAYS,
    cert_fingerprint,
    cert_sans,
    public_key_fingerprint,
    sign_request,
    write_ca,
    write_party_certs,
    write_request,
)
from secfwt.errors import ConfigError

_NAMES = ", ".join(PARTY_NAMES.values())
_LOCAL_WARNING = ("ONE MACHINE / TESTING ONLY: this mints the CA and every party's private key in one directory, "
                  "so whoever holds it can act as any party. For several hosts use 'secfwt certs ca', "
                  "'secfwt certs request' on each party's host and 'secfwt certs sign'.")


def _hosts_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--hosts", nargs="*", default=[], metavar="HOST",
                   help=f"extra host names or IP addresses to add as SANs to {what} (party name, localhost and "
                        "127.0.0.1 are always included)")


def _days_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, metavar="N",
                   help="validity in days (default %(default)s)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``certs`` and its sub-commands ``ca``, ``request``, ``sign``, ``local``."""
    p = subparsers.add_parser(
        "certs", help="TLS certificates: CA, per-party requests, signing (or all on one machine)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "TLS certificates for the parties (EC P-256; the CN and a SAN are the party name, one of "
            f"{_NAMES}). Parties trust only the CA and check each peer's party name.\n\n"
            "Several hosts -- no private key leaves its host:\n"
            "  1. CA host (agreed by the parties):  secfwt certs ca --out ca/\n"
            "  2. each party's host:                secfwt certs request --party NAME --out certs/ "
            "--hosts HOST...\n"
            "     (keeps certs/NAME-key.pem; send certs/NAME.csr to the CA)\n"
            "  3. CA host:                          secfwt certs sign --ca ca/ --csr NAME.csr --out NAME.pem\n"
            "     (send NAME.pem and ca/ca.pem back to the party, into its certs/)\n\n"
            "One machine only: secfwt certs local --out DIR (the older form 'secfwt certs --out DIR' does "
            "the same).\n" + _LOCAL_WARNING
        ),
    )
    # The older form `secfwt certs --out DIR [--hosts ...] [--days N]` = `secfwt certs local ...`.
    p.add_argument("--out", dest="legacy_out", metavar="DIR",
                   help="same as 'secfwt certs local --out DIR' (one machine / testing only)")
    p.add_argument("--hosts", dest="legacy_hosts", nargs="*", default=[], metavar="HOST",
                   help="with --out: extra SANs for every certificate")
    p.add_argument("--days", dest="legacy_days", type=int, default=DEFAULT_DAYS, metavar="N",
                   help="with --out: validity in days (default %(default)s)")
    p.set_defaults(func=run_legacy)
    sub = p.add_subparsers(dest="certs_command", metavar="{ca,request,sign,local}")

    ca = sub.add_parser("ca", help="make a new CA (ca.pem, ca-key.pem) on the CA's host",
                        description="Make a new CA: DIR/ca.pem (give it to every party) and DIR/ca-key.pem "
                                    "(mode 0600, stays on this host; never overwritten). DIR is created with "
                                    "mode 0700. The CA can issue a certificate for any party name, so the "
                                    "parties must agree on who runs it.")
    ca.add_argument("--out", required=True, metavar="DIR", help="CA directory (created with mode 0700)")
    _days_arg(ca)
    ca.set_defaults(func=run_ca)

    req = sub.add_parser("request", help="on a party's own host: its private key and a CSR for the CA",
                         description="Make this party's EC P-256 key DIR/NAME-key.pem (mode 0600, never "
                                     "leaves this host; never overwritten) and a certificate signing request "
                                     "DIR/NAME.csr (CN and a SAN = NAME) to send to the CA. Prints the public "
                                     "key's SHA-256 fingerprint: tell it to the CA so it can check the CSR.")
    req.add_argument("--party", required=True, metavar="NAME", help=f"this host's party name ({_NAMES})")
    req.add_argument("--out", required=True, metavar="DIR", help="directory for the key and CSR (mode 0700)")
    _hosts_arg(req, "the request")
    req.set_defaults(func=run_request)

    sign = sub.add_parser("sign", help="on the CA's host: sign a party's CSR into its certificate",
                          description="Check a CSR (its signature, that its CN is a party name, EC P-256 key, "
                                      "DNS/IP SANs only) and write the party's certificate (TLS client + server "
                                      "use, not a CA, SANs from the CSR). Other extensions in the CSR are "
                                      "ignored. Prints the party name, SANs and the public key fingerprint to "
                                      "compare with the one the party printed.")
    sign.add_argument("--ca", required=True, metavar="DIR", help="CA directory (ca.pem, ca-key.pem)")
    sign.add_argument("--csr", required=True, metavar="FILE", help="the party's CSR (NAME.csr)")
    sign.add_argument("--out", required=True, metavar="FILE", help="certificate file to write (NAME.pem)")
    _days_arg(sign)
    sign.set_defaults(func=run_sign)

    local = sub.add_parser("local", help="one machine / testing only: CA and every party's key in one place",
                           description=_LOCAL_WARNING + " Writes ca.pem, ca-key.pem, NAME.pem and NAME-key.pem "
                                       "for every party into DIR (mode 0700; keys 0600; replaces existing files).")
    local.add_argument("--out", required=True, metavar="DIR", help="output directory (created with mode 0700)")
    _hosts_arg(local, "every certificate")
    _days_arg(local)
    local.set_defaults(func=run_local)
    return p


def _local(out: str, hosts: list[str], days: int) -> int:
    files = write_party_certs(out, hosts=hosts, days=days)
    print("WARNING: " + _LOCAL_WARNING)
    for name, f in files.items():
        print(f"{name}: {f.cert} {f.key}")
    print(f"CA: {next(iter(files.values())).ca}")
    return 0


def run_legacy(args: argparse.Namespace) -> int:
    """``secfwt certs --out DIR``: the one-machine form; without --out, ask for a sub-command."""
    if args.legacy_out is None:
        raise ConfigError("choose a sub-command: ca, request, sign or local (see 'secfwt certs --help'), "
                          "or give --out DIR for a one-machine set-up")
    return _local(args.legacy_out, args.legacy_hosts, args.legacy_days)


def run_local(args: argparse.Namespace) -> int:
    return _local(args.out, args.hosts, args.days)


def run_ca(args: argparse.Namespace) -> int:
    cert, key = write_ca(args.out, days=args.days)
    print(f"CA certificate: {cert} (give it to every party)")
    print(f"CA private key: {key} (mode 0600; keep it on this host)")
    return 0


def run_request(args: argparse.Namespace) -> int:
    key, csr, fp = write_request(args.out, args.party, hosts=args.hosts)
    print(f"private key: {key} (mode 0600; never leaves this host)")
    print(f"request: {csr} (send it to the CA; it is not secret)")
    print(f"public key SHA-256: {fp} (tell the CA so it can check the request)")
    return 0


def run_sign(args: argparse.Namespace) -> int:
    cert = sign_request(args.ca, args.csr, args.out, days=args.days)
    name = cert.subject.rfc4514_string().removeprefix("CN=")
    print(f"signed: {args.out} for party '{name}' (SANs: {', '.join(cert_sans(cert))}; valid until "
          f"{cert.not_valid_after_utc:%Y-%m-%d})")
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)  # sign_request accepts EC P-256 keys only
    print(f"public key SHA-256: {public_key_fingerprint(pub)} (must match what {name} printed)")
    print(f"certificate SHA-256: {cert_fingerprint(cert)}")
    print(f"send {args.out} and the CA's ca.pem to {name}")
    return 0
