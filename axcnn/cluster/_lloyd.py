"""numba kernels of vector k-means (:mod:`axcnn.cluster.vq`): greedy k-means++ seeding and Lloyd iterations
with Hamerly's bounds, all under a per-vector diagonal metric ``sum_j w[m, j] (x[m, j] - c[j])^2``."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, inline="always")
def _dist(x, w, m, c, cent):  # pragma: no cover - compiled
    s = 0.0
    for j in range(x.shape[1]):
        t = x[m, j] - cent[c, j]
        s += w[m, j] * t * t
    return s


@numba.njit(cache=True)
def kmeanspp(x, w, k, rnd, trials):  # pragma: no cover - compiled
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
def lloyd(x, w, wa, mask, cent, max_iter):  # pragma: no cover - compiled
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
