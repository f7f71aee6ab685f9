"""Tests for the encodings by channel group, by kernel and of vectors (axcnn.rewrite): every one passes the checker,
runs in onnxruntime like the dense model, folds away, decodes bit for bit, reads back and expands."""

from __future__ import annotations

import collections
import json
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from axcnn import rewrite
from axcnn.errors import AxcnnError
from axcnn.inspect import describe, render
from axcnn.rewrite import (
    SharedWeight,
    decode,
    eq1_bits,
    expand,
    replace_weights,
    share_weights,
    shared_layers,
    verify,
    weight_arrays,
    write_model,
)

DOMAIN = rewrite.FUNCTION_DOMAIN
DECODE_OPS = {"Cast", "Div", "Mod", "Mul", "Sub", "Add", "MatMul", "ReduceSum", "Reshape", "Slice", "Gather",
              "Expand", "Shape", "Transpose"}
# (opset, IR): every ONNX op set the rewrite supports differently, and IR 3 (no functions: inline decode nodes)
OPSETS = [(8, 3), (8, 7), (13, 7), (21, 10)]
K_VALUES = [1, 2, 5, 16, 256]


# --------------------------------------------------------------------------------------------------
# a model with a Conv [6, 4, 3, 3], a Gemm [10, 150] (transB: [out, in]) and a MatMul [10, 7] ([in, out])

OUT_AXIS = {"conv.w": 0, "fc.w": 0, "mm.w": 1}  # the output-channel axis of each weight
IN_AXIS = {"conv.w": 1, "fc.w": 1, "mm.w": 0}  # the input-channel axis


def _with_ir(graph, opset, ir):
    if ir < 4:  # IR 3 lists every initializer as a graph input
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


