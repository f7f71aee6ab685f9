"""Options for a compression run, as one frozen dataclass validated at construction.

This is the single source of defaults: the CLI passes on only the options the user set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

ESTIMATORS = ("inertia", "kl")
METRICS = ("top1", "top5", "agreement")
KMEANS_BACKENDS = ("exact", "faiss", "sklearn")
DEVICES = ("auto", "cpu", "cuda")


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is invalid: allowed {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CompressConfig:
    """Settings of one ``compress`` run.

    kmin, kmax   range of cluster counts K explored per layer (1 <= kmin <= kmax <= 65536)
    filter       fraction of a layer's candidates fully scored, best first by the estimator (0 < filter <= 1);
                 1.0 is the paper's Algorithm 1, smaller values its Algorithm 2
    estimator    what ranks candidates before scoring: k-means ``inertia`` (the paper) or output ``kl``
    calib        calibration samples for the ``kl`` estimator
    metric       ``top1``/``top5`` against labels, or ``agreement`` with the uncompressed model's top-1
    kmeans       clustering backend: ``exact`` optimal 1-D k-means, ``faiss`` or ``sklearn`` (Lloyd)
    device       ``auto`` uses CUDA for onnxruntime and faiss when present, else the CPU
    seed         seeds subsets, calibration draws and Lloyd backends
    limit        score on a seeded, label-stratified subset of this many samples (None: all)
    batch_size   samples per onnxruntime call (a model with a fixed batch dimension uses that instead)
    min_weights  tensors with fewer weights are left dense
    cache_mb     memory budget for cached activations used by suffix scoring; above it, full-network scoring
    fast_scoring run only the part of the network after the explored layer, on activations cached per layer
    early_stop   order samples hardest first and race candidates best-first, stopping each once it provably
                 cannot beat one scored in full
    """

    kmin: int = 40
    kmax: int = 80
    filter: float = 0.15
    estimator: str = "inertia"
    calib: int = 256
    metric: str = "top1"
    kmeans: str = "exact"
    device: str = "auto"
    seed: int = 0
    limit: int | None = None
    batch_size: int = 256
    min_weights: int = 64
    cache_mb: int = 2048
    fast_scoring: bool = True
    early_stop: bool = True

    def __post_init__(self) -> None:
        _require(_is_int(self.kmin) and 1 <= self.kmin <= 65536, "kmin", self.kmin, "an integer in [1, 65536]")
        _require(_is_int(self.kmax) and 1 <= self.kmax <= 65536, "kmax", self.kmax, "an integer in [1, 65536]")
        _require(self.kmin <= self.kmax, "kmin", self.kmin, f"at most kmax ({self.kmax})")
        _require(
            isinstance(self.filter, (int, float)) and not isinstance(self.filter, bool)
            and math.isfinite(self.filter) and 0 < self.filter <= 1,
            "filter", self.filter, "a fraction in (0, 1]",
        )
        _require(self.estimator in ESTIMATORS, "estimator", self.estimator, " | ".join(ESTIMATORS))
        _require(_is_int(self.calib) and self.calib >= 1, "calib", self.calib, "an integer >= 1")
        _require(self.metric in METRICS, "metric", self.metric, " | ".join(METRICS))
        _require(self.kmeans in KMEANS_BACKENDS, "kmeans", self.kmeans, " | ".join(KMEANS_BACKENDS))
        _require(self.device in DEVICES, "device", self.device, " | ".join(DEVICES))
        _require(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _require(self.limit is None or (_is_int(self.limit) and self.limit >= 1), "limit", self.limit,
                 "None or an integer >= 1")
        _require(_is_int(self.batch_size) and self.batch_size >= 1, "batch_size", self.batch_size,
                 "an integer >= 1")
        _require(_is_int(self.min_weights) and self.min_weights >= 1, "min_weights", self.min_weights,
                 "an integer >= 1")
        _require(_is_int(self.cache_mb) and self.cache_mb >= 0, "cache_mb", self.cache_mb, "an integer >= 0")
        _require(isinstance(self.fast_scoring, bool), "fast_scoring", self.fast_scoring, "True or False")
        _require(isinstance(self.early_stop, bool), "early_stop", self.early_stop, "True or False")

    def candidates_to_score(self, n_candidates: int) -> int:
        """How many of a layer's ``n_candidates`` get fully scored: the best ``filter`` fraction, at least one."""
        return max(1, min(n_candidates, math.ceil(self.filter * n_candidates - 1e-9)))

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
