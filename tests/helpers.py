"""Test helpers: share plaintext values between the two servers and run protocols in-process."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from secfwt import ring
from secfwt.share import AShare

T = TypeVar("T")


def split(
    value: torch.Tensor, scale: int = 16, seed: int = 0, encoded: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uniformly random additive shares of ``value`` (encoded at ``scale`` unless ``encoded``)."""
    enc = value if encoded else ring.encode(value, scale)
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(-(2**63), 2**63 - 1, enc.shape, generator=g, dtype=torch.int64)
    return r, enc - r


def mine(ctx, shares: tuple[torch.Tensor, torch.Tensor], scale: int = 16) -> AShare:
    """This server's AShare of a value split with :func:`split`."""
    return AShare(shares[ctx.rank].clone(), scale)


LOSS_TOL = 2e-2  # tuning-loop cross-entropy from MPC logits (max abs logit error ~1e-3 on tiny models) vs plaintext


def assert_follows_plaintext(private, plain, costs) -> None:  # type: ignore[no-untyped-def]
    """An MPC tuning run took the plaintext run's path (same seeds): every iteration's min and mean loss within
    LOSS_TOL, the same number of iterations, and the servers did the work (their ledgers show bytes)."""
    assert private.mode == "mpc" and plain.mode == "plaintext"
    assert len(private.history) == len(plain.history)
    for a, b in zip(private.history, plain.history, strict=True):
        assert abs(a.loss_min - b.loss_min) < LOSS_TOL, (a, b)
        assert abs(a.loss_mean - b.loss_mean) < LOSS_TOL, (a, b)
    assert set(costs) == {0, 1}
    assert sum(v["bytes_sent"] for v in costs[0].values()) > 0


def in_threads(make: Callable[[int], T], ranks: Sequence[int]) -> tuple[dict[int, T], dict[int, BaseException]]:
    """``make(rank)`` for every rank, each in its own thread (parties connecting to each other); returns the
    results and the errors by rank."""
    out: dict[int, T] = {}
    errors: dict[int, BaseException] = {}

    def run(r: int) -> None:
        try:
            out[r] = make(r)
        except BaseException as e:  # noqa: BLE001 - inspected by the tests
            errors[r] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, errors
