"""The run journal: an append-only record of the work a run has done, so that a killed run can resume.

A run directory holds ``journal.jsonl``: one JSON object per line, each line written whole, flushed and fsynced
before the run moves on.

- The first line is the header: ``{"kind": "header", "fingerprint": {...}}``. The fingerprint names what the
  results depend on: the model's bytes, the scoring data (as fed to the model), the settings and the axcnn version.
  A journal is resumed only by a run with the same fingerprint; any other is refused with a one-line message
  saying what differs.
- Every other line is a record ``{"kind": KIND, "key": [...], "value": ...}``. ``kind`` says what the record is
  (``candidate``, ``layer``, ``estimates`` for the greedy search; other strategies add their own kinds), ``key``
  is a JSON-able tuple naming the item, ``value`` any JSON value. A later record with the same kind and key wins.
- ``{"kind": "done"}`` closes a run that finished. A finished journal is replaced by the next run without
  ``resume``; an unfinished one is refused then, so that hours of scoring are never thrown away by accident.

A line cut short by a kill (the last one, without its newline or not parseable) is ignored and cut off before the
next record is appended. A bad line anywhere else means the file was damaged: it is refused.

The generic API is :meth:`Journal.open`, :meth:`Journal.get`, :meth:`Journal.put`. The greedy search's records
(:class:`~axcnn.score.Outcome` of a scored candidate, the :class:`~axcnn.explore.LayerDecision` of a fixed layer)
are serialised by :meth:`Journal.put_outcome` / :meth:`Journal.outcome` and :meth:`Journal.put_decision` /
:meth:`Journal.decision`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from axcnn.errors import AxcnnError
from axcnn.explore import Candidate, LayerDecision
from axcnn.model import LayerSpec
from axcnn.score import Outcome
from axcnn.sharing import LayerSharing, SharedClustering, Sharing

try:  # advisory lock against two runs appending to one journal (POSIX)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

FORMAT = 1
FILE_NAME = "journal.jsonl"

#: record kinds of the greedy search
CANDIDATE = "candidate"  # key (weight name, K) -> Outcome of the candidate's race
LAYER = "layer"  # key (weight name,) -> the LayerDecision that fixed the layer
ESTIMATES = "estimates"  # key (weight name,) -> [[K, estimate], ...] of the kl estimator


# ----------------------------------------------------------------------------------------------- fingerprint

def _sha256_files(paths: Iterable[os.PathLike | str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0file\0")
    return h.hexdigest()


def _sha256_arrays(arrays: Iterable[np.ndarray | None]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none;")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{list(a.shape)};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _plain(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists), so fingerprints compare equal after a round trip."""
    return json.loads(json.dumps(value, sort_keys=True))


def fingerprint(*, model_files: Iterable[os.PathLike | str], arrays: Iterable[np.ndarray | None],
                settings: Mapping[str, Any], version: str) -> dict:
    """What a run's results depend on: the model files' bytes, the scoring arrays as fed to the model, the
    settings (JSON-able) and the tool version."""
    return {"format": FORMAT, "version": version, "model": _sha256_files(model_files),
            "data": _sha256_arrays(arrays), "settings": _plain(dict(settings))}


def _difference(old: Mapping, new: Mapping) -> str:
    """What differs between two fingerprints, in a few words."""
    if old.get("format") != new.get("format"):
        return f"journal format {old.get('format')} (this axcnn writes {new.get('format')})"
    if old.get("version") != new.get("version"):
        return f"another axcnn version ({old.get('version')}; this is {new.get('version')})"
    if old.get("model") != new.get("model"):
        return "another model (the model bytes differ)"
    if old.get("data") != new.get("data"):
        return "other data (the scoring samples differ)"
    a, b = old.get("settings") or {}, new.get("settings") or {}
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if changed:
        shown = ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        return f"other settings ({shown}{more})"
    return "another run"


# ------------------------------------------------------------------------------------------------- the file

def _key(kind: str, key: Iterable) -> str:
    return json.dumps([kind, _plain(list(key))], separators=(",", ":"))


