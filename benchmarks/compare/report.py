"""Markdown tables of the comparison rows (``run.py`` writes them to stdout and ``compare.md``)."""

from __future__ import annotations

from typing import Any

import workloads as W

MB = 1e6
# tuning_step is NOT the paper's per-iteration measure (issue 18): see paper_iteration / paper_report.py
TUNING_STEP_LABEL = "tuning_step (1 CMA-ES generation; not the paper's iteration)"
TUNING_STEP_NOTE = (
    "**tuning_step is not the paper's per-iteration measure.** secfwt's tuning_step is a whole CMA-ES "
    "generation (population x one forward each) of a MiniLM-sized model at 128 tokens, set against ONE CrypTen / "
    "SPU SFT step. The paper's table counts one FoT iteration as ONE candidate's forward over the training batch "
    "and one SFT iteration as forward + loss + backward + update; that measure is the `paper_iteration` workload "
    "(`run.py --workloads paper_iteration`, results in paper_iteration.json / .md).")


def _wl(workload: str) -> str:
    return TUNING_STEP_LABEL if workload == "tuning_step" else workload


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t:.4f}" if t < 0.1 else f"{t:.3f}" if t < 10 else f"{t:.1f}"


def _fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    r = a / b
    return f"{r:.2f}" if r < 10 else f"{r:.1f}" if r < 1000 else f"{r:.0f}"


def _att(r: dict[str, Any]) -> str:
    return r["attention"] or "-"


def _partner(rows: list[dict[str, Any]], workload: str, engine: str, attention: str | None) -> dict[str, Any] | None:
    """The other engine's row to compare with: same attention if it has one, else its softmax (only) row."""
    cands = [r for r in rows if r["workload"] == workload and r["engine"] == engine]
    same = [r for r in cands if r["attention"] == attention]
    if same:
        return same[0]
    return cands[0] if len(cands) == 1 else next((r for r in cands if r["attention"] == "softmax"), None)


