"""The Ray executor on a local Ray of 2 CPUs (and one logical GPU, to exercise the CUDA request and the workers'
CPU fallback: no machine here has a GPU). Ray is started once for the module, by the executor itself, and shut
down at the end; every other executor here joins that instance."""

from __future__ import annotations

import functools
import os
import signal
import socket
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import tiny_cnn, tiny_data
from test_executor import _tiny_plan

from axcnn import plans, score
from axcnn.api import compress
from axcnn.config import CompressConfig
from axcnn.errors import AxcnnError
from axcnn.executor import LocalExecutor, RayExecutor

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_ex():
    # this module's functions (fault hooks, map functions) go to the workers by value: tests/ is not on their path
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ex = RayExecutor(num_cpus=2, num_gpus=1)
    assert ex.describe()["connected_by_run"] and ex.slots() == 2
    yield ex
    ex.close()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert not ray.is_initialized()  # no Ray left running behind the tests


def _kill_once(marker: str) -> None:
    """Kill this worker process the first time any task runs (the marker file says it happened)."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def _local(plan, runner, cands, labels, lead):
    log = []
    out = score.best_first(plan, runner, "logits", cands, labels, "top1", lambda k, o: log.append((k, o)), lead=lead)
    return out, log


@pytest.mark.parametrize(("batch", "lead"), [(8, 0), (8, 16), (64, 0), (5, 23)])
def test_race_on_ray_is_the_local_race(ray_ex, batch, lead):
    plan, runner, cands, labels = _tiny_plan(batch)
    expected, expected_log = _local(plan, runner, cands, labels, lead)
    log = []
    got = ray_ex.race(plan, runner, "logits", cands, labels, "top1", lambda k, o: log.append((k, o)), lead=lead)
    assert got == expected and log == expected_log  # counts, samples seen, early stops and the journal's order
    assert any(o.stopped_early for o in got.values()) or batch == 64


def test_score_all_on_ray_is_evaluate(ray_ex):
    plan, runner, cands, labels = _tiny_plan(16)
    seen = []
    got = ray_ex.score_all(plan, runner, "logits", cands, labels, "top1", lambda k, o: seen.append(k))
    assert got == LocalExecutor().score_all(plan, runner, "logits", cands, labels, "top1")
    assert sorted(seen) == sorted(cands)


def test_a_layers_activations_go_into_the_object_store_once(ray_ex, monkeypatch):
    plan, runner, cands, labels = _tiny_plan(8)
    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(value) or real_put(value, **kw))
    before = ray_ex.stats.started
    ray_ex.race(plan, runner, "logits", cands, labels, "top1", lead=16)
    tasks = ray_ex.stats.started - before
    feeds = [p for p in puts if isinstance(p, dict)]
    assert len(feeds) == len(plan.feeds) and all(a is b for a, b in zip(feeds, plan.feeds, strict=True))
    assert len(puts) == len(plan.feeds) + 1 + len(cands)  # each batch, the model, each candidate's weight: once
    assert tasks > len(puts)  # many more tasks than objects put


def test_full_plans_over_the_same_samples_share_their_objects(ray_ex):
    """Layer after layer, a full plan's feeds are views of the same input samples: put once for the run."""
    from axcnn.model import io_info

    plan, runner, cands, labels = _tiny_plan(8)
    x = np.concatenate([f["x"] for f in plan.feeds])
    io = io_info(tiny_cnn())
    first = plans.full_plan(plan.model, "w1", x, io, 8)
    second = plans.full_plan(plan.model, "w2", x, io, 8)  # another layer, the same samples
    puts = ray_ex.puts
    ray_ex.race(first, runner, "logits", cands, labels, "top1")
    assert ray_ex.puts == puts + len(first.feeds)
    w2 = {k: np.asarray(onnx.numpy_helper.to_array(second.weight)) * (1 + 0.01 * k) for k in (2, 3)}
    got = ray_ex.race(second, runner, "logits", w2, labels, "top1")
    assert ray_ex.puts == puts + len(first.feeds)  # nothing put again
    assert got == score.best_first(second, runner, "logits", w2, labels, "top1")
    del x, first, second, plan
    third, *_ = _tiny_plan(8)  # other samples: put
    ray_ex.race(third, runner, "logits", cands, labels, "top1")
    assert ray_ex.puts == puts + 2 * len(third.feeds)


def test_map_yields_every_entry_with_its_index_as_it_lands(ray_ex, monkeypatch):
    table = np.arange(1000.0)  # what the function closes over is shipped once, not once per entry
    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(value) or real_put(value, **kw))
    got = list(ray_ex.map(lambda i: float(table[i] * 2), [5, 7, 999, 0, 3]))
    assert sorted(got) == [(0, 10.0), (1, 14.0), (2, 1998.0), (3, 0.0), (4, 6.0)]
    assert len(puts) == 1


def _fail_on_three(v):
    if v == 3:
        raise AxcnnError("entry 3 is bad")
    return v


def test_map_raises_what_the_function_raised(ray_ex):
    with pytest.raises(AxcnnError, match="^entry 3 is bad$"):
        list(ray_ex.map(_fail_on_three, [1, 2, 3, 4]))


