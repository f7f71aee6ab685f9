"""Plans: what runs for the candidates of one layer.

A plan is a model to run plus its per-batch feeds. The full plan runs the whole network on the data. The suffix
plan runs only the nodes that depend on the explored weight, fed with activations cached at their inputs (computed
once per layer by the prefix of the current network, from the previous plan's feeds), within a memory budget.
Running plans and counting what they get right is :mod:`axcnn.score`'s part.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from axcnn.errors import AxcnnError
from axcnn.model import IOInfo, constant_tensors, weight_proto
from axcnn.score import Runner, batch_slices, first_line, input_batches

log = logging.getLogger(__name__)


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
                log.debug("prefix run failed (%s); full-network scoring", first_line(exc))
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
