"""Inspection of plain and weight-shared models: what each weight tensor takes, as data first."""

from __future__ import annotations

import numpy as np
import onnx

from axcnn import rewrite
from axcnn.model import FLOAT_TYPES, inventory

_DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "float64": 64}


def describe(model: onnx.ModelProto) -> dict:
    """Every weight tensor of Conv/ConvTranspose/Gemm/MatMul nodes and their biases, and for an axcnn model each
    shared layer's K, index bits, how it shares codebooks (granularity, codebooks, vectors), stored bytes and Eq. 1
    compression ratio (Eq. 1 counting every codebook: ``index_count * ceil(log2 K) + codebooks * K * vector_dim *
    B``)."""
    consumers: dict[str, str] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, node.op_type)
    tensors = []
    layers, skipped = inventory(model, min_weights=1)
    for spec in layers:
        tensors.append({"name": spec.name, "role": "weight", "op_type": spec.op_type, "shape": list(spec.shape),
                        "dtype": spec.dtype, "count": spec.weights, "bytes": spec.array.nbytes, "shared": False})
    consts = {t.name: t for t in model.graph.initializer}
    for s in skipped:
        t = consts.get(s.name)
        if t is None or t.data_type not in FLOAT_TYPES:
            continue
        count = int(np.prod(t.dims, dtype=np.int64))
        tensors.append({"name": s.name, "role": s.reason if s.reason == "bias" else "weight", "op_type": s.op_type,
                        "shape": list(t.dims), "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
                        if t.data_type != onnx.TensorProto.BFLOAT16 else "bfloat16",
                        "count": count, "bytes": count * FLOAT_TYPES[t.data_type] // 8, "shared": False})
    shared = rewrite.shared_layers(model)
    bits_before = bits_after = 0
    for rec in shared:
        count = int(np.prod(rec["shape"], dtype=np.int64)) if rec["shape"] else 1
        b = _DTYPE_BITS.get(rec["dtype"], 32)
        eq1 = rewrite.eq1_bits(rec["index_count"], rec["k"], b, codebooks=rec["codebooks"],
                               vector_dim=rec["vector_dim"])
        bits_before += count * b
        bits_after += eq1
        tensors.append({
            "name": rec["name"], "role": "weight", "op_type": consumers.get(rec["name"]), "shape": rec["shape"],
            "dtype": rec["dtype"], "count": count, "bytes": count * b // 8, "shared": True, "k": rec["k"],
            "index_bits": rec["index_bits"], "encoding": rec["encoding"], "granularity": rec["granularity"],
            "codebooks": rec["codebooks"], "vector_dim": rec["vector_dim"], "index_count": rec["index_count"],
            "axis": rec["axis"], "group_size": rec["group_size"], "vector_axis": rec["vector_axis"],
            "stored_bytes": rec["index_bytes"] + rec["centroid_bytes"], "eq1_bits": eq1,
            "compression_ratio": count * b / eq1,
        })
    metadata = {p.key: p.value for p in model.metadata_props if p.key.startswith("axcnn.")
                and p.key != rewrite.LAYERS_KEY}
    return {
        "shared_model": bool(shared),
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "ir_version": model.ir_version,
        "tensors": tensors,
        "compression_ratio": bits_before / bits_after if shared else None,
        "axcnn_metadata": metadata,
    }


def _sharing(t: dict) -> str:
    """How a shared layer shares its codebooks, in a few characters: layer, channel/4 (four channels a codebook),
    kernel, vector2 (pairs of weights an entry)."""
    if t["vector_dim"] > 1:
        return f"vector{t['vector_dim']}"
    if t["granularity"] == "channel":
        return f"channel/{t['group_size']}"
    return t["granularity"]


def render(info: dict) -> str:
    """A terminal table of :func:`describe`'s dict."""
    from axcnn.report import _table

    headers = ["tensor", "role", "op", "shape", "dtype", "count", "bytes"]
    if info["shared_model"]:
        headers += ["sharing", "K", "bits", "stored", "CR"]
    rows = []
    for t in info["tensors"]:
        name = t["name"] if len(t["name"]) <= 40 else "…" + t["name"][-39:]
        row = [name, t["role"], t["op_type"] or "-", "x".join(map(str, t["shape"])) or "scalar", t["dtype"],
               str(t["count"]), str(t["bytes"])]
        if info["shared_model"]:
            row += [_sharing(t), str(t["k"]), str(t["index_bits"]), str(t["stored_bytes"]),
                    f"{t['compression_ratio']:.2f}"] if t["shared"] else ["-"] * 5
        rows.append(row)
    lines = _table(headers, rows)
    weights = [t for t in info["tensors"] if t["role"] == "weight"]
    lines.append("")
    lines.append(f"{len(weights)} weight tensors, {sum(t['count'] for t in weights):,} weights; "
                 f"opset {info['opset']}, IR {info['ir_version']}")
    if info["shared_model"]:
        n = sum(t["shared"] for t in info["tensors"])
        version = info["axcnn_metadata"].get("axcnn.version", "?")
        lines.append(f"axcnn {version} model: {n} shared layers, compression ratio (Eq. 1) "
                     f"{info['compression_ratio']:.2f}x")
    return "\n".join(lines)
