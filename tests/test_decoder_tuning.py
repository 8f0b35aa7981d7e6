"""Forward-only tuning on a decoder LM (tiny random Llama): the MPC loop follows the plaintext loop.

The tiny Llama uses a WordPiece vocabulary of the demo sentences ([CLS] ... [SEP] around each input, so the
soft prompt goes after [CLS]: prompt_at = 1). CMA-ES only uses the ranking of the candidates' losses, so
with MPC logits within fixed-point error of the plaintext ones both runs take the same steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import assert_follows_plaintext

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from secfwt.errors import ConfigError  # noqa: E402
from secfwt.tuning.data import Example  # noqa: E402
from secfwt.tuning.decoder_encode import split_template  # noqa: E402
from secfwt.tuning.decoder_eval import (  # noqa: E402
    PlainDecoderEvaluator,
    decoder_template,
    encode_decoder,
    is_decoder_model,
)
from secfwt.tuning.objective import Batch  # noqa: E402
from secfwt.tuning.runner import RunSpec, run  # noqa: E402
from secfwt.tuning.tasks import get_task  # noqa: E402


def make_tiny_llama_lm(d: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A random LlamaForCausalLM (tied, GQA) with a WordPiece tokenizer of the demo sentences."""
    from secfwt.tuning.demo import NEGATIVE, POSITIVE

    words = sorted({w for s in NEGATIVE + POSITIVE for w in s.split()} | {"it", "was", "bad", "great"})
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)})
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tinydec")
    return make_tiny_llama_lm(d / "model"), d


def _spec(model: Path, d: Path, mode: str, kind: str = "softmax", position: str = "start") -> RunSpec:
    att = {"kind": kind, "n_features": 16, "rfa_sq_range": (2.0**-10, 2.0**6)} if kind == "rfa" else {"kind": kind}
    return RunSpec(task="demo", model=str(model), mode=mode, attention=att, k=2, max_length=24,
                   max_rows=32, tune={"d": 10, "n_prompt": 2, "popsize": 4, "iterations": 3, "patience": None},
                   shares_dir=str(d / "shares"), progress=False, timeout=120, prompt_position=position)


def test_templates_and_encoding(tiny: tuple[Path, Path]) -> None:
    model, _ = tiny
    assert is_decoder_model(str(model)) and not is_decoder_model("")
    assert decoder_template(get_task("sst2")) == ("Review: {text}\nSentiment:", ("negative", "positive"))
    assert decoder_template(get_task("demo"))[0] == "{text} It was"
    tok = transformers.AutoTokenizer.from_pretrained(str(model))
    exs = [Example(("a great movie " * 10,), 1), Example(("bad",), 0)]
    enc = encode_decoder(tok, "{text} It was", exs, max_length=12, n_prompt=3)
    assert enc.input_ids.shape[1] <= 9 and enc.attention_mask[0].sum() == 9
    assert enc.attention_mask[1].tolist() == [1] * 5 + [0] * 4  # [CLS] bad it was [SEP], right-padded
    row = tok.convert_ids_to_tokens(enc.input_ids[0, :9].tolist())
    assert row[0] == "[CLS]" and row[-3:] == ["it", "was", "[SEP]"]  # the text was cut, the template kept


def test_plain_evaluator_prompt_rows(tiny: tuple[Path, Path]) -> None:
    """Population rows are independent: each candidate's logits equal a one-candidate call."""
    model, _ = tiny
    ev = PlainDecoderEvaluator.from_pretrained(str(model), get_task("demo"), max_rows=3)
    batch = Batch.of("b", [Example(("a great movie",), 1), Example(("it was bad",), 0)])
    prompts = 0.1 * torch.randn(3, 2, ev.hidden_size, generator=torch.Generator().manual_seed(0))
    all3 = ev.logits(prompts, batch)
    assert all3.shape == (3, 2, 2)
    for i in range(3):
        assert torch.allclose(all3[i], ev.logits(prompts[i:i + 1], batch)[0], atol=1e-6)
    assert ev.logits(torch.zeros(1, 0, ev.hidden_size), batch).shape == (1, 2, 2)


