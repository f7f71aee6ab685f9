"""Rewrite an ONNX model so that clustered weights are stored as (bit-packed) indices plus centroids.

The written model runs on stock onnxruntime (CPU): every shared weight is rebuilt by a small decode made of
standard ONNX ops whose inputs are all initializers, so onnxruntime's constant folding (any graph optimisation
level >= BASIC) evaluates it once when the session is created and inference costs nothing extra. The decode
outputs the original weight name, so the nodes that consume the weight are untouched.

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

Where the decode lives (IR = the model's ``ir_version``):

IR >= 4: model-local functions
    Each recipe above is one ``FunctionProto`` of domain ``ai.axcnn`` (version 1, imported by the model;
    the body imports the model's default opset): ``planes{b}``, ``planes{b}_n`` (n % 8 != 0), ``uint8``,
    ``uint4``, ``broadcast``, ``broadcast0`` (0-d). Formal inputs are named by role: ``q`` indices, ``c``
    centroids, ``s`` int64 shape, ``n`` the [1] int64 weight count for ``Slice`` (opset >= 10; below
    opset 10 ``Slice`` takes ``ends`` as an attribute, so the call node carries an ``n`` attribute that
    the body references). ``P``, 2, ``W`` and the Reshape/Slice constants are ``Constant`` nodes in the
    body (opset 8, whose ``Constant`` holds only floats: a float ``Constant`` + ``Cast``). Each layer is ONE
    unnamed call node ``ai.axcnn.<recipe>(q, c[, s[, n]]) -> weight name``. onnxruntime inlines the
    functions, then folds them like inline nodes (its optimized model keeps no ``ai.axcnn`` node and no
    decode op). Functions need IR >= 8: a model with IR 4..7 is raised to IR 8 (no semantic change for
    IR >= 4; logged at INFO, the original IR is recorded in the metadata and :func:`expand` restores it).
IR < 4: inline nodes
    IR 3 allows no functions, so each layer gets its decode nodes in the main graph, named
    ``axcnn/{i}/{j}`` (layer ``i``, node ``j``), intermediates ``ax{i}.{j}``, and the helper constants are
    initializers shared by all layers (``ax.p``, ``ax.2``, ``ax.w{b}``/``ax.v{b}``, ``ax.f``, ``ax.0``).
    IR < 4 requires every initializer to be a graph input, so the new tensors are listed as graph inputs
    too; onnxruntime treats them as constants at IR < 4. (Files written by axcnn before the functions used
    this layout at every IR; they are still read, decoded and expanded.)

New names start with a prefix (``ax`` unless that collides): ``ax{i}.q`` indices and ``ax{i}.c`` centroids
of layer ``i``; ``ax.s{j}`` int64 shapes and ``ax.n{j}`` weight counts, one per distinct value, shared by
the layers that need it. ``model.metadata_props["axcnn.layers"]`` holds only what the graph cannot tell,
as compact JSON: ``{"layers":[[name,K],...]}`` in layer order, plus ``"ir":7`` when the IR was raised.
:func:`shared_layers` rebuilds the full per-layer records from the graph (the call or final inline node
that outputs the layer name, its input tensors' dims, dtypes and byte sizes); the older verbose metadata
(a list of full records) is still read as stored.

Costs, measured on cifar10_resnet56 (56 ``planes`` layers, opset 13, IR 7 -> 8, K 15-16): about 126 bytes
per layer in all (7.0 KB; before the functions: 29.4 KB, 524 bytes per layer): the call node ~56 bytes
with a 14-character weight name, the ``q``/``c`` tensor headers ~40, the metadata ~23, plus per model
~300 bytes per function used and ~20 per distinct shape. The inline path (IR < 4) costs ~490 bytes per
layer at opset 8 (names, graph inputs, 9 nodes). While the session folds a ``planes`` layer, onnxruntime
holds int32 intermediates of ``4 * n * b`` bytes (about ``b`` times the dense float32 weight), freed once
folding is done. Folding needs graph optimisations enabled (ORT_ENABLE_BASIC or higher); with
ORT_DISABLE_ALL the decode would run on every inference.
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
"""Every inline decode node's name starts with this (IR < 4 models, and files written before functions)."""

