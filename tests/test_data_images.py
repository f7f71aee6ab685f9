"""Tests for axcnn.data.images (image folders via Pillow) and the presets/resize/crop of axcnn.data.preprocess."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from conftest import REALDATA, realdata_manifest, tiny_cnn
from PIL import Image

from axcnn.api import compress
from axcnn.config import CompressConfig
from axcnn.data import PRESETS, Preprocess, find_source, image_geometry, load, prepare, stratified_subset
from axcnn.data.images import list_images, read_images, resize_crop
from axcnn.errors import AxcnnError
from axcnn.model import io_info

CFG = dict(kmin=2, kmax=6, filter=0.5, min_weights=16, batch_size=32)


def _save_folder(root, x, y=None, fmt="png", names=None):
    """Write NHWC uint8 images: root/<class name>/<i>.png, or root/<i>.png without labels."""
    for i, img in enumerate(x):
        im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        folder = root if y is None else root / (names[y[i]] if names else f"class{y[i]:02d}")
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{i:05d}.{fmt}")
    return root


def _io(shape, dtype=np.float32):
    return type("IO", (), {"input_shape": tuple(shape), "input_dtype": np.dtype(dtype), "input_name": "x"})()


# ------------------------------------------------------------------------------------------------- presets


def test_preset_fills_only_unset_fields():
    p = Preprocess(preset="imagenet").resolved()
    assert (p.resize, p.crop, p.scale, p.mean, p.std) == (256, 224, 255.0, PRESETS["imagenet"]["mean"],
                                                          PRESETS["imagenet"]["std"])
    p = Preprocess(preset="imagenet", crop=96, mean=(0.5, 0.5, 0.5)).resolved()
    assert p.crop == 96 and p.mean == (0.5, 0.5, 0.5) and p.resize == 256 and p.std == PRESETS["imagenet"]["std"]
    assert Preprocess(preset="mnist").resolved().mean == (0.1307,)
    assert Preprocess(preset="cifar").resolved().resize is None
    assert Preprocess(preset="cifar").active and Preprocess(preset="cifar").normalises
    assert not Preprocess(crop=8).normalises


@pytest.mark.parametrize("kwargs, field", [({"preset": "coco"}, "preset"), ({"resize": 0}, "resize"),
                                           ({"crop": -3}, "crop"), ({"crop": 2.5}, "crop")])
def test_new_fields_validated_by_name(kwargs, field):
    with pytest.raises(ValueError) as exc:
        Preprocess(**kwargs)
    assert str(exc.value).startswith(field) and repr(next(iter(kwargs.values()))) in str(exc.value)


def test_preset_equals_the_flags_it_sets():
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    a = prepare(x, None, Preprocess(preset="cifar"), ["n", 3, 32, 32]).x
    flags = PRESETS["cifar"]
    b = prepare(x, None, Preprocess(scale=flags["scale"], mean=flags["mean"], std=flags["std"]), ["n", 3, 32, 32]).x
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------- resize / crop


def test_resize_crop_follows_torchvision_semantics():
    im = Image.fromarray(np.arange(30 * 40, dtype=np.uint8).reshape(30, 40))  # 40 wide, 30 high
    out = resize_crop(im, 20, None)
    assert out.size == (26, 20)  # shorter side 20, longer int(20 * 40 / 30)
    out = resize_crop(im, None, (10, 12))
    assert out.size == (12, 10)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(im)[10:20, 14:26])  # centre, rounded
    assert resize_crop(im, 30, None).size == (40, 30)  # already the size: untouched


def test_crop_larger_than_image_names_the_image():
    im = Image.fromarray(np.zeros((8, 8), np.uint8))
    with pytest.raises(AxcnnError, match="a.png is 8x8, smaller than the 10x10 crop; pass --resize"):
        resize_crop(im, None, (10, 10), "a.png")


def test_prepare_resizes_and_crops_arrays():
    x = np.random.default_rng(1).integers(0, 256, (3, 20, 16, 3), dtype=np.uint8)
    ds = prepare(x, None, Preprocess(resize=10, scale=255), ["n", 3, 10, 10])  # crop defaults to the model size
    assert ds.x.shape == (3, 3, 10, 10)
    want = np.asarray(resize_crop(Image.fromarray(x[1]), 10, (10, 10))).astype(np.float32) / 255
    np.testing.assert_allclose(ds.x[1], want.transpose(2, 0, 1))
    flt = prepare(x.astype(np.float32), None, Preprocess(crop=8, layout="NHWC"), ["n", 8, 8, 3]).x
    np.testing.assert_array_equal(flt, x[:, 6:14, 4:12].astype(np.float32))


# ------------------------------------------------------------------------------------------- list / read


def test_list_images_class_folders_sorted_like_imagefolder(tmp_path):
    x = np.zeros((6, 4, 4, 1), np.uint8)
    _save_folder(tmp_path, x, np.array([0, 1, 2, 0, 1, 2]), names=["zebra", "ant", "Bee"])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "ant" / "deep").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ant" / "deep" / "x.JPG")
    files, y, classes = list_images(tmp_path)
    assert classes == ("Bee", "ant", "zebra")  # sorted folder names, as torchvision
    assert list(y) == [0, 0, 1, 1, 1, 2, 2]
    assert files[2].parent.name == "ant" and any(f.name == "x.JPG" for f in files)


def test_list_images_flat_is_unlabelled(tmp_path):
    _save_folder(tmp_path, np.zeros((3, 4, 4, 1), np.uint8))
    files, y, classes = list_images(tmp_path)
    assert len(files) == 3 and y is None and classes is None


@pytest.mark.parametrize("case, fragment", [("empty", "holds no PNG or JPEG"), ("empty_class", "class folder"),
                                            ("mixed_layout", "both images at the top")])
def test_list_images_errors(case, fragment, tmp_path):
    if case == "empty_class":
        _save_folder(tmp_path, np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 0]))
        (tmp_path / "class01").mkdir()
        (tmp_path / "class01" / "readme.txt").write_text("x")
    if case == "mixed_layout":
        _save_folder(tmp_path, np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 0]))
        _save_folder(tmp_path, np.zeros((1, 4, 4, 1), np.uint8))
    with pytest.raises(AxcnnError) as exc:
        list_images(tmp_path)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_unreadable_image_names_the_file(tmp_path):
    _save_folder(tmp_path, np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1]))
    bad = tmp_path / "class01" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    files, _, _ = list_images(tmp_path)
    with pytest.raises(AxcnnError, match=r"cannot read image .*broken\.png"):
        read_images(files, Preprocess(), image_geometry(Preprocess(), ["n", 1, 4, 4]))


def test_mixed_sizes_need_a_resize(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(tmp_path / "b.png")
    files, _, _ = list_images(tmp_path)
    geometry = image_geometry(Preprocess(), ["n", 1, "h", "w"])
    with pytest.raises(AxcnnError, match=r"image .*b\.png is 10x8 but .*a\.png is 8x8; pass --resize"):
        read_images(files, Preprocess(), geometry)
    x, _ = read_images(files, Preprocess(resize=6, crop=6), geometry)
    assert x.shape == (2, 6, 6, 1)


@pytest.mark.parametrize("mode, channels, converted", [("L", 3, "L->RGB"), ("RGB", 1, "RGB->L"),
                                                       ("RGBA", 3, "RGBA->RGB"), ("RGB", 3, None)])
def test_channels_converted_to_the_models_and_said(mode, channels, converted, tmp_path, caplog):
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (5, 5, len(mode)), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode=None).save(tmp_path / "a.png")
    files, _, _ = list_images(tmp_path)
    with caplog.at_level(logging.WARNING, logger="axcnn"):
        x, details = read_images(files, Preprocess(), image_geometry(Preprocess(), ["n", channels, 5, 5]))
    assert x.shape == (1, 5, 5, channels)
    if converted is None:
        assert "converted" not in details and not caplog.records
    else:
        assert details["converted"] == {converted: 1}
        assert any("converted 1 image" in r.getMessage() for r in caplog.records)
    if mode == "L" and channels == 3:
        np.testing.assert_array_equal(x[0, ..., 1], arr[..., 0])


def test_jpeg_folder_reads(tmp_path):
    x = np.random.default_rng(3).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    _save_folder(tmp_path, x, np.array([0, 1, 0, 1]), fmt="jpg")
    ds = load(find_source(tmp_path), Preprocess(scale=255), _io(["n", 3, 16, 16]))
    assert ds.x.shape == (4, 3, 16, 16) and list(ds.y) == [0, 0, 1, 1]
    files, _, _ = list_images(tmp_path)
    decoded = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.float32) / 255
    np.testing.assert_allclose(ds.x, decoded.transpose(0, 3, 1, 2))


def test_limit_picks_files_before_decoding(tmp_path):
    x = np.zeros((20, 4, 4, 1), np.uint8)
    _save_folder(tmp_path, x, np.arange(20) % 4)
    files, y, _ = list_images(tmp_path)
    drawn = stratified_subset(y, 8, seed=3)
    left_out = next(f for i, f in enumerate(files) if i not in drawn)
    left_out.write_bytes(b"broken")  # never decoded: it is not drawn
    ds = load(find_source(tmp_path), Preprocess(), _io(["n", 1, 4, 4]), limit=8, seed=3)
    assert len(ds) == 8 and np.bincount(ds.y).tolist() == [2, 2, 2, 2]
    assert ds.provenance.read == 20 and ds.provenance.as_dict(len(ds))["samples"] == 8


# ------------------------------------------------------------------------------------------- end to end


def test_png_class_folders_score_as_the_npz_with_the_same_pixels(tmp_path):
    model = tiny_cnn(seed=4)
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (60, 8, 8, 1), dtype=np.uint8)
    y = rng.integers(0, 10, 60)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    _save_folder(tmp_path / "imgs", x, y)
    reps = {}
    for tag, data in (("npz", tmp_path / "d.npz"), ("png", tmp_path / "imgs")):
        reps[tag] = compress(tmp_path / "m.onnx", data, tmp_path / f"{tag}.onnx", None, CompressConfig(**CFG),
                             Preprocess(scale=255)).report
    assert reps["png"]["reference_score"] == reps["npz"]["reference_score"]
    assert reps["png"]["final_score"] == reps["npz"]["final_score"]
    assert [la["k"] for la in reps["png"]["layers"]] == [la["k"] for la in reps["npz"]["layers"]]
    assert reps["png"]["data"]["source"] == "images" and reps["png"]["data"]["labelled"] is True
    assert reps["png"]["data"]["classes"] == [f"class{i:02d}" for i in sorted(set(y))]
    assert reps["npz"]["data"]["source"] == "npz" and reps["png"]["accuracy_measured"] is True


def test_png_folder_of_real_cifar_images_scores_as_the_npz(tmp_path):
    man = realdata_manifest()
    entry = man["models"]["cifar10_resnet20"]
    z = np.load(REALDATA / man["datasets"][entry["dataset"]]["file"])
    idx = np.random.default_rng(0).choice(len(z["y"]), 120, replace=False)
    x, y = z["x"][idx], z["y"][idx]
    np.savez(tmp_path / "d.npz", x=x, y=y)
    _save_folder(tmp_path / "imgs", x, y)  # PNG is lossless: the same pixels
    pre = Preprocess(scale=entry["scale"], mean=tuple(entry["mean"]), std=tuple(entry["std"]))
    io = io_info(onnx.load(str(REALDATA / entry["file"])))
    a = load(find_source(tmp_path / "d.npz"), pre, io)
    b = load(find_source(tmp_path / "imgs"), pre, io)
    order = np.argsort(y, kind="stable")  # the folder lists class by class, file name order within a class
    np.testing.assert_array_equal(b.x, a.x[order])
    np.testing.assert_array_equal(b.y, a.y[order])
