"""Write a model file atomically, with or without external data.

With external data the tensors of at least 1 KiB go to ``<output name>.<hash>.data`` beside the output, where
``<hash>`` is the first 12 hex digits of the SHA-256 of the data file's content, referenced by that bare file
name. The order keeps the file pair consistent whatever fails: the data file is written (atomically) first
under its new name, so it never clobbers the data file that the model now at the output references; then the
model file is replaced atomically; only then are the data files that the previous model referenced, and the new
one does not, removed (only files in the output folder and named after the output: ``<output name>.data`` or
``<output name>.*.data``, never another model's). If the model cannot be written, the new data file is removed
again and the previous model with its data is untouched.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto

from axcnn import atomic
from axcnn.errors import AxcnnError
from axcnn.rewrite.common import copy_model, is_external

logger = logging.getLogger(__name__)

_MAX_PROTO_BYTES = 2**31 - 1
_EXTERNAL_MIN_BYTES = 1024
"""Tensors with at least this many bytes of raw data go to the external data file."""
_HASH_DIGITS = 12


def _initializers(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """The initializers of a graph and of its nested subgraphs (those ``onnx.save_model`` would move too)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _initializers(g)


def _split_external(model: onnx.ModelProto, output_name: str) -> tuple[onnx.ModelProto, list[bytes], str | None]:
    """A copy of ``model`` whose large tensors point into one data file, the chunks of that file in order, and
    its name ``<output_name>.<hash>.data`` (None when no tensor is large enough: the copy then holds all)."""
    header = copy_model(model)
    moved: list[tuple[TensorProto, int, int]] = []
    chunks: list[bytes] = []
    offset = 0
    digest = hashlib.sha256()
    for t in _initializers(header.graph):
        if t.HasField("raw_data") and len(t.raw_data) >= _EXTERNAL_MIN_BYTES:
            raw = t.raw_data
            t.ClearField("raw_data")
            moved.append((t, offset, len(raw)))
            chunks.append(raw)
            digest.update(raw)
            offset += len(raw)
    if not chunks:
        return header, [], None
    data_name = f"{output_name}.{digest.hexdigest()[:_HASH_DIGITS]}.data"
    for t, start, length in moved:
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data_name), ("offset", start), ("length", length)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
    return header, chunks, data_name


def _own_data_files(path: Path) -> set[str]:
    """Data files that the model now at ``path`` references, in its folder and named after it."""
    folder, name = path.parent, path.name
    def ours(loc: str) -> bool:
        return loc == os.path.basename(loc) and loc.startswith(f"{name}.") and loc.endswith(".data")

    if not any(ours(p.name) for p in folder.iterdir()):  # then skip parsing a big self-contained model
        return set()
    try:
        old = onnx.load(str(path), load_external_data=False)
    except Exception:  # no file, or not a model: nothing of ours to clean up
        return set()
    found: set[str] = set()
    for t in _initializers(old.graph):
        if is_external(t):
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if ours(loc):
                found.add(loc)
    return found


def write_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False) -> int:
    """Write ``model`` to ``path`` atomically; return the bytes written (model file + external data file).

    With ``external_data=True`` the tensors (>= 1 KiB) go to ``<file name>.<hash>.data`` beside the output,
    referenced by that bare file name (module docstring). Either the new model (with its data) or the previous
    file at ``path`` (with its data) is left, never a mix, and no temporary file. A file that cannot be
    written (full disk, read-only folder) raises AxcnnError.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise AxcnnError(f"output folder {str(folder)!r} does not exist")
    if any(is_external(t) for t in _initializers(model.graph)):
        raise AxcnnError("the model references external data that is not loaded; load it before writing")
    mode = atomic.file_mode(path)
    previous = _own_data_files(path)
    data_name = None
    data_bytes = 0
    if external_data:
        header, chunks, data_name = _split_external(model, path.name)
        if data_name is not None:
            data_bytes = atomic.write_bytes(folder / data_name, chunks, mode=mode)
        del chunks
    else:
        header = model
        if model.ByteSize() > _MAX_PROTO_BYTES:
            raise AxcnnError("the model is larger than 2 GB; write it with external data")
    try:
        model_bytes = atomic.write_bytes(path, header.SerializeToString(), mode=mode)
    except BaseException:
        if data_name is not None and data_name not in previous:
            atomic.remove(folder / data_name)
        raise
    for name in sorted(previous - {data_name}):
        atomic.remove(folder / name)
    logger.debug("wrote %s (%d bytes) with external data %s (%d bytes)", path, model_bytes, data_name, data_bytes)
    return model_bytes + data_bytes
