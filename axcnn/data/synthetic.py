"""Synthetic inputs for data-free runs: no test data at all, candidates scored by agreement with the original model.

For an image input (4-D, with a layout that can be told) the generators draw images with values in [0, 1] and
turn them into model input the way real images would be: with preprocessing flags or a preset, as 8-bit pixels
(``round(255 * u)``) through the same ``scale/mean/std/layout`` conversion; without them, centred and scaled to
about zero mean and unit variance (``(u - 0.45) / 0.25``), the statistics of a normalised input. Any other input
gets standard normal values.

Generators (``docs/data.md`` compares them with real data on the shared models):

- ``gaussian``: independent pixels, normal around a per-image mean and contrast, clipped to [0, 1];
- ``uniform``: independent pixels, uniform in [0, 1];
- ``smooth``: low-frequency (1/f) noise, the spectrum of natural images: bilinearly upsampled random grids of
  2..H/2 cells with amplitude proportional to the cell size, a luminance field shared by the channels plus weaker
  colour fields, at a random per-image mean and contrast;
- ``mix``: half ``smooth``, half ``gaussian``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from axcnn.data.dataset import Dataset, Provenance
from axcnn.data.preprocess import Preprocess, _fixed, _fmt_shape, image_geometry, normalise
from axcnn.errors import AxcnnError

logger = logging.getLogger(__name__)

GENERATORS = ("smooth", "gaussian", "uniform", "mix")
DEFAULT_GENERATOR = "mix"
DEFAULT_SAMPLES = 1000
#: where the generators' [0, 1] values land without preprocessing flags: about zero mean, unit variance
_CENTRE, _SPREAD = 0.45, 0.25


def _upsample_matrix(cells: int, size: int) -> np.ndarray:
    """(size, cells) bilinear interpolation weights from a grid of ``cells`` points spanning the image."""
    pos = np.linspace(0.0, cells - 1.0, size)
    lo = np.clip(np.floor(pos).astype(int), 0, cells - 1)
    hi = np.minimum(lo + 1, cells - 1)
    frac = pos - lo
    m = np.zeros((size, cells))
    m[np.arange(size), lo] += 1 - frac
    m[np.arange(size), hi] += frac
    return m


def _field(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """n fields of shape (h, w) of 1/f noise, each normalised to zero mean and unit variance."""
    out = np.zeros((n, h, w))
    cells = 2
    while cells <= max(2, min(h, w) // 2):
        grid = rng.standard_normal((n, cells, cells))
        out += np.einsum("hi,nij,wj->nhw", _upsample_matrix(cells, h), grid, _upsample_matrix(cells, w)) / cells
        cells *= 2
    out -= out.mean(axis=(1, 2), keepdims=True)
    out /= out.std(axis=(1, 2), keepdims=True) + 1e-12
    return out


def images(generator: str, n: int, h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    """``n`` float32 NHWC images of values in [0, 1] drawn by ``generator`` (see the module docstring)."""
    if generator not in GENERATORS:
        raise ValueError(f"generator={generator!r} is invalid: allowed {' | '.join(GENERATORS)}")
    rng = np.random.default_rng(seed)
    if generator == "mix":
        half = n // 2
        both = np.concatenate([images("smooth", n - half, h, w, c, seed + 1),
                               images("gaussian", half, h, w, c, seed + 2)])
        return both[rng.permutation(n)]
    if generator == "uniform":
        return rng.random((n, h, w, c), dtype=np.float32)
    mean = rng.uniform(0.25, 0.65, (n, 1, 1, 1))
    contrast = rng.uniform(0.1, 0.3, (n, 1, 1, 1))
    if generator == "gaussian":
        u = mean + contrast * rng.standard_normal((n, h, w, c))
    else:  # smooth: shared luminance plus weaker per-channel colour
        lum = _field(rng, n, h, w)[..., np.newaxis]
        colour = _field(rng, n * c, h, w).reshape(n, c, h, w).transpose(0, 2, 3, 1) if c > 1 else 0.0
        u = mean + contrast * (lum + 0.35 * colour) / np.sqrt(1 + 0.35 ** 2 * (c > 1))
    return np.clip(u, 0.0, 1.0).astype(np.float32)


def synthesize(n: int, preprocess: Preprocess, input_shape: Sequence[int | str | None], input_dtype=np.float32,
               *, generator: str = DEFAULT_GENERATOR, seed: int = 0, input_name: str | None = None) -> Dataset:
    """``n`` unlabelled synthetic inputs of the model input's shape (see the module docstring), as a Dataset."""
    if n < 1:
        raise ValueError(f"n={n!r} is invalid: allowed an integer >= 1")
    shape = list(input_shape)
    what = f"model input '{input_name}'" if input_name else "model input"
    preprocess = preprocess.resolved()
    dtype = np.dtype(input_dtype)
    if dtype.kind != "f":
        raise AxcnnError(f"data-free runs need a floating-point model input; {what} is {dtype}: pass --data")
    details: dict = {"generator": generator, "seed": seed}
    geometry = None
    if len(shape) == 4:
        try:
            geometry = image_geometry(preprocess, shape, input_name)
        except AxcnnError:
            if preprocess.active:
                raise
    if geometry is not None:
        size = preprocess.crop
        h = geometry.height or size
        w = geometry.width or size
        if h is None or w is None:
            raise AxcnnError(f"{what} {_fmt_shape(shape)} has a free image size; data-free runs need --crop N "
                             f"to choose one (or pass --data)")
        c = geometry.channels or 3
        u = images(generator, n, h, w, c, seed)
        if preprocess.scale is not None or preprocess.mean is not None or preprocess.std is not None:
            x = normalise(np.round(u * 255.0), preprocess, geometry.layout, dtype)
            details["space"] = "8-bit pixels through the preprocessing flags"
        else:
            x = normalise(u, Preprocess(mean=(_CENTRE,), std=(_SPREAD,)), geometry.layout, dtype)
            details["space"] = f"(u - {_CENTRE}) / {_SPREAD}, about zero mean and unit variance"
    else:
        free = [i for i, d in enumerate(shape[1:], start=1) if not _fixed(d)]
        if free:
            raise AxcnnError(f"{what} {_fmt_shape(shape)} has free dims besides the batch; data-free runs cannot "
                             f"choose their size: pass --data")
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, *(int(d) for d in shape[1:]))).astype(dtype)
        details.update(generator="normal", space="standard normal")
    prov = Provenance("synthetic", None, False, n, tuple(details.items()))
    return Dataset(x, None, prov)
