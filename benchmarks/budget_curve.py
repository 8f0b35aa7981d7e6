"""Accuracy per private forward: test accuracy against the sequence forwards a tuning run spends (issue 17).

Run:  python benchmarks/budget_curve.py [--tasks sst2,mr,agnews,rte] [--seeds 13,42,100]
                                        [--strategies bbt,pop6,minibatch8,text-init,tokens5,spsa]
                                        [--max-forwards 25600] [--max-eval 500] [--out benchmarks/results/budget_curve]

Everything runs in the clear (float32, HuggingFace forward): a private run takes exactly the plaintext run's path
(tested: same candidates, same selected prompt), so its accuracy per forward is this curve, and its cost is the
forward count times the measured cost of one private forward. A *sequence forward* is one candidate prompt on one
example: a generation costs popsize x batch, a dev evaluation len(dev), the zero-shot dev floor len(dev) once.
Test evaluations are the measurement, not part of the budget. At every budget point of a log grid the best prompt
on dev so far (with the zero-shot floor: the template when no prompt beat it on dev) is scored on the test split.

Strategies (all on top of the run's defaults: k = 16, ce loss, dev every generation, no early stopping):
  bbt         BBT's defaults: d 500, 50 prompt tokens, population 20, the whole train set per generation
  pop6        population 6 (d 500, 50 tokens)
  minibatch8  population 6, seeded train minibatches of 8
  text-init   population 6, minibatch 8, p0 = the task's template words as text, alpha 0.5
  tokens5     population 6, minibatch 8, 5 prompt tokens, d 50
  spsa        zeroth-order Adam (two-point estimates, population 6 = 3 pairs), minibatch 8, 5 tokens, d 50
The model is the bundled all-MiniLM-L6-v2 (similarity head) unless --model names another (e.g. smollm2).
Writes ``<out>.json`` (every point) and ``<out>.png`` (accuracy vs forwards, log x, one line per strategy, the
band spans the seeds), and prints the gain each strategy reaches within 2,560 forwards (1% of BBT's budget) as a
fraction of the gain of the longest budget run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secfwt.tuning.data import load_task_data
from secfwt.tuning.fot import IterRecord, TuneConfig, make_projection, tune
from secfwt.tuning.objective import Batch, accuracy
from secfwt.tuning.runner import RunSpec, run_job
from secfwt.tuning.tasks import get_task

ONE_PERCENT = 2560  # 1% of BBT's 8,000 calls x 32 examples

STRATEGIES: dict[str, dict[str, Any]] = {
    "bbt": {"d": 500, "n_prompt": 50, "popsize": 20},
    "pop6": {"d": 500, "n_prompt": 50, "popsize": 6},
    "minibatch8": {"d": 500, "n_prompt": 50, "popsize": 6, "train_batch": 8},
    "text-init": {"d": 500, "popsize": 6, "train_batch": 8, "init": "text", "alpha": 0.5},
    "tokens5": {"d": 50, "n_prompt": 5, "popsize": 6, "train_batch": 8},
    "spsa": {"d": 50, "n_prompt": 5, "popsize": 6, "train_batch": 8, "optimizer": "spsa"},
}


def grid(max_forwards: int) -> list[int]:
    """Budget points: powers of two from 64, and 2,560 (1% of BBT's budget), up to ``max_forwards``."""
    pts = {ONE_PERCENT} | {2**i for i in range(6, 40) if 2**i <= max_forwards}
    return sorted(p for p in pts if p <= max_forwards)


def _template_text(task_template: str, n_tokens: int) -> str:
    words = [w for w in task_template.replace("{text}", " ").replace("{mask}", " ").split() if w.isalpha()]
    return " ".join((words * n_tokens)[:n_tokens]) or "review"


def run_one(ev: Any, data: Any, strategy: str, seed: int, max_forwards: int,
            zero_shot: tuple[float, float]) -> list[dict]:
    """One tuning run in the clear; the test accuracy of the best-on-dev prompt at each budget point."""
    fields = dict(STRATEGIES[strategy])
    if fields.get("init") == "text":
        tok = ev.tokenizer
        n = int(fields.get("n_prompt", 50))
        text = _template_text(data.task.similarity_template if ev.head == "similarity" else data.task.template, n)
        fields["init_text"] = text
        fields["n_prompt"] = len(tok(text, add_special_tokens=False)["input_ids"])
    base = TuneConfig(**fields, seed=seed, patience=None, eval_every=1, zero_shot_floor=True)
    per_gen = base.popsize * min(base.train_batch or len(data.train), len(data.train)) + len(data.dev)
    iterations = max(1, (max_forwards - len(data.dev)) // per_gen)
    cfg = dataclasses.replace(base, iterations=iterations)
    proj = make_projection(ev, cfg)
    test = Batch.of(data.eval_split, data.eval)
    points = grid(max_forwards)
    out: list[dict] = []
    state = {"next": 0, "spent": len(data.dev)}  # the zero-shot dev floor

    def score(z: np.ndarray | None, best_dev: float) -> float:
        if z is None or best_dev < zero_shot[0]:
            return zero_shot[1]
        return float(accuracy(ev.logits(proj(z[None]), test), test.labels)[0])

    best = {"dev": -1.0}

    def observe(rec: IterRecord, z: np.ndarray | None) -> None:
        state["spent"] += per_gen
        if rec.dev_acc is not None:
            best["dev"] = max(best["dev"], rec.dev_acc)
        while state["next"] < len(points) and state["spent"] >= points[state["next"]]:
            # the point is reached within this generation: what was selected before it is what that budget buys
            out.append({"forwards": points[state["next"]], "test_acc": score(z, best["dev"]),
                        "best_dev": best["dev"], "iteration": rec.iteration})
            state["next"] += 1

    tune(ev, data, cfg, progress=False, observe=observe)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="sst2,mr,agnews,rte")
    p.add_argument("--seeds", default="13,42,100")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--model", default="")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--max-forwards", type=int, default=25600)
    p.add_argument("--max-eval", type=int, default=500, help="seeded test subsample per task")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="benchmarks/results/budget_curve")
    a = p.parse_args(argv)
    unknown = [s for s in a.strategies.split(",") if s not in STRATEGIES]
    if unknown:
        p.error(f"--strategies: unknown {unknown[0]!r} (known: {', '.join(STRATEGIES)})")
    from secfwt.alloc import configure_malloc

    configure_malloc()  # the many differently shaped plaintext forwards churn glibc's heap (half the CPU in the kernel)
    rows: list[dict] = []
    start = time.time()
    out = Path(a.out)
    for task_name in a.tasks.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            data = load_task_data(get_task(task_name), a.data_root, k=a.k, seed=seed, max_eval=a.max_eval)
            spec = RunSpec(task=task_name, model=a.model, mode="plaintext", k=a.k, seed=seed,
                           max_length=a.max_length, progress=False)

            def job(ev: Any, data: Any = data, task_name: str = task_name, seed: int = seed) -> None:
                empty = torch.zeros(1, 0, ev.hidden_size)
                dev, test = Batch.of("dev", data.dev), Batch.of(data.eval_split, data.eval)
                zs = (float(accuracy(ev.logits(empty, dev), dev.labels)[0]),
                      float(accuracy(ev.logits(empty, test), test.labels)[0]))
                for strategy in a.strategies.split(","):
                    t0 = time.time()
                    pts = run_one(ev, data, strategy, seed, a.max_forwards, zs)
                    for pt in pts:
                        rows.append({"task": task_name, "seed": seed, "strategy": strategy, "template_test": zs[1],
                                     "template_dev": zs[0], "n_test": len(data.eval), **pt})
                    save(out, rows, meta(a, argv, start))  # after every run: a long sweep keeps what it measured
                    last = pts[-1] if pts else {}
                    print(f"{task_name} seed {seed} {strategy}: template {zs[1]:.3f} -> {last.get('test_acc', 0):.3f} "
                          f"at {last.get('forwards', 0)} forwards ({time.time() - t0:.0f} s)", flush=True)

            run_job(spec, data.task, job)
    save(out, rows, meta(a, argv, start))
    print(summary(rows))
    plot(rows, out.with_suffix(".png"))
    return 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meta(a: argparse.Namespace, argv: Sequence[str] | None, start: float) -> dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(),
            "command": "python benchmarks/budget_curve.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "wall_s": time.time() - start, "k": a.k, "max_eval": a.max_eval, "max_forwards": a.max_forwards,
            "strategies": STRATEGIES}


