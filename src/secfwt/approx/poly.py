"""Polynomials and piecewise polynomials on shares, evaluated in log depth, and batching helpers.

Everything here is composed from :mod:`secfwt.protocols` (Beaver products, truncation, comparison); there
is no cryptography of its own. Scales: inputs have ``ctx.f`` fractional bits; polynomials run at a
*working scale* ``p`` (:func:`work_scale`) chosen so that every intermediate fits the truncation range
|v| < 2^62 of :func:`secfwt.protocols.arith.trunc`; public coefficients are encoded with ``ctx.f`` bits.

Log-depth evaluation (Estrin's scheme, folded into the last product): with ``h = 2^(L-1)`` and
``P(v) = A(v) + v^h B(v)`` (``A``, ``B`` of degree < h), levels 1..L-1 compute the powers
``v^(k+1..2k) = v^k * v^(1..k)`` (k = 2^(l-1)) in one batched product each; ``A`` and ``B`` are then local
linear combinations of the powers, and one last product ``v^h * B`` (left untruncated) finishes.
An optional shared factor ``g`` (``times``) is carried along the same products (``g v^j``), which gives
``g * P(v)`` in the same number of rounds (used by reciprocal and rsqrt).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.polynomial import Chebyshev, Polynomial
from torch import Tensor

from secfwt import ring
from secfwt.comm.base import SERVER0
from secfwt.context import PartyContext
from secfwt.protocols.arith import mul_aa, square_a, trunc
from secfwt.protocols.compare import ltz, range_bits
from secfwt.share import AShare, add, add_public, rescale_up, stack

# Intermediates must stay below 2^61 in absolute value (one bit of margin below trunc's 2^62).
_HEADROOM_BITS = 61
_MAX_EXTRA_BITS = 8  # the working scale is at most f + 8
# Public polynomial coefficients are encoded with min(f, 16) bits: for f <= 16 nothing changes; for larger f
# the 64-bit ring is better spent on the working scale p (the final product has scale 2p + coefficient bits).
_COEF_MAX_BITS = 16


# -- helpers ---------------------------------------------------------------------------------------------


def server0_public(ctx: PartyContext, value: Tensor | float, scale: int) -> Tensor:
    """``value`` encoded with ``scale`` bits on server 0, zeros on server 1 (a trivial sharing's data)."""
    enc = ring.encode(value, scale)
    return enc if ctx.rank == SERVER0 else torch.zeros_like(enc)


def to_scale(ctx: PartyContext, x: AShare, scale: int) -> AShare:
    """``x`` with ``scale`` fractional bits: a local shift when going up, a truncation (1 round) down."""
    return rescale_up(x, scale) if x.scale <= scale else trunc(ctx, x, x.scale - scale)


def trunc_many(ctx: PartyContext, xs: Sequence[AShare], scale: int) -> list[AShare]:
    """Bring several tensors to ``scale`` with ONE truncation call (1 round, 8 bytes/element).

    Tensors are first shifted up to the largest scale among them (exact, local), so every ``x * 2^(top -
    x.scale)`` must stay below 2^62 as a ring integer.
    """
    top = max(x.scale for x in xs)
    if top <= scale:
        return [rescale_up(x, scale) for x in xs]
    flat = torch.cat([rescale_up(x, top).data.reshape(-1) for x in xs])
    out = trunc(ctx, AShare(flat, top), top - scale).data
    res, i = [], 0
    for x in xs:
        res.append(AShare(out[i : i + x.numel()].reshape(x.shape), scale))
        i += x.numel()
    return res


def mul_exact_many(ctx: PartyContext, pairs: Sequence[tuple[AShare, AShare]]) -> list[AShare]:
    """Elementwise products of independent pairs in ONE Beaver round, without truncation.

    Each product keeps the scale ``a.scale + b.scale`` (use it when one factor is a 0/1 bit of scale 0,
    or when the caller truncates later). Operands are broadcast per pair; cost: 1 round,
    8 (|a| + |b|) bytes per server summed over the pairs.
    """
    shapes = [torch.broadcast_shapes(a.shape, b.shape) for a, b in pairs]
    xa = torch.cat([a.data.expand(s).reshape(-1) for (a, _), s in zip(pairs, shapes, strict=True)])
    xb = torch.cat([b.data.expand(s).reshape(-1) for (_, b), s in zip(pairs, shapes, strict=True)])
    z = mul_aa(ctx, AShare(xa, 0), AShare(xb, 0), out_scale=0).data
    res, i = [], 0
    for (a, b), s in zip(pairs, shapes, strict=True):
        n = math.prod(s)
        res.append(AShare(z[i : i + n].reshape(s), a.scale + b.scale))
        i += n
    return res


def coef_bits(ctx: PartyContext) -> int:
    """Fractional bits of the public coefficients in :func:`poly_eval`: min(f, 16)."""
    return min(ctx.f, _COEF_MAX_BITS)


def work_scale(ctx: PartyContext, bound_bits: int) -> int:
    """Working scale p of :func:`poly_eval` for results bounded by 2^bound_bits: 2p + c + bound <= 61, with c =
    :func:`coef_bits`; at most f + 8 (p = 18 for f = 16 and 5 bound bits; p < f once f > (56 - bound) / 3)."""
    return min(ctx.f + _MAX_EXTRA_BITS, (_HEADROOM_BITS - bound_bits - coef_bits(ctx)) // 2)


def poly_levels(degree: int) -> int:
    """Number of product levels L of :func:`poly_eval` for a polynomial of ``degree``: ceil(log2(d+1))."""
    return max(1, math.ceil(math.log2(degree + 1)))


# -- polynomials -----------------------------------------------------------------------------------------


def _coeff_tensor(coeffs: Sequence[float] | Tensor | np.ndarray, ndim: int) -> Tensor:
    cf = torch.as_tensor(np.asarray(coeffs, dtype=np.float64))
    return cf.reshape(-1, *([1] * ndim)) if cf.dim() == 1 else cf


def poly_eval(
    ctx: PartyContext,
    x: AShare,
    coeffs: Sequence[float] | Tensor | np.ndarray,
    times: AShare | None = None,
    bound_bits: int = 4,
    truncate: bool = True,
    out_scale: int | None = None,
) -> AShare:
    """``P(x) = sum_j coeffs[j] x^j`` (times a shared ``times`` factor if given), in log depth.

    ``coeffs`` is a sequence (one polynomial) or a tensor of shape (d+1, *s) with ``s`` broadcastable to
    x's shape (one polynomial per slice, e.g. per segment stacked along dim 0).

    Steps (L = ceil(log2(d+1)), h = 2^(L-1), see the module docstring): L-1 batched power levels at the
    working scale p = :func:`work_scale`; A and B as local linear combinations; one product v^h * B.
    Cost: 2L rounds (2L - 1 with ``truncate=False``, which returns scale 2p + c untruncated, c = :func:`coef_bits`);
    the result has ``out_scale`` fractional bits (default ``ctx.f``).
    Bytes per element per server, without ``times``: 16 (level 1: a square) + sum_{l=2}^{L-1} 8(1 + 2k_l)
    + 16 + 8 (final; the 8 only when truncating), k_l = 2^(l-1); degree 7: 80 (72 untruncated).
    With ``times``: sum_{l=1}^{L-1} 8(1 + 4k_l) + 24; degree 7: 136.
    Valid range: |x| <= 1 keeps powers bounded (any x for which all |x^j| and |P| fit 2^bound_bits);
    |P(x) * times| < 2^bound_bits. Error: fixed-point ~ (sum_j |c_j| j) 2^-p + (d + 1) 2^-(c+1)
    (coefficients, c = :func:`coef_bits`) + 2^-f (final truncation).
    Reference: Estrin's scheme (1960); powers batched as in CrypTen's polynomial evaluation.
    """
    with ctx.cost.scope("poly"):
        f = ctx.f
        cf = _coeff_tensor(coeffs, x.dim())
        d = cf.shape[0] - 1
        levels = poly_levels(d)
        h = 1 << (levels - 1)
        if cf.shape[0] < 2 * h:
            cf = torch.cat([cf, torch.zeros((2 * h - cf.shape[0], *cf.shape[1:]), dtype=torch.float64)])
        p = work_scale(ctx, bound_bits)
        cb = coef_bits(ctx)
        out_top = 2 * p + cb
        powers: dict[int, AShare] = {1: to_scale(ctx, x, p)}
        gs: dict[int, AShare] = {}
        if times is not None:
            shape = torch.broadcast_shapes(x.shape, times.shape)
            powers[1] = AShare(powers[1].data.expand(shape), p)
            gs[0] = AShare(to_scale(ctx, times, p).data.expand(shape), p)
        for lv in range(1, levels):
            k = 1 << (lv - 1)
            base = powers[k]
            factors = [powers[j] for j in range(1, k + 1)] + [gs[j] for j in range(k) if j in gs]
            if len(factors) == 1:
                prods = [square_a(ctx, base, out_scale=p)]
            else:
                z = mul_aa(ctx, base.unsqueeze(0), stack(factors, dim=0), out_scale=p)
                prods = [z[i] for i in range(len(factors))]
            for j in range(1, k + 1):
                powers[k + j] = prods[j - 1]
            if times is not None:
                for j in range(k):
                    gs[k + j] = prods[k + j]

        def linear(c: Tensor) -> AShare:
            """sum_j c[j] * (g) v^j for j < h, at scale p + cb (local, exact)."""
            enc = ring.encode(c, cb)
            if times is not None:
                terms = torch.stack([gs[j].data for j in range(h)])
                return AShare((terms * enc).sum(0), p + cb)
            acc = server0_public(ctx, c[0], p + cb)
            if h > 1:
                terms = torch.stack([powers[j].data for j in range(1, h)])
                acc = acc + (terms * enc[1:]).sum(0)
            return AShare(acc, p + cb)

        low, high = linear(cf[:h]), linear(cf[h : 2 * h])
        if times is None and h == 1:
            # Degree <= 1: B is public, so v * B is local.
            prod = AShare(powers[1].data * ring.encode(cf[1], cb), p + cb)
            out = add(rescale_up(prod, out_top), low)
        else:
            out = add(mul_aa(ctx, powers[h], high, out_scale=out_top), low)
        target = f if out_scale is None else out_scale
        return trunc(ctx, out, out_top - target) if truncate and out_top > target else out


# -- piecewise polynomials -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """One piece of a piecewise function.

    Either a polynomial ``coeffs`` in v = (x - center) / half_width (half_width a power of two, so v is
    exact and local), or, when ``coeffs`` is empty, ``slope * x + intercept`` with an integer slope (exact).
    """

    coeffs: tuple[float, ...] = ()
    center: float = 0.0
    half_width: float = 1.0
    slope: int = 0
    intercept: float = 0.0


@dataclass(frozen=True)
class PiecewiseSpec:
    """Pieces on (-inf, t_1), [t_1, t_2), ..., [t_K, inf) for sorted ``breakpoints`` t_1 < ... < t_K."""

    breakpoints: tuple[float, ...]
    pieces: tuple[Piece, ...]
    bound_bits: int = 4

    def __post_init__(self) -> None:
        if len(self.pieces) != len(self.breakpoints) + 1:
            raise ValueError("PiecewiseSpec: need exactly one more piece than breakpoints")
        if list(self.breakpoints) != sorted(self.breakpoints):
            raise ValueError("PiecewiseSpec: breakpoints must be sorted")

    @property
    def degree(self) -> int:
        return max((len(p.coeffs) - 1 for p in self.pieces if p.coeffs), default=0)


def fit_piecewise(
    fn: Callable[[np.ndarray], np.ndarray],
    breakpoints: Sequence[float],
    degree: int,
    left: Piece,
    right: Piece,
) -> PiecewiseSpec:
    """Chebyshev-interpolate ``fn`` with ``degree`` on each interior interval; ``left``/``right`` tails.

    Each interval [lo, hi] uses v = (x - center) / 2^m with 2^m >= (hi - lo) / 2, so v is in [-1, 1] and the
    monomial coefficients stay of the order of the function's values (no cancellation in 16-bit fixed point).
    """
    pieces = [left]
    bound = 1.0
    for lo, hi in zip(breakpoints[:-1], breakpoints[1:], strict=True):
        center = (lo + hi) / 2
        hw = 2.0 ** math.ceil(math.log2((hi - lo) / 2))
        a, b = (lo - center) / hw, (hi - center) / hw

        def scaled(v: np.ndarray, c: float = center, w: float = hw) -> np.ndarray:
            return fn(c + w * v)

        cheb = Chebyshev.interpolate(scaled, degree, domain=[a, b])
        mono = cheb.convert(kind=Polynomial, domain=[-1, 1], window=[-1, 1]).coef
        pieces.append(Piece(tuple(float(c) for c in mono), center, hw))
        bound = max(bound, float(np.abs(mono).sum()))
    pieces.append(right)
    return PiecewiseSpec(tuple(float(t) for t in breakpoints), tuple(pieces), math.ceil(math.log2(bound)) + 1)


def interval_bits(ctx: PartyContext, x: AShare, thresholds: Sequence[float], bits: int = 64) -> AShare:
    """Bits [x < t_k] for all public thresholds at once: ONE ltz call on the stacked differences.

    Returns shape (K, *x.shape), scale 0. Cost: 6 rounds, 19.625 K bytes per element per server (ltz: 8 + 93 / 8).
    ``bits`` < 64: a narrow :func:`~secfwt.protocols.compare.ltz` (exact only while every |x - t_k| < 2^(bits-1)
    in ring units; the caller states why): log2(w) rounds, bits / 8 + (3 w / 2 - 3) / 8 bytes per threshold.
    """
    diffs = [add_public(ctx, x, -float(t)) for t in thresholds]
    return ltz(ctx, stack(diffs, dim=0), bits)


def one_hot(ctx: PartyContext, bits: AShare) -> list[AShare]:
    """From bits c_k = [x < t_k] (sorted t) to the K+1 interval indicators (local, scale 0)."""
    one = server0_public(ctx, torch.ones(bits.shape[1:], dtype=torch.float64), 0)
    k = bits.shape[0]
    hs = [bits[0]]
    hs += [AShare(bits.data[i] - bits.data[i - 1], 0) for i in range(1, k)]
    hs.append(AShare(one - bits.data[k - 1], 0))
    return hs


def piecewise(ctx: PartyContext, x: AShare, spec: PiecewiseSpec, bound: float | None = None) -> AShare:
    """Evaluate a piecewise polynomial: y = sum_i [x in I_i] * piece_i(x), exactly selected.

    Steps:
      1. One batched ltz of x against all K breakpoints -> one-hot interval bits (6 rounds).
      2. All polynomial pieces evaluated together on the stacked local variables v_i = (x - c_i) / 2^m_i
         with :func:`poly_eval` (untruncated, 2L - 1 rounds).
      3. One round of exact bit products [bits * P_i, (sum_i slope_i bits_i) * x], then one truncation.
    Pieces evaluated outside their interval may wrap (garbage), but they are multiplied by an exact 0.
    Cost: 2L + 7 rounds (L = :func:`poly_levels` of the degree; 13 for degree 7). Bytes per element per
    server: 19.625 K + S * poly bytes (72 for degree 7, untruncated) + 16 S (selection) + 8 (truncation)
    + 16 if any piece has a nonzero slope; S = number of polynomial pieces.
    Valid range: all x in the fixed-point range. Error: the fit error plus ~2^-f.
    ``bound``: a public bound |x| < bound the caller guarantees: the comparisons of x - t_k (|.| < bound +
    max |t_k|) run on range_bits(f, bound + max |t_k|) bits (:func:`interval_bits`); beyond it, garbage.
    """
    with ctx.cost.scope("piecewise"):
        f = ctx.f
        x = to_scale(ctx, x, f)
        bits = 64 if bound is None else range_bits(f, bound + max(abs(t) for t in spec.breakpoints))
        hs = one_hot(ctx, interval_bits(ctx, x, spec.breakpoints, bits))
        poly_idx = [i for i, pc in enumerate(spec.pieces) if pc.coeffs]
        pairs: list[tuple[AShare, AShare]] = []
        if poly_idx:
            deg = spec.degree
            vs, cfs = [], []
            for i in poly_idx:
                pc = spec.pieces[i]
                m = round(math.log2(pc.half_width))
                shifted = add_public(ctx, x, -pc.center)
                vs.append(AShare(shifted.data, f + m))
                cfs.append(list(pc.coeffs) + [0.0] * (deg + 1 - len(pc.coeffs)))
            cf = torch.tensor(cfs, dtype=torch.float64).T.reshape(deg + 1, len(poly_idx), *([1] * x.dim()))
            polys = poly_eval(ctx, stack(vs, dim=0), cf, bound_bits=spec.bound_bits, truncate=False)
            pairs.append((AShare(torch.stack([hs[i].data for i in poly_idx]), 0), polys))
        slope = sum((hs[i].data * pc.slope for i, pc in enumerate(spec.pieces) if pc.slope),
                    torch.zeros_like(x.data))
        has_slope = any(pc.slope for pc in spec.pieces)
        if has_slope:
            pairs.append((AShare(slope, 0), x))
        out = AShare(sum((hs[i].data * ring.encode(pc.intercept, f) for i, pc in enumerate(spec.pieces)
                          if not pc.coeffs and pc.intercept), torch.zeros_like(x.data)), f)
        if pairs:
            prods = mul_exact_many(ctx, pairs)
            if poly_idx:
                out = add(out, trunc(ctx, prods[0].sum(0), prods[0].scale - f))
            if has_slope:
                out = add(out, prods[-1])
        return out


__all__ = [
    "Piece", "PiecewiseSpec", "fit_piecewise", "interval_bits", "mul_exact_many", "one_hot", "piecewise",
    "poly_eval", "poly_levels", "server0_public", "to_scale", "trunc_many", "work_scale",
]
