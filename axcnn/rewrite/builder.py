"""Build the decode of each shared layer into a model: its index and centroid tensors, the shared helper
tensors (shapes, counts, ramps) and the decode function it calls (or, at IR < 4, its inline nodes). The
format is described in :mod:`axcnn.rewrite.encodings`."""

from __future__ import annotations

from collections.abc import Sequence

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from axcnn.rewrite.common import FUNCTION_DOMAIN, NODE_PREFIX, SharedWeight, StoredLayer, as_dtype, index_bits, op_ok
from axcnn.rewrite.encodings import (
    UINT4,
    BodyEmitter,
    Recipe,
    emit_decode,
    int64_tensor,
    make_node,
    pack_planes,
    ref_attr,
    small_tensor,
)


class _InlineEmitter:
    """Writes one layer's decode nodes into the main graph (IR < 4 models): node ``j`` of layer ``i`` is named
    ``axcnn/{i}/{j}``; the final node of a stage other than ``layer`` is named ``axcnn/{i}/{recipe}`` instead, so
    that a reader knows which recipe to re-run to find the roles (:mod:`axcnn.rewrite.records`)."""

    def __init__(self, builder: Builder, i: int, final: str | None = None):
        self.builder = builder
        self.i = i
        self.final = final
        self.count = 0

    def node(self, op: str, inputs: Sequence[str], output: str | None = None, **attrs) -> str:
        j = self.count
        self.count += 1
        out = output if output is not None else f"{self.builder.prefix}{self.i}.{j}"
        tail = self.final if output is not None and self.final else j
        self.builder.nodes.append(make_node(op, inputs, out, f"{NODE_PREFIX}{self.i}/{tail}", attrs))
        return out

    def const(self, key: str, value: np.ndarray) -> str:
        return self.builder.helper_const(key, value)


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
        self._ramps: dict[tuple[tuple[int, ...], bytes], str] = {}

    def helper_const(self, key: str, value: np.ndarray) -> str:
        name = f"{self.prefix}.{key}"
        if key not in self._helpers:
            self.inits.append(small_tensor(name, value))
            self._helpers[key] = name
        return name

    def shape_tensor(self, shape: tuple[int, ...]) -> str:
        """The int64 shape initializer ``{prefix}.s{j}``, one per distinct shape."""
        if shape not in self._shapes:
            name = f"{self.prefix}.s{len(self._shapes)}"
            self.inits.append(int64_tensor(name, shape))
            self._shapes[shape] = name
        return self._shapes[shape]

    def count_tensor(self, n: int) -> str:
        """The [1] int64 initializer ``{prefix}.n{j}`` holding ``n`` (a count or an axis), one per value."""
        if n not in self._counts:
            name = f"{self.prefix}.n{len(self._counts)}"
            self.inits.append(int64_tensor(name, [n]))
            self._counts[n] = name
        return self._counts[n]

    def ramp_tensor(self, values: np.ndarray) -> str:
        """The int32 ramp initializer ``{prefix}.r{j}``, one per distinct value."""
        values = np.ascontiguousarray(values, dtype=np.int32)
        key = (values.shape, values.tobytes())
        if key not in self._ramps:
            name = f"{self.prefix}.r{len(self._ramps)}"
            self.inits.append(small_tensor(name, values))
            self._ramps[key] = name
        return self._ramps[key]

    def function(self, recipe: Recipe, inputs: list[str], attributes: list[str]) -> None:
        """Define the model-local function of ``recipe`` (once) with formal inputs named by their roles."""
        if recipe.name in self.functions:
            return
        em = BodyEmitter(self.opset)
        refs = {a: ref_attr(a, onnx.AttributeProto.INTS) for a in attributes}
        emit_decode(em, self.opset, recipe, {r: r for r in inputs}, "w", refs)
        self.functions[recipe.name] = helper.make_function(
            FUNCTION_DOMAIN,
            recipe.name,
            inputs,
            ["w"],
            em.nodes,
            [helper.make_opsetid("", self.opset)],
            attributes=attributes,
        )

    def _index_tensor(self, p: str, sw: SharedWeight, bits: int) -> tuple[str, TensorProto | None]:
        """The index source and its tensor (None for K == 1)."""
        if sw.k == 1:
            return "broadcast", None
        if bits == 8:
            return "uint8", numpy_helper.from_array(sw.indices.astype(np.uint8), f"{p}.q")
        if bits == 4 and self.opset >= 21 and self.ir_version >= 10 and op_ok("Cast", self.opset, UINT4):
            return "uint4", numpy_helper.from_array(sw.indices.astype(ml_dtypes.uint4), f"{p}.q")
        return "planes", numpy_helper.from_array(pack_planes(sw.indices, bits), f"{p}.q")

    def _stage(self, sw: SharedWeight, shape: tuple[int, ...], roles: dict, attrs: dict) -> tuple[str, bool, int]:
        """Add the roles / attributes of the codebook stage; return the stage, whether the vectors are padded and
        the group size as written."""
        rank = len(shape)
        if sw.vector_dim > 1:
            va, vd = sw.vector_axis, sw.vector_dim
            size = shape[va]
            padded_shape = shape[:va] + (-(-size // vd) * vd,) + shape[va + 1 :]
            roles["v"] = self.shape_tensor(padded_shape)
            attrs["perm"] = [*range(va + 1), rank, *range(va + 1, rank)]
            padded = size % vd != 0
            if padded and self.opset >= 10:
                roles["e"], roles["a"] = self.count_tensor(size), self.count_tensor(va)
            elif padded:
                attrs["e"], attrs["a"] = [size], [va]
            return "vector", padded, 1
        if sw.granularity == "channel":
            groups = np.arange(shape[sw.axis], dtype=np.int32) // sw.group_size
            roles["o"] = self.ramp_tensor(groups.reshape((-1,) + (1,) * (rank - sw.axis - 1)))
            return "channel", False, min(sw.group_size, shape[sw.axis])
        if sw.granularity == "kernel":
            outer, inner = shape[0], shape[1]
            roles["o"] = self.ramp_tensor((np.arange(outer) * inner).reshape((-1,) + (1,) * (rank - 1)))
            roles["i"] = self.ramp_tensor(np.arange(inner).reshape((-1,) + (1,) * (rank - 2)))
            return "kernel", False, 1
        return "layer", False, 1

    def layer(self, i: int, sw: SharedWeight, shape: tuple[int, ...], elem_type: int) -> StoredLayer:
        """Add the tensors and the decode of one shared layer (``shape``: the weight's shape)."""
        p = f"{self.prefix}{i}"
        bits = index_bits(sw.k)
        index_shape = tuple(int(d) for d in sw.indices.shape)
        n = sw.index_count
        values = as_dtype(sw.centroids, elem_type, f"centroids of {sw.name!r}")
        centroids = numpy_helper.from_array(values, f"{p}.c")
        self.inits.append(centroids)
        source, q = self._index_tensor(p, sw, bits)
        roles = {"c": centroids.name}
        if q is not None:
            self.inits.append(q)
            roles = {"q": q.name, **roles}
        attrs: dict[str, list[int]] = {}
        if source in ("broadcast", "planes"):
            roles["s"] = self.shape_tensor(index_shape)
        sliced = source == "planes" and n % 8 != 0
        if sliced and self.opset >= 10:
            roles["n"] = self.count_tensor(n)
        elif sliced:
            attrs["n"] = [n]
        stage, padded, group_size = self._stage(sw, shape, roles, attrs)
        recipe = Recipe(source, stage, bits if source == "planes" else 0, sliced, padded, scalar=not shape)
        if not self.use_functions:
            final = None if stage == "layer" else recipe.name
            emit_decode(_InlineEmitter(self, i, final), self.opset, recipe, roles, sw.name, attrs)
        else:
            self.function(recipe, list(roles), list(attrs))
            self.nodes.append(
                helper.make_node(recipe.name, list(roles.values()), [sw.name], domain=FUNCTION_DOMAIN, **attrs)
            )
        return StoredLayer(
            sw.name,
            sw.k,
            bits,
            source,
            0 if q is None else len(q.raw_data),
            len(centroids.raw_data),
            n,
            granularity=sw.granularity,
            codebooks=sw.codebooks,
            vector_dim=sw.vector_dim,
            axis=sw.axis if sw.granularity == "channel" else 0,
            group_size=group_size,
            vector_axis=sw.vector_axis if sw.vector_dim > 1 else 1,
        )
