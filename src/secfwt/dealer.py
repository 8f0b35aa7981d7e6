"""The dealer: correlated randomness for the two servers, sent as PRG seeds plus corrections.

Seed compression: the dealer shares one AES key with each server. For request number ``i`` both the dealer
and server 0 derive server 0's *entire* material from stream ``i`` of key 0, so server 0 never talks to the
dealer online. Server 1 derives its random parts from stream ``i`` of key 1 and receives only the
*corrections* (for a Beaver triple: ``c1 = a*b - c0``), which is the dealer's only online traffic.
Server 1 sends the request (kind + public shapes) and reads the answer lazily, so the dealer's latency
overlaps with the servers' own round.

Kinds of correlation (``S0`` = server 0's material, all pseudo-random; ``S1`` = random parts + corrections):

============  ==========================================================  ========================================
kind          secret relation                                             bytes dealer -> server 1
============  ==========================================================  ========================================
mul           c = a * b  (elementwise, broadcasting)                      8 * numel(c)
matmul        c = a @ b                                                   8 * numel(c)
square        c = a * a                                                   8 * numel(a)
trunc         rq = floor(r / 2^k) (r unsigned), rm = msb(r)               16 * n
compare       r (arith), rb = r (XOR), pair products q, AND triples,      n * (8 + 4 + 7.5 + 7 * 8) ~ 75.5 n
              final masks s, a, b and their 7 monomials (arith)
compare_sel   compare + the 7 monomials times r for the first k elements   75.5 n + 56 k
cossin        t in [0, 2^f), cos(2 pi t / 2^f), sin(2 pi t / 2^f)         16 * n
bit2a         random bit s as XOR share and arithmetic share               8 * n
wmask         a fixed mask B for one weight, kept by the dealer (stateful) 0
wmatmul       c = a @ B^T (or a @ B) with the stored mask B of ``wid``     8 * numel(c)
============  ==========================================================  ========================================

``wmask`` and ``wmatmul`` are the dealer's only stateful kinds: the mask B = B0 + B1 of a weight is drawn once
(request ``wid``) and kept for the session, so the servers open W - B once and every later product with that
weight costs only its activation's opening (:func:`secfwt.protocols.arith.fix_weight`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from secfwt import ring
from secfwt.comm.base import DEALER, SERVER0, SERVER1, Communicator
from secfwt.errors import ProtocolMismatchError
from secfwt.prg import PRG, PRGStream

Material = dict[str, Tensor]
Shape = tuple[int, ...]



def _shape(params: dict[str, Any], key: str) -> Shape:
    return tuple(int(s) for s in params[key])


# -- per-kind definitions: draw0 (server 0, all random), draw1 (server 1 random parts), correct (dealer) --


def _mul_draw0(p: dict[str, Any], st: PRGStream) -> Material:
    a, b = st.ring(_shape(p, "a")), st.ring(_shape(p, "b"))
    return {"a": a, "b": b, "c": st.ring(_out_shape(p, a, b))}


def _out_shape(p: dict[str, Any], a: Tensor, b: Tensor) -> Shape:
    if p.get("op") == "matmul":
        if a.dim() >= 2 and b.dim() >= 2:  # the common case, without the meta-device kernels' first-use cost
            if a.shape[-1] != b.shape[-2]:
                raise ValueError(f"matmul triple: inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}")
            return (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
        return tuple(torch.empty(a.shape, device="meta").matmul(torch.empty(b.shape, device="meta")).shape)
    return tuple(torch.broadcast_shapes(a.shape, b.shape))


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


def _trunc_draw0(p: dict[str, Any], st: PRGStream) -> Material:
    shape = _shape(p, "shape")
    return {"r": st.ring(shape), "rq": st.ring(shape), "rm": st.ring(shape)}


def _trunc_draw1(p: dict[str, Any], st: PRGStream) -> Material:
    return {"r": st.ring(_shape(p, "shape"))}


def _trunc_correct(p: dict[str, Any], m0: Material, m1: Material) -> Material:
    r = m0["r"] + m1["r"]
    k = int(p["bits"])
    return {"rq": ring.logical_rshift(r, k) - m0["rq"], "rm": ring.msb(r) - m0["rm"]}


# Comparison material (see protocols/compare.py for how it is used). For n elements:
#   r      arithmetic mask (n); rb = r as XOR shares (n 64-bit words)
#   q      XOR shares of the 32 pair products r_(2j+1) AND r_(2j) per element (bits 0..31): tree level 1 local
#   t      AND triples (ta, tb1, tb2, tc1 = ta AND tb1, tc2 = ta AND tb2) for the 4 interactive tree levels as
#          dense 64-bit words: level l uses compare_words(n)[l + 1] words, the levels one after the other
#   fb     final-level masks s, a, b: one bit per element, 32 elements per word (low 32 bits), 3 rows
#   mono   arithmetic shares of the monomials s, a, b, sa, sb, ab, sab per element (fused bit -> arithmetic)
_M32 = (1 << 32) - 1
_EVEN = [(0x5555555555555555, 1), (0x3333333333333333, 2), (0x0F0F0F0F0F0F0F0F, 4),
         (0x00FF00FF00FF00FF, 8), (0x0000FFFF0000FFFF, 16), (0x00000000FFFFFFFF, 0)]


def compare_words(n: int) -> list[int]:
    """Dense word counts of the comparison tree for n elements: [W_0, ..., W_4], W_0 = ceil(n / 2) words of
    two 32-bit fields after level 1, W_(l+1) = ceil(W_l / 2) after each packed level (64 / w fields of w bits)."""
    ws = [(n + 1) // 2]
    for _ in range(4):
        ws.append((ws[-1] + 1) // 2)
    return ws


def even_bits(x: Tensor) -> Tensor:
    """Bits 0, 2, 4, ..., 62 of ``x`` compacted into bits 0..31 (a bit permutation: linear over XOR)."""
    y = x & _EVEN[0][0]
    for (_, sh), (mask, _) in zip(_EVEN[:-1], _EVEN[1:], strict=True):
        y = (y | (y >> sh)) & mask
    return y


def odd_bits(x: Tensor) -> Tensor:
    """Bits 1, 3, ..., 63 of ``x`` compacted into bits 0..31."""
    return even_bits(x >> 1)


def _compare_draw0(p: dict[str, Any], st: PRGStream) -> Material:
    (n,) = _shape(p, "shape")
    ws = compare_words(n)
    return {"r": st.ring((n,)), "rb": st.ring((n,)), "q": st.ring((n,)), "t": st.ring((5, sum(ws[1:]))),
            "fb": st.ring((3, ws[4])), "mono": st.ring((7, n))}


def _compare_draw1(p: dict[str, Any], st: PRGStream) -> Material:
    (n,) = _shape(p, "shape")
    ws = compare_words(n)
    return {"r": st.ring((n,)), "t": st.ring((3, sum(ws[1:]))), "fb": st.ring((3, ws[4]))}


def word_bits(words: Tensor, n: int) -> Tensor:
    """Bit i % 32 of words[i // 32] for i < n (the final-level layout: 32 elements per word)."""
    shifts = torch.arange(32, dtype=torch.int64)
    return ((words.unsqueeze(-1) >> shifts) & 1).reshape(*words.shape[:-1], -1)[..., :n]


def _compare_correct(p: dict[str, Any], m0: Material, m1: Material) -> Material:
    (n,) = _shape(p, "shape")
    r = m0["r"] + m1["r"]
    q = odd_bits(r) & even_bits(r)
    t = m0["t"][:3] ^ m1["t"]
    tc = torch.stack([t[0] & t[1], t[0] & t[2]])
    s, a, b = word_bits(m0["fb"] ^ m1["fb"], n)
    mono = torch.stack([s, a, b, s * a, s * b, a * b, s * a * b])
    return {
        "rb": r ^ m0["rb"],
        "q": ((q ^ m0["q"]) & _M32).to(torch.int32),  # 4 bytes: only the low 32 bits are used
        "tc": tc ^ m0["t"][3:],  # dense words: 2 * 30 bits per element
        "mono": mono - m0["mono"],
    }


def _compare_sel_draw0(p: dict[str, Any], st: PRGStream) -> Material:
    m = _compare_draw0(p, st)
    m["monor"] = st.ring((7, *_shape(p, "prod_shape")))
    return m


def _compare_sel_correct(p: dict[str, Any], m0: Material, m1: Material) -> Material:
    """``compare`` plus shares of mono_k * r for the first prod_shape[0] elements (ltz with the product b x)."""
    out = _compare_correct(p, m0, m1)
    k = _shape(p, "prod_shape")[0]
    r = (m0["r"] + m1["r"])[:k]
    mono = out["mono"][:, :k] + m0["mono"][:, :k]
    out["monor"] = mono * r - m0["monor"]
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
    key = (wid, bool(p.get("transpose")))  # B split into limbs once per direction (ring.RightOperand)
    if key not in store:
        store[key] = ring.RightOperand(b.t() if key[1] else b)
    a = m0["a"] + m1["a"]
    return {"c": ring.matmul(a, store[key]) - m0["c"]}


_Draw = Callable[[dict[str, Any], PRGStream], Material]
_Correct = Callable[[dict[str, Any], Material, Material], Material]
_StatefulCorrect = Callable[[dict[str, Any], Material, Material, dict[Any, Any], int], Material]

# Kinds whose corrections read or write the dealer's per-session store, with the names of what they send.
STATEFUL: dict[str, tuple[_Draw, _Draw, _StatefulCorrect, list[str]]] = {
    "wmask": (_wmask_draw, _wmask_draw, _wmask_correct, []),
    "wmatmul": (_wmatmul_draw0, _wmatmul_draw1, _wmatmul_correct, ["c"]),
}

KINDS: dict[str, tuple[_Draw, _Draw, _Correct]] = {
    "mul": (_mul_draw0, _mul_draw1, _mul_correct),
    "square": (_square_draw0, _square_draw1, _square_correct),
    "trunc": (_trunc_draw0, _trunc_draw1, _trunc_correct),
    "compare": (_compare_draw0, _compare_draw1, _compare_correct),
    "compare_sel": (_compare_sel_draw0, _compare_draw1, _compare_sel_correct),
    "cossin": (_cossin_draw0, _cossin_draw1, _cossin_correct),
    "bit2a": (_bit2a_draw0, _bit2a_draw1, _bit2a_correct),
}


def _check_kind(kind: str) -> tuple[_Draw, _Draw, _Correct]:
    spec = KINDS.get(kind)
    if spec is None:
        raise ProtocolMismatchError(f"unknown correlation kind '{kind}' (known: {sorted(KINDS) + sorted(STATEFUL)})")
    return spec


def _draws(kind: str) -> tuple[_Draw, _Draw]:
    if kind in STATEFUL:
        return STATEFUL[kind][0], STATEFUL[kind][1]
    d0, d1, _ = _check_kind(kind)
    return d0, d1


class Pending:
    """Server 1's view of an outstanding request: own random parts now, corrections when read."""

    def __init__(self, client: DealerClient, material: Material, kind: str, names: list[str]) -> None:
        self._client = client
        self.material = material
        self._kind = kind
        self._names = names
        self._done = not names

    def _fill(self) -> None:
        for name in self._names:
            self.material[name] = self._client.comm.recv(DEALER, f"dealer/{self._kind}/{name}", dtype=None)
        self._done = True

    def get(self) -> Material:
        if not self._done:
            self._client.drain_until(self)
        return self.material


class DealerClient:
    """A server's access to the dealer (see module docstring for the seed compression)."""

    def __init__(self, rank: int, comm: Communicator, prg: PRG) -> None:
        if rank not in (SERVER0, SERVER1):
            raise ValueError(f"DealerClient is for servers, got rank {rank}")
        self.rank = rank
        self.comm = comm
        self.prg = prg
        self.index = 0
        self._queue: deque[Pending] = deque()

    def request(self, kind: str, **params: Any) -> Pending:
        """Ask for one correlation; returns at once (server 1's corrections are read on ``get()``)."""
        draw0, draw1 = _draws(kind)
        st = self.prg.stream(self.index)
        if self.rank == SERVER0:
            pend = Pending(self, draw0(params, st), kind, [])
        else:
            self.comm.send_json(DEALER, "dealer/req", {"kind": kind, "params": params, "index": self.index})
            material = draw1(params, st)
            names = _correction_names(kind, params)
            pend = Pending(self, material, kind, names)
            self._queue.append(pend)
        self.index += 1
        return pend

    def drain_until(self, target: Pending) -> None:
        while self._queue:
            pend = self._queue.popleft()
            pend._fill()
            if pend is target:
                return
        raise RuntimeError("dealer request was already consumed")

    def close(self) -> None:
        if self.rank == SERVER1:
            while self._queue:
                self._queue.popleft()._fill()
            self.comm.send_json(DEALER, "dealer/req", {"kind": "stop", "params": {}, "index": self.index})


_NAMES_CACHE: dict[str, list[str]] = {}


def _correction_names(kind: str, params: dict[str, Any]) -> list[str]:
    """Names of the tensors the dealer sends for ``kind`` (fixed per kind, independent of sizes)."""
    if kind in STATEFUL:
        return STATEFUL[kind][3]
    if kind not in _NAMES_CACHE:
        draw0, draw1, correct = _check_kind(kind)
        tiny = {k: ([1] * len(v) if isinstance(v, list) else v) for k, v in params.items()}
        st0, st1 = PRG(bytes(16)).stream(0), PRG(bytes(16)).stream(1)
        _NAMES_CACHE[kind] = list(correct(tiny, draw0(tiny, st0), draw1(tiny, st1)).keys())
    return _NAMES_CACHE[kind]


def serve(comm: Communicator, prg0: PRG, prg1: PRG, idle_timeout: float | None = None) -> int:
    """The dealer's loop: answer server 1's requests until it says stop. Returns the number served."""
    served = 0
    store: dict[Any, Any] = {}  # the stateful kinds' fixed weight masks (by request index) and their limbs
    old_timeout = comm.timeout
    if idle_timeout is not None:
        comm.timeout = idle_timeout
    try:
        while True:
            req = comm.recv_json(SERVER1, "dealer/req")
            kind, params, index = req["kind"], req["params"], int(req["index"])
            if kind == "stop":
                return served
            if index != served:
                raise ProtocolMismatchError(f"dealer: expected request #{served}, got #{index} ({kind})")
            draw0, draw1 = _draws(kind)
            with comm.cost.scope(f"dealer/{kind}"):
                m0, m1 = draw0(params, prg0.stream(index)), draw1(params, prg1.stream(index))
                if kind in STATEFUL:
                    corr = STATEFUL[kind][2](params, m0, m1, store, index)
                else:
                    corr = _check_kind(kind)[2](params, m0, m1)
                for name, t in corr.items():
                    comm.send(SERVER1, f"dealer/{kind}/{name}", t)
            served += 1
    finally:
        comm.timeout = old_timeout
