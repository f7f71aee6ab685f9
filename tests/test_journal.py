"""The run journal: append-only records, resume after a stop, refusal of another run's journal, and a resumed
compress that writes the same bytes as one never stopped."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import tiny_cnn, tiny_data

from axcnn.api import compress, default_run_dir
from axcnn.cluster import cluster_range
from axcnn.config import CompressConfig
from axcnn.errors import AxcnnError
from axcnn.explore import Candidate, LayerDecision
from axcnn.journal import FILE_NAME, Journal, fingerprint
from axcnn.model import inventory
from axcnn.score import Outcome
from axcnn.sharing import Sharing, cluster_layer

FP = {"format": 1, "version": "t", "model": "m", "data": "d", "settings": {"kmin": 2, "mean": (0.5,)}}
CFG = dict(kmin=2, kmax=8, filter=0.5, min_weights=16)


def _lines(run_dir):
    return (run_dir / FILE_NAME).read_bytes().split(b"\n")


def test_put_get_and_resume(tmp_path):
    run = tmp_path / "run"
    with Journal.open(run, FP, resume=False) as j:
        assert j.get("candidate", ("w1", 4)) is None and j.loaded == 0
        j.put("candidate", ("w1", 4), {"correct": 3})
        j.put("candidate", ["w1", 5], {"correct": 2})
        j.put("candidate", ("w1", 4), {"correct": 7})  # a later record wins
        assert j.get("candidate", ["w1", 4]) == {"correct": 7} and j.count("candidate") == 2
    header = json.loads(_lines(run)[0])
    assert header["kind"] == "header" and header["fingerprint"]["settings"]["mean"] == [0.5]
    with Journal.open(run, FP, resume=True) as j:
        assert j.loaded == 2 and j.get("candidate", ("w1", 4)) == {"correct": 7}
        assert j.get("layer", ("w1",)) is None and not j.finished


def test_unfinished_journal_needs_resume_and_finished_one_is_replaced(tmp_path):
    run = tmp_path / "run"
    with Journal.open(run, FP, resume=False) as j:
        j.put("candidate", ("w", 2), 1)
    with pytest.raises(AxcnnError, match="unfinished run .*--resume"):
        Journal.open(run, FP, resume=False)
    with Journal.open(run, FP, resume=True) as j:
        j.finish()
    with Journal.open(run, FP, resume=False) as j:  # a finished run: the next one starts over
        assert j.loaded == 0 and j.get("candidate", ("w", 2)) is None
    with Journal.open(run, FP, resume=True) as j:  # the header alone: nothing to keep
        assert j.loaded == 0


def test_resume_without_a_journal_starts_a_new_one(tmp_path):
    with Journal.open(tmp_path / "a" / "b", FP, resume=True) as j:
        assert j.loaded == 0
    assert (tmp_path / "a" / "b" / FILE_NAME).is_file()


@pytest.mark.parametrize("change, said", [
    ({"version": "u"}, "another axcnn version"),
    ({"model": "x"}, "another model"),
    ({"data": "x"}, "other data"),
    ({"settings": {"kmin": 3, "mean": (0.5,)}}, "other settings .*kmin 2 -> 3"),
])
def test_journal_of_another_run_is_refused(tmp_path, change, said):
    run = tmp_path / "run"
    with Journal.open(run, FP, resume=False) as j:
        j.put("candidate", ("w", 2), 1)
    with pytest.raises(AxcnnError, match=said) as err:
        Journal.open(run, {**FP, **change}, resume=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cut", [1, 5, 17])
def test_a_line_cut_short_is_ignored_and_cut_off(tmp_path, cut):
    run = tmp_path / "run"
    with Journal.open(run, FP, resume=False) as j:
        j.put("candidate", ("w", 2), {"correct": 1})
        j.put("candidate", ("w", 3), {"correct": 2})
    path = run / FILE_NAME
    data = path.read_bytes()
    path.write_bytes(data[:-cut])  # killed while writing the last record
    with Journal.open(run, FP, resume=True) as j:
        assert j.get("candidate", ("w", 2)) == {"correct": 1} and j.get("candidate", ("w", 3)) is None
        j.put("candidate", ("w", 4), {"correct": 3})
    with Journal.open(run, FP, resume=True) as j:  # the new record follows the last whole line
        assert j.loaded == 2 and j.get("candidate", ("w", 4)) == {"correct": 3}
    assert all(json.loads(line) for line in _lines(run)[:-1])


def test_garbage_in_the_last_whole_line_is_ignored_but_not_in_the_middle(tmp_path):
    run = tmp_path / "run"
    with Journal.open(run, FP, resume=False) as j:
        j.put("candidate", ("w", 2), 1)
    path = run / FILE_NAME
    path.write_bytes(path.read_bytes() + b"\0\0\0\n")  # a block of zeros after a crash
    with Journal.open(run, FP, resume=True) as j:
        assert j.loaded == 1
    path.write_bytes(path.read_bytes() + b"{oops\n" + b'{"kind":"candidate","key":["w",3],"value":2}\n')
    with pytest.raises(AxcnnError, match="damaged at line 3"):
        Journal.open(run, FP, resume=True)


def test_other_file_and_second_writer_are_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / FILE_NAME).write_text('{"kind": "candidate", "key": [], "value": 1}\n{"kind": "x"}\n')
    with pytest.raises(AxcnnError, match="not an axcnn journal"):
        Journal.open(run, FP, resume=True)
    other = tmp_path / "other"
    with Journal.open(other, FP, resume=False):
        with pytest.raises(AxcnnError, match="another axcnn run is using"):
            Journal.open(other, FP, resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AxcnnError, match="is a file"):
        Journal.open(tmp_path / "file", FP, resume=False)


@pytest.mark.parametrize("exc, kept", [(AxcnnError("bad input"), False), (KeyboardInterrupt(), True),
                                       (OSError(28, "No space left on device"), True)])
def test_what_a_failed_run_leaves(tmp_path, exc, kept):
    run = tmp_path / "run"
    with pytest.raises(type(exc)):
        with Journal.open(run, FP, resume=False) as j:
            j.put("candidate", ("w", 2), 1)
            raise exc
    assert run.exists() == kept
    with pytest.raises(KeyboardInterrupt):  # nothing recorded yet: nothing to keep
        with Journal.open(tmp_path / "empty", FP, resume=False):
            raise KeyboardInterrupt
    assert not (tmp_path / "empty").exists()


def test_decision_round_trip_is_exact(tmp_path):
    model = tiny_cnn()
    spec = inventory(model, 16)[0][2]
    table = cluster_range(spec.array, 2, 6)
    cands = tuple(Candidate(k, table.inertia(k), table.inertia(k) * 1.5, 3.25, scored=k < 4, correct=k * 10,
                            score=k / 7, stopped_early=k == 3, samples_seen=11) for k in table.ks)
    d = LayerDecision(spec, 1234, False, cands, cands[1], table.get(cands[1].k), "suffix", 0.1, 0.2, 0.3)
    with Journal.open(tmp_path / "run", FP, resume=False) as j:
        j.put_decision(d)
        j.put_outcome(spec.name, 5, Outcome(7, 64, 120, True))
        j.put_estimates(spec.name, {2: 0.5, 3: float("inf")})
    with Journal.open(tmp_path / "run", FP, resume=True) as j:
        back = j.decision(spec)
        assert j.outcome(spec.name, 5) == Outcome(7, 64, 120, True)
        assert j.estimates(spec.name) == {2: 0.5, 3: float("inf")}
    assert back.candidates == d.candidates and back.chosen == d.chosen and back.plan == "suffix"
    assert (back.n_unique, back.clamped, back.scoring_s) == (1234, False, 0.2)
    c, e = back.clustering, d.clustering
    assert c.k == e.k and c.inertia == e.inertia and c.centroids.tobytes() == e.centroids.tobytes()
    assert c.indices.dtype == e.indices.dtype and np.array_equal(c.indices, e.indices)
    assert back.dense().tobytes() == d.dense().tobytes()


def test_fingerprint_covers_bytes_and_arrays(tmp_path):
    (tmp_path / "m").write_bytes(b"abc")
    x = np.zeros((2, 3), np.float32)
    a = fingerprint(model_files=[tmp_path / "m"], arrays=(x, None), settings={"k": (1,)}, version="1")
    assert a == fingerprint(model_files=[tmp_path / "m"], arrays=(x.copy(), None), settings={"k": [1]},
                            version="1")
    assert a["data"] != fingerprint(model_files=[tmp_path / "m"], arrays=(x.reshape(3, 2), None),
                                    settings={}, version="1")["data"]
    (tmp_path / "m").write_bytes(b"abd")
    assert a["model"] != fingerprint(model_files=[tmp_path / "m"], arrays=(), settings={}, version="1")["model"]


# -- compress, stopped and resumed -------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    model = tiny_cnn(seed=3)
    x, y = tiny_data(model, n=160)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    return tmp_path / "m.onnx", tmp_path / "d.npz"


class _StopAfter:
    """A progress callback that presses Ctrl-C after ``n`` candidates have been scored."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, event, **info):
        if event == "candidate":
            self.n -= 1
            if self.n == 0:
                raise KeyboardInterrupt


