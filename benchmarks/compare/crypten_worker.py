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


def ct_rfa(q, k, v, w: np.ndarray, rfa: W.RfaParams = W.RFA):
    """Random feature attention on CrypTen, as SecFwT built it on CrypTen: phi(x) = [cos(W x), sin(W x)] with
    CrypTen's own ``cossin`` (exp(i x) by repeated squaring), the same function as workloads.ref_rfa and secfwt's
    RFA (l2-normalised q, k via CrypTen's inv_sqrt, temperature tau, normaliser floor via CrypTen's relu,
    CrypTen's reciprocal). q, k, v: [b, nh, t, hs]; w: public (m, hs)."""
    t, m = q.size(2), w.shape[0]
    qk = crypten.cat([q, k], dim=2)  # queries and keys share every round
    # |q|^2 ~ hs * var(q): scaled by 1/hs into the range where CrypTen's inv_sqrt initial guess converges
    hs = q.size(-1)
    qk = qk * (qk.square().sum(-1, keepdim=True) * (1.0 / hs)).inv_sqrt() * (1.0 / (rfa.tau * math.sqrt(hs)))
    c, s = qk.matmul(torch.tensor(w.T, dtype=torch.float32)).cossin()
    phi = crypten.cat([c, s], dim=-1)  # [b, nh, 2t, 2m]
    pq, pk = phi[:, :, :t], phi[:, :, t:]
    num = pq.matmul(pk.transpose(2, 3).matmul(v))  # [b, nh, t, hs]
    den = pq.matmul(pk.sum(2, keepdim=True).transpose(2, 3)) * (1.0 / (t * m))  # [b, nh, t, 1]
    den = (den - rfa.floor).relu() + rfa.floor
    return num * (1.0 / (t * m)) * den.reciprocal()


def ct_encoder_layer(x, p: dict, prefix: str, d: W.BertDims, rfa_w: np.ndarray | None = None):
    """x: [batch, seq, hidden] CrypTensor -> same shape (post-LN BERT layer, softmax attention or RFA)."""
    bsz, s, h = x.size()

    def heads(t):
        return t.reshape(bsz, s, d.heads, d.head_dim).transpose(1, 2)

    q = heads(x.matmul(p[prefix + "wq"]) + p[prefix + "bq"])
    k = heads(x.matmul(p[prefix + "wk"]) + p[prefix + "bk"])
    v = heads(x.matmul(p[prefix + "wv"]) + p[prefix + "bv"])
    if rfa_w is None:
        scores = q.matmul(k.transpose(2, 3)) * (1.0 / math.sqrt(d.head_dim))
        att = scores.softmax(-1)
        ctx = att.matmul(v).transpose(1, 2).reshape(bsz, s, h)
    else:
        ctx = ct_rfa(q, k, v, rfa_w).transpose(1, 2).reshape(bsz, s, h)
    a = ct_layernorm(ctx.matmul(p[prefix + "wo"]) + p[prefix + "bo"] + x, p[prefix + "ln1_g"],
                     p[prefix + "ln1_b"])
    f = ct_gelu(a.matmul(p[prefix + "w1"]) + p[prefix + "b1"]).matmul(p[prefix + "w2"]) + p[prefix + "b2"]
    return ct_layernorm(f + a, p[prefix + "ln2_g"], p[prefix + "ln2_b"])


def ct_small_model(x, p: dict, d: W.BertDims = W.MINILM, rfa: bool = False):
    for i in range(d.layers):
        w = W.rfa_frequencies(W.RFA.m, d.head_dim, W.RFA.seed + i) if rfa else None
        x = ct_encoder_layer(x, p, f"l{i}.", d, w)
    logits = x.mean(1).matmul(p["head_w"]) + p["head_b"]
    return x, logits


# --------------------------------------------------------------------------- plaintext tuning reference


def torch_tuning_reference(case: W.Case) -> dict[str, np.ndarray]:
    """float64 torch forward + backward of the same model: loss and parameter gradients."""
    import paper_ref

    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in case.params.items()}
    x = torch.tensor(case.x, dtype=torch.float64)
    _, logits = paper_ref.torch_model(x, p, W.MINILM)
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


# --------------------------------------------------------------------------- paper_iteration (issue 18)

SOFTMAX_SCALE = 1.0 / 64


