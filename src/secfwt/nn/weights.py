"""Offline loading of HuggingFace encoder checkpoints into canonical, shape-checked weight names.

Canonical names (independent of the architecture):

===============================  ==================  ==============================================
name                             shape               meaning
===============================  ==================  ==============================================
emb.word                         (vocab, H)          word embeddings
emb.position                     (max_positions, H)  absolute position embeddings
emb.token_type                   (type_vocab, H)     token-type embeddings (absent for DistilBERT)
emb.ln.{weight,bias}             (H,)                embedding LayerNorm
layer.{i}.attn.{q,k,v,o}.weight  (H, H)              attention projections, (out, in) layout
layer.{i}.attn.{q,k,v,o}.bias    (H,)
layer.{i}.attn_ln.{weight,bias}  (H,)                LayerNorm after attention (post-LN)
layer.{i}.ffn.in.{weight,bias}   (I, H), (I,)        feed-forward up-projection
layer.{i}.ffn.out.{weight,bias}  (H, I), (H,)        feed-forward down-projection
layer.{i}.ffn_ln.{weight,bias}   (H,)                LayerNorm after the feed-forward block
mlm.dense.{weight,bias}          (H, H), (H,)        MLM head transform (only if the checkpoint has one)
mlm.ln.{weight,bias}             (H,)
mlm.decoder                      (vocab, H)          output embeddings (tied to emb.word when absent)
mlm.bias                         (vocab,)
===============================  ==================  ==============================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from secfwt.errors import ConfigError
from secfwt.nn.config import EncoderConfig

_BERT_LAYER = {
    "attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
    "attn.o": "attention.output.dense", "attn_ln": "attention.output.LayerNorm",
    "ffn.in": "intermediate.dense", "ffn.out": "output.dense", "ffn_ln": "output.LayerNorm",
}
_DISTIL_LAYER = {
    "attn.q": "attention.q_lin", "attn.k": "attention.k_lin", "attn.v": "attention.v_lin",
    "attn.o": "attention.out_lin", "attn_ln": "sa_layer_norm",
    "ffn.in": "ffn.lin1", "ffn.out": "ffn.lin2", "ffn_ln": "output_layer_norm",
}
# MLM head: canonical -> HF name (absolute, no base prefix), per architecture.
_MLM = {
    "bert": {"mlm.dense": "cls.predictions.transform.dense", "mlm.ln": "cls.predictions.transform.LayerNorm",
             "mlm.decoder": "cls.predictions.decoder.weight", "mlm.bias": "cls.predictions.bias"},
    "roberta": {"mlm.dense": "lm_head.dense", "mlm.ln": "lm_head.layer_norm",
                "mlm.decoder": "lm_head.decoder.weight", "mlm.bias": "lm_head.bias"},
    "distilbert": {"mlm.dense": "vocab_transform", "mlm.ln": "vocab_layer_norm",
                   "mlm.decoder": "vocab_projector.weight", "mlm.bias": "vocab_projector.bias"},
}
_MLM_BIAS_ALIASES = {"cls.predictions.bias": "cls.predictions.decoder.bias", "lm_head.bias": "lm_head.decoder.bias"}


@dataclass
class CheckpointTensors:
    """All tensors of a checkpoint directory, with the file each came from (for error messages)."""

    tensors: dict[str, Tensor]
    files: dict[str, str] = field(default_factory=dict)

    def get(self, key: str) -> Tensor | None:
        t = self.tensors.get(key)
        if t is None:  # TF-era BERT checkpoints name LayerNorm parameters gamma/beta
            if key.endswith(".weight"):
                t = self.tensors.get(key[: -len("weight")] + "gamma")
            elif key.endswith(".bias"):
                t = self.tensors.get(key[: -len("bias")] + "beta")
        return t

    def where(self, key: str) -> str:
        return self.files.get(key, next(iter(set(self.files.values())), "<checkpoint>"))


def read_checkpoint(model_dir: str | Path) -> CheckpointTensors:
    """Read every tensor of a local HF checkpoint: model.safetensors, a sharded safetensors index, or
    pytorch_model.bin (loaded with ``weights_only=True``). Never touches the network."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    out = CheckpointTensors({})
    index = d / "model.safetensors.index.json"
    if (d / "model.safetensors").is_file():
        files = [d / "model.safetensors"]
    elif index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [d / f for f in sorted(set(weight_map.values()))]
    elif (d / "pytorch_model.bin").is_file():
        path = d / "pytorch_model.bin"
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        out.tensors = dict(sd)
        out.files = {k: str(path) for k in sd}
        return out
    else:
        raise ConfigError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    for f in files:
        sd = load_file(str(f))
        out.tensors.update(sd)
        out.files.update({k: str(f) for k in sd})
    return out


def _base_prefix(ck: CheckpointTensors, arch: str, src: str) -> str:
    for prefix in (f"{arch}.", ""):
        if ck.get(prefix + "embeddings.word_embeddings.weight") is not None:
            return prefix
    raise ConfigError(f"{src}: no '{arch}.embeddings.word_embeddings.weight' or "
                      f"'embeddings.word_embeddings.weight' tensor: not a {arch} checkpoint")


