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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch
from torch import Tensor

from secfwt.errors import ConfigError
from secfwt.nn.backend import Backend, V
from secfwt.nn.config import AttentionConfig, AttentionKind
from secfwt.nn.decoder_attention import RFA_FLOOR, RFA_FORMS, CausalSelfAttention, LayerKV, causal_key_mask
from secfwt.nn.inputs import check_inputs, insert_prompt
from secfwt.nn.llama_weights import DecoderConfig, load_llama

W = TypeVar("W")
# Range of mean(x^2) at the RMSNorms under MPC. LLaMA residual streams carry "massive activations" (SmolLM2:
# |x| up to ~2.2e4 on the first token, mean(x^2) up to ~8.6e5 = 2^19.7; embeddings down to ~8e-3).
RMS_RANGE = (2.0**-12, 2.0**22)


def _sub(params: dict[str, V], prefix: str) -> dict[str, V]:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


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

    def attention(self) -> CausalSelfAttention[V]:
        return CausalSelfAttention(self.cfg, self.attn_cfg, self.index, _sub(self.p, "attn."), self.rfa_form,
                                   self.rfa_floor)

    def forward(self, be: Backend[V], h: V, mask: Tensor) -> V:
        out, _ = self.run(be, h, mask)
        assert out is not None
        return out

    def run(self, be: Backend[V], h: V, mask: Tensor, *, positions: Tensor | None = None,
            prefix: LayerKV[V] | None = None, prefix_mask: Tensor | None = None, per: int = 1,
            query_last: bool = False, keep_kv: bool = False,
            kv_only: bool = False) -> tuple[V | None, LayerKV[V] | None]:
        """(new h, this layer's key side if ``keep_kv``). h (R, T, H) -> (R, T, H), or (R, 1, H) with
        ``query_last`` (only the last position goes on); ``kv_only``: the key side alone, no output (the
        last layer of a prefix: nothing reads its outputs). Prefix arguments: :meth:`CausalSelfAttention.forward`."""
        eps, rng = self.cfg.rms_norm_eps, self.rms_range
        if positions is None:
            positions = torch.arange(be.shape(h)[1]).expand(be.shape(h)[0], -1)
        with be.scope("rmsnorm"):
            x = be.rmsnorm(h, self.p["attn_norm.weight"], eps, rng)
        with be.scope("attention"):
            a = self.attention()
            k, v = a.keys_values(be, x, positions)
            kf = a.key_features(be, k) if (keep_kv or kv_only or a.kind is AttentionKind.RFA) else None
            kv = LayerKV(kf if kf is not None else k, v) if (keep_kv or kv_only) else None
            if kv_only:
                return None, kv
            out = a.forward(be, x, mask, positions, kv=(k, v, kf), prefix=prefix, prefix_mask=prefix_mask,
                            per=per, query_last=query_last)
            if query_last:
                t = be.shape(h)[1]
                h = be.index(h, (slice(None), slice(t - 1, t)))
            h = be.add(h, out)
        with be.scope("rmsnorm"):
            x = be.rmsnorm(h, self.p["mlp_norm.weight"], eps, rng)
        with be.scope("ffn"):
            return be.add(h, GatedMLP(_sub(self.p, "mlp.")).forward(be, x)), kv


