"""Weight clustering (weight sharing) and the bit-count arithmetic of Dupuis et al. — array code, no ONNX.

Submodules:

- :mod:`axcnn.cluster.scalar`: one codebook per layer, scalar entries; exact (optimal) 1-D k-means of one
  array for every ``K`` of a range, optionally weighted per value (:func:`cluster_range`).
- :mod:`axcnn.cluster.groups`: one codebook per channel group or per kernel (:func:`cluster_groups`).
- :mod:`axcnn.cluster.vq`: one codebook of ``vector_dim``-D entries per layer (:func:`cluster_vectors`).
- :mod:`axcnn.cluster.eq1`: Eq. 1 bit counts (:func:`eq1_bits`, :func:`compression_ratio`).
"""

from axcnn.cluster.eq1 import compression_ratio, eq1_bits, index_bits, index_dtype
from axcnn.cluster.groups import GRANULARITIES, GroupClustering, GroupSpec, GroupTable, cluster_groups
from axcnn.cluster.scalar import BACKENDS, Clustering, ClusterTable, cluster_range
from axcnn.cluster.vq import VectorClustering, VectorTable, cluster_vectors, n_vectors

__all__ = [
    "BACKENDS",
    "GRANULARITIES",
    "ClusterTable",
    "Clustering",
    "GroupClustering",
    "GroupSpec",
    "GroupTable",
    "VectorClustering",
    "VectorTable",
    "cluster_groups",
    "cluster_range",
    "cluster_vectors",
    "compression_ratio",
    "eq1_bits",
    "index_bits",
    "index_dtype",
    "n_vectors",
]
