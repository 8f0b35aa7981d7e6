"""SmolLM2-135M-Instruct: MPC label predictions vs plaintext on SST-2 dev (docs/DECODER.md).

Run:  python benchmarks/decoder_agreement.py --n 200 --batch 6 --attention softmax --out results.json
      [--data ../shared/data] [--skip N] [--rfa-form masked|prefix]

Both servers run as threads of one process (``run_in_process``), ONE session for all batches: the weights are
shared and their Beaver masks fixed once (``MpcBackend.fix``, as a server does), then every batch is one MPC
forward of the whole decoder + label-word head, compared with the same code on ``PlainBackend`` (float64). The JSON file
is rewritten after every batch (a partial run keeps its numbers): per-batch rows and the running totals
(label agreement, max abs logit error, accuracies, seconds per example, bytes / rounds per forward, peak RSS).
``--plain-vs-softmax``: no MPC; the plaintext ``--attention`` model against the plaintext softmax model (the
"mpc" fields then hold the softmax model's predictions).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from secfwt.comm.base import SERVER0, SERVER1  # noqa: E402
from secfwt.context import PartyContext  # noqa: E402
from secfwt.nn import AttentionConfig, PlainBackend  # noqa: E402
from secfwt.nn.decoder import Decoder  # noqa: E402
from secfwt.nn.decoder_heads import LabelWordHead  # noqa: E402
from secfwt.nn.inputs import embed_local  # noqa: E402
from secfwt.nn.mpc import MpcBackend  # noqa: E402
from secfwt.runtime import run_in_process  # noqa: E402

TEMPLATE = "Review: {text}\nSentiment:"
WORDS = (" negative", " positive")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def sst2_dev(data: Path) -> list[tuple[str, int]]:
    """The 872-example GLUE SST-2 dev set (LM-BFF k-shot ``test.tsv``)."""
    path = data / "k-shot" / "SST-2" / "16-42" / "test.tsv"
    if not path.is_file():
        sys.exit(f"decoder_agreement: {path} not found (pass --data DIR)")
    lines = path.read_text().splitlines()[1:]
    return [(s, int(y)) for s, y in (ln.rsplit("\t", 1) for ln in lines)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--skip", type=int, default=0, help="start at this dev example")
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--attention", default="softmax", choices=["softmax", "rfa", "2quad"])
    ap.add_argument("--rfa-form", default="masked", choices=["masked", "prefix"])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--plain-vs-softmax", action="store_true",
                    help="no MPC: compare plaintext --attention with plaintext softmax ('mpc' fields = softmax)")
    ap.add_argument("--sort", action="store_true", help="batch the examples by token length (less padding)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import transformers

    from secfwt.nn.llama_weights import smollm2_dir

    d = smollm2_dir()
    tok = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    tok.padding_side = "right"
    dec = Decoder.from_pretrained(d, attention=AttentionConfig(args.attention), rfa_form=args.rfa_form)
    head = LabelWordHead.from_decoder(dec, [tok(w).input_ids for w in WORDS])
    rows = sst2_dev(args.data)[args.skip:args.skip + args.n]
    if args.sort:  # same examples, batched by token length: less padding, ~same cost per real token
        rows.sort(key=lambda r: len(tok(TEMPLATE.format(text=r[0])).input_ids))
    be0 = PlainBackend()
    soft = dec.with_attention(AttentionConfig("softmax")) if args.plain_vs_softmax else None
    batches = []
    for i in range(0, len(rows), args.batch):
        chunk = rows[i:i + args.batch]
        enc = tok([TEMPLATE.format(text=s) for s, _ in chunk], padding=True, return_tensors="pt")
        embeds = embed_local(dec.params["emb.word"], enc.input_ids)
        mask = enc.attention_mask.to(torch.float64)
        ref = head.forward(be0, dec.forward(be0, embeds, mask))  # the oracle, before the MPC session
        batches.append((i, embeds, mask, torch.tensor([y for _, y in chunk]), ref))
    per_batch: list[dict[str, Any]] = []
    tot: dict[str, Any] = {"n": 0, "agree": 0, "correct_mpc": 0, "correct_plain": 0, "max_logit_err": 0.0,
                           "seconds": 0.0, "bytes_sent_server0": 0, "max_rounds_per_forward": 0}
    summary: dict[str, Any] = {}

    def record(b: int, got: torch.Tensor, sec: float, n_bytes: int, n_rounds: int) -> None:
        """Compare one batch with the plaintext oracle, update the totals and rewrite the JSON file."""
        i, _, mask, labels, ref = batches[b]
        err = (got - ref).abs().max().item()
        row = {"start": i, "size": len(labels), "T": int(mask.shape[1]), "seconds": sec,
               "bytes_sent_server0": n_bytes, "rounds": n_rounds, "max_logit_err": err,
               "agree": int((got.argmax(-1) == ref.argmax(-1)).sum()),
               "correct_mpc": int((got.argmax(-1) == labels).sum()),
               "correct_plain": int((ref.argmax(-1) == labels).sum())}
        per_batch.append(row)
        for k in ("agree", "correct_mpc", "correct_plain", "seconds", "bytes_sent_server0"):
            tot[k] += row[k]
        tot["n"] += len(labels)
        tot["max_logit_err"] = max(tot["max_logit_err"], err)
        tot["max_rounds_per_forward"] = max(tot["max_rounds_per_forward"], row["rounds"])
        n = tot["n"]
        summary.clear()
        summary.update({
            "attention": args.attention, "rfa_form": args.rfa_form, "batch": args.batch, "skip": args.skip,
            "sorted": args.sort, "other": "plain-softmax" if soft is not None else "mpc",
            "engine": ("plaintext only (PlainBackend float64, both models)" if soft is not None else
                       "one session: weights shared and their Beaver masks fixed once (arith.fix_weight)"),
            "n_requested": args.n, "n_done": n, "agreement": tot["agree"] / n,
            "agree": tot["agree"],
            "acc_mpc": tot["correct_mpc"] / n, "acc_plain": tot["correct_plain"] / n,
            "max_logit_err": tot["max_logit_err"], "seconds_per_example": tot["seconds"] / n,
            "seconds_per_forward": tot["seconds"] / len(per_batch),
            "gb_sent_server0_per_forward": tot["bytes_sent_server0"] / len(per_batch) / 1e9,
            "gb_sent_server0_per_example": tot["bytes_sent_server0"] / n / 1e9,
            "max_rounds_per_forward": tot["max_rounds_per_forward"],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "loadavg": os.getloadavg(), "batches": per_batch,
        })
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(args.out)
        print(f"[{n}/{len(rows)}] agree {tot['agree']}/{n} err {err:.2e} {sec:.0f}s "
              f"rss {summary['peak_rss_gb']:.1f}GB load {os.getloadavg()[0]:.1f}", flush=True)

    if soft is not None:  # plaintext only: the chosen attention vs plaintext softmax
        for b, (_, embeds, mask, _, _) in enumerate(batches):
            t0 = time.perf_counter()
            record(b, head.forward(be0, soft.forward(be0, embeds, mask)), time.perf_counter() - t0, 0, 0)
    else:
        def prog(ctx: PartyContext) -> None:
            """One session for every batch: the weights are shared and fixed once (as a server does)."""
            be = MpcBackend(ctx)
            d = dec.map_params(be.share_plain).map_params(be.fix_matrix)
            h = head.map_params(be.share_plain)
            for b, (_, embeds, mask, _, _) in enumerate(batches):
                before = ctx.cost.total()
                t0 = time.perf_counter()
                got = be.reveal(h.forward(be, d.forward(be, be.share_plain("x", embeds), mask)))
                sec = time.perf_counter() - t0
                after = ctx.cost.total()
                if ctx.rank == SERVER0:
                    record(b, got, sec, int(after.bytes_sent - before.bytes_sent), int(after.rounds - before.rounds))

        run_in_process({SERVER0: prog, SERVER1: prog}, timeout=7200)
    print(json.dumps({k: v for k, v in summary.items() if k != "batches"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
