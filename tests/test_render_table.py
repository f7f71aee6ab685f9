"""axcnn.render.table: the terminal summary keeps its first-round content and adds lines for schema-2 fields."""

from __future__ import annotations

import pytest
from test_render import first_round_report, full_report

from axcnn.render.table import render_table, text_table


def _first_round_table(rep: dict, max_rows: int = 40) -> str:
    """The terminal table as the first round printed it (axcnn/report.py at d526c3c), kept here as the reference."""
    def fmt_shape(shape):
        return "x".join(str(s) for s in shape)

    headers = ["layer", "op", "shape", "weights", "K", "bits", "CR", "score"]
    rows = []
    for layer in rep["layers"]:
        name = layer["name"] if len(layer["name"]) <= 36 else "…" + layer["name"][-35:]
        score = "-" if layer["score"] is None else f"{layer['score'] * 100:.2f}%"
        rows.append([name, layer["op_type"], fmt_shape(layer["shape"]), str(layer["weights"]),
                     str(layer["k"]), str(layer["index_bits"]), f"{layer['compression_ratio']:.2f}", score])
    lines = text_table(headers, rows[:max_rows])
    if len(rows) > max_rows:
        lines.append(f"… {len(rows) - max_rows} more layers in the JSON report")
    t = rep["timing"]
    lines += [
        "",
        f"{rep['metric']}: reference {rep['reference_score'] * 100:.2f}%  final {rep['final_score'] * 100:.2f}%  "
        f"loss {rep['accuracy_loss_pp']:.2f} pp  ({rep['samples']} samples)",
        f"compression ratio (Eq. 1): {rep['compression_ratio']:.2f}x over {rep['weights_clustered']} weights in "
        f"{len(rep['layers'])} layers",
        f"file: {rep['file_bytes_before']:,} -> {rep['file_bytes_after']:,} bytes ({rep['file_ratio']:.2f}x)",
        f"time: clustering {t['clustering_s']:.1f}s  scoring {t['scoring_s']:.1f}s "
        f"({t['candidates_scored']} candidates, {t['cost_t_pass']:.1f} T_pass)  total {t['total_s']:.1f}s",
    ]
    return "\n".join(lines)


def test_first_round_report_prints_exactly_as_before():
    rep = first_round_report()
    assert render_table(rep) == _first_round_table(rep)


def test_long_names_and_row_limit_as_before():
    rep = full_report(n_layers=17)
    rep["layers"][0]["name"] = "backbone.stage4.block2.conv3.depthwise.weight_quantized"
    for k in ("mode", "budget", "evaluation", "accuracy_measured", "data", "sensitivity", "front"):
        rep.pop(k)
    for layer in rep["layers"]:
        for k in ("granularity", "group_size", "vector_dim", "codebooks", "predicted_loss", "repair"):
            layer.pop(k)
    assert render_table(rep, max_rows=5) == _first_round_table(rep, max_rows=5)
    assert "… 12 more layers in the JSON report" in render_table(rep, max_rows=5)


def test_schema2_fields_add_columns_and_lines():
    rep = full_report()
    out = render_table(rep)
    header = out.splitlines()[0].split()
    assert header[:8] == ["layer", "op", "shape", "weights", "K", "bits", "CR", "score"]
    assert header[8:] == ["gran", "vec", "books", "pred.", "loss", "repair"]
    row = next(line for line in out.splitlines() if line.startswith("features.3.weight"))
    assert row.split()[-5:] == ["channel/8", "1", "4", "0.04", "scale+bias"]
    assert "mode: budget  budget: max loss 1.00 pp: met" in out
    assert "verification: reference 91.20%  final 90.72%  loss 0.48 pp  95% CI [0.31, 0.66] pp, 212 disagreements  " \
           "(8000 samples)" in out
    assert "selection: reference 91.20%  final 90.75%  loss 0.45 pp  (2000 samples)" in out
    assert f"Pareto front: 5 points; chosen CR {rep['compression_ratio']:.2f}x, loss 0.48 pp (verification, " \
           "8000 samples)" in out
    assert "sensitivity: 42 entries over 5 layers (proxy kl in nats, 256 samples)" in out
    assert "NOT MEASURED" not in out


def test_data_free_report_says_accuracy_was_not_measured():
    out = render_table(full_report(measured=False, met=False))
    lines = out.splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("!! ACCURACY NOT MEASURED: "))
    assert "agreement with the original model on synthetic inputs" in lines[warning]
    assert lines[warning + 1].startswith("agreement: reference 100.00%")  # right above the scores it qualifies
    assert "budget: max loss 1.00 pp: NOT met" in out
    assert "verification: none (no held-out samples)" in out


@pytest.mark.parametrize("field", ["timing", "cost_t_pass", "score", "file_bytes_before"])
def test_missing_or_null_values_print_a_dash(field):
    rep = first_round_report()
    if field == "timing":
        rep.pop("timing")
    elif field == "cost_t_pass":
        rep["timing"]["cost_t_pass"] = None  # t_pass_s was 0
    elif field == "score":
        rep["layers"][0]["score"] = None
    else:
        rep.pop(field)
    out = render_table(rep)
    if field == "timing":
        assert "time:" not in out
    elif field == "cost_t_pass":
        assert "T_pass" not in out and "candidates)" in out
    elif field == "score":
        assert out.splitlines()[2].rstrip().endswith("-")
    else:
        assert "file: - -> " in out


def test_text_table_is_still_importable_from_report_for_inspect():
    from axcnn.report import _table

    assert _table is text_table
    assert text_table(["a", "bb"], [["x", "1"], ["yyy", "22"]]) == ["a    bb", "---  --", "x     1", "yyy  22"]


def test_budget_text_names_the_verifications_refused_on_the_way():
    from axcnn.render.common import budget_text

    rep = {"budget": {"max_loss_pp": 0.5, "met": True, "verification_checks": 2, "verifications": [
        {"compression_ratio": 8.4, "selection_loss_pp": 0.46, "verification_loss_pp": 0.93, "ci95_pp": [0, 1.9]},
        {"compression_ratio": 8.05, "selection_loss_pp": 0.29, "verification_loss_pp": 0.27, "ci95_pp": [-0.5, 1]}]}}
    assert budget_text(rep) == "max loss 0.50 pp: met on verification check 2 (refused: 0.93 pp at 8.40x)"
    rep["budget"]["verifications"] = rep["budget"]["verifications"][1:]
    assert budget_text(rep) == "max loss 0.50 pp: met"
