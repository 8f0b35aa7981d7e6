"""Exact matrix products over Z_2^64: the kernels, and the choice between them measured on this machine.

Every kernel computes ``a @ b`` modulo 2^64 with torch.matmul's broadcasting rules, int64 in and out:

- ``"int64"``: torch.matmul on the int64 tensors themselves (integer multiply-adds, which wrap modulo 2^64).
  Its speed depends a lot on the CPU and the torch build: with AVX-512 it beats the limbs several times
  over, on older CPUs it is several times slower.
- ``"limbs"``: both operands split into three signed limbs (22, 21 and 21 bits, at shifts 0, 22 and 43); the
  six limb products whose shift is below 64 run as three float64 BLAS calls. Every partial sum is an integer
  below 2^53 when the inner dimension is at most 2^11 (longer ones are split into chunks), so float64 is exact.
  This kernel is exact by construction and is the trusted reference.

Choice (:class:`KernelChooser`): ``SECFWT_MATMUL_KERNEL=auto|limbs|int64`` (default ``auto``) or the
``kernel=`` argument of :func:`secfwt.ring.matmul` forces a kernel. In ``auto``, the first product of each
shape class -- (prepared right operand?, batched?, power-of-4 buckets of M, K and N, torch thread count) --
times every kernel on a random product at the class's lower corner (M, K, N = 4^bucket; batch, then rows,
cut down to about 2^22 multiply-adds): once, then twice more unless it was 8x slower than the fastest on
that first run; the best time wins. Before a kernel other than the limbs is trusted it must (1) match
Python big-integer products on small edge-value products, once per process, and (2) give exactly the
limbs' result on that class's calibration product (only that product: a kernel wrong only at other sizes
would not be caught there; the tests check both kernels on edges, broadcasting and long inner
dimensions); otherwise the limbs are used and the reason is kept.
The choices are cached per process: they describe this machine and torch build, not any party's state,
and they hold no data (calibration inputs are fresh random values).
:func:`kernel_report` lists the CPU, thread count, every class, its measured times and the kernel chosen.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from secfwt.errors import ConfigError

ENV_VAR = "SECFWT_MATMUL_KERNEL"
MODES = ("auto", "limbs", "int64")
_LOG = logging.getLogger(__name__)

# Signed limbs: x = l0 + l1 * 2^22 + l2 * 2^43 (mod 2^64) with l0 in [-2^21, 2^21), l1, l2 in [-2^20, 2^20).
LIMB_SHIFTS = (0, 22, 43)
_LIMB_WIDTHS = (22, 21, 21)
# |l_i * l_j| <= 2^42, so an inner dimension of 2^11 keeps every float64 partial sum below 2^53 (exact).
MAX_INNER = 1 << 11


def _lshift(x: Tensor, k: int) -> Tensor:
    return x * (1 << k) if k < 63 else x * (-(1 << 63))


def _limbs(x: Tensor) -> list[Tensor]:
    out = []
    rest = x
    for width in _LIMB_WIDTHS:
        limb = (rest << (64 - width)) >> (64 - width)  # sign-extended low `width` bits
        out.append(limb.to(torch.float64))
        rest = (rest - limb) >> width
    return out


class RightOperand:
    """A ring matrix prepared once to be the right operand of many :func:`secfwt.ring.matmul` calls (a fixed
    weight). Keeps the int64 matrix contiguous (it shares storage with ``b`` when ``b`` is contiguous, so ``b``
    must not be modified in place afterwards) and, only once a limb kernel first uses it, its limbs laid out
    as the BLAS calls read them: ``[l0 | l1 | l2]`` along the columns per chunk of at most 2^11 inner rows,
    as float32 (every limb has at most 22 bits: exact), 12 more bytes per element."""

    def __init__(self, b: Tensor) -> None:
        if b.dtype != torch.int64 or b.dim() < 2:
            raise TypeError(f"RightOperand: expected an int64 matrix, got {b.dtype} with {b.dim()} dims")
        self.matrix = b.contiguous()
        self.shape = tuple(b.shape)
        self._chunks: tuple[int, list[Tensor]] | None = None

    def limb_chunks(self) -> tuple[int, list[Tensor]]:
        """(chunk size, the limb chunks), made at the first call."""
        if self._chunks is None:
            step = MAX_INNER
            b = self.matrix
            self._chunks = (step, [torch.cat(_limbs(b[..., s : s + step, :]), dim=-1).to(torch.float32)
                                   for s in range(0, b.shape[-2], step)])
        return self._chunks


Operand = Tensor | RightOperand
Kernel = Callable[[Tensor, Operand], Tensor]


def _combine(al: list[Tensor], bcat: Tensor, n: int) -> Tensor:
    """sum over limb pairs (i, j) with shift below 64 of (a_i @ b_j) << (s_i + s_j), from b's [l0 | l1 | l2]."""
    out: Tensor | None = None
    for i, si in enumerate(LIMB_SHIFTS):
        js = [j for j, sj in enumerate(LIMB_SHIFTS) if si + sj < 64]  # a prefix of (0, 1, 2)
        prod = torch.matmul(al[i], bcat[..., : len(js) * n]).to(torch.int64)
        for col, j in enumerate(js):
            part = _lshift(prod[..., col * n : (col + 1) * n], si + LIMB_SHIFTS[j])
            out = part if out is None else out + part
    assert out is not None
    return out


