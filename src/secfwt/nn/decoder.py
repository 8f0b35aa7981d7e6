"""ONE LLaMA-architecture decoder definition (pre-RMSNorm, SiLU-gated MLP, RoPE, GQA) over any Backend.

Inputs are token embeddings already looked up (:mod:`secfwt.nn.inputs`: the data owner's local lookup or
the private one-hot product) and an optional soft prompt inserted after a fixed instruction prefix of
``prompt_at`` tokens (0: prepended):

    x = [e_0..e_{a-1}, prompt_1..prompt_P, e_a..e_{T-1}]          # (B, T + P, H), a = prompt_at
    h = x;  for each layer:  h = h + Attn(RMSNorm(h));  h = h + MLP(RMSNorm(h))

The final RMSNorm is left to the head (:mod:`secfwt.nn.decoder_heads`), which applies it to the one
selected position only. Padding is on the RIGHT and the padding mask (B, T) is public: with a causal mask no
valid position ever attends to a pad, so the logits at the last valid position equal the unpadded ones; the
last valid position of each row is public and is selected locally (docs/DECODER.md).

Attention (``AttentionConfig.kind``), always causal:
  * softmax: softmax(q k^T / sqrt(d) + causal mask) v (MPC: approx.softmax with the public mask);
  * rfa: causal random feature attention, phi(q_t) sum_{s<=t} phi(k_s) [v_s, 1]^T, in one of two forms
    (``rfa_form``): "prefix" (cumulative sums of the outer products along the sequence, local under MPC)
    or "masked" (the same sum as (phi(Q) phi(K)^T * causal) [V, 1], cheaper for T < ~2m);
  * 2quad / relu / power: the encoder's substitutes with the causal mask and per-query valid-key counts.

Usage::

    dec = Decoder.from_pretrained(model_dir, attention=AttentionConfig("softmax"))  # Decoder[Tensor]
    out = dec.forward(PlainBackend(), embeds, mask, prompt=prompt)
    dec_s = dec.map_params(be.share_plain); dec_s.forward(MpcBackend(ctx), ...)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch
from torch import Tensor

from secfwt.errors import ConfigError
from secfwt.nn.attention import _even_power, _normalise, rfa_frequencies
from secfwt.nn.backend import Backend, V
from secfwt.nn.config import AttentionConfig, AttentionKind
from secfwt.nn.inputs import check_inputs
from secfwt.nn.llama_weights import DecoderConfig, load_llama
from secfwt.nn.rope import apply_rope, rope_tables

W = TypeVar("W")
RFA_FORMS = ("prefix", "masked")
# Range of mean(x^2) at the RMSNorms under MPC. LLaMA residual streams carry "massive activations" (SmolLM2:
# |x| up to ~2.2e4 on the first token, mean(x^2) up to ~8.6e5 = 2^19.7; embeddings down to ~8e-3).
RMS_RANGE = (2.0**-12, 2.0**22)
# Public floor of causal RFA's mean normaliser phi(q_t) . mean_{s<=t} phi(k_s) (an estimate of a kernel mean
# in [exp(-2/tau^2), 1] that random features can push to <= 0). Both backends compute max(den, floor), so
# plaintext and MPC evaluate the same function and the MPC reciprocal's input stays in [floor, 1].
RFA_FLOOR = 0.02
RFA_SQ_EPS = 2.0**-16  # added to |x|^2 before RFA's l2 normalisation


def _sub(params: dict[str, V], prefix: str) -> dict[str, V]:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def causal_key_mask(mask: Tensor) -> Tensor:
    """Public (B, T) padding mask -> (B, T, T) mask[b, t, s] = [s <= t] * mask[b, s]."""
    t = mask.shape[1]
    return torch.tril(torch.ones(t, t, dtype=torch.float64)) * mask.to(torch.float64).reshape(-1, 1, t)


def check_right_padded(mask: Tensor, min_valid: int = 1) -> None:
    """Raise ValueError unless every row of the public mask is 1...1 0...0 with >= ``min_valid`` ones."""
    m = mask.to(torch.float64)
    lengths = m.sum(dim=1)
    expect = (torch.arange(m.shape[1], dtype=torch.float64) < lengths.unsqueeze(1)).to(torch.float64)
    if not torch.equal(m, expect):
        raise ValueError("attention_mask: rows must be right-padded (1...1 0...0); left padding is not supported")
    if int(lengths.min()) < min_valid:
        raise ValueError(f"attention_mask: every row needs >= {min_valid} valid tokens, got {int(lengths.min())}")


@dataclass
class CausalSelfAttention(Generic[V]):
    """Llama attention with grouped-query heads. Params: q (nh d, H), k/v (nkv d, H), o (H, nh d)."""

    cfg: DecoderConfig
    attn: AttentionConfig
    layer: int
    p: dict[str, V]
    rfa_form: str = "masked"
    rfa_floor: float = RFA_FLOOR

    def forward(self, be: Backend[V], h: V, mask: Tensor) -> V:
        """h: (B, T, H) -> (B, T, H); mask: public (B, T) 0/1, right-padded."""
        cfg = self.cfg
        b, t, _ = be.shape(h)
        nh, nkv, g, d = cfg.n_heads, cfg.n_kv_heads, cfg.group, cfg.head_dim

        def heads(x: V, n: int) -> V:
            return be.transpose(be.reshape(x, (b, t, n, d)), 1, 2)  # (B, n, T, d)

        q = heads(be.linear(h, self.p["q.weight"], None), nh)  # (B, nh, T, d)
        k = heads(be.linear(h, self.p["k.weight"], None), nkv)  # (B, nkv, T, d)
        v = heads(be.linear(h, self.p["v.weight"], None), nkv)  # (B, nkv, T, d)
        kind = self.attn.attention_kind
        # Public rotation; the softmax temperature 1/sqrt(d) rides on q's tables (RFA scales its own way).
        q_scale = 1.0 if kind is AttentionKind.RFA else 1.0 / math.sqrt(d)
        cos, sin = rope_tables(d, t, cfg.rope_theta)
        q = apply_rope(be, q, cos * q_scale, sin * q_scale)
        k = apply_rope(be, k, cos, sin)
        # GQA without repeating K/V: query head i uses kv head i // g, so group the g query heads of each kv
        # head along the sequence axis.
        q = be.reshape(q, (b, nkv, g * t, d))  # (B, nkv, g T, d)
        cmask = causal_key_mask(mask).reshape(b, 1, 1, t, t)  # (B, 1, 1, T, T)
        if kind is AttentionKind.RFA:
            ctx = self._rfa(be, q, k, v, mask, cmask)
        else:
            ctx = self._quadratic(be, kind, q, k, v, cmask)  # (B, nkv, g T, d)
        ctx = be.reshape(ctx, (b, nh, t, d))  # (B, nh, T, d)
        ctx = be.reshape(be.transpose(ctx, 1, 2), (b, t, nh * d))  # (B, T, nh d)
        return be.linear(ctx, self.p["o.weight"], None)

    def _quadratic(self, be: Backend[V], kind: AttentionKind, q: V, k: V, v: V, cmask: Tensor) -> V:
        b, nkv, gt, d = be.shape(q)
        t = be.shape(k)[2]
        g = gt // t
        s = be.reshape(be.matmul(q, be.transpose(k, -1, -2)), (b, nkv, g, t, t))  # (B, nkv, g, T, T) scores
        if kind is AttentionKind.SOFTMAX:
            probs = be.softmax(s, mask=cmask)
            return be.matmul(be.reshape(probs, (b, nkv, gt, t)), v)  # (B, nkv, g T, d)
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
        n_valid = cmask.sum(dim=-1, keepdim=True)  # (B, 1, 1, T, 1) valid keys per query
        num = be.matmul(w, be.reshape(v, (b, nkv, 1, t, d)))  # (B, nkv, g, T, d)
        if kind is AttentionKind.RELU and a.relu_norm == "length":
            out = be.mul_public(num, 1.0 / n_valid)
        else:
            den = be.sum(w, dim=-1, keepdim=True)  # (B, nkv, g, T, 1)
            eps = a.eps if kind in (AttentionKind.RELU, AttentionKind.POWER) else 0.0
            out = _normalise(be, num, den, n_valid, a.recip_range(), eps)
        return be.reshape(out, (b, nkv, gt, d))

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
            w_eff = w / (a.rfa_tau * 2.0 * math.pi)
        else:
            w_eff = w * (d ** -0.25) / (a.rfa_tau * 2.0 * math.pi)
        c, s = be.cos_sin(be.linear_public(x, w_eff))  # (..., m) each
        return be.cat([c, s], dim=-1)  # (..., 2m)

    def _rfa(self, be: Backend[V], q: V, k: V, v: V, mask: Tensor, cmask: Tensor) -> V:
        """Causal RFA (Peng et al., 2021, §3.1 causal form): out_t = phi(q_t) S_t / phi(q_t) z_t with
        S_t = sum_{s<=t} phi(k_s) v_s^T and z_t = sum_{s<=t} phi(k_s); z is S's extra column ([v, 1])."""
        if self.rfa_form not in RFA_FORMS:
            raise ConfigError(f"rfa_form: expected one of {RFA_FORMS}, got {self.rfa_form!r}")
        b, nkv, gt, d = be.shape(q)
        t = be.shape(k)[2]
        g, m = gt // t, self.attn.n_features
        phi_q = be.reshape(self._features(be, q), (b, nkv, g, t, 2 * m))  # (B, nkv, g, T, 2m)
        phi_k = self._features(be, k)  # (B, nkv, T, 2m)
        ones = be.const(torch.ones(b, nkv, t, 1, dtype=torch.float64))
        v_ext = be.mul_mask(be.cat([v, ones], dim=-1), mask.reshape(b, 1, t, 1))  # (B, nkv, T, d + 1)
        if self.rfa_form == "masked":
            a = be.matmul(phi_q, be.reshape(be.transpose(phi_k, -1, -2), (b, nkv, 1, 2 * m, t)))  # (B,nkv,g,T,T)
            out = be.matmul(be.mul_mask(a, cmask), be.reshape(v_ext, (b, nkv, 1, t, d + 1)))  # (B,nkv,g,T,d+1)
        else:
            outer = be.mul(be.reshape(phi_k, (b, nkv, t, 2 * m, 1)),
                           be.reshape(v_ext, (b, nkv, t, 1, d + 1)))  # (B, nkv, T, 2m, d + 1)
            state = be.reshape(be.cumsum(outer, dim=2), (b, nkv, 1, t, 2 * m, d + 1))  # S_t, local prefix sums
            out = be.matmul(be.reshape(phi_q, (b, nkv, g, t, 1, 2 * m)), state)  # (B, nkv, g, T, 1, d + 1)
            out = be.reshape(out, (b, nkv, g, t, d + 1))
        num = be.index(out, (Ellipsis, slice(0, d)))  # (B, nkv, g, T, d)
        den = be.index(out, (Ellipsis, slice(d, d + 1)))  # (B, nkv, g, T, 1)
        n_valid = cmask.sum(dim=-1, keepdim=True) * m  # (B, 1, 1, T, 1)
        # mean normaliser clamped from below by the public floor: max(x, c) = c + relu(x - c), one batched
        # comparison for all (B, nkv, g, T) query rows (docs/DECODER.md "Causal RFA normaliser")
        mean = be.mul_public(den, 1.0 / n_valid)  # (B, nkv, g, T, 1)
        mean = be.add_public(be.relu(be.add_public(mean, -self.rfa_floor)), self.rfa_floor)
        r = be.reciprocal(mean, self.rfa_floor, self.attn.recip_range()[1])  # input in [floor, 1]
        return be.reshape(be.mul(be.mul_public(num, 1.0 / n_valid), r), (b, nkv, gt, d))


