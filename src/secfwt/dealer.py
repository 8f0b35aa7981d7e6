"""The dealer: correlated randomness for the two servers, sent as PRG seeds plus corrections.

Seed compression: the dealer shares one AES key with each server. For request number ``i`` both the dealer
and server 0 derive server 0's *entire* material from a PRG stream of key 0, so server 0 never talks to the
dealer online. Server 1 derives its random parts from a stream of key 1 and receives only the
*corrections* (for a Beaver triple: ``c1 = a*b - c0``), which is the dealer's only online traffic.
Server 1 sends the request (kind + public shapes) and reads the answer lazily, so the dealer's latency
overlaps with the servers' own round.

Binding (the dealer is no unmasking oracle). Only server 1 tells the dealer what to draw, so the stream of
request ``i`` is bound to what was asked: its AES key is ``HMAC-SHA256(key_j, label | canonical JSON of
{index, kind, params})[:16]`` for key 0 and key 1 alike (:meth:`secfwt.prg.PRG.bound_stream`; canonical =
validated, defaults filled in, sorted keys, shapes as lists of ints, no floats). Suppose server 1 names
(kind', params') != (kind, params) at index ``i``, where server 0 drew its material ``m0`` (say the masks
``a0, b0`` it then opens as ``x0 - a0``) from key ``K = HMAC(key_0, i | kind | params)``. The dealer draws its
idea of server 0's material from ``K' = HMAC(key_0, i | kind' | params')``. HMAC is a PRF and server 1 does not
know key 0, so ``K'`` is independent of ``K`` from server 1's view, hence the dealer's material and every
correction computed from it (together with server 1's own parts) are independent of ``m0``: server 0's
openings stay one-time-pad masked by ``m0``, and server 1 learns nothing about server 0's secrets. (Before
binding, request ``i``'s material was stream ``i`` whatever the kind, so asking for ``bit2a`` of shape [n] where
server 0 drew a triple for a, b of shape [n] returned ``(sb0 ^ sb1) - b0``: server 0's mask ``b0`` up to one
bit, hence its share of ``y`` from its opening ``y0 - b0``.) Cost: one HMAC per request and key.

Request-log check (a lie is also *detected*). Server 0, server 1 and the dealer each keep a SHA-256 chain
``h_n = SHA-256(h_(n-1) | canonical request n-1)`` over the requests they drew or served. After every
:data:`CHECK_EVERY` (N) requests the dealer appends to its answer ``HMAC(key_0, label | n | h_n)`` (a tag
server 1 cannot forge), and at that request point the two servers exchange one small message each: server 0
sends its ``h_n``; server 1 sends its ``h_n`` and forwards the dealer's tag of the previous checkpoint ``n - N``
(one checkpoint late, so server 1 never waits for the dealer for it). Server 0 checks the tag against its
own chain, each server compares the peer's chain with its own; a difference raises
:class:`~secfwt.errors.ProtocolMismatchError` naming the first checkpoint that differs, and the party aborts
all its peers (:func:`secfwt.runtime.run_party`). At close the same exchange runs synchronously over every
checkpoint not yet confirmed, including the final one: server 1 sends ``stop``, gets the dealer's final tag,
forwards it; server 0 verifies and only then answers; server 1 then tells the dealer ``done``. A server 1 that
lies to the dealer is thus caught at the latest at close, honest parties never wait for a timeout.
Why synchronous at the checkpoint: server-to-server frames are per-pair FIFO with tag checks and every
protocol exchange is ``open_`` (send, then at once the matching receive, with no dealer request between),
so at any request point both directions are drained and the next frame from the peer is its check message;
deferring the receive past the next ``open_`` would put the check frame in front of that ``open_``'s frame.
(A protocol that requested between a send to the peer and the matching receive would fail with a tag error.)
Cost per N = 256 requests: 1 round, ~170 bytes server 0 -> server 1 and ~250 back (with the forwarded tag),
~190 bytes dealer -> server 1; at close: 1 server round trip and 3 dealer messages (stop, final tag, done).
What each party receives is a hash or MAC of public request metadata (kinds and shapes, which every party
already knows): nothing about shares or masks.

Request validation: the dealer (and each server for its own requests) checks every request before drawing:
known kind, parameters of the right types and ranges (shapes: lists of at most
:data:`~secfwt.correlations.MAX_DIMS` non-negative ints), consistent shapes, and at most
:data:`~secfwt.correlations.MAX_ELEMENTS` elements (parameter shapes plus corrections), else
:class:`~secfwt.errors.ProtocolMismatchError` before anything is allocated
(:func:`~secfwt.correlations.check_request`). Server 1 receives every correction with the shape and dtype the
request implies (:func:`~secfwt.correlations.correction_layout`), so a wrong tensor from the dealer is
rejected naming the request, the tensor, the expected and the received shape or dtype.

Offline and online (timing). Server 1 times every blocking read of the dealer's answers
(:meth:`Pending.get`, the reads at a checkpoint and at close) into its cost ledger's ``dealer_wait_s``; the
dealer's ``dealer/<kind>`` scopes time its generation (drawing, correcting, sending). See
:func:`secfwt.cost.offline_online` for the split every report shows.

Preprocessing (the dealer ahead of the servers). The request sequence of a computation depends only on public
shapes, so a computation repeated with the same shapes (every generation of a tuning run, a benchmark's
forward) makes the same requests again. :meth:`DealerClient.record` logs the ``(kind, params)`` a server asks
for; :meth:`DealerClient.preload` takes such a list before the next run of the same computation: server 0 derives
its material for all of them, server 1 derives its parts, sends the requests and reads every answer (the offline
phase); :meth:`DealerClient.request` then hands out the preloaded material in order, after checking that each
request is the one preloaded at its index (else :class:`~secfwt.errors.ProtocolMismatchError`: the dealer
already served the preloaded one, so the session cannot go on). Nothing new is sent: the same request and answer
frames in the same order, only earlier; the request log and its checkpoints advance when a request is *used*,
exactly as without preloading, so the binding and the log check are unchanged. A preloaded request never used
fails the final log check; :meth:`DealerClient.close` names it first. Preloading also runs the servers' own
input-independent work on the material (:meth:`DealerClient.derive`): a fixed-weight product's A_i F^T is
computed then, so the online phase does one ring matmul per linear layer instead of two (the offline/online
split of Delphi, Mishra et al. 2020, there with HE; here the mask comes from the dealer).

Prefetching (the dealer running ahead, no offline phase). :meth:`DealerClient.prefetch` takes a recording as
:meth:`~DealerClient.preload` does, but server 1 only *sends* the requests early, as many as keep at most
:data:`PREFETCH_BYTES` of answers outstanding (at least one), topping the window up at each request it uses;
the answers are read when used, as always. The dealer thus generates while the servers compute instead of
between their rounds; the window bounds the memory on both ends (the dealer's send queue, server 1's inbox).
Server 0 does nothing different (it draws at use). The same frames go in the same order: only their timing
moves. A session (:mod:`secfwt.serve.session`) prefetches every command it has seen before with the same
public signature.

The kinds, their parameters and the layout of their corrections: :mod:`secfwt.correlations`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from secfwt.comm.base import DEALER, PARTY_NAMES, SERVER0, SERVER1, Communicator
from secfwt.correlations import (
    KINDS,
    MAX_ELEMENTS,
    STATEFUL,
    Layout,
    Material,
    brief,
    check_request,
    compare_words,
    correct,
    correction_layout,
    draws,
    even_bits,
    layout_bytes,
    odd_bits,
    word_bits,
)
from secfwt.errors import ProtocolMismatchError
from secfwt.prg import PRG, PRGStream

CHECK_EVERY = 256  # requests between two request-log checkpoints
PREFETCH_BYTES = 256 << 20  # dealer corrections server 1 lets be outstanding in a prefetch (its run-ahead window)
_REQ_LABEL = b"secfwt/dealer/request\x00"
_LOG_LABEL = b"secfwt/dealer/log\x00"


# -- binding and the request log --


def canonical_request(index: int, kind: str, canon: dict[str, Any]) -> bytes:
    """The canonical bytes of request ``index`` (sorted keys, no spaces): what binds its randomness and is
    chained into the request log."""
    return json.dumps({"index": index, "kind": kind, "params": canon}, sort_keys=True,
                      separators=(",", ":")).encode()


def request_stream(prg: PRG, line: bytes) -> PRGStream:
    """The PRG stream of one request, bound to its canonical bytes ``line`` (see module docstring)."""
    return prg.bound_stream(_REQ_LABEL + line)


def log_tag(prg0: PRG, count: int, digest: bytes) -> str:
    """The dealer's tag of its request log after ``count`` requests, under key 0 (hex)."""
    return prg0.mac(_LOG_LABEL + count.to_bytes(8, "big") + digest).hex()