def three_layers(rng, opset=13, ir=7):
    f32 = np.float32
    inits = [
        numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(f32), "conv.w"),
        numpy_helper.from_array(rng.standard_normal(6).astype(f32), "conv.b"),
        numpy_helper.from_array(rng.standard_normal((10, 150)).astype(f32), "fc.w"),
        numpy_helper.from_array(rng.standard_normal(10).astype(f32), "fc.b"),  # Gemm before opset 11 needs C
        numpy_helper.from_array(rng.standard_normal((10, 7)).astype(f32), "mm.w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["g"], transB=1),
        helper.make_node("MatMul", ["g", "mm.w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7])],
        inits,
    )
    return _with_ir(graph, opset, ir), {"x": rng.standard_normal((2, 4, 5, 5)).astype(f32)}


def clustering(rng, name, weight, k, granularity="layer", *, repeat=False, **kw):
    """A random clustering of ``weight`` in the given form; ``repeat``: codebooks padded by repeated entries (a
    group with fewer distinct values than K)."""
    vd = kw.get("vector_dim", 1)
    index_shape = list(weight.shape)
    if vd > 1:
        va = kw["vector_axis"] % weight.ndim
        index_shape[va] = -(-index_shape[va] // vd)
    if granularity == "channel":
        rows = -(-weight.shape[kw.get("axis", 0)] // kw.get("group_size", 1))
    elif granularity == "kernel":
        rows = weight.shape[0] * weight.shape[1]
    else:
        rows = None
    shape = (k, vd) if vd > 1 else (k,) if rows is None else (rows, k)
    centroids = rng.standard_normal(shape).astype(weight.dtype)
    if repeat and k > 1:  # two distinct values per codebook, repeated up to K entries
        centroids = np.take(centroids, np.arange(k) % 2, axis=0 if rows is None else 1)
    return SharedWeight(name, centroids, rng.integers(0, k, size=index_shape), granularity=granularity, **kw)


# each spec: weight name -> keyword arguments of its clustering (a name left out is not shared)
SPECS = {
    "channel-1": {n: {"granularity": "channel", "axis": OUT_AXIS[n], "group_size": 1} for n in OUT_AXIS},
    "channel-4": {n: {"granularity": "channel", "axis": OUT_AXIS[n], "group_size": 4} for n in OUT_AXIS},  # 6, 10, 7
    "channel-wide": {n: {"granularity": "channel", "axis": OUT_AXIS[n], "group_size": 64} for n in OUT_AXIS},
    "channel-neg-axis": {"mm.w": {"granularity": "channel", "axis": -1, "group_size": 3}},
    "kernel": {"conv.w": {"granularity": "kernel"}, "fc.w": {"granularity": "channel", "group_size": 3}},
    "vector-2": {n: {"vector_dim": 2, "vector_axis": IN_AXIS[n]} for n in IN_AXIS},  # 4/2, 150/2, 10/2: no padding
    "vector-3": {n: {"vector_dim": 3, "vector_axis": IN_AXIS[n]} for n in IN_AXIS},  # 4 and 10: padded; 150/3
    "vector-wide": {n: {"vector_dim": 16, "vector_axis": IN_AXIS[n]} for n in IN_AXIS},  # one padded vector (4, 10)
    "vector-out-axis": {"conv.w": {"vector_dim": 4, "vector_axis": 0}, "mm.w": {"vector_dim": 3, "vector_axis": -1}},
    "mixed": {"conv.w": {"vector_dim": 2, "vector_axis": 1}, "fc.w": {"granularity": "channel", "group_size": 3},
              "mm.w": {}},
}


def _session(model, optimized_path=None):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _decode_ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node if n.op_type in DECODE_OPS)


def _expected_encoding(k, opset, ir):
    bits = max(k - 1, 0).bit_length()
    if k == 1:
        return "broadcast"
    if bits == 8:
        return "uint8"
    return "uint4" if bits == 4 and opset >= 21 and ir >= 10 else "planes"


def check_shared_model(model, feeds, shared, tmp_path, opset=13, ir=7):
    """Everything a shared model must satisfy (module docstring); returns the shared model."""
    arrays = weight_arrays(model, [sw.name for sw in shared])
    dense = replace_weights(model, {sw.name: sw.dense(arrays[sw.name].shape) for sw in shared})
    out, stored = share_weights(model, shared)
    onnx.checker.check_model(out, full_check=True)

    # onnxruntime runs it like the dense clustered model, and folds the decode away
    got = _session(out, tmp_path / "opt_shared.onnx").run(None, feeds)
    want = _session(dense, tmp_path / "opt_dense.onnx").run(None, feeds)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and np.max(np.abs(g - w)) <= 1e-5 * max(1.0, float(np.max(np.abs(w))))
    opt = onnx.load(str(tmp_path / "opt_shared.onnx"))
    assert not [n for n in opt.graph.node if n.domain == DOMAIN]
    assert _decode_ops(tmp_path / "opt_shared.onnx") == _decode_ops(tmp_path / "opt_dense.onnx")

    # the decode is bit-exact, by the reference evaluator and by onnxruntime
    decoded = decode(out)
    for sw in shared:
        expected = sw.dense(arrays[sw.name].shape)
        assert decoded[sw.name].shape == arrays[sw.name].shape and decoded[sw.name].tobytes() == expected.tobytes()
    verify(out, shared, runtime=True)

    # records, read back from the file's bytes, and what was stored
    records = {r["name"]: r for r in shared_layers(onnx.load_model_from_string(out.SerializeToString()))}
    for layer, sw in zip(stored, shared, strict=True):
        rec = records[sw.name]
        weight = arrays[sw.name]
        granularity = sw.granularity
        group_size = min(sw.group_size, weight.shape[sw.axis]) if granularity == "channel" else 1
        assert rec["shape"] == list(weight.shape) and rec["dtype"] == str(weight.dtype)
        assert (rec["k"], rec["index_bits"], rec["encoding"]) == (sw.k, layer.index_bits, layer.encoding)
        assert layer.encoding == _expected_encoding(sw.k, opset, ir)
        assert rec["granularity"] == layer.granularity == granularity
        assert rec["codebooks"] == layer.codebooks == sw.codebooks
        assert rec["vector_dim"] == layer.vector_dim == sw.vector_dim
        assert rec["index_count"] == layer.index_count == sw.indices.size
        assert rec["group_size"] == layer.group_size == group_size
        assert rec["axis"] == layer.axis == (sw.axis if granularity == "channel" else 0)
        assert rec["vector_axis"] == layer.vector_axis == (sw.vector_axis if sw.vector_dim > 1 else 1)
        assert (rec["index_bytes"], rec["centroid_bytes"]) == (layer.index_bytes, layer.centroid_bytes)
        # the payload is Eq. 1 (up to the last byte of each bit plane), every codebook counted
        width = weight.dtype.itemsize * 8
        eq1 = eq1_bits(sw.indices.size, sw.k, width, codebooks=sw.codebooks, vector_dim=sw.vector_dim)
        assert eq1 == sw.eq1_bits(width) == layer.eq1_bits(width)
        assert layer.centroid_bytes == sw.codebooks * sw.k * sw.vector_dim * weight.dtype.itemsize
        assert layer.index_bytes <= -(-sw.indices.size * layer.index_bits // 8) + layer.index_bits

    # expand gives the dense clustered model back
    plain = expand(out)
    onnx.checker.check_model(plain, full_check=True)
    assert not plain.functions and not rewrite.is_shared_model(plain)
    assert not [n for n in plain.graph.node if n.name.startswith(rewrite.NODE_PREFIX)]
    if ir < 4:  # inline decode nodes, their tensors listed as graph inputs; expand leaves the weights as inputs
        assert not out.functions and {t.name for t in out.graph.initializer} <= {v.name for v in out.graph.input}
        assert {t.name for t in plain.graph.initializer} <= {v.name for v in plain.graph.input}
    assert plain.ir_version == model.ir_version
    for name, arr in weight_arrays(plain, list(arrays)).items():
        assert arr.tobytes() == decoded[name].tobytes()
    for g, w in zip(_session(plain).run(None, feeds), got, strict=True):
        assert np.array_equal(g, w)
    return out


# --------------------------------------------------------------------------------------------------
# every form, every index encoding, at every supported opset


@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize(("opset", "ir"), OPSETS, ids=lambda v: str(v))
def test_round_trip(spec, k, opset, ir, tmp_path):
    rng = np.random.default_rng(zlib.crc32(f"{spec} {k} {opset}".encode()))
    model, feeds = three_layers(rng, opset, ir)
    arrays = weight_arrays(model, list(SPECS[spec]))
    shared = [clustering(rng, name, arrays[name], k, **kw) for name, kw in SPECS[spec].items()]
    check_shared_model(model, feeds, shared, tmp_path, opset, ir)


@pytest.mark.parametrize("spec", ["channel-4", "kernel", "vector-3"])
def test_k_at_least_the_distinct_values(spec, tmp_path):
    """K above the weights of a codebook (K=300 for 9-weight kernels) and codebooks padded with repeated entries."""
    rng = np.random.default_rng(5)
    model, feeds = three_layers(rng)
    arrays = weight_arrays(model, list(SPECS[spec]))
    for k, repeat in ((300, False), (16, True)):
        shared = [clustering(rng, n, arrays[n], k, repeat=repeat, **kw) for n, kw in SPECS[spec].items()]
        check_shared_model(model, feeds, shared, tmp_path)


def one_element(rng, opset=13, ir=7):
    inits = [numpy_helper.from_array(rng.standard_normal((1, 1, 1, 1)).astype(np.float32), "one.w")]
    nodes = [helper.make_node("Conv", ["x", "one.w"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3, 3])],
        inits,
    )
    return _with_ir(graph, opset, ir), {"x": rng.standard_normal((1, 1, 3, 3)).astype(np.float32)}


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize(
    "kw",
    [
        {"granularity": "channel"},
        {"granularity": "channel", "axis": 3, "group_size": 5},
        {"granularity": "kernel"},
        {"vector_dim": 2, "vector_axis": 1},  # one padded vector
        {"vector_dim": 3, "vector_axis": 3},
    ],
    ids=str,
)
@pytest.mark.parametrize(("opset", "ir"), OPSETS, ids=lambda v: str(v))
def test_one_element_weight(kw, k, opset, ir, tmp_path):
    rng = np.random.default_rng(7)
    model, feeds = one_element(rng, opset, ir)
    weight = weight_arrays(model, ["one.w"])["one.w"]
    check_shared_model(model, feeds, [clustering(rng, "one.w", weight, k, **kw)], tmp_path, opset, ir)


# --------------------------------------------------------------------------------------------------
# structure and sizes


def test_ramps_are_shared_and_tiny():
    """The codebook offsets come from int32 ramps shared by every layer of the same shape, whatever its K."""
    rng = np.random.default_rng(8)
    inits, nodes, prev = [], [], "x"
    for i in range(4):
        inits.append(numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"y{i}"], pads=[1, 1, 1, 1]))
        prev = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 4, 4])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 16, 4, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    arrays = weight_arrays(model, ["w0", "w1", "w2", "w3"])
    shared = [
        clustering(rng, "w0", arrays["w0"], 4, "channel", group_size=4),
        clustering(rng, "w1", arrays["w1"], 16, "channel", group_size=4),
        clustering(rng, "w2", arrays["w2"], 5, "kernel"),
        clustering(rng, "w3", arrays["w3"], 9, "kernel"),
    ]
    out, _ = share_weights(model, shared)
    ramps = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer if t.name.startswith("ax.r")}
    assert sorted(r.shape for r in ramps.values()) == [(16, 1, 1), (16, 1, 1, 1), (16, 1, 1, 1)]
    assert sum(r.size for r in ramps.values()) == 48  # C for the channel groups, O + I for the kernels
    calls = {n.output[0]: n for n in out.graph.node if n.domain == DOMAIN}
    assert calls["w0"].input[3] == calls["w1"].input[3]  # K=4 and K=16 share the ramp
    assert sorted(f.name for f in out.functions) == ["planes2_channel", "planes3_kernel", "planes4_channel",
                                                     "planes4_kernel"]
    assert json.loads(next(p.value for p in out.metadata_props if p.key == rewrite.LAYERS_KEY))["layers"] == [
        ["w0", 4], ["w1", 16], ["w2", 5], ["w3", 9]]  # the graph tells the rest


