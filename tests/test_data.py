"""Task data: readers for every shared-data layout, user files, clear errors, k-shot sampling, TOML tasks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from secfwt.errors import ConfigError, DataError
from secfwt.tuning.data import DATA_ENV, Example, data_root, load_task_data, read_split, sample_k_shot
from secfwt.tuning.tasks import BUILTIN_TASKS, SplitSource, TaskSpec, get_task, load_task_file

REAL = data_root()
needs_real = pytest.mark.skipif(
    not (REAL / "k-shot").is_dir(), reason=f"shared data not found at {REAL} (set ${DATA_ENV} to run these)"
)


# ---------------------------------------------------------------------------------------------- real files


@needs_real
@pytest.mark.parametrize(
    ("task", "source", "n_train", "n_eval", "split"),
    [
        ("sst2", None, 32, 872, "test"),
        ("mr", None, 32, 2000, "test"),
        ("sst5", None, 80, 2210, "test"),
        ("mrpc", None, 32, 408, "test"),
        ("rte", None, 32, 277, "test"),
        ("agnews", "rlprompt", 64, 7600, "test"),
        ("agnews", "json", 64, 1000, "test"),
        ("yelp", "rlprompt", 32, 1000, "test"),
        ("yelp", "yelp_full", 32, 800, "test"),
    ],
)
def test_real_task_loads(task: str, source: str | None, n_train: int, n_eval: int, split: str) -> None:
    spec = get_task(task)
    data = load_task_data(spec, k=16, seed=13, source=source)
    assert len(data.train) == n_train and len(data.dev) == n_train
    assert len(data.eval) == n_eval and data.eval_split == split
    assert Counter(e.label for e in data.train) == {c: 16 for c in range(spec.n_labels)}
    assert all(len(e.texts) == spec.n_texts and all(e.texts) for e in data.train + data.eval)
    assert set(data.train).isdisjoint(data.dev)


@needs_real
def test_real_lmbff_k16_uses_the_files_split_and_never_test() -> None:
    spec = get_task("sst2")
    data = load_task_data(spec, k=16, seed=21)
    src = spec.source()
    assert src.dev is not None
    train_file = read_split(src.train, spec, REAL, 21)
    dev_file = read_split(src.dev, spec, REAL, 21)
    assert set(data.train) == set(train_file) and set(data.dev) == set(dev_file)
    assert set(data.eval).isdisjoint(data.train)


@needs_real
def test_real_json_sources_sample_train_and_dev_from_dev_file_only() -> None:
    spec = get_task("agnews")
    data = load_task_data(spec, k=8, seed=42, source="json")
    src = spec.source("json")
    dev_pool = set(read_split(src.train, spec, REAL))
    assert set(data.train) <= dev_pool and set(data.dev) <= dev_pool
    assert set(data.train).isdisjoint(data.dev)
    assert src.test is not None and src.test.path.endswith("test.json")


@needs_real
def test_real_textfooler_and_yelp_full_labels() -> None:
    spec = get_task("yelp")
    tf = read_split(SplitSource("textfooler/yelp_polarity_test.txt", "textfooler"), spec, REAL)
    assert Counter(e.label for e in tf) == {0: 518, 1: 482}
    assert not any(e.texts[0].startswith('"') for e in tf)
    full = read_split(spec.source("yelp_full").train, spec, REAL)
    assert Counter(e.label for e in full) == {0: 400, 1: 400}  # 3-star reviews dropped


# ----------------------------------------------------------------------------------------------- tmp files

SENT = TaskSpec("t", "{text} It was {mask} .", ("neg", "pos"), ("bad", "great"))
PAIR = TaskSpec("p", "{text_a} ? {mask} , {text_b}", ("no", "yes"), ("No", "Yes"))


def _write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text, encoding="utf-8")
    return p


def test_tsv_csv_jsonl_readers(tmp_path: Path) -> None:
    _write(tmp_path, "a.tsv", "\ufeffsentence\tlabel\nfine film\tpos\nawful\tneg\n\n")
    _write(tmp_path, "b.csv", 'neg,"bad, really bad"\npos,"great ""fun"""\n')
    _write(tmp_path, "c.jsonl", '{"s1": "a", "s2": "b", "y": "yes"}\n\n{"s1": "c", "s2": "d", "y": "no"}\n')
    a = read_split(SplitSource("a.tsv", "tsv", ("sentence",), "label"), SENT, tmp_path)
    assert a == [Example(("fine film",), 1), Example(("awful",), 0)]
    b = read_split(SplitSource("b.csv", "csv", ("1",), "0", header=False), SENT, tmp_path)
    assert b == [Example(("bad, really bad",), 0), Example(('great "fun"',), 1)]
    c = read_split(SplitSource("c.jsonl", "jsonl", ("s1", "s2"), "y"), PAIR, tmp_path)
    assert c == [Example(("a", "b"), 1), Example(("c", "d"), 0)]


