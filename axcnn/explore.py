"""The Explorer: what every search strategy shares (see axcnn/search/).

It holds the network being compressed, the scoring data, the reference outputs and the runner, and knows how to
explore one layer the paper's way: cluster for every K in [kmin, kmax], rank the candidates with the estimator,
fully score the best ``filter`` fraction, keep the one with the lowest accuracy loss (ties towards smaller K), and
fix that layer in the network. Strategies decide which layers to explore and what to keep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx

from axcnn import estimate, plans, score
from axcnn.cluster import Clustering
from axcnn.config import CompressConfig
from axcnn.errors import AxcnnError
from axcnn.executor import Executor, LocalExecutor
from axcnn.model import IOInfo, LayerSpec, weight_proto
from axcnn.sharing import SharedClustering, Sharing, as_shared, cluster_layer

if TYPE_CHECKING:
    from axcnn.journal import Journal

log = logging.getLogger(__name__)

Progress = Callable[..., None]


@dataclass(frozen=True)
class Candidate:
    """One K of one layer."""

    k: int
    inertia: float
    estimate: float
    compression_ratio: float
    scored: bool = False
    correct: int | None = None  # correct predictions; None if not scored or stopped early
    score: float | None = None  # correct / samples
    stopped_early: bool = False
    samples_seen: int = 0


@dataclass(frozen=True)
class LayerDecision:
    """What the exploration chose for one layer."""

    spec: LayerSpec
    n_unique: int
    clamped: bool
    candidates: tuple[Candidate, ...]
    chosen: Candidate
    clustering: SharedClustering | Clustering = field(repr=False)  # a plain Clustering is one codebook per layer
    plan: str  # "full" | "suffix" | "budget"
    clustering_s: float
    scoring_s: float
    estimate_s: float
    # budget mode
    repair: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # (scale, bias) per channel
    extra_bits: int = 0  # Eq. 1 bits stored besides indices and centroids (the repair's scale)
    predicted: float | None = None  # the sensitivity proxy of the chosen K, this layer alone
    predicted_loss_pp: float | None = None  # top-1 loss on the calibration samples, this layer alone
    affine: object = field(default=None, repr=False)  # axcnn.affine.AffineSite when repaired

    def dense(self) -> np.ndarray:
        """The clustered weight, in the weight's own dtype, as written to the model."""
        return self.shared().dense()

    def shared(self) -> SharedClustering:
        """The clustering with how it is shared (granularity, vectors)."""
        return as_shared(self.spec, self.clustering)


@dataclass(frozen=True)
class Exploration:
    decisions: tuple[LayerDecision, ...]
    skipped: tuple[tuple[str, str], ...]  # (weight name, reason) for layers explored but left dense
    reference_correct: int
    samples: int
    t_pass_s: float  # one full pass of the uncompressed network over the scoring set
    estimator: str
    final_model: onnx.ModelProto | None = field(default=None, repr=False)  # budget mode: the network chosen
    scoring_s: float | None = None  # when the strategy tracks its scoring time itself


