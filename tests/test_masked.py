"""Masked truncation (protocols/masked.py): exact against plaintext integers in range and at its edges (y is
floor(z / 2^s) or one more), squares and fixed-operand products exact on the ring, costs equal to the docstring,
uniform openings, and the dealer's request checks."""

from __future__ import annotations

import pytest
import torch

from helpers import split
from secfwt.comm.base import SERVER0, SERVER1
from secfwt.correlations import check_request
from secfwt.errors import ProtocolMismatchError
from secfwt.protocols.masked import fixed_mask, open_fixed, trunc_masked, width_for
from secfwt.runtime import run_in_process
from secfwt.share import AShare, reveal_ring

CASES = [(16, 3), (24, 8), (32, 12), (48, 22), (56, 30), (64, 16), (64, 40)]


def _values(width: int, n: int, seed: int) -> torch.Tensor:
    h = 2 ** (width - 2)
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(-h, h, (n,), generator=g, dtype=torch.int64)
    z[:7] = torch.tensor([-h, h - 1, 0, -1, 1, -h + 1, h - 2])
    return z


def _floor_div(z: torch.Tensor, s: int) -> torch.Tensor:
    return torch.div(z, 2**s, rounding_mode="floor")


@pytest.mark.parametrize(("width", "bits"), CASES)
def test_trunc_square_and_product_exact(width: int, bits: int) -> None:
    z = _values(width, 3000, width + bits)
    w = torch.randint(-(2**20), 2**20, (3000,), generator=torch.Generator().manual_seed(5))
    zs, ws = split(z, encoded=True, seed=1), split(w, encoded=True, seed=2)

    def prog(ctx):
        h = fixed_mask(ctx, [3000])
        y = trunc_masked(ctx, AShare(zs[ctx.rank].clone(), 0), bits, width, square=True, fid=h.fid, release=True)
        fw = open_fixed(ctx, AShare(ws[ctx.rank].clone(), 0), h)
        return (reveal_ring(ctx, y.share()), reveal_ring(ctx, y.square()), reveal_ring(ctx, y.mul_fixed(fw)),
                reveal_ring(ctx, y.add_public_int(5).share()))

    y, y2, yw, y5 = run_in_process({SERVER0: prog, SERVER1: prog})[SERVER0]
    e = y - _floor_div(z, bits)
    assert set(e.unique().tolist()) <= {0, 1}, e.unique()
    assert torch.equal(y2, y * y)  # exact in Z_2^64 (wraps alike on both sides)
    assert torch.equal(yw, y * w)
    assert torch.equal(y5, y + 5)


@pytest.mark.parametrize(("width", "bits", "coarse"), [(16, 3, 9), (48, 16, 32), (48, 16, 46), (64, 16, 40)])
def test_coarse_copy_from_the_same_opening(width: int, bits: int, coarse: int) -> None:
    """``coarse``: the same opening also gives floor(z / 2^c) or one more (range edges included), at no extra
    online byte; its square needs no ``square`` components of its own and is not offered."""
    z = _values(width, 3000, width + coarse)
    zs = split(z, encoded=True, seed=4)

    def prog(ctx):
        y = trunc_masked(ctx, AShare(zs[ctx.rank].clone(), 0), bits, width, coarse=coarse)
        assert y.coarse is not None and y.coarse.scale == -coarse
        before = ctx.cost.total().bytes_sent
        return reveal_ring(ctx, y.share()), reveal_ring(ctx, y.coarse.share()), before

    y, yc, before = run_in_process({SERVER0: prog, SERVER1: prog})[SERVER0]
    assert 3000 * width // 8 <= before < 3000 * width // 8 + 256  # one opening for both (+ a frame header)
    assert set((y - _floor_div(z, bits)).unique().tolist()) <= {0, 1}
    assert set((yc - _floor_div(z, coarse)).unique().tolist()) <= {0, 1}


def test_coarse_must_lie_between_bits_and_width() -> None:
    def prog(ctx):
        trunc_masked(ctx, AShare(torch.zeros(4, dtype=torch.int64), 0), 8, 32, coarse=8)

    with pytest.raises(ValueError, match="coarse must be"):
        run_in_process({SERVER0: prog, SERVER1: prog})


