"""The explicit per-party context passed to every protocol (no globals, no singletons)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from secfwt.comm.base import DEALER, OWNER, PARTY_NAMES, SERVER0, SERVER1, Communicator
from secfwt.cost import CostTracker
from secfwt.errors import ConfigError
from secfwt.prg import PRG

if TYPE_CHECKING:
    from secfwt.dealer import DealerClient


# Allowed fractional bits. Every product of two f-bit values must stay below 2^62 as a ring integer, i.e. below
# 2^(62 - 2f) in real units (the truncation's range): 2^14 = 16384 at f = 24, but only 2^6 = 64 at f = 28, too
# little for a LayerNorm row's sum of squares (n var, ~2^10 for n = 768) or a logit row; above 24 softmax and
# LayerNorm fail even on small inputs. Below 4 the approximations' public constants do not resolve.
# Every approximation is tested at every f in this range (tests/test_ranges.py).
FRAC_BITS_MIN, FRAC_BITS_MAX = 4, 24


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point configuration: values are ``round(x * 2^frac_bits)`` in Z_2^64, frac_bits in [4, 24]."""

    frac_bits: int = 16

    def __post_init__(self) -> None:
        if not FRAC_BITS_MIN <= self.frac_bits <= FRAC_BITS_MAX:
            raise ConfigError(
                f"frac_bits: expected an integer in [{FRAC_BITS_MIN}, {FRAC_BITS_MAX}], got {self.frac_bits} "
                f"(products of two values must stay below 2^(62 - 2 frac_bits): 2^14 at 24, too small beyond)")

    @property
    def product_bound(self) -> float:
        """Largest |x * y| (real units) one product of two f-bit values can hold exactly: 2^(62 - 2f)."""
        return 2.0 ** (62 - 2 * self.frac_bits)


@dataclass
class PartyContext:
    """Everything one party needs to run protocols.

    Attributes:
        rank: SERVER0, SERVER1, DEALER or OWNER.
        comm: this party's communicator (its cost tracker is ``cost``).
        fxp: fixed-point configuration, identical on all parties.
        dealer: source of correlated randomness (servers only).
        prg_owner: PRG shared by the data owner and server 0 (server 0 derives its input shares from it).
        prg_peer: PRG shared by the two servers.
    """

    rank: int
    comm: Communicator
    fxp: FixedPoint
    dealer: DealerClient | None = None
    prg_owner: PRG | None = None
    prg_peer: PRG | None = None
    _owner_stream: int = 0

    @property
    def cost(self) -> CostTracker:
        return self.comm.cost

    @property
    def is_server(self) -> bool:
        return self.rank in (SERVER0, SERVER1)

    @property
    def peer(self) -> int:
        """The other server."""
        if not self.is_server:
            raise RuntimeError(f"{self.name} has no server peer")
        return 1 - self.rank

    @property
    def name(self) -> str:
        return PARTY_NAMES[self.rank]

    @property
    def f(self) -> int:
        return self.fxp.frac_bits

    def next_owner_stream(self) -> int:
        """Index of the next owner<->server0 PRG stream (advanced identically on both sides)."""
        i = self._owner_stream
        self._owner_stream += 1
        return i


__all__ = ["DEALER", "FRAC_BITS_MAX", "FRAC_BITS_MIN", "OWNER", "SERVER0", "SERVER1", "FixedPoint", "PartyContext"]
