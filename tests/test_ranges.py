"""Fixed-point ranges: every allowed frac_bits through every approximation, and overflow that is never silent.

* Each approximation runs at EVERY f in [FRAC_BITS_MIN, FRAC_BITS_MAX] against torch (float64 on the encoded
  input) with |y - ref| <= atol + rtol |ref| + k 2^-f (1 + |ref|): atol, rtol the op's approximation error,
  k 2^-f the fixed-point part (table in docs/APPROXIMATIONS.md, "Every frac_bits").
* The data owner rejects inputs beyond the safe bound and flags revealed values that can only come from a
  wrapped ring; ops fed outside their range behave as their docstrings say (saturate, or are flagged).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from secfwt import approx, ring
from secfwt.approx.exp import LOGIT_BOUND
from secfwt.context import FRAC_BITS_MAX, FRAC_BITS_MIN, OWNER, FixedPoint, PartyContext
from secfwt.errors import ConfigError, FixedPointRangeError
from secfwt.protocols.arith import mul_aa
from secfwt.protocols.cosine import cos_sin
from secfwt.runtime import run_in_process
from secfwt.share import (
    AShare,
    check_revealed,
    input_bound,
    owner_share,
    receive_revealed,
    reveal,
    reveal_bound,
    reveal_to,
    share_from_owner,
    stack,
)

ALL_F = list(range(FRAC_BITS_MIN, FRAC_BITS_MAX + 1))

# op: (atol, rtol, k): |y - ref| <= atol + rtol |ref| + k 2^-f (1 + |ref|). atol and rtol are the approximation
# error, with the 64-bit ring's floor: polynomial coefficients keep min(f, 16) bits and the working scale
# p <= (61 - bound - 16) / 2, so the polynomial ops do not improve beyond ~2^-17 however large f is.
# atol/rtol are test_approx's f = 16 tolerances where they exist; k = 4 is ~2x the worst 2^-f multiple measured
# over f = 4..24 on these inputs (a 1-ulp rounding at f = 4 is 2^-4 = 0.06).
RANGE_TOL: dict[str, tuple[float, float, float]] = {
    "exp": (3e-5, 0.0, 4.0),
    "reciprocal": (6e-5, 3e-5, 4.0),
    "rsqrt": (6e-5, 2e-5, 4.0),
    "softmax": (1e-4, 0.0, 4.0),
    "gelu": (3e-4, 0.0, 4.0),
    "gelu/piecewise": (2e-4, 0.0, 4.0),
    "gelu/masked": (3e-4, 0.0, 4.0),  # f < 10: the symmetric pieces with the bound
    "silu": (1.5e-4, 0.0, 4.0),
    "silu/symmetric": (1.5e-4, 0.0, 4.0),
    "tanh": (1.5e-4, 0.0, 4.0),
    "sigmoid": (1e-4, 0.0, 4.0),
    "layernorm": (1e-4, 1e-4, 4.0),
    "rmsnorm": (1e-4, 1e-4, 4.0),
    "cos_sin": (0.0, 0.0, 4.0),
    "poly_eval": (2e-5, 0.0, 4.0),
}


def _q(x: torch.Tensor, f: int) -> torch.Tensor:
    return torch.round(x * 2**f) / 2**f


def _share(ctx: PartyContext, x: torch.Tensor, f: int, seed: int) -> AShare:
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(-(2**62), 2**62, x.shape, generator=g, dtype=torch.int64)
    enc = ring.encode(x, f)
    return AShare(r if ctx.rank == 0 else enc - r, f)


def run_f(f: int, fn: Callable[..., AShare], *inputs: torch.Tensor | None, **kw: Any) -> torch.Tensor:
    """Share the inputs with f bits, run ``fn`` on both servers with FixedPoint(f), reveal."""

    def prog(ctx: PartyContext) -> torch.Tensor:
        shares = [None if x is None else _share(ctx, x, f, 11 + i) for i, x in enumerate(inputs)]
        return reveal(ctx, fn(ctx, *shares, **kw))

    return run_in_process({0: prog, 1: prog}, fxp=FixedPoint(f), timeout=120)[0]


def _cos_sin(ctx: PartyContext, u: AShare) -> AShare:
    return stack(list(cos_sin(ctx, u, truncate=True)))


def _cases(f: int) -> list[tuple[str, Callable[..., AShare], tuple[torch.Tensor | None, ...], dict[str, Any],
                                 torch.Tensor]]:
    """(name, fn, inputs, kwargs, reference) for every approximation at f, on tiny inputs in the op's range."""
    torch.manual_seed(f)
    out: list[tuple[str, Callable[..., AShare], tuple[torch.Tensor | None, ...], dict[str, Any],
                    torch.Tensor]] = []
    x = _q(torch.cat([torch.linspace(-20, 0, 41), torch.tensor([-200.0, -1e4])]).double(), f)
    out.append(("exp", approx.exp, (x,), {}, torch.exp(x)))
    x = _q(2.0 ** torch.linspace(max(-8, -f), 12, 41, dtype=torch.float64), f)
    out.append(("reciprocal", approx.reciprocal, (x,), {}, 1 / x))
    x = _q(2.0 ** torch.linspace(max(-12, -f), 16, 41, dtype=torch.float64), f)
    out.append(("rsqrt", approx.rsqrt, (x,), {}, torch.rsqrt(x)))
    x = _q(torch.randn(3, 16, dtype=torch.float64) * 3, f)
    x[1, 3] = 60.0
    mask = torch.ones(3, 16)
    mask[2, ::2] = 0
    out.append(("softmax", approx.softmax, (x,), {"mask": mask},
                torch.softmax(x.masked_fill(mask == 0, -math.inf), -1)))
    x = _q(torch.cat([torch.linspace(-8, 8, 41), torch.tensor([-100.0, -13.0, 13.0, 100.0])]).double(), f)
    for name, fn, ref, kw in (
        ("gelu", approx.gelu, F.gelu, {}),
        ("gelu/piecewise", approx.gelu, F.gelu, {"method": "piecewise"}),
        ("gelu/masked", approx.gelu, F.gelu, {"method": "masked", "bound": 1024.0}),
        ("silu", approx.silu, F.silu, {}),
        ("silu/symmetric", approx.silu, F.silu, {"method": "symmetric"}),
        ("tanh", approx.tanh, torch.tanh, {}),
        ("sigmoid", approx.sigmoid, torch.sigmoid, {}),
    ):
        out.append((name, fn, (x,), kw, ref(x)))
    x = _q(torch.randn(3, 32, dtype=torch.float64) * 2 + 0.5, f)
    w = _q(1 + 0.2 * torch.randn(32, dtype=torch.float64), f)
    b = _q(0.1 * torch.randn(32, dtype=torch.float64), f)
    out.append(("layernorm", approx.layernorm, (x, w, b), {"eps": 1e-5}, F.layer_norm(x, (32,), w, b, 1e-5)))
    out.append(("rmsnorm", approx.rmsnorm, (x, w), {"eps": 1e-6},
                x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w))
    u = _q(torch.cat([torch.linspace(-2, 2, 41), torch.tensor([1e3 + 0.3])]).double(), f)
    frac = u - torch.floor(u)
    out.append(("cos_sin", _cos_sin, (u,), {},
                torch.stack([torch.cos(2 * math.pi * frac), torch.sin(2 * math.pi * frac)])))
    x = _q(torch.linspace(-1, 1, 41, dtype=torch.float64), f)
    coeffs = [0.5, -1.0, 0.25, 0.0, 0.75, -0.5, 0.1, 0.3]
    out.append(("poly_eval", approx.poly_eval, (x,), {"coeffs": coeffs}, sum(c * x**j for j, c in enumerate(coeffs))))
    return out


