"""SecretFlow SPU (0.9.5) side of the secfwt comparison benchmark (run inside the SPU venv).

    $CACHE/spu-venv/bin/python benchmarks/compare/spu_worker.py \
        --workload matmul,softmax --repeats 1 [--link proc|mem] [--batch 1 --seq 128]

The workload is written in jax.numpy (the same model code as the float64 NumPy reference in
workloads.py), compiled once by SPU's frontend, and run by two SEMI2K parties over Z_2^64
(FM64, SPU's default fixed point). ``--link proc`` (default) runs the two parties as two
processes linked by SPU's brpc link on 127.0.0.1; ``--link mem`` runs them as two threads of one
process with SPU's in-memory link (what ``spu.utils.simulation`` does). Beaver triples come from
SPU's default trusted-first-party generator (no dealer traffic).

Inputs are secret-shared by ``spu.api.Io`` before the timed region (every input is
VIS_SECRET; activations are party 0's data and weights party 1's by convention, but SPU's Io
shares them centrally). The timed region is ``Runtime.run`` of the compiled program; outputs are
reconstructed afterwards and compared with the plaintext reference.

Communication: SPU 0.9.5's Python API exposes no link statistics, but with
``enable_pphlo_profile`` the runtime logs ``Link details: total send bytes ..., recv bytes ...,
send actions ..., recv actions ...`` for each run. Each party's log is captured (fd redirection)
and parsed: ``bytes_per_server`` = send + recv bytes of one party (same convention as CrypTen's
counter) and ``rounds`` = send actions of one party (messages sent; in 2PC each party sends one
message per round to its peer, so this approximates the round count).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import workloads as W  # noqa: E402

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.experimental  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.scipy.special  # noqa: E402
import spu.api as spu_api  # noqa: E402
import spu.libspu as libspu  # noqa: E402
import spu.utils.frontend as spu_fe  # noqa: E402

ENGINE = "spu"
LINK_RE = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), send actions (\d+), "
                     r"recv actions (\d+)")


class JaxOps:
    exp = staticmethod(jnp.exp)
    sqrt = staticmethod(jnp.sqrt)
    tanh = staticmethod(jnp.tanh)
    erf = staticmethod(jax.scipy.special.erf)
    rsqrt = staticmethod(jax.lax.rsqrt)
    cos = staticmethod(jnp.cos)
    sin = staticmethod(jnp.sin)
    concatenate = staticmethod(jnp.concatenate)


# --------------------------------------------------------------------------- programs


def _cross_entropy(logits, onehot):
    return -(jax.nn.log_softmax(logits, axis=-1) * onehot).sum(-1).mean()


def program(case: W.Case, gelu: str, lr: float):
    """Returns (jax function, argument tuple) for a workload."""
    n = case.name
    if n == "matmul":
        return (lambda x, w: x @ w), (case.x, case.params["w"])
    if n == "softmax":
        return (lambda x: W.ref_softmax(x, ops=JaxOps)), (case.x,)
    if n == "gelu":
        return (lambda x: W.ref_gelu(x, JaxOps, gelu)), (case.x,)
    if n == "layernorm":
        p = case.params
        return (lambda x, g, b: W.ref_layernorm(x, g, b, JaxOps)), (case.x, p["g"], p["b"])
    if n == "encoder_layer":
        return (lambda x, p: W.ref_encoder_layer(x, p, "l0.", W.BERT_BASE, JaxOps, gelu),
                (case.x, case.params))
    if n == "small_model_forward":
        return (lambda x, p: W.ref_small_model(x, p, W.MINILM, JaxOps, gelu)), (case.x, case.params)
    if n == "tuning_step":
        onehot = np.eye(W.N_CLASSES)[case.labels]

        def step(x, y, p):
            def loss_fn(p):
                return _cross_entropy(W.ref_small_model(x, p, W.MINILM, JaxOps, gelu)[1], y)

            loss, grads = jax.value_and_grad(loss_fn)(p)
            new_p = jax.tree_util.tree_map(lambda a, g: a - lr * g, p, grads)
            return loss, grads, new_p

        return step, (case.x, onehot, case.params)
    raise ValueError(n)


def paper_program(case: W.Case, method: str, gelu: str, lr: float, rfa_ws: list[np.ndarray] | None):
    """(jax function, arguments) of one ``paper_iteration`` method (issue 18), as CrypTen's rows define it:
    sft = forward, cross-entropy, backward and SGD on every weight (outputs: loss, every gradient, every updated
    weight); prompt_tuning = the same with only the soft prompt (the first n_prompt positions) trainable;
    fot = one forward (outputs: last hidden state, logits); fot_rfa = fot with RFA (SPU's own cos and sin;
    the public frequencies ``rfa_ws`` are constants of the program)."""
    d = W.BertDims(**case.meta["dims"])
    n = case.meta["n_prompt"]
    onehot = np.eye(W.N_CLASSES)[case.labels]
    if method in ("fot", "fot_rfa"):
        ws = rfa_ws if method == "fot_rfa" else None
        if method == "fot_rfa" and ws is None:
            raise ValueError("fot_rfa needs the RFA frequencies (--rfa-freqs; SPU's venv has no torch to draw them)")
        return (lambda x, p: W.ref_small_model(x, p, d, JaxOps, gelu, rfa=ws is not None, rfa_ws=ws)), (case.x,
                                                                                                      case.params)

    def sgd(tree, grads):
        return jax.tree_util.tree_map(lambda a, g: a - lr * g, tree, grads)

    if method == "sft":
        def sft(x, y, p):
            loss, grads = jax.value_and_grad(lambda q: _cross_entropy(W.ref_small_model(x, q, d, JaxOps, gelu)[1],
                                                                      y))(p)
            return loss, grads, sgd(p, grads)

        return sft, (case.x, onehot, case.params)
    if method == "prompt_tuning":
        def prompt_step(prompt, rest, y, p):
            def loss_fn(pr):
                return _cross_entropy(W.ref_small_model(jnp.concatenate([pr, rest], 1), p, d, JaxOps, gelu)[1], y)

            loss, g = jax.value_and_grad(loss_fn)(prompt)
            return loss, g, sgd(prompt, g)

        return prompt_step, (case.x[:, :n], case.x[:, n:], onehot, case.params)
    raise ValueError(f"paper_iteration: unknown method {method!r}")


def paper_reference(case: W.Case, method: str, lr: float, rfa_ws: list[np.ndarray] | None) -> list:
    """float64 outputs of the same program (exact-erf GELU), in the order of its outputs' leaves."""
    if method in ("fot", "fot_rfa"):
        d = W.BertDims(**case.meta["dims"])
        return list(W.ref_small_model(case.x, case.params, d, rfa=method == "fot_rfa", rfa_ws=rfa_ws))
    fn, args = paper_program(case, method, "erf", lr, rfa_ws)
    with jax.experimental.enable_x64():
        out = jax.jit(fn)(*jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), args))
        return [np.asarray(a) for a in jax.tree_util.tree_leaves(out)]