def _big_conv(rng, channels=64, layers=1):
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3)).astype(np.float32),
                                             f"conv{i}.weight"))
        nodes.append(helper.make_node("Conv", [prev, f"conv{i}.weight"], [f"y{i}"], pads=[1, 1, 1, 1]))
        prev = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, channels, 4, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


@pytest.mark.parametrize(
    ("k", "kw"),
    [
        (16, {"granularity": "channel", "group_size": 4}),
        (16, {"granularity": "channel", "group_size": 1}),
        (4, {"granularity": "kernel"}),
        (64, {"vector_dim": 2, "vector_axis": 1}),
        (256, {"vector_dim": 2, "vector_axis": 1}),
    ],
    ids=str,
)
def test_written_file_is_eq1(tmp_path, k, kw):
    """The written file's compression ratio is within 5 % of Eq. 1's (every codebook counted)."""
    rng = np.random.default_rng(9)
    model = _big_conv(rng)
    weight = weight_arrays(model, ["conv0.weight"])["conv0.weight"]
    sw = clustering(rng, "conv0.weight", weight, k, **kw)
    out, _ = share_weights(model, [sw])
    dense_bytes = write_model(model, tmp_path / "dense.onnx")
    shared_bytes = write_model(out, tmp_path / "shared.onnx")
    cr = weight.size * 32 / sw.eq1_bits(32)
    assert 0.95 * cr <= dense_bytes / shared_bytes <= cr


