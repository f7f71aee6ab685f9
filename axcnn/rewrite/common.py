"""What every part of :mod:`axcnn.rewrite` shares: the records, the names the format reserves, small tensor
helpers and the ``axcnn.layers`` metadata."""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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


GRANULARITIES = ("layer", "channel", "kernel")
"""Which weights share one codebook: all of the layer's, those of a group of output channels, those of a kernel."""


def _as_count(owner: str, field: str, value, low: int) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{field} of {owner!r} must be an integer >= {low}, not {value!r}") from None
    if number < low:
        raise ValueError(f"{field} of {owner!r} must be an integer >= {low}, not {number}")
    return number


def _as_axis(owner: str, field: str, value, rank: int) -> int:
    try:
        axis = operator.index(value)
    except TypeError:
        axis = None
    if axis is None or not -rank <= axis < rank:
        raise ValueError(f"{field} of {owner!r} must be an axis in [{-rank}, {rank}) of its {rank}-D indices, "
                         f"not {value!r}")
    return axis % rank


def eq1_bits(index_count: int, k: int, bits: int, *, codebooks: int = 1, vector_dim: int = 1) -> int:
    """Storage of a shared layer in bits by Eq. 1 of Dupuis et al., generalised to several codebooks and to vectors:
    ``index_count * ceil(log2 K) + codebooks * K * vector_dim * bits`` (``bits`` = bits of one weight)."""
    return index_count * index_bits(k) + codebooks * k * vector_dim * bits


