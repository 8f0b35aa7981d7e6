"""Workload definitions shared by the CrypTen and SPU benchmark workers.

Only NumPy (and SciPy for ``erf``) is needed, so this module imports in either engine's venv.
Inputs are drawn from a fixed seed, so both engines see the same numbers; the float64 NumPy
functions here are the plaintext references the workers compare against (``max_abs_error``).

Conventions (all engines):

* activations are secret inputs of party 0, weights (and LayerNorm gamma/beta, biases) secret
  inputs of party 1: "encrypted activations x encrypted weights";
* BERT blocks are post-LN (as in BERT / all-MiniLM-L6-v2), GELU is the exact erf form,
  attention is full (no mask) softmax attention with scale 1/sqrt(head_dim), LN eps = 1e-12;
* small model = all-MiniLM-L6-v2 sizes (6 layers, hidden 384, 12 heads, FFN 1536), random init
  (std 0.02 weights, LN gamma ~ 1 + 0.02 N(0,1)), starting from input embeddings (the data
  owner's embedding lookup is outside the measured region), ending with mean pooling and a
  2-class linear head.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field

import numpy as np
from scipy.special import erf as _erf

WORKLOADS = [
    "matmul",
    "softmax",
    "gelu",
    "layernorm",
    "encoder_layer",
    "small_model_forward",
    "tuning_step",
    "paper_iteration",
]
ATTENTION = {"softmax": "softmax", "encoder_layer": "softmax", "small_model_forward": "softmax",
             "tuning_step": "softmax"}
LN_EPS = 1e-12


@dataclass(frozen=True)
class BertDims:
    hidden: int
    heads: int
    ffn: int
    layers: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


BERT_BASE = BertDims(hidden=768, heads=12, ffn=3072, layers=1)
MINILM = BertDims(hidden=384, heads=12, ffn=1536, layers=6)
N_CLASSES = 2
# ``tiny=True`` shapes: the same workloads at toy sizes, for fast tests of the runners (not benchmarks)
TINY_LAYER = BertDims(hidden=32, heads=2, ffn=64, layers=1)
TINY_MODEL = BertDims(hidden=32, heads=2, ffn=64, layers=2)
TINY_SEQ = 8

# ``paper_iteration`` (issue 18): the per-iteration measure of SecP-Tuning (arXiv 2506.15307) at RoBERTa-large
# sizes. An iteration of SFT / prompt tuning = forward + cross-entropy + backward + SGD update; an iteration of
# FoT = ONE candidate's forward over the training batch (no backward). ``seq`` counts every position of a
# sequence: for prompt_tuning, fot and fot_rfa the first N_PROMPT positions are the soft prompt.
ROBERTA_LARGE = BertDims(hidden=1024, heads=16, ffn=4096, layers=1)
TINY_PAPER = BertDims(hidden=64, heads=2, ffn=128, layers=1)
PAPER_METHODS = ("sft", "prompt_tuning", "fot", "fot_rfa")
METHOD_ATTENTION = {"sft": "softmax", "prompt_tuning": "softmax", "fot": "softmax", "fot_rfa": "rfa"}
PAPER_LAYERS_FULL = 24  # RoBERTa-large
N_PROMPT = 50
TINY_N_PROMPT = 2


@dataclass(frozen=True)
class RfaParams:
    """Random feature attention as secfwt's default AttentionConfig(kind="rfa") computes it (docs/ATTENTION.md):
    q, k l2-normalised and divided by ``tau``, phi(x) = [cos(W x), sin(W x)] with W (m, head_dim) orthogonal
    random features from ``seed + layer``, out = phi(q) phi(K)^T V / max(phi(q) phi(K)^T 1 / (T m), floor) / (T m)."""

    m: int = 64
    tau: float = 0.8
    floor: float = 0.02
    seed: int = 0


RFA = RfaParams()


def rfa_frequencies(m: int, d: int, seed: int) -> np.ndarray:
    """W (m, d): the same public frequencies as secfwt.nn.attention.rfa_frequencies(m, d, seed, orthogonal=True)
    (torch's generator, so this needs torch: secfwt's and CrypTen's venvs have it, SPU's does not)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        norms = torch.randn(d, d, generator=g, dtype=torch.float64).norm(dim=1)
        blocks.append(q.T * norms.unsqueeze(1))
    return torch.cat(blocks)[:m].numpy()


