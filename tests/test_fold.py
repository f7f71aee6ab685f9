"""fold.py: BatchNormalization / Mul / Add folding and the repair's per-channel affine, on tiny models built here."""

from __future__ import annotations

import copy
import logging

import numpy as np
import onnx
import pytest
from conftest import REALDATA, realdata_manifest
from onnx import TensorProto, helper, numpy_helper

from axcnn.fold import AffineSite, affine_site, apply_channel_affine, fold_bn, set_channel_affine
from axcnn.model import Skipped, inventory, load_model

C = 6  # output channels of every test layer


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # compare the graphs as written
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def close(a: list[np.ndarray], b: list[np.ndarray], rtol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol * float(np.abs(v).max()))


class Builder:
    """A tiny model: one layer, then a chain of BN / Mul / Add by constants, then Relu (or the chain's end as the
    graph output)."""

    def __init__(self, seed: int = 0, ir: int = 8, opset: int = 13, dtype=np.float32):
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.ir, self.opset = ir, opset
        self.extra_inputs: list[onnx.ValueInfoProto] = []

    def const(self, name: str, array: np.ndarray, node: bool = False) -> str:
        array = np.asarray(array, self.dtype)
        if node:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_c",
                                               value=numpy_helper.from_array(array, name)))
        else:
            self.inits.append(numpy_helper.from_array(array, name))
        return name

    def normal(self, shape, scale=0.5) -> np.ndarray:
        return self.rng.normal(0, scale, shape).astype(self.dtype)

    def layer(self, op: str, *, bias=True, group=1, dims=2, trans_b=1, alpha=1.0, beta=1.0, batch_rank=2,
              weight_node=False) -> str:
        """Add the layer reading input "x"; return its output name. Sets self.x_shape and self.out_rank."""
        cin = 4
        self.conv = op in ("Conv", "ConvTranspose")
        if self.conv:
            spatial = [5] * dims
            self.x_shape = [2, cin, *spatial]
            wshape = [C, cin // group, *[3] * dims] if op == "Conv" else [cin, C // group, *[3] * dims]
            attrs = {"group": group, "pads": [1] * (2 * dims)}
            self.out_rank = 2 + dims
        else:
            self.x_shape = [3, 5] if batch_rank == 2 else [2, 3, 5]
            wshape = [5, C] if op == "MatMul" or not trans_b else [C, 5]
            attrs = {} if op == "MatMul" else {"transB": trans_b, "alpha": alpha, "beta": beta}
            self.out_rank = len(self.x_shape)
        inputs = ["x", self.const("w", self.normal(wshape), node=weight_node)]
        if bias and op != "MatMul":
            inputs.append(self.const("b", self.normal([C], 0.2)))
        self.nodes.append(helper.make_node(op, inputs, ["y"], name="layer", **attrs))
        return "y"

    def channel_shape(self, kind: str = "channel") -> list[int]:
        if kind == "scalar":
            return []
        return [C] + [1] * (self.out_rank - 2) if self.conv and kind == "channel" else [C]

    def bn(self, src: str, name: str, const_nodes=False) -> str:
        p = [self.const(f"{name}_{k}", v, node=const_nodes) for k, v in (
            ("scale", self.rng.uniform(0.5, 2.0, C)), ("b", self.normal([C], 0.3)),
            ("mean", self.normal([C], 0.3)), ("var", self.rng.uniform(0.2, 3.0, C)))]
        self.nodes.append(helper.make_node("BatchNormalization", [src, *p], [name], name=name, epsilon=1e-3))
        return name

    def affine(self, op: str, src: str, name: str, shape: list[int] | None = None, first=False) -> str:
        shape = self.channel_shape() if shape is None else shape
        values = self.rng.uniform(0.5, 1.5, shape) * self.rng.choice([-1, 1], shape) if op == "Mul" else \
            self.normal(shape, 0.3)
        k = self.const(f"{name}_k", values)
        self.nodes.append(helper.make_node(op, [k, src] if first else [src, k], [name], name=name))
        return name

    def model(self, out: str, relu=True, out_rank=None) -> onnx.ModelProto:
        if relu:
            self.nodes.append(helper.make_node("Relu", [out], ["z"], name="relu"))
            out = "z"
        elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        inputs = [helper.make_tensor_value_info("x", elem, self.x_shape), *self.extra_inputs]
        if self.ir < 4:
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        graph = helper.make_graph(self.nodes, "t", inputs,
                                  [helper.make_tensor_value_info(out, elem, None)],
                                  initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=self.ir)
        inferred = onnx.shape_inference.infer_shapes(m).graph.output[0]
        m.graph.output[0].CopyFrom(inferred)
        onnx.checker.check_model(m, full_check=True)
        return m


def sample(model: onnx.ModelProto, seed: int = 5) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    return np.random.default_rng(seed).normal(0, 1, dims).astype(dtype)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if n.op_type != "Constant"]