class RequestLog:
    """A SHA-256 chain over canonical requests: equal digests mean equal request sequences."""

    def __init__(self) -> None:
        self.digest = bytes(32)

    def add(self, line: bytes) -> None:
        self.digest = hashlib.sha256(self.digest + line).digest()


def _logs_differ(who: str, what: str, n: int, every: int) -> ProtocolMismatchError:
    lo = (n - 1) // every * every if n > 0 else 0
    since = f"checkpoint #{lo} matched" if lo else "the first checkpoint"
    return ProtocolMismatchError(
        f"{who}: {what}: the request logs first differ at checkpoint #{n} (requests #{lo}..#{n - 1}; {since})")


def _digest_of(msg: Any, n: int, sender: int, who: str) -> bytes:
    """The chain digest in a peer's check message for checkpoint ``n``."""
    try:
        if int(msg["index"]) != n:
            raise ValueError(f"it is for checkpoint #{msg['index']}")
        digest = bytes.fromhex(msg["log"])
        if len(digest) != 32:
            raise ValueError(f"its digest has {len(digest)} bytes")
        return digest
    except (TypeError, KeyError, ValueError) as e:
        raise ProtocolMismatchError(
            f"{who}: malformed request-log check #{n} from {PARTY_NAMES[sender]}: {e}") from None


