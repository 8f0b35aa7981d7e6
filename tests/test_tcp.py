"""The TLS transport between threads on loopback: framing, mutual authentication, failures, time-outs."""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import in_threads
from secfwt.comm.base import DEALER, OWNER, SERVER0, SERVER1
from secfwt.comm.certs import TlsFiles, cert_pem, generate_ca, issue_cert, write_cert_pair, write_party_certs
from secfwt.comm.tcp import TcpCommunicator
from secfwt.errors import AuthError, PeerAbortedError, PeerClosedError, PeerTimeoutError, ProtocolMismatchError
from secfwt.launch import free_ports


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    return write_party_certs(tmp_path_factory.mktemp("certs"))


def connect(
    tls: dict[int, TlsFiles], timeout: float = 10.0, connect_timeout: float = 5.0,
    sessions: dict[int, dict[str, Any]] | None = None,
) -> tuple[dict[int, TcpCommunicator], dict[int, BaseException]]:
    """Build one communicator per rank of ``tls``, each in its own thread, on fresh loopback ports."""
    ranks = sorted(tls)
    addrs = dict(zip(ranks, (("127.0.0.1", p) for p in free_ports(len(ranks))), strict=True))
    return in_threads(lambda r: TcpCommunicator(r, addrs, tls[r], ranks, timeout=timeout,
                                                connect_timeout=connect_timeout, session=(sessions or {}).get(r)),
                      ranks)


@pytest.fixture
def pair(certs: dict[str, TlsFiles]) -> Any:
    comms, errors = connect({SERVER0: certs["server0"], SERVER1: certs["server1"]}, timeout=1.5)
    assert not errors, errors
    yield comms
    for c in comms.values():
        c.close()


def _io_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("secfwt-")]


def test_frames_round_trip_four_parties(certs: dict[str, TlsFiles]) -> None:
    names = {SERVER0: "server0", SERVER1: "server1", DEALER: "dealer", OWNER: "owner"}
    comms, errors = connect({r: certs[n] for r, n in names.items()})
    assert not errors, errors
    try:
        values = [
            torch.tensor([-(2**63), -1, 0, 1, 2**63 - 1], dtype=torch.int64),
            torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4),
            torch.randn(3, 2, dtype=torch.float64),
            torch.tensor([True, False]),
            torch.empty(0, 5, dtype=torch.int64),
            torch.tensor(7, dtype=torch.int64),
        ]
        for src in comms:
            for dst in comms:
                if src != dst:
                    for i, v in enumerate(values):
                        comms[src].send(dst, f"t{i}", v)
                    comms[src].send_json(dst, "ctl", {"from": src, "list": [1, 2]})
        for dst in comms:
            for src in comms:
                if src != dst:
                    for i, v in enumerate(values):
                        got = comms[dst].recv(src, f"t{i}", shape=v.shape, dtype=v.dtype)
                        assert torch.equal(got, v)
                    assert comms[dst].recv_json(src, "ctl") == {"from": src, "list": [1, 2]}
        # Bytes sent and received are accounted identically on both ends.
        sent = sum(c.cost.total().bytes_sent + c.cost.total().dealer_bytes for c in comms.values())
        recv = sum(c.cost.total().bytes_recv for c in comms.values())
        assert sent > 0 and recv > 0
    finally:
        for c in comms.values():
            c.close()
    assert _io_threads() == []


def test_simultaneous_large_sends_do_not_deadlock(pair: dict[int, TcpCommunicator]) -> None:
    big = {r: torch.randint(-(2**63), 2**63 - 1, (1_500_000,), dtype=torch.int64) for r in pair}  # 12 MB
    got: dict[int, torch.Tensor] = {}

    def exchange(r: int) -> None:
        pair[r].send(1 - r, "big", big[r])
        got[r] = pair[r].recv(1 - r, "big", shape=big[r].shape)

    threads = [threading.Thread(target=exchange, args=(r,)) for r in pair]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert torch.equal(got[SERVER0], big[SERVER1]) and torch.equal(got[SERVER1], big[SERVER0])
    assert pair[SERVER0].cost.total().bytes_sent == pair[SERVER1].cost.total().bytes_recv


