"""The data owner's files: checkpoints without pickle, private file modes, no shares with a parties file, and
one-line errors for bad command-line values."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cmaes import CMA
from safetensors import safe_open
from safetensors.numpy import save_file

from secfwt.cli import main
from secfwt.errors import ConfigError
from secfwt.serve.shares import share_model, write_owner_word_table, write_public_files
from secfwt.tuning import TuneConfig, tune
from secfwt.tuning import checkpoint as ckpt
from secfwt.tuning.decoder_eval import ensure_decoder_shares
from secfwt.tuning.runner import RunSpec, ensure_shares

CFG = TuneConfig(d=8, n_prompt=2, popsize=4, iterations=4, checkpoint_every=2, patience=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """torch on one thread (conftest.one_thread)."""


@pytest.fixture
def umask0() -> Iterator[None]:
    """A permissive umask: the modes checked below must come from secfwt, not from the environment."""
    old = os.umask(0)
    yield
    os.umask(old)




def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# -------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_is_safetensors_and_json_not_pickle(demo_ev, demo_data, tmp_path: Path, umask0: None) -> None:  # type: ignore[no-untyped-def]
    os.chmod(tmp_path, 0o755)  # a user's directory: left as it is
    d = tmp_path / "a" / "ckpt"
    tune(demo_ev, demo_data, CFG, checkpoint_dir=d, progress=False)
    assert sorted(p.name for p in d.iterdir()) == [ckpt.STATE_FILE]
    raw = (d / ckpt.STATE_FILE).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + header_len])  # a safetensors file: 8-byte length + JSON header + raw tensors
    state = json.loads(header["__metadata__"]["state"])
    assert state["version"] == ckpt.FORMAT_VERSION and state["iteration"] == 4
    assert b"\x80\x04\x95" not in raw and b"cnumpy" not in raw  # no pickle protocol-4 frame, no pickled globals
    assert (mode(d), mode(d.parent), mode(d / ckpt.STATE_FILE), mode(tmp_path)) == (0o700, 0o700, 0o600, 0o755)


def test_cma_state_round_trip_continues_identically() -> None:
    a = CMA(mean=np.zeros(5), sigma=0.7, population_size=6, seed=3,
            bounds=np.array([[-4.0, 4.0]] * 5))
    rng = np.random.default_rng(0)
    for _ in range(3):
        xs = [a.ask() for _ in range(6)]
        a.tell([(x, float(rng.standard_normal())) for x in xs])
    a.ask()  # leaves the eigendecomposition (_B, _D) cached
    state = ckpt.cma_state(a)
    b = ckpt.restore_cma(CMA(mean=np.zeros(5), sigma=0.7, population_size=6, seed=99), state)
    for _ in range(3):
        xa, xb = [a.ask() for _ in range(6)], [b.ask() for _ in range(6)]
        assert all(np.array_equal(u, v) for u, v in zip(xa, xb, strict=True))
        f = [float(np.sum(x ** 2)) for x in xa]
        a.tell(list(zip(xa, f, strict=True)))
        b.tell(list(zip(xb, f, strict=True)))
    assert np.array_equal(a.mean, b.mean) and a._sigma == b._sigma and np.array_equal(a._C, b._C)


def _rewrite(path: Path, edit: Callable[[dict[str, Any], dict[str, np.ndarray]], None]) -> None:
    """Change a checkpoint's JSON and tensors by hand (what an attacker with write access could do)."""
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    doc = json.loads(meta["state"])
    edit(doc, tensors)
    save_file(tensors, str(path), metadata={**meta, "state": json.dumps(doc)})


def _tensor_of(doc: dict[str, Any], *path: str) -> str:
    v: Any = doc
    for k in path:
        v = v[k]
    return str(v["__tensor__"])


TAMPERINGS: dict[str, Callable[[Path], object]] = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:100]),
    "garbage": lambda p: p.write_bytes(b"\x00" * 64),
    "not json": lambda p: _rewrite_meta(p, "{not json"),
    "iteration is a string": lambda p: _rewrite(p, lambda d, t: d.__setitem__("iteration", "7")),
    "missing field": lambda p: _rewrite(p, lambda d, t: d.pop("calls")),
    "history record": lambda p: _rewrite(p, lambda d, t: d["history"].append({"iteration": 1, "evil": 2})),
    "cma attribute gone": lambda p: _rewrite(p, lambda d, t: d["cma"]["attrs"].pop("_g")),
    "cma constant": lambda p: _rewrite(p, lambda d, t: d["cma"]["attrs"].__setitem__("_popsize", 99)),
    "cma array shape": lambda p: _rewrite(
        p, lambda d, t: t.__setitem__(_tensor_of(d, "cma", "attrs", "_mean"), np.zeros(3))),
    "rng state": lambda p: _rewrite(p, lambda d, t: d["rng"].__setitem__("bit_generator", "os.system")),
    "dangling tensor ref": lambda p: _rewrite(p, lambda d, t: d.__setitem__("best_z", {"__tensor__": "nope"})),
    "extra tensor": lambda p: _rewrite(p, lambda d, t: t.__setitem__("x", np.zeros(2))),
    "wrong version": lambda p: _rewrite(p, lambda d, t: d.__setitem__("version", 1)),
}


