"""A paper-faithful greedy weight-sharing search, written independently of axcnn's scoring code.

This is the reference the benchmark compares axcnn against (Dupuis et al., Algorithm 2 with the inertia metric):

for each layer in topological order
    cluster its weights for every K in [kmin, kmax],
    rank the candidates by k-means inertia (lowest first, ties to the smaller K),
    score the best ``filter`` fraction: for each candidate, a FRESH onnxruntime session of the WHOLE model with
        that layer replaced, run over the WHOLE scoring set (no activation cache, no early stop),
    keep the candidate with the highest accuracy (ties to the smaller K), fix it in the network, next layer.

Only the data preparation, the layer inventory and the clustering (``axcnn.cluster.cluster_range``, with any
backend) come from axcnn; scoring is plain onnx + onnxruntime.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from axcnn.cluster import cluster_range, compression_ratio, eq1_bits
from axcnn.model import LayerSpec, constant_tensors


@dataclass(frozen=True)
class BaselineLayer:
    name: str
    weights: int
    bits: int
    k: int  # chosen effective K
    correct: int  # correct predictions of the network with this layer (and the previous ones) fixed
    scored: tuple[tuple[int, int], ...]  # (K, correct) of every scored candidate, in scoring order
    clustering_s: float
    scoring_s: float


@dataclass(frozen=True)
class BaselineResult:
    layers: tuple[BaselineLayer, ...]
    skipped: tuple[str, ...]
    final_correct: int  # one more full pass of the final network
    samples: int
    clustering_s: float
    scoring_s: float
    final_s: float
    wall_s: float
    model: onnx.ModelProto

    @property
    def candidates_scored(self) -> int:
        return sum(len(layer.scored) for layer in self.layers)

    @property
    def compression_ratio(self) -> float:
        """Eq. 1 over the shared layers: original bits / (indices + centroids)."""
        before = sum(layer.weights * layer.bits for layer in self.layers)
        after = sum(eq1_bits(layer.weights, layer.k, layer.bits) for layer in self.layers)
        return before / after

    @property
    def ks(self) -> dict[str, int]:
        return {layer.name: layer.k for layer in self.layers}


def session_options() -> ort.SessionOptions:
    """onnxruntime defaults (all graph optimisations, default thread pools), quiet."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return so


def without_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose initializers are not graph inputs, so that onnxruntime may treat them as constants."""
    out = copy.deepcopy(model)
    inits = {t.name for t in out.graph.initializer}
    keep = [i for i in out.graph.input if i.name not in inits]
    if len(keep) != len(out.graph.input):
        del out.graph.input[:]
        out.graph.input.extend(keep)
        out.ir_version = max(out.ir_version, 4)
    return out


def count_correct(model_bytes: bytes, x: np.ndarray, y: np.ndarray, input_name: str, output_name: str,
                  batch: int) -> int:
    """Top-1 correct predictions of a fresh session of the model over all of ``x``."""
    sess = ort.InferenceSession(model_bytes, session_options(), providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(0, len(x), batch):
        out = sess.run([output_name], {input_name: x[i:i + batch]})[0]
        correct += int(np.sum(np.argmax(out.reshape(len(out), -1), axis=1) == y[i:i + batch]))
    return correct


def candidates_to_score(n: int, fraction: float) -> int:
    """The best ``fraction`` of ``n`` candidates, rounded up, at least one (as in the paper's Algorithm 2)."""
    return max(1, min(n, math.ceil(fraction * n - 1e-9)))


def paper_dse(model: onnx.ModelProto, layers: list[LayerSpec], x: np.ndarray, y: np.ndarray, *, kmin: int,
              kmax: int, fraction: float, backend: str, input_name: str, output_name: str, batch: int,
              seed: int = 0, progress: Callable[[str], None] | None = None) -> BaselineResult:
    """Greedy layer-by-layer search; see the module docstring. ``batch`` is the onnxruntime batch size."""
    t_start = time.perf_counter()
    say = progress or (lambda msg: None)
    current = without_initializer_inputs(model)
    tensors = {name: t for name, (t, _) in constant_tensors(current).items()}
    done: list[BaselineLayer] = []
    skipped: list[str] = []
    clustering_total = scoring_total = 0.0
    for i, spec in enumerate(layers):
        t0 = time.perf_counter()
        table = cluster_range(spec.array, kmin, kmax, backend=backend, seed=seed)
        ks = [k for k in table.ks if compression_ratio(spec.weights, k, spec.bits) > 1.0]
        order = sorted(ks, key=lambda k: (table.inertia(k), k))
        chosen = order[:candidates_to_score(len(order), fraction)] if order else []
        clustering_s = time.perf_counter() - t0
        clustering_total += clustering_s
        if not chosen:
            skipped.append(spec.name)
            continue
        proto = tensors[spec.name]
        t1 = time.perf_counter()
        scored: list[tuple[int, int]] = []
        best_k, best_correct, best_dense = -1, -1, None
        for k in chosen:
            c = table.get(k)
            dense = np.ascontiguousarray(c.centroids.astype(spec.dtype)[c.indices])
            proto.CopyFrom(numpy_helper.from_array(dense, spec.name))
            correct = count_correct(current.SerializeToString(), x, y, input_name, output_name, batch)
            scored.append((k, correct))
            if correct > best_correct or (correct == best_correct and k < best_k):
                best_k, best_correct, best_dense = k, correct, dense
        scoring_s = time.perf_counter() - t1
        scoring_total += scoring_s
        proto.CopyFrom(numpy_helper.from_array(best_dense, spec.name))  # fix the layer
        done.append(BaselineLayer(spec.name, spec.weights, spec.bits, best_k, best_correct, tuple(scored),
                                  clustering_s, scoring_s))
        say(f"  [{backend} baseline] layer {i + 1}/{len(layers)} {spec.name}: K={best_k} "
            f"({best_correct}/{len(y)} correct, {len(scored)} candidates, {scoring_s:.1f}s)")
    t2 = time.perf_counter()
    final_correct = count_correct(current.SerializeToString(), x, y, input_name, output_name, batch)
    final_s = time.perf_counter() - t2
    return BaselineResult(tuple(done), tuple(skipped), final_correct, len(y), clustering_total, scoring_total,
                          final_s, time.perf_counter() - t_start, current)
