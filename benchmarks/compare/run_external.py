"""Set up (if needed) and run the CrypTen and SPU workers, collecting their JSON lines.

    python benchmarks/compare/run_external.py [--engines crypten,spu] [--workload matmul,softmax]
        [--repeats 1] [--out benchmarks/results/external.jsonl] [worker options after --]

Anything after ``--`` is passed to every worker (e.g. ``-- --seq 32``). Workers run one after the
other (never concurrently), each in its own venv from setup_envs.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import setup_envs  # noqa: E402

WORKERS = {"crypten": "crypten_worker.py", "spu": "spu_worker.py"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="crypten,spu")
    ap.add_argument("--workload", default="matmul,softmax")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cache-dir", type=Path, default=setup_envs.default_cache_dir())
    ap.add_argument("--out", type=Path, default=HERE.parent / "results" / "external.jsonl")
    args = ap.parse_args(argv)
    status = 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        if engine not in WORKERS:
            sys.exit(f"unknown engine {engine!r}; choose from {sorted(WORKERS)}")
        if setup_envs.main(["--cache-dir", str(args.cache_dir), "--only", engine]) != 0:
            status = 1
            continue
        python = setup_envs.venv_python(args.cache_dir.expanduser().resolve() / setup_envs.ENGINES[engine][0])
        cmd = [str(python), str(HERE / WORKERS[engine]), "--workload", args.workload,
               "--repeats", str(args.repeats), "--out", str(args.out), *extra]
        print("+", " ".join(cmd), flush=True)
        status |= subprocess.run(cmd).returncode != 0
    return status


if __name__ == "__main__":
    sys.exit(main())
