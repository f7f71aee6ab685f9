"""Seeded, label-stratified subsets of a scoring set."""

from __future__ import annotations

import operator

import numpy as np


def stratified_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` sample indices chosen at random, stratified by label, sorted ascending.

    Per-class counts are proportional to the class frequencies (largest-remainder rounding, so they sum to
    ``n`` exactly); the samples within a class are drawn with ``np.random.default_rng(seed)``. ``n >= len(y)``
    returns all indices. Never simply the first ``n``: test sets are often ordered by class.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {list(y.shape)}")
    try:
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"n must be an integer >= 1, got {n!r}") from None
    if n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n}")
    total = len(y)
    if n >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quota = counts * n / total
    take = np.floor(quota).astype(np.int64)
    left = n - int(take.sum())
    if left:
        frac = quota - take
        # largest remainder first; ties broken at random (seeded) rather than by class order
        order = np.lexsort((rng.random(len(classes)), -frac))
        take[order[:left]] += 1
    chosen = []
    for k in range(len(classes)):
        if take[k]:
            members = np.flatnonzero(inverse == k)
            chosen.append(rng.choice(members, size=int(take[k]), replace=False))
    idx = np.sort(np.concatenate(chosen)).astype(np.int64)
    return idx


