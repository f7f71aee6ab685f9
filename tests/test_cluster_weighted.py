"""Tests of weighted clustering in axcnn.cluster.cluster_range: global optimality against brute force, zero
weights, the histogram path, the sklearn backend and validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from axcnn.cluster import Clustering, cluster_range

try:
    import faiss  # noqa: F401

    HAVE_FAISS = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_FAISS = False


def wsse(x: np.ndarray, w: np.ndarray, c: Clustering) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.sum(w * (x - c.centroids[c.indices]) ** 2))


def cluster_cost(x: np.ndarray, w: np.ndarray) -> float:
    """Weighted SSE of one cluster around its weighted mean (0 for zero total weight)."""
    tw = w.sum()
    if tw <= 0:
        return 0.0
    m = np.sum(w * x) / tw
    return float(np.sum(w * (x - m) ** 2))


def brute_assignments(x: np.ndarray, w: np.ndarray, k: int) -> float:
    """Optimal weighted SSE with at most ``k`` clusters over all ``k**n`` assignments (no contiguity)."""
    best = np.inf
    for lab in itertools.product(range(k), repeat=x.shape[0]):
        lab = np.asarray(lab)
        best = min(best, sum(cluster_cost(x[lab == j], w[lab == j]) for j in range(k)))
    return best


def brute_partitions(x: np.ndarray, w: np.ndarray, k: int) -> float:
    """Optimal weighted SSE over every contiguous partition of the sorted values into exactly ``k`` runs of
    unique values (equal values never split)."""
    u, inv = np.unique(x, return_inverse=True)
    wu = np.bincount(inv, weights=w, minlength=u.shape[0])
    n = u.shape[0]
    best = np.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cuts, n)
        best = min(best, sum(cluster_cost(u[a:b], wu[a:b]) for a, b in itertools.pairwise(edges)))
    return best


def naive_weighted_dp(x: np.ndarray, w: np.ndarray, kmax: int) -> np.ndarray:
    """Optimal weighted SSE for K = 1..kmax by the plain O(K N^2) DP over the sorted unique values."""
    u, inv = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True)
    wu = np.bincount(inv, weights=w, minlength=u.shape[0])
    n = u.shape[0]
    cost = np.zeros((n + 1, n + 1))
    for j in range(n):
        for i in range(j + 1, n + 1):
            cost[j, i] = cluster_cost(u[j:i], wu[j:i])
    d = np.full((kmax + 1, n + 1), np.inf)
    d[0, 0] = 0.0
    for k in range(1, kmax + 1):
        for i in range(k, n + 1):
            d[k, i] = min(d[k - 1, j] + cost[j, i] for j in range(k - 1, i))
    return d[1:, n]


def check_weighted(x: np.ndarray, w: np.ndarray, c: Clustering) -> None:
    """Invariants of a weighted Clustering: sorted distinct centroids, each the weighted mean of its values
    (unweighted mean for a zero-weight cluster), exact weighted inertia."""
    x = np.asarray(x, dtype=np.float64).ravel()
    w = np.asarray(w, dtype=np.float64).ravel()
    idx = c.indices.ravel().astype(np.intp)
    assert c.indices.shape == np.shape(c.indices) and idx.min() >= 0 and idx.max() < c.k
    assert np.all(np.diff(c.centroids) > 0)
    for j in range(c.k):
        m = idx == j
        assert m.any()
        ref = np.sum(w[m] * x[m]) / w[m].sum() if w[m].sum() > 0 else x[m].mean()
        assert c.centroids[j] == pytest.approx(ref, rel=1e-12, abs=1e-12)
    assert c.inertia == pytest.approx(wsse(x, w, c), rel=1e-9, abs=1e-12)


def random_case(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Values with ties (rounded) and weights with zeros."""
    x = np.round(rng.standard_normal(n) * rng.uniform(0.5, 3), int(rng.integers(0, 2)))
    w = rng.exponential(size=n) * rng.uniform(0.1, 10)
    w[rng.random(n) < 0.3] = 0.0
    return x, w


# ------------------------------------------------------------------------------------------------------
# Optimality
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(25))
def test_weighted_matches_brute_force_assignments(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 8))
    x, w = random_case(rng, n)
    tab = cluster_range(x, 1, 3, weights=w)
    n_unique = len(np.unique(x))
    assert tab.ks == tuple(range(1, min(3, n_unique) + 1)) and tab.weighted
    for k in tab.ks:
        assert tab.inertia(k) == pytest.approx(brute_assignments(x, w, k), rel=1e-9, abs=1e-12)
        c = tab.get(k)
        assert c.k == k and c.inertia == tab.inertia(k)
        check_weighted(x, w, c)


