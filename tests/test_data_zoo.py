"""Tests for axcnn.data.zoo and the ONNX-zoo layout end to end: test_data_set_N/input_0.pb (+ output_0.pb)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import REALDATA, realdata_manifest, tiny_cnn
from onnx import numpy_helper

from axcnn.api import compress
from axcnn.cli import main
from axcnn.config import CompressConfig
from axcnn.data import Preprocess, find_source, load
from axcnn.data.zoo import read_zoo, zoo_sets
from axcnn.errors import AxcnnError
from axcnn.model import io_info

CFG = dict(kmin=2, kmax=6, filter=0.5, min_weights=16, batch_size=32)


def _outputs(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    b = inp.shape[0] if isinstance(inp.shape[0], int) else len(x)
    return np.concatenate([sess.run(None, {inp.name: x[i:i + b]})[0] for i in range(0, len(x), b)])


def write_zoo(folder, model, batches, outputs=True):
    """The model as folder/model.onnx and each batch as folder/test_data_set_<i>/input_0.pb (+ output_0.pb)."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    for i, xb in enumerate(batches):
        d = folder / f"test_data_set_{i}"
        d.mkdir()
        (d / "input_0.pb").write_bytes(numpy_helper.from_array(xb, "x").SerializeToString())
        if outputs:
            (d / "output_0.pb").write_bytes(numpy_helper.from_array(_outputs(model, xb), "y").SerializeToString())
    return folder / "model.onnx"


def test_zoo_sets_in_numeric_order(tmp_path):
    for i in (10, 2, 0):
        (tmp_path / f"test_data_set_{i}").mkdir()
        (tmp_path / f"test_data_set_{i}" / "input_0.pb").write_bytes(b"")
    (tmp_path / "test_data_set_x").mkdir()
    (tmp_path / "test_data_set_5").mkdir()  # no input_0.pb
    assert [p.name for p in zoo_sets(tmp_path)] == ["test_data_set_0", "test_data_set_2", "test_data_set_10"]
    assert zoo_sets(tmp_path / "test_data_set_2") == [tmp_path / "test_data_set_2"]
    assert zoo_sets(tmp_path / "test_data_set_5") == []


def test_read_zoo_concatenates_batches_and_adds_a_missing_batch_dim(tmp_path):
    model = tiny_cnn()
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(3, 1, 8, 8)).astype(np.float32), rng.normal(size=(1, 1, 8, 8)).astype(np.float32)]
    write_zoo(tmp_path, model, batches)
    x, ref, details = read_zoo(zoo_sets(tmp_path), 4)
    np.testing.assert_array_equal(x, np.concatenate(batches))
    np.testing.assert_array_equal(ref, _outputs(model, x).argmax(1))
    assert details == {"sets": ["test_data_set_0", "test_data_set_1"], "outputs": True}
    # a set holding one sample without its batch dim
    (tmp_path / "test_data_set_1" / "input_0.pb").write_bytes(
        numpy_helper.from_array(batches[1][0], "x").SerializeToString())
    x, _, _ = read_zoo(zoo_sets(tmp_path), 4)
    assert x.shape == (4, 1, 8, 8)


@pytest.mark.parametrize("case, fragment", [("corrupt", "not a readable TensorProto"),
                                            ("output_shape", "does not match"),
                                            ("mixed_shapes", "has samples of shape"),
                                            ("nan", "NaN")])
def test_read_zoo_errors_name_the_file(case, fragment, tmp_path):
    model = tiny_cnn()
    batches = [np.zeros((2, 1, 8, 8), np.float32), np.zeros((2, 1, 8, 8), np.float32)]
    write_zoo(tmp_path, model, batches)
    f = tmp_path / "test_data_set_1" / ("output_0.pb" if case == "output_shape" else "input_0.pb")
    if case == "corrupt":
        f.write_bytes(b"\xff\xff garbage")
    elif case == "output_shape":
        f.write_bytes(numpy_helper.from_array(np.zeros((3, 10), np.float32)).SerializeToString())
    elif case == "mixed_shapes":
        f.write_bytes(numpy_helper.from_array(np.zeros((2, 1, 7, 7), np.float32)).SerializeToString())
    else:
        f.write_bytes(numpy_helper.from_array(np.full((2, 1, 8, 8), np.nan, np.float32)).SerializeToString())
    with pytest.raises(AxcnnError) as exc:
        read_zoo(zoo_sets(tmp_path), 4)
    assert fragment in str(exc.value) and "test_data_set_1" in str(exc.value) and "\n" not in str(exc.value)


