"""The executor interface and the local executor (see :mod:`axcnn.executor`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

from axcnn import plans, score

T = TypeVar("T")
R = TypeVar("R")
Done = Callable[[int, score.Outcome], None]


class Executor:
    """The interface; :class:`LocalExecutor` is today's behaviour, exactly."""

    name = "base"

    def race(self, plan: plans.Plan, runner: score.Runner, output: str, candidates: dict[int, np.ndarray],
             labels: np.ndarray, metric: str, done: Done | None = None, lead: int = 0,
             live_sessions: int = score.LIVE_SESSIONS) -> dict[int, score.Outcome]:
        """``score.best_first``: score ``candidates`` ({K: weight}) on ``plan`` far enough to know the winner under
        the greedy rule, with the same exact early stops; ``done(k, outcome)`` as each candidate finishes or stops.
        Returns the same outcomes as ``score.best_first`` on every executor."""
        raise NotImplementedError

    def score_all(self, plan: plans.Plan, runner: score.Runner, output: str, candidates: dict[int, np.ndarray],
                  labels: np.ndarray, metric: str, done: Done | None = None) -> dict[int, score.Outcome]:
        """Every candidate over every sample (``score.evaluate`` for each), ``done(k, outcome)`` as each ends."""
        raise NotImplementedError

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[int, R]]:
        """``(index, fn(item))`` for every item, as each lands (in any order on a cluster). ``fn`` must be
        picklable by cloudpickle (a module-level function, or a closure over plain data); it and what it closes
        over are shipped once per call, not once per item. Inside ``fn``, get an onnxruntime runner with
        ``axcnn.executor.worker_runner(device)``. An exception raised by ``fn`` is raised here."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the report records about the executor (its name, and for a cluster what ran there)."""
        return {"name": self.name}

    def close(self) -> None:
        """Release what the executor started (a local Ray instance it started is shut down)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalExecutor(Executor):
    """Everything in this process, one task after the other: ``score.best_first`` itself."""

    name = "local"

    def race(self, plan, runner, output, candidates, labels, metric, done=None, lead=0,
             live_sessions=score.LIVE_SESSIONS):
        return score.best_first(plan, runner, output, candidates, labels, metric, done, lead=lead,
                                live_sessions=live_sessions)

    def score_all(self, plan, runner, output, candidates, labels, metric, done=None):
        outcomes = {}
        for k, array in candidates.items():
            outcomes[k] = score.evaluate(plan, runner, output, array, labels, metric)
            if done is not None:
                done(k, outcomes[k])
        return outcomes

    def map(self, fn, items):
        for i, item in enumerate(items):
            yield i, fn(item)
