"""Comparison, sign, ReLU and max (2 servers + dealer).

:func:`ltz` computes the bit [x < 0] with a masked opening and a carry tree over the bits of the mask,
sending every tree bit packed (no byte per bit):

  1. The dealer gives r (arithmetic shares), r as XOR shares in one word, XOR shares of the 32 pair
     products q_j = r_(2j+1) AND r_(2j), AND triples for 4 tree levels and, for the last level, three mask
     bits s, a, b with arithmetic shares of the 7 monomials s, a, b, sa, sb, ab, sab.
  2. Open c = x + r (mod 2^64). Then x = c - r and msb(x) = c_63 XOR r_63 XOR [c mod 2^63 < r mod 2^63].
  3. [c' < r'] by a carry tree over 2-bit blocks (G = "r is larger here", P = "equal here";
     (G, P) <- (G_hi XOR (P_hi AND G_lo), P_hi AND P_lo)). Bit 63 enters the tree as G = c_63 XOR r_63,
     P = 1, so the root G is msb(x) itself.
     Level 1 (32 pairs of bits) is local: with c public, G and P of a pair are linear in r_hi, r_lo and
     q. From then on the (G, P) fields of consecutive elements are kept in dense 64-bit words (2, 4, ...,
     32 elements per word). Levels 2..5 (outputs 16, 8, 4, 2 bits per element): the hi/lo halves of every
     field are split by bit compaction, re-densified, and the two ANDs with a shared operand open 3 words
     per output word, i.e. 3 x 16, 8, 4, 2 bits per element with no padding inside a word.
  4. Level 6 fused with boolean -> arithmetic: open g XOR s, p XOR a, q XOR b (3 bits); the root
     G = g XOR (p AND q) = g + pq - 2gpq is a multilinear polynomial in (s, a, b) with public
     coefficients, so it is a public combination of the dealer's arithmetic monomial shares.

:func:`ltz_select` also returns b * x for chosen rows without any extra round: the dealer adds shares of
mono_k * r, and b x = b c - b r (c public). :func:`relu` / :func:`maximum` use it (6 rounds, 19.625 bytes).

Cost of ltz: 6 rounds; bytes sent per server per element: 8 (c) + (3 * (16 + 8 + 4 + 2) + 3) / 8
= 19.625 (plus one frame header per round); dealer -> server 1 per element: 8 + 4 + 7.5 + 56 = 75.5.
The result is exact for every x in Z_2^64 (read as signed). Reference: dealer-aided comparison in the
style of ABY/CrypTen A2B, replaced by a mask-and-compare carry tree (Damgard et al. bit-decomposition;
Kogge & Stone, 1973). The dealer-computed first level, the dense packing and the fused bit conversion
(and ltz_select) are this package's own dealer-model simplifications, not taken from a paper.
"""

from __future__ import annotations

import torch
from torch import Tensor

from secfwt.comm.base import SERVER0
from secfwt.context import PartyContext
from secfwt.dealer import compare_words, even_bits, odd_bits, word_bits
from secfwt.protocols.arith import mul_aa
from secfwt.share import AShare, add, add_public, cat, open_, open_many, sub

_M32 = (1 << 32) - 1
_LOW31 = (1 << 31) - 1


def _merge(x: Tensor) -> Tensor:
    """Words with 32 valid bits -> half as many dense words (pairs: low | high << 32), zero-padded."""
    if x.numel() % 2:
        x = torch.cat([x, x.new_zeros(1)])
    return x[0::2] | (x[1::2] << 32)


def ltz(ctx: PartyContext, x: AShare) -> AShare:
    """Shares of the bit [x < 0] as an integer (scale 0). Exact. 6 rounds (see module docstring)."""
    with ctx.cost.scope("ltz"):
        if x.numel() == 0:
            return AShare(torch.zeros(x.shape, dtype=torch.int64), 0)
        bit, _ = _ltz(ctx, x.data.reshape(-1), 0)
        return AShare(bit.reshape(x.shape), 0)