def _rogue(tmp_path: Path, name: str) -> TlsFiles:
    """A certificate for ``name`` from a different CA (trusting only that CA)."""
    ca_key, ca_cert = generate_ca("rogue CA")
    key, cert = issue_cert(ca_key, ca_cert, name)
    (tmp_path / "ca.pem").write_bytes(cert_pem(ca_cert))
    return write_cert_pair(tmp_path, name, key, cert)


def _raw_frame(header: bytes, payload: bytes) -> bytes:
    return b"SF1" + struct.pack("!I", len(header)) + header + struct.pack("!Q", len(payload)) + payload


def test_connector_with_unknown_ca_is_refused(certs: dict[str, TlsFiles], tmp_path: Path) -> None:
    rogue = _rogue(tmp_path, "server1")
    # The rogue server1 trusts our CA (so it would accept server0) but its own cert is from another CA.
    rogue = TlsFiles(ca=certs["server0"].ca, cert=rogue.cert, key=rogue.key)
    t0 = time.monotonic()
    comms, errors = connect({SERVER0: certs["server0"], SERVER1: rogue}, connect_timeout=1.5)
    assert comms == {}
    assert isinstance(errors[SERVER1], AuthError)
    assert "server1: server0" in str(errors[SERVER1]) and "certificate" in str(errors[SERVER1])
    assert isinstance(errors[SERVER0], AuthError)
    assert "refused connection" in str(errors[SERVER0])
    assert "\n" not in str(errors[SERVER0]) and "\n" not in str(errors[SERVER1])
    assert time.monotonic() - t0 < 5
    assert _io_threads() == []


def test_listener_with_unknown_ca_is_refused(certs: dict[str, TlsFiles], tmp_path: Path) -> None:
    rogue = _rogue(tmp_path, "server0")
    comms, errors = connect({SERVER0: rogue, SERVER1: certs["server1"]}, connect_timeout=1.5)
    assert comms == {}
    assert isinstance(errors[SERVER1], AuthError)
    assert "certificate verification failed" in str(errors[SERVER1])
    assert isinstance(errors[SERVER0], AuthError)


def test_listener_with_wrong_party_name_is_refused(certs: dict[str, TlsFiles]) -> None:
    # server0's address answers with the dealer's (valid) certificate.
    comms, errors = connect({SERVER0: certs["dealer"], SERVER1: certs["server1"]}, connect_timeout=1.5)
    assert comms == {}
    assert isinstance(errors[SERVER1], AuthError)
    assert "is 'dealer', expected 'server0'" in str(errors[SERVER1])


def test_connector_with_wrong_party_name_is_refused(certs: dict[str, TlsFiles]) -> None:
    # The party dialling in as server1 presents the owner's (valid) certificate.
    comms, errors = connect({SERVER0: certs["server0"], SERVER1: certs["owner"]}, connect_timeout=1.5)
    assert comms == {}
    assert isinstance(errors[SERVER0], AuthError)
    assert "certificate names 'owner', expected one of: server1" in str(errors[SERVER0])
    assert isinstance(errors[SERVER1], AuthError)
    assert "refused the connection" in str(errors[SERVER1])


def test_different_session_parameters_are_refused(certs: dict[str, TlsFiles]) -> None:
    t0 = time.monotonic()
    comms, errors = connect({SERVER0: certs["server0"], SERVER1: certs["server1"]}, connect_timeout=5.0,
                            sessions={SERVER0: {"frac_bits": 16}, SERVER1: {"frac_bits": 12}})
    assert comms == {}
    for r in (SERVER0, SERVER1):
        assert isinstance(errors[r], ProtocolMismatchError)
        assert "server1 has {'frac_bits': 12}, server0 has {'frac_bits': 16}" in str(errors[r])
    assert time.monotonic() - t0 < 2.0


