"""Rewrite an ONNX model so that clustered weights are stored as (bit-packed) indices plus centroids.

The written model runs on stock onnxruntime (CPU): every shared weight is rebuilt by a small decode made of
standard ONNX ops whose inputs are all initializers, so onnxruntime's constant folding evaluates it once when
the session is created and inference costs nothing extra.

The package, by responsibility:

- :mod:`~axcnn.rewrite.common`: the records (:class:`SharedWeight`, :class:`StoredLayer`), reserved names,
  tensor helpers and the ``axcnn.layers`` metadata;
- :mod:`~axcnn.rewrite.encodings`: index/centroid tensors and the decode recipes (the format, byte by byte);
- :mod:`~axcnn.rewrite.share`: :func:`share_weights` and :func:`replace_weights`;
- :mod:`~axcnn.rewrite.readback`: reading a written model back: :func:`shared_layers`, :func:`decode`,
  :func:`verify`, :func:`expand`, :func:`weight_arrays`;
- :mod:`~axcnn.rewrite.write`: :func:`write_model`.
"""

from axcnn.rewrite.common import (
    FUNCTION_DOMAIN,
    LAYERS_KEY,
    NODE_PREFIX,
    SharedWeight,
    StoredLayer,
    is_shared_model,
)
from axcnn.rewrite.readback import decode, expand, shared_layers, verify, weight_arrays
from axcnn.rewrite.share import replace_weights, share_weights
from axcnn.rewrite.write import write_model

__all__ = [
    "FUNCTION_DOMAIN",
    "LAYERS_KEY",
    "NODE_PREFIX",
    "SharedWeight",
    "StoredLayer",
    "decode",
    "expand",
    "is_shared_model",
    "replace_weights",
    "share_weights",
    "shared_layers",
    "verify",
    "weight_arrays",
    "write_model",
]
