"""Masked truncation: truncate on a narrow ring and keep the result as y = P - R, P public, so that y's square
and y's products with a fixed-mask operand cost no further opening.

:func:`trunc_masked` (z at scale S, |z| < 2^(l-2) in ring units, l = ``width``, s = ``bits``):

  1. The dealer draws r uniform mod 2^l and gives ring shares of q = (r mod 2^l) >> s and m = bit l - 1 of r
     (plus, on request, of q^2 and q m, and of q B and m B for the stored mask B of a fixed operand).
  2. z' = z + 2^(l-2) lies in [0, 2^(l-1)). Open c = (z' + r) mod 2^l, sending l / 8 bytes per element.
  3. The wrap w = [z' + r >= 2^l] is m u with the public bit u = 1 - (bit l - 1 of c), because z' < 2^(l-1)
     (the wrap-from-MSB argument of Cheetah, here on l bits). So floor(z' / 2^s) + borrow
     = (c >> s) - q + 2^(l-s) m u, where borrow = [c mod 2^s < r mod 2^s] is the one-unit error.
  4. y = P - R with P = (c >> s) - 2^(l-2-s) public and R = q - 2^(l-s) u m, a public combination of the
     dealer's components: :class:`Masked` keeps (P, u, the components).

Because R is a public combination of dealer-known values, products of y are local (:class:`Masked`):
    y^2  = P^2 - 2 P R + R^2,   R^2 = q^2 - 2^(l-s+1) u (q m) + 2^(2(l-s)) u m      (m^2 = m, u^2 = u),
    y w  = y F + P B - R B,     R B = q B - 2^(l-s) u (m B)     (w = F + B, F = w - B opened once),
all exact in Z_2^64. A chain of squarings (exp) or of products with one fixed operand (a final scaling by a
per-row value) then costs one narrow opening per step instead of a Beaver opening plus a truncation.

Cost of :func:`trunc_masked`: 1 round; l / 8 bytes sent per server per element; dealer -> server 1:
16 bytes per element (+ 16 with ``square``, + 16 with ``fid``). :func:`open_fixed`: 1 round, 8 bytes per
element of the operand (64-bit opening; the mask is drawn by :func:`fixed_mask`, nothing sent by the dealer).
Error: y is floor(z / 2^s) or one more (the dropped borrow); squares and products are exact on the ring.
Valid range: |z| < 2^(l-2) in ring units (the caller's documented bound); outside it the result is wrong (the
wrap argument fails), never insecure: c is uniform mod 2^l for every z because r is.
Security: c is z' masked by a fresh uniform r mod 2^l; the components are additive shares; F = w - B is masked
by a uniform B used for this operand only.
Reference: truncation with the wrap bit read from the MSB (Huang et al., Cheetah, USENIX Security 2022) in the
dealer model; keeping values masked so that products need no Beaver opening follows ABY2.0 (Patra et al.,
USENIX Security 2021) and SIGMA (Gupta et al., PETS 2024), specialised here to the mask a truncation leaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from secfwt import ring
from secfwt.comm.base import SERVER0
from secfwt.context import PartyContext
from secfwt.protocols.compare import open_low
from secfwt.share import AShare, open_


def _shl(t: Tensor, k: int) -> Tensor:
    """t * 2^k in Z_2^64 (0 for k >= 64)."""
    return torch.zeros_like(t) if k >= 64 else ring.lshift(t, k)


def _wrap(v: int) -> int:
    """A Python integer as the int64 of its residue mod 2^64."""
    v %= 1 << 64
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass
class FixedOperand:
    """This server's share of an operand w whose Beaver mask B is fixed (:func:`open_fixed`): ``opened`` =
    F = w - B (public), ``mask`` = this server's share of B, ``fid`` = the dealer's id of B."""

    data: Tensor
    scale: int
    opened: Tensor
    mask: Tensor
    fid: int


@dataclass
class MaskHandle:
    """A mask B drawn for an operand not yet computed (:func:`fixed_mask`): the dealer's id and this server's
    share; :func:`trunc_masked` requests products with it before the operand exists."""

    fid: int
    mask: Tensor


@dataclass
class Masked:
    """y = P - R after :func:`trunc_masked` (module docstring). ``comp``: this server's shares of the dealer's
    components ("q", "m"; "q2", "qm" for :meth:`square`; "qb", "mb" for :meth:`mul_fixed`)."""

    p: Tensor
    u: Tensor
    comp: dict[str, Tensor]
    shift: int
    scale: int
    rank: int
    fid: int = -1
    index: int = -1  # the dealer request that made it (a later truncation's ``cross`` names it)
    cross: tuple[int, ...] = ()
    coarse: Masked | None = None  # the same opening truncated by more bits (``trunc_masked(coarse=...)``)
    _r_share: Tensor | None = field(default=None, init=False, repr=False, compare=False)  # cache of _r()

    @property
    def shape(self) -> torch.Size:
        return self.p.shape

    def _r(self) -> Tensor:
        """This server's share of R (computed once: share, square and mul all need it)."""
        if self._r_share is None:
            self._r_share = self.comp["q"] - _shl(self.u * self.comp["m"], self.shift)
        return self._r_share

    def share(self) -> AShare:
        """This server's additive share of y (local)."""
        r = self._r()
        return AShare((self.p - r) if self.rank == SERVER0 else -r, self.scale)

    def add_public_int(self, v: Tensor | int) -> Masked:
        """y + v for a public ring integer v at y's scale (local: P moves)."""
        return replace(self, p=self.p + v)

    def with_scale(self, scale: int) -> Masked:
        """The same ring value read at another scale (a division or multiplication by a power of two)."""
        return replace(self, scale=scale)

    def square(self) -> AShare:
        """Shares of y^2 at scale 2 * scale, exact in Z_2^64, no communication (needs ``square=True``)."""
        if "q2" not in self.comp:
            raise ValueError("Masked.square: the truncation was requested without square=True")
        c, u, k = self.comp, self.u, self.shift
        r2 = c["q2"] - _shl(u * c["qm"], k + 1) + _shl(u * c["m"], 2 * k)
        z = r2 - 2 * self.p * self._r()
        if self.rank == SERVER0:
            z = z + self.p * self.p
        return AShare(z, 2 * self.scale)

    def mul(self, other: Masked) -> AShare:
        """Shares of y * y' at scale + other.scale, exact in Z_2^64, no communication: this truncation must have
        been requested with ``cross`` naming ``other`` (requested with ``keep``)."""
        if other.index not in self.cross:
            raise ValueError(f"Masked.mul: truncation #{self.index} has no cross products with #{other.index}")
        j = self.cross.index(other.index)
        c, k1, k2, u1, u2 = self.comp, self.shift, other.shift, self.u, other.u
        r12 = (c[f"x{j}qq"] - _shl(u2 * c[f"x{j}qm"], k2) - _shl(u1 * c[f"x{j}mq"], k1)
               + _shl(u1 * u2 * c[f"x{j}mm"], k1 + k2))
        z = r12 - self.p * other._r() - other.p * self._r()
        if self.rank == SERVER0:
            z = z + self.p * other.p
        return AShare(z, self.scale + other.scale)

    def mul_fixed(self, w: FixedOperand) -> AShare:
        """Shares of y * w at scale + w.scale, exact in Z_2^64, no communication (w's mask must be the one the
        truncation was requested with: ``fid``)."""
        if "qb" not in self.comp or w.fid != self.fid:
            raise ValueError(f"Masked.mul_fixed: truncated with mask #{self.fid}, operand has mask #{w.fid}")
        rb = self.comp["qb"] - _shl(self.u * self.comp["mb"], self.shift)
        z = self.share().data * w.opened + self.p * w.mask - rb
        return AShare(z, self.scale + w.scale)