@dataclass(frozen=True, eq=False)
class SharedWeight:
    """A clustering of one weight tensor: codebooks of ``K`` centroids and one index per weight (or per vector).

    ``name`` is the weight's tensor name (an initializer, or the output of a ``Constant`` node). Centroids have
    the weight's dtype (a bfloat16 weight may also give uint16 bit patterns); indices are integers in
    ``[0, K)``. Every codebook has the same ``K`` (a group with fewer distinct values repeats entries).
    The keyword fields choose which weights share a codebook:

    ``granularity="layer"`` (the default; ``SharedWeight(name, centroids, indices)``)
        one codebook: ``centroids [K]``, ``indices`` of the weight's shape.
    ``granularity="channel"``, ``axis`` (the output-channel axis, default 0), ``group_size`` (default 1)
        ``group_size`` consecutive slices along ``axis`` share a codebook; with ``C`` slices there are
        ``ceil(C / group_size)`` codebooks (the last group is smaller when ``group_size`` does not divide ``C``):
        ``centroids [ceil(C / group_size), K]``, ``indices`` of the weight's shape.
    ``granularity="kernel"`` (weights of rank >= 3, e.g. Conv ``[O, I, kh, kw]``)
        one codebook per ``(o, i)`` kernel over the trailing dims: ``centroids [O * I, K]`` (row ``o * I + i``),
        ``indices`` of the weight's shape.
    ``vector_dim`` > 1 (granularity ``"layer"`` only), ``vector_axis`` (the input-channel axis, default 1)
        ``vector_dim`` consecutive weights along ``vector_axis`` share one codebook entry: ``centroids
        [K, vector_dim]``, ``indices`` of the weight's shape with ``vector_axis`` replaced by
        ``ceil(size / vector_dim)``; when ``vector_dim`` does not divide the size the last vector is padded and
        the padding is dropped (:meth:`dense` with the weight's ``shape``).

    ``axis`` and ``vector_axis`` are stored non-negative. Eq. 1: :meth:`eq1_bits`.
    """

    name: str
    centroids: np.ndarray
    indices: np.ndarray
    granularity: str = field(default="layer", kw_only=True)
    axis: int = field(default=0, kw_only=True)
    group_size: int = field(default=1, kw_only=True)
    vector_dim: int = field(default=1, kw_only=True)
    vector_axis: int = field(default=1, kw_only=True)

    def __post_init__(self) -> None:
        name = self.name
        centroids = np.asarray(self.centroids)
        indices = np.asarray(self.indices)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity of {name!r} must be one of {', '.join(GRANULARITIES)}, "
                             f"not {self.granularity!r}")
        group_size = _as_count(name, "group_size", self.group_size, 1)
        vector_dim = _as_count(name, "vector_dim", self.vector_dim, 1)
        if not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"indices of {name!r} must be integers, got {indices.dtype}")
        rank = indices.ndim
        axis, vector_axis = self.axis, self.vector_axis
        if vector_dim > 1:
            if self.granularity != "layer":
                raise ValueError(f"vector_dim of {name!r} is {vector_dim}: vectors need granularity 'layer', "
                                 f"not {self.granularity!r}")
            vector_axis = _as_axis(name, "vector_axis", vector_axis, rank)
            want = f"[K, {vector_dim}]"
            ok = centroids.ndim == 2 and centroids.shape[1] == vector_dim
        elif self.granularity == "layer":
            want, ok = "[K]", centroids.ndim == 1
        elif self.granularity == "channel":
            axis = _as_axis(name, "axis", axis, rank)
            groups = -(-indices.shape[axis] // group_size)
            want = f"[{groups}, K] (ceil({indices.shape[axis]} / group_size {group_size}) codebooks)"
            ok = centroids.ndim == 2 and centroids.shape[0] == groups
        else:
            if rank < 3:
                raise ValueError(f"kernel granularity needs a weight of rank >= 3; {name!r} has rank {rank}")
            kernels = indices.shape[0] * indices.shape[1]
            want = f"[{kernels}, K] (one codebook per kernel)"
            ok = centroids.ndim == 2 and centroids.shape[0] == kernels
        if not ok or centroids.size == 0:
            raise ValueError(f"centroids of {name!r} must be non-empty and of shape {want}, not {centroids.shape}")
        object.__setattr__(self, "centroids", centroids)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "group_size", group_size)
        object.__setattr__(self, "vector_dim", vector_dim)
        object.__setattr__(self, "axis", axis)
        object.__setattr__(self, "vector_axis", vector_axis)

    @property
    def k(self) -> int:
        """Entries per codebook."""
        grouped = self.granularity != "layer"
        return int(self.centroids.shape[1] if grouped else self.centroids.shape[0])

    @property
    def codebooks(self) -> int:
        return int(self.centroids.shape[0]) if self.granularity != "layer" else 1

    @property
    def index_count(self) -> int:
        return int(self.indices.size)

    def eq1_bits(self, bits: int) -> int:
        """Eq. 1 storage in bits, ``bits`` being the bits of one weight (32 for float32)."""
        return eq1_bits(self.index_count, self.k, bits, codebooks=self.codebooks, vector_dim=self.vector_dim)

    def index_shape(self, weight_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape ``indices`` must have for a weight of ``weight_shape``."""
        shape = [int(d) for d in weight_shape]
        if self.vector_dim > 1 and len(shape) > self.vector_axis:
            shape[self.vector_axis] = -(-shape[self.vector_axis] // self.vector_dim)
        return tuple(shape)

    def codebook_ids(self) -> np.ndarray | None:
        """Which codebook each index uses, as an int64 array that broadcasts against ``indices`` (None for one
        codebook)."""
        shape = self.indices.shape
        if self.granularity == "channel":
            ids = np.arange(shape[self.axis], dtype=np.int64) // self.group_size
            return ids.reshape((-1,) + (1,) * (len(shape) - self.axis - 1))
        if self.granularity == "kernel":
            return np.arange(shape[0] * shape[1], dtype=np.int64).reshape(shape[:2] + (1,) * (len(shape) - 2))
        return None

    def dense(self, shape: Sequence[int] | None = None) -> np.ndarray:
        """The clustered weight. For vectors whose last one is padded, give the weight's ``shape`` to drop the
        padding (by default the vector axis has ``ceil(size / vector_dim) * vector_dim`` entries)."""
        ids = self.codebook_ids()
        if ids is not None:
            return self.centroids[ids, self.indices]
        if self.vector_dim == 1:
            return self.centroids[self.indices]
        va, vd = self.vector_axis, self.vector_dim
        values = np.moveaxis(self.centroids[self.indices], -1, va + 1)  # [..., m, vd, ...]
        padded = self.indices.shape[:va] + (self.indices.shape[va] * vd,) + self.indices.shape[va + 1 :]
        values = values.reshape(padded)
        if shape is not None:
            values = values[(slice(None),) * va + (slice(0, int(shape[va])),)]
        return values


@dataclass(frozen=True)
class StoredLayer:
    """What one shared layer really takes in the file, and how it is shared (the fields of :class:`SharedWeight`;
    ``group_size`` as written: at most the channel count)."""

    name: str
    k: int
    index_bits: int
    encoding: str  # "planes" | "uint8" | "uint4" | "broadcast"
    index_bytes: int
    centroid_bytes: int
    index_count: int
    granularity: str = "layer"
    codebooks: int = 1
    vector_dim: int = 1
    axis: int = 0
    group_size: int = 1
    vector_axis: int = 1

    @property
    def stored_bytes(self) -> int:
        return self.index_bytes + self.centroid_bytes

    def eq1_bits(self, bits: int) -> int:
        """Eq. 1 storage in bits, ``bits`` being the bits of one weight (32 for float32)."""
        return eq1_bits(self.index_count, self.k, bits, codebooks=self.codebooks, vector_dim=self.vector_dim)


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