Derivation = Callable[[dict[str, Any], Material], Material]


class Pending:
    """Server 1's view of an outstanding request: own random parts now, corrections when read."""

    def __init__(self, client: DealerClient, index: int, kind: str, material: Material, layout: Layout,
                 done: bool) -> None:
        self._client = client
        self.index = index
        self.material = material
        self._kind = kind
        self._layout = layout
        self._done = done
        self.nbytes = 0 if done else layout_bytes(layout)
        client._outstanding += self.nbytes

    def _fill(self) -> None:
        c = self._client
        start = time.perf_counter()
        try:
            for name, (shape, dtype) in self._layout.items():
                self.material[name] = c.comm.recv(DEALER, f"dealer/{self._kind}/{name}", shape=shape, dtype=dtype)
        except ProtocolMismatchError as e:
            raise ProtocolMismatchError(
                f"{c.comm.name}: dealer answer to request #{self.index} ({self._kind}): {e}") from e
        if (self.index + 1) % c.check_every == 0:
            c._take_tag(self.index + 1)
        c.comm.cost.on_dealer_wait(time.perf_counter() - start)
        c._outstanding -= self.nbytes
        self._done = True

    def get(self) -> Material:
        if not self._done:
            self._client.drain_until(self)
        return self.material


_REFERENCES = ("fid", "wid")  # request fields naming an earlier request by its index (and each entry of "cross")


class Recording(list[tuple[str, dict[str, Any]]]):
    """The requests of one recorded computation (:meth:`DealerClient.recorded`); ``base``: the index of its first
    request. A request may name an earlier one (a mask ``fid``/``wid``, ``cross`` entries): names inside the
    recording move with it when it is preloaded at another index, names of earlier requests (a session's weight
    masks) stay."""

    def __init__(self, requests: Sequence[tuple[str, dict[str, Any]]], base: int) -> None:
        super().__init__(requests)
        self.base = base


def _rebase(params: dict[str, Any], base: int, shift: int) -> dict[str, Any]:
    """``params`` with every reference to a request at index >= ``base`` moved by ``shift``."""
    def move(i: int) -> int:
        return i + shift if i >= base else i

    out = dict(params)
    for key in _REFERENCES:
        if key in out and int(out[key]) >= 0:
            out[key] = move(int(out[key]))
    if "cross" in out:
        out["cross"] = [move(int(i)) for i in out["cross"]]
    return out


