"""TLS set-up pieces of the TCP transport: contexts, peer identity, the hello frame, concurrent incoming
handshakes (:class:`Incoming`), listeners, and a service's "busy" answer while it serves a session.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from secfwt.comm.base import PARTY_NAMES, Frame, FrameReader
from secfwt.comm.certs import TlsFiles
from secfwt.errors import AuthError, CommError

HELLO = "hello"
HANDSHAKE_S = 10.0  # at most this long per TLS handshake (each runs in its own thread)
_POLL_S = 0.2
_MAX_BUSY_ANSWERS = 32  # "busy" answers in progress at once


class Busy(Exception):
    """The dialled party answered "busy" (a service serving or setting up another session): try again."""


def open_listener(host: str, port: int, backlog: int = 16) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when the host has a colon); OSError names the address."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    s.listen(backlog)
    return s


def cert_sha256(sock: ssl.SSLSocket) -> str:
    """SHA-256 of the peer's certificate (DER), hex: the identity a service logs for a session's owner."""
    der = sock.getpeercert(binary_form=True) or b""
    return hashlib.sha256(der).hexdigest()


def pname(rank: int) -> str:
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


def ssl_reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError) and e.reason:
        return str(e.reason).lower().replace("_", " ")
    return str(e) or type(e).__name__


def read_frame_blocking(sock: ssl.SSLSocket, where: str) -> Frame | None:
    """Read one frame from a blocking socket (set-up only); None on end of stream."""
    reader = FrameReader(where)
    while True:
        n = sock.recv_into(reader.target())
        if n == 0:
            return None
        frame = reader.consumed(n)
        if frame is not None:
            return frame


class Incoming:
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
        shutdown(sock)
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
            shutdown(s)
        end = time.monotonic() + 2.0
        for t in self._threads:
            t.join(max(end - time.monotonic(), 0.0))
        for item in self.results():
            if isinstance(item, tuple):
                item[1].close()


def refuse(sock: ssl.SSLSocket, reason: Any) -> None:
    """Best effort: tell a connecting party why it is refused (an abort in place of the hello)."""
    with contextlib.suppress(OSError, ssl.SSLError):
        sock.sendall(Frame(seq=-1, tag=HELLO, kind="abort", obj=reason).encode())


def shutdown(sock: socket.socket) -> None:
    """Wake a thread blocked on ``sock`` (the plain socket call: SSLSocket.shutdown would drop its TLS
    state under the other thread's feet)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)



def refuse_while_busy(listener: socket.socket, tls: TlsFiles, name: str, stop: threading.Event) -> None:
    """A service's listener while it serves a session: every authenticated caller is told "busy" (a data owner
    retries for its ``queue_timeout``: a queue), anyone else is refused, until ``stop`` is set. Each caller
    is handled in its own thread with a short timeout, so a stalled one delays no one."""
    ctx = make_ssl_context(tls, server_side=True)

    def answer(raw: socket.socket) -> None:
        with contextlib.closing(raw):
            raw.settimeout(HANDSHAKE_S)
            try:
                with ctx.wrap_socket(raw, server_side=True) as sock:
                    if read_frame_blocking(sock, f"{name}: hello") is not None:
                        refuse(sock, {"busy": f"{name} is serving another session"})
            except (ssl.SSLError, OSError, CommError):
                pass

    threads: list[threading.Thread] = []
    while not stop.is_set():
        listener.settimeout(_POLL_S)
        try:
            raw, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:  # e.g. out of file descriptors: do not spin
            time.sleep(_POLL_S)
            continue
        threads = [t for t in threads if t.is_alive()]
        if len(threads) >= _MAX_BUSY_ANSWERS:  # callers beyond this are dropped unanswered (they retry)
            raw.close()
            continue
        t = threading.Thread(target=answer, args=(raw,), name=f"secfwt-{name}-busy", daemon=True)
        threads.append(t)
        t.start()

