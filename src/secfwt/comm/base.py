"""Message framing and the transport-independent communicator.

A message is a :class:`Frame`: a small JSON header (sequence number, protocol-step tag, kind, dtype, shape)
followed by a raw payload. The receiver states what it expects (tag, and for tensors shape and dtype) and
gets :class:`~secfwt.errors.ProtocolMismatchError` naming the difference when the frame does not match.
Sequence numbers are per ordered pair of parties, so a lost or reordered message is detected too.

Wire format (TCP): ``b"SF1" | u32 header length | header JSON | u64 payload length | payload``.
"""

from __future__ import annotations

import contextlib
import json
import struct
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from secfwt.cost import CostTracker
from secfwt.errors import PeerAbortedError, ProtocolMismatchError

SERVER0, SERVER1, DEALER, OWNER = 0, 1, 2, 3
PARTY_NAMES = {SERVER0: "server0", SERVER1: "server1", DEALER: "dealer", OWNER: "owner"}
PARTY_RANKS = {v: k for k, v in PARTY_NAMES.items()}

MAGIC = b"SF1"
_PREFIX = struct.Struct("!3sI")
_PAYLOAD_LEN = struct.Struct("!Q")
OVERHEAD = _PREFIX.size + _PAYLOAD_LEN.size

_DTYPES: dict[str, torch.dtype] = {
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "float64": torch.float64,
    "float32": torch.float32,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass
class Frame:
    """One message: header fields plus payload (a tensor, a JSON object, or an abort reason)."""

    seq: int
    tag: str
    kind: str  # "tensor" | "json" | "abort"
    dtype: str = ""
    shape: tuple[int, ...] = ()
    tensor: Tensor | None = None
    obj: Any = None

    def header(self) -> bytes:
        return json.dumps(
            {"seq": self.seq, "tag": self.tag, "kind": self.kind, "dtype": self.dtype, "shape": list(self.shape)},
            separators=(",", ":"),
        ).encode()

    def payload(self) -> bytes:
        if self.kind == "tensor":
            assert self.tensor is not None
            return self.tensor.contiguous().numpy().tobytes()
        return json.dumps(self.obj, separators=(",", ":")).encode()

    def payload_nbytes(self) -> int:
        if self.kind == "tensor":
            assert self.tensor is not None
            return self.tensor.numel() * self.tensor.element_size()
        return len(json.dumps(self.obj, separators=(",", ":")).encode())

    def wire_size(self) -> int:
        return OVERHEAD + len(self.header()) + self.payload_nbytes()

    def encode(self) -> bytes:
        h = self.header()
        p = self.payload()
        return _PREFIX.pack(MAGIC, len(h)) + h + _PAYLOAD_LEN.pack(len(p)) + p

    @staticmethod
    def decode_header(raw: bytes) -> Frame:
        try:
            h = json.loads(raw)
            return Frame(
                seq=int(h["seq"]), tag=str(h["tag"]), kind=str(h["kind"]), dtype=str(h["dtype"]),
                shape=tuple(int(s) for s in h["shape"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ProtocolMismatchError(f"malformed message header: {e}") from e

    def attach_payload(self, payload: bytes) -> None:
        if self.kind == "tensor":
            dt = _DTYPES.get(self.dtype)
            if dt is None:
                raise ProtocolMismatchError(f"message '{self.tag}': unknown dtype '{self.dtype}'")
            n = int(np.prod(self.shape)) if self.shape else 1
            expected = n * torch.empty((), dtype=dt).element_size()
            if len(payload) != expected:
                raise ProtocolMismatchError(
                    f"message '{self.tag}': payload has {len(payload)} bytes, header shape {self.shape} "
                    f"of {self.dtype} needs {expected}"
                )
            t = torch.frombuffer(bytearray(payload), dtype=dt) if expected else torch.empty(0, dtype=dt)
            self.tensor = t.reshape(self.shape)
        else:
            try:
                self.obj = json.loads(payload) if payload else None
            except ValueError as e:
                raise ProtocolMismatchError(f"message '{self.tag}': malformed JSON payload: {e}") from e


def tensor_frame(seq: int, tag: str, t: Tensor) -> Frame:
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise TypeError(f"cannot send tensors of dtype {t.dtype}")
    return Frame(seq=seq, tag=tag, kind="tensor", dtype=name, shape=tuple(t.shape), tensor=t)


class Communicator(ABC):
    """Point-to-point messaging for one party, with per-peer sequence numbers and cost accounting.

    Subclasses implement :meth:`_send_frame` and :meth:`_recv_frame` for one transport.
    """

    def __init__(self, rank: int, cost: CostTracker | None = None, timeout: float = 60.0) -> None:
        self.rank = rank
        self.cost = cost if cost is not None else CostTracker()
        self.timeout = timeout
        self._send_seq: dict[int, int] = {}
        self._recv_seq: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return PARTY_NAMES.get(self.rank, f"party{self.rank}")

    # -- transport hooks -------------------------------------------------------------------------
    @abstractmethod
    def _send_frame(self, peer: int, frame: Frame) -> None: ...

    @abstractmethod
    def _recv_frame(self, peer: int, timeout: float) -> Frame: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release transport resources."""

    # -- public API ----------------------------------------------------------------------------
    def _next_send(self, peer: int) -> int:
        with self._lock:
            s = self._send_seq.get(peer, 0)
            self._send_seq[peer] = s + 1
            return s

    def _account(self, peer: int, nbytes: int, sent: bool) -> None:
        dealer = DEALER in (peer, self.rank)
        if sent:
            self.cost.on_send(nbytes, dealer=dealer)
        else:
            self.cost.on_recv(nbytes, dealer=dealer)

    def send(self, peer: int, tag: str, value: Tensor) -> None:
        """Send a tensor to ``peer`` for the protocol step ``tag``."""
        frame = tensor_frame(self._next_send(peer), tag, value)
        self._account(peer, frame.wire_size(), sent=True)
        self._send_frame(peer, frame)

    def send_json(self, peer: int, tag: str, obj: Any) -> None:
        """Send a small JSON-serialisable control message."""
        frame = Frame(seq=self._next_send(peer), tag=tag, kind="json", obj=obj)
        self._account(peer, frame.wire_size(), sent=True)
        self._send_frame(peer, frame)

    def _recv_checked(self, peer: int, tag: str, kind: str) -> Frame:
        frame = self._recv_frame(peer, self.timeout)
        pname = PARTY_NAMES.get(peer, f"party{peer}")
        if frame.kind == "abort":
            raise PeerAbortedError(f"{pname} aborted the run: {frame.obj}")
        expected_seq = self._recv_seq.get(peer, 0)
        if frame.seq != expected_seq:
            raise ProtocolMismatchError(
                f"{self.name}: message from {pname} out of order: expected #{expected_seq}, got #{frame.seq} "
                f"('{frame.tag}')"
            )
        self._recv_seq[peer] = expected_seq + 1
        if frame.tag != tag or frame.kind != kind:
            raise ProtocolMismatchError(
                f"{self.name}: expected {kind} '{tag}' from {pname}, got {frame.kind} '{frame.tag}' "
                f"(the parties are running different protocol steps)"
            )
        self._account(peer, frame.wire_size(), sent=False)
        return frame

    def recv(
        self,
        peer: int,
        tag: str,
        shape: tuple[int, ...] | torch.Size | None = None,
        dtype: torch.dtype | None = torch.int64,
    ) -> Tensor:
        """Receive a tensor for step ``tag``; checks shape and dtype when given."""
        frame = self._recv_checked(peer, tag, "tensor")
        assert frame.tensor is not None
        t = frame.tensor
        pname = PARTY_NAMES.get(peer, f"party{peer}")
        if dtype is not None and t.dtype != dtype:
            raise ProtocolMismatchError(f"'{tag}' from {pname}: expected dtype {dtype}, got {t.dtype}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ProtocolMismatchError(
                f"'{tag}' from {pname}: expected shape {tuple(shape)}, got {tuple(t.shape)}"
            )
        return t

    def recv_json(self, peer: int, tag: str) -> Any:
        return self._recv_checked(peer, tag, "json").obj

    def abort(self, reason: str, peers: list[int]) -> None:
        """Best effort: tell ``peers`` that this party failed, so they stop at once instead of timing out."""
        for p in peers:
            if p == self.rank:
                continue
            with contextlib.suppress(Exception):  # the peer may be gone already
                self._send_frame(p, Frame(seq=-1, tag="abort", kind="abort", obj=f"{self.name}: {reason}"))
