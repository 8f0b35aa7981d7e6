"""The real multi-process mode: a parties config file, one OS process per party, TLS links between them.

The parties file (TOML) names every party's listening address and its TLS files; relative paths are
relative to the file::

    timeout = 60.0           # seconds a party waits for a message
    connect_timeout = 30.0   # seconds to set up all connections
    queue_timeout = 600.0    # seconds a data owner waits while the services serve another session
    frac_bits = 16           # fixed-point fractional bits (identical on all parties)
    ca = "certs/ca.pem"      # default CA for every party (a party may override it)

    [parties.server0]
    host = "127.0.0.1"
    port = 41000
    cert = "certs/server0.pem"
    key = "certs/server0-key.pem"
    # bind = "0.0.0.0"       # optional listening address (default: host)

In a real deployment each party's copy of the file holds only its own ``cert``/``key``; the others' are
optional. ``secfwt party`` (:func:`run_party_process`) runs one role with :func:`secfwt.runtime.run_party`;
:func:`run_processes` starts all parties of one run as subprocesses on this machine and collects results
and cost ledgers.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secfwt.alloc import configure_malloc, malloc_env
from secfwt.comm.base import DEALER, OWNER, PARTY_NAMES, PARTY_RANKS, SERVER0, SERVER1
from secfwt.comm.certs import TlsFiles, write_party_certs
from secfwt.comm.tcp import TcpCommunicator
from secfwt.context import FRAC_BITS_MAX, FRAC_BITS_MIN, FixedPoint
from secfwt.cost import CostTracker
from secfwt.errors import CommError, ConfigError
from secfwt.runtime import Program, RunResult, run_party

CONFIG_NAME = "parties.toml"


class PartyProcessError(CommError):
    """A party process of a multi-process run failed, timed out or could not be started."""


# -- config ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartyAddress:
    """One party's entry of the parties file (paths already resolved)."""

    rank: int
    host: str
    port: int
    bind: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class PartiesConfig:
    """The parsed parties file."""

    path: Path
    parties: dict[int, PartyAddress]
    timeout: float = 60.0
    connect_timeout: float = 30.0
    frac_bits: int = 16
    queue_timeout: float = 600.0

    @property
    def fxp(self) -> FixedPoint:
        return FixedPoint(self.frac_bits)

    def addresses(self) -> dict[int, tuple[str, int]]:
        return {r: (p.host, p.port) for r, p in self.parties.items()}

    def tls(self, rank: int) -> TlsFiles:
        """The TLS files of party ``rank``; ConfigError if the file does not give them or they are missing."""
        p = self.parties.get(rank)
        name = PARTY_NAMES[rank]
        if p is None:
            raise ConfigError(f"{self.path}: no [parties.{name}] section")
        for field in ("ca", "cert", "key"):
            if getattr(p, field) is None:
                raise ConfigError(f"{self.path}: field 'parties.{name}.{field}' (or top-level 'ca') is required "
                                  f"to run {name}")
        assert p.ca is not None and p.cert is not None and p.key is not None
        files = TlsFiles(ca=p.ca, cert=p.cert, key=p.key)
        files.check()
        return files

    def communicator(self, rank: int, ranks: Sequence[int], cost: CostTracker | None = None,
                     **service: Any) -> TcpCommunicator:
        """Connect party ``rank`` to the other ``ranks`` (see :class:`TcpCommunicator` for errors).
        ``service``: TcpCommunicator's ``sid``, ``listener``, ``await_owner`` and ``stop`` (the data owner
        and the long-running services of :mod:`secfwt.service`)."""
        missing = [PARTY_NAMES[r] for r in ranks if r not in self.parties]
        if missing:
            raise ConfigError(f"{self.path}: no [parties.*] section for {', '.join(missing)}")
        return TcpCommunicator(
            rank, self.addresses(), self.tls(rank), ranks, timeout=self.timeout,
            connect_timeout=self.connect_timeout, cost=cost, bind_host=self.parties[rank].bind,
            session={"frac_bits": self.frac_bits, "parties": [PARTY_NAMES[r] for r in sorted(ranks)]},
            queue_timeout=self.queue_timeout, **service,
        )