@dataclass
class PrefixCache(Generic[V]):
    """The key side of U prefixes at every layer (:class:`LayerKV`, (U, nkv, Tp, .)) and their public
    right-padded mask (U, Tp): what :meth:`Decoder.prefill` computes once and :meth:`Decoder.forward_cached`
    reuses for every candidate prompt."""

    layers: list[LayerKV[V]]
    mask: Tensor

    @property
    def lengths(self) -> Tensor:
        """Valid tokens of each prefix (U,)."""
        return self.mask.to(torch.float64).sum(dim=1).long()

    def split(self, be: Backend[V]) -> list[PrefixCache[V]]:
        """One cache per prefix, each cut to its own length."""
        out = []
        for u, n in enumerate(self.lengths.tolist()):
            sel = (slice(u, u + 1), slice(None), slice(0, n))
            out.append(PrefixCache([LayerKV(be.index(kv.keys, sel), be.index(kv.values, sel)) for kv in self.layers],
                                   self.mask[u : u + 1, :n]))
        return out

    @staticmethod
    def stack(be: Backend[V], caches: list[PrefixCache[V]]) -> PrefixCache[V]:
        """Caches of one prefix each (:meth:`split`), right-padded to the longest and stacked (U, ...)."""
        t = max(c.mask.shape[1] for c in caches)

        def pad(x: V, n: int) -> V:
            if n == t:
                return x
            shape = list(be.shape(x))
            shape[2] = t - n
            return be.cat([x, be.const(torch.zeros(shape, dtype=torch.float64))], dim=2)

        layers = []
        for i in range(len(caches[0].layers)):
            ks = [pad(c.layers[i].keys, c.mask.shape[1]) for c in caches]
            vs = [pad(c.layers[i].values, c.mask.shape[1]) for c in caches]
            layers.append(LayerKV(be.cat(ks, dim=0), be.cat(vs, dim=0)))
        mask = torch.zeros(len(caches), t, dtype=torch.float64)
        for u, c in enumerate(caches):
            mask[u, : c.mask.shape[1]] = c.mask[0].to(torch.float64)
        return PrefixCache(layers, mask)


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
        for layer in self.layers():
            x = layer.forward(be, x, mask)
        return DecoderOutput(x, mask, n_prompt, prompt_at)

    def layers(self) -> list[DecoderLayer[V]]:
        return [DecoderLayer(self.config, self.attention, i, _sub(self.params, f"layer.{i}."), self.rfa_form,
                             self.rms_range, self.rfa_floor) for i in range(self.config.n_layers)]

    def prefill(self, be: Backend[V], inputs_embeds: V, attention_mask: Tensor) -> PrefixCache[V]:
        """Run U prefixes (U, Tp, H) (public right-padded mask (U, Tp)) and keep every layer's key side:
        the keys (RFA: their features phi(k)) and values. The last layer computes only its keys and values
        (no later layer reads its outputs)."""
        cfg = self.config
        check_inputs(be, inputs_embeds, attention_mask, cfg.hidden)
        check_right_padded(attention_mask)
        mask = attention_mask.to(torch.float64)
        if mask.shape[1] > cfg.max_positions:
            raise ValueError(f"prefix of {mask.shape[1]} tokens exceeds the model's {cfg.max_positions} positions")
        x: V | None = inputs_embeds
        kvs = []
        for layer in self.layers():
            assert x is not None
            x, kv = layer.run(be, x, mask, keep_kv=True, kv_only=layer.index == cfg.n_layers - 1)
            assert kv is not None
            kvs.append(kv)
        return PrefixCache(kvs, mask)

    def forward_cached(self, be: Backend[V], cache: PrefixCache[V], tail: V, prompt: V | None = None,
                       per: int = 1) -> DecoderOutput[V]:
        """Continue U cached prefixes with ``per`` rows each: row r = u * per + c is prefix u followed by
        prompt r (R = U per rows, (R, P, H), or None) and the tail (S, H) (the template's end, the same for
        every row). Positions continue each prefix (public lengths). Only the last position is computed in
        the last layer: the returned hidden states are (R, 1, H), what the label-word head reads."""
        cfg = self.config
        u = cache.mask.shape[0]
        r = u * per
        ts = be.shape(tail)
        if len(ts) != 2 or ts[1] != cfg.hidden:
            raise ValueError(f"tail: expected shape (S, {cfg.hidden}), got {ts}")
        x = be.expand(be.reshape(tail, (1, ts[0], ts[1])), (r, ts[0], ts[1]))  # (R, S, H)
        x, n_prompt = insert_prompt(be, x, prompt, 0)  # (R, P + S, H)
        t = n_prompt + ts[0]
        if t < 1:
            raise ValueError("forward_cached: no tokens after the prefix (empty tail and no prompt)")
        if int(cache.lengths.max()) + t > cfg.max_positions:
            raise ValueError(f"prefix of {int(cache.lengths.max())} tokens + {t} exceeds the model's "
                             f"{cfg.max_positions} positions")
        positions = cache.lengths.repeat_interleave(per).reshape(r, 1) + torch.arange(t).reshape(1, t)  # (R, T)
        mask = torch.ones(r, t, dtype=torch.float64)
        h: V | None = x
        for layer, kv in zip(self.layers(), cache.layers, strict=True):
            assert h is not None
            h, _ = layer.run(be, h, mask, positions=positions, prefix=kv, prefix_mask=cache.mask, per=per,
                             query_last=layer.index == cfg.n_layers - 1)
        assert h is not None
        return DecoderOutput(h, torch.ones(r, 1, dtype=torch.float64), n_prompt, -1)


__all__ = ["CausalSelfAttention", "Decoder", "DecoderLayer", "DecoderOutput", "GatedMLP", "PrefixCache", "RFA_FLOOR",
           "RFA_FORMS", "RMS_RANGE", "causal_key_mask", "check_right_padded", "insert_prompt"]
