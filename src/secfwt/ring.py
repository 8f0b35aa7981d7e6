"""The ring Z_2^64 and fixed-point encoding.

Ring elements are ``torch.int64`` tensors; addition, subtraction and multiplication wrap modulo 2^64
(two's complement), which is exactly arithmetic in Z_2^64. A real number ``x`` is encoded with ``f``
fractional bits as ``round(x * 2^f) mod 2^64`` and decoded by reading the element as a signed integer.

Matrix products: torch has no BLAS path for int64, so :func:`matmul` splits both operands into three
signed limbs, multiplies limb matrices with float64 BLAS (every partial sum is an integer below 2^53,
hence exact) and recombines the six products whose shifts stay below 2^64.
"""

from __future__ import annotations

import torch
from torch import Tensor

RING_BITS = 64


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


# Signed limbs: x = l0 + l1 * 2^22 + l2 * 2^43 (mod 2^64) with l0 in [-2^21, 2^21), l1, l2 in [-2^20, 2^20).
LIMB_SHIFTS = (0, 22, 43)
_LIMB_WIDTHS = (22, 21, 21)
# |l_i * l_j| <= 2^42, so an inner dimension of 2^11 keeps every float64 partial sum below 2^53 (exact).
_MAX_INNER = 1 << 11


def _limbs(x: Tensor) -> list[Tensor]:
    out = []
    rest = x
    for width in _LIMB_WIDTHS:
        limb = (rest << (64 - width)) >> (64 - width)  # sign-extended low `width` bits
        out.append(limb.to(torch.float64))
        rest = (rest - limb) >> width
    return out


class RightOperand:
    """A ring matrix prepared once to be the right operand of many :func:`matmul` calls (a fixed weight):
    its limbs split and laid out as the BLAS calls read them, ``[l0 | l1 | l2]`` along the columns, per chunk
    of at most 2^11 inner rows. Stored as float32 (every limb has at most 22 bits: exact), 12 bytes per
    element, widened to float64 per call."""

    def __init__(self, b: Tensor) -> None:
        if b.dtype != torch.int64 or b.dim() < 2:
            raise TypeError(f"RightOperand: expected an int64 matrix, got {b.dtype} with {b.dim()} dims")
        self.shape = tuple(b.shape)
        k = b.shape[-2]
        self.chunks = [torch.cat(_limbs(b[..., s : s + _MAX_INNER, :]), dim=-1).to(torch.float32)
                       for s in range(0, k, _MAX_INNER)]


def matmul(a: Tensor, b: Tensor | RightOperand) -> Tensor:
    """Exact ``a @ b`` over Z_2^64 (torch.matmul broadcasting rules) through float64 BLAS.

    Both operands are split into three signed limbs (22, 21 and 21 bits, at shifts 0, 22 and 43). Only
    the six limb products whose shift is below 64 matter; they run as three BLAS calls (a's limb i
    against b's limbs concatenated along columns). Every product is an integer below 2^53 in magnitude
    when the inner dimension is at most 2^11, so float64 computes it exactly; longer inner dimensions are
    split into chunks. Cost: 6 float64 matrix products of the output's shape.
    """
    if isinstance(b, RightOperand):
        return _matmul_prepared(a, b)
    if a.dtype != torch.int64 or b.dtype != torch.int64:
        raise TypeError(f"ring.matmul: expected int64 tensors, got {a.dtype} and {b.dtype}")
    if a.dim() == 1 or b.dim() == 1:
        a2 = a.unsqueeze(0) if a.dim() == 1 else a
        b2 = b.unsqueeze(-1) if b.dim() == 1 else b
        res = matmul(a2, b2)
        if a.dim() == 1:
            res = res.squeeze(-2)
        if b.dim() == 1:
            res = res.squeeze(-1)
        return res
    k = a.shape[-1]
    if k != b.shape[-2]:
        raise ValueError(f"ring.matmul: inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    if k > _MAX_INNER:
        parts = [matmul(a[..., s : s + _MAX_INNER], b[..., s : s + _MAX_INNER, :]) for s in range(0, k, _MAX_INNER)]
        return torch.stack(parts).sum(0)
    return _combine(_limbs(a), torch.cat(_limbs(b), dim=-1), b.shape[-1])


def _combine(al: list[Tensor], bcat: Tensor, n: int) -> Tensor:
    """sum over limb pairs (i, j) with shift below 64 of (a_i @ b_j) << (s_i + s_j), from b's [l0 | l1 | l2]."""
    out: Tensor | None = None
    for i, si in enumerate(LIMB_SHIFTS):
        js = [j for j, sj in enumerate(LIMB_SHIFTS) if si + sj < RING_BITS]  # a prefix of (0, 1, 2)
        prod = torch.matmul(al[i], bcat[..., : len(js) * n]).to(torch.int64)
        for col, j in enumerate(js):
            part = lshift(prod[..., col * n : (col + 1) * n], si + LIMB_SHIFTS[j])
            out = part if out is None else out + part
    assert out is not None
    return out


def _matmul_prepared(a: Tensor, b: RightOperand) -> Tensor:
    if a.dtype != torch.int64 or a.dim() < 2:
        raise TypeError(f"ring.matmul: expected an int64 matrix on the left, got {a.dtype} with {a.dim()} dims")
    k, n = b.shape[-2], b.shape[-1]
    if a.shape[-1] != k:
        raise ValueError(f"ring.matmul: inner dimensions differ: {tuple(a.shape)} @ {b.shape}")
    out: Tensor | None = None
    for c, bcat in enumerate(b.chunks):
        part = _combine(_limbs(a[..., c * _MAX_INNER : (c + 1) * _MAX_INNER]), bcat.to(torch.float64), n)
        out = part if out is None else out + part
    assert out is not None
    return out


def matmul_reference(a: Tensor, b: Tensor) -> Tensor:
    """Plain int64 ``a @ b`` (wraps modulo 2^64): slow, used as the oracle in tests and benchmarks."""
    return torch.matmul(a, b)