@pytest.mark.parametrize("f", ALL_F)
def test_every_frac_bits_every_approximation(f: int) -> None:
    failures = []
    for name, fn, inputs, kw, ref in _cases(f):
        y = run_f(f, fn, *inputs, **kw)
        atol, rtol, k = RANGE_TOL[name]
        err = (y - ref).abs()
        tol = atol + rtol * ref.abs() + k * 2.0**-f * (1 + ref.abs())
        if (err > tol).any():
            failures.append(f"{name}: max err {err.max().item():.3g}, worst err/tol {(err / tol).max().item():.2f}")
    assert not failures, f"f = {f}: " + "; ".join(failures)


@pytest.mark.parametrize("bad", [FRAC_BITS_MIN - 1, FRAC_BITS_MAX + 1, 28])
def test_frac_bits_outside_range_rejected(bad: int) -> None:
    with pytest.raises(ConfigError, match=rf"\[{FRAC_BITS_MIN}, {FRAC_BITS_MAX}\], got {bad} \(products"):
        FixedPoint(bad)


# -- the data owner's checks -----------------------------------------------------------------------------------


def _owner_run(owner: Callable[[PartyContext], Any], servers: Callable[[PartyContext], Any],
               f: int = 16) -> Any:
    return run_in_process({0: servers, 1: servers, OWNER: owner}, fxp=FixedPoint(f), timeout=20).results[OWNER]