class Explorer:
    """Holds what is reused across layers and candidates: the runner, data, labels, reference outputs."""

    def __init__(self, model: onnx.ModelProto, io: IOInfo, x: np.ndarray, labels: np.ndarray | None,
                 config: CompressConfig, providers: list[str], calib_idx: np.ndarray | None = None,
                 progress: Progress | None = None, journal: Journal | None = None,
                 executor: Executor | None = None):
        self.config = config
        self.journal = journal  # scored candidates and fixed layers are recorded there, and taken from it on resume
        self.candidates_resumed = 0  # scored candidates taken from the journal instead of being scored
        self.executor = executor or LocalExecutor()  # where candidates are scored (see axcnn.executor)
        self.io = io
        self.runner = score.Runner(providers)
        self.current = score.working_copy(model)
        self.types = plans.value_types(self.current) if config.fast_scoring else {}
        self.progress = progress or (lambda *a, **k: None)
        t0 = time.perf_counter()
        ref = np.concatenate(list(score.run_model(self.current, self.runner, io, x, config.batch_size)), axis=0)
        self.t_pass_s = time.perf_counter() - t0
        self.reference_outputs = ref
        if config.metric == "agreement" or labels is None:
            labels = np.argmax(ref.reshape(len(ref), -1), axis=1).astype(np.int64)
        _check_labels(ref, labels, config.metric)
        self.labels = labels  # reference_outputs and labels are in the caller's sample order
        self.reference_correct = score.count_correct(ref, labels, config.metric)
        # candidates are scored over the samples hardest first, so that exact early stops come early
        order = score.hardest_first(ref, labels, config.metric) if config.early_stop else np.arange(len(x))
        self._order = order
        self._x = x[order]
        self._y = labels[order]
        self._previous: plans.Plan | None = None  # the last layer's plan: its activations feed the next prefix
        if config.estimator == "kl":
            if calib_idx is None:
                calib_idx = calibration_indices(len(x), config.calib, config.seed)
            position = np.empty(len(order), dtype=np.int64)
            position[order] = np.arange(len(order))
            self._calib_pos = np.sort(position[calib_idx])
            kind = estimate.output_kind(ref)
            self.output_kind = kind
            self.calib_ref_logp = estimate.log_probs(ref[order][self._calib_pos], kind)

    # -- plans -----------------------------------------------------------------------------------------------
    def _plan(self, weight: str) -> plans.Plan:
        cfg = self.config
        inputs = plans.full_plan(self.current, weight, self._x, self.io, cfg.batch_size)
        plan = None
        if cfg.fast_scoring:
            sources = [p for p in (self._previous, inputs) if p is not None]
            self._previous = None  # consumed (or unusable) from here on
            plan = plans.suffix_plan(self.current, weight, self.io, self.runner, cfg.cache_mb << 20, self.types,
                                     sources)
        if plan is None:
            plan = plans.full_plan(self.current, weight, self._x, self.io, cfg.batch_size)
        return plan

    # -- one layer -------------------------------------------------------------------------------------------
    def explore_layer(self, spec: LayerSpec, index: int, total: int) -> LayerDecision | str:
        cfg = self.config
        if self.journal is not None and (done := self.journal.decision(spec)) is not None:
            return self._replay(done, index, total)
        t0 = time.perf_counter()
        table = cluster_layer(spec, Sharing.of(cfg), cfg.kmin, cfg.kmax, backend=cfg.kmeans, seed=cfg.seed,
                              device=cfg.device)
        if table.layout.note:  # the user asked for a sharing this layer cannot have
            log.warning("%s: %s", spec.name, table.layout.note)
        ks = [k for k in table.ks if table.compression_ratio(k) > 1.0]
        clustering_s = time.perf_counter() - t0
        if not ks:
            how = "" if table.sharing == Sharing() else f" shared as {table.sharing.describe()}"
            return f"no K in [{cfg.kmin}, {cfg.kmax}] makes its {spec.weights} weights smaller{how}"
        if table.clamped:
            log.info("%s has %d unique values: K clamped to %d", spec.name, table.n_unique, table.ks[-1])

        t1 = time.perf_counter()
        plan = self._plan(spec.name)
        plan_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        if cfg.estimator == "kl" and len(ks) > 1:
            estimates = self.journal.estimates(spec.name) if self.journal is not None else None
            if estimates is None:
                estimates = self._kl_estimates(spec, table, ks, plan)
                if self.journal is not None:
                    self.journal.put_estimates(spec.name, estimates)
        else:
            estimates = {k: table.inertia(k) for k in ks}
        estimate_s = time.perf_counter() - t1
        order = estimate.rank(estimates)
        chosen_ks = order[: cfg.candidates_to_score(len(order))]
        self.progress("layer", index=index, total=total, name=spec.name, candidates=len(chosen_ks))

        t2 = time.perf_counter()
        known = {k: o for k in chosen_ks
                 if self.journal is not None and (o := self.journal.outcome(spec.name, k)) is not None}
        self.candidates_resumed += len(known)
        arrays = {k: table.get(k).dense() for k in chosen_ks if k not in known}
        output = self.io.output_name

        def done(k: int, out: score.Outcome) -> None:
            if self.journal is not None:
                self.journal.put_outcome(spec.name, k, out)
            self.progress("candidate", k=k, stopped_early=out.stopped_early)

        for k, out in known.items():
            self.progress("candidate", k=k, stopped_early=out.stopped_early)
        if cfg.early_stop:
            outcomes = self.executor.race(plan, self.runner, output, arrays, self._y, cfg.metric, done,
                                          lead=min(len(self._y) - self.reference_correct, len(self._y) // 2))
        else:
            outcomes = self.executor.score_all(plan, self.runner, output, arrays, self._y, cfg.metric, done)
        outcomes.update(known)  # the race ran without them; the winner is the best over both (score.wins)
        results: dict[int, Candidate] = {}
        best: Candidate | None = None
        for k in chosen_ks:
            out = outcomes[k]
            cand = Candidate(
                k=k, inertia=table.inertia(k), estimate=estimates[k],
                compression_ratio=table.compression_ratio(k), scored=True,
                correct=None if out.stopped_early else out.correct,
                score=None if out.stopped_early else out.correct / out.total,
                stopped_early=out.stopped_early, samples_seen=out.seen,
            )
            results[k] = cand
            if not out.stopped_early and (best is None or score.wins(out.correct, k, best.correct, best.k)):
                best = cand
        scoring_s = time.perf_counter() - t2 + plan_s
        if best is None:  # cannot happen: the first scored candidate has no incumbent to lose to
            raise RuntimeError(f"no candidate of {spec.name} was fully scored")
        candidates = tuple(
            results.get(k) or Candidate(k=k, inertia=table.inertia(k), estimate=estimates[k],
                                        compression_ratio=table.compression_ratio(k))
            for k in sorted(ks)
        )
        decision = LayerDecision(spec, table.n_unique, table.clamped, candidates, best, table.get(best.k),
                                 plan.kind, clustering_s, scoring_s, estimate_s)
        self._fix(spec.name, decision.dense())
        if self.journal is not None:
            self.journal.put_decision(decision)
        if cfg.fast_scoring:
            self._previous = plan
        log.info("%s: K=%d, %d/%d correct (%s scoring, %d candidates scored)", spec.name, best.k, best.correct,
                 len(self.labels), plan.kind, len(chosen_ks))
        return decision

    def _replay(self, decision: LayerDecision, index: int, total: int) -> LayerDecision:
        """Fix a layer as the journal recorded it, without clustering or scoring (a resumed run)."""
        self.progress("layer", index=index, total=total, name=decision.spec.name, candidates=0)
        self._fix(decision.spec.name, decision.dense())
        self._previous = None  # no activations were computed here; the next layer's plan starts from the input
        self.candidates_resumed += sum(c.scored for c in decision.candidates)
        log.info("%s: K=%d, taken from the journal", decision.spec.name, decision.chosen.k)
        return decision

    def _kl_estimates(self, spec: LayerSpec, table, ks: list[int], plan: plans.Plan) -> dict[int, float]:
        calib = plans.subset_plan(plan, self._calib_pos, self.io, self.config.batch_size)
        run = score.weight_as_input(calib, self.runner, self.io.output_name)  # one session for all K
        out = {}
        for k in ks:
            cand = run(table.get(k).dense())
            out[k] = estimate.mean_kl(self.calib_ref_logp, estimate.log_probs(cand, self.output_kind))
        return out

    def _fix(self, name: str, array: np.ndarray) -> None:
        """Write the chosen clustered weight into the current network."""
        weight_proto(self.current, name).CopyFrom(
            onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        """The scoring samples and labels in the order candidates are scored (hardest first with early stops)."""
        return self._x, self._y

    def reference_in_order(self) -> np.ndarray:
        """The uncompressed model's outputs, in the order of :meth:`samples`."""
        return self.reference_outputs[self._order]


def calibration_indices(n: int, calib: int, seed: int) -> np.ndarray:
    """The ``kl`` estimator's calibration samples: ``min(calib, n)`` distinct indices into the scoring set,
    drawn with the seed (sorted)."""
    rng = np.random.default_rng(seed + 1)
    return np.sort(rng.choice(n, size=min(calib, n), replace=False))


def _check_labels(ref: np.ndarray, labels: np.ndarray, metric: str) -> None:
    classes = ref.reshape(len(ref), -1).shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise AxcnnError(f"labels must lie in [0, {classes - 1}] for a model with {classes} outputs; "
                         f"the data has labels from {labels.min()} to {labels.max()}")
    if metric == "top5" and classes < 5:
        raise AxcnnError(f"--metric top5 needs at least 5 classes; the model has {classes}")
