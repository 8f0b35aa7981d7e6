"""Additive 2-out-of-2 secret sharing over Z_2^64 between the two servers.

``x = x0 + x1 (mod 2^64)``; server ``i`` holds ``x_i`` in an :class:`AShare`, together with the public
fixed-point *scale* (number of fractional bits) of the encoded value. Everything here is local except
:func:`share_from_owner`, :func:`reveal_to`, :func:`reveal` and :func:`open_`, which each cost one round.

Input sharing from the data owner uses a PRG it shares with server 0: server 0 derives ``x0`` itself,
and only ``x1 = x - x0`` crosses the network (8 bytes per element, to server 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from secfwt import ring
from secfwt.comm.base import OWNER, SERVER0, SERVER1
from secfwt.context import PartyContext
from secfwt.errors import FixedPointRangeError


@dataclass
class AShare:
    """This server's additive share of a fixed-point tensor with ``scale`` fractional bits."""

    data: Tensor
    scale: int

    # -- shape (all local) --------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dim(self) -> int:
        return self.data.dim()

    def numel(self) -> int:
        return self.data.numel()

    def size(self, d: int | None = None) -> Any:
        return self.data.size() if d is None else self.data.size(d)

    def _wrap(self, t: Tensor) -> AShare:
        return AShare(t, self.scale)

    def reshape(self, *shape: Any) -> AShare:
        return self._wrap(self.data.reshape(*shape))

    view = reshape

    def permute(self, *dims: Any) -> AShare:
        return self._wrap(self.data.permute(*dims))

    def transpose(self, a: int, b: int) -> AShare:
        return self._wrap(self.data.transpose(a, b))

    def unsqueeze(self, d: int) -> AShare:
        return self._wrap(self.data.unsqueeze(d))

    def squeeze(self, d: int) -> AShare:
        return self._wrap(self.data.squeeze(d))

    def flatten(self, start: int = 0, end: int = -1) -> AShare:
        return self._wrap(self.data.flatten(start, end))

    def expand(self, *shape: Any) -> AShare:
        return self._wrap(self.data.expand(*shape))

    def contiguous(self) -> AShare:
        return self._wrap(self.data.contiguous())

    def __getitem__(self, idx: Any) -> AShare:
        return self._wrap(self.data[idx])

    def sum(self, dim: int | tuple[int, ...], keepdim: bool = False) -> AShare:
        return self._wrap(self.data.sum(dim=dim, keepdim=keepdim))

    def __neg__(self) -> AShare:
        return self._wrap(-self.data)

    def clone(self) -> AShare:
        return self._wrap(self.data.clone())

    def __repr__(self) -> str:
        return f"AShare(shape={tuple(self.shape)}, scale={self.scale})"


def cat(xs: Sequence[AShare], dim: int = 0) -> AShare:
    s = max(x.scale for x in xs)
    return AShare(torch.cat([rescale_up(x, s).data for x in xs], dim=dim), s)


def stack(xs: Sequence[AShare], dim: int = 0) -> AShare:
    s = max(x.scale for x in xs)
    return AShare(torch.stack([rescale_up(x, s).data for x in xs], dim=dim), s)


def rescale_up(x: AShare, scale: int) -> AShare:
    """Represent ``x`` with more fractional bits (exact, local: a left shift)."""
    if scale < x.scale:
        raise ValueError(f"rescale_up: cannot lower scale {x.scale} -> {scale} locally; use trunc")
    return x if scale == x.scale else AShare(ring.lshift(x.data, scale - x.scale), scale)


def add(x: AShare, y: AShare) -> AShare:
    s = max(x.scale, y.scale)
    return AShare(rescale_up(x, s).data + rescale_up(y, s).data, s)


def sub(x: AShare, y: AShare) -> AShare:
    s = max(x.scale, y.scale)
    return AShare(rescale_up(x, s).data - rescale_up(y, s).data, s)


def public_ring(ctx: PartyContext, x: AShare, value: Tensor | float) -> Tensor:
    """The public ``value`` encoded at ``x``'s scale, held by server 0 only (zeros on server 1)."""
    enc = ring.encode(value, x.scale)
    return enc if ctx.rank == SERVER0 else torch.zeros_like(enc)


def add_public(ctx: PartyContext, x: AShare, value: Tensor | float) -> AShare:
    """``x + value`` for a public real ``value`` (server 0 adds it to its share)."""
    return AShare(x.data + public_ring(ctx, x, value), x.scale)


