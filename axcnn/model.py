"""Model inventory: load an ONNX model and list the weight tensors worth sharing.

A weight is the constant operand of a Conv, ConvTranspose, Gemm or MatMul node. It may live in an initializer, in a
Constant node, in external data, or in an initializer that is also a graph input (IR < 4 exports).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from axcnn.errors import AxcnnError

log = logging.getLogger(__name__)

#: op type -> input positions that may hold the weight operand
WEIGHT_OPS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1, 0), "MatMul": (1, 0)}
#: op type -> input positions that hold a bias (left dense)
BIAS_INPUTS = {"Conv": (2,), "ConvTranspose": (2,), "Gemm": (2,)}
#: ops that only rearrange a constant on its way to a weight operand (input 0 is the data)
PASS_OPS = ("Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: 32,
    onnx.TensorProto.FLOAT16: 16,
    onnx.TensorProto.BFLOAT16: 16,
    onnx.TensorProto.DOUBLE: 64,
}


@dataclass(frozen=True)
class Operand:
    """How the consumer reads its weight, as far as the weight's layout depends on it (see
    :func:`axcnn.sharing.weight_axes`).

    ``position``: the consumer's input holding the weight (1: Conv/ConvTranspose W, Gemm B, MatMul B; 0: a
    constant Gemm A or MatMul A). ``trans``: Gemm's ``transB`` (position 1) or ``transA`` (position 0).
    ``group``: Conv/ConvTranspose ``group``. ``direct``: the stored tensor is the operand itself (possibly
    through Identity), not reshaped or transposed on its way.
    """

    position: int = 1
    trans: bool = False
    group: int = 1
    direct: bool = True


@dataclass(frozen=True)
class LayerSpec:
    """One shareable weight tensor."""

    name: str  # tensor name of the weight
    op_type: str  # the (first) consumer's op type
    node: str  # the (first) consumer's node name
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name of the stored values
    bits: int  # B in Eq. 1: the stored bit width
    source: str  # "initializer" | "constant" | "input-initializer"
    array: np.ndarray = field(repr=False, compare=False)
    operand: Operand = field(default=Operand(), compare=False)

    @property
    def weights(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class Skipped:
    """A tensor inventory looked at and left dense, with the reason."""

    name: str
    op_type: str
    reason: str


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model with its external data; raise AxcnnError with a one-line reason when that fails."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AxcnnError(f"model file not found: {path}")
    if not os.path.isfile(path):
        raise AxcnnError(f"model path is not a file: {path}")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise AxcnnError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from exc
    if len(model.graph.node) == 0:
        raise AxcnnError(f"{path} is not a readable ONNX model (the graph has no nodes)")
    if uses_external_data(model):
        try:
            onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except Exception as exc:
            raise AxcnnError(f"cannot read the external data of {path}: {exc}") from exc
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AxcnnError(f"{path} fails the ONNX checker: {first}") from exc
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 1


def constant_tensors(model: onnx.ModelProto) -> dict[str, tuple[onnx.TensorProto, str]]:
    """Tensor name -> (TensorProto, source) for every initializer and every Constant node's tensor value."""
    graph = model.graph
    input_names = {i.name for i in graph.input}
    out: dict[str, tuple[onnx.TensorProto, str]] = {}
    for init in graph.initializer:
        out[init.name] = (init, "input-initializer" if init.name in input_names else "initializer")
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = (attr.t, "constant")
    return out


