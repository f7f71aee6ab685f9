"""Tests for axcnn.data: test-set loading, preprocessing and stratified subsets."""

from __future__ import annotations

import numpy as np
import pytest

from axcnn.data import Dataset, Preprocess, load_npz, parse_floats, prepare, stratified_subset
from axcnn.errors import AxcnnError

# ------------------------------------------------------------------------------------------- Preprocess


def test_preprocess_defaults_inactive():
    assert not Preprocess().active
    assert Preprocess(scale=255).active
    assert Preprocess(mean=(0.5,)).active
    assert Preprocess(std=(0.5,)).active
    assert Preprocess(layout="NHWC").active


def test_preprocess_normalises_values():
    p = Preprocess(scale=255, mean=[0, 1], std=(2, 3), layout="nchw")
    assert p.scale == 255.0 and isinstance(p.scale, float)
    assert p.mean == (0.0, 1.0) and isinstance(p.mean, tuple)
    assert p.std == (2.0, 3.0)
    assert p.layout == "NCHW"
    with pytest.raises(AttributeError):
        p.scale = 1.0  # frozen


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"scale": 0}, "scale"),
        ({"scale": -1.0}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"scale": float("inf")}, "scale"),
        ({"scale": "16"}, "scale"),
        ({"scale": True}, "scale"),
        ({"mean": ()}, "mean"),
        ({"mean": (0.5, float("nan"))}, "mean"),
        ({"mean": "0.5"}, "mean"),
        ({"mean": 0.5}, "mean"),
        ({"std": (0.5, 0.0)}, "std"),
        ({"std": (-1.0,)}, "std"),
        ({"std": ()}, "std"),
        ({"layout": "CHW"}, "layout"),
        ({"layout": 4}, "layout"),
    ],
)
def test_preprocess_validation_names_field(kwargs, field):
    with pytest.raises(ValueError) as exc:
        Preprocess(**kwargs)
    msg = str(exc.value)
    assert msg.startswith(field)
    assert repr(next(iter(kwargs.values()))) in msg  # the bad value is shown
    assert "\n" not in msg


def test_preprocess_validation_states_allowed_range():
    with pytest.raises(ValueError, match="> 0"):
        Preprocess(scale=0)
    with pytest.raises(ValueError, match="> 0"):
        Preprocess(std=(0,))
    with pytest.raises(ValueError, match="NCHW, NHWC"):
        Preprocess(layout="x")


# --------------------------------------------------------------------------------------------- Dataset


def test_dataset_subset_and_len():
    ds = Dataset(np.arange(10, dtype=np.float32).reshape(5, 2), np.array([0, 1, 2, 3, 4], dtype=np.int64))
    assert len(ds) == 5
    sub = ds.subset(np.array([4, 1]))
    assert len(sub) == 2
    np.testing.assert_array_equal(sub.x, [[8, 9], [2, 3]])
    np.testing.assert_array_equal(sub.y, [4, 1])
    sub = ds.subset([0, 2])
    np.testing.assert_array_equal(sub.y, [0, 2])


def test_dataset_length_mismatch():
    with pytest.raises(ValueError):
        Dataset(np.zeros((3, 2)), np.zeros(2, dtype=np.int64))


# -------------------------------------------------------------------------------------------- load_npz


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_load_npz_ok(tmp_path):
    x = np.random.default_rng(0).random((6, 4, 4, 1)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2], dtype=np.int32)
    p = _save(tmp_path / "d.npz", x=x, y=y)
    lx, ly = load_npz(p)
    np.testing.assert_array_equal(lx, x)
    assert ly.dtype == np.int64
    np.testing.assert_array_equal(ly, y)
    lx, ly = load_npz(str(p))  # str path too
    assert len(ly) == 6


def test_load_npz_whole_float_labels_ok(tmp_path):
    p = _save(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.array([0.0, 2.0, 1.0]))
    _, y = load_npz(p)
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, [0, 2, 1])


def test_load_npz_column_labels_ok(tmp_path):
    p = _save(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.array([[0], [2], [1]]))
    _, y = load_npz(p)
    np.testing.assert_array_equal(y, [0, 2, 1])


def test_load_npz_extra_keys_ignored(tmp_path):
    p = _save(tmp_path / "d.npz", x=np.zeros((2, 2)), y=np.array([0, 1]), names=np.array(["a", "b"]))
    x, y = load_npz(p)
    assert x.shape == (2, 2)


