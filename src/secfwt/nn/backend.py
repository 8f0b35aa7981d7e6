"""The operations the model needs, as a :class:`Backend` protocol, and the plaintext backend (the oracle).

The model code (:mod:`secfwt.nn.encoder`, :mod:`secfwt.nn.attention`, :mod:`secfwt.nn.heads`) only calls
these methods on opaque values; it never sees raw shares or a party context. Two implementations:

* :class:`PlainBackend`: values are float torch tensors (float64 by default); the oracle of every test.
* :class:`secfwt.nn.mpc.MpcBackend`: values are :class:`secfwt.share.AShare`; non-linear ops call
  :mod:`secfwt.approx` and :mod:`secfwt.protocols`.

Naming: ``*_public`` ops combine a private value with a public torch tensor or number (no extra
communication beyond a truncation); everything else is private x private. ``mask`` is a public 0/1 tensor.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

V = TypeVar("V")


class Backend(Protocol[V]):
    """Primitive ops over values of type ``V`` (plain tensors or shares)."""

    name: str

    # -- structure (local on every backend) --------------------------------------------------------
    def shape(self, x: V) -> tuple[int, ...]: ...
    def reshape(self, x: V, shape: Sequence[int]) -> V: ...
    def transpose(self, x: V, a: int, b: int) -> V: ...
    def index(self, x: V, idx: Any) -> V: ...
    def expand(self, x: V, shape: Sequence[int]) -> V: ...
    def cat(self, xs: Sequence[V], dim: int) -> V: ...
    def sum(self, x: V, dim: int, keepdim: bool = False) -> V: ...
    def const(self, t: Tensor) -> V:
        """A public tensor as a value (a trivial sharing under MPC)."""
        ...

    # -- arithmetic ------------------------------------------------------------------------------
    def add(self, x: V, y: V) -> V: ...
    def sub(self, x: V, y: V) -> V: ...
    def mul(self, x: V, y: V) -> V: ...
    def square(self, x: V) -> V: ...
    def add_public(self, x: V, c: Tensor | float) -> V: ...
    def mul_public(self, x: V, c: Tensor | float) -> V: ...
    def mul_mask(self, x: V, mask: Tensor) -> V:
        """``x * mask`` for a public 0/1 (integer-valued) tensor: exact, no truncation."""
        ...

    def linear(self, x: V, w: V, b: V | None) -> V:
        """``x @ w^T + b`` with ``w`` of shape (out, in) (PyTorch/HF layout)."""
        ...

    def linear_public(self, x: V, w: Tensor) -> V:
        """``x @ w^T`` with a public matrix ``w`` of shape (out, in) (e.g. RFA's random frequencies)."""
        ...

    def matmul(self, x: V, y: V) -> V:
        """Product of two private activations (torch.matmul broadcasting)."""
        ...

    def scores(self, q: V, k_t: V) -> V:
        """Attention logits q @ k_t that go straight into :meth:`softmax` (the MPC backend keeps a coarse copy
        from the same truncation for softmax's max)."""
        ...

    # -- non-linear ------------------------------------------------------------------------------
    def softmax(self, x: V, mask: Tensor | None = None) -> V:
        """Softmax over the last dim; ``mask`` (broadcastable, public 0/1) removes keys."""
        ...

    def gelu(self, x: V) -> V: ...
    def tanh(self, x: V) -> V: ...
    def relu(self, x: V) -> V: ...
    def exp(self, x: V) -> V:
        """exp(x) for x <= 0."""
        ...

    def layernorm(self, x: V, weight: V, bias: V, eps: float) -> V: ...
    def reciprocal(self, x: V, lo: float, hi: float) -> V:
        """1/x for x in [lo, hi]."""
        ...

    def rsqrt(self, x: V, lo: float, hi: float) -> V:
        """1/sqrt(x) for x in [lo, hi]."""
        ...

    def cos_sin(self, u: V) -> tuple[V, V]:
        """(cos 2πu, sin 2πu)."""
        ...

    def scope(self, label: str) -> contextlib.AbstractContextManager[None]:
        """A cost scope named after the layer op (no-op in plaintext)."""
        ...

    # -- decoder (LLaMA) ops ---------------------------------------------------------------------
    def rmsnorm(self, x: V, weight: V, eps: float, ms_range: tuple[float, float] | None = None) -> V:
        """x / sqrt(mean(x^2, -1) + eps) * weight; ``ms_range``: range of mean(x^2) for MPC (None: the
        approximation's default [2^-16, 2^16]; decoders with massive activations need more)."""
        ...

    def silu(self, x: V) -> V:
        """x * sigmoid(x)."""
        ...

    def cumsum(self, x: V, dim: int) -> V:
        """Prefix sums along ``dim`` (local on shares)."""
        ...

    def mul_public_sum(self, xs: Sequence[V], cs: Sequence[Tensor]) -> V:
        """sum_i xs[i] * cs[i] for public tensors cs (broadcasting), with ONE truncation under MPC
        (e.g. rotary embeddings: x cos + rotate_half(x) sin)."""
        ...


class PlainBackend:
    """Plaintext reference backend on float torch tensors (float64 by default)."""

    name = "plain"

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype

    def tensor(self, t: Tensor) -> Tensor:
        """Convert a weight or input to this backend's dtype."""
        return t.detach().to(self.dtype)

    # structure
    def shape(self, x: Tensor) -> tuple[int, ...]:
        return tuple(x.shape)

    def reshape(self, x: Tensor, shape: Sequence[int]) -> Tensor:
        return x.reshape(*shape)

    def transpose(self, x: Tensor, a: int, b: int) -> Tensor:
        return x.transpose(a, b)

    def index(self, x: Tensor, idx: Any) -> Tensor:
        return x[idx]

    def expand(self, x: Tensor, shape: Sequence[int]) -> Tensor:
        return x.expand(*shape)

    def cat(self, xs: Sequence[Tensor], dim: int) -> Tensor:
        return torch.cat(list(xs), dim=dim)

    def sum(self, x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
        return x.sum(dim=dim, keepdim=keepdim)

    def const(self, t: Tensor) -> Tensor:
        return t.to(self.dtype)

    # arithmetic
    def add(self, x: Tensor, y: Tensor) -> Tensor:
        return x + y

    def sub(self, x: Tensor, y: Tensor) -> Tensor:
        return x - y

    def mul(self, x: Tensor, y: Tensor) -> Tensor:
        return x * y

    def square(self, x: Tensor) -> Tensor:
        return x * x

    def add_public(self, x: Tensor, c: Tensor | float) -> Tensor:
        return x + (c.to(self.dtype) if isinstance(c, Tensor) else c)

    def mul_public(self, x: Tensor, c: Tensor | float) -> Tensor:
        return x * (c.to(self.dtype) if isinstance(c, Tensor) else c)

    def mul_mask(self, x: Tensor, mask: Tensor) -> Tensor:
        return x * mask.to(self.dtype)

    def linear(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        y = torch.matmul(x, w.transpose(0, 1))
        return y if b is None else y + b

    def linear_public(self, x: Tensor, w: Tensor) -> Tensor:
        return torch.matmul(x, w.to(self.dtype).transpose(0, 1))

    def matmul(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.matmul(x, y)

    def scores(self, q: Tensor, k_t: Tensor) -> Tensor:
        return torch.matmul(q, k_t)

    # non-linear
    def softmax(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            x = x.masked_fill(mask.expand(x.shape) == 0, float("-inf"))
        return torch.softmax(x, dim=-1)

    def gelu(self, x: Tensor) -> Tensor:
        return torch.nn.functional.gelu(x)

    def tanh(self, x: Tensor) -> Tensor:
        return torch.tanh(x)

    def relu(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def exp(self, x: Tensor) -> Tensor:
        return torch.exp(x)

    def layernorm(self, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def reciprocal(self, x: Tensor, lo: float, hi: float) -> Tensor:
        return 1.0 / x

    def rsqrt(self, x: Tensor, lo: float, hi: float) -> Tensor:
        return torch.rsqrt(x)

    def cos_sin(self, u: Tensor) -> tuple[Tensor, Tensor]:
        t = 2.0 * math.pi * u
        return torch.cos(t), torch.sin(t)

    @contextlib.contextmanager
    def scope(self, label: str) -> Iterator[None]:
        yield

    # decoder (LLaMA) ops
    def rmsnorm(self, x: Tensor, weight: Tensor, eps: float, ms_range: tuple[float, float] | None = None) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def silu(self, x: Tensor) -> Tensor:
        return torch.nn.functional.silu(x)

    def cumsum(self, x: Tensor, dim: int) -> Tensor:
        return torch.cumsum(x, dim=dim)

    def mul_public_sum(self, xs: Sequence[Tensor], cs: Sequence[Tensor]) -> Tensor:
        return sum((x * c.to(self.dtype) for x, c in zip(xs, cs, strict=True)), torch.zeros((), dtype=self.dtype))


__all__ = ["Backend", "PlainBackend", "V"]
