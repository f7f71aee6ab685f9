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
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from axcnn.cluster._lloyd import kmeanspp, lloyd
from axcnn.cluster.eq1 import index_dtype
from axcnn.cluster.groups import check_ks
from axcnn.cluster.scalar import as_int, candidate_k, check_values, check_weights, format_ks

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
        return candidate_k(k, self._sol, self.ks)

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
    cent = kmeanspp(x, wfit, k, rnd, trials)
    return lloyd(x, wfit, wassign, mask, cent, max_iter)


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
