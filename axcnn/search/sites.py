"""What the budget search knows about each shareable layer: how its input meets its weight (for input statistics,
data-aware clustering and the repair), where the repair's scale and bias go, and what the layer adds now."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from axcnn import affine
from axcnn.correct import LayerGeometry
from axcnn.model import LayerSpec, Skipped

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """One layer as the budget search sees it.

    ``geometry`` is None when the layer's input statistics cannot be gathered (a weight reached through a Reshape,
    ConvTranspose, auto_pad, Gemm with alpha != 1...): the layer is then clustered by plain inertia. ``affine`` is
    None when the repair cannot be applied (see :func:`axcnn.affine.affine_site`); ``why`` says why.
    """

    spec: LayerSpec
    input_name: str | None  # the layer's data input tensor (None without geometry)
    geometry: LayerGeometry | None
    affine: affine.AffineSite | None
    bias: np.ndarray | None = field(repr=False)  # what the layer adds per output channel now (float64), with affine
    why: str = ""

    @property
    def repairable(self) -> bool:
        return self.affine is not None and self.geometry is not None


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def geometry_of(node: onnx.NodeProto, spec: LayerSpec) -> LayerGeometry | str:
    """The layer's geometry when its input patches can be formed from the node alone, else the reason."""
    a = _attrs(node)
    if len(node.input) < 2 or node.input[1] != spec.name:
        return "the weight reaches its layer through another node"
    if node.op_type == "Conv":
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto not in ("NOTSET", "VALID"):
            return f"Conv with auto_pad={auto}"
        nsp = len(spec.shape) - 2
        return LayerGeometry.conv(spec.shape, strides=a.get("strides"), pads=a.get("pads") if auto == "NOTSET"
                                  else (0,) * (2 * nsp), dilations=a.get("dilations"), group=int(a.get("group", 1)))
    if node.op_type == "Gemm":
        if float(a.get("alpha", 1.0)) != 1.0 or int(a.get("transA", 0)):
            return "Gemm with alpha != 1 or transA"
        return LayerGeometry.gemm(spec.shape, trans_b=bool(a.get("transB", 0)))
    if node.op_type == "MatMul" and len(spec.shape) == 2:
        return LayerGeometry.matmul(spec.shape)
    return f"{node.op_type} layers are not supported by the input statistics"


def site_of(model: onnx.ModelProto, spec: LayerSpec) -> Site:
    node = next((n for n in model.graph.node if spec.name in n.input[1:2] and n.op_type == spec.op_type), None)
    if node is None:
        return Site(spec, None, None, None, None, "the weight reaches its layer through another node")
    geometry = geometry_of(node, spec)
    why = geometry if isinstance(geometry, str) else ""
    geometry = None if isinstance(geometry, str) else geometry
    got = affine.affine_site(model, spec.name)
    if isinstance(got, Skipped):
        why = why or got.reason
        return Site(spec, node.input[0] if geometry else None, geometry, None, None, why)
    return Site(spec, node.input[0] if geometry else None, geometry, got, affine.current_bias(model, spec.name), why)


def sites(model: onnx.ModelProto, layers: list[LayerSpec]) -> list[Site]:
    out = [site_of(model, s) for s in layers]
    for s in out:
        if s.why:
            log.info("%s: %s; %s", s.spec.name, s.why,
                     "clustered by plain inertia, no repair" if s.geometry is None else "no repair")
    return out


def dense_rows_bias(site: Site) -> np.ndarray:
    """The dense bias as the repair fit wants it: float64 [C] (zeros when the layer has none)."""
    if site.bias is not None:
        return site.bias
    return np.zeros(site.geometry.n_out if site.geometry is not None else 0)
