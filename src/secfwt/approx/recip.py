"""Reciprocal and reciprocal square root by range reduction on powers of two + a polynomial correction.

Both follow the same recipe (cf. the normalisation-then-iterate approach of SecureML/CrypTen and the
one-hot range reduction of "SiRnn" (Rathee et al., S&P 2021)):
  1. ONE batched comparison of x against all thresholds 2^k (k = lo+1 .. hi-1) -> one-hot interval bits
     h_j = [2^j <= x < 2^(j+1)] (6 rounds; 19.625 bytes per threshold per element: ltz sends
     8 + 93 / 8 bytes).
  2. A public-coefficient combination of the bits (local) gives the initial guess g = c 2^-j (reciprocal)
     or g = c 2^(-j/2) (rsqrt) and, at high precision, the normaliser g (resp. g^2).
  3. e = 1 - x g (resp. 1 - x g^2) in [-1/3, 1/3] for c = 2/3 (resp. c^2 = 2/3): one product (2 rounds).
  4. 1/x = g / (1 - e) and 1/sqrt(x) = g (1 - e)^(-1/2): a degree-7 Chebyshev fit of (1 - e)^-1 resp.
     (1 - e)^(-1/2) on |e| <= 0.35, multiplied by g along the power tree of
     :func:`~secfwt.approx.poly.poly_eval` (6 rounds).
The series converges like (1/3)^8 (Taylor) and the Chebyshev fit is ~60x better; this replaces Newton-
Raphson iterations (2 dependent products = 4 rounds each) by one log-depth polynomial.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from numpy.polynomial import Chebyshev, Polynomial

from secfwt import ring
from secfwt.approx.poly import interval_bits, poly_eval, server0_public, to_scale, work_scale
from secfwt.context import PartyContext
from secfwt.protocols.arith import mul_aa
from secfwt.share import AShare, add_public

DEGREE = 7
E_MAX = 0.35  # |e| <= 1/3 in range; a margin for rounding
# Scale of the normaliser g (or g^2) in e = 1 - x g: x g ~ 1 at scale f + NORM_SCALE stays below 2^58,
# which leaves a factor 16 of head-room for x slightly above 2^hi.
_NORM_TOTAL_BITS = 56


@cache
def _series_coeffs(power: float) -> tuple[float, ...]:
    """Monomial coefficients of a degree-7 Chebyshev interpolant of (1 - e)^-power on [-E_MAX, E_MAX]."""
    cheb = Chebyshev.interpolate(lambda e: (1.0 - e) ** (-power), DEGREE, domain=[-E_MAX, E_MAX])
    return tuple(float(c) for c in cheb.convert(kind=Polynomial, domain=[-1, 1], window=[-1, 1]).coef)


def series_error(power: float) -> float:
    """Max |P(e) (1 - e)^power - 1| on [-1/3, 1/3]: the relative error of the correction step."""
    e = np.linspace(-1 / 3, 1 / 3, 20001)
    return float(np.abs(np.polyval(_series_coeffs(power)[::-1], e) * (1 - e) ** power - 1).max())


def _onehot_public(ctx: PartyContext, bits: AShare | None, values: list[float], scale: int) -> AShare:
    """sum_j h_j values[j] over intervals j = lo..hi-1, from bits c_k = [x < 2^k] (local, exact).

    sum_j h_j v_j = v_top + sum_k c_k (v_(k-1) - v_k), k = lo+1 .. hi-1.
    """
    top = server0_public(ctx, values[-1], scale)
    if bits is None:
        return AShare(top, scale)
    diffs = [values[i] - values[i + 1] for i in range(len(values) - 1)]
    acc = top + sum(bits.data[i] * ring.encode(diffs[i], scale) for i in range(len(diffs)))
    return AShare(acc, scale)


def _range_reduce(
    ctx: PartyContext, x: AShare, lo: int, hi: int, guess: list[float], norm: list[float], bound_bits: int,
    compare_bits: int = 64,
) -> tuple[AShare, AShare]:
    """Steps 1-3: returns (g at the working scale, e = 1 - x * norm at the working scale)."""
    if hi <= lo:
        raise ValueError(f"need lo < hi, got lo={lo}, hi={hi}")
    f = ctx.f
    thresholds = [2.0**k for k in range(lo + 1, hi)]
    bits = interval_bits(ctx, x, thresholds, compare_bits) if hi - lo > 1 else None
    p = work_scale(ctx, bound_bits)
    g = _onehot_public(ctx, bits, guess, p)
    # The largest normaliser (2/3) 2^-lo must encode below 2^62: for small f, fewer than 56 - f bits.
    nrm = _onehot_public(ctx, bits, norm, min(_NORM_TOTAL_BITS - f, 62 + lo))
    e = add_public(ctx, -mul_aa(ctx, x, nrm, out_scale=p), 1.0)
    return g, e


def reciprocal(
    ctx: PartyContext, x: AShare, lo: int = -8, hi: int = 12, out_scale: int | None = None,
    compare_bits: int = 64,
) -> AShare:
    """1/x for x in [2^lo, 2^hi] (shared, positive); the result has ``out_scale`` bits (default f).

    Steps: see the module docstring (g = (2/3) 2^-j on [2^j, 2^(j+1)), e = 1 - x g, 1/x = g P(e)).
    Cost: 14 rounds (6 comparison + 2 + 6); bytes per element per server: 19.625 (hi - lo - 1) + 24 + 136
    (533 for the defaults); with hi - lo = 1 no comparison (8 rounds, 160 bytes).
    Valid range: [max(2^lo, 2^-f), 2^hi] (x must also be representable with f bits). Outside it (documented and
    tested in tests/test_ranges.py): for 0 <= x < 2^lo the result saturates, bounded by 5.7 2^-lo (e in (1/3, 1],
    P(e) in [1.5, 8.54]); for x > 2^hi it is WRONG (P extrapolated at e = 1 - (4/3) x 2^-hi < -1/3: 1% low at 1.2
    2^hi, 14% at 1.35 2^hi, 0 at 1.5 2^hi, negative beyond) and for x < 0 unbounded. Callers guarantee x <= 2^hi
    (softmax: the sum is at most N by construction); nothing is compared beyond the range (no extra bytes).
    Error: relative <= 2.3e-6 from the correction polynomial (:func:`series_error`), plus fixed point:
    absolute ~2^-f from the final truncation and 2^-p of the guess (p = working scale): measured
    |err| <= 1.2e-5 |1/x| + 3e-5 (2.8e-3 at 1/x = 256; docs/APPROXIMATIONS.md).
    ``compare_bits`` < 64 (callers that know 0 <= x < 2^(hi+1), e.g. softmax's sum in [1, N]): the thresholds
    use narrow comparisons (:func:`~secfwt.protocols.compare.ltz` with that many bits; exact while
    |x - 2^k| < 2^(compare_bits - 1 - f), which :func:`~secfwt.protocols.compare.range_bits` (f, 2^(hi+1))
    guarantees for 0 <= x < 2^(hi+1)); beyond that bound the interval bits are wrong and so is the result.
    Reference: one-hot range reduction as in SiRnn (Rathee et al., S&P 2021); series instead of Newton.
    """
    with ctx.cost.scope("reciprocal"):
        x = to_scale(ctx, x, ctx.f)
        # |g P(e)| <= 2^(-lo+1) in range; +1 bit so that a saturated x < 2^lo (<= 5.7 2^-lo) cannot wrap.
        bound_bits = max(-lo, 0) + 2
        guess = [(2.0 / 3.0) * 2.0**-j for j in range(lo, hi)]
        g, e = _range_reduce(ctx, x, lo, hi, guess, guess, bound_bits, compare_bits)
        return poly_eval(ctx, e, _series_coeffs(1.0), times=g, bound_bits=bound_bits, out_scale=out_scale)


def rsqrt(
    ctx: PartyContext, x: AShare, lo: int = -12, hi: int = 16, factor: float = 1.0,
    out_scale: int | None = None, compare_bits: int = 64,
) -> AShare:
    """factor/sqrt(x) for x in [2^lo, 2^hi] (shared, positive; ``factor`` public, folded into the guess).

    The result has ``out_scale`` fractional bits (default f; more keeps small results precise).

    Steps: as :func:`reciprocal` with g = sqrt(2/3) 2^(-j/2) and the normaliser g^2 = (2/3) 2^-j (both
    public per interval, so g^2 costs nothing), e = 1 - x g^2, 1/sqrt(x) = g P(e), P ~ (1 - e)^(-1/2).
    Cost: 14 rounds; bytes per element per server: 19.625 (hi - lo - 1) + 160 (690 for the defaults).
    Valid range: [max(2^lo, 2^-f), 2^hi]. Outside it: for 0 <= x < 2^lo the result saturates, bounded by 2.65 factor
    2^(-lo/2) (P(e) in [1.22, 3.25] for e in (1/3, 1]); for x > 2^hi it is WRONG (P extrapolated: 2% low at 1.35
    2^hi, 14% at 1.5 2^hi, 62% at 1.65 2^hi, negative from ~1.7 2^hi) -- callers keep x <= 2^hi (LayerNorm: hi
    covers every sum of squares that did not wrap; the similarity head's norm range is the caller's, and its
    out-of-range cosines are caught by the owner's check of the revealed logits). Error: relative <= 5.2e-7 from the
    polynomial (:func:`series_error`) plus fixed point (~2^-f absolute); measured in docs/APPROXIMATIONS.md.
    ``compare_bits``: narrow threshold comparisons, as in :func:`reciprocal` (exact for 0 <= x < 2^(hi+1) with
    :func:`~secfwt.protocols.compare.range_bits` (f, 2^(hi+1))).
    Reference: one-hot range reduction (SiRnn, S&P 2021); PUMA/CrypTen use Newton iterations instead.
    """
    with ctx.cost.scope("rsqrt"):
        x = to_scale(ctx, x, ctx.f)
        # |g P(e)| <= 2 factor 2^(-lo/2) in range; a saturated x < 2^lo (2.65 factor 2^(-lo/2)) still fits
        # poly_eval's head-room bit (2^61 * 1.33 < 2^62).
        bound_bits = max(math.ceil(-lo / 2 + math.log2(factor)), 0) + 1
        guess = [factor * math.sqrt(2.0 / 3.0) * 2.0 ** (-j / 2) for j in range(lo, hi)]
        norm = [(2.0 / 3.0) * 2.0**-j for j in range(lo, hi)]
        g, e = _range_reduce(ctx, x, lo, hi, guess, norm, bound_bits, compare_bits)
        return poly_eval(ctx, e, _series_coeffs(0.5), times=g, bound_bits=bound_bits, out_scale=out_scale)


__all__ = ["reciprocal", "rsqrt", "series_error"]
