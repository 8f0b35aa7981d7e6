"""Multiplication and truncation protocols (2 servers + dealer, semi-honest).

Op names say visibility: ``_aa`` = shared x shared, ``_ap`` = shared x public.
Scales: a product of scales ``s1`` and ``s2`` has scale ``s1 + s2``; the ``out_scale`` argument (default:
the context's ``frac_bits``) says where to truncate to, and ``None`` results above it are truncated with
:func:`trunc`, which costs one extra round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from secfwt import ring
from secfwt.comm.base import SERVER0
from secfwt.context import PartyContext
from secfwt.share import AShare, add_public, mul_public, open_, open_many

# Inputs to the truncation protocol must satisfy |x| < 2^TRUNC_RANGE_BITS (as ring integers).
TRUNC_RANGE_BITS = 62


def trunc(ctx: PartyContext, x: AShare, bits: int) -> AShare:
    """Exact-range truncation: ``floor(x / 2^bits)`` or one more, for |x| < 2^62.

    Steps (dealer gives shares of r uniform in Z_2^64, of q = floor(r / 2^bits) and of m = msb(r)):
      1. x' = x + 2^62, so x' is in [0, 2^63) as an unsigned integer.
      2. Open c = x' + r (mod 2^64).
      3. The wrap bit w = [x' + r >= 2^64] equals m * (1 - msb(c)) because x' < 2^63: linear in m.
      4. floor(x' / 2^bits) = (c >> bits) - q + w * 2^(64 - bits) - borrow, where borrow =
         [c mod 2^bits < r mod 2^bits] in {0, 1} is dropped (the one-unit error).
      5. Subtract 2^(62 - bits).
    Cost: 1 round; 8n bytes sent per server; dealer -> server 1: 16n bytes.
    Error: the result is floor(x / 2^bits) + e with e in {0, 1} (at most one unit in the last place);
    there is no large-error failure probability (unlike local SecureML truncation).
    Valid range: |x| < 2^62. Security: c is uniform (masked by uniform r).
    Reference: the wrap-bit-from-MSB trick as in Cheetah (Huang et al., USENIX Security 2022) with a dealer.
    """
    if bits == 0:
        return x
    if not 0 < bits < TRUNC_RANGE_BITS:
        raise ValueError(f"trunc: bits must be in (0, {TRUNC_RANGE_BITS}), got {bits}")
    with ctx.cost.scope("trunc"):
        assert ctx.dealer is not None
        pend = ctx.dealer.request("trunc", shape=list(x.shape), bits=bits)
        mat = pend.material
        offset = (1 << TRUNC_RANGE_BITS) if ctx.rank == SERVER0 else 0
        c = open_(ctx, x.data + offset + mat["r"], "trunc")
        full = pend.get()
        not_msb_c = 1 - ring.msb(c)
        w = full["rm"] * not_msb_c
        y = -full["rq"] + ring.lshift(w, ring.RING_BITS - bits)
        if ctx.rank == SERVER0:
            y = y + ring.logical_rshift(c, bits) - (1 << (TRUNC_RANGE_BITS - bits))
        return AShare(y, x.scale - bits)


def rescale(ctx: PartyContext, x: AShare, scale: int | None = None) -> AShare:
    """Bring ``x`` down to ``scale`` fractional bits (default: the context's) with :func:`trunc`."""
    target = ctx.f if scale is None else scale
    return trunc(ctx, x, x.scale - target) if x.scale > target else x


def _finish(ctx: PartyContext, z: Tensor, scale: int, out_scale: int | None) -> AShare:
    target = ctx.f if out_scale is None else out_scale
    out = AShare(z, scale)
    return trunc(ctx, out, scale - target) if scale > target else out


def mul_aa(ctx: PartyContext, x: AShare, y: AShare, out_scale: int | None = None) -> AShare:
    """Elementwise ``x * y`` of two shared tensors (broadcasting) with a Beaver triple.

    Steps: dealer gives (a, b, c = a*b); open e = x - a and f = y - b in one message;
    z = c + e*b + a*f (+ e*f on server 0); truncate to ``out_scale`` if the product scale exceeds it.
    Cost: 1 round (+1 for truncation); 8(|x| + |y|) bytes sent per server; dealer -> server 1: 8|z| bytes.
    Exact on the ring; the only error is the truncation's one unit in the last place.
    Valid range: |x*y| * 2^(sx + sy) < 2^62 when truncating.
    Reference: Beaver, "Efficient multiparty protocols using circuit randomization", CRYPTO 1991.
    """
    with ctx.cost.scope("mul"):
        assert ctx.dealer is not None
        pend = ctx.dealer.request("mul", a=list(x.shape), b=list(y.shape))
        mat = pend.material
        e, f = open_many(ctx, [x.data - mat["a"], y.data - mat["b"]], "mul")
        full = pend.get()
        z = full["c"] + e * full["b"] + full["a"] * f
        if ctx.rank == SERVER0:
            z = z + e * f
        return _finish(ctx, z, x.scale + y.scale, out_scale)


def matmul_aa(ctx: PartyContext, x: AShare, y: AShare, out_scale: int | None = None) -> AShare:
    """``x @ y`` of two shared tensors (torch.matmul broadcasting) with a matrix Beaver triple.

    Steps: dealer gives (a, b, c = a @ b); open e = x - a, f = y - b (one message);
    z = c + e @ (b + f on server 0) + a @ f; truncate to ``out_scale``.
    Cost: 1 round (+1 for truncation); 8(|x| + |y|) bytes sent per server; dealer -> server 1: 8|z|.
    Local compute: 2 exact ring matmuls per server (:func:`secfwt.ring.matmul`: int64 or float64 limbs, chosen
    per machine).
    Valid range: as :func:`mul_aa`, for the accumulated sums.
    """
    with ctx.cost.scope("matmul"):
        assert ctx.dealer is not None
        pend = ctx.dealer.request("mul", a=list(x.shape), b=list(y.shape), op="matmul")
        mat = pend.material
        e, f = open_many(ctx, [x.data - mat["a"], y.data - mat["b"]], "matmul")
        full = pend.get()
        b_plus = full["b"] + f if ctx.rank == SERVER0 else full["b"]
        z = full["c"] + ring.matmul(e, b_plus) + ring.matmul(full["a"], f)
        return _finish(ctx, z, x.scale + y.scale, out_scale)


@dataclass
class FixedShare(AShare):
    """This server's share of a weight whose Beaver mask B is fixed for the session (:func:`fix_weight`):
    ``opened`` = W - B (public to both servers, uniform), ``wid`` = the dealer's id of B."""

    opened: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    wid: int = -1
    _prepared: dict[bool, tuple[ring.RightOperand, ring.RightOperand]] = field(default_factory=dict, repr=False)

    def right_operands(self, transpose: bool) -> tuple[ring.RightOperand, ring.RightOperand]:
        """(W_i, F), transposed or not, as prepared right operands of :func:`secfwt.ring.matmul` (made once)."""
        if transpose not in self._prepared:
            w, f = (self.data.t(), self.opened.t()) if transpose else (self.data, self.opened)
            self._prepared[transpose] = (ring.RightOperand(w), ring.RightOperand(f))
        return self._prepared[transpose]


def fix_weight(ctx: PartyContext, w: AShare) -> FixedShare:
    """Fix the Beaver mask of a shared weight for every later product (:func:`matmul_fixed`).

    Steps: (1) the dealer draws a uniform mask B = B0 + B1 (server i derives B_i from its stream, nothing is
    sent) and keeps it; (2) open F = W - B. Cost: 1 round and 8|W| bytes per server, ONCE per weight and
    session; the dealer sends nothing. Security: F is uniform (B is); B is only ever used to mask this W, so
    opening the same F again would reveal nothing new, and it is not re-opened.
    Reference: weight-reusable multiplication triples, as used for fixed model weights in Delphi (Mishra et
    al., USENIX Security 2020) and SecureML's matrix triples (Mohassel and Zhang, S&P 2017, §4.2).
    """
    with ctx.cost.scope("fix_weight"):
        assert ctx.dealer is not None
        pend = ctx.dealer.request("wmask", shape=list(w.shape))
        wid = ctx.dealer.index - 1
        opened = open_(ctx, w.data - pend.get()["b"], "fix_weight")
        fixed = FixedShare(w.data, w.scale, opened, wid)
        ctx.dealer.derive("wmatmul", wid, lambda p, m: {
            "af": ring.matmul(m["a"], fixed.right_operands(bool(p["transpose"]))[1])})
        return fixed


def matmul_fixed(ctx: PartyContext, x: AShare, w: FixedShare, transpose: bool = True,
                 out_scale: int | None = None) -> AShare:
    """``x @ W^T`` (``transpose``; W of shape (out, in), the PyTorch layout) or ``x @ W`` for a weight with a
    fixed mask (:func:`fix_weight`); x has any leading batch dimensions.

    Steps: the dealer gives fresh (A, C = A @ B^T) for W's stored mask B; open E = X - A;
    Z_i = E @ W_i^T + A_i @ F^T + C_i, so Z_0 + Z_1 = E W^T + A (W - B)^T + A B^T = X W^T; truncate.
    Cost: 1 round (+1 truncation); 8|x| bytes per server (the weight is not re-opened); dealer -> server 1:
    8|z|. Local compute: 2 exact ring matmuls per server, as :func:`matmul_aa`, with W_i and F prepared once
    for the session (:class:`secfwt.ring.RightOperand`: the int64 matrix, its limbs only where the limb kernel
    is the faster one on the machine). A_i @ F^T does not depend on the input: when the request was preloaded
    (:meth:`secfwt.dealer.DealerClient.preload`, the offline phase) it was computed then (``af``), and the
    online phase does 1 matmul.
    Exact on the ring; valid range as :func:`mul_aa`.
    """
    with ctx.cost.scope("matmul"):
        assert ctx.dealer is not None
        pend = ctx.dealer.request("wmatmul", a=list(x.shape), w=list(w.shape), wid=w.wid, transpose=transpose)
        mat = pend.material
        e = open_(ctx, x.data - mat["a"], "matmul")
        full = pend.get()
        wt, ft = w.right_operands(transpose)
        af = full.get("af")
        z = full["c"] + ring.matmul(e, wt) + (af if af is not None else ring.matmul(full["a"], ft))
        return _finish(ctx, z, x.scale + w.scale, out_scale)


def square_a(ctx: PartyContext, x: AShare, out_scale: int | None = None) -> AShare:
    """Elementwise ``x * x`` with a square pair (a, c = a^2): open e = x - a only.

    z = c + 2 e a (+ e^2 on server 0). Cost: 1 round (+1 truncation); 8|x| bytes per server.
    """
    with ctx.cost.scope("square"):
        assert ctx.dealer is not None
        pend = ctx.dealer.request("square", a=list(x.shape))
        mat = pend.material
        e = open_(ctx, x.data - mat["a"], "square")
        full = pend.get()
        z = full["c"] + 2 * e * full["a"]
        if ctx.rank == SERVER0:
            z = z + e * e
        return _finish(ctx, z, 2 * x.scale, out_scale)


def square_mul(ctx: PartyContext, x: AShare, y: AShare) -> tuple[AShare, AShare]:
    """``(x * x, x * y)`` (y broadcast to x), untruncated, from ONE opening of x.

    Steps: the dealer gives (a, b, c = a * b, aa = a * a) (kind ``sqmul``); open e = x - a and f = y - b in one
    message; x^2 = aa + 2 e a (+ e^2 on server 0), x y = c + e b + a f (+ e f on server 0).
    Cost: 1 round; 8 (|x| + |y|) bytes per server (a LayerNorm weight y of one row: 8 |x| + 8 n); dealer ->
    server 1: 8 (|x y| + |x|). Exact on the ring; scales 2 sx and sx + sy.
    Reference: Beaver triples (CRYPTO 1991) sharing one mask between a square and a product.
    """
    with ctx.cost.scope("square_mul"):
        assert ctx.dealer is not None
        pend = ctx.dealer.request("sqmul", a=list(x.shape), b=list(y.shape))
        mat = pend.material
        e, f = open_many(ctx, [x.data - mat["a"], y.data - mat["b"]], "square_mul")
        full = pend.get()
        sq = full["aa"] + 2 * e * full["a"]
        xy = full["c"] + e * full["b"] + full["a"] * f
        if ctx.rank == SERVER0:
            sq, xy = sq + e * e, xy + e * f
        return AShare(sq, 2 * x.scale), AShare(xy, x.scale + y.scale)


def mul_ap(ctx: PartyContext, x: AShare, value: Tensor | float, out_scale: int | None = None) -> AShare:
    """``x * value`` for public reals (encoded with the context's fractional bits), truncated back.

    Cost: the truncation only (1 round) unless ``out_scale`` keeps the full scale.
    """
    y = mul_public(ctx, x, value)
    return _finish(ctx, y.data, y.scale, out_scale)


def matmul_ap(ctx: PartyContext, x: AShare, w: Tensor, out_scale: int | None = None) -> AShare:
    """``x @ w`` for a public real matrix ``w`` (local product, then truncation: 1 round)."""
    wq = ring.encode(w, ctx.f)
    return _finish(ctx, ring.matmul(x.data, wq), x.scale + ctx.f, out_scale)


def add_public_scaled(ctx: PartyContext, x: AShare, value: Tensor | float) -> AShare:
    return add_public(ctx, x, value)


def zero_like(x: AShare) -> AShare:
    return AShare(torch.zeros_like(x.data), x.scale)
