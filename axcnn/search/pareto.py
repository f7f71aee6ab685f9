"""Pareto mode (``--pareto``): the paper's Algorithm 3, a front of (accuracy loss, compression ratio) networks for
the user to pick from.

Algorithm 3 keeps, layer after layer, the partial networks that no other beats on both loss and size, and carries
them forward. Over the sensitivity table (:mod:`axcnn.search.sensitivity`) that set is computed exactly by
:func:`axcnn.allocate.frontier` (the dynamic programme is Algorithm 3 on predicted losses, without a beam's pruning
error). The beam bounds what is *measured*: ``--beam N`` networks spread along the predicted front (evenly in log
predicted loss, from nearly lossless to about one nat of KL) are assembled with the sequential repair and scored
on every selection sample and, when there is a held-out part, on the verification samples. The measured points
that no other measured point beats on the selection samples form the reported front, and ``--pick`` chooses on
them too; the verification loss of each point is reported beside it, and the chosen network's is the report's
headline figure (choosing on the held-out samples would make them no longer held out).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from axcnn.config import CompressConfig
from axcnn.errors import BudgetNotMet
from axcnn.explore import Exploration, Explorer, LayerDecision
from axcnn.model import LayerSpec
from axcnn.search.measure import measure_many
from axcnn.search.sensitivity import build_decisions, choice, predicted_front, sensitivity_section

log = logging.getLogger(__name__)

#: the measured points span the predicted front from this total proxy (nats; a loss of about 0.1 point on
#: ResNet-20: below it, networks differ by less than the noise of a few thousand samples) ...
LOW_PROXY = 1e-2
#: ... to this one (about where the network stops being useful), plus one nearly lossless anchor
HIGH_PROXY = 1.0
ANCHOR_PROXY = 1e-3
#: the pick when none is given
DEFAULT_PICK = "loss:1"


@dataclass
class Point:
    """One measured network of the front."""

    index: int  # in the predicted front
    bits: int
    compression_ratio: float
    proxy: float
    selection: dict
    verification: dict | None
    model: onnx.ModelProto = field(repr=False)
    decisions: list[LayerDecision] = field(repr=False)
    dominated: bool = False

    @property
    def loss_pp(self) -> float:
        """The loss the front is formed and picked on: the selection samples'. The verification samples are only
        reported (``verification``): choosing among points on them would make them no longer held out."""
        return self.selection["accuracy_loss_pp"]

    @property
    def measured_on(self) -> str:
        return "selection"


def spread(proxies: np.ndarray, count: int) -> list[int]:
    """``count`` distinct indices of a front (proxies decreasing with the index): one nearly lossless anchor (the
    point nearest ``ANCHOR_PROXY``, or the most accurate), and the rest evenly in log proxy between ``HIGH_PROXY``
    and ``LOW_PROXY``, clipped to the front's range; fewer when the front is shorter."""
    logp = np.log(np.maximum(proxies, 1e-12))
    hi = min(float(logp[0]), np.log(HIGH_PROXY))
    lo = max(float(logp[-1]), np.log(LOW_PROXY))
    if hi <= lo:
        hi, lo = float(logp[0]), float(logp[-1])
    picked = [int(np.argmin(np.abs(logp - max(float(logp[-1]), np.log(ANCHOR_PROXY)))))]
    for t in np.linspace(hi, lo, max(1, count - 1)):
        j = int(np.argmin(np.abs(logp - t)))
        if j not in picked:
            picked.append(j)
    return sorted(picked)


def mark_dominated(points: list[Point]) -> None:
    """A point is dominated when another loses no more and compresses no less, one of them strictly."""
    for p in points:
        p.dominated = any(
            q is not p and q.loss_pp <= p.loss_pp and q.compression_ratio >= p.compression_ratio
            and (q.loss_pp < p.loss_pp or q.compression_ratio > p.compression_ratio)
            for q in points)


