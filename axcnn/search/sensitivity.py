"""The sensitivity table and network assembly shared by the budget and Pareto searches (issue 8, 11).

1. **Sensitivity table** (forward only). With the rest of the network dense, each layer is clustered for every K of
   the range (weighted by its input's second moments with ``--weighting input``) and repaired (``--repair``: a
   per-output-channel scale and the bias refitted by least squares from the layer's input statistics). Per index
   bit width the best K by the analytic output error is the width's candidate. Two widths are run through the rest
   of the network on the calibration samples (activations cached at the layer, chained from layer to layer): the
   proxy is the mean KL divergence of the output from the dense output, fine enough to separate losses that top-1
   counts on a few hundred samples cannot. A layer's KL is close to proportional to its analytic error across
   widths, so the other widths are predicted from theirs.
2. **Assembly**: a choice of K per layer is built layer by layer in topological order; each layer's repair is
   fitted with its input taken from the partly compressed network and its target from the dense one, so each layer
   also absorbs the error of those before it. Its real loss is then measured (:meth:`Sensitivity.measure`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from axcnn import affine, correct, estimate, plans, score
from axcnn.allocate import Allocation, frontier
from axcnn.cluster import index_bits
from axcnn.config import CompressConfig
from axcnn.errors import AxcnnError
from axcnn.explore import Candidate, Explorer, LayerDecision, calibration_indices
from axcnn.model import LayerSpec, weight_proto
from axcnn.search.measure import digest, entry_runner
from axcnn.search.sites import Site, dense_rows_bias, sites
from axcnn.sharing import LAYER, Sharing, SharingTable, cluster_layer

log = logging.getLogger(__name__)

#: K of each index bit width whose analytic error is computed (best by inertia first); the best of them by the
#: analytic error is the width's candidate
PROBE_PER_WIDTH = 3
#: index bit widths measured end to end (those in range; the nearest when none is). A layer's KL is close to
#: proportional to its analytic output error across widths (ResNet-20: the ratio varied within about 2x from 1
#: to 7 bits), so the other widths are predicted from their analytic error with the measured ratio.
MEASURED_WIDTHS = (3, 5)
#: the inputs GPTQ's Hessian comes from: "dense" (the table phase's statistics of the dense network's input: no
#: extra cost) or "compressed" (the partly compressed network's, with the dense output as target; 4x the time)
GPTQ_INPUT = "dense"
#: K of 2-D vectors a search tries (each a Lloyd fit of its own): 2 to 4 index bits per weight
VECTOR_KS = (16, 32, 64, 128, 256)
#: calibration samples whose activations the sequential repair uses (the first of the calibration draw)
REPAIR_SAMPLES = 256


@dataclass(frozen=True)
class Entry:
    """One cell of the sensitivity table: layer ``layer`` alone clustered with ``k`` (and repaired)."""

    layer: str
    k: int
    bits: int  # Eq. 1 bits of the layer (every codebook), the repair's scale floats included
    proxy: float  # mean KL (nats) of the network output from the dense one on the calibration samples
    loss_pp: float | None  # top-1 loss on the calibration samples (points), this layer alone, when measured
    analytic: float  # the layer's output squared error after the repair (or inertia without input statistics)
    inertia: float
    measured: bool = True  # False: proxy predicted from the analytic error (and loss_pp unknown)
    sharing: Sharing = LAYER  # how the layer shares codebooks (after any fallback)

    @property
    def key(self) -> tuple[Sharing, int]:
        return self.sharing, self.k


@dataclass
class Layer:
    site: Site
    tables: dict  # Sharing -> SharingTable
    entries: list[Entry]
    extra_bits: int  # the repair's scale floats, counted in Eq. 1
    fits: dict = field(default_factory=dict)  # (Sharing, K) -> the repair fitted with the dense input (table phase)
    moments: object = None  # the dense input's statistics (table phase)


class Sensitivity:
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
        self.types = plans.value_types(self.dense)
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
        self.sharings = search_sharings(config)
        self.journal = explorer.journal  # measurements are recorded there, and taken from it on resume
        self.executor = explorer.executor  # where the table's entries run
        self.resumed = 0
        self.x_rep = self.x_cal[:REPAIR_SAMPLES]  # the sequential repair's samples (a prefix of a random draw)
        self.scoring_s = 0.0
        self.passes = 0.0  # scoring work in units of one pass over the selection samples
        self.times = {"table": 0.0, "assemble": 0.0, "measure": 0.0, "verify": 0.0}
        self.counts = {"measured_entries": 0, "assemblies": 0}

    # -- calibration activations ---------------------------------------------------------------------------------
    def _input_plan(self, x: np.ndarray | None = None) -> plans.Plan:
        batches = score.input_batches(self.x_cal if x is None else x, self.io, self.cfg.batch_size)
        return plans.Plan(self.dense, onnx.TensorProto(), [{self.io.input_name: c} for c, _ in batches],
                          [n for _, n in batches], "full", (self.io.input_name,))

    def _chain_to(self, model: onnx.ModelProto, chain: plans.Plan | None, boundary: list[str],
                  x: np.ndarray | None = None) -> plans.Plan:
        """Activations of ``model`` on the calibration samples at ``boundary``, from ``chain`` when it reaches
        them (consuming it), else from the input."""
        if chain is not None and list(chain.boundary) == list(boundary):
            return chain
        if chain is not None:
            got = plans.advance(model, boundary, chain, self.runner, self.types)
            if got is not None:
                return got
        if list(boundary) == [self.io.input_name]:
            return self._input_plan(x)
        got = plans.advance(model, boundary, self._input_plan(x), self.runner, self.types)
        if got is None:
            raise AxcnnError(f"cannot compute the activations at {boundary} for the budget search")
        return got

    def _boundary(self, site: Site) -> list[str]:
        cut = plans.cut(self.dense, site.spec.name, self.io, self.types)
        b = list(cut) if cut is not None else [self.io.input_name]
        if site.input_name is not None and site.input_name not in b:
            b.append(site.input_name)
        return b

    @staticmethod
    def _stream(plan: plans.Plan, name: str, limit: int | None = None) -> list[np.ndarray]:
        """The tensor ``name`` batch by batch (padding dropped), over at most ``limit`` samples."""
        out, left = [], limit if limit is not None else sum(plan.sizes)
        for f, n in zip(plan.feeds, plan.sizes, strict=True):
            if left <= 0:
                break
            out.append(f[name][:min(n, left)])
            left -= n
        return out

    # -- 1. sensitivity table ------------------------------------------------------------------------------------
    def table(self, progress) -> list[Layer]:
        t_table = time.perf_counter()
        try:
            return self._table(progress)
        finally:
            self.times["table"] += time.perf_counter() - t_table

    def _table(self, progress) -> list[Layer]:
        cfg = self.cfg
        out: list[Layer] = []
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
            repaired = self.repair != "none" and site.repairable
            extra = site.affine.channels * spec.bits if (repaired and self.repair == "scale") else 0
            dense_bits = spec.weights * spec.bits
            tables: dict[Sharing, SharingTable] = {}
            for sharing in self.sharings:
                if sharing.vector_dim > 1 and not any(cfg.kmin <= k <= cfg.kmax for k in VECTOR_KS):
                    continue
                t = cluster_layer(spec, sharing, cfg.kmin, cfg.kmax, weights=weights, backend=cfg.kmeans,
                                  seed=cfg.seed, device=cfg.device, ks=VECTOR_KS)
                if t.sharing not in tables:  # a fallback to one codebook per layer adds nothing new
                    tables[t.sharing] = t
            # per sharing and index bit width, the best K: a few by inertia, then the best of them by the analytic
            # error
            by_width: dict[tuple[Sharing, int], list[int]] = {}
            for sharing, t in tables.items():
                for k in t.ks:
                    if t.eq1_bits(k) + extra < dense_bits:
                        by_width.setdefault((sharing, index_bits(k)), []).append(k)
            if not by_width:
                log.info("leaving %s dense: no K in range makes it smaller", spec.name)
                out.append(Layer(site, tables, [], extra, {}, mom))
                continue
            analytic: dict[tuple[Sharing, int], float] = {}
            fits: dict[tuple[Sharing, int], correct.ScaleBias | None] = {}
            best: dict[tuple[Sharing, int], tuple[Sharing, int]] = {}
            for (sharing, w), ks in sorted(by_width.items(), key=lambda kv: (kv[0][0].describe(), kv[0][1])):
                t = tables[sharing]
                probe = sorted(ks, key=lambda k: (t.inertia(k), k))[:PROBE_PER_WIDTH]
                for k in probe:
                    fits[sharing, k], analytic[sharing, k] = self._fit(site, mom, t.get(k), repaired)
                best[sharing, w] = (sharing, min(probe, key=lambda k: (analytic[sharing, k], k)))
            t_cluster = time.perf_counter() - t0
            # measure a few widths of the first sharing end to end; predict the rest from their analytic error
            t1 = time.perf_counter()
            suffix = plans.suffix_model(self.dense, boundary, self.io, self.types) if boundary != [
                self.io.input_name] else None
            model = suffix if suffix is not None else self.dense
            plan = plans.Plan(model, weight_proto(model, spec.name), chain.feeds, chain.sizes, "suffix",
                              tuple(boundary))
            names = [spec.name] + ([site.affine.scale, site.affine.bias] if repaired else [])
            first = next(iter(tables))
            widths = sorted(w for (sh, w) in best if sh == first)
            predictable = mom is not None
            to_measure = [best[first, w] for w in _widths_to_measure(widths, predictable)]
            if not predictable:  # nothing to predict from: every candidate is measured
                to_measure = sorted(best.values(), key=lambda sk: (sk[0].describe(), sk[1]))
            measured: dict[tuple[Sharing, int], tuple[float, float]] = {}
            todo = []
            for sharing, k in to_measure:
                got = self.recorded("sensitivity", (spec.name, sharing.describe(), k))
                if got is not None:
                    measured[sharing, k] = tuple(got)
                else:
                    todo.append((sharing, k))
            run = entry_runner(plan, names, self.io.output_name, self.cfg.device, self.ref_logp, self.kind,
                                self.y_cal, self.ref_cal_correct, cfg.metric)
            items = [self._arrays(site, tables[sh].get(k), fits[sh, k]) for sh, k in todo]
            for j, result in self.executor.map(run, items):
                sharing, k = todo[j]
                measured[sharing, k] = result
                if self.journal is not None:
                    self.journal.put("sensitivity", (spec.name, sharing.describe(), k), list(result))
                progress("candidate", k=k, stopped_early=False)
            ratio = _kl_per_error(measured, analytic)
            entries: list[Entry] = []
            for sharing, k in sorted(best.values(), key=lambda sk: (sk[0].describe(), sk[1])):
                kl, loss = measured.get((sharing, k), (ratio * analytic[sharing, k], None))
                t = tables[sharing]
                entries.append(Entry(spec.name, k, t.eq1_bits(k) + extra, kl, loss, analytic[sharing, k],
                                     t.inertia(k), (sharing, k) in measured, sharing))
            self.counts["measured_entries"] += len(todo)
            self.scoring_s += time.perf_counter() - t1
            self.passes += len(todo) * len(self.y_cal) / max(1, len(self.ex.labels))
            log.info("%s: %d of %d candidates measured (%.1fs clustering and fits)", spec.name, len(measured),
                     len(entries), t_cluster)
            out.append(Layer(site, tables, entries, extra, {e.key: fits[e.key] for e in entries}, mom))
        return out

    def _fit(self, site: Site, mom, clustering, repaired: bool):
        """(the repair fit or None, the analytic error) of one clustering of ``site``'s layer."""
        if mom is None:
            return None, float(clustering.inertia)
        wq = clustering.dense(np.float64)
        if repaired:
            fn = correct.fit_scale_bias if self.repair == "scale" else correct.fit_bias
            fit = fn(mom, site.geometry, site.spec.array, dense_rows_bias(site), wq)
            return fit, float(np.sum(fit.residual_after))
        fit = correct.fit_bias(mom, site.geometry, site.spec.array, dense_rows_bias(site), wq)
        return None, float(np.sum(fit.residual_before))

    @staticmethod
    def _arrays(site: Site, clustering, fit) -> dict[str, np.ndarray]:
        arrays = {site.spec.name: clustering.dense(site.spec.dtype)}
        if fit is not None:
            arrays.update(site.affine.arrays(fit.scale, fit.bias))
        return arrays

    # -- 3. assembly ---------------------------------------------------------------------------------------------
    def assemble(self, layers: list[Layer], choice: dict[int, tuple[Sharing, int]], sequential: bool = True
                 ) -> tuple[onnx.ModelProto, dict]:
        """The network with layer ``i`` shared as ``choice[i]`` = (sharing, K) (layers absent stay dense).

        ``sequential``: each layer is repaired with its input taken from the partly compressed network and its
        target from the dense one, so it also absorbs the error of the layers before it (fitted from the layer's
        actual outputs on the repair samples); otherwise each layer gets the repair fitted on its own in the table
        phase. With ``--assign gptq`` indices are chosen with error feedback on the same inputs. Returns the model
        and, per layer index, (clustering, fit or None)."""
        t0 = time.perf_counter()
        work = copy.deepcopy(self.dense)
        chain_c = chain_d = None
        picked: dict[int, tuple] = {}
        for i, layer in enumerate(layers):
            if i not in choice:
                continue
            site = layer.site
            sharing, k = choice[i]
            clustering = layer.tables[sharing].get(k)
            repaired = self.repair != "none" and site.repairable
            fit = layer.fits.get((sharing, k)) if repaired else None
            gptq = self.cfg.assign == "gptq" and site.geometry is not None and sharing.vector_dim == 1
            if sequential and (repaired or gptq):
                boundary = self._boundary(site)
                chain_c = self._chain_to(work, chain_c, boundary, self.x_rep)
                chain_d = self._chain_to(self.dense, chain_d, boundary, self.x_rep)
            if gptq:
                mom = correct.moments(site.geometry, self._stream(chain_c, site.input_name),
                                      self._stream(chain_d, site.input_name), precision="float32") \
                    if sequential and GPTQ_INPUT == "compressed" else layer.moments
                ids = None if clustering.centroids.ndim == 1 else \
                    clustering.layout.group_spec().codebook_ids(site.spec.shape)
                idx = correct.gptq_assign(site.spec.array, clustering.centroids, mom, site.geometry, codebook_ids=ids)
                clustering = dataclasses.replace(clustering, indices=idx)
                clustering = dataclasses.replace(clustering, inertia=float(np.sum(
                    (clustering.dense(np.float64) - site.spec.array) ** 2)))
                if repaired and not sequential:
                    fn = correct.fit_scale_bias if self.repair == "scale" else correct.fit_bias
                    fit = fn(mom, site.geometry, site.spec.array, dense_rows_bias(site), clustering.dense(np.float64))
            if repaired and sequential:
                fit = self._fit_outputs(work, site, clustering, chain_c, chain_d)
            for name, arr in self._arrays(site, clustering, fit).items():
                weight_proto(work, name).CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
            picked[i] = (clustering, fit)
        self.times["assemble"] += time.perf_counter() - t0
        self.counts["assemblies"] += 1
        return work, picked

    def _fit_outputs(self, work: onnx.ModelProto, site: Site, clustering, chain_c: plans.Plan,
                     chain_d: plans.Plan) -> correct.ScaleBias:
        """The repair of ``site``'s layer from its outputs: the clustered layer on the compressed network's input
        against the dense layer on the dense network's input."""
        node = next(n for n in work.graph.node if n.op_type == site.affine.op_type and site.spec.name in n.input[1:2])
        linear = node.output[0]  # the layer's own output, before the repair's Mul (and MatMul's bias Add)
        name = site.spec.name
        dense_w = numpy_helper.to_array(weight_proto(work, name))
        weight_proto(work, name).CopyFrom(numpy_helper.from_array(
            np.ascontiguousarray(clustering.dense(site.spec.dtype)), name))
        try:
            zb = plans.tensors_at(work, [linear], chain_c, self.runner, self.types)[linear]
        finally:
            weight_proto(work, name).CopyFrom(numpy_helper.from_array(dense_w, name))
        y = plans.tensors_at(self.dense, [site.affine.output], chain_d, self.runner, self.types)[site.affine.output]
        axis = 1 if site.affine.op_type in ("Conv", "ConvTranspose") else -1
        stored = np.zeros(site.affine.channels)
        if site.affine.op_type != "MatMul":  # the node adds its stored bias (t / s); the template's is the dense b
            stored = numpy_helper.to_array(weight_proto(work, site.affine.bias)).astype(np.float64)
        shape = [1] * zb.ndim
        shape[axis] = -1
        z = zb.astype(np.float64) - stored.reshape(shape)
        return correct.fit_outputs(z, y, axis, dense_rows_bias(site), scale=self.repair == "scale")

    def recorded(self, kind: str, key: tuple):
        """What the journal of a stopped run recorded under (kind, key), counted as resumed; None if nothing."""
        got = None if self.journal is None else self.journal.get(kind, key)
        if got is not None:
            self.resumed += 1
        return got

    def measure(self, model: onnx.ModelProto, max_wrong: int | None) -> score.Count:
        key = (digest(model), max_wrong)
        got = self.recorded("network", key)
        if got is not None:
            return score.Count(*got)
        x, y = self.ex.samples()
        t0 = time.perf_counter()
        c = score.count_bounded(model, self.runner, self.io, x, y, self.cfg.metric, self.cfg.batch_size, max_wrong)
        if self.journal is not None:
            self.journal.put("network", key, [c.correct, c.seen, c.stopped])
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