def chain(op: str, steps: list[str], seed=0, dtype=np.float32, **layer) -> onnx.ModelProto:
    """Layer -> steps ("bn", "mul", "add", "mul_scalar", "add_first", "add_4d") -> Relu."""
    b = Builder(seed, dtype=dtype)
    y = b.layer(op, **layer)
    for i, step in enumerate(steps):
        name = f"s{i}"
        if step == "bn":
            y = b.bn(y, name)
        elif step == "mul_scalar":
            y = b.affine("Mul", y, name, shape=b.channel_shape("scalar"))
        elif step == "add_first":
            y = b.affine("Add", y, name, first=True)
        elif step == "add_4d":
            y = b.affine("Add", y, name, shape=[1, C, 1, 1])
        else:
            y = b.affine(step.capitalize(), y, name)
    return b.model(y)


FOLD_CASES = {
    "conv_bias_bn": ("Conv", ["bn"], {}),
    "conv_nobias_bn": ("Conv", ["bn"], {"bias": False}),
    "conv_grouped_bn_mul": ("Conv", ["bn", "mul"], {"group": 2}),
    "conv_depthwise_bn": ("Conv", ["bn"], {}),  # built in the test: group == in == out channels
    "conv_bn_mul_add": ("Conv", ["bn", "mul", "add"], {}),
    "conv_nobias_mul_scalar_add_4d": ("Conv", ["mul_scalar", "add_4d"], {"bias": False}),
    "conv_add_first_operand": ("Conv", ["add_first"], {"bias": False}),
    "conv1d_bn_mul": ("Conv", ["bn", "mul"], {"dims": 1}),
    "conv3d_bn": ("Conv", ["bn"], {"dims": 3}),
    "convtranspose_bn_add": ("ConvTranspose", ["bn", "add"], {}),
    "convtranspose_nobias_bn": ("ConvTranspose", ["bn"], {"bias": False}),
    "convtranspose_grouped_bn_mul": ("ConvTranspose", ["bn", "mul"], {"group": 2}),
    "gemm_transb_alpha_beta_bn_mul_add": ("Gemm", ["bn", "mul", "add"], {"alpha": 0.7, "beta": 1.3}),
    "gemm_notransb_nobias_bn": ("Gemm", ["bn"], {"trans_b": 0, "bias": False}),
    "gemm_mul_scalar": ("Gemm", ["mul_scalar"], {"trans_b": 0, "beta": 0.5}),
    "matmul_add_mul_add": ("MatMul", ["add", "mul", "add"], {}),
    "matmul_mul": ("MatMul", ["mul"], {}),
    "matmul_rank3_mul_add_mul": ("MatMul", ["mul", "add", "mul"], {"batch_rank": 3}),
}


