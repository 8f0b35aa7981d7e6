"""Forward-only tuning on decoder LMs (LLaMA architecture, e.g. SmolLM2): plaintext and MPC evaluators.

Both implement :class:`~secfwt.tuning.objective.Evaluator` with the ONE model definition
(:class:`secfwt.nn.decoder.Decoder` + :class:`~secfwt.nn.decoder_heads.LabelWordHead`):

* :class:`PlainDecoderEvaluator` runs it on ``PlainBackend`` (float64 by default: the oracle of the MPC path);
* :class:`MpcDecoderEvaluator` is the data owner's side: the two servers run it on ``MpcBackend`` over their
  weight shares (the decoder service, :mod:`secfwt.serve.decoder`, with the encoder's command loop), a
  population of P candidate prompts on a batch of B examples is ONE command, the servers evaluate the P x B
  rows in chunks of ``max_rows`` (:mod:`secfwt.serve.rows`, which the plaintext evaluator uses too) and only
  the (P x B, L) label logits are revealed, to the owner alone.

Templates. A causal LM reads its label from the next-token logits at the last position, so the task's
decoder template ends where the label word would follow (``TaskSpec.decoder_template``, e.g. SST-2
``"Review: {text}\\nSentiment:"`` with " negative" / " positive"; without one, the encoder template is cut at
``{mask}``). It is rendered as a plain string and tokenised whole (the tokenizer's own special tokens); when
too long, the text's tokens are cut from the end. Rows are right-padded; the soft prompt is inserted after
the first token (:func:`prompt_position`).

What the servers learn: shapes (P, B, T, prompt length, L) and each example's token count (the public
padding mask). Not the tokens, prompts, labels, label words (owner-shared rows, or a private selection)
or logits. Share files: :func:`secfwt.serve.decoder.share_decoder`, cached per model and frac_bits
(:func:`ensure_decoder_shares`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from secfwt.context import PartyContext
from secfwt.errors import ConfigError
from secfwt.nn.backend import PlainBackend
from secfwt.nn.config import AttentionConfig
from secfwt.nn.decoder import Decoder
from secfwt.nn.decoder_heads import LabelWordHead
from secfwt.nn.llama_weights import SMOLLM2, is_decoder_model, resolve_model_dir
from secfwt.serve.decoder import DecoderClient, share_decoder
from secfwt.serve.rows import RowChunk, forward_rows
from secfwt.tuning.data import Example
from secfwt.tuning.encode import initial_prompt, label_word_id, pad_right, special_tokens
from secfwt.tuning.objective import Batch, EvalCost
from secfwt.tuning.tasks import TaskSpec

T = TypeVar("T")


# -- templates ------------------------------------------------------------------------------------------
def decoder_template(task: TaskSpec) -> tuple[str, tuple[str, ...]]:
    """(template without a mask, label words): the task's decoder template, else its template cut at {mask}."""
    tpl = getattr(task, "decoder_template", None)
    words = tuple(getattr(task, "decoder_words", ()) or task.words)
    if tpl:
        return tpl, words
    return task.template.split("{mask}")[0].rstrip(), words


@dataclass(frozen=True)
class DecoderBatch:
    input_ids: Tensor  # (B, T) right-padded
    attention_mask: Tensor  # (B, T) 0/1


def encode_decoder(tokenizer: Any, template: str, examples: Sequence[Example], max_length: int,
                   n_prompt: int) -> DecoderBatch:
    """Render and tokenise each example whole; cut the text's last tokens until ``n_prompt`` more fit."""
    budget = max_length - n_prompt
    rows: list[list[int]] = []
    for ex in examples:
        fields = {"text": ex.texts[0], "text_a": ex.texts[0], "text_b": ex.texts[-1]}
        ids = list(tokenizer(template.format(**fields))["input_ids"])
        if len(ids) > budget:
            key = "text_b" if "{text_b}" in template and len(ex.texts[-1]) > len(ex.texts[0]) else "text"
            toks = list(tokenizer(fields[key], add_special_tokens=False)["input_ids"])
            cut = len(toks)
            while len(ids) > budget:
                cut -= max(1, len(ids) - budget)
                if cut < 1:
                    raise ConfigError(f"max_length {max_length} too small for template {template!r} "
                                      f"+ {n_prompt} prompt tokens")
                short = tokenizer.decode(toks[:cut])
                f2 = dict(fields, **({"text_b": short} if key == "text_b" else {"text": short, "text_a": short}))
                ids = list(tokenizer(template.format(**f2))["input_ids"])
        rows.append(ids)
    return DecoderBatch(*pad_right(tokenizer, rows))