def reference_outputs(case: W.Case, gelu: str, lr: float):
    """float64 plaintext outputs (exact erf GELU) as a flat list matching the program's outputs."""
    if case.name != "tuning_step":
        ref = W.reference(case)
        if case.name == "small_model_forward":
            return [ref, W.ref_small_model(case.x, case.params)[1]]
        return [ref]
    fn, args = program(case, "erf", lr)
    with jax.experimental.enable_x64():
        out = jax.jit(fn)(*jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), args))
        return [np.asarray(a) for a in jax.tree_util.tree_leaves(out)]


# --------------------------------------------------------------------------- running the parties


def _config(args) -> libspu.RuntimeConfig:
    cfg = libspu.RuntimeConfig(protocol=libspu.ProtocolKind.SEMI2K, field=libspu.FieldType.FM64)
    if args.fraction_bits:
        cfg.fxp_fraction_bits = args.fraction_bits
    cfg.enable_pphlo_profile = True  # makes the runtime log link statistics per run
    return cfg


def _party(rank, lctx, cfg, executable, shares, runs) -> dict:
    times, outs = [], None
    for _ in range(runs):
        rt = spu_api.Runtime(lctx, libspu.RuntimeConfig(cfg))
        for name, sh in zip(executable.input_names, shares, strict=True):
            rt.set_var(name, sh[rank])
        lctx.barrier()
        t0 = time.perf_counter()
        rt.run(executable)
        times.append(time.perf_counter() - t0)
        outs = [rt.get_var(name) for name in executable.output_names]
    return {"rank": rank, "times": times, "outs": outs}


