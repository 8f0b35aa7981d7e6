"""Rotary position embeddings (Su et al., "RoFormer", 2021, eq. 34) as a PUBLIC linear map.

Positions are public, so for every position t the rotation is fixed: with the HF Llama layout
(rotate_half pairs dimension i with i + d/2)

    rope(x)_t = x_t * cos_t + rotate_half(x_t) * sin_t,   rotate_half(x) = [-x2, x1]
              = x_t * cos_t + swap(x_t) * sin~_t,        swap(x) = [x2, x1],  sin~ = [-sin1, sin2]

so the sign of rotate_half is folded into the public table and swap is a local index permutation. Under MPC
this is two multiplications by public tables summed before ONE truncation (``Backend.mul_public_sum``):
1 round, 8 bytes per element per server. A public scale (e.g. the attention's 1/sqrt(d)) is folded into the
tables for free.
"""

from __future__ import annotations

import torch
from torch import Tensor

from secfwt.nn.backend import Backend, V


def rope_tables(head_dim: int, n_positions: int, theta: float, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Public (cos, signed sin) tables (T, d), float64, times ``scale``; HF ``default`` rope parameters.

    inv_freq_i = theta^(-2i/d) (i < d/2); angle_{t,i} = t inv_freq_i, repeated for both halves.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (d/2,)
    ang = torch.outer(torch.arange(n_positions, dtype=torch.float64), inv_freq)  # (T, d/2)
    cos = torch.cat([ang.cos(), ang.cos()], dim=-1) * scale  # (T, d)
    sin = torch.cat([-ang.sin(), ang.sin()], dim=-1) * scale  # (T, d): sign of rotate_half folded in
    return cos, sin


def swap_halves(be: Backend[V], x: V) -> V:
    """[x1, x2] -> [x2, x1] along the last dim (local)."""
    d = be.shape(x)[-1]
    h = d // 2
    return be.cat([be.index(x, (Ellipsis, slice(h, d))), be.index(x, (Ellipsis, slice(0, h)))], dim=-1)


def apply_rope(be: Backend[V], x: V, cos: Tensor, sin: Tensor) -> V:
    """x (..., T, d) rotated by the public tables (T, d) from :func:`rope_tables`."""
    return be.mul_public_sum([x, swap_halves(be, x)], [cos, sin])


__all__ = ["apply_rope", "rope_tables", "swap_halves"]
