"""Preprocessing: how raw test data (images) becomes model input, and the presets for the common cases.

:class:`Preprocess` holds the user's options; :meth:`Preprocess.resolved` fills what a ``preset`` sets into the
fields the user left unset; :func:`prepare` turns an array of inputs (and labels, if any) into a :class:`Dataset`
that can be fed to the model as it is. :func:`image_geometry` tells the image readers and the synthetic
generator what images the model takes.

This module uses numpy (and Pillow, lazily, to resize); running the model is the scorer's job.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np

from axcnn.data.dataset import Dataset
from axcnn.data.npz import _labels_to_int64
from axcnn.errors import AxcnnError
from axcnn.options import at_least, check_value, opt, option_of

logger = logging.getLogger(__name__)

LAYOUTS = ("NCHW", "NHWC")

Dim = int | str | None

#: What each preset sets (only the fields the user did not set; the layout is always inferred or given).
PRESETS: dict[str, dict[str, object]] = {
    # torchvision's ImageNet evaluation: shorter side to 256, centre 224x224 crop, ImageNet mean/std
    "imagenet": {"resize": 256, "crop": 224, "scale": 255.0, "mean": (0.485, 0.456, 0.406),
                 "std": (0.229, 0.224, 0.225)},
    # CIFAR-10 training-set channel statistics; images are used at their own size (32x32)
    "cifar": {"scale": 255.0, "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
    # the usual PyTorch MNIST normalisation; images are used at their own size (28x28)
    "mnist": {"scale": 255.0, "mean": (0.1307,), "std": (0.3081,)},
}


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

    When any field is set, the data is read as NHWC images and converted, in this order: resized so the shorter
    side is ``resize`` pixels (bilinear), centre-cropped to ``crop`` x ``crop`` (or, when only ``resize`` is set,
    to the model's input height and width), to float32, divided by ``scale``, minus the per-channel ``mean``,
    divided by the per-channel ``std``, transposed to ``layout`` (the model's input layout; inferred from the model
    input shape when None). A ``preset`` sets the fields it names (see :data:`PRESETS`) that are not set here:
    explicit values win. Image folders are always read as images, preprocessing or not.
    """

    preset: str | None = opt(None, "Preprocessing preset; sets the flags below that you do not give: imagenet "
                             "(--resize 256 --crop 224 --scale 255, ImageNet mean/std), cifar (--scale 255, CIFAR-10 "
                             "mean/std), mnist (--scale 255 --mean 0.1307 --std 0.3081).", "choice",
                             choices=tuple(PRESETS))
    resize: int | None = opt(None, "Resize images so the shorter side is N pixels (bilinear), before the crop.",
                             "int", check=at_least(1), allowed="an integer >= 1", metavar="N")
    crop: int | None = opt(None, "Centre-crop images to N x N pixels.", "int", check=at_least(1),
                           allowed="an integer >= 1", metavar="N",
                           default_text="the model's input size when --resize is given")
    scale: float | None = opt(None, "Divide images by this (turns on NHWC image preprocessing).", "float",
                              allowed="a finite number > 0")
    mean: tuple[float, ...] | None = opt(None, "Per-channel mean, comma separated: m1,m2,..", "floats")
    std: tuple[float, ...] | None = opt(None, "Per-channel std, comma separated: s1,s2,..", "floats")
    layout: str | None = opt(None, "The model's input layout.", "choice", choices=LAYOUTS, default_text="inferred")

    def __post_init__(self) -> None:
        for name in ("preset", "resize", "crop"):
            f = next(f for f in fields(self) if f.name == name)
            check_value(name, getattr(self, name), option_of(f))
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
        return any(getattr(self, f.name) is not None for f in fields(self))

    @property
    def normalises(self) -> bool:
        """True when the pixel values are converted (scale, mean or std, after the preset)."""
        p = self.resolved()
        return any(v is not None for v in (p.scale, p.mean, p.std))

    def resolved(self) -> Preprocess:
        """The options in force: the preset's values in the fields left unset (the preset name is kept)."""
        if self.preset is None:
            return self
        fill = {k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) is None}
        return replace(self, **fill) if fill else self

    def as_dict(self) -> dict:
        """JSON-ready: every field, after the preset."""
        p = self.resolved()
        return {f.name: list(v) if isinstance(v := getattr(p, f.name), tuple) else v for f in fields(p)}


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
    y: np.ndarray | None,
    preprocess: Preprocess,
    input_shape: Sequence[int | str | None],
    input_dtype=np.float32,
    *,
    input_name: str | None = None,
) -> Dataset:
    """Turn raw test data into a :class:`Dataset` ready to feed the model input (``y`` None: unlabelled).

    Without preprocessing (``preprocess.active`` False) ``x`` is only cast to ``input_dtype``. Otherwise
    ``x`` is read as NHWC images (``[N,H,W]`` is one channel) and converted as described in
    :class:`Preprocess`. Either way the result must have the rank of ``input_shape`` and equal every fixed
    (int > 0) non-batch dim; str/None/0 dims are free, and a fixed batch dim is allowed (the scorer feeds
    batches of that size). ``input_name`` is only used in error messages.
    """
    x = np.asarray(x)
    model_shape = list(input_shape)
    what = f"model input '{input_name}'" if input_name else "model input"
    model_str = f"{what} {_fmt_shape(model_shape)}"
    if x.ndim == 0:
        raise AxcnnError(f"data x must have one row per sample, got a scalar; {model_str}")
    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x):
            raise AxcnnError(f"data x has {len(x)} samples but y has shape {list(y.shape)}; "
                             f"expected {len(x)} labels")
        if y.dtype != np.int64:
            y = _labels_to_int64(y, "data")
    dtype = np.dtype(input_dtype)
    preprocess = preprocess.resolved()

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
    layout = preprocess.layout
    if layout is None:
        layout = _infer_layout(c, model_shape)
        if layout is None:
            raise AxcnnError(_layout_error(x.shape, model_shape, model_str))
        logger.info("inferred model input layout %s from %s", layout, _fmt_shape(model_shape))
    if preprocess.resize is not None or preprocess.crop is not None:
        from axcnn.data.images import resize_crop_array

        x = resize_crop_array(x, preprocess.resize, crop_size(preprocess, layout, model_shape))

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
    return Dataset(normalise(x, preprocess, layout, dtype), y)


