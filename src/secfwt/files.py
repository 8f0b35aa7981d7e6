"""Private output files: everything secfwt writes for an owner (predictions, reports, plots, tuned prompts,
checkpoints, model share files) is created mode 0600 in directories created mode 0700.

Files are written atomically: a temporary file made by :func:`tempfile.mkstemp` (mode 0600 from the start, so
the content is never readable by others, whatever the umask) in the target's directory, fsynced, then renamed
over the target. Directories this process creates get mode 0700 (and an explicit ``chmod``, since ``mkdir``'s
mode is filtered by the umask); directories that already exist (the user's cwd, a home directory) are left as
they are.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: str | Path) -> Path:
    """Create ``path`` and its missing parents with mode 0700; existing directories are not touched."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made concurrently: not ours, leave its mode
            continue
        os.chmod(d, DIR_MODE)
    return path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def private_output(path: str | Path) -> Iterator[Path]:
    """``with private_output(p) as tmp:`` write ``tmp`` (by path, e.g. ``safetensors.save_file``); on success
    it becomes ``p`` (mode 0600, fsynced, atomic rename), on an exception it is removed and ``p`` is unchanged."""
    path = Path(path)
    private_dir(path.parent)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)  # a writer that re-created the file would have used the umask
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_private(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically with mode 0600; returns ``path``."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with private_output(path) as tmp, open(tmp, "wb") as f:
        f.write(raw)
    return path


def open_private_append(path: str | Path) -> TextIO:
    """``path`` opened for appending text (a log), created 0600 (its directory 0700 when new); an existing
    file is set to 0600 too."""
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, "a", encoding="utf-8", buffering=1)


__all__ = ["DIR_MODE", "FILE_MODE", "open_private_append", "private_dir", "private_output", "write_private"]
