"""Even/odd decomposition: f(x) = c0 + lin * x + g(x), g even or odd, polynomial pieces in a = |x|.

GELU, SiLU, tanh and sigmoid are each a linear function plus an even or odd part g:

===========  =================  =======  =====================================================
function     c0 + lin * x       parity   g(a), a = |x|
===========  =================  =======  =====================================================
gelu         x / 2              even     a erf(a / sqrt 2) / 2          -> a / 2 for a >= T
silu         x / 2              even     a tanh(a / 2) / 2              -> a / 2 for a >= T
tanh         0                  odd      tanh(a)                        -> 1 for a >= T
sigmoid      1 / 2              odd      sigmoid(a) - 1 / 2             -> 1 / 2 for a >= T
===========  =================  =======  =====================================================

so only the half-line a >= 0 needs polynomial pieces, and beyond the last breakpoint T the function is
exactly its asymptote (x or 0 for GELU/SiLU, +-1 for tanh, 0/1 for sigmoid): no blow-up anywhere.

Steps of :func:`symmetric_eval` (breakpoints 0 = t_0 < t_1 < ... < t_K = T on a, K pieces):
  1. ONE :func:`~secfwt.protocols.compare.ltz_select` on the stacked [x, x - T, x + T, x -+ t_k (k < K)]
     -> bits L(t) = [x < t] (6 rounds), and for free (dealer-aided, no extra round or byte) the products
     L(0) x, L(T) (x - T), L(-T) (x + T). Every region indicator ([t_(i-1) <= a < t_i] for even g, the
     signed one for odd g, the tails) is a +-1 combination of the bits (products of nested threshold
     bits are again threshold bits): local.
  2. Local: a = x - 2 L(0) x, and for GELU/SiLU the exact tail m+ [x >= T] x + m- [x < -T] x with the
     integer tail slopes m+- (1 and 0).
  3. All pieces P_i(v_i), v_i = (a - center_i) / 2^m_i in [-1, 1], with one stacked
     :func:`~secfwt.approx.poly.poly_eval` (untruncated, 2L - 1 = 5 rounds for degree 7).
  4. Q_i = P_i + lin * x (even) or lin * a (odd), local at the polynomial's scale (for |x| > T this may
     wrap, harmlessly: it is multiplied by an exact 0); one Beaver round sel_i * Q_i (1 round) and ONE
     truncation of the sum (1 round). Constants (c0, tanh/sigmoid tails) are local.
Cost: 6 + 5 + 1 + 1 = 13 rounds for degree 7. Bytes per element per server: 19.625 (2K + 1) (ltz)
+ 72 K (poly, degree 7, untruncated) + 16 K (selection) + 8 (truncation): gelu 154.9 (K = 1), silu,
tanh and sigmoid 282.1 (K = 2). Dealer -> server 1: 51.5 (2K + 1) + 32 * 3 (32 for tanh/sigmoid) + the
Beaver/truncation material.
Valid range: every x in the fixed-point range (tails are exact). With ``bound`` B (a public bound |x| < B the
caller guarantees, e.g. a clipped input or a model's measured activation range), the comparisons are narrow
(:func:`~secfwt.protocols.compare.ltz` with l = range_bits(f, B + T) bits: every compared x -+ t_k has
|x -+ t_k| < B + T): for B + T <= 2^12 and f <= 19, l = 32 and each comparison costs 9.625 instead of 19.625
bytes and 5 instead of 6 rounds (gelu 124.9 bytes, 12 rounds). Beyond B the region bits are wrong and the
output is garbage: callers must only pass a bound that holds. Error: the fit error (printed by
``python -m secfwt.approx.symmetric``) plus ~2^-f; measured values in docs/APPROXIMATIONS.md.
Reference: even/odd splitting of activations with low-degree pieces as in BOLT (Pang et al., S&P 2024)
and Bumblebee (Lu et al., NDSS 2025); segment selection with one batched comparison as in PUMA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from secfwt import ring
from secfwt.approx.poly import mul_exact_many, poly_eval, server0_public, to_scale
from secfwt.context import PartyContext
from secfwt.protocols.arith import trunc
from secfwt.protocols.compare import ltz, ltz_select, range_bits
from secfwt.share import AShare, add, add_public, mul_public_int, rescale_up, stack

DEGREE = 7
_FIT_GRID = 4001  # points per piece for the minimax fit
_FIT_ITERS = 200  # Lawson iterations (iteratively reweighted least squares -> minimax)


@dataclass(frozen=True)
class SymPiece:
    """g(a) ~ sum_j coeffs[j] v^j on [lo, hi) with v = (a - center) / half_width (half_width = 2^m)."""

    coeffs: tuple[float, ...]
    center: float
    half_width: float


@dataclass(frozen=True)
class SymmetricSpec:
    """f(x) = const + lin * x + g(x); g even/odd; g(a) = piece_i on [t_(i-1), t_i), asymptote beyond t_K.

    The asymptote of g for a >= t_K is ``tail_slope * a + tail_const``; ``lin +- tail_slope`` must be
    integers (so the tails x -> m x are exact bit products) and ``lin`` a multiple of 2^-8.
    """

    parity: Literal["even", "odd"]
    breakpoints: tuple[float, ...]  # t_1 < ... < t_K (t_0 = 0 implied)
    pieces: tuple[SymPiece, ...]
    lin: float = 0.0
    const: float = 0.0
    tail_slope: float = 0.0
    tail_const: float = 0.0
    bound_bits: int = 5

    def __post_init__(self) -> None:
        if len(self.pieces) != len(self.breakpoints) or not self.breakpoints:
            raise ValueError("SymmetricSpec: need one piece per breakpoint (pieces end at t_1, ..., t_K)")
        if list(self.breakpoints) != sorted(self.breakpoints) or self.breakpoints[0] <= 0:
            raise ValueError("SymmetricSpec: breakpoints must be positive and sorted")
        for m in self.tail_multipliers():
            if m != int(m):
                raise ValueError(f"SymmetricSpec: tail slopes lin +- tail_slope must be integers, got {m}")
        if self.lin * 256 != int(self.lin * 256):
            raise ValueError(f"SymmetricSpec: lin must be a multiple of 2^-8, got {self.lin}")

    def tail_multipliers(self) -> tuple[float, float]:
        """Slope of f in x for x >= t_K and for x <= -t_K."""
        if self.parity == "even":
            return self.lin + self.tail_slope, self.lin - self.tail_slope
        return self.lin + self.tail_slope, self.lin + self.tail_slope

    @property
    def degree(self) -> int:
        return max(len(p.coeffs) - 1 for p in self.pieces)


# -- fitting (numpy; run `python -m secfwt.approx.symmetric` to refit and print the errors) ----------------


def _erf(a: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(a)


# Even/odd parts g(a) on a >= 0, with their asymptotes (slope, const), in float64.
TARGETS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float, float]] = {
    "gelu": (lambda a: 0.5 * a * _erf(a / math.sqrt(2.0)), 0.5, 0.0),
    "silu": (lambda a: 0.5 * a * np.tanh(0.5 * a), 0.5, 0.0),
    "tanh": (np.tanh, 0.0, 1.0),
    "sigmoid": (lambda a: 0.5 * np.tanh(0.5 * a), 0.0, 0.5),
}


def _minimax(v: np.ndarray, y: np.ndarray, degree: int) -> np.ndarray:
    """Monomial coefficients (in v) of a near-minimax fit: Lawson's iteratively reweighted least squares."""
    a = np.vander(v, degree + 1, increasing=True)
    w = np.full(v.shape, 1.0 / v.size)
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    for _ in range(_FIT_ITERS):
        sw = np.sqrt(w)
        coef = np.linalg.lstsq(a * sw[:, None], y * sw, rcond=None)[0]
        w = w * np.abs(a @ coef - y)
        w = w / w.sum()
    return np.asarray(coef)


