"""Tests for axcnn.data.synthetic and data-free runs end to end."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import tiny_cnn
from onnx import TensorProto, helper, numpy_helper

from axcnn.api import compress
from axcnn.cli import main
from axcnn.config import CompressConfig
from axcnn.data import GENERATORS, Preprocess, find_source, load, synthesize
from axcnn.data.synthetic import images
from axcnn.errors import AxcnnError

CFG = dict(kmin=2, kmax=6, filter=0.5, min_weights=16, batch_size=32)


def rgb_cnn(batch=1, h=9, w=7, layout="NCHW", seed=0) -> onnx.ModelProto:
    """Conv(3->8, 3x3) + Relu + GlobalAveragePool + Flatten + Gemm(8->3) on a fixed-batch, odd-sized RGB input
    (the shape family of the VWW MobileNet, which takes exactly 1x3x96x96)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (3, 8)).astype(np.float32)
    nodes, inp = [], "x"
    shape = [batch, 3, h, w] if layout == "NCHW" else [batch, h, w, 3]
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]))
        inp = "xt"
    nodes += [helper.make_node("Conv", [inp, "w1"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
              helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "w2"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "rgb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("generator", GENERATORS)
def test_images_in_unit_range_seeded(generator):
    a = images(generator, 6, 9, 7, 3, seed=1)
    assert a.shape == (6, 9, 7, 3) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0.02
    np.testing.assert_array_equal(a, images(generator, 6, 9, 7, 3, seed=1))
    assert not np.array_equal(a, images(generator, 6, 9, 7, 3, seed=2))


def test_smooth_images_are_low_frequency():
    def roughness(a):  # mean squared difference of neighbours, relative to the variance
        return np.mean(np.diff(a, axis=1) ** 2) / np.var(a)

    assert roughness(images("smooth", 20, 32, 32, 3)) < 0.2 * roughness(images("gaussian", 20, 32, 32, 3))


@pytest.mark.parametrize("shape, pre, want", [
    ([1, 3, 96, 96], Preprocess(), (5, 3, 96, 96)),
    (["n", 32, 32, 3], Preprocess(scale=256), (5, 32, 32, 3)),
    (["n", 1, 28, 28], Preprocess(preset="mnist"), (5, 1, 28, 28)),
    (["n", 3, "h", "w"], Preprocess(crop=12), (5, 3, 12, 12)),
    (["n", 10], Preprocess(), (5, 10)),
])
def test_synthesize_takes_the_model_input_shape(shape, pre, want):
    ds = synthesize(5, pre, shape, np.float32, seed=0)
    assert ds.x.shape == want and ds.x.dtype == np.float32 and ds.y is None
    assert ds.provenance.source == "synthetic" and not ds.provenance.labelled


def test_synthesize_statistics_follow_the_flags():
    plain = synthesize(200, Preprocess(), ["n", 3, 16, 16]).x
    assert abs(plain.mean()) < 0.3 and 0.4 < plain.std() < 1.5  # about zero mean, unit variance
    raw = synthesize(200, Preprocess(scale=1), ["n", 3, 16, 16]).x  # 8-bit pixels fed raw
    assert raw.max() > 200 and np.all(raw == np.round(raw))
    unit = synthesize(200, Preprocess(scale=255), ["n", 3, 16, 16]).x
    assert 0 <= unit.min() and unit.max() <= 1


@pytest.mark.parametrize("shape, pre, fragment", [
    (["n", 3, "h", "w"], Preprocess(), "--crop N"),
    (["n", "d"], Preprocess(), "free dims"),
])
def test_synthesize_errors(shape, pre, fragment):
    with pytest.raises(AxcnnError, match=fragment):
        synthesize(4, pre, shape)


def test_synthesize_refuses_integer_inputs():
    with pytest.raises(AxcnnError, match="floating-point"):
        synthesize(4, Preprocess(), ["n", 4], np.int64)


def test_no_data_and_nothing_beside_the_model_is_synthetic(tmp_path):
    onnx.save(tiny_cnn(), tmp_path / "m.onnx")
    src = find_source(None, tmp_path / "m.onnx")
    assert src.kind == "synthetic" and src.path is None
    io = type("IO", (), {"input_shape": ("N", 1, 8, 8), "input_dtype": np.dtype(np.float32), "input_name": "x"})()
    assert len(load(src, Preprocess(), io)) == 1000 and len(load(src, Preprocess(), io, limit=64)) == 64


def test_data_free_compress_says_accuracy_was_not_measured(tmp_path, caplog):
    mp = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(seed=5), mp)
    with caplog.at_level("WARNING", logger="axcnn"):
        rep = compress(mp, None, tmp_path / "o.onnx", None, CompressConfig(limit=200, **CFG)).report
    assert rep["accuracy_measured"] is False and rep["metric"] == "agreement" and rep["samples"] == 200
    assert rep["data"]["source"] == "synthetic" and rep["data"]["labelled"] is False
    assert rep["data"]["generator"] == "mix" and rep["settings"]["data"] is None
    assert sum("running data-free" in r.getMessage() for r in caplog.records) == 1
    onnx.checker.check_model(onnx.load(str(tmp_path / "o.onnx")), full_check=True)


def test_cli_design_card_command_in_an_empty_folder(tmp_path, monkeypatch):
    """The exact command, in a folder holding only model.onnx: exit 0, model.shared.onnx written."""
    onnx.save(rgb_cnn(batch=1, h=9, w=7), tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["compress", "model.onnx", "--kmin", "40", "--kmax", "80", "--filter", "0.15",
                                  "--min-weights", "16"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "model.shared.onnx").is_file()
    assert r.output.count("running data-free") == 1
    assert "ACCURACY NOT MEASURED" in r.output and "synthetic inputs" in r.output
    rep = json.loads((tmp_path / "model.shared.report.json").read_text())
    assert rep["accuracy_measured"] is False and rep["data"]["source"] == "synthetic"


@pytest.mark.parametrize("budget", [["--max-loss", "1"], ["--target-cr", "4"]])
def test_budget_modes_need_labelled_data(budget, tmp_path):
    onnx.save(tiny_cnn(), tmp_path / "m.onnx")
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), *budget])
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert lines == ["error: --max-loss and --target-cr need labelled test data (--data with labels): this run has "
                     "no test data (data-free)"]
    assert not (tmp_path / "o.onnx").exists()


def test_budget_mode_refuses_unlabelled_data_after_reading():
    from axcnn.api import data_config
    from axcnn.data import Dataset, Provenance

    unlabelled = Dataset(np.zeros((3, 2), np.float32), None, Provenance("npz", "u.npz", False, 3))
    with pytest.raises(AxcnnError, match="the test data has no labels"):
        data_config(CompressConfig(max_loss=1.0), unlabelled)
    assert data_config(CompressConfig(), unlabelled).metric == "agreement"
    labelled = Dataset(np.zeros((3, 2), np.float32), np.zeros(3, np.int64))
    assert data_config(CompressConfig(metric="top5"), labelled).metric == "top5"