@pytest.mark.parametrize("seed", range(25))
def test_weighted_matches_brute_force_partitions(seed):
    rng = np.random.default_rng(1000 + seed)
    x, w = random_case(rng, int(rng.integers(2, 13)))
    n_unique = len(np.unique(x))
    tab = cluster_range(x, 1, 12, weights=w)
    assert tab.ks[-1] == n_unique and tab.inertia(n_unique) == 0.0
    for k in tab.ks:
        assert tab.inertia(k) == pytest.approx(brute_partitions(x, w, k), rel=1e-9, abs=1e-12)
        check_weighted(x, w, tab.get(k))


@pytest.mark.parametrize("seed", range(8))
def test_weighted_divide_and_conquer_matches_naive_dp(seed):
    # The D&C pruning relies on monotone optimal splits; zero weights create many ties.
    rng = np.random.default_rng(2000 + seed)
    x, w = random_case(rng, int(rng.integers(40, 90)))
    x = x**3
    kmax = min(15, len(np.unique(x)) - 1)
    tab = cluster_range(x, 1, kmax, weights=w)
    got = [tab.inertia(k) for k in tab.ks]
    np.testing.assert_allclose(got, naive_weighted_dp(x, w, kmax), rtol=1e-9, atol=1e-12)


def test_integer_weights_equal_replication():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(400)
    w = rng.integers(1, 4, size=400).astype(np.float64)
    rep = np.repeat(x, w.astype(int))
    a = cluster_range(x, 1, 20, weights=w)
    b = cluster_range(rep, 1, 20)
    for k in a.ks:
        assert a.inertia(k) == pytest.approx(b.inertia(k), rel=1e-9)
        np.testing.assert_allclose(a.get(k).centroids, b.get(k).centroids, rtol=1e-9, atol=1e-12)


def test_uniform_weights_match_unweighted_and_scale():
    x = np.random.default_rng(4).standard_normal((8, 4, 3, 3)).astype(np.float32)
    ref = cluster_range(x, 1, 30)
    ones = cluster_range(x, 1, 30, weights=np.ones(x.shape))
    scaled = cluster_range(x, 1, 30, weights=np.full(x.shape, 7.5))
    assert not ref.weighted and ones.weighted
    for k in ref.ks:
        assert ones.inertia(k) == pytest.approx(ref.inertia(k), rel=1e-12)
        assert scaled.inertia(k) == pytest.approx(7.5 * ref.inertia(k), rel=1e-12)
        assert np.array_equal(ones.get(k).indices, ref.get(k).indices)
        assert np.array_equal(scaled.get(k).indices, ref.get(k).indices)


def test_weights_pull_centroids_towards_important_values():
    x = np.array([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    w = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1000.0])
    c = cluster_range(x, 2, 2, weights=w).get(2)
    assert c.centroids[1] > 11.9  # dominated by the heavy value
    check_weighted(x, w, c)


# ------------------------------------------------------------------------------------------------------
# Zero weights and degenerate inputs
# ------------------------------------------------------------------------------------------------------


def test_zero_weight_cluster_takes_unweighted_mean():
    x = np.array([0.0, 0.1, 5.0, 5.2, 9.0, 9.4])
    w = np.array([1.0, 1.0, 0.0, 0.0, 2.0, 1.0])
    tab = cluster_range(x, 3, 3, weights=w)
    c = tab.get(3)
    assert not np.any(np.isnan(c.centroids))
    assert tab.inertia(3) == pytest.approx(brute_partitions(x, w, 3), abs=1e-12)
    check_weighted(x, w, c)


@pytest.mark.parametrize("backend", ["exact", "sklearn"])
def test_all_zero_weights_partition_unweighted_with_zero_inertia(backend):
    x = np.random.default_rng(5).standard_normal(50)
    w = np.zeros(50)
    tab = cluster_range(x, 1, 6, weights=w, backend=backend, seed=0)
    ref = cluster_range(x, 1, 6, backend=backend, seed=0)
    for k in tab.ks:
        c = tab.get(k)
        assert tab.inertia(k) == 0.0 and c.inertia == 0.0
        assert not np.any(np.isnan(c.centroids))
        np.testing.assert_allclose(c.centroids, ref.get(k).centroids, rtol=1e-12)


@pytest.mark.parametrize("backend", ["exact", "sklearn"])
@pytest.mark.parametrize(
    ("x", "kmin", "kmax", "ks"),
    [
        (np.array([0.25]), 1, 4, (1,)),  # one element
        (np.array([1.0, 2.0, 4.0, 9.0]), 1, 1, (1,)),  # K = 1
        (np.array([1.0, 2.0, 2.0, 5.0]), 3, 9, (3,)),  # K >= unique values
        (np.full(6, -0.5), 2, 5, (1,)),  # all equal
    ],
)
def test_weighted_degenerate(backend, x, kmin, kmax, ks):
    w = np.linspace(0.0, 2.0, x.shape[0])
    tab = cluster_range(x, kmin, kmax, weights=w, backend=backend)
    assert tab.ks == ks
    for k in tab.ks:
        c = tab.get(k)
        check_weighted(x, w, c)
        if k == len(np.unique(x)):
            assert c.inertia == 0.0
    if ks == (1,) and len(np.unique(x)) > 1:
        assert tab.get(1).centroids[0] == pytest.approx(np.sum(w * x) / w.sum())


