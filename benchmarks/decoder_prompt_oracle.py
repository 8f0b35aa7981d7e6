"""Plaintext oracle of a (private) decoder tuning run: score the checkpointed best z on the dev and test splits.

Run:  python benchmarks/decoder_prompt_oracle.py --ckpt runs/smollm2-mpc/ckpt [--ckpt runs/other/ckpt]
      --d 50 --n-prompt 5 --tune-seed 1 [--seed 13] [--k 16] [--data ../shared/data]
      [--init none|vocab|text --init-text PHRASE] [--prompt-position start|after-text] [--max-length 64]
      (the tuning run's own values: they rebuild its projection and its inputs)

A private run's data owner sees only its own revealed logits; this benchmark (which has the plaintext weights)
rebuilds the run's projection ``p = A z + p0`` (``fot.make_projection``) from the same settings and scores the
checkpoint's ``best_z`` with ``PlainDecoderEvaluator`` (float32) on the few-shot dev split and ALL test
examples, e.g. to compare a private run's prompt with the plaintext run's on the full 872 SST-2 test sentences
(docs/DECODER.md).
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from secfwt.nn import AttentionConfig  # noqa: E402
from secfwt.tuning import TuneConfig, get_task, load_task_data  # noqa: E402
from secfwt.tuning.decoder_eval import PlainDecoderEvaluator  # noqa: E402
from secfwt.tuning.fot import make_projection  # noqa: E402
from secfwt.tuning.objective import Batch, accuracy  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, action="append", required=True, help="checkpoint directory (repeatable)")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--seed", type=int, default=13, help="data seed")
    ap.add_argument("--d", type=int, default=50)
    ap.add_argument("--n-prompt", type=int, default=5)
    ap.add_argument("--tune-seed", type=int, default=1)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--max-eval", type=int, default=None, help="seeded test subsample (default: all)")
    ap.add_argument("--init", choices=("none", "vocab", "text"), default="none")
    ap.add_argument("--init-text", default=None)
    ap.add_argument("--prompt-position", choices=("start", "after-text"), default="start")
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = get_task(args.task)
    data = load_task_data(task, args.data, k=args.k, seed=args.seed, max_eval=args.max_eval)
    ev = PlainDecoderEvaluator.from_pretrained(args.model, task, AttentionConfig("softmax"), model_name=args.model,
                                               max_length=args.max_length, max_rows=64, dtype=torch.float32,
                                               prompt_position=args.prompt_position)
    cfg = TuneConfig(d=args.d, n_prompt=args.n_prompt, seed=args.tune_seed, init=args.init, init_text=args.init_text)
    proj = make_projection(ev, cfg)
    splits = (("dev", Batch.of("dev", data.dev)), ("test", Batch.of(data.eval_split, data.eval)))
    zs = {name: float(accuracy(ev.logits(torch.zeros(1, 0, ev.hidden_size), b), b.labels)[0]) for name, b in splits}
    print(f"{'checkpoint':40s} {'split':5s} {'n':>5s} {'prompt':>7s} {'template':>8s}")
    for ckpt in args.ckpt:
        with (ckpt / "state.pkl").open("rb") as f:
            z = pickle.load(f)["best_z"]  # a checkpoint this benchmark's user wrote (pickle runs code)
        for name, b in splits:
            acc = float(accuracy(ev.logits(proj(z[None]), b), b.labels)[0])
            print(f"{str(ckpt):40s} {name:5s} {len(b):5d} {acc:7.4f} {zs[name]:8.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
