"""Small MPC programs run both in-process and as real processes over TLS (``module:function`` refs).

Inputs are fixed (seeded), so the plaintext reference :func:`expected` can be computed by the test.
Products keep the full scale 2f (no truncation), so every result is exact on the ring.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from secfwt import ring
from secfwt.context import PartyContext
from secfwt.protocols.arith import matmul_aa, mul_aa
from secfwt.protocols.compare import ltz
from secfwt.share import AShare, owner_share, receive_revealed, reveal_ring, reveal_to, share_from_owner

SEED = 1234


def inputs() -> dict[str, torch.Tensor]:
    """The data owner's plaintext inputs (mixed signs, fixed seed)."""
    g = torch.Generator().manual_seed(SEED)
    return {
        "x": torch.randn(3, 4, generator=g, dtype=torch.float64) * 4,
        "y": torch.randn(3, 4, generator=g, dtype=torch.float64) * 4,
        "w": torch.randn(4, 5, generator=g, dtype=torch.float64),
    }


def expected(frac_bits: int = 16) -> dict[str, torch.Tensor]:
    """Plaintext ring reference of :func:`servers` (exact int64 arithmetic mod 2^64)."""
    v = {k: ring.encode(t, frac_bits) for k, t in inputs().items()}
    return {
        "mul": v["x"] * v["y"],
        "matmul": ring.matmul(v["x"], v["w"]),
        "ltz": (v["x"] < 0).to(torch.int64),
    }


def expected_sq(frac_bits: int = 16) -> torch.Tensor:
    """Plaintext ring reference of :func:`servers_no_owner`."""
    v = ring.encode(inputs()["x"], frac_bits)
    return v * v


def owner(ctx: PartyContext) -> None:
    """Data owner: secret-share the inputs to the servers."""
    for t in inputs().values():
        owner_share(ctx, t)


def servers(ctx: PartyContext) -> dict[str, torch.Tensor]:
    """Servers: Beaver mul, matmul and ltz on the owner's inputs; results opened as ring elements."""
    shapes = {k: t.shape for k, t in inputs().items()}
    x, y, w = (share_from_owner(ctx, shapes[k]) for k in ("x", "y", "w"))
    prod = mul_aa(ctx, x, y, out_scale=2 * ctx.f)
    mm = matmul_aa(ctx, x, w, out_scale=2 * ctx.f)
    neg = ltz(ctx, x)
    return {
        "mul": reveal_ring(ctx, prod, "out/mul"),
        "matmul": reveal_ring(ctx, mm, "out/matmul"),
        "ltz": reveal_ring(ctx, neg, "out/ltz"),
    }


def servers_no_owner(ctx: PartyContext) -> torch.Tensor:
    """Three-party run: both servers derive fixed shares of x locally, then one Beaver mul x*x."""
    enc = ring.encode(inputs()["x"], ctx.f)
    r = torch.randint(-(2**63), 2**63 - 1, enc.shape, generator=torch.Generator().manual_seed(7),
                      dtype=torch.int64)
    x = AShare(r if ctx.rank == 0 else enc - r, ctx.f)
    return reveal_ring(ctx, mul_aa(ctx, x, x, out_scale=2 * ctx.f), "out/sq")


# -- for the fault test: a long run that signals when it is under way ----------------------------------

MARKER_ENV = "SECFWT_TEST_MARKER"


def slow_servers(ctx: PartyContext) -> None:
    """Many small multiplications with pauses (~30 s in total); writes the marker file after the first."""
    x = share_from_owner(ctx, (4,))
    for i in range(600):
        x = mul_aa(ctx, x, x, out_scale=2 * ctx.f)
        x = AShare(x.data, ctx.f)
        if i == 0 and os.environ.get(MARKER_ENV):
            Path(f"{os.environ[MARKER_ENV]}.{ctx.name}").write_text("running")
        time.sleep(0.05)
    reveal_to(ctx, x, 3)


def slow_owner(ctx: PartyContext) -> torch.Tensor:
    """Owner side of :func:`slow_servers`: share one vector, wait for the revealed result."""
    owner_share(ctx, torch.ones(4, dtype=torch.float64))
    return receive_revealed(ctx, (4,), 16)
