"""Test helpers: share plaintext values between the two servers and run protocols in-process."""

from __future__ import annotations

import torch

from secfwt import ring
from secfwt.share import AShare


def split(
    value: torch.Tensor, scale: int = 16, seed: int = 0, encoded: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uniformly random additive shares of ``value`` (encoded at ``scale`` unless ``encoded``)."""
    enc = value if encoded else ring.encode(value, scale)
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(-(2**63), 2**63 - 1, enc.shape, generator=g, dtype=torch.int64)
    return r, enc - r


def mine(ctx, shares: tuple[torch.Tensor, torch.Tensor], scale: int = 16) -> AShare:
    """This server's AShare of a value split with :func:`split`."""
    return AShare(shares[ctx.rank].clone(), scale)
