"""Measuring networks and sensitivity entries for the budget and Pareto searches: as tasks of the search's executor
(local, or Ray), recorded in the run's journal as they land and taken from it on resume."""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

import numpy as np
import onnx

from axcnn import estimate, plans, score
from axcnn.model import weight_proto

if TYPE_CHECKING:
    from axcnn.search.sensitivity import Sensitivity


def measure_many(search: Sensitivity, models: list[onnx.ModelProto], verification
                 ) -> list[tuple[score.Count, dict | None]]:
    """Every network's count on the selection samples and its loss on the verification samples, the networks
    scored as independent tasks of the search's executor (each landing is recorded in the journal as it comes back,
    and what the journal holds is not scored again)."""
    x, y = search.ex.samples()
    cfg, io = search.cfg, search.io
    out: list = [None] * len(models)
    todo = []
    for i, m in enumerate(models):
        d = digest(m)
        c = search.recorded("network", (d, None))
        v = search.recorded("verification", (d,)) if verification is not None else None
        if c is not None and (verification is None or v is not None):
            mask = None if v is None else np.unpackbits(np.frombuffer(bytes.fromhex(v), np.uint8))[:len(search.ver_ref)]
            out[i] = (score.Count(*c), None if mask is None else score.paired_loss(search.ver_ref, mask > 0))
        else:
            todo.append(i)
    xv, yv = (None, None) if verification is None else verification

    def run(model_bytes: bytes) -> tuple[int, str | None]:
        from axcnn.executor import worker_runner

        runner = worker_runner(cfg.device)
        c = score.count_bounded(model_bytes, runner, io, x, y, cfg.metric, cfg.batch_size)
        if xv is None:
            return c.correct, None
        mask = score.correct_mask(model_bytes, runner, io, xv, yv, cfg.metric, cfg.batch_size)
        return c.correct, np.packbits(mask).tobytes().hex()

    t0 = time.perf_counter()
    for j, (right, hexmask) in search.executor.map(run, [models[i].SerializeToString() for i in todo]):
        i = todo[j]
        d = digest(models[i])
        c = score.Count(right, len(y), False)
        ver = None
        if search.journal is not None:
            search.journal.put("network", (d, None), [c.correct, c.seen, c.stopped])
            if hexmask is not None:
                search.journal.put("verification", (d,), hexmask)
        if hexmask is not None:
            mask = np.unpackbits(np.frombuffer(bytes.fromhex(hexmask), np.uint8))[:len(search.ver_ref)] > 0
            ver = score.paired_loss(search.ver_ref, mask)
        out[i] = (c, ver)
    spent = time.perf_counter() - t0
    search.scoring_s += spent
    search.times["measure"] += spent
    search.passes += len(todo) * (1 + (0 if xv is None else len(xv) / max(1, len(y))))
    return out


def digest(model: onnx.ModelProto) -> str:
    """A network's identity in the journal: the hash of its serialized bytes."""
    return hashlib.sha256(model.SerializeToString()).hexdigest()[:32]


def entry_runner(plan: plans.Plan, names: list[str], output: str, device: str, ref_logp: np.ndarray, kind: str,
                  y: np.ndarray, ref_correct: int, metric: str):
    """``run(arrays) -> (kl, loss_pp)``: one sensitivity entry, the layer's tensors set to ``arrays`` and the rest of
    the network run on the cached activations. A closure over plain data, so that an executor can ship it to its
    workers once per layer."""
    model_bytes = plan.model.SerializeToString()
    feeds, sizes, weight = plan.feeds, plan.sizes, plan.weight.name

    def run(arrays: dict[str, np.ndarray]) -> tuple[float, float]:
        from axcnn.executor import worker_runner

        model = onnx.load_from_string(model_bytes)
        local = plans.Plan(model, weight_proto(model, weight), feeds, sizes, "suffix")
        out = score.tensors_as_inputs(local, worker_runner(device), output, names)(arrays)
        kl = max(estimate.mean_kl(ref_logp, estimate.log_probs(out, kind)), 0.0)
        loss = 100.0 * (ref_correct - score.count_correct(out, y, metric)) / len(y)
        return float(kl), float(loss)

    return run


def verify(search: Sensitivity, model: onnx.ModelProto, verification) -> dict | None:
    if verification is None:
        return None
    x, y = verification
    ref = search.ver_ref
    key = (digest(model),)
    got = search.recorded("verification", key)
    if got is not None:
        return score.paired_loss(ref, np.unpackbits(np.frombuffer(bytes.fromhex(got), np.uint8))[:len(ref)] > 0)
    t0 = time.perf_counter()
    mask = score.correct_mask(model, search.runner, search.io, x, y, search.cfg.metric, search.cfg.batch_size)
    if search.journal is not None:
        search.journal.put("verification", key, np.packbits(mask).tobytes().hex())
    search.scoring_s += time.perf_counter() - t0
    search.times["verify"] += time.perf_counter() - t0
    return score.paired_loss(ref, mask)