def mul_public_int(x: AShare, k: Tensor | int) -> AShare:
    """``x * k`` for public integers ``k`` (exact, local, no truncation)."""
    return AShare(x.data * torch.as_tensor(k, dtype=torch.int64), x.scale)


def mul_public(ctx: PartyContext, x: AShare, value: Tensor | float, frac_bits: int | None = None) -> AShare:
    """``x * value`` for public reals, *without* truncation: the result has scale ``x.scale + frac_bits``."""
    f = ctx.f if frac_bits is None else frac_bits
    return AShare(x.data * ring.encode(value, f), x.scale + f)


def zeros(shape: Sequence[int] | torch.Size, scale: int) -> AShare:
    return AShare(torch.zeros(tuple(shape), dtype=torch.int64), scale)


def from_public(ctx: PartyContext, value: Tensor | float, scale: int | None = None) -> AShare:
    """A trivial sharing of a public value (server 0 holds it, server 1 holds zero)."""
    s = ctx.f if scale is None else scale
    enc = ring.encode(value, s)
    return AShare(enc if ctx.rank == SERVER0 else torch.zeros_like(enc), s)


# -- communication: one round each ---------------------------------------------------------------


def open_(ctx: PartyContext, x: Tensor, tag: str, xor: bool = False) -> Tensor:
    """Both servers exchange their shares and return the opened value. 1 round, ``x.nbytes`` each way.

    Arithmetic shares (``xor=False``) are added modulo 2^64 (or modulo 2^32 for int32 tensors);
    boolean shares (``xor=True``) are XOR-ed.
    """
    ctx.comm.send(ctx.peer, tag, x)
    other = ctx.comm.recv(ctx.peer, tag, shape=x.shape, dtype=x.dtype)
    ctx.cost.add_round()
    return x ^ other if xor else x + other


def open_many(ctx: PartyContext, xs: Sequence[Tensor], tag: str, xor: bool = False) -> list[Tensor]:
    """Open several tensors of one dtype in the same round (one message)."""
    flat = torch.cat([x.reshape(-1) for x in xs])
    opened = open_(ctx, flat, tag, xor=xor)
    out, i = [], 0
    for x in xs:
        out.append(opened[i : i + x.numel()].reshape(x.shape))
        i += x.numel()
    return out


def share_from_owner(ctx: PartyContext, shape: Sequence[int] | torch.Size, scale: int | None = None,
                     tag: str = "input") -> AShare:
    """Server side of input sharing from the data owner (see :func:`owner_share`)."""
    s = ctx.f if scale is None else scale
    idx = ctx.next_owner_stream()
    shape = tuple(shape)
    if ctx.rank == SERVER0:
        assert ctx.prg_owner is not None, "server 0 needs the PRG it shares with the data owner"
        data = ctx.prg_owner.stream(idx).ring(shape)
    else:
        data = ctx.comm.recv(OWNER, tag, shape=shape)
    ctx.cost.add_round()
    return AShare(data, s)


def input_bound(scale: int) -> float:
    """The largest |value| :func:`owner_share` accepts at ``scale`` fractional bits: 2^(31 - scale).

    Any two such inputs multiply exactly: |x y| 2^(2 scale) < 2^62, the truncation's range (2^15 = 32768 for
    scale 16, 2^7 = 128 for scale 24, 2^31 for the 0/1 one-hot rows shared at scale 0). Honest inputs are far
    below it (word embeddings |e| < ~1, BBT prompts p = A z + p0 with |p| << 100).
    """
    return 2.0 ** (31 - scale)


def check_input(value: Tensor, scale: int, tag: str = "input", bound: float | None = None) -> None:
    """The check of :func:`owner_share`, callable before announcing a command to the servers."""
    v = torch.as_tensor(value, dtype=torch.float64)
    if v.numel() == 0:
        return
    bad = ~torch.isfinite(v)
    if bad.any():
        raise FixedPointRangeError(f"owner input {tag!r}: {int(bad.sum())} entries are NaN or infinite "
                                   f"(first at index {tuple(bad.nonzero()[0].tolist())}); nothing was sent")
    b = input_bound(scale) if bound is None else min(float(bound), input_bound(scale))
    big = v.abs() > b
    if big.any():
        i = tuple(big.nonzero()[0].tolist())
        raise FixedPointRangeError(
            f"owner input {tag!r}: max |value| = {v.abs().max().item():.6g} (first at index {i}, {int(big.sum())} "
            f"entries) exceeds the allowed bound {b:.6g} (scale {scale}: products of two inputs must stay below "
            f"2^62 in the ring); nothing was sent")


