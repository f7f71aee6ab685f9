"""Share weights: replace each clustered weight of a model by its index and centroid tensors and a decode
(the recipes are in :mod:`axcnn.rewrite.encodings`), or replace weights densely."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from axcnn.errors import AxcnnError
from axcnn.rewrite.builder import Builder
from axcnn.rewrite.common import (
    FUNCTION_DOMAIN,
    FUNCTION_IR,
    LAYERS_KEY,
    SharedWeight,
    StoredLayer,
    Weights,
    as_dtype,
    copy_model,
    default_opset,
    dtype_name,
    is_external,
    is_shared_model,
    merge_metadata,
    op_ok,
)

logger = logging.getLogger(__name__)

_MIN_OPSET = 8


def _all_names(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()

    def walk(graph: onnx.GraphProto) -> None:
        names.update(t.name for t in graph.initializer)
        names.update(v.name for v in graph.input)
        names.update(v.name for v in graph.output)
        names.update(v.name for v in graph.value_info)
        for node in graph.node:
            names.update(node.input)
            names.update(node.output)
            names.add(node.name)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g)

    walk(model.graph)
    return names


def _pick_prefix(names: set[str]) -> str:
    prefix = "ax"
    while any(n.startswith(prefix) and n[len(prefix) : len(prefix) + 1] in set("0123456789.") for n in names):
        prefix += "_"
    return prefix


def replace_weights(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with the named initializers / Constant values replaced densely.

    Each new array must have the weight's dtype and shape (ValueError otherwise); a name that is not a
    weight of the main graph raises AxcnnError.
    """
    out = copy_model(model)
    weights = Weights(out.graph)
    for name, arr in arrays.items():
        if name not in weights:
            raise AxcnnError(f"no initializer or Constant node named {name!r} in the model")
        old = weights.tensor(name)
        new = as_dtype(np.asarray(arr), old.data_type, f"replacement for {name!r}")
        if tuple(new.shape) != tuple(old.dims):
            raise ValueError(f"replacement for {name!r} has shape {new.shape}, expected {tuple(old.dims)}")
        weights.set(name, new)
    return out



