"""Encodings of a shared layer: index and centroid tensors, and the decode recipe that rebuilds the weight.

The written model runs on stock onnxruntime (CPU): every shared weight is rebuilt by a small decode made of
standard ONNX ops whose inputs are all initializers, so onnxruntime's constant folding (any graph optimisation
level >= BASIC) evaluates it once when the session is created and inference costs nothing extra. The decode
outputs the original weight name, so the nodes that consume the weight are untouched.

A decode is an index source followed by a codebook stage (``n`` indices, ``K`` entries per codebook,
``b = ceil(log2 K)`` index bits, ``opset`` = default-domain opset of the model).

Index sources (the record's ``encoding``), each giving int32 indices ``x`` of the index shape:

``broadcast`` (K == 1)
    no index tensor. Layer granularity: the whole decode is ``Expand(centroids[1], shape)`` (``Reshape(centroids,
    [])`` for a 0-d weight). Other stages: ``x = Expand(0, shape)``.
``uint8`` (b == 8)
    uint8 index tensor of the index shape -> ``Cast(int32)``.
``uint4`` (b == 4, opset >= 21, IR >= 10)
    ONNX ``UINT4`` index tensor (two indices per byte) -> ``Cast(int32)``. onnxruntime CPU (1.23+) has a uint4
    ``Cast`` kernel and folds it.
``planes`` (every other case)
    One uint8 tensor ``q`` of shape ``[m, 1, b]`` with ``m = ceil(n / 8)``: bit ``j`` of index number
    ``8 t + r`` (flat C order, ``r`` in 0..7) is bit ``r`` of byte ``q[t, 0, j]``. Decode::

        x = Cast(q, int32)                  # [m, 1, b]
        s = Div(x, P)   P = [[1],[2],..,[128]] int32 [8, 1]  -> [m, 8, b]  (x >> r)
        t = Mod(s, 2)                       # bit r of plane j   (opset < 10: s - 2 * Div(s, 2))
        x = MatMul(t, W)  W = [[1],[2],..,[2^(b-1)]] int32 [b, 1] -> [m, 8, 1]
                                            # (opset 8, where MatMul has no int32: ReduceSum(Mul(t, W')))
        x = Reshape(x, shape)               # if n % 8 != 0: Reshape([-1]) -> Slice(0, n) -> Reshape(shape)

    ``Div``/``Mod``/``Mul``/``Sub``/``ReduceSum`` have int32 kernels in every opset used here and
    ``MatMul`` has one from opset 9 (onnxruntime CPU implements all of them), so the arithmetic is
    done in int32. Index bytes are ``m * b <= n * b / 8 + b``.

Codebook stages (the record's ``granularity``; ``vector`` is layer granularity with vectors):

``layer``: ``centroids [K]``
    ``w = Gather(centroids, x)``.
``channel``: ``centroids [G, K]``, ``G = ceil(C / group_size)`` codebooks over the ``C`` slices along ``axis``
    ``w = Gather(Reshape(centroids, [-1]), Add(x, Mul(o, K)))`` where ``o`` is the int32 group ramp
    ``arange(C) // group_size`` shaped ``[C, 1, ..]`` (one 1 per axis after ``axis``, so it broadcasts along
    ``axis``), and ``K = Cast(Gather(Shape(centroids), 1))``: the offset of each codebook is computed, not stored.
``kernel``: ``centroids [O * I, K]`` for a weight ``[O, I, ...]``, row ``o * I + i``
    as ``channel`` with ``Add(o, i)`` for ``o``: two ramps, ``o = arange(O) * I`` shaped ``[O, 1, 1, ..]`` and
    ``i = arange(I)`` shaped ``[I, 1, ..]``.
``vector``: ``centroids [K, d]``, ``d`` consecutive weights along ``vector_axis`` per index
    ``w = Reshape(Transpose(Gather(centroids, x), perm), shape)`` where ``x`` has the weight's shape with
    ``vector_axis`` (``a``) holding ``ceil(size / d)``, the gathered ``[.., d]`` axis is moved next to ``a``
    (``perm``) and merged with it; a padded last vector is cut by ``Slice(w, [0], [size], [a])``.

The ramps are tiny int32 initializers (``C``, or ``O`` + ``I`` values, shared by all layers of the same
shape, whatever their K), so the file stays at Eq. 1 with ``codebooks * K * d`` centroids.

Where the decode lives (IR = the model's ``ir_version``):

IR >= 4: model-local functions
    Each recipe is one ``FunctionProto`` of domain ``ai.axcnn`` (version 1, imported by the model; the body
    imports the model's default opset), named by its source, then its stage: ``planes{b}``, ``planes{b}_n``
    (n % 8 != 0), ``uint8``, ``uint4``, ``broadcast``, ``broadcast0`` (0-d), followed by ``_channel``,
    ``_kernel``, ``_vector`` or ``_vector_pad`` for the other stages (``planes3_n_channel``). Formal inputs are
    named by role: ``q`` indices, ``c`` centroids, ``s`` int64 index shape, ``n`` the [1] int64 index count for
    ``Slice``, ``o`` and ``i`` the ramps, ``v`` the int64 (padded) weight shape, ``e`` the [1] int64 size and
    ``a`` the [1] int64 axis of the vector ``Slice``. Below opset 10 ``Slice`` takes ``ends``/``axes`` as
    attributes, so the call node carries ``n``, ``e``, ``a`` attributes that the body references; ``perm`` is
    always a call attribute. ``P``, 2, ``W`` and the other constants are ``Constant`` nodes in the body (opset 8,
    whose ``Constant`` holds only floats: a float ``Constant`` + ``Cast``). Each layer is ONE unnamed call node
    ``ai.axcnn.<recipe>(q, c, ...) -> weight name``. onnxruntime inlines the functions, then folds them like
    inline nodes (its optimized model keeps no ``ai.axcnn`` node and no decode op). Functions need IR >= 8: a
    model with IR 4..7 is raised to IR 8 (no semantic change for IR >= 4; logged at INFO, the original IR is
    recorded in the metadata and :func:`expand` restores it).
IR < 4: inline nodes
    IR 3 allows no functions, so each layer gets its decode nodes in the main graph, named
    ``axcnn/{i}/{j}`` (layer ``i``, node ``j``), intermediates ``ax{i}.{j}``, and the helper constants are
    initializers shared by all layers (``ax.p``, ``ax.2``, ``ax.w{b}``/``ax.v{b}``, ``ax.f``, ``ax.0``, ``ax.z``,
    ``ax.one``). For a stage other than ``layer`` the final node is named ``axcnn/{i}/{recipe}`` (e.g.
    ``axcnn/3/planes3_channel``): with no call node to name the roles, the reader emits that recipe again and
    reads each role and attribute off the node at the same place. IR < 4 requires every initializer to be a
    graph input, so the new tensors are listed as graph inputs too; onnxruntime treats them as constants at
    IR < 4. (Files written by axcnn before the functions used this layout at every IR; they are still read,
    decoded and expanded.)

New names start with a prefix (``ax`` unless that collides): ``ax{i}.q`` indices and ``ax{i}.c`` centroids
of layer ``i``; ``ax.s{j}`` int64 shapes, ``ax.n{j}`` counts (and axes) and ``ax.r{j}`` ramps, one per distinct
value, shared by the layers that need it. ``model.metadata_props["axcnn.layers"]`` holds only what the graph
cannot tell, as compact JSON: ``{"layers":[[name,K],...]}`` in layer order, plus ``"ir":7`` when the IR was
raised. :func:`shared_layers` rebuilds the full per-layer records from the graph (the call or final inline
node that outputs the layer name: its recipe, its input tensors' dims, values, dtypes and byte sizes, its
attributes); the older verbose metadata (a list of full records) is still read as stored.

Costs, measured on cifar10_resnet56 (56 ``planes`` layers, opset 13, IR 7 -> 8, K 15-16): about 126 bytes
per layer in all (7.0 KB; before the functions: 29.4 KB, 524 bytes per layer): the call node ~56 bytes
with a 14-character weight name, the ``q``/``c`` tensor headers ~40, the metadata ~23, plus per model
~300 bytes per function used and ~20 per distinct shape. The inline path (IR < 4) costs ~490 bytes per
layer at opset 8 (names, graph inputs, 9 nodes). On cifar10_resnet20 (20 layers, opset 13, random clusterings
of the given form; measured by writing the file and subtracting the unshared bytes and the payload, which
equals Eq. 1 to the byte) the decode overhead was 2.8 KB by layer (K=16), 3.6 KB by channel groups of 4 (K=16,
the ramps and three more ops per function) and 4.2-4.3 KB with vectors of 2 (K=64..256, the ``perm`` attribute
and the padded-shape tensor); on mnist_cnn_baskov's two convolutions by kernel 1.2 KB. While the session folds a
``planes`` layer, onnxruntime
holds int32 intermediates of ``4 * n * b`` bytes (about ``b`` times the dense float32 weight), freed once
folding is done. Folding needs graph optimisations enabled (ORT_ENABLE_BASIC or higher); with
ORT_DISABLE_ALL the decode would run on every inference.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from axcnn.rewrite.common import op_ok

STAGES = ("layer", "channel", "kernel", "vector")
"""Codebook stages of a decode: the granularities, and ``vector`` for vectors (of layer granularity)."""

ROLES = ("q", "c", "s", "n", "o", "i", "v", "e", "a")
"""The inputs of a decode, by role (module docstring)."""

ATTRIBUTES = ("n", "e", "a", "perm")
"""The attributes of a decode call (module docstring)."""


UINT4 = "tensor(uint4)"


def _powers(count: int) -> np.ndarray:
    """int32 ``[1, 2, 4, ..., 2**(count-1)]``."""
    return np.left_shift(np.int32(1), np.arange(count, dtype=np.int32))


def int64_tensor(name: str, values: Sequence[int]) -> TensorProto:
    """A small 1-D int64 tensor stored as varints (smaller than raw_data for small values)."""
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], [int(v) for v in values])


def pack_planes(indices: np.ndarray, bits: int) -> np.ndarray:
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


def small_tensor(name: str, value: np.ndarray) -> TensorProto:
    """A small constant tensor stored as varints / floats (not raw bytes)."""
    return helper.make_tensor(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape, value.ravel().tolist())


def make_node(op: str, inputs: Sequence[str], output: str, name: str, attrs: Mapping) -> onnx.NodeProto:
    """A node; attribute values that already are AttributeProtos (e.g. references) are used as they are."""
    plain = {k: v for k, v in attrs.items() if not isinstance(v, onnx.AttributeProto)}
    node = helper.make_node(op, list(inputs), [output], name=name or None, **plain)
    for key, value in attrs.items():
        if isinstance(value, onnx.AttributeProto):
            attr = node.attribute.add()
            attr.CopyFrom(value)
            attr.name = key
    return node


class BodyEmitter:
    """Writes the nodes of a function body; helper constants become ``Constant`` nodes inside it."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0
        self.consts: set[str] = set()

    def node(self, op: str, inputs: Sequence[str], output: str | None = None, **attrs) -> str:
        out = output if output is not None else f"t{self.count}"
        self.count += 1
        self.nodes.append(make_node(op, inputs, out, "", attrs))
        return out

    def const(self, key: str, value: np.ndarray) -> str:
        if key not in self.consts:
            self.consts.add(key)
            if self.opset >= 9:
                self.nodes.append(helper.make_node("Constant", [], [key], value=small_tensor("", value)))
            else:  # Constant-1 holds only floats: store the (small, exact) integers as float, then Cast
                as_float = small_tensor("", value.astype(np.float32))
                self.nodes.append(helper.make_node("Constant", [], [f"{key}f"], value=as_float))
                to = helper.np_dtype_to_tensor_dtype(value.dtype)
                self.nodes.append(helper.make_node("Cast", [f"{key}f"], [key], to=to))
        return key


