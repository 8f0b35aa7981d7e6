"""Comparison, sign, ReLU and max (2 servers + dealer).

:func:`ltz` computes the bit [x < 0] with a masked opening and a carry tree over the bits of the mask,
sending every tree bit packed (no byte per bit):

  1. The dealer gives r (arithmetic shares), r as XOR shares in one word, XOR shares of the 32 pair
     products q_j = r_(2j+1) AND r_(2j), AND triples for 4 tree levels and, for the last level, three mask
     bits s, a, b with arithmetic shares of the 4 monomials s, a', b', (ab)', x' = x (1 - 2 s).
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
     coefficients, so it is a public combination of the dealer's arithmetic monomial shares. In that
     polynomial the coefficients of sa, sb and sab are -2 times those of a, b and ab, so the dealer sends
     the 4 combinations s, a (1 - 2 s), b (1 - 2 s), ab (1 - 2 s) instead of the 7 monomials.

:func:`ltz_select` also returns b * x for chosen rows without any extra round: the dealer adds shares of
mono_k * r, and b x = b c - b r (c public). :func:`relu` / :func:`maximum` use it (6 rounds, 19.625 bytes).

Cost of ltz: 6 rounds; bytes sent per server per element: 8 (c) + (3 * (16 + 8 + 4 + 2) + 3) / 8
= 19.625 (plus one frame header per round); dealer -> server 1 per element: 8 + 4 + 7.5 + 32 = 51.5.
The result is exact for every x in Z_2^64 (read as signed).

Narrow comparisons (``bits=l`` < 64, l a multiple of 8; other values are rounded up): when the caller knows
|x| < 2^(l-1) in ring units (the value times 2^f), only c = (x + r) mod 2^l is opened (l / 8 bytes; r is
uniform mod 2^l, so c is uniform) and the tree runs on w-bit fields, w = 8, 16, 32 or 64 the smallest power
of two >= l, packed 64 / w per word from the start (step 3 as above, log2(w) - 2 packed levels).
The dealer's mask sits at the top of the field: the tree sees c << (w - l) and r << (w - l) (the low w - l
bits are 0 in both, so those pairs are neutral: G = 0, P = 1).
Exactness for |x| < 2^(l-1): c - r = x (mod 2^l), so the tree's root, bit w - 1 of (c - r) << (w - l) mod
2^w, is bit l - 1 of x mod 2^l. In two's complement on l bits, x mod 2^l = x for 0 <= x < 2^(l-1) (bit
l - 1 clear) and 2^l + x in [2^(l-1), 2^l) for -2^(l-1) <= x < 0 (bit l - 1 set): the bit is [x < 0]. The
root itself is computed exactly as for l = 64: with C, R the low l - 1 bits of c, r and B = [C < R], the
low l - 1 bits of c - r are C - R + 2^(l-1) B (B is the borrow into bit l - 1), so bit l - 1 of c - r mod
2^l is c_(l-1) XOR r_(l-1) XOR B, which is what the tree evaluates (carry direction: G = "r larger", i.e. a
borrow; no wrap of x + r beyond 2^l matters, as only x + r mod 2^l enters).
Outside the range the result is bit l - 1 of x mod 2^l, i.e. the sign of x read as a signed l-bit integer:
WRONG whenever x mod 2^l wraps (e.g. x = 2^(l-1) gives 1, x = -2^(l-1) - 1 gives 0, x = 2^l gives 0 for
every sign). Callers use it only where the range is guaranteed and state why (:func:`range_bits`).
Cost with l bits: log2(w) rounds; bytes per server per element l / 8 + (3 (w / 2 - 2) + 3) / 8 (w = 64:
8 + 93 / 8 = 19.625 at l = 64, 16.625 at l = 40; w = 32: 4 + 45 / 8 = 9.625 at l = 32, 8.625 at l = 24;
w = 16: 2 + 21 / 8 = 4.625 at l = 16; w = 8: 1 + 9 / 8 = 2.125 at l = 8); dealer -> server 1 per element
w / 8 + w / 16 + 16 (w / 64) (1 / 2 - 2 / w) + 32 (41.5 for w = 32), see secfwt.correlations.

Reference: dealer-aided comparison in the
style of ABY/CrypTen A2B, replaced by a mask-and-compare carry tree (Damgard et al. bit-decomposition;
Kogge & Stone, 1973). The dealer-computed first level, the dense packing and the fused bit conversion
(and ltz_select) are this package's own dealer-model simplifications, not taken from a paper.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from secfwt import ring
from secfwt.comm.base import SERVER0
from secfwt.context import PartyContext
from secfwt.correlations import pack_fields, split_bits, tree_width
from secfwt.dealer import compare_words, odd_bits, word_bits
from secfwt.protocols.arith import mul_aa
from secfwt.share import AShare, add, add_public, cat, open_, open_many, stack, sub

_M32 = (1 << 32) - 1


def range_bits(frac_bits: int, bound: float) -> int:
    """The narrowest opening l (a multiple of 8, at most 64) for which every value |v| < ``bound`` at scale
    ``frac_bits`` is in the exact range of ``ltz(..., bits=l)``: bound 2^frac_bits <= 2^(l-1)."""
    need = math.ceil(math.log2(bound) + frac_bits) + 1 if bound > 0 else 1
    return min(64, 8 * max(1, -(-need // 8)))


def _check_bits(bits: int) -> int:
    if type(bits) is not int or not 1 <= bits <= 64:
        raise ValueError(f"ltz: bits must be an int in [1, 64], got {bits!r}")
    return 8 * -(-bits // 8)


def open_low(ctx: PartyContext, v: Tensor, bits: int, tag: str) -> Tensor:
    """Open v mod 2^bits (bits a multiple of 8 below 64), sending only its low bits / 8 bytes per element
    (little-endian uint8): 1 round, the result in [0, 2^bits) as int64."""
    nb = bits // 8
    mine = _low_bytes(v.reshape(-1), nb)
    ctx.comm.send(ctx.peer, tag, mine)
    other = ctx.comm.recv(ctx.peer, tag, shape=mine.shape, dtype=torch.uint8)
    ctx.cost.add_round()
    return (v + _from_low_bytes(other, nb).reshape(v.shape)) & ((1 << bits) - 1)


def _unit(nb: int) -> torch.dtype:
    """The widest integer type whose size divides ``nb`` bytes: strided copies of 4- or 2-byte units are several
    times faster than of single bytes (measured: 7x for nb = 4, 4x for nb = 2)."""
    return torch.int32 if nb % 4 == 0 else torch.int16 if nb % 2 == 0 else torch.uint8


def _low_bytes(v: Tensor, nb: int) -> Tensor:
    """The low ``nb`` bytes of each int64 of the 1-D ``v``, little-endian, as an (n, nb) uint8 tensor."""
    if sys.byteorder == "little":  # a view of the words' bytes: no shifts (9x faster than the arithmetic form)
        u = _unit(nb)
        per = 8 // u.itemsize
        low = v.contiguous().view(u).reshape(-1, per)[:, : nb // u.itemsize].contiguous()
        return low.view(torch.uint8).reshape(-1, nb)
    shifts = torch.arange(nb, dtype=torch.int64) * 8
    return ((v.reshape(-1, 1) >> shifts) & 255).to(torch.uint8)


def _from_low_bytes(b: Tensor, nb: int) -> Tensor:
    """The inverse of :func:`_low_bytes`: (n, nb) little-endian bytes -> n int64 in [0, 2^(8 nb))."""
    if sys.byteorder == "little":
        u = _unit(nb)
        full = torch.zeros(b.shape[0], 8 // u.itemsize, dtype=u)
        full[:, : nb // u.itemsize] = b.contiguous().view(u)
        return full.view(torch.int64).reshape(-1)
    shifts = torch.arange(nb, dtype=torch.int64) * 8
    return (b.to(torch.int64) << shifts).sum(-1)


def _merge(x: Tensor) -> Tensor:
    """Words with 32 valid bits -> half as many dense words (pairs: low | high << 32), zero-padded."""
    if x.numel() % 2:
        x = torch.cat([x, x.new_zeros(1)])
    return x[0::2] | (x[1::2] << 32)


def ltz(ctx: PartyContext, x: AShare, bits: int = 64) -> AShare:
    """Shares of the bit [x < 0] as an integer (scale 0). Exact. 6 rounds (see module docstring).

    ``bits`` = l < 64: exact only for |x| < 2^(l-1) in ring units (l rounded up to a multiple of 8), with
    log2(w) rounds and l / 8 + (3 w / 2 - 3) / 8 bytes per element (module docstring); outside that range the
    bit is the sign of x mod 2^l read on l bits (wrong where it wraps).
    """
    bits = _check_bits(bits)
    with ctx.cost.scope("ltz"):
        if x.numel() == 0:
            return AShare(torch.zeros(x.shape, dtype=torch.int64), 0)
        bit, _ = _ltz(ctx, x.data.reshape(-1), 0, bits)
        return AShare(bit.reshape(x.shape), 0)


def ltz_select(ctx: PartyContext, x: AShare, rows: int, bits: int = 64) -> tuple[AShare, AShare]:
    """([x < 0], [x < 0] * x[:rows]): the comparison and, for the first ``rows`` slices along dim 0, the exact
    product of the bit with its own input, in the same 6 rounds and bytes as :func:`ltz`.

    The product needs no Beaver round: b x = b c - b r with c = x + r public, and b is a public combination
    of the dealer's monomials (step 4), so b r is the same combination of the dealer's shares of mono_k r
    (kind ``compare_sel``: 32 more dealer bytes per product element). The product has x's scale.

    With ``bits`` = l < 64 (exact for |x| < 2^(l-1), as :func:`ltz`) only c mod 2^l is public, so x is not
    c - r in Z_2^64. Write c_s = c - 2^l c_t (c read as a signed l-bit integer), r in [0, 2^l) with top bit
    r_t, and C, R, B = [C < R] as in the module docstring. Then x = C - R + 2^(l-1) (B - b) for b = [x < 0]
    (b = 0: x = (c - r) mod 2^l; b = 1: x = (c - r) mod 2^l - 2^l), and where b = 1, B = 1 XOR c_t XOR r_t, so
    b (B - 1) = -b (c_t XOR r_t) = -b (c_t + (1 - 2 c_t) r_t). Collecting terms:
        b x = b c_s - b r + 2^l c_t (b r_t),
    where b r and b r_t are public combinations of the dealer's shares of r, mono_j r, r_t, mono_j r_t
    (10 rows, 80 dealer bytes per product element instead of 32).
    """
    bits = _check_bits(bits)
    with ctx.cost.scope("ltz"):
        if x.numel() == 0 or rows == 0:
            return ltz(ctx, x, bits), AShare(torch.zeros((0, *x.shape[1:]), dtype=torch.int64), x.scale)
        k = rows * (x.numel() // x.shape[0])
        bit, prod = _ltz(ctx, x.data.reshape(-1), k, bits)
        assert prod is not None
        return AShare(bit.reshape(x.shape), 0), AShare(prod.reshape(rows, *x.shape[1:]), x.scale)


def _ltz(ctx: PartyContext, xf: Tensor, k: int, bits: int,
         shifts: list[int] | None = None) -> tuple[Tensor, Tensor | None]:
    """Steps 1-4 on the flat ``xf`` with an l = ``bits`` opening; with k > 0 also bit * x for the first k.
    ``shifts`` (public ring integers d_j, one per equal block of xf): block j is block 0 minus d_j, so only block
    0 is opened and c_j = c_0 - d_j (the dealer's r repeats per block)."""
    assert ctx.dealer is not None
    n = xf.numel()
    s0 = ctx.rank == SERVER0
    w = tree_width(bits)
    extra: dict[str, int] = {} if bits == 64 else {"bits": bits}
    if shifts is not None:
        extra["tile"] = len(shifts)
    pend = (ctx.dealer.request("compare_sel", shape=[n], prod_shape=[k], **extra) if k
            else ctx.dealer.request("compare", shape=[n], **extra))
    n0 = n // len(shifts) if shifts is not None else n
    v = xf[:n0] + pend.material["r"][:n0]
    c = open_(ctx, v, "ltz/c") if bits == 64 else open_low(ctx, v, bits, "ltz/c")  # the latter in [0, 2^l)
    if shifts is not None:
        c = torch.cat([c - d for d in shifts])
        if bits < 64:
            c = c & ((1 << bits) - 1)
    cw = c if bits == 64 else pack_fields(c << (w - bits), w)  # w-bit fields, c at the top
    m = pend.get()
    rb, t = m["rb"], m["t"]
    q = m["q"].to(torch.int64) & _M32
    tc = m["t"][3:] if s0 else m["tc"].to(torch.int64)

    # Level 1 (local): pairs (2j+1, 2j) -> bit j of a (w/2)-bit field per element, 64 / w fields per 32 bits.
    (ch, cl), (rh, rl) = split_bits(cw), split_bits(rb)
    nch, ncl = ~ch & _M32, ~cl & _M32
    g = (nch & rh) ^ (ncl & ((nch & rl) ^ q))  # G_hi XOR P_hi G_lo
    p = (nch & rl) ^ (ncl & rh) ^ q  # P_hi P_lo, public term below
    # The top pair of each field holds bits (w-1, w-2); bit w-1 enters as (G, P) = (c XOR r, 1).
    top = sum(1 << (j * w // 2 + w // 2 - 1) for j in range(64 // w))
    g_top = rh ^ (ncl & rl)
    p_top = rl
    if s0:
        p = p ^ (nch & ncl)
        g_top = g_top ^ ch
        p_top = p_top ^ ncl
    # Dense words from here on: word j holds consecutive elements' fields in order (2 x 32 bits now).
    g = _merge((g & ~top & _M32) | (g_top & top))
    p = _merge((p & ~top & _M32) | (p_top & top))

    # Levels 2..log2(w)-1: split every field into hi/lo halves by bit compaction (the fields of a word stay in
    # order), AND-pair (P_hi G_lo, P_hi P_lo) with one shared mask, 3 dense words per output word opened.
    ws = compare_words(n, w)
    off = 0
    for lv in range(len(ws) - 1):
        size = ws[lv + 1]
        ta, tb1, tb2 = (t[i, off : off + size] for i in range(3))
        tc1, tc2 = (tc[i, off : off + size] for i in range(2))
        off += size
        gh, gl, ph, pl = (_merge(h) for h in (*split_bits(g), *split_bits(p)))
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
    g_hi, g_lo = split_bits(g)
    masked = torch.stack([g_hi ^ fb[0], odd_bits(p) ^ fb[1], g_lo ^ fb[2]]).to(torch.int32)
    opened = open_(ctx, masked, "ltz/root", xor=True).to(torch.int64) & _M32
    mg, e, f = word_bits(opened, n)
    # G = mg + g1 (e f + (1 - 2 e f) s + p1 f a' + e q1 b' + p1 q1 ab') with g1, p1, q1 = 1 - 2 (opened bit)
    # and x' = x (1 - 2 s) (step 4): four public coefficients times the dealer's four monomials.
    g1, ef = 1 - 2 * mg, e * f  # int8 (word_bits): values in {-1, 0, 1} until they meet ring elements
    p1g, q1 = g1 - 2 * e * g1, 1 - 2 * f
    coef = (g1 - 2 * ef * g1, p1g * f, e * g1 * q1, p1g * q1)
    const = mg + g1 * ef
    out = _combine(const if s0 else None, coef, m["mono"])  # mono: s, a (1 - 2 s), b (1 - 2 s), ab (1 - 2 s)
    if not k:
        return out, None
    coef_k, const_k = [cf[:k] for cf in coef], const[:k]
    monor = m["monor"]
    if bits == 64:
        # b x = b c - b r, b r = const r + sum_j coef_j (mono_j r) (dealer shares of mono_j r).
        br = _combine(None, coef_k, monor)
        br += pend.material["r"][:k] * const_k
        prod = out[:k] * c[:k]
        prod -= br
        return out, prod
    # b x = b c_s - b r + 2^l c_t (b r_t) (ltz_select's docstring); rows: r, mono r, r_t, mono r_t.
    br = _combine(None, coef_k, monor[1:5])
    br += monor[0] * const_k
    brt = _combine(None, coef_k, monor[6:10])
    brt += monor[5] * const_k
    cts = (c[:k] >> (bits - 1)) << bits
    prod = out[:k] * (c[:k] - cts)
    prod -= br
    brt *= cts
    prod += brt
    return out, prod


def _combine(const: Tensor | None, coef: Sequence[Tensor], rows: Tensor) -> Tensor:
    """sum_j coef_j rows_j (+ const): small public coefficients (int8) times ring rows, accumulated in place."""
    acc = rows[0] * coef[0]
    for j in range(1, len(coef)):
        acc += rows[j] * coef[j]
    if const is not None:
        acc += const
    return acc


def ltz_select_shifted(ctx: PartyContext, x: AShare, shifts: list[float], rows: int,
                       bits: int = 64) -> tuple[AShare, AShare]:
    """:func:`ltz_select` on the stacked rows x - t_j (t_j = ``shifts``, public reals): the bits [x < t_j]
    (len(shifts), *x.shape) and the products [x < t_j] (x - t_j) for the first ``rows`` rows, opening x + r
    ONCE: every row uses the same mask r, so c_j = c_0 - (t_j - t_0) 2^f is public without another message,
    and only the trees (fresh AND triples and final masks per row) are repeated.
    Cost: l / 8 bytes per element of x plus (3 w / 2 - 3) / 8 per element and row (two rows at l = 32:
    4 + 2 x 5.625 = 15.25 bytes instead of 19.25); rounds and exactness as :func:`ltz` (|x - t_j| < 2^(l-1)).
    Security: one opening of x + r (uniform); the trees open values masked by fresh triples, as in :func:`ltz`.
    """
    bits = _check_bits(bits)
    with ctx.cost.scope("ltz"):
        enc = [int(ring.encode(torch.tensor(t, dtype=torch.float64), x.scale)) for t in shifts]
        s0 = ctx.rank == SERVER0
        diffs = stack([AShare(x.data - (e if s0 else 0), x.scale) for e in enc], dim=0)
        if x.numel() == 0:
            z = torch.zeros(diffs.shape, dtype=torch.int64)
            return AShare(z, 0), AShare(z[:rows], x.scale)
        bit, prod = _ltz(ctx, diffs.data.reshape(-1), rows * x.numel(), bits, [e - enc[0] for e in enc])
        assert prod is not None
        return AShare(bit.reshape(diffs.shape), 0), AShare(prod.reshape(rows, *x.shape), x.scale)


def gez(ctx: PartyContext, x: AShare, bits: int = 64) -> AShare:
    """Shares of [x >= 0] (scale 0) = 1 - ltz(x) (``bits``: as :func:`ltz`)."""
    b = ltz(ctx, x, bits)
    one = torch.ones_like(b.data) if ctx.rank == SERVER0 else torch.zeros_like(b.data)
    return AShare(one - b.data, 0)


def less_than(ctx: PartyContext, x: AShare, y: AShare, bits: int = 64) -> AShare:
    """Shares of [x < y] (scale 0) (``bits``: as :func:`ltz`, on x - y)."""
    return ltz(ctx, sub(x, y), bits)


def less_than_public(ctx: PartyContext, x: AShare, value: torch.Tensor | float, bits: int = 64) -> AShare:
    """Shares of [x < value] for public ``value`` (broadcast against x) (``bits``: as :func:`ltz`, on x - value)."""
    return ltz(ctx, add_public(ctx, x, -torch.as_tensor(value, dtype=torch.float64)), bits)


def select(ctx: PartyContext, bit: AShare, x: AShare) -> AShare:
    """``bit * x`` for a shared 0/1 integer ``bit`` (scale 0): one Beaver product, no truncation."""
    return mul_aa(ctx, bit, x, out_scale=x.scale)


def relu(ctx: PartyContext, x: AShare, bits: int = 64) -> AShare:
    """max(x, 0) = x - [x < 0] x with the product from :func:`ltz_select`. Exact. 6 rounds, 19.625 bytes.
    ``bits``: as :func:`ltz` (exact for |x| < 2^(bits-1) in ring units)."""
    with ctx.cost.scope("relu"):
        _, bx = ltz_select(ctx, x.unsqueeze(0), 1, bits)
        return sub(x, bx[0])


def maximum(ctx: PartyContext, x: AShare, y: AShare, bits: int = 64) -> AShare:
    """Elementwise max(x, y) = y + relu(x - y). Exact. 6 rounds (``bits``: as :func:`ltz`, on x - y)."""
    return add(y, relu(ctx, sub(x, y), bits))


def max_(ctx: PartyContext, x: AShare, dim: int = -1, keepdim: bool = False, bits: int = 64) -> AShare:
    """Maximum along ``dim`` by a pairwise tree: ceil(log2 n) levels of :func:`maximum` (6 rounds each).
    ``bits``: as :func:`ltz`, exact while every |x_i - x_j| < 2^(bits-1) in ring units."""
    with ctx.cost.scope("max"):
        d = dim % x.dim()
        cur = x.transpose(d, -1)
        while cur.shape[-1] > 1:
            n = cur.shape[-1]
            half = n // 2
            a, b = cur[..., :half], cur[..., half : 2 * half]
            m = maximum(ctx, a, b, bits)
            if n % 2:
                m = cat([m, cur[..., 2 * half :]], dim=-1)
            cur = m
        out = cur.transpose(d, -1)
        return out if keepdim else out.squeeze(d)
