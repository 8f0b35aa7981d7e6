"""``secfwt tune``: forward-only tuning of a soft prompt, privately (MPC) or in the clear."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from secfwt.context import FRAC_BITS_MAX, FRAC_BITS_MIN
from secfwt.cost import LAN, WAN, CostTracker
from secfwt.errors import ConfigError
from secfwt.files import write_private
from secfwt.tuning.decoder_encode import PROMPT_POSITIONS
from secfwt.tuning.fot import CLI_DEFAULTS, TuneConfig, TuneResult
from secfwt.tuning.prompt_file import PromptFile
from secfwt.tuning.report import plot_history, print_summary, report_dict, split_table
from secfwt.tuning.runner import RunSpec, run


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Task, data and tuning options shared by every runner."""
    d = CLI_DEFAULTS  # chosen from the budget curves: docs/TUNING.md, "Defaults"
    p.add_argument("--task", required=True, help="built-in task name or a .toml task file")
    p.add_argument("--source", default=None, help="data source of the task (default: its first)")
    p.add_argument("--data-root", default=None, help="data directory (default: $SECFWT_DATA or ../shared/data)")
    p.add_argument("--k", type=int, default=None,
                   help="examples per class for train and for dev (default: 16, or the most the task's data allows, "
                        "e.g. 10 for the embedded demo)")
    p.add_argument("--seed", type=int, default=13, help="data seed (k-shot sampling, LM-BFF folder)")
    p.add_argument("--max-eval", type=int, default=None, help="cap the evaluation split (seeded subsample)")
    p.add_argument("--d", type=int, default=d.d, help="subspace dimension")
    p.add_argument("--n-prompt", type=int, default=d.n_prompt, help="soft-prompt length")
    p.add_argument("--popsize", type=int, default=d.popsize, help="CMA-ES population size")
    p.add_argument("--budget", type=int, default=d.budget_calls, help="budget in API calls")
    p.add_argument("--iterations", type=int, default=None, help="budget in iterations (overrides --budget)")
    p.add_argument("--sigma", type=float, default=d.sigma, help="CMA-ES initial step size")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help="scale of the projection: a first-generation prompt moves alpha x the word-embedding std "
                        "from p0 (BBT's alpha; < 1 searches near a text init)")
    p.add_argument("--tune-seed", type=int, default=d.seed, help="CMA-ES seed")
    p.add_argument("--proj-seed", type=int, default=None, help="owner-secret seed of the projection A")
    p.add_argument("--init", choices=("none", "vocab"), default=d.init, help="p0: zeros or random word embeddings")
    p.add_argument("--init-text", default=None, metavar="TEXT",
                   help="p0: the embeddings of this phrase's tokens (--n-prompt = its token count)")
    p.add_argument("--loss", choices=("ce", "hinge"), default=d.loss)
    p.add_argument("--optimizer", choices=("cma", "spsa"), default=d.optimizer,
                   help="cma: CMA-ES (BBT); spsa: zeroth-order Adam on antithetic two-point estimates (MeZO-style; "
                        "needs an even --popsize)")
    p.add_argument("--lr", type=float, default=d.lr, help="spsa: Adam step in units of z")
    p.add_argument("--spsa-eps", type=float, default=d.spsa_eps, help="spsa: perturbation size in units of z")
    p.add_argument("--train-batch", type=int, default=d.train_batch,
                   help=f"train examples per iteration, a seeded minibatch (default {d.train_batch}; at least the "
                        "train set's size = all of it)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="iterations between dev evaluations")
    p.add_argument("--patience", type=int, default=d.patience, help="iterations without dev gain (0 = off)")
    p.add_argument("--no-floor", action="store_true", help="never fall back to the zero-shot template")
    p.add_argument("--checkpoint-dir", default=None, help="save/resume the loop state here")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--out", default=None, help="directory for report.json and history.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


SEED_LIMIT = 2**32  # numpy's RandomState (CMA-ES) takes seeds in [0, 2^32)
# (flag, predicate, what is expected): checked before anything runs, so a bad value is one error line.
Check = tuple[str, Callable[[Any], bool], str]


def _at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: v >= low


def _seed(v: int) -> bool:
    return 0 <= v < SEED_LIMIT


def _positive(v: float) -> bool:
    return math.isfinite(v) and v > 0


_AT_LEAST_1 = _at_least(1)
TUNE_CHECKS: tuple[Check, ...] = (
    ("--k", _AT_LEAST_1, "an integer >= 1 (examples per class)"),
    ("--seed", _seed, f"an integer in [0, {SEED_LIMIT})"),
    ("--max-eval", _AT_LEAST_1, "an integer >= 1"),
    ("--d", _AT_LEAST_1, "an integer >= 1"),
    ("--n-prompt", _AT_LEAST_1, "an integer >= 1"),
    ("--popsize", _at_least(2), "an integer >= 2 (CMA-ES)"),
    ("--budget", _AT_LEAST_1, "an integer >= 1"),
    ("--iterations", _AT_LEAST_1, "an integer >= 1"),
    ("--sigma", _positive, "a finite number > 0"),
    ("--alpha", _positive, "a finite number > 0"),
    ("--lr", _positive, "a finite number > 0"),
    ("--spsa-eps", _positive, "a finite number > 0"),
    ("--tune-seed", _seed, f"an integer in [0, {SEED_LIMIT})"),
    ("--proj-seed", _seed, f"an integer in [0, {SEED_LIMIT})"),
    ("--train-batch", _AT_LEAST_1, "an integer >= 1"),
    ("--eval-every", _AT_LEAST_1, "an integer >= 1"),
    ("--patience", _at_least(0), "an integer >= 0 (0 = off)"),
    ("--checkpoint-every", _AT_LEAST_1, "an integer >= 1"),
    ("--rfa-features", _AT_LEAST_1, "an integer >= 1"),
    ("--rfa-seed", _seed, f"an integer in [0, {SEED_LIMIT})"),
    ("--max-length", _at_least(2), "an integer >= 2 (tokens per input)"),
    ("--max-rows", _AT_LEAST_1, "an integer >= 1"),
    ("--frac-bits", lambda v: FRAC_BITS_MIN <= v <= FRAC_BITS_MAX, f"an integer in [{FRAC_BITS_MIN}, {FRAC_BITS_MAX}]"),
    ("--timeout", _positive, "a finite number > 0 (seconds)"),
)


def check_args(a: argparse.Namespace, checks: tuple[Check, ...]) -> None:
    """One ConfigError (one line: the flag, what it expects, what it got) for the first bad value in ``a``."""
    for flag, ok, expected in checks:
        v = getattr(a, flag.lstrip("-").replace("-", "_"), None)
        if v is not None and not ok(v):
            raise ConfigError(f"{flag}: expected {expected}, got {v}")
    if getattr(a, "iterations", None) is None and hasattr(a, "budget") and a.budget < a.popsize:
        raise ConfigError(f"--budget: expected at least --popsize ({a.popsize}) API calls (one iteration), "
                          f"got {a.budget}")


def config_from_args(a: argparse.Namespace) -> TuneConfig:
    return TuneConfig(
        d=a.d, n_prompt=a.n_prompt, popsize=a.popsize, budget_calls=a.budget, iterations=a.iterations,
        sigma=a.sigma, alpha=a.alpha, seed=a.tune_seed, proj_seed=a.proj_seed, init="text" if a.init_text else a.init,
        init_text=a.init_text or None, loss=a.loss, optimizer=a.optimizer, lr=a.lr, spsa_eps=a.spsa_eps,
        train_batch=a.train_batch, eval_every=a.eval_every, patience=a.patience or None,
        zero_shot_floor=not a.no_floor, checkpoint_every=a.checkpoint_every,
    )


def add_mpc_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="local model directory (default: the bundled all-MiniLM-L6-v2); "
                   "'smollm2' or a local HF Llama directory: the decoder path (docs/DECODER.md)")
    p.add_argument("--mode", choices=("mpc", "plaintext"), default="mpc")
    p.add_argument("--attention", choices=("softmax", "rfa", "2quad", "relu", "power"), default="softmax")
    p.add_argument("--rfa-features", type=int, default=64, help="RFA: number of random frequencies")
    p.add_argument("--rfa-seed", type=int, default=0, help="RFA: public seed of the random frequencies")
    p.add_argument("--embedding", choices=("local", "private"), default="local",
                   help="local: the data owner embeds with the disclosed word table; private: one-hot under MPC")
    p.add_argument("--head", choices=("auto", "mlm", "similarity"), default="auto")
    p.add_argument("--max-length", type=int, default=64, help="tokens per input including the soft prompt")
    p.add_argument("--max-rows", type=int, default=64, help="sequences per MPC forward chunk (memory bound)")
    p.add_argument("--prompt-position", choices=PROMPT_POSITIONS, default="start",
                   help="decoders: where the soft prompt goes: after the first token (start), or between the "
                        "text and the template's tail (after-text: each example's prefix runs once and is cached, "
                        "a candidate runs only its prompt and the tail)")
    p.add_argument("--parties", default="inprocess",
                   help="inprocess (threads), local (one process per party over TLS on loopback), or a parties "
                        "TOML file whose servers and dealer run `secfwt party` on their hosts")
    p.add_argument("--shares-dir", default=None, help="model share files (default: made once and cached)")
    p.add_argument("--frac-bits", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a party waits for a message")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--plot", default=None, help="write the loss/accuracy plot here (PNG)")
    p.add_argument("--save-prompt", default=None,
                   help="write the tuned prompt here for `secfwt predict` (default: OUT/prompt.safetensors)")


