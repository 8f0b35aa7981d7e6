"""LayerNorm and RMSNorm on shares: batched statistics, one rsqrt per row, one final product.

LayerNorm over a dim of size n (gamma = weight, beta = bias, both shared):
  1. mu = sum(x) * (1/n)  (1/n encoded with 24 bits, then one truncation)          1 round
  2. c = x - mu; c * c and c * gamma from ONE opening of c (and of gamma's row),
     untruncated (:func:`~secfwt.protocols.arith.square_mul`)                      1 round
  3. S = sum(c^2) truncated to scale f (one value per row)                         1 round
  4. a mask B for r is drawn (nothing sent); c gamma masked-truncated to scale f on a 56-bit opening
     with the products with B prepared (:mod:`secfwt.protocols.masked`)            1 round
  5. r = sqrt(n) / sqrt(S + n eps) = 1 / sqrt(var + eps): rsqrt with sqrt(n) folded into its public
     initial guess, on the range n [2^-16, 2^16]                                    14 rounds
  6. open r - B (per row); y = (c gamma) * r is local; one truncation; + beta       2 rounds
(Without a weight -- RMSNorm's or LayerNorm's None -- steps 2-4 and 6 are a square, a truncation and a
Beaver product as before.)
Dividing S by n is never done: it is folded into rsqrt, which also keeps eps (e.g. 1e-5, below the 2^-16
resolution) accurate as n eps. RMSNorm is the same without the mean.
All internal scales follow f (tests/test_ranges.py runs f = 4..24): rsqrt's range reaches 2^(63 - 2f) (every
S that did not wrap) and r keeps f + min(12, 51 - 2f) bits so that y = (c gamma) r (|y| < 2^10) stays exact.
"""

from __future__ import annotations

import math

from secfwt.approx.poly import mul_exact_many, to_scale, trunc_many
from secfwt.approx.recip import rsqrt
from secfwt.context import PartyContext
from secfwt.protocols.arith import mul_aa, square_mul, trunc
from secfwt.protocols.compare import range_bits
from secfwt.protocols.masked import fixed_mask, open_fixed, trunc_masked, width_for
from secfwt.share import AShare, add, add_public, mul_public, sub

# Range of the per-row variance handed to rsqrt: [2^-16, 2^16] covers eps = 1e-5 .. |x| ~ 256.
VAR_LO, VAR_HI = -16, 16
_MEAN_BITS = 24  # fractional bits of the public 1/n in the mean
_R_EXTRA_BITS = 12  # 1/sqrt(var + eps) is kept with f + 12 bits: small for large-variance rows ...
_OUT_BITS = 10  # ... as long as the output y = (c gamma) r, |y| < 2^10, stays exact: 2f + extra + 10 <= 61
_CW_BITS = 20  # c gamma is masked-truncated on width_for(2f + 20) bits: valid for |c gamma| < 2^20 (f <= 21)


def s_hi_bits(f: int) -> int:
    """rsqrt's upper range 2^hi for S + n eps, S = sum(c^2): hi = 63 - 2f covers every S whose sum of squares
    at scale 2f did not wrap (S < 2^(62 - 2f)), so large-variance rows get a coarser but correct result
    instead of an extrapolated polynomial (thresholds are per row: ~20 bytes each, no round)."""
    return 63 - 2 * f


def r_extra_bits(f: int) -> int:
    """Extra fractional bits of r = 1/sqrt(var + eps): 12 for f <= 19, 51 - 2f above (3 at f = 24)."""
    return max(0, min(_R_EXTRA_BITS, 61 - 2 * f - _OUT_BITS))


