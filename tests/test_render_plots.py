"""axcnn.render.plots: PNGs that decode, None when there is nothing to draw, odd data tolerated."""

from __future__ import annotations

import io
import logging

import pytest
from test_render import PNG_MAGIC, first_round_report, full_report, no_matplotlib

from axcnn.errors import MissingBackendError
from axcnn.render import plots

pytest.importorskip("matplotlib")


def _size(png: bytes) -> tuple[int, int]:
    from PIL import Image  # a matplotlib dependency

    assert png.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        return im.size


def test_full_report_has_every_plot():
    got = plots.plots(full_report())
    assert [p.name for p in got] == ["layers", "front", "sensitivity", "candidates"]
    for p in got:
        w, h = _size(p.png)
        assert w == plots.WIDTH * plots.DPI and 150 < h < 2000
        assert p.title and p.caption


def test_first_round_report_has_layers_and_candidates_only():
    rep = first_round_report()
    assert [p.name for p in plots.plots(rep)] == ["layers", "candidates"]
    assert plots.front_png(rep) is None and plots.sensitivity_png(rep) is None


@pytest.mark.parametrize("case", ["one_layer", "one_front_point_none_chosen", "all_zero_proxy", "no_candidates",
                                  "null_fields", "many_layers", "budget_target_cr"])
def test_degenerate_reports(case):
    rep = full_report(n_layers=17 if case == "many_layers" else 5)
    if case == "one_layer":
        rep["layers"] = rep["layers"][:1]
    elif case == "one_front_point_none_chosen":
        rep["front"] = [dict(rep["front"][0], chosen=False)]
    elif case == "all_zero_proxy":
        for e in rep["sensitivity"]["entries"]:
            e["proxy"] = 0.0
    elif case == "no_candidates":
        for layer in rep["layers"]:
            layer["candidates"] = []
    elif case == "null_fields":
        for layer in rep["layers"]:
            layer.update(compression_ratio=None, index_bytes=None, centroid_bytes=None, k=None, vector_dim=None)
        rep["compression_ratio"] = None
        rep["evaluation"]["verification"]["ci95_pp"] = None
    elif case == "budget_target_cr":
        rep["budget"] = {"max_loss_pp": None, "target_cr": 9.0, "met": False}
    got = {p.name: p.png for p in plots.plots(rep)}
    assert "layers" in got and "front" in got
    if case == "all_zero_proxy":
        assert "sensitivity" not in got  # nothing has a place on a log axis
    else:
        assert "sensitivity" in got
    assert ("candidates" in got) == (case != "no_candidates")
    for png in got.values():
        _size(png)


def test_a_plot_that_fails_is_left_out_with_a_warning(monkeypatch, caplog):
    def broken(rep):
        raise ValueError("bad front")

    monkeypatch.setattr(plots, "front_png", broken)
    with caplog.at_level(logging.WARNING, logger="axcnn.render.plots"):
        got = plots.plots(full_report())
    assert [p.name for p in got] == ["layers", "sensitivity", "candidates"]
    assert "the front plot could not be drawn (ValueError: bad front)" in caplog.text


def test_without_matplotlib_a_missing_backend_error_names_the_extra(monkeypatch):
    no_matplotlib(monkeypatch)
    assert plots.available() is False
    with pytest.raises(MissingBackendError, match=r"pip install 'axcnn\[plots\]'"):
        plots.plots(full_report())