def _load_error(path) -> str:
    with pytest.raises(AxcnnError) as exc:
        load_npz(path)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_load_npz_missing_file(tmp_path):
    msg = _load_error(tmp_path / "nope.npz")
    assert "not found" in msg and "nope.npz" in msg


def test_load_npz_directory(tmp_path):
    assert "directory" in _load_error(tmp_path)


def test_load_npz_corrupt_file(tmp_path):
    p = tmp_path / "bad.npz"
    p.write_bytes(b"this is not a zip file\n\x00\x01\x02 at all")
    msg = _load_error(p)
    assert "not a valid .npz" in msg and "not a zip archive" in msg
    assert "allow_pickle" not in msg  # never suggest unpickling untrusted data


def test_load_npz_pickle_file_refused(tmp_path):
    import pickle

    p = tmp_path / "d.npz"
    p.write_bytes(pickle.dumps({"x": [1, 2], "y": [0, 1]}))
    assert "not a valid .npz" in _load_error(p)


def test_load_npz_truncated_zip(tmp_path):
    good = _save(tmp_path / "good.npz", x=np.zeros((50, 8)), y=np.zeros(50, dtype=np.int64))
    p = tmp_path / "trunc.npz"
    p.write_bytes(good.read_bytes()[:200])
    msg = _load_error(p)
    assert "not a valid .npz" in msg and "corrupt" in msg


def test_load_npz_plain_npy_file(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.zeros((3, 2)))
    assert "single .npy array" in _load_error(p)


def test_load_npz_refuses_pickle(tmp_path):
    p = _save(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    msg = _load_error(p)
    assert "'x'" in msg and "pickle" in msg and "allow_pickle" not in msg


def test_load_npz_missing_key(tmp_path):
    p = _save(tmp_path / "d.npz", images=np.zeros((3, 2)), y=np.array([0, 1, 2]))
    msg = _load_error(p)
    assert "'x'" in msg and "images" in msg and "y" in msg


def test_load_npz_missing_both_keys(tmp_path):
    p = _save(tmp_path / "d.npz", a=np.zeros(3), b=np.zeros(3))
    msg = _load_error(p)
    assert "'x' or 'y'" in msg and "a, b" in msg


def test_load_npz_length_mismatch(tmp_path):
    p = _save(tmp_path / "d.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 2]))
    msg = _load_error(p)
    assert "4" in msg and "3" in msg


def test_load_npz_empty(tmp_path):
    p = _save(tmp_path / "d.npz", x=np.zeros((0, 2)), y=np.zeros(0, dtype=np.int64))
    assert "empty" in _load_error(p)


def test_load_npz_non_integer_labels(tmp_path):
    p = _save(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.array([0.0, 0.5, 1.0]))
    assert "integer" in _load_error(p)


def test_load_npz_nan_labels(tmp_path):
    p = _save(tmp_path / "d.npz", x=np.zeros((2, 2)), y=np.array([0.0, np.nan]))
    assert "integer" in _load_error(p)


def test_load_npz_string_labels(tmp_path):
    p = _save(tmp_path / "d.npz", x=np.zeros((2, 2)), y=np.array(["cat", "dog"]))
    assert "integer" in _load_error(p)


def test_load_npz_negative_labels(tmp_path):
    p = _save(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.array([0, -1, 2]))
    assert ">= 0" in _load_error(p)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_load_npz_non_finite_x(tmp_path, bad):
    x = np.zeros((3, 2), dtype=np.float32)
    x[1, 1] = bad
    p = _save(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2]))
    assert "NaN or infinite" in _load_error(p)


def test_load_npz_non_numeric_x(tmp_path):
    p = _save(tmp_path / "d.npz", x=np.array(["a", "b"]), y=np.array([0, 1]))
    assert "numeric" in _load_error(p)


def test_load_npz_bad_label_shape(tmp_path):
    p = _save(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.zeros((3, 10)))
    assert "1-D" in _load_error(p)


# --------------------------------------------------------------------------------------------- prepare


def _labels(n):
    return np.arange(n, dtype=np.int64) % 3


def test_prepare_inactive_passthrough_casts():
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float64).reshape(2, 1, 4, 4)
    ds = prepare(x, _labels(2), Preprocess(), ["batch", 1, 4, 4])
    assert ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.x, x.astype(np.float32))
    assert ds.y.dtype == np.int64


def test_prepare_inactive_no_scaling_of_uint8():
    x = np.full((2, 1, 2, 2), 200, dtype=np.uint8)
    ds = prepare(x, _labels(2), Preprocess(), [None, 1, 2, 2])
    assert ds.x.dtype == np.float32 and float(ds.x.max()) == 200.0


