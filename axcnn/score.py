"""Scoring: run candidate networks with onnxruntime and count correct predictions.

What does not change between candidates is built once: preprocessed inputs, reference outputs, and, per layer, a
*plan* (:mod:`axcnn.plans`): the model to run plus its per-batch feeds. This module runs plans and whole models and
counts what they get right.

Early stopping is exact: the candidates of a layer race batch by batch, best upper bound first, and a candidate
stops once even a perfect remainder could not beat a fully scored one under the greedy rule (more correct
predictions win; a tie goes to the smaller K).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from axcnn.errors import AxcnnError, MissingBackendError
from axcnn.model import IOInfo, weight_proto

if TYPE_CHECKING:
    from axcnn.plans import Plan

log = logging.getLogger(__name__)


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
        raise MissingBackendError("onnxruntime", "gpu") from exc
    return onnxruntime


def select_providers(device: str) -> list[str]:
    """Execution providers for ``device``: CUDA when asked for (or auto) and present, else the CPU."""
    available = _ort().get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        log.warning("CUDA execution provider not available; falling back to the CPU")
    return ["CPUExecutionProvider"]


def working_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy fit for scoring: initializers are not graph inputs (so onnxruntime treats them as constants)."""
    work = copy.deepcopy(model)
    init_names = {i.name for i in work.graph.initializer}
    keep = [i for i in work.graph.input if i.name not in init_names]
    if len(keep) != len(work.graph.input):
        del work.graph.input[:]
        work.graph.input.extend(keep)
        work.ir_version = max(work.ir_version, 4)
    return work


class Runner:
    """Creates onnxruntime sessions from models and runs them batch by batch."""

    def __init__(self, providers: Sequence[str]):
        self.providers = list(providers)
        ort = _ort()
        self._options = ort.SessionOptions()
        self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # fatal only: an error is reported once, as axcnn's one-line message, not also by onnxruntime's own logger
        self._options.log_severity_level = 4
        # candidates' sessions take turns batch by batch: idle threads spinning for work would steal the cores
        self._options.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def session(self, model: onnx.ModelProto | bytes):
        data = model if isinstance(model, bytes) else model.SerializeToString()
        try:
            return _ort().InferenceSession(data, self._options, providers=self.providers)
        except Exception as exc:
            raise AxcnnError(f"onnxruntime cannot load the model: {first_line(exc)}") from exc

    @staticmethod
    def run(sess, output: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        try:
            return sess.run([output], feeds)[0]
        except Exception as exc:
            raise AxcnnError(f"onnxruntime failed to run the model: {first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def batch_slices(n: int, batch: int) -> list[slice]:
    return [slice(i, min(i + batch, n)) for i in range(0, n, batch)]


def input_batches(x: np.ndarray, io: IOInfo, batch: int) -> list[tuple[np.ndarray, int]]:
    """(batch array, number of real samples in it). A model with a fixed batch dimension gets batches of exactly
    that size: the last one is padded by repeating its last sample, and the padding's outputs are dropped."""
    size = io.fixed_batch or batch
    out = []
    for s in batch_slices(len(x), size):
        chunk = x[s]
        n = len(chunk)
        if io.fixed_batch and n < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - n, axis=0)])
        out.append((chunk, n))
    return out


def count_correct(outputs: np.ndarray, labels: np.ndarray, metric: str) -> int:
    """Correct predictions in one batch: top-1 (also used for agreement labels) or top-5."""
    logits = outputs.reshape(outputs.shape[0], -1)
    if metric == "top5":
        k = min(5, logits.shape[1])
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        return int(np.sum(np.any(top == labels[:, None], axis=1)))
    return int(np.sum(np.argmax(logits, axis=1) == labels))


# ---------------------------------------------------------------------------------------------------------------
# running a plan


@dataclass(frozen=True)
class Outcome:
    correct: int
    seen: int  # samples evaluated before a stop
    total: int
    stopped_early: bool


