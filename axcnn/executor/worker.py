"""What a scoring task does where it runs (a Ray worker process, or this process): one runner per process and a
few cached onnxruntime sessions, so that a worker that gets the next batch of the same candidate does not build
its session again.

Nothing here imports Ray at module level; a value that is still a Ray object reference is fetched only when the
cache misses (the base model and the candidate weight are passed by reference for that reason).
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from axcnn import plans, score
from axcnn.model import weight_proto

#: models (parsed base suffix models) kept per worker process, by race token
BASE_MODELS = 2

_runners: dict[tuple[str, int | None], score.Runner] = {}
_sessions: OrderedDict[tuple[str, int], Any] = OrderedDict()
_bases: OrderedDict[str, onnx.ModelProto] = OrderedDict()
_threads: int | None = None  # onnxruntime threads for runners made in this task (the CPUs Ray gave it)


def worker_runner(device: str, threads: int | None = None) -> score.Runner:
    """The process's runner for ``device`` (providers chosen here, by ``score.select_providers``: a worker without
    CUDA falls back to the CPU as a local run does). ``threads``: onnxruntime's intra-op threads; by default the CPUs
    the current task was given on Ray, else onnxruntime's own default (every core)."""
    threads = threads if threads is not None else _threads
    key = (device, threads)
    runner = _runners.get(key)
    if runner is None:
        runner = score.Runner(score.select_providers(device))
        if threads is not None:
            runner._options.intra_op_num_threads = threads  # a Ray task gets a share of the node's cores
        _runners[key] = runner
    return runner


def _resolve(value):
    ray = sys.modules.get("ray")  # a Ray object reference can only come from a process that imported Ray
    if ray is not None and isinstance(value, ray.ObjectRef):
        return ray.get(value)
    return value


def candidate_session(runner: score.Runner, token: str, k: int, weight: str, model_box: list, array_box: list,
                      capacity: int):
    """The session of candidate ``k`` of race ``token``: the base model with ``weight`` set to the candidate's
    array, serialized as ``Plan.serialize_with`` does for the local race (so the same bytes reach onnxruntime).
    At most ``capacity`` sessions stay cached (least recently used first out)."""
    key = (token, k)
    sess = _sessions.get(key)
    if sess is not None:
        _sessions.move_to_end(key)
        return sess
    base = _bases.get(token)
    if base is None:
        base = onnx.load_from_string(_resolve(model_box[0]))
        _bases[token] = base
        while len(_bases) > BASE_MODELS:
            _bases.popitem(last=False)
    else:
        _bases.move_to_end(token)
    plan = plans.Plan(base, weight_proto(base, weight), [], [], "suffix")
    sess = runner.session(plan.serialize_with(_resolve(array_box[0])))
    _sessions[key] = sess
    while len(_sessions) > capacity:
        _sessions.popitem(last=False)
    return sess


def score_batch(token: str, k: int, weight: str, model_box: list, array_box: list, output: str, metric: str,
                device: str, threads: int | None, capacity: int, labels: np.ndarray, size: int,
                feed: dict[str, np.ndarray], hook: Callable[[], None] | None = None) -> tuple[int, tuple, float]:
    """Correct predictions of candidate ``k`` on one batch: (count, providers used, seconds)."""
    global _threads
    _threads = threads
    if hook is not None:
        hook()
    t0 = time.perf_counter()
    runner = worker_runner(device, threads)
    sess = candidate_session(runner, token, k, weight, model_box, array_box, capacity)
    out = runner.run(sess, output, feed)[:size]
    correct = score.count_correct(out, labels, metric)
    return correct, tuple(sess.get_providers()), time.perf_counter() - t0


def call(fn: Callable[[Any], Any], index: int, item: Any, threads: int | None,
         hook: Callable[[], None] | None = None) -> tuple[int, Any, float]:
    """One entry of ``Executor.map``: (index, fn(item), seconds)."""
    global _threads
    _threads = threads
    if hook is not None:
        hook()
    t0 = time.perf_counter()
    result = fn(item)
    return index, result, time.perf_counter() - t0


def clear() -> None:
    """Drop the cached sessions, models and runners of this process."""
    _sessions.clear()
    _bases.clear()
    _runners.clear()
