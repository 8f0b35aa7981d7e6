"""Fixed-point approximations composed from :mod:`secfwt.protocols` (no cryptography of their own).

Every function takes the party context first, opens a cost scope, and documents its steps, cost (rounds,
bytes per element), valid input range and error bound. Measured errors: docs/APPROXIMATIONS.md.
"""

from secfwt.approx.exp import exp, softmax
from secfwt.approx.nonlinear import gelu, sigmoid, silu, tanh
from secfwt.approx.norm import layernorm, rmsnorm
from secfwt.approx.poly import Piece, PiecewiseSpec, fit_piecewise, piecewise, poly_eval
from secfwt.approx.recip import reciprocal, rsqrt

__all__ = [
    "Piece", "PiecewiseSpec", "exp", "fit_piecewise", "gelu", "layernorm", "piecewise", "poly_eval",
    "reciprocal", "rmsnorm", "rsqrt", "sigmoid", "silu", "softmax", "tanh",
]
