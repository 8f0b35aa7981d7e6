"""SmolLM2-135M under MPC: one chunk of tuning rows, engine variants side by side in one run (docs/DECODER.md).

Run:  python benchmarks/decoder_engine.py [--rows 8] [--tokens 29] [--n-prompt 5] [--examples 2] [--per 4]
                                          [--variants baseline,fixed,fixed+two-stage] [--out FILE]

Two workloads, each the label logits of a chunk of (candidate, example) rows with the real weights:

* ``whole``: ``--rows`` rows of ``--tokens`` tokens with the soft prompt after the first token (prompt position
  "start": every row is a whole forward);
* ``cached``: prompt position "after-text": ``--examples`` prefixes of ``--tokens`` tokens prefilled once, then
  ``--per`` candidates each run their prompt and a 4-token tail (the prefill is reported apart).

Variants (the same code; only the engine differs):

* ``baseline``: every product re-opens its weight (plain Beaver matrix triples), SiLU in one stage (5
  comparisons per element) -- the engine before the fixed masks;
* ``fixed``: weights with fixed Beaver masks (:func:`secfwt.protocols.arith.fix_weight`, opened once before
  the timed part, limbs split once), SiLU in one stage;
* ``fixed+two-stage``: fixed masks and the two-stage SiLU (3 comparisons per element), the current default.

Both servers and the dealer run as threads of this process (``run_in_process``), one torch thread each; the
variants run one after the other on the same inputs, so compare them as ratios (the machine is shared).
Every revealed output is checked against the plaintext float64 forward before its time is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from secfwt.comm.base import SERVER0, SERVER1  # noqa: E402
from secfwt.context import PartyContext  # noqa: E402
from secfwt.nn import PlainBackend  # noqa: E402
from secfwt.nn.decoder import Decoder  # noqa: E402
from secfwt.nn.decoder_heads import LabelWordHead  # noqa: E402
from secfwt.nn.mpc import MpcBackend  # noqa: E402
from secfwt.runtime import run_in_process  # noqa: E402

VARIANTS = {"baseline": (False, "symmetric"), "fixed": (True, "symmetric"), "fixed+two-stage": (True, "two-stage")}
TOLERANCE = 0.1  # max abs error of the label logits (measured ~2-3e-2, docs/DECODER.md)
TAIL = [198, 35658, 2572, 42]  # "\nSentiment:" in SmolLM2's tokenizer


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8, help="whole: rows in the chunk")
    p.add_argument("--tokens", type=int, default=29, help="tokens per row (whole) / per prefix (cached)")
    p.add_argument("--n-prompt", type=int, default=5)
    p.add_argument("--examples", type=int, default=2, help="cached: prefixes")
    p.add_argument("--per", type=int, default=4, help="cached: candidates per prefix")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--workloads", default="whole,cached")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/decoder_engine.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    from secfwt.nn.llama_weights import smollm2_dir

    torch.set_num_threads(1)
    dec = Decoder.from_pretrained(smollm2_dir())
    head = LabelWordHead.from_decoder(dec, [[17728], [3559]])  # " negative", " positive"
    word = dec.params["emb.word"]
    g = torch.Generator().manual_seed(0)
    be0 = PlainBackend()
    rows: list[dict[str, Any]] = []
    for workload in a.workloads.split(","):
        n_rows = a.rows if workload == "whole" else a.examples * a.per
        n_ex = a.rows if workload == "whole" else a.examples
        ids = torch.randint(100, 40000, (n_ex, a.tokens), generator=g)
        mask = torch.ones(n_ex, a.tokens, dtype=torch.float64)
        prompts = 0.05 * torch.randn(n_rows, a.n_prompt, dec.config.hidden, generator=g, dtype=torch.float64)
        tail = word[torch.tensor(TAIL)]

        def model(be: Any, d: Decoder[Any], h: LabelWordHead[Any], x: Any, p: Any, t: Any,
                  workload: str = workload, mask: torch.Tensor = mask) -> tuple[Any, float, float]:
            t0 = time.perf_counter()
            if workload == "whole":
                with be.scope("rows"):
                    return h.forward(be, d.forward(be, x, mask, prompt=p, prompt_at=1)), 0.0, time.perf_counter() - t0
            with be.scope("prefill"):
                cache = d.prefill(be, x, mask)
            t1 = time.perf_counter()
            with be.scope("rows"):
                out = h.forward(be, d.forward_cached(be, cache, t, prompt=p, per=a.per))
            return out, t1 - t0, time.perf_counter() - t1

        inputs = (("x", word[ids]), ("p", prompts), ("t", tail))
        ref, _, _ = model(be0, dec, head, word[ids], prompts, tail)
        for name in a.variants.split(","):
            fixed, silu_method = VARIANTS[name]

            def prog(ctx: PartyContext, fixed: bool = fixed, silu_method: str = silu_method,
                     inputs: tuple[tuple[str, torch.Tensor], ...] = inputs, model: Any = model) -> Any:
                be = MpcBackend(ctx, silu_method=silu_method)
                d, h = dec.map_params(be.share_plain), head.map_params(be.share_plain)
                if fixed:  # the servers' set-up, once per session (serve.decoder.DecoderServer)
                    with be.scope("fix_weights"):
                        d = d.map_params(be.fix_matrix)
                x, p, t = (be.share_plain(n, v) for n, v in inputs)
                out, t_pre, t_rows = model(be, d, h, x, p, t)
                return be.reveal(out), t_pre, t_rows

            res = run_in_process({SERVER0: prog, SERVER1: prog}, timeout=7200)
            got, t_pre, t_rows = res[SERVER0]
            err = float((got - ref).abs().max())
            if err > TOLERANCE:
                print(f"decoder_engine: {workload}/{name}: max logit error {err:.3g} > {TOLERANCE}", file=sys.stderr)
                return 1
            ops = res.costs[SERVER0].ops
            scope = {k.split("/")[0]: 0 for k in ops}
            sent = {s: sum(o.bytes_sent for k, o in ops.items() if k.split("/")[0] == s) for s in scope}
            rounds = {s: sum(o.rounds for k, o in ops.items() if k.split("/")[0] == s) for s in scope}
            silu_s = sum(o.time_s for k, o in ops.items() if k.split("/")[:3] == ["rows", "ffn", "silu"])
            row = {"workload": workload, "variant": name, "rows": n_rows, "row_tokens": a.tokens + a.n_prompt
                   if workload == "whole" else a.n_prompt + len(TAIL), "rows_s": round(t_rows, 2),
                   "s_per_row": round(t_rows / n_rows, 3), "silu_s": round(silu_s, 2),
                   "rows_mb": round(sent.get("rows", 0) / 1e6, 1), "rows_rounds": rounds.get("rows", 0),
                   "prefill_s": round(t_pre, 2), "prefill_mb": round(sent.get("prefill", 0) / 1e6, 1),
                   "fix_mb": round(sent.get("fix_weights", 0) / 1e6, 1), "max_logit_err": err,
                   "loadavg": round(os.getloadavg()[0], 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = {r["workload"]: r for r in rows if r["variant"] == rows[0]["variant"]}
    print(f"\n| workload | variant | s / row | ratio | SiLU s | MB / server (rows) | rounds | prefill s | "
          f"max logit err |\n|{'---|' * 9}")
    for r in rows:
        b = base[r["workload"]]
        print(f"| {r['workload']} | {r['variant']} | {r['s_per_row']:.2f} | {r['rows_s'] / b['rows_s']:.2f} | "
              f"{r['silu_s']:.1f} | {r['rows_mb']:.0f} | {r['rows_rounds']} | {r['prefill_s']:.1f} | "
              f"{r['max_logit_err']:.1e} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                 "args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
