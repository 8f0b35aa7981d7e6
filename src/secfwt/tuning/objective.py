"""The black-box objective: an :class:`Evaluator` returns label logits for a whole population of soft prompts.

BBT (Sun et al. 2022, eq. 2-3) optimises ``z* = argmin_z L(f(A z + p0; X), Y)`` where ``f`` is the model
forward with the soft prompt ``p = A z + p0`` prepended to the input and ``L`` is a loss on the verbalizer
logits. In SecFwT (arXiv 2506.15307, Sec. 3) ``f`` runs under MPC on two servers and only the few label
logits are revealed to the data owner, who computes ``L`` in the clear. The evaluator is the seam between
the two: :class:`HFPlainEvaluator` is the plaintext reference (and the oracle of the MPC path); an MPC client
implementing the same protocol plugs into :func:`secfwt.tuning.fot.tune` unchanged.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F

from secfwt.errors import ConfigError
from secfwt.tuning.data import Example
from secfwt.tuning.encode import Encoded, encode_examples, initial_prompt, label_word_id
from secfwt.tuning.tasks import TaskSpec


@dataclass(frozen=True, eq=False)
class Batch:
    """A fixed set of examples.

    ``ids`` names each example by where it comes from (``"split:index"``), never by its content: evaluators
    cache encodings under ``(ids, key)`` and hand the servers only opaque counters for what they registered, so
    which batches repeat is a function of the seeded minibatch indices, not of the data. ``key`` is a content
    hash (texts and labels) for the data owner's own use (caches, checkpoint fingerprints); it never leaves the
    data owner (see README, "What the servers learn").
    """

    name: str
    examples: tuple[Example, ...]
    labels: torch.Tensor = field(repr=False)  # (B,) int64
    key: str
    ids: tuple[str, ...] = ()
    whole_run: bool = False  # used throughout the run (a whole split): kept registered, never released

    @staticmethod
    def of(name: str, examples: Sequence[Example], ids: Sequence[str] | None = None, *,
           whole_run: bool = False) -> Batch:
        """A batch named ``name``; ``ids`` default to ``name:0 .. name:B-1`` (a minibatch passes its parent's).
        Names must be unique per set of examples: equal ids mean equal examples."""
        exs = tuple(examples)
        ids = tuple(ids) if ids is not None else tuple(f"{name}:{i}" for i in range(len(exs)))
        if len(ids) != len(exs):
            raise ConfigError(f"batch {name!r}: {len(ids)} ids for {len(exs)} examples")
        blob = json.dumps([[list(e.texts), e.label] for e in exs]).encode()
        labels = torch.tensor([e.label for e in exs], dtype=torch.int64)
        return Batch(name, exs, labels, hashlib.sha256(blob).hexdigest()[:16], ids, whole_run)

    def cache_key(self, n_prompt: int) -> tuple[tuple[str, ...], str, int]:
        """What an evaluator caches one encoding of this batch under (owner side only)."""
        return self.ids, self.key, n_prompt

    def __len__(self) -> int:
        return len(self.examples)


R = TypeVar("R")

KEEP_BATCHES = 8  # minibatches (and prediction batches) the owner keeps registered on the servers


class Registrations(Generic[R]):
    """The owner's batches registered on the servers: the whole-run ones (train, dev, evaluation splits) stay;
    of the others (minibatches, predictions) at most ``keep``, the least recently used released first
    (``release(number)``) before a new one is registered. A run with a fresh minibatch per generation thus holds
    bounded memory on the servers. What the servers see (registration and release order) follows the sequence
    of batches the tuning loop asks for: example ids and split names from its seeds, never texts or labels."""

    def __init__(self, release: Callable[[int], None], keep: int | None = None) -> None:
        keep = KEEP_BATCHES if keep is None else keep
        if keep < 1:
            raise ConfigError(f"keep: expected at least 1 registered batch, got {keep}")
        self._release, self.keep = release, keep
        self._by_key: OrderedDict[Hashable, tuple[int, R]] = OrderedDict()  # released in this order
        self._whole_run: dict[Hashable, tuple[int, R]] = {}

    def get(self, key: Hashable, register: Callable[[], tuple[int, R]], whole_run: bool = False) -> tuple[int, R]:
        """(batch number, owner's data) of ``key``, registering it with ``register()`` the first time."""
        if key in self._whole_run:
            return self._whole_run[key]
        if key in self._by_key:
            self._by_key.move_to_end(key)
            return self._by_key[key]
        while not whole_run and len(self._by_key) >= self.keep:
            _, (number, _) = self._by_key.popitem(last=False)
            self._release(number)
        value = register()
        (self._whole_run if whole_run else self._by_key)[key] = value
        return value

    def __len__(self) -> int:
        return len(self._by_key) + len(self._whole_run)


@dataclass(frozen=True)
class EvalCost:
    """What an evaluator spent so far: per-server traffic, rounds, compute seconds and forward calls."""

    bytes_per_server: int
    rounds: int
    compute_s: float
    forward_calls: int

    def __add__(self, other: EvalCost) -> EvalCost:
        """The cost of two sessions one after the other (a run resumed from a checkpoint)."""
        return EvalCost(self.bytes_per_server + other.bytes_per_server, self.rounds + other.rounds,
                        self.compute_s + other.compute_s, self.forward_calls + other.forward_calls)


@runtime_checkable
class Evaluator(Protocol):
    """Computes label logits for a population of soft prompts on a batch of examples.

    ``logits(prompts, batch)``: ``prompts`` is ``(P, n_prompt, hidden)`` (``n_prompt = 0`` means the template
    alone: the zero-shot floor); returns ``(P, B, n_labels)``. Implementations batch the whole population and
    all examples into as few forward calls as memory allows, and must be deterministic (same inputs, same
    bits) so that a resumed tuning run reproduces an uninterrupted one.
    """

    model_name: str
    mode: str  # "plaintext" | "mpc"
    attention: str  # attention variant of the forward, e.g. "softmax"
    hidden_size: int
    embedding_std: float  # std of the word embeddings: public model metadata for BBT's projection scaling

    def logits(self, prompts: torch.Tensor, batch: Batch) -> torch.Tensor: ...

    def init_prompt(self, n_prompt: int, seed: int, text: str | None = None) -> torch.Tensor | None:
        """``p0``: ``(n_prompt, hidden)`` embeddings of random vocabulary words (or of ``text``'s tokens),
        or None if the owner does not hold the word table (:func:`secfwt.tuning.encode.initial_prompt`)."""
        ...

    def cost(self) -> EvalCost | None: ...


# --------------------------------------------------------------------------------------------------------
# Losses on the revealed logits (computed by the data owner in the clear). All map (P, B, n_labels) -> (P,).


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per population member (BBT's default loss)."""
    p, b, n = logits.shape
    ce = F.cross_entropy(logits.reshape(p * b, n).double(), labels.repeat(p), reduction="none")
    return ce.reshape(p, b).mean(dim=1)


def hinge(logits: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Multi-class margin loss ``mean(max(0, margin - (s_y - max_{j != y} s_j)))`` (BBT, Sec. 4.4)."""
    s = logits.double()
    idx = labels.view(1, -1, 1).expand(s.shape[0], -1, 1)
    true = s.gather(2, idx).squeeze(2)  # (P, B)
    other = s.scatter(2, idx, float("-inf")).amax(dim=2)  # (P, B)
    return (margin - (true - other)).clamp(min=0).mean(dim=1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of examples whose arg-max label is right, per population member: (P,)."""
    return (logits.argmax(dim=2) == labels.view(1, -1)).double().mean(dim=1)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"ce": cross_entropy, "hinge": hinge}


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r} (expected one of {', '.join(LOSSES)})")
    return LOSSES[name]


# --------------------------------------------------------------------------------------------------------
# Plaintext evaluator on a transformers model


class HFPlainEvaluator:
    """Plaintext evaluator on a local transformers checkpoint; the oracle for the MPC evaluator.

    Heads:

    - ``mlm`` (masked-LM models): the verbalizer logits at the ``{mask}`` position (BBT, eq. 3).
    - ``similarity`` (encoders without an MLM head, e.g. all-MiniLM-L6-v2): ``temperature * cos(u, v_c)`` where
      ``u`` is the mean-pooled last hidden state over the template tokens (soft-prompt positions excluded) and
      ``v_c`` the mean-pooled output for the description of class ``c`` (computed once, without a prompt).

    The soft prompt is inserted right after the first token. ``max_rows`` (population member x example
    pairs per forward call) bounds memory; the chunking is fixed, so results are bitwise reproducible.
    """

    mode = "plaintext"
    attention = "softmax"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        task: TaskSpec,
        *,
        head: str = "auto",
        max_length: int = 128,
        max_rows: int = 256,
        temperature: float = 20.0,
        model_name: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.task = task
        self.max_length = max_length
        self.max_rows = max_rows
        self.temperature = temperature
        self.model_name = model_name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self._mlm_head: Any = next((getattr(model, a) for a in ("cls", "lm_head") if hasattr(model, a)), None)
        if head == "auto":
            head = "mlm" if self._mlm_head is not None else "similarity"
        if head not in ("mlm", "similarity"):
            raise ConfigError(f"head must be 'auto', 'mlm' or 'similarity', got {head!r}")
        if head == "mlm" and self._mlm_head is None:
            raise ConfigError(f"{self.model_name}: head 'mlm' needs a masked-LM model (no cls/lm_head found)")
        self.head = head
        self.template = task.template if head == "mlm" else task.similarity_template
        emb = model.get_input_embeddings().weight.detach()
        self._embeddings = emb
        self.hidden_size = int(emb.shape[1])
        self.embedding_std = float(emb.std())
        self._cache: dict[tuple[tuple[str, ...], str, int], Encoded] = {}
        self._compute_s = 0.0
        self._calls = 0
        if head == "mlm":
            ids = [label_word_id(tokenizer, task.name, w) for w in task.words]
            self.label_ids = torch.tensor(ids, dtype=torch.int64)
        else:
            self.anchors = self._anchor_embeddings()

    @classmethod
    def from_pretrained(cls, path: str | Path, task: TaskSpec, **kwargs: Any) -> HFPlainEvaluator:
        """Load model and tokenizer from a local directory (a masked-LM if its config says so)."""
        from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: not a model directory (no config.json)")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        is_mlm = any(a.endswith("ForMaskedLM") for a in (config.architectures or []))
        auto = AutoModelForMaskedLM if is_mlm else AutoModel
        model = auto.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # pip-packaged checkpoints keep weights in <package>/model: name them after the package
        kwargs.setdefault("model_name", path.parent.name if path.name == "model" else path.name)
        return cls(model, tokenizer, task, **kwargs)

    @torch.no_grad()
    def _anchor_embeddings(self) -> torch.Tensor:
        descs = [Example((d,), 0) for d in self.task.label_descriptions]
        enc = encode_examples(self.tokenizer, "{text}", descs, self.max_length, 0)
        out = self.model.base_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        return F.normalize(_mean_pool(out, enc.attention_mask), dim=-1)  # (n_labels, H)

    def init_prompt(self, n_prompt: int, seed: int, text: str | None = None) -> torch.Tensor:
        return initial_prompt(self._embeddings, self.tokenizer, n_prompt, seed, text)

    def cost(self) -> EvalCost | None:
        return None

    @property
    def forward_calls(self) -> int:
        return self._calls

    def encode(self, batch: Batch, n_prompt: int) -> Encoded:
        key = batch.cache_key(n_prompt)
        if key not in self._cache:
            self._cache[key] = encode_examples(self.tokenizer, self.template, batch.examples, self.max_length, n_prompt)
        return self._cache[key]

    @torch.no_grad()
    def logits(self, prompts: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Label logits ``(P, B, n_labels)`` for ``prompts`` ``(P, n_prompt, hidden)``."""
        if prompts.dim() != 3 or prompts.shape[2] != self.hidden_size:
            raise ConfigError(f"prompts: expected (P, n_prompt, {self.hidden_size}), got {tuple(prompts.shape)}")
        start = time.perf_counter()
        n_pop, n_prompt = prompts.shape[0], prompts.shape[1]
        enc = self.encode(batch, n_prompt)
        n_ex = enc.input_ids.shape[0]
        tok = self.model.get_input_embeddings()(enc.input_ids)  # (B, L, H)
        prompts = prompts.to(tok.dtype)
        out = torch.empty(n_pop * n_ex, self.task.n_labels, dtype=torch.float32)
        for lo in range(0, n_pop * n_ex, self.max_rows):
            rows = torch.arange(lo, min(lo + self.max_rows, n_pop * n_ex))
            p_idx, b_idx = rows // n_ex, rows % n_ex
            t = tok[b_idx]  # (R, L, H)
            emb = torch.cat([t[:, :1], prompts[p_idx], t[:, 1:]], dim=1)  # (R, 1 + n_prompt + L - 1, H)
            att = enc.attention_mask[b_idx]
            ones = torch.ones(len(rows), n_prompt, dtype=att.dtype)
            att = torch.cat([att[:, :1], ones, att[:, 1:]], dim=1)
            hid = self.model.base_model(inputs_embeds=emb, attention_mask=att).last_hidden_state  # (R, T, H)
            if self.head == "mlm":
                at_mask = hid[torch.arange(len(rows)), enc.mask_pos[b_idx] + n_prompt]  # (R, H)
                out[rows] = self._mlm_head(at_mask)[:, self.label_ids].float()
            else:
                pool_mask = att.clone()
                pool_mask[:, 1 : 1 + n_prompt] = 0  # pool over the template tokens only
                u = F.normalize(_mean_pool(hid, pool_mask), dim=-1)
                out[rows] = (self.temperature * u @ self.anchors.T).float()
            self._calls += 1
        self._compute_s += time.perf_counter() - start
        return out.reshape(n_pop, n_ex, self.task.n_labels)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (R, T, H) over positions where ``mask`` (R, T) is 1 (sentence-transformers pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
