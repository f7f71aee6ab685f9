"""Scalar weight sharing with several codebooks per layer: one per channel group or one per kernel.

A :class:`GroupSpec` says which weights share a codebook:

``"layer"``
    one codebook for the whole array (what :func:`axcnn.cluster.cluster_range` does).
``"channel"``
    ``group_size`` consecutive slices along ``axis`` share a codebook; when ``group_size`` does not divide
    the axis, the *last* group is smaller.  ``axis=0`` of a conv weight ``[O, I, kh, kw]`` is one codebook
    per output channel (``group_size=1``) or per block of output channels.
``"kernel"``
    one codebook per ``(o, i)`` slice over the trailing dims of a weight of rank >= 3: a
    ``[O, I, kh, kw]`` conv has ``O * I`` codebooks of ``kh * kw`` values.

:func:`cluster_groups` solves every group *exactly* (optimal 1-D weighted k-means by the same dynamic
programme as the per-layer exact backend) for every requested ``K``.  Groups are processed in one compiled
loop (a 64x64x3x3 conv at kernel granularity is 4096 tiny problems); a group with more than ``max_bins``
values goes through :func:`axcnn.cluster.cluster_range` instead (histogram reduction, see there).

Every codebook has exactly ``K`` entries: a group with fewer unique values ``u < K`` uses ``u`` entries (its
values, inertia 0) and its codebook is padded by repeating its largest centroid; indices never point at
padding.  Rows of ``centroids`` are therefore sorted non-decreasing (strictly increasing over the used part).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from axcnn.cluster import _kernels as kern
from axcnn.cluster.eq1 import index_dtype
from axcnn.cluster.scalar import (
    ClusterTable,
    as_int,
    candidate_k,
    check_values,
    check_weights,
    cluster_range,
    format_ks,
)

__all__ = ["GRANULARITIES", "GroupClustering", "GroupSpec", "GroupTable", "check_ks", "cluster_groups"]

logger = logging.getLogger(__name__)

#: Values accepted by :attr:`GroupSpec.granularity`.
GRANULARITIES = ("layer", "channel", "kernel")


@dataclass(frozen=True)
class GroupSpec:
    """Which weights of an array share a codebook.

    Attributes:
        granularity: ``"layer"``, ``"channel"`` or ``"kernel"`` (see the module docstring).
        axis: ``"channel"`` only — the axis whose slices are grouped (negative counts from the end).
        group_size: ``"channel"`` only — consecutive slices per codebook, ``>= 1``.
    """

    granularity: str = "layer"
    axis: int = 0
    group_size: int = 1

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        object.__setattr__(self, "axis", as_int("axis", self.axis))
        gs = as_int("group_size", self.group_size)
        if gs < 1:
            raise ValueError(f"group_size must be >= 1, got {gs}")
        object.__setattr__(self, "group_size", gs)

    def _axis(self, shape: tuple[int, ...]) -> int:
        r = len(shape)
        if not -r <= self.axis < r:
            raise ValueError(f"axis must be in [{-r}, {r - 1}] for a weight of shape {tuple(shape)}, got {self.axis}")
        return self.axis % r

    def offsets(self, shape: tuple[int, ...]) -> np.ndarray:
        """Start of every group in the grouped (flattened) order, plus the total: int64 ``[n_codebooks + 1]``."""
        shape = tuple(int(d) for d in shape)
        size = int(np.prod(shape, dtype=np.int64))
        if self.granularity == "layer":
            return np.array([0, size], dtype=np.int64)
        if self.granularity == "kernel":
            if len(shape) < 3:
                raise ValueError(
                    f"granularity='kernel' needs a weight of rank >= 3 ([O, I, *kernel]), got shape {shape}"
                )
            taps = int(np.prod(shape[2:], dtype=np.int64))
            return np.arange(shape[0] * shape[1] + 1, dtype=np.int64) * taps
        a = self._axis(shape)
        n = shape[a]
        rest = size // n if n else 0
        starts = np.minimum(np.arange(0, n + self.group_size, self.group_size, dtype=np.int64), n)
        starts = np.unique(starts)  # drop the duplicated end when group_size divides n
        return starts * rest

    def n_codebooks(self, shape: tuple[int, ...]) -> int:
        """Number of codebooks of a weight of this shape."""
        return int(self.offsets(shape).shape[0] - 1)

    def to_groups(self, arr: np.ndarray) -> np.ndarray:
        """Flatten ``arr`` so that every group is contiguous (group ``g`` is ``offsets[g]:offsets[g+1]``)."""
        if self.granularity == "channel":
            arr = np.moveaxis(arr, self._axis(arr.shape), 0)
        return np.ascontiguousarray(arr).reshape(-1)

    def from_groups(self, flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of :meth:`to_groups`: an array of ``shape`` (C-contiguous)."""
        if self.granularity != "channel":
            return flat.reshape(shape)
        a = self._axis(shape)
        moved = (shape[a], *shape[:a], *shape[a + 1 :])
        return np.ascontiguousarray(np.moveaxis(flat.reshape(moved), 0, a))

    def codebook_ids(self, shape: tuple[int, ...]) -> np.ndarray:
        """int64 array of ``shape``: the codebook (row of ``centroids``) of every weight."""
        off = self.offsets(shape)
        ids = np.repeat(np.arange(off.shape[0] - 1, dtype=np.int64), np.diff(off))
        return self.from_groups(ids, tuple(shape))


