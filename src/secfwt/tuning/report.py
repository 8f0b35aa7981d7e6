"""Reports of a tuning run: the JSON summary, a rich table and a loss/accuracy plot (files mode 0600: they hold
the owner's results, see :mod:`secfwt.files`)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from secfwt.cost import LAN, WAN
from secfwt.files import write_private
from secfwt.tuning.fot import IterRecord, TuneResult

REPORT_KEYS = (
    "task", "model", "attention", "mode", "k", "seed", "iterations", "accuracy", "zero_shot_accuracy",
    "time_s", "bytes_per_server", "rounds", "n_eval",
)


def report_dict(result: TuneResult) -> dict[str, Any]:
    """The JSON report: exactly :data:`REPORT_KEYS`. Plaintext runs report 0 bytes and 0 rounds."""
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