class DealerClient:
    """A server's access to the dealer (see module docstring for the seed compression, binding and log check)."""

    def __init__(self, rank: int, comm: Communicator, prg: PRG, check_every: int = CHECK_EVERY) -> None:
        if rank not in (SERVER0, SERVER1):
            raise ValueError(f"DealerClient is for servers, got rank {rank}")
        self.rank = rank
        self.comm = comm
        self.prg = prg
        self.check_every = check_every
        self.index = 0
        self.log = RequestLog()
        self._queue: deque[Pending] = deque()
        self._unconfirmed: dict[int, bytes] = {}  # server 0: own log digests the dealer has not confirmed yet
        self._tags: dict[int, str] = {}  # server 1: the dealer's log tags, not yet forwarded to server 0
        self._record: Recording | None = None  # requests made while recording
        self._ahead: deque[tuple[bytes, Pending]] = deque()  # preloaded requests, not used yet
        self._derive: dict[tuple[str, int], Derivation] = {}  # local precomputation of preloaded requests
        self._plan: deque[tuple[int, str, dict[str, Any], Layout, bytes]] = deque()  # prefetched, not yet sent
        self._outstanding = 0  # server 1: bytes of dealer answers requested and not yet read
        self._window = PREFETCH_BYTES

    def derive(self, kind: str, ref: int, fn: Derivation) -> None:
        """Register input-independent local work for preloaded requests of ``kind`` that name request ``ref``
        (their ``wid``): :meth:`preload` adds ``fn(params, material)`` to such a request's material in the
        offline phase (e.g. A_i F^T of a fixed-weight product, :func:`secfwt.protocols.arith.fix_weight`).
        It reads only this server's own material and public values: nothing is sent."""
        self._derive[(kind, ref)] = fn

    def request(self, kind: str, **params: Any) -> Pending:
        """Ask for one correlation; returns at once (server 1's corrections are read on ``get()``)."""
        index = self.index
        canon, layout = check_request(kind, params, index, self.comm.name)
        line = canonical_request(index, kind, canon)
        if self._record is not None:
            self._record.append((kind, canon))
        if self._plan and not self._ahead:
            self._top_up()
        if self._ahead:
            want, pend = self._ahead.popleft()
            if want != line:
                raise ProtocolMismatchError(
                    f"{self.comm.name}: request #{index} is {kind} {brief(canon)}, but the preloaded request "
                    f"#{index} is {brief(json.loads(want))}; preload only a computation with the same shapes")
        else:
            pend = self._issue(index, kind, canon, layout, line)
        self._advance(line)
        if self._plan:
            self._top_up()
        return pend

    def _issue(self, index: int, kind: str, canon: dict[str, Any], layout: Layout, line: bytes) -> Pending:
        """Draw this server's material of one request (server 1: and send the request to the dealer)."""
        draw0, draw1 = draws(kind)
        st = request_stream(self.prg, line)
        if self.rank == SERVER0:
            return Pending(self, index, kind, draw0(canon, st), {}, done=True)
        self.comm.send_json(DEALER, "dealer/req", {"kind": kind, "params": canon, "index": index})
        pend = Pending(self, index, kind, draw1(canon, st), layout, done=False)
        self._queue.append(pend)
        return pend

    def record(self) -> None:
        """Start logging the ``(kind, params)`` of every request (for :meth:`preload`); see :meth:`recorded`."""
        self._record = Recording([], self.index)

    def recorded(self) -> Recording:
        """Stop logging; the requests made since :meth:`record` (canonical parameters), in order, with the
        index of the first (references to requests inside the recording are moved by :meth:`preload`)."""
        if self._record is None:
            raise RuntimeError("DealerClient.recorded() without record()")
        out, self._record = self._record, None
        return out

    def preload(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """The offline phase for the next ``len(requests)`` requests (see module docstring): derive this
        server's material and (server 1) read every dealer answer now. Both servers must preload the same list
        at the same point; the following requests must be exactly these, in order."""
        for index, kind, canon, layout, line in self._planned(requests, "preload"):
            pend = self._issue(index, kind, canon, layout, line)
            fn = self._derive.get((kind, int(canon.get("wid", -1))))
            if fn is not None:
                pend.material.update(fn(canon, pend.material))
            self._ahead.append((line, pend))
        while self._queue:
            self._queue.popleft()._fill()

    def prefetch(self, requests: Sequence[tuple[str, dict[str, Any]]], window: int = PREFETCH_BYTES) -> None:
        """Let the dealer run ahead through the next ``len(requests)`` requests (a recording of an earlier
        computation with the same shapes, as for :meth:`preload`), without an offline phase: server 1 sends
        the requests as early as it may, keeping at most ``window`` bytes of answers outstanding (at least
        one request), and tops the window up at every request it uses; the dealer computes and sends while
        the servers compute. Server 0 derives its material locally at use, as always: prefetching is server 1
        sending the same request frames in the same order, only earlier (the request log, its checkpoints and
        the binding are unchanged). Both servers call it at the same point with the same list; the following
        requests must be exactly these, in order (else :class:`~secfwt.errors.ProtocolMismatchError`). What
        it buys: the dealer's generation overlaps the servers' work instead of alternating with it (on a
        machine with idle cores while a server waits for the dealer)."""
        if type(window) is not int or window < 0:
            raise ValueError(f"prefetch: window must be a non-negative int of bytes, got {window!r}")
        plan = self._planned(requests, "prefetch")
        if self.rank == SERVER1:
            self._window = window
            self._plan.extend(plan)
            self._top_up()

    def _planned(self, requests: Sequence[tuple[str, dict[str, Any]]],
                 what: str) -> list[tuple[int, str, dict[str, Any], Layout, bytes]]:
        """The next requests of a recording, moved to this point and checked: (index, kind, canon, layout,
        line) each."""
        if self._ahead or self._plan:
            raise RuntimeError(f"{self.comm.name}: {what}() while {len(self._ahead) + len(self._plan)} earlier "
                               "preloaded or prefetched requests are unused")
        base = getattr(requests, "base", self.index)
        out = []
        for index, (kind, params) in enumerate(requests, start=self.index):
            if base != self.index:
                params = _rebase(params, base, self.index - base)
            canon, layout = check_request(kind, params, index, self.comm.name)
            out.append((index, kind, canon, layout, canonical_request(index, kind, canon)))
        return out

    def _top_up(self) -> None:
        """Server 1: send planned requests while the answers outstanding fit the window (at least one when
        none is ready to use)."""
        while self._plan and (self._outstanding < self._window or not self._ahead):
            index, kind, canon, layout, line = self._plan.popleft()
            self._ahead.append((line, self._issue(index, kind, canon, layout, line)))

    def _advance(self, line: bytes) -> None:
        """Log one request; at every ``check_every``-th, run the checkpoint exchange with the other server."""
        self.log.add(line)
        self.index += 1
        if self.index % self.check_every == 0:
            n, prev = self.index, self.index - self.check_every
            with self.comm.cost.scope("dealer_check"):
                if self.rank == SERVER0:
                    self._unconfirmed[n] = self.log.digest
                    self._send_log(n, None)
                    self._verify(self.comm.recv_json(SERVER1, "dealer/check"), n, [prev] if prev else [])
                else:
                    while prev and prev not in self._tags:
                        self._queue.popleft()._fill()  # the answer that carries it (normally read long ago)
                    self._send_log(n, [prev] if prev else [])
                    self._compare(self.comm.recv_json(SERVER0, "dealer/check"), n)
                self.comm.cost.add_round()

    def _send_log(self, n: int, marks: list[int] | None) -> None:
        msg: dict[str, Any] = {"index": n, "log": self.log.digest.hex()}
        if marks is not None:
            msg["dealer"] = {str(m): self._tags.pop(m) for m in marks}
        self.comm.send_json(1 - self.rank, "dealer/check", msg)

    def _take_tag(self, n: int) -> None:
        """Server 1: read the dealer's log tag for checkpoint ``n`` (after an answer or after ``stop``)."""
        msg = self.comm.recv_json(DEALER, "dealer/log")
        if not isinstance(msg, dict) or msg.get("index") != n or not isinstance(msg.get("tag"), str):
            raise ProtocolMismatchError(f"{self.comm.name}: expected the dealer's log tag #{n}, got {brief(msg)}")
        self._tags[n] = msg["tag"]

    def _compare(self, msg: Any, n: int) -> None:
        """Server 1: the other server's log digest must equal this server's."""
        if _digest_of(msg, n, SERVER0, self.comm.name) != self.log.digest:
            raise _logs_differ(self.comm.name, "server0's request log differs from server1's", n, self.check_every)

    def _verify(self, msg: Any, n: int, marks: list[int]) -> None:
        """Server 0: the dealer's forwarded tags must match this server's log at ``marks``, and server 1's
        digest this server's at ``n``."""
        peer = _digest_of(msg, n, SERVER1, self.comm.name)
        tags = msg.get("dealer")
        if not isinstance(tags, dict) or sorted(tags) != sorted(str(m) for m in marks):
            got = sorted(tags) if isinstance(tags, dict) else brief(tags)
            raise ProtocolMismatchError(
                f"{self.comm.name}: check #{n} from server1 forwards the dealer's log tags of checkpoints {got}, "
                f"expected {marks}")
        for m in sorted(marks):
            tag = tags[str(m)]
            want = log_tag(self.prg, m, self._unconfirmed.pop(m))
            if not isinstance(tag, str) or not hmac.compare_digest(tag.encode(), want.encode()):
                raise _logs_differ(self.comm.name, "the dealer served other requests than server0 drew", m,
                                   self.check_every)
        if peer != self.log.digest:
            raise _logs_differ(self.comm.name, "server1's request log differs from server0's", n, self.check_every)

    def drain_until(self, target: Pending) -> None:
        while self._queue:
            pend = self._queue.popleft()
            pend._fill()
            if pend is target:
                return
        raise RuntimeError("dealer request was already consumed")

    def close(self) -> None:
        """End of the session: the final, synchronous request-log check (see module docstring), then stop."""
        n = self.index
        if self._ahead or self._plan:
            raise ProtocolMismatchError(
                f"{self.comm.name}: {len(self._ahead) + len(self._plan)} preloaded or prefetched dealer requests "
                f"(from #{n}) were never used; "
                "the request logs cannot match")
        with self.comm.cost.scope("dealer_check"):
            if self.rank == SERVER1:
                while self._queue:
                    self._queue.popleft()._fill()
                self.comm.send_json(DEALER, "dealer/req", {"kind": "stop", "params": {}, "index": n})
                self._take_tag(n)
                self._send_log(n, sorted(self._tags))
                self._compare(self.comm.recv_json(SERVER0, "dealer/check"), n)  # sent once server 0 verified
                self.comm.send_json(DEALER, "dealer/done", {})
            else:
                self._unconfirmed[n] = self.log.digest
                self._verify(self.comm.recv_json(SERVER1, "dealer/check"), n, sorted(self._unconfirmed))
                self._send_log(n, None)
            self.comm.cost.add_round()


def _parse(req: Any) -> tuple[str, Any, int]:
    if not isinstance(req, dict) or not isinstance(req.get("kind"), str) or type(req.get("index")) is not int:
        raise ProtocolMismatchError(f"dealer: malformed request {brief(req)} (expected index, kind, params)")
    return req["kind"], req.get("params"), req["index"]


def serve(comm: Communicator, prg0: PRG, prg1: PRG, idle_timeout: float | None = None,
          check_every: int = CHECK_EVERY) -> int:
    """The dealer's loop: answer server 1's requests until it says stop. Returns the number served."""
    served = 0
    store: dict[Any, Any] = {}  # the stateful kinds' fixed weight masks (by request index), prepared
    log = RequestLog()
    old_timeout = comm.timeout
    if idle_timeout is not None:
        comm.timeout = idle_timeout
    try:
        while True:
            kind, params, index = _parse(comm.recv_json(SERVER1, "dealer/req"))
            if index != served:
                raise ProtocolMismatchError(f"dealer: expected request #{served}, got #{index} ({brief(kind)})")
            if kind == "stop":
                comm.send_json(SERVER1, "dealer/log", {"index": served, "tag": log_tag(prg0, served, log.digest)})
                comm.recv_json(SERVER1, "dealer/done")
                return served
            canon, layout = check_request(kind, params, index)
            line = canonical_request(index, kind, canon)
            draw0, draw1 = draws(kind)
            with comm.cost.scope(f"dealer/{kind}"):
                m0, m1 = draw0(canon, request_stream(prg0, line)), draw1(canon, request_stream(prg1, line))
                corr = correct(kind, canon, m0, m1, store, index)
                if list(corr) != list(layout):
                    raise RuntimeError(f"dealer: {kind} computed corrections {list(corr)}, layout says {list(layout)}")
                for name, (shape, dtype) in layout.items():
                    t = corr[name]
                    if tuple(t.shape) != shape or t.dtype != dtype:
                        raise RuntimeError(f"dealer: {kind} correction '{name}' is {tuple(t.shape)} {t.dtype}, "
                                           f"layout says {shape} {dtype}")
                    comm.send(SERVER1, f"dealer/{kind}/{name}", t)
            log.add(line)
            served += 1
            if served % check_every == 0:
                comm.send_json(SERVER1, "dealer/log", {"index": served, "tag": log_tag(prg0, served, log.digest)})
    finally:
        comm.timeout = old_timeout


__all__ = ["CHECK_EVERY", "KINDS", "MAX_ELEMENTS", "STATEFUL", "DealerClient", "Pending", "RequestLog",
           "canonical_request", "check_request", "compare_words", "correction_layout", "even_bits", "log_tag",
           "odd_bits", "request_stream", "serve", "word_bits"]
