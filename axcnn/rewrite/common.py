"""What every part of :mod:`axcnn.rewrite` shares: the records, the names the format reserves, small tensor
helpers and the ``axcnn.layers`` metadata."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from axcnn.errors import AxcnnError

LAYERS_KEY = "axcnn.layers"
"""metadata_props key holding the JSON list of per-layer records."""

METADATA_PREFIX = "axcnn."
"""Metadata keys with this prefix are removed by :func:`expand`."""

NODE_PREFIX = "axcnn/"
"""Every inline decode node's name starts with this (IR < 4 models, and files written before functions)."""

FUNCTION_DOMAIN = "ai.axcnn"
"""Domain of the model-local decode functions (and of their call nodes)."""

FUNCTION_IR = 8
"""Model-local functions need IR >= 8."""


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


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise AxcnnError("the model imports no default-domain (ai.onnx) opset")


def op_ok(op: str, opset: int, type_str: str | None = None) -> bool:
    """Whether ``op`` exists at ``opset`` and (if given) accepts ``type_str`` for its first type variable."""
    if not onnx.defs.has(op, opset):
        return False
    if type_str is None:
        return True
    schema = onnx.defs.get_schema(op, opset)
    return type_str in schema.type_constraints[0].allowed_type_strs


def index_bits(k: int) -> int:
    return int(k - 1).bit_length() if k > 1 else 0


def is_external(t: TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL


def tensor_array(t: TensorProto, what: str) -> np.ndarray:
    if is_external(t):
        raise AxcnnError(
            f"{what} {t.name!r} has its data in an external file that is not loaded; "
            "load the model with its external data first"
        )
    return numpy_helper.to_array(t)


def dtype_name(elem_type: int) -> str:
    return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical (NaN-safe) comparison of two arrays of the same dtype and shape."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def as_dtype(arr: np.ndarray, elem_type: int, what: str) -> np.ndarray:
    """``arr`` viewed as the numpy dtype of ``elem_type``; ValueError when it is another dtype."""
    want = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    arr = np.asarray(arr)
    if arr.dtype == want:
        return arr
    if elem_type == TensorProto.BFLOAT16 and arr.dtype == np.uint16:
        return arr.view(ml_dtypes.bfloat16)
    raise ValueError(f"{what} has dtype {arr.dtype}, expected {want}")


class Weights:
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
        return tensor_array(self.tensor(name), "weight")

    def set(self, name: str, arr: np.ndarray) -> None:
        tensor = numpy_helper.from_array(arr, name)
        if name in self.inits:
            self.graph.initializer[self.inits[name]].CopyFrom(tensor)
            return
        node = self.graph.node[self.consts[name]]
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", tensor))



def merge_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = str(value)
        else:
            entry = model.metadata_props.add()
            entry.key = str(key)
            entry.value = str(value)
            existing[key] = entry


def layers_meta(model: onnx.ModelProto):
    """The parsed ``axcnn.layers`` JSON, or None for a plain model."""
    for p in model.metadata_props:
        if p.key == LAYERS_KEY:
            try:
                return json.loads(p.value)
            except json.JSONDecodeError as exc:
                raise AxcnnError(f"the model's {LAYERS_KEY} metadata is not valid JSON: {exc}") from exc
    return None


def compact_layers(meta) -> list[tuple[str, int]] | None:
    """``[(name, k), ...]`` of the compact metadata format, None for the old verbose one (list of records)."""
    if isinstance(meta, list) and all(isinstance(r, dict) and "name" in r for r in meta):
        return None
    layers = meta.get("layers") if isinstance(meta, dict) else None
    if not isinstance(layers, list) or not all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], int) for e in layers
    ):
        raise AxcnnError(f"the model's {LAYERS_KEY} metadata is neither a list of layer records nor a layer list")
    return [(name, k) for name, k in layers]


def is_decode_node(node: onnx.NodeProto) -> bool:
    """A call node of a decode function, or an inline decode node (IR < 4 models and older files)."""
    if node.domain == FUNCTION_DOMAIN:
        return True
    return node.domain in ("", "ai.onnx") and node.name.startswith(NODE_PREFIX)


def stored_bytes(t: TensorProto) -> int:
    """Bytes of a tensor's data as stored (raw bytes, or the length of its external data)."""
    if t.raw_data:
        return len(t.raw_data)
    if is_external(t):
        entries = {e.key: e.value for e in t.external_data}
        if "length" in entries:
            return int(entries["length"])
    count = int(np.prod(t.dims, dtype=np.int64))
    if t.data_type in (TensorProto.UINT4, TensorProto.INT4):
        return (count + 1) // 2
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize



def is_shared_model(model: onnx.ModelProto) -> bool:
    """Whether ``model`` was written by :func:`share_weights` (has the ``axcnn.layers`` metadata)."""
    return any(p.key == LAYERS_KEY for p in model.metadata_props)
