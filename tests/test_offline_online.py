"""Offline and online: server 1's waits for the dealer and the dealer's bytes add up to the ledgers; preloading
a recorded request sequence (the dealer ahead of the servers) gives the same results with no online wait; the
report keys; the malloc set-up; the before/after table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from secfwt import alloc, ring
from secfwt.comm.base import DEALER, SERVER0, SERVER1
from secfwt.cost import CostTracker, cpu_model, offline_online
from secfwt.errors import ProtocolMismatchError
from secfwt.protocols.arith import mul_aa
from secfwt.protocols.compare import ltz
from secfwt.runtime import run_in_process
from secfwt.share import AShare, reveal

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import before_after  # noqa: E402
import dealer_material  # noqa: E402

F = 16


def _inputs(rank: int, n: int) -> tuple[AShare, AShare, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    rx = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)
    ry = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)
    if rank == SERVER0:
        return AShare(rx, F), AShare(ry, F), x, y
    return AShare(ring.encode(x, F) - rx, F), AShare(ring.encode(y, F) - ry, F), x, y


def _work(ctx: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, xp, yp = _inputs(ctx.rank, n)
    z = reveal(ctx, mul_aa(ctx, x, y))
    s = reveal(ctx, AShare(ltz(ctx, x).data, 0))
    assert float((z - xp * yp).abs().max()) < 1e-3
    assert torch.equal(s, (xp < 0).double())
    return z, s


def _many(ctx: Any, n: int) -> tuple[torch.Tensor, ...]:
    """One comparison and enough multiplications to cross a request-log checkpoint (every 256 requests)."""
    x, y, xp, yp = _inputs(ctx.rank, n)
    zs = [mul_aa(ctx, x, y) for _ in range(140)]  # two requests each (triple, truncation pair)
    err = max(float((reveal(ctx, z) - xp * yp).abs().max()) for z in zs[::20])
    return torch.tensor(err), reveal(ctx, AShare(ltz(ctx, x).data, 0)), (xp < 0).double()


def test_split_adds_up_and_dealer_bytes_match_the_ledgers() -> None:
    def prog(ctx: Any) -> None:
        with ctx.cost.scope("op"):
            _work(ctx, 3000)

    res = run_in_process({SERVER0: prog, SERVER1: prog})
    s1 = res.costs[SERVER1].by_top_level()["op"]
    split = offline_online(s1.time_s, s1, res.costs[DEALER])
    wait = split["dealer_wait_s"]
    assert isinstance(wait, float) and 0.0 <= wait <= s1.time_s
    assert split["online_time_s"] == pytest.approx(s1.time_s - wait, abs=1e-9)
    assert res.costs[SERVER0].total().dealer_wait_s == 0.0  # server 0 never waits for the dealer
    # what the dealer sent = what the servers received from it (server 0: its key only), byte for byte
    sent = res.costs[DEALER].dealer_sent_bytes()
    recv = res.costs[SERVER0].total().dealer_recv_bytes + res.costs[SERVER1].total().dealer_recv_bytes
    assert sent == recv > 3000 * 8
    assert split["offline_bytes"] == s1.dealer_recv_bytes > 0
    gen = split["offline_time_s"]
    assert isinstance(gen, float) and gen > 0.0
    assert offline_online(1.0, s1)["offline_time_s"] is None  # without the dealer's ledger
    # the new ledger fields survive the JSON round trip; an old ledger (without them) still loads
    again = CostTracker.from_dict(json.loads(json.dumps(res.costs[SERVER1].to_dict())))
    assert again.total().dealer_wait_s == pytest.approx(res.costs[SERVER1].total().dealer_wait_s)
    old = {k: {f: v for f, v in d.items() if f not in ("dealer_wait_s", "dealer_recv_bytes")}
           for k, d in res.costs[SERVER1].to_dict().items()}
    assert CostTracker.from_dict(old).total().dealer_wait_s == 0.0


def test_preload_gives_the_same_results_with_no_online_wait() -> None:
    """Record one run's requests, preload them, run again: outputs as exact as without preloading (vs
    plaintext), no dealer wait in the online scope, and the request-log checks (every 256 requests, at close)
    pass; the same frames go to the dealer."""

    def plain(ctx: Any) -> tuple[torch.Tensor, ...]:
        _many(ctx, 50)
        with ctx.cost.scope("online"):
            return _many(ctx, 50)

    def pre(ctx: Any) -> tuple[torch.Tensor, ...]:
        ctx.dealer.record()
        _many(ctx, 50)
        reqs = ctx.dealer.recorded()
        assert len(reqs) > 256  # the preloaded run crosses a checkpoint
        with ctx.cost.scope("offline"):
            ctx.dealer.preload(reqs)
        with ctx.cost.scope("online"):
            return _many(ctx, 50)

    ref = run_in_process({SERVER0: plain, SERVER1: plain})
    got = run_in_process({SERVER0: pre, SERVER1: pre})
    for run in (ref, got):
        for r in (SERVER0, SERVER1):
            err, sign, want = run[r]
            assert float(err) < 1e-3 and torch.equal(sign, want)
    online = got.costs[SERVER1].by_top_level()["online"]
    assert online.dealer_wait_s == 0.0 and online.dealer_recv_bytes == 0
    offline = got.costs[SERVER1].by_top_level()["offline"]
    assert offline.dealer_recv_bytes == ref.costs[SERVER1].by_top_level()["online"].dealer_recv_bytes > 0
    assert got.costs[DEALER].dealer_sent_bytes() == ref.costs[DEALER].dealer_sent_bytes()


def test_preload_moves_references_inside_the_recording() -> None:
    """A recorded softmax names its own requests (a fixed mask ``fid``, ``cross`` products) and a session mask
    drawn before the recording (``wid``); preloaded at a later index, the names inside move and the session's
    stays: the preloaded run matches the recorded one exactly and needs no online dealer wait."""
    from secfwt.approx.exp import softmax
    from secfwt.protocols.arith import fix_weight, matmul_fixed

    g = torch.Generator().manual_seed(5)
    xp = 3 * torch.randn(4, 16, generator=g, dtype=torch.float64)
    wp = torch.randn(16, 16, generator=g, dtype=torch.float64)

    def prog(ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = AShare(ring.encode(xp, F), F) if ctx.rank == SERVER0 else AShare(torch.zeros(4, 16, dtype=torch.int64), F)
        w = fix_weight(ctx, AShare(ring.encode(wp, F) if ctx.rank == SERVER0 else torch.zeros(16, 16,
                                                                                               dtype=torch.int64), F))

        def run() -> torch.Tensor:
            return reveal(ctx, matmul_fixed(ctx, softmax(ctx, x), w))

        ctx.dealer.record()
        first = run()
        reqs = ctx.dealer.recorded()
        assert any(p.get("fid", -1) >= reqs.base for _, p in reqs) and any(p.get("cross") for _, p in reqs)
        with ctx.cost.scope("offline"):
            ctx.dealer.preload(reqs)
        with ctx.cost.scope("online"):
            second = run()
        return first, second

    res = run_in_process({SERVER0: prog, SERVER1: prog})
    first, second = res[SERVER0]
    want = torch.softmax(xp, -1) @ wp.T
    assert float((first - want).abs().max()) < 2e-3 and float((second - want).abs().max()) < 2e-3
    assert res.costs[SERVER1].by_top_level()["online"].dealer_wait_s == 0.0


def test_preloaded_fixed_weight_product_is_exact_and_precomputed() -> None:
    """A preloaded fixed-weight product gets A_i F^T in the offline phase (``af`` in the material) and its
    result on the ring is exactly the integer product x W^T (and x W), with wraparound: nothing changes but
    where the work is done."""
    from secfwt.protocols.arith import fix_weight, matmul_fixed

    g = torch.Generator().manual_seed(9)
    xi = torch.randint(-(2**63), 2**63 - 1, (3, 5, 8), generator=g, dtype=torch.int64)
    wi = torch.randint(-(2**63), 2**63 - 1, (8, 8), generator=g, dtype=torch.int64)
    xs = torch.randint(-(2**63), 2**63 - 1, xi.shape, generator=g, dtype=torch.int64)
    ws = torch.randint(-(2**63), 2**63 - 1, wi.shape, generator=g, dtype=torch.int64)

    def prog(ctx: Any) -> list[torch.Tensor]:
        x = AShare(xi - xs if ctx.rank == SERVER0 else xs, 0)
        w = fix_weight(ctx, AShare(wi - ws if ctx.rank == SERVER0 else ws, 0))
        out = []
        for transpose in (True, False):
            ctx.dealer.record()
            matmul_fixed(ctx, x, w, transpose=transpose, out_scale=0)
            reqs = ctx.dealer.recorded()
            ctx.dealer.preload(reqs)
            assert "af" in ctx.dealer._ahead[0][1].material
            out.append(reveal(ctx, matmul_fixed(ctx, x, w, transpose=transpose, out_scale=0)))
        return out

    res = run_in_process({SERVER0: prog, SERVER1: prog})
    for r in (SERVER0, SERVER1):
        got_t, got_n = res[r]
        assert torch.equal(got_t, ring.matmul(xi, wi.t())) and torch.equal(got_n, ring.matmul(xi, wi))


@pytest.mark.parametrize("ahead", ["preload", "prefetch"])
def test_preload_and_prefetch_refuse_another_sequence_and_unused_requests(ahead: str) -> None:
    def load(ctx: Any, reqs: Any) -> None:  # prefetch: window 0, so unused requests are still unsent
        if ahead == "preload":
            ctx.dealer.preload(reqs)
        else:
            ctx.dealer.prefetch(reqs, window=0)

    def other(ctx: Any) -> None:
        ctx.dealer.record()
        _work(ctx, 100)
        load(ctx, ctx.dealer.recorded())
        _work(ctx, 101)  # other shapes than preloaded / prefetched

    with pytest.raises(ProtocolMismatchError, match=r"request #\d+ is .* but the preloaded request"):
        run_in_process({SERVER0: other, SERVER1: other}, timeout=10)

    def unused(ctx: Any) -> None:
        ctx.dealer.record()
        _work(ctx, 100)
        load(ctx, ctx.dealer.recorded())

    with pytest.raises(ProtocolMismatchError, match="preloaded or prefetched dealer requests .* were never used"):
        run_in_process({SERVER0: unused, SERVER1: unused}, timeout=10)


@pytest.mark.parametrize("window", [0, 1 << 16, 1 << 30])
def test_prefetch_runs_the_dealer_ahead_with_the_same_results_and_frames(window: int) -> None:
    """Prefetching a recorded run (the dealer ahead of the servers, no offline phase): exact outputs as
    without it, references inside the recording moved (softmax: ``fid``, ``cross``) and the session's kept
    (``wid``), the request-log checkpoints and the final check pass, the dealer sends the same bytes; server 1
    has sent as many requests as the window allows (at least one) before it uses any, and every one by the
    end."""
    from secfwt.approx.exp import softmax
    from secfwt.protocols.arith import fix_weight, matmul_fixed

    g = torch.Generator().manual_seed(5)
    xp = 3 * torch.randn(4, 16, generator=g, dtype=torch.float64)
    wp = torch.randn(16, 16, generator=g, dtype=torch.float64)

    def prog(ctx: Any, ahead: bool) -> tuple[Any, ...]:
        x = AShare(ring.encode(xp, F), F) if ctx.rank == SERVER0 else AShare(torch.zeros(4, 16, dtype=torch.int64), F)
        w = fix_weight(ctx, AShare(ring.encode(wp, F) if ctx.rank == SERVER0 else torch.zeros(16, 16,
                                                                                               dtype=torch.int64), F))

        def run() -> tuple[torch.Tensor, ...]:
            return reveal(ctx, matmul_fixed(ctx, softmax(ctx, x), w)), *_many(ctx, 50)

        ctx.dealer.record()
        first = run()
        reqs = ctx.dealer.recorded()
        assert len(reqs) > 256  # the prefetched run crosses a checkpoint
        sent = None
        if ahead:
            ctx.dealer.prefetch(reqs, window=window)
            sent = len(ctx.dealer._ahead)
        with ctx.cost.scope("second"):
            second = run()
        assert not ctx.dealer._ahead and not ctx.dealer._plan
        return first, second, sent, len(reqs)

    ref = run_in_process({SERVER0: lambda c: prog(c, False), SERVER1: lambda c: prog(c, False)})
    got = run_in_process({SERVER0: lambda c: prog(c, True), SERVER1: lambda c: prog(c, True)})
    want = torch.softmax(xp, -1) @ wp.T
    for run in (ref, got):
        for r in (SERVER0, SERVER1):
            first, second, _, _ = run[r]
            for out in (first, second):
                assert float((out[0] - want).abs().max()) < 2e-3
                err, sign, sign_want = out[1:]
                assert float(err) < 1e-3 and torch.equal(sign, sign_want)
    _, _, sent, n = got[SERVER1]
    if window == 0:
        assert sent == 1
    elif window >= 1 << 30:
        assert sent == n
    else:
        assert 1 <= sent < n
    assert got[SERVER0][2] == 0  # server 0 sends nothing to the dealer: it draws at use
    assert got.costs[DEALER].dealer_sent_bytes() == ref.costs[DEALER].dealer_sent_bytes()


def test_prefetch_refuses_a_second_prefetch_over_unused_requests() -> None:
    def twice(ctx: Any) -> None:
        ctx.dealer.record()
        _work(ctx, 100)
        reqs = ctx.dealer.recorded()
        ctx.dealer.prefetch(reqs)
        ctx.dealer.prefetch(reqs)

    with pytest.raises(RuntimeError, match=r"prefetch\(\) while \d+ earlier preloaded or prefetched"):
        run_in_process({SERVER0: twice, SERVER1: twice}, timeout=10)


def test_report_keys_kept_and_split_keys_added(demo_ev: Any, demo_data: Any) -> None:
    from secfwt.tuning.fot import TuneConfig, tune
    from secfwt.tuning.report import REPORT_KEYS, SPLIT_KEYS, report_dict, split_table

    res = tune(demo_ev, demo_data, TuneConfig(d=8, n_prompt=2, popsize=4, iterations=1), progress=False)
    assert tuple(report_dict(res)) == REPORT_KEYS

    def prog(ctx: Any) -> None:
        _work(ctx, 200)

    run = run_in_process({SERVER0: prog, SERVER1: prog})
    costs = {r: run.costs[r].to_dict() for r in (SERVER0, SERVER1)}
    rep = report_dict(res, costs)
    assert tuple(rep) == REPORT_KEYS + SPLIT_KEYS
    assert rep["offline_bytes"] == run.costs[SERVER1].total().dealer_recv_bytes > 0
    assert rep["online_time_s"] == pytest.approx(max(0.0, res.time_s - rep["dealer_wait_s"]), abs=2e-3)
    assert rep["offline_time_s"] is None and rep["cpu"] == cpu_model() and "cores" in rep["cpu"]
    assert split_table(costs, res.time_s).row_count == 3


def test_malloc_setup_is_idempotent_and_a_noop_without_glibc() -> None:
    calls: list[tuple[int, int]] = []

    def fake_mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return 1

    assert alloc.apply_settings(None, {}) is False  # no mallopt (not glibc): nothing happens
    assert alloc.apply_settings(fake_mallopt, {alloc.OFF_ENV: "default"}) is False and calls == []
    assert alloc.apply_settings(fake_mallopt, {"MALLOC_ARENA_MAX": "8"}) is True
    assert calls == [(p, v) for p, n, v in alloc.MALLOC_SETTINGS if n != "MALLOC_ARENA_MAX"]  # the user's wins
    assert alloc.apply_settings(lambda p, v: 0, {}) is False  # glibc refused one
    first = alloc.configure_malloc()
    assert alloc.configure_malloc() is first  # idempotent
    env = alloc.malloc_env({"MALLOC_TOP_PAD_": "1"})
    assert "MALLOC_TOP_PAD_" not in env and env["MALLOC_MMAP_THRESHOLD_"] == str(32 * 2**20)
    assert alloc.malloc_env({alloc.OFF_ENV: "default"}) == {}
    # a child with these settings (what PartyProcesses gives) allocates and frees large tensors normally
    code = ("import torch; from secfwt.alloc import configure_malloc; ok = configure_malloc(); "
            "[torch.ones(2**24).sum() for _ in range(3)]; print(ok)")
    out = subprocess.run([sys.executable, "-c", code], env={**alloc.malloc_env(), "PATH": ""}, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() in ("True", "False")


def _fake_run(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"cpu": "test", "rows": rows}


def test_before_after_table_from_two_result_files(tmp_path: Path) -> None:
    """A base run without the online/offline fields prints "-"; exact fields and median times get ratios."""
    base_rows = [{"op": "mul", "time_s": 2.0, "bytes_per_server": 9_000_000, "rounds": 2},
                 {"op": "ltz", "time_s": 4.0, "bytes_per_server": 8_000_000, "rounds": 6}]
    new_rows = [{"op": "mul", "time_s": 1.0, "bytes_per_server": 9_000_000, "rounds": 2, "online_time_s": 0.5,
                 "offline_time_s": 0.25, "offline_bytes": 4_000_000},
                {"op": "ltz", "time_s": 3.0, "bytes_per_server": 4_000_000, "rounds": 6, "online_time_s": 2.0,
                 "offline_time_s": 1.0, "offline_bytes": 1_000_000}]
    files = []
    for i, rows in enumerate((base_rows, new_rows)):
        p = tmp_path / f"{i}.json"
        p.write_text(json.dumps(_fake_run(rows)))
        files.append(json.loads(p.read_text()))
    slower = [dict(r, time_s=r["time_s"] * 3) for r in new_rows]
    base = before_after.merge_runs([files[0], files[0]])
    new = before_after.merge_runs([files[1], _fake_run(slower), files[1]])
    assert base["mul"]["online_time_s"] is None and new["mul"]["time_s"] == 1.0  # median of 1, 3, 1
    text = before_after.table(base, new)
    lines = text.splitlines()
    assert len(lines) == 4
    mul = [c.strip() for c in lines[2].strip("|").split("|")]
    # row | MB base new ratio | rounds base new ratio | offline MB base new ratio | time ... | online ... | offline s
    assert mul[:4] == ["mul", "9.00", "9.00", "1.000"]
    assert mul[4:7] == ["2", "2", "1.000"]
    assert mul[7:10] == ["-", "4.00", "-"]
    assert mul[10:13] == ["2.000", "1.000", "0.500"]
    assert mul[13:16] == ["-", "0.500", "-"]
    ltz_row = [c.strip() for c in lines[3].strip("|").split("|")]
    assert ltz_row[1:4] == ["8.00", "4.00", "0.500"]
    varies = before_after.merge_runs([files[1], _fake_run([dict(new_rows[0], rounds=3)])])
    assert varies["mul"]["rounds"] == "varies" and "varies" in before_after.table(varies, varies)


def test_dealer_material_replays_a_recording_by_kind() -> None:
    """benchmarks/dealer_material.py's replay: every kind of a recorded run (a comparison with products, a
    softmax with masked truncations and a fixed-weight product) is generated again off-line, timed per kind."""
    from secfwt.approx.exp import softmax
    from secfwt.protocols.arith import fix_weight, matmul_fixed
    from secfwt.protocols.compare import ltz_select

    def prog(ctx: Any) -> Any:
        x = AShare(torch.zeros(4, 16, dtype=torch.int64), F)
        w = fix_weight(ctx, AShare(torch.zeros(16, 16, dtype=torch.int64), F))
        ctx.dealer.record()
        matmul_fixed(ctx, softmax(ctx, x), w)
        ltz_select(ctx, x, 2, bits=32)
        mul_aa(ctx, x, x)
        return ctx.dealer.recorded()

    reqs = run_in_process({SERVER0: prog, SERVER1: prog})[SERVER1]
    secs = dealer_material.replay(list(reqs), reqs.base)
    assert set(secs) == {k for k, _ in reqs} >= {"compare_sel", "mtrunc", "wmatmul", "mul"}
    assert all(v >= 0.0 for v in secs.values())