def share_weights(
    model: onnx.ModelProto,
    shared: Sequence[SharedWeight],
    metadata: Mapping[str, str] | None = None,
) -> tuple[onnx.ModelProto, list[StoredLayer]]:
    """Write ``shared`` into a copy of ``model`` as index + centroid tensors with an in-graph decode.

    Each layer is decoded by one call of a model-local ``ai.axcnn`` function (IR 4..7 is raised to 8 for
    them), or by inline decode nodes in an IR < 4 model (module docstring). Returns the new model and what
    each layer takes in the file. The input model is not modified.
    ``metadata`` entries are merged into ``metadata_props`` (keys prefixed ``axcnn.`` are dropped again
    by :func:`expand`). Raises AxcnnError for unknown weight names, too old opsets, an already shared
    model or one that already uses the ``ai.axcnn`` domain, ValueError when a clustering does not fit its
    weight (dtype, shape, index range).
    """
    opset = default_opset(model)
    if opset < _MIN_OPSET:
        raise AxcnnError(f"the model's opset {opset} is too old to rewrite (need opset >= {_MIN_OPSET})")
    if is_shared_model(model):
        raise AxcnnError("the model is already weight-shared; expand() it before sharing again")
    metadata = dict(metadata or {})
    if LAYERS_KEY in metadata:
        raise ValueError(f"metadata key {LAYERS_KEY!r} is reserved")
    names = [sw.name for sw in shared]
    if len(set(names)) != len(names):
        raise ValueError("a weight is listed more than once")

    ir_version = int(model.ir_version)
    use_functions = ir_version >= 4
    if use_functions and (
        any(o.domain == FUNCTION_DOMAIN for o in model.opset_import)
        or any(f.domain == FUNCTION_DOMAIN for f in model.functions)
    ):
        raise AxcnnError(f"the model already uses the function domain {FUNCTION_DOMAIN!r}")

    out = copy_model(model)
    graph = out.graph
    weights = Weights(graph)
    builder = Builder(_pick_prefix(_all_names(model)), opset, ir_version, use_functions)
    stored: list[StoredLayer] = []
    drop_inits: set[int] = set()
    drop_nodes: set[int] = set()
    for i, sw in enumerate(shared):
        if sw.name not in weights:
            raise AxcnnError(f"no initializer or Constant node named {sw.name!r} in the model")
        tensor = weights.tensor(sw.name)
        if is_external(tensor):
            raise AxcnnError(f"weight {sw.name!r} has unloaded external data; load the model with its data")
        elem_type = int(tensor.data_type)
        shape = tuple(int(d) for d in tensor.dims)
        want = sw.index_shape(shape)
        if tuple(sw.indices.shape) != want:
            raise ValueError(f"indices of {sw.name!r} have shape {sw.indices.shape}, expected {want}")
        if sw.indices.size == 0:
            raise AxcnnError(f"weight {sw.name!r} is empty")
        if int(sw.indices.min()) < 0 or int(sw.indices.max()) >= sw.k:
            raise ValueError(f"indices of {sw.name!r} are outside [0, {sw.k})")
        if sw.k > 2**31 - 1:
            raise ValueError(f"too many centroids for {sw.name!r}")
        for op in _value_ops(sw, shape):
            if not op_ok(op, opset, _schema_type(elem_type)):
                raise AxcnnError(f"{op} does not accept {dtype_name(elem_type)} at opset {opset} ({sw.name!r})")
        layer = builder.layer(i, sw, shape, elem_type)
        stored.append(layer)
        if sw.name in weights.inits:
            drop_inits.add(weights.inits[sw.name])
        else:
            drop_nodes.add(weights.consts[sw.name])
        logger.debug(
            "shared %s: K=%d, %d bits, %s, %d+%d bytes",
            sw.name,
            layer.k,
            layer.index_bits,
            layer.encoding,
            layer.index_bytes,
            layer.centroid_bytes,
        )

    shared_names = set(names)
    kept_inits = [t for j, t in enumerate(graph.initializer) if j not in drop_inits]
    kept_nodes = [nd for j, nd in enumerate(graph.node) if j not in drop_nodes]
    kept_inputs = [v for v in graph.input if v.name not in shared_names]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    graph.initializer.extend(builder.inits)
    del graph.node[:]
    graph.node.extend(builder.nodes)  # decode nodes read only initializers: safe to put first
    graph.node.extend(kept_nodes)
    del graph.input[:]
    graph.input.extend(kept_inputs)
    if out.ir_version < 4:  # IR < 4 requires every initializer to be a graph input
        graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in builder.inits
        )

    layers: dict = {"layers": [[layer.name, layer.k] for layer in stored]}
    if builder.functions:
        out.functions.extend(builder.functions.values())
        out.opset_import.append(helper.make_opsetid(FUNCTION_DOMAIN, 1))
        if ir_version < FUNCTION_IR:
            logger.info(
                "raising the IR version from %d to %d for the decode functions (no semantic change)",
                ir_version,
                FUNCTION_IR,
            )
            out.ir_version = FUNCTION_IR
            layers["ir"] = ir_version
    metadata[LAYERS_KEY] = json.dumps(layers, separators=(",", ":"))
    merge_metadata(out, metadata)
    return out, stored


def _value_ops(sw: SharedWeight, shape: tuple[int, ...]) -> list[str]:
    """The decode ops that take the weight's dtype (the centroids): they must accept it at the model's opset."""
    if sw.vector_dim > 1:
        padded = shape[sw.vector_axis] % sw.vector_dim != 0
        return ["Gather", "Transpose", "Reshape"] + (["Slice"] if padded else [])
    if sw.granularity != "layer":
        return ["Reshape", "Gather"]
    return ["Gather" if sw.k > 1 else "Expand" if shape else "Reshape"]


def _schema_type(elem_type: int) -> str:
    """ONNX schema type string, e.g. ``tensor(float)`` for FLOAT."""
    names = {
        TensorProto.FLOAT: "float",
        TensorProto.DOUBLE: "double",
        TensorProto.FLOAT16: "float16",
        TensorProto.BFLOAT16: "bfloat16",
    }
    if elem_type in names:
        return f"tensor({names[elem_type]})"
    return f"tensor({dtype_name(elem_type)})"

