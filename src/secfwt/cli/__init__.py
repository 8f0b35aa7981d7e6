"""The ``secfwt`` command line. Each sub-command lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

from secfwt.errors import SecfwtError

# (module, sub-command): each module defines ``add_parser(subparsers)`` that sets ``func`` on its parser.
_COMMANDS = [
    ("secfwt.cli.certs_cmd", "certs"),
    ("secfwt.cli.party_cmd", "party"),
    ("secfwt.cli.share_cmd", "share-model"),
    ("secfwt.cli.tune_cmd", "tune"),
    ("secfwt.cli.predict_cmd", "predict"),
    ("secfwt.cli.demo_cmd", "demo"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secfwt", description="Private forward-only tuning with two-server MPC")
    sub = parser.add_subparsers(dest="command", required=True)
    for module, _name in _COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SecfwtError as e:
        print(f"secfwt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"secfwt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