def test_prepare_input_dtype():
    x = np.zeros((2, 3), dtype=np.float32)
    assert prepare(x, _labels(2), Preprocess(), ["n", 3], input_dtype=np.float16).x.dtype == np.float16
    assert prepare(x, _labels(2), Preprocess(), ["n", 3], input_dtype="float64").x.dtype == np.float64


@pytest.mark.parametrize(
    "model_shape", [["batch", 1, 4, 4], [None, 1, 4, 4], [0, 1, 4, 4], [1, 1, 4, 4], [7, 1, 4, 4], ["b", "c", "h", "w"]]
)
def test_prepare_free_and_fixed_batch_dims_accepted(model_shape):
    x = np.zeros((5, 1, 4, 4), dtype=np.float32)
    ds = prepare(x, _labels(5), Preprocess(), model_shape)
    assert ds.x.shape == (5, 1, 4, 4)


def test_prepare_fixed_batch_one_with_preprocessing():
    x = np.zeros((5, 4, 4, 3), dtype=np.uint8)
    ds = prepare(x, _labels(5), Preprocess(scale=255), [1, 3, 4, 4])
    assert ds.x.shape == (5, 3, 4, 4)


def _prepare_error(*args, **kwargs) -> str:
    with pytest.raises(AxcnnError) as exc:
        prepare(*args, **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_prepare_inactive_shape_mismatch_mentions_both_shapes():
    x = np.zeros((10, 28, 28, 1), dtype=np.float32)
    msg = _prepare_error(x, _labels(10), Preprocess(), ["batch", 1, 28, 28], input_name="input")
    assert "[10,28,28,1]" in msg
    assert "'input' [batch,1,28,28]" in msg
    assert "--layout NCHW" in msg  # the data are NHWC images; --layout NCHW would transpose them


def test_prepare_inactive_rank_mismatch():
    x = np.zeros((10, 784), dtype=np.float32)
    msg = _prepare_error(x, _labels(10), Preprocess(), ["batch", 1, 28, 28])
    assert "[10,784]" in msg and "[batch,1,28,28]" in msg


def test_prepare_inactive_fixed_dim_mismatch():
    x = np.zeros((4, 1, 28, 27), dtype=np.float32)
    msg = _prepare_error(x, _labels(4), Preprocess(), [None, 1, 28, 28], input_name="img")
    assert "[4,1,28,27]" in msg and "'img' [?,1,28,28]" in msg


def test_prepare_order_scale_mean_std_nhwc_to_nchw():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(3, 2, 5, 3), dtype=np.uint8)  # N=3 H=2 W=5 C=3
    y = np.array([0, 1, 2])
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    ds = prepare(x, y, Preprocess(scale=255, mean=mean, std=std), ["batch", 3, 2, 5])
    assert ds.x.shape == (3, 3, 2, 5) and ds.x.dtype == np.float32
    assert ds.x.flags.c_contiguous
    for n in range(3):
        for c in range(3):
            for h in range(2):
                for w in range(5):
                    want = (float(x[n, h, w, c]) / 255.0 - mean[c]) / std[c]
                    assert ds.x[n, c, h, w] == pytest.approx(want, rel=1e-5, abs=1e-6)
    np.testing.assert_array_equal(ds.y, y)


def test_prepare_order_is_not_std_then_mean():
    # one pixel, hand-computed: ((100 / 10) - 4) / 2 = 3 (any other order gives something else)
    x = np.full((1, 1, 1, 1), 100, dtype=np.uint8)
    ds = prepare(x, np.array([0]), Preprocess(scale=10, mean=(4,), std=(2,), layout="NCHW"), [1, 1, 1, 1])
    assert ds.x.item() == pytest.approx(3.0)


def test_prepare_nhwc_to_nchw_transpose():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # NHWC, C=5
    ds = prepare(x, _labels(2), Preprocess(layout="NCHW"), ["n", 5, 3, 4])
    np.testing.assert_array_equal(ds.x, x.transpose(0, 3, 1, 2))


def test_prepare_layout_nhwc_keeps_layout():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    ds = prepare(x, _labels(2), Preprocess(layout="NHWC", scale=2), ["n", 3, 4, 5])
    np.testing.assert_allclose(ds.x, x / 2)


