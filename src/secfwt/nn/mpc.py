"""The MPC backend: values are :class:`~secfwt.share.AShare` (this server's share, fixed point).

Linear ops are local or Beaver products (:mod:`secfwt.protocols.arith`); non-linear ops call
:mod:`secfwt.approx` and :func:`secfwt.protocols.cosine.cos_sin`. Ranges given to :meth:`reciprocal` and
:meth:`rsqrt` as real bounds are widened to the enclosing powers of two the approximations take.

Weights: in deployment each server loads its shares of the model (``secfwt share-model``); tests and demos
where both servers know the plaintext use :meth:`MpcBackend.share_plain` (a random split from the PRG the
two servers share: server 0 holds w - r, server 1 holds r).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from secfwt import ring
from secfwt import share as sh
from secfwt.comm.base import SERVER0
from secfwt.context import PartyContext
from secfwt.protocols import arith, compare
from secfwt.protocols.masked import trunc_masked, width_for
from secfwt.share import AShare

# Streams of the servers' common PRG used by share_plain start here (far from other users' indices).
_SHARE_STREAM_BASE = 1 << 48


def _log2_floor(v: float) -> int:
    return math.floor(math.log2(v))


def _log2_ceil(v: float) -> int:
    return math.ceil(math.log2(v))


# The feed-forward activation's input range every secret-shared model here is assumed to respect: |x| < 2^10.
# The models measured (MiniLM, BERT-base-sized random, tiny test models) stay below ~20 (benchmarks/forward.py
# and tests/test_nn_mpc.py compare whole forwards to plaintext). Beyond the bound GELU's comparisons are wrong.
ACT_BOUND = 1024.0
# Encoders' linear outputs (projections, attention scores, attention outputs, feed-forward): |y| < 2^14, with
# 16x margin over ACT_BOUND; the encoder model server passes it (decoders keep the 64-bit truncation).
ENCODER_LINEAR_BOUND = 2.0**14


@dataclass
class Logits(AShare):
    """Attention logits (:meth:`MpcBackend.scores`) with ``coarse``: the same values at scale 0 (floor or one
    more), truncated from the same opening. Any other op returns a plain :class:`AShare`."""

    coarse: AShare | None = None


class MpcBackend:
    """Backend over additive shares for one server's context."""

    name = "mpc"

    def __init__(self, ctx: PartyContext, silu_method: str = "two-stage", act_bound: float | None = ACT_BOUND,
                 linear_bound: float | None = None) -> None:
        """``silu_method``: :func:`secfwt.approx.silu`'s construction ("two-stage": 3 comparisons per element,
        19 rounds; "symmetric": 5 comparisons, 13 rounds: fewer rounds for a slow WAN). ``act_bound``: the
        valid range |x| < act_bound of the feed-forward activation's input (:data:`ACT_BOUND`); GELU then
        runs :func:`secfwt.approx.masked_gelu.gelu_masked` (narrow comparisons, masked truncations). None:
        no bound (the exact-on-every-input symmetric construction, 3.5x the bytes). ``linear_bound``: a bound
        on |output| of every :meth:`linear` / :meth:`matmul` / :meth:`mul_public` (:data:`ENCODER_LINEAR_BOUND`); their
        truncation then opens width_for(log2 bound + 2f) bits (:func:`secfwt.protocols.masked.trunc_masked`, 48
        at f = 16 for 2^14) instead of 64. None: the 64-bit truncation, valid for |output| < 2^(62 - 2f)."""
        if not ctx.is_server:
            raise ValueError(f"MpcBackend: {ctx.name} is not a server")
        from secfwt.approx.nonlinear import METHODS

        if silu_method not in METHODS:
            raise ValueError(f"MpcBackend: silu_method must be 'two-stage', 'symmetric' or 'piecewise', "
                             f"got {silu_method!r}")
        if act_bound is not None and not act_bound > 0:
            raise ValueError(f"MpcBackend: act_bound must be a positive number or None, got {act_bound!r}")
        self.ctx = ctx
        self.silu_method = silu_method
        if linear_bound is not None and not linear_bound > 0:
            raise ValueError(f"MpcBackend: linear_bound must be a positive number or None, got {linear_bound!r}")
        self.act_bound = act_bound
        self.linear_bound = linear_bound
        self._share_stream = _SHARE_STREAM_BASE

    # -- inputs and outputs ----------------------------------------------------------------------
    def share_plain(self, name: str, t: Tensor, scale: int | None = None) -> AShare:
        """A random sharing of a plaintext tensor known to BOTH servers (tests/demos only; mask from the
        servers' common PRG, so no communication). ``name`` is unused (fits Encoder.map_params);
        ``scale`` defaults to the context's fractional bits (use 0 for one-hot vectors)."""
        ctx = self.ctx
        assert ctx.prg_peer is not None, "share_plain needs the PRG the two servers share"
        s = ctx.f if scale is None else scale
        enc = ring.encode(t.detach().to(torch.float64), s)
        r = ctx.prg_peer.stream(self._share_stream).ring(tuple(enc.shape))
        self._share_stream += 1
        return AShare(enc - r if ctx.rank == SERVER0 else r, s)

    def from_owner(self, shape: Sequence[int], scale: int | None = None) -> AShare:
        """Receive an input shared by the data owner, who calls ``share.owner_share(ctx, value, scale)``
        (scale 0 for one-hot vectors)."""
        return sh.share_from_owner(self.ctx, tuple(shape), scale=scale)

    def reveal(self, x: AShare) -> Tensor:
        """Open to both servers (tests and public outputs only)."""
        return sh.reveal(self.ctx, x)

    # -- structure -------------------------------------------------------------------------------
    def shape(self, x: AShare) -> tuple[int, ...]:
        return tuple(x.shape)

    def reshape(self, x: AShare, shape: Sequence[int]) -> AShare:
        return x.reshape(*shape)

    def transpose(self, x: AShare, a: int, b: int) -> AShare:
        return x.transpose(a, b)

    def index(self, x: AShare, idx: Any) -> AShare:
        return x[idx]

    def expand(self, x: AShare, shape: Sequence[int]) -> AShare:
        return x.expand(*shape)

    def cat(self, xs: Sequence[AShare], dim: int) -> AShare:
        return sh.cat(list(xs), dim=dim)

    def sum(self, x: AShare, dim: int, keepdim: bool = False) -> AShare:
        return x.sum(dim, keepdim=keepdim)

    def const(self, t: Tensor) -> AShare:
        return sh.from_public(self.ctx, t.to(torch.float64))

    # -- arithmetic ------------------------------------------------------------------------------
    def add(self, x: AShare, y: AShare) -> AShare:
        return sh.add(x, y)

    def sub(self, x: AShare, y: AShare) -> AShare:
        return sh.sub(x, y)

    def mul(self, x: AShare, y: AShare) -> AShare:
        return arith.mul_aa(self.ctx, x, y)

    def square(self, x: AShare) -> AShare:
        return arith.square_a(self.ctx, x)

    def add_public(self, x: AShare, c: Tensor | float) -> AShare:
        return sh.add_public(self.ctx, x, c)

    def mul_public(self, x: AShare, c: Tensor | float) -> AShare:
        """x * c for public reals c; under ``linear_bound`` (which then also bounds |x c|: the models scale
        queries, means and logits with it) the truncation is the narrow one of :meth:`linear`."""
        if self.linear_bound is None:
            return arith.mul_ap(self.ctx, x, c)
        return self._rescale(sh.mul_public(self.ctx, x, c))

    def mul_mask(self, x: AShare, mask: Tensor) -> AShare:
        return sh.mul_public_int(x, mask.round().to(torch.int64))

    def fix(self, w: AShare) -> arith.FixedShare:
        """This weight with its Beaver mask fixed for the session (:func:`secfwt.protocols.arith.fix_weight`):
        opened once now (1 round, 8|w| bytes), never again by :meth:`linear` / :meth:`matmul`."""
        return w if isinstance(w, arith.FixedShare) else arith.fix_weight(self.ctx, w)

    def fix_matrix(self, name: str, w: AShare) -> AShare:
        """A ``map_params`` function: :meth:`fix` every matrix (2-D weight); vectors (norm weights) stay as
        they are."""
        return self.fix(w) if w.dim() == 2 else w

    def _rescale(self, z: AShare) -> AShare:
        """A product's truncation back to f: narrow (masked) under ``linear_bound``, else 64-bit."""
        f = self.ctx.f
        if self.linear_bound is None or z.scale <= f:
            return arith.rescale(self.ctx, z)
        return trunc_masked(self.ctx, z, z.scale - f, self._linear_width(z.scale), tag="trunc").share()

    def _linear_width(self, scale: int) -> int:
        """The opening width of a product's truncation under ``linear_bound`` (|output| < bound at ``scale``)."""
        assert self.linear_bound is not None
        return width_for(min(62, math.ceil(math.log2(self.linear_bound)) + scale))

    def linear(self, x: AShare, w: AShare, b: AShare | None) -> AShare:
        full = x.scale + w.scale  # untruncated, then one truncation (narrow under linear_bound)
        if isinstance(w, arith.FixedShare):
            y = arith.matmul_fixed(self.ctx, x, w, transpose=True, out_scale=full)
        else:
            y = arith.matmul_aa(self.ctx, x, w.transpose(0, 1), out_scale=full)
        with self.ctx.cost.scope("matmul"):
            y = self._rescale(y)
        return y if b is None else sh.add(y, b)

    def linear_public(self, x: AShare, w: Tensor) -> AShare:
        return arith.matmul_ap(self.ctx, x, w.to(torch.float64).transpose(0, 1).contiguous())

    def matmul(self, x: AShare, y: AShare) -> AShare:
        full = x.scale + y.scale
        if isinstance(y, arith.FixedShare):
            z = arith.matmul_fixed(self.ctx, x, y, transpose=False, out_scale=full)
        else:
            z = arith.matmul_aa(self.ctx, x, y, out_scale=full)
        with self.ctx.cost.scope("matmul"):
            return self._rescale(z)

    def scores(self, q: AShare, k_t: AShare) -> AShare:
        """q @ k_t as :meth:`matmul`; under ``linear_bound`` the truncation's opening also gives the logits at
        scale 0 (:class:`Logits`), so :meth:`softmax`'s max tree compares on 16 bits instead of 32 (no extra
        online byte; the dealer sends 8 more bytes per logit)."""
        full = q.scale + k_t.scale
        if self.linear_bound is None or full <= self.ctx.f:
            return self.matmul(q, k_t)
        z = arith.matmul_aa(self.ctx, q, k_t, out_scale=full)
        with self.ctx.cost.scope("matmul"):
            y = trunc_masked(self.ctx, z, full - self.ctx.f, self._linear_width(full), tag="trunc", coarse=full)
        assert y.coarse is not None
        return Logits(y.share().data, self.ctx.f, y.coarse.share())

    # -- non-linear ------------------------------------------------------------------------------
    def softmax(self, x: AShare, mask: Tensor | None = None) -> AShare:
        from secfwt.approx import softmax

        return softmax(self.ctx, x, dim=-1, mask=mask, coarse=x.coarse if isinstance(x, Logits) else None)

    def gelu(self, x: AShare) -> AShare:
        from secfwt.approx import gelu

        if self.act_bound is None:
            return gelu(self.ctx, x)
        return gelu(self.ctx, x, method="masked", bound=self.act_bound)

    def tanh(self, x: AShare) -> AShare:
        from secfwt.approx import tanh

        return tanh(self.ctx, x)

    def relu(self, x: AShare) -> AShare:
        return compare.relu(self.ctx, x)

    def exp(self, x: AShare) -> AShare:
        from secfwt.approx import exp

        return exp(self.ctx, x)

    def layernorm(self, x: AShare, weight: AShare, bias: AShare, eps: float) -> AShare:
        from secfwt.approx import layernorm

        return layernorm(self.ctx, x, weight, bias, eps)

    def reciprocal(self, x: AShare, lo: float, hi: float) -> AShare:
        from secfwt.approx import reciprocal

        return reciprocal(self.ctx, x, _log2_floor(lo), _log2_ceil(hi))

    def rsqrt(self, x: AShare, lo: float, hi: float) -> AShare:
        from secfwt.approx import rsqrt

        return rsqrt(self.ctx, x, _log2_floor(lo), _log2_ceil(hi))

    def cos_sin(self, u: AShare) -> tuple[AShare, AShare]:
        from secfwt.protocols.cosine import cos_sin

        return cos_sin(self.ctx, u, truncate=True)

    @contextlib.contextmanager
    def scope(self, label: str) -> Iterator[None]:
        with self.ctx.cost.scope(label):
            yield

    # -- decoder (LLaMA) ops ---------------------------------------------------------------------
    def rmsnorm(self, x: AShare, weight: AShare, eps: float, ms_range: tuple[float, float] | None = None) -> AShare:
        """``ms_range`` None: :func:`secfwt.approx.rmsnorm`. Otherwise RMSNorm for residual streams with
        massive activations (LLaMA: |x| ~ 2e4-3e4 on a few channels), mean(x^2) in ``ms_range``.

        Steps: (1) x' = trunc(x, 1) (x with f - 1 fractional bits, so x'^2 fits the ring for |x| < 2^16);
        (2) one Beaver round for [x' * x', x * w] (x w from the full-precision x); (3) S = sum x'^2 (local,
        scale 2f - 2 < 2^62 while mean(x^2) < 2^22) and x w truncated in ONE call by f - 2 bits (S to scale
        f, x w to scale f + 2); (4) r = sqrt(n) / sqrt(S + n eps) with f + 12 bits; (5) x w * r.
        Cost: 19 rounds; bytes per server 8 (8 |x| + 2 rows) plus :func:`secfwt.approx.rsqrt` on ``rows``
        elements (measured: 152,483 bytes for 4 rows of 576). Valid: |x| < 2^16, mean(x^2) in ``ms_range``.
        Error: S within 2^-f (the single truncation), x' rounding averages out over the row; the rsqrt error
        of :func:`secfwt.approx.rsqrt` dominates.
        """
        from secfwt.approx import rmsnorm, rsqrt
        from secfwt.approx.poly import mul_exact_many, to_scale

        ctx = self.ctx
        if ms_range is None:
            return rmsnorm(ctx, x, weight, eps)
        with ctx.cost.scope("rmsnorm"):
            f = ctx.f
            x = to_scale(ctx, x, f)
            w = to_scale(ctx, weight, f)
            n = x.shape[-1]
            x1 = arith.trunc(ctx, x, 1)  # scale f - 1
            sq, xw = mul_exact_many(ctx, [(x1, x1), (x, w)])  # scales 2f - 2, 2f
            s_raw = sq.data.sum(-1, keepdim=True)  # S at scale 2f - 2
            flat = torch.cat([s_raw.reshape(-1), xw.data.reshape(-1)])
            cut = arith.trunc(ctx, AShare(flat, 2 * f - 2), f - 2).data
            s = AShare(cut[: s_raw.numel()].reshape(s_raw.shape), f)
            xw = AShare(cut[s_raw.numel():].reshape(xw.shape), f + 2)
            s = sh.add_public(ctx, s, n * eps)  # (..., 1) S + n eps
            lo, hi = _log2_floor(ms_range[0] * n), _log2_ceil(ms_range[1] * n)
            r = rsqrt(ctx, s, lo=lo, hi=hi, factor=math.sqrt(n), out_scale=f + 12)  # 1/sqrt(mean + eps)
            return arith.mul_aa(ctx, xw, r, out_scale=f)

    def silu(self, x: AShare) -> AShare:
        from secfwt.approx import silu

        return silu(self.ctx, x, method=self.silu_method)  # type: ignore[arg-type]

    def cumsum(self, x: AShare, dim: int) -> AShare:
        return AShare(torch.cumsum(x.data, dim=dim), x.scale)  # wraps mod 2^64 like every local sum

    def mul_public_sum(self, xs: Sequence[AShare], cs: Sequence[Tensor]) -> AShare:
        terms = [sh.mul_public(self.ctx, x, c.to(torch.float64)) for x, c in zip(xs, cs, strict=True)]
        acc = terms[0]
        for t in terms[1:]:
            acc = sh.add(acc, t)
        return arith.rescale(self.ctx, acc)  # one truncation for the whole sum


__all__ = ["MpcBackend"]
