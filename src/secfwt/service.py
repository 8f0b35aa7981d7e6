"""Servers and dealer as long-running services: ``secfwt party --role server0|server1|dealer`` (no
``--program``/``--out``) serves data-owner sessions one after another until SIGTERM or SIGINT.

Lifecycle of one service process:

1. **Start.** Read the parties file and (servers) the share file once; open the listening socket; pin torch to
   ``threads`` threads; log one line: role, address, model, the share file's SHA-256.
2. **Wait** for a data owner, with no deadline. A session is set up when the owner connects with a fresh random
   session id (:class:`~secfwt.comm.tcp.TcpCommunicator`, ``await_owner``): the service adopts the id, dials
   the lower-ranked services, accepts the others carrying the same id within ``connect_timeout``, then draws
   fresh PRG keys (:func:`secfwt.runtime.setup_keys`, hence fresh dealer streams) and builds a new server on
   the loaded shares. A caller that arrives while a session runs is told "busy": a data owner retries for the
   parties file's ``queue_timeout`` (a queue).
3. **Serve** the session (:func:`secfwt.runtime.run_party`). A failed session (owner gone, peer gone, bad
   message, time-out) ends with a log line; the service goes back to 2.
4. **Stop.** SIGTERM or SIGINT while waiting: close and exit 0. During a session: the session is aborted (its
   peers are told at once), then the service exits 0.

Log lines carry no data-derived value: role, addresses, the model's name and share-file hash at start; per
session its id (random, drawn by the owner), the owner's certificate common name and SHA-256, rows served
(prompt x example sequence forwards: public shapes), bytes, rounds, wall time and outcome (an error's class
and message: protocol steps and shapes; an owner's abort carries only its error class, see runtime.run_party).
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from secfwt.comm.base import DEALER, OWNER, PARTY_NAMES, PARTY_RANKS, SERVER0, SERVER1
from secfwt.comm.tcp import TcpCommunicator, open_listener, refuse_while_busy
from secfwt.context import PartyContext
from secfwt.errors import ConfigError, StopRequested
from secfwt.files import open_private_append
from secfwt.launch import PartiesConfig, load_parties_config
from secfwt.runtime import run_party
from secfwt.serve.session import serve_loop

LOG_NAME = "secfwt.service"
ALL_RANKS = [SERVER0, SERVER1, DEALER, OWNER]


@dataclass
class SessionRecord:
    """What one session's end-of-session log line says."""

    sid: str
    owner: str
    rows: int
    bytes_sent: int
    rounds: int
    wall_s: float
    outcome: str

    def line(self) -> str:
        return (f"session {self.sid} end: outcome={self.outcome} rows={self.rows} bytes_sent={self.bytes_sent} "
                f"rounds={self.rounds} wall_s={self.wall_s:.1f}")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class PartyService:
    """One server's or the dealer's service (module docstring). :meth:`serve_forever` returns the number of
    sessions that ended, when :attr:`stop` is set (by SIGTERM/SIGINT, or by the caller)."""

    def __init__(self, cfg: PartiesConfig, role: str, shares: Path | None = None, threads: int = 1,
                 log: logging.Logger | None = None) -> None:
        if role not in ("server0", "server1", "dealer"):
            raise ConfigError(f"a service runs server0, server1 or dealer, not {role!r} (the data owner runs "
                              "`secfwt tune` or `secfwt predict` with --parties)")
        self.cfg, self.role, self.rank = cfg, role, PARTY_RANKS[role]
        self.log = log or logging.getLogger(LOG_NAME)
        self.stop = threading.Event()
        self._serving = False  # in a session, before its owner said stop: a signal aborts it
        self.sessions: list[SessionRecord] = []
        if threads < 1:
            raise ConfigError(f"--threads: expected an integer >= 1, got {threads}")
        torch.set_num_threads(threads)
        self.factory: Callable[[PartyContext], Any] | None = None
        model, digest = "-", "-"
        if self.rank != DEALER:
            if shares is None:
                raise ConfigError(f"{role} needs its share file (--shares FILE from `secfwt share-model`)")
            from secfwt.serve.entry import server_factory

            self.factory = server_factory(shares, self.rank)
            model, digest = shares.name, file_sha256(shares)[:16]
        cfg.tls(self.rank)  # fail now, not at the first session, when a TLS file is missing
        addr = cfg.parties[self.rank]
        self.listener = open_listener(addr.bind or addr.host, addr.port)
        self.log.info(f"{role} listening on {addr.bind or addr.host}:{addr.port} model={model} "
                      f"shares_sha256={digest} threads={threads} frac_bits={cfg.frac_bits}")

    def _program(self, stats: dict[str, int]) -> Callable[[PartyContext], int] | None:
        if self.factory is None:
            return None
        factory = self.factory

        def prog(ctx: PartyContext) -> int:
            server = factory(ctx)
            try:
                return serve_loop(ctx, server)
            finally:
                stats["rows"] = server.rows_served
                self._serving = False  # the owner ended the session: a signal now lets it close, then stops

        return prog

    def handle_signal(self, signum: int, _frame: FrameType | None) -> None:
        """SIGTERM/SIGINT: stop waiting; abort a running session (its peers are told at once)."""
        self.stop.set()
        if self._serving:
            raise StopRequested(f"{self.role}: {signal.Signals(signum).name} during a session")

    def serve_one(self) -> SessionRecord | None:
        """Wait for one session and serve it; None when stopped while waiting."""
        try:
            comm: TcpCommunicator = self.cfg.communicator(self.rank, ALL_RANKS, listener=self.listener,
                                                          await_owner=True, stop=self.stop)
        except StopRequested:
            return None
        except Exception as e:  # noqa: BLE001 - any failed set-up is logged; the service waits for the next owner
            self.log.warning(f"session set-up failed: {type(e).__name__}: {e}")
            return SessionRecord("-", "-", 0, 0, 0, 0.0, "setup-failed")
        if self.stop.is_set():  # a signal arrived during the set-up: no session is started
            comm.abort("the service is stopping", [SERVER0, SERVER1, DEALER, OWNER])
            comm.close(flush_timeout=1.0)
            return None
        sid, start = comm.sid or "-", time.perf_counter()
        owner = f"{PARTY_NAMES[OWNER]} cert_sha256={comm.peer_certs.get(OWNER, '?')[:16]}"
        self.log.info(f"session {sid} start: owner {owner}")
        stats = {"rows": 0}
        busy_stop = threading.Event()
        busy = threading.Thread(target=refuse_while_busy, args=(self.listener, self.cfg.tls(self.rank), self.role,
                                                                busy_stop), name=f"secfwt-{self.role}-busy",
                                daemon=True)
        busy.start()
        outcome = "ok"
        try:
            self._serving = True
            run_party(self.rank, comm, self._program(stats), self.cfg.fxp, with_owner=True)
        except StopRequested:
            outcome = "aborted: stop requested"
        except Exception as e:  # noqa: BLE001 - a session's failure (peer, owner, bad command, memory) ends it only
            outcome = f"failed: {type(e).__name__}: {e}"
        finally:
            self._serving = False
            comm.close()
            busy_stop.set()
            busy.join()
        total = comm.cost.total()
        rec = SessionRecord(sid, owner, stats["rows"], total.bytes_sent, total.rounds,
                            time.perf_counter() - start, outcome)
        (self.log.info if outcome == "ok" else self.log.warning)(rec.line())
        return rec

    def serve_forever(self) -> int:
        try:
            while not self.stop.is_set():
                rec = self.serve_one()
                if rec is not None:
                    self.sessions.append(rec)
        finally:
            self.listener.close()
            self.log.info(f"{self.role} stopped after {len(self.sessions)} session(s)")
        return len(self.sessions)


def setup_logging(role: str, log_file: str | None, level: str) -> logging.Logger:
    """The service's logger: one line per event to stderr and, with ``log_file``, to that file (mode 0600)."""
    log = logging.getLogger(LOG_NAME)
    log.setLevel(getattr(logging, level.upper()))
    log.handlers.clear()
    log.propagate = False
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {role}: %(message)s", "%Y-%m-%dT%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        handlers.append(logging.StreamHandler(open_private_append(log_file)))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    return log


def run_service(config: str | Path, role: str, shares: str | Path | None = None, threads: int = 1,
                log_file: str | None = None, log_level: str = "info") -> int:
    """``secfwt party`` as a service: serve sessions until SIGTERM/SIGINT; returns 0."""
    log = setup_logging(role, log_file, log_level)
    svc = PartyService(load_parties_config(config), role, Path(shares) if shares else None, threads, log)
    old = {s: signal.signal(s, svc.handle_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        svc.serve_forever()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0


__all__ = ["PartyService", "SessionRecord", "run_service", "setup_logging"]
