"""``secfwt party``: run one party (server0, server1, dealer or owner) over TLS.

Servers (``--shares``) and the dealer run as long-running services (:mod:`secfwt.service`): they serve data-owner
sessions one after another until SIGTERM/SIGINT. With ``--program`` or ``--out`` (or ``--once``) a party runs
one session and exits: how :mod:`secfwt.launch` runs the parties of ``--parties local`` and of tests.

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
        description="Run one party over mutually authenticated TLS 1.3 with the parties named in the parties "
                    "file. Servers (--shares FILE) and the dealer serve data-owner sessions one after another "
                    "until SIGTERM/SIGINT (exit code 0); --program/--out/--once run a single session.",
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
    p.add_argument("--once", action="store_true", help="serve one session, then exit (default for --program)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of this party (services: default 1, as --parties local uses, so that parties "
                        "on one host do not compete for its cores; single sessions: torch's default)")
    p.add_argument("--log-file", default=None, help="services: also append the log here (created 0600)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
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
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads: expected an integer >= 1, got {args.threads}")
    parties = args.parties.split(",") if args.parties else None
    program = args.program
    if args.shares and args.role not in ("server0", "server1"):
        raise ConfigError(f"--shares is for server0 and server1, not {args.role}")
    if args.role != "owner" and not (program or args.out or args.once or parties):
        from secfwt.service import run_service

        return run_service(args.config, args.role, args.shares, args.threads or 1, args.log_file, args.log_level)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.shares:
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
