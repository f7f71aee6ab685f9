"""Encodings of a shared layer: index and centroid tensors, and the decode recipe that rebuilds the weight.

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

from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from axcnn.rewrite.common import (
    FUNCTION_DOMAIN,
    NODE_PREFIX,
    SharedWeight,
    StoredLayer,
    as_dtype,
    index_bits,
    op_ok,
)

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

    def __init__(self, builder: Builder, i: int):
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
        if op_ok("MatMul", opset, "tensor(int32)"):
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


class Builder:
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
        bits = index_bits(k)
        n = int(np.prod(shape, dtype=np.int64))
        values = as_dtype(sw.centroids, elem_type, f"centroids of {sw.name!r}")
        centroids = numpy_helper.from_array(values, f"{p}.c")
        self.inits.append(centroids)
        q = None
        if k == 1:
            encoding = "broadcast"
        elif bits == 8:
            q = numpy_helper.from_array(sw.indices.astype(np.uint8), f"{p}.q")
            encoding = "uint8"
        elif bits == 4 and self.opset >= 21 and self.ir_version >= 10 and op_ok("Cast", self.opset, _UINT4):
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


