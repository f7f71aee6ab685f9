"""Tests of axcnn.correct: every closed form against the actual conv / matmul run on the samples."""

from __future__ import annotations

import numpy as np
import pytest

from axcnn.cluster import GroupSpec, cluster_groups, cluster_range
from axcnn.correct import (
    LayerGeometry,
    Moments,
    fit_bias,
    fit_scale_bias,
    gptq_assign,
    hessian,
    importance,
    moments,
)
from axcnn.errors import AxcnnError

# ------------------------------------------------------------------------------------------------------
# Reference layers
# ------------------------------------------------------------------------------------------------------


def ref_conv(x: np.ndarray, w: np.ndarray, geom: LayerGeometry) -> np.ndarray:
    """Direct convolution (no bias), one output channel and kernel tap at a time, float64."""
    x = x.astype(np.float64)
    n, c = x.shape[:2]
    o = w.shape[0]
    k = w.shape[2:]
    nsp = len(k)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(geom.pads[i], geom.pads[nsp + i]) for i in range(nsp)])
    out = [(xp.shape[2 + i] - geom.dilations[i] * (k[i] - 1) - 1) // geom.strides[i] + 1 for i in range(nsp)]
    y = np.zeros((n, o, *out))
    cg, og = c // geom.group, o // geom.group
    for oc in range(o):
        g = oc // og
        for tap in np.ndindex(*k):
            idx = tuple(
                slice(tap[i] * geom.dilations[i], tap[i] * geom.dilations[i] + geom.strides[i] * (out[i] - 1) + 1,
                      geom.strides[i])
                for i in range(nsp)
            )  # fmt: skip
            xs = xp[(slice(None), slice(g * cg, (g + 1) * cg), *idx)]
            y[:, oc] += np.tensordot(w[oc][(slice(None), *tap)], xs, axes=(0, 1))
    return y


def ref_layer(x: np.ndarray, w: np.ndarray, geom: LayerGeometry) -> np.ndarray:
    """Layer output without bias as [samples*positions, O]."""
    if geom.op == "conv":
        y = ref_conv(x, w, geom)
        return np.moveaxis(y, 1, -1).reshape(-1, w.shape[0])
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
    wt = w if geom.out_axis == 1 else w.T  # [I, O]
    return x2 @ wt.astype(np.float64)


def basis_outputs(x: np.ndarray, geom: LayerGeometry) -> list[np.ndarray]:
    """Per group, [rows, d]: the layer's output for every one-hot weight row = the patches, by convolution."""
    out = []
    og = geom.n_out // geom.group
    for g in range(geom.group):
        cols = []
        for i in range(geom.d):
            r = np.zeros((geom.group, og, geom.d))
            r[g, 0, i] = 1.0
            w = geom.unrows(r)
            cols.append(ref_layer(x, w, geom)[:, g * og])
        out.append(np.stack(cols, axis=1))
    return out


def test_reference_conv_matches_loops():
    # the reference itself, against plain loops on a tiny case (stride, asymmetric pad, dilation, groups)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 6, 5))
    w = rng.standard_normal((6, 2, 2, 3))
    geom = LayerGeometry.conv(w.shape, strides=(2, 1), pads=(1, 0, 0, 2), dilations=(1, 2), group=2)
    y = ref_conv(x, w, geom)
    xp = np.pad(x, [(0, 0), (0, 0), (1, 0), (0, 2)])
    for n in range(2):
        for o in range(6):
            g = o // 3
            for i in range(y.shape[2]):
                for j in range(y.shape[3]):
                    acc = 0.0
                    for c in range(2):
                        for a in range(2):
                            for b in range(3):
                                acc += w[o, c, a, b] * xp[n, g * 2 + c, i * 2 + a, j + 2 * b]
                    assert y[n, o, i, j] == pytest.approx(acc)


# ------------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------------


def test_geometry_constructors():
    g = LayerGeometry.conv((8, 4, 3, 3), pads=(1, 1, 1, 1), group=2)
    assert g.in_axes == (1, 2, 3) and g.kernel_shape == (3, 3) and g.strides == (1, 1) and g.d == 36
    assert g.in_channels == 8 and g.n_out == 8 and g.out_spatial((8, 8)) == (8, 8)
    assert LayerGeometry.gemm((10, 64)).in_axes == (1,) and LayerGeometry.gemm((10, 64)).d == 64
    assert LayerGeometry.gemm((64, 10), trans_b=False).out_axis == 1
    assert LayerGeometry.matmul((64, 10)).n_out == 10


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LayerGeometry.conv((8, 4, 3, 3), group=3), "group must be >= 1 and divide the 8 output"),
        (lambda: LayerGeometry.conv((8, 4, 3, 3), strides=(1,)), "strides must hold 2 integers >= 1"),
        (lambda: LayerGeometry.conv((8, 4, 3, 3), strides=(0, 1)), "strides must hold"),
        (lambda: LayerGeometry.conv((8, 4, 3, 3), pads=(1, 1)), "pads must hold 4 integers >= 0"),
        (lambda: LayerGeometry.conv((8, 4, 3, 3), pads=(1, 1, -1, 1)), "pads must hold integers >= 0"),
        (lambda: LayerGeometry.conv((8, 4, 3, 3), dilations=(1, 0)), "dilations must hold"),
        (lambda: LayerGeometry.conv((8, 4)), "rank >= 3"),
        (lambda: LayerGeometry(op="conv_transpose", weight_shape=(4, 4, 3, 3), out_axis=1, in_axes=(0,)), "op must"),
        (lambda: LayerGeometry(op="gemm", weight_shape=(4, 5), out_axis=0, in_axes=(0,)), r"in_axes must be \(1,\)"),
        (lambda: LayerGeometry(op="matmul", weight_shape=(4, 5), out_axis=0, in_axes=(1,)), "out_axis of a matmul"),
        (lambda: LayerGeometry(op="gemm", weight_shape=(4, 5), out_axis=0, in_axes=(1,), group=2), "group applies"),
        (lambda: LayerGeometry(op="gemm", weight_shape=(4, 0), out_axis=0, in_axes=(1,)), "weight_shape must hold"),
        (
            lambda: LayerGeometry(op="conv", weight_shape=(4, 2, 3), out_axis=0, in_axes=(1, 2), kernel_shape=(2,)),
            r"kernel_shape must be \(3,\)",
        ),
    ],
)
def test_geometry_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------------------------------
# Moments
# ------------------------------------------------------------------------------------------------------

