"""Tuning layer on a tiny random BertForMaskedLM: encoding, losses, projection, the loop, checkpoints, reports."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from secfwt.errors import ConfigError
from secfwt.tuning import (
    Batch,
    Evaluator,
    HFPlainEvaluator,
    IterRecord,
    Projection,
    TuneConfig,
    accuracy,
    cross_entropy,
    get_task,
    hinge,
    plot_history,
    report_dict,
    tune,
    write_report,
)
from secfwt.tuning import checkpoint as ckpt
from secfwt.tuning.objective import EvalCost
from secfwt.tuning.report import REPORT_KEYS, summary_table

FAST = TuneConfig(d=16, n_prompt=3, popsize=6, iterations=12, checkpoint_every=3, patience=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs torch on one thread (conftest.one_thread)."""




# ------------------------------------------------------------------------------------------- evaluator


def test_encoding_puts_prompt_after_cls_and_reads_the_mask(demo_ev: HFPlainEvaluator, demo_data) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(demo_ev, Evaluator) and demo_ev.head == "mlm"
    batch = Batch.of("train", demo_data.train)
    enc = demo_ev.encode(batch, n_prompt=3)
    tok = demo_ev.tokenizer
    for row, pos in zip(enc.input_ids, enc.mask_pos, strict=True):
        assert row[0] == tok.cls_token_id and row[pos] == tok.mask_token_id
    text = tok.decode(enc.input_ids[0], skip_special_tokens=False)
    assert text.startswith("[CLS] ") and "it was [MASK]. [SEP]" in text
    assert demo_ev.label_ids.tolist() == [tok.convert_tokens_to_ids("bad"), tok.convert_tokens_to_ids("great")]


def test_logits_match_a_direct_forward(demo_ev: HFPlainEvaluator, demo_data) -> None:  # type: ignore[no-untyped-def]
    """Population batching and chunking give the same logits as one hand-built forward per prompt."""
    batch = Batch.of("train", demo_data.train)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randn(3, 4, demo_ev.hidden_size, generator=g) * demo_ev.embedding_std
    demo_ev.max_rows = 5  # force several chunks
    got = demo_ev.logits(prompts, batch)
    demo_ev.max_rows = 256
    assert got.shape == (3, len(batch), 2)
    enc = demo_ev.encode(batch, 4)
    model = demo_ev.model
    for p in range(3):
        for b in range(len(batch)):
            n = int(enc.attention_mask[b].sum())
            ids = enc.input_ids[b, :n]
            emb = model.get_input_embeddings()(ids)
            full = torch.cat([emb[:1], prompts[p], emb[1:]])[None]
            with torch.no_grad():
                out = model(inputs_embeds=full).logits[0, int(enc.mask_pos[b]) + 4]
            torch.testing.assert_close(got[p, b], out[demo_ev.label_ids], rtol=1e-4, atol=1e-5)


def test_zero_length_prompt_is_the_template_alone(demo_ev: HFPlainEvaluator, demo_data) -> None:  # type: ignore[no-untyped-def]
    batch = Batch.of("dev", demo_data.dev)
    a = demo_ev.logits(torch.zeros(1, 0, demo_ev.hidden_size), batch)
    b = demo_ev.logits(torch.zeros(1, 0, demo_ev.hidden_size), batch)
    assert a.shape == (1, len(batch), 2) and torch.equal(a, b)
    with pytest.raises(ConfigError, match=r"prompts: expected \(P, n_prompt, 32\)"):
        demo_ev.logits(torch.zeros(2, 3), batch)


def test_pair_task_and_truncation(tiny_dir: Path) -> None:
    from secfwt.tuning.data import Example

    ev = HFPlainEvaluator.from_pretrained(tiny_dir, get_task("rte"), max_length=24)
    long = " ".join(["word"] * 60)
    batch = Batch.of("x", [Example((long, "short hypothesis ."), 1), Example(("a .", "b ."), 0)])
    enc = ev.encode(batch, n_prompt=4)
    assert enc.input_ids.shape[1] == 24 - 4
    text = ev.tokenizer.decode(enc.input_ids[0])
    assert "? [MASK], short hypothesis. [SEP]" in text  # the long premise is cut, template and mask kept
    assert ev.logits(torch.zeros(2, 4, 32), batch).shape == (2, 2, 2)


def test_multi_token_label_word_is_a_clear_error(tiny_dir: Path) -> None:
    from secfwt.tuning.tasks import TaskSpec

    task = TaskSpec("t", "{text} {mask}", ("0", "1"), ("bad", "xylophonically"))
    with pytest.raises(ConfigError, match="label word 'xylophonically' is not one token"):
        HFPlainEvaluator.from_pretrained(tiny_dir, task)


