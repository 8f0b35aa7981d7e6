"""The model owner's side: split a HuggingFace checkpoint into one share file per server.

``secfwt share-model --model DIR --out OUT`` writes::

    OUT/server0.safetensors   int64 shares of every canonical parameter (metadata: config, frac_bits, party)
    OUT/server1.safetensors   the other shares
    OUT/public/               config.json and tokenizer files (public: the data owner tokenizes with them)
    OUT/owner/word_embeddings.safetensors   only with ``disclose_embeddings``: the word table, for the
                              data owner's local embedding mode (docs: nn/inputs.py for the trade-off)

Each server receives only its own file. Shares are ``w0 = r`` and ``w1 = encode(w) - r`` with ``r`` uniform
from a fresh AES-CTR key that is discarded afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from secfwt import ring
from secfwt.comm.base import PARTY_NAMES, SERVER0, SERVER1
from secfwt.errors import ConfigError
from secfwt.nn.config import EncoderConfig
from secfwt.nn.encoder import Encoder
from secfwt.prg import PRG, new_key
from secfwt.share import AShare

FORMAT = "secfwt-shares-1"
_PUBLIC_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model")


@dataclass
class ServerShares:
    """One server's shares of a model: the encoder config and canonical params as AShares."""

    config: EncoderConfig
    params: dict[str, AShare]
    frac_bits: int
    party: int


def share_model(model_dir: str | Path, out_dir: str | Path, frac_bits: int = 16,
                disclose_embeddings: bool = True) -> Path:
    """Split ``model_dir`` into ``out_dir/server{0,1}.safetensors`` (+ public files). Returns ``out_dir``."""
    enc = Encoder.from_pretrained(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prg = PRG(new_key())
    s0: dict[str, Tensor] = {}
    s1: dict[str, Tensor] = {}
    for i, (name, w) in enumerate(sorted(enc.params.items())):
        try:
            v = ring.encode(w, frac_bits)
        except OverflowError as e:
            raise ConfigError(f"{model_dir}: parameter {name} does not fit the fixed-point range: {e}") from e
        r = prg.stream(i).ring(tuple(v.shape))
        s0[name], s1[name] = r.contiguous(), (v - r).contiguous()
    cfg_json = json.dumps(dataclasses.asdict(enc.config))
    for rank, tensors in ((SERVER0, s0), (SERVER1, s1)):
        meta = {"format": FORMAT, "party": PARTY_NAMES[rank], "frac_bits": str(frac_bits), "config": cfg_json}
        save_file(tensors, str(out / f"{PARTY_NAMES[rank]}.safetensors"), metadata=meta)
    pub = out / "public"
    pub.mkdir(exist_ok=True)
    for f in _PUBLIC_FILES:
        src = Path(model_dir) / f
        if src.is_file():
            shutil.copy2(src, pub / f)
    # Public metadata the data owner needs without the weights (BBT scales its projection by it).
    (pub / "secfwt.json").write_text(json.dumps({"embedding_std": float(enc.params["emb.word"].std())}))
    if disclose_embeddings:
        (out / "owner").mkdir(exist_ok=True)
        save_file({"word": enc.params["emb.word"].to(torch.float32).contiguous()},
                  str(out / "owner" / "word_embeddings.safetensors"))
    return out


def load_server_shares(path: str | Path, rank: int) -> ServerShares:
    """Read one server's share file; checks the format and that it belongs to ``rank``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: share file does not exist (run `secfwt share-model` first)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            params = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise ConfigError(f"{p}: not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{p}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("party") != PARTY_NAMES[rank]:
        raise ConfigError(f"{p}: shares of {meta.get('party')!r}, but this party is {PARTY_NAMES[rank]!r}")
    fb = int(meta["frac_bits"])
    cfg = EncoderConfig(**json.loads(meta["config"]))
    for k, t in params.items():
        if t.dtype != torch.int64:
            raise ConfigError(f"{p}: tensor {k} has dtype {t.dtype}, expected int64 shares")
    return ServerShares(cfg, {k: AShare(t, fb) for k, t in params.items()}, fb, rank)


def public_dir(shares_dir: str | Path) -> Path:
    return Path(shares_dir) / "public"


def owner_word_table(shares_dir: str | Path) -> Tensor:
    p = Path(shares_dir) / "owner" / "word_embeddings.safetensors"
    if not p.is_file():
        raise ConfigError(f"{p}: the model owner did not disclose the word embeddings; use --embedding private")
    with safe_open(str(p), framework="pt") as f:
        return f.get_tensor("word").to(torch.float64)
