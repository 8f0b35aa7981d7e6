"""The comparison benchmark's paper_iteration workload (issue 18): references, row contract, report, tuning_step label.

Fast: the float64 references the CrypTen rows are checked against (NumPy RFA, torch autograd) are compared with
secfwt's own plaintext model and with finite differences, and the aggregation and report are run on rows whose
numbers are known. The real engines run in ``run.py --workloads paper_iteration`` (about an hour); the slow test
runs secfwt's side of it at toy sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

COMPARE = Path(__file__).resolve().parents[1] / "benchmarks" / "compare"
sys.path.insert(0, str(COMPARE))

import paper_ref  # noqa: E402
import paper_report  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import workloads as W  # noqa: E402
from secfwt_cases import paper_case, paper_reference  # noqa: E402

from secfwt.nn.attention import rfa_frequencies  # noqa: E402

PAPER_CONTRACT = ("workload", "engine", "method", "seq", "layers", "attention", "time_s", "bytes_per_server",
                  "rounds", "max_abs_error", "repeats")


def test_rfa_frequencies_are_secfwts():
    for m, d, seed in ((64, 64, 0), (64, 32, 5), (10, 16, 1)):
        assert np.array_equal(W.rfa_frequencies(m, d, seed), rfa_frequencies(m, d, seed, True).numpy())


@pytest.mark.parametrize("layers", [1, 2])
def test_numpy_rfa_model_matches_secfwts_plaintext_model(layers):
    """workloads.ref_rfa (CrypTen's fot_rfa reference) computes what secfwt's RFA layer computes (float64)."""
    pc = paper_case(12, layers, "rfa", tiny=True)
    case = W.make_paper_case(12, layers, "fot_rfa", tiny=True)
    hid, logits = W.ref_small_model(case.x, case.params, W.BertDims(**case.meta["dims"]), rfa=True)
    want = paper_reference(pc)
    assert np.abs(hid - want[0].numpy()).max() < 1e-10
    assert np.abs(logits - want[1].numpy()).max() < 1e-12
    soft, _ = W.ref_small_model(case.x, case.params, W.BertDims(**case.meta["dims"]))
    assert np.abs(soft - hid).max() > 1e-2  # RFA is a different function from softmax attention


def test_paper_case_shapes_and_prompt():
    sft = W.make_paper_case(10, 1, "sft", tiny=True)
    pt = W.make_paper_case(10, 1, "prompt_tuning", tiny=True)
    assert sft.x.shape == (1, 10, 64) and pt.x.shape == (1, 10 + W.TINY_N_PROMPT, 64)
    assert np.array_equal(pt.x[:, W.TINY_N_PROMPT:], sft.x)  # the same tokens, the prompt prepended
    assert all(np.array_equal(sft.params[k], pt.params[k]) for k in sft.params)
    with pytest.raises(ValueError, match="unknown method"):
        W.make_paper_case(10, 1, "lora", tiny=True)


def test_torch_reference_forward_and_prompt_gradient():
    case = W.make_paper_case(6, 1, "prompt_tuning", tiny=True)
    d = W.BertDims(**case.meta["dims"])
    p = {k: torch.tensor(v) for k, v in case.params.items()}
    hid, logits = paper_ref.torch_model(torch.tensor(case.x), p, d)
    want_h, want_l = W.ref_small_model(case.x, case.params, d)
    assert np.abs(hid.numpy() - want_h).max() < 1e-9 and np.abs(logits.numpy() - want_l).max() < 1e-12
    ref = paper_ref.grad_reference(case, "prompt_tuning", lr=0.1)
    assert set(ref) == {"loss", "grad:prompt", "update:prompt"}

    def loss(x: np.ndarray) -> float:
        lg = W.ref_small_model(x, case.params, d)[1]
        z = lg - lg.max(-1, keepdims=True)
        return float(-(z - np.log(np.exp(z).sum(-1, keepdims=True)))[0, case.labels[0]])

    assert abs(loss(case.x) - float(ref["loss"])) < 1e-12
    for pos, j in ((0, 3), (1, 40)):  # finite differences on two prompt coordinates
        e = np.zeros_like(case.x)
        e[0, pos, j] = 1e-6
        fd = (loss(case.x + e) - loss(case.x - e)) / 2e-6
        assert abs(fd - ref["grad:prompt"][0, pos, j]) < 1e-7 * max(1.0, abs(fd)) + 1e-9
    sft = paper_ref.grad_reference(W.make_paper_case(6, 1, "sft", tiny=True), "sft", lr=0.1)
    assert "grad:l0.w1" in sft and "grad:prompt" not in sft


def _raw(engine: str, method: str, seq: int, t: float, b: int, rounds: int, err: float, rep: int) -> dict:
    return {"workload": "paper_iteration", "engine": engine, "attention": W.METHOD_ATTENTION[method],
            "method": method, "seq": seq, "layers": 1, "status": "ok", "time_s": t, "bytes_per_server": b,
            "rounds": rounds, "max_abs_error": err, "repeat": rep}


def _rows() -> list[dict]:
    raw = []
    for rep, jitter in ((0, 1.0), (1, 1.2)):
        # CrypTen's counters are sent + received: run.py halves them (sent = 100 GB / 2 ... per layer)
        raw += [_raw("crypten", "sft", 512, 66.0 * jitter, 2 * 40_000_000_000, 4000, 0.03, rep),
                _raw("crypten", "fot_rfa", 512, 6.0 * jitter, 2 * 2_000_000_000, 300, 0.01, rep),
                _raw("secfwt", "fot_rfa", 512, 2.0 * jitter, 1_000_000_000, 110, 1e-3, rep),
                _raw("secfwt", "fot", 512, 9.0 * jitter, 9_000_000_000, 150, 0.5, rep)]  # above tolerance
    rows, details, failures = run.aggregate(raw)
    return rows, details, failures


def test_paper_rows_follow_the_contract_and_bad_rows_are_left_out():
    rows, details, failures = _rows()
    assert [tuple(r) for r in rows] == [PAPER_CONTRACT] * 3
    got = {(r["engine"], r["method"], r["seq"]): r for r in rows}
    assert set(got) == {("crypten", "sft", 512), ("crypten", "fot_rfa", 512), ("secfwt", "fot_rfa", 512)}
    s = got[("crypten", "sft", 512)]
    assert s["time_s"] == pytest.approx(72.6) and s["bytes_per_server"] == 40_000_000_000 and s["repeats"] == 2
    assert got[("secfwt", "fot_rfa", 512)]["bytes_per_server"] == 1_000_000_000  # secfwt counts sent already
    assert len(failures) == 1 and "secfwt paper_iteration (fot, seq 512)" in failures[0]
    assert "tolerance" in failures[0]
    assert {d["method"] for d in details} == {"sft", "fot_rfa", "fot"}


def test_paper_report_table_ratios_extrapolation_and_plot(tmp_path):
    rows, _, _ = _rows()
    md = paper_report.markdown(rows, {})
    assert "one candidate's" in md.lower() and "forward over the training batch" in md  # the definition
    # CrypTen SFT / secfwt FoT+RFA = 72.6 / 2.2 = 33.0x time, 40 / 1 = 40.0x bytes; goal met
    assert "**33.0x time** and **40.0x bytes**" in md and "time goal met, bytes goal met" in md
    # 24 layers: 24 x 2.2 s = 52.8 s and 24 x 1 GB = 24.0 GB for secfwt FoT+RFA
    line = next(x for x in md.splitlines() if x.startswith("| fot_rfa | secfwt |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[7] == "52.8" and cells[8] == "24.0" and cells[11] == "33.0x" and cells[12] == "40.0x"
    lan, wan = float(cells[9].replace(",", "")), float(cells[10].replace(",", ""))
    assert lan == pytest.approx(52.8 + 24 * 110 * 0.8e-3 + 24e9 * 8 / 3e9, abs=0.06)
    assert wan == pytest.approx(52.8 + 24 * 110 * 80e-3 + 24e9 * 8 / 100e6, abs=0.06)
    assert "| FoT + RFA | 55.2 | 56.5 | 11.8x | 17.2x |" in md  # the paper's rows and ratios
    assert "spu: not run" in md
    next(r for r in rows if r["engine"] == "secfwt")["time_s"] = 3.0  # now 24.2x cheaper in time: goal missed
    assert "time goal missed, bytes goal met" in paper_report.markdown(rows, {})
    png = tmp_path / "p.png"
    paper_report.plot(rows, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_tuning_step_is_relabelled_in_the_compare_report():
    rows = [{"workload": "tuning_step", "engine": e, "attention": "softmax", "time_s": 10.0,
             "bytes_per_server": 10**9, "rounds": 100, "max_abs_error": 1e-3, "repeats": 1}
            for e in ("secfwt", "crypten")]
    meta = {"machine": {"cpus": 2, "cpu": "x", "memory": "1 GiB"}, "loadavg_1m_during": [1.0], "started": "a",
            "finished": "b", "command": "c", "loadavg_start": [1.0], "loadavg_end": [1.0], "engines": ["secfwt"],
            "repeats_done": 1, "repeats_requested": 1}
    md = report.markdown(rows, meta, [])
    assert "| tuning_step (1 CMA-ES generation; not the paper's iteration) | softmax | secfwt |" in md
    assert "is not the paper's per-iteration measure" in md and "paper_iteration" in md
    assert all("NOT the paper's per-iteration measure" in h for h in report.headline(rows))


@pytest.mark.parametrize("bad", [["--seqs", "12,x"], ["--methods", "fot,lora"], ["--layers", "0"]])
def test_bad_paper_flags_give_one_clear_line(tmp_path, bad):
    proc = subprocess.run([sys.executable, str(COMPARE / "run.py"), "--out", str(tmp_path / "c.json"), "--skip",
                           "crypten,spu", "--workloads", "paper_iteration", *bad],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "c.json").exists()


@pytest.mark.slow
def test_tiny_secfwt_paper_rows_end_to_end(tmp_path):
    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, str(COMPARE / "run.py"), "--out", str(out), "--skip", "crypten,spu",
                           "--workloads", "paper_iteration", "--tiny", "--seqs", "6", "--repeats", "2"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {(r["method"], r["seq"], r["repeats"]) for r in rows} == {("fot", 6, 2), ("fot_rfa", 6, 2)}
    assert all(tuple(r) == PAPER_CONTRACT and r["max_abs_error"] < 1e-3 and r["bytes_per_server"] > 0
               for r in rows)
    assert "FoT + RFA" in out.with_suffix(".md").read_text() and out.with_suffix(".png").exists()
    h, f = 64, 128  # workloads.TINY_PAPER; one layer's matrices and the 2-class head, opened once in the setup
    details = json.loads(out.with_name("p.details.json").read_text())["rows"]
    assert all(d["setup_bytes_per_server"] >= 8 * (4 * h * h + 2 * h * f + 2 * h) and d["setup_rounds"] == 5
               for d in details if d["engine"] == "secfwt")


def test_spu_paper_call_carries_the_rfa_frequencies(tmp_path):
    """SPU runs every paper method; its venv has no torch, so fot_rfa gets the frequencies from a file the
    driver writes once: the same arrays ref_small_model(rfa=True) draws, and the same model output."""
    args = run.argparse.Namespace(methods=list(W.PAPER_METHODS), batch=1, layers=2, tiny=True, cache_dir=tmp_path)
    cmd = run._paper_cmd("spu", 6, args)
    assert cmd[1].endswith("spu_worker.py") and cmd[cmd.index("--method") + 1] == ",".join(W.PAPER_METHODS)
    with np.load(cmd[cmd.index("--rfa-freqs") + 1]) as f:
        ws = [f["l0"], f["l1"]]
    d = W.BertDims(W.TINY_PAPER.hidden, W.TINY_PAPER.heads, W.TINY_PAPER.ffn, 2)
    assert all(np.array_equal(a, b) for a, b in zip(ws, W.paper_rfa_frequencies(d), strict=True))
    case = W.make_paper_case(6, 2, "fot_rfa", tiny=True)
    drawn = W.ref_small_model(case.x, case.params, d, rfa=True)
    given = W.ref_small_model(case.x, case.params, d, rfa=True, rfa_ws=ws)
    assert all(np.array_equal(a, b) for a, b in zip(drawn, given, strict=True))
    args.methods = ["fot"]
    assert "--rfa-freqs" not in run._paper_cmd("spu", 6, args)
    assert ("paper_iteration", 6, "spu") in run.calls(["paper_iteration"], ["secfwt", "spu"],
                                                      run.argparse.Namespace(seqs=[6], methods=["sft"]))


SPU_PYTHON = run.setup_envs.venv_python(run.setup_envs.default_cache_dir() / run.setup_envs.ENGINES["spu"][0])


@pytest.mark.slow
@pytest.mark.skipif(not SPU_PYTHON.exists(), reason="SPU venv not installed (benchmarks/compare/setup_envs.py)")
def test_tiny_spu_paper_rows_are_checked_against_float64(tmp_path):
    """SPU's four paper methods at toy sizes, two real processes: every row ok and within tolerance of its
    float64 reference (loss, gradients and updates for sft / prompt_tuning; hidden state and logits for fot)."""
    freqs = tmp_path / "f.npz"
    d = W.BertDims(W.TINY_PAPER.hidden, W.TINY_PAPER.heads, W.TINY_PAPER.ffn, 1)
    np.savez(freqs, **{f"l{i}": w for i, w in enumerate(W.paper_rfa_frequencies(d))})
    proc = subprocess.run([str(SPU_PYTHON), str(COMPARE / "spu_worker.py"), "--workload", "paper_iteration",
                           "--tiny", "--seq", "6", "--method", ",".join(W.PAPER_METHODS), "--rfa-freqs", str(freqs)],
                          capture_output=True, text=True, timeout=900)
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [r["method"] for r in rows] == list(W.PAPER_METHODS), proc.stderr[-2000:]
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        assert r["max_abs_error"] < run.TOLERANCE["paper_iteration"] and r["bytes_per_server"] > 0
        assert r["attention"] == W.METHOD_ATTENTION[r["method"]]
    assert {"loss", "grad", "update"} <= set(rows[0]["errors"]) and {"hidden", "logits"} == set(rows[2]["errors"])
