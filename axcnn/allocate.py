"""Bit allocation across layers (plain array code, no ONNX).

Each layer offers a few options, each with a cost in bits (Eq. 1 of the stored tensors) and a predicted loss (a
sensitivity proxy measured with only that layer compressed). Assuming the predicted losses add up, the best
networks form a front: for each total size, the least total predicted loss. :func:`frontier` computes it by
dynamic programming over layers on a grid of total sizes, as Optimal Brain Compression and SPDY do; the search then
measures a few of its points for real.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Allocation:
    """One point of the front: the option chosen for every layer, its exact total bits and predicted loss."""

    choice: tuple[int, ...]  # index into each layer's options
    bits: int
    proxy: float


def frontier(costs: Sequence[Sequence[int]], proxies: Sequence[Sequence[float]], resolution: int = 4096
             ) -> list[Allocation]:
    """The non-dominated allocations, smallest total bits first (and so largest total proxy first).

    ``costs[l][j]`` and ``proxies[l][j]`` describe option ``j`` of layer ``l``. Costs are binned on a grid of
    ``resolution`` steps over the range of possible totals, each rounded up, so a point's grid total never
    understates its exact total; every returned point carries its exact bits and proxy, and the list keeps only
    points that no other returned point beats on both. Raises ValueError for an empty layer, negative costs or
    non-finite proxies.
    """
    if len(costs) != len(proxies):
        raise ValueError(f"costs has {len(costs)} layers but proxies has {len(proxies)}")
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution={resolution!r} is invalid: allowed an integer >= 1")
    if not costs:
        return [Allocation((), 0, 0.0)]
    cost_arr = [np.asarray(c, dtype=np.int64) for c in costs]
    prox_arr = [np.asarray(p, dtype=np.float64) for p in proxies]
    for i, (c, p) in enumerate(zip(cost_arr, prox_arr, strict=True)):
        if c.ndim != 1 or c.size == 0 or c.shape != p.shape:
            raise ValueError(f"layer {i}: costs and proxies must be equal-length non-empty lists")
        if np.any(c < 0) or not np.all(np.isfinite(p)):
            raise ValueError(f"layer {i}: costs must be >= 0 and proxies finite")
    lo = sum(int(c.min()) for c in cost_arr)
    hi = sum(int(c.max()) for c in cost_arr)
    step = max(1, math.ceil((hi - lo) / resolution))
    # grid units above each layer's cheapest option, rounded up
    units = [np.ceil((c - c.min()) / step).astype(np.int64) for c in cost_arr]
    width = int(sum(int(u.max()) for u in units)) + 1
    best = np.full(width, np.inf)
    best[0] = 0.0
    back = []
    reach = 0
    for u, p in zip(units, prox_arr, strict=True):
        new = np.full(width, np.inf)
        arg = np.full(width, -1, dtype=np.int32)
        for j in range(len(u)):
            shifted = np.full(width, np.inf)
            shifted[u[j]:u[j] + reach + 1] = best[:reach + 1] + p[j]
            better = shifted < new
            new[better] = shifted[better]
            arg[better] = j
        reach += int(u.max())
        best = new
        back.append(arg)
    points: list[Allocation] = []
    floor = np.inf
    for g in range(width):
        if not np.isfinite(best[g]) or best[g] >= floor - 1e-15:
            continue
        floor = best[g]
        choice = [0] * len(units)
        at = g
        for layer in range(len(units) - 1, -1, -1):
            j = int(back[layer][at])
            choice[layer] = j
            at -= int(units[layer][j])
        bits = int(sum(int(c[j]) for c, j in zip(cost_arr, choice, strict=True)))
        proxy = float(sum(float(p[j]) for p, j in zip(prox_arr, choice, strict=True)))
        points.append(Allocation(tuple(choice), bits, proxy))
    # exact totals can reorder grid points slightly: keep the exact non-dominated set
    points.sort(key=lambda a: (a.bits, a.proxy))
    out: list[Allocation] = []
    for a in points:
        if not out or a.proxy < out[-1].proxy:
            out.append(a)
    return out