def test_peer_close_is_reported_fast(certs: dict[str, TlsFiles]) -> None:
    comms, errors = connect({SERVER0: certs["server0"], SERVER1: certs["server1"]}, timeout=30.0)
    assert not errors
    comms[SERVER1].send(SERVER0, "last", torch.ones(3, dtype=torch.int64))
    comms[SERVER1].close()
    t0 = time.monotonic()
    assert torch.equal(comms[SERVER0].recv(SERVER1, "last"), torch.ones(3, dtype=torch.int64))
    with pytest.raises(PeerClosedError, match="server1 closed the connection"):
        comms[SERVER0].recv(SERVER1, "next")
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(PeerClosedError):  # and keeps saying so
        comms[SERVER0].send(SERVER1, "more", torch.ones(1, dtype=torch.int64))
    comms[SERVER0].close()


def test_silent_peer_times_out(pair: dict[int, TcpCommunicator]) -> None:
    t0 = time.monotonic()
    with pytest.raises(PeerTimeoutError, match="no message from server1 within 1.5 s"):
        pair[SERVER0].recv(SERVER1, "never")
    assert 1.4 < time.monotonic() - t0 < 3.0


def test_abort_reaches_peer(pair: dict[int, TcpCommunicator]) -> None:
    pair[SERVER1].abort("boom", [SERVER0])
    with pytest.raises(PeerAbortedError, match="server1: boom"):
        pair[SERVER0].recv(SERVER1, "x")


@pytest.mark.parametrize(
    ("sent", "tag", "shape", "dtype", "match"),
    [
        (torch.zeros(3, dtype=torch.int64), "b", (3,), torch.int64, "expected tensor 'b'.*got tensor 'a'"),
        (torch.zeros(3, dtype=torch.int64), "a", (4,), torch.int64, r"expected shape \(4,\), got \(3,\)"),
        (torch.zeros(3, dtype=torch.uint8), "a", (3,), torch.int64, "expected dtype torch.int64"),
    ],
)
def test_mismatch(pair: dict[int, TcpCommunicator], sent: torch.Tensor, tag: str, shape: tuple[int, ...],
                  dtype: torch.dtype, match: str) -> None:
    pair[SERVER0].send(SERVER1, "a", sent)
    with pytest.raises(ProtocolMismatchError, match=match):
        pair[SERVER1].recv(SERVER0, tag, shape=shape, dtype=dtype)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"XYZ\x00\x00\x00\x02{}", "bad message magic"),
        (b"SF1\x00\x00\x00\x05nope!\x00\x00\x00\x00\x00\x00\x00\x00", "malformed message header"),
        (_raw_frame(b'{"seq":0,"tag":"a","kind":"tensor","dtype":"int64","shape":[2]}', b"abc"),
         "payload has 3 bytes"),
        (_raw_frame(b'{"seq":0,"tag":"a","kind":"tensor","dtype":"complex","shape":[1]}', b"12345678"),
         "unknown dtype 'complex'"),
    ],
)
def test_malformed_frames(pair: dict[int, TcpCommunicator], raw: bytes, match: str) -> None:
    pair[SERVER0]._send_raw(SERVER1, raw)
    t0 = time.monotonic()
    with pytest.raises(ProtocolMismatchError, match=match):
        pair[SERVER1].recv(SERVER0, "a")
    assert time.monotonic() - t0 < 1.0


def test_direct_writes_and_queued_rest_keep_frame_order(pair: dict[int, TcpCommunicator]) -> None:
    """A send writes its frame itself when nothing is queued and hands what the socket did not take to the I/O
    thread; later sends queue behind that rest. Mixed large (several MB: the socket takes only part) and small
    frames from both sides at once, nothing read until all are sent: every frame arrives whole and in order."""
    g = torch.Generator().manual_seed(3)
    sizes = [3, 2_000_000, 1, 5, 700_000, 0, 9, 1_200_000, 2, 4]
    frames = {r: [torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64) for n in sizes]
              for r in pair}
    got: dict[int, list[torch.Tensor]] = {}

    def run(r: int) -> None:
        for i, v in enumerate(frames[r]):
            pair[r].send(1 - r, f"m{i}", v)
        got[r] = [pair[r].recv(1 - r, f"m{i}", shape=(n,)) for i, n in enumerate(sizes)]

    threads = [threading.Thread(target=run, args=(r,)) for r in pair]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in pair:
        assert len(got[r]) == len(sizes)
        assert all(torch.equal(a, b) for a, b in zip(got[r], frames[1 - r], strict=True))
