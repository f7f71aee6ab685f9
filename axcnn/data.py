"""Test-set loading and preprocessing.

A test set is an ``.npz`` file with two arrays: ``x`` (the inputs) and ``y`` (integer class labels).
:func:`load_npz` reads and checks it, :func:`prepare` turns it into a :class:`Dataset` that can be fed to
the model as it is, and :func:`stratified_subset` picks a class-balanced random subset for quick scoring.

This module uses numpy only; running the model is the scorer's job.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from axcnn.errors import AxcnnError
from axcnn.options import opt

logger = logging.getLogger(__name__)

__all__ = [
    "LAYOUTS",
    "Dataset",
    "Preprocess",
    "load_npz",
    "parse_floats",
    "prepare",
    "stratified_subset",
]

LAYOUTS = ("NCHW", "NHWC")

Dim = int | str | None


def _float_tuple(name: str, values: object, *, positive: bool) -> tuple[float, ...]:
    """Validate a per-channel value list for :class:`Preprocess`; return it as a tuple of floats."""
    allowed = "finite numbers > 0" if positive else "finite numbers"
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of {allowed}, got {values!r}")
    try:
        items = tuple(values)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a sequence of {allowed}, got {values!r}") from None
    if not items:
        raise ValueError(f"{name} must have at least one value ({allowed}), got {values!r}")
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must contain {allowed}, got {values!r}")
        f = float(v)
        if not math.isfinite(f) or (positive and f <= 0):
            raise ValueError(f"{name} must contain {allowed}, got {values!r}")
        out.append(f)
    return tuple(out)


@dataclass(frozen=True)
class Preprocess:
    """How to turn raw images into model input.

    When any field is set, the data is read as NHWC images and converted, in this order: to float32,
    divided by ``scale``, minus the per-channel ``mean``, divided by the per-channel ``std``, transposed
    to ``layout`` (the model's input layout; inferred from the model input shape when None).
    """

    scale: float | None = opt(None, "Divide images by this (turns on NHWC image preprocessing).", "float",
                              allowed="a finite number > 0")
    mean: tuple[float, ...] | None = opt(None, "Per-channel mean, comma separated: m1,m2,..", "floats")
    std: tuple[float, ...] | None = opt(None, "Per-channel std, comma separated: s1,s2,..", "floats")
    layout: str | None = opt(None, "The model's input layout.", "choice", choices=LAYOUTS, default_text="inferred")

    def __post_init__(self) -> None:
        if self.scale is not None:
            s = self.scale
            if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)):
                raise ValueError(f"scale must be a finite number > 0, got {s!r}")
            if not math.isfinite(float(s)) or float(s) <= 0:
                raise ValueError(f"scale must be a finite number > 0, got {s!r}")
            object.__setattr__(self, "scale", float(s))
        if self.mean is not None:
            object.__setattr__(self, "mean", _float_tuple("mean", self.mean, positive=False))
        if self.std is not None:
            object.__setattr__(self, "std", _float_tuple("std", self.std, positive=True))
        if self.layout is not None:
            lay = self.layout
            if not isinstance(lay, str) or lay.upper() not in LAYOUTS:
                raise ValueError(f"layout must be one of {', '.join(LAYOUTS)} or None, got {lay!r}")
            object.__setattr__(self, "layout", lay.upper())

    @property
    def active(self) -> bool:
        """True when any preprocessing field is set (the data is then read as NHWC images)."""
        return any(v is not None for v in (self.scale, self.mean, self.std, self.layout))


@dataclass(frozen=True, eq=False)
class Dataset:
    """Model-ready inputs ``x`` (dtype of the model input) and int64 labels ``y`` of shape [n]."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.y.ndim != 1:
            raise ValueError(f"y must be 1-D, got shape {list(self.y.shape)}")
        if self.x.ndim < 1 or len(self.x) != len(self.y):
            raise ValueError(
                f"x and y must have the same length, got x shape {list(self.x.shape)} and {len(self.y)} labels"
            )

    def subset(self, idx) -> Dataset:
        """The samples at ``idx`` (an index array or a boolean mask)."""
        idx = np.asarray(idx)
        return Dataset(self.x[idx], self.y[idx])

    def __len__(self) -> int:
        return len(self.y)


# --------------------------------------------------------------------------------------------- load_npz


def load_npz(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a test set: an ``.npz`` with arrays ``x`` (inputs) and ``y`` (integer labels).

    Returns ``(x, y)`` with ``y`` as int64. Raises :class:`AxcnnError` with a one-line message when the file
    is missing or not a valid npz, a key is missing, the lengths differ, the set is empty, the labels are
    not non-negative integers, or ``x`` holds NaN or infinite values. Pickled (object) arrays are refused.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise AxcnnError(f"test data file not found: {p}")
    if os.path.isdir(p):
        raise AxcnnError(f"test data path is a directory, not an .npz file: {p}")
    try:
        with open(p, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise AxcnnError(f"cannot read test data file {p}: {e.strerror or e}") from None
    if magic.startswith(b"\x93NUMPY"):
        raise AxcnnError(f"{p} is a single .npy array, not an .npz file; save it with np.savez(path, x=..., y=...)")
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise AxcnnError(f"{p} is not a valid .npz file (not a zip archive)")
    try:
        with np.load(p, allow_pickle=False) as npz:
            keys = sorted(npz.files)
            missing = [k for k in ("x", "y") if k not in keys]
            if missing:
                have = ", ".join(keys) if keys else "none"
                raise AxcnnError(
                    f"{p} has no array {' or '.join(repr(k) for k in missing)} "
                    f"(it has: {have}); expected arrays 'x' (inputs) and 'y' (labels)"
                )
            x = _read_member(npz, "x", p)
            y = _read_member(npz, "y", p)
    except AxcnnError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        detail = " ".join(str(e).split())
        raise AxcnnError(f"{p} is not a valid .npz file (corrupt zip archive: {detail})") from None
    if not isinstance(x, np.ndarray) or x.ndim == 0:
        raise AxcnnError(f"{p}: x must be an array with one row per sample, got a scalar")
    if not isinstance(y, np.ndarray) or y.ndim == 0:
        raise AxcnnError(f"{p}: y must be a 1-D array of labels, got a scalar")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise AxcnnError(f"{p}: y must be a 1-D array of class labels, got shape {list(y.shape)}")
    if len(x) != len(y):
        raise AxcnnError(f"{p}: x has {len(x)} samples but y has {len(y)} labels")
    if len(x) == 0:
        raise AxcnnError(f"{p}: the test set is empty")
    if x.dtype.kind not in "biuf":
        raise AxcnnError(f"{p}: x must be numeric, got dtype {x.dtype}")
    y = _labels_to_int64(y, p)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise AxcnnError(f"{p}: x contains {bad} NaN or infinite values")
    logger.debug("loaded %s: x %s %s, y %d labels", p, list(x.shape), x.dtype, len(y))
    return x, y


def _read_member(npz, key: str, p: str) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise AxcnnError(f"{p}: array {key!r} holds Python objects (pickle), which are not loaded") from None
        raise AxcnnError(f"{p}: array {key!r} is not a valid .npy array ({' '.join(str(e).split())})") from None


def _labels_to_int64(y: np.ndarray, where: str) -> np.ndarray:
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not (y == np.round(y)).all():
            raise AxcnnError(f"{where}: labels y must be integer class ids, got non-integer values (dtype {y.dtype})")
        if (y > np.iinfo(np.int64).max).any() or (y < np.iinfo(np.int64).min).any():
            raise AxcnnError(f"{where}: labels y are too large to be class ids")
    elif y.dtype.kind not in "biu":
        raise AxcnnError(f"{where}: labels y must be integer class ids, got dtype {y.dtype}")
    elif y.dtype.kind == "u" and y.dtype.itemsize == 8 and (y > np.iinfo(np.int64).max).any():
        raise AxcnnError(f"{where}: labels y are too large to be class ids")
    y = y.astype(np.int64)
    if (y < 0).any():
        raise AxcnnError(f"{where}: labels y must be >= 0, got minimum {int(y.min())}")
    return y


# ---------------------------------------------------------------------------------------------- prepare


def _fmt_shape(shape: Sequence) -> str:
    parts = []
    for d in shape:
        if d is None or (isinstance(d, str) and not d):
            parts.append("?")
        else:
            parts.append(str(d))
    return "[" + ",".join(parts) + "]"


def _fixed(d: Dim) -> bool:
    """A dimension with a fixed size: an int > 0 (str, None, 0 and negative values are free)."""
    return isinstance(d, (int, np.integer)) and not isinstance(d, bool) and int(d) > 0


def _shape_matches(shape: Sequence[int], model_shape: Sequence[Dim]) -> bool:
    """Same rank and every fixed non-batch model dim equal (the batch dim 0 is never compared)."""
    if len(shape) != len(model_shape):
        return False
    return all(not _fixed(m) or int(m) == s for s, m in zip(shape[1:], model_shape[1:], strict=True))


def _nhwc_to(layout: str, shape: Sequence[int]) -> tuple[int, ...]:
    n, h, w, c = shape
    return (n, c, h, w) if layout == "NCHW" else (n, h, w, c)


def _infer_layout(c: int, model_shape: Sequence[Dim]) -> str | None:
    first = _fixed(model_shape[1]) and int(model_shape[1]) == c  # type: ignore[arg-type]
    last = _fixed(model_shape[3]) and int(model_shape[3]) == c  # type: ignore[arg-type]
    if first and not last:
        return "NCHW"
    if last and not first:
        return "NHWC"
    return None


def prepare(
    x: np.ndarray,
    y: np.ndarray,
    preprocess: Preprocess,
    input_shape: Sequence[int | str | None],
    input_dtype=np.float32,
    *,
    input_name: str | None = None,
) -> Dataset:
    """Turn raw test data into a :class:`Dataset` ready to feed the model input.

    Without preprocessing (``preprocess.active`` False) ``x`` is only cast to ``input_dtype``. Otherwise
    ``x`` is read as NHWC images (``[N,H,W]`` is one channel) and converted as described in
    :class:`Preprocess`. Either way the result must have the rank of ``input_shape`` and equal every fixed
    (int > 0) non-batch dim; str/None/0 dims are free, and a fixed batch dim is allowed (the scorer feeds
    batches of that size). ``input_name`` is only used in error messages.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    model_shape = list(input_shape)
    what = f"model input '{input_name}'" if input_name else "model input"
    model_str = f"{what} {_fmt_shape(model_shape)}"
    if x.ndim == 0:
        raise AxcnnError(f"data x must have one row per sample, got a scalar; {model_str}")
    if y.ndim != 1 or len(y) != len(x):
        raise AxcnnError(f"data x has {len(x)} samples but y has shape {list(y.shape)}; expected {len(x)} labels")
    if y.dtype != np.int64:
        y = _labels_to_int64(y, "data")
    dtype = np.dtype(input_dtype)

    if not preprocess.active:
        if not _shape_matches(x.shape, model_shape):
            raise AxcnnError(
                f"data shape {_fmt_shape(x.shape)} does not match {model_str}; {_plain_hint(x.shape, model_shape)}"
            )
        return Dataset(x.astype(dtype, copy=False), y)

    # -- preprocessing: x is NHWC images
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4:
        raise AxcnnError(
            f"with preprocessing flags the data must be images [N,H,W,C] or [N,H,W], got shape {_fmt_shape(x.shape)}"
        )
    if x.dtype.kind not in "biuf":
        raise AxcnnError(f"data x must be numeric, got dtype {x.dtype}")
    c = x.shape[3]
    if len(model_shape) != 4:
        raise AxcnnError(
            f"preprocessing flags need a 4-D image input, but {model_str} has rank {len(model_shape)}; "
            f"preprocess the data yourself and pass it without --scale/--mean/--std/--layout"
        )
    mean = _per_channel("--mean", preprocess.mean, c)
    std = _per_channel("--std", preprocess.std, c)

    layout = preprocess.layout
    if layout is None:
        layout = _infer_layout(c, model_shape)
        if layout is None:
            raise AxcnnError(_layout_error(x.shape, model_shape, model_str))
        logger.info("inferred model input layout %s from %s", layout, _fmt_shape(model_shape))

    target = _nhwc_to(layout, x.shape)
    if not _shape_matches(target, model_shape):
        other = "NHWC" if layout == "NCHW" else "NCHW"
        if _shape_matches(_nhwc_to(other, x.shape), model_shape):
            hint = f"pass --layout {other} or check the preprocessing flags"
        else:
            hint = "check the data and the preprocessing flags"
        raise AxcnnError(
            f"data shape {_fmt_shape(target)} ({layout}, from images {_fmt_shape(x.shape)}) "
            f"does not match {model_str}; {hint}"
        )

    out = x.astype(np.float32)  # always a copy: the caller's array is never modified
    if preprocess.scale is not None:
        out /= np.float32(preprocess.scale)
    if mean is not None:
        out -= mean
    if std is not None:
        out /= std
    if layout == "NCHW":
        out = out.transpose(0, 3, 1, 2)
    out = np.ascontiguousarray(out, dtype=dtype)
    return Dataset(out, y)


def _layout_error(shape: Sequence[int], model_shape: Sequence[Dim], model_str: str) -> str:
    c = shape[3]
    chans = f"images {_fmt_shape(shape)} have {c} channel{'' if c == 1 else 's'}"
    first, last = model_shape[1], model_shape[3]
    if _fixed(first) and _fixed(last) and int(first) == c == int(last):  # type: ignore[arg-type]
        why = f"both dim 1 and dim 3 of {model_str} are {c}"
    elif not _fixed(first) and not _fixed(last):
        why = f"dims 1 and 3 of {model_str} are not fixed"
    else:
        why = f"neither dim 1 nor dim 3 of {model_str} is a fixed {c}"
    return f"cannot infer the model input layout: {chans} and {why}; pass --layout NCHW or --layout NHWC"


def _per_channel(flag: str, values: tuple[float, ...] | None, c: int) -> np.ndarray | None:
    if values is None:
        return None
    if len(values) not in (1, c):
        s = "" if len(values) == 1 else "s"
        cs = "" if c == 1 else "s"
        raise AxcnnError(f"{flag} has {len(values)} value{s} but the images have {c} channel{cs}")
    return np.asarray(values, dtype=np.float32)


def _plain_hint(shape: Sequence[int], model_shape: Sequence[Dim]) -> str:
    """Hint for a shape mismatch when no preprocessing was asked for."""
    img = tuple(shape) + (1,) if len(shape) == 3 else tuple(shape)
    if len(img) == 4 and len(model_shape) == 4:
        for layout in LAYOUTS:
            if _shape_matches(_nhwc_to(layout, img), model_shape):
                return f"if x holds NHWC images, pass --layout {layout} (plus --scale/--mean/--std as needed)"
    return "check the data or pass preprocessing flags (--scale/--mean/--std/--layout)"


# ------------------------------------------------------------------------------------ stratified_subset


def stratified_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` sample indices chosen at random, stratified by label, sorted ascending.

    Per-class counts are proportional to the class frequencies (largest-remainder rounding, so they sum to
    ``n`` exactly); the samples within a class are drawn with ``np.random.default_rng(seed)``. ``n >= len(y)``
    returns all indices. Never simply the first ``n``: test sets are often ordered by class.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {list(y.shape)}")
    try:
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"n must be an integer >= 1, got {n!r}") from None
    if n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n}")
    total = len(y)
    if n >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quota = counts * n / total
    take = np.floor(quota).astype(np.int64)
    left = n - int(take.sum())
    if left:
        frac = quota - take
        # largest remainder first; ties broken at random (seeded) rather than by class order
        order = np.lexsort((rng.random(len(classes)), -frac))
        take[order[:left]] += 1
    chosen = []
    for k in range(len(classes)):
        if take[k]:
            members = np.flatnonzero(inverse == k)
            chosen.append(rng.choice(members, size=int(take[k]), replace=False))
    idx = np.sort(np.concatenate(chosen)).astype(np.int64)
    return idx


# ----------------------------------------------------------------------------------------- parse_floats


def parse_floats(text: str) -> tuple[float, ...]:
    """Parse a comma-separated list of finite numbers, e.g. ``"0.485,0.456,0.406"``."""
    if not isinstance(text, str) or not text.strip():
        raise AxcnnError(f"expected a comma-separated list of numbers, got {text!r}")
    out = []
    for part in text.split(","):
        item = part.strip()
        try:
            v = float(item)
        except ValueError:
            raise AxcnnError(
                f"cannot parse {item!r} as a number in {text!r}; expected e.g. 0.485,0.456,0.406"
            ) from None
        if not math.isfinite(v):
            raise AxcnnError(f"{item!r} in {text!r} is not a finite number")
        out.append(v)
    return tuple(out)
