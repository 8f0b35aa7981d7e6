"""Atomic checkpoints of the tuning loop: safetensors for arrays, JSON for everything else — never pickle.

A checkpoint is one file, ``state.safetensors``: the loop state (:meth:`secfwt.tuning.fot._Loop.state_dict`) is a
nested dict whose leaves are JSON values, numpy arrays or numpy scalars. Arrays and numpy scalars are stored as
tensors (bit-exact, with their dtype); the rest, with a reference to each tensor, is one JSON string in the
file's metadata. Python floats survive JSON exactly (``repr`` round-trips), so a resumed run ends bit-identical
to an uninterrupted one. Loading parses a safetensors header and JSON: no code runs, whatever the file holds.

The CMA-ES optimizer is stored attribute by attribute (:func:`cma_state` / :func:`restore_cma`, the attributes
of ``cmaes.CMA`` listed in :data:`CMA_ATTRIBUTES`, its ``RandomState`` via ``get_state``); a cmaes version that
keeps other attributes is refused rather than half-saved. A pickle checkpoint of older versions
(``state.pkl``) is refused with a message, never loaded.

The file is written to a temporary file (mode 0600) in the same directory (mode 0700), flushed and fsynced,
then renamed over the old one (``os.replace`` is atomic on POSIX), so a kill at any moment leaves either the
previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from cmaes import CMA

from secfwt.errors import ConfigError
from secfwt.files import private_dir, private_output

STATE_FILE = "state.safetensors"
PICKLE_FILE = "state.pkl"  # the format of secfwt <= checkpoint version 1: refused
FORMAT = "secfwt-checkpoint"
FORMAT_VERSION = 2
_REF = "__tensor__"  # {"__tensor__": name}: an array; {"__tensor__": name, "scalar": true}: a numpy scalar

# Every attribute of cmaes.CMA (0.11-0.13) except its RandomState ``_rng``, stored separately.
CMA_ATTRIBUTES = (
    "_n_dim", "_popsize", "_mu", "_mu_eff", "_cc", "_c1", "_cmu", "_c_sigma", "_d_sigma", "_cm", "_chi_n",
    "_weights", "_p_sigma", "_pc", "_mean", "_C", "_sigma", "_D", "_B", "_bounds", "_n_max_resampling", "_g",
    "_lr_adapt", "_alpha", "_beta_mean", "_beta_Sigma", "_gamma", "_Emean", "_ESigma", "_Vmean", "_VSigma",
    "_eta_mean", "_eta_Sigma", "_tolx", "_tolxup", "_tolfun", "_tolconditioncov", "_funhist_term",
    "_funhist_values",
)


# -- the file ---------------------------------------------------------------------------------------------
def _flatten(value: Any, path: str, tensors: dict[str, np.ndarray]) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        name = f"t{len(tensors)}:{path}"
        tensors[name] = np.array(value, order="C")  # a copy; keeps 0-d (ascontiguousarray makes it 1-d)
        return {_REF: name, "scalar": True} if isinstance(value, np.generic) else {_REF: name}
    if isinstance(value, dict):
        if _REF in value or not all(isinstance(k, str) for k in value):
            raise TypeError(f"checkpoint state {path}: dict keys must be strings other than {_REF!r}")
        return {k: _flatten(v, f"{path}.{k}", tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_flatten(v, f"{path}[{i}]", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"checkpoint state {path}: cannot store a {type(value).__name__} (JSON values and arrays only)")


def _unflatten(value: Any, tensors: dict[str, np.ndarray], used: set[str]) -> Any:
    if isinstance(value, dict):
        if _REF in value:
            name = value[_REF]
            if not isinstance(name, str) or name not in tensors or set(value) - {_REF, "scalar"}:
                raise ConfigError(f"tensor reference {value!r} does not name a stored tensor")
            used.add(name)
            arr = tensors[name]
            if value.get("scalar"):
                if arr.shape != ():
                    raise ConfigError(f"tensor {name}: a scalar must have shape (), got {arr.shape}")
                return arr[()]
            return arr
        return {k: _unflatten(v, tensors, used) for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, tensors, used) for v in value]
    return value


def save_atomic(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (JSON values, numpy arrays and scalars) to ``directory/state.safetensors`` atomically."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    doc = {"version": FORMAT_VERSION, **_flatten({k: v for k, v in state.items() if k != "version"}, "", tensors)}
    meta = {"format": FORMAT, "state": json.dumps(doc)}
    directory = private_dir(directory)
    target = directory / STATE_FILE
    with private_output(target) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return target


def load(directory: Path) -> dict[str, Any] | None:
    """The last checkpoint in ``directory`` (the state :func:`save_atomic` was given, plus ``version``), or
    None when there is none. A malformed file raises one :class:`ConfigError` naming it."""
    old = directory / PICKLE_FILE
    if old.exists():
        raise ConfigError(f"{old}: a pickle checkpoint of an older secfwt; pickles are never loaded (loading one "
                          "can run code): delete it (or the directory) and re-run, or use --no-resume")
    target = directory / STATE_FILE
    if not target.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(target), framework="np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{target}: unreadable checkpoint, not a safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{target}: format: expected {FORMAT!r}, got {meta.get('format')!r}")
    try:
        doc = json.loads(meta.get("state", ""))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{target}: checkpoint metadata 'state' is not JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        got = doc.get("version") if isinstance(doc, dict) else type(doc).__name__
        raise ConfigError(f"{target}: checkpoint format version: expected {FORMAT_VERSION}, got {got}")
    used: set[str] = set()
    try:
        state: dict[str, Any] = _unflatten(doc, tensors, used)
    except ConfigError as e:
        raise ConfigError(f"{target}: {e}") from e
    if set(tensors) - used:
        raise ConfigError(f"{target}: tensors no field refers to: {sorted(set(tensors) - used)[:3]}")
    return state


@contextlib.contextmanager
def reading(where: Path) -> Iterator[None]:
    """Turn any error met while decoding a loaded state into one ConfigError naming the checkpoint."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"{where / STATE_FILE}: malformed checkpoint: {e}") from e
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, AssertionError) as e:
        detail = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ConfigError(f"{where / STATE_FILE}: malformed checkpoint ({detail})") from e


