"""Forward-only prompt tuning: CMA-ES over a random low-dimensional subspace (BBT; SecFwT's owner loop).

The data owner optimises ``z`` in ``R^d`` with CMA-ES (Hansen 2016, via the ``cmaes`` library's ask/tell);
each candidate becomes a soft prompt ``p = A z + p0`` (BBT, Sun et al. 2022, eq. 2) with a random projection
``A`` drawn from a seed only the owner keeps. Per iteration the evaluator runs the model forward for the whole
population on the k-shot train set and returns the label logits (under MPC in SecFwT, arXiv 2506.15307,
Alg. 1: only these logits are revealed to the owner); the owner computes the losses and tells CMA-ES.

Early stopping is on dev accuracy: every ``eval_every`` iterations the iteration's best candidate is scored on
the k-shot dev set; the best ``z`` by (dev accuracy, -dev loss) is kept and the run stops after ``patience``
iterations without improvement. The zero-shot floor (template alone, no soft prompt) is measured on dev and on
the evaluation split; with ``zero_shot_floor`` the final model falls back to it when no prompt beat it on dev.

Checkpoints (every ``checkpoint_every`` iterations, atomic) hold the CMA-ES state, RNG states, counters, best
``z`` and history; with a deterministic evaluator a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cmaes import CMA
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from secfwt.errors import ConfigError
from secfwt.tuning import checkpoint
from secfwt.tuning.data import TaskData
from secfwt.tuning.objective import Batch, EvalCost, Evaluator, accuracy, get_loss, hinge
from secfwt.tuning.zo import Spsa


@dataclass(frozen=True)
class TuneConfig:
    """Hyper-parameters of a tuning run (defaults follow BBT, Sun et al. 2022, Sec. 4.1)."""

    d: int = 500  # dimension of the subspace z lives in
    n_prompt: int = 50  # soft-prompt tokens
    popsize: int = 20  # CMA-ES population size (lambda)
    budget_calls: int = 8000  # API calls (one = one candidate on the train set); iterations = budget // popsize
    iterations: int | None = None  # overrides budget_calls when set
    sigma: float = 1.0  # CMA-ES initial step size (sigma_m in BBT's projection scaling)
    alpha: float = 1.0  # BBT's scale of the projection std
    seed: int = 42  # CMA-ES and loop RNG seed
    proj_seed: int | None = None  # owner-secret seed of A (and p0); default: derived from seed
    init: str = "none"  # p0: "none" (zeros), "vocab" (random vocabulary words) or "text" (init_text's tokens)
    init_text: str | None = None  # the phrase p0 embeds with init "text" (its token count = n_prompt)
    loss: str = "ce"  # "ce" or "hinge"
    margin: float = 1.0  # hinge margin
    train_batch: int | None = None  # examples per iteration (seeded minibatch); None = the whole train set
    eval_every: int = 1  # iterations between dev evaluations
    patience: int | None = 100  # iterations without dev improvement before stopping; None = never
    zero_shot_floor: bool = True  # fall back to no prompt if no prompt beat the template alone on dev
    checkpoint_every: int = 10  # iterations between checkpoints (when a checkpoint directory is given)
    optimizer: str = "cma"  # "cma" (CMA-ES) or "spsa" (zeroth-order Adam on two-point estimates, tuning/zo.py)
    lr: float = 0.05  # spsa: Adam step in units of z (the projection makes z ~ N(0, sigma^2) a natural scale)
    spsa_eps: float = 0.5  # spsa: perturbation size of the two-point estimates, in units of z

    def __post_init__(self) -> None:
        for name in ("d", "n_prompt", "popsize", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tuning config: {name} must be >= 1, got {getattr(self, name)}")
        if self.popsize < 2:
            raise ConfigError(f"tuning config: popsize must be >= 2 (CMA-ES), got {self.popsize}")
        if self.optimizer not in ("cma", "spsa"):
            raise ConfigError(f"tuning config: optimizer must be 'cma' or 'spsa', got {self.optimizer!r}")
        if self.optimizer == "spsa" and self.popsize % 2:
            raise ConfigError(f"tuning config: optimizer spsa needs an even popsize (antithetic pairs), got "
                              f"{self.popsize}")
        if self.init not in ("none", "vocab", "text"):
            raise ConfigError(f"tuning config: init must be 'none', 'vocab' or 'text', got {self.init!r}")
        if (self.init == "text") != bool(self.init_text):
            raise ConfigError("tuning config: init 'text' needs a non-empty init_text (and init_text needs init "
                              f"'text'), got init={self.init!r}, init_text={self.init_text!r}")
        get_loss(self.loss)
        for name in ("sigma", "alpha", "lr", "spsa_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"tuning config: {name} must be > 0, got {getattr(self, name)}")

    @property
    def max_iterations(self) -> int:
        return self.iterations if self.iterations is not None else self.budget_calls // self.popsize

    @property
    def projection_seed(self) -> int:
        return self.proj_seed if self.proj_seed is not None else (self.seed * 7919 + 1) % 2**31

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields a checkpoint must agree on to be resumed (checkpoint cadence may change)."""
        d = asdict(self)
        d.pop("checkpoint_every")
        return d


