"""Scalar weight clustering (weight sharing) and the bit-count arithmetic of Dupuis et al.

Weight sharing replaces every weight of a layer by one of ``K`` shared values (centroids); the layer then
stores one ``ceil(log2 K)``-bit index per weight plus the ``K`` centroids (Eq. 1 of Dupuis et al., "CNN
Weight Sharing Based on a Fast Accuracy Estimation Metric").  This module is pure array code (numpy and
numba, no ONNX): it clusters one array of weights for every ``K`` of a range at once.

Three backends are available through :func:`cluster_range`:

``"exact"`` (default)
    *Optimal* 1-D k-means.  Because the weights are scalars, optimal clusters are contiguous intervals of
    the sorted values, so a dynamic programme over the sorted unique values finds the global optimum for
    every ``K`` of the range in one pass (divide-and-conquer optimisation, compiled with numba).  Large
    layers with more than ``max_bins`` distinct values are first reduced to a fine equal-width histogram;
    the result is then optimal over the binned data (cluster boundaries fall on bin edges) and its
    centroids and inertia are nevertheless the exact figures of the raw values.
``"sklearn"``
    :class:`sklearn.cluster.KMeans` (Lloyd, ``n_init=1``) once per ``K``.
``"faiss"``
    :class:`faiss.Kmeans` once per ``K``, optionally on a GPU (optional dependency ``axcnn[faiss]``).

Whatever the backend, a :class:`Clustering` has sorted, distinct centroids, each centroid is the mean of
the values assigned to it, and the inertia is recomputed exactly in float64 on the original values.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np

from axcnn.errors import AxcnnError, MissingBackendError

__all__ = [
    "BACKENDS",
    "ClusterTable",
    "Clustering",
    "cluster_range",
    "compression_ratio",
    "eq1_bits",
    "index_bits",
]

logger = logging.getLogger(__name__)

#: Names accepted by the ``backend`` argument of :func:`cluster_range`.
BACKENDS = ("exact", "sklearn", "faiss")
_DEVICES = ("cpu", "cuda", "auto")


# ----------------------------------------------------------------------------------------------------------
# Eq. 1 bit counts
# ----------------------------------------------------------------------------------------------------------


def index_bits(k: int) -> int:
    """Bits of one cluster index for ``k`` centroids: ``ceil(log2 k)``, and 0 when ``k == 1``.

    Raises :class:`ValueError` when ``k < 1``.
    """
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return (k - 1).bit_length()


def eq1_bits(weights: int, k: int, bits: int) -> int:
    """Storage of a weight-shared layer in bits (denominator of Eq. 1 of Dupuis et al.).

    ``weights * index_bits(k) + k * bits``: one index per weight plus ``k`` centroids of ``bits`` bits each.
    """
    weights, bits = operator.index(weights), operator.index(bits)
    if weights < 0:
        raise ValueError(f"weights must be >= 0, got {weights}")
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    return weights * index_bits(k) + k * bits


def compression_ratio(weights: int, k: int, bits: int) -> float:
    """Compression ratio of Eq. 1: original size ``weights * bits`` over :func:`eq1_bits`."""
    return weights * bits / eq1_bits(weights, k, bits)


def _index_dtype(k: int) -> np.dtype:
    """Smallest index dtype for ``k`` clusters: uint8 up to 256, uint16 up to 65536, else int32."""
    if k <= 1 << 8:
        return np.dtype(np.uint8)
    if k <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Clustering:
    """One weight-sharing solution for one array.

    Attributes:
        k: number of centroids actually used (effective ``K``).
        centroids: float64 array of shape ``[k]``, sorted ascending, all distinct; each centroid is the
            mean of the values assigned to it.
        indices: array of the input's shape with values in ``[0, k)``; dtype uint8 if ``k <= 256``, uint16
            if ``k <= 65536``, int32 otherwise.  ``centroids[indices]`` is the weight-shared array.
        inertia: within-cluster sum of squares of the original values (float64) under this assignment.

    The arrays are read-only (a :class:`ClusterTable` caches and may hand out the same object twice).
    """

    k: int
    centroids: np.ndarray
    indices: np.ndarray
    inertia: float

    def __repr__(self) -> str:
        return (
            f"Clustering(k={self.k}, inertia={self.inertia:.6g}, indices={self.indices.dtype}"
            f"{list(self.indices.shape)})"
        )


def _make_clustering(centroids: np.ndarray, indices: np.ndarray, inertia: float) -> Clustering:
    centroids = np.ascontiguousarray(centroids, dtype=np.float64)
    centroids.setflags(write=False)
    indices.setflags(write=False)
    return Clustering(k=int(centroids.shape[0]), centroids=centroids, indices=indices, inertia=float(inertia))


class ClusterTable:
    """All candidate clusterings of one array for ``K`` in ``[kmin, kmax]``.

    Built by :func:`cluster_range`.  :meth:`inertia` is cheap for every ``K`` of :attr:`ks`; :meth:`get`
    materialises centroids and indices (lazily for the exact backend, cached).

    Attributes:
        ks: effective ``K`` values, ascending, deduplicated.  A requested ``K`` above the number of unique
            values is clamped to it (with the binned exact backend: to the number of non-empty bins).
        n_unique: number of distinct values in the array.
        clamped: True when ``kmax`` exceeded what the data allow, so some requested ``K`` were clamped.
        backend: the backend that produced the table.
        binned: True when the exact backend had to reduce the data to a histogram (see
            :func:`cluster_range`).
        shape: shape of the clustered array (and of every ``get(k).indices``).
    """

    def __init__(
        self,
        *,
        ks: tuple[int, ...],
        inertias: dict[int, float],
        n_unique: int,
        clamped: bool,
        backend: str,
        shape: tuple[int, ...],
        builder: Callable[[int], Clustering] | None = None,
        cache: dict[int, Clustering] | None = None,
        binned: bool = False,
    ):
        self.ks = ks
        self.n_unique = n_unique
        self.clamped = clamped
        self.backend = backend
        self.shape = shape
        self.binned = binned
        self._inertias = inertias
        self._builder = builder
        self._cache: dict[int, Clustering] = dict(cache or {})

    def _check(self, k: int) -> int:
        try:
            k = operator.index(k)
        except TypeError:
            raise KeyError(f"K must be an integer, got {k!r}") from None
        if k not in self._inertias:
            raise KeyError(
                f"K={k} is not a candidate of this table; available K: {_format_ks(self.ks)}"
                + (f" (clamped to the {self.n_unique} unique values)" if self.clamped else "")
            )
        return k

    def inertia(self, k: int) -> float:
        """Within-cluster sum of squares (exact, float64, on the original values) of the ``K = k`` solution."""
        return self._inertias[self._check(k)]

    def get(self, k: int) -> Clustering:
        """Centroids and indices of the ``K = k`` solution (computed on first use, then cached)."""
        k = self._check(k)
        hit = self._cache.get(k)
        if hit is None:
            assert self._builder is not None
            hit = self._cache[k] = self._builder(k)
        return hit

    def __contains__(self, k: object) -> bool:
        return k in self._inertias

    def __len__(self) -> int:
        return len(self.ks)

    def __repr__(self) -> str:
        return (
            f"ClusterTable(backend={self.backend!r}, ks={_format_ks(self.ks)}, n_unique={self.n_unique}, "
            f"clamped={self.clamped}, binned={self.binned})"
        )


def _format_ks(ks: tuple[int, ...]) -> str:
    if not ks:
        return "none"
    if len(ks) > 2 and ks[-1] - ks[0] == len(ks) - 1:
        return f"{ks[0]}..{ks[-1]}"
    return ", ".join(map(str, ks))


# ----------------------------------------------------------------------------------------------------------
# numba kernels of the exact backend
# ----------------------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def _histogram(x, lo, span, nbins):  # pragma: no cover - compiled
    """Equal-width histogram of ``x`` over ``[lo, lo + span]`` with per-bin count, sum, min and max.

    Returns ``(bin_id per value (int32), count, sum, min, max)``.
    """
    n = x.shape[0]
    ids = np.empty(n, dtype=np.int32)
    cnt = np.zeros(nbins, dtype=np.int64)
    s = np.zeros(nbins, dtype=np.float64)
    mn = np.full(nbins, np.inf)
    mx = np.full(nbins, -np.inf)
    scale = nbins / span
    for t in range(n):
        v = x[t]
        b = int((v - lo) * scale)
        if b >= nbins:
            b = nbins - 1
        elif b < 0:
            b = 0
        ids[t] = b
        cnt[b] += 1
        s[b] += v
        if v < mn[b]:
            mn[b] = v
        if v > mx[b]:
            mx[b] = v
    return ids, cnt, s, mn, mx


@numba.njit(cache=True)
def _bin_m2(x, ids, means, nbins):  # pragma: no cover - compiled
    """Per-bin sum of squared deviations from the bin mean (second, numerically careful pass)."""
    m2 = np.zeros(nbins, dtype=np.float64)
    for t in range(x.shape[0]):
        b = ids[t]
        d = x[t] - means[b]
        m2[b] += d * d
    return m2


@numba.njit(cache=True, inline="always")
def _seg_cost(p0, p1, p2, j, i):  # pragma: no cover - compiled
    """Weighted SSE of groups ``j..i-1`` around their mean, from prefix sums of w, w*x, w*x^2."""
    w = p0[i] - p0[j]
    s = p1[i] - p1[j]
    c = (p2[i] - p2[j]) - s * s / w
    return c if c > 0.0 else 0.0


@numba.njit(cache=True)
def _dp_bounds(w, x, kmin, kmax):  # pragma: no cover - compiled
    """Optimal 1-D weighted k-means for every K in ``[kmin, kmax]`` over sorted points ``x`` with weights ``w``.

    ``D[k][i] = min_j D[k-1][j] + cost(j, i)`` where ``cost(j, i)`` is the weighted SSE of points
    ``j..i-1``.  The optimal split is monotone in ``i`` (and in ``k``), so each level is filled by divide
    and conquer in O(N log N).  ``x`` should be centred (it is, by the caller) so that the prefix sums of
    ``w*x^2`` do not cancel catastrophically.

    Returns an int64 array ``bounds`` of shape ``[kmax - kmin + 1, kmax + 1]``: row ``K - kmin`` holds the
    cluster boundaries ``0 = b_0 < b_1 < ... < b_K = N`` (cluster ``c`` is points ``b_c .. b_{c+1}-1``).
    Requires ``1 <= kmin <= kmax <= N``.
    """
    n = x.shape[0]
    p0 = np.zeros(n + 1)
    p1 = np.zeros(n + 1)
    p2 = np.zeros(n + 1)
    for i in range(n):
        wx = w[i] * x[i]
        p0[i + 1] = p0[i] + w[i]
        p1[i + 1] = p1[i] + wx
        p2[i + 1] = p2[i] + wx * x[i]

    arg = np.zeros((kmax + 1, n + 1), dtype=np.int32)
    prev = np.empty(n + 1)
    cur = np.empty(n + 1)
    prev[0] = np.inf
    for i in range(1, n + 1):
        prev[i] = _seg_cost(p0, p1, p2, 0, i)

    stack = np.empty((130, 4), dtype=np.int64)
    for k in range(2, kmax + 1):
        # cur[i] = D[k][i] for i in [k, n]; split j in [k-1, i-1].
        for i in range(k):
            cur[i] = np.inf
        top = 0
        stack[0, 0] = k
        stack[0, 1] = n
        stack[0, 2] = k - 1
        stack[0, 3] = n - 1
        top = 1
        while top > 0:
            top -= 1
            lo = stack[top, 0]
            hi = stack[top, 1]
            olo = stack[top, 2]
            ohi = stack[top, 3]
            mid = (lo + hi) >> 1
            jhi = min(ohi, mid - 1)
            # The last cluster can only shrink when a cluster is added: opt_k(i) >= opt_{k-1}(i).
            jlo = max(olo, arg[k - 1, mid])
            if jlo > jhi:
                jlo = olo
            best = np.inf
            bj = jlo
            for j in range(jlo, jhi + 1):
                v = prev[j] + _seg_cost(p0, p1, p2, j, mid)
                if v < best:
                    best = v
                    bj = j
            cur[mid] = best
            arg[k, mid] = bj
            if lo < mid:
                stack[top, 0] = lo
                stack[top, 1] = mid - 1
                stack[top, 2] = olo
                stack[top, 3] = bj
                top += 1
            if mid < hi:
                stack[top, 0] = mid + 1
                stack[top, 1] = hi
                stack[top, 2] = bj
                stack[top, 3] = ohi
                top += 1
        tmp = prev
        prev = cur
        cur = tmp

    nk = kmax - kmin + 1
    bounds = np.zeros((nk, kmax + 1), dtype=np.int64)
    for r in range(nk):
        kk = kmin + r
        i = n
        bounds[r, kk] = n
        for k in range(kk, 1, -1):
            i = arg[k, i]
            bounds[r, k - 1] = i
    return bounds


@numba.njit(cache=True)
def _clusters_from_bounds(b, kk, cnt, gsum, gmean, gm2, gmin, gmax):  # pragma: no cover - compiled
    """Centroids (true means) and exact SSE of the clusters ``b[c] .. b[c+1]-1`` of ``kk`` groups.

    A group ``g`` has ``cnt[g]`` raw values with sum ``gsum[g]``, mean ``gmean[g]``, sum of squared
    deviations from that mean ``gm2[g]`` and range ``[gmin[g], gmax[g]]``.  The SSE of a cluster around
    centroid ``m`` is ``sum_g gm2[g] + cnt[g] * (gmean[g] - m)^2``, exact for raw values.
    """
    cent = np.empty(kk)
    sse = 0.0
    for c in range(kk):
        a = b[c]
        e = b[c + 1]
        wsum = 0.0
        ssum = 0.0
        for g in range(a, e):
            wsum += cnt[g]
            ssum += gsum[g]
        m = ssum / wsum
        # Guard against rounding pushing the mean outside the cluster's range (keeps centroids distinct).
        if m < gmin[a]:
            m = gmin[a]
        if m > gmax[e - 1]:
            m = gmax[e - 1]
        for g in range(a, e):
            d = gmean[g] - m
            sse += gm2[g] + cnt[g] * d * d
        cent[c] = m
    return cent, sse


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------


def cluster_range(
    values: np.ndarray,
    kmin: int,
    kmax: int,
    *,
    backend: str = "exact",
    seed: int = 0,
    device: str = "cpu",
    max_bins: int = 1 << 16,
) -> ClusterTable:
    """Cluster the scalar ``values`` into ``K`` shared values for every ``K`` in ``[kmin, kmax]``.

    Args:
        values: array of any shape (float16/32/64; integers are accepted too) — the weights of one layer.
        kmin, kmax: range of ``K`` to compute, ``1 <= kmin <= kmax``.  ``K`` above the number of unique
            values is clamped to it (``table.clamped`` is then True); if even ``kmin`` exceeds it, the only
            candidate is ``K = n_unique`` (every unique value its own centroid, inertia 0).
        backend: ``"exact"`` (optimal, default), ``"sklearn"`` or ``"faiss"``.
        seed: random seed of the sklearn / faiss backends (the exact backend is deterministic).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``; only the faiss backend uses a GPU, and only when
            ``device != "cpu"`` and faiss sees one (otherwise it runs on the CPU).
        max_bins: exact backend only — above this many unique values the data are first reduced to an
            equal-width histogram of ``max_bins`` bins over ``[min, max]``.

    Exact backend: optimal clusters of scalars are contiguous intervals of the sorted values, so a dynamic
    programme over the sorted unique values (with their multiplicities) computes the *globally optimal*
    k-means solution for every ``K`` of the range in one pass: ``O(kmax * N log N)`` time and
    ``O(kmax * N)`` memory for ``N`` unique values, compiled with numba.  When ``N > max_bins`` the DP runs
    over the non-empty histogram bins (each represented by the mean of its values, weighted by its count)
    and every raw value goes to its bin's cluster: the solution is then optimal over the *binned* data
    (cluster boundaries lie on bin edges), not necessarily over the raw values, although with the default
    65536 bins the difference is negligible.  Centroids are still the true means of the raw values in each
    cluster and every inertia is the exact raw-value figure (computed from per-bin count, sum and sum of
    squared deviations, without touching the raw data).  Also when binning, ``K`` is clamped to the number
    of non-empty bins.  :meth:`ClusterTable.inertia` is available for every ``K`` right away;
    :meth:`ClusterTable.get` builds the indices on demand.

    sklearn / faiss backends: one Lloyd k-means per ``K`` (sklearn: ``KMeans(n_clusters=K, n_init=1,
    random_state=seed)``; faiss: ``Kmeans(d=1, k=K, niter=25, seed=seed)``), all computed eagerly.  Values
    are assigned to their nearest centroid, empty clusters are dropped, centroids are replaced by the means
    of their values and sorted, and the inertia is recomputed exactly, so ``ks`` holds the *effective*
    numbers of clusters (if two requested ``K`` give the same effective ``K``, the lower inertia is kept).
    ``K = 1`` and ``K = n_unique`` are solved directly (they have trivial optimal solutions).

    Raises:
        ValueError: bad ``kmin``/``kmax``/``backend``/``device``/``max_bins``, or an empty array.
        AxcnnError: the values contain NaN or infinity.
        MissingBackendError: ``backend="faiss"`` but faiss is not installed.
    """
    kmin = _as_int("kmin", kmin)
    kmax = _as_int("kmax", kmax)
    max_bins = _as_int("max_bins", max_bins)
    if kmin < 1:
        raise ValueError(f"kmin must be >= 1, got {kmin}")
    if kmax < kmin:
        raise ValueError(f"kmax must be >= kmin, got kmin={kmin}, kmax={kmax}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if device not in _DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(_DEVICES)}")
    if max_bins < 2:
        raise ValueError(f"max_bins must be >= 2, got {max_bins}")

    arr = np.asarray(values)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"values must be a real numeric array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError("values is empty; there is nothing to cluster")
    shape = tuple(arr.shape)
    native = arr.ravel()
    if native.dtype.kind != "f":
        native = native.astype(np.float64)
    lo, hi = float(native.min()), float(native.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise AxcnnError("weights contain NaN or infinity")

    if backend == "exact":
        return _exact_table(native, shape, lo, hi, kmin, kmax, max_bins)
    return _eager_table(native, shape, kmin, kmax, backend, seed, device)


def _as_int(name: str, v: object) -> int:
    try:
        return operator.index(v)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {v!r}") from None


# ----------------------------------------------------------------------------------------------------------
# Exact backend
# ----------------------------------------------------------------------------------------------------------


def _exact_table(
    native: np.ndarray, shape: tuple[int, ...], lo: float, hi: float, kmin: int, kmax: int, max_bins: int
) -> ClusterTable:
    """Build the exact-backend table: group the values (unique values or histogram bins), then run the DP."""
    n = native.shape[0]
    binned = False
    span = hi - lo
    # (a span so small or so large that the bin width is not representable: group unique values)
    if n <= max_bins or span == 0 or not (np.isfinite(span) and np.isfinite(max_bins / span)):
        uniq, inverse, counts = np.unique(native, return_inverse=True, return_counts=True)
        groups = _unique_groups(uniq, counts)
        n_unique = int(uniq.shape[0])
    else:
        x64 = native.astype(np.float64, copy=False)
        ids, cnt, gsum, gmin, gmax = _histogram(x64, lo, span, max_bins)
        used = np.flatnonzero(cnt)
        if np.array_equal(gmin[used], gmax[used]):
            # Every non-empty bin holds a single distinct value (e.g. quantised weights): bins are exact.
            n_unique = int(used.shape[0])
            groups = _unique_groups(gmin[used], cnt[used])
            inverse = _compact(ids, used, max_bins)
        else:
            srt = np.sort(native)  # native dtype: float32 sorts several times faster than float64
            starts = np.flatnonzero(np.concatenate(([True], srt[1:] != srt[:-1])))
            n_unique = int(starts.shape[0])
            if n_unique <= max_bins:
                uniq = srt[starts]
                counts = np.diff(np.append(starts, n))
                groups = _unique_groups(uniq, counts)
                inverse = np.searchsorted(uniq, native).astype(_index_dtype(n_unique), copy=False)
            else:
                binned = True
                cnt_u, gsum_u = cnt[used], gsum[used]
                means = np.zeros(max_bins)
                means[used] = gsum_u / cnt_u
                gm2 = _bin_m2(x64, ids, means, max_bins)[used]
                groups = (cnt_u.astype(np.float64), gsum_u, means[used], gm2, gmin[used], gmax[used])
                inverse = _compact(ids, used, max_bins)
        del ids
    inverse = inverse.astype(_index_dtype(groups[0].shape[0]), copy=False)
    n_groups = int(groups[0].shape[0])

    kmax_eff = min(kmax, n_groups)
    kmin_eff = min(kmin, kmax_eff)
    clamped = kmax > n_groups
    if binned and clamped:
        logger.warning(
            "K up to %d requested but the binned data have only %d non-empty bins; K clamped to %d "
            "(raise max_bins to allow more clusters)",
            kmax,
            n_groups,
            n_groups,
        )
    cnt_g, gsum, gmean, gm2, gmin, gmax = groups
    mu = float(gsum.sum() / cnt_g.sum())
    # K == n_groups is trivial (every group its own cluster); the DP only runs below it.
    dp_kmax = min(kmax_eff, n_groups - 1)
    bounds = np.zeros((kmax_eff - kmin_eff + 1, kmax_eff + 1), dtype=np.int64)
    if kmin_eff <= dp_kmax:
        bounds[: dp_kmax - kmin_eff + 1, : dp_kmax + 1] = _dp_bounds(cnt_g, gmean - mu, kmin_eff, dp_kmax)
    if kmax_eff == n_groups:
        bounds[-1] = np.arange(n_groups + 1)
    ks = tuple(range(kmin_eff, kmax_eff + 1))
    inertias = {}
    for r, k in enumerate(ks):
        _, sse = _clusters_from_bounds(bounds[r], k, cnt_g, gsum, gmean, gm2, gmin, gmax)
        inertias[k] = float(sse)
    logger.debug(
        "exact clustering: %d values, %d unique, %d groups%s, K %d..%d",
        n,
        n_unique,
        n_groups,
        " (binned)" if binned else "",
        kmin_eff,
        kmax_eff,
    )

    def build(k: int) -> Clustering:
        b = bounds[k - kmin_eff, : k + 1]
        cent, sse = _clusters_from_bounds(b, k, cnt_g, gsum, gmean, gm2, gmin, gmax)
        labels = np.repeat(np.arange(k, dtype=_index_dtype(k)), np.diff(b))
        return _make_clustering(cent, labels[inverse].reshape(shape), sse)

    return ClusterTable(
        ks=ks,
        inertias=inertias,
        n_unique=n_unique,
        clamped=clamped,
        backend="exact",
        shape=shape,
        builder=build,
        binned=binned,
    )


def _unique_groups(uniq: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """Group statistics ``(count, sum, mean, m2, min, max)`` of exact unique values."""
    u = uniq.astype(np.float64)
    c = counts.astype(np.float64)
    return c, u * c, u, np.zeros_like(u), u, u


def _compact(ids: np.ndarray, used: np.ndarray, nbins: int) -> np.ndarray:
    """Map histogram bin ids to the indices of the non-empty bins."""
    remap = np.zeros(nbins, dtype=_index_dtype(used.shape[0]))
    remap[used] = np.arange(used.shape[0])
    return remap[ids]


# ----------------------------------------------------------------------------------------------------------
# sklearn / faiss backends
# ----------------------------------------------------------------------------------------------------------


def _eager_table(
    native: np.ndarray, shape: tuple[int, ...], kmin: int, kmax: int, backend: str, seed: int, device: str
) -> ClusterTable:
    """Run a Lloyd k-means backend once per requested ``K`` and keep the distinct effective solutions."""
    x = native.astype(np.float64, copy=False)
    srt = np.sort(native)  # counting unique values on the native dtype is cheap (float32 sorts fast)
    n_unique = 1 + int(np.count_nonzero(srt[1:] != srt[:-1]))
    del srt
    kmax_eff = min(kmax, n_unique)
    kmin_eff = min(kmin, kmax_eff)

    if backend == "sklearn":
        fit = _sklearn_fitter(x, seed)
        work = x.shape[0] * kmax_eff
    else:
        fit = _faiss_fitter(x, seed, device)
        work = min(x.shape[0], _FAISS_MAX_POINTS_PER_CENTROID * kmax_eff) * kmax_eff

    best: dict[int, Clustering] = {}
    # Small problems run single-threaded: OpenMP thread start-up and spinning cost far more than the
    # work itself, dramatically so when the cores are shared with other processes.
    with _single_thread_if(work < _SMALL_WORK):
        for k in range(kmin_eff, kmax_eff + 1):
            if k == 1:
                labels = np.zeros(x.shape[0], dtype=np.intp)
            elif k == n_unique:
                # every unique value its own cluster: optimal, inertia 0
                labels = np.unique(x, return_inverse=True)[1].ravel()
            else:
                labels = fit(k)
            cl = _finalize(x, labels, shape)
            old = best.get(cl.k)
            if old is None or cl.inertia < old.inertia:
                best[cl.k] = cl
    ks = tuple(sorted(best))
    logger.debug("%s clustering: %d values, %d unique, effective K %s", backend, x.shape[0], n_unique, ks)
    return ClusterTable(
        ks=ks,
        inertias={k: c.inertia for k, c in best.items()},
        n_unique=n_unique,
        clamped=kmax > n_unique,
        backend=backend,
        shape=shape,
        cache=best,
    )


# Distance evaluations per Lloyd iteration below which the sklearn / faiss backends run single-threaded.
_SMALL_WORK = 1 << 24
# faiss subsamples its training set to this many points per centroid (its default).
_FAISS_MAX_POINTS_PER_CENTROID = 256


def _single_thread_if(flag: bool) -> contextlib.AbstractContextManager:
    """Limit OpenMP / BLAS thread pools to one thread for the duration of the block when ``flag``."""
    if not flag:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def _sklearn_fitter(x: np.ndarray, seed: int) -> Callable[[int], np.ndarray]:
    from sklearn.cluster import KMeans

    x2 = x.reshape(-1, 1)

    def fit(k: int) -> np.ndarray:
        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x2)
        return km.labels_

    return fit


def _faiss_fitter(x: np.ndarray, seed: int, device: str) -> Callable[[int], np.ndarray]:
    try:
        import faiss
    except ImportError:
        raise MissingBackendError("faiss", "faiss") from None

    use_gpu = False
    if device != "cpu":
        get_num_gpus = getattr(faiss, "get_num_gpus", None)
        use_gpu = bool(get_num_gpus is not None and get_num_gpus() > 0)
        if not use_gpu and device == "cuda":
            logger.info("faiss: no GPU available (device='cuda'); falling back to the CPU")
    x32 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 1)

    def fit(k: int) -> np.ndarray:
        # min_points_per_centroid=1: we always have k <= n_unique <= n points, and the default (39)
        # only makes faiss print a warning on stderr for small layers.
        km = faiss.Kmeans(
            1,
            k,
            niter=25,
            seed=int(seed),
            gpu=use_gpu,
            min_points_per_centroid=1,
            max_points_per_centroid=_FAISS_MAX_POINTS_PER_CENTROID,
        )
        km.train(x32)
        cent = np.unique(np.asarray(km.centroids, dtype=np.float64).ravel())
        return np.searchsorted((cent[:-1] + cent[1:]) * 0.5, x)

    return fit


def _finalize(x: np.ndarray, labels: np.ndarray, shape: tuple[int, ...]) -> Clustering:
    """Turn an arbitrary labelling into a :class:`Clustering`: drop empty clusters, use the means as
    centroids, sort them (merging clusters with equal means) and recompute the inertia exactly."""
    counts = np.bincount(labels)
    sums = np.bincount(labels, weights=x, minlength=counts.shape[0])
    used = np.flatnonzero(counts)
    means = sums[used] / counts[used]
    _, rank = np.unique(means, return_inverse=True)
    remap = np.zeros(counts.shape[0], dtype=np.intp)
    remap[used] = rank
    lab = remap[labels]
    cnt2 = np.bincount(lab)
    cent = np.bincount(lab, weights=x, minlength=cnt2.shape[0]) / cnt2
    k = int(cent.shape[0])
    inertia = float(np.sum(np.square(x - cent[lab])))
    return _make_clustering(cent, lab.astype(_index_dtype(k)).reshape(shape), inertia)
