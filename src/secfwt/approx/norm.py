"""LayerNorm and RMSNorm on shares: batched statistics, one rsqrt per row, one final product.

LayerNorm over a dim of size n (gamma = weight, beta = bias, both shared):
  1. mu = sum(x) * (1/n)  (1/n encoded with 24 bits, then one truncation)          1 round
  2. c = x - mu; batch [c * c, c * gamma] in one Beaver round, untruncated          1 round
  3. S = sum(c^2) and c gamma brought to scale f by ONE truncation call             1 round
  4. r = sqrt(n) / sqrt(S + n eps) = 1 / sqrt(var + eps): rsqrt with sqrt(n) folded into its public
     initial guess, on the range n [2^-16, 2^16]                                    14 rounds
  5. y = (c gamma) * r + beta                                                       2 rounds
Dividing S by n is never done: it is folded into rsqrt, which also keeps eps (e.g. 1e-5, below the 2^-16
resolution) accurate as n eps. RMSNorm is the same without the mean.
"""

from __future__ import annotations

import math

from secfwt.approx.poly import mul_exact_many, to_scale, trunc_many
from secfwt.approx.recip import rsqrt
from secfwt.context import PartyContext
from secfwt.protocols.arith import mul_aa, trunc
from secfwt.share import AShare, add, add_public, mul_public, sub

# Range of the per-row variance handed to rsqrt: [2^-16, 2^16] covers eps = 1e-5 .. |x| ~ 256.
VAR_LO, VAR_HI = -16, 16
_MEAN_BITS = 24  # fractional bits of the public 1/n in the mean
_R_EXTRA_BITS = 12  # 1/sqrt(var + eps) is kept with f + 12 bits: small for large-variance rows


def _normalize(
    ctx: PartyContext, c: AShare, weight: AShare | None, bias: AShare | None, eps: float, d: int
) -> AShare:
    """Steps 2-5 for a centred (LayerNorm) or raw (RMSNorm) input c at scale f."""
    f, n = ctx.f, c.shape[d]
    pairs = [(c, c)] + ([(c, weight)] if weight is not None else [])
    prods = mul_exact_many(ctx, pairs)  # scale 2f each, untruncated
    stats = trunc_many(ctx, [prods[0].sum(d, keepdim=True)] + prods[1:], f)
    s = add_public(ctx, stats[0], n * eps)
    log_n = math.log2(n)
    r = rsqrt(ctx, s, lo=VAR_LO + math.floor(log_n), hi=VAR_HI + math.ceil(log_n), factor=math.sqrt(n),
              out_scale=f + _R_EXTRA_BITS)
    y = mul_aa(ctx, stats[1] if weight is not None else c, r, out_scale=f)
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

    Steps: see the module docstring. Cost: 19 rounds. Bytes per element per server: 16 (c^2) + 16
    (c gamma, with a weight) + 8 (c gamma truncation) + 24 (final product) = 64 (40 without weight), plus
    per row 8 (mean) + 8 (S) + 19.6 * 32 + 160 (rsqrt on n [2^-16, 2^16]: 33 - 1 thresholds) ~ 804 bytes,
    i.e. ~2.1 bytes per element for n = 384.
    Valid range: per-row variance in [2^-16, 2^16] (|x| up to ~256), |x| < 2^15, |c gamma| < 2^13.
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
    Valid range: mean(x^2) in [2^-16, 2^16]. Error: as :func:`layernorm`.
    Reference: Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """
    with ctx.cost.scope("rmsnorm"):
        x = to_scale(ctx, x, ctx.f)
        return _normalize(ctx, x, weight, None, eps, dim % x.dim())


__all__ = ["layernorm", "rmsnorm"]
