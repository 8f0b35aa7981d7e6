"""Shared pytest set-up: make ``tests/`` importable (helpers, MPC programs run by subprocesses)."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Small forwards run faster on one thread, and much faster on a busy machine; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Shared by the tuning tests: a tiny random masked-LM BERT, its plaintext evaluator on the demo task, the data.
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from secfwt.tuning.testing import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def demo_ev(tiny_dir: Path):  # type: ignore[no-untyped-def]
    from secfwt.tuning import HFPlainEvaluator, get_task

    return HFPlainEvaluator.from_pretrained(tiny_dir, get_task("demo"))


@pytest.fixture(scope="module")
def demo_data():  # type: ignore[no-untyped-def]
    from secfwt.tuning import get_task, load_task_data

    return load_task_data(get_task("demo"), k=4, seed=13)