def fit_pieces(fn: Callable[[np.ndarray], np.ndarray], breakpoints: Sequence[float],
               degree: int = DEGREE) -> list[SymPiece]:
    """Minimax-fit ``fn`` on [t_(i-1), t_i] (t_0 = 0) with ``degree`` in v = (a - center) / 2^m, |v| <= 1."""
    pieces, lo = [], 0.0
    for hi in breakpoints:
        center = (lo + hi) / 2
        hw = 2.0 ** math.ceil(math.log2((hi - lo) / 2))
        a = np.linspace(lo, hi, _FIT_GRID)
        coef = _minimax((a - center) / hw, fn(a), degree)
        pieces.append(SymPiece(tuple(float(c) for c in coef), center, hw))
        lo = hi
    return pieces


def fit_error(spec: SymmetricSpec, fn: Callable[[np.ndarray], np.ndarray], a_max: float = 64.0,
              n: int = 640001) -> float:
    """max |g_spec(a) - fn(a)| over ``n`` grid points of [0, a_max] (pieces and tail), in float64."""
    a = np.linspace(0.0, a_max, n)
    out = spec.tail_slope * a + spec.tail_const
    lo = 0.0
    for t, pc in zip(spec.breakpoints, spec.pieces, strict=True):
        m = (a >= lo) & (a < t)
        out[m] = np.polynomial.polynomial.polyval((a[m] - pc.center) / pc.half_width, pc.coeffs)
        lo = t
    return float(np.abs(out - fn(a)).max())


