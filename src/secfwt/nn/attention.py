"""Multi-head self-attention with a selectable mechanism (docs/ATTENTION.md: formulas, costs, errors).

Every mechanism takes the queries, keys and values of one layer, shaped (B, nh, T, hs), and a public
key mask (B, T) of 0/1 floats. Masked keys contribute nothing: their weights are multiplied by 0 (or
removed from the softmax), and every normaliser counts only the valid keys.

Normalisers are divided by the public number of valid keys ``n_b`` (and by m for RFA) before the MPC
reciprocal, so its input range does not depend on the sequence length: out = (num / n) * 1/(den / n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Generic

import torch
from torch import Tensor

from secfwt.nn.backend import Backend, V
from secfwt.nn.config import AttentionConfig, AttentionKind, EncoderConfig


def rfa_frequencies(m: int, d: int, seed: int, orthogonal: bool = True) -> Tensor:
    """The public random frequencies W (m, d), rows ~ N(0, I_d), drawn from ``seed``.

    Orthogonal random features (Yu et al., 2016; Performer, Choromanski et al., 2021): blocks of d
    orthogonal directions (QR of a Gaussian matrix) with norms drawn from the chi distribution, so each row
    is still marginally N(0, I_d) while rows of one block are exactly orthogonal (lower variance).
    """
    g = torch.Generator().manual_seed(seed)
    if not orthogonal:
        return torch.randn(m, d, generator=g, dtype=torch.float64)
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        norms = torch.randn(d, d, generator=g, dtype=torch.float64).norm(dim=1)
        blocks.append(q.T * norms.unsqueeze(1))  # (d, d): orthogonal rows with chi(d) norms
    return torch.cat(blocks)[:m]


@dataclass
class SelfAttention(Generic[V]):
    """BERT self-attention: projections, the selected mechanism, and the output projection.

    Params (canonical names without the ``layer.{i}.attn.`` prefix): q/k/v/o weight (H, H) and bias (H,).
    """

    cfg: EncoderConfig
    attn: AttentionConfig
    layer: int
    p: dict[str, V]

    def forward(self, be: Backend[V], h: V, mask: Tensor) -> V:
        """h: (B, T, H) -> (B, T, H); mask: public (B, T) 0/1."""
        cfg, p = self.cfg, self.p
        b, t, _ = be.shape(h)
        nh, hs = cfg.n_heads, cfg.head_size

        def heads(x: V) -> V:
            return be.transpose(be.reshape(x, (b, t, nh, hs)), 1, 2)  # (B, nh, T, hs)

        # q, k and v in ONE product (one round instead of three): weights stacked to (3H, H), local; stacked
        # once per session by Encoder.fuse_qkv when the servers prepared the model.
        if "qkv.weight" in p:
            w_qkv, b_qkv = p["qkv.weight"], p["qkv.bias"]
        else:
            w_qkv = be.cat([p["q.weight"], p["k.weight"], p["v.weight"]], dim=0)  # (3H, H)
            b_qkv = be.cat([p["q.bias"], p["k.bias"], p["v.bias"]], dim=0)  # (3H,)
        qkv = be.linear(h, w_qkv, b_qkv)  # (B, T, 3H)
        q, k, v = (heads(be.index(qkv, (Ellipsis, slice(i * nh * hs, (i + 1) * nh * hs)))) for i in range(3))
        kind = self.attn.attention_kind
        rfa = kind is AttentionKind.RFA
        ctx = self._rfa(be, q, k, v, mask) if rfa else self._quadratic(be, kind, q, k, v, mask)
        ctx = be.reshape(be.transpose(ctx, 1, 2), (b, t, nh * hs))  # (B, T, H)
        return be.linear(ctx, p["o.weight"], p["o.bias"])

    # -- O(T^2) mechanisms: softmax, 2quad, relu, power --------------------------------------------
    def _quadratic(self, be: Backend[V], kind: AttentionKind, q: V, k: V, v: V, mask: Tensor) -> V:
        a = self.attn
        b, nh, t, _ = be.shape(q)
        key_mask = mask.reshape(b, 1, 1, t)  # (B, 1, 1, T)
        n_valid = mask.sum(dim=1).reshape(b, 1, 1, 1)  # (B, 1, 1, 1)
        q = be.mul_public(q, self.cfg.attn_scale)
        if kind is AttentionKind.SOFTMAX:
            s = be.scores(q, be.transpose(k, -1, -2))  # (B, nh, T, T) scores q.k / sqrt(hs), straight to softmax
            probs = be.softmax(s, mask=key_mask.expand(b, nh, t, t))
            return be.matmul(probs, v)  # (B, nh, T, hs)
        s = be.matmul(q, be.transpose(k, -1, -2))
        if kind is AttentionKind.TWO_QUAD:
            w = be.square(be.add_public(s, a.quad_c))  # MPCFormer 2Quad: (s + c)^2
        elif kind is AttentionKind.RELU:
            w = be.relu(s)
        elif kind is AttentionKind.POWER:
            w = _even_power(be, s, a.power)  # Power-Softmax numerator s^p
        else:
            raise AssertionError(kind)
        w = be.mul_mask(w, key_mask)  # masked keys weigh 0
        num = be.matmul(w, v)  # (B, nh, T, hs)
        if kind is AttentionKind.RELU and a.relu_norm == "length":
            return be.mul_public(num, 1.0 / n_valid)
        den = be.sum(w, dim=-1, keepdim=True)  # (B, nh, T, 1)
        eps = a.eps if kind in (AttentionKind.RELU, AttentionKind.POWER) else 0.0
        return _normalise(be, num, den, n_valid, a.recip_range(), eps)

    # -- random feature attention, O(T m) ---------------------------------------------------------
    def _rfa(self, be: Backend[V], q: V, k: V, v: V, mask: Tensor) -> V:
        """Random feature attention (Peng et al., 2021, eq. 2-5) as used by SecFwT.

        phi(x) = [cos(W x), sin(W x)] with W (m, hs) ~ N(0, I) from the public seed, so that
        phi(x).phi(y) / m estimates the Gaussian kernel E_w[cos(w.(x - y))] = exp(-|x - y|^2 / 2)
        (the 1/m of phi is folded into the normaliser). ``rfa_norm``:
          * "l2": x = q/(tau |q|), y = k/(tau |k|): kernel = exp((cos(q, k) - 1) / tau^2) (Peng et al. §3);
          * "scale": x = q d^-1/4 / tau, y = k d^-1/4 / tau: kernel = exp(q.k/(tau^2 sqrt d)) times the
            per-query factor exp(-|x|^2/2) (cancels) and the per-key factor exp(-|y|^2/2) (does not).
        num and the normaliser come from one product: phi(q) (phi(K)^T [V, 1]) (last column = normaliser).
        """
        a = self.attn
        b, nh, t, hs = be.shape(q)
        m = a.n_features
        w = rfa_frequencies(m, hs, a.seed + self.layer, a.orthogonal)  # (m, hs), public
        qk = be.cat([q, k], dim=2)  # (B, nh, 2T, hs): queries and keys share every round below
        if a.rfa_norm == "l2":
            lo, hi = a.rfa_sq_range
            qk = be.mul(qk, be.rsqrt(be.sum(be.square(qk), dim=-1, keepdim=True), lo, hi))  # unit rows
            w_eff = w / (a.tau_at(self.layer) * 2.0 * math.pi)
        else:
            w_eff = w * (hs ** -0.25) / (a.tau_at(self.layer) * 2.0 * math.pi)
        c, s = be.cos_sin(be.linear_public(qk, w_eff))  # (B, nh, 2T, m) each: cos/sin(W x)
        phi = be.cat([c, s], dim=-1)  # (B, nh, 2T, 2m)
        phi_q = be.index(phi, (slice(None), slice(None), slice(0, t)))  # (B, nh, T, 2m)
        phi_k = be.index(phi, (slice(None), slice(None), slice(t, 2 * t)))  # (B, nh, T, 2m)
        ones = be.const(torch.ones(b, nh, t, 1, dtype=torch.float64))
        v_ext = be.mul_mask(be.cat([v, ones], dim=-1), mask.reshape(b, 1, t, 1))  # (B, nh, T, hs + 1)
        kv = be.matmul(be.transpose(phi_k, -1, -2), v_ext)  # (B, nh, 2m, hs + 1)
        out = be.matmul(phi_q, kv)  # (B, nh, T, hs + 1)
        num = be.index(out, (Ellipsis, slice(0, hs)))  # (B, nh, T, hs)
        den = be.index(out, (Ellipsis, slice(hs, hs + 1)))  # (B, nh, T, 1)
        n_valid = mask.sum(dim=1).reshape(b, 1, 1, 1) * m  # (B, 1, 1, 1)
        return _normalise(be, num, den, n_valid, a.recip_range(), 0.0, floor=a.rfa_floor)


def _even_power(be: Backend[V], x: V, p: int) -> V:
    """x^p for even p by repeated squaring (ceil(log2 p) + popcount rounds of products)."""
    result: Any = None
    base = x
    e = p
    while e:
        if e & 1:
            result = base if result is None else be.mul(result, base)
        e >>= 1
        if e:
            base = be.square(base)
    return result


def _normalise(
    be: Backend[V], num: V, den: V, n: Tensor, rng: tuple[float, float], eps: float, floor: float = 0.0
) -> V:
    """num / den with one reciprocal per query: (num / n) * 1/(den / n + eps); n public per batch row.

    Both are divided by n before the product so neither the reciprocal's input nor its output depends on
    the sequence length (1/den itself would be ~1/n: too few fixed-point bits). With ``floor`` > 0 the mean
    normaliser is max(den / n, floor) = floor + relu(den / n - floor) (one comparison per query, on both
    backends), so the reciprocal's input is never below its range.
    """
    mean = be.mul_public(den, 1.0 / n)  # (B, nh, T, 1)
    if eps:
        mean = be.add_public(mean, eps)
    if floor:
        mean = be.add_public(be.relu(be.add_public(mean, -floor)), floor)
    r = be.reciprocal(mean, rng[0], rng[1])  # (B, nh, T, 1)
    return be.mul(be.mul_public(num, 1.0 / n), r)


__all__ = ["SelfAttention", "rfa_frequencies"]