def _report_without_timing(rep: dict) -> dict:
    rep = json.loads(json.dumps(rep))
    rep.pop("timing")
    for layer in rep["layers"]:
        layer.pop("timing")
    return rep


@pytest.mark.parametrize("estimator", ["inertia", "kl"])
@pytest.mark.parametrize("stop_after", [1, 4, 6])
def test_resumed_compress_writes_the_same_bytes(files, tmp_path, estimator, stop_after):
    mp, dp = files
    cfg = CompressConfig(**CFG, estimator=estimator, calib=32)
    whole = compress(mp, dp, tmp_path / "whole.onnx", tmp_path / "whole.json", cfg)
    assert whole.report["timing"]["candidates_resumed"] == 0
    total = whole.report["timing"]["candidates_scored"]

    out, rep = tmp_path / "o.onnx", tmp_path / "o.json"
    with pytest.raises(KeyboardInterrupt):
        compress(mp, dp, out, rep, cfg, progress=_StopAfter(stop_after))
    assert not out.exists() and not rep.exists() and (default_run_dir(out) / FILE_NAME).is_file()
    with pytest.raises(AxcnnError, match="--resume"):  # not by accident
        compress(mp, dp, out, rep, cfg)
    resumed = compress(mp, dp, out, rep, cfg, resume=True)
    t = resumed.report["timing"]
    assert t["candidates_resumed"] == stop_after and 0 < t["candidates_scored"] < total
    assert out.read_bytes() == (tmp_path / "whole.onnx").read_bytes()
    a, b = _report_without_timing(whole.report), _report_without_timing(resumed.report)
    a.pop("output"), b.pop("output")
    assert [layer["k"] for layer in a["layers"]] == [layer["k"] for layer in b["layers"]]
    assert a["final_score"] == b["final_score"] and a["compression_ratio"] == b["compression_ratio"]

    again = compress(mp, dp, out, rep, cfg, resume=True)  # a finished journal: every candidate from it
    assert again.report["timing"]["candidates_scored"] == 0
    assert again.report["timing"]["candidates_resumed"] == t["candidates_scored"] + t["candidates_resumed"]
    assert out.read_bytes() == (tmp_path / "whole.onnx").read_bytes()


