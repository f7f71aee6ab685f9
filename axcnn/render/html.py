"""The report as one self-contained HTML page: inline CSS, plots as base64 PNG data URIs, no script, no URL.

It opens the same from a mail attachment, a CI artifact or a file share, with no network and no JavaScript.
"""

from __future__ import annotations

import base64
from html import escape

from axcnn.render.common import (
    accuracy_note,
    budget_text,
    chosen_point,
    ci_text,
    evaluation_table,
    evaluations,
    fmt_shape,
    front,
    headline_evaluation,
    is_chosen_entry,
    is_num,
    model_name,
    new_layer_cell,
    new_layer_columns,
    num,
    pct,
    pp,
    ratio,
    sensitivity,
    sensitivity_curves,
    summary_facts,
    timing_facts,
)

CSS = """
:root { --ink: #1d232b; --muted: #5c6670; --line: #d9dee3; --soft: #f4f6f8; --accent: #3b6ea8; --bad: #b03a2e; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: var(--ink);
       font: 15px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 2px; }
h2 { font-size: 18px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 20px 0 6px; }
.sub { color: var(--muted); margin: 0 0 18px; font-size: 13.5px; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace;
              font-size: 12.5px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 14px 0 6px; }
.card { flex: 1 1 200px; border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px;
        background: var(--soft); }
.card .k { color: var(--muted); font-size: 12.5px; text-transform: uppercase; letter-spacing: .03em; }
.card .v { font-size: 24px; font-weight: 600; margin-top: 2px; }
.card .d { color: var(--muted); font-size: 12.5px; }
.alert { border: 2px solid var(--bad); background: #fbeeee; color: var(--bad); border-radius: 6px;
         padding: 10px 14px; margin: 14px 0; font-weight: 600; }
.alert.warn { border-color: #b8860b; background: #fdf6e3; color: #7a5a00; }
.note { border-left: 4px solid var(--accent); background: var(--soft); padding: 8px 12px; margin: 10px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; min-width: 50%; }
table.wide { width: 100%; }
th, td { padding: 4px 7px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: var(--soft); font-weight: 600; position: sticky; top: 0; }
th:first-child, td:first-child { text-align: left; }
td.l, th.l { text-align: left; }
tr.chosen td { background: #fdf0ee; font-weight: 600; }
.wrap { overflow-x: auto; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; margin: 8px 0; font-size: 14px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
figure { margin: 12px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
details > summary { cursor: pointer; color: var(--accent); margin: 6px 0; }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; border-top: 1px solid var(--line); padding-top: 8px; }
@media print { th { position: static; } }
"""


def _e(x) -> str:
    return escape(str(x), quote=True)


