"""Rewrite an ONNX model so that clustered weights are stored as (bit-packed) indices plus centroids.

The written model runs on stock onnxruntime (CPU): every shared weight is rebuilt by a small decode
subgraph made of standard ONNX ops whose inputs are all initializers, so onnxruntime's constant
folding (any graph optimisation level >= BASIC) evaluates it once when the session is created and
inference costs nothing extra. The final decode node outputs the original weight name, so the nodes
that consume the weight are untouched.

Encodings (``n`` weights, ``K`` centroids, ``b = ceil(log2 K)`` index bits, ``opset`` = default-domain
opset of the model):

``broadcast`` (K == 1)
    ``Expand(centroids[1], shape)`` (``Reshape(centroids, [])`` for a 0-d weight); no index tensor.
``uint8`` (b == 8)
    uint8 index tensor of the weight's shape -> ``Cast(int32)`` -> ``Gather(centroids, idx)``.
``uint4`` (b == 4, opset >= 21, IR >= 10)
    ONNX ``UINT4`` index tensor (two indices per byte) -> ``Cast(int32)`` -> ``Gather``. onnxruntime
    CPU (1.23+) has a uint4 ``Cast`` kernel and folds it.
``planes`` (every other case)
    One uint8 tensor ``q`` of shape ``[m, 1, b]`` with ``m = ceil(n / 8)``: bit ``j`` of index number
    ``8 t + r`` (flat C order, ``r`` in 0..7) is bit ``r`` of byte ``q[t, 0, j]``. Decode::

        x = Cast(q, int32)                  # [m, 1, b]
        s = Div(x, P)   P = [[1],[2],..,[128]] int32 [8, 1]  -> [m, 8, b]  (x >> r)
        t = Mod(s, 2)                       # bit r of plane j   (opset < 10: s - 2 * Div(s, 2))
        i = MatMul(t, W)  W = [[1],[2],..,[2^(b-1)]] int32 [b, 1] -> [m, 8, 1]
                                            # (opset 8, where MatMul has no int32: ReduceSum(Mul(t, W')))
        i = Reshape(i, shape)               # if n % 8 != 0: Reshape([-1]) -> Slice(0, n) -> Reshape(shape)
        w = Gather(centroids, i)

    ``Div``/``Mod``/``Mul``/``Sub``/``ReduceSum`` have int32 kernels in every opset used here and
    ``MatMul`` has one from opset 9 (onnxruntime CPU implements all of them), so the arithmetic is
    done in int32; ``Gather`` takes int32 indices. Index bytes are ``m * b <= n * b / 8 + b``.

Helper constants (``P``, the scalar 2, the bit-weight columns, Slice/Reshape constants) are stored once
per model and shared by all layers. New names start with a prefix (``ax`` unless that collides):
``ax{i}.q`` indices, ``ax{i}.c`` centroids, ``ax{i}.s`` shape, ``ax{i}.{j}`` intermediates; decode
nodes are named ``axcnn/{i}/{j}`` (layer ``i``, node ``j``). The per-layer records live in
``model.metadata_props["axcnn.layers"]``. For IR < 4 models (where every initializer must also be a graph
input) the new tensors are listed as graph inputs too; onnxruntime treats them as constants at IR < 4.

Costs: about 300 bytes of graph protobuf per ``planes`` layer (~100 for ``uint8``/``uint4``/``broadcast``)
plus ~200 bytes of JSON metadata, and ~60 bytes of shared helpers per model. While the session folds a
``planes`` layer, onnxruntime holds int32 intermediates of ``4 * n * b`` bytes (about ``b`` times the dense
float32 weight), freed once folding is done. Folding needs graph optimisations enabled (ORT_ENABLE_BASIC or
higher); with ORT_DISABLE_ALL the decode would run on every inference.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from axcnn.errors import AxcnnError

logger = logging.getLogger(__name__)

__all__ = [
    "LAYERS_KEY",
    "SharedWeight",
    "StoredLayer",
    "decode",
    "expand",
    "is_shared_model",
    "replace_weights",
    "share_weights",
    "shared_layers",
    "verify",
    "weight_arrays",
    "write_model",
]

LAYERS_KEY = "axcnn.layers"
"""metadata_props key holding the JSON list of per-layer records."""

METADATA_PREFIX = "axcnn."
"""Metadata keys with this prefix are removed by :func:`expand`."""

NODE_PREFIX = "axcnn/"
"""Every decode node's name starts with this."""