def _kl_per_error(measured: dict, analytic: dict) -> float:
    """The ratio KL / analytic error of a layer, as the geometric mean over its measured candidates."""
    logs = [np.log(kl / analytic[key]) for key, (kl, _) in measured.items() if kl > 0 and analytic[key] > 0]
    return float(np.exp(np.mean(logs))) if logs else 0.0


def search_sharings(config: CompressConfig) -> list[Sharing]:
    """The ways of sharing a budget or Pareto search offers each layer (the first is the measured reference)."""
    if config.granularity == "auto":
        return [LAYER, Sharing("channel", config.group_size), Sharing("layer", vector_dim=2)]
    return [Sharing(config.granularity, config.group_size, config.vector_dim)]


@dataclass
class Front:
    """The sensitivity table of a network and the front of allocations it predicts."""

    search: Sensitivity
    table: list[Layer]
    idx: list[int]  # the layers with options, in table order
    allocations: list[Allocation]  # smallest total bits first
    dense_bits: int  # Eq. 1 bits of those layers before sharing

    def choice(self, a: Allocation) -> dict[int, tuple[Sharing, int]]:
        return choice(self.table, self.idx, a)


def predicted_front(explorer: Explorer, layers: list[LayerSpec], config: CompressConfig,
                    verification: tuple[np.ndarray, np.ndarray] | None, progress) -> Front:
    """Measure the sensitivity table and allocate bits over it (what the budget and Pareto searches share)."""
    search = Sensitivity(explorer, layers, config, verification)
    tab = search.table(progress)
    idx, costs, proxies = options(tab)
    if not idx:
        raise AxcnnError(f"no layer can be made smaller with K in [{config.kmin}, {config.kmax}]")
    dense_bits = sum(layer.site.spec.weights * layer.site.spec.bits for layer in tab if layer.entries)
    return Front(search, tab, idx, frontier(costs, proxies), dense_bits)


