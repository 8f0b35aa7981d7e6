"""Less allocation churn: glibc malloc settings for the party processes.

A private forward allocates and frees tensors of megabytes at a high rate. With glibc's defaults every block
above the (dynamic, at most 32 MiB) mmap threshold is a fresh ``mmap`` whose pages the kernel faults in and
zeroes on first touch, and freed memory at the top of the heap is given back (trimmed) as soon as it exceeds the
trim threshold, to be faulted in again by the next allocation: a large share of a run's CPU time is then system
time (minor page faults). Keeping freed memory in the process avoids both.

Two ways, with the same values (:data:`MALLOC_SETTINGS`):

* child processes (:class:`secfwt.launch.PartyProcesses`) get them as glibc's environment variables
  (:func:`malloc_env`), read by glibc at start, so the imports' allocations are covered too;
* the current process calls ``mallopt`` through ctypes (:func:`configure_malloc`), at the start of the commands
  that run parties (``secfwt demo``/``tune``/``predict``/``party`` through :mod:`secfwt.launch`).

Settings: M_MMAP_THRESHOLD = 32 MiB (glibc's largest allowed value; fixing it also stops the dynamic
threshold), M_MMAP_MAX = 0 (blocks above it come from the heap too, where freed memory is reused),
M_TRIM_THRESHOLD = 1 GiB (keep up to 1 GiB of free heap), M_TOP_PAD = 64 MiB (grow the heap in large steps),
M_ARENA_MAX = 4 (few per-thread arenas, so freed blocks are found again). Cost: a process keeps up to ~1 GiB
more resident memory than it uses at a time. Measured on ``secfwt demo --iterations 1 --max-eval 8`` (README,
"Offline and online"): minor page faults 5.5 M -> 0.8 M, system time 31 % -> 17 % of CPU time.
A value the user already set in the environment wins;
``SECFWT_MALLOC=default`` turns all of it off. On a platform without glibc's ``mallopt`` (macOS, musl) this is a
no-op with a debug log line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

OFF_ENV = "SECFWT_MALLOC"  # "default": leave malloc alone

# (mallopt parameter number, glibc environment variable, value)
MALLOC_SETTINGS: tuple[tuple[int, str, int], ...] = (
    (-3, "MALLOC_MMAP_THRESHOLD_", 32 * 2**20),  # M_MMAP_THRESHOLD
    (-1, "MALLOC_TRIM_THRESHOLD_", 2**30),  # M_TRIM_THRESHOLD
    (-2, "MALLOC_TOP_PAD_", 64 * 2**20),  # M_TOP_PAD
    (-8, "MALLOC_ARENA_MAX", 4),  # M_ARENA_MAX
    (-4, "MALLOC_MMAP_MAX_", 0),  # M_MMAP_MAX: no block gets its own mmap (a thread arena still can, if it must)
)

_applied: dict[str, bool] = {}  # this process: configure_malloc's outcome (idempotent)


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """False when ``SECFWT_MALLOC=default`` asks to leave glibc's defaults."""
    return (os.environ if environ is None else environ).get(OFF_ENV, "").strip().lower() != "default"


def malloc_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables to add for a child process: the settings not already set in ``environ``."""
    environ = os.environ if environ is None else environ
    if not enabled(environ):
        return {}
    return {name: str(value) for _, name, value in MALLOC_SETTINGS if name not in environ}


def _mallopt() -> Callable[[int, int], int] | None:
    """The C library's ``mallopt``, or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def apply_settings(mallopt: Callable[[int, int], int] | None, environ: Mapping[str, str]) -> bool:
    """Call ``mallopt`` for every setting not given in ``environ``; False (and a debug line) when ``mallopt`` is
    None (no glibc), the settings are turned off, or glibc refused one."""
    if not enabled(environ):
        log.debug("malloc: %s=default, glibc defaults kept", OFF_ENV)
        return False
    if mallopt is None:
        log.debug("malloc: no mallopt in this C library, settings not applied")
        return False
    ok = True
    for param, name, value in MALLOC_SETTINGS:
        if name in environ:
            continue  # the user's value (glibc read it at start)
        if mallopt(param, value) != 1:
            log.debug("malloc: mallopt(%d, %d) refused", param, value)
            ok = False
    return ok


def configure_malloc() -> bool:
    """Apply :data:`MALLOC_SETTINGS` to this process (:func:`apply_settings` with the C library's ``mallopt``).
    Idempotent: the first call decides, later calls return its outcome. A no-op without glibc."""
    if "done" not in _applied:
        _applied["done"] = apply_settings(_mallopt(), os.environ)
    return _applied["done"]


__all__ = ["MALLOC_SETTINGS", "OFF_ENV", "apply_settings", "configure_malloc", "enabled", "malloc_env"]
