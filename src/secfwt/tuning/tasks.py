"""Classification tasks: a template, a verbalizer and where the data files are.

A task is a :class:`TaskSpec`. Templates are strings with the placeholders ``{text}`` (or ``{text_a}`` and
``{text_b}`` for sentence pairs) and ``{mask}`` (the position whose label-word logits are read, as in the
prompt-based fine-tuning of LM-BFF and BBT, Sun et al. 2022, Table 7). The verbalizer maps class ``i`` to the
label word ``words[i]``; ``descriptions[i]`` (default: the word) is the text embedded for the similarity head
of encoders without a masked-LM head.

Built-in tasks read the layouts of the data root (``$SECFWT_DATA``, default ``../shared/data``; see its README);
any task can instead come from a small TOML file (YAML if ``pyyaml`` is installed) so a user can bring a new
task without Python::

    [task]
    name = "my-reviews"
    template = "{text} It was {mask} ."
    labels = ["0", "1"]            # label values as written in the files, in class order
    words = ["bad", "great"]       # verbalizer: one label word per class
    descriptions = ["bad", "great"]  # optional, for the similarity head

    [data]
    format = "csv"                 # csv | tsv | jsonl | json-ori | textfooler
    header = true                  # csv/tsv: first row holds column names
    text = ["review"]              # text column(s): names, or 0-based indices when header = false
    label = "stars"                # label column
    train = "train.csv"            # paths relative to the TOML file
    dev = "dev.csv"                # optional: else dev is sampled from train (disjoint)
    test = "test.csv"              # optional: else evaluation uses the dev file
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secfwt.errors import ConfigError

FORMATS = ("tsv", "csv", "jsonl", "json-ori", "textfooler", "demo")
_PLACEHOLDER = re.compile(r"\{(text|text_a|text_b|mask)\}")


@dataclass(frozen=True)
class SplitSource:
    """One data file and how to read it.

    ``path`` may contain ``{seed}`` (the LM-BFF ``16-<SEED>`` folders); it is relative to the data root, or to
    ``DataSource.base`` when that is set. ``text_fields``/``label_field`` are column names (header) or 0-based
    indices written as strings. ``label_map`` maps a raw label string to a class (default: the index of the
    value in ``TaskSpec.labels``); raw labels in ``drop_labels`` are skipped (e.g. 3-star Yelp reviews).
    """

    path: str
    fmt: str
    text_fields: tuple[str, ...] = ("text",)
    label_field: str = "label"
    header: bool = True
    label_map: Mapping[str, int] | None = None
    drop_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataSource:
    """Where a task's splits live. ``dev``/``test`` may be absent (see :func:`secfwt.tuning.data.load_task_data`)."""

    name: str
    train: SplitSource
    dev: SplitSource | None = None
    test: SplitSource | None = None
    base: Path | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A classification task: template, label values, verbalizer and data sources (first = default)."""

    name: str
    template: str
    labels: tuple[str, ...]
    words: tuple[str, ...]
    descriptions: tuple[str, ...] = ()
    sim_template: str | None = None
    sources: tuple[DataSource, ...] = field(default_factory=tuple)
    # Causal LMs (secfwt.tuning.decoder_eval): a template whose next token is the label word (no {mask}) and
    # its label words; default: ``template`` cut at {mask}, and ``words``.
    decoder_template: str | None = None
    decoder_words: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_template(self.template, self.name, need_mask=True)
        if self.decoder_template is not None:
            validate_template(self.decoder_template, self.name, need_mask=False)
        if self.decoder_words and len(self.decoder_words) != len(self.labels):
            raise ConfigError(f"task {self.name}: expected {len(self.labels)} decoder words, "
                              f"got {len(self.decoder_words)}")
        if self.sim_template is not None:
            validate_template(self.sim_template, self.name, need_mask=False)
        if len(self.words) != len(self.labels):
            raise ConfigError(
                f"task {self.name}: verbalizer needs one word per label: {len(self.labels)} labels, "
                f"got {len(self.words)} words"
            )
        if self.descriptions and len(self.descriptions) != len(self.labels):
            raise ConfigError(
                f"task {self.name}: expected {len(self.labels)} descriptions, got {len(self.descriptions)}"
            )

    @property
    def n_labels(self) -> int:
        return len(self.labels)

    @property
    def n_texts(self) -> int:
        """1 for single-sentence tasks, 2 for sentence pairs."""
        return 2 if "{text_b}" in self.template else 1

    @property
    def label_descriptions(self) -> tuple[str, ...]:
        return self.descriptions or self.words

    @property
    def similarity_template(self) -> str:
        """Template for the similarity head: ``sim_template`` or the template with ``{mask}`` removed."""
        if self.sim_template is not None:
            return self.sim_template
        return re.sub(r"\s+", " ", self.template.replace("{mask}", "")).strip()

    def source(self, name: str | None = None) -> DataSource:
        if not self.sources:
            raise ConfigError(f"task {self.name} has no data source")
        if name is None:
            return self.sources[0]
        for s in self.sources:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.sources)
        raise ConfigError(f"task {self.name}: unknown data source {name!r} (known: {known})")


def validate_template(template: str, where: str, need_mask: bool) -> None:
    """Check the placeholders of a template; raise one-line :class:`ConfigError` on a problem."""
    names = _PLACEHOLDER.findall(template)
    stray = re.findall(r"\{[^}]*\}", _PLACEHOLDER.sub("", template))
    if stray:
        raise ConfigError(
            f"task {where}: template {template!r} has unknown placeholder {stray[0]} "
            "(expected {text}, {text_a}, {text_b}, {mask})"
        )
    if need_mask and names.count("mask") != 1:
        raise ConfigError(f"task {where}: template {template!r} must contain {{mask}} exactly once")
    has_single = "text" in names
    has_pair = "text_a" in names and "text_b" in names
    if has_single == has_pair:
        raise ConfigError(
            f"task {where}: template {template!r} needs either {{text}} or both {{text_a}} and {{text_b}}"
        )


# --------------------------------------------------------------------------------------------------------
# Built-in tasks (templates and label words of BBT, Sun et al. 2022, Table 7, and LM-BFF).

_KSHOT = "k-shot/{task}/16-{{seed}}/{split}.{ext}"


def _lmbff(task: str, ext: str, **kw: Any) -> DataSource:
    def split(name: str) -> SplitSource:
        return SplitSource(path=_KSHOT.format(task=task, split=name, ext=ext), **kw)

    return DataSource("k-shot", split("train"), split("dev"), split("test"))


_SST2 = _lmbff("SST-2", "tsv", fmt="tsv", text_fields=("sentence",), label_field="label")
_CSV_NOHEADER: dict[str, Any] = {"fmt": "csv", "text_fields": ("1",), "label_field": "0", "header": False}
_RL = "rlprompt-16-shot/{task}/16-{{seed}}/{split}.tsv"


def _rl(task: str, split: str, text: str = "text") -> SplitSource:
    return SplitSource(_RL.format(task=task, split=split), "tsv", (text,), "label")


_YELP_FULL_MAP = {"0": 0, "1": 0, "3": 1, "4": 1}
_SENT2 = ("0", "1")

BUILTIN_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "demo", "{text} It was {mask} .", _SENT2, ("bad", "great"),
            descriptions=("a bad movie", "a great movie"), sim_template="{text}",
            sources=(DataSource("embedded", SplitSource("train", "demo"), None, SplitSource("test", "demo")),),
        ),
        TaskSpec(
            # secfwt demo's task (secfwt.tuning.demo_tense): past (0) or future (1). Similarity head: the plain
            # descriptions "long ago" / "tomorrow" leave the template alone poorly calibrated (README, "secfwt demo")
            "tense", "{text} . It is about the {mask} .", _SENT2, ("past", "future"),
            descriptions=("long ago", "tomorrow"), sim_template="{text}",
            sources=(DataSource("embedded", SplitSource("tense/train", "demo"), None,
                                SplitSource("tense/test", "demo")),),
        ),
        TaskSpec(
            "sst2", "{text} It was {mask} .", _SENT2, ("bad", "great"),
            descriptions=("a bad movie", "a great movie"), sim_template="{text}", sources=(_SST2,),
            # SmolLM2-135M-Instruct zero-shot: 78.3% on the 872 dev examples (docs/DECODER.md)
            decoder_template="Review: {text}\nSentiment:", decoder_words=("negative", "positive"),
        ),
        TaskSpec(
            "mr", "{text} It was {mask} .", _SENT2, ("bad", "great"),
            descriptions=("a bad movie", "a great movie"), sim_template="{text}",
            sources=(_lmbff("mr", "csv", **_CSV_NOHEADER),),
        ),
        TaskSpec(
            "sst5", "{text} It was {mask} .", ("0", "1", "2", "3", "4"),
            ("terrible", "bad", "okay", "good", "great"),
            descriptions=("a terrible movie", "a bad movie", "an okay movie", "a good movie", "a great movie"),
            sim_template="{text}", sources=(_lmbff("sst-5", "csv", **_CSV_NOHEADER),),
        ),
        TaskSpec(
            "yelp", "It was {mask} . {text}", _SENT2, ("bad", "great"),
            descriptions=("a bad restaurant", "a great restaurant"), sim_template="{text}",
            sources=(
                DataSource(
                    "rlprompt", _rl("yelp-2", "train"), _rl("yelp-2", "dev"),
                    SplitSource("textfooler/yelp_polarity_test.txt", "textfooler"),
                ),
                DataSource(
                    "yelp_full",
                    SplitSource("yelp_full/dev.json", "json-ori", label_map=_YELP_FULL_MAP, drop_labels=("2",)),
                    None,
                    SplitSource("yelp_full/test.json", "json-ori", label_map=_YELP_FULL_MAP, drop_labels=("2",)),
                ),
            ),
        ),
        TaskSpec(
            "agnews", "{mask} News: {text}", ("0", "1", "2", "3"), ("World", "Sports", "Business", "Tech"),
            descriptions=("world politics news", "sports news", "business news", "science and technology news"),
            sim_template="{text}",
            sources=(
                DataSource("rlprompt", _rl("agnews", "train"), _rl("agnews", "dev"), _rl("agnews", "test", "sentence")),
                DataSource(
                    "json", SplitSource("ag_news/dev.json", "json-ori"), None,
                    SplitSource("ag_news/test.json", "json-ori"),
                ),
            ),
        ),
        TaskSpec(
            "mrpc", "{text_a} ? {mask} , {text_b}", _SENT2, ("No", "Yes"),
            sources=(
                _lmbff("MRPC", "tsv", fmt="tsv", text_fields=("#1 String", "#2 String"), label_field="Quality"),
            ),
        ),
        TaskSpec(
            "rte", "{text_a} ? {mask} , {text_b}", ("not_entailment", "entailment"), ("No", "Yes"),
            sources=(_lmbff("RTE", "tsv", fmt="tsv", text_fields=("sentence1", "sentence2"), label_field="label"),),
        ),
    )
}


def get_task(name_or_path: str | Path) -> TaskSpec:
    """A built-in task by name, or a task file (``.toml``; ``.yaml``/``.yml`` with pyyaml)."""
    s = str(name_or_path)
    if s.endswith((".toml", ".yaml", ".yml")):
        return load_task_file(Path(s))
    task = BUILTIN_TASKS.get(s.lower().replace("-", ""))
    if task is None:
        known = ", ".join(sorted(BUILTIN_TASKS))
        raise ConfigError(f"unknown task {s!r} (known: {known}, or a path to a .toml task file)")
    return task


_TASK_KEYS = {"name", "template", "sim_template", "labels", "words", "descriptions"}
_DATA_KEYS = {"format", "header", "text", "label", "train", "dev", "test", "label_map", "drop_labels"}


def load_task_file(path: Path) -> TaskSpec:
    """Parse a TOML (or YAML) task file into a :class:`TaskSpec` whose data paths are relative to the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: task file not found")
    try:
        if path.suffix == ".toml":
            doc: Any = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            try:
                import yaml
            except ImportError as e:
                raise ConfigError(f"{path}: YAML task files need pyyaml; use a .toml file") from e
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected tables [task] and [data], got {type(doc).__name__}")
    task = _table(doc, "task", _TASK_KEYS, path)
    data = _table(doc, "data", _DATA_KEYS, path)
    extra = set(doc) - {"task", "data"}
    if extra:
        raise ConfigError(f"{path}: unknown table {sorted(extra)[0]!r} (expected [task] and [data])")

    name = _get(task, "name", str, path, "task", default=path.stem)
    labels = tuple(str(v) for v in _get(task, "labels", list, path, "task"))
    fmt = _get(data, "format", str, path, "data")
    if fmt not in FORMATS[:-1]:
        raise ConfigError(f"{path}: [data] format: expected one of {', '.join(FORMATS[:-1])}, got {fmt!r}")
    text = data.get("text", ["text"])
    text_fields = tuple(str(t) for t in (text if isinstance(text, list) else [text]))
    label_map_raw = _get(data, "label_map", dict, path, "data", default=None)
    label_map = None
    if label_map_raw is not None:
        label_map = {str(k): _class_index(v, labels, path) for k, v in label_map_raw.items()}

    def split(key: str) -> SplitSource | None:
        p = _get(data, key, str, path, "data", default=None)
        if p is None:
            return None
        return SplitSource(
            path=p, fmt=fmt, text_fields=text_fields, label_field=str(data.get("label", "label")),
            header=bool(_get(data, "header", bool, path, "data", default=fmt in ("csv", "tsv"))),
            label_map=label_map, drop_labels=tuple(str(v) for v in data.get("drop_labels", [])),
        )

    train = split("train")
    if train is None:
        raise ConfigError(f"{path}: [data] needs 'train' (a file of labelled examples)")
    source = DataSource("file", train, split("dev"), split("test"), base=path.parent.resolve())
    descriptions = tuple(str(v) for v in _get(task, "descriptions", list, path, "task", default=[]))
    return TaskSpec(
        name=name, template=_get(task, "template", str, path, "task"), labels=labels,
        words=tuple(str(v) for v in _get(task, "words", list, path, "task")), descriptions=descriptions,
        sim_template=_get(task, "sim_template", str, path, "task", default=None), sources=(source,),
    )


def _table(doc: dict[str, Any], key: str, allowed: set[str], path: Path) -> dict[str, Any]:
    t = doc.get(key)
    if not isinstance(t, dict):
        raise ConfigError(f"{path}: missing table [{key}]")
    unknown = set(t) - allowed
    if unknown:
        raise ConfigError(
            f"{path}: [{key}] unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(allowed))})"
        )
    return t


_MISSING = object()


def _get(t: dict[str, Any], key: str, typ: type, path: Path, table: str, default: Any = _MISSING) -> Any:
    if key not in t:
        if default is _MISSING:
            raise ConfigError(f"{path}: [{table}] missing key {key!r}")
        return default
    v = t[key]
    if not isinstance(v, typ):
        raise ConfigError(f"{path}: [{table}] {key}: expected {typ.__name__}, got {type(v).__name__} {v!r}")
    return v


def _class_index(v: Any, labels: tuple[str, ...], path: Path) -> int:
    if isinstance(v, int) and 0 <= v < len(labels):
        return v
    if str(v) in labels:
        return labels.index(str(v))
    raise ConfigError(f"{path}: [data] label_map value {v!r}: expected a class index or one of {list(labels)}")
