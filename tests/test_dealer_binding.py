"""The dealer is no unmasking oracle: each request's randomness is bound to (index, kind, params), the parties
compare request logs (dealer-tagged) at checkpoints and at close, the dealer validates requests, and server 1
checks the shape and dtype of every correction. A deviating server 1 or dealer stops every party."""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest
import torch

from helpers import mine, split
from secfwt import ring
from secfwt.comm.base import DEALER, SERVER0, SERVER1, Communicator
from secfwt.comm.local import LocalHub
from secfwt.context import FixedPoint, PartyContext
from secfwt.correlations import MAX_ELEMENTS, check_request, draws
from secfwt.dealer import CHECK_EVERY, DealerClient, Pending, canonical_request, request_stream
from secfwt.errors import PeerAbortedError, ProtocolMismatchError
from secfwt.protocols.arith import mul_aa
from secfwt.protocols.compare import ltz
from secfwt.runtime import run_in_process, run_party, setup_keys
from secfwt.share import AShare, open_many, reveal_ring

F = 16


def ring_rand(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, shape, generator=g, dtype=torch.int64)


def run_all(programs: dict[int, Any], dealer: Any = None, timeout: float = 20.0):
    """Run both servers and the dealer as threads; return every party's result and error (no party may hang).
    ``dealer``: a function of the dealer's communicator replacing the honest dealer (a deviating dealer)."""
    ranks = [SERVER0, SERVER1, DEALER]
    hub = LocalHub(ranks)
    comms = {r: hub.communicator(r, timeout=timeout) for r in ranks}
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}

    def target(r: int) -> None:
        try:
            if r == DEALER and dealer is not None:
                results[r] = dealer(comms[r])
            else:
                results[r] = run_party(r, comms[r], programs.get(r), FixedPoint(F), with_owner=False)
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            errors[r] = e

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * timeout)
    assert not any(t.is_alive() for t in threads), "a party hangs"
    return results, errors


class Forger(DealerClient):
    """A deviating server 1: at request ``target`` it asks the dealer for ``fake`` (kind, params) instead of the
    request the protocol makes, draws its own material for the real request honestly, logs the real request
    (so its own log looks honest to server 0) and keeps the dealer's answer and its own parts of the fake."""

    def __init__(self, client: DealerClient, target: int, fake_kind: str, fake_params: dict[str, Any]) -> None:
        super().__init__(SERVER1, client.comm, client.prg)
        self.target, self.fake_kind, self.fake_params = target, fake_kind, fake_params
        self.answer: dict[str, torch.Tensor] = {}
        self.fake_own: dict[str, torch.Tensor] = {}

    def request(self, kind: str, **params: Any) -> Pending:
        if self.index != self.target:
            return super().request(kind, **params)
        i = self.index
        canon, layout = check_request(kind, params, i)
        fake, fake_layout = check_request(self.fake_kind, self.fake_params, i)
        line = canonical_request(i, kind, canon)
        material = draws(kind)[1](canon, request_stream(self.prg, line))  # honest own parts of the real request
        fake_line = canonical_request(i, self.fake_kind, fake)
        self.fake_own = draws(self.fake_kind)[1](fake, request_stream(self.prg, fake_line))
        self.comm.send_json(DEALER, "dealer/req", {"kind": self.fake_kind, "params": fake, "index": i})
        forged = Pending(self, i, self.fake_kind, {}, fake_layout, done=False)
        self._queue.append(forged)
        self.answer = forged.get()
        for name, (shape, dtype) in layout.items():
            material[name] = torch.zeros(shape, dtype=dtype)  # carry on with garbage
        self._advance(line)
        return Pending(self, i, kind, material, {}, done=True)


def forging(program: Any, target: int, fake_kind: str, fake_params: dict[str, Any], box: dict[str, Any]) -> Any:
    """Server 1's program with a :class:`Forger` in place of its dealer client (kept in ``box``)."""
    def prog(ctx: PartyContext) -> Any:
        assert ctx.dealer is not None
        ctx.dealer = box["forger"] = Forger(ctx.dealer, target, fake_kind, fake_params)
        return program(ctx)
    return prog


