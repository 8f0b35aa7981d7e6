"""Exact Z_2^64 matmul kernels side by side on this machine: float64 limbs, torch int64, and the auto choice.

Run:  python benchmarks/matmul_kernels.py [--threads 1,2] [--repeats 3] [--json]

For every representative product (BERT-base projections and attention shapes) the operands are uniform
random ring elements with edge values (near +-2^63, -1) mixed in; the limbs (plain and with a prepared right
operand), int64 and auto results are checked to be equal before any time is printed. Times are the best of
``--repeats`` runs after one warm-up run, at each torch thread count asked for. The auto column is what
``ring.matmul`` does by default (its one-off calibration is not in the time; it is in the report at the end).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from collections.abc import Callable

import torch

from secfwt import ring, ring_kernels
from secfwt.ring_kernels import RightOperand

SHAPES = [
    ((128, 768), (768, 768)),
    ((128, 3072), (3072, 768)),
    ((128, 768), (768, 3072)),
    ((12, 128, 64), (12, 64, 128)),
    ((12, 128, 128), (12, 128, 64)),
    ((64, 128, 384), (384, 384)),
]


def _operand(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    x = torch.randint(-(2**63), 2**63 - 1, shape, generator=g, dtype=torch.int64)
    flat = x.view(-1)
    edges = torch.tensor([2**63 - 1, -(2**63), -1, 1, 0, 2**62, -(2**62) - 1], dtype=torch.int64)
    flat[torch.randint(0, flat.numel(), (64,), generator=g)] = edges.repeat(10)[:64]
    return x


def _best(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        s = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - s)
    return best


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def run(threads: int, repeats: int) -> list[str]:
    torch.set_num_threads(threads)
    rows = []
    for i, (sa, sb) in enumerate(SHAPES):
        g = torch.Generator().manual_seed(100 + i)
        a, b = _operand(sa, g), _operand(sb, g)
        prepared = RightOperand(b) if b.dim() == 2 else None
        runs: dict[str, Callable[[], torch.Tensor]] = {
            "limbs": lambda a=a, b=b: ring.matmul(a, b, kernel="limbs"),
            "int64": lambda a=a, b=b: ring.matmul(a, b, kernel="int64"),
            "auto": lambda a=a, b=b: ring.matmul(a, b, kernel="auto"),
        }
        if prepared is not None:
            runs["limbs prepared"] = lambda a=a, p=prepared: ring.matmul(a, p, kernel="limbs")
            runs["auto prepared"] = lambda a=a, p=prepared: ring.matmul(a, p, kernel="auto")
        outs = {name: fn() for name, fn in runs.items()}  # warm-up (and the auto calibration), then check
        ref = outs["limbs"]
        bad = [name for name, out in outs.items() if not torch.equal(out, ref)]
        if bad:
            raise SystemExit(f"matmul_kernels: {', '.join(bad)} differ from the limbs on {_fmt(sa)} @ {_fmt(sb)}")
        t = {name: _best(fn, repeats) for name, fn in runs.items()}
        pick = _choice(sa, sb, prepared=False)
        pick_p = _choice(sa, sb, prepared=True) if prepared is not None else "-"
        rows.append(
            f"| {_fmt(sa)} @ {_fmt(sb)} | {threads} | {t['limbs']:.4f} | "
            + (f"{t['limbs prepared']:.4f}" if prepared is not None else "-")
            + f" | {t['int64']:.4f} | {t['auto']:.4f} ({pick}) | "
            + (f"{t['auto prepared']:.4f} ({pick_p})" if prepared is not None else "-")
            + f" | {t['limbs'] / t['int64']:.1f} | yes |"
        )
        print(rows[-1], flush=True)
    return rows


def _choice(sa: tuple[int, ...], sb: tuple[int, ...], prepared: bool) -> str:
    """The kernel the process's auto choice uses for this product (from the kernel report)."""
    wanted = ring_kernels.class_name(ring_kernels.class_key(sa, sb, prepared))
    for c in ring.kernel_report()["classes"]:
        if c["class"] == wanted:
            return str(c["chosen"])
    return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated (default 1,2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per kernel and shape (best is kept)")
    ap.add_argument("--json", action="store_true", help="also print ring.kernel_report() as JSON")
    args = ap.parse_args()
    counts = [int(x) for x in args.threads.split(",") if x.strip()]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# matmul kernels, {now}: CPU {ring_kernels.cpu_model()}, {os.cpu_count()} logical CPUs, "
          f"torch {torch.__version__}, threads {counts}, load average {load:.2f}")
    print("| product | threads | limbs s | limbs prepared s | int64 s | auto s (kernel) | auto prepared s (kernel) "
          "| limbs / int64 | results equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    for th in counts:
        run(th, args.repeats)
    report = ring.kernel_report()
    print(f"# {ring_kernels.summary(report)}; benchmark {time.perf_counter() - t0:.1f} s")
    if args.json:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
