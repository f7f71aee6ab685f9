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
from dataclasses import dataclass, field

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

#: K of each index bit width whose analytic error is computed (best by inertia first); the best of them by the
#: analytic error is the width's candidate
PROBE_PER_WIDTH = 3
#: index bit widths measured end to end (those in range; the nearest when none is). A layer's KL is close to
#: proportional to its analytic output error across widths (ResNet-20: the ratio varied within about 2x from 1
#: to 7 bits), so the other widths are predicted from their analytic error with the measured ratio.
MEASURED_WIDTHS = (3, 5)
#: where the search of the front starts (total proxy, nats), and the factor it steps by until it brackets the
#: budget
START_PROXY = 0.05
BRACKET_STEP = 4.0
#: at most this many networks assembled and measured to find the budget's point on the front ...
MAX_EVALS = 8
#: ... and none once the bracket is narrower than this fraction of the size (neighbours differ by noise there)
RESOLVE = 0.015
#: calibration samples whose activations the sequential repair uses (the first of the calibration draw)
REPAIR_SAMPLES = 256
#: at most this many extra looks at the held-out samples when the verification says "over budget"
MAX_STEP_UPS = 2


@dataclass(frozen=True)
class Entry:
    """One cell of the sensitivity table: layer ``layer`` alone clustered with ``k`` (and repaired)."""

    layer: str
    k: int
    bits: int  # Eq. 1 bits of the layer, the repair's scale floats included
    proxy: float  # mean KL (nats) of the network output from the dense one on the calibration samples
    loss_pp: float | None  # top-1 loss on the calibration samples (points), this layer alone, when measured
    analytic: float  # the layer's output squared error after the repair (or inertia without input statistics)
    inertia: float
    measured: bool = True  # False: proxy predicted from the analytic error (and loss_pp unknown)


