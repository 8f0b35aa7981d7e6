"""``secfwt demo``: private forward-only tuning of the bundled MiniLM on the embedded sentiment task.

Two servers and a dealer run as separate OS processes talking TLS on loopback; this process is the data
owner. Settings are scaled down so it finishes within a few minutes on 2 cores (see README for the numbers).
glibc's malloc is set up for less page-fault churn in this process and the party processes (:mod:`secfwt.alloc`).
"""

from __future__ import annotations

import argparse
from typing import Any

from secfwt.alloc import configure_malloc
from secfwt.cli import tune_cmd
from secfwt.cli.tune_cmd import add_arguments

DEMO_DEFAULTS = {
    "task": "demo", "k": 2, "d": 20, "n_prompt": 2, "popsize": 4, "iterations": 3, "max_length": 20,
    "attention": "softmax", "parties": "local", "report": "runs/demo/report.json", "plot": "runs/demo/history.png",
    "save_prompt": "runs/demo/prompt.safetensors",
    "patience": 0,
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="tune the bundled model privately on an embedded task (a few minutes)")
    add_arguments(p)
    tune_cmd.add_mpc_arguments(p)
    for action in p._actions:
        if action.dest == "task":
            action.required = False
    p.set_defaults(func=execute, **DEMO_DEFAULTS)
    return p


def execute(a: argparse.Namespace) -> int:
    """``secfwt tune`` with the demo's defaults, after the malloc set-up of this process."""
    configure_malloc()
    return tune_cmd.execute(a)
