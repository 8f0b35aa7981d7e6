"""Atomic checkpoints of the tuning loop.

A checkpoint is one pickle (``state.pkl``) holding the loop state: the CMA-ES object (the ``cmaes`` optimizer
pickles with its own RNG), the loop's RNG states, counters, the best ``z`` and the history. It is written to a
temporary file in the same directory, flushed and fsynced, then renamed over the old one (``os.replace`` is
atomic on POSIX), so a kill at any moment leaves either the previous or the new checkpoint, never a torn one.

Pickle runs code when loaded: load only checkpoints this data owner wrote (they never leave the owner).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from secfwt.errors import ConfigError

STATE_FILE = "state.pkl"
FORMAT_VERSION = 1


def save_atomic(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/state.pkl`` atomically (tmp file + fsync + rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / STATE_FILE
    fd, tmp = tempfile.mkstemp(prefix=".state.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump({"version": FORMAT_VERSION, **state}, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def load(directory: Path) -> dict[str, Any] | None:
    """The last checkpoint in ``directory``, or None when there is none."""
    target = directory / STATE_FILE
    if not target.is_file():
        return None
    try:
        with target.open("rb") as f:
            state = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ModuleNotFoundError) as e:
        raise ConfigError(f"{target}: unreadable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        got = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{target}: checkpoint format version: expected {FORMAT_VERSION}, got {got}")
    return state