def test_inspect_reports_the_sharing(tmp_path):
    rng = np.random.default_rng(10)
    model, _ = three_layers(rng)
    arrays = weight_arrays(model, list(SPECS["mixed"]))
    shared = [clustering(rng, n, arrays[n], 8, **kw) for n, kw in SPECS["mixed"].items()]
    out, _ = share_weights(model, shared)
    info = describe(out)
    rows = {t["name"]: t for t in info["tensors"] if t["shared"]}
    assert (rows["conv.w"]["granularity"], rows["conv.w"]["vector_dim"]) == ("layer", 2)
    assert (rows["fc.w"]["granularity"], rows["fc.w"]["codebooks"], rows["fc.w"]["group_size"]) == ("channel", 4, 3)
    for sw in shared:
        assert rows[sw.name]["eq1_bits"] == sw.eq1_bits(32)
        assert rows[sw.name]["compression_ratio"] == pytest.approx(arrays[sw.name].size * 32 / sw.eq1_bits(32))
    total = sum(a.size for a in arrays.values()) * 32 / sum(sw.eq1_bits(32) for sw in shared)
    assert info["compression_ratio"] == pytest.approx(total)
    text = render(info)
    assert "vector2" in text and "channel/3" in text and "layer" in text


# --------------------------------------------------------------------------------------------------
# dense(), validation, errors