def _type_name(v: Any) -> str:
    return type(v).__name__


def _field(table: Mapping[str, Any], key: str, where: str, path: Path, kind: type, default: Any = ...) -> Any:
    """``table[key]`` checked to be of ``kind`` (ints accepted for floats); ConfigError names file and field."""
    if key not in table:
        if default is ...:
            raise ConfigError(f"{path}: missing field '{where}{key}' ({kind.__name__})")
        return default
    v = table[key]
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v, ok = float(v), True
    if not ok:
        raise ConfigError(f"{path}: field '{where}{key}': expected {kind.__name__}, got {v!r} ({_type_name(v)})")
    return v


def _path_field(table: Mapping[str, Any], key: str, where: str, path: Path) -> Path | None:
    v = _field(table, key, where, path, str, None)
    if v is None:
        return None
    p = Path(v).expanduser()
    return p if p.is_absolute() else (path.parent / p)


def load_parties_config(path: str | Path) -> PartiesConfig:
    """Read and validate a parties file. Raises ConfigError naming the file, the field, expected vs got."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"parties config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    timeout = _field(raw, "timeout", "", path, float, 60.0)
    connect_timeout = _field(raw, "connect_timeout", "", path, float, 30.0)
    queue_timeout = _field(raw, "queue_timeout", "", path, float, 600.0)
    frac_bits = _field(raw, "frac_bits", "", path, int, 16)
    for key, val in (("timeout", timeout), ("connect_timeout", connect_timeout), ("queue_timeout", queue_timeout)):
        if not val > 0:
            raise ConfigError(f"{path}: field '{key}': expected a positive number of seconds, got {val}")
    if not FRAC_BITS_MIN <= frac_bits <= FRAC_BITS_MAX:
        raise ConfigError(f"{path}: field 'frac_bits': expected an integer in [{FRAC_BITS_MIN}, {FRAC_BITS_MAX}], "
                          f"got {frac_bits}")
    default_ca = _path_field(raw, "ca", "", path)
    tables = _field(raw, "parties", "", path, dict)
    unknown = sorted(set(tables) - set(PARTY_RANKS))
    if unknown:
        raise ConfigError(f"{path}: unknown party '{unknown[0]}' in [parties] "
                          f"(expected: {', '.join(PARTY_RANKS)})")
    parties: dict[int, PartyAddress] = {}
    for name, t in tables.items():
        where = f"parties.{name}."
        if not isinstance(t, dict):
            raise ConfigError(f"{path}: field 'parties.{name}': expected a table, got {_type_name(t)}")
        port = _field(t, "port", where, path, int)
        if not 1 <= port <= 65535:
            raise ConfigError(f"{path}: field '{where}port': expected an integer in [1, 65535], got {port}")
        parties[PARTY_RANKS[name]] = PartyAddress(
            rank=PARTY_RANKS[name], host=_field(t, "host", where, path, str), port=port,
            bind=_field(t, "bind", where, path, str, None),
            ca=_path_field(t, "ca", where, path) or default_ca,
            cert=_path_field(t, "cert", where, path), key=_path_field(t, "key", where, path),
        )
    for r in (SERVER0, SERVER1, DEALER):
        if r not in parties:
            raise ConfigError(f"{path}: missing section [parties.{PARTY_NAMES[r]}]")
    return PartiesConfig(path, parties, timeout, connect_timeout, frac_bits, queue_timeout)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that are free right now (bound to port 0 together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_local_config(
    directory: str | Path,
    base_port: int | None = None,
    timeout: float = 60.0,
    connect_timeout: float = 30.0,
    frac_bits: int = 16,
    hosts: Sequence[str] = (),
) -> Path:
    """Create certificates (``directory/certs``) and a loopback parties file; returns the file's path.

    Ports are ``base_port .. base_port + 3`` when given, otherwise free ports picked by the OS.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_party_certs(directory / "certs", hosts=hosts)
    ranks = sorted(PARTY_NAMES)
    ports = [base_port + i for i in range(len(ranks))] if base_port else free_ports(len(ranks))
    lines = [
        "# secfwt parties file (loopback), written by secfwt.launch.write_local_config",
        f"timeout = {float(timeout)!r}",
        f"connect_timeout = {float(connect_timeout)!r}",
        f"frac_bits = {int(frac_bits)}",
        'ca = "certs/ca.pem"',
    ]
    for r, port in zip(ranks, ports, strict=True):
        name = PARTY_NAMES[r]
        lines += ["", f"[parties.{name}]", 'host = "127.0.0.1"', f"port = {port}",
                  f'cert = "certs/{name}.pem"', f'key = "certs/{name}-key.pem"']
    path = directory / CONFIG_NAME
    path.write_text("\n".join(lines) + "\n")
    return path


