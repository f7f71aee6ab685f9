"""The one output of every reader: model-ready inputs, labels or None, and where they came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SOURCES = ("npz", "images", "zoo", "synthetic")


@dataclass(frozen=True)
class Provenance:
    """Where a :class:`Dataset` came from; goes into the report as ``report["data"]``.

    ``source`` is one of :data:`SOURCES`; ``path`` the file or folder given (None for synthetic data; for zoo
    sets found beside the model, the model's folder); ``read`` the number of samples the source held;
    ``details`` source-specific facts as (key, value) pairs: class names, files, test sets, the generator,
    channel conversions.
    """

    source: str
    path: str | None
    labelled: bool
    read: int
    details: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r} is invalid: allowed {' | '.join(SOURCES)}")

    def as_dict(self, used: int | None = None) -> dict:
        """JSON-ready: source, path, labelled, samples read and used, then the details."""
        out: dict = {"source": self.source, "path": self.path, "labelled": self.labelled, "read": self.read}
        if used is not None:
            out["samples"] = used
        out.update(self.details)
        return out


@dataclass(frozen=True, eq=False)
class Dataset:
    """Model-ready inputs ``x`` (dtype of the model input), int64 labels ``y`` of shape [n] or None when the data
    is unlabelled, and its :class:`Provenance`.

    ``reference`` optionally holds, per sample, the original model's top-1 as stored with the data (the outputs of
    an ONNX-zoo test set), to check the model against.
    """

    x: np.ndarray
    y: np.ndarray | None
    provenance: Provenance | None = None
    reference: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.x.ndim < 1:
            raise ValueError(f"x must have one row per sample, got shape {list(self.x.shape)}")
        for name in ("y", "reference"):
            a = getattr(self, name)
            if a is None:
                continue
            if a.ndim != 1:
                raise ValueError(f"{name} must be 1-D, got shape {list(a.shape)}")
            if len(self.x) != len(a):
                raise ValueError(f"x and {name} must have the same length, got x shape {list(self.x.shape)} "
                                 f"and {len(a)} {'labels' if name == 'y' else 'reference values'}")

    @property
    def labelled(self) -> bool:
        return self.y is not None

    def subset(self, idx) -> Dataset:
        """The samples at ``idx`` (an index array or a boolean mask)."""
        idx = np.asarray(idx)
        return Dataset(self.x[idx], None if self.y is None else self.y[idx], self.provenance,
                       None if self.reference is None else self.reference[idx])

    def __len__(self) -> int:
        return len(self.x)
