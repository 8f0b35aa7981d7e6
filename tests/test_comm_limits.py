"""Resource limits of the transport: size checks before allocation, bounded inboxes, stalled connections."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
import tracemalloc
from typing import Any

import pytest
import torch

from secfwt.comm.base import DEALER, MAX_JSON_BYTES, OWNER, SERVER0, SERVER1, Frame, FrameReader, tensor_frame
from secfwt.comm.certs import TlsFiles, write_party_certs
from secfwt.comm.local import LocalHub
from secfwt.comm.tcp import TcpCommunicator
from secfwt.errors import AuthError, CommError, PeerAbortedError, PeerClosedError, ProtocolMismatchError
from secfwt.launch import free_ports

KiB, MiB = 1 << 10, 1 << 20
TLS_RECORD = 16 * KiB


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    return write_party_certs(tmp_path_factory.mktemp("certs"))


def _addresses(ranks: list[int]) -> dict[int, tuple[str, int]]:
    return dict(zip(ranks, (("127.0.0.1", p) for p in free_ports(len(ranks))), strict=True))


def _start(certs: dict[str, TlsFiles], addrs: dict[int, tuple[str, int]], rank: int, comms: dict[int, Any],
           errors: dict[int, BaseException], **kw: Any) -> threading.Thread:
    name = {SERVER0: "server0", SERVER1: "server1", DEALER: "dealer"}[rank]

    def make() -> None:
        try:
            comms[rank] = TcpCommunicator(rank, addrs, certs[name], sorted(addrs), **kw)
        except BaseException as e:  # noqa: BLE001 - inspected by the tests
            errors[rank] = e

    t = threading.Thread(target=make)
    t.start()
    return t


def _pair(certs: dict[str, TlsFiles], **kw: Any) -> dict[int, TcpCommunicator]:
    addrs = _addresses([SERVER0, SERVER1])
    comms: dict[int, TcpCommunicator] = {}
    errors: dict[int, BaseException] = {}
    threads = [_start(certs, addrs, r, comms, errors, timeout=5.0, connect_timeout=5.0, **kw) for r in addrs]
    for t in threads:
        t.join()
    assert not errors, errors
    return comms


def _header(tag: str, kind: str = "tensor", dtype: str = "int64", shape: tuple[int, ...] = ()) -> bytes:
    h = json.dumps({"seq": 0, "tag": tag, "kind": kind, "dtype": dtype, "shape": list(shape)}).encode()
    return b"SF1" + struct.pack("!I", len(h)) + h


def _feed(reader: FrameReader, data: bytes, chunk: int) -> list[Frame]:
    """Write ``data`` into the reader the way a socket would, at most ``chunk`` bytes per call."""
    frames, pos = [], 0
    while pos < len(data):
        target = reader.target()
        n = min(len(target), chunk, len(data) - pos)
        target[:n] = data[pos : pos + n]
        pos += n
        frame = reader.consumed(n)
        if frame is not None:
            frames.append(frame)
    return frames


# -- checks at header time, before any allocation ------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "dtype", "plen", "match"),
    [
        ((1 << 37,), "int64", 1 << 40, r"message 't': payload of 1099511627776 bytes .* exceeds the limit of "
                                       r"4294967296 bytes"),
        ((2,), "int64", 1 << 40, r"message 't': payload has 1099511627776 bytes, header shape \(2,\) of int64 "
                                 r"needs 16"),
        ((-4, -2), "int64", 64, r"message 't': header shape \(-4, -2\) has a negative dimension"),
        ((4,), "complex128", 64, "message 't': unknown dtype 'complex128'"),
        ((1 << 40, 1 << 40, 1 << 40), "int64", 0, f"payload has 0 bytes, header shape .* needs {8 << 120}"),
    ],
)
def test_claims_are_checked_before_anything_is_allocated(shape: tuple[int, ...], dtype: str, plen: int,
                                                         match: str) -> None:
    reader = FrameReader("server1: message from server0")
    data = _header("t", dtype=dtype, shape=shape) + struct.pack("!Q", plen)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolMismatchError, match=match) as info:
            _feed(reader, data, chunk=1 << 16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value).startswith("server1: message from server0: message 't'")
    assert peak < 256 * KiB
    assert reader.buffered <= 8  # still the 8-byte length field: no payload buffer was made


def test_control_messages_have_a_small_limit() -> None:
    reader = FrameReader("x")
    with pytest.raises(ProtocolMismatchError, match=f"json payload of {MAX_JSON_BYTES + 1} bytes exceeds the limit "
                                                    f"of {MAX_JSON_BYTES} bytes"):
        _feed(reader, _header("cmd", kind="json", dtype="") + struct.pack("!Q", MAX_JSON_BYTES + 1), 1 << 16)
    reader = FrameReader("x")
    with pytest.raises(ProtocolMismatchError, match="abort payload of 1048577 bytes"):
        _feed(reader, _header("abort", kind="abort", dtype="") + struct.pack("!Q", MAX_JSON_BYTES + 1), 1 << 16)


def test_a_claim_costs_nothing_until_the_bytes_arrive() -> None:
    """A valid 1 GiB claim with a few bytes behind it holds a small buffer; the buffer follows the bytes."""
    n = 1 << 27  # int64 -> 1 GiB, within the default limit
    reader = FrameReader("x")
    tracemalloc.start()
    try:
        _feed(reader, _header("big", shape=(n,)) + struct.pack("!Q", 8 * n) + bytes(1000), chunk=1 << 16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.partial > 1000 and reader.buffered <= 256 * KiB
    assert peak < 2 * MiB
    _feed(reader, bytes(2 * MiB), chunk=1 << 16)
    assert reader.buffered <= 4 * MiB  # grown with the bytes, the final buffer not yet made


_SIZES = [0, 1, 5, 32 * KiB, 32 * KiB + 3, 128 * KiB, 512 * KiB, 512 * KiB + 1, 700_000]  # int64 elements


@pytest.mark.parametrize(("numel", "chunk"), [(n, c) for n in _SIZES for c in (16 * KiB, 1 << 22)]
                         + [(n, 7) for n in _SIZES if n < 100_000])
def test_payload_growth_keeps_every_byte(numel: int, chunk: int) -> None:
    """Payloads below, at and above every growth step (256 KiB, 1 MiB, 4 MiB; up to 5.6 MB) arrive intact,
    whatever the pieces they arrive in."""
    g = torch.Generator().manual_seed(numel)
    values = [torch.randint(-(2**63), 2**63 - 1, (numel,), dtype=torch.int64, generator=g),
              torch.randint(0, 255, (numel % 1000,), dtype=torch.uint8, generator=g).bool()]
    wire = b"".join(tensor_frame(i, f"t{i}", v).encode() for i, v in enumerate(values))
    wire += Frame(seq=2, tag="j", kind="json", obj={"n": numel}).encode()
    reader = FrameReader("x")
    frames = _feed(reader, wire, chunk)
    assert [f.tag for f in frames] == ["t0", "t1", "j"]
    for f, v in zip(frames, values, strict=False):
        assert f.tensor is not None and f.tensor.dtype == v.dtype and torch.equal(f.tensor, v)
    assert frames[2].obj == {"n": numel}
    assert reader.partial == 0 and not reader.mid_frame


def test_huge_claim_over_tls_is_refused_without_allocating(certs: dict[str, TlsFiles]) -> None:
    comms = _pair(certs)
    try:
        link = comms[SERVER1]._links[SERVER0]
        tracemalloc.start()
        try:
            # 1 GiB claimed, 4 KiB sent: the receiver holds a small buffer while it waits for the rest.
            comms[SERVER0]._send_raw(SERVER1, _header("a", shape=(1 << 27,)) + struct.pack("!Q", 1 << 30)
                                     + bytes(4096))
            t0 = time.monotonic()
            while link.reader.partial < 4096 and time.monotonic() - t0 < 5:
                time.sleep(0.01)
            assert link.reader.partial >= 4096 and link.reader.buffered <= 256 * KiB
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * MiB
    finally:
        for c in comms.values():
            c.close(flush_timeout=0.0)
    # A claim beyond the limit is refused at once, naming the message; the link is then broken.
    comms = _pair(certs, max_payload=1 * MiB)
    try:
        comms[SERVER0]._send_raw(SERVER1, _header("a", shape=(1 << 37,)) + struct.pack("!Q", 1 << 40))
        with pytest.raises(ProtocolMismatchError, match="server1: message from server0: message 'a': payload of "
                                                        "1099511627776 bytes .* exceeds the limit of 1048576"):
            comms[SERVER1].recv(SERVER0, "a")
        assert comms[SERVER1]._links[SERVER0].reader.buffered <= 8
    finally:
        for c in comms.values():
            c.close(flush_timeout=0.0)


def test_senders_refuse_what_receivers_would_refuse(certs: dict[str, TlsFiles]) -> None:
    hub = LocalHub([SERVER0, SERVER1])
    a, b = hub.communicator(SERVER0, timeout=1.0, max_payload=1000), hub.communicator(SERVER1, timeout=1.0)
    with pytest.raises(CommError, match="server0: message 'w' to server1 has a payload of 1008 bytes, above the "
                                        "per-message limit of 1000 bytes"):
        a.send(SERVER1, "w", torch.zeros(126, dtype=torch.int64))
    with pytest.raises(CommError, match="server1: message 'cmd' to server0 has a payload of 1048578 bytes, above "
                                        "the per-message limit of 1048576 bytes"):
        b.send_json(SERVER0, "cmd", "x" * MAX_JSON_BYTES)
    a.send(SERVER1, "ok", torch.ones(125, dtype=torch.int64))  # nothing was consumed by the refusals
    b.send_json(SERVER0, "ok", "x" * (MAX_JSON_BYTES - 2))
    assert torch.equal(b.recv(SERVER0, "ok"), torch.ones(125, dtype=torch.int64))
    assert a.recv_json(SERVER1, "ok") == "x" * (MAX_JSON_BYTES - 2)
    assert a.cost.total().bytes_sent == b.cost.total().bytes_recv
    # An abort reason of any length still fits the receiver's control-message limit.
    comms = _pair(certs)
    try:
        comms[SERVER0].abort("y" * (3 * MAX_JSON_BYTES), [SERVER1])
        with pytest.raises(PeerAbortedError, match=r"server0: yyy.* \(truncated\)"):
            comms[SERVER1].recv(SERVER0, "a")
    finally:
        for c in comms.values():
            c.close(flush_timeout=0.0)


# -- back-pressure -------------------------------------------------------------------------------------------
def test_flood_is_held_within_the_inbox_bound_and_delivered_in_order(certs: dict[str, TlsFiles]) -> None:
    bound = 1 * MiB
    comms = _pair(certs, inbox_bytes=bound)
    try:
        recv_link, send_link = comms[SERVER1]._links[SERVER0], comms[SERVER0]._links[SERVER1]
        n, numel = 768, 8 * KiB  # 768 frames of 64 KiB = 48 MiB, far beyond the bound and the socket buffers
        for i in range(n):
            comms[SERVER0].send(SERVER1, "flood", torch.full((numel,), i, dtype=torch.int64))
        t0 = time.monotonic()
        while not recv_link._paused and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        time.sleep(0.3)
        assert recv_link._paused and bound <= recv_link.queued + recv_link.reader.partial < bound + TLS_RECORD
        assert not send_link.wait_flushed(0.0)  # TCP flow control reached the sender, whose send did not block
        # Writes go on while reads are paused: server1 can still talk to server0.
        comms[SERVER1].send(SERVER0, "reply", torch.arange(5))
        assert torch.equal(comms[SERVER0].recv(SERVER1, "reply"), torch.arange(5))
        for i in range(n):
            got = comms[SERVER1].recv(SERVER0, "flood", shape=(numel,))
            assert bool((got == i).all()), f"frame {i}"
        assert send_link.wait_flushed(5.0)
        assert recv_link.queued == 0
        assert recv_link.peak_held < bound + TLS_RECORD + 2 * KiB
    finally:
        for c in comms.values():
            c.close(flush_timeout=0.0)


def test_peer_close_while_reads_are_paused_is_reported(certs: dict[str, TlsFiles]) -> None:
    comms = _pair(certs, inbox_bytes=1 * MiB)
    try:
        for i in range(768):
            comms[SERVER0].send(SERVER1, "flood", torch.full((8 * KiB,), i, dtype=torch.int64))
        link = comms[SERVER1]._links[SERVER0]
        t0 = time.monotonic()
        while not link._paused and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        comms[SERVER0].close(flush_timeout=0.0)  # drops what it could not send yet
        got = 0
        t0 = time.monotonic()
        with pytest.raises(PeerClosedError, match="server1: server0 closed the connection"):
            while True:
                assert bool((comms[SERVER1].recv(SERVER0, "flood", shape=(8 * KiB,)) == got).all())
                got += 1
        assert 16 <= got < 768 and time.monotonic() - t0 < 3.0  # what arrived, in order, then the close
    finally:
        for c in comms.values():
            c.close(flush_timeout=0.0)


def test_a_frame_larger_than_the_inbox_bound_still_gets_through(certs: dict[str, TlsFiles]) -> None:
    comms = _pair(certs, inbox_bytes=256 * KiB)
    try:
        big = [torch.randint(-(2**63), 2**63 - 1, (400_000,), dtype=torch.int64) for _ in range(3)]  # 3.2 MB
        for t in big:
            comms[SERVER0].send(SERVER1, "big", t)
        for t in big:
            assert torch.equal(comms[SERVER1].recv(SERVER0, "big", shape=t.shape), t)
        assert comms[SERVER1]._links[SERVER0].peak_held < 3_200_000 + TLS_RECORD + 2 * KiB
    finally:
        for c in comms.values():
            c.close(flush_timeout=0.0)


# -- stalled connections at set-up -----------------------------------------------------------------------------
def _stall(port: int) -> socket.socket:
    """A raw TCP connection to ``port`` (retried until the party listens) that will never send a byte."""
    t0 = time.monotonic()
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=1.0)
        except OSError:
            if time.monotonic() - t0 > 5:
                raise
            time.sleep(0.01)


def test_stalled_connections_do_not_block_set_up(certs: dict[str, TlsFiles]) -> None:
    """Raw TCP clients that connect to the listeners and never send a ClientHello delay no one."""
    addrs = _addresses([SERVER0, SERVER1, DEALER])
    comms: dict[int, TcpCommunicator] = {}
    errors: dict[int, BaseException] = {}
    kw: dict[str, Any] = {"timeout": 5.0, "connect_timeout": 8.0}
    t0 = time.monotonic()
    threads = [_start(certs, addrs, SERVER0, comms, errors, **kw)]
    stalled = [_stall(addrs[SERVER0][1]), _stall(addrs[SERVER0][1])]
    time.sleep(0.2)  # let server0 accept them and start their handshakes first
    threads.append(_start(certs, addrs, SERVER1, comms, errors, **kw))
    stalled.append(_stall(addrs[SERVER1][1]))
    threads.append(_start(certs, addrs, DEALER, comms, errors, **kw))
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    try:
        assert not errors, errors
        assert len(stalled) == 3
        assert elapsed < 3.0  # the handshake time-out is 10 s and the connect time-out 8 s
        # The stalled connections were closed when set-up ended.
        for s in stalled:
            s.settimeout(2.0)
            assert s.recv(1) == b""
        comms[DEALER].send(SERVER0, "x", torch.arange(3))
        assert torch.equal(comms[SERVER0].recv(DEALER, "x"), torch.arange(3))
    finally:
        for s in stalled:
            s.close()
        for c in comms.values():
            c.close(flush_timeout=0.0)
    assert [t.name for t in threading.enumerate() if t.name.startswith("secfwt-")] == []


def test_a_service_whose_owner_handshake_fails_serves_the_next_owner(tmp_path, monkeypatch):
    """A service adopts the first owner's session id during set-up; if that owner's handshake then fails, the id is
    dropped and the next owner is served (before, every later owner was told "busy" forever)."""
    import secfwt.comm.tcp as tcp
    from secfwt.comm.tls import open_listener

    files = {name: f for name, f in write_party_certs(tmp_path / "certs").items()}
    ports = free_ports(2)
    addrs = {SERVER0: ("127.0.0.1", ports[0]), OWNER: ("127.0.0.1", ports[1])}
    listener = open_listener("127.0.0.1", ports[0])
    fail = {"left": 1}
    real = tcp.cert_sha256

    def flaky(sock):  # the first owner's connection breaks right after the service took its session id
        if fail["left"] and "handshake" in threading.current_thread().name:
            fail["left"] -= 1
            raise OSError("connection reset by the owner")
        return real(sock)

    monkeypatch.setattr(tcp, "cert_sha256", flaky)
    out: dict[str, Any] = {}

    def service() -> None:
        out["svc"] = TcpCommunicator(SERVER0, addrs, files["server0"], [SERVER0, OWNER], listener=listener,
                                     await_owner=True, connect_timeout=5.0)

    t = threading.Thread(target=service)
    t.start()
    with pytest.raises(AuthError):
        TcpCommunicator(OWNER, addrs, files["owner"], [SERVER0, OWNER], sid="first", connect_timeout=5.0)
    owner = TcpCommunicator(OWNER, addrs, files["owner"], [SERVER0, OWNER], sid="second", connect_timeout=5.0,
                            queue_timeout=5.0)
    t.join(10)
    try:
        assert out["svc"].sid == "second"
        owner.send_json(SERVER0, "x", {"ok": 1})
        assert out["svc"].recv_json(OWNER, "x") == {"ok": 1}
    finally:
        owner.close()
        out["svc"].close()
        listener.close()


def test_a_hello_that_overflows_the_decoder_is_refused_not_fatal(tmp_path):
    """A header field that cannot be decoded (seq = 1e999 overflows int()) from an authenticated peer is a refused
    connection: the set-up goes on and the real peer connects."""
    import ssl as _ssl

    from secfwt.comm.base import MAGIC
    from secfwt.comm.tls import make_ssl_context

    with pytest.raises(ProtocolMismatchError, match="malformed message header"):
        Frame.decode_header(b'{"seq":1e999,"tag":"hello","kind":"json","dtype":"","shape":[]}')
    with pytest.raises(ProtocolMismatchError):
        Frame(seq=0, tag="t", kind="tensor", dtype="int64", shape=(0, 10**30)).attach_payload(bytearray())
    files = write_party_certs(tmp_path / "certs")
    ports = free_ports(2)
    addrs = {SERVER0: ("127.0.0.1", ports[0]), SERVER1: ("127.0.0.1", ports[1])}
    out: dict[str, Any] = {}

    def listen() -> None:
        out["s0"] = TcpCommunicator(SERVER0, addrs, files["server0"], [SERVER0, SERVER1], connect_timeout=10.0)

    t = threading.Thread(target=listen)
    t.start()
    header = b'{"seq":1e999,"tag":"hello","kind":"json","dtype":"","shape":[]}'
    ctx = make_ssl_context(files["server1"], server_side=False)
    for _ in range(100):  # the listener may not be up yet
        try:
            raw = socket.create_connection(addrs[SERVER0], timeout=5.0)
            break
        except OSError:
            time.sleep(0.05)
    with ctx.wrap_socket(raw) as rogue:
        rogue.sendall(MAGIC + struct.pack("!I", len(header)) + header + struct.pack("!Q", 0))
        with contextlib.suppress(OSError, _ssl.SSLError):
            rogue.recv(1024)
    s1 = TcpCommunicator(SERVER1, addrs, files["server1"], [SERVER0, SERVER1], connect_timeout=10.0)
    t.join(15)
    try:
        s1.send_json(SERVER0, "x", {"ok": 1})
        assert out["s0"].recv_json(SERVER1, "x") == {"ok": 1}
    finally:
        s1.close()
        out["s0"].close()


@pytest.mark.parametrize("value", [
    torch.arange(-5, 5, dtype=torch.int64) * (2**61), torch.tensor([True, False, True]), torch.randn(3, 4).t(),
    torch.zeros(0, 3, dtype=torch.int64), torch.arange(7, dtype=torch.uint8), torch.arange(5, dtype=torch.int32),
])
def test_wire_is_encode_and_owns_its_bytes(value: torch.Tensor) -> None:
    """Frame.wire (the TCP send path, one payload copy) gives the bytes of Frame.encode for every dtype and
    layout, and later in-place changes to the tensor do not reach the queued bytes."""
    frame = tensor_frame(4, "w", value)
    wire = frame.wire()
    assert bytes(wire) == frame.encode()
    before = bytes(wire)
    if value.numel():
        value.zero_() if value.dtype != torch.bool else value.logical_not_()
    assert bytes(wire) == before