CASES = {
    "3x3_pad1": (LayerGeometry.conv((6, 4, 3, 3), pads=(1, 1, 1, 1)), (3, 4, 6, 6)),
    "stride2_asym_pad_dil2": (
        LayerGeometry.conv((4, 3, 3, 2), strides=(2, 2), pads=(0, 2, 1, 0), dilations=(2, 1)),
        (2, 3, 9, 7),
    ),
    "groups2": (LayerGeometry.conv((6, 2, 3, 3), pads=(1, 1, 1, 1), strides=(2, 1), group=2), (3, 4, 5, 5)),
    "depthwise": (LayerGeometry.conv((4, 1, 3, 3), pads=(1, 1, 1, 1), group=4), (2, 4, 5, 6)),
    "1x1": (LayerGeometry.conv((5, 6, 1, 1)), (3, 6, 4, 4)),
    "conv1d": (LayerGeometry.conv((4, 3, 3), pads=(2, 0), dilations=(2,)), (3, 3, 10)),
    "conv3d": (LayerGeometry.conv((4, 2, 2, 2, 2), strides=(1, 2, 1), pads=(1, 0, 0, 0, 1, 1)), (2, 2, 3, 5, 4)),
    "gemm": (LayerGeometry.gemm((5, 7)), (20, 7)),
    "gemm_no_trans": (LayerGeometry.gemm((7, 5), trans_b=False), (20, 7)),
    "matmul_3d": (LayerGeometry.matmul((7, 5)), (4, 5, 7)),
}


def correlated_input(rng: np.random.Generator, shape: tuple[int, ...], relu: bool = True) -> np.ndarray:
    """Inputs with a channel mean and correlation, like post-ReLU activations (float32)."""
    ch = shape[1] if len(shape) > 2 else shape[-1]
    base = rng.standard_normal(shape)
    if len(shape) > 2:
        mix = rng.standard_normal((ch, ch)) * 0.5 + np.eye(ch)
        base = np.einsum("nc...,cd->nd...", base, mix) if len(shape) > 2 else base
    x = base + 0.5
    return (np.maximum(x, 0) if relu else x).astype(np.float32)


