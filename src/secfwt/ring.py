"""The ring Z_2^64 and fixed-point encoding.

Ring elements are ``torch.int64`` tensors; addition, subtraction and multiplication wrap modulo 2^64
(two's complement), which is exactly arithmetic in Z_2^64. A real number ``x`` is encoded with ``f``
fractional bits as ``round(x * 2^f) mod 2^64`` and decoded by reading the element as a signed integer.

Matrix products (:func:`matmul`) run one of two exact kernels, chosen per shape class by timing both on
this machine at first use (:mod:`secfwt.ring_kernels`): torch's int64 matmul, or three signed limbs
multiplied with float64 BLAS. :func:`kernel_report` says which was chosen and why.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from secfwt import ring_kernels
from secfwt.ring_kernels import RightOperand

__all__ = ["RING_BITS", "RightOperand", "decode", "encode", "kernel_report", "logical_rshift", "lshift", "matmul",
           "matmul_reference", "msb"]

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


# The process's kernel choices: they describe this machine and torch build, not any party's state.
_CHOOSER = ring_kernels.KernelChooser()


def matmul(a: Tensor, b: Tensor | RightOperand, *, kernel: str | None = None) -> Tensor:
    """Exact ``a @ b`` over Z_2^64 (torch.matmul broadcasting rules, int64 in and out).

    ``kernel``: ``"int64"`` (torch's int64 matmul), ``"limbs"`` (three signed limbs, six float64 BLAS
    products, exact for any inner dimension by chunks of 2^11) or ``"auto"``; ``None`` reads
    ``SECFWT_MATMUL_KERNEL`` (default ``auto``). ``auto`` uses the kernel measured fastest on this machine
    for the product's shape class, among those that agreed bit-for-bit with the limbs
    (:class:`secfwt.ring_kernels.KernelChooser`). A :class:`RightOperand` is a right matrix prepared once.
    Raises ``TypeError`` for non-int64 operands, ``ValueError`` for different inner dimensions and
    :class:`secfwt.errors.ConfigError` for an unknown kernel name.
    """
    mode = ring_kernels.env_mode() if kernel is None else kernel
    if isinstance(b, RightOperand):
        if a.dtype != torch.int64 or a.dim() < 2:
            raise TypeError(f"ring.matmul: expected an int64 matrix on the left, got {a.dtype} with {a.dim()} dims")
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"ring.matmul: inner dimensions differ: {tuple(a.shape)} @ {b.shape}")
        name = _CHOOSER.kernel_for(tuple(a.shape), b.shape, True, mode)
        return _CHOOSER.kernels[name](a, b)
    if a.dtype != torch.int64 or b.dtype != torch.int64:
        raise TypeError(f"ring.matmul: expected int64 tensors, got {a.dtype} and {b.dtype}")
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError(f"ring.matmul: expected operands with at least 1 dim, got {a.dim()} and {b.dim()}")
    if a.dim() == 1 or b.dim() == 1:
        a2 = a.unsqueeze(0) if a.dim() == 1 else a
        b2 = b.unsqueeze(-1) if b.dim() == 1 else b
        res = matmul(a2, b2, kernel=mode)
        if a.dim() == 1:
            res = res.squeeze(-2)
        if b.dim() == 1:
            res = res.squeeze(-1)
        return res
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"ring.matmul: inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    name = _CHOOSER.kernel_for(tuple(a.shape), tuple(b.shape), False, mode)
    return _CHOOSER.kernels[name](a, b)


def kernel_report() -> dict[str, Any]:
    """The matmul kernel choices of this process so far: ``cpu`` (model name), ``torch`` (version),
    ``threads`` (torch's current thread count), ``mode`` (SECFWT_MATMUL_KERNEL), ``self_test`` (per kernel,
    "ok" or why it is not trusted), ``calibration_s`` (total time spent measuring) and ``classes``: per shape
    class its representative product, the kernel ``chosen``, ``times_s`` per kernel and the ``reason`` any
    kernel was left out. JSON-serialisable; ``ring_kernels.summary(report)`` gives one line."""
    return _CHOOSER.report()


def matmul_reference(a: Tensor, b: Tensor) -> Tensor:
    """Plain int64 ``a @ b`` (wraps modulo 2^64): used as the oracle in tests and benchmarks."""
    return torch.matmul(a, b)
