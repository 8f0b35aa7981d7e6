"""Two-server protocols in-process: exact ring results against the plaintext oracle, costs, security checks."""

from __future__ import annotations

import pytest
import torch

from helpers import mine, split
from secfwt import ring
from secfwt.comm.base import DEALER, SERVER0, SERVER1
from secfwt.dealer import compare_words
from secfwt.protocols.arith import fix_weight, matmul_aa, matmul_fixed, mul_aa, square_a, trunc
from secfwt.protocols.compare import less_than, ltz, ltz_select, max_, relu
from secfwt.runtime import run_in_process
from secfwt.share import AShare, add, reveal, reveal_ring

F = 16


def run(prog):
    res = run_in_process({SERVER0: prog, SERVER1: prog})
    assert torch.equal(res[SERVER0], res[SERVER1]) if isinstance(res[SERVER0], torch.Tensor) else True
    return res


def ring_rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, shape, generator=g, dtype=torch.int64)


def test_beaver_mul_and_matmul_exact_on_the_ring():
    # Untruncated products (out_scale = 2f) must equal the plaintext ring products exactly, for uniform
    # ring inputs (all wraparound cases).
    x, y = ring_rand((6, 7), 1), ring_rand((6, 7), 2)
    w = ring_rand((7, 5), 3)
    b = ring_rand((4, 7, 5), 4)  # batched right operand (broadcast over leading dims)
    xs, ys, ws, bs = (split(t, encoded=True, seed=i) for i, t in enumerate([x, y, w, b]))

    def prog(ctx):
        X, Y, W, B = (mine(ctx, s) for s in (xs, ys, ws, bs))
        return torch.cat(
            [
                reveal_ring(ctx, mul_aa(ctx, X, Y, out_scale=2 * F)).flatten(),
                reveal_ring(ctx, matmul_aa(ctx, X, W, out_scale=2 * F)).flatten(),
                reveal_ring(ctx, matmul_aa(ctx, X, B, out_scale=2 * F)).flatten(),
                reveal_ring(ctx, square_a(ctx, X, out_scale=2 * F)).flatten(),
                reveal_ring(ctx, mul_aa(ctx, X, Y[0:1], out_scale=2 * F)).flatten(),  # broadcasting
            ]
        )

    got = run(prog)[SERVER0]
    want = torch.cat(
        [
            (x * y).flatten(),
            torch.matmul(x, w).flatten(),
            torch.matmul(x, b).flatten(),
            (x * x).flatten(),
            (x * y[0:1]).flatten(),
        ]
    )
    assert torch.equal(got, want)


def test_fixed_weight_matmul_exact_on_the_ring_and_opened_once():
    """A weight with a fixed mask: opened once (8|W| bytes), then each product costs only its activation's
    opening; exact on the ring (uniform ring inputs, scale 0: no truncation) for x @ W^T and x @ W, batched x."""
    w = ring_rand((5, 7), 11)  # (out, in)
    xs_plain = [ring_rand((3, 7), 12), ring_rand((2, 4, 7), 13), ring_rand((6, 5), 14)]
    ws = split(w, encoded=True, seed=20)
    xss = [split(x, encoded=True, seed=21 + i) for i, x in enumerate(xs_plain)]

    def prog(ctx):
        W = AShare(ws[ctx.rank].clone(), 0)
        fw = fix_weight(ctx, W)
        before = ctx.cost.total().bytes_sent
        outs = [matmul_fixed(ctx, AShare(xss[0][ctx.rank].clone(), 0), fw, transpose=True),
                matmul_fixed(ctx, AShare(xss[1][ctx.rank].clone(), 0), fw, transpose=True),
                matmul_fixed(ctx, AShare(xss[2][ctx.rank].clone(), 0), fw, transpose=False)]
        sent = ctx.cost.total().bytes_sent - before
        return torch.cat([reveal_ring(ctx, o).flatten() for o in outs]), sent

    res = run_in_process({SERVER0: prog, SERVER1: prog})
    got, sent = res[SERVER0]
    want = torch.cat([torch.matmul(xs_plain[0], w.t()).flatten(), torch.matmul(xs_plain[1], w.t()).flatten(),
                      torch.matmul(xs_plain[2], w).flatten()])
    assert torch.equal(got, want)
    act = 8 * sum(x.numel() for x in xs_plain)
    assert act <= sent < act + 3 * 150  # the products opened only x - a; W - B went once, in fix_weight
    c0 = res.costs[SERVER0].by_top_level()
    assert c0["fix_weight"].rounds == 1 and 8 * w.numel() <= c0["fix_weight"].bytes_sent < 8 * w.numel() + 150
    assert res.costs[SERVER1].by_top_level()["fix_weight"].dealer_bytes < 200  # the request only, no material


