"""Read a weight-shared model back: per-layer records from the graph, the decoded weights, exact
verification against the clustering, and expansion back to a plain dense model."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from axcnn.errors import AxcnnError
from axcnn.rewrite.common import (
    FUNCTION_DOMAIN,
    LAYERS_KEY,
    METADATA_PREFIX,
    SharedWeight,
    Weights,
    compact_layers,
    copy_model,
    dtype_name,
    index_bits,
    is_decode_node,
    is_shared_model,
    layers_meta,
    same_bits,
    stored_bytes,
    tensor_array,
)


class _Graph:
    """Lookup tables of a shared model's main graph."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
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

    def roles(self, layer: str) -> dict[str, str]:
        """Index / centroid / shape tensor names (``q`` / ``c`` / ``s``) of one layer, read from its decode."""
        _, node = self.decode_node(layer)
        if node.domain == FUNCTION_DOMAIN:
            func = self.function(node)
            if len(func.input) != len(node.input):
                raise AxcnnError(f"decode call of layer {layer!r} does not match function {func.name}")
            return dict(zip(func.input, node.input, strict=True))
        roles = {"c": node.input[0]}
        if node.op_type in ("Expand", "Reshape"):  # inline broadcast
            roles["s"] = node.input[1]
            return roles
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
        return roles

    def record(self, layer: str, k_meta: int) -> dict:
        """The full per-layer record, rebuilt from the graph."""
        roles = self.roles(layer)
        c = self.init(roles["c"], layer)
        q = self.init(roles["q"], layer) if "q" in roles else None
        k = int(c.dims[0]) if len(c.dims) == 1 else -1
        if k != k_meta:
            raise AxcnnError(f"layer {layer!r}: {LAYERS_KEY} says K={k_meta}, the centroid tensor has {list(c.dims)}")
        bits = index_bits(k)
        if q is None:
            encoding = "broadcast"
        elif q.data_type == TensorProto.UINT4:
            encoding = "uint4"
        elif bits == 8:
            encoding = "uint8"
        else:
            encoding = "planes"
        if encoding in ("uint8", "uint4"):
            shape = [int(d) for d in q.dims]
        else:
            shape = [int(d) for d in tensor_array(self.init(roles["s"], layer), "shape tensor").reshape(-1)]
        return {
            "name": layer,
            "k": k,
            "index_bits": bits,
            "encoding": encoding,
            "shape": shape,
            "dtype": dtype_name(c.data_type),
            "index_tensor": None if q is None else q.name,
            "centroid_tensor": c.name,
            "index_bytes": 0 if q is None else stored_bytes(q),
            "centroid_bytes": stored_bytes(c),
        }

