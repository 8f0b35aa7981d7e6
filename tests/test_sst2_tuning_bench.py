"""benchmarks/sst2_tuning.py: a run with --checkpoint-dir resumes where it stopped (a long private run may span
sessions), and the oracle check compares a private row with its plaintext row field by field."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pytest  # noqa: E402
import sst2_tuning  # noqa: E402

from secfwt.tuning import checkpoint, fot  # noqa: E402


def _argv(model: Path, out: Path, ckpt: Path) -> list[str]:
    return ["--task", "demo", "--model", str(model), "--runs", "plaintext", "--k", "2", "--d", "6",
            "--n-prompt", "2", "--popsize", "4", "--iterations", "3", "--eval-every", "1", "--train-batch", "2",
            "--max-length", "24", "--checkpoint-dir", str(ckpt), "--out", str(out)]


def test_checkpointed_run_resumes_and_reports_the_same_row(tiny_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "ckpt"
    assert sst2_tuning.main(_argv(tiny_dir, tmp_path / "a.json", ckpt)) == 0
    state = checkpoint.load(ckpt / "plaintext")  # one directory per run
    assert state is not None and state["iteration"] == 3 and state["stop_reason"] == "budget"

    def no_step(self: object) -> None:
        raise AssertionError("a resumed, finished run takes no step")

    # The same command again: the loop resumes from the finished checkpoint and only re-scores the selection.
    monkeypatch.setattr(fot._Loop, "step", no_step)
    assert sst2_tuning.main(_argv(tiny_dir, tmp_path / "b.json", ckpt)) == 0
    a, b = (json.loads((tmp_path / f).read_text())["rows"][0] for f in ("a.json", "b.json"))
    for key in ("best_z", "history", "accuracy", "zero_shot_accuracy", "dev_accuracy", "forwards", "used_prompt"):
        assert a[key] == b[key], key
    assert (a["resumed_at_iteration"], b["resumed_at_iteration"]) == (0, 3)
    assert b["time_s"] >= state["elapsed_s"] > 0  # the whole run's time: the first session's and the re-scoring


def test_oracle_check_names_what_differs() -> None:
    hist = [{"loss_min": 0.5, "loss_mean": 0.7, "dev_loss": 0.6}, {"loss_min": 0.4, "loss_mean": 0.6, "dev_loss": None}]
    plain = {"best_z": [0.1, 0.2], "used_prompt": True, "accuracy": 0.75, "zero_shot_accuracy": 0.5,
             "dev_accuracy": 0.8, "zero_shot_dev_accuracy": 0.6, "history": hist}
    same = sst2_tuning.oracle_check({**plain, "history": [{**h, "loss_min": h["loss_min"] + 1e-5} for h in hist]},
                                    plain)
    assert same["same_prompt"] and same["same_accuracies"] and same["same_iterations"]
    assert abs(same["max_loss_diff"] - 1e-5) < 1e-12
    other = sst2_tuning.oracle_check({**plain, "best_z": [0.1, 0.3], "accuracy": 0.5, "history": hist[:1]}, plain)
    assert not other["same_prompt"] and not other["same_accuracies"] and not other["same_iterations"]