def spec_from_args(a: argparse.Namespace) -> RunSpec:
    cfg = config_from_args(a)
    import dataclasses

    return RunSpec(
        task=a.task, model=a.model, mode=a.mode,
        attention={"kind": a.attention, "n_features": a.rfa_features, "seed": a.rfa_seed},
        embedding=a.embedding, head=a.head, k=a.k, seed=a.seed, data_root=a.data_root, source=a.source,
        max_eval=a.max_eval, max_length=a.max_length, max_rows=a.max_rows, prompt_position=a.prompt_position,
        tune=dataclasses.asdict(cfg),
        shares_dir=a.shares_dir, checkpoint_dir=a.checkpoint_dir, resume=not a.no_resume, frac_bits=a.frac_bits,
        timeout=a.timeout, progress=not a.quiet,
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
    check_args(a, TUNE_CHECKS)
    console = console or Console()
    spec = spec_from_args(a)
    where = f", parties: {a.parties}" if spec.mode == "mpc" else ""
    console.print(f"[bold]secfwt tune[/] task={spec.task} mode={spec.mode} attention={a.attention}{where}")
    result, costs = run(spec, parties=a.parties)
    print_summary(result, console)
    if costs:
        console.print(cost_table(costs, result.time_s))
        console.print(split_table(costs, result.time_s))
        console.print(op_table(costs))
    if a.out and not a.report:
        a.report = str(Path(a.out) / "report.json")
    if a.report:
        rep = report_dict(result, costs)
        if spec.mode == "mpc":
            rep["attention"] = a.attention
        write_private(a.report, json.dumps(rep, indent=2) + "\n")
        console.print(f"report: {a.report}")
    save = a.save_prompt or (str(Path(a.out) / "prompt.safetensors") if a.out else None)
    if save:
        prompt_file(spec, result).save(save)
        console.print(f"prompt: {save}  (use: secfwt predict --prompt {save} --text ...)")
    plot = a.plot or (str(Path(a.out) / "history.png") if a.out else None)
    if plot:
        plot_history(result.history, plot, title=f"{result.task} / {result.model} ({result.mode})")
        console.print(f"plot:   {plot}")
    return result


def prompt_file(spec: RunSpec, result: TuneResult) -> PromptFile:
    """The tuned prompt with the settings ``secfwt predict`` needs to use it the same way."""
    if result.prompt is None:
        raise ConfigError("tune: the run returned no prompt to save")
    settings = {"head": spec.head, "attention": spec.attention, "embedding": spec.embedding,
                "max_length": spec.max_length, "temperature": spec.temperature, "frac_bits": spec.frac_bits,
                "prompt_position": spec.prompt_position}
    info = {"mode": result.mode, "accuracy": result.accuracy, "zero_shot_accuracy": result.zero_shot_accuracy,
            "dev_accuracy": result.dev_accuracy, "eval_split": result.eval_split, "n_eval": result.n_eval,
            "k": result.k, "seed": result.seed, "iterations": result.iterations, "used_prompt": result.used_prompt}
    return PromptFile(result.prompt, spec.task, str(spec.model_dir()), settings, info)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tune", help="tune a soft prompt (forward-only, CMA-ES), privately or in the clear",
                              description="Forward-only prompt tuning (SecFwT): the data owner runs CMA-ES; the "
                                          "servers run every forward pass on secret shares.")
    add_arguments(p)
    add_mpc_arguments(p)
    p.set_defaults(func=execute)
    return p