@pytest.mark.parametrize("case", list(FOLD_CASES))
def test_fold_matches_original(case):
    op, steps, layer = FOLD_CASES[case]
    if case == "conv_depthwise_bn":  # true depthwise: group == in channels == out channels
        b = Builder(3)
        b.x_shape, b.out_rank, b.conv = [2, C, 5, 5], 4, True
        b.nodes.append(helper.make_node("Conv", ["x", b.const("w", b.normal([C, 1, 3, 3]))], ["y"], name="layer",
                                        group=C, pads=[1, 1, 1, 1]))
        model = b.model(b.bn("y", "s0"))
    else:
        model = chain(op, steps, **layer)
    model = onnx.shape_inference.infer_shapes(model)  # value_info for every intermediate, to be kept consistent
    assert len(model.graph.value_info) >= len(steps)
    before = model.SerializeToString()
    x = sample(model)
    folded, records = fold_bn(model)
    assert model.SerializeToString() == before  # input untouched
    onnx.checker.check_model(folded, full_check=True)
    close(run(folded, x), run(model, x))
    assert len(records) == 1
    rec = records[0]
    assert rec.weight == "w" and rec.node == "layer" and rec.op_type == op
    expected = [s.replace("_scalar", "").replace("_first", "").replace("_4d", "") for s in steps]
    if op == "MatMul" and "add" in expected:  # the first Add after MatMul is kept as its bias
        expected.remove("add")
    assert [o.lower().replace("batchnormalization", "bn") for o, _ in rec.folded] == expected
    remaining = ops(folded)
    assert "BatchNormalization" not in remaining and "Mul" not in remaining
    assert remaining.count("Add") == (1 if op == "MatMul" and "add" in steps else 0)
    assert rec.output == [n for n in folded.graph.node if n.op_type == "Relu"][0].input[0]
    # nothing dangling: every initializer is read; value_info names only tensors that exist
    read = {i for n in folded.graph.node for i in n.input}
    assert {t.name for t in folded.graph.initializer} <= read
    made = {o for n in folded.graph.node for o in n.output} | {i.name for i in folded.graph.input}
    assert {v.name for v in folded.graph.value_info} <= made
    # the weight the inventory lists is the folded one
    layers, _ = inventory(folded, min_weights=1)
    assert [s.name for s in layers] == ["w"]


@pytest.mark.parametrize("op,dtype,rtol", [("Conv", np.float16, 2e-2), ("Gemm", np.float16, 2e-2),
                                            ("Gemm", np.float64, 1e-12), ("MatMul", np.float64, 1e-12)])
def test_fold_keeps_dtype(op, dtype, rtol):
    """BN params are combined in float64 and the products cast back to the weight's dtype."""
    model = chain(op, ["add", "mul"] if op == "MatMul" else ["bn", "mul", "add"], seed=2, dtype=dtype)
    folded, records = fold_bn(model)
    onnx.checker.check_model(folded, full_check=True)
    assert len(records) == 1 and "Mul" not in ops(folded)
    assert {t.data_type for t in folded.graph.initializer} == {helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}
    x = sample(model)
    close(run(folded, x), run(model, x), rtol=rtol)


def test_fold_bn_params_in_constant_nodes_and_weight_in_constant_node():
    b = Builder(4)
    y = b.layer("Conv", weight_node=True)
    model = b.model(b.affine("Mul", b.bn(y, "bn", const_nodes=True), "m"))
    x = sample(model)
    folded, records = fold_bn(model)
    onnx.checker.check_model(folded, full_check=True)
    close(run(folded, x), run(model, x))
    assert ops(folded) == ["Conv", "Relu"]
    assert [n.output[0] for n in folded.graph.node if n.op_type == "Constant"] == ["w"]  # the BN params went
    assert records[0].bias == "b"


def test_fold_ir3_initializers_as_inputs():
    """Like the zoo's mnist-8: Conv without bias, then Add by a [C,1,1] constant; all initializers are inputs."""
    b = Builder(6, ir=3, opset=8)
    y = b.layer("Conv", bias=False)
    model = b.model(b.affine("Add", b.bn(y, "bn"), "a"))
    x = sample(model)
    folded, records = fold_bn(model)
    onnx.checker.check_model(folded, full_check=True)
    close(run(folded, x), run(model, x))
    inits = {t.name for t in folded.graph.initializer}
    declared = {i.name for i in folded.graph.input} - {"x"}
    assert inits == declared == {"w", records[0].bias}


def test_fold_bn_output_as_graph_output_keeps_its_name():
    b = Builder(7)
    model = b.model(b.bn(b.layer("Conv"), "bn"), relu=False)
    folded, records = fold_bn(model)
    assert [o.name for o in folded.graph.output] == ["bn"] and ops(folded) == ["Conv"]
    assert records[0].output == "bn"
    x = sample(model)
    close(run(folded, x), run(model, x))


def test_fold_shared_bias_gets_its_own_copy():
    b = Builder(8)
    y = b.layer("Conv")
    b.nodes.append(helper.make_node("Conv", ["x", b.const("w2", b.normal([C, 4, 3, 3])), "b"], ["y2"], name="other",
                                    pads=[1, 1, 1, 1]))
    b.nodes.append(helper.make_node("Add", [b.bn(y, "bn"), "y2"], ["sum"], name="sum"))
    model = b.model("sum")
    x = sample(model)
    folded, records = fold_bn(model)
    close(run(folded, x), run(model, x))
    assert records[0].bias != "b" and "b" in {t.name for t in folded.graph.initializer}


