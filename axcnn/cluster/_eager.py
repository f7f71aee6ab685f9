"""The Lloyd backends of :func:`axcnn.cluster.cluster_range`: scikit-learn and faiss, one fit per ``K``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import numpy as np

from axcnn.cluster.eq1 import index_dtype
from axcnn.cluster.scalar import Clustering, ClusterTable, make_clustering
from axcnn.errors import MissingBackendError

logger = logging.getLogger(__name__)


def eager_table(
    native: np.ndarray,
    w: np.ndarray | None,
    shape: tuple[int, ...],
    kmin: int,
    kmax: int,
    backend: str,
    seed: int,
    device: str,
) -> ClusterTable:
    """Run a Lloyd k-means backend once per requested ``K`` and keep the distinct effective solutions.

    ``w`` (sklearn only) is passed as ``sample_weight``; all-zero weights fit unweighted (every weighted
    inertia is then 0), like the exact backend.
    """
    x = native.astype(np.float64, copy=False)
    srt = np.sort(native)  # counting unique values on the native dtype is cheap (float32 sorts fast)
    n_unique = 1 + int(np.count_nonzero(srt[1:] != srt[:-1]))
    del srt
    kmax_eff = min(kmax, n_unique)
    kmin_eff = min(kmin, kmax_eff)

    if backend == "sklearn":
        fit = _sklearn_fitter(x, None if w is None or not w.any() else w, seed)
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
            cl = _finalize(x, labels, shape, w)
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
        weighted=w is not None,
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


def _sklearn_fitter(x: np.ndarray, w: np.ndarray | None, seed: int) -> Callable[[int], np.ndarray]:
    from sklearn.cluster import KMeans

    x2 = x.reshape(-1, 1)

    def fit(k: int) -> np.ndarray:
        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x2, sample_weight=w)
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


def _finalize(x: np.ndarray, labels: np.ndarray, shape: tuple[int, ...], w: np.ndarray | None) -> Clustering:
    """Turn an arbitrary labelling into a :class:`Clustering`: drop empty clusters, use the (weighted) means
    as centroids, sort them (merging clusters with equal means) and recompute the inertia exactly.

    A cluster of zero total weight takes the unweighted mean of its values.
    """
    means = _means(x, labels, w)
    used = np.flatnonzero(np.bincount(labels))
    _, rank = np.unique(means[used], return_inverse=True)
    remap = np.zeros(means.shape[0], dtype=np.intp)
    remap[used] = rank
    lab = remap[labels]
    cent = _means(x, lab, w)
    k = int(cent.shape[0])
    err = np.square(x - cent[lab])
    inertia = float(np.sum(err if w is None else w * err))
    return make_clustering(cent, lab.astype(index_dtype(k)).reshape(shape), inertia)


def _means(x: np.ndarray, labels: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """Per-label mean (weighted when ``w`` is given, unweighted where a label's total weight is 0)."""
    counts = np.bincount(labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.bincount(labels, weights=x, minlength=counts.shape[0]) / counts
        if w is not None:
            tw = np.bincount(labels, weights=w, minlength=counts.shape[0])
            wm = np.bincount(labels, weights=w * x, minlength=counts.shape[0]) / np.where(tw > 0, tw, 1.0)
            means = np.where(tw > 0, wm, means)
    return means
