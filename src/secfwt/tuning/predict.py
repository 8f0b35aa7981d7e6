"""Private inference with a tuned prompt: label new texts (or score a labelled split) with one evaluator call.

The data owner renders each text with the task template, prepends its tuned soft prompt and gets back the
label logits (under MPC: shares revealed only to it, exactly as in tuning — one batched forward, the servers
learn neither the texts, the prompt nor the predictions). ``classify`` is backend-agnostic: it runs on the
plaintext evaluator too, which is the oracle the MPC predictions are compared with.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from secfwt.errors import ConfigError, DataError
from secfwt.tuning.data import Example
from secfwt.tuning.objective import Batch, Evaluator
from secfwt.tuning.tasks import TaskSpec


@dataclass(frozen=True)
class Prediction:
    """One labelled text: the predicted class, its label name and the class probabilities (softmax of logits)."""

    texts: tuple[str, ...]
    index: int
    label: str
    probs: tuple[float, ...]
    gold: int | None = None

    @property
    def correct(self) -> bool | None:
        return None if self.gold is None else self.gold == self.index


def classify(
    ev: Evaluator, prompt: torch.Tensor, task: TaskSpec, examples: Sequence[Example], labelled: bool = False,
) -> list[Prediction]:
    """Predict ``examples`` with ``prompt`` (n_prompt, hidden) (n_prompt may be 0: the template alone)."""
    if prompt.dim() != 2 or (prompt.shape[0] and prompt.shape[1] != ev.hidden_size):
        raise ConfigError(f"prompt: expected (n_prompt, {ev.hidden_size}), got {tuple(prompt.shape)}")
    if not examples:
        raise ConfigError("predict: no input texts")
    prompts = prompt[None] if prompt.shape[0] else torch.zeros(1, 0, ev.hidden_size)
    # A fresh name per call: predicting the same texts twice registers them twice, so the servers cannot tell
    batch = Batch.of(f"predict-{secrets.token_hex(8)}", examples)
    logits = ev.logits(prompts.float(), batch)[0].double()  # (B, L)
    probs = torch.softmax(logits, dim=-1)
    out = []
    for ex, p in zip(examples, probs, strict=True):
        i = int(torch.argmax(p))
        out.append(Prediction(ex.texts, i, task.labels[i], tuple(float(v) for v in p), ex.label if labelled else None))
    return out


def read_inputs(path: str | Path, task: TaskSpec) -> list[Example]:
    """Texts to label from a file: one example per line; for sentence-pair tasks the two parts tab-separated."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = tuple(line.split("\t")) if task.n_texts == 2 else (line.strip(),)
        if len(parts) != task.n_texts:
            raise DataError(f"{path}:{n}: task {task.name} expects {task.n_texts} tab-separated texts, "
                            f"got {len(parts)}")
        out.append(Example(parts, 0))
    if not out:
        raise DataError(f"{path}: no texts (expected one example per line)")
    return out


def texts_to_examples(texts: Sequence[str], task: TaskSpec) -> list[Example]:
    """``--text`` arguments; a pair task takes ``first<TAB>second``."""
    out = []
    for t in texts:
        parts = tuple(t.split("\t")) if task.n_texts == 2 else (t,)
        if len(parts) != task.n_texts:
            raise DataError(f"--text {t[:40]!r}: task {task.name} expects {task.n_texts} tab-separated texts")
        out.append(Example(parts, 0))
    return out


def accuracy_of(preds: Sequence[Prediction]) -> float:
    scored = [p.correct for p in preds if p.correct is not None]
    return sum(scored) / len(scored) if scored else float("nan")


__all__ = ["Prediction", "accuracy_of", "classify", "read_inputs", "texts_to_examples"]