@dataclass(frozen=True, eq=False)
class GroupClustering:
    """One solution of :func:`cluster_groups` for one ``K``.

    Attributes:
        k: entries per codebook.
        centroids: float64 ``[n_codebooks, k]``; row ``g`` is codebook ``g`` (see
            :meth:`GroupSpec.codebook_ids`), sorted, padded with its largest entry past ``used[g]``.
        indices: array of the weight's shape, values in ``[0, used[g])`` for a weight of codebook ``g``;
            dtype uint8 / uint16 / int32 as for :class:`axcnn.cluster.Clustering`.
        inertia: total (weighted) SSE over every group, float64.
        group_inertia: float64 ``[n_codebooks]``, the SSE of each group.
        used: int64 ``[n_codebooks]``, entries actually used: ``min(k, unique values of the group)``.
        spec: the grouping.

    Arrays are read-only.
    """

    k: int
    centroids: np.ndarray
    indices: np.ndarray
    inertia: float
    group_inertia: np.ndarray
    used: np.ndarray
    spec: GroupSpec

    def decode(self) -> np.ndarray:
        """The weight-shared array (float64, the weight's shape)."""
        ids = self.spec.codebook_ids(self.indices.shape)
        return self.centroids[ids, self.indices]

    def __repr__(self) -> str:
        return (
            f"GroupClustering(k={self.k}, codebooks={self.centroids.shape[0]}, inertia={self.inertia:.6g}, "
            f"spec={self.spec})"
        )


class GroupTable:
    """Every requested ``K`` of one array clustered per group; built by :func:`cluster_groups`.

    :meth:`inertia` and :meth:`group_inertia` are ready for every ``K`` of :attr:`ks`; :meth:`get` re-runs the
    (deterministic) solver for that ``K`` alone to materialise codebooks and indices, then caches them.

    Attributes:
        ks: the requested ``K``, ascending, deduplicated (not clamped: see ``used``).
        spec: the grouping.
        shape: shape of the clustered array.
        n_codebooks: number of groups.
        n_unique: int64 ``[n_codebooks]``, distinct values per group.
        weighted: True when per-value weights were given.
    """

    def __init__(
        self,
        *,
        ks: tuple[int, ...],
        spec: GroupSpec,
        shape: tuple[int, ...],
        sse: np.ndarray,
        n_unique: np.ndarray,
        weighted: bool,
        solver,
    ):
        self.ks = ks
        self.spec = spec
        self.shape = shape
        self.n_codebooks = int(sse.shape[0])
        self.n_unique = n_unique
        self.weighted = weighted
        self._sse = sse
        self._sse.setflags(write=False)
        self._pos = {k: i for i, k in enumerate(ks)}
        self._solver = solver
        self._cache: dict[int, GroupClustering] = {}

    def _check(self, k: int) -> int:
        return candidate_k(k, self._pos, self.ks)

    def inertia(self, k: int) -> float:
        """Total (weighted) SSE of the ``K = k`` solution (exact, float64)."""
        return float(self._sse[:, self._pos[self._check(k)]].sum())

    def group_inertia(self, k: int) -> np.ndarray:
        """Per-group (weighted) SSE ``[n_codebooks]`` of the ``K = k`` solution (read-only view)."""
        return self._sse[:, self._pos[self._check(k)]]

    def get(self, k: int) -> GroupClustering:
        """Codebooks and indices of the ``K = k`` solution (computed on first use, then cached)."""
        k = self._check(k)
        hit = self._cache.get(k)
        if hit is None:
            hit = self._cache[k] = self._solver(k)
        return hit

    def __contains__(self, k: object) -> bool:
        return k in self._pos

    def __len__(self) -> int:
        return len(self.ks)

    def __repr__(self) -> str:
        return (
            f"GroupTable(spec={self.spec}, ks={format_ks(self.ks)}, codebooks={self.n_codebooks}, "
            f"weighted={self.weighted})"
        )


def check_ks(ks: Iterable[int], name: str = "ks") -> tuple[int, ...]:
    """Validate a non-empty collection of ``K >= 1``: sorted, deduplicated tuple."""
    try:
        items = list(ks)
    except TypeError:
        raise ValueError(f"{name} must be an iterable of integers >= 1, got {ks!r}") from None
    if not items:
        raise ValueError(f"{name} must hold at least one K, got an empty collection")
    out = set()
    for k in items:
        k = as_int(name, k)
        if k < 1:
            raise ValueError(f"{name} must hold integers >= 1, got {k}")
        out.add(k)
    return tuple(sorted(out))


