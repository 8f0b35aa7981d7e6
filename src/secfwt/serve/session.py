"""The private forward service: the servers' command loop and the data owner's client.

Per tuning run the data owner (``OWNER``) drives both servers with small JSON commands; every private tensor
goes as a secret sharing (server 0's share from the PRG it shares with the owner, server 1's over the wire),
public tensors (padding masks) go in the clear, and results come back as shares that only the owner adds up.

====================  ======================================================================================
command               what the servers do
====================  ======================================================================================
``setup``             build the encoder with the requested attention and the head: masked-LM (verbalizer
                      rows selected with a private (L, V) weight matrix: the servers never learn the label
                      words) or similarity (label descriptions encoded under MPC, pooled, normalised)
``register``          store a batch of examples (shared embeddings or shared one-hot ids, public mask,
                      shared one-hot of the <mask> position) under a key: sent once, reused every step
``forward``           for P shared soft prompts and a registered batch, run the P x B forwards in chunks of
                      ``max_rows`` sequences and reveal the (P, B, L) logits to the owner only
``cost`` / ``stop``   send the cost ledger to the owner / leave the loop
====================  ======================================================================================

What the servers learn: shapes (P, B, sequence length, prompt length, number of labels) and each example's
padding mask (its token count). Not the tokens, labels, label words, prompts, logits or loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from secfwt.comm.base import OWNER, SERVER0, SERVER1
from secfwt.context import PartyContext
from secfwt.cost import CostTracker
from secfwt.errors import ConfigError, ProtocolMismatchError
from secfwt.nn.config import AttentionConfig
from secfwt.nn.encoder import Encoder
from secfwt.nn.heads import MaskedLMHead, SimilarityHead, mean_pool
from secfwt.nn.mpc import MpcBackend
from secfwt.serve.shares import ServerShares
from secfwt.share import AShare, owner_share, receive_revealed, reveal_to

_SERVERS = (SERVER0, SERVER1)


@dataclass
class HeadSpec:
    """The output head. ``kind``: "mlm" (verbalizer token ids per label) or "similarity" (label descriptions
    as token ids; ``scale`` multiplies the cosine; pooling excludes the soft prompt)."""

    kind: str
    label_token_ids: list[list[int]] = field(default_factory=list)
    scale: float = 20.0
    sq_norm_range: tuple[float, float] = (2.0**-6, 2.0**10)

    def __post_init__(self) -> None:
        if self.kind not in ("mlm", "similarity"):
            raise ConfigError(f"head kind: expected 'mlm' or 'similarity', got {self.kind!r}")


@dataclass
class _Batch:
    embeds: AShare  # (B, T, H)
    mask: Tensor  # (B, T) public
    mask_one_hot: AShare | None  # (B, T) scale 0, mlm only


def _attention_from_json(d: dict[str, Any]) -> AttentionConfig:
    d = dict(d)
    if "rfa_sq_range" in d:
        d["rfa_sq_range"] = tuple(d["rfa_sq_range"])
    return AttentionConfig(**d)


def _attention_to_json(a: AttentionConfig) -> dict[str, Any]:
    d = dataclasses.asdict(a)
    d["kind"] = str(a.attention_kind.value)
    d["rfa_sq_range"] = list(a.rfa_sq_range)
    return d


class ModelServer:
    """One server's state for a session: its model shares, the head, and the registered batches."""

    def __init__(self, ctx: PartyContext, shares: ServerShares) -> None:
        if ctx.f != shares.frac_bits:
            raise ConfigError(f"share file has {shares.frac_bits} fractional bits, the parties use {ctx.f}")
        self.ctx = ctx
        self.be = MpcBackend(ctx)
        self.shares = shares
        self.encoder: Encoder[AShare] | None = None
        self.head: MaskedLMHead[AShare] | SimilarityHead[AShare] | None = None
        self.embedding = "local"
        self.max_rows = 64
        self.batches: dict[str, _Batch] = {}

    def _recv_public(self, tag: str, shape: Sequence[int]) -> Tensor:
        return self.ctx.comm.recv(OWNER, tag, shape=tuple(shape), dtype=torch.float64)

    def _embed(self, b: int, t: int) -> AShare:
        """Inputs from the owner: shared embeddings (local mode) or shared one-hot ids x shared table."""
        cfg = self.shares.config
        if self.embedding == "local":
            return self.be.from_owner((b, t, cfg.hidden))
        one_hot = self.be.from_owner((b, t, cfg.vocab_size), scale=0)
        with self.be.scope("embedding"):
            return self.be.matmul(one_hot, self.shares.params["emb.word"])  # (B, T, H), exact: scale 0 x f

    def setup(self, msg: dict[str, Any]) -> None:
        p = self.shares.params
        self.embedding = str(msg["embedding"])
        if self.embedding not in ("local", "private"):
            raise ProtocolMismatchError(f"setup: embedding must be 'local' or 'private', got {self.embedding!r}")
        if self.embedding == "private" and "emb.word" not in p:
            raise ConfigError("private embedding needs the word table in the share file")
        self.max_rows = int(msg["max_rows"])
        body = {k: v for k, v in p.items() if not k.startswith("mlm.") and k != "emb.word"}
        self.encoder = Encoder(self.shares.config, body, _attention_from_json(msg["attention"]))
        head = msg["head"]
        n_labels = int(head["n_labels"])
        if head["kind"] == "mlm":
            if "mlm.decoder" not in p:
                raise ConfigError(f"{self.shares.config.source or 'model'}: no masked-LM head in the share file")
            v = self.shares.config.vocab_size
            sel = self.be.from_owner((n_labels, v))  # (L, V) averaging weights, private
            with self.be.scope("head-setup"):
                dec_b = self.be.cat([p["mlm.decoder"], self.be.reshape(p["mlm.bias"], (v, 1))], dim=1)  # (V, H+1)
                rows = self.be.matmul(sel, dec_b)  # (L, H + 1)
            hsz = self.shares.config.hidden
            hp = {k[len("mlm."):]: t for k, t in p.items()
                  if k.startswith("mlm.") and k not in ("mlm.decoder", "mlm.bias")}
            hp["decoder"] = rows[:, :hsz]
            hp["bias"] = rows[:, hsz]
            self.head = MaskedLMHead(self.shares.config, hp, ())
        else:
            t = int(head["T"])
            mask = self._recv_public("label-mask", (n_labels, t))
            with self.be.scope("head-setup"):
                x = self._embed(n_labels, t)
                assert self.encoder is not None
                out = self.encoder.forward(self.be, x, mask)
                pooled = mean_pool(self.be, out.hidden, out.mask)  # (L, H)
                lo, hi = head["sq_norm_range"]
                inv = self.be.rsqrt(self.be.sum(self.be.square(pooled), dim=-1, keepdim=True), lo, hi)
                emb = self.be.mul(pooled, inv)  # (L, H) unit rows
            self.head = SimilarityHead(emb, "cosine", float(head["scale"]), include_prompt=False,
                                       sq_norm_range=(lo, hi))

    def register(self, msg: dict[str, Any]) -> None:
        b, t = int(msg["B"]), int(msg["T"])
        embeds = self._embed(b, t)
        mask = self._recv_public("mask", (b, t))
        one_hot = self.be.from_owner((b, t), scale=0) if isinstance(self.head, MaskedLMHead) else None
        self.batches[str(msg["key"])] = _Batch(embeds, mask, one_hot)

    def forward(self, msg: dict[str, Any]) -> None:
        if self.encoder is None or self.head is None:
            raise ProtocolMismatchError("forward before setup")
        key = str(msg["key"])
        if key not in self.batches:
            raise ProtocolMismatchError(f"forward: unknown batch {key!r} (register it first)")
        batch = self.batches[key]
        n_pop, n_prompt = int(msg["P"]), int(msg["n_prompt"])
        h = self.shares.config.hidden
        prompts = self.be.from_owner((n_pop, n_prompt, h)) if n_prompt else None
        n_ex = batch.mask.shape[0]
        n_rows = n_pop * n_ex
        # Row r = p * n_ex + b. Chunks take the rows example-major (all candidates of a few examples), and each
        # chunk drops the trailing columns that are padding in all its rows (the mask is public): with the
        # owner's batches sorted by length, short sentences no longer pay for the longest one.
        order = torch.arange(n_rows).reshape(n_pop, n_ex).t().reshape(-1)
        outs = []
        for lo in range(0, n_rows, self.max_rows):
            rows = order[lo : lo + self.max_rows]
            p_idx, b_idx = rows // n_ex, rows % n_ex
            mask = batch.mask[b_idx]
            t = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else mask.shape[1]
            cols = (b_idx, slice(0, t))
            x = self.be.index(batch.embeds, cols)  # (R, t, H)
            pr = self.be.index(prompts, p_idx) if prompts is not None else None  # (R, n_prompt, H)
            out = self.encoder.forward(self.be, x, mask[:, :t], prompt=pr)
            if isinstance(self.head, MaskedLMHead):
                assert batch.mask_one_hot is not None
                outs.append(self.head.forward(self.be, out, self.be.index(batch.mask_one_hot, cols)))
            else:
                outs.append(self.head.forward(self.be, out))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n_rows)
        logits = self.be.index(self.be.cat(outs, dim=0), inverse)  # (P * B, L), row p * n_ex + b
        reveal_to(self.ctx, logits, OWNER, tag="logits")


