"""Accuracy per private forward: test accuracy against the sequence forwards a tuning run spends (issue 17).

Run:  python benchmarks/budget_curve.py [--tasks sst2,mr,agnews,rte] [--seeds 13,42,100]
                                        [--strategies bbt,pop6,minibatch8,text-init,tokens5,spsa]
                                        [--max-forwards 25600] [--max-eval 500] [--out benchmarks/results/budget_curve]

Everything runs in the clear (float32, HuggingFace forward): a private run takes exactly the plaintext run's path
(tested: same candidates, same selected prompt), so its accuracy per forward is this curve, and its cost is the
forward count times the measured cost of one private forward. A *sequence forward* is one candidate prompt on one
example: a generation costs popsize x batch, a dev evaluation len(dev), the zero-shot dev floor len(dev) once.
Test evaluations are the measurement, not part of the budget. At every budget point of a log grid the best prompt
on dev so far (with the zero-shot floor: the template when no prompt beat it on dev) is scored on the test split.

Strategies (all on top of the run's defaults: k = 16, ce loss, dev every generation, no early stopping):
  bbt         BBT's defaults: d 500, 50 prompt tokens, population 20, the whole train set per generation
  pop6        population 6 (d 500, 50 tokens)
  minibatch8  population 6, seeded train minibatches of 8
  text-init   population 6, minibatch 8, p0 = the task's template words as text, alpha 0.5
  tokens5     population 6, minibatch 8, 5 prompt tokens, d 50
  spsa        zeroth-order Adam (two-point estimates, population 6 = 3 pairs), minibatch 8, 5 tokens, d 50
  tokens5-es  tokens5 with early stopping on dev: stop after 12 generations without a better dev accuracy (the
              points after the stop keep its selection; the forwards it did not spend are recorded as ``spent``)
  tokens5-text  tokens5 with p0 = 5 template words as text and a smaller projection scale, alpha 0.25
The model is the bundled all-MiniLM-L6-v2 (similarity head) unless --model names another (e.g. smollm2).

``--attention`` picks the attention of the tuned model: ``softmax`` (the HuggingFace forward, default), ``rfa``
(secfwt's own encoder definition on PlainBackend in float32 with the RFA the servers run: m = 64 features,
tau 0.8) or ``rfa-cal`` (the same with one temperature per layer fitted once by the model owner on public text,
Wikipedia sentences of QNLI's test file, so each layer's RFA output matches softmax's: :func:`fit_rfa_taus`).
The similarity head's label embeddings come from the same encoder and attention, as on the servers.
Writes ``<out>.json`` (every point) and ``<out>.png`` (accuracy vs forwards, log x, one line per strategy, the
band spans the seeds), and prints the gain each strategy reaches within 2,560 forwards (1% of BBT's budget) as a
fraction of the gain of the longest budget run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secfwt.nn.attention import SelfAttention
from secfwt.nn.backend import PlainBackend
from secfwt.nn.config import AttentionConfig
from secfwt.nn.encoder import Embeddings, Encoder, EncoderLayer, _sub
from secfwt.nn.heads import SimilarityHead, label_embeddings
from secfwt.tuning.data import Example, data_root, load_task_data
from secfwt.tuning.encode import Encoded, encode_examples, initial_prompt
from secfwt.tuning.fot import IterRecord, TuneConfig, make_projection, tune
from secfwt.tuning.objective import Batch, accuracy
from secfwt.tuning.runner import RunSpec, run_job
from secfwt.tuning.tasks import get_task

ONE_PERCENT = 2560  # 1% of BBT's 8,000 calls x 32 examples

STRATEGIES: dict[str, dict[str, Any]] = {
    "bbt": {"d": 500, "n_prompt": 50, "popsize": 20},
    "pop6": {"d": 500, "n_prompt": 50, "popsize": 6},
    "minibatch8": {"d": 500, "n_prompt": 50, "popsize": 6, "train_batch": 8},
    "text-init": {"d": 500, "popsize": 6, "train_batch": 8, "init": "text", "alpha": 0.5},
    "tokens5": {"d": 50, "n_prompt": 5, "popsize": 6, "train_batch": 8},
    "spsa": {"d": 50, "n_prompt": 5, "popsize": 6, "train_batch": 8, "optimizer": "spsa"},
    "tokens5-es": {"d": 50, "n_prompt": 5, "popsize": 6, "train_batch": 8, "patience": 12},
    "tokens5-text": {"d": 50, "n_prompt": 5, "popsize": 6, "train_batch": 8, "init": "text", "alpha": 0.25},
}


ATTENTIONS = ("softmax", "rfa", "rfa-cal")
CAL_TAUS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2)


def public_sentences(root: str | None, n: int = 96) -> list[str]:
    """The model owner's public calibration text: the first ``n`` Wikipedia sentences of QNLI's test file
    (none of the tuned tasks; no labels used)."""
    path = data_root(root) / "k-shot" / "QNLI" / "16-13" / "test.tsv"
    rows = path.read_text(encoding="utf-8").splitlines()[1:]
    return [r.split("\t")[2] for r in rows[:n]]


@torch.no_grad()
def fit_rfa_taus(enc: Encoder[torch.Tensor], tokenizer: Any, sentences: Sequence[str],
                 taus: Sequence[float] = CAL_TAUS,
                 base: AttentionConfig | None = None) -> tuple[list[float], list[dict]]:
    """Per layer, the RFA temperature (from ``taus``) whose attention output is closest to softmax's on
    ``sentences`` (relative squared error over valid positions, with the layer's input from the softmax model:
    teacher forcing). The random frequencies are the servers' own (same seed and m), so the fit includes their
    noise. Returns the temperatures and a per-layer table of errors."""
    base = base or AttentionConfig("rfa")
    be = PlainBackend(torch.float32)
    e32 = enc.map_params(lambda _k, v: v.float(), keep_word_embeddings=True)
    cfg, nh, hs = e32.config, e32.config.n_heads, e32.config.head_size
    t = tokenizer(list(sentences), padding=True, truncation=True, max_length=64, return_tensors="pt")
    mask = t.attention_mask.to(torch.float32)
    h = Embeddings(cfg, _sub(e32.params, "emb.")).forward(be, e32.params["emb.word"][t.input_ids], None, None)
    valid = mask[:, None, :, None]
    soft = AttentionConfig("softmax")
    chosen, table = [], []
    for i in range(cfg.n_layers):
        pa = _sub(e32.params, f"layer.{i}.attn.")
        b, n, _ = h.shape
        w = torch.cat([pa["q.weight"], pa["k.weight"], pa["v.weight"]])
        qkv = be.linear(h, w, torch.cat([pa["q.bias"], pa["k.bias"], pa["v.bias"]]))
        q, k, v = (qkv[..., j * nh * hs:(j + 1) * nh * hs].reshape(b, n, nh, hs).transpose(1, 2) for j in range(3))
        ref = SelfAttention(cfg, soft, i, pa)._quadratic(be, soft.attention_kind, q, k, v, mask)
        errs = []
        for tau in taus:
            a = dataclasses.replace(base, rfa_tau=tau, rfa_tau_layers=())
            out = SelfAttention(cfg, a, i, pa)._rfa(be, q, k, v, mask)
            errs.append(float((((out - ref) ** 2) * valid).sum() / ((ref ** 2) * valid).sum()))
        j = int(np.argmin(errs))
        chosen.append(float(taus[j]))
        table.append({"layer": i, "errors": dict(zip(map(str, taus), errs, strict=True)), "tau": taus[j]})
        h = EncoderLayer(cfg, soft, i, _sub(e32.params, f"layer.{i}.")).forward(be, h, mask)
    return chosen, table


class SecfwtPlainEvaluator:
    """Plaintext evaluator on secfwt's encoder definition (PlainBackend, float32) with any attention: the
    similarity head of the servers (label descriptions through the same encoder; pooling without the prompt),
    the soft prompt after the first token, as :class:`~secfwt.tuning.objective.HFPlainEvaluator`."""

    mode = "plaintext"
    head = "similarity"

    def __init__(self, model_dir: Path, task: Any, attention: AttentionConfig, max_length: int = 64,
                 max_rows: int = 64, temperature: float = 20.0) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        enc64 = Encoder.from_pretrained(model_dir, attention)
        descs = [Example((d,), 0) for d in task.label_descriptions]
        lab = encode_examples(self.tokenizer, "{text}", descs, max_length, 0)
        ids = [r[m.bool()].tolist() for r, m in zip(lab.input_ids, lab.attention_mask, strict=True)]
        anchors = label_embeddings(enc64, ids, PlainBackend(torch.float64)).float()
        self.be = PlainBackend(torch.float32)
        self.enc = enc64.map_params(lambda _k, v: v.float(), keep_word_embeddings=True)
        self.head_ = SimilarityHead(anchors, "cosine", temperature, include_prompt=False)
        self.task, self.max_length, self.max_rows = task, max_length, max_rows
        self.attention = attention.attention_kind.value
        self.model_name = model_dir.parent.name if model_dir.name == "model" else model_dir.name
        self._table = enc64.params["emb.word"].float()
        self.hidden_size = int(self._table.shape[1])
        self.embedding_std = float(self._table.std())
        self.template = task.similarity_template
        self._cache: dict[Any, Encoded] = {}

    def init_prompt(self, n_prompt: int, seed: int, text: str | None = None) -> torch.Tensor:
        return initial_prompt(self._table, self.tokenizer, n_prompt, seed, text)

    def cost(self) -> None:
        return None

    @torch.no_grad()
    def logits(self, prompts: torch.Tensor, batch: Batch) -> torch.Tensor:
        key = batch.cache_key(int(prompts.shape[1]))
        if key not in self._cache:
            self._cache[key] = encode_examples(self.tokenizer, self.template, batch.examples, self.max_length,
                                               int(prompts.shape[1]))
        e = self._cache[key]
        n_pop, n_ex = prompts.shape[0], e.input_ids.shape[0]
        x = self._table[e.input_ids]  # (B, T, H)
        mask = e.attention_mask.to(torch.float32)
        out = torch.empty(n_pop * n_ex, self.task.n_labels, dtype=torch.float32)
        for lo in range(0, n_pop * n_ex, self.max_rows):
            rows = torch.arange(lo, min(lo + self.max_rows, n_pop * n_ex))
            o = self.enc.forward(self.be, x[rows % n_ex], mask[rows % n_ex], prompt=prompts.float()[rows // n_ex])
            out[rows] = self.head_.forward(self.be, o)
        return out.reshape(n_pop, n_ex, self.task.n_labels)


def grid(max_forwards: int) -> list[int]:
    """Budget points: powers of two from 64, and 2,560 (1% of BBT's budget), up to ``max_forwards``."""
    pts = {ONE_PERCENT} | {2**i for i in range(6, 40) if 2**i <= max_forwards}
    return sorted(p for p in pts if p <= max_forwards)


def _template_text(task_template: str, n_tokens: int) -> str:
    words = [w for w in task_template.replace("{text}", " ").replace("{mask}", " ").split() if w.isalpha()]
    return " ".join((words * n_tokens)[:n_tokens]) or "review"


def run_one(ev: Any, data: Any, strategy: str, seed: int, max_forwards: int,
            zero_shot: tuple[float, float], final_only: bool = False) -> list[dict]:
    """One tuning run in the clear; the test accuracy of the best-on-dev prompt at each budget point."""
    fields = dict(STRATEGIES[strategy])
    if fields.get("init") == "text":
        tok = ev.tokenizer
        n = int(fields.get("n_prompt", 50))
        text = _template_text(data.task.similarity_template if ev.head == "similarity" else data.task.template, n)
        fields["init_text"] = text
        fields["n_prompt"] = len(tok(text, add_special_tokens=False)["input_ids"])
    fields.setdefault("patience", None)
    base = TuneConfig(**fields, seed=seed, eval_every=1, zero_shot_floor=True)
    per_gen = base.popsize * min(base.train_batch or len(data.train), len(data.train)) + len(data.dev)
    iterations = max(1, -(-(max_forwards - len(data.dev)) // per_gen))  # enough to reach the last grid point
    cfg = dataclasses.replace(base, iterations=iterations)
    proj = make_projection(ev, cfg)
    test = Batch.of(data.eval_split, data.eval)
    points = [max_forwards] if final_only else grid(max_forwards)
    out: list[dict] = []
    state = {"next": 0, "spent": len(data.dev)}  # the zero-shot dev floor

    cache: dict[bytes, float] = {}  # the selection changes rarely: score each selected prompt on test once

    def score(z: np.ndarray | None, best_dev: float) -> float:
        if z is None or best_dev < zero_shot[0]:
            return zero_shot[1]
        key = z.tobytes()
        if key not in cache:
            cache[key] = float(accuracy(ev.logits(proj(z[None]), test), test.labels)[0])
        return cache[key]

    best: dict[str, Any] = {"dev": -1.0, "z": None, "iteration": 0}

    def observe(rec: IterRecord, z: np.ndarray | None) -> None:
        state["spent"] += per_gen
        if rec.dev_acc is not None:
            best["dev"] = max(best["dev"], rec.dev_acc)
        best["z"], best["iteration"] = z, rec.iteration
        while state["next"] < len(points) and state["spent"] >= points[state["next"]]:
            # the point is reached within this generation: what was selected before it is what that budget buys
            out.append({"forwards": points[state["next"]], "test_acc": score(z, best["dev"]),
                        "best_dev": best["dev"], "iteration": rec.iteration, "spent": points[state["next"]]})
            state["next"] += 1

    tune(ev, data, cfg, progress=False, observe=observe)
    for x in points[state["next"]:]:  # stopped early (patience): a larger budget buys the same selection
        out.append({"forwards": x, "test_acc": score(best["z"], best["dev"]), "best_dev": best["dev"],
                    "iteration": best["iteration"], "spent": state["spent"]})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="sst2,mr,agnews,rte")
    p.add_argument("--seeds", default="13,42,100")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--model", default="")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--max-forwards", type=int, default=25600)
    p.add_argument("--max-eval", type=int, default=500, help="seeded test subsample per task")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="benchmarks/results/budget_curve")
    p.add_argument("--attention", default="softmax", choices=ATTENTIONS)
    p.add_argument("--final-only", action="store_true",
                   help="score test only at --max-forwards (not at every grid point): one comparison, fewer forwards")
    p.add_argument("--fresh", action="store_true", help="start a new results file (default: resume <out>.json, "
                   "skipping the task/seed/strategy runs it holds)")
    a = p.parse_args(argv)
    unknown = [s for s in a.strategies.split(",") if s not in STRATEGIES]
    if unknown:
        p.error(f"--strategies: unknown {unknown[0]!r} (known: {', '.join(STRATEGIES)})")
    from secfwt.alloc import configure_malloc

    configure_malloc()  # the many differently shaped plaintext forwards churn glibc's heap (half the CPU in the kernel)
    rows: list[dict] = []
    start = time.time()
    out = Path(a.out)
    earlier: list[dict] = []
    if not a.fresh and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        rows = old["rows"]
        earlier = [*old["meta"].pop("earlier", []), old["meta"]]
    done = {(r["task"], r["seed"], r["strategy"], r.get("attention", "softmax")) for r in rows}
    attention, calibration = rfa_attention(a)

    def info() -> dict[str, Any]:
        extra = {"rfa_calibration": calibration} if calibration else {}
        return {**meta(a, argv, start), "earlier": earlier, **extra}  # the sessions that measured the resumed rows
    for task_name in a.tasks.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            if all((task_name, seed, st, a.attention) in done for st in a.strategies.split(",")):
                continue
            data = load_task_data(get_task(task_name), a.data_root, k=a.k, seed=seed, max_eval=a.max_eval)
            spec = RunSpec(task=task_name, model=a.model, mode="plaintext", attention={"kind": "softmax"}, k=a.k,
                           seed=seed,
                           max_length=a.max_length, progress=False)

            def job(ev: Any, data: Any = data, task_name: str = task_name, seed: int = seed) -> None:
                empty = torch.zeros(1, 0, ev.hidden_size)
                dev, test = Batch.of("dev", data.dev), Batch.of(data.eval_split, data.eval)
                zs = (float(accuracy(ev.logits(empty, dev), dev.labels)[0]),
                      float(accuracy(ev.logits(empty, test), test.labels)[0]))
                for strategy in a.strategies.split(","):
                    if (task_name, seed, strategy, a.attention) in done:
                        continue
                    t0 = time.time()
                    pts = run_one(ev, data, strategy, seed, a.max_forwards, zs, a.final_only)
                    for pt in pts:
                        rows.append({"task": task_name, "seed": seed, "strategy": strategy, "attention": a.attention,
                                     "template_test": zs[1],
                                     "template_dev": zs[0], "n_test": len(data.eval), **pt})
                    save(out, rows, info())  # after every run: a long sweep keeps what it measured
                    last = pts[-1] if pts else {}
                    print(f"{task_name} seed {seed} {strategy}: template {zs[1]:.3f} -> {last.get('test_acc', 0):.3f} "
                          f"at {last.get('forwards', 0)} forwards ({time.time() - t0:.0f} s)", flush=True)

            if attention is None:
                run_job(spec, data.task, job)
            else:
                job(SecfwtPlainEvaluator(spec.model_dir(), data.task, attention, max_length=a.max_length))
    save(out, rows, info())
    print(summary(rows))
    print(rfa_table(rows))
    plot(rows, out.with_suffix(".png"))
    return 0