def cluster_groups(
    values: np.ndarray,
    ks: Iterable[int],
    spec: GroupSpec,
    *,
    weights: np.ndarray | None = None,
    max_bins: int = 1 << 16,
) -> GroupTable:
    """Cluster ``values`` into ``K`` shared values *per group* of ``spec``, for every ``K`` of ``ks``.

    Args:
        values: the weight (any real dtype); ``"kernel"`` needs rank >= 3.
        ks: the ``K`` to solve (any iterable of integers >= 1, e.g. ``range(2, 17)`` or ``[4, 8, 16]``).
        spec: the grouping (:class:`GroupSpec`).
        weights: optional per-value importance of the weight's shape, finite and ``>= 0``; same semantics as
            :func:`axcnn.cluster.cluster_range` (a group whose weights are all 0 is partitioned as if
            unweighted; its SSE is 0).
        max_bins: a group with more values than this is solved by :func:`cluster_range` with this
            ``max_bins`` (histogram reduction above that many unique values).

    Each group's solution is the globally optimal (weighted) 1-D k-means of the group for
    ``min(K, unique values of the group)`` clusters.  Cost: the DP is ``O(K_max n log n)`` per group of
    ``n`` values, all in one compiled loop.

    Raises:
        ValueError: bad ``ks`` / ``spec`` for this shape / ``weights`` / ``max_bins``, or an empty array.
        AxcnnError: the values contain NaN or infinity.
    """
    ks_t = check_ks(ks)
    if not isinstance(spec, GroupSpec):
        raise ValueError(f"spec must be a GroupSpec, got {type(spec).__name__}")
    max_bins = as_int("max_bins", max_bins)
    if max_bins < 2:
        raise ValueError(f"max_bins must be >= 2, got {max_bins}")
    arr = np.asarray(values)
    check_values(arr)
    shape = tuple(arr.shape)
    w = check_weights(weights, shape)
    off = spec.offsets(shape)
    flat = spec.to_groups(arr).astype(np.float64, copy=False)
    wflat = np.ones_like(flat) if w is None else spec.to_groups(w.reshape(shape))
    sizes = np.diff(off)
    big = np.flatnonzero(sizes > max_bins)
    small = np.flatnonzero(sizes <= max_bins)
    # the small groups, concatenated (a view when there is no big group)
    if big.size == 0:
        s_vals, s_wts, s_off, s_pos = flat, wflat, off, None
    else:
        s_pos = np.concatenate([np.arange(off[g], off[g + 1]) for g in small]) if small.size else np.zeros(0, int)
        s_vals, s_wts = flat[s_pos], wflat[s_pos]
        s_off = np.concatenate(([0], np.cumsum(sizes[small]))).astype(np.int64)
    ks_arr = np.asarray(ks_t, dtype=np.int64)

    n_groups = off.shape[0] - 1
    sse = np.zeros((n_groups, len(ks_t)))
    n_unique = np.zeros(n_groups, dtype=np.int64)
    if small.size:
        s_sse, s_nu, _, _ = kern.solve_groups(s_vals, s_wts, s_off, ks_arr, 0)
        sse[small], n_unique[small] = s_sse, s_nu
    tables: dict[int, ClusterTable] = {}
    for g in big:
        seg = slice(off[g], off[g + 1])
        tab = cluster_range(flat[seg], ks_t[0], ks_t[-1], weights=None if w is None else wflat[seg], max_bins=max_bins)
        tables[int(g)] = tab
        n_unique[g] = tab.n_unique
        sse[g] = [tab.inertia(min(k, tab.ks[-1])) for k in ks_t]
    logger.debug(
        "group clustering (%s): %d groups (%d via cluster_range), K %s%s",
        spec.granularity,
        n_groups,
        len(tables),
        format_ks(ks_t),
        " (weighted)" if w is not None else "",
    )

    def solve(k: int) -> GroupClustering:
        cent = np.zeros((n_groups, k))
        used = np.minimum(n_unique, k)
        lab_flat = np.zeros(flat.shape[0], dtype=np.int32)
        g_sse = sse[:, ks_t.index(k)].copy()
        if small.size:
            _, _, s_cent, s_lab = kern.solve_groups(s_vals, s_wts, s_off, np.array([k], dtype=np.int64), k)
            cent[small] = s_cent
            if s_pos is None:
                lab_flat = s_lab
            else:
                lab_flat[s_pos] = s_lab
        for g, tab in tables.items():
            c = tab.get(min(k, tab.ks[-1]))
            cent[g, : c.k] = c.centroids
            cent[g, c.k :] = c.centroids[-1]
            used[g] = c.k  # (a binned group may have fewer non-empty bins than unique values)
            lab_flat[off[g] : off[g + 1]] = c.indices.ravel()
        indices = spec.from_groups(lab_flat.astype(index_dtype(k)), shape)
        for a in (cent, indices, g_sse, used):
            a.setflags(write=False)
        return GroupClustering(
            k=k,
            centroids=cent,
            indices=indices,
            inertia=float(g_sse.sum()),
            group_inertia=g_sse,
            used=used,
            spec=spec,
        )

    return GroupTable(ks=ks_t, spec=spec, shape=shape, sse=sse, n_unique=n_unique, weighted=w is not None, solver=solve)