def inventory(model: onnx.ModelProto, min_weights: int = 64) -> tuple[list[LayerSpec], list[Skipped]]:
    """List shareable weights in topological (graph) order, and the tensors left alone with the reason.

    Raises AxcnnError when a weight holds NaN or infinity.
    """
    consts = constant_tensors(model)
    producer = {out: node for node in model.graph.node for out in node.output}

    def source_of(name: str, depth: int = 0) -> str | None:
        """The constant a weight operand comes from, through reshapes and transposes of a constant."""
        if name in consts:
            return name
        node = producer.get(name)
        if node is None or depth > 8 or node.op_type not in PASS_OPS or not node.input:
            return None
        if any(i and i not in consts for i in node.input[1:]):
            return None
        return source_of(node.input[0], depth + 1)

    layers: list[LayerSpec] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()

    def skip(name: str, op: str, reason: str) -> None:
        if name not in seen:
            seen.add(name)
            skipped.append(Skipped(name, op, reason))
            log.info("leaving %s (%s) dense: %s", name, op, reason)

    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        for pos in BIAS_INPUTS.get(node.op_type, ()):
            if pos < len(node.input) and node.input[pos] in consts:
                bias, _ = consts[node.input[pos]]
                if bias.data_type in FLOAT_TYPES and not np.all(np.isfinite(numpy_helper.to_array(bias))):
                    raise AxcnnError(f"bias {node.input[pos]} of {node.op_type} node {node.name or '?'} contains "
                                     "NaN or infinity")
                skip(node.input[pos], node.op_type, "bias")
        sources = {p: source_of(node.input[p]) for p in WEIGHT_OPS[node.op_type] if p < len(node.input)}
        const_pos = [p for p, src in sources.items() if src is not None]
        if node.op_type in ("Gemm", "MatMul") and len(const_pos) == 2:
            # both operands constant: the node folds away; nothing to learn from sharing it
            for p in const_pos:
                skip(sources[p], node.op_type, "both operands are constant")
            continue
        if not const_pos:
            continue
        pos = const_pos[0]
        name = sources[pos]
        if name in seen:
            continue
        tensor, source = consts[name]
        if tensor.data_type not in FLOAT_TYPES:
            skip(name, node.op_type, f"not floating point ({onnx.TensorProto.DataType.Name(tensor.data_type)})")
            continue
        array = numpy_helper.to_array(tensor)
        if array.size < min_weights:
            skip(name, node.op_type, f"{array.size} weights, below the {min_weights}-weight threshold")
            continue
        values = array.astype(np.float64) if array.dtype != np.float64 else array
        if not np.all(np.isfinite(values)):
            raise AxcnnError(f"weight {name} of {node.op_type} node {node.name or '?'} contains NaN or infinity")
        seen.add(name)
        layers.append(
            LayerSpec(
                name=name,
                op_type=node.op_type,
                node=node.name,
                shape=tuple(int(d) for d in array.shape),
                dtype=str(array.dtype),
                bits=FLOAT_TYPES[tensor.data_type],
                source=source,
                array=array,
                operand=_operand(node, pos, node.input[pos], name, producer),
            )
        )
    return layers, skipped


def _operand(node: onnx.NodeProto, pos: int, operand: str, source: str, producer: dict) -> Operand:
    attrs = {a.name: a for a in node.attribute}

    def int_attr(key: str, default: int) -> int:
        return int(attrs[key].i) if key in attrs else default

    trans = bool(int_attr("transB" if pos == 1 else "transA", 0)) if node.op_type == "Gemm" else False
    group = int_attr("group", 1) if node.op_type in ("Conv", "ConvTranspose") else 1
    direct, name = True, operand
    while name != source:  # the pass-through ops between the constant and the operand
        hop = producer[name]
        direct = direct and hop.op_type == "Identity"
        name = hop.input[0]
    return Operand(position=pos, trans=trans, group=group, direct=direct)


@dataclass(frozen=True)
class IOInfo:
    """The model input and the output used for scoring."""

    input_name: str
    input_shape: tuple  # ints for fixed dims, str/None for free dims
    input_dtype: np.dtype
    output_name: str
    fixed_batch: int | None


def io_info(model: onnx.ModelProto, output: str | None = None) -> IOInfo:
    """Find the single data input (graph inputs that are not initializers) and the scored output."""
    init_names = {i.name for i in model.graph.initializer}
    data_inputs = [i for i in model.graph.input if i.name not in init_names]
    if len(data_inputs) != 1:
        names = ", ".join(i.name for i in data_inputs) or "none"
        raise AxcnnError(f"axcnn needs a model with exactly one data input; this one has: {names}")
    inp = data_inputs[0]
    ttype = inp.type.tensor_type
    dims = tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
        for d in ttype.shape.dim
    )
    dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
    outputs = [o.name for o in model.graph.output]
    if not outputs:
        raise AxcnnError("the model has no graph output to score")
    if output is None:
        output = outputs[0]
    elif output not in outputs:
        raise AxcnnError(f"model has no output named {output!r}; outputs: {', '.join(outputs)}")
    fixed = dims[0] if dims and isinstance(dims[0], int) else None
    return IOInfo(inp.name, dims, np.dtype(dtype), output, fixed)


def weight_proto(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    """The TensorProto holding constant ``name`` (an initializer or a Constant node's value), to edit in place."""
    tensors = constant_tensors(model)
    if name not in tensors:
        raise KeyError(f"no constant tensor named {name!r} in the model")
    return tensors[name][0]