FUNCTION_DOMAIN = "ai.axcnn"
"""Domain of the model-local decode functions (and of their call nodes)."""

_FUNCTION_IR = 8
"""Model-local functions need IR >= 8."""

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


def _small_tensor(name: str, value: np.ndarray) -> TensorProto:
    """A small constant tensor stored as varints / floats (not raw bytes)."""
    return helper.make_tensor(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape, value.ravel().tolist())


def _make_node(op: str, inputs: Sequence[str], output: str, name: str, attrs: Mapping) -> onnx.NodeProto:
    """A node; attribute values that already are AttributeProtos (e.g. references) are used as they are."""
    plain = {k: v for k, v in attrs.items() if not isinstance(v, onnx.AttributeProto)}
    node = helper.make_node(op, list(inputs), [output], name=name or None, **plain)
    for key, value in attrs.items():
        if isinstance(value, onnx.AttributeProto):
            attr = node.attribute.add()
            attr.CopyFrom(value)
            attr.name = key
    return node


class _InlineEmitter:
    """Writes one layer's decode nodes into the main graph (IR < 4 models)."""

    def __init__(self, builder: _Builder, i: int):
        self.builder = builder
        self.i = i
        self.count = 0

    def node(self, op: str, inputs: Sequence[str], output: str | None = None, **attrs) -> str:
        j = self.count
        self.count += 1
        out = output if output is not None else f"{self.builder.prefix}{self.i}.{j}"
        self.builder.nodes.append(_make_node(op, inputs, out, f"{NODE_PREFIX}{self.i}/{j}", attrs))
        return out

    def const(self, key: str, value: np.ndarray) -> str:
        return self.builder.helper_const(key, value)


class _BodyEmitter:
    """Writes the nodes of a function body; helper constants become ``Constant`` nodes inside it."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0
        self.consts: set[str] = set()

    def node(self, op: str, inputs: Sequence[str], output: str | None = None, **attrs) -> str:
        out = output if output is not None else f"t{self.count}"
        self.count += 1
        self.nodes.append(_make_node(op, inputs, out, "", attrs))
        return out

    def const(self, key: str, value: np.ndarray) -> str:
        if key not in self.consts:
            self.consts.add(key)
            if self.opset >= 9:
                self.nodes.append(helper.make_node("Constant", [], [key], value=_small_tensor("", value)))
            else:  # Constant-1 holds only floats: store the (small, exact) integers as float, then Cast
                as_float = _small_tensor("", value.astype(np.float32))
                self.nodes.append(helper.make_node("Constant", [], [f"{key}f"], value=as_float))
                to = helper.np_dtype_to_tensor_dtype(value.dtype)
                self.nodes.append(helper.make_node("Cast", [f"{key}f"], [key], to=to))
        return key


def _ref_attr(ref: str, attr_type: int) -> onnx.AttributeProto:
    """A function-body attribute that takes the call node's attribute ``ref``."""
    attr = onnx.AttributeProto()
    attr.ref_attr_name = ref
    attr.type = attr_type
    return attr