def test_fixed_weight_unknown_mask_is_a_protocol_error():
    from secfwt.errors import ProtocolMismatchError
    from secfwt.protocols.arith import FixedShare

    def prog(ctx):
        fake = FixedShare(torch.zeros(2, 3, dtype=torch.int64), 0, torch.zeros(2, 3, dtype=torch.int64), 999)
        matmul_fixed(ctx, AShare(torch.zeros(1, 3, dtype=torch.int64), 0), fake)

    with pytest.raises(ProtocolMismatchError, match="weight mask #999, which was never drawn"):
        run_in_process({SERVER0: prog, SERVER1: prog}, timeout=20)


@pytest.mark.parametrize("bits", [1, 16, 32, 47])
def test_trunc_is_floor_or_floor_plus_one(bits):
    lim = 2**62 - 1
    edges = torch.tensor([0, 1, -1, lim, -lim, 2**bits, -(2**bits), 2**bits - 1, 12345678901, -98765432123])
    x = torch.cat([edges, torch.randint(-lim, lim, (2000,))])
    xs = split(x, encoded=True)

    def prog(ctx):
        return reveal_ring(ctx, trunc(ctx, AShare(xs[ctx.rank].clone(), 2 * F), bits))

    got = run(prog)[SERVER0]
    floor = torch.div(x, 2**bits, rounding_mode="floor")
    diff = got - floor
    assert ((diff == 0) | (diff == 1)).all(), diff[(diff != 0) & (diff != 1)]


def test_fixed_point_mul_matmul_within_one_ulp_chain():
    g = torch.Generator().manual_seed(5)
    x, y = (
        torch.randn(8, 16, generator=g, dtype=torch.float64) * 4,
        torch.randn(16, 3, generator=g, dtype=torch.float64),
    )
    xs, ys = split(x), split(y)

    def prog(ctx):
        X, Y = mine(ctx, xs), mine(ctx, ys)
        return torch.stack([reveal(ctx, matmul_aa(ctx, X, Y)), reveal(ctx, matmul_aa(ctx, X, Y))])

    got = run(prog)[SERVER0]
    xq, yq = ring.decode(ring.encode(x, F), F), ring.decode(ring.encode(y, F), F)
    assert (got[0] - xq @ yq).abs().max() <= 2 * 2**-F


def test_ltz_exact_on_whole_ring_including_edges():
    edges = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 2**62, -(2**62), 2**62 - 1, 2**31, -(2**31)])
    powers = torch.tensor([s * (2**k) + d for k in range(63) for s in (1, -1) for d in (-1, 0, 1)])
    small = torch.arange(-300, 301)
    x = torch.cat([edges, powers, small, ring_rand((3001,), 7)])
    xs = split(x, encoded=True)

    def prog(ctx):
        return reveal_ring(ctx, ltz(ctx, AShare(xs[ctx.rank].clone(), 0)))

    got = run(prog)[SERVER0]
    assert torch.equal(got, (x < 0).to(torch.int64))


def test_ltz_select_products_exact_on_the_ring():
    # b * x for the first rows comes from the dealer's monomial * r shares: exact mod 2^64, any x.
    edges = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 2**62, -(2**62), 2**31, -(2**31), 5])
    x = torch.stack([torch.cat([edges, ring_rand((501,), 3)]), ring_rand((511,), 4), ring_rand((511,), 5)])
    xs = split(x, encoded=True)

    def prog(ctx):
        b, bx = ltz_select(ctx, AShare(xs[ctx.rank].clone(), 0), 2)
        return reveal_ring(ctx, b), reveal_ring(ctx, bx)

    b, bx = run_in_process({SERVER0: prog, SERVER1: prog})[SERVER0]
    want = (x < 0).to(torch.int64)
    assert torch.equal(b, want) and bx.shape == (2, 511)
    assert torch.equal(bx, want[:2] * x[:2])