def limbs_kernel(a: Tensor, b: Operand) -> Tensor:
    """``a @ b`` through float64 limb BLAS; ``a``, ``b`` at least 2-D with equal inner dimensions.
    Cost: 6 float64 matrix products of the output's shape (per 2^11 chunk of the inner dimension)."""
    n = b.shape[-1]
    out: Tensor | None = None
    if isinstance(b, RightOperand):
        step, chunks = b.limb_chunks()
        for c, bcat in enumerate(chunks):
            part = _combine(_limbs(a[..., c * step : (c + 1) * step]), bcat.to(torch.float64), n)
            out = part if out is None else out + part
    else:
        step = MAX_INNER
        for s in range(0, max(a.shape[-1], 1), step):
            part = _combine(_limbs(a[..., s : s + step]), torch.cat(_limbs(b[..., s : s + step, :]), dim=-1), n)
            out = part if out is None else out + part
    assert out is not None
    return out


def int64_kernel(a: Tensor, b: Operand) -> Tensor:
    """``a @ b`` by torch.matmul on int64 (integer multiply-adds wrapping modulo 2^64)."""
    return torch.matmul(a, b.matrix if isinstance(b, RightOperand) else b)


KERNELS: dict[str, Kernel] = {"limbs": limbs_kernel, "int64": int64_kernel}


def env_mode() -> str:
    """The kernel mode asked for by ``SECFWT_MATMUL_KERNEL`` (``auto`` when unset)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ConfigError(f"{ENV_VAR}: expected one of {', '.join(MODES)}, got {os.environ.get(ENV_VAR)!r}")
    return value


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one, else the platform module)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _bucket(d: int) -> int:
    """floor(log4(d)) (-1 for 0): the class of d is [4^b, 4^(b+1))."""
    return (d.bit_length() - 1) // 2 if d > 0 else -1


def _span(b: int) -> str:
    return "0" if b < 0 else f"{4 ** b}-{4 ** (b + 1) - 1}"


@dataclass
class _Choice:
    kernel: str
    times: dict[str, float] = field(default_factory=dict)
    representative: str = ""
    reason: str = ""
    seconds: float = 0.0


_EDGES = [0, 1, -1, 2, -2, 2**62, -(2**62), 2**63 - 1, -(2**63), 2**63 - 2, -(2**63) + 1, 2**32 - 1, -(2**32),
          2**21, -(2**21) - 1, 2**43 + 5, 3 * 2**42 - 7, 0x5DEECE66D]


def _edge_operands(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    """Uniform random int64 with edge values (near +-2^63, -1, limb boundaries) spread over it."""
    x = torch.randint(-(2**63), 2**63 - 1, shape, generator=g, dtype=torch.int64)
    flat = x.view(-1)
    if flat.numel():
        edges = torch.tensor(_EDGES, dtype=torch.int64)
        idx = torch.randint(0, flat.numel(), (min(flat.numel(), 4 * len(_EDGES)),), generator=g)
        flat[idx] = edges.repeat(4)[: idx.numel()]
    return x


def bigint_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` modulo 2^64 with Python integers (2-D or 3-D with equal batch): slow, for checks only."""
    if a.dim() == 2:
        return bigint_matmul(a.unsqueeze(0), b.unsqueeze(0)).squeeze(0)
    al, bl = a.tolist(), b.tolist()
    out = []
    for ab, bb in zip(al, bl, strict=True):
        cols = list(zip(*bb, strict=True))
        rows = []
        for row in ab:
            rows.append([((sum(x * y for x, y in zip(row, col, strict=True)) + 2**63) % 2**64) - 2**63
                         for col in cols])
        out.append(rows)
    return torch.tensor(out, dtype=torch.int64).reshape(a.shape[0], a.shape[1], b.shape[2])


