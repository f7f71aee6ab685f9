"""Budget mode: the smallest model within an accuracy budget (``--max-loss``), or the most accurate one at a
compression ratio (``--target-cr``).

Over the sensitivity table of :mod:`axcnn.search.sensitivity`:

1. **Allocation**: assuming the per-layer proxies add up, :func:`axcnn.allocate.frontier` gives, for each total
   size, the least total proxy (dynamic programming over layers).
2. **Search**: points of that front are assembled (with the sequential repair) and their real top-1 loss measured
   on the selection samples, with an exact early stop once well over budget. Loss against proxy is fitted over every
   network measured, and the point where the fit meets the budget is measured next, until it settles.
3. **Verification**: the chosen network is scored on held-out samples the search never used. If it is over the
   budget there, the search steps to a more accurate point of the front (at most ``MAX_STEP_UPS`` times, each one
   a further look at the held-out samples, counted in the report); if nothing in range fits, it raises
   :class:`BudgetNotMet` naming the best loss reached.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from axcnn.allocate import Allocation
from axcnn.config import CompressConfig
from axcnn.errors import BudgetNotMet
from axcnn.explore import Exploration, Explorer
from axcnn.model import LayerSpec
from axcnn.search.measure import verify
from axcnn.search.sensitivity import build_decisions, choice, predicted_front, sensitivity_section

log = logging.getLogger(__name__)

#: where the search of the front starts (total proxy, nats), and the factor it steps by when what it has measured
#: gives the fit nothing to go on (no loss yet, or every network far over the budget)
START_PROXY = 0.05
STEP = 4.0
#: at most this many networks assembled and measured to find the budget's point on the front ...
MAX_EVALS = 6
#: ... and none once the next would be within this fraction of the size of the last (they differ by noise there)
RESOLVE = 0.03
#: width (in log proxy) of the weights of the loss-against-proxy fit around its target
TARGET_WIDTH = 0.5
#: at most this many extra looks at the held-out samples when the verification says "over budget"
MAX_STEP_UPS = 3


def run_budget(explorer: Explorer, layers: list[LayerSpec], config: CompressConfig,
               verification: tuple[np.ndarray, np.ndarray] | None, progress=None) -> tuple[Exploration, dict]:
    """Run budget mode; return the Exploration (decisions with their repairs) and the budget report section."""
    progress = progress or (lambda *a, **k: None)
    t_start = time.perf_counter()
    pf = predicted_front(explorer, layers, config, verification, progress)
    search, tab, idx, front, dense_bits = pf.search, pf.table, pf.idx, pf.allocations, pf.dense_bits
    n = len(explorer.labels)
    ref = explorer.reference_correct
    looks: list[dict] = []

    def evaluate(a: Allocation, max_wrong: int | None):
        model, picked = search.assemble(tab, choice(tab, idx, a))
        c = search.measure(model, max_wrong)
        looks.append({"bits": a.bits, "proxy": a.proxy, "compression_ratio": dense_bits / a.bits,
                      "selection_loss_pp": None if c.stopped else 100.0 * (ref - c.correct) / n,
                      "stopped_early": c.stopped, "samples_seen": c.seen})
        return model, picked, c

    checks: list[dict] = []  # every verification, in order: what the held-out samples said of each network checked
    if config.max_loss is not None:
        allowed = (n - ref) + math.floor(config.max_loss / 100.0 * n + 1e-9)
        best = _search_front(front, evaluate, allowed, n, ref, config)
        chosen = best
        steps = 0
        ver = verify(search, chosen[1], verification)
        _record_check(checks, front[chosen[0]], dense_bits, chosen[3], ref, n, ver)
        sel = 100.0 * (ref - chosen[3].correct) / n  # selection loss of the network checked (measured, then predicted)
        while ver is not None and ver["accuracy_loss_pp"] > config.max_loss and steps < MAX_STEP_UPS:
            steps += 1
            # aim the selection loss lower by the excess seen on the verification samples (the loss grows about in
            # proportion to the total proxy here), between 15% and 40% less proxy a step: the excess is partly the
            # noise of a few thousand held-out samples, so several small steps cost less ratio than one large one
            want = sel - (ver["accuracy_loss_pp"] - config.max_loss)
            ratio = min(0.85, max(0.6, want / sel)) if sel > 0 else 0.6
            logp = np.log(np.maximum([a.proxy for a in front], 1e-12))
            nxt = int(np.argmin(np.abs(logp - (logp[chosen[0]] + np.log(ratio)))))
            nxt = min(len(front) - 1, max(nxt, chosen[0] + 1))
            if nxt == chosen[0]:
                break
            log.info("verification loss %.2f pp is over the budget; stepping to a more accurate point",
                     ver["accuracy_loss_pp"])
            # only the verification decides a step, and the written file is scored on the selection samples at
            # the end anyway: a stepped-to network is not measured on them here
            sel *= front[nxt].proxy / front[chosen[0]].proxy
            model, picked = search.assemble(tab, choice(tab, idx, front[nxt]))
            chosen = (nxt, model, picked, None)
            ver = verify(search, model, verification)
            _record_check(checks, front[nxt], dense_bits, None, ref, n, ver)
        if ver is not None and ver["accuracy_loss_pp"] > config.max_loss:
            raise BudgetNotMet(
                f"the budget --max-loss {config.max_loss:g} pp is not met on the {ver['samples']} held-out "
                f"verification samples: the chosen network loses {ver['accuracy_loss_pp']:.2f} pp there "
                f"(95% CI {ver['ci95_pp'][0]:.2f} to {ver['ci95_pp'][1]:.2f}) after {steps + 1} checks; "
                "raise the budget or give more data")
    else:
        max_bits = dense_bits / config.target_cr
        fits = [j for j, a in enumerate(front) if a.bits <= max_bits + 1e-9]
        if not fits:
            raise BudgetNotMet(f"no network with K in [{config.kmin}, {config.kmax}] reaches --target-cr "
                               f"{config.target_cr:g}: the smallest found has an Eq. 1 ratio of "
                               f"{dense_bits / front[0].bits:.2f}; lower the target or --kmin")
        tried = []
        for j in fits[-3:]:
            model, picked, c = evaluate(front[j], None)
            tried.append((c.correct, front[j].bits * -1, j, model, picked, c))
        tried.sort(key=lambda t: (t[0], t[1]))
        _, _, j, model, picked, c = tried[-1]
        chosen = (j, model, picked, c)
        steps = 0
        ver = verify(search, model, verification)
        _record_check(checks, front[j], dense_bits, c, ref, n, ver)

    j, model, picked, c = chosen
    explorer.candidates_resumed += search.resumed
    decisions = build_decisions(search, tab, picked)
    skipped = tuple((layer.site.spec.name, "no K in range makes it smaller") for layer in tab if not layer.entries)
    section = {
        "mode": "budget",
        "budget": {"max_loss_pp": config.max_loss, "target_cr": config.target_cr, "met": True,
                   "verification_checks": 0 if verification is None else steps + 1, "verifications": checks,
                   "measured_points": looks, "front_points": len(front)},
        "sensitivity": sensitivity_section(search, tab),
        "search_cost_passes": search.passes,
        "search_times_s": dict(search.times),
        "search_counts": dict(search.counts),
        "search_s": time.perf_counter() - t_start,
    }
    exploration = Exploration(tuple(decisions), skipped, explorer.reference_correct, n, explorer.t_pass_s,
                              "kl", final_model=model, scoring_s=search.scoring_s)
    return exploration, section


def _record_check(checks: list[dict], a: Allocation, dense_bits: int, c, ref: int, n: int, ver: dict | None) -> None:
    if ver is not None:
        checks.append({"compression_ratio": dense_bits / a.bits,
                       "selection_loss_pp": None if c is None else 100.0 * (ref - c.correct) / n,
                       "verification_loss_pp": ver["accuracy_loss_pp"], "ci95_pp": ver["ci95_pp"]})


def _search_front(front: list[Allocation], evaluate, allowed: int, n: int, ref: int, config: CompressConfig):
    """The smallest point of the front predicted within ``allowed`` errors on the selection samples.

    A network's extra errors grow about in proportion to its total proxy (ResNet-20: 0.05 nat ~ 0.4-0.6 pp,
    0.08 ~ 1 pp, 0.2 ~ 2.4 pp), and one network's count is noisy (a few thousand samples: +-0.6 pp). So every
    measured network informs the choice: extra errors = a * proxy is fitted by weighted least squares over the
    networks measured so far (weighted towards those near the target), the target proxy is the budget over a, and
    the front's point there is measured next, until the target lands on a point already measured or within
    ``RESOLVE`` of the size, at most ``MAX_EVALS`` assemblies. Choosing on the fit rather than on the largest
    network whose own count passed avoids favouring a network whose samples happened to go its way. Networks far
    over the budget stop early and only say "too far": the next is ``STEP`` times less proxy.
    Returns (index, model, picked, count) of the chosen point."""
    logp = np.log(np.maximum([a.proxy for a in front], 1e-12))  # decreasing with the index
    last = len(front) - 1
    extra = allowed - (n - ref)  # extra errors the budget allows on the selection samples
    stop = allowed + max(2 * extra, n // 100)  # counts known exactly up to about 3x the budget
    seen: dict[int, tuple] = {}

    def wrong(j: int) -> int:
        if j not in seen:
            model, picked, c = evaluate(front[j], stop)
            seen[j] = (model, picked, c, stop + 1 if c.stopped else n - c.correct)
        return seen[j][3]

    def index_of(lp: float) -> int:
        """The smallest network (lowest index) whose proxy is at most exp(lp); the most accurate if none."""
        below = np.flatnonzero(logp <= lp + 1e-12)
        return int(below[0]) if len(below) else last

    def target() -> float | None:
        """log of the proxy the fit puts at the budget; None when nothing measured has a count to fit."""
        pts = [(front[i].proxy, w - (n - ref)) for i, (_, _, c, w) in seen.items() if not c.stopped]
        if not pts:
            return None
        p, e = np.array(pts, dtype=np.float64).T
        lt = None
        for _ in range(3):  # refit around the target (the relation bends a little over a decade of proxy)
            w = np.ones_like(p) if lt is None else np.exp(-0.5 * ((np.log(p) - lt) / TARGET_WIDTH) ** 2) + 1e-3
            a = float(np.sum(w * e * p) / np.sum(w * p * p))
            if a <= 0:  # no loss measured yet: go STEP times further than the largest proxy measured
                return float(np.log(p.max() * STEP))
            lt = float(np.log(max(extra, 0.5) / a))
        return lt

    j, lt = index_of(np.log(START_PROXY)), None
    for _ in range(MAX_EVALS):
        wrong(j)
        lt = target()
        if lt is None:  # all measured stopped early, far over the budget: STEP times less proxy
            if j == last:
                break
            nxt = max(j + 1, index_of(logp[j] - np.log(STEP)))
        else:
            nxt = index_of(lt)
        if nxt in seen or abs(front[nxt].bits - front[j].bits) <= RESOLVE * front[j].bits:
            break
        j = nxt
    if lt is None or (nxt == last and wrong(last) > allowed):
        c = seen[max(seen)][2]
        lost = f"more than {100.0 * (stop - (n - ref)) / n:.2f}" if c.stopped else \
            f"{100.0 * (ref - c.correct) / n:.2f}"
        raise BudgetNotMet(
            f"no network with K in [{config.kmin}, {config.kmax}] is within --max-loss {config.max_loss:g} pp: "
            f"the most accurate one found loses {lost} pp on the {n} selection samples; raise --kmax or the budget")
    if nxt not in seen or seen[nxt][2].stopped:  # the fit's choice: its selection loss sizes a step-down, if any
        model, picked, c = evaluate(front[nxt], None)
        seen[nxt] = (model, picked, c, n - c.correct)
    model, picked, c, _ = seen[nxt]
    return nxt, model, picked, c