def paper_rfa_frequencies(d: BertDims) -> list[np.ndarray]:
    """Every layer's RFA frequencies of a paper_iteration model (what ref_small_model(rfa=True) draws)."""
    return [rfa_frequencies(RFA.m, d.head_dim, RFA.seed + i) for i in range(d.layers)]


@dataclass
class Case:
    """Plain inputs of one workload: ``x`` (party 0) and ``params`` (party 1)."""

    name: str
    x: np.ndarray
    params: dict[str, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray | None = None  # tuning_step only: class ids, shape [batch]
    meta: dict = field(default_factory=dict)


def _rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, sum(map(ord, name))])


def layer_params(rng: np.random.Generator, d: BertDims, prefix: str) -> dict[str, np.ndarray]:
    h, f = d.hidden, d.ffn
    p: dict[str, np.ndarray] = {}
    for name, shape in [("wq", (h, h)), ("wk", (h, h)), ("wv", (h, h)), ("wo", (h, h)),
                        ("w1", (h, f)), ("w2", (f, h))]:
        p[prefix + name] = rng.normal(0.0, 0.02, shape)
    for name, n in [("bq", h), ("bk", h), ("bv", h), ("bo", h), ("b1", f), ("b2", h)]:
        p[prefix + name] = rng.normal(0.0, 0.02, n)
    for ln in ("ln1", "ln2"):
        p[prefix + ln + "_g"] = 1.0 + rng.normal(0.0, 0.02, h)
        p[prefix + ln + "_b"] = rng.normal(0.0, 0.02, h)
    return p


def model_params(rng: np.random.Generator, d: BertDims) -> dict[str, np.ndarray]:
    p: dict[str, np.ndarray] = {}
    for i in range(d.layers):
        p.update(layer_params(rng, d, f"l{i}."))
    p["head_w"] = rng.normal(0.0, 0.02, (d.hidden, N_CLASSES))
    p["head_b"] = np.zeros(N_CLASSES)
    return p


def make_case(name: str, batch: int = 1, seq: int = 128, seed: int = 0, tiny: bool = False) -> Case:
    """Seeded inputs of one workload. ``tiny``: toy shapes (tests only); the engines' workers use the full ones."""
    rng = _rng(name, seed)
    s, h, f = (TINY_SEQ, 16, 32) if tiny else (128, 768, 3072)
    if name == "matmul":
        return Case(name, rng.normal(0, 1, (s, h)), {"w": rng.normal(0, 0.02, (h, h))},
                    meta={"shape": f"{s}x{h} @ {h}x{h}"})
    if name == "softmax":
        # attention-score-like logits: N(0, 2^2)
        nh = 2 if tiny else 12
        return Case(name, rng.normal(0, 2, (nh, s, s)), meta={"shape": f"{nh}x{s}x{s}, dim=-1"})
    if name == "gelu":
        return Case(name, rng.normal(0, 1, (s, f)), meta={"shape": f"{s}x{f}"})
    if name == "layernorm":
        x = rng.normal(0, 1, (s, h)) * rng.uniform(0.5, 3.0, (s, 1)) + rng.normal(0, 0.5, (s, 1))
        return Case(name, x, {"g": 1.0 + rng.normal(0, 0.02, h), "b": rng.normal(0, 0.02, h)},
                    meta={"shape": f"{s}x{h}, over last dim"})
    if name == "encoder_layer":
        d = TINY_LAYER if tiny else BERT_BASE
        return Case(name, rng.normal(0, 1, (s, d.hidden)), layer_params(rng, d, "l0."),
                    meta={"shape": f"{'tiny' if tiny else 'BERT-base'} layer, seq {s}", "dims": d.__dict__})
    if name in ("small_model_forward", "tuning_step"):
        d = TINY_MODEL if tiny else MINILM
        x = rng.normal(0, 1, (batch, seq, d.hidden))
        labels = rng.integers(0, N_CLASSES, batch)
        return Case(name, x, model_params(rng, d), labels=labels,
                    meta={"batch": batch, "seq": seq, "dims": d.__dict__, "init": "random"})
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")


