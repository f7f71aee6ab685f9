"""Tests of axcnn.cluster.groups: group layouts, per-group optimality (against cluster_range and brute
force), codebook padding, the large-group fallback, weights and validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from axcnn.cluster import GroupSpec, cluster_groups, cluster_range, compression_ratio, eq1_bits


def group_slices(spec: GroupSpec, x: np.ndarray) -> list[np.ndarray]:
    """The groups of ``x`` computed independently of the implementation (boolean masks over ids)."""
    if spec.granularity == "layer":
        return [x.ravel()]
    if spec.granularity == "kernel":
        return [x[o, i].ravel() for o in range(x.shape[0]) for i in range(x.shape[1])]
    a = spec.axis % x.ndim
    n = x.shape[a]
    return [np.take(x, np.arange(s, min(s + spec.group_size, n)), axis=a).ravel() for s in range(0, n, spec.group_size)]


def cost(x: np.ndarray, w: np.ndarray) -> float:
    tw = w.sum()
    return 0.0 if tw <= 0 else float(np.sum(w * (x - np.sum(w * x) / tw) ** 2))


def brute(x: np.ndarray, w: np.ndarray, k: int) -> float:
    best = np.inf
    for lab in itertools.product(range(k), repeat=x.shape[0]):
        lab = np.asarray(lab)
        best = min(best, sum(cost(x[lab == j], w[lab == j]) for j in range(k)))
    return best


# ------------------------------------------------------------------------------------------------------
# GroupSpec
# ------------------------------------------------------------------------------------------------------


def test_channel_offsets_last_group_smaller():
    spec = GroupSpec("channel", axis=0, group_size=3)
    assert spec.offsets((7, 2, 3)).tolist() == [0, 18, 36, 42]
    assert spec.n_codebooks((7, 2, 3)) == 3
    assert GroupSpec("channel", axis=0, group_size=2).offsets((4, 5)).tolist() == [0, 10, 20]
    assert GroupSpec("channel", group_size=10).n_codebooks((4, 5)) == 1


@pytest.mark.parametrize(
    "spec",
    [
        GroupSpec(),
        GroupSpec("channel", axis=0),
        GroupSpec("channel", axis=1, group_size=3),
        GroupSpec("channel", axis=-1, group_size=2),
        GroupSpec("kernel"),
    ],
)
def test_layout_roundtrip_and_codebook_ids(spec):
    x = np.arange(5 * 7 * 3 * 2).reshape(5, 7, 3, 2)
    flat = spec.to_groups(x)
    off = spec.offsets(x.shape)
    assert np.array_equal(spec.from_groups(flat, x.shape), x)
    groups = group_slices(spec, x)
    assert len(groups) == spec.n_codebooks(x.shape) == off.shape[0] - 1
    for g, ref in enumerate(groups):
        assert sorted(flat[off[g] : off[g + 1]].tolist()) == sorted(ref.tolist())
    ids = spec.codebook_ids(x.shape)
    assert ids.shape == x.shape
    for g, ref in enumerate(groups):
        assert sorted(x[ids == g].tolist()) == sorted(ref.tolist())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(granularity="tensor"), "granularity must be one of layer, channel, kernel, got 'tensor'"),
        (dict(granularity="channel", group_size=0), "group_size must be >= 1, got 0"),
        (dict(granularity="channel", axis=1.5), "axis must be an integer"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupSpec(**kwargs)


def test_spec_shape_validation():
    with pytest.raises(ValueError, match=r"axis must be in \[-2, 1\].*got 2"):
        GroupSpec("channel", axis=2).offsets((3, 4))
    with pytest.raises(ValueError, match="granularity='kernel' needs a weight of rank >= 3"):
        cluster_groups(np.ones((3, 4)), [2], GroupSpec("kernel"))


# ------------------------------------------------------------------------------------------------------
# Optimality and consistency
# ------------------------------------------------------------------------------------------------------


SPECS = [
    GroupSpec(),
    GroupSpec("channel"),
    GroupSpec("channel", axis=1, group_size=3),
    GroupSpec("channel", axis=0, group_size=4),
    GroupSpec("kernel"),
]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("spec", SPECS)
def test_each_group_equals_cluster_range(spec, weighted):
    rng = np.random.default_rng(0)
    x = np.round(rng.standard_normal((6, 5, 3, 3)), 1).astype(np.float32)  # ties; some tiny groups
    w = rng.exponential(size=x.shape) if weighted else None
    if weighted:
        w[rng.random(x.shape) < 0.25] = 0.0
        w[0, 0] = 0.0  # a kernel whose weights are all zero
    ks = [1, 2, 3, 5, 8, 30]
    tab = cluster_groups(x, ks, spec, weights=w)
    groups = group_slices(spec, x)
    wgroups = group_slices(spec, w) if weighted else [None] * len(groups)
    assert tab.ks == tuple(ks) and tab.n_codebooks == len(groups) and tab.weighted == weighted
    for k in ks:
        per = []
        for xg, wg in zip(groups, wgroups, strict=True):
            ref = cluster_range(xg, k, k, weights=wg)
            per.append(ref.inertia(ref.ks[0]))
        np.testing.assert_allclose(tab.group_inertia(k), per, rtol=1e-9, atol=1e-12)
        assert tab.inertia(k) == pytest.approx(sum(per), rel=1e-9, abs=1e-12)
        sol = tab.get(k)
        assert sol.inertia == tab.inertia(k)
        assert sol.centroids.shape == (len(groups), k) and sol.indices.shape == x.shape
        check_solution(x, w, spec, sol)


def check_solution(x, w, spec, sol):
    """Codebooks padded with the largest used entry, indices in the used part, inertia matches decode,
    every used centroid the (weighted) mean of its values."""
    w = np.ones(x.shape) if w is None else w
    ids = spec.codebook_ids(x.shape)
    idx = sol.indices.astype(np.intp)
    assert sol.indices.dtype == (np.uint8 if sol.k <= 256 else np.uint16)
    for g in range(sol.centroids.shape[0]):
        u = sol.used[g]
        row = sol.centroids[g]
        assert np.all(np.diff(row[:u]) > 0)
        assert np.all(row[u:] == row[u - 1])
        m = ids == g
        assert idx[m].max() < u
        for c in range(u):
            sel = m & (idx == c)
            assert sel.any()
            xs, ws = x[sel].astype(np.float64), w[sel]
            ref = np.sum(ws * xs) / ws.sum() if ws.sum() > 0 else xs.mean()
            assert row[c] == pytest.approx(ref, rel=1e-12, abs=1e-12)
    dec = sol.decode()
    assert dec.shape == x.shape
    assert sol.inertia == pytest.approx(float(np.sum(w * (x - dec) ** 2)), rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(
        sol.group_inertia, [np.sum((w * (x - dec) ** 2)[ids == g]) for g in range(ids.max() + 1)], atol=1e-9
    )


@pytest.mark.parametrize("seed", range(6))
def test_kernel_groups_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    x = np.round(rng.standard_normal((2, 2, 2, 3)), 1)
    w = rng.exponential(size=x.shape)
    w[rng.random(x.shape) < 0.3] = 0.0
    tab = cluster_groups(x, [1, 2, 3], GroupSpec("kernel"), weights=w)
    for k in (1, 2, 3):
        ref = [brute(x[o, i].ravel(), w[o, i].ravel(), k) for o in range(2) for i in range(2)]
        np.testing.assert_allclose(tab.group_inertia(k), ref, rtol=1e-9, atol=1e-12)


def test_padding_when_group_has_few_unique_values():
    x = np.zeros((3, 4))
    x[0] = [1.0, 1.0, 2.0, 2.0]  # 2 unique values
    x[1] = [5.0, 5.0, 5.0, 5.0]  # 1
    x[2] = [0.0, 1.0, 2.0, 3.0]  # 4
    sol = cluster_groups(x, [3], GroupSpec("channel")).get(3)
    assert sol.used.tolist() == [2, 1, 3]
    assert sol.centroids[0].tolist() == [1.0, 2.0, 2.0]
    assert sol.centroids[1].tolist() == [5.0, 5.0, 5.0]
    assert sol.group_inertia[:2].tolist() == [0.0, 0.0]
    assert sol.indices[1].tolist() == [0, 0, 0, 0]
    check_solution(x, None, GroupSpec("channel"), sol)


def test_large_groups_go_through_cluster_range():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 300))
    x[3, :200] = 0.0  # a group with few unique values
    w = rng.exponential(size=x.shape)
    spec = GroupSpec("channel", group_size=1)
    small = cluster_groups(x, [2, 5, 9], spec, weights=w)
    big = cluster_groups(x, [2, 5, 9], spec, weights=w, max_bins=250)  # groups of 300 values > 250
    mixed = cluster_groups(x, [2, 5, 9], GroupSpec("channel", group_size=3), weights=w, max_bins=400)
    for k in (2, 5, 9):
        # above max_bins unique values the fallback bins the data: within 1% of the optimum
        assert np.all(big.group_inertia(k) >= small.group_inertia(k) * (1 - 1e-9))
        assert np.all(big.group_inertia(k) <= small.group_inertia(k) * 1.01 + 1e-12)
        check_solution(x, w, spec, big.get(k))
        check_solution(x, w, GroupSpec("channel", group_size=3), mixed.get(k))
        ref = cluster_range(x[3], k, k, weights=w[3])
        assert mixed.group_inertia(k)[1] == pytest.approx(ref.inertia(ref.ks[0]), rel=1e-9)


def test_layer_spec_equals_cluster_range():
    x = np.random.default_rng(2).standard_normal((8, 4, 3, 3)).astype(np.float32)
    tab = cluster_groups(x, range(1, 20), GroupSpec())
    ref = cluster_range(x, 1, 19)
    for k in ref.ks:
        assert tab.inertia(k) == pytest.approx(ref.inertia(k), rel=1e-9)
        np.testing.assert_allclose(tab.get(k).centroids[0], ref.get(k).centroids, rtol=1e-12)
        assert np.array_equal(tab.get(k).indices, ref.get(k).indices)


def test_get_is_cached_and_unknown_k_raises():
    tab = cluster_groups(np.arange(24.0).reshape(2, 3, 4), [2, 4], GroupSpec("kernel"))
    assert tab.get(2) is tab.get(2)
    assert 2 in tab and 3 not in tab and len(tab) == 2
    with pytest.raises(KeyError, match="available K: 2, 4"):
        tab.get(3)


@pytest.mark.parametrize(
    ("x", "ks"),
    [
        (np.array([[[0.5]]]), [1, 3]),  # one element
        (np.full((2, 2, 2), 1.5), [1, 2]),  # all equal
        (np.arange(8.0).reshape(2, 2, 2), [1]),  # K = 1
        (np.arange(8.0).reshape(2, 2, 2), [2, 7]),  # K >= unique values per kernel
    ],
)
def test_degenerate(x, ks):
    for spec in (GroupSpec(), GroupSpec("channel"), GroupSpec("kernel")):
        tab = cluster_groups(x, ks, spec)
        for k in ks:
            sol = tab.get(k)
            check_solution(x, None, spec, sol)
            if k == 1:
                for g, xg in enumerate(group_slices(spec, x)):
                    assert sol.centroids[g, 0] == pytest.approx(xg.mean())


def test_integer_values_and_zero_weights():
    x = np.random.default_rng(3).integers(-3, 4, size=(4, 3, 2, 2))
    tab = cluster_groups(x, [2, 3], GroupSpec("kernel"), weights=np.zeros(x.shape))
    for k in (2, 3):
        sol = tab.get(k)
        assert tab.inertia(k) == 0.0 and not np.isnan(sol.centroids).any()


@pytest.mark.parametrize(
    ("ks", "match"),
    [([], "at least one K"), ([0, 2], "integers >= 1, got 0"), ([2.5], "must be an integer"), (3, "iterable")],
)
def test_bad_ks(ks, match):
    with pytest.raises(ValueError, match=match):
        cluster_groups(np.ones((2, 2, 2)), ks, GroupSpec())


def test_bad_weights_shape():
    with pytest.raises(ValueError, match="weights must have the shape"):
        cluster_groups(np.ones((2, 2, 2)), [2], GroupSpec(), weights=np.ones(8))


def test_eq1_with_group_codebooks():
    x = np.random.default_rng(4).standard_normal((16, 8, 3, 3))
    tab = cluster_groups(x, [4], GroupSpec("channel"))
    bits = eq1_bits(x.size, 4, 32, codebooks=tab.n_codebooks)
    assert bits == x.size * 2 + 16 * 4 * 32
    assert compression_ratio(x.size, 4, 32, codebooks=tab.n_codebooks) == pytest.approx(x.size * 32 / bits)
