"""The executor seam without Ray: the parallel race engine against score.best_first, and the local executor."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from conftest import tiny_cnn
from onnx import TensorProto, helper, numpy_helper

from axcnn import plans, score
from axcnn.config import CompressConfig
from axcnn.errors import MissingBackendError
from axcnn.executor import LocalExecutor, make_executor
from axcnn.executor.race import RaceStats, lead_batches, parallel_all, parallel_best_first
from axcnn.model import weight_proto

# ---------------------------------------------------------------------------------------------------------------
# a race whose counts are given: candidate k gets counts[k][j] of batch j right


def _count_plan(sizes):
    """A plan over batches of ``sizes`` samples; feed j holds the batch index so the fake runner knows it."""
    w = numpy_helper.from_array(np.zeros(1, np.float32), "w")
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], initializer=[w])
    model = helper.make_model(graph)
    feeds = [{"j": np.full(n, j)} for j, n in enumerate(sizes)]
    return plans.Plan(model, weight_proto(model, "w"), feeds, list(sizes), "full")


class _CountRunner:
    """Stands in for score.Runner: a candidate's session is its serialized model; a batch's output gets exactly
    ``counts[k][j]`` rows right (label 0 is the answer)."""

    def __init__(self, plan, candidates, counts):
        self.by_model = {plan.serialize_with(a): k for k, a in candidates.items()}
        self.counts = counts
        self.runs: list[tuple[int, int]] = []

    def session(self, model):
        return self.by_model[model]

    def run(self, k, output, feeds):
        j = int(feeds["j"][0])
        self.runs.append((k, j))
        n, c = len(feeds["j"]), self.counts[k][j]
        out = np.zeros((n, 2), np.float32)
        out[:c, 0] = 1
        out[c:, 1] = 1
        return out


def _random_race(rng):
    nb = int(rng.integers(1, 7))
    sizes = [int(s) for s in rng.integers(1, 6, nb)]
    ks = [int(k) for k in rng.choice(np.arange(2, 40), size=int(rng.integers(1, 7)), replace=False)]
    skill = {k: rng.random() for k in ks}
    counts = {k: [int(rng.binomial(s, skill[k])) for s in sizes] for k in ks}
    if len(ks) > 1 and rng.random() < 0.5:  # twins: a tie the smaller K must win
        counts[ks[1]] = list(counts[ks[0]])
    lead = int(rng.integers(0, sum(sizes) + 3)) if rng.random() < 0.6 else 0
    return ks, sizes, counts, lead


def _landing(counts, rng, order):
    """(submit, land) over the given counts, landing in-flight batches in FIFO, LIFO or random order."""
    flying: list[tuple[int, int]] = []
    started: list[tuple[int, int]] = []

    def submit(k, j):
        assert (k, j) not in started, "a batch started twice"
        assert 0 <= j < len(counts[k])
        started.append((k, j))
        flying.append((k, j))

    def land():
        i = {"fifo": 0, "lifo": len(flying) - 1}.get(order, None)
        k, j = flying.pop(int(rng.integers(len(flying))) if i is None else i)
        return k, j, counts[k][j]

    return submit, land, started


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("slots", [1, 2, 5, 64])
def test_parallel_race_replays_best_first_exactly(seed, slots):
    rng = np.random.default_rng(seed)
    ks, sizes, counts, lead = _random_race(rng)
    plan = _count_plan(sizes)
    cands = {k: np.full(1, k, np.float32) for k in ks}
    runner = _CountRunner(plan, cands, counts)
    labels = np.zeros(sum(sizes), np.int64)
    local_done: list = []
    expected = score.best_first(plan, runner, "y", cands, labels, "top1", lambda k, o: local_done.append((k, o)),
                                lead=lead)
    for order in ("fifo", "lifo", "random"):
        submit, land, started = _landing(counts, rng, order)
        stats = RaceStats()
        got_done: list = []
        got = parallel_best_first(ks, sizes, submit, land, slots, lambda k, o, log=got_done: log.append((k, o)),
                                  lead, stats)
        assert got == expected and list(got) == list(expected)
        assert got_done == local_done  # the same journal, in the same order
        assert stats.read == len(runner.runs)  # it read exactly the batches the local race ran ...
        assert set(runner.runs) <= set(started)  # ... all of which were started, each once
        assert stats.started == len(started) >= stats.read


def test_parallel_race_with_one_slot_in_fifo_order_runs_nothing_it_does_not_need_in_the_lead():
    # every candidate runs its lead batches whatever happens: those are never wasted
    sizes, ks = [4, 4, 4], [5, 3]
    counts = {5: [0, 4, 4], 3: [4, 4, 4]}
    submit, land, started = _landing(counts, np.random.default_rng(0), "fifo")
    stats = RaceStats()
    out = parallel_best_first(ks, sizes, submit, land, 1, None, 4, stats)
    assert out[3] == score.Outcome(12, 12, 12, False)
    assert out[5].stopped_early and out[5].seen == 4  # after its lead batch it can reach 8 < 12
    assert started[:2] == [(5, 0), (3, 0)]


@pytest.mark.parametrize(("sizes", "lead", "n"), [([4, 4, 4], 0, 0), ([4, 4, 4], 1, 1), ([4, 4, 4], 4, 1),
                                                  ([4, 4, 4], 5, 2), ([4, 4, 4], 99, 3), ([1], 1, 1)])
def test_lead_batches_are_those_starting_before_the_lead(sizes, lead, n):
    assert lead_batches(sizes, lead) == n


@pytest.mark.parametrize("slots", [1, 3, 100])
def test_parallel_all_scores_everything(slots):
    rng = np.random.default_rng(4)
    sizes, ks = [3, 5, 2], [9, 4, 6]
    counts = {k: [int(rng.integers(0, s + 1)) for s in sizes] for k in ks}
    submit, land, started = _landing(counts, rng, "random")
    seen = []
    out = parallel_all(ks, sizes, submit, land, slots, lambda k, o: seen.append(k))
    assert list(out) == ks and sorted(seen) == sorted(ks) and len(started) == 9
    assert all(out[k] == score.Outcome(sum(counts[k]), 10, 10, False) for k in ks)


def test_engine_refuses_no_slots():
    with pytest.raises(ValueError, match="slots"):
        parallel_best_first([1], [1], lambda k, j: None, lambda: (1, 0, 0), 0)
    with pytest.raises(ValueError, match="slots"):
        parallel_all([1], [1], lambda k, j: None, lambda: (1, 0, 0), 0)


def test_parallel_race_of_no_candidates_is_empty():
    assert parallel_best_first([], [4], lambda k, j: None, lambda: (0, 0, 0), 2) == {}


# ---------------------------------------------------------------------------------------------------------------
# the local executor is score.best_first / score.evaluate


def _tiny_plan(batch=8):
    from axcnn.model import io_info

    model = tiny_cnn()
    x = np.random.default_rng(0).normal(size=(64, 1, 8, 8)).astype(np.float32)
    plan = plans.full_plan(score.working_copy(model), "w1", x, io_info(model), batch)
    runner = score.Runner(["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    w1 = rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32)
    labels = np.argmax(score.outputs_of(plan, runner, "logits", w1), axis=1)
    cands = {k: (w1 + rng.normal(0, 0.1 * k, w1.shape)).astype(np.float32) for k in (3, 5, 9, 12)}
    return plan, runner, cands, labels


def test_local_executor_is_best_first_and_evaluate():
    plan, runner, cands, labels = _tiny_plan()
    with LocalExecutor() as ex:
        assert ex.race(plan, runner, "logits", cands, labels, "top1", lead=16) == score.best_first(
            plan, runner, "logits", cands, labels, "top1", lead=16)
        seen = []
        out = ex.score_all(plan, runner, "logits", cands, labels, "top1", lambda k, o: seen.append(k))
        assert seen == list(cands)
        assert out == {k: score.evaluate(plan, runner, "logits", a, labels, "top1") for k, a in cands.items()}
        assert list(ex.map(lambda v: v * v, [3, 1, 2])) == [(0, 9), (1, 1), (2, 4)]
        assert ex.describe() == {"name": "local"}


def test_make_executor_local_by_default():
    assert isinstance(make_executor(CompressConfig()), LocalExecutor)


def test_a_ray_address_asks_for_the_ray_executor():
    assert CompressConfig(ray_address="127.0.0.1:6379").executor == "ray"
    assert CompressConfig(executor="ray", ray_address="auto").ray_address == "auto"
    assert CompressConfig(executor="ray").ray_address is None
    with pytest.raises(ValueError, match="executor='dask' is invalid"):
        CompressConfig(executor="dask")
    with pytest.raises(ValueError, match="ray_address=6379 is invalid"):
        CompressConfig(ray_address=6379)


def test_missing_ray_names_the_extra(monkeypatch):
    from axcnn.executor import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(MissingBackendError, match=r"axcnn\[ray\]"):
        RayExecutor()


def test_worker_session_matches_serialize_with():
    """A worker builds a candidate's session from the base model and the weight: the same bytes as the local
    race's ``Plan.serialize_with``, so onnxruntime sees the same model."""
    from axcnn.executor import worker

    plan, runner, cands, labels = _tiny_plan()
    base = onnx.load_from_string(plan.model.SerializeToString())
    copy = plans.Plan(base, weight_proto(base, "w1"), [], [], "full")
    assert copy.serialize_with(cands[5]) == plan.serialize_with(cands[5])
    worker.clear()
    got = worker.score_batch("t", 5, "w1", [plan.model.SerializeToString()], [cands[5]], "logits", "top1", "cpu",
                             1, 2, labels[:8], 8, plan.feeds[0])
    assert got[0] == score.count_correct(runner.run(runner.session(plan.serialize_with(cands[5])), "logits",
                                                    plan.feeds[0]), labels[:8], "top1")
    assert got[1] == ("CPUExecutionProvider",)
    worker.clear()
