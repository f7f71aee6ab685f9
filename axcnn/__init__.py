"""axcnn: post-training weight sharing for ONNX models.

The public API is :func:`axcnn.api.compress` with :class:`axcnn.config.CompressConfig`.
"""

from axcnn.errors import AxcnnError

__version__ = "0.1.0"

__all__ = ["AxcnnError", "__version__"]