def _rewrite_meta(path: Path, state: str) -> None:
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata={**meta, "state": state})


@pytest.mark.parametrize("how", sorted(TAMPERINGS))
def test_tampered_checkpoint_is_one_config_error(demo_ev, demo_data, tmp_path: Path, how: str) -> None:  # type: ignore[no-untyped-def]
    tune(demo_ev, demo_data, CFG, checkpoint_dir=tmp_path, progress=False)
    TAMPERINGS[how](tmp_path / ckpt.STATE_FILE)
    before = (tmp_path / ckpt.STATE_FILE).read_bytes()
    with pytest.raises(ConfigError) as err:
        tune(demo_ev, demo_data, CFG, checkpoint_dir=tmp_path, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and ckpt.STATE_FILE in msg, msg
    assert (tmp_path / ckpt.STATE_FILE).read_bytes() == before  # the refused checkpoint is left untouched


def test_old_pickle_checkpoint_is_refused_never_loaded(demo_ev, demo_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (open, (str(marker), "w"))

    (tmp_path / "state.pkl").write_bytes(pickle.dumps({"version": 1, "x": Evil()}))
    with pytest.raises(ConfigError, match=r"state\.pkl: a pickle checkpoint .*never loaded.*delete it"):
        tune(demo_ev, demo_data, CFG, checkpoint_dir=tmp_path, progress=False)
    assert not marker.exists()


# ------------------------------------------------------------------------------------ private file modes


def test_tune_and_predict_write_private_files(tiny_dir: Path, tmp_path: Path, umask0: None,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    os.chmod(tmp_path, 0o755)  # a user's directory: secfwt must not change it
    out, ck, pr, rep = tmp_path / "out", tmp_path / "ck", tmp_path / "p" / "q" / "prompt.safetensors", tmp_path / "r"
    rc = main(["tune", "--task", "demo", "--mode", "plaintext", "--model", str(tiny_dir), "--k", "2", "--d", "4",
               "--n-prompt", "2", "--popsize", "4", "--iterations", "2", "--quiet", "--out", str(out),
               "--checkpoint-dir", str(ck), "--checkpoint-every", "1", "--save-prompt", str(pr),
               "--report", str(rep / "report.json")])
    assert rc == 0
    files = [out / "history.png", rep / "report.json", pr, ck / ckpt.STATE_FILE]
    assert [mode(f) for f in files] == [0o600] * len(files)
    dirs = [out, rep, pr.parent, pr.parent.parent, ck]
    assert [mode(d) for d in dirs] == [0o700] * len(dirs)
    assert mode(tmp_path) == 0o755
    assert sorted(p.name for p in out.iterdir()) == ["history.png"]  # no temporary file left behind
    preds = tmp_path / "preds" / "p.json"
    rc = main(["predict", "--prompt", str(pr), "--mode", "plaintext", "--text", "a great film", "--out", str(preds)])
    assert rc == 0 and (mode(preds), mode(preds.parent)) == (0o600, 0o700)
    assert json.loads(preds.read_text())["n"] == 1
    capsys.readouterr()


def test_share_files_are_private(tiny_dir: Path, tmp_path: Path, umask0: None) -> None:
    out = share_model(tiny_dir, tmp_path / "shares" / "m")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"server0.safetensors", "server1.safetensors", "word_embeddings.safetensors",
                                       "config.json", "secfwt.json"}
    assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
    dirs = [out, out / "public", out / "owner", out.parent]
    assert [mode(d) for d in dirs] == [0o700] * len(dirs)
    assert not [p for p in out.rglob("*.tmp")]


# ---------------------------------------------------------------- a parties file: the owner holds no shares


def _public_only(tiny_dir: Path, d: Path, word_table: bool = True, decoder: bool = False) -> Path:
    """What a model owner gives the data owner: public/ and (if disclosed) owner/ — no server share file."""
    import torch

    info: dict[str, Any] = {"embedding_std": 0.02, **({"tied": True, "decoder": True} if decoder else {})}
    write_public_files(d, tiny_dir, info)
    if word_table:
        write_owner_word_table(d, torch.zeros(4, 3))
    return d


def _listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_owner_with_parties_file_uses_only_public_files(tiny_dir: Path, tmp_path: Path) -> None:
    parties = str(tmp_path / "parties.toml")  # the owner never reads server shares, whatever the file says
    d = _public_only(tiny_dir, tmp_path / "shares")
    before = _listing(d)
    spec = RunSpec(model=str(tiny_dir), shares_dir=str(d))
    assert ensure_shares(spec, parties) == d
    assert _listing(d) == before and not list(d.glob("server*"))
    # the same spec without a parties file is the model owner's step on this machine: shares are made
    ensure_shares(spec, "inprocess")
    assert (d / "server1.safetensors").is_file()


@pytest.mark.parametrize("missing", ["all", "tokenizer", "word table"])
def test_owner_with_parties_file_names_the_missing_public_file(tiny_dir: Path, tmp_path: Path, missing: str) -> None:
    d = tmp_path / "shares"
    d.mkdir()
    if missing != "all":
        _public_only(tiny_dir, d, word_table=missing != "word table")
    if missing == "tokenizer":
        for p in (d / "public").iterdir():
            if p.name not in ("config.json", "secfwt.json"):
                p.unlink()
    expect = {"all": r"public/config\.json: missing", "tokenizer": "no tokenizer file",
              "word table": r"word_embeddings\.safetensors: missing"}[missing]
    with pytest.raises(ConfigError, match=expect) as err:
        ensure_shares(RunSpec(model=str(tiny_dir), shares_dir=str(d)), str(tmp_path / "parties.toml"))
    assert "secfwt share-model" in str(err.value)
    assert not list(d.rglob("server*"))
    if missing == "word table":  # the private embedding mode needs no word table
        ensure_shares(RunSpec(model=str(tiny_dir), shares_dir=str(d), embedding="private"), "parties.toml")


def test_decoder_owner_with_parties_file_uses_only_public_files(tiny_dir: Path, tmp_path: Path) -> None:
    parties = str(tmp_path / "parties.toml")
    with pytest.raises(ConfigError, match="--shares-dir: with a parties file"):
        ensure_decoder_shares(RunSpec(model="smollm2"), parties)
    d = _public_only(tiny_dir, tmp_path / "dec")
    (d / "public" / "secfwt.json").unlink()
    with pytest.raises(ConfigError, match=r"public/secfwt\.json: missing.*secfwt share-model"):
        ensure_decoder_shares(RunSpec(model="smollm2", shares_dir=str(d)), parties)
    d = _public_only(tiny_dir, tmp_path / "dec2", decoder=True)
    before = _listing(d)
    assert ensure_decoder_shares(RunSpec(model="smollm2", shares_dir=str(d)), parties) == d
    assert _listing(d) == before


# --------------------------------------------------------------------------- bad command-line values


BAD_TUNE = [
    ("--k", "0"), ("--k", "-3"), ("--seed", "-1"), ("--max-eval", "0"), ("--d", "0"), ("--n-prompt", "0"),
    ("--popsize", "1"), ("--budget", "0"), ("--iterations", "0"), ("--sigma", "0"), ("--sigma", "-1"),
    ("--sigma", "nan"), ("--sigma", "inf"), ("--alpha", "0"), ("--tune-seed", str(2**32)), ("--proj-seed", "-5"),
    ("--train-batch", "0"), ("--eval-every", "0"), ("--patience", "-1"), ("--checkpoint-every", "0"),
    ("--rfa-features", "0"), ("--max-length", "1"), ("--max-rows", "0"), ("--frac-bits", "0"),
    ("--frac-bits", "40"), ("--timeout", "0"),
]


@pytest.mark.parametrize(("flag", "value"), BAD_TUNE)
def test_bad_tune_argument_is_one_error_line(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["tune", "--task", "demo", "--mode", "plaintext", "--quiet", flag, value])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(f"secfwt tune: error: {flag}: expected "), err
    assert "Traceback" not in err


def test_budget_below_one_iteration_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--task", "demo", "--mode", "plaintext", "--budget", "5", "--popsize", "6"]) == 2
    assert capsys.readouterr().err == ("secfwt tune: error: --budget: expected at least --popsize (6) API calls "
                                       "(one iteration), got 5\n")


@pytest.mark.parametrize(("cmd", "flag", "value"), [
    ("predict", "--max-rows", "0"), ("predict", "--max-eval", "-1"), ("predict", "--timeout", "-2"),
    ("share-model", "--frac-bits", "2"),
])
def test_bad_predict_and_share_arguments(cmd: str, flag: str, value: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    base = {"predict": ["--prompt", str(tmp_path / "p.safetensors"), "--text", "x"],
            "share-model": ["--model", str(tmp_path), "--out", str(tmp_path / "o")]}[cmd]
    assert main([cmd, *base, flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"secfwt {cmd}: error: {flag}: expected "), err
    assert not (tmp_path / "o").exists()
