"""The paper's efficiency table (issue 18): ``paper_iteration`` rows beside SecP-Tuning's per-iteration numbers.

    python benchmarks/compare/paper_report.py benchmarks/results/paper_iteration.json [--md ...] [--png ...]

``run.py --workloads paper_iteration`` calls :func:`write` at the end of its run. Reads the contract rows (and
the run's metadata from ``<stem>.details.json`` when present), writes a markdown report (per layer as measured,
the 24-layer extrapolation, ratios to CrypTen's SFT step, LAN/WAN projections with :mod:`secfwt.cost`'s links,
the paper's numbers) and a log-scale bar plot (time and bytes per method).

Extrapolation to RoBERTa-large's 24 layers: ``per_layer = measured / layers`` and ``total = 24 x per_layer``.
The layers are identical, so this is exact for the layers; the mean pooling, the 2-class head and (for the
training steps) the loss are counted 24 times instead of once, which overstates the totals slightly (they are a
1024 x 2 product and a softmax over 2 classes; in rounds they matter more, so the 24-layer rounds are an upper
bound).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workloads as W  # noqa: E402

GB = 1e9
# SecP-Tuning (arXiv 2506.15307), per iteration, RoBERTa-large, LAN, CrypTen: (time s, communication GB)
PAPER = {"sft": (651.6, 970.7), "prompt_tuning": (882.1, 1116.2), "fot": (174.1, 205.4), "fot_rfa": (55.2, 56.5)}
METHOD_NAMES = {"sft": "full fine-tuning (SFT)", "prompt_tuning": "gradient prompt tuning",
                "fot": "forward-only tuning (FoT)", "fot_rfa": "FoT + RFA"}
# Engines without paper_iteration rows, and why
NOT_RUN = {
    "spu": "not run in this invocation (benchmarks/compare/setup_envs.py --only spu installs it; spu_worker.py runs "
           "every method)",
    "plaintext": "not run for paper_iteration (the plaintext floor of a layer is in compare.json's encoder_layer)",
}
ITERATION = (
    "**What one iteration is** (as in the paper): an SFT or gradient prompt-tuning iteration = one forward over "
    "the training batch, the cross-entropy loss, the backward pass and the SGD update (SFT: every weight; prompt "
    "tuning: only the 50 soft-prompt embeddings, prepended to the input). A FoT iteration = ONE candidate's "
    "forward over the training batch (no backward; a CMA-ES generation of population P costs P iterations). "
    "Here the batch is 1 sequence of `seq` input tokens (+ 50 prompt positions for prompt tuning and FoT).")


def _project(link_name: str, time_s: float, bytes_sent: float, rounds: float) -> float:
    from secfwt.cost import LAN, WAN

    link = {"LAN": LAN, "WAN": WAN}[link_name]
    return link.project(time_s, int(bytes_sent), int(rounds))


def full_model(row: dict[str, Any], layers: int = W.PAPER_LAYERS_FULL) -> dict[str, float]:
    """24-layer totals of one row (module docstring): time, bytes sent per server, rounds, LAN/WAN projections."""
    k = layers / int(row["layers"])
    t, b, r = row["time_s"] * k, row["bytes_per_server"] * k, row["rounds"] * k
    return {"time_s": t, "bytes": b, "rounds": r, "lan_s": _project("LAN", t, b, r), "wan_s": _project("WAN", t, b, r)}


def _find(rows: list[dict[str, Any]], engine: str, method: str, seq: int) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("workload") == "paper_iteration" and r["engine"] == engine
                 and r["method"] == method and r["seq"] == seq), None)


def _x(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else "-"


def _t(v: float) -> str:
    return f"{v:,.1f}" if v >= 10 else f"{v:.2f}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    from secfwt.cost import LAN, WAN, cpu_model

    meta = meta or {}
    prow = [r for r in rows if r.get("workload") == "paper_iteration"]
    seqs = sorted({int(r["seq"]) for r in prow})
    lines = ["# The paper's efficiency table: one iteration of SFT, prompt tuning, FoT and FoT+RFA (issue 18)", ""]
    if meta:
        lines += [f"Run: {meta.get('started')} - {meta.get('finished')}; command: `{meta.get('command')}`; "
                  f"repeats done {meta.get('repeats_done')}; load average (1 min) during the engine calls "
                  f"{min(meta.get('loadavg_1m_during') or [0]):.1f}-{max(meta.get('loadavg_1m_during') or [0]):.1f}.",
                  ""]
    lines += [f"CPU: {cpu_model()}. Links (secfwt.cost): LAN {LAN.bandwidth_bps / 1e9:g} Gbit/s, "
              f"{LAN.latency_s * 1e3:g} ms; WAN {WAN.bandwidth_bps / 1e6:g} Mbit/s, {WAN.latency_s * 1e3:g} ms "
              "(projection = measured time + rounds x latency + bytes sent x 8 / bandwidth).", "", ITERATION, "",
              "Model: RoBERTa-large sizes (hidden 1024, 16 heads, FFN 4096, post-LN, random weights) from the input "
              "embeddings, mean pooling, a 2-class head; batch 1. Engines: secfwt (2 servers + dealer, TLS "
              "processes, exact-erf GELU), CrypTen 0.4.1 (TTP, tanh GELU; its RFA uses CrypTen's own "
              "`cossin`) and SPU 0.9.5 (SEMI2K, FM64, tanh GELU; training steps by jax.value_and_grad compiled by "
              "SPU; its RFA uses SPU's cos and sin). MB/GB = 10^6/10^9 bytes SENT by one server (CrypTen's and "
              "SPU's sent + received counters halved); "
              "dealer/TTP traffic excluded. `24 layers` = 24 x the per-layer row (see paper_report.py).", ""]
    for seq in seqs:
        sft = _find(prow, "crypten", "sft", seq)
        lines += [f"## {seq} input tokens", "",
                  "| method | engine | layers run | time s / layer | MB / layer | rounds / layer | max abs err "
                  "| 24 layers: time s | GB | LAN s | WAN s | CrypTen SFT / this: time | bytes |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in W.PAPER_METHODS:
            for eng in ("crypten", "secfwt", "spu"):
                r = _find(prow, eng, m, seq)
                if r is None:
                    continue
                n = int(r["layers"])
                f = full_model(r)
                tr = _x(sft["time_s"], r["time_s"]) if sft else "-"
                br = _x(sft["bytes_per_server"], r["bytes_per_server"]) if sft else "-"
                flag = f" (check failed{r['failed_note']})" if r.get("failed_note") is not None else ""
                lines.append(
                    f"| {m} | {eng}{flag} | {n} | {_t(r['time_s'] / n)} | {r['bytes_per_server'] / n / 1e6:,.0f} | "
                    f"{r['rounds'] / n:,.0f} | {r['max_abs_error']:.1e} | {_t(f['time_s'])} | {f['bytes'] / GB:,.1f} "
                    f"| {_t(f['lan_s'])} | {_t(f['wan_s'])} | {tr} | {br} |")
        lines.append("")
    if any(r.get("failed_note") for r in prow):
        lines += ["(check failed): the engine's output was further from the float64 reference than run.py's "
                  "tolerance, so the row is not in the JSON; its time, bytes and rounds are shown because they do "
                  "not depend on that error. paper_iteration.details.json has the per-repeat errors.", ""]
    setup = [d for d in meta.get("secfwt_setup", []) if d.get("workload") == "paper_iteration"]
    if setup:
        lines += ["secfwt's once-per-session setup, not in the rows above (as the model server: q/k/v stacked and "
                  "every weight matrix's Beaver mask fixed, W - B opened once, before the timed forward; a tuning run "
                  "pays it once, not per iteration):", "",
                  "| seq | method | layers run | setup MB / layer | setup rounds |", "|---:|---|---:|---:|---:|"]
        lines += [f"| {d['seq']} | {d['method']} | {d['layers']} | "
                  f"{d['setup_bytes_per_server'] / int(d['layers']) / 1e6:,.0f} | {d['setup_rounds']} |"
                  for d in sorted(setup, key=lambda d: (int(d["seq"]), str(d["method"])))]
        lines.append("")
    lines += ["## The paper's numbers (RoBERTa-large, 24 layers, LAN, CrypTen; per iteration)", "",
              "| method | paper time s | paper GB | paper SFT / this: time | bytes |", "|---|---:|---:|---:|---:|"]
    for m in W.PAPER_METHODS:
        t, g = PAPER[m]
        lines.append(f"| {METHOD_NAMES[m]} | {t} | {g} | {_x(PAPER['sft'][0], t)} | {_x(PAPER['sft'][1], g)} |")
    lines += ["", "## Goal at the longest sequence: secfwt FoT+RFA >= 30x cheaper than CrypTen SFT", ""]
    lines += goal_lines(prow)
    skipped = {e: why for e, why in NOT_RUN.items() if not any(r["engine"] == e for r in prow)}
    if skipped:
        lines += ["", "## Not run", ""] + [f"* {e}: {why}" for e, why in skipped.items()]
    return "\n".join(lines) + "\n"


def goal_lines(prow: list[dict[str, Any]]) -> list[str]:
    if not prow:
        return ["No paper_iteration rows."]
    seq = max(int(r["seq"]) for r in prow)
    sft, ours = _find(prow, "crypten", "sft", seq), _find(prow, "secfwt", "fot_rfa", seq)
    if sft is None or ours is None:
        return [f"Not measurable at {seq} tokens: a CrypTen sft or secfwt fot_rfa row is missing."]
    tr, br = sft["time_s"] / ours["time_s"], sft["bytes_per_server"] / ours["bytes_per_server"]
    bad = [f"{r['engine']} {r['method']}" for r in (sft, ours) if r.get("failed_note")]
    out = [f"* Rows that failed the float64 check enter this comparison with their costs: {', '.join(bad)}."] if bad \
        else []
    out += [f"* At {seq} tokens: CrypTen SFT / secfwt FoT+RFA = **{tr:.1f}x time** and **{br:.1f}x bytes** "
           f"(goal 30x; the paper claims {PAPER['sft'][0] / PAPER['fot_rfa'][0]:.1f}x and "
           f"{PAPER['sft'][1] / PAPER['fot_rfa'][1]:.1f}x): time goal {'met' if tr >= 30 else 'missed'}, "
           f"bytes goal {'met' if br >= 30 else 'missed'}."]
    ct = _find(prow, "crypten", "fot_rfa", seq)
    if ct is not None:
        out.append(f"* The paper's own design on its own engine (FoT+RFA on CrypTen, measured here): "
                   f"{ct['time_s'] / ours['time_s']:.1f}x secfwt's time and "
                   f"{ct['bytes_per_server'] / ours['bytes_per_server']:.1f}x its bytes.")
    f = full_model(ours)
    out.append(f"* secfwt FoT+RFA, 24 layers (extrapolated): {f['time_s']:,.1f} s, {f['bytes'] / GB:,.1f} GB sent "
               f"per server, LAN {f['lan_s']:,.1f} s, WAN {f['wan_s']:,.1f} s; the paper's FoT+RFA: "
               f"{PAPER['fot_rfa'][0]} s, {PAPER['fot_rfa'][1]} GB (its hardware, batch and length).")
    return out


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    """Bars per method (24-layer totals) for each engine and sequence length, with the paper's bars; log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prow = [r for r in rows if r.get("workload") == "paper_iteration"]
    seqs = sorted({int(r["seq"]) for r in prow})
    series: list[tuple[str, list[float | None], list[float | None]]] = [
        ("paper (CrypTen, its setup)", [PAPER[m][0] for m in W.PAPER_METHODS],
         [PAPER[m][1] for m in W.PAPER_METHODS])]
    for eng in ("crypten", "spu", "secfwt"):
        for seq in seqs:
            found = [_find(prow, eng, m, seq) for m in W.PAPER_METHODS]
            if not any(found):
                continue
            fm = [full_model(r) if r else None for r in found]
            series.append((f"{eng}, {seq} tokens (x24 layers)", [f["time_s"] if f else None for f in fm],
                           [f["bytes"] / GB if f else None for f in fm]))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(series)
    for ax, idx, label in ((axes[0], 1, "time per iteration, s (log)"), (axes[1], 2, "GB sent per server (log)")):
        for i, s in enumerate(series):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(W.PAPER_METHODS))]
            vals = s[idx]
            ax.bar([x for x, v in zip(xs, vals, strict=True) if v], [v for v in vals if v], width, label=s[0])
        ax.set_yscale("log")
        ax.set_xticks(range(len(W.PAPER_METHODS)), ["SFT", "prompt tuning", "FoT", "FoT + RFA"], fontsize=9)
        ax.set_ylabel(label)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("One tuning iteration, RoBERTa-large (24 layers; ours extrapolated from 1 layer), batch 1")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def failed_rows(details: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that ran but failed run.py's float64 check: their medians, marked (``failed_note``), for the table only
    (they stay out of the contract JSON). Their costs are real; their outputs were off by more than the
    tolerance."""
    out = []
    for d in details:
        c = d.get("contract") or {}
        if d.get("workload") == "paper_iteration" and d.get("check") == "failed" and c.get("time_s") is not None:
            out.append(dict(c, failed_note=f": max abs err {c['max_abs_error']:.2g} > {d['tolerance']:g}"))
    return out


def write(out: Path, md: Path | None = None, png: Path | None = None) -> str:
    rows = json.loads(Path(out).read_text())
    details = Path(out).with_name(Path(out).stem + ".details.json")
    det = json.loads(details.read_text()) if details.exists() else {}
    meta = det.get("meta", {})
    rows = rows + failed_rows(det.get("rows", []))
    text = markdown(rows, meta)
    (md or Path(out).with_suffix(".md")).write_text(text)
    plot(rows, png or Path(out).with_suffix(".png"))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rows", type=Path, help="paper_iteration.json (run.py --workloads paper_iteration)")
    ap.add_argument("--md", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args(argv)
    if not args.rows.exists():
        sys.exit(f"{args.rows}: no such file (run benchmarks/compare/run.py --workloads paper_iteration first)")
    print(write(args.rows, args.md, args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
