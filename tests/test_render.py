"""axcnn.render: load/check, render and atomic write, on a real first-round report and on made-up schema-2 reports.

The report builders here are shared by the other tests/test_render_*.py modules.
"""

from __future__ import annotations

import atexit
import builtins
import copy
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import tiny_cnn, tiny_data

from axcnn import render
from axcnn.errors import AxcnnError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_FIRST_ROUND: dict = {}


def first_round_report() -> dict:
    """The report of a real compress run on the tiny model (schema 1: none of the schema-2 fields); one run per
    test session, a fresh deep copy per call."""
    if not _FIRST_ROUND:
        from axcnn.api import compress
        from axcnn.config import CompressConfig

        folder = Path(tempfile.mkdtemp(prefix="axcnn-render-"))
        atexit.register(shutil.rmtree, folder, True)
        model = tiny_cnn(seed=3)
        x, y = tiny_data(model, n=80)
        onnx.save(model, folder / "tiny.onnx")
        np.savez(folder / "tiny.npz", x=x, y=y)
        cfg = CompressConfig(kmin=2, kmax=8, filter=0.34, min_weights=16, batch_size=32)
        rep = compress(folder / "tiny.onnx", folder / "tiny.npz", folder / "out.onnx", None, cfg).report
        # what the first round wrote: schema 1, none of the fields added since
        schema2 = {"mode", "budget", "evaluation", "accuracy_measured", "accuracy_measured_on", "data",
                   "sensitivity", "front"}
        rep = {k: v for k, v in rep.items() if k not in schema2}
        rep["schema_version"] = 1
        layer_fields = {"granularity", "group_size", "vector_dim", "codebooks", "extra_bits", "predicted_loss",
                        "predicted_loss_pp", "repair"}
        rep["layers"] = [{k: v for k, v in layer.items() if k not in layer_fields} for layer in rep["layers"]]
        rep["file_breakdown"].pop("repair_tensors", None)
        _FIRST_ROUND.update(rep)
    return copy.deepcopy(_FIRST_ROUND)


LAYERS = [  # name, op, shape, K, granularity, group_size, vector_dim, codebooks, repair
    ("features.0.weight", "Conv", [16, 3, 3, 3], 24, "layer", None, 1, 1, None),
    ("features.3.weight", "Conv", [32, 16, 3, 3], 16, "channel", 8, 1, 4, {"scale": True, "bias": True}),
    ("features.6.weight", "Conv", [64, 32, 3, 3], 32, "layer", None, 2, 1, {"scale": False, "bias": True}),
    ("classifier.1.weight", "Gemm", [128, 1024], 16, "kernel", None, 1, 1, {"scale": False, "bias": False}),
    ("classifier.4.weight", "Gemm", [10, 128], 48, "layer", None, 1, 1, None),
]


def _eq1(weights: int, k: int, dim: int = 1, books: int = 1) -> int:
    """Eq. 1 with vectors and codebooks: one index of ceil(log2 K) bits per vector, K centroids of d floats per
    codebook."""
    return math.ceil(weights / dim) * max(1, math.ceil(math.log2(k))) + books * k * dim * 32


