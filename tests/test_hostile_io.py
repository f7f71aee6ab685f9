"""Hostile input, continued: batch TOML files, output paths that cannot be written, and a full disk (simulated).

Same contract as tests/test_hostile.py: a one-line error, exit 1, no traceback, no partial output.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import tiny_cnn, tiny_data
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hostile import FAST, SETTINGS, compress_args, outcome

from axcnn.batch import MODEL_KEYS, load_plan
from axcnn.cli import main
from axcnn.config import CompressConfig
from axcnn.data import Preprocess
from axcnn.errors import AxcnnError
from axcnn.options import option_fields

KNOWN = set(MODEL_KEYS) | {f.name for cls in (CompressConfig, Preprocess) for f, _ in option_fields(cls)}


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    root = tmp_path_factory.mktemp("proj")
    model = tiny_cnn(seed=11)
    x, y = tiny_data(model, n=48)
    onnx.save(model, root / "m.onnx")
    np.savez(root / "d.npz", x=x, y=y)
    return root


def _batch(root: Path, text: str):
    d = Path(tempfile.mkdtemp(prefix="toml-", dir=root))
    (d / "b.toml").write_text(text, encoding="utf-8", errors="surrogatepass")
    before = sorted(p.name for p in d.iterdir())
    r = CliRunner().invoke(main, ["batch", str(d / "b.toml"), "-q"])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"unhandled {type(r.exception).__name__}: {r.exception}") from r.exception
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert sorted(p.name for p in d.iterdir()) == before
    return r


# -- TOML --------------------------------------------------------------------------------------------------------

@settings(max_examples=80, **SETTINGS)
@given(text=st.text(max_size=200))
def test_garbage_toml(proj, text):
    _batch(proj, text)


@settings(max_examples=60, **SETTINGS)
@given(text=st.lists(st.sampled_from(["[defaults]", "[[model]]", "[model]", "path = 'm.onnx'", "data = 'd.npz'",
                                      "kmin = 2", "kmin = 'x'", "[[defaults]]", "x = 1", "= 3", "[a.b]",
                                      "path = 3", "mean = [1, 'a']", "kmax = 1e400", "filter = nan",
                                      "output = 'm.onnx'", "min_cr = -1", "data = ''", "'''", "model = []"]),
                     max_size=8))
def test_shuffled_toml_lines(proj, text):
    """Lines of batch files in any order: a plan that is valid beside the model and data loads; any other is
    refused by the CLI in one line."""
    body = "\n".join(text)
    try:
        load_plan(_write(proj, body))
    except AxcnnError:
        _batch(proj, body)


def _write(root, text):
    d = Path(tempfile.mkdtemp(prefix="plan-", dir=root))
    (d / "b.toml").write_text(text)
    for name in ("m.onnx", "d.npz"):
        os.symlink(root / name, d / name)
    return d / "b.toml"


_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_\-]{0,15}", fullmatch=True).filter(lambda k: k not in KNOWN)


@settings(max_examples=60, **SETTINGS)
@given(key=_keys, where=st.sampled_from(["defaults", "model"]))
def test_unknown_keys_are_refused_by_name(proj, key, where):
    table = f"[defaults]\n{key} = 1\n" if where == "defaults" else ""
    model = f"[[model]]\npath = '{proj / 'm.onnx'}'\ndata = '{proj / 'd.npz'}'\n"
    model += f"{key} = 1\n" if where == "model" else ""
    r = _batch(proj, table + model)
    assert f"unknown key '{key}'" in r.stderr and "b.toml" in r.stderr


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value == float("inf") else
                                            "-inf" if value == -float("inf") else repr(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):  # a TOML basic string: controls and DEL escaped, the rest as is
        return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F or c in '"\\' else c
                             for c in value) + '"'
    return json.dumps(value)


_values = st.one_of(st.integers(-10**6, 10**6), st.floats(), st.booleans(),
                    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
                    st.lists(st.one_of(st.floats(-5, 5), st.integers(-3, 3)), max_size=4))


@settings(max_examples=120, **SETTINGS)
@given(key=st.sampled_from(sorted(KNOWN - {"path", "data"})), value=_values)
def test_bad_values_are_refused_naming_the_key(proj, key, value):
    """Any value for any key: the plan is valid, or it is refused in one line that names the key."""
    path = _write(proj, f"[[model]]\npath = 'm.onnx'\ndata = 'd.npz'\n{key} = {_toml(value)}\n")
    try:
        load_plan(path)
    except AxcnnError as exc:
        assert key in str(exc) and "\n" not in str(exc), str(exc)


# -- outputs -------------------------------------------------------------------------------------------------------

def _case(proj):
    return Path(tempfile.mkdtemp(prefix="out-", dir=proj))


@pytest.mark.parametrize("make_args, said", [
    (lambda p, d: ["-o", str(d / "missing" / "o.onnx")], "does not exist"),
    (lambda p, d: ["-o", str(p / "m.onnx")], "is the input model"),
    (lambda p, d: ["-o", str(d / "f" / "o.onnx")], "does not exist"),
    (lambda p, d: ["-o", str(d / "o.onnx"), "--report", str(d / "o.onnx")], "different files"),
    (lambda p, d: ["-o", str(d / "o.onnx"), "--report", str(p / "d.npz")], "the report path"),
])
def test_unwritable_output_paths(proj, make_args, said):
    d = _case(proj)
    (d / "f").write_text("a file, not a folder")
    args = ["compress", str(proj / "m.onnx"), "--data", str(proj / "d.npz"), *FAST, *make_args(proj, d)]
    r = outcome(args, d)
    assert said in r.stderr


@pytest.mark.parametrize("make_args", [lambda d: ["-o", str(d)], lambda d: ["--run-dir", str(d / "f")]])
def test_folder_for_a_file_is_a_usage_error(proj, make_args):
    """click checks these itself: exit 2 and its usage message (Error: ... on the last line)."""
    d = _case(proj)
    (d / "f").write_text("a file, not a folder")
    r = CliRunner().invoke(main, ["compress", str(proj / "m.onnx"), "--data", str(proj / "d.npz"), *FAST,
                                  *make_args(d)])
    assert r.exit_code == 2 and r.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert sorted(p.name for p in d.iterdir()) == ["f"]


@pytest.mark.parametrize("key", ["path", "data", "output", "report", "run_dir"])
def test_nul_in_a_batch_path(proj, key):
    """A NUL byte cannot come from a shell, but it can from a TOML file."""
    model = {"path": str(proj / "m.onnx"), "data": str(proj / "d.npz")}
    model[key] = model.get(key, "x") + "\0.onnx"
    r = _batch(proj, "[[model]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in model.items()))
    assert key in r.stderr


def test_output_must_not_write_over_the_inputs_external_data(tmp_path):
    model = tiny_cnn(seed=2, classes=100)
    x, y = tiny_data(model, n=40)
    onnx.save_model(model, tmp_path / "in.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="o.onnx.data", size_threshold=0)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    before = (tmp_path / "o.onnx.data").read_bytes()
    r = outcome(compress_args(tmp_path / "in.onnx", tmp_path / "d.npz", tmp_path), tmp_path)
    assert "external data over the input's" in r.stderr and (tmp_path / "o.onnx.data").read_bytes() == before


class _Fail:
    """Makes the ``n``-th call (0-based) of a function raise OSError(err), the calls before it pass."""

    def __init__(self, real, n, err):
        self.real, self.n, self.err, self.calls = real, n, err, 0

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls - 1 == self.n:
            raise OSError(self.err, os.strerror(self.err))
        return self.real(*a, **k)


def _leftovers(d: Path) -> list[str]:
    """Files a failed run must not leave: the outputs and any temporary file (the journal may stay)."""
    return sorted(p.name for p in d.iterdir() if p.name not in ("o.run",))


# fsync calls of one run of the tiny model: 0 journal header, 1-9 candidates and layers, 10 model, 11 its folder,
# 12 report, 13 its folder, 14 the journal's "done"
@pytest.mark.parametrize("n", [0, 1, 5, 9, 10, 12])
def test_full_disk_at_each_fsync(proj, monkeypatch, n):
    d = _case(proj)
    whole = _case(proj)
    assert CliRunner().invoke(main, compress_args(proj / "m.onnx", proj / "d.npz", whole)).exit_code == 0
    monkeypatch.setattr(os, "fsync", _Fail(os.fsync, n, errno.ENOSPC))
    r = CliRunner().invoke(main, compress_args(proj / "m.onnx", proj / "d.npz", d))
    monkeypatch.undo()
    assert r.exit_code == 1 and "No space left on device" in r.stderr and r.stderr.count("\n") == 1, r.output
    assert "Traceback" not in r.output and _leftovers(d) == []
    run = d / "o.run"
    assert not run.exists() or sorted(p.name for p in run.iterdir()) == ["journal.jsonl"]
    # space freed: the same command with --resume completes, with the bytes of a run that never failed
    r = CliRunner().invoke(main, [*compress_args(proj / "m.onnx", proj / "d.npz", d), "--resume"])
    assert r.exit_code == 0, r.output
    assert (d / "o.onnx").read_bytes() == (whole / "o.onnx").read_bytes()


@pytest.mark.parametrize("n", [11, 13, 14])
def test_full_disk_after_the_outputs_are_written(proj, monkeypatch, n):
    """The outputs are whole and in place: the run succeeds (a journal left unfinished is only logged)."""
    d = _case(proj)
    monkeypatch.setattr(os, "fsync", _Fail(os.fsync, n, errno.ENOSPC))
    r = CliRunner().invoke(main, compress_args(proj / "m.onnx", proj / "d.npz", d))
    monkeypatch.undo()
    assert r.exit_code == 0 and (d / "o.onnx").is_file() and (d / "o.report.json").is_file()


@pytest.mark.parametrize("target, err", [("replace", errno.EACCES), ("replace", errno.EROFS),
                                         ("mkstemp", errno.EACCES), ("mkdir", errno.EDQUOT)])
def test_unwritable_folder(proj, monkeypatch, target, err):
    d = _case(proj)
    if target == "replace":
        monkeypatch.setattr(os, "replace", _Fail(os.replace, 0, err))
    elif target == "mkstemp":
        monkeypatch.setattr(tempfile, "mkstemp", _Fail(tempfile.mkstemp, 0, err))
    else:
        monkeypatch.setattr(Path, "mkdir", _Fail(Path.mkdir, 0, err))
    r = CliRunner().invoke(main, compress_args(proj / "m.onnx", proj / "d.npz", d))
    monkeypatch.undo()
    assert r.exit_code == 1 and os.strerror(err) in r.stderr and r.stderr.count("\n") == 1, r.output
    assert _leftovers(d) == []


def test_batch_results_on_a_full_disk(proj, monkeypatch, tmp_path):
    (tmp_path / "b.toml").write_text(f"[[model]]\npath = '{proj / 'm.onnx'}'\ndata = '{proj / 'd.npz'}'\n"
                                     "kmin = 2\nkmax = 4\nmin_weights = 16\noutput = 'o.onnx'\n")
    real = os.fsync

    def full_for_results(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and ".s.json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", full_for_results)
    r = CliRunner().invoke(main, ["batch", str(tmp_path / "b.toml"), "--summary", str(tmp_path / "s.json"), "-q"])
    assert r.exit_code == 1 and "No space left on device" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "s.json").exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- the real entry point --------------------------------------------------------------------------------------------

def _subprocess(args, cwd):
    return subprocess.run([sys.executable, "-m", "axcnn.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_entry_point_garbage_model_is_one_line(proj, tmp_path):
    (tmp_path / "g.onnx").write_bytes(b"\x08\x07garbage")
    r = _subprocess(compress_args(tmp_path / "g.onnx", proj / "d.npz", tmp_path), tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and not r.stdout


def test_entry_point_runtime_failure_is_one_line(proj, tmp_path):
    model = tiny_cnn(seed=11)
    model.graph.node[2].attribute[0].i = 3  # group 3 over 8 channels: fails when it runs
    onnx.save(model, tmp_path / "g.onnx")
    r = _subprocess(compress_args(tmp_path / "g.onnx", proj / "d.npz", tmp_path), tmp_path)
    assert r.returncode == 1 and "onnxruntime failed to run" in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
