"""Rendering a template into token ids, with truncation that keeps the template and the mask.

The template is split at its placeholders; each literal and each text field is tokenised separately (as in
LM-BFF), the longest text field is truncated until ``n_prompt`` soft-prompt tokens still fit into
``max_length``, and the tokenizer's special tokens are added around the whole sequence. The soft prompt is
later inserted right after the first token (``[CLS]``/``<s>``), so ``mask_pos`` is shifted by ``n_prompt``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from secfwt.errors import ConfigError, DataError
from secfwt.tuning.data import Example

_SPLIT = re.compile(r"(\{text\}|\{text_a\}|\{text_b\}|\{mask\})")
_FIELD = {"{text}": 0, "{text_a}": 0, "{text_b}": 1}


@dataclass(frozen=True)
class Encoded:
    """A padded batch of rendered templates (without the soft prompt)."""

    input_ids: torch.Tensor  # (B, L) int64, right-padded
    attention_mask: torch.Tensor  # (B, L) int64
    mask_pos: torch.Tensor  # (B,) int64: position of the mask token, -1 when the template has none


def _segments(template: str) -> list[tuple[str, bool]]:
    """Template parts with "was there whitespace before this part" (literals are stripped)."""
    out: list[tuple[str, bool]] = []
    space_before = False
    for part in _SPLIT.split(template):
        if not part:
            continue
        if part in _FIELD or part == "{mask}":
            out.append((part, space_before and bool(out)))
            space_before = False
            continue
        stripped = part.strip()
        if stripped:
            out.append((stripped, (part[0].isspace() or space_before) and bool(out)))
        space_before = part[-1].isspace()
    return out


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_examples(
    tokenizer: Any, template: str, examples: Sequence[Example], max_length: int, n_prompt: int
) -> Encoded:
    """Token ids of ``template`` filled with each example, truncated so ``n_prompt`` prompt tokens fit."""
    segs = _segments(template)
    mask_id = tokenizer.mask_token_id
    if any(s == "{mask}" for s, _ in segs) and mask_id is None:
        raise ConfigError(f"template {template!r} has {{mask}} but the tokenizer has no mask token")
    prefix, suffix = special_tokens(tokenizer)
    n_special = len(prefix) + len(suffix)
    budget = max_length - n_prompt - n_special
    literal_ids = {s: _token_ids(tokenizer, (" " if sp else "") + s) for s, sp in segs if s not in _FIELD}
    rows: list[list[int]] = []
    mask_pos: list[int] = []
    for ex in examples:
        parts: list[list[int]] = []
        for s, sp in segs:
            if s in _FIELD:
                idx = _FIELD[s]
                if idx >= len(ex.texts):
                    raise DataError(f"template {template!r} needs {s} but the example has {len(ex.texts)} text(s)")
                parts.append(_token_ids(tokenizer, (" " if sp else "") + ex.texts[idx]))
            elif s == "{mask}":
                parts.append([mask_id])
            else:
                parts.append(list(literal_ids[s]))
        over = sum(map(len, parts)) - budget
        text_parts = [i for i, (s, _) in enumerate(segs) if s in _FIELD]
        while over > 0:
            longest = max(text_parts, key=lambda i: len(parts[i]))
            if len(parts[longest]) <= 1:
                raise ConfigError(f"max_length {max_length} too small for template {template!r} + {n_prompt} prompt")
            cut = min(over, len(parts[longest]) - 1)
            parts[longest] = parts[longest][: len(parts[longest]) - cut]
            over -= cut
        flat: list[int] = []
        pos = -1
        for (s, _), ids in zip(segs, parts, strict=True):
            if s == "{mask}":
                pos = len(flat)
            flat += ids
        rows.append(prefix + flat + suffix)
        mask_pos.append(pos + len(prefix) if pos >= 0 else -1)
    input_ids, att = pad_right(tokenizer, rows)
    return Encoded(input_ids, att, torch.tensor(mask_pos, dtype=torch.int64))


def pad_right(tokenizer: Any, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows -> ids (B, T) right-padded with the tokenizer's pad id (0 without one), mask (B, T) 0/1."""
    length = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), length), pad, dtype=torch.int64)
    att = torch.zeros((len(rows), length), dtype=torch.int64)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.int64)
        att[i, : len(r)] = 1
    return input_ids, att


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a single sequence ([CLS] and [SEP] for BERT)."""
    content = _token_ids(tokenizer, "hello")
    full = list(tokenizer("hello", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(content) + 1):
        if full[start : start + len(content)] == content:
            return full[:start], full[start + len(content) :]
    raise ConfigError("cannot locate the content tokens inside the tokenizer's special-token wrapping")


def label_word_id(tokenizer: Any, task_name: str, word: str) -> int:
    """The single token id of a verbalizer word (with a leading space first, for BPE vocabularies)."""
    for cand in (" " + word, word):
        ids = tokenizer(cand, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
    toks = tokenizer.tokenize(" " + word)
    raise ConfigError(f"task {task_name}: label word {word!r} is not one token for this tokenizer ({toks})")


def initial_prompt(table: torch.Tensor, tokenizer: Any, n_prompt: int, seed: int,
                   text: str | None = None) -> torch.Tensor:
    """``p0`` (n_prompt, H) from the word table the owner holds.

    ``text`` None: BBT's init, embeddings of ``n_prompt`` random non-special vocabulary tokens (seeded).
    Otherwise the embeddings of ``text``'s tokens (no special tokens; "text" init of prompt tuning, Lester et
    al. 2021): a task phrase the search starts from instead of random words. Its token count must be
    ``n_prompt``.
    """
    if text is not None:
        ids = _token_ids(tokenizer, text)
        if len(ids) != n_prompt:
            raise ConfigError(f"init text {text!r} is {len(ids)} tokens for this model's tokenizer, the prompt "
                              f"has {n_prompt}: pass --n-prompt {len(ids)}")
        return table[torch.tensor(ids, dtype=torch.int64)].clone()
    special = set(tokenizer.all_special_ids)
    g = torch.Generator().manual_seed(seed)
    picked: list[int] = []
    while len(picked) < n_prompt:
        i = int(torch.randint(0, table.shape[0], (1,), generator=g))
        if i not in special:
            picked.append(i)
    return table[torch.tensor(picked)].clone()
