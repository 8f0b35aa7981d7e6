"""Side-by-side comparison of secfwt, CrypTen 0.4.1, SPU 0.9.5 and plaintext PyTorch (issue 5), in one run.

    python benchmarks/compare/run.py --out benchmarks/results/compare.json [--repeats 3]
        [--skip crypten,spu] [--workload matmul,gelu] [--md benchmarks/results/compare.md]

1. Creates the CrypTen and SPU virtual environments if they are missing (``setup_envs.py``, idempotent).
2. For each repeat, for each workload, runs every engine once, one after the other, ALTERNATING
   (secfwt, crypten, spu, plaintext; then the next workload; then the next repeat), each as a fresh process
   (each engine's parties are processes of their own), so load from other jobs on the machine hits all
   engines alike.
3. Checks every engine's outputs against the float64 plaintext reference: a row whose ``max_abs_error``
   exceeds the workload's tolerance (TOLERANCE below) or whose engine failed is NOT reported; it is listed
   under "failed checks" and the command exits with status 1 after writing the files.
4. Writes the contract rows (JSON list of ``{workload, engine, attention, time_s, bytes_per_server, rounds,
   max_abs_error, repeats}``; medians over repeats), per-repeat details next to them
   (``<out stem>.details.json``), and markdown tables (absolute values; ratios secfwt / other for time,
   bytes and rounds; the headline tuning step vs CrypTen's SFT step) to stdout and ``--md``.

Conventions: ``bytes_per_server`` = bytes SENT by one server to the other (mean of the two; each receives as
much). CrypTen's and SPU's counters report sent + received per party, so their values are halved here (exact
in 2PC: the mean sent per party is the total traffic / 2); the raw figures stay in the details. Dealer / TTP
traffic is excluded for every engine (details: ``dealer_bytes``). ``rounds``: secfwt counts waits on the peer,
CrypTen its communication calls, SPU its send actions (see benchmarks/compare/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import setup_envs  # noqa: E402
import workloads as W  # noqa: E402
from report import headline, markdown  # noqa: E402

ENGINES = ("secfwt", "crypten", "spu", "plaintext")
CONTRACT_KEYS = ("workload", "engine", "attention", "time_s", "bytes_per_server", "rounds", "max_abs_error",
                 "repeats")
# Largest accepted max_abs_error against the float64 reference, per workload, for every engine. Outputs:
# matmul ~N(0, 0.3); softmax probabilities; GELU of N(0, 1); LayerNorm rows ~N(0, 1); the BERT layer and the
# small model end in a LayerNorm (|y| up to ~10 for MiniLM's real weights); tuning_step: secfwt's label logits
# (20 x cosine), CrypTen's / SPU's loss, gradients and updated weights.
TOLERANCE = {"matmul": 1e-2, "softmax": 2e-2, "gelu": 2e-2, "layernorm": 5e-2, "encoder_layer": 5e-2,
             "small_model_forward": 0.25, "tuning_step": 0.1, "paper_iteration": 0.25}
# paper_iteration (issue 18) rows carry these keys too; engines that run it and the methods each runs
PAPER_KEYS = ("method", "seq", "layers")
PAPER_ENGINE_METHODS = {"secfwt": ("fot", "fot_rfa"), "crypten": W.PAPER_METHODS, "spu": W.PAPER_METHODS}


def _rfa_freqs_file(args: argparse.Namespace) -> Path:
    """The paper model's RFA frequencies for SPU's fot_rfa (its venv has no torch to draw them), written once."""
    import numpy as np

    d = W.TINY_PAPER if args.tiny else W.ROBERTA_LARGE
    d = W.BertDims(d.hidden, d.heads, d.ffn, args.layers)
    path = args.cache_dir.expanduser().resolve() / f"rfa-freqs-{d.head_dim}x{d.layers}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{f"l{i}": w for i, w in enumerate(W.paper_rfa_frequencies(d))})
    return path


def _paper_cmd(engine: str, seq: int, args: argparse.Namespace) -> list[str]:
    """The engine call of paper_iteration at one sequence length: every method of that engine, one process."""
    methods = [m for m in PAPER_ENGINE_METHODS[engine] if m in args.methods]
    common = ["--workload", "paper_iteration", "--repeats", "1", "--batch", str(args.batch), "--seq", str(seq),
              "--layers", str(args.layers)]
    if engine == "secfwt":
        atts = ",".join(W.METHOD_ATTENTION[m] for m in methods)
        return [sys.executable, str(HERE / "secfwt_runner.py"), *common, "--attention", atts] + (
            ["--tiny"] if args.tiny else [])
    venv = args.cache_dir.expanduser().resolve() / setup_envs.ENGINES[engine][0]
    if engine == "spu":
        freqs = ["--rfa-freqs", str(_rfa_freqs_file(args))] if "fot_rfa" in methods else []
        return [str(setup_envs.venv_python(venv)), str(HERE / "spu_worker.py"), *common, "--method", ",".join(methods),
                *freqs]
    return [str(setup_envs.venv_python(venv)), str(HERE / "crypten_worker.py"), *common, "--method", ",".join(methods)]


def _worker_cmd(engine: str, workload: str, args: argparse.Namespace, seq: int | None = None) -> list[str]:
    if workload == "paper_iteration":
        return _paper_cmd(engine, seq if seq is not None else args.seq, args)
    shape = ["--batch", str(args.batch), "--seq", str(args.seq)]
    if engine in ("secfwt", "plaintext"):
        script = HERE / ("secfwt_runner.py" if engine == "secfwt" else "plaintext_runner.py")
        att = args.forward_attention if workload == "small_model_forward" else args.attention
        cmd = [sys.executable, str(script), "--workload", workload, "--repeats", "1", "--attention", att,
               *shape, "--popsize", str(args.popsize), "--n-prompt", str(args.n_prompt), "--d", str(args.d),
               "--max-rows", str(args.max_rows)]
        if args.model:
            cmd += ["--model", args.model]
        return cmd + (["--tiny"] if args.tiny else [])
    venv = args.cache_dir.expanduser().resolve() / setup_envs.ENGINES[engine][0]
    script = HERE / ("crypten_worker.py" if engine == "crypten" else "spu_worker.py")
    return [str(setup_envs.venv_python(venv)), str(script), "--workload", workload, "--repeats", "1", *shape]


def run_engine(engine: str, workload: str, args: argparse.Namespace, log: Path,
               seq: int | None = None) -> list[dict[str, Any]]:
    """One engine, one workload, one repeat, in a fresh process; returns its JSON rows (failed rows on error)."""
    cmd = _worker_cmd(engine, workload, args, seq)
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n+ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, timeout=args.timeout)
        fh.write(proc.stdout)
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if proc.returncode != 0 and not any(r.get("status") == "failed" for r in rows):
        rows.append({"workload": workload, "engine": engine, "attention": W.ATTENTION.get(workload),
                     "status": "failed", "error": f"exit code {proc.returncode}; see {log}"}
                    | ({"seq": seq, "layers": args.layers, "method": "all"} if workload == "paper_iteration" else {}))
    for r in rows:
        r["wall_s_call"] = round(time.perf_counter() - t0, 2)
        r.setdefault("host", {"loadavg_1m": round(os.getloadavg()[0], 2)})
    return rows


def _sent_bytes(row: dict[str, Any]) -> int | None:
    """Bytes sent by one server (see the module docstring for the conversion of CrypTen's and SPU's counters)."""
    b = row.get("bytes_per_server")
    if b is None:
        return None
    return int(round(b / 2)) if row["engine"] in ("crypten", "spu") else int(b)


def aggregate(raw: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Per-repeat rows -> (contract rows that passed the check, details of every row, failure messages)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in raw:
        groups[(r["workload"], r["engine"], r.get("attention"), *(r.get(k) for k in PAPER_KEYS))].append(r)
    rows, details, failures = [], [], []
    for (wl, eng, att, *paper), rs in groups.items():
        ok = [r for r in rs if r.get("status") == "ok" and r.get("time_s") is not None]
        tol = TOLERANCE[wl]
        errs = [float(r["max_abs_error"]) for r in ok]
        detail: dict[str, Any] = {"workload": wl, "engine": eng, "attention": att, "tolerance": tol,
                                  "calls": len(rs), "ok_calls": len(ok)}
        if wl == "paper_iteration":
            detail.update(zip(PAPER_KEYS, paper, strict=True))
        problems = [f"{r.get('error', 'failed')}" for r in rs if r not in ok]
        if ok and max(errs) > tol:
            problems.append(f"max_abs_error {max(errs):.3g} > tolerance {tol:g}")
        if not ok:
            problems.append("no successful run")
        row: dict[str, Any] = {
            "workload": wl, "engine": eng, "attention": att,
            "time_s": statistics.median(float(r["time_s"]) for r in ok) if ok else None,
            "bytes_per_server": int(statistics.median(_sent_bytes(r) or 0 for r in ok)) if ok else None,
            "rounds": int(statistics.median(int(r["rounds"]) for r in ok)) if ok else None,
            "max_abs_error": max(errs) if ok else None,
            "repeats": len(ok),
        }
        if wl == "paper_iteration":
            row = {"workload": wl, "engine": eng, **dict(zip(PAPER_KEYS, paper, strict=True)),
                   **{k: v for k, v in row.items() if k not in ("workload", "engine")}}
        setups = [int(r["setup_bytes_per_server"]) for r in ok if r.get("setup_bytes_per_server") is not None]
        if setups:  # secfwt's once-per-session model setup (fixed weight masks): not part of bytes_per_server
            detail["setup_bytes_per_server"] = int(statistics.median(setups))
            detail["setup_rounds"] = int(statistics.median(int(r.get("setup_rounds") or 0) for r in ok))
        detail.update(contract=row, per_repeat=rs, check="failed" if problems else "ok", problems=problems)
        details.append(detail)
        if problems:
            where = f"{att}" if wl != "paper_iteration" else f"{paper[0]}, seq {paper[1]}"
            failures.append(f"{eng} {wl} ({where}): " + "; ".join(problems))
        else:
            rows.append(row)
    order = {w: i for i, w in enumerate(W.WORKLOADS)}

    def key(r: dict[str, Any]) -> tuple[int, int, int, str, int]:
        m = r.get("method")
        return (order[r["workload"]], int(r.get("seq") or 0),
                W.PAPER_METHODS.index(m) if m in W.PAPER_METHODS else 9, str(r["attention"]),
                ENGINES.index(r["engine"]))

    rows.sort(key=key)
    details.sort(key=key)
    return rows, details, failures


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "memory": mem, "platform": platform.platform(),
            "python": platform.python_version()}


def earlier_rows(log: Path) -> list[dict[str, Any]]:
    """The successful engine rows (JSON lines) an earlier run wrote to its log, marked with their origin."""
    rows = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("status") == "ok" and "workload" in r and "engine" in r:
                r["merged_from"] = str(log)
                rows.append(r)
    return rows


def tuning_step_settings(raw: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The secfwt tuning step's settings as its rows recorded them (rows merged from an earlier run's log
    may differ from this command's flags), else this command's flags."""
    keys = ("popsize", "n_prompt", "d", "batch", "seq", "max_rows")
    flags = {"popsize": args.popsize, "n_prompt": args.n_prompt, "d": args.d, "batch": args.batch,
             "seq": args.seq, "max_rows": args.max_rows}
    seen = [r for r in raw if r.get("workload") == "tuning_step" and r.get("engine") == "secfwt"]
    if not seen:
        return flags
    return {k: seen[0].get(k, flags[k]) for k in keys}


