"""Decoder templates, where the soft prompt goes, and the token ids the data owner sends.

A causal LM reads its label from the next-token logits at the last position, so the task's decoder template
ends where the label word would follow (``TaskSpec.decoder_template``, e.g. SST-2
``"Review: {text}\\nSentiment:"`` with " negative" / " positive"; without one, the encoder template is cut at
``{mask}``). It is rendered as a plain string and tokenised (the tokenizer's own special tokens around it);
when too long, the text's tokens are cut from the end. Rows are right-padded.

Prompt positions (``PROMPT_POSITIONS``):

* ``"start"``: the soft prompt goes after the first token (:func:`prompt_position`); every token after it
  depends on the candidate, so each (candidate, example) row is a whole forward.
* ``"after-text"``: the template is split after its last text placeholder (:func:`split_template`) into a
  *prefix* (special tokens + "Review: {text}") and a *tail* ("\\nSentiment:" + closing special tokens, the same
  for every example); the soft prompt goes between them. The prefix does not depend on the candidate, so its
  keys and values are computed once per example (:meth:`secfwt.nn.decoder.Decoder.prefill`) and each
  candidate runs only its P prompt vectors and the tail (docs/DECODER.md, "Prefix cache").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from secfwt.errors import ConfigError
from secfwt.tuning.data import Example
from secfwt.tuning.encode import label_word_id, pad_right, special_tokens
from secfwt.tuning.tasks import TaskSpec

PROMPT_POSITIONS = ("start", "after-text")
_TEXT_FIELDS = ("{text}", "{text_a}", "{text_b}")


def decoder_template(task: TaskSpec) -> tuple[str, tuple[str, ...]]:
    """(template without a mask, label words): the task's decoder template, else its template cut at {mask}."""
    tpl = getattr(task, "decoder_template", None)
    words = tuple(getattr(task, "decoder_words", ()) or task.words)
    if tpl:
        return tpl, words
    return task.template.split("{mask}")[0].rstrip(), words


def split_template(template: str) -> tuple[str, str]:
    """(prefix, tail) of a decoder template, split right after its last text placeholder."""
    ends = [template.rfind(f) + len(f) for f in _TEXT_FIELDS if f in template]
    if not ends:
        raise ConfigError(f"template {template!r}: no text placeholder ({', '.join(_TEXT_FIELDS)})")
    cut = max(ends)
    if not template[cut:].strip():
        raise ConfigError(f"template {template!r}: nothing after the text, so prompt position 'after-text' has no "
                          "tail for the label to follow (add one, e.g. '\\nSentiment:')")
    return template[:cut], template[cut:]


def check_prompt_position(position: str) -> str:
    if position not in PROMPT_POSITIONS:
        raise ConfigError(f"prompt position: expected one of {PROMPT_POSITIONS}, got {position!r}")
    return position


@dataclass(frozen=True)
class DecoderBatch:
    input_ids: Tensor  # (B, T) right-padded
    attention_mask: Tensor  # (B, T) 0/1


def _fields(ex: Example) -> dict[str, str]:
    return {"text": ex.texts[0], "text_a": ex.texts[0], "text_b": ex.texts[-1]}


def _render(tokenizer: Any, template: str, fields: dict[str, str], lead: Sequence[int]) -> list[int]:
    return list(lead) + list(tokenizer(template.format(**fields), add_special_tokens=False)["input_ids"])


def encode_decoder(tokenizer: Any, template: str, examples: Sequence[Example], max_length: int, n_prompt: int,
                   lead: Sequence[int] | None = None, trail: Sequence[int] | None = None) -> DecoderBatch:
    """Render and tokenise each example between ``lead`` and ``trail`` (default: the tokenizer's own special
    tokens); cut the text's last tokens until ``n_prompt`` more fit in ``max_length``."""
    own_lead, own_trail = special_tokens(tokenizer)
    lead = own_lead if lead is None else lead
    trail = own_trail if trail is None else trail
    budget = max_length - n_prompt - len(trail)
    rows: list[list[int]] = []
    for ex in examples:
        fields = _fields(ex)
        ids = _render(tokenizer, template, fields, lead)
        if len(ids) > budget:
            key = "text_b" if "{text_b}" in template and len(ex.texts[-1]) > len(ex.texts[0]) else "text"
            toks = list(tokenizer(fields[key], add_special_tokens=False)["input_ids"])
            cut = len(toks)
            while len(ids) > budget:
                cut -= max(1, len(ids) - budget)
                if cut < 1:
                    raise ConfigError(f"max_length {max_length} too small for template {template!r} "
                                      f"+ {n_prompt} prompt tokens")
                short = tokenizer.decode(toks[:cut])
                f2 = dict(fields, **({"text_b": short} if key == "text_b" else {"text": short, "text_a": short}))
                ids = _render(tokenizer, template, f2, lead)
        rows.append(ids + list(trail))
    return DecoderBatch(*pad_right(tokenizer, rows))


def tail_ids(tokenizer: Any, template: str) -> list[int]:
    """Token ids of the template's tail (prompt position "after-text") with the closing special tokens."""
    return list(tokenizer(split_template(template)[1], add_special_tokens=False)["input_ids"]) + \
        special_tokens(tokenizer)[1]


def encode_prefixes(tokenizer: Any, template: str, examples: Sequence[Example], max_length: int,
                    n_prompt: int) -> DecoderBatch:
    """The examples' prefixes (prompt position "after-text"): leading special tokens + the template up to its
    last text placeholder, cut so that prefix + ``n_prompt`` + tail fit in ``max_length``."""
    prefix, _ = split_template(template)
    n_tail = len(tail_ids(tokenizer, template))
    return encode_decoder(tokenizer, prefix, examples, max_length - n_tail, n_prompt, trail=[])


def prompt_position(tokenizer: Any) -> int:
    """Where the soft prompt goes: after the tokenizer's prefix special tokens (BOS), and after at least one
    token: a LLaMA-family model's first position is its attention sink (massive activations, docs/DECODER.md),
    which should stay a real token (for SmolLM2, without BOS: the template's first token)."""
    return max(len(special_tokens(tokenizer)[0]), 1)


def label_token_ids(tokenizer: Any, task: TaskSpec) -> list[list[int]]:
    return [[label_word_id(tokenizer, task.name, w.strip())] for w in decoder_template(task)[1]]


def prefix_key(ids: Tensor, mask: Tensor) -> tuple[int, ...]:
    """The cache key of one encoded prefix: its valid token ids."""
    return tuple(int(i) for i in ids[: int(mask.sum())].tolist())


def by_length(mask: Tensor) -> Tensor:
    """Row order by token count (stable): chunks of neighbours then pad to similar lengths."""
    return torch.argsort(mask.sum(1), stable=True)


__all__ = ["PROMPT_POSITIONS", "DecoderBatch", "by_length", "check_prompt_position", "decoder_template",
           "encode_decoder", "encode_prefixes", "label_token_ids", "prefix_key", "prompt_position",
           "split_template", "tail_ids"]
