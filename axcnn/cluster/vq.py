"""Vector weight sharing: ``vector_dim`` consecutive weights along one axis share a codebook entry.

With ``vector_dim = 2`` and ``vector_axis = 1`` (the input-channel axis of a conv weight ``[O, I, kh, kw]``),
weights ``w[o, 2v, y, x]`` and ``w[o, 2v+1, y, x]`` form one 2-D vector; the layer stores one index per
vector (shape ``[O, ceil(I/2), kh, kw]``) and one codebook of ``K`` 2-D entries.  An odd axis size pads the
last vector of each row by repeating the last weight; padding is excluded from the fit and the inertia (its
coordinate has weight 0) and :meth:`VectorClustering.decode` drops it.

:func:`cluster_vectors` runs k-means (k-means++ seeding with greedy trials, then Lloyd iterations) compiled
with numba, once per ``K``, deterministically for a given ``seed``.  **Guarantee: a local optimum only** —
on return with ``converged=True`` every vector is assigned to its nearest centroid and every centroid is
the (weighted) mean of its vectors (Lloyd's fixed point); the global optimum of vector k-means is NP-hard
and is not sought.  The inertia never increases along the iterations.

Optional per-weight importance ``weights`` (the weight's shape) make the objective
``sum_vectors sum_j w_j (x_j - c_j)^2`` (a diagonal metric per vector); centroid coordinates are weighted
means.  A vector whose weights are all 0 is assigned by the unweighted distance (it costs nothing either
way); a centroid coordinate whose vectors all have weight 0 there takes their unweighted mean.  If every
weight is 0 the fit is the unweighted one and every inertia is 0.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import numba
import numpy as np

from axcnn.cluster.eq1 import index_dtype
from axcnn.cluster.groups import check_ks
from axcnn.cluster.scalar import as_int, check_values, check_weights, format_ks

__all__ = ["VectorClustering", "VectorTable", "cluster_vectors", "index_shape", "n_vectors"]

logger = logging.getLogger(__name__)


def _axis(shape: tuple[int, ...], vector_axis: int) -> int:
    r = len(shape)
    vector_axis = as_int("vector_axis", vector_axis)
    if not -r <= vector_axis < r:
        raise ValueError(f"vector_axis must be in [{-r}, {r - 1}] for a weight of shape {shape}, got {vector_axis}")
    return vector_axis % r


def index_shape(shape: tuple[int, ...], vector_axis: int, vector_dim: int) -> tuple[int, ...]:
    """Shape of the index array: ``shape`` with ``shape[vector_axis]`` replaced by ``ceil(. / vector_dim)``."""
    shape = tuple(int(d) for d in shape)
    a = _axis(shape, vector_axis)
    vector_dim = _check_dim(vector_dim)
    return (*shape[:a], -(-shape[a] // vector_dim), *shape[a + 1 :])


def n_vectors(shape: tuple[int, ...], vector_axis: int, vector_dim: int) -> int:
    """Number of vectors (= stored indices) of a weight: the size of :func:`index_shape`."""
    return int(np.prod(index_shape(shape, vector_axis, vector_dim), dtype=np.int64))


def _check_dim(vector_dim: int) -> int:
    vector_dim = as_int("vector_dim", vector_dim)
    if vector_dim < 1:
        raise ValueError(f"vector_dim must be >= 1, got {vector_dim}")
    return vector_dim


@dataclass(frozen=True, eq=False)
class VectorClustering:
    """One vector-sharing solution.

    Attributes:
        k: codebook entries actually used (effective ``K``).
        centroids: float64 ``[k, vector_dim]``.
        indices: :func:`index_shape` of the weight, values in ``[0, k)``, dtype uint8 / uint16 / int32.
        inertia: (weighted) SSE over the real (unpadded) weights, float64.
        shape: shape of the original weight.
        vector_axis: the (non-negative) axis along which vectors run.
        n_iter: Lloyd iterations run.
        converged: True when the assignment was stable (a Lloyd fixed point) before ``max_iter``.

    Arrays are read-only.
    """

    k: int
    centroids: np.ndarray
    indices: np.ndarray
    inertia: float
    shape: tuple[int, ...]
    vector_axis: int
    n_iter: int
    converged: bool

    def decode(self) -> np.ndarray:
        """The weight-shared array (float64, the original weight's shape, padding dropped)."""
        a = self.vector_axis
        d = self.centroids.shape[1]
        vals = self.centroids[self.indices]  # [..., nv, ..., d]
        vals = np.moveaxis(vals, -1, a + 1)  # [..., nv, d, ...]
        full = vals.reshape(*self.indices.shape[:a], self.indices.shape[a] * d, *self.indices.shape[a + 1 :])
        return np.ascontiguousarray(np.take(full, np.arange(self.shape[a]), axis=a))

    def __repr__(self) -> str:
        return (
            f"VectorClustering(k={self.k}, dim={self.centroids.shape[1]}, inertia={self.inertia:.6g}, "
            f"n_iter={self.n_iter}, converged={self.converged})"
        )


class VectorTable:
    """Every requested ``K`` of one weight, vector-shared; built by :func:`cluster_vectors` (eagerly).

    Attributes:
        ks: effective ``K``, ascending, deduplicated (a requested ``K`` above the number of distinct vectors
            is clamped to it; if two requested ``K`` give the same effective ``K``, the lower inertia wins).
        n_distinct: number of distinct vectors.
        clamped: True when a requested ``K`` exceeded ``n_distinct``.
        shape, vector_axis, vector_dim: the weight's shape and the vector layout.
        weighted: True when per-weight importance was given.
    """

    def __init__(
        self,
        *,
        solutions: dict[int, VectorClustering],
        n_distinct: int,
        clamped: bool,
        shape: tuple[int, ...],
        vector_axis: int,
        vector_dim: int,
        weighted: bool,
    ):
        self.ks = tuple(sorted(solutions))
        self.n_distinct = n_distinct
        self.clamped = clamped
        self.shape = shape
        self.vector_axis = vector_axis
        self.vector_dim = vector_dim
        self.weighted = weighted
        self._sol = solutions

    def _check(self, k: int) -> int:
        try:
            k = operator.index(k)
        except TypeError:
            raise KeyError(f"K must be an integer, got {k!r}") from None
        if k not in self._sol:
            raise KeyError(f"K={k} is not a candidate of this table; available K: {format_ks(self.ks)}")
        return k

    def inertia(self, k: int) -> float:
        """(Weighted) SSE of the ``K = k`` solution."""
        return self._sol[self._check(k)].inertia

    def get(self, k: int) -> VectorClustering:
        """The ``K = k`` solution."""
        return self._sol[self._check(k)]

    def __contains__(self, k: object) -> bool:
        return k in self._sol

    def __len__(self) -> int:
        return len(self.ks)

    def __repr__(self) -> str:
        return (
            f"VectorTable(ks={format_ks(self.ks)}, dim={self.vector_dim}, axis={self.vector_axis}, "
            f"n_distinct={self.n_distinct}, weighted={self.weighted})"
        )


def to_vectors(arr: np.ndarray, vector_axis: int, vector_dim: int, pad_value: float | None = None) -> np.ndarray:
    """``[n_vectors, vector_dim]`` rows of ``arr`` (vectors along ``vector_axis``, in index order).

    The last vector of each row is padded with the row's last element, or with ``pad_value`` when given.
    """
    a = _axis(arr.shape, vector_axis)
    moved = np.moveaxis(arr, a, -1)
    n = moved.shape[-1]
    pad = -n % vector_dim
    if pad:
        tail = moved[..., -1:] if pad_value is None else np.full((*moved.shape[:-1], 1), pad_value, moved.dtype)
        moved = np.concatenate([moved, np.repeat(tail, pad, axis=-1)], axis=-1)
    return np.ascontiguousarray(moved).reshape(-1, vector_dim)


def cluster_vectors(
    values: np.ndarray,
    ks: Iterable[int],
    *,
    vector_axis: int = 1,
    vector_dim: int = 2,
    weights: np.ndarray | None = None,
    seed: int = 0,
    max_iter: int = 300,
) -> VectorTable:
    """Vector-share ``values`` with one codebook of ``K`` entries of ``vector_dim`` values, for every ``K``.

    Args:
        values: the weight (any real dtype, any rank >= 1).
        ks: the ``K`` to fit (iterable of integers >= 1).
        vector_axis: axis along which ``vector_dim`` consecutive weights form a vector (default 1: the input
            channels of a conv / Gemm ``[O, I]`` weight).
        vector_dim: values per vector (>= 1; 1 is scalar sharing by Lloyd — prefer the exact
            :func:`axcnn.cluster.cluster_range` then).
        weights: optional per-weight importance, the weight's shape, finite and ``>= 0``.
        seed: seed of the k-means++ draws; the solution of a ``K`` is a deterministic function of
            ``(values, weights, seed, K)`` (``seed`` must be >= 0).
        max_iter: cap on Lloyd iterations per ``K``.

    Each ``K`` is fitted independently: greedy k-means++ seeding (``2 + ln K`` candidates per centroid, the
    one lowering the potential most is kept), then Lloyd iterations until no vector changes cluster.
    An empty cluster is re-seeded at the vector farthest from its centroid.  ``K`` at or above the number of
    distinct vectors gives every distinct vector its own entry (inertia 0).  See the module docstring for the
    guarantees (local optimum).

    Raises:
        ValueError: bad ``ks`` / ``vector_axis`` / ``vector_dim`` / ``weights`` / ``max_iter``, empty array.
        AxcnnError: the values contain NaN or infinity.
    """
    ks_t = check_ks(ks)
    vector_dim = _check_dim(vector_dim)
    max_iter = as_int("max_iter", max_iter)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    seed = as_int("seed", seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    arr = np.asarray(values)
    check_values(arr)
    shape = tuple(arr.shape)
    a = _axis(shape, vector_axis)
    w = check_weights(weights, shape)
    idx_shape = index_shape(shape, a, vector_dim)

    x = to_vectors(arr.astype(np.float64, copy=False), a, vector_dim)
    mask = to_vectors(np.ones(shape), a, vector_dim, pad_value=0.0)
    wv = mask if w is None else to_vectors(w.reshape(shape), a, vector_dim, pad_value=0.0)
    # fitting weights: all-zero importance fits unweighted (every weighted inertia is then 0)
    wfit = mask if not wv.any() else wv
    mass = wfit.sum(axis=1)
    wassign = np.where(mass[:, None] > 0, wfit, mask)

    uniq, inverse = np.unique(x, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    n_distinct = int(uniq.shape[0])
    best: dict[int, VectorClustering] = {}
    for k_req in ks_t:
        k = min(k_req, n_distinct)
        if k == n_distinct:
            cent, labels, n_iter, converged = uniq, inverse.astype(np.int64), 0, True
        else:
            trials = 2 + int(math.log(k))
            # one stream per (seed, K): a K's solution does not depend on which other K were asked for
            rnd = np.random.default_rng([seed, k]).random((k, trials + 1))
            cent, labels, n_iter, converged = _fit(x, wfit, wassign, mask, k, rnd, trials, max_iter)
        sol = _finish(x, wv, mask, cent, labels, shape, a, idx_shape, n_iter, converged)
        old = best.get(sol.k)
        if old is None or sol.inertia < old.inertia:
            best[sol.k] = sol
        if not converged:
            logger.info("vector k-means K=%d stopped at max_iter=%d before converging", k, max_iter)
    logger.debug(
        "vector clustering: %d vectors of %d, %d distinct, K %s", x.shape[0], vector_dim, n_distinct, format_ks(ks_t)
    )
    return VectorTable(
        solutions=best,
        n_distinct=n_distinct,
        clamped=ks_t[-1] > n_distinct,
        shape=shape,
        vector_axis=a,
        vector_dim=vector_dim,
        weighted=w is not None,
    )


def _fit(x, wfit, wassign, mask, k, rnd, trials, max_iter):
    cent = _kmeanspp(x, wfit, k, rnd, trials)
    return _lloyd(x, wfit, wassign, mask, cent, max_iter)


def _finish(x, wv, mask, cent, labels, shape, a, idx_shape, n_iter, converged) -> VectorClustering:
    """Drop unused entries, make every entry the (weighted) mean of its vectors, compute the exact inertia."""
    used, lab = np.unique(labels, return_inverse=True)
    lab = lab.ravel()
    k = int(used.shape[0])
    c = np.asarray(cent, dtype=np.float64)[used].copy()
    for j in range(x.shape[1]):
        den = np.bincount(lab, weights=wv[:, j], minlength=k)
        num = np.bincount(lab, weights=wv[:, j] * x[:, j], minlength=k)
        uden = np.bincount(lab, weights=mask[:, j], minlength=k)
        unum = np.bincount(lab, weights=mask[:, j] * x[:, j], minlength=k)
        c[:, j] = np.where(uden > 0, unum / np.where(uden > 0, uden, 1.0), c[:, j])
        c[:, j] = np.where(den > 0, num / np.where(den > 0, den, 1.0), c[:, j])
    inertia = float(np.sum(wv * np.square(x - c[lab])))
    moved_shape = (*idx_shape[:a], *idx_shape[a + 1 :], idx_shape[a])
    indices = np.ascontiguousarray(np.moveaxis(lab.astype(index_dtype(k)).reshape(moved_shape), -1, a))
    c.setflags(write=False)
    indices.setflags(write=False)
    return VectorClustering(
        k=k,
        centroids=c,
        indices=indices,
        inertia=inertia,
        shape=shape,
        vector_axis=a,
        n_iter=int(n_iter),
        converged=bool(converged),
    )


# ----------------------------------------------------------------------------------------------------------
# numba kernels
# ----------------------------------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _dist(x, w, m, c, cent):  # pragma: no cover - compiled
    s = 0.0
    for j in range(x.shape[1]):
        t = x[m, j] - cent[c, j]
        s += w[m, j] * t * t
    return s


@numba.njit(cache=True)
def _kmeanspp(x, w, k, rnd, trials):  # pragma: no cover - compiled
    """Greedy k-means++ seeding: ``k`` distinct vectors of ``x`` (requires ``k <= distinct vectors``).

    The first centre is drawn proportionally to each vector's total weight, every next one among ``trials``
    draws proportional to the current (weighted) squared distance, keeping the draw that lowers the
    potential most.  Should the weighted potential reach 0 before ``k`` centres (zero weights), the next
    draws use the unweighted distance, so that ``k`` distinct centres are always returned.
    """
    n, d = x.shape
    cent = np.empty((k, d))
    mass = np.empty(n)
    for m in range(n):
        mass[m] = w[m].sum()
    cdf = np.cumsum(mass)
    first = np.searchsorted(cdf, rnd[0, 0] * cdf[n - 1], side="right")
    if first >= n:
        first = n - 1
    cent[0] = x[first]
    ones = np.ones_like(w)
    dw = np.empty(n)
    du = np.empty(n)
    for m in range(n):
        dw[m] = _dist(x, w, m, 0, cent)
        du[m] = _dist(x, ones, m, 0, cent)
    cand = np.empty((1, d))
    for c in range(1, k):
        use_u = dw.sum() <= 0.0
        dist = du if use_u else dw
        wm = ones if use_u else w
        cdf = np.cumsum(dist)
        best_pot = np.inf
        best_i = -1
        for t in range(trials):
            i = np.searchsorted(cdf, rnd[c, t + 1] * cdf[n - 1], side="right")
            if i >= n:
                i = n - 1
            # never re-pick a centre (guards rounding at the flat parts of the cdf)
            while dist[i] <= 0.0 and i < n - 1:
                i += 1
            while dist[i] <= 0.0 and i > 0:
                i -= 1
            cand[0] = x[i]
            pot = 0.0
            for m in range(n):
                v = _dist(x, wm, m, 0, cand)
                pot += v if v < dist[m] else dist[m]
            if pot < best_pot:
                best_pot = pot
                best_i = i
        cent[c] = x[best_i]
        for m in range(n):
            v = _dist(x, w, m, c, cent)
            if v < dw[m]:
                dw[m] = v
            v = _dist(x, ones, m, c, cent)
            if v < du[m]:
                du[m] = v
    return cent


@numba.njit(cache=True)
def _scan(x, wa, m, cent, cur):  # pragma: no cover - compiled
    """Squared distances of vector ``m`` to its nearest and second-nearest centroid, and the nearest's index
    (ties keep ``cur``, the current cluster)."""
    k = cent.shape[0]
    b1 = np.inf
    b2 = np.inf
    i1 = 0
    for c in range(k):
        s = _dist(x, wa, m, c, cent)
        if s < b1:
            b2 = b1
            b1 = s
            i1 = c
        elif s < b2:
            b2 = s
    if cur >= 0 and i1 != cur and _dist(x, wa, m, cur, cent) <= b1:
        i1 = cur
    return b1, b2, i1


@numba.njit(cache=True)
def _lloyd(x, w, wa, mask, cent, max_iter):  # pragma: no cover - compiled
    """Lloyd iterations from ``cent``: assign by the metric ``wa``, update to ``w``-weighted means.

    Hamerly's bounds skip the vectors that provably keep their cluster: ``upper[m]`` bounds the distance
    (in vector ``m``'s own metric ``sqrt(sum_j wa[m, j] v_j^2)``) to its centroid, ``lower[m]`` the distance
    to every other centroid; a centroid moving by ``delta`` (Euclidean) moves by at most
    ``sqrt(max_j wa[m, j]) * delta`` in that metric.  The assignment is therefore the same as a full scan.

    Returns ``(centroids, labels, iterations, converged)``.
    """
    n, d = x.shape
    k = cent.shape[0]
    cent = cent.copy()
    labels = np.empty(n, dtype=np.int64)
    upper = np.empty(n)
    lower = np.empty(n)
    hi = np.empty(n)
    lo = np.empty(n)
    for m in range(n):
        hi[m] = np.sqrt(wa[m].max())
        lo[m] = np.sqrt(wa[m].min())
        b1, b2, i1 = _scan(x, wa, m, cent, -1)
        labels[m] = i1
        upper[m] = np.sqrt(b1)
        lower[m] = np.sqrt(b2)
    old = np.empty((k, d))
    delta = np.empty(k)
    half = np.empty(k)
    converged = False
    it = 1
    while it < max_iter:
        # ---- update: weighted means; an empty cluster takes the vector with the largest upper bound
        num = np.zeros((k, d))
        den = np.zeros((k, d))
        unum = np.zeros((k, d))
        uden = np.zeros((k, d))
        cnt = np.zeros(k, dtype=np.int64)
        for m in range(n):
            c = labels[m]
            cnt[c] += 1
            for j in range(d):
                num[c, j] += w[m, j] * x[m, j]
                den[c, j] += w[m, j]
                unum[c, j] += mask[m, j] * x[m, j]
                uden[c, j] += mask[m, j]
        old[:] = cent
        for c in range(k):
            if cnt[c] > 0:
                continue
            far = -1
            fv = 0.0
            for m in range(n):
                if cnt[labels[m]] > 1 and upper[m] > fv:
                    fv = upper[m]
                    far = m
            if far < 0:
                continue
            src = labels[far]
            cnt[src] -= 1
            cnt[c] = 1
            for j in range(d):
                num[src, j] -= w[far, j] * x[far, j]
                den[src, j] -= w[far, j]
                unum[src, j] -= mask[far, j] * x[far, j]
                uden[src, j] -= mask[far, j]
                num[c, j] = w[far, j] * x[far, j]
                den[c, j] = w[far, j]
                unum[c, j] = mask[far, j] * x[far, j]
                uden[c, j] = mask[far, j]
                cent[c, j] = x[far, j]
            labels[far] = c
            upper[far] = 0.0
            lower[far] = 0.0
        for c in range(k):
            for j in range(d):
                if den[c, j] > 1e-300:
                    cent[c, j] = num[c, j] / den[c, j]
                elif uden[c, j] > 0.0:
                    cent[c, j] = unum[c, j] / uden[c, j]
        # ---- bounds
        m1 = 0.0
        m2 = 0.0
        a1 = -1
        for c in range(k):
            s = 0.0
            for j in range(d):
                t = cent[c, j] - old[c, j]
                s += t * t
            delta[c] = np.sqrt(s)
            if delta[c] > m1:
                m2 = m1
                m1 = delta[c]
                a1 = c
            elif delta[c] > m2:
                m2 = delta[c]
        for c in range(k):
            best = np.inf
            for c2 in range(k):
                if c2 != c:
                    s = 0.0
                    for j in range(d):
                        t = cent[c, j] - cent[c2, j]
                        s += t * t
                    if s < best:
                        best = s
            half[c] = 0.5 * np.sqrt(best) if k > 1 else np.inf
        # ---- assignment
        it += 1
        changed = 0
        for m in range(n):
            a = labels[m]
            upper[m] += hi[m] * delta[a]
            lower[m] -= hi[m] * (m2 if a == a1 else m1)
            z = max(lower[m], lo[m] * half[a])
            if upper[m] <= z:
                continue
            upper[m] = np.sqrt(_dist(x, wa, m, a, cent))
            if upper[m] <= z:
                continue
            b1, b2, i1 = _scan(x, wa, m, cent, a)
            upper[m] = np.sqrt(b1)
            lower[m] = np.sqrt(b2)
            if i1 != a:
                labels[m] = i1
                changed += 1
        if changed == 0:
            converged = True
            break
    return cent, labels, it, converged