# Fitted with `python -m secfwt.approx.symmetric` (fit_pieces: degree 7 in v = (a - center) / 2^m, 4001-point
# grid per piece, 200 Lawson iterations from the least-squares start); it printed the float64 max error of
# pieces + tail on [0, 64]: gelu 1.95e-4 (tail at T = 4: 1.27e-4), silu 7.37e-5, tanh 9.08e-5, sigmoid
# 4.54e-5 (all four set by the tail). Breakpoints: the fewest degree-7 pieces (one each side for GELU, two
# for the others) whose fit error stays below the tail error |g(T) - asymptote| <~ 2e-4.
_COEFFS: dict[str, tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]] = {
    "gelu": ((4.0,), (
        (0.954649103837792, 1.1715784053253515, -0.22186443146705759, -0.014270458107269179,
         0.32578783508033166, -0.23903788074631938, -0.058440969950963484, 0.081666420549885876),
    )),
    "silu": ((4.0, 12.0), (
        (0.76159060757623043, 1.1817776527103292, 0.10023790226475482, -0.21875825622810963,
         0.13111532624735517, -0.010356896343922728, -0.028941038031711441, 0.011365070640813657),
        (3.9973086856594673, 2.0094473585217116, -0.015816912572699904, 0.01718723769220043,
         -0.015372704111804913, 0.010254743412344336, -0.0021398609980873839, -0.00095378512732141596),
    )),
    "tanh": ((2.0, 5.0), (
        (0.76163411383109858, 0.41991427468841924, -0.32118926578980922, 0.10433354360493227,
         0.034745345762916546, -0.049000295131441558, 0.0068641248743871452, 0.0067662670696135435),
        (0.99817954662691122, 0.0072795237860415682, -0.014632441281026393, 0.019358387884341879,
         -0.018307890971361936, 0.014828257870466635, -0.012282476284148181, 0.0059597775343902867),
    )),
    "sigmoid": ((4.0, 10.0), (
        (0.38081705691554929, 0.20995713734420962, -0.16059463289490461, 0.052166771802466136,
         0.017372672881458273, -0.024500147565720779, 0.0034320624371935726, 0.0033831335348067718),
        (0.49908977331345561, 0.0036397618930207841, -0.0073162206405131963, 0.0096791939421709394,
         -0.0091539454856809678, 0.0074141289352333177, -0.0061412381420740906, 0.0029798887671951433),
    )),
}


