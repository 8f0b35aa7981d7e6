"""Before and after in one run: the same benchmark on a base commit's engine and on the current tree, alternating.

Run:  python benchmarks/before_after.py [--base REV] [--new REV] [--repeats 2] [--ops ltz,mul]
      python benchmarks/before_after.py --bench forward [--base REV]   # minilm, softmax, 128 tokens
      python benchmarks/before_after.py --bench demo [--base REV]      # `secfwt demo`, a whole private tuning run

A temporary ``git worktree`` of ``REV`` (default ``HEAD~1``; with ``--new``, one of that commit too, else the
work tree as it is, uncommitted changes included) is made; the benchmark script of the *current* tree
(``benchmarks/engine_ops.py`` on ``--ops``, or ``benchmarks/forward.py --models minilm --attention softmax
--seq 128``) runs once with ``PYTHONPATH`` at the worktree's ``src`` (base) and once at this tree's ``src``
(new), alternating base, new, base, new ... for ``--repeats`` so that drift of the machine's load hits both
sides alike. One table: per row, the bytes and rounds of each side (exact counts: they must agree across
repeats, else the row says so) with their ratio, and the median time of each side with the ratio new / base;
the CPU model and both commits in the header. Fields a base engine does not measure (online/offline split) are
printed as "-". The table and every run's rows go to ``benchmarks/results/before_after-<base>-<new>.json``.
``--bench demo`` runs each side's own ``secfwt demo`` (the CLI lives in ``src``: compare commits whose demo
defaults agree) and takes one row from its report (the whole run's time, bytes, rounds, offline/online split)
plus the process's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEYS_EXACT = ("bytes_per_server", "rounds", "offline_bytes")  # exact counts
KEYS_TIME = ("time_s", "online_time_s", "offline_time_s", "wall_s")  # medians, compared as ratios


def _git(*args: str, cwd: Path = ROOT) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"before_after: git {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def cpu_model() -> str:
    try:
        sys.path.insert(0, str(ROOT / "src"))
        from secfwt.cost import cpu_model as cm

        return cm()
    except ImportError:
        import platform

        return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def row_key(row: dict[str, Any]) -> str:
    """A row's name: the op (engine_ops) or model/attention/BxT (forward)."""
    if "op" in row:
        return str(row["op"])
    if "task" in row:
        return f"demo/{row['task']}/{row.get('attention')}"
    return f"{row.get('model')}/{row.get('attention')}/{row.get('batch')}x{row.get('seq')}"


