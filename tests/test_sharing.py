"""axcnn.sharing: Sharing records, the channel axes of each op, the fallback, tables over K, Eq. 1, SharedWeight."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from layer_graphs import Builder, run, sample

from axcnn import rewrite
from axcnn.cluster import GroupSpec, cluster_groups, cluster_range, cluster_vectors
from axcnn.cluster import eq1_bits as cluster_eq1
from axcnn.model import LayerSpec, Operand, inventory
from axcnn.sharing import (
    LAYER,
    LayerSharing,
    SharedClustering,
    Sharing,
    as_shared,
    cluster_layer,
    compression_ratio,
    eq1_bits,
    layer_sharing,
    weight_axes,
)

CHANNEL1, CHANNEL3, KERNEL, VECTOR = Sharing("channel"), Sharing("channel", 3), Sharing("kernel"), Sharing(
    vector_dim=2)
ALL = [LAYER, CHANNEL1, CHANNEL3, KERNEL, VECTOR]


def spec_of(array: np.ndarray, op: str = "Conv", operand: Operand | None = None, name: str = "w") -> LayerSpec:
    return LayerSpec(name=name, op_type=op, node="n", shape=tuple(array.shape), dtype=str(array.dtype),
                     bits=array.dtype.itemsize * 8, source="initializer", array=array, operand=operand or Operand())


def conv_spec(shape=(8, 5, 3, 3), seed=0, dtype=np.float32) -> LayerSpec:
    return spec_of(np.random.default_rng(seed).normal(0, 1, shape).astype(dtype))


# -- the record ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "said"), [
    ({"granularity": "row"}, "granularity='row' is invalid: allowed layer | channel | kernel"),
    ({"granularity": "channel", "group_size": 0}, "group_size=0 is invalid: allowed an integer >= 1"),
    ({"granularity": "channel", "group_size": 2.5}, "group_size=2.5 is invalid: allowed an integer"),
    ({"vector_dim": 3}, "vector_dim=3 is invalid: allowed 1 or 2"),
    ({"vector_dim": 9}, "vector_dim=9 is invalid: allowed 1 or 2"),
    ({"group_size": 4}, "group_size=4 is invalid with granularity='layer': allowed 1"),
    ({"granularity": "kernel", "group_size": 2}, "group_size=2 is invalid with granularity='kernel'"),
    ({"granularity": "channel", "vector_dim": 2}, "vector_dim=2 is invalid with granularity='channel': allowed 1"),
    ({"granularity": "kernel", "vector_dim": 2}, "vector_dim=2 is invalid with granularity='kernel'"),
])
def test_sharing_refuses_bad_values_by_name(kwargs, said):
    with pytest.raises(ValueError, match=said.replace("(", r"\(").replace("|", r"\|")):
        Sharing(**kwargs)


def test_sharing_describes_itself():
    assert [s.describe() for s in ALL] == ["layer", "channel/1", "channel/3", "kernel", "layer, 2-D vectors"]
    assert CHANNEL3.as_dict() == {"granularity": "channel", "group_size": 3, "vector_dim": 1}
    assert KERNEL.as_dict() == {"granularity": "kernel", "group_size": None, "vector_dim": 1}


# -- axes from the op ----------------------------------------------------------------------------------------------

def _spec(model: onnx.ModelProto) -> LayerSpec:
    layers, _ = inventory(model, min_weights=1)
    return next(s for s in layers if s.name == "w")


@pytest.mark.parametrize(("op", "layer", "axes"), [
    ("Conv", {}, (0, 1)),
    ("Conv", {"group": 2}, (0, 1)),
    ("Conv", {"dims": 1}, (0, 1)),
    ("ConvTranspose", {}, (1, 0)),
    ("ConvTranspose", {"group": 2}, "grouped ConvTranspose"),
    ("Gemm", {"trans_b": 1}, (0, 1)),
    ("Gemm", {"trans_b": 0}, (1, 0)),
    ("MatMul", {}, (1, 0)),
    ("MatMul", {"batch_rank": 3}, (1, 0)),
])
def test_weight_axes_follow_the_op(op, layer, axes):
    b = Builder(0)
    model = b.model(b.layer(op, **layer))
    spec = _spec(model)
    assert weight_axes(spec) == axes if isinstance(axes, tuple) else axes in weight_axes(spec)


def test_weight_axes_of_a_constant_first_operand_and_of_a_reshaped_weight():
    w = np.ones((6, 5), np.float32)
    # Y = A @ X with A constant [M=6, K=5]: rows of A are the outputs, its columns the inputs
    assert weight_axes(spec_of(w, "MatMul", Operand(position=0))) == (0, 1)
    assert weight_axes(spec_of(w, "Gemm", Operand(position=0))) == (0, 1)
    assert weight_axes(spec_of(w, "Gemm", Operand(position=0, trans=True))) == (1, 0)
    assert weight_axes(spec_of(np.ones((2, 6, 5), np.float32), "MatMul", Operand(position=0))) == (1, 2)
    assert "Reshape or Transpose" in weight_axes(spec_of(w, "Gemm", Operand(direct=False)))
    assert "1-D weight" in weight_axes(spec_of(np.ones(6, np.float32), "MatMul"))


# -- the fallback --------------------------------------------------------------------------------------------------

def test_kernel_on_a_gemm_falls_back_to_layer_with_a_reason():
    spec = spec_of(np.ones((6, 5), np.float32), "Gemm", Operand(trans=True))
    lay = layer_sharing(spec, KERNEL)
    assert lay.sharing == LAYER and "rank >= 3" in lay.note and "Gemm" in lay.note and "[6, 5]" in lay.note
    assert "\n" not in lay.note
    assert eq1_bits(spec, KERNEL, 4) == cluster_eq1(30, 4, 32)


@pytest.mark.parametrize("sharing", [CHANNEL1, VECTOR])
def test_channel_and_vectors_fall_back_without_channel_axes(sharing):
    spec = spec_of(np.ones((6, 5), np.float32), "Gemm", Operand(direct=False))
    lay = layer_sharing(spec, sharing)
    assert lay.sharing == LAYER and "Reshape or Transpose" in lay.note


def test_group_size_at_or_above_the_channel_count_is_one_codebook():
    spec = conv_spec((8, 5, 3, 3))
    for g in (8, 9, 1000):
        lay = layer_sharing(spec, Sharing("channel", g))
        assert lay.sharing == Sharing("channel", 8) and lay.codebooks(spec.shape) == 1 and lay.note is None


def test_layer_granularity_needs_no_axes():
    spec = spec_of(np.ones((6, 5), np.float32), "Gemm", Operand(direct=False))
    assert layer_sharing(spec, LAYER) == LayerSharing(LAYER)


# -- Eq. 1 ---------------------------------------------------------------------------------------------------------

def test_eq1_counts_every_codebook_and_every_vector():
    spec = conv_spec((8, 5, 3, 3))
    n = 8 * 5 * 9
    assert eq1_bits(spec, LAYER, 6) == n * 3 + 6 * 32
    assert eq1_bits(spec, CHANNEL1, 6) == n * 3 + 8 * 6 * 32
    assert eq1_bits(spec, CHANNEL3, 6) == n * 3 + 3 * 6 * 32  # groups of 3, 3 and 2 channels
    assert eq1_bits(spec, KERNEL, 6) == n * 3 + 40 * 6 * 32
    assert eq1_bits(spec, VECTOR, 6) == 8 * 3 * 9 * 3 + 6 * 2 * 32  # 5 input channels: 3 pairs, the last padded
    assert compression_ratio(spec, CHANNEL3, 6) == pytest.approx(n * 32 / (n * 3 + 3 * 6 * 32))


# -- tables --------------------------------------------------------------------------------------------------------

def test_layer_table_is_cluster_range_bit_for_bit():
    spec = conv_spec((16, 8, 3, 3))
    ref = cluster_range(spec.array, 3, 20)
    t = cluster_layer(spec, LAYER, 3, 20)
    assert t.ks == ref.ks and (t.n_unique, t.clamped) == (ref.n_unique, ref.clamped)
    for k in ref.ks:
        a, b = t.get(k), ref.get(k)
        assert t.inertia(k) == ref.inertia(k) and a.inertia == b.inertia and a.k == b.k
        assert a.centroids.tobytes() == b.centroids.tobytes() and a.indices.tobytes() == b.indices.tobytes()
        assert a.dense().tobytes() == b.centroids.astype(np.float32)[b.indices].tobytes()
        assert t.compression_ratio(k) == spec.weights * 32 / cluster_eq1(spec.weights, k, 32)


def _distinct_per_slice(arr: np.ndarray, axis: int, size: int) -> list[int]:
    moved = np.moveaxis(arr, axis, 0)
    return [len(np.unique(moved[i:i + size])) for i in range(0, moved.shape[0], size)]


@pytest.mark.parametrize("sharing", ALL, ids=lambda s: s.describe())
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_every_clustering_decodes_as_written(sharing, dtype):
    spec = conv_spec((8, 5, 3, 3), dtype=dtype)
    t = cluster_layer(spec, sharing, 2, 5)
    for k in t.ks:
        c = t.get(k)
        dense = c.dense()
        assert dense.dtype == spec.array.dtype and dense.shape == spec.shape
        sw = c.shared_weight("w")
        assert sw.dense(spec.shape).tobytes() == dense.tobytes()
        assert sw.eq1_bits(spec.bits) == c.eq1_bits(spec.bits) == t.eq1_bits(k) == eq1_bits(spec, sharing, k)
        assert c.codebooks == sw.codebooks and c.k == sw.k == k
        err = float(np.sum((c.dense(np.float64) - spec.array.astype(np.float64)) ** 2))
        assert err == pytest.approx(c.inertia, rel=1e-6, abs=1e-9)
        assert t.inertia(k) == pytest.approx(c.inertia, rel=1e-9, abs=1e-12)
        if sharing.vector_dim > 1:
            pairs = np.unique(sw.centroids[sw.indices].reshape(-1, 2), axis=0)
            assert len(pairs) <= k
        elif sharing.granularity == "channel":
            assert max(_distinct_per_slice(dense, 0, sharing.group_size)) <= k
        elif sharing.granularity == "kernel":
            assert max(len(np.unique(dense[o, i])) for o in range(8) for i in range(5)) <= k
        else:
            assert len(np.unique(dense)) <= k


def test_grouped_and_vector_tables_match_the_array_code():
    spec = conv_spec((8, 5, 3, 3))
    g = cluster_groups(spec.array, [4], GroupSpec("channel", axis=0, group_size=3)).get(4)
    c = cluster_layer(spec, CHANNEL3, 4, 4).get(4)
    assert c.centroids.tobytes() == g.centroids.tobytes() and np.array_equal(c.indices, g.indices)
    v = cluster_vectors(spec.array, [4], vector_axis=1, vector_dim=2, seed=3).get(4)
    c = cluster_layer(spec, VECTOR, 4, 4, seed=3).get(4)
    assert c.centroids.tobytes() == v.centroids.tobytes() and np.array_equal(c.indices, v.indices)
    assert c.indices.shape == (8, 3, 3, 3)


@pytest.mark.parametrize(("op", "layer", "axis", "in_axis"), [
    ("ConvTranspose", {}, 1, 0), ("Gemm", {"trans_b": 0}, 1, 0), ("Gemm", {"trans_b": 1}, 0, 1), ("MatMul", {}, 1, 0),
])
def test_channel_codebooks_run_along_the_ops_output_channels(op, layer, axis, in_axis):
    b = Builder(4)
    model = b.model(b.layer(op, **layer))
    spec = _spec(model)
    c = cluster_layer(spec, CHANNEL1, 2, 2).get(2)
    assert c.layout.axis == axis and c.codebooks == 6
    assert max(_distinct_per_slice(c.dense(), axis, 1)) <= 2
    v = cluster_layer(spec, VECTOR, 3, 3).get(3)
    assert v.layout.vector_axis == in_axis
    # the written model computes what the dense model with the clustered weights computes
    for clustering in (c, v):
        out, _ = rewrite.share_weights(model, [clustering.shared_weight("w")])
        onnx.checker.check_model(out, full_check=True)
        x = sample(model)
        dense = rewrite.replace_weights(model, {"w": clustering.dense()})
        np.testing.assert_allclose(run(out, x)[0], run(dense, x)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sharing", [CHANNEL1, KERNEL])
def test_k_at_or_above_the_unique_values_of_every_group_is_clamped(sharing):
    spec = conv_spec((4, 2, 3, 3))  # 9 distinct values per kernel, 18 per channel
    most = 9 if sharing == KERNEL else 18
    t = cluster_layer(spec, sharing, 5, 40)
    assert t.clamped and t.ks[-1] == most and t.inertia(most) == 0.0
    assert np.array_equal(t.get(most).dense(), spec.array)
    t = cluster_layer(spec, sharing, 30, 40)  # the whole range above: one candidate
    assert t.ks == (most,) and t.clamped
    assert not cluster_layer(spec, sharing, 2, 3).clamped


@pytest.mark.parametrize("sharing", ALL, ids=lambda s: s.describe())
def test_k1_and_constant_and_one_element_weights(sharing):
    spec = conv_spec((3, 3, 3, 3))
    c = cluster_layer(spec, sharing, 1, 1).get(1)
    assert c.k == 1 and c.eq1_bits(32) == eq1_bits(spec, sharing, 1)
    const = spec_of(np.full((4, 3, 3, 3), 0.5, np.float32))
    t = cluster_layer(const, sharing, 2, 8)
    assert t.ks == (1,) and t.inertia(1) == 0.0 and np.array_equal(t.get(1).dense(), const.array)
    one = spec_of(np.array([[[[2.0]]]], np.float32))
    t = cluster_layer(one, sharing, 1, 4)
    assert t.ks == (1,) and t.get(1).dense().tolist() == [[[[2.0]]]]


def test_weights_pass_through():
    spec = conv_spec((8, 5, 3, 3))
    w = np.random.default_rng(1).uniform(0, 2, spec.shape)
    for sharing in ALL:
        t = cluster_layer(spec, sharing, 3, 4, weights=w)
        assert t.weighted
        c = t.get(4)
        err = float(np.sum(w * (c.dense(np.float64) - spec.array) ** 2))
        assert err == pytest.approx(c.inertia, rel=1e-6)
        ones = cluster_layer(spec, sharing, 3, 4, weights=np.ones(spec.shape))
        assert ones.inertia(4) == pytest.approx(cluster_layer(spec, sharing, 3, 4).inertia(4), rel=1e-9)


def test_bad_range_and_backend_are_refused():
    spec = conv_spec()
    with pytest.raises(ValueError, match="kmin=5, kmax=4"):
        cluster_layer(spec, LAYER, 5, 4)
    with pytest.raises(ValueError, match="backend='sklearn' is invalid with sharing channel/1"):
        cluster_layer(spec, CHANNEL1, 2, 4, backend="sklearn")
    with pytest.raises(KeyError, match="K=9 is not a candidate"):
        cluster_layer(spec, KERNEL, 2, 4).get(9)


def test_as_shared_wraps_a_plain_clustering_as_one_codebook():
    spec = conv_spec()
    plain = cluster_range(spec.array, 4, 4).get(4)
    s = as_shared(spec, plain)
    assert isinstance(s, SharedClustering) and s.sharing == LAYER and s.codebooks == 1
    assert s.dense().tobytes() == plain.centroids.astype(np.float32)[plain.indices].tobytes()
    assert as_shared(spec, s) is s
