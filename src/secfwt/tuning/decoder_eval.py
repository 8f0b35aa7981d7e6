"""Forward-only tuning on decoder LMs (LLaMA architecture, e.g. SmolLM2): plaintext and MPC evaluators.

Both implement :class:`~secfwt.tuning.objective.Evaluator` with the ONE model definition
(:class:`secfwt.nn.decoder.Decoder` + :class:`~secfwt.nn.decoder_heads.LabelWordHead`):

* :class:`PlainDecoderEvaluator` runs it on ``PlainBackend`` (float64 by default: the oracle of the MPC path);
* :class:`MpcDecoderEvaluator` is the data owner's side: the two servers run it on ``MpcBackend`` over their
  weight shares (:func:`share_decoder`, :func:`serve_decoder`), a population of P candidate prompts on a
  batch of B examples is ONE command, the servers evaluate the P x B rows in chunks of ``max_rows`` and only
  the (P x B, L) label logits are revealed, to the owner alone.

Templates. A causal LM reads its label from the next-token logits at the last position, so the task's
decoder template ends where the label word would follow (``TaskSpec.decoder_template``, e.g. SST-2
``"Review: {text}\\nSentiment:"`` with " negative" / " positive"; without one, the encoder template is cut at
``{mask}``). It is rendered as a plain string and tokenised whole (the tokenizer's own special tokens); when
too long, the text's tokens are cut from the end. Rows are right-padded; the soft prompt is inserted after
the first token (:func:`prompt_position`).

What the servers learn: shapes (P, B, T, prompt length, L) and each example's token count (the public
padding mask). Not the tokens, prompts, labels, label words (owner-shared rows, or a private selection)
or logits. Share files: ``server{0,1}.safetensors`` (format ``secfwt-decoder-shares-1``), ``public/``
(config, tokenizer, ``secfwt.json``) and ``owner/word_embeddings.safetensors`` (the disclosed word table for
the owner's local embedding mode).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from secfwt import ring
from secfwt.comm.base import OWNER, PARTY_NAMES, SERVER0, SERVER1
from secfwt.context import PartyContext
from secfwt.errors import ConfigError, ProtocolMismatchError
from secfwt.nn.backend import PlainBackend
from secfwt.nn.config import AttentionConfig
from secfwt.nn.decoder import Decoder
from secfwt.nn.decoder_heads import LabelWordHead
from secfwt.nn.llama_weights import DecoderConfig
from secfwt.nn.mpc import MpcBackend
from secfwt.prg import PRG, new_key
from secfwt.serve.session import PrivateModelClient, _attention_from_json, _attention_to_json
from secfwt.share import AShare, owner_share, reveal_to
from secfwt.tuning.data import Example
from secfwt.tuning.encode import initial_prompt, label_word_id, special_tokens
from secfwt.tuning.objective import Batch, EvalCost
from secfwt.tuning.tasks import TaskSpec

T = TypeVar("T")
FORMAT = "secfwt-decoder-shares-1"
SMOLLM2 = "smollm2"
_PUBLIC_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")


# -- model selection and templates ----------------------------------------------------------------------
def resolve_model_dir(model: str) -> Path:
    """``"smollm2"`` -> the cached fp32 SmolLM2-135M-Instruct directory; else the path itself."""
    if model.lower() == SMOLLM2:
        from secfwt.nn.llama_weights import smollm2_dir

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
    t = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), t), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), t), dtype=torch.int64)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[i, :len(r)] = 1
    return DecoderBatch(input_ids, mask)


def prompt_position(tokenizer: Any) -> int:
    """Where the soft prompt goes: after the tokenizer's prefix special tokens (BOS), and after at least one
    token: a LLaMA-family model's first position is its attention sink (massive activations, docs/DECODER.md),
    which should stay a real token (for SmolLM2, without BOS: the template's first token)."""
    return max(len(special_tokens(tokenizer)[0]), 1)


def label_token_ids(tokenizer: Any, task: TaskSpec) -> list[list[int]]:
    return [[label_word_id(tokenizer, task.name, w.strip())] for w in decoder_template(task)[1]]


def _rows(n_pop: int, n_ex: int, max_rows: int) -> list[tuple[Tensor, Tensor]]:
    """Fixed chunking of the P x B (prompt, example) rows: (prompt index, example index) per chunk."""
    out = []
    for lo in range(0, n_pop * n_ex, max_rows):
        r = torch.arange(lo, min(lo + max_rows, n_pop * n_ex))
        out.append((r // n_ex, r % n_ex))
    return out


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
        outs = []
        for p_idx, b_idx in _rows(n_pop, len(batch), self.max_rows):
            pr = prompts[p_idx].to(self.dtype) if n_prompt else None
            out = self.dec.forward(self.be, embeds[b_idx], mask[b_idx], prompt=pr, prompt_at=self.prompt_at)
            outs.append(self.head.forward(self.be, out))
            self._calls += 1
        self._compute_s += time.perf_counter() - start
        return torch.cat(outs).float().reshape(n_pop, len(batch), -1)

    def init_prompt(self, n_prompt: int, seed: int, text: str | None = None) -> Tensor:
        return initial_prompt(self.table, self.tokenizer, n_prompt, seed, text).float()

    def cost(self) -> EvalCost | None:
        return None

    @property
    def forward_calls(self) -> int:
        return self._calls


# -- the model owner's share files ----------------------------------------------------------------------
def share_decoder(model: str, out_dir: str | Path, frac_bits: int = 16) -> Path:
    """Split a Llama checkpoint into ``out_dir/server{0,1}.safetensors`` (+ public/, owner/word table)."""
    d = resolve_model_dir(model)
    dec = Decoder.from_pretrained(d)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prg = PRG(new_key())
    tied = bool(torch.equal(dec.params["lm_head"], dec.params["emb.word"]))
    s0: dict[str, Tensor] = {}
    s1: dict[str, Tensor] = {}
    for i, (name, w) in enumerate(sorted(dec.params.items())):
        if name == "lm_head" and tied:
            continue
        try:
            v = ring.encode(w, frac_bits)
        except OverflowError as e:
            raise ConfigError(f"{d}: parameter {name} does not fit the fixed-point range: {e}") from e
        r = prg.stream(i).ring(tuple(v.shape))
        s0[name], s1[name] = r.contiguous(), (v - r).contiguous()
    cfg = json.dumps(dataclasses.asdict(dec.config))
    for rank, tensors in ((SERVER0, s0), (SERVER1, s1)):
        meta = {"format": FORMAT, "party": PARTY_NAMES[rank], "frac_bits": str(frac_bits), "config": cfg,
                "tied": str(tied)}
        save_file(tensors, str(out / f"{PARTY_NAMES[rank]}.safetensors"), metadata=meta)
    pub = out / "public"
    pub.mkdir(exist_ok=True)
    for f in _PUBLIC_FILES:
        if (d / f).is_file():
            shutil.copy2(d / f, pub / f)
    (pub / "secfwt.json").write_text(json.dumps({"embedding_std": float(dec.params["emb.word"].std()),
                                                 "tied": tied, "decoder": True}))
    (out / "owner").mkdir(exist_ok=True)
    save_file({"word": dec.params["emb.word"].to(torch.float32).contiguous()},
              str(out / "owner" / "word_embeddings.safetensors"))
    return out


@dataclass
class DecoderShares:
    config: DecoderConfig
    params: dict[str, AShare]
    frac_bits: int
    tied: bool


def load_decoder_shares(path: str | Path, rank: int) -> DecoderShares:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: share file does not exist")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
        params = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{p}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("party") != PARTY_NAMES[rank]:
        raise ConfigError(f"{p}: shares of {meta.get('party')!r}, but this party is {PARTY_NAMES[rank]!r}")
    fb = int(meta["frac_bits"])
    cfg = DecoderConfig(**json.loads(meta["config"]))
    return DecoderShares(cfg, {k: AShare(t, fb) for k, t in params.items()}, fb, meta.get("tied") == "True")


# -- the servers ----------------------------------------------------------------------------------------
class DecoderServer:
    """One server's session state (same commands as :mod:`secfwt.serve.session`: setup, register, forward,
    cost, stop). ``setup`` builds the label rows: shared by the owner (``rows: "owner"``: local embedding
    mode with a tied head, free) or selected privately from the shared LM head with the owner's shared
    (L, V) averaging matrix (``rows: "select"``: one Beaver matmul over the vocabulary, once)."""

    def __init__(self, ctx: PartyContext, shares: DecoderShares) -> None:
        if ctx.f != shares.frac_bits:
            raise ConfigError(f"share file has {shares.frac_bits} fractional bits, the parties use {ctx.f}")
        self.ctx, self.shares, self.be = ctx, shares, MpcBackend(ctx)
        self.dec: Decoder[AShare] | None = None
        self.head: LabelWordHead[AShare] | None = None
        self.embedding, self.max_rows, self.prompt_at = "local", 64, 0
        self.batches: dict[str, tuple[AShare, Tensor]] = {}

    def _embed(self, b: int, t: int) -> AShare:
        cfg = self.shares.config
        if self.embedding == "local":
            return self.be.from_owner((b, t, cfg.hidden))
        one_hot = self.be.from_owner((b, t, cfg.vocab_size), scale=0)
        with self.be.scope("embedding"):
            return self.be.matmul(one_hot, self.shares.params["emb.word"])

    def setup(self, msg: dict[str, Any]) -> None:
        p, cfg = self.shares.params, self.shares.config
        self.embedding, self.max_rows = str(msg["embedding"]), int(msg["max_rows"])
        self.prompt_at = int(msg["prompt_at"])
        if self.embedding not in ("local", "private"):
            raise ProtocolMismatchError(f"setup: embedding must be 'local' or 'private', got {self.embedding!r}")
        body = {k: v for k, v in p.items() if k not in ("emb.word", "lm_head", "norm.weight")}
        self.dec = Decoder(cfg, body, _attention_from_json(msg["attention"]))
        n_labels = int(msg["n_labels"])
        if msg["rows"] == "owner":
            rows = self.be.from_owner((n_labels, cfg.hidden))
        else:
            sel = self.be.from_owner((n_labels, cfg.vocab_size))  # (L, V) averaging weights, private
            with self.be.scope("head-setup"):
                rows = self.be.matmul(sel, p["emb.word"] if self.shares.tied else p["lm_head"])  # (L, H)
        self.head = LabelWordHead(p["norm.weight"], rows, cfg.rms_norm_eps, ())

    def register(self, msg: dict[str, Any]) -> None:
        b, t = int(msg["B"]), int(msg["T"])
        embeds = self._embed(b, t)
        mask = self.ctx.comm.recv(OWNER, "mask", shape=(b, t), dtype=torch.float64)
        self.batches[str(msg["key"])] = (embeds, mask)

    def forward(self, msg: dict[str, Any]) -> None:
        if self.dec is None or self.head is None:
            raise ProtocolMismatchError("forward before setup")
        key = str(msg["key"])
        if key not in self.batches:
            raise ProtocolMismatchError(f"forward: unknown batch {key!r} (register it first)")
        embeds, mask = self.batches[key]
        n_pop, n_prompt = int(msg["P"]), int(msg["n_prompt"])
        prompts = self.be.from_owner((n_pop, n_prompt, self.shares.config.hidden)) if n_prompt else None
        outs = []
        for p_idx, b_idx in _rows(n_pop, mask.shape[0], self.max_rows):
            pr = self.be.index(prompts, p_idx) if prompts is not None else None
            out = self.dec.forward(self.be, self.be.index(embeds, b_idx), mask[b_idx], prompt=pr,
                                   prompt_at=self.prompt_at)
            outs.append(self.head.forward(self.be, out))
        reveal_to(self.ctx, self.be.cat(outs, dim=0), OWNER, tag="logits")  # (P * B, L), to the owner only


def serve_decoder(ctx: PartyContext, shares: DecoderShares) -> int:
    """A server's command loop; returns the number of forward commands served."""
    server = DecoderServer(ctx, shares)
    n = 0
    while True:
        msg = ctx.comm.recv_json(OWNER, "cmd")
        cmd = msg.get("cmd")
        if cmd == "stop":
            return n
        if cmd == "setup":
            server.setup(msg)
        elif cmd == "register":
            server.register(msg)
        elif cmd == "forward":
            server.forward(msg)
            n += 1
        elif cmd == "cost":
            ctx.comm.send_json(OWNER, "cost", ctx.cost.to_dict())
        else:
            raise ProtocolMismatchError(f"unknown command {cmd!r} from the data owner")


def serve_decoder_from_env(ctx: PartyContext) -> int:
    """``secfwt party`` program: serve the decoder shares in ``$SECFWT_SHARES_DIR``."""
    d = os.environ.get("SECFWT_SHARES_DIR")
    if not d:
        raise ConfigError("no share directory: set SECFWT_SHARES_DIR")
    return serve_decoder(ctx, load_decoder_shares(Path(d) / f"server{ctx.rank}.safetensors", ctx.rank))


# -- the data owner -------------------------------------------------------------------------------------
class DecoderClient(PrivateModelClient):
    """The owner's handle on decoder servers: :class:`PrivateModelClient` with the decoder's setup/register."""

    def setup_decoder(self, attention: AttentionConfig, label_ids: list[list[int]], *, max_rows: int,
                      prompt_at: int, owner_rows: Tensor | None) -> None:
        self.n_labels = len(label_ids)
        self._cmd({"cmd": "setup", "attention": _attention_to_json(attention), "n_labels": self.n_labels,
                   "embedding": self.embedding, "max_rows": int(max_rows), "prompt_at": int(prompt_at),
                   "rows": "owner" if owner_rows is not None else "select"})
        if owner_rows is not None:
            owner_share(self.ctx, owner_rows.to(torch.float64))
        else:
            sel = torch.zeros(len(label_ids), self.vocab_size, dtype=torch.float64)
            for i, group in enumerate(label_ids):
                sel[i, group] = 1.0 / len(group)
            owner_share(self.ctx, sel)

    def register_decoder(self, key: str, input_ids: Tensor, attention_mask: Tensor) -> None:
        b, t = input_ids.shape
        self._cmd({"cmd": "register", "key": key, "B": int(b), "T": int(t)})
        self._share_tokens(input_ids)
        self._public("mask", attention_mask)
        self.registered[key] = int(b)


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
        self._keys: set[tuple[str, int]] = set()
        self._calls = 0

    def logits(self, prompts: Tensor, batch: Batch) -> Tensor:
        if prompts.dim() != 3 or (prompts.shape[1] and prompts.shape[2] != self.hidden_size):
            raise ConfigError(f"prompts: expected (P, n_prompt, {self.hidden_size}), got {tuple(prompts.shape)}")
        n_prompt = int(prompts.shape[1])
        key = f"{batch.key}/{n_prompt}"
        if (batch.key, n_prompt) not in self._keys:
            enc = encode_decoder(self.tokenizer, self.template, batch.examples, self.max_length, n_prompt)
            self.client.register_decoder(key, enc.input_ids, enc.attention_mask)
            self._keys.add((batch.key, n_prompt))
        self._calls += 1
        return self.client.forward(key, prompts.to(torch.float64)).float()

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
        try:
            out = job(ev)
            costs = {r: c.to_dict() for r, c in client.server_costs().items()}
        finally:
            client.stop()
        return out, costs

    return prog


def _model_name(model: str) -> str:
    return SMOLLM2 if model.lower() == SMOLLM2 else Path(model).name


def _decoder_server(shares: Path) -> Any:
    def prog(ctx: PartyContext) -> int:
        return serve_decoder(ctx, load_decoder_shares(shares / f"server{ctx.rank}.safetensors", ctx.rank))

    return prog


def run_decoder_job(spec: Any, task: TaskSpec, job: Callable[[Any], T],
                    parties: str = "inprocess") -> tuple[T, dict[int, dict[str, Any]]]:
    """:func:`secfwt.tuning.runner.run_job` for decoder models: plaintext, or MPC in-process / as processes."""
    if spec.mode == "plaintext":
        ev = PlainDecoderEvaluator.from_pretrained(spec.model, task, spec.attention_config(),
                                                   model_name=_model_name(spec.model),
                                                   max_length=spec.max_length, max_rows=max(spec.max_rows, 64),
                                                   dtype=torch.float32)  # speed; MPC's oracle is float64
        return job(ev), {}
    if spec.mode != "mpc":
        raise ConfigError(f"mode: expected 'mpc' or 'plaintext', got {spec.mode!r}")
    shares = ensure_decoder_shares(spec)
    owner = decoder_owner_program(spec, shares, task, job)
    if parties == "inprocess":
        from secfwt.context import FixedPoint
        from secfwt.runtime import run_in_process

        server = _decoder_server(shares)
        res = run_in_process({SERVER0: server, SERVER1: server, OWNER: owner}, fxp=FixedPoint(spec.frac_bits),
                             timeout=spec.timeout)
        out: tuple[T, dict[int, dict[str, Any]]] = res[OWNER]
        return out
    if parties != "local":
        raise ConfigError(f"--parties {parties!r}: decoder models run with 'inprocess' or 'local' parties")
    from secfwt.tuning.processes import run_with_processes

    res2: tuple[T, dict[int, dict[str, Any]]] = run_with_processes(
        spec, shares, owner, parties, server_program="secfwt.tuning.decoder_eval:serve_decoder_from_env")
    return res2


__all__ = ["DecoderClient", "DecoderServer", "MpcDecoderEvaluator", "PlainDecoderEvaluator", "decoder_template",
           "encode_decoder", "is_decoder_model", "load_decoder_shares", "resolve_model_dir", "run_decoder_job",
           "serve_decoder", "serve_decoder_from_env", "share_decoder"]
