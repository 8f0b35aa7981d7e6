"""TLS 1.3 over TCP transport with mutual authentication by party certificates.

Set-up (deterministic, deadlock-free): for every pair of parties the lower rank listens on its configured
port and the higher rank connects, retrying until the connect timeout. A party first connects to all lower
ranks, then accepts all higher ranks; connections to lower ranks depend only on even lower ranks, so the
set-up always completes once every party is up. Both ends present their certificate and trust only the
CA; after the handshake each end checks that the peer's certificate common name is the party it expects
on that connection (the connector knows whom it dialled; the listener accepts each expected party once).
A short hello exchange then confirms that the listener accepted the connector's certificate too.
Anything else raises :class:`~secfwt.errors.AuthError` and the connection is closed.

Data path: each peer connection is owned by one I/O thread (the only thread that touches its TLS object)
that drains the socket into a per-peer queue of decoded frames and writes queued outgoing frames, both
without blocking. Sends therefore never block, and two parties sending large tensors to each other at the
same time cannot deadlock. ``recv`` waits on the queue for at most ``timeout`` seconds
(:class:`PeerTimeoutError`); a peer that closes its connection or dies is reported at once
(:class:`PeerClosedError`) after the frames that arrived before; a malformed frame gives
:class:`ProtocolMismatchError`. Wire format: see :mod:`secfwt.comm.base`.

Limits (what an authenticated peer can make a party hold, per link): one message at most ``max_payload``
bytes (default 4 GiB, JSON 1 MiB), its length checked against its header before anything is allocated and
its buffer grown with the bytes that arrive (:class:`~secfwt.comm.base.FrameReader`). Back-pressure: the
I/O thread stops reading while the inbox plus the frame in progress exceed ``inbox_bytes`` (default 1 GiB;
a frame counts its wire size + ``_FRAME_COST``) and resumes when the party takes frames out; a frame is
always read whole into an empty inbox, so a link holds about max(``inbox_bytes``, ``max_payload``) + one
TLS record. TCP flow control then stops the sender, whose sends only queue on its side: no deadlock.
Writes go on while reads are paused; a close is reported after the frames before it (as always), a broken
connection by the next write or once reading resumes. At set-up every incoming connection is authenticated
in its own thread (at most ``_MAX_HANDSHAKES`` at a time, ``_HANDSHAKE_S`` each), so a client that connects
and stalls delays no one; the listener collects parties until all are in or the connect deadline passes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import queue
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from secfwt.comm.base import MAX_PAYLOAD_BYTES, PARTY_NAMES, PARTY_RANKS, Communicator, Frame, FrameReader
from secfwt.comm.certs import TlsFiles
from secfwt.cost import CostTracker
from secfwt.errors import AuthError, CommError, PeerClosedError, PeerTimeoutError, ProtocolMismatchError

INBOX_BYTES = 1 << 30  # default bound on the bytes waiting in one link's inbox (back-pressure)
_FRAME_COST = 1024  # accounted per queued frame on top of its wire size: the Python objects holding it
_WRITE_CHUNK = 1 << 18
_POLL_S = 0.2
_READ_BUDGET = 256  # TLS records (<= 16 KiB each) read per turn of the I/O loop
_RETRY_S = 0.05
HELLO = "hello"
_HANDSHAKE_S = 10.0  # at most this long per TLS handshake (each runs in its own thread)
_MAX_HANDSHAKES = 32  # incoming handshakes in progress at once; more connections wait in the listen backlog
_ACCEPT_POLL_S = 0.05


def _pname(rank: int) -> str:
    return PARTY_NAMES.get(rank, f"party{rank}")


def make_ssl_context(files: TlsFiles, server_side: bool) -> ssl.SSLContext:
    """A TLS 1.3-only context presenting ``files.cert`` and trusting only ``files.ca``; peers must
    present a certificate (mutual authentication). Host names are not checked: the caller checks the
    peer's common name against the expected party. Raises ConfigError (via TlsFiles.check) for missing
    files and ssl.SSLError for unreadable ones."""
    files.check()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.load_verify_locations(cafile=str(files.ca))
    return ctx


def peer_common_name(sock: ssl.SSLSocket) -> str | None:
    """The common name in the (already verified) peer certificate, or None if there is none."""
    cert: dict[str, Any] = dict(sock.getpeercert() or {})
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _ssl_reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError) and e.reason:
        return str(e.reason).lower().replace("_", " ")
    return str(e) or type(e).__name__


def _read_frame_blocking(sock: ssl.SSLSocket, where: str) -> Frame | None:
    """Read one frame from a blocking socket (set-up only); None on end of stream."""
    reader = FrameReader(where)
    while True:
        n = sock.recv_into(reader.target())
        if n == 0:
            return None
        frame = reader.consumed(n)
        if frame is not None:
            return frame


class _Link:
    """One authenticated peer connection and the I/O thread that owns it.

    ``queued`` counts the bytes of the frames waiting in the inbox (wire size + ``_FRAME_COST`` each);
    ``peak_held`` is the most ever held (queued + the frame in progress), for tests and diagnostics.
    """

    def __init__(self, owner: str, peer: int, sock: ssl.SSLSocket, max_payload: int = MAX_PAYLOAD_BYTES,
                 inbox_bytes: int = INBOX_BYTES) -> None:
        self.owner, self.peer, self.pname = owner, peer, _pname(peer)
        self.sock = sock
        sock.setblocking(False)
        self.inbox: queue.Queue[tuple[Frame, int] | CommError] = queue.Queue()
        self.inbox_bytes = inbox_bytes
        self.queued = 0
        self.peak_held = 0
        self.reader = FrameReader(f"{owner}: message from {self.pname}", max_payload)
        self._paused = False
        self._out: deque[bytes] = deque()
        self._cur: memoryview | None = None
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = threading.Event()
        self._dead: CommError | None = None
        self._read_wants_write = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.thread = threading.Thread(target=self._run, name=f"secfwt-{owner}-{self.pname}", daemon=True)
        self.thread.start()

    # -- called from party threads ---------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Queue ``data`` for sending; raises PeerClosedError if the connection is already broken."""
        with self._lock:
            if self._dead is not None:
                raise PeerClosedError(f"{self.owner}: cannot send to {self.pname}: {self._dead}")
            self._out.append(data)
            self._idle.clear()
        self._wake()

    def get(self, timeout: float) -> Frame:
        """The next frame; raises PeerTimeoutError after ``timeout`` s, or the link's error once broken."""
        try:
            item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise PeerTimeoutError(
                f"{self.owner}: no message from {self.pname} within {timeout:g} s"
            ) from None
        if isinstance(item, CommError):
            self.inbox.put(item)  # keep reporting it on later calls
            raise type(item)(str(item))
        frame, cost = item
        with self._lock:
            self.queued -= cost
            resume = self._paused
        if resume:
            self._wake()
        return frame

    def wait_flushed(self, timeout: float) -> bool:
        return self._idle.wait(timeout)

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._wake()
        self.thread.join(timeout)
        for s in (self.sock, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                s.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- I/O thread ------------------------------------------------------------------------------
    def _may_read(self) -> bool:
        """Whether the inbox has room to read on (see the module docstring); marks the link paused if not.

        Only this thread adds to ``queued`` and the party only subtracts, so an unlocked yes stays true; a
        no is confirmed under the lock together with setting ``_paused``, so the party's next ``get`` sees
        it and wakes this thread."""
        q, partial = self.queued, self.reader.partial
        if q == 0 or q + partial < self.inbox_bytes:
            self._paused = False
            return True
        with self._lock:
            if self.queued == 0 or self.queued + partial < self.inbox_bytes:
                self._paused = False
                return True
            self._paused = True
            return False

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        events = 0  # what the socket is registered for (0: not registered)
        more = False  # decrypted bytes may be buffered inside TLS, invisible to select: do not wait then
        try:
            while not self._stop.is_set():
                reading = self._may_read()
                want_write = self._cur is not None or bool(self._out) or self._read_wants_write
                wanted = (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if want_write else 0)
                if wanted != events:
                    if events == 0:
                        sel.register(self.sock, wanted)
                    elif wanted == 0:
                        sel.unregister(self.sock)
                    else:
                        sel.modify(self.sock, wanted)
                    events = wanted
                for key, _ in sel.select(0.0 if more and reading else _POLL_S):
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                more = self._pump_read()
                self._pump_write()
        except CommError as e:
            self._fail(e)
        except (ssl.SSLError, OSError) as e:
            self._fail(PeerClosedError(f"{self.owner}: connection to {self.pname} broke: {_ssl_reason(e)}"))
        except EOFError:
            where = " in the middle of a message" if self.reader.mid_frame else ""
            self._fail(PeerClosedError(f"{self.owner}: {self.pname} closed the connection{where}"))
        except Exception as e:  # noqa: BLE001 - never die silently: the party would wait for its timeout
            self._fail(CommError(f"{self.owner}: I/O with {self.pname} failed: {type(e).__name__}: {e}"))
        finally:
            sel.close()

    def _fail(self, err: CommError) -> None:
        with self._lock:
            self._dead = err
            self._out.clear()
            self._cur = None
            self._idle.set()
        self.inbox.put(err)

    def _pump_read(self) -> bool:
        """Read what is available while the inbox has room (at most ``_READ_BUDGET`` calls, so writes are
        not starved while the peer streams); returns True when data may be left."""
        self._read_wants_write = False
        reader = self.reader
        for _ in range(_READ_BUDGET):
            if not self._may_read():
                return False
            try:
                n = self.sock.recv_into(reader.target())
            except ssl.SSLWantReadError:
                return False
            except ssl.SSLWantWriteError:
                self._read_wants_write = True
                return False
            if n == 0:
                raise EOFError
            frame = reader.consumed(n)
            if frame is not None:
                cost = reader.last_size + _FRAME_COST
                with self._lock:
                    self.queued += cost
                self.inbox.put((frame, cost))
            self.peak_held = max(self.peak_held, self.queued + reader.partial)
        return True

    def _pump_write(self) -> None:
        while True:
            if self._cur is None:
                with self._lock:
                    if not self._out:
                        self._idle.set()
                        return
                    self._cur = memoryview(self._out.popleft())
            try:
                n = self.sock.send(self._cur[:_WRITE_CHUNK])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return
            self._cur = self._cur[n:] if n < len(self._cur) else None


class _Incoming:
    """The listener's handshakes in progress, one thread each (see the module docstring). A party is claimed
    by the first connection that completes its hello, so each is accepted once. :meth:`stop` shuts down the
    connections still in a handshake (their threads then fail at once) and closes unclaimed results."""

    def __init__(self, owner: str, expected: set[int]) -> None:
        self.owner, self.expected, self._free = owner, frozenset(expected), set(expected)
        self._lock = threading.Lock()
        self._done: queue.Queue[tuple[int, ssl.SSLSocket] | BaseException] = queue.Queue()
        self._socks: dict[int, socket.socket] = {}  # thread id -> the socket that thread may block on
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def start(self, raw: socket.socket, where: str,
              handshake: Callable[[socket.socket, str], tuple[int, ssl.SSLSocket]]) -> None:
        t = threading.Thread(target=self._run, args=(raw, where, handshake), daemon=True,
                             name=f"secfwt-{self.owner}-handshake-{where}")
        self._threads.append(t)
        t.start()

    def _run(self, raw: socket.socket, where: str,
             handshake: Callable[[socket.socket, str], tuple[int, ssl.SSLSocket]]) -> None:
        result: tuple[int, ssl.SSLSocket] | BaseException
        try:
            result = handshake(raw, where) if self.track(raw) else AuthError("set-up is over")
        except BaseException as e:  # noqa: BLE001 - handed to the listener's thread
            result = e
        with self._lock:
            self._socks.pop(threading.get_ident(), None)
        self._done.put(result)

    def track(self, sock: socket.socket) -> bool:
        """Record the socket this thread blocks on from now on; False (and shut down) once stopping."""
        with self._lock:
            self._socks[threading.get_ident()] = sock
            if not self._stopping:
                return True
        _shutdown(sock)
        return False

    def unclaimed(self) -> list[int]:
        with self._lock:
            return sorted(self._free)

    def claim(self, peer: int, release: bool = False) -> bool:
        with self._lock:
            if release:
                self._free.add(peer)
                return True
            ok = peer in self._free
            self._free.discard(peer)
            return ok

    def running(self) -> int:
        self._threads = [t for t in self._threads if t.is_alive()]
        return len(self._threads)

    def results(self) -> list[tuple[int, ssl.SSLSocket] | BaseException]:
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self._done.get_nowait())
        return out

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            socks = list(self._socks.values())
        for s in socks:
            _shutdown(s)
        end = time.monotonic() + 2.0
        for t in self._threads:
            t.join(max(end - time.monotonic(), 0.0))
        for item in self.results():
            if isinstance(item, tuple):
                item[1].close()