def width_for(bound_bits: int) -> int:
    """The narrowest opening width (a multiple of 8, at most 64) for |z| < 2^bound_bits: l - 2 >= bound_bits."""
    return min(64, 8 * -(-(bound_bits + 2) // 8))


def trunc_masked(ctx: PartyContext, z: AShare, bits: int, width: int = 64, square: bool = False,
                 fid: int = -1, release: bool = False, tag: str = "mtrunc", keep: bool = False,
                 cross: tuple[Masked, ...] = (), coarse: int = 0) -> Masked:
    """floor(z / 2^bits) (or one more) as a :class:`Masked` value (module docstring), opening l = ``width``
    bits. Valid for |z| < 2^(width - 2) in ring units. ``square``: also the components for :meth:`Masked.square`;
    ``fid``: for :meth:`Masked.mul_fixed` with the operand masked by that mask; ``keep``: the dealer keeps this
    mask for a later ``cross``; ``cross``: earlier kept truncations of the same shape whose products with this
    one (:meth:`Masked.mul`) are to be local (dealer -> server 1: 32 more bytes per element each);
    ``release``: the last use of ``fid`` and of the ``cross`` masks (the dealer forgets them); ``coarse`` = c
    (bits < c < width - 1): also floor(z / 2^c) (or one more) from the SAME opening, as the result's ``coarse``
    (dealer -> server 1: 8 more bytes per element; nothing more online): a low-precision copy for comparisons
    that need only the value's magnitude, on fewer bits.
    Cost: 1 round, width / 8 bytes per element per server."""
    if type(width) is not int or width % 8 or not 8 <= width <= 64:
        raise ValueError(f"trunc_masked: width must be a multiple of 8 in [8, 64], got {width!r}")
    if type(bits) is not int or not 1 <= bits < width - 1:
        raise ValueError(f"trunc_masked: bits must be an int in [1, {width - 2}], got {bits!r}")
    if type(coarse) is not int or not (coarse == 0 or bits < coarse < width - 1):
        raise ValueError(f"trunc_masked: coarse must be 0 or an int in [{bits + 1}, {width - 2}], got {coarse!r}")
    with ctx.cost.scope(tag):
        assert ctx.dealer is not None
        ids = tuple(m.index for m in cross)
        pend = ctx.dealer.request("mtrunc", shape=list(z.shape), bits=bits, width=width, square=square, fid=fid,
                                  release=release, keep=keep, cross=list(ids), coarse=coarse)
        index = ctx.dealer.index - 1
        r = pend.material["r"]
        v = z.data + r + ((1 << (width - 2)) if ctx.rank == SERVER0 else 0)
        if width == 64:
            c = open_(ctx, v, tag)
            top = ring.msb(c)
        else:
            c = open_low(ctx, v.reshape(-1), width, tag).reshape(v.shape)
            top = c >> (width - 1)

        def high(s: int) -> Tensor:
            return (ring.logical_rshift(c, s) if width == 64 else c >> s) - _wrap(1 << (width - 2 - s))

        full = pend.get()
        qc = full.pop("qc", None)
        comp = {k: t for k, t in full.items() if k != "r"}
        low = None if qc is None else Masked(high(coarse), 1 - top, {"q": qc, "m": comp["m"]}, width - coarse,
                                             z.scale - coarse, ctx.rank)
        return Masked(high(bits), 1 - top, comp, width - bits, z.scale - bits, ctx.rank, fid, index, ids, low)


def fixed_mask(ctx: PartyContext, shape: list[int] | torch.Size) -> MaskHandle:
    """Draw a mask B for an operand of ``shape`` that is computed later (dealer kind ``wmask``: each server
    derives its share from its stream, nothing is sent). Use it in :func:`trunc_masked` (``fid``) and then
    :func:`open_fixed`, once per operand."""
    assert ctx.dealer is not None
    pend = ctx.dealer.request("wmask", shape=list(shape))
    return MaskHandle(ctx.dealer.index - 1, pend.get()["b"])


def open_fixed(ctx: PartyContext, w: AShare, handle: MaskHandle, tag: str = "fixed") -> FixedOperand:
    """Open F = w - B for the mask of ``handle`` (1 round, 8 bytes per element of w per server)."""
    if tuple(handle.mask.shape) != tuple(w.shape):
        raise ValueError(f"open_fixed: operand shape {list(w.shape)} differs from its mask's {list(handle.mask.shape)}")
    with ctx.cost.scope(tag):
        f = open_(ctx, w.data - handle.mask, tag)
    return FixedOperand(w.data, w.scale, f, handle.mask, handle.fid)


__all__ = ["FixedOperand", "MaskHandle", "Masked", "fixed_mask", "open_fixed", "trunc_masked", "width_for"]