def write_results(raw: list[dict[str, Any]], args: argparse.Namespace, engines: list[str], started: str,
                  load_start: tuple[float, float, float], repeats_done: int, argv: list[str] | None,
                  md_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str], str]:
    rows, details, failures = aggregate(raw)
    meta = {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python benchmarks/compare/run.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            "repeats_requested": args.repeats, "repeats_done": repeats_done,
            "engines": [e for e in ENGINES if any(r["engine"] == e for r in raw)],
            "merged_from": [str(f) for f in args.rows_from],
            "machine": machine(), "loadavg_start": [round(v, 2) for v in load_start],
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "loadavg_1m_during": [r["host"]["loadavg_1m"] for r in raw if "host" in r],
            "tolerance": TOLERANCE,
            "secfwt_tuning_step": tuning_step_settings(raw, args),
            "secfwt_setup": [{k: d.get(k) for k in ("workload", "attention", *PAPER_KEYS, "setup_bytes_per_server",
                                                     "setup_rounds")}
                             for d in details if d["engine"] == "secfwt" and d.get("setup_bytes_per_server")]}
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    args.out.with_name(args.out.stem + ".details.json").write_text(
        json.dumps({"meta": meta, "rows": details}, indent=1, default=str) + "\n")
    text = markdown(rows, meta, failures)
    md_path.write_text(text)
    return rows, details, failures, text


