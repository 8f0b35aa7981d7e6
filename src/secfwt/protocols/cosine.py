"""Π_cosine: shares of cos(2πu) and sin(2πu) for a shared u, in one round (SecFwT, arXiv 2506.15307).

The trigonometric addition formula turns a masked opening into a local linear combination:
u = δ - t (mod 1) with δ = u + t public and t a dealer-chosen uniform phase, so

    cos(2πu) = cos(2πδ) cos(2πt) + sin(2πδ) sin(2πt)
    sin(2πu) = sin(2πδ) cos(2πt) - cos(2πδ) sin(2πt)

where cos(2πδ), sin(2πδ) are public and [cos(2πt)], [sin(2πt)] come from the dealer.
"""

from __future__ import annotations

import math

import torch

from secfwt import ring
from secfwt.context import PartyContext
from secfwt.errors import FixedPointRangeError
from secfwt.protocols.arith import trunc
from secfwt.share import AShare

# Opened phases are sent as int32 when they fit (s <= 31): 4 bytes per element instead of 8.
_INT32_MAX_BITS = 31


def max_scale(f: int) -> int:
    """Largest input scale s for ``f`` fractional bits: the outputs (|cos| <= 1 at scale s + f, plus the
    rounding of two products) must stay below 2^61 for :func:`~secfwt.protocols.arith.trunc`: s <= 60 - f."""
    return 60 - f


def check_scale(s: int, f: int) -> None:
    """Raise :class:`~secfwt.errors.FixedPointRangeError` unless 1 <= s <= :func:`max_scale` (f)."""
    if not 1 <= s <= max_scale(f):
        raise FixedPointRangeError(
            f"cos_sin: input scale {s} with f = {f}: expected 1 <= scale <= {max_scale(f)} (outputs have scale "
            f"scale + f, which must stay <= 60 for the truncation); bring u to scale f first")


def cos_sin(ctx: PartyContext, u: AShare, truncate: bool = False) -> tuple[AShare, AShare]:
    """Shares of (cos(2πu), sin(2πu)) for a shared fixed-point ``u`` with ``s = u.scale`` fractional bits.

    Steps (Π_cosine, SecFwT §4, arXiv 2506.15307):
      1. The dealer gives shares of t uniform in [0, 2^s) (the low s bits of t0 + t1, i.e. a uniform
         phase t / 2^s in [0, 1)) and shares of cos(2πt/2^s), sin(2πt/2^s) encoded with s bits.
      2. Each server sends the low s bits of u_i + t_i; both get δ = (u + t) mod 2^s, a uniform value
         independent of u (one-time pad modulo 2^s). Only u mod 1 matters, so u may wrap freely.
      3. Locally: cos(2πu) = cos(2πδ)[cos 2πt] + sin(2πδ)[sin 2πt] and
         sin(2πu) = sin(2πδ)[cos 2πt] - cos(2πδ)[sin 2πt], with the public cos/sin(2πδ) encoded with
         ``ctx.f`` bits. The outputs have scale ``s + f`` (untruncated, so a caller can fold the truncation
         into its next product); ``truncate=True`` brings both to scale ``f`` with one batched truncation.

    Cost: 1 round and 4n bytes sent per server (int32 phases, s <= 31; 8n bytes otherwise), dealer ->
    server 1: 16n bytes. ``truncate=True``: 2 rounds, 4n + 16n bytes per server.
    Valid range: any u (read modulo 1); its scale s must satisfy 1 <= s <= 60 - f (:func:`check_scale`, raises
    :class:`~secfwt.errors.FixedPointRangeError` otherwise; callers pass s = f). Error: |err| <= sqrt(2) (2^-(s+1) +
    2^-(f+1)) ~ 2^-f for s = f (encoding of the dealer's and the public cos/sin), plus 2^-f with ``truncate=True``;
    relative to cos(2π u) for the *encoded* u (its own quantisation 2^-(s+1) is the caller's).
    """
    with ctx.cost.scope("cosine"):
        assert ctx.dealer is not None
        s, f = u.scale, ctx.f
        check_scale(s, f)
        pend = ctx.dealer.request("cossin", shape=list(u.shape), frac_bits=s)
        mask = (1 << s) - 1
        low = (u.data + pend.material["t"]) & mask
        wire_dtype = torch.int32 if s <= _INT32_MAX_BITS else torch.int64
        ctx.comm.send(ctx.peer, "cosine/delta", low.to(wire_dtype))
        other = ctx.comm.recv(ctx.peer, "cosine/delta", shape=low.shape, dtype=wire_dtype)
        ctx.cost.add_round()
        delta = (low + other.to(torch.int64)) & mask
        full = pend.get()
        theta = delta.to(torch.float64) * (2.0 * math.pi / 2.0**s)
        cd, sd = ring.encode(torch.cos(theta), f), ring.encode(torch.sin(theta), f)
        cos_t, sin_t = full["cos"], full["sin"]
        cos_u = AShare(cd * cos_t + sd * sin_t, s + f)
        sin_u = AShare(sd * cos_t - cd * sin_t, s + f)
        if not truncate:
            return cos_u, sin_u
        both = trunc(ctx, AShare(torch.stack([cos_u.data, sin_u.data]), s + f), s)
        return both[0], both[1]


__all__ = ["check_scale", "cos_sin", "max_scale"]
