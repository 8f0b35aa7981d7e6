"""Cost accounting: bytes, communication rounds and wall time per protocol call site, with link projections.

Every party owns one :class:`CostTracker`. Protocols open a labelled scope (``with ctx.cost.scope("mul")``);
bytes sent/received are attributed to the innermost open scope path (for example ``softmax/exp/mul``), rounds
are counted where a protocol waits on its peer, and wall time is recorded per scope (inclusive).
Traffic with the dealer is kept apart from traffic between the servers.

Offline and online. ``dealer_bytes`` counts a party's traffic with the dealer in both directions;
``dealer_recv_bytes`` only what it received from the dealer (on server 1: the corrections and log tags, i.e. the
bytes the dealer sends; on the dealer: server 1's requests). ``dealer_wait_s`` is the time a server sat blocked
reading the dealer's answers (:meth:`secfwt.dealer.Pending.get`), exclusive like the byte counts.
:func:`offline_online` turns the ledgers of one run into the split every report shows.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Link:
    """A network link: bandwidth in bits per second and one-way latency in seconds."""

    name: str
    bandwidth_bps: float
    latency_s: float

    def project(self, compute_s: float, bytes_sent: int, rounds: int) -> float:
        """Projected wall time: local compute + one latency per round + serialisation of the bytes sent."""
        return compute_s + rounds * self.latency_s + bytes_sent * 8.0 / self.bandwidth_bps


LAN = Link("LAN", 3e9, 0.8e-3)
WAN = Link("WAN", 100e6, 80e-3)


@dataclass
class OpCost:
    """Cost of one scope path, exclusive of nested scopes except ``time_s`` which is inclusive."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    rounds: int = 0
    dealer_bytes: int = 0
    time_s: float = 0.0
    dealer_recv_bytes: int = 0
    dealer_wait_s: float = 0.0

    def add(self, other: OpCost) -> None:
        self.calls += other.calls
        self.time_s += other.time_s
        self.add_exclusive(other)

    def add_exclusive(self, other: OpCost) -> None:
        """Add the counts that are exclusive per scope path (everything but ``calls`` and ``time_s``)."""
        self.bytes_sent += other.bytes_sent
        self.bytes_recv += other.bytes_recv
        self.rounds += other.rounds
        self.dealer_bytes += other.dealer_bytes
        self.dealer_recv_bytes += other.dealer_recv_bytes
        self.dealer_wait_s += other.dealer_wait_s


@dataclass
class CostTracker:
    """Per-party cost ledger keyed by scope path."""

    ops: dict[str, OpCost] = field(default_factory=dict)
    _stack: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return "/".join(self._stack) if self._stack else "(top)"

    def _entry(self, path: str | None = None) -> OpCost:
        key = self.path if path is None else path
        entry = self.ops.get(key)
        if entry is None:
            entry = self.ops[key] = OpCost()
        return entry

    @contextmanager
    def scope(self, label: str) -> Iterator[None]:
        self._stack.append(label)
        path = self.path
        start = time.perf_counter()
        try:
            yield
        finally:
            entry = self._entry(path)
            entry.calls += 1
            entry.time_s += time.perf_counter() - start
            self._stack.pop()

    def on_send(self, nbytes: int, dealer: bool = False) -> None:
        e = self._entry()
        if dealer:
            e.dealer_bytes += nbytes
        else:
            e.bytes_sent += nbytes

    def on_recv(self, nbytes: int, dealer: bool = False) -> None:
        e = self._entry()
        if dealer:
            e.dealer_bytes += nbytes
            e.dealer_recv_bytes += nbytes
        else:
            e.bytes_recv += nbytes

    def on_dealer_wait(self, seconds: float) -> None:
        """Server 1 was blocked ``seconds`` reading the dealer's answer to a request."""
        self._entry().dealer_wait_s += seconds

    def add_round(self, n: int = 1) -> None:
        self._entry().rounds += n

    def total(self) -> OpCost:
        out = OpCost()
        for path, c in self.ops.items():
            out.add_exclusive(c)
            if "/" not in path:
                out.time_s += c.time_s
                out.calls += c.calls
        return out

    def by_top_level(self) -> dict[str, OpCost]:
        """Costs grouped by the outermost scope label (bytes and rounds of nested scopes included)."""
        out: dict[str, OpCost] = {}
        for path, c in self.ops.items():
            top = path.split("/", 1)[0]
            agg = out.setdefault(top, OpCost())
            agg.add_exclusive(c)
            if path == top:
                agg.time_s += c.time_s
                agg.calls += c.calls
        return out

    def reset(self) -> None:
        self.ops.clear()

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {k: asdict(v) for k, v in self.ops.items()}

    @staticmethod
    def from_dict(d: dict[str, dict[str, float]]) -> CostTracker:
        t = CostTracker()
        for k, v in d.items():
            t.ops[k] = OpCost(**v)  # type: ignore[arg-type]
        return t

    def snapshot(self) -> OpCost:
        return self.total()

    def dealer_generation_s(self) -> float:
        """The dealer's own ledger: seconds spent computing and sending answers (its ``dealer/<kind>`` scopes)."""
        return sum(c.time_s for k, c in self.ops.items() if k.startswith("dealer/") and k.count("/") == 1)

    def dealer_sent_bytes(self) -> int:
        """The dealer's own ledger: bytes it sent (its dealer traffic minus the requests it received)."""
        return sum(c.dealer_bytes - c.dealer_recv_bytes for c in self.ops.values())


def offline_online(wall_s: float, server1: OpCost,
                   dealer: CostTracker | None = None) -> dict[str, float | int | None]:
    """The offline/online split of one run (or one scope of it), from server 1's cost of that scope and, when
    the caller has it, the dealer's ledger.

    * ``offline_bytes``: the bytes the dealer sends (corrections and log tags). From server 1's
      ``dealer_recv_bytes`` (what it received from the dealer; the dealer sends server 0 only its key at set-up).
    * ``offline_time_s``: the dealer's generation time (computing and sending its answers,
      :meth:`CostTracker.dealer_generation_s`), or None without the dealer's ledger.
    * ``dealer_wait_s``: the time server 1 sat blocked waiting for the dealer's answers.
    * ``online_time_s``: ``wall_s`` (the servers' wall time of the scope) minus ``dealer_wait_s``: what the
      online phase would take with every correction already at hand, as a full preprocessing phase (or a
      dealer far enough ahead) would give. It is an estimate from the measured run: on a machine whose cores the
      dealer shares with the servers, the dealer's concurrent work still slows the servers and is not removed,
      so it is an upper bound of that online time. The measured wall time is reported beside it (``time_s``).
    """
    wait = server1.dealer_wait_s
    return {
        "online_time_s": max(0.0, wall_s - wait),
        "dealer_wait_s": wait,
        "offline_time_s": dealer.dealer_generation_s() if dealer is not None else None,
        "offline_bytes": server1.dealer_recv_bytes,
    }


def cpu_model() -> str:
    """This host's CPU model and core count, e.g. ``"Intel(R) Xeon(R) ... (2 cores)"`` (for reports)."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
