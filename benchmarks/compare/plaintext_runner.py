"""The plaintext floor of the comparison: every workload in plain PyTorch (float32, one thread, no MPC).

    python benchmarks/compare/plaintext_runner.py --workload all --repeats 1 [--out rows.jsonl]

Same shapes, inputs and models as ``secfwt_runner.py``: the ops with torch functions, the BERT layer, the
MiniLM forward and the tuning step with secfwt's model definition on :class:`~secfwt.nn.backend.PlainBackend`
in float32 (the tuning step is one CMA-ES generation of :mod:`secfwt.tuning.fot` with a plaintext evaluator
of the same similarity head). One untimed warm-up run first; ``time_s`` is the median of the timed runs;
``max_abs_error`` is float32 against the float64 reference; bytes and rounds are 0.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import workloads as W  # noqa: E402
from secfwt_cases import (  # noqa: E402
    PlainSimilarity,
    max_abs,
    minilm_dir,
    model_case,
    op_case,
    op_reference,
    plain_model,
    plain_op,
    tuning_texts,
)
from secfwt_runner import Job, runner_main  # noqa: E402

from secfwt.nn.backend import PlainBackend  # noqa: E402

ENGINE = "plaintext"
F32 = PlainBackend(torch.float32)
F64 = PlainBackend(torch.float64)


def _timed(fn: Any, repeats: int) -> tuple[list[float], Any]:
    out = fn()  # warm-up (allocator, lazy init), not timed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


class PlainTuningEvaluator:
    """A plaintext :class:`~secfwt.tuning.objective.Evaluator` on :class:`PlainSimilarity` (float32)."""

    mode = "plaintext"
    model_name = "all-MiniLM-L6-v2"

    def __init__(self, job: Job, dtype: torch.dtype) -> None:
        from transformers import AutoTokenizer

        from secfwt.tuning.data import Example
        from secfwt.tuning.encode import encode_examples
        from secfwt.tuning.tasks import get_task

        self.dir = Path(job.model) if job.model else minilm_dir()
        self.tok = AutoTokenizer.from_pretrained(str(self.dir), local_files_only=True)
        self.task = get_task("demo")
        self.seq = job.seq
        self.attention = job.attention or "softmax"
        descs = [Example((d,), 0) for d in self.task.label_descriptions]
        lab = encode_examples(self.tok, "{text}", descs, job.seq, 0)
        self.label_ids = [r[m.bool()].tolist() for r, m in zip(lab.input_ids, lab.attention_mask, strict=True)]
        self.model = PlainSimilarity.build(self.dir, self.attention, self.label_ids, 20.0, dtype)
        word = self.model.encoder.params["emb.word"]
        self.hidden_size = int(word.shape[1])
        self.embedding_std = float(word.double().std())
        self.last: tuple[torch.Tensor, torch.Tensor, Any] | None = None

    def encoded(self, batch: Any, n_prompt: int) -> Any:
        from secfwt.tuning.encode import encode_examples

        return encode_examples(self.tok, self.task.similarity_template, batch.examples, self.seq, n_prompt)

    def logits(self, prompts: torch.Tensor, batch: Any) -> torch.Tensor:
        enc = self.encoded(batch, int(prompts.shape[1]))
        out = self.model.logits(prompts, enc.input_ids, enc.attention_mask)
        self.last = (prompts.clone(), out.clone(), enc)
        return out.float()

    def init_prompt(self, n_prompt: int, seed: int) -> None:
        return None

    def cost(self) -> None:
        return None


def tuning_step(job: Job) -> dict[str, Any]:
    from secfwt.tuning.data import Example, TaskData
    from secfwt.tuning.fot import TuneConfig, _Loop

    ev = PlainTuningEvaluator(job, torch.float32)
    examples = tuple(Example((t,), i % 2) for i, t in enumerate(tuning_texts(job.batch)))
    data = TaskData(ev.task, examples, examples, examples, "test", k=job.batch, seed=0)
    tcfg = TuneConfig(d=job.d, n_prompt=job.n_prompt, popsize=job.popsize, iterations=2, eval_every=10**9,
                      patience=None, seed=job.seed)
    times, _ = _timed(lambda: _Loop(ev, data, tcfg).step(), job.repeats)
    assert ev.last is not None
    prompts, got, enc = ev.last
    ref = PlainSimilarity.build(ev.dir, ev.attention, ev.label_ids, 20.0, torch.float64)
    want = ref.logits(prompts.double(), enc.input_ids, enc.attention_mask)
    return _record(job, times, {"label_logits": max_abs(got, want)}, popsize=job.popsize, n_prompt=job.n_prompt,
                   batch=job.batch, seq=int(enc.input_ids.shape[1]) + job.n_prompt,
                   note="includes Projection set-up and CMA-ES ask/tell (as the secfwt step does)")


def run_job(job: Job) -> dict[str, Any]:
    torch.set_num_threads(1)
    if job.workload == "tuning_step":
        return tuning_step(job)
    if job.workload == "small_model_forward":
        mc = model_case(Path(job.model) if job.model else None, job.batch, job.seq, job.attention or "softmax")
        times, (hid, pooled) = _timed(lambda: plain_model(mc, F32), job.repeats)
        want_h, want_p = plain_model(mc, F64)
        return _record(job, times, {"hidden": max_abs(hid, want_h), "pooled": max_abs(pooled, want_p)},
                       batch=job.batch, seq=job.seq)
    case = op_case(job.workload, job.attention, job.tiny)
    with torch.no_grad():
        times, out = _timed(lambda: plain_op(case, F32), job.repeats)
    return _record(job, times, {"out": max_abs(out, op_reference(case))}, shape=case.shape)


def _record(job: Job, times: list[float], errors: dict[str, float], **extra: Any) -> dict[str, Any]:
    rec = W.result_record(job.workload, ENGINE, times, 0, 0, max(errors.values()), job.repeats, status="ok",
                          times_s=[round(t, 6) for t in times], dtype="float32", threads=1, errors=errors,
                          **extra)
    rec["attention"] = job.attention
    return rec


def main(argv: list[str] | None = None) -> int:
    return runner_main(__doc__, run_job, argv)


if __name__ == "__main__":
    sys.exit(main())
