"""Causal self-attention of the LLaMA decoder (GQA, RoPE, selectable mechanism), with an optional prefix cache.

Queries attend to two key sets, both causal and masked by the public padding mask:

* their own rows' keys (R, nkv, Ts, d): the usual causal attention over the sequence being run;
* optionally a **prefix** shared by groups of ``per`` consecutive rows (U = R / per prefixes, (U, nkv, Tp, d)):
  keys and values computed once by :meth:`secfwt.nn.decoder.Decoder.prefill` and reused by every row of the
  group. Forward-only tuning runs P candidate prompts on the same example: with the prompt placed after the
  example's text, the text's keys and values do not depend on the candidate, so they are computed once per
  example and each candidate runs only its prompt and the template's tail (docs/DECODER.md, "Prefix cache").

Scores against the prefix come from ONE product per prefix, the queries of the group's rows stacked along the
sequence axis (as the g query heads of a KV head are for GQA): (U, nkv, per g Tq, d) @ (U, nkv, d, Tp), so under
MPC each prefix's keys and values are opened once per product, not once per row. The two score blocks are
concatenated along the key axis, so the mechanism (softmax over all keys, or a substitute and its normaliser)
sees every key exactly as the uncached forward does; the value product is split the same way.

Mechanisms (``AttentionConfig.kind``): softmax, rfa (causal random features, Peng et al. 2021 §3.1; forms
"masked" (phi(Q) phi(K)^T * causal) [V, 1] or "prefix" (cumulative sums of phi(k_s) [v_s, 1]^T), both equal;
with a prefix cache the masked form is used, the prefix's features phi(k) being cached), 2quad, relu, power.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generic

import torch
from torch import Tensor

from secfwt.errors import ConfigError
from secfwt.nn.attention import _even_power, _normalise, rfa_frequencies
from secfwt.nn.backend import Backend, V
from secfwt.nn.config import AttentionConfig, AttentionKind
from secfwt.nn.llama_weights import DecoderConfig
from secfwt.nn.rope import apply_rope, rope_tables

RFA_FORMS = ("prefix", "masked")
# Public floor of causal RFA's mean normaliser phi(q_t) . mean_{s<=t} phi(k_s) (an estimate of a kernel mean
# in [exp(-2/tau^2), 1] that random features can push to <= 0). Both backends compute max(den, floor), so
# plaintext and MPC evaluate the same function and the MPC reciprocal's input stays in [floor, 1].
RFA_FLOOR = 0.02
RFA_SQ_EPS = 2.0**-16  # added to |x|^2 before RFA's l2 normalisation


def causal_key_mask(mask: Tensor) -> Tensor:
    """Public (B, T) padding mask -> (B, T, T) mask[b, t, s] = [s <= t] * mask[b, s]."""
    t = mask.shape[1]
    return torch.tril(torch.ones(t, t, dtype=torch.float64)) * mask.to(torch.float64).reshape(-1, 1, t)


def rope_at(head_dim: int, positions: Tensor, theta: float, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """RoPE tables (B, 1, T, d) for public integer positions (B, T) (:func:`secfwt.nn.rope.rope_tables`)."""
    cos, sin = rope_tables(head_dim, int(positions.max()) + 1, theta, scale)
    b, t = positions.shape
    return cos[positions].reshape(b, 1, t, head_dim), sin[positions].reshape(b, 1, t, head_dim)


@dataclass
class LayerKV(Generic[V]):
    """One layer's cached key side of U prefixes: key features (U, nkv, Tp, e) (rotated keys; RFA: phi(k))
    and values (U, nkv, Tp, d); the public right-padded prefix mask is the cache's."""

    keys: V
    values: V