def _refuse(sock: ssl.SSLSocket, reason: Any) -> None:
    """Best effort: tell a connecting party why it is refused (an abort in place of the hello)."""
    with contextlib.suppress(OSError, ssl.SSLError):
        sock.sendall(Frame(seq=-1, tag=HELLO, kind="abort", obj=reason).encode())


def _shutdown(sock: socket.socket) -> None:
    """Wake a thread blocked on ``sock`` (the plain socket call: SSLSocket.shutdown would drop its TLS
    state under the other thread's feet)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class TcpCommunicator(Communicator):
    """A party's TLS links to its peers (see the module docstring for set-up, threads and errors).

    Args:
        rank: this party's rank.
        addresses: ``{rank: (host, port)}`` for every party in ``ranks`` (the listening address of each).
        tls: this party's CA, certificate and key files.
        ranks: the parties of this run (this party included).
        timeout: seconds a ``recv`` waits for a message.
        connect_timeout: seconds to wait for all connections to be set up.
        bind_host: the address to listen on (default: this party's host in ``addresses``).
        session: run parameters every party must agree on (e.g. fixed-point bits, the set of parties); they
            are compared in the hello exchange and a difference raises ProtocolMismatchError at set-up.
        max_payload: the largest tensor message, in payload bytes, this party sends or accepts (default
            ``MAX_PAYLOAD_BYTES`` = 4 GiB); a peer's larger message breaks its link with ProtocolMismatchError.
        inbox_bytes: per peer, the received bytes that may wait to be consumed before this party stops
            reading from that peer (back-pressure; default ``INBOX_BYTES`` = 1 GiB).

    Raises AuthError (a peer could not be authenticated), PeerTimeoutError (a peer was not reachable in
    time), ProtocolMismatchError (a peer runs with other session parameters), ConfigError (missing TLS
    files) or OSError (the listening port cannot be bound).
    """

    def __init__(
        self,
        rank: int,
        addresses: dict[int, tuple[str, int]],
        tls: TlsFiles,
        ranks: Sequence[int],
        timeout: float = 60.0,
        connect_timeout: float = 30.0,
        cost: CostTracker | None = None,
        bind_host: str | None = None,
        session: Mapping[str, Any] | None = None,
        max_payload: int = MAX_PAYLOAD_BYTES,
        inbox_bytes: int = INBOX_BYTES,
    ) -> None:
        super().__init__(rank, cost=cost, timeout=timeout, max_payload=max_payload)
        if inbox_bytes <= 0:
            raise ValueError(f"{self.name}: inbox_bytes: expected a positive number of bytes, got {inbox_bytes}")
        self.inbox_bytes = inbox_bytes
        self.session: dict[str, Any] = json.loads(json.dumps(dict(session or {})))  # as seen on the wire
        missing = [r for r in ranks if r not in addresses]
        if missing:
            raise ValueError(f"{self.name}: no address for {[_pname(r) for r in missing]}")
        self.addresses = dict(addresses)
        self.ranks = sorted(set(ranks) | {rank})
        self.connect_timeout = connect_timeout
        self._links: dict[int, _Link] = {}
        self._closed = False
        self._client_ctx = make_ssl_context(tls, server_side=False)
        self._server_ctx = make_ssl_context(tls, server_side=True)
        lower = [r for r in self.ranks if r < rank]
        higher = [r for r in self.ranks if r > rank]
        deadline = time.monotonic() + connect_timeout
        listener = self._listen(bind_host) if higher else None
        try:
            for peer in lower:
                self._links[peer] = self._new_link(peer, self._connect(peer, deadline))
            if listener is not None:
                self._accept(listener, set(higher), deadline)
        except BaseException:
            self.close(flush_timeout=0.0)
            raise
        finally:
            if listener is not None:
                listener.close()

    # -- set-up ----------------------------------------------------------------------------------
    def _listen(self, bind_host: str | None) -> socket.socket:
        host, port = self.addresses[self.rank]
        s = socket.socket(socket.AF_INET6 if ":" in (bind_host or host) else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind_host or host, port))
        except OSError as e:
            s.close()
            raise OSError(f"{self.name}: cannot listen on {bind_host or host}:{port}: {e.strerror or e}") from e
        s.listen(max(len(self.ranks), _MAX_HANDSHAKES))
        return s

    def _new_link(self, peer: int, sock: ssl.SSLSocket) -> _Link:
        return _Link(self.name, peer, sock, max_payload=self.max_payload, inbox_bytes=self.inbox_bytes)

    def _connect(self, peer: int, deadline: float) -> ssl.SSLSocket:
        host, port = self.addresses[peer]
        pname, where = _pname(peer), f"{host}:{port}"
        last = "no attempt"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerTimeoutError(
                    f"{self.name}: could not connect to {pname} at {where} within "
                    f"{self.connect_timeout:g} s (last error: {last})"
                )
            try:
                raw = socket.create_connection((host, port), timeout=remaining)
                break
            except OSError as e:
                last = e.strerror or str(e)
                time.sleep(min(_RETRY_S, max(remaining, 0.0)))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.settimeout(min(max(deadline - time.monotonic(), 0.5), _HANDSHAKE_S))
        try:
            sock = self._client_ctx.wrap_socket(raw)
        except (ssl.SSLError, OSError) as e:
            raw.close()
            raise AuthError(f"{self.name}: TLS handshake with {pname} at {where} failed: {_ssl_reason(e)}") from e
        try:
            cn = peer_common_name(sock)
            if cn != pname:
                raise AuthError(
                    f"{self.name}: the party at {where} is '{cn}', expected '{pname}' (certificate "
                    f"common name); connection refused"
                )
            try:
                sock.sendall(self._hello())
                reply = _read_frame_blocking(sock, f"{self.name}: hello from {pname}")
            except (ssl.SSLError, OSError) as e:
                raise AuthError(
                    f"{self.name}: {pname} at {where} did not accept our certificate: {_ssl_reason(e)}"
                ) from e
            if reply is None:
                raise AuthError(f"{self.name}: {pname} at {where} closed the connection during authentication")
            if reply.kind == "abort":
                if isinstance(reply.obj, dict) and "mismatch" in reply.obj:
                    raise ProtocolMismatchError(str(reply.obj["mismatch"]))
                raise AuthError(f"{self.name}: {pname} at {where} refused the connection: {reply.obj}")
            if reply.tag != HELLO or not isinstance(reply.obj, dict) or reply.obj.get("party") != pname:
                raise AuthError(f"{self.name}: unexpected hello from {pname} at {where}: {reply.obj!r}")
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    def _accept(self, listener: socket.socket, expected: set[int], deadline: float) -> None:
        """Authenticate incoming connections concurrently (see the module docstring) until every party of
        ``expected`` has a link or the deadline passes."""
        incoming = _Incoming(self.name, expected)
        rejected: list[str] = []
        try:
            while expected:
                for item in incoming.results():
                    if isinstance(item, AuthError):
                        rejected.append(str(item))
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        peer, sock = item
                        expected.discard(peer)
                        self._links[peer] = self._new_link(peer, sock)
                remaining = deadline - time.monotonic()
                if not expected or remaining <= 0:
                    break
                if incoming.running() >= _MAX_HANDSHAKES:
                    time.sleep(min(remaining, _ACCEPT_POLL_S))
                    continue
                listener.settimeout(min(remaining, _ACCEPT_POLL_S))
                try:
                    raw, addr = listener.accept()
                except TimeoutError:
                    continue
                incoming.start(raw, f"{addr[0]}:{addr[1]}",
                               functools.partial(self._handshake_incoming, incoming=incoming, deadline=deadline))
        finally:
            incoming.stop()
        if expected:
            names = ", ".join(_pname(r) for r in sorted(expected))
            host, port = self.addresses[self.rank]
            if rejected:
                raise AuthError(f"{rejected[-1]} (and no authenticated connection from {names} within "
                                f"{self.connect_timeout:g} s)")
            raise PeerTimeoutError(
                f"{self.name}: {names} did not connect to {host}:{port} within {self.connect_timeout:g} s"
            )

    def _handshake_incoming(
        self, raw: socket.socket, where: str, incoming: _Incoming, deadline: float
    ) -> tuple[int, ssl.SSLSocket]:
        """Authenticate one incoming connection (in its own thread); raises AuthError (and closes it) if it is
        refused, ProtocolMismatchError if the peer runs with other session parameters."""
        try:  # a client that is gone already must not end the set-up: every failure here is a refusal
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(min(max(deadline - time.monotonic(), 0.5), _HANDSHAKE_S))
            sock = self._server_ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as e:
            raw.close()
            raise AuthError(f"{self.name}: refused connection from {where}: {_ssl_reason(e)}") from e
        claimed = -1
        try:
            if not incoming.track(sock):  # from now on, stop() can wake this thread through ``sock``
                raise AuthError(f"{self.name}: refused connection from {where}: set-up is over")
            try:
                sock.do_handshake()
            except (ssl.SSLError, OSError) as e:
                raise AuthError(
                    f"{self.name}: refused connection from {where}: TLS handshake failed: {_ssl_reason(e)}"
                ) from e
            cn = peer_common_name(sock)
            peer = PARTY_RANKS.get(cn or "", -1)
            if peer not in incoming.expected:
                names = ", ".join(_pname(r) for r in incoming.unclaimed())
                msg = (f"{self.name}: refused connection from {where}: certificate names '{cn}', "
                       f"expected one of: {names}")
                _refuse(sock, msg)
                raise AuthError(msg)
            try:
                hello = _read_frame_blocking(sock, f"{self.name}: hello from {where}")
            except (ssl.SSLError, OSError, ProtocolMismatchError) as e:
                raise AuthError(f"{self.name}: refused connection from {where}: bad hello: {e}") from e
            if hello is None or hello.tag != HELLO or not isinstance(hello.obj, dict) \
                    or hello.obj.get("party") != cn:
                raise AuthError(f"{self.name}: refused connection from {where}: bad hello from '{cn}'")
            theirs = hello.obj.get("session")
            if theirs != self.session:
                msg = (f"{self.name}: {cn} runs with different settings: {cn} has {theirs}, "
                       f"{self.name} has {self.session}")
                _refuse(sock, {"mismatch": msg})
                raise ProtocolMismatchError(msg)
            if not incoming.claim(peer):
                msg = f"{self.name}: refused connection from {where}: {cn} is already connected"
                _refuse(sock, msg)
                raise AuthError(msg)
            claimed = peer
            try:
                sock.sendall(self._hello())
            except (ssl.SSLError, OSError) as e:
                raise AuthError(f"{self.name}: connection from {where} ('{cn}') broke during authentication: "
                                f"{_ssl_reason(e)}") from e
        except BaseException:
            if claimed >= 0:
                incoming.claim(claimed, release=True)
            sock.close()
            raise
        sock.settimeout(None)
        return peer, sock

    def _hello(self) -> bytes:
        return Frame(seq=-1, tag=HELLO, kind="json", obj={"party": self.name, "session": self.session}).encode()

    # -- transport hooks -------------------------------------------------------------------------
    def _link(self, peer: int) -> _Link:
        link = self._links.get(peer)
        if link is None:
            state = "closed" if self._closed else "not part of this run"
            raise PeerClosedError(f"{self.name}: no connection to {_pname(peer)} ({state})")
        return link

    def _send_frame(self, peer: int, frame: Frame) -> None:
        self._link(peer).send(frame.encode())

    def _recv_frame(self, peer: int, timeout: float) -> Frame:
        return self._link(peer).get(timeout)

    def _send_raw(self, peer: int, data: bytes) -> None:
        """Queue raw bytes to ``peer`` (tests: malformed frames)."""
        self._link(peer).send(data)

    def close(self, flush_timeout: float = 5.0) -> None:
        """Send what is queued (waiting at most ``flush_timeout`` s), then close every connection and
        join the I/O threads. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + flush_timeout
        for link in self._links.values():
            link.wait_flushed(max(deadline - time.monotonic(), 0.0))
        for link in self._links.values():
            link.stop(timeout=2.0)
        self._links.clear()
