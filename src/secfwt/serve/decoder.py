"""Serving a secret-shared decoder LM (LLaMA architecture, e.g. SmolLM2): share files, server, owner's client.

The same service as the encoder's (:mod:`secfwt.serve.session`: one command loop, the same commands and
chunked forward) with the decoder's model and head: :class:`~secfwt.nn.decoder.Decoder` +
:class:`~secfwt.nn.decoder_heads.LabelWordHead`, which reads the label logits at each row's last valid token
(rows are right-padded; the padding mask is public).

``setup`` builds the label rows of the head: shared by the owner (``rows: "owner"``: local embedding mode
with a tied head, free) or selected privately from the shared LM head with the owner's shared (L, V)
averaging matrix (``rows: "select"``: one Beaver matmul over the vocabulary, once). The servers never learn
the label words.

Share files (:func:`share_decoder`): ``server{0,1}.safetensors`` (format ``secfwt-decoder-shares-1``;
metadata: config, frac_bits, party, tied; a tied ``lm_head`` is stored once, as ``emb.word``), ``public/``
(config, tokenizer, ``secfwt.json``: embedding std, tied) and ``owner/word_embeddings.safetensors`` (the
disclosed word table for the owner's local embedding mode). Written and read with the encoder's helpers
(:mod:`secfwt.serve.shares`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from secfwt.context import PartyContext
from secfwt.errors import ProtocolMismatchError
from secfwt.nn.config import AttentionConfig
from secfwt.nn.decoder import Decoder
from secfwt.nn.decoder_heads import LabelWordHead
from secfwt.nn.llama_weights import DecoderConfig, resolve_model_dir
from secfwt.serve.session import BaseServer, PrivateModelClient, attention_from_json, attention_to_json, serve_loop
from secfwt.serve.shares import read_share_file, write_owner_word_table, write_public_files, write_share_files
from secfwt.share import AShare, owner_share

FORMAT = "secfwt-decoder-shares-1"


# -- the model owner's share files ----------------------------------------------------------------------
def share_decoder(model: str, out_dir: str | Path, frac_bits: int = 16, disclose_embeddings: bool = True) -> Path:
    """Split a Llama checkpoint (``"smollm2"`` or a directory) into ``out_dir/server{0,1}.safetensors``
    (+ public/, and with ``disclose_embeddings`` the owner's word table). Returns ``out_dir``."""
    d = resolve_model_dir(model)
    dec = Decoder.from_pretrained(d)
    out = Path(out_dir)
    word = dec.params["emb.word"]
    tied = bool(torch.equal(dec.params["lm_head"], word))
    params = {k: v for k, v in dec.params.items() if not (k == "lm_head" and tied)}
    meta = {"format": FORMAT, "config": json.dumps(dataclasses.asdict(dec.config)), "tied": str(tied)}
    write_share_files(out, params, frac_bits, meta, d)
    write_public_files(out, d, {"embedding_std": float(word.std()), "tied": tied, "decoder": True})
    if disclose_embeddings:
        write_owner_word_table(out, word)
    return out


@dataclass
class DecoderShares:
    """One server's shares of a decoder: config, canonical params as AShares, and whether the head is tied."""

    config: DecoderConfig
    params: dict[str, AShare]
    frac_bits: int
    tied: bool


def load_decoder_shares(path: str | Path, rank: int) -> DecoderShares:
    """Read one server's decoder share file; checks the format and that it belongs to ``rank``."""
    meta, params, fb = read_share_file(path, rank, FORMAT)
    return DecoderShares(DecoderConfig(**json.loads(meta["config"])), params, fb, meta.get("tied") == "True")


# -- the servers ----------------------------------------------------------------------------------------
class DecoderServer(BaseServer):
    """One server's state for a decoder session (module docstring): the shares, the decoder and its head."""

    def __init__(self, ctx: PartyContext, shares: DecoderShares) -> None:
        cfg = shares.config
        super().__init__(ctx, shares.frac_bits, cfg.hidden, cfg.vocab_size, shares.params["emb.word"])
        self.shares = shares
        self.dec: Decoder[AShare] | None = None
        self.head: LabelWordHead[AShare] | None = None
        self.prompt_at = 0

    def setup(self, msg: dict[str, Any]) -> None:
        p, cfg = self.shares.params, self.shares.config
        self._setup_inputs(msg)
        self.prompt_at = int(msg["prompt_at"])
        if msg["rows"] not in ("owner", "select"):
            raise ProtocolMismatchError(f"setup: rows must be 'owner' or 'select', got {msg['rows']!r}")
        body = {k: v for k, v in p.items() if k not in ("emb.word", "lm_head", "norm.weight")}
        self.dec = Decoder(cfg, body, attention_from_json(msg["attention"]))
        n_labels = int(msg["n_labels"])
        if msg["rows"] == "owner":
            rows = self.be.from_owner((n_labels, cfg.hidden))
        else:
            sel = self.be.from_owner((n_labels, cfg.vocab_size))  # (L, V) averaging weights, private
            with self.be.scope("head-setup"):
                rows = self.be.matmul(sel, p["emb.word"] if self.shares.tied else p["lm_head"])  # (L, H)
        self.head = LabelWordHead(p["norm.weight"], rows, cfg.rms_norm_eps, ())

    def _ready(self) -> bool:
        return self.dec is not None and self.head is not None

    def _forward_chunk(self, x: AShare, mask: Tensor, prompt: AShare | None, position: AShare | None) -> AShare:
        assert self.dec is not None and self.head is not None
        out = self.dec.forward(self.be, x, mask, prompt=prompt, prompt_at=self.prompt_at)
        return self.head.forward(self.be, out)  # the last valid position: public, from the (trimmed) mask


def serve_decoder(ctx: PartyContext, shares: DecoderShares) -> int:
    """A decoder server's command loop; returns the number of forward commands served."""
    return serve_loop(ctx, DecoderServer(ctx, shares))


# -- the data owner -------------------------------------------------------------------------------------
class DecoderClient(PrivateModelClient):
    """The owner's handle on decoder servers: :class:`PrivateModelClient` with the decoder's setup
    (``register``, ``forward``, ``server_costs`` and ``stop`` are the encoder's)."""

    def setup_decoder(self, attention: AttentionConfig, label_ids: list[list[int]], *, max_rows: int,
                      prompt_at: int, owner_rows: Tensor | None) -> None:
        """Configure the servers; ``owner_rows`` (L, H): the label rows, shared by the owner (else selected
        privately from the shared LM head)."""
        self.n_labels = len(label_ids)
        self._cmd({"cmd": "setup", "attention": attention_to_json(attention), "n_labels": self.n_labels,
                   "embedding": self.embedding, "max_rows": int(max_rows), "prompt_at": int(prompt_at),
                   "rows": "owner" if owner_rows is not None else "select"})
        if owner_rows is not None:
            owner_share(self.ctx, owner_rows.to(torch.float64))
        else:
            self._share_selection(label_ids)
        self.configured = True


__all__ = ["FORMAT", "DecoderClient", "DecoderServer", "DecoderShares", "load_decoder_shares", "serve_decoder",
           "share_decoder"]