def _skip_two_consumers():
    b = Builder(9)
    y = b.layer("Conv")
    b.nodes.append(helper.make_node("Relu", [y], ["r"], name="side"))
    b.nodes.append(helper.make_node("Add", [b.bn(y, "bn"), "r"], ["sum"], name="sum"))
    return b.model("sum"), "has 2 consumers"


def _skip_nonconstant_params():
    b = Builder(10)
    y = b.layer("Conv")
    out = b.bn(y, "bn")
    b.inits = [t for t in b.inits if t.name != "bn_mean"]
    b.extra_inputs.append(helper.make_tensor_value_info("bn_mean", TensorProto.FLOAT, [C]))
    return b.model(out), "not all constants"


def _skip_layer_output_is_graph_output():
    b = Builder(11)
    y = b.layer("Conv")
    model = b.model(b.bn(y, "bn"))
    model.graph.output.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, C, 5, 5]))
    return model, "is a graph output"


def _skip_mul_not_per_channel():
    b = Builder(12)
    y = b.layer("Conv")
    return b.model(b.affine("Mul", y, "m", shape=[C, 5, 5])), "does not act per output channel"


def _skip_vector_on_last_axis():
    """A [C] constant on a conv output broadcasts along the last spatial axis (here of size C), not the channels."""
    b = Builder(13)
    b.x_shape, b.out_rank, b.conv = [2, 4, C, C], 4, True
    b.nodes.append(helper.make_node("Conv", ["x", b.const("w", b.normal([C, 4, 3, 3]))], ["y"], name="layer",
                                    pads=[1, 1, 1, 1]))
    return b.model(b.affine("Mul", "y", "m", shape=[C])), "does not act per output channel"


def _skip_shared_weight():
    b = Builder(14)
    y = b.layer("Conv")
    b.nodes.append(helper.make_node("Conv", ["x", "w"], ["y2"], name="twin", pads=[1, 1, 1, 1]))
    b.nodes.append(helper.make_node("Add", [b.bn(y, "bn"), "y2"], ["sum"], name="sum"))
    return b.model("sum"), "its weight w is used by 2 nodes"


def _skip_training_bn():
    b = Builder(15, opset=15)
    y = b.layer("Conv")
    out = b.bn(y, "bn")
    b.nodes[-1].attribute.append(helper.make_attribute("training_mode", 1))
    b.nodes[-1].output.extend(["running_mean", "running_var"])
    return b.model(out), "not in inference form"


def _skip_weight_through_reshape():
    b = Builder(16)
    b.x_shape, b.out_rank, b.conv = [3, 5], 2, False
    flat = b.const("wflat", b.normal([30]))
    b.nodes.append(helper.make_node("Reshape", [flat, b.const("shape", np.array([5, C]))], ["w"], name="r"))
    b.inits[-1] = numpy_helper.from_array(np.array([5, C], np.int64), "shape")
    b.nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"], name="layer"))
    return b.model(b.affine("Mul", "y", "m")), "is computed (Reshape)"


SKIPS = [_skip_two_consumers, _skip_nonconstant_params, _skip_layer_output_is_graph_output, _skip_mul_not_per_channel,
         _skip_vector_on_last_axis, _skip_shared_weight, _skip_training_bn, _skip_weight_through_reshape]


@pytest.mark.parametrize("make", SKIPS, ids=[f.__name__[6:] for f in SKIPS])
def test_fold_skips_with_reason(make, caplog):
    model, reason = make()
    with caplog.at_level(logging.INFO, logger="axcnn.fold"):
        folded, records = fold_bn(model)
    assert records == []
    assert folded.SerializeToString() == model.SerializeToString()
    assert any(reason in r.getMessage() and r.getMessage().startswith("not folding") for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


def test_fold_nothing_to_do_logs_nothing(caplog):
    b = Builder(17)
    model = b.model(b.affine("Add", b.layer("MatMul"), "bias"))  # MatMul + bias Add: already folded form
    with caplog.at_level(logging.INFO, logger="axcnn.fold"):
        folded, records = fold_bn(model)
    assert records == [] and caplog.records == []
    assert folded.SerializeToString() == model.SerializeToString()


@pytest.mark.realdata
def test_fold_real_models():
    """Every shared model folds to one that passes the checker and matches the original; mnist-8's two Conv + Add
    (bias by a [C,1,1] constant, IR 3) are the foldable ones among them."""
    manifest = realdata_manifest()
    seen = {}
    for key, entry in manifest["models"].items():
        model = load_model(REALDATA / entry["file"])
        folded, records = fold_bn(model)
        seen[key] = [(r.node, tuple(o for o, _ in r.folded)) for r in records]
        if not records:
            assert folded.SerializeToString() == model.SerializeToString(), key
            continue
        onnx.checker.check_model(folded)
        io = model.graph.input[0].type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else 2 for d in io.shape.dim]
        for seed in range(3):
            x = np.random.default_rng(seed).uniform(0, entry["scale"], dims).astype(np.float32)
            close(run(folded, x), run(model, x), rtol=1e-4)
    if "mnist8_zoo" in seen:
        assert seen["mnist8_zoo"] == [("Convolution28", ("Add",)), ("Convolution110", ("Add",))]


