"""numba kernels of the exact (dynamic-programming) 1-D k-means, shared by the per-layer and per-group paths.

A *group* here is a run of points of one value (or one histogram bin) with statistics

    W (total weight), WS (weighted sum), wmean (weighted mean), wm2 (weighted sum of squared deviations from
    wmean), cnt (number of raw values), usum (unweighted sum), gmin, gmax (range of the raw values).

Unweighted clustering uses ``W = cnt``, ``WS = usum`` and gives bit-for-bit the arithmetic of the
unweighted code this module replaced.  A cluster whose total weight is zero takes the *unweighted* mean of its
values as centroid (its weighted SSE is 0 whatever the centroid).
"""

from __future__ import annotations

import numba
import numpy as np

# ----------------------------------------------------------------------------------------------------------
# Histogram reduction of large layers
# ----------------------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def histogram(x, lo, span, nbins):  # pragma: no cover - compiled
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
def bin_m2(x, ids, means, nbins):  # pragma: no cover - compiled
    """Per-bin sum of squared deviations from the bin mean (second, numerically careful pass)."""
    m2 = np.zeros(nbins, dtype=np.float64)
    for t in range(x.shape[0]):
        b = ids[t]
        d = x[t] - means[b]
        m2[b] += d * d
    return m2


@numba.njit(cache=True)
def bin_weighted(x, w, ids, nbins):  # pragma: no cover - compiled
    """Per-bin total weight, weighted sum and weighted sum of squared deviations from the weighted mean.

    A bin of zero total weight gets weighted mean 0 and m2 0 (the caller replaces the mean).
    """
    ws = np.zeros(nbins, dtype=np.float64)
    wx = np.zeros(nbins, dtype=np.float64)
    for t in range(x.shape[0]):
        b = ids[t]
        ws[b] += w[t]
        wx[b] += w[t] * x[t]
    mean = np.zeros(nbins, dtype=np.float64)
    for b in range(nbins):
        if ws[b] > 0.0:
            mean[b] = wx[b] / ws[b]
    m2 = np.zeros(nbins, dtype=np.float64)
    for t in range(x.shape[0]):
        b = ids[t]
        d = x[t] - mean[b]
        m2[b] += w[t] * d * d
    return ws, wx, mean, m2


# ----------------------------------------------------------------------------------------------------------
# The dynamic programme
# ----------------------------------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _seg_cost(p0, p1, p2, j, i):  # pragma: no cover - compiled
    """Weighted SSE of groups ``j..i-1`` around their mean, from prefix sums of w, w*x, w*x^2 (0 if w = 0)."""
    w = p0[i] - p0[j]
    if w <= 0.0:
        return 0.0
    s = p1[i] - p1[j]
    c = (p2[i] - p2[j]) - s * s / w
    return c if c > 0.0 else 0.0


