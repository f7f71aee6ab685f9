"""Tiny single-layer graphs built in code, shared by test_fold.py and test_affine.py."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

C = 6  # output channels of every test layer


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # compare the graphs as written
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def close(a: list[np.ndarray], b: list[np.ndarray], rtol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol * float(np.abs(v).max()))


class Builder:
    """A tiny model: one layer, then a chain of BN / Mul / Add by constants, then Relu (or the chain's end as the
    graph output)."""

    def __init__(self, seed: int = 0, ir: int = 8, opset: int = 13, dtype=np.float32):
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.ir, self.opset = ir, opset
        self.extra_inputs: list[onnx.ValueInfoProto] = []

    def const(self, name: str, array: np.ndarray, node: bool = False) -> str:
        array = np.asarray(array, self.dtype)
        if node:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_c",
                                               value=numpy_helper.from_array(array, name)))
        else:
            self.inits.append(numpy_helper.from_array(array, name))
        return name

    def normal(self, shape, scale=0.5) -> np.ndarray:
        return self.rng.normal(0, scale, shape).astype(self.dtype)

    def layer(self, op: str, *, bias=True, group=1, dims=2, trans_b=1, alpha=1.0, beta=1.0, batch_rank=2,
              weight_node=False) -> str:
        """Add the layer reading input "x"; return its output name. Sets self.x_shape and self.out_rank."""
        cin = 4
        self.conv = op in ("Conv", "ConvTranspose")
        if self.conv:
            spatial = [5] * dims
            self.x_shape = [2, cin, *spatial]
            wshape = [C, cin // group, *[3] * dims] if op == "Conv" else [cin, C // group, *[3] * dims]
            attrs = {"group": group, "pads": [1] * (2 * dims)}
            self.out_rank = 2 + dims
        else:
            self.x_shape = [3, 5] if batch_rank == 2 else [2, 3, 5]
            wshape = [5, C] if op == "MatMul" or not trans_b else [C, 5]
            attrs = {} if op == "MatMul" else {"transB": trans_b, "alpha": alpha, "beta": beta}
            self.out_rank = len(self.x_shape)
        inputs = ["x", self.const("w", self.normal(wshape), node=weight_node)]
        if bias and op != "MatMul":
            inputs.append(self.const("b", self.normal([C], 0.2)))
        self.nodes.append(helper.make_node(op, inputs, ["y"], name="layer", **attrs))
        return "y"

    def channel_shape(self, kind: str = "channel") -> list[int]:
        if kind == "scalar":
            return []
        return [C] + [1] * (self.out_rank - 2) if self.conv and kind == "channel" else [C]

    def bn(self, src: str, name: str, const_nodes=False) -> str:
        p = [self.const(f"{name}_{k}", v, node=const_nodes) for k, v in (
            ("scale", self.rng.uniform(0.5, 2.0, C)), ("b", self.normal([C], 0.3)),
            ("mean", self.normal([C], 0.3)), ("var", self.rng.uniform(0.2, 3.0, C)))]
        self.nodes.append(helper.make_node("BatchNormalization", [src, *p], [name], name=name, epsilon=1e-3))
        return name

    def affine(self, op: str, src: str, name: str, shape: list[int] | None = None, first=False) -> str:
        shape = self.channel_shape() if shape is None else shape
        values = self.rng.uniform(0.5, 1.5, shape) * self.rng.choice([-1, 1], shape) if op == "Mul" else \
            self.normal(shape, 0.3)
        k = self.const(f"{name}_k", values)
        self.nodes.append(helper.make_node(op, [k, src] if first else [src, k], [name], name=name))
        return name

    def model(self, out: str, relu=True, out_rank=None) -> onnx.ModelProto:
        if relu:
            self.nodes.append(helper.make_node("Relu", [out], ["z"], name="relu"))
            out = "z"
        elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        inputs = [helper.make_tensor_value_info("x", elem, self.x_shape), *self.extra_inputs]
        if self.ir < 4:
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        graph = helper.make_graph(self.nodes, "t", inputs,
                                  [helper.make_tensor_value_info(out, elem, None)],
                                  initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=self.ir)
        inferred = onnx.shape_inference.infer_shapes(m).graph.output[0]
        m.graph.output[0].CopyFrom(inferred)
        onnx.checker.check_model(m, full_check=True)
        return m


def sample(model: onnx.ModelProto, seed: int = 5) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    return np.random.default_rng(seed).normal(0, 1, dims).astype(dtype)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if n.op_type != "Constant"]


def chain(op: str, steps: list[str], seed=0, dtype=np.float32, **layer) -> onnx.ModelProto:
    """Layer -> steps ("bn", "mul", "add", "mul_scalar", "add_first", "add_4d") -> Relu."""
    b = Builder(seed, dtype=dtype)
    y = b.layer(op, **layer)
    for i, step in enumerate(steps):
        name = f"s{i}"
        if step == "bn":
            y = b.bn(y, name)
        elif step == "mul_scalar":
            y = b.affine("Mul", y, name, shape=b.channel_shape("scalar"))
        elif step == "add_first":
            y = b.affine("Add", y, name, first=True)
        elif step == "add_4d":
            y = b.affine("Add", y, name, shape=[1, C, 1, 1])
        else:
            y = b.affine(step.capitalize(), y, name)
    return b.model(y)
