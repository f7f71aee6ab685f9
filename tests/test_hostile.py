"""Hostile input, generated: malformed models, external data that escapes the model's folder, malformed data.

Every case must end in a one-line error and exit 1 (or, for an input that turns out valid, a normal run), never a
traceback or an internal error (exit 3), and must leave no output behind. Hypothesis draws the cases with a fixed
seed (derandomize), so CI runs the same few hundred every time; see tests/test_hostile_io.py for TOML, output paths
and a full disk.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import tiny_cnn, tiny_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from axcnn.cli import main

FAST = ["--kmin", "2", "--kmax", "4", "--filter", "0.34", "--min-weights", "16", "-q"]
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


def compress_args(model, data, out_dir, *extra):
    return ["compress", str(model), "--data", str(data), "-o", str(Path(out_dir) / "o.onnx"), *FAST, *extra]


def outcome(args, out_dir, *, must_fail: bool = True):
    """Run the CLI in-process and check the hostile-input contract; return the click result."""
    out_dir = Path(out_dir)
    before = sorted(p.name for p in out_dir.iterdir())
    r = CliRunner().invoke(main, args)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"unhandled {type(r.exception).__name__}: {r.exception}") from r.exception
    assert "Traceback" not in r.output, r.output
    assert r.exit_code != 3, f"internal error: {r.stderr}"
    if r.exit_code == 0 and not must_fail:
        onnx.checker.check_model(onnx.load(str(out_dir / "o.onnx")))
        return r
    assert r.exit_code == 1, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == before, "partial output left behind"
    return r


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid model and data set, in folders of their own."""
    root = tmp_path_factory.mktemp("hostile")
    model = tiny_cnn(seed=7)
    x, y = tiny_data(model, n=48)
    onnx.save(model, root / "m.onnx")
    np.savez(root / "d.npz", x=x, y=y)
    return root, model, x, y


def _case_dir(root: Path) -> Path:
    """A fresh folder for one generated case, under the module's pytest folder (cleaned up like any tmp_path)."""
    return Path(tempfile.mkdtemp(prefix="case-", dir=root))


# -- protobufs ---------------------------------------------------------------------------------------------------

@settings(max_examples=120, **SETTINGS)
@given(blob=st.binary(min_size=0, max_size=400))
def test_garbage_bytes_are_not_a_model(base, blob):
    root = base[0]
    d = _case_dir(base[0])
    (d / "g.onnx").write_bytes(blob)
    (d / "out").mkdir()
    outcome(compress_args(d / "g.onnx", root / "d.npz", d / "out"), d / "out")


@settings(max_examples=80, **SETTINGS)
@given(cut=st.floats(0.0, 0.999), flip=st.integers(0, 2**31), mode=st.sampled_from(["truncate", "flip"]))
def test_truncated_or_corrupted_model(base, cut, flip, mode):
    root, model = base[0], base[1]
    data = bytearray(model.SerializeToString())
    at = int(cut * len(data))
    if mode == "truncate":
        data = data[:at]
    else:
        data[at] ^= 1 + flip % 255
    d = _case_dir(base[0])
    (d / "t.onnx").write_bytes(bytes(data))
    (d / "out").mkdir()
    outcome(compress_args(d / "t.onnx", root / "d.npz", d / "out"), d / "out", must_fail=False)


# -- malformed graphs --------------------------------------------------------------------------------------------

