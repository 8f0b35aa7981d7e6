"""Ring arithmetic, fixed-point encoding and the matmul kernels: every kernel equals a Python big-integer
product modulo 2^64; the kernel chooser only trusts kernels that agree with it and picks the faster one."""

import json
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secfwt import ring, ring_kernels
from secfwt.errors import ConfigError
from secfwt.ring_kernels import KernelChooser, RightOperand, int64_kernel, limbs_kernel

I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
EDGES = [0, 1, -1, 2, 2**62, -(2**62), 2**63 - 1, -(2**63), 2**63 - 2, -(2**63) + 1, 2**32, -(2**32) + 1,
         0xFFFF, 0x10000, 2**21 - 1, -(2**21), 2**43 - 1, 2**42 + 3]
KERNELS = ["limbs", "int64", "auto"]


def _wrap(v: int) -> int:
    v %= 2**64
    return v - 2**64 if v >= 2**63 else v


def _bigint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with Python integers (numpy object arrays: torch.matmul's broadcasting and 1-D rules), mod 2^64."""
    def obj(t: torch.Tensor) -> np.ndarray:
        return np.array(t.reshape(-1).tolist() + [None], dtype=object)[:-1].reshape(tuple(t.shape))

    prod = np.asarray(np.matmul(obj(a), obj(b)), dtype=object)
    flat = [_wrap(int(v)) for v in prod.reshape(-1).tolist()]
    return torch.tensor(flat, dtype=torch.int64).reshape(prod.shape)


def _rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, shape, generator=g, dtype=torch.int64)


@given(st.lists(I64, min_size=1, max_size=20), st.lists(I64, min_size=1, max_size=20))
def test_add_mul_wrap_like_z2_64(xs, ys):
    n = min(len(xs), len(ys))
    a, b = torch.tensor(xs[:n]), torch.tensor(ys[:n])
    assert (a + b).tolist() == [_wrap(x + y) for x, y in zip(xs, ys, strict=False)]
    assert (a * b).tolist() == [_wrap(x * y) for x, y in zip(xs, ys, strict=False)]


def test_bigint_reference_wraps():
    # The oracle itself: (2^63 - 1) * 2 + (-2^63) * 1 = -2^63 - 2 (wraps to 2^63 - 2).
    a, b = torch.tensor([[2**63 - 1, -(2**63)]]), torch.tensor([[2], [1]])
    assert _bigint(a, b).tolist() == [[2**63 - 2]]
    assert _bigint(torch.tensor([3, -1]), torch.tensor([5, 2])).item() == 13


@pytest.mark.parametrize("kernel", KERNELS)
def test_matmul_wraparound_edges(kernel):
    e = torch.tensor(EDGES, dtype=torch.int64)
    a = e.reshape(1, -1).repeat(len(EDGES), 1)
    b = e.reshape(-1, 1).repeat(1, len(EDGES))
    for x, y in [(a, b), (a, a.T), (b, a), (a.roll(3, 0), b.roll(5, 1))]:
        assert torch.equal(ring.matmul(x, y, kernel=kernel), _bigint(x, y))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "shape_a,shape_b",
    [((7, 13), (13, 5)), ((2, 3, 4, 9), (9, 6)), ((3, 1, 4, 9), (2, 9, 5)), ((9,), (9, 4)), ((4, 9), (9,)),
     ((9,), (9,)), ((2, 5, 9), (9,)), ((9,), (3, 9, 2)), ((4, 9), (3, 9, 2)), ((3, 0, 9), (9, 2)), ((2, 0), (0, 3))],
)
def test_matmul_broadcasting_and_1d(kernel, shape_a, shape_b):
    a, b = _rand(shape_a, 1), _rand(shape_b, 2)
    got = ring.matmul(a, b, kernel=kernel)
    want = _bigint(a, b)
    assert got.shape == torch.matmul(a, b).shape and torch.equal(got, want)


@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.data())
@settings(max_examples=40, deadline=None)
def test_matmul_hypothesis(m, k, n, data):
    vals = st.one_of(I64, st.sampled_from(EDGES))
    a = torch.tensor(data.draw(st.lists(st.lists(vals, min_size=k, max_size=k), min_size=m, max_size=m)))
    b = torch.tensor(data.draw(st.lists(st.lists(vals, min_size=n, max_size=n), min_size=k, max_size=k)))
    want = _bigint(a, b)
    for kernel in KERNELS:
        assert torch.equal(ring.matmul(a, b, kernel=kernel), want), kernel
        assert torch.equal(ring.matmul(a, RightOperand(b), kernel=kernel), want), kernel


