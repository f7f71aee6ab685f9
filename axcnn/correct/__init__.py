"""Statistics of a layer's input and closed-form corrections after clustering (plain numpy, no ONNX).

A shareable layer computes, per output channel ``o`` and per output position, ``y = w[o] . p + b[o]`` where
``p`` is the input *patch* (im2col row) the weight row meets: ``C_in/group * prod(kernel)`` values for a
convolution, the input features for Gemm / MatMul.  Everything here works from the second-order statistics
of those patches, accumulated once over calibration samples by :func:`moments`:

- ``G = sum p p^T`` (per conv group), the patch sums and the patch count;
- optionally, with the same samples' input in the *dense* network (``xd``), ``C = sum p pd^T``,
  ``Gd = sum pd pd^T`` and the dense patch sums, so that a correction can target the dense layer's output
  while seeing the compressed network's input.

From them, with no convolution run:

- :func:`importance`: ``diag(G)`` per input channel and kernel tap, broadcast to the weight's shape — the
  per-weight weighting of :func:`axcnn.cluster.cluster_range` (``weights=``).
- :func:`fit_scale_bias` / :func:`fit_bias`: per output channel, the least-squares scale and bias that make
  the clustered layer's output match the dense one, and the squared output error before and after (the
  analytic "layer output error" proxy).
- :func:`gptq_assign`: GPTQ / OBQ-style error feedback with a fixed codebook.

Supported layers (:class:`LayerGeometry`): ``"conv"`` (any number of spatial dims, strides, explicit pads,
dilations, groups incl. depthwise), ``"gemm"`` (weight ``[O, I]`` with ``transB=1`` or ``[I, O]``) and
``"matmul"`` (weight ``[I, O]``, input ``[..., I]``).  ConvTranspose is not supported.  ONNX ``auto_pad``
must be resolved to explicit ``pads`` by the caller.
"""

from axcnn.correct.fit import SCALE_RANGE, ScaleBias, fit_bias, fit_outputs, fit_scale_bias
from axcnn.correct.geometry import OPS, LayerGeometry
from axcnn.correct.gptq import gptq_assign
from axcnn.correct.stats import PRECISIONS, Moments, hessian, importance, moments

__all__ = [
    "OPS",
    "PRECISIONS",
    "SCALE_RANGE",
    "LayerGeometry",
    "Moments",
    "ScaleBias",
    "fit_bias",
    "fit_outputs",
    "fit_scale_bias",
    "gptq_assign",
    "hessian",
    "importance",
    "moments",
]