# ------------------------------------------------------------------------------------------ losses, A


def test_losses_and_accuracy() -> None:
    logits = torch.tensor([[[2.0, 0.0], [0.0, 3.0]], [[0.0, 1.0], [0.5, 0.0]]])  # (P=2, B=2, 2)
    labels = torch.tensor([0, 1])
    ce = cross_entropy(logits, labels)
    ref = [
        (math.log1p(math.exp(-2)) + math.log1p(math.exp(-3))) / 2,
        (math.log1p(math.e) + math.log1p(math.exp(0.5))) / 2,
    ]
    torch.testing.assert_close(ce, torch.tensor(ref, dtype=torch.float64))
    torch.testing.assert_close(hinge(logits, labels), torch.tensor([0.0, (2.0 + 1.5) / 2], dtype=torch.float64))
    torch.testing.assert_close(accuracy(logits, labels), torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_projection_has_the_embedding_scale() -> None:
    """BBT Sec. 3.2: with z ~ N(0, sigma^2 I), entries of A z have the std of the word embeddings."""
    proj = Projection(d=200, n_prompt=10, hidden=64, embedding_std=0.05, sigma=2.0, alpha=1.0, seed=3)
    z = np.random.default_rng(0).normal(0, 2.0, size=(50, 200))
    p = proj(z)
    assert p.shape == (50, 10, 64)
    assert abs(float(p.std()) - 0.05) < 0.005
    again = Projection(d=200, n_prompt=10, hidden=64, embedding_std=0.05, sigma=2.0, alpha=1.0, seed=3)
    assert torch.equal(again.A, proj.A)
    p0 = torch.ones(10, 64)
    with_p0 = Projection(200, 10, 64, 0.05, 2.0, 1.0, 3, p0)
    torch.testing.assert_close(with_p0(z) - p0, p)
    near = Projection(200, 10, 64, 0.05, 2.0, 0.25, 3)  # alpha scales the step around p0 (--alpha)
    torch.testing.assert_close(near(z), 0.25 * p)


# ------------------------------------------------------------------------------------------------ loop


def test_tuning_reduces_the_loss(demo_ev: HFPlainEvaluator, demo_data) -> None:  # type: ignore[no-untyped-def]
    res = tune(demo_ev, demo_data, TuneConfig(d=16, n_prompt=3, popsize=8, iterations=12, patience=None),
               progress=False)
    first, last = res.history[0], res.history[-1]
    assert len(res.history) == 12 and res.calls == 96 and res.stop_reason == "budget"
    assert last.loss_min < first.loss_min
    assert min(h.loss_mean for h in res.history[-5:]) < first.loss_mean
    assert all(h.dev_acc is not None for h in res.history)
    assert res.best_z.shape == (16,) and res.n_eval == 24 and res.eval_split == "test"
    if res.used_prompt:
        assert res.dev_accuracy >= res.zero_shot_dev_accuracy
    else:
        assert res.accuracy == res.zero_shot_accuracy


def test_same_seed_same_result_and_options(demo_ev: HFPlainEvaluator, demo_data) -> None:  # type: ignore[no-untyped-def]
    cfg = TuneConfig(d=8, n_prompt=2, popsize=4, iterations=4, init="vocab", loss="hinge", train_batch=5,
                     eval_every=2)
    a = tune(demo_ev, demo_data, cfg, progress=False)
    b = tune(demo_ev, demo_data, cfg, progress=False)
    assert np.array_equal(a.best_z, b.best_z) and a.history == b.history
    assert [h.dev_acc is not None for h in a.history] == [False, True, False, True]
    c = tune(demo_ev, demo_data, TuneConfig(**{**cfg.__dict__, "seed": 7}), progress=False)
    assert not np.array_equal(a.best_z, c.best_z)


def test_patience_stops_early(demo_ev: HFPlainEvaluator, demo_data) -> None:  # type: ignore[no-untyped-def]
    res = tune(demo_ev, demo_data, TuneConfig(d=8, n_prompt=2, popsize=4, iterations=50, patience=3),
               progress=False)
    assert res.stop_reason == "patience" and res.iterations < 50


def test_bad_config_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="popsize must be >= 2"):
        TuneConfig(popsize=1)
    with pytest.raises(ConfigError, match="unknown loss 'mse'"):
        TuneConfig(loss="mse")
    with pytest.raises(ConfigError, match="alpha must be > 0, got 0.0"):
        TuneConfig(alpha=0.0)
    assert TuneConfig().max_iterations == 400 and TuneConfig(iterations=3).max_iterations == 3