def evaluate(plan: Plan, runner: Runner, output: str, array: np.ndarray, labels: np.ndarray,
             metric: str) -> Outcome:
    """Count correct predictions of the plan's model with the weight set to ``array``, over every sample."""
    sess = runner.session(plan.serialize_with(array))
    correct = start = 0
    for feeds, size in zip(plan.feeds, plan.sizes, strict=True):
        out = runner.run(sess, output, feeds)[:size]
        correct += count_correct(out, labels[start:start + size], metric)
        start += size
    return Outcome(correct, start, start, False)


def wins(correct: int, k: int, best_correct: int, best_k: int) -> bool:
    """The greedy rule: more correct predictions win; a tie goes to the smaller K."""
    return correct > best_correct or (correct == best_correct and k < best_k)


@dataclass(eq=False)  # identity: races are tracked in lists
class _Race:
    k: int
    array: np.ndarray
    sess: object = None
    batch: int = 0  # next batch to run
    correct: int = 0
    seen: int = 0
    out: bool = False  # finished or provably beaten


# Sessions of a race kept open at once. Each holds onnxruntime's memory for a batch (about 100 MB for ResNet-20 at
# batch 256, inferred from peak RSS), so with every candidate's session open a race at --filter 1.0 (41
# candidates) peaked at 5.5 GB; a closed session is rebuilt from the serialized model when its candidate runs
# again (tens of milliseconds).
LIVE_SESSIONS = 4


def best_first(plan: Plan, runner: Runner, output: str, candidates: dict[int, np.ndarray], labels: np.ndarray,
               metric: str, done: Callable[[int, Outcome], None] | None = None, lead: int = 0,
               live_sessions: int = LIVE_SESSIONS) -> dict[int, Outcome]:
    """Score ``candidates`` ({K: weight}) far enough to know the winner under the greedy rule, exactly.

    Each candidate's final count lies in [correct so far, correct so far + samples left]. The candidate with the
    highest upper bound (fewest errors so far; ties to the smaller K) runs its next batch; a candidate whose upper
    bound cannot beat a fully scored one stops. So a candidate only runs while it could still be the winner, which
    is the least any exact strategy needs at batch granularity, whatever the order the candidates come in. The
    winner is always scored in full, and every count returned for a candidate not stopped early is exact.
    ``done(k, outcome)`` is called as each candidate finishes or stops.

    ``lead``: each candidate first runs, one after the other, the batches covering the first ``lead`` samples
    (where the samples are ordered hardest first, the ones nearly every candidate gets wrong). Racing through them
    would switch sessions at every batch, which costs more than it saves there. Only cost depends on ``lead``.

    At most ``live_sessions`` sessions are open at once (the least recently run is closed first), which bounds the
    memory of a race whatever the number of candidates; only cost depends on it.
    """
    if live_sessions < 1:
        raise ValueError(f"live_sessions must be at least 1, got {live_sessions}")
    total = int(sum(plan.sizes))
    starts = np.cumsum([0] + list(plan.sizes))
    race = [_Race(k, a) for k, a in candidates.items()]
    best: _Race | None = None
    results: dict[int, Outcome] = {}
    open_: list[_Race] = []  # races holding a session, least recently run first

    def close(r: _Race) -> None:
        r.sess = None
        if r in open_:
            open_.remove(r)

    def finish(r: _Race, stopped: bool) -> None:
        r.out = True
        close(r)
        results[r.k] = Outcome(r.correct, r.seen, total, stopped)
        if done is not None:
            done(r.k, results[r.k])

    def step(r: _Race) -> None:
        nonlocal best
        if r.sess is None:
            while len(open_) >= live_sessions:
                close(open_[0])
            r.sess = runner.session(plan.serialize_with(r.array))
        else:
            open_.remove(r)
        open_.append(r)
        j = r.batch
        out = runner.run(r.sess, output, plan.feeds[j])[:plan.sizes[j]]
        r.correct += count_correct(out, labels[starts[j]:starts[j + 1]], metric)
        r.seen += plan.sizes[j]
        r.batch += 1
        if r.batch == len(plan.feeds):
            if best is None or wins(r.correct, r.k, best.correct, best.k):
                best = r
            finish(r, False)

    drive_race(race, lead, total, step, finish, lambda: best)
    return results


