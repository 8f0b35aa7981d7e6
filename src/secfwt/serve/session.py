"""The private forward service: the servers' command loop and the data owner's client.

Per tuning run the data owner (``OWNER``) drives both servers with small JSON commands; every private tensor
goes as a secret sharing (server 0's share from the PRG it shares with the owner, server 1's over the wire),
public tensors (padding masks) go in the clear, and results come back as shares that only the owner adds up.

====================  ======================================================================================
command               what the servers do
====================  ======================================================================================
``setup``             build the model with the requested attention and its head. Encoders
                      (:class:`ModelServer`): masked-LM (verbalizer rows selected with a private (L, V)
                      weight matrix: the servers never learn the label words) or similarity (label
                      descriptions encoded under MPC, pooled, normalised). Decoders
                      (:class:`secfwt.serve.decoder.DecoderServer`): the label-word head
``register``          store a batch of examples (shared embeddings or shared one-hot ids, public mask, for
                      masked-LM heads the shared one-hot of the <mask> position) under the next batch number
                      (0, 1, 2, ...: a counter, nothing derived from the data): sent once, reused every step
``release``           forget a registered batch and its recordings (the owner keeps its whole splits and the
                      8 most recently used minibatches: :class:`secfwt.tuning.objective.Registrations`)
``forward``           for P shared soft prompts and a registered batch, run the P x B forwards in chunks of
                      ``max_rows`` sequences (:mod:`secfwt.serve.rows`) and reveal the (P, B, L) logits to
                      the owner only
``cost`` / ``stop``   send the cost ledger to the owner / leave the loop
====================  ======================================================================================

ONE command loop (:func:`serve_loop`) serves both model families; :class:`BaseServer` holds what their
servers share (inputs, batches, chunked forward) and :mod:`secfwt.serve.entry` picks the server from the
share file's format.

The dealer runs ahead of the servers through every forward command seen before with the same public signature
(registered batch number, P, prompt length; for ``forward_cached`` the cached prefixes' lengths): the first run
records its dealer requests, later runs prefetch them (:meth:`secfwt.dealer.DealerClient.prefetch`). A setup
forgets the recordings; ``setup`` may carry ``"prefetch": false`` to turn it off (for comparisons).

What the servers learn: shapes (P, B, sequence length, prompt length, number of labels), each example's
padding mask (its token count), which registered batch number each forward uses (a counter the owner assigns
in order of first use) and when one is released (least recently used first: fixed by the sequence of batches
the tuning loop asks for, which follows its seeds, not the data). Not the tokens, labels, label words,
prompts, logits or loss; the owner's content hashes of its batches never leave it (README, "What the servers
learn").
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from secfwt.comm.base import OWNER, SERVER0, SERVER1
from secfwt.context import PartyContext
from secfwt.cost import CostTracker
from secfwt.dealer import Recording
from secfwt.errors import ConfigError, ProtocolMismatchError
from secfwt.nn.config import AttentionConfig
from secfwt.nn.encoder import Encoder
from secfwt.nn.heads import MaskedLMHead, SimilarityHead, mean_pool
from secfwt.nn.mpc import ENCODER_LINEAR_BOUND, MpcBackend
from secfwt.serve.rows import RowChunk, forward_rows
from secfwt.serve.shares import ServerShares
from secfwt.share import AShare, check_input, owner_share, receive_revealed, reveal_to

_SERVERS = (SERVER0, SERVER1)
T = TypeVar("T")


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
class RegisteredBatch:
    embeds: AShare  # (B, T, H)
    mask: Tensor  # (B, T) public
    position: AShare | None  # (B, T) scale 0: one-hot of the position the head reads (encoder mlm only)


def attention_from_json(d: dict[str, Any]) -> AttentionConfig:
    d = dict(d)
    if "rfa_sq_range" in d:
        d["rfa_sq_range"] = tuple(d["rfa_sq_range"])
    return AttentionConfig(**d)


def attention_to_json(a: AttentionConfig) -> dict[str, Any]:
    d = dataclasses.asdict(a)
    d["kind"] = str(a.attention_kind.value)
    d["rfa_sq_range"] = list(a.rfa_sq_range)
    return d


class Server(Protocol):
    """What :func:`serve_loop` drives: one handler per command that carries model work."""

    def commands(self) -> dict[str, Callable[[dict[str, Any]], None]]:
        """Command name -> handler (``setup``, ``register``, ``forward``, and model-specific ones)."""
        ...


FORWARD_COMMANDS = ("forward", "forward_cached")
MAX_LOGIT = 1024.0  # masked-LM and decoder label logits are O(10); a revealed value beyond this is an overflow


def serve_loop(ctx: PartyContext, server: Server) -> int:
    """A server's command loop (the server's commands, cost, stop); returns the number of forwards served."""
    n_forward = 0
    handlers = server.commands()
    while True:
        msg = ctx.comm.recv_json(OWNER, "cmd")
        cmd = msg.get("cmd")
        if cmd == "stop":
            return n_forward
        if cmd == "cost":
            ctx.comm.send_json(OWNER, "cost", ctx.cost.to_dict())
        elif cmd in handlers:
            handlers[str(cmd)](msg)
            n_forward += cmd in FORWARD_COMMANDS
        else:
            raise ProtocolMismatchError(f"unknown command {cmd!r} from the data owner")


class BaseServer:
    """What every model server does alike: the owner's inputs (shared embeddings or one-hot ids x the shared
    word table), the registered batches, and ``forward``: P shared prompts on a registered batch, the P x B
    rows in chunks (:mod:`secfwt.serve.rows`), the (P * B, L) logits revealed to the owner only. Subclasses
    build their model and head in ``setup`` and run one chunk in :meth:`_forward_chunk`."""

    def __init__(self, ctx: PartyContext, frac_bits: int, hidden: int, vocab_size: int,
                 word: AShare | None, be: MpcBackend | None = None) -> None:
        if ctx.f != frac_bits:
            raise ConfigError(f"share file has {frac_bits} fractional bits, the parties use {ctx.f}")
        self.ctx, self.be = ctx, be or MpcBackend(ctx)
        self.hidden, self.vocab_size, self.word = hidden, vocab_size, word
        self.embedding = "local"
        self.max_rows = 64
        self.batches: dict[int, RegisteredBatch] = {}  # by batch number (0, 1, 2, ... in order of registration)
        self._registrations = 0
        self.rows_served = 0  # sequence forwards (prompt x example rows) computed: a count of public shapes
        self.prefetch = True  # the dealer runs ahead through a forward seen before (:meth:`_dealer_ahead`)
        self.prefetched = 0  # commands run with the dealer ahead
        self._recordings: dict[tuple[int, ...], Recording] = {}  # forward signature -> its dealer requests

    def commands(self) -> dict[str, Callable[[dict[str, Any]], None]]:
        return {"setup": self.setup, "register": self.register, "release": self.release, "forward": self.forward}

    def setup(self, msg: dict[str, Any]) -> None:
        raise NotImplementedError

    def _recv_public(self, tag: str, shape: Sequence[int]) -> Tensor:
        return self.ctx.comm.recv(OWNER, tag, shape=tuple(shape), dtype=torch.float64)

    def _setup_inputs(self, msg: dict[str, Any]) -> None:
        """The setup fields every server reads: the embedding mode and the chunk size."""
        self.embedding = str(msg["embedding"])
        if self.embedding not in ("local", "private"):
            raise ProtocolMismatchError(f"setup: embedding must be 'local' or 'private', got {self.embedding!r}")
        if self.embedding == "private" and self.word is None:
            raise ConfigError("private embedding needs the word table in the share file")
        if self.embedding == "private" and self.word is not None:
            with self.be.scope("fix_weights"):
                self.word = self.be.fix(self.word)  # the one-hot products reuse one opening of the table
        self.max_rows = int(msg["max_rows"])
        self.prefetch = bool(msg.get("prefetch", True))
        self._recordings.clear()  # another model, attention or head: other request sequences

    def _embed(self, b: int, t: int) -> AShare:
        """Inputs from the owner: shared embeddings (local mode) or shared one-hot ids x shared table."""
        if self.embedding == "local":
            return self.be.from_owner((b, t, self.hidden))
        assert self.word is not None
        one_hot = self.be.from_owner((b, t, self.vocab_size), scale=0)
        with self.be.scope("embedding"):
            return self.be.matmul(one_hot, self.word)  # (B, T, H), exact: scale 0 x f

    def _needs_position(self) -> bool:
        """True when the head reads a private position one-hot registered with each batch."""
        return False

    def _ready(self) -> bool:
        raise NotImplementedError

    def _forward_chunk(self, x: AShare, mask: Tensor, prompt: AShare | None, position: AShare | None) -> AShare:
        """Logits (R, L) of one chunk: embeddings (R, t, H), public mask (R, t), prompts (R, n_prompt, H)."""
        raise NotImplementedError

    def register(self, msg: dict[str, Any]) -> None:
        b, t = int(msg["B"]), int(msg["T"])
        embeds = self._embed(b, t)
        mask = self._recv_public("mask", (b, t))
        position = self.be.from_owner((b, t), scale=0) if self._needs_position() else None
        self.batches[self._registrations] = RegisteredBatch(embeds, mask, position)
        self._registrations += 1

    def release(self, msg: dict[str, Any]) -> None:
        """Forget a registered batch (its shares and its forwards' dealer recordings): the owner keeps a bounded
        number registered, so a long run's memory does not grow with its minibatches."""
        key = int(msg["batch"])
        if key not in self.batches:
            raise ProtocolMismatchError(f"release: unknown batch #{key}")
        del self.batches[key]
        for sig in [s for s in self._recordings if s[0] == key]:
            del self._recordings[sig]

    def forward(self, msg: dict[str, Any]) -> None:
        if not self._ready():
            raise ProtocolMismatchError("forward before setup")
        key = int(msg["batch"])
        if key not in self.batches:
            raise ProtocolMismatchError(f"forward: unknown batch #{key} (register it first)")
        batch = self.batches[key]
        n_pop, n_prompt = int(msg["P"]), int(msg["n_prompt"])
        with self._dealer_ahead((key, n_pop, n_prompt)):
            self._forward(batch, n_pop, n_prompt)

    @contextlib.contextmanager
    def _dealer_ahead(self, signature: tuple[int, ...]) -> Iterator[None]:
        """Run a command with the dealer ahead of the servers: the first time a command of this ``signature``
        (public: registered batch number and shapes) runs, its dealer requests are recorded; every later time
        they are prefetched at its start (:meth:`secfwt.dealer.DealerClient.prefetch`), so the dealer computes
        the command's correlations while the servers compute. The servers' results and everything sent are
        unchanged; only when the dealer's answers are sent moves (earlier). The same command on the same
        registered batch makes the same requests: every request depends on public shapes only."""
        dealer = self.ctx.dealer
        if not self.prefetch or dealer is None:
            yield
            return
        rec = self._recordings.get(signature)
        if rec is not None:
            dealer.prefetch(rec)
            self.prefetched += 1
            yield
            return
        dealer.record()
        yield
        self._recordings[signature] = dealer.recorded()

    def _forward(self, batch: RegisteredBatch, n_pop: int, n_prompt: int) -> None:
        prompts = self.be.from_owner((n_pop, n_prompt, self.hidden)) if n_prompt else None
        self.rows_served += n_pop * int(batch.mask.shape[0])

        def run(c: RowChunk) -> AShare:
            pr = self.be.index(prompts, c.prompt) if prompts is not None else None  # (R, n_prompt, H)
            pos = self.be.index(batch.position, c.cols) if batch.position is not None else None  # (R, t)
            return self._forward_chunk(self.be.index(batch.embeds, c.cols), batch.mask[c.cols], pr, pos)

        logits = forward_rows(self.be, n_pop, batch.mask, self.max_rows, run)  # (P * B, L), row p * B + b
        reveal_to(self.ctx, logits, OWNER, tag="logits")


class ModelServer(BaseServer):
    """One server's state for an encoder session: its model shares, the head, and the registered batches."""

    def __init__(self, ctx: PartyContext, shares: ServerShares) -> None:
        cfg = shares.config
        # encoders: linear outputs truncated on narrow openings (nn/mpc.py)
        super().__init__(ctx, shares.frac_bits, cfg.hidden, cfg.vocab_size, shares.params.get("emb.word"),
                         MpcBackend(ctx, linear_bound=ENCODER_LINEAR_BOUND))
        self.shares = shares
        self.encoder: Encoder[AShare] | None = None
        self._body: dict[str, AShare] | None = None
        self.head: MaskedLMHead[AShare] | SimilarityHead[AShare] | None = None

    def setup(self, msg: dict[str, Any]) -> None:
        p = self.shares.params
        self._setup_inputs(msg)
        if self._body is None:  # q/k/v stacked and every weight matrix's Beaver mask fixed, once per session
            body = {k: v for k, v in p.items() if not k.startswith("mlm.") and k != "emb.word"}
            with self.be.scope("fix_weights"):
                fused = Encoder(self.shares.config, body).fuse_qkv(self.be)
                self._body = {k: self.be.fix_matrix(k, v) for k, v in fused.params.items()}
        self.encoder = Encoder(self.shares.config, self._body, attention_from_json(msg["attention"]))
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
                out = self.encoder.forward(self.be, x, mask)
                pooled = mean_pool(self.be, out.hidden, out.mask)  # (L, H)
                lo, hi = head["sq_norm_range"]
                inv = self.be.rsqrt(self.be.sum(self.be.square(pooled), dim=-1, keepdim=True), lo, hi)
                emb = self.be.mul(pooled, inv)  # (L, H) unit rows
            self.head = SimilarityHead(emb, "cosine", float(head["scale"]), include_prompt=False,
                                       sq_norm_range=(lo, hi))

    def _needs_position(self) -> bool:
        return isinstance(self.head, MaskedLMHead)

    def _ready(self) -> bool:
        return self.encoder is not None and self.head is not None

    def _forward_chunk(self, x: AShare, mask: Tensor, prompt: AShare | None, position: AShare | None) -> AShare:
        assert self.encoder is not None and self.head is not None
        out = self.encoder.forward(self.be, x, mask, prompt=prompt)
        if isinstance(self.head, MaskedLMHead):
            assert position is not None
            return self.head.forward(self.be, out, position)
        return self.head.forward(self.be, out)


def serve_model(ctx: PartyContext, shares: ServerShares) -> int:
    """An encoder server's command loop; returns the number of forward commands served."""
    return serve_loop(ctx, ModelServer(ctx, shares))


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
        self.logit_bound = MAX_LOGIT  # |logit| beyond this means a fixed-point range was exceeded under MPC
        self.configured = False
        self.registered: list[int] = []  # rows of each registered batch, by batch number (-1: released)

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
              label_inputs: tuple[Tensor, Tensor] | None = None, prefetch: bool = True) -> None:
        """Configure the servers. Similarity heads need ``label_inputs`` = (ids (L, T), mask (L, T)).
        ``prefetch``: let the dealer run ahead through repeated forwards (module docstring; off only to compare)."""
        if head.kind == "similarity" and label_inputs is None:
            raise ConfigError("similarity head: label descriptions (ids, mask) are required")
        self.head = head
        self.n_labels = len(head.label_token_ids) if label_inputs is None else int(label_inputs[0].shape[0])
        self.logit_bound = 2.0 * head.scale if head.kind == "similarity" else MAX_LOGIT  # scale x cosine
        hj: dict[str, Any] = {"kind": head.kind, "n_labels": self.n_labels, "scale": head.scale,
                              "sq_norm_range": list(head.sq_norm_range)}
        if label_inputs is not None:
            hj["T"] = int(label_inputs[0].shape[1])
        self._cmd({"cmd": "setup", "attention": attention_to_json(attention), "head": hj,
                   "embedding": self.embedding, "max_rows": int(max_rows), "prefetch": bool(prefetch)})
        if head.kind == "mlm":
            self._share_selection(head.label_token_ids)
        else:
            assert label_inputs is not None
            self._public("label-mask", label_inputs[1])
            self._share_tokens(label_inputs[0])
        self.configured = True

    def _share_selection(self, label_ids: Sequence[Sequence[int]]) -> None:
        """Share the (L, V) averaging matrix that selects each label's vocabulary rows (the label words stay
        private: the servers multiply it with their shared rows)."""
        sel = torch.zeros(len(label_ids), self.vocab_size, dtype=torch.float64)
        for i, group in enumerate(label_ids):
            sel[i, list(group)] = 1.0 / len(group)
        owner_share(self.ctx, sel)

    def register(self, input_ids: Tensor, attention_mask: Tensor, mask_pos: Tensor | None = None) -> int:
        """Send a batch once: ids (B, T), mask (B, T), and for masked-LM heads the <mask> positions (B,).
        Returns its batch number (0, 1, 2, ... in order of registration) for :meth:`forward`."""
        if not self.configured:
            raise ConfigError("register before setup")
        b, t = input_ids.shape
        self._cmd({"cmd": "register", "B": int(b), "T": int(t)})
        self._share_tokens(input_ids)
        self._public("mask", attention_mask)
        if self.head is not None and self.head.kind == "mlm":
            if mask_pos is None or bool((mask_pos < 0).any()):
                raise ConfigError("masked-LM head: every example needs a <mask> position")
            owner_share(self.ctx, torch.nn.functional.one_hot(mask_pos, t).to(torch.float64), scale=0)
        self.registered.append(int(b))
        return len(self.registered) - 1

    def _rows(self, batch: int) -> int:
        if not 0 <= batch < len(self.registered):
            raise ConfigError(f"batch #{batch} is not registered ({len(self.registered)} batches were)")
        if self.registered[batch] < 0:
            raise ConfigError(f"batch #{batch} was released")
        return self.registered[batch]

    def release(self, batch: int) -> None:
        """Let the servers forget registered batch ``batch`` (a later forward on it is an error)."""
        self._rows(batch)
        self._cmd({"cmd": "release", "batch": int(batch)})
        self.registered[batch] = -1

    def forward(self, batch: int, prompts: Tensor) -> Tensor:
        """Label logits (P, B, L) for soft prompts (P, n_prompt, H) on the registered batch number ``batch``."""
        n_ex = self._rows(batch)
        out = self._prompted({"cmd": "forward", "batch": int(batch)}, prompts, n_ex)
        return out.reshape(prompts.shape[0], n_ex, self.n_labels)

    def _prompted(self, cmd: dict[str, Any], prompts: Tensor, n_ex: int) -> Tensor:
        """Send ``cmd`` with the population's shape, share ``prompts`` (P, n_prompt, H) and receive the (P * n_ex,
        L) logits. The prompts are checked (finite, within the fixed-point input range) before anything is sent,
        and the logits against :attr:`logit_bound` (a larger value can only come from a blown range)."""
        n_pop, n_prompt, h = prompts.shape
        if n_prompt and h != self.hidden:
            raise ConfigError(f"prompts: hidden size {h}, the model has {self.hidden}")
        prompts = prompts.to(torch.float64)
        check_input(prompts, self.ctx.f, tag="prompts")
        self._cmd({**cmd, "P": int(n_pop), "n_prompt": int(n_prompt)})
        if n_prompt:
            owner_share(self.ctx, prompts)
        comm = self.ctx.comm
        old, comm.timeout = comm.timeout, max(comm.timeout, self.result_timeout)
        try:
            return receive_revealed(self.ctx, (n_pop * n_ex, self.n_labels), self.ctx.f, tag="logits",
                                    bound=self.logit_bound,
                                    cause="an activation left a fixed-point range under MPC (model or prompt "
                                          "scale too large for --frac-bits)")
        finally:
            comm.timeout = old

    def server_costs(self) -> dict[int, CostTracker]:
        self._cmd({"cmd": "cost"})
        return {s: CostTracker.from_dict(self.ctx.comm.recv_json(s, "cost")) for s in _SERVERS}

    def stop(self) -> None:
        self._cmd({"cmd": "stop"})

    def run_and_stop(self, job: Callable[[], T]) -> tuple[T, dict[int, dict[str, Any]]]:
        """Run ``job`` (the owner's work with this client), then fetch each server's cost ledger (as dicts);
        the servers are stopped in any case."""
        try:
            out = job()
            costs = {r: c.to_dict() for r, c in self.server_costs().items()}
        finally:
            self.stop()
        return out, costs
