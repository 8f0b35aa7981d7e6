"""``secfwt party``: run one party (server0, server1, dealer or owner) of a multi-process run over TLS.

Also runnable as ``python -m secfwt.cli.party_cmd ARGS`` (same arguments and exit codes), which is how
:mod:`secfwt.launch` starts parties: it does not import the other sub-commands.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any

from secfwt.comm.base import PARTY_NAMES
from secfwt.errors import ConfigError, SecfwtError
from secfwt.launch import run_party_process


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``party`` on the ``secfwt`` sub-command parser."""
    p = subparsers.add_parser(
        "party", help="run one party over TLS",
        description="Run one party of a multi-process run: connect to the other parties named in the parties "
                    "file (mutually authenticated TLS 1.3) and run the program.",
    )
    p.add_argument("--config", required=True, help="parties file (TOML)")
    p.add_argument("--role", required=True, choices=list(PARTY_NAMES.values()))
    p.add_argument("--program", default=None, help="module:function called with the party context "
                                                   "(not needed for the dealer)")
    p.add_argument("--shares", default=None,
                   help="servers: this server's share file, encoder (`secfwt share-model`) or decoder (runs the "
                        "model service its format names; replaces --program)")
    p.add_argument("--out", default=None, help="save the result here (torch.save) and the costs next to it")
    p.add_argument("--parties", default=None,
                   help="comma-separated parties of this run (default: all parties of the file)")
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)
    return p


def _exit_with_parent() -> None:
    """Exit at once when the launching process dies (a daemon thread polling the parent pid)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="secfwt-parent-watch", daemon=True).start()


def run(args: argparse.Namespace) -> int:
    if args.exit_with_parent:
        _exit_with_parent()
    parties = args.parties.split(",") if args.parties else None
    program = args.program
    if args.shares:
        if args.role not in ("server0", "server1"):
            raise ConfigError(f"--shares is for server0 and server1, not {args.role}")
        os.environ["SECFWT_SHARE_FILE"] = str(args.shares)
        program = "secfwt.serve.entry:serve_from_env"
    if args.role == "owner" and program is None:
        raise ConfigError(f"the data owner runs `secfwt tune --parties {args.config}` or `secfwt predict --parties "
                          f"{args.config}` (or give --program module:function)")
    run_party_process(args.config, args.role, program, out=args.out, parties=parties)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``secfwt party`` without the other sub-commands: exit code 2 and a one-line error on SecfwtError."""
    parser = argparse.ArgumentParser(prog="secfwt")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["party", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except SecfwtError as e:
        print(f"secfwt party: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("secfwt party: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