def pick(points: list[Point], rule: str | None) -> Point:
    """The front point ``rule`` chooses (see ``CompressConfig.pick``). Raises BudgetNotMet when an explicit rule
    fits no point; the default falls back to the most accurate point with a warning."""
    front = sorted((p for p in points if not p.dominated), key=lambda p: p.compression_ratio)
    kind, _, number = (rule or DEFAULT_PICK).partition(":")
    x = float(number)
    if kind == "index":
        if int(x) >= len(front):
            raise BudgetNotMet(f"--pick index:{int(x)} is out of range: the front has {len(front)} points "
                               f"(index 0 is the least compressed)")
        return front[int(x)]
    if kind == "cr":
        fits = [p for p in front if p.compression_ratio >= x]
        if not fits:
            raise BudgetNotMet(f"no point of the front reaches --pick cr:{x:g}: the largest ratio measured is "
                               f"{front[-1].compression_ratio:.2f}")
        return min(fits, key=lambda p: (p.loss_pp, -p.compression_ratio))
    fits = [p for p in front if p.loss_pp <= x]
    if fits:
        return max(fits, key=lambda p: p.compression_ratio)
    best = min(front, key=lambda p: p.loss_pp)
    if rule is not None:
        raise BudgetNotMet(f"no point of the front is within --pick loss:{x:g}: the most accurate measured loses "
                           f"{best.loss_pp:.2f} pp (on the {best.measured_on} samples)")
    log.warning("no point of the front is within %g pp; writing the most accurate (%.2f pp at ratio %.2f)", x,
                best.loss_pp, best.compression_ratio)
    return best


def run_pareto(explorer: Explorer, layers: list[LayerSpec], config: CompressConfig,
               verification: tuple[np.ndarray, np.ndarray] | None, progress=None
               ) -> tuple[Exploration, dict, list[Point]]:
    """Run Pareto mode; return the chosen network's Exploration, the report section, and every measured point."""
    progress = progress or (lambda *a, **k: None)
    t_start = time.perf_counter()
    pf = predicted_front(explorer, layers, config, verification, progress)
    search, tab, idx, front, dense_bits = pf.search, pf.table, pf.idx, pf.allocations, pf.dense_bits
    n, ref = len(explorer.labels), explorer.reference_correct
    points: list[Point] = []
    spots = spread(np.array([a.proxy for a in front]), config.beam)
    built = [search.assemble(tab, choice(tab, idx, front[j])) for j in spots]
    for j, (model, picked), (c, ver) in zip(spots, built, measure_many(search, [m for m, _ in built], verification),
                                            strict=True):
        a = front[j]
        sel = {"samples": n, "reference_score": ref / n, "final_score": c.correct / n,
               "accuracy_loss_pp": round(100.0 * (ref - c.correct) / n, 6)}
        points.append(Point(j, a.bits, dense_bits / a.bits, a.proxy, sel, ver, model,
                            build_decisions(search, tab, picked)))
        log.info("front point: ratio %.2f, loss %.2f pp on the %s samples", dense_bits / a.bits,
                 points[-1].loss_pp, points[-1].measured_on)
    explorer.candidates_resumed += search.resumed
    mark_dominated(points)
    chosen = pick(points, config.pick)
    section = {
        "mode": "pareto",
        "pareto": {"beam": config.beam, "pick": config.pick or DEFAULT_PICK, "predicted_front_points": len(front),
                   "measured": len(points)},
        "front": [_point_record(p, p is chosen) for p in sorted(points, key=lambda p: p.compression_ratio)
                  if not p.dominated],
        "front_dominated": [_point_record(p, False) for p in points if p.dominated],
        "sensitivity": sensitivity_section(search, tab),
        "search_cost_passes": search.passes,
        "search_times_s": dict(search.times),
        "search_counts": dict(search.counts),
        "search_s": time.perf_counter() - t_start,
    }
    skipped = tuple((layer.site.spec.name, "no K in range makes it smaller") for layer in tab if not layer.entries)
    exploration = Exploration(tuple(chosen.decisions), skipped, ref, n, explorer.t_pass_s, "kl",
                              final_model=chosen.model, scoring_s=search.scoring_s)
    return exploration, section, points


def _point_record(p: Point, chosen: bool) -> dict:
    return {
        "accuracy_loss_pp": p.loss_pp, "compression_ratio": p.compression_ratio, "measured_on": p.measured_on,
        "samples": p.selection["samples"], "chosen": chosen, "predicted_proxy": p.proxy,
        "selection_loss_pp": p.selection["accuracy_loss_pp"],
        "verification": p.verification,
        "layers": [{"name": d.spec.name, "k": d.clustering.k, **d.shared().sharing.as_dict()} for d in p.decisions],
    }