def _normalize(
    ctx: PartyContext, c: AShare, weight: AShare | None, bias: AShare | None, eps: float, d: int
) -> AShare:
    """Steps 2-5 for a centred (LayerNorm) or raw (RMSNorm) input c at scale f."""
    f, n = ctx.f, c.shape[d]
    if weight is None:
        prods = mul_exact_many(ctx, [(c, c)])  # scale 2f, untruncated
        stats = trunc_many(ctx, [prods[0].sum(d, keepdim=True)], f)
    else:  # c^2 and c gamma from one opening of c; c gamma masked for the local final product
        sq, cw = square_mul(ctx, c, weight)
        stats = trunc_many(ctx, [sq.sum(d, keepdim=True)], f)
        handle = fixed_mask(ctx, stats[0].shape)
        cwm = trunc_masked(ctx, cw, cw.scale - f, width_for(min(2 * f + _CW_BITS, 62)), fid=handle.fid,
                           release=True, tag="cgamma")
    s = add_public(ctx, stats[0], n * eps)
    # Range of the thresholds' comparisons: S + n eps >= 0 and S < 2^(62 - 2f) for every sum of squares that
    # did not wrap (s_hi_bits), so |S + n eps - 2^k| < 2^(63 - 2f): narrow comparisons on 64 - f bits (48 at
    # f = 16) are exact there; a wrapped S was garbage before and stays garbage.
    r = rsqrt(ctx, s, lo=VAR_LO + math.floor(math.log2(n)), hi=s_hi_bits(f), factor=math.sqrt(n),
              out_scale=f + r_extra_bits(f), compare_bits=range_bits(f, 2.0 ** s_hi_bits(f)))
    if weight is None:
        y = mul_aa(ctx, c, r, out_scale=f)
    else:
        yr = cwm.mul_fixed(open_fixed(ctx, r, handle))  # (c gamma) r at scale f + f + extra, local
        # |y| < 2^_OUT_BITS (documented): a masked truncation on width_for(scale + _OUT_BITS) bits (56 at f = 16).
        y = trunc_masked(ctx, yr, yr.scale - f, width_for(yr.scale + _OUT_BITS), tag="trunc").share()
    return add(y, bias) if bias is not None else y


def layernorm(
    ctx: PartyContext,
    x: AShare,
    weight: AShare | None,
    bias: AShare | None,
    eps: float,
    dim: int = -1,
) -> AShare:
    """LayerNorm over ``dim``: (x - mean) / sqrt(var + eps) * weight + bias (weight, bias shared or None).

    Steps: see the module docstring. Cost: 20 rounds. Bytes per element per server: 8 (c, one opening for
    c^2 and c gamma) + 7 (c gamma's masked truncation, 56 bits) + 8 (final truncation) = 23 (was 64; 40
    without weight), plus per row 8 (mean) + 8 (S) + 8 (r - B) + the rsqrt's comparisons (narrow,
    ~10 K bytes, K = 78 - 2f - floor(log2 n) thresholds, 38 for n = 384 at f = 16) + 160, and 8 per element
    of gamma's row: ~2 bytes per element for n = 384.
    Valid range (documented accuracy): per-row variance in [2^-16, 2^16] (|x| up to ~256); exactness needs
    n var < 2^(62 - 2f) (the sum of squares at scale 2f: 2^30 at f = 16, 2^14 at f = 24), |x| < 2^(31 - f),
    |c gamma| < 2^20 (2^(60 - 2f) for f > 20) and |y| < 2^10 (2^(49 - 2f) for f <= 19). Outside the accurate
    range: var + eps below 2^-16 saturates (1/sqrt(var + eps) is capped at ~2.65 2^8, so y shrinks towards 0, |y| <=
    |exact y|, a constant row gives exactly 0); var above 2^16 up to the wrap point is correct with a coarser error
    (~3% at n var = 2^30, f = 16; rsqrt's range reaches 2^(63 - 2f) per row, no extra round); a wrapped sum of
    squares gives garbage, which the owner's check of the revealed values flags (share.receive_revealed).
    Error: rsqrt's relative error (~1e-5 for var >= 2^-8) times |c gamma| plus ~2^-f per truncation;
    measured in docs/APPROXIMATIONS.md (~2e-4 abs for unit-variance rows of size 768).
    Reference: the LayerNorm composition of CrypTen/PUMA, with batched statistics and eps folded into rsqrt.
    """
    with ctx.cost.scope("layernorm"):
        f = ctx.f
        x = to_scale(ctx, x, f)
        d = dim % x.dim()
        n = x.shape[d]
        mu = trunc(ctx, mul_public(ctx, x.sum(d, keepdim=True), 1.0 / n, frac_bits=_MEAN_BITS), _MEAN_BITS)
        return _normalize(ctx, sub(x, mu), weight, bias, eps, d)


def rmsnorm(ctx: PartyContext, x: AShare, weight: AShare | None, eps: float, dim: int = -1) -> AShare:
    """RMSNorm over ``dim``: x / sqrt(mean(x^2) + eps) * weight.

    Cost: 18 rounds (LayerNorm without the mean); bytes as :func:`layernorm` without the mean.
    Valid range: mean(x^2) in [2^-16, 2^16]; outside it and exactness as :func:`layernorm`.
    Error: as :func:`layernorm`.
    Reference: Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """
    with ctx.cost.scope("rmsnorm"):
        x = to_scale(ctx, x, ctx.f)
        return _normalize(ctx, x, weight, None, eps, dim % x.dim())


__all__ = ["layernorm", "rmsnorm"]
