"""Chunking of a forward command's P x B (candidate prompt, example) rows, shared by every model server.

Row ``r = p * B + b`` is candidate ``p`` on example ``b``. Chunks of at most ``max_rows`` rows take them
example-major (all candidates of a few examples), and each chunk keeps only the leading columns up to its
longest unpadded row: the padding mask is public and right-padded, so the dropped trailing columns are padding
in every row of the chunk. With the owner's batches sorted by length, short sentences no longer pay for the
longest one. Dropping all-pad trailing columns changes no result: an encoder masks them out of every
attention row, a causal decoder never attends to them from a valid position, and the heads read a valid
position (the <mask>, or the last valid token ``sum(mask) - 1``, which trimming does not move).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from secfwt.nn.backend import Backend, V


@dataclass(frozen=True)
class RowChunk:
    """One chunk: the candidate and example index of each of its R rows, and the columns it keeps."""

    prompt: Tensor  # (R,) candidate index p
    example: Tensor  # (R,) example index b
    length: int  # leading columns kept: the longest unpadded row of the chunk

    @property
    def cols(self) -> tuple[Tensor, slice]:
        """Index of the chunk's rows and columns in a (B, T, ...) per-example tensor."""
        return self.example, slice(0, self.length)


def row_chunks(n_pop: int, mask: Tensor, max_rows: int) -> tuple[list[RowChunk], Tensor]:
    """The chunks of the ``n_pop`` x B rows for the public mask (B, T), and the permutation that puts the
    concatenated chunk outputs back in row order ``p * B + b``."""
    if max_rows < 1:
        raise ValueError(f"max_rows: expected >= 1, got {max_rows}")
    n_ex = mask.shape[0]
    n_rows = n_pop * n_ex
    order = torch.arange(n_rows).reshape(n_pop, n_ex).t().reshape(-1)  # example-major
    chunks = []
    for lo in range(0, n_rows, max_rows):
        rows = order[lo : lo + max_rows]
        b_idx = rows % n_ex
        m = mask[b_idx]
        t = int(m.any(0).nonzero().max()) + 1 if bool(m.any()) else mask.shape[1]
        chunks.append(RowChunk(rows // n_ex, b_idx, t))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n_rows)
    return chunks, inverse


def forward_rows(be: Backend[V], n_pop: int, mask: Tensor, max_rows: int, run: Callable[[RowChunk], V]) -> V:
    """``run`` on every chunk (it returns the chunk's (R, L) outputs); the (P * B, L) outputs in row order."""
    chunks, inverse = row_chunks(n_pop, mask, max_rows)
    return be.index(be.cat([run(c) for c in chunks], dim=0), inverse)


__all__ = ["RowChunk", "forward_rows", "row_chunks"]