def test_resume_refuses_other_settings_and_other_data(files, tmp_path):
    mp, dp = files
    out = tmp_path / "o.onnx"
    with pytest.raises(KeyboardInterrupt):
        compress(mp, dp, out, None, CompressConfig(**CFG), progress=_StopAfter(2))
    with pytest.raises(AxcnnError, match=r"other settings \(kmax 8 -> 7\)"):
        compress(mp, dp, out, None, CompressConfig(**{**CFG, "kmax": 7}), resume=True)
    with pytest.raises(AxcnnError, match="other data"):
        compress(mp, dp, out, None, CompressConfig(**CFG, limit=100), resume=True)
    assert not out.exists()


def test_explicit_run_dir_and_failed_input_leave_no_journal(files, tmp_path):
    mp, dp = files
    run = tmp_path / "runs" / "one"
    res = compress(mp, dp, tmp_path / "o.onnx", None, CompressConfig(**CFG), run_dir=run)
    assert (run / FILE_NAME).is_file() and not default_run_dir(tmp_path / "o.onnx").exists()
    assert json.loads(_lines(run)[-2]) == {"kind": "done"}
    assert res.report["timing"]["candidates_scored"] > 0
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1, 2, 99]))
    with pytest.raises(AxcnnError, match="labels must lie"):
        compress(mp, tmp_path / "bad.npz", tmp_path / "p.onnx", None, CompressConfig(**CFG))
    assert not default_run_dir(tmp_path / "p.onnx").exists() and not (tmp_path / "p.onnx").exists()


