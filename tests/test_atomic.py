"""Tests for axcnn.atomic: a file is replaced whole or not at all, and never leaves a temporary file."""

from __future__ import annotations

import errno
import logging
import os

import pytest

from axcnn import atomic
from axcnn.errors import AxcnnError


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_bytes_text_and_chunks(tmp_path):
    target = tmp_path / "a.bin"
    assert atomic.write_bytes(target, b"hello") == 5
    assert target.read_bytes() == b"hello"
    assert atomic.write_bytes(target, [b"ab", bytearray(b"cd"), memoryview(b"ef")]) == 6
    assert target.read_bytes() == b"abcdef"
    assert atomic.write_bytes(target, iter([])) == 0 and target.read_bytes() == b""
    assert atomic.write_text(tmp_path / "t.txt", "häh\n") == 5
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "häh\n"
    assert _names(tmp_path) == ["a.bin", "t.txt"]


def test_large_chunk_written_whole(tmp_path, monkeypatch):
    """os.write may write less than asked: every byte still lands, in order."""
    real_write = os.write

    def short_write(fd, data):
        return real_write(fd, bytes(data[:1000]))

    monkeypatch.setattr(os, "write", short_write)
    payload = bytes(range(256)) * 40
    atomic.write_bytes(tmp_path / "big", [payload, b"end"])
    monkeypatch.undo()
    assert (tmp_path / "big").read_bytes() == payload + b"end"


def test_modes(tmp_path):
    new = tmp_path / "new"
    atomic.write_bytes(new, b"x")
    assert new.stat().st_mode & 0o777 == atomic.DEFAULT_MODE == 0o644  # not mkstemp's 0o600
    new.chmod(0o640)
    atomic.write_bytes(new, b"y")
    assert new.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its permission bits
    atomic.write_bytes(new, b"z", mode=0o600)
    assert new.stat().st_mode & 0o777 == 0o600
    assert atomic.file_mode(tmp_path / "missing") == 0o644


def _failing_at(monkeypatch, name, n, exc=None):
    """Make ``os.<name>`` raise on its n-th call (1-based) from now on; returns the call counter."""
    real = getattr(os, name)
    calls = [0]

    def fake(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise exc or OSError(errno.EIO, "simulated I/O error")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, fake)
    return calls


@pytest.mark.parametrize("step", ["write", "fsync", "chmod", "replace"])
def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, step):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    _failing_at(monkeypatch, step, 1)
    with pytest.raises(AxcnnError, match=r"^cannot write .*m\.onnx: simulated I/O error$"):
        atomic.write_bytes(target, b"new content")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["m.onnx"]
    # and with no old file: nothing at all is left
    target.unlink()
    _failing_at(monkeypatch, step, 1)
    with pytest.raises(AxcnnError):
        atomic.write_text(target, "new")
    monkeypatch.undo()
    assert _names(tmp_path) == []


def test_full_disk_is_one_line_user_error(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("{}")
    real_write = os.write
    written = [0]

    def full_disk(fd, data):
        if written[0] + len(data) > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(AxcnnError) as info:
        atomic.write_bytes(target, [b"a" * 3000, b"b" * 3000])
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and message.endswith("No space left on device") and "report.json" in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert target.read_text() == "{}" and _names(tmp_path) == ["report.json"]


def test_interrupt_cleans_up_and_propagates(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def chunks():
        yield b"part"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.write_bytes(target, chunks())
    assert target.read_bytes() == b"old" and _names(tmp_path) == ["f"]


def test_folder_fsync_after_rename_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    """The rename cannot be undone: the call returns (the new file is there) and logs the failed folder fsync."""
    target = tmp_path / "f"
    target.write_bytes(b"old")
    calls = _failing_at(monkeypatch, "fsync", 2)  # 1: the temporary file, 2: the folder
    with caplog.at_level(logging.WARNING, logger="axcnn.atomic"):
        atomic.write_bytes(target, b"new")
    assert calls[0] == 2
    monkeypatch.undo()
    assert target.read_bytes() == b"new" and _names(tmp_path) == ["f"]
    assert "could not fsync its folder" in caplog.text


def test_missing_folder(tmp_path):
    with pytest.raises(AxcnnError, match="cannot write"):
        atomic.write_bytes(tmp_path / "nope" / "f", b"x")


def test_remove(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x")
    assert atomic.remove(f) is True and not f.exists()
    assert atomic.remove(f) is False
