"""The repair's graph edit (``set_channel_affine``): after a layer's weight is clustered, a per-output-channel scale
s and a bias t are fitted; the layer is made to compute s * (W x) + t with s as a Mul after the layer, so the weight
stays shared. ``affine_site`` says whether a weight supports it, and names the tensors involved.

Works on opset 7 and later only. The graph editing itself is in :mod:`axcnn.graphedit`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from axcnn.graphedit import (
    DOMAINS,
    LAYER_OPS,
    Edit,
    attr,
    bias_of,
    channels_of,
    const_slot,
    layer_weight,
    matmul_rank,
    per_channel,
    set_attr,
)
from axcnn.model import Skipped


@dataclass(frozen=True)
class AffineSite:
    """Where ``set_channel_affine`` acts for one weight, and the tensors it owns there.

    ``output`` is the tensor the layer's consumers read: W x + b before the edit, s * (W x) + t after it (the same
    name, so cached activations and suffix plans keyed on it stay valid). ``scale`` and ``bias`` are the
    initializers the edit writes; a search may swap their values per candidate (``arrays`` gives them).
    """

    weight: str
    node: str  # the layer's node name
    op_type: str
    axis: int  # the weight's output-channel axis
    channels: int
    output: str
    scale: str  # f"{weight}.axcnn_scale": s, shaped to broadcast on the output's channel axis
    bias: str  # f"{weight}.axcnn_bias": t / s as the Conv / ConvTranspose / Gemm bias input; t for MatMul's Add
    scale_shape: tuple[int, ...]
    dtype: str  # of the weight, scale and bias

    def arrays(self, scale, bias) -> dict[str, np.ndarray]:
        """{scale name: s, bias name: stored bias} as ``set_channel_affine`` stores them for per-channel s, t."""
        s = _vector("scale", scale, self.channels)
        t = _vector("bias", bias, self.channels)
        if self.op_type != "MatMul":
            if np.any(s == 0):
                raise ValueError(f"scale must be nonzero for a {self.op_type} layer (its bias stores t / s); "
                                 f"channel {int(np.flatnonzero(s == 0)[0])} is 0")
            t = t / s
        return {self.scale: s.reshape(self.scale_shape).astype(self.dtype), self.bias: t.astype(self.dtype)}


def _vector(field: str, value, channels: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size != channels or not np.all(np.isfinite(arr)):
        raise ValueError(f"{field} must hold {channels} finite values (one per output channel); got shape "
                         f"{list(np.shape(value))}" + ("" if arr.size != channels else " with NaN or infinity"))
    return arr


@dataclass
class _Parts:
    layer: onnx.NodeProto
    mul: onnx.NodeProto | None  # the scale Mul after the layer, once inserted
    add: onnx.NodeProto | None  # MatMul only: its bias Add (inserted, or an existing Add by a per-column constant)


def _site(ed: Edit, weight: str) -> tuple[AffineSite, _Parts] | Skipped:
    users = ed.uses.get(weight, [])
    layers = [u for u in users if u.op_type in LAYER_OPS and u.domain in DOMAINS]
    if not layers:
        return Skipped(weight, users[0].op_type if users else "?", "no Conv, ConvTranspose, Gemm or MatMul reads it "
                       "directly (it may reach its layer through a Reshape or Transpose)")
    node = layers[0]
    op = node.op_type
    if ed.opset < 7:
        return Skipped(weight, op, f"opset {ed.opset} is below 7")
    if len(node.input) < 2 or node.input[1] != weight:
        return Skipped(weight, op, "it is not the layer's weight operand (input 1)")
    got = layer_weight(ed, node)
    if isinstance(got, str):
        return Skipped(weight, op, got)
    w = got[1]
    if op == "ConvTranspose" and int(attr(node, "group", 1)) != 1:
        return Skipped(weight, op, "grouped ConvTranspose: its output channels span two weight axes")
    if op != "MatMul" and isinstance(bias_of(ed, node), str):
        return Skipped(weight, op, bias_of(ed, node))
    names = (f"{weight}.axcnn_scale", f"{weight}.axcnn_bias")
    if any(n in ed.producer or (n in ed.names() and n not in ed.consts) for n in names):
        return Skipped(weight, op, f"the name {names[0]} or {names[1]} is taken by another tensor")
    axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}.get(op, 0 if attr(node, "transB", 0) else 1)
    channels = channels_of(node, w)

    def follower(name: str, op_type: str) -> onnx.NodeProto | None:
        users = ed.uses.get(name, [])
        if len(users) != 1 or ed.n_uses(name) != 1 or users[0].op_type != op_type or len(users[0].input) != 2:
            return None
        return users[0]

    mul = follower(node.output[0], "Mul")
    if mul is not None and names[0] not in mul.input:
        mul = None
    add = None
    if op == "MatMul":
        y = mul.output[0] if mul is not None else node.output[0]
        add = follower(y, "Add")
        const = ed.array(add.input[const_slot(add, y)]) if add is not None else None
        if const is None or per_channel(const, matmul_rank(ed, y, const), -1, channels) is None:
            add = None
        if mul is not None and add is None:
            return Skipped(weight, op, f"the Mul after it by {names[0]} has no bias Add after it")
    output = (add or mul or node).output[0]
    shape = (channels,) + (1,) * (w.ndim - 2 if op in ("Conv", "ConvTranspose") else 0)
    site = AffineSite(weight, node.name, op, axis, channels, output, *names, shape, str(w.dtype))
    return site, _Parts(node, mul, add)


def affine_site(model: onnx.ModelProto, weight: str) -> AffineSite | Skipped:
    """Whether ``set_channel_affine`` supports ``weight``: its AffineSite (the weight's output-channel axis, the
    layer's output tensor, the scale and bias initializer names), or a ``model.Skipped`` with the reason."""
    got = _site(Edit(model), weight)
    return got if isinstance(got, Skipped) else got[0]


def current_bias(model: onnx.ModelProto, weight: str) -> np.ndarray:
    """The per-channel bias the layer reading ``weight`` adds now, as float64 [C]: what ``apply_channel_affine``'s
    ``bias`` must be for the layer to compute what it does (with a scale of ones). Conv / ConvTranspose: the bias
    input (zeros when absent); Gemm: beta * C, broadcast per channel; MatMul: its bias Add's constant (zeros when it
    has none). Raises ValueError when the weight is not supported (see ``affine_site``)."""
    ed = Edit(model)
    got = _site(ed, weight)
    if isinstance(got, Skipped):
        raise ValueError(f"cannot read the bias of {weight}: {got.reason}")
    site, parts = got
    if site.op_type == "MatMul":
        if parts.add is None:
            return np.zeros(site.channels)
        y = (parts.mul or parts.layer).output[0]
        const = ed.array(parts.add.input[const_slot(parts.add, y)])
        vec = per_channel(const, matmul_rank(ed, y, const), -1, site.channels)
        out = np.zeros(site.channels) if vec is None else vec
    else:
        name, values = bias_of(ed, parts.layer)
        out = np.zeros(site.channels) if values is None else np.broadcast_to(
            np.asarray(values, dtype=np.float64).reshape(-1), (site.channels,)).copy()
        if site.op_type == "Gemm":
            out = out * float(attr(parts.layer, "beta", 1.0))
    if parts.mul is not None:  # a template or an earlier edit: the stored bias is t / s
        s = ed.array(site.scale).astype(np.float64).reshape(-1)
        out = out * s if site.op_type != "MatMul" else out
    return out


def apply_channel_affine(model: onnx.ModelProto, weight: str, scale, bias, *,
                         always_scale: bool = False) -> AffineSite:
    """In place: make the layer that reads ``weight`` compute s * (W x) + t per output channel (t replaces the
    layer's bias). Conv / ConvTranspose / Gemm: the bias input becomes t / s (Gemm's beta becomes 1) and a Mul by s
    follows the layer. MatMul: Mul by s then Add of t follow it (an existing Add by a per-column constant is reused
    as that Add); this order needs no division, so a zero scale is allowed there. With every s equal to 1 there is
    no Mul, unless ``always_scale`` (a template whose scale a search replaces per candidate). Called again on the
    same layer it rewrites the same initializers, adding or removing the Mul as needed. The layer's output tensor
    keeps its name (the layer's own output is renamed), so graph outputs and consumers are untouched.

    Raises ValueError when the weight is not supported (see ``affine_site``) or scale / bias are not C finite values.
    """
    ed = Edit(model)
    got = _site(ed, weight)
    if isinstance(got, Skipped):
        raise ValueError(f"cannot set a channel affine on {weight}: {got.reason}")
    site, parts = got
    arrays = site.arrays(scale, bias)
    with_mul = always_scale or bool(np.any(arrays[site.scale] != 1))
    layer, mul, add = parts.layer, parts.mul, parts.add
    stale: set[str] = set()
    if site.op_type == "MatMul":
        if add is None:
            out, layer.output[0] = layer.output[0], ed.fresh(f"{weight}.axcnn_linear")
            add = helper.make_node("Add", [layer.output[0], site.bias], [out], name=ed.fresh(f"{weight}.axcnn_add"))
            add = ed.insert_after(layer, add)
        data = 0 if add.input[0] == (mul or layer).output[0] else 1
        target, slot = add, 1 - data
    else:
        target, slot = layer, 2
        if site.op_type == "Gemm":
            set_attr(layer, "beta", 1.0)
    while len(target.input) <= slot:
        target.input.append("")
    if target.input[slot] != site.bias:
        ed.dropped.add(target.input[slot])
        target.input[slot] = site.bias
    ed.set_init(site.bias, arrays[site.bias])
    if with_mul:
        ed.set_init(site.scale, arrays[site.scale])
    if with_mul and mul is None:
        name = ed.fresh(f"{weight}.axcnn_mul")
        if site.op_type == "MatMul":  # between the MatMul and its Add
            mid = ed.fresh(f"{weight}.axcnn_scaled")
            mul = helper.make_node("Mul", [add.input[data], site.scale], [mid], name=name)
            add.input[data] = mid
        else:  # the layer's own output is renamed; the Mul produces the name its consumers read
            out, layer.output[0] = layer.output[0], ed.fresh(f"{weight}.axcnn_linear")
            mul = helper.make_node("Mul", [layer.output[0], site.scale], [out], name=name)
        ed.insert_after(layer, mul)
    elif not with_mul and mul is not None:
        if site.op_type == "MatMul":
            add.input[data] = mul.input[0]
        else:
            stale.add(layer.output[0])
            layer.output[0] = mul.output[0]
        ed.remove(mul)
    ed.cleanup(stale)
    return site


def set_channel_affine(model: onnx.ModelProto, weight: str, scale, bias, *,
                       always_scale: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` with ``apply_channel_affine`` done; ``model`` is not modified."""
    work = copy.deepcopy(model)
    apply_channel_affine(work, weight, scale, bias, always_scale=always_scale)
    return work
