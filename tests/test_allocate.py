"""allocate.frontier: the DP front equals brute force when the grid is exact, and never misstates a point."""

import itertools

import numpy as np
import pytest

from axcnn.allocate import Allocation, frontier


def brute(costs, proxies):
    allocs = []
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        bits = sum(c[j] for c, j in zip(costs, choice, strict=True))
        proxy = sum(p[j] for p, j in zip(proxies, choice, strict=True))
        allocs.append((bits, proxy))
    return allocs


@pytest.mark.parametrize("seed", range(25))
def test_exact_grid_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    layers = rng.integers(1, 5)
    costs = [list(rng.integers(0, 40, rng.integers(1, 5))) for _ in range(layers)]
    proxies = [list(rng.random(len(c)).round(3)) for c in costs]
    front = frontier(costs, proxies, resolution=10_000)
    allocs = brute(costs, proxies)
    for a in front:  # each point is what its choice says, and nothing smaller is as good
        assert a.bits == sum(c[j] for c, j in zip(costs, a.choice, strict=True))
        assert a.proxy == pytest.approx(sum(p[j] for p, j in zip(proxies, a.choice, strict=True)))
        assert min(p for b, p in allocs if b <= a.bits) == pytest.approx(a.proxy)
    # every brute-force optimum for a size budget appears on the front
    for budget in sorted({b for b, _ in allocs}):
        want = min(p for b, p in allocs if b <= budget)
        got = min(a.proxy for a in front if a.bits <= budget)
        assert got == pytest.approx(want)
    assert [a.bits for a in front] == sorted(a.bits for a in front)
    assert all(x.proxy > y.proxy for x, y in zip(front, front[1:], strict=False))


def test_coarse_grid_points_are_still_exact_and_non_dominated():
    rng = np.random.default_rng(7)
    costs = [list(rng.integers(100, 10_000, 6)) for _ in range(12)]
    proxies = [list(rng.random(6)) for _ in costs]
    front = frontier(costs, proxies, resolution=50)
    assert front and all(isinstance(a, Allocation) for a in front)
    for a in front:
        assert a.bits == sum(c[j] for c, j in zip(costs, a.choice, strict=True))
    assert all(x.bits < y.bits and x.proxy > y.proxy for x, y in zip(front, front[1:], strict=False))
    # the two ends: everything cheapest, and the least proxy
    assert front[0].bits == sum(min(c) for c in costs)
    assert front[-1].proxy == pytest.approx(sum(min(p) for p in proxies))


def test_degenerate_inputs():
    assert frontier([], []) == [Allocation((), 0, 0.0)]
    assert frontier([[5]], [[0.1]]) == [Allocation((0,), 5, 0.1)]
    with pytest.raises(ValueError, match="resolution=0"):
        frontier([[1]], [[0.0]], resolution=0)
    with pytest.raises(ValueError, match="layer 0"):
        frontier([[]], [[]])
    with pytest.raises(ValueError, match="layer 0"):
        frontier([[1]], [[float("nan")]])