def test_owner_input_beyond_bound_rejected_before_sending() -> None:
    streams: list[int] = []

    def owner(ctx: PartyContext) -> None:
        bad = torch.tensor([[0.5, -3.0e4], [2.0**16, 1.0]], dtype=torch.float64)
        try:
            owner_share(ctx, bad, tag="prompts")
        finally:
            streams.append(ctx._owner_stream)

    def servers(ctx: PartyContext) -> None:
        share_from_owner(ctx, (2, 2), tag="prompts")

    with pytest.raises(FixedPointRangeError, match=r"owner input 'prompts': max \|value\| = 65536 .*index \(1, 0\)"
                       r".* exceeds the allowed bound 32768 \(scale 16"):
        _owner_run(owner, servers)
    assert streams == [0]  # no PRG stream was used: the owner's state is unchanged


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_owner_input_nan_inf_rejected(bad: float) -> None:
    def owner(ctx: PartyContext) -> None:
        owner_share(ctx, torch.tensor([1.0, bad, 2.0], dtype=torch.float64), tag="embeds")

    def servers(ctx: PartyContext) -> None:
        share_from_owner(ctx, (3,), tag="embeds")

    with pytest.raises(FixedPointRangeError, match=r"owner input 'embeds': 1 entries are NaN or infinite "
                                                   r"\(first at index \(1,\)\)"):
        _owner_run(owner, servers)


def test_input_bound() -> None:
    assert input_bound(16) == 2.0**15 and input_bound(24) == 128.0 and input_bound(0) == 2.0**31
    # Two inputs at the bound multiply exactly: |x y| 2^(2 scale) = 2^62 - (just below with strict <).
    for s in (4, 16, 24):
        assert (input_bound(s) * 2**s) ** 2 <= 2.0**62


def test_honest_reveal_passes_and_wrapped_product_is_flagged() -> None:
    """Owner shares x (|x| < 2^15); servers reveal x^2 (exact, < 2^30) and x^3 (beyond 2^(62 - 2f): wraps)."""
    x = torch.tensor([3.0e4, -2.9e4, 1.5e4, 2.0e4, -1.0e4, 2.5e4, 3.1e4, -3.2e4], dtype=torch.float64)

    def servers(ctx: PartyContext) -> None:
        v = share_from_owner(ctx, x.shape)
        sq = mul_aa(ctx, v, v)
        reveal_to(ctx, sq, OWNER, tag="square")
        reveal_to(ctx, mul_aa(ctx, sq, v), OWNER, tag="cube")

    def owner(ctx: PartyContext) -> torch.Tensor:
        owner_share(ctx, x)
        sq = receive_revealed(ctx, x.shape, ctx.f, tag="square")
        assert torch.allclose(sq, x * x, rtol=1e-9)
        return receive_revealed(ctx, x.shape, ctx.f, tag="cube")

    with pytest.raises(FixedPointRangeError, match=r"revealed 'cube': .* exceeds the bound 1.07374e\+09 \(f = 16\); "
                                                   r"likely cause: a wrapped ring value"):
        _owner_run(owner, servers)


def test_reveal_bound_from_caller_with_cause() -> None:
    def servers(ctx: PartyContext) -> None:
        v = share_from_owner(ctx, (2, 3))
        reveal_to(ctx, v, OWNER, tag="logits")

    def owner(ctx: PartyContext) -> torch.Tensor:
        owner_share(ctx, torch.tensor([[1.0, -19.5, 3.0], [0.0, 2.0, -25.0]], dtype=torch.float64))
        return receive_revealed(ctx, (2, 3), ctx.f, tag="logits", bound=20.0,
                                cause="similarity logits are 20 x cosine")

    with pytest.raises(FixedPointRangeError, match=r"revealed 'logits': \|x\| = 25 \(1 of 6 entries, first at index "
                                                   r"\(1, 2\), value -25\) exceeds the bound 20 \(f = 16\); likely "
                                                   r"cause: similarity logits are 20 x cosine"):
        _owner_run(owner, servers)
    assert reveal_bound(16) == 2.0**30 and reveal_bound(24) == 2.0**14
    check_revealed(torch.tensor([19.9, -20.0]), "logits", 20.0, 16)  # inside: no error


# -- ops outside their range behave as documented ---------------------------------------------------------------