def assert_all_stopped(errors: dict[int, BaseException], cause: type, match: str) -> None:
    """The deviation's victim raised ``cause`` matching ``match`` (one line); every other party was aborted."""
    primary = [r for r, e in errors.items() if not isinstance(e, PeerAbortedError)]
    assert len(primary) == 1, errors
    err = errors[primary[0]]
    assert isinstance(err, cause) and "\n" not in str(err), repr(err)
    assert re.search(match, str(err)), str(err)
    assert set(errors) == {SERVER0, SERVER1, DEALER}, errors
    for r, e in errors.items():
        if r != primary[0]:
            assert isinstance(e, PeerAbortedError), repr(e)


# -- honest runs ------------------------------------------------------------------------------------------


def test_honest_mul_and_compare_exact_with_checkpoints():
    n = 40
    x, y = ring_rand((n,), 1), ring_rand((n,), 2)
    xs, ys = split(x, encoded=True, seed=3), split(y, encoded=True, seed=4)
    rounds = CHECK_EVERY // 2 + 3  # 2 requests per round: checkpoint #256 passes mid-run

    def prog(ctx):
        X, Y = AShare(xs[ctx.rank].clone(), 0), AShare(ys[ctx.rank].clone(), 0)
        outs = []
        for _ in range(rounds):
            outs.append(reveal_ring(ctx, mul_aa(ctx, X, Y)))  # scale 0: exact ring product, no truncation
            outs.append(reveal_ring(ctx, ltz(ctx, X)))
        return torch.stack(outs), ctx.dealer.index

    res = run_in_process({SERVER0: prog, SERVER1: prog}, fxp=FixedPoint(F), timeout=30)
    got, index = res[SERVER0]
    assert index == 2 * rounds > CHECK_EVERY
    want = torch.stack([x * y, (x < 0).to(torch.int64)] * rounds)
    assert torch.equal(got, want) and torch.equal(res[SERVER1][0], want)
    checks = {k: v for k, v in res.costs[SERVER0].ops.items() if k.endswith("dealer_check")}
    assert sum(c.rounds for c in checks.values()) == 2  # the checkpoint at 256 and the close
    assert sum(c.dealer_bytes for k, c in res.costs[SERVER0].ops.items() if k != "setup") == 0


# -- a deviating server 1 ---------------------------------------------------------------------------------


def _muls(count: int, n: int = 4):
    xs, ys = split(torch.arange(n, dtype=torch.float64)), split(torch.ones(n))

    def prog(ctx):
        X, Y = mine(ctx, xs), mine(ctx, ys)
        for _ in range(count):
            mul_aa(ctx, X, Y, out_scale=2 * F)  # one request each
        return "done"
    return prog


@pytest.mark.parametrize("fake_kind,fake_params", [
    ("bit2a", {"shape": [4]}),  # another kind
    ("mul", {"a": [4], "b": [1]}),  # the same kind, other parameters (the answer has the same layout)
])
def test_a_server_lying_to_the_dealer_stops_every_party_at_close(fake_kind, fake_params):
    box: dict[str, Any] = {}
    prog = _muls(3)
    results, errors = run_all({SERVER0: prog, SERVER1: forging(prog, 1, fake_kind, fake_params, box)})
    assert box["forger"].answer  # the dealer did answer the forged request
    assert_all_stopped(errors, ProtocolMismatchError,
                       r"^server0: the dealer served other requests than server0 drew: the request logs first "
                       r"differ at checkpoint #3 \(requests #0\.\.#2; the first checkpoint\)$")
    assert SERVER0 not in results


def test_a_lie_is_caught_at_a_periodic_checkpoint_before_the_run_ends():
    total = 2 * CHECK_EVERY + 40
    progress: dict[int, int] = {}

    def prog(ctx):
        for i in range(total):
            ctx.dealer.request("bit2a", shape=[1]).get()
            progress[ctx.rank] = i
        return "done"

    box: dict[str, Any] = {}
    _, errors = run_all({SERVER0: prog, SERVER1: forging(prog, 3, "bit2a", {"shape": [2]}, box)})
    # The dealer's tag of checkpoint #256 reaches server 0 at the next checkpoint, #512 (request #511).
    assert_all_stopped(errors, ProtocolMismatchError, r"first differ at checkpoint #256 \(requests #0\.\.#255;")
    assert progress[SERVER0] == 2 * CHECK_EVERY - 2 < total - 1


