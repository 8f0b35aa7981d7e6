"""Create the virtual environments used by the CrypTen and SPU side of the comparison benchmark.

Usage::

    python benchmarks/compare/setup_envs.py [--cache-dir DIR] [--only crypten|spu] [--force]

Environments are created under ``--cache-dir`` (default: ``$SECFWT_BENCH_CACHE`` or
``~/.cache/secfwt-bench``) as ``crypten-venv/`` and ``spu-venv/``. Each step is idempotent: an
environment whose marker file (``.secfwt-ready.json``) exists and whose import check passes is
skipped. The marker records how long setup took and how much disk the venv uses.

Install recipes (only PyPI is reachable, no GitHub):

* CrypTen 0.4.1 declares ``sklearn`` (a deprecated dummy package that refuses to build) and
  ``torchvision`` (whose PyPI build does not load beside the local CPU torch). We install it with
  ``--no-deps`` plus its real runtime dependencies, on ``torch==2.13.0`` (the CPU wheel on local
  disk). CrypTen then fails to import on torch 2.13 because ``torch.onnx._internal.registration``
  moved to ``torch.onnx._internal.torchscript_exporter.registration``. Without touching CrypTen's
  files we add a small alias module to the venv (``secfwt_crypten_shim.py`` + a ``.pth`` file) that
  maps the old module name onto the new one on first import.
* SPU: ``pip install spu==0.9.5`` (the only release with a cp311 wheel), which brings jax[cpu]
  <=0.4.34 and numpy<2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CRYPTEN_VERSION = "0.4.1"
SPU_VERSION = "0.9.5"
CRYPTEN_TORCH = "torch==2.13.0"
# CrypTen's declared requirements minus torch/torchvision/sklearn, with sklearn's real name.
CRYPTEN_DEPS = [
    "omegaconf>=2.0.6",
    "onnx>=1.7.0",
    "pandas>=1.2.2",
    "pyyaml>=5.3.1",
    "future",
    "scipy>=1.6.0",
    "scikit-learn",
    "numpy<3",
]
MARKER = ".secfwt-ready.json"

SHIM_MODULE = '''"""Import alias installed by secfwt's benchmarks/compare/setup_envs.py (not part of CrypTen).

CrypTen 0.4.1 imports ``torch.onnx._internal.registration``; since torch 2.9 that module lives at
``torch.onnx._internal.torchscript_exporter.registration``. This finder serves the old name from
the new location, only when the old name is imported and only if torch lacks it.
"""

import importlib
import importlib.abc
import importlib.util
import sys

_ALIASES = {
    "torch.onnx._internal.registration": "torch.onnx._internal.torchscript_exporter.registration",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target):
        self._target = target

    def create_module(self, spec):
        return importlib.import_module(self._target)

    def exec_module(self, module):
        return None


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _ALIASES:
            return None
        # Prefer a real module when this torch still has one.
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return importlib.util.spec_from_loader(fullname, _AliasLoader(_ALIASES[fullname]))


def install():
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
'''

SHIM_PTH = "import secfwt_crypten_shim; secfwt_crypten_shim.install()\n"

CRYPTEN_CHECK = (
    "import torch, crypten, crypten.mpc; crypten.init(); "
    "x = crypten.cryptensor(torch.ones(3)); assert float((x + x).get_plain_text().sum()) == 6.0; "
    "print('crypten', crypten.__version__ if hasattr(crypten, '__version__') else '0.4.1', "
    "'torch', torch.__version__)"
)
SPU_CHECK = (
    "import spu, jax, numpy; import spu.utils.simulation as sim; "
    "print('spu', spu.__version__, 'jax', jax.__version__, 'numpy', numpy.__version__)"
)


def default_cache_dir() -> Path:
    env = os.environ.get("SECFWT_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "secfwt-bench"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def du_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = Path(root) / name
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def run(cmd: list[str], log) -> None:
    print("+", " ".join(cmd), file=log, flush=True)
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def pip(venv: Path, args: list[str], log) -> None:
    run([str(venv_python(venv)), "-m", "pip", "--disable-pip-version-check", *args], log)


def check(venv: Path, code: str) -> str | None:
    if not venv_python(venv).exists():
        return None
    proc = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return None
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def site_packages(venv: Path) -> Path:
    out = subprocess.run(
        [str(venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def install_crypten(venv: Path, log) -> None:
    pip(venv, ["install", CRYPTEN_TORCH], log)
    pip(venv, ["install", "--no-deps", f"crypten=={CRYPTEN_VERSION}"], log)
    pip(venv, ["install", *CRYPTEN_DEPS], log)
    sp = site_packages(venv)
    (sp / "secfwt_crypten_shim.py").write_text(SHIM_MODULE)
    (sp / "secfwt_crypten_shim.pth").write_text(SHIM_PTH)


def install_spu(venv: Path, log) -> None:
    pip(venv, ["install", f"spu=={SPU_VERSION}"], log)


ENGINES = {
    "crypten": ("crypten-venv", install_crypten, CRYPTEN_CHECK),
    "spu": ("spu-venv", install_spu, SPU_CHECK),
}


def setup_one(name: str, cache: Path, force: bool, python: str) -> dict:
    dirname, installer, code = ENGINES[name]
    venv = cache / dirname
    marker = venv / MARKER
    if force and venv.exists():
        shutil.rmtree(venv)
    if marker.exists():
        version = check(venv, code)
        if version is not None:
            info = json.loads(marker.read_text())
            info["skipped"] = True
            return info
    t0 = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)
    log_path = cache / f"setup-{name}.log"
    with log_path.open("a") as log:
        if not venv_python(venv).exists():
            run([python, "-m", "venv", str(venv)], log)
        installer(venv, log)
    version = check(venv, code)
    if version is None:
        raise SystemExit(f"{name}: import check failed after install; see {log_path}")
    info = {
        "engine": name,
        "venv": str(venv),
        "python": str(venv_python(venv)),
        "version": version,
        "setup_time_s": round(time.perf_counter() - t0, 1),
        "disk_bytes": du_bytes(venv),
        "log": str(log_path),
    }
    marker.write_text(json.dumps(info, indent=2) + "\n")
    info["skipped"] = False
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    ap.add_argument("--only", choices=sorted(ENGINES), action="append")
    ap.add_argument("--force", action="store_true", help="delete and rebuild the venvs")
    ap.add_argument("--python", default=sys.executable, help="interpreter used to create the venvs")
    args = ap.parse_args(argv)
    cache = args.cache_dir.expanduser().resolve()
    status = 0
    for name in args.only or sorted(ENGINES):
        try:
            info = setup_one(name, cache, args.force, args.python)
        except (subprocess.CalledProcessError, SystemExit) as exc:
            print(json.dumps({"engine": name, "error": str(exc)}), flush=True)
            status = 1
            continue
        print(json.dumps(info), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
