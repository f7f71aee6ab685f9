"""How one layer's weights share codebooks, and what follows from it: its clusterings for every K, their Eq. 1 bits,
their dense arrays and the :class:`~axcnn.rewrite.SharedWeight` that writes them. Every search strategy (greedy,
budget, Pareto) goes through here, so that a new way of sharing is offered by all of them at once.

A :class:`Sharing` says *how* to share (the user's choice, or a search's per layer):

``Sharing("layer")``
    one codebook of ``K`` scalars for the whole weight (the paper; :func:`axcnn.cluster.cluster_range`).
``Sharing("channel", group_size=G)``
    one codebook per ``G`` consecutive output channels, the last group smaller when ``G`` does not divide the
    channel count (coremltools' per-grouped-channel; :func:`axcnn.cluster.cluster_groups`, exact).
``Sharing("kernel")``
    one codebook per ``(o, i)`` kernel of a weight of rank >= 3 (:func:`axcnn.cluster.cluster_groups`, exact).
``Sharing("layer", vector_dim=2)``
    one codebook of ``K`` pairs; each pair of weights along the input-channel axis stores one index
    (coremltools' ``cluster_dim``; :func:`axcnn.cluster.cluster_vectors`, Lloyd: a local optimum).

:func:`layer_sharing` applies a :class:`Sharing` to a layer: it finds the weight's output- and input-channel axes
from the consuming op (:func:`weight_axes`) and, when the sharing cannot apply to that weight (kernel granularity on
a Gemm, channel axes of a weight reached through a Reshape...), falls back to one codebook per layer and says why
in one line. :func:`cluster_layer` builds the :class:`SharingTable` of every K; :meth:`SharingTable.get` gives a
:class:`SharedClustering`.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from axcnn.cluster import Clustering, GroupSpec, cluster_groups, cluster_range, cluster_vectors, n_vectors
from axcnn.cluster import eq1_bits as _eq1
from axcnn.model import LayerSpec
from axcnn.rewrite import SharedWeight

__all__ = [
    "GRANULARITIES",
    "LAYER",
    "VECTOR_DIMS",
    "LayerSharing",
    "SharedClustering",
    "Sharing",
    "SharingTable",
    "as_shared",
    "cluster_layer",
    "compression_ratio",
    "eq1_bits",
    "layer_sharing",
    "weight_axes",
]

log = logging.getLogger(__name__)

#: values of :attr:`Sharing.granularity`
GRANULARITIES = ("layer", "channel", "kernel")
#: values of :attr:`Sharing.vector_dim` (kernel-sized vectors lost 15 to 70 points in our study: not offered)
VECTOR_DIMS = (1, 2)


@dataclass(frozen=True)
class Sharing:
    """How a layer's weights share codebooks (see the module docstring). Validated at construction: a bad value
    or a contradictory combination raises ValueError naming the field, the value and what is allowed."""

    granularity: str = "layer"
    group_size: int = 1
    vector_dim: int = 1

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r} is invalid: allowed {' | '.join(GRANULARITIES)}")
        for name in ("group_size", "vector_dim"):
            value = getattr(self, name)
            try:
                value = operator.index(value)
            except TypeError:
                raise ValueError(f"{name}={value!r} is invalid: allowed an integer") from None
            if isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={value!r} is invalid: allowed an integer")
            object.__setattr__(self, name, value)
        if self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} is invalid: allowed an integer >= 1")
        if self.vector_dim not in VECTOR_DIMS:
            raise ValueError(f"vector_dim={self.vector_dim!r} is invalid: allowed 1 or 2")
        if self.group_size != 1 and self.granularity != "channel":
            raise ValueError(f"group_size={self.group_size!r} is invalid with granularity={self.granularity!r}: "
                             "allowed 1 (groups of output channels are for granularity 'channel')")
        if self.vector_dim != 1 and self.granularity != "layer":
            raise ValueError(f"vector_dim={self.vector_dim!r} is invalid with granularity={self.granularity!r}: "
                             "allowed 1 (vectors share one codebook per layer: granularity 'layer')")

    @classmethod
    def of(cls, config) -> Sharing:
        """The sharing a :class:`~axcnn.config.CompressConfig` asks for."""
        return cls(config.granularity, config.group_size, config.vector_dim)

    def describe(self) -> str:
        """``layer``, ``channel/4`` (groups of 4 channels), ``kernel`` or ``layer, 2-D vectors``."""
        if self.vector_dim > 1:
            return f"layer, {self.vector_dim}-D vectors"
        if self.granularity == "channel":
            return f"channel/{self.group_size}"
        return self.granularity

    def as_dict(self) -> dict:
        """The report's fields: granularity, group_size (None unless channel), vector_dim."""
        return {"granularity": self.granularity,
                "group_size": self.group_size if self.granularity == "channel" else None,
                "vector_dim": self.vector_dim}