def test_ltz_shapes_and_word_padding():
    # Odd sizes exercise the zero-word padding of the dense tree; 3-D and empty tensors keep their shape.
    for shape in [(1,), (2,), (7,), (33,), (65,), (3, 5, 9), (0, 4)]:
        x = ring_rand(shape, 11)
        xs = split(x, encoded=True)

        def prog(ctx, xs=xs):
            return reveal_ring(ctx, ltz(ctx, AShare(xs[ctx.rank].clone(), 0)))

        got = run(prog)[SERVER0]
        assert got.shape == x.shape and torch.equal(got, (x < 0).to(torch.int64))



def test_relu_max_and_less_than():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 37, generator=g, dtype=torch.float64) * 100
    y = torch.randn(5, 37, generator=g, dtype=torch.float64) * 100
    xs, ys = split(x), split(y)

    def prog(ctx):
        X, Y = mine(ctx, xs), mine(ctx, ys)
        return (
            reveal(ctx, relu(ctx, X)),
            reveal(ctx, max_(ctx, X, dim=1)),
            reveal(ctx, max_(ctx, X, dim=0, keepdim=True)),
            reveal(ctx, less_than(ctx, X, Y)),
        )

    relu_v, mx1, mx0, lt = run_in_process({SERVER0: prog, SERVER1: prog})[SERVER0]
    xq = ring.decode(ring.encode(x, F), F)
    assert torch.equal(relu_v, torch.relu(xq))
    assert torch.equal(mx1, xq.max(1).values)
    assert torch.equal(mx0, xq.max(0, keepdim=True).values)
    assert torch.equal(lt, (xq < ring.decode(ring.encode(y, F), F)).double())


def test_scale_alignment_in_add():
    def prog(ctx):
        a = AShare(split(torch.tensor([1.5]), scale=F)[ctx.rank], F)
        b = AShare(split(torch.tensor([0.25]), scale=2 * F)[ctx.rank], 2 * F)
        s = add(a, b)
        assert s.scale == 2 * F
        return reveal(ctx, s)

    assert run_in_process({SERVER0: prog, SERVER1: prog})[SERVER0].item() == 1.75


def test_costs_match_formulas_and_dealer_traffic_is_separate():
    n = 100
    xs, ys = split(torch.ones(n)), split(torch.ones(n))

    def prog(ctx):
        mul_aa(ctx, mine(ctx, xs), mine(ctx, ys))
        ltz(ctx, mine(ctx, xs))

    res = run_in_process({SERVER0: prog, SERVER1: prog})
    c0 = res.costs[SERVER0].by_top_level()
    # mul: 1 round + 1 truncation round; payload 2n*8 + n*8 bytes (plus framing headers).
    assert c0["mul"].rounds == 2
    assert 24 * n <= c0["mul"].bytes_sent < 24 * n + 400
    # ltz: 6 rounds; 8 bytes (c) + packed tree bits 3 * (16 + 8 + 4 + 2) + 3 = 93 bits -> 19.625 bytes/element
    assert c0["ltz"].rounds == 6
    assert 19.625 * n <= c0["ltz"].bytes_sent < 19.625 * n + 6 * 150
    # dealer -> server 1 for ltz: rb 8 + q 4 + 4 monomials 32 bytes per element + 2 dense AND-triple words
    # per tree output word (~7.5 bytes per element)
    c1 = res.costs[SERVER1].by_top_level()
    dealer = 44 * n + 16 * sum(compare_words(n)[1:])
    assert dealer <= c1["ltz"].dealer_bytes < dealer + 4 * 150
    # relu = x - [x < 0] x with the product from ltz_select: the same 6 rounds and bytes as ltz.
    def prog2(ctx):
        relu(ctx, mine(ctx, xs))

    c2 = run_in_process({SERVER0: prog2, SERVER1: prog2}).costs[SERVER0].by_top_level()
    assert c2["relu"].rounds == 6
    assert 19.625 * n <= c2["relu"].bytes_sent < 19.625 * n + 6 * 150
    # Server 0 derives all its dealer material from a seed: no online dealer traffic at all.
    assert sum(c.dealer_bytes for k, c in res.costs[SERVER0].ops.items() if k != "setup") == 0
    assert sum(c.dealer_bytes for k, c in res.costs[SERVER1].ops.items() if k != "setup") > 0
    assert res.costs[DEALER].total().dealer_bytes > 0


