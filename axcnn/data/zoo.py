"""Reading ONNX model zoo test sets: ``test_data_set_N/input_0.pb`` (and ``output_0.pb``) beside a model.

Each ``input_0.pb`` is a serialized TensorProto holding a batch of already preprocessed inputs (read with
``onnx.numpy_helper``); ``output_0.pb``, where present, is the original model's output for it. The layout has no
labels: the score is agreement with the original model's top-1, and the stored outputs' top-1 is kept to check
the model against.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from axcnn.errors import AxcnnError

logger = logging.getLogger(__name__)

_SET = re.compile(r"^test_data_set_(\d+)$")


def is_zoo_set(folder: str | os.PathLike) -> bool:
    """A folder holding ``input_0.pb``."""
    return (Path(folder) / "input_0.pb").is_file()


def zoo_sets(folder: str | os.PathLike) -> list[Path]:
    """The zoo test sets of ``folder``: itself when it holds ``input_0.pb``, else its ``test_data_set_N``
    subfolders that hold one, in numeric order. Empty when there are none."""
    folder = Path(folder)
    if is_zoo_set(folder):
        return [folder]
    if not folder.is_dir():
        return []
    found = []
    for d in folder.iterdir():
        m = _SET.match(d.name)
        if m and d.is_dir() and is_zoo_set(d):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def _tensor(path: Path) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    t = onnx.TensorProto()
    try:
        t.ParseFromString(path.read_bytes())
        a = numpy_helper.to_array(t)
    except Exception as exc:
        raise AxcnnError(f"{path} is not a readable TensorProto ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None
    return a


def read_zoo(sets: list[Path], input_rank: int) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """The inputs of every set, concatenated along the batch dim, the stored outputs' top-1 per sample (None
    unless every set has an ``output_0.pb``), and what was read.

    A tensor one rank short of the model input is one sample (a batch dim is added). Raises AxcnnError naming the
    file when a tensor cannot be read, is not numeric, holds NaN/infinity, or does not stack with the others.
    """
    xs, tops = [], []
    have_outputs = all((s / "output_0.pb").is_file() for s in sets)
    if not have_outputs and any((s / "output_0.pb").is_file() for s in sets):
        logger.info("some zoo test sets have no output_0.pb: the stored outputs are not checked")
    for s in sets:
        f = s / "input_0.pb"
        x = _tensor(f)
        if x.ndim == input_rank - 1:
            x = x[np.newaxis]
        if x.ndim == 0 or len(x) == 0:
            raise AxcnnError(f"{f} holds no sample (shape {list(x.shape)})")
        if x.dtype.kind not in "biuf":
            raise AxcnnError(f"{f}: the input must be numeric, got dtype {x.dtype}")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise AxcnnError(f"{f} holds NaN or infinite values")
        if xs and x.shape[1:] != xs[0].shape[1:]:
            raise AxcnnError(f"{f} has samples of shape {list(x.shape[1:])} but {sets[0] / 'input_0.pb'} has "
                             f"{list(xs[0].shape[1:])}")
        xs.append(x)
        if have_outputs:
            o = _tensor(s / "output_0.pb")
            if o.ndim == 0 or (len(x) > 1 and len(o) != len(x)) or o.size % len(x):
                raise AxcnnError(f"{s / 'output_0.pb'} has shape {list(o.shape)}, which does not match the "
                                 f"{len(x)} sample{'' if len(x) == 1 else 's'} of {f}")
            tops.append(np.argmax(o.reshape(len(x), -1), axis=1).astype(np.int64))
    x = np.concatenate(xs)
    details = {"sets": [s.name for s in sets], "outputs": have_outputs}
    logger.debug("read %d zoo test sets: x %s %s", len(sets), list(x.shape), x.dtype)
    return x, np.concatenate(tops) if have_outputs else None, details
