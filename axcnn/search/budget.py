"""Budget mode: the smallest model within an accuracy budget (``--max-loss``), or the most accurate one at a
compression ratio (``--target-cr``).

1. **Sensitivity table** (forward only). With the rest of the network dense, each layer is clustered for every K of
   the range (weighted by its input's second moments with ``--weighting input``), repaired (``--repair``: a
   per-output-channel scale and the bias refitted by least squares from the layer's input statistics), and the best
   few K of each index bit width, by the analytic output error, are run through the rest of the network on the
   calibration samples (activations cached at the layer, chained from layer to layer). The proxy is the mean KL
   divergence of the output from the dense output: fine enough to separate losses that top-1 counts on a few
   hundred samples cannot.
2. **Allocation**: assuming the proxies add up, :func:`axcnn.allocate.frontier` gives, for each total size, the
   least total proxy (dynamic programming over layers).
3. **Assembly and measurement**: a point of the front is built layer by layer in topological order; each layer's
   repair is fitted with its input taken from the partly compressed network and its target from the dense one, so
   each layer also absorbs the error of those before it. Its real top-1 loss is measured on the selection samples
   (with an exact early stop once it is over budget). A bisection over the front finds the smallest point within
   the budget.
4. **Verification**: the chosen network is scored on held-out samples the search never used. If it is over the
   budget there, the search steps to a more accurate point of the front (at most ``MAX_STEP_UPS`` times, each one
   a further look at the held-out samples, counted in the report); if nothing in range fits, it raises
   :class:`BudgetNotMet` naming the best loss reached.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from axcnn import affine, correct, estimate, score
from axcnn.allocate import Allocation, frontier
from axcnn.cluster import cluster_range, eq1_bits, index_bits
from axcnn.config import CompressConfig
from axcnn.errors import AxcnnError, BudgetNotMet
from axcnn.explore import Candidate, Exploration, Explorer, LayerDecision, calibration_indices
from axcnn.model import LayerSpec
from axcnn.search.sites import Site, dense_rows_bias, sites

log = logging.getLogger(__name__)

#: K of each index bit width whose analytic error is computed (best by inertia first) ...
PROBE_PER_WIDTH = 3
#: ... and of those, how many are measured end to end (best by analytic error first)
MEASURE_PER_WIDTH = 1
#: a proxy below this (nats) is "lossless": wider bit widths of the layer are not measured
NEGLIGIBLE_KL = 1e-5
#: at most this many extra looks at the held-out samples when the verification says "over budget"
MAX_STEP_UPS = 2


@dataclass(frozen=True)
class Entry:
    """One cell of the sensitivity table: layer ``layer`` alone clustered with ``k`` (and repaired)."""

    layer: str
    k: int
    bits: int  # Eq. 1 bits of the layer, the repair's scale floats included
    proxy: float  # mean KL (nats) of the network output from the dense one on the calibration samples
    loss_pp: float  # top-1 loss on the calibration samples (points), this layer alone
    analytic: float  # the layer's output squared error after the repair (or inertia without input statistics)
    inertia: float


@dataclass
class _Layer:
    site: Site
    table: object  # ClusterTable
    entries: list[Entry]
    extra_bits: int  # the repair's scale floats, counted in Eq. 1


class BudgetSearch:
    """State shared by the phases: the working network (with repair templates), calibration data and references."""

    def __init__(self, explorer: Explorer, layers: list[LayerSpec], config: CompressConfig,
                 verification: tuple[np.ndarray, np.ndarray] | None):
        self.ex = explorer
        self.cfg = config
        self.io = explorer.io
        self.runner = explorer.runner
        self.sites = sites(explorer.current, layers)
        self.repair = config.repair
        if self.repair != "none":
            for s in self.sites:
                if s.repairable:
                    affine.apply_channel_affine(explorer.current, s.spec.name, np.ones(s.affine.channels), s.bias,
                                                always_scale=True)
        self.dense = copy.deepcopy(explorer.current)  # the dense network, repair templates included
        self.types = score.value_types(self.dense)
        x, y = explorer.samples()
        calib = calibration_indices(len(x), config.calib, config.seed)
        self.x_cal, self.y_cal = x[calib], y[calib]
        ref = explorer.reference_in_order()[calib]
        self.kind = estimate.output_kind(ref)
        self.ref_logp = estimate.log_probs(ref, self.kind)
        self.ref_cal_correct = score.count_correct(ref, self.y_cal, config.metric)
        self.verification = verification
        self.ver_ref = None if verification is None else score.correct_mask(
            self.dense, self.runner, self.io, verification[0], verification[1], config.metric, config.batch_size)
        self.scoring_s = 0.0
        self.passes = 0.0  # scoring work in units of one pass over the selection samples

    # -- calibration activations ---------------------------------------------------------------------------------
    def _input_plan(self) -> score.Plan:
        batches = score.input_batches(self.x_cal, self.io, self.cfg.batch_size)
        return score.Plan(self.dense, onnx.TensorProto(), [{self.io.input_name: c} for c, _ in batches],
                          [n for _, n in batches], "full", (self.io.input_name,))

    def _chain_to(self, model: onnx.ModelProto, chain: score.Plan | None, boundary: list[str]) -> score.Plan:
        """Activations of ``model`` on the calibration samples at ``boundary``, from ``chain`` when it reaches
        them (consuming it), else from the input."""
        if chain is not None and list(chain.boundary) == list(boundary):
            return chain
        if chain is not None:
            got = score.advance(model, boundary, chain, self.runner, self.types)
            if got is not None:
                return got
        if list(boundary) == [self.io.input_name]:
            return self._input_plan()
        got = score.advance(model, boundary, self._input_plan(), self.runner, self.types)
        if got is None:
            raise AxcnnError(f"cannot compute the activations at {boundary} for the budget search")
        return got

    def _boundary(self, site: Site) -> list[str]:
        cut = score.cut(self.dense, site.spec.name, self.io, self.types)
        b = list(cut) if cut is not None else [self.io.input_name]
        if site.input_name is not None and site.input_name not in b:
            b.append(site.input_name)
        return b

    @staticmethod
    def _stream(plan: score.Plan, name: str) -> list[np.ndarray]:
        return [f[name][:n] for f, n in zip(plan.feeds, plan.sizes, strict=True)]

    # -- 1. sensitivity table ------------------------------------------------------------------------------------
    def table(self, progress) -> list[_Layer]:
        cfg = self.cfg
        out: list[_Layer] = []
        chain = None
        for i, site in enumerate(self.sites):
            spec = site.spec
            progress("layer", index=i, total=len(self.sites), name=spec.name, candidates=0)
            t0 = time.perf_counter()
            boundary = self._boundary(site)
            chain = self._chain_to(self.dense, chain, boundary)
            mom = None
            if site.geometry is not None:
                mom = correct.moments(site.geometry, self._stream(chain, site.input_name), precision="float32")
            weights = correct.importance(mom, site.geometry) if (mom is not None and cfg.weighting == "input") \
                else None
            table = cluster_range(spec.array, cfg.kmin, cfg.kmax, weights=weights, backend=cfg.kmeans,
                                  seed=cfg.seed, device=cfg.device)
            repaired = self.repair != "none" and site.repairable
            extra = site.affine.channels * spec.bits if (repaired and self.repair == "scale") else 0
            dense_bits = spec.weights * spec.bits
            ks = [k for k in table.ks if eq1_bits(spec.weights, k, spec.bits) + extra < dense_bits]
            if not ks:
                log.info("leaving %s dense: no K in range makes it smaller", spec.name)
                out.append(_Layer(site, table, [], extra))
                continue
            # the candidates to measure: per bit width, the best by inertia, then by analytic error
            by_width: dict[int, list[int]] = {}
            for k in ks:
                by_width.setdefault(index_bits(k), []).append(k)
            analytic: dict[int, float] = {}
            fits: dict[int, correct.ScaleBias | None] = {}
            chosen: list[int] = []
            for w in sorted(by_width):
                probe = sorted(by_width[w], key=lambda k: (table.inertia(k), k))[:PROBE_PER_WIDTH]
                for k in probe:
                    fits[k], analytic[k] = self._fit(site, mom, table.get(k), repaired)
                chosen += sorted(probe, key=lambda k: (analytic[k], k))[:MEASURE_PER_WIDTH]
            t_cluster = time.perf_counter() - t0
            # measure end to end, from few bits up, until the proxy is negligible
            t1 = time.perf_counter()
            suffix = score.suffix_model(self.dense, boundary, self.io, self.types) if boundary != [
                self.io.input_name] else None
            model = suffix if suffix is not None else self.dense
            plan = score.Plan(model, score.weight_proto(model, spec.name), chain.feeds, chain.sizes, "suffix",
                              tuple(boundary))
            names = [spec.name] + ([site.affine.scale, site.affine.bias] if repaired else [])
            run = score.tensors_as_inputs(plan, self.runner, self.io.output_name, names)
            entries: list[Entry] = []
            floor = None
            for k in sorted(chosen):
                if floor is not None:  # more bits than a lossless width: as good, at most
                    entries.append(Entry(spec.name, k, eq1_bits(spec.weights, k, spec.bits) + extra, floor.proxy,
                                         floor.loss_pp, analytic[k], table.inertia(k)))
                    continue
                arrays = self._arrays(site, table.get(k), fits[k])
                out_k = run(arrays)
                kl = estimate.mean_kl(self.ref_logp, estimate.log_probs(out_k, self.kind))
                loss = 100.0 * (self.ref_cal_correct - score.count_correct(out_k, self.y_cal, cfg.metric)) / len(
                    self.y_cal)
                e = Entry(spec.name, k, eq1_bits(spec.weights, k, spec.bits) + extra, max(kl, 0.0), loss,
                          analytic[k], table.inertia(k))
                entries.append(e)
                progress("candidate", k=k, stopped_early=False)
                if kl < NEGLIGIBLE_KL:
                    floor = e
            measured = sum(1 for e in entries)
            self.scoring_s += time.perf_counter() - t1
            self.passes += measured * len(self.y_cal) / max(1, len(self.ex.labels))
            log.info("%s: %d candidates measured (%.1fs clustering and fits)", spec.name, measured, t_cluster)
            out.append(_Layer(site, table, entries, extra))
        return out

    def _fit(self, site: Site, mom, clustering, repaired: bool):
        """(the repair fit or None, the analytic error) of one clustering of ``site``'s layer."""
        if mom is None:
            return None, float(clustering.inertia)
        wq = clustering.centroids[clustering.indices]
        if repaired:
            fn = correct.fit_scale_bias if self.repair == "scale" else correct.fit_bias
            fit = fn(mom, site.geometry, site.spec.array, dense_rows_bias(site), wq)
            return fit, float(np.sum(fit.residual_after))
        fit = correct.fit_bias(mom, site.geometry, site.spec.array, dense_rows_bias(site), wq)
        return None, float(np.sum(fit.residual_before))

    @staticmethod
    def _arrays(site: Site, clustering, fit) -> dict[str, np.ndarray]:
        arrays = {site.spec.name: clustering.centroids.astype(site.spec.dtype)[clustering.indices]}
        if fit is not None:
            arrays.update(site.affine.arrays(fit.scale, fit.bias))
        return arrays

    # -- 3. assembly ---------------------------------------------------------------------------------------------
    def assemble(self, layers: list[_Layer], choice: dict[int, int]) -> tuple[onnx.ModelProto, dict]:
        """The network with layer ``i`` clustered at K = ``choice[i]`` (layers absent stay dense), each repaired
        with its input from the partly compressed network and its target from the dense one. Returns the model
        and, per layer index, (clustering, fit or None)."""
        work = copy.deepcopy(self.dense)
        chain_c = chain_d = None
        picked: dict[int, tuple] = {}
        for i, layer in enumerate(layers):
            if i not in choice:
                continue
            site = layer.site
            clustering = layer.table.get(choice[i])
            repaired = self.repair != "none" and site.repairable
            fit = None
            if repaired or self.cfg.assign == "gptq":
                boundary = self._boundary(site)
                chain_c = self._chain_to(work, chain_c, boundary)
                chain_d = self._chain_to(self.dense, chain_d, boundary)
                mom = correct.moments(site.geometry, self._stream(chain_c, site.input_name),
                                      self._stream(chain_d, site.input_name), precision="float32")
                if self.cfg.assign == "gptq":
                    idx = correct.gptq_assign(site.spec.array, clustering.centroids, mom, site.geometry)
                    clustering = type(clustering)(k=clustering.k, centroids=clustering.centroids, indices=idx,
                                                  inertia=float(np.sum(
                                                      (clustering.centroids[idx] - site.spec.array) ** 2)))
                if repaired:
                    fn = correct.fit_scale_bias if self.repair == "scale" else correct.fit_bias
                    fit = fn(mom, site.geometry, site.spec.array, dense_rows_bias(site),
                             clustering.centroids[clustering.indices])
            for name, arr in self._arrays(site, clustering, fit).items():
                score.weight_proto(work, name).CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
            picked[i] = (clustering, fit)
        return work, picked

    def measure(self, model: onnx.ModelProto, max_wrong: int | None) -> score.Count:
        x, y = self.ex.samples()
        t0 = time.perf_counter()
        c = score.count_bounded(model, self.runner, self.io, x, y, self.cfg.metric, self.cfg.batch_size, max_wrong)
        self.scoring_s += time.perf_counter() - t0
        self.passes += c.seen / max(1, len(y))
        return c