def ref_attr(ref: str, attr_type: int) -> onnx.AttributeProto:
    """A function-body attribute that takes the call node's attribute ``ref``."""
    attr = onnx.AttributeProto()
    attr.ref_attr_name = ref
    attr.type = attr_type
    return attr


@dataclass(frozen=True)
class Recipe:
    """How one layer decodes: its index source, its codebook stage, and the flags that change the body."""

    source: str  # "broadcast" | "uint8" | "uint4" | "planes"
    stage: str = "layer"  # one of STAGES
    bits: int = 0  # index bits (planes)
    sliced: bool = False  # planes: n % 8 != 0, the flat indices are cut to n
    padded: bool = False  # vector: the last vector is padded, the weight is cut to its size
    scalar: bool = False  # layer broadcast of a 0-d weight

    @property
    def name(self) -> str:
        """The decode function's name (module docstring)."""
        if self.source == "planes":
            base = f"planes{self.bits}" + ("_n" if self.sliced else "")
        elif self.source == "broadcast" and self.scalar:
            base = "broadcast0"
        else:
            base = self.source
        if self.stage == "layer":
            return base
        return f"{base}_{self.stage}" + ("_pad" if self.padded else "")

    @staticmethod
    def parse(name: str) -> Recipe | None:
        """The recipe of a decode function name (None for a name axcnn does not write)."""
        m = re.fullmatch(r"(planes(\d+)(_n)?|uint8|uint4|broadcast0?)(?:_(channel|kernel|vector)(_pad)?)?", name)
        if m is None or (m.group(5) and m.group(4) != "vector"):
            return None
        base, stage = m.group(1), m.group(4) or "layer"
        if base == "broadcast0" and stage != "layer":
            return None
        source = "planes" if m.group(2) else "broadcast" if base.startswith("broadcast") else base
        bits = int(m.group(2)) if m.group(2) else {"uint8": 8, "uint4": 4}.get(base, 0)
        return Recipe(source, stage, bits, bool(m.group(3)), bool(m.group(5)), base == "broadcast0")


