"""Typed, frozen configurations of the encoder and of its attention.

:class:`EncoderConfig` describes a BERT-family encoder (BERT, RoBERTa, DistilBERT) independently of the
HuggingFace class names; :func:`EncoderConfig.from_hf` reads it from a local ``config.json`` through
``transformers.AutoConfig`` (offline) and rejects what the model definition does not implement.
:class:`AttentionConfig` selects the attention mechanism (see docs/ATTENTION.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from secfwt.errors import ConfigError

SUPPORTED_ARCHS = ("bert", "roberta", "distilbert")
SUPPORTED_ACTS = ("gelu", "relu")


class AttentionKind(StrEnum):
    """Attention mechanisms (docs/ATTENTION.md gives each one's formula, MPC cost and measured error)."""

    SOFTMAX = "softmax"  # exact softmax(q k^T / sqrt(d)) (MPC: approx.softmax)
    RFA = "rfa"  # random feature attention, linear in the sequence length (SecFwT)
    TWO_QUAD = "2quad"  # MPCFormer: (s + c)^2 normalised by its sum
    RELU = "relu"  # relu(s) normalised by its sum or by the number of keys
    POWER = "power"  # Power-Softmax: s^p (p even) normalised by its sum


@dataclass(frozen=True)
class AttentionConfig:
    """Which attention to run, with its parameters.

    Attributes:
        kind: the mechanism (a string is accepted and converted).
        n_features: RFA: number m of random frequencies (the feature map has 2m entries).
        seed: RFA: public seed of the random frequencies (layer ``l`` uses ``seed + l``).
        orthogonal: RFA: draw the frequencies as blocks of orthogonal directions with chi-distributed norms
            (orthogonal random features, lower variance than i.i.d. Gaussian rows).
        rfa_norm: RFA: "l2" (Peng et al.: queries and keys l2-normalised, kernel exp(cos(q, k) / tau^2))
            or "scale" (q, k scaled by d^-1/4 / tau: Gaussian kernel exp(-|q - k|^2 / (2 tau^2 sqrt(d))),
            the shift-invariant part of exp(q.k / sqrt(d))). docs/ATTENTION.md explains the choice.
        rfa_tau: RFA: temperature tau (folded into the public frequencies).
        rfa_tau_layers: RFA: one temperature per layer (layer ``l`` uses ``rfa_tau_layers[l]``; empty = ``rfa_tau``
            everywhere). A calibration the model owner fits once on public text so RFA attention matches the
            pretrained softmax attention (benchmarks/budget_curve.py ``fit_rfa_taus``); like ``rfa_tau`` it only
            scales the public frequencies, so the protocol, its rounds and bytes are unchanged.
        rfa_sq_range: RFA "l2": input range of the MPC rsqrt of |q|^2 and |k|^2.
        quad_c: 2quad: the shift c in (s + c)^2 (MPCFormer uses 5).
        relu_norm: relu: "sum" (divide by the sum of the weights) or "length" (by the number of keys).
        power: power: the even exponent p.
        recip_lo, recip_hi: input range of the MPC reciprocal of the normaliser, which is divided by the
            number of valid keys first (and by m for RFA) so it does not depend on the sequence length.
        eps: added to the mean normaliser of relu/power (keeps the reciprocal's input away from zero).
        rfa_floor: RFA: public floor of the mean normaliser, max(den, floor) on both backends (0 = off). The
            random-feature estimate of a kernel mean in [exp(-2/tau^2), 1] can fall to or below 0 for some
            queries of a pretrained model; plaintext would divide by it, the MPC reciprocal cannot (its range
            starts at the floor). With the floor both compute the same function.
    """

    kind: AttentionKind | str = AttentionKind.SOFTMAX
    n_features: int = 64
    seed: int = 0
    orthogonal: bool = True
    rfa_norm: str = "l2"
    rfa_tau: float = 0.8
    rfa_tau_layers: tuple[float, ...] = ()
    rfa_sq_range: tuple[float, float] = (0.25, 4096.0)
    rfa_floor: float = 0.02
    quad_c: float = 5.0
    relu_norm: str = "sum"
    power: int = 2
    recip_lo: float | None = None
    recip_hi: float | None = None
    eps: float = 1e-3

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", AttentionKind(self.kind))
        except ValueError:
            names = ", ".join(k.value for k in AttentionKind)
            raise ConfigError(f"attention kind: unknown {self.kind!r} (expected one of {names})") from None
        if self.n_features < 1:
            raise ConfigError(f"attention n_features: must be >= 1, got {self.n_features}")
        if self.power < 2 or self.power % 2:
            raise ConfigError(f"attention power: must be an even integer >= 2, got {self.power}")
        if self.rfa_norm not in ("l2", "scale"):
            raise ConfigError(f"attention rfa_norm: expected 'l2' or 'scale', got {self.rfa_norm!r}")
        if not 0.0 <= self.rfa_floor < 1.0:
            raise ConfigError(f"attention rfa_floor: expected a value in [0, 1), got {self.rfa_floor}")
        if self.rfa_tau <= 0:
            raise ConfigError(f"attention rfa_tau: must be > 0, got {self.rfa_tau}")
        object.__setattr__(self, "rfa_tau_layers", tuple(float(t) for t in self.rfa_tau_layers))
        bad = [t for t in self.rfa_tau_layers if not t > 0]
        if bad:
            raise ConfigError(f"attention rfa_tau_layers: every temperature must be > 0, got {bad[0]}")
        if self.relu_norm not in ("sum", "length"):
            raise ConfigError(f"attention relu_norm: expected 'sum' or 'length', got {self.relu_norm!r}")

    @property
    def attention_kind(self) -> AttentionKind:
        return AttentionKind(self.kind)

    def tau_at(self, layer: int) -> float:
        """RFA temperature of ``layer``: ``rfa_tau_layers[layer]`` when given, else ``rfa_tau``."""
        if not self.rfa_tau_layers:
            return self.rfa_tau
        if not 0 <= layer < len(self.rfa_tau_layers):
            raise ConfigError(f"attention rfa_tau_layers: {len(self.rfa_tau_layers)} temperatures, no entry for "
                              f"layer {layer} (give one per layer of the model)")
        return self.rfa_tau_layers[layer]

    def recip_range(self) -> tuple[float, float]:
        """Range of the (mean) normaliser fed to the MPC reciprocal, per mechanism unless overridden."""
        defaults = {
            AttentionKind.RFA: (self.rfa_floor or 1e-3, 2.0),
            AttentionKind.TWO_QUAD: (1.0, 2048.0),
            AttentionKind.RELU: (self.eps, 64.0),
            AttentionKind.POWER: (self.eps, 4096.0),
            AttentionKind.SOFTMAX: (1.0, 1.0),
        }
        lo, hi = defaults[self.attention_kind]
        return (self.recip_lo if self.recip_lo is not None else lo,
                self.recip_hi if self.recip_hi is not None else hi)


def read_hf_config(model_dir: str | Path) -> tuple[Any, str]:
    """(the HuggingFace config, the path of its config.json) of a local model directory, offline."""
    from transformers import AutoConfig

    path = Path(model_dir)
    src = str(path / "config.json")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{src}: no config.json in the model directory")
    return AutoConfig.from_pretrained(str(path), local_files_only=True), src


@dataclass(frozen=True)
class EncoderConfig:
    """Shape and conventions of a BERT-family encoder.

    ``position_offset`` is the first position id (RoBERTa: ``pad_token_id + 1``, others 0);
    ``type_vocab_size`` is 0 when the model has no token-type embeddings (DistilBERT).
    """

    arch: str
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    intermediate: int
    max_positions: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    act: str = "gelu"
    pad_token_id: int = 0
    position_offset: int = 0
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = f" ({self.source})" if self.source else ""
        if self.arch not in SUPPORTED_ARCHS:
            raise ConfigError(f"model_type{where}: unsupported architecture {self.arch!r} "
                              f"(supported: {', '.join(SUPPORTED_ARCHS)})")
        if self.act not in SUPPORTED_ACTS:
            raise ConfigError(f"hidden_act{where}: unsupported activation {self.act!r} "
                              f"(supported: {', '.join(SUPPORTED_ACTS)})")
        if self.hidden % self.n_heads:
            raise ConfigError(f"hidden_size{where}: {self.hidden} is not a multiple of "
                              f"num_attention_heads {self.n_heads}")

    @property
    def head_size(self) -> int:
        return self.hidden // self.n_heads

    @property
    def max_tokens(self) -> int:
        """Longest sequence (prompt included) the position table can encode."""
        return self.max_positions - self.position_offset

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_size)

    @classmethod
    def from_hf(cls, model_dir: str | Path) -> EncoderConfig:
        """Read ``config.json`` of a local HuggingFace model directory (offline) into an EncoderConfig."""
        hf, src = read_hf_config(model_dir)
        mt = getattr(hf, "model_type", None)
        if mt in ("bert", "roberta"):
            pet = getattr(hf, "position_embedding_type", "absolute")
            if pet not in (None, "absolute"):
                raise ConfigError(f"{src}: position_embedding_type {pet!r} is not supported (only 'absolute')")
            if getattr(hf, "is_decoder", False):
                raise ConfigError(f"{src}: is_decoder=true is not supported (encoders only)")
            pad = int(hf.pad_token_id if hf.pad_token_id is not None else 0)
            return cls(
                arch=mt, vocab_size=hf.vocab_size, hidden=hf.hidden_size, n_layers=hf.num_hidden_layers,
                n_heads=hf.num_attention_heads, intermediate=hf.intermediate_size,
                max_positions=hf.max_position_embeddings, type_vocab_size=hf.type_vocab_size,
                layer_norm_eps=hf.layer_norm_eps, act=str(hf.hidden_act), pad_token_id=pad,
                position_offset=pad + 1 if mt == "roberta" else 0, source=src,
            )
        if mt == "distilbert":
            return cls(
                arch=mt, vocab_size=hf.vocab_size, hidden=hf.dim, n_layers=hf.n_layers, n_heads=hf.n_heads,
                intermediate=hf.hidden_dim, max_positions=hf.max_position_embeddings, type_vocab_size=0,
                layer_norm_eps=1e-12, act=str(hf.activation),
                pad_token_id=int(hf.pad_token_id if hf.pad_token_id is not None else 0), source=src,
            )
        raise ConfigError(f"{src}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")


__all__ = ["AttentionConfig", "AttentionKind", "EncoderConfig", "SUPPORTED_ARCHS", "read_hf_config"]
