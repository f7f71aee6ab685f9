"""Scalar weight clustering of one array: every ``K`` of a range at once, optionally weighted per value.

Weight sharing replaces every weight of a layer by one of ``K`` shared values (centroids); the layer then
stores one ``ceil(log2 K)``-bit index per weight plus the ``K`` centroids (Eq. 1 of Dupuis et al., "CNN
Weight Sharing Based on a Fast Accuracy Estimation Metric").  This module is pure array code (numpy and
numba, no ONNX).

Three backends are available through :func:`cluster_range`:

``"exact"`` (default)
    *Optimal* 1-D (weighted) k-means.  Because the weights are scalars, optimal clusters are contiguous
    intervals of the sorted values, so a dynamic programme over the sorted unique values finds the global
    optimum for every ``K`` of the range in one pass (divide-and-conquer optimisation, compiled with
    numba).  Large layers with more than ``max_bins`` distinct values are first reduced to a fine
    equal-width histogram; the result is then optimal over the binned data (cluster boundaries fall on bin
    edges) and its centroids and inertia are nevertheless the exact figures of the raw values.
``"sklearn"``
    :class:`sklearn.cluster.KMeans` (Lloyd, ``n_init=1``) once per ``K`` (``sample_weight`` when weighted).
``"faiss"``
    :class:`faiss.Kmeans` once per ``K``, optionally on a GPU (optional dependency ``axcnn[faiss]``);
    unweighted only.

Whatever the backend, a :class:`Clustering` has sorted, distinct centroids, each centroid is the (weighted)
mean of the values assigned to it, and the inertia is the (weighted) SSE recomputed exactly in float64 on the
original values.

Per-value weights (``weights=``): the objective becomes ``sum_i w_i (x_i - c(x_i))^2``.  A cluster whose
values all have weight 0 takes the *unweighted* mean of its values as centroid (its weighted SSE is 0 for any
centroid, and this choice keeps the values it serves as close as possible).  If every weight is 0, the
partition is the unweighted one and every inertia is 0.  Values of weight 0 otherwise do not influence the
partition: they stay in whichever contiguous cluster covers them; callers who want such values clustered
sensibly should add a small floor to the weights.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from axcnn.cluster import _kernels as kern
from axcnn.cluster.eq1 import index_dtype
from axcnn.errors import AxcnnError

__all__ = ["BACKENDS", "ClusterTable", "Clustering", "check_weights", "cluster_range"]

logger = logging.getLogger(__name__)

#: Names accepted by the ``backend`` argument of :func:`cluster_range`.
BACKENDS = ("exact", "sklearn", "faiss")
_DEVICES = ("cpu", "cuda", "auto")


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Clustering:
    """One weight-sharing solution for one array.

    Attributes:
        k: number of centroids actually used (effective ``K``).
        centroids: float64 array of shape ``[k]``, sorted ascending, all distinct; each centroid is the
            (weighted) mean of the values assigned to it.
        indices: array of the input's shape with values in ``[0, k)``; dtype uint8 if ``k <= 256``, uint16
            if ``k <= 65536``, int32 otherwise.  ``centroids[indices]`` is the weight-shared array.
        inertia: within-cluster sum of squares of the original values (float64) under this assignment,
            weighted by the per-value weights when the table was built with weights.

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


def make_clustering(centroids: np.ndarray, indices: np.ndarray, inertia: float) -> Clustering:
    """A read-only :class:`Clustering` (float64 centroids)."""
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
        weighted: True when per-value weights were given (inertias are then weighted SSEs).
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
        weighted: bool = False,
    ):
        self.ks = ks
        self.n_unique = n_unique
        self.clamped = clamped
        self.backend = backend
        self.shape = shape
        self.binned = binned
        self.weighted = weighted
        self._inertias = inertias
        self._builder = builder
        self._cache: dict[int, Clustering] = dict(cache or {})

    def _check(self, k: int) -> int:
        note = f" (clamped to the {self.n_unique} unique values)" if self.clamped else ""
        return candidate_k(k, self._inertias, self.ks, note)

    def inertia(self, k: int) -> float:
        """Within-cluster (weighted) sum of squares, exact float64 on the original values, of ``K = k``."""
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
            f"ClusterTable(backend={self.backend!r}, ks={format_ks(self.ks)}, n_unique={self.n_unique}, "
            f"clamped={self.clamped}, binned={self.binned}, weighted={self.weighted})"
        )


