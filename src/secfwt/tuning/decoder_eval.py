"""Forward-only tuning on decoder LMs (LLaMA architecture, e.g. SmolLM2): plaintext and MPC evaluators.

Both implement :class:`~secfwt.tuning.objective.Evaluator` with the ONE model definition
(:class:`secfwt.nn.decoder.Decoder` + :class:`~secfwt.nn.decoder_heads.LabelWordHead`):

* :class:`PlainDecoderEvaluator` runs it on ``PlainBackend`` (float64 by default: the oracle of the MPC path);
* :class:`MpcDecoderEvaluator` is the data owner's side: the two servers run it on ``MpcBackend`` over their
  weight shares (the decoder service, :mod:`secfwt.serve.decoder`, with the encoder's command loop), a
  population of P candidate prompts on a batch of B examples is ONE command, and only the (P x B, L) label
  logits are revealed, to the owner alone.

Templates and prompt positions: :mod:`secfwt.tuning.decoder_encode`. With ``prompt_position="start"`` the
P x B rows run whole, in chunks of ``max_rows`` (:mod:`secfwt.serve.rows`, which the plaintext evaluator uses
too). With ``"after-text"`` each example's prefix is run once and cached (the servers keep it under a slot the
owner assigned; the plaintext evaluator keeps it in memory, keyed by the prefix's token ids) and a forward
runs only the P candidates' prompt vectors and the template tail after it, in chunks of whole examples.

What the servers learn: shapes (P, B, T, prompt length, L) and each example's token count (the public
padding mask), and with "after-text" which forwards reuse which cached prefix. Not the tokens, prompts,
labels, label words (owner-shared rows, or a private selection) or logits. Share files:
:func:`secfwt.serve.decoder.share_decoder`, cached per model and frac_bits (:func:`ensure_decoder_shares`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from secfwt.context import PartyContext
from secfwt.errors import ConfigError
from secfwt.nn.backend import PlainBackend
from secfwt.nn.config import AttentionConfig
from secfwt.nn.decoder import Decoder, PrefixCache
from secfwt.nn.decoder_heads import LabelWordHead
from secfwt.nn.llama_weights import SMOLLM2, is_decoder_model, resolve_model_dir
from secfwt.serve.decoder import DecoderClient, share_decoder
from secfwt.serve.rows import RowChunk, forward_rows
from secfwt.tuning.decoder_encode import (
    DecoderBatch,
    by_length,
    check_prompt_position,
    decoder_template,
    encode_decoder,
    encode_prefixes,
    label_token_ids,
    prefix_key,
    prompt_position,
    tail_ids,
)
from secfwt.tuning.encode import initial_prompt
from secfwt.tuning.objective import Batch, EvalCost, Registrations
from secfwt.tuning.tasks import TaskSpec

T = TypeVar("T")


def _check_prompts(prompts: Tensor, hidden: int) -> None:
    if prompts.dim() != 3 or (prompts.shape[1] and prompts.shape[2] != hidden):
        raise ConfigError(f"prompts: expected (P, n_prompt, {hidden}), got {tuple(prompts.shape)}")


class _DecoderEvaluatorBase:
    """What both decoder evaluators share: template, prompt position, encodings, the (unsorted) row order."""

    def __init__(self, tokenizer: Any, task: TaskSpec, max_length: int, position: str) -> None:
        self.tokenizer, self.task = tokenizer, task
        self.template, _ = decoder_template(task)
        self.max_length = max_length
        self.position = check_prompt_position(position)
        self.prompt_at = prompt_position(tokenizer)
        self.tail = tail_ids(tokenizer, self.template) if position == "after-text" else []
        self._calls = 0

    def encode(self, batch: Batch, n_prompt: int) -> DecoderBatch:
        """The batch's whole rows ("start") or prefixes ("after-text")."""
        if self.position == "after-text":
            return encode_prefixes(self.tokenizer, self.template, batch.examples, self.max_length, n_prompt)
        return encode_decoder(self.tokenizer, self.template, batch.examples, self.max_length, n_prompt)

    @property
    def forward_calls(self) -> int:
        return self._calls


