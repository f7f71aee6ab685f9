"""Where scoring tasks run: in this process (``local``, the default) or on a Ray cluster (``ray``).

Search strategies hand their scoring work to an :class:`Executor` and never ask where it runs. Two kinds of work:

- :meth:`Executor.race`: the best-first race of a layer's candidates (``score.best_first``'s signature and
  result: the winner, every count and every early stop are the same on every executor);
- :meth:`Executor.map`: independent entries (a sensitivity table's cells, the points of a front), yielded as they
  land, each with its index, so a journal can record them as they come back.

An executor is a context manager; :func:`make_executor` builds the one a :class:`~axcnn.config.CompressConfig`
asks for.
"""

from __future__ import annotations

from axcnn.executor.base import Executor, LocalExecutor
from axcnn.executor.ray_backend import RayExecutor
from axcnn.executor.worker import worker_runner

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "make_executor", "worker_runner"]


def make_executor(config) -> Executor:
    """The executor ``config.executor`` names (``config.ray_address`` and ``config.device`` for Ray)."""
    if config.executor == "ray":
        return RayExecutor(address=config.ray_address, device=config.device)
    return LocalExecutor()
