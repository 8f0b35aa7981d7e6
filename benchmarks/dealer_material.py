"""What the dealer sends and computes for one private forward, by kind of correlation and by component.

Run:  python benchmarks/dealer_material.py [--models minilm] [--attention softmax] [--seq 128] [--out FILE]

The two servers and the dealer run in-process (:func:`secfwt.runtime.run_in_process`) on the same share files
as ``benchmarks/forward.py``; server 1 records the forward's dealer requests
(:meth:`secfwt.dealer.DealerClient.record`). Per kind and per component the table gives the bytes the dealer
sends to server 1 (:func:`secfwt.correlations.correction_layout`, exact), and per kind the dealer's generation
time for the same requests replayed alone on one thread: drawing server 0's material from its stream, server
1's random parts, and computing the corrections (:mod:`secfwt.correlations`), without the network. It says
where the offline phase's bytes and time go, i.e. which protocol's key material to shrink next.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forward as F  # noqa: E402

from secfwt.comm.base import OWNER, SERVER0, SERVER1  # noqa: E402
from secfwt.context import PartyContext  # noqa: E402
from secfwt.correlations import correct, correction_layout, draws, layout_bytes  # noqa: E402
from secfwt.cost import cpu_model  # noqa: E402
from secfwt.dealer import canonical_request, check_request, request_stream  # noqa: E402
from secfwt.nn.encoder import Encoder  # noqa: E402
from secfwt.prg import PRG, new_key  # noqa: E402
from secfwt.runtime import run_in_process  # noqa: E402
from secfwt.share import owner_share, receive_revealed, reveal_to  # noqa: E402


def _server(shares: Path, attention: str, b: int, t: int) -> Any:
    def prog(ctx: PartyContext) -> Any:
        be, enc = F.load_encoder(ctx, shares, F.ATTENTIONS[attention])
        x = be.from_owner((b, t, enc.config.hidden))
        assert ctx.dealer is not None
        ctx.dealer.record()
        out = enc.forward(be, x, torch.ones(b, t)).hidden
        reqs = ctx.dealer.recorded()
        reveal_to(ctx, out, OWNER, tag="hidden")
        return {"requests": list(reqs), "base": reqs.base}

    return prog


def replay(requests: list[tuple[str, dict[str, Any]]], base: int) -> dict[str, float]:
    """The dealer's generation seconds per kind for ``requests`` (numbered from ``base``), on fresh keys, one
    thread. Weight masks drawn before the recording (the session's) are stood in by random tensors."""
    torch.set_num_threads(1)
    prg0, prg1 = PRG(new_key()), PRG(new_key())
    store: dict[Any, Any] = {}
    secs: dict[str, float] = defaultdict(float)
    for index, (kind, params) in enumerate(requests, start=base):
        canon, _ = check_request(kind, params, index)
        if kind == "wmatmul" and int(canon["wid"]) not in store:
            store[int(canon["wid"])] = torch.randint(-(2**62), 2**62, tuple(canon["w"]))
        line = canonical_request(index, kind, canon)
        draw0, draw1 = draws(kind)
        start = time.perf_counter()
        m0, m1 = draw0(canon, request_stream(prg0, line)), draw1(canon, request_stream(prg1, line))
        correct(kind, canon, m0, m1, store, index)
        secs[kind] += time.perf_counter() - start
    return dict(secs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="minilm", choices=sorted(F.MODELS))
    ap.add_argument("--attention", default="softmax", choices=sorted(F.ATTENTIONS))
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/results/dealer_material-<model>.json)")
    a = ap.parse_args(argv)
    model_dir = F.MODELS[a.models]()
    enc = Encoder.from_pretrained(model_dir)
    embeds = enc.params["emb.word"][F.input_ids(1, a.seq, enc.config.vocab_size)]
    shares = F.shares_for(a.models, model_dir)

    def owner(ctx: PartyContext) -> Any:
        owner_share(ctx, embeds)
        return receive_revealed(ctx, embeds.shape, ctx.f, tag="hidden")

    prog = _server(shares, a.attention, 1, a.seq)
    res = run_in_process({SERVER0: prog, SERVER1: prog, OWNER: owner}, timeout=1800)
    reqs, base = res[SERVER1]["requests"], res[SERVER1]["base"]
    by_kind: dict[str, dict[str, Any]] = {}
    for kind, params in reqs:
        row = by_kind.setdefault(kind, {"requests": 0, "bytes": 0, "components": defaultdict(int)})
        row["requests"] += 1
        for name, (shape, dtype) in correction_layout(kind, params).items():
            nb = layout_bytes({name: (shape, dtype)})
            row["bytes"] += nb
            row["components"][name] += nb
    secs = replay(reqs, base)
    total = sum(r["bytes"] for r in by_kind.values())
    head = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu_model()}; {a.models}, {a.attention}, "
            f"1 x {a.seq}; {len(reqs)} dealer requests, {total / 1e6:.1f} MB to server 1, generation "
            f"{sum(secs.values()):.2f} s (replayed alone, one thread, no network)")
    lines = [head, "", "| kind | requests | MB | share | generation s | largest components (MB) |",
             "|---|---:|---:|---:|---:|---|"]
    for kind, r in sorted(by_kind.items(), key=lambda kv: -kv[1]["bytes"]):
        comps = ", ".join(f"{n} {b / 1e6:.0f}" for n, b in sorted(r["components"].items(), key=lambda x: -x[1])[:6])
        lines.append(f"| {kind} | {r['requests']} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / max(total, 1):.0%} | "
                     f"{secs.get(kind, 0.0):.3f} | {comps} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(a.out) if a.out else Path(__file__).resolve().parent / "results" / f"dealer_material-{a.models}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": head, "table": text, "command": " ".join(["python", *sys.argv]),
                               "kinds": {k: {**v, "components": dict(v["components"]), "generation_s": secs.get(k)}
                                         for k, v in by_kind.items()}}, indent=1) + "\n")
    print(f"results: {os.path.relpath(out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