def normalise(images: np.ndarray, preprocess: Preprocess, layout: str, dtype=np.float32) -> np.ndarray:
    """NHWC images -> model input: float32, ``/ scale``, ``- mean``, ``/ std`` per channel, transposed to
    ``layout``, cast to ``dtype``. Never modifies ``images``."""
    preprocess = preprocess.resolved()
    c = images.shape[3]
    mean = _per_channel("--mean", preprocess.mean, c)
    std = _per_channel("--std", preprocess.std, c)
    out = images.astype(np.float32)  # always a copy: the caller's array is never modified
    if preprocess.scale is not None:
        out /= np.float32(preprocess.scale)
    if mean is not None:
        out -= mean
    if std is not None:
        out /= std
    if layout == "NCHW":
        out = out.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out, dtype=np.dtype(dtype))


def crop_size(preprocess: Preprocess, layout: str, model_shape: Sequence[Dim]) -> tuple[int, int] | None:
    """(height, width) of the centre crop: ``crop`` x ``crop``, else the model's fixed input size when ``resize``
    is set, else None (no crop)."""
    preprocess = preprocess.resolved()
    if preprocess.crop is not None:
        return preprocess.crop, preprocess.crop
    if preprocess.resize is None or len(model_shape) != 4:
        return None
    h, w = (model_shape[2], model_shape[3]) if layout == "NCHW" else (model_shape[1], model_shape[2])
    if _fixed(h) and _fixed(w):
        return int(h), int(w)
    return None


@dataclass(frozen=True)
class Geometry:
    """The images a 4-D model input takes: its layout and its fixed height, width and channels (None: free)."""

    layout: str
    height: int | None
    width: int | None
    channels: int | None


def image_geometry(preprocess: Preprocess, input_shape: Sequence[Dim],
                   input_name: str | None = None) -> Geometry:
    """What images the model takes, from its input shape and ``--layout``: without a layout, the channel dim is
    the one of dims 1 and 3 that is a fixed 1, 3 or 4 (when both are, the one leaving the larger image side).
    Raises AxcnnError when the input
    is not 4-D or the layout cannot be told."""
    model_shape = list(input_shape)
    what = f"model input '{input_name}'" if input_name else "model input"
    if len(model_shape) != 4:
        raise AxcnnError(f"images need a 4-D model input, but {what} {_fmt_shape(model_shape)} has rank "
                         f"{len(model_shape)}")
    layout = preprocess.layout

    def chan(d):
        return _fixed(d) and int(d) in (1, 3, 4)

    def smallest_side(dims) -> float:
        return min(int(d) if _fixed(d) else math.inf for d in dims)

    if layout is None:
        first, last = chan(model_shape[1]), chan(model_shape[3])
        if first and last:  # e.g. [n,1,4,4]: an image 1 pixel high is less likely than a 1-channel one
            nchw, nhwc = smallest_side(model_shape[2:]), smallest_side(model_shape[1:3])
            first, last = nchw > nhwc, nhwc > nchw
        if first != last:
            layout = "NCHW" if first else "NHWC"
        else:
            raise AxcnnError(f"cannot tell the channel dim of {what} {_fmt_shape(model_shape)}; "
                             f"pass --layout NCHW or --layout NHWC")
    dims = (model_shape[2], model_shape[3], model_shape[1]) if layout == "NCHW" else tuple(model_shape[1:])
    h, w, c = (int(d) if _fixed(d) else None for d in dims)
    return Geometry(layout, h, w, c)


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
