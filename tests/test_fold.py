"""fold.py: BatchNormalization / Mul / Add folding, on tiny models built here."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from conftest import REALDATA, realdata_manifest
from layer_graphs import Builder, C, chain, close, ops, run, sample
from onnx import TensorProto, helper, numpy_helper

from axcnn.fold import fold_bn
from axcnn.model import inventory, load_model

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
