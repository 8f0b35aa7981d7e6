"""Classification heads that compute only what is needed: logits (B, n_labels).

:class:`MaskedLMHead` (checkpoints with an MLM head: BertForMaskedLM, RobertaForMaskedLM,
DistilBertForMaskedLM): the <mask> position of each example is selected with a private one-hot
(one product, exact: the one-hot has scale 0), the transform (dense, activation, LayerNorm) runs on that one
vector per example, and only the verbalizer rows of the decoder are kept, never the full vocabulary
(a label with several words gets the mean of their rows, i.e. the mean of their logits).

:class:`SimilarityHead` (encoders without an MLM head, e.g. all-MiniLM-L6-v2): the mean-pooled output
(over the valid positions, prompt included: sentence-transformers' pooling) is compared with label
embeddings computed by the same model on label words or descriptions (:func:`label_embeddings`, done once by
the model owner in plaintext, then shared). ``metric="cosine"``: logit = scale * cos(pooled, e_l), the
model's native similarity (it was trained with cosine), one rsqrt per example under MPC;
``metric="dot"``: logit = scale * pooled . e_l with unit e_l, no non-linear op but unnormalised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import Tensor

from secfwt.errors import ConfigError
from secfwt.nn.backend import Backend, PlainBackend, V
from secfwt.nn.config import EncoderConfig
from secfwt.nn.encoder import Encoder, EncoderOutput

W = TypeVar("W")


@dataclass
class MaskedLMHead(Generic[V]):
    """MLM transform + verbalizer rows. Params: dense.{weight,bias}, ln.{weight,bias}, decoder (L, H), bias (L,)."""

    cfg: EncoderConfig
    p: dict[str, V]
    label_token_ids: tuple[tuple[int, ...], ...]

    @classmethod
    def from_encoder(cls, enc: Encoder[Tensor], label_token_ids: Sequence[int | Sequence[int]]) -> MaskedLMHead[Tensor]:
        """Keep the transform and the decoder rows of the verbalizer tokens (one entry per label)."""
        if not enc.has_mlm_head:
            src = enc.config.source or "the checkpoint"
            raise ConfigError(f"{src}: no masked-LM head (cls.predictions / lm_head / vocab_transform); "
                              "use SimilarityHead")
        ids = tuple((i,) if isinstance(i, int) else tuple(i) for i in label_token_ids)
        v = enc.config.vocab_size
        for group in ids:
            if not group or any(not 0 <= i < v for i in group):
                raise ConfigError(f"label token ids {group}: each label needs ids in [0, {v})")
        dec, bias = enc.params["mlm.decoder"], enc.params["mlm.bias"]
        rows = torch.stack([dec[list(g)].mean(0) for g in ids])  # (L, H)
        brow = torch.stack([bias[list(g)].mean() for g in ids])  # (L,)
        p = {k[len("mlm."):]: t for k, t in enc.params.items()
             if k.startswith("mlm.") and k not in ("mlm.decoder", "mlm.bias")}
        p.update({"decoder": rows, "bias": brow})
        return MaskedLMHead(enc.config, p, ids)

    def map_params(self, fn: Callable[[str, V], W]) -> MaskedLMHead[W]:
        return MaskedLMHead(self.cfg, {k: fn("mlm." + k, t) for k, t in self.p.items()}, self.label_token_ids)

    def forward(self, be: Backend[V], out: EncoderOutput[V], mask_one_hot: V) -> V:
        """mask_one_hot: private (B, T) over the input tokens (prompt excluded) -> logits (B, L)."""
        with be.scope("head"):
            b, t_full, h = be.shape(out.hidden)
            oh = mask_one_hot
            if out.n_prompt:
                zeros = be.const(torch.zeros(b, out.n_prompt, dtype=torch.float64))
                oh = be.cat([be.index(oh, (slice(None), slice(0, 1))), zeros,
                             be.index(oh, (slice(None), slice(1, None)))], dim=1)  # (B, T + P)
            if be.shape(oh) != (b, t_full):
                raise ValueError(f"mask_one_hot: expected {(b, t_full - out.n_prompt)}, got {be.shape(mask_one_hot)}")
            x = be.matmul(be.reshape(oh, (b, 1, t_full)), out.hidden)  # (B, 1, H)
            x = be.reshape(x, (b, h))  # (B, H)
            x = be.linear(x, self.p["dense.weight"], self.p["dense.bias"])
            x = be.gelu(x) if self.cfg.act == "gelu" else be.relu(x)
            x = be.layernorm(x, self.p["ln.weight"], self.p["ln.bias"], self.cfg.layer_norm_eps)
            return be.linear(x, self.p["decoder"], self.p["bias"])  # (B, L)


@dataclass
class SimilarityHead(Generic[V]):
    """Mean pooling vs label embeddings (L, H) (unit norm). ``scale`` multiplies the logits."""

    label_emb: V
    metric: str = "cosine"
    scale: float = 20.0
    include_prompt: bool = True
    sq_norm_range: tuple[float, float] = (2.0**-6, 2.0**10)

    def __post_init__(self) -> None:
        if self.metric not in ("cosine", "dot"):
            raise ConfigError(f"similarity metric: expected 'cosine' or 'dot', got {self.metric!r}")

    def map_params(self, fn: Callable[[str, V], W]) -> SimilarityHead[W]:
        return SimilarityHead(fn("label_emb", self.label_emb), self.metric, self.scale, self.include_prompt,
                              self.sq_norm_range)

    def forward(self, be: Backend[V], out: EncoderOutput[V]) -> V:
        with be.scope("head"):
            mask = out.mask.clone()  # (B, T + P), public
            if not self.include_prompt and out.n_prompt:
                mask[:, 1 : 1 + out.n_prompt] = 0
            pooled = mean_pool(be, out.hidden, mask)  # (B, H)
            logits = be.linear(pooled, self.label_emb, None)  # (B, L)
            if self.metric == "cosine":
                lo, hi = self.sq_norm_range
                r = be.rsqrt(be.sum(be.square(pooled), dim=-1, keepdim=True), lo, hi)  # (B, 1)
                logits = be.mul(logits, r)
            return be.mul_public(logits, self.scale)


def mean_pool(be: Backend[V], hidden: V, mask: Tensor) -> V:
    """Mean of hidden (B, T, H) over the positions where the public mask (B, T) is 1 -> (B, H)."""
    b, t, _ = be.shape(hidden)
    s = be.sum(be.mul_mask(hidden, mask.reshape(b, t, 1)), dim=1)  # (B, H)
    return be.mul_public(s, 1.0 / mask.sum(dim=1, keepdim=True).to(torch.float64))


def label_embeddings(enc: Encoder[Tensor], label_ids: Sequence[Sequence[int]],
                     be: PlainBackend | None = None) -> Tensor:
    """Unit-norm mean-pooled embeddings (L, H) of tokenised label words/descriptions (each with its special
    tokens, e.g. [CLS] ... [SEP]), computed in plaintext by the model owner with ``enc``'s attention."""
    be = be or PlainBackend()
    word = enc.params["emb.word"]
    rows = []
    for ids in label_ids:
        x = word[torch.tensor([list(ids)])].to(be.dtype)  # (1, T, H)
        out = enc.forward(be, x, torch.ones(1, len(ids)))
        rows.append(mean_pool(be, out.hidden, out.mask)[0])
    e = torch.stack(rows)
    return e / e.norm(dim=-1, keepdim=True)


__all__ = ["MaskedLMHead", "SimilarityHead", "label_embeddings", "mean_pool"]