def scaled_softmax(self, dim, **kwargs):
    """CrypTen 0.4.1's softmax (common/functions/approximations.py) with ONE change: the sum of the exponentials
    is multiplied by the public 1/64 before CrypTen's reciprocal and the result by 1/64 after it (local in 2PC:
    no extra communication). CrypTen's Newton-Raphson reciprocal starts at 3 exp(1 - 2x) + 0.003, and its exp
    is the limit (1 + z/256)^256, wrong for z < -256: for sums x > 128.5 the start value is huge and the
    result ~2^32 garbage. Rows of 562 keys of a random-weight layer sum to 63-273 (measured), so the stock
    softmax broke the 512-token rows (errors ~4e9); scaled, the reciprocal's input stays in [1/64, ~9]."""
    if self.dim() == 0 or self.size(dim) == 1:
        return self.new(torch.ones_like(self.data))
    numerator = (self - self.max(dim, keepdim=True)[0]).exp()
    with crypten.cfg.temp_override({"functions.reciprocal_all_pos": True}):
        inv = (numerator.sum(dim, keepdim=True) * SOFTMAX_SCALE).reciprocal() * SOFTMAX_SCALE
    return numerator * inv


def _use_scaled_softmax() -> None:
    """Forward of every softmax (also inside CrypTen's AutogradSoftmax, whose backward is unchanged)."""
    from crypten.cryptensor import CrypTensor
    from crypten.mpc import MPCTensor

    for cls in (CrypTensor, MPCTensor):
        cls.softmax = scaled_softmax



def paper_party(case: W.Case, method: str, ref, repeats: int, threads: int, lr: float, gelu: str) -> dict:
    """One party's program for a ``paper_iteration`` method: sft (forward, cross-entropy, backward, SGD on all
    weights), prompt_tuning (the same with only the soft prompt trainable; CrypTen's autograd still computes
    every matmul's both gradients, as it does in any CrypTen prompt tuning), fot (forward) or fot_rfa (forward
    with RFA). Inputs are shared before the timed region; outputs opened after it and checked by party 0."""
    import paper_ref

    _use_scaled_softmax()
    torch.set_num_threads(threads)
    GELU_IMPL["name"] = gelu
    if crypten.mpc.ttp_required():
        _patch_ttp_accounting()
    rank = comm.get().get_rank()
    d = W.BertDims(**case.meta["dims"])
    n = case.meta["n_prompt"]
    train = method in ("sft", "prompt_tuning")
    times, nbytes, rounds, dealer_bytes = [], [], [], []
    for _ in range(repeats):
        p = {k: _enc(v, src=1, requires_grad=method == "sft") for k, v in case.params.items()}
        if method == "prompt_tuning":
            prompt = _enc(case.x[:, :n], src=0, requires_grad=True)
            x = crypten.cat([prompt, _enc(case.x[:, n:], src=0)], dim=1)
        else:
            x = _enc(case.x, src=0)
        target = _enc(np.eye(W.N_CLASSES)[case.labels], src=0) if train else None
        comm.get().barrier()
        _reset_stats()
        t0 = time.perf_counter()
        hidden, logits = ct_small_model(x, p, d, rfa=method == "fot_rfa")
        if train:
            loss = logits.cross_entropy(target)
            loss.backward()
            with crypten.no_grad():
                if method == "sft":
                    new = {k: t.detach() - t.grad * lr for k, t in p.items()}
                else:
                    new = {"prompt": prompt.detach() - prompt.grad * lr}
        elapsed = time.perf_counter() - t0
        stats = comm.get().get_communication_stats()
        times.append(elapsed)
        nbytes.append(stats["bytes"])
        rounds.append(stats["rounds"])
        dealer_bytes.append(DEALER["bytes"])
    errors: dict[str, float] = {}
    if train:
        got = {"loss": loss.get_plain_text()}
        if method == "sft":
            got.update({"grad:" + k: t.grad.get_plain_text() for k, t in p.items()})
            got["update:head_w"] = new["head_w"].get_plain_text()
        else:
            got["grad:prompt"] = prompt.grad.get_plain_text()
            got["update:prompt"] = new["prompt"].get_plain_text()
        if rank == 0:
            want = paper_ref.grad_reference(case, method, lr)
            errors["loss"] = _max_err(got["loss"], want["loss"])
            errors["grad"] = max(_max_err(v, want[k]) for k, v in got.items() if k.startswith("grad:"))
            errors["grad_abs_max_ref"] = max(float(np.max(np.abs(v))) for k, v in want.items()
                                             if k.startswith("grad:"))
            errors["update"] = max(_max_err(v, want[k]) for k, v in got.items() if k.startswith("update:"))
    else:
        h, lg = hidden.get_plain_text(), logits.get_plain_text()
        if rank == 0:
            ref = W.ref_small_model(case.x, case.params, d, rfa=method == "fot_rfa")
            errors["hidden"] = _max_err(h, ref[0])
            errors["logits"] = _max_err(lg, ref[1])
    return {"rank": rank, "times": times, "bytes": nbytes, "rounds": rounds, "dealer_bytes": dealer_bytes,
            "errors": errors}


