"""Π_cosine (secfwt.protocols.cosine.cos_sin): correctness, one round, uniformity of the opened phase."""

from __future__ import annotations

import math

import pytest
import torch

from secfwt import ring
from secfwt.context import PartyContext
from secfwt.protocols.cosine import cos_sin
from secfwt.runtime import run_in_process
from secfwt.share import AShare, reveal, stack

F = 16
TOL = 4e-5  # sqrt(2) (2^-17 + 2^-17) + 2^-16 (truncation)


def _share(ctx: PartyContext, enc: torch.Tensor, seed: int = 7) -> AShare:
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(-(2**62), 2**62, enc.shape, generator=g, dtype=torch.int64)
    return AShare(r if ctx.rank == 0 else enc - r, F)


def _run(u: torch.Tensor, truncate: bool) -> tuple[torch.Tensor, int, int]:
    def prog(ctx: PartyContext) -> tuple[torch.Tensor, int, int]:
        x = _share(ctx, ring.encode(u, F))
        ctx.cost.reset()
        c, s = cos_sin(ctx, x, truncate=truncate)
        tot = ctx.cost.total()
        return reveal(ctx, stack([c, s])), tot.rounds, tot.bytes_sent

    return run_in_process({0: prog, 1: prog})[0]


@pytest.mark.parametrize("truncate", [False, True])
def test_cos_sin_wide_range(truncate: bool) -> None:
    u = torch.cat([torch.linspace(-4, 4, 2001), torch.tensor([1e6 + 0.3, -1e7 - 0.1, 2.0**40 + 0.25])])
    u = u.double()
    out, rounds, nbytes = _run(u, truncate)
    uq = torch.round(u * 2**F) / 2**F
    frac = uq - torch.floor(uq)  # only u mod 1 matters; avoid float error of 2*pi*u for huge u
    assert (out[0] - torch.cos(2 * math.pi * frac)).abs().max() < TOL
    assert (out[1] - torch.sin(2 * math.pi * frac)).abs().max() < TOL
    assert rounds == (2 if truncate else 1)
    if not truncate:
        # 4 bytes per element (int32 phases) plus one frame header
        assert 4 * u.numel() <= nbytes <= 4 * u.numel() + 200


def test_wrapping_shares() -> None:
    """Encodings that wrap around 2^64 (u near the ring edge) still give cos(2 pi u mod 1)."""
    enc = torch.tensor([2**62 + 2**15, -(2**62) - 2**14, (2**63 - 1)], dtype=torch.int64)

    def prog(ctx: PartyContext) -> torch.Tensor:
        c, s = cos_sin(ctx, _share(ctx, enc), truncate=True)
        return reveal(ctx, stack([c, s]))

    out = run_in_process({0: prog, 1: prog})[0]
    frac = (enc & (2**F - 1)).double() / 2**F
    assert (out[0] - torch.cos(2 * math.pi * frac)).abs().max() < TOL
    assert (out[1] - torch.sin(2 * math.pi * frac)).abs().max() < TOL


def _opened_deltas(value: float, n: int, seed: int) -> torch.Tensor:
    """The phases δ that the servers open, captured from the wire, for n copies of one input."""

    def prog(ctx: PartyContext) -> torch.Tensor:
        sent: list[torch.Tensor] = []
        orig = ctx.comm.send

        def spy(peer: int, tag: str, t: torch.Tensor) -> None:
            if tag == "cosine/delta":
                sent.append(t.clone())
            orig(peer, tag, t)

        ctx.comm.send = spy  # type: ignore[method-assign]
        cos_sin(ctx, _share(ctx, ring.encode(torch.full((n,), value), F), seed))
        ctx.comm.send = orig  # type: ignore[method-assign]
        return sent[0]

    res = run_in_process({0: prog, 1: prog})
    return (res[0].long() + res[1].long()) & (2**F - 1)


def test_opened_phase_is_uniform() -> None:
    n, bins = 40000, 32
    # chi-square with 31 degrees of freedom: P(X > 61.1) ~ 1e-3
    crit = 61.1
    hists = []
    for value, seed in ((0.0, 1), (12345.678, 2)):
        delta = _opened_deltas(value, n, seed)
        distinct = 2**F * (1 - math.exp(-n / 2**F))  # expected distinct values of n uniform draws
        assert delta.unique().numel() > 0.97 * distinct  # no structure from the fixed input
        h = torch.bincount(delta >> (F - 5), minlength=bins).double()
        chi2 = ((h - n / bins) ** 2 / (n / bins)).sum().item()
        assert chi2 < crit, f"δ not uniform for u={value}: chi2={chi2:.1f}"
        hists.append(h)
    # the two inputs give the same distribution (chi-square test of homogeneity)
    tot = hists[0] + hists[1]
    exp = tot / 2
    chi2 = (((hists[0] - exp) ** 2 + (hists[1] - exp) ** 2) / exp).sum().item()
    assert chi2 < crit