def prompt_position(tokenizer: Any) -> int:
    """Where the soft prompt goes: after the tokenizer's prefix special tokens (BOS), and after at least one
    token: a LLaMA-family model's first position is its attention sink (massive activations, docs/DECODER.md),
    which should stay a real token (for SmolLM2, without BOS: the template's first token)."""
    return max(len(special_tokens(tokenizer)[0]), 1)


def label_token_ids(tokenizer: Any, task: TaskSpec) -> list[list[int]]:
    return [[label_word_id(tokenizer, task.name, w.strip())] for w in decoder_template(task)[1]]


# -- plaintext ------------------------------------------------------------------------------------------
class PlainDecoderEvaluator:
    """The decoder + label-word head on ``PlainBackend`` (the oracle of :class:`MpcDecoderEvaluator`)."""

    mode = "plaintext"

    def __init__(self, dec: Decoder[Tensor], tokenizer: Any, task: TaskSpec, *, model_name: str,
                 max_length: int = 64, max_rows: int = 64, dtype: torch.dtype = torch.float64) -> None:
        self.tokenizer, self.task = tokenizer, task
        self.template, _ = decoder_template(task)
        self.head = LabelWordHead.from_decoder(dec, label_token_ids(tokenizer, task))
        self.table = dec.params["emb.word"]
        self.dec = dec.map_params(lambda _k, t: t.to(dtype))
        self.head = self.head.map_params(lambda _k, t: t.to(dtype))
        self.be = PlainBackend(dtype)
        self.dtype = dtype
        self.model_name = model_name
        self.attention = str(dec.attention.attention_kind.value)
        self.hidden_size = dec.config.hidden
        self.embedding_std = float(self.table.std())
        self.max_length, self.max_rows = max_length, max_rows
        self.prompt_at = prompt_position(tokenizer)
        self._cache: dict[tuple[str, int], DecoderBatch] = {}
        self._calls = 0
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

    def encode(self, batch: Batch, n_prompt: int) -> DecoderBatch:
        key = (batch.key, n_prompt)
        if key not in self._cache:
            self._cache[key] = encode_decoder(self.tokenizer, self.template, batch.examples, self.max_length,
                                              n_prompt)
        return self._cache[key]

    @torch.no_grad()
    def logits(self, prompts: Tensor, batch: Batch) -> Tensor:
        """Label logits (P, B, L) for prompts (P, n_prompt, H); n_prompt = 0: the template alone."""
        if prompts.dim() != 3 or (prompts.shape[1] and prompts.shape[2] != self.hidden_size):
            raise ConfigError(f"prompts: expected (P, n_prompt, {self.hidden_size}), got {tuple(prompts.shape)}")
        start = time.perf_counter()
        n_pop, n_prompt = int(prompts.shape[0]), int(prompts.shape[1])
        enc = self.encode(batch, n_prompt)
        embeds = self.table[enc.input_ids].to(self.dtype)  # (B, T, H)
        mask = enc.attention_mask.to(torch.float64)

        def run(c: RowChunk) -> Tensor:  # the servers' chunks (secfwt.serve.rows), on PlainBackend
            pr = prompts[c.prompt].to(self.dtype) if n_prompt else None
            out = self.dec.forward(self.be, embeds[c.cols], mask[c.cols], prompt=pr, prompt_at=self.prompt_at)
            self._calls += 1
            return self.head.forward(self.be, out)

        logits = forward_rows(self.be, n_pop, mask, self.max_rows, run)  # (P * B, L), row p * B + b
        self._compute_s += time.perf_counter() - start
        return logits.float().reshape(n_pop, len(batch), -1)

    def init_prompt(self, n_prompt: int, seed: int, text: str | None = None) -> Tensor:
        return initial_prompt(self.table, self.tokenizer, n_prompt, seed, text).float()

    def cost(self) -> EvalCost | None:
        return None

    @property
    def forward_calls(self) -> int:
        return self._calls