# `secfwt tune`'s defaults, chosen from the budget curves (docs/TUNING.md, "Defaults"; issue 17): 5 prompt tokens in
# a 50-dimensional subspace, CMA-ES population 6 on seeded train minibatches of 8, dev every generation, 31
# generations = 186 calls = 2,512 sequence forwards (train + dev + the zero-shot floor), within 1 % of BBT's
# 256,000. TuneConfig() itself keeps BBT's values (the library's reference point and its tests).
CLI_DEFAULTS = TuneConfig(d=50, n_prompt=5, popsize=6, train_batch=8, budget_calls=186)


@dataclass(frozen=True)
class IterRecord:
    """One iteration of history. ``dev_acc``/``dev_loss`` are None when dev was not evaluated."""

    iteration: int
    calls: int
    loss_min: float
    loss_mean: float
    train_acc: float  # of the iteration's best candidate
    dev_acc: float | None = None
    dev_loss: float | None = None


@dataclass
class TuneResult:
    """Outcome of :func:`tune`. ``accuracy`` is on the evaluation split with the selected prompt."""

    task: str
    model: str
    mode: str
    attention: str
    k: int
    seed: int
    iterations: int
    calls: int
    accuracy: float
    zero_shot_accuracy: float
    dev_accuracy: float
    zero_shot_dev_accuracy: float
    time_s: float
    n_eval: int
    eval_split: str
    best_z: np.ndarray
    used_prompt: bool
    stop_reason: str
    history: list[IterRecord] = field(default_factory=list)
    cost: EvalCost | None = None
    prompt: torch.Tensor | None = None  # the selected soft prompt (n_prompt, hidden); 0 rows = template alone
    prompt_accuracy: float | None = None  # the tuned prompt's accuracy on the evaluation split, even if not used


class Projection:
    """``p = A z + p0`` (BBT eq. 2). ``A`` is ``(d, n_prompt * hidden)`` with i.i.d. ``N(0, s^2)`` entries,
    ``s = alpha * sigma_hat / (sqrt(d) * sigma_m)`` (BBT Sec. 3.2): for ``z ~ N(0, sigma_m^2 I)`` every entry of
    ``A z`` then has the std ``sigma_hat`` of the model's word embeddings. ``A`` is regenerated from ``seed``.
    """

    def __init__(
        self, d: int, n_prompt: int, hidden: int, embedding_std: float, sigma: float, alpha: float, seed: int,
        p0: torch.Tensor | None = None,
    ) -> None:
        self.d, self.n_prompt, self.hidden = d, n_prompt, hidden
        std = alpha * embedding_std / (math.sqrt(d) * sigma)
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(d, n_prompt * hidden, generator=g, dtype=torch.float32) * std  # (d, n*H)
        if p0 is not None and tuple(p0.shape) != (n_prompt, hidden):
            raise ConfigError(f"p0: expected shape ({n_prompt}, {hidden}), got {tuple(p0.shape)}")
        self.p0 = p0.float() if p0 is not None else None

    def __call__(self, z: np.ndarray) -> torch.Tensor:
        """Prompts ``(P, n_prompt, hidden)`` for a population ``z`` of shape ``(P, d)``."""
        zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
        p = (zt @ self.A).reshape(z.shape[0], self.n_prompt, self.hidden)
        return p + self.p0 if self.p0 is not None else p


