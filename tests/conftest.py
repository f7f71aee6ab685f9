"""Shared fixtures: tiny models built in code with onnx.helper and a seeded RNG, and the real-data location."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def realdata_manifest() -> dict:
    if not (REALDATA / "manifest.json").is_file():
        pytest.skip("../shared/realdata is absent")
    return json.loads((REALDATA / "manifest.json").read_text())


def tiny_cnn(seed: int = 0, batch: int | str = "N", opset: int = 13, ir: int = 8, classes: int = 10,
             constant_weight: bool = False, initializers_as_inputs: bool = False) -> onnx.ModelProto:
    """Conv(1->8,3x3)+Relu -> Conv(8->8 depthwise-ish grouped)+Relu -> Flatten -> Gemm -> logits.

    Input [batch, 1, 8, 8]. Weights are random normal with a seeded RNG.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (8,)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (8, 2, 3, 3)).astype(np.float32)  # group=4
    w3 = rng.normal(0, 0.2, (classes, 8 * 4 * 4)).astype(np.float32)
    b3 = rng.normal(0, 0.1, (classes,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", group=4, pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (w3, "w3"), (b3, "b3"))]
    if constant_weight:
        nodes.insert(0, helper.make_node("Constant", [], ["w3"], name="w3_const", value=inits.pop(3)))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])]
    if initializers_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "tiny", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    onnx.checker.check_model(model)
    return model


def tiny_data(model: onnx.ModelProto, n: int = 120, seed: int = 1, noise: float = 0.25):
    """Inputs and labels for ``model``: labels are the model's own top-1 with a fraction flipped at random."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 1, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    shape = model.graph.input[0].type.tensor_type.shape.dim[0]
    if shape.HasField("dim_value") and shape.dim_value > 0:
        b = shape.dim_value
        padded = np.concatenate([x, np.zeros(((-n) % b, *x.shape[1:]), x.dtype)])
        out = np.concatenate([sess.run(None, {"x": padded[i:i + b]})[0] for i in range(0, len(padded), b)])[:n]
    else:
        out = sess.run(None, {"x": x})[0]
    y = out.argmax(1).astype(np.int64)
    flip = rng.random(n) < noise
    y[flip] = rng.integers(0, out.shape[1], flip.sum())
    return x, y


@pytest.fixture
def tiny_files(tmp_path):
    """A tiny model and its labelled data written to tmp_path: (model_path, data_path)."""
    model = tiny_cnn()
    x, y = tiny_data(model)
    mp, dp = tmp_path / "tiny.onnx", tmp_path / "tiny.npz"
    onnx.save(model, mp)
    np.savez(dp, x=x, y=y)
    return mp, dp


@pytest.fixture(autouse=True)
def _reset_axcnn_logging():
    """The CLI configures the 'axcnn' logger for the terminal; undo that so caplog sees records in later tests."""
    import logging

    yield
    logger = logging.getLogger("axcnn")
    logger.handlers[:] = []
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