def test_dense_forms():
    c = np.array([[0.0, 1.0], [10.0, 11.0], [20.0, 21.0]], np.float32)
    idx = np.array([[0, 1], [1, 1], [0, 0], [1, 0], [0, 1]])  # 5 output channels (axis 0), groups of 2: 3 codebooks
    sw = SharedWeight("w", c, idx, granularity="channel", group_size=2)
    assert sw.k == 2 and sw.codebooks == 3 and sw.index_count == 10
    assert sw.dense().tolist() == [[0, 1], [1, 1], [10, 10], [11, 10], [20, 21]]
    assert sw.eq1_bits(32) == 10 * 1 + 3 * 2 * 32
    sw = SharedWeight("w", c[:2], idx.T, granularity="channel", axis=-1, group_size=3)  # axis 1 of [2, 5]
    assert sw.axis == 1 and sw.dense().tolist() == [[0, 1, 0, 11, 10], [1, 1, 0, 10, 11]]
    kernel = SharedWeight("k", np.arange(12, dtype=np.float32).reshape(6, 2), np.ones((2, 3, 1, 2), np.int64),
                          granularity="kernel")
    assert kernel.codebooks == 6 and kernel.dense()[1, 2, 0].tolist() == [11, 11]  # row o * I + i = 5
    vec = SharedWeight("v", np.array([[1, 2, 3], [4, 5, 6]], np.float32), np.array([[0, 1], [1, 0]]),
                       vector_dim=3, vector_axis=1)
    assert vec.dense().tolist() == [[1, 2, 3, 4, 5, 6], [4, 5, 6, 1, 2, 3]]
    assert vec.dense((2, 5)).tolist() == [[1, 2, 3, 4, 5], [4, 5, 6, 1, 2]]  # the padding dropped
    assert vec.index_shape((2, 5)) == (2, 2) and vec.eq1_bits(32) == 4 * 1 + 2 * 3 * 32
    col = SharedWeight("v", np.array([[1, 2], [3, 4]], np.float32), np.array([[0], [1]]), vector_dim=2,
                       vector_axis=0)
    assert col.dense().tolist() == [[1], [2], [3], [4]] and col.dense((3, 1)).tolist() == [[1], [2], [3]]


@pytest.mark.parametrize(
    ("centroids", "indices", "kw", "message"),
    [
        ((4,), (3, 3), {"granularity": "group"}, "granularity of 'w' must be one of layer, channel, kernel"),
        ((2, 4), (3, 3), {"granularity": "channel", "group_size": 0}, "group_size of 'w' must be an integer >= 1"),
        ((2, 4), (3, 3), {"granularity": "channel", "group_size": 2.5}, "group_size of 'w' must be an integer"),
        ((4, 2), (3, 3), {"vector_dim": 0}, "vector_dim of 'w' must be an integer >= 1, not 0"),
        ((3, 4), (3, 3), {"granularity": "channel", "vector_dim": 2}, "vectors need granularity 'layer'"),
        ((3, 4), (3, 3), {"granularity": "channel", "axis": 2}, r"axis of 'w' must be an axis in \[-2, 2\)"),
        ((4, 2), (3, 3), {"vector_dim": 2, "vector_axis": 5}, r"vector_axis of 'w' must be an axis in \[-2, 2\)"),
        ((4,), (3, 3), {"granularity": "channel", "group_size": 2}, r"centroids of 'w' must be .* \[2, K\]"),
        ((9, 4), (3, 3), {"granularity": "kernel"}, "kernel granularity needs a weight of rank >= 3"),
        ((5, 4), (3, 2, 1), {"granularity": "kernel"}, r"\[6, K\] \(one codebook per kernel\)"),
        ((4, 3), (3, 3), {"vector_dim": 2}, r"must be non-empty and of shape \[K, 2\]"),
        ((4, 2), (3,), {}, r"must be non-empty and of shape \[K\]"),
        ((0,), (3,), {}, "must be non-empty"),
    ],
)
def test_shared_weight_validation(centroids, indices, kw, message):
    with pytest.raises(ValueError, match=message):
        SharedWeight("w", np.zeros(centroids, np.float32), np.zeros(indices, np.int64), **kw)


def test_share_errors():
    rng = np.random.default_rng(11)
    model, _ = three_layers(rng)
    conv = weight_arrays(model, ["conv.w"])["conv.w"]
    weight_shaped = SharedWeight("conv.w", np.zeros((4, 2), np.float32), np.zeros(conv.shape, np.int64),
                                 vector_dim=2)
    with pytest.raises(ValueError, match=r"indices of 'conv.w' have shape \(6, 4, 3, 3\), expected \(6, 2, 3, 3\)"):
        share_weights(model, [weight_shaped])
    bad = clustering(rng, "conv.w", conv, 4, "channel", group_size=4)
    bad = SharedWeight("conv.w", bad.centroids, bad.indices + 4, granularity="channel", group_size=4)
    with pytest.raises(ValueError, match="outside"):
        share_weights(model, [bad])