def _table(headers: list[str], rows: list[list[str]], left: set[int] = frozenset(), classes: list[str] | None = None,
           raw: bool = False, wide: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (the caller escaped them)."""
    head = "".join(f'<th class="l">{_e(h)}</th>' if i in left else f"<th>{_e(h)}</th>" for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cls = f' class="{classes[r]}"' if classes and classes[r] else ""
        cells = "".join(('<td class="l">' if i in left else "<td>") + (c if raw else _e(c)) + "</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    table = '<table class="wide">' if wide else "<table>"
    return f'<div class="wrap">{table}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _facts(facts: list[tuple[str, str]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>"


def render_html(rep: dict, plots: list | None = None, plots_note: str | None = None) -> str:
    """The page. ``plots``: :class:`axcnn.render.plots.Plot` objects to embed; ``plots_note``: shown instead."""
    name = model_name(rep)
    parts = [f"<h1>axcnn report: {_e(name)}</h1>", f'<p class="sub">{_e(_subtitle(rep))}</p>']
    note = accuracy_note(rep)
    if note:
        parts.append(f'<div class="alert">{_e(note[0].upper() + note[1:])}.</div>')
    b = rep.get("budget")
    if isinstance(b, dict) and b.get("met") is False:
        goal = budget_text(rep).split(": ", 1)[0]
        parts.append(f'<div class="alert warn">Budget not met: the goal was {_e(goal)}.</div>')
    parts.append(_cards(rep))
    parts.append("<h2>Summary</h2>" + _facts(summary_facts(rep)))
    parts.append(_evaluation(rep))
    if plots:
        parts.append("<h2>Plots</h2>")
        for p in plots:
            data = base64.b64encode(p.png).decode("ascii")
            parts.append(f'<figure id="plot-{_e(p.name)}"><h3>{_e(p.title)}</h3>'
                         f'<img alt="{_e(p.title)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{_e(p.caption)}</figcaption></figure>")
    elif plots_note:
        parts.append(f'<h2>Plots</h2><p class="note">{_e(plots_note)}</p>')
    parts.append(_layers(rep))
    parts.append(_front(rep))
    parts.append(_sensitivity(rep))
    parts.append(_skipped(rep))
    timing = timing_facts(rep)
    if timing:
        parts.append("<h2>Time</h2>" + _facts(timing))
    settings = rep.get("settings")
    if isinstance(settings, dict) and settings:
        parts.append("<h2>Settings</h2><details><summary>every setting of the run</summary>"
                     + _table(["setting", "value"], [[k, _setting(v)] for k, v in settings.items()], left={1})
                     + "</details>")
    tool = rep.get("tool") if isinstance(rep.get("tool"), dict) else {}
    parts.append(f"<footer>Rendered by axcnn from the JSON report alone (schema {_e(rep.get('schema_version', '?'))}"
                 f"{', written by axcnn ' + _e(tool['version']) if tool.get('version') else ''}). Every figure is "
                 f"a measurement or Eq. 1 on the tensors written.</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>axcnn report: {_e(name)}</title><style>{CSS}</style></head>\n<body><main>\n"
            + "\n".join(p for p in parts if p) + "\n</main></body></html>\n")


def _setting(v) -> str:
    return "-" if v is None else ", ".join(map(str, v)) if isinstance(v, list) else str(v)


def _subtitle(rep: dict) -> str:
    bits = [f"mode {rep.get('mode') or 'greedy'}", f"metric {rep.get('metric', '-')}"]
    if rep.get("estimator"):
        bits.append(f"estimator {rep['estimator']}")
    bits.append(f"{len(rep.get('layers') or [])} layers clustered")
    return " · ".join(bits)


def _cards(rep: dict) -> str:
    e = headline_evaluation(rep)
    measured = "agreement" if rep.get("accuracy_measured") is False else rep.get("metric", "score")
    loss_detail = f"{measured} {pct(e['reference_score'])} → {pct(e['final_score'])} on {num(e['samples'], ',')} " \
                  f"{e['set']} samples"
    if ci_text(e["ci95_pp"]):
        loss_detail = f"95% CI {ci_text(e['ci95_pp'])}; {loss_detail}"
    cards = [("compression ratio (Eq. 1)", ratio(rep.get("compression_ratio")),
              f"{num(rep.get('weights_clustered'), ',')} weights in {len(rep.get('layers') or [])} layers"),
             ("accuracy loss" if rep.get("accuracy_measured") is not False else "agreement loss",
              pp(e["accuracy_loss_pp"]), loss_detail)]
    if is_num(rep.get("file_bytes_before")) and is_num(rep.get("file_bytes_after")):
        cards.append(("file size", ratio(rep.get("file_ratio")),
                      f"{rep['file_bytes_before']:,} → {rep['file_bytes_after']:,} bytes"))
    t = rep.get("timing") if isinstance(rep.get("timing"), dict) else {}
    if is_num(t.get("total_s")):
        cards.append(("time", f"{t['total_s']:.1f} s", f"{num(t.get('candidates_scored'))} candidates scored"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div><div class="d">{_e(d)}</div></div>'
        for k, v, d in cards) + "</div>"


def _evaluation(rep: dict) -> str:
    rows = evaluations(rep)
    out = "<h2>Evaluation</h2>"
    if not isinstance(rep.get("evaluation"), dict):
        out += ('<p class="note">Measured on the samples that chose K (this report has no separate verification '
                "set).</p>")
    headers, cells = evaluation_table(rows)
    out += _table(headers, cells)
    if isinstance(rep.get("evaluation"), dict) and not any(e["set"] == "verification" for e in rows):
        out += ('<p class="note">No verification set: the loss was measured on the same samples that chose K, '
                "so it is optimistic.</p>")
    return out


def _layers(rep: dict) -> str:
    layers = rep.get("layers") or []
    extra = new_layer_columns(rep)
    headers = ["layer", "op", "shape", "weights", "K", "bits", "stored B", "CR", "score", "loss"]
    headers += [h for _, h in extra]
    rows = []
    for x in layers:
        score = "-" if x.get("score") is None else pct(x["score"])
        k = num(x.get("k")) + (" *" if x.get("k_clamped") else "")
        rows.append([f"<code>{_e(x.get('name', '?'))}</code>", _e(x.get("op_type") or "-"),
                     _e(fmt_shape(x.get("shape"))), _e(num(x.get("weights"), ",")), _e(k), _e(num(x.get("index_bits"))),
                     _e(num(x.get("stored_bytes"), ",")), _e(ratio(x.get("compression_ratio"))), _e(score),
                     _e(pp(x.get("accuracy_loss_pp"))) if "accuracy_loss_pp" in x else "-"]
                    + [_e(new_layer_cell(x, key)) for key, _ in extra])
    out = "<h2>Layers</h2>" + _table(headers, rows, raw=True)
    notes = ["stored B: index and centroid bytes written (the split is in the first plot); score and loss: the whole "
             "model's, measured once this layer was fixed (layers are fixed in network order)"]
    if any(x.get("k_clamped") for x in layers):
        notes.append("* K clamped to the layer's number of distinct values")
    if extra:
        notes.append("gran: granularity/group size; vec: vector dimension; books: codebooks; pred. loss: the "
                     "sensitivity proxy of the K written; repair: the corrections applied after clustering")
    return out + f'<p class="sub">{_e("; ".join(notes))}.</p>'


def _front(rep: dict) -> str:
    points = front(rep)
    if not points:
        return ""
    c = chosen_point(rep)
    points = sorted(points, key=lambda p: p.get("compression_ratio") or 0)
    rows, classes = [], []
    for p in points:
        ks = " · ".join(str(x.get("k", "?")) for x in p.get("layers") or [])
        rows.append(["chosen" if p is c else "", ratio(p.get("compression_ratio")), pp(p.get("accuracy_loss_pp")),
                     p.get("measured_on") or "-", num(p.get("samples"), ","), ks])
        classes.append("chosen" if p is c else "")
    lead = (f"{len(points)} points; the chosen one gives {ratio(c.get('compression_ratio'))} at "
            f"{pp(c.get('accuracy_loss_pp'))}." if c else f"{len(points)} points; none is marked chosen.")
    return ("<h2>Pareto front</h2>" + f"<p>{_e(lead)} K per layer in network order.</p>"
            + _table(["", "CR", "loss", "measured on", "samples", "K per layer"], rows, left={5}, classes=classes))


def _sensitivity(rep: dict) -> str:
    s = sensitivity(rep)
    if s is None:
        return ""
    rows, classes = [], []
    for (layer, gran, dim), entries in sensitivity_curves(rep).items():
        for e in entries:
            chosen = is_chosen_entry(rep, e)
            rows.append([layer, gran, str(dim), num(e.get("k")), num(e.get("index_bits")),
                         f"{e['proxy']:.3g}" if is_num(e.get("proxy")) else "-", ratio(e.get("compression_ratio")),
                         "written" if chosen else ""])
            classes.append("chosen" if chosen else "")
    return (f"<h2>Sensitivity</h2><p>Proxy {_e(s.get('proxy', '?'))} in {_e(s.get('unit', '?'))} on "
            f"{_e(num(s.get('samples')))} samples: how far the output moves when one layer alone is clustered. "
            f"{len(rows)} entries.</p><details><summary>every entry</summary>"
            + _table(["layer", "granularity", "d", "K", "index bits", "proxy", "CR", ""], rows, classes=classes)
            + "</details>")


def _skipped(rep: dict) -> str:
    skipped = rep.get("skipped") or []
    if not skipped:
        return ""
    return ("<h2>Left dense</h2>" + _table(["tensor", "op", "reason"],
                                           [[s.get("name", "?"), s.get("op_type") or "-", s.get("reason") or "-"]
                                            for s in skipped], left={1, 2}))