def _mutate(model: onnx.ModelProto, kind: str, a: int, b: int, value: float) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    nodes, inits = g.node, g.initializer
    if kind == "cycle":  # a node reads the output of itself or of a later node
        i = a % len(nodes)
        j = i + b % (len(nodes) - i)
        nodes[i].input[0] = nodes[j].output[0]
    elif kind == "missing_initializer":
        del inits[a % len(inits)]
    elif kind == "dangling_input":
        node = nodes[a % len(nodes)]
        node.input[b % len(node.input)] = "nowhere"
    elif kind == "drop_node":
        del nodes[a % len(nodes)]
    elif kind == "wrong_dtype":  # the declared type does not match the stored bytes
        t = inits[a % len(inits)]
        t.data_type = [TensorProto.INT32, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8,
                       TensorProto.STRING, TensorProto.BOOL, TensorProto.UINT64][b % 7]
    elif kind == "typed_weight":  # a weight of another type, stored correctly
        t = inits[a % len(inits)]
        arr = numpy_helper.to_array(t)
        dtype = [np.int32, np.float64, np.float16, np.int8, np.uint8][b % 5]
        t.CopyFrom(numpy_helper.from_array(arr.astype(dtype), t.name))
    elif kind == "bad_dims":
        t = inits[a % len(inits)]
        t.dims[b % len(t.dims)] = 1 + b % 17
    elif kind == "nonfinite_weight":
        t = inits[a % len(inits)]
        arr = numpy_helper.to_array(t).copy()
        arr.flat[b % arr.size] = value
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    elif kind == "opset":
        m.opset_import[0].version = a % 30
    elif kind == "no_outputs":
        del g.output[:]
    elif kind == "two_inputs":
        g.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    elif kind == "input_type":
        g.input[0].type.tensor_type.elem_type = [TensorProto.STRING, TensorProto.INT64, TensorProto.BOOL,
                                                 TensorProto.DOUBLE][a % 4]
    elif kind == "attribute":
        node = nodes[a % len(nodes)]
        if node.attribute:
            attr = node.attribute[b % len(node.attribute)]
            if attr.type == onnx.AttributeProto.INT:
                attr.i = int(min(max(value, -9), 1e9)) if np.isfinite(value) else -1
            elif attr.type == onnx.AttributeProto.INTS:
                attr.ints[:] = [a % 5 - 1] * len(attr.ints)
    elif kind == "duplicate_output":
        nodes[a % len(nodes)].output[0] = nodes[b % len(nodes)].output[0]
    elif kind == "ir_version":
        m.ir_version = a % 12
    return m


# "no_outputs" is left out of the generated cases while its bug stands (see test_model_without_outputs)
MUTATIONS = ["cycle", "missing_initializer", "dangling_input", "drop_node", "wrong_dtype", "typed_weight", "bad_dims",
             "nonfinite_weight", "opset", "two_inputs", "input_type", "attribute", "duplicate_output", "ir_version"]


@settings(max_examples=90, **SETTINGS)
@given(kind=st.sampled_from(MUTATIONS), a=st.integers(0, 1000), b=st.integers(0, 1000),
       value=st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, 3.0, -7.0, 1e30]))
def test_malformed_graphs(base, kind, a, b, value):
    root, model = base[0], base[1]
    d = _case_dir(base[0])
    (d / "out").mkdir()
    bad = _mutate(model, kind, a, b, value)
    (d / "b.onnx").write_bytes(bad.SerializeToString())
    outcome(compress_args(d / "b.onnx", root / "d.npz", d / "out"), d / "out", must_fail=False)


def test_model_without_outputs(base, tmp_path):
    onnx.save(_mutate(base[1], "no_outputs", 0, 0, 0.0), tmp_path / "n.onnx")
    (tmp_path / "out").mkdir()
    outcome(compress_args(tmp_path / "n.onnx", base[0] / "d.npz", tmp_path / "out"), tmp_path / "out")


