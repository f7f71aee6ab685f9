"""Read a weight-shared model back: the decoded weights (the records of :mod:`axcnn.rewrite.records` say which
tensors each decode reads), exact verification against the clustering, and expansion back to a plain dense
model."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from axcnn.errors import AxcnnError
from axcnn.rewrite.common import (
    FUNCTION_DOMAIN,
    METADATA_PREFIX,
    SharedWeight,
    Weights,
    copy_model,
    is_shared_model,
    layers_meta,
    same_bits,
    tensor_array,
)
from axcnn.rewrite.records import Graph, shared_layers


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name consumed by a node (including nested subgraphs) or exposed as a graph output."""
    used: set[str] = {v.name for v in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                used |= _used_names(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    used |= _used_names(g)
    return used



# --------------------------------------------------------------------------------------------------
# evaluation of the decode subgraph


@dataclass(frozen=True)
class _Decode:
    """The decode part of a shared model, cut out as a model of its own whose outputs are the layers."""

    records: list[dict]
    node_ids: set[int]  # the decode nodes of the main graph
    init_names: set[str]  # the initializers they read
    model: onnx.ModelProto  # those nodes and initializers, the decode functions; outputs = the layer names


def _elem_type(dtype: str) -> int:
    return TensorProto.BFLOAT16 if dtype == "bfloat16" else helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _decode_part(model: onnx.ModelProto) -> _Decode:
    records = shared_layers(model)
    index = Graph(model)
    node_ids: set[int] = set()
    init_names: set[str] = set()
    todo = [rec["name"] for rec in records]
    seen: set[str] = set()
    while todo:  # walk back from each layer to the initializers its decode reads
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in index.inits:
            init_names.add(name)
            continue
        idx, node = index.decode_node(name)
        node_ids.add(idx)
        todo.extend(x for x in node.input if x)
    graph = model.graph
    outputs = [
        helper.make_tensor_value_info(r["name"], _elem_type(r["dtype"]), r["shape"])
        if "dtype" in r and "shape" in r
        else helper.make_empty_tensor_value_info(r["name"])
        for r in records
    ]
    sub = helper.make_graph(
        [graph.node[i] for i in sorted(node_ids)],
        "axcnn_decode",
        [],
        outputs,
        [t for t in graph.initializer if t.name in init_names],
    )
    functions = [f for f in model.functions if f.domain == FUNCTION_DOMAIN]
    tiny = helper.make_model(
        sub, opset_imports=list(model.opset_import), ir_version=max(int(model.ir_version), 4), functions=functions
    )
    return _Decode(records, node_ids, init_names, tiny)


def _evaluate(part: _Decode) -> dict[str, np.ndarray]:
    """The decoded layers, by onnx's reference evaluator (numpy), checked against the records.

    A hand-written evaluator of the decode ops was used before; it duplicated the semantics that onnx's
    reference evaluator defines, for little speed: verify() of cifar10_resnet56 (56 layers, K=16) took
    0.078-0.211 s (min of 15 runs, two runs on a loaded 2-core machine) by hand against 0.179-0.274 s here.
    """
    from onnx.inliner import inline_local_functions
    from onnx.reference import ReferenceEvaluator

    for t in part.model.graph.initializer:
        tensor_array(t, "decode tensor")  # a clear error for unloaded external data
    names = [rec["name"] for rec in part.records]
    if not names:
        return {}
    try:
        tiny = part.model
        if any(node.attribute for node in tiny.graph.node if node.domain == FUNCTION_DOMAIN):
            # the evaluator's Slice-1 cannot take ``ends`` from a call attribute (onnx 1.23): inline the calls
            # then (only then: evaluating the functions themselves took 2/3 of the time on cifar10_resnet56)
            tiny = inline_local_functions(tiny)
        results = ReferenceEvaluator(tiny).run(None, {})
    except Exception as exc:
        raise AxcnnError(f"the weight-shared model does not decode ({type(exc).__name__}: {exc})") from exc
    decoded: dict[str, np.ndarray] = {}
    for rec, arr in zip(part.records, results, strict=True):
        arr = np.asarray(arr)
        shape, dtype = tuple(rec.get("shape", arr.shape)), rec.get("dtype", str(arr.dtype))
        if arr.shape != shape or str(arr.dtype) != dtype:
            raise AxcnnError(
                f"decoded weight {rec['name']!r} has shape {arr.shape} / dtype {arr.dtype}, "
                f"the records say {shape} / {dtype}"
            )
        decoded[rec["name"]] = arr
    return decoded


def decode(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Evaluate every shared layer's decode (the call nodes' function bodies, or the inline decode nodes)
    from the stored tensors, with onnx's reference evaluator (numpy, no onnxruntime)."""
    return _evaluate(_decode_part(model))


def _decode_runtime(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Evaluate the decode subgraph with onnxruntime CPU.

    Layers whose dtype the onnxruntime Python API cannot return (bfloat16) are left out.
    """
    import onnxruntime as ort

    part = _decode_part(model)
    tiny = part.model
    kept = [v for v in tiny.graph.output if v.type.tensor_type.elem_type != TensorProto.BFLOAT16]
    if not kept:
        return {}
    del tiny.graph.output[:]
    tiny.graph.output.extend(kept)
    sess = ort.InferenceSession(tiny.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip((v.name for v in kept), sess.run(None, {}), strict=True))


def verify(model: onnx.ModelProto, shared: Sequence[SharedWeight], *, runtime: bool = False) -> None:
    """Raise AxcnnError unless every layer decodes bit-identically to ``sw.dense()`` (same shape and dtype).

    The decode is evaluated in numpy; with ``runtime=True`` it is also run by onnxruntime CPU (except
    for bfloat16 layers, which the onnxruntime Python API cannot return).
    """
    decoded = decode(model)
    at_runtime = _decode_runtime(model) if runtime else {}
    for sw in shared:
        if sw.name not in decoded:
            raise AxcnnError(f"layer {sw.name} is not weight-shared in the model")
        got = decoded[sw.name]
        want = sw.dense(got.shape)  # the shape drops the padding of a last vector
        if want.dtype != got.dtype and want.dtype == np.uint16 and got.dtype == ml_dtypes.bfloat16:
            want = want.view(ml_dtypes.bfloat16)
        if not same_bits(got, want) or (sw.name in at_runtime and not same_bits(at_runtime[sw.name], want)):
            raise AxcnnError(f"decoded weights of layer {sw.name} differ from the clustered weights")


def expand(model: onnx.ModelProto) -> onnx.ModelProto:
    """A plain dense copy of a shared model: decoded weights back as initializers, no decode nodes, decode
    functions or decode-only initializers, and no ``axcnn.*`` metadata.

    When :func:`share_weights` raised the IR version to 8 for the decode functions, the original IR version
    (recorded in the metadata) is restored, unless the model has other functions.
    """
    out = copy_model(model)
    if not is_shared_model(out):
        return out
    meta = layers_meta(out)
    part = _decode_part(out)
    decoded, node_ids, init_names = _evaluate(part), part.node_ids, part.init_names
    graph = out.graph
    kept_nodes = [nd for i, nd in enumerate(graph.node) if i not in node_ids]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    still_used = _used_names(graph)
    drop = {n for n in init_names if n not in still_used}
    kept_inits = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    graph.initializer.extend(numpy_helper.from_array(arr, name) for name, arr in decoded.items())
    kept_inputs = [v for v in graph.input if v.name not in drop]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    if out.ir_version < 4:
        graph.input.extend(
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
            for name, arr in decoded.items()
        )
    kept_functions = [f for f in out.functions if f.domain != FUNCTION_DOMAIN]
    del out.functions[:]
    out.functions.extend(kept_functions)
    kept_opsets = [o for o in out.opset_import if o.domain != FUNCTION_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(kept_opsets)
    original_ir = meta.get("ir") if isinstance(meta, dict) else None
    if isinstance(original_ir, int) and not out.functions:
        out.ir_version = original_ir
    kept_meta = [p for p in out.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del out.metadata_props[:]
    out.metadata_props.extend(kept_meta)
    return out



def weight_arrays(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Current values of initializers / Constant-node outputs (or decoded shared layers) by name."""
    weights = Weights(model.graph)
    out: dict[str, np.ndarray] = {}
    decoded: dict[str, np.ndarray] | None = None
    for name in names:
        if name in weights:
            out[name] = weights.array(name)
            continue
        if decoded is None:
            decoded = decode(model) if is_shared_model(model) else {}
        if name not in decoded:
            raise AxcnnError(f"no initializer or Constant node named {name!r} in the model")
        out[name] = decoded[name]
    return out

