"""The model owner's side: split a HuggingFace checkpoint into one share file per server.

``secfwt share-model --model DIR --out OUT`` writes::

    OUT/server0.safetensors   int64 shares of every canonical parameter (metadata: config, frac_bits, party)
    OUT/server1.safetensors   the other shares
    OUT/public/               config.json and tokenizer files (public: the data owner tokenizes with them)
    OUT/owner/word_embeddings.safetensors   only with ``disclose_embeddings``: the word table, for the
                              data owner's local embedding mode (docs: nn/inputs.py for the trade-off)

Each server receives only its own file. Shares are ``w0 = r`` and ``w1 = encode(w) - r`` with ``r`` uniform
from a fresh AES-CTR key that is discarded afterwards. Every file is created mode 0600 and the directories this
creates 0700 (:mod:`secfwt.files`): the shares and the word table are the model owner's until handed out.

The writing and reading helpers (:func:`write_share_files`, :func:`write_public_files`,
:func:`write_owner_word_table`, :func:`read_share_file`) are shared with the decoder's share files
(:mod:`secfwt.serve.decoder`, format ``secfwt-decoder-shares-1``); :func:`share_format` tells them apart.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from secfwt import ring
from secfwt.comm.base import PARTY_NAMES, SERVER0, SERVER1
from secfwt.errors import ConfigError
from secfwt.files import private_dir, private_output, write_private
from secfwt.nn.config import EncoderConfig
from secfwt.nn.encoder import Encoder
from secfwt.prg import PRG, new_key
from secfwt.share import AShare

FORMAT = "secfwt-shares-1"
# Tokenizer and config files the data owner needs (copied when the checkpoint has them): BERT/RoBERTa/XLM-R
# encoders and Llama decoders.
PUBLIC_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model",
                "generation_config.json")


@dataclass
class ServerShares:
    """One server's shares of a model: the encoder config and canonical params as AShares."""

    config: EncoderConfig
    params: dict[str, AShare]
    frac_bits: int
    party: int


