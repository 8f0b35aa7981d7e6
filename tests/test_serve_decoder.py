"""The decoder service through the servers' one entry point: ``serve_from_env`` reads the share file's format
and serves a decoder (tiny random Llama); the owner's logits match the plaintext decoder + label-word head.
Unknown share formats are refused with a one-line error naming the file and the format."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from secfwt.comm.base import OWNER, SERVER0, SERVER1  # noqa: E402
from secfwt.context import PartyContext  # noqa: E402
from secfwt.errors import ConfigError  # noqa: E402
from secfwt.nn import AttentionConfig, PlainBackend  # noqa: E402
from secfwt.nn.decoder import Decoder  # noqa: E402
from secfwt.nn.decoder_heads import LabelWordHead  # noqa: E402
from secfwt.runtime import run_in_process  # noqa: E402
from secfwt.serve.decoder import DecoderClient, load_decoder_shares, share_decoder  # noqa: E402
from secfwt.serve.entry import serve_from_env  # noqa: E402
from secfwt.serve.rows import row_chunks  # noqa: E402
from secfwt.serve.shares import load_server_shares, owner_word_table  # noqa: E402
from test_decoder_plain import HIDDEN, LABELS, VOCAB, _inputs, make_tiny_llama  # noqa: E402

TOLERANCE = 1e-3  # max abs error of the label logits, MPC vs plaintext (test_decoder_mpc.py)


def test_row_chunks_trim_trailing_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    chunks, inverse = row_chunks(2, mask, max_rows=2)  # rows p * 3 + b, example-major
    assert [(c.prompt.tolist(), c.example.tolist(), c.length) for c in chunks] == [
        ([0, 1], [0, 0], 4), ([0, 1], [1, 1], 2), ([0, 1], [2, 2], 3)]
    rows = torch.cat([c.prompt * 3 + c.example for c in chunks])
    assert rows[inverse].tolist() == list(range(6))


def test_serve_from_env_serves_a_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_tiny_llama(tmp_path / "model", tied=True, seed=5)
    shares = share_decoder(str(model), tmp_path / "shares")
    with pytest.raises(ConfigError, match="expected 'secfwt-shares-1'"):  # not an encoder share file
        load_server_shares(shares / "server0.safetensors", SERVER0)
    assert load_decoder_shares(shares / "server1.safetensors", SERVER1).tied
    monkeypatch.delenv("SECFWT_SHARE_FILE", raising=False)
    monkeypatch.setenv("SECFWT_SHARES_DIR", str(shares))

    dec = Decoder.from_pretrained(model)
    head = LabelWordHead.from_decoder(dec, LABELS)
    ids, mask = _inputs(seed=4)  # right-padded rows of 9, 6 and 4 tokens
    prompts = 0.05 * torch.randn(2, 2, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    be = PlainBackend()
    word = dec.params["emb.word"]
    want = torch.stack([head.forward(be, dec.forward(be, word[ids], mask, prompt=p, prompt_at=1)) for p in prompts])
    label_ids = [[g] if isinstance(g, int) else list(g) for g in LABELS]

    def owner(ctx: PartyContext) -> torch.Tensor:
        client = DecoderClient(ctx, HIDDEN, VOCAB, embedding="local", word_table=owner_word_table(shares))
        client.setup_decoder(AttentionConfig("softmax"), label_ids, max_rows=2, prompt_at=1, owner_rows=None)
        b = client.register(ids, mask)
        out, _ = client.run_and_stop(lambda: client.forward(b, prompts))  # chunks of 2: one example each
        return out

    res = run_in_process({SERVER0: serve_from_env, SERVER1: serve_from_env, OWNER: owner}, timeout=300)
    assert res[SERVER0] == res[SERVER1] == 1  # forwards served
    assert res[OWNER].shape == (2, 3, len(LABELS))
    assert (res[OWNER] - want).abs().max().item() < TOLERANCE


def test_serve_prefix_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompt position "after-text": the servers prefill prefixes once (two prefill commands, slots 0-2 and 3),
    then forward_cached runs candidates + tail on any subset of slots, in chunks of whole examples; the
    owner's logits equal the plaintext decoder on each row's whole sequence [prefix, prompt, tail]."""
    model = make_tiny_llama(tmp_path / "model", tied=True, seed=8)
    shares = share_decoder(str(model), tmp_path / "shares")
    monkeypatch.delenv("SECFWT_SHARE_FILE", raising=False)
    monkeypatch.setenv("SECFWT_SHARES_DIR", str(shares))
    dec = Decoder.from_pretrained(model)
    head = LabelWordHead.from_decoder(dec, LABELS)
    word = dec.params["emb.word"]
    ids, mask = _inputs(seed=5)  # prefixes of 9, 6 and 4 tokens
    extra_ids, extra_mask = ids[:1, :3], torch.ones(1, 3)
    tail = [5, 9]
    prompts = 0.05 * torch.randn(3, 2, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    be = PlainBackend()

    def want(rows: list[tuple[torch.Tensor, int]]) -> torch.Tensor:  # (P, B, L) from whole sequences
        out = torch.zeros(len(prompts), len(rows), len(LABELS), dtype=torch.float64)
        for b, (row_ids, n) in enumerate(rows):
            for c, p in enumerate(prompts):
                x = torch.cat([word[row_ids[:n]], p, word[torch.tensor(tail)]]).unsqueeze(0)
                out[c, b] = head.forward(be, dec.forward(be, x, torch.ones(1, x.shape[1])))[0]
        return out

    label_ids = [[g] if isinstance(g, int) else list(g) for g in LABELS]

    def owner(ctx: PartyContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        client = DecoderClient(ctx, HIDDEN, VOCAB, embedding="local", word_table=owner_word_table(shares))
        client.setup_decoder(AttentionConfig("softmax"), label_ids, max_rows=4, prompt_at=1, owner_rows=None,
                             tail_ids=tail)
        assert client.prefill(ids, mask) == [0, 1, 2]
        assert client.prefill(extra_ids, extra_mask) == [3]

        def job() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            a = client.forward_cached([2, 0, 3], prompts)  # 4 rows per chunk: one example (3 candidates) each
            z = client.forward_cached([1], torch.zeros(1, 0, HIDDEN))  # the template alone
            return a, z, z

        return client.run_and_stop(job)[0]

    res = run_in_process({SERVER0: serve_from_env, SERVER1: serve_from_env, OWNER: owner}, timeout=300)
    got, zero, _ = res[OWNER]
    n = mask.sum(1).long()
    ref = want([(ids[2], int(n[2])), (ids[0], int(n[0])), (extra_ids[0], 3)])
    assert got.shape == (3, 3, len(LABELS)) and (got - ref).abs().max().item() < TOLERANCE
    x = torch.cat([word[ids[1, : int(n[1])]], word[torch.tensor(tail)]]).unsqueeze(0)
    ref0 = head.forward(be, dec.forward(be, x, torch.ones(1, x.shape[1])))
    assert (zero[0] - ref0).abs().max().item() < TOLERANCE
    assert res[SERVER0] == 2  # forwards served


def test_serve_from_env_rejects_an_unknown_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "server0.safetensors"
    save_file({"w": torch.zeros(2, dtype=torch.int64)}, str(bad), metadata={"format": "secfwt-shares-0"})
    monkeypatch.setenv("SECFWT_SHARE_FILE", str(bad))
    with pytest.raises(ConfigError) as err:
        serve_from_env(SimpleNamespace(rank=SERVER0))  # type: ignore[arg-type] - refused before any message
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and "'secfwt-shares-0'" in msg, msg
    assert "secfwt-decoder-shares-1" in msg


def test_share_model_cli_writes_decoder_shares(tmp_path: Path) -> None:
    from secfwt.cli import main
    from secfwt.serve import decoder
    from secfwt.serve.shares import share_format

    model = make_tiny_llama(tmp_path / "model", tied=False, seed=7)
    assert main(["share-model", "--model", str(model), "--out", str(tmp_path / "s"), "--keep-embeddings"]) == 0
    assert share_format(tmp_path / "s" / "server0.safetensors") == decoder.FORMAT
    assert not (tmp_path / "s" / "owner").exists()
    s1 = load_decoder_shares(tmp_path / "s" / "server1.safetensors", SERVER1)
    assert not s1.tied and "lm_head" in s1.params
