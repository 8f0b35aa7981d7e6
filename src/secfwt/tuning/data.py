"""Reading task data and drawing the k-shot splits.

Formats (see ``../shared/data/README.md``):

- ``tsv``: tab-separated, no quoting (GLUE/LM-BFF layout); ``header`` names the columns. A UTF-8 BOM is ignored.
- ``csv``: comma-separated with standard quoting (LM-BFF ``mr``/``sst-5``: ``label,sentence`` without header).
- ``jsonl``: one JSON object per line; fields by name.
- ``json-ori``: one JSON object ``{"<id>": {"ori": text, "label": "<class>"}}`` (``ag_news``, ``yelp_full``).
- ``textfooler``: ``label text`` split at the first space, one example a line (optionally CSV-quoted text).

Few-shot protocol (BBT, Sun et al. 2022, Sec. 4.1; LM-BFF): ``k`` examples per class for train and ``k`` per
class for dev, drawn with a seed from the train/dev pools, never from the test split. Without a dev file the
dev examples are drawn from the train pool, disjoint from the train examples. Evaluation uses the test split,
or the whole dev file when the task has no test split.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from secfwt.errors import DataError
from secfwt.tuning.demo import demo_split
from secfwt.tuning.tasks import DataSource, SplitSource, TaskSpec

DATA_ENV = "SECFWT_DATA"
_Row = tuple[int, tuple[str, ...], str]  # (line number, texts, raw label)


@dataclass(frozen=True)
class Example:
    """One labelled example: ``texts`` holds one sentence or a sentence pair; ``label`` is the class index."""

    texts: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class TaskData:
    """The three splits a tuning run uses."""

    task: TaskSpec
    train: tuple[Example, ...]
    dev: tuple[Example, ...]
    eval: tuple[Example, ...]
    eval_split: str  # "test" or "dev"
    k: int
    seed: int


def project_root() -> Path:
    """The directory holding ``pyproject.toml`` above this file (the repository root), else the cwd."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return Path.cwd()


