"""GELU with two comparisons, a clipped input and one even polynomial on masked truncations (``method="masked"``).

GELU(x) = x / 2 + g(x) with g(x) = x erf(x / sqrt 2) / 2 even and g(x) -> |x| / 2 for |x| >= T = 4 (error
|g(4) - 2| = 1.27e-4). With x_c = clip(x, -T, T), P1 = [x >= T] (x - T) >= 0 and P2 = [x < -T] (x + T) <= 0
(so x = x_c + P1 + P2):

    GELU(x) ~ P1 + x_c / 2 + h(x_c^2),   h(t) = g(sqrt t) on t in [0, T^2]

(for x >= T: T/2 + h(16) + x - T ~ x; for x < -T: -T/2 + h(16) ~ 0; in between it is exact up to the fit).
h is analytic in t (g is even), fitted in u = t / 8 - 5/4 with the powers 1..6 and 8 (no u^7: u^7 would need a
product of three masked values), minimax: fit error 3.9e-5.

Steps (:mod:`secfwt.protocols.masked`; every power is a masked value, so every product below is local):
  1. One :func:`~secfwt.protocols.compare.ltz_select_shifted` on [x - T, x + T] (ONE opening of x + r, two
     comparison trees) with narrow comparisons (l = range_bits(f, bound + T)) gives [x < T], [x < -T] and,
     free, [x < T](x - T) and [x < -T](x + T): P1, P2 and x_c = x - P1 - P2 are local and exact.
  2. x_c (|x_c| <= 4) masked-truncated by f - s0 bits (s0 = min(f - 1, 20); a 24-bit opening at f = 16).
  3. t = x_c^2 (local), masked-truncated to u + 5/4 at scale s = 14 (40 bits); u is kept for cross products.
  4. u2 = trunc(u^2) (32 bits, cross with u), 5. u4 = trunc(u2^2) (32 bits, cross with u and u2).
  6. acc = sum_j c_j u^j with u^3 = u2 u, u^5 = u4 u, u^6 = u4 u2, u^8 = u4^2 (local, scale S = 2 s + 16),
     plus x_c / 2; one masked truncation to scale f (56 bits); plus P1.
Cost: R(l) + 5 rounds (10 at f = 16 with l = 32); bytes per element per server: l / 8 + 2 tree(l) + 3 + 5 + 4
+ 4 + 7 = 38.25 at l = 32 (tree(32) = 5.625); dealer -> server 1 per element: 2 (41.5 + 80) (comparisons
and their products) + 32 + 32 + 64 + 96 + 16.
Valid range: |x| < ``bound`` (the comparisons are narrow; beyond it the region bits are wrong), f >= 10.
Error: fit 3.9e-5 inside [-4, 4], the tail 1.27e-4 outside, plus the fixed point (x_c at scale s0 moves g by at
most g'(x) 2^-s0; the powers at scale 14 add ~1.5e-4 at most): measured 2.25e-4 at f = 16 (docs/APPROXIMATIONS.md;
the test tolerance is 3e-4, as for the symmetric construction).
Reference: the clipped-GELU split of SIGMA (Gupta et al., PETS 2024), here with an even polynomial in x^2
evaluated on masked truncations instead of a lookup table; even polynomial evaluation as in BOLT.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from secfwt import ring
from secfwt.approx.poly import to_scale
from secfwt.context import PartyContext
from secfwt.protocols.compare import ltz_select_shifted, range_bits
from secfwt.protocols.masked import trunc_masked, width_for
from secfwt.share import AShare, add_public

T = 4.0
CENTER = 1.25  # u = t / 8 - CENTER in [-1.25, 0.75]
POWERS = (0, 1, 2, 3, 4, 5, 6, 8)
MIN_FRAC_BITS = 10
_WORK = 14  # scale of the powers: u^2 and u^4 fit 32-bit openings
_COEF_BITS = 16


# :func:`fit_coefficients` printed these (stored: the fit takes seconds, which every party process would pay in
# its first forward); tests/test_approx.py checks that a refit reproduces them.
COEFFICIENTS = (1.5786466858152643, 0.6425317166565799, -0.14490688333334362, 0.07137477477423966,
                -0.0552308453064043, 0.04498245159475156, -0.0017616568193988794, -0.0219494873954816)


def coefficients() -> tuple[float, ...]:
    """The stored coefficients of h in u for :data:`POWERS` (:data:`COEFFICIENTS`)."""
    return COEFFICIENTS


@cache
def fit_coefficients() -> tuple[float, ...]:
    """Minimax coefficients of h(t) = g(sqrt t) in u = t / 8 - CENTER for :data:`POWERS` (Lawson's iteration
    on 40001 points of [0, 16], float64; max error 3.9e-5)."""
    import math

    t = np.linspace(0.0, T * T, 40001)
    x = np.sqrt(t)
    y = 0.5 * x * np.vectorize(math.erf)(x / math.sqrt(2.0))
    a = np.stack([(t / 8 - CENTER) ** j for j in POWERS], axis=1)
    w = np.full(t.shape, 1.0 / t.size)
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    for _ in range(300):
        sw = np.sqrt(w)
        coef = np.linalg.lstsq(a * sw[:, None], y * sw, rcond=None)[0]
        w = w * np.abs(a @ coef - y)
        w = w / w.sum()
    return tuple(float(c) for c in coef)


def gelu_masked(ctx: PartyContext, x: AShare, bound: float) -> AShare:
    """GELU on shares for |x| < ``bound`` (module docstring: steps, cost, range, error)."""
    f = ctx.f
    if f < MIN_FRAC_BITS:
        raise ValueError(f"gelu_masked: needs at least {MIN_FRAC_BITS} fractional bits, got {f}")
    with ctx.cost.scope("masked"):
        x = to_scale(ctx, x, f)
        if x.numel() == 0:
            return AShare(torch.zeros(x.shape, dtype=torch.int64), f)
        _, prods = ltz_select_shifted(ctx, x, [T, -T], 2, range_bits(f, bound + T))
        p1 = add_public(ctx, x, -T).data - prods.data[0]  # [x >= T] (x - T)
        xc = AShare(x.data - p1 - prods.data[1], f)  # clip(x, -T, T), exact
        s0, s = min(f - 1, 20), _WORK
        xm = trunc_masked(ctx, xc, f - s0, width_for(f + 3), square=True, tag="clip")
        # x_c^2 is t at scale 2 s0, i.e. t / 8 at scale 2 s0 + 3: truncate to scale s and subtract the center.
        um = trunc_masked(ctx, xm.square(), 2 * s0 + 3 - s, width_for(2 * s0 + 5), square=True, keep=True, tag="t")
        u = um.add_public_int(-round(CENTER * 2**s))
        u2 = trunc_masked(ctx, u.square(), s, width_for(2 * s + 1), square=True, keep=True, cross=(u,), tag="u2")
        u4 = trunc_masked(ctx, u2.square(), s, width_for(2 * s + 2), square=True, cross=(u, u2), release=True,
                          tag="u4")
        c = [round(v * 2**_COEF_BITS) for v in coefficients()]
        single = c[1] * u.share().data + c[2] * u2.share().data + c[4] * u4.share().data  # scale s + cb
        prod = c[3] * u2.mul(u).data + c[5] * u4.mul(u).data + c[6] * u4.mul(u2).data + c[7] * u4.square().data
        top = 2 * s + _COEF_BITS
        acc = prod + ring.lshift(single, s) + ring.lshift(xc.data, top - f - 1)  # x_c / 2 at scale top
        if ctx.rank == 0:
            acc = acc + ring.lshift(torch.full_like(acc, c[0]), 2 * s)
        # |acc| <= (|h| + |x_c| / 2) 2^top <= 4.01 2^top.
        y = trunc_masked(ctx, AShare(acc, top), top - f, width_for(top + 3), tag="out").share()
        return AShare(y.data + p1, f)


__all__ = ["CENTER", "COEFFICIENTS", "MIN_FRAC_BITS", "POWERS", "T", "coefficients", "fit_coefficients", "gelu_masked"]
