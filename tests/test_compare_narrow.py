"""Narrow comparisons (ltz with bits = l < 64): exact against plaintext in range and at its edges, the documented
wrong bit outside it, costs (rounds, bytes, dealer bytes) equal to the docstring formulas, uniform openings,
dealer request checks, and the approximations that pass a bound."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import split
from secfwt import approx, ring
from secfwt.comm.base import SERVER0, SERVER1
from secfwt.context import FixedPoint
from secfwt.correlations import check_request, compare_words, even_bits, odd_bits, split_bits, tree_width
from secfwt.errors import ProtocolMismatchError
from secfwt.protocols.compare import ltz, ltz_select, range_bits, relu
from secfwt.runtime import run_in_process
from secfwt.share import AShare, reveal, reveal_ring

WIDTHS = [8, 16, 24, 32, 40, 56]


def _in_range(bits: int, n: int, seed: int) -> torch.Tensor:
    h = 2 ** (bits - 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-h, h, (n,), generator=g, dtype=torch.int64)
    x[:6] = torch.tensor([-h, h - 1, 0, -1, 1, -h + 1])
    return x


def _run_ltz(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sh = split(x, encoded=True, seed=bits)
    k = x.numel() // 2

    def prog(ctx):
        xs = AShare(sh[ctx.rank].clone(), 0)
        b = reveal_ring(ctx, ltz(ctx, xs, bits=bits))
        b2, p = ltz_select(ctx, xs.reshape(2, k), 1, bits=bits)
        return b, reveal_ring(ctx, b2).flatten(), reveal_ring(ctx, p).flatten()

    return run_in_process({SERVER0: prog, SERVER1: prog})[SERVER0]


@pytest.mark.parametrize("bits", WIDTHS)
def test_narrow_ltz_exact_in_range_and_at_edges(bits: int) -> None:
    x = _in_range(bits, 2000, bits)
    b, b2, p = _run_ltz(x, bits)
    want = (x < 0).long()
    assert torch.equal(b, want) and torch.equal(b2, want)
    assert torch.equal(p, (want * x)[:1000])  # [x < 0] x exactly on the ring, first row


def test_full_width_unchanged_on_the_whole_ring() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-(2**63), 2**63 - 1, (1000,), generator=g, dtype=torch.int64)
    x[:3] = torch.tensor([-(2**63), 2**63 - 1, 0])
    b, _, p = _run_ltz(x, 64)
    assert torch.equal(b, (x < 0).long()) and torch.equal(p, ((x < 0).long() * x)[:500])


@pytest.mark.parametrize("bits", [8, 32])
def test_narrow_ltz_outside_range_is_the_sign_of_x_mod_2_to_the_l(bits: int) -> None:
    """Documented: outside |x| < 2^(l-1) the bit is bit l - 1 of x mod 2^l (wrong where x wraps)."""
    h = 2 ** (bits - 1)
    x = torch.tensor([h, -h - 1, 2 * h, 3 * h + 5, -5 * h - 3, 2**62, -(2**62) + 7] * 10, dtype=torch.int64)
    b, _, _ = _run_ltz(x, bits)
    assert torch.equal(b, (x >> (bits - 1)) & 1)
    assert b[0] == 1 and b[1] == 0  # x = 2^(l-1) reads as negative, x = -2^(l-1) - 1 as non-negative


def test_bits_rounded_up_and_rejected() -> None:
    x = _in_range(16, 64, 1)  # bits = 12 rounds up to a 16-bit opening: still exact for |x| < 2^15
    b, _, _ = _run_ltz(x, 12)
    assert torch.equal(b, (x < 0).long())

    def prog(ctx):
        ltz(ctx, AShare(torch.zeros(3, dtype=torch.int64), 0), bits=65)

    with pytest.raises(ValueError, match=r"ltz: bits must be an int in \[1, 64\], got 65"):
        run_in_process({SERVER0: prog, SERVER1: prog}, timeout=20)


def test_range_bits() -> None:
    assert range_bits(16, 2.0**15) == 32 and range_bits(16, 2.0**15 + 1) == 40
    assert range_bits(16, 2.0**21) == 40 and range_bits(4, 8.0) == 8 and range_bits(24, 2.0**40) == 64
    for f, bound in ((16, 4100.0), (8, 3.0), (24, 1000.0)):
        assert bound * 2**f <= 2 ** (range_bits(f, bound) - 1)


@pytest.mark.parametrize("bits", [8, 16, 32, 40, 64])
def test_costs_match_the_docstring_formula(bits: int) -> None:
    n = 4000
    sh = split(_in_range(min(bits, 63), n, 3), encoded=True, seed=4)

    def prog(ctx):
        ltz(ctx, AShare(sh[ctx.rank].clone(), 0), bits=bits)

    res = run_in_process({SERVER0: prog, SERVER1: prog})
    w = tree_width(bits)
    c0 = res.costs[SERVER0].by_top_level()["ltz"]
    assert c0.rounds == int(math.log2(w))
    per = bits / 8 + (3 * (w // 2 - 2) + 3) / 8
    assert per * n <= c0.bytes_sent < per * n + c0.rounds * 150
    # dealer -> server 1: rb (w / 8), q (w / 16), tc (16 per tree word), mono (32) per element
    ws = compare_words(n, w)
    n0 = -(-n * w // 64)
    dealer = 8 * n0 + 4 * n0 + 16 * sum(ws[1:]) + 32 * n
    assert dealer <= res.costs[SERVER1].by_top_level()["ltz"].dealer_bytes < dealer + 4 * 150


def _chi2_bytes(t: torch.Tensor) -> float:
    b = t.contiguous().view(torch.uint8).to(torch.int64)
    counts = torch.bincount(b, minlength=256).double()
    exp = b.numel() / 256
    return float(((counts - exp) ** 2 / exp).sum())


@pytest.mark.parametrize("bits", [16, 32])
def test_narrow_openings_are_uniform_whatever_the_inputs(bits: int) -> None:
    """Every ltz message server 1 receives (c on l / 8 bytes, the packed tree levels, the root bits) looks uniform
    (chi-square on bytes, 6 sd bound) for constant inputs 0, -1 and the range edge 2^(l-1) - 1."""
    n = 40000
    received: dict[tuple[int, str], torch.Tensor] = {}
    values = (0, -1, 2 ** (bits - 1) - 1)
    for value in values:
        shares = split(torch.full((n,), value, dtype=torch.int64), encoded=True, seed=5)

        def prog(ctx, shares=shares, value=value):
            if ctx.rank == SERVER1:
                orig = ctx.comm.recv

                def recording(peer, tag, *a, **k):
                    t = orig(peer, tag, *a, **k)
                    if peer == SERVER0 and tag.startswith("ltz/"):
                        received[(value, tag)] = t.clone()
                    return t

                ctx.comm.recv = recording  # test instrumentation of this instance only
            ltz_select(ctx, AShare(shares[ctx.rank].clone(), 0).unsqueeze(0), 1, bits=bits)

        run_in_process({SERVER0: prog, SERVER1: prog})
    levels = int(math.log2(tree_width(bits))) - 2
    tags = {tag for _, tag in received}
    assert tags == {"ltz/c", "ltz/root"} | {f"ltz/tree{i}" for i in range(levels)}
    assert received[(0, "ltz/c")].numel() == n * bits // 8  # l / 8 bytes per element
    bound = 255 + 6 * 22.6
    for key, msg in received.items():
        assert _chi2_bytes(msg.flatten()) < bound, key
    assert _chi2_bytes(torch.full((n,), 5, dtype=torch.int64)) > bound  # the statistic can fail


def test_dealer_checks_bits_and_narrow_layouts() -> None:
    _, lay = check_request("compare_sel", {"shape": [100], "prod_shape": [40], "bits": 32}, 0)
    assert lay["rb"] == ((50,), torch.int64) and lay["q"] == ((50,), torch.int32)
    assert lay["monor"] == ((10, 40), torch.int64)
    canon, lay = check_request("compare", {"shape": [100]}, 0)
    assert canon["bits"] == 64 and lay["rb"] == ((100,), torch.int64)
    for bad in (12, 0, 72, "32", 32.0):
        with pytest.raises(ProtocolMismatchError, match=r"request #3 \(compare\): parameter 'bits': expected a "
                                                        r"multiple of 8 in \[8, 64\]"):
            check_request("compare", {"shape": [10], "bits": bad}, 3)


@pytest.mark.parametrize("f", [4, 16, 24])
def test_activations_with_a_bound_stay_accurate(f: int) -> None:
    """gelu / silu (both methods) with bound = 120: the same tolerances as tests/test_ranges.py (|x| <= 100 and
    the range edge), narrow comparisons (fewer rounds than the full-width default)."""
    x = torch.cat([torch.linspace(-8, 8, 41), torch.tensor([-100.0, -13.0, 13.0, 100.0, 119.0, -119.0])]).double()
    x = torch.round(x * 2**f) / 2**f
    cases = [("gelu", approx.gelu, F.gelu, {}, 3e-4), ("silu", approx.silu, F.silu, {}, 1.5e-4),
             ("silu", approx.silu, F.silu, {"method": "symmetric"}, 1.5e-4),
             ("gelu", approx.gelu, F.gelu, {"method": "piecewise"}, 2e-4)]
    sh = split(x, scale=f, seed=9)

    def prog(ctx):
        xs = AShare(sh[ctx.rank].clone(), f)
        return [reveal(ctx, fn(ctx, xs, bound=120.0, **kw)) for _, fn, _, kw, _ in cases]

    res = run_in_process({SERVER0: prog, SERVER1: prog}, fxp=FixedPoint(f), timeout=60)
    for (name, _, ref, kw, atol), y in zip(cases, res[SERVER0], strict=True):
        r = ref(x)
        tol = atol + 4 * 2.0**-f * (1 + r.abs())
        assert ((y - r).abs() <= tol).all(), (name, kw, f, float((y - r).abs().max()))
    tops = res.costs[SERVER0].by_top_level()
    assert tops["gelu"].rounds < 13 + 13 + 13  # narrow: 12 (symmetric) + 12 (piecewise) at f = 16
    if f == 16:
        assert tops["gelu"].rounds == 12 + 12


def test_relu_narrow_exact_and_gelu_bound_cost() -> None:
    f, n = 16, 4096
    x = torch.round(torch.linspace(-6, 6, n, dtype=torch.float64) * 2**f) / 2**f
    sh = split(x, scale=f, seed=1)

    def prog(ctx):
        xs = AShare(sh[ctx.rank].clone(), f)
        out = reveal(ctx, relu(ctx, xs, bits=range_bits(f, 8.0)))
        approx.gelu(ctx, xs, bound=1000.0)  # range_bits(16, 1004) = 32
        return out

    res = run_in_process({SERVER0: prog, SERVER1: prog})
    assert torch.equal(res[SERVER0], torch.relu(ring.decode(ring.encode(x, f), f)))
    c = res.costs[SERVER0].by_top_level()
    assert c["relu"].rounds == 5  # range_bits(16, 8) = 24 (20 bits rounded up): a 32-bit tree, 5 rounds
    g = c["gelu"]
    per = 3 * (4 + 45 / 8) + 72 + 16 + 8  # 124.875 bytes per element (symmetric, bound given)
    assert g.rounds == 12 and per * n <= g.bytes_sent <= per * n + 120 * g.rounds * 2


@pytest.mark.parametrize("bits", [32, 64])
def test_shifted_rows_share_one_opening(bits: int) -> None:
    """ltz_select_shifted: [x < t_j] and [x < t_j](x - t_j) exact for every row, from one opening of x + r."""
    from secfwt.protocols.compare import ltz_select_shifted

    n, shifts = 3000, [4.0, -4.0, 0.5]
    g = torch.Generator().manual_seed(bits)
    x = torch.randint(-(2**27), 2**27, (n,), generator=g, dtype=torch.int64)  # scale 16: |x| < 2^11
    x[:4] = torch.tensor([4 << 16, (4 << 16) - 1, -(4 << 16), -(4 << 16) - 1])
    sh = split(x, encoded=True, seed=9)

    def prog(ctx):
        with ctx.cost.scope("s"):
            b, p = ltz_select_shifted(ctx, AShare(sh[ctx.rank].clone(), 16), shifts, 2, bits)
        return reveal_ring(ctx, b), reveal_ring(ctx, p)

    res = run_in_process({SERVER0: prog, SERVER1: prog})
    b, p = res[SERVER0]
    rows = torch.stack([x - int(t * 2**16) for t in shifts])
    assert torch.equal(b, (rows < 0).long())
    assert torch.equal(p, ((rows < 0).long() * rows)[:2])
    w = tree_width(bits)
    per = bits / 8 + len(shifts) * (3 * (w // 2 - 2) + 3) / 8
    sent = res.costs[SERVER0].by_top_level()["s"].bytes_sent
    assert per * n <= sent <= per * n + 120 * 2 * 8


def test_tile_must_divide_the_shape() -> None:
    with pytest.raises(ProtocolMismatchError, match="multiple of tile"):
        check_request("compare", {"shape": [10], "bits": 32, "tile": 3}, 0)


def test_low_bytes_round_trip_every_width() -> None:
    """open_low's byte split and join (int32 / int16 / byte units by width) against the arithmetic form, on
    the ring's edges and random words."""
    from secfwt.protocols.compare import _from_low_bytes, _low_bytes

    edges = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 255, 256, 2**31, -(2**31), 2**47 + 5], dtype=torch.int64)
    v = torch.cat([edges, torch.randint(-(2**63), 2**63 - 1, (1000,), dtype=torch.int64)])
    for nb in range(1, 8):
        b = _low_bytes(v, nb)
        shifts = torch.arange(nb, dtype=torch.int64) * 8
        assert torch.equal(b, ((v.reshape(-1, 1) >> shifts) & 255).to(torch.uint8)), nb
        assert torch.equal(_from_low_bytes(b, nb), v & ((1 << (8 * nb)) - 1)), nb


def _even_reference(v: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(v)
    for i in range(32):
        out |= ((v >> (2 * i)) & 1) << i
    return out


def test_bit_compaction_exact_on_edges_and_random_words() -> None:
    """even_bits, odd_bits and the one-pass split_bits against a bit-by-bit reference (both signs, 0, -1,
    the extreme words, alternating patterns)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-(2**63), 2**63 - 1, (4096,), generator=g, dtype=torch.int64)
    x[:8] = torch.tensor([0, -1, 2**63 - 1, -(2**63), 1, -2, 0x5555555555555555, -0x5555555555555556])
    odd, even = split_bits(x)
    assert torch.equal(even, _even_reference(x)) and torch.equal(odd, _even_reference(x >> 1))
    assert torch.equal(even_bits(x), even) and torch.equal(odd_bits(x), odd)
    assert int(even.min()) >= 0 and int(odd.max()) < 2**32