@pytest.mark.parametrize("spec", ["channel-4", "kernel", "vector-3"])
def test_verify_catches_one_wrong_entry(spec):
    """A single wrong entry of the LAST codebook, or a single wrong index, fails verification."""
    rng = np.random.default_rng(12)
    model, _ = three_layers(rng)
    arrays = weight_arrays(model, list(SPECS[spec]))
    shared = [clustering(rng, n, arrays[n], 5, **kw) for n, kw in SPECS[spec].items()]
    out, _ = share_weights(model, shared)
    verify(out, shared)
    sw = shared[0]
    fields = {"granularity": sw.granularity, "axis": sw.axis, "group_size": sw.group_size,
              "vector_dim": sw.vector_dim, "vector_axis": sw.vector_axis}
    centroids = sw.centroids.copy()
    last = sw.indices.flat[-1]
    if sw.vector_dim > 1:
        centroids[sw.indices.flat[0], 0] += 1  # the first weight: never padding
    else:  # the entry the last weight uses, in the last codebook
        row = np.broadcast_to(sw.codebook_ids(), sw.indices.shape).flat[-1]
        assert row == sw.codebooks - 1
        centroids[row, last] += 1
    indices = sw.indices.copy()
    indices.flat[0] = (indices.flat[0] + 1) % 5
    for wrong in (SharedWeight(sw.name, centroids, sw.indices, **fields),
                  SharedWeight(sw.name, sw.centroids, indices, **fields)):
        with pytest.raises(AxcnnError, match=f"decoded weights of layer {sw.name} differ"):
            verify(out, [wrong, *shared[1:]])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_other_float_types(dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    np_type = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(13)
    weight = rng.standard_normal((4, 5)).astype(np_type)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(np_type))
    output = helper.make_tensor_value_info("y", elem, [4, 5])
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [output],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    for sw in (clustering(rng, "w", weight, 3, "channel", group_size=3),
               clustering(rng, "w", weight, 3, vector_dim=2, vector_axis=1)):
        out, _ = share_weights(model, [sw])
        onnx.checker.check_model(out, full_check=True)
        assert shared_layers(out)[0]["dtype"] == dtype
        assert decode(out)["w"].tobytes() == sw.dense(weight.shape).tobytes()
        verify(out, [sw], runtime=True)  # the onnxruntime check skips bfloat16 (no numpy type in ORT)
        assert weight_arrays(expand(out), ["w"])["w"].tobytes() == sw.dense(weight.shape).tobytes()


def test_inline_decode_names_its_recipe():
    """IR 3 has no functions: the decode nodes are inline, and the final one is named after its recipe, which the
    reader replays to find the roles; a decode that does not match the recipe is refused."""
    rng = np.random.default_rng(14)
    model, _ = three_layers(rng, 8, 3)
    arrays = weight_arrays(model, ["conv.w", "fc.w", "mm.w"])
    shared = [clustering(rng, "conv.w", arrays["conv.w"], 5, "kernel"),
              clustering(rng, "fc.w", arrays["fc.w"], 3, vector_dim=4, vector_axis=1),
              clustering(rng, "mm.w", arrays["mm.w"], 2)]
    out, _ = share_weights(model, shared)
    finals = {n.output[0]: n.name for n in out.graph.node if n.output[0] in arrays}
    assert finals == {"conv.w": "axcnn/0/planes3_kernel", "fc.w": "axcnn/1/planes2_n_vector_pad",
                      "mm.w": "axcnn/2/10"}  # layer granularity: named as it always was
    records = {r["name"]: r for r in shared_layers(out)}
    assert (records["conv.w"]["granularity"], records["conv.w"]["codebooks"]) == ("kernel", 24)
    fc = records["fc.w"]
    assert (fc["vector_dim"], fc["vector_axis"], fc["shape"], fc["index_count"]) == (4, 1, [10, 150], 10 * 38)
    verify(out, shared)
    broken = onnx.ModelProto()
    broken.CopyFrom(out)
    next(n for n in broken.graph.node if n.name == "axcnn/0/2").op_type = "Mul"
    with pytest.raises(AxcnnError, match="inline decode of layer 'conv.w' does not match its recipe planes3_kernel"):
        shared_layers(broken)
