"""The terminal summary printed after ``compress`` and by ``axcnn report --format table``: plain text, no colour."""

from __future__ import annotations

from axcnn.render.common import (
    accuracy_note,
    budget_text,
    chosen_point,
    ci_text,
    evaluations,
    fmt_shape,
    front,
    is_num,
    mode,
    new_layer_cell,
    new_layer_columns,
    num,
    pp,
    sensitivity,
    sensitivity_curves,
    short_name,
)


def text_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; the first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows]
    return out


def render_table(rep: dict, max_rows: int = 40) -> str:
    """A short terminal summary: one row per layer, then the totals."""
    extra = new_layer_columns(rep)
    headers = ["layer", "op", "shape", "weights", "K", "bits", "CR", "score"] + [h for _, h in extra]
    rows = []
    for layer in rep.get("layers") or []:
        score = "-" if layer.get("score") is None else f"{layer['score'] * 100:.2f}%"
        cr = layer.get("compression_ratio")
        rows.append([short_name(str(layer.get("name", "?")), 36), str(layer.get("op_type") or "-"),
                     fmt_shape(layer.get("shape")), num(layer.get("weights")), num(layer.get("k")),
                     num(layer.get("index_bits")), f"{cr:.2f}" if is_num(cr) else "-", score]
                    + [new_layer_cell(layer, key) for key, _ in extra])
    lines = text_table(headers, rows[:max_rows])
    if len(rows) > max_rows:
        lines.append(f"… {len(rows) - max_rows} more layers in the JSON report")
    lines.append("")
    note = accuracy_note(rep)
    if note:
        head, rest = note.split(": ", 1)
        lines.append(f"!! {head.upper()}: {rest}")
    lines.append(_scores_line(rep))
    lines += _schema2_lines(rep)
    lines += [
        f"compression ratio (Eq. 1): {num(rep.get('compression_ratio'), '.2f')}x over "
        f"{num(rep.get('weights_clustered'))} weights in {len(rep.get('layers') or [])} layers",
        f"file: {num(rep.get('file_bytes_before'), ',')} -> {num(rep.get('file_bytes_after'), ',')} bytes "
        f"({num(rep.get('file_ratio'), '.2f')}x)",
    ]
    t = rep.get("timing")
    if isinstance(t, dict):
        cost = f", {t['cost_t_pass']:.1f} T_pass" if is_num(t.get("cost_t_pass")) else ""
        lines.append(f"time: clustering {num(t.get('clustering_s'), '.1f')}s  "
                     f"scoring {num(t.get('scoring_s'), '.1f')}s ({num(t.get('candidates_scored'))} candidates{cost})  "
                     f"total {num(t.get('total_s'), '.1f')}s")
    return "\n".join(lines)


def _score(x) -> str:
    return f"{x * 100:.2f}%" if is_num(x) else "-"


def _scores_line(rep: dict) -> str:
    loss = rep.get("accuracy_loss_pp")
    return (f"{rep.get('metric', '-')}: reference {_score(rep.get('reference_score'))}  final "
            f"{_score(rep.get('final_score'))}  loss {f'{loss:.2f}' if is_num(loss) else '-'} pp  "
            f"({num(rep.get('samples'))} samples)")


def _schema2_lines(rep: dict) -> list[str]:
    """Lines for the fields planned for schema 2; none for a first-round report."""
    lines = []
    if "mode" in rep or "budget" in rep:
        budget = budget_text(rep)
        lines.append(f"mode: {mode(rep)}" + (f"  budget: {budget}" if budget else ""))
    if isinstance(rep.get("evaluation"), dict):
        for e in evaluations(rep):
            extra = []
            if ci_text(e["ci95_pp"]):
                extra.append(f"95% CI {ci_text(e['ci95_pp'])}")
            if e["disagreements"] is not None:
                extra.append(f"{e['disagreements']} disagreements")
            lines.append(f"{e['set']}: reference {_score(e['reference_score'])}  final {_score(e['final_score'])}  "
                         f"loss {pp(e['accuracy_loss_pp'])}" + (f"  {', '.join(extra)}" if extra else "")
                         + f"  ({num(e['samples'])} samples)")
        if not (rep["evaluation"].get("verification")):
            lines.append("verification: none (no held-out samples)")
    points = front(rep)
    if points:
        c = chosen_point(rep)
        chosen = (f"; chosen CR {num(c.get('compression_ratio'), '.2f')}x, loss {pp(c.get('accuracy_loss_pp'))} "
                  f"({c.get('measured_on', '?')}, {num(c.get('samples'))} samples)") if c else "; none chosen"
        lines.append(f"Pareto front: {len(points)} points{chosen}")
    s = sensitivity(rep)
    if s is not None:
        lines.append(f"sensitivity: {len(s['entries'])} entries over {len({k[0] for k in sensitivity_curves(rep)})} "
                     f"layers (proxy {s.get('proxy', '?')} in {s.get('unit', '?')}, {num(s.get('samples'))} samples)")
    return lines