def serve_model(ctx: PartyContext, shares: ServerShares) -> int:
    """A server's command loop; returns the number of forward commands served."""
    server = ModelServer(ctx, shares)
    n_forward = 0
    while True:
        msg = ctx.comm.recv_json(OWNER, "cmd")
        cmd = msg.get("cmd")
        if cmd == "stop":
            return n_forward
        if cmd == "setup":
            server.setup(msg)
        elif cmd == "register":
            server.register(msg)
        elif cmd == "forward":
            server.forward(msg)
            n_forward += 1
        elif cmd == "cost":
            ctx.comm.send_json(OWNER, "cost", ctx.cost.to_dict())
        else:
            raise ProtocolMismatchError(f"unknown command {cmd!r} from the data owner")


class PrivateModelClient:
    """The data owner's handle on the two servers (see the module docstring for the commands).

    ``word_table`` is needed for the local embedding mode (the model owner disclosed it); in the private
    mode the owner sends one-hot token ids instead. ``result_timeout`` bounds the wait for a forward's result
    (a dead server is detected at once through its closed connection; this catches a hung one).
    """

    def __init__(self, ctx: PartyContext, hidden: int, vocab_size: int, *, embedding: str = "local",
                 word_table: Tensor | None = None, result_timeout: float = 3600.0) -> None:
        if embedding not in ("local", "private"):
            raise ConfigError(f"embedding: expected 'local' or 'private', got {embedding!r}")
        if embedding == "local" and word_table is None:
            raise ConfigError("local embedding mode needs the word table the model owner disclosed")
        self.ctx = ctx
        self.hidden = hidden
        self.vocab_size = vocab_size
        self.embedding = embedding
        self.word_table = word_table
        self.result_timeout = result_timeout
        self.head: HeadSpec | None = None
        self.n_labels = 0
        self.registered: dict[str, int] = {}

    def _cmd(self, msg: dict[str, Any]) -> None:
        for s in _SERVERS:
            self.ctx.comm.send_json(s, "cmd", msg)

    def _public(self, tag: str, t: Tensor) -> None:
        for s in _SERVERS:
            self.ctx.comm.send(s, tag, t.to(torch.float64).contiguous())

    def _share_tokens(self, input_ids: Tensor) -> None:
        if self.embedding == "local":
            assert self.word_table is not None
            owner_share(self.ctx, self.word_table[input_ids])  # (B, T, H)
        else:
            oh = torch.nn.functional.one_hot(input_ids, self.vocab_size).to(torch.float64)  # (B, T, V)
            owner_share(self.ctx, oh, scale=0)

    def setup(self, attention: AttentionConfig, head: HeadSpec, max_rows: int = 64,
              label_inputs: tuple[Tensor, Tensor] | None = None) -> None:
        """Configure the servers. Similarity heads need ``label_inputs`` = (ids (L, T), mask (L, T))."""
        if head.kind == "similarity" and label_inputs is None:
            raise ConfigError("similarity head: label descriptions (ids, mask) are required")
        self.head = head
        self.n_labels = len(head.label_token_ids) if label_inputs is None else int(label_inputs[0].shape[0])
        hj: dict[str, Any] = {"kind": head.kind, "n_labels": self.n_labels, "scale": head.scale,
                              "sq_norm_range": list(head.sq_norm_range)}
        if label_inputs is not None:
            hj["T"] = int(label_inputs[0].shape[1])
        self._cmd({"cmd": "setup", "attention": _attention_to_json(attention), "head": hj,
                   "embedding": self.embedding, "max_rows": int(max_rows)})
        if head.kind == "mlm":
            sel = torch.zeros(len(head.label_token_ids), self.vocab_size, dtype=torch.float64)
            for i, group in enumerate(head.label_token_ids):
                sel[i, list(group)] = 1.0 / len(group)
            owner_share(self.ctx, sel)
        else:
            assert label_inputs is not None
            self._public("label-mask", label_inputs[1])
            self._share_tokens(label_inputs[0])

    def register(self, key: str, input_ids: Tensor, attention_mask: Tensor, mask_pos: Tensor | None = None) -> None:
        """Send a batch once: ids (B, T), mask (B, T), and for masked-LM heads the <mask> positions (B,)."""
        if self.head is None:
            raise ConfigError("register before setup")
        b, t = input_ids.shape
        self._cmd({"cmd": "register", "key": key, "B": int(b), "T": int(t)})
        self._share_tokens(input_ids)
        self._public("mask", attention_mask)
        if self.head.kind == "mlm":
            if mask_pos is None or bool((mask_pos < 0).any()):
                raise ConfigError("masked-LM head: every example needs a <mask> position")
            owner_share(self.ctx, torch.nn.functional.one_hot(mask_pos, t).to(torch.float64), scale=0)
        self.registered[key] = int(b)

    def forward(self, key: str, prompts: Tensor) -> Tensor:
        """Label logits (P, B, L) for soft prompts (P, n_prompt, H) on the registered batch ``key``."""
        if key not in self.registered:
            raise ConfigError(f"batch {key!r} is not registered")
        n_pop, n_prompt, h = prompts.shape
        if n_prompt and h != self.hidden:
            raise ConfigError(f"prompts: hidden size {h}, the model has {self.hidden}")
        self._cmd({"cmd": "forward", "key": key, "P": int(n_pop), "n_prompt": int(n_prompt)})
        if n_prompt:
            owner_share(self.ctx, prompts.to(torch.float64))
        n_ex = self.registered[key]
        comm = self.ctx.comm
        old, comm.timeout = comm.timeout, max(comm.timeout, self.result_timeout)
        try:
            out = receive_revealed(self.ctx, (n_pop * n_ex, self.n_labels), self.ctx.f, tag="logits")
        finally:
            comm.timeout = old
        return out.reshape(n_pop, n_ex, self.n_labels)

    def server_costs(self) -> dict[int, CostTracker]:
        self._cmd({"cmd": "cost"})
        return {s: CostTracker.from_dict(self.ctx.comm.recv_json(s, "cost")) for s in _SERVERS}

    def stop(self) -> None:
        self._cmd({"cmd": "stop"})
