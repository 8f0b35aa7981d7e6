"""exp for x <= 0 and softmax (max-subtracted, optional public mask).

exp(x) = (exp(x / 2^n))^(2^n) with the base from the 3rd-order Taylor polynomial of exp(y), y = x / 2^n:
    base = 1 + y + y^2/2 + y^3/6,  n = 5.
Clamping: with b = [x >= -2^n], y is replaced by b (1 + y) - 1, i.e. -1 when b = 0, where the base is 1/3 and
base^32 = 5e-16 = 0 in fixed point; for b = 1, y is in [-1, 0] and the base in [1/3, 1], so the squarings
never overflow and any x <= 0 of the fixed-point range is safe.
Error of the approximation: 2^n ln(base) = x - x^4 / (24 8^n) + O(x^5 / 16^n), i.e. an absolute error <=
max_x e^x x^4 / (24 8^n) = 4.69 / (24 8^n) (at x = -4): 6.0e-6 for n = 5 (the 2nd-order base with n = 7 had
1.4e-5 and needed 7 squarings instead of 5).
Reference: the limit formula (1 + x/2^n)^(2^n) of CrypTen/MPCFormer, with a higher-order base (error 1/8^n
instead of 1/2^n) and an exact clamp instead of an unbounded base.
"""

from __future__ import annotations

import math

import torch

from secfwt import ring
from secfwt.approx.poly import to_scale
from secfwt.approx.recip import reciprocal
from secfwt.comm.base import SERVER0
from secfwt.context import PartyContext
from secfwt.protocols.compare import ltz_select, max_, range_bits
from secfwt.protocols.masked import Masked, fixed_mask, open_fixed, trunc_masked, width_for
from secfwt.share import AShare, add_public, mul_public_int

SQUARINGS = 5  # n
_BASE_SCALE = 22  # working scale of the squarings: base in [1/3, 1], squares < 2^45 fit a 48-bit opening
_Y_SCALE = 20  # y = x / 2^n in [-1, 0] and y^2 at scale 20; the cubic term's coefficient 1/6 with 20 bits
_COEF_BITS = 12  # 1/6 with 12 bits (y^3 / 6 within 5e-4 of itself: < 1e-8 on e^x); the base opens 56 bits
_R_EXTRA_BITS = 8  # 1/sum(e) in [1/N, 1] is kept with f + 8 bits (without a coarse copy)
LOGIT_BOUND = 2.0**13  # softmax's valid range: |logit| < 2^13
_MASK_FILL = 2.0**14  # masked logits are replaced by -2^14 before the max
_DIFF_BOUND = 3 * 2.0**13  # |x - y| <= 2^14 + 2^13 for any two logits or fills: the max tree's comparisons


def _exp_masked(ctx: PartyContext, x: AShare, bound: float | None, fid: int = -1) -> Masked:
    """exp(x) as a :class:`~secfwt.protocols.masked.Masked` value at scale f (:func:`exp`); ``fid``: the last
    truncation also prepares the product with the operand of that mask (softmax's 1 / sum)."""
    f, n = ctx.f, SQUARINGS
    x = to_scale(ctx, x, f)
    bits = 64 if bound is None else range_bits(f, bound + 2.0**n)  # |x + 2^n| < bound + 2^n
    v = add_public(ctx, x, float(2**n))
    _, lt_v = ltz_select(ctx, v.reshape(-1), v.numel(), bits)
    # b v = v - [v < 0] v with b = [x >= -2^n]; read at scale f + n it is b w, w = 1 + y, y = x / 2^n, exactly.
    bw = AShare(v.data - lt_v.data.reshape(v.shape), f + n)
    s1 = min(_Y_SCALE, f + n - 1)
    wm = trunc_masked(ctx, bw, bw.scale - s1, width_for(bw.scale + 1), square=True, keep=True, tag="w")
    y = wm.add_public_int(-(1 << s1))  # y in [-1, 0] (b = 0 gives y = -1: base 1/3, base^32 ~ 0)
    y2 = trunc_masked(ctx, y.square(), s1, width_for(2 * s1 + 1), cross=(y,), release=True, tag="y2")
    # base = 1 + y + y^2/2 + y^3/6 at scale 2 s1 + cb (y^3 = y2 y is local), one masked truncation.
    cb = _COEF_BITS
    top = 2 * s1 + cb
    acc = round(2**cb / 6) * y2.mul(y).data + ring.lshift((y.share().data << cb) + (y2.share().data << (cb - 1)), s1)
    if ctx.rank == SERVER0:
        acc = acc + (1 << top)
    sb = min(_BASE_SCALE, top - 1)
    base = trunc_masked(ctx, AShare(acc, top), top - sb, width_for(top + 1), square=True, tag="base")
    for i in range(n):
        last = i == n - 1
        base = trunc_masked(ctx, base.square(), 2 * sb - (f if last else sb), width_for(2 * sb + 1),
                            square=not last, fid=fid if last else -1, release=last and fid >= 0, tag="square")
    return base


