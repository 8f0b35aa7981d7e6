"""exp for x <= 0 and softmax (max-subtracted, optional public mask).

exp(x) = (exp(x / 2^n))^(2^n) with the base from the 2nd-order Taylor polynomial of exp(y), y = x / 2^n:
    1 + y + y^2/2 = (1 + w^2) / 2,  w = 1 + y = 1 + x / 2^n.
Clamping: with b = [x >= -2^n], base = (1 + (b w)^2) / 2 equals the Taylor base when b = 1 and 1/2 when
b = 0 (so exp -> 2^-(2^n) = 0 in fixed point); for b = 1, w is in [0, 1] and the base in [1/2, 1], so the
squarings never overflow and any x <= 0 of the fixed-point range is safe.
Error of the approximation: 2^n ln(1 + y + y^2/2) = x - x^3 / (6 4^n) + O(x^4 / 8^n), i.e. an absolute
error <= max_x e^x |x|^3 / (6 4^n) = 0.224 / 4^n (at x = -3): 1.4e-5 for n = 7 (n = 6 gave 5.7e-5,
which accumulated to 4e-4 in softmax rows with many mid-sized logits).
Reference: the limit formula (1 + x/2^n)^(2^n) of CrypTen/MPCFormer, with a second-order base (error
1/4^n instead of 1/2^n) and an exact clamp instead of an unbounded base.
"""

from __future__ import annotations

import math

import torch

from secfwt.approx.poly import to_scale
from secfwt.approx.recip import reciprocal
from secfwt.comm.base import SERVER0
from secfwt.context import PartyContext
from secfwt.protocols.arith import mul_aa, square_a
from secfwt.protocols.compare import gez, max_, range_bits
from secfwt.share import AShare, add_public, mul_public_int

SQUARINGS = 7  # n
_EXP_SCALE = 28  # working scale of the squarings: base in [1/2, 1], squares at scale 56 < 62
_W_MAX_SCALE = 30  # w = 1 + x / 2^n in [0, 1] is squared: its scale s needs 2 s <= 61 - 1
_R_EXTRA_BITS = 8  # 1/sum(e) in [1/N, 1] is kept with f + 8 bits
_MASK_FILL = 2.0**20  # masked logits are replaced by -2^20 before the max
_DIFF_BOUND = 2.0**21  # |x - y| < 2^20 + 2^19 < 2^21 for any two logits or fills: the max tree's comparisons


def exp(ctx: PartyContext, x: AShare, bound: float | None = None) -> AShare:
    """exp(x) for shared x <= 0 (any such x in the fixed-point range).

    Steps: (1) b = [x + 2^n >= 0] (one ltz); w = 1 + x / 2^n exactly at scale f + n (local);
    (2) b w (exact bit product, 1 round); (3) base = (1 + (b w)^2) / 2 (square + truncation, 2 rounds);
    (4) n squarings at scale 28 (2 rounds each; the last one truncates to f).
    Cost: 9 + 2n = 23 rounds; bytes per element per server: 19.6 (ltz) + 16 + 16 + 16 n = 163.6 (f = 7..23;
    f <= 6: the base square needs no truncation, 22 rounds; f >= 24: the bit product truncates to scale 30,
    24 rounds, +8 bytes).
    Valid range: x <= 0 (also accurate for 0 < x <= 1, error growing like x^3 / 4^n beyond); x > 1 is
    wrong (the base exceeds 1 and 2^n squarings grow without bound; softmax never passes x > 0).
    Error: <= 1.4e-5 (approximation, see module docstring) + ~2^-f (fixed point): ~3e-5 absolute at f = 16.
    ``bound``: a public bound on |x| the caller guarantees (softmax: 2^21); the clamp's comparison of x + 2^n
    then runs on :func:`~secfwt.protocols.compare.range_bits` (f, bound + 2^n) bits (40 at f = 16 for 2^21:
    16.6 instead of 19.6 bytes, same rounds; fewer for small f). Beyond the bound the clamp bit, hence the
    result, is wrong.
    """
    with ctx.cost.scope("exp"):
        f, n = ctx.f, SQUARINGS
        x = to_scale(ctx, x, f)
        bits = 64 if bound is None else range_bits(f, bound + 2.0**n)  # |x + 2^n| < bound + 2^n
        b = gez(ctx, add_public(ctx, x, float(2**n)), bits)
        w = add_public(ctx, AShare(x.data, f + n), 1.0)  # x / 2^n exactly, plus 1
        # f + n <= 30 (f <= 23): exact bit product; above, one truncation keeps (b w)^2 below 2^62.
        bw = mul_aa(ctx, b, w, out_scale=min(w.scale, _W_MAX_SCALE))
        sq = to_scale(ctx, square_a(ctx, bw, out_scale=_EXP_SCALE - 1), _EXP_SCALE - 1)
        base = add_public(ctx, AShare(sq.data, _EXP_SCALE), 0.5)  # reinterpretation divides by 2
        for i in range(n):
            base = square_a(ctx, base, out_scale=f if i == n - 1 else _EXP_SCALE)
        return base


