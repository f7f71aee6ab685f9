"""Reading a test set stored as an ``.npz`` file: arrays ``x`` (inputs) and, when labelled, ``y`` (class ids)."""

from __future__ import annotations

import logging
import os
import zipfile

import numpy as np

from axcnn.errors import AxcnnError

logger = logging.getLogger(__name__)


def load_npz(path, *, require_labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a test set: an ``.npz`` with arrays ``x`` (inputs) and ``y`` (integer labels).

    Returns ``(x, y)`` with ``y`` as int64. With ``require_labels=False`` a file without ``y`` is unlabelled data
    and ``y`` is None. Raises :class:`AxcnnError` with a one-line message when the file
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
            if missing == ["y"] and not require_labels:
                missing = []
            if missing:
                have = ", ".join(keys) if keys else "none"
                raise AxcnnError(
                    f"{p} has no array {' or '.join(repr(k) for k in missing)} "
                    f"(it has: {have}); expected arrays 'x' (inputs) and 'y' (labels)"
                )
            x = _read_member(npz, "x", p)
            y = _read_member(npz, "y", p) if "y" in keys else None
    except AxcnnError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        detail = " ".join(str(e).split())
        raise AxcnnError(f"{p} is not a valid .npz file (corrupt zip archive: {detail})") from None
    if not isinstance(x, np.ndarray) or x.ndim == 0:
        raise AxcnnError(f"{p}: x must be an array with one row per sample, got a scalar")
    if y is not None:
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
    if y is not None:
        y = _labels_to_int64(y, p)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise AxcnnError(f"{p}: x contains {bad} NaN or infinite values")
    logger.debug("loaded %s: x %s %s, %s", p, list(x.shape), x.dtype, "unlabelled" if y is None else "labelled")
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


