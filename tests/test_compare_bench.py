"""The comparison benchmark's secfwt side (benchmarks/compare): contract rows, checked against plaintext.

Tiny shapes only (the real run takes about an hour): ``run.py --tiny --skip crypten,spu`` runs secfwt (two
servers and a dealer as TLS processes) and the plaintext floor alternating, checks every output against the
float64 reference, and writes the JSON rows of issue 5's reporting contract plus the markdown tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMPARE = Path(__file__).resolve().parents[1] / "benchmarks" / "compare"
CONTRACT = {"workload": str, "engine": str, "attention": (str, type(None)), "time_s": float,
            "bytes_per_server": int, "rounds": int, "max_abs_error": float, "repeats": int}


def _run(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    out = tmp_path / "compare.json"
    env = dict(os.environ, SECFWT_CACHE=str(tmp_path / "cache"))  # share files of the tuning step go here
    proc = subprocess.run([sys.executable, str(COMPARE / "run.py"), "--out", str(out), "--skip", "crypten,spu",
                           "--repeats", "1", *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def _check_contract(rows: list[dict]) -> None:
    for r in rows:
        assert set(r) == set(CONTRACT), r
        for k, t in CONTRACT.items():
            assert isinstance(r[k], t), (k, r)
        assert r["engine"] in ("secfwt", "crypten", "spu", "plaintext")
        assert r["time_s"] > 0 and r["repeats"] == 1


def test_tiny_layer_rows_follow_the_contract_and_match_plaintext(tmp_path):
    proc, rows = _run(["--tiny", "--workload", "encoder_layer"], tmp_path)
    _check_contract(rows)
    got = {(r["workload"], r["engine"], r["attention"]) for r in rows}
    assert got == {("encoder_layer", "secfwt", "softmax"), ("encoder_layer", "plaintext", "softmax"),
                   ("encoder_layer", "secfwt", "rfa"), ("encoder_layer", "plaintext", "rfa")}
    for r in rows:
        if r["engine"] == "secfwt":
            assert r["bytes_per_server"] > 0 and r["rounds"] > 0
            assert r["max_abs_error"] < 1e-3, r  # fixed point vs float64 at toy sizes
        else:
            assert r["bytes_per_server"] == 0 and r["max_abs_error"] < 1e-5
    md = (tmp_path / "compare.md").read_text()
    assert "| encoder_layer | rfa | secfwt |" in md and "Ratios secfwt / other" in md
    details = json.loads((tmp_path / "compare.details.json").read_text())
    assert all(d["check"] == "ok" for d in details["rows"])
    h, f = 32, 64  # workloads.TINY_LAYER: the weights' one opening is the setup, apart from the forward's bytes
    for d in (d for d in details["rows"] if d["engine"] == "secfwt"):
        rep = d["per_repeat"][0]
        assert rep["engine_config"]["served"] and rep["engine_config"]["linear_bound"] == 2.0**14
        assert d["setup_bytes_per_server"] >= 8 * (4 * h * h + 2 * h * f) and d["setup_rounds"] == 4
        assert not any("fix_weight" in k for k in rep["bytes_sent_by_scope"])
    assert "secfwt's once-per-session setup" in md


@pytest.mark.slow
def test_tiny_tuning_step_runs_the_real_loop_and_matches_plaintext(tmp_path):
    from secfwt.tuning.testing import make_tiny_bert

    model = make_tiny_bert(tmp_path / "model", hidden=32, layers=2)
    proc, rows = _run(["--workload", "tuning_step", "--attention", "softmax", "--model", str(model), "--seq", "16",
                       "--popsize", "3", "--n-prompt", "4", "--d", "8"], tmp_path)
    _check_contract(rows)
    assert {r["engine"] for r in rows} == {"secfwt", "plaintext"}
    s = next(r for r in rows if r["engine"] == "secfwt")
    assert s["max_abs_error"] < 1e-2 and s["bytes_per_server"] > 0  # label logits are 20 x cosine
    details = json.loads((tmp_path / "compare.details.json").read_text())
    rep = next(d for d in details["rows"] if d["engine"] == "secfwt")["per_repeat"][0]
    assert rep["popsize"] == 3 and rep["forward_rows"] == 3 and rep["seq"] == 16
    assert rep["setup_bytes_per_server"] > 0 and rep["head_setup_bytes_per_server"] > 0  # the servers' session setup
    assert (tmp_path / "cache" / "shares").is_dir()  # the model owner's share files, made by the real path


@pytest.mark.parametrize("bad", [["--skip", "nosuch"], ["--tiny"]])
def test_bad_flags_give_one_clear_line(tmp_path, bad):
    proc = subprocess.run([sys.executable, str(COMPARE / "run.py"), "--out", str(tmp_path / "c.json"), *bad],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(("--skip", "--tiny"))


def test_report_states_the_tuning_step_settings_its_rows_were_measured_with():
    """Rows merged from an earlier run's log keep their own population in the report, not this run's flag."""
    import argparse

    sys.path.insert(0, str(COMPARE))
    try:
        import run
    finally:
        sys.path.remove(str(COMPARE))
    flags = argparse.Namespace(popsize=20, n_prompt=50, d=500, batch=1, seq=128, max_rows=64)
    assert run.tuning_step_settings([], flags)["popsize"] == 20
    merged = [{"workload": "tuning_step", "engine": "crypten", "popsize": 9},
              {"workload": "tuning_step", "engine": "secfwt", "popsize": 4, "n_prompt": 50, "d": 500, "batch": 1,
               "seq": 128, "max_rows": 64}]
    assert run.tuning_step_settings(merged, flags) == {"popsize": 4, "n_prompt": 50, "d": 500, "batch": 1,
                                                       "seq": 128, "max_rows": 64}