def rfa_attention(a: argparse.Namespace) -> tuple[AttentionConfig | None, list[dict]]:
    """The attention config of ``--attention`` (None: the HuggingFace softmax forward) and, for ``rfa-cal``,
    the calibration table (per layer: the errors of every temperature tried and the one chosen)."""
    if a.attention == "softmax":
        return None, []
    if a.attention == "rfa":
        return AttentionConfig("rfa"), []
    from transformers import AutoTokenizer

    model_dir = RunSpec(model=a.model).model_dir()
    enc = Encoder.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    taus, table = fit_rfa_taus(enc, tok, public_sentences(a.data_root))
    print(f"rfa-cal: per-layer temperatures {taus} (fitted on {len(public_sentences(a.data_root))} public "
          "sentences)", flush=True)
    return AttentionConfig("rfa", rfa_tau_layers=tuple(taus)), table


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meta(a: argparse.Namespace, argv: Sequence[str] | None, start: float) -> dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(),
            "command": "python benchmarks/budget_curve.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "wall_s": time.time() - start, "k": a.k, "max_eval": a.max_eval, "max_forwards": a.max_forwards,
            "strategies": STRATEGIES}


def save(out: Path, rows: list[dict], info: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": info, "rows": rows}, indent=1))


def summary(rows: list[dict]) -> str:
    """Per strategy: the mean gain over the template within 2,560 forwards, as a fraction of the mean gain of the
    longest budget (over every task and seed)."""
    rows = [r for r in rows if r.get("attention", "softmax") == "softmax"]  # RFA runs: rfa_table()
    lines = ["strategy | gain@2560 | gain@max | fraction"]
    for strategy in sorted({r["strategy"] for r in rows}):
        at, full = [], []
        for key in sorted({(r["task"], r["seed"]) for r in rows if r["strategy"] == strategy}):
            pts = [r for r in rows if r["strategy"] == strategy and (r["task"], r["seed"]) == key]
            within = [r for r in pts if r["forwards"] <= ONE_PERCENT]
            if within:
                at.append(within[-1]["test_acc"] - within[-1]["template_test"])
            full.append(pts[-1]["test_acc"] - pts[-1]["template_test"])
        g1, gm = float(np.mean(at)) if at else float("nan"), float(np.mean(full))
        lines.append(f"{strategy} | {g1:+.4f} | {gm:+.4f} | {g1 / gm if gm else float('nan'):.2f}")
    return "\n".join(lines)


def rfa_table(rows: list[dict]) -> str:
    """Per task/seed/strategy with an RFA run: template and tuned test accuracy of each attention at the largest
    budget the RFA runs scored (the softmax run's point at that budget)."""
    def att(r: dict) -> str:
        return str(r.get("attention", "softmax"))

    lines = ["task seed strategy forwards | attention: template -> tuned"]
    for key in sorted({(r["task"], r["seed"], r["strategy"]) for r in rows if att(r) != "softmax"}):
        same = [r for r in rows if (r["task"], r["seed"], r["strategy"]) == key]
        x = max(r["forwards"] for r in same if att(r) != "softmax")
        cells = [f"{a}: {r['template_test']:.3f} -> {r['test_acc']:.3f}"
                 for a in ATTENTIONS for r in same if att(r) == a and r["forwards"] == x]
        lines.append(f"{key[0]} {key[1]} {key[2]} {x} | " + " | ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    rows = [r for r in rows if r.get("attention", "softmax") == "softmax"]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for strategy in sorted({r["strategy"] for r in rows if r["task"] == task}):
            pts = [r for r in rows if r["task"] == task and r["strategy"] == strategy]
            xs = sorted({r["forwards"] for r in pts})
            by = [[r["test_acc"] for r in pts if r["forwards"] == x] for x in xs]
            mean = [float(np.mean(v)) for v in by]
            n_seeds = len({r["seed"] for r in pts})
            ax.plot(xs, mean, marker=".", label=f"{strategy} ({n_seeds} seed{'s' if n_seeds > 1 else ''})")
            ax.fill_between(xs, [min(v) for v in by], [max(v) for v in by], alpha=0.15)
        tmpl = float(np.mean(list({r["seed"]: r["template_test"] for r in rows if r["task"] == task}.values())))
        ax.axhline(tmpl, color="grey", linestyle="--", linewidth=1, label="template (mean over seeds)")
        ax.axvline(ONE_PERCENT, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("sequence forwards (train + dev)")
        ax.set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