class Journal:
    """An open journal (see the module docstring). Use :meth:`open`; close it, or use it as a context manager
    (see :meth:`__exit__` for what happens to it when the block raises)."""

    def __init__(self, run_dir: Path, path: Path, fd: int, header: dict, records: dict[str, Any],
                 finished: bool, created_dir: bool):
        self.run_dir = run_dir
        self.path = path
        self._fd: int | None = fd
        self.fingerprint = header["fingerprint"]
        self._records = records
        self.loaded = len(records)  # records read from the file at open (0 for a fresh journal)
        self.written = 0  # records appended by this process
        self.finished = finished
        self._created_dir = created_dir

    # -- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, run_dir: str | os.PathLike, fingerprint: Mapping[str, Any], resume: bool) -> Journal:
        """Open the journal in ``run_dir`` (created if needed) for a run with ``fingerprint``.

        ``resume=False``: start a new journal. A finished journal, or one holding no record, is replaced; an
        unfinished one with records is refused (AxcnnError), so that work is not discarded by accident.
        ``resume=True``: continue the journal there if any (refused when its fingerprint differs); with none,
        start a new one.
        """
        run_dir = Path(run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise AxcnnError(f"the run directory {run_dir} is a file")
        created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AxcnnError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}") from None
        path = run_dir / FILE_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            if created:
                _rmdir(run_dir)
            raise AxcnnError(f"cannot open the journal {path}: {exc.strerror or exc}") from None
        try:
            _lock(fd, run_dir)
            journal = cls._read(run_dir, path, fd, dict(fingerprint), resume, created)
        except BaseException:
            os.close(fd)
            raise
        return journal

    @classmethod
    def _read(cls, run_dir: Path, path: Path, fd: int, fp: dict, resume: bool, created: bool) -> Journal:
        fp = _plain(fp)
        with open(fd, "rb", closefd=False) as f:
            f.seek(0)
            raw = f.read()
        lines = raw.split(b"\n")
        complete = lines[:-1]  # the part after the last newline is a line cut short (or empty)
        good_end = len(raw) - len(lines[-1])
        header = None
        records: dict[str, Any] = {}
        finished = False
        for i, line in enumerate(complete):
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "kind" not in rec:
                    raise ValueError("not a record")
            except ValueError:
                if i == len(complete) - 1 and not lines[-1]:
                    good_end -= len(line) + 1  # the last line, cut short: ignore it
                    break
                raise AxcnnError(f"the journal {path} is damaged at line {i + 1}; delete {run_dir} to start "
                                 "over") from None
            if i == 0:
                if rec.get("kind") != "header" or not isinstance(rec.get("fingerprint"), dict):
                    raise AxcnnError(f"{path} is not an axcnn journal; use another run directory")
                header = rec
                continue
            if rec["kind"] == "done":
                finished = True
                continue
            records[_key(rec["kind"], rec.get("key", []))] = rec.get("value")
            finished = False

        fresh = header is None or not records or (finished and not resume)
        if header is not None and not fresh:
            if not resume:
                raise AxcnnError(f"{run_dir} holds the journal of an unfinished run ({len(records)} records); "
                                 f"continue it with --resume, or delete {run_dir} to start over")
            if header["fingerprint"] != fp:
                raise AxcnnError(f"the journal in {run_dir} is from {_difference(header['fingerprint'], fp)}; "
                                 f"use another --run-dir or delete {run_dir}")
        if fresh:
            header = {"kind": "header", "fingerprint": fp}
            _truncate(fd, path, 0)
            journal = cls(run_dir, path, fd, header, {}, False, created)
            journal._append(header)
            log.info("journal %s: new", path)
            return journal
        if good_end != len(raw):
            log.info("journal %s: ignoring a last line cut short (%d bytes)", path, len(raw) - good_end)
            _truncate(fd, path, good_end)
        log.info("journal %s: resuming with %d records", path, len(records))
        return cls(run_dir, path, fd, header, records, finished, created)

    # -- the generic API -------------------------------------------------------------------------------------
    def get(self, kind: str, key: Iterable) -> Any | None:
        """The value recorded for ``(kind, key)``, or None."""
        return self._records.get(_key(kind, key))

    def put(self, kind: str, key: Iterable, value: Any) -> None:
        """Record ``value`` for ``(kind, key)``; it is on disk (fsynced) when this returns."""
        if kind in ("header", "done"):
            raise ValueError(f"kind={kind!r} is reserved")
        self._append({"kind": kind, "key": _plain(list(key)), "value": value})
        self._records[_key(kind, key)] = _plain(value)
        self.written += 1
        self.finished = False

    def count(self, kind: str) -> int:
        """Records of ``kind`` held (read at open and written since)."""
        prefix = json.dumps([kind])[:-1] + ","
        return sum(1 for k in self._records if k.startswith(prefix))

    def finish(self) -> None:
        """Mark the run finished: the next run without ``resume`` may replace this journal. The run's results are
        written by then, so a failure to record it is only logged (the journal then reads as unfinished)."""
        try:
            self._append({"kind": "done"})
        except OSError as exc:
            log.warning("could not mark the journal %s finished: %s", self.path, exc.strerror or exc)
            return
        self.finished = True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also releases the lock
            self._fd = None

    def discard(self) -> None:
        """Remove the journal, and the run directory when this run created it and it is empty."""
        self.close()
        self.path.unlink(missing_ok=True)
        if self._created_dir:
            _rmdir(self.run_dir)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """On an AxcnnError that the input caused (the same run would fail again) the journal is removed; on any
        other exception (Ctrl-C, a crash, or the environment: an OSError, or an AxcnnError raised from one, such as
        a full disk) it is kept when it holds records, for ``resume``."""
        if exc is not None and (_input_fault(exc) or not self._records):
            self.discard()
        self.close()

    def _append(self, record: dict) -> None:
        if self._fd is None:
            raise ValueError("the journal is closed")
        line = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
        try:
            view = memoryview(line)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fsync(self._fd)
        except OSError as exc:  # an OSError, not an AxcnnError: the journal is kept (see __exit__)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc

    # -- the greedy search's records -------------------------------------------------------------------------
    def put_outcome(self, layer: str, k: int, outcome: Outcome) -> None:
        self.put(CANDIDATE, (layer, k), {"correct": int(outcome.correct), "seen": int(outcome.seen),
                                         "total": int(outcome.total), "stopped_early": bool(outcome.stopped_early)})

    def outcome(self, layer: str, k: int) -> Outcome | None:
        v = self.get(CANDIDATE, (layer, k))
        return None if v is None else Outcome(v["correct"], v["seen"], v["total"], v["stopped_early"])

    def put_estimates(self, layer: str, estimates: Mapping[int, float]) -> None:
        self.put(ESTIMATES, (layer,), [[int(k), float(v)] for k, v in estimates.items()])

    def estimates(self, layer: str) -> dict[int, float] | None:
        v = self.get(ESTIMATES, (layer,))
        return None if v is None else {int(k): float(e) for k, e in v}

    def put_decision(self, d: LayerDecision) -> None:
        c = d.shared()
        lay = c.layout
        self.put(LAYER, (d.spec.name,), {
            "shape": list(d.spec.shape), "n_unique": d.n_unique, "clamped": d.clamped, "plan": d.plan,
            "chosen": d.chosen.k, "candidates": [_candidate_dict(x) for x in d.candidates],
            "clustering": {"k": c.k, "inertia": c.inertia, "centroids": _array_dict(c.centroids),
                           "indices": _array_dict(c.indices),
                           "sharing": {"granularity": c.sharing.granularity, "group_size": c.sharing.group_size,
                                       "vector_dim": c.sharing.vector_dim, "axis": lay.axis,
                                       "vector_axis": lay.vector_axis, "note": lay.note}},
            "timing": {"clustering_s": d.clustering_s, "scoring_s": d.scoring_s, "estimate_s": d.estimate_s},
        })

    def decision(self, spec: LayerSpec) -> LayerDecision | None:
        """The recorded decision for ``spec``'s layer, rebuilt exactly (the clustering included), or None."""
        v = self.get(LAYER, (spec.name,))
        if v is None:
            return None
        if tuple(v["shape"]) != spec.shape:
            raise AxcnnError(f"the journal {self.path} records {spec.name} with shape {v['shape']}, the model has "
                             f"{list(spec.shape)}; delete {self.run_dir} to start over")
        cl = v["clustering"]
        centroids, indices = _array(cl["centroids"]), _array(cl["indices"])
        centroids.setflags(write=False)
        indices.setflags(write=False)
        sh = cl.get("sharing") or {}  # (absent: a journal written before granularities, one codebook per layer)
        layout = LayerSharing(Sharing(sh.get("granularity", "layer"), sh.get("group_size", 1),
                                      sh.get("vector_dim", 1)), sh.get("axis", 0), sh.get("vector_axis", 1),
                              sh.get("note"))
        clustering = SharedClustering(int(cl["k"]), centroids, indices, float(cl["inertia"]), layout, spec.shape,
                                      spec.dtype)
        candidates = tuple(Candidate(**x) for x in v["candidates"])
        chosen = next(x for x in candidates if x.k == v["chosen"])
        t = v["timing"]
        return LayerDecision(spec, v["n_unique"], v["clamped"], candidates, chosen, clustering, v["plan"],
                             t["clustering_s"], t["scoring_s"], t["estimate_s"])


def _input_fault(exc: BaseException) -> bool:
    """An error of the input (the model, the data, the options), as opposed to the environment or an interrupt."""
    return isinstance(exc, AxcnnError) and not isinstance(exc.__cause__, OSError)


def _candidate_dict(c: Candidate) -> dict:
    return {"k": c.k, "inertia": c.inertia, "estimate": c.estimate, "compression_ratio": c.compression_ratio,
            "scored": c.scored, "correct": c.correct, "score": c.score, "stopped_early": c.stopped_early,
            "samples_seen": c.samples_seen}


def _array_dict(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def _array(d: Mapping) -> np.ndarray:
    dtype = np.dtype(d["dtype"])
    if dtype.hasobject:
        raise AxcnnError("the journal holds an object array; it is not loaded")
    return np.frombuffer(base64.b64decode(d["b64"]), dtype=dtype).reshape(d["shape"]).copy()


def _lock(fd: int, run_dir: Path) -> None:
    if fcntl is None:  # pragma: no cover
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise AxcnnError(f"another axcnn run is using the journal in {run_dir}") from None


def _truncate(fd: int, path: Path, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        raise AxcnnError(f"cannot write the journal {path}: {exc.strerror or exc}") from None


def _rmdir(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
