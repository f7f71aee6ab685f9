"""Graph rewrites around a weight layer (Conv, ConvTranspose, Gemm, MatMul).

``fold_bn``: fold inference BatchNormalization, and Mul / Add by a per-channel (or scalar) constant, that directly
follow a layer into the layer's weight and bias, repeatedly. The weights axcnn then shares are the ones onnxruntime
(or a weight-sharing accelerator) actually multiplies by.

``set_channel_affine``: the repair's edit. After a layer's weight is clustered, a per-output-channel scale s and a
bias t are fitted; the layer is made to compute s * (W x) + t with s as a Mul after the layer, so the weight stays
shared. ``affine_site`` says whether a weight supports it, and names the tensors involved.

What counts as a constant: an initializer, or a Constant node's ``value``. An initializer that is also listed as a
graph input counts as a constant whatever the IR version, as in ``model.inventory`` (which lists it as a weight) and
``score.working_copy`` (which drops it from the inputs before scoring): axcnn never feeds it. The rewrites keep the
model's convention: in an IR < 4 model each initializer added is also declared as a graph input, a declaration
follows its initializer's shape, and it goes when the initializer goes.

Both work on opset 7 and later only (onnxruntime's floor; older Mul, Add and Gemm broadcast by attribute).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from axcnn.model import FLOAT_TYPES, Skipped, constant_tensors, default_opset

log = logging.getLogger(__name__)

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FOLDABLE_OPS = ("BatchNormalization", "Mul", "Add")
_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Folded:
    """What ``fold_bn`` folded into one layer."""

    weight: str  # the layer's weight tensor (name unchanged; values now include the folded scales)
    node: str  # the layer's node name
    op_type: str
    folded: tuple[tuple[str, str], ...]  # (op type, node name) of each node folded in, in graph order
    bias: str | None  # the bias tensor afterwards: the layer's bias input, or for MatMul its bias Add's constant
    output: str  # the tensor the layer (with its bias Add, for MatMul) now produces


class _Edit:
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
                    self.outer |= _subgraph_reads(sub)
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
        at = _index(self.graph, anchor) + 1
        self.graph.node.insert(at, node)
        return self.graph.node[at]

    def remove(self, node: onnx.NodeProto) -> None:
        self.dropped.update(i for i in node.input if i)
        del self.graph.node[_index(self.graph, node)]

    def cleanup(self, stale: set[str]) -> None:
        """Remove constants (and their IR < 4 input declarations) that lost their last use, and value_info of
        tensors that no longer exist (``stale``) or were removed."""
        self.refresh()
        gone = {n for n in self.dropped if n in self.consts and self.n_uses(n) == 0}
        inits = {t.name for t in self.graph.initializer}
        _keep(self.graph.initializer, lambda t: t.name not in gone)
        _keep(self.graph.input, lambda i: not (i.name in gone and i.name in inits))
        _keep(self.graph.node, lambda n: not (n.op_type == "Constant" and n.output[0] in gone))
        _keep(self.graph.value_info, lambda v: v.name not in gone | stale)
        self.dropped = set()
        self.refresh()


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    reads = set()
    for node in graph.node:
        reads.update(i for i in node.input if i)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                reads |= _subgraph_reads(sub)
    return reads


def _index(graph: onnx.GraphProto, node: onnx.NodeProto) -> int:
    for i, n in enumerate(graph.node):
        if n is node or n == node:
            return i
    raise ValueError(f"node {node.name!r} is not in the graph")


def _keep(field, pred) -> None:
    kept = [copy.deepcopy(x) for x in field if pred(x)]
    if len(kept) != len(field):
        del field[:]
        field.extend(kept)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    _keep(node.attribute, lambda a: a.name != name)
    node.attribute.append(helper.make_attribute(name, value))


def _per_channel(const: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
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


def _matmul_rank(ed: _Edit, output: str, const: np.ndarray) -> int:
    """The rank of a MatMul output (with a [K, N] weight, that of its first input, at least 1); shape inference
    runs only when a constant of rank 2 or more needs it."""
    return 1 if const.ndim <= 1 else ed.rank(output) or 1


def _channels(node: onnx.NodeProto, w: np.ndarray) -> int:
    if node.op_type == "Conv":
        return w.shape[0]
    if node.op_type == "ConvTranspose":
        return w.shape[1] * int(_attr(node, "group", 1))
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return w.shape[0]
    return w.shape[1]


def _scale_weight(node: onnx.NodeProto, w: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``w`` with output channel c multiplied by k[c] (float64 products, cast back to w's dtype)."""
    w64 = w.astype(np.float64)
    if node.op_type == "Conv":
        out = w64 * k.reshape((-1,) + (1,) * (w.ndim - 1))
    elif node.op_type == "ConvTranspose":  # [C_in, C_out/group, ...]; input rows of group g feed outputs of group g
        group = int(_attr(node, "group", 1))
        per_row = np.repeat(k.reshape(group, -1), w.shape[0] // group, axis=0)
        out = w64 * per_row.reshape(per_row.shape + (1,) * (w.ndim - 2))
    elif node.op_type == "Gemm" and _attr(node, "transB", 0):
        out = w64 * k[:, None]
    else:
        out = w64 * k[None, :]
    return out.astype(w.dtype)


def _layer_weight(ed: _Edit, node: onnx.NodeProto) -> tuple[str, np.ndarray] | str:
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


def _bias_of(ed: _Edit, node: onnx.NodeProto) -> tuple[str, np.ndarray | None] | str:
    """(name or "", values) of a Conv / ConvTranspose / Gemm bias input, or why it cannot be rewritten."""
    name = node.input[2] if len(node.input) > 2 else ""
    if not name:
        return "", None
    if name not in ed.consts:
        return f"its bias {name} is not a constant"
    return name, ed.array(name)


def _step(ed: _Edit, node: onnx.NodeProto, tail: onnx.NodeProto, has_bias_add: bool):
    """The next node after ``tail`` that can fold into ``node``, as (that node, k, c, its constant inputs) with the
    layer then computing k * y + c per output channel; None when there is none (a reason is logged when a node
    looked foldable but is not)."""
    x = tail.output[0]
    users = [u for u in ed.uses.get(x, ()) if u.op_type in FOLDABLE_OPS and u.domain in _DOMAINS]
    if not users:
        return None
    f = users[0]
    if f.op_type == "BatchNormalization":
        if f.input[0] != x:
            return None
        params = list(f.input[1:5])
        if len(params) != 4 or any(p not in ed.consts for p in params):
            return _skip(f, node, "its parameters are not all constants")
    else:
        params = [i for i in f.input if i != x]
        if len(params) != 1 or len(f.input) != 2 or params[0] not in ed.consts:
            return None  # not an affine op by a constant: nothing to fold, nothing to report
    if ed.n_uses(x) != 1:
        why = "is a graph output" if x in ed.outputs else f"has {ed.n_uses(x)} consumers"
        return _skip(f, node, f"the layer output {x} {why}")
    if ed.opset < 7:
        return _skip(f, node, f"opset {ed.opset} is below 7")
    got = _layer_weight(ed, node)
    if isinstance(got, str):
        if node.op_type == "MatMul" and f.op_type == "Add" and not has_bias_add:
            return None  # an Add after MatMul is its bias: nothing folds yet
        return _skip(f, node, got)
    channels = _channels(node, got[1])
    if f.op_type == "BatchNormalization":
        extra = [o for o in f.output[1:] if o]
        if extra or _attr(f, "training_mode", 0) or not _attr(f, "spatial", 1):
            return _skip(f, node, "it is not in inference form")
        scale, b, mean, var = (ed.array(p).astype(np.float64) for p in params)
        if any(p.shape != (channels,) for p in (scale, b, mean, var)):
            return _skip(f, node, f"its parameters are not of shape [{channels}]")
        if node.op_type == "MatMul" or has_bias_add:
            return _skip(f, node, "BatchNormalization after MatMul normalises axis 1, not the output columns")
        k = scale / np.sqrt(var + float(_attr(f, "epsilon", 1e-5)))
        return f, k, b - mean * k, params
    const = ed.array(params[0])
    if node.op_type in ("Conv", "ConvTranspose"):
        rank, axis = got[1].ndim, 1 - got[1].ndim
    elif node.op_type == "Gemm":
        rank, axis = 2, -1
    else:
        rank, axis = _matmul_rank(ed, x, const), -1
    vec = _per_channel(const, rank, axis, channels)
    if vec is None:
        return _skip(f, node, f"its constant of shape {list(const.shape)} does not act per output channel")
    if f.op_type == "Mul":
        return f, vec, np.zeros(channels), params
    return f, np.ones(channels), vec, params


def _skip(f: onnx.NodeProto, node: onnx.NodeProto, reason: str) -> None:
    log.info("not folding %s %s into %s %s: %s", f.op_type, f.name or "?", node.op_type, node.name or "?", reason)
    return None


def _fold_layer(ed: _Edit, node: onnx.NodeProto, stale: set[str]) -> Folded | None:
    folded: list[tuple[str, str]] = []
    tail, bias_add = node, None  # for MatMul, the Add by a per-column constant that acts as its bias
    while True:
        step = _step(ed, node, tail, bias_add is not None)
        if step is None:
            break
        f, k, c, params = step
        if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            bias = _bias_of(ed, node)
            if isinstance(bias, str):
                _skip(f, node, bias)
                break
        if node.op_type == "MatMul" and bias_add is None and f.op_type == "Add":
            bias_add = tail = f  # adopt it as the bias: it stays, later Mul / Add fold into the weight and it
            continue
        wname, w = _layer_weight(ed, node)
        if np.any(k != 1):
            ed.write(node, 1, _scale_weight(node, w, k), wname)
        if node.op_type == "MatMul":
            if bias_add is not None:
                slot = _const_slot(bias_add, node.output[0])
                t = ed.array(bias_add.input[slot])
                ed.write(bias_add, slot, (k * t.astype(np.float64) + c).astype(t.dtype), f"{wname}.bias")
        else:
            bname, b = bias
            if node.op_type == "Gemm" and b is not None:
                b = float(_attr(node, "beta", 1.0)) * b.astype(np.float64)
                _set_attr(node, "beta", 1.0)
            if b is not None or np.any(c != 0):
                base = np.zeros(len(k)) if b is None else b.astype(np.float64)
                ed.write(node, 2, (k * base + c).astype(w.dtype), f"{wname}.bias")
        stale.add(tail.output[0])
        tail.output[0] = f.output[0]
        ed.remove(f)
        ed.dropped.update(params)
        ed.refresh()
        folded.append((f.op_type, f.name))
    if not folded:
        return None
    if bias_add is not None:
        bias_name = bias_add.input[_const_slot(bias_add, node.output[0])]
    else:
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    record = Folded(node.input[1], node.name, node.op_type, tuple(folded), bias_name, tail.output[0])
    log.info("folded %s into %s %s (weight %s)", ", ".join(f"{o} {n or '?'}" for o, n in folded), node.op_type,
             node.name or "?", record.weight)
    return record


def _const_slot(add: onnx.NodeProto, data: str) -> int:
    """The input slot of a two-input Add that is not ``data``."""
    return 1 if add.input[0] == data else 0


def fold_bn(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Folded]]:
    """A copy of ``model`` with inference BatchNormalization and per-channel / scalar Mul and Add by constants
    folded into the Conv, ConvTranspose, Gemm or MatMul they directly follow, and what was folded where.

    A fold happens only when it keeps the model's meaning: the layer's output has one consumer and is not a graph
    output, the weight is a constant used by that layer alone, the bias and the folded node's operands are
    constants, and the constant acts per output channel or is a scalar. MatMul keeps a following Add by a
    per-column constant as its bias (Mul and Add after it fold into the weight and that Add). BatchNormalization
    params are combined in float64 and cast back to the weight's dtype. Reasons for not folding are logged (INFO).
    ``model`` is not modified.
    """
    work = copy.deepcopy(model)
    ed = _Edit(work)
    stale: set[str] = set()
    records = []
    for node in list(work.graph.node):
        if node.op_type in LAYER_OPS and node.domain in _DOMAINS and len(node.input) > 1:
            record = _fold_layer(ed, node, stale)
            if record is not None:
                records.append(record)
    ed.cleanup(stale)
    return work, records