@pytest.mark.parametrize("kernel", KERNELS)
def test_matmul_inner_dimension_above_2_11(kernel):
    k = (1 << 11) + 37  # two chunks for the limbs
    a, b = _rand((3, k), 3), _rand((k, 4), 4)
    a[0, :8] = torch.tensor(EDGES[:8])
    want = _bigint(a, b)
    assert torch.equal(ring.matmul(a, b, kernel=kernel), want)
    assert torch.equal(ring.matmul(a, RightOperand(b), kernel=kernel), want)


def test_limbs_chunking_small_chunks(monkeypatch):
    # Many chunks, a ragged last one, plain and prepared operands.
    monkeypatch.setattr(ring_kernels, "MAX_INNER", 16)
    a, b = _rand((2, 3, 50), 5), _rand((50, 4), 6)
    want = _bigint(a, b)
    assert torch.equal(limbs_kernel(a, b), want)
    prepared = RightOperand(b)
    assert torch.equal(limbs_kernel(a, prepared), want)
    assert prepared.limb_chunks()[0] == 16 and len(prepared.limb_chunks()[1]) == 4


@pytest.mark.parametrize("kernel", KERNELS)
def test_right_operand_each_kernel(kernel):
    a = _rand((2, 5, 11), 7)
    w = _rand((6, 11), 8)
    for b in (w.t(), _rand((11, 6), 9), _rand((2, 11, 6), 10)):  # a transposed view, plain, batched
        prepared = RightOperand(b)
        want = _bigint(a, b)
        assert torch.equal(ring.matmul(a, prepared, kernel=kernel), want)
        assert torch.equal(ring.matmul(a, prepared, kernel=kernel), want)  # again, with whatever was cached
        if kernel == "int64":
            assert prepared._chunks is None  # limbs are only made for a limb kernel


def test_env_override_and_its_error(monkeypatch):
    a, b = _rand((4, 9), 11), _rand((9, 3), 12)
    want = _bigint(a, b)
    monkeypatch.setenv(ring_kernels.ENV_VAR, "limbs")
    prepared = RightOperand(b)
    assert torch.equal(ring.matmul(a, prepared), want) and prepared._chunks is not None
    monkeypatch.setenv(ring_kernels.ENV_VAR, "int64")
    prepared = RightOperand(b)
    assert torch.equal(ring.matmul(a, prepared), want) and prepared._chunks is None
    assert ring.kernel_report()["mode"] == "int64"
    monkeypatch.setenv(ring_kernels.ENV_VAR, "fast")
    with pytest.raises(ConfigError, match=r"^SECFWT_MATMUL_KERNEL: expected one of auto, limbs, int64, got 'fast'$"):
        ring.matmul(a, b)
    assert ring.kernel_report()["mode"].startswith("invalid")
    monkeypatch.setenv(ring_kernels.ENV_VAR, "auto")
    assert torch.equal(ring.matmul(a, b), want)
    with pytest.raises(ConfigError, match="expected one of auto, limbs, int64, got 'bogus'"):
        ring.matmul(a, b, kernel="bogus")


def test_matmul_rejects_bad_operands():
    a = _rand((2, 3), 13)
    with pytest.raises(TypeError, match="expected int64 tensors"):
        ring.matmul(a.double(), a.T)
    with pytest.raises(ValueError, match="inner dimensions differ"):
        ring.matmul(a, a)
    with pytest.raises(ValueError, match="inner dimensions differ"):
        ring.matmul(a, RightOperand(a))
    with pytest.raises(TypeError, match="expected an int64 matrix"):
        RightOperand(a[0])


def _wrong_for_long_inner(a, b):
    """Right on the self-test's short products, off by one once the inner dimension exceeds 64; fast."""
    return int64_kernel(a, b) + int(a.shape[-1] > 64)


def _no_wraparound(a, b):
    """Exact only while no sum leaves float64's 53 bits: fails the big-int self-test."""
    m = b.matrix if isinstance(b, RightOperand) else b
    return torch.matmul(a.to(torch.float64), m.to(torch.float64)).clamp(-(2.0**62), 2.0**62).to(torch.int64)