def test_prepare_3d_images_are_one_channel():
    x = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    ds = prepare(x, _labels(2), Preprocess(scale=2), ["n", 1, 3, 3])
    assert ds.x.shape == (2, 1, 3, 3)
    np.testing.assert_allclose(ds.x[:, 0], x / 2)
    ds = prepare(x, _labels(2), Preprocess(scale=2), ["n", 3, 3, 1])
    assert ds.x.shape == (2, 3, 3, 1)


def test_prepare_default_scale_is_one():
    x = np.full((1, 2, 2, 1), 7, dtype=np.uint8)
    ds = prepare(x, np.array([0]), Preprocess(mean=(1,)), [1, 1, 2, 2])
    np.testing.assert_allclose(ds.x, 6.0)


def test_prepare_single_mean_std_broadcast():
    x = np.ones((1, 2, 2, 3), dtype=np.float32) * np.array([1.0, 2.0, 3.0], dtype=np.float32)
    ds = prepare(x, np.array([0]), Preprocess(mean=(1.0,), std=(2.0,)), ["n", 3, 2, 2])
    np.testing.assert_allclose(ds.x[0, :, 0, 0], [0.0, 0.5, 1.0])


def test_prepare_mean_wrong_length():
    x = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    msg = _prepare_error(x, _labels(2), Preprocess(mean=(0.1, 0.2)), ["n", 3, 4, 4])
    assert msg == "--mean has 2 values but the images have 3 channels"
    msg = _prepare_error(x, _labels(2), Preprocess(std=(0.1, 0.2, 0.3, 0.4)), ["n", 3, 4, 4])
    assert msg == "--std has 4 values but the images have 3 channels"


def test_prepare_does_not_modify_input():
    x = np.full((2, 2, 2, 1), 4.0, dtype=np.float32)
    prepare(x, _labels(2), Preprocess(scale=2, mean=(1,), layout="NHWC"), ["n", 2, 2, 1])
    assert (x == 4.0).all()


def test_prepare_infers_nchw():
    x = np.zeros((2, 28, 28, 1), dtype=np.uint8)
    assert prepare(x, _labels(2), Preprocess(scale=255), ["batch", 1, 28, 28]).x.shape == (2, 1, 28, 28)


def test_prepare_infers_nhwc():
    x = np.zeros((2, 28, 28, 1), dtype=np.uint8)
    assert prepare(x, _labels(2), Preprocess(scale=255), ["batch", 28, 28, 1]).x.shape == (2, 28, 28, 1)
    x = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    assert prepare(x, _labels(2), Preprocess(scale=255), ["batch", 32, 32, 3]).x.shape == (2, 32, 32, 3)


def test_prepare_layout_ambiguous():
    x = np.zeros((2, 3, 3, 3), dtype=np.uint8)  # C == H == W == 3
    msg = _prepare_error(x, _labels(2), Preprocess(scale=255), ["n", 3, 3, 3])
    assert "--layout" in msg and "both dim 1 and dim 3" in msg
    # an explicit layout resolves it
    assert prepare(x, _labels(2), Preprocess(scale=255, layout="NCHW"), ["n", 3, 3, 3]).x.shape == (2, 3, 3, 3)


def test_prepare_layout_impossible():
    x = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    msg = _prepare_error(x, _labels(2), Preprocess(scale=255), ["n", 1, 8, 8], input_name="input")
    assert "--layout" in msg and "[n,1,8,8]" in msg and "[2,8,8,3]" in msg and "3 channels" in msg


def test_prepare_layout_free_channel_dims():
    x = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    msg = _prepare_error(x, _labels(2), Preprocess(scale=255), ["n", "c", "h", "w"])
    assert "--layout" in msg and "not fixed" in msg
    # with an explicit layout, free dims accept anything
    assert prepare(x, _labels(2), Preprocess(layout="NCHW"), ["n", "c", "h", "w"]).x.shape == (2, 3, 8, 8)


def test_prepare_wrong_layout_mentions_both_shapes_and_fix():
    x = np.zeros((4, 28, 28, 1), dtype=np.uint8)
    msg = _prepare_error(x, _labels(4), Preprocess(layout="NHWC"), ["batch", 1, 28, 28], input_name="input")
    assert "[4,28,28,1]" in msg
    assert "'input' [batch,1,28,28]" in msg
    assert "--layout NCHW" in msg


def test_prepare_after_conversion_mismatch():
    x = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    msg = _prepare_error(x, _labels(4), Preprocess(scale=255), ["batch", 3, 28, 28], input_name="input")
    assert "[4,3,32,32]" in msg and "'input' [batch,3,28,28]" in msg


