import gc
import weakref

import numpy as np
import pytest
from conftest import tiny_cnn

from axcnn import plans, score


def test_count_correct_top1_top5():
    out = np.array([[0.1, 0.9, 0, 0, 0, 0], [5, 4, 3, 2, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=np.float32)
    y = np.array([1, 4, 0])
    assert score.count_correct(out, y, "top1") == 1
    assert score.count_correct(out, y, "top5") == 3 - 0  # label 0 of row 3 ties at 0 with four others
    assert score.count_correct(out, np.array([1, 5, 5]), "top5") == 2


def test_providers_fall_back_to_cpu_without_cuda(monkeypatch, caplog):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert score.select_providers("auto") == ["CPUExecutionProvider"]
    with caplog.at_level("WARNING"):
        assert score.select_providers("cuda") == ["CPUExecutionProvider"]
    assert "falling back to the CPU" in caplog.text
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert score.select_providers("auto")[0] == "CUDAExecutionProvider"
    assert score.select_providers("cpu") == ["CPUExecutionProvider"]


def test_working_copy_makes_input_initializers_constant():
    model = tiny_cnn(opset=8, ir=3, initializers_as_inputs=True)
    work = score.working_copy(model)
    assert [i.name for i in work.graph.input] == ["x"] and work.ir_version >= 4
    assert len(model.graph.input) > 1  # the input model is untouched


def _race_setup(batch):
    from axcnn.model import io_info

    model = tiny_cnn()
    x = np.random.default_rng(0).normal(size=(64, 1, 8, 8)).astype(np.float32)
    runner = score.Runner(["CPUExecutionProvider"])
    plan = plans.full_plan(score.working_copy(model), "w1", x, io_info(model), batch)
    return plan, runner


@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("lead", "live"), [(0, 4), (20, 4), (0, 1), (20, 2)])
def test_best_first_finds_the_exhaustive_winner_and_stops_only_provable_losers(batch, seed, lead, live):
    plan, runner = _race_setup(batch)
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32)
    labels = np.argmax(score.outputs_of(plan, runner, "logits", w1), axis=1)
    # candidates: the weight with growing noise, and two identical ones (a tie that must go to the smaller K)
    cands = {k: (w1 + rng.normal(0, 0.1 * k, w1.shape)).astype(np.float32) for k in (3, 5, 9, 12)}
    cands[7] = cands[5].copy()
    exhaustive = {k: score.evaluate(plan, runner, "logits", a, labels, "top1").correct for k, a in cands.items()}
    winner = min(exhaustive, key=lambda k: (-exhaustive[k], k))
    seen = []
    out = score.best_first(plan, runner, "logits", cands, labels, "top1", lambda k, o: seen.append(k), lead=lead,
                           live_sessions=live)
    assert sorted(seen) == sorted(cands) and set(out) == set(cands)
    assert not out[winner].stopped_early and out[winner].correct == exhaustive[winner]
    for k, o in out.items():
        if o.stopped_early:  # provably not the winner: its upper bound loses to the winner's exact count
            assert o.correct + o.total - o.seen < exhaustive[winner] or (
                o.correct + o.total - o.seen == exhaustive[winner] and k > winner)
            assert o.seen < o.total
        else:
            assert o.correct == exhaustive[k] and o.seen == o.total
    assert out[7].stopped_early or exhaustive[7] == exhaustive[5]  # never a winner over its twin K=5


def test_best_first_stops_a_candidate_that_cannot_win_before_its_end():
    plan, runner = _race_setup(8)
    w1 = np.random.default_rng(3).normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32)
    labels = np.argmax(score.outputs_of(plan, runner, "logits", w1), axis=1)
    cands = {4: w1, 6: np.zeros_like(w1)}  # all-zero weights: one constant prediction, mostly wrong
    out = score.best_first(plan, runner, "logits", cands, labels, "top1")
    assert out[4].correct == 64 and not out[4].stopped_early
    assert out[6].stopped_early and out[6].seen < 64  # never ahead of the perfect K=4, so never run


class _CountingRunner(score.Runner):
    """Counts the sessions alive (created and not yet garbage-collected) and the most at once."""

    def __init__(self):
        super().__init__(["CPUExecutionProvider"])
        self.alive = self.most = self.created = 0

    def session(self, model):
        sess = super().session(model)
        self.alive += 1
        self.created += 1
        self.most = max(self.most, self.alive)
        weakref.finalize(sess, self._gone)
        return sess

    def _gone(self):
        self.alive -= 1


@pytest.mark.parametrize("live", [1, 3, 4, 20])
def test_best_first_keeps_at_most_live_sessions_open(live):
    plan, _ = _race_setup(8)
    runner = _CountingRunner()
    rng = np.random.default_rng(5)
    w1 = rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32)
    labels = np.argmax(score.outputs_of(plan, runner, "logits", w1), axis=1)
    cands = {k: (w1 + rng.normal(0, 0.05 * k, w1.shape)).astype(np.float32) for k in range(2, 14)}
    gc.collect()
    runner.most = runner.alive
    out = score.best_first(plan, runner, "logits", cands, labels, "top1", lead=16, live_sessions=live)
    gc.collect()
    assert runner.most <= min(live, len(cands)) and runner.alive == 0
    reference = score.best_first(plan, score.Runner(["CPUExecutionProvider"]), "logits", cands, labels, "top1",
                                 lead=16, live_sessions=len(cands))
    assert out == reference  # only cost depends on the number of open sessions
    with pytest.raises(ValueError, match="live_sessions"):
        score.best_first(plan, runner, "logits", cands, labels, "top1", live_sessions=0)


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_batch_slices_cover_everything(batch):
    sl = score.batch_slices(20, batch)
    assert sum(s.stop - s.start for s in sl) == 20 and sl[0].start == 0 and sl[-1].stop == 20
