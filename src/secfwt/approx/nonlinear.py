"""GELU, tanh, sigmoid and SiLU on shares, two selectable constructions (``method=``).

``"symmetric"`` (the default of gelu, tanh, sigmoid): a linear part plus an even/odd part evaluated on |x|
with degree-7 pieces and exact tails, see :mod:`secfwt.approx.symmetric` (13 rounds; gelu 154.9, silu,
tanh and sigmoid 282.1 bytes per element per server). ``"two-stage"`` (the default of silu; even functions):
the same pieces, |x| computed first so only K + 1 comparisons are needed instead of 2K + 1 (19 rounds;
silu 258.9, gelu 151.3 bytes).

``"piecewise"`` (the previous construction, kept for comparison): each function is a
:class:`~secfwt.approx.poly.PiecewiseSpec`: exact tails outside [t_1, t_K] (constants
for tanh/sigmoid, 0 and x for GELU/SiLU) and Chebyshev-interpolated degree-7 polynomials on the interior
intervals, each in its own scaled variable v = (x - center) / 2^m in [-1, 1] (so coefficients stay of the
order of the function values). The specs are fitted with numpy on first use and cached.

Cost of the piecewise method (:func:`~secfwt.approx.poly.piecewise`, degree 7, L = 3): 13 rounds;
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
from collections.abc import Callable
from functools import cache
from typing import Literal, get_args

import numpy as np

from secfwt.approx.masked_gelu import MIN_FRAC_BITS, gelu_masked
from secfwt.approx.poly import Piece, PiecewiseSpec, fit_piecewise, piecewise
from secfwt.approx.symmetric import SPECS, even_two_stage, symmetric_eval
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


Method = Literal["symmetric", "two-stage", "piecewise", "masked"]
METHODS: tuple[str, ...] = get_args(Method)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"activation method: expected 'symmetric', 'two-stage', 'piecewise' or 'masked', "
                         f"got {method!r}")


def _evaluate(ctx: PartyContext, x: AShare, name: str, method: str, spec: Callable[[], PiecewiseSpec],
              bound: float | None) -> AShare:
    """``name`` on shares: the even/odd fit (``SPECS[name]``; "two-stage": |x| first, fewer comparisons, even
    functions only) or the piecewise fit ``spec()``; ``bound``: narrow comparisons for |x| < bound."""
    _check_method(method)
    if bound is not None and not bound > 0:
        raise ValueError(f"{name}: bound must be a positive number (a public bound on |x|), got {bound!r}")
    if method == "masked":
        if name != "gelu" or bound is None:
            raise ValueError(f"{name}: method 'masked' exists for gelu with a bound only")
        if ctx.f < MIN_FRAC_BITS:  # too few bits for its working scales: the symmetric pieces, narrow
            method = "symmetric"
    with ctx.cost.scope(name):
        if method == "masked":
            assert bound is not None
            return gelu_masked(ctx, x, bound)
        if method == "piecewise":
            return piecewise(ctx, x, spec(), bound=bound)
        if method == "two-stage":
            return even_two_stage(ctx, x, SPECS[name], bound)
        return symmetric_eval(ctx, x, SPECS[name], bound)


def gelu(ctx: PartyContext, x: AShare, method: Method = "symmetric", bound: float | None = None) -> AShare:
    """GELU(x) = x Phi(x) on shares (exact-erf GELU, torch's default).

    ``method="symmetric"`` (default): x/2 + g(|x|), g even, one degree-7 piece on |x| < 4 and the exact tails
    0 / x (:mod:`secfwt.approx.symmetric`): 13 rounds, 154.9 bytes per element per server, max abs error
    ~2e-4 on all reals. ``method="piecewise"``: the previous construction (:func:`gelu_spec`, one ltz on 4
    thresholds, three degree-7 pieces on [-4,-1], [-1,1], [1,4]): 13 rounds, 366.5 bytes, ~1.3e-4.
    Valid range: every x in the fixed-point range. Errors measured in docs/APPROXIMATIONS.md.
    ``bound``: a public bound |x| < bound the CALLER guarantees (e.g. a clipped input); the comparisons then run
    on range_bits(f, bound + 4) bits (32 for bound <= 4092 at f <= 19): 12 rounds, 124.9 bytes (symmetric).
    Beyond the bound the output is garbage (:mod:`secfwt.approx.symmetric`).
    ``method="masked"`` (needs ``bound``; what :class:`secfwt.nn.mpc.MpcBackend` runs): two narrow comparisons,
    the clipped input and one even polynomial in x^2 on masked truncations
    (:func:`secfwt.approx.masked_gelu.gelu_masked`): 10 rounds, 38.25 bytes per element at f = 16 for bound <=
    4092, max abs error ~1.3e-4; f < 10 falls back to the symmetric pieces with the bound.
    Reference: PUMA's segmented GeLU (Dong et al., arXiv 2307.12533); even/odd split as in BOLT.
    """
    return _evaluate(ctx, x, "gelu", method, gelu_spec, bound)


def tanh(ctx: PartyContext, x: AShare, method: Method = "symmetric", bound: float | None = None) -> AShare:
    """tanh(x) on shares: odd, sign(x) g(|x|) with degree-7 pieces on |x| in [0, 2, 5], +-1 beyond.

    Symmetric (default): 13 rounds, 282.1 bytes per element per server, max abs error ~9e-5.
    ``method="piecewise"``: 4 pieces on [-5,-2,0,2,5]: 13 rounds, 458.1 bytes. Valid range: all x.
    ``bound``: narrow comparisons for |x| < bound, as :func:`gelu` (symmetric: 12 rounds, 232.1 bytes).
    """
    return _evaluate(ctx, x, "tanh", method, tanh_spec, bound)


def sigmoid(ctx: PartyContext, x: AShare, method: Method = "symmetric", bound: float | None = None) -> AShare:
    """sigmoid(x) = 1/2 + odd part, degree-7 pieces on |x| in [0, 4, 10], 0 / 1 beyond.

    Symmetric (default): 13 rounds, 282.1 bytes per element per server, max abs error ~5e-5.
    ``method="piecewise"``: 4 pieces on [-10,-4,0,4,10]: 13 rounds, 458.1 bytes. Valid range: all x.
    ``bound``: narrow comparisons for |x| < bound, as :func:`gelu` (symmetric: 12 rounds, 232.1 bytes).
    """
    return _evaluate(ctx, x, "sigmoid", method, sigmoid_spec, bound)


def silu(ctx: PartyContext, x: AShare, method: Method = "two-stage", bound: float | None = None) -> AShare:
    """SiLU(x) = x sigmoid(x) = x/2 + g(|x|), g even: degree-7 pieces on |x| in [0, 4, 12], exact 0 / x beyond.

    Two-stage (default; :func:`secfwt.approx.symmetric.even_two_stage`): |x| first, then 2 threshold
    comparisons: 3 comparisons per element, 19 rounds, 258.9 bytes per element per server. ``"symmetric"``:
    the same pieces with 5 comparisons in one stage, 13 rounds, 282.1 bytes (fewer rounds for a WAN; the
    comparisons' compute dominates on a LAN or one machine). Max abs error ~8e-5 (the tail at |x| = 12);
    inputs of any size (SmolLM2 reaches |x| ~ 49) hit the exact tails.
    ``method="piecewise"``: 4 pieces on [-16,-4,0,4,16]: 13 rounds, 474.1 bytes. Valid range: all x.
    ``bound``: narrow comparisons for |x| < bound, as :func:`gelu` (two-stage: 17 rounds, 228.9 bytes;
    range_bits(f, bound + 12) = 32 for bound <= 4084 at f <= 19).
    """
    return _evaluate(ctx, x, "silu", method, silu_spec, bound)


__all__ = ["gelu", "gelu_spec", "sigmoid", "sigmoid_spec", "silu", "silu_spec", "tanh", "tanh_spec"]
