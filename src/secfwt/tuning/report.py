"""Reports of a tuning run: the JSON summary, a rich table and a loss/accuracy plot (files mode 0600: they hold
the owner's results, see :mod:`secfwt.files`)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from secfwt.comm.base import SERVER1
from secfwt.cost import LAN, WAN, CostTracker, cpu_model, offline_online
from secfwt.files import write_private
from secfwt.tuning.fot import IterRecord, TuneResult

REPORT_KEYS = (
    "task", "model", "attention", "mode", "k", "seed", "iterations", "accuracy", "zero_shot_accuracy",
    "time_s", "bytes_per_server", "rounds", "n_eval",
)
# Added after REPORT_KEYS when the servers' cost ledgers are given (secfwt.cost.offline_online): the run's wall
# time less server 1's waits for the dealer, those waits, the dealer's generation time (None: the owner does
# not get the dealer's ledger), the bytes the dealer sent, and this host's CPU model.
SPLIT_KEYS = ("online_time_s", "dealer_wait_s", "offline_time_s", "offline_bytes", "cpu")


def split_dict(costs: dict[int, dict[str, Any]], time_s: float) -> dict[str, Any]:
    """:data:`SPLIT_KEYS` of a run from the servers' cost ledgers (as dicts, keyed by rank)."""
    s1 = CostTracker.from_dict(costs[SERVER1]).total() if SERVER1 in costs else CostTracker().total()
    split = offline_online(time_s, s1)
    out: dict[str, Any] = {k: split[k] for k in SPLIT_KEYS[:-1]}
    out["online_time_s"] = round(float(out["online_time_s"] or 0.0), 3)
    out["dealer_wait_s"] = round(float(out["dealer_wait_s"] or 0.0), 3)
    out["cpu"] = cpu_model()
    return out


def report_dict(result: TuneResult, costs: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The JSON report: :data:`REPORT_KEYS`, then :data:`SPLIT_KEYS` when the servers' cost ledgers ``costs``
    are given (an MPC run). Plaintext runs report 0 bytes and 0 rounds."""
    cost = result.cost
    out: dict[str, Any] = {
        "task": result.task,
        "model": result.model,
        "attention": result.attention,
        "mode": result.mode,
        "k": result.k,
        "seed": result.seed,
        "iterations": result.iterations,
        "accuracy": result.accuracy,
        "zero_shot_accuracy": result.zero_shot_accuracy,
        "time_s": round(result.time_s, 3),
        "bytes_per_server": cost.bytes_per_server if cost is not None else 0,
        "rounds": cost.rounds if cost is not None else 0,
        "n_eval": result.n_eval,
    }
    assert tuple(out) == REPORT_KEYS
    if costs:
        out.update(split_dict(costs, result.time_s))
    return out


def write_report(result: TuneResult, path: str | Path) -> Path:
    """Write the JSON report atomically (mode 0600); returns its path."""
    return write_private(path, json.dumps(report_dict(result), indent=2) + "\n")


def summary_table(result: TuneResult) -> Table:
    """Accuracy vs zero-shot, time, and the evaluator's cost with LAN/WAN projections when it reports one."""
    t = Table(title=f"{result.task} | {result.model} | {result.mode} ({result.attention})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row(f"accuracy ({result.eval_split}, n={result.n_eval})", f"{result.accuracy:.4f}")
    t.add_row("zero-shot accuracy (template only)", f"{result.zero_shot_accuracy:.4f}")
    t.add_row("best dev accuracy / zero-shot dev", f"{result.dev_accuracy:.4f} / {result.zero_shot_dev_accuracy:.4f}")
    t.add_row("prompt used", "yes" if result.used_prompt else "no (zero-shot floor)")
    t.add_row("iterations / API calls", f"{result.iterations} / {result.calls}")
    t.add_row("stopped by", result.stop_reason)
    t.add_row("time", f"{result.time_s:.1f} s")
    cost = result.cost
    if cost is not None:
        t.add_row("forward calls", str(cost.forward_calls))
        t.add_row("bytes per server", f"{cost.bytes_per_server / 2**20:.1f} MiB")
        t.add_row("rounds", str(cost.rounds))
        for link in (LAN, WAN):
            proj = link.project(cost.compute_s, cost.bytes_per_server, cost.rounds)
            t.add_row(f"projected time on {link.name}", f"{proj:.1f} s")
    return t


def split_table(costs: dict[int, dict[str, Any]], time_s: float) -> Table:
    """Offline (dealer) and online (servers) of the whole run, from the servers' cost ledgers."""
    d = split_dict(costs, time_s)
    t = Table(title=f"offline / online (whole run; {d['cpu']})")
    t.add_column("phase")
    t.add_column("value", justify="right")
    t.add_row("offline: dealer -> server1", f"{d['offline_bytes'] / 1e6:.1f} MB")
    t.add_row("offline: server1 waiting for the dealer", f"{d['dealer_wait_s']:.1f} s")
    t.add_row("online: wall time less those waits", f"{d['online_time_s']:.1f} s (wall {time_s:.1f} s)")
    return t


def print_summary(result: TuneResult, console: Console | None = None) -> None:
    (console or Console()).print(summary_table(result))


def plot_history(history: list[IterRecord], path: str | Path, title: str = "") -> Path:
    """Plot train loss (min/mean of the population) and train/dev accuracy per iteration to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    it = [h.iteration for h in history]
    fig = Figure(figsize=(10, 3.8))  # Agg canvas, no pyplot global state
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(it, [h.loss_min for h in history], label="population min")
    ax_loss.plot(it, [h.loss_mean for h in history], label="population mean", alpha=0.6)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("train loss")
    ax_loss.legend()
    ax_acc.plot(it, [h.train_acc for h in history], label="train (best candidate)", alpha=0.6)
    dev = [(h.iteration, h.dev_acc) for h in history if h.dev_acc is not None]
    if dev:
        ax_acc.plot([d[0] for d in dev], [d[1] for d in dev], label="dev", marker=".")
    ax_acc.set_xlabel("iteration")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    return write_private(path, buf.getvalue())
