"""Per-layer records of a weight-shared model, rebuilt from its graph: which recipe decodes each layer, from
which tensors, and how its weights share codebooks."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from axcnn.errors import AxcnnError
from axcnn.rewrite.common import (
    FUNCTION_DOMAIN,
    LAYERS_KEY,
    NODE_PREFIX,
    compact_layers,
    default_opset,
    dtype_name,
    index_bits,
    is_decode_node,
    layers_meta,
    stored_bytes,
    tensor_array,
)
from axcnn.rewrite.encodings import ATTRIBUTES, ROLES, Recipe, emit_decode

RECORD_DEFAULTS = {
    "granularity": "layer",
    "codebooks": 1,
    "vector_dim": 1,
    "axis": 0,
    "group_size": 1,
    "vector_axis": 1,
}
"""How a layer of the older verbose metadata (always one codebook per layer) shares its weights."""


class _Probe:
    """An emitter that only records the nodes a recipe writes: (op, inputs, attributes)."""

    def __init__(self):
        self.nodes: list[tuple[str, list[str], dict]] = []

    def node(self, op: str, inputs, output: str | None = None, **attrs) -> str:
        self.nodes.append((op, list(inputs), attrs))
        return f"node:{len(self.nodes) - 1}"

    def const(self, key: str, value) -> str:
        return f"const:{key}"


class Graph:
    """Lookup tables of a shared model's main graph."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.opset = default_opset(model)
        self.producer: dict[str, int] = {}
        for i, node in enumerate(model.graph.node):
            for o in node.output:
                self.producer[o] = i
        self.inits = {t.name: t for t in model.graph.initializer}
        self.functions = {f.name: f for f in model.functions if f.domain == FUNCTION_DOMAIN}

    def decode_node(self, name: str) -> tuple[int, onnx.NodeProto]:
        """The decode node producing ``name``."""
        idx = self.producer.get(name)
        if idx is None or not is_decode_node(self.graph.node[idx]):
            raise AxcnnError(f"shared weight value {name!r} is not produced by an axcnn decode node")
        return idx, self.graph.node[idx]

    def function(self, node: onnx.NodeProto) -> onnx.FunctionProto:
        func = self.functions.get(node.op_type)
        if func is None:
            raise AxcnnError(f"the model has no decode function {FUNCTION_DOMAIN}.{node.op_type}")
        return func

    def init(self, name: str, layer: str) -> TensorProto:
        if name not in self.inits:
            raise AxcnnError(f"decode input {name!r} of layer {layer!r} is not an initializer")
        return self.inits[name]

    def values(self, name: str, layer: str) -> list[int]:
        """The integers of a small decode tensor (shape, count, axis), flat."""
        return [int(v) for v in tensor_array(self.init(name, layer), "decode tensor").reshape(-1)]

    def call(self, layer: str) -> tuple[Recipe, dict[str, str], dict[str, list[int]]]:
        """The recipe, the role -> tensor names and the attributes of one layer's decode."""
        _, node = self.decode_node(layer)
        if node.domain != FUNCTION_DOMAIN:
            return self._inline_call(layer, node)
        func = self.function(node)
        recipe = Recipe.parse(func.name)
        if recipe is None:
            raise AxcnnError(f"unknown decode function {FUNCTION_DOMAIN}.{func.name} for layer {layer!r}")
        if len(func.input) != len(node.input):
            raise AxcnnError(f"decode call of layer {layer!r} does not match function {func.name}")
        attrs = {a.name: [int(v) for v in np.atleast_1d(helper.get_attribute_value(a))] for a in node.attribute}
        return recipe, dict(zip(func.input, node.input, strict=True)), attrs

    def _inline_call(self, layer: str, node: onnx.NodeProto) -> tuple[Recipe, dict[str, str], dict]:
        """Roles of an inline (IR < 4, or older file) layer decode, walking back from its final node."""
        layer_no, _, tail = node.name[len(NODE_PREFIX) :].partition("/")
        recipe = Recipe.parse(tail)
        if recipe is not None:
            return self._replayed_call(layer, layer_no, recipe)
        roles = {"c": node.input[0]}
        if node.op_type in ("Expand", "Reshape"):  # inline broadcast
            roles["s"] = node.input[1]
            return Recipe("broadcast", scalar=node.op_type == "Reshape"), roles, {}
        if node.op_type != "Gather":
            raise AxcnnError(f"unexpected final decode op {node.op_type} for layer {layer!r}")
        _, feed = self.decode_node(node.input[1])
        if feed.op_type == "Reshape":
            roles["s"] = feed.input[1]
        todo = [feed]
        while todo:  # walk back to the Cast that reads the index tensor
            nd = todo.pop()
            if nd.op_type == "Cast":
                roles["q"] = nd.input[0]
                break
            todo.extend(self.decode_node(x)[1] for x in nd.input if x not in self.inits)
        if "q" not in roles:
            raise AxcnnError(f"no index tensor found in the decode of layer {layer!r}")
        return Recipe("planes" if "s" in roles else "uint8"), roles, {}

    def _replayed_call(self, layer: str, layer_no: str, recipe: Recipe) -> tuple[Recipe, dict, dict]:
        """Roles and attributes of an inline decode whose final node names its recipe: the recipe is emitted
        again with placeholders, and node ``j`` of that replay tells which input of ``axcnn/{i}/{j}`` (and
        which attribute) plays which role."""
        probe = _Probe()
        placeholders = {role: f"role:{role}" for role in ROLES}
        emit_decode(probe, self.opset, recipe, placeholders, "out", {a: f"attr:{a}" for a in ATTRIBUTES})
        prefix = f"{NODE_PREFIX}{layer_no}/"
        nodes = {nd.name[len(prefix) :]: nd for nd in self.graph.node if nd.name.startswith(prefix)}
        actual = [nodes.get(str(j)) for j in range(len(probe.nodes) - 1)] + [nodes.get(recipe.name)]
        roles: dict[str, str] = {}
        attrs: dict[str, list[int]] = {}
        for (op, inputs, wanted), nd in zip(probe.nodes, actual, strict=True):
            if nd is None or nd.op_type != op or len(nd.input) != len(inputs):
                raise AxcnnError(f"the inline decode of layer {layer!r} does not match its recipe {recipe.name}")
            roles.update({x[5:]: real for x, real in zip(inputs, nd.input, strict=True) if x.startswith("role:")})
            given = {a.name: a for a in nd.attribute}
            for key, value in wanted.items():
                if isinstance(value, str) and value.startswith("attr:") and key in given:
                    attrs[value[5:]] = [int(v) for v in np.atleast_1d(helper.get_attribute_value(given[key]))]
        return recipe, roles, attrs

    def record(self, layer: str, k_meta: int) -> dict:
        """The full per-layer record, rebuilt from the graph."""
        recipe, roles, attrs = self.call(layer)
        c = self.init(roles["c"], layer)
        q = self.init(roles["q"], layer) if "q" in roles else None
        dims = [int(d) for d in c.dims]
        stage = recipe.stage
        grouped = stage in ("channel", "kernel")
        if len(dims) != (1 if stage == "layer" else 2):
            raise AxcnnError(f"layer {layer!r}: a {recipe.name} decode cannot take centroids of shape {dims}")
        k = dims[1] if grouped else dims[0]
        if k != k_meta:
            raise AxcnnError(f"layer {layer!r}: {LAYERS_KEY} says K={k_meta}, the centroid tensor has {dims}")
        bits = index_bits(k)
        if q is None:
            encoding = "broadcast"
        elif q.data_type == TensorProto.UINT4:
            encoding = "uint4"
        elif bits == 8:
            encoding = "uint8"
        else:
            encoding = "planes"
        index_shape = [int(d) for d in q.dims] if encoding in ("uint8", "uint4") else self.values(roles["s"], layer)
        rec = {
            "name": layer,
            "k": k,
            "index_bits": bits,
            "encoding": encoding,
            "shape": index_shape,
            "dtype": dtype_name(c.data_type),
            "index_tensor": None if q is None else q.name,
            "centroid_tensor": c.name,
            "index_bytes": 0 if q is None else stored_bytes(q),
            "centroid_bytes": stored_bytes(c),
            "index_count": int(np.prod(index_shape, dtype=np.int64)),
            **RECORD_DEFAULTS,
        }
        if grouped:
            rec["granularity"], rec["codebooks"] = stage, dims[0]
        if stage == "channel":
            ramp = tensor_array(self.init(roles["o"], layer), "ramp")
            rec["axis"] = len(index_shape) - ramp.ndim
            rec["group_size"] = int(np.count_nonzero(ramp == 0))
        if stage == "vector":
            perm = attrs["perm"]
            va = perm.index(len(perm) - 1) - 1
            shape = self.values(roles["v"], layer)
            if recipe.padded:
                shape[va] = self.values(roles["e"], layer)[0] if "e" in roles else attrs["e"][0]
            rec["shape"], rec["vector_dim"], rec["vector_axis"] = shape, dims[1], va
        return rec