def options(layers: list[Layer]) -> tuple[list[int], list[list[int]], list[list[float]]]:
    idx = [i for i, layer in enumerate(layers) if layer.entries]
    costs = [[e.bits for e in layers[i].entries] for i in idx]
    proxies = [[e.proxy for e in layers[i].entries] for i in idx]
    return idx, costs, proxies


def choice(layers: list[Layer], idx: list[int], a: Allocation) -> dict[int, tuple[Sharing, int]]:
    return {i: layers[i].entries[j].key for i, j in zip(idx, a.choice, strict=True)}


def build_decisions(search: Sensitivity, tab: list[Layer], picked: dict) -> list[LayerDecision]:
    """The LayerDecisions of an assembled network (``picked`` from :meth:`Sensitivity.assemble`)."""
    decisions = []
    for i, (clustering, fit) in sorted(picked.items()):
        layer = tab[i]
        e = next(e for e in layer.entries if e.key == (clustering.sharing, clustering.k))
        table = layer.tables[e.sharing]
        spec = layer.site.spec
        cands = tuple(Candidate(k=x.k, inertia=x.inertia, estimate=x.proxy,
                                compression_ratio=spec.weights * spec.bits / x.bits, scored=True,
                                correct=None, score=None, samples_seen=len(search.y_cal)) for x in layer.entries)
        chosen_c = cands[layer.entries.index(e)]
        repair = None if fit is None else (np.asarray(fit.scale), np.asarray(fit.bias))
        decisions.append(LayerDecision(spec, table.n_unique, table.clamped, cands, chosen_c, clustering,
                                       "budget", 0.0, 0.0, 0.0, repair=repair, extra_bits=layer.extra_bits,
                                       predicted=e.proxy, predicted_loss_pp=e.loss_pp,
                                       affine=layer.site.affine if fit is not None else None))
    return decisions


def sensitivity_section(search: Sensitivity, tab: list[Layer]) -> dict:
    """The report's sensitivity table (layer x K -> proxy), as data for renderers."""
    return {
        "proxy": "kl", "unit": "nats", "samples": len(search.y_cal),
        "entries": [{"layer": e.layer, "k": e.k, "index_bits": index_bits(e.k), "proxy": e.proxy,
                     "loss_pp": e.loss_pp, "analytic": e.analytic, "bits": e.bits,
                     "compression_ratio": layer.site.spec.weights * layer.site.spec.bits / e.bits,
                     "measured": e.measured, **e.sharing.as_dict()}
                    for layer in tab for e in layer.entries],
    }
