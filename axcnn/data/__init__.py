"""Scoring data: one reader per source, one output.

Every source ends as a :class:`Dataset`: inputs ``x`` ready to feed the model, int64 labels ``y`` or None when the
data is unlabelled, and a :class:`Provenance` (source kind, path, counts) for the report.

- :mod:`~axcnn.data.npz`: an ``.npz`` with ``x`` and, when labelled, ``y``;
- :mod:`~axcnn.data.images`: a folder of PNG/JPEG images, one subfolder per class or flat (unlabelled);
- :mod:`~axcnn.data.zoo`: ONNX model zoo ``test_data_set_N/input_0.pb`` (+ ``output_0.pb``);
- :mod:`~axcnn.data.synthetic`: synthetic inputs for data-free runs;
- :mod:`~axcnn.data.preprocess`: :class:`Preprocess` (flags and presets) and :func:`prepare`;
- :mod:`~axcnn.data.subsets`: seeded, label-stratified subsets;
- :mod:`~axcnn.data.source`: :func:`find_source` and :func:`load`, the entry point over all of them.

The package runs no model: scoring is :mod:`axcnn.score`'s job.
"""

from axcnn.data.dataset import SOURCES, Dataset, Provenance
from axcnn.data.npz import load_npz
from axcnn.data.preprocess import LAYOUTS, PRESETS, Geometry, Preprocess, image_geometry, parse_floats, prepare
from axcnn.data.source import Source, find_source, load
from axcnn.data.subsets import stratified_subset
from axcnn.data.synthetic import GENERATORS, synthesize

__all__ = [
    "GENERATORS",
    "LAYOUTS",
    "PRESETS",
    "SOURCES",
    "Dataset",
    "Geometry",
    "Preprocess",
    "Provenance",
    "Source",
    "find_source",
    "image_geometry",
    "load",
    "load_npz",
    "parse_floats",
    "prepare",
    "stratified_subset",
    "synthesize",
]
