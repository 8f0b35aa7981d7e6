"""SST-2 few-shot tuning, side by side: private (MPC, softmax and RFA attention) and in the clear.

Run:  python benchmarks/sst2_tuning.py [--runs plaintext,mpc-softmax,mpc-rfa] [--parties local]
                                      [--k 16] [--iterations 2] [--popsize 4] [--max-eval 32] [--out ...]
                                      [--checkpoint-dir DIR]   (resumes each run from DIR/<run>)

Every run uses the same task split (LM-BFF SST-2 ``16-<seed>``; evaluation on the 872-example GLUE dev set,
subsampled to ``--max-eval`` with a fixed seed), the same CMA-ES seed, the bundled all-MiniLM-L6-v2 (similarity
head) unless ``--model`` says otherwise, and the same tuning settings; only the engine and the attention differ.
With ``--parties local`` the two servers and the dealer are separate processes talking TLS on loopback.

Printed and written (``--out`` JSON, and the same table as markdown next to it): test and zero-shot accuracy,
best dev accuracy, wall time, bytes and rounds per server, per-forward costs (one forward = one candidate
prompt on one example), and the LAN/WAN projection of the run (``secfwt.cost``). The data owner's zero-shot
floor is measured by each run with its own engine. Settings are scaled down from BBT's (8000 calls,
population 20, 50 prompt tokens) so the private runs fit a 2-core machine; the per-forward figures project them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from secfwt.cost import LAN, WAN, cpu_model
from secfwt.tuning import checkpoint
from secfwt.tuning.report import report_dict
from secfwt.tuning.runner import RunSpec, run

RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "plaintext": ("plaintext", {"kind": "softmax"}),
    "mpc-softmax": ("mpc", {"kind": "softmax"}),
    "mpc-rfa": ("mpc", {"kind": "rfa", "n_features": 64, "seed": 0}),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="plaintext,mpc-softmax,mpc-rfa", help=f"comma list of {sorted(RUNS)}")
    p.add_argument("--task", default="sst2")
    p.add_argument("--model", default="", help="model directory (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--parties", default="local", help="inprocess | local | parties TOML")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--seed", type=int, default=13, help="data seed (LM-BFF split 16-<seed>)")
    p.add_argument("--tune-seed", type=int, default=2)
    p.add_argument("--d", type=int, default=50)
    p.add_argument("--n-prompt", type=int, default=5)
    p.add_argument("--popsize", type=int, default=4)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--train-batch", type=int, default=8, help="train examples per iteration (seeded minibatch)")
    p.add_argument("--eval-every", type=int, default=None, help="dev evaluation cadence (default: last iteration)")
    p.add_argument("--max-eval", type=int, default=32)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--max-rows", type=int, default=64)
    p.add_argument("--prompt-position", default="start", help="decoders: start | after-text (prefix cache)")
    p.add_argument("--init-text", default=None, help="p0: this phrase's token embeddings (--n-prompt = its tokens)")
    p.add_argument("--alpha", type=float, default=1.0, help="projection scale (BBT's alpha)")
    p.add_argument("--sigma", type=float, default=1.0, help="CMA-ES initial step size")
    p.add_argument("--checkpoint-dir", default=None,
                   help="save each run's loop state under DIR/<run> and resume from it (a run may span sessions)")
    p.add_argument("--checkpoint-every", type=int, default=1, help="iterations between checkpoints")
    p.add_argument("--out", default="benchmarks/results/sst2_tuning.json")
    return p.parse_args(argv)


def spec_for(a: argparse.Namespace, name: str) -> RunSpec:
    mode, attention = RUNS[name]
    tune = {"d": a.d, "n_prompt": a.n_prompt, "popsize": a.popsize, "iterations": a.iterations,
            "train_batch": a.train_batch, "eval_every": a.eval_every or a.iterations, "patience": None,
            "seed": a.tune_seed, "alpha": a.alpha, "sigma": a.sigma, "checkpoint_every": a.checkpoint_every}
    if a.init_text:
        tune.update(init="text", init_text=a.init_text)
    return RunSpec(task=a.task, model=a.model, mode=mode, attention=dict(attention), k=a.k, seed=a.seed,
                   data_root=a.data_root, max_eval=a.max_eval, max_length=a.max_length, max_rows=a.max_rows,
                   prompt_position=a.prompt_position, tune=tune, progress=False, timeout=600,
                   checkpoint_dir=str((Path(a.checkpoint_dir) / name).resolve()) if a.checkpoint_dir else None)


def row_for(name: str, spec: RunSpec, parties: str) -> dict[str, Any]:
    state = checkpoint.load(Path(spec.checkpoint_dir)) if spec.checkpoint_dir else None
    resumed_at = int(state["iteration"]) if state is not None else 0  # earlier sessions' generations
    start = time.perf_counter()
    result, _ = run(spec, parties=parties if spec.mode == "mpc" else "inprocess")
    wall = time.perf_counter() - start
    rep = report_dict(result)
    rep["attention"] = spec.attention["kind"]
    cost = result.cost
    mpc = cost is not None and spec.mode == "mpc"
    forwards = _forwards(result, spec)
    rep.update({
        "run": name, "parties": parties if spec.mode == "mpc" else "-", "wall_s": round(wall, 1),  # this session
        "resumed_at_iteration": resumed_at,
        "dev_accuracy": result.dev_accuracy, "zero_shot_dev_accuracy": result.zero_shot_dev_accuracy,
        "used_prompt": result.used_prompt, "forwards": forwards,
        "s_per_forward": round(result.time_s / forwards, 4),
        "bytes_per_forward": int(rep["bytes_per_server"] / forwards),
        "lan_s": round(LAN.project(cost.compute_s, cost.bytes_per_server, cost.rounds), 1) if mpc else None,
        "wan_s": round(WAN.project(cost.compute_s, cost.bytes_per_server, cost.rounds), 1) if mpc else None,
        "best_z": [float(v) for v in result.best_z], "prompt_accuracy": result.prompt_accuracy,
        "history": [{"iteration": h.iteration, "loss_min": h.loss_min, "loss_mean": h.loss_mean,
                     "dev_acc": h.dev_acc, "dev_loss": h.dev_loss} for h in result.history],
    })
    return rep


def oracle_check(private: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    """How a private run compares with its plaintext oracle (same seeds and settings): whether it selected the
    same prompt (CMA-ES draws the same candidates only while every generation's ranking agrees, so the selected
    z is then bit-identical), the same accuracies, and the largest difference of the per-iteration losses."""
    hp, hq = private["history"], plain["history"]
    diffs = [abs(a[k] - b[k]) for a, b in zip(hp, hq, strict=False) for k in ("loss_min", "loss_mean")]
    diffs += [abs(a["dev_loss"] - b["dev_loss"]) for a, b in zip(hp, hq, strict=False)
              if a["dev_loss"] is not None and b["dev_loss"] is not None]
    return {
        "same_prompt": private["best_z"] == plain["best_z"] and private["used_prompt"] == plain["used_prompt"],
        "same_accuracies": all(private[k] == plain[k] for k in
                               ("accuracy", "zero_shot_accuracy", "dev_accuracy", "zero_shot_dev_accuracy")),
        "max_loss_diff": max(diffs, default=0.0),
        "same_iterations": len(hp) == len(hq),
    }


def _forwards(result: Any, spec: RunSpec) -> int:
    """Sequence forwards of the run: train candidates, dev checks, and the zero-shot and final evaluations."""
    t = spec.tune_config()
    dev = 2 * spec.k
    train = t.train_batch or 2 * spec.k
    dev_checks = sum(1 for h in result.history if h.dev_acc is not None)
    # the evaluation split is scored with and without the prompt whichever is used (the floor's choice is private)
    return result.calls * train + (dev_checks + 1) * dev + 2 * result.n_eval


def table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="forward-only tuning: private vs in the clear")
    cols = ("run", "test acc", "zero-shot", "dev / zs dev", "time s", "MB / server", "rounds", "forwards",
            "s / fwd", "MB / fwd", "LAN s", "WAN s")
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(
            r["run"], f"{r['accuracy']:.3f}", f"{r['zero_shot_accuracy']:.3f}",
            f"{r['dev_accuracy']:.3f} / {r['zero_shot_dev_accuracy']:.3f}", f"{r['time_s']:.0f}",
            f"{r['bytes_per_server'] / 1e6:.0f}", str(r["rounds"]), str(r["forwards"]), f"{r['s_per_forward']:.3f}",
            f"{r['bytes_per_forward'] / 1e6:.1f}", "-" if r["lan_s"] is None else f"{r['lan_s']:.0f}",
            "-" if r["wan_s"] is None else f"{r['wan_s']:.0f}",
        )
    return t


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = [f"{header['task']} ({header['settings']}); {header['date']}, {header['machine']}.", "",
             "| run | test acc | zero-shot | dev / zero-shot dev | time s | MB / server | rounds | forwards | s / fwd "
             "| MB / fwd | LAN s | WAN s |", "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['accuracy']:.3f} | {r['zero_shot_accuracy']:.3f} | {r['dev_accuracy']:.3f} / "
            f"{r['zero_shot_dev_accuracy']:.3f} | {r['time_s']:.0f} | {r['bytes_per_server'] / 1e6:.0f} | "
            f"{r['rounds']} | {r['forwards']} | {r['s_per_forward']:.3f} | {r['bytes_per_forward'] / 1e6:.1f} | "
            f"{'-' if r['lan_s'] is None else round(r['lan_s'])} | {'-' if r['wan_s'] is None else round(r['wan_s'])} |"
        )
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    commit = _commit()  # at the start: the party processes import the code as it is now
    names = [n.strip() for n in a.runs.split(",") if n.strip()]
    bad = [n for n in names if n not in RUNS]
    if bad:
        print(f"sst2_tuning: unknown run {bad[0]!r} (known: {', '.join(RUNS)})", file=sys.stderr)
        return 2
    console = Console()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        console.print(f"[bold]{name}[/] ...")
        rows.append(row_for(name, spec_for(a, name), a.parties))
        console.print(table(rows))
        header = {
            "task": a.task, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(),
            "commit": commit, "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
            f"load average {os.getloadavg()[0]:.1f}",
            "settings": f"{a.model or 'all-MiniLM-L6-v2'}, k={a.k} per class, data seed {a.seed}, d={a.d}, "
                        f"{a.n_prompt} prompt tokens, population {a.popsize}, {a.iterations} iterations, train "
                        f"minibatch {a.train_batch}, {rows[0]['n_eval']} test examples, parties {a.parties}"
                        + (f", prompt position {a.prompt_position}" if a.prompt_position != "start" else "")
                        + (f", init text {a.init_text!r}" if a.init_text else "")
                        + (f", alpha {a.alpha}" if a.alpha != 1.0 else ""),
            "command": "python benchmarks/sst2_tuning.py " + " ".join(sys.argv[1:] if argv is None else argv),
        }
        plain = next((r for r in rows if r["run"] == "plaintext"), None)
        for r in rows:
            if plain is not None and r["mode"] == "mpc" and r["attention"] == plain["attention"]:
                r["oracle"] = oracle_check(r, plain)
                console.print(f"{r['run']} vs plaintext: {r['oracle']}")
        out.write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")  # after every run: partial results
        out.with_suffix(".md").write_text(markdown(rows, header))
    console.print(f"results: {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