def make_paper_case(seq: int, layers: int = 1, method: str = "fot", batch: int = 1, seed: int = 0,
                    tiny: bool = False) -> Case:
    """``paper_iteration`` inputs: ``layers`` RoBERTa-large-sized layers (random init) + mean pooling + a 2-class
    head. ``seq`` input tokens ~ N(0, 1); prompt_tuning, fot and fot_rfa PREPEND ``n_prompt`` soft-prompt
    positions (x then has seq + n_prompt positions), sft has none. The weights, tokens and labels do not depend
    on the method."""
    if method not in PAPER_METHODS:
        raise ValueError(f"paper_iteration: unknown method {method!r}; choose from {PAPER_METHODS}")
    if seq < 1 or layers < 1:
        raise ValueError(f"paper_iteration: seq and layers must be >= 1, got seq {seq}, layers {layers}")
    d = TINY_PAPER if tiny else ROBERTA_LARGE
    d = BertDims(d.hidden, d.heads, d.ffn, layers)
    n_prompt = 0 if method == "sft" else TINY_N_PROMPT if tiny else N_PROMPT
    rng = _rng("paper_iteration", seed)
    params = model_params(rng, d)
    x = rng.normal(0, 1, (batch, seq, d.hidden))
    labels = rng.integers(0, N_CLASSES, batch)
    prompt = rng.normal(0, 1, (batch, TINY_N_PROMPT if tiny else N_PROMPT, d.hidden))[:, :n_prompt]
    return Case("paper_iteration", np.concatenate([prompt, x], 1), params, labels=labels,
                meta={"batch": batch, "seq": seq, "positions": seq + n_prompt, "n_prompt": n_prompt,
                      "layers": layers, "method": method, "dims": d.__dict__, "init": "random",
                      "size": "tiny" if tiny else "RoBERTa-large"})


# ----------------------------------------------------------------- float64 plaintext references


class NumpyOps:
    """Array functions used by the model code; the SPU worker passes a jax.numpy version."""

    exp = staticmethod(np.exp)
    sqrt = staticmethod(np.sqrt)
    tanh = staticmethod(np.tanh)
    erf = staticmethod(_erf)
    cos = staticmethod(np.cos)
    sin = staticmethod(np.sin)
    concatenate = staticmethod(np.concatenate)

    @staticmethod
    def rsqrt(x):
        return 1.0 / np.sqrt(x)


def ref_softmax(x, axis: int = -1, ops=NumpyOps):
    z = ops.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def ref_gelu(x, ops=NumpyOps, approx: str = "erf"):
    """GELU: exact erf form, or ``approx="tanh"`` for the tanh approximation."""
    if approx == "tanh":
        return 0.5 * x * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1.0 + ops.erf(x / math.sqrt(2.0)))


def ref_layernorm(x, g, b, ops=NumpyOps):
    mu = x.mean(-1, keepdims=True)
    d = x - mu
    var = (d * d).mean(-1, keepdims=True)
    return d * ops.rsqrt(var + LN_EPS) * g + b


def ref_rfa(q, k, v, w, rfa: RfaParams = RFA, ops=NumpyOps):
    """Random feature attention (RfaParams) of q, k, v [..., seq, head_dim] with frequencies w (m, head_dim)."""
    def unit(t):
        return t * ops.rsqrt((t * t).sum(-1, keepdims=True)) * (1.0 / rfa.tau)

    def phi(t):
        u = t @ w.T
        return ops.concatenate([ops.cos(u), ops.sin(u)], -1)

    t, m = q.shape[-2], w.shape[0]
    pq, pk = phi(unit(q)), phi(unit(k))
    kv = pk.swapaxes(-1, -2) @ v
    num = pq @ kv
    den = (pq @ pk.sum(-2)[..., None]) * (1.0 / (t * m))
    den = rfa.floor + (den - rfa.floor) * (den > rfa.floor)  # max(den, floor)
    return num * (1.0 / (t * m)) / den


