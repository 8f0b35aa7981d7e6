"""``secfwt certs``: create a CA and one TLS certificate + key per party."""

from __future__ import annotations

import argparse
from typing import Any

from secfwt.comm.base import PARTY_NAMES
from secfwt.comm.certs import DEFAULT_DAYS, write_party_certs


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``certs`` on the ``secfwt`` sub-command parser."""
    p = subparsers.add_parser(
        "certs", help="create a CA and per-party TLS certificates",
        description="Create a private CA and a certificate + key (EC P-256) for each party "
                    f"({', '.join(PARTY_NAMES.values())}). CN and a SAN are the party name; localhost and "
                    "127.0.0.1 are always included as SANs.",
    )
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--hosts", nargs="*", default=[], metavar="HOST",
                   help="extra host names or IP addresses to add as SANs to every certificate")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity in days (default %(default)s)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Write the files and list them; private keys are created with mode 0600."""
    files = write_party_certs(args.out, hosts=args.hosts, days=args.days)
    for name, f in files.items():
        print(f"{name}: {f.cert} {f.key}")
    print(f"CA: {next(iter(files.values())).ca} (keep ca-key.pem offline)")
    return 0