LAYER = Sharing()


# ---------------------------------------------------------------------------------------------- axes of a weight

def weight_axes(spec: LayerSpec) -> tuple[int, int] | str:
    """``(output-channel axis, input-channel axis)`` of ``spec``'s stored weight (non-negative), from the op that
    reads it, or the one-line reason they are not known.

    Conv ``[O, I/g, *k]``: (0, 1). ConvTranspose ``[I, O/g, *k]`` with group 1: (1, 0) (a grouped one has its
    output channels on two axes). Gemm B: (0, 1) with ``transB=1``, else (1, 0); a constant Gemm A ``[M, K]``:
    (0, 1), with ``transA=1`` (1, 0). MatMul B ``[..., I, O]``: (-1, -2); a constant MatMul A ``[..., M, K]``:
    (-2, -1).
    """
    op, r, od = spec.op_type, len(spec.shape), spec.operand
    if not od.direct:
        return f"its {op} reads it through a Reshape or Transpose, so the op's channel axes are not the weight's"
    if r < 2:
        return f"a {r}-D weight has no channel axes"
    if op == "Conv":
        return 0, 1
    if op == "ConvTranspose":
        if od.group != 1:
            return "a grouped ConvTranspose has its output channels on two weight axes"
        return 1, 0
    if op == "Gemm":
        if od.position == 1:
            return (0, 1) if od.trans else (1, 0)
        return (1, 0) if od.trans else (0, 1)
    if op == "MatMul":
        return (r - 1, r - 2) if od.position == 1 else (r - 2, r - 1)
    return f"{op} is not a layer op"