def _attack(n: int, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Run the attack once on secret ``x``; return the attacker's estimate of x (ring elements)."""
    xs, ws = split(x, encoded=True, seed=seed + 100), split(ring_rand((n,), 5), encoded=True, seed=6)
    box: dict[str, Any] = {}

    def server0(ctx):
        mul_aa(ctx, AShare(ws[0].clone(), 0), AShare(xs[0].clone(), 0))  # scale 0: no truncation

    def attacker(ctx):
        mat = ctx.dealer.request("mul", a=[n], b=[n]).material
        _, f = open_many(ctx, [ws[1] - mat["a"], xs[1] - mat["b"]], "mul")  # f = x - b, opened honestly
        forger = box["forger"]
        b0_est = forger.fake_own["sb"] - forger.answer["sa"]  # sb1 - ((sb0 ^ sb1) - b0) = b0 (up to one bit)
        box["estimate"] = f + b0_est + mat["b"]

    _, errors = run_all({SERVER0: server0, SERVER1: forging(attacker, 0, "bit2a", {"shape": [n]}, box)})
    assert_all_stopped(errors, ProtocolMismatchError, "the dealer served other requests than server0 drew")
    return box["estimate"]


def test_the_attack_that_unmasked_a_secret_before_binding_learns_nothing_now():
    """Server 0 multiplies w * x (secret x). At that request server 1 asks the dealer for bit2a of the same
    size. Before binding, server 0's material was stream i whatever the kind: sb0 = a0 & 1 and sa0 = b0, so the
    answer (sb0 ^ sb1) - sa0 gave b0 up to one bit and x = f + b0 + b1 from the opening f = x - b: the estimate
    was within 1 ring unit of x (checked at the commit before binding). With binding it is unrelated to x."""
    n = 64
    estimates = {}
    for trial, seed in enumerate((10, 11)):
        x = ring_rand((n,), seed)  # the secret: two different ones
        estimates[trial] = (_attack(n, x, seed), x)
    for est, x in estimates.values():
        err = est - x
        assert int((err.abs() <= 1).sum()) == 0  # before binding: all n within 1
        # The error is spread over the whole ring: each |err| < 2^56 with probability 2^-7 (0.5 of 64 expected);
        # at most 8 fails a uniform error with probability ~1e-9 (at most 2, as before, failed ~3% of runs).
        assert int((err.abs() < 2**56).sum()) <= 8
    # The attacker's error does not follow the secret: its view is as uniform for one secret as for the other.
    (e0, x0), (e1, x1) = estimates[0], estimates[1]
    assert not torch.equal(e0 - x0, e1 - x1)
    assert int(((e0 - e1) == (x0 - x1)).sum()) == 0


# -- the dealer validates requests ------------------------------------------------------------------------


@pytest.mark.parametrize("req,match", [
    ({"index": 0, "kind": "mul", "params": {"a": [2**21, 2**10], "b": [1]}},
     rf"^dealer: request #0 \(mul\): {2**32 + 1} elements \(parameter shapes plus corrections\), "
     rf"the dealer's cap is {MAX_ELEMENTS}$"),
    ({"index": 0, "kind": "bit2a", "params": {"shape": [2**40]}}, r"the dealer's cap is"),
    ({"index": 0, "kind": "bit2a", "params": {"shape": [-3]}},
     r"^dealer: request #0 \(bit2a\): parameter 'shape': expected a list of at most 16 non-negative ints, "
     r"got \[-3\]$"),
    ({"index": 0, "kind": "trunc", "params": {"shape": [2.0], "bits": 16}}, r"parameter 'shape'.*got \[2\.0\]"),
    ({"index": 0, "kind": "trunc", "params": {"shape": [2], "bits": True}}, r"'bits': expected an int in \[1, 63\]"),
    ({"index": 0, "kind": "reveal_b0", "params": {}}, r"unknown correlation kind 'reveal_b0'"),
    ({"index": 0, "kind": "mul", "params": {"a": [3], "b": [4]}}, r"\(mul\): shapes do not fit"),
    ({"index": 0, "kind": "mul", "params": {"a": [3]}}, r"parameter 'b' is missing"),
    ({"index": 0, "kind": "square", "params": {"a": [3], "seed": 1}}, r"unknown parameter\(s\) \['seed'\]"),
    ({"index": 0, "kind": "compare", "params": {"shape": [2, 2]}}, r"'shape' must be 1-D"),
    (["mul"], r"^dealer: malformed request \['mul'\] \(expected index, kind, params\)$"),
])
def test_the_dealer_rejects_malformed_and_oversize_requests(req, match):
    def server1(ctx):
        ctx.comm.send_json(DEALER, "dealer/req", req)  # a deviating server 1, bypassing its own checks
        ctx.comm.recv(DEALER, "dealer/anything")

    def server0(ctx):
        ctx.comm.recv(SERVER1, "anything")

    _, errors = run_all({SERVER0: server0, SERVER1: server1})
    assert_all_stopped(errors, ProtocolMismatchError, match)


def test_servers_check_their_own_requests_the_same_way():
    with pytest.raises(ProtocolMismatchError, match=r"^server0: request #7 \(mul\): shapes do not fit"):
        check_request("mul", {"a": [2, 3], "b": [4, 5], "op": "matmul"}, 7, "server0")
    canon, layout = check_request("mul", {"a": (2, 3), "b": torch.Size([3, 5]), "op": "matmul"}, 0)
    assert canon == {"a": [2, 3], "b": [3, 5], "op": "matmul"} and layout == {"c": ((2, 5), torch.int64)}
    assert check_request("mul", {"a": [2], "b": [2]}, 0)[0]["op"] == "mul"  # defaults are part of the binding


# -- server 1 checks the dealer's corrections -------------------------------------------------------------


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(6, dtype=torch.int64), r"expected shape \(5,\), got \(6,\)$"),
    (torch.zeros(5, dtype=torch.int32), r"expected dtype torch\.int64, got torch\.int32$"),
])
def test_a_wrong_correction_from_the_dealer_is_rejected_by_server1(bad, match):
    def dealer(comm: Communicator) -> None:
        try:
            setup_keys(DEALER, comm, FixedPoint(F), with_owner=False)
            comm.recv_json(SERVER1, "dealer/req")
            comm.send(SERVER1, "dealer/bit2a/sa", bad)
            comm.recv_json(SERVER1, "dealer/req")
        except BaseException as e:
            comm.abort(f"{type(e).__name__}: {e}", [SERVER0, SERVER1])
            raise

    def prog(ctx):
        sa = ctx.dealer.request("bit2a", shape=[5]).get()["sa"]
        open_many(ctx, [sa], "bit2a")

    _, errors = run_all({SERVER0: prog, SERVER1: prog}, dealer=dealer)
    assert_all_stopped(errors, ProtocolMismatchError,
                       r"^server1: dealer answer to request #0 \(bit2a\): 'dealer/bit2a/sa' from dealer: " + match)