def shared_layers(model: onnx.ModelProto) -> list[dict]:
    """Per-layer records of a shared model (empty list for a plain model), in layer order.

    Each record has ``name``, ``k``, ``index_bits``, ``encoding``, ``shape``, ``dtype``, ``index_tensor``
    (None for ``broadcast``), ``centroid_tensor``, ``index_bytes`` and ``centroid_bytes``. They are rebuilt from
    the decode graph (the metadata holds only names and K); files with the older verbose metadata are read
    as stored.
    """
    meta = layers_meta(model)
    if meta is None:
        return []
    layers = compact_layers(meta)
    if layers is None:
        return meta
    graph = _Graph(model)
    return [graph.record(name, k) for name, k in layers]


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
# numpy evaluation of the decode subgraphs


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _reshape(x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    dims = [int(d) for d in shape]
    dims = [x.shape[j] if d == 0 else d for j, d in enumerate(dims)]
    return x.reshape(dims)


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ONNX integer Div: truncation toward zero."""
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q).astype(np.result_type(a, b))


def _eval_node(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    op = node.op_type
    if op == "Cast":
        return args[0].astype(helper.tensor_dtype_to_np_dtype(_attr(node, "to")))
    if op == "Div":
        return _int_div(args[0], args[1])
    if op == "Mod":
        if _attr(node, "fmod", 0):
            return np.fmod(args[0], args[1])
        return np.mod(args[0], args[1])
    if op == "Mul":
        return args[0] * args[1]
    if op == "Sub":
        return args[0] - args[1]
    if op == "MatMul":
        return np.matmul(args[0], args[1])
    if op == "ReduceSum":
        axes = _attr(node, "axes")
        if len(args) > 1:
            axes = args[1]
        axes = None if axes is None or len(axes) == 0 else tuple(int(a) for a in axes)
        return np.sum(args[0], axis=axes, keepdims=bool(_attr(node, "keepdims", 1))).astype(args[0].dtype)
    if op == "Reshape":
        return _reshape(args[0], args[1])
    if op == "Slice":
        if len(args) > 1:
            starts, ends = args[1], args[2]
            axes = args[3] if len(args) > 3 else range(len(starts))
        else:
            starts, ends = _attr(node, "starts"), _attr(node, "ends")
            axes = _attr(node, "axes") or range(len(starts))
        index = [slice(None)] * args[0].ndim
        for a, s, e in zip(axes, starts, ends, strict=True):
            index[int(a)] = slice(int(s), int(e))
        return args[0][tuple(index)]
    if op == "Gather":
        return np.take(args[0], args[1], axis=int(_attr(node, "axis", 0)))
    if op == "Expand":
        shape = np.broadcast_shapes(args[0].shape, tuple(int(d) for d in args[1]))
        return np.broadcast_to(args[0], shape).copy()
    raise AxcnnError(f"unexpected op {op} in the decode subgraph (node {node.name!r})")


def _eval_function(func: onnx.FunctionProto, call: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    """Evaluate a decode function's body for one call node."""
    if len(args) != len(func.input):
        raise AxcnnError(f"call of {func.name} has {len(args)} inputs, the function takes {len(func.input)}")
    env = dict(zip(func.input, args, strict=True))
    given = {a.name: a for a in call.attribute}
    for node in func.node:
        if node.domain not in ("", "ai.onnx"):
            raise AxcnnError(f"unexpected op {node.domain}.{node.op_type} in decode function {func.name}")
        if any(a.ref_attr_name for a in node.attribute):
            resolved = onnx.NodeProto()
            resolved.CopyFrom(node)
            del resolved.attribute[:]
            for a in node.attribute:
                if a.ref_attr_name and a.ref_attr_name not in given:
                    raise AxcnnError(f"call of {func.name} lacks attribute {a.ref_attr_name!r}")
                attr = resolved.attribute.add()
                attr.CopyFrom(given[a.ref_attr_name] if a.ref_attr_name else a)
                attr.name = a.name
            node = resolved
        if node.op_type == "Constant":
            env[node.output[0]] = numpy_helper.to_array(_attr(node, "value"))
        else:
            env[node.output[0]] = _eval_node(node, [env[x] for x in node.input])
    return env[func.output[0]]


def _decode_graph(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], set[int], set[str]]:
    """Decoded weights by name, indices of the decode nodes, names of the initializers they read."""
    records = shared_layers(model)
    index = _Graph(model)
    values: dict[str, np.ndarray] = {}
    used_nodes: set[int] = set()
    used_inits: set[str] = set()

    def value(name: str) -> np.ndarray:
        if name in values:
            return values[name]
        if name in index.inits:
            used_inits.add(name)
            values[name] = tensor_array(index.inits[name], "decode tensor")
            return values[name]
        idx, node = index.decode_node(name)
        used_nodes.add(idx)
        args = [value(x) for x in node.input]
        if node.domain == FUNCTION_DOMAIN:
            out = _eval_function(index.function(node), node, args)
        else:
            out = _eval_node(node, args)
        values[name] = out
        return out

    decoded: dict[str, np.ndarray] = {}
    for rec in records:
        name = rec["name"]
        arr = value(name)
        shape = tuple(rec.get("shape", arr.shape))
        if arr.shape != shape or ("dtype" in rec and str(arr.dtype) != rec["dtype"]):
            raise AxcnnError(
                f"decoded weight {name!r} has shape {arr.shape} / dtype {arr.dtype}, "
                f"metadata says {shape} / {rec.get('dtype')}"
            )
        decoded[name] = arr
    return decoded, used_nodes, used_inits


def decode(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Evaluate every shared layer's decode (the call nodes' function bodies, or the inline decode nodes)
    in numpy (no onnxruntime) from the stored tensors."""
    return _decode_graph(model)[0]


def _decode_runtime(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Evaluate the decode subgraphs with onnxruntime CPU (a tiny model whose outputs are the weights).

    Layers whose dtype the onnxruntime Python API cannot return (bfloat16) are left out.
    """
    import onnxruntime as ort

    decoded, node_ids, init_names = _decode_graph(model)
    decoded = {name: arr for name, arr in decoded.items() if arr.dtype.kind in "fiub"}
    if not decoded:
        return {}
    graph = model.graph
    nodes = [graph.node[i] for i in sorted(node_ids)]
    inits = [t for t in graph.initializer if t.name in init_names]
    outputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
        for name, arr in decoded.items()
    ]
    sub = helper.make_graph(nodes, "axcnn_decode", [], outputs, inits)
    ir_version = max(int(model.ir_version), 4)
    functions = [f for f in model.functions if f.domain == FUNCTION_DOMAIN]
    tiny = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=ir_version, functions=functions)
    sess = ort.InferenceSession(tiny.SerializeToString(), providers=["CPUExecutionProvider"])
    results = sess.run(None, {})
    return dict(zip(decoded, results, strict=True))


def verify(model: onnx.ModelProto, shared: Sequence[SharedWeight], *, runtime: bool = False) -> None:
    """Raise AxcnnError unless every layer decodes bit-identically to ``sw.dense()``.

    The decode is evaluated in numpy; with ``runtime=True`` it is also run by onnxruntime CPU (except
    for bfloat16 layers, which the onnxruntime Python API cannot return).
    """
    decoded = decode(model)
    at_runtime = _decode_runtime(model) if runtime else {}
    for sw in shared:
        if sw.name not in decoded:
            raise AxcnnError(f"layer {sw.name} is not weight-shared in the model")
        want = sw.dense()
        got = decoded[sw.name]
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
    decoded, node_ids, init_names = _decode_graph(out)
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

