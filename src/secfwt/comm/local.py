"""In-process transport: parties are threads of one process exchanging frames through queues.

Frames are not serialised (tensors are cloned), but their wire size is accounted exactly as over TCP, so
costs reported in-process equal those of a real-process run.
"""

from __future__ import annotations

import queue

from secfwt.comm.base import PARTY_NAMES, Communicator, Frame
from secfwt.cost import CostTracker
from secfwt.errors import PeerTimeoutError


class LocalHub:
    """The set of queues connecting the in-process parties; one hub per run."""

    def __init__(self, ranks: list[int]) -> None:
        self.ranks = list(ranks)
        self.queues: dict[tuple[int, int], queue.Queue[Frame]] = {
            (a, b): queue.Queue() for a in ranks for b in ranks if a != b
        }

    def communicator(self, rank: int, timeout: float = 60.0, cost: CostTracker | None = None) -> LocalCommunicator:
        return LocalCommunicator(self, rank, timeout=timeout, cost=cost)


class LocalCommunicator(Communicator):
    def __init__(self, hub: LocalHub, rank: int, timeout: float = 60.0, cost: CostTracker | None = None) -> None:
        super().__init__(rank, cost=cost, timeout=timeout)
        self.hub = hub

    def _send_frame(self, peer: int, frame: Frame) -> None:
        if frame.tensor is not None:
            frame.tensor = frame.tensor.clone()
        self.hub.queues[(self.rank, peer)].put(frame)

    def _recv_frame(self, peer: int, timeout: float) -> Frame:
        try:
            return self.hub.queues[(peer, self.rank)].get(timeout=timeout)
        except queue.Empty:
            raise PeerTimeoutError(
                f"{self.name}: no message from {PARTY_NAMES.get(peer, peer)} within {timeout:g} s"
            ) from None