def test_out_of_range_is_wrong_not_silently_right() -> None:
    """Beyond the documented range the wrap argument fails: z = 2^(l-1) - 1 comes out wrong for about a quarter of
    the masks (those with m = 0 and r > 2^(l-2))."""
    width, bits = 16, 4
    z = torch.full((64,), 2 ** (width - 1) - 1, dtype=torch.int64)
    zs = split(z, encoded=True, seed=3)

    def prog(ctx):
        return reveal_ring(ctx, trunc_masked(ctx, AShare(zs[ctx.rank].clone(), 0), bits, width).share())

    y = run_in_process({SERVER0: prog, SERVER1: prog})[SERVER0]
    assert not torch.all((y - _floor_div(z, bits)).abs() <= 1)


def test_cost_and_uniform_opening() -> None:
    n, width, bits = 4096, 24, 6
    z = torch.zeros(n, dtype=torch.int64)  # a constant input: the opened bytes must still look uniform
    zs = split(z, encoded=True, seed=4)
    seen: list[torch.Tensor] = []

    def prog(ctx):
        if ctx.rank == SERVER1:
            recv = ctx.comm.recv

            def spy(src, tag, shape=None, dtype=None):  # type: ignore[no-untyped-def]
                t = recv(src, tag, shape=shape, dtype=dtype)
                if tag == "mtrunc":
                    seen.append(t.clone())
                return t

            ctx.comm.recv = spy
        with ctx.cost.scope("t"):
            trunc_masked(ctx, AShare(zs[ctx.rank].clone(), 0), bits, width, square=True)
        return None

    res = run_in_process({SERVER0: prog, SERVER1: prog})
    cost = res.costs[SERVER0].by_top_level()["t"]
    assert cost.rounds == 1
    assert n * width // 8 <= cost.bytes_sent <= n * width // 8 + 512  # payload + one frame header
    dealer = res.costs[SERVER1].by_top_level()["t"].dealer_recv_bytes
    assert 32 * n <= dealer <= 32 * n + 1024  # q, m, q^2, q m
    (payload,) = seen
    counts = torch.bincount(payload.flatten().to(torch.int64), minlength=256).double()
    expected = payload.numel() / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 360, chi2  # 255 degrees of freedom: p < 1e-5 beyond ~360


def test_width_for() -> None:
    assert width_for(14) == 16 and width_for(22) == 24 and width_for(46) == 48 and width_for(62) == 64
    assert width_for(70) == 64


@pytest.mark.parametrize(("params", "msg"), [
    ({"shape": [4], "bits": 31, "width": 32}, "below width - 1"),
    ({"shape": [4], "bits": 3, "width": 12}, "multiple of 8"),
    ({"shape": [4], "bits": 3, "fid": -2}, "fid"),
])
def test_dealer_rejects_bad_requests(params: dict, msg: str) -> None:
    with pytest.raises(ProtocolMismatchError, match=msg):
        check_request("mtrunc", params, 0)


def test_cross_products_exact_and_released() -> None:
    """y1 y2 of two kept truncations is exact on the ring; after ``release`` the dealer refuses the mask."""
    z1, z2 = _values(40, 2000, 7), _values(40, 2000, 8)
    s1, s2 = split(z1, encoded=True, seed=5), split(z2, encoded=True, seed=6)

    def prog(ctx):
        a = trunc_masked(ctx, AShare(s1[ctx.rank].clone(), 0), 9, 40, keep=True)
        b = trunc_masked(ctx, AShare(s2[ctx.rank].clone(), 0), 11, 40, square=True, keep=True, cross=(a,))
        c = trunc_masked(ctx, b.square(), 20, 64, cross=(a, b), release=True)
        return (reveal_ring(ctx, a.share()), reveal_ring(ctx, b.share()), reveal_ring(ctx, b.mul(a)),
                reveal_ring(ctx, c.mul(a)), reveal_ring(ctx, c.mul(b)), reveal_ring(ctx, c.share()))

    a, b, ba, ca, cb, c = run_in_process({SERVER0: prog, SERVER1: prog})[SERVER0]
    assert torch.equal(ba, b * a) and torch.equal(ca, c * a) and torch.equal(cb, c * b)
    assert set((c - _floor_div(b * b, 20)).unique().tolist()) <= {0, 1}

    def reuse(ctx):
        a = trunc_masked(ctx, AShare(s1[ctx.rank].clone(), 0), 9, 40, keep=True)
        trunc_masked(ctx, AShare(s2[ctx.rank].clone(), 0), 11, 40, cross=(a,), release=True)
        trunc_masked(ctx, AShare(s2[ctx.rank].clone(), 0), 11, 40, cross=(a,))

    with pytest.raises(Exception, match="not kept"):
        run_in_process({SERVER0: reuse, SERVER1: reuse})
