"""secfwt.approx against torch on each op's valid range (edges included), with per-op tolerances.

Errors are measured against torch evaluated on the *encoded* input (16 fractional bits), so the input's
own quantisation (large in relative terms for tiny reciprocal/rsqrt inputs) is not charged to the op.
A value passes when |y - ref| <= atol + rtol |ref|.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from secfwt import approx, ring
from secfwt.approx import symmetric
from secfwt.context import PartyContext
from secfwt.runtime import run_in_process
from secfwt.share import AShare, reveal, reveal_ring

FRAC = 16

# op: (atol, rtol) -- the documented accuracy of each op on its valid range (docs/APPROXIMATIONS.md).
TOLERANCES: dict[str, tuple[float, float]] = {
    "exp": (1.5e-4, 0.0),
    "reciprocal": (6e-5, 3e-5),
    "rsqrt": (6e-5, 2e-5),
    "softmax": (3e-4, 0.0),
    "gelu": (3e-4, 0.0),  # symmetric (default): fit + tail 1.95e-4
    "tanh": (1.5e-4, 0.0),
    "sigmoid": (1e-4, 0.0),
    "silu": (1.5e-4, 0.0),
    "gelu/piecewise": (2e-4, 0.0),
    "tanh/piecewise": (1.5e-4, 0.0),
    "sigmoid/piecewise": (1e-4, 0.0),
    "silu/piecewise": (1.5e-4, 0.0),
    "layernorm": (2e-3, 1e-3),
    "rmsnorm": (2e-3, 1e-3),
    "poly_eval": (1e-4, 0.0),
}


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 2**FRAC) / 2**FRAC


def _share(ctx: PartyContext, x: torch.Tensor, seed: int) -> AShare:
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(-(2**62), 2**62, x.shape, generator=g, dtype=torch.int64)
    enc = ring.encode(x, FRAC)
    return AShare(r if ctx.rank == 0 else enc - r, FRAC)


def run_op(fn: Callable[..., AShare], *inputs: torch.Tensor | None, **kw: Any) -> tuple[torch.Tensor, Any]:
    """Share the inputs, run ``fn(ctx, *shares, **kw)`` on both servers, return (revealed y, server-0 costs)."""

    def prog(ctx: PartyContext) -> tuple[torch.Tensor, Any]:
        shares = [None if x is None else _share(ctx, x, 11 + i) for i, x in enumerate(inputs)]
        ctx.cost.reset()
        y = fn(ctx, *shares, **kw)
        costs = ctx.cost.by_top_level()
        return reveal(ctx, y), costs

    return run_in_process({0: prog, 1: prog}, timeout=120)[0]


def check(name: str, y: torch.Tensor, ref: torch.Tensor) -> None:
    atol, rtol = TOLERANCES[name]
    err = (y - ref).abs()
    bad = err > atol + rtol * ref.abs()
    assert not bad.any(), f"{name}: max abs error {err.max().item():.3g} (tolerance {atol} + {rtol}|ref|)"


def _wide(lo: float, hi: float, n: int, extra: list[float]) -> torch.Tensor:
    return _quantize(torch.cat([torch.linspace(lo, hi, n, dtype=torch.float64), torch.tensor(extra).double()]))


ACTIVATIONS = {
    "gelu": (approx.gelu, lambda x: F.gelu(x)),
    "tanh": (approx.tanh, torch.tanh),
    "sigmoid": (approx.sigmoid, torch.sigmoid),
    "silu": (approx.silu, F.silu),
}


@pytest.mark.parametrize("method", ["symmetric", "two-stage", "piecewise"])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_all_reals(name: str, method: str) -> None:
    fn, ref = ACTIVATIONS[name]
    if method == "two-stage" and name in ("tanh", "sigmoid"):  # odd g: the sign needs a product, not offered
        with pytest.raises(ValueError, match="must be even"):
            run_op(fn, torch.zeros(4, dtype=torch.float64), method=method)
        return
    # dense over the pieces, saturated tails, breakpoints (both constructions), SmolLM2-size SiLU inputs
    # (|x| ~ 49) and huge |x| in the fixed-point range
    bps = [2.0, 4.0, 5.0, 10.0, 12.0, 16.0, 49.0, 1e3, 1e6, 2.0**40]
    extra = [0.0, 2.0**-16, -(2.0**-16)] + [s * (b + d) for b in bps for s in (1, -1) for d in (0, 2.0**-16)]
    x = _wide(-24, 24, 4001, extra)
    y, _ = run_op(fn, x, method=method)
    check(name if method in ("symmetric", "two-stage") else f"{name}/{method}", y, ref(x))  # same pieces


def test_gelu_masked_within_its_bound() -> None:
    """method="masked" (what MpcBackend runs, bound 1024): dense over [-24, 24], the clip points 4 +- 1 ulp and
    inputs near the bound; same tolerance as the default."""
    extra = [s * (b + d) for b in (0.0, 4.0, 8.0, 100.0, 1023.0) for s in (1, -1) for d in (0, 2.0**-16)]
    x = _wide(-24, 24, 4001, extra)
    y, costs = run_op(approx.gelu, x, method="masked", bound=1024.0)
    check("gelu", y, F.gelu(x))
    (top,) = costs.values()
    per_elem = 4 + 2 * 45 / 8 + 3 + 5 + 4 + 4 + 7  # one 32-bit opening, two trees; truncations 24, 40, 32, 32, 56
    assert top.rounds == 10
    assert per_elem * x.numel() <= top.bytes_sent <= per_elem * x.numel() + 120 * 2 * top.rounds


def test_gelu_masked_stored_coefficients_are_the_fit() -> None:
    from secfwt.approx import masked_gelu

    fit = masked_gelu.fit_coefficients()
    assert max(abs(a - b) for a, b in zip(fit, masked_gelu.COEFFICIENTS, strict=True)) < 1e-9


def test_gelu_masked_needs_a_bound() -> None:
    with pytest.raises(ValueError, match="with a bound only"):
        run_op(approx.gelu, torch.zeros(4, dtype=torch.float64), method="masked")


def test_symmetric_specs_fit_errors() -> None:
    """The stored coefficients reproduce the documented float64 fit errors (pieces + tail on [0, 64])."""
    documented = {"gelu": 1.95e-4, "silu": 7.4e-5, "tanh": 9.1e-5, "sigmoid": 4.6e-5}
    for name, spec in symmetric.SPECS.items():
        fn = symmetric.TARGETS[name][0]
        assert symmetric.fit_error(spec, fn, n=64001) <= documented[name] * 1.01


def test_exp_nonpositive() -> None:
    x = _wide(-30, 0, 3001, [-63.9, -64.0, -64.1, -1e3, -1e6, -2.0**40, -2.0**-16])
    y, _ = run_op(approx.exp, x)
    check("exp", y, torch.exp(x))


def test_reciprocal_range() -> None:
    x = _quantize(2.0 ** torch.linspace(-8, 12, 2001, dtype=torch.float64))
    x = torch.cat([x, torch.tensor([2.0**-8, 2.0**12, 1.0, 3.0, 1000.0]).double()])
    y, _ = run_op(approx.reciprocal, x)
    check("reciprocal", y, 1.0 / x)


def test_rsqrt_range() -> None:
    x = _quantize(2.0 ** torch.linspace(-12, 16, 2001, dtype=torch.float64))
    x = torch.cat([x, torch.tensor([2.0**-12, 2.0**16, 1.0, 2.0, 12345.0]).double()])
    y, _ = run_op(approx.rsqrt, x)
    check("rsqrt", y, torch.rsqrt(x))


def test_softmax_masked_rows() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 50, dtype=torch.float64) * 3
    x[1] *= 10  # peaked row
    x[2, :7] = 40.0  # ties at a large value
    x[3] = 0.0  # uniform row
    x[4, 20] = 400.0  # masked outlier larger than everything else
    x = _quantize(x)
    mask = torch.ones(6, 50)
    mask[0, 10:] = 0
    mask[4, 20] = 0
    mask[5, ::3] = 0
    y, _ = run_op(approx.softmax, x, mask=mask)
    ref = torch.softmax(x.masked_fill(mask == 0, -math.inf), dim=-1)
    check("softmax", y, ref)
    assert (y[mask == 0] == 0).all()


def test_softmax_with_coarse_logits() -> None:
    """The model path (MpcBackend.scores): the logits come from a masked truncation that also gives them at scale
    0; the max tree runs on those (16-bit comparisons) and the result still matches torch, masks, ties, peaked
    and uniform rows included, with fewer bytes and rounds than the plain path."""
    from secfwt.protocols.masked import trunc_masked

    torch.manual_seed(3)
    x = torch.randn(6, 50, dtype=torch.float64) * 3
    x[1] *= 10
    x[2, :7] = 40.0
    x[3] = 0.0
    x[4, 20] = 400.0
    x[5, 3] = -2000.0
    mask = torch.ones(6, 50)
    mask[0, 10:] = 0
    mask[4, 20] = 0
    mask[5, ::3] = 0

    def prog(ctx: PartyContext) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
        z = _share(ctx, x, 5)
        z = AShare(ring.lshift(z.data, ctx.f), 2 * ctx.f)  # a product's untruncated output at scale 2f
        t = trunc_masked(ctx, z, ctx.f, 48, coarse=2 * ctx.f)
        assert t.coarse is not None
        xs, xc = t.share(), t.coarse.share()
        ctx.cost.reset()
        with ctx.cost.scope("coarse"):
            y = approx.softmax(ctx, xs, mask=mask, coarse=xc)
        with ctx.cost.scope("plain"):
            approx.softmax(ctx, xs, mask=mask)
        return reveal(ctx, y), ring.decode(reveal_ring(ctx, xs), ctx.f), ctx.cost.by_top_level(), None

    y, xq, costs, _ = run_in_process({0: prog, 1: prog}, timeout=120)[0]
    check("softmax", y, torch.softmax(xq.masked_fill(mask == 0, float("-inf")), -1))
    assert costs["coarse"].bytes_sent < costs["plain"].bytes_sent and costs["coarse"].rounds < costs["plain"].rounds

    def bad(ctx: PartyContext) -> None:
        approx.softmax(ctx, _share(ctx, x, 5), coarse=_share(ctx, x, 6))  # not at scale 0

    with pytest.raises(ValueError, match="coarse must be x at scale 0"):
        run_in_process({0: bad, 1: bad}, timeout=60)


def test_softmax_dim0_unmasked() -> None:
    torch.manual_seed(1)
    x = _quantize(torch.randn(9, 4, dtype=torch.float64) * 4)
    y, _ = run_op(approx.softmax, x, dim=0)
    check("softmax", y, torch.softmax(x, dim=0))


@pytest.mark.parametrize("n", [384, 768])
def test_layernorm_and_rmsnorm(n: int) -> None:
    torch.manual_seed(n)
    x = torch.randn(6, n, dtype=torch.float64) * 2 + 0.5
    x[1] *= 0.03  # small variance
    x[2] *= 30  # large variance
    x[3, :4] += 60  # outliers, as in BERT hidden states
    x = _quantize(x)
    w = _quantize(1 + 0.2 * torch.randn(n, dtype=torch.float64))
    b = _quantize(0.1 * torch.randn(n, dtype=torch.float64))
    y, _ = run_op(approx.layernorm, x, w, b, eps=1e-12 if n == 384 else 1e-5)
    check("layernorm", y, F.layer_norm(x, (n,), w, b, 1e-12 if n == 384 else 1e-5))
    y2, _ = run_op(approx.layernorm, x, None, None, eps=1e-5)
    check("layernorm", y2, F.layer_norm(x, (n,), None, None, 1e-5))
    y3, _ = run_op(approx.rmsnorm, x, w, eps=1e-6)
    check("rmsnorm", y3, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w)


def test_poly_eval_and_piecewise() -> None:
    x = _wide(-1, 1, 501, [])
    coeffs = [0.5, -1.0, 0.25, 0.0, 0.75, -0.5, 0.1, 0.3, -0.2]  # degree 8: 4 levels
    y, _ = run_op(approx.poly_eval, x, coeffs=coeffs)
    ref = sum(c * x**j for j, c in enumerate(coeffs))
    check("poly_eval", y, ref)
    spec = approx.PiecewiseSpec((-1.0, 1.0), (approx.Piece(intercept=2.0), approx.Piece((0.0, 0.0, 1.0)),
                                              approx.Piece(slope=3, intercept=-1.0)))
    x2 = _wide(-3, 3, 601, [-1e5, 1e5])
    y2, _ = run_op(approx.piecewise, x2, spec=spec)
    ref2 = torch.where(x2 < -1, 2.0, torch.where(x2 < 1, x2**2, 3 * x2 - 1))
    check("poly_eval", y2, ref2)


def test_documented_costs() -> None:
    """Rounds and bytes in ctx.cost match the docstring formulas (gelu, exp, reciprocal)."""
    n = 4096
    x = _quantize(torch.linspace(-6, 6, n, dtype=torch.float64))
    header_slack = 120  # per message: frame prefix + JSON header
    ltz = 8 + 93 / 8  # bytes per compared element: c, then 93 packed tree bits (protocols/compare.py)
    for fn, inp, rounds, per_elem in (
        (approx.gelu, x, 13, ltz * 3 + 72 + 16 + 8),
        (approx.silu, x, 19, ltz * 3 + 72 * 2 + 16 * 2 + 16 + 8),  # two-stage (silu's default)
        (lambda ctx, v: approx.silu(ctx, v, method="symmetric"), x, 13, ltz * 5 + 72 * 2 + 16 * 2 + 8),
        (lambda ctx, v: approx.gelu(ctx, v, method="two-stage"), x, 19, ltz * 2 + 72 + 16 + 16 + 8),
        (approx.tanh, x, 13, ltz * 5 + 72 * 2 + 16 * 2 + 8),
        (approx.exp, -x.abs(), 14, ltz + 3 + 6 + 7 + 6 * 5),  # masked truncations: w 24, y^2 48, base 56, 5 x 48 bits
        (approx.reciprocal, x.abs() + 1, 14, ltz * 19 + 24 + 136),
    ):
        _, costs = run_op(fn, inp)
        (top,) = costs.values()
        assert top.rounds == rounds
        assert per_elem * n <= top.bytes_sent <= per_elem * n + header_slack * top.rounds * 2


# -- measurement for docs/APPROXIMATIONS.md: `python tests/test_approx.py` ---------------------------------


def measure() -> None:
    """Print max abs / rel error vs torch and cost (rounds, bytes per element per server) of each op."""
    torch.manual_seed(0)
    n_act = 20001
    cases: list[tuple[str, str, Callable[..., AShare], torch.Tensor, torch.Tensor, dict[str, Any]]] = []
    for name, (fn, ref) in sorted(ACTIVATIONS.items()):
        x = _wide(-24, 24, n_act, [-2.0**40, -1e6, 1e6, 2.0**40])
        for method in ("symmetric", "piecewise"):
            cases.append((f"{name} ({method})", "[-24, 24] + |x| up to 2^40", fn, x, ref(x), {"method": method}))
        if name == "gelu":
            xb = _wide(-24, 24, n_act, [-1000.0, 1000.0])
            cases.append(("gelu (masked, bound 1024)", "[-24, 24] + |x| up to 1000", fn, xb, ref(xb),
                          {"method": "masked", "bound": 1024.0}))
    x = _wide(-30, 0, n_act, [-1e6])
    cases.append(("exp", "x <= 0", approx.exp, x, torch.exp(x), {}))
    x = _quantize(2.0 ** torch.linspace(-8, 12, n_act, dtype=torch.float64))
    cases.append(("reciprocal", "[2^-8, 2^12]", approx.reciprocal, x, 1 / x, {}))
    x = _quantize(2.0 ** torch.linspace(-12, 16, n_act, dtype=torch.float64))
    cases.append(("rsqrt", "[2^-12, 2^16]", approx.rsqrt, x, torch.rsqrt(x), {}))
    x = _quantize(torch.randn(64, 128, dtype=torch.float64) * 4)
    mask = (torch.rand(64, 128) > 0.3).double()
    mask[:, 0] = 1
    cases.append(("softmax", "N(0, 4^2) logits, 64x128, 30% masked", approx.softmax, x,
                  torch.softmax(x.masked_fill(mask == 0, -math.inf), -1), {"mask": mask}))
    for n in (384, 768):
        x = _quantize(torch.randn(32, n, dtype=torch.float64) * 2 ** torch.linspace(-4, 5, 32)[:, None])
        cases.append((f"layernorm n={n}", "row std 2^-4 .. 2^5", approx.layernorm, x,
                      F.layer_norm(x, (n,), None, None, 1e-5), {"weight": None, "bias": None, "eps": 1e-5}))
        cases.append((f"rmsnorm n={n}", "row rms 2^-4 .. 2^5", approx.rmsnorm, x,
                      x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), {"weight": None, "eps": 1e-6}))
    print("| op | range | max abs err | max rel err (|ref| >= 0.05) | rounds | bytes/elem/server |")
    print("|---|---|---|---|---|---|")
    for name, rng, fn, x, ref, kw in cases:
        y, costs = run_op(fn, x, **kw)
        err = (y - ref).abs()
        big = ref.abs() >= 0.05
        rel = (err[big] / ref.abs()[big]).max().item()
        (top,) = costs.values()
        print(f"| {name} | {rng} | {err.max().item():.2e} | {rel:.2e} | {top.rounds} | "
              f"{top.bytes_sent / x.numel():.1f} |")


if __name__ == "__main__":
    measure()