@dataclass(frozen=True)
class LayerSharing:
    """A :class:`Sharing` applied to one weight: the sharing actually used, the axes it uses and, when it is not
    the one asked for, why (``note``: one line)."""

    sharing: Sharing
    axis: int = 0  # channel granularity: the output-channel axis grouped
    vector_axis: int = 1  # vectors: the input-channel axis they run along
    note: str | None = None

    def codebooks(self, shape: tuple[int, ...]) -> int:
        s = self.sharing
        if s.granularity == "channel":
            return -(-shape[self.axis] // s.group_size)
        if s.granularity == "kernel":
            return shape[0] * shape[1]
        return 1

    def group_spec(self) -> GroupSpec:
        s = self.sharing
        return GroupSpec(s.granularity, axis=self.axis, group_size=s.group_size)

    def eq1_bits(self, spec: LayerSpec, k: int) -> int:
        """Eq. 1 bits of ``spec``'s weight shared this way with ``k`` entries per codebook (every codebook
        counted; vectors: one index per vector, odd rows padded)."""
        s = self.sharing
        if s.vector_dim > 1:
            return _eq1(spec.weights, k, spec.bits, vector_dim=s.vector_dim,
                        vectors=n_vectors(spec.shape, self.vector_axis, s.vector_dim))
        return _eq1(spec.weights, k, spec.bits, codebooks=self.codebooks(spec.shape))


def layer_sharing(spec: LayerSpec, sharing: Sharing) -> LayerSharing:
    """``sharing`` applied to ``spec``'s weight; when it cannot apply, one codebook per layer with the reason.

    Channel groups larger than the channel count are cut to it (one codebook either way).
    """
    if sharing == LAYER:
        return LayerSharing(LAYER)
    shape = spec.shape
    if sharing.granularity == "kernel":
        if len(shape) < 3:
            return LayerSharing(LAYER, note=f"kernel granularity needs a weight of rank >= 3 ([O, I, *kernel]); "
                                            f"this {spec.op_type} weight has shape {list(shape)}: one codebook per "
                                            "layer instead")
        return LayerSharing(sharing)
    axes = weight_axes(spec)
    if isinstance(axes, str):
        what = "channel granularity" if sharing.granularity == "channel" else f"{sharing.vector_dim}-D vectors"
        return LayerSharing(LAYER, note=f"{what} need the weight's channel axes, but {axes}: one scalar codebook "
                                        "per layer instead")
    out_axis, in_axis = axes
    if sharing.granularity == "channel":
        g = min(sharing.group_size, shape[out_axis])
        return LayerSharing(Sharing("channel", g), axis=out_axis)
    return LayerSharing(sharing, vector_axis=in_axis)


def eq1_bits(spec: LayerSpec, sharing: Sharing, k: int) -> int:
    """Eq. 1 bits of ``spec``'s weight shared as ``sharing`` (after :func:`layer_sharing`'s fallback) with ``k``
    entries per codebook, counting every codebook."""
    return layer_sharing(spec, sharing).eq1_bits(spec, k)


# ------------------------------------------------------------------------------------------------- clusterings

@dataclass(frozen=True, eq=False)
class SharedClustering:
    """One clustering of one weight, however shared.

    Attributes:
        k: entries per codebook (effective: clamped to what the data allow).
        centroids: float64; ``[K]`` (layer), ``[codebooks, K]`` (channel, kernel: row ``g`` is codebook ``g``,
            padded with its largest entry when the group has fewer than K values) or ``[K, vector_dim]``.
        indices: the weight's shape (vectors: with the input-channel axis ``ceil(. / vector_dim)``).
        inertia: (weighted) squared error of the shared weight against the original, float64.
        layout: how it is shared (:class:`LayerSharing`).
        shape, dtype: the weight's.
    """

    k: int
    centroids: np.ndarray = field(repr=False)
    indices: np.ndarray = field(repr=False)
    inertia: float
    layout: LayerSharing
    shape: tuple[int, ...]
    dtype: str

    @property
    def sharing(self) -> Sharing:
        return self.layout.sharing

    @property
    def codebooks(self) -> int:
        return self.layout.codebooks(self.shape)

    def shared_weight(self, name: str) -> SharedWeight:
        """The record :func:`axcnn.rewrite.share_weights` writes (centroids in the weight's dtype)."""
        s, lay = self.sharing, self.layout
        c = self.centroids.astype(self.dtype)
        if s.vector_dim > 1:
            return SharedWeight(name, c, self.indices, vector_dim=s.vector_dim, vector_axis=lay.vector_axis)
        if s.granularity == "channel":
            return SharedWeight(name, c, self.indices, granularity="channel", axis=lay.axis, group_size=s.group_size)
        if s.granularity == "kernel":
            return SharedWeight(name, c, self.indices, granularity="kernel")
        return SharedWeight(name, c, self.indices)

    def dense(self, dtype=None) -> np.ndarray:
        """The shared weight, of the weight's shape, in the weight's dtype (as the written file decodes it), or in
        ``dtype`` (e.g. float64 for fits)."""
        c = self.centroids.astype(self.dtype if dtype is None else dtype)
        s = self.sharing
        if s.vector_dim == 1 and s.granularity == "layer":
            return c[self.indices]
        return SharedWeight("w", c, self.indices, granularity=s.granularity, axis=self.layout.axis,
                            group_size=s.group_size, vector_dim=s.vector_dim,
                            vector_axis=self.layout.vector_axis).dense(self.shape)

    def eq1_bits(self, bits: int) -> int:
        """Eq. 1 bits, ``bits`` being the bits of one weight (counts every codebook)."""
        s = self.sharing
        if s.vector_dim > 1:
            return _eq1(int(np.prod(self.shape, dtype=np.int64)), self.k, bits, vector_dim=s.vector_dim,
                        vectors=int(self.indices.size))
        return _eq1(int(np.prod(self.shape, dtype=np.int64)), self.k, bits, codebooks=self.codebooks)


def as_shared(spec: LayerSpec, clustering: Clustering | SharedClustering) -> SharedClustering:
    """``clustering`` as a :class:`SharedClustering` (a plain :class:`~axcnn.cluster.Clustering` is one codebook
    per layer)."""
    if isinstance(clustering, SharedClustering):
        return clustering
    return SharedClustering(clustering.k, clustering.centroids, clustering.indices, clustering.inertia,
                            LayerSharing(LAYER), spec.shape, spec.dtype)


class SharingTable:
    """Every K of one layer shared one way: :attr:`ks` (effective, ascending), :meth:`inertia`, :meth:`get`,
    :meth:`eq1_bits`, :meth:`compression_ratio`. Built by :func:`cluster_layer`.

    Attributes:
        spec: the layer.
        requested: the :class:`Sharing` asked for; ``layout`` is what is used (``layout.note`` says why when it
            differs).
        n_unique: distinct values of the whole weight.
        clamped: True when a K of the range exceeded what the data allow (distinct values of the layer, of the
            largest group, or distinct vectors) and was cut to it.
        weighted: True when per-weight importance was given.
    """

    def __init__(self, spec: LayerSpec, requested: Sharing, layout: LayerSharing, ks: tuple[int, ...],
                 n_unique: int, clamped: bool, weighted: bool, inertia, build):
        self.spec = spec
        self.requested = requested
        self.layout = layout
        self.ks = ks
        self.n_unique = n_unique
        self.clamped = clamped
        self.weighted = weighted
        self._inertia = inertia
        self._build = build
        self._cache: dict[int, SharedClustering] = {}

    @property
    def sharing(self) -> Sharing:
        """The sharing actually used."""
        return self.layout.sharing

    def _check(self, k: int) -> int:
        if k not in self.ks:
            raise KeyError(f"K={k!r} is not a candidate of {self.spec.name} shared as {self.sharing.describe()}; "
                           f"available K: {', '.join(map(str, self.ks))}")
        return k

    def inertia(self, k: int) -> float:
        return float(self._inertia(self._check(k)))

    def get(self, k: int) -> SharedClustering:
        hit = self._cache.get(self._check(k))
        if hit is None:
            c = self._build(k)
            hit = self._cache[k] = SharedClustering(int(c.k), c.centroids, c.indices, float(c.inertia), self.layout,
                                                    self.spec.shape, self.spec.dtype)
        return hit

    def eq1_bits(self, k: int) -> int:
        return self.layout.eq1_bits(self.spec, k)

    def compression_ratio(self, k: int) -> float:
        """Eq. 1 compression ratio of the layer at ``k`` (every codebook counted)."""
        return self.spec.weights * self.spec.bits / self.eq1_bits(k)

    def __contains__(self, k: object) -> bool:
        return k in self.ks

    def __len__(self) -> int:
        return len(self.ks)

    def __repr__(self) -> str:
        return (f"SharingTable({self.spec.name}, {self.sharing.describe()}, ks={self.ks[0]}..{self.ks[-1]}, "
                f"clamped={self.clamped})")


def _group_unique(values: np.ndarray, spec: GroupSpec) -> np.ndarray:
    """Distinct values of every group of ``spec``: int64 ``[codebooks]``."""
    flat = spec.to_groups(np.asarray(values))
    off = spec.offsets(values.shape)
    gid = np.repeat(np.arange(off.shape[0] - 1), np.diff(off))
    order = np.lexsort((flat, gid))
    v, g = flat[order], gid[order]
    first = np.ones(v.shape[0], dtype=bool)
    first[1:] = (v[1:] != v[:-1]) | (g[1:] != g[:-1])
    return np.bincount(g[first], minlength=off.shape[0] - 1)


def cluster_layer(spec: LayerSpec, sharing: Sharing, kmin: int, kmax: int, *, weights: np.ndarray | None = None,
                  backend: str = "exact", seed: int = 0, device: str = "cpu",
                  ks: Iterable[int] | None = None) -> SharingTable:
    """Cluster ``spec``'s weight shared as ``sharing`` (after :func:`layer_sharing`) for every K in ``[kmin,
    kmax]``; K above what the data allow is clamped (``table.clamped``).

    Layer granularity is :func:`~axcnn.cluster.cluster_range` with ``backend``, ``seed`` and ``device``, exactly;
    channel and kernel granularities solve every group exactly (:func:`~axcnn.cluster.cluster_groups`); vectors
    run Lloyd's k-means from a seeded k-means++ (:func:`~axcnn.cluster.cluster_vectors`). ``weights``: optional
    per-weight importance of the weight's shape, passed through. When the sharing falls back, the reason is kept in
    ``table.layout.note`` (and logged at debug level: the caller says it to the user as it sees fit).

    ``ks``: only these K of the range, for vectors (each K is a Lloyd fit of its own; the other sharings solve
    every K of the range at once and ignore it).

    Raises ValueError for a bad range, backend or weights, or a backend other than ``exact`` with a sharing that
    is not one scalar codebook per layer.
    """
    kmin, kmax = operator.index(kmin), operator.index(kmax)
    if not 1 <= kmin <= kmax:
        raise ValueError(f"kmin={kmin}, kmax={kmax} is invalid: allowed 1 <= kmin <= kmax")
    layout = layer_sharing(spec, sharing)
    if layout.note:
        log.debug("%s: %s", spec.name, layout.note)
    s = layout.sharing
    if s == LAYER:
        t = cluster_range(spec.array, kmin, kmax, weights=weights, backend=backend, seed=seed, device=device)
        return SharingTable(spec, sharing, layout, tuple(t.ks), t.n_unique, t.clamped, t.weighted, t.inertia, t.get)
    if backend != "exact":
        raise ValueError(f"backend={backend!r} is invalid with sharing {s.describe()}: allowed 'exact' (groups are "
                         "solved exactly, vectors by axcnn's own k-means)")
    n_unique = int(np.unique(spec.array).shape[0])
    if s.vector_dim > 1:
        wanted = range(kmin, kmax + 1) if ks is None else sorted({k for k in ks if kmin <= k <= kmax})
        if not wanted:
            raise ValueError(f"ks={ks!r} is invalid: allowed K values within [{kmin}, {kmax}]")
        vt = cluster_vectors(spec.array, wanted, vector_axis=layout.vector_axis,
                             vector_dim=s.vector_dim, weights=weights, seed=seed)
        return SharingTable(spec, sharing, layout, tuple(vt.ks), n_unique, vt.clamped, vt.weighted, vt.inertia,
                            vt.get)
    gspec = layout.group_spec()
    most = int(_group_unique(spec.array, gspec).max())
    ks = tuple(sorted({min(k, most) for k in range(kmin, kmax + 1)}))
    gt = cluster_groups(spec.array, ks, gspec, weights=weights)
    return SharingTable(spec, sharing, layout, ks, n_unique, kmax > most, weights is not None, gt.inertia, gt.get)


def compression_ratio(spec: LayerSpec, sharing: Sharing, k: int) -> float:
    """Eq. 1 compression ratio of ``spec`` shared as ``sharing`` (after the fallback) with ``k``."""
    return spec.weights * spec.bits / eq1_bits(spec, sharing, k)