# ---------------------------------------------------------------- set_channel_affine


AFFINE_CASES = {
    "conv_bias": ("Conv", {}),
    "conv_nobias": ("Conv", {"bias": False}),
    "conv1d": ("Conv", {"dims": 1}),
    "conv_grouped": ("Conv", {"group": 2}),
    "convtranspose": ("ConvTranspose", {}),
    "gemm_transb": ("Gemm", {"alpha": 0.7, "beta": 1.3}),
    "gemm_notransb_nobias": ("Gemm", {"trans_b": 0, "bias": False}),
    "matmul": ("MatMul", {}),
    "matmul_rank3": ("MatMul", {"batch_rank": 3}),
    "matmul_with_bias_add": ("MatMul", {"bias_add": True}),
}


def affine_model(case: str, graph_output=False, seed=20, dtype=np.float32) -> onnx.ModelProto:
    op, layer = AFFINE_CASES[case]
    layer = dict(layer)
    bias_add = layer.pop("bias_add", False)
    b = Builder(seed, dtype=dtype)
    y = b.layer(op, **layer)
    if bias_add:
        y = b.affine("Add", y, "bias_add")
    return b.model(y, relu=not graph_output)


def reference(model: onnx.ModelProto, s: np.ndarray, t: np.ndarray, weight: str = "w") -> onnx.ModelProto:
    """The dense model with the layer's weight replaced by s*W per output channel and its bias by t."""
    site = affine_site(model, weight)
    ref = copy.deepcopy(model)
    g = ref.graph
    layer = next(n for n in g.node if n.name == site.node and weight in n.input)
    held = next((i for i in g.initializer if i.name == weight), None)
    if held is None:
        held = next(n for n in g.node if n.op_type == "Constant" and n.output[0] == weight).attribute[0].t
    w = numpy_helper.to_array(held)
    shape = [1] * w.ndim
    shape[site.axis] = -1
    held.CopyFrom(numpy_helper.from_array((w.astype(np.float64) * s.reshape(shape)).astype(w.dtype), held.name))
    g.initializer.append(numpy_helper.from_array(t.astype(w.dtype), "ref_t"))
    if ref.ir_version < 4:
        g.input.append(helper.make_tensor_value_info("ref_t", g.initializer[-1].data_type, [len(t)]))
    if layer.op_type == "MatMul":
        if site.output != layer.output[0]:  # its existing bias Add
            add = next(n for n in g.node if n.output[0] == site.output)
            add.input[1 if add.input[0] == layer.output[0] else 0] = "ref_t"
        else:
            out, layer.output[0] = layer.output[0], "ref_lin"
            at = list(g.node).index(layer) + 1
            g.node.insert(at, helper.make_node("Add", ["ref_lin", "ref_t"], [out], name="ref_add"))
    else:
        while len(layer.input) < 3:
            layer.input.append("")
        layer.input[2] = "ref_t"
        for a in layer.attribute:
            if a.name == "beta":
                a.f = 1.0
    onnx.checker.check_model(ref)
    return ref


def draw(seed: int, zero: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.5, 1.5, C) * rng.choice([-1, 1], C)
    if zero:
        s[2] = 0.0
    return s, rng.normal(0, 0.5, C)