@dataclass
class GatedMLP(Generic[V]):
    """down(silu(gate x) * up x). Params: gate/up (I, H), down (H, I)."""

    p: dict[str, V]

    def forward(self, be: Backend[V], h: V) -> V:
        gate = be.silu(be.linear(h, self.p["gate.weight"], None))  # (B, T, I)
        up = be.linear(h, self.p["up.weight"], None)  # (B, T, I)
        return be.linear(be.mul(gate, up), self.p["down.weight"], None)  # (B, T, H)


@dataclass
class DecoderLayer(Generic[V]):
    """One pre-norm block: h + Attn(RMSNorm(h)), then h + MLP(RMSNorm(h))."""

    cfg: DecoderConfig
    attn_cfg: AttentionConfig
    index: int
    p: dict[str, V]
    rfa_form: str = "masked"
    rms_range: tuple[float, float] = RMS_RANGE
    rfa_floor: float = RFA_FLOOR

    def forward(self, be: Backend[V], h: V, mask: Tensor) -> V:
        eps, rng = self.cfg.rms_norm_eps, self.rms_range
        with be.scope("rmsnorm"):
            x = be.rmsnorm(h, self.p["attn_norm.weight"], eps, rng)
        with be.scope("attention"):
            a = CausalSelfAttention(self.cfg, self.attn_cfg, self.index, _sub(self.p, "attn."), self.rfa_form,
                                    self.rfa_floor)
            h = be.add(h, a.forward(be, x, mask))
        with be.scope("rmsnorm"):
            x = be.rmsnorm(h, self.p["mlp_norm.weight"], eps, rng)
        with be.scope("ffn"):
            return be.add(h, GatedMLP(_sub(self.p, "mlp.")).forward(be, x))


