"""Tests for axcnn.data.source: which reader --data selects, and every form on fixed-batch, odd-shaped inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import tiny_cnn
from PIL import Image
from test_data_synthetic import rgb_cnn
from test_data_zoo import write_zoo

from axcnn.api import compress
from axcnn.config import CompressConfig
from axcnn.data import Preprocess, find_source
from axcnn.errors import AxcnnError

CFG = dict(kmin=2, kmax=6, filter=0.5, min_weights=16, batch_size=32)


def test_find_source_kinds(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3)))
    (tmp_path / "imgs").mkdir()
    assert find_source(tmp_path / "d.npz").kind == "npz"
    assert find_source(tmp_path / "imgs").kind == "images"
    write_zoo(tmp_path / "zoo", tiny_cnn(), [np.zeros((2, 1, 8, 8), np.float32)])
    src = find_source(tmp_path / "zoo")
    assert src.kind == "zoo" and [p.name for p in src.sets] == ["test_data_set_0"]
    src = find_source(None, tmp_path / "zoo" / "model.onnx")
    assert src.kind == "zoo" and src.found
    assert find_source(None, tmp_path / "elsewhere.onnx").kind == "synthetic"
    with pytest.raises(AxcnnError, match="test data not found"):
        find_source(tmp_path / "nope")


def test_unlabelled_npz_is_scored_by_agreement(tmp_path, caplog):
    model = tiny_cnn(seed=1)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "u.npz", x=np.random.default_rng(0).normal(size=(40, 1, 8, 8)).astype(np.float32))
    with caplog.at_level("WARNING", logger="axcnn"):
        rep = compress(tmp_path / "m.onnx", tmp_path / "u.npz", tmp_path / "o.onnx", None,
                       CompressConfig(**CFG)).report
    assert rep["metric"] == "agreement" and rep["reference_score"] == 1.0 and rep["accuracy_measured"] is False
    assert rep["data"]["labelled"] is False and rep["data"]["source"] == "npz"
    assert sum("has no labels" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("form", ["npz", "images", "flat_images", "zoo", "synthetic"])
def test_every_form_on_a_fixed_batch_odd_shaped_input(form, layout, tmp_path):
    """Batch fixed to 1, a 9x7 RGB input, as the VWW MobileNet's 1x3x96x96: every data form runs end to end."""
    model = rgb_cnn(batch=1, h=9, w=7, layout=layout)
    mp = tmp_path / "m.onnx"
    onnx.save(model, mp)
    rng = np.random.default_rng(3)
    pix = rng.integers(0, 256, (13, 12, 10, 3), dtype=np.uint8)  # larger than the input: resized and cropped
    y = rng.integers(0, 3, 13)
    pre = Preprocess(resize=9, crop=None, scale=255)  # crop defaults to the model's 9x7
    data = None
    if form == "npz":
        np.savez(tmp_path / "d.npz", x=pix, y=y)
        data = tmp_path / "d.npz"
    elif form in ("images", "flat_images"):
        for i, img in enumerate(pix):
            folder = tmp_path / "imgs" / (f"c{y[i]}" if form == "images" else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i}.png")
        data = tmp_path / "imgs"
    elif form == "zoo":
        x = rng.normal(size=(13, 3, 9, 7) if layout == "NCHW" else (13, 9, 7, 3)).astype(np.float32)
        mp = write_zoo(tmp_path / "zoo", model, [x[i:i + 1] for i in range(13)])
        pre = Preprocess()
    else:
        pre = Preprocess(scale=255)
    cfg = CompressConfig(limit=50, **CFG) if form == "synthetic" else CompressConfig(**CFG)
    rep = compress(mp, data, tmp_path / "o.onnx", None, cfg, pre).report
    assert rep["samples"] == (50 if form == "synthetic" else 13)
    assert rep["data"]["labelled"] is (form in ("npz", "images"))
    assert rep["metric"] == ("top1" if form in ("npz", "images") else "agreement")
    onnx.checker.check_model(onnx.load(str(tmp_path / "o.onnx")), full_check=True)