def _emit_decode(
    em, opset: int, encoding: str, bits: int, roles: Mapping[str, str], out: str, *, scalar: bool = False, ends=None
) -> None:
    """The decode recipe of one encoding (module docstring), written through ``em``.

    ``roles`` names the values: ``q`` indices, ``c`` centroids, ``s`` int64 shape, ``n`` the [1] int64 weight
    count for the opset >= 10 ``Slice`` (only when n % 8 != 0). ``ends`` is the opset < 10 ``Slice`` ``ends``
    attribute (a list, or a reference to the function attribute ``n``); ``scalar`` marks a 0-d broadcast weight.
    """
    if encoding == "broadcast":
        # Expand broadcasts [1] against the shape, so a 0-d weight needs a Reshape to [] instead
        em.node("Reshape" if scalar else "Expand", [roles["c"], roles["s"]], out)
        return
    x = em.node("Cast", [roles["q"]], to=TensorProto.INT32)
    if encoding == "planes":
        powers = em.const("p", _powers(8).reshape(8, 1))
        two = em.const("2", np.array(2, dtype=np.int32))
        s = em.node("Div", [x, powers])
        if opset >= 10:
            t = em.node("Mod", [s, two])
        else:
            t = em.node("Sub", [s, em.node("Mul", [em.node("Div", [s, two]), two])])
        if _op_ok("MatMul", opset, "tensor(int32)"):
            x = em.node("MatMul", [t, em.const(f"w{bits}", _powers(bits).reshape(bits, 1))])
        else:
            vec = em.const(f"v{bits}", _powers(bits))
            x = em.node("ReduceSum", [em.node("Mul", [t, vec])], axes=[2], keepdims=1)
        if "n" in roles or ends is not None:
            x = em.node("Reshape", [x, em.const("f", np.array([-1], dtype=np.int64))])
            if opset >= 10:
                x = em.node("Slice", [x, em.const("0", np.array([0], dtype=np.int64)), roles["n"]])
            else:
                x = em.node("Slice", [x], starts=[0], ends=ends)
        x = em.node("Reshape", [x, roles["s"]])
    em.node("Gather", [roles["c"], x], out)