def save(out: Path, rows: list[dict], info: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": info, "rows": rows}, indent=1))


def summary(rows: list[dict]) -> str:
    """Per strategy: the mean gain over the template within 2,560 forwards, as a fraction of the mean gain of the
    longest budget (over every task and seed)."""
    lines = ["strategy | gain@2560 | gain@max | fraction"]
    for strategy in sorted({r["strategy"] for r in rows}):
        at, full = [], []
        for key in sorted({(r["task"], r["seed"]) for r in rows if r["strategy"] == strategy}):
            pts = [r for r in rows if r["strategy"] == strategy and (r["task"], r["seed"]) == key]
            within = [r for r in pts if r["forwards"] <= ONE_PERCENT]
            if within:
                at.append(within[-1]["test_acc"] - within[-1]["template_test"])
            full.append(pts[-1]["test_acc"] - pts[-1]["template_test"])
        g1, gm = float(np.mean(at)) if at else float("nan"), float(np.mean(full))
        lines.append(f"{strategy} | {g1:+.4f} | {gm:+.4f} | {g1 / gm if gm else float('nan'):.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for strategy in sorted({r["strategy"] for r in rows if r["task"] == task}):
            pts = [r for r in rows if r["task"] == task and r["strategy"] == strategy]
            xs = sorted({r["forwards"] for r in pts})
            by = [[r["test_acc"] for r in pts if r["forwards"] == x] for x in xs]
            mean = [float(np.mean(v)) for v in by]
            ax.plot(xs, mean, marker=".", label=strategy)
            ax.fill_between(xs, [min(v) for v in by], [max(v) for v in by], alpha=0.15)
        tmpl = float(np.mean([r["template_test"] for r in rows if r["task"] == task]))
        ax.axhline(tmpl, color="grey", linestyle="--", linewidth=1, label="template")
        ax.axvline(ONE_PERCENT, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("sequence forwards (train + dev)")
        ax.set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