# -- plaintext ------------------------------------------------------------------------------------------
class PlainDecoderEvaluator(_DecoderEvaluatorBase):
    """The decoder + label-word head on ``PlainBackend`` (the oracle of :class:`MpcDecoderEvaluator`)."""

    mode = "plaintext"

    def __init__(self, dec: Decoder[Tensor], tokenizer: Any, task: TaskSpec, *, model_name: str,
                 max_length: int = 64, max_rows: int = 64, dtype: torch.dtype = torch.float64,
                 prompt_position: str = "start") -> None:
        super().__init__(tokenizer, task, max_length, prompt_position)
        head = LabelWordHead.from_decoder(dec, label_token_ids(tokenizer, task))
        self.table = dec.params["emb.word"]
        self.dec = dec.map_params(lambda _k, t: t.to(dtype))
        self.head = head.map_params(lambda _k, t: t.to(dtype))
        self.be = PlainBackend(dtype)
        self.dtype = dtype
        self.model_name = model_name
        self.attention = str(dec.attention.attention_kind.value)
        self.hidden_size = dec.config.hidden
        self.embedding_std = float(self.table.std())
        self.max_rows = max_rows
        self._caches: dict[tuple[int, ...], PrefixCache[Tensor]] = {}
        self._compute_s = 0.0

    @classmethod
    def from_pretrained(cls, model: str, task: TaskSpec, attention: AttentionConfig | None = None,
                        **kwargs: Any) -> PlainDecoderEvaluator:
        from transformers import AutoTokenizer

        d = resolve_model_dir(model)
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        dec = Decoder.from_pretrained(d, attention=attention)
        kwargs.setdefault("model_name", SMOLLM2 if model.lower() == SMOLLM2 else d.name)
        return cls(dec, tok, task, **kwargs)

    @torch.no_grad()
    def logits(self, prompts: Tensor, batch: Batch) -> Tensor:
        """Label logits (P, B, L) for prompts (P, n_prompt, H); n_prompt = 0: the template alone."""
        _check_prompts(prompts, self.hidden_size)
        start = time.perf_counter()
        n_pop, n_prompt = int(prompts.shape[0]), int(prompts.shape[1])
        enc = self.encode(batch, n_prompt)
        pr = prompts.to(self.dtype) if n_prompt else None
        if self.position == "after-text":
            out = self._logits_cached(enc, pr, n_pop)
        else:
            out = self._logits_whole(enc, pr, n_pop)
        self._compute_s += time.perf_counter() - start
        return out.float().reshape(n_pop, len(batch), -1)

    def _logits_whole(self, enc: DecoderBatch, prompts: Tensor | None, n_pop: int) -> Tensor:
        embeds = self.table[enc.input_ids].to(self.dtype)  # (B, T, H)
        mask = enc.attention_mask.to(torch.float64)

        def run(c: RowChunk) -> Tensor:  # the servers' chunks (secfwt.serve.rows), on PlainBackend
            pr = prompts[c.prompt] if prompts is not None else None
            out = self.dec.forward(self.be, embeds[c.cols], mask[c.cols], prompt=pr, prompt_at=self.prompt_at)
            self._calls += 1
            return self.head.forward(self.be, out)

        return forward_rows(self.be, n_pop, mask, self.max_rows, run)  # (P * B, L), row p * B + b

    def _logits_cached(self, enc: DecoderBatch, prompts: Tensor | None, n_pop: int) -> Tensor:
        keys = [prefix_key(i, m) for i, m in zip(enc.input_ids, enc.attention_mask, strict=True)]
        new = sorted({k for k in keys if k not in self._caches}, key=len)
        for lo in range(0, len(new), self.max_rows):  # prefill the prefixes not seen before
            group = new[lo : lo + self.max_rows]
            ids = torch.zeros(len(group), len(group[-1]), dtype=torch.int64)
            mask = torch.zeros(len(group), len(group[-1]), dtype=torch.float64)
            for u, k in enumerate(group):
                ids[u, : len(k)], mask[u, : len(k)] = torch.tensor(k), 1.0
            cache = self.dec.prefill(self.be, self.table[ids].to(self.dtype), mask)
            self._caches.update(zip(group, cache.split(self.be), strict=True))
        tail = self.table[torch.tensor(self.tail, dtype=torch.int64)].to(self.dtype)  # (S, H)
        order = by_length(enc.attention_mask)
        per_chunk = max(1, self.max_rows // n_pop)
        outs = []
        for lo in range(0, len(order), per_chunk):
            group_idx = order[lo : lo + per_chunk].tolist()
            cache = PrefixCache.stack(self.be, [self._caches[keys[i]] for i in group_idx])
            pr = prompts.repeat(len(group_idx), 1, 1) if prompts is not None else None  # row u * P + c
            out = self.dec.forward_cached(self.be, cache, tail, prompt=pr, per=n_pop)
            self._calls += 1
            outs.append(self.head.forward(self.be, out).reshape(len(group_idx), n_pop, -1))
        sorted_out = torch.cat(outs)  # (B, P, L) in length order
        res = torch.empty_like(sorted_out)
        res[order] = sorted_out
        return res.transpose(0, 1).reshape(n_pop * len(order), -1)  # row p * B + b

    def init_prompt(self, n_prompt: int, seed: int, text: str | None = None) -> Tensor:
        return initial_prompt(self.table, self.tokenizer, n_prompt, seed, text).float()

    def cost(self) -> EvalCost | None:
        return None


# -- the data owner (MPC) ------------------------------------------------------------------------------
class MpcDecoderEvaluator(_DecoderEvaluatorBase):
    """Label logits of a decoder computed by the two servers under MPC (module docstring)."""

    mode = "mpc"

    def __init__(self, client: DecoderClient, tokenizer: Any, task: TaskSpec, *, attention: AttentionConfig,
                 model_name: str, embedding_std: float, tied: bool, max_length: int = 64,
                 max_rows: int = 64, word_table: Tensor | None = None, prompt_position: str = "start") -> None:
        super().__init__(tokenizer, task, max_length, prompt_position)
        self.client = client
        self.attention = str(attention.attention_kind.value)
        self.model_name, self.hidden_size, self.embedding_std = model_name, client.hidden, embedding_std
        self.word_table = word_table
        ids = label_token_ids(tokenizer, task)
        rows = None
        if word_table is not None and tied:  # the owner already holds the tied label rows: share them
            rows = torch.stack([word_table[g].mean(0) for g in ids])
        client.setup_decoder(attention, ids, max_rows=max_rows, prompt_at=self.prompt_at, owner_rows=rows,
                             tail_ids=self.tail)
        self._registered: Registrations[Tensor] = Registrations(client.release)
        self._slots: dict[tuple[str, tuple[int, ...]], int] = {}  # (example id, prefix ids) -> server slot

    def logits(self, prompts: Tensor, batch: Batch) -> Tensor:
        """Label logits ``(P, B, L)``. The servers see the rows sorted by token length, so each chunk pays only
        for its own longest row (:mod:`secfwt.serve.rows`); "start": a batch is registered once; "after-text":
        each distinct prefix is prefilled once, then only prompt + tail run per candidate."""
        _check_prompts(prompts, self.hidden_size)
        n_prompt = int(prompts.shape[1])
        self._calls += 1
        if self.position == "after-text":
            return self._logits_cached(prompts, batch, n_prompt)

        def register() -> tuple[int, Tensor]:
            enc = self.encode(batch, n_prompt)
            order = by_length(enc.attention_mask)
            return self.client.register(enc.input_ids[order], enc.attention_mask[order]), order

        number, order = self._registered.get(batch.cache_key(n_prompt), register, batch.whole_run)
        out = self.client.forward(number, prompts.to(torch.float64)).float()  # (P, B, L), sorted row order
        unsorted = torch.empty_like(out)
        unsorted[:, order] = out
        return unsorted

    def _logits_cached(self, prompts: Tensor, batch: Batch, n_prompt: int) -> Tensor:
        enc = self.encode(batch, n_prompt)
        # One slot per example (its id and prefix), never shared between examples with equal text: the servers
        # see which slots a forward reuses, and that must follow the seeded minibatch indices, not the data.
        keys = [(ex, prefix_key(i, m))
                for ex, i, m in zip(batch.ids, enc.input_ids, enc.attention_mask, strict=True)]
        new = sorted({k for k in keys if k not in self._slots}, key=lambda k: (len(k[1]), k[0]))
        if new:
            width = max(len(k[1]) for k in new)
            ids = torch.zeros(len(new), width, dtype=torch.int64)
            mask = torch.zeros(len(new), width, dtype=torch.int64)
            for u, (_, k) in enumerate(new):
                ids[u, : len(k)], mask[u, : len(k)] = torch.tensor(k), 1
            self._slots.update(zip(new, self.client.prefill(ids, mask), strict=True))
        order = by_length(enc.attention_mask)
        out = self.client.forward_cached([self._slots[keys[i]] for i in order.tolist()],
                                         prompts.to(torch.float64)).float()  # (P, B, L) sorted
        unsorted = torch.empty_like(out)
        unsorted[:, order] = out
        return unsorted

    def init_prompt(self, n_prompt: int, seed: int, text: str | None = None) -> Tensor | None:
        if self.word_table is None:
            return None
        return initial_prompt(self.word_table, self.tokenizer, n_prompt, seed, text).float()

    def cost(self) -> EvalCost:
        costs = self.client.server_costs()
        totals = [c.total() for c in costs.values()]
        return EvalCost(bytes_per_server=max(t.bytes_sent for t in totals), rounds=max(t.rounds for t in totals),
                        compute_s=max(sum(v.time_s for k, v in c.ops.items() if "/" not in k)
                                      for c in costs.values()),
                        forward_calls=self._calls)


# -- one tuning run (``secfwt tune --model smollm2``; dispatched from secfwt.tuning.runner.run) -----------
def default_decoder_shares_dir(model: str, frac_bits: int) -> Path:
    import hashlib

    from secfwt.nn.llama_weights import cache_root

    d = resolve_model_dir(model)
    key = hashlib.sha256(f"{d.resolve()}|{frac_bits}|decoder".encode()).hexdigest()[:12]
    return cache_root() / "shares" / f"{d.name}-{key}"


def ensure_decoder_shares(spec: Any, parties: str = "inprocess") -> Path:
    """The decoder's shares directory: made once and cached when the servers run on this machine; with a
    parties file only the model owner's public files are checked (the data owner never holds server shares)."""
    from secfwt.serve.shares import is_remote, require_owner_files

    if is_remote(parties):
        if not spec.shares_dir:  # the default directory is keyed by the model, which the data owner lacks
            raise ConfigError("--shares-dir: with a parties file, give the directory holding the model owner's "
                              "public files (`secfwt share-model --model MODEL --out DIR` writes DIR/public)")
        return require_owner_files(spec.shares_dir, spec.embedding, decoder=True)
    d = Path(spec.shares_dir) if spec.shares_dir else default_decoder_shares_dir(spec.model, spec.frac_bits)
    if not (d / "server1.safetensors").is_file():
        share_decoder(spec.model, d, frac_bits=spec.frac_bits)
    return d


def decoder_owner_program(spec: Any, shares: Path, task: TaskSpec, job: Callable[[Any], T]) -> Any:
    """The data owner's role for a decoder: build the MPC evaluator, run ``job`` on it, fetch the servers'
    ledgers, stop them."""
    from transformers import AutoTokenizer

    from secfwt.serve.shares import owner_word_table, public_dir

    def prog(ctx: PartyContext) -> tuple[T, dict[int, dict[str, Any]]]:
        pub = public_dir(shares)
        cfg = json.loads((pub / "config.json").read_text())
        meta = json.loads((pub / "secfwt.json").read_text())
        tok = AutoTokenizer.from_pretrained(str(pub), local_files_only=True)
        table = owner_word_table(shares) if spec.embedding == "local" else None
        client = DecoderClient(ctx, int(cfg["hidden_size"]), int(cfg["vocab_size"]), embedding=spec.embedding,
                               word_table=table, result_timeout=max(3600.0, spec.timeout))
        ev = MpcDecoderEvaluator(client, tok, task, attention=spec.attention_config(),
                                 model_name=_model_name(spec.model), embedding_std=float(meta["embedding_std"]),
                                 tied=bool(meta["tied"]), max_length=spec.max_length, max_rows=spec.max_rows,
                                 word_table=table, prompt_position=spec.prompt_position)
        return client.run_and_stop(lambda: job(ev))

    return prog


def _model_name(model: str) -> str:
    return SMOLLM2 if model.lower() == SMOLLM2 else Path(model).name


def run_decoder_job(spec: Any, task: TaskSpec, job: Callable[[Any], T],
                    parties: str = "inprocess") -> tuple[T, dict[int, dict[str, Any]]]:
    """:func:`secfwt.tuning.runner.run_job` for decoder models: plaintext, or MPC with the parties in-process,
    as local TLS processes or on the hosts of a parties file (servers: ``secfwt party --shares FILE``)."""
    if spec.mode == "plaintext":
        ev = PlainDecoderEvaluator.from_pretrained(spec.model, task, spec.attention_config(),
                                                   model_name=_model_name(spec.model),
                                                   max_length=spec.max_length, max_rows=max(spec.max_rows, 64),
                                                   dtype=torch.float32,  # speed; MPC's oracle is float64
                                                   prompt_position=spec.prompt_position)
        return job(ev), {}
    if spec.mode != "mpc":
        raise ConfigError(f"mode: expected 'mpc' or 'plaintext', got {spec.mode!r}")
    from secfwt.tuning.processes import run_parties

    shares = ensure_decoder_shares(spec, parties)
    owner = decoder_owner_program(spec, shares, task, job)
    out: tuple[T, dict[int, dict[str, Any]]] = run_parties(spec, shares, owner, parties)
    return out


__all__ = ["SMOLLM2", "MpcDecoderEvaluator", "PlainDecoderEvaluator", "decoder_template", "encode_decoder",
           "is_decoder_model", "resolve_model_dir", "run_decoder_job"]
