import numpy as np
import onnx
import pytest
from conftest import tiny_cnn
from layer_graphs import Builder
from onnx import TensorProto, helper, numpy_helper

from axcnn.errors import AxcnnError
from axcnn.model import Operand, inventory, io_info, load_model


def test_inventory_conv_grouped_gemm_in_topological_order():
    layers, skipped = inventory(tiny_cnn(), min_weights=16)
    assert [(s.name, s.op_type, s.shape) for s in layers] == [
        ("w1", "Conv", (8, 1, 3, 3)), ("w2", "Conv", (8, 2, 3, 3)), ("w3", "Gemm", (10, 128))]
    assert all(s.bits == 32 and s.dtype == "float32" for s in layers)
    reasons = {s.name: s.reason for s in skipped}
    assert reasons["b1"] == "bias" and reasons["b3"] == "bias"


def test_small_tensors_left_alone_with_reason():
    layers, skipped = inventory(tiny_cnn(), min_weights=100)
    assert [s.name for s in layers] == ["w2", "w3"]
    assert "below the 100-weight threshold" in {s.name: s.reason for s in skipped}["w1"]


def test_constant_node_and_ir3_input_initializers():
    layers, _ = inventory(tiny_cnn(constant_weight=True), min_weights=16)
    assert {s.name: s.source for s in layers}["w3"] == "constant"
    layers, _ = inventory(tiny_cnn(opset=8, ir=3, initializers_as_inputs=True), min_weights=16)
    assert {s.source for s in layers} == {"input-initializer"}


def _matmul_model(reshape: bool, both_const: bool = False):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 4, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([16, 3], np.int64), "shape")]
    nodes = [helper.make_node("Reshape", ["w", "shape"], ["w2d"])] if reshape else []
    wname = "w2d" if reshape else "w"
    if both_const:
        inits.append(numpy_helper.from_array(np.ones((2, 16), np.float32), "a"))
        nodes.append(helper.make_node("MatMul", ["a", wname], ["m"]))
        nodes.append(helper.make_node("Add", ["x", "m"], ["y"]))
    else:
        nodes.append(helper.make_node("MatMul", ["x", wname], ["y"]))
    g = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_matmul_weight_through_reshape_is_found():
    layers, _ = inventory(_matmul_model(reshape=True), min_weights=16)
    assert [(s.name, s.op_type, s.shape) for s in layers] == [("w", "MatMul", (4, 4, 3))]


def test_matmul_with_two_constant_operands_is_skipped():
    layers, skipped = inventory(_matmul_model(reshape=True, both_const=True), min_weights=16)
    assert layers == [] and {s.reason for s in skipped} == {"both operands are constant"}


def test_nan_weight_is_a_user_error():
    m = tiny_cnn()
    w = numpy_helper.to_array(m.graph.initializer[2]).copy()
    w[0, 0, 0, 0] = np.nan
    m.graph.initializer[2].CopyFrom(numpy_helper.from_array(w, m.graph.initializer[2].name))
    with pytest.raises(AxcnnError, match="contains NaN or infinity"):
        inventory(m, min_weights=16)


def test_float16_weights_have_16_bits():
    m = tiny_cnn()
    t = m.graph.initializer[3]  # w3; the model would no longer type-check, but inventory only reads it
    t16 = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name)
    t.CopyFrom(t16)
    layers, _ = inventory(m, min_weights=16)
    assert {s.name: s.bits for s in layers}["w3"] == 16


def test_load_errors(tmp_path):
    with pytest.raises(AxcnnError, match="not found"):
        load_model(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(AxcnnError, match="not a readable ONNX model"):
        load_model(bad)
    with pytest.raises(AxcnnError, match="not a file"):
        load_model(tmp_path)


def test_external_data_roundtrip(tmp_path):
    m = tiny_cnn()
    w1 = numpy_helper.to_array(m.graph.initializer[0])
    path = tmp_path / "ext.onnx"
    onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
              size_threshold=0)
    loaded = load_model(path)
    layers, _ = inventory(loaded, min_weights=16)
    assert np.array_equal(layers[0].array, w1)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(AxcnnError, match="external data"):
        load_model(path)


def test_io_info_fixed_batch_and_output_choice():
    info = io_info(tiny_cnn(batch=1))
    assert info.fixed_batch == 1 and info.input_name == "x" and info.output_name == "logits"
    assert io_info(tiny_cnn()).fixed_batch is None
    with pytest.raises(AxcnnError, match="no output named"):
        io_info(tiny_cnn(), "nope")
    info = io_info(tiny_cnn(opset=8, ir=3, initializers_as_inputs=True))
    assert info.input_name == "x"


def test_inventory_records_how_the_op_reads_its_weight():
    b = Builder(0)
    w = b.const("w0", b.normal([6, 5]))
    b.nodes.append(onnx.helper.make_node("Transpose", [w], ["wt"], perm=[1, 0]))
    b.x_shape = [3, 5]
    b.nodes.append(onnx.helper.make_node("Gemm", ["x", "wt"], ["y"], name="layer", transB=0))
    spec = _named(b.model("y"), "w0")
    assert spec.operand == Operand(position=1, trans=False, group=1, direct=False)
    b = Builder(0)
    spec = _named(b.model(b.layer("Gemm", trans_b=1)), "w")
    assert spec.operand == Operand(position=1, trans=True, group=1, direct=True)
    b = Builder(0)
    spec = _named(b.model(b.layer("ConvTranspose", group=2)), "w")
    assert spec.operand.group == 2


def _named(model, name):
    return next(s for s in inventory(model, min_weights=1)[0] if s.name == name)
