"""Scoring: run candidate networks with onnxruntime and count correct predictions.

What does not change between candidates is built once: preprocessed inputs, reference outputs, and, per layer, a
*plan*. A plan is the model to run plus its per-batch feeds. The full plan runs the whole network on the data. The
suffix plan runs only the nodes that depend on the explored weight, fed with activations cached at their inputs
(computed once per layer by the prefix of the current network), within a memory budget.

Early stopping is exact: the candidates of a layer race batch by batch, best upper bound first, and a candidate
stops once even a perfect remainder could not beat a fully scored one under the greedy rule (more correct
predictions win; a tie goes to the smaller K).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from axcnn.errors import AxcnnError, MissingBackendError
from axcnn.model import IOInfo, constant_tensors

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
            raise AxcnnError(f"onnxruntime cannot load the model: {_first_line(exc)}") from exc

    @staticmethod
    def run(sess, output: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        try:
            return sess.run([output], feeds)[0]
        except Exception as exc:
            raise AxcnnError(f"onnxruntime failed to run the model: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
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
# plans


@dataclass
class Plan:
    """A model to run for candidates of one layer, with its per-batch feeds.

    ``boundary`` names the tensors each feed holds: the graph input for a full plan, the cached activations at the
    cut for a suffix plan. A plan's feeds can be the source another plan's activations are computed from.
    """

    model: onnx.ModelProto
    weight: onnx.TensorProto  # the tensor inside ``model`` whose data candidates replace
    feeds: list[dict[str, np.ndarray]]
    sizes: list[int]
    kind: str  # "full" | "suffix"
    boundary: tuple[str, ...] = ()

    def serialize_with(self, array: np.ndarray) -> bytes:
        saved = onnx.TensorProto()
        saved.CopyFrom(self.weight)
        self.weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), saved.name))
        try:
            return self.model.SerializeToString()
        finally:
            self.weight.CopyFrom(saved)


def weight_proto(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    """The TensorProto holding constant ``name`` (an initializer or a Constant node's value), to edit in place."""
    tensors = constant_tensors(model)
    if name not in tensors:
        raise KeyError(f"no constant tensor named {name!r} in the model")
    return tensors[name][0]


def full_plan(model: onnx.ModelProto, weight: str, x: np.ndarray, io: IOInfo, batch: int) -> Plan:
    batches = input_batches(x, io, batch)
    feeds = [{io.input_name: chunk} for chunk, _ in batches]
    return Plan(model, weight_proto(model, weight), feeds, [n for _, n in batches], "full", (io.input_name,))


def subset_plan(plan: Plan, positions: np.ndarray, io: IOInfo, batch: int) -> Plan:
    """The same model on the samples at ``positions`` (sorted, in the plan's sample order), rows gathered from the
    plan's feeds, so no prefix runs again. Batches of a fixed-batch model are padded as ``input_batches`` does."""
    starts = np.cumsum([0] + list(plan.sizes))
    gathered: dict[str, list[np.ndarray]] = {name: [] for name in plan.boundary}
    for j, feed in enumerate(plan.feeds):
        rows = positions[(positions >= starts[j]) & (positions < starts[j + 1])] - starts[j]
        if len(rows):
            for name in plan.boundary:
                gathered[name].append(feed[name][rows])
    arrays = {name: np.concatenate(parts) for name, parts in gathered.items()}
    size = io.fixed_batch or batch
    feeds, sizes = [], []
    for s in batch_slices(len(positions), size):
        n = s.stop - s.start
        feed = {}
        for name, a in arrays.items():
            chunk = a[s]
            if io.fixed_batch and n < size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - n, axis=0)])
            feed[name] = chunk
        feeds.append(feed)
        sizes.append(n)
    return Plan(plan.model, plan.weight, feeds, sizes, plan.kind, plan.boundary)


def _dependents(model: onnx.ModelProto, weight: str) -> set[int]:
    """Indices of nodes that depend, directly or not, on ``weight``."""
    tainted = {weight}
    out: set[int] = set()
    for i, node in enumerate(model.graph.node):
        if any(name in tainted for name in node.input):
            out.add(i)
            tainted.update(node.output)
    return out


