"""Tests of axcnn.cluster.vq: vector layout and padding, Lloyd fixed point, determinism, weights, clamping."""

from __future__ import annotations

import numpy as np
import pytest

from axcnn.cluster import cluster_range, cluster_vectors, eq1_bits, n_vectors
from axcnn.cluster.vq import index_shape, to_vectors


def assert_fixed_point(x, w, sol, axis, dim):
    """Lloyd's fixed point: every vector at its nearest centroid (in its weighted metric), every centroid the
    weighted mean of its vectors, and the inertia the weighted SSE of the decoded weight."""
    w = np.ones(x.shape) if w is None else w
    xv = to_vectors(x.astype(np.float64), axis, dim)
    wv = to_vectors(w, axis, dim, pad_value=0.0)
    lab = np.moveaxis(sol.indices, axis, -1).reshape(-1).astype(np.intp)
    assert lab.min() >= 0 and lab.max() < sol.k
    d = np.einsum("mj,mkj->mk", wv, (xv[:, None, :] - sol.centroids[None]) ** 2)
    mass = wv.sum(axis=1)
    live = mass > 0
    np.testing.assert_allclose(d[np.arange(len(lab)), lab][live], d.min(axis=1)[live], rtol=1e-9, atol=1e-15)
    for c in range(sol.k):
        m = lab == c
        assert m.any()
        den = wv[m].sum(axis=0)
        ref = np.where(den > 0, (wv[m] * xv[m]).sum(axis=0) / np.where(den > 0, den, 1), sol.centroids[c])
        np.testing.assert_allclose(sol.centroids[c], ref, rtol=1e-9, atol=1e-12)
    assert sol.inertia == pytest.approx(float(np.sum(w * (x - sol.decode()) ** 2)), rel=1e-9, abs=1e-12)


def test_layout_and_counts():
    assert index_shape((64, 64, 3, 3), 1, 2) == (64, 32, 3, 3)
    assert index_shape((10, 7), 1, 2) == (10, 4)
    assert index_shape((10, 7), -2, 3) == (4, 7)
    assert n_vectors((10, 7), 1, 2) == 40
    assert eq1_bits(70, 16, 32, vector_dim=2, vectors=n_vectors((10, 7), 1, 2)) == 40 * 4 + 16 * 2 * 32
    x = np.arange(2 * 3 * 2).reshape(2, 3, 2)
    v = to_vectors(x, 1, 2)
    # vectors run along axis 1; the last of each row is padded with the row's last element
    assert v.tolist() == [[0, 2], [4, 4], [1, 3], [5, 5], [6, 8], [10, 10], [7, 9], [11, 11]]


@pytest.mark.parametrize(("shape", "axis"), [((16, 8, 3, 3), 1), ((12, 7, 3, 3), 1), ((20, 9), 1), ((9, 40), 0)])
def test_fixed_point_and_decode(shape, axis):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    tab = cluster_vectors(x, [4, 16, 64], vector_axis=axis, seed=3)
    assert tab.ks == (4, 16, 64) and not tab.clamped
    prev = np.inf
    for k in tab.ks:
        sol = tab.get(k)
        assert sol.converged and sol.n_iter >= 1
        assert sol.centroids.shape == (k, 2) and sol.centroids.dtype == np.float64
        assert sol.indices.shape == index_shape(shape, axis, 2) and sol.indices.dtype == np.uint8
        assert sol.decode().shape == shape
        assert_fixed_point(x, None, sol, axis, 2)
        assert sol.inertia < prev
        prev = sol.inertia


def test_padding_excluded_from_fit():
    # odd axis: the padding copies the last weight; changing it must not change anything
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 5))
    sol = cluster_vectors(x, [8], seed=0).get(8)
    xv = to_vectors(x, 1, 2)
    lab = sol.indices.reshape(-1)
    pad_rows = np.arange(2, len(lab), 3)  # the third vector of every row is [x4, pad]
    # the fitted inertia counts only real weights
    real = np.sum((x - sol.decode()) ** 2)
    assert sol.inertia == pytest.approx(real)
    assert np.all(xv[pad_rows, 0] == xv[pad_rows, 1])
    assert_fixed_point(x, None, sol, 1, 2)


