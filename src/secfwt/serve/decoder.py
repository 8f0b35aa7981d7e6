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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from secfwt.comm.base import OWNER
from secfwt.context import PartyContext
from secfwt.errors import ConfigError, ProtocolMismatchError
from secfwt.nn.config import AttentionConfig
from secfwt.nn.decoder import Decoder, PrefixCache
from secfwt.nn.decoder_heads import LabelWordHead
from secfwt.nn.llama_weights import DecoderConfig, resolve_model_dir
from secfwt.serve.session import BaseServer, PrivateModelClient, attention_from_json, attention_to_json, serve_loop
from secfwt.serve.shares import read_share_file, write_owner_word_table, write_public_files, write_share_files
from secfwt.share import AShare, owner_share, reveal_to

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
        self.tail: AShare | None = None  # (S, H) the template's tail (prompt position "after-text")
        self.caches: dict[int, PrefixCache[AShare]] = {}  # slot -> one example's prefix cache
        self._body: dict[str, AShare] | None = None

    def commands(self) -> dict[str, Callable[[dict[str, Any]], None]]:
        return {**super().commands(), "prefill": self.prefill, "forward_cached": self.forward_cached}

    def setup(self, msg: dict[str, Any]) -> None:
        p, cfg = self.shares.params, self.shares.config
        self._setup_inputs(msg)
        self.prompt_at = int(msg["prompt_at"])
        if msg["rows"] not in ("owner", "select"):
            raise ProtocolMismatchError(f"setup: rows must be 'owner' or 'select', got {msg['rows']!r}")
        self.dec = Decoder(cfg, self._fixed_body(), attention_from_json(msg["attention"]))
        n_labels = int(msg["n_labels"])
        if msg["rows"] == "owner":
            rows = self.be.from_owner((n_labels, cfg.hidden))
        else:
            sel = self.be.from_owner((n_labels, cfg.vocab_size))  # (L, V) averaging weights, private
            with self.be.scope("head-setup"):
                rows = self.be.matmul(sel, p["emb.word"] if self.shares.tied else p["lm_head"])  # (L, H)
        self.head = LabelWordHead(p["norm.weight"], rows, cfg.rms_norm_eps, ())
        n_tail = int(msg.get("tail", 0))
        self.tail = self.be.reshape(self._embed(1, n_tail), (n_tail, cfg.hidden)) if n_tail else None
        self.caches = {}

    def prefill(self, msg: dict[str, Any]) -> None:
        """Run B prefixes (shared by the owner like a registered batch) in chunks of ``max_rows`` and keep each
        one's cache under its slot: computed once, reused by every later ``forward_cached``."""
        if not self._ready():
            raise ProtocolMismatchError("prefill before setup")
        assert self.dec is not None
        slots, b, t = [int(v) for v in msg["slots"]], int(msg["B"]), int(msg["T"])
        if len(slots) != b:
            raise ProtocolMismatchError(f"prefill: {len(slots)} slots for {b} prefixes")
        x = self._embed(b, t)
        mask = self._recv_public("mask", (b, t))
        for lo in range(0, b, self.max_rows):
            m = mask[lo : lo + self.max_rows]
            n = int(m.sum(1).max())  # trailing all-pad columns dropped (right padding)
            cache = self.dec.prefill(self.be, self.be.index(x, (slice(lo, lo + self.max_rows), slice(0, n))),
                                     m[:, :n])
            for slot, c in zip(slots[lo : lo + self.max_rows], cache.split(self.be), strict=True):
                self.caches[slot] = c

    def forward_cached(self, msg: dict[str, Any]) -> None:
        """P shared prompts after each cached prefix in ``slots``, then the tail: the (B * P, L) label logits
        (row u * P + c: prefix u, candidate c) revealed to the owner. Chunks of whole examples, at most
        ``max_rows`` rows (at least one example)."""
        if not self._ready() or self.tail is None:
            raise ProtocolMismatchError("forward_cached before a setup with a template tail")
        assert self.dec is not None and self.head is not None
        slots, n_pop, n_prompt = [int(v) for v in msg["slots"]], int(msg["P"]), int(msg["n_prompt"])
        self.rows_served += n_pop * len(slots)
        missing = [s for s in slots if s not in self.caches]
        if missing:
            raise ProtocolMismatchError(f"forward_cached: slots {missing[:5]} were never prefilled")
        lengths = tuple(int(self.caches[s].mask.shape[1]) for s in slots)  # the shapes the requests depend on
        with self._dealer_ahead((-1, n_pop, n_prompt, *lengths)):
            self._forward_cached(slots, n_pop, n_prompt)

    def _forward_cached(self, slots: list[int], n_pop: int, n_prompt: int) -> None:
        assert self.dec is not None and self.head is not None and self.tail is not None
        prompts = self.be.from_owner((n_pop, n_prompt, self.hidden)) if n_prompt else None
        per_chunk = max(1, self.max_rows // n_pop)
        outs = []
        for lo in range(0, len(slots), per_chunk):
            group = slots[lo : lo + per_chunk]
            cache = PrefixCache.stack(self.be, [self.caches[s] for s in group])
            pr = self.be.index(prompts, torch.arange(n_pop).repeat(len(group))) if prompts is not None else None
            out = self.dec.forward_cached(self.be, cache, self.tail, prompt=pr, per=n_pop)
            outs.append(self.head.forward(self.be, out))  # (U * P, L)
        reveal_to(self.ctx, self.be.cat(outs, dim=0), OWNER, tag="logits")

    def _fixed_body(self) -> dict[str, AShare]:
        """The body's params, its matrices with their Beaver masks fixed (opened once per session: 8 bytes per
        weight per server, so no forward re-opens them; :func:`secfwt.protocols.arith.fix_weight`)."""
        if self._body is None:
            body = {k: v for k, v in self.shares.params.items() if k not in ("emb.word", "lm_head", "norm.weight")}
            with self.be.scope("fix_weights"):
                self._body = {k: self.be.fix_matrix(k, v) for k, v in body.items()}
        return self._body

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
                      prompt_at: int, owner_rows: Tensor | None, tail_ids: Sequence[int] = ()) -> None:
        """Configure the servers; ``owner_rows`` (L, H): the label rows, shared by the owner (else selected
        privately from the shared LM head); ``tail_ids``: the template's tail after the prompt (prompt
        position "after-text": :meth:`prefill` / :meth:`forward_cached`)."""
        self.n_labels = len(label_ids)
        self._cmd({"cmd": "setup", "attention": attention_to_json(attention), "n_labels": self.n_labels,
                   "embedding": self.embedding, "max_rows": int(max_rows), "prompt_at": int(prompt_at),
                   "rows": "owner" if owner_rows is not None else "select", "tail": len(tail_ids)})
        if owner_rows is not None:
            owner_share(self.ctx, owner_rows.to(torch.float64))
        else:
            self._share_selection(label_ids)
        if tail_ids:
            self._share_tokens(torch.tensor([list(tail_ids)], dtype=torch.int64))
        self.configured = True
        self.n_slots = 0

    def prefill(self, input_ids: Tensor, attention_mask: Tensor) -> list[int]:
        """Share B prefixes (ids (B, T), right-padded mask (B, T)); the servers cache each one. Returns their
        slots (for :meth:`forward_cached`)."""
        if not self.configured:
            raise ConfigError("prefill before setup")
        b, t = input_ids.shape
        slots = list(range(self.n_slots, self.n_slots + int(b)))
        self.n_slots += int(b)
        self._cmd({"cmd": "prefill", "slots": slots, "B": int(b), "T": int(t)})
        self._share_tokens(input_ids)
        self._public("mask", attention_mask)
        return slots

    def forward_cached(self, slots: Sequence[int], prompts: Tensor) -> Tensor:
        """Label logits (P, B, L) of prompts (P, n_prompt, H) (n_prompt may be 0) after the cached prefixes
        ``slots`` and before the tail."""
        out = self._prompted({"cmd": "forward_cached", "slots": [int(s) for s in slots]}, prompts, len(slots))
        return out.reshape(len(slots), prompts.shape[0], self.n_labels).transpose(0, 1)  # (P, B, L)


__all__ = ["FORMAT", "DecoderClient", "DecoderServer", "DecoderShares", "load_decoder_shares", "serve_decoder",
           "share_decoder"]