@dataclass(frozen=True)
class AffineSite:
    """Where ``set_channel_affine`` acts for one weight, and the tensors it owns there.

    ``output`` is the tensor the layer's consumers read: W x + b before the edit, s * (W x) + t after it (the same
    name, so cached activations and suffix plans keyed on it stay valid). ``scale`` and ``bias`` are the
    initializers the edit writes; a search may swap their values per candidate (``arrays`` gives them).
    """

    weight: str
    node: str  # the layer's node name
    op_type: str
    axis: int  # the weight's output-channel axis
    channels: int
    output: str
    scale: str  # f"{weight}.axcnn_scale": s, shaped to broadcast on the output's channel axis
    bias: str  # f"{weight}.axcnn_bias": t / s as the Conv / ConvTranspose / Gemm bias input; t for MatMul's Add
    scale_shape: tuple[int, ...]
    dtype: str  # of the weight, scale and bias

    def arrays(self, scale, bias) -> dict[str, np.ndarray]:
        """{scale name: s, bias name: stored bias} as ``set_channel_affine`` stores them for per-channel s, t."""
        s = _vector("scale", scale, self.channels)
        t = _vector("bias", bias, self.channels)
        if self.op_type != "MatMul":
            if np.any(s == 0):
                raise ValueError(f"scale must be nonzero for a {self.op_type} layer (its bias stores t / s); "
                                 f"channel {int(np.flatnonzero(s == 0)[0])} is 0")
            t = t / s
        return {self.scale: s.reshape(self.scale_shape).astype(self.dtype), self.bias: t.astype(self.dtype)}


