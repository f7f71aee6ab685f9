"""``fold_bn`` (``--fold-bn``): fold inference BatchNormalization, and Mul / Add by a per-channel (or scalar)
constant, that directly follow a Conv, ConvTranspose or Gemm into the layer's weight and bias, repeatedly. The weights
axcnn then shares are the ones onnxruntime (or a weight-sharing accelerator) actually multiplies by.

Works on opset 7 and later only (onnxruntime's floor; older Mul, Add and Gemm broadcast by attribute). The graph
editing itself is in :mod:`axcnn.graphedit`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import onnx

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
    scale_weight,
    set_attr,
)

log = logging.getLogger(__name__)

FOLDABLE_OPS = ("BatchNormalization", "Mul", "Add")


@dataclass(frozen=True)
class Folded:
    """What ``fold_bn`` folded into one layer."""

    weight: str  # the layer's weight tensor (name unchanged; values now include the folded scales)
    node: str  # the layer's node name
    op_type: str
    folded: tuple[tuple[str, str], ...]  # (op type, node name) of each node folded in, in graph order
    bias: str | None  # the bias tensor afterwards: the layer's bias input, or for MatMul its bias Add's constant
    output: str  # the tensor the layer (with its bias Add, for MatMul) now produces



def _step(ed: Edit, node: onnx.NodeProto, tail: onnx.NodeProto, has_bias_add: bool):
    """The next node after ``tail`` that can fold into ``node``, as (that node, k, c, its constant inputs) with the
    layer then computing k * y + c per output channel; None when there is none (a reason is logged when a node
    looked foldable but is not)."""
    x = tail.output[0]
    users = [u for u in ed.uses.get(x, ()) if u.op_type in FOLDABLE_OPS and u.domain in DOMAINS]
    if not users:
        return None
    f = users[0]
    if f.op_type == "BatchNormalization":
        if f.input[0] != x:
            return None
        params = list(f.input[1:5])
        if len(params) != 4 or any(p not in ed.consts for p in params):
            return _skip(f, node, "its parameters are not all constants")
    else:
        params = [i for i in f.input if i != x]
        if len(params) != 1 or len(f.input) != 2 or params[0] not in ed.consts:
            return None  # not an affine op by a constant: nothing to fold, nothing to report
    if ed.n_uses(x) != 1:
        why = "is a graph output" if x in ed.outputs else f"has {ed.n_uses(x)} consumers"
        return _skip(f, node, f"the layer output {x} {why}")
    if ed.opset < 7:
        return _skip(f, node, f"opset {ed.opset} is below 7")
    got = layer_weight(ed, node)
    if isinstance(got, str):
        if node.op_type == "MatMul" and f.op_type == "Add" and not has_bias_add:
            return None  # an Add after MatMul is its bias: nothing folds yet
        return _skip(f, node, got)
    channels = channels_of(node, got[1])
    if f.op_type == "BatchNormalization":
        extra = [o for o in f.output[1:] if o]
        if extra or attr(f, "training_mode", 0) or not attr(f, "spatial", 1):
            return _skip(f, node, "it is not in inference form")
        scale, b, mean, var = (ed.array(p).astype(np.float64) for p in params)
        if any(p.shape != (channels,) for p in (scale, b, mean, var)):
            return _skip(f, node, f"its parameters are not of shape [{channels}]")
        if node.op_type == "MatMul" or has_bias_add:
            return _skip(f, node, "BatchNormalization after MatMul normalises axis 1, not the output columns")
        k = scale / np.sqrt(var + float(attr(f, "epsilon", 1e-5)))
        return f, k, b - mean * k, params
    const = ed.array(params[0])
    if node.op_type in ("Conv", "ConvTranspose"):
        rank, axis = got[1].ndim, 1 - got[1].ndim
    elif node.op_type == "Gemm":
        rank, axis = 2, -1
    else:
        rank, axis = matmul_rank(ed, x, const), -1
    vec = per_channel(const, rank, axis, channels)
    if vec is None:
        return _skip(f, node, f"its constant of shape {list(const.shape)} does not act per output channel")
    if f.op_type == "Mul":
        return f, vec, np.zeros(channels), params
    return f, np.ones(channels), vec, params


def _skip(f: onnx.NodeProto, node: onnx.NodeProto, reason: str) -> None:
    log.info("not folding %s %s into %s %s: %s", f.op_type, f.name or "?", node.op_type, node.name or "?", reason)
    return None


def _fold_layer(ed: Edit, node: onnx.NodeProto, stale: set[str]) -> Folded | None:
    folded: list[tuple[str, str]] = []
    tail, bias_add = node, None  # for MatMul, the Add by a per-column constant that acts as its bias
    while True:
        step = _step(ed, node, tail, bias_add is not None)
        if step is None:
            break
        f, k, c, params = step
        if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            bias = bias_of(ed, node)
            if isinstance(bias, str):
                _skip(f, node, bias)
                break
        if node.op_type == "MatMul" and bias_add is None and f.op_type == "Add":
            bias_add = tail = f  # adopt it as the bias: it stays, later Mul / Add fold into the weight and it
            continue
        wname, w = layer_weight(ed, node)
        if np.any(k != 1):
            ed.write(node, 1, scale_weight(node, w, k), wname)
        if node.op_type == "MatMul":
            if bias_add is not None:
                slot = const_slot(bias_add, node.output[0])
                t = ed.array(bias_add.input[slot])
                ed.write(bias_add, slot, (k * t.astype(np.float64) + c).astype(t.dtype), f"{wname}.bias")
        else:
            bname, b = bias
            if node.op_type == "Gemm" and b is not None:
                b = float(attr(node, "beta", 1.0)) * b.astype(np.float64)
                set_attr(node, "beta", 1.0)
            if b is not None or np.any(c != 0):
                base = np.zeros(len(k)) if b is None else b.astype(np.float64)
                ed.write(node, 2, (k * base + c).astype(w.dtype), f"{wname}.bias")
        stale.add(tail.output[0])
        tail.output[0] = f.output[0]
        ed.remove(f)
        ed.dropped.update(params)
        ed.refresh()
        folded.append((f.op_type, f.name))
    if not folded:
        return None
    if bias_add is not None:
        bias_name = bias_add.input[const_slot(bias_add, node.output[0])]
    else:
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    record = Folded(node.input[1], node.name, node.op_type, tuple(folded), bias_name, tail.output[0])
    log.info("folded %s into %s %s (weight %s)", ", ".join(f"{o} {n or '?'}" for o, n in folded), node.op_type,
             node.name or "?", record.weight)
    return record




def fold_bn(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Folded]]:
    """A copy of ``model`` with inference BatchNormalization and per-channel / scalar Mul and Add by constants
    folded into the Conv, ConvTranspose, Gemm or MatMul they directly follow, and what was folded where.

    A fold happens only when it keeps the model's meaning: the layer's output has one consumer and is not a graph
    output, the weight is a constant used by that layer alone, the bias and the folded node's operands are
    constants, and the constant acts per output channel or is a scalar. MatMul keeps a following Add by a
    per-column constant as its bias (Mul and Add after it fold into the weight and that Add). BatchNormalization
    params are combined in float64 and cast back to the weight's dtype. Reasons for not folding are logged (INFO).
    ``model`` is not modified.
    """
    work = copy.deepcopy(model)
    ed = Edit(work)
    stale: set[str] = set()
    records = []
    for node in list(work.graph.node):
        if node.op_type in LAYER_OPS and node.domain in DOMAINS and len(node.input) > 1:
            record = _fold_layer(ed, node, stale)
            if record is not None:
                records.append(record)
    ed.cleanup(stale)
    return work, records
