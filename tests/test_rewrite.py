"""Tests for axcnn.rewrite: weight-shared ONNX models that stock onnxruntime runs and folds."""

from __future__ import annotations

import base64
import collections
import json
import logging
import os
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from axcnn import rewrite
from axcnn.errors import AxcnnError
from axcnn.rewrite import (
    SharedWeight,
    decode,
    expand,
    is_shared_model,
    replace_weights,
    share_weights,
    shared_layers,
    verify,
    weight_arrays,
    write_model,
)

DECODE_OPS = {
    "Cast",
    "Div",
    "Mod",
    "Mul",
    "Sub",
    "MatMul",
    "ReduceSum",
    "Reshape",
    "Slice",
    "Gather",
    "Expand",
}
K_VALUES = [1, 2, 5, 16, 80, 256, 300]
DOMAIN = rewrite.FUNCTION_DOMAIN


# --------------------------------------------------------------------------------------------------
# tiny models


def _model(nodes, inputs, outputs, inits, opset=13, ir=7, inits_as_inputs=False):
    graph_inputs = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    if inits_as_inputs:
        graph_inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(
        nodes, "g", graph_inputs, [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def conv_gemm(rng):
    inits = [
        numpy_helper.from_array(_f32(rng, 4, 3, 3, 3), "conv.w"),
        numpy_helper.from_array(_f32(rng, 4), "conv.b"),
        numpy_helper.from_array(_f32(rng, 10, 144), "fc.w"),
        numpy_helper.from_array(_f32(rng, 10), "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], transB=1),
    ]
    model = _model(
        nodes, [("x", TensorProto.FLOAT, [1, 3, 6, 6])], [("y", TensorProto.FLOAT, [1, 10])], inits
    )
    return model, {"x": _f32(rng, 1, 3, 6, 6)}, ["conv.w", "fc.w"]


def depthwise(rng):
    inits = [
        numpy_helper.from_array(_f32(rng, 4, 1, 3, 3), "dw.w"),
        numpy_helper.from_array(_f32(rng, 4), "dw.b"),
    ]
    nodes = [helper.make_node("Conv", ["x", "dw.w", "dw.b"], ["y"], group=4, pads=[1, 1, 1, 1])]
    model = _model(
        nodes,
        [("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        inits,
        opset=11,
    )
    return model, {"x": _f32(rng, 1, 4, 6, 6)}, ["dw.w"]


def matmul(rng):
    inits = [numpy_helper.from_array(_f32(rng, 5, 7), "mm.w")]
    nodes = [helper.make_node("MatMul", ["x", "mm.w"], ["y"])]
    model = _model(
        nodes, [("x", TensorProto.FLOAT, [3, 5])], [("y", TensorProto.FLOAT, [3, 7])], inits, 17, 8
    )
    return model, {"x": _f32(rng, 3, 5)}, ["mm.w"]


def constant_node(rng):
    nodes = [
        helper.make_node("Constant", [], ["cw"], value=numpy_helper.from_array(_f32(rng, 6, 3))),
        helper.make_node("Constant", [], ["cb"], value_floats=[0.5, -1.0, 2.0]),
        helper.make_node("MatMul", ["x", "cw"], ["m"]),
        helper.make_node("Add", ["m", "cb"], ["y"]),
    ]
    model = _model(nodes, [("x", TensorProto.FLOAT, [2, 6])], [("y", TensorProto.FLOAT, [2, 3])], [])
    return model, {"x": _f32(rng, 2, 6)}, ["cw", "cb"]


def ir3_opset8(rng):
    inits = [numpy_helper.from_array(_f32(rng, 5, 3, 3, 3), "w"), numpy_helper.from_array(_f32(rng, 5), "b")]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    model = _model(
        nodes,
        [("x", TensorProto.FLOAT, [1, 3, 5, 5])],
        [("y", TensorProto.FLOAT, [1, 5, 5, 5])],
        inits,
        opset=8,
        ir=3,
        inits_as_inputs=True,
    )
    return model, {"x": _f32(rng, 1, 3, 5, 5)}, ["w"]


def opset8_ir7(rng):
    """Opset 8 on the function path: no int32 Constant, Mod or MatMul; Slice takes ``ends`` as an attribute."""
    model, feeds, names = ir3_opset8(rng)
    del model.graph.input[1:]
    model.ir_version = 7
    return model, feeds, names


def opset9_ir4(rng):
    model, feeds, names = opset8_ir7(rng)
    model.opset_import[0].version = 9
    model.ir_version = 4
    return model, feeds, names


def opset21(rng):
    inits = [
        numpy_helper.from_array(_f32(rng, 6, 3, 3, 3), "w21"),
        numpy_helper.from_array(_f32(rng, 6), "b21"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w21", "b21"], ["y"], pads=[1, 1, 1, 1])]
    model = _model(
        nodes,
        [("x", TensorProto.FLOAT, [1, 3, 5, 5])],
        [("y", TensorProto.FLOAT, [1, 6, 5, 5])],
        inits,
        21,
        10,
    )
    return model, {"x": _f32(rng, 1, 3, 5, 5)}, ["w21"]


def float16(rng):
    inits = [numpy_helper.from_array(rng.standard_normal((5, 7)).astype(np.float16), "h.w")]
    nodes = [helper.make_node("MatMul", ["x", "h.w"], ["y"])]
    model = _model(
        nodes, [("x", TensorProto.FLOAT16, [2, 5])], [("y", TensorProto.FLOAT16, [2, 7])], inits, 17, 8
    )
    return model, {"x": rng.standard_normal((2, 5)).astype(np.float16)}, ["h.w"]


def float64(rng):
    inits = [numpy_helper.from_array(rng.standard_normal((5, 16)), "d.w")]
    nodes = [helper.make_node("MatMul", ["x", "d.w"], ["y"])]
    model = _model(
        nodes, [("x", TensorProto.DOUBLE, [2, 5])], [("y", TensorProto.DOUBLE, [2, 16])], inits, 17, 8
    )
    return model, {"x": rng.standard_normal((2, 5))}, ["d.w"]


def one_element(rng):
    inits = [
        numpy_helper.from_array(_f32(rng, 1, 1, 1, 1), "one.w"),
        numpy_helper.from_array(np.array(1.5, dtype=np.float32), "scale"),
    ]
    nodes = [helper.make_node("Conv", ["x", "one.w"], ["c"]), helper.make_node("Mul", ["c", "scale"], ["y"])]
    model = _model(
        nodes, [("x", TensorProto.FLOAT, [1, 1, 4, 4])], [("y", TensorProto.FLOAT, [1, 1, 4, 4])], inits
    )
    return model, {"x": _f32(rng, 1, 1, 4, 4)}, ["one.w", "scale"]


MODELS = [
    conv_gemm,
    depthwise,
    matmul,
    constant_node,
    ir3_opset8,
    opset8_ir7,
    opset9_ir4,
    opset21,
    float16,
    float64,
    one_element,
]


def _clustering(model, names, k, rng):
    arrays = weight_arrays(model, names)
    return [
        SharedWeight(
            name,
            rng.standard_normal(k).astype(arr.dtype),
            rng.integers(0, k, size=arr.shape),
        )
        for name, arr in arrays.items()
    ]


def _session(model, optimized_path=None):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model, feeds, optimized_path=None):
    return _session(model, optimized_path).run(None, feeds)


def _expected_encoding(k, opset, ir):
    bits = max(k - 1, 0).bit_length()
    if k == 1:
        return "broadcast"
    if bits == 8:
        return "uint8"
    if bits == 4 and opset >= 21 and ir >= 10:
        return "uint4"
    return "planes"


def _opset(model):
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _constants(model, names):
    return [n for n in model.graph.node if n.op_type == "Constant" and set(n.output) & set(names)]


# --------------------------------------------------------------------------------------------------
# the main round trip


@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("build", MODELS, ids=lambda f: f.__name__)
def test_share_round_trip(build, k, tmp_path):
    rng = np.random.default_rng(1000 * MODELS.index(build) + k)
    model, feeds, names = build(rng)
    before = model.SerializeToString()
    shared = _clustering(model, names, k, rng)
    dense = replace_weights(model, {sw.name: sw.dense() for sw in shared})

    out, stored = share_weights(model, shared, metadata={"axcnn.tool": "test"})
    assert model.SerializeToString() == before  # input untouched
    onnx.checker.check_model(out, full_check=True)
    assert is_shared_model(out) and not is_shared_model(model)

    # onnxruntime output equals the dense clustered model's output, and the decode folds away
    got = _run(out, feeds, tmp_path / "opt_shared.onnx")
    want = _run(dense, feeds, tmp_path / "opt_dense.onnx")
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.max(np.abs(g.astype(np.float64) - w.astype(np.float64))) <= 1e-5
    opt_shared = onnx.load(str(tmp_path / "opt_shared.onnx"))
    opt_dense = onnx.load(str(tmp_path / "opt_dense.onnx"))
    assert not [n.name for n in opt_shared.graph.node if n.name.startswith("axcnn/") or n.domain == DOMAIN]
    count_shared = collections.Counter(n.op_type for n in opt_shared.graph.node if n.op_type in DECODE_OPS)
    count_dense = collections.Counter(n.op_type for n in opt_dense.graph.node if n.op_type in DECODE_OPS)
    assert count_shared == count_dense

    # numpy decode is bit-identical; verify passes (numpy and onnxruntime), fails on wrong indices
    decoded = decode(out)
    assert set(decoded) == set(names)
    for sw in shared:
        assert decoded[sw.name].dtype == sw.dense().dtype
        assert decoded[sw.name].tobytes() == sw.dense().tobytes()
    verify(out, shared)
    verify(out, shared, runtime=True)
    bad = shared[0]
    if k > 1:
        wrong = bad.indices.copy()
        wrong.flat[0] = (wrong.flat[0] + 1) % k
        bad = SharedWeight(bad.name, bad.centroids, wrong)
    else:
        bad = SharedWeight(bad.name, bad.centroids + np.ones(1, bad.centroids.dtype), bad.indices)
    with pytest.raises(AxcnnError, match=f"decoded weights of layer {bad.name} differ"):
        verify(out, [bad, *shared[1:]])

    # stored bytes and encodings
    opset, ir = _opset(model), model.ir_version
    records = {r["name"]: r for r in shared_layers(out)}
    for layer, sw in zip(stored, shared, strict=True):
        n, bits, width = sw.indices.size, layer.index_bits, sw.centroids.dtype.itemsize * 8
        assert layer.name == sw.name and layer.k == k and bits == max(k - 1, 0).bit_length()
        assert layer.encoding == _expected_encoding(k, opset, ir)
        assert layer.centroid_bytes == k * sw.centroids.dtype.itemsize
        assert layer.stored_bytes == layer.index_bytes + layer.centroid_bytes
        assert layer.stored_bytes <= 1.02 * (n * bits + k * width) / 8 + 16
        rec = records[sw.name]
        assert rec["k"] == k and rec["encoding"] == layer.encoding and rec["index_bits"] == bits
        assert rec["shape"] == list(sw.indices.shape) and rec["dtype"] == str(sw.centroids.dtype)
        assert rec["index_bytes"] == layer.index_bytes and rec["centroid_bytes"] == layer.centroid_bytes
        inits = {t.name: t for t in out.graph.initializer}
        assert rec["centroid_tensor"] in inits and sw.name not in inits
        if layer.encoding == "broadcast":
            assert rec["index_tensor"] is None and layer.index_bytes == 0
        else:
            assert len(inits[rec["index_tensor"]].raw_data) == layer.index_bytes
    # the weight name seen by consumers is unchanged: exactly one node produces it, a call of a model-local
    # decode function (IR >= 4; IR 4..7 is raised to 8), or the last inline decode node (IR < 4)
    producers = [n for n in out.graph.node if set(names) & set(n.output)]
    assert len(producers) == len(names)
    if ir >= 4:
        assert out.ir_version == max(ir, 8)
        assert all(n.domain == DOMAIN and not n.name for n in producers)
        assert len(out.graph.node) == len(model.graph.node) + len(names) - len(_constants(model, names))
        assert out.functions and {f.domain for f in out.functions} == {DOMAIN}
        assert (DOMAIN, 1) in [(o.domain, o.version) for o in out.opset_import]
    else:
        assert out.ir_version == ir and not out.functions
        assert all(n.name.startswith("axcnn/") for n in producers)
    assert not [n for n in out.graph.node if n.op_type == "Constant" and set(n.output) & set(names)]

    # weight_arrays of a shared model gives the decoded weights
    for name, arr in weight_arrays(out, names).items():
        assert arr.tobytes() == decoded[name].tobytes()

    # expand back to a dense model
    plain = expand(out)
    onnx.checker.check_model(plain, full_check=True)
    assert not is_shared_model(plain) and shared_layers(plain) == []
    assert not [n for n in plain.graph.node if n.name.startswith("axcnn/") or n.domain == DOMAIN]
    assert not plain.functions and DOMAIN not in [o.domain for o in plain.opset_import]
    assert plain.ir_version == model.ir_version  # the IR raised for the functions is restored
    assert not [p for p in plain.metadata_props if p.key.startswith("axcnn.")]
    assert {t.name for t in plain.graph.initializer} == {t.name for t in model.graph.initializer} | {
        sw.name for sw in shared
    }
    for name, arr in weight_arrays(plain, names).items():
        assert arr.tobytes() == decoded[name].tobytes()
    for g, w in zip(_run(plain, feeds), got, strict=True):
        assert np.max(np.abs(g.astype(np.float64) - w.astype(np.float64))) <= 1e-5


# --------------------------------------------------------------------------------------------------
# model-specific structure


def test_ir3_graph_inputs():
    rng = np.random.default_rng(3)
    model, _, names = ir3_opset8(rng)
    out, _ = share_weights(model, _clustering(model, names, 5, rng))
    inputs = {v.name for v in out.graph.input}
    assert "w" not in inputs and "b" in inputs and "x" in inputs
    assert {t.name for t in out.graph.initializer} <= inputs  # IR 3: every initializer is an input
    assert out.ir_version == 3
    ops = [n.op_type for n in out.graph.node if n.name.startswith("axcnn/")]
    assert "Mod" not in ops and "MatMul" not in ops  # neither exists for int32 at opset 8
    assert not out.functions and "Slice" in ops  # IR 3 cannot hold functions: the decode stays inline


def test_constant_weight_removed():
    rng = np.random.default_rng(4)
    model, _, names = constant_node(rng)
    out, _ = share_weights(model, _clustering(model, ["cw"], 5, rng))
    assert [n.output[0] for n in out.graph.node if n.op_type == "Constant"] == ["cb"]


def _ops(model):
    """Op types of the main graph and of the function bodies."""
    return [n.op_type for n in model.graph.node] + [n.op_type for f in model.functions for n in f.node]


def test_slice_path_for_odd_sizes():
    rng = np.random.default_rng(5)
    for build, opset in ((matmul, 17), (ir3_opset8, 8), (opset8_ir7, 8)):
        model, feeds, names = build(rng)
        shared = _clustering(model, names, 5, rng)
        out, stored = share_weights(model, shared)
        assert stored[0].encoding == "planes"
        assert "Slice" in _ops(out)  # 35 and 135 weights: n % 8 != 0
        assert _opset(out) == opset
        verify(out, shared, runtime=True)


def test_helpers_shared_across_layers():
    rng = np.random.default_rng(6)
    # inline path (IR 3): helper constants are initializers shared by all layers
    model, _, _ = ir3_opset8(rng)
    out, _ = share_weights(model, _clustering(model, ["w", "b"], 5, rng))
    init_names = [t.name for t in out.graph.initializer]
    assert len(init_names) == len(set(init_names))
    assert init_names.count("ax.p") == 1 and init_names.count("ax.v3") == 1
    node_names = [n.name for n in out.graph.node if n.name]
    assert len(node_names) == len(set(node_names))
    # function path: one function per recipe, its helper constants are Constant nodes in the body
    model, names = _big_conv(rng, layers=3, channels=16)
    model.graph.initializer.append(numpy_helper.from_array(_f32(rng, 5, 7), "odd"))  # 35 weights: Slice
    out, _ = share_weights(model, _clustering(model, [*names, "odd"], 5, rng))
    assert sorted(f.name for f in out.functions) == ["planes3", "planes3_n"]
    assert [n.op_type for n in out.graph.node if n.domain == DOMAIN] == ["planes3"] * 3 + ["planes3_n"]
    assert not [t for t in out.graph.initializer if t.name in ("ax.p", "ax.2", "ax.w3")]
    body = {n.output[0] for f in out.functions for n in f.node if n.op_type == "Constant"}
    assert {"p", "2", "w3"} <= body


def test_prefix_avoids_name_collisions():
    rng = np.random.default_rng(7)
    model, feeds, names = matmul(rng)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "ax0.q"))
    shared = _clustering(model, names, 5, rng)
    out, _ = share_weights(model, shared)
    onnx.checker.check_model(out, full_check=True)
    assert shared_layers(out)[0]["index_tensor"] == "ax_0.q"
    verify(out, shared, runtime=True)


# --------------------------------------------------------------------------------------------------
# sizes


def _big_conv(rng, opset=13, ir=7, layers=1, channels=64):
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(_f32(rng, channels, channels, 3, 3), f"conv{i}.weight"))
        nodes.append(helper.make_node("Conv", [prev, f"conv{i}.weight"], [f"y{i}"], pads=[1, 1, 1, 1]))
        prev = f"y{i}"
    io = [("x", TensorProto.FLOAT, [1, channels, 4, 4])]
    out = [(prev, TensorProto.FLOAT, [1, channels, 4, 4])]
    return _model(nodes, io, out, inits, opset, ir), [t.name for t in inits]


@pytest.mark.parametrize(("opset", "ir", "encoding"), [(13, 7, "planes"), (21, 10, "uint4")])
def test_written_file_shrinks(tmp_path, opset, ir, encoding):
    rng = np.random.default_rng(8)
    model, names = _big_conv(rng, opset, ir)
    shared = _clustering(model, names, 16, rng)
    out, stored = share_weights(model, shared)
    assert stored[0].encoding == encoding
    dense_bytes = write_model(model, tmp_path / "dense.onnx")
    shared_bytes = write_model(out, tmp_path / "shared.onnx")
    assert dense_bytes == os.path.getsize(tmp_path / "dense.onnx")
    assert shared_bytes == os.path.getsize(tmp_path / "shared.onnx")
    n = 64 * 64 * 3 * 3
    cr = n * 32 / (n * 4 + 16 * 32)  # Eq. 1
    assert 0.95 * cr <= dense_bytes / shared_bytes <= cr


def _overhead(model, names, k, rng, tmp_path):
    """Written bytes beyond the payload and the original's non-weight bytes, and the shared model."""
    out, stored = share_weights(model, _clustering(model, names, k, rng))
    weight_bytes = sum(len(t.SerializeToString()) for t in model.graph.initializer if t.name in names)
    base = write_model(model, tmp_path / "dense.onnx") - weight_bytes
    payload = sum(layer.stored_bytes for layer in stored)
    return write_model(out, tmp_path / "shared.onnx") - base - payload, out


def test_per_layer_overhead(tmp_path):
    rng = np.random.default_rng(9)
    layers = 20
    model, names = _big_conv(rng, layers=layers, channels=16)
    total, out = _overhead(model, names, 12, rng, tmp_path)
    assert out.functions and len(out.graph.node) == 2 * layers  # one call node + one Conv per layer
    assert total / layers < 150  # call node, tensor headers, metadata, the shared function and shape tensor
    # the inline decode of IR < 4 models costs more (small models only)
    model.ir_version = 3
    model.graph.input.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, [16, 16, 3, 3]) for n in names)
    model.opset_import[0].version = 8
    total, out = _overhead(model, names, 12, rng, tmp_path)
    assert not out.functions and total / layers < 600


def test_shape_and_count_tensors_deduplicated():
    rng = np.random.default_rng(19)
    model, names = _big_conv(rng, layers=4, channels=16)
    extra = {"a": (5, 7), "b": (7, 5), "c": (5, 7)}  # 35 weights each: one n tensor, two shapes
    model.graph.initializer.extend(numpy_helper.from_array(_f32(rng, *shape), name) for name, shape in extra.items())
    names = [*names, *extra]
    shared = _clustering(model, names, 6, rng)
    out, _ = share_weights(model, shared)
    int64 = [t for t in out.graph.initializer if t.data_type == TensorProto.INT64]
    shapes = sorted(tuple(numpy_helper.to_array(t)) for t in int64 if t.name.startswith("ax.s"))
    assert shapes == [(5, 7), (7, 5), (16, 16, 3, 3)]
    assert [list(numpy_helper.to_array(t)) for t in int64 if t.name.startswith("ax.n")] == [[35]]
    assert len(int64) == 4
    calls = {n.output[0]: list(n.input) for n in out.graph.node if n.domain == DOMAIN}
    assert calls["a"][2:] == calls["c"][2:] and calls["a"][3] == calls["b"][3] and calls["a"][2] != calls["b"][2]
    assert len({tuple(calls[n][2:]) for n in names[:4]}) == 1
    verify(out, shared, runtime=True)


def test_metadata_is_compact():
    rng = np.random.default_rng(20)
    model, names = _big_conv(rng, layers=3, channels=16)
    shared = _clustering(model, names, 12, rng)
    out, stored = share_weights(model, shared, {"axcnn.version": "x"})
    props = {p.key: p.value for p in out.metadata_props}
    value = props[rewrite.LAYERS_KEY]
    assert " " not in value
    assert json.loads(value) == {"layers": [[n, 12] for n in names], "ir": 7}  # IR 7 was raised to 8
    assert len(value) < 20 + sum(len(n) + 8 for n in names)
    # shared_layers rebuilds the full records from the graph
    records = shared_layers(out)
    assert [r["name"] for r in records] == names
    for rec, layer in zip(records, stored, strict=True):
        assert list(rec) == [
            "name",
            "k",
            "index_bits",
            "encoding",
            "shape",
            "dtype",
            "index_tensor",
            "centroid_tensor",
            "index_bytes",
            "centroid_bytes",
            "index_count",
            "granularity",
            "codebooks",
            "vector_dim",
            "axis",
            "group_size",
            "vector_axis",
        ]
        assert (rec["k"], rec["index_bits"], rec["encoding"]) == (12, 4, "planes")
        assert (rec["index_count"], rec["granularity"], rec["codebooks"], rec["vector_dim"]) == (2304, "layer", 1, 1)
        assert (rec["shape"], rec["dtype"]) == ([16, 16, 3, 3], "float32")
        assert (rec["index_bytes"], rec["centroid_bytes"]) == (layer.index_bytes, layer.centroid_bytes) == (1152, 48)
    # K in the metadata must agree with the graph
    broken = onnx.ModelProto()
    broken.CopyFrom(out)
    for p in broken.metadata_props:
        if p.key == rewrite.LAYERS_KEY:
            p.value = json.dumps({"layers": [[names[0], 11]]})
    with pytest.raises(AxcnnError, match="K=11"):
        shared_layers(broken)
    for bad in ('{"layers": [["w"]]}', "[1, 2]", "{"):
        for p in broken.metadata_props:
            if p.key == rewrite.LAYERS_KEY:
                p.value = bad
        with pytest.raises(AxcnnError, match=rewrite.LAYERS_KEY):
            shared_layers(broken)


# A model written by axcnn 0.1.0 before the decode functions (inline nodes axcnn/{i}/{j}, one shape tensor per
# layer, verbose axcnn.layers records): MatMul x[2, 5] @ w[5, 7] + b[7], w with K=5 (35 weights: Slice),
# b with K=1; zlib + base64 of the serialized model.
OLD_FORMAT = (
    "eNqNk81u00AQx71OnGyWNk0NKhWnduFAV2lqOx+VfKAlgJAi9VJuVBVaf7S1cNep7TaJUKUeOPIQXLjxDnDiDXgFXgO2O03cUA5Y"
    "Wm3mv78Z/3fGwVX3q0EYMfjYap2ZarMe1fjYF2LL2rJo+QXPclYjep6sVj4jnTwB1iJlPm4NIcMuMmxaehldTClbUQ5QTkE5tLSX"
    "BOQpUM711hq1AWsXWJtW9ni+dx5PybaqdwRgpwA7tLofZid8GJJNIDuKtCAQkNAtErrUeBNHfkg2gOjClgHYK8BeUfnmTj5sPRON"
    "CmybVl7z/CRMgbKBsmVB5E0pW7az8mo85CIgywSNCRqZ6HR2xTpBpwR5JprQ0vMgMNExW8dGA/XhrYMHmvb9m6Zpcl09k2tH/t5l"
    "a9jACJcaOmBng6Uf+3h1sO5vfPz0pYHKOnuIMUaNCqshvYwba7tXqK9Gx+5JEekqcJiJS4oqSaoP42ArUqm65Pf0gcQjtqh0pKnQ"
    "YnUIH4MDwZawLmPdqIKQsWUJqGvItgzK0vXONKcKavb2vuyHWScLGJmY6FiXy/CkOPlLrPbLRGsspitkUTW1dRGmWZTIAcuPrWWl"
    "v3SyAAcxn8gj86d+8IEKfhpSl45ok76nbrdJIxGE43delGfUbTdpKPwkiMSxZIYxF2EmQTVz6h50m9uHTRrkk+uIHsUJz9sOnZbI"
    "Q5ElqTxQzZeyH4o8TaJg/sSfJXiTXJZ37e4t9EZzrMvmzKsHXu15r9acVy9NeODL/+ctu/9jVpzH8b+d2nedWneNdi4P/wCZQRDu"
)


def test_reads_old_verbose_format():
    old = onnx.load_model_from_string(zlib.decompress(base64.b64decode(OLD_FORMAT)))
    centroids = np.array([-1.5, -0.5, 0.25, 1.0, 2.0], np.float32)
    want = {"w": centroids[(np.arange(35).reshape(5, 7) * 3) % 5], "b": np.full(7, 0.75, np.float32)}
    assert is_shared_model(old) and old.ir_version == 7 and not old.functions
    records = shared_layers(old)
    stored = json.loads(next(p.value for p in old.metadata_props if p.key == rewrite.LAYERS_KEY))
    # read as stored, completed with one codebook per layer
    assert [{k: r[k] for k in s} for r, s in zip(records, stored, strict=True)] == stored
    assert [r["name"] for r in records] == ["w", "b"] and [r["index_count"] for r in records] == [35, 7]
    assert all((r["granularity"], r["codebooks"], r["vector_dim"]) == ("layer", 1, 1) for r in records)
    assert records[0]["encoding"] == "planes" and records[1]["encoding"] == "broadcast"
    decoded = decode(old)
    assert all(decoded[name].tobytes() == arr.tobytes() for name, arr in want.items())
    verify(old, [SharedWeight("w", centroids, (np.arange(35).reshape(5, 7) * 3) % 5)], runtime=True)
    plain = expand(old)
    onnx.checker.check_model(plain, full_check=True)
    assert {t.name for t in plain.graph.initializer} == {"w", "b"} and len(plain.graph.node) == 2
    assert not [p for p in plain.metadata_props if p.key.startswith("axcnn.")] and plain.ir_version == 7
    x = _f32(np.random.default_rng(21), 2, 5)
    (got,) = _run(old, {"x": x})
    assert np.allclose(got, x @ want["w"] + want["b"], atol=1e-5)
    assert np.array_equal(_run(plain, {"x": x})[0], got)


def test_ir_version_and_decode_path(caplog):
    rng = np.random.default_rng(22)
    for ir, opset, raised in ((4, 9, True), (7, 13, True), (8, 17, False), (10, 21, False)):
        model, names = _big_conv(rng, opset=opset, ir=ir, channels=8)
        with caplog.at_level(logging.INFO, logger="axcnn.rewrite"):
            caplog.clear()
            out, _ = share_weights(model, _clustering(model, names, 3, rng))
        assert out.ir_version == max(ir, 8) and len(out.functions) == 1
        assert ("raising the IR version" in caplog.text) == raised
        meta = json.loads(next(p.value for p in out.metadata_props if p.key == rewrite.LAYERS_KEY))
        assert meta.get("ir") == (ir if raised else None)
        assert expand(out).ir_version == ir
    model, _, names = ir3_opset8(rng)
    out, _ = share_weights(model, _clustering(model, names, 3, rng))
    assert out.ir_version == 3 and not out.functions
    assert DOMAIN not in [o.domain for o in out.opset_import]
    assert all(n.name.startswith("axcnn/") for n in out.graph.node[:-2])


def test_expand_function_path_is_clean(tmp_path):
    rng = np.random.default_rng(23)
    model, names = _big_conv(rng, layers=3, channels=16)
    model.graph.initializer.append(numpy_helper.from_array(_f32(rng, 5, 7), "odd"))
    model.graph.initializer.append(numpy_helper.from_array(_f32(rng, 2, 3), "flat"))
    model.graph.initializer.append(numpy_helper.from_array(np.float32(2.5), "scalar"))
    names = [*names, "odd", "flat", "scalar"]
    shared = [*_clustering(model, names[:4], 7, rng), *_clustering(model, names[4:], 1, rng)]
    out, _ = share_weights(model, shared)
    assert sorted(f.name for f in out.functions) == ["broadcast", "broadcast0", "planes3", "planes3_n"]
    plain = expand(out)
    onnx.checker.check_model(plain, full_check=True)
    assert not plain.functions and not [n for n in plain.graph.node if n.domain == DOMAIN]
    assert [(o.domain, o.version) for o in plain.opset_import] == [("", 13)] and plain.ir_version == 7
    assert [n.SerializeToString() for n in plain.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert sorted(t.name for t in plain.graph.initializer) == sorted(names)
    dense = replace_weights(model, {sw.name: sw.dense() for sw in shared})
    assert write_model(plain, tmp_path / "p.onnx") == write_model(dense, tmp_path / "d.onnx")
    x = _f32(rng, 1, 16, 4, 4)
    assert np.array_equal(_run(plain, {"x": x})[0], _run(dense, {"x": x})[0])
    assert np.array_equal(_run(out, {"x": x})[0], _run(dense, {"x": x})[0])


def test_function_domain_collision():
    rng = np.random.default_rng(24)
    model, _, names = matmul(rng)
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    with pytest.raises(AxcnnError, match="function domain"):
        share_weights(model, _clustering(model, names, 5, rng))


# --------------------------------------------------------------------------------------------------
# metadata, inputs, errors


def test_metadata_merges_and_input_untouched():
    rng = np.random.default_rng(10)
    model, _, names = matmul(rng)
    helper.set_model_props(model, {"producer.note": "keep", "axcnn.tool": "old"})
    before = model.SerializeToString()
    out, _ = share_weights(model, _clustering(model, names, 5, rng), {"axcnn.tool": "new", "axcnn.k": "5"})
    assert model.SerializeToString() == before
    keys = [p.key for p in out.metadata_props]
    assert len(keys) == len(set(keys))
    props = {p.key: p.value for p in out.metadata_props}
    assert props["producer.note"] == "keep" and props["axcnn.tool"] == "new" and props["axcnn.k"] == "5"
    assert json.loads(props["axcnn.layers"])["layers"] == [["mm.w", 5]]
    plain = expand(out)
    assert {p.key: p.value for p in plain.metadata_props} == {"producer.note": "keep"}


def test_shared_layers_on_plain_model():
    model, _, _ = matmul(np.random.default_rng(11))
    assert not is_shared_model(model)
    assert shared_layers(model) == []
    assert decode(model) == {}
    assert expand(model).SerializeToString() == model.SerializeToString()


def test_errors():
    rng = np.random.default_rng(12)
    model, _, names = matmul(rng)
    (sw,) = _clustering(model, names, 5, rng)
    with pytest.raises(AxcnnError, match="nope"):
        share_weights(model, [SharedWeight("nope", sw.centroids, sw.indices)])
    with pytest.raises(ValueError, match="shape"):
        share_weights(model, [SharedWeight("mm.w", sw.centroids, sw.indices.T)])
    with pytest.raises(ValueError, match="outside"):
        share_weights(model, [SharedWeight("mm.w", sw.centroids, sw.indices + 5)])
    with pytest.raises(ValueError, match="dtype"):
        share_weights(model, [SharedWeight("mm.w", sw.centroids.astype(np.float64), sw.indices)])
    with pytest.raises(ValueError, match="integers"):
        SharedWeight("mm.w", sw.centroids, sw.indices.astype(np.float32))
    out, _ = share_weights(model, [sw])
    with pytest.raises(AxcnnError, match="already weight-shared"):
        share_weights(out, [sw])
    with pytest.raises(AxcnnError, match="not weight-shared"):
        verify(out, [SharedWeight("other", sw.centroids, sw.indices)])
    old = helper.make_model(model.graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)
    with pytest.raises(AxcnnError, match="too old"):
        share_weights(old, [sw])
    with pytest.raises(ValueError, match="dtype"):
        replace_weights(model, {"mm.w": sw.dense().astype(np.float64)})
    with pytest.raises(ValueError, match="shape"):
        replace_weights(model, {"mm.w": sw.dense().T})
    with pytest.raises(AxcnnError):
        weight_arrays(model, ["nope"])


def test_replace_weights_constant_and_copy():
    rng = np.random.default_rng(13)
    model, _, _ = constant_node(rng)
    before = model.SerializeToString()
    new = {"cw": np.ones((6, 3), np.float32), "cb": np.zeros(3, np.float32)}
    out = replace_weights(model, new)
    assert model.SerializeToString() == before
    got = weight_arrays(out, ["cw", "cb"])
    assert all(np.array_equal(got[k], v) for k, v in new.items())
    onnx.checker.check_model(out, full_check=True)


def test_bfloat16_weight():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(18)
    weight = rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    nodes = [helper.make_node("Identity", ["bw"], ["y"])]
    model = _model(nodes, [], [("y", TensorProto.BFLOAT16, [3, 5])], [numpy_helper.from_array(weight, "bw")])
    centroids = rng.standard_normal(5).astype(ml_dtypes.bfloat16)
    for given in (centroids, centroids.view(np.uint16)):  # bfloat16 values, or their stored bit patterns
        sw = SharedWeight("bw", given, rng.integers(0, 5, size=(3, 5)))
        out, stored = share_weights(model, [sw])
        onnx.checker.check_model(out, full_check=True)
        assert stored[0].centroid_bytes == 10 and shared_layers(out)[0]["dtype"] == "bfloat16"
        assert decode(out)["bw"].tobytes() == centroids[sw.indices].tobytes()
        verify(out, [sw], runtime=True)  # the onnxruntime check skips bfloat16 (no numpy type in ORT)