_MIN_OPSET = 8
_MAX_PROTO_BYTES = 2**31 - 1


# --------------------------------------------------------------------------------------------------
# data classes


@dataclass(frozen=True, eq=False)
class SharedWeight:
    """A clustering of one weight tensor: ``K`` centroids and one index per weight.

    ``name`` is the weight's tensor name (an initializer, or the output of a ``Constant`` node).
    ``centroids`` has shape ``[K]`` and the weight's dtype (a bfloat16 weight may also give uint16
    bit patterns). ``indices`` is an integer array with the weight's shape and values in ``[0, K)``.
    """

    name: str
    centroids: np.ndarray
    indices: np.ndarray

    def __post_init__(self) -> None:
        centroids = np.asarray(self.centroids)
        indices = np.asarray(self.indices)
        if centroids.ndim != 1 or centroids.size == 0:
            raise ValueError(f"centroids of {self.name!r} must be non-empty and 1-D, not {centroids.shape}")
        if not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"indices of {self.name!r} must be integers, got {indices.dtype}")
        object.__setattr__(self, "centroids", centroids)
        object.__setattr__(self, "indices", indices)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def dense(self) -> np.ndarray:
        """The clustered weight ``centroids[indices]``."""
        return self.centroids[self.indices]


@dataclass(frozen=True)
class StoredLayer:
    """What one shared layer really takes in the file."""

    name: str
    k: int
    index_bits: int
    encoding: str  # "planes" | "uint8" | "uint4" | "broadcast"
    index_bytes: int
    centroid_bytes: int

    @property
    def stored_bytes(self) -> int:
        return self.index_bytes + self.centroid_bytes


# --------------------------------------------------------------------------------------------------
# small helpers


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise AxcnnError("the model imports no default-domain (ai.onnx) opset")


def _op_ok(op: str, opset: int, type_str: str | None = None) -> bool:
    """Whether ``op`` exists at ``opset`` and (if given) accepts ``type_str`` for its first type variable."""
    if not onnx.defs.has(op, opset):
        return False
    if type_str is None:
        return True
    schema = onnx.defs.get_schema(op, opset)
    return type_str in schema.type_constraints[0].allowed_type_strs


def _index_bits(k: int) -> int:
    return int(k - 1).bit_length() if k > 1 else 0


