"""CrypTen 0.4.1 side of the secfwt comparison benchmark (run inside the CrypTen venv).

    $CACHE/crypten-venv/bin/python benchmarks/compare/crypten_worker.py \
        --workload matmul,softmax --repeats 1 [--provider TTP|TFP] [--batch 1 --seq 128]

Two CrypTen parties run as two real processes (``crypten.mpc.run_multiprocess``: fork, gloo over
a file rendezvous, TCP on the loopback interface), plus a third TTP process when
``--provider TTP`` (the default; CrypTen's trusted third party, the analogue of secfwt's dealer).
All inputs are secret-shared before the timed region: activations by party 0, weights by
party 1. The timed region is the secure computation only; the output is opened afterwards and
compared with a float64 plaintext reference. One JSON line per workload goes to stdout.

Communication comes from CrypTen's own counters (``cfg.communicator.verbose = True``,
``comm.get().get_communication_stats()``). Each party counts the elements it sends *and*
receives, times 8 bytes, and one round per communication call. TTP traffic (requests from party
0 and the dealer's correction shares) is measured separately (``dealer_bytes``) by saving and
restoring the counters around ``TTPClient.ttp_request`` in this process; CrypTen's files are not
changed.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import workloads as W  # noqa: E402

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only

import crypten  # noqa: E402
import crypten.communicator as comm  # noqa: E402
import crypten.mpc  # noqa: E402
import torch  # noqa: E402

ENGINE = "crypten"
DEALER = {"bytes": 0.0, "rounds": 0}


# --------------------------------------------------------------------------- accounting


def _patch_ttp_accounting() -> None:
    """Move the traffic of TTP requests out of the party's online counters into DEALER."""
    from crypten.mpc.provider import ttp_provider

    inner = ttp_provider.TTPClient._TTPClient__TTPClient
    if getattr(inner.ttp_request, "_secfwt_wrapped", False):
        return
    orig = inner.ttp_request

    def ttp_request(self, *args, **kwargs):
        c = comm.get()
        rounds, nbytes = c.comm_rounds, c.comm_bytes
        result = orig(self, *args, **kwargs)
        DEALER["rounds"] += c.comm_rounds - rounds
        DEALER["bytes"] += c.comm_bytes - nbytes
        c.comm_rounds, c.comm_bytes = rounds, nbytes
        return result

    ttp_request._secfwt_wrapped = True
    inner.ttp_request = ttp_request


def _reset_stats() -> None:
    comm.get().reset_communication_stats()
    DEALER["bytes"], DEALER["rounds"] = 0.0, 0


# --------------------------------------------------------------------------- secure building blocks


def _rsqrt(t):
    # inv_sqrt has no autograd rule in CrypTen 0.4.1; sqrt and reciprocal do.
    return t.sqrt().reciprocal() if t.requires_grad else t.inv_sqrt()


def ct_layernorm(x, g, b):
    mu = x.mean(-1, keepdim=True)
    d = x - mu
    var = d.square().mean(-1, keepdim=True)
    return d * _rsqrt(var + W.LN_EPS) * g + b


GELU_IMPL = {"name": "tanh"}


def ct_gelu(x):
    """GELU. ``erf``: exact form with CrypTen's erf (a Taylor series, diverges for |x| > ~2.5);
    ``tanh``: the usual tanh approximation with CrypTen's tanh (sigmoid via exp + reciprocal)."""
    if GELU_IMPL["name"] == "erf":
        return x * ((x * (1.0 / math.sqrt(2.0))).erf() + 1.0) * 0.5
    inner = (x + x.square() * x * 0.044715) * math.sqrt(2.0 / math.pi)
    return x * (inner.tanh() + 1.0) * 0.5


def ct_encoder_layer(x, p: dict, prefix: str, d: W.BertDims):
    """x: [batch, seq, hidden] CrypTensor -> same shape (post-LN BERT layer, softmax attention)."""
    bsz, s, h = x.size()

    def heads(t):
        return t.reshape(bsz, s, d.heads, d.head_dim).transpose(1, 2)

    q = heads(x.matmul(p[prefix + "wq"]) + p[prefix + "bq"])
    k = heads(x.matmul(p[prefix + "wk"]) + p[prefix + "bk"])
    v = heads(x.matmul(p[prefix + "wv"]) + p[prefix + "bv"])
    scores = q.matmul(k.transpose(2, 3)) * (1.0 / math.sqrt(d.head_dim))
    att = scores.softmax(-1)
    ctx = att.matmul(v).transpose(1, 2).reshape(bsz, s, h)
    a = ct_layernorm(ctx.matmul(p[prefix + "wo"]) + p[prefix + "bo"] + x, p[prefix + "ln1_g"],
                     p[prefix + "ln1_b"])
    f = ct_gelu(a.matmul(p[prefix + "w1"]) + p[prefix + "b1"]).matmul(p[prefix + "w2"]) + p[prefix + "b2"]
    return ct_layernorm(f + a, p[prefix + "ln2_g"], p[prefix + "ln2_b"])