# -- writing (the model owner) ----------------------------------------------------------------------------
def write_share_files(out: Path, params: Mapping[str, Tensor], frac_bits: int, meta: Mapping[str, str],
                      source: str | Path) -> None:
    """Ring-encode every parameter, split it as ``w0 = r``, ``w1 = encode(w) - r`` (``r`` from a fresh key,
    discarded) and write ``out/server{0,1}.safetensors`` with ``meta`` + party + frac_bits as metadata."""
    prg = PRG(new_key())
    s0: dict[str, Tensor] = {}
    s1: dict[str, Tensor] = {}
    for i, (name, w) in enumerate(sorted(params.items())):
        try:
            v = ring.encode(w, frac_bits)
        except OverflowError as e:
            raise ConfigError(f"{source}: parameter {name} does not fit the fixed-point range: {e}") from e
        r = prg.stream(i).ring(tuple(v.shape))
        s0[name], s1[name] = r.contiguous(), (v - r).contiguous()
    private_dir(out)
    for rank, tensors in ((SERVER0, s0), (SERVER1, s1)):
        m = {**meta, "party": PARTY_NAMES[rank], "frac_bits": str(frac_bits)}
        with private_output(out / f"{PARTY_NAMES[rank]}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=m)


def write_public_files(out: Path, model_dir: Path, info: Mapping[str, Any]) -> None:
    """``out/public/``: the checkpoint's config and tokenizer files and ``secfwt.json`` (``info``: public
    metadata the data owner needs without the weights, e.g. the embedding std BBT scales its projection by)."""
    pub = private_dir(public_dir(out))
    for f in PUBLIC_FILES:
        if (model_dir / f).is_file():
            with private_output(pub / f) as tmp:
                shutil.copyfile(model_dir / f, tmp)
    write_private(pub / "secfwt.json", json.dumps(dict(info)))


def write_owner_word_table(out: Path, word: Tensor) -> None:
    """``out/owner/word_embeddings.safetensors``: the disclosed word table (the owner's local embedding mode)."""
    with private_output(private_dir(out / "owner") / "word_embeddings.safetensors") as tmp:
        save_file({"word": word.to(torch.float32).contiguous()}, str(tmp))


def share_model(model_dir: str | Path, out_dir: str | Path, frac_bits: int = 16,
                disclose_embeddings: bool = True) -> Path:
    """Split ``model_dir`` into ``out_dir/server{0,1}.safetensors`` (+ public files). Returns ``out_dir``."""
    enc = Encoder.from_pretrained(model_dir)
    out = Path(out_dir)
    meta = {"format": FORMAT, "config": json.dumps(dataclasses.asdict(enc.config))}
    write_share_files(out, enc.params, frac_bits, meta, model_dir)
    write_public_files(out, Path(model_dir), {"embedding_std": float(enc.params["emb.word"].std())})
    if disclose_embeddings:
        write_owner_word_table(out, enc.params["emb.word"])
    return out


# -- reading (a server) -----------------------------------------------------------------------------------
def _open(p: Path, tensors: bool, missing: str = "") -> tuple[dict[str, str], dict[str, Tensor]]:
    if not p.is_file():
        raise ConfigError(f"{p}: share file does not exist{missing}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            params = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118 - no __iter__
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise ConfigError(f"{p}: not a readable safetensors file ({e})") from e
    return meta, params


def share_format(path: str | Path) -> str | None:
    """The ``format`` metadata of a share file (None when it has none), without reading its tensors."""
    return _open(Path(path), tensors=False)[0].get("format")


def read_share_file(path: str | Path, rank: int, fmt: str,
                    missing: str = "") -> tuple[dict[str, str], dict[str, AShare], int]:
    """(metadata, shares, frac_bits) of one server's share file; checks that it exists and is readable, its
    format, that it belongs to ``rank`` and that every tensor is int64. ``missing``: hint for a missing file."""
    p = Path(path)
    meta, params = _open(p, tensors=True, missing=missing)
    if meta.get("format") != fmt:
        raise ConfigError(f"{p}: format {meta.get('format')!r}, expected {fmt!r}")
    if meta.get("party") != PARTY_NAMES[rank]:
        raise ConfigError(f"{p}: shares of {meta.get('party')!r}, but this party is {PARTY_NAMES[rank]!r}")
    for key in ("frac_bits", "config"):
        if key not in meta:
            raise ConfigError(f"{p}: metadata field {key!r} is missing")
    try:
        fb = int(meta["frac_bits"])
    except ValueError as e:
        raise ConfigError(f"{p}: metadata field 'frac_bits': expected an integer, got {meta['frac_bits']!r}") from e
    for k, t in params.items():
        if t.dtype != torch.int64:
            raise ConfigError(f"{p}: tensor {k} has dtype {t.dtype}, expected int64 shares")
    return meta, {k: AShare(t, fb) for k, t in params.items()}, fb


def load_server_shares(path: str | Path, rank: int) -> ServerShares:
    """Read one server's encoder share file; checks the format and that it belongs to ``rank``."""
    meta, params, fb = read_share_file(path, rank, FORMAT, " (run `secfwt share-model` first)")
    return ServerShares(EncoderConfig(**json.loads(meta["config"])), params, fb, rank)


def public_dir(shares_dir: str | Path) -> Path:
    return Path(shares_dir) / "public"


def is_remote(parties: str) -> bool:
    """Whether ``parties`` names a parties file: the servers and dealer run on other hosts, and the data owner
    never holds model shares (only the public files and, if disclosed, the word table)."""
    return parties not in ("inprocess", "local")


def require_owner_files(shares_dir: str | Path, embedding: str, decoder: bool = False) -> Path:
    """Check that ``shares_dir`` holds what the data owner reads — ``public/`` (config, tokenizer; for decoders
    also ``secfwt.json``) and, for ``embedding='local'``, ``owner/word_embeddings.safetensors`` — without
    touching any server share file. Returns ``shares_dir``; one ConfigError names the first missing file."""
    d = Path(shares_dir)
    pub = public_dir(d)
    how = ("the model owner makes it with `secfwt share-model --model MODEL --out DIR` and gives the data owner "
           "DIR/public (and DIR/owner); pass --shares-dir DIR")
    needed = [pub / "config.json"] + ([pub / "secfwt.json"] if decoder else [])
    for p in needed:
        if not p.is_file():
            raise ConfigError(f"{p}: missing public model file: {how}")
    tokenizer = [f for f in PUBLIC_FILES if f not in ("config.json", "generation_config.json")]
    if not any((pub / f).is_file() for f in tokenizer):
        raise ConfigError(f"{pub}: no tokenizer file (expected one of {', '.join(tokenizer[:4])}, ...): {how}")
    table = d / "owner" / "word_embeddings.safetensors"
    if embedding == "local" and not table.is_file():
        raise ConfigError(f"{table}: missing word table for --embedding local: the model owner discloses it with "
                          "`secfwt share-model` (without --keep-embeddings); or use --embedding private")
    return d


def owner_word_table(shares_dir: str | Path) -> Tensor:
    p = Path(shares_dir) / "owner" / "word_embeddings.safetensors"
    if not p.is_file():
        raise ConfigError(f"{p}: the model owner did not disclose the word embeddings; use --embedding private")
    with safe_open(str(p), framework="pt") as f:
        return f.get_tensor("word").to(torch.float64)