def _spec(name: str, breakpoints: tuple[float, ...]) -> SymmetricSpec:
    fn, slope, const = TARGETS[name]
    bps, coeffs = _COEFFS.get(name, (breakpoints, ()))
    if not coeffs:
        pieces = fit_pieces(fn, breakpoints)
    else:
        pieces, lo = [], 0.0
        for t, cf in zip(bps, coeffs, strict=True):
            hw = 2.0 ** math.ceil(math.log2((t - lo) / 2))
            pieces.append(SymPiece(cf, (lo + t) / 2, hw))
            lo = t
    parity: Literal["even", "odd"] = "even" if name in ("gelu", "silu") else "odd"
    lin = 0.5 if parity == "even" else 0.0
    c0 = 0.5 if name == "sigmoid" else 0.0
    bound = max(sum(abs(c) for c in pc.coeffs) for pc in pieces) + abs(lin) * bps[-1]
    return SymmetricSpec(parity, tuple(bps), tuple(pieces), lin=lin, const=c0, tail_slope=slope,
                         tail_const=const, bound_bits=math.ceil(math.log2(bound)) + 1)


BREAKPOINTS: dict[str, tuple[float, ...]] = {
    "gelu": (4.0,),
    "silu": (4.0, 12.0),
    "tanh": (2.0, 5.0),
    "sigmoid": (4.0, 10.0),
}

SPECS: dict[str, SymmetricSpec] = {name: _spec(name, bps) for name, bps in BREAKPOINTS.items()}


# -- evaluation on shares ----------------------------------------------------------------------------------


def _pieces(ctx: PartyContext, a: AShare, spec: SymmetricSpec) -> AShare:
    """Every piece P_i(v_i), v_i = (a - center_i) / 2^m_i, stacked (K, *a.shape), by ONE untruncated
    :func:`~secfwt.approx.poly.poly_eval` (scale 2p + c, c = min(f, 16))."""
    f, deg = ctx.f, spec.degree
    vs, cfs = [], []
    for pc in spec.pieces:
        m = round(math.log2(pc.half_width))
        shifted = a.data - ring.encode(torch.tensor(pc.center, dtype=torch.float64), f) * (ctx.rank == 0)
        vs.append(AShare(shifted, f + m))
        cfs.append(list(pc.coeffs) + [0.0] * (deg + 1 - len(pc.coeffs)))
    cf = torch.tensor(cfs, dtype=torch.float64).T.reshape(deg + 1, len(spec.pieces), *([1] * a.dim()))
    return poly_eval(ctx, stack(vs, dim=0), cf, bound_bits=spec.bound_bits, truncate=False)


def compare_bits(ctx: PartyContext, spec: SymmetricSpec, bound: float | None) -> int:
    """Opening width of the comparisons for inputs |x| < ``bound`` (None: any x, 64): every compared value
    (x -+ t_k, or |x| - t_k) is below bound + T in magnitude."""
    return 64 if bound is None else range_bits(ctx.f, bound + spec.breakpoints[-1])


