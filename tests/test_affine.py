"""affine.py: the repair's per-channel scale and bias, on tiny models built here."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from conftest import REALDATA, realdata_manifest
from layer_graphs import Builder, C, chain, close, ops, run, sample
from onnx import helper, numpy_helper
from test_fold import _skip_shared_weight, _skip_weight_through_reshape

from axcnn.affine import AffineSite, affine_site, apply_channel_affine, set_channel_affine
from axcnn.fold import fold_bn
from axcnn.model import Skipped, inventory, load_model

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


@pytest.mark.parametrize("case", list(AFFINE_CASES))
def test_current_bias_reads_what_the_layer_adds(case):
    """current_bias gives the bias that, with a scale of ones, leaves the layer's outputs unchanged, before and
    after an edit."""
    from axcnn.affine import current_bias

    model = affine_model(case)
    x = sample(model)
    site = affine_site(model, "w")
    b = current_bias(model, "w")
    assert b.shape == (site.channels,)
    template = set_channel_affine(model, "w", np.ones(site.channels), b, always_scale=True)
    close(run(template, x), run(model, x))
    s, t = draw(3)
    edited = set_channel_affine(model, "w", s, t)
    np.testing.assert_allclose(current_bias(edited, "w"), t, rtol=1e-5, atol=1e-6)
