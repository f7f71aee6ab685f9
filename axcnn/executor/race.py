"""The best-first race of :func:`axcnn.score.best_first`, with several candidate batches in flight at once.

No Ray here: the race talks to whatever runs the batches through two callables, ``submit(k, j)`` (start scoring
batch ``j`` of candidate ``k``) and ``land() -> (k, j, correct)`` (wait for one started batch to finish), so the
logic is tested with any landing order and any number of slots, without a cluster.

How the result stays identical to the local race: the decisions are a *replay* of ``best_first`` step for step
(same lead phase, same stop checks, same choice of the next candidate, same ``done`` calls in the same order);
where ``best_first`` runs a batch, the replay reads that batch's count, waiting for it if it has not landed. The
batches run *ahead* of the replay, up to ``slots`` at once:

- the lead batches (which ``best_first`` runs for every candidate, whatever happens) first;
- then, speculatively, the next batches of the candidates the replay has not stopped, highest upper bound first
  (the one ``best_first`` would most likely run next), skipping candidates whose upper bound, from the batches
  already landed, cannot beat a candidate already fully landed.

A batch the replay needs is always started (even past ``slots``), so speculation only changes the cost: a landed
batch the replay never reads is wasted work, and the outcomes (counts, samples seen, early stops) and the ``done``
sequence are those of ``best_first``, whatever order the batches land in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from axcnn.score import Outcome, drive_race, wins

Submit = Callable[[int, int], None]
Land = Callable[[], tuple[int, int, int]]


@dataclass
class RaceStats:
    """Batches started, and how many of them the race read (the local race runs exactly those)."""

    started: int = 0
    read: int = 0

    @property
    def wasted(self) -> int:
        return self.started - self.read


@dataclass(eq=False)  # identity: tracked in lists, as in score.best_first
class _Run:
    k: int
    batch: int = 0
    correct: int = 0
    seen: int = 0
    out: bool = False


def lead_batches(sizes: Sequence[int], lead: int) -> int:
    """How many batches ``best_first`` runs for every candidate before racing (those starting before ``lead``)."""
    start = count = 0
    for size in sizes:
        if start >= lead:
            break
        start += size
        count += 1
    return count


def parallel_best_first(ks: Sequence[int], sizes: Sequence[int], submit: Submit, land: Land, slots: int,
                        done: Callable[[int, Outcome], None] | None = None, lead: int = 0,
                        stats: RaceStats | None = None) -> dict[int, Outcome]:
    """``score.best_first`` over candidates ``ks`` (in the caller's order) and batches of ``sizes`` samples, with up
    to ``slots`` batches in flight. Returns exactly what ``best_first`` returns; see the module docstring."""
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    stats = stats if stats is not None else RaceStats()
    sizes = [int(s) for s in sizes]
    total, nb = sum(sizes), len(sizes)
    n_lead = lead_batches(sizes, lead)
    runs = [_Run(k) for k in ks]
    known: dict[int, dict[int, int]] = {k: {} for k in ks}  # landed counts, by batch
    flying = {k: 0 for k in ks}
    nxt = {k: 0 for k in ks}  # batches below it have been started (each candidate's batches start in order)
    inflight = 0
    best: _Run | None = None
    results: dict[int, Outcome] = {}

    def launch(k: int) -> None:
        nonlocal inflight
        submit(k, nxt[k])
        nxt[k] += 1
        flying[k] += 1
        inflight += 1
        stats.started += 1

    def receive() -> None:
        nonlocal inflight
        k, j, correct = land()
        known[k][j] = int(correct)
        flying[k] -= 1
        inflight -= 1

    def upper(k: int) -> int:  # from the landed batches, whether the replay has read them or not
        return total - sum(sizes[j] - c for j, c in known[k].items())

    def priority(r: _Run):
        # the upper bound, less the errors expected from the batches already in flight (at the rate of the
        # candidate's landed batches after the lead), so that slots spread once a candidate is seen to err
        after = [(sizes[j] - c, sizes[j]) for j, c in known[r.k].items() if j >= n_lead]
        rate = sum(e for e, _ in after) / sum(s for _, s in after) if after else 0.0
        pending = sum(sizes[j] for j in range(nxt[r.k]) if j not in known[r.k])
        return upper(r.k) - rate * pending, len(known[r.k]), -r.k

    def fill() -> None:
        top = None  # the best candidate fully landed
        for k in ks:
            if len(known[k]) == nb:
                c = sum(known[k].values())
                if top is None or wins(c, k, *top):
                    top = (c, k)
        while inflight < slots:
            certain = [r for r in runs if not r.out and nxt[r.k] < n_lead]
            if certain:  # the replay reads every lead batch: start them first, candidates in turn
                launch(min(certain, key=lambda r: (nxt[r.k], ks.index(r.k))).k)
                continue
            pool = [r for r in runs if not r.out and nxt[r.k] < nb
                    and (top is None or wins(upper(r.k), r.k, *top))]
            if not pool:
                return
            launch(max(pool, key=priority).k)

    def count(r: _Run) -> int:
        while r.batch not in known[r.k]:
            if nxt[r.k] == r.batch:  # needed now: start it whatever the slots
                launch(r.k)
            fill()
            receive()
        stats.read += 1
        return known[r.k][r.batch]

    def finish(r: _Run, stopped: bool) -> None:
        r.out = True
        results[r.k] = Outcome(r.correct, r.seen, total, stopped)
        if done is not None:
            done(r.k, results[r.k])

    def step(r: _Run) -> None:
        nonlocal best
        correct = count(r)
        r.correct += correct
        r.seen += sizes[r.batch]
        r.batch += 1
        if r.batch == nb:
            if best is None or wins(r.correct, r.k, best.correct, best.k):
                best = r
            finish(r, False)

    drive_race(runs, lead, total, step, finish, lambda: best)  # the same steps as score.best_first
    return results


def parallel_all(ks: Sequence[int], sizes: Sequence[int], submit: Submit, land: Land, slots: int,
                 done: Callable[[int, Outcome], None] | None = None,
                 stats: RaceStats | None = None) -> dict[int, Outcome]:
    """Every candidate scored over every batch (``score.evaluate`` for each), up to ``slots`` batches in flight;
    ``done(k, outcome)`` as each candidate's last batch lands."""
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    stats = stats if stats is not None else RaceStats()
    sizes = [int(s) for s in sizes]
    total, nb = sum(sizes), len(sizes)
    units = [(k, j) for k in ks for j in range(nb)]
    counts: dict[int, list[int]] = {k: [] for k in ks}
    results: dict[int, Outcome] = {}
    started = inflight = 0
    for k in ks:
        if nb == 0:
            results[k] = Outcome(0, 0, 0, False)
            if done is not None:
                done(k, results[k])
    while len(results) < len(ks):
        while started < len(units) and inflight < slots:
            submit(*units[started])
            started += 1
            inflight += 1
            stats.started += 1
        k, _, correct = land()
        inflight -= 1
        stats.read += 1
        counts[k].append(int(correct))
        if len(counts[k]) == nb:
            results[k] = Outcome(sum(counts[k]), total, total, False)
            if done is not None:
                done(k, results[k])
    return {k: results[k] for k in ks}