def ct_small_model(x, p: dict, d: W.BertDims = W.MINILM):
    for i in range(d.layers):
        x = ct_encoder_layer(x, p, f"l{i}.", d)
    logits = x.mean(1).matmul(p["head_w"]) + p["head_b"]
    return x, logits


# --------------------------------------------------------------------------- plaintext tuning reference


def torch_tuning_reference(case: W.Case) -> dict[str, np.ndarray]:
    """float64 torch forward + backward of the same model: loss and parameter gradients."""
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in case.params.items()}
    x = torch.tensor(case.x, dtype=torch.float64)
    d = W.MINILM

    def ln(t, g, b):
        mu = t.mean(-1, keepdim=True)
        dd = t - mu
        return dd / torch.sqrt(dd.square().mean(-1, keepdim=True) + W.LN_EPS) * g + b

    bsz, s, h = x.shape
    for i in range(d.layers):
        pre = f"l{i}."

        def heads(t, bsz=bsz, s=s):
            return t.reshape(bsz, s, d.heads, d.head_dim).transpose(1, 2)

        q = heads(x @ p[pre + "wq"] + p[pre + "bq"])
        k = heads(x @ p[pre + "wk"] + p[pre + "bk"])
        v = heads(x @ p[pre + "wv"] + p[pre + "bv"])
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(d.head_dim), -1)
        ctx = (att @ v).transpose(1, 2).reshape(bsz, s, h)
        a = ln(ctx @ p[pre + "wo"] + p[pre + "bo"] + x, p[pre + "ln1_g"], p[pre + "ln1_b"])
        f = torch.nn.functional.gelu(a @ p[pre + "w1"] + p[pre + "b1"]) @ p[pre + "w2"] + p[pre + "b2"]
        x = ln(f + a, p[pre + "ln2_g"], p[pre + "ln2_b"])
    logits = x.mean(1) @ p["head_w"] + p["head_b"]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(case.labels, dtype=torch.long))
    loss.backward()
    out = {"loss": np.array(loss.item())}
    out.update({"grad:" + k: t.grad.numpy() for k, t in p.items()})
    return out


# --------------------------------------------------------------------------- per-party program


def _enc(a: np.ndarray, src: int, requires_grad: bool = False):
    return crypten.cryptensor(torch.tensor(a, dtype=torch.float64).float(), src=src,
                              requires_grad=requires_grad)


def _max_err(got, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got.double().numpy() - ref))) if ref.size else 0.0


def party_main(case: W.Case, ref, repeats: int, warmup: int, threads: int, lr: float, gelu: str) -> dict:
    torch.set_num_threads(threads)
    GELU_IMPL["name"] = gelu
    if crypten.mpc.ttp_required():
        _patch_ttp_accounting()
    rank = comm.get().get_rank()
    name = case.name
    times, nbytes, rounds, dealer_bytes, dealer_rounds = [], [], [], [], []
    errors: dict[str, float] = {}
    for it in range(warmup + repeats):
        x = _enc(case.x, src=0)
        grad = name == "tuning_step"
        p = {k: _enc(v, src=1, requires_grad=grad) for k, v in case.params.items()}
        if grad:
            onehot = np.eye(W.N_CLASSES)[case.labels]
            target = _enc(onehot, src=0)
        comm.get().barrier()
        _reset_stats()
        t0 = time.perf_counter()
        if name == "matmul":
            out = x.matmul(p["w"])
        elif name == "softmax":
            out = x.softmax(-1)
        elif name == "gelu":
            out = ct_gelu(x)
        elif name == "layernorm":
            out = ct_layernorm(x, p["g"], p["b"])
        elif name == "encoder_layer":
            out = ct_encoder_layer(x.unsqueeze(0), p, "l0.", W.BERT_BASE).squeeze(0)
        elif name == "small_model_forward":
            out, logits = ct_small_model(x, p)
        elif name == "tuning_step":
            _hidden, logits = ct_small_model(x, p)
            loss = logits.cross_entropy(target)
            loss.backward()
            with crypten.no_grad():
                new_p = {k: t.detach() - t.grad * lr for k, t in p.items()}
            out = loss
        else:
            raise ValueError(name)
        elapsed = time.perf_counter() - t0
        stats = comm.get().get_communication_stats()
        if it >= warmup:
            times.append(elapsed)
            nbytes.append(stats["bytes"])
            rounds.append(stats["rounds"])
            dealer_bytes.append(DEALER["bytes"])
            dealer_rounds.append(DEALER["rounds"])
    # correctness check (outside the timed region; every party must take part in opening)
    if name == "tuning_step":
        revealed = {"loss": loss.get_plain_text()}
        revealed.update({"grad:" + k: t.grad.get_plain_text() for k, t in p.items()})
        upd = new_p["head_w"].get_plain_text().double().numpy()
        ref = torch_tuning_reference(case) if rank == 0 else None
    if name == "tuning_step" and rank == 0:
        errors["loss"] = _max_err(revealed["loss"], ref["loss"])
        g_err, g_max = 0.0, 0.0
        for k in p:
            r = ref["grad:" + k]
            g_err = max(g_err, _max_err(revealed["grad:" + k], r))
            g_max = max(g_max, float(np.max(np.abs(r))))
        errors["grad"] = g_err
        errors["grad_abs_max_ref"] = g_max
        errors["update_head_w"] = float(np.max(np.abs(
            upd - (case.params["head_w"] - lr * ref["grad:head_w"]))))
    elif name != "tuning_step":
        errors["out"] = _max_err(out.get_plain_text(), ref)
        if name == "small_model_forward":
            errors["logits"] = _max_err(logits.get_plain_text(), W.ref_small_model(case.x, case.params)[1])
    return {"rank": rank, "times": times, "bytes": nbytes, "rounds": rounds,
            "dealer_bytes": dealer_bytes, "dealer_rounds": dealer_rounds, "errors": errors}