def exp(ctx: PartyContext, x: AShare, bound: float | None = None) -> AShare:
    """exp(x) for shared x <= 0 (any such x in the fixed-point range).

    Steps: (1) [x + 2^n < 0] and its product with x + 2^n in one :func:`~secfwt.protocols.compare.ltz_select`,
    so b w = (1 - [x + 2^n < 0]) (x + 2^n) read at scale f + n, with b = [x >= -2^n] and w = 1 + y,
    y = x / 2^n, costs no round of its own; (2) w by a masked truncation to scale 20
    (:func:`~secfwt.protocols.masked.trunc_masked`, a 24-bit opening at f = 16) and y = w - 1 (local);
    (3) y^2 by a masked truncation of the local square (48 bits) with the cross products for y^3 = y^2 y;
    (4) base = 1 + y + y^2/2 + y^3/6 (local, coefficient 1/6 with 12 bits) by one masked truncation to scale
    22 (56 bits); (5) n = 5 squarings, each the LOCAL square of the previous masked value and one masked
    truncation on a 48-bit opening (the last one to scale f).
    Cost: R(l) + 8 rounds, R(l) the comparison's (6 at l = 64, 5 at l = 32); bytes per element per server:
    ltz(l) + w1 / 8 + 6 + 7 + 6 n, w1 = width_for(f + n + 1) (24 at f = 16): 19.6 + 3 + 6 + 7 + 30 = 65.6 at
    l = 64, 55.6 at l = 32 (163.6 with Beaver squares and separate truncations, 71.6 with the 2nd-order base
    and 7 squarings). Dealer -> server 1 per element: the comparison's + 80 (select) + 32 per masked
    truncation (+ 32 for the cross products; the last one 16, or 32 with ``fid``).
    Valid range: x <= 0 (also accurate for 0 < x <= 1, error growing like x^4 / 8^n beyond); x > 1 is
    wrong (the base exceeds 1 and 2^n squarings grow without bound; softmax never passes x > 0).
    Error: <= 6e-6 (approximation, see module docstring) + the truncations: each squaring at scale 22 adds
    at most 2^-22 to a base in [1/3, 1], doubled by every later squaring (<= ~2^-16 in all), + 2^-f;
    measured 3.3e-5 at f = 16 (docs/APPROXIMATIONS.md).
    ``bound``: a public bound on |x| the caller guarantees (softmax: 3 2^13); the clamp's comparison of x + 2^n
    then runs on :func:`~secfwt.protocols.compare.range_bits` (f, bound + 2^n) bits (32 at f = 16 for 3 2^13).
    Beyond the bound the clamp bit, hence the result, is wrong.
    """
    with ctx.cost.scope("exp"):
        return _exp_masked(ctx, x, bound).share()


def _fill_masked(ctx: PartyContext, x: AShare, mask_int: torch.Tensor) -> AShare:
    """x with its masked positions (public 0 in ``mask_int``) replaced by -2^14 at x's scale (local)."""
    x = mul_public_int(x, mask_int)
    if ctx.rank == SERVER0:
        x = AShare(x.data + (mask_int - 1) * round(_MASK_FILL * 2**x.scale), x.scale)
    return x