def expected_shapes(cfg: EncoderConfig, with_mlm: bool) -> dict[str, tuple[int, ...]]:
    """Canonical name -> expected shape, from the configuration."""
    h, i = cfg.hidden, cfg.intermediate
    shapes: dict[str, tuple[int, ...]] = {
        "emb.word": (cfg.vocab_size, h), "emb.position": (cfg.max_positions, h),
        "emb.ln.weight": (h,), "emb.ln.bias": (h,),
    }
    if cfg.type_vocab_size > 0:
        shapes["emb.token_type"] = (cfg.type_vocab_size, h)
    for li in range(cfg.n_layers):
        p = f"layer.{li}."
        for m in ("q", "k", "v", "o"):
            shapes[p + f"attn.{m}.weight"] = (h, h)
            shapes[p + f"attn.{m}.bias"] = (h,)
        for ln in ("attn_ln", "ffn_ln"):
            shapes[p + f"{ln}.weight"] = (h,)
            shapes[p + f"{ln}.bias"] = (h,)
        shapes[p + "ffn.in.weight"] = (i, h)
        shapes[p + "ffn.in.bias"] = (i,)
        shapes[p + "ffn.out.weight"] = (h, i)
        shapes[p + "ffn.out.bias"] = (h,)
    if with_mlm:
        shapes.update({"mlm.dense.weight": (h, h), "mlm.dense.bias": (h,), "mlm.ln.weight": (h,),
                       "mlm.ln.bias": (h,), "mlm.decoder": (cfg.vocab_size, h), "mlm.bias": (cfg.vocab_size,)})
    return shapes


def hf_names(cfg: EncoderConfig, prefix: str) -> dict[str, str]:
    """Canonical name -> HF tensor name for the encoder body (no head)."""
    names = {
        "emb.word": "embeddings.word_embeddings.weight", "emb.position": "embeddings.position_embeddings.weight",
        "emb.ln.weight": "embeddings.LayerNorm.weight", "emb.ln.bias": "embeddings.LayerNorm.bias",
    }
    if cfg.type_vocab_size > 0:
        names["emb.token_type"] = "embeddings.token_type_embeddings.weight"
    layer_map, layer_root = (_DISTIL_LAYER, "transformer.layer") if cfg.arch == "distilbert" else (
        _BERT_LAYER, "encoder.layer")
    for li in range(cfg.n_layers):
        for canon, hf in layer_map.items():
            for suffix in ("weight", "bias"):
                names[f"layer.{li}.{canon}.{suffix}"] = f"{layer_root}.{li}.{hf}.{suffix}"
    return {k: prefix + v for k, v in names.items()}


def has_mlm_head(ck: CheckpointTensors, cfg: EncoderConfig) -> bool:
    return ck.get(_MLM[cfg.arch]["mlm.dense"] + ".weight") is not None


def map_checkpoint(ck: CheckpointTensors, cfg: EncoderConfig, src: str) -> dict[str, Tensor]:
    """Map a checkpoint's tensors to canonical names, checking every shape before use.

    Raises :class:`ConfigError` naming the file and tensor on a missing tensor or a shape mismatch.
    The MLM head is mapped when the checkpoint has one (its decoder falls back to the tied word embeddings).
    """
    prefix = _base_prefix(ck, cfg.arch, src)
    names = hf_names(cfg, prefix)
    with_mlm = has_mlm_head(ck, cfg)
    if with_mlm:
        m = _MLM[cfg.arch]
        names.update({"mlm.dense.weight": m["mlm.dense"] + ".weight", "mlm.dense.bias": m["mlm.dense"] + ".bias",
                      "mlm.ln.weight": m["mlm.ln"] + ".weight", "mlm.ln.bias": m["mlm.ln"] + ".bias",
                      "mlm.decoder": m["mlm.decoder"], "mlm.bias": m["mlm.bias"]})
    shapes = expected_shapes(cfg, with_mlm)
    out: dict[str, Tensor] = {}
    for canon, shape in shapes.items():
        hf = names[canon]
        t = ck.get(hf)
        if t is None and canon == "mlm.decoder":
            t = ck.get(names["emb.word"])  # tied output embeddings
        if t is None and canon == "mlm.bias":
            t = ck.get(_MLM_BIAS_ALIASES.get(hf, hf))
        out[canon] = checked_tensor(ck, t, hf, canon, shape, src)
    return out


def checked_tensor(ck: CheckpointTensors, t: Tensor | None, hf: str, canon: str, shape: tuple[int, ...],
                   src: str) -> Tensor:
    """``t`` (checkpoint tensor ``hf``, canonical ``canon``) as float32 after checking it exists, has
    ``shape`` (from ``src``, the config's origin) and a float dtype; else one ConfigError naming the file."""
    if t is None:
        raise ConfigError(f"{ck.where(hf)}: missing tensor '{hf}' (for {canon}, expected shape {shape})")
    if tuple(t.shape) != shape:
        raise ConfigError(f"{ck.where(hf)}: tensor '{hf}' has shape {tuple(t.shape)}, expected {shape} "
                          f"from {src}")
    if not t.is_floating_point():
        raise ConfigError(f"{ck.where(hf)}: tensor '{hf}' has dtype {t.dtype}, expected a float tensor")
    return t.detach().to(torch.float32)


__all__ = ["CheckpointTensors", "checked_tensor", "expected_shapes", "has_mlm_head", "hf_names", "map_checkpoint",
           "read_checkpoint"]