# ---------------------------------------------------------------------------------------- checkpoints


class _Killed(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["cma", "spsa"])
def test_kill_and_resume_equals_uninterrupted(demo_ev: HFPlainEvaluator, demo_data, tmp_path: Path,  # type: ignore[no-untyped-def]
                                              optimizer: str) -> None:
    cfg = dataclasses.replace(FAST, optimizer=optimizer)
    full = tune(demo_ev, demo_data, cfg, checkpoint_dir=tmp_path / "full", progress=False)

    def kill_after(n: int):  # type: ignore[no-untyped-def]
        def hook(rec: IterRecord) -> None:
            if rec.iteration == n:
                raise _Killed

        return hook

    run_dir = tmp_path / "run"
    with pytest.raises(_Killed):  # dies after iteration 7: last checkpoint is at iteration 6
        tune(demo_ev, demo_data, cfg, checkpoint_dir=run_dir, progress=False, on_iteration=kill_after(7))
    assert ckpt.load(run_dir)["iteration"] == 6  # type: ignore[index]
    with pytest.raises(_Killed):  # resumed, killed again after 10
        tune(demo_ev, demo_data, cfg, checkpoint_dir=run_dir, progress=False, on_iteration=kill_after(10))
    assert ckpt.load(run_dir)["iteration"] == 9  # type: ignore[index]
    resumed = tune(demo_ev, demo_data, cfg, checkpoint_dir=run_dir, progress=False)
    assert np.array_equal(resumed.best_z, full.best_z)
    assert resumed.history == full.history
    assert (resumed.accuracy, resumed.iterations, resumed.calls) == (full.accuracy, full.iterations, full.calls)
    # a finished checkpoint resumes straight to the final evaluation
    again = tune(demo_ev, demo_data, cfg, checkpoint_dir=run_dir, progress=False)
    assert again.history == full.history and np.array_equal(again.best_z, full.best_z)
    assert not list(run_dir.glob("*.tmp"))


class _Metered:
    """An evaluator whose cost is its own forward count (a session's ledger starts at zero, as a server's does)."""

    def __init__(self, inner: HFPlainEvaluator) -> None:
        self.inner, self.calls, self.rows = inner, 0, 0

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)

    def logits(self, prompts: torch.Tensor, batch):  # type: ignore[no-untyped-def]
        self.calls += 1
        self.rows += len(prompts) * len(batch)
        return self.inner.logits(prompts, batch)

    def cost(self) -> EvalCost:
        return EvalCost(bytes_per_server=1000 * self.rows, rounds=7 * self.calls, compute_s=0.5 * self.calls,
                        forward_calls=self.calls)