def test_prompt_after_text(tiny: tuple[Path, Path]) -> None:
    """Prompt position "after-text": prefix/tail split, the template alone gives the same logits as "start"
    (same tokens), candidates are independent rows, and a second call reuses the cached prefixes."""
    model, _ = tiny
    assert split_template("Review: {text}\nSentiment:") == ("Review: {text}", "\nSentiment:")
    assert split_template("{text_a} ? {mask}, {text_b} It was".replace("{mask}", "")) == (
        "{text_a} ? , {text_b}", " It was")
    with pytest.raises(ConfigError, match="nothing after the text"):
        split_template("Review: {text}  ")
    task = get_task("demo")
    start = PlainDecoderEvaluator.from_pretrained(str(model), task, max_rows=3)
    after = PlainDecoderEvaluator.from_pretrained(str(model), task, max_rows=3, prompt_position="after-text")
    tok = transformers.AutoTokenizer.from_pretrained(str(model))
    assert tok.convert_ids_to_tokens(after.tail) == ["it", "was", "[SEP]"]
    batch = Batch.of("b", [Example(("a great movie",), 1), Example(("it was bad",), 0), Example(("bad",), 0)])
    none = torch.zeros(1, 0, start.hidden_size)
    assert torch.allclose(after.logits(none, batch), start.logits(none, batch), atol=1e-9)
    prompts = 0.1 * torch.randn(3, 2, after.hidden_size, generator=torch.Generator().manual_seed(0))
    all3 = after.logits(prompts, batch)
    calls = after.forward_calls
    for i in range(3):
        assert torch.allclose(all3[i], after.logits(prompts[i:i + 1], batch)[0], atol=1e-6)
    assert after.forward_calls == calls + 3  # P = 1: the 3 examples in one chunk of max_rows 3; no new prefill
    assert len(after._caches) == 3


def test_prompt_position_errors(tiny: tuple[Path, Path]) -> None:
    model, d = tiny
    with pytest.raises(ConfigError, match="prompt position: expected one of"):
        PlainDecoderEvaluator.from_pretrained(str(model), get_task("demo"), prompt_position="middle")
    enc = RunSpec(task="demo", model="", mode="plaintext", k=2, prompt_position="after-text")
    with pytest.raises(ConfigError, match="is for decoder models"):
        run(enc)


@pytest.mark.parametrize("parties,kind,position", [
    ("inprocess", "softmax", "start"), ("local", "softmax", "start"), ("inprocess", "softmax", "after-text"),
    ("local", "softmax", "after-text"), pytest.param("inprocess", "rfa", "start", marks=pytest.mark.slow),
    pytest.param("inprocess", "rfa", "after-text", marks=pytest.mark.slow)])
def test_mpc_decoder_tuning_follows_plaintext(tiny: tuple[Path, Path], parties: str, kind: str,
                                              position: str) -> None:
    model, d = tiny
    plain, _ = run(_spec(model, d, "plaintext", kind, position))
    private, costs = run(_spec(model, d, "mpc", kind, position), parties=parties)
    assert_follows_plaintext(private, plain, costs)
    assert private.attention == kind and len(plain.history) == 3
    assert abs(private.zero_shot_accuracy - plain.zero_shot_accuracy) <= 1 / private.n_eval + 1e-9
    assert private.cost is not None and private.cost.bytes_per_server > 0


def test_mpc_decoder_with_a_parties_file(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """``--parties parties.toml``: servers and dealer started on their own (here: as local processes running
    the one server entry point on the decoder's share directory); this process is only the data owner."""
    from secfwt.comm.base import OWNER, SERVER0, SERVER1
    from secfwt.launch import PartyProcesses, write_local_config
    from secfwt.tuning.decoder_eval import ensure_decoder_shares
    from secfwt.tuning.runner import run_job

    model, d = tiny
    spec = _spec(model, d, "mpc")
    shares = ensure_decoder_shares(spec)
    # longest first: the owner registers the rows sorted by length and puts the logits back in batch order
    batch = Batch.of("b", [Example(("a great movie , it was great",), 1), Example(("bad",), 0)])
    prompts = 0.1 * torch.randn(2, 2, 32, generator=torch.Generator().manual_seed(3))
    plain = PlainDecoderEvaluator.from_pretrained(str(model), get_task("demo"), max_length=24)
    config = write_local_config(tmp_path, timeout=120, frac_bits=16)
    prog = "secfwt.serve.entry:serve_from_env"
    with PartyProcesses({SERVER0: prog, SERVER1: prog}, config, env={"SECFWT_SHARES_DIR": str(shares)},
                        external=[OWNER], threads_per_party=1) as procs:
        got, costs = run_job(spec, get_task("demo"), lambda ev: ev.logits(prompts, batch), parties=str(config))
        procs.wait(timeout=120)
    assert set(costs) == {0, 1}
    assert (got - plain.logits(prompts, batch)).abs().max() < 1e-2