_CLEAR_LOSS = 8.0


class KernelChooser:
    """Picks a matmul kernel per shape class by timing them (see the module docstring). Thread-safe: one
    thread calibrates a class while the others wait. ``budget`` caps the multiply-adds of a calibration
    product, ``repeats`` the runs per kernel after the first one (which gives the result that is compared;
    a kernel 8x slower than the fastest on it is not run again)."""

    def __init__(self, kernels: dict[str, Kernel] | None = None, budget: int = 1 << 22, repeats: int = 2) -> None:
        self.kernels = dict(KERNELS if kernels is None else kernels)
        if "limbs" not in self.kernels:
            raise ValueError("KernelChooser: the kernels must include the trusted 'limbs' kernel")
        self.budget, self.repeats = budget, repeats
        self._choices: dict[tuple[Any, ...], _Choice] = {}
        self._self_test: dict[str, str] | None = None
        self._lock = threading.Lock()

    def kernel_for(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], prepared: bool,
                   mode: str = "auto") -> str:
        """The kernel to use for ``a @ b`` (both at least 2-D, inner dimensions equal)."""
        if mode != "auto":
            if mode not in self.kernels:
                raise ConfigError(f"ring.matmul kernel: expected one of auto, {', '.join(self.kernels)}, "
                                  f"got {mode!r}")
            return mode
        key = class_key(a_shape, b_shape, prepared)
        choice = self._choices.get(key)
        if choice is None:
            with self._lock:
                choice = self._choices.get(key)
                if choice is None:
                    choice = self._calibrate(prepared, *_dims(a_shape, b_shape))
                    self._choices[key] = choice
        return choice.kernel

    def self_test(self) -> dict[str, str]:
        """Every kernel against Python big-integer products on small edge-value products: name -> "ok" or why not."""
        if self._self_test is None:
            g = torch.Generator().manual_seed(20260)
            cases = [((5, 37), (37, 4)), ((3, 6, 19), (3, 19, 5))]
            res: dict[str, str] = {}
            for name, fn in self.kernels.items():
                res[name] = "ok"
                for sa, sb in cases:
                    a, b = _edge_operands(sa, g), _edge_operands(sb, g)
                    try:
                        want = bigint_matmul(a, b)
                        ok = torch.equal(fn(a, b), want) and torch.equal(fn(a, RightOperand(b)), want)
                    except Exception as exc:  # a kernel that cannot run is not trusted
                        ok, res[name] = False, f"raised {type(exc).__name__}: {exc}"
                    if not ok:
                        if res[name] == "ok":
                            res[name] = f"differs from Python big-int products on {sa} @ {sb}"
                        break
            self._self_test = res
        return self._self_test

    def _calibrate(self, prepared: bool, batch: int, m: int, k: int, n: int) -> _Choice:
        t0 = time.perf_counter()
        tested = self.self_test()
        # The class's lower corner, batch (then rows) cut to the budget: the choice depends on the class only.
        m, k, n = (4 ** _bucket(d) if d > 0 else 0 for d in (m, k, n))
        b_rep = max(2, min(batch, self.budget // max(1, m * k * n))) if batch > 1 else 1
        m_rep = min(m, max(16, self.budget // max(1, b_rep * k * n)))
        lead = (b_rep,) if batch > 1 else ()
        g = torch.Generator().manual_seed(7 + m + 31 * k + 977 * n)
        a = _edge_operands((*lead, m_rep, k), g)
        b_raw = _edge_operands((*lead, k, n), g)
        b: Operand = RightOperand(b_raw) if prepared else b_raw
        if isinstance(b, RightOperand):
            b.limb_chunks()  # preparation is a one-off per weight, not part of a product's time
        rep = f"{'x'.join(map(str, a.shape))} @ {'x'.join(map(str, b_raw.shape))}"
        outs: dict[str, Tensor] = {}
        times: dict[str, float] = {}
        reasons = []
        for name, fn in self.kernels.items():
            if tested.get(name) != "ok":
                reasons.append(f"{name}: {tested.get(name)}")
                continue
            s = time.perf_counter()
            outs[name] = fn(a, b)  # the first run: timed too, and its result compared below
            times[name] = time.perf_counter() - s
        ref = outs.get("limbs")
        for name in list(outs):
            if ref is None or (name != "limbs" and not torch.equal(outs[name], ref)):
                reasons.append(f"{name}: differs from the limbs on the calibration product {rep}")
                del outs[name], times[name]
        # A kernel whose first run took over _CLEAR_LOSS times the fastest first run is not run again.
        fastest = min(times.values(), default=0.0)
        contenders = [name for name in outs if times[name] <= _CLEAR_LOSS * fastest]
        for _ in range(self.repeats):
            for name in contenders:
                s = time.perf_counter()
                self.kernels[name](a, b)
                times[name] = min(times[name], time.perf_counter() - s)
        best = min(times, key=lambda nm: times[nm]) if times else "limbs"
        if reasons:
            _LOG.warning("ring.matmul kernel choice for %s: %s", rep, "; ".join(reasons))
        return _Choice(best, times, rep, "; ".join(reasons), time.perf_counter() - t0)

    def report(self) -> dict[str, Any]:
        """CPU, torch, threads, the mode asked for, the self-test, and per calibrated class the kernel and times."""
        classes = []
        for key, ch in sorted(self._choices.items(), key=lambda kv: str(kv[0])):
            classes.append({
                "class": class_name(key),
                "representative": ch.representative,
                "chosen": ch.kernel,
                "times_s": {nm: round(t, 6) for nm, t in ch.times.items()},
                "reason": ch.reason,
                "calibration_s": round(ch.seconds, 4),
            })
        try:
            mode = env_mode()
        except ConfigError as exc:
            mode = f"invalid ({exc})"
        return {
            "cpu": cpu_model(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "mode": mode,
            "self_test": dict(self._self_test or {}),
            "calibration_s": round(sum(ch.seconds for ch in self._choices.values()), 4),
            "classes": classes,
        }


def class_key(a_shape: tuple[int, ...], b_shape: tuple[int, ...], prepared: bool) -> tuple[Any, ...]:
    """The shape class of ``a @ b`` (both at least 2-D) at torch's current thread count."""
    batch, m, k, n = _dims(a_shape, b_shape)
    return (prepared, batch > 1, _bucket(m), _bucket(k), _bucket(n), torch.get_num_threads())


def class_name(key: tuple[Any, ...]) -> str:
    """A shape class as the report names it, e.g. "2-D M 64-255 K 256-1023 N 256-1023 prepared, 1 thread"."""
    prepared, batched, mb, kb, nb, threads = key
    return (f"{'batched' if batched else '2-D'} M {_span(mb)} K {_span(kb)} N {_span(nb)}"
            f"{' prepared' if prepared else ''}, {threads} thread{'s' if threads != 1 else ''}")


def _dims(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(batch, M, K, N) of ``a @ b`` as torch runs it: an unbatched right operand folds a's batch into M."""
    k, n = a_shape[-1], b_shape[-1]
    if math.prod(b_shape[:-2]) <= 1:
        return 1, math.prod(a_shape[:-1]), k, n
    ab, bb = a_shape[:-2], b_shape[:-2]
    width = max(len(ab), len(bb))
    ab, bb = (1,) * (width - len(ab)) + ab, (1,) * (width - len(bb)) + bb
    batch = math.prod(x if y == 1 else y for x, y in zip(ab, bb, strict=True))  # torch.matmul rejects non-broadcastable
    return batch, a_shape[-2], k, n


def summary(report: dict[str, Any]) -> str:
    """One line for benchmark and cost reports: CPU, threads and the kernel chosen per class."""
    picks: dict[str, int] = {}
    for c in report["classes"]:
        picks[c["chosen"]] = picks.get(c["chosen"], 0) + 1
    chosen = ", ".join(f"{nm} in {cnt} shape class{'es' if cnt != 1 else ''}" for nm, cnt in sorted(picks.items()))
    return (f"matmul kernel: mode {report['mode']} on {report['cpu']}, {report['threads']} torch "
            f"thread{'s' if report['threads'] != 1 else ''}: {chosen or 'no product yet'} "
            f"(calibration {report['calibration_s']:.3f} s)")
