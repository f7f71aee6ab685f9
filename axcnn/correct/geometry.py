"""Geometry of a shareable layer (conv / gemm / matmul) and the weight <-> row layout of the corrections."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["OPS", "LayerGeometry"]

#: Layer kinds :class:`LayerGeometry` accepts.
OPS = ("conv", "gemm", "matmul")


def _ints(name: str, v: Iterable[int], minimum: int) -> tuple[int, ...]:
    try:
        out = tuple(operator.index(i) for i in v)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of integers, got {v!r}") from None
    bad = [i for i in out if i < minimum]
    if bad:
        raise ValueError(f"{name} must hold integers >= {minimum}, got {out}")
    return out


@dataclass(frozen=True)
class LayerGeometry:
    """Shape and wiring of one shareable layer, validated at construction.

    Prefer the constructors :meth:`conv`, :meth:`gemm` and :meth:`matmul`, which fill the derived fields.

    Attributes:
        op: ``"conv"``, ``"gemm"`` or ``"matmul"``.
        weight_shape: shape of the weight.  Conv: ``[O, C_in/group, *kernel]``.
        out_axis: output-channel axis of the weight (conv: 0; gemm: 0 with ``transB=1``, else 1; matmul: 1).
        in_axes: the contraction axes (every other axis), ascending.
        kernel_shape: conv only, ``weight_shape[2:]``.
        strides, dilations: conv only, one per spatial dim, ``>= 1``.
        pads: conv only, ``[begin_0, ..., begin_n, end_0, ..., end_n]`` (ONNX order), ``>= 0``.
        group: conv only, ``>= 1`` and dividing ``O`` (``group == C_in`` is depthwise).
    """

    op: str
    weight_shape: tuple[int, ...]
    out_axis: int
    in_axes: tuple[int, ...]
    kernel_shape: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    group: int = 1

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}, got {self.op!r}")
        shape = _ints("weight_shape", self.weight_shape, 1)
        for name in ("in_axes", "kernel_shape", "strides", "pads", "dilations"):
            object.__setattr__(self, name, _ints(name, getattr(self, name), 0))
        object.__setattr__(self, "weight_shape", shape)
        try:
            out_axis = operator.index(self.out_axis)
            group = operator.index(self.group)
        except TypeError:
            raise ValueError(f"out_axis and group must be integers, got {self.out_axis!r}, {self.group!r}") from None
        object.__setattr__(self, "out_axis", out_axis)
        object.__setattr__(self, "group", group)
        r = len(shape)
        if self.op == "conv":
            if r < 3:
                raise ValueError(f"weight_shape of a conv must have rank >= 3 ([O, C/group, *kernel]), got {shape}")
            nsp = r - 2
            if out_axis != 0:
                raise ValueError(f"out_axis of a conv must be 0, got {out_axis}")
            checks = [
                ("in_axes", self.in_axes, tuple(range(1, r))),
                ("kernel_shape", self.kernel_shape, shape[2:]),
            ]
            for name, got, want in checks:
                if got != want:
                    raise ValueError(f"{name} must be {want} for weight_shape {shape}, got {got}")
            for name, got, n, lo in (("strides", self.strides, nsp, 1), ("dilations", self.dilations, nsp, 1),
                                     ("pads", self.pads, 2 * nsp, 0)):  # fmt: skip
                if len(got) != n or min(got) < lo:
                    raise ValueError(f"{name} must hold {n} integers >= {lo} for a {nsp}-D conv, got {got}")
            if group < 1 or shape[0] % group:
                raise ValueError(f"group must be >= 1 and divide the {shape[0]} output channels, got {group}")
        else:
            if r != 2:
                raise ValueError(f"weight_shape of a {self.op} must have rank 2, got {shape}")
            allowed = (0, 1) if self.op == "gemm" else (1,)
            if out_axis not in allowed:
                raise ValueError(f"out_axis of a {self.op} must be in {allowed}, got {out_axis}")
            if self.in_axes != (1 - out_axis,):
                raise ValueError(f"in_axes must be {(1 - out_axis,)} for out_axis={out_axis}, got {self.in_axes}")
            for name in ("kernel_shape", "strides", "pads", "dilations"):
                if getattr(self, name):
                    raise ValueError(f"{name} applies to conv only; got {getattr(self, name)} for a {self.op}")
            if group != 1:
                raise ValueError(f"group applies to conv only and must be 1 for a {self.op}, got {group}")

    @classmethod
    def conv(
        cls,
        weight_shape: Iterable[int],
        *,
        strides: Iterable[int] | None = None,
        pads: Iterable[int] | None = None,
        dilations: Iterable[int] | None = None,
        group: int = 1,
    ) -> LayerGeometry:
        """A convolution with weight ``[O, C_in/group, *kernel]`` (defaults: stride 1, no pad, dilation 1)."""
        shape = tuple(weight_shape)
        nsp = max(len(shape) - 2, 0)
        return cls(
            op="conv",
            weight_shape=shape,
            out_axis=0,
            in_axes=tuple(range(1, len(shape))),
            kernel_shape=shape[2:],
            strides=(1,) * nsp if strides is None else tuple(strides),
            pads=(0,) * (2 * nsp) if pads is None else tuple(pads),
            dilations=(1,) * nsp if dilations is None else tuple(dilations),
            group=group,
        )

    @classmethod
    def gemm(cls, weight_shape: Iterable[int], *, trans_b: bool = True) -> LayerGeometry:
        """A Gemm ``y = x @ W^T`` (``trans_b``, weight ``[O, I]``) or ``y = x @ W`` (weight ``[I, O]``)."""
        out_axis = 0 if trans_b else 1
        return cls(op="gemm", weight_shape=tuple(weight_shape), out_axis=out_axis, in_axes=(1 - out_axis,))

    @classmethod
    def matmul(cls, weight_shape: Iterable[int]) -> LayerGeometry:
        """A MatMul ``y = x @ W`` with weight ``[I, O]``."""
        return cls(op="matmul", weight_shape=tuple(weight_shape), out_axis=1, in_axes=(0,))

    @property
    def n_out(self) -> int:
        """Output channels ``O``."""
        return self.weight_shape[self.out_axis]

    @property
    def groups(self) -> int:
        """Independent contraction groups (conv ``group``; 1 otherwise)."""
        return self.group

    @property
    def d(self) -> int:
        """Patch length per group: ``C_in/group * prod(kernel)`` (conv) or the input features."""
        return int(np.prod([self.weight_shape[a] for a in self.in_axes], dtype=np.int64))

    @property
    def in_channels(self) -> int:
        """Channels (conv) or features of the layer's input."""
        return self.weight_shape[1] * self.group if self.op == "conv" else self.weight_shape[self.in_axes[0]]

    def out_spatial(self, in_spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Output spatial shape of a conv for an input of spatial shape ``in_spatial``."""
        nsp = len(self.kernel_shape)
        out = []
        for i in range(nsp):
            span = in_spatial[i] + self.pads[i] + self.pads[nsp + i] - self.dilations[i] * (self.kernel_shape[i] - 1)
            if span < 1:
                raise ValueError(f"input spatial shape {in_spatial} is smaller than the (dilated) kernel {self}")
            out.append((span - 1) // self.strides[i] + 1)
        return tuple(out)

    # -- weight rows ---------------------------------------------------------------------------------------

    def rows(self, w: np.ndarray) -> np.ndarray:
        """The weight as float64 ``[groups, O/groups, d]``: row ``o`` of group ``g`` dots that group's patches."""
        w = np.asarray(w)
        if tuple(w.shape) != self.weight_shape:
            raise ValueError(f"weight must have shape {self.weight_shape}, got {tuple(w.shape)}")
        w = w.astype(np.float64, copy=False)
        if self.op != "conv":
            w = np.moveaxis(w, self.out_axis, 0)
        return np.ascontiguousarray(w).reshape(self.group, self.n_out // self.group, self.d)

    def unrows(self, r: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`rows` (any dtype): an array of the weight's shape."""
        if self.op == "conv":
            return np.ascontiguousarray(r.reshape(self.weight_shape))
        o_first = (self.n_out, self.weight_shape[self.in_axes[0]])
        return np.ascontiguousarray(np.moveaxis(r.reshape(o_first), 0, self.out_axis))
