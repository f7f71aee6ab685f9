"""axcnn.render.html: one self-contained page, checked without a browser."""

from __future__ import annotations

import base64
import re
from html import escape

import pytest
from test_render import PNG_MAGIC, first_round_report, full_report, layer_names, no_matplotlib

from axcnn import render
from axcnn.render.html import render_html

DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def full_html() -> str:
    return render.render(full_report(), "html")


@pytest.fixture(scope="module")
def first_html() -> str:
    return render.render(first_round_report(), "html")


def _assert_self_contained(html: str) -> None:
    low = html.lower()
    for needle in ("<script", "<link", "<iframe", "<object", "<embed", "@import", "url(", "http:", "https:",
                   "ftp:", "file:", "//"):
        assert needle not in DATA_URI.sub("", low), needle
    for m in re.finditer(r'\b(?:src|href|srcset|action)\s*=\s*"([^"]*)"', html):
        assert m.group(1).startswith("data:image/png;base64,"), m.group(0)[:80]


def _pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m, validate=True) for m in DATA_URI.findall(html)]


def test_full_report_page_is_self_contained_and_embeds_every_plot(full_html):
    assert full_html.startswith("<!DOCTYPE html>") and full_html.rstrip().endswith("</html>")
    _assert_self_contained(full_html)
    pngs = _pngs(full_html)
    assert len(pngs) == 4 and all(p.startswith(PNG_MAGIC) for p in pngs)
    for name in ("layers", "front", "sensitivity", "candidates"):
        assert f'id="plot-{name}"' in full_html


def test_first_round_page_embeds_the_plots_it_has_data_for(first_html):
    _assert_self_contained(first_html)
    pngs = _pngs(first_html)
    assert len(pngs) == 2 and all(p.startswith(PNG_MAGIC) for p in pngs)
    assert 'id="plot-layers"' in first_html and 'id="plot-front"' not in first_html
    assert "Pareto front" not in first_html and "Sensitivity" not in first_html
    assert "no separate verification set" in first_html


def test_every_layer_and_skipped_tensor_is_named(full_html, first_html):
    for rep, html in ((full_report(), full_html), (first_round_report(), first_html)):
        for name in layer_names(rep):
            assert f"<code>{escape(name)}</code>" in html
        for s in rep["skipped"]:
            assert escape(s["name"]) in html


def test_front_table_marks_the_chosen_point(full_html):
    rep = full_report()
    chosen = re.findall(r'<tr class="chosen">(.*?)</tr>', full_html)
    front_rows = [r for r in chosen if "verification" in r]
    assert len(front_rows) == 1
    assert f"<td>{rep['compression_ratio']:.2f}x</td><td>0.48 pp</td>" in front_rows[0]
    assert f"the chosen one gives {rep['compression_ratio']:.2f}x at 0.48 pp" in full_html
    written = [r for r in chosen if "written" in r]  # the sensitivity entries of the K written, one per layer
    assert len(written) == len(rep["layers"])


def test_summary_shows_mode_budget_data_evaluation_and_ci(full_html):
    for text in ("<dt>mode</dt><dd>budget</dd>", "<dt>budget</dt><dd>max loss 1.00 pp: met</dd>",
                 "<dt>data</dt><dd>npz, cifar10_test.npz, labelled</dd>", "[0.31, 0.66] pp", "<td>212</td>",
                 "<td>verification</td><td>8,000</td>", "95% CI of the loss"):
        assert text in full_html, text
    assert 'class="alert' not in full_html


def test_per_layer_schema2_columns(full_html):
    for header in ("gran", "vec", "books", "pred. loss", "repair"):
        assert f"<th>{header}</th>" in full_html
    assert "<td>channel/8</td>" in full_html and "<td>scale+bias</td>" in full_html


def test_data_free_page_says_accuracy_not_measured_first():
    html = render.render(full_report(measured=False, met=False), "html")
    alert = html.index('<div class="alert">Accuracy not measured')
    assert alert < html.index('class="cards"')  # above every figure
    assert "agreement loss" in html and "Budget not met: the goal was max loss 1.00 pp." in html
    assert "No verification set" in html


def test_names_are_escaped():
    rep = first_round_report()
    rep["layers"][0]["name"] = '<img src=x onerror="alert(1)">&'
    rep["model"] = "a<b>.onnx"
    html = render_html(rep)
    assert "<img src=x" not in html and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;" in html
    assert "<title>axcnn report: a&lt;b&gt;.onnx</title>" in html


def test_without_matplotlib_the_page_says_how_to_get_plots(monkeypatch):
    no_matplotlib(monkeypatch)
    html = render.render(full_report(), "html")
    assert "data:image" not in html and "pip install &#x27;axcnn[plots]&#x27;" in html
    _assert_self_contained(html)
    assert "Pareto front" in html and "<h2>Layers</h2>" in html
