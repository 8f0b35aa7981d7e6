"""Correlations the dealer hands out: per kind, what server 0 draws, what server 1 draws, the dealer's
corrections, the request parameters and the shape and dtype of every correction (:mod:`secfwt.dealer` runs
the protocol: seeds, binding, request-log check, serving).

Kinds of correlation (``S0`` = server 0's material, all pseudo-random; ``S1`` = random parts + corrections):

============  ==========================================================  ========================================
kind          secret relation                                             bytes dealer -> server 1
============  ==========================================================  ========================================
mul           c = a * b  (elementwise, broadcasting)                      8 * numel(c)
matmul        c = a @ b  (kind ``mul`` with ``op="matmul"``)              8 * numel(c)
square        c = a * a                                                   8 * numel(a)
sqmul         c = a * b (broadcast), aa = a * a: x^2 and x y, one opening  8 * (numel(c) + numel(a))
trunc         rq = floor(r / 2^k) (r unsigned), rm = msb(r)               16 * n
compare       r (arith), rb = r (XOR), pair products q, AND triples,      n * (8 + 4 + 7.5 + 4 * 8) ~ 51.5 n
              final masks s, a, b and 4 monomials s, x (1 - 2 s) for     (bits = 32: ~41.5 n, 16: ~36.5 n,
              x in a, b, ab (arith); ``bits`` = l < 64: r mod 2^l,       8: ~34 n)
              tree fields of w bits
compare_sel   compare + the 4 monomials times r for the first k elements   51.5 n + 32 k (l < 64: + 80 k;
              (l < 64: r, mono r, r_t, mono r_t: 10 rows)                 r_t = bit l - 1 of the l-bit r)
cossin        t in [0, 2^f), cos(2 pi t / 2^f), sin(2 pi t / 2^f)         16 * n
bit2a         random bit s as XOR share and arithmetic share               8 * n
wmask         a fixed mask B for one weight, kept by the dealer (stateful) 0
wmatmul       c = a @ B^T (or a @ B) with the stored mask B of ``wid``     8 * numel(c)
mtrunc        l-bit r; q = (r mod 2^l) >> s, m = bit l - 1 of r; with     16 n (+ 16 n ``square``, + 16 n ``fid``,
              ``square``: q^2, q m; with ``fid``: q B, m B (B the          + 32 n per ``cross`` entry)
              stored mask of request ``fid``, broadcast); with
              ``cross``: q q', q m', m q', m m' for each earlier
              ``keep`` truncation (q', m'); ``release``: forget them;     (+ 8 n ``coarse``)
              ``coarse`` c: also qc = (r mod 2^l) >> c
============  ==========================================================  ========================================

``wmask``, ``wmatmul`` and ``mtrunc`` are the dealer's only stateful kinds: the mask B = B0 + B1 of a weight is
drawn once (request ``wid``) and kept for the session, so the servers open W - B once and every later product with
that weight costs only its activation's opening (:func:`secfwt.protocols.arith.fix_weight`). ``mtrunc`` with
``fid`` reads such a mask (a per-forward operand's, :func:`secfwt.protocols.masked.fixed_mask`) and, with
``release``, drops it after its last use.

Adding a kind: its (draw0, draw1, correct) in :data:`KINDS` (or :data:`STATEFUL`), its parameters in
``_FIELDS`` and the layout of its corrections in ``_LAYOUTS``; :func:`check_request` validates requests with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from secfwt import ring
from secfwt.errors import ProtocolMismatchError
from secfwt.prg import PRGStream

Material = dict[str, Tensor]
Shape = tuple[int, ...]
Layout = dict[str, tuple[Shape, torch.dtype]]

# Per request: elements of its parameter shapes plus its corrections (2^31 counted int64 elements = 16 GiB; the
# dealer's peak for a comparison is about 3x the counted elements: both servers' draws, corrections, temporaries).
# The largest honest
# requests are comparisons of whole activation chunks: ltz_select on the 3 stacked copies of GELU's input for
# 64 rows x 128 tokens x 3072 (BERT-base) is n = 75.5M elements, 10 n + 8 k <= 1.4e9 counted elements.
MAX_ELEMENTS = 2**31
MAX_DIMS = 16


def _shape(params: dict[str, Any], key: str) -> Shape:
    return tuple(int(s) for s in params[key])


# -- per-kind definitions: draw0 (server 0, all random), draw1 (server 1 random parts), correct (dealer) --


def _mul_draw0(p: dict[str, Any], st: PRGStream) -> Material:
    return {"a": st.ring(_shape(p, "a")), "b": st.ring(_shape(p, "b")), "c": st.ring(_mul_out(p))}


def _mul_out(p: dict[str, Any]) -> Shape:
    """Shape of c for a (checked) ``mul`` request: broadcast a * b, or torch.matmul's a @ b."""
    a, b = _shape(p, "a"), _shape(p, "b")
    if p.get("op") != "matmul":
        return tuple(torch.broadcast_shapes(a, b))
    if len(a) >= 2 and len(b) >= 2:  # the common case, without the meta-device kernels' first-use cost
        if a[-1] != b[-2]:
            raise ValueError(f"matmul triple: inner dimensions differ: {a} @ {b}")
        return (*torch.broadcast_shapes(a[:-2], b[:-2]), a[-2], b[-1])
    return tuple(torch.empty(a, device="meta").matmul(torch.empty(b, device="meta")).shape)


