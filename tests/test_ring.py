"""Ring arithmetic, fixed-point encoding and the limb matmul: exact equality with the plain int64 oracle."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secfwt import ring

I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
EDGES = [0, 1, -1, 2**62, -(2**62), 2**63 - 1, -(2**63), 2**32, -(2**32) + 1, 0xFFFF, 0x10000]


def _wrap(v: int) -> int:
    v %= 2**64
    return v - 2**64 if v >= 2**63 else v


@given(st.lists(I64, min_size=1, max_size=20), st.lists(I64, min_size=1, max_size=20))
def test_add_mul_wrap_like_z2_64(xs, ys):
    n = min(len(xs), len(ys))
    a, b = torch.tensor(xs[:n]), torch.tensor(ys[:n])
    assert (a + b).tolist() == [_wrap(x + y) for x, y in zip(xs, ys, strict=False)]
    assert (a * b).tolist() == [_wrap(x * y) for x, y in zip(xs, ys, strict=False)]


@pytest.mark.parametrize(
    "shape_a,shape_b",
    [((7, 13), (13, 5)), ((2, 3, 4, 9), (9, 6)), ((3, 1, 4, 9), (2, 9, 5)), ((9,), (9, 4)), ((4, 9), (9,))],
)
def test_limb_matmul_exact(shape_a, shape_b):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-(2**63), 2**63 - 1, shape_a, generator=g)
    b = torch.randint(-(2**63), 2**63 - 1, shape_b, generator=g)
    assert torch.equal(ring.matmul(a, b), torch.matmul(a, b))


def test_limb_matmul_edges():
    e = torch.tensor(EDGES, dtype=torch.int64)
    a = e.reshape(1, -1).repeat(len(EDGES), 1)
    b = e.reshape(-1, 1).repeat(1, len(EDGES))
    assert torch.equal(ring.matmul(a, b), torch.matmul(a, b))
    assert torch.equal(ring.matmul(a, a.T), torch.matmul(a, a.T))


def test_limb_matmul_long_inner_dimension(monkeypatch):
    # Force the chunked path with a small chunk size and compare to the oracle.
    monkeypatch.setattr(ring, "_MAX_INNER", 16)
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-(2**63), 2**63 - 1, (3, 50), generator=g)
    b = torch.randint(-(2**63), 2**63 - 1, (50, 4), generator=g)
    assert torch.equal(ring.matmul(a, b), torch.matmul(a, b))


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
