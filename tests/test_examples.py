"""The bundled digits example: the training script works and the committed model is accurate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from axcnn.data import Preprocess, load_npz, prepare

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPT = EXAMPLES / "train_digits_cnn.py"


def _input_spec(model: onnx.ModelProto) -> tuple[str, list]:
    inp = model.graph.input[0]
    dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in inp.type.tensor_type.shape.dim]
    return inp.name, dims


def _accuracy(onnx_path: Path, npz_path: Path) -> float:
    model = onnx.load(str(onnx_path))
    name, dims = _input_spec(model)
    x, y = load_npz(npz_path)
    data = prepare(x, y, Preprocess(scale=16), dims, input_name=name)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {name: data.x})[0]
    assert logits.shape == (len(data), 10)
    return float((logits.argmax(axis=1) == data.y).mean())


def _check_model(path: Path) -> None:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    name, dims = _input_spec(model)
    assert name == "input" and dims == ["batch", 1, 8, 8]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert {i.name for i in model.graph.initializer} == {
        f"{layer}.{kind}" for layer in ("conv1", "conv2", "fc1", "fc2") for kind in ("weight", "bias")
    }
    assert [op.version for op in model.opset_import if op.domain in ("", "ai.onnx")] == [13]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test accuracy" in proc.stdout
    return out


def test_training_script_produces_valid_model(trained):
    _check_model(trained / "digits_cnn.onnx")
    x, y = load_npz(trained / "digits_test.npz")
    assert x.dtype == np.uint8 and x.shape[1:] == (8, 8, 1) and x.max() <= 16
    assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))


def test_training_script_accuracy(trained):
    assert _accuracy(trained / "digits_cnn.onnx", trained / "digits_test.npz") >= 0.95


def test_training_script_test_split_matches_committed(trained):
    # the split depends only on the bundled data and the seed, so it reproduces exactly everywhere
    x_new, y_new = load_npz(trained / "digits_test.npz")
    x_old, y_old = load_npz(EXAMPLES / "digits_test.npz")
    np.testing.assert_array_equal(x_new, x_old)
    np.testing.assert_array_equal(y_new, y_old)


def test_committed_model_accuracy():
    _check_model(EXAMPLES / "digits_cnn.onnx")
    assert _accuracy(EXAMPLES / "digits_cnn.onnx", EXAMPLES / "digits_test.npz") >= 0.95


def test_demo_compresses_the_shipped_example(tmp_path):
    """`make demo` runs exactly this command on the committed example."""
    import json

    from click.testing import CliRunner

    from axcnn.cli import main

    out, rep = tmp_path / "digits.shared.onnx", tmp_path / "digits.report.json"
    r = CliRunner().invoke(main, ["compress", str(EXAMPLES / "digits_cnn.onnx"), "--data",
                                  str(EXAMPLES / "digits_test.npz"), "--scale", "16", "-o", str(out),
                                  "--report", str(rep)])
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["accuracy_loss_pp"] <= 1.0 and report["compression_ratio"] > 3
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    d = np.load(EXAMPLES / "digits_test.npz")
    x = (d["x"].astype(np.float32) / 16.0).transpose(0, 3, 1, 2)
    logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.mean(logits.argmax(1) == d["y"]) == pytest.approx(report["final_score"])
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and "shared layers" in r.output