def test_json_ori_and_textfooler_readers(tmp_path: Path) -> None:
    _write(tmp_path, "d.json", json.dumps({"0": {"ori": "x", "label": "1"}, "1": {"ori": "y", "label": "0"}}))
    _write(tmp_path, "t.txt", '1 good stuff\n0 "bad ""stuff"""\n')
    task = TaskSpec("t", "{text} {mask}", ("0", "1"), ("a", "b"))
    assert read_split(SplitSource("d.json", "json-ori"), task, tmp_path) == [
        Example(("x",), 1), Example(("y",), 0)
    ]
    assert read_split(SplitSource("t.txt", "textfooler"), task, tmp_path) == [
        Example(("good stuff",), 1), Example(('bad "stuff"',), 0)
    ]


@pytest.mark.parametrize(
    ("name", "content", "src", "match"),
    [
        ("x.tsv", "sentence\tlabel\nok\tpos\nbroken\n", SplitSource("x.tsv", "tsv", ("sentence",)),
         r"x\.tsv:3: expected 2 columns \(sentence, label\), got 1"),
        ("x.tsv", "text\ty\nok\tpos\n", SplitSource("x.tsv", "tsv", ("sentence",), "y"),
         r"x\.tsv:1: header has no column 'sentence' \(got: text, y\)"),
        ("x.tsv", "sentence\tlabel\nok\tmaybe\n", SplitSource("x.tsv", "tsv", ("sentence",)),
         r"x\.tsv:2: label 'maybe': expected one of \['neg', 'pos'\]"),
        ("x.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b"\n', SplitSource("x.jsonl", "jsonl"),
         r"x\.jsonl:2: invalid JSON"),
        ("x.jsonl", '{"text": "a"}\n', SplitSource("x.jsonl", "jsonl"), r"x\.jsonl:1: missing field 'label'"),
        ("x.json", '{"0": {"text": "a"}}', SplitSource("x.json", "json-ori"), r'x\.json: entry "0": expected'),
        ("x.txt", "pos\n", SplitSource("x.txt", "textfooler"), r"x\.txt:1: expected '<label> <text>'"),
        ("x.tsv", "sentence\tlabel\n", SplitSource("x.tsv", "tsv", ("sentence",)), r"x\.tsv: no examples"),
        ("x.csv", "pos,a\n", SplitSource("x.csv", "csv", ("text",), "0", header=False),
         r"x\.csv: column 'text' must be a 0-based index"),
    ],
)
def test_bad_files_raise_one_clear_line(tmp_path: Path, name: str, content: str, src: SplitSource, match: str) -> None:
    _write(tmp_path, name, content)
    with pytest.raises(DataError, match=match) as e:
        read_split(src, SENT, tmp_path)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.tsv: file not found"):
        read_split(SplitSource("nope.tsv", "tsv"), SENT, tmp_path)
    (tmp_path / "bin.tsv").write_bytes(b"text\tlabel\n\xff\xfe\tpos\n")
    with pytest.raises(DataError, match=r"bin\.tsv: not UTF-8"):
        read_split(SplitSource("bin.tsv", "tsv"), SENT, tmp_path)


def test_pair_task_rejects_single_text(tmp_path: Path) -> None:
    _write(tmp_path, "x.tsv", "text\tlabel\na\tyes\n")
    with pytest.raises(DataError, match=r"x\.tsv:2: task p expects 2 text field\(s\), got 1"):
        read_split(SplitSource("x.tsv", "tsv"), PAIR, tmp_path)


# ---------------------------------------------------------------------------------------------- k-shot


def _pool(n_per_class: int, n_labels: int = 3) -> list[Example]:
    return [Example((f"s{c}-{i}",), c) for i in range(n_per_class) for c in range(n_labels)]


def test_k_shot_is_deterministic_balanced_and_seed_dependent() -> None:
    pool = _pool(30)
    a, ia = sample_k_shot(pool, 5, seed=7, n_labels=3)
    b, _ = sample_k_shot(pool, 5, seed=7, n_labels=3)
    c, _ = sample_k_shot(pool, 5, seed=8, n_labels=3)
    assert a == b and a != c
    assert Counter(e.label for e in a) == {0: 5, 1: 5, 2: 5}
    d, _ = sample_k_shot(pool, 5, seed=7, n_labels=3, exclude=frozenset(ia))
    assert set(d).isdisjoint(a)
    with pytest.raises(DataError, match="class 0 has 3 examples left, need k=4"):
        sample_k_shot(_pool(3), 4, seed=0, n_labels=3)