def field(state: dict[str, Any], name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    """``state[name]``, checked to be a ``kind`` (or None when ``optional``); bools are not ints here."""
    v = state[name]
    if v is None and optional:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise ConfigError(f"field {name!r}: expected {'/'.join(k.__name__ for k in kinds)}, got {type(v).__name__}")
    return v


def array(state: dict[str, Any], name: str, shape: tuple[int, ...], dtype: Any, optional: bool = False) -> Any:
    """``state[name]`` checked to be an array of ``shape`` and ``dtype`` (or None when ``optional``); a copy."""
    v = state[name]
    if v is None and optional:
        return None
    if not isinstance(v, np.ndarray) or v.shape != shape or v.dtype != np.dtype(dtype):
        got = f"{v.dtype}{list(v.shape)}" if isinstance(v, np.ndarray) else type(v).__name__
        raise ConfigError(f"field {name!r}: expected a {np.dtype(dtype)}{list(shape)} array, got {got}")
    return v.copy()


def numbers(state: dict[str, Any], name: str, n: int | None = None, optional: bool = False) -> Any:
    """``state[name]`` as a tuple of floats: a list of ``n`` numbers, or one number when ``n`` is None."""
    v = state[name]
    if v is None and optional:
        return None
    items = [v] if n is None else v
    if (n is not None and (not isinstance(v, list) or len(v) != n)) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in items):
        raise ConfigError(f"field {name!r}: expected {'a number' if n is None else f'{n} numbers'}, got {v!r:.60}")
    return tuple(float(x) for x in items)


def record(value: Any, name: str) -> dict[str, Any]:
    """A dict of named numbers (or None): one history record, or the cost ledger."""
    if not isinstance(value, dict) or not all(
            x is None or isinstance(x, int | float) and not isinstance(x, bool) for x in value.values()):
        raise ConfigError(f"field {name!r}: expected records of numbers, got {value!r:.60}")
    return value