def calls(workloads: list[str], engines: list[str],
          args: argparse.Namespace) -> list[tuple[str, int | None, str]]:
    """The engine calls of one repeat, in order: (workload, paper_iteration's seq or None, engine)."""
    out: list[tuple[str, int | None, str]] = []
    for wl in workloads:
        if wl != "paper_iteration":
            out += [(wl, None, e) for e in engines]
            continue
        for seq in args.seqs:
            out += [(wl, seq, e) for e in engines
                    if any(m in args.methods for m in PAPER_ENGINE_METHODS.get(e, ()))]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE.parent / "results" / "compare.json")
    ap.add_argument("--md", type=Path, help="markdown tables (default: the --out path with .md)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of engines to leave out (crypten, spu, ...)")
    ap.add_argument("--workload", "--workloads", dest="workload", default="all",
                    help=f"comma list of {W.WORKLOADS} or 'all' (all = every workload but paper_iteration)")
    ap.add_argument("--seqs", default="128,512", help="paper_iteration: comma list of input lengths (tokens)")
    ap.add_argument("--layers", type=int, default=1, help="paper_iteration: RoBERTa-large-sized layers")
    ap.add_argument("--methods", default=",".join(W.PAPER_METHODS), help="paper_iteration: comma list of methods")
    ap.add_argument("--attention", default="softmax,rfa", help="secfwt attention kinds (encoder_layer, tuning_step)")
    ap.add_argument("--forward-attention", default="softmax,rfa", help="secfwt attention kinds, small_model_forward")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--popsize", type=int, default=20, help="secfwt tuning step: CMA-ES population")
    ap.add_argument("--n-prompt", type=int, default=50, help="secfwt tuning step: soft-prompt tokens")
    ap.add_argument("--d", type=int, default=500, help="secfwt tuning step: CMA-ES subspace dimension")
    ap.add_argument("--max-rows", type=int, default=64, help="secfwt: sequences per private forward chunk")
    ap.add_argument("--model", default="", help="secfwt/plaintext model directory (default: bundled MiniLM)")
    ap.add_argument("--tiny", action="store_true", help="toy op shapes (tests; secfwt and plaintext only)")
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per engine call")
    ap.add_argument("--cache-dir", type=Path, default=setup_envs.default_cache_dir())
    ap.add_argument("--log", type=Path, help="engines' stderr (default: the --out path with .log)")
    ap.add_argument("--merge-all", action="store_true", help="with --rows-from: keep rows of every workload")
    ap.add_argument("--rows-from", type=Path, action="append", default=[],
                    help="merge the successful engine rows of an earlier run's .log (repeatable)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        sys.exit(f"--repeats: expected an integer >= 1, got {args.repeats}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    bad = skip - set(ENGINES)
    if bad:
        sys.exit(f"--skip: unknown engine(s) {sorted(bad)}; choose from {list(ENGINES)}")
    engines = [e for e in ENGINES if e not in skip]
    if args.tiny and {"crypten", "spu"} & set(engines):
        sys.exit("--tiny shapes exist for secfwt and plaintext only: add --skip crypten,spu")
    workloads = W.parse_workloads(args.workload)
    if args.workload == "all":
        workloads = [w for w in workloads if w != "paper_iteration"]  # its own command (issue 18), hours long
    try:
        args.seqs = [int(v) for v in args.seqs.split(",") if v.strip()]
    except ValueError:
        sys.exit(f"--seqs: expected a comma list of integers, got {args.seqs!r}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad_m = [m for m in args.methods if m not in W.PAPER_METHODS]
    if bad_m or not args.methods or not args.seqs or args.layers < 1 or min(args.seqs) < 1:
        sys.exit(f"paper_iteration: expected methods from {list(W.PAPER_METHODS)}, seqs >= 1 and layers >= 1; "
                 f"got methods {args.methods}, seqs {args.seqs}, layers {args.layers}")
    md_path = args.md or args.out.with_suffix(".md")
    log = args.log or args.out.with_suffix(".log")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    for e in ("crypten", "spu"):
        if e in engines and setup_envs.main(["--cache-dir", str(args.cache_dir), "--only", e]) != 0:
            sys.exit(f"setting up the {e} environment failed (see {args.cache_dir}/setup-{e}.log)")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = os.getloadavg()
    raw = [r for f in args.rows_from for r in earlier_rows(f) if r["workload"] in workloads or args.merge_all]
    for rep in range(args.repeats):
        for wl, seq, eng in calls(workloads, engines, args):
            label = wl if seq is None else f"{wl} {seq}"
            print(f"[repeat {rep + 1}/{args.repeats}] {label:20s} {eng:9s} ...", end=" ", flush=True)
            try:
                rows = run_engine(eng, wl, args, log, seq)
            except subprocess.TimeoutExpired:
                rows = [{"workload": wl, "engine": eng, "attention": W.ATTENTION.get(wl), "status": "failed",
                         "error": f"timed out after {args.timeout:g} s"}
                        | ({"seq": seq, "layers": args.layers, "method": "all"} if seq is not None else {})]
            for r in rows:
                r["repeat"] = rep
            raw += rows
            print(", ".join(f"{r.get('method') or r.get('attention') or '-'}: {r['time_s']:.3f} s"
                            if r.get("status") == "ok"
                            else f"FAILED ({r.get('error', '')[:80]})" for r in rows), flush=True)
        # Files are rewritten after every repeat: a run stopped early leaves the medians of the repeats it finished.
        rows, details, failures, text = write_results(raw, args, engines, started, load_start, rep + 1, argv, md_path)
    if "paper_iteration" in workloads:
        import paper_report  # the paper's table (issue 18), the plot, and the LAN/WAN projections

        text = paper_report.write(args.out, md_path)
    print("\n" + text)
    for line in headline(rows):
        print(line)
    if failures:
        print("\n" + "!" * 80 + "\nCHECK FAILED: these rows exceed their tolerance or did not run; they are not "
              "reported:\n  " + "\n  ".join(failures) + "\n" + "!" * 80, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