class _Builder:
    """Accumulates the decode nodes / functions / initializers of one model."""

    def __init__(self, prefix: str, opset: int, ir_version: int, use_functions: bool):
        self.prefix = prefix
        self.opset = opset
        self.ir_version = ir_version
        self.use_functions = use_functions
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.functions: dict[str, onnx.FunctionProto] = {}
        self._helpers: dict[str, str] = {}
        self._shapes: dict[tuple[int, ...], str] = {}
        self._counts: dict[int, str] = {}

    def helper_const(self, key: str, value: np.ndarray) -> str:
        name = f"{self.prefix}.{key}"
        if key not in self._helpers:
            self.inits.append(_small_tensor(name, value))
            self._helpers[key] = name
        return name

    def shape_tensor(self, shape: tuple[int, ...]) -> str:
        """The int64 shape initializer ``{prefix}.s{j}``, one per distinct weight shape."""
        if shape not in self._shapes:
            name = f"{self.prefix}.s{len(self._shapes)}"
            self.inits.append(_int64_tensor(name, shape))
            self._shapes[shape] = name
        return self._shapes[shape]

    def count_tensor(self, n: int) -> str:
        """The [1] int64 initializer ``{prefix}.n{j}`` holding ``n``, one per distinct value."""
        if n not in self._counts:
            name = f"{self.prefix}.n{len(self._counts)}"
            self.inits.append(_int64_tensor(name, [n]))
            self._counts[n] = name
        return self._counts[n]

    def function(self, fname: str, inputs: list[str], encoding: str, bits: int, scalar: bool, ends) -> None:
        """Define the model-local function ``fname`` (once) with formal inputs named by their roles."""
        if fname in self.functions:
            return
        em = _BodyEmitter(self.opset)
        _emit_decode(em, self.opset, encoding, bits, {r: r for r in inputs}, "w", scalar=scalar, ends=ends)
        attributes = ["n"] if isinstance(ends, onnx.AttributeProto) else []
        self.functions[fname] = helper.make_function(
            FUNCTION_DOMAIN,
            fname,
            inputs,
            ["w"],
            em.nodes,
            [helper.make_opsetid("", self.opset)],
            attributes=attributes,
        )

    def layer(self, i: int, sw: SharedWeight, shape: tuple[int, ...], elem_type: int) -> StoredLayer:
        p = f"{self.prefix}{i}"
        k = sw.k
        bits = _index_bits(k)
        n = int(np.prod(shape, dtype=np.int64))
        values = _as_dtype(sw.centroids, elem_type, f"centroids of {sw.name!r}")
        centroids = numpy_helper.from_array(values, f"{p}.c")
        self.inits.append(centroids)
        q = None
        if k == 1:
            encoding = "broadcast"
        elif bits == 8:
            q = numpy_helper.from_array(sw.indices.astype(np.uint8), f"{p}.q")
            encoding = "uint8"
        elif bits == 4 and self.opset >= 21 and self.ir_version >= 10 and _op_ok("Cast", self.opset, _UINT4):
            q = numpy_helper.from_array(sw.indices.astype(ml_dtypes.uint4), f"{p}.q")
            encoding = "uint4"
        else:
            q = numpy_helper.from_array(_pack_planes(sw.indices, bits), f"{p}.q")
            encoding = "planes"
        roles = {"c": centroids.name}
        if q is not None:
            self.inits.append(q)
            roles = {"q": q.name, **roles}
        scalar = not shape
        ends = None
        if encoding in ("broadcast", "planes"):
            roles["s"] = self.shape_tensor(shape)
        if encoding == "planes" and n % 8:
            if self.opset >= 10:
                roles["n"] = self.count_tensor(n)
            else:
                ends = [n]
        if not self.use_functions:
            _emit_decode(_InlineEmitter(self, i), self.opset, encoding, bits, roles, sw.name, scalar=scalar, ends=ends)
        else:
            attrs = {}
            if encoding == "planes":
                fname = f"planes{bits}" + ("_n" if n % 8 else "")
                if isinstance(ends, list):
                    attrs["n"] = ends
                    ends = _ref_attr("n", onnx.AttributeProto.INTS)
            else:
                fname = "broadcast0" if encoding == "broadcast" and scalar else encoding
            self.function(fname, list(roles), encoding, bits, scalar, ends)
            call = helper.make_node(fname, list(roles.values()), [sw.name], domain=FUNCTION_DOMAIN, **attrs)
            self.nodes.append(call)
        index_bytes = 0 if q is None else len(q.raw_data)
        return StoredLayer(sw.name, k, bits, encoding, index_bytes, len(centroids.raw_data))


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
    """Write ``shared`` into a copy of ``model`` as index + centroid tensors with an in-graph decode.

    Each layer is decoded by one call of a model-local ``ai.axcnn`` function (IR 4..7 is raised to 8 for
    them), or by inline decode nodes in an IR < 4 model (module docstring). Returns the new model and what
    each layer takes in the file. The input model is not modified.
    ``metadata`` entries are merged into ``metadata_props`` (keys prefixed ``axcnn.`` are dropped again
    by :func:`expand`). Raises AxcnnError for unknown weight names, too old opsets, an already shared
    model or one that already uses the ``ai.axcnn`` domain, ValueError when a clustering does not fit its
    weight (dtype, shape, index range).
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

    ir_version = int(model.ir_version)
    use_functions = ir_version >= 4
    if use_functions and (
        any(o.domain == FUNCTION_DOMAIN for o in model.opset_import)
        or any(f.domain == FUNCTION_DOMAIN for f in model.functions)
    ):
        raise AxcnnError(f"the model already uses the function domain {FUNCTION_DOMAIN!r}")

    out = _copy(model)
    graph = out.graph
    weights = _Weights(graph)
    builder = _Builder(_pick_prefix(_all_names(model)), opset, ir_version, use_functions)
    stored: list[StoredLayer] = []
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
        if ir_version < _FUNCTION_IR:
            logger.info(
                "raising the IR version from %d to %d for the decode functions (no semantic change)",
                ir_version,
                _FUNCTION_IR,
            )
            out.ir_version = _FUNCTION_IR
            layers["ir"] = ir_version
    metadata[LAYERS_KEY] = json.dumps(layers, separators=(",", ":"))
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


def _layers_meta(model: onnx.ModelProto):
    """The parsed ``axcnn.layers`` JSON, or None for a plain model."""
    for p in model.metadata_props:
        if p.key == LAYERS_KEY:
            try:
                return json.loads(p.value)
            except json.JSONDecodeError as exc:
                raise AxcnnError(f"the model's {LAYERS_KEY} metadata is not valid JSON: {exc}") from exc
    return None


def _compact_layers(meta) -> list[tuple[str, int]] | None:
    """``[(name, k), ...]`` of the compact metadata format, None for the old verbose one (list of records)."""
    if isinstance(meta, list) and all(isinstance(r, dict) and "name" in r for r in meta):
        return None
    layers = meta.get("layers") if isinstance(meta, dict) else None
    if not isinstance(layers, list) or not all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], int) for e in layers
    ):
        raise AxcnnError(f"the model's {LAYERS_KEY} metadata is neither a list of layer records nor a layer list")
    return [(name, k) for name, k in layers]


def _is_decode_node(node: onnx.NodeProto) -> bool:
    """A call node of a decode function, or an inline decode node (IR < 4 models and older files)."""
    if node.domain == FUNCTION_DOMAIN:
        return True
    return node.domain in ("", "ai.onnx") and node.name.startswith(NODE_PREFIX)


def _stored_bytes(t: TensorProto) -> int:
    """Bytes of a tensor's data as stored (raw bytes, or the length of its external data)."""
    if t.raw_data:
        return len(t.raw_data)
    if _is_external(t):
        entries = {e.key: e.value for e in t.external_data}
        if "length" in entries:
            return int(entries["length"])
    count = int(np.prod(t.dims, dtype=np.int64))
    if t.data_type in (TensorProto.UINT4, TensorProto.INT4):
        return (count + 1) // 2
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


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
        if idx is None or not _is_decode_node(self.graph.node[idx]):
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
        bits = _index_bits(k)
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
            shape = [int(d) for d in _tensor_array(self.init(roles["s"], layer), "shape tensor").reshape(-1)]
        return {
            "name": layer,
            "k": k,
            "index_bits": bits,
            "encoding": encoding,
            "shape": shape,
            "dtype": _dtype_name(c.data_type),
            "index_tensor": None if q is None else q.name,
            "centroid_tensor": c.name,
            "index_bytes": 0 if q is None else _stored_bytes(q),
            "centroid_bytes": _stored_bytes(c),
        }