@dataclass
class DecoderOutput(Generic[V]):
    """Hidden states BEFORE the final RMSNorm (B, T + P, H), the public mask (B, T + P), the prompt length
    P and where it was inserted."""

    hidden: V
    mask: Tensor
    n_prompt: int
    prompt_at: int

    def last_positions(self) -> Tensor:
        """Index of the last valid position of each row (public: the mask is public), (B,)."""
        return self.mask.sum(dim=1).long() - 1


@dataclass
class Decoder(Generic[V]):
    """A LLaMA-architecture decoder: config, attention choice, canonical params (nn/llama_weights.py)."""

    config: DecoderConfig
    params: dict[str, V]
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    rfa_form: str = "masked"
    rms_range: tuple[float, float] = RMS_RANGE
    rfa_floor: float = RFA_FLOOR

    def __post_init__(self) -> None:
        if self.rfa_form not in RFA_FORMS:
            raise ConfigError(f"rfa_form: expected one of {RFA_FORMS}, got {self.rfa_form!r}")
        if not 0.0 < self.rfa_floor < 1.0:
            raise ConfigError(f"rfa_floor: expected a value in (0, 1), got {self.rfa_floor}")

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, attention: AttentionConfig | None = None,
                        dtype: torch.dtype = torch.float64, rfa_form: str = "masked") -> Decoder[Tensor]:
        """Load a local HF Llama directory offline (every tensor mapped and shape-checked first)."""
        cfg, params = load_llama(model_dir)
        return Decoder(cfg, {k: t.to(dtype) for k, t in params.items()}, attention or AttentionConfig(), rfa_form)

    def with_attention(self, attention: AttentionConfig, rfa_form: str | None = None) -> Decoder[V]:
        return dataclasses.replace(self, attention=attention, rfa_form=rfa_form or self.rfa_form)

    def map_params(self, fn: Callable[[str, V], W], keep_word_embeddings: bool = False) -> Decoder[W]:
        """Convert the body params (e.g. to shares). ``lm_head`` and ``norm.weight`` belong to the head
        (:class:`secfwt.nn.decoder_heads.LabelWordHead`); the token table is dropped unless asked."""
        keep = {k: fn(k, t) for k, t in self.params.items()
                if k not in ("lm_head", "norm.weight") and (keep_word_embeddings or k != "emb.word")}
        return Decoder(self.config, keep, self.attention, self.rfa_form, self.rms_range, self.rfa_floor)

    def forward(self, be: Backend[V], inputs_embeds: V, attention_mask: Tensor, prompt: V | None = None,
                prompt_at: int = 0) -> DecoderOutput[V]:
        """inputs_embeds (B, T, H); attention_mask public (B, T), right-padded; prompt (P, H) or (B, P, H)
        inserted after the first ``prompt_at`` tokens (a fixed instruction prefix every row shares)."""
        cfg = self.config
        b, t = check_inputs(be, inputs_embeds, attention_mask, cfg.hidden)
        check_right_padded(attention_mask, min_valid=max(prompt_at, 1))
        x, n_prompt = insert_prompt(be, inputs_embeds, prompt, prompt_at)  # (B, T + P, H)
        if t + n_prompt > cfg.max_positions:
            raise ValueError(f"sequence of {t} tokens + {n_prompt} prompt vectors exceeds the model's "
                             f"{cfg.max_positions} positions")
        m = attention_mask.to(torch.float64)
        mask = torch.cat([m[:, :prompt_at], torch.ones(b, n_prompt, dtype=torch.float64), m[:, prompt_at:]], 1)
        for i in range(cfg.n_layers):
            layer = DecoderLayer(cfg, self.attention, i, _sub(self.params, f"layer.{i}."), self.rfa_form,
                                 self.rms_range, self.rfa_floor)
            x = layer.forward(be, x, mask)
        return DecoderOutput(x, mask, n_prompt, prompt_at)