def drive_race(runs: list, lead: int, total: int, step: Callable, finish: Callable, incumbent: Callable) -> None:
    """The schedule of :func:`best_first`, over race states with ``k``, ``correct``, ``seen`` and ``out``: the
    batches of the first ``lead`` samples candidate by candidate, then always the candidate with the highest upper
    bound, stopping (``finish(r, True)``) each one that can no longer beat ``incumbent()``, the best scored in full.
    ``step(r)`` runs a candidate's next batch. The Ray executor replays the same schedule, so it makes the same
    choices and counts."""
    for r in runs:
        while not r.out and r.seen < lead:
            step(r)
    while True:
        best = incumbent()
        for r in runs:
            if not r.out and best is not None and not wins(r.correct + total - r.seen, r.k, best.correct, best.k):
                finish(r, True)
        live = [r for r in runs if not r.out]
        if not live:
            return
        # highest upper bound first; among equals, the one furthest on (fewer session switches), then smaller K
        step(max(live, key=lambda c: (c.correct + total - c.seen, c.seen, -c.k)))


def outputs_of(plan: Plan, runner: Runner, output: str, array: np.ndarray | None) -> np.ndarray:
    """All outputs of the plan's model (weight replaced by ``array`` unless None), concatenated."""
    sess = runner.session(plan.model if array is None else plan.serialize_with(array))
    return np.concatenate([runner.run(sess, output, f)[:n] for f, n in zip(plan.feeds, plan.sizes, strict=True)])


def weight_as_input(plan: Plan, runner: Runner, output: str):
    """``outputs(array) -> np.ndarray``: the plan's outputs with the weight set to ``array``, for many candidates.

    One session with the weight turned into a graph input serves every candidate (a weight held in a Constant
    node falls back to a session per candidate). Used where only an estimate is needed (the KL estimator on the
    calibration subset): a weight fed as an input skips onnxruntime's weight prepacking, so outputs may differ
    from a session with the weight as a constant in the last bits; scoring always uses the latter.
    """
    run = tensors_as_inputs(plan, runner, output, [plan.weight.name])
    name = plan.weight.name
    return lambda array: run({name: array})