def _vector(field: str, value, channels: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size != channels or not np.all(np.isfinite(arr)):
        raise ValueError(f"{field} must hold {channels} finite values (one per output channel); got shape "
                         f"{list(np.shape(value))}" + ("" if arr.size != channels else " with NaN or infinity"))
    return arr


@dataclass
class _Parts:
    layer: onnx.NodeProto
    mul: onnx.NodeProto | None  # the scale Mul after the layer, once inserted
    add: onnx.NodeProto | None  # MatMul only: its bias Add (inserted, or an existing Add by a per-column constant)


def _site(ed: _Edit, weight: str) -> tuple[AffineSite, _Parts] | Skipped:
    users = ed.uses.get(weight, [])
    layers = [u for u in users if u.op_type in LAYER_OPS and u.domain in _DOMAINS]
    if not layers:
        return Skipped(weight, users[0].op_type if users else "?", "no Conv, ConvTranspose, Gemm or MatMul reads it "
                       "directly (it may reach its layer through a Reshape or Transpose)")
    node = layers[0]
    op = node.op_type
    if ed.opset < 7:
        return Skipped(weight, op, f"opset {ed.opset} is below 7")
    if len(node.input) < 2 or node.input[1] != weight:
        return Skipped(weight, op, "it is not the layer's weight operand (input 1)")
    got = _layer_weight(ed, node)
    if isinstance(got, str):
        return Skipped(weight, op, got)
    w = got[1]
    if op == "ConvTranspose" and int(_attr(node, "group", 1)) != 1:
        return Skipped(weight, op, "grouped ConvTranspose: its output channels span two weight axes")
    if op != "MatMul" and isinstance(_bias_of(ed, node), str):
        return Skipped(weight, op, _bias_of(ed, node))
    names = (f"{weight}.axcnn_scale", f"{weight}.axcnn_bias")
    if any(n in ed.producer or (n in ed.names() and n not in ed.consts) for n in names):
        return Skipped(weight, op, f"the name {names[0]} or {names[1]} is taken by another tensor")
    axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}.get(op, 0 if _attr(node, "transB", 0) else 1)
    channels = _channels(node, w)

    def follower(name: str, op_type: str) -> onnx.NodeProto | None:
        users = ed.uses.get(name, [])
        if len(users) != 1 or ed.n_uses(name) != 1 or users[0].op_type != op_type or len(users[0].input) != 2:
            return None
        return users[0]

    mul = follower(node.output[0], "Mul")
    if mul is not None and names[0] not in mul.input:
        mul = None
    add = None
    if op == "MatMul":
        y = mul.output[0] if mul is not None else node.output[0]
        add = follower(y, "Add")
        const = ed.array(add.input[_const_slot(add, y)]) if add is not None else None
        if const is None or _per_channel(const, _matmul_rank(ed, y, const), -1, channels) is None:
            add = None
        if mul is not None and add is None:
            return Skipped(weight, op, f"the Mul after it by {names[0]} has no bias Add after it")
    output = (add or mul or node).output[0]
    shape = (channels,) + (1,) * (w.ndim - 2 if op in ("Conv", "ConvTranspose") else 0)
    site = AffineSite(weight, node.name, op, axis, channels, output, *names, shape, str(w.dtype))
    return site, _Parts(node, mul, add)


