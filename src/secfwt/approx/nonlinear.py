"""GELU, tanh, sigmoid and SiLU as piecewise polynomials (saturated tails + degree-7 middle pieces).

Each function is a :class:`~secfwt.approx.poly.PiecewiseSpec`: exact tails outside [t_1, t_K] (constants
for tanh/sigmoid, 0 and x for GELU/SiLU) and Chebyshev-interpolated degree-7 polynomials on the interior
intervals, each in its own scaled variable v = (x - center) / 2^m in [-1, 1] (so coefficients stay of the
order of the function values). The specs are fitted with numpy on first use and cached.

Cost of every function here (:func:`~secfwt.approx.poly.piecewise` with degree 7, L = 3): 13 rounds;
bytes per element per server = 19.625 K + 88 S + 8 (+ 16 with a linear tail), K breakpoints, S interior pieces:

=========  =======================  ==  ==  ===========
function   breakpoints              K   S   bytes/elem
=========  =======================  ==  ==  ===========
gelu       -4, -1, 1, 4             4   3   366.5
tanh       -5, -2, 0, 2, 5          5   4   458.1
sigmoid    -10, -4, 0, 4, 10        5   4   458.1
silu       -16, -4, 0, 4, 16        5   4   474.1
=========  =======================  ==  ==  ===========

Measured errors are in docs/APPROXIMATIONS.md. Reference: piecewise low-degree polynomials with a
comparison-selected segment, as in PUMA (Dong et al., 2023) and BOLT (Pang et al., S&P 2024).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

from secfwt.approx.poly import Piece, PiecewiseSpec, fit_piecewise, piecewise
from secfwt.context import PartyContext
from secfwt.share import AShare

DEGREE = 7


def _sigmoid_np(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _gelu_np(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


@cache
def gelu_spec() -> PiecewiseSpec:
    """GELU (exact erf form): 0 below -4, x above 4 (tail error |gelu(-4)| = 1.3e-4), 3 pieces between."""
    return fit_piecewise(_gelu_np, (-4.0, -1.0, 1.0, 4.0), DEGREE, Piece(), Piece(slope=1))


@cache
def tanh_spec() -> PiecewiseSpec:
    """tanh: -1 below -5, 1 above 5 (tail error 9.1e-5), 4 pieces between."""
    return fit_piecewise(np.tanh, (-5.0, -2.0, 0.0, 2.0, 5.0), DEGREE, Piece(intercept=-1.0),
                         Piece(intercept=1.0))


@cache
def sigmoid_spec() -> PiecewiseSpec:
    """sigmoid: 0 below -10, 1 above 10 (tail error 4.5e-5), 4 pieces between."""
    return fit_piecewise(_sigmoid_np, (-10.0, -4.0, 0.0, 4.0, 10.0), DEGREE, Piece(), Piece(intercept=1.0))


@cache
def silu_spec() -> PiecewiseSpec:
    """SiLU x*sigmoid(x): 0 below -16, x above 16 (tail error 1.8e-6), 4 pieces between."""
    return fit_piecewise(lambda x: x * _sigmoid_np(x), (-16.0, -4.0, 0.0, 4.0, 16.0), DEGREE, Piece(),
                         Piece(slope=1))


def gelu(ctx: PartyContext, x: AShare) -> AShare:
    """GELU(x) = x Phi(x) on shares (exact-erf GELU, torch's default).

    Steps: :func:`~secfwt.approx.poly.piecewise` with :func:`gelu_spec` (one ltz on 4 thresholds,
    three degree-7 pieces on [-4,-1], [-1,1], [1,4], exact tails 0 and x).
    Cost: 13 rounds, 366.5 bytes per element per server. Valid range: every x in the fixed-point range.
    Error: max abs ~1.3e-4 (tail at x = -4 / 4), see docs/APPROXIMATIONS.md.
    Reference: PUMA's segmented GeLU (Dong et al., arXiv 2307.12533), Chebyshev-fitted pieces.
    """
    with ctx.cost.scope("gelu"):
        return piecewise(ctx, x, gelu_spec())


def tanh(ctx: PartyContext, x: AShare) -> AShare:
    """tanh(x) on shares: saturated to -1 / 1 beyond |x| >= 5, degree-7 pieces on [-5,-2,0,2,5].

    Cost: 13 rounds, 458.1 bytes per element per server. Valid range: all x. Error: max abs ~1e-4.
    Reference: piecewise polynomial with comparison-selected segments (PUMA / BOLT style).
    """
    with ctx.cost.scope("tanh"):
        return piecewise(ctx, x, tanh_spec())


def sigmoid(ctx: PartyContext, x: AShare) -> AShare:
    """sigmoid(x) on shares: 0 / 1 beyond |x| >= 10, degree-7 pieces on [-10,-4,0,4,10].

    Cost: 13 rounds, 458.1 bytes per element per server. Valid range: all x. Error: max abs ~5e-5.
    Reference: piecewise polynomial with comparison-selected segments (PUMA / BOLT style).
    """
    with ctx.cost.scope("sigmoid"):
        return piecewise(ctx, x, sigmoid_spec())


def silu(ctx: PartyContext, x: AShare) -> AShare:
    """SiLU(x) = x sigmoid(x) on shares: 0 below -16, x above 16, degree-7 pieces on [-16,-4,0,4,16].

    Cost: 13 rounds, 474.1 bytes per element per server. Valid range: all x. Error: max abs ~1e-4.
    Reference: piecewise polynomial with comparison-selected segments (PUMA / BOLT style).
    """
    with ctx.cost.scope("silu"):
        return piecewise(ctx, x, silu_spec())


__all__ = ["gelu", "gelu_spec", "sigmoid", "sigmoid_spec", "silu", "silu_spec", "tanh", "tanh_spec"]