# -- the data owner (MPC) ------------------------------------------------------------------------------
class MpcDecoderEvaluator:
    """Label logits of a decoder computed by the two servers under MPC (module docstring)."""

    mode = "mpc"

    def __init__(self, client: DecoderClient, tokenizer: Any, task: TaskSpec, *, attention: AttentionConfig,
                 model_name: str, embedding_std: float, tied: bool, max_length: int = 64,
                 max_rows: int = 64, word_table: Tensor | None = None) -> None:
        self.client, self.tokenizer, self.task = client, tokenizer, task
        self.template, _ = decoder_template(task)
        self.attention = str(attention.attention_kind.value)
        self.model_name, self.hidden_size, self.embedding_std = model_name, client.hidden, embedding_std
        self.max_length, self.word_table = max_length, word_table
        self.prompt_at = prompt_position(tokenizer)
        ids = label_token_ids(tokenizer, task)
        rows = None
        if word_table is not None and tied:  # the owner already holds the tied label rows: share them
            rows = torch.stack([word_table[g].mean(0) for g in ids])
        client.setup_decoder(attention, ids, max_rows=max_rows, prompt_at=self.prompt_at, owner_rows=rows)
        self._order: dict[tuple[str, int], Tensor] = {}
        self._calls = 0

    def logits(self, prompts: Tensor, batch: Batch) -> Tensor:
        """Label logits ``(P, B, L)``. A batch is registered once with its rows sorted by token length, so
        each server chunk of ``max_rows`` rows pays only for its own longest row (:mod:`secfwt.serve.rows`)."""
        if prompts.dim() != 3 or (prompts.shape[1] and prompts.shape[2] != self.hidden_size):
            raise ConfigError(f"prompts: expected (P, n_prompt, {self.hidden_size}), got {tuple(prompts.shape)}")
        n_prompt = int(prompts.shape[1])
        key = f"{batch.key}/{n_prompt}"
        if (batch.key, n_prompt) not in self._order:
            enc = encode_decoder(self.tokenizer, self.template, batch.examples, self.max_length, n_prompt)
            order = torch.argsort(enc.attention_mask.sum(1), stable=True)
            self.client.register(key, enc.input_ids[order], enc.attention_mask[order])
            self._order[(batch.key, n_prompt)] = order
        order = self._order[(batch.key, n_prompt)]
        self._calls += 1
        out = self.client.forward(key, prompts.to(torch.float64)).float()  # (P, B, L), sorted row order
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

    @property
    def forward_calls(self) -> int:
        return self._calls


# -- one tuning run (``secfwt tune --model smollm2``; dispatched from secfwt.tuning.runner.run) -----------
def default_decoder_shares_dir(model: str, frac_bits: int) -> Path:
    import hashlib

    from secfwt.nn.llama_weights import cache_root

    d = resolve_model_dir(model)
    key = hashlib.sha256(f"{d.resolve()}|{frac_bits}|decoder".encode()).hexdigest()[:12]
    return cache_root() / "shares" / f"{d.name}-{key}"


def ensure_decoder_shares(spec: Any) -> Path:
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
                                 word_table=table)
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
                                                   dtype=torch.float32)  # speed; MPC's oracle is float64
        return job(ev), {}
    if spec.mode != "mpc":
        raise ConfigError(f"mode: expected 'mpc' or 'plaintext', got {spec.mode!r}")
    from secfwt.tuning.processes import run_parties

    shares = ensure_decoder_shares(spec)
    owner = decoder_owner_program(spec, shares, task, job)
    out: tuple[T, dict[int, dict[str, Any]]] = run_parties(spec, shares, owner, parties)
    return out


__all__ = ["SMOLLM2", "MpcDecoderEvaluator", "PlainDecoderEvaluator", "decoder_template", "encode_decoder",
           "is_decoder_model", "resolve_model_dir", "run_decoder_job"]
