"""The report as Markdown: the per-layer table, the summary, and sections for the schema-2 fields when present.

Plots are not drawn here: the caller passes the relative paths of PNGs it wrote (``axcnn.render.write``), or a
note saying why there are none.
"""

from __future__ import annotations

from axcnn.render.common import (
    accuracy_note,
    evaluation_table,
    evaluations,
    fmt_shape,
    front,
    is_chosen_entry,
    is_num,
    new_layer_cell,
    new_layer_columns,
    num,
    pct,
    pp,
    sensitivity,
    sensitivity_curves,
    summary_facts,
    timing_facts,
)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row(cells) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def render_markdown(rep: dict, images: list[tuple[str, str, str]] | None = None, plots_note: str | None = None) -> str:
    """Markdown text. ``images``: (title, caption, relative path) of PNGs to link; ``plots_note``: shown instead."""
    name = str(rep.get("model") or "model").replace("\\", "/").rsplit("/", 1)[-1]
    lines = [f"# axcnn report: {name}", ""]
    note = accuracy_note(rep)
    if note:
        lines += [f"> **{note[0].upper() + note[1:]}.**", ""]
    extra = new_layer_columns(rep)
    lines += [_row(["layer", "op", "shape", "weights", "K", "bits", "CR", "stored bytes", "score"]
                   + [h for _, h in extra]),
              "|---|---|---|---:|---:|---:|---:|---:|---:|" + "---|" * len(extra)]
    for layer in rep.get("layers") or []:
        score = "-" if layer.get("score") is None else f"{layer['score'] * 100:.2f}%"
        lines.append(_row([f"`{layer.get('name', '?')}`", layer.get("op_type") or "-", fmt_shape(layer.get("shape")),
                           num(layer.get("weights")), num(layer.get("k")), num(layer.get("index_bits")),
                           num(layer.get("compression_ratio"), ".2f"), num(layer.get("stored_bytes")), score]
                          + [new_layer_cell(layer, key) for key, _ in extra]))
    loss = rep.get("accuracy_loss_pp")
    lines += ["", f"- {rep.get('metric', '-')}: reference {pct(rep.get('reference_score'))}, final "
              f"{pct(rep.get('final_score'))}, loss {num(loss, '.2f')} pp on {num(rep.get('samples'))} samples"]
    for label, value in summary_facts(rep):
        if label in ("model", "metric"):
            continue
        lines.append(f"- {label}: {value}")
    lines += _evaluation(rep) + _front(rep) + _sensitivity(rep)
    if images:
        lines += ["", "## Plots"]
        for title, caption, path in images:
            lines += ["", f"### {title}", "", f"![{title}]({path})", "", f"*{caption}*"]
    elif plots_note:
        lines += ["", "## Plots", "", plots_note]
    skipped = rep.get("skipped") or []
    if skipped:
        lines += ["", "## Left dense", "", _row(["tensor", "op", "reason"]), "|---|---|---|"]
        lines += [_row([f"`{s.get('name', '?')}`", s.get("op_type") or "-", s.get("reason") or "-"])
                  for s in skipped]
    timing = timing_facts(rep)
    if timing:
        lines += ["", "## Time", ""] + [f"- {k}: {v}" for k, v in timing]
    return "\n".join(lines) + "\n"


def _evaluation(rep: dict) -> list[str]:
    if not isinstance(rep.get("evaluation"), dict):
        return []
    rows = evaluations(rep)
    headers, cells = evaluation_table(rows)
    lines = ["", "## Evaluation", "", _row(headers), "|---|" + "---:|" * (len(headers) - 1)]
    lines += [_row(r) for r in cells]
    if not any(e["set"] == "verification" for e in rows):
        lines += ["", "No verification set: the loss above was measured on the samples that chose K."]
    return lines


def _front(rep: dict) -> list[str]:
    points = front(rep)
    if not points:
        return []
    lines = ["", "## Pareto front", "", _row(["", "CR", "loss", "measured on", "samples", "K per layer"]),
             "|---|---:|---:|---|---:|---|"]
    for p in sorted(points, key=lambda p: p.get("compression_ratio") or 0):
        ks = " · ".join(str(x.get("k", "?")) for x in p.get("layers") or [])
        lines.append(_row(["**chosen**" if p.get("chosen") else "", num(p.get("compression_ratio"), ".2f") + "x",
                           pp(p.get("accuracy_loss_pp")), p.get("measured_on") or "-", num(p.get("samples")), ks]))
    return lines


def _sensitivity(rep: dict) -> list[str]:
    s = sensitivity(rep)
    if s is None:
        return []
    curves = sensitivity_curves(rep)
    lines = ["", "## Sensitivity", "",
             f"Proxy {s.get('proxy', '?')} in {s.get('unit', '?')} on {num(s.get('samples'))} samples; "
             f"{len(s['entries'])} entries. The K written is in bold.", "",
             "<details><summary>every entry</summary>", "",
             _row(["layer", "granularity", "d", "K", "index bits", "proxy", "CR"]),
             "|---|---|---:|---:|---:|---:|---:|"]
    for (layer, gran, dim), entries in curves.items():
        for e in entries:
            k = f"**{e['k']}**" if is_chosen_entry(rep, e) else str(e["k"])
            proxy = f"{e['proxy']:.3g}" if is_num(e.get("proxy")) else "-"
            lines.append(_row([f"`{layer}`", gran, dim, k, num(e.get("index_bits")), proxy,
                               num(e.get("compression_ratio"), ".2f")]))
    return lines + ["", "</details>"]