def test_demo_task_needs_no_data_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_ENV, "/nonexistent")
    data = load_task_data(get_task("demo"), k=8, seed=1)
    assert len(data.train) == 16 and len(data.dev) == 16 and len(data.eval) == 24
    assert set(data.train).isdisjoint(data.dev) and set(data.train).isdisjoint(data.eval)
    assert load_task_data(get_task("demo"), k=8, seed=1) == data


def test_data_root_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert data_root().parts[-2:] == ("shared", "data")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_root() == tmp_path
    assert data_root("/x/y") == Path("/x/y")
    with pytest.raises(DataError, match="data root not found"):
        load_task_data(get_task("sst2"), root=tmp_path / "missing")


def test_max_eval_subsample_is_seeded() -> None:
    a = load_task_data(get_task("demo"), k=4, seed=3, max_eval=10)
    assert len(a.eval) == 10 and a == load_task_data(get_task("demo"), k=4, seed=3, max_eval=10)


# ---------------------------------------------------------------------------------------------- task files

TOML = """
[task]
name = "reviews"
template = "Review: {text} Verdict: {mask} ."
labels = ["1", "5"]
words = ["bad", "good"]

[data]
format = "csv"
text = ["review"]
label = "stars"
train = "train.csv"
{extra}
"""


def _csv(tmp: Path, name: str, n: int) -> None:
    rows = ["review,stars"] + [f"review {name} {i},{'1' if i % 2 else '5'}" for i in range(n)]
    _write(tmp, name, "\n".join(rows) + "\n")


def test_toml_task_without_dev_or_test(tmp_path: Path) -> None:
    _csv(tmp_path, "train.csv", 20)
    spec = get_task(_write(tmp_path, "task.toml", TOML.replace("{extra}", "dev = \"dev.csv\"")))
    _csv(tmp_path, "dev.csv", 12)
    assert spec.name == "reviews" and spec.words == ("bad", "good") and spec.n_texts == 1
    data = load_task_data(spec, k=3, seed=0)
    assert data.eval_split == "dev" and len(data.eval) == 12  # no test: evaluate on the dev file ...
    assert all("train.csv" in e.texts[0] for e in data.dev)  # ... and draw k-shot dev from train
    assert set(data.train).isdisjoint(data.dev)


def test_toml_task_with_test(tmp_path: Path) -> None:
    for n in ("train.csv", "test.csv"):
        _csv(tmp_path, n, 10)
    spec = load_task_file(_write(tmp_path, "t.toml", TOML.replace("{extra}", 'test = "test.csv"')))
    data = load_task_data(spec, k=2, seed=0, root="/ignored")  # paths are relative to the TOML file
    assert data.eval_split == "test" and len(data.eval) == 10 and len(data.dev) == 4


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[task]\nname='x'\n", r"missing table \[data\]"),
        (TOML.replace("{extra}", "colour = 1"), r"\[data\] unknown key 'colour'"),
        (TOML.replace("{mask}", "").replace("{extra}", ""), r"must contain \{mask\} exactly once"),
        (TOML.replace("{text}", "{txt}").replace("{extra}", ""), r"unknown placeholder \{txt\}"),
        (TOML.replace('"good"]', '"good", "meh"]').replace("{extra}", ""), r"2 labels, got 3 words"),
        (TOML.replace('"csv"', '"xlsx"').replace("{extra}", ""), r"format: expected one of .*got 'xlsx'"),
        (TOML.replace('labels = ["1", "5"]', 'labels = "1"').replace("{extra}", ""), r"labels: expected list, got str"),
        ("[task\n", r"invalid TOML"),
    ],
)
def test_bad_toml_task_files(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        load_task_file(_write(tmp_path, "bad.toml", text))
    assert "\n" not in str(e.value)


def test_builtin_tasks_and_unknown_names() -> None:
    assert {"sst2", "yelp", "agnews", "mrpc", "rte", "mr", "sst5", "demo"} <= set(BUILTIN_TASKS)
    assert get_task("SST-2") is BUILTIN_TASKS["sst2"]
    assert get_task("rte").n_texts == 2
    with pytest.raises(ConfigError, match=r"unknown task 'cola' \(known: "):
        get_task("cola")
    with pytest.raises(ConfigError, match=r"nope\.toml: task file not found"):
        get_task("nope.toml")


def test_the_demo_task_picks_its_own_k_and_a_too_large_k_names_the_maximum():
    from secfwt.tuning.data import DEFAULT_K, load_task_data
    from secfwt.tuning.tasks import get_task

    data = load_task_data(get_task("demo"), k=None)
    assert data.k == 10 < DEFAULT_K  # 20 training sentences per class: 10 for train, 10 for dev
    assert len(data.train) == len(data.dev) == 20
    assert not {e.texts for e in data.train} & {e.texts for e in data.dev}
    with pytest.raises(DataError, match=r"k=11 .* allows at most k=10 \(pass --k 10 or less\)"):
        load_task_data(get_task("demo"), k=11)
