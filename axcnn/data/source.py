"""Where the scoring data comes from, and reading it: one entry point over every reader.

:func:`find_source` decides from ``--data`` (or its absence) which reader applies; :func:`load` runs it and returns
one :class:`Dataset` (inputs ready for the model, labels or None, provenance), cut to ``limit`` samples.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from axcnn.data import images as images_mod
from axcnn.data import synthetic, zoo
from axcnn.data.dataset import Dataset, Provenance
from axcnn.data.npz import load_npz
from axcnn.data.preprocess import Preprocess, image_geometry, prepare
from axcnn.data.subsets import stratified_subset
from axcnn.errors import AxcnnError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """A data source: ``kind`` is "npz", "images", "zoo" or "synthetic"; ``path`` what was given (for zoo sets
    found beside the model, the model's folder; None for synthetic); ``sets`` the zoo test set folders."""

    kind: str
    path: Path | None
    sets: tuple[Path, ...] = ()
    found: bool = False  # zoo sets found beside the model (no --data given)


def find_source(data_path: str | os.PathLike | None, model_path: str | os.PathLike | None = None) -> Source:
    """The source ``--data`` names: an ``.npz`` file, a zoo test folder (``input_0.pb``, or ``test_data_set_N``
    subfolders), or an image folder. With no ``--data``: the ``test_data_set_*`` folders beside the model, else
    synthetic data (a data-free run)."""
    if data_path is None:
        if model_path is not None:
            folder = Path(model_path).resolve().parent
            sets = zoo.zoo_sets(folder)
            if sets and not zoo.is_zoo_set(folder):
                return Source("zoo", folder, tuple(sets), found=True)
        return Source("synthetic", None)
    p = Path(data_path)
    if not p.exists():
        raise AxcnnError(f"test data not found: {p}")
    if p.is_dir():
        sets = zoo.zoo_sets(p)
        if sets:
            return Source("zoo", p, tuple(sets))
        return Source("images", p)
    return Source("npz", p)


def _limit_idx(y: np.ndarray | None, n: int, limit: int | None, seed: int) -> np.ndarray | None:
    if limit is None or limit >= n:
        return None
    return stratified_subset(np.zeros(n, np.int64) if y is None else y, limit, seed)


def load(source: Source, preprocess: Preprocess, io, *, limit: int | None = None, seed: int = 0,
         generator: str | None = None) -> Dataset:
    """Read ``source`` into a Dataset for the model input ``io`` (an :class:`axcnn.model.IOInfo`): preprocessed,
    cut to a seeded, label-stratified subset of ``limit`` samples (for images, before decoding). Synthetic data
    has ``limit`` samples (:data:`axcnn.data.synthetic.DEFAULT_SAMPLES` when None), drawn by ``generator``
    (:data:`axcnn.data.synthetic.DEFAULT_GENERATOR` when None)."""
    shape, dtype, name = io.input_shape, io.input_dtype, io.input_name
    kind = source.kind
    if kind == "npz":
        x, y = load_npz(source.path, require_labels=False)
        data = prepare(x, y, preprocess, shape, dtype, input_name=name)
        idx = _limit_idx(data.y, len(data), limit, seed)
        if idx is not None:
            data = data.subset(idx)
        prov = Provenance("npz", str(source.path), y is not None, len(x))
        return replace(data, provenance=prov)
    if kind == "images":
        files, y, classes = images_mod.list_images(source.path)
        read = len(files)
        idx = _limit_idx(y, read, limit, seed)
        if idx is not None:
            files = [files[i] for i in idx]
            y = None if y is None else y[idx]
        geometry = image_geometry(preprocess, shape, name)
        x, details = images_mod.read_images(files, preprocess, geometry)
        pre = preprocess.resolved()
        if not preprocess.normalises:
            logger.warning("no --preset/--scale/--mean/--std given: image pixels are fed to the model as 0..255 "
                           "values")
        pixel = replace(pre, preset=None, resize=None, crop=None, layout=geometry.layout)
        data = prepare(x, y, pixel, shape, dtype, input_name=name)
        if classes is not None:
            details = {"classes": list(classes), **details}
        prov = Provenance("images", str(source.path), y is not None, read, tuple(details.items()))
        return replace(data, provenance=prov)
    if kind == "zoo":
        if preprocess.active:
            raise AxcnnError("zoo test sets hold inputs that are already preprocessed: drop --preset/--resize/--crop/"
                             "--scale/--mean/--std/--layout")
        x, reference, details = zoo.read_zoo(list(source.sets), len(shape))
        data = prepare(x, None, Preprocess(), shape, dtype, input_name=name)
        data = replace(data, reference=reference)
        idx = _limit_idx(None, len(data), limit, seed)
        if idx is not None:
            data = data.subset(idx)
        prov = Provenance("zoo", str(source.path), False, len(x), tuple(details.items()))
        return replace(data, provenance=prov)
    if kind == "synthetic":
        n = limit if limit is not None else synthetic.DEFAULT_SAMPLES
        return synthetic.synthesize(n, preprocess, shape, dtype, generator=generator or synthetic.DEFAULT_GENERATOR,
                                    seed=seed, input_name=name)
    raise ValueError(f"unknown source kind {kind!r}")
