"""The ring Z_2^64 and fixed-point encoding.

Ring elements are ``torch.int64`` tensors; addition, subtraction and multiplication wrap modulo 2^64
(two's complement), which is exactly arithmetic in Z_2^64. A real number ``x`` is encoded with ``f``
fractional bits as ``round(x * 2^f) mod 2^64`` and decoded by reading the element as a signed integer.

Matrix products: torch has no BLAS path for int64, so :func:`matmul` splits both operands into four
16-bit limbs, multiplies limb matrices with float64 BLAS (every partial sum is an integer below 2^53,
hence exact) and recombines the ten products whose shifts stay below 2^64.
"""

from __future__ import annotations

import torch
from torch import Tensor

RING_BITS = 64
LIMB_BITS = 16
N_LIMBS = RING_BITS // LIMB_BITS
_LIMB_MASK = (1 << LIMB_BITS) - 1
# k * (2^16-1)^2 * (number of limb pairs with the same shift, at most 4) must stay below 2^53.
_MAX_INNER = (1 << 53) // (4 * _LIMB_MASK * _LIMB_MASK)


def encode(x: Tensor | float, frac_bits: int) -> Tensor:
    """Encode reals as ring elements with ``frac_bits`` fractional bits.

    Raises ``OverflowError`` when a value does not fit in the signed range (|x| < 2^(62 - frac_bits)),
    which keeps one bit of head-room for the shifted truncation protocol.
    """
    t = torch.as_tensor(x, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError("encode: input contains NaN or infinity")
    limit = float(2 ** (62 - frac_bits))
    if t.numel() and t.abs().max().item() >= limit:
        raise OverflowError(
            f"encode: |x| = {t.abs().max().item():.4g} does not fit with {frac_bits} fractional bits "
            f"(expected |x| < 2^{62 - frac_bits})"
        )
    return torch.round(t * (2.0**frac_bits)).to(torch.int64)


def decode(x: Tensor, frac_bits: int) -> Tensor:
    """Decode ring elements (read as signed integers) with ``frac_bits`` fractional bits to float64."""
    if x.dtype != torch.int64:
        raise TypeError(f"decode: expected an int64 ring tensor, got {x.dtype}")
    # Split to keep float64 exact for the fractional part when |x| is large.
    hi = torch.div(x, 1 << 32, rounding_mode="floor")
    lo = x - hi * (1 << 32)
    return (hi.to(torch.float64) * 2.0**32 + lo.to(torch.float64)) / 2.0**frac_bits


def logical_rshift(x: Tensor, k: int) -> Tensor:
    """``x >> k`` reading ``x`` as an unsigned 64-bit integer (result in [0, 2^(64-k)))."""
    if k == 0:
        return x.clone()
    return (x >> k) & ((1 << (RING_BITS - k)) - 1)


def msb(x: Tensor) -> Tensor:
    """Most significant bit (the sign bit) of each element, as int64 0/1."""
    return (x < 0).to(torch.int64)


def lshift(x: Tensor, k: int) -> Tensor:
    """``x * 2^k`` modulo 2^64."""
    return x * (1 << k) if k < 63 else x * (-(1 << 63))


def _limbs(x: Tensor) -> list[Tensor]:
    return [((x >> (LIMB_BITS * i)) & _LIMB_MASK).to(torch.float64) for i in range(N_LIMBS)]


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``a @ b`` over Z_2^64 (torch.matmul broadcasting rules) through float64 BLAS.

    Cost: 10 float64 matrix products of the same shape as ``a @ b`` (grouped into 4 BLAS calls).
    The inner dimension is split into chunks of at most 2^19 so every partial sum stays exact.
    """
    if a.dtype != torch.int64 or b.dtype != torch.int64:
        raise TypeError(f"ring.matmul: expected int64 tensors, got {a.dtype} and {b.dtype}")
    if a.dim() == 1 or b.dim() == 1:
        a2 = a.unsqueeze(0) if a.dim() == 1 else a
        b2 = b.unsqueeze(-1) if b.dim() == 1 else b
        out = matmul(a2, b2)
        if a.dim() == 1:
            out = out.squeeze(-2)
        if b.dim() == 1:
            out = out.squeeze(-1)
        return out
    k = a.shape[-1]
    if k != b.shape[-2]:
        raise ValueError(f"ring.matmul: inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    if k > _MAX_INNER:
        parts = [matmul(a[..., s : s + _MAX_INNER], b[..., s : s + _MAX_INNER, :]) for s in range(0, k, _MAX_INNER)]
        return torch.stack(parts).sum(0)
    al, bl = _limbs(a), _limbs(b)
    n = b.shape[-1]
    acc: list[Tensor | None] = [None] * N_LIMBS
    for i in range(N_LIMBS):
        # One BLAS call per limb of a against the concatenated limbs of b that still matter.
        width = N_LIMBS - i
        bcat = torch.cat(bl[:width], dim=-1)
        prod = torch.matmul(al[i], bcat)
        for j in range(width):
            part = prod[..., j * n : (j + 1) * n]
            prev = acc[i + j]
            acc[i + j] = part if prev is None else prev + part
    out = torch.zeros(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], n), dtype=torch.int64)
    for s in range(N_LIMBS):
        part_s = acc[s]
        assert part_s is not None
        out = out + lshift(part_s.to(torch.int64), LIMB_BITS * s)
    return out


def matmul_reference(a: Tensor, b: Tensor) -> Tensor:
    """Plain int64 ``a @ b`` (wraps modulo 2^64): slow, used as the oracle in tests and benchmarks."""
    return torch.matmul(a, b)