@pytest.mark.parametrize("case", list(AFFINE_CASES))
def test_affine_matches_reference(case):
    model = onnx.shape_inference.infer_shapes(affine_model(case))
    before = model.SerializeToString()
    s, t = draw(1)
    out = set_channel_affine(model, "w", s, t)
    assert model.SerializeToString() == before
    onnx.checker.check_model(out, full_check=True)
    x = sample(model)
    close(run(out, x), run(reference(model, s, t), x))
    site = affine_site(out, "w")
    assert isinstance(site, AffineSite) and site == affine_site(model, "w")
    names = {t.name for t in out.graph.initializer}
    assert {site.scale, site.bias} <= names and "b" not in names and "bias_add_k" not in names
    assert ops(out).count("Mul") == 1
    made = {o for n in out.graph.node for o in n.output}
    assert {v.name for v in model.graph.value_info} <= made and {v.name for v in out.graph.value_info} <= made
    # the weight itself is untouched (it stays shared)
    w_in = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    w_out = numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == "w"))
    np.testing.assert_array_equal(w_in, w_out)


@pytest.mark.parametrize("case", list(AFFINE_CASES))
def test_affine_reapplied_updates_in_place(case):
    model = affine_model(case)
    x = sample(model)
    s1, t1 = draw(2)
    s2, t2 = draw(3)
    once = set_channel_affine(model, "w", s2, t2)
    twice = set_channel_affine(set_channel_affine(model, "w", s1, t1), "w", s2, t2)
    assert ops(twice) == ops(once)
    assert sorted(i.name for i in twice.graph.initializer) == sorted(i.name for i in once.graph.initializer)
    close(run(twice, x), run(once, x))
    # scale all ones: the Mul goes, the bias stays; a later scale brings it back
    ones = set_channel_affine(twice, "w", np.ones(C), t1)
    assert ops(ones) == ops(set_channel_affine(model, "w", np.ones(C), t1)) and "Mul" not in ops(ones)
    assert affine_site(model, "w").scale not in {i.name for i in ones.graph.initializer}
    close(run(ones, x), run(reference(model, np.ones(C), t1), x))
    back = set_channel_affine(ones, "w", s2, t2)
    assert ops(back) == ops(once)
    close(run(back, x), run(once, x))
    for m in (once, twice, ones, back):
        onnx.checker.check_model(m, full_check=True)


@pytest.mark.parametrize("case", ["conv_bias", "gemm_transb", "matmul", "matmul_with_bias_add"])
def test_affine_graph_output_keeps_name(case):
    model = affine_model(case, graph_output=True)
    names = [o.name for o in model.graph.output]
    s, t = draw(4)
    out = set_channel_affine(model, "w", s, t)
    onnx.checker.check_model(out, full_check=True)
    assert [o.name for o in out.graph.output] == names
    x = sample(model)
    close(run(out, x), run(reference(model, s, t), x))


@pytest.mark.parametrize("case,dtype,rtol", [("conv_bias", np.float16, 2e-2), ("gemm_transb", np.float64, 1e-12),
                                             ("matmul_with_bias_add", np.float64, 1e-12)])
def test_affine_keeps_dtype(case, dtype, rtol):
    model = affine_model(case, dtype=dtype)
    s, t = draw(11)
    out = set_channel_affine(model, "w", s, t)
    onnx.checker.check_model(out, full_check=True)
    assert {t.data_type for t in out.graph.initializer} == {helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}
    x = sample(model)
    close(run(out, x), run(reference(model, s, t), x), rtol=rtol)


@pytest.mark.parametrize("case", ["conv_bias", "gemm_notransb_nobias", "matmul", "matmul_with_bias_add"])
def test_affine_template_tensors_swapped_per_candidate(case):
    """What a search does: one model with the Mul kept (always_scale), then only the two tensors replaced."""
    model = affine_model(case)
    template = copy.deepcopy(model)
    site = apply_channel_affine(template, "w", np.ones(C), np.zeros(C), always_scale=True)
    assert "Mul" in ops(template)
    x = sample(model)
    for seed in (5, 6):
        s, t = draw(seed)
        arrays = site.arrays(s, t)
        cand = copy.deepcopy(template)
        for init in cand.graph.initializer:
            if init.name in arrays:
                init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))
        close(run(cand, x), run(set_channel_affine(model, "w", s, t), x))


