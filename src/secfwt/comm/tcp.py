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
in its own thread (at most ``_MAX_HANDSHAKES`` at a time, ``HANDSHAKE_S`` each), so a client that connects
and stalls delays no one; the listener collects parties until all are in or the connect deadline passes.
"""


import functools
import json
import socket
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from secfwt.comm.base import MAX_PAYLOAD_BYTES, PARTY_RANKS, Communicator, Frame
from secfwt.comm.certs import TlsFiles
from secfwt.comm.link import INBOX_BYTES, Link
from secfwt.comm.tls import (
    HANDSHAKE_S,
    HELLO,
    Busy,
    Incoming,
    cert_sha256,
    make_ssl_context,
    open_listener,
    peer_common_name,
    read_frame_blocking,
    refuse,
    refuse_while_busy,
    ssl_reason,
)
from secfwt.comm.tls import (
    pname as party_name,
)
from secfwt.cost import CostTracker
from secfwt.errors import AuthError, PeerClosedError, PeerTimeoutError, ProtocolMismatchError, StopRequested

_RETRY_S = 0.05
_MAX_HANDSHAKES = 32  # incoming handshakes in progress at once; more connections wait in the listen backlog
_ACCEPT_POLL_S = 0.05
_BUSY_RETRY_S = 0.2  # a party that was told "busy" tries again after this long
OWNER_RANK = PARTY_RANKS["owner"]


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
        sid: the session id this party sends in its hello (the data owner draws a fresh random one per
            session; services adopt it, see ``await_owner``). Not part of ``session``: one-shot parties ignore it.
        listener: a listening socket owned by the caller (a service keeps one for all its sessions); by
            default the communicator opens and closes its own.
        await_owner: the service set-up (servers and dealer of a long-running ``secfwt party``): wait, with no
            deadline, until the data owner connects and adopt its ``sid``; only then connect to the lower ranks
            and accept the other higher ranks within ``connect_timeout``. Until the owner is in, a peer is told
            "busy" (it retries); a peer with another session id is refused. ``stop`` ends the wait
            (:class:`~secfwt.errors.StopRequested`).
        queue_timeout: how long a connecting party keeps retrying a peer that answers "busy" (serving another
            session): the data owner's place in the queue of a service (default: ``connect_timeout``).

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
        sid: str | None = None,
        listener: socket.socket | None = None,
        await_owner: bool = False,
        stop: threading.Event | None = None,
        queue_timeout: float = 0.0,
    ) -> None:
        super().__init__(rank, cost=cost, timeout=timeout, max_payload=max_payload)
        if inbox_bytes <= 0:
            raise ValueError(f"{self.name}: inbox_bytes: expected a positive number of bytes, got {inbox_bytes}")
        self.inbox_bytes = inbox_bytes
        self.session: dict[str, Any] = json.loads(json.dumps(dict(session or {})))  # as seen on the wire
        missing = [r for r in ranks if r not in addresses]
        if missing:
            raise ValueError(f"{self.name}: no address for {[party_name(r) for r in missing]}")
        self.addresses = dict(addresses)
        self.ranks = sorted(set(ranks) | {rank})
        self.connect_timeout = connect_timeout
        self.queue_timeout = max(queue_timeout, connect_timeout)
        self.sid = sid
        self.peer_certs: dict[int, str] = {}  # rank -> SHA-256 of the certificate that peer presented
        self._await_owner = await_owner
        self._sid_lock = threading.Lock()
        self._links: dict[int, Link] = {}
        self._closed = False
        self._client_ctx = make_ssl_context(tls, server_side=False)
        self._server_ctx = make_ssl_context(tls, server_side=True)
        self._lower = [r for r in self.ranks if r < rank]
        higher = [r for r in self.ranks if r > rank]
        if await_owner and (listener is None or OWNER_RANK not in higher):
            raise ValueError(f"{self.name}: await_owner needs a listener and the data owner among the parties")
        deadline = time.monotonic() + connect_timeout
        own_listener = listener is None and bool(higher)
        if own_listener:
            host, port = self.addresses[self.rank]
            try:
                listener = open_listener(bind_host or host, port, len(self.ranks))
            except OSError as e:
                raise OSError(f"{self.name}: {e}") from e
        try:
            if not await_owner:
                self._connect_lower(deadline)
            if listener is not None and higher:
                self._accept(listener, set(higher), None if await_owner else deadline, stop)
        except BaseException:
            self.close(flush_timeout=0.0)
            raise
        finally:
            if own_listener and listener is not None:
                listener.close()

    # -- set-up ----------------------------------------------------------------------------------
    def _new_link(self, peer: int, sock: ssl.SSLSocket) -> Link:
        return Link(self.name, peer, sock, max_payload=self.max_payload, inbox_bytes=self.inbox_bytes)

    def _connect_lower(self, deadline: float) -> None:
        for peer in self._lower:
            self._links[peer] = self._new_link(peer, self._connect(peer, deadline))

    def _connect(self, peer: int, deadline: float) -> ssl.SSLSocket:
        """Connect and authenticate ``peer``, retrying while it is unreachable (until ``deadline``) or answers
        "busy" (until ``queue_timeout`` from now)."""
        busy_deadline = max(deadline, time.monotonic() + self.queue_timeout)
        while True:
            try:
                return self._connect_once(peer, deadline)
            except Busy as e:
                if time.monotonic() + _BUSY_RETRY_S > busy_deadline:
                    host, port = self.addresses[peer]
                    raise PeerTimeoutError(f"{self.name}: {party_name(peer)} at {host}:{port} stayed busy for "
                                           f"{self.queue_timeout:g} s ({e})") from None
                time.sleep(_BUSY_RETRY_S)
                deadline = max(deadline, time.monotonic() + _BUSY_RETRY_S)

    def _connect_once(self, peer: int, deadline: float) -> ssl.SSLSocket:
        host, port = self.addresses[peer]
        pname, where = party_name(peer), f"{host}:{port}"
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
        raw.settimeout(min(max(deadline - time.monotonic(), 0.5), HANDSHAKE_S))
        try:
            sock = self._client_ctx.wrap_socket(raw)
        except (ssl.SSLError, OSError) as e:
            raw.close()
            raise AuthError(f"{self.name}: TLS handshake with {pname} at {where} failed: {ssl_reason(e)}") from e
        try:
            cn = peer_common_name(sock)
            if cn != pname:
                raise AuthError(
                    f"{self.name}: the party at {where} is '{cn}', expected '{pname}' (certificate "
                    f"common name); connection refused"
                )
            self.peer_certs[peer] = cert_sha256(sock)
            try:
                sock.sendall(self._hello())
                reply = read_frame_blocking(sock, f"{self.name}: hello from {pname}")
            except (ssl.SSLError, OSError) as e:
                raise AuthError(
                    f"{self.name}: {pname} at {where} did not accept our certificate: {ssl_reason(e)}"
                ) from e
            if reply is None:
                raise AuthError(f"{self.name}: {pname} at {where} closed the connection during authentication")
            if reply.kind == "abort":
                if isinstance(reply.obj, dict) and "mismatch" in reply.obj:
                    raise ProtocolMismatchError(str(reply.obj["mismatch"]))
                if isinstance(reply.obj, dict) and "busy" in reply.obj:
                    raise Busy(str(reply.obj["busy"]))
                raise AuthError(f"{self.name}: {pname} at {where} refused the connection: {reply.obj}")
            if reply.tag != HELLO or not isinstance(reply.obj, dict) or reply.obj.get("party") != pname:
                raise AuthError(f"{self.name}: unexpected hello from {pname} at {where}: {reply.obj!r}")
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    def _accept(self, listener: socket.socket, expected: set[int], deadline: float | None,
                stop: threading.Event | None = None) -> None:
        """Authenticate incoming connections concurrently (see the module docstring) until every party of
        ``expected`` has a link or the deadline passes. ``deadline`` None (the service set-up): no deadline
        until the data owner is in, then ``connect_timeout`` for the lower ranks (dialled here, at that moment)
        and the remaining higher ones; ``stop`` ends the wait."""
        incoming = Incoming(self.name, expected)
        rejected: list[str] = []
        try:
            while expected:
                for item in incoming.results():
                    if isinstance(item, AuthError):
                        rejected = [str(item)]
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        peer, sock = item
                        expected.discard(peer)
                        self._links[peer] = self._new_link(peer, sock)
                        if deadline is None and peer == OWNER_RANK:
                            deadline = time.monotonic() + self.connect_timeout
                            self._connect_lower(deadline)
                if deadline is None and stop is not None and stop.is_set():
                    raise StopRequested(f"{self.name}: stopped while waiting for a data owner")
                remaining = deadline - time.monotonic() if deadline is not None else _ACCEPT_POLL_S
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
                hs_deadline = deadline if deadline is not None else time.monotonic() + HANDSHAKE_S
                incoming.start(raw, f"{addr[0]}:{addr[1]}",
                               functools.partial(self._handshake_incoming, incoming=incoming, deadline=hs_deadline))
        finally:
            incoming.stop()
        if expected:
            names = ", ".join(party_name(r) for r in sorted(expected))
            host, port = self.addresses[self.rank]
            if rejected:
                raise AuthError(f"{rejected[-1]} (and no authenticated connection from {names} within "
                                f"{self.connect_timeout:g} s)")
            raise PeerTimeoutError(
                f"{self.name}: {names} did not connect to {host}:{port} within {self.connect_timeout:g} s"
            )

    def _check_sid(self, peer: int, sid: Any) -> bool:
        """The service set-up's session rule (``await_owner``): the data owner's id is adopted (True is returned
        then), a peer must carry it. Raises Busy (the connector retries) or ProtocolMismatchError."""
        with self._sid_lock:
            if peer == OWNER_RANK:
                if not isinstance(sid, str) or not sid:
                    raise ProtocolMismatchError(f"{self.name}: the data owner sent no session id")
                if self.sid is None:
                    self.sid = sid
                    return True
                if sid != self.sid:
                    raise Busy(f"{self.name} is setting up another session")
            elif self.sid is None:
                raise Busy(f"{self.name} is waiting for the data owner")
            elif sid != self.sid:
                raise ProtocolMismatchError(f"{self.name}: {party_name(peer)} belongs to another session "
                                            f"({sid!r}, this one is {self.sid!r})")
            return False

    def _handshake_incoming(
        self, raw: socket.socket, where: str, incoming: Incoming, deadline: float
    ) -> tuple[int, ssl.SSLSocket]:
        """Authenticate one incoming connection (in its own thread); raises AuthError (and closes it) if it is
        refused, ProtocolMismatchError if the peer runs with other session parameters (a service waiting for
        owners refuses such a peer instead: a stray caller must not end another owner's set-up). Whatever a
        malformed peer makes the decoding raise is a refusal, never the end of the set-up."""
        try:
            return self._authenticate(raw, where, incoming, deadline)
        except AuthError:
            raise
        except ProtocolMismatchError as e:
            if self._await_owner:
                raise AuthError(str(e)) from e
            raise
        except Exception as e:  # noqa: BLE001 - e.g. a header that overflows int(): refused, the set-up goes on
            raise AuthError(f"{self.name}: refused connection from {where}: {type(e).__name__}: {e}") from e

    def _authenticate(
        self, raw: socket.socket, where: str, incoming: Incoming, deadline: float
    ) -> tuple[int, ssl.SSLSocket]:
        try:  # a client that is gone already must not end the set-up: every failure here is a refusal
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(min(max(deadline - time.monotonic(), 0.5), HANDSHAKE_S))
            sock = self._server_ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as e:
            raw.close()
            raise AuthError(f"{self.name}: refused connection from {where}: {ssl_reason(e)}") from e
        claimed, adopted = -1, False
        try:
            if not incoming.track(sock):  # from now on, stop() can wake this thread through ``sock``
                raise AuthError(f"{self.name}: refused connection from {where}: set-up is over")
            try:
                sock.do_handshake()
            except (ssl.SSLError, OSError) as e:
                raise AuthError(
                    f"{self.name}: refused connection from {where}: TLS handshake failed: {ssl_reason(e)}"
                ) from e
            cn = peer_common_name(sock)
            peer = PARTY_RANKS.get(cn or "", -1)
            if peer not in incoming.expected:
                names = ", ".join(party_name(r) for r in incoming.unclaimed())
                msg = (f"{self.name}: refused connection from {where}: certificate names '{cn}', "
                       f"expected one of: {names}")
                refuse(sock, msg)
                raise AuthError(msg)
            try:
                hello = read_frame_blocking(sock, f"{self.name}: hello from {where}")
            except (ssl.SSLError, OSError, ProtocolMismatchError) as e:
                raise AuthError(f"{self.name}: refused connection from {where}: bad hello: {e}") from e
            if hello is None or hello.tag != HELLO or not isinstance(hello.obj, dict) \
                    or hello.obj.get("party") != cn:
                raise AuthError(f"{self.name}: refused connection from {where}: bad hello from '{cn}'")
            theirs = hello.obj.get("session")
            if theirs != self.session:
                msg = (f"{self.name}: {cn} runs with different settings: {cn} has {theirs}, "
                       f"{self.name} has {self.session}")
                refuse(sock, {"mismatch": msg})
                raise ProtocolMismatchError(msg)
            if self._await_owner:
                try:
                    adopted = self._check_sid(peer, hello.obj.get("sid"))
                except Busy as e:
                    refuse(sock, {"busy": str(e)})
                    raise AuthError(f"{self.name}: told {cn} at {where} to retry: {e}") from None
                except ProtocolMismatchError as e:
                    refuse(sock, {"mismatch": str(e)})
                    raise AuthError(str(e)) from None
            if not incoming.claim(peer):
                msg = f"{self.name}: refused connection from {where}: {cn} is already connected"
                refuse(sock, msg)
                raise AuthError(msg)
            claimed = peer
            self.peer_certs[peer] = cert_sha256(sock)
            try:
                sock.sendall(self._hello())
            except (ssl.SSLError, OSError) as e:
                raise AuthError(f"{self.name}: connection from {where} ('{cn}') broke during authentication: "
                                f"{ssl_reason(e)}") from e
        except BaseException:
            if claimed >= 0:
                incoming.claim(claimed, release=True)
            if adopted:  # the owner whose session id this set-up took is gone: wait for the next one
                with self._sid_lock:
                    if OWNER_RANK not in self._links:
                        self.sid = None
            sock.close()
            raise
        sock.settimeout(None)
        return peer, sock

    def _hello(self) -> bytes:
        obj: dict[str, Any] = {"party": self.name, "session": self.session}
        if self.sid is not None:
            obj["sid"] = self.sid
        return Frame(seq=-1, tag=HELLO, kind="json", obj=obj).encode()

    # -- transport hooks -------------------------------------------------------------------------
    def _link(self, peer: int) -> Link:
        link = self._links.get(peer)
        if link is None:
            state = "closed" if self._closed else "not part of this run"
            raise PeerClosedError(f"{self.name}: no connection to {party_name(peer)} ({state})")
        return link

    def _send_frame(self, peer: int, frame: Frame) -> None:
        self._link(peer).send(frame.wire())

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



__all__ = ["HELLO", "INBOX_BYTES", "TcpCommunicator", "make_ssl_context", "open_listener", "peer_common_name",
           "refuse_while_busy"]