def full_report(n_layers: int = 5, measured: bool = True, met: bool = True) -> dict:
    """A made-up but consistent report with every schema-2 field: per-layer Eq. 1 figures, a sensitivity table
    whose chosen entries are the layers' K, a Pareto front whose chosen point is the report's CR and loss."""
    layers, entries = [], []
    before = after = 0
    for i in range(n_layers):
        name, op, shape, k, gran, group, dim, books, repair = LAYERS[i % len(LAYERS)]
        if i >= len(LAYERS):
            name = f"block{i // len(LAYERS)}.{name}"
        weights = math.prod(shape)
        bits = _eq1(weights, k, dim, books)
        before += weights * 32
        after += bits
        index_bytes = math.ceil(math.ceil(weights / dim) * math.ceil(math.log2(k)) / 8)
        centroid_bytes = books * k * dim * 4
        layers.append({
            "name": name, "op_type": op, "node": name.rsplit(".", 1)[0], "shape": shape, "dtype": "float32",
            "bits": 32, "weights": weights, "unique_values": weights, "k": k, "k_clamped": False,
            "index_bits": math.ceil(math.log2(k)), "inertia": 0.01 / k, "score": 0.905 - 0.0005 * i,
            "accuracy_loss_pp": 0.1 * (i + 1), "compression_ratio": weights * 32 / bits,
            "stored_bytes": index_bytes + centroid_bytes, "index_bytes": index_bytes,
            "centroid_bytes": centroid_bytes, "encoding": "planes", "scoring_plan": "suffix",
            "timing": {"clustering_s": 0.2, "estimate_s": 0.01, "scoring_s": 0.3},
            "candidates": [{"k": c, "inertia": 0.01 / c, "estimate": 0.01 / c, "scored": c in (k, k + 1),
                            "score": 0.905 if c == k else None, "stopped_early": c == k + 1,
                            "samples_seen": 2000 if c == k else 256 if c == k + 1 else 0,
                            "compression_ratio": weights * 32 / _eq1(weights, c, dim, books)}
                           for c in range(k - 4, k + 5)],
            "granularity": gran, "group_size": group, "vector_dim": dim, "codebooks": books,
            "predicted_loss": 0.02 * (i + 1) * 16 / k, "repair": repair,
        })
        for kk in sorted({2, 4, 8, 16, 32, 64, 128, 256, k}):  # the K written is one of the entries
            entries.append({"layer": name, "k": kk, "index_bits": max(1, math.ceil(math.log2(kk))),
                            "proxy": (0.5 + i) * 16 / kk ** 1.5 if kk < 256 else 0.0,
                            "compression_ratio": weights * 32 / _eq1(weights, kk, dim, books),
                            "granularity": gran, "vector_dim": dim})
    cr = before / after
    loss = 0.48
    front = [{"accuracy_loss_pp": lo, "compression_ratio": c, "measured_on": "selection", "samples": 2000,
              "chosen": False, "layers": [{"name": x["name"], "k": 2 * x["k"], "granularity": x["granularity"],
                                           "vector_dim": x["vector_dim"]} for x in layers]}
             for lo, c in ((0.05, cr * 0.6), (0.2, cr * 0.8), (1.3, cr * 1.2), (2.9, cr * 1.45))]
    front.insert(2, {"accuracy_loss_pp": loss, "compression_ratio": cr,
                     "measured_on": "verification" if measured else "selection", "samples": 8000 if measured else 2000,
                     "chosen": True,
                     "layers": [{"name": x["name"], "k": x["k"], "granularity": x["granularity"],
                                 "vector_dim": x["vector_dim"]} for x in layers]})
    ref = 0.912 if measured else 1.0
    sel_loss = 0.45 if measured else loss  # without labels there is no verification: selection is the headline
    rep = {
        "schema_version": 2,
        "tool": {"name": "axcnn", "version": "0.2.0", "providers": ["CPUExecutionProvider"]},
        "model": "models/vgg_small.onnx", "output": "vgg_small.shared.onnx",
        "settings": {"kmin": 2, "kmax": 256, "filter": 0.15, "metric": "top1" if measured else "agreement",
                     "max_loss": 1.0, "seed": 0},
        "metric": "top1" if measured else "agreement",
        "samples": 2000, "reference_score": ref, "final_score": ref - loss / 100, "accuracy_loss_pp": loss,
        "compression_ratio": cr, "weights_clustered": sum(x["weights"] for x in layers),
        "eq1_bits_before": before, "eq1_bits_after": after,
        "file_bytes_before": before // 8 + 3000, "file_bytes_after": after // 8 + 9000,
        "file_ratio": (before // 8 + 3000) / (after // 8 + 9000),
        "file_breakdown": {"how": "-", "clustered_payload": after // 8, "unclustered_tensors": 3000,
                           "graph_and_decode_overhead": 6000},
        "timing": {"clustering_s": 3.2, "estimate_s": 1.1, "scoring_s": 12.5, "candidates_scored": 2 * n_layers,
                   "candidates_stopped_early": n_layers, "t_pass_s": 0.8, "cost_t_pass": 17.0,
                   "final_check_s": 0.9, "total_s": 19.4},
        "estimator": "kl",
        "layers": layers,
        "skipped": [{"name": "features.0.bias", "op_type": "Conv", "reason": "bias"}],
        "mode": "budget",
        "budget": {"max_loss_pp": 1.0, "target_cr": None, "met": met},
        "evaluation": {
            "selection": {"samples": 2000, "reference_score": ref, "final_score": ref - sel_loss / 100,
                          "accuracy_loss_pp": sel_loss},
            "verification": {"samples": 8000, "reference_score": ref, "final_score": ref - loss / 100,
                             "accuracy_loss_pp": loss, "ci95_pp": [0.31, 0.66], "disagreements": 212},
        },
        "accuracy_measured": measured,
        "data": {"source": "npz" if measured else "synthetic", "path": "cifar10_test.npz" if measured else None,
                 "labelled": measured},
        "sensitivity": {"proxy": "kl", "unit": "nats", "samples": 256, "entries": entries},
        "front": front,
    }
    if not measured:
        rep["evaluation"]["verification"] = None
    return rep


def layer_names(rep: dict) -> list[str]:
    return [x["name"] for x in rep["layers"]]


def no_matplotlib(monkeypatch) -> None:
    """Make ``import matplotlib`` (and its submodules) fail as it does where the extra is not installed."""
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


# ---------------------------------------------------------------------------------------------------------------


def test_first_round_report_has_no_schema2_field():
    rep = first_round_report()
    assert rep["schema_version"] == 1
    assert not {"mode", "budget", "evaluation", "accuracy_measured", "data", "sensitivity", "front"} & set(rep)


@pytest.mark.parametrize("fmt", render.FORMATS)
@pytest.mark.parametrize("which", ["first_round", "full", "data_free", "budget_missed", "many_layers"])
def test_every_format_renders_every_report_shape(fmt, which, monkeypatch):
    if fmt == "html" and which != "full":
        no_matplotlib(monkeypatch)  # the tables are what differs here; tests/test_render_plots.py draws each shape
    rep = {"first_round": first_round_report, "full": full_report,
           "data_free": lambda: full_report(measured=False), "budget_missed": lambda: full_report(met=False),
           "many_layers": lambda: full_report(n_layers=17)}[which]()
    text = render.render(rep, fmt)
    if fmt == "json":
        assert json.loads(text) == rep
    else:
        for name in layer_names(rep)[:40]:
            assert name[-30:] in text


def test_render_reads_only_the_dict(tmp_path, monkeypatch):
    """A report renders the same wherever it is read: nothing it names (model, data, output) is opened."""
    no_matplotlib(monkeypatch)  # PNG bytes may differ between matplotlib versions; the text may not
    rep = full_report()
    rep["model"] = str(tmp_path / "gone" / "model.onnx")
    rep["data"]["path"] = str(tmp_path / "gone" / "data.npz")
    for fmt in render.FORMATS:
        assert render.render(rep, fmt) == render.render(copy.deepcopy(rep), fmt)
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize("content,fragment", [
    ("{not json", "not JSON"),
    ("[1, 2]", "a JSON list"),
    ('{"layers": []}', "no integer schema_version"),
    ('{"schema_version": "1", "layers": []}', "no integer schema_version"),
    ('{"schema_version": 1}', "no list of layer records"),
    ('{"schema_version": 1, "layers": [3]}', "no list of layer records"),
    ('{"schema_version": 1, "layers": [], "tool": {"name": "other"}}', "written by 'other'"),
    (b"\xff\xfe\x00garbage", "not JSON"),
])
def test_load_refuses_what_is_not_a_report(tmp_path, content, fragment):
    p = tmp_path / "r.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(AxcnnError, match="not an axcnn report") as info:
        render.load(p)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_load_missing_file_and_folder(tmp_path):
    with pytest.raises(AxcnnError, match="report file not found"):
        render.load(tmp_path / "nope.json")
    with pytest.raises(AxcnnError, match="is a folder"):
        render.load(tmp_path)


def test_load_round_trips_a_written_report(tmp_path):
    from axcnn.report import write_json

    rep = first_round_report()
    write_json(rep, tmp_path / "r.json")
    assert render.load(tmp_path / "r.json") == json.loads(json.dumps(rep))


def test_newer_schema_renders_with_a_warning(caplog):
    rep = full_report()
    rep["schema_version"] = 99
    rep["something_new"] = {"x": 1}
    assert "features.0.weight" in render.render(rep, "table")
    assert "schema 99" in caplog.text


def test_bad_format_is_a_value_error_naming_the_field():
    with pytest.raises(ValueError, match="fmt='pdf' is invalid"):
        render.render(full_report(), "pdf")


def test_default_path_sits_beside_the_json(tmp_path):
    assert render.default_path(tmp_path / "m.shared.report.json", "html") == tmp_path / "m.shared.report.html"
    assert render.default_path("r.JSON", "markdown") == Path("r.md")
    assert render.plots_dir(tmp_path / "out" / "rep.md") == tmp_path / "out" / "rep_plots"


@pytest.mark.parametrize("fmt", render.FORMATS)
def test_write_is_atomic_and_leaves_no_temporary_file(fmt, tmp_path):
    rep = full_report()
    target = tmp_path / f"report.{fmt}"
    written = render.write(rep, fmt, target)
    assert written[0] == target and all(p.is_file() for p in written)
    assert target.read_text(encoding="utf-8") == render.render(rep, fmt) or fmt in ("markdown", "html")
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"
    assert target.stat().st_mode & 0o777 == 0o644


def test_markdown_file_links_plots_that_exist(tmp_path):
    rep = full_report()
    target = tmp_path / "rep.md"
    written = render.write(rep, "markdown", target)
    text = target.read_text()
    links = [line.split("](", 1)[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(links) == 4 and {Path(p).name for p in links} == {"layers.png", "front.png", "sensitivity.png",
                                                                 "candidates.png"}
    for link in links:
        assert not Path(link).is_absolute() and link.startswith("rep_plots/")
        png = (target.parent / link).read_bytes()
        assert png.startswith(PNG_MAGIC)
    assert sorted(written[1:]) == sorted(target.parent / p for p in links)


def test_markdown_rewritten_for_a_smaller_report_drops_stale_plots(tmp_path):
    target = tmp_path / "rep.md"
    render.write(full_report(), "markdown", target)
    (tmp_path / "rep_plots" / "mine.txt").write_text("not ours")
    render.write(first_round_report(), "markdown", target)
    assert sorted(p.name for p in (tmp_path / "rep_plots").iterdir()) == ["candidates.png", "layers.png", "mine.txt"]


def test_markdown_to_stdout_has_no_image_links():
    text = render.render(full_report(), "markdown")
    assert "![" not in text and "## Pareto front" in text


def test_a_failed_markdown_write_removes_its_plots(tmp_path, monkeypatch):
    rep = full_report()
    target = tmp_path / "rep.md"
    real = render._atomic_write

    def fail_on_markdown(path, data):
        if path == target:
            raise AxcnnError(f"cannot write {path}: disk full")
        real(path, data)

    monkeypatch.setattr(render, "_atomic_write", fail_on_markdown)
    with pytest.raises(AxcnnError, match="disk full"):
        render.write(rep, "markdown", target)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "r.html"
    target.write_text("old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(render.os, "replace", boom)
    with pytest.raises(AxcnnError, match="No space left on device"):
        render.write(full_report(), "html", target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.html"]


@pytest.mark.parametrize("where", ["missing_folder", "folder"])
def test_write_refuses_an_unusable_target(tmp_path, where):
    target = tmp_path / "no" / "r.html" if where == "missing_folder" else tmp_path
    with pytest.raises(AxcnnError, match="cannot write"):
        render.write(full_report(), "html", target)
    assert list(tmp_path.iterdir()) == []


def test_without_matplotlib_html_and_markdown_say_how_to_get_plots(tmp_path, monkeypatch):
    no_matplotlib(monkeypatch)
    rep = full_report()
    html = render.render(rep, "html")
    assert "pip install &#x27;axcnn[plots]&#x27;" in html and "data:image/png" not in html
    assert all(name in html for name in layer_names(rep))
    written = render.write(rep, "markdown", tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert written == [tmp_path / "r.md"] and "pip install 'axcnn[plots]'" in text and "![" not in text
    assert not (tmp_path / "r_plots").exists()
