"""Closed-form per-channel scale and bias corrections of a clustered layer, from its input moments."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from axcnn.correct.geometry import LayerGeometry
from axcnn.correct.stats import Moments, blas_limit, check_moments

__all__ = ["SCALE_RANGE", "ScaleBias", "fit_bias", "fit_outputs", "fit_scale_bias"]


class ScaleBias(NamedTuple):
    """Result of :func:`fit_scale_bias` / :func:`fit_bias` (float64 arrays ``[C_out]``).

    The corrected layer computes ``scale * conv(x, w_q) + bias``.  ``residual_before`` is the summed squared
    output error of the uncorrected clustered layer (``conv(x, w_q) + b_dense``) against the dense target,
    ``residual_after`` that of the corrected one, both over every sample and output position.
    """

    scale: np.ndarray
    bias: np.ndarray
    residual_before: np.ndarray
    residual_after: np.ndarray


#: Default clamp of the fitted scale.
SCALE_RANGE = (0.25, 4.0)


def fit_scale_bias(
    m: Moments,
    geometry: LayerGeometry,
    w_dense: np.ndarray,
    b_dense: np.ndarray | None,
    w_q: np.ndarray,
    *,
    scale_range: tuple[float, float] = SCALE_RANGE,
    blas_threads: int | None = 1,
) -> ScaleBias:
    """Per output channel least-squares scale and bias of the clustered layer, in closed form.

    Minimises ``sum (s_c * z_c + t_c - y_c)^2`` over samples and positions, with ``z_c = conv(x, w_q)_c``
    (no bias) on the input the moments saw and ``y_c = conv(xd, w_dense)_c + b_dense_c`` the dense output
    (``xd = x`` when the moments have no dense stream).  Computed from the moments only.

    Guards: a channel whose ``z`` has (relative) zero variance keeps ``s = 1`` (only the bias is fitted);
    ``s`` is clamped to ``scale_range`` (default ``[0.25, 4]``: a larger correction means the clustering,
    not the scale, is wrong) and the bias is then refitted for the clamped scale.

    Returns a :class:`ScaleBias`; ``bias`` is what the layer adds after the scale.  ``blas_threads`` as in
    :func:`moments`.
    """
    lo, hi = (float(v) for v in scale_range)
    if not (0 < lo <= 1 <= hi and np.isfinite(hi)):
        raise ValueError(f"scale_range must satisfy 0 < low <= 1 <= high < inf, got {scale_range}")
    with blas_limit(blas_threads):
        return _fit(m, geometry, w_dense, b_dense, w_q, lo, hi)


def fit_bias(
    m: Moments,
    geometry: LayerGeometry,
    w_dense: np.ndarray,
    b_dense: np.ndarray | None,
    w_q: np.ndarray,
    *,
    blas_threads: int | None = 1,
) -> ScaleBias:
    """Bias-only correction (``s = 1``): the new bias is ``b_dense + mean(y - z - b_dense)`` per channel."""
    with blas_limit(blas_threads):
        return _fit(m, geometry, w_dense, b_dense, w_q, 1.0, 1.0)


def _fit(m, geometry, w_dense, b_dense, w_q, lo, hi) -> ScaleBias:
    check_moments(m, geometry)
    wd = geometry.rows(w_dense)
    wq = geometry.rows(w_q)
    o = geometry.n_out
    if b_dense is None:
        b = np.zeros(o)
    else:
        b = np.asarray(b_dense, dtype=np.float64)
        if b.shape != (o,):
            raise ValueError(f"b_dense must have shape ({o},), got {b.shape}")
    n = float(m.count)
    # Per channel, with e = z - y0 (y0 = dense output without bias): residual of (s, t) is
    # sum (a z + c + e)^2 with a = s - 1, c = t - b.  Sums of z, e and their products come from the moments;
    # without a dense stream e = (w_q - w_d) . p, computed from the difference (no cancellation).
    szz, sz, sze, se, see = (np.empty((geometry.groups, o // geometry.groups)) for _ in range(5))
    for g in range(geometry.groups):
        gram, s = m.gram[g], m.sums[g]
        qg = wq[g] @ gram
        szz[g] = np.einsum("od,od->o", qg, wq[g])
        sz[g] = wq[g] @ s
        if m.has_dense:
            szy = np.einsum("od,od->o", wq[g] @ m.cross[g], wd[g])
            sy = wd[g] @ m.sums_dense[g]
            syy = np.einsum("od,od->o", wd[g] @ m.gram_dense[g], wd[g])
            sze[g] = szz[g] - szy
            se[g] = sz[g] - sy
            see[g] = szz[g] - 2 * szy + syy
        else:
            delta = wq[g] - wd[g]
            sze[g] = np.einsum("od,od->o", qg, delta)
            se[g] = delta @ s
            see[g] = np.einsum("od,od->o", delta @ gram, delta)
    szz, sz, sze, se, see = (a.reshape(o) for a in (szz, sz, sze, se, see))
    vz = szz - sz * sz / n
    cze = sze - sz * se / n
    ve = see - se * se / n
    ok = (vz > 1e-12 * np.maximum(szz, np.finfo(float).tiny)) & (vz > 0)
    a = np.where(ok, -cze / np.where(ok, vz, 1.0), 0.0)
    a = np.clip(a, lo - 1.0, hi - 1.0)
    c = -(se + a * sz) / n
    after = np.maximum(a * a * vz + 2 * a * cze + ve, 0.0)
    before = np.maximum(see, 0.0)
    return ScaleBias(scale=1.0 + a, bias=b + c, residual_before=before, residual_after=np.minimum(after, before))


def fit_outputs(z: np.ndarray, y: np.ndarray, axis: int, b_dense: np.ndarray | None = None, *, scale: bool = True,
                scale_range: tuple[float, float] = SCALE_RANGE) -> ScaleBias:
    """The same per-channel least-squares fit, from the layer's outputs themselves instead of input moments.

    ``z`` is the clustered layer's output without bias (on the compressed network's input), ``y`` the dense
    layer's output with its bias (on the dense network's input), both over the same samples, with the channels on
    ``axis``. Minimises ``sum (s_c * z_c + t_c - y_c)^2`` over every other axis; ``scale=False`` fits the bias
    alone (``s = 1``). ``residual_before`` is that of ``z + b_dense`` (zeros for ``b_dense`` None). Guards as in
    :func:`fit_scale_bias`. Cheaper than moments when the layer's outputs are at
    hand: a few sums over the outputs instead of ``d x d`` Gram matrices.
    """
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if z.shape != y.shape or z.ndim == 0:
        raise ValueError(f"z and y must have the same non-scalar shape, got {z.shape} and {y.shape}")
    axis = axis % z.ndim
    lo, hi = (float(v) for v in scale_range)
    if not (0 < lo <= 1 <= hi and np.isfinite(hi)):
        raise ValueError(f"scale_range must satisfy 0 < low <= 1 <= high < inf, got {scale_range}")
    zc = np.moveaxis(z, axis, 0).reshape(z.shape[axis], -1)
    yc = np.moveaxis(y, axis, 0).reshape(y.shape[axis], -1)
    n = zc.shape[1]
    mz, my = zc.mean(axis=1), yc.mean(axis=1)
    dz, dy = zc - mz[:, None], yc - my[:, None]
    vz = np.einsum("ij,ij->i", dz, dz) / n
    cov = np.einsum("ij,ij->i", dz, dy) / n
    vy = np.einsum("ij,ij->i", dy, dy) / n
    ok = vz > 1e-12 * np.maximum(np.einsum("ij,ij->i", zc, zc) / n, np.finfo(float).tiny)
    s = np.where(ok, cov / np.where(ok, vz, 1.0), 1.0) if scale else np.ones_like(mz)
    s = np.clip(s, lo, hi) if scale else s
    t = my - s * mz
    after = n * np.maximum(s * s * vz - 2 * s * cov + vy, 0.0)
    b = np.zeros(zc.shape[0]) if b_dense is None else np.asarray(b_dense, dtype=np.float64).reshape(-1)
    err = zc + b[:, None] - yc
    before = np.einsum("ij,ij->i", err, err)
    return ScaleBias(scale=s, bias=t, residual_before=before, residual_after=after)