def test_deterministic_for_a_seed():
    x = np.random.default_rng(2).standard_normal((32, 16, 3, 3))
    a = cluster_vectors(x, [32], seed=7).get(32)
    b = cluster_vectors(x, [32], seed=7).get(32)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.indices, b.indices)
    assert a.inertia == b.inertia
    c = cluster_vectors(x, [8, 32, 64], seed=7).get(32)  # other K in the same call change nothing
    assert np.array_equal(a.indices, c.indices) and a.inertia == c.inertia


def test_recovers_separated_clusters():
    rng = np.random.default_rng(3)
    centres = np.array([[-5.0, -5.0], [-5.0, 5.0], [5.0, -5.0], [5.0, 5.0], [0.0, 0.0]])
    lab = rng.integers(0, 5, size=500)
    pts = centres[lab] + rng.standard_normal((500, 2)) * 0.01
    x = pts.T.copy()  # [2, 500]: vectors along axis 0
    sol = cluster_vectors(x, [5], vector_axis=0, seed=0).get(5)
    got = sol.centroids[np.lexsort(sol.centroids.T[::-1])]
    np.testing.assert_allclose(got, centres[np.lexsort(centres.T[::-1])], atol=0.01)


def test_vector_dim_1_close_to_exact_optimum():
    x = np.random.default_rng(4).standard_normal(2000)
    tab = cluster_vectors(x, [4, 16], vector_axis=0, vector_dim=1)
    exact = cluster_range(x, 4, 16)
    for k in (4, 16):
        assert exact.inertia(k) <= tab.inertia(k) * (1 + 1e-9)
        assert tab.inertia(k) <= exact.inertia(k) * 1.05


def test_k_at_or_above_distinct_vectors_is_exact():
    x = np.array([[1.0, 2.0, 1.0, 2.0, 3.0, 3.0], [1.0, 2.0, 1.0, 2.0, 3.0, 3.0]])  # 2 distinct vectors
    tab = cluster_vectors(x, [1, 2, 5], vector_axis=1)
    assert tab.n_distinct == 2 and tab.clamped and tab.ks == (1, 2)
    sol = tab.get(2)
    assert sol.inertia == 0.0 and np.array_equal(sol.decode(), x)
    one = tab.get(1)
    np.testing.assert_allclose(one.centroids[0], [np.mean([1, 1, 3]), np.mean([2, 2, 3])])


def test_one_element_and_all_equal():
    sol = cluster_vectors(np.array([[0.5]]), [1, 4]).get(1)
    assert sol.centroids.tolist() == [[0.5, 0.5]] and sol.inertia == 0.0 and sol.decode().tolist() == [[0.5]]
    tab = cluster_vectors(np.full((4, 6), -1.0), [3])
    assert tab.ks == (1,) and tab.inertia(1) == 0.0


def test_weights_shape_the_metric():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 8, 3, 3))
    w = rng.exponential(size=x.shape)
    w[:, ::2][rng.random(w[:, ::2].shape) < 0.3] = 0.0
    sol = cluster_vectors(x, [32], weights=w, seed=1).get(32)
    assert sol.converged
    assert_fixed_point(x, w, sol, 1, 2)
    # weighting shifts the fit towards important weights: their weighted error beats the unweighted fit's
    plain = cluster_vectors(x, [32], seed=1).get(32)
    assert sol.inertia < float(np.sum(w * (x - plain.decode()) ** 2))


def test_all_zero_weights():
    x = np.random.default_rng(6).standard_normal((10, 6))
    tab = cluster_vectors(x, [4], weights=np.zeros(x.shape))
    sol = tab.get(4)
    assert sol.inertia == 0.0 and not np.isnan(sol.centroids).any() and sol.k == 4
    ref = cluster_vectors(x, [4]).get(4)
    np.testing.assert_allclose(sol.centroids, ref.centroids)


def test_max_iter_reports_not_converged():
    x = np.random.default_rng(7).standard_normal((64, 32, 3, 3))
    sol = cluster_vectors(x, [64], max_iter=2).get(64)
    assert not sol.converged and sol.n_iter == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(vector_dim=0), "vector_dim must be >= 1, got 0"),
        (dict(vector_axis=4), r"vector_axis must be in \[-2, 1\].*got 4"),
        (dict(max_iter=0), "max_iter must be >= 1, got 0"),
        (dict(weights=np.ones(3)), "weights must have the shape"),
        (dict(weights=-np.ones((4, 6))), r"weights must be finite and in \[0, inf\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cluster_vectors(np.ones((4, 6)), [2], **kwargs)
