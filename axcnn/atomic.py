"""Atomic file output: a file is replaced whole, or not at all.

Each helper writes to a temporary file in the target's own folder (the same file system, so that the rename is
atomic), flushes and fsyncs it, gives it its permission bits, ``os.replace``-s it over the target and fsyncs the
folder so that the rename itself survives a crash. On any failure before the rename the temporary file is removed
and the old target is left as it was. An ``OSError`` (a full disk, a read-only folder) becomes an
:class:`~axcnn.errors.AxcnnError` of one line naming the file; anything else (KeyboardInterrupt, a bug)
propagates after the clean-up.

A helper returns normally exactly when the target holds the new content. The folder fsync comes after the
rename, which cannot be undone: if it fails the new file is in place (it may not survive a power cut) and the
failure is logged, not raised.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from axcnn.errors import AxcnnError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODE", "file_mode", "fsync_folder", "remove", "write_bytes", "write_text"]

DEFAULT_MODE = 0o644
"""Permission bits of a new file (rw-r--r--; ``mkstemp`` alone would leave it owner-only)."""

Chunks = bytes | bytearray | memoryview | Iterable[bytes | bytearray | memoryview]


def file_mode(path: str | os.PathLike) -> int:
    """Permission bits for a file written at ``path``: those of the file there now, else :data:`DEFAULT_MODE`."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return DEFAULT_MODE


def fsync_folder(folder: str | os.PathLike) -> None:
    """fsync a folder, so that renames and removals in it are durable. Raises OSError where that fails; a
    platform that cannot open folders (Windows) is skipped."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except (PermissionError, IsADirectoryError):  # Windows cannot open a folder; nothing to sync there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    text = exc.strerror or str(exc) or type(exc).__name__
    return " ".join(str(text).split())  # one line


def _write_all(fd: int, chunk: bytes | bytearray | memoryview) -> int:
    view = memoryview(chunk).cast("B")
    done = 0
    while done < len(view):  # os.write may write less than asked
        done += os.write(fd, view[done:])
    return done


def write_bytes(path: str | os.PathLike, data: Chunks, *, mode: int | None = None) -> int:
    """Replace ``path`` atomically by ``data`` (bytes, or an iterable of byte chunks written in order, so a
    large payload need not be joined in memory); return the number of bytes written.

    ``mode`` is the permission bits of the new file; by default those of the file it replaces, else
    :data:`DEFAULT_MODE`. Raises AxcnnError (one line) when the file cannot be written.
    """
    path = Path(path)
    folder = path.parent
    chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    bits = file_mode(path) if mode is None else mode
    tmp: str | None = None
    total = 0
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        try:
            for chunk in chunks:
                total += _write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, bits)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise AxcnnError(f"cannot write {path}: {_reason(exc)}") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                logger.warning("could not remove the temporary file %s", tmp)
    try:
        fsync_folder(folder)
    except OSError as exc:
        logger.warning("wrote %s, but could not fsync its folder (%s): the rename may not survive a crash",
                       path, _reason(exc))
    logger.debug("wrote %s (%d bytes)", path, total)
    return total


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", mode: int | None = None) -> int:
    """:func:`write_bytes` of ``text`` encoded (UTF-8 by default); return the number of bytes written."""
    return write_bytes(path, text.encode(encoding), mode=mode)


def remove(path: str | os.PathLike) -> bool:
    """Remove a file if it is there and fsync its folder; return whether it was removed. Never raises for an
    OSError: a file that cannot be removed is logged and left."""
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("could not remove %s: %s", path, _reason(exc))
        return False
    try:
        fsync_folder(path.parent)
    except OSError as exc:
        logger.warning("removed %s, but could not fsync its folder (%s)", path, _reason(exc))
    return True
