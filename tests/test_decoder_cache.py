"""The decoder's prefix cache: prefill U prefixes once, continue each with ``per`` candidate prompts + a tail.

Oracles: HuggingFace on each row's whole unpadded sequence [prefix_u, prompt_r, tail] (softmax), and secfwt's
own uncached forward on the same sequences (every attention kind, both backends). MPC tolerances are those of
tests/test_decoder_mpc.py (max abs error of the label logits).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from secfwt.comm.base import SERVER0, SERVER1  # noqa: E402
from secfwt.context import PartyContext  # noqa: E402
from secfwt.nn import PlainBackend  # noqa: E402
from secfwt.nn.decoder import Decoder, PrefixCache  # noqa: E402
from secfwt.nn.decoder_heads import LabelWordHead  # noqa: E402
from secfwt.nn.mpc import MpcBackend  # noqa: E402
from secfwt.runtime import run_in_process  # noqa: E402
from test_decoder_mpc import TOLERANCE, _attn  # noqa: E402
from test_decoder_plain import HIDDEN, VOCAB, hf_label_logits, make_tiny_llama  # noqa: E402

PER = 3  # candidate prompts per prefix
LENGTHS = (5, 9, 2)  # prefix lengths (right-padded to 9)
N_PROMPT, N_TAIL = 2, 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama_cache"), tied=True, seed=31)


def _case(dec: Decoder[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prefix embeds (U, 9, H), prefix mask (U, 9), prompts (U * PER, P, H), tail (S, H))."""
    g = torch.Generator().manual_seed(4)
    word = dec.params["emb.word"]
    ids = torch.randint(3, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = (torch.arange(max(LENGTHS)) < torch.tensor(LENGTHS).reshape(-1, 1)).to(torch.float64)
    prompts = 0.05 * torch.randn(len(LENGTHS) * PER, N_PROMPT, HIDDEN, generator=g, dtype=torch.float64)
    tail = word[torch.randint(3, VOCAB, (N_TAIL,), generator=g)]
    return word[ids], mask, prompts, tail


def _full_rows(embeds: torch.Tensor, prompts: torch.Tensor | None, tail: torch.Tensor) -> list[torch.Tensor]:
    """Row r's whole sequence (1, T_r, H): prefix_u (unpadded), prompt_r, tail."""
    per = PER if prompts is not None else 1
    rows = []
    for r in range(len(LENGTHS) * per):
        u = r // per
        parts = [embeds[u, : LENGTHS[u]]] + ([prompts[r]] if prompts is not None else []) + [tail]
        rows.append(torch.cat(parts).unsqueeze(0))
    return rows


def _cached_logits(be, dec, head, embeds, mask, prompts, tail, split: bool = False):  # type: ignore[no-untyped-def]
    cache = dec.prefill(be, embeds, mask)
    if split:  # per-example caches (what a server keeps between forwards), stacked again
        cache = PrefixCache.stack(be, cache.split(be))
    out = dec.forward_cached(be, cache, tail, prompt=prompts, per=PER if prompts is not None else 1)
    return head.forward(be, out)


@pytest.mark.parametrize("with_prompt", [True, False])
def test_cached_matches_hf(tiny_dir: Path, with_prompt: bool) -> None:
    dec = Decoder.from_pretrained(tiny_dir)
    head = LabelWordHead.from_decoder(dec, [7, [11, 12]])
    embeds, mask, prompts, tail = _case(dec)
    prompts_or_none = prompts if with_prompt else None
    got = _cached_logits(PlainBackend(), dec, head, embeds, mask, prompts_or_none, tail, split=True)
    for r, row in enumerate(_full_rows(embeds, prompts_or_none, tail)):
        ref = hf_label_logits(tiny_dir, row, torch.ones(1, row.shape[1]))
        assert torch.allclose(got[r], ref[0], atol=1e-6, rtol=1e-6), (r, (got[r] - ref[0]).abs().max())


@pytest.mark.parametrize("kind,form", [("rfa", "masked"), ("rfa", "prefix"), ("2quad", "masked"),
                                       ("relu", "masked"), ("power", "masked")])
def test_cached_matches_uncached(tiny_dir: Path, kind: str, form: str) -> None:
    dec = Decoder.from_pretrained(tiny_dir, attention=_attn(kind), rfa_form=form)
    head = LabelWordHead.from_decoder(dec, [7, [11, 12]])
    embeds, mask, prompts, tail = _case(dec)
    be = PlainBackend()
    got = _cached_logits(be, dec, head, embeds, mask, prompts, tail)
    for r, row in enumerate(_full_rows(embeds, prompts, tail)):
        ref = head.forward(be, dec.forward(be, row, torch.ones(1, row.shape[1])))
        assert torch.allclose(got[r], ref[0], atol=1e-9), (kind, r, (got[r] - ref[0]).abs().max())


def test_cached_input_errors(tiny_dir: Path) -> None:
    dec = Decoder.from_pretrained(tiny_dir)
    embeds, mask, prompts, tail = _case(dec)
    be = PlainBackend()
    cache = dec.prefill(be, embeds, mask)
    with pytest.raises(ValueError, match="tail: expected shape"):
        dec.forward_cached(be, cache, tail[:, :5], prompt=prompts, per=PER)
    with pytest.raises(ValueError, match="prompt: expected shape"):
        dec.forward_cached(be, cache, tail, prompt=prompts[:4], per=PER)
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        dec.forward_cached(be, cache, torch.zeros(60, HIDDEN, dtype=torch.float64))
    left = mask.flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        dec.prefill(be, embeds, left)


@pytest.mark.parametrize("kind", ["softmax", "rfa"])
def test_cached_mpc_matches_plain(tiny_dir: Path, kind: str) -> None:
    dec = Decoder.from_pretrained(tiny_dir, attention=_attn(kind))
    head = LabelWordHead.from_decoder(dec, [7, [11, 12]])
    embeds, mask, prompts, tail = _case(dec)
    ref = _cached_logits(PlainBackend(), dec, head, embeds, mask, prompts, tail)

    def prog(ctx: PartyContext) -> torch.Tensor:
        be = MpcBackend(ctx)
        dec_s, head_s = dec.map_params(be.share_plain), head.map_params(be.share_plain)
        x, p, t = (be.share_plain(n, v) for n, v in (("x", embeds), ("p", prompts), ("t", tail)))
        return be.reveal(_cached_logits(be, dec_s, head_s, x, mask, p, t, split=True))

    res = run_in_process({SERVER0: prog, SERVER1: prog}, timeout=300)  # type: ignore[dict-item]
    err = (res[SERVER0] - ref).abs().max().item()
    assert err < TOLERANCE[kind], f"{kind}: max abs error {err:.2e}"


def test_mpc_backend_silu_method_is_checked() -> None:
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="silu_method must be"):
        MpcBackend(SimpleNamespace(is_server=True, name="server0"), silu_method="fast")  # type: ignore[arg-type]
