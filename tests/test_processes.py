"""Real OS processes over TLS on loopback: exact results, costs equal to the in-process run, failures."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import mpc_programs as progs
from secfwt.comm.base import DEALER, OWNER, SERVER0, SERVER1
from secfwt.cost import CostTracker
from secfwt.errors import ConfigError
from secfwt.launch import (
    PartyProcessError,
    PartyProcesses,
    load_parties_config,
    run_processes,
    write_local_config,
)
from secfwt.runtime import run_in_process


def _ledger(cost: CostTracker) -> dict[str, tuple[int, int, int, int, int]]:
    """Everything of a cost ledger except wall time."""
    return {k: (v.calls, v.bytes_sent, v.bytes_recv, v.rounds, v.dealer_bytes) for k, v in cost.ops.items()}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_local_config(tmp_path_factory.mktemp("parties"), timeout=20.0, connect_timeout=60.0)


def test_mul_matmul_ltz_exact_and_costs_match_in_process(config: Path) -> None:
    ref = "mpc_programs:servers"
    programs = {SERVER0: ref, SERVER1: ref, OWNER: "mpc_programs:owner"}
    res = run_processes(programs, config, timeout=180, threads_per_party=1)
    want = progs.expected()
    for r in (SERVER0, SERVER1):
        for k, v in want.items():
            assert torch.equal(res[r][k], v), (r, k)
    local = run_in_process({SERVER0: progs.servers, SERVER1: progs.servers, OWNER: progs.owner})
    assert set(res.costs) == {SERVER0, SERVER1, DEALER, OWNER}
    for r in res.costs:
        assert _ledger(res.costs[r]) == _ledger(local.costs[r]), r
    assert res.costs[SERVER0].total().rounds > 0 and res.costs[SERVER1].total().dealer_bytes > 0


@pytest.mark.slow
def test_three_parties_without_owner(config: Path) -> None:
    ref = "mpc_programs:servers_no_owner"
    res = run_processes({SERVER0: ref, SERVER1: ref}, config, timeout=180, threads_per_party=1)
    assert torch.equal(res[SERVER0], progs.expected_sq()) and torch.equal(res[SERVER1], progs.expected_sq())
    local = run_in_process({SERVER0: progs.servers_no_owner, SERVER1: progs.servers_no_owner})
    for r in (SERVER0, SERVER1, DEALER):
        assert _ledger(res.costs[r]) == _ledger(local.costs[r])


def test_killed_server_stops_every_party(config: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    ref = "mpc_programs:slow_servers"
    with PartyProcesses({SERVER0: ref, SERVER1: ref, OWNER: "mpc_programs:slow_owner"}, config,
                        out_dir=tmp_path / "run", env={progs.MARKER_ENV: str(marker)}, threads_per_party=1) as procs:
        deadline = time.monotonic() + 120  # generous: the test machine may be busy
        while not Path(f"{marker}.server1").exists():
            assert time.monotonic() < deadline, "the run did not start"
            assert all(p.poll() is None for p in procs.procs.values()), procs.stderr_tail(SERVER0)
            time.sleep(0.05)
        procs.procs[SERVER1].kill()
        t0 = time.monotonic()
        with pytest.raises(PartyProcessError, match="server1 failed \\(killed by SIGKILL\\)") as err:
            procs.wait(timeout=180, grace=30)
        elapsed = time.monotonic() - t0
        # Everyone else noticed on their own (exit code 2 = a clear secfwt error) within the message timeout.
        assert elapsed < procs.cfg.timeout
        for r in (SERVER0, DEALER, OWNER):
            assert procs.procs[r].returncode == 2, (r, procs.stderr_tail(r))
            tail = procs.stderr_tail(r, 1)
            assert tail.startswith("secfwt party: error:") and "server" in tail, tail
        assert "server1 closed the connection" in procs.stderr_tail(SERVER0)
        assert "server0: " in str(err.value) and "dealer: " in str(err.value)
    assert all(p.poll() is not None for p in procs.procs.values())


def test_config_errors_name_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('timeout = "soon"\n[parties.server0]\nhost = "h"\nport = 1\n')
    with pytest.raises(ConfigError, match=r"p.toml: field 'timeout': expected float, got 'soon' \(str\)"):
        load_parties_config(path)
    path.write_text('[parties.server0]\nhost = "h"\nport = 70000\n')
    with pytest.raises(ConfigError, match=r"'parties.server0.port': expected an integer in \[1, 65535\]"):
        load_parties_config(path)
    path.write_text('[parties.server0]\nhost = "h"\nport = 1\n[parties.mallory]\n')
    with pytest.raises(ConfigError, match="unknown party 'mallory'"):
        load_parties_config(path)
    path.write_text('[parties.server0]\nhost = "h"\nport = 1\n')
    with pytest.raises(ConfigError, match=r"missing section \[parties.server1\]"):
        load_parties_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_parties_config(tmp_path / "missing.toml")


def test_bad_program_reference_fails_fast(config: Path) -> None:
    with pytest.raises(ConfigError, match="no function 'nope'"):
        run_processes({SERVER0: "mpc_programs:nope", SERVER1: "mpc_programs:servers_no_owner"}, config)


@pytest.mark.slow
def test_run_timeout_kills_every_party(config: Path) -> None:
    ref = "mpc_programs:slow_servers"
    with PartyProcesses({SERVER0: ref, SERVER1: ref, OWNER: "mpc_programs:slow_owner"}, config,
                        threads_per_party=1) as procs:
        with pytest.raises(PartyProcessError, match="timed out after 10 s"):
            procs.wait(timeout=10)
        assert all(p.poll() is not None for p in procs.procs.values())