def softmax(ctx: PartyContext, x: AShare, dim: int = -1, mask: torch.Tensor | None = None) -> AShare:
    """softmax(x) along ``dim``; ``mask`` (PUBLIC 0/1, broadcastable to x) gives masked positions 0.

    Steps: (1) masked logits replaced by -2^20 (local: public 0/1 multiply); (2) m = max_(x, dim) (tree of
    ceil(log2 N) comparisons); (3) e = exp(x - m) (x - m <= 0), times the mask (local); (4) s = sum(e) in
    [1, N]; (5) r = reciprocal(s, lo=0, hi=ceil(log2 N)) (range known: s >= e(max) = 1); (6) y = e r.
    Cost (N = size of ``dim``, K = max(ceil(log2 N) - 1, 0)), with narrow comparisons on l1 =
    range_bits(f, 2^21) bits (max tree and exp's clamp; 40 at f = 16) and l2 = range_bits(f, 2^(hi+1)) bits
    (the reciprocal's thresholds; 32 at f = 16, N = 128), ``ltz(l)`` = l / 8 + (3 w / 2 - 3) / 8 bytes and
    log2(w) rounds (protocols/compare.py): rounds R(l1) ceil(log2 N) + 17 + R(l1) + (R(l2) + 8 if K else 8)
    + 2 (80 for N = 128 at f = 16); bytes per element per server ~ ltz(l1) (max tree: one ltz_select per
    comparison, N - 1 per row) + ltz(l1) + 144 (exp) + 24 (final product) + (ltz(l2) K + 160) / N
    (reciprocal, once per row): ~195 at f = 16, N = 128.
    Valid range: any logits with |x| < 2^19 (x - max >= -2^20 never wraps; masked entries become -2^20);
    rows must have at least one unmasked position (a fully masked row returns zeros, where torch returns
    NaN). The max-subtracted inputs are <= 0 by construction and the sum lies in [1, N] (reciprocal's range),
    so no op inside leaves its range; logits beyond 2^19 (a blown earlier op) make garbage that the owner's
    check flags. Output: every probability in [0, 1 + 1e-4].
    Error: <= ~1e-4 absolute per probability (exp error, reciprocal ~2e-6 relative, truncations).
    Reference: max-subtracted softmax as in CrypTen/PUMA; exp and reciprocal from this package.
    """
    with ctx.cost.scope("softmax"):
        f = ctx.f
        x = to_scale(ctx, x, f)
        d = dim % x.dim()
        mask_int = None
        if mask is not None:
            mask_int = torch.as_tensor(mask).to(torch.int64).expand(x.shape)
            fill = (mask_int - 1) * round(_MASK_FILL * 2**f)
            x = mul_public_int(x, mask_int)
            if ctx.rank == SERVER0:
                x = AShare(x.data + fill, f)
        # Range: logits |x| < 2^19 (documented) and fills -2^20, so every difference the max tree compares and
        # every x - m (in [-(2^20 + 2^19), 0]) has |.| < 2^21: narrow comparisons on range_bits(f, 2^21) bits.
        m = max_(ctx, x, dim=d, keepdim=True, bits=range_bits(f, _DIFF_BOUND))
        e = exp(ctx, AShare(x.data - m.data, f), bound=_DIFF_BOUND)
        if mask_int is not None:
            e = mul_public_int(e, mask_int)
        s = e.sum(d, keepdim=True)
        n = x.shape[d]
        hi = max(math.ceil(math.log2(n)), 1) if n > 1 else 1
        # 1/s <= 1 at scale f + 8 times e <= 1 at scale f: 2f + 8 <= 56 for f <= 24.
        # s in [1, N (1 + 1e-4)] < 2^(hi + 1): the thresholds' comparisons are exact on range_bits(f, 2^(hi+1)).
        r = reciprocal(ctx, s, lo=0, hi=hi, out_scale=f + _R_EXTRA_BITS,
                       compare_bits=range_bits(f, 2.0 ** (hi + 1)))
        return mul_aa(ctx, e, r, out_scale=f)


__all__ = ["SQUARINGS", "exp", "softmax"]