# -- CMA-ES -----------------------------------------------------------------------------------------------
def cma_state(cma: CMA) -> dict[str, Any]:
    """The complete state of a ``cmaes.CMA``: every attribute, and its RandomState's MT19937 state."""
    attrs = {k: v for k, v in vars(cma).items() if k != "_rng"}
    if set(attrs) != set(CMA_ATTRIBUTES):
        extra, missing = sorted(set(attrs) - set(CMA_ATTRIBUTES)), sorted(set(CMA_ATTRIBUTES) - set(attrs))
        raise ConfigError(f"cmaes: this version's CMA keeps attributes secfwt's checkpoint does not know (new "
                          f"{extra}, gone {missing}); use cmaes 0.11-0.13")
    kind, keys, pos, has_gauss, gauss = cma._rng.get_state()
    if kind != "MT19937":
        raise ConfigError(f"cmaes: RandomState kind {kind!r}, expected 'MT19937'")
    rng = {"keys": np.asarray(keys, dtype=np.uint32), "pos": int(pos), "has_gauss": int(has_gauss),
           "cached_gaussian": float(gauss)}
    return {"attrs": {k: attrs[k] for k in CMA_ATTRIBUTES}, "rng": rng}


# Attributes None in a fresh CMA that may hold arrays later: their shape given the dimension n.
_OPTIONAL_ARRAYS = {"_D": lambda n: (n,), "_B": lambda n: (n, n), "_bounds": lambda n: (n, 2)}


def restore_cma(like: CMA, state: dict[str, Any]) -> CMA:
    """A new ``CMA`` from :func:`cma_state`, each attribute checked against ``like`` (a fresh CMA of the same
    run's configuration): same names, array shapes and dtypes, scalar kinds, and equal integer constants."""
    attrs = field(state, "attrs", dict)
    if set(attrs) != set(CMA_ATTRIBUTES):
        raise ConfigError(f"CMA attributes: expected {len(CMA_ATTRIBUTES)} known names, got "
                          f"{sorted(set(attrs) ^ set(CMA_ATTRIBUTES))[:4]} differing")
    n = like._n_dim
    out: dict[str, Any] = {}
    for name in CMA_ATTRIBUTES:
        ref = getattr(like, name)
        if name in _OPTIONAL_ARRAYS:
            out[name] = array(attrs, name, _OPTIONAL_ARRAYS[name](n), np.float64, optional=True)
        elif isinstance(ref, np.ndarray):
            out[name] = array(attrs, name, ref.shape, ref.dtype)
        elif isinstance(ref, bool):
            out[name] = field(attrs, name, bool)
        elif isinstance(ref, int):
            out[name] = field(attrs, name, int)
            if name != "_g" and out[name] != ref:
                raise ConfigError(f"CMA {name}: expected {ref} for this run's configuration, got {out[name]}")
            if out[name] < 0:
                raise ConfigError(f"CMA {name}: expected >= 0, got {out[name]}")
        elif isinstance(ref, float | np.floating):  # a Python float may become np.float64 after tell
            out[name] = field(attrs, name, (float, np.float64))
        else:
            raise ConfigError(f"CMA {name}: unexpected kind {type(ref).__name__}")
    rng = field(state, "rng", dict)
    keys = array(rng, "keys", (624,), np.uint32)
    pos, has_gauss = field(rng, "pos", int), field(rng, "has_gauss", int)
    if not (0 <= pos <= 624 and has_gauss in (0, 1)):
        raise ConfigError(f"CMA rng: pos must be in [0, 624] and has_gauss 0 or 1, got {pos}, {has_gauss}")
    rs = np.random.RandomState()
    rs.set_state(("MT19937", keys, pos, has_gauss, float(field(rng, "cached_gaussian", float))))
    cma = CMA.__new__(CMA)
    vars(cma).update(out)
    cma._rng = rs
    return cma


__all__ = ["CMA_ATTRIBUTES", "FORMAT_VERSION", "STATE_FILE", "array", "cma_state", "field", "load", "reading",
           "numbers", "record", "restore_cma", "save_atomic"]
