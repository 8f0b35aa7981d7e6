"""Running the parties of a private job: in-process threads, or every party in its own OS process talking
mutually authenticated TLS (:func:`run_parties`; encoders and decoders alike).

``parties="local"``: certificates and a loopback parties file are made in a temporary directory, the two
servers and the dealer are started as subprocesses (``secfwt party``) and the data owner runs in this process.
``parties=PATH``: a parties file whose servers and dealer were started on their hosts with
``secfwt party --config PATH --role server0 --shares server0.safetensors`` (and server1, dealer); this process
is the data owner.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from secfwt.comm.base import DEALER, OWNER, SERVER0, SERVER1
from secfwt.context import FixedPoint
from secfwt.launch import PartyProcesses, load_parties_config, write_local_config
from secfwt.runtime import run_in_process, run_party
from secfwt.serve.entry import shares_dir_program

SERVER_PROGRAM = "secfwt.serve.entry:serve_from_env"


def _run_owner(config: Path, owner: Any) -> Any:
    cfg = load_parties_config(config)
    ranks = [SERVER0, SERVER1, DEALER, OWNER]
    comm = cfg.communicator(OWNER, ranks, sid=secrets.token_hex(8))  # a fresh random id for each session
    try:
        return run_party(OWNER, comm, owner, cfg.fxp, with_owner=True)
    finally:
        comm.close()


def run_with_processes(spec: Any, shares: Path, owner: Any, parties: str) -> Any:
    """Run the data owner here and the other parties as processes (``local``) or on their hosts (a file).
    The servers run :func:`secfwt.serve.entry.serve_from_env`: encoder or decoder, as the share file says."""
    if parties != "local":
        return _run_owner(Path(parties), owner)
    with tempfile.TemporaryDirectory(prefix="secfwt-parties-") as tmp:
        # The connection window includes the party processes' start-up (Python, torch, the share file):
        # up to 120 s (within the run's timeout) so that a loaded machine does not fail the set-up.
        config = write_local_config(Path(tmp), timeout=spec.timeout, frac_bits=spec.frac_bits,
                                    connect_timeout=max(30.0, min(float(spec.timeout), 120.0)))
        env = {"SECFWT_SHARES_DIR": str(shares)}
        progs = {SERVER0: SERVER_PROGRAM, SERVER1: SERVER_PROGRAM}
        with PartyProcesses(progs, config, env=env, external=[OWNER], threads_per_party=1) as procs:
            result = _run_owner(config, owner)
            # PartyProcesses.wait counts from the start of the processes: give the servers and the dealer
            # 600 s to exit after the owner's job, however long the job took (was a fixed 600 s in total,
            # which killed every run longer than 10 minutes after its last result).
            procs.wait(timeout=time.monotonic() - procs.started + 600)
        return result


def run_parties(spec: Any, shares: Path, owner: Any, parties: str = "inprocess") -> Any:
    """The owner's program with the servers on ``shares`` (encoder or decoder) and the dealer: threads of this
    process (``inprocess``), TLS processes (``local``) or the hosts of a parties file. Returns the owner's
    result."""
    if parties == "inprocess":
        servers = shares_dir_program(shares)
        res = run_in_process({SERVER0: servers, SERVER1: servers, OWNER: owner}, fxp=FixedPoint(spec.frac_bits),
                             timeout=spec.timeout)
        return res[OWNER]
    return run_with_processes(spec, shares, owner, parties)
