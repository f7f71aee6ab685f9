"""Patch statistics of a layer's input (:func:`moments`) and what is read off them directly
(:func:`importance`, :func:`hessian`)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import numba
import numpy as np

from axcnn.correct.geometry import LayerGeometry
from axcnn.errors import AxcnnError

__all__ = ["PRECISIONS", "Moments", "blas_limit", "check_moments", "hessian", "importance", "moments"]

logger = logging.getLogger(__name__)

#: Values of the ``precision`` argument of :func:`moments`.
PRECISIONS = ("float64", "float32")


@dataclass(frozen=True, eq=False)
class Moments:
    """Second-order statistics of a layer's input patches (see :func:`moments`).

    Attributes:
        gram: float64 ``[groups, d, d]``, ``sum p p^T`` over every sample and output position.
        sums: float64 ``[groups, d]``, ``sum p``.
        count: number of patches per group (samples times output positions).
        cross: float64 ``[groups, d, d]``, ``sum p pd^T`` (``pd`` the dense network's patch), or None.
        gram_dense: float64 ``[groups, d, d]``, ``sum pd pd^T``, or None.
        sums_dense: float64 ``[groups, d]``, ``sum pd``, or None.
    """

    gram: np.ndarray
    sums: np.ndarray
    count: int
    cross: np.ndarray | None = None
    gram_dense: np.ndarray | None = None
    sums_dense: np.ndarray | None = None

    @property
    def has_dense(self) -> bool:
        """True when the dense stream was accumulated."""
        return self.cross is not None


def moments(
    geometry: LayerGeometry,
    x_batches: Iterable[np.ndarray] | np.ndarray,
    xd_batches: Iterable[np.ndarray] | np.ndarray | None = None,
    *,
    precision: str = "float64",
    chunk_bytes: int = 32 << 20,
    blas_threads: int | None = 1,
) -> Moments:
    """Accumulate the patch statistics of a layer's input over batches of samples.

    Args:
        geometry: the layer.
        x_batches: the layer's *input* activations, batch by batch (an iterable of arrays, or one array):
            ``[N, C_in, *spatial]`` for a conv, ``[N, ..., features]`` for gemm / matmul (leading dims are
            flattened into samples).  In a partly compressed network this is the compressed input.
        xd_batches: optionally the same samples' input in the dense network, batch for batch with the same
            shapes; enables :attr:`Moments.cross` and the dense target of :func:`fit_scale_bias`.
        precision: ``"float64"`` (default): patches and products in float64.  ``"float32"``: patches are
            centred by a per-channel shift (the first batch's channel means) and multiplied in float32,
            each chunk's product accumulated in float64 and the shift added back exactly; about 3-4x
            faster, with products accurate to about 1e-6 of the centred (co)variances.
        chunk_bytes: memory cap of one chunk's patch matrix (the batch is split into sample chunks).
        blas_threads: BLAS threads for the products while accumulating (threadpoolctl), or None to leave the
            process setting alone.  Default 1: on a shared 2-core machine, OpenBLAS's second thread mostly
            spin-waits; one thread was 3x faster in wall time and 5-10x in CPU time there.

    Padding contributes zeros exactly like the real convolution.  Memory is bounded by ``chunk_bytes`` plus
    the ``[groups, d, d]`` accumulators; the Gram matrices are BLAS products (``P^T P``).

    Raises:
        ValueError: bad arguments, no samples, batches of the wrong shape or a dense stream that does not
            match batch for batch.
        AxcnnError: the activations contain NaN or infinity.
    """
    if not isinstance(geometry, LayerGeometry):
        raise ValueError(f"geometry must be a LayerGeometry, got {type(geometry).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    chunk_bytes = operator.index(chunk_bytes)
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    with blas_limit(blas_threads):
        return _moments(geometry, x_batches, xd_batches, precision, chunk_bytes)


def blas_limit(blas_threads: object) -> contextlib.AbstractContextManager:
    """Limit BLAS to ``blas_threads`` threads for the block (None: leave the process setting alone).

    Raises ValueError naming the field unless it is None or an integer >= 1.
    """
    if blas_threads is None:
        return contextlib.nullcontext()
    try:
        threads = operator.index(blas_threads)  # type: ignore[arg-type]
    except TypeError:
        threads = 0
    if threads < 1:
        raise ValueError(f"blas_threads must be an integer >= 1 or None, got {blas_threads!r}")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=int(threads), user_api="blas")


def _moments(geometry, x_batches, xd_batches, precision, chunk_bytes) -> Moments:
    dense = xd_batches is not None
    it_x = iter([x_batches] if isinstance(x_batches, np.ndarray) else x_batches)
    it_d = iter([xd_batches] if isinstance(xd_batches, np.ndarray) else xd_batches) if dense else None
    acc = _Accumulator(geometry.groups, geometry.d, dense, precision)
    end = object()
    while True:
        xb = next(it_x, end)
        xdb = next(it_d, end) if dense else None
        if xb is end or xdb is end:
            if xb is not xdb and dense:
                longer = "x_batches" if xdb is end else "xd_batches"
                raise ValueError(f"x_batches and xd_batches must have the same number of batches; {longer} has more")
            break
        xb = _check_batch(geometry, xb, "x_batches")
        if dense:
            xdb = _check_batch(geometry, xdb, "xd_batches")
            if xdb.shape != xb.shape:
                raise ValueError(f"xd_batches must match x_batches batch for batch; got {xdb.shape} vs {xb.shape}")
        step = max(1, chunk_bytes // _patch_bytes(geometry, xb))
        for a in range(0, xb.shape[0], step):
            acc.add(geometry, xb[a : a + step], None if xdb is None else xdb[a : a + step])
    if acc.count == 0:
        raise ValueError("x_batches holds no samples; moments need at least one")
    m = acc.result()
    if not (np.isfinite(m.gram).all() and np.isfinite(m.sums).all()):
        raise AxcnnError("layer input activations contain NaN or infinity")
    if dense and not (np.isfinite(m.gram_dense).all() and np.isfinite(m.cross).all()):
        raise AxcnnError("dense layer input activations contain NaN or infinity")
    logger.debug("moments: %s, %d groups of d=%d, %d patches", geometry.op, geometry.groups, geometry.d, m.count)
    return m


def _check_batch(geom: LayerGeometry, x: object, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise ValueError(f"{name} must hold real numeric arrays, got dtype {x.dtype}")
    if geom.op == "conv":
        nsp = len(geom.kernel_shape)
        if x.ndim != nsp + 2 or x.shape[1] != geom.in_channels:
            raise ValueError(
                f"{name} must hold [N, {geom.in_channels}, <{nsp} spatial dims>] arrays for this conv, got {x.shape}"
            )
        geom.out_spatial(x.shape[2:])
        return x
    f = geom.in_channels
    if x.ndim < 2 or x.shape[-1] != f:
        raise ValueError(f"{name} must hold [N, ..., {f}] arrays for this {geom.op}, got {x.shape}")
    return x.reshape(-1, f)


def _patch_bytes(geom: LayerGeometry, x: np.ndarray) -> int:
    """Bytes of one sample's float64 patch matrix."""
    if geom.op != "conv":
        return 8 * geom.d
    return 8 * int(np.prod(geom.out_spatial(x.shape[2:]))) * geom.d * geom.group


# float32 mode: rows per float32 product (sgemm accumulates in float32 along the rows)
_F32_ROWS = 4096


class _Accumulator:
    """Running sums of patch products.  Internally a conv patch's columns are ordered (tap, channel) — the
    cheap im2col order — and permuted to the weight's (channel, tap) order in :meth:`result`."""

    def __init__(self, g: int, d: int, dense: bool, precision: str):
        self.f32 = precision == "float32"
        self.gram = np.zeros((g, d, d))
        self.sums = np.zeros((g, d))
        self.cross = np.zeros((g, d, d)) if dense else None
        self.gram_d = np.zeros((g, d, d)) if dense else None
        self.sums_d = np.zeros((g, d)) if dense else None
        self.count = 0
        self.shift: np.ndarray | None = None  # float32 mode: per input channel
        self.shift_d: np.ndarray | None = None
        self.geom: LayerGeometry | None = None

    def add(self, geom: LayerGeometry, x: np.ndarray, xd: np.ndarray | None) -> None:
        self.geom = geom
        if self.f32 and self.shift is None:
            self.shift = _channel_means(geom, x)
            self.shift_d = None if xd is None else _channel_means(geom, xd)
        p = _patches(geom, x, self.shift)
        pd = None if xd is None else _patches(geom, xd, self.shift_d)
        rows = p.shape[1]
        self.count += rows
        step = _F32_ROWS if self.f32 else max(rows, 1)
        for gi in range(p.shape[0]):
            for r in range(0, rows, step):
                a = p[gi, r : r + step]
                self.sums[gi] += a.sum(axis=0, dtype=np.float64)
                self.gram[gi] += a.T @ a
                if pd is not None:
                    b = pd[gi, r : r + step]
                    self.sums_d[gi] += b.sum(axis=0, dtype=np.float64)
                    self.cross[gi] += a.T @ b
                    self.gram_d[gi] += b.T @ b

    def result(self) -> Moments:
        gram, sums, cross, gram_d, sums_d = self.gram, self.sums, self.cross, self.gram_d, self.sums_d
        n = self.count
        if self.f32:
            # the products are of shifted patches (p - m); add the shift back exactly in float64:
            # sum p q^T = sum (p-m)(q-m')^T + m S_q^T + S_p m'^T - n m m'^T with S the unshifted sums
            m = self._shift_vector(self.shift)
            sums = sums + n * m
            gram = _unshift(gram, m, sums, m, sums, n)
            if cross is not None:
                md = self._shift_vector(self.shift_d)
                sums_d = sums_d + n * md
                cross = _unshift(cross, m, sums, md, sums_d, n)
                gram_d = _unshift(gram_d, md, sums_d, md, sums_d, n)
        if self.geom is not None and self.geom.op == "conv":
            # (tap, channel) -> (channel, tap): column c * taps + t of the weight is t * cg + c here
            taps = int(np.prod(self.geom.kernel_shape))
            cg = self.geom.d // taps
            perm = np.arange(self.geom.d).reshape(taps, cg).T.ravel()
            sums = sums[:, perm]
            gram = gram[:, perm][:, :, perm]
            if cross is not None:
                sums_d = sums_d[:, perm]
                cross = cross[:, perm][:, :, perm]
                gram_d = gram_d[:, perm][:, :, perm]
        gram = (gram + gram.transpose(0, 2, 1)) * 0.5  # exact symmetry (BLAS may round halves apart)
        if gram_d is not None:
            gram_d = (gram_d + gram_d.transpose(0, 2, 1)) * 0.5
        out = [np.ascontiguousarray(a) if a is not None else None for a in (gram, sums, cross, gram_d, sums_d)]
        for a in out:
            if a is not None:
                a.setflags(write=False)
        gram, sums, cross, gram_d, sums_d = out
        return Moments(gram=gram, sums=sums, count=n, cross=cross, gram_dense=gram_d, sums_dense=sums_d)

    def _shift_vector(self, shift: np.ndarray) -> np.ndarray:
        """Per-channel shift as ``[groups, d]`` internal patch entries ((tap, channel) order for a conv)."""
        g = self.gram.shape[0]
        cg = shift.shape[0] // g
        taps = self.gram.shape[1] // cg
        return np.tile(shift.reshape(g, cg), (1, taps))


def _unshift(prod: np.ndarray, m: np.ndarray, s: np.ndarray, mq: np.ndarray, sq: np.ndarray, n: int) -> np.ndarray:
    """``sum p q^T`` from ``sum (p-m)(q-mq)^T`` and the true sums ``s = sum p``, ``sq = sum q`` (per group)."""
    return prod + m[:, :, None] * sq[:, None, :] + s[:, :, None] * mq[:, None, :] - n * m[:, :, None] * mq[:, None, :]


def _channel_means(geom: LayerGeometry, x: np.ndarray) -> np.ndarray:
    """float64 mean of every input channel (conv) or feature over a batch."""
    if geom.op == "conv":
        return x.astype(np.float64).mean(axis=(0, *range(2, x.ndim)))
    return x.astype(np.float64).mean(axis=0)


def _patches(geom: LayerGeometry, x: np.ndarray, shift: np.ndarray | None) -> np.ndarray:
    """im2col: ``[groups, rows, d]`` patches of a chunk, float64 (or float32 minus ``shift`` when given).

    Conv columns are in (tap, channel) order: column ``t * C/group + c`` of group ``g`` is input channel
    ``g * C/group + c`` at kernel tap ``t`` (C order over the kernel dims).  1-D and 2-D convs use a compiled
    kernel over a channels-last copy of the input; other ranks a numpy loop over the taps.
    """
    dtype = np.float64 if shift is None else np.float32
    if geom.op != "conv":
        if shift is None:
            return x.astype(np.float64, copy=False)[None]
        return (x.astype(np.float32, copy=False) - shift.astype(np.float32))[None]
    n, c = x.shape[:2]
    nsp = len(geom.kernel_shape)
    out = geom.out_spatial(x.shape[2:])
    taps = int(np.prod(geom.kernel_shape))
    rows = n * int(np.prod(out))
    sh = np.zeros(c, dtype=dtype) if shift is None else shift.astype(dtype)
    if nsp <= 2:
        # a 1-D conv is a 2-D conv of height 1
        # (end pads need no handling: positions past the input read as padding)
        ks, st, dl, pb = geom.kernel_shape, geom.strides, geom.dilations, geom.pads[:nsp]
        if nsp == 1:
            ks, st, dl, pb, out2 = (1, *ks), (1, *st), (1, *dl), (0, *pb), (1, *out)
        else:
            out2 = out
        x4 = x.reshape(n, c, 1, -1) if nsp == 1 else x
        xl = np.ascontiguousarray(np.moveaxis(x4, 1, -1))  # [N, H, W, C] in the input's dtype
        p = np.empty((rows, taps * c), dtype=dtype)
        _im2col2d(xl, sh, ks[0], ks[1], st[0], st[1], dl[0], dl[1], pb[0], pb[1], out2[0], out2[1], p)
    else:
        p = _patches_nd(geom, x, sh, out, dtype).reshape(rows, taps * c)
    g = geom.group
    if g == 1:
        return p[None]
    cg = c // g
    return np.ascontiguousarray(p.reshape(rows, taps, g, cg).transpose(2, 0, 1, 3)).reshape(g, rows, -1)


@numba.njit(cache=True)
def _im2col2d(xl, shift, kh, kw, sh, sw, dh, dw, ph, pw, oh, ow, out):  # pragma: no cover - compiled
    """Fill ``out[rows, kh*kw*C]`` with the (tap, channel)-ordered patches of channels-last ``xl`` minus
    ``shift`` (zero padding becomes ``-shift``)."""
    n, h, w, c = xl.shape
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                r = (b * oh + i) * ow + j
                for a in range(kh):
                    y = i * sh - ph + a * dh
                    for e in range(kw):
                        xx = j * sw - pw + e * dw
                        base = (a * kw + e) * c
                        if 0 <= y < h and 0 <= xx < w:
                            for ch in range(c):
                                out[r, base + ch] = xl[b, y, xx, ch] - shift[ch]
                        else:
                            for ch in range(c):
                                out[r, base + ch] = -shift[ch]


def _patches_nd(geom: LayerGeometry, x: np.ndarray, shift: np.ndarray, out: tuple[int, ...], dtype) -> np.ndarray:
    """numpy im2col for any number of spatial dims: ``[N, *out, taps, C]``."""
    n, c = x.shape[:2]
    nsp = len(geom.kernel_shape)
    sp = x.shape[2:]
    pb, pe = geom.pads[:nsp], geom.pads[nsp:]
    xp = np.zeros((n, *(sp[i] + pb[i] + pe[i] for i in range(nsp)), c), dtype=dtype)
    xp[(slice(None), *(slice(pb[i], pb[i] + sp[i]) for i in range(nsp)), slice(None))] = np.moveaxis(x, 1, -1)
    xp -= shift  # padding included: every patch entry is p - m
    taps = list(itertools.product(*(range(k) for k in geom.kernel_shape)))
    p = np.empty((n, *out, len(taps), c), dtype=dtype)
    for t, tap in enumerate(taps):
        sl = tuple(
            slice(tap[i] * geom.dilations[i], tap[i] * geom.dilations[i] + geom.strides[i] * (out[i] - 1) + 1,
                  geom.strides[i])
            for i in range(nsp)
        )  # fmt: skip
        p[..., t, :] = xp[(slice(None), *sl, slice(None))]
    return p


def hessian(m: Moments | np.ndarray, damp: float = 0.0) -> np.ndarray:
    """``G + damp * mean(diag G) * I`` per group (float64 ``[groups, d, d]``); a group whose diagonal is all
    zero is damped by ``damp`` itself."""
    g = np.asarray(m.gram if isinstance(m, Moments) else m, dtype=np.float64)
    if g.ndim == 2:
        g = g[None]
    if g.ndim != 3 or g.shape[1] != g.shape[2]:
        raise ValueError(f"hessian must be [groups, d, d] or [d, d], got shape {g.shape}")
    damp = float(damp)
    if not (np.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be finite and >= 0, got {damp}")
    diag = np.einsum("gii->gi", g)
    lam = damp * diag.mean(axis=1)
    lam = np.where(lam > 0, lam, damp)
    return g + lam[:, None, None] * np.eye(g.shape[1])


def importance(m: Moments, geometry: LayerGeometry) -> np.ndarray:
    """Per-weight importance ``diag(G)``, float64 array of the weight's shape.

    The entry of weight ``w[o, c, *tap]`` is the sum over samples and output positions of the squared input
    it multiplies (input channel ``c`` of ``o``'s conv group at kernel tap ``tap``), the same for every
    output channel: the diagonal of the layer-output error ``(w - w_q)^T G (w - w_q)``.  Divide by
    ``m.count`` for mean squares.
    """
    check_moments(m, geometry)
    diag = np.einsum("gii->gi", m.gram)  # [g, d]
    og = geometry.n_out // geometry.group
    rows = np.broadcast_to(diag[:, None, :], (geometry.group, og, geometry.d))
    return geometry.unrows(np.array(rows, dtype=np.float64))


def check_moments(m: Moments, geometry: LayerGeometry) -> None:
    if not isinstance(m, Moments):
        raise ValueError(f"moments must be a Moments, got {type(m).__name__}")
    want = (geometry.groups, geometry.d, geometry.d)
    if m.gram.shape != want:
        raise ValueError(f"moments do not fit this layer: gram has shape {m.gram.shape}, expected {want}")