def _mul_draw1(p: dict[str, Any], st: PRGStream) -> Material:
    return {"a": st.ring(_shape(p, "a")), "b": st.ring(_shape(p, "b"))}


def _mul_correct(p: dict[str, Any], m0: Material, m1: Material) -> Material:
    a = m0["a"] + m1["a"]
    b = m0["b"] + m1["b"]
    c = ring.matmul(a, b) if p.get("op") == "matmul" else a * b
    return {"c": c - m0["c"]}


def _square_draw0(p: dict[str, Any], st: PRGStream) -> Material:
    shape = _shape(p, "a")
    return {"a": st.ring(shape), "c": st.ring(shape)}


def _square_draw1(p: dict[str, Any], st: PRGStream) -> Material:
    return {"a": st.ring(_shape(p, "a"))}


def _square_correct(p: dict[str, Any], m0: Material, m1: Material) -> Material:
    a = m0["a"] + m1["a"]
    return {"c": a * a - m0["c"]}


def _sqmul_out(p: dict[str, Any]) -> Shape:
    return tuple(torch.broadcast_shapes(_shape(p, "a"), _shape(p, "b")))


def _sqmul_draw0(p: dict[str, Any], st: PRGStream) -> Material:
    return {"a": st.ring(_shape(p, "a")), "b": st.ring(_shape(p, "b")), "c": st.ring(_sqmul_out(p)),
            "aa": st.ring(_shape(p, "a"))}


def _sqmul_correct(p: dict[str, Any], m0: Material, m1: Material) -> Material:
    a, b = m0["a"] + m1["a"], m0["b"] + m1["b"]
    return {"c": a * b - m0["c"], "aa": a * a - m0["aa"]}


def _trunc_draw0(p: dict[str, Any], st: PRGStream) -> Material:
    shape = _shape(p, "shape")
    return {"r": st.ring(shape), "rq": st.ring(shape), "rm": st.ring(shape)}


def _trunc_draw1(p: dict[str, Any], st: PRGStream) -> Material:
    return {"r": st.ring(_shape(p, "shape"))}


def _trunc_correct(p: dict[str, Any], m0: Material, m1: Material) -> Material:
    r = m0["r"] + m1["r"]
    k = int(p["bits"])
    return {"rq": ring.logical_rshift(r, k) - m0["rq"], "rm": ring.msb(r) - m0["rm"]}


# Comparison material (see protocols/compare.py for how it is used). For n elements and an l-bit opening
# (``bits``, default 64) with w = tree_width(l)-bit tree fields (w = 64: one element per word):
#   r      arithmetic mask (n; only r mod 2^l is used); rb = (r mod 2^l) << (w - l) as XOR shares, w-bit
#          fields packed densely (ceil(n w / 64) words)
#   q      XOR shares of the w / 2 pair products r_(2j+1) AND r_(2j) per field (32 bits per word of rb, in
#          the order of odd_bits / even_bits): tree level 1 local
#   t      AND triples (ta, tb1, tb2, tc1 = ta AND tb1, tc2 = ta AND tb2) for the 4 interactive tree levels as
#          dense 64-bit words: level l uses compare_words(n)[l + 1] words, the levels one after the other
#   fb     final-level masks s, a, b: one bit per element, 32 elements per word (low 32 bits), 3 rows
#   mono   arithmetic shares of s, a (1 - 2 s), b (1 - 2 s), ab (1 - 2 s) per element (fused bit -> arithmetic)
_M32 = (1 << 32) - 1
_EVEN = [(0x5555555555555555, 1), (0x3333333333333333, 2), (0x0F0F0F0F0F0F0F0F, 4),
         (0x00FF00FF00FF00FF, 8), (0x0000FFFF0000FFFF, 16), (0x00000000FFFFFFFF, 0)]