def shared_layers(model: onnx.ModelProto) -> list[dict]:
    """Per-layer records of a shared model (empty list for a plain model), in layer order.

    Each record has ``name``, ``k`` (entries per codebook), ``index_bits``, ``encoding`` (the index source:
    ``planes``, ``uint8``, ``uint4`` or ``broadcast``), ``shape`` (the weight's), ``dtype``, ``index_tensor``
    (None for ``broadcast``), ``centroid_tensor``, ``index_bytes``, ``centroid_bytes``, ``index_count`` and how the
    weights share codebooks, as in :class:`~axcnn.rewrite.SharedWeight`: ``granularity``, ``codebooks``,
    ``vector_dim``, ``axis``, ``group_size`` (as written: at most the channel count) and ``vector_axis``. They are
    rebuilt from the decode graph (the metadata holds only names and K); files with the older verbose metadata
    are read as stored, completed with one codebook per layer.
    """
    meta = layers_meta(model)
    if meta is None:
        return []
    layers = compact_layers(meta)
    if layers is None:
        records = []
        for stored in meta:
            rec = {**stored}
            if "index_count" not in rec and "shape" in rec:
                rec["index_count"] = int(np.prod(rec["shape"], dtype=np.int64))
            records.append({**rec, **{k: v for k, v in RECORD_DEFAULTS.items() if k not in rec}})
        return records
    graph = Graph(model)
    return [graph.record(name, k) for name, k in layers]