def candidate_k(k: object, available, ks: tuple[int, ...], note: str = "") -> int:
    """``k`` as an int if it is one of a table's candidates (``available``); else a KeyError listing ``ks``."""
    try:
        k = operator.index(k)
    except TypeError:
        raise KeyError(f"K must be an integer, got {k!r}") from None
    if k not in available:
        raise KeyError(f"K={k} is not a candidate of this table; available K: {format_ks(ks)}{note}")
    return k


def format_ks(ks: tuple[int, ...]) -> str:
    """``"2..9"`` for a run of consecutive K, else a comma-separated list."""
    if not ks:
        return "none"
    if len(ks) > 2 and ks[-1] - ks[0] == len(ks) - 1:
        return f"{ks[0]}..{ks[-1]}"
    return ", ".join(map(str, ks))


# ----------------------------------------------------------------------------------------------------------
# Validation shared by every clustering entry point
# ----------------------------------------------------------------------------------------------------------


def as_int(name: str, v: object) -> int:
    """``operator.index(v)``, or ValueError naming the field."""
    try:
        return operator.index(v)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {v!r}") from None


def check_values(values: np.ndarray, name: str = "values") -> np.ndarray:
    """The array to cluster, flattened, in a float dtype (integers become float64).

    Raises ValueError for a non-numeric or empty array, AxcnnError for NaN or infinity (bad user weights).
    """
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; there is nothing to cluster")
    flat = arr.ravel()
    if flat.dtype.kind != "f":
        flat = flat.astype(np.float64)
    if not np.isfinite(flat.min()) or not np.isfinite(flat.max()):
        raise AxcnnError("weights contain NaN or infinity")
    return flat


def check_weights(weights: object, shape: tuple[int, ...], name: str = "weights") -> np.ndarray | None:
    """Validate per-value importance weights: same shape as the values, finite, ``>= 0``.

    Returns them flattened as float64 (None stays None).  Raises ValueError naming the field, the offending
    value and the allowed range.
    """
    if weights is None:
        return None
    w = np.asarray(weights)
    if w.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be a real numeric array, got dtype {w.dtype}")
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of the values {tuple(shape)}, got {tuple(w.shape)}")
    w = w.astype(np.float64).ravel()
    bad = ~(np.isfinite(w) & (w >= 0))
    if bad.any():
        i = int(np.argmax(bad))
        where = tuple(int(j) for j in np.unravel_index(i, shape)) if shape else ()
        raise ValueError(f"{name} must be finite and in [0, inf), got {w[i]} at index {where}")
    return w


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------