def tensors_as_inputs(plan: Plan, runner: Runner, output: str, names: Sequence[str]):
    """``outputs({name: array}) -> np.ndarray``: the plan's outputs with the named constants replaced, for many
    candidates, by one session where they are graph inputs (see ``weight_as_input``). When one of them is held in a
    Constant node, each call builds a session with the constants replaced instead."""
    model = copy.deepcopy(plan.model)
    by_name = {t.name: t for t in model.graph.initializer}
    if any(n not in by_name for n in names):
        def rebuild(arrays: dict[str, np.ndarray]) -> np.ndarray:
            work = copy.deepcopy(plan.model)
            for n, a in arrays.items():
                weight_proto(work, n).CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a), n))
            sess = runner.session(work)
            return np.concatenate([runner.run(sess, output, f)[:k]
                                   for f, k in zip(plan.feeds, plan.sizes, strict=True)])

        return rebuild
    for n in names:
        tensor = by_name[n]
        model.graph.initializer.remove(tensor)
        model.graph.input.append(onnx.helper.make_tensor_value_info(n, tensor.data_type, list(tensor.dims)))
    sess = runner.session(model)

    def outputs(arrays: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([runner.run(sess, output, {**f, **arrays})[:k]
                               for f, k in zip(plan.feeds, plan.sizes, strict=True)])

    return outputs


def hardest_first(outputs: np.ndarray, labels: np.ndarray, metric: str) -> np.ndarray:
    """Sample order, least confidently correct first: ascending margin of the label's score over its strongest
    rival (for top-5, over the 5th strongest). The samples a candidate gets wrong are then mostly met early, so an
    exact early stop comes sooner; counts, and so every decision, do not depend on the order."""
    logits = outputs.reshape(len(outputs), -1).astype(np.float64)
    n, classes = logits.shape
    k = min(5 if metric == "top5" else 1, classes - 1)
    if n == 0 or k < 1:
        return np.arange(n)
    rows = np.arange(n)
    own = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    rival = np.partition(others, classes - k, axis=1)[:, classes - k]
    return np.argsort(own - rival, kind="stable")


def run_model(model: onnx.ModelProto | bytes, runner: Runner, io: IOInfo, x: np.ndarray,
              batch: int) -> Iterator[np.ndarray]:
    """Outputs of a whole model over ``x``, batch by batch (padding dropped)."""
    sess = runner.session(model)
    for chunk, n in input_batches(x, io, batch):
        yield runner.run(sess, io.output_name, {io.input_name: chunk})[:n]


def count_all(model: onnx.ModelProto | bytes, runner: Runner, io: IOInfo, x: np.ndarray, labels: np.ndarray,
              metric: str, batch: int) -> int:
    """Correct predictions of a whole model over ``x``."""
    correct = start = 0
    for out in run_model(model, runner, io, x, batch):
        correct += count_correct(out, labels[start:start + len(out)], metric)
        start += len(out)
    return correct


@dataclass(frozen=True)
class Count:
    correct: int
    seen: int
    stopped: bool  # stopped once more than ``max_wrong`` samples were wrong (only a lower bound on wrong is known)


def count_bounded(model: onnx.ModelProto | bytes, runner: Runner, io: IOInfo, x: np.ndarray, labels: np.ndarray,
                  metric: str, batch: int, max_wrong: int | None = None) -> Count:
    """Correct predictions of a whole model over ``x``, stopping as soon as more than ``max_wrong`` samples are
    wrong (exact: the model then provably has more than ``max_wrong`` errors). Order ``x`` hardest first for
    early stops."""
    correct = start = 0
    for out in run_model(model, runner, io, x, batch):
        correct += count_correct(out, labels[start:start + len(out)], metric)
        start += len(out)
        if max_wrong is not None and start - correct > max_wrong and start < len(x):
            return Count(correct, start, True)
    return Count(correct, start, False)


def correct_mask(model: onnx.ModelProto | bytes, runner: Runner, io: IOInfo, x: np.ndarray, labels: np.ndarray,
                 metric: str, batch: int) -> np.ndarray:
    """Per sample: whether the model's prediction is correct (for paired comparisons of two models)."""
    masks, start = [], 0
    for out in run_model(model, runner, io, x, batch):
        logits = out.reshape(len(out), -1)
        lab = labels[start:start + len(out)]
        if metric == "top5":
            k = min(5, logits.shape[1])
            top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
            masks.append(np.any(top == lab[:, None], axis=1))
        else:
            masks.append(np.argmax(logits, axis=1) == lab)
        start += len(out)
    return np.concatenate(masks) if masks else np.zeros(0, dtype=bool)


def paired_loss(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Accuracy loss of ``candidate`` against ``reference`` on the same samples (boolean correct masks), in points,
    with a 95% confidence interval from the paired differences: only samples where the two disagree carry
    information (normal approximation on the per-sample difference)."""
    n = len(reference)
    if n == 0:
        return {"samples": 0, "accuracy_loss_pp": None, "ci95_pp": None, "disagreements": 0}
    lost = int(np.sum(reference & ~candidate))
    gained = int(np.sum(~reference & candidate))
    mean = (lost - gained) / n
    var = (lost + gained) / n - mean * mean
    half = 1.96 * np.sqrt(max(var, 0.0) / n)
    return {"samples": n, "reference_score": float(reference.mean()), "final_score": float(candidate.mean()),
            "accuracy_loss_pp": round(100 * mean, 6), "ci95_pp": [round(float(100 * (mean - half)), 6),
                                                                  round(float(100 * (mean + half)), 6)],
            "disagreements": lost + gained}
