"""Accuracy estimators that rank a layer's candidates before any of them is fully scored.

``inertia`` is the paper's metric (Algorithm 2): k-means within-cluster sum of squares. ``kl`` is the mean
Kullback-Leibler divergence from the uncompressed model's output distribution to the candidate's, on a small
calibration subset.
"""

from __future__ import annotations

import numpy as np


def output_kind(outputs: np.ndarray) -> str:
    """Whether a classifier emits ``probs``, ``logprobs`` or ``logits`` (judged on reference outputs)."""
    flat = outputs.reshape(outputs.shape[0], -1).astype(np.float64)
    if np.all(flat >= 0) and np.allclose(flat.sum(axis=1), 1.0, atol=1e-3):
        return "probs"
    if np.all(flat <= 0) and np.allclose(np.exp(flat).sum(axis=1), 1.0, atol=1e-3):
        return "logprobs"
    return "logits"


def log_probs(outputs: np.ndarray, kind: str) -> np.ndarray:
    """Row-wise log-probabilities (float64) of classifier outputs of the given kind."""
    flat = outputs.reshape(outputs.shape[0], -1).astype(np.float64)
    if kind == "probs":
        return np.log(np.clip(flat, 1e-12, None))
    if kind == "logprobs":
        return flat
    shifted = flat - flat.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def mean_kl(reference_logp: np.ndarray, candidate_logp: np.ndarray) -> float:
    """Mean over samples of KL(reference || candidate), in nats."""
    p = np.exp(reference_logp)
    return float(np.mean(np.sum(p * (reference_logp - candidate_logp), axis=1)))


def rank(estimates: dict[int, float]) -> list[int]:
    """Candidate Ks best first: lowest estimate, ties towards smaller K."""
    return sorted(estimates, key=lambda k: (estimates[k], k))
