"""Tests for axcnn.rewrite.write: write_model keeps the model and its external data consistent whatever fails."""

from __future__ import annotations

import errno
import os
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from axcnn.errors import AxcnnError
from axcnn.rewrite import SharedWeight, replace_weights, share_weights, verify, weight_arrays, write_model

DATA_NAME = re.compile(r"^m\.onnx\.[0-9a-f]{12}\.data$")


def conv_model(seed: int, channels: int = 16) -> onnx.ModelProto:
    """Two 3x3 convolutions (9 KiB of weights each: external data) and a small bias (stays inline)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b1"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w1", "b1"], ["y"], pads=[1, 1, 1, 1]),
    ]
    shape = [1, channels, 4, 4]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _weights(model):
    return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def _locations(path):
    header = onnx.load(str(path), load_external_data=False)
    return {
        e.value
        for t in header.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }


def _state(folder):
    """The model at folder/m.onnx loaded with its data, and what else is in the folder."""
    path = folder / "m.onnx"
    files = sorted(p.name for p in folder.iterdir())
    assert not [f for f in files if f.endswith(".tmp")], files  # never a temporary file left
    model = onnx.load(str(path))  # loads the external data too: a missing or short data file fails here
    onnx.checker.check_model(model, full_check=True)
    return model, files


def test_external_data_file_named_by_content(tmp_path):
    model = conv_model(1)
    target = tmp_path / "m.onnx"
    written = write_model(model, target, external_data=True)
    (data,) = _locations(target)
    assert DATA_NAME.match(data) and "/" not in data
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", data])
    assert written == target.stat().st_size + (tmp_path / data).stat().st_size
    assert (tmp_path / data).stat().st_size == 2 * 16 * 16 * 9 * 4  # the bias (64 bytes) stays in the model
    loaded, _ = _state(tmp_path)
    assert _weights(loaded) == _weights(model)
    # the same content gets the same name: rewriting keeps the pair (and does not delete its own data file)
    assert write_model(model, target, external_data=True) == written
    assert _locations(target) == {data} and sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", data])
    # other content, another name; the previous data file goes once the new model is in place
    write_model(conv_model(2), target, external_data=True)
    (data2,) = _locations(target)
    assert data2 != data and sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", data2])
    # back to a self-contained model: the data file goes too
    write_model(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"] and not _locations(target)


def test_shared_model_with_external_data_runs(tmp_path):
    rng = np.random.default_rng(3)
    model = conv_model(3, channels=32)
    shared = [
        SharedWeight(name, rng.standard_normal(16).astype(np.float32), rng.integers(0, 16, size=arr.shape))
        for name, arr in weight_arrays(model, ["w0", "w1"]).items()
    ]
    out, _ = share_weights(model, shared)
    before = out.SerializeToString()
    sub = tmp_path / "out"
    sub.mkdir()
    target = sub / "m.onnx"
    write_model(out, target, external_data=True)
    assert out.SerializeToString() == before  # not mutated
    (data,) = _locations(target)
    assert DATA_NAME.match(data)
    loaded = onnx.load(str(target))
    onnx.checker.check_model(loaded, full_check=True)
    verify(loaded, shared)
    x = rng.standard_normal((1, 32, 4, 4)).astype(np.float32)
    (got,) = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    dense = replace_weights(model, {sw.name: sw.dense() for sw in shared})
    (want,) = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.max(np.abs(want))))


def _count_calls(monkeypatch, names, write):
    """How many times ``write()`` calls each of ``os.<names>``."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(os, name)

        def counting(*args, _name=name, _real=real, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, counting)
    write()
    monkeypatch.undo()
    return counts


