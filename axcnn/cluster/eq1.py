"""Bit counts of Eq. 1 of Dupuis et al., generalised to several codebooks and to vector codebook entries.

A weight-shared layer stores one ``ceil(log2 K)``-bit index per *vector* (a vector is one weight when
``vector_dim == 1``) plus ``codebooks`` codebooks of ``K`` entries, each entry ``vector_dim`` values of
``bits`` bits::

    eq1_bits = n_vectors * ceil(log2 K) + codebooks * K * vector_dim * bits

With the defaults (one codebook, scalar entries) this is the paper's Eq. 1 denominator.
"""

from __future__ import annotations

import operator

import numpy as np

__all__ = ["compression_ratio", "eq1_bits", "index_bits", "index_dtype"]


def index_bits(k: int) -> int:
    """Bits of one cluster index for ``k`` centroids: ``ceil(log2 k)``, and 0 when ``k == 1``.

    Raises :class:`ValueError` when ``k < 1``.
    """
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return (k - 1).bit_length()


def _count(name: str, v: object, minimum: int) -> int:
    try:
        v = operator.index(v)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def eq1_bits(
    weights: int,
    k: int,
    bits: int,
    *,
    codebooks: int = 1,
    vector_dim: int = 1,
    vectors: int | None = None,
) -> int:
    """Storage of a weight-shared layer in bits (denominator of Eq. 1 of Dupuis et al.).

    ``vectors * index_bits(k) + codebooks * k * vector_dim * bits``.

    Args:
        weights: number of weights of the layer.
        k: entries per codebook.
        bits: bits of one stored value (of the original weights and of the codebook entries).
        codebooks: number of codebooks (1 per layer; one per channel group or per kernel with finer
            granularities).
        vector_dim: values per codebook entry (1 = scalar sharing).
        vectors: number of indices stored; default ``ceil(weights / vector_dim)``.  Pass it when vectors are
            padded per row (e.g. an odd input-channel count split into pairs:
            :func:`axcnn.cluster.vq.n_vectors`).

    With the defaults this is ``weights * index_bits(k) + k * bits``, the paper's figure.
    """
    weights = _count("weights", weights, 0)
    bits = _count("bits", bits, 1)
    codebooks = _count("codebooks", codebooks, 1)
    vector_dim = _count("vector_dim", vector_dim, 1)
    if vectors is None:
        vectors = -(-weights // vector_dim)
    else:
        vectors = _count("vectors", vectors, 0)
        if vectors * vector_dim < weights:
            raise ValueError(
                f"vectors must be >= ceil(weights / vector_dim) = {-(-weights // vector_dim)}, got {vectors}"
            )
    return vectors * index_bits(k) + codebooks * k * vector_dim * bits


def compression_ratio(
    weights: int,
    k: int,
    bits: int,
    *,
    codebooks: int = 1,
    vector_dim: int = 1,
    vectors: int | None = None,
) -> float:
    """Compression ratio of Eq. 1: original size ``weights * bits`` over :func:`eq1_bits` (same arguments)."""
    stored = eq1_bits(weights, k, bits, codebooks=codebooks, vector_dim=vector_dim, vectors=vectors)
    return weights * bits / stored


def index_dtype(k: int) -> np.dtype:
    """Smallest index dtype for ``k`` clusters: uint8 up to 256, uint16 up to 65536, else int32."""
    if k <= 1 << 8:
        return np.dtype(np.uint8)
    if k <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)