# -- one party -----------------------------------------------------------------------------------------


def import_program(ref: str) -> Program:
    """The function named by ``"package.module:function"``; ConfigError if it cannot be imported."""
    module_name, sep, func_name = ref.partition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(f"program reference must look like 'module:function', got '{ref}'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import program module '{module_name}': {e}") from e
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"program '{ref}': module '{module_name}' has no function '{func_name}'")
    return func


def cost_path(out: str | Path) -> Path:
    """Where the cost ledger of a result file is saved: ``result.pt`` -> ``result.cost.json``."""
    out = Path(out)
    return out.with_name(out.stem + ".cost.json")


def parse_party_names(names: str | Sequence[str]) -> list[int]:
    """Ranks of a comma-separated (or listed) set of party names; ConfigError for unknown names."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    bad = [n for n in items if n not in PARTY_RANKS]
    if bad:
        raise ConfigError(f"unknown party name '{bad[0]}' (expected: {', '.join(PARTY_RANKS)})")
    return sorted({PARTY_RANKS[n] for n in items})


def run_party_process(
    config_path: str | Path,
    party_name: str,
    program_ref: str | None,
    out: str | Path | None = None,
    parties: Sequence[str] | None = None,
) -> Any:
    """Run one party of a multi-process run in this process and return its result.

    Connects to the peers with TLS (:class:`TcpCommunicator`), runs :func:`secfwt.runtime.run_party` with
    the program ``module:function`` (ignored for the dealer), and with ``out`` saves the result with
    ``torch.save`` and the cost ledger as JSON next to it (:func:`cost_path`). ``parties`` lists the party
    names of this run (default: all parties of the file; the data owner takes part when listed).
    Raises ConfigError (config, program), AuthError / PeerTimeoutError (set-up) and every error of the
    program or its peers (PeerClosedError, PeerAbortedError, ...).
    """
    configure_malloc()  # glibc malloc settings for this party process (secfwt.alloc)
    cfg = load_parties_config(config_path)
    if party_name not in PARTY_RANKS:
        raise ConfigError(f"unknown role '{party_name}' (expected: {', '.join(PARTY_RANKS)})")
    rank = PARTY_RANKS[party_name]
    ranks = parse_party_names(parties) if parties is not None else sorted(cfg.parties)
    if rank not in ranks:
        raise ConfigError(f"role {party_name} is not one of the parties of this run ({parties})")
    program: Program | None = None
    if rank != DEALER:
        if not program_ref:
            raise ConfigError(f"{party_name} needs a program (--program module:function)")
        program = import_program(program_ref)
    comm = cfg.communicator(rank, ranks)
    try:
        result = run_party(rank, comm, program, cfg.fxp, with_owner=OWNER in ranks)
    finally:
        comm.close()
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, out)
        cost_path(out).write_text(json.dumps(comm.cost.to_dict(), indent=1))
    return result


# -- all parties as subprocesses ---------------------------------------------------------------------------


def _stderr_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").rstrip()
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _status(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class PartyProcesses:
    """The subprocesses (``secfwt party``, started as ``python -m secfwt.cli.party_cmd`` so that a party
    process does not import the other sub-commands) of one run; a context manager that kills leftovers.

    Args:
        programs: ``{rank: "module:function"}`` for SERVER0, SERVER1 and optionally OWNER.
        config: the parties file, or a directory holding ``parties.toml``.
        out_dir: where results, cost ledgers and per-party logs go (default: ``<config dir>/run``).
        env: extra environment variables for the children. Children get this interpreter's ``sys.path``
            as PYTHONPATH, so any program importable here is importable there, and glibc's malloc settings of
            :func:`secfwt.alloc.malloc_env` (less page-fault churn; ``SECFWT_MALLOC=default`` turns them off).
            This process gets the same settings through ``mallopt`` (:func:`secfwt.alloc.configure_malloc`).
        threads_per_party: torch/OpenMP threads per child (OMP_NUM_THREADS); ``None`` keeps the default.
            All parties share this host's cores, so 1 avoids oversubscription on small machines.
        external: ranks that take part in the run but are run by the caller (for example the data owner in
            the launching process, so its progress bars show); they are not spawned nor collected.
    """

    def __init__(
        self,
        programs: Mapping[int, str],
        config: str | Path,
        out_dir: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        threads_per_party: int | None = None,
        external: Sequence[int] = (),
    ) -> None:
        config = Path(config)
        self.config = config / CONFIG_NAME if config.is_dir() else config
        self.cfg = load_parties_config(self.config)
        for r, ref in programs.items():
            if r not in (SERVER0, SERVER1, OWNER):
                raise ConfigError(f"programs are for server0, server1 and owner, got rank {r}")
            import_program(ref)  # fail here, not in a child while the others wait for it
        for r in (SERVER0, SERVER1):
            if r not in programs:
                raise ConfigError(f"no program for {PARTY_NAMES[r]}")
        self.ranks = [SERVER0, SERVER1, DEALER] + ([OWNER] if OWNER in programs else [])
        all_ranks = self.ranks + [r for r in external if r not in self.ranks]
        self.out_dir = Path(out_dir) if out_dir is not None else self.config.parent / "run"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        child_env = dict(os.environ)
        child_env["PYTHONPATH"] = os.pathsep.join(
            [p for p in sys.path if p] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        if threads_per_party is not None:
            child_env["OMP_NUM_THREADS"] = child_env["MKL_NUM_THREADS"] = str(threads_per_party)
        child_env.update(env or {})
        child_env.update(malloc_env(child_env))
        configure_malloc()  # the launching process (often the data owner) too
        names = ",".join(PARTY_NAMES[r] for r in sorted(all_ranks))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started = time.monotonic()
        try:
            for r in self.ranks:
                name = PARTY_NAMES[r]
                self.result_path(r).unlink(missing_ok=True)
                cost_path(self.result_path(r)).unlink(missing_ok=True)
                cmd = [sys.executable, "-m", "secfwt.cli.party_cmd", "--config", str(self.config), "--role", name,
                       "--parties", names, "--out", str(self.result_path(r)), "--exit-with-parent"]
                if r in programs:
                    cmd += ["--program", programs[r]]
                with open(self.log_path(r), "wb") as log:
                    self.procs[r] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                     env=child_env)
        except BaseException:
            self.kill_all()
            raise

    def result_path(self, rank: int) -> Path:
        return self.out_dir / f"{PARTY_NAMES[rank]}.pt"

    def log_path(self, rank: int) -> Path:
        return self.out_dir / f"{PARTY_NAMES[rank]}.log"

    def stderr_tail(self, rank: int, lines: int = 15) -> str:
        """The last lines of the party's output (stdout and stderr)."""
        return _stderr_tail(self.log_path(rank), lines)

    def kill_all(self) -> None:
        """Kill every child that is still running and reap it (no orphans, no zombies)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored
                p.wait(timeout=10)

    def __enter__(self) -> PartyProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()

    def _report(self, headline: str, primary: int | None) -> str:
        parts = [headline]
        for r, p in self.procs.items():
            parts.append(f"  {PARTY_NAMES[r]}: {_status(p.returncode)}")
        if primary is not None:
            tail = self.stderr_tail(primary)
            parts.append(f"--- {PARTY_NAMES[primary]} output (last lines) ---\n{tail or '(no output)'}")
        for r, p in self.procs.items():
            if r != primary and p.returncode not in (0, None):
                last = (self.stderr_tail(r, 1) or "(no output)").strip()
                parts.append(f"--- {PARTY_NAMES[r]}: {last}")
        return "\n".join(parts)

    def _primary(self, bad: list[int]) -> int:
        """The likely root cause among parties that failed together: killed ones, then those whose error is
        not a reaction to another party's failure."""
        def key(r: int) -> tuple[int, int]:
            code = self.procs[r].returncode or 0
            last = self.stderr_tail(r, 1)
            reaction = "aborted the run" in last or "closed the connection" in last
            return (0 if code < 0 else 1, 1 if reaction else 0)
        return min(bad, key=key)

    def wait(self, timeout: float, grace: float = 5.0) -> RunResult:
        """Wait for all parties and collect their results and cost ledgers.

        When a party fails, the others get ``grace`` seconds (bounded by ``timeout``) to exit on their own
        (they normally stop at once through the abort message or the closed connection); the rest are
        killed. Raises PartyProcessError naming the first failing party,
        with its output tail and every party's exit status; on ``timeout`` all children are killed first.
        """
        deadline = self.started + timeout
        first_failure: int | None = None
        failed_at = 0.0
        try:
            while True:
                running = [r for r, p in self.procs.items() if p.poll() is None]
                if first_failure is None:
                    bad = [r for r, p in self.procs.items() if p.returncode not in (0, None)]
                    if bad:
                        first_failure, failed_at = self._primary(bad), time.monotonic()
                if not running:
                    break
                now = time.monotonic()
                if now > deadline or (first_failure is not None and now > failed_at + grace):
                    self.kill_all()
                    if first_failure is None:
                        raise PartyProcessError(self._report(
                            f"multi-process run timed out after {timeout:g} s; killed: "
                            f"{', '.join(PARTY_NAMES[r] for r in running)}", running[0]))
                    break
                time.sleep(0.02)
            if first_failure is not None:
                raise PartyProcessError(self._report(
                    f"{PARTY_NAMES[first_failure]} failed ({_status(self.procs[first_failure].returncode)})",
                    first_failure))
            return self._collect()
        finally:
            self.kill_all()

    def _collect(self) -> RunResult:
        out = RunResult()
        for r in self.ranks:
            path = self.result_path(r)
            try:
                out.results[r] = torch.load(path, weights_only=True)
                out.costs[r] = CostTracker.from_dict(json.loads(cost_path(path).read_text()))
            except (OSError, ValueError, RuntimeError) as e:
                raise PartyProcessError(f"{PARTY_NAMES[r]} exited cleanly but its result {path} cannot be read: "
                                        f"{e}") from e
        return out


def run_processes(
    programs: Mapping[int, str],
    config_dir: str | Path,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    threads_per_party: int | None = None,
) -> RunResult:
    """Run servers, dealer (and owner, if it has a program) as separate OS processes over TLS on this host.

    ``programs`` maps ranks to ``"module:function"``; ``config_dir`` is a parties file or a directory with
    ``parties.toml`` (e.g. from :func:`write_local_config`). Returns results and cost ledgers like
    :func:`secfwt.runtime.run_in_process`. ``env`` and ``threads_per_party``: see :class:`PartyProcesses`.
    Raises ConfigError (config, program references) or PartyProcessError (see :meth:`PartyProcesses.wait`);
    no child outlives this call.
    """
    with PartyProcesses(programs, config_dir, env=env, threads_per_party=threads_per_party) as procs:
        return procs.wait(timeout)
