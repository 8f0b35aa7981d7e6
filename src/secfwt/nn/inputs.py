"""Input embeddings in two modes, and the private one-hot vectors the data owner provides.

The encoder consumes word embeddings (B, T, H) that are already looked up. Two ways to get them:

(a) **local** (:func:`embed_local`): the data owner holds the word-embedding table (the model owner disclosed
    it) and looks its token ids up itself, then secret-shares the (B, T, H) embeddings.
    Cost: the owner sends 8 B T H bytes (to server 1; server 0's share comes from a common PRG); no round
    between the servers. Leaks: the word-embedding table (vocab x H, ~6-20% of a BERT-base/-large model's
    weights; for MiniLM-L6 it is 11.7M of 22.7M parameters) to the data owner. The servers learn nothing.

(b) **private** (:func:`embed_private`): the owner shares one-hot(token ids) (B, T, vocab) as integers
    (scale 0) and the servers compute one-hot @ table under MPC, the table staying shared.
    Cost: the owner sends 8 B T V bytes (B=16, T=64, V=30522: 250 MB); one Beaver matrix product, 1 round,
    which opens both operands: 8 (B T V + V H) bytes per server (the table mask alone is 94 MB for MiniLM;
    it could be opened once and reused across forwards with the same weights, not implemented), and no
    truncation (the one-hot has scale 0, so the product is exact). Leaks: nothing to anyone.

In both modes the padding mask (hence each sentence's length) and the batch shape are public. The masked-LM
head needs the <mask> position of each example as a private one-hot (B, T) (:func:`position_one_hot`),
shared with scale 0 like the token one-hots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from secfwt.nn.backend import Backend, V


def check_inputs(be: Backend[V], inputs_embeds: V, attention_mask: Tensor, hidden: int) -> tuple[int, int]:
    """(B, T) of ``inputs_embeds`` (B, T, H) after checking H against the model and the public mask's shape."""
    b, t, h = be.shape(inputs_embeds)
    if h != hidden:
        raise ValueError(f"inputs_embeds: hidden size {h}, the model expects {hidden}")
    if tuple(attention_mask.shape) != (b, t):
        raise ValueError(f"attention_mask: expected shape {(b, t)}, got {tuple(attention_mask.shape)}")
    return b, t


def insert_prompt(be: Backend[V], x: V, prompt: V | None, at: int) -> tuple[V, int]:
    """x (B, T, H) -> (B, T + P, H) with the prompt (P, H) or (B, P, H) after the first ``at`` tokens."""
    if prompt is None:
        return x, 0
    b, t, h = be.shape(x)
    ps = be.shape(prompt)
    if len(ps) == 2:
        prompt = be.expand(be.reshape(prompt, (1, ps[0], ps[1])), (b, ps[0], ps[1]))  # (B, P, H)
    ps = be.shape(prompt)
    if len(ps) != 3 or ps[0] != b or ps[2] != h:
        raise ValueError(f"prompt: expected shape (P, {h}) or ({b}, P, {h}), got {ps}")
    if not 0 <= at <= t:
        raise ValueError(f"prompt_at: must be in [0, {t}], got {at}")
    head = be.index(x, (slice(None), slice(0, at)))  # (B, a, H)
    tail = be.index(x, (slice(None), slice(at, t)))  # (B, T - a, H)
    return be.cat([head, prompt, tail], dim=1), ps[1]


def embed_local(word_table: Tensor, input_ids: Tensor) -> Tensor:
    """Data-owner side of mode (a): look the ids (B, T) up in the disclosed table (vocab, H) -> (B, T, H)."""
    if int(input_ids.max()) >= word_table.shape[0] or int(input_ids.min()) < 0:
        raise ValueError(f"input_ids: ids must be in [0, {word_table.shape[0]}), "
                         f"got [{int(input_ids.min())}, {int(input_ids.max())}]")
    return word_table[input_ids]


def one_hot(input_ids: Tensor, vocab_size: int) -> Tensor:
    """Data-owner side of mode (b): one-hot(token ids) (B, T, vocab), float 0/1 (share it with scale 0)."""
    return torch.nn.functional.one_hot(input_ids.long(), vocab_size).to(torch.float64)


def embed_private(be: Backend[V], token_one_hot: V, word_table: V) -> V:
    """Mode (b) on the servers: one-hot (B, T, vocab) @ table (vocab, H) -> (B, T, H)."""
    with be.scope("embeddings"):
        return be.matmul(token_one_hot, word_table)


def position_one_hot(positions: Tensor, seq_len: int) -> Tensor:
    """One-hot (B, T) of one position per example (e.g. the <mask> token), to be shared by the owner."""
    return torch.nn.functional.one_hot(positions.long(), seq_len).to(torch.float64)


__all__ = ["check_inputs", "embed_local", "embed_private", "insert_prompt", "one_hot", "position_one_hot"]