def test_decoded_values_still_match_plaintext_after_binding():
    xs, ys = split(torch.tensor([1.5, -2.25, 3.0])), split(torch.tensor([2.0, 4.0, -0.5]))

    def prog(ctx):
        return ring.decode(reveal_ring(ctx, mul_aa(ctx, mine(ctx, xs), mine(ctx, ys))), F)

    got = run_in_process({SERVER0: prog, SERVER1: prog}, fxp=FixedPoint(F))[SERVER0]
    assert torch.equal(got, torch.tensor([3.0, -9.0, -1.5], dtype=torch.float64))


def test_the_data_owner_gets_no_result_when_the_final_check_fails():
    """The owner returns only once both servers report that the dealer's final request-log check passed: a
    lie caught at close reaches the owner as an error, not as results."""
    from secfwt.comm.base import OWNER
    from secfwt.runtime import run_in_process

    box: dict[str, Any] = {}
    prog = _muls(3)
    with pytest.raises(ProtocolMismatchError, match="request logs first differ"):
        run_in_process({SERVER0: prog, SERVER1: forging(prog, 1, "bit2a", {"shape": [4]}, box),
                        OWNER: lambda ctx: "results"}, FixedPoint(F), timeout=20)
    honest = run_in_process({SERVER0: prog, SERVER1: prog, OWNER: lambda ctx: "results"}, FixedPoint(F), timeout=20)
    assert honest[OWNER] == "results"