def merge_runs(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows of several runs of one side, by row name: exact fields (None if any run lacks them; the string
    "varies" if runs disagree) and the median of each time field (None if any run lacks it)."""
    out: dict[str, dict[str, Any]] = {}
    names: list[str] = []
    for run in runs:
        for row in run["rows"]:
            if row_key(row) not in names:
                names.append(row_key(row))
    for name in names:
        rows = [r for run in runs for r in run["rows"] if row_key(r) == name]
        merged: dict[str, Any] = {}
        for k in KEYS_EXACT:
            vals = [r.get(k) for r in rows]
            merged[k] = None if any(v is None for v in vals) else (vals[0] if len(set(vals)) == 1 else "varies")
        for k in KEYS_TIME:
            vals = [r.get(k) for r in rows]
            merged[k] = None if any(v is None for v in vals) or not vals else statistics.median(vals)
        out[name] = merged
    return out


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if kind == "bytes":
        return f"{v / 1e6:.2f}"
    if kind == "time":
        return f"{v:.3f}"
    return str(v)


def _ratio(new: Any, base: Any) -> str:
    if not isinstance(new, int | float) or not isinstance(base, int | float) or base == 0:
        return "-"
    return f"{new / base:.3f}"


COLUMNS = (("bytes_per_server", "MB sent/server", "bytes"), ("rounds", "rounds", "int"),
           ("offline_bytes", "offline MB", "bytes"), ("time_s", "time s", "time"),
           ("online_time_s", "online s", "time"), ("offline_time_s", "offline s", "time"),
           ("wall_s", "process wall s", "time"))


def table(base: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> str:
    """The markdown table: per row and field, base | new | new/base."""
    hdr = ["row"]
    for _, label, _ in COLUMNS:
        hdr += [f"{label} base", f"{label} new", "new/base"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for name in list(base) + [n for n in new if n not in base]:
        b, n = base.get(name, {}), new.get(name, {})
        cells = [name]
        for key, _, kind in COLUMNS:
            cells += [_fmt(b.get(key), kind), _fmt(n.get(key), kind), _ratio(n.get(key), b.get(key))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _command(bench: str, ops: str, out: Path, preload: bool = False, prefetch: bool = False) -> list[str]:
    if bench == "demo":
        return [sys.executable, "-m", "secfwt", "demo", "--quiet", "--out", str(out.parent / out.stem),
                "--report", str(out), "--save-prompt", str(out.with_suffix(".prompt.safetensors")),
                "--plot", str(out.with_suffix(".png"))]
    if bench == "engine_ops":
        return [sys.executable, str(HERE / "engine_ops.py"), "--mode", "process", "--ops", ops, "--repeats", "1",
                "--out", str(out)]
    return [sys.executable, str(HERE / "forward.py"), "--models", "minilm", "--attention", "softmax", "--seq", "128",
            "--repeats", "1", "--out", str(out)] + (["--preload"] if preload else []) \
        + (["--prefetch"] if prefetch else [])


def run_side(src: Path, bench: str, ops: str, out: Path, preload: bool = False,
             prefetch: bool = False) -> dict[str, Any]:
    """One run of the benchmark with the engine at ``src``; its JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = _command(bench, ops, out, preload, prefetch)
    print(f"before_after: {src}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"before_after: the benchmark failed with the engine at {src} (exit {proc.returncode})")
    data: dict[str, Any] = json.loads(out.read_text())
    if bench == "demo":  # the demo's report is one row (its whole run); "wall" is what a user waits
        data = {"rows": [{**data, "wall_s": wall}], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    return data


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD~1", help="the commit to compare against (default HEAD~1)")
    ap.add_argument("--new", default=None, help="a commit to run as 'new' (default: this work tree, as it is)")
    ap.add_argument("--bench", choices=["engine_ops", "forward", "demo"], default="engine_ops")
    ap.add_argument("--ops", default="ltz,mul", help="engine_ops: comma list of ops")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side (alternating)")
    ap.add_argument("--preload", action="store_true",
                    help="forward: time a second forward of the session, its dealer material preloaded where the "
                         "engine can (an engine that cannot runs an untimed first forward instead)")
    ap.add_argument("--prefetch", action="store_true",
                    help="forward: time a second forward of the session with the dealer running ahead where the "
                         "engine can (else a plain second forward): the whole cost, dealer included")
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/results/before_after-<base>-<new>.json)")
    a = ap.parse_args(argv)
    base_rev = _git("rev-parse", "--short", a.base)
    if a.new:
        new_name = _git("rev-parse", "--short", a.new)
    else:
        new_rev = _git("rev-parse", "--short", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "src"))
        new_name = f"{new_rev}+changes" if dirty else new_rev
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="secfwt-before-after-") as tmp:
        trees = {"base": Path(tmp) / "base", "new": Path(tmp) / "new" if a.new else ROOT}
        made = []
        try:
            for side, rev in (("base", base_rev), ("new", a.new)):
                if rev:
                    _git("worktree", "add", "--detach", str(trees[side]), rev)
                    made.append(trees[side])
            for i in range(a.repeats):
                for side in ("base", "new"):
                    runs[side].append(run_side(trees[side] / "src", a.bench, a.ops, Path(tmp) / f"{side}-{i}.json",
                                                   a.preload, a.prefetch))
        finally:
            for wt in made:
                _git("worktree", "remove", "--force", str(wt))
    base, new = merge_runs(runs["base"]), merge_runs(runs["new"])
    header = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; base {base_rev}, new {new_name}; "
              f"{cpu_model()}; {a.repeats} alternating runs per side (times: medians; ratio = new / base)")
    text = header + "\n\n" + table(base, new)
    print(text)
    out = Path(a.out) if a.out else HERE / "results" / f"before_after-{base_rev}-{new_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": header, "base": base_rev, "new": new_name, "bench": a.bench,
                               "ops": a.ops, "table": text, "merged": {"base": base, "new": new}, "runs": runs},
                              indent=1) + "\n")
    print(f"results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
