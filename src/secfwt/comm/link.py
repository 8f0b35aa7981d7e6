"""One authenticated peer connection and the I/O thread that owns it (:mod:`secfwt.comm.tcp` builds them).

The thread drains the socket into the link's inbox of decoded frames and writes queued outgoing frames, both
without blocking, and stops reading while the inbox holds more than ``inbox_bytes`` (back-pressure; see the
module docstring of :mod:`secfwt.comm.tcp`). A send that finds nothing queued writes its frame itself, without
blocking, and hands only what the socket did not take to the thread: no wake-up and no thread switch on the
common path of a round (measured: waking the thread was 10 % of a server's online CPU samples in an encoder
layer). Every call into the TLS object holds ``_io``, so it is never used by two threads at once.
"""

from __future__ import annotations

import contextlib
import queue
import selectors
import socket
import ssl
import threading
from collections import deque

from secfwt.comm.base import MAX_PAYLOAD_BYTES, Frame, FrameReader
from secfwt.comm.tls import pname, ssl_reason
from secfwt.errors import CommError, PeerClosedError, PeerTimeoutError

INBOX_BYTES = 1 << 30  # default bound on the bytes waiting in one link's inbox (back-pressure)
_FRAME_COST = 1024  # accounted per queued frame on top of its wire size: the Python objects holding it
_WRITE_CHUNK = 1 << 18
POLL_S = 0.2
_READ_BUDGET = 256  # TLS records (<= 16 KiB each) read per turn of the I/O loop


class Link:
    """One authenticated peer connection and the I/O thread that owns it.

    ``queued`` counts the bytes of the frames waiting in the inbox (wire size + ``_FRAME_COST`` each);
    ``peak_held`` is the most ever held (queued + the frame in progress), for tests and diagnostics.
    """

    def __init__(self, owner: str, peer: int, sock: ssl.SSLSocket, max_payload: int = MAX_PAYLOAD_BYTES,
                 inbox_bytes: int = INBOX_BYTES) -> None:
        self.owner, self.peer, self.pname = owner, peer, pname(peer)
        self.sock = sock
        sock.setblocking(False)
        self.inbox: queue.Queue[tuple[Frame, int] | CommError] = queue.Queue()
        self.inbox_bytes = inbox_bytes
        self.queued = 0
        self.peak_held = 0
        self.reader = FrameReader(f"{owner}: message from {self.pname}", max_payload)
        self._paused = False
        self._out: deque[bytes | memoryview] = deque()
        self._cur: memoryview | None = None
        self._lock = threading.Lock()
        self._io = threading.Lock()  # held around every call into the TLS object
        self._writing = False  # a party thread is writing a frame directly (the queue waits behind it)
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
    def send(self, data: bytes | memoryview) -> None:
        """Send ``data`` without blocking: written at once when nothing is queued before it (what the socket does
        not take goes to the I/O thread), else queued; raises PeerClosedError if the connection is already
        broken (a break found while writing is reported by the I/O thread, as for queued frames)."""
        with self._lock:
            if self._dead is not None:
                raise PeerClosedError(f"{self.owner}: cannot send to {self.pname}: {self._dead}")
            self._idle.clear()
            direct = not self._out and self._cur is None and not self._writing
            if direct:
                self._writing = True
            else:
                self._out.append(data)
        if not direct:
            self._wake()
            return
        rest: memoryview | None = memoryview(data)
        try:
            with self._io:
                rest = self._write_now(memoryview(data))
        except (ssl.SSLError, OSError):
            pass  # the I/O thread's own write finds the broken connection and reports it
        with self._lock:
            self._writing = False
            if rest is not None and self._dead is None:
                self._out.appendleft(rest)
            pending = bool(self._out)
            if not pending and self._cur is None:
                self._idle.set()
        if pending:
            self._wake()

    def _write_now(self, view: memoryview) -> memoryview | None:
        """Write what the socket takes now (caller holds ``_io``); the unwritten rest, or None when all went."""
        while view:
            try:
                n = self.sock.send(view[:_WRITE_CHUNK])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return view
            view = view[n:]
        return None

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
                for key, _ in sel.select(0.0 if more and reading else POLL_S):
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                with self._io:
                    more = self._pump_read()
                    self._pump_write()
        except CommError as e:
            self._fail(e)
        except (ssl.SSLError, OSError) as e:
            self._fail(PeerClosedError(f"{self.owner}: connection to {self.pname} broke: {ssl_reason(e)}"))
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
                    if self._writing:  # a party thread is writing: what is queued goes after its frame
                        return
                    if not self._out:
                        self._idle.set()
                        return
                    self._cur = memoryview(self._out.popleft())
            try:
                n = self.sock.send(self._cur[:_WRITE_CHUNK])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return
            self._cur = self._cur[n:] if n < len(self._cur) else None