@pytest.mark.parametrize("name", list(CASES))
def test_moments_against_convolution(name):
    geom, xshape = CASES[name]
    rng = np.random.default_rng(1)
    x = correlated_input(rng, xshape)
    xd = x + rng.standard_normal(xshape).astype(np.float32) * 0.1
    m = moments(geom, [x[:1], x[1:]], [xd[:1], xd[1:]])
    p = basis_outputs(x, geom)
    pd = basis_outputs(xd, geom)
    assert m.gram.shape == (geom.group, geom.d, geom.d) and m.has_dense
    assert m.count == p[0].shape[0]
    for g in range(geom.group):
        np.testing.assert_allclose(m.gram[g], p[g].T @ p[g], rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(m.sums[g], p[g].sum(axis=0), rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(m.cross[g], p[g].T @ pd[g], rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(m.gram_dense[g], pd[g].T @ pd[g], rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(m.sums_dense[g], pd[g].sum(axis=0), rtol=1e-10, atol=1e-9)
    # the quadratic form of a real weight is the squared output of the real layer
    w = rng.standard_normal(geom.weight_shape)
    y = ref_layer(x, w, geom)
    rows = geom.rows(w)
    og = geom.n_out // geom.group
    for o in range(geom.n_out):
        g = o // og
        wr = rows[g, o % og]
        assert wr @ m.gram[g] @ wr == pytest.approx(np.sum(y[:, o] ** 2), rel=1e-10)


@pytest.mark.parametrize("name", ["3x3_pad1", "groups2", "gemm", "conv1d", "conv3d"])
def test_moments_float32_chunks_and_batches(name):
    geom, xshape = CASES[name]
    rng = np.random.default_rng(2)
    x = correlated_input(rng, (8, *xshape[1:]))
    xd = (x * 1.1).astype(np.float32)
    ref = moments(geom, x, xd)
    chunked = moments(geom, iter([x[:3], x[3:]]), iter([xd[:3], xd[3:]]), chunk_bytes=1)
    f32 = moments(geom, [x[:5], x[5:]], [xd[:5], xd[5:]], precision="float32")
    assert chunked.count == ref.count == f32.count
    for a, b in ((ref.gram, chunked.gram), (ref.cross, chunked.cross), (ref.gram_dense, chunked.gram_dense)):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-9)
    for a, b in ((ref.gram, f32.gram), (ref.cross, f32.cross), (ref.gram_dense, f32.gram_dense)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    # sums of float32-rounded centred entries (accumulated in float64)
    np.testing.assert_allclose(f32.sums, ref.sums, rtol=1e-6)
    np.testing.assert_allclose(f32.sums_dense, ref.sums_dense, rtol=1e-6)


def test_moments_errors():
    geom = LayerGeometry.conv((4, 3, 3, 3), pads=(1, 1, 1, 1))
    x = np.ones((2, 3, 5, 5), dtype=np.float32)
    with pytest.raises(ValueError, match=r"x_batches must hold \[N, 3, <2 spatial dims>\]"):
        moments(geom, [np.ones((2, 4, 5, 5))])
    with pytest.raises(ValueError, match="same number of batches; xd_batches has more"):
        moments(geom, [x], [x, x])
    with pytest.raises(ValueError, match="same number of batches; x_batches has more"):
        moments(geom, [x, x], [x])
    with pytest.raises(ValueError, match="match x_batches batch for batch"):
        moments(geom, [x], [x[:1]])
    with pytest.raises(ValueError, match="no samples"):
        moments(geom, [])
    with pytest.raises(ValueError, match="precision must be one of float64, float32"):
        moments(geom, x, precision="half")
    with pytest.raises(ValueError, match="smaller than the"):
        moments(LayerGeometry.conv((4, 3, 3, 3)), np.ones((1, 3, 2, 2)))
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(AxcnnError, match="NaN or infinity"):
        moments(geom, bad)
    with pytest.raises(ValueError, match=r"x_batches must hold \[N, ..., 7\] arrays"):
        moments(LayerGeometry.gemm((5, 7)), np.ones((3, 6)))


def test_importance_is_squared_input_per_weight():
    geom, xshape = CASES["groups2"]
    rng = np.random.default_rng(3)
    x = correlated_input(rng, xshape)
    m = moments(geom, x)
    imp = importance(m, geom)
    assert imp.shape == geom.weight_shape and imp.dtype == np.float64
    p = basis_outputs(x, geom)
    og = geom.n_out // geom.group
    for o in range(geom.n_out):
        np.testing.assert_allclose(imp[o].ravel(), (p[o // og] ** 2).sum(axis=0), rtol=1e-10)
    g = LayerGeometry.gemm((7, 5), trans_b=False)
    xg = rng.standard_normal((30, 7))
    imp = importance(moments(g, xg), g)
    assert imp.shape == (7, 5)
    np.testing.assert_allclose(imp, np.broadcast_to((xg**2).sum(axis=0)[:, None], (7, 5)))


# ------------------------------------------------------------------------------------------------------
# Scale and bias
# ------------------------------------------------------------------------------------------------------


def lstsq_fit(z: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    a = np.stack([z, np.ones_like(z)], axis=1)
    (s, t), *_ = np.linalg.lstsq(a, y, rcond=None)
    return float(s), float(t), float(np.sum((s * z + t - y) ** 2))


def quantised(w: np.ndarray, k: int) -> np.ndarray:
    c = cluster_range(w, k, k).get(k)
    return c.centroids[c.indices]


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("name", ["3x3_pad1", "groups2", "depthwise", "gemm", "matmul_3d"])
def test_fit_scale_bias_matches_lstsq(name, dense):
    geom, xshape = CASES[name]
    rng = np.random.default_rng(4)
    x = correlated_input(rng, xshape)
    xd = (x + rng.standard_normal(xshape) * 0.2).astype(np.float32) if dense else x
    w = rng.standard_normal(geom.weight_shape)
    b = rng.standard_normal(geom.n_out)
    wq = quantised(w, 3)
    m = moments(geom, x, xd if dense else None)
    res = fit_scale_bias(m, geom, w, b, wq)
    z = ref_layer(x, wq, geom)
    y = ref_layer(xd, w, geom) + b
    for o in range(geom.n_out):
        s, t, r = lstsq_fit(z[:, o], y[:, o])
        assert 0.25 < s < 4, "test case must not hit the clamp"
        assert res.scale[o] == pytest.approx(s, rel=1e-7, abs=1e-9)
        assert res.bias[o] == pytest.approx(t, rel=1e-7, abs=1e-7)
        assert res.residual_after[o] == pytest.approx(r, rel=1e-6, abs=1e-9)
        assert res.residual_before[o] == pytest.approx(np.sum((z[:, o] + b[o] - y[:, o]) ** 2), rel=1e-9)
    bias_only = fit_bias(m, geom, w, b, wq)
    assert np.all(bias_only.scale == 1.0)
    for o in range(geom.n_out):
        t = np.mean(y[:, o] - z[:, o])
        assert bias_only.bias[o] == pytest.approx(t, rel=1e-9, abs=1e-9)
        assert bias_only.residual_after[o] == pytest.approx(np.sum((z[:, o] + t - y[:, o]) ** 2), rel=1e-6)
    assert np.all(res.residual_after <= bias_only.residual_after + 1e-9)
    assert np.all(bias_only.residual_after <= res.residual_before + 1e-9)


def test_fit_scale_clamp_and_degenerate_channels():
    geom = LayerGeometry.gemm((4, 6))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 6)) + 1.0
    w = rng.standard_normal((4, 6))
    b = np.array([0.5, -1.0, 0.0, 2.0])
    wq = w.copy()
    wq[0] *= 10.0  # optimal scale 0.1: clamped to 0.25
    wq[1] = 0.0  # z == 0: no variance, keep s = 1, the bias absorbs the mean
    wq[2] *= 0.5  # optimal scale 2, inside the range
    res = fit_scale_bias(moments(geom, x), geom, w, b, wq)
    z = x @ wq.T
    y = x @ w.T + b
    assert res.scale[0] == 0.25
    assert res.bias[0] == pytest.approx(np.mean(y[:, 0] - 0.25 * z[:, 0]))
    assert res.residual_after[0] == pytest.approx(np.sum((0.25 * z[:, 0] + res.bias[0] - y[:, 0]) ** 2), rel=1e-9)
    assert res.scale[1] == 1.0 and res.bias[1] == pytest.approx(np.mean(y[:, 1]))
    assert res.residual_after[1] == pytest.approx(np.sum((y[:, 1] - y[:, 1].mean()) ** 2), rel=1e-9)
    assert res.scale[2] == pytest.approx(2.0) and res.residual_after[2] == pytest.approx(0.0, abs=1e-9)
    assert res.scale[3] == pytest.approx(1.0) and res.residual_before[3] == pytest.approx(0.0, abs=1e-9)
    wide = fit_scale_bias(moments(geom, x), geom, w, b, wq, scale_range=(0.05, 20))
    assert wide.scale[0] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="scale_range must satisfy"):
        fit_scale_bias(moments(geom, x), geom, w, b, wq, scale_range=(2, 4))
    with pytest.raises(ValueError, match=r"b_dense must have shape \(4,\)"):
        fit_bias(moments(geom, x), geom, w, b[:3], wq)
    with pytest.raises(ValueError, match=r"weight must have shape \(4, 6\)"):
        fit_bias(moments(geom, x), geom, w.T, b, wq)
    none_bias = fit_bias(moments(geom, x), geom, w, None, wq)
    np.testing.assert_allclose(none_bias.bias, np.mean(x @ w.T - z, axis=0), atol=1e-9)


def test_moments_do_not_fit_other_layer():
    m = moments(LayerGeometry.gemm((4, 6)), np.ones((3, 6)))
    with pytest.raises(ValueError, match="moments do not fit this layer"):
        importance(m, LayerGeometry.gemm((4, 5)))


# ------------------------------------------------------------------------------------------------------
# GPTQ
# ------------------------------------------------------------------------------------------------------


def output_error(w: np.ndarray, wq: np.ndarray, geom: LayerGeometry, gram: np.ndarray) -> float:
    d = geom.rows(w) - geom.rows(wq)
    return float(sum(np.einsum("od,de,oe->", d[g], gram[g], d[g]) for g in range(geom.group)))


def nearest(w: np.ndarray, cent: np.ndarray) -> np.ndarray:
    return np.argmin(np.abs(w[..., None] - cent), axis=-1)


def correlated_gemm(seed: int, d: int = 32, o: int = 16, n: int = 400):
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 4))
    x = latent @ rng.standard_normal((4, d)) + 0.1 * rng.standard_normal((n, d))
    geom = LayerGeometry.gemm((o, d))
    return geom, x, rng.standard_normal((o, d))


def test_gptq_beats_nearest_on_correlated_input():
    ratios = []
    for seed in range(8):
        geom, x, w = correlated_gemm(seed)
        m = moments(geom, x)
        cent = cluster_range(w, 4, 4).get(4).centroids
        idx = gptq_assign(w, cent, m, geom)
        assert idx.shape == w.shape and idx.dtype == np.uint8 and idx.max() < 4
        e_gptq = output_error(w, cent[idx], geom, m.gram)
        e_near = output_error(w, cent[nearest(w, cent)], geom, m.gram)
        ratios.append(e_gptq / e_near)
    assert np.mean(ratios) < 0.8
    assert max(ratios) < 1.0  # strongly correlated inputs: error feedback always helps here


def test_gptq_diagonal_hessian_is_nearest():
    rng = np.random.default_rng(6)
    geom = LayerGeometry.conv((6, 4, 3, 3))
    w = rng.standard_normal(geom.weight_shape)
    cent = np.sort(rng.standard_normal(7))
    h = np.diag(rng.uniform(0.5, 2.0, geom.d))
    for act_order in (True, False):
        idx = gptq_assign(w, cent, h, geom, act_order=act_order, block_size=5)
        assert np.array_equal(idx, nearest(w, cent))


def test_gptq_conv_groups_and_group_codebooks():
    geom, xshape = CASES["groups2"]
    rng = np.random.default_rng(7)
    x = correlated_input(rng, (6, *xshape[1:]))
    m = moments(geom, x)
    w = rng.standard_normal(geom.weight_shape)
    spec = GroupSpec("channel")
    sol = cluster_groups(w, [3], spec).get(3)
    ids = spec.codebook_ids(w.shape)
    idx = gptq_assign(w, sol.centroids, m, geom, codebook_ids=ids, block_size=4)
    assert idx.shape == w.shape and idx.max() < 3
    wq = sol.centroids[ids, idx]
    assert output_error(w, wq, geom, m.gram) <= output_error(w, sol.decode(), geom, m.gram)
    # padded codebooks: an index never points past a group's used entries
    wp = w.copy()
    wp[0] = 0.5  # output channel 0 has a single unique value
    solp = cluster_groups(wp, [3], spec).get(3)
    assert solp.used[0] == 1
    idxp = gptq_assign(wp, solp.centroids, m, geom, codebook_ids=ids)
    assert np.all(idxp[0] == 0)


def test_gptq_dense_target_lowers_dense_error():
    geom, x, w = correlated_gemm(8)
    rng = np.random.default_rng(9)
    xc = x + 0.3 * rng.standard_normal(x.shape)  # the compressed network's input drifted
    m = moments(geom, xc, x)
    cent = cluster_range(w, 8, 8).get(8).centroids

    def dense_error(idx):
        return float(np.sum((xc @ cent[idx].T - x @ w.T) ** 2))

    assert dense_error(gptq_assign(w, cent, m, geom)) < dense_error(gptq_assign(w, cent, m, geom, use_dense=False))


def test_gptq_errors():
    geom = LayerGeometry.gemm((4, 6))
    w = np.ones((4, 6))
    h = np.eye(6)
    with pytest.raises(ValueError, match="need codebook_ids"):
        gptq_assign(w, np.ones((4, 2)), h, geom)
    with pytest.raises(ValueError, match="codebook_ids needs 2-D centroids"):
        gptq_assign(w, np.ones(2), h, geom, codebook_ids=np.zeros((4, 6), int))
    with pytest.raises(ValueError, match=r"codebook_ids must be in \[0, 2\)"):
        gptq_assign(w, np.ones((2, 2)), h, geom, codebook_ids=np.full((4, 6), 2))
    with pytest.raises(ValueError, match="hessian does not fit"):
        gptq_assign(w, np.ones(2), np.eye(5), geom)
    with pytest.raises(ValueError, match="damp must be finite and >= 0"):
        gptq_assign(w, np.ones(2), h, geom, damp=-1)


def test_hessian_damping():
    g = np.array([[[2.0, 1.0], [1.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    h = hessian(g, 0.1)
    np.testing.assert_allclose(h[0], g[0] + 0.3 * np.eye(2))
    np.testing.assert_allclose(h[1], 0.1 * np.eye(2))
    m = Moments(gram=g, sums=np.zeros((2, 2)), count=1)
    np.testing.assert_allclose(hessian(m), g)


def test_numeric_core_imports_no_onnx():
    import subprocess
    import sys

    code = (
        "import sys, axcnn.cluster, axcnn.correct; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'click')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("axis", [1, -1])
def test_fit_outputs_matches_least_squares(seed, axis):
    from axcnn.correct import fit_outputs

    rng = np.random.default_rng(seed)
    shape = (7, 5, 4, 3) if axis == 1 else (40, 5)
    y = rng.normal(0, 1, shape)
    z = 0.8 * y + rng.normal(0, 0.3, shape) + 0.2
    b = rng.normal(0, 0.1, 5)
    fit = fit_outputs(z, y, axis, b)
    zc = np.moveaxis(z, axis, 0).reshape(5, -1)
    yc = np.moveaxis(y, axis, 0).reshape(5, -1)
    for c in range(5):
        a = np.stack([zc[c], np.ones(zc.shape[1])], axis=1)
        (s, t), *_ = np.linalg.lstsq(a, yc[c], rcond=None)
        assert fit.scale[c] == pytest.approx(s) and fit.bias[c] == pytest.approx(t)
        assert fit.residual_after[c] == pytest.approx(np.sum((s * zc[c] + t - yc[c]) ** 2))
        assert fit.residual_before[c] == pytest.approx(np.sum((zc[c] + b[c] - yc[c]) ** 2))
    bias_only = fit_outputs(z, y, axis, scale=False)
    assert np.all(bias_only.scale == 1.0)
    assert np.allclose(bias_only.bias, yc.mean(1) - zc.mean(1))


def test_fit_outputs_guards_constant_channels_and_clamps():
    from axcnn.correct import fit_outputs

    z = np.zeros((10, 2))
    z[:, 1] = np.arange(10)
    y = np.stack([np.arange(10.0), 100.0 * np.arange(10)], axis=1)
    fit = fit_outputs(z, y, 1)
    assert fit.scale[0] == 1.0 and fit.bias[0] == pytest.approx(4.5)  # z constant: bias only
    assert fit.scale[1] == 4.0  # clamped