def make_projection(evaluator: Evaluator, config: TuneConfig) -> Projection:
    """The run's ``p = A z + p0``, rebuilt from its config alone (``A`` from the projection seed; ``p0`` from
    ``config.init``), e.g. to score a checkpointed ``best_z`` outside the loop."""
    p0 = None
    if config.init != "none":
        p0 = evaluator.init_prompt(config.n_prompt, config.projection_seed, config.init_text)
        if p0 is None:
            raise ConfigError(f"init {config.init!r}: the data owner has no word table for "
                              f"{evaluator.model_name} (private embedding mode): use --init none")
    return Projection(
        config.d, config.n_prompt, evaluator.hidden_size, evaluator.embedding_std, config.sigma, config.alpha,
        config.projection_seed, p0,
    )


def _fingerprint(config: TuneConfig, evaluator: Evaluator, data: TaskData) -> str:
    blob = {
        "config": config.fingerprint_fields(), "model": evaluator.model_name, "mode": evaluator.mode,
        "task": data.task.name, "train": Batch.of("train", data.train).key, "dev": Batch.of("dev", data.dev).key,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


class _Loop:
    """Mutable loop state; everything in :meth:`state_dict` is checkpointed."""

    def __init__(self, evaluator: Evaluator, data: TaskData, config: TuneConfig) -> None:
        self.ev, self.data, self.cfg = evaluator, data, config
        self.loss_fn = get_loss(config.loss)
        if config.loss == "hinge":
            self.loss_fn = lambda lg, y: hinge(lg, y, config.margin)
        self.proj = make_projection(evaluator, config)
        self.train = Batch.of("train", data.train, whole_run=True)
        self.dev = Batch.of("dev", data.dev, whole_run=True)
        self.fingerprint = _fingerprint(config, evaluator, data)
        # Checkpointed state
        self.cma = CMA(mean=np.zeros(config.d), sigma=config.sigma, population_size=config.popsize, seed=config.seed)
        self.zo = Spsa(config.d, config.popsize, config.lr, config.spsa_eps, config.seed) \
            if config.optimizer == "spsa" else None
        self.rng = np.random.default_rng(config.seed)
        self.iteration = 0
        self.calls = 0
        self.best_z: np.ndarray | None = None
        self.best_dev = (-1.0, math.inf)  # (accuracy, loss)
        self.best_iteration = 0
        self.history: list[IterRecord] = []
        self.zero_shot_dev: tuple[float, float] | None = None  # (accuracy, loss) of the template alone
        self.elapsed_s = 0.0
        self.stop_reason = ""
        self.cost_before: EvalCost | None = None  # what earlier sessions of a resumed run spent

    def mean(self) -> np.ndarray:
        """The optimizer's current centre: CMA-ES's mean, or SPSA's iterate."""
        return self.zo.mean if self.zo is not None else self.cma.mean

    def cost(self) -> EvalCost | None:
        """The whole run's evaluator cost: earlier sessions (from the checkpoint) plus this one."""
        now = self.ev.cost()
        if self.cost_before is None:
            return now
        if now is None:
            return self.cost_before
        return self.cost_before + now

    def state_dict(self) -> dict[str, Any]:
        """The checkpointed state: JSON values and numpy arrays only (:mod:`secfwt.tuning.checkpoint`)."""
        cost = self.cost()
        return {
            "fingerprint": self.fingerprint, "cma": checkpoint.cma_state(self.cma),
            "spsa": self.zo.state() if self.zo is not None else None,
            "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state().numpy(),
            "iteration": self.iteration, "calls": self.calls,
            "best_z": self.best_z, "best_dev": list(self.best_dev), "best_iteration": self.best_iteration,
            "history": [asdict(h) for h in self.history],
            "zero_shot_dev": list(self.zero_shot_dev) if self.zero_shot_dev is not None else None,
            "elapsed_s": self.elapsed_s, "stop_reason": self.stop_reason,
            "cost": asdict(cost) if cost is not None else None,
        }

    def load_state_dict(self, s: dict[str, Any], where: Path) -> None:
        """Restore :meth:`state_dict`; every field is checked (one ConfigError naming the file) before any is set."""
        ck = checkpoint
        with ck.reading(where):
            fingerprint = ck.field(s, "fingerprint", str)
        if fingerprint != self.fingerprint:
            raise ConfigError(
                f"{where}: checkpoint belongs to another run (fingerprint {fingerprint}, this run "
                f"{self.fingerprint}: task, data, model or tuning config differ); use a new checkpoint directory"
            )
        with ck.reading(where):
            cma = ck.restore_cma(self.cma, ck.field(s, "cma", dict))
            zo_state = ck.field(s, "spsa", dict, optional=True) if "spsa" in s else None
            if (zo_state is None) != (self.zo is None):
                raise ConfigError(f"optimizer state: expected {self.cfg.optimizer!r}'s")
            if self.zo is not None and zo_state is not None:
                self.zo.restore(zo_state, ck.array, ck.field)
            rng = np.random.default_rng()
            rng.bit_generator.state = ck.field(s, "rng", dict)
            torch_rng = torch.from_numpy(ck.array(s, "torch_rng", tuple(torch.get_rng_state().shape), np.uint8))
            counters = [ck.field(s, k, int) for k in ("iteration", "calls", "best_iteration")]
            best_z = ck.array(s, "best_z", (self.cfg.d,), np.float64, optional=True)
            best_dev = ck.numbers(s, "best_dev", 2)
            zero_shot = ck.numbers(s, "zero_shot_dev", 2, optional=True)
            history = [IterRecord(**ck.record(h, "history")) for h in ck.field(s, "history", list)]
            elapsed, stop = ck.numbers(s, "elapsed_s")[0], ck.field(s, "stop_reason", str)
            cost = ck.field(s, "cost", dict, optional=True) if "cost" in s else None
            cost_before = EvalCost(**ck.record(cost, "cost")) if cost is not None else None  # None: none kept
        torch.set_rng_state(torch_rng)
        self.cma, self.rng = cma, rng
        self.iteration, self.calls, self.best_iteration = counters
        self.best_z, self.best_dev = best_z, (best_dev[0], best_dev[1])
        self.history = history
        self.zero_shot_dev = (zero_shot[0], zero_shot[1]) if zero_shot is not None else None
        self.elapsed_s, self.stop_reason = elapsed, stop
        self.cost_before = cost_before

    def _score(self, z: np.ndarray | None, batch: Batch) -> tuple[float, float]:
        """(accuracy, loss) of one prompt (``z`` of shape (d,), or None for the template alone)."""
        prompts = self.proj(z[None]) if z is not None else torch.zeros(1, 0, self.ev.hidden_size)
        lg = self.ev.logits(prompts, batch)
        return float(accuracy(lg, batch.labels)[0]), float(self.loss_fn(lg, batch.labels)[0])

    def _train_batch(self) -> Batch:
        n = self.cfg.train_batch
        if n is None or n >= len(self.train):
            return self.train
        idx = sorted(self.rng.choice(len(self.train), size=n, replace=False).tolist())
        return Batch.of("train-mb", [self.train.examples[i] for i in idx], ids=[self.train.ids[i] for i in idx])

    def step(self) -> IterRecord:
        """One generation: ask P candidates (CMA-ES samples, or SPSA's antithetic probes), one batched forward,
        tell the losses."""
        zs = self.zo.ask() if self.zo is not None else [self.cma.ask() for _ in range(self.cfg.popsize)]
        batch = self._train_batch()
        logits = self.ev.logits(self.proj(np.stack(zs)), batch)  # (P, B, n_labels)
        losses = self.loss_fn(logits, batch.labels)  # (P,)
        accs = accuracy(logits, batch.labels)
        if self.zo is not None:
            self.zo.tell(losses.tolist())
        else:
            self.cma.tell([(z, float(v)) for z, v in zip(zs, losses.tolist(), strict=True)])
        self.iteration += 1
        self.calls += self.cfg.popsize
        best = int(torch.argmin(losses))
        rec = IterRecord(
            self.iteration, self.calls, float(losses.min()), float(losses.mean()), float(accs[best])
        )
        last = self.iteration >= self.cfg.max_iterations
        if self.iteration % self.cfg.eval_every == 0 or last:
            # CMA-ES: the generation's best candidate; SPSA: its iterate after the step (the candidates are only
            # probes around it)
            z_dev = self.zo.mean.copy() if self.zo is not None else zs[best].copy()
            dev_acc, dev_loss = self._score(z_dev, self.dev)
            rec = IterRecord(**{**asdict(rec), "dev_acc": dev_acc, "dev_loss": dev_loss})
            if (dev_acc, -dev_loss) > (self.best_dev[0], -self.best_dev[1]):
                self.best_z, self.best_dev, self.best_iteration = z_dev, (dev_acc, dev_loss), self.iteration
        self.history.append(rec)
        if last:
            self.stop_reason = "budget"
        elif self.cfg.patience is not None and self.iteration - self.best_iteration >= self.cfg.patience:
            self.stop_reason = "patience"
        elif self.zo is None and self.cma.should_stop():
            self.stop_reason = "cma-converged"
        return rec


def tune(
    evaluator: Evaluator,
    data: TaskData,
    config: TuneConfig = TuneConfig(),
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    console: Console | None = None,
    on_iteration: Callable[[IterRecord], None] | None = None,
    observe: Callable[[IterRecord, np.ndarray | None], None] | None = None,
) -> TuneResult:
    """Run forward-only tuning of a soft prompt for ``data.task`` with ``evaluator``; see the module docstring.

    With ``checkpoint_dir`` the loop saves its state every ``config.checkpoint_every`` iterations and, when
    ``resume``, continues from the last checkpoint there. ``on_iteration`` is called after each iteration;
    ``observe`` too, with the best ``z`` on dev so far (e.g. to score it on test along the way: benchmarks).
    """
    session_start = time.perf_counter()
    loop = _Loop(evaluator, data, config)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and resume:
        state = checkpoint.load(ckpt)
        if state is not None:
            loop.load_state_dict(state, ckpt)
    if loop.zero_shot_dev is None:
        loop.zero_shot_dev = loop._score(None, loop.dev)
    base_elapsed = loop.elapsed_s

    def save() -> None:
        if ckpt is not None:
            loop.elapsed_s = base_elapsed + time.perf_counter() - session_start
            checkpoint.save_atomic(ckpt, loop.state_dict())

    total = config.max_iterations
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"), console=console, disable=not progress, transient=False,
    ) as bar:
        task_id = bar.add_task(f"tuning {data.task.name}", total=total, completed=loop.iteration, status="")
        while not loop.stop_reason:
            if loop.iteration >= total:
                loop.stop_reason = "budget"
                break
            rec = loop.step()
            best_acc = loop.best_dev[0]
            bar.update(task_id, completed=loop.iteration, status=f"loss {rec.loss_min:.4f}  dev* {best_acc:.3f}")
            if loop.stop_reason or loop.iteration % config.checkpoint_every == 0:
                save()
            if on_iteration is not None:
                on_iteration(rec)
            if observe is not None:
                observe(rec, None if loop.best_z is None else loop.best_z.copy())
    return _finish(loop, base_elapsed + time.perf_counter() - session_start)