def test_same_inputs_give_the_same_bytes_and_report(files, tmp_path):
    """Determinism: two runs from scratch write byte-identical models and reports equal but for timing."""
    mp, dp = files
    cfg = CompressConfig(**CFG, limit=150, seed=5)
    a = compress(mp, dp, tmp_path / "a.onnx", tmp_path / "a.json", cfg)
    b = compress(mp, dp, tmp_path / "b.onnx", tmp_path / "b.json", cfg)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    ra, rb = _report_without_timing(a.report), _report_without_timing(b.report)
    assert ra.pop("output") != rb.pop("output")
    assert ra == rb


@pytest.mark.parametrize("sharing", [Sharing("channel", 3), Sharing("kernel"), Sharing(vector_dim=2)],
                         ids=lambda s: s.describe())
def test_decision_round_trip_keeps_how_weights_are_shared(tmp_path, sharing):
    spec = inventory(tiny_cnn(), 16)[0][1]  # w2 [8, 2, 3, 3]
    table = cluster_layer(spec, sharing, 2, 5)
    cands = tuple(Candidate(k, table.inertia(k), table.inertia(k), table.compression_ratio(k)) for k in table.ks)
    d = LayerDecision(spec, table.n_unique, table.clamped, cands, cands[-1], table.get(cands[-1].k), "full", 0, 0, 0)
    with Journal.open(tmp_path / "run", FP, resume=False) as j:
        j.put_decision(d)
    with Journal.open(tmp_path / "run", FP, resume=True) as j:
        back = j.decision(spec)
    c, e = back.shared(), d.shared()
    assert c.layout == e.layout and c.sharing == sharing and (c.k, c.inertia) == (e.k, e.inertia)
    assert c.centroids.tobytes() == e.centroids.tobytes() and c.indices.dtype == e.indices.dtype
    assert np.array_equal(c.indices, e.indices) and back.dense().tobytes() == d.dense().tobytes()


def test_decision_of_a_journal_before_granularities_is_one_codebook(tmp_path):
    spec = inventory(tiny_cnn(), 16)[0][0]
    c = cluster_range(spec.array, 4, 4).get(4)
    cand = Candidate(4, c.inertia, c.inertia, 2.0)
    d = LayerDecision(spec, 10, False, (cand,), cand, c, "full", 0, 0, 0)
    with Journal.open(tmp_path / "run", FP, resume=False) as j:
        j.put_decision(d)
        key = ("layer", [spec.name])
        value = j.get(*key)
        del value["clustering"]["sharing"]  # as a first-round journal wrote it
        j.put("layer", [spec.name], value)
    with Journal.open(tmp_path / "run", FP, resume=True) as j:
        back = j.decision(spec)
    assert back.shared().sharing == Sharing() and back.dense().tobytes() == d.dense().tobytes()


def test_resumed_channel_run_writes_the_same_bytes(files, tmp_path):
    mp, dp = files
    cfg = CompressConfig(**CFG, granularity="channel", group_size=3)
    whole = compress(mp, dp, tmp_path / "whole.onnx", None, cfg)
    out = tmp_path / "o.onnx"
    with pytest.raises(KeyboardInterrupt):
        compress(mp, dp, out, None, cfg, progress=_StopAfter(3))
    resumed = compress(mp, dp, out, None, cfg, resume=True)
    assert resumed.report["timing"]["candidates_resumed"] == 3
    assert out.read_bytes() == (tmp_path / "whole.onnx").read_bytes()
    assert {la["granularity"] for la in whole.report["layers"]} == {"channel"}
