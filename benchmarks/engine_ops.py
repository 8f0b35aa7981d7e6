"""Engine benchmark: secfwt protocols at BERT-base sizes, per server: time, bytes, rounds, LAN/WAN projection.

Run:  python benchmarks/engine_ops.py [--mode process|inprocess] [--ops matmul,softmax,...] [--repeats 3]
                                      [--out results.json]

Every op works on freshly secret-shared random inputs of the sizes below; the opened result is checked
against plaintext torch before any number is printed. In ``process`` mode the two servers and the dealer
are separate OS processes talking over TLS on loopback. Offline and online (:func:`secfwt.cost.offline_online`):
``offline_bytes`` = what the dealer sent for the op, ``offline_time_s`` = the dealer's generation time,
``online_time_s`` = the op's wall time less server 1's waits for the dealer; None where the engine under test
does not measure them (``benchmarks/before_after.py`` runs this script on older commits too). ``--out`` writes
the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from secfwt import ring  # noqa: E402
from secfwt.comm.base import DEALER, SERVER0, SERVER1  # noqa: E402
from secfwt.cost import LAN, WAN, CostTracker  # noqa: E402
from secfwt.share import AShare, reveal, reveal_ring  # noqa: E402

try:
    from secfwt.cost import cpu_model  # noqa: E402
except ImportError:  # an engine from before cpu_model (benchmarks/before_after.py runs older commits)
    def cpu_model() -> str:
        return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"

F = 16


def _shares(ctx: Any, shape: tuple[int, ...], seed: int, scale: float = 1.0) -> tuple[AShare, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    r = torch.randint(-(2**63), 2**63 - 1, shape, generator=g, dtype=torch.int64)
    data = r if ctx.rank == SERVER0 else ring.encode(x, F) - r
    return AShare(data, F), x


def _op_matmul(ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from secfwt.protocols.arith import matmul_aa

    x, xp = _shares(ctx, (128, 768), 1)
    w, wp = _shares(ctx, (768, 768), 2, 0.05)
    with ctx.cost.scope("bench"):
        y = matmul_aa(ctx, x, w)
    return reveal(ctx, y), xp @ wp


def _op_softmax(ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """As in a model: the logits come from a product's truncation (MpcBackend.scores), which also gives them at
    scale 0 for the max (outside the measured scope, as the product's own cost); an engine without that
    (before_after.py on an old commit) runs the plain softmax."""
    from secfwt.approx import softmax

    x, xp = _shares(ctx, (12, 128, 128), 3, 2.0)
    kw: dict[str, Any] = {}
    try:
        from secfwt.protocols.masked import trunc_masked

        z = AShare(ring.lshift(x.data, F), 2 * F)  # the untruncated product q k^T at scale 2f
        y0 = trunc_masked(ctx, z, F, 48, coarse=2 * F)
        x, kw = y0.share(), {"coarse": y0.coarse.share()}
        xp = ring.decode(reveal_ring(ctx, x), F)  # the logits the softmax gets (the truncation's floor)
    except (ImportError, TypeError):
        pass
    with ctx.cost.scope("bench"):
        y = softmax(ctx, x, dim=-1, **kw)
    return reveal(ctx, y), torch.softmax(xp, -1)


def _op_gelu(ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from secfwt.approx import gelu

    x, xp = _shares(ctx, (128, 3072), 4, 2.0)
    kw = _model_gelu()
    with ctx.cost.scope("bench"):
        y = gelu(ctx, x, **kw)
    return reveal(ctx, y), torch.nn.functional.gelu(xp)


def _model_gelu() -> dict[str, Any]:
    """GELU as the engine's MpcBackend runs it in a model: the masked method with the activation bound where
    the engine has it (benchmarks/before_after.py runs older engines), else the engine's default."""
    try:
        from secfwt.approx.masked_gelu import gelu_masked  # noqa: F401
        from secfwt.nn.mpc import ACT_BOUND
    except ImportError:
        return {}
    return {"method": "masked", "bound": ACT_BOUND}


def _op_gelu_piecewise(ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from secfwt.approx import gelu

    x, xp = _shares(ctx, (128, 3072), 4, 2.0)
    with ctx.cost.scope("bench"):
        y = gelu(ctx, x, method="piecewise")
    return reveal(ctx, y), torch.nn.functional.gelu(xp)


def _op_silu(ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from secfwt.approx import silu

    x, xp = _shares(ctx, (128, 1536), 9, 8.0)  # SmolLM2-135M's MLP width; N(0, 8^2) reaches |x| ~ 40
    with ctx.cost.scope("bench"):
        y = silu(ctx, x)
    return reveal(ctx, y), torch.nn.functional.silu(xp)


def _op_layernorm(ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from secfwt.approx import layernorm

    x, xp = _shares(ctx, (128, 768), 5, 3.0)
    w, wp = _shares(ctx, (768,), 10, 0.1)
    b, bp = _shares(ctx, (768,), 12, 0.1)
    w = AShare(w.data + (ring.encode(torch.ones(768, dtype=torch.float64), F) if ctx.rank == SERVER0 else 0), F)
    with ctx.cost.scope("bench"):  # with weight and bias, as in a model
        y = layernorm(ctx, x, w, b, 1e-12)
    return reveal(ctx, y), torch.nn.functional.layer_norm(xp, (768,), wp + 1, bp, eps=1e-12)


def _op_ltz(ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from secfwt.protocols.compare import ltz

    x, xp = _shares(ctx, (128, 3072), 6)
    with ctx.cost.scope("bench"):
        y = ltz(ctx, x)
    return reveal(ctx, AShare(y.data, 0)), (ring.encode(xp, F) < 0).double()


def _op_mul(ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from secfwt.protocols.arith import mul_aa

    x, xp = _shares(ctx, (128, 3072), 7)
    y, yp = _shares(ctx, (128, 3072), 8)
    with ctx.cost.scope("bench"):
        z = mul_aa(ctx, x, y)
    return reveal(ctx, z), xp * yp


OPS: dict[str, tuple[str, Callable[[Any], tuple[torch.Tensor, torch.Tensor]], float]] = {
    "matmul": ("128x768 @ 768x768", _op_matmul, 1e-2),
    "softmax": ("12x128x128, last dim", _op_softmax, 2e-2),
    "gelu": ("128x3072, as in a model", _op_gelu, 2e-2),
    "gelu_piecewise": ("128x3072", _op_gelu_piecewise, 2e-2),
    "silu": ("128x1536", _op_silu, 2e-2),
    "layernorm": ("128x768, with weight and bias", _op_layernorm, 5e-2),
    "ltz": ("128x3072 (sign)", _op_ltz, 0.0),
    "mul": ("128x3072 elementwise", _op_mul, 1e-3),
}


def program(name: str) -> Callable[[Any], Any]:
    """The server program for op ``name``: runs it, checks it, returns the server's cost of the op."""

    def prog(ctx: Any) -> dict[str, Any]:
        got, want = OPS[name][1](ctx)
        err = float((got - want).abs().max())
        bench = ctx.cost.by_top_level()["bench"]
        return {"err": err, "time_s": bench.time_s, "bytes": bench.bytes_sent, "rounds": bench.rounds,
                "dealer_bytes": sum(c.dealer_bytes for k, c in ctx.cost.ops.items() if k.startswith("bench")),
                "dealer_wait_s": getattr(bench, "dealer_wait_s", None),
                "dealer_recv_bytes": getattr(bench, "dealer_recv_bytes", None),
                "torch_threads": torch.get_num_threads()}

    return prog


# Module-level programs so real processes can import them as "engine_ops:prog_<name>".
for _n in OPS:
    globals()[f"prog_{_n}"] = program(_n)


def _merge(res: Any) -> dict[str, Any]:
    """Server 0's row with server 1's dealer traffic and waits and the dealer's generation time."""
    s0, s1 = res[SERVER0], res[SERVER1]
    gen = getattr(res.costs.get(DEALER), "dealer_generation_s", None)
    wait = s1.get("dealer_wait_s")
    t = max(s0["time_s"], s1["time_s"])
    return s0 | {"time_s": t, "dealer_bytes": s1["dealer_bytes"], "dealer_wait_s": wait,
                 "online_time_s": None if wait is None else max(0.0, t - wait),
                 "offline_time_s": gen() if gen is not None else None, "offline_bytes": s1.get("dealer_recv_bytes")}


def run_once(name: str, mode: str) -> dict[str, Any]:
    if mode == "inprocess":
        from secfwt.runtime import run_in_process

        return _merge(run_in_process({SERVER0: program(name), SERVER1: program(name)}, timeout=600))
    import tempfile

    from secfwt.launch import run_processes, write_local_config

    with tempfile.TemporaryDirectory(prefix="secfwt-bench-") as tmp:
        cfg = write_local_config(Path(tmp), timeout=600)
        # Children inherit this interpreter's sys.path (which holds benchmarks/), so they import engine_ops.
        res = run_processes({SERVER0: f"engine_ops:prog_{name}", SERVER1: f"engine_ops:prog_{name}"}, cfg,
                            timeout=900, threads_per_party=1)
    return _merge(res)


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if len(vals) == len(runs) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["process", "inprocess"], default="process")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the rows (and the CPU model) as JSON here")
    args = ap.parse_args()
    rows = []
    records: list[dict[str, Any]] = []
    for name in args.ops.split(","):
        if name not in OPS:
            raise SystemExit(f"unknown op '{name}' (known: {', '.join(OPS)})")
        run_once(name, args.mode)  # warm-up (imports, thread pools), not reported
        runs = [run_once(name, args.mode) for _ in range(args.repeats)]
        tol = OPS[name][2]
        worst = max(r["err"] for r in runs)
        if worst > tol:
            raise SystemExit(f"{name}: max abs error {worst:.3g} exceeds tolerance {tol:g}; not reporting times")
        t = statistics.median(r["time_s"] for r in runs)
        r0 = runs[0]
        rows.append((name, OPS[name][0], t, r0["bytes"], r0["rounds"], r0["dealer_bytes"], worst,
                     LAN.project(t, r0["bytes"], r0["rounds"]), WAN.project(t, r0["bytes"], r0["rounds"])))
        records.append({"op": name, "size": OPS[name][0], "time_s": t, "bytes_per_server": r0["bytes"],
                        "rounds": r0["rounds"], "dealer_bytes": r0["dealer_bytes"], "max_err": worst,
                        "online_time_s": _median(runs, "online_time_s"),
                        "dealer_wait_s": _median(runs, "dealer_wait_s"),
                        "offline_time_s": _median(runs, "offline_time_s"),
                        "offline_bytes": r0.get("offline_bytes"),
                        "torch_threads": r0.get("torch_threads")})
    print(f"\nsecfwt engine, mode={args.mode}, median of {args.repeats}, {time.strftime('%Y-%m-%d')}, "
          f"{torch.get_num_threads()} threads")
    hdr = ("op", "size", "time s", "MB sent/server", "rounds", "dealer MB", "max err", "LAN s", "WAN s")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for n, size, t, b, rd, db, err, lan, wan in rows:
        print(f"| {n} | {size} | {t:.3f} | {b / 1e6:.2f} | {rd} | {db / 1e6:.2f} | {err:.2e} | {lan:.3f} | {wan:.2f} |")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(),
                                   "mode": args.mode, "repeats": args.repeats, "rows": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()


__all__ = ["CostTracker", "OPS", "program"]
