"""Rewrite an ONNX model so that clustered weights are stored as (bit-packed) indices plus centroids.

The written model runs on stock onnxruntime (CPU): every shared weight is rebuilt by a small decode made of
standard ONNX ops whose inputs are all initializers, so onnxruntime's constant folding evaluates it once when
the session is created and inference costs nothing extra.

The package, by responsibility:

- :mod:`~axcnn.rewrite.common`: the records (:class:`SharedWeight`: which weights share a codebook, by
  layer, channel group or kernel, or as vectors; :class:`StoredLayer`), :func:`eq1_bits`, reserved names, tensor
  helpers and the ``axcnn.layers`` metadata;
- :mod:`~axcnn.rewrite.encodings`: the decode recipes (the format, byte by byte);
- :mod:`~axcnn.rewrite.builder`: puts each layer's tensors and decode into the model;
- :mod:`~axcnn.rewrite.share`: :func:`share_weights` and :func:`replace_weights`;
- :mod:`~axcnn.rewrite.records`: :func:`shared_layers`, each layer's record rebuilt from the graph;
- :mod:`~axcnn.rewrite.readback`: reading a written model back: :func:`decode`, :func:`verify`, :func:`expand`,
  :func:`weight_arrays`;
- :mod:`~axcnn.rewrite.write`: :func:`write_model`.
"""

from axcnn.rewrite.common import (
    FUNCTION_DOMAIN,
    GRANULARITIES,
    LAYERS_KEY,
    NODE_PREFIX,
    SharedWeight,
    StoredLayer,
    eq1_bits,
    is_shared_model,
)
from axcnn.rewrite.readback import decode, expand, verify, weight_arrays
from axcnn.rewrite.records import shared_layers
from axcnn.rewrite.share import replace_weights, share_weights
from axcnn.rewrite.write import write_model

__all__ = [
    "FUNCTION_DOMAIN",
    "GRANULARITIES",
    "LAYERS_KEY",
    "NODE_PREFIX",
    "SharedWeight",
    "StoredLayer",
    "decode",
    "eq1_bits",
    "expand",
    "is_shared_model",
    "replace_weights",
    "share_weights",
    "shared_layers",
    "verify",
    "weight_arrays",
    "write_model",
]
