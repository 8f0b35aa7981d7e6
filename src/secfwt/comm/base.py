"""Message framing and the transport-independent communicator.

A message is a :class:`Frame`: a small JSON header (sequence number, protocol-step tag, kind, dtype, shape)
followed by a raw payload. The receiver states what it expects (tag, and for tensors shape and dtype) and
gets :class:`~secfwt.errors.ProtocolMismatchError` naming the difference when the frame does not match.
Sequence numbers are per ordered pair of parties, so a lost or reordered message is detected too.

Wire format (TCP): ``b"SF1" | u32 header length | header JSON | u64 payload length | payload``.

Size limits (a receiver enforces them before it stores anything, see :class:`FrameReader`): a header is at
most ``MAX_HEADER_BYTES`` = 64 KiB; a tensor payload must be exactly numel(shape) x itemsize(dtype) bytes and
at most ``max_payload`` (default ``MAX_PAYLOAD_BYTES`` = 2^32 = 4 GiB); a JSON or abort payload at most
``MAX_JSON_BYTES`` = 1 MiB. The largest legitimate messages are the dealer's comparison material for a whole
chunk of rows: ``ltz_select`` on the 2K + 1 stacked copies of an activation input sends a (7, (2K + 1) n)
int64 tensor, i.e. 1.76 GB for SiLU (K = 2) on 64 rows x 64 tokens x 1536 (SmolLM2-135M) and 4.23 GB for
GELU (K = 1) on 64 rows x 128 tokens x 3072 (BERT-base); a 49152 x 576 int64 word table is 226 MB. A sender
checks its own messages against the same limits, so an in-process run fails where a TCP run would.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from secfwt.cost import CostTracker
from secfwt.errors import CommError, PeerAbortedError, ProtocolMismatchError

SERVER0, SERVER1, DEALER, OWNER = 0, 1, 2, 3
PARTY_NAMES = {SERVER0: "server0", SERVER1: "server1", DEALER: "dealer", OWNER: "owner"}
PARTY_RANKS = {v: k for k, v in PARTY_NAMES.items()}

MAGIC = b"SF1"
_PREFIX = struct.Struct("!3sI")
_PAYLOAD_LEN = struct.Struct("!Q")
OVERHEAD = _PREFIX.size + _PAYLOAD_LEN.size
MAX_HEADER_BYTES = 1 << 16
MAX_PAYLOAD_BYTES = 1 << 32  # default per-message cap for tensors (see the module docstring)
MAX_JSON_BYTES = 1 << 20  # cap for JSON control messages and abort reasons

_DTYPES: dict[str, torch.dtype] = {
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "float64": torch.float64,
    "float32": torch.float32,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {k: v.itemsize for k, v in _DTYPES.items()}


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

    def wire(self) -> bytes | memoryview:
        """The same bytes as :meth:`encode`, with one copy of a tensor's payload instead of two: the frame is
        assembled in one uninitialised buffer (no ``tobytes`` copy, no concatenation, no zero fill). The
        tensor is copied here, so later in-place changes to it do not reach the wire."""
        if self.kind != "tensor":
            return self.encode()
        assert self.tensor is not None
        t = self.tensor.contiguous().reshape(-1)
        nbytes = t.numel() * t.element_size()
        h = self.header()
        head = _PREFIX.pack(MAGIC, len(h)) + h + _PAYLOAD_LEN.pack(nbytes)
        out = torch.empty(len(head) + nbytes, dtype=torch.uint8)
        view = out.numpy().data
        view[: len(head)] = head
        if nbytes:
            out[len(head) :] = t.view(torch.uint8)
        return view

    @staticmethod
    def decode_header(raw: bytes) -> Frame:
        try:
            h = json.loads(raw)
            return Frame(
                seq=int(h["seq"]), tag=str(h["tag"]), kind=str(h["kind"]), dtype=str(h["dtype"]),
                shape=tuple(int(s) for s in h["shape"]),
            )
        except (ValueError, KeyError, TypeError, OverflowError, AttributeError) as e:
            raise ProtocolMismatchError(f"malformed message header: {e}") from e

    def check_payload_length(self, plen: int, max_payload: int = MAX_PAYLOAD_BYTES) -> None:
        """Check a claimed payload length against this header, before any payload byte is stored.

        A tensor's payload must be exactly numel(shape) x itemsize(dtype) bytes and at most ``max_payload``;
        any other kind at most ``MAX_JSON_BYTES`` (and ``max_payload``). Raises ProtocolMismatchError."""
        if self.kind != "tensor":
            limit = min(MAX_JSON_BYTES, max_payload)
            if plen > limit:
                raise ProtocolMismatchError(
                    f"message '{self.tag}': {self.kind} payload of {plen} bytes exceeds the limit of {limit} bytes")
            return
        size = _ITEMSIZE.get(self.dtype)
        if size is None:
            raise ProtocolMismatchError(f"message '{self.tag}': unknown dtype '{self.dtype}'")
        if any(d < 0 for d in self.shape):
            raise ProtocolMismatchError(f"message '{self.tag}': header shape {self.shape} has a negative dimension")
        expected = math.prod(self.shape) * size  # Python integers: no overflow
        if plen != expected:
            raise ProtocolMismatchError(
                f"message '{self.tag}': payload has {plen} bytes, header shape {self.shape} "
                f"of {self.dtype} needs {expected}"
            )
        if plen > max_payload:
            raise ProtocolMismatchError(
                f"message '{self.tag}': payload of {plen} bytes (shape {self.shape} of {self.dtype}) exceeds "
                f"the limit of {max_payload} bytes")

    def attach_payload(self, payload: bytes | bytearray | Tensor) -> None:
        """Decode the payload into :attr:`tensor` or :attr:`obj`. A bytearray or a uint8 tensor is used in
        place (no copy): the caller hands it over."""
        if self.kind == "tensor":
            self.check_payload_length(len(payload), max_payload=len(payload))
            dt = _DTYPES[self.dtype]
            if isinstance(payload, Tensor):
                flat = payload
            elif len(payload) == 0:
                flat = torch.empty(0, dtype=torch.uint8)
            else:
                flat = torch.frombuffer(payload if isinstance(payload, bytearray) else bytearray(payload),
                                        dtype=torch.uint8)
            try:
                self.tensor = flat.view(dt).reshape(self.shape)
            except (RuntimeError, TypeError, ValueError, OverflowError) as e:
                raise ProtocolMismatchError(
                    f"message '{self.tag}': header shape {self.shape} is not a valid tensor shape: {e}"
                ) from None
        else:
            raw = payload.numpy().tobytes() if isinstance(payload, Tensor) else payload
            try:
                self.obj = json.loads(raw) if raw else None
            except (ValueError, RecursionError) as e:
                raise ProtocolMismatchError(f"message '{self.tag}': malformed JSON payload: {e}") from e


def tensor_frame(seq: int, tag: str, t: Tensor) -> Frame:
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise TypeError(f"cannot send tensors of dtype {t.dtype}")
    return Frame(seq=seq, tag=tag, kind="tensor", dtype=name, shape=tuple(t.shape), tensor=t)


# Payload buffering (FrameReader): a claimed length costs nothing until bytes arrive. The first bytes go into
# a bytearray of at most _FIRST bytes that grows 4x as it fills, up to min(plen, _HEAD); a payload of at most
# _HEAD bytes ends in that bytearray, which becomes the tensor's storage as is. A longer payload gets its final
# buffer (torch.empty: pages are only touched as bytes arrive) once _HEAD bytes have arrived; the head is
# copied in and the rest is received straight into place. Extra copying is thus at most _FIRST + _HEAD / 4
# + _HEAD (5.25 MiB) per message, whatever its size, and memory in use follows the bytes received.
_FIRST = 1 << 18
_HEAD = 1 << 22


class FrameReader:
    """Incremental decoder of one byte stream of frames: write into :meth:`target`, report with :meth:`consumed`.

    Every length is checked when it is read, before anything is allocated for it (header length, then the
    payload length against the header, see :meth:`Frame.check_payload_length`), and the payload buffer grows
    with the bytes received. ``partial`` is the number of bytes of the frame in progress received so far;
    ``last_size`` the wire size of the last complete frame.
    """

    def __init__(self, where: str, max_payload: int = MAX_PAYLOAD_BYTES) -> None:
        self.where = where
        self.max_payload = max_payload
        self.partial = 0
        self.last_size = 0
        self._stage = "prefix"
        self._buf: bytearray | memoryview = bytearray(_PREFIX.size)
        self._filled = 0
        self._plen = 0
        self._final: Tensor | None = None
        self._frame: Frame | None = None

    @property
    def mid_frame(self) -> bool:
        return self.partial > 0

    @property
    def buffered(self) -> int:
        """Bytes currently allocated for the frame in progress (tests: a claim alone allocates nothing)."""
        return len(self._buf)

    def target(self) -> memoryview:
        return memoryview(self._buf)[self._filled :]

    def _expect(self, stage: str, n: int) -> None:
        self._stage, self._buf, self._filled = stage, bytearray(n), 0

    def consumed(self, n: int) -> Frame | None:
        """Account ``n`` bytes written into :meth:`target`; returns a frame when one is complete.

        Raises ProtocolMismatchError for a bad magic, an oversized header or payload, a payload length that
        does not match the header, or a malformed frame.
        """
        self._filled += n
        self.partial += n
        while self._filled == len(self._buf):
            done = self._advance()
            if done is not None:
                return done
        return None

    def _error(self, e: ProtocolMismatchError) -> ProtocolMismatchError:
        return ProtocolMismatchError(f"{self.where}: {e}")

    def _advance(self) -> Frame | None:
        if self._stage == "prefix":
            magic, hlen = _PREFIX.unpack(bytes(self._buf))
            if magic != MAGIC:
                raise ProtocolMismatchError(f"{self.where}: bad message magic {magic!r} (expected {MAGIC!r})")
            if not 0 < hlen <= MAX_HEADER_BYTES:
                raise ProtocolMismatchError(f"{self.where}: message header length {hlen} out of range")
            self._expect("header", hlen)
        elif self._stage == "header":
            try:
                self._frame = Frame.decode_header(bytes(self._buf))
            except ProtocolMismatchError as e:
                raise self._error(e) from None
            self._expect("plen", _PAYLOAD_LEN.size)
        elif self._stage == "plen":
            (plen,) = _PAYLOAD_LEN.unpack(bytes(self._buf))
            assert self._frame is not None
            try:
                self._frame.check_payload_length(plen, self.max_payload)
            except ProtocolMismatchError as e:
                raise self._error(e) from None
            self._plen = plen
            self._expect("payload", min(plen, _FIRST))
            if plen == 0:
                return self._finish()
        elif self._filled < self._plen:
            self._grow()
        else:
            return self._finish()
        return None

    def _grow(self) -> None:
        """The payload buffer is full but the payload is not: enlarge it (see the comment above the class)."""
        have = self._filled
        if have < _HEAD:
            bigger = bytearray(min(self._plen, _HEAD, 4 * have))
            bigger[:have] = self._buf
            self._buf = bigger
        else:
            self._final = torch.empty(self._plen, dtype=torch.uint8)
            view = self._final.numpy().data
            view[:have] = self._buf
            self._buf = view

    def _finish(self) -> Frame:
        frame = self._frame
        assert frame is not None
        payload: bytearray | Tensor
        if self._final is not None:
            payload = self._final
        else:
            assert isinstance(self._buf, bytearray)
            payload = self._buf
        self._frame, self._final = None, None
        self.last_size, self.partial = self.partial, 0
        self._expect("prefix", _PREFIX.size)
        try:
            frame.attach_payload(payload)
        except ProtocolMismatchError as e:
            raise self._error(e) from None
        return frame


class Communicator(ABC):
    """Point-to-point messaging for one party, with per-peer sequence numbers and cost accounting.

    Subclasses implement :meth:`_send_frame` and :meth:`_recv_frame` for one transport. ``max_payload`` caps
    the payload of one tensor message (sent or received; JSON messages: ``MAX_JSON_BYTES``).
    """

    def __init__(self, rank: int, cost: CostTracker | None = None, timeout: float = 60.0,
                 max_payload: int = MAX_PAYLOAD_BYTES) -> None:
        if max_payload <= 0:
            raise ValueError(f"max_payload: expected a positive number of bytes, got {max_payload}")
        self.rank = rank
        self.cost = cost if cost is not None else CostTracker()
        self.timeout = timeout
        self.max_payload = max_payload
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

    def _check_size(self, peer: int, tag: str, nbytes: int, limit: int) -> None:
        """The receiver would refuse a payload beyond ``limit``: refuse it here, before any state changes."""
        if nbytes > limit:
            raise CommError(
                f"{self.name}: message '{tag}' to {PARTY_NAMES.get(peer, f'party{peer}')} has a payload of "
                f"{nbytes} bytes, above the per-message limit of {limit} bytes (send it in smaller pieces, "
                f"e.g. fewer rows per chunk)")

    def send(self, peer: int, tag: str, value: Tensor) -> None:
        """Send a tensor to ``peer`` for the protocol step ``tag``; CommError if it exceeds ``max_payload``."""
        self._check_size(peer, tag, value.numel() * value.element_size(), self.max_payload)
        frame = tensor_frame(self._next_send(peer), tag, value)
        self._account(peer, frame.wire_size(), sent=True)
        self._send_frame(peer, frame)

    def send_json(self, peer: int, tag: str, obj: Any) -> None:
        """Send a small JSON-serialisable control message (at most ``MAX_JSON_BYTES`` encoded)."""
        nbytes = len(json.dumps(obj, separators=(",", ":")).encode())
        self._check_size(peer, tag, nbytes, min(MAX_JSON_BYTES, self.max_payload))
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
        """Best effort: tell ``peers`` that this party failed, so they stop at once instead of timing out.

        The reason is cut to ``MAX_JSON_BYTES`` // 16 characters (<= 12 bytes each once JSON-escaped), so
        the receiver's control-message limit always admits it."""
        text, most = f"{self.name}: {reason}", MAX_JSON_BYTES // 16
        if len(text) > most:
            text = text[: most - 16] + " ... (truncated)"
        for p in peers:
            if p == self.rank:
                continue
            with contextlib.suppress(Exception):  # the peer may be gone already
                self._send_frame(p, Frame(seq=-1, tag="abort", kind="abort", obj=text))
