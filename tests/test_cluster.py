"""Tests of axcnn.cluster: Eq. 1 arithmetic, optimality of the exact backend, binning, degenerate inputs."""

from __future__ import annotations

import itertools
import logging
import sys

import numpy as np
import pytest

from axcnn.cluster import (
    BACKENDS,
    Clustering,
    cluster_range,
    compression_ratio,
    eq1_bits,
    index_bits,
)
from axcnn.errors import AxcnnError, MissingBackendError

try:
    import faiss  # noqa: F401

    HAVE_FAISS = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_FAISS = False

needs_faiss = pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed")
ALL_BACKENDS = [pytest.param(b, marks=needs_faiss) if b == "faiss" else b for b in BACKENDS]


def sse(x: np.ndarray, c: Clustering) -> float:
    """Direct float64 recomputation of the inertia from centroids[indices]."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.sum((x - c.centroids[c.indices]) ** 2))


def check_clustering(x: np.ndarray, c: Clustering) -> None:
    """Invariants every Clustering must satisfy."""
    x = np.asarray(x, dtype=np.float64)
    assert c.centroids.dtype == np.float64
    assert c.centroids.shape == (c.k,)
    assert np.all(np.diff(c.centroids) > 0), "centroids must be sorted and distinct"
    assert c.indices.shape == x.shape
    expected = np.uint8 if c.k <= 256 else np.uint16 if c.k <= 65536 else np.int32
    assert c.indices.dtype == expected
    assert c.indices.min() >= 0 and int(c.indices.max()) < c.k
    # every centroid is used and is the mean of its values
    counts = np.bincount(c.indices.ravel().astype(np.intp), minlength=c.k)
    assert np.all(counts > 0)
    means = np.bincount(c.indices.ravel().astype(np.intp), weights=x.ravel(), minlength=c.k) / counts
    np.testing.assert_allclose(c.centroids, means, rtol=1e-12, atol=1e-12)
    assert c.inertia == pytest.approx(sse(x, c), rel=1e-9, abs=1e-12)


def brute_force_contiguous(x: np.ndarray, k: int) -> float:
    """Optimal k-means SSE of 1-D data by enumerating every contiguous partition of the sorted values."""
    s = np.sort(np.asarray(x, dtype=np.float64))
    n = s.shape[0]
    best = np.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cuts, n)
        tot = sum(float(np.sum((s[a:b] - s[a:b].mean()) ** 2)) for a, b in itertools.pairwise(edges))
        best = min(best, tot)
    return best


def brute_force_assignments(x: np.ndarray, k: int) -> float:
    """Optimal k-means SSE by enumerating all k**n assignments (no contiguity assumption)."""
    x = np.asarray(x, dtype=np.float64)
    best = np.inf
    for lab in itertools.product(range(k), repeat=x.shape[0]):
        lab = np.asarray(lab)
        tot = 0.0
        for j in range(k):
            m = lab == j
            if m.any():
                tot += float(np.sum((x[m] - x[m].mean()) ** 2))
        best = min(best, tot)
    return best


# ------------------------------------------------------------------------------------------------------
# Eq. 1
# ------------------------------------------------------------------------------------------------------


def test_index_bits():
    assert index_bits(1) == 0
    assert index_bits(2) == 1
    assert index_bits(3) == 2
    assert index_bits(5) == 3
    assert index_bits(256) == 8
    assert index_bits(257) == 9
    with pytest.raises(ValueError):
        index_bits(0)


def test_eq1_paper_int8_kernel():
    # 5x5 int8 kernel shared with K=5: 25 * 3 index bits + 5 * 8 centroid bits (paper, Section III).
    assert eq1_bits(25, 5, 8) == 115
    assert compression_ratio(25, 5, 8) == pytest.approx(200 / 115)


def test_eq1_paper_mobilenetv2_first_layer():
    # 864 fp32 weights with K=38: 864 * 6 + 38 * 32 = 5184 + 1216 bits vs 27648 bits.
    assert eq1_bits(864, 38, 32) == 864 * 6 + 38 * 32 == 6400
    assert compression_ratio(864, 38, 32) == pytest.approx(27648 / 6400)
    assert compression_ratio(864, 38, 32) == pytest.approx(4.32)


def test_eq1_k1_has_no_index_bits():
    assert eq1_bits(100, 1, 32) == 32
    assert compression_ratio(100, 1, 32) == pytest.approx(100.0)


def test_eq1_several_codebooks():
    # per-output-channel codebooks of a 16x8x3x3 conv, K=4, fp32: 1152 * 2 + 16 * 4 * 32 bits
    assert eq1_bits(1152, 4, 32, codebooks=16) == 1152 * 2 + 16 * 4 * 32
    assert compression_ratio(1152, 4, 32, codebooks=16) == pytest.approx(1152 * 32 / (2304 + 2048))
    assert eq1_bits(1152, 4, 32, codebooks=1) == eq1_bits(1152, 4, 32)


def test_eq1_vectors():
    # 2-D entries: one index per pair of weights, K entries of 2 values each
    assert eq1_bits(1152, 256, 32, vector_dim=2) == 576 * 8 + 256 * 2 * 32
    # odd count: ceil(weights / 2) vectors by default, or the padded count when given
    assert eq1_bits(9, 4, 8, vector_dim=2) == 5 * 2 + 4 * 2 * 8
    assert eq1_bits(3 * 5, 4, 8, vector_dim=2, vectors=3 * 3) == 9 * 2 + 4 * 2 * 8
    assert compression_ratio(1152, 256, 32, vector_dim=2) == pytest.approx(1152 * 32 / (4608 + 16384))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(codebooks=0), "codebooks must be >= 1"),
        (dict(vector_dim=0), "vector_dim must be >= 1"),
        (dict(vector_dim=2, vectors=4), r"vectors must be >= ceil\(weights / vector_dim\) = 5"),
        (dict(codebooks=1.5), "codebooks must be an integer"),
    ],
)
def test_eq1_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eq1_bits(10, 4, 8, **kwargs)


# ------------------------------------------------------------------------------------------------------
# Exact backend: optimality and consistency
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_exact_matches_brute_force_partitions(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 11))
    x = rng.standard_normal(n) * rng.uniform(0.1, 10)
    tab = cluster_range(x, 1, n)
    assert tab.ks == tuple(range(1, n + 1))
    for k in range(1, min(n, 6) + 1):
        assert tab.inertia(k) == pytest.approx(brute_force_contiguous(x, k), rel=1e-9, abs=1e-9)
        check_clustering(x, tab.get(k))


@pytest.mark.parametrize("seed", range(3))
def test_exact_matches_brute_force_all_assignments(seed):
    x = np.random.default_rng(100 + seed).uniform(-1, 1, size=6)
    tab = cluster_range(x, 1, 3)
    for k in (1, 2, 3):
        assert tab.inertia(k) == pytest.approx(brute_force_assignments(x, k), rel=1e-9, abs=1e-9)


def test_exact_with_duplicates_matches_brute_force():
    x = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 2.5, 3.0, 3.0, 7.0, 7.5])
    tab = cluster_range(x, 1, 6)
    assert tab.n_unique == 6 and not tab.clamped
    for k in tab.ks:
        assert tab.inertia(k) == pytest.approx(brute_force_contiguous(x, k), rel=1e-9, abs=1e-9)


def naive_dp(x: np.ndarray, kmax: int) -> np.ndarray:
    """Optimal SSE for K = 1..kmax by the plain O(K N^2) dynamic programme over the sorted points."""
    s = np.sort(np.asarray(x, dtype=np.float64))
    s = s - s.mean()
    n = s.shape[0]
    p1 = np.concatenate([[0.0], np.cumsum(s)])
    p2 = np.concatenate([[0.0], np.cumsum(s * s)])
    d = np.full((kmax + 1, n + 1), np.inf)
    d[0, 0] = 0.0
    for k in range(1, kmax + 1):
        for i in range(k, n + 1):
            j = np.arange(k - 1, i)
            cost = (p2[i] - p2[j]) - (p1[i] - p1[j]) ** 2 / (i - j)
            d[k, i] = np.min(d[k - 1, j] + np.maximum(cost, 0.0))
    return d[1:, n]


@pytest.mark.parametrize("seed", range(4))
def test_exact_matches_naive_dp(seed):
    # Checks the divide-and-conquer pruning against the unpruned DP on heavy-tailed data with duplicates.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(int(rng.integers(60, 150))) ** 3
    if seed % 2:
        x = np.round(x, 1)
    kmax = min(20, len(np.unique(x)) - 1)
    tab = cluster_range(x, 1, kmax)
    np.testing.assert_allclose([tab.inertia(k) for k in tab.ks], naive_dp(x, kmax), rtol=1e-9, atol=1e-9)


def test_exact_not_worse_than_sklearn():
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_normal(700) * 0.05, rng.laplace(0.1, 0.02, size=300)])
    tab = cluster_range(x, 2, 12)
    for k in (2, 5, 12):
        with threadpool_limits(1):  # tiny problem: OpenMP threads only add overhead
            km = KMeans(n_clusters=k, n_init=10, random_state=0).fit(x.reshape(-1, 1))
        assert tab.inertia(k) <= km.inertia_ + 1e-9


def test_exact_inertia_consistency_and_monotone():
    x = (np.random.default_rng(3).standard_normal((16, 8, 3, 3)) * 0.1).astype(np.float32)
    tab = cluster_range(x, 3, 40)
    assert tab.ks == tuple(range(3, 41)) and not tab.binned and not tab.clamped
    inert = [tab.inertia(k) for k in tab.ks]
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(inert))
    for k in (3, 17, 40):
        c = tab.get(k)
        assert c.k == k
        assert c.inertia == tab.inertia(k)
        check_clustering(x, c)
        assert tab.get(k) is c  # cached


def test_exact_k1_is_mean():
    x = np.array([1.0, 2.0, 4.0, 9.0], dtype=np.float32)
    c = cluster_range(x, 1, 1).get(1)
    assert c.centroids.tolist() == [4.0]
    assert c.inertia == pytest.approx(float(np.sum((x - 4.0) ** 2)))


def test_get_unknown_k_raises_keyerror():
    tab = cluster_range(np.arange(10.0), 2, 4)
    with pytest.raises(KeyError, match=r"available K: 2\.\.4"):
        tab.get(5)
    with pytest.raises(KeyError):
        tab.inertia(1)
    assert 3 in tab and 5 not in tab


# ------------------------------------------------------------------------------------------------------
# Binned exact path
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_bins", "kmax"), [(64, 6), (256, 12)])
def test_binned_inertia_exact_and_near_optimal(max_bins, kmax):
    # Binning moves cluster boundaries to bin edges: with 64 bins over ~8 sigma the loss grows with K
    # (about 1.3% at K=8), hence the smaller K range for the coarsest histogram.
    x = np.random.default_rng(11).standard_normal(10_000).astype(np.float32)
    tab = cluster_range(x, 2, kmax, max_bins=max_bins)
    ref = cluster_range(x, 2, kmax)
    assert tab.binned and not ref.binned
    assert tab.n_unique == ref.n_unique
    for k in tab.ks:
        c = tab.get(k)
        check_clustering(x, c)
        assert tab.inertia(k) == pytest.approx(sse(x, c), rel=1e-9)
        assert ref.inertia(k) <= tab.inertia(k) * (1 + 1e-9)
        assert tab.inertia(k) <= ref.inertia(k) * 1.01


def test_binned_exact_bins_on_quantised_weights():
    # More values than max_bins but few unique values: the histogram is exact, no binning loss.
    rng = np.random.default_rng(5)
    x = (rng.integers(-128, 128, size=5000) * 0.01).astype(np.float32)
    tab = cluster_range(x, 2, 10, max_bins=1024)
    ref = cluster_range(x, 2, 10, max_bins=1 << 16)
    assert not tab.binned and tab.n_unique == ref.n_unique == len(np.unique(x))
    for k in tab.ks:
        assert tab.inertia(k) == pytest.approx(ref.inertia(k), rel=1e-9)


def test_binned_medium_unique_count_uses_unique_path():
    # More values than max_bins, unique count below it, but bins not single-valued.
    rng = np.random.default_rng(6)
    x = rng.choice(rng.standard_normal(300), size=4000)
    tab = cluster_range(x, 2, 6, max_bins=512)
    ref = cluster_range(x, 2, 6, max_bins=1 << 16)
    assert not tab.binned and tab.n_unique == 300
    for k in tab.ks:
        assert tab.inertia(k) == pytest.approx(ref.inertia(k), rel=1e-9)
        check_clustering(x, tab.get(k))


def test_binned_clamps_to_nonempty_bins(caplog):
    x = np.random.default_rng(2).standard_normal(1000)
    with caplog.at_level(logging.WARNING, logger="axcnn.cluster"):
        tab = cluster_range(x, 5, 100, max_bins=16)
    assert tab.binned and tab.clamped and tab.ks[-1] <= 16
    assert "max_bins" in caplog.text
    check_clustering(x, tab.get(tab.ks[-1]))


# ------------------------------------------------------------------------------------------------------
# Degenerate inputs, every backend
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_k1_is_mean(backend):
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    tab = cluster_range(x, 1, 1, backend=backend)
    c = tab.get(1)
    assert tab.ks == (1,)
    assert c.centroids[0] == pytest.approx(float(x.astype(np.float64).mean()))
    check_clustering(x, c)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_k_above_unique_is_clamped(backend):
    x = np.array([[0.5, -1.0, 0.5], [2.0, -1.0, 3.0]], dtype=np.float32)
    tab = cluster_range(x, 2, 10, backend=backend)
    assert tab.n_unique == 4 and tab.clamped
    assert tab.ks[-1] == 4
    c = tab.get(4)
    assert tab.inertia(4) == 0.0 and c.inertia == 0.0
    assert c.centroids.tolist() == [-1.0, 0.5, 2.0, 3.0]
    check_clustering(x, c)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_kmin_above_unique_gives_single_candidate(backend):
    x = np.array([1.0, 2.0, 2.0, 5.0])
    tab = cluster_range(x, 7, 9, backend=backend)
    assert tab.ks == (3,) and tab.clamped
    assert tab.inertia(3) == 0.0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_one_element(backend):
    x = np.array([[0.25]], dtype=np.float32)
    tab = cluster_range(x, 1, 4, backend=backend)
    assert tab.ks == (1,) and tab.n_unique == 1 and tab.clamped
    c = tab.get(1)
    assert c.centroids.tolist() == [0.25] and c.indices.shape == (1, 1) and c.inertia == 0.0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_equal(backend):
    x = np.full((3, 3, 3), -0.125, dtype=np.float32)
    tab = cluster_range(x, 2, 16, backend=backend)
    assert tab.ks == (1,) and tab.n_unique == 1
    assert tab.inertia(1) == 0.0
    check_clustering(x, tab.get(1))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_integer_valued_few_unique(backend):
    rng = np.random.default_rng(1)
    x = rng.integers(-3, 4, size=(20, 9)).astype(np.float32)  # 7 unique values
    tab = cluster_range(x, 2, 9, backend=backend, seed=0)
    assert tab.n_unique == 7 and tab.clamped
    assert tab.ks[-1] == 7 and tab.inertia(7) == 0.0
    for k in tab.ks:
        check_clustering(x, tab.get(k))
        assert tab.inertia(k) == tab.get(k).inertia
    if backend == "exact":
        ints = cluster_range(x.astype(np.int64), 2, 9)  # integer arrays are accepted too
        assert [ints.inertia(k) for k in ints.ks] == [tab.inertia(k) for k in tab.ks]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_random_data_invariants(backend):
    x = (np.random.default_rng(9).standard_normal((8, 4, 3, 3)) * 0.05).astype(np.float32)
    tab = cluster_range(x, 4, 12, backend=backend, seed=1)
    assert tab.backend == backend
    assert list(tab.ks) == sorted(set(tab.ks))
    for k in tab.ks:
        c = tab.get(k)
        assert c.k == k and tab.inertia(k) == c.inertia
        check_clustering(x, c)
    exact = cluster_range(x, 4, 12)
    for k in tab.ks:
        if k in exact:
            assert exact.inertia(k) <= tab.inertia(k) + 1e-9


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raise(backend, bad):
    x = np.ones(10, dtype=np.float32)
    x[3] = bad
    with pytest.raises(AxcnnError, match="NaN or infinity"):
        cluster_range(x, 1, 4, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_arguments(backend):
    x = np.arange(10.0)
    with pytest.raises(ValueError, match="kmin"):
        cluster_range(x, 0, 4, backend=backend)
    with pytest.raises(ValueError, match="kmax"):
        cluster_range(x, 5, 4, backend=backend)
    with pytest.raises(ValueError, match="empty"):
        cluster_range(np.zeros(0), 1, 4, backend=backend)


def test_unknown_backend_and_device():
    with pytest.raises(ValueError, match="backend"):
        cluster_range(np.arange(4.0), 1, 2, backend="kmeans++")
    with pytest.raises(ValueError, match="device"):
        cluster_range(np.arange(4.0), 1, 2, device="tpu")


# ------------------------------------------------------------------------------------------------------
# Index dtype
# ------------------------------------------------------------------------------------------------------


def test_index_dtype_uint8_uint16():
    x = np.arange(300, dtype=np.float64) ** 1.5
    tab = cluster_range(x, 255, 258)
    assert tab.get(256).indices.dtype == np.uint8
    assert tab.get(257).indices.dtype == np.uint16
    check_clustering(x, tab.get(257))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_index_dtype_int32(backend):
    x = np.arange(65537, dtype=np.float32).reshape(1, -1)
    tab = cluster_range(x, 70_000, 70_000, backend=backend, max_bins=1 << 17)
    c = tab.get(65537)
    assert c.indices.dtype == np.int32 and c.indices.shape == x.shape
    assert np.array_equal(c.indices.ravel(), np.arange(65537)) and c.inertia == 0.0


# ------------------------------------------------------------------------------------------------------
# faiss specifics
# ------------------------------------------------------------------------------------------------------


@needs_faiss
def test_faiss_cuda_falls_back_to_cpu(caplog):
    import faiss

    if faiss.get_num_gpus() > 0:  # pragma: no cover - GPU machines
        pytest.skip("a GPU is available")
    x = np.random.default_rng(4).standard_normal(2000).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="axcnn.cluster"):
        tab = cluster_range(x, 3, 6, backend="faiss", device="cuda")
    assert "falling back to the CPU" in caplog.text
    for k in tab.ks:
        check_clustering(x, tab.get(k))


def test_faiss_missing_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(MissingBackendError, match=r"axcnn\[faiss\]") as info:
        cluster_range(np.arange(100.0), 2, 4, backend="faiss")
    assert isinstance(info.value, AxcnnError)
    assert info.value.extra == "faiss"