def softmax(ctx: PartyContext, x: AShare, dim: int = -1, mask: torch.Tensor | None = None,
            coarse: AShare | None = None) -> AShare:
    """softmax(x) along ``dim``; ``mask`` (PUBLIC 0/1, broadcastable to x) gives masked positions 0.

    ``coarse``: x truncated to scale 0 (floor(x) or one more) from the same opening as x
    (:func:`~secfwt.protocols.masked.trunc_masked` with ``coarse``; :meth:`secfwt.nn.mpc.MpcBackend.scores`).
    The max tree then runs on it with 16-bit comparisons (l1' = range_bits(0, 3 2^13 + 2) = 16 instead of 32:
    ~4.6 instead of 9.6 bytes and 4 instead of 5 rounds per level) and m = that max read at scale f. Any m
    works for softmax's value; this one has x - m < 1 for every x (m >= floor(max x)) and the row's largest
    x - m > -1, so exp's inputs stay in its range (x <= 1, see :func:`exp`), each e < e^1 and the sum lies in
    [e^-1, N e^1]: the reciprocal runs on [2^-2, 2^(ceil(log2 N) + 2)] and 1 / sum (<= e) is kept with f + 4
    bits, so the final masked truncation opens 40 bits. Measured over 12 x 128 x 128 N(0, 4) logits at f = 16:
    67.3 bytes per element and 56 rounds (74.6 and 63 without), max error 3.7e-4 (2.9e-4 without, same input).

    Steps: (1) masked logits replaced by -2^14 (local: public 0/1 multiply); (2) m = max_(x, dim) (tree of
    ceil(log2 N) comparisons); (3) a mask B for 1 / sum is drawn (nothing sent) and e = exp(x - m) (x - m <= 0)
    is computed as a masked value whose last truncation prepares the product with B; e times the mask (local);
    (4) s = sum(e) in [1, N]; (5) r = reciprocal(s, lo=0, hi=ceil(log2 N)) (range known: s >= e(max) = 1);
    (6) open r - B (one value per row) and y = e r is local, then one masked truncation to scale f
    (:mod:`secfwt.protocols.masked`).
    Cost (N = size of ``dim``, K = max(ceil(log2 N) - 1, 0)), with narrow comparisons on l1 =
    range_bits(f, 3 2^13 + 2^n) bits (max tree and exp's clamp; 32 at f = 16) and l2 = range_bits(f, 2^(hi+1))
    bits (the reciprocal's thresholds; 32 at f = 16, N = 128), ``ltz(l)`` = l / 8 + (3 w / 2 - 3) / 8 bytes and
    log2(w) rounds (protocols/compare.py): rounds R(l1) (ceil(log2 N) + 1) + 8 + (R(l2) + 8 if K else 8) + 2
    (63 for N = 128 at f = 16); bytes per element per server ~ ltz(l1) (max tree: one ltz_select per
    comparison, N - 1 per row) + ltz(l1) + 47 (exp's truncations) + 6 (final masked truncation, 48 bits)
    + (ltz(l2) K + 168) / N (reciprocal and the opening of r - B, once per row): ~75 at f = 16, N = 128
    (195 before the masked truncations and the narrower logit range).
    Valid range: logits with |x| < 2^13 (x - max >= -(2^14 + 2^13) never wraps; masked entries become -2^14;
    attention logits of the models here stay below ~10^2); rows must have at least one unmasked position (a
    fully masked row returns zeros, where torch returns NaN). The max-subtracted inputs are <= 0 by
    construction and the sum lies in [1, N] (reciprocal's range), so no op inside leaves its range; logits
    beyond 2^13 (a blown earlier op) make garbage that the owner's check flags. Output: every probability in
    [0, 1 + 1e-4].
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
            x = _fill_masked(ctx, x, mask_int)
        # Range: logits |x| < 2^13 (documented) and fills -2^14, so every difference the max tree compares and
        # every x - m has |.| <= 2^14 + 2^13: narrow comparisons on range_bits(f, that + 2^n) bits.
        if coarse is None:
            m = max_(ctx, x, dim=d, keepdim=True, bits=range_bits(f, _DIFF_BOUND + 2.0**SQUARINGS))
            lo, extra, top = 0, _R_EXTRA_BITS, 0
        else:
            if coarse.scale != 0 or coarse.shape != x.shape:
                raise ValueError(f"softmax: coarse must be x at scale 0 ({list(x.shape)}), got scale {coarse.scale} "
                                 f"and shape {list(coarse.shape)}")
            xc = coarse if mask_int is None else _fill_masked(ctx, coarse, mask_int)
            mc = max_(ctx, xc, dim=d, keepdim=True, bits=range_bits(0, _DIFF_BOUND + 2.0))
            m = AShare(ring.lshift(mc.data, f), f)  # x - m < 1 (docstring)
            lo, extra, top = -2, 4, 2
        # 1 / sum(e) is an operand of the final product with a mask fixed now, so that exp's last masked
        # truncation prepares that product and y = e r costs one masked truncation, no Beaver opening.
        handle = fixed_mask(ctx, m.shape)
        with ctx.cost.scope("exp"):
            em = _exp_masked(ctx, AShare(x.data - m.data, f), _DIFF_BOUND + 1.0, fid=handle.fid)
        e = em.share()
        if mask_int is not None:
            e = mul_public_int(e, mask_int)
        s = e.sum(d, keepdim=True)
        n = x.shape[d]
        hi = (max(math.ceil(math.log2(n)), 1) if n > 1 else 1) + top
        # 1/s <= 1 at scale f + 8 times e <= 1 at scale f: 2f + 8 <= 56 for f <= 24 (coarse: 1/s <= e, e <= e).
        # s in [1, N (1 + 1e-4)] < 2^(hi + 1): the thresholds' comparisons are exact on range_bits(f, 2^(hi+1)).
        r = reciprocal(ctx, s, lo=lo, hi=hi, out_scale=f + extra, compare_bits=range_bits(f, 2.0 ** (hi + 1)))
        y = em.mul_fixed(open_fixed(ctx, r, handle))  # e r at scale 2 f + 8, in [0, 1 + 1e-4]
        y = trunc_masked(ctx, y, y.scale - f, width_for(y.scale + 1), tag="product").share()
        return y if mask_int is None else mul_public_int(y, mask_int)


__all__ = ["SQUARINGS", "exp", "softmax"]