def run_paper(method: str, args) -> dict:
    case = W.make_paper_case(args.seq, args.layers, method, batch=args.batch, seed=args.seed)
    d = W.BertDims(**case.meta["dims"])
    # Every reference is computed by party 0 after the secure run: torch in this process before the fork (RFA's
    # frequencies come from torch's generator and QR; the training steps need autograd) makes the parties hang.
    ref = None
    crypten.cfg.communicator.verbose = True
    crypten.cfg.mpc.provider = args.provider
    crypten.cfg.encoder.precision_bits = args.precision_bits
    launcher = crypten.mpc.run_multiprocess(world_size=2)(paper_party)
    t0 = time.perf_counter()
    res = launcher(case, method, ref, args.repeats, args.threads, args.lr, args.gelu)
    wall = time.perf_counter() - t0
    att = W.METHOD_ATTENTION[method]
    if not res or len(res) != 2 or any(r is None for r in res):
        rec = W.result_record("paper_iteration", ENGINE, [], None, None, None, args.repeats, status="failed",
                              method=method, seq=args.seq, layers=args.layers, wall_s=round(wall, 2),
                              error="a CrypTen party failed (see the log)")
        rec["attention"] = att
        return rec
    per_rep = [max(r["times"][i] for r in res) for i in range(args.repeats)]
    b = [statistics.median(r["bytes"]) for r in res]
    errs = res[0]["errors"]
    rec = W.result_record(
        "paper_iteration", ENGINE, per_rep, statistics.mean(b), max(statistics.median(r["rounds"]) for r in res),
        max(v for k, v in errs.items() if k != "grad_abs_max_ref"), args.repeats, status="ok", method=method,
        seq=args.seq, layers=args.layers, positions=case.meta["positions"], n_prompt=case.meta["n_prompt"],
        provider=args.provider, precision_bits=args.precision_bits, threads_per_party=args.threads, gelu=args.gelu,
        protocol="CrypTen 0.4.1 arithmetic/binary sharing over Z_2^64, beaver triples",
        times_s=[round(t, 4) for t in per_rep], bytes_per_party=b, total_bytes=sum(b) / 2,
        dealer_bytes=statistics.median(res[0]["dealer_bytes"]) if args.provider == "TTP" else 0,
        errors=errs, lr=args.lr, wall_s=round(wall, 2), dims=d.__dict__, init="random",
        note={"sft": "forward, cross-entropy, backward, SGD on every weight",
              "prompt_tuning": "forward, cross-entropy, backward to the soft prompt, SGD on it",
              "fot": "one candidate's forward (softmax attention)",
              "fot_rfa": "one candidate's forward, RFA with CrypTen's cossin"}[method])
    rec["attention"] = att
    return rec


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
    ap.add_argument("--method", default=",".join(W.PAPER_METHODS), help="paper_iteration: comma list of methods")
    ap.add_argument("--layers", type=int, default=1, help="paper_iteration: RoBERTa-large-sized layers")
    args = ap.parse_args(argv)
    status = 0
    for name in W.parse_workloads(args.workload):
        if name == "paper_iteration":
            for method in W.paper_methods(args.method):
                rec = run_paper(method, args)
                W.emit(rec, args.out)
                status |= rec.get("status") != "ok"
            continue
        rec = run_workload(name, args)
        W.emit(rec, args.out)
        status |= rec.get("status") != "ok"
    return status


if __name__ == "__main__":
    sys.exit(main())
