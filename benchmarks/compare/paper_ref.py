"""float64 torch references of the ``paper_iteration`` training steps (issue 18): loss and gradients.

Torch only (no CrypTen, no secfwt), so it runs in the CrypTen venv (party 0 computes it after the secure run:
torch autograd in the parent before CrypTen forks its parties makes them hang) and in secfwt's venv (tests).
The model is workloads.py's: post-LN BERT layers (exact-erf GELU, softmax attention), mean pooling, a 2-class
linear head, cross-entropy on one-hot labels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import workloads as W


def _ln(t: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = t.mean(-1, keepdim=True)
    d = t - mu
    return d / torch.sqrt(d.square().mean(-1, keepdim=True) + W.LN_EPS) * g + b


def torch_model(x: torch.Tensor, p: dict[str, torch.Tensor], d: W.BertDims) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state, logits) of workloads.ref_small_model (softmax attention) in torch."""
    bsz, s, h = x.shape
    for i in range(d.layers):
        pre = f"l{i}."

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(bsz, s, d.heads, d.head_dim).transpose(1, 2)

        q = heads(x @ p[pre + "wq"] + p[pre + "bq"])
        k = heads(x @ p[pre + "wk"] + p[pre + "bk"])
        v = heads(x @ p[pre + "wv"] + p[pre + "bv"])
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(d.head_dim), -1)
        ctx = (att @ v).transpose(1, 2).reshape(bsz, s, h)
        a = _ln(ctx @ p[pre + "wo"] + p[pre + "bo"] + x, p[pre + "ln1_g"], p[pre + "ln1_b"])
        f = torch.nn.functional.gelu(a @ p[pre + "w1"] + p[pre + "b1"]) @ p[pre + "w2"] + p[pre + "b2"]
        x = _ln(f + a, p[pre + "ln2_g"], p[pre + "ln2_b"])
    return x, x.mean(1) @ p["head_w"] + p["head_b"]


def grad_reference(case: W.Case, method: str, lr: float) -> dict[str, np.ndarray]:
    """Loss, gradients and one SGD update of ``method``: "sft" (every weight) or "prompt_tuning" (the first
    ``case.meta["n_prompt"]`` positions of x, the soft prompt; the weights are constants)."""
    if method not in ("sft", "prompt_tuning"):
        raise ValueError(f"grad_reference: method must be sft or prompt_tuning, got {method!r}")
    d = W.BertDims(**case.meta["dims"])
    sft = method == "sft"
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=sft) for k, v in case.params.items()}
    n = case.meta["n_prompt"]
    x = torch.tensor(case.x, dtype=torch.float64)
    prompt = x[:, :n].clone().requires_grad_(not sft)
    _hid, logits = torch_model(torch.cat([prompt, x[:, n:]], 1) if not sft else x, p, d)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(case.labels, dtype=torch.long))
    loss.backward()
    out = {"loss": np.array(loss.item())}
    if sft:
        out.update({"grad:" + k: t.grad.numpy() for k, t in p.items()})
        out["update:head_w"] = case.params["head_w"] - lr * out["grad:head_w"]
    else:
        assert prompt.grad is not None
        out["grad:prompt"] = prompt.grad.numpy()
        out["update:prompt"] = case.x[:, :n] - lr * out["grad:prompt"]
    return out