def test_affine_site_fields():
    conv = affine_site(affine_model("conv_bias"), "w")
    assert (conv.axis, conv.channels, conv.scale_shape, conv.output) == (0, C, (C, 1, 1), "y")
    assert (conv.scale, conv.bias, conv.dtype) == ("w.axcnn_scale", "w.axcnn_bias", "float32")
    assert affine_site(affine_model("conv1d"), "w").scale_shape == (C, 1)
    assert affine_site(affine_model("convtranspose"), "w").axis == 1
    assert affine_site(affine_model("gemm_transb"), "w").axis == 0
    assert affine_site(affine_model("gemm_notransb_nobias"), "w").axis == 1
    mm = affine_site(affine_model("matmul_with_bias_add"), "w")
    assert (mm.axis, mm.scale_shape, mm.output) == (1, (C,), "bias_add")
    assert affine_site(affine_model("matmul"), "w").output == "y"


def test_affine_ir3_declares_new_initializers():
    b = Builder(21, ir=3, opset=8)
    model = b.model(b.layer("Conv", bias=False))
    s, t = draw(7)
    out = set_channel_affine(model, "w", s, t)
    onnx.checker.check_model(out, full_check=True)
    assert {i.name for i in out.graph.input} - {"x"} == {i.name for i in out.graph.initializer}
    x = sample(model)
    close(run(out, x), run(reference(model, s, t), x))


def test_affine_unsupported():
    assert isinstance(affine_site(affine_model("conv_bias"), "nope"), Skipped)
    assert "Reshape" in affine_site(_skip_weight_through_reshape()[0], "wflat").reason
    assert "2 nodes" in affine_site(_skip_shared_weight()[0], "w").reason
    b = Builder(22)
    model = b.model(b.layer("ConvTranspose", group=2))
    assert "grouped ConvTranspose" in affine_site(model, "w").reason
    with pytest.raises(ValueError, match="grouped ConvTranspose"):
        set_channel_affine(model, "w", np.ones(C), np.zeros(C))


def test_affine_checks_scale_and_bias():
    model = affine_model("conv_bias")
    s, t = draw(8, zero=True)
    with pytest.raises(ValueError, match="channel 2 is 0"):
        set_channel_affine(model, "w", s, t)
    with pytest.raises(ValueError, match=f"scale must hold {C} finite values"):
        set_channel_affine(model, "w", np.ones(C + 1), t)
    with pytest.raises(ValueError, match="bias must hold .* NaN"):
        set_channel_affine(model, "w", np.ones(C), np.full(C, np.nan))
    mm = affine_model("matmul")  # Mul then Add: a zero scale is fine
    out = set_channel_affine(mm, "w", s, t)
    x = sample(mm)
    close(run(out, x), run(reference(mm, s, t), x))


def test_fold_then_affine():
    """The two compose: after folding Conv -> BN -> Mul, the repair acts on the folded layer."""
    model = chain("Conv", ["bn", "mul"], seed=30)
    folded, _ = fold_bn(model)
    s, t = draw(9)
    out = set_channel_affine(folded, "w", s, t)
    onnx.checker.check_model(out, full_check=True)
    x = sample(model)
    close(run(out, x), run(reference(folded, s, t), x))


@pytest.mark.realdata
def test_affine_real_models():
    """On every shared model, the first two supported weights and every MatMul: s * (W x) + t as a dense reference
    computes it; every result passes the checker; an unsupported weight says why."""
    manifest = realdata_manifest()
    for key, entry in manifest["models"].items():
        model = load_model(REALDATA / entry["file"])
        io = model.graph.input[0].type.tensor_type
        x = np.random.default_rng(0).uniform(0, entry["scale"], [d.dim_value or 2 for d in io.shape.dim])
        x = x.astype(np.float32)
        layers, _ = inventory(model)
        sites = [affine_site(model, spec.name) for spec in layers]
        assert all(isinstance(si, AffineSite) or si.reason for si in sites)
        picked = [si for si in sites if isinstance(si, AffineSite)][:2]
        picked += [si for si in sites if isinstance(si, AffineSite) and si.op_type == "MatMul" and si not in picked]
        for i, site in enumerate(picked):
            rng = np.random.default_rng(i)
            s = rng.uniform(0.5, 1.5, site.channels) * rng.choice([-1, 1], site.channels)
            t = rng.normal(0, 0.5, site.channels)
            out = set_channel_affine(model, site.weight, s, t)
            onnx.checker.check_model(out)
            assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output], key
            close(run(out, x), run(reference(model, s, t, site.weight), x), rtol=1e-4)