def _is_external(t: TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL


def _tensor_array(t: TensorProto, what: str) -> np.ndarray:
    if _is_external(t):
        raise AxcnnError(
            f"{what} {t.name!r} has its data in an external file that is not loaded; "
            "load the model with its external data first"
        )
    return numpy_helper.to_array(t)


def _dtype_name(elem_type: int) -> str:
    return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical (NaN-safe) comparison of two arrays of the same dtype and shape."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def _as_dtype(arr: np.ndarray, elem_type: int, what: str) -> np.ndarray:
    """``arr`` viewed as the numpy dtype of ``elem_type``; ValueError when it is another dtype."""
    want = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    arr = np.asarray(arr)
    if arr.dtype == want:
        return arr
    if elem_type == TensorProto.BFLOAT16 and arr.dtype == np.uint16:
        return arr.view(ml_dtypes.bfloat16)
    raise ValueError(f"{what} has dtype {arr.dtype}, expected {want}")


class _Weights:
    """Locates weights (initializers and Constant-node outputs) of a model's main graph by name."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.inits = {t.name: i for i, t in enumerate(graph.initializer)}
        self.consts: dict[str, int] = {}
        for i, node in enumerate(graph.node):
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
                self.consts[node.output[0]] = i

    def __contains__(self, name: str) -> bool:
        return name in self.inits or name in self.consts

    def tensor(self, name: str) -> TensorProto:
        """The TensorProto holding ``name`` (for a Constant node, built from its value attribute)."""
        if name in self.inits:
            return self.graph.initializer[self.inits[name]]
        node = self.graph.node[self.consts[name]]
        for attr in node.attribute:
            if attr.name == "value":
                return attr.t
            if attr.name == "value_float":
                return numpy_helper.from_array(np.array(attr.f, dtype=np.float32), name)
            if attr.name == "value_floats":
                return numpy_helper.from_array(np.array(attr.floats, dtype=np.float32), name)
            if attr.name == "value_int":
                return numpy_helper.from_array(np.array(attr.i, dtype=np.int64), name)
            if attr.name == "value_ints":
                return numpy_helper.from_array(np.array(attr.ints, dtype=np.int64), name)
        raise AxcnnError(f"Constant node producing {name!r} has no numeric dense value")

    def array(self, name: str) -> np.ndarray:
        return _tensor_array(self.tensor(name), "weight")

    def set(self, name: str, arr: np.ndarray) -> None:
        tensor = numpy_helper.from_array(arr, name)
        if name in self.inits:
            self.graph.initializer[self.inits[name]].CopyFrom(tensor)
            return
        node = self.graph.node[self.consts[name]]
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", tensor))


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
# bit packing


_UINT4 = "tensor(uint4)"


def _powers(count: int) -> np.ndarray:
    """int32 ``[1, 2, 4, ..., 2**(count-1)]``."""
    return np.left_shift(np.int32(1), np.arange(count, dtype=np.int32))


def _int64_tensor(name: str, values: Sequence[int]) -> TensorProto:
    """A small 1-D int64 tensor stored as varints (smaller than raw_data for small values)."""
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], [int(v) for v in values])


def _pack_planes(indices: np.ndarray, bits: int) -> np.ndarray:
    """Pack flat indices into a uint8 ``[m, 1, bits]`` plane tensor (see module docstring)."""
    flat = indices.reshape(-1).astype(np.int64)
    n = flat.size
    m = -(-n // 8)
    padded = np.zeros(8 * m, dtype=np.int64)
    padded[:n] = flat
    rows = padded.reshape(m, 8)
    q = np.empty((m, 1, bits), dtype=np.uint8)
    for j in range(bits):
        plane = ((rows >> j) & 1).astype(np.uint8)
        q[:, 0, j] = np.packbits(plane, axis=1, bitorder="little")[:, 0]
    return q


class _Builder:
    """Accumulates the decode nodes / initializers of one model."""

    def __init__(self, prefix: str, opset: int, ir_version: int):
        self.prefix = prefix
        self.opset = opset
        self.ir_version = ir_version
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._helpers: dict[str, str] = {}

    def helper_const(self, key: str, make) -> str:
        name = f"{self.prefix}.{key}"
        if key not in self._helpers:
            value = make()
            tensor = helper.make_tensor(
                name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape, value.ravel().tolist()
            )
            self.inits.append(tensor)
            self._helpers[key] = name
        return name

    def layer(self, i: int, sw: SharedWeight, shape: tuple[int, ...], elem_type: int) -> StoredLayer:
        p = f"{self.prefix}{i}"
        k = sw.k
        bits = _index_bits(k)
        n = int(np.prod(shape, dtype=np.int64))
        values = _as_dtype(sw.centroids, elem_type, f"centroids of {sw.name!r}")
        centroids = numpy_helper.from_array(values, f"{p}.c")
        self.inits.append(centroids)
        count = [0]

        def node(op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
            j = count[0]
            count[0] += 1
            out = output if output is not None else f"{p}.{j}"
            self.nodes.append(helper.make_node(op, inputs, [out], name=f"{NODE_PREFIX}{i}/{j}", **attrs))
            return out

        def shape_const() -> str:
            self.inits.append(_int64_tensor(f"{p}.s", shape))
            return f"{p}.s"

        if k == 1:
            # Expand broadcasts [1] against the shape, so a 0-d weight needs a Reshape to [] instead
            node("Expand" if shape else "Reshape", [centroids.name, shape_const()], sw.name)
            return StoredLayer(sw.name, k, 0, "broadcast", 0, len(centroids.raw_data))

        idx = sw.indices
        if bits == 8:
            q = numpy_helper.from_array(idx.astype(np.uint8), f"{p}.q")
            encoding = "uint8"
        elif bits == 4 and self.opset >= 21 and self.ir_version >= 10 and _op_ok("Cast", self.opset, _UINT4):
            q = numpy_helper.from_array(idx.astype(ml_dtypes.uint4), f"{p}.q")
            encoding = "uint4"
        else:
            q = numpy_helper.from_array(_pack_planes(idx, bits), f"{p}.q")
            encoding = "planes"
        self.inits.append(q)
        x = node("Cast", [q.name], to=TensorProto.INT32)
        if encoding == "planes":
            powers = self.helper_const("p", lambda: _powers(8).reshape(8, 1))
            two = self.helper_const("2", lambda: np.array(2, dtype=np.int32))
            s = node("Div", [x, powers])
            if self.opset >= 10:
                t = node("Mod", [s, two])
            else:
                t = node("Sub", [s, node("Mul", [node("Div", [s, two]), two])])
            if _op_ok("MatMul", self.opset, "tensor(int32)"):
                col = self.helper_const(f"w{bits}", lambda: _powers(bits).reshape(bits, 1))
                x = node("MatMul", [t, col])
            else:
                vec = self.helper_const(f"v{bits}", lambda: _powers(bits))
                x = node("ReduceSum", [node("Mul", [t, vec])], axes=[2], keepdims=1)
            if n % 8:
                flat = self.helper_const("f", lambda: np.array([-1], dtype=np.int64))
                x = node("Reshape", [x, flat])
                if self.opset >= 10:
                    zero = self.helper_const("0", lambda: np.array([0], dtype=np.int64))
                    self.inits.append(_int64_tensor(f"{p}.n", [n]))
                    x = node("Slice", [x, zero, f"{p}.n"])
                else:
                    x = node("Slice", [x], starts=[0], ends=[n])
            x = node("Reshape", [x, shape_const()])
        node("Gather", [centroids.name, x], sw.name)
        return StoredLayer(sw.name, k, bits, encoding, len(q.raw_data), len(centroids.raw_data))


# --------------------------------------------------------------------------------------------------
# public API


def weight_arrays(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Current values of initializers / Constant-node outputs (or decoded shared layers) by name."""
    weights = _Weights(model.graph)
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


def replace_weights(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with the named initializers / Constant values replaced densely.

    Each new array must have the weight's dtype and shape (ValueError otherwise); a name that is not a
    weight of the main graph raises AxcnnError.
    """
    out = _copy(model)
    weights = _Weights(out.graph)
    for name, arr in arrays.items():
        if name not in weights:
            raise AxcnnError(f"no initializer or Constant node named {name!r} in the model")
        old = weights.tensor(name)
        new = _as_dtype(np.asarray(arr), old.data_type, f"replacement for {name!r}")
        if tuple(new.shape) != tuple(old.dims):
            raise ValueError(f"replacement for {name!r} has shape {new.shape}, expected {tuple(old.dims)}")
        weights.set(name, new)
    return out


def share_weights(
    model: onnx.ModelProto,
    shared: Sequence[SharedWeight],
    metadata: Mapping[str, str] | None = None,
) -> tuple[onnx.ModelProto, list[StoredLayer]]:
    """Write ``shared`` into a copy of ``model`` as index + centroid tensors with a decode subgraph.

    Returns the new model and what each layer takes in the file. The input model is not modified.
    ``metadata`` entries are merged into ``metadata_props`` (keys prefixed ``axcnn.`` are dropped again
    by :func:`expand`). Raises AxcnnError for unknown weight names, too old opsets or an already shared
    model, ValueError when a clustering does not fit its weight (dtype, shape, index range).
    """
    opset = _default_opset(model)
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

    out = _copy(model)
    graph = out.graph
    weights = _Weights(graph)
    builder = _Builder(_pick_prefix(_all_names(model)), opset, int(model.ir_version))
    stored: list[StoredLayer] = []
    records: list[dict] = []
    drop_inits: set[int] = set()
    drop_nodes: set[int] = set()
    for i, sw in enumerate(shared):
        if sw.name not in weights:
            raise AxcnnError(f"no initializer or Constant node named {sw.name!r} in the model")
        tensor = weights.tensor(sw.name)
        if _is_external(tensor):
            raise AxcnnError(f"weight {sw.name!r} has unloaded external data; load the model with its data")
        elem_type = int(tensor.data_type)
        shape = tuple(int(d) for d in tensor.dims)
        if tuple(sw.indices.shape) != shape:
            raise ValueError(f"indices of {sw.name!r} have shape {sw.indices.shape}, expected {shape}")
        if sw.indices.size == 0:
            raise AxcnnError(f"weight {sw.name!r} is empty")
        if int(sw.indices.min()) < 0 or int(sw.indices.max()) >= sw.k:
            raise ValueError(f"indices of {sw.name!r} are outside [0, {sw.k})")
        if sw.k > 2**31 - 1:
            raise ValueError(f"too many centroids for {sw.name!r}")
        final_op = "Gather" if sw.k > 1 else "Expand" if shape else "Reshape"
        if not _op_ok(final_op, opset, _schema_type(elem_type)):
            raise AxcnnError(
                f"{final_op} does not accept {_dtype_name(elem_type)} at opset {opset} ({sw.name!r})"
            )
        layer = builder.layer(i, sw, shape, elem_type)
        stored.append(layer)
        records.append(
            {
                "name": sw.name,
                "k": layer.k,
                "index_bits": layer.index_bits,
                "encoding": layer.encoding,
                "shape": list(shape),
                "dtype": _dtype_name(elem_type),
                "index_tensor": None if layer.encoding == "broadcast" else f"{builder.prefix}{i}.q",
                "centroid_tensor": f"{builder.prefix}{i}.c",
                "index_bytes": layer.index_bytes,
                "centroid_bytes": layer.centroid_bytes,
            }
        )
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

    metadata[LAYERS_KEY] = json.dumps(records, separators=(",", ":"))
    _merge_metadata(out, metadata)
    return out, stored


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
    return f"tensor({_dtype_name(elem_type)})"


def _merge_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = str(value)
        else:
            entry = model.metadata_props.add()
            entry.key = str(key)
            entry.value = str(value)
            existing[key] = entry


def is_shared_model(model: onnx.ModelProto) -> bool:
    """Whether ``model`` was written by :func:`share_weights` (has the ``axcnn.layers`` metadata)."""
    return any(p.key == LAYERS_KEY for p in model.metadata_props)


def shared_layers(model: onnx.ModelProto) -> list[dict]:
    """Per-layer records stored by :func:`share_weights` (empty list for a plain model)."""
    for p in model.metadata_props:
        if p.key == LAYERS_KEY:
            try:
                records = json.loads(p.value)
            except json.JSONDecodeError as exc:
                raise AxcnnError(f"the model's {LAYERS_KEY} metadata is not valid JSON: {exc}") from exc
            if not isinstance(records, list) or not all(isinstance(r, dict) and "name" in r for r in records):
                raise AxcnnError(f"the model's {LAYERS_KEY} metadata is not a list of layer records")
            return records
    return []


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


def _decode_graph(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], set[int], set[str]]:
    """Decoded weights by name, indices of the decode nodes, names of the initializers they read."""
    records = shared_layers(model)
    graph = model.graph
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for o in node.output:
            producer[o] = i
    inits = {t.name: t for t in graph.initializer}
    values: dict[str, np.ndarray] = {}
    used_nodes: set[int] = set()
    used_inits: set[str] = set()

    def value(name: str) -> np.ndarray:
        if name in values:
            return values[name]
        if name in inits:
            used_inits.add(name)
            values[name] = _tensor_array(inits[name], "decode tensor")
            return values[name]
        if name not in producer or not graph.node[producer[name]].name.startswith(NODE_PREFIX):
            raise AxcnnError(f"shared weight value {name!r} is not produced by an axcnn decode node")
        idx = producer[name]
        node = graph.node[idx]
        used_nodes.add(idx)
        out = _eval_node(node, [value(x) for x in node.input])
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
    """Evaluate every shared layer's decode subgraph in numpy (no onnxruntime) from the stored tensors."""
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
    tiny = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=ir_version)
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
        if not _same_bits(got, want) or (sw.name in at_runtime and not _same_bits(at_runtime[sw.name], want)):
            raise AxcnnError(f"decoded weights of layer {sw.name} differ from the clustered weights")


def expand(model: onnx.ModelProto) -> onnx.ModelProto:
    """A plain dense copy of a shared model: decoded weights back as initializers, no decode nodes,
    no decode-only initializers and no ``axcnn.*`` metadata."""
    out = _copy(model)
    if not is_shared_model(out):
        return out
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
    kept_meta = [p for p in out.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del out.metadata_props[:]
    out.metadata_props.extend(kept_meta)
    return out


# --------------------------------------------------------------------------------------------------
# writing


def _has_external(model: onnx.ModelProto) -> bool:
    return any(_is_external(t) for t in model.graph.initializer)


def _file_mode(path: Path) -> int:
    """Permission bits for a written file: those of the file it replaces, else rw-r--r--."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o644


def write_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False) -> int:
    """Write ``model`` to ``path`` atomically; return the bytes written (model file + external data file).

    With ``external_data=True`` the tensors (>= 1 KiB) go to ``<file name>.data`` beside the output,
    referenced by that bare relative file name. Nothing is left at ``path`` (or at the data file) when
    writing fails: files are written to a temporary place in the same folder and renamed into place.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise AxcnnError(f"output folder {str(folder)!r} does not exist")
    if _has_external(model):
        raise AxcnnError("the model references external data that is not loaded; load it before writing")
    if not external_data:
        if model.ByteSize() > _MAX_PROTO_BYTES:
            raise AxcnnError("the model is larger than 2 GB; write it with external data")
        data = model.SerializeToString()
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, _file_mode(path))  # mkstemp creates the file as rw-------
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        logger.debug("wrote %s (%d bytes)", path, len(data))
        return len(data)

    data_name = f"{path.name}.data"
    tmpdir = tempfile.mkdtemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        copy = _copy(model)
        tmp_model = os.path.join(tmpdir, path.name)
        onnx.save_model(
            copy,
            tmp_model,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        tmp_data = os.path.join(tmpdir, data_name)
        total = os.path.getsize(tmp_model)
        for tmp, final in ((tmp_model, path), (tmp_data, folder / data_name)):
            if os.path.exists(tmp):
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.chmod(tmp, _file_mode(final))
        if os.path.exists(tmp_data):
            total += os.path.getsize(tmp_data)
            os.replace(tmp_data, folder / data_name)
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    logger.debug("wrote %s with external data %s (%d bytes)", path, data_name, total)
    return total
