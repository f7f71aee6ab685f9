"""Write a model file atomically, with or without external data."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from axcnn.errors import AxcnnError
from axcnn.rewrite.common import copy_model, is_external

logger = logging.getLogger(__name__)

_MAX_PROTO_BYTES = 2**31 - 1



def _has_external(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in model.graph.initializer)


def _file_mode(path: Path) -> int:
    """Permission bits for a written file: those of the file it replaces, else rw-r--r--."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o644


def write_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False) -> int:
    """Write ``model`` to ``path`` atomically; return the bytes written (model file + external data file).

    With ``external_data=True`` the tensors (>= 1 KiB) go to ``<file name>.data`` beside the output,
    referenced by that bare relative file name. Nothing is left at ``path`` (or at the data file) when
    writing fails: files are written to a temporary place in the same folder and renamed into place.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise AxcnnError(f"output folder {str(folder)!r} does not exist")
    if _has_external(model):
        raise AxcnnError("the model references external data that is not loaded; load it before writing")
    if not external_data:
        if model.ByteSize() > _MAX_PROTO_BYTES:
            raise AxcnnError("the model is larger than 2 GB; write it with external data")
        data = model.SerializeToString()
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, _file_mode(path))  # mkstemp creates the file as rw-------
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        logger.debug("wrote %s (%d bytes)", path, len(data))
        return len(data)

    data_name = f"{path.name}.data"
    tmpdir = tempfile.mkdtemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        copy = copy_model(model)
        tmp_model = os.path.join(tmpdir, path.name)
        onnx.save_model(
            copy,
            tmp_model,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        tmp_data = os.path.join(tmpdir, data_name)
        total = os.path.getsize(tmp_model)
        for tmp, final in ((tmp_model, path), (tmp_data, folder / data_name)):
            if os.path.exists(tmp):
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.chmod(tmp, _file_mode(final))
        if os.path.exists(tmp_data):
            total += os.path.getsize(tmp_data)
            os.replace(tmp_data, folder / data_name)
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    logger.debug("wrote %s with external data %s (%d bytes)", path, data_name, total)
    return total
