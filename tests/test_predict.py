"""`secfwt predict`: the tuned-prompt file, and private inference that agrees with the plaintext oracle."""

from __future__ import annotations

import json

import pytest
import torch

from secfwt.cli import main
from secfwt.errors import ConfigError
from secfwt.tuning.prompt_file import PromptFile

PROB_TOL = 5e-3  # class probabilities from MPC logits (max abs logit error ~1e-3 on the tiny model) vs plaintext


def test_prompt_file_round_trip(tmp_path):
    p = torch.randn(3, 8)
    pf = PromptFile(p, "sst2", "/models/x", {"head": "mlm", "attention": {"kind": "rfa", "seed": 3}, "max_length": 40},
                    {"accuracy": 0.9})
    pf.save(tmp_path / "p.safetensors")
    back = PromptFile.load(tmp_path / "p.safetensors")
    assert torch.equal(back.prompt, p) and back.task == "sst2" and back.model == "/models/x"
    assert back.settings == {"head": "mlm", "attention": {"kind": "rfa", "seed": 3}, "max_length": 40}
    assert back.info == {"accuracy": 0.9}
    empty = PromptFile(torch.zeros(0, 8), "demo", "m").save(tmp_path / "e.safetensors")
    assert PromptFile.load(empty).prompt.shape == (0, 8)


def test_prompt_file_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="prompt file not found"):
        PromptFile.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="junk.safetensors: not a safetensors prompt file"):
        PromptFile.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"prompt": torch.zeros(2, 4)}, str(tmp_path / "other.safetensors"), metadata={"format": "x"})
    with pytest.raises(ConfigError, match="format: expected 'secfwt-prompt/1', got 'x'"):
        PromptFile.load(tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match=r"prompt must be \(n_prompt, hidden\)"):
        PromptFile(torch.zeros(4), "demo", "m").save(tmp_path / "bad.safetensors")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A short plaintext tuning run of a tiny random masked LM on the demo task, with its prompt file."""
    from secfwt.tuning.testing import make_tiny_bert

    d = tmp_path_factory.mktemp("predict")
    model = make_tiny_bert(d / "model", hidden=32, layers=2)
    rc = main(["tune", "--task", "demo", "--model", str(model), "--mode", "plaintext", "--k", "4", "--d", "10",
               "--n-prompt", "2", "--popsize", "4", "--iterations", "2", "--max-length", "24", "--no-floor",
               "--out", str(d / "run"), "--quiet"])
    assert rc == 0
    return d, json.loads((d / "run" / "report.json").read_text())


def _predict(d, *args):
    out = d / f"pred-{len(list(d.glob('pred-*')))}.json"
    rc = main(["predict", "--prompt", str(d / "run" / "prompt.safetensors"), "--shares-dir", str(d / "shares"),
               "--out", str(out), *args])
    assert rc == 0
    return json.loads(out.read_text())


def test_tune_saves_the_prompt_and_predict_reproduces_its_accuracy(tuned):
    d, report = tuned
    pf = PromptFile.load(d / "run" / "prompt.safetensors")
    assert pf.prompt.shape == (2, 32) and pf.task == "demo" and pf.info["used_prompt"] is True
    res = _predict(d, "--mode", "plaintext", "--eval")
    assert res["n"] == report["n_eval"]
    assert res["accuracy"] == pytest.approx(report["accuracy"])  # same prompt, same split, same model


def test_private_predictions_agree_with_plaintext(tuned):
    d, _ = tuned
    texts = ["a warm , funny and beautifully acted film .", "a tedious mess with nothing to say .",
             "the plot makes no sense ."]
    args = [a for t in texts for a in ("--text", t)]
    plain = _predict(d, "--mode", "plaintext", *args)
    private = _predict(d, "--mode", "mpc", *args)
    assert private["mode"] == "mpc" and private["bytes_per_server"] > 0 and private["rounds"] > 0
    assert [p["texts"] for p in private["predictions"]] == [[t] for t in texts]
    for a, b in zip(private["predictions"], plain["predictions"], strict=True):
        assert max(abs(x - y) for x, y in zip(a["probs"], b["probs"], strict=True)) < PROB_TOL
        assert a["label"] == b["label"] or abs(a["probs"][0] - 0.5) < PROB_TOL


def test_predict_input_errors(tuned, tmp_path, capsys):
    d, _ = tuned
    prompt = str(d / "run" / "prompt.safetensors")
    assert main(["predict", "--prompt", prompt, "--eval", "--text", "x"]) == 2
    assert "exactly one of --text, --input, --eval" in capsys.readouterr().err
    assert main(["predict", "--prompt", prompt, "--input", str(tmp_path / "none.txt")]) == 2
    assert "none.txt: input file not found" in capsys.readouterr().err
    (tmp_path / "blank.txt").write_text("\n\n")
    assert main(["predict", "--prompt", prompt, "--input", str(tmp_path / "blank.txt")]) == 2
    assert "blank.txt: no texts" in capsys.readouterr().err