def test_chooser_rejects_a_kernel_that_disagrees_with_the_limbs():
    # The limbs slowed down, so that on any CPU the wrong kernel would be the faster one.
    chooser = KernelChooser({"limbs": _slowed(limbs_kernel), "wrong": _wrong_for_long_inner})
    assert chooser.self_test() == {"limbs": "ok", "wrong": "ok"}  # the self-test alone would not catch it
    assert chooser.kernel_for((64, 256), (256, 256), False) == "limbs"
    cls = chooser.report()["classes"][0]
    assert cls["chosen"] == "limbs" and "wrong: differs from the limbs" in cls["reason"]
    assert list(cls["times_s"]) == ["limbs"]
    # A product with a short inner dimension: there it agrees, and it is the faster one.
    assert chooser.kernel_for((64, 16), (16, 256), False) == "wrong"


def test_chooser_self_test_catches_missing_wraparound():
    chooser = KernelChooser({"limbs": limbs_kernel, "float": _no_wraparound})
    assert "differs from Python big-int products" in chooser.self_test()["float"]
    assert chooser.kernel_for((8, 8), (8, 8), True) == "limbs"
    assert "float: differs from Python big-int" in chooser.report()["classes"][0]["reason"]


def _slowed(kernel):
    def slow(a, b):
        time.sleep(0.05)
        return kernel(a, b)
    return slow


def test_chooser_picks_the_measured_fastest():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny multi-threaded BLAS calls can take milliseconds on a loaded machine
    try:
        assert KernelChooser({"limbs": _slowed(limbs_kernel), "int64": int64_kernel}).kernel_for(
            (12, 32, 16), (12, 16, 32), False) == "int64"
        assert KernelChooser({"limbs": limbs_kernel, "int64": _slowed(int64_kernel)}).kernel_for(
            (12, 32, 16), (12, 16, 32), False) == "limbs"
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="'limbs'"):
        KernelChooser({"int64": int64_kernel})


def test_chooser_classes_and_report():
    chooser = KernelChooser()
    threads = torch.get_num_threads()
    try:
        chooser.kernel_for((128, 768), (768, 768), False)
        chooser.kernel_for((100, 700), (700, 1000), False)  # same buckets: no new calibration
        chooser.kernel_for((2, 64, 768), (768, 768), True)  # folded rows 128, prepared: a new class
        chooser.kernel_for((12, 128, 64), (12, 64, 128), False)  # batched
        torch.set_num_threads(1 if threads > 1 else 2)
        chooser.kernel_for((128, 768), (768, 768), False)  # another thread count: measured again
    finally:
        torch.set_num_threads(threads)
    rep = json.loads(json.dumps(chooser.report()))
    assert rep["cpu"] and rep["threads"] == threads and rep["self_test"] == {"limbs": "ok", "int64": "ok"}
    names = [c["class"] for c in rep["classes"]]
    assert len(names) == 4 and len(set(names)) == 4
    assert any("batched M 64-255 K 64-255 N 64-255" in nm for nm in names)
    assert any("2-D M 64-255 K 256-1023 N 256-1023 prepared" in nm for nm in names)
    for c in rep["classes"]:
        assert c["chosen"] in ("limbs", "int64") and c["reason"] == ""
        assert c["chosen"] == min(c["times_s"], key=c["times_s"].get)
    assert rep["calibration_s"] < 5.0  # about 0.05 s on an idle 2-core machine
    assert "matmul kernel: mode" in ring_kernels.summary(rep) and "shape class" in ring_kernels.summary(rep)


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=30))
@settings(max_examples=50)
def test_encode_decode_roundtrip(vals):
    x = torch.tensor(vals, dtype=torch.float64)
    y = ring.decode(ring.encode(x, 16), 16)
    assert (y - x).abs().max() <= 2**-17 + 1e-12


def test_encode_rejects_out_of_range_and_nan():
    with pytest.raises(OverflowError, match="does not fit"):
        ring.encode(torch.tensor([2.0**47]), 16)
    with pytest.raises(ValueError, match="NaN"):
        ring.encode(torch.tensor([float("nan")]), 16)


@given(I64, st.integers(min_value=1, max_value=62))
def test_logical_rshift_and_msb(v, k):
    x = torch.tensor([v])
    assert ring.logical_rshift(x, k).item() == (v % 2**64) >> k
    assert ring.msb(x).item() == ((v % 2**64) >> 63)