@pytest.mark.parametrize("which", ["w1", "w2", "w3"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weight_is_refused(base, tmp_path, which, value):
    root, model = base[0], base[1]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name == which:
            arr = numpy_helper.to_array(t).copy()
            arr.flat[3] = value
            t.CopyFrom(numpy_helper.from_array(arr, which))
    onnx.save(m, tmp_path / "n.onnx")
    (tmp_path / "out").mkdir()
    r = outcome(compress_args(tmp_path / "n.onnx", root / "d.npz", tmp_path / "out"), tmp_path / "out")
    assert "NaN or infinity" in r.stderr


def test_nonfinite_bias_is_refused(base, tmp_path):
    root, model = base[0], base[1]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name == "b1":
            t.CopyFrom(numpy_helper.from_array(np.full(8, np.nan, np.float32), "b1"))
    onnx.save(m, tmp_path / "n.onnx")
    (tmp_path / "out").mkdir()
    outcome(compress_args(tmp_path / "n.onnx", root / "d.npz", tmp_path / "out"), tmp_path / "out")


def _relu_only() -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "r",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("make, extra, said", [
    (_relu_only, [], "no Conv/ConvTranspose/Gemm/MatMul weight"),
    (tiny_cnn, ["--min-weights", "100000"], "no Conv/ConvTranspose/Gemm/MatMul weight"),
])
def test_no_shareable_layer(base, tmp_path, make, extra, said):
    onnx.save(make(), tmp_path / "s.onnx")
    (tmp_path / "out").mkdir()
    r = outcome(compress_args(tmp_path / "s.onnx", base[0] / "d.npz", tmp_path / "out", *extra), tmp_path / "out")
    assert said in r.stderr


# -- external data that escapes the model's folder (the CVE-2024-27318 class) --------------------------------------

_WATCH: dict | None = None


def _audit(event, args):
    if _WATCH is not None and event == "open" and isinstance(args[0], (str, bytes)):
        path = os.fsdecode(args[0])
        _WATCH["opened"].append(os.path.realpath(path))


sys.addaudithook(_audit)


def _external(model: onnx.ModelProto, name: str, location: str, length: int | None = None) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name == name:
            n = int(np.prod(t.dims)) * 4
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", "0"), ("length", str(length or n))):
                e = t.external_data.add()
                e.key, e.value = k, v
    return m


@pytest.fixture(scope="module")
def fortress(tmp_path_factory, base):
    """root/model/ holds the model and its data; root/secret.bin and root/outside/ must never be read."""
    root = tmp_path_factory.mktemp("fortress")
    (root / "model" / "sub").mkdir(parents=True)
    (root / "outside").mkdir()
    secret = np.arange(2000, dtype=np.float32).tobytes()
    (root / "secret.bin").write_bytes(secret)
    (root / "outside" / "w.bin").write_bytes(secret)
    (root / "model" / "inside.bin").write_bytes(secret)
    os.symlink(root / "secret.bin", root / "model" / "link.bin")
    os.symlink(root / "outside", root / "model" / "linkdir")
    os.symlink(root / "model" / "inside.bin", root / "model" / "sub" / "innerlink.bin")
    np.savez(root / "model" / "d.npz", x=base[2], y=base[3])
    return root


def _run_watched(fortress, location):
    global _WATCH
    d = Path(tempfile.mkdtemp(prefix="ext-", dir=fortress / "model"))
    out = Path(tempfile.mkdtemp(prefix="out-", dir=fortress))
    model = _external(tiny_cnn(seed=7), "w3", location)
    (d / "e.onnx").write_bytes(model.SerializeToString())
    _WATCH = {"opened": []}
    try:
        r = outcome(compress_args(d / "e.onnx", fortress / "model" / "d.npz", out), out, must_fail=False)
    finally:
        opened, _WATCH = _WATCH["opened"], None
    forbidden = [p for p in opened if p.startswith(str(fortress)) and not p.startswith((str(d), str(out)))
                 and p != str(fortress / "model" / "d.npz")]
    assert not forbidden, f"read outside the model's folder: {forbidden}"
    return r


ESCAPES = ["../secret.bin", "../../secret.bin", "../../outside/w.bin", "./../../secret.bin", "sub/../../../secret.bin",
           "/etc/passwd", "{root}/secret.bin", "{root}/outside/w.bin", "..\\..\\secret.bin", "../link.bin",
           "../linkdir/w.bin", "../sub/innerlink.bin", "%2e%2e/%2e%2e/secret.bin", "", ".", "..", "/", "\x00x",
           "missing.bin", "../model/../../secret.bin", "~/secret.bin", "//etc/passwd"]


@pytest.mark.parametrize("location", ESCAPES)
def test_external_data_outside_the_model_folder_is_refused(fortress, location):
    r = _run_watched(fortress, location.format(root=fortress))
    assert r.exit_code == 1


@settings(max_examples=40, **SETTINGS)
@given(parts=st.lists(st.sampled_from(["..", ".", "secret.bin", "outside", "w.bin", "linkdir", "link.bin", "sub",
                                       "model", "", "\\..", "x"]), min_size=1, max_size=5),
       absolute=st.booleans())
def test_generated_external_data_locations(fortress, parts, absolute):
    location = ("/" if absolute else "") + "/".join(parts)
    _run_watched(fortress, location)


# -- data ----------------------------------------------------------------------------------------------------------

class _Boom:
    """Unpickling this creates a marker file: it must never happen."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_object_arrays_are_never_unpickled(base, tmp_path):
    root = base[0]
    marker = tmp_path / "UNPICKLED"
    boom = _Boom()
    boom.marker = str(marker)
    for key in ("x", "y"):
        arrays = {"x": base[2], "y": base[3]}
        arrays[key] = np.array([boom, boom], dtype=object)
        np.savez(tmp_path / f"obj_{key}.npz", **arrays)  # np.savez pickles object arrays
        (tmp_path / "out").mkdir(exist_ok=True)
        r = outcome(compress_args(root / "m.onnx", tmp_path / f"obj_{key}.npz", tmp_path / "out"), tmp_path / "out")
        assert "pickle" in r.stderr
    # a raw .npy member holding a pickle, written by hand
    with zipfile.ZipFile(tmp_path / "raw.npz", "w") as z:
        header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
        header += b" " * (118 - len(header)) + b"\n"
        z.writestr("x.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
                   + pickle.dumps(np.array([boom], dtype=object)))
        z.writestr("y.npy", b"junk")
    outcome(compress_args(root / "m.onnx", tmp_path / "raw.npz", tmp_path / "out"), tmp_path / "out")
    assert not marker.exists()


_DTYPES = [np.float32, np.float64, np.float16, np.int8, np.uint8, np.int64, np.bool_, np.complex64, "U3", "S2",
           "datetime64[s]"]


@st.composite
def datasets(draw):
    n = draw(st.integers(0, 6))
    shape = draw(st.sampled_from([(n, 1, 8, 8), (n, 8, 8), (n, 8, 8, 1), (n, 64), (n, 1, 8, 9), (n,), (n, 2, 8, 8),
                                  (n, 1, 8, 8, 1), ()]))
    xdtype = draw(st.sampled_from(_DTYPES))
    size = int(np.prod(shape)) if shape else 1
    raw = draw(st.lists(st.sampled_from([0.0, 1.0, -1.0, 0.5, float("nan"), float("inf"), 255.0, 1e40]),
                        min_size=size, max_size=size))
    with np.errstate(all="ignore"):
        x = np.asarray(raw, dtype=np.float64).reshape(shape)
        try:
            x = x.astype(xdtype)
        except (ValueError, TypeError, OverflowError):
            x = x.astype(np.float32)
    ylen = draw(st.sampled_from([n, max(n - 1, 0), n + 1]))
    ydtype = draw(st.sampled_from([np.int64, np.int32, np.uint64, np.float32, np.float64, np.bool_, "U2"]))
    yvals = draw(st.lists(st.sampled_from([0, 1, 9, 10, -1, 2**40, 0.5, float("nan")]), min_size=ylen,
                          max_size=ylen))
    with np.errstate(all="ignore"):
        try:
            y = np.asarray(yvals, dtype=np.float64).astype(ydtype)
        except (ValueError, TypeError, OverflowError):
            y = np.asarray(yvals, dtype=np.float64)
    if draw(st.booleans()):
        y = y.reshape(-1, 1) if y.size else y.reshape(0, 2)
    keys = draw(st.sampled_from([("x", "y"), ("x",), ("y",), ("x", "y", "z"), ("X", "y")]))
    arrays = {}
    if "x" in keys or "X" in keys:
        arrays["x" if "x" in keys else "X"] = x
    if "y" in keys:
        arrays["y"] = y
    if "z" in keys:
        arrays["z"] = np.zeros(2)
    return arrays


@settings(max_examples=120, **SETTINGS)
@given(arrays=datasets(), preprocess=st.sampled_from([[], ["--scale", "255"], ["--layout", "NHWC"],
                                                      ["--mean", "0.5", "--std", "0.25"]]))
def test_malformed_data(base, arrays, preprocess):
    root = base[0]
    d = _case_dir(base[0])
    (d / "out").mkdir()
    np.savez(d / "d.npz", **arrays)
    outcome(compress_args(root / "m.onnx", d / "d.npz", d / "out", *preprocess), d / "out", must_fail=False)


@pytest.mark.parametrize("make, said", [
    (lambda x, y: dict(x=x[:0], y=y[:0]), "empty"),
    (lambda x, y: dict(x=x, y=np.concatenate([[10], y[1:]])), "labels must lie"),
    (lambda x, y: dict(x=x, y=-y - 1), "labels y must be >= 0"),
    (lambda x, y: dict(x=np.where(x > 1, np.nan, x), y=y), "NaN or infinite"),
    (lambda x, y: dict(x=x[:, :, :4], y=y), "does not match"),
    (lambda x, y: dict(x=x.astype(np.complex64), y=y), "numeric"),
    (lambda x, y: dict(x=x, y=y + 0.5), "integer class ids"),
    (lambda x, y: dict(x=x, y=y[:-1]), "labels"),
])
def test_bad_data_is_refused(base, tmp_path, make, said):
    root = base[0]
    np.savez(tmp_path / "bad.npz", **make(base[2], base[3]))
    (tmp_path / "out").mkdir()
    r = outcome(compress_args(root / "m.onnx", tmp_path / "bad.npz", tmp_path / "out"), tmp_path / "out")
    assert said in r.stderr


@settings(max_examples=40, **SETTINGS)
@given(blob=st.binary(max_size=300), prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x93NUMPY", b"PK\x05\x06"]))
def test_garbage_data_files(base, blob, prefix):
    root = base[0]
    d = _case_dir(base[0])
    (d / "out").mkdir()
    (d / "g.npz").write_bytes(prefix + blob)
    outcome(compress_args(root / "m.onnx", d / "g.npz", d / "out"), d / "out")