def test_a_worker_killed_during_scoring_is_retried_and_the_run_chooses_the_same(ray_ex, tmp_path):
    """A whole greedy run (every layer's race) on Ray, where the first task kills its worker process: Ray reruns
    the task and the run makes the local run's choices with the local run's counts."""
    from axcnn.explore import Explorer
    from axcnn.model import inventory, io_info
    from axcnn.search.greedy import greedy

    model = tiny_cnn(seed=3)
    x, y = tiny_data(model, n=96)
    cfg = CompressConfig(kmin=2, kmax=12, filter=0.5, min_weights=16, batch_size=16)
    io = io_info(model)
    layers, _ = inventory(model, cfg.min_weights)
    providers = ["CPUExecutionProvider"]
    local = greedy(Explorer(model, io, x, y, cfg, providers), layers)
    marker = tmp_path / "killed"
    faulty = RayExecutor(before_task=functools.partial(_kill_once, str(marker)))
    remote = greedy(Explorer(model, io, x, y, cfg, providers, executor=faulty), layers)
    assert marker.exists()  # a worker did die
    assert [(d.spec.name, d.chosen) for d in remote.decisions] == [(d.spec.name, d.chosen) for d in local.decisions]
    assert [d.candidates for d in remote.decisions] == [d.candidates for d in local.decisions]


def test_a_worker_killed_during_map_is_retried(ray_ex, tmp_path):
    marker = tmp_path / "killed"
    ex = RayExecutor(before_task=functools.partial(_kill_once, str(marker)))
    assert sorted(ex.map(lambda v: v + 1, range(4))) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert marker.exists()


def test_cuda_asks_ray_for_a_gpu_and_workers_fall_back_to_the_cpu(ray_ex, caplog):
    plan, runner, cands, labels = _tiny_plan(8)
    ex = RayExecutor(device="cuda")
    assert ex.describe()["task_resources"] == {"CPU": 1, "GPU": 1}
    with caplog.at_level("WARNING", logger="axcnn"):
        got = ex.race(plan, runner, "logits", cands, labels, "top1", lead=16)
    assert got == score.best_first(plan, runner, "logits", cands, labels, "top1", lead=16)
    assert ex.describe()["worker_providers"] == ["CPUExecutionProvider"]
    assert "no CUDA execution provider" in caplog.text


def test_cuda_on_a_cluster_without_gpus_runs_cpu_tasks(ray_ex, monkeypatch, caplog):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with caplog.at_level("WARNING", logger="axcnn"):
        ex = RayExecutor(device="cuda")
    assert ex.gpus_per_task == 0 and "has no GPU" in caplog.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_unreachable_cluster_is_a_one_line_error(ray_ex, address):
    address = address.format(port=_free_port())
    with pytest.raises(AxcnnError, match=f"^cannot reach the Ray cluster at {address}: .+$"):
        RayExecutor(address=address)


def test_a_malformed_address_is_a_one_line_error(ray_ex):
    with pytest.raises(AxcnnError, match="is not HOST:PORT"):
        RayExecutor(address="no-port-here")


def test_cli_unreachable_cluster_exit_1_one_line_nothing_written(ray_ex, tiny_files, tmp_path):
    from axcnn.cli import main

    mp, dp = tiny_files
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(main, ["compress", str(mp), "--data", str(dp), "-o", str(out), "--executor", "ray",
                                    "--ray-address", f"127.0.0.1:{_free_port()}", "-q"])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Ray cluster at 127.0.0.1:")
    assert not out.exists()


def test_compress_on_ray_makes_the_local_choices_and_the_report_says_ray(ray_ex, tmp_path):
    model = tiny_cnn(seed=7)
    x, y = tiny_data(model, n=64)
    mp, dp = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(model, mp)
    np.savez(dp, x=x, y=y)
    base = dict(kmin=2, kmax=10, filter=0.34, min_weights=16, batch_size=16)
    local = compress(mp, dp, tmp_path / "l.onnx", None, CompressConfig(**base)).report
    remote = compress(mp, dp, tmp_path / "r.onnx", None, CompressConfig(executor="ray", **base)).report
    assert [(la["name"], la["k"], la["score"]) for la in remote["layers"]] == [
        (la["name"], la["k"], la["score"]) for la in local["layers"]]
    assert [la["candidates"] for la in remote["layers"]] == [la["candidates"] for la in local["layers"]]
    assert remote["final_score"] == local["final_score"]
    assert local["tool"]["executor"] == {"name": "local"} and local["settings"]["executor"] == "local"
    ex = remote["tool"]["executor"]
    assert remote["settings"]["executor"] == "ray" and ex["name"] == "ray" and not ex["connected_by_run"]
    assert ex["batches_read"] > 0 and ex["worker_providers"] == ["CPUExecutionProvider"]
    assert ray.is_initialized()  # a connection the run did not open is left open


def test_budget_and_pareto_on_ray_measure_what_local_runs_measure(ray_ex, tmp_path):
    """The sensitivity entries and the Pareto front's networks run as Ray tasks; the table, the choices and the
    written bytes are those of a local run."""
    model = tiny_cnn(seed=7)
    x, y = tiny_data(model, n=160, noise=0.05)
    mp, dp = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(model, mp)
    np.savez(dp, x=x, y=y)
    base = dict(kmin=2, kmax=64, min_weights=16, batch_size=32, calib=48)
    for name, mode in (("budget", dict(max_loss=20.0)), ("pareto", dict(pareto=True, beam=3, pick="loss:20"))):
        local = compress(mp, dp, tmp_path / f"{name}_l.onnx", None, CompressConfig(**base, **mode)).report
        remote = compress(mp, dp, tmp_path / f"{name}_r.onnx", None,
                          CompressConfig(executor="ray", **base, **mode)).report
        assert remote["sensitivity"] == local["sensitivity"]
        assert [la["k"] for la in remote["layers"]] == [la["k"] for la in local["layers"]]
        # the files differ only in the settings they record (the executor)
        weights = [{t.name: t.SerializeToString() for t in onnx.load(str(tmp_path / f"{name}_{w}.onnx")).graph
                    .initializer} for w in "lr"]
        assert weights[0] == weights[1]
        assert remote["tool"]["executor"]["name"] == "ray"