def headline(rows: list[dict[str, Any]]) -> list[str]:
    """secfwt's forward-only tuning step vs CrypTen's SFT step (the paper: ~12x time, ~17x communication)."""
    out = []
    ct = _partner(rows, "tuning_step", "crypten", "softmax")
    for s in (r for r in rows if r["workload"] == "tuning_step" and r["engine"] == "secfwt"):
        if ct is None:
            continue
        out.append(
            f"One CMA-ES generation vs one SFT step, NOT the paper's per-iteration measure ({_att(s)} attention): "
            "CrypTen SFT step / secfwt generation = "
            f"{_fmt_ratio(ct['time_s'], s['time_s'])}x time, "
            f"{_fmt_ratio(ct['bytes_per_server'], s['bytes_per_server'])}x bytes sent per server, "
            f"{_fmt_ratio(ct['rounds'], s['rounds'])}x rounds "
            f"(secfwt {_fmt_time(s['time_s'])} s, {s['bytes_per_server'] / MB:,.0f} MB; CrypTen "
            f"{_fmt_time(ct['time_s'])} s, {ct['bytes_per_server'] / MB:,.0f} MB). "
            "The paper's ~12x / ~17x compare one FoT candidate's forward with one SFT step: see paper_iteration."
        )
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], failures: list[str]) -> str:
    m = meta["machine"]
    load = meta["loadavg_1m_during"]
    ts = meta.get("secfwt_tuning_step", {})
    if any(r["workload"] == "paper_iteration" for r in rows):
        lines0 = ["paper_iteration rows: see the paper's table below / paper_report.py.", ""]
    else:
        lines0 = []
    lines = [
        f"# secfwt vs CrypTen 0.4.1 vs SPU 0.9.5 vs plaintext ({meta['started']} - {meta['finished']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {m['cpus']} cores ({m['cpu']}), {m['memory']}, shared with other jobs; load average (1 min) "
        f"at start {meta['loadavg_start'][0]}, during the engine calls min {min(load, default=0):.1f} / "
        f"median {sorted(load)[len(load) // 2] if load else 0:.1f} / max {max(load, default=0):.1f}, "
        f"at end {meta['loadavg_end'][0]}. Engines ran alternating (per repeat and workload: "
        f"{', '.join(meta['engines'])}); medians over {meta['repeats_done']} repeat(s) "
        f"(of {meta['repeats_requested']} requested)."
        + (f" Rows merged from earlier runs' logs: {', '.join(meta['merged_from'])} (each row's repeats count "
           "gives its number of runs)." if meta.get("merged_from") else ""),
        "",
        "MB = 10^6 bytes SENT by one server to the other (each receives as much; CrypTen's and SPU's sent + "
        "received counters halved); dealer / TTP traffic excluded. Rounds: secfwt = waits on the peer, "
        "CrypTen = communication calls, SPU = send actions. Errors: max abs vs the float64 reference. "
        "secfwt: one torch thread per party, exact-erf GELU; CrypTen: TTP, 1 thread per party, tanh GELU; "
        "SPU: SEMI2K FM64 over brpc, tanh GELU. small_model_forward / tuning_step: secfwt runs the real "
        "all-MiniLM-L6-v2, CrypTen and SPU a random-init model of the same sizes (they cannot load it). "
        f"tuning_step: secfwt = one CMA-ES generation (population {ts.get('popsize')}, {ts.get('n_prompt')} "
        f"prompt tokens, d={ts.get('d')}) on batch {ts.get('batch')}, seq {ts.get('seq')} (prompt included), "
        "forward only; CrypTen / SPU = one SFT step (forward + backward + SGD) on the same batch and sequence "
        "length.",
        "",
        *lines0,
        "## Absolute",
        "",
        "| workload | attention | engine | time s | MB sent/server | rounds | max abs err |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["workload"] == "paper_iteration":
            continue  # its own table (paper_report.py)
        lines.append(f"| {_wl(r['workload'])} | {_att(r)} | {r['engine']} | {_fmt_time(r['time_s'])} | "
                     f"{r['bytes_per_server'] / MB:,.2f} | {r['rounds']} | {r['max_abs_error']:.2e} |")
    lines += ["", "## Ratios secfwt / other (below 1: secfwt is cheaper)", "",
              "| workload | secfwt attention | vs | time | bytes | rounds |", "|---|---|---|---:|---:|---:|"]
    for wl in (w for w in W.WORKLOADS if w != "paper_iteration"):
        for s in (r for r in rows if r["workload"] == wl and r["engine"] == "secfwt"):
            for eng in ("crypten", "spu", "plaintext"):
                o = _partner(rows, wl, eng, s["attention"])
                if o is None:
                    continue
                b = _fmt_ratio(s["bytes_per_server"], o["bytes_per_server"]) if eng != "plaintext" else "-"
                rd = _fmt_ratio(s["rounds"], o["rounds"]) if eng != "plaintext" else "-"
                lines.append(f"| {_wl(wl)} | {_att(s)} | {eng} ({_att(o)}) | {_fmt_ratio(s['time_s'], o['time_s'])} | "
                             f"{b} | {rd} |")
    setup = [d for d in meta.get("secfwt_setup", []) if d["workload"] != "paper_iteration"]
    if setup:
        lines += ["", "## secfwt's once-per-session setup (not in the rows above)", "",
                  "As the model server does once per session, the encoder workloads stack q/k/v and fix every weight "
                  "matrix's Beaver mask (W - B opened once) before the timed region; a forward then opens only its "
                  "activations. MB = 10^6 bytes sent by one server.", "",
                  "| workload | attention | setup MB sent/server | setup rounds |", "|---|---|---:|---:|"]
        lines += [f"| {_wl(d['workload'])} | {d['attention'] or '-'} | {d['setup_bytes_per_server'] / MB:,.2f} | "
                  f"{d['setup_rounds']} |" for d in setup]
    head = headline(rows)
    if head:
        lines += ["", "## tuning_step: one CMA-ES generation vs one SFT step", "", TUNING_STEP_NOTE, ""]
        lines += [f"* {h}" for h in head]
    if failures:
        lines += ["", "## Failed checks (not reported above)", ""] + [f"* {f}" for f in failures]
    return "\n".join(lines) + "\n"
