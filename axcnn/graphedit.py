"""Editing an ONNX graph around a weight layer (Conv, ConvTranspose, Gemm, MatMul), for fold.py and affine.py.

What counts as a constant: an initializer, or a Constant node's ``value``. An initializer that is also listed as a
graph input counts as a constant whatever the IR version, as in ``model.inventory`` (which lists it as a weight) and
``score.working_copy`` (which drops it from the inputs before scoring): axcnn never feeds it. Edits keep the model's
convention: in an IR < 4 model each initializer added is also declared as a graph input, a declaration follows its
initializer's shape, and it goes when the initializer goes.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

from axcnn.model import FLOAT_TYPES, constant_tensors, default_opset

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DOMAINS = ("", "ai.onnx")


class Edit:
    """A model being edited in place, with its constants, tensor uses and helpers that keep the graph consistent."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.opset = default_opset(model)
        self.dropped: set[str] = set()  # tensors that may have lost their last use
        self._ranks: dict[str, int] | None = None
        self.refresh()

    def refresh(self) -> None:
        self.consts = constant_tensors(self.model)
        self.uses: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                if name:
                    self.uses.setdefault(name, []).append(node)
        self.outer: set[str] = set()  # names read inside subgraphs (If / Loop / Scan bodies)
        for node in self.graph.node:
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    self.outer |= subgraph_reads(sub)
        self.outputs = {o.name for o in self.graph.output}
        self.producer = {out: node for node in self.graph.node for out in node.output if out}

    def n_uses(self, name: str) -> int:
        return len(self.uses.get(name, ())) + (name in self.outer) + (name in self.outputs)

    def array(self, name: str) -> np.ndarray | None:
        hit = self.consts.get(name)
        return None if hit is None else numpy_helper.to_array(hit[0])

    def rank(self, name: str) -> int | None:
        if self._ranks is None:
            try:
                inferred = onnx.shape_inference.infer_shapes(self.model).graph
            except Exception:  # inference is a hint here; a model it trips on just gets the cautious rule
                inferred = self.graph
            self._ranks = {
                v.name: len(v.type.tensor_type.shape.dim)
                for v in [*inferred.input, *inferred.value_info, *inferred.output]
                if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")
            }
        return self._ranks.get(name)

    def names(self) -> set[str]:
        g = self.graph
        return ({i.name for i in g.initializer} | {i.name for i in g.input} | set(self.producer)
                | {v.name for v in g.value_info} | {n.name for n in g.node})

    def fresh(self, base: str) -> str:
        taken = self.names()
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        return name

    def set_init(self, name: str, array: np.ndarray) -> None:
        """Create or overwrite the initializer ``name`` (or the Constant node's value) with ``array``."""
        array = np.ascontiguousarray(array)
        if name in self.consts and self.consts[name][1] == "constant":
            held = self.consts[name][0]
            held.CopyFrom(numpy_helper.from_array(array, held.name))
            return
        tensor = numpy_helper.from_array(array, name)
        match = [t for t in self.graph.initializer if t.name == name]
        if match:
            match[0].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
        declared = [i for i in self.graph.input if i.name == name]
        if declared or self.model.ir_version < 4:
            decl = helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims))
            if declared:
                declared[0].CopyFrom(decl)
            else:
                self.graph.input.append(decl)
        self.consts[name] = (tensor, "initializer")

    def write(self, node: onnx.NodeProto, slot: int, array: np.ndarray, base: str) -> str:
        """Store ``array`` as ``node``'s input ``slot``: in place when only that slot reads the constant there now,
        else in a new initializer (the old one stays for its other readers)."""
        name = node.input[slot] if slot < len(node.input) else ""
        if not (name and name in self.consts and self.n_uses(name) == 1):
            if name:
                self.dropped.add(name)
            name = self.fresh(base)
            while len(node.input) <= slot:
                node.input.append("")
            node.input[slot] = name
            self.uses.setdefault(name, []).append(node)
        self.set_init(name, array)
        return name

    def insert_after(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> onnx.NodeProto:
        """Insert a copy of ``node`` after ``anchor``; return the graph's copy (edit that one)."""
        at = node_index(self.graph, anchor) + 1
        self.graph.node.insert(at, node)
        return self.graph.node[at]

    def remove(self, node: onnx.NodeProto) -> None:
        self.dropped.update(i for i in node.input if i)
        del self.graph.node[node_index(self.graph, node)]

    def cleanup(self, stale: set[str]) -> None:
        """Remove constants (and their IR < 4 input declarations) that lost their last use, and value_info of
        tensors that no longer exist (``stale``) or were removed."""
        self.refresh()
        gone = {n for n in self.dropped if n in self.consts and self.n_uses(n) == 0}
        inits = {t.name for t in self.graph.initializer}
        keep(self.graph.initializer, lambda t: t.name not in gone)
        keep(self.graph.input, lambda i: not (i.name in gone and i.name in inits))
        keep(self.graph.node, lambda n: not (n.op_type == "Constant" and n.output[0] in gone))
        keep(self.graph.value_info, lambda v: v.name not in gone | stale)
        self.dropped = set()
        self.refresh()


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    reads = set()
    for node in graph.node:
        reads.update(i for i in node.input if i)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                reads |= subgraph_reads(sub)
    return reads


def node_index(graph: onnx.GraphProto, node: onnx.NodeProto) -> int:
    for i, n in enumerate(graph.node):
        if n is node or n == node:
            return i
    raise ValueError(f"node {node.name!r} is not in the graph")


def keep(field, pred) -> None:
    kept = [copy.deepcopy(x) for x in field if pred(x)]
    if len(kept) != len(field):
        del field[:]
        field.extend(kept)


def attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    keep(node.attribute, lambda a: a.name != name)
    node.attribute.append(helper.make_attribute(name, value))


def per_channel(const: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
    """``const`` as a float64 [channels] vector if, broadcast on an output of ``rank`` dimensions with the channels
    on ``axis`` (counted from the end, negative), it acts per channel or as a scalar and leaves the output's shape
    alone; None otherwise."""
    if const.ndim > rank:
        return None
    for j, d in enumerate(const.shape):
        if d != 1 and not (j - const.ndim == axis and d == channels):
            return None
    flat = const.reshape(-1).astype(np.float64)
    return np.broadcast_to(flat, (channels,)).copy() if flat.size in (1, channels) else None


def matmul_rank(ed: Edit, output: str, const: np.ndarray) -> int:
    """The rank of a MatMul output (with a [K, N] weight, that of its first input, at least 1); shape inference
    runs only when a constant of rank 2 or more needs it."""
    return 1 if const.ndim <= 1 else ed.rank(output) or 1


def channels_of(node: onnx.NodeProto, w: np.ndarray) -> int:
    if node.op_type == "Conv":
        return w.shape[0]
    if node.op_type == "ConvTranspose":
        return w.shape[1] * int(attr(node, "group", 1))
    if node.op_type == "Gemm" and attr(node, "transB", 0):
        return w.shape[0]
    return w.shape[1]


def scale_weight(node: onnx.NodeProto, w: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``w`` with output channel c multiplied by k[c] (float64 products, cast back to w's dtype)."""
    w64 = w.astype(np.float64)
    if node.op_type == "Conv":
        out = w64 * k.reshape((-1,) + (1,) * (w.ndim - 1))
    elif node.op_type == "ConvTranspose":  # [C_in, C_out/group, ...]; input rows of group g feed outputs of group g
        group = int(attr(node, "group", 1))
        per_row = np.repeat(k.reshape(group, -1), w.shape[0] // group, axis=0)
        out = w64 * per_row.reshape(per_row.shape + (1,) * (w.ndim - 2))
    elif node.op_type == "Gemm" and attr(node, "transB", 0):
        out = w64 * k[:, None]
    else:
        out = w64 * k[None, :]
    return out.astype(w.dtype)


def layer_weight(ed: Edit, node: onnx.NodeProto) -> tuple[str, np.ndarray] | str:
    """(name, values) of the layer's weight when fold and repair may change it, else the reason they may not."""
    if node.op_type in ("Gemm", "MatMul"):
        if node.input[0] in ed.consts:
            return "its first operand is a constant (only a constant second operand is a weight here)"
    name = node.input[1] if len(node.input) > 1 else ""
    if name not in ed.consts:
        maker = ed.producer.get(name)
        return f"its weight {name} is computed ({maker.op_type if maker else 'graph input'}), not a stored constant"
    if ed.consts[name][0].data_type not in FLOAT_TYPES:
        return f"its weight {name} is not floating point"
    if ed.n_uses(name) != 1:
        return f"its weight {name} is used by {ed.n_uses(name)} nodes or outputs"
    w = ed.array(name)
    if node.op_type in ("Gemm", "MatMul") and w.ndim != 2:
        return f"its weight {name} has {w.ndim} dimensions, not 2"
    return name, w


def bias_of(ed: Edit, node: onnx.NodeProto) -> tuple[str, np.ndarray | None] | str:
    """(name or "", values) of a Conv / ConvTranspose / Gemm bias input, or why it cannot be rewritten."""
    name = node.input[2] if len(node.input) > 2 else ""
    if not name:
        return "", None
    if name not in ed.consts:
        return f"its bias {name} is not a constant"
    return name, ed.array(name)



def const_slot(add: onnx.NodeProto, data: str) -> int:
    """The input slot of a two-input Add that is not ``data``."""
    return 1 if add.input[0] == data else 0
