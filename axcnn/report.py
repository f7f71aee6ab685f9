"""The report: data first. ``build`` makes a JSON-ready dict; the renderers in :mod:`axcnn.render` read only that dict.

Every figure comes from a measurement or from Eq. 1 on the tensors actually written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import onnx

from axcnn import __version__, atomic
from axcnn.cluster import index_bits
from axcnn.model import Skipped, constant_tensors
from axcnn.render.table import text_table as _table  # noqa: F401  (axcnn.inspect imports it from here)

SCHEMA_VERSION = 2


def settings_dict(config, preprocess, data_path, samples: int, io) -> dict:
    """The run's settings: every option (after the preset), the data path (None: no --data) and sample count."""
    s = config.as_dict()
    s.update(preprocess.as_dict())
    s.update(data=None if data_path is None else str(data_path), samples=samples, input=io.input_name,
             output=io.output_name)
    return s


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return int(next((e.value for e in t.external_data if e.key == "length"), 0))
    return t.ByteSize()


def build(*, model_path, output_path, settings, exploration, skipped: Sequence[Skipped], stored, final_correct,
          out_model, original, file_bytes_before, file_bytes_after, final_check_s, total_s, providers,
          section: dict | None = None, evaluation: dict | None = None, candidates_resumed: int = 0,
          executor: dict | None = None) -> dict:
    """The report of one run. ``candidates_resumed``: scored candidates taken from the journal of an earlier,
    stopped invocation (timing.candidates_scored counts only those this invocation scored). ``executor``: where
    the search's scoring tasks ran (``Executor.describe()``)."""
    section = dict(section or {"mode": "greedy"})
    n = exploration.samples
    stored_by_name = {s.name: s for s in stored}
    layers = []
    bits_before = bits_after = 0
    for d in exploration.decisions:
        spec, ch = d.spec, d.chosen
        st = stored_by_name[spec.name]
        sc = d.shared()
        bits_before += spec.weights * spec.bits
        layer_bits = sc.eq1_bits(spec.bits) + d.extra_bits
        bits_after += layer_bits
        layers.append({
            "name": spec.name, "op_type": spec.op_type, "node": spec.node, "shape": list(spec.shape),
            "dtype": spec.dtype, "bits": spec.bits, "weights": spec.weights, "unique_values": d.n_unique,
            "k": d.clustering.k, "k_clamped": d.clamped, "index_bits": index_bits(d.clustering.k),
            "inertia": d.clustering.inertia, "score": ch.score, "accuracy_loss_pp": _pp(exploration, ch.correct),
            "compression_ratio": spec.weights * spec.bits / layer_bits, "eq1_bits": layer_bits,
            "stored_bytes": st.stored_bytes,
            "index_bytes": st.index_bytes, "centroid_bytes": st.centroid_bytes, "encoding": st.encoding,
            "scoring_plan": d.plan, **sc.sharing.as_dict(), "codebooks": sc.codebooks,
            "granularity_note": sc.layout.note,
            "extra_bits": d.extra_bits, "predicted_loss": d.predicted, "predicted_loss_pp": d.predicted_loss_pp,
            "repair": None if d.repair is None else {"scale": bool(d.extra_bits), "bias": True},
            "timing": {"clustering_s": d.clustering_s, "estimate_s": d.estimate_s, "scoring_s": d.scoring_s},
            "candidates": [
                {"k": c.k, "inertia": c.inertia, "estimate": c.estimate, "scored": c.scored, "score": c.score,
                 "stopped_early": c.stopped_early, "samples_seen": c.samples_seen,
                 "compression_ratio": c.compression_ratio}
                for c in d.candidates
            ],
        })
    reference = exploration.reference_correct / n
    final = final_correct / n
    measured_on, n_measured = "selection", n
    ver = (evaluation or {}).get("verification")
    if ver:  # the honest figure: samples the search never saw
        reference, final, measured_on, n_measured = ver["reference_score"], ver["final_score"], "verification", \
            ver["samples"]
    scoring_s = exploration.scoring_s if exploration.scoring_s is not None else sum(
        d.scoring_s for d in exploration.decisions)
    estimate_s = sum(d.estimate_s for d in exploration.decisions)
    clustered_payload = sum(s.stored_bytes for s in stored)
    original_names = set(constant_tensors(original))
    shared_names = {s.name for s in stored}
    unclustered = sum(
        _tensor_bytes(t) for name, (t, _) in constant_tensors(out_model).items()
        if name in original_names and name not in shared_names
    )
    repair_names = {n for d in exploration.decisions if d.affine is not None
                    for n in (d.affine.scale, d.affine.bias)} - original_names
    repair_bytes = sum(_tensor_bytes(t) for name, (t, _) in constant_tensors(out_model).items()
                       if name in repair_names)
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "axcnn", "version": __version__, "providers": list(providers),
                 "executor": executor or {"name": "local"}},  # where the search's scoring tasks ran
        "model": str(model_path),
        "output": str(output_path),
        "settings": settings,
        "metric": settings["metric"],
        **section,
        "evaluation": evaluation or {"selection": {
            "samples": n, "reference_score": exploration.reference_correct / n, "final_score": final_correct / n,
            "accuracy_loss_pp": round((exploration.reference_correct - final_correct) / n * 100, 6)},
            "verification": None},
        "accuracy_measured_on": measured_on,
        "samples": n_measured,
        "reference_score": reference,
        "final_score": final,
        "accuracy_loss_pp": round((reference - final) * 100, 6),
        "compression_ratio": bits_before / bits_after,
        "weights_clustered": sum(d.spec.weights for d in exploration.decisions),
        "eq1_bits_before": bits_before,
        "eq1_bits_after": bits_after,
        "file_bytes_before": file_bytes_before,
        "file_bytes_after": file_bytes_after,
        "file_ratio": file_bytes_before / file_bytes_after,
        "file_breakdown": {
            "how": "clustered_payload = raw bytes of the index and centroid tensors of shared layers; "
                   "unclustered_tensors = serialized bytes of the original constant tensors kept dense (biases, "
                   "small or skipped weights); repair_tensors = the repair's per-channel scales and new biases; "
                   "graph_and_decode_overhead = the rest of the written file(s): "
                   "nodes, names, decode helper constants, metadata and protobuf framing",
            "clustered_payload": clustered_payload,
            "unclustered_tensors": unclustered,
            "repair_tensors": repair_bytes,
            "graph_and_decode_overhead": file_bytes_after - clustered_payload - unclustered - repair_bytes,
        },
        "timing": {
            "clustering_s": sum(d.clustering_s for d in exploration.decisions),
            "estimate_s": estimate_s,
            "scoring_s": scoring_s,
            # budget and Pareto modes: the table's entries run end to end plus the networks assembled and measured
            "candidates_scored": (section["search_counts"]["measured_entries"] + section["search_counts"]
                                  ["assemblies"]) if "search_counts" in section else
            sum(c.scored for d in exploration.decisions for c in d.candidates) - candidates_resumed,
            "candidates_resumed": candidates_resumed,
            "candidates_stopped_early": sum(c.stopped_early for d in exploration.decisions for c in d.candidates),
            "t_pass_s": exploration.t_pass_s,
            # the whole search (budget and Pareto modes: table, assemblies, measurements) in passes of the dense model
            "cost_t_pass": ((section["search_s"] if "search_s" in section else scoring_s + estimate_s)
                            / exploration.t_pass_s if exploration.t_pass_s else None),
            "final_check_s": final_check_s,
            "total_s": total_s,
        },
        "estimator": exploration.estimator,
        "layers": layers,
        "skipped": [{"name": s.name, "op_type": s.op_type, "reason": s.reason} for s in skipped]
        + [{"name": name, "op_type": None, "reason": reason} for name, reason in exploration.skipped],
    }


def _pp(exploration, correct: int | None) -> float | None:
    if correct is None:
        return None
    return round((exploration.reference_correct - correct) / exploration.samples * 100, 6)


def write_json(report: dict, path: str | os.PathLike) -> None:
    """Write atomically: a temporary file in the same folder, fsync, rename (see :mod:`axcnn.atomic`). Raises
    AxcnnError (one line) when the file cannot be written."""
    atomic.write_text(path, json.dumps(report, indent=2) + "\n")