def _const(em, key: str, value) -> str:
    return em.const(key, np.asarray(value))


def _indices(em, opset: int, recipe: Recipe, roles: Mapping[str, str], attrs: Mapping) -> str:
    """Int32 indices of the index shape, from the recipe's source."""
    if recipe.source == "broadcast":
        return em.node("Expand", [_const(em, "z", np.int32(0)), roles["s"]])
    x = em.node("Cast", [roles["q"]], to=TensorProto.INT32)
    if recipe.source != "planes":
        return x
    bits = recipe.bits
    powers = _const(em, "p", _powers(8).reshape(8, 1))
    two = _const(em, "2", np.int32(2))
    s = em.node("Div", [x, powers])
    if opset >= 10:
        t = em.node("Mod", [s, two])
    else:
        t = em.node("Sub", [s, em.node("Mul", [em.node("Div", [s, two]), two])])
    if op_ok("MatMul", opset, "tensor(int32)"):
        x = em.node("MatMul", [t, _const(em, f"w{bits}", _powers(bits).reshape(bits, 1))])
    else:
        vec = _const(em, f"v{bits}", _powers(bits))
        x = em.node("ReduceSum", [em.node("Mul", [t, vec])], axes=[2], keepdims=1)
    if recipe.sliced:
        x = em.node("Reshape", [x, _const(em, "f", np.array([-1], dtype=np.int64))])
        if opset >= 10:
            x = em.node("Slice", [x, _const(em, "0", np.array([0], dtype=np.int64)), roles["n"]])
        else:
            x = em.node("Slice", [x], starts=[0], ends=attrs["n"])
    return em.node("Reshape", [x, roles["s"]])


