"""Per-layer RFA temperatures (the model owner's calibration of issue 17) and the `secfwt tune` defaults chosen
from the budget curves (docs/TUNING.md, "Defaults")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from secfwt.errors import ConfigError
from secfwt.nn.backend import PlainBackend
from secfwt.nn.config import AttentionConfig
from secfwt.nn.encoder import Encoder


def _forward(model_dir: Path, attention: AttentionConfig) -> torch.Tensor:
    enc = Encoder.from_pretrained(model_dir, attention)
    ids = torch.tensor([[2, 7, 9, 11, 3], [2, 8, 10, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    return enc.forward(PlainBackend(), enc.params["emb.word"][ids], mask).hidden


def test_per_layer_taus_equal_to_the_scalar_give_the_same_forward(tiny_dir: Path) -> None:
    same = _forward(tiny_dir, AttentionConfig("rfa", rfa_tau=0.7))
    assert torch.equal(same, _forward(tiny_dir, AttentionConfig("rfa", rfa_tau=0.3, rfa_tau_layers=(0.7, 0.7))))


def test_each_layer_uses_its_own_tau(tiny_dir: Path) -> None:
    base = _forward(tiny_dir, AttentionConfig("rfa", rfa_tau=0.7))
    # only the second layer differs: not the first-layer output, but a different final output
    other = _forward(tiny_dir, AttentionConfig("rfa", rfa_tau_layers=(0.7, 1.3)))
    assert not torch.allclose(base, other)
    assert torch.equal(_forward(tiny_dir, AttentionConfig("rfa", rfa_tau_layers=(1.3, 0.7))),
                       _forward(tiny_dir, AttentionConfig("rfa", rfa_tau_layers=(1.3, 0.7))))


def test_tau_layers_from_json_and_bad_values() -> None:
    cfg = AttentionConfig(**{"kind": "rfa", "rfa_tau_layers": [0.6, 0.7]})  # a servers' JSON list
    assert cfg.rfa_tau_layers == (0.6, 0.7) and cfg.tau_at(1) == 0.7
    assert AttentionConfig("rfa", rfa_tau=0.9).tau_at(5) == 0.9
    with pytest.raises(ConfigError, match="rfa_tau_layers: every temperature must be > 0, got -0.1"):
        AttentionConfig("rfa", rfa_tau_layers=(0.5, -0.1))
    with pytest.raises(ConfigError, match="2 temperatures, no entry for layer 2"):
        cfg.tau_at(2)


def test_tune_cli_defaults_are_the_budget_curve_choice() -> None:
    import argparse

    from secfwt.cli.tune_cmd import add_arguments, config_from_args
    from secfwt.tuning.fot import CLI_DEFAULTS

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--task", "sst2"]))
    assert (cfg.d, cfg.n_prompt, cfg.popsize, cfg.train_batch, cfg.optimizer) == (50, 5, 6, 8, "cma")
    assert cfg == CLI_DEFAULTS
    # 31 generations of 6 x 8 train forwards + 32 dev, plus the zero-shot dev floor: within 1 % of BBT's budget
    assert cfg.max_iterations * (cfg.popsize * 8 + 32) + 32 <= 2560


def test_run_spec_attention_default_is_the_cli_default() -> None:
    """A RunSpec built in code (benchmarks) runs the attention `secfwt tune` runs by default: softmax."""
    import argparse

    from secfwt.cli.tune_cmd import add_mpc_arguments
    from secfwt.tuning.runner import RunSpec

    assert RunSpec().attention == {"kind": "softmax"}
    p = argparse.ArgumentParser()
    add_mpc_arguments(p)
    assert p.parse_args([]).attention == RunSpec().attention["kind"]
