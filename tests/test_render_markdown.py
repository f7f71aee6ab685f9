"""axcnn.render.markdown: the table and summary, and sections for the schema-2 fields when present."""

from __future__ import annotations

from test_render import first_round_report, full_report, layer_names

from axcnn.render.markdown import render_markdown


def _table_rows(text: str) -> list[list[str]]:
    """Cells of the first Markdown table (the per-layer one), header row first."""
    rows, started = [], False
    for line in text.splitlines():
        if line.startswith("|"):
            started = True
            if not line.startswith("|---"):
                rows.append([c.strip() for c in line[2:-2].split(" | ")])
        elif started:
            break
    return rows


def test_first_round_markdown():
    rep = first_round_report()
    text = render_markdown(rep)
    assert text.startswith("# axcnn report: tiny.onnx\n")
    rows = _table_rows(text)
    assert rows[0] == ["layer", "op", "shape", "weights", "K", "bits", "CR", "stored bytes", "score"]
    assert [r[0] for r in rows[1:]] == [f"`{n}`" for n in layer_names(rep)]
    assert f"- compression ratio (Eq. 1): {rep['compression_ratio']:.2f}x" in text
    for absent in ("## Evaluation", "## Pareto front", "## Sensitivity", "## Plots", "not measured"):
        assert absent not in text


def test_full_markdown_has_every_section():
    rep = full_report()
    text = render_markdown(rep)
    rows = _table_rows(text)
    assert rows[0][-5:] == ["gran", "vec", "books", "pred. loss", "repair"]
    assert rows[2][-5:] == ["channel/8", "1", "4", "0.04", "scale+bias"]
    assert "- mode: budget" in text and "- budget: max loss 1.00 pp: met" in text
    assert "| verification | 8,000 | 91.20% | 90.72% | 0.48 pp | [0.31, 0.66] pp | 212 |" in text
    cr = f"{rep['compression_ratio']:.2f}x"
    assert f"| **chosen** | {cr} | 0.48 pp | verification | 8000 | 24 · 16 · 32 · 16 · 48 |" in text
    assert text.count("| **16** |") + text.count("| **32** |") + text.count("| **24** |") + \
        text.count("| **48** |") == len(rep["layers"])  # the K written is bold in the sensitivity table


def test_data_free_markdown_warns_at_the_top():
    text = render_markdown(full_report(measured=False))
    assert text.splitlines()[2].startswith("> **Accuracy not measured: there were no labelled data")
    assert "No verification set" in text


def test_images_and_plots_note():
    rep = first_round_report()
    text = render_markdown(rep, [("Where the bits went", "caption.", "r_plots/layers.png")])
    assert "![Where the bits went](r_plots/layers.png)" in text and "*caption.*" in text
    text = render_markdown(rep, None, "Install matplotlib.")
    assert "## Plots\n\nInstall matplotlib." in text


def test_pipes_in_names_do_not_break_the_table():
    rep = first_round_report()
    rep["layers"][0]["name"] = "a|b"
    rows = _table_rows(render_markdown(rep))
    assert rows[1][0] == "`a\\|b`" and len(rows[1]) == len(rows[0])