# --------------------------------------------------------------------------- driver


def run_workload(name: str, args) -> dict:
    case = W.make_case(name, batch=args.batch, seq=args.seq, seed=args.seed)
    # The torch reference of tuning_step is computed by party 0 after the MPC run: running torch
    # autograd here, before run_multiprocess forks, makes the forked parties hang.
    ref = None if name == "tuning_step" else W.reference(case)
    crypten.cfg.communicator.verbose = True
    crypten.cfg.mpc.provider = args.provider
    crypten.cfg.encoder.precision_bits = args.precision_bits
    launcher = crypten.mpc.run_multiprocess(world_size=2)(party_main)
    t0 = time.perf_counter()
    res = launcher(case, ref, args.repeats, args.warmup, args.threads, args.lr, args.gelu)
    wall = time.perf_counter() - t0
    if not res or len(res) != 2 or any(r is None for r in res):
        return W.result_record(name, ENGINE, [], None, None, None, args.repeats, status="failed",
                               provider=args.provider, wall_s=round(wall, 2))
    per_rep = [max(r["times"][i] for r in res) for i in range(args.repeats)]
    b = [statistics.median(r["bytes"]) for r in res]
    rd = [statistics.median(r["rounds"]) for r in res]
    errs = res[0]["errors"]
    err = max(v for k, v in errs.items() if k != "grad_abs_max_ref")
    extra = {
        "status": "ok",
        "provider": args.provider,
        "protocol": "CrypTen 0.4.1 arithmetic/binary sharing over Z_2^64, beaver triples",
        "precision_bits": args.precision_bits,
        "threads_per_party": args.threads,
        "gelu": args.gelu if name not in ("matmul", "softmax", "layernorm") else None,
        "times_s": [round(t, 4) for t in per_rep],
        "bytes_per_party": b,
        "total_bytes": sum(b) / 2,
        "rounds_per_party": rd,
        "dealer_bytes": statistics.median(res[0]["dealer_bytes"]) if args.provider == "TTP" else 0,
        "dealer_rounds": statistics.median(res[0]["dealer_rounds"]) if args.provider == "TTP" else 0,
        "errors": errs,
        "bytes_note": "per-party CrypTen counter = elements sent + received x 8 B; "
                      "total_bytes = sum/2; dealer (TTP) traffic excluded, see dealer_bytes",
        "wall_s": round(wall, 2),
        **case.meta,
    }
    if name == "tuning_step":
        extra["lr"] = args.lr
        extra["note"] = "random-init MiniLM-sized model; fwd + bwd + SGD on all weights"
    return W.result_record(name, ENGINE, per_rep, statistics.mean(b), max(rd), err, args.repeats, **extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="CrypTen side of the secfwt comparison benchmark")
    ap.add_argument("--workload", default="matmul", help=f"comma list of {W.WORKLOADS} or 'all'")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--provider", choices=["TTP", "TFP"], default="TTP")
    ap.add_argument("--batch", type=int, default=1, help="small model / tuning_step batch")
    ap.add_argument("--seq", type=int, default=128, help="small model / tuning_step sequence length")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per party")
    ap.add_argument("--precision-bits", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--gelu", choices=["tanh", "erf"], default="tanh",
                    help="GELU in CrypTen: tanh approximation (default) or erf form via CrypTen's erf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    status = 0
    for name in W.parse_workloads(args.workload):
        rec = run_workload(name, args)
        W.emit(rec, args.out)
        status |= rec.get("status") != "ok"
    return status


if __name__ == "__main__":
    sys.exit(main())