@dataclass
class _Layer:
    site: Site
    table: object  # ClusterTable
    entries: list[Entry]
    extra_bits: int  # the repair's scale floats, counted in Eq. 1
    fits: dict = field(default_factory=dict)  # K -> the repair fitted with the dense input (table phase)
    moments: object = None  # the dense input's statistics (table phase)


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
        self.x_rep = self.x_cal[:REPAIR_SAMPLES]  # the sequential repair's samples (a prefix of a random draw)
        self.scoring_s = 0.0
        self.passes = 0.0  # scoring work in units of one pass over the selection samples
        self.times = {"table": 0.0, "assemble": 0.0, "measure": 0.0, "verify": 0.0}
        self.counts = {"measured_entries": 0, "assemblies": 0}

    # -- calibration activations ---------------------------------------------------------------------------------
    def _input_plan(self, x: np.ndarray | None = None) -> score.Plan:
        batches = score.input_batches(self.x_cal if x is None else x, self.io, self.cfg.batch_size)
        return score.Plan(self.dense, onnx.TensorProto(), [{self.io.input_name: c} for c, _ in batches],
                          [n for _, n in batches], "full", (self.io.input_name,))

    def _chain_to(self, model: onnx.ModelProto, chain: score.Plan | None, boundary: list[str],
                  x: np.ndarray | None = None) -> score.Plan:
        """Activations of ``model`` on the calibration samples at ``boundary``, from ``chain`` when it reaches
        them (consuming it), else from the input."""
        if chain is not None and list(chain.boundary) == list(boundary):
            return chain
        if chain is not None:
            got = score.advance(model, boundary, chain, self.runner, self.types)
            if got is not None:
                return got
        if list(boundary) == [self.io.input_name]:
            return self._input_plan(x)
        got = score.advance(model, boundary, self._input_plan(x), self.runner, self.types)
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
    def _stream(plan: score.Plan, name: str, limit: int | None = None) -> list[np.ndarray]:
        """The tensor ``name`` batch by batch (padding dropped), over at most ``limit`` samples."""
        out, left = [], limit if limit is not None else sum(plan.sizes)
        for f, n in zip(plan.feeds, plan.sizes, strict=True):
            if left <= 0:
                break
            out.append(f[name][:min(n, left)])
            left -= n
        return out

    # -- 1. sensitivity table ------------------------------------------------------------------------------------
    def table(self, progress) -> list[_Layer]:
        t_table = time.perf_counter()
        try:
            return self._table(progress)
        finally:
            self.times["table"] += time.perf_counter() - t_table

    def _table(self, progress) -> list[_Layer]:
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
                mom = correct.moments(site.geometry, self._stream(chain, site.input_name, REPAIR_SAMPLES),
                                      precision="float32")
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
                out.append(_Layer(site, table, [], extra, {}, mom))
                continue
            # per index bit width, the best K: a few by inertia, then the best of those by the analytic error
            by_width: dict[int, list[int]] = {}
            for k in ks:
                by_width.setdefault(index_bits(k), []).append(k)
            analytic: dict[int, float] = {}
            fits: dict[int, correct.ScaleBias | None] = {}
            best: dict[int, int] = {}
            for w in sorted(by_width):
                probe = sorted(by_width[w], key=lambda k: (table.inertia(k), k))[:PROBE_PER_WIDTH]
                for k in probe:
                    fits[k], analytic[k] = self._fit(site, mom, table.get(k), repaired)
                best[w] = min(probe, key=lambda k: (analytic[k], k))
            t_cluster = time.perf_counter() - t0
            # measure a few widths end to end; predict the others from their analytic error
            t1 = time.perf_counter()
            suffix = score.suffix_model(self.dense, boundary, self.io, self.types) if boundary != [
                self.io.input_name] else None
            model = suffix if suffix is not None else self.dense
            plan = score.Plan(model, score.weight_proto(model, spec.name), chain.feeds, chain.sizes, "suffix",
                              tuple(boundary))
            names = [spec.name] + ([site.affine.scale, site.affine.bias] if repaired else [])
            run = score.tensors_as_inputs(plan, self.runner, self.io.output_name, names)
            measured: dict[int, tuple[float, float]] = {}
            for w in _widths_to_measure(sorted(best), mom is not None):
                k = best[w]
                out_k = run(self._arrays(site, table.get(k), fits[k]))
                kl = max(estimate.mean_kl(self.ref_logp, estimate.log_probs(out_k, self.kind)), 0.0)
                loss = 100.0 * (self.ref_cal_correct - score.count_correct(out_k, self.y_cal, cfg.metric)) / len(
                    self.y_cal)
                measured[w] = (kl, loss)
                progress("candidate", k=k, stopped_early=False)
            ratio = _kl_per_error(measured, best, analytic)
            entries: list[Entry] = []
            for w in sorted(best):
                k = best[w]
                kl, loss = measured.get(w, (ratio * analytic[k], None))
                entries.append(Entry(spec.name, k, eq1_bits(spec.weights, k, spec.bits) + extra, kl, loss,
                                     analytic[k], table.inertia(k), w in measured))
            self.counts["measured_entries"] += len(measured)
            self.scoring_s += time.perf_counter() - t1
            self.passes += len(measured) * len(self.y_cal) / max(1, len(self.ex.labels))
            log.info("%s: %d of %d bit widths measured (%.1fs clustering and fits)", spec.name, len(measured),
                     len(best), t_cluster)
            out.append(_Layer(site, table, entries, extra, {k: fits[k] for k in best.values()}, mom))
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
    def assemble(self, layers: list[_Layer], choice: dict[int, int], sequential: bool = True
                 ) -> tuple[onnx.ModelProto, dict]:
        """The network with layer ``i`` clustered at K = ``choice[i]`` (layers absent stay dense). ``sequential``:
        each layer is repaired with its input taken from the partly compressed network and its target from the
        dense one, so it also absorbs the error of the layers before it (fitted from the layer's actual outputs on
        the repair samples); otherwise each layer gets the repair fitted on its own in the table phase. With
        ``--assign gptq`` indices are chosen with error feedback on the same inputs. Returns the model and, per
        layer index, (clustering, fit or None)."""
        t0 = time.perf_counter()
        work = copy.deepcopy(self.dense)
        chain_c = chain_d = None
        picked: dict[int, tuple] = {}
        for i, layer in enumerate(layers):
            if i not in choice:
                continue
            site = layer.site
            clustering = layer.table.get(choice[i])
            repaired = self.repair != "none" and site.repairable
            fit = layer.fits.get(choice[i]) if repaired else None
            gptq = self.cfg.assign == "gptq" and site.geometry is not None
            if sequential and (repaired or gptq):
                boundary = self._boundary(site)
                chain_c = self._chain_to(work, chain_c, boundary, self.x_rep)
                chain_d = self._chain_to(self.dense, chain_d, boundary, self.x_rep)
            if gptq:
                mom = correct.moments(site.geometry, self._stream(chain_c, site.input_name),
                                      self._stream(chain_d, site.input_name), precision="float32") \
                    if sequential else layer.moments
                idx = correct.gptq_assign(site.spec.array, clustering.centroids, mom, site.geometry)
                clustering = type(clustering)(k=clustering.k, centroids=clustering.centroids, indices=idx,
                                              inertia=float(np.sum((clustering.centroids[idx] - site.spec.array) ** 2)))
                if repaired and not sequential:
                    fn = correct.fit_scale_bias if self.repair == "scale" else correct.fit_bias
                    fit = fn(mom, site.geometry, site.spec.array, dense_rows_bias(site),
                             clustering.centroids[clustering.indices])
            if repaired and sequential:
                fit = self._fit_outputs(work, site, clustering, chain_c, chain_d)
            for name, arr in self._arrays(site, clustering, fit).items():
                score.weight_proto(work, name).CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
            picked[i] = (clustering, fit)
        self.times["assemble"] += time.perf_counter() - t0
        self.counts["assemblies"] += 1
        return work, picked

    def _fit_outputs(self, work: onnx.ModelProto, site: Site, clustering, chain_c: score.Plan,
                     chain_d: score.Plan) -> correct.ScaleBias:
        """The repair of ``site``'s layer from its outputs: the clustered layer on the compressed network's input
        against the dense layer on the dense network's input."""
        node = next(n for n in work.graph.node if n.op_type == site.affine.op_type and site.spec.name in n.input[1:2])
        linear = node.output[0]  # the layer's own output, before the repair's Mul (and MatMul's bias Add)
        name = site.spec.name
        dense_w = numpy_helper.to_array(score.weight_proto(work, name))
        score.weight_proto(work, name).CopyFrom(numpy_helper.from_array(
            np.ascontiguousarray(clustering.centroids.astype(site.spec.dtype)[clustering.indices]), name))
        try:
            zb = score.tensors_at(work, [linear], chain_c, self.runner, self.types)[linear]
        finally:
            score.weight_proto(work, name).CopyFrom(numpy_helper.from_array(dense_w, name))
        y = score.tensors_at(self.dense, [site.affine.output], chain_d, self.runner, self.types)[site.affine.output]
        axis = 1 if site.affine.op_type in ("Conv", "ConvTranspose") else -1
        stored = np.zeros(site.affine.channels)
        if site.affine.op_type != "MatMul":  # the node adds its stored bias (t / s); the template's is the dense b
            stored = numpy_helper.to_array(score.weight_proto(work, site.affine.bias)).astype(np.float64)
        shape = [1] * zb.ndim
        shape[axis] = -1
        z = zb.astype(np.float64) - stored.reshape(shape)
        return correct.fit_outputs(z, y, axis, dense_rows_bias(site), scale=self.repair == "scale")

    def measure(self, model: onnx.ModelProto, max_wrong: int | None) -> score.Count:
        x, y = self.ex.samples()
        t0 = time.perf_counter()
        c = score.count_bounded(model, self.runner, self.io, x, y, self.cfg.metric, self.cfg.batch_size, max_wrong)
        self.scoring_s += time.perf_counter() - t0
        self.times["measure"] += time.perf_counter() - t0
        self.passes += c.seen / max(1, len(y))
        return c


