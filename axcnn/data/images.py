"""Reading a folder of images (PNG, JPEG) with Pillow, and resizing and centre-cropping images.

Layout, as torchvision's ImageFolder: ``root/<class>/**/<image>``, one subfolder per class, classes numbered in
sorted folder-name order; or ``root/<image>`` with no class subfolders, which is unlabelled data. Each image is
converted to the model's channel count (grayscale or RGB, said in a warning when that changes the image), resized
so its shorter side is ``--resize`` pixels, centre-cropped, and stacked into one uint8 NHWC array; the pixel
preprocessing (scale, mean, std, layout) is then :func:`axcnn.data.preprocess.normalise`'s job.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from axcnn.data.preprocess import Geometry, Preprocess
from axcnn.errors import AxcnnError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GRAY_MODES = ("1", "L", "LA", "I", "F", "La")


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is a core dependency
        raise AxcnnError("reading images needs Pillow; install it with: pip install Pillow") from exc
    return Image


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def list_images(root: str | os.PathLike) -> tuple[list[Path], np.ndarray | None, tuple[str, ...] | None]:
    """The image files of an image folder: (files, labels or None, class names or None).

    Class subfolders (those holding images, at any depth) make labelled data; images directly in ``root`` with no
    class subfolder make unlabelled data. Raises AxcnnError naming the folder when it holds no image, when a class
    subfolder is empty, or when it has both loose images and class subfolders.
    """
    root = Path(root)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if _is_image(p))
    classes = [(d, _images_under(d)) for d in subdirs]
    classes = [(d, files) for d, files in classes if files or not loose]
    if any(files for _, files in classes):
        empty = [d for d, files in classes if not files]
        if empty:
            raise AxcnnError(f"class folder {empty[0]} holds no PNG or JPEG image")
        if loose:
            raise AxcnnError(f"{root} has both images at the top ({loose[0].name}) and class subfolders; put every "
                             f"image in a class subfolder (labelled) or none (unlabelled)")
        files = [f for _, fs in classes for f in fs]
        labels = np.concatenate([np.full(len(fs), i, dtype=np.int64) for i, (_, fs) in enumerate(classes)])
        return files, labels, tuple(d.name for d, _ in classes)
    if not loose:
        raise AxcnnError(f"image folder {root} holds no PNG or JPEG image (looked for "
                         f"{', '.join(IMAGE_SUFFIXES)}, directly or in class subfolders)")
    return loose, None, None


def _target_mode(channels: int | None, first_mode: str) -> str:
    if channels == 1:
        return "L"
    if channels == 3:
        return "RGB"
    if channels == 4:
        return "RGBA"
    return "L" if first_mode in _GRAY_MODES else "RGB"


def _kind(mode: str) -> str:
    return "grayscale" if mode in _GRAY_MODES or mode.startswith("I;") else "colour"


def read_images(files: Sequence[Path], preprocess: Preprocess, geometry: Geometry) -> tuple[np.ndarray, dict]:
    """Decode ``files`` into one uint8 NHWC array for a model taking ``geometry`` images, and say what was done.

    Each image is converted to the model's channel count (1: grayscale "L", 3: "RGB", 4: "RGBA"; a free channel
    dim takes the first image's kind), resized and centre-cropped per ``preprocess``. Raises AxcnnError naming the
    file when an image cannot be read, is smaller than the crop, or differs in size from the first one with no
    ``--resize``/``--crop`` to make them equal.
    """
    Image = _pil()
    preprocess = preprocess.resolved()
    crop = _crop_hw(preprocess, geometry)
    arrays: list[np.ndarray] = []
    converted: Counter = Counter()
    mode = None
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                if mode is None:
                    mode = _target_mode(geometry.channels, im.mode)
                if im.mode != mode:
                    if _kind(im.mode) != _kind(mode) or (im.mode in ("RGBA", "LA", "PA") and mode != "RGBA"):
                        converted[f"{im.mode}->{mode}"] += 1
                    im = im.convert(mode)
                im = resize_crop(im, preprocess.resize, crop, f)
                a = np.asarray(im, dtype=np.uint8)
        except AxcnnError:
            raise
        except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise AxcnnError(f"cannot read image {f}: {reason}") from None
        if a.ndim == 2:
            a = a[..., np.newaxis]
        if arrays and a.shape != arrays[0].shape:
            raise AxcnnError(f"image {f} is {a.shape[1]}x{a.shape[0]} but {files[0]} is "
                             f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; pass --resize N (and --crop N) to make "
                             f"them the same size")
        arrays.append(a)
    x = np.stack(arrays)
    details: dict = {"files": len(files)}
    if converted:
        details["converted"] = dict(sorted(converted.items()))
        n = sum(converted.values())
        logger.warning("converted %d image%s (%s) to %s for the model's %s input channel%s", n,
                       "" if n == 1 else "s", ", ".join(f"{k}: {v}" for k, v in sorted(converted.items())), mode,
                       x.shape[3], "" if x.shape[3] == 1 else "s")
    return x, details


def _crop_hw(preprocess: Preprocess, geometry: Geometry) -> tuple[int, int] | None:
    if preprocess.crop is not None:
        return preprocess.crop, preprocess.crop
    if preprocess.resize is not None and geometry.height and geometry.width:
        return geometry.height, geometry.width
    return None


def resize_crop(im, resize: int | None, crop: tuple[int, int] | None, where: object = "image"):
    """A Pillow image with its shorter side resized to ``resize`` (bilinear; as torchvision's ``Resize(int)``),
    then centre-cropped to ``crop`` = (height, width) (as ``CenterCrop``). Either may be None."""
    Image = _pil()
    if resize is not None:
        w, h = im.size
        if (w <= h and w != resize) or (h < w and h != resize):
            if w <= h:
                size = (resize, max(1, int(resize * h / w)))
            else:
                size = (max(1, int(resize * w / h)), resize)
            im = im.resize(size, Image.Resampling.BILINEAR)
    if crop is not None:
        ch, cw = crop
        w, h = im.size
        if ch > h or cw > w:
            hint = "" if resize is not None else "; pass --resize N to scale it first"
            raise AxcnnError(f"{where} is {w}x{h}{' after the resize' if resize else ''}, smaller than the "
                             f"{cw}x{ch} crop{hint}")
        top = int(round((h - ch) / 2.0))
        left = int(round((w - cw) / 2.0))
        if (ch, cw) != (h, w):
            im = im.crop((left, top, left + cw, top + ch))
    return im


def resize_crop_array(x: np.ndarray, resize: int | None, crop: tuple[int, int] | None) -> np.ndarray:
    """:func:`resize_crop` on each image of an NHWC array (uint8 stays uint8; other dtypes are resized as float32
    per channel)."""
    Image = _pil()
    out = []
    for i, img in enumerate(x):
        where = f"image {i} of the data"
        if img.dtype == np.uint8 and img.shape[2] in (1, 3):
            im = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
            a = np.asarray(resize_crop(im, resize, crop, where))
            out.append(a[..., np.newaxis] if a.ndim == 2 else a)
        else:
            chans = [np.asarray(resize_crop(Image.fromarray(img[..., c].astype(np.float32)), resize,
                                            crop, where)) for c in range(img.shape[2])]
            out.append(np.stack(chans, axis=-1))
    return np.stack(out)
