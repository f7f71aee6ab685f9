"""The Ray executor: a layer's candidate batches and independent entries scored on a Ray cluster.

What is shipped, per race (one layer): each batch of the plan's feeds (the cached activations at the layer) is put
into the object store once; so are the base model (serialized once) and each candidate's weight array. A task
names one batch of one candidate: it gets that batch's feed, the labels of the batch (inline, a few KB) and
references to the model and the weight, which a worker fetches only when it has no cached session for that
candidate yet. Per :meth:`RayExecutor.map` call, the function (and what it closes over) is put once.

Each task asks Ray for ``cpus_per_task`` CPUs, and for a GPU with ``device="cuda"`` when the cluster has one; the
worker then picks its onnxruntime providers itself, falling back to the CPU (as a local run does) when it has no
CUDA provider. A worker lost mid-task is retried by Ray (``max_retries``); tasks are pure, so a retry gives the same
count and the race the same result.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
import weakref
from collections.abc import Callable

import numpy as np

from axcnn import plans, score
from axcnn.errors import AxcnnError, MissingBackendError
from axcnn.executor import worker
from axcnn.executor.base import Executor
from axcnn.executor.race import RaceStats, parallel_all, parallel_best_first

log = logging.getLogger(__name__)

#: CPUs each task asks Ray for (its onnxruntime session uses as many threads)
CPUS_PER_TASK = 1
#: GPUs each task asks Ray for with --device cuda
GPUS_PER_TASK = 1
#: times Ray reruns a task whose worker died
MAX_RETRIES = 3
#: seconds to wait for a cluster address to answer before saying it cannot be reached
PROBE_TIMEOUT_S = 5.0
#: Ray addresses that name no host to probe
_NO_PROBE = (None, "auto", "local")


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise MissingBackendError("ray", "ray") from exc
    return ray


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise a one-line AxcnnError when nothing accepts a connection at ``address`` (``HOST:PORT`` or
    ``ray://HOST:PORT``) within ``timeout`` seconds. Ray itself would retry for minutes."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise AxcnnError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise AxcnnError(f"cannot reach the Ray cluster at {address}: {reason}") from exc


def _owner(a: np.ndarray) -> np.ndarray:
    """The array that owns the memory ``a`` views."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class RayExecutor(Executor):
    """Scoring tasks on Ray. ``address``: a running cluster (``HOST:PORT``, ``ray://HOST:PORT``, ``auto``); None
    starts a local Ray as ``ray.init()`` does (or joins the cluster ``RAY_ADDRESS`` names). A process already
    connected to Ray keeps its connection, and :meth:`close` leaves it open.

    ``num_cpus``, ``num_gpus``: CPUs and GPUs of a new local Ray started here (given with no address, they
    start one even where ``ray.init()`` would join a running cluster).
    ``before_task``: called on the worker at
    the start of every task (tests inject faults with it)."""

    name = "ray"

    def __init__(self, address: str | None = None, device: str = "cpu", *, cpus_per_task: int = CPUS_PER_TASK,
                 num_cpus: int | None = None, num_gpus: int | None = None, max_retries: int = MAX_RETRIES,
                 before_task: Callable[[], None] | None = None):
        if cpus_per_task < 1:
            raise ValueError(f"cpus_per_task={cpus_per_task!r} is invalid: allowed an integer >= 1")
        if max_retries < 0:
            raise ValueError(f"max_retries={max_retries!r} is invalid: allowed an integer >= 0")
        ray = import_ray()
        self._ray = ray
        self.address = address
        self.device = device
        self.cpus_per_task = cpus_per_task
        self.max_retries = max_retries
        self._hook = before_task
        self._started = False
        t0 = time.perf_counter()
        if address not in _NO_PROBE:
            probe(address)
        if ray.is_initialized():
            log.info("Ray: using this process's connection")
        else:
            kwargs: dict = {"log_to_driver": False, "logging_level": logging.ERROR}
            target = address
            if address is None and (num_cpus is not None or num_gpus is not None):
                target = "local"  # sizes are for a new local Ray, not for the cluster ray.init() might join
            if target == "local":
                kwargs.update(include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus)
            try:
                ray.init(address=target, **kwargs)
            except Exception as exc:
                where = f" at {address}" if address else ""
                hint = "" if address in _NO_PROBE else (
                    " (a cluster with token authentication also needs RAY_AUTH_MODE=token and its token here)")
                raise AxcnnError(f"cannot start or reach Ray{where}: {_first_line(exc)}{hint}") from exc
            self._started = True
        self._started_here = self._started
        self.init_s = time.perf_counter() - t0
        resources = ray.cluster_resources()
        self.cluster = {"CPU": float(resources.get("CPU", 0)), "GPU": float(resources.get("GPU", 0))}
        self.gpus_per_task = 0
        if device == "cuda":
            if self.cluster["GPU"] >= GPUS_PER_TASK:
                self.gpus_per_task = GPUS_PER_TASK
            else:
                log.warning("the Ray cluster has no GPU; scoring tasks run on CPUs")
        opts = {"num_cpus": cpus_per_task, "num_gpus": self.gpus_per_task, "max_retries": max_retries}
        self._score = ray.remote(worker.score_batch).options(**opts)
        self._call = ray.remote(worker.call).options(**opts)
        self.stats = RaceStats()
        self._staged: dict = {}  # the last race's feeds in the object store, by the memory they view
        self.puts = 0  # feeds put into the object store
        self.entries = 0
        self.task_s = 0.0
        self.providers: set[str] = set()  # the onnxruntime providers the workers' sessions used
        self._warned = False
        log.info("Ray: %g CPUs, %g GPUs; tasks of %d CPU(s), %d GPU(s) (connected in %.1f s)", self.cluster["CPU"],
                 self.cluster["GPU"], cpus_per_task, self.gpus_per_task, self.init_s)

    # -- helpers ---------------------------------------------------------------------------------------------
    def slots(self) -> int:
        """Tasks that can run at once on the cluster as it is now."""
        resources = self._ray.cluster_resources()
        if self.gpus_per_task:
            return max(1, int(resources.get("GPU", 0) // self.gpus_per_task))
        return max(1, int(resources.get("CPU", 0) // self.cpus_per_task))

    def _get(self, ref):
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the task raised: raise what it raised
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise AxcnnError(f"a Ray task failed: {_first_line(exc)}") from exc
        except ray.exceptions.RayError as exc:  # worker or node lost more often than retried, object lost, ...
            raise AxcnnError(f"a Ray task failed ({self.max_retries} retries): {_first_line(exc)}") from exc

    def _wait(self, pending: dict):
        ready, _ = self._ray.wait(list(pending), num_returns=1)
        return ready[0]

    def _stage(self, feeds: list[dict[str, np.ndarray]]) -> list:
        """Object references of the feeds, each put into the object store once. A feed whose arrays are the very
        memory of one of the previous race's feeds (a full plan's input batches are views of the same samples,
        layer after layer), while the arrays owning that memory are alive, keeps its object; the previous race's
        other objects are released. Only weak references to the arrays are kept, so the driver's memory is freed
        as before. Feeds are never written to in place (a plan's feeds are replaced, not modified), which is what
        makes the memory a valid key."""
        staged = {}
        refs = []
        for feed in feeds:
            key = tuple((name, a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)
                        for name, a in sorted(feed.items()))
            hit = staged.get(key) or self._staged.get(key)
            if hit is None or any(owner() is None for owner in hit[0]):
                hit = ([weakref.ref(_owner(a)) for a in feed.values()], self._ray.put(feed))
                self.puts += 1
            staged[key] = hit
            refs.append(hit[1])
        self._staged = staged
        return refs

    def _units(self, plan: plans.Plan, output: str, candidates: dict[int, np.ndarray], labels: np.ndarray,
               metric: str, capacity: int):
        """(submit, land) over this plan's batches: the plan's feeds, its model and the candidates' weights are put
        into the object store here, once."""
        ray = self._ray
        token = uuid.uuid4().hex
        feeds = self._stage(plan.feeds)
        model = ray.put(plan.model.SerializeToString())
        arrays = {k: ray.put(np.ascontiguousarray(a)) for k, a in candidates.items()}
        starts = np.cumsum([0, *plan.sizes])
        pending: dict = {}

        def submit(k: int, j: int) -> None:
            ref = self._score.remote(token, k, plan.weight.name, [model], [arrays[k]], output, metric, self.device,
                                     self.cpus_per_task, capacity, labels[starts[j]:starts[j + 1]],
                                     int(plan.sizes[j]), feeds[j], self._hook)
            pending[ref] = (k, j)

        def land() -> tuple[int, int, int]:
            ref = self._wait(pending)
            k, j = pending.pop(ref)
            correct, providers, seconds = self._get(ref)
            self.providers.update(providers)
            self.task_s += seconds
            return k, j, correct

        return submit, land

    # -- the interface ---------------------------------------------------------------------------------------
    def race(self, plan, runner, output, candidates, labels, metric, done=None, lead=0,
             live_sessions=score.LIVE_SESSIONS):
        if live_sessions < 1:
            raise ValueError(f"live_sessions must be at least 1, got {live_sessions}")
        submit, land = self._units(plan, output, candidates, labels, metric, live_sessions)
        out = parallel_best_first(list(candidates), plan.sizes, submit, land, self.slots(), done, lead, self.stats)
        self._check_providers()
        return out

    def score_all(self, plan, runner, output, candidates, labels, metric, done=None):
        submit, land = self._units(plan, output, candidates, labels, metric, score.LIVE_SESSIONS)
        out = parallel_all(list(candidates), plan.sizes, submit, land, self.slots(), done, self.stats)
        self._check_providers()
        return out

    def _check_providers(self) -> None:
        if self.device == "cuda" and self.providers and "CUDAExecutionProvider" not in self.providers \
                and not self._warned:
            log.warning("the Ray workers have no CUDA execution provider; they scored on the CPU")
            self._warned = True

    def map(self, fn, items):
        ray = self._ray
        fn_ref = ray.put(fn)  # once per call, whatever the number of items
        todo = iter(enumerate(items))
        window = 2 * self.slots()  # enough queued that no worker waits for the driver
        pending: dict = {}

        def submit() -> bool:
            nxt = next(todo, None)
            if nxt is None:
                return False
            ref = self._call.remote(fn_ref, nxt[0], nxt[1], self.cpus_per_task, self._hook)
            pending[ref] = nxt[0]
            return True

        while len(pending) < window and submit():
            pass
        while pending:
            ref = self._wait(pending)
            del pending[ref]
            index, result, seconds = self._get(ref)
            self.entries += 1
            self.task_s += seconds
            submit()
            yield index, result

    def describe(self) -> dict:
        return {
            "name": self.name,
            "address": self.address or os.environ.get("RAY_ADDRESS") or "local",
            "connected_by_run": self._started_here,  # it opened (and closed) its own Ray connection
            "cluster": dict(self.cluster),
            "task_resources": {"CPU": self.cpus_per_task, "GPU": self.gpus_per_task},
            "max_retries": self.max_retries,
            "worker_providers": sorted(self.providers),
            "batches_started": self.stats.started,
            "batches_read": self.stats.read,
            "feeds_put": self.puts,
            "entries": self.entries,
            "task_s": round(self.task_s, 3),
            "connect_s": round(self.init_s, 3),
        }

    def close(self) -> None:
        self._staged = {}
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False
