"""benchmarks/compare's secfwt runner prepares encoder layers as the model server does (serve/session.py).

In-process (threads), tiny BERT layer (hidden 32, FFN 64, 8 tokens): the runner's ``served_layers`` stacks q/k/v
once and fixes every weight matrix's Beaver mask in the ``setup`` scope; a forward with the prepared layer then
opens no weight, agrees with float64, and sends at least the weights' openings fewer bytes than the plain
construction (default backend, weights re-opened in every product).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

COMPARE = Path(__file__).resolve().parents[1] / "benchmarks" / "compare"
sys.path.insert(0, str(COMPARE))

import secfwt_runner as R  # noqa: E402
from secfwt_cases import encoder_config, op_case, op_reference  # noqa: E402

from secfwt.comm.base import SERVER0, SERVER1  # noqa: E402
from secfwt.nn.config import AttentionConfig  # noqa: E402
from secfwt.nn.encoder import EncoderLayer  # noqa: E402
from secfwt.nn.mpc import ENCODER_LINEAR_BOUND, MpcBackend  # noqa: E402
from secfwt.protocols.arith import FixedShare  # noqa: E402
from secfwt.runtime import run_in_process  # noqa: E402

CASE = op_case("encoder_layer", "softmax", tiny=True)
MATRICES = {"attn.qkv.weight", "attn.o.weight", "ffn.in.weight", "ffn.out.weight"}


def _layer_run(served: bool):
    cfg = encoder_config(CASE.dims)

    def prog(ctx):
        be = R.backend_for(ctx, "encoder_layer") if served else MpcBackend(ctx)
        p = {k: be.share_plain(k, v) for k, v in CASE.params.items()}
        before = R.setup_cost(ctx)
        if served:
            p = R.served_layers(be, cfg, [p])[0]
        setup = {k: v - before[k] for k, v in R.setup_cost(ctx).items()}
        x = be.share_plain("x", CASE.x)
        layer = EncoderLayer(cfg, AttentionConfig("softmax"), 0, p)
        with ctx.cost.scope("forward"):
            y = layer.forward(be, x.unsqueeze(0), torch.ones(1, CASE.x.shape[0], dtype=torch.float64))
        fwd = ctx.cost.by_top_level()["forward"]
        paths = [k for k in ctx.cost.ops if k.startswith("forward")]
        kinds = {k: (isinstance(v, FixedShare), tuple(v.shape)) for k, v in p.items()}
        return {"y": be.reveal(y).squeeze(0), "setup": setup, "bytes": fwd.bytes_sent, "paths": paths,
                "kinds": kinds, "linear_bound": be.linear_bound}

    return run_in_process({SERVER0: prog, SERVER1: prog}, timeout=120).results


def test_served_layer_is_prepared_once_and_forwards_open_no_weight():
    served, plain = _layer_run(True), _layer_run(False)
    s0 = served[SERVER0]
    assert s0["linear_bound"] == ENCODER_LINEAR_BOUND and plain[SERVER0]["linear_bound"] is None
    kinds = s0["kinds"]
    assert not any(k.startswith(("attn.q.", "attn.k.", "attn.v.")) for k in kinds)  # stacked into attn.qkv.*
    assert {k for k, (fixed, _) in kinds.items() if fixed} == MATRICES  # every matrix fixed, no vector
    h, f = CASE.dims.hidden, CASE.dims.ffn
    assert kinds["attn.qkv.weight"][1] == (3 * h, h)
    n = 4 * h * h + 2 * h * f  # matrix elements: qkv (3H, H), o (H, H), in (F, H), out (H, F)
    for r in (SERVER0, SERVER1):
        setup = served[r]["setup"]
        assert setup["rounds"] == len(MATRICES)  # one opening of W - B per matrix
        assert 8 * n <= setup["bytes_sent"] < 8 * n + 128 * len(MATRICES), setup
        assert not any("fix_weight" in pth for pth in served[r]["paths"])
        assert plain[r]["bytes"] - served[r]["bytes"] >= 8 * n  # the weights' openings left the forward
    ref = op_reference(CASE)
    assert float((s0["y"] - ref).abs().max()) < 1e-3
    assert float((plain[SERVER0]["y"] - ref).abs().max()) < 1e-3


def test_only_the_encoder_workloads_use_the_served_configuration():
    for w in ("encoder_layer", "small_model_forward", "paper_iteration", "tuning_step"):
        assert R.engine_config(w)["served"] and R.engine_config(w)["linear_bound"] == ENCODER_LINEAR_BOUND
    for w in ("matmul", "softmax", "gelu", "layernorm"):
        assert not R.engine_config(w)["served"] and R.engine_config(w)["linear_bound"] is None


def test_online_run_is_preloaded_checked_and_reported():
    """``_online_run``: a recorded run, the dealer's answers preloaded (offline), then a timed run with no dealer
    wait whose output is still right; ``online_fields`` turns both servers' results into the row's fields."""
    cfg = encoder_config(CASE.dims)

    def prog(ctx):
        be = R.backend_for(ctx, "encoder_layer")
        p = R.served_layers(be, cfg, [{k: be.share_plain(k, v) for k, v in CASE.params.items()}])[0]
        x = be.share_plain("x", CASE.x)
        layer = EncoderLayer(cfg, AttentionConfig("softmax"), 0, p)
        mask = torch.ones(1, CASE.x.shape[0], dtype=torch.float64)
        return R._online_run(ctx, be, lambda: [layer.forward(be, x.unsqueeze(0), mask).squeeze(0)])

    res = run_in_process({SERVER0: prog, SERVER1: prog}, timeout=120).results
    assert res[SERVER1]["dealer_wait_s"] == 0.0 and res[SERVER1]["offline_bytes"] > 0
    ref = op_reference(CASE)
    errors: dict[str, float] = {}
    row = R.online_fields({r: {"online": res[r]} for r in (SERVER0, SERVER1)}, errors,
                          lambda o: {"out": float((o[0] - ref).abs().max())})
    assert errors["out_online"] < 1e-3
    assert row["online_time_s"] > 0 and row["offline_bytes"] == res[SERVER1]["offline_bytes"]
    assert row["online_rounds"] >= 100