def emit_decode(em, opset: int, recipe: Recipe, roles: Mapping[str, str], out: str, attrs: Mapping) -> None:
    """The decode of one recipe (module docstring), written through ``em`` (a function body or inline nodes).

    ``roles`` names the input values by role (module docstring); ``attrs`` gives the attributes ``n`` (planes
    ``Slice`` ends below opset 10), ``e``/``a`` (vector ``Slice`` ends/axes below opset 10) and ``perm``
    (vector), as lists of ints or as references to the call node's attributes.
    """
    c = roles["c"]
    if recipe.source == "broadcast" and recipe.stage == "layer":
        # Expand broadcasts [1] against the shape, so a 0-d weight needs a Reshape to [] instead
        em.node("Reshape" if recipe.scalar else "Expand", [c, roles["s"]], out)
        return
    x = _indices(em, opset, recipe, roles, attrs)
    if recipe.stage == "layer":
        em.node("Gather", [c, x], out)
    elif recipe.stage in ("channel", "kernel"):
        ramp = roles["o"] if recipe.stage == "channel" else em.node("Add", [roles["o"], roles["i"]])
        k = em.node("Cast", [em.node("Gather", [em.node("Shape", [c]), _const(em, "one", np.int64(1))])],
                    to=TensorProto.INT32)
        flat = em.node("Add", [x, em.node("Mul", [ramp, k])])
        table = em.node("Reshape", [c, _const(em, "f", np.array([-1], dtype=np.int64))])
        em.node("Gather", [table, flat], out)
    elif recipe.stage == "vector":
        w = em.node("Transpose", [em.node("Gather", [c, x])], perm=attrs["perm"])
        if not recipe.padded:
            em.node("Reshape", [w, roles["v"]], out)
        else:
            w = em.node("Reshape", [w, roles["v"]])
            if opset >= 10:
                em.node("Slice", [w, _const(em, "0", np.array([0], dtype=np.int64)), roles["e"], roles["a"]], out)
            else:
                em.node("Slice", [w], out, starts=[0], ends=attrs["e"], axes=attrs["a"])
    else:
        raise ValueError(f"unknown decode stage {recipe.stage!r}")