def owner_share(ctx: PartyContext, value: Tensor, scale: int | None = None, tag: str = "input",
                bound: float | None = None) -> None:
    """Data-owner side of input sharing: server 0's share comes from the shared PRG, server 1 gets the rest.

    Rejects, before anything is sent or any PRG stream is used, NaN/infinite entries and any |value| beyond
    ``bound`` (default and cap :func:`input_bound` (scale): beyond it one product of two inputs would wrap the
    ring and the servers would compute garbage) with :class:`~secfwt.errors.FixedPointRangeError`.
    """
    s = ctx.f if scale is None else scale
    assert ctx.prg_owner is not None, "the data owner needs the PRG it shares with server 0"
    check_input(value, s, tag, bound)
    idx = ctx.next_owner_stream()
    enc = ring.encode(value, s)
    x0 = ctx.prg_owner.stream(idx).ring(tuple(enc.shape))
    ctx.comm.send(SERVER1, tag, enc - x0)


def reveal_to(ctx: PartyContext, x: AShare, party: int, tag: str = "reveal") -> None:
    """Server side: send this share to ``party`` (which calls :func:`receive_revealed`)."""
    ctx.comm.send(party, tag, x.data)
    ctx.cost.add_round()


def reveal_bound(f: int) -> float:
    """Default bound of :func:`receive_revealed`: 2^(62 - 2f) (16384 for f = 24, 2^30 for f = 16).

    No value at scale f that took part in a product can exceed it (the product would have wrapped), while a
    wrapped (uniformly random) ring element exceeds it with probability 1 - 2^-(f+1) per element.
    """
    return 2.0 ** (62 - 2 * f)


def check_revealed(x: Tensor, tag: str, bound: float, f: int, cause: str | None = None) -> None:
    """Raise :class:`~secfwt.errors.FixedPointRangeError` if a decoded value is NaN or beyond ``bound``."""
    big = ~(x.abs() <= bound)
    if not big.any():
        return
    i = tuple(big.nonzero()[0].tolist())
    likely = cause or (
        f"a wrapped ring value: a product left its exact range 2^(62 - 2f) = 2^{62 - 2 * f} (a matmul sum, a "
        f"LayerNorm row's n var), or an approximation's input left its valid range (docs/APPROXIMATIONS.md)")
    raise FixedPointRangeError(
        f"revealed {tag!r}: |x| = {x.abs().max().item():.6g} ({int(big.sum())} of {x.numel()} entries, first at "
        f"index {i}, value {x[i].item():.6g}) exceeds the bound {bound:.6g} (f = {f}); likely cause: {likely}")


def receive_revealed(ctx: PartyContext, shape: Sequence[int] | torch.Size, scale: int,
                     tag: str = "reveal", bound: float | None = None, cause: str | None = None) -> Tensor:
    """Receiving party: the two shares, reconstructed and decoded to float64, then checked.

    Values beyond ``bound`` (real units; default :func:`reveal_bound` of ``scale``; callers pass the range of
    what they reveal, e.g. 2 x the temperature for similarity logits) raise
    :class:`~secfwt.errors.FixedPointRangeError` naming ``tag``, the bound, the offending value and ``cause``
    (or the generic likely cause). Both messages are consumed first, so the channel stays in step.
    """
    x0 = ctx.comm.recv(SERVER0, tag, shape=tuple(shape))
    x1 = ctx.comm.recv(SERVER1, tag, shape=tuple(shape))
    x = ring.decode(x0 + x1, scale)
    check_revealed(x, tag, reveal_bound(scale) if bound is None else float(bound), scale, cause)
    return x


def reveal(ctx: PartyContext, x: AShare, tag: str = "reveal") -> Tensor:
    """Open ``x`` to both servers and decode it (for tests and public outputs only). 1 round."""
    return ring.decode(open_(ctx, x.data, tag), x.scale)


def reveal_ring(ctx: PartyContext, x: AShare, tag: str = "reveal") -> Tensor:
    """Open ``x`` to both servers as ring elements (exact; tests). 1 round."""
    return open_(ctx, x.data, tag)


__all__ = [
    "AShare", "SERVER1", "add", "add_public", "cat", "check_input", "check_revealed", "from_public",
    "input_bound", "mul_public", "mul_public_int", "open_", "open_many", "owner_share", "receive_revealed",
    "rescale_up", "reveal", "reveal_bound", "reveal_ring", "reveal_to", "share_from_owner", "stack", "sub", "zeros",
]