def _widths_to_measure(widths: list[int], predictable: bool) -> list[int]:
    """The bit widths measured end to end: all of them without input statistics (nothing to predict from)."""
    if not predictable or len(widths) <= len(MEASURED_WIDTHS):
        return widths
    picked = []
    for target in MEASURED_WIDTHS:
        w = min((w for w in widths if w not in picked), key=lambda w: (abs(w - target), w))
        picked.append(w)
    return sorted(picked)


def _kl_per_error(measured: dict[int, tuple[float, float]], best: dict[int, int], analytic: dict[int, float]
                  ) -> float:
    """The ratio KL / analytic error of a layer, as the geometric mean over its measured widths."""
    logs = [np.log(kl / analytic[best[w]]) for w, (kl, _) in measured.items() if kl > 0 and analytic[best[w]] > 0]
    return float(np.exp(np.mean(logs))) if logs else 0.0


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
        best = _search_front(front, evaluate, allowed, n, ref, config)
        chosen = best
        steps = 0
        ver = _verify(search, chosen[1], verification)
        while ver is not None and ver["accuracy_loss_pp"] > config.max_loss and steps < MAX_STEP_UPS:
            steps += 1
            # aim the selection loss lower by the excess seen on the verification samples (the loss grows about in
            # proportion to the total proxy here), at least 10% and at most 70% less proxy
            sel = 100.0 * (ref - chosen[3].correct) / n
            want = sel - (ver["accuracy_loss_pp"] - config.max_loss)
            ratio = min(0.9, max(0.3, want / sel)) if sel > 0 else 0.5
            logp = np.log(np.maximum([a.proxy for a in front], 1e-12))
            nxt = int(np.argmin(np.abs(logp - (logp[chosen[0]] + np.log(ratio)))))
            nxt = min(len(front) - 1, max(nxt, chosen[0] + 1))
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
        "search_times_s": dict(search.times),
        "search_counts": dict(search.counts),
        "search_s": time.perf_counter() - t_start,
    }
    exploration = Exploration(tuple(decisions), skipped, explorer.reference_correct, n, explorer.t_pass_s,
                              "kl", final_model=model, scoring_s=search.scoring_s)
    return exploration, section


