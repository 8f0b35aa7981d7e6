"""The PRG's key stream is AES-128-CTR's, whatever the draw sizes (chunking, tail handling, stream offsets)."""

from __future__ import annotations

import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secfwt.prg import PRG, PRGStream

KEY = bytes(range(16))


def reference(key: bytes, stream: int, nbytes: int) -> bytes:
    nonce = stream.to_bytes(8, "big") + bytes(8)
    return Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor().update(bytes(nbytes))


@pytest.mark.parametrize("n", [1, 2, 3, 131071, 131072, 131073, 2 * 131072 + 5])
def test_ring_is_the_aes_ctr_key_stream(n: int) -> None:
    x = PRGStream(KEY, 7).ring((n,))
    assert x.dtype == torch.int64 and x.shape == (n,)
    assert x.numpy().tobytes() == reference(KEY, 7, 8 * n)
    assert x.untyped_storage().nbytes() == 8 * n  # no head-room left in the tensor's storage


def test_sequential_draws_continue_the_stream() -> None:
    st = PRGStream(KEY, 3)
    parts = [st.ring((5,)), st.ring((2, 3)), st.ring((131075,)), st.bytes(3), st.ring((4,))]
    got = b"".join(p if isinstance(p, bytes) else p.numpy().tobytes() for p in parts)
    assert got == reference(KEY, 3, len(got))


def test_streams_and_bound_streams_differ() -> None:
    prg = PRG(KEY)
    a, b = prg.stream(0).ring((64,)), prg.stream(1).ring((64,))
    c, d = prg.bound_stream(b"x").ring((64,)), prg.bound_stream(b"y").ring((64,))
    assert not torch.equal(a, b) and not torch.equal(c, d) and not torch.equal(a, c)
    assert torch.equal(prg.bound_stream(b"x").ring((64,)), c)


def test_empty_and_bad_key() -> None:
    assert PRGStream(KEY, 0).ring((0, 4)).shape == (0, 4)
    with pytest.raises(ValueError, match="16 bytes"):
        PRGStream(b"short", 0)