@pytest.mark.parametrize(("old_external", "new_external"), [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("step", ["replace", "fsync", "write", "chmod", "unlink"])
def test_failure_at_every_step_leaves_a_consistent_pair(tmp_path, monkeypatch, step, old_external, new_external):
    """os.<step> raises at its n-th call, for every n the write makes: the folder then holds the old model with
    its data or the new one with its data (loadable, checker-clean, nothing else: no temporary file and no
    orphaned data file), and a failure that leaves the old pair raises AxcnnError."""
    old, new = conv_model(10), conv_model(11)
    target = tmp_path / "m.onnx"

    def fresh():
        for p in tmp_path.iterdir():
            p.unlink()
        write_model(old, target, external_data=old_external)

    fresh()
    calls = _count_calls(monkeypatch, [step], lambda: write_model(new, target, external_data=new_external))[step]
    if step in ("replace", "fsync", "write", "chmod"):
        assert calls >= 1
    outcomes = set()
    for n in range(1, calls + 1):
        fresh()
        real = getattr(os, step)
        seen = [0]

        def failing(*args, _real=real, _n=n, _seen=seen, **kwargs):
            _seen[0] += 1
            if _seen[0] == _n:
                raise OSError(errno.EIO, "simulated I/O error")
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, step, failing)
        try:
            write_model(new, target, external_data=new_external)
            raised = None
        except AxcnnError as exc:
            raised = exc
        monkeypatch.undo()
        model, files = _state(tmp_path)
        got = _weights(model)
        assert got in (_weights(old), _weights(new)), (step, n)
        which = "old" if got == _weights(old) else "new"
        assert which == "old" or raised is None, (step, n)  # an error means: nothing changed
        if raised is not None:
            assert "\n" not in str(raised) and "simulated I/O error" in str(raised)
        referenced = _locations(target)
        extra = set(files) - {"m.onnx"} - referenced
        # a removal that fails after the new model is in place may leave the old data file, never anything else
        assert not extra or (which == "new" and step == "unlink" and all(DATA_NAME.match(f) for f in extra))
        outcomes.add(which)
    if step in ("replace", "write"):
        assert "old" in outcomes  # the failure hit before the model replace at least once


def test_full_disk_while_writing_data(tmp_path, monkeypatch):
    old, new = conv_model(20), conv_model(21)
    target = tmp_path / "m.onnx"
    write_model(old, target, external_data=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    real_write = os.write

    def full_disk(fd, data):
        if len(data) > 100:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(AxcnnError) as info:
        write_model(new, target, external_data=True)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message and ".data" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    model, _ = _state(tmp_path)
    assert _weights(model) == _weights(old)


def test_only_our_data_files_are_removed(tmp_path):
    """A data file is removed only when the previous model referenced it and it is named after the output."""
    model = conv_model(30)
    target = tmp_path / "m.onnx"
    # the previous model references the legacy name m.onnx.data and a file of another name
    onnx.save_model(conv_model(31), str(target), save_as_external_data=True, location="m.onnx.data")
    other = conv_model(32)
    other_weights = _weights(other)  # save_model moves the data out of the proto
    onnx.save_model(other, str(tmp_path / "other.onnx"), save_as_external_data=True, location="weights.bin")
    header = onnx.load(str(target), load_external_data=False)
    w0 = header.graph.initializer[0]
    del w0.external_data[:]  # the old m.onnx takes w0 from other.onnx's data file
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(16 * 16 * 9 * 4))):
        entry = w0.external_data.add()
        entry.key, entry.value = key, value
    onnx.save_model(header, str(target))
    assert _locations(target) == {"m.onnx.data", "weights.bin"} and onnx.load(str(target))
    (tmp_path / "m.onnx.stray.data").write_bytes(b"not referenced by the old model")
    write_model(model, target, external_data=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "m.onnx.data" not in names  # referenced by the previous model and named after the output
    assert "weights.bin" in names and "m.onnx.stray.data" in names
    assert _weights(onnx.load(str(tmp_path / "other.onnx"))) == other_weights


def test_errors(tmp_path):
    model = conv_model(40)
    with pytest.raises(AxcnnError, match="does not exist"):
        write_model(model, tmp_path / "nope" / "m.onnx")
    onnx.save_model(model, str(tmp_path / "e.onnx"), save_as_external_data=True, location="e.data")
    header = onnx.load(str(tmp_path / "e.onnx"), load_external_data=False)
    with pytest.raises(AxcnnError, match="not loaded"):
        write_model(header, tmp_path / "m.onnx")


def test_written_file_permissions(tmp_path):
    model = conv_model(41)
    write_model(model, tmp_path / "m.onnx", external_data=True)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o644}
    (tmp_path / "m.onnx").chmod(0o640)
    write_model(conv_model(42), tmp_path / "m.onnx", external_data=True)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o640}  # the data file follows the model