def _options(layers: list[_Layer]) -> tuple[list[int], list[list[int]], list[list[float]]]:
    idx = [i for i, layer in enumerate(layers) if layer.entries]
    costs = [[e.bits for e in layers[i].entries] for i in idx]
    proxies = [[e.proxy for e in layers[i].entries] for i in idx]
    return idx, costs, proxies


def _choice(layers: list[_Layer], idx: list[int], a: Allocation) -> dict[int, int]:
    return {i: layers[i].entries[j].k for i, j in zip(idx, a.choice, strict=True)}


def run_budget(explorer: Explorer, layers: list[LayerSpec], config: CompressConfig,
               verification: tuple[np.ndarray, np.ndarray] | None, progress=None) -> tuple[Exploration, dict]:
    """Run budget mode; return the Exploration (decisions with their repairs) and the budget report section."""
    progress = progress or (lambda *a, **k: None)
    t_start = time.perf_counter()
    search = BudgetSearch(explorer, layers, config, verification)
    tab = search.table(progress)
    idx, costs, proxies = _options(tab)
    if not idx:
        raise AxcnnError("no layer can be made smaller with K in "
                         f"[{config.kmin}, {config.kmax}]")
    dense_bits = sum(layer.site.spec.weights * layer.site.spec.bits for layer in tab if layer.entries)
    front = frontier(costs, proxies)
    n = len(explorer.labels)
    ref = explorer.reference_correct
    looks: list[dict] = []

    def evaluate(a: Allocation, max_wrong: int | None):
        model, picked = search.assemble(tab, _choice(tab, idx, a))
        c = search.measure(model, max_wrong)
        looks.append({"bits": a.bits, "proxy": a.proxy, "compression_ratio": dense_bits / a.bits,
                      "selection_loss_pp": None if c.stopped else 100.0 * (ref - c.correct) / n,
                      "stopped_early": c.stopped, "samples_seen": c.seen})
        return model, picked, c

    if config.max_loss is not None:
        allowed = (n - ref) + math.floor(config.max_loss / 100.0 * n + 1e-9)
        hi = len(front) - 1
        model, picked, c = evaluate(front[hi], None)
        if n - c.correct > allowed:
            raise BudgetNotMet(
                f"no network with K in [{config.kmin}, {config.kmax}] is within --max-loss {config.max_loss:g} pp: "
                f"the most accurate one found loses {100.0 * (ref - c.correct) / n:.2f} pp on the {n} selection "
                "samples; raise --kmax or the budget")
        best = (hi, model, picked, c)
        lo = -1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            model, picked, c = evaluate(front[mid], allowed)
            if not c.stopped and n - c.correct <= allowed:
                hi, best = mid, (mid, model, picked, c)
            else:
                lo = mid
        chosen = best
        steps = 0
        ver = _verify(search, chosen[1], verification)
        while ver is not None and ver["accuracy_loss_pp"] > config.max_loss and steps < MAX_STEP_UPS:
            steps += 1
            nxt = min(len(front) - 1, chosen[0] + max(1, (len(front) - 1 - chosen[0]) // 3))
            if nxt == chosen[0]:
                break
            log.info("verification loss %.2f pp is over the budget; stepping to a more accurate point",
                     ver["accuracy_loss_pp"])
            model, picked, c = evaluate(front[nxt], None)
            chosen = (nxt, model, picked, c)
            ver = _verify(search, model, verification)
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
        ver = _verify(search, model, verification)

    j, model, picked, c = chosen
    decisions = []
    for i, (clustering, fit) in sorted(picked.items()):
        layer = tab[i]
        e = next(e for e in layer.entries if e.k == clustering.k)
        spec = layer.site.spec
        cands = tuple(Candidate(k=x.k, inertia=x.inertia, estimate=x.proxy,
                                compression_ratio=spec.weights * spec.bits / x.bits, scored=True,
                                correct=None, score=None, samples_seen=len(search.y_cal)) for x in layer.entries)
        chosen_c = next(x for x in cands if x.k == clustering.k)
        repair = None if fit is None else (np.asarray(fit.scale), np.asarray(fit.bias))
        decisions.append(LayerDecision(spec, layer.table.n_unique, layer.table.clamped, cands, chosen_c, clustering,
                                       "budget", 0.0, 0.0, 0.0, repair=repair, extra_bits=layer.extra_bits,
                                       predicted=e.proxy, predicted_loss_pp=e.loss_pp,
                                       affine=layer.site.affine if fit is not None else None))
    skipped = tuple((layer.site.spec.name, "no K in range makes it smaller") for layer in tab if not layer.entries)
    section = {
        "mode": "budget",
        "budget": {"max_loss_pp": config.max_loss, "target_cr": config.target_cr, "met": True,
                   "verification_checks": 0 if verification is None else steps + 1,
                   "measured_points": looks, "front_points": len(front)},
        "sensitivity": {
            "proxy": "kl", "unit": "nats", "samples": len(search.y_cal),
            "entries": [{"layer": e.layer, "k": e.k, "index_bits": index_bits(e.k), "proxy": e.proxy,
                         "loss_pp": e.loss_pp, "analytic": e.analytic, "bits": e.bits,
                         "compression_ratio": layer.site.spec.weights * layer.site.spec.bits / e.bits,
                         "granularity": "layer", "vector_dim": 1}
                        for layer in tab for e in layer.entries],
        },
        "search_cost_passes": search.passes,
        "search_s": time.perf_counter() - t_start,
    }
    exploration = Exploration(tuple(decisions), skipped, explorer.reference_correct, n, explorer.t_pass_s,
                              "kl", final_model=model, scoring_s=search.scoring_s)
    return exploration, section


def _verify(search: BudgetSearch, model: onnx.ModelProto, verification) -> dict | None:
    if verification is None:
        return None
    x, y = verification
    ref = search.ver_ref
    t0 = time.perf_counter()
    mask = score.correct_mask(model, search.runner, search.io, x, y, search.cfg.metric, search.cfg.batch_size)
    search.scoring_s += time.perf_counter() - t0
    return score.paired_loss(ref, mask)
