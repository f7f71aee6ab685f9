import numpy as np
import pytest
from conftest import tiny_cnn

from axcnn import score


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


def test_evaluate_stops_only_when_the_target_is_out_of_reach():
    model = tiny_cnn()
    x = np.random.default_rng(0).normal(size=(64, 1, 8, 8)).astype(np.float32)
    runner = score.Runner(["CPUExecutionProvider"])
    work = score.working_copy(model)
    from axcnn.model import io_info

    plan = score.full_plan(work, "w1", x, io_info(model), 8)
    w1 = np.zeros((8, 1, 3, 3), np.float32)
    labels = np.argmax(score.outputs_of(plan, runner, "logits", w1), axis=1)
    full = score.evaluate(plan, runner, "logits", w1, labels, "top1")
    assert (full.correct, full.seen, full.stopped_early) == (64, 64, False)
    wrong = (labels + 1) % 10
    out = score.evaluate(plan, runner, "logits", w1, wrong, "top1", need=60)
    assert out.stopped_early and out.seen == 8  # after one batch: 0 + 56 remaining < 60
    out = score.evaluate(plan, runner, "logits", w1, labels, "top1", need=64)
    assert not out.stopped_early and out.correct == 64


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_batch_slices_cover_everything(batch):
    sl = score.batch_slices(20, batch)
    assert sum(s.stop - s.start for s in sl) == 20 and sl[0].start == 0 and sl[-1].stop == 20