def _search_front(front: list[Allocation], evaluate, allowed: int, n: int, ref: int, config: CompressConfig):
    """The smallest point of the front whose selection loss is within ``allowed`` errors, found by a bracketed
    search in log proxy (losses grow smoothly with it): start near ``START_PROXY``, step by ``BRACKET_STEP``
    until the budget is bracketed, then interpolate (every other step bisects, so it cannot stall), at most
    ``MAX_EVALS`` assemblies. Returns (index, model, picked, count) of the smallest feasible point measured."""
    logp = np.log(np.maximum([a.proxy for a in front], 1e-12))  # decreasing with the index
    last = len(front) - 1
    stop = allowed + max(2 * (allowed - (n - ref)), n // 100)  # losses known exactly up to about 3x the budget
    seen: dict[int, tuple] = {}

    def wrong(j: int) -> int:
        if j not in seen:
            model, picked, c = evaluate(front[j], stop)
            seen[j] = (model, picked, c, stop + 1 if c.stopped else n - c.correct)
        return seen[j][3]

    def index_of(lp: float) -> int:
        return int(np.argmin(np.abs(logp - lp)))

    step = np.log(BRACKET_STEP)
    lo, hi = -1, None
    j = index_of(np.log(START_PROXY))
    while len(seen) < MAX_EVALS:
        if wrong(j) <= allowed:
            hi = j
            if j == lo + 1:
                break
            j = max(lo + 1, min(j - 1, index_of(logp[j] + step)))
        else:
            lo = j
            if hi is not None or j == last:
                break
            j = min(last, max(j + 1, index_of(logp[j] - step)))
    if hi is None and lo != last and wrong(last) <= allowed:
        hi = last
    if hi is None:
        c = seen[last][2]
        lost = f"more than {100.0 * (stop - (n - ref)) / n:.2f}" if c.stopped else \
            f"{100.0 * (ref - c.correct) / n:.2f}"
        raise BudgetNotMet(
            f"no network with K in [{config.kmin}, {config.kmax}] is within --max-loss {config.max_loss:g} pp: "
            f"the most accurate one found loses {lost} pp on the {n} selection samples; raise --kmax or the budget")
    bisect = False
    while hi - lo > 1 and len(seen) < MAX_EVALS and (lo < 0 or front[hi].bits - front[lo].bits > RESOLVE *
                                                      front[hi].bits):
        if lo < 0 or bisect:
            j = (lo + hi) // 2 if lo >= 0 else hi // 2
        else:  # interpolate the budget between the two bracketing error counts, in log proxy
            w_lo, w_hi = wrong(lo), wrong(hi)
            frac = (w_lo - allowed) / max(w_lo - w_hi, 1e-9)
            j = min(max(index_of(logp[lo] + frac * (logp[hi] - logp[lo])), lo + 1), hi - 1)
        bisect = not bisect
        if wrong(j) <= allowed:
            hi = j
        else:
            lo = j
    model, picked, c, _ = seen[hi]
    return hi, model, picked, c


def _verify(search: BudgetSearch, model: onnx.ModelProto, verification) -> dict | None:
    if verification is None:
        return None
    x, y = verification
    ref = search.ver_ref
    t0 = time.perf_counter()
    mask = score.correct_mask(model, search.runner, search.io, x, y, search.cfg.metric, search.cfg.batch_size)
    search.scoring_s += time.perf_counter() - t0
    search.times["verify"] += time.perf_counter() - t0
    return score.paired_loss(ref, mask)