def test_layernorm_outside_variance_range() -> None:
    """var + eps below 2^-16: saturates (|y| <= |exact|, constant row exactly 0); above 2^16 up to the wrap
    point n var < 2^30 (f = 16): correct to a few percent."""
    f, n = 16, 64
    torch.manual_seed(3)
    base = torch.randn(5, n, dtype=torch.float64)
    stds = torch.tensor([0.0, 1e-4, 2.0**10, 2.0**11.5, 2.0**12], dtype=torch.float64)
    x = _q(base * stds[:, None] + 0.25, f)
    y = run_f(f, approx.layernorm, x, None, None, eps=1e-12)
    ref = F.layer_norm(x, (n,), None, None, 1e-12)
    assert (y[0] == 0).all()
    # |y| <= |exact| up to the truncation error of x - mean (<= 2 ulp = 2^(1-f)) times the saturated 1/sqrt
    # (<= 2.65 * 2^8 at the range floor 2^-16): 0.021; the masks are fresh each run, so this is the bound
    assert (y[1].abs() <= ref[1].abs() + 2 * 2.0**-f * 2.65 * 2**8).all() and y[1].abs().max() < math.sqrt(n)
    rel = ((y[2:] - ref[2:]).abs() / (1 + ref[2:].abs())).max()
    assert rel < 0.05, f"large-variance rows: relative error {rel:.3g}"


def test_reciprocal_and_rsqrt_outside_range() -> None:
    """Below 2^lo: bounded saturation; just above 2^hi: the documented extrapolation (1% / 2% low at 1.2 /
    1.35 2^hi, collapsing to ~0 at 1.5 2^hi for 1/x)."""
    f, lo, hi = 16, -2, 4
    below = _q(torch.tensor([2.0**-16, 2.0**-8, 2.0**-4, 0.2], dtype=torch.float64), f)
    y = run_f(f, approx.reciprocal, below, lo=lo, hi=hi)
    assert (y > 0).all() and (y <= 5.7 * 2.0**-lo).all() and (y <= 1 / below).all()
    y = run_f(f, approx.rsqrt, below, lo=lo, hi=hi)
    assert (y > 0).all() and (y <= 2.65 * 2.0 ** (-lo / 2)).all() and (y <= below.rsqrt()).all()
    above = torch.tensor([1.2, 1.35, 1.5], dtype=torch.float64) * 2.0**hi
    ratio = run_f(f, approx.reciprocal, above, lo=lo, hi=hi) * above
    assert abs(ratio[0] - 0.99) < 0.01 and abs(ratio[1] - 0.86) < 0.01 and abs(ratio[2]) < 0.01
    ratio = run_f(f, approx.rsqrt, torch.tensor([1.35, 1.5]).double() * 2.0**hi, lo=lo, hi=hi) * (
        torch.tensor([1.35, 1.5]).double() * 2.0**hi).sqrt()
    assert abs(ratio[0] - 0.98) < 0.01 and abs(ratio[1] - 0.86) < 0.01


def test_softmax_wide_logits_stay_probabilities() -> None:
    """Logit spreads far beyond exp's clamp (-128) and up to the documented bound 2^13 (approx.exp.LOGIT_BOUND):
    max-subtracted inputs stay in range."""
    b = LOGIT_BOUND - 1.0
    x = torch.tensor([[0.0, -1e3, b, b - 1.0], [-b, 5.0, 4.0, -3.0]], dtype=torch.float64)
    y = run_f(16, approx.softmax, x)
    assert (y >= 0).all() and (y <= 1 + 1e-4).all()
    assert (y - torch.softmax(x, -1)).abs().max() < 3e-4


# -- cos_sin's input scale ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0, 45])
def test_cos_sin_rejects_bad_scale(scale: int) -> None:
    def prog(ctx: PartyContext) -> None:
        cos_sin(ctx, AShare(torch.zeros(3, dtype=torch.int64), scale))

    with pytest.raises(FixedPointRangeError, match=rf"cos_sin: input scale {scale} with f = 16: expected 1 <= "
                                                   r"scale <= 44"):
        run_in_process({0: prog, 1: prog}, timeout=20)


def test_cos_sin_accepts_scale_2f() -> None:
    """An untruncated product (scale 2f = 32 <= 60 - f) is a valid input: only u mod 1 matters."""
    u = _q(torch.linspace(-3, 3, 25, dtype=torch.float64), 16)

    def prog(ctx: PartyContext) -> torch.Tensor:
        v = _share(ctx, u, 16, 5)
        return reveal(ctx, _cos_sin(ctx, AShare(ring.lshift(v.data, 16), 32)))

    y = run_in_process({0: prog, 1: prog}, timeout=20)[0]
    frac = u - torch.floor(u)
    assert (y[0] - torch.cos(2 * math.pi * frac)).abs().max() < 4e-5
    assert (y[1] - torch.sin(2 * math.pi * frac)).abs().max() < 4e-5
