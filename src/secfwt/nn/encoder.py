"""ONE transformer encoder definition (BERT, RoBERTa, DistilBERT: post-LN blocks) over any :class:`Backend`.

Inputs are word embeddings already looked up (see :mod:`secfwt.nn.inputs` for the local and private modes)
plus an optional soft prompt inserted right after the first token ([CLS] / <s>):

    x = [e_0, prompt_1..prompt_P, e_1..e_{T-1}]                              # (B, T + P, H)
    h = LayerNorm(x + pos[offset : offset + T + P] + type[token_type_ids])  # token type 0 on the prompt

then ``n_layers`` blocks ``h = LN(h + Attention(h)); h = LN(h + FFN(h))``. The padding mask (B, T) is public;
the prompt positions are always valid. Usage::

    enc = Encoder.from_pretrained(model_dir, attention=AttentionConfig("rfa"))       # Encoder[Tensor]
    out = enc.forward(PlainBackend(), embeds, mask, prompt=prompt)                  # plaintext
    enc_s = enc.map_params(be.share_plain)   # or share files; then enc_s.forward(MpcBackend(ctx), ...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch
from torch import Tensor

from secfwt.errors import ConfigError
from secfwt.nn.attention import SelfAttention
from secfwt.nn.backend import Backend, V
from secfwt.nn.config import AttentionConfig, EncoderConfig
from secfwt.nn.inputs import check_inputs, insert_prompt
from secfwt.nn.weights import map_checkpoint, read_checkpoint

W = TypeVar("W")


def _sub(params: dict[str, V], prefix: str) -> dict[str, V]:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


@dataclass
class Embeddings(Generic[V]):
    """Prompt insertion, position and token-type embeddings, LayerNorm. Params: ``emb.*`` (no word table)."""

    cfg: EncoderConfig
    p: dict[str, V]

    def forward(self, be: Backend[V], embeds: V, prompt: V | None, token_type_ids: Tensor | None) -> V:
        cfg = self.cfg
        b, t, h = be.shape(embeds)
        x = embeds
        x, n_prompt = insert_prompt(be, x, prompt, 1)  # (B, T + P, H): the prompt after [CLS]
        total = t + n_prompt
        if total > cfg.max_tokens:
            raise ValueError(f"sequence of {t} tokens + {n_prompt} prompt vectors exceeds the model's "
                             f"{cfg.max_tokens} positions")
        pos = be.index(self.p["position"], slice(cfg.position_offset, cfg.position_offset + total))  # (T', H)
        x = be.add(x, pos)
        if cfg.type_vocab_size > 0:
            if token_type_ids is None:
                x = be.add(x, be.index(self.p["token_type"], 0))  # (H,) broadcast
            else:
                tt = insert_prompt_positions(token_type_ids.long(), n_prompt, 0)  # (B, T')
                x = be.add(x, be.index(self.p["token_type"], tt))  # (B, T', H)
        with be.scope("layernorm"):
            return be.layernorm(x, self.p["ln.weight"], self.p["ln.bias"], cfg.layer_norm_eps)


@dataclass
class FeedForward(Generic[V]):
    """Linear (H -> I), activation, linear (I -> H). Params: ``in.*``, ``out.*``."""

    cfg: EncoderConfig
    p: dict[str, V]

    def forward(self, be: Backend[V], h: V) -> V:
        u = be.linear(h, self.p["in.weight"], self.p["in.bias"])  # (B, T, I)
        u = be.gelu(u) if self.cfg.act == "gelu" else be.relu(u)
        return be.linear(u, self.p["out.weight"], self.p["out.bias"])  # (B, T, H)


@dataclass
class EncoderLayer(Generic[V]):
    """One post-LN block: LN(h + attention(h)), then LN(h + ffn(h))."""

    cfg: EncoderConfig
    attn_cfg: AttentionConfig
    index: int
    p: dict[str, V]

    def forward(self, be: Backend[V], h: V, mask: Tensor) -> V:
        eps = self.cfg.layer_norm_eps
        with be.scope("attention"):
            a = SelfAttention(self.cfg, self.attn_cfg, self.index, _sub(self.p, "attn.")).forward(be, h, mask)
        with be.scope("layernorm"):
            h = be.layernorm(be.add(h, a), self.p["attn_ln.weight"], self.p["attn_ln.bias"], eps)
        with be.scope("ffn"):
            f = FeedForward(self.cfg, _sub(self.p, "ffn.")).forward(be, h)
        with be.scope("layernorm"):
            return be.layernorm(be.add(h, f), self.p["ffn_ln.weight"], self.p["ffn_ln.bias"], eps)


@dataclass
class EncoderOutput(Generic[V]):
    """Final hidden states (B, T + P, H), the public mask (B, T + P) and the prompt length P."""

    hidden: V
    mask: Tensor
    n_prompt: int


@dataclass
class Encoder(Generic[V]):
    """A BERT-family encoder: configuration, attention choice and canonical params (see nn/weights.py)."""

    config: EncoderConfig
    params: dict[str, V]
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, attention: AttentionConfig | None = None,
                        dtype: torch.dtype = torch.float64) -> Encoder[Tensor]:
        """Load a local HF directory offline: config via AutoConfig, tensors via safetensors.

        Every tensor is mapped to its canonical name and its shape checked against the config before use;
        errors name the file and the tensor. The MLM head (if any) is kept under ``mlm.*``.
        """
        cfg = EncoderConfig.from_hf(check_model_dir(model_dir))
        ck = read_checkpoint(model_dir)
        params = {k: v.to(dtype) for k, v in map_checkpoint(ck, cfg, cfg.source).items()}
        return Encoder(cfg, params, attention or AttentionConfig())

    @property
    def has_mlm_head(self) -> bool:
        return "mlm.dense.weight" in self.params

    def with_attention(self, attention: AttentionConfig) -> Encoder[V]:
        return dataclasses.replace(self, attention=attention)

    def map_params(self, fn: Callable[[str, V], W], keep_word_embeddings: bool = False) -> Encoder[W]:
        """Convert every encoder-body param (e.g. to shares); the MLM head and, unless asked, the word table
        are dropped (heads keep only the rows they need, see :mod:`secfwt.nn.heads`)."""
        keep = {k: fn(k, v) for k, v in self.params.items()
                if not k.startswith("mlm.") and (keep_word_embeddings or k != "emb.word")}
        return Encoder(self.config, keep, self.attention)

    def fuse_qkv(self, be: Backend[V]) -> Encoder[V]:
        """The same encoder with each layer's q, k and v projections stacked once into ``attn.qkv.weight``
        (3H, H) and ``attn.qkv.bias`` (3H,), which :class:`~secfwt.nn.attention.SelfAttention` uses when present
        (otherwise it stacks them in every forward). Servers call it before fixing the weights' Beaver masks,
        so the stacked matrix is opened once per session instead of in every forward."""
        params = dict(self.params)
        for i in range(self.config.n_layers):
            pre = f"layer.{i}.attn."
            names = [f"{pre}{x}.{kind}" for kind in ("weight", "bias") for x in "qkv"]
            if not all(n in params for n in names):
                continue
            ws, bs = [params.pop(n) for n in names[:3]], [params.pop(n) for n in names[3:]]
            params[pre + "qkv.weight"], params[pre + "qkv.bias"] = be.cat(ws, dim=0), be.cat(bs, dim=0)
        return Encoder(self.config, params, self.attention)

    def forward(self, be: Backend[V], inputs_embeds: V, attention_mask: Tensor, prompt: V | None = None,
                token_type_ids: Tensor | None = None) -> EncoderOutput[V]:
        """inputs_embeds (B, T, H) word embeddings; attention_mask public (B, T) 0/1 with 1 at index 0;
        prompt (P, H) or (B, P, H) inserted after the first token; token_type_ids public (B, T) or None."""
        cfg = self.config
        _, t = check_inputs(be, inputs_embeds, attention_mask, cfg.hidden)
        with be.scope("embeddings"):
            x = Embeddings(cfg, _sub(self.params, "emb.")).forward(be, inputs_embeds, prompt, token_type_ids)
        n_prompt = be.shape(x)[1] - t
        mask = insert_prompt_positions(attention_mask.to(torch.float64), n_prompt, 1.0)  # (B, T + P)
        for i in range(cfg.n_layers):
            x = EncoderLayer(cfg, self.attention, i, _sub(self.params, f"layer.{i}.")).forward(be, x, mask)
        return EncoderOutput(x, mask, n_prompt)


def insert_prompt_positions(x: Tensor, n_prompt: int, fill: float | int) -> Tensor:
    """Public (B, T, ...) tensor -> (B, T + P, ...) with ``fill`` at the prompt positions 1..P."""
    if n_prompt == 0:
        return x
    pad = torch.full((x.shape[0], n_prompt, *x.shape[2:]), fill, dtype=x.dtype)
    return torch.cat([x[:, :1], pad, x[:, 1:]], dim=1)


def check_model_dir(model_dir: str | Path) -> Path:
    p = Path(model_dir)
    if not p.is_dir():
        raise ConfigError(f"{p}: model directory does not exist")
    return p


__all__ = ["Embeddings", "Encoder", "EncoderLayer", "EncoderOutput", "FeedForward", "insert_prompt_positions"]
