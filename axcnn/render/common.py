"""What every renderer reads from a report dict, in one place, tolerant of absent optional fields.

A report from the first round has none of the fields planned for schema 2 (mode, budget, evaluation,
accuracy_measured, data, sensitivity, front, per-layer granularity/vector_dim/codebooks/predicted_loss/repair);
each helper here returns None or a default for them, so the renderers only decide how to show what is there.
Nothing here imports a heavy module: the plots are in :mod:`axcnn.render.plots`.
"""

from __future__ import annotations

import math
from pathlib import Path

INSTALL_PLOTS = "pip install 'axcnn[plots]'"
PLOTS_MISSING = f"The plots need matplotlib, which is not installed here. Install it with: {INSTALL_PLOTS}"


def is_num(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def pct(x, digits: int = 2) -> str:
    """A score in [0, 1] as a percentage; '-' when absent."""
    return f"{x * 100:.{digits}f}%" if is_num(x) else "-"


def pp(x, digits: int = 2) -> str:
    return f"{x:.{digits}f} pp" if is_num(x) else "-"


def ratio(x, digits: int = 2) -> str:
    return f"{x:.{digits}f}x" if is_num(x) else "-"


def num(x, spec: str = "") -> str:
    if x is None:
        return "-"
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def seconds(x) -> str:
    if not is_num(x):
        return "-"
    return f"{x:.1f}s" if x >= 1 else f"{x * 1000:.1f} ms"


def fmt_shape(shape) -> str:
    if isinstance(shape, list | tuple):
        return "x".join(str(s) for s in shape) or "scalar"
    return "-" if shape is None else str(shape)


def short_name(name: str, width: int) -> str:
    """Keep the end of a long tensor name: that is the part that tells layers apart."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def model_name(rep: dict) -> str:
    return Path(str(rep.get("model") or "model")).name


def mode(rep: dict) -> str:
    return rep.get("mode") or "greedy"


def accuracy_measured(rep: dict) -> bool:
    """False only when the report says so (a data-free run); first-round reports measured accuracy on labels."""
    return rep.get("accuracy_measured", True) is not False


def accuracy_note(rep: dict) -> str | None:
    """The warning a reader must not miss when the scores are not accuracy, else None."""
    if accuracy_measured(rep):
        return None
    data = rep.get("data") or {}
    source = data.get("source")
    on = f"{source} inputs" if source else "inputs without labels"
    return (f"accuracy not measured: there were no labelled data; every score in this report is agreement with "
            f"the original model on {on}, not accuracy")


def data_text(rep: dict) -> str | None:
    data = rep.get("data")
    if not isinstance(data, dict):
        return None
    parts = [str(data.get("source") or "?")]
    if data.get("path"):
        parts.append(str(data["path"]))
    if "labelled" in data:
        parts.append("labelled" if data["labelled"] else "unlabelled")
    return ", ".join(parts)


def budget_text(rep: dict) -> str | None:
    """'max loss 1.00 pp, target CR 8.00x: met' for a budget-mode report, else None."""
    b = rep.get("budget")
    if not isinstance(b, dict):
        return None
    goals = []
    if is_num(b.get("max_loss_pp")):
        goals.append(f"max loss {b['max_loss_pp']:.2f} pp")
    if is_num(b.get("target_cr")):
        goals.append(f"target CR {b['target_cr']:.2f}x")
    met = b.get("met")
    verdict = "met" if met is True else "NOT met" if met is False else "unknown"
    checks = b.get("verifications")
    if isinstance(checks, list) and len(checks) > 1:
        # a pass after step-downs: say what the held-out samples said of the networks refused on the way
        refused = ", ".join(f"{c['verification_loss_pp']:.2f} pp at {c['compression_ratio']:.2f}x" for c in checks[:-1]
                            if is_num(c.get("verification_loss_pp")) and is_num(c.get("compression_ratio")))
        verdict += f" on verification check {len(checks)} (refused: {refused})"
    return f"{', '.join(goals) or 'no goal recorded'}: {verdict}"


def evaluations(rep: dict) -> list[dict]:
    """One row per set the final model was measured on: {'set', 'samples', 'reference_score', 'final_score',
    'accuracy_loss_pp', 'ci95_pp', 'disagreements'}. A first-round report has one, the set it scored on."""
    ev = rep.get("evaluation")
    rows = []
    if isinstance(ev, dict):
        for name in ("selection", "verification"):
            e = ev.get(name)
            if isinstance(e, dict):
                rows.append({"set": name, "samples": e.get("samples"), "reference_score": e.get("reference_score"),
                             "final_score": e.get("final_score"), "accuracy_loss_pp": e.get("accuracy_loss_pp"),
                             "ci95_pp": e.get("ci95_pp"), "disagreements": e.get("disagreements")})
    if not rows:
        rows.append({"set": "scoring", "samples": rep.get("samples"), "reference_score": rep.get("reference_score"),
                     "final_score": rep.get("final_score"), "accuracy_loss_pp": rep.get("accuracy_loss_pp"),
                     "ci95_pp": None, "disagreements": None})
    return rows


def ci_text(ci) -> str | None:
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(is_num(v) for v in ci):
        return f"[{ci[0]:.2f}, {ci[1]:.2f}] pp"
    return None


def evaluation_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the evaluation table; the CI and disagreement columns only when some row has them."""
    headers = ["set", "samples", "reference", "final", "loss"]
    cells = [[e["set"], num(e["samples"], ","), pct(e["reference_score"]), pct(e["final_score"]),
              pp(e["accuracy_loss_pp"])] for e in rows]
    if any(ci_text(e["ci95_pp"]) for e in rows):
        headers.append("95% CI of the loss")
        for c, e in zip(cells, rows, strict=True):
            c.append(ci_text(e["ci95_pp"]) or "-")
    if any(e["disagreements"] is not None for e in rows):
        headers.append("disagreements")
        for c, e in zip(cells, rows, strict=True):
            c.append(num(e["disagreements"], ","))
    return headers, cells


def headline_evaluation(rep: dict) -> dict:
    """The evaluation a reader should trust most: verification when there is one, else the first."""
    rows = evaluations(rep)
    return next((r for r in rows if r["set"] == "verification"), rows[0])


def has_layer_field(rep: dict, key: str) -> bool:
    return any(key in layer for layer in rep.get("layers") or [])


def granularity_text(layer: dict) -> str:
    g = layer.get("granularity")
    if not g:
        return "-"
    size = layer.get("group_size")
    return f"{g}/{size}" if size else str(g)


def repair_text(layer: dict) -> str:
    r = layer.get("repair")
    if not isinstance(r, dict):
        return "-"
    parts = [k for k in ("scale", "bias") if r.get(k)]
    return "+".join(parts) or "none"


def new_layer_columns(rep: dict) -> list[tuple[str, str]]:
    """(key, header) of the schema-2 per-layer fields present in this report, in display order."""
    cols = [("granularity", "gran"), ("vector_dim", "vec"), ("codebooks", "books"),
            ("predicted_loss", "pred. loss"), ("repair", "repair")]
    return [(k, h) for k, h in cols if has_layer_field(rep, k)]


def new_layer_cell(layer: dict, key: str) -> str:
    if key == "granularity":
        return granularity_text(layer)
    if key == "repair":
        return repair_text(layer)
    if key == "predicted_loss":
        v = layer.get(key)
        return f"{v:.3g}" if is_num(v) else "-"
    return num(layer.get(key))


def front(rep: dict) -> list[dict]:
    f = rep.get("front")
    return [p for p in f if isinstance(p, dict)] if isinstance(f, list) else []


def chosen_point(rep: dict) -> dict | None:
    return next((p for p in front(rep) if p.get("chosen")), None)


def sensitivity(rep: dict) -> dict | None:
    s = rep.get("sensitivity")
    return s if isinstance(s, dict) and isinstance(s.get("entries"), list) else None


def sensitivity_curves(rep: dict) -> dict[tuple[str, str, int], list[dict]]:
    """Entries grouped by (layer, granularity, vector_dim) in network order, each group sorted by K."""
    s = sensitivity(rep)
    if s is None:
        return {}
    order = {layer.get("name"): i for i, layer in enumerate(rep.get("layers") or [])}
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for e in s["entries"]:
        if not isinstance(e, dict) or not is_num(e.get("k")):
            continue
        key = (str(e.get("layer")), str(e.get("granularity") or "layer"), int(e.get("vector_dim") or 1))
        groups.setdefault(key, []).append(e)
    keys = sorted(groups, key=lambda k: (order.get(k[0], len(order)), k[1], k[2]))
    return {k: sorted(groups[k], key=lambda e: e["k"]) for k in keys}


def is_chosen_entry(rep: dict, entry: dict) -> bool:
    """Whether a sensitivity entry is the configuration the report's layer record says was written."""
    layer = next((x for x in rep.get("layers") or [] if x.get("name") == entry.get("layer")), None)
    if layer is None or layer.get("k") != entry.get("k"):
        return False
    if "granularity" in layer and layer.get("granularity") != (entry.get("granularity") or "layer"):
        return False
    return not ("vector_dim" in layer and (layer.get("vector_dim") or 1) != (entry.get("vector_dim") or 1))


def summary_facts(rep: dict) -> list[tuple[str, str]]:
    """(label, value) pairs for the summary block of markdown and HTML, most important first."""
    facts = [("model", str(rep.get("model", "-"))), ("written to", str(rep.get("output", "-")))]
    facts.append(("mode", mode(rep)))
    if budget_text(rep):
        facts.append(("budget", budget_text(rep)))
    metric = rep.get("metric") or "-"
    if not accuracy_measured(rep):
        metric = "agreement with the original model, not accuracy" if metric == "agreement" else \
            f"{metric} (against the original model's outputs, not labels: not accuracy)"
    facts.append(("metric", metric))
    if data_text(rep):
        facts.append(("data", data_text(rep)))
    facts.append(("compression ratio (Eq. 1)",
                  f"{ratio(rep.get('compression_ratio'))} over {num(rep.get('weights_clustered'), ',')} weights in "
                  f"{len(rep.get('layers') or [])} layers"))
    if is_num(rep.get("file_bytes_before")) and is_num(rep.get("file_bytes_after")):
        facts.append(("file", f"{rep['file_bytes_before']:,} → {rep['file_bytes_after']:,} bytes "
                              f"({ratio(rep.get('file_ratio'))})"))
    if rep.get("estimator"):
        facts.append(("estimator", str(rep["estimator"])))
    tool = rep.get("tool") or {}
    if isinstance(tool, dict) and tool.get("version"):
        facts.append(("axcnn", f"{tool['version']}, report schema {rep.get('schema_version', '?')}"))
    return facts


def timing_facts(rep: dict) -> list[tuple[str, str]]:
    t = rep.get("timing")
    if not isinstance(t, dict):
        return []
    facts = [("clustering", seconds(t.get("clustering_s"))), ("estimate", seconds(t.get("estimate_s"))),
             ("scoring", seconds(t.get("scoring_s")))]
    if t.get("candidates_scored") is not None:
        facts.append(("candidates scored", f"{t['candidates_scored']} ({num(t.get('candidates_stopped_early'))} "
                                           f"stopped early)"))
    if is_num(t.get("cost_t_pass")):
        facts.append(("cost", f"{t['cost_t_pass']:.1f} T_pass (one pass over the scoring set: "
                              f"{seconds(t.get('t_pass_s'))})"))
    facts += [("final check", seconds(t.get("final_check_s"))), ("total", seconds(t.get("total_s")))]
    return facts