@numba.njit(cache=True)
def dp_bounds(w, x, kmin, kmax):  # pragma: no cover - compiled
    """Optimal 1-D weighted k-means for every K in ``[kmin, kmax]`` over sorted points ``x`` with weights ``w``.

    ``D[k][i] = min_j D[k-1][j] + cost(j, i)`` where ``cost(j, i)`` is the weighted SSE of points
    ``j..i-1``.  The cost is a Monge array for non-negative weights, so the (leftmost) optimal split is
    monotone in ``i`` (and in ``k``) and each level is filled by divide and conquer in O(N log N).  ``x``
    should be centred (it is, by the callers) so that the prefix sums of ``w*x^2`` do not cancel
    catastrophically.  Zero weights are allowed (a zero-weight run costs 0).

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
def clusters_from_bounds(b, kk, gw, gws, gwmean, gwm2, gcnt, gusum, gmin, gmax):  # pragma: no cover - compiled
    """Centroids and exact weighted SSE of the clusters ``b[c] .. b[c+1]-1`` of ``kk`` groups.

    The centroid of a cluster is its weighted mean (its unweighted mean when its total weight is 0), clipped
    to the cluster's range against rounding (keeps centroids sorted and distinct).  The SSE around centroid
    ``m`` is ``sum_g gwm2[g] + gw[g] * (gwmean[g] - m)^2``, exact for the raw values.
    """
    cent = np.empty(kk)
    sse = 0.0
    for c in range(kk):
        a = b[c]
        e = b[c + 1]
        wsum = 0.0
        ssum = 0.0
        for g in range(a, e):
            wsum += gw[g]
            ssum += gws[g]
        if wsum > 0.0:
            m = ssum / wsum
        else:
            csum = 0.0
            usum = 0.0
            for g in range(a, e):
                csum += gcnt[g]
                usum += gusum[g]
            m = usum / csum
        # Guard against rounding pushing the mean outside the cluster's range (keeps centroids distinct).
        if m < gmin[a]:
            m = gmin[a]
        if m > gmax[e - 1]:
            m = gmax[e - 1]
        for g in range(a, e):
            d = gwmean[g] - m
            sse += gwm2[g] + gw[g] * d * d
        cent[c] = m
    return cent, sse


# ----------------------------------------------------------------------------------------------------------
# Many small groups at once (channel / kernel granularity)
# ----------------------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def solve_groups(vals, wts, offsets, ks, k_labels):  # pragma: no cover - compiled
    """Exact weighted 1-D k-means of every group ``vals[offsets[g]:offsets[g+1]]`` for every K of ``ks``.

    ``ks`` is sorted ascending.  Per group, ``K`` is clamped to the group's number of unique values ``u``
    (``K >= u`` is the trivial zero-SSE solution).  A group whose weights are all zero is partitioned as if
    unweighted (its weighted SSE is 0 for any partition).

    When ``k_labels > 0`` the solution with ``K = k_labels`` (which must be in ``ks``) is also materialised:
    ``centroids[g, :min(k_labels, u)]`` sorted ascending and padded with the group's largest centroid, and
    ``labels`` (one per value, in ``vals`` order) in ``[0, min(k_labels, u))``.

    Returns ``(sse [G, len(ks)], n_unique [G], centroids [G, k_labels], labels [N] int32)``.
    """
    ng = offsets.shape[0] - 1
    nk = ks.shape[0]
    kmax_req = ks[nk - 1]
    kmin_req = ks[0]
    sse = np.zeros((ng, nk))
    n_unique = np.zeros(ng, dtype=np.int64)
    kl = k_labels if k_labels > 0 else 1
    cent_out = np.zeros((ng, kl))
    labels = np.zeros(vals.shape[0] if k_labels > 0 else 0, dtype=np.int32)
    for g in range(ng):
        a = offsets[g]
        e = offsets[g + 1]
        n = e - a
        v = vals[a:e]
        wv = wts[a:e]
        order = np.argsort(v)
        # unique runs of the sorted values
        gval = np.empty(n)
        gw = np.zeros(n)
        gcnt = np.zeros(n)
        run = np.empty(n, dtype=np.int64)  # unique index of each sorted position
        u = 0
        for t in range(n):
            x = v[order[t]]
            if t == 0 or x != gval[u - 1]:
                gval[u] = x
                u += 1
            run[t] = u - 1
            gw[u - 1] += wv[order[t]]
            gcnt[u - 1] += 1.0
        gval = gval[:u]
        gw = gw[:u]
        gcnt = gcnt[:u]
        n_unique[g] = u
        wtot = gw.sum()
        # DP weights: normalised to mean 1 (scale-free); all-zero weights -> counts
        if wtot > 0.0:
            dpw = gw * (u / wtot)
            gws = gw * gval
        else:
            dpw = gcnt.copy()
            gws = np.zeros(u)
        gusum = gcnt * gval
        gwm2 = np.zeros(u)
        kmax_dp = min(kmax_req, u - 1)
        kmin_dp = min(kmin_req, kmax_dp)
        if kmax_dp >= 1:
            mu = (dpw * gval).sum() / dpw.sum()
            bounds = dp_bounds(dpw, gval - mu, kmin_dp, kmax_dp)
        else:
            bounds = np.zeros((1, 2), dtype=np.int64)
        trivial = np.arange(u + 1)
        for r in range(nk):
            kk = min(ks[r], u)
            if kk == u:
                b = trivial
            else:
                b = bounds[kk - kmin_dp, : kk + 1]
            cent, s = clusters_from_bounds(b, kk, gw, gws, gval, gwm2, gcnt, gusum, gval, gval)
            sse[g, r] = s
            if k_labels > 0 and ks[r] == k_labels:
                for c in range(kk):
                    cent_out[g, c] = cent[c]
                for c in range(kk, k_labels):
                    cent_out[g, c] = cent[kk - 1]
                # label of unique run q, then of every value
                lab_u = np.empty(u, dtype=np.int32)
                for c in range(kk):
                    for q in range(b[c], b[c + 1]):
                        lab_u[q] = c
                for t in range(n):
                    labels[a + order[t]] = lab_u[run[t]]
    return sse, n_unique, cent_out, labels