def data_root(explicit: str | Path | None = None) -> Path:
    """The data root: ``explicit`` (CLI flag), else ``$SECFWT_DATA``, else ``<project root>/../shared/data``."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return (project_root() / ".." / "shared" / "data").resolve()


# --------------------------------------------------------------------------------------------------------
# Readers


def read_split(src: SplitSource, task: TaskSpec, base: Path, seed: int = 13) -> list[Example]:
    """Read one split file. Every problem raises :class:`DataError` naming file, line/field, expected vs got."""
    if src.fmt == "demo":
        return [Example((t,), y) for t, y in demo_split(src.path)]
    path = base / src.path.format(seed=seed)
    if not path.is_file():
        raise DataError(f"{path}: file not found (data root {base}; set --data-root or ${DATA_ENV})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    rows: list[_Row]  # (line, texts, raw label)
    if src.fmt in ("tsv", "csv"):
        rows = _read_delimited(path, text, src)
    elif src.fmt == "jsonl":
        rows = _read_jsonl(path, text, src)
    elif src.fmt == "json-ori":
        rows = _read_json_ori(path, text)
    elif src.fmt == "textfooler":
        rows = _read_textfooler(path, text)
    else:
        raise DataError(f"{path}: unknown format {src.fmt!r} (expected tsv, csv, jsonl, json-ori, textfooler)")
    n_texts = task.n_texts
    out: list[Example] = []
    for line, texts, raw in rows:
        if raw in src.drop_labels:
            continue
        if len(texts) != n_texts:
            raise DataError(f"{path}:{line}: task {task.name} expects {n_texts} text field(s), got {len(texts)}")
        out.append(Example(texts, _label_index(raw, src, task, path, line)))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def _label_index(raw: str, src: SplitSource, task: TaskSpec, path: Path, line: int) -> int:
    raw = raw.strip()
    if src.label_map is not None:
        if raw in src.label_map:
            return src.label_map[raw]
        allowed = sorted(set(src.label_map) | set(src.drop_labels))
    else:
        if raw in task.labels:
            return task.labels.index(raw)
        allowed = list(task.labels)
    raise DataError(f"{path}:{line}: label {raw!r}: expected one of {allowed}")


def _columns(path: Path, src: SplitSource, header: list[str] | None) -> tuple[list[int], int]:
    def index(name: str) -> int:
        if header is not None:
            if name in header:
                return header.index(name)
            raise DataError(f"{path}:1: header has no column {name!r} (got: {', '.join(header)})")
        if not name.isdigit():
            raise DataError(f"{path}: column {name!r} must be a 0-based index when the file has no header")
        return int(name)

    return [index(t) for t in src.text_fields], index(src.label_field)


def _read_delimited(path: Path, text: str, src: SplitSource) -> list[_Row]:
    lines = text.splitlines()
    if src.fmt == "tsv":
        records: Sequence[list[str]] = [ln.split("\t") for ln in lines]
        line_nos = list(range(1, len(lines) + 1))
    else:
        reader = csv.reader(lines)
        records, line_nos = [], []
        try:
            for rec in reader:
                records.append(rec)
                line_nos.append(reader.line_num)
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV: {e}") from e
    header = [h.strip() for h in records[0]] if src.header and records else None
    text_cols, label_col = _columns(path, src, header)
    need = max([*text_cols, label_col]) + 1
    out: list[_Row] = []
    for line, rec in zip(line_nos[1 if header else 0 :], records[1 if header else 0 :], strict=True):
        if not rec or rec == [""]:
            continue
        if len(rec) < need:
            what = f"{len(header)} columns ({', '.join(header)})" if header else f"at least {need} columns"
            raise DataError(f"{path}:{line}: expected {what}, got {len(rec)}")
        out.append((line, tuple(rec[c].strip() for c in text_cols), rec[label_col]))
    return out


def _read_jsonl(path: Path, text: str, src: SplitSource) -> list[_Row]:
    out: list[_Row] = []
    for line, s in enumerate(text.splitlines(), 1):
        if not s.strip():
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line}: invalid JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
        for key in (*src.text_fields, src.label_field):
            if key not in obj:
                raise DataError(f"{path}:{line}: missing field {key!r} (got: {', '.join(obj)})")
        out.append((line, tuple(str(obj[t]) for t in src.text_fields), str(obj[src.label_field])))
    return out


def _read_json_ori(path: Path, text: str) -> list[_Row]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(doc, dict):
        raise DataError(f'{path}: expected {{"<id>": {{"ori": text, "label": class}}}}, got {type(doc).__name__}')
    out: list[_Row] = []
    for i, (key, rec) in enumerate(doc.items()):
        if not isinstance(rec, dict) or "ori" not in rec or "label" not in rec:
            raise DataError(f'{path}: entry "{key}": expected an object with "ori" and "label", got {rec!r:.60}')
        out.append((i + 1, (str(rec["ori"]),), str(rec["label"])))
    return out


def _read_textfooler(path: Path, text: str) -> list[_Row]:
    out: list[_Row] = []
    for line, s in enumerate(text.splitlines(), 1):
        if not s.strip():
            continue
        label, sep, rest = s.partition(" ")
        if not sep or not rest.strip():
            raise DataError(f"{path}:{line}: expected '<label> <text>', got {s[:40]!r}")
        rest = rest.strip()
        if len(rest) >= 2 and rest[0] == rest[-1] == '"':
            rest = rest[1:-1].replace('""', '"')
        out.append((line, (rest,), label))
    return out


# --------------------------------------------------------------------------------------------------------
# k-shot sampling


def sample_k_shot(
    pool: Sequence[Example], k: int, seed: int, n_labels: int, exclude: frozenset[int] = frozenset()
) -> tuple[list[Example], set[int]]:
    """``k`` examples per class drawn without replacement with ``seed``; returns them and their pool indices.

    Deterministic: the same pool, k and seed always give the same examples in the same (shuffled) order.
    """
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in range(n_labels):
        idx = [i for i, ex in enumerate(pool) if ex.label == c and i not in exclude]
        if len(idx) < k:
            raise DataError(f"k-shot sampling: class {c} has {len(idx)} examples left, need k={k}")
        perm = rng.permutation(len(idx))[:k]
        chosen += [idx[int(j)] for j in perm]
    order = rng.permutation(len(chosen))
    picked = [chosen[int(j)] for j in order]
    return [pool[i] for i in picked], set(picked)


DEFAULT_K = 16  # examples per class (LM-BFF's and BBT's 16-shot setting)


def max_k(train_pool: Sequence[Example], dev_pool: Sequence[Example] | None, n_labels: int) -> int:
    """The largest k the pools serve: k-shot train and dev both come from the train pool (half each) unless
    there is a separate dev pool."""
    def per_class(pool: Sequence[Example]) -> list[int]:
        return [sum(1 for e in pool if e.label == c) for c in range(n_labels)]

    if dev_pool is None:
        return min(per_class(train_pool)) // 2
    return min(min(per_class(train_pool)), min(per_class(dev_pool)))


def load_task_data(
    task: TaskSpec,
    root: str | Path | None = None,
    k: int | None = 16,
    seed: int = 13,
    source: str | None = None,
    max_eval: int | None = None,
) -> TaskData:
    """Load ``task`` from the data root and draw the k-shot train/dev sets with ``seed``.

    ``k=None`` picks :data:`DEFAULT_K`, or fewer when the task's pools are smaller (:func:`max_k`; the
    embedded demo task: 10).

    ``seed`` also picks the LM-BFF/rlprompt ``16-<seed>`` folder when the source has one (seeds 13, 21, 42, 87,
    100). ``max_eval`` caps the evaluation split by a seeded subsample (for slow MPC evaluation).
    """
    src: DataSource = task.source(source)
    base = src.base if src.base is not None else data_root(root)
    if src.base is None and src.train.fmt != "demo" and not base.is_dir():
        raise DataError(f"{base}: data root not found (pass --data-root or set ${DATA_ENV})")
    train_pool = read_split(src.train, task, base, seed)
    dev_file = read_split(src.dev, task, base, seed) if src.dev is not None else None
    if src.test is not None:
        ev, split = read_split(src.test, task, base, seed), "test"
    elif dev_file is not None:
        ev, split = dev_file, "dev"  # the dev file is the evaluation split: k-shot dev comes from train
    else:
        raise DataError(f"task {task.name}: source {src.name} has neither a test nor a dev file to evaluate on")
    dev_pool = dev_file if dev_file is not None and split == "test" else None
    most = max_k(train_pool, dev_pool, task.n_labels)
    if k is None:
        k = min(DEFAULT_K, most)
    if k > most:
        raise DataError(f"task {task.name}: k={k} examples per class for train and for dev, but its data allows at "
                        f"most k={most} (pass --k {most} or less)")
    train, used = sample_k_shot(train_pool, k, seed, task.n_labels)
    if dev_pool is not None:
        dev, _ = sample_k_shot(dev_pool, k, seed + 1, task.n_labels)
    else:
        dev, _ = sample_k_shot(train_pool, k, seed + 1, task.n_labels, exclude=frozenset(used))
    if max_eval is not None and len(ev) > max_eval:
        keep = sorted(np.random.default_rng(seed).permutation(len(ev))[:max_eval].tolist())
        ev = [ev[i] for i in keep]
    return TaskData(task, tuple(train), tuple(dev), tuple(ev), split, k, seed)