def cluster_range(
    values: np.ndarray,
    kmin: int,
    kmax: int,
    *,
    weights: np.ndarray | None = None,
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
        weights: optional per-value importance, same shape as ``values``, finite and ``>= 0`` (None =
            uniform: exactly the unweighted computation).  Centroids become weighted means and inertias
            weighted SSEs; see the module docstring for zero weights.  Not supported by ``"faiss"``.
        backend: ``"exact"`` (optimal, default), ``"sklearn"`` or ``"faiss"``.
        seed: random seed of the sklearn / faiss backends (the exact backend is deterministic).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``; only the faiss backend uses a GPU, and only when
            ``device != "cpu"`` and faiss sees one (otherwise it runs on the CPU).
        max_bins: exact backend only — above this many unique values the data are first reduced to an
            equal-width histogram of ``max_bins`` bins over ``[min, max]``.

    Exact backend: optimal clusters of scalars are contiguous intervals of the sorted values (also with
    non-negative weights), so a dynamic programme over the sorted unique values (with their summed weights)
    computes the *globally optimal* (weighted) k-means solution for every ``K`` of the range in one pass:
    ``O(kmax * N log N)`` time and ``O(kmax * N)`` memory for ``N`` unique values, compiled with numba.
    When ``N > max_bins`` the DP runs over the non-empty histogram bins (each represented by the weighted
    mean of its values, weighted by its total weight) and every raw value goes to its bin's cluster: the
    solution is then optimal over the *binned* data (cluster boundaries lie on bin edges), not necessarily
    over the raw values, although with the default 65536 bins the difference is negligible.  Centroids are
    still the true (weighted) means of the raw values in each cluster and every inertia is the exact
    raw-value figure (computed from per-bin weight, sum and sum of squared deviations, without touching the
    raw data).  Also when binning, ``K`` is clamped to the number of non-empty bins.
    :meth:`ClusterTable.inertia` is available for every ``K`` right away; :meth:`ClusterTable.get` builds
    the indices on demand.

    sklearn / faiss backends: one Lloyd k-means per ``K`` (sklearn: ``KMeans(n_clusters=K, n_init=1,
    random_state=seed)``, fitted with ``sample_weight=weights``; faiss: ``Kmeans(d=1, k=K, niter=25,
    seed=seed)``), all computed eagerly.  Values are assigned to their nearest centroid, empty clusters are
    dropped, centroids are replaced by the (weighted) means of their values and sorted, and the inertia is
    recomputed exactly, so ``ks`` holds the *effective* numbers of clusters (if two requested ``K`` give the
    same effective ``K``, the lower inertia is kept).  ``K = 1`` and ``K = n_unique`` are solved directly
    (they have trivial optimal solutions).

    Raises:
        ValueError: bad ``kmin``/``kmax``/``backend``/``device``/``max_bins``/``weights``, an empty array,
            or weights with ``backend="faiss"``.
        AxcnnError: the values contain NaN or infinity.
        MissingBackendError: ``backend="faiss"`` but faiss is not installed.
    """
    kmin = as_int("kmin", kmin)
    kmax = as_int("kmax", kmax)
    max_bins = as_int("max_bins", max_bins)
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

    native = check_values(values)
    shape = tuple(np.shape(values))
    w = check_weights(weights, shape)
    if w is not None and backend == "faiss":
        raise ValueError("weights are not supported by backend='faiss'; use backend='exact' or 'sklearn'")

    if backend == "exact":
        return _exact_table(native, w, shape, kmin, kmax, max_bins)
    from axcnn.cluster._eager import eager_table

    return eager_table(native, w, shape, kmin, kmax, backend, seed, device)


# ----------------------------------------------------------------------------------------------------------
# Exact backend
# ----------------------------------------------------------------------------------------------------------

# Group statistics (see axcnn.cluster._kernels): weight, weighted sum, weighted mean, weighted m2,
# count, unweighted sum, min, max.
_Groups = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _exact_table(
    native: np.ndarray, w: np.ndarray | None, shape: tuple[int, ...], kmin: int, kmax: int, max_bins: int
) -> ClusterTable:
    """Build the exact-backend table: group the values (unique values or histogram bins), then run the DP."""
    n = native.shape[0]
    lo, hi = float(native.min()), float(native.max())
    binned = False
    span = hi - lo
    # (a span so small or so large that the bin width is not representable: group unique values)
    if n <= max_bins or span == 0 or not (np.isfinite(span) and np.isfinite(max_bins / span)):
        uniq, inverse, counts = np.unique(native, return_inverse=True, return_counts=True)
        inverse = inverse.ravel()
        groups = _unique_groups(uniq, counts, w, inverse)
        n_unique = int(uniq.shape[0])
    else:
        x64 = native.astype(np.float64, copy=False)
        ids, cnt, gsum, gmin, gmax = kern.histogram(x64, lo, span, max_bins)
        used = np.flatnonzero(cnt)
        if np.array_equal(gmin[used], gmax[used]):
            # Every non-empty bin holds a single distinct value (e.g. quantised weights): bins are exact.
            n_unique = int(used.shape[0])
            inverse = _compact(ids, used, max_bins)
            groups = _unique_groups(gmin[used], cnt[used], w, inverse)
        else:
            srt = np.sort(native)  # native dtype: float32 sorts several times faster than float64
            starts = np.flatnonzero(np.concatenate(([True], srt[1:] != srt[:-1])))
            n_unique = int(starts.shape[0])
            if n_unique <= max_bins:
                uniq = srt[starts]
                counts = np.diff(np.append(starts, n))
                inverse = np.searchsorted(uniq, native).astype(index_dtype(n_unique), copy=False)
                groups = _unique_groups(uniq, counts, w, inverse)
            else:
                binned = True
                groups = _binned_groups(x64, w, ids, cnt, gsum, gmin, gmax, used, max_bins)
                inverse = _compact(ids, used, max_bins)
        del ids
    inverse = inverse.astype(index_dtype(groups[0].shape[0]), copy=False)
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
    gw, gws, gwmean, gwm2, gcnt, gusum, gmin, gmax = groups
    if w is None:
        dpw, mu = gw, float(gws.sum() / gw.sum())
    else:
        wtot = float(gw.sum())
        if wtot > 0:
            # normalised to mean 1: the DP is scale-free and this keeps its prefix sums in a sane range
            dpw, mu = gw * (n_groups / wtot), float(gws.sum() / wtot)
        else:
            logger.debug("every weight is 0: partitioning as if unweighted (every inertia is 0)")
            dpw, mu = gcnt, float(gusum.sum() / gcnt.sum())
    # K == n_groups is trivial (every group its own cluster); the DP only runs below it.
    dp_kmax = min(kmax_eff, n_groups - 1)
    bounds = np.zeros((kmax_eff - kmin_eff + 1, kmax_eff + 1), dtype=np.int64)
    if kmin_eff <= dp_kmax:
        bounds[: dp_kmax - kmin_eff + 1, : dp_kmax + 1] = kern.dp_bounds(dpw, gwmean - mu, kmin_eff, dp_kmax)
    if kmax_eff == n_groups:
        bounds[-1] = np.arange(n_groups + 1)
    ks = tuple(range(kmin_eff, kmax_eff + 1))
    inertias = {}
    for r, k in enumerate(ks):
        _, sse = kern.clusters_from_bounds(bounds[r], k, *groups)
        inertias[k] = float(sse)
    logger.debug(
        "exact clustering: %d values, %d unique, %d groups%s%s, K %d..%d",
        n,
        n_unique,
        n_groups,
        " (binned)" if binned else "",
        " (weighted)" if w is not None else "",
        kmin_eff,
        kmax_eff,
    )

    def build(k: int) -> Clustering:
        b = bounds[k - kmin_eff, : k + 1]
        cent, sse = kern.clusters_from_bounds(b, k, *groups)
        labels = np.repeat(np.arange(k, dtype=index_dtype(k)), np.diff(b))
        return make_clustering(cent, labels[inverse].reshape(shape), sse)

    return ClusterTable(
        ks=ks,
        inertias=inertias,
        n_unique=n_unique,
        clamped=clamped,
        backend="exact",
        shape=shape,
        builder=build,
        binned=binned,
        weighted=w is not None,
    )


def _unique_groups(uniq: np.ndarray, counts: np.ndarray, w: np.ndarray | None, inverse: np.ndarray) -> _Groups:
    """Group statistics of exact unique values (``inverse`` maps every value to its unique value)."""
    u = uniq.astype(np.float64)
    c = counts.astype(np.float64)
    z = np.zeros_like(u)
    if w is None:
        return c, u * c, u, z, c, u * c, u, u
    gw = np.bincount(inverse, weights=w, minlength=u.shape[0])
    return gw, gw * u, u, z, c, u * c, u, u


def _binned_groups(
    x64: np.ndarray,
    w: np.ndarray | None,
    ids: np.ndarray,
    cnt: np.ndarray,
    gsum: np.ndarray,
    gmin: np.ndarray,
    gmax: np.ndarray,
    used: np.ndarray,
    nbins: int,
) -> _Groups:
    """Group statistics of the non-empty histogram bins (exact raw-value moments per bin)."""
    cnt_u, gsum_u = cnt[used].astype(np.float64), gsum[used]
    means = np.zeros(nbins)
    means[used] = gsum_u / cnt_u
    if w is None:
        gm2 = kern.bin_m2(x64, ids, means, nbins)[used]
        return cnt_u, gsum_u, means[used], gm2, cnt_u, gsum_u, gmin[used], gmax[used]
    ws, wx, wmean, wm2 = kern.bin_weighted(x64, w, ids, nbins)
    wmean = np.where(ws > 0, wmean, means)  # a zero-weight bin sits at its unweighted mean
    return ws[used], wx[used], wmean[used], wm2[used], cnt_u, gsum_u, gmin[used], gmax[used]


def _compact(ids: np.ndarray, used: np.ndarray, nbins: int) -> np.ndarray:
    """Map histogram bin ids to the indices of the non-empty bins."""
    remap = np.zeros(nbins, dtype=index_dtype(used.shape[0]))
    remap[used] = np.arange(used.shape[0])
    return remap[ids]
