"""``secfwt predict``: private inference with a tuned prompt (``secfwt tune --save-prompt``) on new text."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from secfwt.cli.tune_cmd import TUNE_CHECKS, check_args, cost_table
from secfwt.cost import CostTracker
from secfwt.errors import ConfigError
from secfwt.files import write_private
from secfwt.tuning.data import load_task_data
from secfwt.tuning.predict import Prediction, accuracy_of, classify, read_inputs, texts_to_examples
from secfwt.tuning.prompt_file import PromptFile
from secfwt.tuning.runner import RunSpec, run_job
from secfwt.tuning.tasks import get_task

PREDICT_CHECKS = tuple(c for c in TUNE_CHECKS if c[0] in ("--max-eval", "--max-rows", "--timeout"))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("predict", help="label new text privately with a tuned prompt",
                              description="Private inference: the servers run the forward on secret shares of the "
                                          "data owner's inputs and prompt; only the owner sees the predictions.")
    p.add_argument("--prompt", required=True, help="prompt file written by `secfwt tune --save-prompt`")
    src = p.add_argument_group("inputs (one of)")
    src.add_argument("--text", action="append", default=[], help="a text to label (repeatable; pairs: A<TAB>B)")
    src.add_argument("--input", default=None, help="file with one text per line (pairs: tab-separated)")
    src.add_argument("--eval", action="store_true", help="score the task's evaluation split (accuracy)")
    p.add_argument("--data-root", default=None, help="data directory for --eval (default: $SECFWT_DATA)")
    p.add_argument("--max-eval", type=int, default=None, help="--eval: seeded subsample of this many examples")
    p.add_argument("--model", default=None, help="model directory (default: the one the prompt was tuned on)")
    p.add_argument("--mode", choices=("mpc", "plaintext"), default="mpc")
    p.add_argument("--parties", default="inprocess", help="inprocess, local (TLS processes) or a parties TOML file")
    p.add_argument("--shares-dir", default=None, help="model share files (default: made once and cached)")
    p.add_argument("--max-rows", type=int, default=64, help="sequences per MPC forward chunk (memory bound)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a party waits for a message")
    p.add_argument("--out", default=None, help="write predictions and cost as JSON here")
    p.set_defaults(func=execute)
    return p


def spec_from_prompt(pf: PromptFile, a: argparse.Namespace) -> RunSpec:
    s = pf.settings
    return RunSpec(
        task=pf.task, model=a.model or pf.model, mode=a.mode, attention=dict(s.get("attention", {"kind": "softmax"})),
        embedding=s.get("embedding", "local"), head=s.get("head", "auto"), max_length=int(s.get("max_length", 64)),
        temperature=float(s.get("temperature", 20.0)), frac_bits=int(s.get("frac_bits", 16)), max_rows=a.max_rows,
        prompt_position=str(s.get("prompt_position", "start")),
        shares_dir=a.shares_dir, timeout=a.timeout, progress=False,
    )


def execute(a: argparse.Namespace, console: Console | None = None) -> int:
    check_args(a, PREDICT_CHECKS)
    console = console or Console()
    if sum(bool(x) for x in (a.text, a.input, a.eval)) != 1:
        raise ConfigError("predict: give exactly one of --text, --input, --eval")
    pf = PromptFile.load(a.prompt)
    spec = spec_from_prompt(pf, a)
    task = get_task(spec.task)
    if a.eval:
        info = pf.info
        data = load_task_data(task, a.data_root, k=int(info.get("k", 16)), seed=int(info.get("seed", 13)),
                              max_eval=a.max_eval)
        examples, labelled = list(data.eval), True
    else:
        examples = read_inputs(a.input, task) if a.input else texts_to_examples(a.text, task)
        labelled = False
    console.print(f"[bold]secfwt predict[/] task={task.name} mode={spec.mode} attention={spec.attention['kind']} "
                  f"prompt tokens={pf.prompt.shape[0]} inputs={len(examples)}")
    start = time.perf_counter()
    preds, costs = run_job(spec, task, lambda ev: classify(ev, pf.prompt, task, examples, labelled), a.parties)
    elapsed = time.perf_counter() - start
    console.print(predictions_table(preds, task.words))
    if labelled:
        console.print(f"accuracy: {accuracy_of(preds):.4f} on {len(preds)} examples")
    if costs:
        console.print(cost_table(costs, elapsed))
    if a.out:
        write_private(a.out, json.dumps(result_dict(spec, preds, costs, elapsed, labelled), indent=2) + "\n")
        console.print(f"predictions: {a.out}")
    return 0


def predictions_table(preds: list[Prediction], words: tuple[str, ...] = (), limit: int = 20) -> Table:
    t = Table(title=f"predictions ({min(limit, len(preds))} of {len(preds)} shown)")
    for col in ("text", "label", "p(label)", "gold"):
        t.add_column(col)
    for p in preds[:limit]:
        text = " | ".join(p.texts)
        gold = "" if p.correct is None else ("ok" if p.correct else "wrong")
        label = f"{p.label} ({words[p.index].strip()})" if words and words[p.index].strip() != p.label else p.label
        t.add_row(text if len(text) <= 70 else text[:67] + "...", label, f"{p.probs[p.index]:.3f}", gold)
    return t


def result_dict(spec: RunSpec, preds: list[Prediction], costs: dict[int, dict[str, Any]], time_s: float,
                labelled: bool) -> dict[str, Any]:
    totals = [CostTracker.from_dict(c).total() for c in costs.values()]
    return {
        "task": spec.task, "model": spec.model, "mode": spec.mode, "attention": spec.attention["kind"],
        "n": len(preds), "accuracy": accuracy_of(preds) if labelled else None, "time_s": round(time_s, 3),
        "bytes_per_server": max((t.bytes_sent for t in totals), default=0),
        "rounds": max((t.rounds for t in totals), default=0),
        "predictions": [{"texts": list(p.texts), "label": p.label, "probs": list(p.probs), "gold": p.gold}
                        for p in preds],
    }