def test_prepare_preprocessing_needs_images():
    x = np.zeros((4, 784), dtype=np.float32)
    msg = _prepare_error(x, _labels(4), Preprocess(scale=255), ["batch", 784])
    assert "[4,784]" in msg


def test_prepare_preprocessing_needs_4d_model_input():
    x = np.zeros((4, 28, 28), dtype=np.uint8)
    msg = _prepare_error(x, _labels(4), Preprocess(scale=255), ["batch", 784])
    assert "rank 2" in msg


def test_prepare_label_length_mismatch():
    _prepare_error(np.zeros((4, 3)), np.array([0, 1]), Preprocess(), ["n", 3])


def test_prepare_converts_labels():
    ds = prepare(np.zeros((2, 3)), np.array([1.0, 0.0]), Preprocess(), ["n", 3])
    assert ds.y.dtype == np.int64


# ----------------------------------------------------------------------------------- stratified_subset


def _class_ordered(counts):
    return np.concatenate([np.full(c, k, dtype=np.int64) for k, c in enumerate(counts)])


@pytest.mark.parametrize("n", [1, 7, 10, 33, 100, 299])
def test_stratified_subset_exact_size_and_proportions(n):
    counts = [100, 50, 30, 70, 50]
    y = _class_ordered(counts)
    idx = stratified_subset(y, n, seed=0)
    assert len(idx) == n
    assert len(np.unique(idx)) == n
    assert np.all(np.diff(idx) > 0)  # sorted ascending, no duplicates
    assert idx.min() >= 0 and idx.max() < len(y)
    got = np.bincount(y[idx], minlength=len(counts))
    want = np.array(counts) * n / len(y)
    assert np.all(np.abs(got - want) < 1.0 + 1e-9), (got, want)


def test_stratified_subset_not_first_n_on_ordered_labels():
    y = _class_ordered([100] * 10)
    idx = stratified_subset(y, 100, seed=0)
    assert not np.array_equal(idx, np.arange(100))
    np.testing.assert_array_equal(np.bincount(y[idx], minlength=10), [10] * 10)


def test_stratified_subset_random_within_class():
    y = _class_ordered([100, 100])
    idx = stratified_subset(y, 20, seed=3)
    assert not np.array_equal(idx[:10], np.arange(10))


def test_stratified_subset_seeded_determinism():
    y = np.random.default_rng(1).integers(0, 7, size=500)
    a = stratified_subset(y, 60, seed=42)
    b = stratified_subset(y, 60, seed=42)
    np.testing.assert_array_equal(a, b)
    c = stratified_subset(y, 60, seed=43)
    assert not np.array_equal(a, c)


def test_stratified_subset_all_when_n_large():
    y = np.array([2, 0, 1, 1])
    np.testing.assert_array_equal(stratified_subset(y, 4, seed=0), [0, 1, 2, 3])
    np.testing.assert_array_equal(stratified_subset(y, 100, seed=0), [0, 1, 2, 3])


@pytest.mark.parametrize("n", [0, -5])
def test_stratified_subset_rejects_small_n(n):
    with pytest.raises(ValueError, match="n must be"):
        stratified_subset(np.array([0, 1, 2]), n, seed=0)


def test_stratified_subset_rejects_non_integer_n():
    with pytest.raises(ValueError, match="n must be"):
        stratified_subset(np.array([0, 1, 2]), 1.5, seed=0)


def test_stratified_subset_rare_classes():
    y = _class_ordered([997, 1, 1, 1])
    idx = stratified_subset(y, 10, seed=0)
    got = np.bincount(y[idx], minlength=4)
    assert got.sum() == 10
    assert abs(got[0] - 9.97) < 1


# ----------------------------------------------------------------------------------------- parse_floats


def test_parse_floats():
    assert parse_floats("0.485,0.456,0.406") == (0.485, 0.456, 0.406)
    assert parse_floats(" 1 , 2.5e-1 ") == (1.0, 0.25)
    assert parse_floats("255") == (255.0,)
    assert parse_floats("-0.5,0") == (-0.5, 0.0)


@pytest.mark.parametrize("text", ["", "  ", "a,b", "0.5,,0.4", "0.5,", "1;2", "nan", "1,inf", "0.5 0.4"])
def test_parse_floats_errors(text):
    with pytest.raises(AxcnnError) as exc:
        parse_floats(text)
    assert "\n" not in str(exc.value)
