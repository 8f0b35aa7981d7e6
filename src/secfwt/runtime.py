"""Running the parties: key set-up, role dispatch, and the in-process (threads) runner.

The same role code runs in both modes; only the communicator differs (:mod:`secfwt.comm.local` or
:mod:`secfwt.comm.tcp`). At start every party runs :func:`setup_keys`, which distributes fresh PRG keys over
the (authenticated, encrypted) channels: dealer->server0, dealer->server1, owner->server0, server0->server1.
If a party fails, it sends an abort message to every peer, so they stop at once with a clear error.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from secfwt.comm.base import DEALER, OWNER, PARTY_NAMES, SERVER0, SERVER1, Communicator
from secfwt.comm.local import LocalHub
from secfwt.context import FixedPoint, PartyContext
from secfwt.cost import CostTracker
from secfwt.dealer import DealerClient, serve
from secfwt.errors import SecfwtError
from secfwt.prg import KEY_BYTES, PRG, new_key

Program = Callable[[PartyContext], Any]


def _send_key(comm: Communicator, peer: int, tag: str) -> bytes:
    key = new_key()
    comm.send(peer, tag, torch.frombuffer(bytearray(key), dtype=torch.uint8))
    return key


def _recv_key(comm: Communicator, peer: int, tag: str) -> bytes:
    return bytes(comm.recv(peer, tag, shape=(KEY_BYTES,), dtype=torch.uint8).tolist())


def setup_keys(rank: int, comm: Communicator, fxp: FixedPoint, with_owner: bool) -> PartyContext:
    """Distribute PRG keys and build this party's context (dealer: a context without a DealerClient)."""
    with comm.cost.scope("setup"):
        if rank == DEALER:
            k0 = _send_key(comm, SERVER0, "key/dealer")
            k1 = _send_key(comm, SERVER1, "key/dealer")
            ctx = PartyContext(rank, comm, fxp)
            ctx.dealer_keys = (PRG(k0), PRG(k1))  # type: ignore[attr-defined]
            return ctx
        if rank == OWNER:
            ko = _send_key(comm, SERVER0, "key/owner")
            return PartyContext(rank, comm, fxp, prg_owner=PRG(ko))
        kd = _recv_key(comm, DEALER, "key/dealer")
        ko_prg = PRG(_recv_key(comm, OWNER, "key/owner")) if (with_owner and rank == SERVER0) else None
        kp = _send_key(comm, SERVER1, "key/peer") if rank == SERVER0 else _recv_key(comm, SERVER0, "key/peer")
        return PartyContext(
            rank, comm, fxp, dealer=DealerClient(rank, comm, PRG(kd)), prg_owner=ko_prg, prg_peer=PRG(kp)
        )


CLOSED = "session/closed"  # server -> owner after the dealer's final request-log check passed


def run_party(
    rank: int,
    comm: Communicator,
    program: Program | None,
    fxp: FixedPoint,
    with_owner: bool,
    dealer_idle_timeout: float | None = None,
) -> Any:
    """Run one party to completion; on failure, abort the peers and re-raise."""
    peers = [SERVER0, SERVER1, DEALER] + ([OWNER] if with_owner else [])
    try:
        ctx = setup_keys(rank, comm, fxp, with_owner)
        if rank == DEALER:
            k0, k1 = ctx.dealer_keys  # type: ignore[attr-defined]
            return serve(comm, k0, k1, idle_timeout=dealer_idle_timeout)
        assert program is not None, f"no program for {PARTY_NAMES[rank]}"
        result = program(ctx)
        if ctx.dealer is not None:
            ctx.dealer.close()  # the final request-log check (dealer.py): a mismatch raises here
        if with_owner and rank in (SERVER0, SERVER1):
            comm.send_json(OWNER, CLOSED, {"checked": True})
        elif rank == OWNER:
            for s in (SERVER0, SERVER1):  # the owner's results count only once the servers' final check passed
                comm.recv_json(s, CLOSED)
        return result
    except BaseException as e:
        # The data owner's messages may name its data (a file line, a value out of range): its peers learn only
        # the kind of error. A server's or the dealer's message is about shapes and protocol steps.
        comm.abort(type(e).__name__ if rank == OWNER else f"{type(e).__name__}: {e}", peers)
        raise


@dataclass
class RunResult:
    """Results and costs of every party of one run."""

    results: dict[int, Any] = field(default_factory=dict)
    costs: dict[int, CostTracker] = field(default_factory=dict)

    def __getitem__(self, rank: int) -> Any:
        return self.results[rank]


def run_in_process(
    programs: dict[int, Program],
    fxp: FixedPoint | None = None,
    timeout: float = 60.0,
) -> RunResult:
    """Run the servers (and the data owner, if it has a program) as threads of this process.

    ``programs`` maps SERVER0, SERVER1 and optionally OWNER to functions of the party context. The dealer
    always runs. Raises the first party's error (others fail fast through the abort message).
    """
    fxp = fxp or FixedPoint()
    with_owner = OWNER in programs
    ranks = [SERVER0, SERVER1, DEALER] + ([OWNER] if with_owner else [])
    hub = LocalHub(ranks)
    comms = {r: hub.communicator(r, timeout=timeout) for r in ranks}
    out = RunResult()
    errors: dict[int, BaseException] = {}
    tbs: dict[int, str] = {}

    def target(r: int) -> None:
        try:
            out.results[r] = run_party(r, comms[r], programs.get(r), fxp, with_owner)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[r] = e
            tbs[r] = traceback.format_exc()

    threads = [threading.Thread(target=target, args=(r,), name=PARTY_NAMES[r], daemon=True) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.costs = {r: comms[r].cost for r in ranks}
    if errors:
        # The root cause is the error that is not a reaction to another party's abort.
        from secfwt.errors import PeerAbortedError

        primary = [r for r, e in errors.items() if not isinstance(e, PeerAbortedError)]
        r = primary[0] if primary else next(iter(errors))
        err = errors[r]
        if isinstance(err, SecfwtError | AssertionError | ValueError | TypeError | RuntimeError):
            raise err
        raise RuntimeError(f"{PARTY_NAMES[r]} failed:\n{tbs[r]}") from err
    return out