def affine_site(model: onnx.ModelProto, weight: str) -> AffineSite | Skipped:
    """Whether ``set_channel_affine`` supports ``weight``: its AffineSite (the weight's output-channel axis, the
    layer's output tensor, the scale and bias initializer names), or a ``model.Skipped`` with the reason."""
    got = _site(_Edit(model), weight)
    return got if isinstance(got, Skipped) else got[0]


def apply_channel_affine(model: onnx.ModelProto, weight: str, scale, bias, *,
                         always_scale: bool = False) -> AffineSite:
    """In place: make the layer that reads ``weight`` compute s * (W x) + t per output channel (t replaces the
    layer's bias). Conv / ConvTranspose / Gemm: the bias input becomes t / s (Gemm's beta becomes 1) and a Mul by s
    follows the layer. MatMul: Mul by s then Add of t follow it (an existing Add by a per-column constant is reused
    as that Add); this order needs no division, so a zero scale is allowed there. With every s equal to 1 there is
    no Mul, unless ``always_scale`` (a template whose scale a search replaces per candidate). Called again on the
    same layer it rewrites the same initializers, adding or removing the Mul as needed. The layer's output tensor
    keeps its name (the layer's own output is renamed), so graph outputs and consumers are untouched.

    Raises ValueError when the weight is not supported (see ``affine_site``) or scale / bias are not C finite values.
    """
    ed = _Edit(model)
    got = _site(ed, weight)
    if isinstance(got, Skipped):
        raise ValueError(f"cannot set a channel affine on {weight}: {got.reason}")
    site, parts = got
    arrays = site.arrays(scale, bias)
    with_mul = always_scale or bool(np.any(arrays[site.scale] != 1))
    layer, mul, add = parts.layer, parts.mul, parts.add
    stale: set[str] = set()
    if site.op_type == "MatMul":
        if add is None:
            out, layer.output[0] = layer.output[0], ed.fresh(f"{weight}.axcnn_linear")
            add = helper.make_node("Add", [layer.output[0], site.bias], [out], name=ed.fresh(f"{weight}.axcnn_add"))
            add = ed.insert_after(layer, add)
        data = 0 if add.input[0] == (mul or layer).output[0] else 1
        target, slot = add, 1 - data
    else:
        target, slot = layer, 2
        if site.op_type == "Gemm":
            _set_attr(layer, "beta", 1.0)
    while len(target.input) <= slot:
        target.input.append("")
    if target.input[slot] != site.bias:
        ed.dropped.add(target.input[slot])
        target.input[slot] = site.bias
    ed.set_init(site.bias, arrays[site.bias])
    if with_mul:
        ed.set_init(site.scale, arrays[site.scale])
    if with_mul and mul is None:
        name = ed.fresh(f"{weight}.axcnn_mul")
        if site.op_type == "MatMul":  # between the MatMul and its Add
            mid = ed.fresh(f"{weight}.axcnn_scaled")
            mul = helper.make_node("Mul", [add.input[data], site.scale], [mid], name=name)
            add.input[data] = mid
        else:  # the layer's own output is renamed; the Mul produces the name its consumers read
            out, layer.output[0] = layer.output[0], ed.fresh(f"{weight}.axcnn_linear")
            mul = helper.make_node("Mul", [layer.output[0], site.scale], [out], name=name)
        ed.insert_after(layer, mul)
    elif not with_mul and mul is not None:
        if site.op_type == "MatMul":
            add.input[data] = mul.input[0]
        else:
            stale.add(layer.output[0])
            layer.output[0] = mul.output[0]
        ed.remove(mul)
    ed.cleanup(stale)
    return site


def set_channel_affine(model: onnx.ModelProto, weight: str, scale, bias, *,
                       always_scale: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` with ``apply_channel_affine`` done; ``model`` is not modified."""
    work = copy.deepcopy(model)
    apply_channel_affine(work, weight, scale, bias, always_scale=always_scale)
    return work
