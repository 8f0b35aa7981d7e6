"""Label-word head of a causal LM: logits of the verbalizer tokens at the last valid position only.

The decoder's next-token distribution at the last valid position t_b of example b is
softmax(lm_head @ RMSNorm(h_{b, t_b})); a classifier needs only the L label-word rows of ``lm_head``
(tied to the token embeddings for SmolLM2), never the whole vocabulary (49152 x 576 for SmolLM2):

  1. select h_{b, t_b}: with right padding t_b = (number of valid tokens) - 1 is PUBLIC (the padding mask
     is public), so the selection is a multiplication by a public one-hot and a sum: local and exact.
     A private one-hot (B, T) shared by the data owner with scale 0 is also accepted (one Beaver product,
     exact) for deployments that hide the lengths' alignment;
  2. final RMSNorm of the B selected vectors only (one rsqrt per example under MPC);
  3. logits = x @ rows^T with rows (L, H) (a label with several token ids gets the mean of their rows).

Returned as shares under MPC (reveal them to the data owner, as with the encoder heads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import Tensor

from secfwt.errors import ConfigError
from secfwt.nn.backend import Backend, V
from secfwt.nn.decoder import RMS_RANGE, Decoder, DecoderOutput

W = TypeVar("W")


@dataclass
class LabelWordHead(Generic[V]):
    """Final RMSNorm weight (H,) and verbalizer rows (L, H) of the LM head."""

    norm: V
    rows: V
    eps: float
    label_token_ids: tuple[tuple[int, ...], ...]
    rms_range: tuple[float, float] = RMS_RANGE

    @classmethod
    def from_decoder(cls, dec: Decoder[Tensor],
                     label_token_ids: Sequence[int | Sequence[int]]) -> LabelWordHead[Tensor]:
        """Keep the final norm and the LM-head rows of the label words (one entry per label)."""
        ids = tuple((i,) if isinstance(i, int) else tuple(i) for i in label_token_ids)
        v = dec.config.vocab_size
        for group in ids:
            if not group or any(not 0 <= i < v for i in group):
                raise ConfigError(f"label token ids {group}: each label needs ids in [0, {v})")
        if "lm_head" not in dec.params or "norm.weight" not in dec.params:
            raise ConfigError("LabelWordHead.from_decoder: the decoder has no lm_head/norm.weight "
                              "(build the head before map_params)")
        lm = dec.params["lm_head"]
        rows = torch.stack([lm[list(g)].mean(0) for g in ids])  # (L, H)
        return LabelWordHead(dec.params["norm.weight"], rows, dec.config.rms_norm_eps, ids, dec.rms_range)

    def map_params(self, fn: Callable[[str, V], W]) -> LabelWordHead[W]:
        return LabelWordHead(fn("norm.weight", self.norm), fn("lm_head.rows", self.rows), self.eps,
                             self.label_token_ids, self.rms_range)

    def forward(self, be: Backend[V], out: DecoderOutput[V], select: V | None = None) -> V:
        """Logits (B, L) at the last valid position; ``select``: optional private one-hot (B, T + P)."""
        with be.scope("head"):
            b, t, h = be.shape(out.hidden)
            if select is None:
                onehot = last_position_one_hot(out.mask)  # (B, T + P), public
                x = be.sum(be.mul_mask(out.hidden, onehot.reshape(b, t, 1)), dim=1)  # (B, H)
            else:
                if be.shape(select) != (b, t):
                    raise ValueError(f"select: expected a one-hot of shape {(b, t)}, got {be.shape(select)}")
                x = be.reshape(be.matmul(be.reshape(select, (b, 1, t)), out.hidden), (b, h))  # (B, H)
            x = be.rmsnorm(x, self.norm, self.eps, self.rms_range)
            return be.linear(x, self.rows, None)  # (B, L)


def last_position_one_hot(mask: Tensor) -> Tensor:
    """Public one-hot (B, T) of the last valid position of each right-padded row of ``mask``."""
    last = mask.to(torch.float64).sum(dim=1).long() - 1  # (B,)
    return torch.nn.functional.one_hot(last, mask.shape[1]).to(torch.float64)


__all__ = ["LabelWordHead", "last_position_one_hot"]