def _needed_nodes(model: onnx.ModelProto, outputs: Sequence[str], stop: set[str]) -> list[int]:
    """Indices (graph order) of nodes needed to compute ``outputs``, walking back and stopping at ``stop``."""
    producer = {o: i for i, node in enumerate(model.graph.node) for o in node.output}
    need: set[int] = set()
    todo = [o for o in outputs if o not in stop]
    while todo:
        name = todo.pop()
        i = producer.get(name)
        if i is None or i in need:
            continue
        need.add(i)
        todo.extend(n for n in model.graph.node[i].input if n and n not in stop)
    return sorted(need)


def _submodel(model: onnx.ModelProto, nodes: list[int], inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    used = {n for i in nodes for n in model.graph.node[i].input}
    graph = onnx.helper.make_graph(
        [model.graph.node[i] for i in nodes],
        model.graph.name or "axcnn",
        inputs,
        outputs,
        initializer=[t for t in model.graph.initializer if t.name in used],
    )
    sub = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    return sub


class _Unreachable(Exception):
    """The source's tensors do not determine the wanted activations (a path bypasses them)."""


def _activations(model: onnx.ModelProto, wanted: list[str], source: Plan, runner: Runner, budget_bytes: int,
                 types: dict[str, int], consume: bool = True) -> list[dict[str, np.ndarray]] | None:
    """Feeds holding ``wanted`` for the source's samples, computed from the source's feeds by the part of ``model``
    between them. The source's feeds are released batch by batch as they are used. None when the activations
    would exceed ``budget_bytes`` or the run fails; raises _Unreachable (before touching the source) when
    ``wanted`` cannot be computed from the source's tensors alone."""
    have = set(source.boundary)
    missing = [w for w in wanted if w not in have]
    nodes = _needed_nodes(model, missing, have)
    consts = set(constant_tensors(model))
    produced = {o for i in nodes for o in model.graph.node[i].output}
    used = []
    for i in nodes:
        for name in model.graph.node[i].input:
            if not name or name in produced or name in consts:
                continue
            if name not in have:
                raise _Unreachable(name)
            if name not in used:
                used.append(name)
    if any(name not in types for name in used + missing):
        raise _Unreachable("untyped tensor")
    sess = None
    if missing:
        step = _submodel(model, nodes, [onnx.helper.make_tensor_value_info(n, types[n], None) for n in used],
                         [onnx.helper.make_tensor_value_info(n, types[n], None) for n in missing])
        sess = runner.session(step)
    total_samples = int(sum(source.sizes))
    feeds: list[dict[str, np.ndarray]] = []
    total = done = 0
    for j, size in enumerate(source.sizes):
        feed = source.feeds[j]
        values = {}
        if sess is not None:
            try:
                # copies, so that no cached array holds on to onnxruntime's output memory: without them, RSS grew
                # by the whole new cache while the old one was released batch by batch (the freed memory was not
                # reused); with them it stayed flat (ResNet-20 peak 2.9 -> 2.2 GB)
                values = {n: np.array(v, copy=True)
                          for n, v in zip(missing, sess.run(missing, {n: feed[n] for n in used}), strict=True)}
            except Exception as exc:
                log.debug("prefix run failed (%s); full-network scoring", _first_line(exc))
                return None
        new = {w: values[w] if w in values else feed[w] for w in wanted}
        if consume:
            source.feeds[j] = None  # the source is consumed: keep at most one copy of each batch alive
        feeds.append(new)
        total += sum(v.nbytes for v in new.values())
        done += size
        # extrapolate from what is cached so far: stop early rather than overshoot the budget
        if total * total_samples / done > budget_bytes:
            log.info("cached activations would exceed the %d MB cache budget; full-network scoring",
                     budget_bytes >> 20)
            return None
    return feeds


def cut(model: onnx.ModelProto, weight: str, io: IOInfo, value_types: dict[str, int]) -> list[str] | None:
    """The boundary of the part of ``model`` that depends on ``weight``: the data tensors its nodes read from the
    rest of the graph (the live activations at the cut). None when the cut saves nothing (it is the graph input,
    as for a first layer), when nothing depends on the weight, or when a boundary tensor's type is unknown."""
    graph = model.graph
    dependents = _dependents(model, weight)
    if not dependents:
        return None
    consts = set(constant_tensors(model))
    produced_by_dependents = {o for i in dependents for o in graph.node[i].output}
    # boundary: activations consumed by dependent nodes that come from the data-dependent rest of the graph
    data_tainted = {io.input_name}
    for node in graph.node:
        if any(n in data_tainted for n in node.input):
            data_tainted.update(node.output)
    boundary: list[str] = []
    for i in sorted(dependents):
        for name in graph.node[i].input:
            if (name and name not in produced_by_dependents and name not in consts and name in data_tainted
                    and name not in boundary):
                boundary.append(name)
    if boundary == [io.input_name] or not boundary:
        return None
    if any(b not in value_types for b in boundary):
        return None
    return boundary


def suffix_model(model: onnx.ModelProto, boundary: Sequence[str], io: IOInfo,
                 value_types: dict[str, int]) -> onnx.ModelProto | None:
    """The nodes of ``model`` needed to compute the scored output from the ``boundary`` tensors, as a model whose
    inputs are those tensors; None when that is the whole graph."""
    suffix_nodes = _needed_nodes(model, [io.output_name], set(boundary))
    if len(suffix_nodes) >= len(model.graph.node):
        return None
    out_vi = [o for o in model.graph.output if o.name == io.output_name]
    return _submodel(model, suffix_nodes,
                     [onnx.helper.make_tensor_value_info(b, value_types[b], None) for b in boundary], out_vi)


def advance(model: onnx.ModelProto, wanted: Sequence[str], source: Plan, runner: Runner,
            value_types: dict[str, int], budget_bytes: int | None = None) -> Plan | None:
    """A plan (of no model) whose feeds hold ``wanted`` for the source's samples, computed from the source's feeds
    by the part of ``model`` in between; the source is consumed. None when ``wanted`` is not reachable from the
    source, the run fails, or the activations would exceed ``budget_bytes``."""
    try:
        feeds = _activations(model, list(wanted), source, runner,
                             (1 << 62) if budget_bytes is None else budget_bytes, value_types)
    except _Unreachable:
        return None
    if feeds is None:
        return None
    return Plan(model, onnx.TensorProto(), feeds, list(source.sizes), "activations", tuple(wanted))


def tensors_at(model: onnx.ModelProto, names: Sequence[str], source: Plan, runner: Runner,
               value_types: dict[str, int]) -> dict[str, np.ndarray]:
    """``names`` computed by ``model`` from the source's feeds, concatenated over its samples (padding dropped);
    the source is left as it is. Raises AxcnnError when they are not reachable from the source's tensors."""
    try:
        feeds = _activations(model, list(names), source, runner, 1 << 62, value_types, consume=False)
    except _Unreachable as why:
        raise AxcnnError(f"cannot compute {', '.join(names)} from the cached activations ({why})") from None
    if feeds is None:
        raise AxcnnError(f"onnxruntime failed to compute {', '.join(names)} from the cached activations")
    return {n: np.concatenate([f[n][:k] for f, k in zip(feeds, source.sizes, strict=True)]) for n in names}


def suffix_plan(model: onnx.ModelProto, weight: str, io: IOInfo, runner: Runner, budget_bytes: int,
                value_types: dict[str, int], sources: Sequence[Plan]) -> Plan | None:
    """Plan that runs only the part of ``model`` after ``weight`` on cached activations, or None.

    The activations at the cut are computed from the first of ``sources`` whose tensors determine them, by the part
    of ``model`` in between: from the graph input (a full plan), or, layer after layer, from the previous layer's
    cached activations, so that the prefix is not rerun from the input each time. A source used is consumed.
    None when the cut saves nothing (the first layer), when a boundary tensor's type is unknown, when no source
    reaches the cut, or when the cached activations would exceed ``budget_bytes``.
    """
    boundary = cut(model, weight, io, value_types)
    if boundary is None:
        return None
    suffix = suffix_model(model, boundary, io, value_types)
    if suffix is None:
        return None
    for source in sources:
        try:
            feeds = _activations(model, boundary, source, runner, budget_bytes, value_types)
        except _Unreachable as why:
            log.debug("cut at %s not reachable from %s (%s)", weight, source.boundary, why)
            continue
        if feeds is None:
            return None
        return Plan(suffix, weight_proto(suffix, weight), feeds, list(source.sizes), "suffix", tuple(boundary))
    return None


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor shape inference can type (graph inputs, outputs, value_info)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is best effort; suffix scoring falls back when a type is unknown
        inferred = model
    types: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


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
