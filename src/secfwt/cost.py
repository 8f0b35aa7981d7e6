"""Cost accounting: bytes, communication rounds and wall time per protocol call site, with link projections.

Every party owns one :class:`CostTracker`. Protocols open a labelled scope (``with ctx.cost.scope("mul")``);
bytes sent/received are attributed to the innermost open scope path (for example ``softmax/exp/mul``), rounds
are counted where a protocol waits on its peer, and wall time is recorded per scope (inclusive).
Traffic with the dealer is kept apart from traffic between the servers.
"""

from __future__ import annotations

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

    def add(self, other: OpCost) -> None:
        self.calls += other.calls
        self.bytes_sent += other.bytes_sent
        self.bytes_recv += other.bytes_recv
        self.rounds += other.rounds
        self.dealer_bytes += other.dealer_bytes
        self.time_s += other.time_s


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
        else:
            e.bytes_recv += nbytes

    def add_round(self, n: int = 1) -> None:
        self._entry().rounds += n

    def total(self) -> OpCost:
        out = OpCost()
        for path, c in self.ops.items():
            out.bytes_sent += c.bytes_sent
            out.bytes_recv += c.bytes_recv
            out.rounds += c.rounds
            out.dealer_bytes += c.dealer_bytes
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
            agg.bytes_sent += c.bytes_sent
            agg.bytes_recv += c.bytes_recv
            agg.rounds += c.rounds
            agg.dealer_bytes += c.dealer_bytes
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
