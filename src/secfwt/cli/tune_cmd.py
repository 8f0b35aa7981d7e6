"""``secfwt tune``: forward-only tuning of a soft prompt, privately (MPC) or in the clear."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from secfwt.cost import LAN, WAN, CostTracker
from secfwt.tuning.fot import TuneResult
from secfwt.tuning.report import plot_history, print_summary, report_dict
from secfwt.tuning.run import add_arguments, config_from_args
from secfwt.tuning.runner import RunSpec, run


def add_mpc_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="local model directory (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--mode", choices=("mpc", "plaintext"), default="mpc")
    p.add_argument("--attention", choices=("softmax", "rfa", "2quad", "relu", "power"), default="softmax")
    p.add_argument("--rfa-features", type=int, default=64, help="RFA: number of random frequencies")
    p.add_argument("--rfa-seed", type=int, default=0, help="RFA: public seed of the random frequencies")
    p.add_argument("--embedding", choices=("local", "private"), default="local",
                   help="local: the data owner embeds with the disclosed word table; private: one-hot under MPC")
    p.add_argument("--head", choices=("auto", "mlm", "similarity"), default="auto")
    p.add_argument("--max-length", type=int, default=64, help="tokens per input including the soft prompt")
    p.add_argument("--max-rows", type=int, default=64, help="sequences per MPC forward chunk (memory bound)")
    p.add_argument("--parties", default="inprocess",
                   help="inprocess (threads), local (one process per party over TLS on loopback), or a parties "
                        "TOML file whose servers and dealer run `secfwt party` on their hosts")
    p.add_argument("--shares-dir", default=None, help="model share files (default: made once and cached)")
    p.add_argument("--frac-bits", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a party waits for a message")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--plot", default=None, help="write the loss/accuracy plot here (PNG)")


def spec_from_args(a: argparse.Namespace) -> RunSpec:
    cfg = config_from_args(a)
    import dataclasses

    return RunSpec(
        task=a.task, model=a.model, mode=a.mode,
        attention={"kind": a.attention, "n_features": a.rfa_features, "seed": a.rfa_seed},
        embedding=a.embedding, head=a.head, k=a.k, seed=a.seed, data_root=a.data_root, max_eval=a.max_eval,
        max_length=a.max_length, max_rows=a.max_rows, tune=dataclasses.asdict(cfg), shares_dir=a.shares_dir,
        checkpoint_dir=a.checkpoint_dir, frac_bits=a.frac_bits, timeout=a.timeout, progress=not a.quiet,
    )


def cost_table(costs: dict[int, dict[str, Any]], time_s: float) -> Table:
    """Per-server totals with LAN/WAN projections, and the top operations by bytes."""
    t = Table(title="MPC cost per server (whole run)")
    for col in ("server", "MB sent", "MB recv", "rounds", "dealer MB", "wall s", "LAN s", "WAN s"):
        t.add_column(col, justify="right")
    for rank, d in sorted(costs.items()):
        c = CostTracker.from_dict(d).total()
        t.add_row(f"server{rank}", f"{c.bytes_sent / 1e6:.1f}", f"{c.bytes_recv / 1e6:.1f}", str(c.rounds),
                  f"{c.dealer_bytes / 1e6:.1f}", f"{time_s:.1f}", f"{LAN.project(time_s, c.bytes_sent, c.rounds):.1f}",
                  f"{WAN.project(time_s, c.bytes_sent, c.rounds):.1f}")
    return t


def op_table(costs: dict[int, dict[str, Any]]) -> Table:
    t = Table(title="server0 cost by operation")
    for col in ("op", "MB sent", "rounds", "time s"):
        t.add_column(col, justify="right")
    ops = CostTracker.from_dict(costs[min(costs)]).by_top_level()
    for name, c in sorted(ops.items(), key=lambda kv: -kv[1].bytes_sent)[:10]:
        t.add_row(name, f"{c.bytes_sent / 1e6:.1f}", str(c.rounds), f"{c.time_s:.1f}")
    return t


def execute(a: argparse.Namespace, console: Console | None = None) -> int:
    """The sub-command: run, print tables, write report and plot. Exit code 0."""
    tune_and_report(a, console)
    return 0


def tune_and_report(a: argparse.Namespace, console: Console | None = None) -> TuneResult:
    console = console or Console()
    spec = spec_from_args(a)
    where = f", parties: {a.parties}" if spec.mode == "mpc" else ""
    console.print(f"[bold]secfwt tune[/] task={spec.task} mode={spec.mode} attention={a.attention}{where}")
    result, costs = run(spec, parties=a.parties)
    print_summary(result, console)
    if costs:
        console.print(cost_table(costs, result.time_s))
        console.print(op_table(costs))
    if a.report:
        rep = report_dict(result)
        if spec.mode == "mpc":
            rep["attention"] = a.attention
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.report).write_text(json.dumps(rep, indent=2) + "\n")
        console.print(f"report: {a.report}")
    plot = a.plot or (str(Path(a.out) / "history.png") if a.out else None)
    if plot:
        plot_history(result.history, plot, title=f"{result.task} / {result.model} ({result.mode})")
        console.print(f"plot:   {plot}")
    return result


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tune", help="tune a soft prompt (forward-only, CMA-ES), privately or in the clear",
                              description="Forward-only prompt tuning (SecFwT): the data owner runs CMA-ES; the "
                                          "servers run every forward pass on secret shares.")
    add_arguments(p)
    add_mpc_arguments(p)
    p.set_defaults(func=execute)
    return p