def test_zoo_refuses_preprocessing_flags(tmp_path):
    mp = write_zoo(tmp_path, tiny_cnn(), [np.zeros((2, 1, 8, 8), np.float32)])
    io = io_info(onnx.load(str(mp)))
    with pytest.raises(AxcnnError, match="already preprocessed"):
        load(find_source(None, mp), Preprocess(scale=255), io)


@pytest.mark.parametrize("batch", ["N", 1])
def test_zoo_beside_the_model_found_with_no_data_all_samples_used(batch, tmp_path):
    model = tiny_cnn(seed=3, batch=batch)
    rng = np.random.default_rng(1)
    sizes = [1, 1, 1] if batch == 1 else [7, 5, 9]
    batches = [rng.normal(size=(n, 1, 8, 8)).astype(np.float32) for n in sizes]
    mp = write_zoo(tmp_path / "zoo", model, batches)
    rep = compress(mp, None, tmp_path / "o.onnx", tmp_path / "r.json", CompressConfig(**CFG)).report
    assert rep["samples"] == sum(sizes) and rep["metric"] == "agreement"
    assert rep["data"] == {"source": "zoo", "path": str((tmp_path / "zoo").resolve()), "labelled": False,
                           "read": sum(sizes), "samples": sum(sizes), "sets": [f"test_data_set_{i}" for i in range(3)],
                           "outputs": True, "stored_outputs_agree": sum(sizes)}
    assert rep["accuracy_measured"] is False and rep["reference_score"] == 1.0
    assert json.loads((tmp_path / "r.json").read_text())["data"]["source"] == "zoo"


def test_zoo_folder_given_as_data_and_cli_says_agreement(tmp_path):
    mp = write_zoo(tmp_path / "zoo", tiny_cnn(), [np.random.default_rng(2).normal(size=(12, 1, 8, 8))
                                                 .astype(np.float32)], outputs=False)
    for data in (tmp_path / "zoo", tmp_path / "zoo" / "test_data_set_0"):
        out = tmp_path / "o.onnx"
        r = CliRunner().invoke(main, ["compress", str(mp), "--data", str(data), "-o", str(out), "--kmin", "2",
                                      "--kmax", "4", "--min-weights", "16"])
        assert r.exit_code == 0, r.output
        assert r.output.count("has no labels: scoring by agreement") == 1
        assert "ACCURACY NOT MEASURED" in r.output and "zoo inputs" in r.output
        rep = json.loads(out.with_name("o.report.json").read_text())
        assert rep["data"]["outputs"] is False and rep["samples"] == 12


def test_zoo_of_real_mnist_batches_found_beside_the_model(tmp_path):
    man = realdata_manifest()
    entry = man["models"]["mnist_cnn_baskov"]
    z = np.load(REALDATA / man["datasets"][entry["dataset"]]["file"])
    x = (z["x"][:300].astype(np.float32) / entry["scale"] - entry["mean"][0]) / entry["std"][0]
    x = np.ascontiguousarray(x.reshape(300, 28, 28)[:, np.newaxis])  # NCHW, one channel
    model = onnx.load(str(REALDATA / entry["file"]))
    folder = tmp_path / "mnist"
    mp = write_zoo(folder, model, [x[:100], x[100:250], x[250:]])
    shutil.copy(REALDATA / entry["file"], mp)  # the model file itself, as shipped
    rep = compress(mp, None, tmp_path / "o.onnx", None, CompressConfig(kmin=40, kmax=48, filter=0.2)).report
    assert rep["samples"] == 300 and rep["data"]["read"] == 300 and rep["data"]["stored_outputs_agree"] == 300
    assert rep["data"]["source"] == "zoo" and rep["accuracy_measured"] is False