def _chi2_bytes(t: torch.Tensor) -> float:
    """Chi-square statistic of the 8 bytes of every element against the uniform distribution on 256 values."""
    b = t.contiguous().view(torch.uint8).to(torch.int64)
    counts = torch.bincount(b, minlength=256).double()
    exp = b.numel() / 256
    return float(((counts - exp) ** 2 / exp).sum())


def test_what_a_server_receives_in_a_multiplication_is_uniform_whatever_the_inputs():
    # Record every tensor server 1 receives from server 0 during Beaver multiplications, for two very
    # different secret inputs. Each must look uniform on the ring (chi-square on bytes, 255 dof:
    # mean 255, sd 22.6; 6 sd bound), and the two cases must be indistinguishable by the same statistic.
    n = 20000
    received: dict[str, list[torch.Tensor]] = {}

    def make_prog(value: torch.Tensor, label: str):
        shares = split(value, seed=11)

        def prog(ctx):
            if ctx.rank == SERVER1:
                orig = ctx.comm.recv

                def recording(peer, tag, *a, **k):
                    t = orig(peer, tag, *a, **k)
                    if peer == SERVER0 and tag in ("mul", "trunc"):
                        received.setdefault(label, []).append(t.clone())
                    return t

                ctx.comm.recv = recording  # test instrumentation of this instance only
            x = mine(ctx, shares)
            mul_aa(ctx, x, x)

        return prog

    zeros = torch.zeros(n, dtype=torch.float64)
    big = torch.full((n,), 12345.678, dtype=torch.float64)
    for value, label in ((zeros, "zeros"), (big, "big")):
        prog = make_prog(value, label)
        run_in_process({SERVER0: prog, SERVER1: prog})
    bound = 255 + 6 * 22.6
    for label in ("zeros", "big"):
        msgs = torch.cat([m.flatten() for m in received[label]])
        assert _chi2_bytes(msgs) < bound, label
    # Negative control: the statistic does detect a non-uniform message (the encoded input itself).
    assert _chi2_bytes(ring.encode(big, F)) > bound


def test_what_a_server_receives_in_ltz_is_uniform_whatever_the_inputs():
    # Every ltz message server 1 receives (c, the 4 packed tree levels, the root bits) for constant inputs 0
    # and -1: each message's bytes must look uniform (same chi-square bound as above), per message tag.
    n = 40000
    received: dict[tuple[str, str], torch.Tensor] = {}

    def make_prog(value: int, label: str):
        shares = split(torch.full((n,), value, dtype=torch.int64), encoded=True, seed=5)

        def prog(ctx):
            if ctx.rank == SERVER1:
                orig = ctx.comm.recv

                def recording(peer, tag, *a, **k):
                    t = orig(peer, tag, *a, **k)
                    if peer == SERVER0 and tag.startswith("ltz/"):
                        received[(label, tag)] = t.clone()
                    return t

                ctx.comm.recv = recording  # test instrumentation of this instance only
            ltz_select(ctx, AShare(shares[ctx.rank].clone(), 0).unsqueeze(0), 1)

        return prog

    for value, label in ((0, "zero"), (-1, "minus_one")):
        prog = make_prog(value, label)
        run_in_process({SERVER0: prog, SERVER1: prog})
    bound = 255 + 6 * 22.6
    tags = {tag for _, tag in received}
    assert tags == {"ltz/c", "ltz/tree0", "ltz/tree1", "ltz/tree2", "ltz/tree3", "ltz/root"}
    for key, msg in received.items():
        assert _chi2_bytes(msg.flatten()) < bound, key