def test_single_zero_weight_element():
    tab = cluster_range(np.array([[3.5]]), 1, 2, weights=np.zeros((1, 1)))
    c = tab.get(1)
    assert c.centroids.tolist() == [3.5] and c.inertia == 0.0 and c.indices.shape == (1, 1)


# ------------------------------------------------------------------------------------------------------
# Histogram path
# ------------------------------------------------------------------------------------------------------


def test_weighted_binned_equals_replicated_binned():
    # Positive integer weights: the replicated array has the same range, hence the same bins.
    rng = np.random.default_rng(6)
    x = rng.standard_normal(3000)
    w = rng.integers(1, 4, size=3000).astype(np.float64)
    a = cluster_range(x, 2, 12, weights=w, max_bins=256)
    b = cluster_range(np.repeat(x, w.astype(int)), 2, 12, max_bins=256)
    assert a.binned and b.binned
    for k in a.ks:
        assert a.inertia(k) == pytest.approx(b.inertia(k), rel=1e-9)
        check_weighted(x, w, a.get(k))


def test_weighted_binned_with_zero_weights_is_exact_and_near_optimal():
    rng = np.random.default_rng(7)
    x = rng.standard_normal(5000)
    w = rng.exponential(size=5000)
    w[rng.random(5000) < 0.2] = 0.0
    w[np.abs(x) > 2.5] = 0.0  # whole zero-weight bins at the tails
    tab = cluster_range(x, 2, 10, weights=w, max_bins=512)
    ref = cluster_range(x, 2, 10, weights=w)  # unique-value path, optimal
    assert tab.binned and not ref.binned
    for k in tab.ks:
        c = tab.get(k)
        check_weighted(x, w, c)
        assert ref.inertia(k) <= tab.inertia(k) * (1 + 1e-9)
        assert tab.inertia(k) <= ref.inertia(k) * 1.01


@pytest.mark.parametrize("max_bins", [64, 1024])
def test_weighted_quantised_and_medium_unique_paths(max_bins):
    rng = np.random.default_rng(8)
    x = (rng.integers(-40, 40, size=4000) * 0.01).astype(np.float32)  # single-valued bins at 1024
    if max_bins == 64:
        x = rng.choice(rng.standard_normal(50), size=4000)  # bins not single-valued, few unique values
    w = rng.exponential(size=4000)
    tab = cluster_range(x, 2, 8, weights=w, max_bins=max_bins)
    ref = cluster_range(x, 2, 8, weights=w, max_bins=1 << 16)
    assert not tab.binned
    for k in tab.ks:
        assert tab.inertia(k) == pytest.approx(ref.inertia(k), rel=1e-9)
        check_weighted(x, w, tab.get(k))


# ------------------------------------------------------------------------------------------------------
# Backends and validation
# ------------------------------------------------------------------------------------------------------


def test_sklearn_weighted_invariants_and_not_better_than_exact():
    rng = np.random.default_rng(9)
    x = rng.standard_normal(300)
    w = rng.exponential(size=300)
    w[:30] = 0.0
    sk = cluster_range(x, 2, 8, weights=w, backend="sklearn", seed=0)
    ex = cluster_range(x, 2, 8, weights=w)
    for k in sk.ks:
        check_weighted(x, w, sk.get(k))
        if k in ex:
            assert ex.inertia(k) <= sk.inertia(k) * (1 + 1e-9)


@pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed")
def test_faiss_refuses_weights():
    with pytest.raises(ValueError, match="weights.*faiss"):
        cluster_range(np.arange(10.0), 2, 3, weights=np.ones(10), backend="faiss")


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        (np.ones(9), r"weights must have the shape of the values \(10,\), got \(9,\)"),
        (np.array([1.0] * 9 + [-0.5]), r"weights must be finite and in \[0, inf\), got -0.5 at index \(9,\)"),
        (np.array([1.0] * 4 + [np.nan] + [1.0] * 5), r"weights must be finite.*nan at index \(4,\)"),
        (np.array([np.inf] + [1.0] * 9), r"weights must be finite.*inf at index \(0,\)"),
        (np.array(["a"] * 10), "weights must be a real numeric array"),
    ],
)
def test_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        cluster_range(np.arange(10.0), 1, 3, weights=weights)