def _finish(loop: _Loop, elapsed: float) -> TuneResult:
    """Evaluate the selected prompt and the zero-shot floor on the evaluation split."""
    start = time.perf_counter()
    data, cfg, ev = loop.data, loop.cfg, loop.ev
    # "eval-dev" / "eval-test": ids unique per set of examples (the k-shot dev set is "dev" even when the
    # evaluation split is the task's dev file), so whether a registration is reused never depends on content
    eval_batch = Batch.of(f"eval-{data.eval_split}", data.eval, whole_run=True)
    best_z = loop.best_z if loop.best_z is not None else np.asarray(loop.mean(), dtype=np.float64)
    dev_acc = loop.best_dev[0] if loop.best_z is not None else loop._score(best_z, loop.dev)[0]
    zs_acc = loop._score(None, eval_batch)[0]
    zs_dev = loop.zero_shot_dev if loop.zero_shot_dev is not None else loop._score(None, loop.dev)
    use_prompt = not (cfg.zero_shot_floor and dev_acc < zs_dev[0])
    # The prompt is scored even when the template is kept: whether it beat the template on dev is the owner's
    # secret (a label-dependent bit), so the servers see the same forwards either way.
    prompt_acc = loop._score(best_z, eval_batch)[0]
    acc = prompt_acc if use_prompt else zs_acc
    return TuneResult(
        task=data.task.name, model=ev.model_name, mode=ev.mode, attention=ev.attention, k=data.k, seed=data.seed,
        iterations=loop.iteration, calls=loop.calls, accuracy=acc, zero_shot_accuracy=zs_acc,
        dev_accuracy=dev_acc, zero_shot_dev_accuracy=zs_dev[0],
        time_s=elapsed + time.perf_counter() - start, n_eval=len(eval_batch), eval_split=data.eval_split,
        best_z=best_z, used_prompt=use_prompt, stop_reason=loop.stop_reason, history=list(loop.history),
        cost=loop.cost(), prompt_accuracy=prompt_acc,
        prompt=loop.proj(best_z[None])[0][: cfg.n_prompt if use_prompt else 0].clone(),
    )
