"""Servers and dealer as long-running services (``secfwt party`` without --program): started once as processes,
they serve data-owner sessions back to back (tune, then predict), survive an owner killed mid-forward, serve the
next session correctly, and stop on SIGTERM with exit code 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import assert_follows_plaintext
from secfwt.launch import load_parties_config, write_local_config
from secfwt.serve.shares import share_model
from secfwt.tuning.predict import classify, texts_to_examples
from secfwt.tuning.runner import RunSpec, run, run_job
from secfwt.tuning.tasks import get_task
from secfwt.tuning.testing import make_tiny_bert

ROLES = ("server0", "server1", "dealer")
TEXTS = ("a gorgeous , moving film .", "a dull mess .")


def _spec(model: Path, shares: Path, mode: str, iterations: int = 3) -> RunSpec:
    return RunSpec(task="demo", model=str(model), mode=mode, attention={"kind": "softmax"}, k=2, max_length=24,
                   max_rows=32, shares_dir=str(shares), progress=False, timeout=60,
                   tune={"d": 10, "n_prompt": 2, "popsize": 4, "iterations": iterations, "patience": None})


def _wait_for(path: Path, pattern: str, count: int, timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = path.read_text() if path.exists() else ""
        if len(re.findall(pattern, text)) >= count:
            return text
        time.sleep(0.2)
    raise AssertionError(f"{path.name}: fewer than {count} lines matching {pattern!r} within {timeout} s:\n"
                         f"{path.read_text() if path.exists() else ''}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("service")
    model = make_tiny_bert(d / "model", hidden=32, layers=2)
    shares = share_model(model, d / "shares")
    config = write_local_config(d / "parties", timeout=60.0, connect_timeout=60.0)
    procs, logs = {}, {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    for role in ROLES:
        logs[role] = d / "logs" / f"{role}.log"
        cmd = [sys.executable, "-m", "secfwt.cli.party_cmd", "--config", str(config), "--role", role,
               "--log-file", str(logs[role])]
        if role != "dealer":
            cmd += ["--shares", str(shares / f"{role}.safetensors")]
        procs[role] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, env=env)
    yield model, shares, config, procs, logs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_services_serve_sessions_back_to_back_survive_a_killed_owner_and_stop_cleanly(deployment, tmp_path):
    model, shares, config, procs, logs = deployment
    for role in ROLES:
        _wait_for(logs[role], r"listening on", 1, 60)
    assert "shares_sha256=" in logs["server0"].read_text() and (logs["server0"].stat().st_mode & 0o777) == 0o600

    # Session 1: a tuning run against the services; its oracle is the same loop in the clear.
    plain, _ = run(_spec(model, shares, "plaintext"))
    tuned, costs = run(_spec(model, shares, "mpc"), parties=str(config))
    assert_follows_plaintext(tuned, plain, costs)

    # Session 2: private inference with the tuned prompt, against the same services.
    task = get_task("demo")
    def predict(ev):
        return classify(ev, tuned.prompt, task, texts_to_examples(TEXTS, task))

    preds, _ = run_job(_spec(model, shares, "mpc"), task, predict, str(config))
    want, _ = run_job(_spec(model, shares, "plaintext"), task, predict)
    assert [p.texts for p in preds] == [(t,) for t in TEXTS]
    assert [p.index for p in preds] == [p.index for p in want]
    probs = [(a, b) for p, q in zip(preds, want, strict=True) for a, b in zip(p.probs, q.probs, strict=True)]
    assert max(abs(a - b) for a, b in probs) < 1e-2
    for role in ROLES:
        _wait_for(logs[role], r"session \S+ end: outcome=ok", 2, 60)

    # Session 3: the data owner is killed in the middle of its forwards.
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys; from test_service import _long_owner; _long_owner(*sys.argv[1:])",
         str(model), str(shares), str(config)],
        cwd=Path(__file__).parent, env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(logs["server0"], r"session \S+ start", 3, 60)
        time.sleep(3.0)  # well into its 50 generations
        owner.send_signal(signal.SIGKILL)
    finally:
        owner.wait(10)
    for role in ROLES:
        text = _wait_for(logs[role], r"session \S+ end: outcome=failed", 1, 90)
        assert procs[role].poll() is None, f"{role} exited after the owner died:\n{text}"

    # Session 4: served correctly after the failure.
    again, costs = run(_spec(model, shares, "mpc"), parties=str(config))
    assert_follows_plaintext(again, plain, costs)

    for role in ROLES:
        _wait_for(logs[role], r"session \S+ end: outcome=ok", 3, 60)

    # SIGTERM: every service exits 0, no process left.
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    for role, p in procs.items():
        assert p.wait(30) == 0, (role, p.stderr.read().decode() if p.stderr else "")
    for role in ROLES:
        text = logs[role].read_text()
        assert len(re.findall(r"session \S+ end: outcome=ok", text)) == 3, text
        assert re.search(r"session \S+ end: outcome=ok rows=[1-9]\d* bytes_sent=[1-9]\d* rounds=[1-9]", text) \
            or role == "dealer", text
        assert "stopped after 4 session(s)" in text, text
        assert not any(t.split()[1] in text for t in TEXTS), "a log line names the owner's text"
        for line in text.splitlines():
            if " start: owner " in line:
                assert re.search(r"owner owner cert_sha256=[0-9a-f]{16}$", line), line


def _long_owner(model: str, shares: str, config: str) -> None:
    """A data owner with a long run (killed by the test)."""
    run(_spec(Path(model), Path(shares), "mpc", iterations=50), parties=config)


def test_a_service_refuses_to_run_the_owner_role(tmp_path):
    from secfwt.errors import ConfigError
    from secfwt.service import PartyService

    cfg = load_parties_config(write_local_config(tmp_path))
    with pytest.raises(ConfigError, match="a service runs server0, server1 or dealer, not 'owner'"):
        PartyService(cfg, "owner")
    with pytest.raises(ConfigError, match="server0 needs its share file"):
        PartyService(cfg, "server0")
    assert torch.get_num_threads() >= 1