def test_resumed_run_reports_the_whole_runs_cost(demo_ev: HFPlainEvaluator, demo_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = TuneConfig(d=8, n_prompt=2, popsize=4, iterations=6, checkpoint_every=2, eval_every=3, patience=None)
    full = tune(_Metered(demo_ev), demo_data, cfg, checkpoint_dir=tmp_path / "full", progress=False)  # type: ignore[arg-type]

    def stop_after_3(rec: IterRecord) -> None:  # iteration 3 runs but its checkpoint is at 2: its cost is lost
        if rec.iteration == 3:
            raise _Killed

    with pytest.raises(_Killed):
        tune(_Metered(demo_ev), demo_data, cfg, checkpoint_dir=tmp_path / "run", progress=False,  # type: ignore[arg-type]
             on_iteration=stop_after_3)
    second = _Metered(demo_ev)
    resumed = tune(second, demo_data, cfg, checkpoint_dir=tmp_path / "run", progress=False)  # type: ignore[arg-type]
    assert resumed.cost == full.cost and resumed.cost is not None and resumed.cost.forward_calls > second.calls > 0
    assert np.array_equal(resumed.best_z, full.best_z)
    # an old checkpoint without a cost: the report holds this session's cost only
    state = ckpt.load(tmp_path / "run")
    assert state is not None
    state.pop("cost")
    ckpt.save_atomic(tmp_path / "run", {k: v for k, v in state.items() if k != "version"})
    third = _Metered(demo_ev)
    assert tune(third, demo_data, cfg, checkpoint_dir=tmp_path / "run", progress=False).cost == third.cost()  # type: ignore[arg-type]


def test_checkpoint_of_another_run_is_refused(demo_ev: HFPlainEvaluator, demo_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = TuneConfig(d=8, n_prompt=2, popsize=4, iterations=2, checkpoint_every=1)
    tune(demo_ev, demo_data, cfg, checkpoint_dir=tmp_path, progress=False)
    other = TuneConfig(**{**cfg.__dict__, "sigma": 0.5})
    with pytest.raises(ConfigError, match="checkpoint belongs to another run"):
        tune(demo_ev, demo_data, other, checkpoint_dir=tmp_path, progress=False)
    tune(demo_ev, demo_data, other, checkpoint_dir=tmp_path, resume=False, progress=False)  # overwrite is fine
    from safetensors.numpy import save_file

    save_file({}, str(tmp_path / ckpt.STATE_FILE), metadata={"format": ckpt.FORMAT, "state": '{"version": 99}'})
    with pytest.raises(ConfigError, match="checkpoint format version: expected 2, got 99"):
        ckpt.load(tmp_path)


# -------------------------------------------------------------------------------------------- reports


def test_report_plot_and_table(demo_ev: HFPlainEvaluator, demo_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    res = tune(demo_ev, demo_data, TuneConfig(d=8, n_prompt=2, popsize=4, iterations=3), progress=False)
    path = write_report(res, tmp_path / "out" / "report.json")
    rep = json.loads(path.read_text())
    assert tuple(rep) == REPORT_KEYS == tuple(report_dict(res))
    assert rep["mode"] == "plaintext" and rep["task"] == "demo" and rep["k"] == 4 and rep["iterations"] == 3
    assert rep["bytes_per_server"] == 0 and rep["n_eval"] == 24 and 0 <= rep["accuracy"] <= 1
    png = plot_history(res.history, tmp_path / "h.png", title="demo")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert summary_table(res).row_count >= 7


def test_spsa_estimates_the_gradient_and_descends() -> None:
    """The antithetic two-point estimate of a linear loss a.z averages to a (E[u u^T] = I), and zeroth-order
    Adam drives a quadratic towards its minimum; an odd population is refused."""
    from secfwt.tuning.zo import Spsa

    a = np.linspace(-1.0, 1.0, 6)
    opt = Spsa(6, popsize=20000, lr=0.1, eps=0.3, seed=0)  # per-coordinate sd of the mean ~0.015
    zs = opt.ask()
    opt.tell([float(a @ z) for z in zs])
    m_hat = opt.m / (1 - 0.9)  # the first Adam moment after one step is (1 - beta1) g
    assert np.allclose(m_hat, a, atol=0.06)
    target = np.arange(6, dtype=np.float64) / 3.0
    opt = Spsa(6, popsize=8, lr=0.1, eps=0.1, seed=1)
    start = float(((opt.mean - target) ** 2).sum())
    for _ in range(300):
        zs = opt.ask()
        opt.tell([float(((z - target) ** 2).sum()) for z in zs])
    assert float(((opt.mean - target) ** 2).sum()) < 0.01 * start
    with pytest.raises(ConfigError, match="even"):
        Spsa(6, popsize=5, lr=0.1, eps=0.1, seed=0)
    with pytest.raises(ConfigError, match="even popsize"):
        TuneConfig(optimizer="spsa", popsize=5)


def test_registrations_keep_the_most_recently_used_and_release_the_rest() -> None:
    from secfwt.tuning.objective import Registrations

    released: list[int] = []
    made: list[str] = []
    counter = iter(range(100))

    def make(key: str):  # type: ignore[no-untyped-def]
        def register() -> tuple[int, str]:
            made.append(key)
            assert len(reg) - held_whole_run() < 2  # the least recently used went before the new one came
            return next(counter), key

        return register

    reg: Registrations[str] = Registrations(released.append, keep=2)

    def held_whole_run() -> int:
        return len(reg._whole_run)

    assert reg.get("dev", make("dev"), whole_run=True) == (0, "dev")
    assert reg.get("mb1", make("mb1")) == (1, "mb1")
    assert reg.get("mb2", make("mb2")) == (2, "mb2")
    assert reg.get("mb1", make("mb1")) == (1, "mb1")  # a hit: mb1 is now the most recent
    assert reg.get("mb3", make("mb3")) == (3, "mb3")  # mb2 was the least recently used
    assert released == [2] and len(reg) == 3
    assert reg.get("mb2", make("mb2")) == (4, "mb2")  # registered again under a new number; mb1 goes
    assert reg.get("dev", make("dev"), whole_run=True) == (0, "dev")  # whole-run batches are never released
    assert released == [2, 1] and made == ["dev", "mb1", "mb2", "mb3", "mb2"]
    with pytest.raises(ConfigError, match="keep: expected at least 1"):
        Registrations(released.append, keep=0)
