"""p0 of the soft prompt: BBT's random vocabulary words or a task phrase ("text" init), one helper for all
evaluators."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from secfwt.errors import ConfigError  # noqa: E402
from secfwt.tuning.decoder_eval import PlainDecoderEvaluator  # noqa: E402
from secfwt.tuning.encode import initial_prompt  # noqa: E402
from secfwt.tuning.fot import TuneConfig  # noqa: E402
from secfwt.tuning.runner import RunSpec, run  # noqa: E402
from secfwt.tuning.tasks import get_task  # noqa: E402
from test_decoder_tuning import make_tiny_llama_lm  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_lm(tmp_path_factory.mktemp("init") / "model")


def test_text_init_embeds_the_phrase(tiny: Path) -> None:
    ev = PlainDecoderEvaluator.from_pretrained(str(tiny), get_task("demo"))
    ids = ev.tokenizer("great movie", add_special_tokens=False).input_ids
    p0 = ev.init_prompt(2, seed=0, text="great movie")
    assert torch.equal(p0, ev.table[torch.tensor(ids)].float())
    with pytest.raises(ConfigError, match="is 2 tokens .* pass --n-prompt 2"):
        ev.init_prompt(3, seed=0, text="great movie")
    # BBT's vocab init: seeded, never a special token
    a, b = initial_prompt(ev.table, ev.tokenizer, 4, 7), initial_prompt(ev.table, ev.tokenizer, 4, 7)
    assert torch.equal(a, b) and a.shape == (4, ev.hidden_size)


def test_text_init_config_errors() -> None:
    with pytest.raises(ConfigError, match="init 'text' needs a non-empty init_text"):
        TuneConfig(init="text")
    with pytest.raises(ConfigError, match="init 'text' needs"):
        TuneConfig(init="vocab", init_text="a phrase")
    with pytest.raises(ConfigError, match="init must be"):
        TuneConfig(init="words")


def test_tuning_starts_from_the_phrase(tiny: Path) -> None:
    """With the projection scaled to ~0 (alpha) the tuned prompt is p0 = the phrase's embeddings."""
    tune = {"d": 4, "n_prompt": 2, "popsize": 2, "iterations": 1, "patience": None, "alpha": 1e-9,
            "init": "text", "init_text": "great movie", "zero_shot_floor": False}
    res, _ = run(RunSpec(task="demo", model=str(tiny), mode="plaintext", k=2, max_length=24, tune=tune,
                         progress=False))
    ev = PlainDecoderEvaluator.from_pretrained(str(tiny), get_task("demo"))
    assert res.prompt is not None and res.used_prompt
    assert torch.allclose(res.prompt.float(), ev.init_prompt(2, 0, "great movie"), atol=1e-5)
