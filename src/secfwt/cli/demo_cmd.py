"""``secfwt demo``: private forward-only tuning of the bundled MiniLM on the embedded past-or-future task.

Two servers and a dealer run as separate OS processes talking TLS on loopback; this process is the data
owner. The task (:mod:`secfwt.tuning.demo_tense`) is one where the template alone is poorly calibrated, so a
few CMA-ES generations on 12 train examples lift the accuracy on its 120 held-out test sentences clearly; the
run ends with one or two plain lines: the tuned prompt's test accuracy against the template's, the gain, and
the test set's noise (:func:`verdict`). Settings are scaled to finish within 3 minutes on 2 cores (README,
"secfwt demo"). glibc's malloc is set up for less page-fault churn in this process and the party processes
(:mod:`secfwt.alloc`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console

from secfwt.alloc import configure_malloc
from secfwt.cli import tune_cmd
from secfwt.cli.tune_cmd import add_arguments
from secfwt.files import write_private
from secfwt.tuning.fot import TuneResult

# Cost: 4 generations x 4 candidates x 8 train sentences + 2 dev checks x 12 + 12 (template on dev) + 2 x 120
# (template and tuned prompt on test) = 404 sequence forwards of 6-14 tokens in 9 forward calls; --max-rows 32
# keeps every chunk close to its longest sentence (rows are sorted by length). Chosen in the clear over 5 data x 3
# tune seeds (README, "secfwt demo").
DEMO_DEFAULTS: dict[str, Any] = {
    "task": "tense", "k": 6, "d": 20, "n_prompt": 2, "popsize": 4, "iterations": 4, "train_batch": 8,
    "eval_every": 2, "max_length": 16, "max_rows": 32, "attention": "softmax", "parties": "local",
    "report": "runs/demo/report.json", "plot": "runs/demo/history.png",
    "save_prompt": "runs/demo/prompt.safetensors",
    "patience": 0,
}
# Keys the demo adds to ``secfwt tune``'s report (which it keeps whole): see :func:`verdict`.
VERDICT_KEYS = ("prompt_accuracy", "used_prompt", "gain_points", "noise_points", "gain_over_noise", "verdict")


def settings_text(d: dict[str, Any] = DEMO_DEFAULTS) -> str:
    """The demo's tuning settings in words, as the README states them (a test compares the two)."""
    return (f"task {d['task']}, k {d['k']} per class, d {d['d']}, {d['n_prompt']} prompt tokens, "
            f"population {d['popsize']}, {d['iterations']} iterations, train minibatch {d['train_batch']}, "
            f"dev every {d['eval_every']} iterations, max_length {d['max_length']}, max_rows {d['max_rows']}, "
            f"{d['attention']} attention")


def verdict(result: TuneResult) -> dict[str, Any]:
    """Whether the tuned prompt beat the template alone on the held-out split by more than its noise.

    The gain is ``accuracy - zero_shot_accuracy`` on the same ``n`` examples; the noise is the binomial
    standard error ``sqrt(p (1 - p) / n)`` of the template's accuracy ``p`` (floored at one example, 1/n, so a
    perfect or zero template still has a noise). Returns :data:`VERDICT_KEYS` (points = accuracy x 100) and the
    one or two summary lines under ``"verdict"``.
    """
    n, p, acc = result.n_eval, result.zero_shot_accuracy, result.accuracy
    noise = max(math.sqrt(p * (1.0 - p) / n), 1.0 / n)
    gain = acc - p
    ratio = gain / noise
    lines = [f"tuned prompt: {acc:.2f} on {n} held-out examples vs template {p:.2f} "
             f"({gain * 100:+.1f} pts; noise ~{noise * 100:.1f} pts)"]
    if not result.used_prompt:
        tuned = result.prompt_accuracy if result.prompt_accuracy is not None else float("nan")
        lines.append(f"no prompt beat the template on dev, so the template was kept (the tuned prompt alone: "
                     f"{tuned:.2f} on test)")
    elif ratio > 2:
        lines.append(f"the tuned prompt beats the template by {ratio:.1f}x the noise (the binomial standard error "
                     f"of the template's test accuracy): {'private ' if result.mode == 'mpc' else ''}tuning worked")
    elif ratio > 1:
        lines.append(f"the tuned prompt beats the template by {ratio:.1f}x the noise: a gain, but under 2 standard "
                     "errors")
    else:
        lines.append("the gain is within the noise of the test set: no clear gain on this run")
    return {
        "prompt_accuracy": result.prompt_accuracy, "used_prompt": result.used_prompt,
        "gain_points": round(gain * 100, 2), "noise_points": round(noise * 100, 2),
        "gain_over_noise": round(ratio, 2), "verdict": "\n".join(lines),
    }


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="tune the bundled model privately on an embedded task (under 3 minutes)")
    add_arguments(p)
    tune_cmd.add_mpc_arguments(p)
    for action in p._actions:
        if action.dest == "task":
            action.required = False
    p.set_defaults(func=execute, **DEMO_DEFAULTS)
    return p


def execute(a: argparse.Namespace, console: Console | None = None) -> int:
    """``secfwt tune`` with the demo's defaults (after the malloc set-up of this process), then the verdict:
    printed last, and added to the report."""
    configure_malloc()
    console = console or Console()
    result = tune_cmd.tune_and_report(a, console)
    v = verdict(result)
    console.print(v["verdict"], style="bold", soft_wrap=True, markup=False)
    if a.report:
        path = Path(a.report)
        rep = json.loads(path.read_text())
        rep.update(v)
        write_private(path, json.dumps(rep, indent=2) + "\n")
    return 0