def insert_prompt(be: Backend[V], x: V, prompt: V | None, at: int) -> tuple[V, int]:
    """x (B, T, H) -> (B, T + P, H) with the prompt (P, H) or (B, P, H) after the first ``at`` tokens."""
    if prompt is None:
        return x, 0
    b, t, h = be.shape(x)
    ps = be.shape(prompt)
    if len(ps) == 2:
        prompt = be.expand(be.reshape(prompt, (1, ps[0], ps[1])), (b, ps[0], ps[1]))  # (B, P, H)
    ps = be.shape(prompt)
    if len(ps) != 3 or ps[0] != b or ps[2] != h:
        raise ValueError(f"prompt: expected shape (P, {h}) or ({b}, P, {h}), got {ps}")
    if not 0 <= at <= t:
        raise ValueError(f"prompt_at: must be in [0, {t}], got {at}")
    head = be.index(x, (slice(None), slice(0, at)))  # (B, a, H)
    tail = be.index(x, (slice(None), slice(at, t)))  # (B, T - a, H)
    return be.cat([head, prompt, tail], dim=1), ps[1]


__all__ = ["CausalSelfAttention", "Decoder", "DecoderLayer", "DecoderOutput", "GatedMLP", "RFA_FLOOR", "RFA_FORMS",
           "RMS_RANGE", "causal_key_mask", "check_right_padded", "insert_prompt"]