def _group(be: Backend[V], x: V, per: int) -> V:
    """(R, nkv, M, e) -> (U, nkv, per M, e): the rows of each group of ``per`` stacked along the sequence."""
    r, n, m, e = be.shape(x)
    y = be.transpose(be.reshape(x, (r // per, per, n, m, e)), 1, 2)  # (U, nkv, per, M, e)
    return be.reshape(y, (r // per, n, per * m, e))


def _ungroup(be: Backend[V], x: V, per: int) -> V:
    """Inverse of :func:`_group`: (U, nkv, per M, e) -> (R, nkv, M, e)."""
    u, n, pm, e = be.shape(x)
    y = be.transpose(be.reshape(x, (u, n, per, pm // per, e)), 1, 2)  # (U, per, nkv, M, e)
    return be.reshape(y, (u * per, n, pm // per, e))


@dataclass
class Keys(Generic[V]):
    """What R query rows attend to: their own keys/values (R, nkv, Ts, .) and an optional shared prefix
    (U, nkv, Tp, .) for groups of ``per`` rows; ``mask`` (R, 1, 1, Tq, Tp + Ts) public, prefix columns first."""

    own_k: V
    own_v: V
    mask: Tensor
    prefix: LayerKV[V] | None = None
    prefix_mask: Tensor | None = None  # (U, Tp) public
    per: int = 1
    own_kf: V | None = None  # the own keys' features if already computed (RFA: phi(k))

    def products(self, be: Backend[V], qf: V, prefix_kf: V | None, own_kf: V) -> V:
        """Pairwise products (R, nkv, g, Tq, Tp + Ts) of query features (R, nkv, g Tq, e) with the key
        features of the prefix (U, nkv, Tp, e) and of the rows (R, nkv, Ts, e)."""
        r, n, gt, _ = be.shape(qf)
        tq = self.mask.shape[-2]
        own = be.reshape(be.matmul(qf, be.transpose(own_kf, -1, -2)), (r, n, gt // tq, tq, -1))
        if prefix_kf is None:
            return own
        pre = be.matmul(_group(be, qf, self.per), be.transpose(prefix_kf, -1, -2))  # (U, nkv, per g Tq, Tp)
        pre = be.reshape(_ungroup(be, pre, self.per), (r, n, gt // tq, tq, -1))  # (R, nkv, g, Tq, Tp)
        return be.cat([pre, own], dim=-1)

    def weighted(self, be: Backend[V], w: V, prefix_v: V | None, own_v: V) -> V:
        """sum over keys of w (R, nkv, g, Tq, Tp + Ts) times values -> (R, nkv, g Tq, c)."""
        r, n, g, tq, tk = be.shape(w)
        ts = be.shape(own_v)[2]
        if prefix_v is None:
            return be.matmul(be.reshape(w, (r, n, g * tq, tk)), own_v)
        tp = tk - ts
        w_pre = be.reshape(be.index(w, (Ellipsis, slice(0, tp))), (r, n, g * tq, tp))
        w_own = be.reshape(be.index(w, (Ellipsis, slice(tp, tk))), (r, n, g * tq, ts))
        pre = _ungroup(be, be.matmul(_group(be, w_pre, self.per), prefix_v), self.per)  # (R, nkv, g Tq, c)
        return be.add(pre, be.matmul(w_own, own_v))


@dataclass
class CausalSelfAttention(Generic[V]):
    """Llama attention with grouped-query heads. Params: q (nh d, H), k/v (nkv d, H), o (H, nh d)."""

    cfg: DecoderConfig
    attn: AttentionConfig
    layer: int
    p: dict[str, V]
    rfa_form: str = "masked"
    rfa_floor: float = RFA_FLOOR

    @property
    def kind(self) -> AttentionKind:
        return self.attn.attention_kind

    def _heads(self, be: Backend[V], x: V, n: int) -> V:
        b, t, _ = be.shape(x)
        return be.transpose(be.reshape(x, (b, t, n, self.cfg.head_dim)), 1, 2)  # (B, n, T, d)

    def keys_values(self, be: Backend[V], h: V, positions: Tensor) -> tuple[V, V]:
        """Rotated keys (B, nkv, T, d) and values (B, nkv, T, d) of h (B, T, H) at public positions (B, T)."""
        cfg = self.cfg
        k = self._heads(be, be.linear(h, self.p["k.weight"], None), cfg.n_kv_heads)
        v = self._heads(be, be.linear(h, self.p["v.weight"], None), cfg.n_kv_heads)
        cos, sin = rope_at(cfg.head_dim, positions, cfg.rope_theta)
        return apply_rope(be, k, cos, sin), v

    def key_features(self, be: Backend[V], k: V) -> V:
        """What the mechanism multiplies queries with: k itself, or RFA's phi(k) (what a prefix cache keeps)."""
        return self._features(be, k) if self.kind is AttentionKind.RFA else k

    def forward(self, be: Backend[V], h: V, mask: Tensor, positions: Tensor | None = None,
                kv: tuple[V, V, V | None] | None = None, prefix: LayerKV[V] | None = None,
                prefix_mask: Tensor | None = None, per: int = 1, query_last: bool = False) -> V:
        """h: (R, T, H) -> (R, T, H) (or (R, 1, H) with ``query_last``). mask: public (R, T), right-padded;
        positions (R, T) default 0..T-1; ``kv``: this call's own (k, v, key features or None) if already
        computed (:meth:`keys_values`, :meth:`key_features`); ``prefix``/``prefix_mask`` (U, Tp): a cached
        prefix for groups of ``per`` rows; ``query_last``: only the last position queries (the rows' last
        token is all a head reads)."""
        cfg = self.cfg
        r, t, _ = be.shape(h)
        nh, nkv, g, d = cfg.n_heads, cfg.n_kv_heads, cfg.group, cfg.head_dim
        if positions is None:
            positions = torch.arange(t).expand(r, t)
        k, v, kf = kv if kv is not None else (*self.keys_values(be, h, positions), None)
        own = causal_key_mask(mask)  # (R, T, T)
        hq, qpos = h, positions
        if query_last:
            hq, qpos, own = be.index(h, (slice(None), slice(t - 1, t))), positions[:, t - 1:], own[:, t - 1:]
        tq = be.shape(hq)[1]
        # Public rotation; the softmax temperature 1/sqrt(d) rides on q's tables (RFA scales its own way).
        q_scale = 1.0 if self.kind is AttentionKind.RFA else 1.0 / math.sqrt(d)
        cos, sin = rope_at(d, qpos, cfg.rope_theta, q_scale)
        q = apply_rope(be, self._heads(be, be.linear(hq, self.p["q.weight"], None), nh), cos, sin)
        # GQA without repeating K/V: query head i uses kv head i // g, so the g query heads of each kv head are
        # grouped along the sequence axis.
        q = be.reshape(q, (r, nkv, g * tq, d))  # (R, nkv, g Tq, d)
        if prefix is not None:
            assert prefix_mask is not None
            pm = prefix_mask.to(torch.float64).repeat_interleave(per, dim=0).reshape(r, 1, -1)  # (R, 1, Tp)
            own = torch.cat([pm.expand(r, tq, pm.shape[-1]), own], dim=-1)  # (R, Tq, Tp + T)
        keys = Keys(k, v, own.reshape(r, 1, 1, tq, -1), prefix, prefix_mask, per, kf)
        rfa = self.kind is AttentionKind.RFA
        out = self._rfa(be, q, keys, mask) if rfa else self._quadratic(be, q, keys)  # (R, nkv, g Tq, d)
        out = be.reshape(be.transpose(be.reshape(out, (r, nh, tq, d)), 1, 2), (r, tq, nh * d))  # (R, Tq, nh d)
        return be.linear(out, self.p["o.weight"], None)

    def _quadratic(self, be: Backend[V], q: V, keys: Keys[V]) -> V:
        kind, cmask = self.kind, keys.mask
        pk, pv = (keys.prefix.keys, keys.prefix.values) if keys.prefix is not None else (None, None)
        s = keys.products(be, q, pk, keys.own_k)  # (R, nkv, g, Tq, Tk) scores
        if kind is AttentionKind.SOFTMAX:
            return keys.weighted(be, be.softmax(s, mask=cmask), pv, keys.own_v)  # (R, nkv, g Tq, d)
        a = self.attn
        if kind is AttentionKind.TWO_QUAD:
            w = be.square(be.add_public(s, a.quad_c))
        elif kind is AttentionKind.RELU:
            w = be.relu(s)
        elif kind is AttentionKind.POWER:
            w = _even_power(be, s, a.power)
        else:
            raise AssertionError(kind)
        w = be.mul_mask(w, cmask)  # causal + padding: masked keys weigh 0
        n_valid = cmask.sum(dim=-1, keepdim=True)  # (R, 1, 1, Tq, 1) valid keys per query
        r, n, g, tq, _ = be.shape(w)
        num = be.reshape(keys.weighted(be, w, pv, keys.own_v), (r, n, g, tq, -1))  # (R, nkv, g, Tq, d)
        if kind is AttentionKind.RELU and a.relu_norm == "length":
            out = be.mul_public(num, 1.0 / n_valid)
        else:
            den = be.sum(w, dim=-1, keepdim=True)  # (R, nkv, g, Tq, 1)
            eps = a.eps if kind in (AttentionKind.RELU, AttentionKind.POWER) else 0.0
            out = _normalise(be, num, den, n_valid, a.recip_range(), eps)
        return be.reshape(out, (r, n, g * tq, -1))

    def _features(self, be: Backend[V], x: V) -> V:
        """phi(x) = [cos(W x'), sin(W x')] (..., 2m): the encoder's RFA feature map (nn/attention.py) with
        x' = x / (tau |x|) ("l2") or x d^-1/4 / tau ("scale"); the 1/(2 pi) of Π_cosine folded into W."""
        a = self.attn
        d = be.shape(x)[-1]
        w = rfa_frequencies(a.n_features, d, a.seed + self.layer, a.orthogonal)  # (m, d), public
        if a.rfa_norm == "l2":
            lo, hi = a.rfa_sq_range
            # + one fixed-point ulp: an all-zero row (e.g. a zero-initialised pad embedding) stays finite
            sq = be.add_public(be.sum(be.square(x), dim=-1, keepdim=True), RFA_SQ_EPS)
            x = be.mul(x, be.rsqrt(sq, lo, hi))
            w_eff = w / (a.tau_at(self.layer) * 2.0 * math.pi)
        else:
            w_eff = w * (d ** -0.25) / (a.tau_at(self.layer) * 2.0 * math.pi)
        c, s = be.cos_sin(be.linear_public(x, w_eff))  # (..., m) each
        return be.cat([c, s], dim=-1)  # (..., 2m)

    def _rfa(self, be: Backend[V], q: V, keys: Keys[V], mask: Tensor) -> V:
        """Causal RFA (Peng et al., 2021, §3.1 causal form): out_t = phi(q_t) S_t / phi(q_t) z_t with
        S_t = sum_{s<=t} phi(k_s) v_s^T and z_t = sum_{s<=t} phi(k_s); z is S's extra column ([v, 1])."""
        if self.rfa_form not in RFA_FORMS:
            raise ConfigError(f"rfa_form: expected one of {RFA_FORMS}, got {self.rfa_form!r}")
        r, nkv, gtq, d = be.shape(q)
        t = be.shape(keys.own_k)[2]
        cmask = keys.mask  # (R, 1, 1, Tq, Tk)
        tq = cmask.shape[-2]
        g, m = gtq // tq, self.attn.n_features
        phi_q = self._features(be, q)  # (R, nkv, g Tq, 2m)
        phi_k = keys.own_kf if keys.own_kf is not None else self._features(be, keys.own_k)  # (R, nkv, T, 2m)

        def ext(v: V, valid: Tensor) -> V:  # [v, 1] with padded keys zeroed
            n, c = be.shape(v)[0], be.shape(v)[2]
            ones = be.const(torch.ones(n, nkv, c, 1, dtype=torch.float64))
            return be.mul_mask(be.cat([v, ones], dim=-1), valid.reshape(n, 1, c, 1))

        v_ext = ext(keys.own_v, mask)  # (R, nkv, T, d + 1)
        if self.rfa_form == "masked" or keys.prefix is not None or tq != t:
            pre_k = pre_v = None
            if keys.prefix is not None:
                assert keys.prefix_mask is not None
                pre_k, pre_v = keys.prefix.keys, ext(keys.prefix.values, keys.prefix_mask)
            a = be.mul_mask(keys.products(be, phi_q, pre_k, phi_k), cmask)  # (R, nkv, g, Tq, Tk)
            out = be.reshape(keys.weighted(be, a, pre_v, v_ext), (r, nkv, g, tq, d + 1))
        else:
            outer = be.mul(be.reshape(phi_k, (r, nkv, t, 2 * m, 1)),
                           be.reshape(v_ext, (r, nkv, t, 1, d + 1)))  # (R, nkv, T, 2m, d + 1)
            state = be.reshape(be.cumsum(outer, dim=2), (r, nkv, 1, t, 2 * m, d + 1))  # S_t, local prefix sums
            out = be.matmul(be.reshape(phi_q, (r, nkv, g, t, 1, 2 * m)), state)  # (R, nkv, g, T, 1, d + 1)
            out = be.reshape(out, (r, nkv, g, t, d + 1))
        num = be.index(out, (Ellipsis, slice(0, d)))  # (R, nkv, g, Tq, d)
        den = be.index(out, (Ellipsis, slice(d, d + 1)))  # (R, nkv, g, Tq, 1)
        n_valid = cmask.sum(dim=-1, keepdim=True) * m  # (R, 1, 1, Tq, 1)
        # mean normaliser clamped from below by the public floor: max(x, c) = c + relu(x - c), one batched
        # comparison for all (R, nkv, g, Tq) query rows (docs/DECODER.md "Causal RFA normaliser")
        mean = be.mul_public(den, 1.0 / n_valid)  # (R, nkv, g, Tq, 1)
        mean = be.add_public(be.relu(be.add_public(mean, -self.rfa_floor)), self.rfa_floor)
        r_inv = be.reciprocal(mean, self.rfa_floor, self.attn.recip_range()[1])  # input in [floor, 1]
        return be.reshape(be.mul(be.mul_public(num, 1.0 / n_valid), r_inv), (r, nkv, gtq, d))


__all__ = ["RFA_FLOOR", "RFA_FORMS", "CausalSelfAttention", "Keys", "LayerKV", "causal_key_mask", "rope_at"]