def is_shared_model(model: onnx.ModelProto) -> bool:
    """Whether ``model`` was written by :func:`share_weights` (has the ``axcnn.layers`` metadata)."""
    return any(p.key == LAYERS_KEY for p in model.metadata_props)


def shared_layers(model: onnx.ModelProto) -> list[dict]:
    """Per-layer records of a shared model (empty list for a plain model), in layer order.

    Each record has ``name``, ``k``, ``index_bits``, ``encoding``, ``shape``, ``dtype``, ``index_tensor``
    (None for ``broadcast``), ``centroid_tensor``, ``index_bytes`` and ``centroid_bytes``. They are rebuilt from
    the decode graph (the metadata holds only names and K); files with the older verbose metadata are read
    as stored.
    """
    meta = _layers_meta(model)
    if meta is None:
        return []
    layers = _compact_layers(meta)
    if layers is None:
        return meta
    graph = _Graph(model)
    return [graph.record(name, k) for name, k in layers]


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
            values[name] = _tensor_array(index.inits[name], "decode tensor")
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
        if not _same_bits(got, want) or (sw.name in at_runtime and not _same_bits(at_runtime[sw.name], want)):
            raise AxcnnError(f"decoded weights of layer {sw.name} differ from the clustered weights")


def expand(model: onnx.ModelProto) -> onnx.ModelProto:
    """A plain dense copy of a shared model: decoded weights back as initializers, no decode nodes, decode
    functions or decode-only initializers, and no ``axcnn.*`` metadata.

    When :func:`share_weights` raised the IR version to 8 for the decode functions, the original IR version
    (recorded in the metadata) is restored, unless the model has other functions.
    """
    out = _copy(model)
    if not is_shared_model(out):
        return out
    meta = _layers_meta(out)
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