def tree_width(bits: int) -> int:
    """Width w of the comparison tree's per-element field for an opening of ``bits`` bits: the smallest power
    of two >= bits, at least 8 (8, 16, 32 or 64)."""
    return max(8, 1 << (bits - 1).bit_length())


def compare_words(n: int, width: int = 64) -> list[int]:
    """Dense word counts of the comparison tree for n elements of ``width``-bit fields: [W_0, ..., W_L],
    L = log2(width) - 2 packed levels. The fields start in N_0 = ceil(n width / 64) words; W_0 = ceil(N_0 / 2)
    words of (width / 2)-bit fields after level 1, W_(l+1) = ceil(W_l / 2) after each packed level (for width
    64: W_0 = ceil(n / 2) words of two 32-bit fields). The last level's words hold 32 two-bit fields."""
    ws = [(-(-n * width // 64) + 1) // 2]
    for _ in range(width.bit_length() - 3):
        ws.append((ws[-1] + 1) // 2)
    return ws


def pack_fields(v: Tensor, width: int) -> Tensor:
    """``width``-bit fields (values in [0, 2^width)) packed densely, 64 / width per int64 word, in order
    (element i in word i // (64 / width), at bit (i % (64 / width)) width), the last word zero-padded."""
    if width == 64:
        return v
    per = 64 // width
    v = torch.cat([v, v.new_zeros((-v.numel()) % per)]).reshape(-1, per)
    return (v << (torch.arange(per, dtype=torch.int64) * width)).sum(-1)


def even_bits(x: Tensor) -> Tensor:
    """Bits 0, 2, 4, ..., 62 of ``x`` compacted into bits 0..31 (a bit permutation: linear over XOR)."""
    y = x & _EVEN[0][0]
    t = torch.empty_like(y)
    for (_, sh), (mask, _) in zip(_EVEN[:-1], _EVEN[1:], strict=True):  # in place: 2 tensors, not 15
        torch.bitwise_right_shift(y, sh, out=t)
        y |= t
        y &= mask
    return y


def odd_bits(x: Tensor) -> Tensor:
    """Bits 1, 3, ..., 63 of ``x`` compacted into bits 0..31."""
    return even_bits(x >> 1)


# Delta swaps of the outer perfect unshuffle (Hacker's Delight, 7-2): even bits to the low half, odd to the high.
_UNSHUFFLE = ((0x2222222222222222, 1), (0x0C0C0C0C0C0C0C0C, 2), (0x00F000F000F000F0, 4),
              (0x0000FF000000FF00, 8), (0x00000000FFFF0000, 16))


def split_bits(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(odd_bits(x), even_bits(x))`` in one pass of 5 delta swaps (~1.7x faster than the two calls)."""
    y = x.clone()
    t = torch.empty_like(y)
    for mask, sh in _UNSHUFFLE:  # t = ((y >> sh) ^ y) & mask; y ^= t ^ (t << sh)
        torch.bitwise_right_shift(y, sh, out=t)
        t ^= y
        t &= mask
        y ^= t
        t <<= sh
        y ^= t
    return (y >> 32) & _M32, y & _M32


def _compare_dims(p: dict[str, Any]) -> tuple[int, int, int, list[int]]:
    """(n, l, w, word counts) of a compare request: n elements, l-bit opening, w-bit tree fields."""
    (n,) = _shape(p, "shape")
    bits = int(p.get("bits", 64))
    w = tree_width(bits)
    return n, bits, w, compare_words(n, w)


def _compare_r(p: dict[str, Any], st: PRGStream, n: int) -> Tensor:
    """The comparison mask r: n draws, or with ``tile`` = k, n / k draws repeated k times (rows compared
    against public shifts of one input share one opening, :func:`secfwt.protocols.compare.ltz_select_shifted`)."""
    tile = int(p.get("tile", 1))
    return st.ring((n // tile,)).repeat(tile)


def _compare_draw0(p: dict[str, Any], st: PRGStream) -> Material:
    n, _, w, ws = _compare_dims(p)
    n0 = -(-n * w // 64)
    return {"r": _compare_r(p, st, n), "rb": st.ring((n0,)), "q": st.ring((n0,)), "t": st.ring((5, sum(ws[1:]))),
            "fb": st.ring((3, ws[-1])), "mono": st.ring((4, n))}


def _compare_draw1(p: dict[str, Any], st: PRGStream) -> Material:
    n, _, _, ws = _compare_dims(p)
    return {"r": _compare_r(p, st, n), "t": st.ring((3, sum(ws[1:]))), "fb": st.ring((3, ws[-1]))}


_SHIFTS32 = torch.arange(32, dtype=torch.int32)


def word_bits(words: Tensor, n: int) -> Tensor:
    """Bit i % 32 of words[i // 32] for i < n (the final-level layout: 32 elements per word), as int8 0/1: the
    bits and the small public coefficients made from them stay 1 byte wide until they multiply ring elements
    (int64 x int8 promotes to int64), 1.6x faster than int64 throughout. ``words`` hold 32 valid bits."""
    w32 = (words & _M32).to(torch.int32)  # the low 32 bits, as a (wrapping) int32
    return ((w32.unsqueeze(-1) >> _SHIFTS32) & 1).to(torch.int8).reshape(*words.shape[:-1], -1)[..., :n]


def _mask_r(r: Tensor, bits: int) -> Tensor:
    """The l-bit mask r mod 2^l (the whole ring element for l = 64)."""
    return r if bits == 64 else r & ((1 << bits) - 1)


def _compare_correct(p: dict[str, Any], m0: Material, m1: Material) -> Material:
    n, bits, w, _ = _compare_dims(p)
    # The tree compares w-bit fields holding r at the top (r << (w - l)); the low w - l bits are 0 in r and c.
    r = pack_fields(_mask_r(m0["r"] + m1["r"], bits) << (w - bits), w)
    hi, lo = split_bits(r)
    q = hi & lo
    t = m0["t"][:3] ^ m1["t"]
    tc = torch.stack([t[0] & t[1], t[0] & t[2]])
    s, a, b = word_bits(m0["fb"] ^ m1["fb"], n)
    ns = 1 - 2 * s  # the root is linear in s, a (1 - 2 s), b (1 - 2 s), ab (1 - 2 s) (protocols/compare.py)
    mono = torch.stack([s, a * ns, b * ns, a * b * ns])
    return {
        "rb": r ^ m0["rb"],
        "q": ((q ^ m0["q"]) & _M32).to(torch.int32),  # 4 bytes per word: only the low 32 bits are used
        "tc": tc ^ m0["t"][3:],  # dense words
        "mono": mono - m0["mono"],
    }


def _sel_rows(p: dict[str, Any]) -> int:
    """Rows of ``monor``: 4 (mono_j r) for a 64-bit comparison; 10 for l < 64 (r, mono_j r, r_t, mono_j r_t
    with r the l-bit mask as an integer in [0, 2^l) and r_t its top bit)."""
    return 4 if int(p.get("bits", 64)) == 64 else 10


def _compare_sel_draw0(p: dict[str, Any], st: PRGStream) -> Material:
    m = _compare_draw0(p, st)
    m["monor"] = st.ring((_sel_rows(p), *_shape(p, "prod_shape")))
    return m


def _compare_sel_correct(p: dict[str, Any], m0: Material, m1: Material) -> Material:
    """``compare`` plus shares of mono_k * r for the first prod_shape[0] elements (ltz with the product b x);
    for l < 64 also r, r_t and mono_k * r_t (see protocols/compare.py, ltz_select)."""
    out = _compare_correct(p, m0, m1)
    k = _shape(p, "prod_shape")[0]
    bits = int(p.get("bits", 64))
    r = _mask_r(m0["r"] + m1["r"], bits)[:k]
    mono = out["mono"][:, :k] + m0["mono"][:, :k]
    if bits == 64:
        rows = mono * r
    else:
        rt = r >> (bits - 1)
        rows = torch.cat([r[None], mono * r, rt[None], mono * rt])
    out["monor"] = rows - m0["monor"]
    return out


def _cossin_draw0(p: dict[str, Any], st: PRGStream) -> Material:
    shape = _shape(p, "shape")
    return {"t": st.ring(shape), "cos": st.ring(shape), "sin": st.ring(shape)}


def _cossin_draw1(p: dict[str, Any], st: PRGStream) -> Material:
    return {"t": st.ring(_shape(p, "shape"))}


def _cossin_correct(p: dict[str, Any], m0: Material, m1: Material) -> Material:
    f = int(p["frac_bits"])
    t = (m0["t"] + m1["t"]) & ((1 << f) - 1)
    theta = t.to(torch.float64) * (2.0 * math.pi / 2.0**f)
    return {
        "cos": ring.encode(torch.cos(theta), f) - m0["cos"],
        "sin": ring.encode(torch.sin(theta), f) - m0["sin"],
    }


def _bit2a_draw0(p: dict[str, Any], st: PRGStream) -> Material:
    shape = _shape(p, "shape")
    return {"sb": st.bits(shape), "sa": st.ring(shape)}


def _bit2a_draw1(p: dict[str, Any], st: PRGStream) -> Material:
    return {"sb": st.bits(_shape(p, "shape"))}


def _bit2a_correct(p: dict[str, Any], m0: Material, m1: Material) -> Material:
    return {"sa": (m0["sb"] ^ m1["sb"]) - m0["sa"]}


def _wmask_draw(p: dict[str, Any], st: PRGStream) -> Material:
    return {"b": st.ring(_shape(p, "shape"))}


def _wmask_correct(p: dict[str, Any], m0: Material, m1: Material, store: dict[Any, Any], index: int) -> Material:
    store[index] = m0["b"] + m1["b"]  # B, kept for the weight's products
    return {}


def _wmatmul_out(p: dict[str, Any]) -> Shape:
    a, (rows, cols) = _shape(p, "a"), _shape(p, "w")
    return (*a[:-1], rows if p.get("transpose") else cols)


def _wmatmul_draw0(p: dict[str, Any], st: PRGStream) -> Material:
    return {"a": st.ring(_shape(p, "a")), "c": st.ring(_wmatmul_out(p))}


def _wmatmul_draw1(p: dict[str, Any], st: PRGStream) -> Material:
    return {"a": st.ring(_shape(p, "a"))}


def _wmatmul_correct(p: dict[str, Any], m0: Material, m1: Material, store: dict[Any, Any],
                     index: int) -> Material:
    wid = int(p["wid"])
    if wid not in store:
        raise ProtocolMismatchError(f"dealer: wmatmul #{index} names weight mask #{wid}, which was never drawn")
    b = store[wid]
    if tuple(b.shape) != _shape(p, "w"):
        raise ProtocolMismatchError(f"dealer: weight mask #{wid} has shape {tuple(b.shape)}, request says {p['w']}")
    key = (wid, bool(p.get("transpose")))  # B prepared once per direction (ring.RightOperand)
    if key not in store:
        store[key] = ring.RightOperand(b.t() if key[1] else b)
    a = m0["a"] + m1["a"]
    return {"c": ring.matmul(a, store[key]) - m0["c"]}


def _mtrunc_names(p: dict[str, Any]) -> list[str]:
    """The dealer-corrected components of an ``mtrunc`` request, in sending order."""
    cross = [f"x{j}{k}" for j in range(len(p.get("cross", []))) for k in ("qq", "qm", "mq", "mm")]
    return ["q", "m"] + (["q2", "qm"] if p.get("square") else []) + (["qb", "mb"] if p.get("fid", -1) >= 0 else []) \
        + cross + (["qc"] if p.get("coarse", 0) else [])


def _mtrunc_draw0(p: dict[str, Any], st: PRGStream) -> Material:
    shape = _shape(p, "shape")
    return {"r": st.ring(shape), **{k: st.ring(shape) for k in _mtrunc_names(p)}}


def _mtrunc_draw1(p: dict[str, Any], st: PRGStream) -> Material:
    return {"r": st.ring(_shape(p, "shape"))}


def _mtrunc_correct(p: dict[str, Any], m0: Material, m1: Material, store: dict[Any, Any],
                    index: int) -> Material:
    """Masked truncation (:func:`secfwt.protocols.masked.trunc_masked`): r uniform mod 2^l, its top l - s bits
    q and its bit l - 1 m as ring shares, and the products the result's later local squares / products need."""
    width, bits = int(p["width"]), int(p["bits"])
    r = m0["r"] + m1["r"]
    rl = r if width == 64 else r & ((1 << width) - 1)

    def top(s: int) -> Tensor:  # (r mod 2^l) >> s, read unsigned
        return ring.logical_rshift(rl, s)

    q, m = top(bits), top(width - 1)
    full = {"q": q, "m": m}
    if p.get("coarse", 0):  # a second truncation of the same opening, by ``coarse`` bits
        full["qc"] = top(int(p["coarse"]))
    if p.get("square"):
        full["q2"], full["qm"] = q * q, q * m
    fid = int(p.get("fid", -1))
    if fid >= 0:
        b = store.get(fid)
        if b is None or not isinstance(b, Tensor):
            raise ProtocolMismatchError(f"dealer: mtrunc #{index} names mask #{fid}, which was never drawn")
        try:
            full["qb"], full["mb"] = q * b, m * b
        except RuntimeError:
            raise ProtocolMismatchError(f"dealer: mask #{fid} of shape {tuple(b.shape)} does not broadcast to "
                                        f"{list(q.shape)}") from None
        if tuple(full["qb"].shape) != tuple(q.shape):
            raise ProtocolMismatchError(f"dealer: mask #{fid} of shape {tuple(b.shape)} does not broadcast to "
                                        f"{list(q.shape)}")
        if p.get("release"):  # the mask's last use: the dealer forgets it (per-forward operands)
            del store[fid]
    for j, other in enumerate(p.get("cross", [])):
        kept = store.get(("mt", other))
        if kept is None:
            raise ProtocolMismatchError(f"dealer: mtrunc #{index} names truncation #{other}, which was not kept")
        oq, om = kept
        if tuple(oq.shape) != tuple(q.shape):
            raise ProtocolMismatchError(f"dealer: mtrunc #{index} has shape {list(q.shape)}, truncation #{other} "
                                        f"{list(oq.shape)}")
        full[f"x{j}qq"], full[f"x{j}qm"], full[f"x{j}mq"], full[f"x{j}mm"] = q * oq, q * om, m * oq, m * om
        if p.get("release"):
            del store[("mt", other)]
    if p.get("keep"):  # a later truncation's cross products read q and m
        store[("mt", index)] = (q, m)
    return {k: full[k] - m0[k] for k in _mtrunc_names(p)}


_Draw = Callable[[dict[str, Any], PRGStream], Material]
_Correct = Callable[[dict[str, Any], Material, Material], Material]
_StatefulCorrect = Callable[[dict[str, Any], Material, Material, dict[Any, Any], int], Material]

# Kinds whose corrections read or write the dealer's per-session store.
STATEFUL: dict[str, tuple[_Draw, _Draw, _StatefulCorrect]] = {
    "wmask": (_wmask_draw, _wmask_draw, _wmask_correct),
    "wmatmul": (_wmatmul_draw0, _wmatmul_draw1, _wmatmul_correct),
    "mtrunc": (_mtrunc_draw0, _mtrunc_draw1, _mtrunc_correct),
}

KINDS: dict[str, tuple[_Draw, _Draw, _Correct]] = {
    "mul": (_mul_draw0, _mul_draw1, _mul_correct),
    "square": (_square_draw0, _square_draw1, _square_correct),
    "sqmul": (_sqmul_draw0, _mul_draw1, _sqmul_correct),
    "trunc": (_trunc_draw0, _trunc_draw1, _trunc_correct),
    "compare": (_compare_draw0, _compare_draw1, _compare_correct),
    "compare_sel": (_compare_sel_draw0, _compare_draw1, _compare_sel_correct),
    "cossin": (_cossin_draw0, _cossin_draw1, _cossin_correct),
    "bit2a": (_bit2a_draw0, _bit2a_draw1, _bit2a_correct),
}


def draws(kind: str) -> tuple[_Draw, _Draw]:
    spec = STATEFUL.get(kind) or KINDS[kind]
    return spec[0], spec[1]


def correct(kind: str, params: dict[str, Any], m0: Material, m1: Material, store: dict[Any, Any],
            index: int) -> Material:
    """The dealer's corrections of request ``index`` from both servers' material (stateful kinds read and write
    ``store``, the session's kept masks)."""
    if kind in STATEFUL:
        return STATEFUL[kind][2](params, m0, m1, store, index)
    return KINDS[kind][2](params, m0, m1)


# -- request validation: parameter types and ranges, and the shape and dtype of every correction --


def _as_shape(v: Any) -> list[int]:
    if not isinstance(v, list | tuple | torch.Size) or len(v) > MAX_DIMS \
            or not all(type(s) is int and s >= 0 for s in v):
        raise ValueError(f"expected a list of at most {MAX_DIMS} non-negative ints")
    return list(v)


def _as_int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise ValueError(f"expected an int in [{lo}, {hi}]")
        return v
    return check


def _as_bool(v: Any) -> bool:
    if type(v) is not bool:
        raise ValueError("expected true or false")
    return v


def _as_op(v: Any) -> str:
    if v not in ("mul", "matmul") or type(v) is not str:
        raise ValueError("expected 'mul' or 'matmul'")
    return str(v)


def _as_bytes_bits(v: Any) -> int:
    if type(v) is not int or v not in range(8, 65, 8):
        raise ValueError("expected a multiple of 8 in [8, 64]")
    return v


def _as_ids(v: Any) -> tuple[int, ...]:
    """Request indices (a tuple, so :func:`check_request` does not count them as a shape's elements)."""
    if not isinstance(v, list | tuple) or len(v) > 4 or not all(type(i) is int and 0 <= i <= 2**62 for i in v):
        raise ValueError("expected a list of at most 4 request indices")
    return tuple(v)


_SHAPE = (_as_shape, None)  # (converter, default); default None: required
_FIELDS: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "mul": {"a": _SHAPE, "b": _SHAPE, "op": (_as_op, "mul")},
    "square": {"a": _SHAPE},
    "sqmul": {"a": _SHAPE, "b": _SHAPE},
    "trunc": {"shape": _SHAPE, "bits": (_as_int(1, 63), None)},
    "compare": {"shape": _SHAPE, "bits": (_as_bytes_bits, 64), "tile": (_as_int(1, 64), 1)},
    "compare_sel": {"shape": _SHAPE, "prod_shape": _SHAPE, "bits": (_as_bytes_bits, 64), "tile": (_as_int(1, 64), 1)},
    "cossin": {"shape": _SHAPE, "frac_bits": (_as_int(1, 62), None)},
    "bit2a": {"shape": _SHAPE},
    "wmask": {"shape": _SHAPE},
    "wmatmul": {"a": _SHAPE, "w": _SHAPE, "wid": (_as_int(0, 2**62), None), "transpose": (_as_bool, False)},
    "mtrunc": {"shape": _SHAPE, "bits": (_as_int(1, 62), None), "width": (_as_bytes_bits, 64),
               "square": (_as_bool, False), "fid": (_as_int(-1, 2**62), -1), "release": (_as_bool, False),
               "keep": (_as_bool, False), "cross": (_as_ids, ()), "coarse": (_as_int(0, 62), 0)},
}
_I64 = torch.int64


def _compare_layout(p: dict[str, Any]) -> Layout:
    shape = _shape(p, "shape")
    if len(shape) != 1:
        raise ValueError(f"'shape' must be 1-D, got {list(shape)}")
    n, _, w, ws = _compare_dims(p)
    if n % p["tile"]:
        raise ValueError(f"'shape' [{n}] is not a multiple of tile {p['tile']}")
    n0 = -(-n * w // 64)
    return {"rb": ((n0,), _I64), "q": ((n0,), torch.int32), "tc": ((2, sum(ws[1:])), _I64), "mono": ((4, n), _I64)}


def _compare_sel_layout(p: dict[str, Any]) -> Layout:
    out = _compare_layout(p)
    k = _shape(p, "prod_shape")
    if len(k) != 1 or k[0] > p["shape"][0]:
        raise ValueError(f"'prod_shape' must be [k] with k <= {p['shape'][0]}, got {list(k)}")
    out["monor"] = ((_sel_rows(p), k[0]), _I64)
    return out


def _wmatmul_layout(p: dict[str, Any]) -> Layout:
    a, w = _shape(p, "a"), _shape(p, "w")
    if len(w) != 2 or not a or a[-1] != w[1 if p["transpose"] else 0]:
        raise ValueError(f"a {list(a)} does not fit the weight mask {list(w)} (transpose={p['transpose']})")
    return {"c": (_wmatmul_out(p), _I64)}


def _mtrunc_layout(p: dict[str, Any]) -> Layout:
    if p["bits"] >= p["width"] - 1:
        raise ValueError(f"bits {p['bits']} must be below width - 1 = {p['width'] - 1}")
    if p["coarse"] and not p["bits"] < p["coarse"] < p["width"] - 1:
        raise ValueError(f"coarse {p['coarse']} must be between bits {p['bits']} and width - 1 = {p['width'] - 1}")
    return {k: (_shape(p, "shape"), _I64) for k in _mtrunc_names(p)}


_LAYOUTS: dict[str, Callable[[dict[str, Any]], Layout]] = {
    "mul": lambda p: {"c": (_mul_out(p), _I64)},
    "square": lambda p: {"c": (_shape(p, "a"), _I64)},
    "sqmul": lambda p: {"c": (_sqmul_out(p), _I64), "aa": (_shape(p, "a"), _I64)},
    "trunc": lambda p: {"rq": (_shape(p, "shape"), _I64), "rm": (_shape(p, "shape"), _I64)},
    "compare": _compare_layout,
    "compare_sel": _compare_sel_layout,
    "cossin": lambda p: {"cos": (_shape(p, "shape"), _I64), "sin": (_shape(p, "shape"), _I64)},
    "bit2a": lambda p: {"sa": (_shape(p, "shape"), _I64)},
    "wmask": lambda p: {},
    "wmatmul": _wmatmul_layout,
    "mtrunc": _mtrunc_layout,
}


def brief(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def check_request(kind: Any, params: Any, index: int, who: str = "dealer") -> tuple[dict[str, Any], Layout]:
    """Validate request ``index`` and return its canonical parameters (defaults filled in, shapes as lists of
    ints) and the layout (name -> shape, dtype, in sending order) of the corrections the dealer sends for it.

    Raises :class:`~secfwt.errors.ProtocolMismatchError` for an unknown kind, a missing, unknown or ill-typed
    parameter, shapes that do not fit together, or more than :data:`MAX_ELEMENTS` elements (parameter shapes
    plus corrections). Nothing is allocated before the check passes.
    """
    where = f"{who}: request #{index}"
    fields = _FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ProtocolMismatchError(f"{where}: unknown correlation kind {brief(kind)} (known: {sorted(_FIELDS)})")
    where += f" ({kind})"
    if not isinstance(params, dict):
        raise ProtocolMismatchError(f"{where}: parameters must be an object, got {brief(params)}")
    extra = sorted(set(params) - set(fields))
    if extra:
        raise ProtocolMismatchError(f"{where}: unknown parameter(s) {extra} (expected {sorted(fields)})")
    canon: dict[str, Any] = {}
    for name, (convert, default) in fields.items():
        v = params.get(name, default)
        if v is None:
            raise ProtocolMismatchError(f"{where}: parameter '{name}' is missing")
        try:
            canon[name] = convert(v)
        except ValueError as e:
            raise ProtocolMismatchError(f"{where}: parameter '{name}': {e}, got {brief(v)}") from None
    try:
        layout = _LAYOUTS[kind](canon)
    except (ValueError, RuntimeError) as e:
        raise ProtocolMismatchError(f"{where}: shapes do not fit: {str(e).splitlines()[0]}") from None
    total = sum(math.prod(v) for v in canon.values() if isinstance(v, list))
    total += sum(math.prod(shape) for shape, _ in layout.values())
    if total > MAX_ELEMENTS:
        raise ProtocolMismatchError(
            f"{where}: {total} elements (parameter shapes plus corrections), the dealer's cap is {MAX_ELEMENTS}")
    return canon, layout


def layout_bytes(layout: Layout) -> int:
    """Bytes of the corrections a layout describes (what the dealer sends for one request)."""
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in layout.values())


def correction_layout(kind: str, params: dict[str, Any]) -> Layout:
    """Shape and dtype of every correction the dealer sends for a request (see :func:`check_request`)."""
    return check_request(kind, params, -1)[1]