def _proc_main(rank, ports, cfg_bytes, executable, shares, runs, log_path, queue):
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        cfg = libspu.RuntimeConfig()
        cfg.ParseFromString(cfg_bytes)
        desc = libspu.link.Desc()
        desc.recv_timeout_ms = 3_600_000
        desc.http_timeout_ms = 3_600_000
        desc.connect_retry_times = 120
        desc.connect_retry_interval_ms = 500
        for r, port in enumerate(ports):
            desc.add_party(f"party{r}", f"127.0.0.1:{port}")
        lctx = libspu.link.create_brpc(desc, rank)
        res = _party(rank, lctx, cfg, executable, shares, runs)
        lctx.stop_link()
        queue.put(res)
    except BaseException as exc:  # report to the parent instead of hanging it
        queue.put({"rank": rank, "error": repr(exc)})
        raise


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_proc(cfg, executable, shares, runs, tmpdir):
    # spawn, not fork: the parent's JAX and libspu thread pools make forked children hang
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ports = _free_ports(2)
    logs = [os.path.join(tmpdir, f"party{r}.log") for r in range(2)]
    procs = [ctx.Process(target=_proc_main, args=(r, ports, cfg.SerializeToString(), executable, shares,
                                                  runs, logs[r], queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = []
    for _ in procs:
        results.append(queue.get(timeout=7200))
        if "error" in results[-1]:
            break
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.terminate()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"SPU party failed: {errors}; logs: {logs}")
    results.sort(key=lambda r: r["rank"])
    stats = [[tuple(map(int, m)) for m in LINK_RE.findall(Path(p).read_text(errors="replace"))] for p in logs]
    return results, stats


def run_mem(cfg, executable, shares, runs, tmpdir):
    desc = libspu.link.Desc()
    for r in range(2):
        desc.add_party(f"party{r}", f"thread_{r}")
    log_path = os.path.join(tmpdir, "mem.log")
    results: list = [None, None]
    errors: list = []

    def target(rank):
        try:
            results[rank] = _party(rank, libspu.link.create_mem(desc, rank), cfg, executable, shares, runs)
        except BaseException as exc:
            errors.append(repr(exc))

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        threads = [threading.Thread(target=target, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(fd)
    if errors:
        raise RuntimeError(f"SPU party failed: {errors}")
    # both parties log into one file; runs alternate, so split the lines by order of appearance
    found = [tuple(map(int, m)) for m in LINK_RE.findall(Path(log_path).read_text(errors="replace"))]
    return results, [found[0::2], found[1::2]]


def _error_summary(name: str, errs: list[float], refs: list, n_params: int) -> dict:
    if name == "tuning_step":  # outputs: loss, grads (n_params), updated params (n_params)
        return {"loss": errs[0], "grad": max(errs[1:1 + n_params]),
                "grad_abs_max_ref": max(float(np.max(np.abs(r))) for r in refs[1:1 + n_params]),
                "update": max(errs[1 + n_params:])}
    names = ["out", "logits"] if name == "small_model_forward" else ["out"]
    return dict(zip(names, errs, strict=True))


def secure_run(fn, fargs, args) -> tuple[list, list[float], dict]:
    """Compile ``fn`` for SPU, share ``fargs`` (all secret), run it ``warmup + repeats`` times as two parties;
    returns (reconstructed outputs, the timed repeats' seconds, link statistics and compile time)."""
    fargs32 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), fargs)
    leaves = jax.tree_util.tree_leaves(fargs32)
    in_names = [f"in{i}" for i in range(len(leaves))]
    t0 = time.perf_counter()
    executable, out_tree = spu_fe.compile(
        spu_fe.Kind.JAX, fn, fargs32, {}, in_names, [libspu.Visibility.VIS_SECRET] * len(leaves),
        lambda outs: [f"out{i}" for i in range(len(outs))])
    compile_s = time.perf_counter() - t0
    cfg = _config(args)
    io = spu_api.Io(2, cfg)
    shares = [io.make_shares(np.asarray(a), libspu.Visibility.VIS_SECRET) for a in leaves]
    runs = args.warmup + args.repeats
    with tempfile.TemporaryDirectory(prefix="spu-bench-") as tmpdir:
        runner = run_proc if args.link == "proc" else run_mem
        results, stats = runner(cfg, executable, shares, runs, tmpdir)
    outs = [io.reconstruct([results[0]["outs"][i], results[1]["outs"][i]])
            for i in range(len(executable.output_names))]
    per_rep = [max(r["times"][i] for r in results) for i in range(args.warmup, runs)]
    # stats[p] has one (send, recv, send_actions, recv_actions) tuple per run of party p
    have_stats = all(len(s) == runs for s in stats)
    if have_stats:
        kept = [s[args.warmup:] for s in stats]
        per_party_bytes = [statistics.median(a + b for a, b, _, _ in k) for k in kept]
        per_party_rounds = [statistics.median(c for _, _, c, _ in k) for k in kept]
        bytes_per_server, rounds = statistics.mean(per_party_bytes), max(per_party_rounds)
    else:
        per_party_bytes = per_party_rounds = None
        bytes_per_server = rounds = None
    link = {"bytes_per_server": bytes_per_server, "rounds": rounds, "bytes_per_party": per_party_bytes,
            "rounds_per_party": per_party_rounds, "have_stats": have_stats, "compile_s": compile_s, "cfg": cfg}
    return outs, per_rep, link


def _link_fields(link: dict, args) -> dict:
    """The record fields every SPU row carries about the protocol and the link."""
    b = link["bytes_per_party"]
    return {
        "status": "ok",
        "protocol": "SPU SEMI2K, FM64, trusted-first-party beaver",
        "fxp_fraction_bits": link["cfg"].fxp_fraction_bits or "default",
        "link": "brpc over 127.0.0.1, 2 processes" if args.link == "proc" else "in-memory, 2 threads",
        "bytes_per_party": b,
        "total_bytes": sum(b) / 2 if b else None,
        "rounds_per_party": link["rounds_per_party"],
        "dealer_bytes": 0,
        "bytes_note": "per-party SPU link stats: send + recv bytes; rounds = send actions of one party"
                      if link["have_stats"] else "SPU did not log link statistics",
        "compile_s": round(link["compile_s"], 2),
    }


def run_workload(name: str, args) -> dict:
    case = W.make_case(name, batch=args.batch, seq=args.seq, seed=args.seed)
    fn, fargs = program(case, args.gelu, args.lr)
    outs, per_rep, link = secure_run(fn, fargs, args)
    refs = reference_outputs(case, args.gelu, args.lr)
    errs = [float(np.max(np.abs(np.asarray(o, np.float64) - r))) for o, r in zip(outs, refs, strict=True)]
    extra = {
        **_link_fields(link, args),
        "gelu": args.gelu if name not in ("matmul", "softmax", "layernorm") else None,
        "times_s": [round(t, 4) for t in per_rep],
        "errors": _error_summary(name, errs, refs, len(case.params)),
        **case.meta,
    }
    if name == "tuning_step":
        extra["lr"] = args.lr
        extra["note"] = ("random-init MiniLM-sized model; jax.value_and_grad + SGD compiled into SPU; "
                         "reference: the same jax program in float64 on the CPU")
    return W.result_record(name, ENGINE, per_rep, link["bytes_per_server"], link["rounds"], max(errs), args.repeats,
                           **extra)


def run_paper(method: str, args) -> dict:
    """One ``paper_iteration`` method (paper_program) at ``--seq``, ``--layers``; checked against float64."""
    case = W.make_paper_case(args.seq, args.layers, method, batch=args.batch, seed=args.seed, tiny=args.tiny)
    rfa_ws = None
    if args.rfa_freqs:
        with np.load(args.rfa_freqs) as f:
            rfa_ws = [f[f"l{i}"] for i in range(args.layers)]
    t0 = time.perf_counter()
    fn, fargs = paper_program(case, method, args.gelu, args.lr, rfa_ws)
    outs, per_rep, link = secure_run(fn, fargs, args)
    refs = paper_reference(case, method, args.lr, rfa_ws)
    errs = [float(np.max(np.abs(np.asarray(o, np.float64) - r))) for o, r in zip(outs, refs, strict=True)]
    if method in ("fot", "fot_rfa"):
        errors = {"hidden": errs[0], "logits": errs[1]}
    else:  # leaves: loss, gradients, updated tensors (sft: one per weight; prompt_tuning: the prompt)
        k = (len(errs) - 1) // 2
        errors = {"loss": errs[0], "grad": max(errs[1:1 + k]), "update": max(errs[1 + k:]),
                  "grad_abs_max_ref": max(float(np.max(np.abs(r))) for r in refs[1:1 + k])}
    rec = W.result_record(
        "paper_iteration", ENGINE, per_rep, link["bytes_per_server"], link["rounds"],
        max(v for key, v in errors.items() if key != "grad_abs_max_ref"), args.repeats, method=method,
        seq=args.seq, layers=args.layers, positions=case.meta["positions"], n_prompt=case.meta["n_prompt"],
        **_link_fields(link, args), gelu=args.gelu, times_s=[round(t, 4) for t in per_rep], errors=errors,
        lr=args.lr, wall_s=round(time.perf_counter() - t0, 2), dims=case.meta["dims"], init="random",
        note={"sft": "forward, cross-entropy, backward, SGD on every weight (jax.value_and_grad compiled by SPU)",
              "prompt_tuning": "forward, cross-entropy, backward to the soft prompt, SGD on it",
              "fot": "one candidate's forward (softmax attention)",
              "fot_rfa": "one candidate's forward, RFA with SPU's cos and sin"}[method])
    rec["attention"] = W.METHOD_ATTENTION[method]
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="SPU side of the secfwt comparison benchmark")
    ap.add_argument("--workload", default="matmul", help=f"comma list of {W.WORKLOADS} or 'all'")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--link", choices=["proc", "mem"], default="proc")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--gelu", choices=["tanh", "erf"], default="tanh")
    ap.add_argument("--fraction-bits", type=int, default=0, help="0 = SPU's default for FM64")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also append the JSON lines to this file")
    ap.add_argument("--method", default="sft,prompt_tuning,fot", help="paper_iteration: comma list of methods")
    ap.add_argument("--layers", type=int, default=1, help="paper_iteration: RoBERTa-large-sized layers")
    ap.add_argument("--tiny", action="store_true", help="paper_iteration: toy sizes (tests)")
    ap.add_argument("--rfa-freqs", help="paper_iteration fot_rfa: .npz of each layer's RFA frequencies (l0, l1, ...)")
    args = ap.parse_args(argv)
    status = 0
    for name in W.parse_workloads(args.workload):
        if name == "paper_iteration":
            for method in W.paper_methods(args.method):
                try:
                    rec = run_paper(method, args)
                except Exception as exc:  # keep going with the other methods
                    rec = W.result_record("paper_iteration", ENGINE, [], None, None, None, args.repeats,
                                          status="failed", method=method, seq=args.seq, layers=args.layers,
                                          error=repr(exc)[:2000])
                    rec["attention"] = W.METHOD_ATTENTION[method]
                W.emit(rec, args.out)
                status |= rec.get("status") != "ok"
            continue
        try:
            rec = run_workload(name, args)
        except Exception as exc:  # keep going with the other workloads
            rec = W.result_record(name, ENGINE, [], None, None, None, args.repeats, status="failed",
                                  error=repr(exc)[:2000])
        W.emit(rec, args.out)
        status |= rec.get("status") != "ok"
    return status


if __name__ == "__main__":
    sys.exit(main())
