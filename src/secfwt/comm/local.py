"""In-process transport: parties are threads of one process exchanging frames through queues.

Frames are not serialised (tensors are cloned), but their wire size is accounted exactly as over TCP, so
costs reported in-process equal those of a real-process run. The same per-message size limits apply to
sending (``max_payload``, see :mod:`secfwt.comm.base`), so a run that works in-process is not refused over
TCP. The queues are unbounded: the parties are threads of one trusted process, and a bounded put would
block a sender (the TCP transport bounds its inboxes by pausing reads instead, never blocking a send).
"""

from __future__ import annotations

import queue

from secfwt.comm.base import MAX_PAYLOAD_BYTES, PARTY_NAMES, Communicator, Frame
from secfwt.cost import CostTracker
from secfwt.errors import PeerTimeoutError


class LocalHub:
    """The set of queues connecting the in-process parties; one hub per run."""

    def __init__(self, ranks: list[int]) -> None:
        self.ranks = list(ranks)
        self.queues: dict[tuple[int, int], queue.Queue[Frame]] = {
            (a, b): queue.Queue() for a in ranks for b in ranks if a != b
        }

    def communicator(self, rank: int, timeout: float = 60.0, cost: CostTracker | None = None,
                     max_payload: int = MAX_PAYLOAD_BYTES) -> LocalCommunicator:
        return LocalCommunicator(self, rank, timeout=timeout, cost=cost, max_payload=max_payload)


class LocalCommunicator(Communicator):
    def __init__(self, hub: LocalHub, rank: int, timeout: float = 60.0, cost: CostTracker | None = None,
                 max_payload: int = MAX_PAYLOAD_BYTES) -> None:
        super().__init__(rank, cost=cost, timeout=timeout, max_payload=max_payload)
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