def ref_encoder_layer(x, p: dict, prefix: str, d: BertDims, ops=NumpyOps, gelu: str = "erf", rfa_w=None):
    """x: [..., seq, hidden] -> same shape. ``rfa_w``: RFA frequencies (m, head_dim) instead of softmax."""
    lead, (s, h) = x.shape[:-2], x.shape[-2:]

    def heads(t):
        return t.reshape(*lead, s, d.heads, d.head_dim).swapaxes(-2, -3)

    q = heads(x @ p[prefix + "wq"] + p[prefix + "bq"])
    k = heads(x @ p[prefix + "wk"] + p[prefix + "bk"])
    v = heads(x @ p[prefix + "wv"] + p[prefix + "bv"])
    if rfa_w is None:
        att = ref_softmax((q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(d.head_dim)), ops=ops)
        ctx = (att @ v).swapaxes(-2, -3).reshape(*lead, s, h)
    else:
        ctx = ref_rfa(q, k, v, rfa_w, ops=ops).swapaxes(-2, -3).reshape(*lead, s, h)
    a = ref_layernorm(ctx @ p[prefix + "wo"] + p[prefix + "bo"] + x, p[prefix + "ln1_g"],
                      p[prefix + "ln1_b"], ops)
    f = ref_gelu(a @ p[prefix + "w1"] + p[prefix + "b1"], ops, gelu) @ p[prefix + "w2"] + p[prefix + "b2"]
    return ref_layernorm(f + a, p[prefix + "ln2_g"], p[prefix + "ln2_b"], ops)


def ref_small_model(x, p: dict, d: BertDims = MINILM, ops=NumpyOps, gelu: str = "erf", rfa: bool = False,
                    rfa_ws: list[np.ndarray] | None = None):
    """Returns (last hidden state, logits). ``rfa``: RFA attention (RFA params, layer i seeded RFA.seed + i);
    ``rfa_ws``: those frequencies given (paper_rfa_frequencies; for a venv without torch)."""
    for i in range(d.layers):
        w = (rfa_ws[i] if rfa_ws is not None else rfa_frequencies(RFA.m, d.head_dim, RFA.seed + i)) if rfa else None
        x = ref_encoder_layer(x, p, f"l{i}.", d, ops, gelu, rfa_w=w)
    logits = x.mean(-2) @ p["head_w"] + p["head_b"]
    return x, logits


def reference(case: Case) -> np.ndarray:
    """Plaintext float64 output of a forward workload (tuning_step is checked by the worker)."""
    n, x, p = case.name, case.x, case.params
    if n == "matmul":
        return x @ p["w"]
    if n == "softmax":
        return ref_softmax(x)
    if n == "gelu":
        return ref_gelu(x)
    if n == "layernorm":
        return ref_layernorm(x, p["g"], p["b"])
    if n == "encoder_layer":
        return ref_encoder_layer(x, p, "l0.", BertDims(**case.meta["dims"]))
    if n == "small_model_forward":
        return ref_small_model(x, p, BertDims(**case.meta["dims"]))[0]
    raise ValueError(f"no forward reference for {n}")


# ----------------------------------------------------------------------------- result records


def result_record(workload: str, engine: str, times: list[float], bytes_per_server, rounds,
                  max_abs_error, repeats: int, **extra) -> dict:
    rec = {
        "workload": workload,
        "engine": engine,
        "attention": ATTENTION.get(workload),
        "time_s": statistics.median(times) if times else None,
        "bytes_per_server": bytes_per_server,
        "rounds": rounds,
        "max_abs_error": max_abs_error,
        "repeats": repeats,
    }
    rec.update(extra)
    # other work on the machine skews time_s: keep the load next to the numbers
    rec["host"] = {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)}
    return rec


def emit(rec: dict, out_path: str | None = None) -> None:
    line = json.dumps(rec, sort_keys=False)
    print(line, flush=True)
    if out_path:
        with open(out_path, "a") as fh:
            fh.write(line + "\n")


def paper_methods(spec: str) -> list[str]:
    """The paper_iteration methods of a ``--method`` comma list, all checked before any runs."""
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in methods if m not in PAPER_METHODS]
    if bad:
        sys.exit(f"--method: unknown {bad[0]!r}; choose from {PAPER_METHODS}")
    return methods


def parse_workloads(spec: str) -> list[str]:
    names = WORKLOADS if spec == "all" else [w.strip() for w in spec.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad:
        sys.exit(f"unknown workload(s) {bad}; choose from {WORKLOADS} or 'all'")
    return names