def ltz_select(ctx: PartyContext, x: AShare, rows: int) -> tuple[AShare, AShare]:
    """([x < 0], [x < 0] * x[:rows]): the comparison and, for the first ``rows`` slices along dim 0, the exact
    product of the bit with its own input, in the same 6 rounds and bytes as :func:`ltz`.

    The product needs no Beaver round: b x = b c - b r with c = x + r public, and b is a public combination
    of the dealer's monomials (step 4), so b r is the same combination of the dealer's shares of mono_k r
    (kind ``compare_sel``: 56 more dealer bytes per product element). The product has x's scale.
    """
    with ctx.cost.scope("ltz"):
        if x.numel() == 0 or rows == 0:
            return ltz(ctx, x), AShare(torch.zeros((0, *x.shape[1:]), dtype=torch.int64), x.scale)
        k = rows * (x.numel() // x.shape[0])
        bit, prod = _ltz(ctx, x.data.reshape(-1), k)
        assert prod is not None
        return AShare(bit.reshape(x.shape), 0), AShare(prod.reshape(rows, *x.shape[1:]), x.scale)


def _ltz(ctx: PartyContext, xf: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
    """Steps 1-4 on the flat ``xf``; with k > 0 also bit * x for the first k elements."""
    assert ctx.dealer is not None
    n = xf.numel()
    s0 = ctx.rank == SERVER0
    pend = (ctx.dealer.request("compare_sel", shape=[n], prod_shape=[k]) if k
            else ctx.dealer.request("compare", shape=[n]))
    c = open_(ctx, xf + pend.material["r"], "ltz/c")
    m = pend.get()
    rb, t, fb = m["rb"], m["t"], m["fb"]
    q = m["q"].to(torch.int64) & _M32
    tc = m["t"][3:] if s0 else m["tc"].to(torch.int64)

    # Level 1 (local): pairs (2j+1, 2j) -> bit j of a 32-bit field per element.
    ch, cl, rh, rl = odd_bits(c), even_bits(c), odd_bits(rb), even_bits(rb)
    nch, ncl = ~ch & _M32, ~cl & _M32
    g = (nch & rh) ^ (ncl & ((nch & rl) ^ q))  # G_hi XOR P_hi G_lo
    p = (nch & rl) ^ (ncl & rh) ^ q  # P_hi P_lo, public term below
    # Pair 31 holds bits (63, 62); bit 63 enters as (G, P) = (c_63 XOR r_63, 1).
    g31 = ((rh ^ (ncl & rl)) >> 31) & 1
    p31 = (rl >> 31) & 1
    if s0:
        p = p ^ (nch & ncl)
        g31 = g31 ^ ((ch >> 31) & 1)
        p31 = p31 ^ ((ncl >> 31) & 1)
    # Dense words from here on: word j holds consecutive elements' fields in order (2 x 32 bits now).
    g = _merge((g & _LOW31) | (g31 << 31))
    p = _merge((p & _LOW31) | (p31 << 31))

    # Levels 2..5: split every field into hi/lo halves by bit compaction (the fields of a word stay in
    # order), AND-pair (P_hi G_lo, P_hi P_lo) with one shared mask, 3 dense words per output word opened.
    ws = compare_words(n)
    off = 0
    for lv in range(4):
        size = ws[lv + 1]
        ta, tb1, tb2 = (t[i, off : off + size] for i in range(3))
        tc1, tc2 = (tc[i, off : off + size] for i in range(2))
        off += size
        gh, gl, ph, pl = (_merge(h) for h in (odd_bits(g), even_bits(g), odd_bits(p), even_bits(p)))
        e, f1, f2 = open_many(ctx, [ph ^ ta, gl ^ tb1, pl ^ tb2], f"ltz/tree{lv}", xor=True)
        z1 = tc1 ^ (e & tb1) ^ (f1 & ta)
        z2 = tc2 ^ (e & tb2) ^ (f2 & ta)
        if s0:
            z1 = z1 ^ (e & f1)
            z2 = z2 ^ (e & f2)
        g = gh ^ z1
        p = z2

    # Level 6 fused with boolean -> arithmetic: G = g XOR (p AND q) from masked bits (step 4). Each word
    # now holds 32 elements' 2-bit fields; the opened bits are sent as int32 (1 bit per element).
    fb = m["fb"] & _M32
    masked = torch.stack([odd_bits(g) ^ fb[0], odd_bits(p) ^ fb[1], even_bits(g) ^ fb[2]]).to(torch.int32)
    opened = open_(ctx, masked, "ltz/root", xor=True).to(torch.int64) & _M32
    mg, e, f = word_bits(opened, n)
    g1, p1, q1 = 1 - 2 * mg, 1 - 2 * e, 1 - 2 * f  # 1 - 2 (opened bit)
    mono = m["mono"]  # s, a, b, sa, sb, ab, sab
    coef = [g1 * (1 - 2 * e * f), g1 * p1 * f, g1 * e * q1, -2 * g1 * p1 * f, -2 * g1 * e * q1,
            g1 * p1 * q1, -2 * g1 * p1 * q1]
    out = coef[0] * mono[0]
    for j in range(1, 7):
        out += coef[j] * mono[j]
    const = mg + g1 * e * f
    if s0:
        out += const
    if not k:
        return out, None
    # b x = b c - b r, b r = const r + sum_j coef_j (mono_j r) (dealer shares of mono_j r).
    monor, r = m["monor"], pend.material["r"][:k]
    br = const[:k] * r
    for j in range(7):
        br += coef[j][:k] * monor[j]
    return out, out[:k] * c[:k] - br


def gez(ctx: PartyContext, x: AShare) -> AShare:
    """Shares of [x >= 0] (scale 0) = 1 - ltz(x)."""
    b = ltz(ctx, x)
    one = torch.ones_like(b.data) if ctx.rank == SERVER0 else torch.zeros_like(b.data)
    return AShare(one - b.data, 0)


def less_than(ctx: PartyContext, x: AShare, y: AShare) -> AShare:
    """Shares of [x < y] (scale 0)."""
    return ltz(ctx, sub(x, y))


def less_than_public(ctx: PartyContext, x: AShare, value: torch.Tensor | float) -> AShare:
    """Shares of [x < value] for public ``value`` (broadcast against x)."""
    return ltz(ctx, add_public(ctx, x, -torch.as_tensor(value, dtype=torch.float64)))


def select(ctx: PartyContext, bit: AShare, x: AShare) -> AShare:
    """``bit * x`` for a shared 0/1 integer ``bit`` (scale 0): one Beaver product, no truncation."""
    return mul_aa(ctx, bit, x, out_scale=x.scale)


def relu(ctx: PartyContext, x: AShare) -> AShare:
    """max(x, 0) = x - [x < 0] x with the product from :func:`ltz_select`. Exact. 6 rounds, 19.625 bytes."""
    with ctx.cost.scope("relu"):
        _, bx = ltz_select(ctx, x.unsqueeze(0), 1)
        return sub(x, bx[0])


def maximum(ctx: PartyContext, x: AShare, y: AShare) -> AShare:
    """Elementwise max(x, y) = y + relu(x - y). Exact. 6 rounds."""
    return add(y, relu(ctx, sub(x, y)))


def max_(ctx: PartyContext, x: AShare, dim: int = -1, keepdim: bool = False) -> AShare:
    """Maximum along ``dim`` by a pairwise tree: ceil(log2 n) levels of :func:`maximum` (6 rounds each)."""
    with ctx.cost.scope("max"):
        d = dim % x.dim()
        cur = x.transpose(d, -1)
        while cur.shape[-1] > 1:
            n = cur.shape[-1]
            half = n // 2
            a, b = cur[..., :half], cur[..., half : 2 * half]
            m = maximum(ctx, a, b)
            if n % 2:
                m = cat([m, cur[..., 2 * half :]], dim=-1)
            cur = m
        out = cur.transpose(d, -1)
        return out if keepdim else out.squeeze(d)
