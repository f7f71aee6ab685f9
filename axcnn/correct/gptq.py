"""GPTQ / OBQ-style error-feedback assignment of weights to a fixed codebook."""

from __future__ import annotations

import logging
import operator

import numpy as np

from axcnn.cluster.eq1 import index_dtype
from axcnn.correct.geometry import LayerGeometry
from axcnn.correct.stats import Moments, blas_limit, hessian
from axcnn.errors import AxcnnError

__all__ = ["gptq_assign"]

logger = logging.getLogger(__name__)


def gptq_assign(
    w: np.ndarray,
    centroids: np.ndarray,
    m: Moments | np.ndarray,
    geometry: LayerGeometry,
    damp: float = 0.01,
    *,
    codebook_ids: np.ndarray | None = None,
    act_order: bool = True,
    use_dense: bool = True,
    block_size: int = 128,
    blas_threads: int | None = 1,
) -> np.ndarray:
    """Assign every weight to a codebook entry with GPTQ / OBQ error feedback (the codebook stays fixed).

    For each output row, contraction entries are quantised one at a time to the nearest centroid and the
    error is spread over the entries not yet quantised through the inverse Hessian
    ``H = G + damp * mean(diag G) * I`` (per conv group), as GPTQ does: this greedily lowers the layer-output
    error ``(w - w_q)^T G (w - w_q)``, so a weight's index need not be its nearest centroid.  All output
    rows are processed at once; columns in blocks of ``block_size`` with lazy BLAS updates.

    Args:
        w: the weight (dense values).
        centroids: ``[K]`` shared by every weight, or ``[n_codebooks, K]`` with ``codebook_ids`` (e.g.
            :attr:`axcnn.cluster.GroupClustering.centroids` and :meth:`axcnn.cluster.GroupSpec.codebook_ids`).
            Padded (repeated) entries are never chosen over their first occurrence.
        m: the layer's :class:`Moments`, or a Gram / Hessian ``[groups, d, d]`` (``[d, d]`` for one group).
        geometry: the layer.
        damp: relative damping (``>= 0``).
        codebook_ids: integer array of the weight's shape selecting a row of a 2-D ``centroids``.
        act_order: quantise entries in order of decreasing ``diag(H)`` (GPTQ's ``act_order``).
        use_dense: when ``m`` has a dense stream, target the dense output: quantise the least-squares weight
            ``(W C^T + lambda W) H^-1`` of the compressed input instead of ``w``.
        block_size: columns per lazy-update block.
        blas_threads: as in :func:`moments`.

    Returns the indices, an array of the weight's shape (uint8 / uint16 / int32 by ``K``).  With a diagonal
    ``G`` there is no feedback and the result is the nearest-centroid assignment.
    """
    cents = np.asarray(centroids, dtype=np.float64)
    if cents.ndim == 1:
        cents = cents[None]
        if codebook_ids is not None:
            raise ValueError("codebook_ids needs 2-D centroids [n_codebooks, K]; got 1-D centroids")
        ids = np.zeros(geometry.weight_shape, dtype=np.intp)
    elif cents.ndim == 2:
        if codebook_ids is None:
            raise ValueError(f"2-D centroids {cents.shape} need codebook_ids of the weight's shape")
        ids = np.asarray(codebook_ids)
        if ids.shape != geometry.weight_shape or ids.dtype.kind not in "iu":
            raise ValueError(f"codebook_ids must be an integer array of shape {geometry.weight_shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= cents.shape[0]):
            raise ValueError(f"codebook_ids must be in [0, {cents.shape[0]}), got [{ids.min()}, {ids.max()}]")
    else:
        raise ValueError(f"centroids must be [K] or [n_codebooks, K], got shape {cents.shape}")
    if cents.shape[1] < 1 or not np.isfinite(cents).all():
        raise ValueError("centroids must be a non-empty finite array")
    block_size = operator.index(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    h = hessian(m, damp)
    want = (geometry.groups, geometry.d, geometry.d)
    if h.shape != want:
        raise ValueError(f"hessian does not fit this layer: shape {h.shape}, expected {want}")
    with blas_limit(blas_threads):
        return _gptq(w, cents, ids, m, h, geometry, act_order, use_dense, block_size)


def _gptq(w, cents, ids, m, h, geometry, act_order, use_dense, block_size) -> np.ndarray:
    w_rows = geometry.rows(w)
    id_rows = geometry.rows(ids).astype(np.intp)
    dense = use_dense and isinstance(m, Moments) and m.has_dense
    k = cents.shape[1]
    out = np.empty(w_rows.shape, dtype=np.intp)
    for g in range(geometry.groups):
        wg = w_rows[g]
        if dense:
            lam = h[g] - m.gram[g]  # the damping term
            wg = np.linalg.solve(h[g], (m.cross[g] @ wg.T) + lam @ wg.T).T
        out[g] = _gptq_group(wg, cents, id_rows[g], h[g], act_order, block_size)
    return geometry.unrows(out.astype(index_dtype(k)))


def _gptq_group(
    w: np.ndarray, cents: np.ndarray, ids: np.ndarray, h: np.ndarray, act_order: bool, block: int
) -> np.ndarray:
    """GPTQ over one group: ``w`` and ``ids`` are ``[rows, d]``; returns indices ``[rows, d]``."""
    d = w.shape[1]
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(d)
    w = w[:, perm].copy()
    ids = ids[:, perm]
    hp = h[np.ix_(perm, perm)]
    u = _inverse_cholesky_upper(hp)
    q_idx = np.empty(w.shape, dtype=np.intp)
    rows = np.arange(w.shape[0])
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1 = w[:, i1:i2]  # view: updated in place
        err = np.empty((w.shape[0], i2 - i1))
        for j in range(i2 - i1):
            col = w1[:, j]
            cb = cents[ids[:, i1 + j]]  # [rows, K]
            best = np.argmin(np.abs(cb - col[:, None]), axis=1)
            q = cb[rows, best]
            q_idx[:, i1 + j] = best
            e = (col - q) / u[i1 + j, i1 + j]
            w1[:, j:] -= np.outer(e, u[i1 + j, i1 + j : i2])
            err[:, j] = e
        if i2 < d:
            w[:, i2:] -= err @ u[i1:i2, i2:]
    inv = np.empty(d, dtype=np.intp)
    inv[perm] = np.arange(d)
    return q_idx[:, inv]


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), adding damping if rounding makes it fail."""
    eye = np.eye(h.shape[0])
    extra = 0.0
    scale = float(np.mean(np.diag(h))) or 1.0
    for _ in range(8):
        try:
            hinv = np.linalg.inv(h + extra * eye)
            hinv = (hinv + hinv.T) * 0.5
            return np.linalg.cholesky(hinv).T
        except np.linalg.LinAlgError:
            extra = scale * 1e-6 if extra == 0.0 else extra * 10
            logger.debug("gptq: Hessian not positive definite; damping by %.3g more", extra)
    raise AxcnnError("GPTQ: the layer's Hessian is not positive definite even after extra damping")
