"""PRG draws side by side: the previous implementation (key stream into a zero-filled bytearray, one call) and
``secfwt.prg.PRGStream.ring`` (written straight into the tensor, 1 MiB chunks), on this machine.

Run:  python benchmarks/prg_draws.py [--repeats 5]

Both produce the same AES-128-CTR key stream (checked before timing; tests/test_prg.py checks the current one
against the reference). Times are the best of ``--repeats`` rounds of ~0.3 s each, alternating the two, under
the party processes' malloc settings (:mod:`secfwt.alloc`, applied in this process); printed with the CPU model.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secfwt.alloc import configure_malloc
from secfwt.cost import cpu_model
from secfwt.prg import PRGStream

SIZES = (1 << 13, 1 << 17, 1 << 20, 1 << 23)  # int64 elements: 64 KiB .. 64 MiB


class Previous:
    """The implementation before this change, kept here as the baseline."""

    def __init__(self, key: bytes) -> None:
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros = memoryview(bytes(1 << 20))

    def ring(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        nbytes = 8 * n
        if len(self._zeros) < nbytes:
            self._zeros = memoryview(bytes(max(nbytes, 2 * len(self._zeros))))
        buf = bytearray(nbytes + 15)
        self._enc.update_into(self._zeros[:nbytes], buf)
        return torch.frombuffer(buf, dtype=torch.int64, count=n).reshape(shape)


def rate(draw: object, n: int, seconds: float = 0.3) -> float:
    """GB/s of ``draw.ring((n,))`` over ~``seconds``."""
    k, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        draw.ring((n,))  # type: ignore[attr-defined]
        k += 1
    return 8 * n * k / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    configure_malloc()
    key = bytes(range(16))
    old, new = Previous(key), PRGStream(key, 0)
    assert torch.equal(Previous(key).ring((1000,)), PRGStream(key, 0).ring((1000,)))
    print(f"CPU: {cpu_model()}; torch threads {torch.get_num_threads()}; best of {a.repeats}")
    print(f"{'elements':>10} {'MiB':>6} {'previous GB/s':>14} {'current GB/s':>13} {'ratio':>6}")
    for n in SIZES:
        best_old = best_new = 0.0
        for _ in range(a.repeats):
            best_old = max(best_old, rate(old, n))
            best_new = max(best_new, rate(new, n))
        print(f"{n:>10} {8 * n / 2**20:>6.1f} {best_old:>14.2f} {best_new:>13.2f} {best_new / best_old:>6.2f}")


if __name__ == "__main__":
    main()