def symmetric_eval(ctx: PartyContext, x: AShare, spec: SymmetricSpec, bound: float | None = None) -> AShare:
    """f(x) = const + lin x + g(x) on shares (steps and cost in the module docstring; ``bound``: narrow
    comparisons for |x| < bound, see there)."""
    with ctx.cost.scope("symmetric"):
        f = ctx.f
        x = to_scale(ctx, x, f)
        if x.numel() == 0:
            return AShare(torch.zeros(x.shape, dtype=torch.int64), f)
        ts = spec.breakpoints
        kk = len(ts)
        m_pos, m_neg = (int(m) for m in spec.tail_multipliers())
        has_tail = bool(m_pos or m_neg)
        # Rows: x, x - T, x + T (their bit products come free with ltz_select), then x -+ t_k for k < K.
        shifts = [0.0, ts[-1], -ts[-1]] + [s * t for t in ts[:-1] for s in (1.0, -1.0)]
        row = {(kk, 1): 1, (kk, -1): 2} | {(k + 1, s): 3 + 2 * k + (s < 0) for k in range(kk - 1) for s in (1, -1)}
        diffs = stack([add_public(ctx, x, -t) if t else x for t in shifts], dim=0)
        bits_sh, prods = ltz_select(ctx, diffs, 3 if has_tail else 1, compare_bits(ctx, spec, bound))
        bits = bits_sh.data  # (2K + 1, *x.shape): bits[row] = [x < shift]

        def lt(k: int, sign: int) -> torch.Tensor:
            """[x < sign * t_k] (t_0 = 0)."""
            return bits[0] if k == 0 else bits[row[(k, sign)]]

        one = server0_public(ctx, torch.ones(x.shape, dtype=torch.float64), 0)
        out_pos, out_neg = one - lt(kk, 1), lt(kk, -1)
        sels = []
        for i in range(1, kk + 1):
            pos = lt(i, 1) - lt(i - 1, 1)  # [t_(i-1) <= x < t_i]
            neg = lt(i - 1, -1) - lt(i, -1)  # [-t_i <= x < -t_(i-1)] (x < 0 for i = 1)
            sels.append(pos + neg if spec.parity == "even" else pos - neg)

        # Step 2 (no communication): a = x - 2 [x < 0] x; the exact tails m+ [x >= T] x + m- [x < -T] x,
        # with [x < +-T] x = [x < +-T] (x -+ T) +- T [x < +-T].
        a = AShare(x.data - 2 * prods.data[0], f)
        tail = None
        if has_tail:
            t_enc = int(ring.encode(torch.tensor(ts[-1]), f))
            below_pos = prods.data[1] + t_enc * lt(kk, 1)  # [x < T] x
            below_neg = prods.data[2] - t_enc * lt(kk, -1)  # [x < -T] x
            tail = AShare(m_pos * (x.data - below_pos) + m_neg * below_neg, f)

        # Step 3: all pieces on their local variables, untruncated (scale 2p + c).
        polys = _pieces(ctx, a, spec)
        top = polys.scale

        # Step 4: Q_i = P_i + lin * (x or a), selected by exact bits, summed, truncated once.
        q = polys.data
        if spec.lin:
            lin_src = x if spec.parity == "even" else a
            num = round(spec.lin * 256)
            q = q + rescale_up(AShare(mul_public_int(lin_src, num).data, f + 8), top).data
        sel = mul_exact_many(ctx, [(AShare(torch.stack(sels), 0), AShare(q, top))])[0]
        y = trunc(ctx, sel.sum(0), top - f)
        if tail is not None:
            y = add(y, tail)
        # Constants: c0 everywhere, and g's constant asymptote on the tails (sign-flipped for odd g).
        cst = ring.encode(torch.tensor(spec.const), f) * one
        if spec.tail_const:
            tail_c = out_pos + out_neg if spec.parity == "even" else out_pos - out_neg
            cst = cst + ring.encode(torch.tensor(spec.tail_const), f) * tail_c
        return AShare(y.data + cst, f)


def even_two_stage(ctx: PartyContext, x: AShare, spec: SymmetricSpec, bound: float | None = None) -> AShare:
    """f(x) = const + lin x + g(|x|) for an EVEN g with K + 1 comparisons instead of 2K + 1, in two stages.

    Steps: (1) ONE :func:`~secfwt.protocols.compare.ltz_select` on x: [x < 0] and [x < 0] x, so
    a = x - 2 [x < 0] x = |x| (6 rounds); (2) ONE :func:`~secfwt.protocols.compare.ltz` on the stacked
    [a - t_k], k = 1..K: c_k = [a < t_k] (6 rounds); region i is c_i - c_(i-1), local; (3) the pieces
    P_i(v_i) with one stacked :func:`~secfwt.approx.poly.poly_eval`, untruncated (5 rounds); (4) ONE Beaver
    round for sel_i * Q_i (Q_i = P_i + lin x at the polynomial's scale, as in :func:`symmetric_eval`) and for
    the exact tail [a >= T] (m+ (x - [x < 0] x) + m- [x < 0] x) (a bit times known shares: no truncation, any
    x), then ONE truncation of sum_i sel_i Q_i (1 + 1 rounds); constants are local.
    Cost: 19 rounds (6 more than :func:`symmetric_eval`); bytes per element per server
    19.625 (K + 1) + 72 K + 16 K + 16 + 8: silu (K = 2) 258.9 instead of 282.1, gelu (K = 1) 151.3 instead
    of 154.9 -- and K + 1 instead of 2K + 1 comparisons of local compute and dealer material, which is most
    of an activation's time on a compute-bound machine (one host, or a LAN). Same pieces, tails and error as
    :func:`symmetric_eval`; valid for every x in the fixed-point range. ``bound``: narrow comparisons for
    |x| < bound as in :func:`symmetric_eval` (x and |x| - t_k are below bound + T): 17 rounds, silu 228.9 bytes.
    """
    if spec.parity != "even":
        raise ValueError("even_two_stage: the spec's g must be even (gelu, silu)")
    with ctx.cost.scope("symmetric2"):
        f = ctx.f
        x = to_scale(ctx, x, f)
        if x.numel() == 0:
            return AShare(torch.zeros(x.shape, dtype=torch.int64), f)
        ts = spec.breakpoints
        kk = len(ts)
        bits = compare_bits(ctx, spec, bound)
        _, sign_x = ltz_select(ctx, x.unsqueeze(0), 1, bits)
        neg_x = sign_x.data[0]  # [x < 0] x
        a = AShare(x.data - 2 * neg_x, f)  # |x|
        c = ltz(ctx, stack([add_public(ctx, a, -t) for t in ts], dim=0), bits).data  # c[k - 1] = [a < t_k]
        sels = [c[0]] + [c[i] - c[i - 1] for i in range(1, kk)]
        one = server0_public(ctx, torch.ones(x.shape, dtype=torch.float64), 0)

        polys = _pieces(ctx, a, spec)
        top = polys.scale
        q = polys.data
        if spec.lin:  # wraps harmlessly where |x| >= T: multiplied by an exact 0
            q = q + rescale_up(AShare(mul_public_int(x, round(spec.lin * 256)).data, f + 8), top).data
        pairs = [(AShare(torch.stack(sels), 0), AShare(q, top))]
        m_pos, m_neg = (int(m) for m in spec.tail_multipliers())
        if m_pos or m_neg:
            pairs.append((AShare(one - c[-1], 0), AShare(m_pos * (x.data - neg_x) + m_neg * neg_x, f)))
        prods = mul_exact_many(ctx, pairs)
        y = trunc(ctx, AShare(prods[0].data.sum(0), top), top - f)
        if len(prods) > 1:
            y = add(y, prods[1])
        cst = ring.encode(torch.tensor(spec.const), f) * one
        if spec.tail_const:
            cst = cst + ring.encode(torch.tensor(spec.tail_const), f) * (one - c[-1])
        return AShare(y.data + cst, f)


def main() -> None:
    """Refit every spec, print breakpoints, per-piece and total errors and the coefficients."""
    for name, bps in BREAKPOINTS.items():
        fn, slope, const = TARGETS[name]
        pieces = fit_pieces(fn, bps)
        spec = _spec(name, bps)
        fresh = SymmetricSpec(spec.parity, bps, tuple(pieces), spec.lin, spec.const, slope, const, spec.bound_bits)
        tail = float(np.abs(slope * np.linspace(bps[-1], 64, 100001) + const
                            - fn(np.linspace(bps[-1], 64, 100001))).max())
        print(f"{name}: breakpoints {bps}, degree {DEGREE}: fit+tail max error {fit_error(fresh, fn):.2e} "
              f"(tail alone {tail:.2e}); stored coefficients: {fit_error(spec, fn):.2e}")
        print(f"    {name!r}: ({bps}, (")
        for pc in pieces:
            print("        (" + ", ".join(f"{c:.17g}" for c in pc.coeffs) + "),")
        print("    )),")


if __name__ == "__main__":
    main()
